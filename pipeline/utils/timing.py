"""Durations as people read them (progress lines, ETAs) and write them (``time_limit: 11h30m``), and the job's
start that a time limit counts from. No torch import: the command line checks a ``--time_limit`` before the heavy
imports."""

from __future__ import annotations

import datetime
import math
import os
import re
from typing import Any

from pipeline.utils.errors import SettingsError

__all__ = ["JOB_START_ENV", "format_eta", "job_start", "parse_duration"]


def format_eta(seconds: float | None) -> str:
    """``"1:02:03"`` for 3723 seconds (``"2 days, 1:00:00"`` past a day); ``"?"`` when not known yet."""
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


JOB_START_ENV = "PIPELINE_JOB_START"
"""Environment variable holding the job's start (seconds since the epoch); ``python -m pipeline`` sets it for the
processes it runs, so that ``time_limit`` counts the dataset check, the store build and training alike."""

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)d)?(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m(?:in)?)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(value: Any, name: str = "time_limit") -> float | None:
    """Seconds from a number of seconds or a duration such as ``"11h30m"``, ``"90m"``, ``"1.5h"``, ``"2d"``.

    Args:
        value: None (no limit), a positive number of seconds, or a string of ``<number><d|h|m|s>`` parts.
        name: the setting's name, for the error message.

    Returns:
        The seconds, or None for no limit.

    Raises:
        SettingsError: anything else, or a limit that is not positive.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.fullmatch(text)
            if parts and any(parts.groups()):
                seconds = sum(float(g) * u for g, u in zip(parts.groups(), _UNITS.values(), strict=True) if g)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        msg = (f"{name}: {value!r} is not a time limit; give seconds (e.g. 41400) or a duration such as 11h30m, 90m "
               "or 1.5h (null for none)")
        raise SettingsError(msg)
    return seconds


def job_start() -> float:
    """When the job started, in seconds since the epoch: ``$PIPELINE_JOB_START`` (set by ``python -m pipeline``)
    when it is there, else this process's start (a bundle run counts from its own start)."""
    value = os.environ.get(JOB_START_ENV)
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    import psutil

    return psutil.Process().create_time()
