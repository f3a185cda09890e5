"""Mamba2's own identities: the chunked SSD scan and the decode step equal the token-by-token reference."""

import pytest
import torch
from tiny import TINY, TOLERANCES

from hybridize.modeling import HybridConfig, HybridForCausalLM
from hybridize.modeling.common import causal_conv1d
from hybridize.modeling.mamba2 import Mamba2MixerConfig, mamba2_scan_chunked, mamba2_scan_ref, mamba2_step

CHUNK = 16


def _inputs(length, dtype, b=2, h=4, p=8, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=g, dtype=dtype)
    dt = torch.rand(b, length, h, generator=g, dtype=dtype) * 0.5
    A = -torch.rand(h, generator=g, dtype=dtype) * 4
    B = torch.randn(b, length, h, n, generator=g, dtype=dtype)
    C = torch.randn(b, length, h, n, generator=g, dtype=dtype)
    D = torch.randn(h, generator=g, dtype=dtype)
    state = torch.randn(b, h, p, n, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("chunk_size", [CHUNK, 7])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_reference(dtype, length, chunk_size, with_state):
    x, dt, A, B, C, D, state = _inputs(length, dtype)
    state = state if with_state else None
    y_ref, s_ref = mamba2_scan_ref(x, dt, A, B, C, D, state)
    y, s = mamba2_scan_chunked(x, dt, A, B, C, D, state, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(s, s_ref, **TOLERANCES[dtype])


def test_step_by_step_decode_equals_one_scan():
    x, dt, A, B, C, D, _ = _inputs(2 * CHUNK + 3, torch.float64)
    y_full, s_full = mamba2_scan_chunked(x, dt, A, B, C, D, chunk_size=CHUNK)
    split = CHUNK + 2
    y, state = mamba2_scan_chunked(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], D, chunk_size=CHUNK)
    ys = [y]
    for t in range(split, x.shape[1]):
        state, y_t = mamba2_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y_full, **TOLERANCES[torch.float64])
    torch.testing.assert_close(state, s_full, **TOLERANCES[torch.float64])


def test_scan_matches_a_hand_computed_recurrence():
    # one head, p = n = 1: H_t = exp(dt A) H_{t-1} + dt x B; y = H C + D x
    x = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64).view(1, 3, 1, 1)
    dt = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64).view(1, 3, 1)
    A, D = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    B = torch.tensor([1.0, -1.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    C = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    H, expected = 0.0, []
    for t in range(3):
        H = torch.exp(dt[0, t, 0] * A[0]) * H + dt[0, t, 0] * x[0, t, 0, 0] * B[0, t, 0, 0]
        expected.append(H * C[0, t, 0, 0] + D[0] * x[0, t, 0, 0])
    y, _ = mamba2_scan_chunked(x, dt, A, B, C, D, chunk_size=2)
    torch.testing.assert_close(y.flatten(), torch.stack(expected))


def test_causal_conv_with_state_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 5, 11, generator=g), torch.randn(5, 1, 4, generator=g), torch.randn(5, generator=g)
    full, _ = causal_conv1d(x, w, bias, None)
    first, state = causal_conv1d(x[..., :6], w, bias, None)
    second, _ = causal_conv1d(x[..., 6:], w, bias, state)
    torch.testing.assert_close(torch.cat([first, second], -1), full)
    expected = torch.nn.functional.conv1d(x, w, bias, padding=3, groups=5)[..., :11]
    torch.testing.assert_close(full, expected)


def test_ref_impl_equals_auto_in_the_model():
    config = HybridConfig(**TINY, mixer_types=["mamba2", "attention"] * 2, mixers={"mamba2": {"chunk_size": 8}})
    model = HybridForCausalLM(config).eval()
    ref = HybridForCausalLM(
        HybridConfig(**TINY, mixer_types=config.mixer_types, mixers={"mamba2": {"impl": "ref"}})
    ).eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 21))
    torch.testing.assert_close(ref(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="multiple of num_groups"):
        Mamba2MixerConfig(num_heads=4, num_groups=3, head_dim=8, state_size=8)
    with pytest.raises(ValueError, match="unknown mamba2 settings"):
        HybridForCausalLM(HybridConfig(**TINY, mixer_types=["mamba2"] * 4, mixers={"mamba2": {"chunk": 8}}))


@pytest.mark.gpu
def test_mamba_ssm_kernel_equals_reference():
    """The fused Triton kernel of mamba_ssm (used on CUDA when installed) against the torch reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kernels = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined")
    assert kernels.mamba_chunk_scan_combined is not None
    from hybridize.modeling.mamba2 import mamba2_scan_kernel

    x, dt, A, B, C, D, state = (t.float().cuda() for t in _inputs(3 * CHUNK + 1, torch.float64))
    y_ref, s_ref = mamba2_scan_ref(x, dt, A, B, C, D, state)
    y, s = mamba2_scan_kernel(x, dt, A, B, C, D, state, chunk_size=CHUNK)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s, s_ref, rtol=1e-3, atol=1e-3)
