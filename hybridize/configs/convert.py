"""`ConvertConfig`, the options of `hybridize.convert` (re-exported there), the per-mixer init options and the
choices it checks.

`MIXER_INITS` is the torch-free half of the conversion registry (`hybridize.convert.registry.INITIALIZERS` is the
other half): one entry per mixer that `convert` can create, saying its init options class and which `mixer_init`
values apply to it. `ConvertConfig` reads it when it checks itself, so an entry added at run time (a test's toy mixer)
is a convertible mixer from then on.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from ..validation import check_fields

MIXER_INIT_CHOICES = ("attention", "random", "zero", "calibrated")
SELECTIONS = ("uniform", "lazy", "sensitivity", "random", "dynamic")


@dataclass(frozen=True, kw_only=True)
class Mamba2InitConfig:
    """Init options of a Mamba2 mixer converted from attention (`hybridize.convert.mamba2`).

    Args:
        conv_init (`str`, *optional*, defaults to `"delta"`): `"delta"` (identity convolution at step 0) or
            `"random"` (PyTorch's default, as published by MambaInLlama).
    """

    conv_init: Literal["random", "delta"] = "delta"

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True, kw_only=True)
class NoInitOptions:
    """The init options of a mixer that has none (NHA and streaming today; the default of `register_mixer`)."""


@dataclass(frozen=True, kw_only=True)
class MixerInit:
    """What `ConvertConfig` knows of a convertible mixer without importing it.

    Args:
        options_class (`type`): the frozen dataclass of its init options (`ConvertConfig.init_options`), which checks
            them in its `__post_init__`.
        has_readout (`bool`, *optional*, defaults to `False`): the mixer has a new readout, which
            `mixer_init="zero"` zeroes and `"calibrated"` fits (the default init of such a mixer is `"calibrated"`,
            else `"attention"`).
        allows_random (`bool`, *optional*, defaults to `False`): `mixer_init="random"` (the weights it would copy
            from attention drawn fresh) applies.
    """

    options_class: type
    has_readout: bool = False
    allows_random: bool = False


MIXER_INITS: dict[str, MixerInit] = {
    "gdn": MixerInit(options_class=NoInitOptions, has_readout=True, allows_random=True),
    "mamba2": MixerInit(options_class=Mamba2InitConfig, has_readout=True, allows_random=True),
    "nha": MixerInit(options_class=NoInitOptions, has_readout=True),
    "streaming": MixerInit(options_class=NoInitOptions),
}
# the convertible mixers, a live view of `MIXER_INITS` (an entry added later is in it)
CONVERT_MIXERS = MIXER_INITS.keys()


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """How to convert a model.

    Args:
        mixer (`str`, *optional*, defaults to `"mamba2"`): the mixer that replaces attention in converted layers:
            `mamba2`, `nha`, `gdn` or `streaming` (the keys of `MIXER_INITS`).
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
        conv_init (`str`, *optional*): Mamba2 only, the same as `init_options={"conv_init": ...}`: `"delta"`
            (identity convolution at step 0, the default) or `"random"` (PyTorch's default, as published by
            MambaInLlama). See README for the measured difference. Given in both places, the two must agree; after
            the checks both hold the value used (`None` here for a mixer without the option).
        mixer_init (`str`, *optional*): how the new mixer starts. `"calibrated"` (the default for mamba2 and nha):
            q/k/v reused as below, then each converted layer's readout (`out_proj` / `o_proj`) refit in closed form,
            in layer order, onto the source attention's output on calibration text (`hybridize/convert/calibrated.py`;
            needs the tokenizer). `"attention"` (the default for streaming): the published mapping as is
            (MambaInLlama for Mamba2: C <- W_q, B <- W_k, x <- W_v, out <- W_o; the source's q/k/v/o for NHA).
            `"zero"`: the mapping with the readout zeroed (the layer starts as if its mixer were removed).
            `"random"` (Mamba2 only): x, B, C and out_proj drawn fresh, the ablation that shows what the reuse buys.
        init_options (`dict`, *optional*): options of the mixer's initialiser, checked by its options class in
            `MIXER_INITS` (`Mamba2InitConfig`: `conv_init`; none for nha and streaming). After the checks it holds
            every option, the defaults included, so that `hybridize.json` records them.
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
    conv_init: str | None = None
    mixer_init: str | None = None
    init_options: dict = field(default_factory=dict)
    seed: int = 0
    calibration: str = "wiki"
    calibration_docs: int = 8
    calibration_len: int = 2048

    def __post_init__(self):
        check_fields(self, distinct=("attn_layers",))
        if self.mixer not in MIXER_INITS:
            raise ConfigError(f"mixer {self.mixer!r} is not supported; choose one of {sorted(MIXER_INITS)}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in [0, 1] (the fraction of layers converted), got {self.ratio}")
        entry = MIXER_INITS[self.mixer]
        object.__setattr__(self, "init_options", self._checked_init_options(entry.options_class))
        if self.mixer_init is None:  # the best measured start of each mixer (README: calibrated initialisation)
            object.__setattr__(self, "mixer_init", "calibrated" if entry.has_readout else "attention")
        if self.mixer_init not in MIXER_INIT_CHOICES:
            raise ConfigError(f"mixer_init must be one of {MIXER_INIT_CHOICES}, got {self.mixer_init!r}")
        if self.mixer_init == "random" and not entry.allows_random:
            ablated = "/".join(name.capitalize() for name, init in MIXER_INITS.items() if init.allows_random)
            raise ConfigError(
                f"mixer_init='random' is a {ablated} ablation; the {self.mixer} mixer reuses attention as is"
            )
        if self.mixer_init in ("zero", "calibrated") and not entry.has_readout:
            readout = ", ".join(name for name, init in MIXER_INITS.items() if init.has_readout)
            raise ConfigError(
                f"mixer_init={self.mixer_init!r} sets the readout of a new mixer ({readout}); the "
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

    def _checked_init_options(self, options_class: type) -> dict:
        """`init_options` with `conv_init` folded in, checked by `options_class`, every option filled in."""
        options = dict(self.init_options)
        if self.conv_init is not None:
            if options.setdefault("conv_init", self.conv_init) != self.conv_init:
                raise ConfigError(
                    f"conv_init={self.conv_init!r} and init_options conv_init={options['conv_init']!r} disagree; "
                    "give it once"
                )
        names = {f.name for f in dataclasses.fields(options_class)}
        if unknown := sorted(set(options) - names):
            raise ConfigError(
                f"init option(s) {unknown} do not apply to the {self.mixer} mixer; its init options are "
                f"{sorted(names) or 'none'}"
            )
        checked = dataclasses.asdict(options_class(**options))
        object.__setattr__(self, "conv_init", checked.get("conv_init"))
        return checked

    @property
    def init_config(self):
        """The init options as an instance of the mixer's options class (e.g. `Mamba2InitConfig`)."""
        return MIXER_INITS[self.mixer].options_class(**self.init_options)


__all__ = [
    "CONVERT_MIXERS",
    "MIXER_INITS",
    "MIXER_INIT_CHOICES",
    "SELECTIONS",
    "ConvertConfig",
    "Mamba2InitConfig",
    "MixerInit",
    "NoInitOptions",
]
