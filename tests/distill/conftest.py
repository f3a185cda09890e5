"""Fixtures of the distillation tests: a tiny Llama teacher, its ratio-0.5 hybrid, a word-level tokenizer over the
same 128 ids, and small text files of random words."""

import random

import pytest
import torch
from tiny import make_tiny
from transformers import PreTrainedTokenizerFast

import hybridize


def word_tokenizer(shift: int = 0) -> PreTrainedTokenizerFast:
    """`<unk>` 0, `<eos>` 1 and words `w2`..`w127` -> their ids; `shift` permutes the ids (a tokenizer that
    disagrees with the default one). Special tokens are not words, or `w1` would match inside `w115`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>", *(f"w{i}" for i in range(2, 128))]
    vocab = {word: (i + shift) % 128 for i, word in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(f"w{rng.randrange(2, 128)}" for _ in range(words))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices on a shared machine: one thread is ~20x faster than two competing ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return word_tokenizer()


@pytest.fixture(name="word_tokenizer")
def _word_tokenizer():
    return word_tokenizer


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
    rng = random.Random(0)
    path = tmp_path / "data" / "words.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(random_text(rng, rng.randrange(20, 80)) for _ in range(60)))
    return path
