"""Size a training recipe for a GPU without one: parameters, FLOPs and activation memory of one training step.

The recipe's network is built from the bundle configs (train.yaml + the given mixins + overrides) and run on the
``meta`` device, where no arithmetic happens but every tensor has its shape: one forward and backward pass of a
``batch_size x num_samples`` batch of ``patch_size`` patches. Counted:

- FLOPs of the step (``torch.utils.flop_counter``; a multiply-add is 2 FLOPs);
- bytes of the tensors autograd saves for the backward pass, in the AMP dtype (fp16: convolutions save half-size
  inputs; the estimate takes every saved tensor at that size, so it is low by the few fp32 ones);
- the optimizer's memory: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter).

From these it prints the estimated peak memory per GPU (saved tensors + optimizer state + the largest single
activation twice over as working space + a fixed allowance for the CUDA context and cuDNN workspace) and the step
time at a sustained throughput you give (``--tflops``; a T4 peaks at 65 fp16 tensor TFLOPS and sustains a fraction
of that on 3D convolutions). Both are estimates: measure one epoch on the GPU to confirm (bench/gpu_check.sh).

    PYTHONPATH=. python bench/bench_sizing.py --config bundle/configs/recipes/kaggle_2xT4.yaml --gpus 2 --tflops 4
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python bench/<name>.py
from monai.bundle import ConfigParser

from pipeline.utils.paths import BUNDLE

CUDA_CONTEXT_GB = 1.5  # CUDA context + cuDNN workspace + allocator slack


def step_figures(parser: ConfigParser, dtype: torch.dtype) -> dict[str, float]:
    """Parameters, FLOPs, saved bytes and the largest activation of one training step of the recipe's network."""
    network = parser.get_parsed_content("network_def").to("meta")
    network.train()
    patch = [int(s) for s in parser.get_parsed_content("patch_size")]
    batch = int(parser.get_parsed_content("batch_size")) * int(parser.get_parsed_content("num_samples"))
    x = torch.zeros([batch, 1, *patch], device="meta", dtype=dtype)
    network = network.to(dtype)
    saved = [0]
    largest = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        largest[0] = max(largest[0], t.numel() * t.element_size())
        return t

    with FlopCounterMode(display=False) as flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = network(x)
        out = out if isinstance(out, torch.Tensor) else torch.stack(list(out))
        out.float().mean().backward()
    n_params = sum(p.numel() for p in network.parameters())
    return {"params": n_params, "flops": flops.get_total_flops(), "saved": saved[0], "largest": largest[0],
            "batch": batch, "patch": patch}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=[], help="mixin over train.yaml (repeatable)")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="AMP dtype of activations")
    ap.add_argument("--tflops", type=float, default=12.0, help="sustained TFLOPS of the GPU assumed for timing")
    ap.add_argument("--gpu_gb", type=float, default=16.0, help="GPU memory to fit (T4: 16 GB, 15 GB usable)")
    ap.add_argument("--iterations", type=int, default=None, help="iterations per epoch per GPU (default: the Kaggle "
                    "training set's 806 volumes / GPUs / batch_size)")
    ap.add_argument("--gpus", type=int, default=1)
    args, rest = ap.parse_known_args()
    overrides = {}
    for key, value in zip(rest[::2], rest[1::2], strict=True):
        try:
            overrides[key.lstrip("-")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key.lstrip("-")] = value
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.yaml"), *args.config])
    parser.update(overrides)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    f = step_figures(parser, dtype)
    gb = 1e9
    optimizer = 16 * f["params"]
    peak = f["saved"] + optimizer + 2 * f["largest"] + CUDA_CONTEXT_GB * gb
    step_s = f["flops"] / (args.tflops * 1e12)
    print(f"network {parser.get_parsed_content('architecture')}: {f['params'] / 1e6:.2f} M parameters; "
          f"batch {f['batch']} x {f['patch']} per GPU, activations {args.dtype}")
    print(f"FLOPs per step (forward + backward): {f['flops'] / 1e12:.2f} TFLOP")
    print(f"saved for backward: {f['saved'] / gb:.2f} GB; optimizer state {optimizer / gb:.2f} GB; "
          f"largest activation {f['largest'] / gb:.2f} GB")
    print(f"estimated peak memory per GPU: {peak / gb:.1f} GB (of {args.gpu_gb:.0f} GB: "
          f"{'fits' if peak < 0.94 * args.gpu_gb * gb else 'DOES NOT FIT'})")
    iterations = args.iterations or -(-806 // (args.gpus * int(parser.get_parsed_content("batch_size"))))
    epochs = int(parser.get_parsed_content("epochs"))
    accumulation = int(parser.get_parsed_content("accumulation_steps"))
    print(f"step at {args.tflops:g} sustained TFLOPS: {step_s:.2f} s; epoch of {iterations} iterations per GPU: "
          f"{iterations * step_s / 60:.1f} min; {epochs} epochs: {epochs * iterations * step_s / 3600:.2f} h "
          f"(accumulation {accumulation}: effective batch {f['batch'] * accumulation * args.gpus})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
