"""Training text (distillation, calibration): where it comes from, how it is cut into blocks, and the held-out split.

A data spec is one of:

- `wiki`: the packaged offline Wikipedia corpus (`hybridize.io.corpus`). Its `train` split is trained on and its
  `heldout` split, the one `hybridize eval` reports perplexity on, is evaluated on and never trained on.
- a local `.txt`, `.jsonl`/`.json` or `.parquet` file, or a folder of them (read through `datasets`' packaged
  builders; a `.txt` file is one document per paragraph, paragraphs being separated by blank lines);
- a Hub dataset `name[:config]`, e.g. `wikitext:wikitext-103-raw-v1` (its `train` split, through
  `datasets.load_dataset`).

Each record gives one document: the `text_column` if named, else a chat column (`messages`, `conversations`) rendered
by the tokenizer's chat template (as SFT-style distillation does: MambaInLlama trains on chat data, arXiv
2408.15237), else the first of `text`, `content`, `document`, `body`, `article`, else the only string column. Except
for `wiki`, a document is held out when a hash of its text falls below `heldout_ratio`: the split does not depend on
file order, and the same text is never on both sides. Documents are tokenized, each followed by the EOS token, joined
into one stream and cut into full blocks of `seq_len` tokens (packing, no padding), exactly as `token_blocks` does for
evaluation, so the held-out blocks of `wiki` are the ones `hybridize eval` scores.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..fingerprint import blocks_fingerprint
from .corpus import load_corpus
from .paths import looks_like_local_path

logger = logging.getLogger(__name__)

BUILTIN = "wiki"
# file suffix -> datasets' packaged builder
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CHAT_COLUMNS = ("messages", "conversations")
TEXT_COLUMNS = ("text", "content", "document", "body", "article")
_TOKENIZE_BATCH = 256  # documents per tokenizer call


@dataclass(frozen=True, kw_only=True)
class DistillData:
    """Training and held-out blocks of one data spec.

    Args:
        train (`torch.LongTensor` of shape `(num_blocks, seq_len)`): the blocks trained on.
        heldout (`torch.LongTensor` of shape `(num_blocks, seq_len)`, *optional*): blocks never trained on; `None`
            when the data has too few documents to hold one out, or `heldout_ratio` is 0.
        num_documents (`int`): documents read for training.
        num_heldout_documents (`int`): documents held out.
        fingerprint (`str`): SHA-256 of the training blocks; a resumed run checks it.
    """

    train: torch.Tensor
    heldout: torch.Tensor | None
    num_documents: int
    num_heldout_documents: int
    fingerprint: str

    def describe(self) -> dict[str, Any]:
        """The counts recorded in `hybridize.json`."""
        return {
            "documents": self.num_documents,
            "train_blocks": int(self.train.shape[0]),
            "train_tokens": int(self.train.numel()),
            "heldout_documents": self.num_heldout_documents,
            "heldout_tokens": 0 if self.heldout is None else int(self.heldout.numel()),
            "fingerprint": self.fingerprint,
        }


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def is_heldout(text: str, ratio: float) -> bool:
    """Whether a document belongs to the held-out split: the first 8 bytes of SHA-256(text), as a fraction of 2**64,
    fall below `ratio` (the rule of the packaged corpus, keyed on the text instead of the title)."""
    return int.from_bytes(_hash(text)[:8], "big") < ratio * 2**64


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise ConfigError(f"data file {path} has suffix {path.suffix!r}; use one of {', '.join(BUILDERS)}")
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
    if not found:
        raise ConfigError(f"data folder {path} has no {'/'.join(BUILDERS)} file; put the text there or pass a file")
    return found


def open_dataset(spec: str):
    """The `datasets.Dataset` a (non-builtin) spec names: local files or a Hub dataset's `train` split."""
    import datasets

    path = Path(spec).expanduser()
    if path.exists():
        files = [f for f in _local_files(path) if f.stat().st_size > 0]
        if not files:
            raise ConfigError(f"data {spec!r} is empty (0 bytes of text); pass a file or folder that holds text")
        parts = []
        for builder in sorted({BUILDERS[f.suffix] for f in files}):
            chosen = [str(f) for f in files if BUILDERS[f.suffix] == builder]
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                parts.append(datasets.load_dataset(builder, data_files=chosen, split="train", **kwargs))
            except Exception as error:  # malformed JSON, a corrupt parquet file, mismatched columns, ...
                raise ConfigError(
                    f"cannot read {', '.join(chosen)} as {builder}: {error}; fix or remove it"
                ) from error
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if looks_like_local_path(spec, suffixes=tuple(BUILDERS)):
        raise ConfigError(f"data {spec!r} does not exist; pass an existing file or folder, {BUILTIN!r} or a Hub name")
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split="train")
    except Exception as error:  # datasets raises many kinds: offline, missing config, no train split, ...
        raise ConfigError(
            f"cannot load the Hub dataset {spec!r}: {error}; pass {BUILTIN!r}, a local .txt/.jsonl/.parquet file or "
            "folder, or a Hub dataset as name[:config]"
        ) from error


