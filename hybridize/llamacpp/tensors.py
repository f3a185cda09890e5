"""A model's weights as llama.cpp names and lays them out: `llama` for all-attention models, `granitehybrid` for
attention + Mamba2 hybrids (llama.cpp `src/models/granite-hybrid.cpp`, `src/models/mamba-base.cpp`; tensor and key
names from the `gguf` package's `MODEL_TENSORS` and `Keys`).

Three things differ from the PyTorch hybrid, each mapped exactly:

- RoPE: both architectures rotate pairs of consecutive channels (ggml's "normal" RoPE), transformers rotates channel
  i with i + head_dim/2. q and k rows are reordered per head so that the pairs line up (`_interleave_rope_rows`).
- Groups: llama.cpp's Mamba2 shares B and C per group (head h reads group h // (heads / groups)) and keeps x per head;
  our mixer shares x and B per KV group and keeps C per head. With one group per head (`ssm.group_count = heads`),
  x and B are repeated to every head of their KV group (the rows and their conv channels), as `hybridize.export`
  does for GraniteMoeHybrid. The gated RMSNorm is then per group = per head, as ours.
- Width: llama.cpp's `granitehybrid` loads only `ssm.inner_size = 2 x hidden` ("only an expansion factor of 2 is
  supported", a GGML_ASSERT), while a MambaInLlama hybrid has inner size heads x head_dim = hidden. Each head is
  widened to `copies` x head_dim channels holding `copies` identical copies of the head: the z and x rows and x's conv
  channels are repeated, so every copy computes the same state and output; the norm's mean over the widened group
  equals the mean over the head (same values, repeated); `ssm_out` reads the first copy and has zero columns for the
  others. Exact, at the price of llama.cpp computing the copies: with x and B per head and two copies, a SmolLM2
  Mamba2 layer holds in_proj 3465 x 576 and out_proj 576 x 1152 (2.66M weights; 1.22M in PyTorch, 1.66M per head
  without copies) and `copies` x the SSM state.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..families import check_supported, head_dim
from ..modeling import HybridForCausalLM, Mamba2MixerConfig

_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "granitehybrid": gguf.MODEL_ARCH.GRANITE_HYBRID}
# per-layer mixer types each architecture computes
_EXPORTED_MIXERS = ("attention", "mamba2")
_NO_LLAMA_CPP_ARCH = {
    "streaming": "sink + sliding-window attention has no llama.cpp architecture (its sliding-window models keep no "
    "attention sinks)",
    "nha": "Native Hybrid Attention (slot memories and a window under one softmax) has no llama.cpp architecture",
}
# rope_parameters types llama.cpp computes from metadata alone (others need extra tensors or keys written for them)
_ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True, kw_only=True)
class GGUFLayout:
    """What `export_gguf` writes: the llama.cpp architecture, its hyperparameters (a `GGUFWriter` method name ->
    value) and the tensors, each produced on demand (name -> function returning a float32 array) so that only one is
    held at a time beside the model."""

    arch: str
    hparams: dict[str, Any]
    tensors: dict[str, Callable[[], np.ndarray]]


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _name(tensor: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + suffix


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(mixer type, layer, mixer) per layer, for a hybrid (`layer.mixer`) and a plain Llama/Mistral (`self_attn`)."""
    return [
        (getattr(layer, "mixer_type", "attention"), layer, getattr(layer, "mixer", None) or layer.self_attn)
        for layer in model.model.layers
    ]


def mamba2_copies(config) -> int:
    """How many copies of each SSM head fill llama.cpp's `ssm.inner_size = 2 x hidden` (see the module docstring).

    Raises:
        `UnsupportedModelError`: 2 x hidden is not a whole multiple of heads x head_dim (e.g. after pruning the width
            or the SSM head size), so no exact widening exists.
    """
    s = Mamba2MixerConfig.from_hybrid_config(config)
    inner = s.num_heads * s.head_dim
    if (2 * config.hidden_size) % inner:
        raise UnsupportedModelError(
            f"llama.cpp's granitehybrid needs a Mamba2 inner size of 2 x hidden = {2 * config.hidden_size}, and this "
            f"model's {s.num_heads} heads x {s.head_dim} channels = {inner} do not divide it, so the heads cannot be "
            "widened exactly; export before pruning the width or the SSM heads, or keep the PyTorch format"
        )
    return 2 * config.hidden_size // inner


