"""Calibrated readout: refit each converted mixer's output projection so that it starts as close to the source
attention as a linear readout of its features can bring it.

A mixer built from q/k/v/o has the attention's directions but not its scale: with no softmax normalisation its
output is several times the attention's RMS, and 15 such layers wreck the residual stream (README). Every strong
conversion recipe since MambaInLlama aligns each new layer to its attention's output before any KL (LoLCATs, RADLADS,
MOHAWK, Zebra-Llama; research/recovery-and-runtimes.md §1). The cheapest form of that alignment is closed-form: with
the mixer's features Z (the input of its readout, `out_proj` for Mamba2, `o_proj` for NHA) and the attention's output
Y on the same inputs, the readout W minimising ||Y - Z W||² + λ||W||² is `(ZᵀZ + λI)⁻¹ ZᵀY`.

- **Sequential** (as GPTQ quantises layer after layer): the layers are fitted in order, each on the residual stream
  of the partially converted model, so the readout of layer i sees the errors of layers < i and does not compound
  them. The target of layer i is the source attention applied to the hybrid's own input. (Targeting the source's
  own residual stream instead, so that a readout also undoes earlier layers' errors, measured worse on SmolLM2:
  122 against 116 held-out perplexity at ratio 0.5.)
- **Bounded memory**: only ZᵀZ, ZᵀY and YᵀY are accumulated (float64); the calibration blocks' residual streams
  at the current layer are the only activations held, one layer at a time.
- **Never worse than removed**: λ is chosen on held-out calibration blocks among a grid, and the candidates
  include the zero readout (the mixer removed, the layer an MLP-only block) and the readout the mixer already had
  (the published mapping), so a layer cannot start worse on held-out calibration text than either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# ridge strengths, as fractions of the mean diagonal of ZᵀZ (scale-free)
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class NormalEquations:
    """ZᵀZ, ZᵀY and YᵀY of one readout over some tokens, in float64: all a least-squares fit needs."""

    zz: torch.Tensor
    zy: torch.Tensor
    yy: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, in_features: int, out_features: int, device: torch.device | str = "cpu") -> NormalEquations:
        zeros = dict(dtype=torch.float64, device=device)
        return cls(
            torch.zeros(in_features, in_features, **zeros),
            torch.zeros(in_features, out_features, **zeros),
            torch.zeros((), **zeros),
        )

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate features z (..., in) and targets y (..., out)."""
        z, y = z.reshape(-1, z.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        self.zz += z.T @ z
        self.zy += z.T @ y
        self.yy += (y * y).sum()
        self.tokens += z.shape[0]

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.zz + other.zz, self.zy + other.zy, self.yy + other.yy, self.tokens + other.tokens)

    def error(self, w: torch.Tensor) -> float:
        """Mean squared error per token of the readout `y = z @ w` (w: in x out) on the accumulated tokens."""
        w = w.double()
        sse = self.yy - 2 * (w * self.zy).sum() + (w * (self.zz @ w)).sum()
        return float(sse.clamp(min=0)) / max(self.tokens, 1)

    def solve(self, ridge: float) -> torch.Tensor:
        """The ridge solution `(ZᵀZ + λ I)⁻¹ ZᵀY` (in x out) with λ = `ridge` · mean diag(ZᵀZ)."""
        scale = self.zz.diagonal().mean().clamp(min=1e-30)
        eye = torch.eye(self.zz.shape[0], dtype=self.zz.dtype, device=self.zz.device)
        return torch.linalg.solve(self.zz + ridge * scale * eye, self.zy)