def text_column(columns: Iterable[str], string_columns: Iterable[str], requested: str | None) -> str:
    """The column documents are read from (see the module docstring for the order of preference)."""
    columns, string_columns = list(columns), list(string_columns)
    if requested is not None:
        if requested not in columns:
            raise ConfigError(f"text_column {requested!r} is not a column of the data; its columns are {columns}")
        return requested
    for name in (*CHAT_COLUMNS, *TEXT_COLUMNS):
        if name in columns:
            return name
    if len(string_columns) == 1:
        return string_columns[0]
    raise ConfigError(f"cannot tell which column holds the text (columns: {columns}); name it with --text-column")


def _documents(records: Iterable[Any], *, chat: bool, tokenizer: Any) -> Iterator[str]:
    for record in records:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    "the data has chat messages but the tokenizer has no chat template; pass plain text, name a text "
                    "column with --text-column, or use a tokenizer with a chat template"
                )
            record = tokenizer.apply_chat_template(list(record), tokenize=False)
        if isinstance(record, str) and record.strip():
            yield record


def read_documents(
    spec: str, *, text_column_name: str | None = None, tokenizer: Any = None
) -> tuple[Iterable[str], bool]:
    """Documents of a non-builtin spec, lazily, and whether they are chat-formatted (their special tokens are already
    in the text, so the tokenizer must not add its own)."""
    dataset = open_dataset(spec)
    features = dataset.features
    string_columns = [
        name for name, feature in features.items() if getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    column = text_column(dataset.column_names, string_columns, text_column_name)
    chat = column in CHAT_COLUMNS or not (getattr(features[column], "dtype", None) in ("string", "large_string"))
    return _documents(dataset[column] if len(dataset) else [], chat=chat, tokenizer=tokenizer), chat


def tokenize(tokenizer: Any, texts: list[str], *, special_tokens: bool) -> list[list[int]]:
    """Token ids of each document, each followed by EOS (as `token_blocks`)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    result = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        # verbose=False: documents longer than the model's context are expected; blocks cut them
        batch = tokenizer(texts[start : start + _TOKENIZE_BATCH], add_special_tokens=special_tokens, verbose=False)
        for ids in batch["input_ids"]:
            ids = list(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            result.append(ids)
    return result


def pack(documents: Iterable[list[int]], seq_len: int, *, max_tokens: int | None = None) -> torch.Tensor:
    """Join token lists into one stream and cut it into full `(num_blocks, seq_len)` blocks; the tail is dropped."""
    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    usable = len(stream) if max_tokens is None else min(len(stream), max_tokens)
    num_blocks = usable // seq_len
    return torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


def _split_stream(
    texts: Iterable[str], tokenizer: Any, *, ratio: float, special_tokens: bool, train_tokens: int, heldout_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize documents into the train and held-out sides until both have enough tokens."""
    train: list[list[int]] = []
    train_keys: list[bytes] = []
    heldout: list[list[int]] = []
    counts = [0, 0]
    pending: list[str] = []

    def flush() -> None:
        for text, ids in zip(pending, tokenize(tokenizer, pending, special_tokens=special_tokens)):
            key = _hash(text)
            side = 1 if int.from_bytes(key[:8], "big") < ratio * 2**64 else 0
            (heldout if side else train).append(ids)
            if not side:
                train_keys.append(key)
            counts[side] += len(ids)
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) == _TOKENIZE_BATCH:
            flush()
            if counts[0] >= train_tokens and counts[1] >= heldout_tokens:
                break
    flush()
    if ratio > 0 and not heldout and len(train) > 1:
        # too few documents for the hash to pick one: hold out the one with the smallest hash, deterministically
        heldout.append(train.pop(train_keys.index(min(train_keys))))
    return train, heldout


