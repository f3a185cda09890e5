"""Export a hybrid to a native transformers class, loadable with no custom code (research/peers.md §2.5).

Attention + Mamba2 hybrids map exactly onto `GraniteMoeHybridForCausalLM`: `layer_types` `full_attention` /
`linear_attention`, full RoPE, neutral µP multipliers with `attention_multiplier = head_dim**-0.5`, no experts, gate
and up fused into `shared_mlp.input_linear`. Our Mamba2 keeps x and B per KV group; Granite keeps them per SSM group,
so with `mamba_n_groups = num_heads` (one group per head, C stays per head) x and B rows and their conv channels are
repeated per head, which is exact. transformers 5's Granite then normalises the gated norm per group = per head, as
our mixer does.
"""

import torch
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

from .configs.export import TARGETS, ExportConfig
from .errors import ConfigError, UnsupportedModelError
from .modeling import HybridForCausalLM, Mamba2MixerConfig
from .provenance import record_step

_LAYER_TYPES = {"attention": "full_attention", "mamba2": "linear_attention"}


def check_export(model: HybridForCausalLM, config: ExportConfig) -> None:
    """Raise `UnsupportedModelError` if `model` has no exact native equivalent, before anything is built."""
    if config.to == "gguf":
        raise ConfigError("to='gguf' writes a file, not a model: call hybridize.export_gguf(model, path, config, ...)")
    c = model.config
    unsupported = sorted(set(c.mixer_types) - set(_LAYER_TYPES))
    if unsupported:
        raise UnsupportedModelError(f"mixers {unsupported} have no native {config.to} equivalent; keep the hybrid")
    if "attention" not in c.mixer_types:
        raise UnsupportedModelError(
            "a model with no attention layer cannot be exported: transformers' GraniteMoeHybrid cache needs one; "
            "keep the hybrid format"
        )
    if c.attention_bias or c.attention_out_bias or c.mlp_bias:
        raise UnsupportedModelError("models with attention or MLP biases (e.g. Qwen2) have no exact Granite export")
    if c.num_attention_heads * c.head_dim != c.hidden_size:
        raise UnsupportedModelError(
            f"heads x head_dim ({c.num_attention_heads} x {c.head_dim}) != hidden_size ({c.hidden_size}): "
            "Granite's Mamba2 needs d_inner = expand x hidden"
        )


def _granite_config(model: HybridForCausalLM) -> GraniteMoeHybridConfig:
    c = model.config
    s = Mamba2MixerConfig.from_hybrid_config(c)
    return GraniteMoeHybridConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        shared_intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        position_embedding_type="rope",
        layer_types=[_LAYER_TYPES[t] for t in c.mixer_types],
        num_local_experts=0,
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
        attention_multiplier=c.head_dim**-0.5,
        mamba_n_heads=s.num_heads,
        mamba_n_groups=s.num_heads,
        mamba_d_head=s.head_dim,
        mamba_d_state=s.state_size,
        mamba_d_conv=s.conv_kernel,
        mamba_expand=1,
        mamba_chunk_size=s.chunk_size,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
    )


def _mamba2_tensors(mixer) -> dict[str, torch.Tensor]:
    """Our per-group x/B rows repeated per head, in Granite's row order z | x | B | C | dt."""
    s = mixer.settings
    repeat = s.num_heads // s.num_groups
    sizes = [s.num_groups * s.head_dim, s.num_groups * s.state_size, s.num_heads * s.state_size]

    def per_head(t: torch.Tensor, size: int) -> torch.Tensor:  # (groups * size, ...) -> (heads * size, ...)
        return t.unflatten(0, (s.num_groups, size)).repeat_interleave(repeat, dim=0).flatten(0, 1)

    z, xBC, dt = mixer.in_proj.weight.split([mixer.inner_size, mixer.conv_size, s.num_heads])
    x, B, C = xBC.split(sizes)
    conv_w_x, conv_w_B, conv_w_C = mixer.conv1d.weight.split(sizes)
    conv_b_x, conv_b_B, conv_b_C = mixer.conv1d.bias.split(sizes)
    return {
        "in_proj.weight": torch.cat([z, per_head(x, s.head_dim), per_head(B, s.state_size), C, dt]),
        "conv1d.weight": torch.cat([per_head(conv_w_x, s.head_dim), per_head(conv_w_B, s.state_size), conv_w_C]),
        "conv1d.bias": torch.cat([per_head(conv_b_x, s.head_dim), per_head(conv_b_B, s.state_size), conv_b_C]),
        "dt_bias": mixer.dt_bias,
        "A_log": mixer.A_log,
        "D": mixer.D,
        "norm.weight": mixer.norm.weight,
        "out_proj.weight": mixer.out_proj.weight,
    }


@torch.no_grad()
def export(model: HybridForCausalLM, config: ExportConfig) -> GraniteMoeHybridForCausalLM:
    """A native `GraniteMoeHybridForCausalLM` computing the same function as `model` (not modified).

    Example:
        ```python
        >>> native = export(hybrid, ExportConfig(to="granitemoehybrid"))
        ```
    """
    check_export(model, config)
    native = GraniteMoeHybridForCausalLM(_granite_config(model)).to(model.dtype).eval()
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
        if layer.mixer_type == "attention":
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                state[f"{prefix}self_attn.{name}.weight"] = getattr(layer.mixer, name).weight
        else:
            state.update({prefix + "mamba." + k: v for k, v in _mamba2_tensors(layer.mixer).items()})
    missing, unexpected = native.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    native.tie_weights()
    native.generation_config = model.generation_config
    native.hybridize_steps = list(getattr(model, "hybridize_steps", []))
    record_step(native, "export", config)
    return native


__all__ = ["TARGETS", "ExportConfig", "check_export", "export"]
