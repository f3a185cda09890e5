"""`HybridConfig`: the source Llama-family config plus which mixer each layer runs.

The per-layer mixer names live in `mixer_types`, not in transformers' `layer_types`: transformers 5 validates
`layer_types` against its own vocabulary and silently remaps `"attention"` to `"full_attention"`, so our names would
not survive a save/load round trip there. Mixer settings live in `mixers[name]` as plain dicts (JSON in config.json)
and are parsed by each mixer's own frozen dataclass.
"""

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class HybridConfig(LlamaConfig):
    r"""
    Configuration of a [`HybridForCausalLM`]: every field of [`LlamaConfig`] (which also covers Mistral and Qwen2
    layers) plus:

    Args:
        mixer_types (`list[str]`, *optional*):
            One entry per layer: the token mixer it runs (`"attention"`, `"mamba2"`). Defaults to all attention.
        mixers (`dict[str, dict]`, *optional*):
            Settings per mixer name, e.g. `{"mamba2": {"chunk_size": 64}}`; read by that mixer's config dataclass.
        attention_out_bias (`bool`, *optional*):
            Whether `o_proj` has a bias. Defaults to `attention_bias` (Llama); Qwen2 has q/k/v biases but none here.
        source_model_type (`str`, *optional*, defaults to `"llama"`):
            The family the model was converted from, kept for export and model cards.
        lowrank (`dict[str, int]`, *optional*):
            Linears stored as low-rank factors (`hybridize factorize`): module name, as in `named_modules()` (e.g.
            `"model.layers.3.mlp.gate_proj"`), -> rank. Each is built as a `LowRankLinear`. Defaults to none.

    Example:
        ```python
        >>> config = HybridConfig(num_hidden_layers=4, mixer_types=["mamba2", "attention"] * 2)
        ```
    """

    model_type = "hybridize"

    mixer_types: list[str] | None = None
    mixers: dict | None = None
    attention_out_bias: bool | None = None
    source_model_type: str = "llama"
    lowrank: dict | None = None

    def __post_init__(self, **kwargs):
        if self.mixer_types is None:
            self.mixer_types = ["attention"] * self.num_hidden_layers
        if self.mixers is None:
            self.mixers = {}
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.lowrank is None:
            self.lowrank = {}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: one mixer per layer, and heads that divide into KV groups."""
        super().validate_architecture()
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers is {self.num_hidden_layers}; "
                "give one mixer name per layer"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        for name, rank in self.lowrank.items():
            parts = name.split(".")
            if parts[:2] != ["model", "layers"] or len(parts) < 5 or not parts[2].isdigit():
                raise ValueError(f"lowrank entry {name!r} is not a linear inside model.layers.<i>")
            if int(parts[2]) >= self.num_hidden_layers or not isinstance(rank, int) or rank < 1:
                raise ValueError(
                    f"lowrank entry {name!r}: {rank!r} needs a layer < {self.num_hidden_layers} and an integer rank >= 1"
                )


def mixer_settings(settings_class: type, config: HybridConfig, name: str, defaults: dict | None = None):
    """`settings_class` built from `config.mixers[name]` over `defaults`; unknown keys are named, not ignored."""
    settings = config.mixers.get(name, {})
    known = {f.name for f in dataclasses.fields(settings_class)}
    if unknown := set(settings) - known:
        raise ValueError(f"unknown {name} settings {sorted(unknown)}; known: {sorted(known)}")
    return settings_class(**{**(defaults or {}), **settings})


__all__ = ["HybridConfig", "mixer_settings"]
