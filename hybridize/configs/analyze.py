"""`AnalyzeConfig`, the options of `hybridize.analyze` (re-exported by `hybridize.analyze`)."""

from dataclasses import dataclass

from ..errors import ConfigError
from ..validation import check_fields
from .convert import ConvertConfig


@dataclass(frozen=True, kw_only=True)
class AnalyzeConfig:
    """What to measure.

    Args:
        data (`str`, *optional*, defaults to `"wiki"`): calibration text: `"wiki"` (the packaged corpus' train split)
            or a local file, folder or Hub dataset as `hybridize distill --data` takes it.
        sinks (`int`, *optional*, defaults to 4): initial tokens a streaming layer keeps.
        window (`int`, *optional*, defaults to 1020): recent tokens a streaming layer keeps (the query included).
        w_last (`int`, *optional*, defaults to 64): last queries of each document averaged over (the paper finds
            8 to 64 equivalent).
        num_docs (`int`, *optional*, defaults to 8): calibration documents.
        seq_len (`int`, *optional*, defaults to 2048): tokens per document; only a document longer than
            sinks + window tells layers apart.
        ratio (`float`, *optional*, defaults to 0.5): fraction of layers reported as `selected`, as
            `convert --select lazy --ratio` would pick them.
        mixer (`str`, *optional*): also measure each layer's sensitivity to this mixer (`mamba2`, `nha`, `gdn`,
            `streaming`): the KL to the source with only that layer converted, as `convert --select sensitivity`
            does with the same calibration text (the scores are cached and shared with it).
        mixer_init (`str`, *optional*): the init used for the sensitivity (the mixer's default when omitted).

    Example: `analyze(model, tokenizer, AnalyzeConfig(window=508))`
    """

    data: str = "wiki"
    sinks: int = 4
    window: int = 1020
    w_last: int = 64
    num_docs: int = 8
    seq_len: int = 2048
    ratio: float = 0.5
    mixer: str | None = None
    mixer_init: str | None = None

    def __post_init__(self):
        check_fields(self)
        if self.sinks < 0 or self.window < 1 or self.w_last < 1:
            raise ConfigError(
                f"need sinks >= 0, window >= 1 and w_last >= 1, got sinks={self.sinks}, window={self.window}, "
                f"w_last={self.w_last}"
            )
        if self.num_docs < 1 or self.seq_len < 2:
            raise ConfigError(f"need num_docs >= 1 and seq_len >= 2, got {self.num_docs} and {self.seq_len}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in [0, 1] (the fraction of layers selected), got {self.ratio}")
        if self.mixer is not None:  # checked now, not after minutes of lazy-ratio measurement
            ConvertConfig(mixer=self.mixer, mixer_init=self.mixer_init)


__all__ = ["AnalyzeConfig"]
