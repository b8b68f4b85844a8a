"""Tests for pipeline.evaluation.tune (``python -m pipeline tune``): post-processing sweep on cached probabilities."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli.main import parse_overrides
from pipeline.cli.tune import main
from pipeline.data.datalist import prepare_datalists
from pipeline.evaluation.score import COMPONENT_KEYS
from pipeline.evaluation.tune import SweepGrid, format_overrides
from pipeline.model.plans import POSTPROCESSING_KEYS as SETTING_KEYS
from pipeline.model.plans import load_model_file
from tests.conftest import TINY_NETWORK, cli_args

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
# a setting for the grid's unit tests
DEFAULT = {
    "threshold": 0.5,
    "hysteresis_low": None,
    "hysteresis_high": None,
    "closing_radius": 0,
    "plug_holes": True,
    "min_size": 0,
}
# the post-processing setting inference.yaml ships with (for a model file tune has not written into)
SHIPPED = yaml.safe_load(open(CONFIGS / "inference.yaml"))["postprocessing_defaults"]


def test_grid_puts_the_default_first_once_and_skips_impossible_hysteresis():
    grid = SweepGrid(threshold=(0.5, 0.9), hysteresis_high=(None, 0.85), closing_radius=(0,), plug_holes=(False, True),
                     min_size=(0, 10))
    settings = grid.settings(DEFAULT)
    assert settings[0] == DEFAULT
    # 0.9 with high 0.85 is skipped: (2 thresholds x 2 - 1) x 2 plug x 2 sizes, the default among them
    assert len(settings) == 12
    assert len({json.dumps(s, sort_keys=True) for s in settings}) == len(settings)
    assert all(s["hysteresis_high"] is None or s["hysteresis_high"] > s["threshold"] for s in settings)
    assert len(grid.settings({**DEFAULT, "min_size": 77})) == 13
    with pytest.raises(ValueError, match="'min_size' is empty"):
        SweepGrid(min_size=()).settings()
    with pytest.raises(ValueError, match="lacks"):
        grid.settings({"threshold": 0.5})


def test_printed_overrides_parse_back_to_the_setting():
    setting = {**DEFAULT, "threshold": 0.4, "hysteresis_high": 0.85, "plug_holes": False, "min_size": 1000}
    assert parse_overrides(shlex.split(format_overrides(setting))) == setting


def test_tune_reports_best_setting_that_evaluating_reproduces(tiny_dataset, tiny_model_dir, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)  # from anywhere, with no network setting: the model file has them
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models)  # tune writes into the model file
    before_state, before_plans = load_model_file(models / "model.pt")
    out = tmp_path / "tune"
    grid = ["--grid_threshold", "0.3,0.5,0.7", "--grid_hysteresis_high", "none,0.9", "--grid_closing_radius", "0,1",
            "--grid_plug_holes", "true", "--grid_min_size", "0,200"]
    common = {"dataset_dir": tiny_dataset, "ckpt_dir": models, "amp": False}
    assert main([*cli_args({**common, "output_dir": out}), *grid]) == 0
    printed = capsys.readouterr().out
    report = json.load(open(out / "tuning.json"))

    rows, best, default = report["rows"], report["best"], report["default"]
    assert len(rows) == len(SweepGrid((0.3, 0.5, 0.7), (None, 0.9), (0, 1), (True,), (0, 200)).settings(SHIPPED))
    assert best == rows[0] and best["score"] == max(r["score"] for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert {k: default[k] for k in SETTING_KEYS} == SHIPPED  # the bundle's (inference.yaml's) setting
    assert best["score"] >= default["score"]
    val_ids = sorted(c["id"] for c in prepare_datalists(tiny_dataset, check=False)["val"])
    assert report["volumes"] == val_ids and sorted(best["volumes"]) == val_ids
    for row in rows:
        assert all(0.0 <= row[k] <= 1.0 for k in COMPONENT_KEYS if k != "voi")
        assert row["score"] == pytest.approx(sum(row["volumes"].values()) / len(val_ids), abs=1e-12)
    assert f"best setting:    score {best['score']:.4f}" in printed
    assert f"inference overrides: {report['overrides']}" in printed

    # the best setting is written into the model file's plans; the weights are unchanged
    after_state, after_plans = load_model_file(models / "model.pt")
    assert after_plans["postprocessing"] == {k: best[k] for k in SETTING_KEYS}
    assert after_plans["tuning"]["score"] == best["score"] and after_plans["tuning"]["volumes"] == val_ids
    assert after_plans["network"] == before_plans["network"]
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert f"wrote the best setting into {models / 'model.pt'}" in printed

    # evaluating that file with no setting at all (the plans give them) reproduces the tuned score, as do the
    # printed overrides pasted into the command
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    configs = f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'evaluate.yaml'}']"
    for name, extra in (("plain", []), ("pasted", shlex.split(report["overrides"]))):
        command = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", configs,
                   *cli_args({**common, "output_dir": tmp_path / name}), *extra]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.load(open(tmp_path / name / "metrics.json"))
        assert {k: metrics["settings"][k] for k in SETTING_KEYS} == {k: best[k] for k in SETTING_KEYS}
        for key in COMPONENT_KEYS:
            assert metrics["mean"][key] == pytest.approx(best[key], abs=1e-9), key
        for case, score in best["volumes"].items():
            assert metrics["volumes"][case]["score"] == pytest.approx(score, abs=1e-9), case


def test_tune_refuses_a_grid_over_the_bound(tiny_dataset, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = [*cli_args({**TINY_NETWORK, "dataset_dir": tiny_dataset, "ckpt_dir": tiny_model_dir, "output_dir": tmp_path}),
            "--max_settings", "5"]
    assert main(argv) == 2
    assert "more than --max_settings 5" in capsys.readouterr().err
    assert not (tmp_path / "tuning.json").exists()


def test_tune_refuses_network_settings_that_differ_from_the_model_file(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    argv = [*cli_args({"dataset_dir": tiny_dataset, "ckpt_dir": tiny_model_dir, "output_dir": tmp_path}),
            "--network_channels", "[8, 16, 32]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (
        f"error: {tiny_model_dir / 'model.pt'}: network_channels [8, 16, 32] given, but the model in this file was "
        "trained with network_channels [4, 8, 16]; leave --network_channels out (the file's value is used)"
    )


def test_tune_without_a_checkpoint_says_what_to_do(tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--dataset_dir", str(tiny_dataset), "--ckpt_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path)]
    assert main(argv) == 2
    assert "model.pt: not found; train a model first" in capsys.readouterr().err


def test_deadline_leaves_the_prediction_its_time_and_stops_scoring_when_passed():
    import time

    import numpy as np

    from pipeline.evaluation.tune import Deadline, TimeUp, score_settings

    deadline = Deadline(end=1000.0, follow_voxels=2_000_000, factor=1.25, margin_s=10.0)
    assert deadline.at(seconds_per_voxel=1e-5) == pytest.approx(1000.0 - 1.25 * 20.0 - 10.0)
    probs = np.random.default_rng(0).random((1, 16, 16, 16)).astype(np.float32)
    label = (probs[0] > 0.5).astype(np.uint8)
    settings = [DEFAULT, {**DEFAULT, "threshold": 0.7}]
    assert len(score_settings(probs, label, settings, deadline=time.time() + 600)) == 2
    with pytest.raises(TimeUp, match="0 of 2 settings scored"):
        score_settings(probs, label, settings, deadline=time.time() - 1)


def test_a_volume_whose_settings_cannot_all_be_scored_in_time_is_given_up_at_once(monkeypatch):
    """Each setting takes 40 s (a 320^3 volume's exact score on a CPU): with 100 s left, the sweep gives the volume
    up after the first setting, when it knows, instead of scoring on until the deadline and overrunning it."""
    import types

    import numpy as np

    from pipeline.evaluation import tune as tune_module

    clock = {"now": 1000.0}

    def slow_score(mask, label):
        clock["now"] += 40.0
        return {"score": 0.5}

    monkeypatch.setattr(tune_module, "score_volume", slow_score)
    monkeypatch.setattr(tune_module, "time", types.SimpleNamespace(time=lambda: clock["now"], monotonic=lambda: clock["now"]))
    probs = np.zeros((1, 8, 8, 8), np.float32)
    settings = [{**DEFAULT, "threshold": t} for t in (0.3, 0.4, 0.5, 0.6)]
    with pytest.raises(tune_module.TimeUp, match="1 of 4 settings scored; the other 3 need ~120 s, 60 s left"):
        tune_module.score_settings(probs, np.zeros((8, 8, 8), np.uint8), settings, deadline=1100.0)
    assert clock["now"] == 1040.0  # given up after one setting, 60 s before the deadline
    clock["now"] = 1000.0
    assert len(tune_module.score_settings(probs, np.zeros((8, 8, 8), np.uint8), settings, deadline=1160.0)) == 4


def test_tune_under_a_passed_deadline_writes_nothing(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """The main job's sweep under time_limit: no time left for one volume is TimeUp, the model file untouched."""
    import time

    from pipeline.cli.tune import tune
    from pipeline.evaluation.tune import Deadline, TimeUp

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models)
    before = (models / "model.pt").read_bytes()
    overrides = {"dataset_dir": str(tiny_dataset), "ckpt_dir": str(models), "output_dir": str(tmp_path / "out"),
                 "amp": False}
    with pytest.raises(TimeUp, match="no volume was scored: time is up at validation volume 1"):
        tune(overrides, SweepGrid((0.5,), (None,), (0,), (True,), (0,)), deadline=Deadline(end=time.time() + 5,
             follow_voxels=10**12))
    assert (models / "model.pt").read_bytes() == before and not (tmp_path / "out" / "tuning.json").exists()


