"""Evaluation reports: per-volume and mean metrics of an evaluator run, written as ``metrics.csv``/``metrics.json``.

``bundle/configs/evaluate.yaml`` scores a checkpoint on the validation split with the inference settings; its
metric handlers (:class:`pipeline.evaluation.score.CompetitionScoreHandler`, MONAI's Dice) keep one row per volume in
``engine.state.metric_details``, and :class:`MetricsWriter` turns those rows into a table keyed by case id. The score is
exact (TopoScore with the official Betti-matching counts, ``topo_mode='exact'``), as is training's ``val_score``
unless ``val_topo_mode: fast``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import CommonKeys as Keys

from pipeline.utils.files import atomic_write_bytes
from transforms.io import write_volume

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["MetricsWriter", "cross_validation", "write_metrics"]


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN; a volume without labelled surface has no Dice
    return value if math.isfinite(value) else None


def write_metrics(
    output_dir: str | os.PathLike,
    volumes: Mapping[str, Mapping[str, float]],
    settings: Mapping[str, Any] | None = None,
    name: str = "metrics",
) -> dict[str, Any]:
    """Write per-volume metrics and their means to ``<output_dir>/<name>.csv`` and ``<name>.json``, atomically.

    The CSV has a header ``id,<metric>,...``, one row per volume and a last row ``mean``; the JSON holds
    ``{"volumes": {id: {metric: value}}, "mean": {metric: value}, "settings": settings}`` (the layout of
    :func:`pipeline.evaluation.score.score_volumes`). NaN values (e.g. the Dice of a volume without labelled surface) are
    left out of the means and written as empty cells / ``null``.

    Args:
        output_dir: folder for the two files (created if needed).
        volumes: case id -> metric name -> value; every volume must have the same metrics.
        settings: recorded in the JSON next to the figures (e.g. checkpoint path and post-processing).
        name: file name stem.

    Returns:
        The JSON content.

    Raises:
        ValueError: when ``volumes`` is empty or the volumes do not all have the same metrics.
    """
    if not volumes:
        msg = f"no volumes to write to {Path(output_dir) / name}.csv"
        raise ValueError(msg)
    columns = list(next(iter(volumes.values())))
    for case, values in volumes.items():
        if list(values) != columns:
            msg = f"volume {case!r} has metrics {list(values)}, expected {columns}"
            raise ValueError(msg)
    mean = {}
    for key in columns:
        finite = [float(v[key]) for v in volumes.values() if math.isfinite(float(v[key]))]
        mean[key] = float(np.mean(finite)) if finite else float("nan")
    table = {"volumes": {str(k): dict(v) for k, v in volumes.items()}, "mean": mean}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *columns])
    for case, values in [*table["volumes"].items(), ("mean", mean)]:
        writer.writerow([case, *("" if not math.isfinite(values[k]) else repr(float(values[k])) for k in columns)])
    content = {
        "volumes": {k: {m: _finite_or_none(float(x)) for m, x in v.items()} for k, v in table["volumes"].items()},
        "mean": {m: _finite_or_none(x) for m, x in mean.items()},
        "settings": dict(settings or {}),
    }
    out = Path(output_dir)
    atomic_write_bytes(out / f"{name}.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / f"{name}.json", (json.dumps(content, indent=2, default=str) + "\n").encode())
    return content


class MetricsWriter:
    """Ignite handler: at the end of an evaluator run, write each volume's metrics and their means.

    The per-volume values come from ``engine.state.metric_details``, which MONAI metric handlers fill when
    ``save_details=True`` (one row per sample, in iteration order); the case ids are read from each batch as it
    goes by. Optionally the evaluated masks are written too, as ``<pred_dir>/<id>.tif`` (uint8), so the figures
    can be re-scored from files (``python -m pipeline score --pred DIR --labels DIR``). Single process: under DDP
    the details are gathered from all ranks but the ids are not.

    Args:
        output_dir: folder for ``metrics.csv`` and ``metrics.json``.
        details: metric name in ``engine.state.metric_details`` -> names of its columns in the report, e.g.
            ``{"val_score": pipeline.evaluation.score.COMPONENT_KEYS, "val_dice": ["dice"]}``.
        id_key: batch key holding the case id (the datalists of :mod:`pipeline.data.datalist` have ``id``).
        pred_dir: when set, write each evaluated mask there.
        pred_key: output key of the (post-processed) mask.
        settings: recorded in ``metrics.json`` beside the figures.
        name: file name stem of the report.

    Raises:
        ValueError: when ``details`` is empty.

    Example::

        writer = MetricsWriter("outputs", {"val_score": COMPONENT_KEYS, "val_dice": ["dice"]})
        writer.attach(evaluator)  # evaluator's metric handlers built with save_details=True
        evaluator.run()           # -> outputs/metrics.csv, outputs/metrics.json
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        details: Mapping[str, Sequence[str]],
        id_key: str = "id",
        pred_dir: str | os.PathLike | None = None,
        pred_key: str = Keys.PRED,
        settings: Mapping[str, Any] | None = None,
        name: str = "metrics",
    ) -> None:
        if not details:
            msg = "details must name at least one metric of engine.state.metric_details"
            raise ValueError(msg)
        self.output_dir = Path(output_dir)
        self.details = {metric: list(columns) for metric, columns in details.items()}
        self.id_key = id_key
        self.pred_dir = Path(pred_dir) if pred_dir else None
        self.pred_key = pred_key
        self.settings = dict(settings or {})
        self.name = name
        self.ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Collect ids (and write masks) every iteration, the report when the run completes."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _reset(self, engine: Engine) -> None:
        self.ids = []

    def _iteration_completed(self, engine: Engine) -> None:
        batch = engine.state.batch
        try:
            ids = [str(item[self.id_key]) for item in batch] if isinstance(batch, list) else list(batch[self.id_key])
        except KeyError as e:
            msg = f"batch has no {self.id_key!r} key for the case id; set id_key to one of the datalist's keys"
            raise KeyError(msg) from e
        self.ids.extend(str(i) for i in ids)
        if self.pred_dir is None:
            return
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for case, item in zip(ids, outputs):
            mask = item[self.pred_key]
            arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            write_volume(self.pred_dir / f"{case}.tif", (arr.reshape(arr.shape[-3:]) > 0).astype(np.uint8))

    def _completed(self, engine: Engine) -> None:
        volumes: dict[str, dict[str, float]] = {case: {} for case in self.ids}
        if len(volumes) != len(self.ids):
            msg = f"case ids repeat in the evaluated data ({len(self.ids)} ids, {len(volumes)} distinct)"
            raise ValueError(msg)
        for metric, columns in self.details.items():
            if metric not in engine.state.metric_details:
                msg = (
                    f"no per-volume details for metric {metric!r} (have {sorted(engine.state.metric_details)}); "
                    "build its handler with save_details=True"
                )
                raise KeyError(msg)
            rows = torch.as_tensor(engine.state.metric_details[metric])
            if rows.shape[0] != len(self.ids):
                msg = f"metric {metric!r} has {rows.shape[0]} per-volume rows for {len(self.ids)} evaluated cases"
                raise ValueError(msg)
            rows = rows.reshape(len(self.ids), -1)
            if rows.shape[1] != len(columns):
                msg = f"metric {metric!r} has {rows.shape[1]} values per volume, but columns {columns} were given"
                raise ValueError(msg)
            for case, row in zip(self.ids, rows.tolist()):
                volumes[case].update(zip(columns, row))
        write_metrics(self.output_dir, volumes, self.settings, self.name)


