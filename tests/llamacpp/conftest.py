"""Fixtures of the GGUF tests: the tiny byte-level BPE tokenizer the tiny GGUF models carry."""

import pytest
from tiny import GGUF_VOCAB, byte_bpe_tokenizer
from transformers import AutoTokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """`byte_bpe_tokenizer()`, loaded back from a directory as `hybridize.load` gives it (its files are what a GGUF
    export writes)."""
    path = tmp_path_factory.mktemp("tokenizer")
    byte_bpe_tokenizer(GGUF_VOCAB).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
