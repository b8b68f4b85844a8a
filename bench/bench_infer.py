"""Inference at scale, measured in one run on this machine:

1. speed: in-memory sliding-window inference (what inference.yaml does: NormalizeIntensity, ``make_inferer``,
   threshold) against streaming block-wise prediction (``pipeline.inference.predict.StreamingPredictor``: zarr in, zarr out,
   statistics pass, blocks with halos) on one ``--size``^3 uint8 volume; prints both times, the speed ratio and the
   largest probability difference;
2. memory: peak RSS of streaming prediction (each in a fresh process) on synthetic ``--rss_sizes`` zarr volumes at
   each window of ``--rss_windows``; the output comes from one convolution (fast), and the project's default network
   (UNet 16-32-64-128) also runs on about 24 of the batches so that its activations count (``--rss_net conv``: the
   convolution only, which leaves out about 0.5 GiB at 4 x 128^3 windows);
3. ranks: test-set inference through the bundle (``monai.bundle run inference``) in 1 process against torchrun with
   ``--rank_nproc`` ranks (CPU: the cores shared out as threads, gloo; GPU: one GPU per rank), on a synthetic test
   set, wall time including start-up, and whether the masks are byte-equal.

    nice -n 10 python bench/bench_infer.py [--size 320] [--rss_sizes 768] [--rss_windows 32 64 128] [--channels 4 8 16] [--skip ...]
    python bench/bench_infer.py --skip speed rss --rank_nproc "$(nvidia-smi -L | wc -l)"   # 1 vs all GPUs

Outputs go to a temporary folder under ``--workdir`` (default: the system's), removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.inference.predict import StreamingPredictor, plan_blocks  # noqa: E402


def _unet(channels: list[int]) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 1, channels=channels, strides=[2] * (len(channels) - 1), num_res_units=1).eval()


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 1, 3, padding=1).eval()


def _write_volume(path: Path, size: int, chunk: int = 128, seed: int = 0) -> None:
    """A ``size``^3 uint8 zarr written chunk by chunk: 8^3-voxel plateaus plus noise (cheap to make, CT-like range)."""
    import zarr

    arr = zarr.create_array(path, shape=(size,) * 3, chunks=(chunk,) * 3, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for z in range(0, size, chunk):
        for y in range(0, size, chunk):
            for x in range(0, size, chunk):
                shape = tuple(min(chunk, size - a) for a in (z, y, x))
                coarse = rng.integers(40, 200, size=tuple(-(-s // 8) for s in shape), dtype=np.uint8)
                block = coarse.repeat(8, 0).repeat(8, 1).repeat(8, 2)[: shape[0], : shape[1], : shape[2]]
                arr[z : z + shape[0], y : y + shape[1], x : x + shape[2]] = block + rng.integers(0, 40, size=shape, dtype=np.uint8)


def bench_speed(args: argparse.Namespace, work: Path) -> None:
    import zarr
    from monai.transforms import NormalizeIntensity

    from pipeline.inference.inferers import make_inferer

    src = work / "speed.zarr"
    _write_volume(src, args.size)
    net = _unet(args.channels)
    roi = (args.roi,) * 3
    vol = zarr.open_array(src, mode="r")[:]
    t_mem, t_stream = [], []
    for rep in range(args.repeats):  # alternating, best of each: the machine is shared
        start = time.perf_counter()
        x = NormalizeIntensity()(torch.from_numpy(vol).float())
        with torch.no_grad():
            ref = make_inferer(roi, args.sw_batch_size, args.overlap)(x[None, None], net)[0, 0]
        mask = (ref >= 0.5).to(torch.uint8).numpy()
        t_mem.append(time.perf_counter() - start)
        del x
        probs = np.zeros(vol.shape, np.float32)
        blocks = iter(b for _, b in plan_blocks(vol.shape, (args.block,) * 3))  # the order predict runs them in

        def post(p: np.ndarray) -> np.ndarray:
            probs[next(blocks)] = p[0]
            return (p >= 0.5).astype(np.uint8)

        predictor = StreamingPredictor(net, roi, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                       postprocess=post, block_size=(args.block,) * 3, chunk_size=(args.chunk,) * 3)
        start = time.perf_counter()
        predictor.predict(src, work / f"speed_out{rep}.zarr")  # a fresh output: nothing to resume
        t_stream.append(time.perf_counter() - start)
    differ = zarr.open_group(work / "speed_out0.zarr", mode="r")["mask"][:] != mask
    near = float(np.abs(ref.numpy()[differ] - 0.5).max()) if differ.any() else 0.0
    print(f"[speed] {args.size}^3 uint8, UNet{tuple(args.channels)}, roi {args.roi}, overlap {args.overlap}, "
          f"block {args.block}, chunk {args.chunk}, {torch.get_num_threads()} threads")
    runs = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(t_mem, t_stream))
    print(f"  in-memory: {min(t_mem):7.1f} s   streaming: {min(t_stream):7.1f} s   speed ratio streaming/in-memory: "
          f"{min(t_mem) / min(t_stream):.3f}   (best of {args.repeats}; runs in-memory/streaming: {runs})")
    print(f"  max |dprob| {np.abs(probs - ref.numpy()).max():.2e}, mask voxels differing: {int(differ.sum())} "
          f"(all within {near:.1e} of the threshold), windows run {predictor.window.windows_run}")


class _ProbeNet(torch.nn.Module):
    """One convolution (the output), and every ``every``-th forward also the project's default network on the same
    batch, output dropped: its activations (about 0.5 GiB at 4 x 128^3) then peak while blocks and cache are held,
    as they do in a real run, without running it on every window (a real network at 768^3 takes hours on a CPU)."""

    def __init__(self, every: int) -> None:
        super().__init__()
        from pipeline.model.networks import build_network

        self.conv = _small_net()
        self.real = build_network().eval()
        self.every, self.calls = max(1, every), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % self.every == 1 or self.every == 1:
            self.real(x)
        return self.conv(x)


def _rss_child(size: int, src: str, out: str, block: int, chunk: int, roi: int, overlap: float, sw_batch_size: int = 4,
               net: str = "probe", probes: int = 24) -> None:
    from pipeline.inference.blockwise import window_grid

    batches = len(window_grid(size, roi, overlap).starts) ** 3 / sw_batch_size
    network = _ProbeNet(int(batches // probes)) if net == "probe" else _small_net()
    predictor = StreamingPredictor(network, (roi,) * 3, overlap=overlap, sw_batch_size=sw_batch_size,
                                   block_size=(block,) * 3, chunk_size=(chunk,) * 3, probabilities="uint8")
    start = time.perf_counter()
    predictor.predict(src, out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"size": size, "roi": roi, "seconds": time.perf_counter() - start, "rss_gib": rss,
                      "windows_run": predictor.window.windows_run, "block": list(predictor.block_size)}))


def bench_rss(args: argparse.Namespace, work: Path) -> None:
    net = ("one-conv net + default UNet on every ~1/24 of the batches" if args.rss_net == "probe" else "one-conv net")
    print(f"[rss] peak RSS of python -m pipeline predict's StreamingPredictor, fresh process each; {net}, overlap "
          f"{args.rss_overlap}, sw_batch_size {args.sw_batch_size}, block {args.block}, chunk {args.chunk}, "
          f"uint8 probabilities written, window cache {StreamingPredictor.cache_bytes >> 20} MiB")
    for size in args.rss_sizes:
        src = work / f"rss{size}.zarr"
        _write_volume(src, size)
        for roi in args.rss_windows:
            out = work / f"rss{size}_{roi}_out.zarr"
            code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from bench.bench_infer import _rss_child; "
                    f"_rss_child({size}, {str(src)!r}, {str(out)!r}, {args.block}, {args.chunk}, {roi}, "
                    f"{args.rss_overlap}, {args.sw_batch_size}, {args.rss_net!r})")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"RSS run on {size}^3, window {roi} failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {size}^3 uint8 ({size**3 / 2**30:.2f} GiB), window {roi}^3: peak RSS {r['rss_gib']:.2f} GiB, "
                  f"{r['seconds']:.0f} s, {r['windows_run']} windows run, block {r['block']}", flush=True)
            shutil.rmtree(out)
        shutil.rmtree(src)


def bench_ranks(args: argparse.Namespace, work: Path) -> None:
    from pipeline.data.synth import SynthConfig, generate_dataset

    shape = (args.rank_size,) * 3
    data = generate_dataset(work / "ranks_data", SynthConfig(n_train=2, n_test=args.rank_volumes, shapes=(shape,), seed=0))
    ckpt = work / "ranks_models"
    ckpt.mkdir()
    torch.save(_unet(args.channels).state_dict(), ckpt / "model.pt")
    overrides = {"dataset_dir": str(data), "ckpt_dir": str(ckpt), "network_channels": args.channels,
                 "network_strides": [2] * (len(args.channels) - 1), "num_res_units": 1, "overlays": False,
                 "amp": False, "tta": False, "patch_size": [args.roi] * 3}
    cli = [f"--{k}={v!r}" for k, v in overrides.items()]
    times, masks = {}, {}
    cores, n = os.cpu_count() or 1, args.rank_nproc
    device = "GPU" if torch.cuda.is_available() else "thread"
    for name, prefix, threads in (
        (f"1 process x {cores if device == 'thread' else 1} {device}", [sys.executable], str(cores)),
        (f"{n} ranks x {max(1, cores // n) if device == 'thread' else 1} {device}",
         [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"], str(max(1, cores // n))),
    ):
        out = work / f"ranks_{threads}"
        cmd = [*prefix, "-m", "monai.bundle", "run", "inference", "--config_file", str(REPO / "bundle/configs/inference.yaml"),
               *cli, f"--output_dir={str(out)!r}"]
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        times[name] = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
        masks[name] = {p.name: p.read_bytes() for p in sorted((out / "predictions").glob("*.tif"))}
    (one, t1), (two, t2) = times.items()
    same = masks[one] == masks[two] and len(masks[one]) == args.rank_volumes
    print(f"[ranks] {args.rank_volumes} test volumes of {args.rank_size}^3, UNet{tuple(args.channels)}, roi {args.roi}")
    print(f"  {one}: {t1:6.1f} s   {two}: {t2:6.1f} s   speed-up: {t1 / t2:.2f}x   masks byte-equal: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=320, help="volume edge of the speed comparison")
    parser.add_argument("--channels", type=int, nargs="+", default=[4, 8, 16], help="UNet channels (speed, ranks)")
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw_batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="speed runs of each, alternating (best counts)")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--rss_sizes", type=int, nargs="*", default=[768])
    parser.add_argument("--rss_windows", type=int, nargs="*", default=[32, 64, 128], help="window (roi) edges for rss")
    parser.add_argument("--rss_overlap", type=float, default=0.5)
    parser.add_argument("--rss_net", choices=["probe", "conv"], default="probe",
                        help="probe: one conv + the default UNet on some batches; conv: one conv only")
    parser.add_argument("--rank_volumes", type=int, default=4)
    parser.add_argument("--rank_size", type=int, default=128)
    parser.add_argument("--rank_nproc", type=int, default=2, help="ranks against 1 process (on GPUs: one per GPU)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "rss", "ranks"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_infer_") as tmp:
        for name, fn in (("speed", bench_speed), ("rss", bench_rss), ("ranks", bench_ranks)):
            if name not in args.skip:
                fn(args, Path(tmp))
                sys.stdout.flush()


if __name__ == "__main__":
    main()
