"""The Vesuvius Challenge surface-detection score, re-implemented for speed, with a MONAI metric (its command line:
``python -m pipeline score``, :mod:`pipeline.cli.score`).

Per volume, voxels whose label is ``ignore_label`` (2) are set to background in both prediction and label, then
foreground is "non-zero" and::

    score = clip(0.30 * TopoScore + 0.35 * SurfaceDice@2 + 0.35 * VOI_score, 0, 1)

averaged over volumes. The definitions follow the competition's ``topometrics`` package:

- **SurfaceDice@tau**: DeepMind ``surface-distance``: surfels are the 2x2x2 neighbour codes that are neither empty
  nor full, weighted by the package's own code-to-area table; a surfel of one mask counts when the nearest surfel
  of the other lies within ``tolerance``. Both masks empty -> 1, exactly one empty -> 0. The distance test is a
  dilation of the other surface by the ball of radius ``tolerance`` (shifted ORs), exact and ~30x faster than the
  Euclidean distance transform the package runs on a 320^3 volume.
- **VOI_score**: 26-connected components of both masks, restricted to voxels foreground in either;
  ``VOI = H(G|P) + H(P|G)`` in bits, ``VOI_score = 1 / (1 + 0.3 * VOI)``; both empty -> 1.
- **TopoScore**: Betti matching (Stucki et al.) of the two binary images per homology dimension k in {0, 1, 2},
  computed on each octant of the volume (each axis split in half, the first half taking the odd voxel) and the
  counts summed. For each k, ``m`` matched features, ``p = m + unmatched predicted``, ``g = m + unmatched label``:
  ``F1_k = 2m / (p + g)`` if ``g > 0``, ``0.5 / (p + 0.5)`` if ``g == 0 < p``, inactive if ``p + g == 0``;
  TopoScore is the (0.34, 0.33, 0.33)-weighted mean of the active ``F1_k``, 1 when none is active.

How the Betti matching is counted
---------------------------------
The official metric runs Betti-Matching-3D on ``1 - mask`` of each octant: the V-construction cubical complex
(voxels are vertices: foreground 6-connected, background 26-connected) with the comparison image
``U = P OR G`` (the pointwise minimum of the two filtrations). On binary masks every finite bar is ``[0, 1)``, so
*which* bars match is decided by the program's processing order, (value, raster index); :mod:`pipeline.evaluation.betti`
reproduces it. ``topo_mode="exact"`` (the default of :func:`score_volume`, the CLI, ``tune`` and evaluation) gives
the program's counts; per octant:

- **p, g** always by closed forms: ``p0 = #components(P) - 1`` (0 if empty), ``p2 = #cavities(P)`` (26-connected
  background components not touching the octant's border), ``p1 = b1(P) = b0 + b2 - chi`` with ``chi`` the Euler
  characteristic of the foreground complex; likewise for G.
- **m0**: the program's union-find over U's edges merges groups of U-components; a merge is a match exactly when
  both groups hold P- and G-voxels. When no U-component holds only P while another holds only G, that is every
  merge of groups holding U-components with both, ``m0 = #U-components with P and G - 1`` (at least 0),
  whatever the order.
- **m1 = 0** when P, G or U has no loop; **m2 = 0** when P, G or U has no cavity.
- **m = p = g** in every dimension when P and G are equal in the octant (the program then runs the same
  union-finds and reductions on P, G and U).
- Every other count of an octant, dimension by dimension, comes from :func:`pipeline.evaluation.betti.matching_counts`: the
  program's union-finds and reductions, in its order, compiled with numba. The octants of a volume are counted in
  threads, one per core as memory allows (``SCORE_THREADS`` in the environment fixes the number).

Tested equal to the compiled Betti-Matching-3D (the ``topolosses`` 0.2.0 wheel), count by count, on 56 random
model-like volumes through :func:`topo_counts` and on 48 small ones, flat boxes included, through
:func:`pipeline.evaluation.betti.matching_counts` with every dimension counted (``tests/evaluation/test_score.py``). Time:
``bench/bench_score.py`` prints the exact score next to that program run octant by octant as the official code
does: on a 320^3 volume whose eight octants all need the exact dimension-1 count, 2 cores, see the bundle card.

``topo_mode="fast"`` (``val_topo_mode: fast`` in training) uses only the closed forms: where they do not apply it
estimates ``m0`` from the first P AND G component (raster order) in each P- and G-component, ``m1`` as
``min(b1(P), b1(G), b1(P AND G), b1(U))`` per U-component, ``m2`` as the cavities of P AND G holding a cavity of
P and one of G. Measured on the synthetic dataset's 12 labelled volumes, each with 6 perturbed-label predictions
(shifted, dilated, eroded, dusted and holed, smoothed noise): it differs from the exact TopoScore on 12 of the 72
masks, by up to 0.28 (0.084 in the score). Use it to follow training, not to choose settings or checkpoints.

Example::

    from pipeline.evaluation.score import score_volume
    result = score_volume(pred_mask, label_volume)  # {"score", "topo", "surface_dice", "voi", "voi_score"}
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from surface_distance import lookup_tables

from pipeline.inference.submission import MaskFiles
from pipeline.utils.distributed import one_local_rank_at_a_time
from pipeline.utils.errors import SettingsError

__all__ = [
    "COMPONENT_KEYS",
    "SCORE_THREADS_ENV",
    "SCORE_WEIGHTS",
    "TOPO_MODES",
    "TOPO_WEIGHTS",
    "VOI_ALPHA",
    "CompetitionScore",
    "CompetitionScoreHandler",
    "combine_score",
    "prediction_pairs",
    "score_volume",
    "score_volumes",
    "surface_dice",
    "topo_counts",
    "topo_score",
    "topo_score_from_counts",
    "voi",
]

SCORE_WEIGHTS = (0.30, 0.35, 0.35)
"""Weights of (TopoScore, SurfaceDice, VOI_score) in the volume score."""
TOPO_WEIGHTS = (0.34, 0.33, 0.33)
"""Weights of the Betti-matching F1 of homology dimensions 0, 1, 2."""
VOI_ALPHA = 0.3
"""``VOI_score = 1 / (1 + VOI_ALPHA * VOI)``."""
COMPONENT_KEYS = ("score", "topo", "surface_dice", "voi", "voi_score")
"""Keys of the dict returned by :func:`score_volume`, in this order in :class:`CompetitionScore`'s buffer."""

