"""Lazy conversion, checkpoint to checkpoint: `convert_to_disk(spec, output, config)` streams the source layer by layer
from its safetensors shards and writes the hybrid shard by shard, so memory holds one source layer and one hybrid
layer at a time (plus the embeddings once and the calibration's residual streams), never the two models.

It writes what `hybridize.save(hybridize.convert(model, config, tokenizer=tokenizer), output, tokenizer=tokenizer)`
writes, with the same weights: the steps are `convert`'s (`plan.py`: the plan, one layer's conversion; the sequential
readout fit of `calibrated.py`, one layer per step), run in the same order.

Layer choices that run the whole source model on calibration text (`select="lazy"` or `"sensitivity"`, without
explicit layers) load the source in memory for that measurement, free it, then convert lazily (logged).
"""

import logging
from pathlib import Path

import torch
from torch import nn

from ..configs.convert import ConvertConfig
from ..errors import CheckpointError
from ..io.memory import return_freed_memory
from ..io.shards import DEFAULT_MAX_SHARD_BYTES, LazyTensorLoader, ShardWriter
from ..modeling import HybridForCausalLM
from ..saving import atomic_output, check_output, check_space, model_bytes, save_without_weights
from ..sources import check_finite, load_lazy, load_source
from .calibrated import SequentialReadoutFit
from .plan import convert_layer, measures_whole_model, plan_conversion, record_conversion
from .registry import INITIALIZERS

logger = logging.getLogger(__name__)


def _read(loader: LazyTensorLoader, name: str, dtype: torch.dtype, spec: str) -> torch.Tensor:
    if name not in loader:
        raise CheckpointError(f"{spec} lacks the weight {name}; re-download or re-save the model")
    tensor = loader.get_tensor(name).to(dtype)
    check_finite(tensor, name, spec)
    return tensor


def _materialise(module: nn.Module, loader: LazyTensorLoader, prefix: str, dtype: torch.dtype, spec: str) -> None:
    """Give the meta-device `module` its weights from the checkpoint tensors under `prefix` (checked finite)."""
    wanted = module.state_dict().keys()
    state = {name: _read(loader, prefix + name, dtype, spec) for name in wanted}
    module.load_state_dict(state, assign=True)


@torch.no_grad()
def convert_to_disk(
    spec: str,
    output: str | Path,
    config: ConvertConfig,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert the model `spec` names into a hybrid saved at `output`, one layer at a time.

    The result is the directory `hybridize.save(hybridize.convert(...))` writes (config with `auto_map`, modeling
    code, generation config, tokenizer, `hybridize.json`; equal weights), written atomically. The input is only read.

    Args:
        spec (`str`): an alias, a local directory, a `.gguf` file (read from its dequantized cache) or a Hub id.
        output (`str` or `Path`): the directory to create.
        config (`ConvertConfig`): what to convert and how (see `convert`).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output`.
        trust_remote_code (`bool`, *optional*, defaults to `False`): whether to run the model's own code.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar over layers.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): the dtype the source is read in, as
            `hybridize.load(spec, dtype=...)`; the hybrid has it too.
        max_shard_bytes (`int`, *optional*): the largest weight file written (transformers' 50 GB by default).

    Returns:
        `Path`: the output directory.

    Raises:
        `OutputExistsError`, `OutputError`: see `hybridize.save`, checked before any work.
        `CheckpointError`, `UnsupportedModelError`, `ConfigError`: as `load` and `convert`; a weight that is missing,
            corrupt or not finite stops the conversion and leaves nothing at `output`.

    Example:
        ```python
        >>> convert_to_disk("llama", "out/smol-mamba50", ConvertConfig(ratio=0.5))
        PosixPath('out/smol-mamba50')
        ```
    """
    output = Path(output)
    check_output(output, overwrite=overwrite, inputs=[spec])
    source, tokenizer, loader = load_lazy(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    if measures_whole_model(config):
        logger.info(
            "select=%r runs the whole source on calibration text: loading it in memory to choose the layers, "
            "then converting layer by layer",
            config.select,
        )
        model, _ = load_source(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        plan = plan_conversion(model, config, tokenizer=tokenizer, progress=progress)
        del model
    else:
        plan = plan_conversion(source, config, tokenizer=tokenizer, progress=progress)
    config, hybrid_config = plan.config, plan.hybrid_config
    with torch.device("meta"):
        hybrid = HybridForCausalLM(hybrid_config).to(dtype)
    hybrid.eval()
    generator = torch.Generator().manual_seed(config.seed)
    fit, reports = None, {}

    with atomic_output(output, overwrite=overwrite, inputs=[spec]) as tmp:
        check_space(output.parent, model_bytes(hybrid), f"the model ({output})")
        with ShardWriter(tmp, max_shard_bytes=max_shard_bytes) as writer:
            # Embeddings, final norm and (untied) head: once
            embed = _read(loader, "model.embed_tokens.weight", dtype, spec)
            writer.add("model.embed_tokens.weight", embed)
            writer.add("model.norm.weight", _read(loader, "model.norm.weight", dtype, spec))
            if not hybrid_config.tie_word_embeddings:
                writer.add("lm_head.weight", _read(loader, "lm_head.weight", dtype, spec))
            if config.mixer_init == "calibrated" and plan.converted:
                hybrid.model.embed_tokens.load_state_dict({"weight": embed}, assign=True)
                rotary = type(hybrid.model.rotary_emb)(config=hybrid_config).to(dtype)  # its buffers are not on meta
                fit = SequentialReadoutFit(
                    hybrid.model.embed_tokens,
                    rotary,
                    plan.blocks(),
                    plan.converted,
                    calibrate=INITIALIZERS[config.mixer].calibrate,
                )
                hybrid.model.embed_tokens.to("meta")
            del embed
            loader.release()
            return_freed_memory()

            # Decoder layers: read source layer i, build hybrid layer i, fit it, write it, free both
            layers = range(hybrid_config.num_hidden_layers)
            if progress:
                from tqdm.auto import tqdm

                layers = tqdm(layers, desc="convert", unit="layer")
            for i in layers:
                src_layer = source.model.layers[i]
                _materialise(src_layer, loader, f"model.layers.{i}.", dtype, spec)
                layer = type(hybrid.model.layers[i])(hybrid_config, i).to(dtype).eval()
                convert_layer(src_layer, layer, i, plan, generator)
                layer.eval()  # a new mixer starts in training mode
                if fit is not None and not fit.done and (report := fit.step(i, src_layer, layer)) is not None:
                    reports[i] = report
                for name, tensor in layer.state_dict().items():
                    writer.add(f"model.layers.{i}.{name}", tensor)
                src_layer.to("meta")
                del layer
                loader.release()
                return_freed_memory()
        record_conversion(hybrid, source, plan, reports)
        save_without_weights(hybrid, tmp, tokenizer=tokenizer)
    logger.info("converted %d of %d layers to %s", len(plan.converted), hybrid_config.num_hidden_layers, config.mixer)
    return output


__all__ = ["convert_to_disk"]
