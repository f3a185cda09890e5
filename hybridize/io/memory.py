"""Handing freed memory back to the system, for steps that measure or bound their resident memory.

glibc keeps freed heap pages resident and reuses them without the resident set growing: a benchmark would not see an
allocation that reuses them, and a conversion that frees a layer's worth of tensors per layer would keep fragments of
every layer. `malloc_trim(0)` returns them.
"""

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Collect garbage, then give the heap pages freed so far back to the system. A no-op without glibc."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


__all__ = ["return_freed_memory"]