def choose_readout(
    train: NormalEquations, heldout: NormalEquations, current: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """The readout (in x out, float64) with the least held-out error among the zero matrix, `current` and the ridge
    fits of `RIDGE_GRID` on `train`; a chosen ridge fit is refitted on train + held-out tokens."""
    candidates = {"zero": torch.zeros_like(train.zy), "current": current.double()}
    for ridge in RIDGE_GRID:
        candidates[f"ridge={ridge:g}"] = train.solve(ridge)
    errors = {name: heldout.error(w) for name, w in candidates.items()}
    best = min(errors, key=errors.get)
    w = candidates[best]
    if best.startswith("ridge="):
        w = (train + heldout).solve(float(best.removeprefix("ridge=")))
    report = {
        "choice": best,
        "heldout_mse": errors[best],
        "heldout_mse_zero": errors["zero"],
        "heldout_mse_current": errors["current"],
        "target_mean_square": float(heldout.yy) / max(heldout.tokens, 1),
    }
    return w, report


def readout_of(mixer: nn.Module) -> nn.Linear:
    name = getattr(mixer, "readout", None)
    if name is None:
        raise ValueError(
            f"{type(mixer).__name__} declares no `readout` (its output projection); it cannot be calibrated"
        )
    return getattr(mixer, name)


@torch.no_grad()
def zero_readout(mixer: nn.Module) -> None:
    """Zero the mixer's readout (weight and bias): the layer then starts as if its mixer were removed."""
    readout = readout_of(mixer)
    readout.weight.zero_()
    if readout.bias is not None:
        readout.bias.zero_()


def _with_bias(z: torch.Tensor, readout: nn.Linear) -> torch.Tensor:
    """Features with a constant column when the readout has a bias, so the bias is fitted with the weight."""
    return torch.cat([z, torch.ones_like(z[..., :1])], -1) if readout.bias is not None else z


def _current(readout: nn.Linear) -> torch.Tensor:
    w = readout.weight.T
    return torch.cat([w, readout.bias[None]], 0) if readout.bias is not None else w


def mixer_features(mixer: nn.Module, x: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The input of `mixer`'s readout when it runs on x (b, l, hidden), recorded by a pre-hook."""
    seen = []
    handle = readout_of(mixer).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        mixer(x, position_embeddings=position_embeddings, attention_mask=None)
    finally:
        handle.remove()
    return seen[0]


def fit_readout(
    mixer: nn.Module,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    position_embeddings,
    heldout: Sequence[bool],
) -> dict:
    """Refit `mixer`'s readout in place so that `mixer(x)` approximates the target per block; returns its report.

    Args:
        inputs: per calibration block, the mixer's input (1, l, hidden) (the block's normed residual stream).
        targets: per block, what the mixer should output there (1, l, hidden).
        heldout: per block, whether it is held out to choose among the candidates.
    """
    readout = readout_of(mixer)
    fan_in = readout.in_features + (readout.bias is not None)
    device = readout.weight.device
    train, held = (
        NormalEquations.empty(fan_in, readout.out_features, device),
        NormalEquations.empty(fan_in, readout.out_features, device),
    )
    for x, y, is_heldout in zip(inputs, targets, heldout):
        (held if is_heldout else train).add(_with_bias(mixer_features(mixer, x, position_embeddings), readout), y)
    if not held.tokens:  # a single block: choose on the tokens fitted
        held = train
    w, report = choose_readout(train, held, _current(readout))
    w = w.to(readout.weight.dtype)
    if readout.bias is not None:
        w, bias = w[:-1], w[-1]
        readout.bias.copy_(bias)
    readout.weight.copy_(w.T)
    return report


@torch.no_grad()
def mean_direction(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The mean m of the mixer's inputs over every token of every block (float64), and the fraction of tokens on its
    side (x · m > 0): what a mean-direction gate needs. Two passes, one block at a time, so that no float64 copy of
    all blocks is made (108 MiB for SmolLM2's 16K calibration tokens, the largest allocation of a conversion)."""
    rows = [t.reshape(-1, t.shape[-1]) for t in inputs]
    count = sum(r.shape[0] for r in rows)
    mean = sum(r.double().sum(0) for r in rows) / count
    return mean, sum(int((r.double() @ mean > 0).sum()) for r in rows) / count


HALF_LIVES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)  # tokens; the candidates of each head's decay
DECAY_BLOCKS = 4  # calibration blocks the decays are chosen on (every fourth of them held out)
DECAY_RIDGE = (1e-3, 1e-1)  # per-head ridge strengths, as fractions of the mean diagonal of ZᵀZ


@torch.no_grad()
def choose_per_head(
    mixer: nn.Module,
    apply: Callable[[torch.Tensor], None],
    candidates: Sequence[float],
    inputs: Sequence[torch.Tensor],
    head_outputs: Sequence[torch.Tensor],
    position_embeddings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each head of a recurrent mixer the value, among `candidates`, whose features best explain its attention
    head's output, and set it (`apply(values)`, a (heads,) float64 tensor); returns the values and their scores.

    Each candidate is scored per head by the held-out R² of a ridge readout from the head's features (the readout's
    input, (heads · head_dim)) to its attention head's output, on the first `DECAY_BLOCKS` blocks; the mixer's
    per-head normalisation makes a head's features independent of the other heads' values, so all heads are scored
    at once per candidate. Mamba2 and Gated DeltaNet choose their decays this way (`choose_half_lives`), Gated
    DeltaNet also its write strengths.

    Args:
        inputs: per calibration block, the mixer's input (1, l, hidden).
        head_outputs: per block, the source attention's per-head outputs before o_proj (1, l, heads · head_dim).
    """
    h = mixer.settings.num_heads
    inputs, head_outputs = inputs[:DECAY_BLOCKS], head_outputs[:DECAY_BLOCKS]
    heldout = heldout_blocks(len(inputs)) if len(inputs) > 1 else [True]
    scores = []
    for candidate in candidates:
        apply(torch.full((h,), float(candidate), dtype=torch.float64))
        sums = {split: [0.0, 0.0, 0.0] for split in (False, True)}  # ZᵀZ, ZᵀY, YᵀY per head
        for x, y, held in zip(inputs, head_outputs, heldout):
            z = mixer_features(mixer, x, position_embeddings)
            z = z.reshape(-1, h, z.shape[-1] // h).transpose(0, 1).double()  # (h, tokens, d)
            y = y.reshape(-1, h, y.shape[-1] // h).transpose(0, 1).double()
            acc = sums[held]
            acc[0] = acc[0] + z.transpose(1, 2) @ z
            acc[1] = acc[1] + z.transpose(1, 2) @ y
            acc[2] = acc[2] + (y * y).sum((1, 2))
        train, held = sums[False] if not all(heldout) else sums[True], sums[True]
        scale = train[0].diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)[:, None, None]
        eye = torch.eye(train[0].shape[-1], dtype=torch.float64, device=train[0].device)
        r2 = None
        for ridge in DECAY_RIDGE:
            w = torch.linalg.solve(train[0] + ridge * scale * eye, train[1])
            sse = held[2] - 2 * (w * held[1]).sum((1, 2)) + (w * (held[0] @ w)).sum((1, 2))
            fit = 1 - sse / held[2].clamp(min=1e-30)
            r2 = fit if r2 is None else torch.maximum(r2, fit)
        scores.append(r2)
    scores = torch.stack(scores)  # (candidates, heads)
    values = torch.tensor(candidates, dtype=torch.float64)[scores.argmax(0).cpu()]
    apply(values)
    return values, scores.max(0).values


def choose_half_lives(
    mixer: nn.Module,
    set_half_lives: Callable[[torch.Tensor], None],
    inputs: Sequence[torch.Tensor],
    head_outputs: Sequence[torch.Tensor],
    position_embeddings,
) -> dict:
    """Each head's decay, among `HALF_LIVES` (tokens), chosen and set as `choose_per_head` does; its report."""
    half_lives, r2 = choose_per_head(mixer, set_half_lives, HALF_LIVES, inputs, head_outputs, position_embeddings)
    return {"half_lives": [int(t) for t in half_lives], "decay_r2": [round(float(r), 3) for r in r2]}


def heldout_blocks(num_blocks: int) -> list[bool]:
    """Which calibration blocks choose the ridge strength: every fourth (at least one of two or more)."""
    if num_blocks < 2:
        return [False] * num_blocks
    flags = [i % 4 == 3 for i in range(num_blocks)]
    if not any(flags):
        flags[-1] = True
    return flags


def causal_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive (1, 1, l, l) causal mask, given explicitly: with no mask, eager attention would attend both ways."""
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


def source_attention(
    src_layer: nn.Module, x: torch.Tensor, position_embeddings, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A source decoder layer's attention output on its normed input x (b, l, hidden), under `causal_mask`, and its
    per-head outputs before `o_proj` (b, l, heads · head_dim)."""
    heads = []
    hook = src_layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args: heads.append(args[0]))
    try:
        out = src_layer.self_attn(hidden_states=x, position_embeddings=position_embeddings, attention_mask=mask)
    finally:
        hook.remove()
    return (out[0] if isinstance(out, tuple) else out), heads[0]


def calibrate_mixer(
    mixer: nn.Module,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    head_outputs: list[torch.Tensor],
    position_embeddings,
    heldout: Sequence[bool],
    *,
    calibrate: Callable[..., dict] | None = None,
) -> dict:
    """Fit what the mixer fits on calibration text before its readout (`calibrate`, its initialiser's: Mamba2's
    linear features, gate and decays, `convert.mamba2.calibrate_mamba2`), then its readout (`fit_readout`); returns
    the report."""
    report = calibrate(mixer, inputs, head_outputs, position_embeddings) if calibrate is not None else {}
    return {**report, **fit_readout(mixer, inputs, targets, position_embeddings, heldout)}


class SequentialReadoutFit:
    """`calibrate_readouts` one layer at a time, for a caller that holds one layer pair at a time (the lazy
    `convert_to_disk`): it keeps the calibration blocks' residual streams in the hybrid between calls to `step`.

    Args:
        embed_tokens (`nn.Module`): the hybrid's token embedding; only used here, so it may be freed afterwards.
        rotary_emb (`nn.Module`): the hybrid's rotary embedding (`HybridModel.rotary_emb`).
        blocks (`torch.LongTensor` of shape `(n, l)`): unpadded token blocks of calibration text.
        layers (`Sequence[int]`): the converted layers whose readouts are fitted.
        calibrate (`Callable`, *optional*): what the mixers fit before their readout (`registry.Initializer.calibrate`).

    Example:
        ```python
        >>> fit = SequentialReadoutFit(hybrid.model.embed_tokens, hybrid.model.rotary_emb, blocks, [1, 3])
        >>> for i, (src_layer, layer) in enumerate(zip(source.model.layers, hybrid.model.layers)):
        ...     report = fit.step(i, src_layer, layer)  # a dict for layers 1 and 3, else None
        ```
    """

    @torch.no_grad()
    def __init__(
        self,
        embed_tokens: nn.Module,
        rotary_emb: nn.Module,
        blocks: torch.Tensor,
        layers: Sequence[int],
        *,
        calibrate: Callable[..., dict] | None = None,
    ):
        device = embed_tokens.weight.device
        blocks = blocks.to(device)
        self.dtype = embed_tokens.weight.dtype
        self.h = [embed_tokens(block[None]) for block in blocks]  # the hybrid's residual stream, per block
        position_ids = torch.arange(blocks.shape[1], device=device)[None]
        self.position_embeddings = rotary_emb(self.h[0], position_ids=position_ids)
        self.mask = causal_mask(blocks.shape[1], self.dtype, device)
        self.heldout = heldout_blocks(len(blocks))
        self.todo = set(layers)
        self.calibrate = calibrate

    @property
    def done(self) -> bool:
        """Whether every layer has been fitted (later layers need no step)."""
        return not self.todo

    @torch.no_grad()
    def step(self, layer_idx: int, source_layer: nn.Module, layer: nn.Module) -> dict | None:
        """Advance the fit through layer `layer_idx`: fit `layer`'s readout when it is one of the converted layers
        (its report is returned, else `None`), then run the residual streams through `layer`. Layers must come in
        order; `source_layer` is the source's decoder layer `layer_idx` (its attention is the target) and `layer` the
        hybrid's, in eval mode."""
        report = None
        if layer_idx in self.todo:
            pe = self.position_embeddings
            x = [layer.input_layernorm(hs) for hs in self.h]
            targets, heads = zip(*(source_attention(source_layer, xs, pe, self.mask) for xs in x))
            targets = [t.to(self.dtype) for t in targets]
            heads = [t.to(self.dtype) for t in heads]
            report = calibrate_mixer(layer.mixer, x, targets, heads, pe, self.heldout, calibrate=self.calibrate)
            logger.info("layer %d readout: %s", layer_idx, report)
            self.todo.discard(layer_idx)
            del x, targets, heads  # before the streams move on: memory holds one layer's activations
        if not self.todo:  # nothing left to fit: the streams are no longer needed
            self.h = []
        for k, hs in enumerate(self.h):  # block by block, each old stream freed as its next one is made
            self.h[k] = layer(
                hs, position_embeddings=self.position_embeddings, causal_mask=self.mask, padding_mask=None
            )
        return report


@torch.no_grad()
def calibrate_readouts(
    source: nn.Module,
    hybrid: nn.Module,
    blocks: torch.Tensor,
    layers: Sequence[int],
    *,
    calibrate: Callable[..., dict] | None = None,
    progress: bool = False,
) -> dict[int, dict]:
    """Fit the readouts of `hybrid`'s converted `layers` in order (see the module docstring); returns a report per
    layer. `source` is the model `hybrid` was converted from; neither is otherwise changed. `blocks` (n, l) are
    unpadded token blocks of calibration text; `calibrate` is what the mixers fit before their readout
    (`registry.Initializer.calibrate`). The steps are `SequentialReadoutFit`'s."""
    device = next(source.parameters()).device  # the hybrid visits the source's device while it is calibrated
    home = next(hybrid.parameters()).device
    hybrid.to(device)
    reports = {}
    was_training = hybrid.training
    hybrid.eval()
    bar = tqdm(total=len(set(layers)), desc="calibrate readouts", unit="layer", disable=not progress)
    try:
        fit = SequentialReadoutFit(
            hybrid.model.embed_tokens, hybrid.model.rotary_emb, blocks, layers, calibrate=calibrate
        )
        for i, layer in enumerate(hybrid.model.layers):
            if fit.done:
                break
            if (report := fit.step(i, source.model.layers[i], layer)) is not None:
                reports[i] = report
                bar.update()
    finally:
        bar.close()
        hybrid.train(was_training)
        hybrid.to(home)
    return reports


__all__ = [
    "RIDGE_GRID",
    "NormalEquations",
    "SequentialReadoutFit",
    "calibrate_mixer",
    "calibrate_readouts",
    "causal_mask",
    "choose_half_lives",
    "choose_per_head",
    "choose_readout",
    "fit_readout",
    "heldout_blocks",
    "mean_direction",
    "mixer_features",
    "readout_of",
    "source_attention",
    "zero_readout",
]
