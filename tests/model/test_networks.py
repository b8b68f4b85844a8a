"""The network by one key, DynUNet's deep supervision (nnU-Net's weights, label 2 ignored at every scale) and the
plans saved with the weights (pipeline/model/networks.py, pipeline/training/losses.py, pipeline/model/plans.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events
from monai.handlers import CheckpointLoader

from pipeline.model.networks import build_network, network_settings
from pipeline.model.plans import (
    load_model_file,
    make_plans,
    resolve_plans,
    save_postprocessing,
)
from pipeline.training.checkpoint import BestModelSaver
from pipeline.training.engine import Trainer
from pipeline.training.losses import (
    DeepSupervisionLoss,
    MaskedDiceBCELoss,
    deep_supervision_weights,
)
from pipeline.utils.errors import MissingFileError, SettingsError

POST = {"threshold": 0.5, "hysteresis_low": None, "hysteresis_high": None, "closing_radius": 0, "plug_holes": True,
        "min_size": 0}
SMALL = {"channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 1}


@pytest.mark.parametrize("architecture", ["unet", "dynunet", "segresnet"])
def test_each_architecture_maps_a_patch_to_one_channel_of_logits(architecture):
    torch.manual_seed(0)
    net = build_network(architecture, **SMALL)
    assert network_settings(net)["architecture"] == architecture
    x = torch.rand(2, 1, 16, 24, 32)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 1, 16, 24, 32)
    net.train()
    out = net(x)
    # dynunet in training: the main output and the heads of levels 1 .. len(channels) - 2, stacked on dim 1
    assert out.shape == ((2, 3, 1, 16, 24, 32) if architecture == "dynunet" else (2, 1, 16, 24, 32))


def test_dynunet_is_nnunets_network_with_residual_blocks():
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

    net = build_network("dynunet", channels=[8, 16, 32], strides=[2, 2], num_res_units=2, deep_supervision=False)
    assert net.filters == [8, 16, 32] and net.strides == [1, 2, 2] and net.upsample_kernel_size == [2, 2]
    assert isinstance(net.input_block, UnetResBlock) and not net.deep_supervision
    plain = build_network("dynunet", channels=[8, 16, 32], strides=[2, 2], num_res_units=0)
    assert isinstance(plain.input_block, UnetBasicBlock)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"architecture": "nnunet"}, "architecture 'nnunet' unknown"),
        ({"architecture": "dynunet", "channels": [8, 16], "strides": [2]}, "network_channels [8, 16]: dynunet needs at least 3"),
        ({"channels": [8, 16, 32], "strides": [2, 2, 2]}, "network_strides [2, 2, 2]: unet takes one stride per level"),
        ({"architecture": "segresnet", "channels": [8, 16, 24], "strides": [2, 2]}, "network_channels [8, 16, 24]: segresnet doubles"),
        ({"architecture": "segresnet", "channels": [8, 16, 32], "strides": [2, 1]}, "network_strides [2, 1]: segresnet"),
        ({"num_res_units": -1}, "num_res_units -1"),
        ({"channels": [8, 0]}, "network_channels [8, 0]"),
    ],
)
def test_settings_no_network_can_be_built_with_are_one_line_naming_the_key(kwargs, expected):
    with pytest.raises(SettingsError) as info:
        build_network(**kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_deep_supervision_weights_are_nnunets():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == [1.0, 0.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])


def test_deep_supervision_loss_weights_every_head_against_the_full_resolution_label():
    torch.manual_seed(0)
    heads = torch.randn(2, 3, 1, 8, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    single = MaskedDiceBCELoss(ignore_index=2)
    loss = DeepSupervisionLoss(single)
    expected = sum(w * single(heads[:, i], label) for i, w in enumerate(deep_supervision_weights(3)))
    assert loss(heads, label) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss(heads, label)) != pytest.approx(float(single(heads[:, 0], label)), rel=1e-3)  # heads count
    assert loss(heads[:, 0], label) == single(heads[:, 0], label)  # one output: the loss itself
    # label 2 stays ignored at every scale: changing any head's logits where the label is 2 changes nothing
    changed = heads.clone()
    changed[:, 1:][(label == 2).unsqueeze(1).expand_as(changed[:, 1:])] = 50.0
    assert loss(changed, label) == pytest.approx(float(loss(heads, label)), rel=1e-6)
    # every head's parameters get a gradient (DDP), the lowest one a zero gradient
    logits = heads.clone().requires_grad_(True)
    loss(logits, label).backward()
    assert logits.grad[:, 2].abs().max() == 0 and logits.grad[:, 1].abs().max() > 0


def test_trainer_feeds_the_stacked_heads_to_the_loss_and_the_main_head_to_handlers():
    torch.manual_seed(0)
    net = build_network("dynunet", **SMALL)
    seen = []

    def loss_fn(pred, label):
        seen.append(tuple(pred.shape))
        return DeepSupervisionLoss(MaskedDiceBCELoss())(pred, label)

    data = [{"image": torch.rand(1, 1, 16, 16, 16), "label": torch.randint(0, 3, (1, 1, 16, 16, 16)).float()}]
    trainer = Trainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                      optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=loss_fn, amp=False,
                      decollate=False)
    after = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: after.append(tuple(e.state.output["pred"].shape)))
    trainer.run()
    assert seen == [(1, 3, 1, 16, 16, 16)] and after == [(1, 1, 16, 16, 16)]
    assert all(p.grad is not None for p in net.parameters())  # every head in the graph: DDP needs no unused params


def _model_file(tmp_path, architecture="unet", postprocessing=None, **kwargs):
    torch.manual_seed(0)
    net = build_network(architecture, **{**SMALL, **kwargs})
    path = tmp_path / f"{architecture}.pt"
    torch.save({"model": net.state_dict(), "plans": make_plans(net, [32, 32, 32], postprocessing)}, path)
    return net, path


def test_best_model_saver_writes_weights_and_plans_that_monai_checkpoint_loader_reads(tmp_path):
    from ignite.engine import Engine

    torch.manual_seed(0)
    net = build_network("dynunet", **SMALL)
    plans = make_plans(net, [32, 32, 32])
    engine = Engine(lambda e, b: None)
    engine.state.best_metric_epoch = engine.state.epoch = 1
    engine.state.key_metric_name, engine.state.best_metric = "val_dice", 0.5
    BestModelSaver(tmp_path / "model.pt", net, plans=plans)(engine)
    state, saved = load_model_file(tmp_path / "model.pt")
    assert saved == plans and saved["network"]["architecture"] == "dynunet" and saved["patch_size"] == [32, 32, 32]
    assert saved["normalization"]["method"] == "zscore_volume" and saved["ignore_label"] == 2
    assert set(saved["labels"]) == {"0", "1", "2"} and saved["postprocessing"] is None
    other = build_network("dynunet", **SMALL)
    CheckpointLoader(str(tmp_path / "model.pt"), {"model": other})(Engine(lambda e, b: None))  # the whole file
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


def test_resolve_takes_the_files_values_and_refuses_a_different_explicit_one(tmp_path):
    _, path = _model_file(tmp_path, "dynunet")
    plans = resolve_plans(path, {"architecture": None, "network_channels": [4, 8, 16, 32]}, None, {}, POST)
    assert plans["network"]["architecture"] == "dynunet" and plans["patch_size"] == [32, 32, 32]
    assert plans["postprocessing"] == POST  # no tuned setting in the file: the defaults
    with pytest.raises(SettingsError) as info:
        resolve_plans(path, {"architecture": "unet"}, None, {}, POST)
    assert str(info.value) == (
        f"{path}: architecture 'unet' given, but the model in this file was trained with architecture 'dynunet'; "
        "leave --architecture out (the file's value is used)"
    )
    assert plans["roi_size"] == [32, 32, 32]  # the sliding window is the training patch unless one is given
    wider = resolve_plans(path, {}, [64, 64, 64], {}, POST)  # a larger window is a choice, not a mismatch
    assert wider["roi_size"] == [64, 64, 64] and wider["patch_size"] == [32, 32, 32]
    with pytest.raises(MissingFileError, match="none.pt: not found; train a model first"):
        resolve_plans(tmp_path / "none.pt", {}, None, {}, POST)


def test_postprocessing_explicit_wins_over_the_files_which_wins_over_the_defaults(tmp_path):
    tuned = {**POST, "threshold": 0.35, "min_size": 100}
    _, path = _model_file(tmp_path, postprocessing=tuned)
    assert resolve_plans(path, {}, None, {}, POST)["postprocessing"] == tuned
    assert resolve_plans(path, {}, None, {"threshold": 0.7}, POST)["postprocessing"] == {**tuned, "threshold": 0.7}


def test_weights_only_files_load_with_the_given_settings_and_a_warning_and_tune_upgrades_them(tmp_path, caplog):
    torch.manual_seed(0)
    legacy = build_network("unet", channels=[4, 8, 16], strides=[2, 2], num_res_units=1, deep_supervision=False)
    path = tmp_path / "old.pt"
    torch.save(legacy.state_dict(), path)  # bundle 0.1.0's model.pt
    with caplog.at_level(logging.WARNING):
        plans = resolve_plans(path, {"network_channels": [4, 8, 16], "network_strides": [2, 2], "num_res_units": 1},
                              None, {}, POST)
    assert "weights only, no plans" in caplog.text
    assert plans["network"] == network_settings(legacy) and plans["patch_size"] == [64, 64, 64]
    state, stored = load_model_file(path)
    assert stored is None and build_network(**plans["network"]).load_state_dict(state)
    save_postprocessing(path, {**POST, "threshold": 0.4}, {"score": 0.5}, plans=plans)
    state, stored = load_model_file(path)
    assert stored["network"] == plans["network"] and stored["postprocessing"]["threshold"] == 0.4
    assert resolve_plans(path, {}, None, {}, POST)["network"] == plans["network"]  # no setting needed any more


def test_resume_refuses_a_checkpoint_of_another_network(tmp_path):
    from pipeline.utils.errors import CheckpointDirError
    from tests._ckpt_worker import build

    setup = build(tmp_path / "models", seed=0, max_epochs=1)
    setup.trainer.run()
    ckpt = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)
    ckpt["plans"] = {"network": {"architecture": "dynunet"}}
    torch.save(ckpt, tmp_path / "models" / "checkpoint_final.pt")
    again = build(tmp_path / "models", seed=0, max_epochs=2)
    again.checkpointer.plans = {"network": {"architecture": "unet"}}
    with pytest.raises(CheckpointDirError, match="holds a run of another network .architecture 'dynunet' there, 'unet' now"):
        again.trainer.run()
