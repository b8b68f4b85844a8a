"""Tests for pipeline.training.schedulers: closed-form learning rates and exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.schedulers import (
    WarmupCosineRestarts,
    WarmupPolyLR,
    build_lr_scheduler,
)

BASE_LR = 1e-2
ETA_MIN = 1e-6
WARMUP = 10
T0 = 20
START = 0.01


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE_LR)


def _run_to(scheduler: torch.optim.lr_scheduler.LRScheduler, it: int) -> float:
    """Step ``scheduler`` until it has seen ``it`` iterations; return the optimizer's lr."""
    while scheduler.last_epoch < it:
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler.optimizer.param_groups[0]["lr"]


def _cosine(t_cur: int, t_i: int) -> float:
    return ETA_MIN + (BASE_LR - ETA_MIN) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


# cycles after warmup: [10, 30) T_i=20, [30, 70) T_i=40, [70, 150) T_i=80
COSINE_CASES = [
    (0, BASE_LR * START),
    (4, BASE_LR * (START + (1 - START) * 4 / WARMUP)),
    (WARMUP, BASE_LR),
    (WARMUP + 10, _cosine(10, 20)),
    (WARMUP + 19, _cosine(19, 20)),
    (WARMUP + 20, BASE_LR),
    (WARMUP + 21, _cosine(1, 40)),
    (WARMUP + 59, _cosine(39, 40)),
    (WARMUP + 60, BASE_LR),
    (WARMUP + 61, _cosine(1, 80)),
]


@pytest.mark.parametrize(("it", "expected"), COSINE_CASES)
def test_cosine_restarts_closed_form(it: int, expected: float) -> None:
    scheduler = WarmupCosineRestarts(_optimizer(), warmup_iters=WARMUP, t0_iters=T0, t_mult=2, eta_min=ETA_MIN,
                                     warmup_start_factor=START)
    assert _run_to(scheduler, it) == pytest.approx(expected, abs=1e-9, rel=0)
    assert scheduler.get_last_lr()[0] == pytest.approx(expected, abs=1e-9, rel=0)


def test_cosine_matches_torch_after_warmup() -> None:
    """Past warmup the schedule equals torch's CosineAnnealingWarmRestarts shifted by the warmup length."""
    ours = WarmupCosineRestarts(_optimizer(), warmup_iters=WARMUP, t0_iters=T0, t_mult=2, eta_min=ETA_MIN)
    _run_to(ours, WARMUP)
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=T0, T_mult=2, eta_min=ETA_MIN)
    for _ in range(160):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-9, rel=0)
        _run_to(ours, ours.last_epoch + 1)
        ref_opt.step()
        ref.step()


@pytest.mark.parametrize("it", [0, 5, WARMUP, WARMUP + 1, 50, 99, 100, 120])
def test_poly_closed_form(it: int) -> None:
    max_iters = 100
    scheduler = WarmupPolyLR(_optimizer(), warmup_iters=WARMUP, max_iters=max_iters, exponent=0.9,
                             warmup_start_factor=START)
    if it < WARMUP:
        expected = BASE_LR * (START + (1 - START) * it / WARMUP)
    else:
        expected = BASE_LR * (1 - min(it - WARMUP, max_iters - WARMUP) / (max_iters - WARMUP)) ** 0.9
    assert _run_to(scheduler, it) == pytest.approx(expected, abs=1e-9, rel=0)


def test_poly_without_warmup_is_nnunet_poly() -> None:
    scheduler = WarmupPolyLR(_optimizer(), warmup_iters=0, max_iters=50)
    for it in range(50):
        assert _run_to(scheduler, it) == pytest.approx(BASE_LR * (1 - it / 50) ** 0.9, abs=1e-12, rel=0)


@pytest.mark.parametrize("name", ["cosine_restarts", "poly"])
def test_resume_continues_identically(name: str) -> None:
    kwargs = {"epoch_length": 7, "warmup_epochs": 1.5, "T_0": 2, "T_mult": 2, "max_epochs": 20}
    reference = build_lr_scheduler(_optimizer(), name, **kwargs)
    expected = [_run_to(reference, it) for it in range(1, 120)]

    first = build_lr_scheduler(_optimizer(), name, **kwargs)
    _run_to(first, 37)
    saved = first.state_dict()
    # a fresh process: new optimizer at the peak lr, optimizer state deliberately not restored
    resumed = build_lr_scheduler(_optimizer(), name, **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.optimizer.param_groups[0]["lr"] == expected[36]
    got = [_run_to(resumed, it) for it in range(38, 120)]
    assert got == expected[37:]


def test_resume_takes_the_new_runs_settings() -> None:
    """Raising epochs on a finished poly run continues the decay over the new length (the old max_iters would
    leave the learning rate at 0); a changed epoch length rebases the progress to the same fractional epoch."""
    done = build_lr_scheduler(_optimizer(), "poly", epoch_length=4, max_epochs=10)
    _run_to(done, 40)
    assert done.get_last_lr()[0] == 0.0
    longer = build_lr_scheduler(_optimizer(), "poly", epoch_length=4, max_epochs=20)
    longer.load_state_dict(done.state_dict())
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.5**0.9, rel=1e-12)

    kwargs = {"warmup_epochs": 1, "T_0": 4, "T_mult": 2}
    four = build_lr_scheduler(_optimizer(), "cosine_restarts", epoch_length=4, **kwargs)
    _run_to(four, 12)  # 3 epochs of 4 iterations
    eight = build_lr_scheduler(_optimizer(), "cosine_restarts", epoch_length=8, **kwargs)
    eight.load_state_dict(four.state_dict())
    assert eight.last_epoch == 24  # 3 epochs of 8 iterations
    assert eight.optimizer.param_groups[0]["lr"] == pytest.approx(eight.lr_at(24)[0], rel=1e-12)
    assert eight.lr_at(24)[0] == pytest.approx(four.lr_at(12)[0], rel=1e-12)  # same point of the schedule


def test_factory_converts_fractional_epochs() -> None:
    scheduler = build_lr_scheduler(_optimizer(), "cosine_restarts", epoch_length=8, warmup_epochs=0.5, T_0=2.5)
    assert isinstance(scheduler, WarmupCosineRestarts)
    assert (scheduler.warmup_iters, scheduler.t0_iters) == (4, 20)
    poly = build_lr_scheduler(_optimizer(), "poly", epoch_length=8, warmup_epochs=0.25, max_epochs=3.5)
    assert isinstance(poly, WarmupPolyLR)
    assert (poly.warmup_iters, poly.max_iters) == (2, 28)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("step", {"epoch_length": 5}, "step"),
        ("poly", {"epoch_length": 5}, "max_epochs"),
        ("cosine_restarts", {"epoch_length": 0}, "epoch_length"),
        ("cosine_restarts", {"epoch_length": 5, "T_mult": 1.5}, "t_mult"),
    ],
)
def test_factory_rejects_bad_arguments(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_lr_scheduler(_optimizer(), name, **kwargs)
