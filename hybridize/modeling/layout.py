"""Weights stored the way a CPU's matrix-vector product reads them fastest.

`nn.Linear` keeps W as (out, in), row-major, and computes `x @ W.T`. For one decode token that is a GEMV over every
weight byte. On the CPU we measured (one thread, weights out of cache), MKL reads the transposed layout, W.T
contiguous (in, out), 1.7-2.4x faster for the wide matrices (more outputs than inputs: the lm_head, the MLP's gate and
up projections, Mamba2's in_proj) and 0.6-0.8x as fast for square and narrow ones (README "Speed and cache"). So
`transpose_weights_` re-stores each wide linear weight as the transpose of a contiguous (in, out) tensor. Its shape, values and the
`nn.Parameter` object are unchanged (so tied weights stay tied and every module's code is untouched); only the
strides differ, which `F.linear` passes to MKL as a transposed operand without a copy. `hybridize.save` writes the
standard layout (`standard_layout`); transformers' own `save_pretrained` refuses non-contiguous weights.

Only float32 weights change: bfloat16 products with a transposed weight leave MKL for a generic kernel on this CPU,
6x slower for a GEMV and 8x for a 512-row GEMM (measured one thread), so bfloat16 models keep the standard layout.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def is_transposed(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight is stored as the transpose of a contiguous tensor."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


def _store_transposed(linear: nn.Linear) -> None:
    """Re-store `linear.weight` as the transpose of a contiguous (in, out) tensor (same values and parameter)."""
    linear.weight.data = linear.weight.data.t().contiguous().t()


@torch.no_grad()
def transpose_weights_(model: nn.Module) -> int:
    """Re-store every wide float32 `nn.Linear` weight of `model` (out_features > in_features) in the transposed
    layout, in place; returns how many changed.

    For inference: training works too, but gains nothing. Embedding lookups of a tied lm_head read strided rows,
    which costs little next to the lm_head's full read per token.
    """
    changed, seen = 0, set()
    for module in model.modules():
        if (
            isinstance(module, nn.Linear)
            and module.out_features > module.in_features
            and module.weight.dtype == torch.float32
            and id(module.weight) not in seen
        ):
            seen.add(id(module.weight))
            if not is_transposed(module.weight):
                _store_transposed(module)
                changed += 1
    return changed


@contextlib.contextmanager
def standard_layout(model: nn.Module) -> Iterator[None]:
    """Inside the block every transposed linear weight is contiguous again (transformers' `save_pretrained` and
    safetensors write only contiguous tensors); the transposed layout is restored after."""
    transposed = [m for m in model.modules() if isinstance(m, nn.Linear) and is_transposed(m.weight)]
    with torch.no_grad():
        for module in transposed:
            module.weight.data = module.weight.data.contiguous()
    try:
        yield
    finally:
        with torch.no_grad():
            for module in transposed:
                if module.weight.is_contiguous():
                    _store_transposed(module)


__all__ = ["is_transposed", "standard_layout", "transpose_weights_"]
