"""Full softmax attention, exactly the source model's (Llama, Mistral, Qwen2): GQA, RoPE, optional biases.

Written against transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`, sdpa by default) so a ratio-0
conversion reproduces the source logits; parameter names match Llama's (`q_proj` ... `o_proj`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .configuration import HybridConfig, mixer_settings
from .mixer import Mixer


@dataclass(frozen=True, kw_only=True)
class AttentionMixerConfig:
    """Settings of the attention mixers of a hybrid (stored in `HybridConfig.mixers["attention"]`): the source's
    attention has no settings of its own, only the choice of path.

    Args:
        impl (`str`, *optional*, defaults to `"auto"`): `"auto"` runs the model's attention implementation
            (`config._attn_implementation`, sdpa by default) and the grouped SDPA for a few queries over a cache;
            `"ref"` forces `attention_ref`, softmax over an explicit mask (for debugging).
    """

    impl: Literal["auto", "ref"] = "auto"

    def __post_init__(self):
        if self.impl not in ("auto", "ref"):
            raise ValueError(f"attention impl must be 'auto' or 'ref', got {self.impl!r}")

    @classmethod
    def from_hybrid_config(cls, config: HybridConfig) -> "AttentionMixerConfig":
        """The settings in `config.mixers["attention"]`; missing ones keep their defaults."""
        return mixer_settings(cls, config, "attention")


def add_attention_projections(module: nn.Module, config: HybridConfig) -> None:
    """Give `module` the source attention's q/k/v/o linears (GQA sizes, biases as the family has them): shared by
    every mixer that keeps the source's projections, so conversion copies the same tensors into each."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    module.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
    module.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
    module.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
    module.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_out_bias)


class PreallocatedKVLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers written in place: appending a token copies that token
    only, where `DynamicLayer` concatenates (copies) the whole cache at every step.

    The buffers (b, kv_heads, capacity, head_dim) grow by doubling (at least 64 positions, at most `max_length` while
    that suffices; never refused), and `keys`/`values` are views of their first `get_seq_length()` positions, so
    everything that reads a `DynamicLayer` reads this one alike. `crop` moves the end (speculative rollback). While
    autograd records (inputs that require grad), it concatenates like `DynamicLayer`, so no saved tensor is written.

    Args:
        max_length (`int`, *optional*): a length the cache is not expected to exceed (the model's
            `max_position_embeddings`): doubling stops there.
    """

    min_growth = 64

    def __init__(self, max_length: int | None = None):
        super().__init__()
        self.max_length = max_length
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._use(key_states[..., :0, :].clone(), value_states[..., :0, :].clone(), 0)
        self.is_initialized = True

    def _use(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Hold these buffers with `length` positions filled; `keys`/`values` view the filled part."""
        self.key_buffer, self.value_buffer, self.length = key_buffer, value_buffer, length
        self.keys, self.values = key_buffer[..., :length, :], value_buffer[..., :length, :]

    def _grow(self, needed: int) -> None:
        """Reallocate both buffers to hold at least `needed` positions, keeping the filled ones."""
        capacity = max(needed, 2 * self.key_buffer.shape[-2], self.min_growth)
        if self.max_length is not None and needed <= self.max_length:
            capacity = min(capacity, self.max_length)
        buffers = []
        for old in (self.key_buffer, self.value_buffer):
            new = old.new_empty(*old.shape[:-2], capacity, old.shape[-1])
            new[..., : self.length, :].copy_(old[..., : self.length, :])
            buffers.append(new)
        self._use(*buffers, self.length)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            keys, values = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
            self._use(keys, values, end)
            return self.keys, self.values
        if end > self.key_buffer.shape[-2]:
            self._grow(end)
        self.key_buffer[..., self.length : end, :].copy_(key_states)
        self.value_buffer[..., self.length : end, :].copy_(value_states)
        self._use(self.key_buffer, self.value_buffer, end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (a negative count, as `DynamicLayer.crop` takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._use(self.key_buffer, self.value_buffer, max(0, self.length + tokens_to_remove))

    # Batch changes (beam search, num_return_sequences) keep only the filled positions; the next update regrows
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length > 0:
            beam_idx = beam_idx.to(self.keys.device)
            self._use(self.keys.index_select(0, beam_idx), self.values.index_select(0, beam_idx), self.length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length > 0:
            keys, values = self.keys.repeat_interleave(repeats, 0), self.values.repeat_interleave(repeats, 0)
            self._use(keys, values, self.length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length > 0:
            self._use(self.keys[indices, ...], self.values[indices, ...], self.length)

    def offload(self):
        if self.is_initialized:
            self._use(
                self.key_buffer.to("cpu", non_blocking=True),
                self.value_buffer.to("cpu", non_blocking=True),
                self.length,
            )

    def prefetch(self):
        if self.is_initialized and self.key_buffer.device != self.device:
            self._use(
                self.key_buffer.to(self.device, non_blocking=True),
                self.value_buffer.to(self.device, non_blocking=True),
                self.length,
            )


def attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The definition: softmax(q kᵀ · scaling, masked) v, with keys and values repeated over the GQA groups as
    `repeat_kv` does and the softmax in float32 at least (eager attention takes it in float32 even for float64).

    Args:
        query (`torch.Tensor`): (b, h, lq, d).
        key (`torch.Tensor`), value (`torch.Tensor`): (b, kv, lk, d), h a multiple of kv; the queries are the last lq.
        mask (`torch.Tensor`, *optional*): the mask transformers built for the model's attention implementation:
            (b, 1, lq, lk) boolean (True: attend) or additive, or (b, lk) padding (flash attention), or `None` (causal).
        scaling (`float`): the softmax scale.
        dropout (`float`, *optional*, defaults to 0.0), training (`bool`, *optional*): attention dropout.

    Returns:
        `torch.Tensor`: (b, lq, h, d), as transformers' attention functions return it; a query that sees no key gives 0.
    """
    lq, lk = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)  # (b, h, lk, d)
    scores = (query @ key.transpose(-1, -2)) * scaling  # (b, h, lq, lk)
    if mask is None or mask.dim() == 2:  # query i is key lk - lq + i
        visible = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)[None, None]
        mask = visible if mask is None else visible & mask[:, None, None, -lk:].bool()
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., :lk], -torch.inf)
    else:
        scores = scores + mask[..., :lk]
    dtype = torch.promote_types(scores.dtype, torch.float32)
    probs = F.softmax(scores, dim=-1, dtype=dtype).nan_to_num(0.0).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return (probs @ value).transpose(1, 2)


def sdpa_grouped(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """SDPA with GQA for a few queries over a KV cache, without repeating the cache: the r query heads of each KV head
    become r·l queries of that head, and the (b, 1, l, n) mask is repeated for them instead (r·l·n entries, not
    2·h·n·d). transformers' sdpa path repeats the keys and values for every call with a mask (8 ms per layer at 2K
    cached tokens on one CPU thread for 5 queries, against 0.6 ms here), and speculative verification is such a call.

    Args:
        query (`torch.Tensor`): (b, h, l, d).
        key (`torch.Tensor`), value (`torch.Tensor`): (b, kv, n, d), h a multiple of kv.
        mask (`torch.Tensor`): (b, 1, l, n), boolean (True: attend) or additive.
        scaling (`float`): the softmax scale.

    Returns:
        `torch.Tensor`: (b, l, h, d), as transformers' attention functions return it.
    """
    b, h, l, d = query.shape
    kv, n = key.shape[1], key.shape[2]
    r = h // kv
    query = query.reshape(b, kv, r * l, d)  # query head i reads KV head i // r, as `repeat_kv`
    mask = mask[:, :, None].expand(b, 1, r, l, n).reshape(b, 1, r * l, n)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)  # (b, kv, r·l, d)
    return out.view(b, h, l, d).transpose(1, 2)


class AttentionMixer(Mixer):
    """Multi-head attention with grouped KV heads; keeps a growing KV cache written in place."""

    settings_class = AttentionMixerConfig
    mask_type = "causal"  # the 4-D causal (and padding) mask built by transformers
    max_grouped_queries = 64  # `sdpa_grouped` repeats the mask per query head: worth it for a few queries only

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.settings = self.settings_class.from_hybrid_config(config)
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        add_attention_projections(self, config)

    @staticmethod
    def new_cache_layer(config: HybridConfig, layer_idx: int) -> PreallocatedKVLayer:
        return PreallocatedKVLayer(max_length=config.max_position_embeddings)

    def _few_queries_over_cache(self, query, key, mask) -> bool:
        """Whether `sdpa_grouped` computes this call (the sdpa implementation, GQA, 2 to 64 queries after cached
        tokens with a mask shared by the heads): speculative verification, K + 1 tokens."""
        return (
            self.settings.impl == "auto"
            and self.config._attn_implementation == "sdpa"
            and self.num_key_value_groups > 1
            and 1 < query.shape[2] <= min(self.max_grouped_queries, key.shape[2] - 1)
            and mask is not None
            and mask.dim() == 4
            and mask.shape[1] == 1
            and not (self.training and self.attention_dropout > 0)
        )

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

        if self._few_queries_over_cache(query_states, key_states, attention_mask):
            attn_output = sdpa_grouped(query_states, key_states, value_states, attention_mask, self.scaling)
            return self.o_proj(attn_output.reshape(*input_shape, -1))
        dropout = 0.0 if not self.training else self.attention_dropout
        if self.settings.impl == "ref":
            attn_output = attention_ref(
                query_states, key_states, value_states, attention_mask, self.scaling, dropout, self.training
            )
            return self.o_proj(attn_output.reshape(*input_shape, -1))
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


__all__ = ["AttentionMixer", "AttentionMixerConfig", "PreallocatedKVLayer", "attention_ref", "sdpa_grouped"]
