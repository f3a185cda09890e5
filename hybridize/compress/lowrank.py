"""Low-rank factorization of a hybrid's linear layers: `factorize(model, FactorizeConfig(ratio=0.8))`.

Every method is the same recipe with a different input transform D, measured on calibration text: take the SVD of
W·D = U Σ Vᵀ, keep the r largest singular triplets and undo D, so that W ≈ up · down with
up = U_r Σ_r^½ (out x r) and down = Σ_r^½ V_rᵀ D⁻¹ (r x in), stored as a `LowRankLinear`.

- `svd`: D = I, the data-free baseline (the Low-Rank Transformer's SVD initialisation, Greenformers arXiv 2108.10808).
- `asvd`: D = diag(mean |x|^α), activation-aware scaling (ASVD, arXiv 2312.05821; α = 0.5).
- `fwsvd`: D = diag(√f), f the Fisher information of W summed over its output axis (FWSVD, arXiv 2207.00112); needs
  backward passes.
- `svd-llm`: D = S, the Cholesky factor of the calibration Gram matrix XᵀX = S Sᵀ (SVD-LLM, arXiv 2403.07378).
  Truncation-aware: on the calibration inputs X the output error ‖(W − W')Xᵀ‖_F is exactly √(Σ_{i>r} σ_i²), so
  dropping the smallest singular values is optimal for it.

Ranks: `uniform` gives every matrix the same fraction of its parameters, r = ⌊ratio · mn / (m + n)⌋ (SVD-LLM's rule).
`sensitivity` measures, for each matrix, how much the model's output distribution moves (KL to the unfactorized model
on calibration text) when only that matrix is truncated to the uniform rank, extrapolates along the matrix's
calibration error curve ‖(W − W_r)Xᵀ‖² (known for every r from one SVD), and picks the ranks minimising the summed
predicted KL under the same parameter budget (a Lagrangian allocation). ASVD's search measures perplexity at six
ratios per matrix; one probe per matrix is our cheaper variant. A matrix whose rank would not save parameters
(r·(m + n) ≥ m·n) stays dense.

`ratio` is the fraction of the *targeted* linear parameters kept (SVD-LLM's convention, so that `ratio=0.8` is their
"20% compression"); embeddings, norms and the head are never factorized, and the whole-model ratio is recorded in the
step's metrics. Calibration statistics (one Gram matrix per distinct linear input for `svd-llm` and `sensitivity`:
n² floats each, 0.4 GB for SmolLM2-135M) are gathered in one pass of `hybridize.io.calibration`.
"""

import logging
import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..configs.compress import METHODS, RANK_ALLOCS, TARGETS, FactorizeConfig
from ..convert import as_hybrid
from ..errors import ConfigError
from ..io.calibration import calibrate, calibration_blocks
from ..modeling import HybridForCausalLM, LowRankLinear
from ..provenance import record_step
from ..surgery import surgery_for

logger = logging.getLogger(__name__)

# Linears that read the same input share one set of statistics, kept under the first one's name
_SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


# Factorization of one matrix


def whitened_svd(weight: torch.Tensor, transform: torch.Tensor | None = None):
    """SVD of `weight` in the input basis given by `transform`, undone on the right.

    Args:
        weight (`torch.Tensor`): (m, n) `nn.Linear` weight.
        transform (`torch.Tensor`, *optional*): D: `None` (identity), an (n,) diagonal, or an (n, n) lower-triangular
            Cholesky factor.

    Returns:
        `(U, sigma, R)` in float64 with `weight = U diag(sigma) R`: U (m, k) orthonormal columns, sigma (k,) descending,
        R = Vᵀ D⁻¹ (k, n); k = min(m, n). Truncating to the first r gives the method's rank-r factorization.
    """
    W = weight.detach().double()
    if transform is None:
        U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
        return U, sigma, Vh
    D = transform.double()
    if D.dim() == 1:
        U, sigma, Vh = torch.linalg.svd(W * D, full_matrices=False)
        return U, sigma, Vh / D
    U, sigma, Vh = torch.linalg.svd(W @ D, full_matrices=False)
    return U, sigma, torch.linalg.solve_triangular(D, Vh, upper=False, left=False)  # Vᵀ S⁻¹


