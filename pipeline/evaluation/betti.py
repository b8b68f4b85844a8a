"""Betti matching of two binary 3D masks with Betti-Matching-3D's exact counts, compiled with numba.

The competition's TopoScore runs Betti-Matching-3D (``compute_matching``) on ``1 - mask`` of each octant. On binary
masks every finite bar is ``[0, 1)``, so *which* bars are matched is decided only by the program's processing order:
cells sorted by (value, raster index), the value of a cell being the largest of its voxels' (0 foreground,
1 background), the raster index the lexicographic ``(x, y, z, type)`` of the cell. :func:`matching_counts`
computes the program's matched and unmatched counts by the same union-finds and reductions, in that order, on flat
arrays (``src_3D/dimension_0.cpp``, ``dimension_1.cpp``, ``dimension_2.cpp``):

- the comparison image is the pointwise minimum of the two filtrations, the union ``U = P OR G``;
- **dimension 2**: union-finds over cubes (the outside is one node of value infinity), squares in decreasing
  (value, index) order, the elder root being the larger (birth, index); each image's pairs are keyed by the younger
  root of a second union-find that follows the comparison values; a comparison pair whose younger root keys a
  P-pair and a G-pair is a match (the first P- and G-pair under that key);
- **dimension 1**: column reduction of the squares (pivot: the largest edge by (value, index)). The squares paired
  in U's dimension-2 union-find reduce to zero in every reduction of U's columns (being zero after reduction means
  lying in the span of the earlier columns, whatever the row order), so they are skipped, as the program's
  clearing does; pivots do not depend on how a reduction is carried out, so the program's emergent-pair and cache
  shortcuts change nothing either. A P-loop's birth edge is a pivot of a ``[0, 1)`` pair of P's reduction: the
  value-0 squares come first and their edges are all value 0, so these are exactly the positive edges of P's
  foreground complex (index order) that its own squares do not kill (the whole box has no loop, so every one of
  them dies at value 1). A U-pair ``(e, s)`` matches when the pivot of ``s`` in the reduction of U's columns with
  rows in P's (value, index) order is a P-loop's birth edge, and likewise in G's order; that pivot is then a
  value-0 edge of P inside U, so ``s``'s own pivot in U is value 0: a finite U-bar whenever ``s`` is value 1;
- **dimension 0**: union-finds over voxels, edges in increasing (value, index) order, the elder root being the
  smaller (birth, index); U's merges drive two more union-finds over P's and G's values, and a finite U-pair
  matches when both younger roots are the younger roots of P- and G-pairs.

Tested equal to the compiled Betti-Matching-3D, count by count, on random model-like volumes
(``tests/evaluation/test_score.py``); that program ships in the ``topolosses`` 0.2.0 wheel (:func:`reference_counts`, a
test and benchmark reference only: ``pip install --no-deps topolosses==0.2.0``). The kernels are compiled by numba
on first use (~20 s, then loaded from its cache in well under a second) and run without the GIL, so
:mod:`pipeline.evaluation.score` counts octants in threads. Measured on a 160^3 octant of ``bench/bench_score.py``'s volume
with loops in both masks: dimension 1 in 0.8 s, against 10 s for the compiled program (all dimensions).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numba as nb
import numpy as np

__all__ = ["load_reference", "matching_counts", "reference_counts"]

_JIT = {"nogil": True, "cache": True}
_INVALID = np.uint8(255)
"""Value of a cell slot that lies outside the box (an edge or square leaving it)."""


# ------------------------------------------------------------------------------------------------ cell values


def _cell_values(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat values (0 foreground, 1 background) of voxels, edges, squares (slot ``3 * voxel + type``) and cubes."""
    bg = (~fg).astype(np.uint8)
    n0, n1, n2 = bg.shape
    edges = np.full((n0, n1, n2, 3), _INVALID, np.uint8)
    edges[:-1, :, :, 0] = np.maximum(bg[:-1], bg[1:])
    edges[:, :-1, :, 1] = np.maximum(bg[:, :-1], bg[:, 1:])
    edges[:, :, :-1, 2] = np.maximum(bg[:, :, :-1], bg[:, :, 1:])
    squares = np.full((n0, n1, n2, 3), _INVALID, np.uint8)
    squares[:, :-1, :-1, 0] = np.maximum(edges[:, :-1, :-1, 1], edges[:, :-1, 1:, 1])  # spans y and z
    squares[:-1, :, :-1, 1] = np.maximum(edges[:-1, :, :-1, 0], edges[:-1, :, 1:, 0])  # spans x and z
    squares[:-1, :-1, :, 2] = np.maximum(edges[:-1, :-1, :, 0], edges[:-1, 1:, :, 0])  # spans x and y
    cubes = np.maximum(squares[:-1, :-1, :-1, 2], squares[:-1, :-1, 1:, 2]).ravel()
    return bg.ravel(), edges.ravel(), squares.ravel(), cubes


