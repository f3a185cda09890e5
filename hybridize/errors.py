"""Errors meant for people: each names the problem, the value seen and the fix. `cli.main` prints them without a
traceback. `modeling/` raises plain `ValueError`/`TypeError` instead, since it must run where hybridize is not
installed."""


class HybridizeError(Exception):
    """Base class of every error hybridize raises on purpose."""


class ConfigError(HybridizeError, ValueError):
    """A setting is out of range or contradicts the model (e.g. `ratio=1.5`)."""


class UnsupportedModelError(HybridizeError):
    """The model's architecture is not one hybridize can convert (e.g. GPT-2, a mixture of experts)."""


class CheckpointError(HybridizeError):
    """A model path is missing, incomplete or corrupt."""


class OutputExistsError(HybridizeError):
    """The output directory exists and `overwrite` was not given."""


class DependencyError(HybridizeError):
    """An optional dependency a command needs is not installed (e.g. llama-cpp-python for the llama.cpp runtime)."""


class OutputError(HybridizeError):
    """The output cannot be written there: it overlaps an input, its parent is a file or read-only, no space."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DependencyError",
    "HybridizeError",
    "OutputError",
    "OutputExistsError",
    "UnsupportedModelError",
]
