"""Write a model directory atomically: into a temporary sibling, renamed into place only when complete.

What a save guarantees:

- A failed or interrupted save leaves nothing at the output path; its temporary sibling `.NAME.PID.*.tmp` carries
  the writer's process id, so the next save to that output removes the leftovers of a writer that has died (a live
  one's are left alone).
- An existing output is refused unless `overwrite`, checked before any work (`check_output`) and again at the moment
  of the rename, which cannot replace a directory another process created in the meantime: of two writers to one
  output without `overwrite`, the later fails with `OutputExistsError`. With `overwrite` the last writer wins, and
  says so when the output it replaces is not the one it saw at the start.
- An output is never the input, inside an input directory, or a directory holding an input (`check_output(inputs=)`),
  `overwrite` or not; its nearest existing ancestor must be a writable directory; a save needs about the model's
  size free and says so when it is not there.
- The tokenizer files (chat template included) are copied byte for byte from where the tokenizer came from.

`atomic_file` gives a single-file output (a GGUF export) the same guarantees.
"""

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .errors import OutputError, OutputExistsError
from .provenance import write_manifest

logger = logging.getLogger(__name__)

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


def _refuse_overlap(output: Path, inputs: Iterable[str | Path]) -> None:
    """An output that is an input, lies inside one, or holds one would change or delete it: refused."""
    out = output.resolve()
    for spec in inputs:
        if spec is None or not Path(spec).exists():  # an alias or a Hub id: nothing on disk to protect
            continue
        source = Path(spec).resolve()
        if out == source:
            raise OutputError(f"output {output} is the input {spec}; write the result to another path")
        if source in out.parents:
            raise OutputError(f"output {output} is inside the input {spec}; write the result outside it")
        if out in source.parents:
            raise OutputError(f"output {output} holds the input {spec}, which replacing it would delete")


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` that exists (where a write under `path` would create its first directory)."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    return ancestor


def _check_writable(output: Path) -> None:
    """The nearest existing ancestor of `output` must be a directory this process can create files in."""
    ancestor = _existing_ancestor(output)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {output}: {ancestor} is a file, not a directory")
    try:  # a real probe: permission bits say nothing to root, and nothing about a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".hybridize-probe.", dir=ancestor)
    except OSError as error:
        raise OutputError(f"cannot write {output}: {ancestor} is not writable ({error.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output(output: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse a bad `output` before any heavy work starts: an existing one without `overwrite`, one that overlaps
    an input path in `inputs` (whatever `overwrite` says), one that cannot be written. `atomic_output` checks
    again at the end."""
    output = Path(output)
    _refuse_overlap(output, inputs)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} already exists; choose another path or pass --overwrite")
    _check_writable(output)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(output: Path) -> list[Path]:
    """Remove the `.NAME.PID.*.tmp` / `.old` siblings of `output` left by writers that are no longer running."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(\d+)\.[a-z0-9_]{{8}}\.(tmp|old)")
    removed = []
    with contextlib.suppress(OSError):
        for entry in output.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
                _remove(entry)
                removed.append(entry)
    if removed:
        logger.warning("removed %d leftover temporary file(s) of an interrupted save of %s", len(removed), output)
    return removed


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _sibling(output: Path, suffix: str) -> Path:
    return output.with_name(f".{output.name}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}")


def _place(tmp: Path, output: Path, *, overwrite: bool, seen: tuple[int, int] | None) -> None:
    """Rename the finished `tmp` to `output`; see the module docstring for what happens when `output` exists."""
    if not overwrite:
        if output.exists():  # and `rename` refuses a non-empty directory that appears after this check
            raise OutputExistsError(f"output {output} was created by another process while this one ran; left as is")
        try:
            tmp.rename(output)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise OutputExistsError(
                    f"output {output} was created by another process while this one ran; left as is"
                ) from None
            raise
        return
    if output.exists() and _identity(output) != seen:
        logger.warning("%s was written by another process while this one ran; replacing it (--overwrite)", output)
    for _ in range(8):  # another writer may slip in between the two renames: move it aside again
        if output.exists() or output.is_symlink():
            old = _sibling(output, "old")
            output.rename(old)
            _remove(old)
        try:
            tmp.rename(output)
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
    raise OutputError(f"could not replace {output}: other processes keep writing it")


@contextlib.contextmanager
def atomic_output(output: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success it replaces `output`, on failure it is removed."""
    output = Path(output)
    check_output(output, overwrite=overwrite, inputs=inputs)
    seen = _identity(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.{os.getpid()}.", suffix=".tmp", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should have normal directory permissions
    try:
        yield tmp
        _place(tmp, output, overwrite=overwrite, seen=seen)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise OutputError(f"no space left on the device while writing {output}") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(output: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside `output` (a single-file output, such as a GGUF file); when the block
    succeeds it becomes `output`, when it fails it is removed. Checked as `check_output` (before the work) and again
    at the end: with `overwrite` the finished file replaces `output` in one `os.replace`; without it a hard link
    creates `output` only if it still does not exist (`OutputExistsError` if another process made it meanwhile)."""
    output = Path(output)
    check_output(output, overwrite=overwrite, inputs=inputs)
    if output.is_dir():
        raise OutputError(f"output {output} is a directory; name a file")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    tmp = _sibling(output, "tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        tmp.chmod(0o666 & ~umask)
        if overwrite:
            os.replace(tmp, output)
        else:
            try:
                os.link(tmp, output)
            except FileExistsError:
                raise OutputExistsError(
                    f"output {output} was created by another process while this one ran; left as is"
                ) from None
            except OSError as error:  # a file system without hard links: check, then rename
                if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if output.exists():
                    raise OutputExistsError(
                        f"output {output} was created by another process while this one ran; left as is"
                    ) from None
                os.replace(tmp, output)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise OutputError(f"no space left on the device while writing {output}") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def model_bytes(model) -> int:
    """About what saving `model` takes on disk: its parameters and buffers at their dtypes."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_space(directory: Path, needed: int, what: str) -> None:
    """Refuse to start a write of `needed` bytes into `directory` when the device has less free."""
    directory = directory if directory.exists() else _existing_ancestor(directory)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OutputError(
            f"not enough space for {what}: it needs about {needed / 2**20:,.0f} MiB and {directory} has "
            f"{free / 2**20:,.0f} MiB free"
        )


def copy_tokenizer(tokenizer, directory: Path) -> None:
    """Copy the tokenizer's own files verbatim when it came from a directory, else let it serialise itself."""
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()] if source.is_dir() else []
    if files:
        for file in files:
            shutil.copy2(file, directory / file.name)
    else:
        tokenizer.save_pretrained(directory)


def save(
    model,
    output: str | Path,
    *,
    tokenizer=None,
    overwrite: bool = False,
    inputs: Iterable = (),
    extras: Mapping[str, Callable[[Path], object]] | None = None,
) -> Path:
    """Save `model` (safetensors), its tokenizer and `hybridize.json` to `output`, atomically.

    Args:
        model (`PreTrainedModel`): a hybrid or any transformers model.
        output (`str` or `Path`): the directory to create.
        tokenizer (*optional*): copied beside the weights.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output`.
        inputs (*optional*): paths the result was made from, which `output` must not overlap.
        extras (`Mapping[str, Callable[[Path], object]]`, *optional*): more files of the result, file name -> a
            function that writes that file at the path it is given (inside the temporary directory, after the
            weights and `hybridize.json`), so they appear with the rest at the rename (a distillation's metrics log
            and curve).

    Returns:
        `Path`: the output directory.

    Raises:
        `OutputExistsError`: `output` exists and not `overwrite`. `OutputError`: `output` overlaps an input, cannot
        be written, or its device lacks the space.
    """
    from .modeling.layout import standard_layout

    output = Path(output)
    needed = model_bytes(model)
    with atomic_output(output, overwrite=overwrite, inputs=inputs) as tmp:
        check_space(output.parent, needed, f"the model ({output})")
        with standard_layout(model):  # weights transposed for decoding are written in the standard layout
            model.save_pretrained(tmp)
        _write_beside_weights(model, tmp, tokenizer)
        for name, write in (extras or {}).items():
            write(tmp / name)
    return output


def _write_beside_weights(model, directory: Path, tokenizer) -> None:
    """What `save` writes after transformers' files: outside mixers' code, the tokenizer and `hybridize.json`."""
    from .remote_code import ship_mixer_code

    if isinstance(getattr(model.config, "mixer_types", None), list):  # a hybrid: its outside mixers' code too
        ship_mixer_code(model.config.mixer_types, directory)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, directory)
    write_manifest(model, directory)


_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def save_without_weights(model, directory: str | Path, *, tokenizer=None) -> None:
    """Write into `directory` every file `save` writes except the weights: the config (with `auto_map`), the
    generation config, the modeling code, the tokenizer and `hybridize.json`. For a caller that writes the weights
    itself, shard by shard (`hybridize.convert.convert_to_disk`), into a directory it made with `atomic_output`.

    Args:
        model (`PreTrainedModel`): the model whose files these are; it may be a skeleton on the meta device.
        directory (`str` or `Path`): an existing directory; weight files already in it are left as they are.
        tokenizer (*optional*): copied beside the weights.
    """
    directory = Path(directory)
    staging = Path(tempfile.mkdtemp(prefix=".files.", dir=directory))
    try:  # transformers writes the files (and an empty weight file, left behind in the staging directory)
        model.save_pretrained(staging, state_dict={})
        for path in staging.iterdir():
            if not _WEIGHT_FILE.fullmatch(path.name):
                os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_beside_weights(model, directory, tokenizer)


__all__ = [
    "TOKENIZER_FILES",
    "atomic_file",
    "atomic_output",
    "check_output",
    "check_space",
    "copy_tokenizer",
    "model_bytes",
    "remove_stale",
    "save",
    "save_without_weights",
]
