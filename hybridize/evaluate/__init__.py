"""Measuring models: the packaged offline corpus, perplexity, distance from a source model, speed and memory."""

from .bench import BenchConfig, bench, cache_bytes
from .corpus import SPLITS, load_articles, load_corpus, token_blocks
from .perplexity import EvalConfig, compare_logits, evaluate, perplexity

__all__ = [
    "BenchConfig",
    "bench",
    "cache_bytes",
    "SPLITS",
    "EvalConfig",
    "compare_logits",
    "evaluate",
    "load_articles",
    "load_corpus",
    "perplexity",
    "token_blocks",
]
