"""Text generation with optional speculative decoding, for hybrids and plain transformers models alike.

A small draft model proposes K tokens; the target checks all of them in **one** forward over [last token, d1..dK]
and keeps the longest acceptable prefix plus one token of its own, so every round yields 1 to K + 1 tokens for one
target forward (speculative sampling: Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318). Greedy
decoding accepts a draft token when it is the target's argmax; sampling accepts d with probability
min(1, p(d) / q(d)) and on rejection draws from norm(max(0, p - q)), so the output follows the target's (warped)
distribution exactly, whatever the draft.

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

`GenerateConfig` holds everything that changes the output; `generate(model, tokenizer, prompt, config, draft=...)`
returns a `GenerateResult` (text, ids, acceptance rate, tokens/s). `compare_generate` times plain and speculative
decoding side by side (interleaved: a shared machine is noisy, only ratios mean something), and `early_exit_draft`
makes a draft from a model's first layers that shares its weights (self-speculative decoding: Draft & Verify,
arXiv 2309.08168; LayerSkip, arXiv 2404.16710, here without its early-exit training). `PromptLookupDraft` drafts
without a model, by copying what followed the text's last n-gram earlier on (prompt lookup decoding).
"""

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaForCausalLM,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2ForCausalLM,
)
from transformers.cache_utils import DynamicLayer

from .configs.generate import GenerateConfig, PromptLookupDraft
from .errors import ConfigError
from .modeling import HybridCache, HybridForCausalLM, RollbackCacheLayer, new_cache
from .modeling.attention import PreallocatedKVLayer
from .sources import load


@dataclass(frozen=True, kw_only=True)
class GenerateResult:
    """What `generate` returns.

    Args:
        text (`str`): the generated text (special tokens skipped; ends before a stop string).
        token_ids (`tuple[int, ...]`): the generated token ids (an end-of-sequence token included).
        prompt_tokens (`int`): tokens in the prompt, after the chat template.
        stop_reason (`str`): `"eos"`, `"stop"` (a stop string) or `"length"` (`max_new_tokens`).
        drafted (`int`), accepted (`int`): draft tokens proposed and accepted (0 without a draft).
        rounds (`int`): target forwards after the prefill.
        prefill_s (`float`): seconds to the first new token (prefill of target and draft).
        decode_s (`float`): seconds for the tokens after the first.
        draft_tokens (`tuple[int, ...]`): K of each round (changes when `adaptive`).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    stop_reason: str
    drafted: int
    accepted: int
    rounds: int
    prefill_s: float
    decode_s: float
    draft_tokens: tuple[int, ...] = field(default=(), repr=False)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over proposed draft tokens; `None` without a draft."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the seconds they took."""
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 and len(self.token_ids) > 1 else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (len(self.token_ids) - 1) / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("token_ids", "draft_tokens")},
            "new_tokens": len(self.token_ids),
            "token_ids": list(self.token_ids),  # to compare runs: greedy tokens across runtimes or files
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_round": self.tokens_per_round,
        }


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


