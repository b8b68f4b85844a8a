"""Test-set inference split over processes (torchrun, 2 gloo ranks) and over machines (num_parts + merge)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.inference.parts import balanced_shares
from pipeline.inference.submission import check_submission
from tests.conftest import TINY_INFER, cli_args
from transforms.io import case_id, read_volume, read_volume_shape

REPO = Path(__file__).resolve().parents[2]
INFER = REPO / "bundle" / "configs" / "inference.yaml"
# a freshly initialised network gives probabilities near 0.5: threshold there so the masks are not empty
PLAIN = {**TINY_INFER, "threshold": 0.5, "closing_radius": 0, "plug_holes": False, "overlays": False}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _infer(prefix: list[str], overrides: dict) -> subprocess.CompletedProcess:
    proc = _run([*prefix, "-m", "monai.bundle", "run", "inference", "--config_file", str(INFER), *cli_args(overrides)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {case_id(p): read_volume(p) for p in sorted(folder.glob("*.tif"))}


@pytest.fixture(scope="module")
def single(tiny_dataset, tiny_model_dir, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("single")
    _infer([sys.executable], {**PLAIN, "dataset_dir": str(tiny_dataset), "output_dir": str(out), "ckpt_dir": str(tiny_model_dir)})
    masks = _masks(out / "predictions")
    assert len(masks) == 2 and all(0 < m.mean() < 1 for m in masks.values())  # not trivially equal
    return masks


def test_balanced_shares_largest_first():
    # 50 -> a, 40 -> b, 30 -> b (40 < 50), 20 -> a (50 < 70), 10 -> a (tie 70/70: the lower share)
    assert balanced_shares([10, 50, 20, 40, 30], 2) == [[0, 1, 2], [3, 4]]
    assert balanced_shares([5], 3) == [[0], [], []]


def test_two_ranks_equal_one_process(single, tiny_dataset, tiny_model_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = _infer(torchrun, {**PLAIN, "dataset_dir": str(tiny_dataset), "output_dir": str(tmp_path), "ckpt_dir": str(tiny_model_dir)})
    masks = _masks(tmp_path / "predictions")
    assert masks.keys() == single.keys()
    for case, mask in masks.items():
        assert np.array_equal(mask, single[case]), case  # bit-equal on the CPU
    expected = {case_id(p): read_volume_shape(p) for p in (tiny_dataset / "test_images").glob("*.tif")}
    check_submission(tmp_path / "submission.zip", expected)
    assert "error" not in proc.stderr.lower()


def test_parts_then_merge_equal_one_process(single, tiny_dataset, tiny_model_dir, tmp_path, capsys):
    from monai.bundle import run

    from pipeline.cli.merge import main as merge

    dirs = []
    for part in (0, 1):
        out = tmp_path / f"part{part}"
        (out / "predictions").mkdir(parents=True)
        (out / "submission.zip").write_bytes(b"an earlier run's zip")  # must never look current
        (out / "predictions" / ".123.tif.1.tmp").write_bytes(b"a killed write")
        run("inference", config_file=str(INFER), **{**PLAIN, "dataset_dir": str(tiny_dataset), "output_dir": str(out),
                                                    "ckpt_dir": str(tiny_model_dir), "num_parts": 2, "part_id": part})
        assert not (out / "submission.zip").exists()  # a part only writes its masks
        assert len(list((out / "predictions").glob("*.tif"))) == 1
        assert not list((out / "predictions").glob(".*.tmp"))
        dirs.append(str(out / "predictions"))
    zip_path = tmp_path / "submission.zip"
    args = ["--dataset_dir", str(tiny_dataset), "--output", str(zip_path), "--pred_dir"]
    capsys.readouterr()
    assert merge([*args, dirs[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "run every part" in err and len(err.splitlines()) == 1 and not zip_path.exists()
    assert merge([*args, *dirs]) == 0
    check_submission(zip_path, {case: mask.shape for case, mask in single.items()})
    for d in dirs:
        for case, mask in _masks(Path(d)).items():
            assert np.array_equal(mask, single[case]), case


def test_main_job_runs_inference_on_nproc_ranks(monkeypatch):
    import argparse

    from pipeline.cli import launch
    from pipeline.cli import main as cli

    seen = {}

    def fake_run(cmd, env):
        seen["cmd"] = cmd
        return 0

    monkeypatch.setattr(launch, "_run_forwarding_signals", fake_run)
    args = argparse.Namespace(nproc=2, nnodes=1, node_rank=0, rdzv_endpoint=None, cuda=False)  # as the survey sets it
    assert cli._infer({"num_parts": 2, "part_id": 1}, args) == 0
    cmd = " ".join(seen["cmd"])
    assert "--nproc_per_node=2" in cmd and " run inference " in cmd and "--num_parts=2" in cmd
    assert "multi_gpu_train.yaml" not in cmd and str(INFER) in cmd  # the training mixin stays out of inference
