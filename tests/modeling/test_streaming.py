"""The streaming mixer's own identities: reference equals fast path, degenerate windows equal full attention, the
explicit sink + window mask, bounded caches, the lazy ratio against brute force, and LightTransfer-Test's dynamic
mode (exactly P full layers, peak P + 1, same decoding as the static model with that layer set)."""

import math

import pytest
import torch
from tiny import TINY, TOLERANCES

from hybridize.modeling import HybridCache, HybridConfig, HybridForCausalLM
from hybridize.modeling.streaming import (
    StreamingCacheLayer,
    StreamingMixer,
    StreamingMixerConfig,
    lazy_ratio,
    streaming_attention_chunked,
    streaming_attention_ref,
)


def _hybrid(mixer_types, dtype=torch.float64, **settings) -> HybridForCausalLM:
    torch.manual_seed(0)
    config = HybridConfig(
        **{**TINY, "max_position_embeddings": 4096}, mixer_types=mixer_types, mixers={"streaming": settings}
    )
    return HybridForCausalLM(config).to(dtype).eval()


def _same_weights(model: HybridForCausalLM, mixer_types, **settings) -> HybridForCausalLM:
    other = _hybrid(mixer_types, model.dtype, **settings)
    other.load_state_dict(model.state_dict())
    return other


def _indices(batch, length, pad=0, offset=0):
    idx = torch.arange(length).expand(batch, length) - pad + offset
    return idx.masked_fill(idx < offset, -1) if pad else idx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "lq, lk, sinks, window, block",
    [(1, 1, 4, 8, 4), (7, 7, 2, 3, 4), (33, 33, 4, 8, 8), (13, 40, 3, 9, 5), (1, 40, 0, 16, 4), (20, 20, 4, 64, 7)],
)
def test_ref_equals_chunked(dtype, lq, lk, sinks, window, block):
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, lq, 8, dtype=dtype),
        torch.randn(2, 2, lk, 8, dtype=dtype),
        torch.randn(2, 2, lk, 8, dtype=dtype),
    )
    k_idx = torch.stack([_indices(1, lk)[0], _indices(1, lk, pad=3)[0]])  # the second sequence is left-padded
    q_idx = k_idx[:, lk - lq :]
    kwargs = {"sinks": sinks, "window": window, "scaling": 8**-0.5}
    ref = streaming_attention_ref(q, k, v, q_idx, k_idx, **kwargs)
    fast = streaming_attention_chunked(q, k, v, q_idx, k_idx, block_size=block, **kwargs)
    torch.testing.assert_close(fast, ref, **TOLERANCES[dtype])


def test_ref_is_softmax_over_the_sink_and_window_mask():
    """Query i sees key j iff j <= i and (j < sinks or i - j < window), checked entry by entry against a loop."""
    torch.manual_seed(0)
    sinks, window, length = 2, 3, 9
    q, k, v = (torch.randn(1, 1, length, 4, dtype=torch.float64) for _ in range(3))
    idx = _indices(1, length)
    out = streaming_attention_ref(q, k, v, idx, idx, sinks=sinks, window=window, scaling=0.5)
    for i in range(length):
        seen = [j for j in range(length) if j <= i and (j < sinks or i - j < window)]
        weights = torch.softmax(torch.stack([q[0, 0, i] @ k[0, 0, j] * 0.5 for j in seen]), 0)
        expected = sum(w * v[0, 0, j] for w, j in zip(weights, seen))
        torch.testing.assert_close(out[0, i, 0], expected)
    assert len([j for j in range(length) if (j < sinks or length - 1 - j < window)]) == sinks + window


def test_window_covering_the_sequence_is_full_attention():
    model = _hybrid(["streaming", "attention", "streaming", "streaming"], sinks=4, window=64)
    full = _same_weights(model, ["attention"] * 4)
    ids = torch.randint(0, 128, (2, 64))
    torch.testing.assert_close(model(ids).logits, full(ids).logits, rtol=1e-10, atol=1e-10)


def test_streaming_equals_eager_attention_with_the_same_mask():
    """The streaming model equals the source attention run with transformers' eager attention and an explicit
    additive sink + window mask."""
    sinks, window, length = 3, 7, 30
    model = _hybrid(["streaming"] * 4, sinks=sinks, window=window, block_size=8)
    full = _same_weights(model, ["attention"] * 4)
    full.config._attn_implementation = "eager"
    i, j = torch.arange(length)[:, None], torch.arange(length)[None]
    visible = (j <= i) & ((j < sinks) | (i - j < window))
    mask = torch.zeros(length, length, dtype=torch.float64).masked_fill(~visible, -torch.inf)[None, None]
    ids = torch.randint(0, 128, (1, length))
    hidden = full.model.embed_tokens(ids)
    position_embeddings = full.model.rotary_emb(hidden, position_ids=torch.arange(length)[None])
    for layer in full.model.layers:  # the decoder layer by hand, with our mask in place of the causal one
        hidden = layer(hidden, position_embeddings=position_embeddings, causal_mask=mask, padding_mask=None)
    expected = full.lm_head(full.model.norm(hidden))
    # eager attention takes its softmax in float32 even for float64 inputs: float32 tolerances
    torch.testing.assert_close(model(ids, use_cache=False).logits, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full(ids).logits, expected)  # the window really cuts something


def test_cached_decode_equals_full_forward_and_the_cache_stays_bounded():
    sinks, window = 4, 16
    model = _hybrid(["streaming", "attention", "streaming", "streaming"], sinks=sinks, window=window, block_size=8)
    ids = torch.randint(0, 128, (2, 90))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :37], use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(37, 90):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        for i in (0, 2, 3):
            layer = cache.layers[i]
            assert isinstance(layer, StreamingCacheLayer)
            assert layer.keys.shape[2] <= sinks + window and layer.token_indices.shape[1] == layer.keys.shape[2]
            assert (layer.keys.shape[2] == sinks + window) == (t >= sinks + window - 1)  # full, never more
            assert cache.get_seq_length() == t + 1
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    assert cache.layers[1].keys.shape[2] == 90  # the attention layer keeps everything


