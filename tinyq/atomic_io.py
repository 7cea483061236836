"""Whole-or-nothing file writes: normal permissions, data on disk before the rename, atomic swaps.

A file or directory is written under a temporary name next to its destination, fsynced, then renamed
into place; replacing an existing directory swaps the two atomically (Linux ``renameat2`` with
``RENAME_EXCHANGE``, macOS ``renamex_np`` with ``RENAME_SWAP``), so at every instant the destination
holds the old checkpoint or the new one, never nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import tempfile
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h


def normal_file_mode(directory: bool = False) -> int:
    """0666 (0777 for a directory) minus the umask: what ``open()``/``mkdir`` would give, unlike
    ``tempfile``'s private 0600/0700."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_path(path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_tree(folder) -> None:
    """Give every file and directory under ``folder`` normal permissions (safetensors and ``tempfile``
    create private ones) and fsync it, each directory after its files."""
    file_mode, dir_mode = normal_file_mode(), normal_file_mode(directory=True)
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
            fsync_path(os.path.join(root, name))
        os.chmod(root, dir_mode)
        fsync_path(root)


def exchange(a, b) -> None:
    """Swap the directory entries ``a`` and ``b`` in one atomic step. Raises ``OSError`` (ENOSYS,
    EINVAL) where the system or file system cannot."""
    src, dst = os.fsencode(Path(a)), os.fsencode(Path(b))
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(src, dst, _RENAME_SWAP)
    elif hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_EXCHANGE)
    else:
        raise OSError(errno.ENOSYS, "no atomic rename-exchange on this system", str(a))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def replacing(path):
    """``with replacing(path) as tmp:`` write the file at ``tmp`` (next to ``path``); on success it is
    fsynced and renamed over ``path``, on any failure removed (the old file stays as it was)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, normal_file_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_file(path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`replacing`)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