TOPO_MODES = ("exact", "fast")
"""``topo_mode`` values: ``exact`` counts as Betti-Matching-3D does; ``fast`` is the closed-form estimate."""
SCORE_THREADS_ENV = "SCORE_THREADS"
"""Environment variable that fixes the number of threads counting a volume's octants (1: one after the other)."""
THREAD_MIN_VOXELS = 64**3
"""Octants smaller than this are counted one after the other: a thread costs more than they take."""
THREAD_BYTES_PER_VOXEL = 200
"""Peak memory of counting one octant exactly, per octant voxel (measured: ~115 on a 160^3 octant of sheets,
~145 on noise)."""

TopoCounts = dict[int, tuple[int, int, int]]


def _foreground(pred: np.ndarray, gt: np.ndarray, ignore_label: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Binary (pred, gt) with the ignored label set to background in both."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        msg = f"pred and gt must be 3D arrays of one shape, got {pred.shape} and {gt.shape}"
        raise ValueError(msg)
    p = np.nan_to_num(pred) != 0 if pred.dtype.kind == "f" else pred != 0
    g = gt != 0
    if ignore_label is not None:
        keep = gt != ignore_label
        p &= keep
        g &= keep
    return p, g


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``mask`` grown by ``margin`` (clipped to the array), None if empty."""
    box = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if idx.size == 0:
            return None
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


# ---------------------------------------------------------------------------------------------------- SurfaceDice


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """DeepMind neighbour code of every 2x2x2 window of ``mask`` zero-padded by one voxel on each side."""
    padded = np.pad(mask, 1)
    n = tuple(s - 1 for s in padded.shape)
    kernel = lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL
    codes = np.zeros(n, np.uint8)
    for a, b, c in np.ndindex(2, 2, 2):
        codes |= padded[a : a + n[0], b : b + n[1], c : c + n[2]].view(np.uint8) << np.uint8(
            int(kernel[a, b, c]).bit_length() - 1
        )
    return codes


def _ball_offsets(tolerance: float, spacing: tuple[float, float, float]) -> list[tuple[int, int, int]]:
    radius = [int(math.floor(tolerance / s)) for s in spacing]
    ranges = [range(-r, r + 1) for r in radius]
    return [
        (i, j, k)
        for i in ranges[0]
        for j in ranges[1]
        for k in ranges[2]
        if (i * spacing[0]) ** 2 + (j * spacing[1]) ** 2 + (k * spacing[2]) ** 2 <= tolerance**2
    ]


def _within(surface: np.ndarray, offsets: list[tuple[int, int, int]]) -> np.ndarray:
    """Points whose Euclidean distance to a ``surface`` point is within the ball given by ``offsets``."""
    r = [max(abs(o[axis]) for o in offsets) for axis in range(3)]
    padded = np.pad(surface, [(ri, ri) for ri in r])
    n = surface.shape
    out = np.zeros(n, bool)
    for i, j, k in offsets:
        out |= padded[r[0] + i : r[0] + i + n[0], r[1] + j : r[1] + j + n[1], r[2] + k : r[2] + k + n[2]]
    return out


def surface_dice(
    pred: np.ndarray,
    gt: np.ndarray,
    tolerance: float = 2.0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ignore_label: int | None = 2,
) -> float:
    """Surface Dice at ``tolerance`` with DeepMind ``surface-distance`` surfels and areas.

    Equals ``compute_surface_dice_at_tolerance(compute_surface_distances(gt, pred, spacing), tolerance)``
    of the ``surface-distance`` package. The cost of the distance test grows with the number of grid offsets
    inside the tolerance ball (33 at the competition's tolerance 2).

    Args:
        pred: 3D prediction, non-zero = surface.
        gt: 3D label of the same shape (0 background, 1 surface, ``ignore_label`` ignored).
        tolerance: distance (in ``spacing`` units) within which a surfel counts as matched.
        spacing: voxel size along (Z, Y, X).
        ignore_label: label value set to background in both inputs; None to ignore nothing.

    Returns:
        The surface Dice in [0, 1]; 1 when both masks are empty, 0 when exactly one is.

    Raises:
        ValueError: when the arrays are not 3D of one shape.
    """
    p, g = _foreground(pred, gt, ignore_label)
    return _surface_dice(p, g, tolerance, tuple(float(s) for s in spacing))


def _surface_dice(p: np.ndarray, g: np.ndarray, tolerance: float, spacing: tuple[float, float, float]) -> float:
    has_p, has_g = bool(p.any()), bool(g.any())
    if not (has_p or has_g):
        return 1.0
    if has_p != has_g:
        return 0.0
    box = _bbox(p | g)
    codes_p, codes_g = _neighbour_codes(p[box]), _neighbour_codes(g[box])
    surf_p = (codes_p != 0) & (codes_p != 255)
    surf_g = (codes_g != 0) & (codes_g != 255)
    area = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    area_p, area_g = area[codes_p[surf_p]], area[codes_g[surf_g]]
    offsets = _ball_offsets(tolerance, spacing)
    overlap_p = area_p[_within(surf_g, offsets)[surf_p]].sum()
    overlap_g = area_g[_within(surf_p, offsets)[surf_g]].sum()
    return float((overlap_p + overlap_g) / (area_p.sum() + area_g.sum()))


# ------------------------------------------------------------------------------------------------------------ VOI


def _entropy_bits(counts: np.ndarray) -> float:
    prob = counts[counts > 0] / counts.sum()
    return float(-(prob * np.log2(prob)).sum())


def voi(
    pred: np.ndarray, gt: np.ndarray, ignore_label: int | None = 2, alpha: float = VOI_ALPHA
) -> tuple[float, float]:
    """Variation of information between the 26-connected components of prediction and label.

    Args:
        pred: 3D prediction, non-zero = surface.
        gt: 3D label of the same shape (0 background, 1 surface, ``ignore_label`` ignored).
        ignore_label: label value set to background in both inputs; None to ignore nothing.
        alpha: strength of the mapping ``VOI_score = 1 / (1 + alpha * VOI)``.

    Returns:
        ``(voi_bits, voi_score)`` with ``voi_bits = H(G|P) + H(P|G)`` over the voxels foreground in either mask;
        ``(0.0, 1.0)`` when both are empty.

    Raises:
        ValueError: when the arrays are not 3D of one shape.
    """
    p, g = _foreground(pred, gt, ignore_label)
    return _voi(p, g, alpha)


def _voi(p: np.ndarray, g: np.ndarray, alpha: float) -> tuple[float, float]:
    box = _bbox(p | g)
    if box is None:
        return 0.0, 1.0
    p, g = p[box], g[box]
    lab_p, n_p = _label26(p)
    lab_g, _ = _label26(g)
    union = p | g
    joint = lab_g[union].astype(np.int64) * (n_p + 1) + lab_p[union]
    _, counts_joint = np.unique(joint, return_counts=True)
    h_joint = _entropy_bits(counts_joint)
    h_g = _entropy_bits(np.bincount(lab_g[union]))
    h_p = _entropy_bits(np.bincount(lab_p[union]))
    voi_bits = max(2.0 * h_joint - h_g - h_p, 0.0)
    return voi_bits, 1.0 / (1.0 + alpha * voi_bits)


# ------------------------------------------------------------------------------------------------------ TopoScore


def _halves(n: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` in two, the first part taking the odd element, as the competition's tiling does."""
    if n < 2:
        return [(0, n)]
    mid = (n + 1) // 2
    return [(0, mid), (mid, n)]


def _octants(shape: tuple[int, ...]) -> Iterator[tuple[slice, slice, slice]]:
    for z0, z1 in _halves(shape[0]):
        for y0, y1 in _halves(shape[1]):
            for x0, x1 in _halves(shape[2]):
                yield slice(z0, z1), slice(y0, y1), slice(x0, x1)


def _label6(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = cc3d.connected_components(mask, connectivity=6, return_N=True, out_dtype=np.uint32)
    return labels, int(n)


def _label26(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components; masks thinner than 3 along an axis are padded with background first (cc3d 4.1.1
    fails on some of them, e.g. any (1, 1, n) with n = 3, 7, 10, ...: a one-voxel line of prediction)."""
    if min(mask.shape) >= 3:
        labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True, out_dtype=np.uint32)
        return labels, int(n)
    labels, n = cc3d.connected_components(np.pad(mask, 1), connectivity=26, return_N=True, out_dtype=np.uint32)
    return labels[1:-1, 1:-1, 1:-1], int(n)


def _cavities(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels 1..n of the 26-connected background components that do not touch the array border."""
    labels, n = _label26(~mask)
    keep = np.ones(n + 1, bool)
    keep[0] = False
    for axis in range(3):
        for end in (0, -1):
            keep[np.take(labels, end, axis=axis)] = False
    new_id = np.cumsum(keep, dtype=np.uint32) * keep
    return new_id[labels], int(keep.sum())


def _per_block(labels: np.ndarray, n: int, block: np.ndarray, n_blocks: int) -> np.ndarray:
    """Number of components (labels 1..n) per block, each component lying inside one block."""
    owner = np.zeros(n + 1, np.int64)
    fg = labels > 0
    owner[labels[fg]] = block[fg]
    return np.bincount(owner[1:], minlength=n_blocks + 1)


def _euler_per_block(mask: np.ndarray, block: np.ndarray, n_blocks: int) -> np.ndarray:
    """Euler characteristic of the foreground cubical complex, split by the block of each cell's first vertex."""
    chi = np.zeros(n_blocks + 1, np.int64)
    cells: dict[tuple[int, ...], np.ndarray] = {(): mask}
    for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
        if axes:
            parent, axis = cells[axes[:-1]], axes[-1]
            lo = tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))
            hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
            cells[axes] = parent[lo] & parent[hi]
        present = cells[axes]
        corner = block[tuple(slice(0, s) for s in present.shape)]
        chi += (-1) ** len(axes) * np.bincount(corner[present], minlength=n_blocks + 1)
    return chi


def _cavities_per_block(cav: np.ndarray, mask: np.ndarray, block: np.ndarray, n_blocks: int) -> np.ndarray:
    """Cavities per block, each attributed to the block of the foreground voxel above its first voxel."""
    below_fg = np.zeros_like(mask)
    below_fg[1:] = mask[:-1]
    # The first voxel of a cavity (raster order) lies in its top slice, so the voxel above it is foreground.
    candidates = np.flatnonzero((cav > 0) & below_fg)
    _, first = np.unique(cav.ravel()[candidates], return_index=True)
    owner = block.ravel()[candidates[first] - mask.shape[1] * mask.shape[2]]
    return np.bincount(owner, minlength=n_blocks + 1)


def _block_counts(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, 3) array of (m, p, g) per homology dimension for one octant, and which rows' ``m`` are exact.

    ``p`` and ``g`` are exact. ``m`` is exact where the module docstring proves it; elsewhere it is the estimate
    of ``topo_mode="fast"`` and its flag is False.
    """
    counts = np.zeros((3, 3), np.int64)
    box = _bbox(p | g, margin=1)
    if box is None:
        return counts, np.ones(3, bool)
    # Components and cavities are unchanged by cropping to the foreground box grown by one background voxel.
    p, g = p[box], g[box]
    c, u = p & g, p | g
    block, n_blocks = _label6(u)
    lab = {"p": _label6(p), "g": _label6(g), "c": _label6(c)}
    masks = {"p": p, "g": g, "c": c, "u": u}
    cav = {key: _cavities(mask) for key, mask in masks.items()}
    identical = bool((p == g).all())

    n_p, n_g, n_c = lab["p"][1], lab["g"][1], lab["c"][1]
    counts[0, 1], counts[0, 2] = max(n_p - 1, 0), max(n_g - 1, 0)
    # U-components holding P voxels, G voxels: the dimension-0 matches are the merges of two groups of them that
    # both hold P and G, exactly n_PG - 1 unless some U-components hold only P and others only G.
    with_p = np.bincount(block[p], minlength=n_blocks + 1)[1:] > 0
    with_g = np.bincount(block[g], minlength=n_blocks + 1)[1:] > 0
    exact0 = not ((with_p & ~with_g).any() and (with_g & ~with_p).any())
    if exact0:
        counts[0, 0] = max(int((with_p & with_g).sum()) - 1, 0)
    elif n_c:
        # estimate: C-components first (in raster order) in both their P- and their G-component
        in_p = np.zeros(n_c + 1, np.int64)
        in_g = np.zeros(n_c + 1, np.int64)
        in_p[lab["c"][0][c]] = lab["p"][0][c]
        in_g[lab["c"][0][c]] = lab["g"][0][c]
        first_in_p = np.full(n_p + 1, np.iinfo(np.int64).max)
        first_in_g = np.full(n_g + 1, np.iinfo(np.int64).max)
        ids = np.arange(1, n_c + 1)
        np.minimum.at(first_in_p, in_p[1:], ids)
        np.minimum.at(first_in_g, in_g[1:], ids)
        both_first = (first_in_p[in_p[1:]] == ids) & (first_in_g[in_g[1:]] == ids)
        counts[0, 0] = min(max(int(both_first.sum()) - 1, 0), counts[0, 1], counts[0, 2])

    counts[2, 1], counts[2, 2] = cav["p"][1], cav["g"][1]
    exact2 = min(cav["p"][1], cav["g"][1], cav["u"][1]) == 0
    if not exact2:
        # estimate: cavities of P AND G holding a cavity of P and one of G
        cav_c, n_cav_c = cav["c"]
        has_p = np.bincount(cav_c[cav["p"][0] > 0], minlength=n_cav_c + 1) > 0
        has_g = np.bincount(cav_c[cav["g"][0] > 0], minlength=n_cav_c + 1) > 0
        counts[2, 0] = min(int((has_p & has_g)[1:].sum()), counts[2, 1], counts[2, 2])

    b1 = {}
    for key, mask in masks.items():
        b0 = _per_block(block, n_blocks, block, n_blocks) if key == "u" else _per_block(*lab[key], block, n_blocks)
        b2 = _cavities_per_block(cav[key][0], mask, block, n_blocks)
        b1[key] = b0 + b2 - _euler_per_block(mask, block, n_blocks)
    counts[1, 1], counts[1, 2] = int(b1["p"].sum()), int(b1["g"].sum())
    exact1 = min(counts[1, 1], counts[1, 2], int(b1["u"].sum())) == 0
    if not exact1:
        # estimate: loops per block of U present in P, G, P AND G and U
        shared = np.minimum.reduce([b1["p"], b1["g"], b1["c"], b1["u"]]).clip(min=0)
        counts[1, 0] = min(int(shared.sum()), counts[1, 1], counts[1, 2])
    if identical:  # the program runs the same union-finds and reductions on P, G and U: every feature matches
        counts[:, 0] = counts[:, 1]
        return counts, np.ones(3, bool)
    return counts, np.array([exact0, exact1, exact2])


def _octant_counts(p: np.ndarray, g: np.ndarray, mode: str) -> np.ndarray:
    """(m, p, g) per dimension of one octant: closed forms, and in exact mode the program's counts for the rest."""
    counts, exact = _block_counts(p, g)
    if mode == "exact" and not exact.all():
        from pipeline.evaluation.betti import (
            matching_counts,  # numba: imported when first needed
        )

        dims = [k for k in range(3) if not exact[k]]
        counts[dims, 0] = matching_counts(p, g, tuple(dims))[dims, 0]
    return counts


def _octant_threads(n_octants: int, voxels: int) -> int:
    """Threads counting ``n_octants`` octants of up to ``voxels`` voxels at once (the kernels release the GIL).

    ``SCORE_THREADS`` in the environment decides when set. Otherwise one per core this process may use (shared with
    the machine's other ranks under torchrun), no more than memory holds (:data:`THREAD_BYTES_PER_VOXEL`), and one
    for octants under :data:`THREAD_MIN_VOXELS` or inside a worker process (``tune --workers`` scores in processes
    of its own, one per core).
    """
    fixed = os.environ.get(SCORE_THREADS_ENV)
    if fixed is not None:
        if not fixed.strip().isdigit():
            msg = f"{SCORE_THREADS_ENV}={fixed!r} in the environment: give a number of threads (1: none in parallel)"
            raise SettingsError(msg)
        return max(1, int(fixed))
    if n_octants < 2 or voxels < THREAD_MIN_VOXELS or multiprocessing.parent_process() is not None:
        return 1
    from pipeline.utils.memory import available_memory

    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) // ranks
    by_memory = int(0.8 * available_memory()) // ranks // (THREAD_BYTES_PER_VOXEL * voxels)
    return max(1, min(n_octants, cores, by_memory))


def _topo_counts(p: np.ndarray, g: np.ndarray, mode: str = "exact") -> TopoCounts:
    if mode not in TOPO_MODES:
        msg = f"topo_mode must be one of {TOPO_MODES}, got {mode!r}"
        raise ValueError(msg)
    octants = list(_octants(p.shape))
    threads = _octant_threads(len(octants), max(p[sl].size for sl in octants))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            per_octant = list(pool.map(lambda sl: _octant_counts(p[sl], g[sl], mode), octants))
    else:
        per_octant = [_octant_counts(p[sl], g[sl], mode) for sl in octants]
    total = np.sum(per_octant, axis=0)
    return {k: (int(total[k, 0]), int(total[k, 1]), int(total[k, 2])) for k in range(3)}


def topo_counts(
    pred: np.ndarray, gt: np.ndarray, ignore_label: int | None = 2, topo_mode: str = "exact"
) -> TopoCounts:
    """Betti-matching counts per homology dimension, summed over the octants of the volume.

    See the module docstring for how each count is computed and where it is exact.

    Args:
        pred: 3D prediction, non-zero = surface.
        gt: 3D label of the same shape (0 background, 1 surface, ``ignore_label`` ignored).
        ignore_label: label value set to background in both inputs; None to ignore nothing.
        topo_mode: ``"exact"`` (Betti-Matching-3D's counts) or ``"fast"`` (closed-form estimate of ``m``).

    Returns:
        ``{k: (m, p, g)}`` for k in 0, 1, 2: matched features, predicted features, label features.

    Raises:
        ValueError: when the arrays are not 3D of one shape or ``topo_mode`` is unknown.
    """
    p, g = _foreground(pred, gt, ignore_label)
    return _topo_counts(p, g, topo_mode)


def topo_score_from_counts(counts: TopoCounts, weights: tuple[float, float, float] = TOPO_WEIGHTS) -> float:
    """Weighted mean of the per-dimension Betti-matching F1 over the active dimensions (1 if none is active).

    Args:
        counts: ``{k: (m, p, g)}`` as returned by :func:`topo_counts`.
        weights: weight of each dimension k.

    Returns:
        The TopoScore in [0, 1].
    """
    total, weight_sum = 0.0, 0.0
    for k, (m, p, g) in counts.items():
        if p + g == 0:
            continue
        f1 = 2.0 * m / (p + g) if g > 0 else 0.5 / (p + 0.5)
        total += weights[k] * f1
        weight_sum += weights[k]
    return total / weight_sum if weight_sum > 0 else 1.0


def topo_score(pred: np.ndarray, gt: np.ndarray, ignore_label: int | None = 2, topo_mode: str = "exact") -> float:
    """TopoScore: weighted Betti-matching F1 over homology dimensions 0, 1, 2, counted per octant.

    Args:
        pred: 3D prediction, non-zero = surface.
        gt: 3D label of the same shape (0 background, 1 surface, ``ignore_label`` ignored).
        ignore_label: label value set to background in both inputs; None to ignore nothing.
        topo_mode: ``"exact"`` or ``"fast"``, see :func:`topo_counts`.

    Returns:
        The TopoScore in [0, 1].

    Raises:
        ValueError: when the arrays are not 3D of one shape.
    """
    return topo_score_from_counts(topo_counts(pred, gt, ignore_label, topo_mode))


# -------------------------------------------------------------------------------------------------- Combination


def combine_score(topo: float, surface_dice: float, voi_score: float) -> float:
    """``0.30 * topo + 0.35 * surface_dice + 0.35 * voi_score`` clipped to [0, 1]."""
    w_topo, w_sd, w_voi = SCORE_WEIGHTS
    # fsum: three perfect components give exactly 1.0, not 0.9999999999999999.
    return min(max(math.fsum((w_topo * topo, w_sd * surface_dice, w_voi * voi_score)), 0.0), 1.0)


def score_volume(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore_label: int | None = 2,
    tolerance: float = 2.0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    topo_mode: str = "exact",
) -> dict[str, float]:
    """Competition score of one volume and its components.

    Args:
        pred: 3D prediction, non-zero = surface.
        gt: 3D label of the same shape (0 background, 1 surface, ``ignore_label`` ignored).
        ignore_label: label value set to background in both inputs; None to ignore nothing.
        tolerance: SurfaceDice tolerance.
        spacing: voxel size along (Z, Y, X).
        topo_mode: ``"exact"`` (the official TopoScore) or ``"fast"`` (estimate), see :func:`topo_counts`.

    Returns:
        ``{"score", "topo", "surface_dice", "voi", "voi_score"}`` (``voi`` in bits, lower is better).

    Raises:
        ValueError: when the arrays are not 3D of one shape.
    """
    p, g = _foreground(pred, gt, ignore_label)
    topo = topo_score_from_counts(_topo_counts(p, g, topo_mode))
    sd = _surface_dice(p, g, tolerance, tuple(float(s) for s in spacing))
    voi_bits, voi_sc = _voi(p, g, VOI_ALPHA)
    return {
        "score": combine_score(topo, sd, voi_sc),
        "topo": topo,
        "surface_dice": sd,
        "voi": voi_bits,
        "voi_score": voi_sc,
    }


def score_volumes(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], **kwargs: Any) -> dict[str, dict]:
    """Score several volumes and average each component over them.

    Args:
        pairs: ``(volume_id, pred, gt)`` triples; a generator keeps one volume pair in memory at a time.
        kwargs: passed to :func:`score_volume`.

    Returns:
        ``{"volumes": {id: score_volume(...)}, "mean": {key: mean over volumes}}``.

    Raises:
        ValueError: when ``pairs`` is empty or an id repeats.
    """
    volumes: dict[str, dict[str, float]] = {}
    for volume_id, pred, gt in pairs:
        if volume_id in volumes:
            msg = f"volume id {volume_id!r} given twice"
            raise ValueError(msg)
        volumes[volume_id] = score_volume(pred, gt, **kwargs)
    if not volumes:
        msg = "no volumes to score"
        raise ValueError(msg)
    mean = {key: float(np.mean([v[key] for v in volumes.values()])) for key in COMPONENT_KEYS}
    return {"volumes": volumes, "mean": mean}


