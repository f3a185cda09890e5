"""`ConvertConfig`, the options of `hybridize.convert` (re-exported there), and the choices it checks."""

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..validation import check_fields

CONVERT_MIXERS = ("mamba2", "nha", "streaming")  # mixers with an initializer (`hybridize.convert.INITIALIZERS`)
_CONV_INITS = ("random", "delta")
_MIXER_INITS = ("attention", "random", "zero", "calibrated")
_READOUT_MIXERS = ("mamba2", "nha")  # mixers with a new readout to zero or calibrate
SELECTIONS = ("uniform", "lazy", "sensitivity", "random", "dynamic")


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """How to convert a model.

    Args:
        mixer (`str`, *optional*, defaults to `"mamba2"`): the mixer that replaces attention in converted layers.
        ratio (`float`, *optional*, defaults to 0.5): fraction of layers converted, in [0, 1]; 0 keeps the source
            model as it is (as a hybrid), 1 converts every layer. Spread evenly as MambaInLlama does.
        attn_layers (`tuple[int, ...]`, *optional*): explicit layers that keep attention, each named once; overrides
            `ratio`.
        full_every (`int`, *optional*): keep attention in every `full_every`-th layer, layers N-1, 2N-1, ...
            (NHA's block pattern: 8 keeps 7, 15, 23 of 30 layers) and convert the others; it fills in
            `attn_layers`, so it overrides `ratio` and cannot be combined with `attn_layers` or a `select`.
        select (`str`, *optional*, defaults to `"uniform"`): how the converted layers are chosen when `attn_layers`
            is not given: `"uniform"` spreads them evenly, as MambaInLlama does; `"lazy"` takes the layers most often
            among the laziest on calibration text (LightTransfer-Train; needs the tokenizer); `"sensitivity"` converts
            the layers whose conversion alone moves the model least from its source (KL on calibration text, with
            this mixer and init; cached; needs the tokenizer; `hybridize/convert/sensitivity.py`); `"random"` draws
            them with `seed`; `"dynamic"` (streaming only) makes every layer a streaming layer with
            `dynamic_full_layers = num_layers - round(ratio · num_layers)`, so that the lazy layers are chosen per
            request at prefill (LightTransfer-Test).
        mixer_settings (`dict`, *optional*): settings of the new mixer, stored in `HybridConfig.mixers[mixer]` and
            checked by that mixer's config class (e.g. `{"chunk_size": 64}` for `mamba2`).
        conv_init (`str`, *optional*, defaults to `"delta"`): Mamba2 only: `"delta"` (identity convolution at
            step 0) or `"random"` (PyTorch's default, as published by MambaInLlama). See README for the measured
            difference.
        mixer_init (`str`, *optional*): how the new mixer starts. `"calibrated"` (the default for mamba2 and nha):
            q/k/v reused as below, then each converted layer's readout (`out_proj` / `o_proj`) refit in closed form,
            in layer order, onto the source attention's output on calibration text (`hybridize/convert/calibrated.py`;
            needs the tokenizer). `"attention"` (the default for streaming): the published mapping as is
            (MambaInLlama for Mamba2: C <- W_q, B <- W_k, x <- W_v, out <- W_o; the source's q/k/v/o for NHA).
            `"zero"`: the mapping with the readout zeroed (the layer starts as if its mixer were removed).
            `"random"` (Mamba2 only): x, B, C and out_proj drawn fresh, the ablation that shows what the reuse buys.
        seed (`int`, *optional*, defaults to 0): seeds the new parameters (gate, dt, conv) and `select="random"`, so
            a conversion repeats.
        calibration (`str`, *optional*, defaults to `"wiki"`): for `mixer_init="calibrated"` and `select="lazy"` or
            `"sensitivity"`: the calibration text, `"wiki"`
            (the packaged corpus' train split) or a data spec as `hybridize distill --data` takes it.
        calibration_docs (`int`, *optional*, defaults to 8): calibration blocks.
        calibration_len (`int`, *optional*, defaults to 2048): tokens per calibration block; for `select="lazy"` it
            must exceed sinks + window (the streaming settings, or 4 + 1020 for other mixers).

    Example:
        ```python
        >>> hybrid = convert(model, ConvertConfig(ratio=0.5), tokenizer=tokenizer)
        ```
    """

    mixer: str = "mamba2"
    ratio: float = 0.5
    attn_layers: tuple[int, ...] | None = None
    full_every: int | None = None
    select: str = "uniform"
    mixer_settings: dict = field(default_factory=dict)
    conv_init: str = "delta"
    mixer_init: str | None = None
    seed: int = 0
    calibration: str = "wiki"
    calibration_docs: int = 8
    calibration_len: int = 2048

    def __post_init__(self):
        check_fields(self, distinct=("attn_layers",))
        if self.mixer not in CONVERT_MIXERS:
            raise ConfigError(f"mixer {self.mixer!r} is not supported; choose one of {sorted(CONVERT_MIXERS)}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in [0, 1] (the fraction of layers converted), got {self.ratio}")
        if self.conv_init not in _CONV_INITS:
            raise ConfigError(f"conv_init must be one of {_CONV_INITS}, got {self.conv_init!r}")
        if self.mixer_init is None:  # the best measured start of each mixer (README: calibrated initialisation)
            object.__setattr__(self, "mixer_init", "calibrated" if self.mixer in _READOUT_MIXERS else "attention")
        if self.mixer_init not in _MIXER_INITS:
            raise ConfigError(f"mixer_init must be one of {_MIXER_INITS}, got {self.mixer_init!r}")
        if self.mixer_init == "random" and self.mixer != "mamba2":
            raise ConfigError(
                f"mixer_init='random' is a Mamba2 ablation; the {self.mixer} mixer reuses attention as is"
            )
        if self.mixer_init in ("zero", "calibrated") and self.mixer not in _READOUT_MIXERS:
            raise ConfigError(
                f"mixer_init={self.mixer_init!r} sets the readout of a new mixer ({', '.join(_READOUT_MIXERS)}); the "
                f"{self.mixer} mixer is the source attention itself: use mixer_init='attention'"
            )
        if self.full_every is not None and self.full_every < 1:
            raise ConfigError(f"full_every must be >= 1 (attention in every N-th layer), got {self.full_every}")
        if self.full_every is not None and (self.attn_layers is not None or self.select != "uniform"):
            raise ConfigError(
                f"full_every={self.full_every} fixes the attention layers; attn_layers={self.attn_layers} and "
                f"select={self.select!r} choose them too: give only one"
            )
        if self.select not in SELECTIONS:
            raise ConfigError(f"select {self.select!r} is not supported; choose one of {SELECTIONS}")
        if self.select == "dynamic" and self.mixer != "streaming":
            raise ConfigError(
                f"select='dynamic' chooses lazy streaming layers per request; mixer is {self.mixer!r}, "
                "use mixer='streaming'"
            )
        if self.select == "dynamic" and self.attn_layers is not None:
            raise ConfigError("select='dynamic' chooses the layers per request, attn_layers fixes them: give one")
        if self.calibration_docs < 1 or self.calibration_len < 2:
            raise ConfigError(
                f"calibration_docs must be >= 1 and calibration_len >= 2, got {self.calibration_docs} and "
                f"{self.calibration_len}"
            )
        if self.attn_layers is not None:
            object.__setattr__(self, "attn_layers", tuple(sorted(self.attn_layers)))


__all__ = ["CONVERT_MIXERS", "SELECTIONS", "ConvertConfig"]
