"""Writing files so that a crash never leaves a half-written one in their place."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Calls ``write(tmp)`` to write a temporary file beside ``path``, then renames it
    onto ``path``.

    The temporary file is fsynced before ``os.replace`` and the folder after it, where
    the platform allows: a file system that cannot fsync a file (``EINVAL``, ``ENOTSUP``)
    skips it, while a failed one (``EIO``, ``ENOSPC``: the data may not be on disk) is an
    error. The folder's fsync is best effort (some file systems cannot open or fsync a
    folder): any error there is ignored, the file being in place. On any other error
    (or interrupt) the temporary file is removed and whatever was at ``path`` is left as
    it was. The temporary name is unique (two writers of one path never share it) and
    hidden, and it holds no part of ``path``'s name, so tools that watch a folder by
    file name (TensorBoard) skip it.
    """
    _replace_with(path, write, synced=False)


TEMPORARY_PATTERN = ".fnloop-*.tmp"


def remove_temporaries(folder: Path) -> None:
    """Removes the temporary files of writes to ``folder`` that a killed process left
    (``kill -9`` gives ``atomic_write`` no chance to clean up). Call it only where no
    write to ``folder`` is under way."""
    for tmp in folder.glob(TEMPORARY_PATTERN):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _replace_with(path: Path, write: Callable[[Path], Any], *, synced: bool) -> None:
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / TEMPORARY_PATTERN.replace("*", uuid.uuid4().hex[:12])
    try:
        write(tmp)
        if not synced:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def atomic_write_file(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """:func:`atomic_write` for a ``write`` that takes a binary file object.

    A write that fails (a full disk) raises an ``OSError`` that names ``path``: inside
    ``torch.save``, which raises its own ``RuntimeError`` with the ``OSError`` as its
    context, one of the same ``errno``, chained from torch's error; at the flush, fsync
    or close, the ``OSError`` with the file's name added.
    """

    def to_file(tmp: Path) -> None:
        try:
            with open(tmp, "xb") as f:
                write(f)
                f.flush()
                _fsync(f.fileno())
        except RuntimeError as e:
            # torch.save's "unexpected pos ...", raised while handling the file's OSError
            # (which names no file; another file's error, as matplotlib's, goes as it is).
            cause = e.__context__
            if (
                e.__cause__ is not None
                or not isinstance(cause, OSError)
                or cause.errno is None
                or cause.filename is not None
            ):
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        except OSError as e:
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, str(path)) from e

    _replace_with(path, to_file, synced=True)


# What a file system says when it cannot fsync a file at all (not when it failed to).
_NO_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _fsync(fd: int) -> None:
    """Flushes a written file to disk; a no-op where the file system cannot fsync one."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_FSYNC:
            raise


def _fsync_file(path: Path) -> None:
    """:func:`_fsync` through a read-only descriptor (a umask may have made the file
    read-only for its writer)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable, best effort: a no-op where folders cannot be
    opened, and any error of the fsync is ignored (some file systems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