def test_the_sweep_starts_no_volume_that_cannot_be_scored_by_the_cap(monkeypatch):
    """--tune_time's cap (no job limit): the second volume would take as long as the first (80 s) with 20 s left,
    so the sweep stops before it and ranks on the first."""
    import math
    import types

    import numpy as np
    import torch

    from pipeline.evaluation import tune as tune_module

    assert tune_module.Deadline(end=math.inf, cap=100.0).at(1e-5) == 100.0
    assert tune_module.Deadline(end=1000.0, follow_voxels=10**6, margin_s=0.0, cap=5000.0).at(1e-5) == 1000.0 - 12.5
    clock = {"now": 1000.0}

    def slow_score(mask, label):
        clock["now"] += 40.0
        return dict.fromkeys(tune_module.COMPONENT_KEYS, 0.5)

    monkeypatch.setattr(tune_module, "score_volume", slow_score)
    monkeypatch.setattr(tune_module, "time", types.SimpleNamespace(time=lambda: clock["now"], monotonic=lambda: clock["now"]))
    sweep = tune_module.PostprocessingSweep([DEFAULT, {**DEFAULT, "threshold": 0.7}],
                                            deadline=tune_module.Deadline(end=math.inf, cap=1100.0))
    item = {"pred": torch.zeros(1, 8, 8, 8), "label": torch.zeros(1, 8, 8, 8, dtype=torch.uint8)}
    stopped = []
    engine = types.SimpleNamespace(
        state=types.SimpleNamespace(batch=[{"id": "a"}, {"id": "b"}], output=[item, dict(item)]),
        logger=types.SimpleNamespace(info=lambda *a: None), terminate=lambda: stopped.append(True))
    sweep._start(engine)
    sweep(engine)
    assert list(sweep.scores) == ["a"] and stopped
    assert sweep.stopped == ("time is up at validation volume 2 (b: one takes ~80 s to score, 20 s left); ranked on "
                             "the 1 volume(s) scored in full")
    assert np.isclose(sweep.rows()[0]["score"], 0.5)


