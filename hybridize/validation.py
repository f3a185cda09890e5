"""Type checks for the configs, from their annotations: every user-facing config calls `check_fields(self)` first in
its `__post_init__`, so the Python API, the CLI and recipes reject a value of the wrong type with the same
`ConfigError`, which names the field, the value seen and the type expected.

The rules are those of a careful reader of YAML and JSON: a bool is not a number (`ratio: yes`), a string is not a
number (`seed: "abc"`), a float with a fractional part is not an integer (`attn_layers: [1.7]`), NaN is no number.
An integer is a number (`ratio=1` is 1.0), a float without a fractional part is an integer (`seq_len: 512.0`), and a
list is accepted where a tuple is annotated (it is stored as a tuple). Fields named in `distinct` (layer lists, task
names) must not repeat an item. Ranges and choices that depend on other fields stay in each config's own checks.

Only the standard library is imported here: `hybridize --help` imports every config.
"""

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError

# annotation -> (singular, plural) as the error message says it
_NAMES = {
    bool: ("a bool (true or false)", "bools"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    dict: ("a mapping", "mappings"),
    type(None): ("None", "None"),
}


class _Mismatch(Exception):
    """A value does not have its annotated type; `detail` says which part, when the value is a container."""

    def __init__(self, detail: str | None = None):
        super().__init__(detail)
        self.detail = detail


def check_fields(config: Any, *, distinct: tuple[str, ...] = ()) -> None:
    """Check every field of the dataclass instance `config` against its annotation, and store the normalised value
    (lists as tuples, integral floats in integer fields as ints).

    Args:
        config: a dataclass instance (frozen or not); call this from its `__post_init__`.
        distinct (`tuple[str, ...]`, *optional*): fields holding a collection in which an item must not repeat.

    Raises:
        `ConfigError`: naming the first field whose value does not fit, the value and the expected type.

    Example:
        ```python
        >>> def __post_init__(self):
        ...     check_fields(self, distinct=("attn_layers",))
        ```
    """
    for name, annotation in _annotations(type(config)).items():
        value = getattr(config, name)
        try:
            checked = _checked(value, annotation)
        except _Mismatch as mismatch:
            raise ConfigError(f"{name}={value!r} {_phrase(annotation, value, mismatch)}") from None
        if checked is not value:
            object.__setattr__(config, name, checked)
        if name in distinct and checked is not None:
            seen = set()
            for item in checked:
                if item in seen:
                    raise ConfigError(f"{name}={value!r} has {item!r} more than once; give each item once")
                seen.add(item)


@functools.cache
def _annotations(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _checked(value: Any, annotation: Any) -> Any:
    """`value` if it fits `annotation` (normalised), else raise `_Mismatch`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is None or annotation is type(None):
        if value is None:
            return None
        raise _Mismatch()
    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        raise _Mismatch()
    if origin is Union or origin is types.UnionType:
        details = []
        for arm in args:
            try:
                return _checked(value, arm)
            except _Mismatch as mismatch:
                details.append(mismatch.detail)
        raise _Mismatch(next((detail for detail in details if detail), None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if annotation is int:
        if isinstance(value, bool):
            raise _Mismatch()
        if isinstance(value, numbers.Integral):
            return value if type(value) is int else int(value)
        if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise _Mismatch()
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Mismatch()
        if math.isnan(value):
            raise _Mismatch()
        return value if type(value) in (int, float) else float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch()
    if annotation is tuple or origin is tuple:
        return _checked_tuple(value, args)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch()
        if args:
            for key, item in value.items():
                _checked(key, args[0])
                _checked(item, args[1])
        return value
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch()
    return value  # an annotation form this module does not know is not checked


def _checked_tuple(value: Any, args: tuple) -> tuple:
    if not isinstance(value, (tuple, list)):
        raise _Mismatch()
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        pairs = [(item, args[0]) for item in value]
    elif len(value) != len(args):
        raise _Mismatch(f"it has {len(value)} item{'s' * (len(value) != 1)}")
    else:
        pairs = list(zip(value, args))
    checked = []
    for item, annotation in pairs:
        try:
            checked.append(_checked(item, annotation))
        except _Mismatch:
            raise _Mismatch(f"{item!r} is {_seen(item)}") from None
    return tuple(checked)


def _phrase(annotation: Any, value: Any, mismatch: _Mismatch) -> str:
    if typing.get_origin(annotation) is Literal:
        return f"is not one of {', '.join(map(str, typing.get_args(annotation)))}"
    if mismatch.detail:
        return f"must be {_describe(annotation)}; {mismatch.detail}"
    return f"must be {_describe(annotation)}, not {_seen(value)}"


def _describe(annotation: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _NAMES:
        return _NAMES[annotation][plural]
    if annotation is Any:
        return "anything"
    if origin is Literal:
        return f"one of {', '.join(map(repr, args))}"
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(arm, plural) for arm in args)
    if annotation is tuple or origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0], plural=True)}"
        if args and len(set(args)) == 1:
            return f"a list of {len(args)} {_describe(args[0], plural=True)}"
        return f"a list of ({', '.join(_describe(arm) for arm in args)})" if args else "a list"
    if origin is dict:
        return _NAMES[dict][plural]
    name = getattr(annotation, "__name__", str(annotation))
    return f"{name}s" if plural else f"a {name}"


def _seen(value: Any) -> str:
    """What the value is, as the error message says it."""
    if value is None:
        return "None"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, str):
        return "a string"
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


__all__ = ["check_fields"]