# ---------------------------------------------------------------------------------------------- union-find


@nb.njit(**_JIT)
def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        nxt = parent[x]
        parent[x] = root
        x = nxt
    return root


@nb.njit(**_JIT)
def _link(parent: np.ndarray, birth: np.ndarray, x: int, y: int, dual: bool) -> int:
    """Join the roots ``x`` and ``y`` under the elder; return the younger (larger (birth, index); smaller if dual)."""
    bx, by = birth[x], birth[y]
    if dual:
        younger_is_x = bx < by or (bx == by and x < y)
    else:
        younger_is_x = bx > by or (bx == by and x > y)
    if younger_is_x:
        parent[x] = y
        return x
    parent[y] = x
    return y


# ------------------------------------------------------------------------------------------------- dimension 0


@nb.njit(**_JIT)
def _edge_ends(e: int, n12: int, n2: int) -> tuple[int, int]:
    v = e // 3
    t = e - 3 * v
    return v, v + (n12 if t == 0 else (n2 if t == 1 else 1))


@nb.njit(**_JIT)
def _dim0_pairs(vox: np.ndarray, edges: np.ndarray, n12: int, n2: int) -> np.ndarray:
    """Younger roots of one image's finite dimension-0 pairs (a mask over voxels)."""
    parent = np.arange(vox.size)
    younger_of_pair = np.zeros(vox.size, np.bool_)
    for value in range(2):
        for e in range(edges.size):
            if edges[e] != value:
                continue
            a, b = _edge_ends(e, n12, n2)
            ra, rb = _find(parent, a), _find(parent, b)
            if ra != rb:
                younger = _link(parent, vox, ra, rb, False)
                if vox[younger] != value:
                    younger_of_pair[younger] = True
    return younger_of_pair


@nb.njit(**_JIT)
def _dim0(vox_p, vox_g, vox_u, edges_p, edges_g, edges_u, n12, n2) -> tuple[int, int, int]:
    pairs_p = _dim0_pairs(vox_p, edges_p, n12, n2)
    pairs_g = _dim0_pairs(vox_g, edges_g, n12, n2)
    parent_u, parent_p, parent_g = np.arange(vox_u.size), np.arange(vox_u.size), np.arange(vox_u.size)
    matched_p = np.zeros(vox_u.size, np.bool_)
    matched_g = np.zeros(vox_u.size, np.bool_)
    m = 0
    for value in range(2):
        for e in range(edges_u.size):
            if edges_u[e] != value:
                continue
            a, b = _edge_ends(e, n12, n2)
            ra, rb = _find(parent_u, a), _find(parent_u, b)
            if ra == rb:
                continue
            younger = _link(parent_u, vox_u, ra, rb, False)
            younger_p = _link(parent_p, vox_p, _find(parent_p, a), _find(parent_p, b), False)
            younger_g = _link(parent_g, vox_g, _find(parent_g, a), _find(parent_g, b), False)
            if vox_u[younger] != value and pairs_p[younger_p] and pairs_g[younger_g]:
                m += 1
                matched_p[younger_p] = True
                matched_g[younger_g] = True
    return m, m + int((pairs_p & ~matched_p).sum()), m + int((pairs_g & ~matched_g).sum())


