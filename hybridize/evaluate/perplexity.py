"""First-cut quality metrics for a converted or compressed model: held-out perplexity, and its distance from the
source model (KL divergence and top-1 agreement of the next-token distributions).

Perplexity alone hides how far a hybrid drifted from its source: two models can have the same perplexity and disagree
on many tokens. KL(source || hybrid) per token, the quantity distillation minimises, and the share of positions whose
most likely next token is the same, measure the drift directly. Both models see the same blocks in one pass, so the
numbers are paired. Sums are accumulated in float64 so that long runs do not lose precision.

`EvalConfig.prompt_len` scores only what follows a prompt, fed through the cache the way generation feeds it: what a
model decides at prefill (LightTransfer's dynamic layer choice, a streaming cache's eviction) is invisible to a single
full-sequence forward and shows up only there.

`evaluate` with `EvalConfig.tasks` runs lm-eval tasks instead, through the bridge in `harness.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..compat import config_second
from ..configs.distill import KL_KINDS
from ..configs.evaluate import EvalConfig
from ..errors import ConfigError
from ..io.corpus import load_corpus, token_blocks
from ..io.text import read_documents
from ..modeling.cache import new_cache

# Tokens per cached forward after the prompt in prompt + continuation scoring: one token at a time is exactly
# decoding, but slow; every mixer's cache accepts chunks and gives the same logits (tested).
CONTINUATION_CHUNK = 64


def perplexity(
    model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 1, prompt_len: int = 0, progress: bool = False
) -> float:
    """Perplexity of a causal LM on token blocks: exp of the mean next-token negative log-likelihood.

    Every position but the last of each block is scored against the next token (with a `prompt_len`, only the
    tokens after the prompt); blocks do not see each other.

    Args:
        model (`nn.Module`): any Hugging Face causal LM (its output has `.logits`).
        blocks (`torch.LongTensor` of shape `(num_blocks, seq_len)`): from `token_blocks`.
        batch_size (`int`, *optional*, defaults to 1): blocks per forward pass.
        prompt_len (`int`, *optional*, defaults to 0): prefill this many tokens, score the rest (`EvalConfig`).
        progress (`bool`, *optional*, defaults to `False`): show a tqdm bar.

    Returns:
        `float`: the perplexity.

    Example: `ppl = perplexity(model, token_blocks(tokenizer, load_corpus("heldout"), seq_len=512))`
    """
    _check_blocks(blocks)
    nll, count = 0.0, 0
    with _eval_mode(model), torch.inference_mode():
        for batch in _batches(blocks, batch_size, progress):
            logits = _logits(model, batch, prompt_len)
            nll += _nll_sum(logits, batch.to(logits.device))
            count += logits.shape[0] * (logits.shape[1] - 1)  # the positions _nll_sum scored
    return math.exp(nll / count)


def compare_logits(
    model: nn.Module,
    baseline: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 1,
    prompt_len: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Distance of `model`'s next-token distributions from `baseline`'s on the same blocks, in one pass.

    KL and agreement are averaged over every position of every block (each position predicts a next token);
    perplexities over every position but the last, as in `perplexity`. With a `prompt_len`, both models run the
    prompt as a cached prefill and only the positions from the prompt's last token on count.

    Args:
        model (`nn.Module`): the model under test, a Hugging Face causal LM.
        baseline (`nn.Module`): the reference (usually the source model), with the same vocabulary.
        blocks (`torch.LongTensor` of shape `(num_blocks, seq_len)`): from `token_blocks`.
        batch_size (`int`, *optional*, defaults to 1): blocks per forward pass.
        prompt_len (`int`, *optional*, defaults to 0): prefill this many tokens, score the rest (`EvalConfig`).
        progress (`bool`, *optional*, defaults to `False`): show a tqdm bar.

    Returns:
        `dict[str, float]`: `kl` (mean per-token KL(baseline || model), in nats), `top1_agreement` (fraction of
        positions where both argmaxes agree), `perplexity` (the model's), `baseline_perplexity`, and the largest and
        the mean absolute difference of the logits (`max_abs_logit_diff`, `mean_abs_logit_diff`: how exactly an
        export reproduces its model, e.g. a GGUF file run by llama.cpp against the PyTorch hybrid).

    Example: `compare_logits(hybrid, source, blocks)["kl"]`
    """
    _check_blocks(blocks)
    kl, agree, nll, baseline_nll, positions = 0.0, 0, 0.0, 0.0, 0
    max_abs, sum_abs = 0.0, 0.0
    with _eval_mode(model, baseline), torch.inference_mode():
        for batch in _batches(blocks, batch_size, progress):
            logits = _logits(model, batch, prompt_len)
            baseline_logits = _logits(baseline, batch, prompt_len).to(logits.device)
            if baseline_logits.shape != logits.shape:
                raise ConfigError(
                    f"model logits {tuple(logits.shape)} and baseline logits {tuple(baseline_logits.shape)} differ; "
                    "compare models that share a vocabulary"
                )
            targets = batch.to(logits.device)
            nll += _nll_sum(logits, targets)
            baseline_nll += _nll_sum(baseline_logits, targets)
            log_p = F.log_softmax(baseline_logits.float(), dim=-1)  # (b, l, v) reference
            log_q = F.log_softmax(logits.float(), dim=-1)  # (b, l, v) model
            # KL(p || q) = sum_v p (log p - log q); p = 0 contributes 0.
            kl += (log_p.exp() * (log_p - log_q)).sum(-1).double().sum().item()
            agree += int((logits.argmax(-1) == baseline_logits.argmax(-1)).sum().item())
            distance = (logits.float() - baseline_logits.float()).abs()  # (b, l, v)
            max_abs, sum_abs = max(max_abs, distance.max().item()), sum_abs + distance.double().sum().item()
            positions += logits.shape[0] * logits.shape[1]
    predictions = positions - blocks.shape[0]  # a block's last position predicts nothing
    return {
        "kl": kl / positions,
        "top1_agreement": agree / positions,
        "perplexity": math.exp(nll / predictions),
        "baseline_perplexity": math.exp(baseline_nll / predictions),
        "max_abs_logit_diff": max_abs,
        "mean_abs_logit_diff": sum_abs / (positions * logits.shape[-1]),
    }


