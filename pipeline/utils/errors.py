"""One line for every failure a user can fix, on both command lines, and the exit codes that go with it.

Bad input, impossible settings, a busy or finished checkpoint folder, a full disk and a preemption signal all end
the run with one last line ``error: <file>: <problem>`` and a non-zero exit code:

- 2: bad input or settings (:class:`PipelineError`, ``transforms.io.VolumeError``, a path that does not exist),
  the README's promise;
- 128 + signal number: stopped by SIGTERM/SIGUSR1/SIGINT after a checkpoint (:class:`Preempted`);
- 1: the environment (disk full, permission denied: the line names the path) or anything unexpected (the
  traceback is printed first, then the line).

Every subcommand of ``python -m pipeline`` follows this rule (``pipeline.cli.main`` runs each through
:func:`run_reporting_errors`).

``python -m pipeline`` calls :func:`report` itself. ``python -m monai.bundle run`` wraps an error raised while
evaluating a config expression in ``RuntimeError: Failed to evaluate ConfigExpression`` and prints a long
traceback, so the bundle configs import this module first: imported in a process whose main module is
``monai.bundle``, it installs :func:`excepthook`, which finds the user's error in the exception chain (``raise
... from`` causes and contexts) and makes that line the last thing printed.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import errno
import logging
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

__all__ = [
    "DiskError",
    "PipelineError",
    "SettingsError",
    "CheckpointDirError",
    "MissingFileError",
    "Preempted",
    "find_user_error",
    "one_line",
    "report",
    "excepthook",
    "run_reporting_errors",
    "pass_on",
    "suggest",
]

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_MISSING_ERRNOS = {errno.ENOENT, errno.ENOTDIR}  # a path the user gave that is not there: bad input, exit 2


class DiskError(OSError):
    """A write that cannot be done: disk full or not writable. The message names the path, and for a full disk the
    bytes needed and free."""

    exit_code = 1  # the environment failed, not the input (bad input exits 2)

    def __str__(self) -> str:
        return str(self.strerror)


class PipelineError(Exception):
    """A failure the user can fix; its message names the file (or setting) and what to change."""

    exit_code = 2


class SettingsError(PipelineError, ValueError):
    """Settings that cannot work together (e.g. a patch size the network cannot halve), refused before training."""


class CheckpointDirError(PipelineError, ValueError):
    """``ckpt_dir`` is used by another run, or holds a finished run longer than the one asked for."""


class MissingFileError(PipelineError, FileNotFoundError):
    """A file the command needs (e.g. the model weights) does not exist."""


class Preempted(PipelineError):
    """Training stopped on a signal after writing a checkpoint; running the same command again resumes it.

    Args:
        signum: the signal received.
        message: where the checkpoint is.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum


def pass_on(engine: Any, e: BaseException) -> None:
    """End an ignite ``EXCEPTION_RAISED`` clean-up handler: re-raise ``e`` unless ``engine`` re-raises by itself.

    ignite 0.5.5 re-raises only when no ``EXCEPTION_RAISED`` handler exists, and stops at the first handler that
    raises. On the project's engines (``pipeline.training.engine.Trainer``/``Evaluator``, which re-raise after all handlers)
    every clean-up handler runs; on any other engine the handler itself must re-raise, or the failure is swallowed.
    """
    if not getattr(engine, "reraises_exceptions", False):
        raise e


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in out):
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, PipelineError):
        return True
    if isinstance(exc, DiskError):
        return True
    io = sys.modules.get("transforms.io")  # imported by everything that reads volumes; not imported here (heavy)
    return io is not None and isinstance(exc, io.VolumeError)


def find_user_error(exc: BaseException) -> BaseException | None:
    """The first error in ``exc``'s chain whose message is meant for the user: a :class:`PipelineError`, a volume
    or disk error, or an ``OSError`` naming a file; None when there is none."""
    chain = _chain(exc)
    for e in chain:
        if _is_user_error(e):
            return e
    for e in chain:
        if isinstance(e, OSError) and e.filename is not None:
            return e
    return None


def _os_line(exc: OSError) -> str:
    path = exc.filename
    if exc.errno in _DISK_ERRNOS:
        folder = os.path.dirname(os.path.abspath(path)) or "."
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else "unknown"
        return f"{path}: {exc.strerror} ({free} bytes free on {folder}); free some space or write elsewhere"
    return f"{path}: {exc.strerror or exc}"


def one_line(exc: BaseException) -> tuple[str, int, bool]:
    """The ``error: ...`` line for ``exc``, the exit code, and whether the failure was expected (a user error).

    Args:
        exc: what ended the run.

    Returns:
        ``(line, exit_code, expected)``.
    """
    if isinstance(exc, KeyboardInterrupt):
        return "error: interrupted (SIGINT) before a checkpoint could be written", 128 + signal.SIGINT, True
    if isinstance(exc, SystemExit):  # argparse (message printed already) or sys.exit("error: ...") on bad usage
        if isinstance(exc.code, str):
            return (exc.code if exc.code.startswith("error") else f"error: {exc.code}"), 2, True
        return "", 0 if exc.code is None else int(exc.code), True
    user = find_user_error(exc)
    if user is None:
        root = _chain(exc)[-1]  # the original failure, under MONAI's "Failed to evaluate ConfigExpression" wrappers
        text = (str(root).strip().splitlines() or [""])[0]
        return f"error: {type(root).__name__}: {text} (unexpected; the traceback above shows where)", 1, False
    if isinstance(user, OSError) and not _is_user_error(user):
        return f"error: {_os_line(user)}", 2 if user.errno in _MISSING_ERRNOS else 1, True
    return f"error: {user}", int(getattr(user, "exit_code", 2)), True


def report(exc: BaseException, stream: Any = None) -> int:
    """Print the traceback of an unexpected failure (an expected one prints none), then the one line, last.

    Returns:
        The exit code for ``exc``.
    """
    stream = sys.stderr if stream is None else stream
    line, code, expected = one_line(exc)
    if not expected:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
    for handler in logging.getLogger().handlers:  # log records (ignite's "terminating due to exception") first
        with contextlib.suppress(ValueError, OSError):  # a handler's closed stream must not hide the line below
            handler.flush()
    sys.stdout.flush()
    if line:
        print(line, file=stream, flush=True)
    return code


def run_reporting_errors(fn: Callable[..., int], *args: Any) -> int:
    """``fn(*args)``, its exception turned into the one line and exit code (for ``python -m pipeline``)."""
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - every failure ends in one line and a non-zero code
        return report(e)


def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` for ``python -m monai.bundle``: the one line last, and the exit code of :func:`one_line`.

    Python exits 1 after an uncaught exception whatever the hook does; the exit handlers are run here, then the
    process exits with the right code.
    """
    code = report(exc)
    atexit._run_exitfuncs()  # what normal interpreter exit would do (data-loader workers, writers)
    sys.stderr.flush()
    os._exit(code)


def _main_is_bundle_cli() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name in ("monai.bundle.__main__", "monai.bundle")


if _main_is_bundle_cli():
    sys.excepthook = excepthook


def suggest(key: str, known: Iterable[str]) -> str:
    """``" (did you mean 'epochs'?)"`` for the closest known key, or ``""`` when none is close."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
