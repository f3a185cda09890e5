"""The lm-evaluation-harness bridge: run lm-eval tasks in-process on a model already in memory.

Why in-process: a hybrid just converted or pruned is measured without being saved first, on exactly the weights the
Python API holds, and `lm_eval.models.huggingface.HFLM` takes a model object and its tokenizer. Task names go to
lm-eval unchanged: hybridize's offline tasks (`OFFLINE_TASKS`, YAMLs in `hybridize/evals_tasks/` over the data that
`evals/build_tasks.py` builds from the held-out Wikipedia articles) and any registry task (`hellaswag`, ...) whose
data is reachable. The same YAML directory works with the plain command line:
`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path <TASKS_DIR> --tasks wiki_ppl`.

Everything runs offline unless the user set `HF_HUB_OFFLINE` themselves: a registry task whose data is not in the
local Hugging Face cache fails at once with a `ConfigError` that says so, instead of waiting on the network.

`max_length` is the context of every request (rolling-window size for perplexity, left truncation of long prompts).
It defaults to the model's `max_position_embeddings`, at most 8192 (lm-eval's own default is the full position
range, 128K for Llama-3.1, which makes perplexity windows huge); a pass key task longer than it is refused rather
than silently truncated. Compare models at the same `max_length`: it changes perplexities.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

TASKS_DIR = Path(__file__).resolve().parent.parent / "evals_tasks"
OFFLINE_TASKS = ("wiki_ppl", "lambada_wiki", "passkey_2k", "passkey_4k", "passkey_8k")
# Tokens (SmolLM2 tokenizer) that a task's longest item needs; a shorter max_length would cut the pass key off.
TASK_LENGTHS = {"passkey_2k": 2048, "passkey_4k": 4096, "passkey_8k": 8192}
MAX_DEFAULT_LENGTH = 8192
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# lm-eval warnings that do not apply to this bridge: it passes a model object on purpose (one process, no accelerate),
# and `hybridize eval` has no `--metadata` (the offline tasks' loader takes none).
_IRRELEVANT_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
)
_WARNING_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task")


def default_max_length(model_config: Any) -> int:
    """The model's `max_position_embeddings` (from its config), at most 8192 (2048 when the config does not say)."""
    return min(getattr(model_config, "max_position_embeddings", None) or 2048, MAX_DEFAULT_LENGTH)


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 1,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate `model` on lm-eval tasks, in this process, and return a compact table of the results.

    Args:
        model (`nn.Module`): a Hugging Face causal LM (a hybrid or any transformers model); not modified.
        tokenizer: its tokenizer, passed to lm-eval explicitly (lm-eval would otherwise look it up by name).
        tasks (`Sequence[str]`): task, group or tag names: `OFFLINE_TASKS` and any lm-eval registry name.
        max_length (`int`, *optional*): context length of every request; defaults to
            `default_max_length(model.config)`.
        batch_size (`int`, *optional*, defaults to 1): requests per forward pass.
        limit (`int`, *optional*): evaluate only the first `limit` items of each task (for quick checks; the numbers
            are then not comparable with full runs).

    Returns:
        `dict[str, dict[str, float]]`: per task, each metric lm-eval reports (`word_perplexity`, `acc`, ...; a filter
        other than `none` is appended as `metric,filter`), `acc_stderr` beside `acc` (binomial standard error), and
        `num_items`, the number of items evaluated.

    Raises:
        `ConfigError`: an unknown task name, a task whose data cannot be read offline, a bad `limit` or `batch_size`,
            or a `max_length` too short for a pass key task.

    Example:
        ```python
        >>> run_tasks(hybrid, tokenizer, ["wiki_ppl", "passkey_4k"], max_length=4096)["passkey_4k"]["acc"]
        0.95
        ```
    """
    tasks = list(dict.fromkeys(tasks))
    max_length = default_max_length(model.config) if max_length is None else max_length
    _check_args(tasks, max_length, batch_size, limit)
    with _offline(), _kept_rng_state(), _without_irrelevant_warnings():
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        task_manager = _task_manager(tasks)
        was_training = model.training  # HFLM switches the model to eval mode; the caller gets its mode back
        try:
            lm = HFLM(
                pretrained=model, backend="causal", tokenizer=tokenizer, max_length=max_length, batch_size=batch_size
            )
            output = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=task_manager, limit=limit, bootstrap_iters=0, log_samples=False
            )
        except Exception as error:
            if _is_data_error(error):
                raise ConfigError(
                    f"the data of task(s) {', '.join(tasks)} cannot be read offline ({type(error).__name__}: "
                    f"{error}); run the task once with network access (HF_HUB_OFFLINE=0) to fill the Hugging Face "
                    f"cache, or use the offline tasks {', '.join(OFFLINE_TASKS)}"
                ) from error
            raise
        finally:
            model.train(was_training)
    return _compact(output)


def format_results(tasks: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None = None) -> str:
    """The table `run_tasks` returns as aligned text, one row per task and metric, the baseline's values beside."""
    header = ["task", "metric", "model"] + (["baseline"] if baseline is not None else [])
    rows = [header]
    for task, metrics in tasks.items():
        for metric, value in metrics.items():
            other = (baseline or {}).get(task, {}).get(metric)
            rows.append([task, metric, _number(value)] + ([_number(other)] if baseline is not None else []))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    )


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _check_args(tasks: list[str], max_length: int, batch_size: int, limit: int | None) -> None:
    if not tasks or not all(isinstance(name, str) and name.strip() for name in tasks):
        raise ConfigError(f"tasks={tasks!r}: name at least one lm-eval task, e.g. {', '.join(OFFLINE_TASKS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} must be at least 1 (or None for every item)")
    if max_length < 2:
        raise ConfigError(f"max_length={max_length} must be at least 2")
    if too_long := [name for name in tasks if TASK_LENGTHS.get(name, 0) > max_length]:
        need = max(TASK_LENGTHS[name] for name in too_long)
        raise ConfigError(
            f"{', '.join(too_long)} need max_length >= {need}, got {max_length}: the pass key would be cut off; "
            f"pass max_length={need} (--max-length {need})"
        )


