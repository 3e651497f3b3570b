"""Files that are either the old version or the new one on disk, never a damaged mix.

Every file a run writes goes through here: the new content is written to a
temporary file in the same folder, fsync'ed, renamed over the old name (an
atomic replace on POSIX file systems), and the folder is fsync'ed so that the
rename itself survives a crash. A reader that opened the old file keeps
reading the old inode, so readers never see a half-written file either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator


def fsync_dir(path: str) -> None:
    """Make renames and unlinks in folder ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str, copy: bool = False) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    ``copy``: start from a copy of the current file (to append to it). On an
    exception the temporary file is removed and ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if copy:
            shutil.copyfile(path, tmp)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def remove_stale(path: str) -> None:
    """Remove temporary files a killed writer of ``path`` left behind."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def write_text(path: str, text: str) -> None:
    """Write a whole text file atomically."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_with(path: str, writer: Callable[[str], object]) -> str:
    """Let ``writer(tmp_path)`` produce the file (e.g. a plot's savefig); replace atomically."""
    with replacing(path) as tmp:
        writer(tmp)
    return path


def backup_name(path: str) -> str:
    """The first free numbered backup name: ``path.1``, ``path.2``, ..."""
    k = 1
    while os.path.exists(f"{path}.{k}"):
        k += 1
    return f"{path}.{k}"


def move_aside(path: str) -> str:
    """Rename ``path`` to its next numbered backup (nothing is deleted); returns the backup."""
    backup = backup_name(path)
    os.replace(path, backup)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return backup