def token_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: Literal["forward_kl", "reverse_kl"]
) -> torch.Tensor:
    """KL divergence at each position, `(b, l, v)` logits -> `(b, l)` nats, computed in float32 at least."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype), dim=-1)  # student
    log_p = F.log_softmax(teacher_logits.to(dtype), dim=-1)  # teacher
    if kind == "forward_kl":  # KL(p || q) = sum_v p (log p - log q)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":  # KL(q || p) = sum_v q (log q - log p)
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def check_eval(model_config: Any, config: EvalConfig) -> None:
    """Check `config` against the model's config, before any weights are read: with `tasks`, the task names and the
    context the pass key tasks need (`harness.check_tasks`; `max_length` defaults to the config's).

    Raises:
        `ConfigError`: an unknown task, or a `max_length` too short for a pass key task.

    Example: `check_eval(load_config("llama"), EvalConfig(tasks=("passkey_4k",)))`
    """
    if config.tasks:
        from .harness import check_tasks, default_max_length  # lm-eval takes seconds to import: only when asked for

        max_length = config.max_length or default_max_length(model_config)
        check_tasks(config.tasks, max_length=max_length, batch_size=config.batch_size, limit=config.limit)


@config_second(EvalConfig)
def evaluate(
    model: nn.Module, config: EvalConfig, *, tokenizer: Any, baseline: nn.Module | None = None, progress: bool = False
) -> dict[str, Any]:
    """Held-out perplexity of `model` and, with a `baseline`, its KL and top-1 agreement against it; or, when
    `config.tasks` is set, lm-eval tasks on `model` (and on the baseline, side by side).

    Args:
        model (`nn.Module`): a Hugging Face causal LM.
        config (`EvalConfig`): split, block length, token budget and batch size; or the lm-eval tasks.
        tokenizer: its tokenizer (the baseline must share it).
        baseline (`nn.Module`, *optional*): the reference model, usually the source of a conversion.
        progress (`bool`, *optional*, defaults to `False`): show a tqdm bar.

    Returns:
        `dict`: `split`, `seq_len`, `num_blocks`, `num_tokens` (tokens fed to the model), `perplexity`; with a
        baseline also `baseline_perplexity`, `kl` and `top1_agreement`. With `config.tasks`: `max_length`, `limit`
        and `tasks` (`{task: {metric: value}}`, see `harness.run_tasks`), and with a baseline `baseline_tasks`.

    Example: `evaluate(hybrid, EvalConfig(max_tokens=8192), tokenizer=tokenizer, baseline=source)`
    """
    if config.tasks:
        return _evaluate_tasks(model, tokenizer, config, baseline=baseline)
    blocks = token_blocks(tokenizer, _texts(config), seq_len=config.seq_len, max_tokens=config.max_tokens)
    result: dict[str, Any] = {"split": config.split} if config.data is None else {"data": config.data}
    result.update(seq_len=config.seq_len, num_blocks=blocks.shape[0], num_tokens=blocks.numel())
    if config.prompt_len:
        result["prompt_len"] = config.prompt_len
    options = {"batch_size": config.batch_size, "prompt_len": config.prompt_len, "progress": progress}
    if baseline is None:
        result["perplexity"] = perplexity(model, blocks, **options)
    else:
        result.update(compare_logits(model, baseline, blocks, **options))
    return result


def _texts(config: EvalConfig) -> list[str]:
    if config.data is None:
        return load_corpus(config.split)
    return list(read_documents(config.data)[0])


def _evaluate_tasks(
    model: nn.Module, tokenizer: Any, config: EvalConfig, *, baseline: nn.Module | None
) -> dict[str, Any]:
    from .harness import default_max_length, run_tasks  # lm-eval takes seconds to import: only when asked for

    max_length = config.max_length or default_max_length(model.config)
    options = {"max_length": max_length, "batch_size": config.batch_size, "limit": config.limit}
    result: dict[str, Any] = {"max_length": max_length, "limit": config.limit}
    result["tasks"] = run_tasks(model, tokenizer, config.tasks, **options)
    if baseline is not None:
        result["baseline_tasks"] = run_tasks(baseline, tokenizer, config.tasks, **options)
    return result


def _check_blocks(blocks: torch.Tensor) -> None:
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise ConfigError(f"blocks of shape {tuple(blocks.shape)}; pass (num_blocks >= 1, seq_len >= 2) token ids")


def _batches(blocks: torch.Tensor, batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc="evaluating", unit="batch", disable=not progress):
        yield blocks[start : start + batch_size]


def _logits(model: nn.Module, batch: torch.Tensor, prompt_len: int = 0) -> torch.Tensor:
    """Logits from the prompt's last position on (every position without a prompt): `(b, l - max(p - 1, 0), v)`."""
    ids = batch.to(next(model.parameters()).device)
    if not prompt_len:
        return model(input_ids=ids, use_cache=False).logits
    cache = new_cache(model)
    pieces = [model(input_ids=ids[:, :prompt_len], cache=cache, use_cache=True, logits_to_keep=1).logits]
    for start in range(prompt_len, ids.shape[1], CONTINUATION_CHUNK):
        chunk = ids[:, start : start + CONTINUATION_CHUNK]
        pieces.append(model(input_ids=chunk, cache=cache, use_cache=True).logits)
    return torch.cat(pieces, dim=1)


def _nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Sum of next-token negative log-likelihoods of the last `logits.shape[1] - 1` tokens: the logits' first
    position predicts the token after the block's first `l - logits.shape[1] + 1`."""
    predicted = logits[:, :-1].float().flatten(0, 1)  # (b * (k - 1), v)
    targets = input_ids[:, input_ids.shape[1] - logits.shape[1] + 1 :].flatten()  # (b * (k - 1),)
    return F.cross_entropy(predicted, targets, reduction="none").double().sum().item()


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Switch off dropout while measuring, then give each model back its own training flag."""
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in zip(models, was_training):
            model.train(training)


__all__ = ["EvalConfig", "check_eval", "compare_logits", "evaluate", "perplexity", "token_kl"]
