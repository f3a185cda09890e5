"""The verify paths of speculative decoding (K + 1 tokens over a cache): Mamba2's one-chunk grouped scan and its
closed-form state after the kept tokens, and attention's grouped SDPA over the cache, against the generic paths;
with batch 2 and left padding, rollback to every token equal to a run that saw only the kept tokens."""

import pytest
import torch
from tiny import TOLERANCES, tiny_hybrid
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hybridize.modeling import RollbackCacheLayer
from hybridize.modeling import attention as attention_module
from hybridize.modeling.mamba2 import mamba2_chunk_grouped, mamba2_chunk_state, mamba2_scan_ref


def _grouped_inputs(length, dtype, b=2, g=2, r=3, p=8, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    x, B, C = rand(b, length, g, p), rand(b, length, g, n), rand(b, length, g, r, n)
    dt = torch.rand(b, length, g, r, generator=gen, dtype=dtype) * 0.5
    A = -torch.rand(g, r, generator=gen, dtype=dtype) * 4
    return x, dt, A, B, C, rand(g, r), rand(b, g, r, p, n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 2, 5, 13])
def test_grouped_chunk_and_its_states_equal_the_reference(dtype, length):
    x, dt, A, B, C, D, state = _grouped_inputs(length, dtype)
    b, _, g, r, _ = C.shape
    heads = lambda t: t.repeat_interleave(r, dim=2)  # noqa: E731  GQA: (b, l, g, ·) -> (b, l, h, ·)
    ref_args = (heads(x), dt.flatten(2), A.flatten(), heads(B), C.flatten(2, 3), D.flatten())
    y_ref, _ = mamba2_scan_ref(*ref_args, state.flatten(1, 2))
    y = mamba2_chunk_grouped(x, dt, A, B, C, D, state)
    torch.testing.assert_close(y.flatten(2, 3), y_ref, **TOLERANCES[dtype])
    for kept in range(1, length + 1):
        _, expected = mamba2_scan_ref(*(t[:, :kept] if t.dim() > 2 else t for t in ref_args), state.flatten(1, 2))
        got = mamba2_chunk_state(x[:, :kept], dt[:, :kept], A, B[:, :kept], state)
        torch.testing.assert_close(got.flatten(1, 2), expected, **TOLERANCES[dtype])


def _caches_close(a, b, **tol):
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        if hasattr(x, "recurrent_states"):
            torch.testing.assert_close(x.conv_states[0], y.conv_states[0], **tol, msg=f"layer {i} conv")
            torch.testing.assert_close(x.recurrent_states[0], y.recurrent_states[0], **tol, msg=f"layer {i} ssm")
        else:
            torch.testing.assert_close(x.keys, y.keys, **tol, msg=f"layer {i} keys")
            torch.testing.assert_close(x.values, y.values, **tol, msg=f"layer {i} values")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_verify_with_padding_equals_the_generic_path_and_rolls_back(monkeypatch, dtype):
    """Batch 2, the first row left-padded: 5 tokens verified over the cache (Mamba2's grouped one-chunk scan,
    attention's grouped SDPA) give the generic path's logits, and keeping any prefix leaves the caches of a run that
    only saw it."""
    model = tiny_hybrid(["mamba2", "attention", "mamba2", "attention"], dtype, {"mamba2": {"chunk_size": 8}})
    ids = torch.randint(1, 128, (2, 14))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    grouped, sdpa_grouped = [], attention_module.sdpa_grouped
    monkeypatch.setattr(attention_module, "sdpa_grouped", lambda *a: grouped.append(1) or sdpa_grouped(*a))

    def prefill():
        return model(ids[:, :9], attention_mask=mask[:, :9], position_ids=positions[:, :9]).cache

    def run(cache, end):  # tokens 9 .. end - 1 over the cache
        span = slice(9, end)
        return model(ids[:, span], attention_mask=mask[:, :end], position_ids=positions[:, span], cache=cache).logits

    with torch.no_grad():
        generic = run(prefill(), 14)
        for keep in range(6):
            cache = prefill()
            for layer in cache.layers:
                if isinstance(layer, RollbackCacheLayer):
                    layer.begin_verify()
            grouped.clear()
            verified = run(cache, 14)
            assert len(grouped) == 2  # both attention layers took the grouped SDPA
            torch.testing.assert_close(verified, generic, **TOLERANCES[dtype])
            for layer in cache.layers:
                if isinstance(layer, RollbackCacheLayer):
                    layer.commit(keep)
                else:
                    layer.crop(keep - 5)
            clean = prefill()
            if keep:
                run(clean, 9 + keep)
            _caches_close(cache, clean, **TOLERANCES[dtype])


@pytest.mark.parametrize("length", [2, 5])
def test_grouped_sdpa_equals_transformers_sdpa(length):
    """A few queries over a cache with a padding-and-causal mask: the same output as transformers' sdpa path, which
    repeats the keys and values for each query head."""
    torch.manual_seed(0)
    b, kv, r, n, d = 2, 3, 3, 20, 16
    query = torch.randn(b, kv * r, length, d, dtype=torch.float64)
    key, value = torch.randn(b, kv, n, d, dtype=torch.float64), torch.randn(b, kv, n, d, dtype=torch.float64)
    mask = torch.ones(length, n, dtype=torch.bool).tril(n - length)[None, None].repeat(b, 1, 1, 1)
    mask[0, :, :, :4] = False  # padding
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = r, True, False
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(attention_module.sdpa_grouped(query, key, value, mask, 0.3), expected)
