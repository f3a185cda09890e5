"""The surgery registry: `MixerSurgery`, `register_surgery`, `surgery_for`, and the slicing helpers the handlers and
the compress transformations share. See the package docstring.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..modeling.mixers import MIXERS

_HANDLERS: dict[type, "MixerSurgery"] = {}
# mixer class -> the operations its handler does for it, where fewer than the handler's `operations`
_OPERATIONS: dict[type, tuple[str, ...]] = {}
# mixer class -> operation -> why it is refused, where the mixer shares its handler with others (`register_surgery`)
_REASONS: dict[type, dict[str, str]] = {}

# the operations that ask for a handler (`surgery_for`), and what to do with a model they refuse
_FIXES = {
    "prune": "prune a model without it",
    "fuse": "fuse models without it",
    "factorize": "factorize a model without it",
    "export": "keep the hybrid format",
    "export_gguf": "keep the PyTorch format",
}


class MixerSurgery:
    """What the compress transformations and the exports ask of one mixer type. Subclasses fill in the operations
    they support; `operations` names them, among "prune", "fuse", "factorize", "export" (the native transformers
    class, `hybridize.export`) and "export_gguf" (llama.cpp, `hybridize.llamacpp`), and `reasons` says why the others
    are refused where there is more to say than that they are not written.

    The prune interface (`hybridize.compress.prune`) works on the prunable shape `PruneShape`, the `Importance` of one
    calibration pass and the `KeptIndices` a selection returns; a handler reads and writes its own fields of them
    (`prune_axes`, its accumulator keys, its `KeptIndices` fields).

    The fuse interface (`hybridize.compress.fuse`) sees a layer's units as heads in groups of heads that share weights
    (attention's query heads in their KV groups): transport plans act on whole groups and on whole heads.

    The export interface maps its layers onto transformers' GraniteMoeHybrid (`hybridize.export`) and llama.cpp
    (`hybridize.llamacpp`): layer type, config fields and hyperparameters, tensor names and layouts.
    """

    operations: ClassVar[tuple[str, ...]] = ()
    reasons: ClassVar[dict[str, str]] = {}  # operation -> why this mixer is refused it
    prune_axes: ClassVar[tuple[str, ...]] = ()  # the `PruneShape` (and `PruneConfig`) fields it owns
    grouping: ClassVar[str | None] = None  # the `PruneConfig` field that chooses its grouping ("aware"/"ignore")
    factorize_targets: ClassVar[tuple[str, ...]] = ()  # the `FactorizeConfig.targets` (`TARGETS`) its linears are in
    native_layer_types: ClassVar[tuple[str, ...]] = ()  # its GraniteMoeHybrid `layer_types` names, the written first
    gguf_arch: ClassVar[str | None] = None  # the llama.cpp architecture its layers need (None: any that has attention)
    gguf_f32: ClassVar[tuple[str, ...]] = ()  # its `gguf_tensors` keys that llama.cpp reads as f32 at any outtype

    # Prune

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

    # Fuse

    def fuse_layout(self, config) -> dict[str, Any]:
        """Its settings in `config` that every fused model must share with the anchor (empty: none beyond the
        config fields `check_fuse` compares for every model)."""
        return {}

    def head_layout(self, mixer: nn.Module) -> tuple[int, int, int]:
        """`(groups, heads, head size)` of one of its layers."""
        raise NotImplementedError

    def head_output(self, mixer: nn.Module) -> nn.Module:
        """The module whose input holds the layer's per-head outputs, (..., heads x head size)."""
        raise NotImplementedError

    def fused_heads(self, config) -> int:
        """Heads of each of its layers in the (fused) `config`."""
        raise NotImplementedError

    def fused_fields(self, config, heads_width: float) -> dict[str, Any]:
        """The `HybridConfig` fields of the fused model that it sets, with `heads_width` of its heads kept in every
        group (1: all)."""
        return {}

    def fused_settings(self, config, heads_width: float) -> dict[str, Any]:
        """Its entries of `HybridConfig.mixers` in the fused model, as `fused_fields` (empty: unchanged)."""
        return {}

    def transport(self, mixer: nn.Module, groups, heads, res_in, res_out) -> dict[str, torch.Tensor]:
        """The mixer's tensors (keys relative to it: `q_proj.weight`) in the target's units: producers of a head or a
        group by `producer_map` of the plan `heads` or `groups` ((m, m') or None for the identity), consumers by
        `consumer_map`; input columns of the residual stream by `res_out`, output rows by `res_in` (producer and
        consumer maps of the residual plan)."""
        raise NotImplementedError

    def unit_vectors(self, state: dict, prefix: str, mixer: nn.Module) -> dict[str, torch.Tensor]:
        """`heads` and `groups`: one weight vector per head and per group (the group's own weights), read from
        `state` (a state dict in the target's residual basis; the mixer's keys start with `prefix`)."""
        raise NotImplementedError

    # Export: GraniteMoeHybrid (`hybridize.export`) and llama.cpp (`hybridize.llamacpp`)

    def check_native(self, config) -> None:
        """Raise `UnsupportedModelError` if its layers in `config` have no exact GraniteMoeHybrid form."""

    def native_config(self, config) -> dict[str, Any]:
        """Its `GraniteMoeHybridConfig` fields. Asked of every handler that exports, whether or not the model has its
        layers: the config validates every field."""
        return {}

    def native_tensors(self, mixer: nn.Module) -> dict[str, torch.Tensor]:
        """The mixer's tensors under their GraniteMoeHybrid names, relative to the decoder layer
        (`self_attn.q_proj.weight`)."""
        raise NotImplementedError

    def check_gguf(self, config) -> None:
        """Raise `UnsupportedModelError` if its layers in `config` have no exact llama.cpp form."""

    def gguf_hparams(self, config) -> dict[str, Any]:
        """Its GGUF hyperparameters (a `gguf.GGUFWriter` method name -> value)."""
        return {}

    def gguf_head_count_kv(self, config) -> int:
        """Its layers' entry in llama.cpp's per-layer KV head count (0 marks a recurrent layer)."""
        raise NotImplementedError

    def gguf_tensors(self, mixer: nn.Module, config) -> dict[str, Callable[[], np.ndarray]]:
        """The mixer's tensors in llama.cpp's layout, each made on demand as a float32 array, keyed by the
        `gguf.MODEL_TENSOR` member and the suffix (`ATTN_Q.weight`, `SSM_DT.bias`, `SSM_A`). `hybridize.llamacpp`
        turns the keys into tensor names: the handlers do not import `gguf`."""
        raise NotImplementedError


def register_surgery(
    *mixer_classes: type, operations: tuple[str, ...] | None = None, reasons: dict[str, str] | None = None
) -> Callable[[type[MixerSurgery]], type[MixerSurgery]]:
    """Class decorator: register the decorated `MixerSurgery` for each of `mixer_classes` (exact classes; a subclass
    needs its own registration). Stacked, the registrations share one instance.

    Args:
        mixer_classes (`type`): the mixer module classes it handles.
        operations (`tuple[str, ...]`, *optional*): for these classes, only these of the handler's operations.
        reasons (`dict[str, str]`, *optional*): for these classes, operation -> why it is refused.

    Example:
        ```python
        >>> @register_surgery(Mamba2Mixer)
        ... class Mamba2Surgery(MixerSurgery): ...
        ```
    """

    def register(cls: type[MixerSurgery]) -> type[MixerSurgery]:
        handler = next((h for h in _HANDLERS.values() if type(h) is cls), None) or cls()
        for mixer_class in mixer_classes:
            _HANDLERS[mixer_class] = handler
            _OPERATIONS.pop(mixer_class, None)
            _REASONS.pop(mixer_class, None)
            if operations is not None:
                _OPERATIONS[mixer_class] = tuple(operations)
            if reasons:
                _REASONS[mixer_class] = dict(reasons)
        return cls

    return register


def unregister_surgery(*mixer_classes: type) -> None:
    """Remove the handlers of `mixer_classes` (`hybridize.unregister_mixer` calls it for a mixer it removes)."""
    for mixer_class in mixer_classes:
        _HANDLERS.pop(mixer_class, None)
        _OPERATIONS.pop(mixer_class, None)
        _REASONS.pop(mixer_class, None)


def mixer_types(config) -> list[str]:
    """A hybrid config's `mixer_types`; every layer `"attention"` for a dense (Llama-family) config."""
    return list(getattr(config, "mixer_types", None) or ["attention"] * config.num_hidden_layers)


def handlers_for(types: Iterable[str], operation: str) -> dict[str, MixerSurgery]:
    """The handler of each distinct mixer type in `types` for `operation`, in the order given (looked up once per
    type); `surgery_for`'s refusal for the first one without a handler."""
    return {t: surgery_for(t, operation) for t in dict.fromkeys(types)}


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
    if handler is not None and operation in _operations(mixer_class):
        return handler
    reasons = {**getattr(handler, "reasons", {}), **_REASONS.get(mixer_class, {})}
    if mixer_class is None:
        reason = f"it is not a known mixer (known: {', '.join(sorted(MIXERS))})"
    elif operation in reasons:
        reason = reasons[operation]
    else:
        supported = sorted(name for name, cls in MIXERS.items() if operation in _operations(cls))
        reason = f"{operation} handles {', '.join(supported)} layers"
    fix = _FIXES.get(operation, f"{operation} a model without it")
    raise UnsupportedModelError(f"{operation} does not support {mixer_type}: {reason}; {fix}")


def _operations(mixer_class: type) -> tuple[str, ...]:
    """The operations the handler of `mixer_class` does for it (none without a handler)."""
    handler = _HANDLERS.get(mixer_class)
    if handler is None:
        return ()
    return tuple(op for op in handler.operations if op in _OPERATIONS.get(mixer_class, handler.operations))


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


def identity_plan(plan: torch.Tensor | None, size: int) -> torch.Tensor:
    """`plan`, or the identity plan (uniform marginals) of `size` units where it is `None`."""
    return torch.eye(size, dtype=torch.float64) / size if plan is None else plan


def producer_map(plan: torch.Tensor) -> torch.Tensor:
    """(m', m): each target unit is the barycentre of the units sent to it."""
    return (plan / plan.sum(0, keepdim=True).clamp_min(1e-30)).T


def consumer_map(plan: torch.Tensor) -> torch.Tensor:
    """(m', m): each source unit's outgoing weight is split over the targets it is sent to, and summed there."""
    return (plan / plan.sum(1, keepdim=True).clamp_min(1e-30)).T


def map_rows(tensor: torch.Tensor, matrix: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Map dim 0 of `tensor` (m·unit, ...) by `matrix` (m', m), unit by unit -> (m'·unit, ...)."""
    grouped = tensor.reshape(matrix.shape[1], unit, -1)  # (m, unit, rest)
    mapped = torch.einsum("ji,iur->jur", matrix.to(tensor.dtype), grouped)
    return mapped.reshape(matrix.shape[0] * unit, *tensor.shape[1:])


def map_cols(tensor: torch.Tensor, matrix: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Map dim 1 of `tensor` as `map_rows` maps dim 0."""
    return map_rows(tensor.transpose(0, 1), matrix, unit).transpose(0, 1)


def map_segments(tensor: torch.Tensor, parts: Sequence[tuple[int, torch.Tensor | None, int]]) -> torch.Tensor:
    """Map dim 0 segment by segment: `parts` is (rows, matrix or None for unchanged, unit) in order."""
    pieces, start = [], 0
    for rows, matrix, unit in parts:
        piece = tensor[start : start + rows]
        pieces.append(piece if matrix is None else map_rows(piece, matrix, unit))
        start += rows
    return torch.cat(pieces)


def to_array(tensor: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of `tensor`, as a GGUF file is written from."""
    return tensor.detach().to(torch.float32).contiguous().numpy()


__all__ = [
    "MixerSurgery",
    "check_size",
    "consumer_map",
    "handlers",
    "handlers_for",
    "head_choices",
    "identity_plan",
    "map_cols",
    "map_rows",
    "map_segments",
    "mixer_types",
    "producer_map",
    "register_surgery",
    "rows_cols",
    "slice_linear",
    "surgery_for",
    "to_array",
    "top",
    "top_per_group",
    "unregister_surgery",
]
