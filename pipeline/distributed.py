"""Process-group facts the configs need (rank, world size) and the batch/learning-rate arithmetic of DDP."""

from __future__ import annotations

import logging
import math
import os

import torch.distributed as dist

__all__ = ["get_rank", "get_world_size", "is_main_process", "effective_batch_size", "scale_lr"]

logger = logging.getLogger(__name__)


def get_rank() -> int:
    """This process's global rank: from the process group when initialised, else from torchrun's ``RANK``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """Number of processes: from the process group when initialised, else from torchrun's ``WORLD_SIZE``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


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
