"""Betti matching of two binary 3D masks, exactly as Betti-Matching-3D counts it, and its compiled reference.

The competition's TopoScore runs Betti-Matching-3D (``compute_matching``) on ``1 - mask`` of each octant. On binary
masks every finite bar is ``[0, 1)``, so which bars are matched is decided only by the program's processing order:
cells sorted by (value, raster index), value being the maximum of the cell's voxels, raster index the
lexicographic ``(x, y, z, type)`` of the cell. :func:`exact_counts` re-implements that program step by step for
binary inputs (its ``src_3D`` ``dimension_0``, ``dimension_1`` and ``dimension_2``):

- the comparison image is the pointwise minimum of the two filtrations, i.e. the union ``U = P OR G``;
- dimension 2: a union-find over cubes (the outside is one node of value infinity), squares processed in
  decreasing (value, index) order, with a second union-find ordered by the comparison values; a P-pair is keyed
  by the comparison union-find's younger root, and a comparison pair matches when its younger root keys a P-pair
  and a G-pair;
- dimension 1: column reduction of the squares (columns in (value, index) order, pivot the largest edge) for
  P, G and U, and the image reductions of U's columns with rows ordered by P's and by G's values; a U-pair
  ``(e, s)`` matches when the image pivot of ``s`` in P is the birth edge of a P-pair, and likewise in G
  (pivots of a reduction are independent of how it is carried out, so the program's emergent-pair, clearing and
  cache shortcuts change nothing);
- dimension 0: union-find over the edges in (value, index) order, the elder being the root of smaller (value,
  index); U's merges drive two more union-finds ordered by P's and G's values, and a U-pair matches when both
  younger roots are birth voxels of P- and G-pairs.

This port is pure Python: exact, but only practical on small blocks (measured: 5.9 s for a 14 x 20 x 30 block).
:func:`reference_counts` calls the compiled program when the ``topolosses`` 0.2.0 wheel is installed
(``pip install --no-deps topolosses==0.2.0``: its declared dependencies are not needed for this extension).
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np

__all__ = ["MATCHER_TUNABLES", "exact_counts", "keep_matcher_workers", "load_reference", "matcher_workers", "reference_counts"]

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


MATCHER_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
"""glibc malloc settings of the matcher's worker processes: one heap, never handed back to the system, so an octant
reuses the pages the previous one touched. The program allocates ~1.3 kB per voxel per call; with glibc's
defaults every call faults those pages in anew (1.8 million minor faults, half of its time, on a 160^3 octant)."""
MATCHER_BYTES_PER_VOXEL = 1400
"""Peak memory of one matcher call per octant voxel (measured: 5.4 GB peak RSS on a 160^3 octant)."""
MATCHER_POOL_MIN_VOXELS = 64**3
"""Octants smaller than this are matched in this process: starting a worker costs more than they take."""
MATCHER_WORKERS_ENV = "MATCHER_WORKERS"
"""Environment variable that fixes the number of matcher processes (0: in this process)."""


def _counts(result: object) -> np.ndarray:
    counts = np.zeros((3, 3), np.int64)
    for k in range(3):
        m = len(result.input1_matched_birth_coordinates[k])
        counts[k] = (
            m,
            m + len(result.input1_unmatched_birth_coordinates[k]),
            m + len(result.input2_unmatched_birth_coordinates[k]),
        )
    return counts


def _reference_one(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    bm = load_reference()
    if bm is None:
        msg = "the compiled Betti-Matching-3D is not installed: pip install --no-deps topolosses==0.2.0"
        raise RuntimeError(msg)
    return _counts(
        bm.compute_matching(
            np.ascontiguousarray(~np.asarray(pred, bool), dtype=np.float64),
            np.ascontiguousarray(~np.asarray(gt, bool), dtype=np.float64),
        )
    )


def matcher_workers(n_pairs: int, max_voxels: int) -> int:
    """Matcher processes for ``n_pairs`` octants of up to ``max_voxels`` voxels: 0 means in this process.

    ``MATCHER_WORKERS`` in the environment decides when set. Otherwise one process per core this process may use
    (shared with the other local ranks under torchrun), at most one per octant, and no more than the memory
    available holds (:data:`MATCHER_BYTES_PER_VOXEL`; memory and cores shared with the machine's other ranks); 0 for
    a single octant (nothing to share or reuse) unless in a :func:`keep_matcher_workers` block, for octants under
    :data:`MATCHER_POOL_MIN_VOXELS`, and inside a worker process (no nested pools: ``tune --workers`` scores in
    workers of its own). In a block whose workers are running, their number.
    """
    fixed = os.environ.get(MATCHER_WORKERS_ENV)
    if fixed is not None:
        return max(0, int(fixed))
    kept = bool(_KEPT) and _KEPT[-1].pool is not None
    if kept and max_voxels >= MATCHER_POOL_MIN_VOXELS:
        return _KEPT[-1].workers  # kept workers reuse their heaps, even for one octant
    alone = n_pairs < 2 and not _KEPT  # one octant: nothing to share, and no later call to reuse a heap
    if alone or max_voxels < MATCHER_POOL_MIN_VOXELS or multiprocessing.parent_process() is not None:
        return 0
    from pipeline.store import available_memory

    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # the machine's other ranks do the same
    cores = len(os.sched_getaffinity(0)) // ranks
    by_memory = int(0.8 * available_memory()) // ranks // max(1, MATCHER_BYTES_PER_VOXEL * max_voxels)
    return max(1, min(cores if _KEPT else n_pairs, cores, by_memory))  # kept workers serve the later calls too


def reference_counts(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], workers: int | None = None
) -> list[np.ndarray]:
    """``(3, 3)`` arrays of (matched, predicted, label) per dimension from the compiled Betti-Matching-3D.

    The program runs on one core, so several pairs go to ``workers`` processes (spawned with
    :data:`MATCHER_TUNABLES`); each takes pairs in turn and keeps its heap for the next. Measured on 160^3 octants
    of the 320^3 bench volume with loops in both masks: 10.3 s per call in a plain process, 5.9 s for the second
    call in a worker. The counts are the program's whatever the split: the same extension on the same arrays.

    Args:
        preds: binary 3D masks (True = foreground).
        gts: binary 3D masks of the same shapes.
        workers: matcher processes; None chooses (:func:`matcher_workers`), 0 runs here, one pair after another.

    Returns:
        One array per pair, rows k = 0, 1, 2, in the order of the pairs.

    Raises:
        RuntimeError: when the extension is not installed.
    """
    if load_reference() is None:
        msg = "the compiled Betti-Matching-3D is not installed: pip install --no-deps topolosses==0.2.0"
        raise RuntimeError(msg)
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        msg = f"{len(preds)} predictions for {len(gts)} labels"
        raise ValueError(msg)
    if workers is None:
        workers = matcher_workers(len(preds), max((p.size for p in preds), default=0))
    if workers == 0:
        return [_reference_one(p, g) for p, g in zip(preds, gts)]
    return _in_workers(preds, gts, workers)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class _KeptWorkers:
    """The matcher processes of a :func:`keep_matcher_workers` block, started by its first call that needs them."""

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.workers = 0


_KEPT: list[_KeptWorkers] = []


@contextlib.contextmanager
def keep_matcher_workers() -> Iterator[None]:
    """Keep the matcher's worker processes, and so their heaps, from one call to the next inside this block.

    Outside such a block every :func:`reference_counts` call starts its own workers, and each worker's first octant
    pays for faulting its memory in (~20 s of a 160^3 octant's ~25 s with two at once, measured on 2 cores); inside,
    only the block's first call does. ``tune``'s sweep, :func:`pipeline.score.score_volumes` and the exact
    ``CompetitionScoreHandler`` run in one. The workers hold their heaps (up to
    :data:`MATCHER_BYTES_PER_VOXEL` per voxel of the largest octant) until the block ends.
    """
    kept = _KeptWorkers()
    _KEPT.append(kept)
    try:
        yield
    finally:
        _KEPT.remove(kept)
        if kept.pool is not None:
            kept.pool.shutdown()


def _submit(pool: ProcessPoolExecutor, preds: list[np.ndarray], gts: list[np.ndarray]) -> list[np.ndarray]:
    order = sorted(range(len(preds)), key=lambda i: -preds[i].size)  # largest first: the last to finish is small
    with _environment("GLIBC_TUNABLES", MATCHER_TUNABLES):  # glibc reads it as a worker starts, in submit()
        futures = {i: pool.submit(_reference_one, np.asarray(preds[i], bool), np.asarray(gts[i], bool)) for i in order}
    return [futures[i].result() for i in range(len(preds))]


def _in_workers(preds: list[np.ndarray], gts: list[np.ndarray], workers: int) -> list[np.ndarray]:
    if _KEPT:
        kept = _KEPT[-1]
        if kept.pool is None:
            kept.pool, kept.workers = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")), workers
        return _submit(kept.pool, preds, gts)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return _submit(pool, preds, gts)


# ----------------------------------------------------------------------------------------------- the complex


class _Complex:
    """Cells of the cubical complex of one binary image with their values (0 foreground, 1 background)."""

    def __init__(self, fg: np.ndarray) -> None:
        self.shape = fg.shape
        n0, n1, n2 = fg.shape
        self.v = (~fg).astype(np.int64)  # voxel values of 1 - mask
        padded = np.ones((n0 + 1, n1 + 1, n2 + 1), np.int64) * 2  # 2 = outside the box (infinity)
        padded[:n0, :n1, :n2] = self.v
        self.padded = padded
        self.n_edges = n0 * n1 * n2 * 3

    def vox(self, x: int, y: int, z: int) -> int:
        return int(self.padded[x, y, z])

    def edge_value(self, x: int, y: int, z: int, t: int) -> int:
        dx, dy, dz = ((1, 0, 0), (0, 1, 0), (0, 0, 1))[t]
        return max(self.vox(x, y, z), self.vox(x + dx, y + dy, z + dz))

    def square_value(self, x: int, y: int, z: int, t: int) -> int:
        return max(self.vox(*c) for c in _square_vertices(x, y, z, t))


def _square_vertices(x: int, y: int, z: int, t: int) -> list[tuple[int, int, int]]:
    if t == 0:
        return [(x, y, z), (x, y, z + 1), (x, y + 1, z), (x, y + 1, z + 1)]
    if t == 1:
        return [(x, y, z), (x, y, z + 1), (x + 1, y, z), (x + 1, y, z + 1)]
    return [(x, y, z), (x, y + 1, z), (x + 1, y, z), (x + 1, y + 1, z)]


def _square_edges(x: int, y: int, z: int, t: int) -> list[tuple[int, int, int, int]]:
    if t == 0:
        return [(x, y, z, 1), (x, y, z, 2), (x, y, z + 1, 1), (x, y + 1, z, 2)]
    if t == 1:
        return [(x, y, z, 0), (x, y, z, 2), (x, y, z + 1, 0), (x + 1, y, z, 2)]
    return [(x, y, z, 0), (x, y, z, 1), (x, y + 1, z, 0), (x + 1, y, z, 1)]


def _cells(shape: tuple[int, ...], dim: int) -> list[tuple[int, int, int, int]]:
    """Cells of dimension 1 (edges) or 2 (squares) inside the box, in raster order (x, y, z, type)."""
    n0, n1, n2 = shape
    out = []
    for x in range(n0):
        for y in range(n1):
            for z in range(n2):
                for t in range(3):
                    ext = [x, y, z]
                    if dim == 1:
                        ext[t] += 1
                    else:
                        for a in range(3):
                            if a != t:
                                ext[a] += 1
                    if ext[0] < n0 and ext[1] < n1 and ext[2] < n2:
                        out.append((x, y, z, t))
    return out


def _lin(shape: tuple[int, ...], cell: tuple[int, int, int, int]) -> int:
    x, y, z, t = cell
    return ((x * shape[1] + y) * shape[2] + z) * 3 + t


def _sorted_by_value(cells: list, values: list[int]) -> list:
    """Cells sorted by value, raster order kept among equal values (the program's stable partition)."""
    order = sorted(range(len(cells)), key=lambda i: values[i])
    return [cells[i] for i in order]


# ------------------------------------------------------------------------------------------------ union-find


class _UnionFind:
    """Union-find whose ``link`` keeps the elder root: smaller (value, index), or larger for the dual."""

    def __init__(self, births: list[int], dual: bool) -> None:
        self.parent = list(range(len(births)))
        self.birth = births
        self.dual = dual

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def link(self, x: int, y: int) -> int:
        """Join the roots ``x`` and ``y``; return the younger one."""
        kx, ky = (self.birth[x], x), (self.birth[y], y)
        younger_is_x = kx < ky if self.dual else kx > ky
        if younger_is_x:
            self.parent[x] = y
            return x
        self.parent[y] = x
        return y


# ------------------------------------------------------------------------------------------------- dimension 2


def _cube_births(cx: _Complex) -> list[int]:
    n0, n1, n2 = cx.shape
    v = cx.v
    cube = np.zeros((n0 - 1, n1 - 1, n2 - 1), np.int64)
    for a, b, c in np.ndindex(2, 2, 2):
        cube = np.maximum(cube, v[a : n0 - 1 + a, b : n1 - 1 + b, c : n2 - 1 + c])
    return [*cube.ravel().tolist(), 3]  # the outside: infinity


def _dual_ends(shape: tuple[int, ...], square: tuple[int, int, int, int]) -> tuple[int, int]:
    m0, m1, m2 = (s - 1 for s in shape)
    outside = m0 * m1 * m2
    x, y, z, t = square
    pos = [x, y, z]
    lo = pos.copy()
    lo[t] -= 1
    a = outside if pos[t] == 0 else (lo[0] * m1 + lo[1]) * m2 + lo[2]
    b = outside if pos[t] == (m0, m1, m2)[t] else (x * m1 + y) * m2 + z
    return a, b


def _dimension2(cxs: list[_Complex], comp: _Complex, squares: list) -> tuple[list[int], list[list], list]:
    """Dimension-2 counts; returns (counts as [m, p, g], the squares left to each image's dimension 1, U's)."""
    shape = comp.shape
    births_comp = _cube_births(comp)
    match_maps, pairs, left = [], [], []
    for cx in cxs:
        values = [cx.square_value(*s) for s in squares]
        ordered = _sorted_by_value(squares, values)
        uf, uf_comp = _UnionFind(_cube_births(cx), True), _UnionFind(births_comp, True)
        match_map: dict[int, tuple] = {}
        own_pairs, kept = [], []
        for square in reversed(ordered):
            a, b = _dual_ends(shape, square)
            ra, rb = uf.find(a), uf.find(b)
            if ra == rb:
                kept.append(square)
                continue
            younger = uf.link(ra, rb)
            younger_comp = uf_comp.link(uf_comp.find(a), uf_comp.find(b))
            if cx.square_value(*square) != uf.birth[younger]:
                own_pairs.append(square)
                match_map.setdefault(younger_comp, square)
        match_maps.append(match_map)
        pairs.append(own_pairs)
        left.append(kept[::-1])
    values = [comp.square_value(*s) for s in squares]
    ordered = _sorted_by_value(squares, values)
    uf_comp = _UnionFind(births_comp, True)
    matched: list[set] = [set(), set()]
    m, kept = 0, []
    for square in reversed(ordered):
        a, b = _dual_ends(shape, square)
        ra, rb = uf_comp.find(a), uf_comp.find(b)
        if ra == rb:
            kept.append(square)
            continue
        younger = uf_comp.link(ra, rb)
        if comp.square_value(*square) != uf_comp.birth[younger]:
            if younger in match_maps[0] and younger in match_maps[1]:
                m += 1
                matched[0].add(match_maps[0][younger])
                matched[1].add(match_maps[1][younger])
    counts = [m] + [m + sum(1 for s in pairs[i] if s not in matched[i]) for i in range(2)]
    return counts, left, kept[::-1]


# ------------------------------------------------------------------------------------------------- dimension 1


def _reduce(columns: list, row_key, boundary) -> dict:
    """Standard column reduction; ``{column: pivot row key}`` for the columns that do not reduce to zero."""
    pivot_of: dict[int, int] = {}  # row key -> index of the column holding it as pivot
    reduced: list[set | None] = []
    lows: dict = {}
    for i, column in enumerate(columns):
        col = {row_key(e) for e in boundary(column)}
        while col:
            low = max(col)
            j = pivot_of.get(low)
            if j is None:
                pivot_of[low] = i
                lows[column] = low
                break
            col ^= reduced[j]
        reduced.append(col)
    return lows


def _dimension1(cxs: list[_Complex], comp: _Complex, columns: list[list], comp_columns: list) -> tuple[list, list]:
    """Dimension-1 counts [m, p, g], and for each image the edges that are pivots (cleared from dimension 0)."""
    shape = comp.shape
    ne = comp.n_edges

    def key_in(cx: _Complex):
        return lambda e: cx.edge_value(*e) * ne + _lin(shape, e)

    pair_births, cleared = [], []
    for cx, cols in zip(cxs, columns, strict=True):
        lows = _reduce(cols, key_in(cx), lambda s: _square_edges(*s))
        cleared.append(set(lows.values()))
        births = set()
        for square, low in lows.items():
            if low // ne != cx.square_value(*square):
                births.add(low)
        pair_births.append(births)
    comp_lows = _reduce(comp_columns, key_in(comp), lambda s: _square_edges(*s))
    image_lows = [_reduce(comp_columns, key_in(cx), lambda s: _square_edges(*s)) for cx in cxs]
    m, matched = 0, [set(), set()]
    for square in comp_columns:
        low = comp_lows.get(square)
        if low is None or low // ne == comp.square_value(*square):
            continue
        ends = [image_lows[i].get(square) for i in range(2)]
        if all(ends[i] is not None and ends[i] in pair_births[i] for i in range(2)):
            m += 1
            for i in range(2):
                matched[i].add(ends[i])
    counts = [m] + [m + len(pair_births[i] - matched[i]) for i in range(2)]
    return counts, cleared


# ------------------------------------------------------------------------------------------------- dimension 0


def _voxel_ends(shape: tuple[int, ...], edge: tuple[int, int, int, int]) -> tuple[int, int]:
    x, y, z, t = edge
    a = (x * shape[1] + y) * shape[2] + z
    return a, a + (shape[1] * shape[2], shape[2], 1)[t]


def _dimension0(cxs: list[_Complex], comp: _Complex, edges: list) -> list[int]:
    shape = comp.shape
    match_maps, births = [], []
    for cx in cxs:
        values = [cx.edge_value(*e) for e in edges]
        uf = _UnionFind(cx.v.ravel().tolist(), False)
        match_map: set[int] = set()
        for edge in _sorted_by_value(edges, values):
            a, b = _voxel_ends(shape, edge)
            ra, rb = uf.find(a), uf.find(b)
            if ra != rb:
                younger = uf.link(ra, rb)
                if uf.birth[younger] != cx.edge_value(*edge):
                    match_map.add(younger)
        match_maps.append(match_map)
        births.append(cx.v.ravel().tolist())
    values = [comp.edge_value(*e) for e in edges]
    uf_comp = _UnionFind(comp.v.ravel().tolist(), False)
    ufs = [_UnionFind(b, False) for b in births]
    m, matched = 0, [set(), set()]
    for edge in _sorted_by_value(edges, values):
        a, b = _voxel_ends(shape, edge)
        ra, rb = uf_comp.find(a), uf_comp.find(b)
        if ra == rb:
            continue
        younger = uf_comp.link(ra, rb)
        ends = [uf.link(uf.find(a), uf.find(b)) for uf in ufs]
        if uf_comp.birth[younger] != comp.edge_value(*edge):
            if ends[0] in match_maps[0] and ends[1] in match_maps[1]:
                m += 1
                for i in range(2):
                    matched[i].add(ends[i])
    return [m] + [m + len(match_maps[i] - matched[i]) for i in range(2)]


def exact_counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Betti-matching counts of two binary 3D masks, as Betti-Matching-3D's ``compute_matching(1-pred, 1-gt)``.

    Args:
        pred: binary 3D mask (True = foreground), the program's ``input1``.
        gt: binary 3D mask of the same shape, ``input2``.

    Returns:
        ``(3, 3)`` int64 array, row k = (matched, predicted, label) features of dimension k.
    """
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    cxs, comp = [_Complex(p), _Complex(g)], _Complex(p | g)
    counts = np.zeros((3, 3), np.int64)
    squares = _cells(p.shape, 2)
    if min(p.shape) > 1:
        counts[2], left, comp_left = _dimension2(cxs, comp, squares)
    else:  # the program computes no cavities in a flat box; every square goes to dimension 1
        left = [_sorted_by_value(squares, [cx.square_value(*s) for s in squares]) for cx in cxs]
        comp_left = _sorted_by_value(squares, [comp.square_value(*s) for s in squares])
    counts[1], _ = _dimension1(cxs, comp, left, comp_left)
    counts[0] = _dimension0(cxs, comp, _cells(p.shape, 1))
    return counts
