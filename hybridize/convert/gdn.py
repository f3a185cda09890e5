"""Attention -> Gated DeltaNet initialisation (Gated DeltaNet, arXiv 2412.06464): q, k, v and o (and their biases)
are the source attention's, unchanged; the decay (a_proj, A_log, dt_bias), the write strength (b_proj), the output
gate (g_proj) and the conv are new, chosen so that the layer starts as a normalised linear-attention reading of the
source's q, k, v with one fixed memory horizon per head, and training learns the rest:

- **Conv: a scaled delta** (every tap 0 but the last, `CONV_TAP`). q, k and v pass the conv unchanged up to the
  tap, and SiLU(0.1 x) is within a few % of 0.05 x, so the features start nearly linear in the source's q, k, v
  instead of SiLU clipping their negative parts (which no readout undoes; Mamba2's `linearize_features` measured
  the same). The tap's scale costs nothing: q and k are L2-normalised after the SiLU, and the output is
  RMS-normalised per head, which removes v's scale (the delta rule is linear in v). Measured on SmolLM2-135M
  (calibrated, attention kept in layers 0-3, 10, 11, 13, 14, 16-20, 23, 24; held-out perplexity on 4,096 tokens,
  source 35.80): tap 1 gives 62.96 (KL 0.691), 0.1 gives 53.66 (KL 0.530), 0.03 gives 52.95 (KL 0.515). 0.1 is kept,
  as for Mamba2: the smaller tap gains 1.3% un-distilled but puts v's features nearer the norm's epsilon and further
  from where training can move them.
- **Decay: constant per head** (a_proj zero, A = 1, dt_bias = softplus^-1(ln 2 / half-life)), the half-lives
  `HALF_LIVES_RANGE` spread geometrically over the heads and dealt out across the KV groups, so every group has short,
  middle and long memories. A data-dependent decay starts from a known horizon instead of from a random projection.
- **Beta: 1/2 everywhere, data-free** (b_proj zero: sigmoid(0)), the paper's starting write strength, between a linear
  attention (beta -> 0, nothing overwritten) and a hard overwrite of the key's slot (beta = 1). Calibrated, each head
  gets its own among `BETAS` (`fit_beta`): on the 15 even layers of SmolLM2-135M (4,096 held-out tokens, source
  35.80) the per-head choice gives 73.59 (KL 0.850) against 84.36 (KL 0.991) at 1/2; one beta for every head gives
  96.79 at 0.9, 74.74 at 0.25 and 80.79 at 0.1, and the heads chose 0.25 (63), 0.1 (53) and 0.5 (19).
- **Output gate: PyTorch's Linear default**, drawn from the conversion's generator. No data-free choice makes
  SiLU(g_proj(x)) constant without a bias (fla's layer has none); `calibrate_gdn` sets it from calibration text to
  the inputs' mean direction, as Mamba2's `fit_gate`. Uncalibrated, the random gate hides most of what the copy
  brings: on the layers above, 221.4 with q/k/v/o copied (`mixer_init="attention"`) against 226.0 with them drawn
  (`"random"`), and 53.66 calibrated (Mamba2 calibrated on the same layers: 54.70).

`mixer_init="random"` draws q, k, v and o like nn.Linear's default instead of copying them (the ablation that measures
what the reuse is worth); everything else is initialised the same way. `calibrate_gdn` (for `mixer_init="calibrated"`,
before `convert.calibrated` refits o_proj) fits the gate and chooses each head's half-life and write strength on
calibration text.
"""

import math

import torch
from torch import nn

from ..modeling import HybridConfig
from ..modeling.gdn import GatedDeltaNetMixer
from .calibrated import choose_half_lives, choose_per_head, mean_direction

CONV_TAP = 0.1  # the delta conv's last tap: SiLU(0.1 x) is nearly linear in x
HALF_LIVES_RANGE = (2.0, 512.0)  # tokens: the shortest and longest memory of the converted heads' decays
GATE_MEAN = 2.0  # the mean-direction gate's average pre-activation: SiLU(2) = 1.76, well inside its near-linear arm
MIN_POSITIVE = 0.99  # the mean-direction gate is used only when this fraction of inputs opens it
BETAS = (0.1, 0.25, 0.5)  # the candidates of each head's write strength (1/2: the paper's start and the data-free one)