def test_join_rows_averages_over_every_volume_of_disjoint_parts():
    from pipeline.evaluation.tune import join_rows

    def row(threshold, volumes, **components):
        base = {**DEFAULT, "threshold": threshold, **dict.fromkeys(COMPONENT_KEYS, 0.0), **components}
        return {**base, "score": sum(volumes.values()) / len(volumes), "volumes": volumes}

    fold0 = [row(0.5, {"a": 0.9, "b": 0.7}, topo=0.2), row(0.6, {"a": 0.6, "b": 0.6}, topo=0.8)]
    fold1 = [row(0.5, {"c": 0.1}, topo=0.5), row(0.6, {"c": 0.9}, topo=0.2)]
    rows = join_rows([fold0, fold1])
    assert [r["threshold"] for r in rows] == [0.6, 0.5]  # 0.7 over a, b, c against 0.5667
    assert rows[0]["score"] == pytest.approx(0.7) and rows[1]["score"] == pytest.approx(1.7 / 3)
    assert rows[0]["topo"] == pytest.approx((2 * 0.8 + 0.2) / 3)  # each part weighted by its volumes
    assert rows[1]["volumes"] == {"a": 0.9, "b": 0.7, "c": 0.1}
    with pytest.raises(ValueError, match=r"\['a'\] scored in two parts"):
        join_rows([fold0, [row(0.5, {"a": 0.3})]])


