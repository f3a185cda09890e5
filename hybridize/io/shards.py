"""Lazy weights on disk: read a checkpoint tensor by tensor, write one shard by shard (mergekit's lazy I/O, rewritten).

- `LazyTensorLoader` reads a transformers directory (`model.safetensors`, or `model.safetensors.index.json` and its
  shards) one tensor at a time: each shard is opened once with `safe_open` when a tensor of it is first asked for, and
  a tensor is read only when asked for. A tensor read this way maps its bytes from the file, copy-on-write: changing
  it never changes the file, but the reads of one handle share its mapping, so a change is seen by the next read of
  that tensor until `release()`; callers do not change what they read. The pages stay resident while the tensor or
  its shard's handle lives, so `release()` closes the handles between layers and memory follows the tensors in use.
- `ShardWriter` writes tensors as they come, never holding more than the one being written: each goes straight to a
  temporary file per shard and element size, and a shard is assembled (header, then its tensors from the widest
  element size down, so that every tensor starts aligned) when it is full. `close()` names the shards as
  `save_pretrained` does (`model.safetensors` alone, or `model-0000k-of-0000n.safetensors` and the index). It writes
  into a directory that the caller makes atomic (`hybridize.saving.atomic_output`): until `close()` only hidden
  temporary names exist there.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' `save_pretrained(max_shard_size="50GB")` default, so that both write the same files
DEFAULT_MAX_SHARD_BYTES = 50 * 10**9

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def shard_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a transformers directory: the shards its index names, else `model.safetensors`,
    else every `*.safetensors` file.

    Raises:
        `CheckpointError`: a corrupt index, a shard it names that is missing, or no safetensors file at all.
    """
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"corrupt safetensors index {index}: {error!r}; re-save the model") from error
        if missing := [shard for shard in shards if not (directory / shard).is_file()]:
            raise CheckpointError(
                f"{directory} lacks shards listed in {INDEX_FILE}: {', '.join(missing)}; re-download or re-save it"
            )
        return [directory / shard for shard in shards]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors weights; re-save the model with save_pretrained")
    return files


