"""MONAI workflows whose mixed precision follows the device, with DDP-aware gradient accumulation.

MONAI's ``amp=True`` hard-codes ``torch.autocast("cuda")`` and builds its ``GradScaler`` inside ``run()``: on CPU
it does nothing, and the scaler cannot be checkpointed. ``Trainer`` and ``Evaluator`` autocast on the device they
run on: bfloat16 on CPU, float16 with a ``GradScaler`` on CUDA (bfloat16, without scaler, when asked for). Under
``DistributedDataParallel``, micro-steps that do not step the optimizer skip the gradient all-reduce (``no_sync``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.utils.enums import CommonKeys as Keys

from pipeline.utils.amp import autocast_for, resolve_amp

__all__ = ["Trainer", "Evaluator", "validate_at_end"]

logger = logging.getLogger(__name__)

class _ReRaise:
    """Every exception of a run propagates. ignite 0.5.5 passes it to the ``EXCEPTION_RAISED`` handlers and
    re-raises only when there are none: one clean-up handler that forgets to re-raise would end a failed run (disk
    full, a bad batch, Ctrl-C) with exit code 0, and every later iteration would run and be checkpointed."""

    reraises_exceptions = True  # see pipeline.utils.errors.pass_on

    def _handle_exception(self, e: BaseException) -> None:
        super()._handle_exception(e)  # type: ignore[misc]
        raise e


class Trainer(_ReRaise, SupervisedTrainer):
    """``SupervisedTrainer`` with device-following autocast, a checkpointable ``GradScaler``, ``no_sync``
    gradient accumulation under DDP, and no exception swallowed by an ``EXCEPTION_RAISED`` handler.

    A deeply supervised network's training output (DynUNet: heads stacked on dim 1, one dimension more than the
    input) goes to the loss whole; after ``LOSS_COMPLETED``, ``state.output["pred"]`` holds the main head only,
    shaped as the input, for every other handler.

    Args:
        args: as ``monai.engines.SupervisedTrainer`` (``amp`` is replaced by the two below).
        amp: mixed precision on the trainer's device (bf16 on CPU, fp16 + GradScaler on CUDA); see ``resolve_amp``.
        amp_dtype: force "bf16" or "fp16".
        kwargs: as ``monai.engines.SupervisedTrainer``.

    Example::

        trainer = Trainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=net,
                          optimizer=opt, loss_function=loss, amp=True, accumulation_steps=4, decollate=False)
        trainer.run()
    """

    def __init__(self, *args: Any, amp: bool | str = "auto", amp_dtype: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, amp=False, **kwargs)
        self.amp_dtype = resolve_amp(self.state.device, amp, amp_dtype)
        self.amp = self.amp_dtype is not None
        use_scaler = self.amp_dtype is torch.float16
        # built here, not in run(), so checkpoints can hold and restore it
        self.scaler: torch.amp.GradScaler | None = torch.amp.GradScaler("cuda") if use_scaler else None

    def run(self) -> None:  # type: ignore[override]
        Workflow.run(self)  # skip monai Trainer.run, which replaces the scaler

    def _accumulation_flags(self) -> tuple[bool, bool]:
        acc = self.accumulation_steps
        if acc == 1:
            return True, True
        length = self.state.epoch_length
        local = (self.state.iteration - 1) % length if length else self.state.iteration - 1
        last = length is not None and local + 1 == length
        return local % acc == 0, (local + 1) % acc == 0 or last

    def stepped_optimizer(self) -> bool:
        """Whether the current iteration steps the optimizer: every ``accumulation_steps`` micro-steps and at the
        end of an epoch (``pipeline.training.ema.EMA`` updates only then)."""
        return self._accumulation_flags()[1]

    def _iteration(self, engine: Trainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            msg = "Must provide batch data for current iteration."
            raise ValueError(msg)
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = (*batch, (), {}) if len(batch) == 2 else batch
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        zero_grad, step = engine._accumulation_flags()
        acc = engine.accumulation_steps
        engine.network.train()
        if zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        sync = engine.network.no_sync() if not step and hasattr(engine.network, "no_sync") else contextlib.nullcontext()
        with sync:
            with autocast_for(engine.state.device, engine.amp_dtype):
                engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                loss = engine.loss_function(engine.state.output[Keys.PRED], targets).mean()
                engine.state.output[Keys.LOSS] = loss
                engine.fire_event(IterationEvents.LOSS_COMPLETED)
            pred = engine.state.output[Keys.PRED]
            if isinstance(pred, torch.Tensor) and pred.ndim == inputs.ndim + 1:
                # deep supervision (DynUNet): heads stacked on dim 1 fed the loss; later handlers see the main output
                engine.state.output[Keys.PRED] = pred[:, 0]
            scaled = loss / acc if acc > 1 else loss
            (engine.scaler.scale(scaled) if engine.scaler is not None else scaled).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step:
            if engine.scaler is not None:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                engine.optimizer.step()
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class Evaluator(_ReRaise, SupervisedEvaluator):
    """``SupervisedEvaluator`` whose autocast follows the device (bf16 on CPU, fp16 on CUDA) and which swallows
    no exception.

    ``SlidingWindowInferer`` stitches into a buffer of the input's dtype, so its predictions stay float32.

    Args:
        args: as ``monai.engines.SupervisedEvaluator``.
        amp: mixed precision on the evaluator's device; see ``resolve_amp``.
        amp_dtype: force "bf16" or "fp16".
        kwargs: as ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(self, *args: Any, amp: bool | str = "auto", amp_dtype: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, amp=False, **kwargs)
        self.amp_dtype = resolve_amp(self.state.device, amp, amp_dtype)

    def _iteration(self, engine: Evaluator, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        with autocast_for(engine.state.device, engine.amp_dtype):
            return super()._iteration(engine, batchdata)


def validate_at_end(trainer: Engine, evaluator: SupervisedEvaluator, interval: int) -> None:
    """Validate once more when training completes on an epoch that ``ValidationHandler(interval)`` skipped.

    Every run then ends validated: the best model is chosen among all epochs trained (and written at all when
    ``epochs < interval``). Attach it before handlers that act on COMPLETED and need the final metric (the
    checkpointer's final save).

    Args:
        trainer: the training engine.
        evaluator: the validation engine.
        interval: the ``ValidationHandler``'s epoch interval.
    """

    def _final(engine: Engine) -> None:
        if engine.state.epoch % interval and not engine.should_terminate:  # a run cut short validated at the cut
            evaluator.run(engine.state.epoch)

    trainer.add_event_handler(Events.COMPLETED, _final)
