"""Structured pruning: Minitron width and depth pruning (Muralidharan et al., arXiv 2407.14679; Sreenivas et al.,
arXiv 2408.11796) with the group-aware SSM pruning of Nemotron-H / Minitron-SSM (Taghibakhshi et al., arXiv
2504.11409), for hybrids and dense Llama-family models.

`prune(model, PruneConfig(...))` measures activation importances in one calibration pass
(`hybridize.io.calibration`, forward pre-hooks, nothing kept but a few numbers per layer), ranks channels, heads and
layers, and slices every affected tensor into a smaller `HybridForCausalLM` whose config states its new shape. A
dense source is first converted to a ratio-0 hybrid (every layer keeps its attention), so the output is always a
hybrid checkpoint.

Importance (Minitron): for a hooked activation A of shape (b, l, d), a[d] = mean over l of |A|; the squares of a are
summed over the batch and the calibration blocks (float64) and importance = sqrt of that sum.

- FFN channels: the input of `down_proj`; gate and up rows and down columns are sliced together.
- Attention heads: the input of `o_proj` as (heads, head_dim), L2 over head_dim; ranked inside each KV group and the
  same number kept in every group, so k and v (and the GQA layout) are untouched; q rows and o columns are sliced.
- Hidden channels: the sum, over the layers, of the importances of the two norm outputs that feed linear layers (the
  mixer's input and the MLP's input). One ranking slices the embedding (and the tied head), every norm, the input
  columns of q/k/v/gate/up/in_proj and the output rows of o/down/out_proj.
- Depth: block importance, the sum over blocks of 1 - mean cos(layer input, layer output) (`depth_metric="block"`),
  or the loss on scoring blocks with the layer skipped minus the full model's loss (`"ppl"`). The least important
  layers are dropped.

Group-aware SSM pruning in our Mamba2 layout. Our Mamba2 layers come from attention (MambaInLlama): x and B are one
per group (g = the source's KV heads) and repeated to the heads of the group, while z, C, dt, dt_bias, A_log and D are
one per head. So, following the paper's nested order (head channels first, heads on the kept channels):

- head channels (head_dim) are scored on the x path (the x rows of `in_proj`, (g, p), L2 over groups) and the same
  channels are kept in every head and every group: the z and x rows of `in_proj`, the x conv channels, the gated-norm
  weight and the `out_proj` columns;
- heads cannot be told apart on x (the heads of a group share it), so they are scored on their own output, the input
  of `out_proj` as (h, p) restricted to the kept channels (L2), ranked inside each group, and the same number is kept
  in every group: every head keeps reading its own group's x and B. A pruned head takes along its z, C and dt rows,
  its C conv channels, dt_bias, A_log, D, gated-norm weight and `out_proj` columns;
- never touched: B, the number of groups, the state size and the conv kernel.

`ssm_grouping="ignore"` is the group-unaware baseline of the paper: the best heads of the whole layer are kept in
their order and regrouped by position, so a head may end up reading another group's x and B. `attn_grouping="ignore"`
does the same to attention heads (a query head may end up with another KV head): since our SSM heads are attention
heads (C <- q, B <- k, x <- v), this is the same ablation on the trained attention layers of a dense model.

Shapes are uniform: a `HybridConfig` has one hidden size, one FFN size and one head count per mixer type, so every
layer is pruned to the same shape (as Minitron's export does); which channels and heads each layer keeps is its own.
transformers' Llama config also wants the hidden size to be a multiple of the attention heads (even with an explicit
head_dim), so SmolLM2's 576 with 9 heads prunes to 504 or 432, not 512.

Norms: slicing d channels to d' makes an RMSNorm average over fewer channels; with `rescale_norms` the norm weights
are multiplied by sqrt(d / d') (sqrt(p / p') for the per-head gated norm), so that the pruned model computes exactly
what the original computes with the pruned channels zeroed (up to the norms' epsilon). Minitron does not rescale and
leaves it to distillation.

`params` searches the axes: every combination of widths (at most `max_width_pruning` removed per axis, in steps of
10%) and depths (at most `max_depth_pruning` of the layers) is counted analytically, the `num_candidates` largest
within the budget are pruned from the same importances and scored by their loss on scoring blocks (text after the
calibration blocks in the train split, never the held-out split), and the best is kept. SSM head_dim is not searched
(Nemotron-H keeps it); prune it explicitly with `ssm_head_dim`.

What is particular to a mixer (its parameter count, the activations its heads and channels are ranked on, their
selection, its sliced tensors and pruned settings, its search axes) is in its handler in `hybridize.surgery`
(`attention.py`, `mamba2.py`, `gdn.py`, whose heads are pruned on attention's axis `attn_heads`; a handler's
`prune_axes` may be another's); a mixer without one is refused with "prune does not support <mixer>".

The pruned model is assembled layer by layer on the meta device, each layer filled with its sliced tensors, so memory
holds the source and the (smaller) result, never a third copy; the source is not modified.
"""

