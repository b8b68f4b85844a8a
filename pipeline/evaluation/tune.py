"""Choose the threshold and post-processing that maximise the competition score (its command line:
``python -m pipeline tune``, :mod:`pipeline.cli.tune`).

The model runs once per validation volume, with the network, data, split, weights and sliding-window settings of
``train.yaml`` + ``evaluate.yaml`` (the evaluator of ``python -m monai.bundle run evaluating``, its
post-processing and metrics taken off). While a volume's probabilities are in memory, every setting of a grid
(threshold x hysteresis x closing x hole plugging x minimum component size) is applied to them with
:func:`transforms.postprocess.build_postprocessing`, exactly as inference does, and scored with
:func:`pipeline.evaluation.score.score_volume`. The mean over volumes ranks the settings; the best one is printed as the
``--key value`` overrides for the inference command, every row goes to ``<output_dir>/tuning.json``, and the best
setting is written into the model file's plans (atomically; ``--no_save`` leaves the file as it is), so that
inference, evaluate and predict use it from then on without any override (:mod:`pipeline.model.plans`). The network and
the sliding-window roi come from the model file too.

    python -m pipeline tune [--dataset_dir DIR] [--ckpt_dir DIR] [--output_dir DIR] [--tta] [--workers N] [--no_save]
        [--grid_threshold 0.3,0.5] [--grid_hysteresis_high none,0.85] [--grid_closing_radius 0,1]
        [--grid_plug_holes false,true] [--grid_min_size 0,1000] [--<bundle key> VALUE ...]

Cost: settings x volumes scorings (about 0.1 s each for a 64^3 volume, several seconds for 320^3); ``--workers``
scores settings in parallel processes.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from monai.bundle import ConfigParser
from monai.utils import CommonKeys as Keys

from pipeline.evaluation.score import COMPONENT_KEYS, score_volume
from pipeline.model.plans import POSTPROCESSING_KEYS
from transforms.postprocess import build_postprocessing

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "EVALUATE_CONFIGS",
    "MAIN_JOB_GRID",
    "Deadline",
    "PostprocessingSweep",
    "TimeUp",
    "SweepGrid",
    "format_overrides",
    "join_rows",
    "score_settings",
    "sweep",
    "sweep_workers",
]

EVALUATE_CONFIGS = ("train.yaml", "evaluate.yaml")
"""The configs of ``python -m monai.bundle run evaluating``, whose evaluator the sweep runs
(``pipeline.utils.config.load_config(*EVALUATE_CONFIGS, overrides=...)``)."""


Setting = dict[str, Any]


@dataclass(frozen=True)
class SweepGrid:
    """The post-processing settings to try: every combination of the values below.

    With a hysteresis high value the threshold is the weak (low) one, as in :func:`build_postprocessing`;
    combinations whose high value is not above the threshold are skipped.

    Args:
        threshold: probability thresholds (the hysteresis low threshold when ``hysteresis_high`` is set).
        hysteresis_high: strong hysteresis thresholds; ``None`` is plain thresholding.
        closing_radius: radii of the binary closing (0 = off).
        plug_holes: whether to plug 1-voxel holes.
        min_size: minimum 6-connected component sizes in voxels (0 = off).

    Example::

        grid = SweepGrid(threshold=(0.4, 0.5), min_size=(0, 1000))
        settings = grid.settings(default={"threshold": 0.5, "hysteresis_low": None, "hysteresis_high": None,
                                          "closing_radius": 0, "plug_holes": True, "min_size": 0})
    """

    threshold: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    hysteresis_high: tuple[float | None, ...] = (None, 0.85)
    closing_radius: tuple[int, ...] = (0, 1)
    plug_holes: tuple[bool, ...] = (False, True)
    min_size: tuple[int, ...] = (0, 1000, 20000)

    def settings(self, default: Mapping[str, Any] | None = None) -> list[Setting]:
        """All settings of the grid, ``default`` (a setting of the bundle's current values) first when given.

        Args:
            default: a setting with the keys :data:`pipeline.model.plans.POSTPROCESSING_KEYS`; put first and not repeated.

        Returns:
            Settings as dicts with the keys :data:`pipeline.model.plans.POSTPROCESSING_KEYS`.

        Raises:
            ValueError: when a dimension of the grid is empty, or ``default`` lacks a key.
        """
        for name, values in asdict(self).items():
            if not values:
                msg = f"grid dimension {name!r} is empty; give it at least one value"
                raise ValueError(msg)
        out: list[Setting] = []
        if default is not None:
            missing = [k for k in POSTPROCESSING_KEYS if k not in default]
            if missing:
                msg = f"default setting {dict(default)} lacks {missing}"
                raise ValueError(msg)
            out.append({k: default[k] for k in POSTPROCESSING_KEYS})
        for thr, high, radius, plug, size in itertools.product(
            self.threshold, self.hysteresis_high, self.closing_radius, self.plug_holes, self.min_size
        ):
            if high is not None and high <= thr:
                continue
            setting = {
                "threshold": thr,
                "hysteresis_low": None,
                "hysteresis_high": high,
                "closing_radius": radius,
                "plug_holes": plug,
                "min_size": size,
            }
            if setting not in out:
                out.append(setting)
        return out


MAIN_JOB_GRID = SweepGrid(hysteresis_high=(None,))
"""The grid ``python -m pipeline`` sweeps after training (72 settings: threshold x closing x hole plugging x
minimum component size; hysteresis, which doubles the cost, only on ``python -m pipeline tune``)."""


WORKER_BYTES = 400 * 2**20
"""A scoring process before its volume: the interpreter with numpy, SciPy, numba and the scoring modules."""
WORKER_BYTES_PER_VOXEL = 40
"""A scoring process per voxel of its volume: the probabilities it receives (float32), the label, the mask and the
post-processing's labelled components, and the exact TopoScore (+859 MiB on one 320^3 case, ~27 B/voxel)."""
PARALLEL_FROM_VOXELS = 128**3
"""Volumes below this are scored in one process: a worker's start (~10 s importing the scoring stack) would cost
more than it saves."""


def sweep_workers(voxels: int, cpus: int | None = None, available: int | None = None) -> int:
    """Processes to score a sweep's settings with (the main job's tune, after training has freed the machine): one per
    core, no more than the memory available holds (each :data:`WORKER_BYTES` + :data:`WORKER_BYTES_PER_VOXEL` per
    voxel of the largest volume), and one for volumes under :data:`PARALLEL_FROM_VOXELS`.

    Example::

        sweep_workers(320**3, cpus=4, available=29 * 2**30)   # 4 on the Kaggle box
    """
    from pipeline.utils.memory import available_memory

    if voxels < PARALLEL_FROM_VOXELS:
        return 1
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    available = available_memory() if available is None else available
    fits = int(available // (WORKER_BYTES + WORKER_BYTES_PER_VOXEL * voxels))
    return max(1, min(cpus, fits))


class TimeUp(Exception):
    """The sweep's :class:`Deadline` passed before a volume had every setting scored."""


@dataclass(frozen=True)
class Deadline:
    """When a sweep must stop: the time by which the job must be done, less the prediction that follows the sweep,
    estimated from the sweep's own sliding-window speed.

    Args:
        end: the job's limit, as ``time.time()``; ``math.inf`` for none.
        follow_voxels: voxel passes of the prediction after the sweep (test voxels x its TTA passes).
        factor: safety factor on the prediction's estimate (the training clock's 1.25).
        margin_s: seconds kept besides (writing the masks and the zip).
        cap: a ``time.time()`` by which the sweep itself must be done whatever the job's limit (the main job's
            ``--tune_time``), or None.

    Example::

        deadline = Deadline(end=job_start + 9 * 3600, follow_voxels=3 * 320**3 * 8)
        deadline.at(seconds_per_voxel=2e-6)  # the time.time() by which the sweep must be done
    """

    end: float
    follow_voxels: int = 0
    factor: float = 1.25
    margin_s: float = 10.0
    cap: float | None = None

    def at(self, seconds_per_voxel: float) -> float:
        """The sweep's own deadline, given the measured sliding-window seconds per voxel pass."""
        job = self.end - self.factor * self.follow_voxels * seconds_per_voxel - self.margin_s
        return job if self.cap is None else min(job, self.cap)


def score_settings(
    probs: np.ndarray, label: np.ndarray, settings: Sequence[Setting], deadline: float | None = None
) -> list[dict[str, float]]:
    """Post-process one volume's probabilities with each setting and score the masks against the label.

    Args:
        probs: probabilities, channel-first ``(1, Z, Y, X)``.
        label: label ``(Z, Y, X)`` in {0, 1, 2}.
        settings: dicts of :func:`transforms.postprocess.build_postprocessing` arguments.
        deadline: a ``time.time()`` by which the scoring must be done: no setting is started that would end after
            it (the settings so far give the time one takes), and once the remaining settings cannot all be
            scored by then the volume is given up at once, not at the deadline.

    Returns:
        One :func:`pipeline.evaluation.score.score_volume` dict per setting.

    Raises:
        TimeUp: the settings cannot all be scored by ``deadline``.
    """
    rows: list[dict[str, float]] = []
    spent = 0.0
    for s in settings:
        if deadline is not None:
            each = spent / len(rows) if rows else 0.0
            left = len(settings) - len(rows)
            now = time.time()
            if now + each * left > deadline:
                need = f"; the other {left} need ~{each * left:.0f} s, {max(0.0, deadline - now):.0f} s left" if rows else ""
                msg = f"{len(rows)} of {len(settings)} settings scored{need}"
                raise TimeUp(msg)
        start = time.monotonic()
        rows.append(score_volume(np.asarray(build_postprocessing(**s)(probs))[0], label))
        spent += time.monotonic() - start
    return rows


class PostprocessingSweep:
    """Ignite handler for an evaluator whose output ``pred`` holds probabilities: scores every setting on each
    volume as it is predicted, so only one volume's probabilities are held at a time.

    Args:
        settings: the settings to score (see :meth:`SweepGrid.settings`).
        id_key: batch key holding the case id.
        executor: a process pool to score the settings in parallel; None scores them in this process.
        chunks: number of parallel tasks per volume (usually the pool's worker count).
        deadline: when set, a volume is scored only while the time left covers its scoring (as long as the
            volumes before it took) and the prediction after the sweep (estimated from this sweep's sliding-window
            speed, ``passes`` per voxel); a volume that cannot be finished by then is dropped as soon as that is
            known (:func:`score_settings`), the evaluator terminated, and the settings ranked on the volumes scored
            in full.
        passes: the evaluator's forward passes per voxel (its TTA flips).

    Example::

        sweep = PostprocessingSweep(SweepGrid().settings())
        sweep.attach(evaluator)
        evaluator.run()
        rows = sweep.rows()  # best first
    """

    def __init__(
        self,
        settings: Sequence[Setting],
        id_key: str = "id",
        executor: Executor | None = None,
        chunks: int = 1,
        deadline: Deadline | None = None,
        passes: int = 1,
    ) -> None:
        self.settings = [dict(s) for s in settings]
        self.id_key = id_key
        self.executor = executor
        self.chunks = max(1, chunks)
        self.deadline = deadline
        self.passes = max(1, passes)
        self.scores: dict[str, list[dict[str, float]]] = {}
        self.stopped: str | None = None  # why the sweep stopped before the last volume, if it did
        self._model_s = 0.0  # sliding-window seconds and voxel passes so far: the speed the deadline uses
        self._voxels = 0
        self._started = 0.0
        self._scoring_s = 0.0  # seconds spent scoring the volumes in self.scores

    def attach(self, engine: Engine) -> None:
        """Score each predicted volume when its iteration completes."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self._started = time.monotonic()

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        ids = [item[self.id_key] for item in batch] if isinstance(batch, list) else list(batch[self.id_key])
        self._model_s += time.monotonic() - self._started
        self._voxels += sum(math.prod(item[Keys.PRED].shape[-3:]) for item in outputs) * self.passes
        until = None if self.deadline is None else self.deadline.at(self._model_s / max(self._voxels, 1))
        for case, item in zip(map(str, ids), outputs):
            now = time.time()
            each = self._scoring_s / len(self.scores) if self.scores else 0.0
            if until is not None and self.scores and now + each > until:  # a volume takes about as long as the last
                self._stop(engine, case, f"one takes ~{each:.0f} s to score, {max(0.0, until - now):.0f} s left")
                return
            probs = item[Keys.PRED].detach().float().cpu().numpy()
            label = item[Keys.LABEL].detach().cpu().numpy()
            start = time.monotonic()
            try:
                self.scores[case] = self._score(probs, label.reshape(label.shape[-3:]), until)
            except TimeUp as e:
                self._stop(engine, case, str(e))
                return
            self._scoring_s += time.monotonic() - start
            best = max(row["score"] for row in self.scores[case])
            engine.logger.info("tuning: %s scored with %d settings (best %.4f)", case, len(self.settings), best)

    def _stop(self, engine: Engine, case: str, why: str) -> None:
        self.stopped = (f"time is up at validation volume {len(self.scores) + 1} ({case}: {why}); "
                        f"ranked on the {len(self.scores)} volume(s) scored in full")
        engine.logger.info("tuning: %s", self.stopped)
        engine.terminate()

    def _score(self, probs: np.ndarray, label: np.ndarray, until: float | None) -> list[dict[str, float]]:
        if self.executor is None or self.chunks == 1:
            return score_settings(probs, label, self.settings, until)
        parts = [list(part) for part in np.array_split(np.arange(len(self.settings)), self.chunks) if len(part)]
        futures = [
            self.executor.submit(score_settings, probs, label, [self.settings[i] for i in p], until) for p in parts
        ]
        return [row for future in futures for row in future.result()]

    def rows(self) -> list[dict[str, Any]]:
        """One row per setting: the setting, the mean of each score component and each volume's score; best first.

        Raises:
            RuntimeError: when no volume has been scored.
        """
        if not self.scores:
            msg = ("no volume was scored: " + self.stopped if self.stopped else
                   "no volume was scored: the validation split is empty or the evaluator did not run")
            raise TimeUp(msg) if self.stopped else RuntimeError(msg)
        rows = []
        for i, setting in enumerate(self.settings):
            per_volume = {case: scores[i] for case, scores in self.scores.items()}
            mean = {key: float(np.mean([v[key] for v in per_volume.values()])) for key in COMPONENT_KEYS}
            rows.append({**setting, **mean, "volumes": {case: v["score"] for case, v in per_volume.items()}})
        return sorted(rows, key=lambda row: -row["score"])


def sweep(
    parser: ConfigParser,
    settings: Sequence[Setting],
    workers: int = 1,
    deadline: Deadline | None = None,
    stopped: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the bundle's evaluator once over the validation split and score ``settings`` on every volume.

    The evaluator keeps its network, data, checkpoint loader, sliding window (and TTA) and autocast; its
    post-processing, metrics and other handlers are taken off, so ``pred`` holds probabilities.

    Args:
        parser: ``train.yaml`` + ``evaluate.yaml`` (:data:`EVALUATE_CONFIGS`), modified in place.
        settings: the settings to score.
        workers: processes that score settings in parallel (1 = in this process).
        deadline: stop scoring volumes when the prediction after the sweep would not fit (see
            :class:`PostprocessingSweep`); the rows then cover the volumes scored in full.
        stopped: a list that gets why the sweep stopped early, when it did.

    Returns:
        :meth:`PostprocessingSweep.rows`, best first.

    Raises:
        TimeUp: ``deadline`` passed before one volume was scored in full.
    """
    parser["validate#postprocessing"] = None
    parser["validate#key_metric"] = None
    parser["validate#evaluator#additional_metrics"] = None
    parser["validate#handlers"] = ["@checkpoint_loader"]
    parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("validate#evaluator")
    executor = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    )
    try:
        tta = bool(parser.get_parsed_content("tta"))
        passes = 2 ** len(parser.get_parsed_content("tta_axes")) if tta else 1
        handler = PostprocessingSweep(settings, executor=executor, chunks=workers, deadline=deadline, passes=passes)
        handler.attach(evaluator)
        evaluator.run()
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    if stopped is not None and handler.stopped:
        stopped.append(handler.stopped)
    return handler.rows()


def join_rows(parts: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of sweeps of the same settings over disjoint volumes (each fold's out-of-fold cases, scored with the
    fold's model) as one sweep's: each setting's components averaged over every volume (each part weighted by its
    volume count), its volumes joined; best first.

    Example::

        rows = join_rows([sweep(fold0_parser, settings), sweep(fold1_parser, settings)])
    """
    joined: dict[tuple, dict[str, Any]] = {}
    for rows in parts:
        for row in rows:
            key = tuple(row[k] for k in POSTPROCESSING_KEYS)
            n = len(row["volumes"])
            if key not in joined:
                joined[key] = {**{k: row[k] for k in POSTPROCESSING_KEYS}, **dict.fromkeys(COMPONENT_KEYS, 0.0),
                               "volumes": {}}
            out = joined[key]
            overlap = set(out["volumes"]) & set(row["volumes"])
            if overlap:
                msg = f"volume(s) {sorted(overlap)} scored in two parts: the parts must cover disjoint volumes"
                raise ValueError(msg)
            total = len(out["volumes"]) + n
            for k in COMPONENT_KEYS:
                out[k] = (out[k] * len(out["volumes"]) + row[k] * n) / total
            out["volumes"].update(row["volumes"])
    return sorted(joined.values(), key=lambda row: -row["score"])


def _literal(value: Any) -> str:
    # Python literals: both `python -m monai.bundle` (fire) and `python -m pipeline` read True/False/None, while
    # fire passes "false"/"null" on as (truthy) strings
    return repr(value)


def format_overrides(setting: Mapping[str, Any]) -> str:
    """The ``--key value`` arguments that select ``setting`` in ``inference.yaml`` / ``evaluate.yaml``."""
    return " ".join(f"--{key} {_literal(setting[key])}" for key in POSTPROCESSING_KEYS)
