"""The memory this process may still use, cgroup limits included (a container, a SLURM job, a Kaggle box)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory"]


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
