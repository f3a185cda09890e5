"""Attention -> Native Hybrid Attention initialisation (NHA, arXiv 2510.07019; research/methods-conversion.md §3.3).

q/k/v/o and their biases are the source's, unchanged: the window path is the source attention. The new gate projection
`g_proj` (hidden -> n_kv · M, bias-free) is initialised from `k_proj`, as the NHA README says ("initialize the gate
projection using the key projection weights"), per KV head:

- M = head_dim: a copy of the head's k_proj block (slot m's gate reads key channel m);
- M < head_dim: the first M rows of each head's block;
- M > head_dim (ours; the paper only uses M <= head_dim): the head_dim rows, then M - head_dim random combinations of
  them, `R @ W_k_head` with R ~ N(0, 1/head_dim) drawn from the conversion seed. Repeating rows instead would give
  identical slots that receive identical gradients and never separate; random combinations keep every gate a linear
  function of the key, on the key's scale.

`k_proj`'s bias (Qwen2) is not carried over: `g_proj` has none, as in the paper's Qwen2 layer.
"""

import torch
from torch import nn

from ..modeling import HybridConfig
from ..modeling.nha import NHAMixer


@torch.no_grad()
def init_nha_from_attention(
    attn: nn.Module, config: HybridConfig, layer_idx: int, convert_config, generator: torch.Generator
) -> NHAMixer:
    """A new `NHAMixer` for layer `layer_idx` whose q/k/v/o (and biases) are those of the attention module `attn` and
    whose `g_proj` comes from its `k_proj`; `attn` is not modified. `convert_config` is unused (no NHA-specific
    conversion option); `generator` draws the extra gate rows when slots > head_dim."""
    mixer = NHAMixer(config, layer_idx).to(attn.q_proj.weight.dtype)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(mixer, name).load_state_dict(getattr(attn, name).state_dict())

    n, K, M = config.num_key_value_heads, config.head_dim, mixer.settings.slots
    w_k = attn.k_proj.weight.view(n, K, config.hidden_size)  # (n, K, hidden): one block per KV head
    gate = w_k[:, :M]  # M <= K: copy (M = K) or the first M rows
    if M > K:
        mix = torch.randn(n, M - K, K, generator=generator, dtype=torch.float32) / K**0.5  # (n, M - K, K)
        gate = torch.cat([w_k, (mix @ w_k.float()).to(w_k.dtype)], dim=1)
    mixer.g_proj.weight.copy_(gate.reshape(n * M, config.hidden_size))
    return mixer


__all__ = ["init_nha_from_attention"]
