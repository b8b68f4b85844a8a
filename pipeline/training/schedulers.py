"""Per-iteration learning-rate schedules with linear warmup.

Both schedules compute the learning rate in closed form from ``last_epoch`` (the number of iterations
stepped so far), never by multiplying the previous value. A scheduler restored with ``load_state_dict``
therefore continues exactly where the saved one stopped, whatever the optimizer's current ``lr`` is, and
rounding error does not accumulate over hundreds of thousands of iterations.

``torch.optim.lr_scheduler.SequentialLR`` is not used: its ``LinearLR``/``PolynomialLR`` children are
recursive (each value derived from the optimizer's current ``lr``), so a resumed run depends on the order
in which optimizer and scheduler are restored.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineRestarts", "WarmupPolyLR", "build_lr_scheduler"]


class _WarmupScheduler(LRScheduler):
    """Linear warmup from ``warmup_start_factor * base_lr`` to ``base_lr``, then ``_factor_after_warmup``.

    Subclasses give the schedule after warmup as a function of the iteration counted from the end of warmup.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_iters: int, warmup_start_factor: float, epoch_length: int | None = None
    ) -> None:
        if warmup_iters < 0:
            msg = f"warmup_iters must be >= 0, got {warmup_iters}."
            raise ValueError(msg)
        if not 0.0 <= warmup_start_factor <= 1.0:
            msg = f"warmup_start_factor must be in [0, 1], got {warmup_start_factor}."
            raise ValueError(msg)
        self.warmup_iters = int(warmup_iters)
        self.warmup_start_factor = float(warmup_start_factor)
        self.epoch_length = epoch_length
        super().__init__(optimizer)

    def _lr_after_warmup(self, base_lr: float, it: int) -> float:
        raise NotImplementedError

    def lr_at(self, it: int) -> list[float]:
        """Learning rate of every parameter group after ``it`` scheduler steps.

        Args:
            it: number of iterations stepped (``last_epoch``), >= 0.

        Returns:
            one learning rate per parameter group.
        """
        if it < self.warmup_iters:
            factor = self.warmup_start_factor + (1.0 - self.warmup_start_factor) * it / self.warmup_iters
            return [float(base_lr) * factor for base_lr in self.base_lrs]
        return [self._lr_after_warmup(float(base_lr), it - self.warmup_iters) for base_lr in self.base_lrs]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return self.lr_at(self.last_epoch)

    def state_dict(self) -> dict:
        """The progress only: iterations stepped, and the epoch length they were counted in.

        The schedule's shape (warmup, cycle lengths, run length) and its peak learning rate belong to the run that
        loads the state, so raising ``epochs`` on a finished run, or resuming with another world size, dataset size
        or learning rate, takes effect instead of bringing back the old settings.
        """
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "epoch_length": self.epoch_length}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the progress and write the current learning rate into the optimizer.

        When both runs know their epoch length and it changed (world size or dataset size), the iteration count
        is rebased so the schedule continues at the same fractional epoch. Writing the learning rate here means the
        first iteration after a resume runs at the scheduled value even when the optimizer state was not restored.

        Args:
            state_dict: as returned by :meth:`state_dict`.
        """
        last = int(state_dict["last_epoch"])
        saved_length = state_dict.get("epoch_length")
        if saved_length and self.epoch_length and saved_length != self.epoch_length:
            last = round(last * self.epoch_length / saved_length)
        self.last_epoch = last
        self._step_count = int(state_dict.get("_step_count", last + 1))
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(self.last_epoch), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class WarmupCosineRestarts(_WarmupScheduler):
    """Linear warmup, then cosine annealing with warm restarts (SGDR), stepped once per iteration.

    After ``warmup_iters`` iterations the learning rate follows ``CosineAnnealingWarmRestarts``: cycle ``i``
    lasts ``t0_iters * t_mult**i`` iterations and goes from ``base_lr`` down to ``eta_min``::

        lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t_cur / T_i)) / 2

    Example::

        scheduler = WarmupCosineRestarts(optimizer, warmup_iters=500, t0_iters=5000, t_mult=2)
        LrScheduleHandler(scheduler, epoch_level=False, print_lr=False).attach(trainer)

    Args:
        optimizer: wrapped optimizer; its current ``lr`` per group is the peak learning rate.
        warmup_iters: number of linear warmup iterations (0 disables warmup).
        t0_iters: length in iterations of the first cosine cycle.
        t_mult: integer growth factor of the cycle length after each restart.
        eta_min: learning rate at the bottom of each cycle.
        warmup_start_factor: learning rate at iteration 0 as a fraction of the peak.
        epoch_length: iterations per epoch, if known: a resume with another epoch length rebases the progress.

    Raises:
        ValueError: when ``t0_iters < 1``, ``t_mult`` is not an integer >= 1, or a warmup argument is out of range.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_iters: int,
        t0_iters: int,
        t_mult: int = 2,
        eta_min: float = 1e-6,
        warmup_start_factor: float = 0.01,
        epoch_length: int | None = None,
    ) -> None:
        if t0_iters < 1:
            msg = f"t0_iters must be >= 1, got {t0_iters}."
            raise ValueError(msg)
        # Integer cycle lengths keep the restart points on exact iterations (as CosineAnnealingWarmRestarts does).
        if t_mult < 1 or int(t_mult) != t_mult:
            msg = f"t_mult must be an integer >= 1, got {t_mult}."
            raise ValueError(msg)
        self.t0_iters = int(t0_iters)
        self.t_mult = int(t_mult)
        self.eta_min = float(eta_min)
        super().__init__(optimizer, warmup_iters, warmup_start_factor, epoch_length)

    def _lr_after_warmup(self, base_lr: float, it: int) -> float:
        t_cur, t_i = it, self.t0_iters
        # Integer walk over the cycles: exact at the restart points, unlike the log-based formula.
        while t_cur >= t_i:
            t_cur -= t_i
            t_i *= self.t_mult
        return self.eta_min + (base_lr - self.eta_min) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0


