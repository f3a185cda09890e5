"""The surgery registry: `MixerSurgery`, `register_surgery`, `surgery_for`, and the slicing helpers the handlers and
the compress transformations share. See the package docstring.
"""

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..modeling.mixers import MIXERS

_HANDLERS: dict[type, "MixerSurgery"] = {}

# the operations of hybridize.compress that ask for a handler, and what to do with a model they refuse
_FIXES = {"prune": "prune a model without it"}


class MixerSurgery:
    """What the compress transformations ask of one mixer type. Subclasses fill in the operations they support;
    `operations` names them.

    The prune interface (`hybridize.compress.prune`) works on the prunable shape `PruneShape`, the `Importance` of one
    calibration pass and the `KeptIndices` a selection returns; a handler reads and writes its own fields of them
    (`prune_axes`, its accumulator keys, its `KeptIndices` fields).
    """

    operations: ClassVar[tuple[str, ...]] = ()
    prune_axes: ClassVar[tuple[str, ...]] = ()  # the `PruneShape` (and `PruneConfig`) fields it owns
    grouping: ClassVar[str | None] = None  # the `PruneConfig` field that chooses its grouping ("aware"/"ignore")

    def shape(self, config) -> dict[str, int]:
        """Its `prune_axes` sizes in the (hybrid or dense) `config`."""
        raise NotImplementedError

    def param_count(self, config, shape) -> int:
        """Parameters of one of its layers in `config`'s model pruned to `shape` (a `PruneShape`)."""
        raise NotImplementedError

    def check_absent(self, prune_config) -> None:
        """Raise `ConfigError` if `prune_config` sets one of its axes although the model has no such layer."""

    def check_prune(self, model_config, prune_config, full) -> None:
        """Raise `ConfigError` if `prune_config`'s values of its axes do not fit `full` (the model's `PruneShape`)."""

    def importance_hooks(self, index: int, mixer: nn.Module, add: Callable[[Any, torch.Tensor], None]) -> dict:
        """Forward pre-hooks (module -> hook(block, module, args, kwargs)) that feed `add(key, activation)` with the
        activations its heads and channels are ranked on; keys are `(kind, index)` with the kinds of
        `importance_views`."""
        raise NotImplementedError

    def importance_views(self, config) -> dict[str, tuple[int, ...]]:
        """kind -> the shape one layer's importance of that kind is viewed as."""
        raise NotImplementedError

    def search_axes(self, config, full, max_pruning: float) -> dict[str, list[int]]:
        """The sizes a `params` search tries on its axes, largest first."""
        raise NotImplementedError

    def select(self, index: int, importance, shape, config, grouping: str) -> dict[str, torch.Tensor]:
        """What layer `index` keeps: `KeptIndices` field -> sorted index tensor."""
        raise NotImplementedError

    def pruned_settings(self, config, shape) -> dict[str, Any]:
        """Its entries of `HybridConfig.mixers` in the model pruned to `shape` (empty: unchanged)."""
        return {}

    def slice_state(self, state: dict, mixer: nn.Module, kept, index: int, full, shape, rescale_norms: bool) -> None:
        """Add the mixer's sliced tensors to the layer's `state` (keys `mixer.*`)."""
        raise NotImplementedError


def register_surgery(*mixer_classes: type) -> Callable[[type[MixerSurgery]], type[MixerSurgery]]:
    """Class decorator: register an instance of the decorated `MixerSurgery` for each of `mixer_classes` (exact
    classes; a subclass needs its own registration).

    Example:
        ```python
        >>> @register_surgery(Mamba2Mixer)
        ... class Mamba2Surgery(MixerSurgery): ...
        ```
    """

    def register(cls: type[MixerSurgery]) -> type[MixerSurgery]:
        handler = cls()
        for mixer_class in mixer_classes:
            _HANDLERS[mixer_class] = handler
        return cls

    return register


def handlers() -> list[MixerSurgery]:
    """Every registered handler once, in registration order."""
    return list(dict.fromkeys(_HANDLERS.values()))


def surgery_for(mixer_type: str, operation: str) -> MixerSurgery:
    """The handler of the `mixer_types` entry `mixer_type` for `operation` (e.g. "prune").

    Raises:
        `UnsupportedModelError`: the mixer is unknown, has no handler, or its handler does not do `operation`.

    Example: `surgery_for("mamba2", "prune").param_count(config, shape)`
    """
    mixer_class = MIXERS.get(mixer_type)
    handler = _HANDLERS.get(mixer_class) if mixer_class is not None else None
    if handler is not None and operation in handler.operations:
        return handler
    if mixer_class is None:
        reason = f"it is not a known mixer (known: {', '.join(sorted(MIXERS))})"
    else:
        supported = sorted(
            name for name, cls in MIXERS.items() if operation in getattr(_HANDLERS.get(cls), "operations", ())
        )
        reason = f"{operation} handles {', '.join(supported)} layers"
    fix = _FIXES.get(operation, f"{operation} a model without it")
    raise UnsupportedModelError(f"{operation} does not support {mixer_type}: {reason}; {fix}")


# Helpers shared by the handlers and the transformations


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores, in their original order."""
    return torch.topk(scores, k, sorted=False).indices.sort().values


def top_per_group(scores: torch.Tensor, num_groups: int, k: int) -> torch.Tensor:
    """The k // num_groups best of each contiguous group of scores (group r is scores[r * size : (r + 1) * size])."""
    grouped = scores.view(num_groups, -1)  # (groups, heads per group)
    kept = torch.topk(grouped, k // num_groups, dim=1, sorted=False).indices.sort(dim=1).values
    return (kept + torch.arange(num_groups)[:, None] * grouped.shape[1]).flatten()


def head_choices(heads: int, groups: int, max_pruning: float) -> list[int]:
    """Head counts from `heads` down by whole groups, removing at most `max_pruning` of them."""
    return [k for k in range(heads, 0, -groups) if k >= heads * (1.0 - max_pruning)] or [heads]


def check_size(name: str, value: int | None, limit: int, multiple: int = 1, why: str = "") -> None:
    """Raise `ConfigError` if an explicit target size is above the model's or not a multiple of `multiple`."""
    if value is None:
        return
    if value > limit:
        raise ConfigError(f"{name}={value} is more than the model's {limit}; pass at most {limit}")
    if value % multiple:
        raise ConfigError(
            f"{name}={value} is not a multiple of {multiple} ({why}); pass one of "
            f"{list(range(multiple, limit + 1, multiple))}"
        )


def rows_cols(tensor: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    """A copy of `tensor` keeping these rows and columns (all where `None`)."""
    out = tensor.index_select(0, rows) if rows is not None else tensor.clone()
    return out.index_select(1, cols) if cols is not None else out


def slice_linear(state: dict, name: str, linear: nn.Linear, rows=None, cols=None) -> None:
    """Add `name.weight` (and `name.bias`) of `linear`, sliced, to `state`."""
    state[f"{name}.weight"] = rows_cols(linear.weight, rows, cols)
    if linear.bias is not None:
        state[f"{name}.bias"] = rows_cols(linear.bias, rows)


__all__ = [
    "MixerSurgery",
    "check_size",
    "handlers",
    "head_choices",
    "register_surgery",
    "rows_cols",
    "slice_linear",
    "surgery_for",
    "top",
    "top_per_group",
]
