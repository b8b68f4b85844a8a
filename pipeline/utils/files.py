"""Atomic file writes: a reader never sees a half-written file, and a full or read-only disk is one clear error.

Every output of the project (checkpoints, ``model.pt``, masks, zips, JSON records, the volume store) is written
through :func:`atomic_write`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.utils.errors import DiskError

__all__ = [
    "MIN_FREE_MARGIN",
    "atomic_copy",
    "atomic_copytree",
    "atomic_save",
    "atomic_symlink",
    "atomic_write",
    "atomic_write_bytes",
]

MIN_FREE_MARGIN = 1 << 20  # bytes left free beyond a write's expected size: the filesystem needs some for metadata
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _free_bytes(folder: Path) -> int:
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _disk_full(path: Path, needed: int) -> DiskError:
    free = _free_bytes(path.parent)
    msg = (
        f"{path}: not enough disk space: about {needed} bytes needed, {free} bytes free on {path.parent}; free some "
        "space or point the output (ckpt_dir, output_dir, pred_dir) at another disk"
    )
    return DiskError(errno.ENOSPC, msg)


def _os_errno(exc: BaseException) -> int | None:
    """The errno of the first ``OSError`` in ``exc``'s chain (torch wraps a failed write in a RuntimeError)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in seen):
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        seen.append(current)
        current = current.__cause__ or current.__context__
    return None


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], Any], size_hint: int | None = None, exclusive: bool = False
) -> Path:
    """Write a file so that a reader never sees it half-written: ``write(f)`` fills a temporary file in the same
    folder, which is flushed, fsynced and renamed over ``path`` (atomic on one filesystem); the folder is fsynced
    so the rename survives a crash. On any error the temporary file is removed and ``path`` is left as it was.

    With ``exclusive`` the finished file is hard-linked to ``path`` instead of renamed over it, which fails when
    ``path`` exists: of several processes writing the same file, the first one wins and the others learn it.

    A full disk or a folder that cannot be written raises :class:`DiskError` naming ``path`` (with the bytes needed
    and free): before writing when ``size_hint`` says the file cannot fit, or when the write itself fails so.

    Args:
        path: destination; its folder is created if missing.
        write: called with the open binary temporary file.
        size_hint: the expected size in bytes, when known (checked against the free space first).
        exclusive: refuse to replace an existing ``path``.

    Returns:
        ``path``.

    Raises:
        DiskError: no space left, or no permission to write there.
        FileExistsError: ``exclusive`` and ``path`` exists already.

    Example::

        atomic_write("model.pt", lambda f: torch.save(state, f))
    """
    path = Path(path)
    if size_hint is not None and _free_bytes(path.parent) < size_hint + MIN_FREE_MARGIN:
        raise _disk_full(path, size_hint)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if tmp is not None and os.path.exists(tmp) else 0
        # torch.save reports a full disk as "unexpected pos", with no OSError: a disk left without room tells
        full = isinstance(e, Exception) and tmp is not None and _free_bytes(path.parent) < MIN_FREE_MARGIN
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _raise_disk_error(e, path, max(size_hint or 0, written), full)
        raise
    _fsync_folder(path.parent)
    return path


def _raise_disk_error(e: BaseException, path: Path, needed: int, full: bool = False) -> None:
    """Raise the :class:`DiskError` for a failed write of ``path`` when ``e`` is a full disk or a refused write."""
    code = _os_errno(e)
    if code in _DISK_ERRNOS or full:
        raise _disk_full(path, needed) from e
    if code in _ACCESS_ERRNOS:
        msg = f"{path}: cannot write here ({os.strerror(code)}); choose a writable folder"
        raise DiskError(code, msg) from e


def _fsync_folder(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX: a directory can be opened and fsynced
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> Path:
    """``atomic_write`` of a bytes payload (text: ``text.encode()``)."""
    return atomic_write(path, lambda f: f.write(data), exclusive=exclusive)


def atomic_symlink(target: str, link: str | os.PathLike) -> Path:
    """Point the symbolic link ``link`` at ``target``, replacing what is there in one step: a reader sees the old
    link or the new one, never none.

    Args:
        target: what the link points to (a relative target is relative to the link's folder).
        link: the link to create or replace.

    Returns:
        ``link``.
    """
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(link.parent)
    return link


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the file ``src`` to ``dst`` through :func:`atomic_write`: ``dst`` holds the old file or the whole copy.

    Only the content is copied: ``dst`` is an ordinary writable file even when ``src`` is read-only.

    Returns:
        ``dst``.
    """
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20), size_hint=size)


def atomic_copytree(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the folder ``src`` to ``dst``, which must not exist, so that ``dst`` appears whole or not at all.

    The copy is made in a hidden temporary folder beside ``dst`` (removed on any error) and renamed to ``dst``.
    Only contents are copied: the copy is writable even when ``src`` is read-only.

    Returns:
        ``dst``.

    Raises:
        DiskError: no space left, or no permission to write there.
        OSError: ``dst`` exists.
    """
    src, dst = Path(src), Path(dst)
    needed = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    if _free_bytes(dst.parent) < needed + MIN_FREE_MARGIN:
        raise _disk_full(dst, needed)
    tmp = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; outputs are ordinary folders
        for folder, _, files in os.walk(src):
            target = tmp / Path(folder).relative_to(src)
            target.mkdir(exist_ok=True)
            for name in files:
                shutil.copyfile(Path(folder) / name, target / name)
        os.rename(tmp, dst)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk_error(e, dst, needed)
        raise
    _fsync_folder(dst.parent)
    return dst


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a partial file at ``path``.

    The object is written to a hidden temporary file in the same folder, flushed and fsynced, then renamed over
    ``path`` (``os.replace`` is atomic on one file system) and the folder is fsynced so the rename survives a crash.

    Args:
        obj: what to save.
        path: destination file; its folder is created if missing.

    Returns:
        The destination path.
    """
    return atomic_write(path, lambda f: torch.save(obj, f), size_hint=_tensor_bytes(obj))


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts/lists): about the size of its ``torch.save`` file."""

    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
