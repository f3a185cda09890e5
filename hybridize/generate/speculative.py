"""One round of speculative decoding: the caches that roll back the rejected tokens, the verify forward's logits
computed one position at a time, and greedy or sampled acceptance.

After a round the caches of both models must forget the rejected tokens. Attention caches are cropped. An SSM state
cannot be cropped: as in MambaInLlama's hardware-aware speculative decoding (arXiv 2408.15237;
research/methods-conversion.md §1.5), a Mamba2 layer keeps its state at the last verified token and the inputs of the
steps run since (after the projections), and computes the state after the accepted ones in closed form
(`Mamba2CacheLayer.begin_verify/commit`; no projection is recomputed, nothing is copied when the round begins).
Streaming (sink + window) and NHA layers evict or absorb old tokens, so they are not croppable either; their caches
already hold the step inputs of their last w - 1 tokens (keys and values after the projections; for NHA also the raw
keys and gates), so they go back to the state at the round's start and take the accepted tokens' entries, read back
from that tail (a streaming `update`; for NHA one block absorbed into the slots), by the same `begin_verify`/`commit`
pair. That bounds the tokens one round may roll back to w - 1, hence K <= w - 2 for such models (`max_rollback`).

On a CPU one decode step reads every weight once; a verify forward of K + 1 tokens reads them once too, but its
small matrix products are slower per token than the matrix-vector products of a step (this CPU's BLAS: 2.5-2.8x a
step's for 5 tokens). So the verify forward does only what it must: the output layer runs one position at a time, in
order, up to the first rejected draft (`_Rows`), Mamba2 layers scan K + 1 tokens as one unpadded chunk, and attention
layers attend over the cache without repeating it for each query head (`sdpa_grouped`).
"""

from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.cache_utils import DynamicLayer

from ..configs.generate import GenerateConfig
from ..errors import ConfigError
from ..modeling import HybridCache, HybridForCausalLM, RollbackCacheLayer, new_cache
from ..modeling.attention import PreallocatedKVLayer

# Rollback: `RollbackCacheLayer`s (Mamba2, NHA, streaming) roll themselves back; plain KV layers are cropped.
# Both adapters have begin() and commit(num_tokens), where commit keeps the first num_tokens tokens run since begin and
# forgets the others, and `max_rollback`: how many tokens one begin..commit span may hold.


class _NativeRollback:
    """A `RollbackCacheLayer`: `begin_verify()`, `commit(n)` and `max_rollback` (Mamba2: snapshot and replay of
    recorded steps; streaming and NHA: snapshot, then the accepted tokens re-added from what the window holds)."""

    def __init__(self, layer):
        self.layer = layer

    @property
    def max_rollback(self) -> float:
        return self.layer.max_rollback

    def begin(self) -> None:
        self.layer.begin_verify()

    def commit(self, num_tokens: int) -> None:
        self.layer.commit(num_tokens)


class _CropRollback:
    """A KV layer that keeps every token (`DynamicLayer`, `PreallocatedKVLayer`): crop the rejected ones."""

    max_rollback = float("inf")

    def __init__(self, layer):
        self.layer, self.length = layer, 0

    def begin(self) -> None:
        self.length = self.layer.get_seq_length()

    def commit(self, num_tokens: int) -> None:
        self.layer.crop(-(self.layer.get_seq_length() - self.length - num_tokens))


def _rollback_for(layer, index: int):
    """The rollback adapter of one cache layer; the first that fits wins."""
    if isinstance(layer, RollbackCacheLayer):
        return _NativeRollback(layer)
    # other DynamicLayer subclasses (sliding windows) evict, so cannot always be cropped
    if type(layer) in (DynamicLayer, PreallocatedKVLayer):
        return _CropRollback(layer)
    raise ConfigError(
        f"cache layer {index} is a {type(layer).__name__}, which speculative decoding cannot roll back (supported: "
        "full attention KV caches, Mamba2, streaming and NHA layers of a hybrid); generate without a draft"
    )


# Causal LMs whose logits are exactly `lm_head(model(...).last_hidden_state)`, so a round can compute the logits of
# one position at a time: the hybrid and the Llama-family models it converts
_HEAD_ONLY = (HybridForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)


