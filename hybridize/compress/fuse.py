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

What is particular to a mixer (its groups and heads, the module whose input holds its head outputs, its tensors'
transport, its units' weight vectors, the settings that must match and the fused model's) is in its handler in
`hybridize.surgery` (`attention.py`, `mamba2.py`); a mixer without one is refused with "fuse does not support <mixer>".

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
from ..errors import ConfigError
from ..families import head_dim
from ..io.calibration import calibrate, calibration_blocks
from ..modeling import HybridConfig, HybridForCausalLM
from ..provenance import record_step
from ..surgery import (
    MixerSurgery,
    consumer_map,
    handlers_for,
    identity_plan,
    map_cols,
    map_rows,
    mixer_types,
    producer_map,
    surgery_for,
    top,
    top_per_group,
)

logger = logging.getLogger(__name__)


# Checks, before any heavy work


def _family(config) -> str:
    return config.source_model_type if config.model_type == HybridConfig.model_type else config.model_type


def _field(config, name: str):
    if name == "head_dim":
        return head_dim(config)
    return getattr(config, name, None)


def _handlers(config) -> dict[str, MixerSurgery]:
    """The fuse handler of each mixer type in the model, in layer order; refuses a mixer without one."""
    return handlers_for(mixer_types(config), "fuse")


def _handler(layer) -> MixerSurgery:
    return surgery_for(layer.mixer_type, "fuse")


def check_fuse(configs: Sequence, config: FuseConfig, tokenizers: Sequence | None = None) -> None:
    """Refuse models that cannot be fused, from their configs (and tokenizers) alone: different families,
    vocabularies, depths, layer layouts, KV groups or head sizes, mixer settings, mixers that fuse does not align, or
    factorized models."""
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
        types, anchor_types = mixer_types(other), mixer_types(anchor)
        if types != anchor_types:
            raise ConfigError(f"model {index} has mixer_types {types} but the anchor has {anchor_types}")
        handlers = _handlers(other)  # UnsupportedModelError for a mixer without a fuse handler
        if getattr(other, "lowrank", None):
            raise ConfigError(f"model {index} has factorized linears; fuse dense models, then factorize the result")
        for mixer_type, handler in handlers.items():  # the mixers' settings beyond the shared fields above
            ours, theirs = handler.fuse_layout(other), handler.fuse_layout(anchor)
            if ours != theirs:
                raise ConfigError(
                    f"model {index} has {mixer_type} settings {ours} but the anchor has {theirs}; fuse models that "
                    "share a layout"
                )
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


@torch.no_grad()
def transport(model: HybridForCausalLM, plans: ModelPlans) -> dict[str, torch.Tensor]:
    """`model`'s state dict in the target's units: every tensor mapped by the plans of its axes (see the module
    docstring); the plans' target sizes give the shapes (the tied head is left out)."""
    c = model.config
    res = identity_plan(plans.residual, c.hidden_size)
    res_in, res_out = producer_map(res), consumer_map(res)
    out = {}
    embed = model.model.embed_tokens.weight
    out["model.embed_tokens.weight"] = map_cols(embed, res_in)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = map_cols(model.lm_head.weight, res_out)
    out["model.norm.weight"] = map_rows(model.model.norm.weight, res_in)
    for index, (layer, layer_plans) in enumerate(zip(model.model.layers, plans.layers)):
        prefix = f"model.layers.{index}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{prefix}{norm}.weight"] = map_rows(getattr(layer, norm).weight, res_in)
        mlp = layer.mlp
        neurons = identity_plan(layer_plans.mlp, mlp.gate_proj.weight.shape[0])
        for name in ("gate_proj", "up_proj"):
            out[f"{prefix}mlp.{name}.weight"] = map_cols(
                map_rows(getattr(mlp, name).weight, producer_map(neurons)), res_out
            )
        out[f"{prefix}mlp.down_proj.weight"] = map_rows(map_cols(mlp.down_proj.weight, consumer_map(neurons)), res_in)
        mixer = _handler(layer).transport(layer.mixer, layer_plans.groups, layer_plans.heads, res_in, res_out)
        out.update({f"{prefix}mixer.{name}": tensor for name, tensor in mixer.items()})
    return out


# Ground costs


def _groups(layer) -> int:
    """The layer's groups of heads (KV groups of attention, x/B groups of Mamba2)."""
    return _handler(layer).head_layout(layer.mixer)[0]


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
        handler = _handler(layer)
        hooks[handler.head_output(layer.mixer)] = store(f"heads.{i}", handler.head_layout(layer.mixer)[2])
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


def _unit_vectors(mapped: dict[str, torch.Tensor], layer, index: int) -> dict[str, torch.Tensor]:
    """Weight vectors per unit of one layer, from a state dict already in the target residual basis:
    `mlp` (neurons), `heads` and `groups` (the group's own k/v or x/B rows)."""
    prefix = f"model.layers.{index}."
    mlp = torch.cat(
        [mapped[f"{prefix}mlp.gate_proj.weight"], mapped[f"{prefix}mlp.up_proj.weight"],
         mapped[f"{prefix}mlp.down_proj.weight"].T], dim=1,
    )  # fmt: skip
    return {"mlp": mlp, **_handler(layer).unit_vectors(mapped, f"{prefix}mixer.", layer.mixer)}


# Target shape


def target_config(anchor: HybridConfig, config: FuseConfig) -> HybridConfig:
    """The fused model's config: the anchor's, narrowed along `width_axes` when `width < 1`."""
    values = anchor.to_dict()
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    if config.width < 1:
        if "hidden" in config.width_axes:
            values["hidden_size"] = max(1, round(config.width * anchor.hidden_size))
        if "mlp" in config.width_axes:
            values["intermediate_size"] = max(1, round(config.width * anchor.intermediate_size))
    heads_width = config.width if "heads" in config.width_axes else 1.0
    for mixer_type, handler in _handlers(anchor).items():  # heads per group narrowed by each mixer's handler
        values.update(handler.fused_fields(anchor, heads_width))
        if settings := handler.fused_settings(anchor, heads_width):
            values["mixers"] = {**values["mixers"], mixer_type: {**values["mixers"].get(mixer_type, {}), **settings}}
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
    kept = {"res": top(importance["res"], target.hidden_size).tolist()}
    for i, layer in enumerate(anchor.model.layers):
        kept[f"mlp.{i}"] = top(importance[f"mlp.{i}"], target.intermediate_size).tolist()
        heads = _handler(layer).fused_heads(target)  # the same number kept in each group
        kept[f"heads.{i}"] = top_per_group(importance[f"heads.{i}"], _groups(layer), heads).tolist()
    return kept


def _weight_plans(models, target: HybridConfig, config: FuseConfig) -> list[ModelPlans]:
    """Weights mode: the residual plan from embedding columns, then each layer from weights read in the aligned
    residual basis."""
    anchor = models[0]
    embed = anchor.model.embed_tokens.weight.T  # (d, vocab): one row per residual channel
    importance = {"res": embed.norm(dim=1)}
    anchor_units = []
    for i, layer in enumerate(anchor.model.layers):
        units = _unit_vectors(dict(anchor.state_dict()), layer, i)
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
            ours = _unit_vectors(mapped, layer, i)
            theirs = _unit_vectors(anchor_mapped, anchor.model.layers[i], i)
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
        groups, heads, _ = _handler(layer).head_layout(layer.mixer)
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