class _TextStream:
    """Decodes the generated ids as they come, finds stop strings, and hands out text that can no longer change:
    never a partial UTF-8 character, never the start of what may become a stop string."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], callback: Callable[[str], None] | None
    ):
        self.tokenizer, self.stop, self.callback = tokenizer, stop, callback
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> int | None:
        """Add ids; if a stop string now appears, return how many of them to keep (up to the one completing it)."""
        searched = len(self.text)
        self.ids += ids
        self.text = self._decode(self.ids)
        hits = [(pos, s) for s in self.stop if (pos := self.text.find(s, max(0, searched - len(s) + 1))) >= 0]
        if hits:
            pos, stop = min(hits)
            keep = next(
                k for k in range(len(self.ids) - len(ids), len(self.ids) + 1) if stop in self._decode(self.ids[:k])
            )
            self.ids, self.text = self.ids[:keep], self.text[:pos]
            self._emit(len(self.text))
            return keep
        safe = len(self.text.rstrip("\ufffd"))
        held = max((n for s in self.stop for n in range(1, len(s)) if self.text[:safe].endswith(s[:n])), default=0)
        self._emit(safe - held)
        return None

    def _emit(self, end: int) -> None:
        if end > self.emitted and self.callback is not None:
            self.callback(self.text[self.emitted : end])
        self.emitted = max(self.emitted, end)

    def finish(self) -> str:
        self._emit(len(self.text))
        return self.text


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[int], config: GenerateConfig) -> list[int]:
    if not isinstance(prompt, str):
        ids = [int(i) for i in prompt]
    elif config.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{type(tokenizer).__name__} has no chat template; drop --chat or use an instruct model")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ConfigError("the prompt is empty after tokenization; give at least one token")
    return ids


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    eos = tokenizer.eos_token_id if eos is None else eos
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


class _ModelDrafter:
    """A draft model with its own cache: each round it runs what it has not seen, then its own tokens but the last,
    and afterwards keeps only what the target accepted."""

    def __init__(self, model: nn.Module, prompt_ids: list[int], vocab: int):
        self.decoder, self.vocab = _Decoder(model), vocab
        self.decoder.forward(prompt_ids, last_only=True)
        self.first_feed = 0

    def max_rollback(self) -> float:
        return self.decoder.max_rollback()

    def propose(self, tokens, k, config, generator) -> tuple[list[int], list[torch.Tensor | None]]:
        self.decoder.begin()
        feed = tokens[self.decoder.seen :]
        self.first_feed = len(feed)
        drafts, probs = [], []
        for _ in range(k):
            logits = self.decoder.forward(feed, last_only=True)[-1, : self.vocab]
            if logits.shape[-1] < self.vocab:  # the target has padding rows beyond the shared tokenizer
                logits = F.pad(logits, (0, self.vocab - logits.shape[-1]), value=-torch.inf)
            token, q = _pick(logits, config, generator)
            drafts.append(token)
            probs.append(q)
            feed = [token]
        return drafts, probs

    def accept(self, num_accepted: int, num_drafted: int) -> None:
        self.decoder.commit(self.first_feed + min(num_accepted, num_drafted - 1))


class _LookupDrafter:
    def __init__(self, lookup: PromptLookupDraft, vocab: int):
        self.lookup, self.vocab = lookup, vocab

    def max_rollback(self) -> float:
        return float("inf")

    def propose(self, tokens, k, config, generator) -> tuple[list[int], list[torch.Tensor | None]]:
        drafts = [t for t in self.lookup.propose(tokens, k) if t < self.vocab]
        if not config.do_sample:
            return drafts, [None] * len(drafts)
        return drafts, list(F.one_hot(torch.tensor(drafts, dtype=torch.long), self.vocab).float())  # q = 1

    def accept(self, num_accepted: int, num_drafted: int) -> None:
        pass


def check_draft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    draft: nn.Module,
    draft_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise `ConfigError` unless `draft` speaks the target's vocabulary: the same tokenizer (when given) and the same
    number of logits, up to padding rows beyond the tokenizer."""
    if draft_tokenizer is not None and draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"the draft's tokenizer ({len(draft_tokenizer)} tokens) differs from the target's ({len(tokenizer)} "
            "tokens); a draft must share the target's tokenizer, e.g. a model converted, pruned or cut from it"
        )
    target_size, draft_size = _vocab_size(model), _vocab_size(draft)
    if target_size != draft_size and min(target_size, draft_size) < len(tokenizer):
        raise ConfigError(
            f"the draft predicts {draft_size} tokens and the target {target_size} (tokenizer: {len(tokenizer)}); "
            "a draft must share the target's vocabulary, e.g. a model converted, pruned or cut from it"
        )


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[int],
    config: GenerateConfig,
    *,
    draft: PreTrainedModel | PromptLookupDraft | None = None,
    draft_tokenizer: PreTrainedTokenizerBase | None = None,
    stream: Callable[[str], None] | None = None,
) -> GenerateResult:
    """Generate a continuation of `prompt` with `model`, speculatively when a `draft` is given (batch size 1).

    Args:
        model (`PreTrainedModel`): the target: a hybrid or any transformers causal LM. Not modified.
        tokenizer (`PreTrainedTokenizerBase`): the target's tokenizer.
        prompt (`str` or a sequence of token ids): the prompt (with `config.chat`, the user message).
        config (`GenerateConfig`): everything that changes the output.
        draft (`PreTrainedModel` or `PromptLookupDraft`, *optional*): a smaller causal LM with the same vocabulary (a
            hybrid, a pruned hybrid, `early_exit_draft(model, n)`, ...) or a model-free `PromptLookupDraft`. Greedy
            output is the same with or without it; sampled output has the same distribution.
        draft_tokenizer (`PreTrainedTokenizerBase`, *optional*): the draft's tokenizer, checked against the target's.
        stream (`Callable[[str], None]`, *optional*): called with each new piece of text as soon as it is final.

    Returns:
        `GenerateResult`: text, ids, acceptance rate, timings.

    Example:
        ```python
        >>> model, tokenizer = hybridize.load("out/smol-mamba50")
        >>> result = generate(model, tokenizer, "The capital of France is", GenerateConfig(max_new_tokens=32),
        ...                   draft=early_exit_draft(model, 8), stream=print)
        >>> result.acceptance_rate, result.tokens_per_s
        ```
    """
    if isinstance(draft, nn.Module):
        check_draft(model, tokenizer, draft, draft_tokenizer)
    prompt_ids = _prompt_ids(tokenizer, prompt, config)
    eos = set() if config.ignore_eos else _eos_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(config.seed)
    text = _TextStream(tokenizer, config.stop, stream)
    vocab = _vocab_size(model)

    # Prefill: the target's last logits give the first token
    start = time.perf_counter()
    target = _Decoder(model)
    first, _ = _pick(target.forward(prompt_ids, last_only=True)[-1], config, generator)
    drafter, k = None, 0
    if isinstance(draft, PromptLookupDraft):
        drafter = _LookupDrafter(draft, vocab)
    elif draft is not None:
        drafter = _ModelDrafter(draft, prompt_ids, vocab)
    if drafter is not None:
        limit = min(target.max_rollback(), drafter.max_rollback()) - 1  # a round runs K + 1 tokens through each
        if limit < 1 or (not config.adaptive and config.draft_tokens > limit):
            raise ConfigError(
                f"these models can roll back at most {limit + 1} tokens per round (a streaming or NHA window), so "
                f"draft_tokens {config.draft_tokens} is too many; use draft_tokens <= {max(int(limit), 1)} or --adaptive"
            )
        max_k = int(min(config.max_draft_tokens, limit))
        k = min(config.draft_tokens, max_k)
    prefill_s = time.perf_counter() - start

    start = time.perf_counter()
    tokens, new = [*prompt_ids, first], [first]
    stop_reason, drafted, accepted, rounds, ks = "length", 0, 0, 0, []
    keep = text.add([first])
    while True:
        if keep is not None:
            new, stop_reason = new[:keep], "stop"
            break
        if new[-1] in eos:
            stop_reason = "eos"
            break
        if len(new) >= config.max_new_tokens:
            break
        budget = config.max_new_tokens - len(new)
        drafts, draft_probs = [], []
        if k and budget > 1:
            drafts, draft_probs = drafter.propose(tokens, min(k, budget - 1), config, generator)

        # Verify [last, d1..dK] in one target forward; keep what is accepted
        pending = tokens[target.seen :]
        if drafts:
            target.begin()
        logits = target.rows(pending + drafts, keep=len(drafts) + 1)
        n, token = _accept(logits, drafts, draft_probs, config, generator)
        if drafts:
            target.commit(len(pending) + n)
            drafter.accept(n, len(drafts))
            drafted, accepted = drafted + len(drafts), accepted + n
            ks.append(len(drafts))
            if config.adaptive and len(drafts) == k:
                k = min(k + 2, max_k) if n == k else max(k - 1, 1)
        rounds += 1

        step = [*drafts[:n], token]
        if eos & set(step):
            step = step[: next(i for i, t in enumerate(step) if t in eos) + 1]
        tokens += step
        new += step
        keep = text.add(step)
    decode_s = time.perf_counter() - start
    return GenerateResult(
        text=text.finish(),
        token_ids=tuple(new),
        prompt_tokens=len(prompt_ids),
        stop_reason=stop_reason,
        drafted=drafted,
        accepted=accepted,
        rounds=rounds,
        prefill_s=prefill_s,
        decode_s=decode_s,
        draft_tokens=tuple(ks),
    )