def _softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def head_half_lives(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(num_heads,) half-lives in tokens, geometric over `HALF_LIVES_RANGE`, dealt out so that the heads of each KV
    group get every num_kv_heads-th of them: group j's i-th head has the (i · num_kv_heads + j)-th shortest."""
    low, high = HALF_LIVES_RANGE
    ranks = torch.arange(num_heads, dtype=torch.float64)
    sorted_lives = low * (high / low) ** (ranks / max(num_heads - 1, 1))
    r = num_heads // num_kv_heads
    head = torch.arange(num_heads)
    rank = (head % r) * num_kv_heads + head // r  # head h is the (h % r)-th of group h // r
    return sorted_lives[rank]


@torch.no_grad()
def set_half_lives(mixer: GatedDeltaNetMixer, half_lives: torch.Tensor) -> None:
    """A constant decay per head: alpha = 2^(-1 / half-life) (a_proj zero, A = 1, dt = ln 2 / half-life)."""
    mixer.a_proj.weight.zero_()
    mixer.A_log.zero_()
    dt = math.log(2) / half_lives.double()
    mixer.dt_bias.copy_(_softplus_inverse(dt).to(mixer.dt_bias.dtype))


@torch.no_grad()
def init_gdn_from_attention(
    attn: nn.Module, config: HybridConfig, layer_idx: int, convert_config, generator: torch.Generator
) -> GatedDeltaNetMixer:
    """A new `GatedDeltaNetMixer` for layer `layer_idx` whose q/k/v/o (and biases) are those of the attention module
    `attn`, its new parameters set as the module docstring says; `attn` is not modified.

    Args:
        attn (`nn.Module`): the source attention, with `q_proj`, `k_proj`, `v_proj` and `o_proj`.
        config (`HybridConfig`): the hybrid's config (`mixers["gdn"]` sizes the mixer).
        layer_idx (`int`): the layer.
        convert_config: the `ConvertConfig`; `mixer_init` (`"random"`: q/k/v/o drawn fresh) and `seed` are read.
        generator (`torch.Generator`): draws the output gate.

    Returns:
        `GatedDeltaNetMixer`: the new mixer, in `attn`'s dtype.
    """
    mixer = GatedDeltaNetMixer(config, layer_idx).to(attn.q_proj.weight.dtype)
    s = mixer.settings
    if attn.q_proj.weight.shape != mixer.q_proj.weight.shape or attn.k_proj.weight.shape != mixer.k_proj.weight.shape:
        raise ValueError(
            f"attention initialisation needs the attention's sizes: q {tuple(attn.q_proj.weight.shape)}, k "
            f"{tuple(attn.k_proj.weight.shape)} against the gdn settings' {s.num_heads}, {s.num_kv_heads} heads of "
            f"{s.head_dim}"
        )
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if getattr(convert_config, "mixer_init", None) == "random":
        # a generator of their own, so every other parameter equals the attention-initialised conversion's
        own = torch.Generator().manual_seed(getattr(convert_config, "seed", 0) * 1_000 + layer_idx)
        for name in names:
            linear = getattr(mixer, name)
            bound = 1 / math.sqrt(linear.in_features)
            linear.weight.copy_(
                torch.empty_like(linear.weight, dtype=torch.float32).uniform_(-bound, bound, generator=own)
            )
            if linear.bias is not None:
                linear.bias.zero_()
    else:
        for name in names:  # the source attention's projections, biases included (Qwen2)
            getattr(mixer, name).load_state_dict(getattr(attn, name).state_dict())

    # Conv: a scaled delta, so q, k and v enter SiLU nearly linearly
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = CONV_TAP
    # Decay constant per head; beta = 1/2; norm weight 1
    set_half_lives(mixer, head_half_lives(s.num_heads, s.num_kv_heads))
    mixer.b_proj.weight.zero_()
    mixer.norm.weight.fill_(1.0)
    # Output gate: nn.Linear's default, from our generator so a seed reproduces it
    bound = 1 / math.sqrt(config.hidden_size)
    gate = torch.empty(mixer.g_proj.weight.shape).uniform_(-bound, bound, generator=generator)
    mixer.g_proj.weight.copy_(gate)
    return mixer


@torch.no_grad()
def fit_gate(mixer: GatedDeltaNetMixer, mean: torch.Tensor, positive: float) -> dict:
    """Set every row of `g_proj` to the mean direction m of the mixer's inputs (`calibrated.mean_direction`), scaled
    so that g averages `GATE_MEAN`: SiLU(g) is then one positive number per token, the same for every channel,
    instead of a random sign per channel that no readout undoes (Mamba2's `fit_gate`; here the norm comes before the
    gate, so that number scales the token's output instead of cancelling). Needs g > 0, i.e. inputs on the mean's
    side (`positive`, their fraction, at least `MIN_POSITIVE`)."""
    if positive < MIN_POSITIVE:
        return {"gate": "random", "gate_positive": round(positive, 4)}
    weight = mixer.g_proj.weight
    weight.copy_((GATE_MEAN * mean / mean.dot(mean)).to(weight.dtype).expand_as(weight))
    return {"gate": "mean", "gate_positive": round(positive, 4)}


@torch.no_grad()
def fit_decay(
    mixer: GatedDeltaNetMixer, inputs: list[torch.Tensor], head_outputs: list[torch.Tensor], position_embeddings
) -> dict:
    """Give each head the constant decay, among `HALF_LIVES`, whose features best explain its attention head's output
    (`calibrated.choose_half_lives`: the held-out R² of a ridge readout from the head's features to its attention
    head's output, all heads at once per candidate, which the per-head state and RMSNorm make independent).

    Args:
        inputs: per calibration block, the mixer's input (1, l, hidden).
        head_outputs: per block, the source attention's per-head outputs before o_proj (1, l, heads · head_dim).
    """
    return choose_half_lives(
        mixer, lambda half_lives: set_half_lives(mixer, half_lives), inputs, head_outputs, position_embeddings
    )


@torch.no_grad()
def fit_beta(
    mixer: GatedDeltaNetMixer,
    mean: torch.Tensor,
    inputs: list[torch.Tensor],
    head_outputs: list[torch.Tensor],
    position_embeddings,
) -> dict:
    """Give each head the write strength, among `BETAS`, whose features best explain its attention head's output, as
    `fit_decay` chooses decays. b_proj has no bias, so a head's beta is set as the gate is: its row is
    logit(beta) m / |m|², and b averages logit(beta) over the tokens (all but a few on the mean's side, which
    `fit_gate` requires too). Measured on SmolLM2-135M (the 15 even layers, calibrated, 4,096 held-out tokens, source
    35.80), one beta for every head: 0.9 gives 96.79, 1/2 84.36, 0.25 74.74: the converted layers want to overwrite
    little at first; their copied keys were trained for a softmax that keeps every token."""

    def set_betas(betas: torch.Tensor) -> None:
        logits = torch.log(betas / (1 - betas))[:, None] * (mean / mean.dot(mean))[None]
        mixer.b_proj.weight.copy_(logits.to(mixer.b_proj.weight.dtype))

    betas, r2 = choose_per_head(mixer, set_betas, BETAS, inputs, head_outputs, position_embeddings)
    return {"betas": [float(b) for b in betas], "beta_r2": [round(float(r), 3) for r in r2]}


def calibrate_gdn(
    mixer: GatedDeltaNetMixer, inputs: list[torch.Tensor], head_outputs: list[torch.Tensor], position_embeddings
) -> dict:
    """What a Gated DeltaNet mixer fits on calibration text before its readout (`registry.Initializer.calibrate`), in
    order: the output gate (`fit_gate`), each head's decay (`fit_decay`, at beta = 1/2) and, when the inputs lie on
    their mean's side, each head's write strength (`fit_beta`, with the chosen decays); returns their report."""
    mean, positive = mean_direction(inputs)
    report = fit_gate(mixer, mean, positive)
    report.update(fit_decay(mixer, inputs, head_outputs, position_embeddings))
    if positive >= MIN_POSITIVE:
        report.update(fit_beta(mixer, mean, inputs, head_outputs, position_embeddings))
    return report


__all__ = [
    "BETAS",
    "CONV_TAP",
    "HALF_LIVES_RANGE",
    "calibrate_gdn",
    "fit_beta",
    "fit_decay",
    "fit_gate",
    "head_half_lives",
    "init_gdn_from_attention",
    "set_half_lives",
]
