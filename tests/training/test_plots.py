"""Tests for pipeline.training.plots: training curves with resume, overlay sheet, TensorBoard previews."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from pipeline.training.monitor import ThroughputMonitor
from pipeline.training.plots import (
    TensorBoardPreview,
    TrainingCurves,
    save_overlay_sheet,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"image": torch.zeros(2, 1, 4, 4, 4)} for _ in range(n)]


def _run_training(out: Path, max_epochs: int, start_epoch: int = 0, validate_first: bool = False) -> TrainingCurves:
    """Train a fake engine (loss = epoch + iteration/10) with validation every epoch (val_dice = epoch/10)."""

    def step(engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        it = (engine.state.iteration - 1) % engine.state.epoch_length + 1
        return {"loss": torch.tensor(engine.state.epoch + it / 10)}

    trainer = Engine(step)
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.COMPLETED)
    def _metrics(engine: Engine) -> None:
        engine.state.metrics = {"val_dice": trainer.state.epoch / 10, "val_score": 0.5, "name": "not a number"}

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    monitor = ThroughputMonitor()
    curves = TrainingCurves(out, evaluator=evaluator, optimizer=optimizer, throughput=monitor)
    # a ValidationHandler listed before or after the curves in train#handlers
    if validate_first:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=1))
    curves.attach(trainer)
    if not validate_first:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=1))
    # the monitor after the curves: its figures are picked up at a later write
    monitor.attach(trainer)
    if start_epoch:
        # what CheckpointLoader does at STARTED on resume
        trainer.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", start_epoch))
        trainer.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "iteration", start_epoch * 4))
    trainer.run(_batches(4), max_epochs=max_epochs)
    return curves


@pytest.mark.parametrize("validate_first", [False, True])
def test_curves_written_with_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, validate_first: bool) -> None:
    plotted: list[int] = []
    plot = TrainingCurves._plot

    def counting_plot(self: TrainingCurves, rows: list[dict], columns: list[str]) -> None:
        plotted.append(rows[-1]["epoch"])
        assert "train_loss" in rows[-1] and "val_dice" in rows[-1]
        if not validate_first:  # drawing is slow on a shared CPU: draw in one case only
            plot(self, rows, columns)

    monkeypatch.setattr(TrainingCurves, "_plot", counting_plot)
    _run_training(tmp_path, max_epochs=3, validate_first=validate_first)
    # once per validation, once more at COMPLETED where the monitor's last figures arrive
    assert plotted == [1, 2, 3, 3]
    if not validate_first:
        _assert_png(tmp_path / "training_curves.png")
    rows = json.loads((tmp_path / "training_history.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        epoch = row["epoch"]
        assert row["train_loss"] == pytest.approx(epoch + 0.25)
        assert row["val_dice"] == pytest.approx(epoch / 10)
        assert row["lr"] == 0.1
        assert row["samples_per_min"] > 0
        assert "name" not in row
    csv_lines = (tmp_path / "training_history.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss,lr")
    assert len(csv_lines) == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_curves_continue_after_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TrainingCurves, "_plot", lambda self, rows, columns: None)
    _run_training(tmp_path, max_epochs=3)
    # resumed from a checkpoint of epoch 2: epoch 3 is trained again and its old row replaced
    curves = _run_training(tmp_path, max_epochs=5, start_epoch=2)
    rows = json.loads((tmp_path / "training_history.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["train_loss"] for row in rows] == pytest.approx([e + 0.25 for e in range(1, 6)])
    assert sorted(curves.history) == [1, 2, 3, 4, 5]


def test_without_evaluator_plots_each_epoch_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plotted: list[int] = []
    monkeypatch.setattr(TrainingCurves, "_plot", lambda self, rows, columns: plotted.append(rows[-1]["epoch"]))
    trainer = Engine(lambda e, b: {"loss": 1.0})
    TrainingCurves(tmp_path).attach(trainer)
    trainer.run(_batches(2), max_epochs=2)
    assert plotted == [1, 2]  # nothing changed between the last epoch end and COMPLETED


def test_unreadable_history_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TrainingCurves, "_plot", lambda self, rows, columns: None)
    (tmp_path / "training_history.json").write_text("{not json")
    with pytest.warns(UserWarning, match="training_history.json"):
        _run_training(tmp_path, max_epochs=1)
    rows = json.loads((tmp_path / "training_history.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1]


def test_disabled_curves_write_nothing(tmp_path: Path) -> None:
    trainer = Engine(lambda e, b: {"loss": 1.0})
    TrainingCurves(tmp_path / "out", enabled=False).attach(trainer)
    trainer.run(_batches(2), max_epochs=1)
    assert not (tmp_path / "out").exists()


def _capture_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    import pipeline.training.plots

    figures: list = []
    save = pipeline.training.plots._save_figure
    monkeypatch.setattr(pipeline.training.plots, "_save_figure", lambda fig, path: (figures.append(fig), save(fig, path)))
    return figures


@pytest.mark.parametrize("with_label", [False, True])
def test_overlay_sheet_axial_and_cross_section_with_legend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           with_label: bool) -> None:
    figures = _capture_figures(monkeypatch)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(24, 32, 40), dtype=np.uint8)
    mask = np.zeros_like(image)
    mask[:, 10:12, :] = 1
    label = np.where(mask == 1, 1, 0).astype(np.uint8)
    label[:3] = 2
    path = save_overlay_sheet(torch.from_numpy(image)[None], mask, tmp_path / "sub" / "case_overlay.png",
                              label=label if with_label else None)
    assert path == tmp_path / "sub" / "case_overlay.png"
    _assert_png(path)
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    # one axial slice (Y, X) and one cross-section (Z, X); the label beside the prediction when given
    expected = ["prediction, axial z=12", "prediction, cross-section y=16, Z down"]
    if with_label:
        expected = ["prediction, axial z=12", "label, axial z=12", "prediction, cross-section y=16, Z down",
                    "label, cross-section y=16, Z down"]
    assert titles == expected
    assert fig.axes[0].images[0].get_array().shape == (32, 40)
    assert fig.axes[-1].images[0].get_array().shape == (24, 40)
    (legend,) = fig.legends
    names = [t.get_text() for t in legend.get_texts()]
    assert names == (["predicted surface", "labelled surface (1)", "unlabeled, ignored (2)"] if with_label
                     else ["predicted surface"])


def test_curves_axes_labelled_voi_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = _capture_figures(monkeypatch)
    rows = [{"epoch": e, "train_loss": 1.0 / e, "lr": 1e-3, "val_dice": 0.5, "val_score": 0.6, "val_voi": 1.2,
             "val_voi_score": 0.7, "samples_per_min": 10.0} for e in (1, 2)]
    curves = TrainingCurves(tmp_path)
    curves._plot(rows, ["epoch", "train_loss", "lr", "val_dice", "val_score", "val_voi", "val_voi_score",
                        "samples_per_min"])
    (fig,) = figures
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert all(ax.get_ylabel() for ax in fig.axes)
    scores = [line.get_label() for line in panels["validation scores"].lines]
    assert scores == ["val_dice", "val_score", "val_voi_score"]
    assert [line.get_label() for line in panels["validation VOI"].lines] == ["val_voi"]
    assert "lower is better" in panels["validation VOI"].get_ylabel()


def test_lr_is_the_one_in_use_at_the_epochs_last_iteration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TrainingCurves, "_plot", lambda self, rows, columns: None)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    # a cycle that ends with the run: the scheduler steps after each iteration, jumping back up after the last
    schedule = [1.0, 0.5, 0.1, 0.01]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule[step % len(schedule)])

    def step(engine: Engine, batch: object) -> dict[str, float]:
        optimizer.step()
        return {"loss": 1.0}

    trainer = Engine(step)
    TrainingCurves(tmp_path, optimizer=optimizer).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: scheduler.step())
    trainer.run([0, 1], max_epochs=2)
    rows = json.loads((tmp_path / "training_history.json").read_text())["epochs"]
    assert [row["lr"] for row in rows] == [0.5, 0.01]  # not 0.1 and 1.0, the next iterations' rates


def test_overlay_sheet_rejects_mismatched_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(8, 8, 8\)"):
        save_overlay_sheet(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)), tmp_path / "x.png")


class _FakeWriter:
    def __init__(self) -> None:
        self.images: list[tuple[str, np.ndarray, int, str]] = []

    def add_image(self, tag: str, img: np.ndarray, global_step: int, dataformats: str) -> None:
        self.images.append((tag, img, global_step, dataformats))


def _output(decollated: bool) -> dict | list:
    image = torch.arange(2 * 1 * 6 * 5 * 7, dtype=torch.float32).reshape(2, 1, 6, 5, 7)
    label = torch.full((2, 1, 6, 5, 7), 2.0)
    label[:, :, 3, 0, :] = 1
    pred = torch.full((2, 1, 6, 5, 7), -20.0)
    batch = {"image": image, "label": label, "pred": pred, "loss": 0.3}
    if decollated:
        return [{k: v[i] for k, v in batch.items() if k != "loss"} for i in range(2)]
    return batch


@pytest.mark.parametrize("decollated", [False, True])
def test_preview_logs_middle_slices(decollated: bool) -> None:
    writer = _FakeWriter()
    evaluator = Engine(lambda e, b: _output(decollated))
    TensorBoardPreview(writer).attach(evaluator)
    evaluator.run([0, 1, 2], max_epochs=2)
    assert [(tag, step) for tag, _, step, _ in writer.images] == [
        ("val/image", 1), ("val/label", 1), ("val/pred", 1), ("val/image", 2), ("val/label", 2), ("val/pred", 2),
    ]
    image, label, pred = (img for _, img, _, _ in writer.images[:3])
    for img in (image, label, pred):
        assert img.shape == (1, 5, 7)
        assert img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
    assert image.min() == 0.0 and image.max() == 1.0
    assert set(np.unique(label)) == {0.5, 1.0}
    assert pred.max() < 1e-6  # logits -20 through a sigmoid
    assert {fmt for *_, fmt in writer.images} == {"CHW"}
