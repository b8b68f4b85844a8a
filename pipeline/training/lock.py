"""One training run per checkpoint folder: an exclusive ``fcntl.flock`` on ``ckpt_dir/.training.lock``.

The lock file names the host, PID and start time of its holder; a second run on the folder stops at once with one
line naming it. The OS drops the lock when the process dies, so a killed run never blocks the next. On a
filesystem shared by several machines the lock holds across them only where the filesystem implements ``flock``
across clients (NFSv4 and Linux NFS clients do; Lustre needs the ``flock`` mount option; some FUSE filesystems
lock per machine only).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

from pipeline.utils.errors import CheckpointDirError

__all__ = ["LOCK_NAME", "DirLock", "dir_lock", "lock_ckpt_dir"]

LOCK_NAME = ".training.lock"


class DirLock:
    """An exclusive OS lock on ``folder/LOCK_NAME`` for as long as it is held (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write who holds it (nothing to do when this process holds it already).

        Raises:
            CheckpointDirError: another process holds it.
        """
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not written its name yet"
            os.close(fd)
            msg = (
                f"{self.path.parent}: in use by another training run ({holder}); wait for it to finish, stop it, or "
                "give this run another ckpt_dir"
            )
            raise CheckpointDirError(msg) from None
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        # the file stays: unlinking a lock file lets a third process lock a new inode while a second holds the old
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


_DIR_LOCKS: dict[Path, DirLock] = {}


def dir_lock(folder: str | os.PathLike) -> DirLock:
    """The one lock object of this process for ``folder``: taken early by ``lock_ckpt_dir``, kept by the trainer."""
    path = Path(folder).resolve()
    if path not in _DIR_LOCKS:
        _DIR_LOCKS[path] = DirLock(path)
    return _DIR_LOCKS[path]


def lock_ckpt_dir(ckpt_dir: str | os.PathLike) -> None:
    """Take ``ckpt_dir``'s lock on rank 0 before anything of the run is written there (its run record, say); the
    run's ``TrainingCheckpointer`` then holds the same lock until the run ends.

    Raises:
        CheckpointDirError: another training run holds the folder (named in the message).
    """
    from pipeline.utils.distributed import (
        is_main_process,  # RANK from the launcher, before any process group exists
    )

    if is_main_process():
        dir_lock(ckpt_dir).acquire()