class WarmupPolyLR(_WarmupScheduler):
    """Linear warmup, then nnU-Net's polynomial decay, stepped once per iteration.

    After warmup, with ``it`` counted from the end of warmup and ``n = max_iters - warmup_iters``::

        lr = base_lr * (1 - min(it, n) / n) ** exponent

    which is nnU-Net's ``PolyLRScheduler`` (exponent 0.9) started at the peak after warmup, so there is no
    jump at the end of warmup. The learning rate is 0 from ``max_iters`` on.

    Args:
        optimizer: wrapped optimizer; its current ``lr`` per group is the peak learning rate.
        warmup_iters: number of linear warmup iterations (0 disables warmup).
        max_iters: total number of iterations of the run, warmup included.
        exponent: polynomial exponent.
        warmup_start_factor: learning rate at iteration 0 as a fraction of the peak.
        epoch_length: iterations per epoch, if known: a resume with another epoch length rebases the progress.

    Raises:
        ValueError: when ``max_iters <= warmup_iters`` or a warmup argument is out of range.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_iters: int,
        max_iters: int,
        exponent: float = 0.9,
        warmup_start_factor: float = 0.01,
        epoch_length: int | None = None,
    ) -> None:
        if max_iters <= warmup_iters:
            msg = f"max_iters ({max_iters}) must exceed warmup_iters ({warmup_iters})."
            raise ValueError(msg)
        self.max_iters = int(max_iters)
        self.exponent = float(exponent)
        super().__init__(optimizer, warmup_iters, warmup_start_factor, epoch_length)

    def _lr_after_warmup(self, base_lr: float, it: int) -> float:
        n = self.max_iters - self.warmup_iters
        return base_lr * (1.0 - min(it, n) / n) ** self.exponent


def _to_iters(epochs: float, epoch_length: int) -> int:
    return round(epochs * epoch_length)


def build_lr_scheduler(
    optimizer: Optimizer,
    name: str = "cosine_restarts",
    *,
    epoch_length: int,
    warmup_epochs: float = 0.0,
    T_0: float = 10.0,  # noqa: N803 - the name torch's CosineAnnealingWarmRestarts uses
    T_mult: int = 2,  # noqa: N803
    eta_min: float = 1e-6,
    max_epochs: float | None = None,
    poly_exponent: float = 0.9,
    warmup_start_factor: float = 0.01,
) -> WarmupCosineRestarts | WarmupPolyLR:
    """Build a per-iteration schedule from lengths given in epochs (fractions allowed).

    Epoch counts are converted to iterations with ``round(epochs * epoch_length)``.

    Example (bundle config)::

        lr_scheduler:
          _target_: pipeline.training.schedulers.build_lr_scheduler
          optimizer: "@optimizer"
          name: cosine_restarts
          epoch_length: "$len(@train#dataloader)"
          warmup_epochs: 1

    Args:
        optimizer: wrapped optimizer; its current ``lr`` is the peak learning rate.
        name: ``"cosine_restarts"`` (:class:`WarmupCosineRestarts`) or ``"poly"`` (:class:`WarmupPolyLR`).
        epoch_length: iterations per epoch (per rank under DDP, i.e. ``len(train_loader)``).
        warmup_epochs: linear warmup length in epochs.
        T_0: first cosine cycle length in epochs (``cosine_restarts``).
        T_mult: integer cycle growth factor (``cosine_restarts``).
        eta_min: learning rate at the bottom of each cosine cycle (``cosine_restarts``).
        max_epochs: total run length in epochs (required by ``poly``).
        poly_exponent: polynomial exponent (``poly``).
        warmup_start_factor: learning rate at iteration 0 as a fraction of the peak.

    Returns:
        the scheduler, to be stepped every iteration (``LrScheduleHandler(..., epoch_level=False)``).

    Raises:
        ValueError: on an unknown ``name``, ``epoch_length < 1``, or ``poly`` without ``max_epochs``.
    """
    if epoch_length < 1:
        msg = f"epoch_length must be >= 1, got {epoch_length}."
        raise ValueError(msg)
    warmup_iters = _to_iters(warmup_epochs, epoch_length)
    if name == "cosine_restarts":
        return WarmupCosineRestarts(
            optimizer,
            warmup_iters=warmup_iters,
            t0_iters=max(1, _to_iters(T_0, epoch_length)),
            t_mult=T_mult,
            eta_min=eta_min,
            warmup_start_factor=warmup_start_factor,
            epoch_length=epoch_length,
        )
    if name == "poly":
        if max_epochs is None:
            msg = "name='poly' needs max_epochs (the total run length)."
            raise ValueError(msg)
        return WarmupPolyLR(
            optimizer,
            warmup_iters=warmup_iters,
            max_iters=_to_iters(max_epochs, epoch_length),
            exponent=poly_exponent,
            warmup_start_factor=warmup_start_factor,
            epoch_length=epoch_length,
        )
    msg = f"Unknown lr scheduler name {name!r}; expected 'cosine_restarts' or 'poly'."
    raise ValueError(msg)
