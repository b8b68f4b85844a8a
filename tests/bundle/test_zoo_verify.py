"""Project-MONAI/model-zoo's ``ci/verify_bundle.py -b <bundle> -m full``, check by check, with the MONAI calls and
arguments it makes (not vendored), on a copy of the bundle in the zoo's layout; and the model file layouts that the
zoo's TorchScript check, MONAI's CheckpointLoader and this project's loaders must all read."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
from monai.handlers import CheckpointLoader

from pipeline.model.networks import build_network
from pipeline.model.plans import (
    load_model_file,
    make_plans,
    pack_model,
    read_plans,
    save_postprocessing,
)

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundle"
TINY = {"architecture": "unet", "channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 1}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(**TINY)


def _write(path: Path, layout: str) -> dict:
    """model.pt as BestModelSaver writes it now ("packed"), as bundle 0.2.0-0.3.0 did ("nested"), or as 0.1.0 did."""
    net = _net()
    plans = make_plans(net, [32, 32, 32])
    obj = {"packed": lambda: pack_model(net.state_dict(), plans),
           "nested": lambda: {"model": net.state_dict(), "plans": plans},
           "weights": lambda: net.state_dict()}[layout]()
    torch.save(obj, path)
    return {"state": net.state_dict(), "plans": plans}


@pytest.fixture
def zoo_bundle(tmp_path) -> Path:
    """models/<bundle>/ as the zoo holds it: configs/, LICENSE, eval/schema.json, docs/, models/model.pt."""
    bundle = tmp_path / "models" / "vesuvius"
    for part in ("configs", "eval", "docs"):
        shutil.copytree(BUNDLE / part, bundle / part)
    shutil.copy(BUNDLE / "LICENSE", bundle / "LICENSE")
    (bundle / "models").mkdir()
    _write(bundle / "models" / "model.pt", "packed")
    return bundle


def test_verify_bundle_full(zoo_bundle):
    b = str(zoo_bundle)
    meta_file, config_file = f"{b}/configs/metadata.json", f"{b}/configs/inference.yaml"
    # verify_bundle_directory: necessary files, then the preferred ones (an inference.{json,yaml,yml})
    assert (zoo_bundle / "configs/metadata.json").is_file() and (zoo_bundle / "LICENSE").is_file()
    assert (zoo_bundle / "models/model.pt").is_file()
    assert [s for s in ("json", "yaml", "yml") if (zoo_bundle / f"configs/inference.{s}").is_file()] == ["yaml"]
    # verify_version_changes (the zoo also refuses a <bundle>_v<version> already in its model_info.json)
    meta = json.loads((zoo_bundle / "configs/metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    # verify_metadata_format
    verify_metadata(meta_file=meta_file, filepath=f"{b}/eval/schema.json")
    # verify_bundle_properties: only for the apps of supported_apps with a bundle_properties.py; none here
    assert not meta.get("supported_apps")
    # verify_data_shape (device: cuda:0 if available, else cpu)
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, bundle_root=b)
    # verify_torchscript: no key_in_ckpt, so model.pt must load as it is into network_def
    ts = f"{b}/models/verify_model.ts"
    ckpt_export(net_id="network_def", filepath=ts, ckpt_file=f"{b}/models/model.pt", meta_file=meta_file,
                config_file=config_file, bundle_root=b)
    scripted = torch.jit.load(ts)
    net = _net().eval()
    x = torch.rand(1, 1, 32, 48, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "nested", "weights"])
def test_every_model_file_layout_loads(layout, tmp_path):
    path = tmp_path / "model.pt"
    saved = _write(path, layout)
    state, plans = load_model_file(path)
    expected = None if layout == "weights" else saved["plans"]
    assert plans == expected and read_plans(path) == expected
    assert state.keys() == saved["state"].keys() and all(torch.equal(state[k], v) for k, v in saved["state"].items())
    # inference.yaml's / evaluate.yaml's CheckpointLoader(load_dict={"model": net})
    net = build_network(**TINY)
    CheckpointLoader(str(path), {"model": net}, map_location="cpu")(Engine(lambda e, b: None))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved["state"].items())
    # ckpt_export as verify_bundle.py calls it (no key_in_ckpt): only the plain layouts; the nested one needs the key
    raw = torch.load(path, weights_only=True)
    if layout == "nested":
        with pytest.raises(RuntimeError, match="Unexpected key"):
            build_network(**TINY).load_state_dict(raw)
    else:
        assert isinstance(raw, OrderedDict) and all(isinstance(v, torch.Tensor) for v in raw.values())
        build_network(**TINY).load_state_dict(raw)  # strict


def test_pack_model_keeps_module_metadata_and_moves_to_cpu():
    net = _net()
    packed = pack_model(net.state_dict(), {"format": 1})
    assert packed._metadata[""] == {"version": 1, "plans": {"format": 1}}
    assert packed._metadata.keys() == net.state_dict()._metadata.keys()
    assert all(v.device.type == "cpu" for v in packed.values())
    assert pack_model(packed, None)._metadata[""] == {"version": 1}  # weights only


def test_tune_rewrites_an_old_nested_file_as_a_plain_state_dict(tmp_path):
    path = tmp_path / "model.pt"
    saved = _write(path, "nested")
    setting = {"threshold": 0.4, "hysteresis_low": None, "hysteresis_high": None, "closing_radius": 1,
               "plug_holes": True, "min_size": 0}
    save_postprocessing(path, setting, {"score": 0.5})
    raw = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in raw.values())
    state, plans = load_model_file(path)
    assert plans["postprocessing"] == setting and plans["tuning"] == {"score": 0.5}
    assert plans["network"] == saved["plans"]["network"]
    assert all(torch.equal(state[k], v) for k, v in saved["state"].items())
