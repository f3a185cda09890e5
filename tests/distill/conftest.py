"""Fixtures of the distillation tests: a tiny Llama teacher, its ratio-0.5 hybrid, a word-level tokenizer over the
same 128 ids, and small text files of random words."""

import pytest
import torch
from tiny import eos_word_tokenizer, make_tiny, random_paragraphs, random_text

import hybridize


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices on a shared machine: one thread is ~20x faster than two competing ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return eos_word_tokenizer()


@pytest.fixture
def word_tokenizer():
    return eos_word_tokenizer


@pytest.fixture(name="random_text")
def _random_text():
    return random_text


@pytest.fixture
def teacher():
    return make_tiny("llama")


@pytest.fixture
def make_student(teacher):
    """A fresh ratio-0.5 hybrid of the teacher (mamba2 in layers 0 and 2), the same on every call."""
    return lambda: hybridize.convert(teacher, hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))


@pytest.fixture
def text_file(tmp_path):
    """60 paragraphs of 20-80 random words: about 3,000 tokens."""
    path = tmp_path / "data" / "words.txt"
    path.parent.mkdir()
    path.write_text(random_paragraphs())
    return path
