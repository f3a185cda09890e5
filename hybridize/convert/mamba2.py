"""Attention -> Mamba2 initialisation (MambaInLlama, arXiv 2408.15237): C <- W_q, B <- W_k, x <- W_v,
out_proj <- W_o (biases too, for Qwen2-style q/k/v biases); the gate z and the step dt are new.

New parameters follow mamba_ssm's defaults, as MambaInLlama does: dt_bias = softplus⁻¹(dt0) with dt0 log-uniform in
[dt_min, dt_max], A = -U[1, 16], D = 1, gated-norm weight 1, z and dt rows nn.Linear's default. The convolution is
either PyTorch's random default (`conv_init="random"`, as published) or a delta (`"delta"`: last tap 1, bias 0), which
passes x, B and C through unchanged at step 0 so the converted layer starts closer to linear attention.
`mixer_init="random"` draws x, B, C and out_proj like the new rows instead of copying attention (the ablation that
measures what the weight reuse is worth); everything else is initialised the same way.
"""

import math

import torch
from torch import nn

from ..modeling import HybridConfig, Mamba2Mixer
from .calibrated import HALF_LIVES, choose_half_lives, mean_direction


@torch.no_grad()
def init_mamba2_from_attention(
    attn: nn.Module, config: HybridConfig, layer_idx: int, convert_config, generator: torch.Generator
) -> Mamba2Mixer:
    """A new `Mamba2Mixer` for layer `layer_idx` whose projections are copied from the attention module `attn`
    (with `q_proj`, `k_proj`, `v_proj`, `o_proj`), with the conv init of `convert_config.init_options`
    (`Mamba2InitConfig`). `attn` is not modified."""
    mixer = Mamba2Mixer(config, layer_idx).to(attn.q_proj.weight.dtype)
    s = mixer.settings
    if s.state_size != attn.k_proj.weight.shape[0] // s.num_groups or s.head_dim != s.state_size:
        raise ValueError("attention initialisation needs state_size == head_dim == the attention head size")
    bound = 1 / math.sqrt(config.hidden_size)  # nn.Linear's default for the new rows

    # in_proj rows: z | x | B | C | dt
    z, x, B, C, dt = mixer.in_proj.weight.split(
        [
            mixer.inner_size,
            s.num_groups * s.head_dim,
            s.num_groups * s.state_size,
            s.num_heads * s.state_size,
            s.num_heads,
        ]
    )
    z.uniform_(-bound, bound, generator=generator)
    dt.uniform_(-bound, bound, generator=generator)
    if convert_config.mixer_init == "random":
        # a generator of their own, so every other parameter equals the attention-initialised conversion's
        own = torch.Generator().manual_seed(convert_config.seed * 1_000 + layer_idx)
        for w in (x, B, C):
            w.uniform_(-bound, bound, generator=own)
        out_bound = 1 / math.sqrt(mixer.inner_size)
        mixer.out_proj.weight.uniform_(-out_bound, out_bound, generator=own)
        for b in (mixer.in_proj.bias, mixer.out_proj.bias):
            if b is not None:
                b.zero_()
    else:
        x.copy_(attn.v_proj.weight)  # MambaInLlama: x <- W_v
        B.copy_(attn.k_proj.weight)  #              B <- W_k
        C.copy_(attn.q_proj.weight)  #              C <- W_q
        if mixer.in_proj.bias is not None:
            zb, xb, Bb, Cb, dtb = mixer.in_proj.bias.split([len(z), len(x), len(B), len(C), len(dt)])
            zb.zero_(), dtb.zero_()
            xb.copy_(attn.v_proj.bias), Bb.copy_(attn.k_proj.bias), Cb.copy_(attn.q_proj.bias)
        mixer.out_proj.weight.copy_(attn.o_proj.weight)  # out <- W_o
        if mixer.out_proj.bias is not None:
            mixer.out_proj.bias.copy_(attn.o_proj.bias)

    # mamba_ssm defaults for the SSM parameters
    dt_min, dt_max = 1e-3, 1e-1
    dt0 = torch.exp(torch.rand(s.num_heads, generator=generator) * (math.log(dt_max) - math.log(dt_min)))
    dt0 = (dt0 * dt_min).clamp(min=1e-4)
    mixer.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus⁻¹
    mixer.A_log.copy_(torch.log(1 + 15 * torch.rand(s.num_heads, generator=generator)))
    mixer.D.fill_(1.0)
    mixer.norm.weight.fill_(1.0)

    if convert_config.init_config.conv_init == "delta":
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0
        mixer.conv1d.bias.zero_()
    else:  # PyTorch's Conv1d default, drawn from our generator so a seed reproduces it
        fan_in = mixer.conv1d.weight.shape[1] * mixer.conv1d.weight.shape[2]
        conv_bound = 1 / math.sqrt(fan_in)
        mixer.conv1d.weight.uniform_(-conv_bound, conv_bound, generator=generator)
        mixer.conv1d.bias.uniform_(-conv_bound, conv_bound, generator=generator)
    return mixer


