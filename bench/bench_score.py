"""Time the exact competition score on a synthetic 320^3 volume next to Betti-Matching-3D run as the official does.

The label holds a few curved sheets (two voxels thick) with a 3-voxel ignored border; ``--label_holes N`` punches
N holes into the label sheets (real labels have some), so that both masks have loops. The prediction is the label
shifted by one voxel in places, with holes punched, a sheet cut and dust added. Printed, from one run:

- the time to load (or, the first time, compile) the numba kernels of :mod:`pipeline.evaluation.betti`, paid once per process;
- the exact score (TopoScore exact, the default) and each component, with how many octants needed the kernels and
  in how many threads (``--threads``; default: one per core as memory allows);
- the compiled Betti-Matching-3D (``topolosses`` wheel) called on each octant in turn in this process, as the
  official metric does, whether its counts are equal, and the ratio of the two times;
- the fast estimate's TopoScore and its difference from the exact one.

Run from the repo root (needs ``pip install --no-deps topolosses==0.2.0`` for the Betti-Matching-3D column)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_score.py [--size 320] [--label_holes 0] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python bench/<name>.py
from pipeline.evaluation import score
from pipeline.evaluation.betti import load_reference, matching_counts, reference_counts


def synthetic_pair(size: int, seed: int = 0, label_holes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, label) with curved sheets; label values 0/1/2, prediction uint8 0/1."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:size, :size, :size]
    label = np.zeros((size, size, size), np.uint8)
    for k, offset in enumerate(np.linspace(0.2, 0.8, 4) * size):
        surface = offset + 0.06 * size * np.sin(2 * np.pi * (y / size + k / 4)) * np.cos(np.pi * x / size)
        label[np.abs(z - surface) < 1.0] = 1
    sheet_voxels = np.argwhere(label == 1)
    for i in rng.choice(len(sheet_voxels), label_holes, replace=False):
        cz, cy, cx = sheet_voxels[i]
        label[max(cz - 2, 0) : cz + 2, max(cy - 2, 0) : cy + 2, max(cx - 2, 0) : cx + 2] = 0
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


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--label_holes", type=int, default=0, help="holes punched into the label sheets")
    parser.add_argument("--threads", type=int, default=None, help="threads counting the octants of the exact "
                        "score (default: one per core as memory allows)")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ[score.SCORE_THREADS_ENV] = str(args.threads)
    cube = np.zeros((4, 4, 4), bool)
    _, t_load = _timed(matching_counts, cube, cube)
    print(f"numba kernels loaded (compiled the first time) in {t_load:.2f} s", flush=True)
    pred, label = synthetic_pair(args.size, label_holes=args.label_holes)
    p, g = score._foreground(pred, label, 2)
    octants = list(score._octants(p.shape))
    n_kernel = sum(not score._block_counts(p[sl], g[sl])[1].all() for sl in octants)
    threads = score._octant_threads(len(octants), max(p[sl].size for sl in octants))

    # the exact score's parts, timed one by one (score_volume is their sum plus a few additions)
    counts, t_topo = _timed(score.topo_counts, pred, label)
    sd, t_sd = _timed(score.surface_dice, pred, label)
    (_, voi_score), t_voi = _timed(score.voi, pred, label)
    t_exact = t_topo + t_sd + t_voi
    topo = score.topo_score_from_counts(counts)
    fast, t_fast = _timed(score.topo_score, pred, label, topo_mode="fast")
    result = score.combine_score(topo, sd, voi_score)
    print(f"volume {args.size}^3, {args.label_holes} label holes: score={result:.4f} topo={topo:.4f}", flush=True)
    print(f"counts per dimension (m, p, g): {counts}")
    print(f"octants needing the kernels: {n_kernel} of {len(octants)}; threads: {threads} "
          f"({len(os.sched_getaffinity(0))} cores)")
    for name, seconds in [
        ("exact score (total)", t_exact),
        ("  topo_counts, exact", t_topo),
        ("  surface_dice", t_sd),
        ("  voi", t_voi),
        ("topo_score, fast estimate", t_fast),
    ]:
        print(f"{name:<32} {seconds:8.2f} s")
    print(f"fast estimate: topo={fast:.4f} ({fast - topo:+.4f} against exact)", flush=True)

    if load_reference() is None:
        print("compiled Betti-Matching-3D not installed: pip install --no-deps topolosses==0.2.0")
        return
    start = time.perf_counter()
    total = np.zeros((3, 3), np.int64)
    for sl in octants:  # one octant after the other in one process, as the official metric does
        total += reference_counts([p[sl]], [g[sl]])[0]
    t_ref = time.perf_counter() - start
    same = {k: tuple(int(v) for v in total[k]) for k in range(3)} == counts
    print(f"{'Betti-Matching-3D per octant':<32} {t_ref:8.2f} s  (counts equal: {same})")
    print(f"exact score / Betti-Matching-3D octant by octant: {t_exact / t_ref:.3f}")


if __name__ == "__main__":
    main()
