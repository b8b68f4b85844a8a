"""Never lose work: timed and per-epoch training checkpoints, atomic writes and exact automatic resume.

MONAI's ``CheckpointSaver`` writes non-atomically, has no time-based trigger, forgets files written by an earlier
process and does not save random states; ``CheckpointLoader`` keeps the old ``epoch_length`` and cannot resume
mid-epoch. :class:`TrainingCheckpointer` fills these gaps as one ignite handler, generic over any ignite ``Engine``
(MONAI's ``SupervisedTrainer`` included).

Files (named by role, as nnU-Net does) in ``ckpt_dir``:

- ``checkpoint_epoch=EEEE_iter=IIIIII.pt``: written every ``interval_minutes`` of wall time (at an iteration
  boundary) and every ``every_epochs`` epochs; only the newest ``keep_last`` are kept, counting those left by earlier
  runs in the same folder.
- ``checkpoint_final.pt``: written when the run reaches ``max_epochs``.

Every file loads with ``torch.load(path, weights_only=True)``: it holds state dicts, plain numbers, lists and
tensors only (numpy and python random states are converted).

Exact mid-epoch resume. ignite restarted at iteration ``k`` of an epoch builds a fresh data iterator: the shuffle
order, the worker seeds and the transforms' random numbers all differ from the interrupted run. The checkpointer
therefore puts a thin stand-in for the data loader in ``engine.state.dataloader`` at ``STARTED``; ignite creates each
epoch's iterator through it (``iter(engine.state.dataloader)``), which lets it record the random state of that exact
moment (torch CPU/CUDA, numpy, ``random``, every ``Randomizable.R`` in the dataset's transform chain, the loader's
generators). A checkpoint stores that epoch-start state and the current one. On resume at iteration ``k`` of an
epoch, ignite itself computes the in-epoch counter from ``state.iteration``; the stand-in restores the epoch-start
state, creates the iterator, fetches and discards ``k`` batches (so the sampler, the worker seeds and the transforms
consume the same random numbers as before) and then restores the state saved at the checkpoint. This holds for
``num_workers=0`` and ``num_workers>0`` (workers are reseeded from the restored generator), not for
``persistent_workers=True`` (workers then carry random state across epochs; a warning is logged). It assumes no
handler draws random numbers at ``EPOCH_STARTED``/``GET_BATCH_STARTED`` and that the checkpointer is attached
after every other handler (so that, e.g., the LR scheduler's per-iteration step is saved).

Under DDP every rank builds and attaches the handler; the timed decision is taken on rank 0 and broadcast, random
states are gathered from every rank, only rank 0 writes, and each rank restores its own random state.

Preemption. SIGTERM (what Kaggle, SLURM and Kubernetes send before killing), SIGUSR1 (SLURM's ``--signal``
warning) and SIGINT (Ctrl-C; a second one aborts at once) only set a flag while training runs. At the next
iteration boundary a checkpoint is written and the run raises :class:`pipeline.utils.errors.Preempted` (exit code 128 +
the signal number): the iteration in flight completes and is saved, none is lost. The flag is all-reduced across
ranks with the timed decision (one small collective per iteration), so a signal on any rank stops every rank at
the same iteration. At the last iteration of an epoch the checkpoint waits for the epoch's handlers (validation):
a file written before them would resume past the epoch's validation.

One run per folder: rank 0 holds ``ckpt_dir``'s lock (:mod:`pipeline.training.lock`) for the whole run; random
states are captured and restored by :mod:`pipeline.training.rng`, the preemption signals are
:mod:`pipeline.utils.signals`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch.nn.parallel import DataParallel, DistributedDataParallel

from pipeline.model.plans import (
    ModelFileError,
    load_model_file,
    network_difference,
    pack_model,
)
from pipeline.training.lock import dir_lock
from pipeline.training.rng import RngState, capture_rng_state, restore_rng_state
from pipeline.utils.errors import CheckpointDirError, Preempted, SettingsError, pass_on
from pipeline.utils.files import atomic_save
from pipeline.utils.signals import SignalFlag
from pipeline.utils.timing import format_eta

__all__ = [
    "FINAL_NAME",
    "checkpoint_name",
    "checkpoint_progress",
    "check_init_network",
    "find_latest_checkpoint",
    "completed_epochs",
    "TrainingCheckpointer",
    "BestModelSaver",
]

logger = logging.getLogger(__name__)

FINAL_NAME = "checkpoint_final.pt"
_PERIODIC_RE = re.compile(r"^checkpoint_epoch=(\d+)_iter=(\d+)\.pt$")
_TMP_GLOB = ".*.tmp"  # temporary files of atomic writes (checkpoints, model.pt) a killed run left behind


def checkpoint_name(epoch: int, iteration: int) -> str:
    """File name of a timed or per-epoch checkpoint, e.g. ``checkpoint_epoch=0003_iter=000120.pt``."""
    return f"checkpoint_epoch={epoch:04d}_iter={iteration:06d}.pt"


def _periodic_checkpoints(ckpt_dir: Path) -> list[tuple[tuple[int, int], Path]]:
    """Timed/per-epoch checkpoints in ``ckpt_dir`` with their (epoch, iteration), oldest first."""
    found = []
    for path in ckpt_dir.glob("checkpoint_epoch=*_iter=*.pt"):
        match = _PERIODIC_RE.match(path.name)
        if match:
            found.append(((int(match[1]), int(match[2])), path))
    return sorted(found)


def checkpoint_progress(path: str | os.PathLike) -> tuple[int, int] | None:
    """(epoch, iteration) stored in the checkpoint ``path``, or None with a warning when the file cannot be read."""
    try:
        # mmap reads the archive index and the pickled structure, not the tensor data: cheap on large files.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["trainer"]["epoch"]), int(ckpt["trainer"]["iteration"])
    except Exception as e:  # any failure (truncated archive, missing key, bad pickle) makes the file unusable
        logger.warning(f"Skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
        return None


def find_latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest readable checkpoint in ``ckpt_dir``.

    Progress is (epoch, iteration), read from the name of timed/per-epoch files and from the content of
    ``checkpoint_final.pt``, which wins ties. A corrupt or truncated file is reported with a warning naming it and
    skipped in favour of the previous one. Temporary files of interrupted writes are never considered.

    Args:
        ckpt_dir: folder holding the checkpoints (may not exist).

    Returns:
        The checkpoint path, or None when there is no readable checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    final = ckpt_dir / FINAL_NAME
    final_progress = checkpoint_progress(final) if final.is_file() else None
    for progress, path in reversed(_periodic_checkpoints(ckpt_dir)):
        if final_progress is not None and final_progress >= progress:
            return final
        if checkpoint_progress(path) is not None:
            return path
    return final if final_progress is not None else None


def completed_epochs(ckpt_dir: str | os.PathLike) -> int:
    """Epochs recorded in ``checkpoint_final.pt`` of ``ckpt_dir``: 0 when it is absent or unreadable."""
    final = Path(ckpt_dir) / FINAL_NAME
    progress = checkpoint_progress(final) if final.is_file() else None
    return progress[0] if progress else 0


class _EpochIterable:
    """Stands in for the engine's data loader so each epoch's iterator is created through it.

    Records the random state at the moment the iterator is created (what an exact mid-epoch resume must replay)
    and, once after a mid-epoch resume, replays it: epoch-start state, ``skip`` batches fetched and discarded, then
    the state saved at the checkpoint.
    """

    def __init__(self, loader: Any, extra: Any = None) -> None:
        self.loader = loader
        self.extra = extra  # the transforms the trainer's prepare_batch runs (augmentation on the device), if any
        self.epoch_start: RngState | None = None
        self.rewind: tuple[int, RngState, RngState] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not set in __init__: handlers reading e.g. `.dataset` see the real loader
        if "loader" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator:
        if self.rewind is None:
            self.epoch_start = capture_rng_state(self.loader, self.extra)
            return iter(self.loader)
        skip, self.epoch_start, at_checkpoint = self.rewind
        self.rewind = None
        restore_rng_state(self.epoch_start, self.loader, self.extra)
        data_iter = iter(self.loader)
        for _ in range(skip):
            next(data_iter)
        restore_rng_state(at_checkpoint, self.loader, self.extra)
        return data_iter


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(network, (DataParallel, DistributedDataParallel)) else network


class TrainingCheckpointer:
    """Saves the full training state by time and by epoch, atomically, and resumes from it exactly.

    Saved: the network (``"model"``) and its plans (``"plans"``, :mod:`pipeline.model.plans`), optimizer, LR scheduler,
    AMP ``GradScaler``, the weights' EMA, trainer progress (epoch, iteration, epoch_length, max_epochs and the
    engine's ``state_dict_user_keys``), the evaluator's ``best_metric`` and ``best_metric_epoch``, and every rank's
    random states (torch CPU/CUDA, numpy, ``random``, the dataset's random transforms, the loader's generators) at
    the checkpoint and at the start of its epoch.

    Resume (``auto_resume=True``, at ``STARTED``): the newest readable checkpoint in ``ckpt_dir`` is restored and
    "Resumed from <file> at epoch E, iteration I" logged. The epoch length is taken from the current data loader,
    not from the file, so a change of dataset size or world size is honoured at an epoch boundary (the iteration
    counter is rebased to ``epoch * new_length``, as ignite requires); a mid-epoch checkpoint whose epoch length
    no longer matches is resumed at the next epoch boundary, with a warning. A ``max_epochs`` larger than the
    finished run's continues it. A checkpoint of another network (its plans' ``network`` differs from this run's)
    is refused in one line naming the differing settings.

    A new run (nothing to resume) with ``init_from`` starts from that file's weights (fine-tuning): see
    :meth:`initialise`. A resumed run keeps its own weights; ``init_from`` is then logged as not used.

    Attach it after every other handler of the trainer (in a bundle, in ``initialize``, after the trainer is
    built): its saves must follow the LR scheduler's step and the validation that updates the best metric.

    Args:
        ckpt_dir: folder of the checkpoints (created on the first save).
        network: the model (a ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped).
        optimizer: its optimizer.
        lr_scheduler: an LR scheduler, if any.
        scaler: a ``torch.amp.GradScaler``, or a zero-argument callable returning the trainer's current one (the
            scaler may be None or created late), or None.
        evaluator: an engine whose ``state.best_metric``/``best_metric_epoch`` are saved and restored.
        ema: a ``pipeline.training.ema.EMA`` whose average and update count are saved and restored, or None. A checkpoint
            without one (EMA turned on for a resumed run) restarts the average from the restored weights.
        interval_minutes: wall time between timed checkpoints (fractions allowed); 0 or None disables them.
        every_epochs: save every this many epochs; 0 or None disables it.
        keep_last: how many timed/per-epoch checkpoints to keep (files of earlier runs included); None keeps all.
            ``checkpoint_final.pt`` is never removed.
        auto_resume: restore the newest readable checkpoint of ``ckpt_dir`` when the engine starts.
        name: logger name; by default the engine's logger.
        plans: the model's plans (:func:`pipeline.model.plans.make_plans`), saved in every checkpoint; None saves none.
        clock: a :class:`pipeline.training.clock.TimeLimit` (or None): when its ``due(engine)`` says so, at an
            iteration boundary, the weights are validated (unless this epoch's validation just ran), a checkpoint is
            written and the trainer terminated; the run ends normally (``stopped_by_clock`` is then True).
        init_from: a model file (``model.pt`` or a training checkpoint) whose weights a new run starts from; None
            starts from the network's own initialisation.

    Raises:
        ValueError: a negative ``interval_minutes`` or ``every_epochs``, or a ``keep_last`` below 1.

    Example::

        checkpointer = TrainingCheckpointer("ckpt", net, opt, lr_scheduler=sched, scaler=lambda: trainer.scaler,
                                            evaluator=evaluator, interval_minutes=60)
        checkpointer.attach(trainer)  # after the trainer's own handlers
        trainer.run()
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        scaler: torch.amp.GradScaler | Callable[[], torch.amp.GradScaler | None] | None = None,
        evaluator: Engine | None = None,
        ema: Any = None,
        interval_minutes: float | None = 60.0,
        every_epochs: int | None = 1,
        keep_last: int | None = 2,
        auto_resume: bool = True,
        name: str | None = None,
        plans: dict[str, Any] | None = None,
        clock: Any = None,
        init_from: str | os.PathLike | None = None,
    ) -> None:
        if interval_minutes is not None and interval_minutes < 0:
            msg = f"interval_minutes must be >= 0 (0 or None disables timed checkpoints), got {interval_minutes}"
            raise ValueError(msg)
        if every_epochs is not None and every_epochs < 0:
            msg = f"every_epochs must be >= 0 (0 or None disables per-epoch checkpoints), got {every_epochs}"
            raise ValueError(msg)
        if keep_last is not None and keep_last < 1:
            msg = f"keep_last must be >= 1 or None (keep all), got {keep_last}"
            raise ValueError(msg)
        self.ckpt_dir = Path(ckpt_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._scaler = scaler
        self.evaluator = evaluator
        self.ema = ema
        self.interval_s = 60.0 * interval_minutes if interval_minutes else 0.0
        self.every_epochs = every_epochs or 0
        self.keep_last = keep_last
        self.auto_resume = auto_resume
        self._name = name
        self.plans = plans
        self.clock = clock if clock is not None and getattr(clock, "enabled", True) else None
        self.stopped_by_clock = False
        self.init_from = Path(init_from) if init_from else None
        self.logger = logging.getLogger(name)
        self._last_save = time.monotonic()
        self._start_iteration = 0
        self._resumed_from: Path | None = None
        self._data: _EpochIterable | None = None
        self._lock = dir_lock(self.ckpt_dir)
        self._signals = SignalFlag()

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler to save, resolved through the getter when one was given."""
        return self._scaler() if callable(self._scaler) else self._scaler

    def attach(self, engine: Engine) -> None:
        """Register the resume, timed, per-epoch and final-save handlers on ``engine``.

        Args:
            engine: the trainer (any ignite ``Engine``).
        """
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _take_lock(self) -> None:
        """The folder's lock on rank 0; every rank learns the outcome, so all stop together when it is busy."""
        error = ""
        if idist.get_rank() == 0:
            try:
                self._lock.acquire()
            except CheckpointDirError as e:
                error = str(e)
        if idist.get_world_size() > 1:
            error = idist.broadcast(error, src=0)
        if error:
            raise CheckpointDirError(error)

    def _release(self) -> None:
        self._signals.restore()
        self._lock.release()

    def _failed(self, engine: Engine, e: BaseException) -> None:
        self._release()
        pass_on(engine, e)  # never swallow: ignite re-raises only when no EXCEPTION_RAISED handler exists

    def _started(self, engine: Engine) -> None:
        self._take_lock()
        self._signals.install()
        loader = engine.state.dataloader
        if isinstance(loader, _EpochIterable):
            loader = loader.loader
        self._data = None
        if loader is not None:
            # augmentation on the device (DeviceAugment) draws from its own transforms' random states
            self._data = _EpochIterable(loader, getattr(getattr(engine, "prepare_batch", None), "transform", None))
            engine.state.dataloader = self._data
            if getattr(loader, "persistent_workers", False):
                self.logger.warning(
                    "persistent_workers=True: data workers keep their random state across epochs, so a resumed run "
                    "will not replay the same augmentations"
                )
        if idist.get_rank() == 0 and self.ckpt_dir.is_dir():
            for stale in self.ckpt_dir.glob(_TMP_GLOB):
                self.logger.info(f"Removing {stale}, left by an interrupted write")
                stale.unlink(missing_ok=True)
        self._resumed_from = None
        latest = None
        if self.auto_resume:
            latest = find_latest_checkpoint(self.ckpt_dir) if idist.get_rank() == 0 else None
            if idist.get_world_size() > 1:
                latest = idist.broadcast(str(latest or ""), src=0) or None
        if latest:
            self.resume(engine, latest)
            self._resumed_from = Path(latest)
            if self.init_from is not None:
                self.logger.info(f"init_from {self.init_from} not used: the resumed run keeps its own weights")
        elif self.init_from is not None:
            self.initialise(self.init_from)
        elif self.auto_resume:
            self.logger.info(f"No checkpoint in {self.ckpt_dir}: training from scratch")
        if self.clock is not None:
            self.clock.resumed(engine)
        self._start_iteration = engine.state.iteration
        self._last_save = time.monotonic()

    def _decisions(self, engine: Engine | None = None) -> tuple[bool, int, bool]:
        """(timed checkpoint due, signal received, stop by the clock), the same on every rank: the interval and the
        clock are read on rank 0, a signal on any rank counts. One all-reduce under DDP."""
        rank0 = idist.get_rank() == 0
        due = bool(self.interval_s) and rank0 and time.monotonic() - self._last_save >= self.interval_s
        clock = self.clock if engine is not None and rank0 else None
        refusal = clock.refusal(engine) if clock is not None and hasattr(clock, "refusal") else None
        cut = clock is not None and clock.due(engine)
        signum = self._signals.signum
        if idist.get_world_size() > 1:
            flags = [int(due), signum, int(cut), int(refusal is not None)]
            flags = idist.all_reduce(torch.tensor(flags, dtype=torch.int64), op="MAX")
            due, signum, cut = bool(flags[0]), int(flags[1]), bool(flags[2])
            if flags[3] and refusal is None:
                refusal = "time_limit too short for one epoch (rank 0 says how long it needs)"
        if refusal is not None:  # every rank at once: none waits in a collective for another
            raise SettingsError(refusal)
        return due, signum, cut

    def _preempted(self, engine: Engine, signum: int, path: Path | None) -> Preempted:
        where = f" to {path}" if path is not None else ""
        msg = (
            f"{signal.Signals(signum).name} received: training stopped at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration} with its checkpoint saved{where}; run the same command again to resume"
        )
        self.logger.warning(msg)
        return Preempted(signum, msg)

    def _iteration_completed(self, engine: Engine) -> None:
        epoch_length = engine.state.epoch_length
        if epoch_length is not None and engine.state.iteration % epoch_length == 0:
            # The last iteration of an epoch is left to EPOCH_COMPLETED, so its file holds the validation/LR state
            # of the finished epoch and resumes at the boundary.
            return
        due, signum, cut = self._decisions(engine)
        if cut and not signum:
            self._stop_by_clock(engine, validated=False)
        elif due or signum:
            path = self._save_periodic(engine)
            if signum:
                raise self._preempted(engine, signum, path)

    def _epoch_completed(self, engine: Engine) -> None:
        due, signum, cut = self._decisions(engine)
        last = engine.state.max_epochs is not None and engine.state.epoch >= engine.state.max_epochs
        if cut and not signum and not last:  # the last epoch completes the run instead (final checkpoint)
            validated = self.evaluator is not None and getattr(self.evaluator.state, "epoch", 0) == engine.state.epoch
            self._stop_by_clock(engine, validated=validated)
            return
        by_epoch = self.every_epochs > 0 and engine.state.epoch % self.every_epochs == 0
        if by_epoch or due or signum:
            path = self._save_periodic(engine)
            if signum:
                raise self._preempted(engine, signum, path)

    def _stop_by_clock(self, engine: Engine, validated: bool) -> None:
        """Validate the newest weights (their random-state footprint undone, so the resumed run is the uncut one),
        write the checkpoint, log the cut and terminate the trainer; every rank, at the same iteration."""
        if not validated and self.evaluator is not None:
            data = self._data
            loader, extra = (data.loader, data.extra) if data is not None else (None, None)
            before = capture_rng_state(loader, extra)
            self.evaluator.run(engine.state.epoch)
            restore_rng_state(before, loader, extra)
        path = self._save_periodic(engine)
        self.stopped_by_clock = True
        clock = self.clock
        self.logger.warning(
            f"time_limit: training stopped by the clock at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration} ({format_eta(clock.left())} left, reserved: {clock.describe()}), its "
            f"checkpoint saved{f' to {path}' if path else ''}; run the same command again (or resume_from this "
            "ckpt_dir) to continue"
        )
        engine.terminate()

    def _completed(self, engine: Engine) -> None:
        state = engine.state
        reached = state.max_epochs is not None and state.epoch >= state.max_epochs
        if state.epoch_length is not None:
            reached = reached and state.iteration >= state.epoch_length * state.max_epochs
        # Nothing trained and resumed from the final file itself: it is current. Resumed from a periodic file at
        # the end (a kill during the final validation or write): the final file is missing or older, write it.
        current = state.iteration == self._start_iteration and self._resumed_from == self.ckpt_dir / FINAL_NAME
        path = self.save(engine, FINAL_NAME) if reached and not current else None
        _, signum, _ = self._decisions()
        self._release()
        if signum:
            raise self._preempted(engine, signum, path or self._resumed_from)

    def _save_periodic(self, engine: Engine) -> Path | None:
        path = self.save(engine, checkpoint_name(engine.state.epoch, engine.state.iteration))
        if idist.get_rank() == 0 and self.keep_last is not None:
            for _, old in _periodic_checkpoints(self.ckpt_dir)[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def build_checkpoint(self, engine: Engine) -> dict[str, Any]:
        """The checkpoint content for this rank's view of ``engine`` (random states of this rank only).

        Args:
            engine: the trainer.

        Returns:
            A dict loadable with ``torch.load(weights_only=True)`` once saved.
        """
        state = engine.state
        trainer = {k: getattr(state, k) for k in engine.state_dict_user_keys}
        trainer.update(
            epoch=state.epoch, iteration=state.iteration, epoch_length=state.epoch_length, max_epochs=state.max_epochs
        )
        loader = self._data.loader if self._data is not None else None
        scaler = self.scaler
        ckpt: dict[str, Any] = {
            "model": _unwrap(self.network).state_dict(),
            "plans": self.plans,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "trainer": trainer,
            "evaluator": None,
            "rng": [
                {
                    "now": capture_rng_state(loader, self._data.extra if self._data is not None else None),
                    "epoch_start": self._data.epoch_start if self._data is not None else None,
                }
            ],
        }
        if self.evaluator is not None:
            ev = self.evaluator.state
            ckpt["evaluator"] = {
                "best_metric": float(ev.best_metric),
                "best_metric_epoch": int(ev.best_metric_epoch),
            }
        return ckpt

    def save(self, engine: Engine, filename: str) -> Path | None:
        """Write a checkpoint of ``engine`` as ``ckpt_dir/filename``; collective under DDP (call on every rank).

        Args:
            engine: the trainer.
            filename: file name inside ``ckpt_dir``.

        Returns:
            The written path on rank 0, None on the other ranks.
        """
        start = time.monotonic()
        ckpt = self.build_checkpoint(engine)
        rng = idist.all_gather(ckpt["rng"][0]) if idist.get_world_size() > 1 else ckpt["rng"]
        self._last_save = time.monotonic()
        if idist.get_rank() != 0:
            return None
        ckpt["rng"] = rng
        path = atomic_save(ckpt, self.ckpt_dir / filename)
        self._last_save = time.monotonic()
        self.logger.info(f"Saved checkpoint {path} in {self._last_save - start:.2f} s")
        if self.clock is not None:
            self.clock.saved(self._last_save - start)
        return path

    def resume(self, engine: Engine, path: str | os.PathLike) -> None:
        """Restore everything saved in ``path`` into the handler's objects and ``engine``; call at ``STARTED``.

        Args:
            engine: the trainer, started (its ``epoch_length`` and ``max_epochs`` are those of the new run).
            path: a file written by :meth:`save`.

        Raises:
            CheckpointDirError: the checkpoint is further than the new ``max_epochs`` (a ``ValueError``).
        """
        path = Path(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = engine.state
        saved = ckpt["trainer"]
        old_length, iteration = int(saved["epoch_length"]), int(saved["iteration"])
        epochs_done, in_epoch = divmod(iteration, old_length)
        needed = epochs_done + (1 if in_epoch else 0)
        if state.max_epochs is not None and needed > state.max_epochs:
            msg = (
                f"{path}: this ckpt_dir holds a run at epoch {needed}, beyond epochs={state.max_epochs}: set epochs "
                f"to at least {needed} to continue it, or give this run another ckpt_dir to start afresh"
            )
            raise CheckpointDirError(msg)
        differ = network_difference(ckpt.get("plans"), self.plans)
        if differ:
            msg = (
                f"{path}: this ckpt_dir holds a run of another network ({differ}); use the same network settings to "
                "continue it, or give this run another ckpt_dir"
            )
            raise CheckpointDirError(msg)

        _unwrap(self.network).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.lr_scheduler is not None and ckpt["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler = self.scaler
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                self.logger.warning(f"{path} holds no EMA of the weights: the average restarts from the restored weights")
            saved_ema = ckpt.get("ema") or {"model": _unwrap(self.network).state_dict(), "num_updates": 0}
            self.ema.load_state_dict(saved_ema)
        if self.evaluator is not None and ckpt["evaluator"] is not None:
            self.evaluator.state.best_metric = ckpt["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = ckpt["evaluator"]["best_metric_epoch"]
        for key in engine.state_dict_user_keys:
            if key in saved:  # a key added since the file was written keeps its start value
                setattr(state, key, saved[key])

        rng_states = ckpt["rng"]
        rng = rng_states[idist.get_rank()] if len(rng_states) == idist.get_world_size() else None
        if rng is None:
            self.logger.warning(
                f"World size changed ({len(rng_states)} ranks saved, {idist.get_world_size()} now): random states "
                "not restored"
            )
        new_length = state.epoch_length or old_length
        replayable = rng is not None and rng["epoch_start"] is not None and self._data is not None
        exact = bool(in_epoch) and new_length == old_length and replayable
        if in_epoch and not exact:
            why = f"epoch length {old_length} -> {new_length}" if new_length != old_length else "no random states"
            self.logger.warning(
                f"Checkpoint {path} is {in_epoch} iterations into epoch {epochs_done + 1}, which cannot be replayed "
                f"({why}): continuing at the next epoch boundary"
            )
            epochs_done, in_epoch = epochs_done + 1, 0
        elif not in_epoch and new_length != old_length:
            self.logger.info(f"Epoch length changed from {old_length} to {new_length} iterations")
        state.epoch_length = new_length
        state.epoch = epochs_done
        state.iteration = epochs_done * new_length + in_epoch
        if exact:
            # the data stand-in replays the epoch when ignite creates its iterator, then restores `now`
            self._data.rewind = (in_epoch, rng["epoch_start"], rng["now"])
        elif rng is not None:
            data = self._data
            restore_rng_state(rng["now"], data.loader if data is not None else None, data.extra if data is not None else None)
        where = f" ({in_epoch} of {new_length} iterations into epoch {epochs_done + 1})" if in_epoch else ""
        self.logger.info(f"Resumed from {path} at epoch {state.epoch}, iteration {state.iteration}{where}")

    def initialise(self, path: str | os.PathLike) -> None:
        """Load the weights of a model file into the network: a new run starts from them (fine-tuning).

        Only the weights: the optimizer, the LR schedule and the epoch count start afresh, and the patch size and
        schedule may differ from the run that wrote the file (the networks are fully convolutional). The network
        must be the same as the file's, as nnU-Net's ``-pretrained_weights`` requires: a file whose plans name
        another network, or whose weights do not fit, is refused in one line. The weights' EMA, if any, restarts
        from the loaded weights.

        Args:
            path: ``model.pt`` (weights with plans) or a training checkpoint (its ``"model"`` entry).

        Raises:
            MissingFileError: no such file.
            ModelFileError: a file that cannot be read, of another network, or whose weights do not fit.
        """
        state, saved_plans = load_model_file(path, setting="init_from")
        check_init_network(path, saved_plans, self.plans)
        network = _unwrap(self.network)
        try:
            network.load_state_dict(state)
        except RuntimeError as e:  # missing, unexpected or differently shaped weights: one line per problem
            problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            msg = f"{path}: init_from's weights do not fit this run's network ({problems[0]}{more})"
            raise ModelFileError(msg) from e
        if self.ema is not None:
            self.ema.load_state_dict({"model": network.state_dict(), "num_updates": 0})
        self.logger.info(f"Initialised the weights from {path}: a new run (optimizer, LR schedule, epochs afresh)")


def check_init_network(path: str | os.PathLike, saved: Mapping[str, Any] | None,
                       current: Mapping[str, Any] | None) -> None:
    """Refuse an ``init_from`` file whose plans ``saved`` name another network than the plans ``current``.

    Raises:
        ModelFileError: the networks differ (the line names the file and each differing key).
    """
    differ = network_difference(saved, current)
    if differ:
        msg = (
            f"{path}: init_from holds the weights of another network ({differ}); use the file's network settings "
            "(the patch size may differ), or leave init_from out"
        )
        raise ModelFileError(msg)


class BestModelSaver:
    """Writes the network's weights and plans to ``save_path`` whenever the evaluator's key metric reaches a new best.

    Unlike ``CheckpointSaver(save_key_metric=True)``, whose best-so-far score starts afresh in every process (a
    resumed run would overwrite a better model with its first validation), this follows the evaluator's own
    ``state.best_metric``/``best_metric_epoch``, which :class:`TrainingCheckpointer` saves and restores. The file, a
    plain state dict (CPU tensors) carrying the plans in its metadata (:func:`pipeline.model.plans.pack_model`), is written
    atomically and loads with ``torch.load(weights_only=True)`` straight into the network (MONAI ``CheckpointLoader``
    with ``load_dict={"model": net}``, ``ckpt_export`` as the model zoo's ``verify_bundle.py`` calls it);
    :func:`pipeline.model.plans.load_model_file` reads weights and plans.

    Args:
        save_path: the model file, e.g. ``models/model.pt``.
        network: the model (a DDP/DataParallel wrapper is unwrapped).
        enabled: False builds and attaches nothing that writes (for ranks > 0 under DDP).
        plans: what rebuilds and feeds the network (:func:`pipeline.model.plans.make_plans`), saved with the weights.

    Example::

        BestModelSaver("models/model.pt", net, plans=make_plans(net, [64, 64, 64])).attach(evaluator)
    """

    def __init__(
        self, save_path: str | os.PathLike, network: torch.nn.Module, enabled: bool = True,
        plans: dict[str, Any] | None = None,
    ) -> None:
        self.save_path = Path(save_path)
        self.network = network
        self.enabled = enabled
        self.plans = plans

    def attach(self, engine: Engine) -> None:
        """Save after each evaluation run; attach after the evaluator is built (MONAI updates the best metric first)."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or engine.state.best_metric_epoch != engine.state.epoch:
            return
        atomic_save(pack_model(_unwrap(self.network).state_dict(), self.plans), self.save_path)
        engine.logger.info(
            "saved best model (%s=%.4f at epoch %d) to %s",
            engine.state.key_metric_name, engine.state.best_metric, engine.state.epoch, self.save_path,
        )
