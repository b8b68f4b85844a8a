"""Time ``pipeline.score.score_volume`` and each component on a synthetic 320^3 volume.

The label holds a few curved sheets (two voxels thick) with a 3-voxel ignored border; the prediction is the label
shifted by one voxel in places, with holes punched, a sheet cut and dust added. The official ``topometrics`` code
takes about a minute per 320^3 volume. Run from the repo root::

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_score.py [--size 320]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python bench/<name>.py
from pipeline.score import score_volume, surface_dice, topo_score, voi


def synthetic_pair(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, label) with curved sheets; label values 0/1/2, prediction uint8 0/1."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:size, :size, :size]
    label = np.zeros((size, size, size), np.uint8)
    for k, offset in enumerate(np.linspace(0.2, 0.8, 4) * size):
        surface = offset + 0.06 * size * np.sin(2 * np.pi * (y / size + k / 4)) * np.cos(np.pi * x / size)
        label[np.abs(z - surface) < 1.0] = 1
    label[:3], label[-3:], label[:, :3], label[:, -3:], label[:, :, :3], label[:, :, -3:] = (2,) * 6
    pred = (label == 1).astype(np.uint8)
    pred[:, : size // 2] = np.roll(pred[:, : size // 2], 1, axis=0)
    for _ in range(20):
        cz, cy, cx = rng.integers(8, size - 8, 3)
        pred[cz - 3 : cz + 3, cy - 3 : cy + 3, cx - 3 : cx + 3] = 0
    pred[:, size // 3, :] = 0
    dust = rng.random(pred.shape) < 2e-5
    pred[dust] = 1
    return pred, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    pred, label = synthetic_pair(args.size)
    timings = {}
    start = time.perf_counter()
    topo = topo_score(pred, label)
    timings["topo"] = time.perf_counter() - start
    start = time.perf_counter()
    sd = surface_dice(pred, label)
    timings["surface_dice"] = time.perf_counter() - start
    start = time.perf_counter()
    _, voi_score = voi(pred, label)
    timings["voi"] = time.perf_counter() - start
    start = time.perf_counter()
    result = score_volume(pred, label)
    timings["score_volume (total)"] = time.perf_counter() - start
    print(f"volume {args.size}^3: topo={topo:.4f} surface_dice={sd:.4f} voi_score={voi_score:.4f}")
    print(f"score={result['score']:.4f}")
    for name, seconds in timings.items():
        print(f"{name:<22} {seconds:8.2f} s")


if __name__ == "__main__":
    main()
