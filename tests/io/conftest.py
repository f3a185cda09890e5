"""Fixtures of the data-layer tests: small tokenizers whose output is known exactly, and text files of random words
over the word tokenizer's vocabulary."""

import pytest
from tiny import CharTokenizer, bos_word_tokenizer, eos_word_tokenizer, random_paragraphs, random_text


@pytest.fixture
def tokenizer():
    """Words `w2`..`w127` and `<eos>`; adds no special tokens of its own."""
    return eos_word_tokenizer()


@pytest.fixture
def word_tokenizer():
    """`eos_word_tokenizer` itself, for tests that change the tokenizer they get."""
    return eos_word_tokenizer


@pytest.fixture(name="bos_word_tokenizer")
def _bos_word_tokenizer():
    return bos_word_tokenizer()


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def make_char_tokenizer() -> type[CharTokenizer]:
    """The `CharTokenizer` class, for tests that choose its BOS and EOS."""
    return CharTokenizer


@pytest.fixture(name="random_text")
def _random_text():
    return random_text


@pytest.fixture
def text_file(tmp_path):
    """60 paragraphs of 20-80 random words: about 3,000 tokens."""
    path = tmp_path / "data" / "words.txt"
    path.parent.mkdir()
    path.write_text(random_paragraphs())
    return path