def load_data(
    spec: str,
    tokenizer: Any,
    *,
    seq_len: int,
    max_train_tokens: int | None = None,
    heldout_ratio: float = 0.05,
    heldout_tokens: int = 16384,
    text_column_name: str | None = None,
) -> DistillData:
    """Read a data spec and cut it into training and held-out blocks.

    Args:
        spec (`str`): `wiki`, a local file or folder, or a Hub dataset `name[:config]` (see the module docstring).
        tokenizer: the student's tokenizer (the teacher's is checked equal to it).
        seq_len (`int`): tokens per block.
        max_train_tokens (`int`, *optional*): stop reading once this many training tokens are packed; a smaller
            dataset is repeated over epochs by the engine instead.
        heldout_ratio (`float`, *optional*, defaults to 0.05): fraction of documents held out (not for `wiki`, whose
            held-out split is fixed).
        heldout_tokens (`int`, *optional*, defaults to 16384): held-out tokens kept for evaluation; 0 keeps none.
        text_column_name (`str`, *optional*): the column holding the text; detected when omitted.

    Returns:
        `DistillData`.

    Raises:
        `ConfigError`: a missing file, an unreadable dataset, no text column, or less text than one block.

    Example: `data = load_data("wiki", tokenizer, seq_len=512, max_train_tokens=500_000)`
    """
    if spec == BUILTIN:
        train_texts = load_corpus("train")
        train_docs = tokenize(tokenizer, train_texts, special_tokens=True)
        heldout_texts = load_corpus("heldout") if heldout_tokens > 0 else []
        heldout_docs = tokenize(tokenizer, heldout_texts, special_tokens=True)
    else:
        texts, chat = read_documents(spec, text_column_name=text_column_name, tokenizer=tokenizer)
        train_docs, heldout_docs = _split_stream(
            texts,
            tokenizer,
            ratio=heldout_ratio if heldout_tokens > 0 else 0.0,
            special_tokens=not chat,
            train_tokens=max_train_tokens or 2**62,
            heldout_tokens=heldout_tokens,
        )
    train = pack(train_docs, seq_len, max_tokens=max_train_tokens)
    if train.shape[0] == 0:
        total = sum(len(ids) for ids in train_docs)
        raise ConfigError(
            f"data {spec!r} gives {len(train_docs)} training documents and {total} tokens, fewer than one block of "
            f"seq_len={seq_len}; pass more text or a smaller --seq-len"
        )
    heldout = pack(heldout_docs, seq_len, max_tokens=heldout_tokens) if heldout_docs else None
    if heldout is not None and heldout.shape[0] == 0:
        logger.warning("the held-out documents of %r are shorter than one block; no held-out evaluation", spec)
        heldout = None
    return DistillData(
        train=train,
        heldout=heldout,
        num_documents=len(train_docs),
        num_heldout_documents=len(heldout_docs),
        fingerprint=blocks_fingerprint(train),
    )


__all__ = [
    "BUILDERS",
    "BUILTIN",
    "DistillData",
    "is_heldout",
    "load_data",
    "open_dataset",
    "pack",
    "read_documents",
    "text_column",
    "tokenize",
]
