"""Old call forms kept for a release: the measurements took the tokenizer second."""

import pytest
from tiny import CharTokenizer, make_tiny

import hybridize
from hybridize.configs import EvalConfig


def test_a_measurement_called_in_the_old_order_warns_and_gives_the_same_result():
    model, tokenizer, config = make_tiny("llama"), CharTokenizer(), EvalConfig(seq_len=16, max_tokens=64)
    expected = hybridize.evaluate(model, config, tokenizer=tokenizer)
    with pytest.warns(DeprecationWarning, match=r"evaluate\(model, config, tokenizer=tokenizer\)"):
        assert hybridize.evaluate(model, tokenizer, config) == expected
