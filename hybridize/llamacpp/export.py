"""Write a model as one GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs: `granitehybrid`
for attention + Mamba2 hybrids, `llama` for all-attention models (`tensors.py` says how each weight maps), the
tokenizer and chat template inside (`tokenizer.py`), weights at `outtype` (f32, f16, bf16, or q8_0 through the
`gguf` package's own quantiser, `gguf.quants`).

The file is written in two passes over the model, so that one tensor at a time is held beside it: the first computes
every tensor's shape and type (the header needs them), the second produces, converts and writes each in turn. It is
written to a temporary sibling and renamed into place at the end (`hybridize.saving.atomic_file`).
"""

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from torch import nn

from ..configs.export import ExportConfig
from ..errors import ConfigError
from ..saving import atomic_file, check_space
from .tensors import GGUFLayout, check_gguf_export, gguf_layout
from .tokenizer import add_tokenizer

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
_QTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_1": Q.Q4_1}
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}
# 4-bit files keep the vocabulary-wide matrices at 8 bits, as the shipped SmolLM2 Q4_1 file (llama-quantize) does
_EIGHT_BIT_IN_Q4 = ("token_embd.weight", "output.weight")


def _tensor_type(name: str, shape: tuple[int, ...], outtype: str, f32: frozenset[str] = frozenset()) -> Q:
    """As llama.cpp's converter chooses: vectors, norms, tensors not named `.weight` (biases, `ssm_a`, `ssm_d`) and
    the matrices a mixer's handler keeps in `f32` (the Mamba2 convolution: ggml's `ssm_conv` reads f32) stay f32; a
    matrix whose rows do not fill whole quantisation blocks falls back to f16. At q4_1 the token embedding and output
    head are q8_0."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name in f32:
        return Q.F32
    qtype = Q.Q8_0 if outtype == "q4_1" and name in _EIGHT_BIT_IN_Q4 else _QTYPES[outtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def _encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 -> the bytes (or half floats) of `qtype`, through `gguf.quants`."""
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def _encoded_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_bytes


def _plan(layout: GGUFLayout, outtype: str) -> dict[str, tuple[tuple[int, ...], Q]]:
    """Pass one: every tensor's shape and type, produced and dropped one at a time."""
    plan = {}
    for name, make in layout.tensors.items():
        shape = make().shape
        plan[name] = (shape, _tensor_type(name, shape, outtype, layout.f32))
    return plan


def _add_metadata(writer: gguf.GGUFWriter, layout: GGUFLayout, name: str, outtype: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for method, value in layout.hparams.items():
        getattr(writer, method)(value)
    writer.add_file_type(_FILE_TYPES[outtype])
    if outtype in ("q8_0", "q4_1"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(
    model: nn.Module,
    output: str | Path,
    config: ExportConfig | None = None,
    *,
    tokenizer: Any,
    tokenizer_gguf: str | Path | None = None,
    overwrite: bool = False,
    inputs: tuple = (),
) -> Path:
    """Write `model` (not modified) with its tokenizer as the GGUF file `output`, atomically.

    Args:
        model (`nn.Module`): an attention + Mamba2 hybrid, an all-attention hybrid (ratio 0, pruned, fused), or a
            plain Llama/Mistral model without biases.
        output (`str` or `Path`): the `.gguf` file to create.
        config (`ExportConfig`, *optional*): `to="gguf"` and the `outtype` (default f32).
        tokenizer: the model's tokenizer; its files are written unless `tokenizer_gguf` is given.
        tokenizer_gguf (`str` or `Path`, *optional*): a GGUF file whose tokenizer fields are copied instead (the file
            the model came from: `hybridize.llamacpp.tokenizer_origin` finds it).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output`.
        inputs (*optional*): paths the model was read from, which `output` must not overlap.

    Returns:
        `Path`: `output`.

    Raises:
        `UnsupportedModelError`: a model no llama.cpp architecture computes (streaming or NHA layers, factorised
            linears, biases, no attention layer; see `check_gguf_export`), or a tokenizer it cannot write.
        `OutputExistsError`, `OutputError`: as `hybridize.save`.

    Example:
        ```python
        >>> export_gguf(hybrid, "out/gguf/smol-mamba50-f16.gguf", ExportConfig(to="gguf", outtype="f16"),
        ...             tokenizer=tokenizer)
        ```
    """
    config = config or ExportConfig(to="gguf")
    if config.to != "gguf":
        raise ConfigError(f"export_gguf writes to='gguf', got to={config.to!r}; use hybridize.export for that")
    check_gguf_export(model)
    output = Path(output)
    layout = gguf_layout(model)
    with atomic_file(output, overwrite=overwrite, inputs=inputs) as tmp:
        plan = _plan(layout, config.outtype)
        check_space(output.parent, sum(_encoded_bytes(s, q) for s, q in plan.values()), f"the GGUF file {output}")
        writer = gguf.GGUFWriter(tmp, layout.arch)
        try:
            _add_metadata(writer, layout, output.stem, config.outtype)
            add_tokenizer(writer, tokenizer, vocab_size=model.config.vocab_size, origin=tokenizer_gguf)
            for name, (shape, qtype) in plan.items():
                nbytes = _encoded_bytes(shape, qtype)
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, (shape, qtype) in plan.items():  # pass two: one tensor at a time
                writer.write_tensor_data(_encode(layout.tensors[name](), qtype))
        finally:
            writer.close()
    logger.info("wrote %s (%s, %s, %d tensors)", output, layout.arch, config.outtype, len(plan))
    return output


__all__ = ["export_gguf"]
