"""Surgery on Mamba2 layers (`Mamba2Mixer`), in our layout, where x and B are one per group and z, C, dt, dt_bias,
A_log and D one per head.

- prune: the group-aware SSM pruning of Nemotron-H / Minitron-SSM (Taghibakhshi et al., arXiv 2504.11409; see
  `hybridize.compress.prune` for the rules). Head channels are scored on the x path and kept alike in every head;
  heads are scored on their output and the same number kept in every group. B, the groups, the state size and the
  conv kernel are never touched.
- fuse: groups are units (their x and B rows and conv channels), heads are units inside them (z, C and dt rows, C
  conv channels, dt_bias, A_log, D, the norm gain and out_proj's columns).
- factorize: in_proj and out_proj are the `mamba` targets.
- export: GraniteMoeHybrid and llama.cpp share B and C per SSM group and keep x per head, where ours shares x and B per
  KV group and keeps C per head. With one SSM group per head, x and B rows and their conv channels are repeated to
  every head of their KV group, which is exact, and the gated norm is per group = per head, as ours. llama.cpp's `granitehybrid` also needs an inner size of 2 x hidden ("only an expansion
  factor of 2 is supported", a GGML_ASSERT), while a MambaInLlama hybrid has heads x head_dim = hidden: each head is
  widened to `copies` x head_dim channels holding `copies` identical copies of the head (z and x rows and x's conv
  channels repeated, so every copy computes the same state and output; the norm's mean over the widened group equals
  the head's; `ssm_out` reads the first copy and has zero columns for the others). Exact, at the price of llama.cpp
  computing the copies: with two copies a SmolLM2 Mamba2 layer holds in_proj 3465 x 576 and out_proj 576 x 1152
  (2.66M weights; 1.22M in PyTorch, 1.66M per head without copies) and `copies` x the SSM state.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
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
    to_array,
    top,
    top_per_group,
)


@register_surgery(Mamba2Mixer)
class Mamba2Surgery(MixerSurgery):
    """SSM heads and head channels (`ssm_heads`, `ssm_head_dim`), group-aware by default."""

    operations = ("prune", "fuse", "factorize", "export", "export_gguf")
    prune_axes = ("ssm_heads", "ssm_head_dim")
    grouping = "ssm_grouping"
    factorize_targets = ("mamba",)
    native_layer_types = ("linear_attention", "mamba")  # Granite writes the first; "mamba" in older configs
    gguf_arch = "granitehybrid"
    gguf_f32 = ("SSM_CONV1D.weight",)  # ggml's ssm_conv reads f32

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

    # Export

    def check_native(self, config) -> None:
        s = Mamba2MixerConfig.from_hybrid_config(config)
        if s.num_heads * s.head_dim != config.hidden_size:
            raise UnsupportedModelError(
                f"Mamba2 heads x head_dim ({s.num_heads} x {s.head_dim}) != hidden_size ({config.hidden_size}): "
                "Granite's Mamba2 needs d_inner = expand x hidden; export before pruning the SSM heads or the width"
            )

    def native_config(self, config) -> dict:
        s = Mamba2MixerConfig.from_hybrid_config(config)
        return {
            "mamba_n_heads": s.num_heads,
            "mamba_n_groups": s.num_heads,  # one group per head: x and B are repeated (`native_tensors`)
            "mamba_d_head": s.head_dim,
            "mamba_d_state": s.state_size,
            "mamba_d_conv": s.conv_kernel,
            "mamba_expand": 1,
            "mamba_chunk_size": s.chunk_size,
            "mamba_conv_bias": True,
            "mamba_proj_bias": False,
        }

    def native_tensors(self, mixer: nn.Module) -> dict[str, torch.Tensor]:
        # our per-group x/B rows repeated per head, in Granite's row order z | x | B | C | dt
        s = mixer.settings
        sizes = [s.num_groups * s.head_dim, s.num_groups * s.state_size, s.num_heads * s.state_size]
        z, xBC, dt = mixer.in_proj.weight.split([mixer.inner_size, mixer.conv_size, s.num_heads])
        x, B, C = xBC.split(sizes)
        conv_w_x, conv_w_B, conv_w_C = mixer.conv1d.weight.split(sizes)
        conv_b_x, conv_b_B, conv_b_C = mixer.conv1d.bias.split(sizes)
        p, n = s.head_dim, s.state_size
        tensors = {
            "in_proj.weight": torch.cat([z, _per_head(x, s, p), _per_head(B, s, n), C, dt]),
            "conv1d.weight": torch.cat([_per_head(conv_w_x, s, p), _per_head(conv_w_B, s, n), conv_w_C]),
            "conv1d.bias": torch.cat([_per_head(conv_b_x, s, p), _per_head(conv_b_B, s, n), conv_b_C]),
            "dt_bias": mixer.dt_bias,
            "A_log": mixer.A_log,
            "D": mixer.D,
            "norm.weight": mixer.norm.weight,
            "out_proj.weight": mixer.out_proj.weight,
        }
        return {f"mamba.{name}": tensor for name, tensor in tensors.items()}

    def check_gguf(self, config) -> None:
        mamba2_copies(config)

    def gguf_hparams(self, config) -> dict:
        s = Mamba2MixerConfig.from_hybrid_config(config)
        return {
            "add_ssm_conv_kernel": s.conv_kernel,
            "add_ssm_inner_size": 2 * config.hidden_size,
            "add_ssm_state_size": s.state_size,
            "add_ssm_time_step_rank": s.num_heads,  # llama.cpp reads the SSM head count from this key
            "add_ssm_group_count": s.num_heads,
        }

    def gguf_head_count_kv(self, config) -> int:
        return 0  # a recurrent layer (llama.cpp granite-hybrid.cpp)

    def gguf_tensors(self, mixer: nn.Module, config) -> dict[str, Callable[[], np.ndarray]]:
        # in_proj rows z | x | B | C | dt with x and B per head and every head widened to `copies` identical copies
        s = mixer.settings
        h, g, p, n = s.num_heads, s.num_groups, s.head_dim, s.state_size
        copies = mamba2_copies(config)

        def widened(t: torch.Tensor) -> torch.Tensor:  # (h * p, ...) -> (h * copies * p, ...), each head repeated
            return t.unflatten(0, (h, 1, p)).expand(h, copies, p, *t.shape[1:]).flatten(0, 2)

        def ssm_in() -> np.ndarray:
            z, xBC, dt = mixer.in_proj.weight.split([mixer.inner_size, mixer.conv_size, h])
            x, B, C = xBC.split([g * p, g * n, h * n])
            return to_array(torch.cat([widened(z), widened(_per_head(x, s, p)), _per_head(B, s, n), C, dt]))

        def conv(t: torch.Tensor) -> np.ndarray:  # conv channels x | B | C, x and B per head, x widened
            x, B, C = t.split([g * p, g * n, h * n])
            return to_array(torch.cat([widened(_per_head(x, s, p)), _per_head(B, s, n), C]))

        def ssm_out() -> np.ndarray:  # (hidden, h * p) -> (hidden, h * copies * p): the first copy, zeros elsewhere
            weight = mixer.out_proj.weight.unflatten(1, (h, 1, p))
            padding = weight.new_zeros(weight.shape[0], h, copies - 1, p)
            return to_array(torch.cat([weight, padding], dim=2).flatten(1))

        return {
            "SSM_IN.weight": ssm_in,
            "SSM_CONV1D.weight": lambda: conv(mixer.conv1d.weight[:, 0]),  # (channels, kernel)
            "SSM_CONV1D.bias": lambda: conv(mixer.conv1d.bias),
            "SSM_DT.bias": lambda: to_array(mixer.dt_bias),
            "SSM_A": lambda: to_array(-torch.exp(mixer.A_log.float()))[:, None],  # A = -exp(A_log), (h, 1)
            "SSM_D": lambda: to_array(mixer.D)[:, None],
            "SSM_NORM.weight": lambda: to_array(widened(mixer.norm.weight)).reshape(h, copies * p),  # (groups, size)
            "SSM_OUT.weight": ssm_out,
        }


def _per_head(t: torch.Tensor, settings: Mamba2MixerConfig, size: int) -> torch.Tensor:
    """Rows kept per group, (groups * size, ...), repeated for every head of the group -> (heads * size, ...)."""
    repeat = settings.num_heads // settings.num_groups
    return t.unflatten(0, (settings.num_groups, size)).repeat_interleave(repeat, dim=0).flatten(0, 1)


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


__all__ = ["Mamba2Surgery", "mamba2_copies"]