def cross_validation(
    output_dir: str | os.PathLike,
    fold_reports: Mapping[int, str | os.PathLike],
    cases: Sequence[Mapping[str, Any]],
    complete: bool = True,
) -> dict[str, Any]:
    """The cross-validation score: every fold's out-of-fold metrics (its ``metrics.json``, written by
    :class:`MetricsWriter` when ``evaluate.yaml`` scored the fold's model on the fold's validation cases) joined into
    one table, written to ``<output_dir>/cross_validation.csv`` and ``.json``.

    The JSON holds ``volumes`` (case id -> fold, scroll and every metric), ``scrolls`` (scroll id -> mean of its
    cases), ``folds`` (fold -> mean of its cases) and ``mean`` (over every case: each case counts once, as the
    competition averages volumes); the CSV one row per case and a last row ``mean``.

    Args:
        output_dir: folder for the two files.
        fold_reports: fold -> its ``metrics.json``.
        cases: the training cases of every fold (datalist items with ``id`` and, when known, ``scroll_id``).
        complete: every fold of the split was scored: each case must then be scored exactly once.

    Raises:
        ValueError: a case scored by two folds, a scored case that is not a training case, or (``complete``) a
            training case no fold scored; each names the cases.
    """
    scroll_of = {str(c["id"]): str(c.get("scroll_id") or "") for c in cases}
    rows: dict[str, dict[str, Any]] = {}
    for fold, path in sorted(fold_reports.items()):
        report = json.loads(Path(path).read_text())
        for case, values in report["volumes"].items():
            if case in rows:
                msg = f"{path}: case {case} was scored by fold {rows[case]['fold']} already: the folds overlap"
                raise ValueError(msg)
            if case not in scroll_of:
                msg = f"{path}: case {case} is not a training case of this dataset (another dataset's folds?)"
                raise ValueError(msg)
            rows[case] = {"fold": int(fold), "scroll_id": scroll_of[case], **values}
    missing = sorted(set(scroll_of) - set(rows))
    if complete and missing:
        msg = f"{len(missing)} training case(s) scored by no fold: {', '.join(missing[:5])}"
        raise ValueError(msg)
    if not rows:
        msg = "no fold was scored"
        raise ValueError(msg)
    metrics = [k for k in next(iter(rows.values())) if k not in ("fold", "scroll_id")]

    def mean(group: list[dict[str, Any]]) -> dict[str, float | None]:
        out = {}
        for key in metrics:
            finite = [float(r[key]) for r in group if r[key] is not None and math.isfinite(float(r[key]))]
            out[key] = float(np.mean(finite)) if finite else None
        return {**out, "cases": len(group)}

    def by(key: str) -> dict[Any, dict[str, float | None]]:
        return {v: mean([r for r in rows.values() if r[key] == v]) for v in sorted({r[key] for r in rows.values()})}

    content = {"volumes": rows, "scrolls": by("scroll_id"), "folds": {str(k): v for k, v in by("fold").items()},
               "mean": mean(list(rows.values())), "complete": not missing}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "fold", "scroll_id", *metrics])
    for case, row in [*sorted(rows.items()), ("mean", {"fold": "", "scroll_id": "", **content["mean"]})]:
        writer.writerow([case, row["fold"], row["scroll_id"], *("" if row[k] is None else repr(float(row[k])) for k in metrics)])
    out = Path(output_dir)
    atomic_write_bytes(out / "cross_validation.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / "cross_validation.json", (json.dumps(content, indent=2) + "\n").encode())
    return content