import copy
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..configs.compress import AXES, DEPTH_METRICS, GROUPINGS, PruneConfig
from ..convert import as_hybrid
from ..errors import ConfigError, UnsupportedModelError
from ..evaluate.perplexity import perplexity
from ..families import head_dim
from ..io.calibration import calibrate, calibration_blocks
from ..modeling import HybridConfig, HybridForCausalLM
from ..provenance import record_step
from ..surgery import (
    MixerSurgery,
    check_size,
    handlers,
    handlers_for,
    mixer_types,
    rows_cols,
    slice_linear,
    top,
)

logger = logging.getLogger(__name__)

_WIDTH_STEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True, kw_only=True)
class PruneShape:
    """The prunable shape of a model: the sizes that one `HybridConfig` states for all layers.

    Args:
        hidden (`int`): hidden size.
        ffn (`int`): MLP intermediate size.
        attn_heads (`int`): query heads of the attention layers.
        ssm_heads (`int`): heads of the Mamba2 layers (0 when there is none).
        ssm_head_dim (`int`): channels per Mamba2 head (0 when there is none).
        num_layers (`int`): layers.
    """

    hidden: int
    ffn: int
    attn_heads: int
    ssm_heads: int
    ssm_head_dim: int
    num_layers: int


# Model facts


def _handlers(config) -> dict[str, MixerSurgery]:
    """The prune handler of each mixer type in the model, in layer order; refuses a mixer without one."""
    return handlers_for(mixer_types(config), "prune")


def _present(config) -> list[MixerSurgery]:
    """The handlers of the model's mixers, once each, in registration order (the order of their checks and axes)."""
    used = set(_handlers(config).values())
    return [handler for handler in handlers() if handler in used]


def model_shape(config) -> PruneShape:
    """The `PruneShape` of a hybrid or dense Llama-family config."""
    sizes = {"attn_heads": config.num_attention_heads, "ssm_heads": 0, "ssm_head_dim": 0}  # 0: no such layer
    for handler in _present(config):
        sizes.update(handler.shape(config))
    return PruneShape(
        hidden=config.hidden_size, ffn=config.intermediate_size, num_layers=config.num_hidden_layers, **sizes
    )


def count_params(config, shape: PruneShape, mixer_types: Sequence[str]) -> int:
    """Parameters of `config`'s model pruned to `shape` with these layers (tied embeddings counted once).

    Example: `count_params(model.config, model_shape(model.config), model.config.mixer_types)`
    """
    d, f = shape.hidden, shape.ffn
    total = config.vocab_size * d * (1 if config.tie_word_embeddings else 2) + d  # embedding, head, final norm
    per_layer = 2 * d + 3 * d * f + ((2 * f + d) if getattr(config, "mlp_bias", False) else 0)  # norms, MLP
    mixers = {t: handler.param_count(config, shape) for t, handler in _handlers(config).items()}
    return total + sum(per_layer + mixers[t] for t in mixer_types)


