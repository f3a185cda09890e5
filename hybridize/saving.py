"""Write a model directory atomically: into a temporary sibling, renamed into place only when complete.

A failed or interrupted save leaves nothing at the output path, an existing output is refused unless `overwrite`,
and the tokenizer files (chat template included) are copied byte for byte from where the tokenizer came from.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError
from .provenance import write_manifest

# Files that make up a tokenizer on disk; copied verbatim when the tokenizer was loaded from a directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def check_output(output: str | Path, *, overwrite: bool = False) -> None:
    """Refuse an existing `output` before any heavy work starts (`atomic_output` checks again at the end)."""
    if Path(output).exists() and not overwrite:
        raise OutputExistsError(f"output {output} already exists; choose another path or pass --overwrite")


@contextlib.contextmanager
def atomic_output(output: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success it replaces `output`, on failure it is removed."""
    output = Path(output)
    check_output(output, overwrite=overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should have normal directory permissions
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(tokenizer, directory: Path) -> None:
    """Copy the tokenizer's own files verbatim when it came from a directory, else let it serialise itself."""
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()] if source.is_dir() else []
    if files:
        for file in files:
            shutil.copy2(file, directory / file.name)
    else:
        tokenizer.save_pretrained(directory)


def save(model, output: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Save `model` (safetensors), its tokenizer and `hybridize.json` to `output`, atomically.

    Args:
        model (`PreTrainedModel`): a hybrid or any transformers model.
        output (`str` or `Path`): the directory to create.
        tokenizer (*optional*): copied beside the weights.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output`.

    Returns:
        `Path`: the output directory.
    """
    output = Path(output)
    with atomic_output(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
        write_manifest(model, tmp)
    return output


__all__ = ["TOKENIZER_FILES", "atomic_output", "check_output", "copy_tokenizer", "save"]
