"""Per-family facts about the source models hybridize converts: Llama (SmolLM2 included, also when read from GGUF),
Mistral and Qwen2. All three share one decoder layout (pre-norm RMSNorm, rotary attention with grouped KV heads,
a SiLU-gated MLP); they differ only in which projections carry a bias and in sliding-window attention. The code
reads all three alike: the decoder layers are `model.layers`; in each, attention is `self_attn` (`q_proj`, `k_proj`,
`v_proj`, `o_proj`), the MLP is `mlp` (`gate_proj`, `up_proj`, `down_proj`), the norms are `input_layernorm` and
`post_attention_layernorm`; the final norm is `model.norm`. `head_dim(config)` is the one rule for a head's size.

`check_supported(config)` reads nothing but the config, so an architecture hybridize cannot convert is refused
before any weights are read, with a message that names the problem, the value seen and the fix.
"""

from dataclasses import dataclass, replace

from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import UnsupportedModelError


@dataclass(frozen=True, kw_only=True)
class Family:
    """Facts about one source family. `FAMILIES` holds each family's defaults; `check_supported` returns them
    resolved against one model's config.

    Args:
        name (`str`):
            The transformers `model_type` (`"llama"`, `"mistral"`, `"qwen2"`).
        qkv_bias (`bool`):
            Whether `q_proj`, `k_proj` and `v_proj` carry a bias (Qwen2 always; Llama when `attention_bias=True`).
        o_bias (`bool`):
            Whether `o_proj` carries a bias (Llama when `attention_bias=True`).
    """

    name: str
    qkv_bias: bool
    o_bias: bool


FAMILIES: dict[str, Family] = {
    "llama": Family(name="llama", qkv_bias=False, o_bias=False),  # both become True with attention_bias=True
    "mistral": Family(name="mistral", qkv_bias=False, o_bias=False),
    "qwen2": Family(name="qwen2", qkv_bias=True, o_bias=False),
}

# Fields by which transformers' mixture-of-experts configs give their number of experts (Mixtral, Qwen2-MoE, DeepSeek).
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
_ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)


def _supported() -> str:
    return ", ".join(FAMILIES)


def _rope_types(config: PreTrainedConfig) -> list[str]:
    """The rope types in `config.rope_parameters`: one flat dict, or one dict per layer type."""
    params = getattr(config, "rope_parameters", None) or {}
    nested = [v for v in params.values() if isinstance(v, dict)]
    return [p.get("rope_type", "default") for p in (nested or [params])]


def _sliding_window(config: PreTrainedConfig) -> int | None:
    """The sliding window that some layer really uses, or None when every layer attends to the full context."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if config.model_type == "qwen2":  # Qwen2 applies its window only with use_sliding_window, and per layer_types
        layer_types = getattr(config, "layer_types", None) or []
        if not getattr(config, "use_sliding_window", False) or "sliding_attention" not in layer_types:
            return None
    elif config.model_type != "mistral":  # Llama has no sliding window; a stray field does nothing there
        return None
    return window if window < config.max_position_embeddings else None


def head_dim(config: PreTrainedConfig) -> int:
    """Size of one attention head of a Llama-family (or hybrid) config: its `head_dim`, else `hidden_size //
    num_attention_heads`, as transformers' Llama reads it."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_supported(config: PreTrainedConfig) -> Family:
    """Check that hybridize can convert a model with this config, before any of its weights are read.

    Args:
        config (`PreTrainedConfig`):
            The source model's config, e.g. from `hybridize.sources.load_config`.

    Returns:
        `Family`: the family's facts, resolved for this config (its biases).

    Raises:
        `UnsupportedModelError`: for another model type, a mixture of experts, an active sliding window, an MLP bias,
            an activation other than SiLU or an unknown rope type.

    Example:
        ```python
        >>> check_supported(LlamaConfig(attention_bias=True)).o_bias
        True
        ```
    """
    model_type = getattr(config, "model_type", None)
    for field in _EXPERT_FIELDS:
        num_experts = getattr(config, field, None)
        if isinstance(num_experts, int) and num_experts > 1:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is a mixture of experts ({field}={num_experts}), which is not supported "
                f"(supported: {_supported()}, dense models only); pass a dense Llama-family model"
            )
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {_supported()}); pass a Llama-family model"
        )
    if (act := getattr(config, "hidden_act", "silu")) != "silu":
        raise UnsupportedModelError(
            f"hidden_act {act!r} is not supported ({model_type} models are converted with a SiLU-gated MLP only); "
            "pass a model with hidden_act='silu'"
        )
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError(
            f"mlp_bias=True is not supported (seen in a {model_type} config); pass a model without MLP biases"
        )
    for rope_type in _rope_types(config):
        if rope_type not in _ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not one transformers knows (known: {', '.join(_ROPE_TYPES)}); "
                "pass a model with a standard rope_parameters"
            )
    if (window := _sliding_window(config)) is not None:
        raise UnsupportedModelError(
            f"sliding_window={window} is shorter than max_position_embeddings={config.max_position_embeddings} "
            f"in this {model_type} config, and sliding-window sources are not supported; pass a model with full "
            "attention (sliding_window=None)"
        )
    family = FAMILIES[model_type]
    attention_bias = model_type == "llama" and bool(getattr(config, "attention_bias", False))
    return replace(family, qkv_bias=family.qkv_bias or attention_bias, o_bias=family.o_bias or attention_bias)


__all__ = ["FAMILIES", "Family", "check_supported", "head_dim"]
