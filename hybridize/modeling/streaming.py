"""Streaming attention: the source's attention restricted to `sinks` initial tokens plus a `window` of recent tokens
(StreamingLLM, arXiv 2309.17453), the layer LightTransfer (arXiv 2410.13846) gives its lazy layers. No new
parameters: q/k/v/o are the source's, and keys keep their original RoPE positions (they are cached after RoPE, as
usual; nothing is re-indexed).

Shapes: b batch, h query heads, g KV heads, lq queries, lk keys, d head_dim. A token's index counts the real
(non-padding) tokens of its sequence from 0; padding has index -1. A key with index j is visible from a query with
index i when `0 <= j <= i` and (`j < sinks` or `i - j < window`): the window includes the query itself, so a query
sees at most sinks + window keys. Counting real tokens rather than cache slots makes a left-padded sequence behave
exactly like the same sequence unpadded.

`streaming_attention_ref` (an explicit lq x lk mask: the definition) and `streaming_attention_chunked` (blocks of
queries, each attending to the sink keys plus the band of keys its window can reach: never an lq x lk mask) compute
one function and are tested equal; `StreamingMixer._step` computes it for one decode token, with the cache written in
place. `lazy_ratio` is LightTransfer's per-layer laziness, from log-sum-exps over key blocks.

`StreamingCacheLayer` keeps the sinks and the last `window` tokens of each sequence (at most; it drops the oldest
when the next token arrives), so its memory stops growing with the context. A decode step writes its token into
buffers in place (`StreamingDecodeBuffers`) rather than copying the cache.

LightTransfer-Test (`dynamic_full_layers = P`): every streaming layer prefills with full attention and keeps its
full cache while a priority queue holds the P least lazy layers seen so far; when a layer's push makes the queue
exceed P, the laziest layer in it is popped and its cache truncated to sinks + window at once, so at most P + 1
full caches exist during prefill. Decoding then streams in the popped (lazy) layers and attends to everything in
the P others. The lazy set is chosen per request (per batch: the ratio is averaged over its sequences).
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from .attention import AttentionMixer
from .configuration import HybridConfig, mixer_settings
from .mixer import RollbackCacheLayer


@dataclass(frozen=True, kw_only=True)
class StreamingMixerConfig:
    """Settings of the streaming mixers of a hybrid (stored in `HybridConfig.mixers["streaming"]`).

    Args:
        sinks (`int`, *optional*, defaults to 4): initial tokens every query sees (attention sinks); 0 disables them.
        window (`int`, *optional*, defaults to 1020): recent tokens a query sees, itself included. With the 4 sinks,
            a 1024-token cache, LightTransfer's default.
        w_last (`int`, *optional*, defaults to 64): dynamic mode: the last prompt queries the lazy ratio averages over.
        dynamic_full_layers (`int`, *optional*): `None` (default): static, every streaming layer always streams. An
            integer P: LightTransfer-Test, the lazy layers are chosen per request at prefill and only the P least lazy
            streaming layers keep full caches (see the module docstring).
        block_size (`int`, *optional*, defaults to 256): queries per block of the fast path; never changes the output.
        impl (`str`, *optional*, defaults to `"auto"`): `"auto"` takes the blocked fast path; `"ref"` forces the
            explicit-mask reference (memory quadratic in the length, for debugging).

    Example:
        ```python
        >>> config = HybridConfig(num_hidden_layers=2, mixer_types=["streaming", "attention"],
        ...                       mixers={"streaming": {"sinks": 4, "window": 252}})
        ```
    """

    sinks: int = 4
    window: int = 1020
    w_last: int = 64
    dynamic_full_layers: int | None = None
    block_size: int = 256
    impl: Literal["auto", "ref"] = "auto"

    def __post_init__(self):
        if self.sinks < 0:
            raise ValueError(f"streaming sinks must be >= 0, got {self.sinks}")
        if min(self.window, self.w_last, self.block_size) < 1:
            raise ValueError(
                f"streaming window, w_last and block_size must be >= 1, got window={self.window}, "
                f"w_last={self.w_last}, block_size={self.block_size}"
            )
        if self.dynamic_full_layers is not None and self.dynamic_full_layers < 0:
            raise ValueError(f"streaming dynamic_full_layers must be None or >= 0, got {self.dynamic_full_layers}")
        if self.impl not in ("auto", "ref"):
            raise ValueError(f"streaming impl must be 'auto' or 'ref', got {self.impl!r}")

    @classmethod
    def from_hybrid_config(cls, config: HybridConfig) -> "StreamingMixerConfig":
        """The settings in `config.mixers["streaming"]`; missing ones keep their defaults."""
        return mixer_settings(cls, config, "streaming")


def token_indices(
    padding: torch.Tensor | None, start: torch.Tensor | int, batch: int, length: int, device
) -> torch.Tensor:
    """(b, l) index of each new token among its sequence's real tokens, continuing from `start` (b,) tokens already
    seen; -1 where `padding` (b, l) is 0."""
    start = torch.as_tensor(start, device=device).reshape(-1, 1)
    if padding is None:
        return (torch.arange(length, device=device) + start).expand(batch, length)
    real = padding.to(device).bool()
    return (real.long().cumsum(1) - 1 + start).masked_fill(~real, -1)


def _visible(q_idx: torch.Tensor, k_idx: torch.Tensor, sinks: int, window: int | None) -> torch.Tensor:
    """(b, lq, lk): which keys each query sees. `window=None` is full causal attention."""
    q, k = q_idx[:, :, None], k_idx[:, None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible = visible & ((k < sinks) | (q - k < window))
    return visible


def streaming_attention_ref(query, key, value, q_idx, k_idx, *, sinks, window, scaling):
    """The definition: softmax over an explicit sink + window mask. query (b, h, lq, d), key and value (b, g, lk, d),
    q_idx (b, lq) and k_idx (b, lk) token indices (-1: padding) -> (b, lq, h, d); padding queries give 0."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)  # GQA: (b, h, lk, d)
    scores = (query @ key.transpose(-1, -2)) * scaling  # (b, h, lq, lk)
    scores = scores.masked_fill(~_visible(q_idx, k_idx, sinks, window)[:, None], -torch.inf)
    dtype = torch.promote_types(scores.dtype, torch.float32)  # softmax in float32 at least, as eager attention
    probs = F.softmax(scores, dim=-1, dtype=dtype).nan_to_num(0.0).to(value.dtype)  # a query without keys gives 0
    return (probs @ value).transpose(1, 2)