def _count_model(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Checks


def check_prune(model_config, config: PruneConfig) -> PruneShape | None:
    """Check `config` against a hybrid or dense Llama-family config before any work; return the explicit target
    shape (`None` for a `params` search). Raises `ConfigError` for an impossible target and `UnsupportedModelError`
    for a mixer that pruning does not know.

    Example: `check_prune(model.config, PruneConfig(ssm_heads=6))`
    """
    types = mixer_types(model_config)
    present = _present(model_config)  # UnsupportedModelError for a mixer without a prune handler
    if getattr(model_config, "lowrank", None):
        raise UnsupportedModelError(
            f"the model has {len(model_config.lowrank)} low-rank factorized linears; prune before factorizing "
            "(hybridize prune, then hybridize factorize)"
        )
    full = model_shape(model_config)
    if config.params is not None:
        embedding = model_config.vocab_size * full.hidden
        target = config.params * count_params(model_config, full, types)
        if target < embedding:
            raise ConfigError(
                f"params={config.params} keeps {target:,.0f} parameters, below the embedding's {embedding:,} "
                f"(vocabulary {model_config.vocab_size} x hidden {full.hidden}); pass a larger params, or prune "
                "hidden explicitly"
            )
        return None

    shared = {axis for handler in present for axis in handler.prune_axes}  # axes a present mixer prunes
    for handler in handlers():  # an axis of a mixer the model does not have
        if handler not in present and not set(handler.prune_axes) <= shared:
            handler.check_absent(config)
    check_size("hidden", config.hidden, full.hidden)
    check_size("ffn", config.ffn, full.ffn)
    for handler in present:
        handler.check_prune(model_config, config, full)
    if config.drop_layers is not None and config.drop_layers >= full.num_layers:
        raise ConfigError(
            f"drop_layers={config.drop_layers} leaves no layer of {full.num_layers}; pass at most {full.num_layers - 1}"
        )
    shape = PruneShape(
        hidden=config.hidden or full.hidden,
        ffn=config.ffn or full.ffn,
        attn_heads=config.attn_heads or full.attn_heads,
        ssm_heads=config.ssm_heads or full.ssm_heads,
        ssm_head_dim=config.ssm_head_dim or full.ssm_head_dim,
        num_layers=full.num_layers - (config.drop_layers or 0),
    )
    if shape.hidden % shape.attn_heads:
        # transformers' LlamaConfig (which HybridConfig extends) validates this even when head_dim is explicit
        below = shape.hidden // shape.attn_heads * shape.attn_heads
        raise ConfigError(
            f"hidden={shape.hidden} is not a multiple of the {shape.attn_heads} attention heads, which transformers' "
            f"Llama config requires; pass hidden={below} or {below + shape.attn_heads}"
        )
    return shape


# Importance


@dataclass
class Importance:
    """Activation importances of one calibration pass (float64).

    Args:
        hidden (`torch.Tensor`): (hidden,) summed over the norm outputs of every layer.
        ffn (`dict[int, torch.Tensor]`): per layer, (ffn,) at the `down_proj` input.
        attn (`dict[int, torch.Tensor]`): per attention layer, (heads, head_dim) at the `o_proj` input.
        ssm_x (`dict[int, torch.Tensor]`): per Mamba2 layer, (groups, head_dim) on the x rows of `in_proj`.
        ssm_out (`dict[int, torch.Tensor]`): per Mamba2 layer, (heads, head_dim) at the `out_proj` input.
        depth (`torch.Tensor`): (layers,) higher means more important.
    """

    hidden: torch.Tensor
    ffn: dict[int, torch.Tensor]
    attn: dict[int, torch.Tensor]
    ssm_x: dict[int, torch.Tensor]
    ssm_out: dict[int, torch.Tensor]
    depth: torch.Tensor


class _Accumulator:
    """Minitron's aggregation: sum over batch and blocks of (mean over the sequence of |A|)^2; importance = sqrt."""

    def __init__(self):
        self.sums: dict[Any, torch.Tensor] = {}

    def add(self, key: Any, activation: torch.Tensor) -> None:
        a = activation.detach().double().abs().mean(dim=1)  # (b, d)
        self.sums[key] = self.sums.get(key, 0) + a.pow(2).sum(0)

    def importance(self, key: Any) -> torch.Tensor:
        return self.sums[key].sqrt()


def measure_importance(model: HybridForCausalLM, blocks: torch.Tensor, *, progress: bool = False) -> Importance:
    """One calibration pass over `blocks` with forward pre-hooks; returns every importance (depth by block
    importance).

    Example: `importance = measure_importance(hybrid, blocks)`
    """
    layers = model.model.layers
    acc = _Accumulator()
    depth = torch.zeros(len(layers), dtype=torch.float64)
    running: dict[str, Any] = {}  # the input of the layer that ran last, and its index

    def close_layer(output: torch.Tensor) -> None:
        # block importance: the layer's output is the next layer's (or the final norm's) input
        index, inp = running.pop("index"), running.pop("input")
        cos = F.cosine_similarity(inp.double(), output.double(), dim=-1)  # (b, l)
        depth[index] += (1.0 - cos.mean()).item()

    def on_layer(index: int):
        def hook(block, module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if "index" in running:
                close_layer(hidden)
            running.update(index=index, input=hidden)

        return hook

    def on_input(key):
        return lambda block, module, args, kwargs: acc.add(key, args[0] if args else kwargs["hidden_states"])

    mixer_handlers = _handlers(model.config)
    hooks = {model.model.norm: lambda block, module, args, kwargs: close_layer(args[0])}
    for i, (layer, mixer_type) in enumerate(zip(layers, model.config.mixer_types, strict=True)):
        hooks[layer] = on_layer(i)
        hooks[layer.mixer] = on_input(("hidden", i, "mixer"))
        hooks[layer.mlp] = on_input(("hidden", i, "mlp"))
        hooks[layer.mlp.down_proj] = on_input(("ffn", i))
        hooks.update(mixer_handlers[mixer_type].importance_hooks(i, layer.mixer, acc.add))  # heads and channels
    calibrate(model, blocks, hooks, progress=progress)

    def per_layer(kind: str, *shape: int) -> dict[int, torch.Tensor]:
        return {key[1]: acc.importance(key).view(*shape) for key in acc.sums if key[0] == kind}

    views = {"attn": (model.config.num_attention_heads, -1)}
    for handler in _present(model.config):
        views.update(handler.importance_views(model.config))
    hidden = sum(acc.importance(key) for key in acc.sums if key[0] == "hidden")
    return Importance(
        hidden=hidden,
        ffn=per_layer("ffn", -1),
        depth=depth,
        **{kind: per_layer(kind, *views[kind]) if kind in views else {} for kind in ("attn", "ssm_x", "ssm_out")},
    )


def depth_by_loss(model: HybridForCausalLM, blocks: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
    """(layers,) the loss on `blocks` with each layer skipped, minus the full model's: Minitron's LM-loss depth metric.

    Example: `scores = depth_by_loss(hybrid, blocks)`
    """
    base = _loss(model, blocks)
    scores = []
    layers = model.model.layers
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="depth (ppl)", unit="layer")
    for layer in layers:
        handle = layer.register_forward_hook(lambda module, args, output: args[0])  # the layer passes its input on
        try:
            scores.append(_loss(model, blocks) - base)
        finally:
            handle.remove()
    return torch.tensor(scores, dtype=torch.float64)


def _loss(model: nn.Module, blocks: torch.Tensor) -> float:
    return math.log(perplexity(model, blocks))


# Selection


@dataclass(frozen=True, kw_only=True)
class KeptIndices:
    """What a pruned model keeps of the original, as sorted index tensors.

    Args:
        hidden (`torch.Tensor`): kept residual channels.
        layers (`tuple[int, ...]`): kept layers, in order.
        ffn (`dict[int, torch.Tensor]`): per kept layer, its MLP channels.
        attn_heads (`dict[int, torch.Tensor]`): per attention layer, its query heads.
        ssm_heads (`dict[int, torch.Tensor]`): per Mamba2 layer, its heads (in their new order).
        ssm_channels (`dict[int, torch.Tensor]`): per Mamba2 layer, the head channels kept in every head.
    """

    hidden: torch.Tensor
    layers: tuple[int, ...]
    ffn: dict[int, torch.Tensor]
    attn_heads: dict[int, torch.Tensor]
    ssm_heads: dict[int, torch.Tensor]
    ssm_channels: dict[int, torch.Tensor]


def select(
    model: HybridForCausalLM,
    importance: Importance,
    shape: PruneShape,
    *,
    ssm_grouping: str = "aware",
    attn_grouping: str = "aware",
) -> KeptIndices:
    """Rank by `importance` and choose what a model of `shape` keeps (see the module docstring for the rules).

    Example: `kept = select(hybrid, importance, PruneShape(...))`
    """
    config = model.config
    num_layers = config.num_hidden_layers
    groupings = {"attn_grouping": attn_grouping, "ssm_grouping": ssm_grouping}
    mixer_handlers = _handlers(config)
    layers = tuple(sorted(top(importance.depth, shape.num_layers).tolist()))
    kept: dict[str, dict[int, torch.Tensor]] = {"ffn": {}, "attn_heads": {}, "ssm_heads": {}, "ssm_channels": {}}
    for i in layers:
        kept["ffn"][i] = top(importance.ffn[i], shape.ffn)
        handler = mixer_handlers[config.mixer_types[i]]
        grouping = groupings.get(handler.grouping, "aware")
        for field, indices in handler.select(i, importance, shape, config, grouping).items():
            kept[field][i] = indices
    assert len(layers) == shape.num_layers <= num_layers
    return KeptIndices(hidden=top(importance.hidden, shape.hidden), layers=layers, **kept)


# Slicing


def _pruned_config(config: HybridConfig, shape: PruneShape, kept: KeptIndices) -> HybridConfig:
    changes: dict[str, Any] = {
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_attention_heads": shape.attn_heads,
        "num_hidden_layers": shape.num_layers,
        "head_dim": head_dim(config),
        "mixer_types": [config.mixer_types[i] for i in kept.layers],
        "mixers": copy.deepcopy(config.mixers),
    }
    for mixer_type, handler in _handlers(config).items():
        if settings := handler.pruned_settings(config, shape):
            changes["mixers"][mixer_type] = {**changes["mixers"].get(mixer_type, {}), **settings}
    pruned = HybridConfig.from_dict({**config.to_dict(), **changes})
    pruned.dtype = config.dtype
    return pruned


@torch.no_grad()
def slice_model(
    model: HybridForCausalLM, kept: KeptIndices, shape: PruneShape, *, rescale_norms: bool = True
) -> HybridForCausalLM:
    """A new model holding what `kept` keeps of `model` (which is not modified); its config states `shape`.

    Example: `pruned = slice_model(hybrid, select(hybrid, importance, shape), shape)`
    """
    config = model.config
    full = model_shape(config)
    pruned_config = _pruned_config(config, shape, kept)
    with torch.device("meta"):  # filled below with the sliced tensors, one layer at a time
        pruned = HybridForCausalLM(pruned_config)
    hidden = kept.hidden
    scale_hidden = math.sqrt(full.hidden / shape.hidden) if rescale_norms else 1.0
    mixer_handlers = _handlers(config)
    for new_index, i in enumerate(kept.layers):
        layer = model.model.layers[i]
        state = {
            "input_layernorm.weight": rows_cols(layer.input_layernorm.weight, hidden) * scale_hidden,
            "post_attention_layernorm.weight": rows_cols(layer.post_attention_layernorm.weight, hidden) * scale_hidden,
        }
        f = kept.ffn[i]
        slice_linear(state, "mlp.gate_proj", layer.mlp.gate_proj, f, hidden)
        slice_linear(state, "mlp.up_proj", layer.mlp.up_proj, f, hidden)
        slice_linear(state, "mlp.down_proj", layer.mlp.down_proj, hidden, f)
        mixer_handlers[config.mixer_types[i]].slice_state(state, layer.mixer, kept, i, full, shape, rescale_norms)
        pruned.model.layers[new_index].load_state_dict(state, strict=True, assign=True)
    pruned.model.embed_tokens.load_state_dict(
        {"weight": rows_cols(model.model.embed_tokens.weight, None, hidden)}, assign=True
    )
    pruned.model.norm.load_state_dict(
        {"weight": rows_cols(model.model.norm.weight, hidden) * scale_hidden}, assign=True
    )
    if pruned_config.tie_word_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    else:
        pruned.lm_head.load_state_dict({"weight": rows_cols(model.lm_head.weight, None, hidden)}, assign=True)
    pruned.model.rotary_emb = LlamaRotaryEmbedding(config=pruned_config)  # buffers only; RoPE is unchanged
    leftover = [name for name, t in itertools.chain(pruned.named_parameters(), pruned.named_buffers()) if t.is_meta]
    assert not leftover, leftover
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.hybridize_steps = list(getattr(model, "hybridize_steps", []))
    return pruned.eval()


# Search


def _width_choices(size: int, max_pruning: float, multiple: int | None = None) -> list[int]:
    """Sizes from `size` down to (1 - max_pruning) * size in steps of 10%, rounded to a multiple of `multiple` (by
    default 32, or 8 and 1 for small sizes), as Minitron's grid rounds to divisors."""
    multiple = multiple or (32 if size >= 256 else 8 if size >= 32 else 1)
    floor = size * (1.0 - max_pruning)
    choices = {size} | {round(size * f / multiple) * multiple for f in _WIDTH_STEPS}
    return sorted((c for c in choices if 1 <= c <= size and c >= floor), reverse=True)


def _candidates(model_config, full: PruneShape, order: list[int], config: PruneConfig) -> list[tuple[PruneShape, int]]:
    """Every grid shape within the `params` budget with its parameter count, largest first."""
    types = mixer_types(model_config)
    w = config.max_width_pruning
    axes = {"ffn": _width_choices(full.ffn, w), "attn_heads": [full.attn_heads], "ssm_heads": [full.ssm_heads]}
    for handler in _present(model_config):  # the mixers' own axes (ssm_head_dim is not searched)
        axes.update({k: v for k, v in handler.search_axes(model_config, full, w).items() if k in axes})
    axes["drop"] = list(range(int(full.num_layers * config.max_depth_pruning) + 1))

    def hidden_choices(attn_heads: int) -> list[int]:  # transformers wants hidden to be a multiple of the heads
        return [h for h in _width_choices(full.hidden, w, math.lcm(8, attn_heads)) if h % attn_heads == 0]

    def counted(hidden: int, ffn: int, attn_heads: int, ssm_heads: int, drop: int) -> tuple[PruneShape, int]:
        shape = PruneShape(
            hidden=hidden,
            ffn=ffn,
            attn_heads=attn_heads,
            ssm_heads=ssm_heads,
            ssm_head_dim=full.ssm_head_dim,
            num_layers=full.num_layers - drop,
        )
        return shape, count_params(model_config, shape, [types[i] for i in sorted(order[: shape.num_layers])])

    total = count_params(model_config, full, types)
    budget = config.params * total
    found = [
        (shape, params)
        for ffn, attn_heads, ssm_heads, drop in itertools.product(*axes.values())
        for hidden in hidden_choices(attn_heads)
        for shape, params in [counted(hidden, ffn, attn_heads, ssm_heads, drop)]
        if params <= budget
    ]
    if not found:
        heads = axes["attn_heads"][-1]
        smallest = [hidden_choices(heads)[-1], axes["ffn"][-1], heads, axes["ssm_heads"][-1], axes["drop"][-1]]
        reach = counted(*smallest)[1]
        raise ConfigError(
            f"params={config.params} is below what the search reaches (at most {w:.0%} of each width and "
            f"{config.max_depth_pruning:.0%} of the layers removed): {reach:,} parameters, {reach / total:.3f} of "
            f"{total:,}; pass params >= {math.ceil(reach / total * 1000) / 1000}, raise max_width_pruning, or give "
            "explicit axes"
        )
    return sorted(found, key=lambda item: -item[1])


def _search(
    model: HybridForCausalLM, importance: Importance, config: PruneConfig, score_blocks: torch.Tensor
) -> tuple[PruneShape, list[dict]]:
    full = model_shape(model.config)
    order = torch.argsort(importance.depth, descending=True, stable=True).tolist()
    candidates = _candidates(model.config, full, order, config)[: config.num_candidates]
    results = []
    for shape, params in candidates:
        kept = select(model, importance, shape, ssm_grouping=config.ssm_grouping, attn_grouping=config.attn_grouping)
        pruned = slice_model(model, kept, shape, rescale_norms=config.rescale_norms)
        loss = _loss(pruned, score_blocks)
        del pruned
        results.append({**asdict(shape), "params": params, "loss": round(loss, 5)})
        logger.info("candidate %s: %d parameters, loss %.4f", shape, params, loss)
    best = min(results, key=lambda r: r["loss"])
    shape = PruneShape(**{k: v for k, v in best.items() if k not in ("params", "loss")})
    return shape, results


# The transformation


def prune(
    model: nn.Module,
    config: PruneConfig,
    *,
    tokenizer: Any = None,
    blocks: torch.Tensor | None = None,
    progress: bool = False,
) -> HybridForCausalLM:
    """Prune `model` to the shape `config` gives (or finds, for `params`), Minitron-style (see the module docstring).

    `model` is not modified: the result is a new, smaller `HybridForCausalLM` (a dense source is converted to a ratio-0
    hybrid first) with the step, the chosen shape and the search recorded for `hybridize.json`.

    Args:
        model (`nn.Module`): a hybrid, or a Llama/Mistral/Qwen2 causal LM.
        config (`PruneConfig`): what to prune and how to measure.
        tokenizer (*optional*): the model's tokenizer, to cut the calibration text; not needed with `blocks`.
        blocks (`torch.LongTensor` of shape `(n, seq_len)`, *optional*): calibration token ids instead of
            `config.data`; the first `config.num_blocks` measure importance, the next `config.score_blocks` score.
        progress (`bool`, *optional*, defaults to `False`): show progress bars.

    Returns:
        `HybridForCausalLM`: the pruned model.

    Example:
        ```python
        >>> model, tokenizer = hybridize.load("out/smol-mamba50")
        >>> pruned = prune(model, PruneConfig(ssm_heads=6, ffn=1024), tokenizer=tokenizer)
        ```
    """
    source = getattr(model, "name_or_path", None) or None
    model = as_hybrid(model)  # a dense source: the same model as a ratio-0 hybrid (a copy, seconds)
    explicit = check_prune(model.config, config)
    start = time.perf_counter()
    needs_scoring = config.params is not None or (config.depth_metric == "ppl" and (config.drop_layers or 0) > 0)
    wanted = config.num_blocks + (config.score_blocks if needs_scoring else 0)
    if blocks is None:
        if tokenizer is None:
            raise ConfigError("prune measures importance on calibration text: pass the model's tokenizer (or blocks)")
        blocks = calibration_blocks(tokenizer, config.data, num_blocks=wanted, seq_len=config.seq_len)
    if blocks.shape[0] < wanted:
        raise ConfigError(
            f"{blocks.shape[0]} calibration blocks of {blocks.shape[1]} tokens, but {wanted} are needed "
            f"(num_blocks {config.num_blocks}"
            + (f" + score_blocks {config.score_blocks})" if needs_scoring else ")")
            + "; pass more text or lower num_blocks"
        )
    calibration, scoring = blocks[: config.num_blocks], blocks[config.num_blocks : wanted]
    importance = measure_importance(model, calibration, progress=progress)
    if config.depth_metric == "ppl" and needs_scoring:
        importance.depth = depth_by_loss(model, scoring, progress=progress)
    search = None
    if explicit is None:
        shape, search = _search(model, importance, config, scoring)
    else:
        shape = explicit
    kept = select(model, importance, shape, ssm_grouping=config.ssm_grouping, attn_grouping=config.attn_grouping)
    pruned = slice_model(model, kept, shape, rescale_norms=config.rescale_norms)
    before, after = _count_model(model), _count_model(pruned)
    metrics = {
        "params_before": before,
        "params_after": after,
        "params_ratio": round(after / before, 4),
        "shape_before": asdict(model_shape(model.config)),
        "shape_after": asdict(shape),
        "dropped_layers": sorted(set(range(model.config.num_hidden_layers)) - set(kept.layers)),
        "depth_scores": [round(float(x), 6) for x in importance.depth],
        "calibration_tokens": int(calibration.numel()),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if search is not None:
        metrics["search"] = search
    record_step(pruned, "prune", config, metrics=metrics, source=source)
    logger.info("pruned %d -> %d parameters (%.3f): %s", before, after, after / before, shape)
    return pruned


def format_prune(metrics: dict) -> str:
    """A few lines for people: the parameter counts, the shape before and after, dropped layers and the search."""
    before, after = metrics["shape_before"], metrics["shape_after"]
    lines = [f"parameters {metrics['params_before']:,} -> {metrics['params_after']:,} ({metrics['params_ratio']:.3f})"]
    lines += [f"{name:>13}  {before[name]} -> {after[name]}" for name in before if before[name] != after[name]]
    if metrics["dropped_layers"]:
        lines.append(f"dropped layers {metrics['dropped_layers']}")
    for candidate in metrics.get("search", []):
        shape = ", ".join(f"{k} {candidate[k]}" for k in before)
        lines.append(f"  candidate {shape}: {candidate['params']:,} params, loss {candidate['loss']:.4f}")
    return "\n".join(lines)


__all__ = [
    "AXES",
    "DEPTH_METRICS",
    "GROUPINGS",
    "Importance",
    "KeptIndices",
    "PruneConfig",
    "PruneShape",
    "check_prune",
    "count_params",
    "depth_by_loss",
    "format_prune",
    "measure_importance",
    "model_shape",
    "prune",
    "select",
    "slice_model",
]
