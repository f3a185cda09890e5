"""The calibrated Mamba2 dynamics: nearly linear features, the mean-direction gate that the per-head norm cancels, and
the per-head decay chosen from `HALF_LIVES`."""

import math

import pytest
import torch
from tiny import tiny_hybrid

from hybridize.convert.calibrated import mixer_features
from hybridize.convert.mamba2 import (
    HALF_LIVES,
    LINEAR_BC_SCALE,
    LINEAR_X_SCALE,
    fit_decay,
    fit_gate,
    linearize_features,
)


def _mixer():
    model = tiny_hybrid(["mamba2"] * 4).double()
    return model.model.layers[0].mixer, model.model.rotary_emb


def _inputs(offset: float, blocks: int = 4, length: int = 48) -> list[torch.Tensor]:
    torch.manual_seed(1)
    direction = torch.randn(64, dtype=torch.float64)
    return [torch.randn(1, length, 64, dtype=torch.float64) + offset * direction for _ in range(blocks)]


def _pe(rotary, x):
    return rotary(x, position_ids=torch.arange(x.shape[1])[None])


def _delta_conv(mixer) -> None:
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0
    mixer.conv1d.bias.zero_()


@torch.no_grad()
def test_linearized_features_are_the_projections_scaled_into_silus_linear_range():
    mixer, _ = _mixer()
    _delta_conv(mixer)
    mixer.D.fill_(1.0)
    assert linearize_features(mixer) == {"features": "linear"}
    s = mixer.settings
    x_in = _inputs(offset=0.0)[0]
    _, xBC, _ = mixer._project(x_in, None)  # before the conv: (b, channels, l)
    x, _, B, C, _, _ = mixer._project_and_convolve(x_in, None, None)
    xs, Bs, Cs = xBC.transpose(1, 2).split(
        [s.num_groups * s.head_dim, s.num_groups * s.state_size, s.num_heads * s.state_size], -1
    )
    r = s.num_heads // s.num_groups
    x_lin = (LINEAR_X_SCALE / 2 * xs).view(*xs.shape[:2], s.num_groups, -1).repeat_interleave(r, 2)
    B_lin = (LINEAR_BC_SCALE / 2 * Bs).view(*Bs.shape[:2], s.num_groups, -1).repeat_interleave(r, 2)
    C_lin = (LINEAR_BC_SCALE / 2 * Cs).view(*Cs.shape[:2], s.num_heads, -1)
    for got, linear in ((x, x_lin), (B, B_lin), (C, C_lin)):  # silu(s u) = s u / 2 + (s u)² / 4 + ...
        assert float((got - linear).norm() / linear.norm()) < 0.1
    torch.testing.assert_close(mixer.D, torch.full_like(mixer.D, LINEAR_BC_SCALE**2))  # the scan term's ratio


@torch.no_grad()
def test_a_random_conv_is_not_linearized():
    mixer, _ = _mixer()
    conv, D = mixer.conv1d.weight.clone(), mixer.D.clone()
    assert linearize_features(mixer) == {"features": "silu"}
    assert torch.equal(mixer.conv1d.weight, conv) and torch.equal(mixer.D, D)


@torch.no_grad()
def test_mean_direction_gate_is_cancelled_by_the_per_head_norm():
    mixer, rotary = _mixer()
    inputs = _inputs(offset=4.0)
    report = fit_gate(mixer, inputs)
    assert report["gate"] == "mean" and report["gate_positive"] >= 0.99
    z = mixer.in_proj.weight[: mixer.inner_size]
    assert torch.equal(z, z[:1].expand_as(z))  # every row the same: one gate value per token
    x = inputs[0]
    gated = mixer_features(mixer, x, _pe(rotary, x))
    norm = mixer.norm
    original = norm.forward
    norm.forward = lambda y, gate: original(y, torch.full_like(gate, 30.0))  # silu(30) = 30: a constant gate
    try:
        ungated = mixer_features(mixer, x, _pe(rotary, x))
    finally:
        norm.forward = original
    torch.testing.assert_close(gated, ungated, rtol=1e-3, atol=1e-3)  # equal up to the norm's epsilon


@torch.no_grad()
def test_gate_stays_random_when_inputs_have_no_side():
    mixer, _ = _mixer()
    before = mixer.in_proj.weight.clone()
    report = fit_gate(mixer, _inputs(offset=0.0))
    assert report["gate"] == "random" and report["gate_positive"] < 0.99
    assert torch.equal(mixer.in_proj.weight, before)


@pytest.mark.parametrize("truth", [(2, 64, 8, 1), (1024, 4, 32, 16)])
@torch.no_grad()
def test_decay_fit_recovers_the_half_life_of_each_head(truth):
    """Targets made by the same mixer with known half-lives: each head's own half-life explains its target exactly.
    D = 0, so that the skip term (the same at every decay) does not explain most of every target."""
    mixer, rotary = _mixer()
    mixer.D.zero_()
    assert mixer.settings.num_heads == len(truth)
    inputs = _inputs(offset=0.5)
    h = mixer.settings.num_heads
    mixer.in_proj.weight[-h:].zero_()
    mixer.A_log.zero_()
    mixer.dt_bias.copy_(torch.tensor([math.log(math.expm1(math.log(2) / t)) for t in truth], dtype=torch.float64))
    targets = [mixer_features(mixer, x, _pe(rotary, x)) for x in inputs]
    with torch.no_grad():  # start from other decays and input-dependent steps
        mixer.dt_bias.fill_(0.3)
        mixer.A_log.fill_(1.0)
        mixer.in_proj.weight[-h:].normal_()
    report = fit_decay(mixer, inputs, targets, _pe(rotary, inputs[0]))
    assert report["half_lives"] == list(truth)
    assert min(report["decay_r2"]) > 0.999
    assert set(report["half_lives"]) <= set(HALF_LIVES)
    torch.testing.assert_close(mixer_features(mixer, inputs[0], _pe(rotary, inputs[0])), targets[0])
