"""Fixtures of the distillation tests: a tiny Llama teacher and its ratio-0.5 hybrid (the word tokenizer over the same
128 ids and the random text files are the shared ones, `tests/conftest.py`)."""

import pytest
import torch
from tiny import make_tiny

import hybridize


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices on a shared machine: one thread is ~20x faster than two competing ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def teacher():
    return make_tiny("llama")


@pytest.fixture
def make_student(teacher):
    """A fresh ratio-0.5 hybrid of the teacher (mamba2 in layers 0 and 2), the same on every call."""
    return lambda: hybridize.convert(teacher, hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