def check_gguf_export(model: nn.Module) -> str:
    """The llama.cpp architecture `model` exports to (`"llama"` or `"granitehybrid"`), or `UnsupportedModelError`
    naming why none computes it. Reads only the config and the module types: call it before any work.

    Example: `check_gguf_export(hybrid)` is `"granitehybrid"` for an attention + Mamba2 hybrid.
    """
    config = model.config
    if isinstance(model, HybridForCausalLM):
        mixers = set(config.mixer_types)
        for mixer in sorted(mixers - set(_EXPORTED_MIXERS)):
            reason = _NO_LLAMA_CPP_ARCH.get(mixer, f"the mixer {mixer!r} has no llama.cpp architecture")
            raise UnsupportedModelError(f"cannot export to GGUF: {reason}; keep the PyTorch format")
        if config.lowrank:
            raise UnsupportedModelError(
                f"cannot export to GGUF: {len(config.lowrank)} linears are factorised (low-rank pairs), which no "
                "llama.cpp architecture computes, and multiplying them back would undo the compression; export the "
                "model before `factorize`, or keep the PyTorch format"
            )
        biases = config.attention_bias or config.attention_out_bias or config.mlp_bias
        if config.source_model_type not in ("llama", "mistral") or biases:
            raise UnsupportedModelError(
                f"cannot export to GGUF: a {config.source_model_type} hybrid with attention or MLP biases has no exact "
                "llama.cpp layout here (llama and mistral sources without biases are supported)"
            )
        if "attention" not in mixers:
            raise UnsupportedModelError(
                "cannot export to GGUF: a model with no attention layer is not a granitehybrid (llama.cpp's hybrid "
                "memory needs one); keep at least one attention layer"
            )
        arch = "granitehybrid" if "mamba2" in mixers else "llama"
    else:
        family = check_supported(config)
        if family.qkv_bias or family.o_bias:
            raise UnsupportedModelError(
                f"cannot export a {family.name} model with attention biases to GGUF here; llama.cpp's own "
                "convert_hf_to_gguf.py converts plain transformers checkpoints of that family"
            )
        arch = "llama"
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"cannot export to GGUF: rope_type {rope.get('rope_type')!r} is not written here (supported: "
            f"{', '.join(_ROPE_TYPES)})"
        )
    if arch == "granitehybrid":
        mamba2_copies(config)
    return arch


