"""Helpers of the DDP tests: a handler that records what each rank trained and validated on, and the worker of the
2-process gradient-accumulation test (run by ``torch.multiprocessing.spawn``)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from pipeline.training.engine import Trainer

SAMPLE_SHAPE = (1, 6, 6, 6)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CaseRecorder:
    """Writes ``out_dir/rank<r>.json`` at the end of training: this rank's pid and world size, the case ids of each
    training batch per epoch, of each validation batch, and the validation metrics after each validation."""

    def __init__(self, out_dir: str, evaluator: Engine | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.evaluator = evaluator
        self.record: dict[str, Any] = {"train_ids": {}, "val_ids": [], "val_metrics": []}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._train_batch)
        engine.add_event_handler(Events.COMPLETED, self._write)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.ITERATION_STARTED, self._val_batch)
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._val_metrics)

    def _train_batch(self, engine: Engine) -> None:
        self.record["train_ids"].setdefault(str(engine.state.epoch), []).extend(engine.state.batch["id"])

    def _val_batch(self, engine: Engine) -> None:
        self.record["val_ids"].extend(engine.state.batch["id"])

    def _val_metrics(self, engine: Engine) -> None:
        self.record["val_metrics"].append({k: float(v) for k, v in engine.state.metrics.items()})

    def _write(self, engine: Engine) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = {**self.record, "rank": rank, "world_size": world, "pid": os.getpid()}
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(data))


def recorder_mixin(path: Path, out_dir: Path) -> Path:
    """Write a bundle mixin that attaches a ``CaseRecorder`` to the trainer and the evaluator."""
    path.write_text(
        "case_recorder:\n"
        "  _target_: tests._ddp_helpers.CaseRecorder\n"
        f"  out_dir: '{out_dir}'\n"
        "  evaluator: '@validate#evaluator'\n"
        "train#trainer#train_handlers: '$@train#handlers + [@case_recorder]'\n"
    )
    return path


class WeightsAtStart:
    """Writes ``out_dir/weights_rank<r>.pt`` at the run's first iteration, before its first step (so after the
    checkpointer, attached later in ``initialize``, has resumed or initialised): the weights this rank starts from."""

    def __init__(self, out_dir: str, network: torch.nn.Module) -> None:
        self.out_dir, self.network, self.written = Path(out_dir), network, False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._write)

    def _write(self, engine: Engine) -> None:
        if self.written:
            return
        self.written = True
        rank = dist.get_rank() if dist.is_initialized() else 0
        net = getattr(self.network, "module", self.network)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, self.out_dir / f"weights_rank{rank}.pt")


def weights_mixin(path: Path, out_dir: Path) -> Path:
    """Write a bundle mixin that attaches a ``WeightsAtStart`` to the trainer, after its other handlers."""
    path.write_text(
        "weights_at_start:\n"
        "  _target_: tests._ddp_helpers.WeightsAtStart\n"
        f"  out_dir: '{out_dir}'\n"
        "  network: '@network'\n"
        "train#trainer#train_handlers: '$@train#handlers + [@weights_at_start]'\n"
    )
    return path


def make_samples(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random image/target pairs for a regression with a mean squared error."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(SAMPLE_SHAPE, generator=g), "label": torch.randn(SAMPLE_SHAPE, generator=g)} for _ in range(n)]


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 1, 1))


def train_once(
    net: torch.nn.Module, samples: list[dict], batch_size: int, accumulation_steps: int, lr: float = 0.5
) -> dict[str, Any]:
    """Train ``net`` one epoch (plain SGD, MSE mean) with the project's Trainer.

    Returns:
        ``grads``: the gradients at each optimizer step (taken after the backward pass, before the step),
        ``steps``: optimizer steps taken, ``params``: the weights after training.
    """
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    trainer = Trainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(Dataset(samples), batch_size=batch_size),
        network=net, optimizer=optimizer, loss_function=torch.nn.MSELoss(), amp=False, decollate=False,
        accumulation_steps=accumulation_steps,
    )
    grads: list[list[torch.Tensor]] = []
    step = {"n": 0}

    def count_step(*_: Any) -> None:
        step["n"] += 1

    optimizer.register_step_pre_hook(lambda *_: grads.append([p.grad.detach().clone() for p in net.parameters()]))
    optimizer.register_step_post_hook(count_step)
    trainer.run()
    return {"grads": grads, "steps": step["n"], "params": [p.detach().clone() for p in net.parameters()]}


def accumulation_worker(rank: int, world: int, port: int, out_dir: str, micro_batch: int, accumulation: int) -> None:
    """One rank of the DDP accumulation test: ``accumulation`` micro-steps of ``micro_batch`` under DDP against one
    step of ``accumulation * micro_batch`` under DDP and one single-process step on the whole batch of all ranks.
    Counts the gradient all-reduces (DDP comm hook calls) of each run; saves ``rank<r>.pt`` into ``out_dir``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        per_rank = micro_batch * accumulation
        samples = make_samples(per_rank * world)
        shard = samples[rank * per_rank : (rank + 1) * per_rank]
        results: dict[str, Any] = {}
        for name, batch, acc in (("accumulated", micro_batch, accumulation), ("large_batch", per_rank, 1)):
            ddp = DistributedDataParallel(make_net())
            calls = {"n": 0}

            # unannotated: DDP compares annotations with dist.GradBucket, and postponed annotations are strings
            def counting_hook(state, bucket):  # noqa: ANN001, ANN202
                state["n"] += 1
                return allreduce_hook(None, bucket)

            ddp.register_comm_hook(calls, counting_hook)
            out = train_once(ddp, shard, batch, acc)
            results[name] = {**out, "allreduce_calls": calls["n"]}
        results["single_process"] = train_once(make_net(), samples, per_rank * world, 1)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def hang_worker(rank: int, world: int, port: int, out_dir: str, timeout_minutes: float) -> None:
    """Rank 0 enters an all-reduce that rank 1 never joins; rank 0 records how long until the collective raised."""
    import time

    from pipeline.utils.distributed import destroy_distributed, init_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed("cpu", timeout_minutes=timeout_minutes)
    if rank == 0:
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
            outcome = "returned"
        except RuntimeError as e:
            outcome = type(e).__name__
        (Path(out_dir) / "hang.json").write_text(json.dumps({"outcome": outcome, "elapsed": time.monotonic() - start}))
    else:
        time.sleep(timeout_minutes * 60 * 2)
    destroy_distributed()
