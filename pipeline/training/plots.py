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
from matplotlib.patches import Patch
from scipy.special import expit

from pipeline.training.monitor import ThroughputMonitor, loss_of
from pipeline.utils.files import atomic_write_bytes
from transforms.io import case_id

__all__ = ["PredictionOverlays", "TensorBoardPreview", "TrainingCurves", "save_overlay_sheet"]

_THROUGHPUT_KEYS = ("samples_per_min", "data_wait_frac", "cuda_max_allocated_mib", "peak_rss_mib")
_TRAIN_KEYS = ("epoch", "train_loss", "lr")


def _save_figure(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


class TrainingCurves:
    """Record per-epoch training figures and plot them; survives resume.

    Per epoch it records the mean training loss, the learning rate in use at the epoch's last iteration (the
    scheduler steps after it: the value read at the epoch's end would already be the next epoch's), the
    validation metrics found in
    ``evaluator.state.metrics`` and a few throughput figures of a :class:`~pipeline.training.monitor.ThroughputMonitor`.
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
            :func:`pipeline.training.monitor.loss_of`.
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
        self._lr: float | None = None
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
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
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

    def _iteration_started(self, engine: Engine) -> None:
        if self.optimizer is not None:
            self._lr = float(self.optimizer.param_groups[0]["lr"])

    def _iteration_completed(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        if loss is not None:
            self._loss_sum += loss
            self._loss_count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        row = self._row(engine.state.epoch)
        if self._loss_count:
            row["train_loss"] = self._loss_sum / self._loss_count
        if self._lr is not None:
            row["lr"] = self._lr
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
        fig = Figure(figsize=(15, 7.5))
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.95, hspace=0.25, wspace=0.28)
        axes = fig.subplots(2, 3, sharex=True)
        metrics = [c for c in columns if c not in _TRAIN_KEYS and c not in _THROUGHPUT_KEYS]
        lower = [c for c in metrics if _lower_is_better(c)]
        panels = [
            (axes[0, 0], "training loss", "loss (mean over the epoch)", ["train_loss"], False),
            (axes[0, 1], "validation scores", "score (higher is better)", [c for c in metrics if c not in lower], False),
            (axes[0, 2], "validation VOI", "VOI, bits (lower is better)", lower, False),
            (axes[1, 0], "learning rate", "LR at the epoch's last iteration", ["lr"], True),
            (axes[1, 1], "throughput", "samples / min", ["samples_per_min"], False),
            (axes[1, 2], "peak memory", "MiB", ["peak_rss_mib", "cuda_max_allocated_mib"], False),
        ]
        for ax, title, ylabel, keys, log_y in panels:
            for key in keys:
                points = [(row["epoch"], row[key]) for row in rows if key in row and math.isfinite(row[key])]
                if points:
                    x, y = zip(*points, strict=True)
                    ax.plot(x, y, marker="." if len(points) < 50 else None, label=key)
            if log_y and ax.lines:
                ax.set_yscale("log")
            if len(ax.lines) > 1:
                ax.legend(fontsize="small")
            if not ax.lines:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("epoch")
        _save_figure(fig, self.output_dir / self.png_name)


def _lower_is_better(metric: str) -> bool:
    # the raw variation of information (val_voi); its score form val_voi_score is higher-is-better like the rest
    return metric.rsplit("_", 1)[-1] == "voi"


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


_PRED_COLOUR = (1.0, 0.1, 0.1)
_SURFACE_COLOUR = (0.1, 0.9, 0.2)
_IGNORED_COLOUR = (0.2, 0.5, 1.0)


def _plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    return volume[index] if view == "axial" else volume[:, index, :]


def save_overlay_sheet(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    label: np.ndarray | torch.Tensor | None = None,
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Save a PNG of a CT volume with a predicted surface mask overlaid, and the label beside it when given.

    Two views through the middle of the volume: an axial slice (a Z plane) and a cross-section (the Y plane, Z
    pointing down), in which sheets lying along Z show as the lines they are. With ``label`` a second column draws
    the labelled surface (1) and the unlabeled voxels (2, ignored by loss and metrics) on the same planes. A legend
    names the colours. Intensities are windowed to the 0.5-99.5 percentiles of the volume.

    Example::

        save_overlay_sheet(volume, prediction > 0, output_dir / f"{case_id}_overlay.png", label=label)

    Args:
        image: CT volume, (Z, Y, X) or with leading singleton dims (e.g. (1, Z, Y, X)).
        mask: mask of the same spatial shape; non-zero voxels are overlaid.
        path: output PNG path (written atomically).
        label: label volume of the same shape (0 background, 1 surface, 2 unlabeled), or None.
        alpha: overlay opacity.
        title: figure title; None shows none.

    Returns:
        the written path.

    Raises:
        ValueError: when the inputs are not 3D or their shapes differ.
    """
    image = _squeeze_to_3d(_as_numpy(image), "image")
    mask = _squeeze_to_3d(_as_numpy(mask), "mask")
    volumes = {"mask": mask}
    if label is not None:
        volumes["label"] = _squeeze_to_3d(_as_numpy(label), "label")
    for name, volume in volumes.items():
        if volume.shape != image.shape:
            msg = f"image shape {image.shape} and {name} shape {volume.shape} differ."
            raise ValueError(msg)
    vmin, vmax = np.percentile(image, (0.5, 99.5))
    views = [("axial", image.shape[0] // 2), ("cross-section", image.shape[1] // 2)]
    columns = 1 if label is None else 2
    fig = Figure(figsize=(3.6 * columns + 0.4, 7.4))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.1, top=0.88 if title else 0.93, hspace=0.18, wspace=0.05)
    axes = np.asarray(fig.subplots(2, columns)).reshape(2, columns)
    for row, (view, index) in enumerate(views):
        where = f"z={index}" if view == "axial" else f"y={index}, Z down"
        layers = [("prediction", [(mask != 0, _PRED_COLOUR)])]
        if label is not None:
            lab = volumes["label"]
            layers.append(("label", [(lab == 1, _SURFACE_COLOUR), (lab == 2, _IGNORED_COLOUR)]))
        for col, (name, overlays) in enumerate(layers):
            ax = axes[row, col]
            ax.imshow(_plane(image, view, index), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            for selected, colour in overlays:
                plane = _plane(selected, view, index)
                ax.imshow(np.ma.masked_equal(plane, False), cmap=ListedColormap([colour]), alpha=alpha, vmin=0,
                          vmax=1, interpolation="nearest")
            ax.set_title(f"{name}, {view} {where}", fontsize="medium")
            ax.set_axis_off()
    handles = [Patch(color=_PRED_COLOUR, alpha=alpha, label="predicted surface")]
    if label is not None:
        handles += [Patch(color=_SURFACE_COLOUR, alpha=alpha, label="labelled surface (1)"),
                    Patch(color=_IGNORED_COLOUR, alpha=alpha, label="unlabeled, ignored (2)")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small", frameon=False)
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
    """Evaluator handler: after each volume, a PNG of the predicted surface over the CT (an axial slice and a
    cross-section, see :func:`save_overlay_sheet`), with the label beside it where the data has one (validation),
    ``<output_dir>/<id>_overlay.png``, so a user can look at a prediction instead of reading numbers.

    Args:
        output_dir: folder of the PNGs.
        image_key: key of the (normalised) input volume in each decollated output item.
        pred_key: key of the binary prediction.
        label_key: key of the label; drawn when an item has it.
        only_epoch: draw only when the engine's epoch is this one (in training's validation, whose epoch is the
            trainer's: ``epochs`` draws the last validation only); None draws at every run.
        enabled: False attaches nothing.

    Example::

        PredictionOverlays("outputs/overlays").attach(inference_evaluator)
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
        only_epoch: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.pred_key = pred_key
        self.label_key = label_key
        self.only_epoch = only_epoch
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        """Register the callback on ``engine`` (nothing when ``enabled`` is False).

        Args:
            engine: the evaluator.
        """
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Draw the sheet of every volume of this iteration.

        Args:
            engine: the evaluator.
        """
        if self.only_epoch is not None and engine.state.epoch != self.only_epoch:
            return
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for i, item in enumerate(outputs):
            image, pred = item[self.image_key], item[self.pred_key]
            # the file name where the image keeps its metadata (inference), else the datalist's id (validation)
            source = getattr(image, "meta", {}).get("filename_or_obj")
            if source is None and i < len(batch) and isinstance(batch[i], dict):
                source = batch[i].get("id")
            case = case_id(str(source)) if source is not None else f"volume_{engine.state.iteration}"
            save_overlay_sheet(image, pred, self.output_dir / f"{case}_overlay.png", label=item.get(self.label_key),
                               title=case)
