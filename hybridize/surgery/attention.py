"""Surgery on attention layers (`AttentionMixer`, and `StreamingMixer`, whose weights are attention's).

- prune: query heads are pruned inside each KV group (Minitron, arXiv 2407.14679), so k, v and the GQA layout are
  untouched.
- fuse: KV groups are units (k and v rows), query heads are units inside them (q rows, o columns); channels inside a
  head never move (RoPE pairs channels by frequency).
- factorize: q, k, v and o are the `attn` targets.
- export: GraniteMoeHybrid's `self_attn` takes the projections as they are; llama.cpp rotates pairs of consecutive
  channels where transformers rotates channel i with i + head_dim/2, so q and k rows are reordered per head.

A streaming layer prunes and factorizes as attention; its sinks have no fused, native or llama.cpp form.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..families import head_dim
from ..modeling.attention import AttentionMixer
from ..modeling.streaming import StreamingMixer
from .base import (
    MixerSurgery,
    check_size,
    consumer_map,
    head_choices,
    identity_plan,
    map_cols,
    map_rows,
    producer_map,
    register_surgery,
    slice_linear,
    to_array,
    top,
    top_per_group,
)

_STREAMING_REASONS = {
    "export": "sink + sliding-window attention has no GraniteMoeHybrid layer (its attention keeps no sinks)",
    "export_gguf": "sink + sliding-window attention has no llama.cpp architecture (its sliding-window models keep no "
    "attention sinks)",
}


@register_surgery(AttentionMixer)
@register_surgery(StreamingMixer, operations=("prune", "factorize"), reasons=_STREAMING_REASONS)
class AttentionSurgery(MixerSurgery):
    """Query heads, ranked on the `o_proj` input as (heads, head_dim), the same number kept in every KV group."""

    operations = ("prune", "fuse", "factorize", "export", "export_gguf")
    prune_axes = ("attn_heads",)
    grouping = "attn_grouping"
    factorize_targets = ("attn",)
    native_layer_types = ("full_attention",)

    # Prune

    def shape(self, config) -> dict[str, int]:
        return {"attn_heads": config.num_attention_heads}

    def param_count(self, config, shape) -> int:
        d = shape.hidden
        attn_bias = bool(config.attention_bias)
        out_bias = bool(getattr(config, "attention_out_bias", attn_bias))
        hd, kv = head_dim(config), config.num_key_value_heads
        q, k = shape.attn_heads * hd, kv * hd
        return d * (q + 2 * k) + q * d + ((q + 2 * k) if attn_bias else 0) + (d if out_bias else 0)

    def check_absent(self, prune_config) -> None:
        if prune_config.attn_heads is not None:
            raise ConfigError(
                f"attn_heads={prune_config.attn_heads}, but the model has no attention layer; drop attn_heads"
            )

    def check_prune(self, model_config, prune_config, full) -> None:
        kv = model_config.num_key_value_heads
        why = f"the {kv} KV heads; each group keeps as many heads"
        check_size("attn_heads", prune_config.attn_heads, full.attn_heads, kv, why)

    def importance_hooks(self, index: int, mixer: nn.Module, add) -> dict:
        return {mixer.o_proj: lambda block, module, args, kwargs: add(("attn", index), args[0])}

    def importance_views(self, config) -> dict[str, tuple[int, ...]]:
        return {"attn": (config.num_attention_heads, -1)}

    def search_axes(self, config, full, max_pruning: float) -> dict[str, list[int]]:
        return {"attn_heads": head_choices(full.attn_heads, config.num_key_value_heads, max_pruning)}

    def select(self, index: int, importance, shape, config, grouping: str) -> dict[str, torch.Tensor]:
        head_scores = importance.attn[index].norm(dim=1)  # (heads,)
        if grouping == "aware":
            return {"attn_heads": top_per_group(head_scores, config.num_key_value_heads, shape.attn_heads)}
        # group-unaware baseline: the best query heads anywhere, regrouped by position onto the KV heads
        return {"attn_heads": top(head_scores, shape.attn_heads)}

    def slice_state(self, state: dict, mixer: nn.Module, kept, index: int, full, shape, rescale_norms: bool) -> None:
        heads, hidden, hd = kept.attn_heads[index], kept.hidden, mixer.head_dim
        q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()  # (kept heads * head_dim,)
        slice_linear(state, "mixer.q_proj", mixer.q_proj, q_rows, hidden)
        slice_linear(state, "mixer.k_proj", mixer.k_proj, None, hidden)  # KV heads are never pruned
        slice_linear(state, "mixer.v_proj", mixer.v_proj, None, hidden)
        slice_linear(state, "mixer.o_proj", mixer.o_proj, hidden, q_rows)

    # Fuse

    def head_layout(self, mixer: nn.Module) -> tuple[int, int, int]:
        hd = mixer.head_dim
        return mixer.k_proj.out_features // hd, mixer.q_proj.out_features // hd, hd

    def head_output(self, mixer: nn.Module) -> nn.Module:
        return mixer.o_proj

    def fused_heads(self, config) -> int:
        return config.num_attention_heads

    def fused_fields(self, config, heads_width: float) -> dict:
        groups = config.num_key_value_heads
        per_group = config.num_attention_heads // groups
        return {"num_attention_heads": groups * max(1, round(heads_width * per_group))}

    def transport(self, mixer: nn.Module, groups, heads, res_in, res_out) -> dict[str, torch.Tensor]:
        num_groups, num_heads, hd = self.head_layout(mixer)
        heads, groups = identity_plan(heads, num_heads), identity_plan(groups, num_groups)
        out = {}
        for name, plan in (("q_proj", heads), ("k_proj", groups), ("v_proj", groups)):
            linear = getattr(mixer, name)
            out[f"{name}.weight"] = map_cols(map_rows(linear.weight, producer_map(plan), hd), res_out)
            if linear.bias is not None:
                out[f"{name}.bias"] = map_rows(linear.bias, producer_map(plan), hd)
        out["o_proj.weight"] = map_rows(map_cols(mixer.o_proj.weight, consumer_map(heads), hd), res_in)
        if mixer.o_proj.bias is not None:
            out["o_proj.bias"] = map_rows(mixer.o_proj.bias, res_in)
        return out

    def unit_vectors(self, state: dict, prefix: str, mixer: nn.Module) -> dict[str, torch.Tensor]:
        hd = mixer.head_dim
        q = state[f"{prefix}q_proj.weight"].unflatten(0, (-1, hd)).flatten(1)  # (heads, hd·d)
        o = state[f"{prefix}o_proj.weight"].T.unflatten(0, (-1, hd)).flatten(1)
        k = state[f"{prefix}k_proj.weight"].unflatten(0, (-1, hd)).flatten(1)  # (groups, hd·d)
        v = state[f"{prefix}v_proj.weight"].unflatten(0, (-1, hd)).flatten(1)
        return {"heads": torch.cat([q, o], 1), "groups": torch.cat([k, v], 1)}

    # Export

    def check_native(self, config) -> None:
        if config.num_attention_heads * head_dim(config) != config.hidden_size:
            raise UnsupportedModelError(
                f"heads x head_dim ({config.num_attention_heads} x {head_dim(config)}) != hidden_size "
                f"({config.hidden_size}): Granite's attention takes head_dim = hidden_size / heads"
            )

    def native_config(self, config) -> dict:
        return {
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "attention_multiplier": head_dim(config) ** -0.5,
        }

    def native_tensors(self, mixer: nn.Module) -> dict[str, torch.Tensor]:
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        return {f"self_attn.{name}.weight": getattr(mixer, name).weight for name in names}

    def gguf_head_count_kv(self, config) -> int:
        return config.num_key_value_heads

    def gguf_tensors(self, mixer: nn.Module, config) -> dict[str, Callable[[], np.ndarray]]:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        return {
            "ATTN_Q.weight": lambda: interleave_rope_rows(to_array(mixer.q_proj.weight), heads),
            "ATTN_K.weight": lambda: interleave_rope_rows(to_array(mixer.k_proj.weight), kv_heads),
            "ATTN_V.weight": lambda: to_array(mixer.v_proj.weight),
            "ATTN_OUT.weight": lambda: to_array(mixer.o_proj.weight),
        }


def interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from transformers' rotate-half pairing (i, i + d/2) to ggml's consecutive pairs (2i, 2i + 1): per
    head, row j * d/2 + i moves to 2i + j."""
    out_features = weight.shape[0]
    size = out_features // heads
    return weight.reshape(heads, 2, size // 2, -1).swapaxes(1, 2).reshape(out_features, -1)


__all__ = ["AttentionSurgery", "interleave_rope_rows"]