# Calibrated dynamics (`mixer_init="calibrated"`): before its readout is refitted (`convert.calibrated`), a converted
# Mamba2 layer gets nearly linear features, a gate that passes them through and a decay per head chosen on
# calibration text.
LINEAR_X_SCALE = 0.1  # delta-conv tap of the x channels: silu(0.1 v) is within a few % of 0.05 v
LINEAR_BC_SCALE = 0.1  # and of the B and C channels
MIN_POSITIVE = 0.99  # the mean-direction gate is used only when this fraction of inputs opens it


def _softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


@torch.no_grad()
def linearize_features(mixer: Mamba2Mixer) -> dict:
    """Shrink what enters the silu after the conv, so that x, B and C start as (scaled) v, k and q.

    Mamba2 applies silu to x, B and C; on copied v/k/q it clips every negative component of the values and of the
    query-key products, which no readout can undo. silu(s u) is s u / 2 to first order, so with a delta conv whose tap
    is s the layer computes linear attention on v, k and q up to a scale per factor, and the per-head RMSNorm after the
    scan removes that scale (D is scaled by the same s_B s_C as the scan term so their ratio is unchanged). The
    weights of in_proj keep their size, and training can grow the taps back into silu's curve. On SmolLM2 the
    held-out R² of the calibrated readout rose in every layer probed (layers 4, 7, 12, 21, 27: 0.52 -> 0.56,
    0.55 -> 0.59, 0.63 -> 0.72, 0.74 -> 0.77, 0.83 -> 0.88).
    Only a delta conv (`conv_init="delta"`: last tap 1, others and bias 0) is rescaled; a random conv is left as is.
    """
    s = mixer.settings
    weight, bias = mixer.conv1d.weight[:, 0], mixer.conv1d.bias
    delta = bool((weight[:, :-1] == 0).all() and (weight[:, -1] == 1).all())
    if not delta or (bias is not None and bool(bias.any())):
        return {"features": "silu"}
    x_channels = s.num_groups * s.head_dim
    weight[:x_channels, -1] = LINEAR_X_SCALE
    weight[x_channels:, -1] = LINEAR_BC_SCALE
    mixer.D.mul_(LINEAR_BC_SCALE**2)
    return {"features": "linear"}


@torch.no_grad()
def fit_gate(mixer: Mamba2Mixer, inputs: list[torch.Tensor]) -> dict:
    """Set every gate row of `mixer` to the mean direction m of its inputs (scaled so that z averages 2).

    A random gate multiplies each channel by its own token-dependent factor silu(z), which no linear readout can undo
    (a probe on SmolLM2 at ratio 0.5: held-out perplexity 67.8 with the random gate, 60.3 with a constant one). With
    the rows of a head equal, silu(z) is one positive number per token and head, and the per-head RMSNorm after it
    removes it exactly, so the layer starts as if ungated; training then moves the rows apart. It needs z > 0, i.e.
    inputs on the mean's side: after the input RMSNorm of SmolLM2 every layer had >= 99.9% of tokens there.
    """
    mean, positive = mean_direction(inputs)
    if positive < MIN_POSITIVE:
        return {"gate": "random", "gate_positive": round(positive, 4)}
    z = mixer.in_proj.weight[: mixer.inner_size]
    z.copy_((2 * mean / mean.dot(mean)).to(z.dtype).expand_as(z))
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[: mixer.inner_size].zero_()
    return {"gate": "mean", "gate_positive": round(positive, 4)}


@torch.no_grad()
def fit_decay(
    mixer: Mamba2Mixer, inputs: list[torch.Tensor], head_outputs: list[torch.Tensor], position_embeddings
) -> dict:
    """Give each head the decay, among `HALF_LIVES`, whose output best explains its attention head's output.

    The step dt becomes a constant per head (its input-dependent rows zeroed, A = -1, dt = ln 2 / half-life), so the
    layer starts as a linear attention with a fitted decay; training learns the selectivity. Each candidate is scored
    per head by the held-out R² of a ridge readout from the head's features to its attention head's output (the
    o_proj input), which the per-head RMSNorm makes independent of the other heads.

    Args:
        inputs: per calibration block, the mixer's input (1, l, hidden).
        head_outputs: per block, the source attention's per-head outputs before o_proj (1, l, heads · head_dim).
    """
    h = mixer.settings.num_heads
    mixer.in_proj.weight[-h:].zero_()
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[-h:].zero_()
    mixer.A_log.zero_()

    def set_half_lives(half_lives: torch.Tensor) -> None:  # dt = ln 2 / half-life, A = -1
        mixer.dt_bias.copy_(_softplus_inverse(math.log(2) / half_lives).to(mixer.dt_bias.dtype))

    return choose_half_lives(mixer, set_half_lives, inputs, head_outputs, position_embeddings)


def calibrate_mamba2(
    mixer: Mamba2Mixer, inputs: list[torch.Tensor], head_outputs: list[torch.Tensor], position_embeddings
) -> dict:
    """What a Mamba2 mixer fits on calibration text before its readout, in order: nearly linear features
    (`linearize_features`), the gate (`fit_gate`) and each head's decay (`fit_decay`); returns their report."""
    report = linearize_features(mixer)
    report.update(fit_gate(mixer, inputs))
    report.update(fit_decay(mixer, inputs, head_outputs, position_embeddings))
    return report


__all__ = [
    "HALF_LIVES",
    "calibrate_mamba2",
    "fit_decay",
    "fit_gate",
    "init_mamba2_from_attention",
    "linearize_features",
]