# ------------------------------------------------------------------------------------------------- MONAI metric


class CompetitionScore(CumulativeIterationMetric):
    """Competition score as a MONAI cumulative metric (one :func:`score_volume` per sample).

    The buffer holds one row per sample with the values of :data:`COMPONENT_KEYS`; ``aggregate()`` returns the
    mean score and ``aggregate_components()`` the mean of every component. Under DDP the buffer is gathered from
    all ranks, so every rank must call ``aggregate``.

    Args:
        threshold: ``y_pred > threshold`` is surface (binary masks and probabilities alike).
        ignore_label: label value ignored in ``y``.
        topo_mode: ``"exact"`` (the official TopoScore) or ``"fast"`` (the closed-form estimate).

    Example::

        metric = CompetitionScore()
        metric(y_pred=probs, y=labels)  # (B, 1, Z, Y, X) each, labels in {0, 1, 2}
        mean_score = metric.aggregate().item()
    """

    def __init__(self, threshold: float = 0.5, ignore_label: int | None = 2, topo_mode: str = "exact") -> None:
        super().__init__()
        if topo_mode not in TOPO_MODES:
            msg = f"topo_mode must be one of {TOPO_MODES}, got {topo_mode!r} (in training: val_topo_mode)"
            raise SettingsError(msg)
        self.threshold = threshold
        self.ignore_label = ignore_label
        self.topo_mode = topo_mode

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None or y_pred.ndim != 5 or y_pred.shape[1] != 1 or y.shape != y_pred.shape:
            got = None if y is None else tuple(y.shape)
            msg = f"expected y_pred and y of shape (B, 1, Z, Y, X), got {tuple(y_pred.shape)} and {got}"
            raise ValueError(msg)
        pred = (y_pred > self.threshold).cpu().numpy()
        label = torch.as_tensor(y).cpu().numpy()
        rows = []
        for b in range(pred.shape[0]):
            with one_local_rank_at_a_time("score"):  # DDP: the ranks' memory peaks staggered, not stacked
                result = score_volume(pred[b, 0], label[b, 0], ignore_label=self.ignore_label, topo_mode=self.topo_mode)
            rows.append([result[key] for key in COMPONENT_KEYS])
        return torch.tensor(rows, dtype=torch.float64, device=y_pred.device)

    def aggregate(self) -> torch.Tensor:
        """Mean score over all buffered samples."""
        return self._buffer()[:, 0].mean()

    def aggregate_components(self) -> dict[str, float]:
        """Mean of each of :data:`COMPONENT_KEYS` over all buffered samples."""
        means = self._buffer().mean(dim=0)
        return {key: float(means[i]) for i, key in enumerate(COMPONENT_KEYS)}

    def _buffer(self) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            msg = "CompetitionScore has no samples: call it on (y_pred, y) before aggregate()"
            raise RuntimeError(msg)
        return data


