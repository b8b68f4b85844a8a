"""Runs by the clock: training that stops in time for what must follow it (``time_limit``).

A Kaggle session ends after 12 h (the competition's submission notebook after 9 h) and cluster jobs have a
wall-clock limit. Lightning's ``Trainer(max_time=...)`` and ignite's ``TimeLimit`` stop training when the time is
up; neither leaves time for what a run still has to do after training: the last validation (so that ``model.pt``
holds the newest weights worth keeping), the checkpoint that resumes the run, and the prediction of the test set.

:class:`TimeLimit` keeps the deadline (``time_limit`` seconds after the job's start, :func:`pipeline.utils.timing.job_start`) and
measures, while training runs, what stopping costs:

- an iteration: the median of the last 25 iteration times within an epoch (data wait included; validation and an
  epoch's first iteration, which waits for the loader's start or a resume's replay, excluded);
- the validation: the last validation's seconds. Before the first validation it is estimated as its sliding
  windows, from the training step (a forward pass costs about a third of a training step: forward + backward; the
  patch at ``val_overlap`` over this rank's share of the validation voxels), plus its scoring
  (``score_s_per_voxel``, measured on one core: the exact TopoScore of a 320^3 case takes ~60 s, and the local ranks
  score one at a time, :func:`pipeline.utils.distributed.one_local_rank_at_a_time`); without the scoring, the first
  40 x 320^3 dry runs were estimated at a third of their validations (3:08 against 9:55);
- the checkpoint write: the last one's seconds (5 s until one is written);
- the inference after training (``inference_voxels``: the test voxels times the TTA passes, which
  ``python -m pipeline`` sets): at the voxels per second of the validation's sliding windows alone (from each
  iteration's start to MONAI's ``FORWARD_COMPLETED``: the scoring is no part of inference), corrected for the
  windows' overlap.

At each iteration boundary :class:`pipeline.training.checkpoint.TrainingCheckpointer` asks :meth:`TimeLimit.due`
(on rank 0; the answer is all-reduced with its other decisions, so every rank stops at the same iteration):
training stops when 1.5 iterations and what stopping costs, times ``safety``, no longer fit before the
deadline. The checkpointer then validates the weights (unless this epoch's validation just did), writes a
checkpoint that resumes exactly, logs the cut and terminates the trainer; the run ends with exit code 0.

A limit that cannot fit one epoch and what follows it is refused after the first five iterations of a fresh run (or
before the clock would cut it), on every rank at once, with the minimum in the message (:class:`pipeline.utils.errors.SettingsError`, exit code 2).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine, Events

from pipeline.utils.errors import SettingsError
from pipeline.utils.timing import format_eta, job_start, parse_duration

__all__ = ["AUTO", "SCORE_S_PER_VOXEL", "EpochsToFit", "TimeLimit", "cycle_ends", "schedule_epochs"]

SCORE_S_PER_VOXEL = {"exact": 2.2e-6, "fast": 3.5e-7}
"""Seconds per voxel to score a validation case on one core, by ``val_topo_mode``: post-processing 4.2 s, exact
TopoScore 62.6 s (fast estimate 3.2 s), surface Dice 2.7 s, VOI 1.4 s on one synthetic 320^3 case."""

def _windows(overlap: float) -> float:
    """Sliding windows per patch-sized volume at ``overlap`` (each axis steps ``1 - overlap`` of the window)."""
    return 1.0 / (1.0 - min(max(float(overlap), 0.0), 0.95)) ** 3


class TimeLimit:
    """The deadline of a run and what stopping before it costs; see the module docstring.

    Args:
        time_limit: seconds or a duration string (:func:`pipeline.utils.timing.parse_duration`); None disables the
            handler.
        start: the job's start in seconds since the epoch; None: :func:`pipeline.utils.timing.job_start`.
        val_cases: the validation cases (items with a ``"shape"``, as the volume store gives them), for the
            estimate before the first validation.
        val_overlap: the validation's sliding-window overlap.
        patch_size: the training patch (the validation window).
        patches_per_iteration: patches in one training iteration (batch size x samples per volume).
        inference_voxels: voxels predicted after training, times the TTA passes (0: none in this job).
        inference_overlap: the inference's sliding-window overlap.
        score_s_per_voxel: seconds to score one validation voxel (:data:`SCORE_S_PER_VOXEL`; 0 without a score),
            for the estimate before the first validation.
        safety: factor on the estimated cost of stopping.
        name: logger name.

    Example::

        clock = TimeLimit("11h30m", val_cases=store["val"], patch_size=[128] * 3, patches_per_iteration=4)
        clock.attach(trainer, evaluator)
        checkpointer = TrainingCheckpointer(..., clock=clock)
    """

    def __init__(
        self,
        time_limit: Any = None,
        start: float | None = None,
        val_cases: Sequence[dict] = (),
        val_overlap: float = 0.25,
        patch_size: Sequence[int] = (64, 64, 64),
        patches_per_iteration: int = 1,
        inference_voxels: int = 0,
        inference_overlap: float = 0.5,
        score_s_per_voxel: float = 0.0,
        safety: float = 1.25,
        name: str | None = None,
    ) -> None:
        self.limit_s = parse_duration(time_limit)
        self.enabled = self.limit_s is not None
        self.start = job_start() if start is None else float(start)
        self.deadline = self.start + (self.limit_s or 0.0)
        self.val_voxels = sum(math.prod(int(n) for n in case["shape"]) for case in val_cases)
        self.val_overlap = float(val_overlap)
        self.patch_voxels = math.prod(int(p) for p in patch_size)
        self.patches_per_iteration = max(1, int(patches_per_iteration))
        self.inference_voxels = int(inference_voxels)
        self.inference_overlap = float(inference_overlap)
        self.score_s_per_voxel = float(score_s_per_voxel)
        self.safety = float(safety)
        self._name = name
        self.logger = logging.getLogger(name)
        self._steps: deque[float] = deque(maxlen=25)
        self.validation_s: float | None = None
        self.validation_total = 0.0
        self.validated_voxels = 0
        self.forward_s = 0.0  # the last validation's sliding windows alone
        self.save_s = 5.0
        self._last: float | None = None
        self._val_start = 0.0
        self._val_voxels_seen = 0
        self._forward_start = 0.0
        self._forward_seen = 0.0
        self._checked = False
        self.fit: Any = None  # an EpochsToFit, when epochs: auto

    def resumed(self, engine: Engine) -> None:
        """Called by the checkpointer at ``STARTED`` once it has restored a checkpoint (or found none)."""
        self._fresh = engine.state.iteration == 0  # a fresh run must hold one epoch (_check_one_epoch)
        if self.fit is not None:
            self.fit.resumed(engine)

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> None:
        """Measure ``trainer``'s iterations and ``evaluator``'s validations (no-op when disabled)."""
        if not self.enabled:
            return
        if self._name is None:
            self.logger = trainer.logger
        trainer.add_event_handler(Events.STARTED, self._started)
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        if evaluator is not None:
            from monai.engines.utils import IterationEvents

            evaluator.add_event_handler(Events.STARTED, self._val_started)
            evaluator.add_event_handler(Events.ITERATION_STARTED, self._forward_started)
            with contextlib.suppress(ValueError):  # an engine that does not fire it (MONAI's engines do)
                evaluator.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._forward_completed)
            evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._val_iteration)
            evaluator.add_event_handler(Events.COMPLETED, self._val_completed)

    # --- measurements ---
    def _started(self, engine: Engine) -> None:
        left = self.deadline - time.time()
        self.logger.info(f"time_limit {format_eta(self.limit_s or 0)}: {format_eta(max(left, 0))} left for "
                         "training and what follows it")
        if left <= 0:
            msg = (f"time_limit {format_eta(self.limit_s or 0)}: the time is up before training starts "
                   f"({format_eta(time.time() - self.start)} since the job started); give a longer time_limit")
            raise SettingsError(msg)

    def _epoch_started(self, engine: Engine) -> None:
        # an epoch's first iteration is not measured: it waits for the loader's start (workers, and on a mid-epoch
        # resume the replay of the batches already trained), which is no iteration's cost
        self._last = None if (engine.state.epoch_length or 0) > 1 else time.monotonic()

    @property
    def iteration_s(self) -> float | None:
        """Seconds per iteration: the median of the last 25 (a slow first step or a stall does not count)."""
        return statistics.median(self._steps) if self._steps else None

    def _iteration_completed(self, engine: Engine) -> None:
        now = time.monotonic()
        if self._last is not None:
            self._steps.append(now - self._last)
        self._last = now

    def _val_started(self, engine: Engine) -> None:
        self._val_start = time.monotonic()
        self._val_voxels_seen = 0
        self._forward_seen = 0.0

    def _forward_started(self, engine: Engine) -> None:
        self._forward_start = time.monotonic()

    def _forward_completed(self, engine: Engine) -> None:
        self._forward_seen += time.monotonic() - self._forward_start

    def _val_iteration(self, engine: Engine) -> None:
        # a MONAI evaluator has decollated the batch into a list of per-case dicts by now
        batch = engine.state.batch
        for item in batch if isinstance(batch, (list, tuple)) else [batch]:
            image = item.get("image") if isinstance(item, dict) else None
            if image is not None and hasattr(image, "numel"):
                self._val_voxels_seen += int(image.numel())

    def _val_completed(self, engine: Engine) -> None:
        self.validation_s = time.monotonic() - self._val_start
        self.validation_total += self.validation_s
        self.validated_voxels = self._val_voxels_seen
        self.forward_s = self._forward_seen or self.validation_s  # an engine without FORWARD_COMPLETED: all of it
        self._last = time.monotonic()  # the next iteration's time excludes the validation

    def saved(self, seconds: float) -> None:
        """The checkpointer reports how long its last write took."""
        self.save_s = float(seconds)

    # --- estimates ---
    def _forward_voxels_per_s(self) -> float | None:
        """Voxels per second of sliding-window forward passes at the validation's overlap."""
        if self.forward_s and self.validated_voxels:
            return self.validated_voxels / self.forward_s
        if self.iteration_s:
            # a forward pass ~ a third of a training step; windows of the patch cover the volume _windows times
            forward_s = self.iteration_s / (3.0 * self.patches_per_iteration)
            return self.patch_voxels / forward_s / _windows(self.val_overlap)
        return None

    def validation_estimate(self) -> float:
        """Seconds of one validation: the last one's, or estimated: this rank's share of the sliding windows at the
        training step's speed, and the scoring of the cases of every rank on this machine (they take turns)."""
        if self.validation_s is not None:
            return self.validation_s
        speed = self._forward_voxels_per_s()
        if not speed or not self.val_voxels:
            return 0.0
        import ignite.distributed as idist

        world, local = max(1, idist.get_world_size()), max(1, idist.get_nproc_per_node())
        return self.val_voxels / world / speed + self.val_voxels * local / world * self.score_s_per_voxel

    def inference_estimate(self) -> float:
        """Seconds of the prediction after training (``inference_voxels`` at the validation's speed, corrected for
        the overlap)."""
        speed = self._forward_voxels_per_s()
        if not self.inference_voxels or not speed:
            return 0.0
        return self.inference_voxels * _windows(self.inference_overlap) / _windows(self.val_overlap) / speed

    def stop_cost(self) -> float:
        """Seconds that stopping needs (validation, checkpoint, inference) with the safety factor, and a margin for
        the rest (handlers at the end of training, the inference's start-up): 10 s + 3 % of the limit, at most 5
        minutes."""
        margin = min(300.0, 10.0 + 0.03 * (self.limit_s or 0.0))
        return self.safety * (self.validation_estimate() + self.save_s + self.inference_estimate()) + margin

    def left(self) -> float:
        """Seconds to the deadline."""
        return self.deadline - time.time()

    def due(self, engine: Engine) -> bool:
        """Whether training must stop now: one more iteration and the stop's cost no longer fit. Never on fewer
        than five measured iterations (all but the first of a shorter epoch, at least two), unless the deadline
        itself has passed: a run's first iterations are its slowest (a cold page cache, a busy machine), and until
        a validation is measured the stop's cost is estimated from them (a 40 x 320^3 dry run beside a test suite
        was cut after three iterations of a 16-minute budget)."""
        length = getattr(getattr(engine, "state", None), "epoch_length", None) or 6
        if not self.enabled or (len(self._steps) < min(5, max(2, length - 1)) and self.left() > 0):
            return False
        return self.left() <= 1.5 * (self.iteration_s or 0.0) + self.stop_cost()

    def describe(self) -> str:
        """What the stop reserves, for the log."""
        return (f"validation ~{format_eta(self.validation_estimate())}, checkpoint ~{format_eta(self.save_s)}"
                f", inference ~{format_eta(self.inference_estimate())}, x{self.safety:g}, + 10 s + 3 % of the limit")

    def refusal(self, engine: Engine) -> str | None:
        """Why this fresh run's limit cannot hold one epoch and what follows it (with the minimum), else None.
        Judged once, after five iterations (or earlier, when the deadline has passed); the checkpointer asks on
        rank 0 and every rank raises :class:`SettingsError` together.

        Refused only when the estimates themselves (one epoch, validation, checkpoint, inference) do not fit: the
        first iterations of a run are its slowest (a cold page cache, a busy machine), so a limit that holds them
        without the safety factor is tried, and the clock stops that run as early as it must. The minimum the
        message gives includes the factor and the margin."""
        if self._checked or not getattr(self, "_fresh", False) or self.iteration_s is None:
            return None
        if len(self._steps) < min(5, max(1, (engine.state.epoch_length or 6) - 1)) and self.left() > 0:
            return None
        self._checked = True
        length = engine.state.epoch_length or 1
        elapsed = time.time() - self.start
        need = elapsed + length * self.iteration_s + self.stop_cost()
        bare = (elapsed + length * self.iteration_s + self.validation_estimate() + self.save_s
                + self.inference_estimate())
        self.logger.info(f"time_limit: one epoch ~{format_eta(length * self.iteration_s)} "
                         f"({length} iterations), after training: {self.describe()}")
        if bare <= (self.limit_s or 0):
            return None
        return (f"time_limit {format_eta(self.limit_s or 0)} is too short for one epoch: {format_eta(elapsed)} already "
                f"used (data check, store build), one epoch ~{format_eta(length * self.iteration_s)}, then "
                f"{self.describe()}: give at least {format_eta(need)}")