# ------------------------------------------------------------------------------------------------- dimension 2


@nb.njit(**_JIT)
def _cubes_beside(x, y, z, t, n0, n1, n2) -> tuple[int, int]:
    """The two cubes on either side of square ``(x, y, z, t)`` (normal to axis ``t``); the outside is the last cube.

    Cubes are numbered ``(x * (n1 - 1) + y) * (n2 - 1) + z``.
    """
    m0, m1, m2 = n0 - 1, n1 - 1, n2 - 1
    outside = m0 * m1 * m2
    here = (x * m1 + y) * m2 + z
    if t == 0:
        return (outside if x == 0 else here - m1 * m2), (outside if x == m0 else here)
    if t == 1:
        return (outside if y == 0 else here - m2), (outside if y == m1 else here)
    return (outside if z == 0 else here - 1), (outside if z == m2 else here)


@nb.njit(**_JIT)
def _dim2_union_find(squares, cubes, n0, n1, n2, cubes_u, key_of_pair, marks, key_p, key_g, matched) -> int:
    """A dimension-2 union-find over cubes (the outside: value infinity), squares in decreasing (value, index) order.

    For one image (``cubes_u`` not empty): marks its finite pairs in ``marks`` and keys each by the younger root of
    a second union-find over ``cubes_u`` that takes the same unions (the first pair under a key is kept, in
    ``key_of_pair``). For U itself (``cubes_u`` empty): marks every square that joins two components (they reduce
    to zero in dimension 1: cleared) and, when ``key_p`` is not empty, counts the finite pairs whose younger root
    keys a P-pair and a G-pair, marking those pairs in ``matched`` (rows 0 and 1). Returns that count.
    """
    image = cubes_u.size > 0
    count = key_p.size > 0
    parent = np.arange(cubes.size).astype(np.int32)
    parent_u = np.arange(cubes_u.size).astype(np.int32)
    m = 0
    for value in range(1, -1, -1):
        for x in range(n0 - 1, -1, -1):
            for y in range(n1 - 1, -1, -1):
                for z in range(n2 - 1, -1, -1):
                    for t in range(2, -1, -1):
                        s = ((x * n1 + y) * n2 + z) * 3 + t
                        if squares[s] != value:
                            continue
                        a, b = _cubes_beside(x, y, z, t, n0, n1, n2)
                        ra, rb = _find(parent, a), _find(parent, b)
                        if ra == rb:
                            continue
                        younger = _link(parent, cubes, ra, rb, True)
                        if image:
                            younger_u = _link(parent_u, cubes_u, _find(parent_u, a), _find(parent_u, b), True)
                            if cubes[younger] != value:
                                marks[s] = True
                                if key_of_pair[younger_u] < 0:
                                    key_of_pair[younger_u] = s
                            continue
                        marks[s] = True
                        if count and cubes[younger] != value and key_p[younger] >= 0 and key_g[younger] >= 0:
                            m += 1
                            matched[0, key_p[younger]] = True
                            matched[1, key_g[younger]] = True
    return m


# ------------------------------------------------------------------------------------------------- dimension 1


@nb.njit(**_JIT)
def _square_edges(s: int, n12: int, n2: int, out: np.ndarray) -> None:
    v = s // 3
    t = s - 3 * v
    if t == 0:  # spans y and z
        out[0], out[1], out[2], out[3] = 3 * v + 1, 3 * v + 2, 3 * (v + 1) + 1, 3 * (v + n2) + 2
    elif t == 1:  # spans x and z
        out[0], out[1], out[2], out[3] = 3 * v, 3 * v + 2, 3 * (v + 1), 3 * (v + n12) + 2
    else:  # spans x and y
        out[0], out[1], out[2], out[3] = 3 * v, 3 * v + 1, 3 * (v + n2), 3 * (v + n12) + 1