class _Rows:
    """The logits of a forward's last positions, each computed when first asked for: float32 (vocab,).

    A round needs the logits of the accepted drafts and of the position after them, not of every position it ran. On
    a CPU the head over one position is a matrix-vector product that reads the head's weights once, while over K + 1
    positions it costs several such reads (6x for 5 positions on SmolLM2-135M's 576 x 49152 head in the decode
    layout, one thread), so the positions after a rejection are never computed.

    Args:
        hidden (`torch.Tensor`): (l, hidden) the last hidden states, or (l, vocab) logits when `head` is `None`.
        head (`nn.Module`, *optional*): the output layer.
    """

    def __init__(self, hidden: torch.Tensor, head: nn.Module | None = None):
        self.hidden, self.head = hidden, head
        self.done: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, i: int) -> torch.Tensor:
        i = range(len(self.hidden))[i]
        if i not in self.done:
            row = self.hidden[i] if self.head is None else self.head(self.hidden[None, i : i + 1])[0, 0]
            self.done[i] = row.float()
        return self.done[i]


class _Decoder:
    """One model with its cache during generation: how many tokens the cache holds, and their rollback."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = new_cache(model)
        self.seen = 0
        self.rollbacks: list | None = None
        self.seen_at_begin = 0

    def forward(self, ids: Sequence[int], *, last_only: bool = False) -> torch.Tensor:
        """Run `ids` through the model; returns their logits (l, vocab) in float32 (only the last when `last_only`)."""
        device = self.model.device
        out = self.model(
            input_ids=torch.tensor([list(ids)], device=device),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        self.seen += len(ids)
        return out.logits[0].float()

    def rows(self, ids: Sequence[int], keep: int) -> _Rows:
        """Run `ids` through the model; returns the logits of the last `keep` as `_Rows` (computed when asked for)."""
        if not isinstance(self.model, _HEAD_ONLY):
            return _Rows(self.forward(ids)[-keep:])
        input_ids = torch.tensor([list(ids)], device=self.model.device)
        out = self.model.model(input_ids=input_ids, cache=self.cache, use_cache=True)
        self.seen += len(ids)
        return _Rows(out.last_hidden_state[0, -keep:], self.model.lm_head)

    def max_rollback(self) -> float:
        """Tokens one begin..commit span may hold (call after the prefill: layers are created lazily)."""
        if self.rollbacks is None:
            self.rollbacks = [_rollback_for(layer, i) for i, layer in enumerate(self.cache.layers)]
        return min((r.max_rollback for r in self.rollbacks), default=float("inf"))

    def begin(self) -> None:
        self.max_rollback()
        self.seen_at_begin = self.seen
        for rollback in self.rollbacks:
            rollback.begin()

    def commit(self, num_tokens: int) -> None:
        for rollback in self.rollbacks:
            rollback.commit(num_tokens)
        self.seen = self.seen_at_begin + num_tokens
        if isinstance(self.cache, HybridCache):
            self.cache.num_seen_tokens = self.seen


def _probs(logits: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """(..., vocab) logits -> the distribution sampling draws from: temperature, then top-p."""
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= config.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _pick(logits: torch.Tensor, config: GenerateConfig, generator: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """One token from (vocab,) logits: the argmax, or a sample (with the distribution it came from)."""
    if not config.do_sample:
        return int(logits.argmax()), None
    probs = _probs(logits, config)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


def _accept(
    target_logits: _Rows | torch.Tensor,
    drafts: list[int],
    draft_probs: list[torch.Tensor | None],
    config: GenerateConfig,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Speculative sampling over one round: target_logits (K + 1, vocab) at [last, d1..dK], read in order and only up
    to the first rejection. Returns how many drafts are accepted and the token that follows them (a correction, or a
    bonus token when all are accepted)."""
    if not config.do_sample:  # greedy: the longest prefix that matches the target's argmax, then the target's token
        for i, token in enumerate(drafts):
            best = int(target_logits[i].argmax())
            if best != token:
                return i, best
        return len(drafts), int(target_logits[len(drafts)].argmax())
    for i, (token, q) in enumerate(zip(drafts, draft_probs)):
        p = _probs(target_logits[i], config)
        if torch.rand((), generator=generator) * q[token] < p[token]:  # accept with probability min(1, p/q)
            continue
        residual = (p - q).clamp(min=0)
        residual = residual if residual.sum() > 0 else p
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    probs = _probs(target_logits[len(drafts)], config)
    return len(drafts), int(torch.multinomial(probs, 1, generator=generator))
