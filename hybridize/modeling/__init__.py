"""The hybrid model: a plain transformers `PreTrainedModel` whose layers each run one token mixer. Only torch, the
public transformers API and sibling modules are imported here: these files travel with every saved checkpoint
(`auto_map`) and must run where hybridize is not installed."""

from .attention import AttentionMixer
from .cache import HybridCache, new_cache
from .configuration import HybridConfig
from .lowrank import LowRankLinear
from .mamba2 import Mamba2Mixer, Mamba2MixerConfig
from .mixer import Mixer, RollbackCacheLayer
from .mixers import MIXERS
from .model import HybridDecoderLayer, HybridForCausalLM, HybridModel, HybridPreTrainedModel

__all__ = [
    "MIXERS",
    "AttentionMixer",
    "HybridCache",
    "HybridConfig",
    "HybridDecoderLayer",
    "HybridForCausalLM",
    "HybridModel",
    "HybridPreTrainedModel",
    "LowRankLinear",
    "Mamba2Mixer",
    "Mamba2MixerConfig",
    "Mixer",
    "RollbackCacheLayer",
    "new_cache",
]
