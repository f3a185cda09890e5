"""Surgery on Gated DeltaNet layers (`GatedDeltaNetMixer`), whose q/k/v/o keep the source attention's GQA layout and
whose state, decay, write strength and output gate are per query head.

- prune: query heads, the same number kept in every KV group (Minitron's group-aware rule, as attention's and
  Mamba2's), ranked on the `o_proj` input. A GDN head is an attention head with a memory: its q rows, q conv
  channels, decay (`a_proj` row, `A_log`, `dt_bias`), write strength (`b_proj` row), gate rows and `o_proj` columns go
  with it; k, v (one per KV group) and the per-head norm weight are never touched. Its heads are the attention's
  (`num_heads` is the source's `num_attention_heads`), so they are pruned on the same axis, `attn_heads`, with the
  same grouping choice `attn_grouping`: a hybrid keeps one head count for all its attention-like layers, as its
  config states one.
- factorize: q, k, v and o are the `attn` targets, as in attention (the new a/b/g projections are left dense).
- fuse, export and export_gguf are refused (`reasons`).
"""

import torch
from torch import nn

from ..errors import ConfigError
from ..families import head_dim
from ..modeling.gdn import GatedDeltaNetMixer, GatedDeltaNetMixerConfig
from .base import (
    MixerSurgery,
    check_size,
    head_choices,
    register_surgery,
    rows_cols,
    slice_linear,
    top,
    top_per_group,
)


@register_surgery(GatedDeltaNetMixer)
class GatedDeltaNetSurgery(MixerSurgery):
    """Query heads (`attn_heads`, shared with attention), the same number kept in every KV group by default."""

    operations = ("prune", "factorize")
    reasons = {
        "fuse": "fuse has no transport for Gated DeltaNet's per-head decays, write strengths and states",
        "export": "transformers has no GraniteMoeHybrid (or other native) layer with Gated DeltaNet's layout (a state "
        "per query head over GQA keys and values)",
        "export_gguf": "llama.cpp's Gated DeltaNet (qwen3next) pairs it with Qwen3-Next's gated attention, not a "
        "Llama attention; not written",
    }
    prune_axes = ("attn_heads",)
    grouping = "attn_grouping"
    factorize_targets = ("attn",)

    # Prune

    def shape(self, config) -> dict[str, int]:
        return {"attn_heads": GatedDeltaNetMixerConfig.from_hybrid_config(config).num_heads}

    def param_count(self, config, shape) -> int:
        s = GatedDeltaNetMixerConfig.from_hybrid_config(config)
        d, h, g, hd = shape.hidden, shape.attn_heads, s.num_kv_heads, s.head_dim
        attn_bias = bool(config.attention_bias)
        out_bias = bool(getattr(config, "attention_out_bias", attn_bias))
        q, kv = h * hd, g * hd
        projections = d * (q + 2 * kv) + ((q + 2 * kv) if attn_bias else 0)  # q, k, v
        new = d * (2 * h + q) + (q + 2 * kv) * s.conv_kernel + 2 * h + hd  # a, b, g; conv; A_log, dt_bias; norm
        return projections + new + q * d + (d if out_bias else 0)

    def check_prune(self, model_config, prune_config, full) -> None:
        s = GatedDeltaNetMixerConfig.from_hybrid_config(model_config)
        attention = (model_config.num_attention_heads, model_config.num_key_value_heads, head_dim(model_config))
        if (s.num_heads, s.num_kv_heads, s.head_dim) != attention:
            raise ConfigError(
                f"the gdn layers have {s.num_heads} heads in {s.num_kv_heads} groups of size {s.head_dim}, not the "
                f"config's {attention[0]} heads in {attention[1]} groups of {attention[2]}; prune prunes them on "
                "the attention's axis (attn_heads) and needs the two alike"
            )
        why = f"the {s.num_kv_heads} KV heads; each group keeps as many heads"
        check_size("attn_heads", prune_config.attn_heads, full.attn_heads, s.num_kv_heads, why)

    def importance_hooks(self, index: int, mixer: nn.Module, add) -> dict:
        return {mixer.o_proj: lambda block, module, args, kwargs: add(("attn", index), args[0])}

    def importance_views(self, config) -> dict[str, tuple[int, ...]]:
        return {"attn": (GatedDeltaNetMixerConfig.from_hybrid_config(config).num_heads, -1)}

    def search_axes(self, config, full, max_pruning: float) -> dict[str, list[int]]:
        groups = GatedDeltaNetMixerConfig.from_hybrid_config(config).num_kv_heads
        return {"attn_heads": head_choices(full.attn_heads, groups, max_pruning)}

    def select(self, index: int, importance, shape, config, grouping: str) -> dict[str, torch.Tensor]:
        head_scores = importance.attn[index].norm(dim=1)  # (heads,)
        if grouping == "aware":
            groups = GatedDeltaNetMixerConfig.from_hybrid_config(config).num_kv_heads
            return {"attn_heads": top_per_group(head_scores, groups, shape.attn_heads)}
        # group-unaware baseline: the best heads anywhere, regrouped by position onto the KV heads
        return {"attn_heads": top(head_scores, shape.attn_heads)}

    def pruned_settings(self, config, shape) -> dict:
        # every shape field explicit, as the pruned config states them
        s = GatedDeltaNetMixerConfig.from_hybrid_config(config)
        return {"num_heads": shape.attn_heads, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim}

    def slice_state(self, state: dict, mixer: nn.Module, kept, index: int, full, shape, rescale_norms: bool) -> None:
        heads, hidden = kept.attn_heads[index], kept.hidden
        s = mixer.settings
        hd, q_size = s.head_dim, s.num_heads * s.head_dim
        q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()  # q, the gate, o_proj's columns
        conv = torch.cat([q_rows, q_size + torch.arange(2 * s.num_kv_heads * hd)])  # q | k | v: k and v all kept
        slice_linear(state, "mixer.q_proj", mixer.q_proj, q_rows, hidden)
        slice_linear(state, "mixer.k_proj", mixer.k_proj, None, hidden)
        slice_linear(state, "mixer.v_proj", mixer.v_proj, None, hidden)
        slice_linear(state, "mixer.a_proj", mixer.a_proj, heads, hidden)
        slice_linear(state, "mixer.b_proj", mixer.b_proj, heads, hidden)
        slice_linear(state, "mixer.g_proj", mixer.g_proj, q_rows, hidden)
        state["mixer.conv1d.weight"] = rows_cols(mixer.conv1d.weight, conv)
        state["mixer.A_log"] = rows_cols(mixer.A_log, heads)
        state["mixer.dt_bias"] = rows_cols(mixer.dt_bias, heads)
        state["mixer.norm.weight"] = mixer.norm.weight.clone()  # per head over its channels, which all stay
        slice_linear(state, "mixer.o_proj", mixer.o_proj, hidden, q_rows)


__all__ = ["GatedDeltaNetSurgery"]