@nb.njit(**_JIT)
def _boundary_keys(s, rows, n_slots, n12, n2, out) -> None:
    """The row keys ``value * n_slots + slot`` of square ``s``'s four edges, sorted."""
    _square_edges(s, n12, n2, out)
    for i in range(4):
        out[i] += np.int64(rows[out[i]]) * n_slots
    for i in range(1, 4):  # insertion sort of four keys
        key = out[i]
        j = i - 1
        while j >= 0 and out[j] > key:
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = key


@nb.njit(**_JIT)
def _symmetric_difference(a, la, b, lb, out) -> int:
    i = j = k = 0
    while i < la and j < lb:
        if a[i] < b[j]:
            out[k] = a[i]
            i += 1
            k += 1
        elif b[j] < a[i]:
            out[k] = b[j]
            j += 1
            k += 1
        else:
            i += 1
            j += 1
    while i < la:
        out[k] = a[i]
        i += 1
        k += 1
    while j < lb:
        out[k] = b[j]
        j += 1
        k += 1
    return k


@nb.njit(**_JIT)
def _boundary_pivot(s, rows, n_slots, n12, n2, out) -> int:
    """The largest row key ``value * n_slots + slot`` of square ``s``'s four edges (``out``: scratch)."""
    _square_edges(s, n12, n2, out)
    pivot = -1
    for i in range(4):
        key = np.int64(rows[out[i]]) * n_slots + out[i]
        pivot = max(pivot, key)
    return pivot


@nb.njit(**_JIT)
def _reduce(columns, skip, rows, n_values, n12, n2, owner) -> np.ndarray:
    """Column reduction of the squares whose ``columns`` value is below ``n_values``, in (value, index) order.

    Rows (edges) are keyed by their ``rows`` value, then index; ``skip`` marks squares left out (cleared). On return
    ``owner[e]`` tells whose reduced column has pivot edge ``e``: the square ``owner[e]`` when it is ``>= 0`` and that
    column needed no addition (it is its boundary, not stored), ``stored[-owner[e] - 2]`` when it is ``<= -2``, and
    nobody when it is -1. Returns ``stored``.
    """
    n_slots = rows.size
    owner[:] = -1
    starts = np.empty(1024, np.int64)  # stored column i: pool[starts[i] : starts[i + 1]]
    stored = np.empty(1024, np.int32)
    n_stored = 0
    starts[0] = 0
    pool = np.empty(1 << 16, np.int64)
    work = np.empty(256, np.int64)
    spare = np.empty(256, np.int64)
    other = np.empty(4, np.int64)
    for value in range(n_values):
        for s in range(columns.size):
            if columns[s] != value or skip[s]:
                continue
            pivot = _boundary_pivot(s, rows, n_slots, n12, n2, other)
            slot = pivot - n_slots if pivot >= n_slots else pivot
            if owner[slot] == -1:  # emergent: the column needs no addition
                owner[slot] = s
                continue
            _boundary_keys(s, rows, n_slots, n12, n2, work)
            n = 4
            while n > 0:
                pivot = work[n - 1]
                slot = pivot - n_slots if pivot >= n_slots else pivot
                o = owner[slot]
                if o == -1:
                    if n_stored + 2 > stored.size:
                        stored = np.concatenate((stored, np.empty(stored.size, np.int32)))
                        starts = np.concatenate((starts, np.empty(starts.size, np.int64)))
                    used = starts[n_stored]
                    if used + n > pool.size:
                        pool = np.concatenate((pool[:used], np.empty(max(pool.size, n), np.int64)))
                    pool[used : used + n] = work[:n]
                    stored[n_stored] = s
                    owner[slot] = -2 - n_stored
                    n_stored += 1
                    starts[n_stored] = used + n
                    break
                if o >= 0:
                    _boundary_keys(o, rows, n_slots, n12, n2, other)
                    col = other
                else:
                    col = pool[starts[-2 - o] : starts[-1 - o]]
                if n + col.size > spare.size:
                    spare = np.empty(2 * (n + col.size), np.int64)
                n = _symmetric_difference(work, n, col, col.size, spare)
                work, spare = spare, work
    return stored[:n_stored]


