"""The options of `hybridize.prune`, `factorize` and `fuse` (`PruneConfig`, `FactorizeConfig`, `FuseConfig`,
re-exported by `hybridize.compress.prune`, `.lowrank` and `.fuse`), and the choices they check."""

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from ..validation import check_fields

# prune
GROUPINGS = ("aware", "ignore")
DEPTH_METRICS = ("block", "ppl")
AXES = ("hidden", "ffn", "attn_heads", "ssm_heads", "ssm_head_dim", "drop_layers")
# factorize
METHODS = ("svd", "asvd", "fwsvd", "svd-llm")
RANK_ALLOCS = ("uniform", "sensitivity")
TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),  # attention-like mixers: attention, streaming, nha
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "mamba": ("in_proj", "out_proj"),
}
# fuse
ALIGNS = ("activations", "weights", "none")
SOLVERS = ("emd", "sinkhorn")
WIDTH_AXES = ("hidden", "mlp", "heads")


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """What to prune and how to measure importance. Give either `params` or one or more explicit axes.

    Args:
        params (`float`, *optional*): fraction of the model's parameters to keep, in (0, 1]; the axis sizes are found
            by a small search (see `hybridize.compress.prune`) and recorded in `hybridize.json`.
        hidden (`int`, *optional*): new hidden size (residual width).
        ffn (`int`, *optional*): new MLP intermediate size.
        attn_heads (`int`, *optional*): new query heads per attention (and Gated DeltaNet) layer; a multiple of the
            KV heads.
        ssm_heads (`int`, *optional*): new heads per Mamba2 layer; a multiple of its groups.
        ssm_head_dim (`int`, *optional*): new channels per Mamba2 head (the same channels in every head).
        drop_layers (`int`, *optional*): number of whole layers to remove.
        ssm_grouping (`str`, *optional*, defaults to `"aware"`): `"aware"` keeps the same heads count in every Mamba2
            group; `"ignore"` keeps the best heads of the layer regardless of their group (the paper's baseline).
        attn_grouping (`str`, *optional*, defaults to `"aware"`): the same choice for attention heads and their KV
            groups (Minitron ranks inside each group).
        depth_metric (`str`, *optional*, defaults to `"block"`): `"block"` (1 - cosine of a layer's input and output)
            or `"ppl"` (loss increase on the scoring blocks when the layer is skipped; one pass per layer).
        rescale_norms (`bool`, *optional*, defaults to `True`): multiply norm weights by sqrt(old / new width), so
            the pruned model equals the original with the pruned channels zeroed.
        data (`str`, *optional*, defaults to `"wiki"`): calibration text: the packaged corpus' train split, or a
            data spec as `hybridize distill --data` takes it.
        num_blocks (`int`, *optional*, defaults to 16): calibration blocks for the importances.
        seq_len (`int`, *optional*, defaults to 512): tokens per calibration and scoring block.
        score_blocks (`int`, *optional*, defaults to 4): further blocks scoring the `params` candidates and the
            `"ppl"` depth metric.
        max_width_pruning (`float`, *optional*, defaults to 0.4): `params` search: at most this fraction of any
            width axis is removed (Minitron's limit).
        max_depth_pruning (`float`, *optional*, defaults to 0.2): `params` search: at most this fraction of layers.
        num_candidates (`int`, *optional*, defaults to 8): `params` search: candidates pruned and scored.

    Example:
        ```python
        >>> pruned = prune(hybrid, PruneConfig(ssm_heads=6, ffn=1024), tokenizer=tokenizer)
        >>> pruned = prune(hybrid, PruneConfig(params=0.8), tokenizer=tokenizer)
        ```
    """

    params: float | None = None
    hidden: int | None = None
    ffn: int | None = None
    attn_heads: int | None = None
    ssm_heads: int | None = None
    ssm_head_dim: int | None = None
    drop_layers: int | None = None
    ssm_grouping: Literal["aware", "ignore"] = "aware"
    attn_grouping: Literal["aware", "ignore"] = "aware"
    depth_metric: Literal["block", "ppl"] = "block"
    rescale_norms: bool = True
    data: str = "wiki"
    num_blocks: int = 16
    seq_len: int = 512
    score_blocks: int = 4
    max_width_pruning: float = 0.4
    max_depth_pruning: float = 0.2
    num_candidates: int = 8

    def __post_init__(self):
        check_fields(self)
        explicit = self.explicit_axes()
        if self.params is None and not explicit:
            raise ConfigError(
                f"nothing to prune: pass params (a fraction of parameters to keep, e.g. 0.8) or at least one of "
                f"{', '.join(AXES)}"
            )
        if self.params is not None and explicit:
            raise ConfigError(
                f"params={self.params} searches every axis and cannot be combined with explicit axes {explicit}; "
                "pass one or the other"
            )
        if self.params is not None and not 0.0 < self.params <= 1.0:
            raise ConfigError(f"params={self.params} must be a fraction of parameters to keep, in (0, 1]")
        for name, value in explicit.items():
            if not isinstance(value, int) or value < (0 if name == "drop_layers" else 1):
                raise ConfigError(
                    f"{name}={value!r} must be a {'non-negative' if name == 'drop_layers' else 'positive'} integer"
                )
        for name in ("ssm_grouping", "attn_grouping"):
            if getattr(self, name) not in GROUPINGS:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(GROUPINGS)}")
        if self.depth_metric not in DEPTH_METRICS:
            raise ConfigError(f"depth_metric={self.depth_metric!r} is not one of {', '.join(DEPTH_METRICS)}")
        for name in ("num_blocks", "score_blocks", "num_candidates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be at least 2")
        for name in ("max_width_pruning", "max_depth_pruning"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")

    def explicit_axes(self) -> dict[str, int]:
        """The axes given explicitly, by name."""
        return {name: getattr(self, name) for name in AXES if getattr(self, name) is not None}


@dataclass(frozen=True, kw_only=True)
class FactorizeConfig:
    """How to factorize a model's linear layers.

    Args:
        ratio (`float`, *optional*, defaults to 0.8): fraction of the targeted linear parameters kept, in (0, 1];
            0.8 is a 20% reduction of those matrices. 1 changes nothing (no rank below full saves parameters).
        method (`str`, *optional*, defaults to `"svd-llm"`): `"svd"`, `"asvd"`, `"fwsvd"` or `"svd-llm"` (see
            `hybridize.compress.lowrank`).
        targets (`tuple[str, ...]`, *optional*, defaults to `("attn", "mlp", "mamba")`): which linears:
            `"attn"` (q/k/v/o of attention-like mixers), `"mlp"` (gate/up/down), `"mamba"` (Mamba2 in/out_proj).
        rank_alloc (`str`, *optional*, defaults to `"uniform"`): `"uniform"` (the same parameter fraction for every
            matrix) or `"sensitivity"` (measured per matrix, same total budget; about one forward pass per matrix).
        alpha (`float`, *optional*, defaults to 0.5): `asvd` only: the exponent of the activation scaling.
        damp (`float`, *optional*, defaults to 0.0): `svd-llm` only: ridge added to the Gram matrix before its
            Cholesky factorization, relative to its mean diagonal. A Gram that is not positive definite always gets
            the smallest ridge that makes it so (SVD-LLM's rule).
        calibration (`str`, *optional*, defaults to `"wiki"`): calibration text: `"wiki"` (the packaged corpus' train
            split) or a data spec as `hybridize distill --data` takes it. Unused by `svd` with uniform ranks.
        calibration_docs (`int`, *optional*, defaults to 16): calibration blocks.
        calibration_len (`int`, *optional*, defaults to 512): tokens per calibration block.
        sensitivity_tokens (`int`, *optional*, defaults to 256): `sensitivity` only: tokens of the first calibration
            block on which each matrix's truncation is measured.

    Example:
        ```python
        >>> model = factorize(model, FactorizeConfig(ratio=0.8, method="svd-llm"), tokenizer=tokenizer)
        ```
    """

    ratio: float = 0.8
    method: str = "svd-llm"
    targets: tuple[str, ...] = ("attn", "mlp", "mamba")
    rank_alloc: str = "uniform"
    alpha: float = 0.5
    damp: float = 0.0
    calibration: str = "wiki"
    calibration_docs: int = 16
    calibration_len: int = 512
    sensitivity_tokens: int = 256

    def __post_init__(self):
        if isinstance(self.targets, str):  # one target by name
            object.__setattr__(self, "targets", (self.targets,))
        check_fields(self, distinct=("targets",))
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(
                f"ratio must be in (0, 1] (the fraction of the targeted linear parameters kept), got {self.ratio}"
            )
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if self.rank_alloc not in RANK_ALLOCS:
            raise ConfigError(
                f"rank_alloc {self.rank_alloc!r} is not supported; choose one of {', '.join(RANK_ALLOCS)}"
            )
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"targets {list(self.targets)} must be a non-empty subset of {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))
        if self.alpha < 0 or self.damp < 0:
            raise ConfigError(f"alpha ({self.alpha}) and damp ({self.damp}) must not be negative")
        if self.calibration_docs < 1 or self.calibration_len < 2 or self.sensitivity_tokens < 2:
            raise ConfigError(
                f"calibration_docs ({self.calibration_docs}) must be >= 1, calibration_len ({self.calibration_len}) "
                f"and sensitivity_tokens ({self.sensitivity_tokens}) >= 2"
            )

    @property
    def needs_data(self) -> bool:
        return self.method != "svd" or self.rank_alloc == "sensitivity"


@dataclass(frozen=True, kw_only=True)
class FuseConfig:
    """How to fuse models.

    Args:
        align (`str`, *optional*, defaults to `"activations"`): the ground cost: `"activations"` (calibration text),
            `"weights"`, or `"none"` (plain weight averaging, no alignment).
        solver (`str`, *optional*, defaults to `"emd"`): `"emd"` (exact OT: a hard matching when sizes are equal)
            or `"sinkhorn"` (entropic, soft; the Transformer fusion paper's choice).
        reg (`float`, *optional*, defaults to 0.08): Sinkhorn's entropic regularisation, relative to the
            max-normalised cost (the paper's 0.08 for activations, 0.06 for weights).
        weights (`tuple[float, ...]`, *optional*): the averaging weight of each model, normalised to sum to 1;
            defaults to equal weights.
        width (`float`, *optional*, defaults to 1.0): in (0, 1]: the fused model's width as a fraction of the
            anchor's, along `width_axes` (heterogeneous fusion: compress while fusing).
        width_axes (`tuple[str, ...]`, *optional*, defaults to `("hidden", "mlp", "heads")`): what `width` narrows:
            the residual stream, the MLP, the query heads (and Mamba2 heads) per group.
        calibration (`str`, *optional*, defaults to `"wiki"`): `align="activations"` only: the calibration text,
            `"wiki"` (the packaged corpus' train split) or a data spec as `hybridize distill --data` takes it.
        calibration_docs (`int`, *optional*, defaults to 8): calibration blocks.
        calibration_len (`int`, *optional*, defaults to 512): tokens per calibration block.

    Example:
        ```python
        >>> fused = fuse([model_a, model_b], FuseConfig(solver="emd"), tokenizer=tokenizer)
        ```
    """

    align: str = "activations"
    solver: str = "emd"
    reg: float = 0.08
    weights: tuple[float, ...] | None = None
    width: float = 1.0
    width_axes: tuple[str, ...] = WIDTH_AXES
    calibration: str = "wiki"
    calibration_docs: int = 8
    calibration_len: int = 512

    def __post_init__(self):
        if isinstance(self.width_axes, str):  # one axis by name
            object.__setattr__(self, "width_axes", (self.width_axes,))
        check_fields(self, distinct=("width_axes",))
        if self.align not in ALIGNS:
            raise ConfigError(f"align {self.align!r} is not supported; choose one of {', '.join(ALIGNS)}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver {self.solver!r} is not supported; choose one of {', '.join(SOLVERS)}")
        if not self.reg > 0:
            raise ConfigError(f"reg must be positive (Sinkhorn's regularisation), got {self.reg}")
        if not 0.0 < self.width <= 1.0:
            raise ConfigError(f"width must be in (0, 1] (a fraction of the anchor's width), got {self.width}")
        if set(self.width_axes) - set(WIDTH_AXES):
            raise ConfigError(f"width_axes {list(self.width_axes)} must be a subset of {', '.join(WIDTH_AXES)}")
        object.__setattr__(self, "width_axes", tuple(a for a in WIDTH_AXES if a in self.width_axes))
        if self.align == "none" and self.width < 1:
            raise ConfigError("width < 1 merges units by their alignment; use align activations or weights")
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(f"weights {list(weights)} must be non-negative with a positive sum")
            object.__setattr__(self, "weights", tuple(w / sum(weights) for w in weights))
        if self.calibration_docs < 1 or self.calibration_len < 2:
            raise ConfigError(
                f"calibration_docs ({self.calibration_docs}) must be >= 1 and calibration_len "
                f"({self.calibration_len}) >= 2"
            )


__all__ = [
    "ALIGNS",
    "AXES",
    "DEPTH_METRICS",
    "GROUPINGS",
    "METHODS",
    "RANK_ALLOCS",
    "SOLVERS",
    "TARGETS",
    "WIDTH_AXES",
    "FactorizeConfig",
    "FuseConfig",
    "PruneConfig",
]