def factors(U: torch.Tensor, sigma: torch.Tensor, R: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(down, up)` of rank `rank` from `whitened_svd`: down = Σ_r^½ R_r (r, n), up = U_r Σ_r^½ (m, r)."""
    root = sigma[:rank].sqrt()
    return root[:, None] * R[:rank], U[:, :rank] * root


def cholesky_whitening(gram: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = gram + ridge·I (SVD-LLM): ridge = damp · mean(diag), raised to the smallest
    value that makes the matrix positive definite when it is not."""
    G = gram.double()
    scale = G.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    S, info = torch.linalg.cholesky_ex(G + damp * scale * eye)
    if info == 0:
        return S
    smallest = torch.linalg.eigvalsh(G)[0]  # SVD-LLM: add (-λ_min + ε) I
    return torch.linalg.cholesky(G + (damp * scale - smallest + 1e-6 * scale) * eye)


def error_curve(U, sigma, R, gram: torch.Tensor) -> torch.Tensor:
    """‖(W − W_r) Xᵀ‖_F² on the calibration inputs for r = 0 … k, from their Gram matrix XᵀX: Σ_{i>r} σ_i² R_i G R_iᵀ
    (U has orthonormal columns, so the cross terms vanish).

    Each term is σ_i² ‖X R_iᵀ‖², a square, and is clamped at 0: with fewer distinct calibration inputs than input
    channels the Gram matrix is singular, its float32 sum has eigenvalues slightly below 0, and the whitening ridge
    (`cholesky_whitening`) is only just above them, so the terms of the directions the inputs never take, exactly 0,
    come out slightly negative. Unclamped, the curve then dips below 0 past the inputs' rank."""
    weights = (sigma.square() * torch.einsum("kn,nm,km->k", R, gram.double(), R)).clamp_min(0)  # (k,)
    tail = weights.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def uniform_rank(m: int, n: int, ratio: float) -> int | None:
    """⌊ratio · mn / (m + n)⌋ (at least 1), or None when that rank would not save parameters (or ratio is 1)."""
    rank = max(1, math.floor(ratio * m * n / (m + n)))
    return rank if rank * (m + n) < m * n and ratio < 1 else None


# Which linears, and what we measure on their inputs


def target_linears(model: HybridForCausalLM, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """Full name -> `nn.Linear` of every matrix the targets select (already factorized ones are skipped): `mlp` in
    every layer, the others in the mixers whose surgery handler lists them (`factorize_targets`).

    Raises:
        `UnsupportedModelError`: a mixer has no factorize handler (`hybridize.surgery.surgery_for`).
    """
    targets = tuple(targets)
    found = {}
    for i, layer in enumerate(model.model.layers):
        handler = surgery_for(layer.mixer_type, "factorize")
        kinds = {
            "mixer": [k for k in targets if k in handler.factorize_targets],
            "mlp": [k for k in targets if k == "mlp"],
        }
        for part, selected in kinds.items():
            leaves = {leaf for kind in selected for leaf in TARGETS[kind]}
            for name, module in getattr(layer, part).named_modules(prefix=part):
                if name.rpartition(".")[2] in leaves and isinstance(module, nn.Linear):
                    found[f"model.layers.{i}.{name}"] = module
    return found


def _stats_key(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{_SHARED_INPUT.get(leaf, leaf)}"


class _InputStats:
    """Running statistics of one linear input: count, Σ|x| per channel and (optionally) the Gram matrix XᵀX."""

    def __init__(self, gram: bool):
        self.count, self.abs_sum, self.gram, self.want_gram = 0, None, None, gram

    def __call__(self, block: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = (args[0] if args else kwargs["input"]).detach().flatten(0, -2).float()  # (tokens, n)
        abs_sum = x.abs().sum(0, dtype=torch.float64)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.count += x.shape[0]
        if self.want_gram:  # float32: the sums of a few thousand tokens lose nothing that the factorization sees
            self.gram = x.T @ x if self.gram is None else self.gram.addmm_(x.T, x)


def _input_stats(model, linears: dict[str, nn.Linear], blocks: torch.Tensor, gram: bool, progress: bool):
    stats = {_stats_key(name): _InputStats(gram) for name in linears}
    modules = dict(model.named_modules())
    calibrate(model, blocks, {modules[key]: hook for key, hook in stats.items()}, progress=progress)
    return stats


@torch.enable_grad()
def _fisher(model, linears: dict[str, nn.Linear], blocks: torch.Tensor, progress: bool) -> dict[str, torch.Tensor]:
    """Σ over calibration blocks of the squared weight gradients of the LM loss, summed over each weight's output
    axis: one number per input channel (FWSVD's row-wise Fisher, in the [out, in] layout)."""
    from tqdm.auto import tqdm

    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {name: linear.weight for name, linear in linears.items()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    fisher = {name: torch.zeros(w.shape[1], dtype=torch.float64) for name, w in weights.items()}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for block in tqdm(blocks, desc="fisher", unit="block", disable=not progress):
            ids = block[None].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for name, weight in weights.items():
                fisher[name] += weight.grad.double().square().sum(0).cpu()
                weight.grad = None
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires[name])
        model.train(was_training)
    return fisher


def _transform(config: FactorizeConfig, name: str, stats: dict, fisher: dict | None) -> torch.Tensor | None:
    if config.method == "svd":
        return None
    s = stats[_stats_key(name)]
    if config.method == "asvd":  # ASVD: mean |x| per input channel, to the power alpha (+ 1e-6 as published)
        return (s.abs_sum / s.count).pow(config.alpha) + 1e-6
    if config.method == "fwsvd":
        f = fisher[name].sqrt()
        return f.clamp_min(f.max() * 1e-6 + 1e-30)
    return cholesky_whitening(s.gram, config.damp)


# Sensitivity: the output KL when one matrix alone is truncated


class _LayerInputs:
    """Captures each decoder layer's hidden states and keyword arguments on one block, to re-run the layers from any
    depth (the tail of the model) without recomputing the head of it."""

    def __init__(self):
        self.inputs = {}

    def __call__(self, block: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.inputs[module] = (hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})


@torch.inference_mode()
def _tail_log_probs(model: HybridForCausalLM, start: int, captured: _LayerInputs) -> torch.Tensor:
    layers = model.model.layers
    hidden, kwargs = captured.inputs[layers[start]]
    for layer in layers[start:]:
        hidden = layer(hidden, **kwargs)
    return F.log_softmax(model.lm_head(model.model.norm(hidden)).float(), dim=-1)


@torch.inference_mode()
def _sensitivities(model, linears, decompose, stats, probe_ranks, block, progress):
    """Per matrix: KL(original || that matrix alone truncated to its probe rank) per token, divided by the
    truncation's relative calibration error (the slope of KL against relative error); and its error curve."""
    from tqdm.auto import tqdm

    layers = model.model.layers
    captured = _LayerInputs()
    calibrate(model, block[None], {layer: captured for layer in layers})
    reference = _tail_log_probs(model, 0, captured)
    slopes, curves = {}, {}
    for name in tqdm(list(linears), desc="sensitivity", unit="matrix", disable=not progress):
        linear, rank = linears[name], probe_ranks[name]
        decomposition = decompose(name)
        curves[name] = curve = error_curve(*decomposition, stats[_stats_key(name)].gram)
        relative = (curve[rank] / curve[0].clamp_min(1e-30)).item()
        if relative <= 0:
            slopes[name] = 0.0
            continue
        original = linear.weight.data.clone()
        down, up = factors(*decomposition, rank)
        linear.weight.data.copy_((up @ down).to(original.dtype))
        try:
            log_q = _tail_log_probs(model, int(name.split(".")[2]), captured)
        finally:
            linear.weight.data.copy_(original)
        kl = (reference.exp() * (reference - log_q)).sum(-1).mean().item()
        slopes[name] = max(kl, 0.0) / relative
    return slopes, curves


def allocate_ranks(
    shapes: dict[str, tuple[int, int]], costs: dict[str, torch.Tensor], budget: float
) -> dict[str, int | None]:
    """Ranks minimising Σ costs[name][r] subject to Σ parameters ≤ budget. `costs[name]` is the predicted cost of
    rank r = 0 … k; each matrix takes a rank r ≥ 1 with r·(m + n) < m·n, or stays dense (None: m·n parameters, cost
    0). A Lagrangian search over the price of a parameter chooses the ranks; the budget it leaves is then spent
    greedily, best cost saved per parameter first, on rank increments or on keeping a matrix dense."""
    options = {}
    for name, (m, n) in shapes.items():
        top = max(1, min(len(costs[name]) - 1, math.ceil(m * n / (m + n)) - 1))
        ranks = torch.arange(1, top + 1)
        options[name] = (ranks, (ranks * (m + n)).double(), costs[name][ranks].double())

    def choose(price: float) -> tuple[dict[str, int], float]:
        chosen = {
            name: int(ranks[(cost + price * params).argmin()]) for name, (ranks, params, cost) in options.items()
        }
        return chosen, sum(r * sum(shapes[name]) for name, r in chosen.items())

    low, high = 0.0, 1.0
    while choose(high)[1] > budget and high < 1e30:
        high *= 4
    for _ in range(200):
        middle = (low * high) ** 0.5 if low > 0 else high * 1e-6
        if choose(middle)[1] > budget:
            low = middle
        else:
            high = middle
        if low > 0 and high <= low * (1 + 1e-9):
            break
    ranks, used = choose(high)
    chosen: dict[str, int | None] = dict(ranks)
    while True:  # spend what is left
        best, best_gain = None, 0.0
        for name, rank in chosen.items():
            if rank is None:
                continue
            m, n = shapes[name]
            cost = costs[name]
            moves = [(None, m * n - rank * (m + n), float(cost[rank]))]
            if rank + 1 < min(len(cost), math.ceil(m * n / (m + n))):
                moves.append((rank + 1, m + n, float(cost[rank] - cost[rank + 1])))
            for new_rank, extra, saved in moves:
                if extra <= budget - used and saved > 0 and saved / extra > best_gain:
                    best, best_gain = (name, new_rank, extra), saved / extra
        if best is None:
            return chosen
        name, new_rank, extra = best
        chosen[name], used = new_rank, used + extra


# The transformation


def check_factorize(model, config: FactorizeConfig) -> None:
    """Refuse a model with a mixer that factorize does not handle, or whose targets select nothing, before any
    calibration."""
    if not isinstance(model, HybridForCausalLM):
        return  # a dense source is converted first; convert checks its family
    if not target_linears(model, config.targets):
        raise ConfigError(
            f"targets {list(config.targets)} select no linear layer of this model (mixers: "
            f"{sorted(set(model.config.mixer_types))}); choose targets among attn, mlp, mamba that it has"
        )


@torch.no_grad()
def factorize(
    model: nn.Module,
    config: FactorizeConfig,
    *,
    tokenizer=None,
    calibration: torch.Tensor | None = None,
    progress: bool = False,
) -> HybridForCausalLM:
    """Replace the targeted linears of `model` by low-rank factors (`LowRankLinear`), keeping `config.ratio` of
    their parameters.

    A hybrid is modified in place and returned. A dense source (Llama, Mistral, Qwen2) is first converted to a hybrid
    with every layer kept as attention (`convert` with ratio 0, recorded as a step), so that the factorized model
    saves and loads as a `HybridForCausalLM`; the source itself is not modified.

    Args:
        model (`nn.Module`): a `HybridForCausalLM` or a supported dense causal LM.
        config (`FactorizeConfig`): method, ratio, targets and rank allocation.
        tokenizer (*optional*): cuts the calibration text; needed unless `calibration` is given or the method is
            `svd` with uniform ranks.
        calibration (`torch.LongTensor`, *optional*): (num_blocks, seq_len) token ids used instead of cutting
            `config.calibration`.
        progress (`bool`, *optional*): show progress bars.

    Returns:
        `HybridForCausalLM`: the factorized model; its config's `lowrank` lists every factorized linear and its rank.

    Example:
        ```python
        >>> model, tokenizer = hybridize.load("llama")
        >>> small = factorize(model, FactorizeConfig(ratio=0.8, method="svd-llm"), tokenizer=tokenizer)
        ```
    """
    check_factorize(model, config)
    model = as_hybrid(model, progress=progress)
    start = time.perf_counter()
    linears = target_linears(model, config.targets)
    if not linears:
        check_factorize(model, config)
    params_before = sum(p.numel() for p in model.parameters())
    blocks = None
    if config.needs_data:
        if calibration is None:
            if tokenizer is None:
                raise ConfigError(
                    f"method {config.method!r} with rank_alloc {config.rank_alloc!r} measures calibration text: "
                    "pass the model's tokenizer (or calibration token blocks)"
                )
            calibration = calibration_blocks(
                tokenizer, config.calibration, num_blocks=config.calibration_docs, seq_len=config.calibration_len
            )
        blocks = calibration

    # 1. Measure: input statistics in one calibration pass, Fisher information in another
    want_gram = config.method == "svd-llm" or config.rank_alloc == "sensitivity"
    stats = _input_stats(model, linears, blocks, want_gram, progress) if blocks is not None else {}
    fisher = _fisher(model, linears, blocks, progress) if config.method == "fwsvd" else None

    # 2. Choose the ranks (decompositions are recomputed where needed rather than all kept: they are 4x the weights)
    shapes = {name: tuple(linear.weight.shape) for name, linear in linears.items()}

    def decompose(name: str):
        return whitened_svd(linears[name].weight, _transform(config, name, stats, fisher))

    ranks = {name: uniform_rank(m, n, config.ratio) for name, (m, n) in shapes.items()}
    curves, sensitivity = {}, None
    if config.rank_alloc == "sensitivity":
        probe = {name: uniform_rank(m, n, min(config.ratio, 0.9)) or 1 for name, (m, n) in shapes.items()}
        block = blocks[0, : config.sensitivity_tokens]
        sensitivity, curves = _sensitivities(model, linears, decompose, stats, probe, block, progress)
        costs = {name: sensitivity[name] * curves[name] / curves[name][0].clamp_min(1e-30) for name in linears}
        budget = config.ratio * sum(m * n for m, n in shapes.values())
        ranks = allocate_ranks(shapes, costs, budget)

    # 3. Replace, one matrix at a time
    lowrank = dict(model.config.lowrank or {})
    relative_errors = {}
    for name, linear in linears.items():
        rank = ranks[name]
        if rank is None:
            continue
        decomposition = decompose(name)
        down, up = factors(*decomposition, rank)
        factored = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        factored = factored.to(device=linear.weight.device, dtype=linear.weight.dtype)
        factored.down.weight.copy_(down)
        factored.up.weight.copy_(up)
        if linear.bias is not None:
            factored.up.bias.copy_(linear.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, factored)
        lowrank[name] = rank
        if want_gram:  # ‖(W − W')Xᵀ‖ / ‖WXᵀ‖ on the calibration inputs
            curve = curves.get(name)
            curve = error_curve(*decomposition, stats[_stats_key(name)].gram) if curve is None else curve
            relative_errors[name] = math.sqrt((curve[rank] / curve[0].clamp_min(1e-30)).item())
    model.config.lowrank = lowrank

    params_after = sum(p.numel() for p in model.parameters())
    targeted = sum(m * n for m, n in shapes.values())
    kept = sum(r * (m + n) if r is not None else m * n for (m, n), r in zip(shapes.values(), ranks.values()))
    metrics = {
        "seconds": round(time.perf_counter() - start, 2),
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": round(params_after / params_before, 4),
        "targeted_params_ratio": round(kept / targeted, 4) if targeted else 1.0,
        "factorized": sum(r is not None for r in ranks.values()),
        "dense": [name for name, r in ranks.items() if r is None],
        "calibration_tokens": int(blocks.numel()) if blocks is not None else 0,
    }
    if relative_errors:  # ‖(W − W')Xᵀ‖ / ‖WXᵀ‖ on the calibration inputs
        metrics["mean_relative_error"] = round(sum(relative_errors.values()) / len(relative_errors), 5)
    if sensitivity is not None:
        metrics["sensitivity"] = {name: round(value, 6) for name, value in sensitivity.items()}
    record_step(model, "factorize", config, metrics=metrics)
    logger.info("factorized %d linears: %d -> %d parameters", metrics["factorized"], params_before, params_after)
    return model


__all__ = [
    "METHODS",
    "RANK_ALLOCS",
    "TARGETS",
    "FactorizeConfig",
    "allocate_ranks",
    "check_factorize",
    "cholesky_whitening",
    "error_curve",
    "factorize",
    "factors",
    "target_linears",
    "uniform_rank",
    "whitened_svd",
]
