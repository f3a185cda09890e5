"""Full softmax attention, exactly the source model's (Llama, Mistral, Qwen2): GQA, RoPE, optional biases.

Written against transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`, sdpa by default) so a ratio-0
conversion reproduces the source logits; parameter names match Llama's (`q_proj` ... `o_proj`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .configuration import HybridConfig


@dataclass(frozen=True, kw_only=True)
class AttentionMixerConfig:
    """The attention mixer has no settings of its own: it is the source's attention."""

    @classmethod
    def from_hybrid_config(cls, config: HybridConfig) -> "AttentionMixerConfig":
        settings = config.mixers.get("attention", {})
        if settings:
            raise ValueError(f"attention takes no settings, got {settings}")
        return cls()


def add_attention_projections(module: nn.Module, config: HybridConfig) -> None:
    """Give `module` the source attention's q/k/v/o linears (GQA sizes, biases as the family has them): shared by
    every mixer that keeps the source's projections, so conversion copies the same tensors into each."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    module.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
    module.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
    module.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
    module.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_out_bias)


class AttentionMixer(nn.Module):
    """Multi-head attention with grouped KV heads; keeps a growing KV cache."""

    settings_class = AttentionMixerConfig
    mask_type = "causal"  # the 4-D causal (and padding) mask built by transformers

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        add_attention_projections(self, config)

    @staticmethod
    def new_cache_layer(config: HybridConfig, layer_idx: int) -> DynamicLayer:
        return DynamicLayer()

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        # (b, heads, l, head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


__all__ = ["AttentionMixer", "AttentionMixerConfig"]
