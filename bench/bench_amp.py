"""Training throughput of the bundle's default UNet in fp32 vs bf16 autocast on this CPU, measured in one run.

    OMP_NUM_THREADS=2 python bench/bench_amp.py [--patch 64] [--iters 6] [--rounds 3]

Rounds alternate fp32 / bf16 so machine noise hits both alike; the best round of each is reported. It also prints
whether the CPU has native bf16 (AMX-bf16 / AVX512-bf16), which decides the bundle's ``amp: auto`` on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from monai.networks.nets import UNet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.training.losses import MaskedDiceBCELoss  # noqa: E402
from pipeline.utils.amp import autocast_for, cpu_has_fast_bf16  # noqa: E402


def samples_per_s(dtype: torch.dtype | None, patch: int, batch: int, iters: int) -> float:
    torch.manual_seed(0)
    net = UNet(3, 1, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    loss_fn = MaskedDiceBCELoss()
    x = torch.randn(batch, 1, patch, patch, patch)
    y = torch.randint(0, 3, (batch, 1, patch, patch, patch)).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_for("cpu", dtype):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    best = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(a.rounds):
        best["fp32"] = max(best["fp32"], samples_per_s(None, a.patch, a.batch, a.iters))
        best["bf16"] = max(best["bf16"], samples_per_s(torch.bfloat16, a.patch, a.batch, a.iters))
    print(f"CPU native bf16: {cpu_has_fast_bf16()}  threads: {torch.get_num_threads()}  patch {a.patch}^3 x {a.batch}")
    print(f"fp32: {best['fp32']:.2f} samples/s   bf16 autocast: {best['bf16']:.2f} samples/s")
    print(f"bf16 / fp32 throughput ratio: {best['bf16'] / best['fp32']:.2f}")


if __name__ == "__main__":
    main()
