"""Handing freed memory back to the system (glibc), so a burst does not leave the process big.

A burst of concurrent uploads is decoded on many threads; glibc gives each thread its own malloc
arena and keeps freed pages in them. :func:`limit_arenas` caps the arenas (like
``MALLOC_ARENA_MAX``) before the server starts, and :func:`trim` (``malloc_trim(0)``) returns
the free pages of every arena; the batcher calls it once the queue has been idle for a second.
Both live in :mod:`filo.heap` beside the batch jobs' opposite setting.
"""

from filo.heap import limit_arenas, trim

__all__ = ["limit_arenas", "trim"]
