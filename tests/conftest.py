"""Shared fixtures over the tiny models and tokenizers of `tiny.py`, and small text files of random words."""

import pytest
import torch
from tiny import FAMILIES, CharTokenizer, eos_word_tokenizer, make_tiny, random_paragraphs, random_text


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(params=sorted(FAMILIES))
def tiny_source(request):
    return make_tiny(request.param)


@pytest.fixture
def tokenizer():
    """Words `w2`..`w127` and `<eos>`; adds no special tokens of its own."""
    return eos_word_tokenizer()


@pytest.fixture
def word_tokenizer():
    """`eos_word_tokenizer` itself, for tests that change the tokenizer they get."""
    return eos_word_tokenizer


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
