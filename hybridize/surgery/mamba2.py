"""Surgery on Mamba2 layers (`Mamba2Mixer`), in our layout, where x and B are one per group and z, C, dt, dt_bias,
A_log and D one per head.

- prune: the group-aware SSM pruning of Nemotron-H / Minitron-SSM (Taghibakhshi et al., arXiv 2504.11409; see
  `hybridize.compress.prune` for the rules). Head channels are scored on the x path and kept alike in every head;
  heads are scored on their output and the same number kept in every group. B, the groups, the state size and the
  conv kernel are never touched.
- fuse: groups are units (their x and B rows and conv channels), heads are units inside them (z, C and dt rows, C
  conv channels, dt_bias, A_log, D, the norm gain and out_proj's columns).
- factorize: in_proj and out_proj are the `mamba` targets.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..modeling.mamba2 import Mamba2Mixer, Mamba2MixerConfig
from .base import (
    MixerSurgery,
    check_size,
    consumer_map,
    head_choices,
    identity_plan,
    map_cols,
    map_rows,
    map_segments,
    producer_map,
    register_surgery,
    rows_cols,
    slice_linear,
    top,
    top_per_group,
)


@register_surgery(Mamba2Mixer)
class Mamba2Surgery(MixerSurgery):
    """SSM heads and head channels (`ssm_heads`, `ssm_head_dim`), group-aware by default."""

    operations = ("prune", "fuse", "factorize")
    prune_axes = ("ssm_heads", "ssm_head_dim")
    grouping = "ssm_grouping"
    factorize_targets = ("mamba",)

    # Prune

    def shape(self, config) -> dict[str, int]:
        ssm = Mamba2MixerConfig.from_hybrid_config(config)
        return {"ssm_heads": ssm.num_heads, "ssm_head_dim": ssm.head_dim}

    def param_count(self, config, shape) -> int:
        d = shape.hidden
        attn_bias = bool(config.attention_bias)
        out_bias = bool(getattr(config, "attention_out_bias", attn_bias))
        ssm = Mamba2MixerConfig.from_hybrid_config(config)
        h, p, g, n = shape.ssm_heads, shape.ssm_head_dim, ssm.num_groups, ssm.state_size
        conv = g * (p + n) + h * n  # x | B | C
        rows = h * p + conv + h  # z | x B C | dt
        count = d * rows + (rows if attn_bias else 0) + conv * (ssm.conv_kernel + 1) + 3 * h + h * p + h * p * d
        return count + (d if out_bias else 0)

    def check_absent(self, prune_config) -> None:
        if prune_config.ssm_heads is not None or prune_config.ssm_head_dim is not None:
            raise ConfigError(
                "ssm_heads/ssm_head_dim given, but the model has no mamba2 layer; convert it first or drop them"
            )

    def check_prune(self, model_config, prune_config, full) -> None:
        ssm = Mamba2MixerConfig.from_hybrid_config(model_config)
        why = f"the {ssm.num_groups} SSM groups; group-aware pruning keeps as many heads in every group"
        check_size("ssm_heads", prune_config.ssm_heads, full.ssm_heads, ssm.num_groups, why)
        check_size("ssm_head_dim", prune_config.ssm_head_dim, full.ssm_head_dim)

    def importance_hooks(self, index: int, mixer: nn.Module, add) -> dict:
        # the x rows of in_proj (g * p of them), recomputed from its input: Minitron-SSM scores head channels on x
        start, stop = mixer.inner_size, mixer.inner_size + mixer.settings.num_groups * mixer.settings.head_dim

        def on_x_path(block, module, args, kwargs):
            bias = module.bias[start:stop] if module.bias is not None else None
            add(("ssm_x", index), F.linear(args[0], module.weight[start:stop], bias))

        return {
            mixer.in_proj: on_x_path,
            mixer.out_proj: lambda block, module, args, kwargs: add(("ssm_out", index), args[0]),
        }

    def importance_views(self, config) -> dict[str, tuple[int, ...]]:
        ssm = Mamba2MixerConfig.from_hybrid_config(config)
        return {"ssm_x": (ssm.num_groups, -1), "ssm_out": (ssm.num_heads, -1)}

    def search_axes(self, config, full, max_pruning: float) -> dict[str, list[int]]:
        # head_dim is not searched (Nemotron-H keeps it); prune it explicitly with ssm_head_dim
        groups = Mamba2MixerConfig.from_hybrid_config(config).num_groups
        return {"ssm_heads": head_choices(full.ssm_heads, groups, max_pruning)}

    def select(self, index: int, importance, shape, config, grouping: str) -> dict[str, torch.Tensor]:
        # Minitron-SSM, nested: channels on the x path (shared by all heads), then heads on the kept channels
        channels = top(importance.ssm_x[index].norm(dim=0), shape.ssm_head_dim)
        head_scores = importance.ssm_out[index][:, channels].norm(dim=1)  # (heads,)
        groups = importance.ssm_x[index].shape[0]
        if grouping == "aware":
            heads = top_per_group(head_scores, groups, shape.ssm_heads)
        else:  # group-unaware baseline: the best heads anywhere, regrouped by position
            heads = top(head_scores, shape.ssm_heads)
        return {"ssm_heads": heads, "ssm_channels": channels}

    def pruned_settings(self, config, shape) -> dict:
        # every shape field explicit: the defaults follow the attention's, which may change too
        ssm = Mamba2MixerConfig.from_hybrid_config(config)
        return {
            "num_heads": shape.ssm_heads,
            "num_groups": ssm.num_groups,
            "head_dim": shape.ssm_head_dim,
            "state_size": ssm.state_size,
        }

    def slice_state(self, state: dict, mixer: nn.Module, kept, index: int, full, shape, rescale_norms: bool) -> None:
        heads, channels, hidden = kept.ssm_heads[index], kept.ssm_channels[index], kept.hidden
        # the per-head gated norm averages over fewer channels: rescale as the hidden norms are
        scale = math.sqrt(full.ssm_head_dim / shape.ssm_head_dim) if rescale_norms and shape.ssm_head_dim else 1.0
        s = mixer.settings
        h, g, p, n = s.num_heads, s.num_groups, s.head_dim, s.state_size
        inner = (heads[:, None] * p + channels).flatten()  # z rows, gated-norm weight, out_proj columns
        x = (torch.arange(g)[:, None] * p + channels).flatten()  # every group keeps the same channels
        B = g * p + torch.arange(g * n)  # never pruned
        C = g * p + g * n + (heads[:, None] * n + torch.arange(n)).flatten()  # C is per head in our layout
        conv = torch.cat([x, B, C])  # conv channels: x | B | C
        rows = torch.cat([inner, h * p + conv, h * p + mixer.conv_size + heads])  # in_proj: z | x B C | dt
        slice_linear(state, "mixer.in_proj", mixer.in_proj, rows, hidden)
        state["mixer.conv1d.weight"] = rows_cols(mixer.conv1d.weight, conv)
        state["mixer.conv1d.bias"] = rows_cols(mixer.conv1d.bias, conv)
        for name in ("dt_bias", "A_log", "D"):
            state[f"mixer.{name}"] = rows_cols(getattr(mixer, name), heads)
        state["mixer.norm.weight"] = rows_cols(mixer.norm.weight, inner) * scale
        slice_linear(state, "mixer.out_proj", mixer.out_proj, hidden, inner)

    # Fuse

    def fuse_layout(self, config) -> dict:
        s = Mamba2MixerConfig.from_hybrid_config(config)
        return {
            "num_groups": s.num_groups,
            "head_dim": s.head_dim,
            "state_size": s.state_size,
            "conv_kernel": s.conv_kernel,
        }

    def head_layout(self, mixer: nn.Module) -> tuple[int, int, int]:
        s = mixer.settings
        return s.num_groups, s.num_heads, s.head_dim

    def head_output(self, mixer: nn.Module) -> nn.Module:
        return mixer.out_proj

    def fused_heads(self, config) -> int:
        return Mamba2MixerConfig.from_hybrid_config(config).num_heads

    def fused_settings(self, config, heads_width: float) -> dict:
        # every shape explicit: they default to the attention's, which may change too
        s = Mamba2MixerConfig.from_hybrid_config(config)
        per_group = s.num_heads // s.num_groups
        return {
            "num_heads": s.num_groups * max(1, round(heads_width * per_group)),
            "num_groups": s.num_groups,
            "head_dim": s.head_dim,
            "state_size": s.state_size,
        }

    def transport(self, mixer: nn.Module, groups, heads, res_in, res_out) -> dict[str, torch.Tensor]:
        s = mixer.settings
        p, n, h, g = s.head_dim, s.state_size, s.num_heads, s.num_groups
        heads_in = producer_map(identity_plan(heads, h))
        heads_out = consumer_map(identity_plan(heads, h))
        group_in = producer_map(identity_plan(groups, g))
        # in_proj rows: z (h·p) | x (g·p) | B (g·n) | C (h·n) | dt (h); conv1d channels: x | B | C
        in_parts = [
            (h * p, heads_in, p),
            (g * p, group_in, p),
            (g * n, group_in, n),
            (h * n, heads_in, n),
            (h, heads_in, 1),
        ]
        conv_parts = in_parts[1:4]
        out = {"in_proj.weight": map_cols(map_segments(mixer.in_proj.weight, in_parts), res_out)}
        if mixer.in_proj.bias is not None:
            out["in_proj.bias"] = map_segments(mixer.in_proj.bias, in_parts)
        out["conv1d.weight"] = map_segments(mixer.conv1d.weight, conv_parts)
        out["conv1d.bias"] = map_segments(mixer.conv1d.bias, conv_parts)
        for name in ("dt_bias", "A_log", "D"):
            out[name] = map_rows(getattr(mixer, name), heads_in)
        out["norm.weight"] = map_rows(mixer.norm.weight, heads_in, p)
        out["out_proj.weight"] = map_rows(map_cols(mixer.out_proj.weight, heads_out, p), res_in)
        if mixer.out_proj.bias is not None:
            out["out_proj.bias"] = map_rows(mixer.out_proj.bias, res_in)
        return out

    def unit_vectors(self, state: dict, prefix: str, mixer: nn.Module) -> dict[str, torch.Tensor]:
        s = mixer.settings
        h, g, p, n = s.num_heads, s.num_groups, s.head_dim, s.state_size
        z, x, B, C, dt = state[f"{prefix}in_proj.weight"].split([h * p, g * p, g * n, h * n, h])
        out = state[f"{prefix}out_proj.weight"].T.unflatten(0, (h, p)).flatten(1)
        heads = torch.cat([z.unflatten(0, (h, p)).flatten(1), C.unflatten(0, (h, n)).flatten(1), dt, out], 1)
        groups = torch.cat([x.unflatten(0, (g, p)).flatten(1), B.unflatten(0, (g, n)).flatten(1)], 1)
        return {"heads": heads, "groups": groups}


__all__ = ["Mamba2Surgery"]
