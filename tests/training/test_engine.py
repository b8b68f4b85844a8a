from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import SlidingWindowInferer

from pipeline.training.engine import Evaluator, Trainer
from pipeline.training.losses import MaskedDiceBCELoss
from pipeline.utils import amp
from pipeline.utils.amp import resolve_amp


class DtypeRecorder(torch.nn.Module):
    """A 1x1x1 conv that records the dtype its output was computed in."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        y = self.conv(x)
        self.seen.append(y.dtype)
        return y


def _loader(n=2, size=8):
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, size, size, size, generator=g), "label": (torch.rand(1, size, size, size, generator=g) * 3).floor()} for _ in range(n)]
    return DataLoader(Dataset(data), batch_size=1)


def test_resolve_amp(monkeypatch):
    assert resolve_amp("cpu", True) is torch.bfloat16
    assert resolve_amp("cuda", True) is torch.float16
    assert resolve_amp("cuda", True, "bf16") is torch.bfloat16
    assert resolve_amp("cpu", False) is None
    monkeypatch.setattr(amp, "cpu_has_fast_bf16", lambda: False)
    assert resolve_amp("cpu", "auto") is None  # emulated bf16 is slower than fp32: auto stays fp32
    monkeypatch.setattr(amp, "cpu_has_fast_bf16", lambda: True)
    assert resolve_amp("cpu", "auto") is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 autocast is not supported on CPU"):
        resolve_amp("cpu", True, "fp16")


@pytest.mark.parametrize("amp, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_trainer_forward_runs_in_bf16_on_cpu(amp, expected):
    net = DtypeRecorder()
    trainer = Trainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_loader(), network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=MaskedDiceBCELoss(), amp=amp, decollate=False,
    )
    before = net.conv.weight.detach().clone()
    trainer.run()
    assert net.seen == [expected, expected]
    assert trainer.scaler is None  # no GradScaler for bf16 / fp32
    assert trainer.state.output["loss"].dtype == torch.float32 and torch.isfinite(trainer.state.output["loss"])
    assert not torch.equal(before, net.conv.weight)  # the optimizer stepped


def test_evaluator_autocasts_on_cpu_and_returns_float32():
    net = DtypeRecorder()
    ev = Evaluator(
        device=torch.device("cpu"), val_data_loader=_loader(1, 12), network=net,
        inferer=SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2), amp=True, decollate=False,
    )
    ev.run()
    assert net.seen and set(net.seen) == {torch.bfloat16}
    assert ev.state.output["pred"].dtype == torch.float32


def test_masked_loss_ignores_label_2():
    loss = MaskedDiceBCELoss(ignore_index=2)
    logits = torch.randn(2, 1, 6, 6, 6, requires_grad=True)
    label = torch.randint(0, 2, (2, 1, 6, 6, 6)).float()
    label[:, :, :3] = 2
    value = loss(logits, label)
    value.backward()
    assert torch.all(logits.grad[:, :, :3] == 0)  # no gradient from unlabeled voxels
    assert torch.any(logits.grad[:, :, 3:] != 0)
    # changing predictions where the label is 2 changes nothing
    other = logits.detach().clone()
    other[:, :, :3] = 50.0
    assert torch.allclose(loss(other, label), value.detach())


def test_exceptions_propagate_past_handlers_that_swallow_them():
    """A clean-up handler on EXCEPTION_RAISED that does not re-raise made ignite end a failed run quietly."""
    from ignite.engine import Events

    net = DtypeRecorder()

    def failing_loss(pred, label):
        raise RuntimeError("Sizes of tensors must match")

    trainer = Trainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=_loader(), network=net,
                      optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=failing_loss, amp=False)
    cleaned = []
    trainer.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, e: cleaned.append(e))
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        trainer.run()
    # the handler ran (ignite fires it at the iteration's and at the run's level); no later iteration did
    assert cleaned and all(e is cleaned[0] for e in cleaned) and trainer.state.iteration == 1
