"""The contract every token mixer and every cache layer that rolls back meets, declared once.

`Mixer` is the base class of the entries of `MIXERS` (`mixers.py`): a layer's token mixer, built from the hybrid's
config and its layer index, with the settings class it reads, the mask it needs, the cache layer it keeps and its own
initial values. `RollbackCacheLayer` is what speculative decoding (`hybridize.generate`) needs of a cache layer that
cannot simply be cropped: keep the state at the last verified token, then keep only the accepted tokens.

Like every file here, this one imports only torch and its siblings: it travels with each saved checkpoint.
"""

import abc
from typing import ClassVar, Literal

from torch import nn

from .configuration import HybridConfig

MASK_TYPES = ("causal", "padding")


class Mixer(nn.Module):
    """A token mixer: what runs in place of attention in one layer of a hybrid.

    A subclass declares, as class attributes:
        settings_class (`type`): its frozen settings dataclass, with `from_hybrid_config(config)` reading
            `config.mixers[name]`, and an `impl` field (`"auto"` the fast path, `"ref"` the reference).
        mask_type (`str`): `"causal"` for transformers' 4-D causal (and padding) mask, `"padding"` for the 2-D padding
            mask only (a mixer that builds its own visibility from token positions).
        readout (`str`, *optional*): the name of the output projection that a calibrated conversion refits; `None`
            (the default) when there is none to refit.

    and implements:
        `__init__(config, layer_idx)`; `forward(hidden_states, *, position_embeddings=None, attention_mask=None,
        cache=None, **kwargs)`, which returns (b, l, hidden); `new_cache_layer(config, layer_idx)`, a static method that
        returns the layer's cache layer; and, when its parameters need initial values other than transformers' defaults
        for linears, convolutions and norms, `init_weights()`.

    A subclass that lacks one of the class attributes or `new_cache_layer` fails when it is defined, with a
    `TypeError` naming what is missing.
    """

    settings_class: ClassVar[type]
    mask_type: ClassVar[Literal["causal", "padding"]]
    readout: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in ("settings_class", "mask_type") if not hasattr(cls, name)]
        if cls.new_cache_layer is Mixer.new_cache_layer:
            missing.append("new_cache_layer")
        if missing:
            raise TypeError(f"mixer {cls.__name__} does not define {', '.join(missing)} (see `Mixer`)")
        if cls.mask_type not in MASK_TYPES:
            raise TypeError(f"mixer {cls.__name__} has mask_type {cls.mask_type!r}; expected one of {MASK_TYPES}")

    @staticmethod
    def new_cache_layer(config: HybridConfig, layer_idx: int):
        """The cache layer of layer `layer_idx`: reuse a transformers class that holds exactly the needed state, or
        subclass the nearest one in the mixer's file."""
        raise NotImplementedError

    def init_weights(self) -> None:
        """Set the mixer's own parameters to their initial values (transformers' `_init_weights` has set the linears,
        convolutions and norms first). Conversion overwrites them; a model built from a config keeps them. Does
        nothing by default."""


class RollbackCacheLayer(abc.ABC):
    """A cache layer that rolls itself back for speculative decoding, where it cannot be cropped (an SSM state, or a
    window that evicts or absorbs old tokens). Mixed into the cache layer's class beside its transformers base:
    `class Mamba2CacheLayer(LinearAttentionLayer, RollbackCacheLayer)`.

    A round calls `begin_verify()`, runs the draft tokens through the model, then `commit(n)` with the number of them
    accepted; between the two the layer may record what it needs to give the state after any of them.
    """

    @abc.abstractmethod
    def begin_verify(self) -> None:
        """Mark the current state; tokens run from now on can be undone by `commit`."""

    @abc.abstractmethod
    def commit(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens run since `begin_verify` and forget the others."""

    @property
    @abc.abstractmethod
    def max_rollback(self) -> float:
        """How many tokens one `begin_verify` ... `commit` span may hold (`float("inf")`: any number)."""


__all__ = ["MASK_TYPES", "Mixer", "RollbackCacheLayer"]
