"""How glibc's malloc hands memory to batch work, and back to the system.

glibc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
unmaps it when freed. A CNN batch at camera resolution allocates activations of hundreds of MB
per layer, so every forward pass maps them again and the kernel zero-fills each page on first
touch: with WideResNet-50-2 at 512 px, batch 8, 40 % of the run was system time and a batch of
8 took 2.2x longer per image than one image (docs/design.md §13.4).
:func:`keep_freed_pages` keeps freed blocks in the heap while batch work runs (no mmap, no
trimming), so the next batch reuses the pages already touched; on exit it restores glibc's
defaults and returns the free pages (``malloc_trim``).

The service does the opposite (:func:`limit_arenas`, :func:`trim`): few arenas, big blocks in
their own mappings, pages returned when idle, so a burst of uploads does not leave it big.

Everything here does nothing on a C library without these calls (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

# glibc's mallopt parameters and defaults (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
NEVER_TRIM = (1 << 31) - 1  # mallopt takes an int

# how many keep_freed_pages blocks are open: mallopt's settings belong to the whole process
_open_blocks = 0


@lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """The C library when it has ``mallopt`` and ``malloc_trim`` (glibc), else None."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None


def _mallopt(param: int, value: int) -> bool:
    lib = glibc()
    return bool(lib and lib.mallopt(param, int(value)) == 1)


@contextmanager
def keep_freed_pages() -> Iterator[bool]:
    """Within the block, freed memory stays in the heap for the next allocation of the same
    size (no mmap per big block, no trimming); yields whether that was applied. Nested blocks
    keep the outermost one's setting until it exits."""
    global _open_blocks
    outer = _open_blocks == 0
    applied = (_mallopt(M_MMAP_MAX, 0) and _mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)) if outer \
        else glibc() is not None
    _open_blocks += 1
    try:
        yield applied
    finally:
        _open_blocks -= 1
        if outer and applied:
            _mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            _mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            trim_heap()


def trim_heap() -> bool:
    """Return free heap pages of every arena to the system; True when some were released."""
    lib = glibc()
    return bool(lib and lib.malloc_trim(0))


def limit_arenas(n: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """At most ``n`` malloc arenas for threads created from now on, and blocks of
    ``mmap_threshold`` bytes or more (uploads, decoded images) in their own mappings, which go
    back to the system when freed (glibc otherwise raises this threshold after the first big
    free and keeps such blocks in the heap); True when applied."""
    return _mallopt(M_ARENA_MAX, n) and _mallopt(M_MMAP_THRESHOLD, mmap_threshold)


def trim() -> bool:
    """Collect reference cycles, then return free heap pages to the system; True when some
    memory was released."""
    import gc

    gc.collect()
    return trim_heap()


def batch_work(func):
    """Decorate a function that runs batches of images: it runs inside
    :func:`keep_freed_pages`."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with keep_freed_pages():
            return func(*args, **kwargs)

    return wrapper
