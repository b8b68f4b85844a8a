"""Time one training checkpoint of train.yaml's default 3D UNet (+ AdamW state) and its cost per interval.

Usage: python bench/bench_checkpoint.py [--dir CKPT_DIR] [--repeats N]
(``--dir`` on the disk the real ``ckpt_dir`` lives on: fsync cost depends on it.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python bench/<name>.py
from pipeline.training.checkpoint import TrainingCheckpointer, find_latest_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = ConfigParser()
    config.read_config(str(Path(__file__).resolve().parent.parent / "bundle" / "configs" / "train.yaml"))
    config["device"] = "$torch.device('cpu')"
    network, optimizer = config.get_parsed_content("network"), config.get_parsed_content("optimizer")  # the defaults
    network(torch.rand(1, 1, 32, 32, 32)).mean().backward()
    optimizer.step()  # populates AdamW's exp_avg / exp_avg_sq
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration, engine.state.epoch_length, engine.state.max_epochs = 3, 750, 250, 100

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        checkpointer = TrainingCheckpointer(folder, network, optimizer, lr_scheduler=scheduler, keep_last=None)
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            path = checkpointer.save(engine, f"checkpoint_epoch=0003_iter={i:06d}.pt")
            times.append(time.perf_counter() - start)
        size_mb = path.stat().st_size / 2**20
        start = time.perf_counter()
        latest = find_latest_checkpoint(folder)
        find_s = time.perf_counter() - start
        start = time.perf_counter()
        torch.load(latest, map_location="cpu", weights_only=True)
        load_s = time.perf_counter() - start

    params = sum(p.numel() for p in network.parameters())
    save_s = statistics.median(times)
    channels = tuple(config.get_parsed_content("network_channels"))
    print(f"model: train.yaml's UNet 3D {channels}, {params / 1e6:.2f} M parameters + {type(optimizer).__name__} "
          f"state; file {size_mb:.1f} MiB")
    print(
        f"save (state dict + atomic write + fsync), median of {args.repeats}: {save_s * 1e3:.0f} ms "
        f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})"
    )
    print(f"fraction of a 60-minute interval: {save_s / 3600:.2e} ({100 * save_s / 3600:.4f} %)")
    print(f"fraction of a 1-minute interval:  {save_s / 60:.2e} ({100 * save_s / 60:.3f} %)")
    print(
        f"find_latest_checkpoint over {args.repeats} files: {find_s * 1e3:.0f} ms; full weights_only load: "
        f"{load_s * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
