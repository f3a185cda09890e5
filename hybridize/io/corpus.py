"""The offline text that quality is measured on, and its cut into fixed-length token blocks.

The corpus is real English Wikipedia (CC BY-SA, Wikipedia contributors), shipped inside the package as
`hybridize/data/wiki_{train,heldout}.jsonl.gz` and split by article, so that text used for calibration or
distillation (`train`) never overlaps the text perplexity is reported on (`heldout`). `evals/build_wiki_corpus.py`
builds it; `hybridize/data/README.md` documents the source and the counts.

Blocks are cut the way perplexity is usually reported for causal LMs (non-overlapping windows over the concatenated
documents): deterministic, no padding, every block full.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from importlib.resources import files
from typing import Any, Literal

import torch

from ..configs.evaluate import SPLITS
from ..errors import ConfigError


def load_articles(split: Literal["train", "heldout"]) -> list[dict[str, str]]:
    """Read one split of the packaged Wikipedia corpus as `{"title", "text"}` records, sorted by title.

    Args:
        split (`str`): `"train"` or `"heldout"`; the two share no article.

    Returns:
        `list[dict[str, str]]`: one record per article.
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not a corpus split; use one of {', '.join(SPLITS)}")
    resource = files("hybridize") / "data" / f"wiki_{split}.jsonl.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_corpus(split: Literal["train", "heldout"]) -> list[str]:
    """The article texts of one split of the packaged Wikipedia corpus.

    Args:
        split (`str`): `"train"` or `"heldout"`.

    Returns:
        `list[str]`: plain prose, one string per article, in title order.

    Example: `texts = load_corpus("heldout")`
    """
    return [article["text"] for article in load_articles(split)]


def token_blocks(tokenizer: Any, texts: Iterable[str], *, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize documents into one stream and cut it into full blocks of `seq_len` tokens.

    Each document is encoded with the tokenizer's own special tokens (`add_special_tokens=True`: a BOS where the
    tokenizer adds one, nothing where it does not) and followed by the EOS token, if the tokenizer has one, as the
    document separator. Documents are read only until `max_tokens` tokens are available; the last partial block is
    dropped.

    Args:
        tokenizer: a Hugging Face tokenizer, or anything called as
            `tokenizer(text, add_special_tokens=True, verbose=False)` that returns `{"input_ids": list[int]}` and has
            an `eos_token_id` attribute.
        texts (`Iterable[str]`): the documents, in order.
        seq_len (`int`): tokens per block.
        max_tokens (`int`, *optional*): at most this many tokens in all blocks; `None` takes every document.

    Returns:
        `torch.LongTensor` of shape `(num_blocks, seq_len)`.

    Example: `blocks = token_blocks(tokenizer, load_corpus("heldout"), seq_len=512, max_tokens=16384)`
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len} must be at least 1")
    if max_tokens is not None and max_tokens < seq_len:
        raise ConfigError(f"max_tokens={max_tokens} is less than seq_len={seq_len}; not one block fits")
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        if max_tokens is not None and len(stream) >= max_tokens:
            break
        # verbose=False: whole articles are longer than the model's context, on purpose; blocks cut them.
        ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
    usable = len(stream) if max_tokens is None else min(len(stream), max_tokens)
    num_blocks = usable // seq_len
    if num_blocks == 0:
        raise ConfigError(f"the texts give {len(stream)} tokens, fewer than seq_len={seq_len}; pass more text")
    return torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


__all__ = ["SPLITS", "load_articles", "load_corpus", "token_blocks"]
