"""Training curves, inference overlay sheets and TensorBoard validation previews.

Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state, no screen needed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from scipy.special import expit

from pipeline.monitor import ThroughputMonitor, loss_of
from transforms.io import atomic_write_bytes, case_id

__all__ = ["PredictionOverlays", "TensorBoardPreview", "TrainingCurves", "save_overlay_sheet"]

_THROUGHPUT_KEYS = ("samples_per_min", "data_wait_frac", "cuda_max_allocated_mib", "peak_rss_mib")
_TRAIN_KEYS = ("epoch", "train_loss", "lr")


def _save_figure(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


class TrainingCurves:
    """Record per-epoch training figures and plot them; survives resume.

    Per epoch it records the mean training loss, the learning rate, the validation metrics found in
    ``evaluator.state.metrics`` and a few throughput figures of a :class:`~pipeline.monitor.ThroughputMonitor`.
    The numbers go to ``training_history.json`` and ``training_history.csv`` at every epoch end; the plot
    ``training_curves.png`` is redrawn after each validation and at ``COMPLETED`` (every epoch end when no
    evaluator is given). All files are written atomically, on rank 0 only.

    On attach, an existing ``training_history.json`` in ``output_dir`` is loaded, so a resumed run continues
    the curves; rows of epochs the resumed run repeats are replaced.

    Example::

        TrainingCurves(output_dir, evaluator=evaluator, optimizer=optimizer, throughput=monitor).attach(trainer)

    Args:
        output_dir: directory of the plot and history files (created if missing).
        evaluator: validation engine whose ``state.metrics`` are recorded when it completes; None records none.
        optimizer: optimizer whose first parameter group's ``lr`` is recorded; None records none.
        throughput: monitor whose per-epoch figures are recorded; None records none.
        metric_names: validation metrics to record; None records every numeric metric.
        output_transform: maps the trainer's ``state.output`` to the loss; defaults to
            :func:`pipeline.monitor.loss_of`.
        enabled: False makes ``attach`` a no-op.
    """

    png_name = "training_curves.png"
    json_name = "training_history.json"
    csv_name = "training_history.csv"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        evaluator: Engine | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        throughput: ThroughputMonitor | None = None,
        metric_names: Sequence[str] | None = None,
        output_transform: Callable[[Any], float | None] = loss_of,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.optimizer = optimizer
        self.throughput = throughput
        self.metric_names = None if metric_names is None else list(metric_names)
        self.output_transform = output_transform
        self.enabled = enabled
        self.history: dict[int, dict[str, float]] = {}
        self._trainer: Engine | None = None
        self._loss_sum = 0.0
        self._loss_count = 0
        self._validated = False
        self._epoch_done = False
        self._plotted = ""

    def attach(self, engine: Engine) -> None:
        """Load a previous history and register the callbacks (nothing when ``enabled`` is False).

        Args:
            engine: the trainer.
        """
        if not self.enabled:
            return
        self._trainer = engine
        self.history = self._load_history()
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._validation_completed)

    def _load_history(self) -> dict[int, dict[str, float]]:
        path = self.output_dir / self.json_name
        if not path.is_file():
            return {}
        try:
            rows = json.loads(path.read_text())["epochs"]
            return {int(row["epoch"]): row for row in rows}
        except (ValueError, KeyError, TypeError) as err:
            # the history only feeds plots and notes: a damaged file must not stop a resumed training
            warnings.warn(f"Ignoring unreadable training history {path}: {err}", stacklevel=3)
            return {}

    def _row(self, epoch: int) -> dict[str, float]:
        return self.history.setdefault(epoch, {"epoch": epoch})

    def _epoch_started(self, engine: Engine) -> None:
        self._loss_sum, self._loss_count = 0.0, 0
        self._validated = self._epoch_done = False
        # a run resumed from an older checkpoint repeats epochs: their old rows are stale
        for epoch in [e for e in self.history if e >= engine.state.epoch]:
            del self.history[epoch]

    def _iteration_completed(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        if loss is not None:
            self._loss_sum += loss
            self._loss_count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        row = self._row(engine.state.epoch)
        if self._loss_count:
            row["train_loss"] = self._loss_sum / self._loss_count
        if self.optimizer is not None:
            row["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self._epoch_done = True
        # a validation that ran earlier at this EPOCH_COMPLETED left the plot to this handler
        self._write(plot=self.evaluator is None or self._validated)

    def _validation_completed(self, evaluator: Engine) -> None:
        row = self._row(self._trainer.state.epoch)
        for name, value in evaluator.state.metrics.items():
            wanted = name in self.metric_names if self.metric_names is not None else True
            if wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[name] = float(value)
        self._validated = True
        # before this epoch's row is complete, plotting waits for _epoch_completed
        self._write(plot=self._epoch_done)

    def _completed(self, engine: Engine) -> None:
        self._write(plot=True)

    def _sync_throughput(self) -> None:
        # the monitor may run after this handler at EPOCH_COMPLETED: pick up its figures at every write
        if self.throughput is None:
            return
        for epoch, figures in self.throughput.history.items():
            if epoch in self.history:
                self.history[epoch].update({k: figures[k] for k in _THROUGHPUT_KEYS if k in figures})

    def _write(self, plot: bool) -> None:
        self._sync_throughput()
        if idist.get_rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = [self.history[e] for e in sorted(self.history)]
        text = json.dumps({"epochs": rows}, indent=1)
        atomic_write_bytes(self.output_dir / self.json_name, text.encode())
        # drawing takes ~0.5 s: skip it when the numbers have not changed (COMPLETED right after a validation)
        plot = plot and text != self._plotted
        if plot:
            self._plotted = text
        seen = dict.fromkeys(key for row in rows for key in row)
        metrics = [key for key in seen if key not in _TRAIN_KEYS and key not in _THROUGHPUT_KEYS]
        columns = [key for key in (*_TRAIN_KEYS, *metrics, *_THROUGHPUT_KEYS) if key in seen]
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.output_dir / self.csv_name, table.getvalue().encode())
        if plot:
            self._plot(rows, columns)

    def _plot(self, rows: list[dict[str, float]], columns: list[str]) -> None:
        # fixed margins: a layout engine triples the drawing time, which runs at every validation
        fig = Figure(figsize=(11, 7))
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.95, hspace=0.25, wspace=0.2)
        axes = fig.subplots(2, 2, sharex=True)
        metrics = [c for c in columns if c not in _TRAIN_KEYS and c not in _THROUGHPUT_KEYS]
        panels = [
            (axes[0, 0], "training loss", ["train_loss"], False),
            (axes[0, 1], "validation", metrics, False),
            (axes[1, 0], "learning rate", ["lr"], True),
            (axes[1, 1], "samples/min", ["samples_per_min"], False),
        ]
        for ax, title, keys, log_y in panels:
            for key in keys:
                points = [(row["epoch"], row[key]) for row in rows if key in row and math.isfinite(row[key])]
                if points:
                    x, y = zip(*points, strict=True)
                    ax.plot(x, y, marker="." if len(points) < 50 else None, label=key)
            if log_y and ax.lines:
                ax.set_yscale("log")
            if len(ax.lines) > 1:
                ax.legend()
            ax.set_title(title)
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("epoch")
        _save_figure(fig, self.output_dir / self.png_name)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def _squeeze_to_3d(x: np.ndarray, name: str) -> np.ndarray:
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        msg = f"{name} must be 3D (Z, Y, X), optionally with leading singleton dims; got shape {x.shape}."
        raise ValueError(msg)
    return x


def save_overlay_sheet(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    n_slices: int = 4,
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Save a PNG of a few axial slices of a CT volume with a predicted surface mask overlaid in red.

    The slices are evenly spaced along Z, away from the first and last slice. Intensities are windowed to
    the 0.5-99.5 percentiles of the volume.

    Example::

        save_overlay_sheet(volume, prediction > 0, output_dir / f"{case_id}_overlay.png")

    Args:
        image: CT volume, (Z, Y, X) or with leading singleton dims (e.g. (1, Z, Y, X)).
        mask: mask of the same spatial shape; non-zero voxels are overlaid.
        path: output PNG path (written atomically).
        n_slices: number of axial slices shown.
        alpha: overlay opacity.
        title: figure title; None shows none.

    Returns:
        the written path.

    Raises:
        ValueError: when the inputs are not 3D, their shapes differ, or ``n_slices < 1``.
    """
    image = _squeeze_to_3d(_as_numpy(image), "image")
    mask = _squeeze_to_3d(_as_numpy(mask), "mask")
    if image.shape != mask.shape:
        msg = f"image shape {image.shape} and mask shape {mask.shape} differ."
        raise ValueError(msg)
    if n_slices < 1:
        msg = f"n_slices must be >= 1, got {n_slices}."
        raise ValueError(msg)
    n_slices = min(n_slices, image.shape[0])
    zs = np.linspace(0, image.shape[0] - 1, n_slices + 2)[1:-1].round().astype(int)
    vmin, vmax = np.percentile(image, (0.5, 99.5))
    red = ListedColormap([(1.0, 0.1, 0.1)])
    fig = Figure(figsize=(3 * n_slices, 3.2))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.85 if title else 0.9, wspace=0.05)
    axes = np.atleast_1d(fig.subplots(1, n_slices))
    for ax, z in zip(axes, zs, strict=True):
        ax.imshow(image[z], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.imshow(np.ma.masked_equal(mask[z] != 0, False), cmap=red, alpha=alpha, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(f"z={z}")
        ax.set_axis_off()
    if title is not None:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, path)
    return path


class TensorBoardPreview:
    """Log the middle axial slice of image / label / prediction of the first validation batch to TensorBoard.

    At the first iteration of each evaluator run it takes the first sample of ``engine.state.output`` (a dict
    of batched tensors, or MONAI's decollated list of per-sample dicts), channel 0, the middle Z slice, and
    calls ``summary_writer.add_image(tag, img, step, dataformats="CHW")`` with a (1, Y, X) array in [0, 1]:
    the image min-max scaled; the label with the ignored class 2 shown grey (0.5); the prediction as is when
    it lies in [0, 1], else passed through a sigmoid (logits). The step is the evaluator's epoch, which MONAI's
    ``ValidationHandler`` sets to the trainer's epoch.

    Example::

        TensorBoardPreview(SummaryWriter(log_dir)).attach(evaluator)

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_image``).
        image_key: key of the image in the output.
        label_key: key of the label in the output.
        pred_key: key of the prediction in the output.
        tag_prefix: prefix of the TensorBoard tags (``{tag_prefix}image`` etc.).
        enabled: False makes ``attach`` a no-op.
    """

    def __init__(
        self,
        summary_writer: Any,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        tag_prefix: str = "val/",
        enabled: bool = True,
    ) -> None:
        self.summary_writer = summary_writer
        self.keys = {"image": image_key, "label": label_key, "pred": pred_key}
        self.tag_prefix = tag_prefix
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        """Register the callback on ``engine`` (nothing when ``enabled`` is False).

        Args:
            engine: the evaluator.
        """
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Log the previews if this is the first iteration of the run (rank 0 only).

        Args:
            engine: the evaluator.
        """
        epoch_length = engine.state.epoch_length or 1
        if (engine.state.iteration - 1) % epoch_length != 0 or idist.get_rank() != 0:
            return
        output = engine.state.output
        sample = output[0] if isinstance(output, Sequence) else {k: v[0] for k, v in output.items()
                                                                 if k in self.keys.values()}
        for role, key in self.keys.items():
            if key not in sample:
                continue
            volume = _as_numpy(sample[key])
            if volume.ndim != 4:
                msg = f"TensorBoardPreview expects {key!r} per sample as (C, Z, Y, X), got shape {volume.shape}."
                raise ValueError(msg)
            plane = volume[0, volume.shape[1] // 2]
            if role == "image":
                low, high = plane.min(), plane.max()
                plane = (plane - low) / (high - low) if high > low else np.zeros_like(plane)
            elif role == "label":
                plane = np.where(plane == 2, 0.5, plane)
            elif plane.min() < 0 or plane.max() > 1:
                plane = expit(plane)
            self.summary_writer.add_image(
                f"{self.tag_prefix}{role}", plane[None].astype(np.float32), engine.state.epoch, dataformats="CHW"
            )


class PredictionOverlays:
    """Inference handler: after each volume, a PNG of a few axial slices with the predicted surface over the CT,
    ``<output_dir>/<id>_overlay.png``, so a user can look at a prediction instead of reading numbers.

    Args:
        output_dir: folder of the PNGs.
        image_key: key of the (normalised) input volume in each decollated output item.
        pred_key: key of the binary prediction.
        n_slices: slices per sheet.
        enabled: False attaches nothing.

    Example::

        PredictionOverlays("outputs/overlays").attach(inference_evaluator)
    """

    def __init__(
        self, output_dir: str | os.PathLike, image_key: str = "image", pred_key: str = "pred", n_slices: int = 4, enabled: bool = True
    ) -> None:
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.pred_key = pred_key
        self.n_slices = n_slices
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            image, pred = item[self.image_key], item[self.pred_key]
            source = getattr(image, "meta", {}).get("filename_or_obj", f"volume_{engine.state.iteration}")
            case = case_id(str(source))
            save_overlay_sheet(image, pred, self.output_dir / f"{case}_overlay.png", n_slices=self.n_slices, title=case)
