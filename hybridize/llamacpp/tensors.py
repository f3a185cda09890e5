"""A model's weights as llama.cpp names and lays them out: `llama` for all-attention models, `granitehybrid` for
attention + Mamba2 hybrids (llama.cpp `src/models/granite-hybrid.cpp`, `src/models/mamba-base.cpp`; tensor and key
names from the `gguf` package's `MODEL_TENSORS` and `Keys`).

Each mixer's layout is in its handler in `hybridize.surgery` (`gguf_tensors`, `gguf_hparams`, `gguf_arch`): RoPE
pairs reordered in q and k (`attention.py`: llama.cpp rotates consecutive channels, transformers channel i with
i + head_dim/2); the Mamba2 groups and the widening of each head to llama.cpp's inner size of 2 x hidden
(`mamba2.py`). A handler keys its tensors by `gguf.MODEL_TENSOR` member name and suffix (`ATTN_Q.weight`), which this
module turns into llama.cpp's names; a mixer without a handler is refused with "export_gguf does not support <mixer>".
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from torch import nn

from ..errors import UnsupportedModelError
from ..families import check_supported, head_dim
from ..modeling import HybridForCausalLM
from ..surgery import MixerSurgery, handlers_for, to_array

_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "granitehybrid": gguf.MODEL_ARCH.GRANITE_HYBRID}
# rope_parameters types llama.cpp computes from metadata alone (others need extra tensors or keys written for them)
_ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True, kw_only=True)
class GGUFLayout:
    """What `export_gguf` writes: the llama.cpp architecture, its hyperparameters (a `GGUFWriter` method name ->
    value), the tensors, each produced on demand (name -> function returning a float32 array) so that only one is
    held at a time beside the model, and the matrices that stay f32 whatever the outtype."""

    arch: str
    hparams: dict[str, Any]
    tensors: dict[str, Callable[[], np.ndarray]]
    f32: frozenset[str] = frozenset()


def _name(tensor: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + suffix


def _handler_name(key: str, bid: int) -> str:
    """A handler's tensor key (`ATTN_Q.weight`, `SSM_A`) as llama.cpp names it in block `bid`."""
    member, dot, suffix = key.partition(".")
    return _name(gguf.MODEL_TENSOR[member], bid, dot + suffix)


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(mixer type, layer, mixer) per layer, for a hybrid (`layer.mixer`) and a plain Llama/Mistral (`self_attn`)."""
    return [
        (getattr(layer, "mixer_type", "attention"), layer, getattr(layer, "mixer", None) or layer.self_attn)
        for layer in model.model.layers
    ]


def _handlers(model: nn.Module) -> dict[str, MixerSurgery]:
    """The GGUF export handler of each mixer type in `model` (plain Llama/Mistral layers are attention); refuses a
    mixer without one."""
    types = model.config.mixer_types if isinstance(model, HybridForCausalLM) else ["attention"]
    return handlers_for(sorted(set(types)), "export_gguf")


def check_gguf_export(model: nn.Module) -> str:
    """The llama.cpp architecture `model` exports to (`"llama"` or `"granitehybrid"`), or `UnsupportedModelError`
    naming why none computes it. Reads only the config and the module types: call it before any work.

    Example: `check_gguf_export(hybrid)` is `"granitehybrid"` for an attention + Mamba2 hybrid.
    """
    config = model.config
    found = _handlers(model)  # UnsupportedModelError for a mixer without a GGUF export handler
    if isinstance(model, HybridForCausalLM):
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
        if "attention" not in found:
            raise UnsupportedModelError(
                "cannot export to GGUF: a model with no attention layer is not a granitehybrid (llama.cpp's hybrid "
                "memory needs one); keep at least one attention layer"
            )
        archs = {handler.gguf_arch for handler in found.values()} - {None}
        if len(archs) > 1:
            raise UnsupportedModelError(
                f"cannot export to GGUF: the mixers {sorted(found)} need different llama.cpp architectures "
                f"({sorted(archs)}); keep the PyTorch format"
            )
        arch = archs.pop() if archs else "llama"
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
    for handler in found.values():
        handler.check_gguf(config)
    return arch


def gguf_layout(model: nn.Module) -> GGUFLayout:
    """The architecture, hyperparameters and tensors that llama.cpp computes `model` with (not modified).

    Raises:
        `UnsupportedModelError`: see `check_gguf_export`.

    Example: `layout = gguf_layout(hybrid); sorted(layout.tensors)[:2]`
    """
    arch = check_gguf_export(model)
    found = _handlers(model)
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
        _name(T.TOKEN_EMBD): lambda: to_array(model.model.embed_tokens.weight),
        _name(T.OUTPUT_NORM): lambda: to_array(model.model.norm.weight),
    }
    if not config.tie_word_embeddings:  # tied: llama.cpp reads token_embd as the output too
        tensors[_name(T.OUTPUT)] = lambda: to_array(model.lm_head.weight)
    f32 = set()
    for bid, (mixer_type, layer, mixer) in enumerate(layers):
        tensors[_name(T.ATTN_NORM, bid)] = lambda layer=layer: to_array(layer.input_layernorm.weight)
        handler = found[mixer_type]
        tensors.update({_handler_name(key, bid): make for key, make in handler.gguf_tensors(mixer, config).items()})
        f32.update(_handler_name(key, bid) for key in handler.gguf_f32)
        tensors[_name(T.FFN_NORM, bid)] = lambda layer=layer: to_array(layer.post_attention_layernorm.weight)
        tensors[_name(T.FFN_GATE, bid)] = lambda layer=layer: to_array(layer.mlp.gate_proj.weight)
        tensors[_name(T.FFN_UP, bid)] = lambda layer=layer: to_array(layer.mlp.up_proj.weight)
        tensors[_name(T.FFN_DOWN, bid)] = lambda layer=layer: to_array(layer.mlp.down_proj.weight)
    if arch == "granitehybrid":
        hparams |= {
            # a layer is recurrent iff its KV head count is 0 (llama.cpp granite-hybrid.cpp)
            "add_head_count_kv": [found[t].gguf_head_count_kv(config) for t, _, _ in layers],
            # llama.cpp's converter writes False for GraniteMoeHybrid checkpoints with Mamba layers (no RoPE); the
            # attention layers of a Llama-derived hybrid rotate, and granitehybrid applies RoPE iff this is true
            "add_rope_scaling_finetuned": True,
        }
        for handler in found.values():
            hparams |= handler.gguf_hparams(config)
    else:
        hparams["add_head_count_kv"] = config.num_key_value_heads
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[_ARCHS[arch]]}
    assert all(_pattern(name) in allowed for name in tensors), sorted(tensors)
    return GGUFLayout(arch=arch, hparams=hparams, tensors=tensors, f32=frozenset(f32))


def _pattern(name: str) -> str:
    """`blk.3.attn_q.weight` -> `blk.{bid}.attn_q`, as gguf's `TENSOR_NAMES` spell it."""
    return re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.removesuffix(".weight").removesuffix(".bias"))


__all__ = ["GGUFLayout", "check_gguf_export", "gguf_layout"]
