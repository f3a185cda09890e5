"""Identities for caches and resumes. A model's weights: every parameter's name, shape and dtype, and a strided sample
of its values (hashing all the bytes of a large model would take longer than some of the work the cache saves), so two
models that differ anywhere but in a handful of unsampled values get different keys. Token blocks: all their bytes."""

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


def blocks_fingerprint(blocks: torch.Tensor) -> str:
    """A hex SHA-256 of token blocks (their ids, in order)."""
    return hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest()


__all__ = ["blocks_fingerprint", "weights_fingerprint"]
