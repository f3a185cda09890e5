"""`generate`: the decoding loop. A prefill, then rounds: the drafter proposes K tokens, the target verifies them
in one forward (`speculative`), and both caches keep what was accepted; without a draft each round is one plain
decode step. It stops at an end-of-sequence token, a stop string or `max_new_tokens`."""

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..compat import config_second
from ..configs.generate import GenerateConfig, PromptLookupDraft
from ..errors import ConfigError
from .drafts import _LookupDrafter, _ModelDrafter, _vocab_size, check_draft
from .result import GenerateResult
from .speculative import _accept, _Decoder, _pick
from .text import _prompt_ids, _TextStream


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    eos = tokenizer.eos_token_id if eos is None else eos
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


@config_second(GenerateConfig, old=("tokenizer", "prompt", "config"))
@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    config: GenerateConfig,
    *,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[int],
    draft: PreTrainedModel | PromptLookupDraft | None = None,
    draft_tokenizer: PreTrainedTokenizerBase | None = None,
    stream: Callable[[str], None] | None = None,
) -> GenerateResult:
    """Generate a continuation of `prompt` with `model`, speculatively when a `draft` is given (batch size 1).

    Args:
        model (`PreTrainedModel`): the target: a hybrid or any transformers causal LM. Not modified.
        config (`GenerateConfig`): everything that changes the output.
        tokenizer (`PreTrainedTokenizerBase`): the target's tokenizer.
        prompt (`str` or a sequence of token ids): the prompt (with `config.chat`, the user message).
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
        >>> result = generate(model, GenerateConfig(max_new_tokens=32), tokenizer=tokenizer,
        ...                   prompt="The capital of France is", draft=early_exit_draft(model, 8), stream=print)
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


__all__ = ["generate"]
