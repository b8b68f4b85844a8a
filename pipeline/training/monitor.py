"""Ignite handlers that show what training is doing: progress/ETA and throughput/resources.

Every rank builds and attaches these handlers (ignite's distributed calls are collectives); only rank 0 logs,
draws bars or writes to TensorBoard.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import psutil
import torch
from ignite.engine import Engine, Events
from tqdm import tqdm

from pipeline.training.clock import PROVISIONAL_EPOCHS
from pipeline.utils.errors import pass_on
from pipeline.utils.timing import format_eta

try:
    import resource
except ImportError:  # not on Windows: the peak RSS then falls back to the current RSS
    resource = None

__all__ = ["ProgressHandler", "ThroughputMonitor", "batch_size_of", "loss_of"]

_MIB = 1024.0**2


def loss_of(output: Any) -> float | None:
    """Training loss from an engine output.

    Args:
        output: ``engine.state.output``: a dict with a ``"loss"`` entry, a list of such dicts (MONAI's
            decollated output, each holding the batch loss), a tensor or a number.

    Returns:
        the loss as a float, or None when the output holds none.
    """
    if isinstance(output, Mapping):
        output = output.get("loss")
    elif isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        values = [loss_of(item) for item in output]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    if isinstance(output, torch.Tensor):
        return float(output.detach().float().mean())
    if isinstance(output, (int, float)):
        return float(output)
    return None


def batch_size_of(batch: Any, image_key: str = "image") -> int:
    """Number of samples in a collated (or decollated) batch.

    Args:
        batch: ``engine.state.batch``: a dict of batched tensors, a list of per-sample dicts, a tensor,
            or a tuple/list whose first element is a batched tensor.
        image_key: key of the batched image in a dict batch.

    Returns:
        the batch size.

    Raises:
        ValueError: when the batch size cannot be inferred (pass a ``batch_transform`` instead).
    """
    if isinstance(batch, Mapping) and image_key in batch:
        item = batch[image_key]
        return int(item.shape[0]) if hasattr(item, "shape") else len(item)
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Sequence) and batch:
        if isinstance(batch[0], Mapping):
            return len(batch)
        if isinstance(batch[0], torch.Tensor):
            return int(batch[0].shape[0])
    msg = f"Cannot infer the batch size of a {type(batch).__name__} batch (image_key={image_key!r}); "
    msg += "pass batch_transform."
    raise ValueError(msg)


def _warn_if_silent(logger: logging.Logger) -> None:
    if idist.get_rank() == 0 and logger.getEffectiveLevel() > logging.INFO:
        warnings.warn(
            f"Logger {logger.name!r} is below INFO and will print nothing; "
            f"call ignite.utils.setup_logger({logger.name!r}, reset=True) or configure logging.",
            stacklevel=3,
        )



def _epochs_of(state: Any) -> str:
    """The run's length for a progress line: its epochs, or ``auto`` until ``epochs: auto`` has fixed them."""
    return "auto" if state.max_epochs == PROVISIONAL_EPOCHS else str(state.max_epochs)

