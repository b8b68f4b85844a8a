"""``python -m pipeline``: the whole job, its skip-when-done and resume behaviour, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.__main__ import parse_overrides, route_overrides
from pipeline.checkpoint import completed_epochs
from tests.conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parent.parent


def _main(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_overrides_parse_and_route():
    ov = parse_overrides(["--epochs", "4", "--patch_size", "[48,48,48]", "--tta=true", "--lr_schedule", "poly"])
    assert ov == {"epochs": 4, "patch_size": [48, 48, 48], "tta": True, "lr_schedule": "poly"}
    infer = route_overrides(ov, REPO / "bundle" / "configs" / "inference.yaml")
    assert infer == {"patch_size": [48, 48, 48], "tta": True}  # train-only keys stay out of inference


def test_unknown_setting_is_refused(capsys):
    from pipeline.__main__ import main

    assert main(["--epoch", "4"]) == 2  # a typo must not silently train the default schedule
    assert "unknown setting(s) ['epoch']" in capsys.readouterr().err


def test_main_job_trains_predicts_skips_and_resumes(tiny_dataset, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "models"
    tiny = []
    for k, v in {**TINY_TRAIN, "val_interval": 5}.items():  # fewer epochs than val_interval: validated at the end
        tiny += [f"--{k}", str(v).replace(" ", "")]
    base = ["--dataset_dir", str(tiny_dataset), "--output_dir", str(out), "--ckpt_dir", str(ckpt), *tiny]

    first = _main(base)
    assert "submission:" in first.stdout and (out / "submission.zip").is_file()
    assert (ckpt / "model.pt").is_file()
    assert completed_epochs(ckpt) == TINY_TRAIN["epochs"]

    (out / "submission.zip").unlink()
    again = _main(base)
    assert "training already complete" in again.stdout  # straight to inference
    assert (out / "submission.zip").is_file()

    more = _main([*base, "--epochs", "3"])  # raising epochs on a finished run continues it
    log = more.stdout + more.stderr
    assert "Resumed from" in log and "at epoch 2" in log
    assert completed_epochs(ckpt) == 3
