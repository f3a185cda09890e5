"""`ExportConfig`, the options of `hybridize.export` and `hybridize.export_gguf` (re-exported there)."""

from dataclasses import dataclass

from ..errors import ConfigError
from ..validation import check_fields

# "gguf" is a file for llama.cpp (`hybridize.llamacpp.export`); the others are native transformers model types
TARGETS = ("granitemoehybrid", "gguf")
# tensor types of a GGUF export, named as llama.cpp's converter names them (`--outtype`)
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_1")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Args:
    to (`str`, *optional*, defaults to `"granitemoehybrid"`): the native transformers model type, or `"gguf"` for
        a llama.cpp file (`granitehybrid` for attention + Mamba2 hybrids, `llama` for all-attention models).
    outtype (`str`, *optional*, defaults to `"f32"`): with `to="gguf"`, the type of the weight matrices: `f32`,
        `f16`, `bf16`, `q8_0` or `q4_1` (quantised by the `gguf` package's own quantiser; at `q4_1` the token embedding
        and output head are `q8_0`, as in the shipped SmolLM2 Q4_1 file); norms, biases, SSM scalars and the
        Mamba2 convolution stay `f32`, as llama.cpp's converter keeps them.
    """

    to: str = "granitemoehybrid"
    outtype: str = "f32"

    def __post_init__(self):
        check_fields(self)
        if self.to not in TARGETS:
            raise ConfigError(f"export target {self.to!r} is not supported; choose one of {TARGETS}")
        if self.outtype not in OUTTYPES:
            raise ConfigError(f"outtype {self.outtype!r} is not supported; choose one of {OUTTYPES}")
        if self.to != "gguf" and self.outtype != "f32":
            raise ConfigError(f"outtype={self.outtype!r} applies to --to gguf only; {self.to} keeps the model's dtype")


__all__ = ["OUTTYPES", "TARGETS", "ExportConfig"]
