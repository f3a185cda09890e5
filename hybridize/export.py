"""Export a hybrid to a native transformers class, loadable with no custom code (research/peers.md §2.5).

Attention + Mamba2 hybrids map exactly onto `GraniteMoeHybridForCausalLM`: `layer_types` `full_attention` /
`linear_attention`, full RoPE, neutral µP multipliers with `attention_multiplier = head_dim**-0.5`, no experts, gate
and up fused into `shared_mlp.input_linear`. What is particular to a mixer (its layer type, its config fields, its
tensors under Granite's names, and why a layer has no exact Granite form) is in its handler in `hybridize.surgery`
(`attention.py`, `mamba2.py`); a mixer without one is refused with "export does not support <mixer>".
"""

from collections.abc import Sequence

import torch
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

from .configs.export import TARGETS, ExportConfig
from .errors import ConfigError, UnsupportedModelError
from .modeling import HybridForCausalLM
from .modeling.mixers import MIXERS
from .provenance import record_step
from .surgery import MixerSurgery, handlers, surgery_for


def check_native_layers(mixer_types: Sequence[str]) -> dict[str, MixerSurgery]:
    """The export handler of each mixer in `mixer_types`, if GraniteMoeHybrid can hold such a model's layers.

    Raises:
        `UnsupportedModelError`: a mixer without an export handler, or no attention layer.
    """
    found = {t: surgery_for(t, "export") for t in mixer_types}
    if "attention" not in found:
        raise UnsupportedModelError(
            "a model with no attention layer cannot be exported: transformers' GraniteMoeHybrid cache needs one; "
            "keep the hybrid format"
        )
    return found


def native_layer_names() -> dict[str, str]:
    """GraniteMoeHybrid `layer_types` names -> our mixer names, for every mixer that exports."""
    names = {}
    for name in MIXERS:
        try:
            handler = surgery_for(name, "export")
        except UnsupportedModelError:
            continue
        names.update({native: name for native in handler.native_layer_types})
    return names


def check_export(model: HybridForCausalLM, config: ExportConfig) -> None:
    """Raise `UnsupportedModelError` if `model` has no exact native equivalent, before anything is built."""
    if config.to == "gguf":
        raise ConfigError("to='gguf' writes a file, not a model: call hybridize.export_gguf(model, path, config, ...)")
    c = model.config
    found = check_native_layers(c.mixer_types)
    if c.attention_bias or c.attention_out_bias or c.mlp_bias:
        raise UnsupportedModelError("models with attention or MLP biases (e.g. Qwen2) have no exact Granite export")
    for handler in found.values():
        handler.check_native(c)


def _granite_config(model: HybridForCausalLM, found: dict[str, MixerSurgery]) -> GraniteMoeHybridConfig:
    c = model.config
    fields = {}
    for handler in handlers():  # Granite validates every field, the Mamba2 ones of a model without Mamba2 layers too
        if "export" in handler.operations:
            fields |= handler.native_config(c)
    return GraniteMoeHybridConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        shared_intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        position_embedding_type="rope",
        layer_types=[found[t].native_layer_types[0] for t in c.mixer_types],
        num_local_experts=0,
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
        **fields,
    )


@torch.no_grad()
def export(model: HybridForCausalLM, config: ExportConfig) -> GraniteMoeHybridForCausalLM:
    """A native `GraniteMoeHybridForCausalLM` computing the same function as `model` (not modified).

    Example:
        ```python
        >>> native = export(hybrid, ExportConfig(to="granitemoehybrid"))
        ```
    """
    check_export(model, config)
    found = check_native_layers(model.config.mixer_types)  # the export handler of each mixer
    native = GraniteMoeHybridForCausalLM(_granite_config(model, found)).to(model.dtype).eval()
    state = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight,
        "model.norm.weight": model.model.norm.weight,
    }
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight
        state[prefix + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        state[prefix + "shared_mlp.input_linear.weight"] = torch.cat(
            [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]
        )
        state[prefix + "shared_mlp.output_linear.weight"] = layer.mlp.down_proj.weight
        state.update({prefix + k: v for k, v in found[layer.mixer_type].native_tensors(layer.mixer).items()})
    missing, unexpected = native.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    native.tie_weights()
    native.generation_config = model.generation_config
    native.hybridize_steps = list(getattr(model, "hybridize_steps", []))
    record_step(native, "export", config)
    return native


__all__ = ["TARGETS", "ExportConfig", "check_export", "check_native_layers", "export", "native_layer_names"]
