"""Fixtures of the low-rank and fusion tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny matrices here decompose faster on one thread: on a loaded machine LAPACK's second thread makes a
    64 x 128 SVD take half a second instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
