"""DDP for the bundle: process-group set-up and teardown, per-rank logs and data shards, batch/LR arithmetic.

``bundle/configs/multi_gpu_train.yaml`` calls these under torchrun (``pipeline.cli.launch`` starts it)::

    initialize: init_distributed -> setup_rank_logging -> the training initialize
    run:        run_and_teardown(trainer)   # the process group is destroyed even when training raises

The helpers read torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) before the group exists, so the
configs can resolve ranks in any order, and fall back to a single process without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import socket
import tempfile
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from monai.data import partition_dataset
from monai.data.utils import set_rnd
from monai.utils import RankFilter, set_determinism

__all__ = [
    "DEFAULT_TIMEOUT_MINUTES",
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "one_local_rank_at_a_time",
    "is_main_process",
    "effective_batch_size",
    "scale_lr",
    "local_device",
    "default_backend",
    "init_distributed",
    "setup_rank_logging",
    "partition_for_rank",
    "seed_rank",
    "destroy_distributed",
    "run_and_teardown",
]

DEFAULT_TIMEOUT_MINUTES = 30.0
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

logger = logging.getLogger(__name__)


def get_rank() -> int:
    """This process's global rank: from the process group when initialised, else from torchrun's ``RANK``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 in a single process)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def get_world_size() -> int:
    """Number of processes: from the process group when initialised, else from torchrun's ``WORLD_SIZE``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def one_local_rank_at_a_time(name: str) -> Iterator[None]:
    """Run the block in one process of this job per machine at a time (an exclusive ``fcntl.flock`` on a file in
    the temporary folder named by ``name`` and the job's rendezvous), for a step whose memory would not fit twice.

    Validation at 320^3 peaks at each case's end (post-processing and the exact score: +0.65 GiB over the sliding
    window's ~1 GiB per rank); under DDP the ranks reach that peak together (same case sizes), and two such peaks
    did not fit the Kaggle box's memory per process (``bench/kaggle_dryrun.sh --nproc 2``). Ranks stagger instead:
    one scores while the other runs its next sliding window. A single process, or no writable temporary folder,
    runs the block as it is.

    Example::

        with one_local_rank_at_a_time("score"):
            rows = score_volume(pred, label)
    """
    if get_world_size() <= 1:
        yield
        return
    job = os.environ.get("TORCHELASTIC_RUN_ID") or "{}:{}".format(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    path = Path(tempfile.gettempdir()) / f"pipeline_{name}_{re.sub(r'[^A-Za-z0-9_.-]', '_', job)}.lock"
    try:
        handle = open(path, "a")  # noqa: SIM115 - held for the block
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def effective_batch_size(batch_size: int, num_samples: int = 1, accumulation_steps: int = 1, world_size: int | None = None) -> int:
    """Patches per optimizer step: per-process batch x patches per volume x processes x accumulation steps."""
    ws = get_world_size() if world_size is None else world_size
    return int(batch_size) * int(num_samples) * ws * int(accumulation_steps)


def scale_lr(base_lr: float, effective_batch: int, reference_batch: int, rule: str | None = "linear") -> float:
    """Learning rate for an effective batch, scaled from ``base_lr`` tuned at ``reference_batch``.

    Args:
        base_lr: the learning rate at ``reference_batch``.
        effective_batch: patches per optimizer step of this run.
        reference_batch: patches per optimizer step ``base_lr`` was tuned for.
        rule: "linear" (Goyal et al.), "sqrt", or "none"/None to keep ``base_lr``.

    Raises:
        ValueError: an unknown rule.
    """
    if rule in (None, "none", "off", False):
        lr = float(base_lr)
    elif rule == "linear":
        lr = base_lr * effective_batch / reference_batch
    elif rule == "sqrt":
        lr = base_lr * math.sqrt(effective_batch / reference_batch)
    else:
        msg = f"lr_scaling {rule!r} unknown; use 'linear', 'sqrt' or 'none'"
        raise ValueError(msg)
    if is_main_process():
        logger.info(
            "effective batch %d patches/step (reference %d): learning rate %.3g (%s scaling of %.3g)",
            effective_batch, reference_batch, lr, rule or "no", base_lr,
        )
    return lr


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def default_backend(device: torch.device | str) -> str:
    """The collective backend for ``device``: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(
    device: torch.device | str | None = None,
    backend: str | None = None,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
) -> None:
    """Join the process group that torchrun describes in the environment (``env://``); no-op when joined already.

    Every collective that waits longer than ``timeout_minutes`` raises (gloo; NCCL through its watchdog), so a
    rank stuck on a dead peer ends instead of hanging the job. ignite is synchronised with the new group here, on
    every rank at once: its first distributed call runs collectives, and a handler making that call on one rank
    only would otherwise deadlock.

    Args:
        device: this process's device (default ``local_device()``); on CUDA it becomes the current device.
        backend: "nccl", "gloo", ...; default ``default_backend(device)``.
        timeout_minutes: bound on every collective and on the rendezvous of the group.

    Raises:
        RuntimeError: the process was not started by torchrun (its environment variables are missing).

    Example::

        init_distributed(timeout_minutes=10)   # under torchrun --nproc_per_node=2
    """
    if dist.is_initialized():
        return
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        msg = (
            f"torch.distributed environment variables {missing} are not set: start multi_gpu_train.yaml with "
            "torchrun (or pipeline.cli.launch.launch), or train without the multi-GPU config"
        )
        raise RuntimeError(msg)
    dev = local_device() if device is None else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend=backend or default_backend(dev),
        timeout=timedelta(minutes=timeout_minutes),
        device_id=dev if dev.type == "cuda" else None,
    )
    idist.sync()


