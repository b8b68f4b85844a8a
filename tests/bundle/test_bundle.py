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

from pipeline.data import datalist as data
from pipeline.inference.submission import check_submission
from tests.conftest import TINY_INFER, TINY_TRAIN, cli_args
from transforms.io import read_volume, read_volume_shape

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"


def _run(args: list[str], timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
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


def test_metadata_names_every_runtime_package_with_a_tested_version_and_measured_metrics():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    meta = json.load(open(CONFIGS / "metadata.json"))
    lines = [line.split("#", 1)[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("-")]
    tested = {canonicalize_name(k): v for k, v in meta["required_packages_version"].items()}
    own = {"torch": meta["pytorch_version"], "monai": meta["monai_version"], "numpy": meta["numpy_version"]}
    for req in requirements:
        version = own.get(req.name) or tested.get(canonicalize_name(req.name))
        assert version is not None, f"metadata.json lacks {req.name}"
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} outside {req.specifier}"
    assert set(tested) == {canonicalize_name(r.name) for r in requirements} - set(own)
    assert meta["eval_metrics"] and all(isinstance(v, float) for v in meta["eval_metrics"].values())


def test_configs_name_no_file_relative_to_the_working_directory():
    for path in CONFIGS.glob("*.yaml"):
        assert '"%' not in path.read_text(), f"{path.name}: a %file macro is read relative to the working directory"
    train = yaml.safe_load(open(CONFIGS / "train.yaml"))
    inference = yaml.safe_load(open(CONFIGS / "inference.yaml"))
    # training builds the network from its keys; inference and evaluation from the model file's plans
    assert train["network_def"]["_target_"] == "pipeline.model.networks.build_network"
    evaluate = yaml.safe_load(open(CONFIGS / "evaluate.yaml"))
    assert inference["network_def"] == evaluate["network_def"] == "$pipeline.model.plans.build_from_plans(@model_plans)"
    # the same resolution of the file's plans in both (evaluate also checks train.yaml's deep_supervision key)
    assert evaluate["model_plans"] == inference["model_plans"]
    assert evaluate["postprocessing_settings"] == inference["postprocessing_settings"]
    assert evaluate["network_settings"] == {**inference["network_settings"], "deep_supervision": "@deep_supervision"}



def test_multi_gpu_mixin_only_overrides_keys():
    """multi_gpu_train.yaml copies no block of train.yaml: train.yaml's own initialize does the distributed steps
    when there are several processes, and they are no-ops in one."""
    train = yaml.safe_load(open(CONFIGS / "train.yaml"))
    mixin = yaml.safe_load(open(CONFIGS / "multi_gpu_train.yaml"))
    assert not {"initialize", "run", "training", "imports"} & set(mixin)
    own = {"partition_cache"}  # the mixin's one setting of its own
    assert mixin["distributed"] is True  # a DDP network needs the group even under torchrun --nproc_per_node=1
    for key in set(mixin) - own:
        top = key.split("#", 1)[0]
        assert top in train, f"multi_gpu_train.yaml: {key} overrides nothing in train.yaml"
    steps = " ".join(train["initialize"] + train["run"])
    for step in ("init_distributed", "setup_rank_logging", "seed_rank", "run_and_teardown"):
        assert step in steps


def test_default_paths_follow_bundle_root(tmp_path, monkeypatch):
    from monai.bundle import ConfigParser

    monkeypatch.chdir(tmp_path)
    for name in ("train.yaml", "inference.yaml"):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / name))
        assert parser.get_parsed_content("bundle_root") == str(REPO / "bundle")
        assert parser.get_parsed_content("output_dir") == str(REPO / "outputs")
        assert parser.get_parsed_content("synthetic_dir") == str(REPO / "data" / "synthetic")
        assert parser.get_parsed_content("ckpt_dir") == str(REPO / "bundle" / "models")


def test_default_outputs_go_to_the_working_directory_for_an_installed_bundle(tmp_path, monkeypatch):
    """The copy a wheel installs (pipeline/bundle in site-packages) is no place for outputs: they go to the working
    directory (tests/bundle/test_install.py runs the installed wheel)."""
    from monai.bundle import ConfigParser

    from pipeline.utils import paths

    monkeypatch.setattr(paths, "INSTALLED_BUNDLE", REPO / "bundle")
    monkeypatch.chdir(tmp_path)
    for name in ("train.yaml", "inference.yaml"):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / name))
        assert parser.get_parsed_content("output_dir") == str(tmp_path / "outputs")
        assert parser.get_parsed_content("synthetic_dir") == str(tmp_path / "data" / "synthetic")
        assert parser.get_parsed_content("ckpt_dir") == str(tmp_path / "models")


def test_the_split_follows_split_seed_not_the_training_seed(tiny_dataset):
    from monai.bundle import ConfigParser

    def val_ids(**overrides) -> list[str]:
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.yaml"))
        parser.update({"dataset_dir": str(tiny_dataset), **overrides})
        return [case["id"] for case in parser.get_parsed_content("datalists")["val"]]

    base = val_ids()
    assert val_ids(seed=7) == base  # runs that differ only in seed validate on the same cases
    assert any(val_ids(split_seed=s) != base for s in range(1, 6))


def test_train_then_infer_through_bundle_configs(tiny_dataset, tmp_path):
    out, ckpt, elsewhere = tmp_path / "out", tmp_path / "models", tmp_path / "elsewhere"
    elsewhere.mkdir()  # run from outside the repository: the configs find their files from bundle_root
    common = {"dataset_dir": str(tiny_dataset), "output_dir": str(out), "ckpt_dir": str(ckpt)}
    _run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
          *cli_args({**TINY_TRAIN, **common})], cwd=elsewhere)
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint_final.pt").is_file()
    run = (out / "latest_run").resolve()
    assert run.parent == (out / "runs").resolve() and (ckpt / "run_name.txt").read_text().strip() == run.name
    assert (run / "training_curves.png").stat().st_size > 0 and list(run.glob("events.out.tfevents.*"))
    history = json.load(open(run / "training_history.json"))
    rows = history if isinstance(history, list) else history.get("epochs", history)
    assert len(rows) == TINY_TRAIN["epochs"]

    _run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(CONFIGS / "inference.yaml"),
          *cli_args({**TINY_INFER, **common})], cwd=elsewhere)
    assert not list(elsewhere.iterdir())  # nothing written relative to the working directory
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



