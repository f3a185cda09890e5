"""`LowRankLinear`: a linear layer stored as two matmuls, `up(down(x))`, written by `hybridize factorize`
(SVD-LLM arXiv 2403.07378, ASVD arXiv 2312.05821, FWSVD arXiv 2207.00112; the two-Linear "LED" unit of the Low-Rank
Transformer, Greenformers arXiv 2108.10808).

`HybridConfig.lowrank` maps module names (as in `named_modules()`, e.g. `"model.layers.3.mlp.gate_proj"`) to ranks;
each decoder layer builds its listed linears as `LowRankLinear`s (`apply_lowrank`), so a saved factorized model loads
back through the Auto classes with its factors. A rank-r factor of an (out x in) weight holds r·(in + out)
parameters instead of in·out.
"""

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """`y = up(down(x))`: `down` is (in -> rank, no bias), `up` is (rank -> out) and carries the original bias.

    Args:
        in_features (`int`): input size.
        out_features (`int`): output size.
        rank (`int`): inner size, at least 1.
        bias (`bool`, *optional*, defaults to `True`): whether `up` has a bias.

    Example:
        ```python
        >>> layer = LowRankLinear(576, 1536, rank=256, bias=False)
        >>> layer.weight.shape  # the dense product, for inspection
        torch.Size([1536, 576])
        ```
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        if rank < 1:
            raise ValueError(f"a low-rank linear needs rank >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out x in) product `up.weight @ down.weight` (computed, not stored)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def apply_lowrank(root: nn.Module, ranks: dict[str, int], prefix: str = "") -> None:
    """Replace the `nn.Linear` submodules of `root` named in `ranks` (full names, starting with `prefix`) by
    untrained `LowRankLinear`s of the given rank; names under other prefixes are ignored."""
    for name, rank in ranks.items():
        if not name.startswith(prefix):
            continue
        parent_name, _, child = name[len(prefix) :].rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"lowrank entry {name!r} names no nn.Linear (found {type(linear).__name__})")
        factored = LowRankLinear(linear.in_features, linear.out_features, int(rank), bias=linear.bias is not None)
        setattr(parent, child, factored.to(linear.weight.dtype))


__all__ = ["LowRankLinear", "apply_lowrank"]
