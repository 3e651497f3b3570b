"""Files that are either the old version or the new one on disk, never a damaged mix.

Every file a run writes goes through here: the new content is written to a
temporary file in the same folder, fsync'ed, renamed over the old name (an
atomic replace on POSIX file systems), and the folder is fsync'ed so that the
rename itself survives a crash. A reader that opened the old file keeps
reading the old inode, so readers never see a half-written file either.

A file that grows all run long (the metrics) is not copied whole for every
change: :class:`TwoCopies` keeps two hidden copies, changes the one that is not
published in place, and publishes it by an atomic rename of a hard link.
Files get the permissions of a normal write (0666 less the umask), not the
0600 of a temporary file.
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


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def _mkstemp(path: str) -> str:
    """A new temporary file beside ``path``, with the permissions a plain open() would give."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: readers of the run need more
    finally:
        os.close(fd)
    return tmp


@contextlib.contextmanager
def replacing(path: str, copy: bool = False) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    ``copy``: start from a copy of the current file (to append to it). On an
    exception the temporary file is removed and ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _mkstemp(path)
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


#: A change to a file, given its path.
Change = Callable[[str], object]


class TwoCopies:
    """``path``, always a complete file, changed without copying it whole each time.

    Two hidden copies sit beside it (``.NAME.a``, ``.NAME.b``); ``path`` is a hard
    link to one of them, the published one. :meth:`update` applies a change to
    the other copy in place (first the change it missed, the previous one), fsyncs
    it, and publishes it by renaming a new hard link over ``path``. The published
    inode is never written, so a kill at any moment leaves ``path`` as the last
    published version; a half-changed hidden copy is rebuilt by a full copy the
    next time its state is unknown (after every start). A change costs what it
    writes, whatever the length of the file. Where hard links are refused, the
    hidden copy is published by a copy instead (correct, but the cost of a copy).

    A reader sees a complete version when it opens ``path``; one that keeps it
    open across the next two updates may see that inode changed under it.
    """

    def __init__(self, path: str, combine: Callable[[Change, Change], Change] | None = None):
        """``combine(earlier, later)``: one change doing both, for the copy that missed the
        previous change (one open of the file instead of two); default: one after the other."""
        self.path = path
        folder, name = os.path.split(os.path.abspath(path))
        self.copies = (os.path.join(folder, f".{name}.a"), os.path.join(folder, f".{name}.b"))
        self._behind: dict[str, int] = {}  # changes a copy lacks vs. path; absent = unknown
        self._last: Change | None = None
        self._combine = combine
        self._link = True

    def update(self, change: Change) -> None:
        """Apply ``change(file_path)`` to the hidden copy, then publish it as ``path``."""
        hidden = self._hidden()
        behind = self._behind.get(hidden)
        todo = change
        if behind is None:
            self._fresh(hidden)
        elif behind and self._last is not None:
            if self._combine is None:
                self._last(hidden)
            else:
                todo = self._combine(self._last, change)
        todo(hidden)
        _fsync_file(hidden)
        # The copy published until now (up to date) lacks this change from now on.
        before = [c for c in self.copies if c != hidden and self._behind.get(c) == 0]
        self._publish(hidden)
        self._behind = {hidden: 0, **dict.fromkeys(before, 1)}
        self._last = change

    def forget(self) -> None:
        """Remove the hidden copies (``path`` itself stays): before ``path`` moves aside, so
        that no copy of the old run can be changed by a new one."""
        for copy in self.copies:
            with contextlib.suppress(FileNotFoundError):
                os.remove(copy)
        self._behind.clear()

    def _hidden(self) -> str:
        try:
            published = os.stat(self.path).st_ino
        except FileNotFoundError:
            published = -1
        for copy in self.copies:
            try:
                if os.stat(copy).st_ino != published:
                    return copy
            except FileNotFoundError:
                return copy
        raise OSError(f"both hidden copies of {self.path} are the published file")

    def _fresh(self, hidden: str) -> None:
        """``hidden`` becomes a new inode holding ``path`` (an old one, maybe linked to a kept
        run, is only unlinked, never written)."""
        tmp = _mkstemp(self.path)
        try:
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, hidden)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def _publish(self, hidden: str) -> None:
        tmp = _mkstemp(self.path)
        try:
            if self._link:
                os.remove(tmp)
                try:
                    os.link(hidden, tmp)
                except OSError:  # a file system without hard links: publish a copy
                    self._link = False
            if not self._link:
                shutil.copyfile(hidden, tmp)
                _fsync_file(tmp)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
