"""The streaming mixer's one-token decode path (`StreamingMixer._step`, entries written in place by
`StreamingCacheLayer.decode_update`) against the generic path (`update` on new tensors, `streaming_attention_chunked`):
the same logits and cache entries over many steps past sinks + window, with left padding (appended with a mask, then
the generic path while a full cache holds padding, then the fast path again), in static and dynamic mode; the same
`generate()` output (greedy and beam search); speculative rollback between fast steps; and the buffers' bookkeeping."""

import pytest
import torch
from tiny import TINY, TOLERANCES, count_steps, decode_one_by_one

from hybridize.generate.speculative import _Decoder
from hybridize.modeling import HybridConfig, HybridForCausalLM
from hybridize.modeling.streaming import StreamingCacheLayer, StreamingMixer

LAYERS = ["streaming", "attention", "streaming", "streaming"]
SETTINGS = [
    {"sinks": 2, "window": 5, "block_size": 4},
    {"sinks": 0, "window": 4, "block_size": 4},
    {"sinks": 2, "window": 5, "w_last": 4, "dynamic_full_layers": 1},  # one layer keeps a full cache
]


def _hybrid(settings, dtype=torch.float64) -> HybridForCausalLM:
    torch.manual_seed(0)
    config = HybridConfig(**TINY, mixer_types=LAYERS, mixers={"streaming": settings})
    return HybridForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("settings", SETTINGS)
def test_fast_decode_step_equals_the_generic_path(monkeypatch, dtype, settings):
    """30 one-token steps after a 6-token prefill, batch 2 with the second row left-padded by 3, with decode buffers
    that grow from one position and keep one or two beyond sinks + window (so they move often): the fast path gives
    the generic path's logits and cache entries, and one full forward's logits."""
    monkeypatch.setattr(StreamingCacheLayer, "min_slack", 1)
    model = _hybrid(settings, dtype)
    ids = torch.randint(1, 128, (2, 36))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    calls = count_steps(monkeypatch, StreamingMixer)
    fast, fast_cache = decode_one_by_one(model, ids, mask, prefill=6)
    # a full cache holding the padded row's padding takes the generic path (it evicts unevenly), 3 steps at most
    assert 3 * 30 - 3 * 3 <= len(calls) <= 3 * 30
    if settings == SETTINGS[0]:  # the prefill leaves padding: fast (masked), then generic, then fast again
        assert len(calls) < 3 * 30
    monkeypatch.setattr(StreamingMixer, "_can_step", lambda *args: False)
    generic, generic_cache = decode_one_by_one(model, ids, mask, prefill=6)
    torch.testing.assert_close(fast, generic, **TOLERANCES[dtype])
    for i in (0, 2, 3):
        a, b = fast_cache.layers[i], generic_cache.layers[i]
        assert a.buffers is not None and b.buffers is None and a.bounded == b.bounded
        torch.testing.assert_close(a.keys, b.keys, **TOLERANCES[dtype])
        torch.testing.assert_close(a.values, b.values, **TOLERANCES[dtype])
        for name in ("token_indices", "update_indices", "num_tokens", "cumulative_length"):
            assert torch.equal(torch.as_tensor(getattr(a, name)), torch.as_tensor(getattr(b, name))), name
    if settings.get("dynamic_full_layers") is None:  # dynamic mode is not the full forward's function
        full = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        torch.testing.assert_close(fast[0], full[0], **TOLERANCES[dtype])  # the unpadded row, against one forward
        torch.testing.assert_close(fast[1, 3:], full[1, 3:], **TOLERANCES[dtype])


