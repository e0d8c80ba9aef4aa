"""Atomic file writes: a kill or a full disk never leaves a half-written file behind.

Every writer goes to a temporary file in the target's folder (so the final ``os.replace`` is a
rename on the same file system) and renames it into place only when the content is complete.
Temporary files get the usual permissions (``0o666 & ~umask``), not ``mkstemp``'s 0600.
A full disk or an unwritable folder is one :class:`~filo.errors.WriteError` line naming the
file; the temporary file is removed and an earlier complete ``target`` stays as it was.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed to ``target`` when the block succeeds."""
    from filo.errors import WRITE_ERRNOS, write_error

    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        if err.errno in WRITE_ERRNOS:
            raise write_error(target, err) from None
        raise
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in WRITE_ERRNOS:
            raise write_error(target, err) from None
        raise
    except RuntimeError as err:  # torch.save: "... failed writing file data ..."
        Path(tmp).unlink(missing_ok=True)
        if "writing" in str(err) or "write" in str(err):
            raise write_error(target, OSError(errno.EIO, str(err).splitlines()[0])) from None
        raise
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


def atomic_torch_save(obj: Any, target: str | os.PathLike) -> Path:
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return Path(target)


def atomic_save_npy(target: str | os.PathLike, array) -> Path:
    import numpy as np

    return atomic_write(target, lambda fh: np.save(fh, array))


# ---- where outputs go ------------------------------------------------------------------------

OUTSIDE_DIR = "_outside"  # outputs of images listed outside the dataset root


def safe_relative(img_path: str | os.PathLike) -> Path:
    """A relative output path for a listed image that cannot leave its output folder.

    A dataset-relative path (``bottle/test/crack/000.png``) is kept as it is. An absolute path
    or one with ``..`` components (only accepted when the user allowed images outside the
    dataset root) becomes ``_outside/<16 hex digits of its hash>/<file name>``.
    """
    import hashlib
    from pathlib import PurePosixPath

    text = os.fspath(img_path).replace("\\", "/")
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if not parts or text.startswith("/") or ".." in parts or (len(parts[0]) == 2
                                                              and parts[0][1] == ":"):
        digest = hashlib.sha1(text.encode()).hexdigest()[:16]
        name = PurePosixPath(text).name or "image"
        return Path(OUTSIDE_DIR, digest, name if name != ".." else "image")
    return Path(*parts)


def ensure_inside(base: str | os.PathLike, target: str | os.PathLike) -> Path:
    """``target`` if it stays inside ``base`` once symbolic links are followed, else a
    :class:`~filo.errors.FiloError` (an output never lands outside its folder)."""
    from filo.errors import FiloError

    base_real = Path(base).resolve()
    real = Path(target).resolve()
    if real != base_real and base_real not in real.parents:
        raise FiloError(f"refusing to write {target}: it resolves to {real}, outside the output "
                        f"folder {base_real} (a symbolic link inside it points elsewhere); "
                        f"remove the link or choose another output folder")
    return Path(target)


def name_problem(name: str) -> str | None:
    """Why ``name`` (a class name from a data file) cannot be one folder name inside an output
    folder, or None: empty, ``.`` / ``..``, a path separator, a NUL or a control character."""
    text = str(name)
    if not text.strip():
        return "is empty"
    if text in (".", ".."):
        return "is '.' or '..'"
    if "/" in text or "\\" in text:
        return "contains a path separator"
    if any(ord(ch) < 32 for ch in text):
        return "contains a control character"
    return None


def check_name(name: str, where: str) -> str:
    """``name`` if it is a safe single folder name (:func:`name_problem`), else one
    :class:`~filo.errors.FiloError` line naming ``where`` it comes from."""
    from filo.errors import FiloError

    problem = name_problem(name)
    if problem:
        raise FiloError(f"{where}: class name {name!r} {problem}; it would be used as a folder "
                        f"name in the outputs; rename the class (letters, digits, _ and -)")
    return str(name)


def refuse_symlinked_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` if it is not itself a symbolic link (an output folder is written as given, never
    through a link that can be pointed elsewhere); one FiloError line naming the flag otherwise."""
    from filo.errors import FiloError

    p = Path(path)
    if p.is_symlink():
        raise FiloError(f"{flag} {p} is a symbolic link (to {os.path.realpath(p)}); outputs are "
                        f"not written through links: pass the real folder "
                        f"{os.path.realpath(p)} instead")
    return p


def output_file(base: str | os.PathLike, img_path: str | os.PathLike, suffix: str,
                *, replace_suffix: bool = True) -> Path:
    """The output file of a listed image under ``base``: its safe relative path with ``suffix``
    (replacing the image's extension, or appended to the name), checked to stay inside."""
    rel = safe_relative(img_path)
    name = rel.stem + suffix if replace_suffix else rel.name + suffix
    return ensure_inside(base, Path(base) / rel.parent / name)


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` if needed and make sure a file can be written in it (before any model is
    loaded): one :class:`~filo.errors.FiloError` line naming the flag otherwise."""
    from filo.errors import FiloError

    p = refuse_symlinked_dir(path, flag)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".filo-write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise FiloError(f"{flag} {p} is not a writable folder ({err.strerror or err}); choose "
                        f"another folder or fix its permissions") from None
    return p