def test_left_padded_batch_generates_like_each_sequence_alone():
    model = _hybrid(["streaming"] * 4, torch.float32, sinks=2, window=5, block_size=3)
    long, short = torch.randint(1, 128, (1, 14)), torch.randint(1, 128, (1, 9))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = (torch.arange(14)[None] >= torch.tensor([[0], [5]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    alone = [model.generate(x, max_new_tokens=12, do_sample=False) for x in (long, short)]
    assert torch.equal(out[0, 14:], alone[0][0, 14:]) and torch.equal(out[1, 14:], alone[1][0, 9:])


def test_lazy_ratio_against_brute_force():
    """The attention mass of the last queries on sinks ∪ window, from explicit softmax probabilities, with GQA."""
    torch.manual_seed(0)
    sinks, window, length, w = 2, 5, 23, 4
    q, k = torch.randn(1, 4, length, 8, dtype=torch.float64), torch.randn(1, 2, length, 8, dtype=torch.float64)
    probs = []
    for h in range(4):
        scores = q[0, h] @ k[0, h // 2].T * 8**-0.5
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -torch.inf)
        p = torch.softmax(scores, -1)
        for i in range(length - w, length):
            probs.append(sum(p[i, j] for j in range(i + 1) if j < sinks or i - j < window))
    expected = torch.stack(probs).mean()
    idx = _indices(1, length)
    got = lazy_ratio(q[:, :, -w:], k, idx[:, -w:], idx, sinks=sinks, window=window, scaling=8**-0.5, block_size=6)
    torch.testing.assert_close(got, expected[None])
    assert 0 < got.item() < 1


def test_lazy_ratio_is_exactly_one_within_sinks_plus_window():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 30, 8)
    idx = _indices(1, 30)
    assert lazy_ratio(q, k, idx[:, -6:], idx, sinks=4, window=26, scaling=0.3, block_size=7).item() == 1.0


def _full_caches(cache) -> int:
    return sum(
        isinstance(layer, StreamingCacheLayer) and layer.is_initialized and not layer.bounded for layer in cache.layers
    )


@pytest.mark.parametrize("full_layers", [0, 2, 4])
def test_dynamic_mode_keeps_p_full_layers_and_decodes_like_the_static_model(full_layers, monkeypatch):
    sinks, window = 2, 8
    model = _hybrid(["streaming"] * 4, sinks=sinks, window=window, w_last=4, dynamic_full_layers=full_layers)
    ids = torch.randint(0, 128, (2, 60))
    prompt, rest = ids[:, :40], ids[:, 40:]

    peak = []
    enqueue = StreamingMixer._enqueue

    def watched(self, cache, *args):
        enqueue(self, cache, *args)
        peak.append(_full_caches(cache))
        assert max(peak) <= full_layers + 1

    monkeypatch.setattr(StreamingMixer, "_enqueue", watched)
    full = _same_weights(model, ["attention"] * 4)
    out = model(prompt, use_cache=True)
    torch.testing.assert_close(out.logits, full(prompt).logits, rtol=1e-10, atol=1e-10)  # prefill is exact
    cache = out.cache
    lazy = [i for i, layer in enumerate(cache.layers) if layer.bounded]
    assert len(lazy) == 4 - full_layers and _full_caches(cache) == full_layers
    ratios = {i: cache.layers[i].lazy_ratio for i in range(4)}
    assert all(ratios[i] >= ratios[j] for i in lazy for j in set(range(4)) - set(lazy))  # the laziest were popped
    steps = [model(rest[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(rest.shape[1])]

    # the static model with that layer set, decoding from the full prefill's caches (the lazy ones truncated)
    static = _same_weights(
        model, ["streaming" if i in lazy else "attention" for i in range(4)], sinks=sinks, window=window
    )
    static_cache = HybridCache(static.config)
    full_cache = full(prompt, use_cache=True).cache
    for i in range(4):
        static_cache.update(full_cache.layers[i].keys, full_cache.layers[i].values, i)
    static_cache.num_seen_tokens = prompt.shape[1]
    expected = [static(rest[:, t : t + 1], cache=static_cache, use_cache=True).logits for t in range(rest.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), torch.cat(expected, 1), rtol=1e-10, atol=1e-10)
    if 0 < full_layers < 4:
        assert not torch.allclose(torch.cat(steps, 1), full(ids).logits[:, 40:])


def test_dynamic_mode_generates():
    model = _hybrid(
        ["streaming", "attention", "streaming", "streaming"],
        torch.float32,
        sinks=2,
        window=6,
        w_last=4,
        dynamic_full_layers=1,
    )
    prompt = torch.randint(0, 128, (1, 20))
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False)
    out = model(prompt, use_cache=True)
    cache, next_id = out.cache, out.logits[:, -1:].argmax(-1)
    ids = torch.cat([prompt, next_id], 1)
    for _ in range(9):
        next_id = model(next_id, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, next_id], 1)
    assert torch.equal(generated, ids)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="window"):
        StreamingMixerConfig(window=0)
    with pytest.raises(ValueError, match="sinks"):
        StreamingMixerConfig(sinks=-1)
    with pytest.raises(ValueError, match="unknown streaming settings"):
        _hybrid(["streaming"] * 4, windw=3)
    assert math.isclose(StreamingMixerConfig().sinks + StreamingMixerConfig().window, 1024)
