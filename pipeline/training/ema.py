"""An exponential moving average (EMA) of the network's weights, updated after every optimizer step.

ignite's ``EMAHandler`` keeps the averaged copy (``ema_model``: a detached deep copy of the network, the module of
a ``DistributedDataParallel`` wrapper, in eval mode, buffers copied from the trained network) and updates it
``ema = (1 - momentum) * ema + momentum * w``. What it lacks for training here: its warm-up is a linear ramp of the
momentum over a fixed number of iterations kept in a scheduler outside any state dict, it does not know which
iterations step the optimizer (with gradient accumulation most do not change the weights), and it has no state to
checkpoint. :class:`EMA` sets the momentum from its own update count, ``1 - min(decay, (1 + n) / (10 + n))``
(the warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so that a short run is not
dominated by the initial weights; updates only when the trainer stepped the optimizer
(``pipeline.training.engine.Trainer.stepped_optimizer``); and saves ``{"model", "num_updates"}`` in the training checkpoints
(``pipeline.training.checkpoint.TrainingCheckpointer``), so a resumed run continues the same average bit for bit. Under DDP
every rank holds the same weights after each step and so the same average: no collective is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler

__all__ = ["EMA"]


def _stepped_optimizer(engine: Engine, _: int) -> bool:
    # a plain ignite engine steps the optimizer at every iteration
    stepped = getattr(engine, "stepped_optimizer", None)
    return stepped() if callable(stepped) else True


class EMA(EMAHandler):
    """EMA of ``network``'s weights for validation and the best model; the raw network is what trains.

    Args:
        network: the trained model (a ``DistributedDataParallel`` wrapper is unwrapped).
        decay: the decay after warm-up; the EMA weights then average over about ``1 / (1 - decay)`` steps.

    Raises:
        ValueError: ``decay`` outside (0, 1).

    Example::

        ema = EMA(net, decay=0.999)
        ema.attach(trainer)                       # before the checkpointer: its saves see this step's average
        evaluator = SupervisedEvaluator(..., network=ema.ema_model)
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            msg = f"ema_decay must be in (0, 1), got {decay}"
            raise ValueError(msg)
        super().__init__(network, momentum=1.0 - decay, handle_buffers="copy")
        self.decay = float(decay)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay of the next update: ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates."""
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    def _set_momentum(self, engine: Engine, name: str) -> None:
        setattr(engine.state, name, 1.0 - self.current_decay())
        self.num_updates += 1

    def attach(self, engine: Engine, name: str = "ema_momentum") -> None:  # type: ignore[override]
        """Update the average at the end of every iteration that stepped the optimizer.

        Args:
            engine: the trainer; attach before the checkpointer.
            name: ``engine.state`` attribute holding the momentum of the last update.
        """
        event = Events.ITERATION_COMPLETED(event_filter=_stepped_optimizer)
        engine.add_event_handler(event, self._set_momentum, name)  # first the momentum, then ignite's update
        super().attach(engine, name, warn_if_exists=False, event=event)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the number of updates (``torch.load(weights_only=True)``-safe)."""
        return {"model": self.ema_model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s content."""
        self.ema_model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
