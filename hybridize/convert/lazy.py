"""Lazy layers (LightTransfer, arXiv 2410.13846 §3): how much of its attention each layer puts on the first `sinks`
tokens and the last `window` tokens, measured on calibration documents, and which layers are the laziest.

A layer's lazy ratio on a document is r = mean over heads and the last `w_last` queries of the attention mass on
sinks ∪ window (`hybridize.modeling.streaming.lazy_ratio`: from log-sum-exps over key blocks, with the 1/sqrt(d)
scale, keys repeated over GQA groups and the causal mask inside the window). A high r means streaming loses little
there. LightTransfer-Train pre-selects the layers that are most often among a document's laziest: `laziest_layers`.
A document no longer than sinks + window gives r = 1 in every layer, which ranks nothing.
"""

import logging

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..errors import ConfigError
from ..io.calibration import calibrate
from ..modeling.streaming import lazy_ratio

logger = logging.getLogger(__name__)


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> its softmax attention module (`self_attn` of a source model; an attention or streaming mixer
    of a hybrid). Layers without one (Mamba2) are left out."""
    modules = {}
    for i, layer in enumerate(model.base_model.layers):
        module = getattr(layer, "self_attn", None) or getattr(layer, "mixer", None)
        if module is not None and all(hasattr(module, name) for name in ("q_proj", "k_proj", "scaling", "head_dim")):
            modules[i] = module
    return modules


def measure_lazy_ratios(
    model: nn.Module, blocks: torch.Tensor, *, sinks: int, window: int, w_last: int, progress: bool = False
) -> torch.Tensor:
    """The lazy ratio of every attention layer on every calibration block.

    Args:
        model (`nn.Module`): a Llama-family causal LM or a hybrid; not modified.
        blocks (`torch.LongTensor` of shape `(num_docs, seq_len)`): calibration documents, each one prompt.
        sinks (`int`), window (`int`): the streaming attention the layers would get.
        w_last (`int`): the last queries of each document averaged over.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `torch.Tensor` of shape `(num_docs, num_layers)`, float64; NaN for layers without attention.

    Example: `ratios = measure_lazy_ratios(model, blocks, sinks=4, window=1020, w_last=64)`
    """
    num_docs, seq_len = blocks.shape
    ratios = torch.full((num_docs, model.config.num_hidden_layers), torch.nan, dtype=torch.float64)
    w = min(w_last, seq_len)
    q_idx, k_idx = torch.arange(seq_len - w, seq_len)[None], torch.arange(seq_len)[None]

    def measure(layer_idx: int):
        def hook(doc: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (1, l, hidden)
            cos, sin = kwargs["position_embeddings"]
            query = module.q_proj(hidden[:, -w:]).view(1, w, -1, module.head_dim).transpose(1, 2)  # (1, h, w, d)
            key = module.k_proj(hidden).view(1, seq_len, -1, module.head_dim).transpose(1, 2)  # (1, g, l, d)
            query = apply_rotary_pos_emb(query, query, cos[:, -w:], sin[:, -w:])[0]
            key = apply_rotary_pos_emb(key, key, cos, sin)[0]
            ratio = lazy_ratio(
                query,
                key,
                q_idx.to(key.device),
                k_idx.to(key.device),
                sinks=sinks,
                window=window,
                scaling=module.scaling,
            )
            ratios[doc, layer_idx] = ratio.item()

        return hook

    hooks = {module: measure(i) for i, module in attention_modules(model).items()}
    calibrate(model, blocks, hooks, progress=progress)
    return ratios


def lazy_frequency(ratios: torch.Tensor, k: int) -> torch.Tensor:
    """(num_layers,) fraction of documents in which each layer is among the `k` laziest (highest ratio); NaN layers
    (no attention) are never counted."""
    ranked = ratios.nan_to_num(-torch.inf)
    counts = torch.zeros(ratios.shape[1], dtype=torch.float64)
    if k > 0:
        for row in ranked:
            counts[row.topk(k).indices] += 1
    return counts.masked_fill(ratios.isnan().all(0), torch.nan) / ratios.shape[0]


def laziest_layers(ratios: torch.Tensor, k: int) -> list[int]:
    """The `k` layers most often among a document's `k` laziest (LightTransfer-Train's pre-selection); ties go to the
    higher mean ratio, then the lower index.

    Args:
        ratios (`torch.Tensor` of shape `(num_docs, num_layers)`): from `measure_lazy_ratios`.
        k (`int`): how many layers to pick.

    Returns:
        `list[int]`: the picked layers, sorted.
    """
    candidates = [i for i in range(ratios.shape[1]) if not ratios[:, i].isnan().all()]
    if k > len(candidates):
        raise ConfigError(f"cannot pick {k} lazy layers: the model has {len(candidates)} attention layers")
    frequency, mean = lazy_frequency(ratios, k), ratios.nanmean(0)
    ranked = sorted(candidates, key=lambda i: (-frequency[i].item(), -mean[i].item(), i))
    return sorted(ranked[:k])


__all__ = ["attention_modules", "laziest_layers", "lazy_frequency", "measure_lazy_ratios"]