def check_tasks(tasks: Sequence[str], *, max_length: int, batch_size: int = 1, limit: int | None = None) -> None:
    """What `run_tasks` checks, without a model: run it before loading one. Names outside `OFFLINE_TASKS` are looked
    up in lm-eval's registry, which imports lm-eval and indexes its YAML files (seconds); ours need neither.

    Raises:
        `ConfigError`: as `run_tasks`.

    Example: `check_tasks(["passkey_4k"], max_length=default_max_length(load_config("llama")))`
    """
    tasks = list(dict.fromkeys(tasks))
    _check_args(tasks, max_length, batch_size, limit)
    if any(name not in OFFLINE_TASKS for name in tasks):
        with _offline():
            _task_manager(tasks)


def _task_manager(tasks: list[str]) -> Any:
    """lm-eval's task index with ours; `ConfigError` for a name it does not know. The registry holds hundreds of
    YAMLs: it is indexed only when a task outside ours is named."""
    from lm_eval.tasks import TaskManager

    needs_registry = any(name not in OFFLINE_TASKS for name in tasks)
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_registry)
    if unknown := [name for name in tasks if name not in task_manager.all_tasks]:
        raise ConfigError(
            f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}; offline tasks are "
            f"{', '.join(OFFLINE_TASKS)}, and `lm_eval ls tasks` lists the registry"
        )
    return task_manager


@contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face offline mode for the duration, unless the user chose a mode with HF_HUB_OFFLINE.

    huggingface_hub and datasets read these variables once, at import (transformers imports huggingface_hub before
    this runs), so their module-level flags are switched too, and everything is restored afterwards.
    """
    if "HF_HUB_OFFLINE" in os.environ:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE")]
    flags.append((datasets.config, "HF_DATASETS_OFFLINE"))
    saved_flags = [getattr(module, name) for module, name in flags]
    os.environ.update({name: "1" for name in _OFFLINE_ENV})
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _IrrelevantWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _IRRELEVANT_WARNINGS)


@contextmanager
def _without_irrelevant_warnings() -> Iterator[None]:
    """Drop lm-eval's `_IRRELEVANT_WARNINGS` for the duration, and its `git describe` of the working directory (the
    result is not kept, and outside a repository git prints `fatal: not a git repository`)."""
    import lm_eval.evaluator

    loggers, drop = [logging.getLogger(name) for name in _WARNING_LOGGERS], _IrrelevantWarningFilter()
    git_hash = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    for logger in loggers:
        logger.addFilter(drop)
    if git_hash is not None:
        lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
        if git_hash is not None:
            lm_eval.evaluator.get_git_commit_hash = git_hash


@contextmanager
def _kept_rng_state() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators: give the caller its own state back."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _is_data_error(error: BaseException) -> bool:
    """An error from reaching a dataset: the network, the Hub, or the datasets library (offline or missing)."""
    while error is not None:
        module = type(error).__module__.split(".")[0]
        if isinstance(error, (ConnectionError, TimeoutError)) or module in ("datasets", "huggingface_hub", "httpx"):
            return True
        error = error.__cause__ or error.__context__
    return False


def _compact(output: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's `results[task]["metric,filter"]` as `{task: {metric: value}}`, without stderr placeholders."""
    table: dict[str, dict[str, float]] = {}
    for task, values in output["results"].items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            metrics[metric if filter_name == "none" else key] = float(value)
        count = output.get("n-samples", {}).get(task, {}).get("effective")
        if "acc" in metrics and count and count > 1:
            # Standard error of a mean of 0/1 outcomes (sample standard deviation over sqrt(n), as lm-eval's).
            metrics["acc_stderr"] = math.sqrt(metrics["acc"] * (1 - metrics["acc"]) / (count - 1))
        if count is not None:
            metrics["num_items"] = int(count)
        table[task] = metrics
    return table


__all__ = [
    "MAX_DEFAULT_LENGTH",
    "OFFLINE_TASKS",
    "TASKS_DIR",
    "TASK_LENGTHS",
    "check_tasks",
    "default_max_length",
    "format_results",
    "run_tasks",
]
