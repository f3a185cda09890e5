"""Which layers become the new mixer. `uniform` is MambaInLlama's spread (arXiv 2408.15237 §1.3 of our notes):
k converted layers out of N sit at floor(j·N/k), j = 0..k-1, which for N = 32 gives exactly the published sets
(50%: even layers; 75%: all but 3, 7, ..., 31; 87.5%: all but 7, 15, 23, 31). Explicit `attn_layers` overrides it."""

from ..errors import ConfigError


def uniform_layers(num_layers: int, ratio: float) -> list[int]:
    """Indices of the `round(ratio · num_layers)` layers to convert, spread evenly, starting at layer 0."""
    k = int(ratio * num_layers + 0.5)
    return sorted({(j * num_layers) // k for j in range(k)})


def select_layers(num_layers: int, *, ratio: float, attn_layers: tuple[int, ...] | None) -> list[int]:
    """Layers to convert: all but `attn_layers` when given, else `uniform_layers(num_layers, ratio)`."""
    if attn_layers is None:
        return uniform_layers(num_layers, ratio)
    bad = [i for i in attn_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"attn_layers {bad} out of range: the model has layers 0..{num_layers - 1}")
    return [i for i in range(num_layers) if i not in set(attn_layers)]


__all__ = ["select_layers", "uniform_layers"]
