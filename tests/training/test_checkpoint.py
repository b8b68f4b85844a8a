"""Tests for pipeline.training.checkpoint: atomic writes, retention, corrupt-file fallback and exact resume (CPU, tiny)."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from pipeline.training.checkpoint import (
    FINAL_NAME,
    checkpoint_name,
    find_latest_checkpoint,
)
from pipeline.training.lock import LOCK_NAME
from pipeline.utils.files import atomic_save
from tests._ckpt_worker import (
    build,
    hold_lock,
    read_record,
    resume_with_stalled_final_write,
    train_then_kill_at_final_write,
    train_then_sigkill,
    train_then_signal,
)

FORK = multiprocessing.get_context("fork")


class _Unpicklable:
    def __reduce__(self) -> tuple:
        msg = "this object cannot be saved"
        raise RuntimeError(msg)


def _max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """4 uninterrupted epochs (num_workers=0), the run every resumed one must reproduce."""
    setup = build(tmp_path_factory.mktemp("reference"), seed=0, max_epochs=4)
    setup.trainer.run()
    return setup


def test_atomic_save_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = atomic_save({"x": torch.arange(3)}, tmp_path / "a.pt")
    with pytest.raises(RuntimeError, match="cannot be saved"):  # torch.save fails half-way through the temp file
        atomic_save({"x": torch.zeros(3), "bad": _Unpicklable()}, path)
    assert _names(tmp_path) == ["a.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))


def test_resume_at_epoch_boundary_is_exact(tmp_path: Path, reference, caplog: pytest.LogCaptureFixture) -> None:
    first = build(tmp_path, seed=0, max_epochs=2, keep_last=2)
    first.trainer.run()
    assert _names(tmp_path) == [checkpoint_name(1, 3), checkpoint_name(2, 6), FINAL_NAME]
    best = (first.evaluator.state.best_metric, first.evaluator.state.best_metric_epoch)

    # another seed: nothing lines up unless the checkpoint restores it; a larger max_epochs continues the run
    resumed = build(tmp_path, seed=123, max_epochs=4, keep_last=2)
    at_start = {}

    @resumed.trainer.on(Events.STARTED)
    def _best_after_resume(_) -> None:
        at_start["best"] = (resumed.evaluator.state.best_metric, resumed.evaluator.state.best_metric_epoch)

    with caplog.at_level(logging.INFO):
        resumed.trainer.run()
    assert f"Resumed from {tmp_path / FINAL_NAME} at epoch 2, iteration 6" in caplog.text
    assert at_start["best"] == best
    assert first.losses | resumed.losses == reference.losses
    assert first.lrs | resumed.lrs == reference.lrs  # the per-iteration LR schedule continues without a jump
    assert _max_weight_diff(resumed.network, reference.network) <= 1e-6
    assert resumed.evaluator.state.best_metric == reference.evaluator.state.best_metric
    # keep_last=2 counted the files of the first run; the final one is never removed and wins the tie
    assert _names(tmp_path) == [checkpoint_name(3, 9), checkpoint_name(4, 12), FINAL_NAME]
    assert find_latest_checkpoint(tmp_path) == tmp_path / FINAL_NAME
    for path in tmp_path.glob("*.pt"):
        assert torch.load(path, weights_only=True)["trainer"]["iteration"] in (9, 12)

    with pytest.raises(ValueError, match="holds a run at epoch 4, beyond epochs=3"):
        build(tmp_path, seed=0, max_epochs=3).trainer.run()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_after_sigkill_is_exact(tmp_path: Path, reference, num_workers: int) -> None:
    ckpt_dir, record = tmp_path / "ckpt", tmp_path / "record.jsonl"
    # timed checkpoints at every iteration; killed after iteration 5 = 2 of 3 iterations into epoch 2
    child = FORK.Process(target=train_then_sigkill, args=(str(ckpt_dir), str(record), 5, num_workers))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert find_latest_checkpoint(ckpt_dir) == ckpt_dir / "checkpoint_epoch=0002_iter=000005.pt"
    killed_losses, killed_lrs = read_record(record)
    assert sorted(killed_losses) == [1, 2, 3, 4, 5]

    expected = reference
    if num_workers:
        expected = build(tmp_path / "reference", seed=0, max_epochs=4, num_workers=num_workers)
        expected.trainer.run()
    resumed = build(ckpt_dir, seed=123, max_epochs=4, num_workers=num_workers)
    resumed.trainer.run()
    assert sorted(resumed.losses) == list(range(6, 13))
    assert killed_losses | resumed.losses == expected.losses
    assert killed_lrs | resumed.lrs == expected.lrs
    assert _max_weight_diff(resumed.network, expected.network) <= 1e-6


def test_truncated_checkpoint_is_skipped(tmp_path: Path, reference, caplog: pytest.LogCaptureFixture) -> None:
    build(tmp_path, seed=0, max_epochs=2).trainer.run()
    for name in (FINAL_NAME, "checkpoint_epoch=0002_iter=000006.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.INFO):
        resumed = build(tmp_path, seed=123, max_epochs=4)
        resumed.trainer.run()
    assert f"Skipping unreadable checkpoint {tmp_path / FINAL_NAME}" in caplog.text
    assert f"Skipping unreadable checkpoint {tmp_path / 'checkpoint_epoch=0002_iter=000006.pt'}" in caplog.text
    assert f"Resumed from {tmp_path / 'checkpoint_epoch=0001_iter=000003.pt'} at epoch 1, iteration 3" in caplog.text
    assert sorted(resumed.losses) == list(range(4, 13))
    assert _max_weight_diff(resumed.network, reference.network) <= 1e-6


def test_kill_during_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    marker, tmp_path = tmp_path / "stalled", tmp_path / "ckpt"
    build(tmp_path, seed=0, max_epochs=1, every_epochs=None).trainer.run()
    assert _names(tmp_path) == [FINAL_NAME]
    # resume to epoch 2; the rewrite of checkpoint_final.pt stalls half-way and is SIGKILLed there
    child = FORK.Process(target=resume_with_stalled_final_write, args=(str(tmp_path), str(marker), 2))
    child.start()
    deadline = time.monotonic() + 120
    while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    child.kill()
    child.join(10)
    assert child.exitcode == -signal.SIGKILL

    leftovers = [p for p in tmp_path.iterdir() if p.name not in (FINAL_NAME, LOCK_NAME)]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".checkpoint_final.pt.")  # the partial temp file
    assert torch.load(tmp_path / FINAL_NAME, weights_only=True)["trainer"]["iteration"] == 3
    assert find_latest_checkpoint(tmp_path) == tmp_path / FINAL_NAME

    resumed = build(tmp_path, seed=0, max_epochs=2, every_epochs=None)
    resumed.trainer.run()
    assert _names(tmp_path) == [FINAL_NAME]  # the stale temp file is cleaned up at start
    assert sorted(resumed.losses) == [4, 5, 6]


def test_changed_epoch_length(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = build(tmp_path, seed=0, max_epochs=4, interval_minutes=1e-9)
    first.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=5), lambda e: e.terminate())
    first.trainer.run()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=0002_iter=000005.pt"

    # 8 volumes: 4 iterations an epoch instead of 3; epoch 2 cannot be replayed, so training goes on at epoch 3
    with caplog.at_level(logging.INFO):
        resumed = build(tmp_path, seed=0, max_epochs=3, n_volumes=8)
        resumed.trainer.run()
    assert "cannot be replayed (epoch length 3 -> 4): continuing at the next epoch boundary" in caplog.text
    assert resumed.trainer.state.epoch_length == 4
    assert sorted(resumed.losses) == [9, 10, 11, 12]  # iteration counter rebased to 2 epochs * 4
    assert torch.load(tmp_path / FINAL_NAME, weights_only=True)["trainer"]["epoch_length"] == 4


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_saves_at_iteration_boundary_and_resume_is_exact(tmp_path: Path, reference, signum: int) -> None:
    ckpt_dir, record = tmp_path / "ckpt", tmp_path / "record.jsonl"
    # the signal arrives during iteration 5 (2 of 3 into epoch 2); no timed or epoch checkpoints are configured
    child = FORK.Process(target=train_then_signal, args=(str(ckpt_dir), str(record), 5, int(signum)))
    child.start()
    child.join(120)
    assert child.exitcode == 128 + signum
    killed_losses, killed_lrs = read_record(record)
    assert sorted(killed_losses) == [1, 2, 3, 4]  # the recorder runs after the checkpointer, which raised ...
    assert _names(ckpt_dir) == [checkpoint_name(2, 5)]  # ... once the iteration in flight was saved: none lost

    resumed = build(ckpt_dir, seed=123, max_epochs=4, every_epochs=None)
    resumed.trainer.run()
    assert sorted(resumed.losses) == list(range(6, 13))
    expected = {it: loss for it, loss in reference.losses.items() if it != 5}
    assert killed_losses | resumed.losses == expected
    assert killed_lrs | resumed.lrs == {it: lr for it, lr in reference.lrs.items() if it != 5}
    assert _max_weight_diff(resumed.network, reference.network) == 0.0


def test_kill_at_final_write_is_completed_by_the_next_run(tmp_path: Path) -> None:
    child = FORK.Process(target=train_then_kill_at_final_write, args=(str(tmp_path), 2))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert FINAL_NAME not in _names(tmp_path) and checkpoint_name(2, 6) in _names(tmp_path)
    again = build(tmp_path, seed=0, max_epochs=2)
    again.trainer.run()
    assert again.losses == {}  # nothing left to train ...
    assert torch.load(tmp_path / FINAL_NAME, weights_only=True)["trainer"]["iteration"] == 6  # ... but it finishes
    mtime = (tmp_path / FINAL_NAME).stat().st_mtime_ns
    build(tmp_path, seed=0, max_epochs=2).trainer.run()
    assert (tmp_path / FINAL_NAME).stat().st_mtime_ns == mtime  # current already: not rewritten


def test_second_run_on_a_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    from pipeline.utils.errors import CheckpointDirError

    ready = tmp_path / "ready"
    child = FORK.Process(target=hold_lock, args=(str(tmp_path / "ckpt"), str(ready)))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(CheckpointDirError, match=rf"in use by another training run \(host .*, pid {child.pid}, started "):
            build(tmp_path / "ckpt", seed=0, max_epochs=1).trainer.run()
    finally:
        child.kill()
        child.join(10)
    build(tmp_path / "ckpt", seed=0, max_epochs=1).trainer.run()  # the OS released the killed holder's lock
    assert FINAL_NAME in _names(tmp_path / "ckpt")


def test_failed_iteration_is_never_checkpointed(tmp_path: Path) -> None:
    """A failure in the loss, with a clean-up handler on EXCEPTION_RAISED (which made ignite swallow it), ends the
    run with the exception; no checkpoint is written after the failed iteration; the lock is released."""
    from pipeline.training.monitor import ProgressHandler

    setup = build(tmp_path, seed=0, max_epochs=3, interval_minutes=1e-9)
    ProgressHandler(mode="log").attach(setup.trainer)
    real_loss = setup.trainer.loss_function

    def failing_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if setup.trainer.state.iteration == 5:
            msg = "Sizes of tensors must match"
            raise RuntimeError(msg)
        return real_loss(pred, target)

    setup.trainer.loss_function = failing_loss
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        setup.trainer.run()
    assert find_latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(2, 4)  # iteration 5 failed: not saved
    assert FINAL_NAME not in _names(tmp_path)
    build(tmp_path, seed=0, max_epochs=2).trainer.run()  # not locked out by the failed run
