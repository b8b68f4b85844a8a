"""Durations as people read them, for the progress lines of training and of streaming prediction."""

from __future__ import annotations

import datetime

__all__ = ["format_eta"]


def format_eta(seconds: float | None) -> str:
    """``"1:02:03"`` for 3723 seconds (``"2 days, 1:00:00"`` past a day); ``"?"`` when not known yet."""
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))
