"""Measuring models: the packaged offline corpus, perplexity, and distance from a source model."""

from .corpus import SPLITS, load_articles, load_corpus, token_blocks
from .perplexity import EvalConfig, compare_logits, evaluate, perplexity

__all__ = [
    "SPLITS",
    "EvalConfig",
    "compare_logits",
    "evaluate",
    "load_articles",
    "load_corpus",
    "perplexity",
    "token_blocks",
]
