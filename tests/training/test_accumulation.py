"""Gradient accumulation in ``pipeline.training.engine.Trainer``: N micro-steps equal one step on an N-times larger batch,
in one process and under 2-process DDP (gloo), where micro-steps inside an accumulation skip the all-reduce."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from tests._ddp_helpers import (
    accumulation_worker,
    free_port,
    make_net,
    make_samples,
    train_once,
)

ATOL = 1e-6


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=1e-5)


def test_accumulated_step_equals_large_batch_step():
    samples = make_samples(8)
    accumulated = train_once(make_net(), samples, batch_size=2, accumulation_steps=4)
    large = train_once(make_net(), samples, batch_size=8, accumulation_steps=1)
    assert accumulated["steps"] == large["steps"] == 1
    _assert_close(accumulated["grads"][0], large["grads"][0])
    _assert_close(accumulated["params"], large["params"])
    # the step is visible: a broken accumulation (e.g. stepping every micro-step) could not pass the checks above
    per_micro = train_once(make_net(), samples, batch_size=2, accumulation_steps=1)
    assert per_micro["steps"] == 4
    assert not torch.allclose(per_micro["params"][0], large["params"][0], atol=1e-3)


def test_ddp_accumulation_matches_large_batch_and_skips_allreduce(tmp_path):
    world, micro_batch, accumulation = 2, 2, 3
    mp.spawn(accumulation_worker, args=(world, free_port(), str(tmp_path), micro_batch, accumulation), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for res in results:
        acc, large, single = res["accumulated"], res["large_batch"], res["single_process"]
        assert acc["steps"] == large["steps"] == 1
        # the all-reduced gradient of 2 ranks x 3 micro-steps x 2 samples is that of one batch of 12 samples
        _assert_close(acc["grads"][0], large["grads"][0])
        _assert_close(acc["grads"][0], single["grads"][0])
        _assert_close(acc["params"], single["params"])
        # only the micro-step that steps the optimizer all-reduces (same bucket count as the one large step)
        assert large["allreduce_calls"] >= 1
        assert acc["allreduce_calls"] == large["allreduce_calls"]
    _assert_close(results[0]["accumulated"]["params"], results[1]["accumulated"]["params"])