def test_tune_on_folds_chooses_out_of_fold_and_writes_the_folds_ensemble(tiny_dataset, tiny_model_dir, tmp_path,
                                                                          capsys):
    """``tune --folds all``: each fold's model on its own validation cases (every training case once), the rows
    joined, the folds' ensemble with the best setting in ``ckpt_dir/ensemble.json`` (paths relative: the folder
    travels). A fold without its model, or unfinished, is one line and nothing is written."""
    from pipeline.model.ensemble import read_ensemble

    ckpt = tmp_path / "models"
    for k in (0, 1):
        (ckpt / f"fold_{k}").mkdir(parents=True)
        shutil.copy(tiny_model_dir / "model.pt", ckpt / f"fold_{k}" / "model.pt")
    grid = ["--grid_threshold", "0.45,0.5", "--grid_hysteresis_high", "none", "--grid_closing_radius", "0",
            "--grid_plug_holes", "false", "--grid_min_size", "0"]
    common = [*cli_args({"dataset_dir": tiny_dataset, "ckpt_dir": ckpt, "amp": False, "num_folds": 2}), *grid]
    assert main([*common, "--output_dir", str(tmp_path / "out"), "--folds", "all"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "tuning.json").read_text())
    every = sorted(c["id"] for split in prepare_datalists(tiny_dataset, check=False).values() for c in split)
    by_fold = [sorted(c["id"] for c in prepare_datalists(tiny_dataset, fold=k, num_folds=2, check=False)["val"])
               for k in (0, 1)]
    assert report["folds"] == [0, 1] and report["volumes"] == every == sorted(by_fold[0] + by_fold[1])
    assert not set(by_fold[0]) & set(by_fold[1])
    for r in report["rows"]:
        assert sorted(r["volumes"]) == every
        assert r["score"] == pytest.approx(sum(r["volumes"].values()) / len(every), abs=1e-12)
    spec = json.loads((ckpt / "ensemble.json").read_text())
    assert spec["models"] == ["fold_0/model.pt", "fold_1/model.pt"] and spec["weights"] == [0.5, 0.5]
    assert spec["postprocessing"] == {k: report["best"][k] for k in SETTING_KEYS}
    assert read_ensemble(ckpt / "ensemble.json").models == (ckpt / "fold_0" / "model.pt", ckpt / "fold_1" / "model.pt")
    assert "2 folds' out-of-fold volumes" in printed

    (ckpt / "ensemble.json").unlink()
    torch.save({"trainer": {"epoch": 1, "iteration": 3}}, ckpt / "fold_1" / "checkpoint_final.pt")
    assert main([*common, "--output_dir", str(tmp_path / "bad1"), "--folds", "all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {ckpt / 'fold_1'}: fold 1 is unfinished (1 of ") and len(err) == 1
    (ckpt / "fold_1" / "model.pt").unlink()
    assert main([*common, "--output_dir", str(tmp_path / "bad2"), "--folds", "0,1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {ckpt / 'fold_1' / 'model.pt'}: fold 1 has no model; train it (python -m pipeline --folds 1 "
        f"--ckpt_dir {ckpt}) or leave it out of --folds")
    assert not (ckpt / "ensemble.json").exists() and not (tmp_path / "bad1").exists() and not (tmp_path / "bad2").exists()
    assert main([*common, "--output_dir", str(tmp_path / "bad3"), "--folds", "7"]) == 2
    assert "--folds 7: give 'all' or fold numbers from 0 to 1" in capsys.readouterr().err


def test_sweep_workers_one_per_core_as_memory_allows_and_one_for_small_volumes():
    from pipeline.evaluation.tune import WORKER_BYTES, WORKER_BYTES_PER_VOXEL, sweep_workers

    big = 320**3
    each = WORKER_BYTES + WORKER_BYTES_PER_VOXEL * big
    assert sweep_workers(big, cpus=4, available=29 * 2**30) == 4  # the Kaggle box after training
    assert sweep_workers(big, cpus=4, available=int(2.5 * each)) == 2
    assert sweep_workers(big, cpus=4, available=each // 2) == 1  # never fewer than one
    assert sweep_workers(48**3, cpus=16, available=2**40) == 1
