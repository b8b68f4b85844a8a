"""The memory this process may still use, cgroup limits included (a container, a SLURM job, a Kaggle box); and a way
to keep it small (:func:`run_apart`)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["available_memory", "run_apart"]

T = TypeVar("T")


def available_memory() -> int:
    """Bytes this process can still use: ``MemAvailable``, lowered by a cgroup (v1 or v2) memory limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file, usage_file in _cgroup_files():
        try:
            limit = int(Path(limit_file).read_text().split()[0])
            usage = int(Path(usage_file).read_text().split()[0])
        except (OSError, ValueError):
            continue
        if limit < 2**60:
            avail = min(avail, max(0, limit - usage))
    return avail


def _cgroup_files() -> list[tuple[str, str]]:
    files = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return files
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            for root in (f"/sys/fs/cgroup/memory{path}", "/sys/fs/cgroup/memory"):
                files.append((f"{root}/memory.limit_in_bytes", f"{root}/memory.usage_in_bytes"))
        elif controllers == "":
            files.append((f"/sys/fs/cgroup{path}/memory.max", f"/sys/fs/cgroup{path}/memory.current"))
    return files


def run_apart(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh interpreter (spawned), its result returned and its exception raised here.

    What ``fn`` imports and allocates goes back to the system when it ends: importing torch and MONAI alone holds
    ~0.3 GiB of anonymous memory for the life of a process, and reading a dataset's labels leaves ~0.2 GiB more that
    ``malloc_trim`` does not return. The main job checks its dataset this way so that its own process, which only
    waits while its DDP workers train, stays at ~0.05 GiB (the Kaggle box's RAM is the workers' page cache).

    Where torch is loaded in this process already (a test, a notebook that trained) there is nothing left to keep
    small, and ``fn`` runs here. ``fn`` and its arguments must pickle (a module-level function).
    """
    if "torch" in sys.modules:
        return fn(*args, **kwargs)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(fn, *args, **kwargs)
        try:
            return future.result()
        except BaseException as e:
            remote = e.__cause__  # the child's traceback as text: kept as a note, not as the cause one_line names
            if type(remote).__name__ == "_RemoteTraceback":
                e.__cause__, e.__suppress_context__ = None, True
                e.add_note(f"in a child process:{remote}")
            raise
