"""`HybridCache`: one cache layer per model layer, each made by its mixer (`new_cache_layer`)."""

from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration import HybridConfig
from .mixers import MIXERS


class HybridCache(Cache):
    """A transformers `Cache` whose layers are chosen by each layer's mixer: a KV cache for attention, conv + SSM
    state for Mamba2. Only adds a token count for models without any attention layer, whose recurrent layers do not
    track a sequence length (transformers' `get_seq_length` raises for those)."""

    def __init__(self, config: HybridConfig):
        super().__init__(layers=[MIXERS[name].new_cache_layer(config, i) for i, name in enumerate(config.mixer_types)])
        self.num_seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not any(isinstance(layer, CacheLayerMixin) for layer in self.layers):
            return self.num_seen_tokens
        return super().get_seq_length(layer_idx)

    def reset(self):
        super().reset()
        self.num_seen_tokens = 0


def new_cache(model: nn.Module) -> Cache:
    """An empty cache for `model`: a `HybridCache` for a hybrid, transformers' `DynamicCache` for anything else."""
    if isinstance(model.config, HybridConfig):
        return HybridCache(model.config)
    return DynamicCache(config=model.config)


__all__ = ["HybridCache", "new_cache"]
