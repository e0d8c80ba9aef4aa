"""User-facing errors.

Every problem a user can fix (a missing file, a corrupt image, a wrong checkpoint, a malformed
prompt file) is raised as :class:`FiloError` with a single line that names the file and the fix.
Command-line entry points catch it, print ``error: <message>`` to stderr and exit non-zero, so a
user never sees a stack trace for bad input.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., int | None])


class FiloError(Exception):
    """An error the user can fix; ``str(err)`` is one line naming the file and the fix."""


class WriteError(FiloError):
    """A file could not be written (full disk, read-only or unwritable folder)."""


# errno values that mean "this file cannot be written here" (not a bug)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EFBIG, errno.EIO})


def write_error(target, err: OSError) -> WriteError:
    """The one line for ``err`` raised while writing ``target``: what happened and the fix."""
    what = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = ("free space on that disk (or choose another output folder) and run the same "
               "command again: finished work is kept, nothing half-written is left")
    else:
        fix = "make the folder writable or choose another output folder"
    return WriteError(f"cannot write {target}: {what}; {fix}")


_PREFIX = "filo.errors.FiloError: "


def one_line(err: FiloError) -> str:
    """The user's line of ``err``. A FiloError raised in a DataLoader worker process comes back
    wrapped ("Caught FiloError in DataLoader worker process 0." + the worker's traceback); its
    own message is the traceback's last line."""
    text = str(err).strip()
    if "\n" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    return last[len(_PREFIX):] if last.startswith(_PREFIX) else last


def cli_entry(func: F) -> F:
    """Decorate a CLI ``main`` so a :class:`FiloError` becomes one stderr line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FiloError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except OSError as err:  # a write outside fileio's atomic writers (a log line, ...)
            if err.errno not in WRITE_ERRNOS:
                raise
            print(f"error: {write_error(err.filename or 'a file', err)}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("interrupted: finished work is kept; run the same command again to resume",
                  file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