@nb.njit(**_JIT)
def _pivot_square(owner, stored, e) -> int:
    """The square whose reduced column has pivot edge ``e`` (-1: none), from :func:`_reduce`'s output."""
    o = owner[e]
    if o >= 0:
        return o
    return stored[-2 - o] if o <= -2 else -1


@nb.njit(**_JIT)
def _loop_births(edges, squares, n12, n2, owner, parent) -> np.ndarray:
    """Birth edges of one image's finite loops: positive edges of its foreground complex not killed inside it."""
    n_slots = edges.size
    for i in range(parent.size):
        parent[i] = i
    births = np.zeros(n_slots, np.bool_)
    for e in range(n_slots):
        if edges[e] != 0:
            continue
        a, b = _edge_ends(e, n12, n2)
        ra, rb = _find(parent, a), _find(parent, b)
        if ra == rb:
            births[e] = True  # positive: closes a loop
        else:
            parent[ra] = rb
    # the foreground squares (all their edges are value 0: rows by index), skipping none
    _reduce(squares, squares, edges, 1, n12, n2, owner)  # skip: value-0 squares are 0
    for e in range(n_slots):
        if births[e] and owner[e] != -1:
            births[e] = False  # killed inside the foreground: a zero-length bar
    return births


@nb.njit(**_JIT)
def _dim1_matches(squares_u, cleared, edges_p, edges_g, births_p, births_g, n12, n2, owner) -> int:
    """U-bars whose pivots in the image reductions (rows in P's, in G's order) are P- and G-loop births."""
    n_slots = squares_u.size
    stored = _reduce(squares_u, cleared, edges_g, 2, n12, n2, owner)
    in_g = np.zeros(n_slots, np.bool_)  # squares whose pivot in G's order is a G-loop's birth
    for e in range(n_slots):
        if births_g[e]:
            s = _pivot_square(owner, stored, e)
            if s >= 0:
                in_g[s] = True
    stored = _reduce(squares_u, cleared, edges_p, 2, n12, n2, owner)
    m = 0
    for e in range(n_slots):
        if births_p[e]:
            s = _pivot_square(owner, stored, e)
            if s >= 0 and squares_u[s] == 1 and in_g[s]:
                m += 1
    return m


# ----------------------------------------------------------------------------------------------------- counts


