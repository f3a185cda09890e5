"""Compression of a hybrid after conversion: structured pruning (`prune.py`, Minitron arXiv 2407.14679 with the
group-aware SSM pruning of Nemotron-H, arXiv 2504.11409), low-rank factorization (`lowrank.py`, SVD-LLM arXiv
2403.07378, ASVD, FWSVD) and optimal-transport fusion of several models (`fuse.py`, arXiv 2310.05719)."""

from .fuse import FuseConfig, check_fuse, fuse
from .lowrank import FactorizeConfig, check_factorize, factorize
from .prune import PruneConfig, PruneShape, check_prune, prune

__all__ = [
    "FactorizeConfig",
    "FuseConfig",
    "PruneConfig",
    "PruneShape",
    "check_factorize",
    "check_fuse",
    "check_prune",
    "factorize",
    "fuse",
    "prune",
]
