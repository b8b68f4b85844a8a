"""Tests for pipeline.utils.files' copies: whole or nothing, and writable even from a read-only source."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.utils.files import atomic_copy, atomic_copytree


def _read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IWUSR)  # by the mode: root may write anywhere


def test_copies_of_a_read_only_source_are_whole_and_writable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    _read_only(src)

    dst = atomic_copytree(src, tmp_path / "out" / "dst")
    assert (dst / "a.txt").read_text() == "a" and (dst / "sub" / "b.txt").read_text() == "b"
    assert all(_writable(p) for p in (dst, dst / "sub", dst / "a.txt", dst / "sub" / "b.txt"))
    with pytest.raises(OSError):
        atomic_copytree(src, dst)  # never merged into an existing folder
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dst"]  # no temporary folder left

    target = atomic_copy(src / "a.txt", tmp_path / "out" / "a.txt")
    assert target.read_text() == "a" and _writable(target)
    with pytest.raises(FileNotFoundError):
        atomic_copy(src / "missing.txt", target)
    assert target.read_text() == "a" and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "dst"]
