"""Compression of a hybrid after conversion: structured pruning (`prune.py`, Minitron arXiv 2407.14679 with the
group-aware SSM pruning of Nemotron-H, arXiv 2504.11409)."""

from .prune import PruneConfig, PruneShape, check_prune, prune

__all__ = ["PruneConfig", "PruneShape", "check_prune", "prune"]
