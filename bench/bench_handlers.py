"""Overhead of the monitoring handlers on a tiny CPU training loop.

Trains a small MONAI UNet on random 32^3 patches with an ignite Engine (validation of one batch every epoch,
per-iteration LR schedule), once with ProgressHandler, ThroughputMonitor (+ TensorBoard), TrainingCurves and
TensorBoardPreview attached and once without, alternating the two set-ups ``--repeats`` times, and prints the
throughput (training samples over the wall time of the run) both ways and the overhead ratio (best of the
repeats).

    OMP_NUM_THREADS=1 python bench/bench_handlers.py --epochs 3 --iters 20 --repeats 2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import HandlersTimeProfiler
from monai.handlers import LrScheduleHandler
from monai.networks.nets import UNet
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.training.monitor import ProgressHandler, ThroughputMonitor  # noqa: E402
from pipeline.training.plots import TensorBoardPreview, TrainingCurves  # noqa: E402
from pipeline.training.schedulers import build_lr_scheduler  # noqa: E402

_OURS = ("ProgressHandler", "ThroughputMonitor", "TrainingCurves", "TensorBoardPreview")


def _batches(n: int, batch_size: int, patch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(batch_size, 1, patch, patch, patch, generator=g),
            "label": (torch.rand(batch_size, 1, patch, patch, patch, generator=g) > 0.9).float(),
        }
        for _ in range(n)
    ]


def run_once(
    with_handlers: bool, args: argparse.Namespace, out_dir: Path, profile: bool = False
) -> tuple[float, dict[str, tuple[float, float]]]:
    """Train once.

    Returns:
        the wall time of ``trainer.run`` in seconds (the same validation both ways) and, with ``profile``,
        the total and mean (per call that took measurable time) seconds spent in each of this project's
        handler callbacks.
    """
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train_data = _batches(args.iters, args.batch_size, args.patch, seed=1)
    val_data = _batches(1, 1, args.patch, seed=2)

    def train_step(engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        pred = model(batch["image"])
        loss = loss_fn(pred, batch["label"])
        loss.backward()
        optimizer.step()
        return {"image": batch["image"], "label": batch["label"], "pred": pred.detach(), "loss": loss.detach()}

    def val_step(engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"image": batch["image"], "label": batch["label"], "pred": model(batch["image"])}

    trainer, evaluator = Engine(train_step), Engine(val_step)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(val_dice=0.5))
    scheduler = build_lr_scheduler(optimizer, "cosine_restarts", epoch_length=args.iters, warmup_epochs=0.5, T_0=1)
    LrScheduleHandler(scheduler, epoch_level=False, print_lr=False).attach(trainer)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run(val_data, max_epochs=e.state.epoch))
    writer = None
    if with_handlers:
        writer = SummaryWriter(log_dir=str(out_dir / "tb"))
        ProgressHandler(optimizer=optimizer, mode="log", log_every=10).attach(trainer)
        monitor = ThroughputMonitor(summary_writer=writer)
        monitor.attach(trainer)
        TrainingCurves(out_dir, evaluator=evaluator, optimizer=optimizer, throughput=monitor).attach(trainer)
        TensorBoardPreview(writer).attach(evaluator)
    profilers = [HandlersTimeProfiler(), HandlersTimeProfiler()] if profile else []
    for profiler, engine in zip(profilers, (trainer, evaluator), strict=False):
        profiler.attach(engine)
    start = time.perf_counter()
    trainer.run(train_data, max_epochs=args.epochs)
    elapsed = time.perf_counter() - start
    if writer is not None:
        writer.close()
    totals: dict[str, tuple[float, float]] = {}
    for profiler in profilers:
        for name, event, total, _, _, mean, _ in profiler.get_results():
            if name.split(".")[0] in _OURS and isinstance(total, float):
                totals[f"{name} ({event})"] = (total, mean)
    return elapsed, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20, help="iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # the handlers' INFO lines are formatted and written (cost counted), to /dev/null
    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115
    torch.set_num_threads(1)

    samples = args.epochs * args.iters * args.batch_size
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        run_once(False, args, Path(tmp) / "warmup")
        for r in range(args.repeats):
            for with_handlers in (False, True):
                times[with_handlers].append(run_once(with_handlers, args, Path(tmp) / f"run{r}")[0])
        _, totals = run_once(True, args, Path(tmp) / "profiled", profile=True)
    off, on = min(times[False]), min(times[True])
    print(f"{args.epochs} epochs x {args.iters} it x batch {args.batch_size} of {args.patch}^3, "
          f"torch threads 1, best of {args.repeats}")
    print(f"handlers off: {samples / off:.2f} samples/s ({1000 * off / (args.epochs * args.iters):.1f} ms/it)")
    print(f"handlers on : {samples / on:.2f} samples/s ({1000 * on / (args.epochs * args.iters):.1f} ms/it)")
    print(f"overhead ratio on/off: {on / off:.3f} (+{(on - off) / args.epochs:.3f} s per epoch)")
    print("time in each handler callback (HandlersTimeProfiler, one extra run):")
    for name, (total, mean) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(f"  {name:60s} {total:8.3f} s total, {1000 * mean:8.2f} ms mean per call")


if __name__ == "__main__":
    main()