def _interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from transformers' rotate-half pairing (i, i + d/2) to ggml's consecutive pairs (2i, 2i + 1): per
    head, row j * d/2 + i moves to 2i + j."""
    out_features = weight.shape[0]
    head_dim = out_features // heads
    return weight.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(out_features, -1)


def _attention_tensors(bid: int, mixer: nn.Module, config) -> dict[str, Callable[[], np.ndarray]]:
    T = gguf.MODEL_TENSOR
    return {
        _name(T.ATTN_Q, bid): lambda: _interleave_rope_rows(_array(mixer.q_proj.weight), config.num_attention_heads),
        _name(T.ATTN_K, bid): lambda: _interleave_rope_rows(_array(mixer.k_proj.weight), config.num_key_value_heads),
        _name(T.ATTN_V, bid): lambda: _array(mixer.v_proj.weight),
        _name(T.ATTN_OUT, bid): lambda: _array(mixer.o_proj.weight),
    }


def _mamba2_tensors(bid: int, mixer: nn.Module, copies: int) -> dict[str, Callable[[], np.ndarray]]:
    """One Mamba2 layer in llama.cpp's layout: in_proj rows z | x | B | C | dt with x and B per head and every head
    widened to `copies` identical copies (see the module docstring)."""
    s = mixer.settings
    h, g, p, n = s.num_heads, s.num_groups, s.head_dim, s.state_size
    r = h // g  # heads per KV group

    def per_head(t: torch.Tensor, size: int) -> torch.Tensor:  # (g * size, ...) -> (h * size, ...)
        return t.unflatten(0, (g, size)).repeat_interleave(r, dim=0).flatten(0, 1)

    def widened(t: torch.Tensor) -> torch.Tensor:  # (h * p, ...) -> (h * copies * p, ...), each head repeated
        return t.unflatten(0, (h, 1, p)).expand(h, copies, p, *t.shape[1:]).flatten(0, 2)

    def ssm_in() -> np.ndarray:
        z, xBC, dt = mixer.in_proj.weight.split([mixer.inner_size, mixer.conv_size, h])
        x, B, C = xBC.split([g * p, g * n, h * n])
        return _array(torch.cat([widened(z), widened(per_head(x, p)), per_head(B, n), C, dt]))

    def conv(t: torch.Tensor) -> np.ndarray:  # conv channels x | B | C, x and B per head, x widened
        x, B, C = t.split([g * p, g * n, h * n])
        return _array(torch.cat([widened(per_head(x, p)), per_head(B, n), C]))

    def ssm_out() -> np.ndarray:  # (hidden, h * p) -> (hidden, h * copies * p): the first copy, zeros for the others
        weight = mixer.out_proj.weight.unflatten(1, (h, 1, p))
        padding = weight.new_zeros(weight.shape[0], h, copies - 1, p)
        return _array(torch.cat([weight, padding], dim=2).flatten(1))

    T = gguf.MODEL_TENSOR
    return {
        _name(T.SSM_IN, bid): ssm_in,
        _name(T.SSM_CONV1D, bid): lambda: conv(mixer.conv1d.weight[:, 0]),  # (channels, kernel)
        _name(T.SSM_CONV1D, bid, ".bias"): lambda: conv(mixer.conv1d.bias),
        _name(T.SSM_DT, bid, ".bias"): lambda: _array(mixer.dt_bias),
        _name(T.SSM_A, bid, ""): lambda: _array(-torch.exp(mixer.A_log.float()))[:, None],  # A = -exp(A_log), (h, 1)
        _name(T.SSM_D, bid, ""): lambda: _array(mixer.D)[:, None],
        _name(T.SSM_NORM, bid): lambda: _array(widened(mixer.norm.weight)).reshape(h, copies * p),  # (groups, size)
        _name(T.SSM_OUT, bid): ssm_out,
    }


def gguf_layout(model: nn.Module) -> GGUFLayout:
    """The architecture, hyperparameters and tensors that llama.cpp computes `model` with (not modified).

    Raises:
        `UnsupportedModelError`: see `check_gguf_export`.

    Example: `layout = gguf_layout(hybrid); sorted(layout.tensors)[:2]`
    """
    arch = check_gguf_export(model)
    config = model.config
    size = head_dim(config)
    layers = _decoder_layers(model)
    rope = dict(config.rope_parameters or {})
    hparams: dict[str, Any] = {
        "add_context_length": config.max_position_embeddings,
        "add_embedding_length": config.hidden_size,
        "add_feed_forward_length": config.intermediate_size,
        "add_block_count": config.num_hidden_layers,
        "add_head_count": config.num_attention_heads,
        "add_key_length": size,
        "add_value_length": size,
        "add_rope_dimension_count": size,
        "add_rope_freq_base": float(rope.get("rope_theta", 10000.0)),
        "add_layer_norm_rms_eps": float(config.rms_norm_eps),
        "add_vocab_size": config.vocab_size,
    }
    if rope.get("rope_type") == "linear":
        hparams["add_rope_scaling_type"] = gguf.RopeScalingType.LINEAR
        hparams["add_rope_scaling_factor"] = float(rope["factor"])
    T = gguf.MODEL_TENSOR
    tensors: dict[str, Callable[[], np.ndarray]] = {
        _name(T.TOKEN_EMBD): lambda: _array(model.model.embed_tokens.weight),
        _name(T.OUTPUT_NORM): lambda: _array(model.model.norm.weight),
    }
    if not config.tie_word_embeddings:  # tied: llama.cpp reads token_embd as the output too
        tensors[_name(T.OUTPUT)] = lambda: _array(model.lm_head.weight)
    copies = mamba2_copies(config) if arch == "granitehybrid" else 1
    for bid, (mixer_type, layer, mixer) in enumerate(layers):
        tensors[_name(T.ATTN_NORM, bid)] = lambda layer=layer: _array(layer.input_layernorm.weight)
        if mixer_type == "attention":
            tensors.update(_attention_tensors(bid, mixer, config))
        else:
            tensors.update(_mamba2_tensors(bid, mixer, copies))
        tensors[_name(T.FFN_NORM, bid)] = lambda layer=layer: _array(layer.post_attention_layernorm.weight)
        tensors[_name(T.FFN_GATE, bid)] = lambda layer=layer: _array(layer.mlp.gate_proj.weight)
        tensors[_name(T.FFN_UP, bid)] = lambda layer=layer: _array(layer.mlp.up_proj.weight)
        tensors[_name(T.FFN_DOWN, bid)] = lambda layer=layer: _array(layer.mlp.down_proj.weight)
    if arch == "granitehybrid":
        s = Mamba2MixerConfig.from_hybrid_config(config)
        kv_heads = config.num_key_value_heads
        hparams |= {
            # a layer is recurrent iff its KV head count is 0 (llama.cpp granite-hybrid.cpp)
            "add_head_count_kv": [kv_heads if t == "attention" else 0 for t, _, _ in layers],
            # llama.cpp's converter writes False for GraniteMoeHybrid checkpoints with Mamba layers (no RoPE); the
            # attention layers of a Llama-derived hybrid rotate, and granitehybrid applies RoPE iff this is true
            "add_rope_scaling_finetuned": True,
            "add_ssm_conv_kernel": s.conv_kernel,
            "add_ssm_inner_size": 2 * config.hidden_size,
            "add_ssm_state_size": s.state_size,
            "add_ssm_time_step_rank": s.num_heads,  # llama.cpp reads the SSM head count from this key
            "add_ssm_group_count": s.num_heads,
        }
    else:
        hparams["add_head_count_kv"] = config.num_key_value_heads
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[_ARCHS[arch]]}
    assert all(_pattern(name) in allowed for name in tensors), sorted(tensors)
    return GGUFLayout(arch=arch, hparams=hparams, tensors=tensors)


def _pattern(name: str) -> str:
    """`blk.3.attn_q.weight` -> `blk.{bid}.attn_q`, as gguf's `TENSOR_NAMES` spell it."""
    return re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.removesuffix(".weight").removesuffix(".bias"))


__all__ = ["GGUFLayout", "check_gguf_export", "gguf_layout", "mamba2_copies"]
