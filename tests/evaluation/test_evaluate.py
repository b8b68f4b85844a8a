"""Tests for bundle/configs/evaluate.yaml and pipeline.evaluation.report: per-volume competition scores of a checkpoint."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser

from pipeline.data.datalist import prepare_datalists
from pipeline.evaluation.report import cross_validation, write_metrics
from pipeline.evaluation.score import COMPONENT_KEYS, score_volume
from pipeline.model.plans import load_model_file
from tests.conftest import TINY_NETWORK, cli_args
from transforms.io import read_volume

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
EVAL_CONFIGS = f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'evaluate.yaml'}']"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_evaluate_yaml_is_a_mixin_with_inference_defaults():
    evaluate = yaml.safe_load(open(CONFIGS / "evaluate.yaml"))
    assert evaluate["evaluating"] == "@run"
    # a mixin overrides keys; it never redefines the blocks it inherits (network_def: built from the model file)
    for block in ("preprocessing", "datalists", "train", "validate"):
        assert block not in evaluate, block
    assert "validate#evaluator" not in evaluate and "validate#dataset" not in evaluate
    keys = ("overlap", "tta", "threshold", "hysteresis_low", "hysteresis_high", "closing_radius", "plug_holes", "min_size",
            "postprocessing_defaults")
    for key in keys:
        assert evaluate[key] == f"$@inference_defaults['{key}']"
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")])
    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.yaml"))
    assert {k: parser.get_parsed_content(k) for k in keys} == {k: inference.get_parsed_content(k) for k in keys}


def test_evaluating_writes_per_volume_scores_equal_to_rescoring_saved_masks(tiny_dataset, tiny_model_dir, tmp_path):
    out, preds = tmp_path / "eval", tmp_path / "eval" / "masks"
    overrides = {**TINY_NETWORK, "amp": False, "dataset_dir": tiny_dataset, "ckpt_dir": tiny_model_dir, "output_dir": out,
                 "pred_dir": preds}
    _run(["-m", "monai.bundle", "run", "evaluating", "--config_file", EVAL_CONFIGS, *cli_args(overrides)])

    labels = {c["id"]: c["label"] for c in prepare_datalists(tiny_dataset, check=False)["val"]}
    val_ids = set(labels)
    columns = [*COMPONENT_KEYS, "dice"]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", *columns]
    assert [r["id"] for r in rows[-1:]] == ["mean"] and {r["id"] for r in rows[:-1]} == val_ids
    report = json.load(open(out / "metrics.json"))
    assert set(report["volumes"]) == val_ids
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary file behind

    for row in rows[:-1]:
        values = report["volumes"][row["id"]]
        for key in columns:
            assert float(row[key]) == pytest.approx(values[key], abs=1e-12)
            if key != "voi":  # VOI is in bits, unbounded; everything else is a [0, 1] score
                assert 0.0 <= values[key] <= 1.0, (key, values[key])
        mask, label = read_volume(preds / f"{row['id']}.tif"), read_volume(labels[row["id"]])
        expected = score_volume(mask, label)
        for key in COMPONENT_KEYS:
            assert values[key] == pytest.approx(expected[key], abs=1e-9), (row["id"], key)
        pred, gt = (mask > 0)[label != 2], label[label != 2] == 1
        assert values["dice"] == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()), abs=1e-6)
    for key in columns:
        mean = sum(v[key] for v in report["volumes"].values()) / len(val_ids)
        assert report["mean"][key] == pytest.approx(mean, abs=1e-12)
        assert float(rows[-1][key]) == pytest.approx(mean, abs=1e-12)

    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.yaml"))
    for key in ("overlap", "tta"):
        assert report["settings"][key] == inference.get_parsed_content(key), key
    # the model file has no tuned post-processing: inference.yaml's defaults, and the network and patch of the file
    for key, value in inference.get_parsed_content("postprocessing_defaults").items():
        assert report["settings"][key] == value, key
    plans = load_model_file(tiny_model_dir / "model.pt")[1]
    assert report["settings"]["network"] == plans["network"] and report["settings"]["patch_size"] == plans["patch_size"]
    assert report["settings"]["model_path"] == str(tiny_model_dir / "model.pt")


def test_evaluating_without_a_checkpoint_says_what_to_do(tmp_path):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")])
    parser.update({"ckpt_dir": str(tmp_path / "none")})
    checks = parser.get("initialize")
    with pytest.raises(RuntimeError) as info:  # MONAI wraps what an expression raises
        parser.get_parsed_content(f"initialize#{len(checks) - 1}")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert "model.pt: not found; train a model first" in str(info.value.__cause__)


def test_write_metrics_means_skip_nan_and_json_has_no_nan(tmp_path):
    volumes = {"a": {"score": 0.5, "dice": float("nan")}, "b": {"score": 0.7, "dice": 0.4}}
    content = write_metrics(tmp_path, volumes, settings={"threshold": 0.5})
    assert content["mean"] == {"score": pytest.approx(0.6), "dice": pytest.approx(0.4)}
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["volumes"]["a"]["dice"] is None
    rows = list(csv.reader(open(tmp_path / "metrics.csv")))
    assert rows[0] == ["id", "score", "dice"] and rows[1] == ["a", "0.5", ""]
    assert rows[3][0] == "mean" and math.isclose(float(rows[3][1]), 0.6)


def test_write_metrics_rejects_ragged_or_empty_tables(tmp_path):
    with pytest.raises(ValueError, match="volume 'b' has metrics"):
        write_metrics(tmp_path, {"a": {"score": 0.5}, "b": {"dice": 0.1}})
    with pytest.raises(ValueError, match="no volumes"):
        write_metrics(tmp_path, {})
    assert not list(tmp_path.iterdir())


def test_cross_validation_joins_the_folds_out_of_fold_tables_each_case_once(tmp_path):
    cases = [{"id": "a", "scroll_id": "1"}, {"id": "b", "scroll_id": "1"}, {"id": "c", "scroll_id": "2"}]
    reports = {
        0: write_metrics(tmp_path / "fold_0", {"a": {"score": 0.5, "dice": 0.8}, "b": {"score": 0.7, "dice": float("nan")}}),
        1: write_metrics(tmp_path / "fold_1", {"c": {"score": 0.9, "dice": 0.6}}),
    }
    paths = {k: tmp_path / f"fold_{k}" / "metrics.json" for k in reports}
    cv = cross_validation(tmp_path, paths, cases)
    assert cv["volumes"]["c"] == {"fold": 1, "scroll_id": "2", "score": 0.9, "dice": 0.6}
    assert cv["mean"] == pytest.approx({"score": 0.7, "dice": 0.7, "cases": 3})  # each case once; NaN left out
    assert cv["scrolls"]["1"] == pytest.approx({"score": 0.6, "dice": 0.8, "cases": 2})
    assert cv["folds"]["0"]["score"] == pytest.approx(0.6) and cv["complete"]
    rows = list(csv.reader((tmp_path / "cross_validation.csv").open()))
    assert rows[0] == ["id", "fold", "scroll_id", "score", "dice"] and [r[0] for r in rows[1:]] == ["a", "b", "c", "mean"]
    assert json.loads((tmp_path / "cross_validation.json").read_text())["mean"]["cases"] == 3

    with pytest.raises(ValueError, match="1 training case.s. scored by no fold: c"):
        cross_validation(tmp_path, {0: paths[0]}, cases)
    assert not cross_validation(tmp_path / "part", {0: paths[0]}, cases, complete=False)["complete"]
    with pytest.raises(ValueError, match="case a was scored by fold 0 already"):
        cross_validation(tmp_path, {0: paths[0], 1: paths[0]}, cases)
    with pytest.raises(ValueError, match="case c is not a training case"):
        cross_validation(tmp_path, paths, cases[:2])
