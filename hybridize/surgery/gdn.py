"""Surgery on Gated DeltaNet layers (`GatedDeltaNetMixer`), whose q/k/v/o keep the source attention's GQA layout and
whose state, decay, write strength and output gate are per query head.

- prune: query heads, the same number kept in every KV group (Minitron's group-aware rule, as attention's and
  Mamba2's), ranked on the `o_proj` input. A GDN head is an attention head with a memory: its heads are the
  attention's (`num_heads` is the source's `num_attention_heads`), so they are ranked, chosen and searched exactly as
  attention's (the handler extends `AttentionSurgery`), on the same axis `attn_heads` with the same grouping choice
  `attn_grouping`: a hybrid keeps one head count for all its attention-like layers, as its config states one. What
  differs is what goes with a head: its q rows, q conv channels, decay (`a_proj` row, `A_log`, `dt_bias`), write
  strength (`b_proj` row), gate rows and `o_proj` columns; k, v (one per KV group) and the per-head norm weight are
  never touched.
- factorize: q, k, v and o are the `attn` targets, as in attention (the new a/b/g projections are left dense).
- fuse, export and export_gguf are refused (`reasons`).
"""

import torch
from torch import nn

from ..errors import ConfigError
from ..families import head_dim
from ..modeling.gdn import GatedDeltaNetMixer, GatedDeltaNetMixerConfig
from .attention import AttentionSurgery
from .base import register_surgery, rows_cols, slice_linear


@register_surgery(GatedDeltaNetMixer)
class GatedDeltaNetSurgery(AttentionSurgery):
    """Query heads (`attn_heads`, ranked and chosen as attention's), the same number kept in every KV group by
    default; its own parameter count, pruned settings and slicing."""

    operations = ("prune", "factorize")
    reasons = {
        "fuse": "fuse has no transport for Gated DeltaNet's per-head decays, write strengths and states",
        "export": "transformers has no GraniteMoeHybrid (or other native) layer with Gated DeltaNet's layout (a state "
        "per query head over GQA keys and values)",
        "export_gguf": "llama.cpp's Gated DeltaNet (qwen3next) pairs it with Qwen3-Next's gated attention, not a "
        "Llama attention; not written",
    }
    native_layer_types = ()

    # Prune

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
        super().check_prune(model_config, prune_config, full)

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
