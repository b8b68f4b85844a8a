"""MONAI model-zoo checks (verify_metadata, verify_net_in_out, ckpt_export to TorchScript) for every architecture,
and models that carry their plans: trained with non-default settings, then inferred, evaluated, tuned and exported
from another directory with only --model_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

from pipeline.model.networks import build_network
from pipeline.model.plans import load_model_file, make_plans, pack_model
from tests.conftest import cli_args

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
META = str(CONFIGS / "metadata.json")
SCHEMA = REPO / "bundle" / "eval" / "schema.json"


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_metadata_verifies_offline_against_the_shipped_schema(tmp_path):
    proc = _run(["-m", "monai.bundle", "verify_metadata", "--meta_file", META, "--filepath", str(SCHEMA)], tmp_path)
    log = proc.stdout + proc.stderr
    assert "skipped downloading" in log and "metadata is verified with no error" in log
    meta = json.loads(Path(META).read_text())
    assert list(meta["network_data_format"]["inputs"]) == ["image"] and list(meta["network_data_format"]["outputs"]) == ["pred"]
    assert meta["version"] in meta["changelog"]
    # the schema has teeth: what the zoo refuses is refused
    for broken in ({"network_data_format": {"inputs": {}}}, {"version": 2}, {"authors": None}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**meta, **broken}))
        with pytest.raises(ValueError, match="Failed validating"):
            verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))
    tensor = {**meta["network_data_format"]["inputs"]["image"], "value_range": ["z-score"]}
    bad.write_text(json.dumps({**meta, "network_data_format": {**meta["network_data_format"], "inputs": {"image": tensor}}}))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


@pytest.mark.parametrize("architecture", ["unet", "dynunet", "segresnet"])
def test_verify_net_in_out_and_torchscript_export_for_each_architecture(architecture, tmp_path):
    # the zoo's checks on train.yaml's network_def (built from the keys), then on a model file through inference.yaml
    verify_net_in_out("network_def", meta_file=META, config_file=str(CONFIGS / "train.yaml"), device="cpu",
                      architecture=architecture)
    torch.manual_seed(0)
    net = build_network(architecture, channels=[4, 8, 16, 32], strides=[2, 2, 2], num_res_units=1)
    model = tmp_path / "model.pt"
    torch.save(pack_model(net.state_dict(), make_plans(net, [32, 32, 32])), model)
    verify_net_in_out("network_def", meta_file=META, config_file=str(CONFIGS / "inference.yaml"), device="cpu",
                      model_path=str(model))
    exported = tmp_path / "model.ts"
    ckpt_export("network_def", filepath=str(exported), ckpt_file=str(model), meta_file=META,
                config_file=str(CONFIGS / "inference.yaml"), model_path=str(model))  # no key_in_ckpt, as the zoo
    _same_as_eager(exported, model)


def _same_as_eager(exported: Path, model: Path) -> None:
    """The TorchScript file (scripted, not traced) computes what the network of the model file computes."""
    scripted = torch.jit.load(str(exported), _extra_files={"metadata.json": ""})
    state, plans = load_model_file(model)
    net = build_network(**plans["network"])
    net.load_state_dict(state)
    net.eval()
    x = torch.rand(1, 1, 32, 48, 32)  # another shape than any the export saw: a trace would have fixed one
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


TRAIN = {"epochs": 1, "val_interval": 1, "patch_size": [32, 32, 32], "batch_size": 1, "num_samples": 1,
         "num_res_units": 1, "sw_batch_size": 2, "amp": False, "val_score": False, "training_curves": False,
         "tensorboard_preview": False, "progress": "log"}


@pytest.mark.parametrize(
    "network",
    [
        {"network_channels": [8, 16, 32], "network_strides": [2, 2]},  # a UNet with non-default channels
        {"architecture": "dynunet", "network_channels": [4, 8, 16, 32], "network_strides": [2, 2, 2]},
    ],
    ids=["unet-8-16-32", "dynunet"],
)
def test_a_trained_model_runs_everywhere_from_its_file_alone(network, tiny_dataset, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # not the repository: every path comes from bundle_root or the command line
    elsewhere.mkdir()
    models, out = tmp_path / "models", tmp_path / "out"
    common = {"dataset_dir": str(tiny_dataset), "output_dir": str(out)}
    _run(["-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
          *cli_args({**TRAIN, **network, **common, "ckpt_dir": str(models)})], elsewhere)
    model = models / "model.pt"
    _, plans = load_model_file(model)
    assert plans["network"]["channels"] == network["network_channels"]
    assert plans["network"]["architecture"] == network.get("architecture", "unet")
    assert load_model_file(models / "checkpoint_final.pt")[1] == plans  # every checkpoint carries them too

    only = {**common, "model_path": str(model), "amp": False}  # no network setting, no patch size
    _run(["-m", "monai.bundle", "run", "inference", "--config_file", str(CONFIGS / "inference.yaml"),
          *cli_args({**only, "overlays": False})], elsewhere)
    assert (out / "submission.zip").is_file()
    evaluate = f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'evaluate.yaml'}']"
    _run(["-m", "monai.bundle", "run", "evaluating", "--config_file", evaluate, *cli_args(only)], elsewhere)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["network"] == plans["network"] and metrics["settings"]["patch_size"] == [32, 32, 32]
    _run(["-m", "pipeline", "tune", *cli_args(only), "--grid_threshold", "0.4,0.6", "--grid_hysteresis_high", "none",
          "--grid_closing_radius", "0", "--grid_plug_holes", "true", "--grid_min_size", "0"], elsewhere)
    tuned = load_model_file(model)[1]["postprocessing"]
    assert tuned == {k: json.loads((out / "tuning.json").read_text())["best"][k] for k in tuned}
    exported = tmp_path / "model.ts"
    _run(["-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file", str(model),
          "--meta_file", META, "--config_file", str(CONFIGS / "inference.yaml"),
          "--model_path", str(model)], elsewhere)
    _same_as_eager(exported, model)
    assert not list(elsewhere.iterdir())  # nothing written relative to the working directory
