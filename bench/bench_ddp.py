"""Training throughput on this CPU: 2 DDP processes (gloo) x 1 thread against 1 process x 2 threads.

Both train the same tiny 3D UNet with ``pipeline.training.engine.Trainer`` and the project's loss for the same number of
optimizer steps at the same effective batch (``--batch`` patches per step: split over the 2 ranks under DDP).
Each configuration runs ``--repeats`` times, alternating, and the fastest run of each counts (the machine is shared).

    OMP_NUM_THREADS=1 python bench/bench_ddp.py [--patch 32] [--batch 4] [--steps 20] [--warmup 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.networks.nets import UNet
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.training.engine import Trainer  # noqa: E402
from pipeline.training.losses import MaskedDiceBCELoss  # noqa: E402


def _samples(n: int, patch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, patch, patch, patch)
    return [
        {"image": torch.randn(shape, generator=g), "label": torch.randint(0, 3, shape, generator=g).to(torch.uint8)}
        for _ in range(n)
    ]


def _worker(rank: int, world: int, threads: int, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    per_rank = args.batch // world
    torch.manual_seed(0)
    net = UNet(3, 1, 1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    if world > 1:
        net = DistributedDataParallel(net)
    loader = DataLoader(Dataset(_samples(per_rank * (args.warmup + args.steps), args.patch, seed=rank)), batch_size=per_rank)
    trainer = Trainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01), loss_function=MaskedDiceBCELoss(), amp=False,
        decollate=False,
    )
    marks: dict[str, float] = {}

    @trainer.on(Events.ITERATION_COMPLETED(once=args.warmup))
    def _start(_: Trainer) -> None:
        marks["start"] = time.perf_counter()

    trainer.run()
    elapsed = time.perf_counter() - marks["start"]
    if world > 1:
        slowest = torch.tensor([elapsed])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        elapsed = float(slowest)
        dist.destroy_process_group()
    if rank == 0:
        (Path(tmp) / "elapsed").write_text(str(elapsed))


def _run(world: int, threads: int, args: argparse.Namespace) -> float:
    """Patches per second of one configuration."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, threads, args, tmp), nprocs=world)
        return args.batch * args.steps / float((Path(tmp) / "elapsed").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="effective batch (patches per optimizer step)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.batch % 2:
        parser.error(f"--batch {args.batch} must be even (split over 2 processes)")
    single, ddp = [], []
    for _ in range(args.repeats):
        single.append(_run(1, 2, args))
        ddp.append(_run(2, 1, args))
    s, d = max(single), max(ddp)
    print(f"patch {args.patch}^3, effective batch {args.batch}, {args.steps} steps, best of {args.repeats}")
    print(f"1 process x 2 threads: {s:7.2f} patches/s  (runs: {', '.join(f'{x:.2f}' for x in single)})")
    print(f"2 DDP gloo x 1 thread: {d:7.2f} patches/s  (runs: {', '.join(f'{x:.2f}' for x in ddp)})")
    print(f"ratio DDP / single:    {d / s:7.2f}")


if __name__ == "__main__":
    main()
