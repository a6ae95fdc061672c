"""An exclusive lock between processes (and threads) on a file, with ``fcntl.flock``.

POSIX only (Linux, macOS): twilight's kernels run on CUDA Linux boxes; Windows is not a goal.

The kernel drops an flock when its holder dies, so a crash never leaves a stale lock behind.
A lock file may be deleted while unlocked (``twilightc cache clear`` does): ``acquire`` checks,
after locking, that the file it locked is still the one at ``path`` and starts over if not, so
two processes can never hold "the same" lock on two different inodes.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "k.lock"
    >>> with FileLock(path):
    ...     FileLock(path).acquire(blocking=False)
    False
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class FileLock:
    """``with FileLock(path): ...`` holds an exclusive flock on ``path`` (created if missing).

    Each ``FileLock`` opens its own file description, so two objects on one path exclude each
    other even inside one process."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return ``False`` at once if another holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: lock already held by this FileLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            if self._same_file(fd):
                self._fd = fd
                return True
            os.close(fd)  # the file was unlinked (or replaced) while we waited: lock anew

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def unlink_and_release(self) -> None:
        """Delete the lock file while holding it, then release (a waiter then starts over)."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.release()

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
