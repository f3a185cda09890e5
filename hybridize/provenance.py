"""`hybridize.json`: every step that made a model, its config, its measured metrics and the library versions.

Steps ride on the model object (`model.hybridize_steps`) between the API calls, are written by `save()` and read
back by `load()`; the model card is generated from them.
"""

import dataclasses
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

MANIFEST_NAME = "hybridize.json"
_LIBRARIES = ("hybridize", "torch", "transformers", "safetensors", "accelerate")


def library_versions() -> dict[str, str]:
    def _version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(), **{name: _version(name) for name in _LIBRARIES}}


def record_step(model, step: str, config: Any, *, metrics: dict | None = None, **extra) -> None:
    """Append a step (`"convert"`, `"distill"`, ...) with its config and measured metrics to `model`'s history."""
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    entry = {"step": step, "config": config_dict, "metrics": metrics or {}, **extra}
    model.hybridize_steps = [*getattr(model, "hybridize_steps", []), entry]


def write_manifest(model, directory: Path) -> None:
    manifest = {"steps": getattr(model, "hybridize_steps", []), "versions": library_versions()}
    (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def read_manifest(directory: Path) -> dict:
    """The manifest in `directory`, or an empty one for a model that hybridize did not write."""
    path = Path(directory) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else {"steps": []}


__all__ = ["MANIFEST_NAME", "library_versions", "read_manifest", "record_step", "write_manifest"]
