"""A cheap identity of a model's weights, for caches keyed by "the same model": every parameter's name, shape and
dtype, and a strided sample of its values (hashing all the bytes of a large model would take longer than some of the
work the cache saves). Two models that differ anywhere but in a handful of unsampled values get different keys."""

import hashlib

import torch
from torch import nn

_SAMPLES = 4096  # values read per parameter


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """A hex SHA-256 over every parameter's name, shape, dtype and `_SAMPLES` values spread evenly across it."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        digest.update(flat[::step][:_SAMPLES].float().cpu().numpy().tobytes())
    return digest.hexdigest()


__all__ = ["weights_fingerprint"]
