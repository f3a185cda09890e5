"""NHA's own identities: chunked == token-by-token reference == step-by-step decode, the degenerate windows, the
cache's constant size, and the settings' errors. The MIXERS contract runs NHA at its default window; the model-level
checks below repeat it at small windows, so that the slots are actually used."""

import pytest
import torch
from tiny import NHA_SETTINGS, TINY, TOLERANCES, tiny_hybrid
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.evaluate.bench import cache_bytes
from hybridize.modeling import HybridConfig, HybridForCausalLM
from hybridize.modeling.nha import NHACacheLayer, NHAMixerConfig, nha_chunked, nha_initial_state, nha_ref, nha_step

CHUNK = 8


def _inputs(length, dtype, b=2, h=4, n=2, K=6, M=5, seed=0):
    """q, k, v, q_rot, k_rot and log forget gates, heads first; the "rotated" ones are just other random tensors."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    g = torch.nn.functional.logsigmoid(3 * randn(b, n, length, M)) / 2  # strong and weak gates
    return randn(b, h, length, K), randn(b, n, length, K), randn(b, n, length, K), randn(b, h, length, K), \
        randn(b, n, length, K), g  # fmt: skip


def _padding(length, b=2, pad=3):
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[-1, : min(pad, length)] = False  # left padding in the last sequence
    return mask


def _assert_states_close(a, b, **tol):
    for x, y in zip(a, b):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, **tol)
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("window", [0, 1, 5, 64])
@pytest.mark.parametrize("mask_empty_slots", [True, False])
def test_chunked_equals_reference(dtype, length, window, mask_empty_slots):
    q, k, v, q_rot, k_rot, g = _inputs(length, dtype)
    mask = _padding(length)
    options = dict(window=window, scale=0.4, mask_empty_slots=mask_empty_slots)
    o_ref, s_ref = nha_ref(q, k, v, q_rot, k_rot, g, mask, **options)
    for chunk_size in (CHUNK, 3):
        o, s = nha_chunked(q, k, v, q_rot, k_rot, g, mask, chunk_size=chunk_size, **options)
        torch.testing.assert_close(o, o_ref, **TOLERANCES[dtype])
        _assert_states_close(s, s_ref, **TOLERANCES[dtype])


def test_groups_of_chunks_change_nothing():
    """Chunks are processed in groups of ~1024 queries: chunk_size 1 makes 1100 chunks, two groups."""
    q, k, v, q_rot, k_rot, g = _inputs(1100, torch.float64, b=1, h=2, n=1, K=4, M=3)
    mask = torch.ones(1, 1100, dtype=torch.bool)
    mask[0, :7] = False
    o1, s1 = nha_chunked(q, k, v, q_rot, k_rot, g, mask, window=5, scale=0.4, chunk_size=1)
    o8, s8 = nha_chunked(q, k, v, q_rot, k_rot, g, mask, window=5, scale=0.4, chunk_size=8)
    torch.testing.assert_close(o1, o8, **TOLERANCES[torch.float64])
    _assert_states_close(s1, s8, **TOLERANCES[torch.float64])


def test_state_with_a_longer_window_is_refused():
    q, k, v, q_rot, k_rot, g = _inputs(9, torch.float64)
    _, state = nha_chunked(q, k, v, q_rot, k_rot, g, window=6, scale=0.4)
    with pytest.raises(ValueError, match="holds 5 window tokens but window=3 keeps at most 2"):
        nha_chunked(q, k, v, q_rot, k_rot, g, None, state, window=3, scale=0.4)


@pytest.mark.parametrize("window", [0, 1, 5, 40])
@pytest.mark.parametrize("split", [1, 4, 11])
def test_prefill_then_steps_and_two_prefills_equal_one(window, split):
    q, k, v, q_rot, k_rot, g = _inputs(30, torch.float64)
    mask = _padding(30, pad=6)
    options = dict(window=window, scale=0.4)
    o_full, s_full = nha_chunked(q, k, v, q_rot, k_rot, g, mask, chunk_size=CHUNK, **options)
    part = lambda t, a, b: t[:, :, a:b]
    o, state = nha_chunked(*(part(t, 0, split) for t in (q, k, v, q_rot, k_rot, g)), mask[:, :split],
                           chunk_size=CHUNK, **options)  # fmt: skip
    outputs = [o]
    for t in range(split, 30):  # decode
        o, state = nha_step(*(part(x, t, t + 1) for x in (q, k, v, q_rot, k_rot, g)), mask[:, t : t + 1], state,
                            **options)  # fmt: skip
        outputs.append(o)
    torch.testing.assert_close(torch.cat(outputs, 2), o_full, **TOLERANCES[torch.float64])
    _assert_states_close(state, s_full, **TOLERANCES[torch.float64])
    first, state = nha_chunked(*(part(t, 0, split) for t in (q, k, v, q_rot, k_rot, g)), mask[:, :split],
                               chunk_size=CHUNK, **options)  # fmt: skip
    second, state = nha_chunked(*(part(t, split, 30) for t in (q, k, v, q_rot, k_rot, g)), mask[:, split:], state,
                                chunk_size=CHUNK, **options)  # fmt: skip
    torch.testing.assert_close(torch.cat([first, second], 2), o_full, **TOLERANCES[torch.float64])


def _softmax_attention(q_rot, k_rot, v, scale, null_logits=0):
    """Causal softmax attention with GQA, plus `null_logits` extra zero-logit, zero-value entries per query."""
    G = q_rot.shape[1] // k_rot.shape[1]
    k, v = k_rot.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = scale * q_rot @ k.transpose(-1, -2)
    scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), -torch.inf)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    null = null_logits * torch.exp(-scores.amax(-1, keepdim=True))
    return (weights / (weights.sum(-1, keepdim=True) + null)) @ v


def test_window_covering_the_sequence_is_softmax_attention():
    """w >= length: nothing reaches the slots. With empty slots masked, the layer is softmax attention; unmasked, the
    M empty slots are M zero-value sinks in the denominator (the paper's layer)."""
    q, k, v, q_rot, k_rot, g = _inputs(17, torch.float64)
    o, _ = nha_chunked(q, k, v, q_rot, k_rot, g, window=17, scale=0.4, chunk_size=CHUNK)
    torch.testing.assert_close(o, _softmax_attention(q_rot, k_rot, v, 0.4))
    o, _ = nha_chunked(q, k, v, q_rot, k_rot, g, window=17, scale=0.4, mask_empty_slots=False, chunk_size=CHUNK)
    torch.testing.assert_close(o, _softmax_attention(q_rot, k_rot, v, 0.4, null_logits=g.shape[-1]))


def test_one_slot_by_hand():
    """One head, K = V = M = 1, window 1: token t attends to itself and one slot holding the older tokens."""
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    q = k = v = q_rot = k_rot = x.view(1, 1, 4, 1)
    g = torch.tensor([-0.5, -1.0, -0.2, -0.7], dtype=torch.float64).view(1, 1, 4, 1)
    hk = hv = 0.0
    expected = []
    for t in range(4):
        if t >= 1:  # token t - 1 leaves the window of 1
            a = torch.exp(g[0, 0, t - 1, 0])
            hk, hv = a * hk + (1 - a) * x[t - 1], a * hv + (1 - a) * x[t - 1]
        logits = torch.stack([x[t] * hk, x[t] * x[t]]) if t >= 1 else torch.stack([x[t] * x[t]])
        p = torch.softmax(logits, 0)
        expected.append(p[0] * hv + p[1] * x[t] if t >= 1 else x[t])
    o, _ = nha_ref(q, k, v, q_rot, k_rot, g, window=1, scale=1.0)
    torch.testing.assert_close(o.flatten(), torch.stack(expected))
    o, _ = nha_chunked(q, k, v, q_rot, k_rot, g, window=1, scale=1.0, chunk_size=3)
    torch.testing.assert_close(o.flatten(), torch.stack(expected))


def test_slots_use_raw_and_window_rotated_queries_and_keys():
    """Changing the rotated q/k moves only the window logits; changing the raw ones moves only the slots."""
    q, k, v, q_rot, k_rot, g = _inputs(12, torch.float64)
    o, _ = nha_chunked(q, k, v, q_rot, k_rot, g, window=12, scale=0.4, chunk_size=CHUNK)
    o_raw, _ = nha_chunked(q + 1, k - 1, v, q_rot, k_rot, g, window=12, scale=0.4, chunk_size=CHUNK)
    torch.testing.assert_close(o_raw, o)  # no slot is ever filled
    o_small, _ = nha_chunked(q, k, v, q_rot, k_rot, g, window=3, scale=0.4, chunk_size=CHUNK)
    o_small_raw, _ = nha_chunked(q + 1, k - 1, v, q_rot, k_rot, g, window=3, scale=0.4, chunk_size=CHUNK)
    torch.testing.assert_close(o_small_raw[:, :, :3], o_small[:, :, :3])  # before any token leaves the window
    assert not torch.allclose(o_small_raw[:, :, 3:], o_small[:, :, 3:])


def test_gradients_of_chunked_equal_reference():
    q, k, v, q_rot, k_rot, g = (t.requires_grad_() for t in _inputs(13, torch.float64))
    weights = torch.randn(2, 4, 13, 6, dtype=torch.float64)
    grads = []
    for fn, extra in ((nha_ref, {}), (nha_chunked, {"chunk_size": 4})):
        o, _ = fn(q, k, v, q_rot, k_rot, g, _padding(13), window=3, scale=0.4, **extra)
        grads.append(torch.autograd.grad((o * weights).sum(), (q, k, v, q_rot, k_rot, g)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strong_gates_stay_finite(dtype):
    """Decays of e^-hundreds per token: the chunked form only exponentiates differences <= 0, so nothing overflows.
    (In float32 the cumulative sums of such gates lose digits, so there it is only checked to be finite.)"""
    q, k, v, q_rot, k_rot, g = _inputs(70, dtype)
    g = g * 200
    o, _ = nha_chunked(q, k, v, q_rot, k_rot, g, window=2, scale=0.4, chunk_size=64)
    assert torch.isfinite(o).all()
    if dtype == torch.float64:
        o_ref, _ = nha_ref(q, k, v, q_rot, k_rot, g, window=2, scale=0.4)
        torch.testing.assert_close(o, o_ref, **TOLERANCES[dtype])


# The model: the MIXERS contract at windows that the tiny lengths cross

SETTINGS = NHA_SETTINGS


def _tiny_nha(settings, layers=("nha", "attention", "nha", "nha"), dtype=torch.float32):
    return tiny_hybrid(layers, dtype, {"nha": settings})


@pytest.mark.parametrize("settings", SETTINGS[:3])
def test_model_padding_generate_and_ref_impl(settings):
    model = _tiny_nha(settings, dtype=torch.float64)
    ids = torch.randint(1, 128, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 4:]
    torch.testing.assert_close(out, model(ids).logits, rtol=1e-9, atol=1e-9)

    ref = _tiny_nha({**settings, "impl": "ref"}, dtype=torch.float64)
    ref.load_state_dict(model.state_dict())
    batch = torch.randint(0, 128, (2, 19))
    torch.testing.assert_close(ref(batch).logits, model(batch).logits, rtol=1e-9, atol=1e-9)

    model = model.float()
    prompt = torch.randint(0, 128, (1, 9))
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False)
    greedy = prompt
    for _ in range(10):
        greedy = torch.cat([greedy, model(greedy).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, greedy)


def test_model_saves_loads_and_trains(tmp_path):
    model = _tiny_nha(SETTINGS[0])
    hybridize.save(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.mixers == {"nha": SETTINGS[0]}
    ids = torch.randint(0, 128, (2, 17))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    model(ids, labels=ids).loss.backward()
    g_grad = model.model.layers[0].mixer.g_proj.weight.grad
    assert torch.isfinite(g_grad).all() and g_grad.abs().sum() > 0  # the slots are on the path


@pytest.mark.parametrize("window", [0, 6])
def test_cache_has_constant_size_once_past_the_window(window):
    model = _tiny_nha({"window": window, "slots": 8}, layers=["nha"] * 4)
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids[:, :3], use_cache=True)
    cache, sizes = out.cache, []
    for t in range(3, 16):
        model(ids[:, t : t + 1], cache=cache, use_cache=True)
        sizes.append(cache_bytes(cache))
    layer = cache.layers[0]
    assert isinstance(layer, NHACacheLayer) and layer.keys.shape[2] == max(window - 1, 0)
    assert len(set(sizes[max(window - 4, 0) :])) == 1, sizes  # t >= window - 1 tokens seen: nothing grows
    prefilled = model(ids, use_cache=True).cache  # a long prefill keeps the same amount
    assert cache_bytes(prefilled) == sizes[-1]


def test_cache_layer_batch_operations_and_reset():
    model = _tiny_nha({"window": 3, "slots": 4}, layers=["nha"] * 4)
    ids = torch.randint(0, 128, (3, 10))
    cache = model(ids, use_cache=True).cache
    layer = cache.layers[2]
    hk = layer.get_state().hk.clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    torch.testing.assert_close(layer.get_state().hk, hk[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.get_state().hk, hk[[0]])
    cache.batch_repeat_interleave(2)
    assert layer.get_state().keys.shape[0] == 2
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        layer.crop(-1)
    cache.reset()
    assert layer.get_state() is None and cache.get_seq_length() == 0


def test_mixed_with_attention_the_causal_mask_has_full_length():
    """An NHA cache layer first in the model must not shorten the causal mask of the attention layers after it."""
    model = _tiny_nha({"window": 2, "slots": 4}, layers=["nha", "attention", "nha", "attention"], dtype=torch.float64)
    ids = torch.randint(0, 128, (1, 20))
    cache = model(ids[:, :15], use_cache=True).cache
    assert cache.get_mask_sizes(5, 0) == (20, 0)
    second = model(ids[:, 15:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(second, model(ids).logits[:, 15:], rtol=1e-9, atol=1e-9)


def test_initial_state_is_empty():
    state = nha_initial_state(2, 3, 4, 5, dtype=torch.float32)
    assert state.hk.shape == (2, 3, 4, 5) and state.hv.shape == (2, 3, 5, 4) and state.keys.shape == (2, 3, 0, 4)
    assert not state.num_absorbed.any()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"slots": 0}, "slots must be at least 1, got 0"),
        ({"window": -1}, "window must be >= 0"),
        ({"gate_normalizer": 0.0}, "gate_normalizer must be positive"),
        ({"chunk_size": 0}, "chunk_size must be at least 1"),
        ({"impl": "triton"}, "impl must be 'auto' or 'ref'"),
    ],
)
def test_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        NHAMixerConfig(**settings)


def test_unknown_setting_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown nha settings \['sinks'\]; known: .*'slots'"):
        HybridForCausalLM(HybridConfig(**TINY, mixer_types=["nha"] * 4, mixers={"nha": {"sinks": 4}}))
