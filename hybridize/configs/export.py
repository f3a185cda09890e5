"""`ExportConfig`, the options of `hybridize.export` (re-exported there)."""

from dataclasses import dataclass

from ..errors import ConfigError
from ..validation import check_fields

TARGETS = ("granitemoehybrid",)


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Args: to (`str`, *optional*, defaults to `"granitemoehybrid"`): the native transformers model type."""

    to: str = "granitemoehybrid"

    def __post_init__(self):
        check_fields(self)
        if self.to not in TARGETS:
            raise ConfigError(f"export target {self.to!r} is not supported; choose one of {TARGETS}")


__all__ = ["TARGETS", "ExportConfig"]