class CompetitionScoreHandler(IgniteMetricHandler):
    """Ignite handler computing :class:`CompetitionScore`, usable as a MONAI evaluator's key metric.

    Args:
        threshold: ``y_pred > threshold`` is surface.
        ignore_label: label value ignored in ``y``.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``, e.g.
            ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: save the per-sample rows (columns :data:`COMPONENT_KEYS`) in
            ``engine.state.metric_details[name]``.
        component_prefix: when set, also put each component mean into ``engine.state.metrics`` as
            ``f"{component_prefix}{key}"`` (e.g. ``"val_"`` gives ``val_topo``, ``val_surface_dice``, ``val_voi``,
            ``val_voi_score``).
        topo_mode: ``"exact"`` (the official TopoScore) or ``"fast"`` (the estimate; training's
            ``val_topo_mode``).

    Example::

        key_metric = {"val_score": CompetitionScoreHandler(output_transform=from_engine(["pred", "label"]),
                                                           component_prefix="val_")}
    """

    def __init__(
        self,
        threshold: float = 0.5,
        ignore_label: int | None = 2,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        component_prefix: str | None = None,
        topo_mode: str = "exact",
    ) -> None:
        self.component_prefix = component_prefix
        super().__init__(
            metric_fn=CompetitionScore(threshold=threshold, ignore_label=ignore_label, topo_mode=topo_mode),
            output_transform=output_transform,
            save_details=save_details,
        )

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        if self.component_prefix is not None:
            for key, value in self.metric_fn.aggregate_components().items():
                if key != "score":
                    engine.state.metrics[f"{self.component_prefix}{key}"] = value


