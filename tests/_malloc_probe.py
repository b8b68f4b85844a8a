"""What a matcher worker process sees, for tests/test_score.py (a module light enough for a spawned worker)."""

import os


def _malloc_settings(pred: object, gt: object) -> str | None:
    return os.environ.get("GLIBC_TUNABLES")


def _worker_pid(pred: object, gt: object) -> int:
    return os.getpid()