def _gather_keys(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (b, g, lk, d), index (b, n) -> (b, g, n, d)."""
    return tensor.gather(2, index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3]))


def streaming_attention_chunked(
    query, key, value, q_idx, k_idx, *, sinks, window, scaling, block_size=256, dropout=0.0
):
    """Same inputs and output as `streaming_attention_ref`, block by block: each block of queries attends to the sink
    keys (gathered per sequence, since padding moves them) plus the band of keys its window can reach, with a
    (block x (sinks + window + block)) mask. Needs the queries' keys to be the last lq keys and no padding between
    two real keys (`keys_contiguous`), which every cache here keeps."""
    lq, lk = query.shape[2], key.shape[2]
    if lq == lk and (window is None or window >= lk) and bool((q_idx >= 0).all()):
        # no padding, no cache and a window covering everything: plain causal attention, SDPA's own kernel
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2)
    if lq == 1 and bool((q_idx >= 0).all()) and bool(_visible(q_idx, k_idx, sinks, window).all()):
        # a decode step over a cache holding only what it can see: no mask at all
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)
    offset = lk - lq  # query i is key offset + i
    num_sinks = 0
    if window is not None and sinks > 0:
        is_sink = (k_idx >= 0) & (k_idx < sinks)
        num_sinks = int(is_sink.sum(1).max())
    if num_sinks:
        order = torch.sort(is_sink.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :num_sinks]
        sink_key, sink_value = _gather_keys(key, order), _gather_keys(value, order)
        sink_idx = k_idx.gather(1, order).masked_fill(~is_sink.gather(1, order), -1)  # (b, num_sinks)
    outputs = []
    for start in range(0, lq, block_size):
        end = min(start + block_size, lq)
        low = 0 if window is None else max(0, offset + start - window + 1)
        band_key, band_value, band_idx = (
            key[:, :, low : offset + end],
            value[:, :, low : offset + end],
            k_idx[:, low : offset + end],
        )
        if num_sinks:  # sink keys are attended through the gathered copy; never twice
            band_idx = band_idx.masked_fill(band_idx < sinks, -1)
            band_key, band_value = torch.cat([sink_key, band_key], 2), torch.cat([sink_value, band_value], 2)
            band_idx = torch.cat([sink_idx, band_idx], 1)
        block_q_idx = q_idx[:, start:end]
        # padding queries see any key (a finite softmax), and are zeroed below
        mask = _visible(block_q_idx, band_idx, sinks, window) | (block_q_idx < 0)[:, :, None]
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                band_key,
                band_value,
                attn_mask=mask[:, None],
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=True,
            )
        )
    out = torch.cat(outputs, 2).transpose(1, 2)  # (b, lq, h, d)
    return out.masked_fill((q_idx < 0)[:, :, None, None], 0.0)


def keys_contiguous(k_idx: torch.Tensor) -> bool:
    """Whether no padding sits between two real keys of a sequence (what `streaming_attention_chunked` needs)."""
    real = k_idx >= 0
    count = real.sum(1)
    first = real.int().argmax(1)
    last = real.shape[1] - 1 - real.flip(1).int().argmax(1)
    return bool(((count == 0) | (last - first + 1 == count)).all())


def lazy_ratio(query, key, q_idx, k_idx, *, sinks, window, scaling, block_size=1024) -> torch.Tensor:
    """LightTransfer's lazy ratio (arXiv 2410.13846 §3): the attention mass the given queries put on the sinks and
    their window, averaged over heads and queries. Computed from log-sum-exps accumulated over key blocks, so the
    (queries x keys) attention is never held whole: log r = logsumexp_{sinks ∪ window} - logsumexp_{all}, with the
    1/sqrt(d) scale, keys repeated over GQA groups and the causal mask applied inside the window too. A query whose
    index is below sinks + window sees only its sinks and window, so its ratio is exactly 1.

    Args:
        query (`torch.Tensor`): (b, h, w, d) the queries to average over (LightTransfer: the prompt's last w_last).
        key (`torch.Tensor`): (b, g, lk, d) every key they may see, after RoPE.
        q_idx (`torch.Tensor`): (b, w) token indices of the queries (-1: padding, left out of the mean).
        k_idx (`torch.Tensor`): (b, lk) token indices of the keys.
        sinks (`int`), window (`int`), scaling (`float`): as in the attention.
        block_size (`int`, *optional*, defaults to 1024): keys per block; never changes the result beyond rounding.

    Returns:
        `torch.Tensor` of shape (b,): the ratio of each sequence, in [0, 1].
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    query = query.to(dtype)
    lse_all = query.new_full(query.shape[:3], -torch.inf)  # (b, h, w)
    lse_near = lse_all.clone()
    for start in range(0, key.shape[2], block_size):
        block = key[:, :, start : start + block_size].to(dtype).repeat_interleave(groups, 1)  # (b, h, n, d)
        scores = (query @ block.transpose(-1, -2)) * scaling  # (b, h, w, n)
        causal = _visible(q_idx, k_idx[:, start : start + block_size], sinks, None)[:, None]
        near = _visible(q_idx, k_idx[:, start : start + block_size], sinks, window)[:, None]
        lse_all = torch.logaddexp(lse_all, scores.masked_fill(~causal, -torch.inf).logsumexp(-1))
        lse_near = torch.logaddexp(lse_near, scores.masked_fill(~near, -torch.inf).logsumexp(-1))
    real = (q_idx >= 0)[:, None, :].expand_as(lse_all)  # (b, h, w)
    ratio = torch.exp(lse_near - lse_all).masked_fill(~real, 0.0)
    return ratio.sum((1, 2)) / real.sum((1, 2)).clamp(min=1)


@dataclass(kw_only=True)
class StreamingDecodeBuffers:
    """Where the decode path keeps a streaming layer's entries: positions [start, start + length) of buffers written
    in place, of which the layer's `keys`, `values` and `token_indices` are views, so they stay right-aligned and in
    order for every other reader. A decode step writes its token's entry; once the cache is full it also moves the
    window's start up by one and rewrites the sinks in front of it, instead of concatenating (copying) the whole
    cache. When the buffers run out of room, the entries move to the front of new ones (once every `slack` steps).

    Args:
        keys (`torch.Tensor`), values (`torch.Tensor`): (b, g, capacity, d).
        indices (`torch.Tensor`): (b, capacity) token indices.
        start (`int`), length (`int`): the entries in use.
        padded (`bool`): whether some entries are padding; decode steps bring real tokens only, so it never turns on.
        sinks (`tuple`, *optional*): copies of the sink entries (keys, values, indices), taken at the first slide.
    """

    keys: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    start: int
    length: int
    padded: bool
    sinks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def reallocate(self, capacity: int) -> None:
        """Move the entries to the front of new buffers of `capacity` positions."""
        part = slice(self.start, self.start + self.length)
        keys = self.keys.new_empty(*self.keys.shape[:2], capacity, self.keys.shape[-1])
        values = self.values.new_empty(*self.values.shape[:2], capacity, self.values.shape[-1])
        indices = self.indices.new_empty(self.indices.shape[0], capacity)
        keys[:, :, : self.length].copy_(self.keys[:, :, part])
        values[:, :, : self.length].copy_(self.values[:, :, part])
        indices[:, : self.length].copy_(self.indices[:, part])
        self.keys, self.values, self.indices, self.start = keys, values, indices, 0


class StreamingCacheLayer(DynamicSlidingWindowLayer, RollbackCacheLayer):
    """The KV cache of a streaming layer: per sequence, the sink tokens and at most the last `window` tokens (the
    oldest of them is dropped when the next token arrives, since its query cannot see it), so at most
    `sinks + window` entries however long the context, with each entry's token index (`token_indices`, -1 for
    padding). Kept entries are right-aligned and in order.

    With `bounded=False` it keeps everything, like a `DynamicLayer`: a dynamic layer until LightTransfer-Test pops it
    as lazy (`truncate`), and for good when it stays among the full layers.

    `update` builds new tensors (nothing it returned or a checkpoint holds is ever written). The decode path uses
    `decode_update` instead, which writes into `buffers` (`StreamingDecodeBuffers`) in place; any other change drops
    the buffers, and the next decode step copies the entries into new ones.
    """

    is_croppable = False  # evicted tokens cannot be restored
    min_slack = 64  # decode buffers: the fewest positions, and the least room beyond sinks + window

    def __init__(self, sinks: int, window: int, *, bounded: bool = True):
        super().__init__(sliding_window=sinks + window)
        self.sinks, self.window, self.bounded = sinks, window, bounded
        self.bounded_at_start = bounded
        self.token_indices: torch.Tensor | None = None  # (b, n)
        self.update_indices: torch.Tensor | None = None  # (b, n) of the keys the last update returned
        self.checkpoint: tuple | None = None  # speculative decoding: the state at begin_verify
        self.num_tokens: torch.Tensor | None = None  # (b,) real tokens seen
        self.lazy_ratio: float | None = None  # dynamic mode: measured at prefill
        self.pending = False  # dynamic mode: full, and in the priority queue
        self.buffers: StreamingDecodeBuffers | None = None  # the decode path's in-place storage

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, g, _, d = key_states.shape
        self.keys, self.values = key_states.new_empty(b, g, 0, d), value_states.new_empty(b, g, 0, d)
        self.token_indices = torch.empty(b, 0, dtype=torch.long, device=self.device)
        self.num_tokens = torch.zeros(b, dtype=torch.long, device=self.device)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args,
        token_indices: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop what the new queries cannot see, append the new keys and values (with their token indices; default:
        no padding) and return the cached ones followed by the new ones, as this step's attention needs them
        (`update_indices` holds their token indices). A one-token call thus copies the cache once, as a full KV cache
        does (the decode path's `decode_update` does not); only a chunk that leaves more than sinks + window entries is
        evicted again right away."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.buffers = None  # the entries below are new tensors
        length = key_states.shape[-2]
        if token_indices is None:
            token_indices = self.num_tokens[:, None] + torch.arange(length, device=self.device)
        kept = self._still_visible() if self.bounded else [slice(None)]
        self.cumulative_length += length
        keys = torch.cat([self.keys[:, :, part] for part in kept] + [key_states], -2)
        values = torch.cat([self.values[:, :, part] for part in kept] + [value_states], -2)
        indices = torch.cat([self.token_indices[:, part] for part in kept] + [token_indices.to(self.device)], 1)
        self.keys, self.values, self.token_indices, self.update_indices = keys, values, indices, indices
        self.num_tokens = self.num_tokens + (token_indices >= 0).sum(1).to(self.device)
        if self.bounded and indices.shape[1] > self.sinks + self.window:
            self._evict()
        return keys, values

    def _still_visible(self) -> list[slice]:
        """The cached entries the next query can still see, as slices: without padding, the sinks and the newest
        tokens (views, no copy); with padding, everything after a general eviction."""
        idx = self.token_indices
        stale = (idx >= self.sinks) & (idx <= (self.num_tokens - self.window)[:, None])
        if not bool(stale.any()):
            return [slice(None)]
        if bool((idx >= 0).all()):  # no padding: every sequence has the same tokens, the stale ones right after sinks
            first, count = int(stale[0].int().argmax()), int(stale[0].sum())
            return [slice(0, first), slice(first + count, None)]
        self._evict()
        return [slice(None)]

    def _evict(self) -> None:
        idx = self.token_indices
        # the next query has index num_tokens and sees keys with index > num_tokens - window
        keep = (idx >= 0) & ((idx < self.sinks) | (idx > (self.num_tokens - self.window)[:, None]))
        if bool(keep.all()):
            return
        self.buffers = None
        count = int(keep.sum(1).max())
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, idx.shape[1] - count :]  # kept last
        self.keys, self.values = _gather_keys(self.keys, order), _gather_keys(self.values, order)
        self.token_indices = idx.gather(1, order).masked_fill(~keep.gather(1, order), -1)

    @property
    def max_rollback(self) -> float:
        """Tokens one `begin_verify` ... `commit` span may hold: the window keeps the last w - 1 besides the newest."""
        return self.window - 1 if self.bounded else float("inf")

    def begin_verify(self) -> None:
        """Keep the current state (speculative decoding); tokens run from now on can be undone by `commit`."""
        # every field is replaced on update, never written in place: references suffice
        self.checkpoint = (self.keys, self.values, self.token_indices, self.num_tokens, self.cumulative_length)

    def commit(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens run since `begin_verify`: restore the checkpoint, then `update` it with
        their keys and values, read back from the newest entries (no projection recomputed)."""
        checkpoint, self.checkpoint = self.checkpoint, None
        seen = self.cumulative_length - checkpoint[4]
        if num_tokens == seen:
            return
        # the tokens run since begin are the newest entries, in order, unless the window has evicted some of them
        expected = checkpoint[3][:, None] + torch.arange(seen, device=self.device)  # (b, seen)
        if seen > self.token_indices.shape[1] or not torch.equal(self.token_indices[:, -seen:], expected):
            raise ValueError(f"streaming layer no longer holds the {seen} tokens to roll back (window {self.window})")
        keep = slice(-seen, -seen + num_tokens if num_tokens < seen else None)
        keys, values, indices = self.keys[:, :, keep], self.values[:, :, keep], self.token_indices[:, keep]
        self.keys, self.values, self.token_indices, self.num_tokens, self.cumulative_length = checkpoint
        self.update(keys, values, token_indices=indices)

    def truncate(self) -> None:
        """Bound this layer from now on (LightTransfer-Test pops it as lazy), dropping what the window left behind."""
        self.bounded, self.pending = True, False
        self.buffers = None  # sized for an unbounded layer
        if self.is_initialized:
            self._evict()

    def can_decode(self) -> bool:
        """Whether `decode_update` can take the next token: while the cache is not full, appending evicts nothing (a
        sequence holding an entry the next token cannot see holds sinks + window entries); once full, without padding,
        every sequence evicts the same entry, the oldest of its window."""
        length, full = self.keys.shape[-2], self.sinks + self.window
        if not self.bounded or length < full:
            return True
        padded = self.buffers.padded if self.buffers is not None else bool((self.token_indices < 0).any())
        return length == full and not padded

    def decode_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`update` with one real token per sequence, key_states and value_states (b, g, 1, d), where `can_decode()`,
        written in place. Returns the keys and values the token attends to (b, g, n, d), as `update` does, and which
        of them are real tokens (b, n), or None when all are."""
        buf = self.buffers if self.buffers is not None else self._new_buffers()
        full, capacity = self.sinks + self.window, buf.keys.shape[-2]
        if self.bounded and buf.length == full:
            # Full: the window's oldest token leaves; the sinks move up by one over it, the new token goes last
            if buf.start + full == capacity:
                buf.reallocate(full + self._slack())
            if self.sinks:
                if buf.sinks is None:  # no padding: every sequence's sinks are its first entries, for good
                    part = slice(buf.start, buf.start + self.sinks)
                    buf.sinks = (
                        buf.keys[:, :, part].clone(),
                        buf.values[:, :, part].clone(),
                        buf.indices[:, part].clone(),
                    )
                part = slice(buf.start + 1, buf.start + 1 + self.sinks)
                buf.keys[:, :, part].copy_(buf.sinks[0])
                buf.values[:, :, part].copy_(buf.sinks[1])
                buf.indices[:, part].copy_(buf.sinks[2])
            buf.start += 1
        else:
            # Not full: append
            if buf.start + buf.length == capacity:
                grown = max(2 * capacity, self.min_slack)
                buf.reallocate(min(grown, full + self._slack()) if self.bounded else grown)
            buf.length += 1
        end = buf.start + buf.length - 1
        buf.keys[:, :, end].copy_(key_states[:, :, 0])
        buf.values[:, :, end].copy_(value_states[:, :, 0])
        buf.indices[:, end].copy_(self.num_tokens)
        self.num_tokens = self.num_tokens + 1
        self.cumulative_length += 1
        part = slice(buf.start, buf.start + buf.length)
        self.keys, self.values = buf.keys[:, :, part], buf.values[:, :, part]
        self.token_indices = self.update_indices = buf.indices[:, part]
        return self.keys, self.values, (self.token_indices >= 0) if buf.padded else None

    def _slack(self) -> int:
        """Room beyond sinks + window in the buffers of a bounded layer: a full cache is moved once every that many
        steps, for a quarter more memory."""
        return max((self.sinks + self.window) // 4, self.min_slack)

    def _new_buffers(self) -> StreamingDecodeBuffers:
        """Copy the entries into decode buffers (after a prefill or any other change)."""
        length = self.keys.shape[-2]
        capacity = max(2 * length, self.min_slack)
        if self.bounded:
            capacity = min(capacity, self.sinks + self.window + self._slack())
        self.buffers = StreamingDecodeBuffers(
            keys=self.keys, values=self.values, indices=self.token_indices, start=0, length=length,
            padded=bool((self.token_indices < 0).any()),
        )  # fmt: skip
        self.buffers.reallocate(capacity)
        return self.buffers

    def get_max_length(self) -> int:
        return self.sinks + self.window if self.bounded else -1

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a streaming cache cannot be cropped: the tokens it evicted are gone")

    def reset(self) -> None:
        super().reset()
        self.token_indices = self.update_indices = self.num_tokens = self.lazy_ratio = None
        self.buffers = None
        self.bounded, self.pending = self.bounded_at_start, False

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            self.buffers = None
            index = index.to(self.device)
            self.keys, self.values = self.keys[index], self.values[index]
            self.token_indices, self.num_tokens = self.token_indices[index], self.num_tokens[index]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))


class StreamingMixer(AttentionMixer):
    """The source attention (same parameters, same RoPE) restricted to sinks + a recent window, with a bounded cache.
    Differs from `AttentionMixer` only in which keys a query sees, its cache layer and the mask it asks for."""

    settings_class = StreamingMixerConfig  # `AttentionMixer.__init__` reads it into `self.settings`
    mask_type = "padding"  # the 2-D padding mask: the sink + window mask is built here, from token indices

    @staticmethod
    def new_cache_layer(config: HybridConfig, layer_idx: int) -> StreamingCacheLayer:
        s = StreamingMixerConfig.from_hybrid_config(config)
        return StreamingCacheLayer(s.sinks, s.window, bounded=s.dynamic_full_layers is None)

    def _can_step(self, hidden_states, attention_mask, cache) -> bool:
        """Whether `_step` applies: one real token per sequence after a prefill, in eval, with nothing recording
        (autograd, speculative verification, transformers' past recording) and a cache state `can_decode` takes."""
        if cache is None or hidden_states.shape[1] != 1 or self.settings.impl == "ref" or self.training:
            return False
        if torch.is_grad_enabled() and hidden_states.requires_grad:  # autograd must not see buffers written in place
            return False
        layer = cache.layers[self.layer_idx]
        if layer.get_seq_length() == 0 or layer.checkpoint is not None or layer.record_past:
            return False
        if layer.keys.dtype != hidden_states.dtype:
            return False
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):  # a padding query
            return False
        return layer.can_decode()

    def _step(self, hidden_states, position_embeddings, layer: StreamingCacheLayer) -> torch.Tensor:
        """One decode token (b, 1, hidden) -> (b, 1, hidden): the same function as the generic path with l = 1, doing
        only what one token needs. Its key and value are written in place into the cache's buffers
        (`decode_update`), which hold only what the token can see, so one SDPA call over them needs a mask only
        while some sequence holds padding."""
        batch = hidden_states.shape[0]
        x = hidden_states[:, 0]  # (b, hidden)
        # (b, heads, 1, head_dim): with one token, no transpose
        query = self.q_proj(x).view(batch, -1, 1, self.head_dim)
        key = self.k_proj(x).view(batch, -1, 1, self.head_dim)
        value = self.v_proj(x).view(batch, -1, 1, self.head_dim)
        # RoPE of the query and key in one go, with the formula of `apply_rotary_pos_emb`
        cos, sin = (t[:, None] for t in position_embeddings)  # (b, 1, 1, d)
        qk = torch.cat([query, key], 1)
        qk = qk * cos + rotate_half(qk) * sin
        query, key = qk[:, : query.shape[1]], qk[:, query.shape[1] :]
        key, value, real = layer.decode_update(key, value)
        # GQA: the query heads of a KV head are its queries, so each key is read once, not once per query head
        query = query.view(batch, key.shape[1], -1, self.head_dim)  # (b, g, h / g, d)
        mask = None if real is None else real[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scaling)
        return self.o_proj(out.reshape(batch, -1))[:, None]

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        if self._can_step(hidden_states, attention_mask, cache):
            return self._step(hidden_states, position_embeddings, cache.layers[self.layer_idx])
        s = self.settings
        batch, length = hidden_states.shape[:2]
        hidden_shape = (batch, length, -1, self.head_dim)
        # (b, heads, l, head_dim), exactly as the source attention
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        layer = cache.layers[self.layer_idx] if cache is not None else None
        started = layer is not None and layer.get_seq_length() > 0
        padding = attention_mask[:, -length:] if attention_mask is not None else None
        q_idx = token_indices(padding, layer.num_tokens if started else 0, batch, length, hidden_states.device)
        k_idx = q_idx
        if layer is not None:
            key, value = cache.update(key, value, self.layer_idx, token_indices=q_idx)
            k_idx = layer.update_indices

        # LightTransfer-Test: prefill attends to everything; afterwards only the layers popped as lazy stream
        window = s.window
        if s.dynamic_full_layers is not None and not (started and layer.bounded):
            window = None
        if s.impl == "ref" or not keys_contiguous(k_idx):
            out = streaming_attention_ref(
                query, key, value, q_idx, k_idx, sinks=s.sinks, window=window, scaling=self.scaling
            )
        else:
            dropout = self.attention_dropout if self.training else 0.0
            out = streaming_attention_chunked(
                query,
                key,
                value,
                q_idx,
                k_idx,
                sinks=s.sinks,
                window=window,
                scaling=self.scaling,
                block_size=s.block_size,
                dropout=dropout,
            )
        if s.dynamic_full_layers is not None and layer is not None and not started:
            self._enqueue(cache, layer, query, key, q_idx, k_idx)
        return self.o_proj(out.reshape(batch, length, -1).contiguous())

    @torch.no_grad()
    def _enqueue(self, cache, layer: StreamingCacheLayer, query, key, q_idx, k_idx) -> None:
        """Push this layer's lazy ratio; if more than P layers now hold full caches, pop the laziest (ties: the
        deeper layer) and truncate its cache at once."""
        s = self.settings
        ratio = lazy_ratio(
            query[:, :, -s.w_last :],
            key,
            q_idx[:, -s.w_last :],
            k_idx,
            sinks=s.sinks,
            window=s.window,
            scaling=self.scaling,
        )
        layer.lazy_ratio, layer.pending = float(ratio.mean()), True
        queue = [i for i, other in enumerate(cache.layers) if isinstance(other, StreamingCacheLayer) and other.pending]
        if len(queue) > s.dynamic_full_layers:
            laziest = max(queue, key=lambda i: (cache.layers[i].lazy_ratio, i))
            cache.layers[laziest].truncate()


__all__ = [
    "StreamingCacheLayer",
    "StreamingDecodeBuffers",
    "StreamingMixer",
    "StreamingMixerConfig",
    "keys_contiguous",
    "lazy_ratio",
    "streaming_attention_chunked",
    "streaming_attention_ref",
    "token_indices",
]
