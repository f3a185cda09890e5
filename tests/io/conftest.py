"""Fixtures of the data-layer tests beyond the shared ones (`tests/conftest.py`): a word tokenizer that adds BOS."""

import pytest
from tiny import bos_word_tokenizer


@pytest.fixture(name="bos_word_tokenizer")
def _bos_word_tokenizer():
    return bos_word_tokenizer()
