"""Telling a local path from a Hub name when neither exists here: the one rule shared by model specs
(`hybridize.sources`) and data specs (`hybridize.io.text`), so that a mistyped path fails as a missing path instead of
a failed Hub lookup."""

from __future__ import annotations

import os
import re
from pathlib import Path


def looks_like_local_path(spec: str, *, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether `spec` was meant as a local file or folder.

    A Hub id is `name` or `owner/name` and never starts with `.`, so a spec is a path when it starts with `.`, `/` or
    `~` (`./x`, `../x`, `.`, `..`, a hidden name, an absolute or home path), ends with one of `suffixes`, holds more
    than one `/`, or has a separator after a first component that exists here (`out/model` next to `out/`).

    Args:
        spec (`str`): what the user passed.
        suffixes (`tuple[str, ...]`, *optional*, defaults to `()`): lowercase file suffixes that only a local file has
            (`(".gguf",)` for models); compared case-insensitively.

    Returns:
        `bool`: `True` for a spec that names a local path, whether or not it exists.

    Example: `looks_like_local_path("out/model.gguf", suffixes=(".gguf",))` is `True`.
    """
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    return (
        spec.startswith((".", "/", "~"))
        or spec.lower().endswith(suffixes)
        or spec.count("/") > 1
        or (any(sep in spec for sep in separators) and Path(re.split(r"[\\/]", spec)[0]).exists())
    )


__all__ = ["looks_like_local_path"]