AUTO = "auto"
PROVISIONAL_EPOCHS = 1_000_000
"""The trainer's length under ``epochs: auto`` until :class:`EpochsToFit` fixes it after the first epoch."""


def schedule_epochs(epochs: Any) -> int:
    """The trainer's ``max_epochs`` for train.yaml's ``epochs``: the number, or :data:`PROVISIONAL_EPOCHS` for
    ``auto``."""
    if epochs == AUTO:
        return PROVISIONAL_EPOCHS
    try:
        value = int(epochs)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or value != epochs:
        msg = f"epochs: {epochs!r} is not a number of epochs; give a whole number >= 1, or auto (with a time_limit)"
        raise SettingsError(msg)
    return value


def cycle_ends(warmup_epochs: float, t_0: float, t_mult: int, up_to: float) -> list[float]:
    """The epochs at which a cosine cycle of ``WarmupCosineRestarts`` ends, up to ``up_to``: the warmup, then cycles of
    ``t_0``, ``t_0 * t_mult``, ... epochs."""
    ends, end, length = [], warmup_epochs + t_0, t_0
    while end <= up_to:
        ends.append(end)
        length *= t_mult
        end += length
    return ends


class EpochsToFit:
    """``epochs: auto``: after the first epoch the run measures itself and fixes its number of epochs so that training
    ends by the time limit, at a cosine cycle's end (``cosine_restarts``) or with the poly decay reaching zero there.
    The first epoch's wall time (start to start: handlers and checkpoint included, its validation taken out) plus an
    epoch's share of a validation is the cost of an epoch; the room is the time left less the stop's cost
    (:meth:`TimeLimit.stop_cost`), with 5 % to spare.

    The choice (``state.epochs_chosen``, one of the trainer's ``state_dict_user_keys``) is logged, saved in every
    checkpoint and kept on resume; a resumed run under another limit says whether the rest fits in this session or
    will be cut by the clock again.

    Args:
        clock: the run's :class:`TimeLimit` (enabled: ``auto`` needs a ``time_limit``).
        epochs: train.yaml's ``epochs``; anything but ``"auto"`` disables the handler.
        lr_scheduler: the run's scheduler; a poly one gets the new end (``max_iters``).
        schedule: ``"cosine_restarts"`` or ``"poly"``.
        warmup_epochs, T_0, T_mult: the cosine schedule (cycle ends are ``warmup + T_0``, ``+ T_0 * T_mult``, ...).
        val_interval: epochs between validations (their cost is shared out over the epochs).
        name: logger name.

    Raises:
        SettingsError: ``auto`` without a ``time_limit``.
    """

    def __init__(
        self,
        clock: TimeLimit,
        epochs: Any,
        lr_scheduler: Any = None,
        schedule: str = "cosine_restarts",
        warmup_epochs: float = 1.0,
        T_0: float = 10.0,  # noqa: N803 - train.yaml's names
        T_mult: int = 2,  # noqa: N803
        val_interval: int = 1,
        name: str | None = None,
    ) -> None:
        self.enabled = epochs == AUTO
        if self.enabled and not clock.enabled:
            msg = "epochs: auto fixes the number of epochs to fit a time_limit; give one (e.g. --time_limit 11h30m)"
            raise SettingsError(msg)
        self.clock = clock
        self.lr_scheduler = lr_scheduler
        self.schedule = schedule
        self.warmup_epochs, self.t_0, self.t_mult = float(warmup_epochs), float(T_0), int(T_mult)
        self.val_interval = max(1, int(val_interval))
        self._name = name
        self.logger = logging.getLogger(name)
        self._last: tuple[float, float] | None = None
        self._fixed = False

    def attach(self, trainer: Engine) -> None:
        """Register the choice with ``trainer``'s saved state; attach before the checkpointer."""
        if not self.enabled:
            return
        if self._name is None:
            self.logger = trainer.logger
        trainer.state_dict_user_keys.append("epochs_chosen")
        trainer.state.epochs_chosen = 0
        self.clock.fit = self  # the checkpointer calls clock.resumed() once it has restored a checkpoint
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)

    def _epoch_cost(self, wall: float, validated: float) -> float:
        """Seconds per epoch: the last epoch's wall time (start to start: its handlers, plots and checkpoint
        included) without the validation it ran, plus an epoch's share of a validation."""
        return wall - validated + self.clock.validation_estimate() / self.val_interval

    def _set(self, engine: Engine, epochs: int) -> None:
        engine.state.max_epochs = engine.state.epochs_chosen = epochs
        if self.schedule == "poly" and hasattr(self.lr_scheduler, "max_iters"):
            self.lr_scheduler.max_iters = max(epochs * self._length, self.lr_scheduler.warmup_iters + 1)

    def resumed(self, engine: Engine) -> None:
        """At ``STARTED``, after the checkpointer's resume: a choice restored from a checkpoint is kept."""
        self._length = engine.state.epoch_length or 1
        chosen = int(getattr(engine.state, "epochs_chosen", 0) or 0)
        if chosen:
            self._set(engine, chosen)
            self._fixed = True
            self.logger.info(f"epochs: auto: keeping the {chosen} epochs chosen when the run started "
                             f"({chosen - engine.state.epoch} to go; time_limit {format_eta(self.clock.limit_s)} "
                             "this session, the clock cuts the run again if they do not fit)")

    def _epoch_started(self, engine: Engine) -> None:
        """At the start of the second epoch this process trains: the first one measured, the choice made; revised
        once after the first validation when that came later (until then its cost is an estimate)."""
        now, validated = time.monotonic(), self.clock.validation_total
        last, self._last = self._last, (now, validated)
        measured = self.clock.validation_s is not None
        if last is None or self._fixed or (engine.state.epochs_chosen and not measured):
            return
        done, cost = engine.state.epoch - 1, self._epoch_cost(now - last[0], validated - last[1])
        room = self.clock.left() - self.clock.stop_cost()
        fit = done + max(0, int(room // (1.05 * cost)))
        ends = [e for e in cycle_ends(self.warmup_epochs, self.t_0, self.t_mult, fit) if e > done]
        if self.schedule == "cosine_restarts" and ends:
            chosen, how = int(ends[-1]), "the end of a cosine cycle"
        else:
            chosen = fit
            how = "poly decay to its end" if self.schedule == "poly" else "no cosine cycle ends in time: mid-cycle"
        chosen = max(chosen, engine.state.epoch)  # the epoch just started runs (the clock cuts it if need be)
        revised = bool(engine.state.epochs_chosen)
        self._set(engine, chosen)
        self._fixed = measured
        when = ("revised with the first validation measured" if revised else
                "fixed" if measured else "until the first validation is measured")
        self.logger.info(f"epochs: auto: {chosen} epochs, {when} ({how}; ~{format_eta(cost)} per epoch, "
                         f"{format_eta(room)} of time_limit {format_eta(self.clock.limit_s)} left for training)")
