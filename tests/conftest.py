"""Shared fixtures over the tiny models of `tiny.py`."""

import pytest
import torch
from tiny import FAMILIES, make_tiny


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(params=sorted(FAMILIES))
def tiny_source(request):
    return make_tiny(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
