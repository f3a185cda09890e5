"""Mamba2's own identities: the chunked SSD scan and the decode step equal the token-by-token reference."""

import pytest
import torch
from tiny import TINY, TOLERANCES, count_steps, decode_one_by_one, tiny_hybrid

from hybridize.modeling import HybridConfig, HybridForCausalLM
from hybridize.modeling import mamba2 as mamba2_module
from hybridize.modeling.common import causal_conv1d
from hybridize.modeling.mamba2 import (
    Mamba2Mixer,
    Mamba2MixerConfig,
    mamba2_scan_chunked,
    mamba2_scan_ref,
    mamba2_step,
    mamba2_step_grouped_,
)

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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_in_place_step_equals_the_step_on_repeated_heads(dtype):
    g, r = 2, 3  # 2 groups of 3 heads: x and B are shared inside a group
    x, dt, A, B, C, D, state = _inputs(1, dtype, h=g * r)
    x_g, B_g = x[:, 0, ::r], B[:, 0, ::r]  # one x and B per group ...
    x_h, B_h = x_g.repeat_interleave(r, 1), B_g.repeat_interleave(r, 1)  # ... repeated to its heads
    expected_state, expected = mamba2_step(state, x_h, dt[:, 0], A, B_h, C[:, 0], D)
    grouped = state.clone().view(2, g, r, *state.shape[2:])
    y = mamba2_step_grouped_(
        grouped,
        x_g[:, :, None],
        dt[:, 0].view(2, g, r),
        A.view(g, r),
        B_g[:, :, None],
        C[:, 0].unflatten(1, (g, r)),
        D.view(g, r),
    )
    torch.testing.assert_close(y.flatten(1, 2), expected, **TOLERANCES[dtype])
    torch.testing.assert_close(grouped.flatten(1, 2), expected_state, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_decode_step_equals_the_generic_path(monkeypatch, dtype):
    """Many one-token steps after a prefill, batch 2 with the first row left-padded: `_step` (conv as a
    multiply-and-sum over the rolling state, grouped heads, in-place states) gives the logits and states of the
    generic path (causal_conv1d, repeated heads) and of one full forward."""
    model = tiny_hybrid(["mamba2", "attention", "mamba2", "mamba2"], dtype, {"mamba2": {"chunk_size": 8}})
    ids = torch.randint(1, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    calls = count_steps(monkeypatch, Mamba2Mixer)
    fast, fast_cache = decode_one_by_one(model, ids, mask, prefill=9)
    assert len(calls) == 3 * 21  # every decode step of every Mamba2 layer took the fast path
    monkeypatch.setattr(Mamba2Mixer, "_can_step", lambda *a: False)
    generic, generic_cache = decode_one_by_one(model, ids, mask, prefill=9)
    torch.testing.assert_close(fast, generic, **TOLERANCES[dtype])
    for i in (0, 2, 3):
        for name in ("conv_states", "recurrent_states"):
            a, b = getattr(fast_cache.layers[i], name)[0], getattr(generic_cache.layers[i], name)[0]
            torch.testing.assert_close(a, b, **TOLERANCES[dtype])
    full = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(fast[1], full[1], **TOLERANCES[dtype])  # the unpadded row, against one forward
    torch.testing.assert_close(fast[0, 5:], full[0, 5:], **TOLERANCES[dtype])


@pytest.mark.parametrize("segment", [7, 8, 1])
def test_long_inputs_mixed_in_segments_equal_one_pass(monkeypatch, segment):
    """A prefill cut into segments (each continuing from the previous one's states; bounded memory) gives the
    logits and cache states of one pass, with a left-padded row and a segment edge inside the padding."""
    model = tiny_hybrid(["mamba2", "attention", "mamba2", "mamba2"], torch.float64, {"mamba2": {"chunk_size": 4}})
    ids = torch.randint(1, 128, (2, 23))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def prefill():
        out = model(ids, attention_mask=mask, position_ids=positions)
        return out.logits, out.cache

    whole, whole_cache = prefill()
    monkeypatch.setattr(mamba2_module, "PREFILL_SEGMENT", segment)
    parts, parts_cache = prefill()
    torch.testing.assert_close(parts, whole, **TOLERANCES[torch.float64])
    for i in (0, 2, 3):
        for name in ("conv_states", "recurrent_states"):
            a, b = getattr(parts_cache.layers[i], name)[0], getattr(whole_cache.layers[i], name)[0]
            torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


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