class LazyTensorLoader:
    """The tensors of a transformers directory, read on demand.

    Args:
        directory (`str` or `Path`): a directory with `model.safetensors`, or `model.safetensors.index.json` and the
            shards it names (see `shard_files`). Every shard's header is read here, so a truncated or corrupt shard
            fails before any tensor is read.

    Raises:
        `CheckpointError`: see `shard_files`; also a shard whose header cannot be read, and a tensor in two shards.

    Example:
        ```python
        >>> with LazyTensorLoader("out/smol") as loader:
        ...     embed = loader.get_tensor("model.embed_tokens.weight")
        ```
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._shard_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for path in shard_files(self.directory):
            with self._open(path) as handle:
                for name in handle.keys():
                    if name in self._shard_of:
                        raise CheckpointError(
                            f"tensor {name} is in both {self._shard_of[name].name} and {path.name}; re-save the model"
                        )
                    self._shard_of[name] = path

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"corrupt or truncated safetensors file {path}: {error}; re-download or re-save the model"
            ) from error

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def __len__(self) -> int:
        return len(self._shard_of)

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored (its dtype and shape). Raises `KeyError` for a name the checkpoint lacks and
        `CheckpointError` for one that cannot be read."""
        path = self._shard_of[name]
        if path not in self._handles:
            self._handles[path] = self._open(path).__enter__()
        try:
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"cannot read {name} from {path}: {error}; re-download or re-save the model"
            ) from error

    def get_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix`, keyed by the rest of its name (a module's state dict:
        `get_tensors("model.layers.3.")`)."""
        return {name[len(prefix) :]: self.get_tensor(name) for name in self._shard_of if name.startswith(prefix)}

    def release(self) -> None:
        """Close the open shard handles; tensors already read stay valid, and the next read reopens its shard."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    close = release

    def __enter__(self) -> LazyTensorLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Write a checkpoint's tensors into `directory` as they come, in shards of at most `max_shard_bytes`.

    Args:
        directory (`str` or `Path`): an existing directory, normally the temporary one of `atomic_output`.
        max_shard_bytes (`int`, *optional*, defaults to `DEFAULT_MAX_SHARD_BYTES`): a shard is closed before a tensor
            would take it past this size (a larger tensor gets a shard of its own), as `save_pretrained` does.
        metadata (`dict[str, str]`, *optional*, defaults to `{"format": "pt"}`): the safetensors header metadata of
            every shard.

    Example:
        ```python
        >>> with ShardWriter(tmp, max_shard_bytes=2 * 10**9) as writer:
        ...     writer.add("model.norm.weight", torch.ones(576))
        ```
        The files get their final names when the block ends without an error (`close()`); on an error the
        temporary files are removed.
    """

    def __init__(
        self, directory: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict | None = None
    ):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self.shards: list[Path] = []  # finished shards, under temporary names
        self.weight_map: dict[str, int] = {}  # tensor name -> shard number (0-based)
        self.total_bytes = 0
        self.total_parameters = 0
        self._parts: dict[int, tuple[Path, object]] = {}  # element size -> temporary data file of the open shard
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # name -> dtype, shape, size, offset
        self._shard_bytes = 0
        self._closed = False

    def _temporary(self, name: str) -> Path:
        return self.directory / f".shard-{len(self.shards):05d}.{name}.tmp"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` under `name` (a CPU tensor; it is not kept)."""
        if self._closed:
            raise ValueError("the ShardWriter is closed")
        if name in self.weight_map or name in self._entries:
            raise ValueError(f"tensor {name} was already written")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors does not store here")
        size = _tensor_bytes(tensor)
        if self._entries and self._shard_bytes + size > self.max_shard_bytes:
            self._finish_shard()
        width = tensor.element_size()
        if width not in self._parts:
            path = self._temporary(f"{width}")
            self._parts[width] = (path, path.open("wb"))
        _, file = self._parts[width]
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._entries[name] = (tensor.dtype, list(tensor.shape), size, file.tell())
        if size:
            file.write(data.view(torch.uint8).numpy().data)
        self._shard_bytes += size
        self.total_bytes += size
        self.total_parameters += tensor.numel()

    def _finish_shard(self) -> None:
        """Assemble the open shard into its temporary file: header, then its tensors by element size, widest first."""
        widths = sorted(self._parts, reverse=True)
        for width in widths:
            self._parts[width][1].close()
        start, base = {}, 0  # where each element size's part begins in the data section
        for width in widths:
            start[width] = base
            base += self._parts[width][0].stat().st_size
        header = {"__metadata__": self.metadata} if self.metadata else {}
        for name, (dtype, shape, size, offset) in self._entries.items():
            begin = start[torch.empty((), dtype=dtype).element_size()] + offset
            header[name] = {"dtype": _DTYPES[dtype], "shape": shape, "data_offsets": [begin, begin + size]}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-aligned, as safetensors writes it
        path = self._temporary("safetensors")
        with path.open("wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for width in widths:
                with self._parts[width][0].open("rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
                self._parts[width][0].unlink()
        number = len(self.shards)
        self.weight_map.update(dict.fromkeys(self._entries, number))
        self.shards.append(path)
        self._parts, self._entries, self._shard_bytes = {}, {}, 0

    def close(self) -> list[Path]:
        """Finish the last shard and give every shard its final name (`model.safetensors` when there is one, else
        `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`); returns the files written."""
        if self._closed:
            raise ValueError("the ShardWriter is closed")
        if self._entries or not self.shards:  # an empty checkpoint is one empty shard, as save_pretrained writes it
            self._finish_shard()
        self._closed = True
        if len(self.shards) == 1:
            final = [self.directory / SINGLE_FILE]
        else:
            n = len(self.shards)
            final = [self.directory / f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for tmp, path in zip(self.shards, final):
            os.replace(tmp, path)
        if len(final) > 1:
            index = {
                "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_bytes},
                "weight_map": {name: final[k].name for name, k in sorted(self.weight_map.items())},
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            final.append(self.directory / INDEX_FILE)
        return final

    def abort(self) -> None:
        """Remove every temporary file; nothing is named as a shard."""
        self._closed = True
        for path, file in self._parts.values():
            file.close()
            path.unlink(missing_ok=True)
        for path in self.shards:
            path.unlink(missing_ok=True)
        self._parts, self._entries, self.shards = {}, {}, []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "INDEX_FILE", "SINGLE_FILE", "LazyTensorLoader", "ShardWriter", "shard_files"]
