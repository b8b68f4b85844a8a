"""Shared fixtures: a tiny synthetic dataset (volumes <= 48^3) generated once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "bundle" / "configs"

# the machines are 2-core and shared: keep each test process to one thread unless a test asks for more
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_SHAPES = ((40, 36, 44), (36, 40, 32), (33, 41, 38))

# bundle overrides that make the real configs train in seconds on tiny data
TINY_TRAIN = {
    "epochs": 2,
    "val_interval": 1,
    "patch_size": [32, 32, 32],
    "batch_size": 1,
    "num_samples": 2,
    "network_channels": [4, 8, 16],
    "network_strides": [2, 2],
    "num_res_units": 1,
    "sw_batch_size": 2,
    "amp": False,
}
TINY_NETWORK = {k: TINY_TRAIN[k] for k in ("patch_size", "network_channels", "network_strides", "num_res_units")}
TINY_INFER = {
    "patch_size": [32, 32, 32],
    "network_channels": [4, 8, 16],
    "network_strides": [2, 2],
    "num_res_units": 1,
    "sw_batch_size": 2,
    "amp": False,
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from pipeline.data.synth import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("data") / "tiny"
    return generate_dataset(out, SynthConfig(n_train=5, n_test=2, shapes=TINY_SHAPES, n_scrolls=2, seed=1))


def cli_args(overrides: dict) -> list[str]:
    """Bundle overrides as ``--key value`` command-line arguments (lists as JSON)."""
    return [arg for k, v in overrides.items() for arg in (f"--{k}", json.dumps(v) if isinstance(v, list) else str(v))]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ckpt_dir holding model.pt: a freshly initialised tiny network and its plans, as train.yaml saves them."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update(TINY_NETWORK)
    torch.manual_seed(0)
    ckpt_dir = tmp_path_factory.mktemp("models")
    net = parser.get_parsed_content("network_def")
    from pipeline.model.plans import pack_model

    torch.save(pack_model(net.state_dict(), parser.get_parsed_content("plans")), ckpt_dir / "model.pt")
    return ckpt_dir
