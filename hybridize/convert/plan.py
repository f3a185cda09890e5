"""What a conversion does before and per layer, shared by the in-memory `convert` and the lazy `convert_to_disk`:
the checks and the choice of layers (`plan_conversion`, done once, before any layer is built) and one layer's
conversion (`convert_layer`: norms and MLP copied, attention kept or replaced by a new mixer from `INITIALIZERS`).
"""

import dataclasses
import functools
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from ..configs.convert import ConvertConfig
from ..errors import ConfigError
from ..io.calibration import calibration_blocks
from ..modeling import HybridConfig
from ..modeling.streaming import StreamingMixerConfig
from ..provenance import record_step
from .calibrated import zero_readout
from .lazy import lazy_frequency, measure_lazy_ratios
from .registry import INITIALIZERS, hybrid_config_for
from .selection import num_converted, select_layers
from .sensitivity import layer_sensitivity


def check_convert(model_config: PreTrainedConfig, config: ConvertConfig) -> None:
    """Check `config` against the source model's config, before any weights are read: the explicit attention layers
    must exist in the model.

    Raises:
        `ConfigError`: an `attn_layers` entry outside `0 .. num_hidden_layers - 1`.

    Example: `check_convert(load_config("llama"), ConvertConfig(attn_layers=(3, 7)))`
    """
    num_layers = model_config.num_hidden_layers
    if config.attn_layers is not None and (bad := [i for i in config.attn_layers if not 0 <= i < num_layers]):
        raise ConfigError(f"attn_layers {bad} out of range: the model has layers 0..{num_layers - 1}")


def _lazy_shape(config: ConvertConfig) -> StreamingMixerConfig:
    """The sinks and window lazy ratios are measured with: the streaming layers' own, or the defaults."""
    return StreamingMixerConfig(**config.mixer_settings) if config.mixer == "streaming" else StreamingMixerConfig()


def _lazy_ratios(model: PreTrainedModel, config: ConvertConfig, blocks: torch.Tensor, progress: bool) -> torch.Tensor:
    """(num_docs, num_layers) lazy ratios on the calibration blocks, with the streaming layers' sinks and window."""
    s = _lazy_shape(config)
    return measure_lazy_ratios(model, blocks, sinks=s.sinks, window=s.window, w_last=s.w_last, progress=progress)


def _check_lazy_length(config: ConvertConfig) -> None:
    s = _lazy_shape(config)
    if config.calibration_len <= s.sinks + s.window:
        raise ConfigError(
            f"calibration_len={config.calibration_len} must exceed sinks + window = {s.sinks + s.window}: shorter "
            "documents give every layer a lazy ratio of 1, which ranks nothing; raise calibration_len or lower window"
        )


def measures_whole_model(config: ConvertConfig) -> bool:
    """Whether choosing the layers runs the whole source model on calibration text (`select="lazy"` or
    `"sensitivity"` without explicit layers), which `convert_to_disk` does in memory."""
    return config.select in ("lazy", "sensitivity") and config.attn_layers is None and config.full_every is None


@dataclasses.dataclass
class ConversionPlan:
    """What `plan_conversion` decided.

    Args:
        config (`ConvertConfig`): the config as recorded: `full_every` written out as `attn_layers`, and for
            `select="dynamic"` the streaming layers' `dynamic_full_layers` setting added.
        converted (`list[int]`): the layers that get the new mixer.
        hybrid_config (`HybridConfig`): the hybrid's config, one mixer type per layer.
        metrics (`dict`): what choosing the layers measured (lazy ratios, sensitivities), for `hybridize.json`.
        blocks (`Callable`): the calibration blocks, cut on first call and kept.
        start (`float`): `time.perf_counter()` when the work began (the recorded `seconds` count from it).
    """

    config: ConvertConfig
    converted: list[int]
    hybrid_config: HybridConfig
    metrics: dict
    blocks: Callable[[], torch.Tensor]
    start: float


