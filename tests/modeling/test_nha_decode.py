"""NHA's one-token decode path (`NHAMixer._step`, state written in place into `NHADecodeBuffers`) against the generic
path (`nha_step` on new tensors): the same logits and states over many steps past the window, with left padding,
padding decode tokens and empty slots; the same `generate()` output (greedy and beam search); speculative rollback
between fast steps; and the cache's own bookkeeping (buffers moved rarely, dropped on any other change)."""

import pytest
import torch
from tiny import NHA_SETTINGS, TOLERANCES, count_steps, decode_one_by_one, tiny_hybrid

from hybridize.generate.speculative import _Decoder
from hybridize.modeling.nha import NHACacheLayer, NHAMixer

# Slots and window, slots only, a one-token window with the paper's unmasked empty slots
SETTINGS = NHA_SETTINGS[:3]
LAYERS = ("nha", "attention", "nha", "nha")


def _assert_states_close(a, b, **tol):
    for name, x, y in zip(a._fields, a, b):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, **tol, msg=name)
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("settings", SETTINGS)
def test_fast_decode_step_equals_the_generic_path(monkeypatch, dtype, settings):
    """25 one-token steps after a 5-token prefill, batch 2 with the first row left-padded by 7: its prefill and two
    decode tokens are padding, so the steps cross padding queries, empty slots, padding in the window and, with room
    for one token beyond the window, a move of the buffers at almost every step. The fast path gives the generic
    path's logits and states, and one full forward's logits."""
    monkeypatch.setattr(NHACacheLayer, "min_slack", 1)
    model = tiny_hybrid(LAYERS, dtype, {"nha": settings})
    ids = torch.randint(1, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    calls = count_steps(monkeypatch, NHAMixer)
    fast, fast_cache = decode_one_by_one(model, ids, mask, prefill=5)
    assert len(calls) == 3 * 25  # every decode step of every NHA layer took the fast path
    monkeypatch.setattr(NHAMixer, "_can_step", lambda *args: False)
    generic, generic_cache = decode_one_by_one(model, ids, mask, prefill=5)
    torch.testing.assert_close(fast, generic, **TOLERANCES[dtype])
    for i in (0, 2, 3):
        _assert_states_close(
            fast_cache.layers[i].get_state(), generic_cache.layers[i].get_state(), **TOLERANCES[dtype]
        )
        assert fast_cache.layers[i].cumulative_length == generic_cache.layers[i].cumulative_length == 30
    full = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(fast[1], full[1], **TOLERANCES[dtype])  # the unpadded row, against one forward
    torch.testing.assert_close(fast[0, 7:], full[0, 7:], **TOLERANCES[dtype])


@pytest.mark.parametrize("settings", SETTINGS)
def test_generate_is_the_same_with_and_without_the_fast_path(monkeypatch, settings):
    model = tiny_hybrid(LAYERS, torch.float32, {"nha": settings})
    batch = torch.randint(1, 128, (2, 11))
    batch[0, :4] = 0
    mask = (batch != 0).long()
    options = {"attention_mask": mask, "max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    calls = count_steps(monkeypatch, NHAMixer)
    greedy, beams = model.generate(batch, **options), model.generate(batch, num_beams=3, **options)
    assert len(calls) > 0
    monkeypatch.setattr(NHAMixer, "_can_step", lambda *args: False)
    assert torch.equal(greedy, model.generate(batch, **options))
    assert torch.equal(beams, model.generate(batch, num_beams=3, **options))  # reorder_cache between fast steps


def test_rollback_between_fast_steps():
    """Speculative decoding's pattern with fast steps around a verification: the rolled-back cache continues exactly
    as one that never saw the rejected tokens."""
    model = tiny_hybrid(LAYERS, torch.float64, {"nha": {"window": 8, "slots": 4}})  # rolls back up to 7
    ids = torch.randint(3, 128, (24,)).tolist()
    with torch.no_grad():
        rolled, clean = _Decoder(model), _Decoder(model)
        for decoder in (rolled, clean):
            decoder.forward(ids[:9])
            for token in ids[9:12]:  # fast steps
                decoder.forward([token])
        rolled.begin()
        rolled.forward(ids[12:14])
        for token in ids[14:17]:  # verification: the generic path
            rolled.forward([token])
        rolled.commit(3)  # keeps ids[12:15]
        clean.forward(ids[12:15])
        for token in ids[15:24]:  # fast steps again, past the window
            torch.testing.assert_close(rolled.forward([token]), clean.forward([token]), rtol=1e-10, atol=1e-10)
    layer = rolled.cache.layers[0]
    assert layer.buffers is not None and layer.checkpoint is None


def test_buffers_move_rarely_and_any_other_change_drops_them():
    """Past the window the decode buffers hold their storage for `min_slack` steps at a time; the layer's tensors are
    views of them; a batch change or a generic call drops them, and the next step makes new ones."""
    model = tiny_hybrid(["nha"] * 4, torch.float32, {"nha": {"window": 4, "slots": 3}})
    ids = torch.randint(1, 128, (2, 150))
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
        layer, storages = cache.layers[1], []
        for t in range(10, 140):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            storages.append(layer.buffers.keys.data_ptr())
            assert layer.keys.data_ptr() == layer.buffers.keys[:, :, layer.buffers.start].data_ptr()
            assert layer.keys.shape[2] == 3 and layer.recurrent_states[0] is layer.buffers.hk
        assert 2 <= len(set(storages)) <= 3  # 130 steps, room for 64 beyond the window
        cache.reorder_cache(torch.tensor([1, 0]))
        assert layer.buffers is None
        model(ids[:, 140:141], cache=cache, use_cache=True)
        assert layer.buffers is not None
        model(ids[:, 141:143], cache=cache, use_cache=True)  # two tokens: the generic path
        assert layer.buffers is None and layer.cumulative_length == 143


def test_prefill_state_does_not_keep_the_prompt_alive():
    """After a prefill, the window is the tail of tensors over the whole prompt: the layer keeps a copy of the tail."""
    model = tiny_hybrid(["nha"] * 4, torch.float32, {"nha": {"window": 4, "slots": 3}})
    cache = model(torch.randint(1, 128, (1, 200)), use_cache=True).cache
    for tensor in cache.layers[0].get_state():
        assert tensor.untyped_storage().nbytes() <= 2 * tensor.nbytes
