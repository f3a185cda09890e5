"""Old call forms kept for a release: the measurements took the tokenizer second."""

import pytest
from tiny import CharTokenizer, make_tiny, word_tokenizer

import hybridize
from hybridize.configs import EvalConfig


def test_a_measurement_called_in_the_old_order_warns_and_gives_the_same_result():
    model, tokenizer, config = make_tiny("llama"), CharTokenizer(), EvalConfig(seq_len=16, max_tokens=64)
    expected = hybridize.evaluate(model, config, tokenizer=tokenizer)
    with pytest.warns(DeprecationWarning, match=r"evaluate\(model, config, tokenizer=tokenizer\)"):
        assert hybridize.evaluate(model, tokenizer, config) == expected


def test_generate_called_in_the_old_order_warns_and_gives_the_same_tokens():
    from hybridize.generate import GenerateConfig

    model, config = make_tiny("llama"), GenerateConfig(max_new_tokens=4, ignore_eos=True)
    tokenizer = word_tokenizer()
    expected = hybridize.generate(model, config, tokenizer=tokenizer, prompt=[5, 6, 7]).token_ids
    with pytest.warns(DeprecationWarning, match=r"generate\(model, config, tokenizer=tokenizer, prompt=prompt\)"):
        assert hybridize.generate(model, tokenizer, [5, 6, 7], config).token_ids == expected