def matching_counts(pred: np.ndarray, gt: np.ndarray, dims: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """Betti-matching counts of two binary 3D masks, as Betti-Matching-3D's ``compute_matching(1-pred, 1-gt)``.

    Args:
        pred: binary 3D mask (True = foreground), the program's ``input1``.
        gt: binary 3D mask of the same shape, ``input2``.
        dims: homology dimensions to count; the rows of the others stay 0.

    Returns:
        ``(3, 3)`` int64 array, row k = (matched, predicted, label) features of dimension k.
    """
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.ndim != 3 or p.shape != g.shape:
        msg = f"matching_counts needs two 3D masks of one shape, got {p.shape} and {g.shape}"
        raise ValueError(msg)
    if 3 * p.size >= 2**31:  # cell slots are int32 in the reductions; the competition's octants are 160^3
        msg = f"matching_counts takes blocks of under {2**31 // 3} voxels (int32 cell slots), got {p.shape}"
        raise ValueError(msg)
    n0, n1, n2 = p.shape
    n12 = n1 * n2
    (vox_p, edges_p, squares_p, cubes_p), (vox_g, edges_g, squares_g, cubes_g) = _cell_values(p), _cell_values(g)
    vox_u, edges_u, squares_u, cubes_u = _cell_values(p | g)
    counts = np.zeros((3, 3), np.int64)
    cleared = np.zeros(squares_u.size, np.bool_)
    flat = min(p.shape) < 2  # the program computes no cavities (and clears nothing) in a flat box
    if not flat and (2 in dims or 1 in dims):
        outside = np.array([3], np.uint8)  # infinity
        cubes_u = np.concatenate([cubes_u, outside])
        none8, none64 = np.empty(0, np.uint8), np.empty(0, np.int64)
        keys, pairs = [none64, none64], []
        matched = np.zeros((2, squares_u.size if 2 in dims else 0), np.bool_)
        if 2 in dims:  # each image's pairs, keyed for the comparison's union-find
            for i, (squares, cubes) in enumerate(((squares_p, cubes_p), (squares_g, cubes_g))):
                keys[i] = np.full(cubes_u.size, -1, np.int64)
                pairs.append(np.zeros(squares.size, np.bool_))
                cubes = np.concatenate([cubes, outside])
                _dim2_union_find(squares, cubes, n0, n1, n2, cubes_u, keys[i], pairs[i], none64, none64, matched)
        # U's union-find: the squares it clears for dimension 1, and the dimension-2 matches when keyed
        m = _dim2_union_find(squares_u, cubes_u, n0, n1, n2, none8, none64, cleared, keys[0], keys[1], matched)
        if 2 in dims:
            counts[2] = (m, m + int((pairs[0] & ~matched[0]).sum()), m + int((pairs[1] & ~matched[1]).sum()))
    if 1 in dims:
        owner = np.empty(squares_u.size, np.int32)
        parent = np.empty(vox_u.size, np.int64)
        births_p = _loop_births(edges_p, squares_p, n12, n2, owner, parent)
        births_g = _loop_births(edges_g, squares_g, n12, n2, owner, parent)
        m = _dim1_matches(squares_u, cleared, edges_p, edges_g, births_p, births_g, n12, n2, owner)
        counts[1] = (m, int(births_p.sum()), int(births_g.sum()))
    if 0 in dims:
        counts[0] = _dim0(vox_p, vox_g, vox_u, edges_p, edges_g, edges_u, n12, n2)
    return counts


# ------------------------------------------------------------------------------------------ the reference


_REFERENCE: list[ModuleType | None] = []


def load_reference() -> ModuleType | None:
    """The compiled Betti-Matching-3D extension shipped in the ``topolosses`` wheel, or None when not installed.

    The extension is loaded from its file: ``topolosses``'s own ``__init__`` imports torchvision, which this
    project does not install.
    """
    if not _REFERENCE:
        module = None
        spec = importlib.util.find_spec("topolosses")
        if spec is not None and spec.submodule_search_locations:
            folder = Path(next(iter(spec.submodule_search_locations))) / "losses" / "betti_matching" / "src"
            for so in sorted(folder.glob("betti_matching*.so")):
                ext = importlib.util.spec_from_file_location("betti_matching", so)
                if ext is not None and ext.loader is not None:
                    module = importlib.util.module_from_spec(ext)
                    ext.loader.exec_module(module)
                    break
        _REFERENCE.append(module)
    return _REFERENCE[0]


def reference_counts(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``(3, 3)`` arrays of (matched, predicted, label) per dimension from the compiled Betti-Matching-3D.

    Runs ``compute_matching(1 - pred, 1 - gt)`` on each pair in turn, in this process, as the official metric does.

    Raises:
        RuntimeError: when the ``topolosses`` wheel is not installed.
    """
    bm = load_reference()
    if bm is None:
        msg = "the compiled Betti-Matching-3D is not installed: pip install --no-deps topolosses==0.2.0"
        raise RuntimeError(msg)
    out = []
    for pred, gt in zip(preds, gts, strict=True):
        result = bm.compute_matching(
            np.ascontiguousarray(~np.asarray(pred, bool), dtype=np.float64),
            np.ascontiguousarray(~np.asarray(gt, bool), dtype=np.float64),
        )
        counts = np.zeros((3, 3), np.int64)
        for k in range(3):
            m = len(result.input1_matched_birth_coordinates[k])
            counts[k] = (
                m,
                m + len(result.input1_unmatched_birth_coordinates[k]),
                m + len(result.input2_unmatched_birth_coordinates[k]),
            )
        out.append(counts)
    return out
