"""Which layers become the new mixer. `uniform` is MambaInLlama's spread (arXiv 2408.15237 §1.3 of our notes):
k converted layers out of N sit at floor(j·N/k), j = 0..k-1, which for N = 32 gives exactly the published sets
(50%: even layers; 75%: all but 3, 7, ..., 31; 87.5%: all but 7, 15, 23, 31). `lazy` takes the k layers most often
among the laziest on calibration documents (LightTransfer-Train, arXiv 2410.13846; see `lazy.py`), `sensitivity` the k
layers whose conversion alone costs the least KL (`sensitivity.py`), `random` any k
layers (seeded), for comparison. Explicit `attn_layers` overrides all of them. (`dynamic`, which chooses per
request at prefill, is not a fixed set: `convert` makes every layer a dynamic streaming layer.)"""

import random

import torch

from ..errors import ConfigError
from .lazy import laziest_layers
from .sensitivity import least_sensitive_layers


def num_converted(num_layers: int, ratio: float) -> int:
    """How many layers a ratio converts: `round(ratio · num_layers)`, halves rounded up."""
    return int(ratio * num_layers + 0.5)


def uniform_layers(num_layers: int, ratio: float) -> list[int]:
    """Indices of the `round(ratio · num_layers)` layers to convert, spread evenly, starting at layer 0."""
    k = num_converted(num_layers, ratio)
    return sorted({(j * num_layers) // k for j in range(k)})


def random_layers(num_layers: int, ratio: float, seed: int) -> list[int]:
    """`round(ratio · num_layers)` layers drawn uniformly without replacement; the same seed draws the same set."""
    return sorted(random.Random(seed).sample(range(num_layers), num_converted(num_layers, ratio)))


def select_layers(
    num_layers: int,
    *,
    ratio: float,
    attn_layers: tuple[int, ...] | None,
    select: str = "uniform",
    seed: int = 0,
    lazy_ratios: torch.Tensor | None = None,
    sensitivity: list[float] | None = None,
) -> list[int]:
    """Layers to convert: all but `attn_layers` when given, else `round(ratio · num_layers)` layers chosen by
    `select`: `"uniform"`, `"random"` (with `seed`) or `"lazy"` (needs `lazy_ratios`, `(num_docs, num_layers)` from
    `measure_lazy_ratios`) or `"sensitivity"` (needs `sensitivity`, one KL per layer from `layer_sensitivity`)."""
    if attn_layers is not None:
        bad = [i for i in attn_layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"attn_layers {bad} out of range: the model has layers 0..{num_layers - 1}")
        return [i for i in range(num_layers) if i not in set(attn_layers)]
    if select == "uniform":
        return uniform_layers(num_layers, ratio)
    if select == "random":
        return random_layers(num_layers, ratio, seed)
    if select == "lazy":
        if lazy_ratios is None:
            raise ConfigError("select='lazy' needs the layers' lazy ratios; measure them with measure_lazy_ratios")
        return laziest_layers(lazy_ratios, num_converted(num_layers, ratio))
    if select == "sensitivity":
        if sensitivity is None:
            raise ConfigError("select='sensitivity' needs the layers' scores; measure them with layer_sensitivity")
        return least_sensitive_layers(sensitivity, num_converted(num_layers, ratio))
    raise ConfigError(f"select {select!r} is not a fixed layer set; choose uniform, random, lazy or sensitivity")


__all__ = ["num_converted", "random_layers", "select_layers", "uniform_layers"]
