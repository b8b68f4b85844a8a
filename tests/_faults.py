"""Faults injected through ordinary bundle overrides (``--loss#_target_ tests._faults.FailingLoss``), so the real
command lines are tested: a loss that fails, a handler that fails, a disk that is full at a checkpoint write, a
signal in the middle of training."""

from __future__ import annotations

import os
import signal
from typing import Any
from unittest import mock

import torch
from ignite.engine import Engine, Events

from pipeline.training.checkpoint import TrainingCheckpointer
from pipeline.training.losses import MaskedDiceBCELoss


class FailingLoss(MaskedDiceBCELoss):
    """The project's loss, raising at its ``fail_at``-th call (what a patch size the network cannot halve does)."""

    def __init__(self, fail_at: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        self.calls += 1
        if self.calls >= self.fail_at:
            msg = f"injected loss failure at call {self.calls}"
            raise RuntimeError(msg)
        return super().forward(input, target)


class FailingHandler:
    """A trainer handler that raises at the end of epoch ``fail_at``."""

    def __init__(self, fail_at: int = 1, **_: Any) -> None:
        self.fail_at = fail_at

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=self.fail_at), self._fail)

    def _fail(self, engine: Engine) -> None:
        msg = f"injected handler failure at epoch {engine.state.epoch}"
        raise RuntimeError(msg)


class FullDiskCheckpointer(TrainingCheckpointer):
    """The real checkpointer; from save number ``full_from`` on the disk reports 1000 bytes free."""

    def __init__(self, *args: Any, full_from: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saves, self.full_from = 0, full_from

    def save(self, engine: Engine, filename: str) -> Any:
        self.saves += 1
        if self.saves < self.full_from:
            return super().save(engine, filename)
        with mock.patch("pipeline.utils.files._free_bytes", return_value=1000):
            return super().save(engine, filename)


class SignalAt:
    """Sends ``signum`` to this process at the start of iteration ``iteration`` on rank ``rank`` (all ranks build it,
    as every DDP handler must be)."""

    def __init__(self, iteration: int, signum: int = int(signal.SIGTERM), rank: int = 0) -> None:
        self.iteration, self.signum, self.rank = iteration, signum, rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED(once=self.iteration), self._send)

    def _send(self, engine: Engine) -> None:
        import ignite.distributed as idist

        if idist.get_rank() == self.rank:
            os.kill(os.getpid(), self.signum)


class ClockCutAt:
    """train.yaml's ``clock`` replaced by one that calls the stop at iteration ``iteration`` (asked on rank 0 only,
    as :class:`pipeline.training.clock.TimeLimit` is; every rank must stop there all the same)."""

    enabled = True
    fit = None

    def __init__(self, iteration: int = 3, **_: Any) -> None:
        self.iteration = iteration

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> None:
        pass

    def due(self, engine: Engine) -> bool:
        return engine.state.iteration == self.iteration

    def left(self) -> float:
        return 1.0

    def describe(self) -> str:
        return "injected"

    def saved(self, seconds: float) -> None:
        pass

    def resumed(self, engine: Engine) -> None:
        pass
