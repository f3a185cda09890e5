"""The tokenizer of a GGUF file: the `tokenizer.ggml.*` keys and `tokenizer.chat_template`, which llama.cpp reads
instead of any tokenizer file.

Where they come from (`tokenizer_origin`, then `add_tokenizer`):

1. The GGUF file the model came from, copied verbatim: the model spec itself is a `.gguf` file or an alias (a packaged
   GGUF), or the model directory's `hybridize.json` history starts from one (its first `source` is the cache that
   `hybridize.load` dequantized that file into). Why not the directory's tokenizer.json: transformers rebuilds a GGUF
   tokenizer lossily. SmolLM2's GGUF says `tokenizer.ggml.pre = smollm` (digits split one by one, as SmolLM2 was
   trained); the tokenizer.json rebuilt from it keeps only the byte-level split, so writing that back would tokenize
   numbers differently from the model's own GGUF. The GGUF's fields are the original.
2. Otherwise the tokenizer's own files (a model directory, a Hub download): byte-level BPE tokenizers (GPT-2,
   SmolLM, Llama 3, Qwen2 style) only. Tokens and their types come from tokenizer.json (an added special token is
   CONTROL, another added token USER_DEFINED), merges, special token ids, add-BOS/EOS flags and the chat template from
   the `gguf` package's `SpecialVocab`, and llama.cpp's pre-tokenizer name from tokenizer.json's `pre_tokenizer`
   (`PRE_TOKENIZERS`). A pre-tokenizer not in that table is refused rather than guessed: llama.cpp would split text
   differently from the model's tokenizer (it warns "GENERATION QUALITY WILL BE DEGRADED" and uses a default).
"""

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf

from ..errors import CheckpointError, UnsupportedModelError
from ..sources import ALIASES, _cache_dir, resolve

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.json pre_tokenizer (as `_pre_tokenizer_key` reduces it) -> llama.cpp's `tokenizer.ggml.pre` with the same
# splits (llama.cpp src/llama-vocab.cpp): the GPT-2 regex; digits one by one before it (SmolLM); the Llama 3 and
# Qwen2 regexes (numbers in groups of up to three / one by one) with the byte-level step not splitting again
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def _pre_tokenizer_key(pre_tokenizer: dict | None) -> tuple:
    """The parts of a tokenizer.json `pre_tokenizer` that decide where text splits, one entry per step."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    key = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            key.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Digits":
            key.append((kind, bool(step.get("individual_digits", False))))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert", False):
            pattern = step.get("pattern", {})
            key.append((kind, pattern.get("Regex", pattern.get("String"))))
        else:
            key.append((kind, json.dumps(step, sort_keys=True)))
    return tuple(key)


def tokenizer_origin(model: Any, spec: str | None = None) -> Path | None:
    """The GGUF file whose tokenizer fields a GGUF export of `model` copies (see the module docstring), or `None`
    when the tokenizer's own files are written: `spec` itself when it names a GGUF file or an alias; else the packaged
    GGUF whose cache `model` was loaded from, or that the first step of its history (`model.hybridize_steps`) read.

    Example: `tokenizer_origin(*hybridize.load("out/smol-mamba50"))` is the packaged SmolLM2 GGUF for a hybrid
    converted from `llama`.
    """
    if spec is not None and (source := resolve(spec)).is_gguf:
        return Path(source.location)
    steps = getattr(model, "hybridize_steps", None) or []
    first = next((s.get("source") or s["sources"][0] for s in steps if s.get("source") or s.get("sources")), None)
    for candidate in (first, getattr(model, "name_or_path", None)):
        if not candidate:
            continue
        if str(candidate).lower().endswith(".gguf") and Path(candidate).is_file():
            return Path(candidate)
        for alias in ALIASES:
            try:
                packaged = Path(resolve(alias).location)
            except CheckpointError:  # the alias's package is not installed: this model cannot come from it
                continue
            if Path(candidate).expanduser().resolve() == _cache_dir(packaged).resolve():
                return packaged
    return None


def _copy_gguf_tokenizer(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> None:
    reader = gguf.GGUFReader(path)
    tokens = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None or len(tokens.data) != vocab_size:
        count = "no" if tokens is None else len(tokens.data)
        raise CheckpointError(
            f"{path} holds {count} tokens but the model has vocab_size={vocab_size}; its tokenizer does not fit"
        )
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _write_tokenizer_files(writer: gguf.GGUFWriter, directory: Path, vocab_size: int) -> None:
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise UnsupportedModelError(
            f"{directory} has no tokenizer.json; a GGUF export writes byte-level BPE tokenizers from tokenizer.json"
        )
    spec = json.loads(file.read_text(encoding="utf-8"))
    model, decoder = spec.get("model", {}), spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UnsupportedModelError(
            f"the tokenizer in {directory} is not a byte-level BPE (model {model.get('type')!r}, decoder "
            f"{decoder.get('type')!r}); a GGUF export writes GPT-2/SmolLM/Llama 3/Qwen2-style tokenizers only"
        )
    key = _pre_tokenizer_key(spec.get("pre_tokenizer"))
    if key not in PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"llama.cpp has no pre-tokenizer known here to split text as {file}'s pre_tokenizer does ({key}); "
            f"supported: {', '.join(PRE_TOKENIZERS.values())}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab.update({t["content"]: i for i, t in added.items()})
    by_id = {i: text for text, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"{file} has token id {max(by_id)} but the model has vocab_size={vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces (a padded embedding) are unused placeholders
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[key])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, *, vocab_size: int, origin: Path | None = None) -> None:
    """Write the tokenizer fields: copied from the GGUF file `origin` when given, else from the files of the
    directory `tokenizer` was loaded from (`tokenizer.name_or_path`; the files `tokenizer.save_pretrained` writes
    when it came from elsewhere). See the module docstring for why.

    Raises:
        `UnsupportedModelError`: a tokenizer that is not byte-level BPE, or whose pre-tokenizer llama.cpp has no
            name for here. `CheckpointError`: a tokenizer that does not fit `vocab_size`.
    """
    if origin is not None:
        _copy_gguf_tokenizer(writer, Path(origin), vocab_size)
        return
    directory = Path(getattr(tokenizer, "name_or_path", "") or "")
    if directory.is_dir() and (directory / "tokenizer.json").is_file():
        _write_tokenizer_files(writer, directory, vocab_size)
        return
    with tempfile.TemporaryDirectory(
        prefix="hybridize-tokenizer-"
    ) as saved:  # a Hub id: the files as transformers writes them
        tokenizer.save_pretrained(saved)
        _write_tokenizer_files(writer, Path(saved), vocab_size)


__all__ = ["PRE_TOKENIZERS", "add_tokenizer", "tokenizer_origin"]