def plan_conversion(model: PreTrainedModel, config: ConvertConfig, *, tokenizer=None, progress: bool = False):
    """Check `config` against `model` and choose the converted layers; no layer is built yet.

    `model` may be a skeleton on the meta device unless `measures_whole_model(config)`: only its config and the
    presence of attention biases are read then.

    Raises:
        `ConfigError`: see `check_convert`; bad mixer settings; a calibration that needs the missing tokenizer.
    """
    check_convert(model.config, config)
    num_layers = model.config.num_hidden_layers
    if config.full_every is not None:  # recorded as the explicit layers it keeps
        kept = tuple(range(config.full_every - 1, num_layers, config.full_every))
        config = dataclasses.replace(config, attn_layers=kept, full_every=None)
    hybrid_config_for(model, [config.mixer] * num_layers, config)  # settings checked before any heavy work
    needs_text = []  # what measures the model on calibration text
    if config.mixer_init == "calibrated" and (config.ratio > 0 or config.attn_layers is not None):
        needs_text.append("mixer_init='calibrated'")
    if config.select in ("lazy", "sensitivity") and config.attn_layers is None:
        needs_text.append(f"select={config.select!r}")
    if config.select == "lazy" and config.attn_layers is None:
        _check_lazy_length(config)
    if needs_text and tokenizer is None:
        raise ConfigError(
            f"{' and '.join(needs_text)} measure the model on calibration text: pass its tokenizer "
            "(convert(model, config, tokenizer=tokenizer))"
        )

    @functools.cache
    def blocks() -> torch.Tensor:  # cut once, shared by the selection and the calibration
        return calibration_blocks(
            tokenizer, config.calibration, num_blocks=config.calibration_docs, seq_len=config.calibration_len
        )

    start = time.perf_counter()
    metrics = {}
    if config.select == "dynamic":  # LightTransfer-Test: every layer streams or not, per request
        converted = list(range(num_layers))
        full = num_layers - num_converted(num_layers, config.ratio)
        config = dataclasses.replace(config, mixer_settings={**config.mixer_settings, "dynamic_full_layers": full})
    else:
        lazy_ratios = None
        if config.select == "lazy" and config.attn_layers is None:
            lazy_ratios = _lazy_ratios(model, config, blocks(), progress)
            metrics["lazy_ratio"] = [round(r, 4) for r in lazy_ratios.nanmean(0).tolist()]
            k = num_converted(num_layers, config.ratio)
            metrics["lazy_frequency"] = [round(f, 4) for f in lazy_frequency(lazy_ratios, k).tolist()]
        sensitivity = None
        if config.select == "sensitivity" and config.attn_layers is None:
            sensitivity = layer_sensitivity(model, config, tokenizer, blocks=blocks(), progress=progress)
            metrics["sensitivity_kl"] = [float(f"{s:.4g}") for s in sensitivity]
        converted = select_layers(
            num_layers,
            ratio=config.ratio,
            attn_layers=config.attn_layers,
            select=config.select,
            seed=config.seed,
            lazy_ratios=lazy_ratios,
            sensitivity=sensitivity,
        )
    mixer_types = [config.mixer if i in converted else "attention" for i in range(num_layers)]
    hybrid_config = hybrid_config_for(model, mixer_types, config)
    return ConversionPlan(
        config=config,
        converted=converted,
        hybrid_config=hybrid_config,
        metrics=metrics,
        blocks=blocks,
        start=start,
    )


@torch.no_grad()
def convert_layer(
    src_layer: nn.Module, layer: nn.Module, layer_idx: int, plan: ConversionPlan, generator: torch.Generator
) -> None:
    """Fill the hybrid decoder layer `layer` from the source decoder layer `src_layer`: norms and MLP copied, the
    attention copied or replaced by the new mixer (its initialiser draws from `generator`, so layers must come in
    order), whose readout `mixer_init="zero"` zeroes. `src_layer` is not modified."""
    layer.input_layernorm.load_state_dict(src_layer.input_layernorm.state_dict())
    layer.post_attention_layernorm.load_state_dict(src_layer.post_attention_layernorm.state_dict())
    layer.mlp.load_state_dict(src_layer.mlp.state_dict())
    mixer_type = plan.hybrid_config.mixer_types[layer_idx]
    if mixer_type == "attention":
        layer.mixer.load_state_dict(src_layer.self_attn.state_dict())
        return
    layer.mixer = INITIALIZERS[mixer_type].build(
        src_layer.self_attn, plan.hybrid_config, layer_idx, plan.config, generator
    )
    if plan.config.mixer_init == "zero":
        zero_readout(layer.mixer)


def rounded(report: dict) -> dict:
    """A readout report with its floats rounded for `hybridize.json`."""
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in report.items()}


def record_conversion(hybrid: nn.Module, source: nn.Module, plan: ConversionPlan, reports: dict[int, dict]) -> None:
    """Give `hybrid` the source's generation config and history, plus the `convert` step with its metrics (the
    readout reports of the calibrated layers among them): the end of both `convert` and `convert_to_disk`."""
    if reports:
        plan.metrics["readout"] = {str(i): rounded(r) for i, r in reports.items()}
    hybrid.generation_config = source.generation_config
    hybrid.hybridize_steps = list(getattr(source, "hybridize_steps", []))
    metrics = {"seconds": round(time.perf_counter() - plan.start, 2), "converted_layers": plan.converted}
    record_step(
        hybrid,
        "convert",
        plan.config,
        metrics={**metrics, **plan.metrics},
        source=getattr(source, "name_or_path", None) or None,
    )


__all__ = [
    "ConversionPlan",
    "check_convert",
    "convert_layer",
    "measures_whole_model",
    "plan_conversion",
    "record_conversion",
    "rounded",
]