# ---------------------------------------------------------------------------------------------- files on disk


def prediction_pairs(pred: Path, labels: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(volume id, predicted mask, label)`` for every prediction in ``pred`` (a submission zip or a folder of
    ``<id>.tif``, read by :class:`pipeline.inference.submission.MaskFiles`), its label from the folder ``labels``.

    Raises:
        ValueError: no predictions, a prediction without a label, two files for one id, an unreadable file or
            shapes that differ; the message names the file.
    """
    if not labels.is_dir():
        msg = f"{labels}: labels must be a folder of <id>.tif files"
        raise ValueError(msg)
    with MaskFiles(labels, recursive=False) as label_masks, MaskFiles(pred) as pred_masks:
        label_files, pred_files = label_masks.by_id(), pred_masks.by_id()
        # the predicted ids are scored: a labels folder may hold more (all of train_labels for one validation fold)
        if not pred_files:
            msg = f"{pred}: no <id>.tif predictions found"
            raise ValueError(msg)
        for volume_id in sorted(pred_files):
            if volume_id not in label_files:
                msg = f"{labels}: no label for volume id {volume_id!r} (prediction {pred_files[volume_id]})"
                raise ValueError(msg)
        for volume_id in sorted(pred_files):
            pred_array = pred_masks.read(pred_files[volume_id])
            label_array = label_masks.read(label_files[volume_id])
            if pred_array.shape != label_array.shape:
                msg = (
                    f"{pred_masks.where(pred_files[volume_id])}: shape {pred_array.shape} differs from label shape "
                    f"{label_array.shape}"
                )
                raise ValueError(msg)
            yield volume_id, pred_array, label_array
