"""A tiny MONAI training setup for the checkpoint tests, and the entry points run in killed subprocesses."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanDice, ValidationHandler, from_engine
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureTyped,
    RandFlipd,
    RandScaleIntensityd,
    RandSpatialCropd,
)
from monai.utils import set_determinism

from pipeline.training.checkpoint import TrainingCheckpointer

KEYS = ("image", "label")


@dataclass
class Setup:
    trainer: SupervisedTrainer
    evaluator: SupervisedEvaluator
    network: torch.nn.Module
    checkpointer: TrainingCheckpointer
    losses: dict[int, float] = field(default_factory=dict)
    lrs: dict[int, float] = field(default_factory=dict)


def _volumes(n: int) -> list[dict[str, np.ndarray]]:
    # fixed data, independent of the run's seed
    rng = np.random.default_rng(7)
    items = []
    for _ in range(n):
        image = rng.random((1, 16, 16, 16), dtype=np.float32)
        items.append({"image": image, "label": (image > 0.6).astype(np.float32)})
    return items


def build(
    ckpt_dir: str | os.PathLike,
    seed: int,
    max_epochs: int,
    num_workers: int = 0,
    n_volumes: int = 6,
    interval_minutes: float | None = None,
    every_epochs: int | None = 1,
    keep_last: int | None = None,
    auto_resume: bool = True,
    record_to: str | os.PathLike | None = None,
    clock: object = None,
) -> Setup:
    """SupervisedTrainer (tiny 3D conv with dropout) on a CacheDataset of ``n_volumes`` random 16^3 volumes with
    MONAI random transforms (nested Compose), shuffled loader, Adam, a per-iteration StepLR, per-epoch validation
    with a best metric, and the checkpointer attached last. Per-iteration losses and learning rates go to
    ``Setup.losses``/``lrs`` (and to ``record_to`` as JSON lines, flushed, so that they survive a SIGKILL)."""
    set_determinism(seed)
    transform = Compose(
        [
            EnsureTyped(keys=KEYS),
            Compose(
                [RandSpatialCropd(keys=KEYS, roi_size=(8, 8, 8), random_size=False), RandFlipd(keys=KEYS, prob=0.5)]
            ),
            RandScaleIntensityd(keys="image", factors=0.3, prob=1.0),
        ]
    )
    train_ds = CacheDataset(_volumes(n_volumes), transform=transform, progress=False)
    train_loader = DataLoader(train_ds, batch_size=2, shuffle=True, num_workers=num_workers)
    val_loader = DataLoader(CacheDataset(_volumes(2), transform=EnsureTyped(keys=KEYS), progress=False), batch_size=1)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout3d(0.2), torch.nn.Conv3d(4, 1, 1)
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.8)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=val_loader,
        network=network,
        postprocessing=Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]),
        key_val_metric={"val_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.BCEWithLogitsLoss(),
        train_handlers=[
            LrScheduleHandler(scheduler, epoch_level=False, print_lr=False),
            ValidationHandler(interval=1, validator=evaluator),
        ],
        decollate=False,
    )
    checkpointer = TrainingCheckpointer(
        ckpt_dir,
        network,
        optimizer,
        lr_scheduler=scheduler,
        scaler=lambda: trainer.scaler,
        evaluator=evaluator,
        interval_minutes=interval_minutes,
        every_epochs=every_epochs,
        keep_last=keep_last,
        auto_resume=auto_resume,
        clock=clock,
    )
    checkpointer.attach(trainer)
    setup = Setup(trainer, evaluator, network, checkpointer)
    record = open(record_to, "a") if record_to is not None else None  # noqa: SIM115 - lives as long as the run

    @trainer.on(Events.ITERATION_STARTED)
    def _lr(engine: SupervisedTrainer) -> None:
        setup.lrs[engine.state.iteration] = optimizer.param_groups[0]["lr"]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine: SupervisedTrainer) -> None:
        it = engine.state.iteration
        setup.losses[it] = engine.state.output["loss"].item()
        if record is not None:
            record.write(json.dumps({"it": it, "loss": setup.losses[it], "lr": setup.lrs[it]}) + "\n")
            record.flush()

    return setup


def read_record(path: str | os.PathLike) -> tuple[dict[int, float], dict[int, float]]:
    """Losses and learning rates by iteration, as written by ``build(record_to=...)``."""
    losses, lrs = {}, {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        losses[row["it"]], lrs[row["it"]] = row["loss"], row["lr"]
    return losses, lrs


def train_then_sigkill(ckpt_dir: str, record_to: str, kill_at: int, num_workers: int) -> None:
    """Train with a timed checkpoint at every iteration; SIGKILL this process right after iteration ``kill_at``."""
    torch.set_num_threads(1)
    setup = build(ckpt_dir, seed=0, max_epochs=4, num_workers=num_workers, interval_minutes=1e-9, record_to=record_to)

    @setup.trainer.on(Events.ITERATION_COMPLETED(once=kill_at))
    def _kill(_: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    setup.trainer.run()


def resume_with_stalled_final_write(ckpt_dir: str, marker: str, max_epochs: int) -> None:
    """Resume and train to ``max_epochs``; the final checkpoint write stalls half-way (until killed) and touches
    ``marker`` when it does."""
    torch.set_num_threads(1)
    real_save = torch.save

    def stalled_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f  # noqa: SIM115 - left open for the kill
        out.write(data[: len(data) // 2])
        out.flush()
        Path(marker).touch()
        time.sleep(120)

    torch.save = stalled_save
    build(ckpt_dir, seed=5, max_epochs=max_epochs, every_epochs=None).trainer.run()


def train_then_signal(ckpt_dir: str, record_to: str, signal_at: int, signum: int) -> None:
    """Train 4 epochs with no timed checkpoint; send ``signum`` to this process during iteration ``signal_at``
    (from its forward pass). The run must save at the end of that iteration and exit 128 + signum."""
    torch.set_num_threads(1)
    setup = build(ckpt_dir, seed=0, max_epochs=4, interval_minutes=None, every_epochs=None, record_to=record_to)

    @setup.trainer.on(Events.ITERATION_STARTED(once=signal_at))
    def _signal(_: Any) -> None:
        os.kill(os.getpid(), signum)

    from pipeline.utils.errors import Preempted

    try:
        setup.trainer.run()
    except Preempted as e:
        os._exit(e.exit_code)
    os._exit(0)


def train_then_kill_at_final_write(ckpt_dir: str, max_epochs: int) -> None:
    """Train to ``max_epochs``; SIGKILL this process when the final checkpoint write begins (after the last
    epoch's checkpoint): the late kill the next run must complete."""
    import pipeline.training.checkpoint as ckpt

    torch.set_num_threads(1)
    real_save = ckpt.atomic_save

    def killing_save(obj: Any, path: Any) -> Any:
        if Path(path).name == ckpt.FINAL_NAME:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path)

    ckpt.atomic_save = killing_save
    build(ckpt_dir, seed=0, max_epochs=max_epochs).trainer.run()


def hold_lock(ckpt_dir: str, ready: str) -> None:
    """Start a run on ``ckpt_dir`` and stay inside its first iteration (holding the folder's lock) until killed."""
    torch.set_num_threads(1)
    setup = build(ckpt_dir, seed=0, max_epochs=1)

    @setup.trainer.on(Events.ITERATION_STARTED(once=1))
    def _wait(_: Any) -> None:
        Path(ready).touch()
        time.sleep(120)

    setup.trainer.run()
