"""Fusion of several models into one by optimal transport, then averaging: `fuse([a, b], FuseConfig())`.

Transformer Fusion with Optimal Transport (Imfeld et al., ICLR 2024, arXiv 2310.05719; OTFusion, Singh & Jaggi,
arXiv 1910.05653), adapted to pre-norm RoPE decoders with grouped KV heads and Mamba2 mixers. Every model is aligned
onto the anchor (the first model) by transport plans P (m_model x m_target, uniform marginals) computed with POT
(`ot.emd` exact, or `ot.sinkhorn` soft) from a ground cost between units:

- `activations` (default): Euclidean distance between the units' z-scored activations on calibration text (the
  cross-moments are accumulated model by model, block by block, through `hybridize.io.calibration`);
- `weights`: Euclidean distance between the units' L2-normalised weights, read in the already-aligned residual basis.

The units, and where their plan acts:
- the residual stream: one plan for the whole model (costs pooled over every layer's input and the final norm's; in
  weights mode the embedding columns): embedding and (tied) head columns, every RMSNorm gain, the input columns of
  q/k/v, gate/up and Mamba2 in_proj, the output rows of o_proj, down_proj and Mamba2 out_proj;
- MLP neurons, freely: the rows of gate/up, the columns of down;
- attention heads, never channels inside a head (RoPE pairs channels by frequency): first the KV groups as wholes,
  with their query heads (the group cost is the value of the best within-group head matching), then the query heads
  within matched groups, so that GQA stays valid. q rows and o columns follow the head plan, k and v rows the group
  plan;
- Mamba2 heads in the same two levels (groups share x and B; heads own z, C, dt, dt_bias, A_log, D, the norm gain and
  out_proj's columns).

A plan P becomes two maps: producers of a unit (rows of the weights that compute it, norm gains, biases) take the
barycentre of the units sent to it, P normalised per target column; consumers (columns of the weights that read it)
take the sum, P normalised per source row ("average in, sum out"). For a permutation both are that permutation, so a
model whose units are permuted is recovered exactly; merging two identical units into one is also exact. The aligned
models are then averaged with `weights`.

Heterogeneous fusion (`width < 1`) fuses into a narrower copy of the anchor: the anchor keeps its most active units
(top |activation| RMS, or weight norm; query and Mamba heads per group), and every model, the anchor included, is
transported onto them, so the units dropped from the anchor are merged into the kept ones instead of deleted. Tied
embeddings use the producer map. `align="none"` skips alignment (plain averaging, models of one shape only).
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..configs.compress import ALIGNS, SOLVERS, WIDTH_AXES, FuseConfig
from ..convert import as_hybrid
from ..errors import ConfigError, UnsupportedModelError
from ..families import head_dim
from ..io.calibration import calibrate, calibration_blocks
from ..modeling import HybridConfig, HybridForCausalLM
from ..provenance import record_step

logger = logging.getLogger(__name__)

_MIXERS = ("attention", "mamba2")


# Checks, before any heavy work


def _family(config) -> str:
    return config.source_model_type if config.model_type == HybridConfig.model_type else config.model_type


def _field(config, name: str):
    if name == "head_dim":
        return head_dim(config)
    return getattr(config, name, None)


def _mamba(config: HybridConfig) -> dict:
    from ..modeling.mamba2 import Mamba2MixerConfig

    if "mamba2" not in config.mixer_types:
        return {}
    s = Mamba2MixerConfig.from_hybrid_config(config)
    return {"num_heads": s.num_heads, "num_groups": s.num_groups, "head_dim": s.head_dim, "state_size": s.state_size}


def check_fuse(configs: Sequence, config: FuseConfig, tokenizers: Sequence | None = None) -> None:
    """Refuse models that cannot be fused, from their configs (and tokenizers) alone: different families,
    vocabularies, depths, layer layouts, KV groups or head sizes, or factorized models."""
    if not configs or (len(configs) < 2 and config.width == 1):
        raise ConfigError(f"fuse needs at least two models (or one with width < 1), got {len(configs)}")
    if config.weights is not None and len(config.weights) != len(configs):
        raise ConfigError(f"{len(config.weights)} weights given for {len(configs)} models; give one per model")
    anchor = configs[0]
    for index, other in enumerate(configs):
        if _family(other) != _family(anchor):
            raise ConfigError(
                f"model {index} is a {_family(other)!r} model but the anchor is {_family(anchor)!r}; fuse models of "
                "one family"
            )
        for name in ("vocab_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
            if _field(other, name) != _field(anchor, name):
                raise ConfigError(
                    f"model {index} has {name}={_field(other, name)} but the anchor has {_field(anchor, name)}; fuse "
                    "models that share a vocabulary and a layout"
                )
        types = getattr(other, "mixer_types", None) or ["attention"] * other.num_hidden_layers
        anchor_types = getattr(anchor, "mixer_types", None) or ["attention"] * anchor.num_hidden_layers
        if types != anchor_types:
            raise ConfigError(f"model {index} has mixer_types {types} but the anchor has {anchor_types}")
        if unsupported := sorted(set(types) - set(_MIXERS)):
            raise UnsupportedModelError(f"fuse aligns {', '.join(_MIXERS)} layers, not {unsupported}")
        if getattr(other, "lowrank", None):
            raise ConfigError(f"model {index} has factorized linears; fuse dense models, then factorize the result")
        if other.model_type == HybridConfig.model_type and anchor.model_type == HybridConfig.model_type:
            ours, theirs = _mamba(other), _mamba(anchor)
            if {k: v for k, v in ours.items() if k != "num_heads"} != {
                k: v for k, v in theirs.items() if k != "num_heads"
            }:
                raise ConfigError(f"model {index} has Mamba2 settings {ours} but the anchor has {theirs}")
    if config.align == "none":
        for index, other in enumerate(configs):
            for name in ("hidden_size", "intermediate_size", "num_attention_heads"):
                if getattr(other, name) != getattr(anchor, name):
                    raise ConfigError(
                        f"plain averaging needs one shape, but model {index} has {name}={getattr(other, name)} and "
                        f"the anchor {getattr(anchor, name)}; use align activations or weights"
                    )
    if tokenizers is not None:
        vocabularies = [tokenizer.get_vocab() for tokenizer in tokenizers]
        for index, vocabulary in enumerate(vocabularies):
            if vocabulary != vocabularies[0]:
                raise ConfigError(
                    f"model {index}'s tokenizer differs from the anchor's; fuse models of one vocabulary"
                )


# Transport plans


def solve(cost: torch.Tensor, solver: str, reg: float) -> torch.Tensor:
    """A transport plan (m, m') with uniform marginals for a cost (m, m'), normalised by its maximum first."""
    import ot

    cost = cost.double()
    cost = (cost / cost.max().clamp_min(1e-30)).numpy()
    a = torch.full((cost.shape[0],), 1.0 / cost.shape[0], dtype=torch.float64).numpy()
    b = torch.full((cost.shape[1],), 1.0 / cost.shape[1], dtype=torch.float64).numpy()
    if solver == "emd":
        plan = ot.emd(a, b, cost, numItermax=10_000_000)
    else:
        # the costs are in [0, 1], so exp(-cost / reg) stays far from underflow unless reg is tiny
        method = "sinkhorn" if reg >= 0.005 else "sinkhorn_stabilized"
        plan = ot.sinkhorn(a, b, cost, reg, method=method, numItermax=2000, stopThr=1e-7, warn=False)
    return torch.from_numpy(plan)


def grouped_plan(
    cost: torch.Tensor,
    groups: int,
    kept: Sequence[int] | None,
    solver: str,
    reg: float,
    group_cost: torch.Tensor | None = None,
):
    """Two-level plan for heads in groups. `cost` (heads, anchor heads) is between the model's heads and the
    anchor's; `kept` lists the anchor heads kept (as many per group). Groups are matched first, each pair costing the
    value of its best within-group head matching (plus `group_cost` (G, G), max-normalised, when the groups have
    weights of their own); heads are then matched within matched groups.

    Returns:
        `(group_plan (G, G), head_plan (heads, kept heads))`."""
    heads, anchor_heads = cost.shape
    per_group, anchor_per_group = heads // groups, anchor_heads // groups
    kept = list(range(anchor_heads)) if kept is None else list(kept)
    kept_per_group = len(kept) // groups
    within, costs = {}, torch.zeros(groups, groups, dtype=torch.float64)
    normalised = cost.double() / cost.max().clamp_min(1e-30)
    for ga in range(groups):
        for gb in range(groups):
            columns = kept[gb * kept_per_group : (gb + 1) * kept_per_group]
            assert all(gb * anchor_per_group <= c < (gb + 1) * anchor_per_group for c in columns)
            sub = normalised[ga * per_group : (ga + 1) * per_group][:, columns]
            plan = solve(sub, solver, reg) if sub.max() > 0 else torch.full_like(sub, 1.0 / sub.numel())
            within[ga, gb] = plan
            costs[ga, gb] = (plan * sub).sum()
    if group_cost is not None:
        costs += group_cost.double() / group_cost.max().clamp_min(1e-30)
    group_plan = solve(costs, solver, reg) if groups > 1 else torch.ones(1, 1, dtype=torch.float64)
    head_plan = torch.zeros(heads, len(kept), dtype=torch.float64)
    for (ga, gb), plan in within.items():  # marginals: (1/G)(1/r) = 1/heads on each side
        rows = slice(ga * per_group, (ga + 1) * per_group)
        head_plan[rows, gb * kept_per_group : (gb + 1) * kept_per_group] = group_plan[ga, gb] * plan
    return group_plan, head_plan


def producer_map(plan: torch.Tensor) -> torch.Tensor:
    """(m', m): each target unit is the barycentre of the units sent to it."""
    return (plan / plan.sum(0, keepdim=True).clamp_min(1e-30)).T


def consumer_map(plan: torch.Tensor) -> torch.Tensor:
    """(m', m): each source unit's outgoing weight is split over the targets it is sent to, and summed there."""
    return (plan / plan.sum(1, keepdim=True).clamp_min(1e-30)).T


def _rows(tensor: torch.Tensor, matrix: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Map dim 0 of `tensor` (m·unit, ...) by `matrix` (m', m), unit by unit -> (m'·unit, ...)."""
    grouped = tensor.reshape(matrix.shape[1], unit, -1)  # (m, unit, rest)
    mapped = torch.einsum("ji,iur->jur", matrix.to(tensor.dtype), grouped)
    return mapped.reshape(matrix.shape[0] * unit, *tensor.shape[1:])


def _cols(tensor: torch.Tensor, matrix: torch.Tensor, unit: int = 1) -> torch.Tensor:
    return _rows(tensor.transpose(0, 1), matrix, unit).transpose(0, 1)


def _segments(tensor: torch.Tensor, parts: Sequence[tuple[int, torch.Tensor | None, int]]) -> torch.Tensor:
    """Map dim 0 segment by segment: `parts` is (rows, matrix or None for unchanged, unit) in order."""
    pieces, start = [], 0
    for rows, matrix, unit in parts:
        piece = tensor[start : start + rows]
        pieces.append(piece if matrix is None else _rows(piece, matrix, unit))
        start += rows
    return torch.cat(pieces)


@dataclass
class LayerPlans:
    """The plans of one layer: MLP neurons, and the mixer's groups and heads (None: identity)."""

    mlp: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    heads: torch.Tensor | None = None


@dataclass
class ModelPlans:
    """Every plan that aligns one model onto the target: the residual stream's and each layer's."""

    residual: torch.Tensor | None = None
    layers: list[LayerPlans] = field(default_factory=list)


def _identity_like(plan: torch.Tensor | None, size: int) -> torch.Tensor:
    return torch.eye(size, dtype=torch.float64) / size if plan is None else plan


@torch.no_grad()
def transport(model: HybridForCausalLM, plans: ModelPlans) -> dict[str, torch.Tensor]:
    """`model`'s state dict in the target's units: every tensor mapped by the plans of its axes (see the module
    docstring); the plans' target sizes give the shapes (the tied head is left out)."""
    c = model.config
    res = _identity_like(plans.residual, c.hidden_size)
    res_in, res_out = producer_map(res), consumer_map(res)
    out = {}
    embed = model.model.embed_tokens.weight
    out["model.embed_tokens.weight"] = _cols(embed, res_in)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = _cols(model.lm_head.weight, res_out)
    out["model.norm.weight"] = _rows(model.model.norm.weight, res_in)
    for index, (layer, layer_plans) in enumerate(zip(model.model.layers, plans.layers)):
        prefix = f"model.layers.{index}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{prefix}{norm}.weight"] = _rows(getattr(layer, norm).weight, res_in)
        mlp = layer.mlp
        neurons = _identity_like(layer_plans.mlp, mlp.gate_proj.weight.shape[0])
        for name in ("gate_proj", "up_proj"):
            out[f"{prefix}mlp.{name}.weight"] = _cols(_rows(getattr(mlp, name).weight, producer_map(neurons)), res_out)
        out[f"{prefix}mlp.down_proj.weight"] = _rows(_cols(mlp.down_proj.weight, consumer_map(neurons)), res_in)
        mixer = layer.mixer
        if layer.mixer_type == "attention":
            out.update(_transport_attention(mixer, layer_plans, res_in, res_out, c, f"{prefix}mixer."))
        else:
            out.update(_transport_mamba2(mixer, layer_plans, res_in, res_out, f"{prefix}mixer."))
    return out


def _transport_attention(mixer, plans: LayerPlans, res_in, res_out, c, prefix: str) -> dict[str, torch.Tensor]:
    hd, groups = c.head_dim, c.num_key_value_heads
    heads = _identity_like(plans.heads, mixer.q_proj.weight.shape[0] // hd)
    group = _identity_like(plans.groups, groups)
    out = {}
    for name, plan in (("q_proj", heads), ("k_proj", group), ("v_proj", group)):
        linear = getattr(mixer, name)
        out[f"{prefix}{name}.weight"] = _cols(_rows(linear.weight, producer_map(plan), hd), res_out)
        if linear.bias is not None:
            out[f"{prefix}{name}.bias"] = _rows(linear.bias, producer_map(plan), hd)
    out[f"{prefix}o_proj.weight"] = _rows(_cols(mixer.o_proj.weight, consumer_map(heads), hd), res_in)
    if mixer.o_proj.bias is not None:
        out[f"{prefix}o_proj.bias"] = _rows(mixer.o_proj.bias, res_in)
    return out


def _transport_mamba2(mixer, plans: LayerPlans, res_in, res_out, prefix: str) -> dict[str, torch.Tensor]:
    s = mixer.settings
    heads_in = producer_map(_identity_like(plans.heads, s.num_heads))
    heads_out = consumer_map(_identity_like(plans.heads, s.num_heads))
    group_in = producer_map(_identity_like(plans.groups, s.num_groups))
    p, n, h, g = s.head_dim, s.state_size, s.num_heads, s.num_groups
    # in_proj rows: z (h·p) | x (g·p) | B (g·n) | C (h·n) | dt (h); conv1d channels: x | B | C
    in_parts = [
        (h * p, heads_in, p),
        (g * p, group_in, p),
        (g * n, group_in, n),
        (h * n, heads_in, n),
        (h, heads_in, 1),
    ]
    conv_parts = in_parts[1:4]
    out = {f"{prefix}in_proj.weight": _cols(_segments(mixer.in_proj.weight, in_parts), res_out)}
    if mixer.in_proj.bias is not None:
        out[f"{prefix}in_proj.bias"] = _segments(mixer.in_proj.bias, in_parts)
    out[f"{prefix}conv1d.weight"] = _segments(mixer.conv1d.weight, conv_parts)
    out[f"{prefix}conv1d.bias"] = _segments(mixer.conv1d.bias, conv_parts)
    for name in ("dt_bias", "A_log", "D"):
        out[f"{prefix}{name}"] = _rows(getattr(mixer, name), heads_in)
    out[f"{prefix}norm.weight"] = _rows(mixer.norm.weight, heads_in, p)
    out[f"{prefix}out_proj.weight"] = _rows(_cols(mixer.out_proj.weight, heads_out, p), res_in)
    if mixer.out_proj.bias is not None:
        out[f"{prefix}out_proj.bias"] = _rows(mixer.out_proj.bias, res_in)
    return out


# Ground costs


def _head_output(layer) -> nn.Module:
    """The module whose input holds the per-head outputs of the layer's mixer."""
    return layer.mixer.o_proj if layer.mixer_type == "attention" else layer.mixer.out_proj


def _groups(layer) -> int:
    """KV groups of an attention layer, or Mamba2 groups (x and B are shared by the heads of a group)."""
    if layer.mixer_type == "attention":
        return layer.mixer.config.num_key_value_heads
    return layer.mixer.settings.num_groups


def _head_size(layer) -> int:
    mixer = layer.mixer
    return mixer.head_dim if layer.mixer_type == "attention" else mixer.settings.head_dim


def _capture(model: HybridForCausalLM, block: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations of one block: the residual stream at every layer input and the final norm (`res.i`), the MLP
    neurons (`mlp.i`) and the mixer heads (`heads.i`, (tokens, heads, head size))."""
    acts = {}

    def store(key: str, unit: int = 0):
        def hook(_block, _module, args, kwargs):
            x = (args[0] if args else next(iter(kwargs.values()))).detach().flatten(0, -2).float()
            acts[key] = x.unflatten(-1, (-1, unit)) if unit else x[:, :, None]

        return hook

    hooks = {model.model.norm: store(f"res.{len(model.model.layers)}")}
    for i, layer in enumerate(model.model.layers):
        hooks[layer] = store(f"res.{i}")
        hooks[layer.mlp.down_proj] = store(f"mlp.{i}")
        hooks[_head_output(layer)] = store(f"heads.{i}", _head_size(layer))
    calibrate(model, block[None], hooks)
    return acts


class _CrossMoments:
    """Running moments of two models' activations at one site, for the correlation of every pair of units channel by
    channel: x (tokens, m, u) and y (tokens, m', u)."""

    def __init__(self):
        self.count, self.sums = 0, None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        new = [x.sum(0), x.square().sum(0), y.sum(0), y.square().sum(0), torch.einsum("tiu,tju->iju", x, y).float()]
        self.sums = new if self.sums is None else [a + b for a, b in zip(self.sums, new)]
        self.count += x.shape[0]

    def squared_distance(self) -> torch.Tensor:
        """(m, m'): Σ over channels of 2(1 − correlation), the squared distance of z-scored activations per token."""
        n = self.count
        sx, sxx, sy, syy, sxy = self.sums
        mx, my = sx / n, sy / n
        std_x = (sxx / n - mx.square()).clamp_min(0).sqrt()
        std_y = (syy / n - my.square()).clamp_min(0).sqrt()
        covariance = sxy.double() / n - mx[:, None] * my[None]  # (m, m', u)
        scale = std_x[:, None] * std_y[None]
        correlation = torch.where(scale > 0, covariance / scale.clamp_min(1e-30), torch.zeros_like(covariance))
        return (2 * (1 - correlation.clamp(-1, 1))).sum(-1)

    def anchor_rms(self) -> torch.Tensor:
        """(m',): root mean square of the second model's units (L2 over the unit's channels)."""
        return (self.sums[3] / self.count).sum(-1).sqrt()


def activation_costs(
    models, blocks: torch.Tensor, *, with_anchor: bool = True, progress: bool = False
) -> list[dict[str, torch.Tensor]]:
    """For each model, distance costs to the anchor (`models[0]`) per site, plus the anchor's unit RMS
    (`rms.<site>`): `res` (residual channels, pooled over depths), `mlp.i`, `heads.i`. Without `with_anchor` the
    anchor's costs to itself are skipped (its entry holds only the RMS)."""
    from tqdm.auto import tqdm

    moments = [{} for _ in models]
    for block in tqdm(blocks, desc="fuse: activations", unit="block", disable=not progress):
        anchor = _capture(models[0], block)
        for k, model in enumerate(models):
            acts = anchor if k == 0 else _capture(model, block)
            if k == 0 and not with_anchor:  # only the anchor's own RMS, per unit
                acts = {site: x[:, :1] for site, x in acts.items()}
            for site, x in acts.items():
                moments[k].setdefault(site, _CrossMoments()).update(x, anchor[site])
    costs = []
    for per_site in moments:
        cost = {"res": sum(m.squared_distance() for s, m in per_site.items() if s.startswith("res."))}
        cost["rms.res"] = sum(m.anchor_rms() for s, m in per_site.items() if s.startswith("res."))
        for site, m in per_site.items():
            if not site.startswith("res."):
                cost[site], cost[f"rms.{site}"] = m.squared_distance(), m.anchor_rms()
        costs.append({k: v.clamp_min(0).sqrt() if not k.startswith("rms.") else v for k, v in cost.items()})
    return costs


def _distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between L2-normalised rows of x (m, f) and y (m', f)."""
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.cdist(x, y)


def _unit_vectors(mapped: dict[str, torch.Tensor], layer, index: int, c) -> dict[str, torch.Tensor]:
    """Weight vectors per unit of one layer, from a state dict already in the target residual basis:
    `mlp` (neurons), `heads` and `groups` (the group's own k/v or x/B rows)."""
    prefix = f"model.layers.{index}."
    mlp = torch.cat(
        [mapped[f"{prefix}mlp.gate_proj.weight"], mapped[f"{prefix}mlp.up_proj.weight"],
         mapped[f"{prefix}mlp.down_proj.weight"].T], dim=1,
    )  # fmt: skip
    if layer.mixer_type == "attention":
        hd = c.head_dim
        q = mapped[f"{prefix}mixer.q_proj.weight"].unflatten(0, (-1, hd)).flatten(1)  # (heads, hd·d)
        o = mapped[f"{prefix}mixer.o_proj.weight"].T.unflatten(0, (-1, hd)).flatten(1)
        k = mapped[f"{prefix}mixer.k_proj.weight"].unflatten(0, (-1, hd)).flatten(1)
        v = mapped[f"{prefix}mixer.v_proj.weight"].unflatten(0, (-1, hd)).flatten(1)
        return {"mlp": mlp, "heads": torch.cat([q, o], 1), "groups": torch.cat([k, v], 1)}
    s = layer.mixer.settings
    h, g, p, n = s.num_heads, s.num_groups, s.head_dim, s.state_size
    z, x, B, C, dt = mapped[f"{prefix}mixer.in_proj.weight"].split([h * p, g * p, g * n, h * n, h])
    out = mapped[f"{prefix}mixer.out_proj.weight"].T.unflatten(0, (h, p)).flatten(1)
    heads = torch.cat([z.unflatten(0, (h, p)).flatten(1), C.unflatten(0, (h, n)).flatten(1), dt, out], 1)
    groups = torch.cat([x.unflatten(0, (g, p)).flatten(1), B.unflatten(0, (g, n)).flatten(1)], 1)
    return {"mlp": mlp, "heads": heads, "groups": groups}


# Target shape


def _kept(importance: torch.Tensor, size: int, groups: int = 1) -> list[int]:
    """Indices of the `size` most important units, the same number in each of `groups` contiguous groups."""
    per_group, keep = importance.numel() // groups, size // groups
    kept = []
    for g in range(groups):
        top = importance[g * per_group : (g + 1) * per_group].topk(keep).indices + g * per_group
        kept.extend(sorted(top.tolist()))
    return kept


def target_config(anchor: HybridConfig, config: FuseConfig) -> HybridConfig:
    """The fused model's config: the anchor's, narrowed along `width_axes` when `width < 1`."""
    values = anchor.to_dict()
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    if config.width < 1:
        groups = anchor.num_key_value_heads
        if "hidden" in config.width_axes:
            values["hidden_size"] = max(1, round(config.width * anchor.hidden_size))
        if "mlp" in config.width_axes:
            values["intermediate_size"] = max(1, round(config.width * anchor.intermediate_size))
        if "heads" in config.width_axes:
            per_group = anchor.num_attention_heads // groups
            values["num_attention_heads"] = groups * max(1, round(config.width * per_group))
            if mamba := _mamba(anchor):
                per_group = mamba["num_heads"] // mamba["num_groups"]
                mamba["num_heads"] = mamba["num_groups"] * max(1, round(config.width * per_group))
                values["mixers"] = {**values["mixers"], "mamba2": {**values["mixers"].get("mamba2", {}), **mamba}}
    if mamba := _mamba(anchor):  # explicit Mamba2 shapes: they default to the attention heads, which may change
        values["mixers"] = {**values["mixers"], "mamba2": {**mamba, **values["mixers"].get("mamba2", {})}}
    target = HybridConfig(**values)
    target.dtype = anchor.dtype
    return target


# The transformation


def _plans_from_costs(models, costs: list[dict], target: HybridConfig, config: FuseConfig) -> list[ModelPlans]:
    """Activation mode: every plan of every model, from the precomputed costs."""
    anchor = models[0]
    kept = _kept_units(anchor, target, {site[4:]: v for site, v in costs[0].items() if site.startswith("rms.")})
    plans = []
    for k, model in enumerate(models):
        if k == 0 and config.width == 1:
            plans.append(ModelPlans(layers=[LayerPlans() for _ in model.model.layers]))
            continue
        cost = costs[k]
        model_plans = ModelPlans(residual=solve(cost["res"][:, kept["res"]], config.solver, config.reg))
        for i, layer in enumerate(model.model.layers):
            mlp = solve(cost[f"mlp.{i}"][:, kept[f"mlp.{i}"]], config.solver, config.reg)
            groups, heads = grouped_plan(
                cost[f"heads.{i}"], _groups(layer), kept[f"heads.{i}"], config.solver, config.reg
            )
            model_plans.layers.append(LayerPlans(mlp=mlp, groups=groups, heads=heads))
        plans.append(model_plans)
    return plans


def _kept_units(anchor: HybridForCausalLM, target: HybridConfig, importance: dict) -> dict[str, list[int]]:
    """The anchor units the target keeps, per site, by importance (all of them at full width)."""
    kept = {"res": _kept(importance["res"], target.hidden_size)}
    for i, layer in enumerate(anchor.model.layers):
        kept[f"mlp.{i}"] = _kept(importance[f"mlp.{i}"], target.intermediate_size)
        if layer.mixer_type == "attention":
            heads = target.num_attention_heads
        else:
            heads = _mamba(target)["num_heads"]
        kept[f"heads.{i}"] = _kept(importance[f"heads.{i}"], heads, _groups(layer))
    return kept


def _weight_plans(models, target: HybridConfig, config: FuseConfig) -> list[ModelPlans]:
    """Weights mode: the residual plan from embedding columns, then each layer from weights read in the aligned
    residual basis."""
    anchor = models[0]
    embed = anchor.model.embed_tokens.weight.T  # (d, vocab): one row per residual channel
    importance = {"res": embed.norm(dim=1)}
    anchor_units = []
    for i, layer in enumerate(anchor.model.layers):
        units = _unit_vectors(dict(anchor.state_dict()), layer, i, anchor.config)
        anchor_units.append(units)
        importance[f"mlp.{i}"] = units["mlp"].norm(dim=1)
        importance[f"heads.{i}"] = units["heads"].norm(dim=1)
    kept = _kept_units(anchor, target, importance)
    anchor_identity = config.width == 1
    # the anchor in the target's residual basis (itself at full width; its kept channels otherwise)
    anchor_residual = (
        None if anchor_identity else solve(_distance(embed, embed[kept["res"]]), config.solver, config.reg)
    )
    anchor_mapped = transport(anchor, ModelPlans(residual=anchor_residual, layers=_empty(anchor)))
    plans = []
    for k, model in enumerate(models):
        if k == 0 and anchor_identity:
            plans.append(ModelPlans(layers=_empty(model)))
            continue
        residual = anchor_residual if k == 0 else solve(
            _distance(model.model.embed_tokens.weight.T, embed[kept["res"]]), config.solver, config.reg
        )  # fmt: skip
        mapped = transport(model, ModelPlans(residual=residual, layers=_empty(model)))
        model_plans = ModelPlans(residual=residual)
        for i, layer in enumerate(model.model.layers):
            ours = _unit_vectors(mapped, layer, i, model.config)
            theirs = _unit_vectors(anchor_mapped, anchor.model.layers[i], i, anchor.config)
            mlp = solve(_distance(ours["mlp"], theirs["mlp"][kept[f"mlp.{i}"]]), config.solver, config.reg)
            head_cost = _distance(ours["heads"], theirs["heads"])
            group_cost = _distance(ours["groups"], theirs["groups"])
            groups, heads = grouped_plan(  # the groups' own k/v (x/B) rows count too
                head_cost, _groups(layer), kept[f"heads.{i}"], config.solver, config.reg, group_cost
            )
            model_plans.layers.append(LayerPlans(mlp=mlp, groups=groups, heads=heads))
        plans.append(model_plans)
    return plans


def _empty(model) -> list[LayerPlans]:
    return [LayerPlans() for _ in model.model.layers]


@torch.no_grad()
def fuse(
    models: Sequence[nn.Module],
    config: FuseConfig,
    *,
    tokenizer=None,
    tokenizers: Sequence | None = None,
    calibration: torch.Tensor | None = None,
    progress: bool = False,
) -> HybridForCausalLM:
    """Fuse `models` into one: align each onto the anchor (`models[0]`) by optimal transport, then average.

    The inputs are not modified. Dense sources are first converted to hybrids with every layer kept as attention
    (`convert` with ratio 0), so that the result saves and loads as a `HybridForCausalLM`.

    Args:
        models (`Sequence[nn.Module]`): hybrids (attention and Mamba2 layers) or dense Llama-family models of one
            family, vocabulary, depth and layer layout; the first is the anchor, whose shape the result takes
            (narrowed by `config.width`).
        config (`FuseConfig`): alignment, solver, weights and width.
        tokenizer (*optional*): the anchor's tokenizer; cuts the calibration text for `align="activations"`.
        tokenizers (`Sequence`, *optional*): every model's tokenizer; checked to share one vocabulary.
        calibration (`torch.LongTensor`, *optional*): (num_blocks, seq_len) token ids instead of cutting
            `config.calibration`.
        progress (`bool`, *optional*): show progress bars.

    Returns:
        `HybridForCausalLM`: the fused model, with the step recorded for `hybridize.json`.

    Example:
        ```python
        >>> a, tokenizer = hybridize.load("out/a")
        >>> fused = fuse([a, hybridize.load("out/b")[0]], FuseConfig(), tokenizer=tokenizer)
        ```
    """
    check_fuse([m.config for m in models], config, tokenizers)
    start = time.perf_counter()
    sources = [getattr(m, "name_or_path", None) or None for m in models]
    history = list(getattr(models[0], "hybridize_steps", []))
    models = [as_hybrid(m, progress=progress) for m in models]
    target = target_config(models[0].config, config)
    weights = config.weights or tuple(1.0 / len(models) for _ in models)
    metrics = {}

    # 1. Align: one set of transport plans per model
    if config.align == "none":
        plans = [ModelPlans(layers=_empty(m)) for m in models]
    elif config.align == "weights":
        plans = _weight_plans(models, target, config)
    else:
        if calibration is None:
            if tokenizer is None:
                raise ConfigError("align='activations' runs calibration text: pass the anchor's tokenizer")
            calibration = calibration_blocks(
                tokenizer, config.calibration, num_blocks=config.calibration_docs, seq_len=config.calibration_len
            )
        costs = activation_costs(models, calibration, with_anchor=config.width < 1, progress=progress)
        plans = _plans_from_costs(models, costs, target, config)
        metrics["calibration_tokens"] = int(calibration.numel())
    metrics["matched_residual"] = [_matched(p.residual) for p in plans]

    # 2. Transport every model onto the target's units and average
    fused = HybridForCausalLM(target).to(models[0].dtype).eval()
    state = {}
    for model, model_plans, weight in zip(models, plans, weights):
        for name, tensor in transport(model, model_plans).items():
            state[name] = state[name] + weight * tensor if name in state else weight * tensor
    missing, unexpected = fused.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (target.tie_word_embeddings and name == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if target.tie_word_embeddings:
        fused.tie_weights()
    fused.generation_config = models[0].generation_config
    fused.hybridize_steps = history
    metrics.update(
        seconds=round(time.perf_counter() - start, 2),
        params=sum(p.numel() for p in fused.parameters()),
        source_params=[sum(p.numel() for p in m.parameters()) for m in models],
    )
    record_step(fused, "fuse", config, metrics=metrics, sources=sources)
    logger.info("fused %d models into %d parameters", len(models), metrics["params"])
    return fused


def _permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    plan = torch.zeros(n, n, dtype=torch.float64)
    plan[torch.arange(n), torch.randperm(n, generator=generator)] = 1.0 / n
    return plan


def _grouped_permutation(groups: int, per_group: int, generator: torch.Generator):
    """Groups permuted as wholes, and the heads permuted inside each group."""
    group_plan = _permutation(groups, generator)
    head_plan = torch.zeros(groups * per_group, groups * per_group, dtype=torch.float64)
    for ga in range(groups):
        gb = int(group_plan[ga].argmax())
        head_plan[ga * per_group : (ga + 1) * per_group, gb * per_group : (gb + 1) * per_group] = (
            _permutation(per_group, generator) / groups
        )
    return group_plan, head_plan


@torch.no_grad()
def permuted(model: HybridForCausalLM, seed: int = 1) -> HybridForCausalLM:
    """A copy of `model` computing the same function with its residual channels, MLP neurons, KV groups, query heads,
    Mamba2 groups and heads randomly permuted: what fusion must undo and plain averaging cannot (the tests, and
    `evals/permute_model.py` for the experiment on real fine-tunes)."""
    generator = torch.Generator().manual_seed(seed)
    c = model.config
    plans = ModelPlans(residual=_permutation(c.hidden_size, generator))
    for layer in model.model.layers:
        if layer.mixer_type == "attention":
            groups, heads = c.num_key_value_heads, c.num_attention_heads
        else:
            groups, heads = layer.mixer.settings.num_groups, layer.mixer.settings.num_heads
        group_plan, head_plan = _grouped_permutation(groups, heads // groups, generator)
        plans.layers.append(
            LayerPlans(mlp=_permutation(c.intermediate_size, generator), groups=group_plan, heads=head_plan)
        )
    permuted = HybridForCausalLM(c).eval()
    permuted.load_state_dict(transport(model, plans), strict=False)
    permuted.tie_weights()
    return permuted


def _matched(plan: torch.Tensor | None) -> float:
    """Share of the residual plan's mass on its diagonal (1.0: the identity, no channel moved)."""
    return 1.0 if plan is None else round(float(plan.diagonal().sum()), 4)


__all__ = [
    "ALIGNS",
    "SOLVERS",
    "WIDTH_AXES",
    "FuseConfig",
    "LayerPlans",
    "ModelPlans",
    "activation_costs",
    "check_fuse",
    "consumer_map",
    "fuse",
    "grouped_plan",
    "permuted",
    "producer_map",
    "solve",
    "target_config",
    "transport",
]