def early_exit_draft(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A draft made of `model`'s first `num_layers` layers, its final norm and its head, sharing their weights (no
    copy, no extra memory): self-speculative decoding (Draft & Verify, arXiv 2309.08168; LayerSkip, arXiv 2404.16710,
    which also trains the early exit; here it is used as is, so acceptance depends on how settled the hidden state
    already is at that depth).

    Args:
        model (`PreTrainedModel`): a hybrid or a Llama-family model (`model.model.layers`). Not modified.
        num_layers (`int`): layers kept, 1 to the model's depth - 1.

    Example:
        ```python
        >>> draft = early_exit_draft(model, 8)
        ```
    """
    layers = model.model.layers
    if not 1 <= num_layers < len(layers):
        raise ConfigError(
            f"draft layers must be in [1, {len(layers) - 1}] for this {len(layers)}-layer model, got {num_layers}"
        )
    values = model.config.to_dict()
    values["num_hidden_layers"] = num_layers
    for name in ("mixer_types", "layer_types"):
        if values.get(name) is not None:
            values[name] = values[name][:num_layers]
    if values.get("lowrank"):
        values["lowrank"] = {k: r for k, r in values["lowrank"].items() if int(k.split(".")[2]) < num_layers}
    config = type(model.config).from_dict(values)
    with torch.device("meta"):
        draft = type(model)(config)
    draft.model.embed_tokens, draft.model.norm = model.model.embed_tokens, model.model.norm
    draft.model.rotary_emb, draft.lm_head = model.model.rotary_emb, model.lm_head
    draft.model.layers = nn.ModuleList(layers[:num_layers])
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft.eval()


def load_draft(
    target: PreTrainedModel, spec: str | None = None, *, layers: int | None = None, lookup: bool = False
) -> tuple[PreTrainedModel | PromptLookupDraft | None, PreTrainedTokenizerBase | None]:
    """The draft the command line asks for: a model spec (`load`), the first `layers` layers of that model or of
    `target` itself (`early_exit_draft`), or a `PromptLookupDraft`. Returns the draft (`None`: no draft) and its
    tokenizer (`None` when it shares the target's)."""
    if lookup and (spec is not None or layers is not None):
        raise ConfigError(
            "the prompt-lookup draft needs no model; drop --draft and --draft-layers, or --prompt-lookup"
        )
    if lookup:
        return PromptLookupDraft(), None
    draft, tokenizer = (None, None)
    if spec is not None:  # in the target's dtype and layout
        draft, tokenizer = load(spec, dtype=target.dtype, decode_layout=True)
    if layers is not None:
        draft = early_exit_draft(draft if draft is not None else target, layers)
    return draft, tokenizer


def compare_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[int],
    config: GenerateConfig,
    *,
    draft: PreTrainedModel | PromptLookupDraft | None,
    draft_tokenizer: PreTrainedTokenizerBase | None = None,
    repeats: int = 3,
) -> dict:
    """Decode tokens/s with and without speculation, side by side: `repeats` interleaved rounds of plain and
    speculative `generate` with the same config, medians and their ratio.

    Returns:
        `dict` with `plain` and `speculative` (each: the medians of `tokens_per_s`, `decode_s`, `prefill_s`, and the
        first run's `GenerateResult.to_dict()`), `speedup` (speculative over plain tokens/s) and `same_tokens`
        (whether both gave the same ids: always for greedy decoding).
    """
    if draft is None:
        raise ConfigError("comparing needs a draft to compare with; give --draft, --draft-layers or --prompt-lookup")
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    runs: dict[str, list[GenerateResult]] = {"plain": [], "speculative": []}
    for _ in range(repeats):
        runs["plain"].append(generate(model, tokenizer, prompt, config))
        runs["speculative"].append(
            generate(model, tokenizer, prompt, config, draft=draft, draft_tokenizer=draft_tokenizer)
        )
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "tokens_per_s": statistics.median(r.tokens_per_s for r in results),
            "decode_s": statistics.median(r.decode_s for r in results),
            "prefill_s": statistics.median(r.prefill_s for r in results),
            "first_run": results[0].to_dict(),
        }
    summary["speedup"] = summary["speculative"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    summary["same_tokens"] = runs["plain"][0].token_ids == runs["speculative"][0].token_ids
    summary["repeats"] = repeats
    return summary


def format_generate(result: GenerateResult) -> str:
    """One line of statistics for the terminal."""
    line = (
        f"{len(result.token_ids)} tokens ({result.stop_reason}): {result.tokens_per_s:.1f} tokens/s decode, "
        f"prefill {result.prefill_s:.2f} s, decode {result.decode_s:.2f} s"
    )
    if result.drafted:
        ks = result.draft_tokens
        line += (
            f"; acceptance {result.acceptance_rate:.2f} ({result.accepted}/{result.drafted}), "
            f"{result.tokens_per_round:.2f} tokens per target forward, {sum(ks) / len(ks):.1f} drafted per round"
        )
    return line


def format_compare(result: dict) -> str:
    """The table of `compare_generate`."""
    lines = [f"{'':<12} {'tokens/s':>9} {'decode s':>9} {'prefill s':>9} {'acceptance':>10} {'tokens/fwd':>10}"]
    for name in ("plain", "speculative"):
        row, first = result[name], result[name]["first_run"]
        rate = "-" if first["acceptance_rate"] is None else f"{first['acceptance_rate']:.2f}"
        lines.append(
            f"{name:<12} {row['tokens_per_s']:>9.2f} {row['decode_s']:>9.2f} {row['prefill_s']:>9.2f} {rate:>10} "
            f"{first['tokens_per_round']:>10.2f}"
        )
    same = "yes" if result["same_tokens"] else "no (sampling)"
    lines.append(
        f"speedup x{result['speedup']:.2f} (medians of {result['repeats']} interleaved runs; same tokens: {same})"
    )
    return "\n".join(lines)


__all__ = [
    "GenerateConfig",
    "GenerateResult",
    "PromptLookupDraft",
    "check_draft",
    "compare_generate",
    "early_exit_draft",
    "format_compare",
    "format_generate",
    "generate",
    "load_draft",
]
