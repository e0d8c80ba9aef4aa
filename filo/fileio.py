"""Atomic file writes: a kill or a full disk never leaves a half-written file behind.

Every writer goes to a temporary file in the target's folder (so the final ``os.replace`` is a
rename on the same file system) and renames it into place only when the content is complete.
Temporary files get the usual permissions (``0o666 & ~umask``), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed to ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(target: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(binary file handle)`` and move the result to ``target`` atomically."""
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        write(fh)
    return Path(target)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(target, lambda fh: fh.write(data))


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, **dump_kwargs) + "\n")


def atomic_torch_save(obj: Any, target: str | os.PathLike) -> Path:
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return Path(target)


def atomic_save_npy(target: str | os.PathLike, array) -> Path:
    import numpy as np

    return atomic_write(target, lambda fh: np.save(fh, array))
