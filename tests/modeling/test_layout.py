"""The decode layout (`transpose_weights_`): same values, same tied parameters, wide weights transposed, saved in the
standard layout, and generation unchanged."""

import pytest
import torch
from tiny import TOLERANCES, make_tiny, tiny_hybrid, word_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.modeling.layout import is_transposed, standard_layout, transpose_weights_

MIXERS = ["mamba2", "attention", "nha", "streaming"]


def _wide(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.out_features > module.in_features


@pytest.mark.parametrize("make", [lambda: tiny_hybrid(MIXERS), lambda: make_tiny("llama")], ids=["hybrid", "llama"])
def test_transposed_weights_keep_values_ties_and_logits(make):
    model = make()
    ids = torch.randint(0, 128, (2, 12))
    before = model(ids).logits
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    parameters = dict(model.named_parameters())
    changed = transpose_weights_(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert changed == len({id(m.weight) for m in linears if _wide(m)}) > 0
    assert all(is_transposed(m.weight) == _wide(m) for m in linears)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tied parameter
    assert all(parameters[name] is p and torch.equal(values[name], p) for name, p in model.named_parameters())
    torch.testing.assert_close(model(ids).logits, before, **TOLERANCES[torch.float32])
    assert transpose_weights_(model) == 0  # idempotent


def test_bfloat16_weights_keep_the_standard_layout():
    """bf16 products with a transposed weight run a generic kernel many times slower than MKL's on CPUs."""
    model = tiny_hybrid(MIXERS).to(torch.bfloat16)
    assert transpose_weights_(model) == 0
    assert not any(is_transposed(p) for p in model.parameters())


def test_save_writes_the_standard_layout_and_keeps_the_decode_layout(tmp_path):
    model = tiny_hybrid(MIXERS)
    transpose_weights_(model)
    transposed = [m for m in model.modules() if isinstance(m, nn.Linear) and is_transposed(m.weight)]
    with pytest.raises(RuntimeError):  # transformers' own save refuses strided weights: why `save` needs the layout
        model.save_pretrained(tmp_path / "plain")
    hybridize.save(model, tmp_path / "saved")
    assert all(is_transposed(m.weight) for m in transposed)  # restored after saving
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(p.is_contiguous() for p in loaded.parameters())
    ids = torch.randint(0, 128, (1, 10))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **TOLERANCES[torch.float32])


def test_standard_layout_restores_after_an_error():
    model = tiny_hybrid(MIXERS)
    transpose_weights_(model)
    with pytest.raises(ValueError), standard_layout(model):
        assert not any(is_transposed(p) for p in model.parameters())
        raise ValueError
    assert is_transposed(model.lm_head.weight)


def test_generation_is_unchanged_by_the_layout():
    model = tiny_hybrid(MIXERS)
    ids = torch.randint(0, 128, (1, 7))
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **settings)
    transpose_weights_(model)
    assert torch.equal(model.generate(ids, **settings), expected)


def test_load_with_the_decode_layout_and_a_dtype_name(tmp_path):
    hybridize.save(tiny_hybrid(MIXERS), tmp_path / "m", tokenizer=word_tokenizer())
    model, _ = hybridize.load(str(tmp_path / "m"), decode_layout=True, dtype="float32")
    assert model.dtype == torch.float32 and is_transposed(model.lm_head.weight)
    bf16, _ = hybridize.load(str(tmp_path / "m"), decode_layout=True, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and not any(is_transposed(p) for p in bf16.parameters())
    plain, _ = hybridize.load(str(tmp_path / "m"))
    assert plain.dtype == torch.float32 and not any(is_transposed(p) for p in plain.parameters())
