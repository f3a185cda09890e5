"""Shared fixtures over the tiny models and tokenizers of `tiny.py`, small text files of random words, and a saved
tiny hybrid."""

import random
import shutil

import pytest
import tiny
import torch
from tiny import FAMILIES, CharTokenizer, eos_word_tokenizer, make_tiny, random_paragraphs, random_text

import hybridize


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


@pytest.fixture(scope="module")
def saved_hybrid(tmp_path_factory):
    """A tiny Llama converted at ratio 0.5 and saved by hybridize with a tokenizer (written once for the module;
    tests that modify it work on a copy, `hybrid_dir`)."""
    path = tmp_path_factory.mktemp("hub") / "tiny-mamba50"
    hybrid = hybridize.convert(make_tiny("llama"), hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
    hybridize.save(hybrid, path, tokenizer=tiny.word_tokenizer())
    return path


@pytest.fixture
def hybrid_dir(saved_hybrid, tmp_path):
    path = tmp_path / saved_hybrid.name
    shutil.copytree(saved_hybrid, path)
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


@pytest.fixture
def calibration_text(tmp_path):
    """Random words of the tiny vocabulary, 40 paragraphs: real text for `word_tokenizer`."""
    rng = random.Random(0)
    path = tmp_path / "calibration.txt"
    paragraphs = [" ".join(f"w{rng.randrange(2, 128)}" for _ in range(60)) for _ in range(40)]
    path.write_text("\n\n".join(paragraphs))
    return str(path)
