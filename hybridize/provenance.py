"""`hybridize.json`: every step that made a model, its config, its measured metrics and the library versions.

Steps ride on the model object (`model.hybridize_steps`) between the API calls, are written by `save()` and read
back by `load()`; the model card is generated from them.
"""

import dataclasses
import json
import os
import platform
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

MANIFEST_NAME = "hybridize.json"
_LIBRARIES = ("hybridize", "torch", "transformers", "safetensors", "accelerate", "lm_eval")


def library_versions() -> dict[str, str]:
    def _version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(), **{name: _version(name) for name in _LIBRARIES}}


def _step_entry(step: str, config: Any, metrics: dict | None, extra: dict) -> dict:
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    return {"step": step, "config": config_dict, "metrics": metrics or {}, **extra}


def record_step(model, step: str, config: Any, *, metrics: dict | None = None, **extra) -> None:
    """Append a step (`"convert"`, `"distill"`, ...) with its config and measured metrics to `model`'s history."""
    model.hybridize_steps = [*getattr(model, "hybridize_steps", []), _step_entry(step, config, metrics, extra)]


def append_step(directory: Path, step: str, config: Any, *, metrics: dict | None = None, **extra) -> None:
    """Append a step to the manifest of a model directory in place, for steps that measure a saved model without
    rewriting it (`"eval"`). The entry carries the library versions it ran with; the rest of the manifest is kept.
    The file is replaced atomically: a reader sees the old manifest or the new one, never half of one."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    entry = _step_entry(step, config, metrics, {"versions": library_versions(), **extra})
    manifest["steps"] = [*manifest.get("steps", []), entry]
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(manifest, indent=2, default=str) + "\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, directory / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_eval(directory: Path, config: Any, metrics: dict, *, baseline: str | None = None) -> Path:
    """Record an evaluation of the saved model in `directory` in its manifest (`append_step`), with the baseline it
    was compared with. Returns the manifest's path; raises `OSError` when the directory cannot be written (a
    read-only model, whose results still stand).

    Example: `record_eval(Path("out/smol-mamba50"), EvalConfig(), {"perplexity": 34.2})`
    """
    append_step(Path(directory), "eval", config, metrics=metrics, baseline=baseline)
    return Path(directory) / MANIFEST_NAME


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_manifest(model, directory: Path) -> None:
    manifest = {"steps": getattr(model, "hybridize_steps", []), "versions": library_versions()}
    (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def read_manifest(directory: Path) -> dict:
    """The manifest in `directory`, or an empty one for a model that hybridize did not write."""
    path = Path(directory) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else {"steps": []}


__all__ = [
    "MANIFEST_NAME",
    "append_step",
    "library_versions",
    "read_manifest",
    "record_eval",
    "record_step",
    "write_manifest",
]
