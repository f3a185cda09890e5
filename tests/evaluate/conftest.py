"""Fixtures for the evaluate tests: two tiny random Llamas (same shape, different weights), token blocks, and small
stand-in tokenizers whose output is known exactly."""

from __future__ import annotations

import pytest
import torch
from tiny import bos_word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 128


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return _tiny_llama(0)


@pytest.fixture
def other_llama() -> LlamaForCausalLM:
    return _tiny_llama(1)


@pytest.fixture
def blocks() -> torch.Tensor:
    """Three blocks of 16 random token ids."""
    return torch.randint(0, VOCAB_SIZE, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:  # overrides the shared one (tests/conftest.py)
    """A real `PreTrainedTokenizerFast` over the words a, b, c that adds BOS itself, as Llama-2 tokenizers do."""
    return bos_word_tokenizer()
