"""Turn a pretrained Llama-family model into a hybrid: `convert(model, ConvertConfig(...)) -> HybridForCausalLM`.

Embeddings, norms, MLPs and the head are copied; the selected layers' attention is replaced by a new mixer
initialised from it (`INITIALIZERS`, `registry.py`: one entry per mixer), the other layers keep their attention
unchanged.
"""

import dataclasses
import functools
import logging
import time

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ..configs.convert import CONVERT_MIXERS, SELECTIONS, ConvertConfig
from ..errors import ConfigError
from ..io.calibration import calibration_blocks
from ..modeling import MIXERS, HybridForCausalLM
from ..modeling.streaming import StreamingMixerConfig
from ..provenance import record_step
from .calibrated import calibrate_readouts, zero_readout
from .lazy import lazy_frequency, measure_lazy_ratios
from .registry import INITIALIZERS, Initializer, hybrid_config_for
from .selection import num_converted, select_layers
from .sensitivity import layer_sensitivity

logger = logging.getLogger(__name__)


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


def _rounded(report: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in report.items()}


@torch.no_grad()
def convert(
    model: PreTrainedModel, config: ConvertConfig, *, tokenizer=None, progress: bool = False
) -> HybridForCausalLM:
    """Build a hybrid of `model`, converting `config.ratio` of its layers to `config.mixer`.

    `model` is not modified; the result shares no tensors with it. Works layer by layer.

    Args:
        model (`PreTrainedModel`): a Llama, Mistral or Qwen2 causal LM (or a hybrid with all-attention layers).
        config (`ConvertConfig`): what to convert and how.
        tokenizer (*optional*): the model's tokenizer; needed by `mixer_init="calibrated"` and `select="lazy"` or
            `"sensitivity"` to cut their calibration text.
        progress (`bool`, *optional*): show a progress bar over layers.

    Returns:
        `HybridForCausalLM`: the hybrid, with the step recorded for `hybridize.json`.

    Example:
        ```python
        >>> model, tokenizer = hybridize.load("llama")
        >>> hybrid = convert(model, ConvertConfig(ratio=0.5), tokenizer=tokenizer)
        ```
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
    generator = torch.Generator().manual_seed(config.seed)

    hybrid = HybridForCausalLM(hybrid_config).to(model.dtype).eval()
    hybrid.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    hybrid.model.norm.load_state_dict(model.model.norm.state_dict())
    if not hybrid_config.tie_word_embeddings:
        hybrid.lm_head.load_state_dict(model.lm_head.state_dict())
    layers = zip(model.model.layers, hybrid.model.layers, mixer_types)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(list(layers), desc="convert", unit="layer")
    for i, (src_layer, layer, mixer_type) in enumerate(layers):
        layer.input_layernorm.load_state_dict(src_layer.input_layernorm.state_dict())
        layer.post_attention_layernorm.load_state_dict(src_layer.post_attention_layernorm.state_dict())
        layer.mlp.load_state_dict(src_layer.mlp.state_dict())
        if mixer_type == "attention":
            layer.mixer.load_state_dict(src_layer.self_attn.state_dict())
        else:
            layer.mixer = INITIALIZERS[mixer_type].build(src_layer.self_attn, hybrid_config, i, config, generator)
    if config.mixer_init == "zero":
        for i in converted:
            zero_readout(hybrid.model.layers[i].mixer)
    elif config.mixer_init == "calibrated" and converted:
        fit = INITIALIZERS[config.mixer].calibrate
        reports = calibrate_readouts(model, hybrid, blocks(), converted, calibrate=fit, progress=progress)
        metrics["readout"] = {str(i): _rounded(r) for i, r in reports.items()}
    hybrid.generation_config = model.generation_config
    hybrid.hybridize_steps = list(getattr(model, "hybridize_steps", []))
    record_step(
        hybrid,
        "convert",
        config,
        metrics={"seconds": round(time.perf_counter() - start, 2), "converted_layers": converted, **metrics},
        source=getattr(model, "name_or_path", None) or None,
    )
    logger.info("converted %d of %d layers to %s", len(converted), num_layers, config.mixer)
    return hybrid


def as_hybrid(model: PreTrainedModel, *, progress: bool = False) -> HybridForCausalLM:
    """`model` as a hybrid: a hybrid is returned as is, a dense source becomes the same model as a ratio-0 hybrid
    (every layer keeps its attention; a copy, seconds). The compress transformations start from it.

    Args:
        model (`PreTrainedModel`): a `HybridForCausalLM`, or a Llama, Mistral or Qwen2 causal LM.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar over layers.

    Returns:
        `HybridForCausalLM`: `model` itself, or its ratio-0 conversion.

    Example: `hybrid = as_hybrid(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M"))`
    """
    if isinstance(model, HybridForCausalLM):
        return model
    return convert(model, ConvertConfig(ratio=0.0), progress=progress)


assert set(INITIALIZERS) == set(CONVERT_MIXERS) <= set(MIXERS)  # the choices ConvertConfig checks

__all__ = [
    "INITIALIZERS",
    "Initializer",
    "SELECTIONS",
    "ConvertConfig",
    "as_hybrid",
    "check_convert",
    "convert",
    "hybrid_config_for",
]
