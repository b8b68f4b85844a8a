"""End to end through the real bundle configs, as a user runs them: train, infer, check the submission."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import yaml

from pipeline import data
from pipeline.submission import check_submission
from tests.conftest import TINY_INFER, TINY_TRAIN, cli_args
from transforms.io import read_volume, read_volume_shape

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "bundle" / "configs"


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_config_keys_for_both_run_ids():
    for name, run_id in (("train.yaml", "training"), ("inference.yaml", "inference")):
        cfg = yaml.safe_load(open(CONFIGS / name))
        assert cfg[run_id] == "@run" and cfg["run"] and cfg["initialize"]
    meta = json.load(open(CONFIGS / "metadata.json"))
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                "network_data_format", "intended_use", "data_type"):
        assert meta[key]
    assert meta["monai_version"] == "1.6.1"


def test_train_then_infer_through_bundle_configs(tiny_dataset, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "models"
    common = {"dataset_dir": str(tiny_dataset), "output_dir": str(out), "ckpt_dir": str(ckpt)}
    _run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
          *cli_args({**TINY_TRAIN, **common})])
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint_final.pt").is_file()
    assert (out / "training_curves.png").stat().st_size > 0
    history = json.load(open(out / "training_history.json"))
    rows = history if isinstance(history, list) else history.get("epochs", history)
    assert len(rows) == TINY_TRAIN["epochs"]

    _run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(CONFIGS / "inference.yaml"),
          *cli_args({**TINY_INFER, **common})])
    cases = data.test_datalist(tiny_dataset)
    expected = {Path(c["image"]).name.split(".")[0]: read_volume_shape(c["image"]) for c in cases}
    check_submission(out / "submission.zip", expected)
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == sorted(f"{i}.tif" for i in expected)
    for case in expected:
        mask = read_volume(out / "predictions" / f"{case}.tif")
        assert set(np.unique(mask)) <= {0, 1}
        overlay = out / "overlays" / f"{case}_overlay.png"
        assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