def setup_rank_logging(log_dir: str | os.PathLike, prefix: str = "training") -> Path:
    """Log every record of this process to ``log_dir/<prefix>_rank<r>.log`` and keep the console to rank 0.

    A ``logging.FileHandler`` is added to the root logger (once per file); on ranks > 0 the root logger's console
    handlers get MONAI's ``RankFilter``. Call it after ``init_distributed``.

    Args:
        log_dir: folder of the per-rank log files (created if missing).
        prefix: the file name's start, e.g. "training".

    Returns:
        The path of this rank's log file.
    """
    rank = get_rank()
    path = (Path(log_dir) / f"{prefix}_rank{rank}.log").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(handler)
    if rank > 0:
        for h in root.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.addFilter(RankFilter(rank))
    backend = dist.get_backend() if dist.is_initialized() else "none"
    logger.info(
        "rank %d of %d (local rank %d), pid %d on %s, backend %s: logging to %s",
        rank, get_world_size(), get_local_rank(), os.getpid(), socket.gethostname(), backend, path,
    )
    return path


def partition_for_rank(data: Sequence, shuffle: bool = True, seed: int = 0, even_divisible: bool = True) -> list:
    """This rank's share of ``data`` (``monai.data.partition_dataset`` over the world size).

    With a ``CacheDataset`` built on the share, each rank caches only its own items, so cache memory divides by
    the world size; the price is that items never move between ranks (each rank shuffles its own share only).

    Args:
        data: the whole datalist, identical on every rank.
        shuffle: shuffle (with ``seed``, the same on every rank) before partitioning.
        seed: the shuffle's seed.
        even_divisible: pad with repeated items so every rank gets as many (training: DDP needs the same number
            of iterations on every rank); False gives disjoint, possibly uneven shares (validation).

    Raises:
        ValueError: fewer items than ranks without ``even_divisible`` (a rank would get nothing).
    """
    world = get_world_size()
    if not even_divisible and len(data) < world:
        msg = f"{len(data)} items cannot be shared by {world} ranks without repeating; use at least {world}"
        raise ValueError(msg)
    share = partition_dataset(data, num_partitions=world, shuffle=shuffle, seed=seed, even_divisible=even_divisible)
    return list(share[get_rank()])


def seed_rank(seed: int, dataset: Any | None = None) -> int:
    """Seed this process with ``seed + rank`` so that the ranks draw different augmentations.

    ``monai.utils.set_determinism`` with the rank's seed, then the random transforms of ``dataset`` re-seeded from
    it, as MONAI's ``DataLoader`` seeds them when it is built without workers (with the same seed on every rank,
    each rank would flip, crop and add noise exactly as the others do). Rank 0 keeps ``seed``.

    Args:
        seed: the run's seed (the same on every rank).
        dataset: a dataset whose transforms were seeded already (e.g. the training dataset), or None.

    Returns:
        This rank's seed.
    """
    rank_seed = int(seed) + get_rank()
    set_determinism(seed=rank_seed)
    if dataset is not None:
        set_rnd(dataset, rank_seed)
    return rank_seed


def destroy_distributed() -> None:
    """Destroy the default process group, if any, and let ignite forget it (no collective: safe after a crash)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        idist.sync()


def run_and_teardown(workflow: Any) -> None:
    """``workflow.run()``, then ``destroy_distributed()`` whether it returned or raised.

    The bundle's ``finalize`` step does not run when ``run`` raises, so a teardown placed there would leave the
    process group alive after a crash.

    Args:
        workflow: anything with ``run()``, e.g. the trainer.
    """
    try:
        workflow.run()
    finally:
        destroy_distributed()
