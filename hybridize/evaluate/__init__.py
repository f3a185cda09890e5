"""Measuring models: perplexity, distance from a source model, lm-eval tasks (offline and registry), speed and memory.
The packaged offline corpus lives in `hybridize.io` and is re-exported here."""

from ..io.corpus import SPLITS, load_articles, load_corpus, token_blocks
from .bench import BenchConfig, bench, cache_bytes
from .harness import OFFLINE_TASKS, TASKS_DIR, format_results, run_tasks
from .perplexity import EvalConfig, compare_logits, evaluate, perplexity

__all__ = [
    "OFFLINE_TASKS",
    "SPLITS",
    "TASKS_DIR",
    "BenchConfig",
    "EvalConfig",
    "bench",
    "cache_bytes",
    "compare_logits",
    "evaluate",
    "format_results",
    "load_articles",
    "load_corpus",
    "perplexity",
    "run_tasks",
    "token_blocks",
]
