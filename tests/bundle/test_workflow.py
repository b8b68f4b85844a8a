"""The bundle through MONAI's workflow API, as the model zoo's ci/unit_tests/test_<bundle>.py run bundles: a
ConfigWorkflow per config with overrides, initialize, check_properties (no missing or wrongly-referenced property),
run, finalize. Tiny volumes (<= 48^3), one epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, create_workflow

from tests.conftest import TINY_NETWORK

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
ZOO_ARGS = {"meta_file": str(CONFIGS / "metadata.json"), "logging_file": str(CONFIGS / "logging.conf")}
FAST = {"amp": False, "sw_batch_size": 2, "num_workers": 0}
TRAIN = {**TINY_NETWORK, **FAST, "epochs": 1, "val_interval": 1, "num_samples": 1, "val_score": False,
         "training_curves": False, "tensorboard_preview": False, "progress": "log"}


@pytest.fixture(scope="module", autouse=True)
def _restore_root_logging():
    """logging.conf (as the zoo passes it) replaces the root logger's handlers: give them back to later tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _check_workflow(workflow: ConfigWorkflow) -> None:
    """ci/unit_tests/utils.py's check_workflow(workflow, check_properties=True)."""
    workflow.initialize()
    assert not workflow.check_properties()  # None or []: nothing required missing, no optional one mis-referenced
    workflow.run()
    workflow.finalize()


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("workflow")
    common = {"dataset_dir": str(tiny_dataset), "output_dir": str(root / "out"), "ckpt_dir": str(root / "models")}
    trainer = ConfigWorkflow(config_file=str(CONFIGS / "train.yaml"), workflow_type="train", **ZOO_ARGS,
                             **TRAIN, **common)
    _check_workflow(trainer)
    raw = torch.load(root / "models" / "model.pt", weights_only=True)  # a plain state dict, plans in its metadata
    assert all(isinstance(v, torch.Tensor) for v in raw.values())
    assert raw._metadata[""]["plans"]["patch_size"] == [32, 32, 32]
    return common


def test_train_workflow_properties_and_run(trained):
    # the TrainProperties MONAI exposes resolve to the bundle's objects
    wf = create_workflow(config_file=str(CONFIGS / "train.yaml"), workflow_type="train", **ZOO_ARGS, **TRAIN,
                         **{**trained, "ckpt_dir": trained["ckpt_dir"] + "_props"})
    assert wf.check_properties() == []
    assert wf.max_epochs == 1 and wf.train_handlers[4] is wf.parser.get_parsed_content("throughput_monitor")
    assert wf.train_preprocessing is wf.train_dataset.transform and wf.val_preprocessing is wf.val_dataset.transform


def test_infer_workflow_properties_and_run(trained):
    model = trained["ckpt_dir"] + "/model.pt"
    inferrer = ConfigWorkflow(config_file=str(CONFIGS / "inference.yaml"), workflow_type="infer", **ZOO_ARGS, **FAST,
                              **trained, model_path=model, overlays=False)
    _check_workflow(inferrer)
    assert Path(trained["output_dir"], "submission.zip").is_file()


def test_evaluate_workflow_properties(trained):
    # the zoo checks train.yaml + evaluate.yaml as a "train" workflow (evaluate overrides parts of train.yaml)
    wf = create_workflow(config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")],
                         workflow_type="train", **ZOO_ARGS, **FAST, **trained, val_max_cases=1)
    assert wf.check_properties() == []
