"""The attention mixer's KV cache: `PreallocatedKVLayer` (buffers written in place) holds and returns what
transformers' `DynamicLayer` (concatenation) does, through updates, growth, crop, batch changes and generate()."""

import pytest
import torch
from tiny import tiny_hybrid
from transformers.cache_utils import DynamicLayer

from hybridize.modeling.attention import AttentionMixer, PreallocatedKVLayer


def _kv(b, l, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, l, 8, generator=g), torch.randn(b, 2, l, 8, generator=g)


def _assert_same(layer, reference):
    assert layer.get_seq_length() == reference.get_seq_length()
    assert layer.get_mask_sizes(3) == reference.get_mask_sizes(3)
    torch.testing.assert_close(layer.keys, reference.keys, rtol=0, atol=0)
    torch.testing.assert_close(layer.values, reference.values, rtol=0, atol=0)


@pytest.mark.parametrize("max_length", [None, 12])
def test_layer_equals_dynamic_layer(max_length):
    layer, reference = PreallocatedKVLayer(max_length=max_length), DynamicLayer()
    layer.min_growth = 4  # grow often: prefill 5 -> 8 -> 12 (the max length) -> 24 past it
    for seed, (b, l) in enumerate([(2, 5)] + [(2, 1)] * 10 + [(2, 3)]):
        k, v = _kv(b, l, seed)
        out, expected = layer.update(k, v), reference.update(k, v)
        for a, e in zip(out, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        _assert_same(layer, reference)
    assert layer.key_buffer.shape[-2] > layer.get_seq_length() or max_length is not None
    for op, arg in [
        ("crop", -4),
        ("crop", 0),
        ("batch_repeat_interleave", 2),
        ("reorder_cache", torch.tensor([3, 0])),
    ]:
        getattr(layer, op)(arg)
        getattr(reference, op)(arg)
        _assert_same(layer, reference)
        k, v = _kv(layer.keys.shape[0], 2, 100)  # and both keep appending alike
        layer.update(k, v), reference.update(k, v)
        _assert_same(layer, reference)
    layer.batch_select_indices(torch.tensor([1]))
    reference.batch_select_indices(torch.tensor([1]))
    _assert_same(layer, reference)
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized


def test_layer_keeps_autograd_through_the_cache():
    layer = PreallocatedKVLayer()
    k, v = (t.requires_grad_() for t in _kv(1, 4, 0))
    keys, values = layer.update(k, v)
    keys2, values2 = layer.update(*(t * 2 for t in _kv(1, 1, 1)))
    (keys2.sum() + values2.sum()).backward()
    assert torch.equal(k.grad, torch.ones_like(k)) and torch.equal(v.grad, torch.ones_like(v))


def _generate(model, prompt, mask, **kwargs):
    return model.generate(prompt, attention_mask=mask, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("mixer", ["attention", "mamba2"])
def test_generate_equals_the_dynamic_cache(monkeypatch, mixer):
    """Greedy generate(), batch 2 with the first row left-padded, crossing several growths of the buffers: the same
    tokens as with transformers' DynamicLayer."""
    model = tiny_hybrid([mixer, "attention", mixer, "attention"], torch.float32, {"mamba2": {"chunk_size": 8}})
    prompt = torch.randint(1, 128, (2, 11))
    mask = torch.ones_like(prompt)
    prompt[0, :4], mask[0, :4] = 0, 0
    monkeypatch.setattr(PreallocatedKVLayer, "min_growth", 4)
    out = _generate(model, prompt, mask, max_new_tokens=20, return_dict_in_generate=True)
    assert all(type(out.past_key_values.layers[i]) is PreallocatedKVLayer for i in (1, 3))
    monkeypatch.setattr(AttentionMixer, "new_cache_layer", staticmethod(lambda config, i: DynamicLayer()))
    dynamic = _generate(model, prompt, mask, max_new_tokens=20, return_dict_in_generate=True)
    assert type(dynamic.past_key_values.layers[1]) is DynamicLayer
    assert torch.equal(out.sequences, dynamic.sequences)
    for i in (1, 3):
        _assert_same(out.past_key_values.layers[i], dynamic.past_key_values.layers[i])
    # and several sequences per prompt (the cache is expanded along the batch)
    many = _generate(model, prompt, mask, max_new_tokens=6, num_beams=2, num_return_sequences=2)
    monkeypatch.undo()
    assert torch.equal(_generate(model, prompt, mask, max_new_tokens=6, num_beams=2, num_return_sequences=2), many)
