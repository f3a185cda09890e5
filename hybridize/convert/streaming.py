"""Attention -> streaming attention (LightTransfer, arXiv 2410.13846): the streaming layer is the source attention
itself, restricted to sinks + a recent window, so its initialisation is a copy of q/k/v/o (and their biases). No
parameter is new, so nothing is drawn from the generator."""

import torch
from torch import nn

from ..modeling import HybridConfig
from ..modeling.streaming import StreamingMixer


@torch.no_grad()
def init_streaming_from_attention(
    attn: nn.Module, config: HybridConfig, layer_idx: int, convert_config, generator: torch.Generator
) -> StreamingMixer:
    """A new `StreamingMixer` for layer `layer_idx` holding a copy of the attention module `attn`'s projections
    (`q_proj`, `k_proj`, `v_proj`, `o_proj`, biases included); `attn` is not modified."""
    mixer = StreamingMixer(config, layer_idx).to(attn.q_proj.weight.dtype)
    mixer.load_state_dict(attn.state_dict())  # strict: the same parameters, none added
    return mixer


__all__ = ["init_streaming_from_attention"]
