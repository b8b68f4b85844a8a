"""EMA of the weights (pipeline.training.ema): decay and warm-up, updates only on optimizer steps, and through the real
train.yaml: validation and model.pt use the EMA weights while the raw ones train."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset

from pipeline.training.ema import EMA
from pipeline.training.engine import Trainer
from tests.conftest import CONFIGS, TINY_TRAIN

QUIET = {"training_curves": False, "tensorboard_preview": False, "monitor_resources": False, "val_score": False}


def test_decay_warms_up_then_averages_with_ema_decay() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.5)
    weights = [3.0, -1.0, 5.0, 2.0]

    def step(engine: Engine, batch: float) -> None:
        with torch.no_grad():
            net.weight.fill_(batch)

    engine = Engine(step)
    ema.attach(engine)
    expected = net.weight.item()
    for n, w in enumerate(weights):
        decay = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18.., 0.25, 0.3..: warm-up first, 0.5 once it is reached
        expected = decay * expected + (1 - decay) * w
    engine.run(weights, max_epochs=1)
    assert ema.num_updates == 4 and engine.state.ema_momentum == pytest.approx(1 - min(0.5, 4 / 13))
    assert ema.ema_model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert not ema.ema_model.weight.requires_grad and not ema.ema_model.training
    assert EMA(net, decay=0.999).current_decay() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        EMA(net, decay=1.0)


def test_updates_once_per_optimizer_step_with_accumulation() -> None:
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 4, 4, 4, generator=g), "label": torch.randn(1, 4, 4, 4, generator=g)} for _ in range(5)]
    net = torch.nn.Conv3d(1, 1, 1)
    trainer = Trainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=DataLoader(Dataset(data), batch_size=1),
                      network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
                      amp=False, decollate=False, accumulation_steps=2)
    ema = EMA(net, decay=0.9)
    ema.attach(trainer)
    stepped = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stepped.append(e.stepped_optimizer()))
    trainer.run()
    assert stepped == [False, True, False, True, True] * 2  # every 2nd micro-step and the epoch's last
    assert ema.num_updates == 6


def _parser(dataset: Path, root: Path, **extra) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({**TINY_TRAIN, **QUIET, "dataset_dir": str(dataset), "output_dir": str(root / "out"),
                   "cache_dir": str(root / "store"), "ckpt_dir": str(root / "models"), **extra})
    parser.get_parsed_content("imports")
    return parser


def test_validation_and_best_model_use_the_ema_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    dataset = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    parser = _parser(dataset, tmp_path, ema=True, ema_decay=0.9, epochs=1)
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    ema, network = parser.get_parsed_content("ema_handler"), parser.get_parsed_content("network")
    evaluator = parser.get_parsed_content("validate#evaluator")
    steps = parser.get_parsed_content("train#trainer").state.iteration
    assert ema.num_updates == steps > 0
    assert evaluator.network is ema.ema_model and evaluator.state.epoch == 1  # validated with the EMA
    raw, averaged = network.state_dict(), ema.ema_model.state_dict()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)  # the raw network trained on its own
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # a plain state dict (plans in metadata)
    assert all(torch.equal(saved[k], averaged[k]) for k in averaged)  # the best model is the EMA
    final = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["ema"]["num_updates"] == steps and all(torch.equal(final["ema"]["model"][k], averaged[k]) for k in averaged)
    assert all(torch.equal(final["model"][k], raw[k]) for k in raw)


def test_ema_turned_on_for_a_resumed_run_starts_from_the_restored_weights(tiny_dataset: Path, tmp_path: Path, caplog) -> None:
    dataset = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    plain = _parser(dataset, tmp_path, epochs=1)
    assert plain.get_parsed_content("validate#evaluator").network is plain.get_parsed_content("network")
    assert plain.get_parsed_content("ema_handler") is None  # off: validation uses the raw network, no copy made
    plain.get_parsed_content("initialize")
    plain.get_parsed_content("run")
    restored = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)
    assert restored["ema"] is None

    on = _parser(dataset, tmp_path, epochs=2, ema=True)
    on.get_parsed_content("initialize")
    ema = on.get_parsed_content("ema_handler")
    seen = []
    on.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_STARTED(once=restored["trainer"]["iteration"] + 1),
        lambda _: seen.append((ema.num_updates, {k: v.clone() for k, v in ema.ema_model.state_dict().items()})))
    with caplog.at_level(logging.WARNING):
        on.get_parsed_content("run")
    assert "holds no EMA of the weights" in caplog.text
    assert seen[0][0] == 0 and all(torch.equal(seen[0][1][k], v) for k, v in restored["model"].items())
    assert ema.num_updates == restored["trainer"]["iteration"]  # epoch 2 only: as many steps as epoch 1
