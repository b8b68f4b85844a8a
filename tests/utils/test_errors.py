"""A failure is never a success: one `error:` line last and a non-zero exit on both command lines, and nothing
downstream (no submission) after a failed training."""

from __future__ import annotations

import errno
import shutil
import signal
from pathlib import Path

import pytest
import torch

from pipeline.data.datalist import DatasetError
from pipeline.training.checkpoint import find_latest_checkpoint
from pipeline.utils.errors import DiskError, Preempted, one_line
from pipeline.utils.files import atomic_write
from tests._bad_inputs import broken_copy, bundle, main_job, run_cli


def test_one_line_finds_the_users_error_in_the_chain(tmp_path: Path) -> None:
    try:
        try:
            raise DatasetError("/d/train_labels/1.tif: label values [7] outside {0, 1, 2}")
        except DatasetError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e  # what monai.bundle does
    except RuntimeError as wrapped:
        assert one_line(wrapped) == ("error: /d/train_labels/1.tif: label values [7] outside {0, 1, 2}", 2, True)
    assert one_line(Preempted(signal.SIGTERM, "SIGTERM received"))[:2] == ("error: SIGTERM received", 143)
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/outputs")
    assert one_line(RuntimeError("x"))[1:] == (1, False)  # unexpected: code 1, and the traceback is printed
    assert one_line(denied) == ("error: /ro/outputs: Permission denied", 1, True)


def test_full_disk_names_path_bytes_needed_and_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoint.pt"
    atomic_write(target, lambda f: f.write(b"old"))
    monkeypatch.setattr("pipeline.utils.files._free_bytes", lambda folder: 1000)
    with pytest.raises(DiskError, match=rf"{target}: not enough disk space: about 5000000 bytes needed, 1000 bytes free"):
        atomic_write(target, lambda f: f.write(b"new"), size_hint=5_000_000)
    monkeypatch.undo()

    def enospc(f) -> None:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskError, match="not enough disk space: about 7 bytes needed"):
        atomic_write(target, enospc)

    def denied(f) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(DiskError, match=rf"{target}: cannot write here \(Permission denied\)"):
        atomic_write(target, denied)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("float labels 0.5/1.5/2.5", "label values [0.5, 1.5, 2.5] outside {0, 1, 2} (float labels"),
        ("2D training image", "expected a 3D volume (Z, Y, X), got an array of shape (32, 32)"),  # the patch check
        ("float32 image", "float32 image; the store holds uint8 or uint16 images"),
    ],
)
def test_bad_training_data_same_last_line_on_both_command_lines(tiny_dataset, tmp_path, case, expected) -> None:
    ds = broken_copy(tiny_dataset, case, tmp_path)
    rc_main, last_main, _ = run_cli(main_job(ds, tmp_path / "main"))
    rc_bundle, last_bundle, out = run_cli(bundle("training", ds, tmp_path / "bundle"))
    assert rc_main == 2 and rc_bundle == 2, out[-3000:]
    assert last_main.startswith("error: ") and expected in last_main
    assert last_bundle == last_main  # the bundle's traceback is gone: the same one line
    assert "Traceback" not in out


def test_inference_without_model_and_broken_test_image(tiny_dataset, tiny_model_dir, tmp_path) -> None:
    rc, last, _ = run_cli(main_job(tiny_dataset, tmp_path / "main", "--skip_training"))
    assert rc == 2 and last.startswith("error: ") and "model.pt: not found; train a model first" in last
    ds = broken_copy(tiny_dataset, "truncated test image", tmp_path)
    # --check_data False: the reader itself must name the file (MONAI would fall back to PIL's 2D reader)
    rc, last, out = run_cli(bundle("inference", ds, tmp_path / "infer", "--check_data", "False", model_dir=tiny_model_dir))
    assert rc == 2, out[-3000:]
    assert last.startswith("error: ") and "test_images" in last and "truncated or damaged TIFF" in last
    assert not (tmp_path / "infer" / "out" / "submission.zip").exists()


@pytest.mark.parametrize(
    ("fault", "expected", "code"),
    [
        (["--loss#_target_", "tests._faults.FailingLoss"], "injected loss failure at call 2", 1),
        (["--throughput_monitor#_target_", "tests._faults.FailingHandler", "--training_curves", "False"],
         "injected handler failure at epoch 1", 1),
        (["--checkpointer#_target_", "tests._faults.FullDiskCheckpointer"], "not enough disk space: about", 1),
    ],
    ids=["loss", "handler", "disk-full checkpoint"],
)
def test_failed_training_exits_non_zero_and_predicts_nothing(tiny_dataset, tiny_model_dir, tmp_path, fault, expected,
                                                             code) -> None:
    models = tmp_path / "main" / "models"
    shutil.copytree(tiny_model_dir, models)  # an older model.pt: must not be used for a submission
    rc, last, out = run_cli(main_job(tiny_dataset, tmp_path / "main", *fault))
    assert rc == code, out[-3000:]
    assert last.startswith("error: ") and expected in last
    assert not (tmp_path / "main" / "out" / "submission.zip").exists() and "predicting with" not in out
    if "disk" in expected:
        latest = find_latest_checkpoint(models)  # the checkpoint written before the disk filled is intact
        assert latest is not None and torch.load(latest, weights_only=True)["trainer"]["epoch"] == 1
        assert not list(models.glob(".*.tmp"))


def test_finished_longer_run_is_one_line(tiny_dataset, tmp_path) -> None:
    """A ckpt_dir holding a finished run longer than the one asked for: one line, exit 2, through the bundle."""
    from tests._ckpt_worker import build

    build(tmp_path / "models", seed=0, max_epochs=2).trainer.run()  # the epoch count is checked before the weights
    rc, last, out = run_cli(bundle("training", tiny_dataset, tmp_path, "--epochs", "1"))
    assert rc == 2 and last.startswith("error: ") and "holds a run at epoch 2, beyond epochs=1" in last, out[-3000:]