@pytest.mark.parametrize("settings", SETTINGS)
def test_generate_is_the_same_with_and_without_the_fast_path(monkeypatch, settings):
    model = _hybrid(settings, torch.float32)
    batch = torch.randint(1, 128, (2, 11))
    batch[0, :4] = 0
    mask = (batch != 0).long()
    options = {"attention_mask": mask, "max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    calls = count_steps(monkeypatch, StreamingMixer)
    greedy, beams = model.generate(batch, **options), model.generate(batch, num_beams=3, **options)
    assert len(calls) > 0
    monkeypatch.setattr(StreamingMixer, "_can_step", lambda *args: False)
    assert torch.equal(greedy, model.generate(batch, **options))
    assert torch.equal(beams, model.generate(batch, num_beams=3, **options))  # reorder_cache between fast steps


def test_rollback_between_fast_steps():
    """Speculative decoding's pattern with fast steps around a verification: the rolled-back cache continues exactly
    as one that never saw the rejected tokens."""
    model = _hybrid({"sinks": 2, "window": 8})  # rolls back up to 7
    ids = torch.randint(3, 128, (30,)).tolist()
    with torch.no_grad():
        rolled, clean = _Decoder(model), _Decoder(model)
        for decoder in (rolled, clean):
            decoder.forward(ids[:9])
            for token in ids[9:12]:  # fast steps, up to a full cache
                decoder.forward([token])
        rolled.begin()
        rolled.forward(ids[12:14])
        for token in ids[14:17]:  # verification: the generic path
            rolled.forward([token])
        rolled.commit(3)  # keeps ids[12:15]
        clean.forward(ids[12:15])
        for token in ids[15:30]:  # fast steps again, sliding
            torch.testing.assert_close(rolled.forward([token]), clean.forward([token]), rtol=1e-10, atol=1e-10)
    layer = rolled.cache.layers[0]
    assert layer.buffers is not None and layer.checkpoint is None


def test_full_cache_slides_in_place():
    """Once full, the layer's entries stay views of buffers that move once every `_slack()` steps, keep the sinks
    first and the window in order, and never exceed sinks + window; a batch change drops the buffers."""
    model = _hybrid({"sinks": 3, "window": 6}, torch.float32)
    ids = torch.randint(1, 128, (1, 160))
    with torch.no_grad():
        cache = model(ids[:, :20], use_cache=True).cache
        layer, storages = cache.layers[0], []
        for t in range(20, 150):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            storages.append(layer.buffers.keys.data_ptr())
            expected = torch.cat([torch.arange(3), torch.arange(t - 5, t + 1)])
            assert torch.equal(layer.token_indices[0], expected)
            assert layer.keys.data_ptr() == layer.buffers.keys[:, :, layer.buffers.start].data_ptr()
        assert layer._slack() == 64 and 2 <= len(set(storages)) <= 4  # 130 steps
        cache.batch_repeat_interleave(2)
        assert layer.buffers is None and layer.keys.shape[:3] == (2, 2, 9)
        model(ids[:, 150:151].expand(2, 1), cache=cache, use_cache=True)
        assert layer.buffers is not None and layer.keys.shape[2] == 9


@pytest.mark.parametrize("min_slack", [1, 3, 64])
@pytest.mark.parametrize("sinks, window", [(2, 6), (0, 4), (3, 1)])
@pytest.mark.parametrize("prefill", [1, 2, 5, 9])
def test_decode_update_equals_update(monkeypatch, min_slack, sinks, window, prefill):
    """The cache layer alone, from any prefill through the buffers' growth, a full cache and many slides: the decode
    update returns and keeps the entries the generic update does."""
    monkeypatch.setattr(StreamingCacheLayer, "min_slack", min_slack)
    fast, generic = StreamingCacheLayer(sinks, window), StreamingCacheLayer(sinks, window)
    keys, values = torch.randn(2, 2, prefill + 40, 3), torch.randn(2, 2, prefill + 40, 3)
    for layer in (fast, generic):
        layer.update(keys[:, :, :prefill], values[:, :, :prefill])
    for t in range(prefill, prefill + 40):
        assert fast.can_decode()
        k, v, real = fast.decode_update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        expected = generic.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        assert real is None and torch.equal(k, expected[0]) and torch.equal(v, expected[1])
        for name in ("keys", "values", "token_indices", "update_indices", "num_tokens", "cumulative_length"):
            assert torch.equal(torch.as_tensor(getattr(fast, name)), torch.as_tensor(getattr(generic, name))), name


def test_decode_needs_no_padding_once_full():
    layer = StreamingCacheLayer(sinks=1, window=3)
    keys = torch.randn(2, 1, 4, 2)
    layer.update(keys, keys, token_indices=torch.tensor([[0, 1, 2, 3], [-1, 0, 1, 2]]))
    assert not layer.can_decode()  # full, with padding: the second row would evict padding, the first a token
    layer = StreamingCacheLayer(sinks=1, window=3)
    layer.update(keys[:, :, :3], keys[:, :, :3], token_indices=torch.tensor([[0, 1, 2], [-1, 0, 1]]))
    assert layer.can_decode()  # not full: appending evicts nothing
    _, _, real = layer.decode_update(keys[:, :, :1], keys[:, :, :1])
    assert torch.equal(real, torch.tensor([[True, True, True, True], [False, True, True, True]]))
    assert torch.equal(layer.token_indices, torch.tensor([[0, 1, 2, 3], [-1, 0, 1, 2]]))
