"""Handing freed memory back to the system (glibc), so a burst does not leave the process big.

A burst of concurrent uploads is decoded on many threads; glibc gives each thread its own malloc
arena and keeps freed pages in them. :func:`limit_arenas` caps the arenas (like
``MALLOC_ARENA_MAX``) before the server starts, and :func:`trim` (``malloc_trim(0)``) returns
the free pages of every arena; the batcher calls it once the queue has been idle for a second.
Both do nothing on a C library without these calls (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


def limit_arenas(n: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """At most ``n`` malloc arenas for threads created from now on, and blocks of
    ``mmap_threshold`` bytes or more (uploads, decoded images) in their own mappings, which go
    back to the system when freed (glibc otherwise raises this threshold after the first big
    free and keeps such blocks in the heap); True when applied."""
    lib = _glibc()
    return bool(lib and lib.mallopt(M_ARENA_MAX, int(n)) == 1
                and lib.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1)


def trim() -> bool:
    """Collect reference cycles, then return free heap pages to the system; True when some
    memory was released."""
    import gc

    gc.collect()
    lib = _glibc()
    return bool(lib and lib.malloc_trim(0))