class ProgressHandler:
    """Per-epoch progress (iteration i/N, loss, LR, samples/s) and an ETA for the whole run.

    The ETA is the remaining iterations times a moving average of the iteration time, plus the remaining
    epoch ends times the mean time spent between epochs (validation, checkpointing), measured from the last
    iteration of an epoch to the start of the next.

    With ``mode="bar"`` a ``tqdm`` bar is drawn on stdout; with ``mode="log"`` a line is logged every
    ``log_every`` iterations. ``mode="auto"`` draws the bar only when stdout is a terminal, so CI, ``nohup``
    and notebooks get log lines. In both modes a summary line is logged at each epoch end.

    Example::

        ProgressHandler(optimizer=optimizer, log_every=50).attach(trainer)

    Args:
        optimizer: optimizer whose first parameter group's ``lr`` is shown; None hides the LR.
        mode: ``"auto"``, ``"bar"`` or ``"log"``.
        log_every: iterations between log lines in log mode.
        name: name of the ``logging`` logger.
        output_transform: maps ``engine.state.output`` to the loss; defaults to :func:`loss_of`.
        batch_transform: maps ``engine.state.batch`` to its batch size; defaults to :func:`batch_size_of`.
        smoothing: weight of the newest iteration time in the exponential moving average.
        enabled: False makes ``attach`` a no-op, so a config switches the handler off with one key.

    Raises:
        ValueError: on an unknown ``mode``, ``log_every < 1`` or ``smoothing`` outside (0, 1].
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        mode: str = "auto",
        log_every: int = 50,
        name: str = "pipeline.progress",
        output_transform: Callable[[Any], float | None] = loss_of,
        batch_transform: Callable[[Any], int] = batch_size_of,
        smoothing: float = 0.1,
        enabled: bool = True,
    ) -> None:
        if mode not in ("auto", "bar", "log"):
            msg = f"mode must be 'auto', 'bar' or 'log', got {mode!r}."
            raise ValueError(msg)
        if log_every < 1:
            msg = f"log_every must be >= 1, got {log_every}."
            raise ValueError(msg)
        if not 0.0 < smoothing <= 1.0:
            msg = f"smoothing must be in (0, 1], got {smoothing}."
            raise ValueError(msg)
        self.optimizer = optimizer
        self.mode = mode
        self.log_every = log_every
        self.logger = logging.getLogger(name)
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        self.smoothing = smoothing
        self.enabled = enabled
        self.use_bar = False
        self.iter_time_s: float | None = None
        self.eta_s: float | None = None
        self._bar: tqdm | None = None
        self._last_tick = 0.0
        self._epoch_start = 0.0
        self._gaps: list[float] = []
        self._loss_sum = 0.0
        self._loss_count = 0

    def attach(self, engine: Engine) -> None:
        """Register the handler's callbacks on ``engine`` (nothing when ``enabled`` is False).

        Args:
            engine: the trainer.
        """
        if not self.enabled:
            return
        self.use_bar = self.mode == "bar" or (self.mode == "auto" and sys.stdout.isatty())
        if not self.use_bar:
            _warn_if_silent(self.logger)
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._close_bar)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _failed(self, engine: Engine, e: BaseException) -> None:
        self._close_bar(engine)
        pass_on(engine, e)  # never swallow: ignite re-raises only when no EXCEPTION_RAISED handler exists

    def _started(self, engine: Engine) -> None:
        self._last_tick = time.perf_counter()
        self._gaps = []
        self.iter_time_s = None

    def _epoch_started(self, engine: Engine) -> None:
        now = time.perf_counter()
        if engine.state.iteration > 0 and self.iter_time_s is not None:
            self._gaps.append(now - self._last_tick)
        self._last_tick = self._epoch_start = now
        self._loss_sum, self._loss_count = 0.0, 0
        if self.use_bar and idist.get_rank() == 0:
            self._bar = tqdm(
                total=engine.state.epoch_length,
                desc=f"Epoch {engine.state.epoch}/{_epochs_of(engine.state)}",
                file=sys.stdout,
                dynamic_ncols=True,
                leave=False,
            )

    def _iteration_completed(self, engine: Engine) -> None:
        now = time.perf_counter()
        dt, self._last_tick = now - self._last_tick, now
        a = self.smoothing
        self.iter_time_s = dt if self.iter_time_s is None else a * dt + (1.0 - a) * self.iter_time_s
        loss = self.output_transform(engine.state.output)
        if loss is not None:
            self._loss_sum += loss
            self._loss_count += 1
        self.eta_s = self._eta(engine)
        if idist.get_rank() != 0:
            return
        epoch_length = engine.state.epoch_length
        it_in_epoch = (engine.state.iteration - 1) % epoch_length + 1 if epoch_length else engine.state.iteration
        samples = self.batch_transform(engine.state.batch) * idist.get_world_size()
        fields = {"loss": "n/a" if loss is None else f"{loss:.4f}"}
        if self.optimizer is not None:
            fields["lr"] = f"{self.optimizer.param_groups[0]['lr']:.3e}"
        # a coarse clock (or an instant step) can tick zero: no rate rather than a crash of the run
        fields["samples/s"] = f"{samples / self.iter_time_s:.2f}" if self.iter_time_s > 0 else "n/a"
        fields["ETA"] = format_eta(self.eta_s)
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(1)
        elif not self.use_bar and (it_in_epoch % self.log_every == 0 or it_in_epoch == epoch_length):
            text = " ".join(f"{k} {v}" for k, v in fields.items())
            epoch = f"Epoch {engine.state.epoch}/{_epochs_of(engine.state)}"
            self.logger.info(f"{epoch} it {it_in_epoch}/{epoch_length} {text}")

    def _eta(self, engine: Engine) -> float | None:
        state = engine.state
        if self.iter_time_s is None or state.epoch_length is None or state.max_epochs == PROVISIONAL_EPOCHS:
            return None  # epochs: auto not fixed yet
        total = state.max_iters if state.max_iters is not None else state.max_epochs * state.epoch_length
        remaining_iters = max(total - state.iteration, 0)
        # the current epoch's end (validation, checkpointing) is still ahead at every iteration of the epoch
        remaining_ends = max(math.ceil(total / state.epoch_length) - state.epoch + 1, 0)
        mean_gap = sum(self._gaps) / len(self._gaps) if self._gaps else 0.0
        return remaining_iters * self.iter_time_s + remaining_ends * mean_gap

    def _epoch_completed(self, engine: Engine) -> None:
        self._close_bar(engine)
        if idist.get_rank() != 0:
            return
        mean_loss = f"{self._loss_sum / self._loss_count:.4f}" if self._loss_count else "n/a"
        elapsed = time.perf_counter() - self._epoch_start
        self.logger.info(
            f"Epoch {engine.state.epoch}/{_epochs_of(engine.state)} done in {elapsed:.1f}s, "
            f"mean loss {mean_loss}, ETA {format_eta(self.eta_s)}"
        )

    def _close_bar(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ThroughputMonitor:
    """Per-epoch throughput, data-wait/compute split and memory, for the console and TensorBoard.

    At each epoch end it computes (keys of the figures dict):

    - ``samples``, ``samples_per_min``: samples of all ranks (all-reduced) over the epoch's wall time
      (the slowest rank's, from the epoch start to its last iteration, so validation is excluded);
    - ``iterations``, ``iter_time_ms``, ``epoch_time_s``;
    - ``data_wait_s`` (time blocked in the data loader, ``GET_BATCH_STARTED`` to ``GET_BATCH_COMPLETED``),
      ``compute_s`` (the rest) and ``data_wait_frac``, averaged over ranks;
    - on CUDA: ``cuda_allocated_mib``, ``cuda_reserved_mib``, ``cuda_max_allocated_mib`` (peak of the epoch)
      and ``gpu_util_pct`` when NVML is available; on CPU: ``rss_mib`` and ``peak_rss_mib`` (process peak).
      Memory figures are the maximum over ranks.

    The figures go to ``engine.state.throughput`` and ``self.history[epoch]`` (for other handlers, e.g.
    ``pipeline.training.plots.TrainingCurves``), to the logger and, when ``summary_writer`` is given, to TensorBoard
    as ``{tag_prefix}{key}`` scalars at the epoch.

    Example::

        ThroughputMonitor(summary_writer=SummaryWriter(log_dir)).attach(trainer)

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``; None disables TensorBoard output.
        name: name of the ``logging`` logger.
        batch_transform: maps ``engine.state.batch`` to its batch size; defaults to :func:`batch_size_of`.
        device: CUDA device whose memory is reported; None takes the current one when CUDA is available,
            a CPU device reports the process RSS.
        tag_prefix: prefix of the TensorBoard tags.
        enabled: False makes ``attach`` a no-op.
    """

    def __init__(
        self,
        summary_writer: Any | None = None,
        name: str = "pipeline.throughput",
        batch_transform: Callable[[Any], int] = batch_size_of,
        device: torch.device | str | None = None,
        tag_prefix: str = "throughput/",
        enabled: bool = True,
    ) -> None:
        self.summary_writer = summary_writer
        self.logger = logging.getLogger(name)
        self.batch_transform = batch_transform
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tag_prefix = tag_prefix
        self.enabled = enabled
        self.history: dict[int, dict[str, float]] = {}
        self._epoch_start = 0.0
        self._last_iter_end = 0.0
        self._batch_start = 0.0
        self._data_wait = 0.0
        self._samples = 0
        self._iterations = 0

    def attach(self, engine: Engine) -> None:
        """Register the handler's callbacks on ``engine`` (nothing when ``enabled`` is False).

        Args:
            engine: the trainer.
        """
        if not self.enabled:
            return
        _warn_if_silent(self.logger)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._get_batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_batch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = self._last_iter_end = time.perf_counter()
        self._data_wait, self._samples, self._iterations = 0.0, 0, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _get_batch_started(self, engine: Engine) -> None:
        self._batch_start = time.perf_counter()

    def _get_batch_completed(self, engine: Engine) -> None:
        self._data_wait += time.perf_counter() - self._batch_start

    def _iteration_completed(self, engine: Engine) -> None:
        self._samples += self.batch_transform(engine.state.batch)
        self._iterations += 1
        self._last_iter_end = time.perf_counter()

    def _memory(self) -> dict[str, float]:
        if self.device.type == "cuda":
            figures = {
                "cuda_allocated_mib": torch.cuda.memory_allocated(self.device) / _MIB,
                "cuda_reserved_mib": torch.cuda.memory_reserved(self.device) / _MIB,
                "cuda_max_allocated_mib": torch.cuda.max_memory_allocated(self.device) / _MIB,
            }
            try:
                figures["gpu_util_pct"] = float(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - pynvml missing or NVML errors (library-specific types)
                pass
            return figures
        rss = psutil.Process().memory_info().rss / _MIB
        peak = rss
        if resource is not None:
            # ru_maxrss is in KiB on Linux, in bytes on macOS
            scale = 1.0 if sys.platform == "darwin" else 1024.0
            peak = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _MIB)
        return {"rss_mib": rss, "peak_rss_mib": peak}

    def _epoch_completed(self, engine: Engine) -> None:
        elapsed = self._last_iter_end - self._epoch_start
        data_wait = min(self._data_wait, elapsed)
        memory = self._memory()
        world = idist.get_world_size()
        if world > 1:
            sums = torch.tensor([float(self._samples), data_wait, elapsed - data_wait], dtype=torch.float64)
            sums = idist.all_reduce(sums)
            maxima = idist.all_reduce(torch.tensor([elapsed, *memory.values()], dtype=torch.float64), op="MAX")
            samples, data_wait, compute = sums[0].item(), sums[1].item() / world, sums[2].item() / world
            elapsed = maxima[0].item()
            memory = dict(zip(memory, maxima[1:].tolist(), strict=True))
        else:
            samples, compute = float(self._samples), elapsed - data_wait
        busy = data_wait + compute
        figures = {
            "samples": samples,
            "samples_per_min": 60.0 * samples / elapsed if elapsed > 0 else 0.0,
            "iterations": float(self._iterations),
            "iter_time_ms": 1000.0 * elapsed / max(self._iterations, 1),
            "epoch_time_s": elapsed,
            "data_wait_s": data_wait,
            "compute_s": compute,
            "data_wait_frac": data_wait / busy if busy > 0 else 0.0,
            **memory,
        }
        epoch = engine.state.epoch
        self.history[epoch] = figures
        engine.state.throughput = figures
        if idist.get_rank() != 0:
            return
        if self.device.type == "cuda":
            mem = (
                f"CUDA alloc {figures['cuda_allocated_mib']:.0f} MiB, reserved {figures['cuda_reserved_mib']:.0f} MiB, "
                f"peak {figures['cuda_max_allocated_mib']:.0f} MiB"
            )
            if "gpu_util_pct" in figures:
                mem += f", util {figures['gpu_util_pct']:.0f}%"
        else:
            mem = f"RSS {figures['rss_mib']:.0f} MiB (peak {figures['peak_rss_mib']:.0f} MiB)"
        self.logger.info(
            f"Epoch {epoch} throughput: {figures['samples_per_min']:.1f} samples/min, "
            f"{figures['iter_time_ms']:.0f} ms/it (data wait {100 * figures['data_wait_frac']:.0f}%), {mem}"
        )
        if self.summary_writer is not None:
            for key, value in figures.items():
                self.summary_writer.add_scalar(f"{self.tag_prefix}{key}", value, epoch)
