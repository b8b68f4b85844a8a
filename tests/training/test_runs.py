"""Tests for pipeline.training.runs: one folder per training run, continued by a resumed run."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.training import runs
from pipeline.training.checkpoint import FINAL_NAME


def _checkpoint(ckpt_dir: Path) -> None:
    torch.save({"trainer": {"epoch": 1, "iteration": 4}}, ckpt_dir / FINAL_NAME)


def test_new_runs_get_new_folders_and_a_resumed_run_its_own(tmp_path: Path, monkeypatch) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "models"
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20260101-120000")
    first = Path(runs.run_dir(out, ckpt))
    assert first == out / "runs" / "20260101-120000" and first.is_dir()
    assert (ckpt / runs.RUN_RECORD).read_text().strip() == first.name
    assert runs.latest_run(out) == first.resolve() and os.readlink(out / runs.LATEST_LINK) == f"runs/{first.name}"

    # no checkpoint was written (the run failed early): the next run is a new one, in a folder of its own
    second = Path(runs.run_dir(out, ckpt))
    assert second.name == "20260101-120000-2" and runs.latest_run(out) == second.resolve()

    _checkpoint(ckpt)  # the second run checkpointed: a relaunch resumes it and continues its folder
    assert Path(runs.run_dir(out, ckpt)) == second
    assert runs.latest_run(out) == second.resolve()

    # auto_resume off starts afresh despite the checkpoint; a new ckpt_dir is a new run too
    third = Path(runs.run_dir(out, ckpt, auto_resume=False))
    assert third not in (first, second) and (ckpt / runs.RUN_RECORD).read_text().strip() == third.name
    other = Path(runs.run_dir(out, tmp_path / "other_models"))
    assert len({first, second, third, other}) == 4
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(p.name for p in (first, second, third, other))


def test_other_ranks_write_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    path = Path(runs.run_dir(tmp_path / "out", tmp_path / "models"))
    assert path.parent == tmp_path / "out" / "runs"
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()
    assert runs.latest_run(tmp_path / "out") is None


def test_a_second_run_on_a_locked_folder_touches_no_run_record(tmp_path: Path) -> None:
    import multiprocessing
    import time

    import pytest

    from pipeline.utils.errors import CheckpointDirError
    from tests._ckpt_worker import hold_lock

    out, ckpt, ready = tmp_path / "out", tmp_path / "models", tmp_path / "ready"
    child = multiprocessing.get_context("fork").Process(target=hold_lock, args=(str(ckpt), str(ready)))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(CheckpointDirError, match=f"pid {child.pid}"):
            runs.run_dir(out, ckpt)
    finally:
        child.kill()
        child.join(10)
    assert not (ckpt / runs.RUN_RECORD).exists() and not (out / "runs").exists()
