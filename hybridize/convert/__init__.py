"""Turn a pretrained Llama-family model into a hybrid: `convert(model, ConvertConfig(...)) -> HybridForCausalLM`.

Embeddings, norms, MLPs and the head are copied; the selected layers' attention is replaced by a new mixer
initialised from it (`INITIALIZERS`, `registry.py`: one entry per mixer), the other layers keep their attention
unchanged. `convert` works on models in memory; `convert_to_disk` (`to_disk.py`) streams a checkpoint layer by layer
into a saved hybrid, with the same steps (`plan.py`).
"""

import logging

import torch
from transformers import PreTrainedModel

from ..configs.convert import CONVERT_MIXERS, SELECTIONS, ConvertConfig
from ..modeling import MIXERS, HybridForCausalLM
from .calibrated import calibrate_readouts
from .plan import check_convert, convert_layer, plan_conversion, record_conversion
from .registry import INITIALIZERS, Initializer, hybrid_config_for
from .to_disk import convert_to_disk

logger = logging.getLogger(__name__)


@torch.no_grad()
def convert(
    model: PreTrainedModel, config: ConvertConfig, *, tokenizer=None, progress: bool = False
) -> HybridForCausalLM:
    """Build a hybrid of `model`, converting `config.ratio` of its layers to `config.mixer`.

    `model` is not modified; the result shares no tensors with it. Both models are in memory together;
    `convert_to_disk` converts a checkpoint layer by layer instead, into the same result.

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
    plan = plan_conversion(model, config, tokenizer=tokenizer, progress=progress)
    config, converted, hybrid_config = plan.config, plan.converted, plan.hybrid_config
    num_layers = hybrid_config.num_hidden_layers
    generator = torch.Generator().manual_seed(config.seed)

    hybrid = HybridForCausalLM(hybrid_config).to(model.dtype).eval()
    hybrid.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    hybrid.model.norm.load_state_dict(model.model.norm.state_dict())
    if not hybrid_config.tie_word_embeddings:
        hybrid.lm_head.load_state_dict(model.lm_head.state_dict())
    layers = zip(model.model.layers, hybrid.model.layers)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(list(layers), desc="convert", unit="layer")
    for i, (src_layer, layer) in enumerate(layers):
        convert_layer(src_layer, layer, i, plan, generator)
    reports = {}
    if config.mixer_init == "calibrated" and converted:
        fit = INITIALIZERS[config.mixer].calibrate
        reports = calibrate_readouts(model, hybrid, plan.blocks(), converted, calibrate=fit, progress=progress)
    record_conversion(hybrid, model, plan, reports)
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
    "convert_to_disk",
    "hybrid_config_for",
]
