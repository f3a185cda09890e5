"""Fixtures for the evaluate tests: two tiny random Llamas (same shape, different weights), token blocks, and small
stand-in tokenizers whose output is known exactly."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
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


class CharTokenizer:
    """One token per character (ids 3..127), with an optional BOS and EOS, called like a Hugging Face tokenizer."""

    def __init__(self, *, bos_token_id: int | None = 1, eos_token_id: int | None = 2) -> None:
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.calls = 0

    def __call__(self, text: str, *, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        self.calls += 1
        ids = [3 + ord(char) % (VOCAB_SIZE - 3) for char in text]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


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
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def make_char_tokenizer() -> type[CharTokenizer]:
    """The `CharTokenizer` class, for tests that choose its BOS and EOS."""
    return CharTokenizer


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A real `PreTrainedTokenizerFast` over the words a, b, c that adds BOS itself, as Llama-2 tokenizers do."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
