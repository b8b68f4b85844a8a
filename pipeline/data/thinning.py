"""Lee's 3D thinning, scikit-image's ``skeletonize`` of a 3D mask voxel for voxel, in a fifth of its time.

scikit-image implements [Lee94]_ as sweeps: for each of the six border directions in turn it scans the whole volume
for the candidates (foreground voxels whose neighbour in that direction is background, not end points,
Euler-invariant and simple, all judged on the mask as the sweep starts), then re-checks them one by one in raster
order and deletes each one still simple; it stops when six sweeps in a row delete nothing. A 320^3 label of
synthetic scrolls takes 29 rounds of six sweeps and 8.6 M deletions: ~15 s of one core, most of it re-testing
voxels whose neighbourhood has not changed and scanning background.

The same sweeps, with the same tests in the same order (so the same skeleton; ``tests/data/test_thinning.py``
compares them), and less work:

- A voxel's test (end point, Euler, simple) depends only on its 3x3x3 neighbourhood, so its result is kept in the
  voxel's byte until a neighbour is deleted; the re-check deletes a candidate whose neighbourhood is unchanged
  since its test without testing it again.
- A sweep visits a list of the border (foreground voxels with a background face neighbour, in raster order), not
  the volume; a voxel leaves it when it is found not deletable and comes back when its neighbourhood changes.
- The neighbourhood of the next voxel along x is the previous one's shifted plus one new column (9 loads, not 27);
  a deletion updates its neighbours three at a time (one four-byte word per row); the Euler change is two look-ups
  in tables of the 18 bits of a half neighbourhood, and the connectivity test is a bit-parallel flood fill.

.. [Lee94] T.-C. Lee, R.L. Kashyap and C.-N. Chu, Building skeleton models via 3-D medial surface/axis thinning
   algorithms. Computer Vision, Graphics, and Image Processing, 56(6):462-478, 1994.
"""

from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["thin"]

# The 3x3x3 neighbourhood in Lee's numbering (the centre is 13): index 9 * (dz + 1) + 3 * (dx + 1) + (dy + 1).
_DELTAS = np.array([(k // 9 - 1, k % 3 - 1, (k // 3) % 3 - 1) for k in range(27)], dtype=np.int64)  # (dz, dy, dx)

# Euler characteristic change per octant ([Lee94]_ Table 2, column delta G_26), indexed by the octant's occupancy
# code: 1 (the centre) plus, for each of the octant's other seven voxels, its bit (128, 64, ..., 2) when set.
_EULER = np.zeros(256, dtype=np.int64)
_EULER[1::2] = [
    1, -1, -1, 1, -3, -1, -1, 1, -1, 1, 1, -1, 3, 1, 1, -1, -3, -1, 3, 1, 1, -1, 3, 1, -1, 1, 1, -1, 3, 1, 1, -1,
    -3, 3, -1, 1, 1, 3, -1, 1, -1, 1, 1, -1, 3, 1, 1, -1, 1, 3, 3, 1, 5, 3, 3, 1, -1, 1, 1, -1, 3, 1, 1, -1,
    -7, -1, -1, 1, -3, -1, -1, 1, -1, 1, 1, -1, 3, 1, 1, -1, -3, -1, 3, 1, 1, -1, 3, 1, -1, 1, 1, -1, 3, 1, 1, -1,
    -3, 3, -1, 1, 1, 3, -1, 1, -1, 1, 1, -1, 3, 1, 1, -1, 1, 3, 3, 1, 5, 3, 3, 1, -1, 1, 1, -1, 3, 1, 1, -1,
]  # fmt: skip
# The seven other voxels of each octant, in the order of the bits 128, 64, 32, 16, 8, 4, 2.
_OCTANTS = np.array([
    [2, 1, 11, 10, 5, 4, 14], [0, 9, 3, 12, 1, 10, 4], [8, 7, 17, 16, 5, 4, 14], [6, 15, 7, 16, 3, 12, 4],
    [20, 23, 19, 22, 11, 14, 10], [18, 21, 9, 12, 19, 22, 10], [26, 23, 17, 14, 25, 22, 16],
    [24, 25, 15, 16, 21, 22, 12],
], dtype=np.int64)  # fmt: skip


def _euler_halves() -> tuple[np.ndarray, np.ndarray]:
    """The Euler change of the four lower octants (planes dz = -1, 0: bits 0-17 of a neighbourhood code) and of the
    four upper ones (dz = 0, 1: bits 9-26), for every value of those 18 bits: two look-ups instead of 56 bit tests."""
    halves = []
    for first, shift in ((0, 0), (4, 9)):
        bits = np.arange(1 << 18, dtype=np.int64)
        total = np.zeros(1 << 18, dtype=np.int8)
        for octant in _OCTANTS[first : first + 4]:
            index = np.ones(1 << 18, dtype=np.int64)
            for m, voxel in enumerate(octant):
                index |= ((bits >> (voxel - shift)) & 1) << (7 - m)
            total += _EULER[index].astype(np.int8)
        halves.append(total)
    return halves[0], halves[1]


_EULER_LOW, _EULER_HIGH = _euler_halves()
_FULL = (1 << 27) - 1
_CENTRE = 1 << 13
# Masks for the 26-dilation of a neighbourhood's bits by shifts: the voxels at the low / high end of each axis.
_Y_LOW = sum(1 << k for k in range(27) if k % 3 == 0)
_Y_HIGH = sum(1 << k for k in range(27) if k % 3 == 2)
_X_LOW = sum(1 << k for k in range(27) if (k // 3) % 3 == 0)
_X_HIGH = sum(1 << k for k in range(27) if (k // 3) % 3 == 2)
# Direction order and the neighbour each one tests (as scikit-image, for ImageJ's consistency): W (y-1), E (y+1),
# S (x+1), N (x-1), U (z+1), B (z-1).
_FACES = np.array([(0, 0, -1), (0, 0, 1), (0, -1, 0), (0, 1, 0), (-1, 0, 0), (1, 0, 0)], dtype=np.int64)
_BORDERS = np.array([(0, -1, 0), (0, 1, 0), (0, 0, 1), (0, 0, -1), (1, 0, 0), (-1, 0, 0)], dtype=np.int64)




def _word_pointer(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array)
    pointer = cgutils.get_item_pointer(context, builder, array_type, data, [index], wraparound=False)
    return builder.bitcast(pointer, ir.IntType(32).as_pointer())


@intrinsic
def _load4(typingctx, array, index):
    """The four bytes ``array[index:index + 4]`` as one little-endian uint32 (an unaligned load)."""

    def codegen(context, builder, sig, args):
        value = builder.load(_word_pointer(context, builder, sig.args[0], args[0], args[1]), align=1)
        return value

    return types.uint32(array, index), codegen


@intrinsic
def _store4(typingctx, array, index, value):
    """Write ``value``'s four bytes to ``array[index:index + 4]`` (an unaligned store)."""

    def codegen(context, builder, sig, args):
        builder.store(args[2], _word_pointer(context, builder, sig.args[0], args[0], args[1]), align=1)
        return context.get_dummy_value()

    return types.void(array, index, types.uint32), codegen


@njit(cache=True, nogil=True)
def _code(flat, f, offsets):
    """The 3x3x3 neighbourhood of flat index ``f`` as 27 bits (bit k: voxel k of Lee's numbering is set)."""
    code = 0
    for k in range(27):
        code |= np.int64(flat[f + offsets[k]] & 1) << k
    return code


_NEXT_KEEP = sum(1 << k for k in range(27) if (k // 3) % 3 < 2)  # the columns dx = -1, 0 after the shift


@njit(cache=True, nogil=True)
def _code_next(flat, f, previous, plane, line):
    """:func:`_code` of ``f`` from ``previous``, the code of ``f - 1`` in the same mask: its columns move one down
    (the bit of (dz, dx, dy) goes to (dz, dx - 1, dy)) and the new column dx = +1 is read (9 loads, not 27)."""
    code = (previous >> 3) & _NEXT_KEEP
    for dz in range(3):
        for dy in range(3):
            code |= np.int64(flat[f + 1 + (dz - 1) * plane + (dy - 1) * line] & 1) << (9 * dz + 6 + dy)
    return code


@njit(cache=True, nogil=True)
def _dilate(bits):
    """The 26-neighbourhood dilation of a set of a neighbourhood's voxels (shifts along y, x, then z)."""
    bits |= ((bits & ~_Y_HIGH) << 1) | ((bits & ~_Y_LOW) >> 1)
    bits |= ((bits & ~_X_HIGH) << 3) | ((bits & ~_X_LOW) >> 3)
    bits |= (bits << 9) | (bits >> 9)
    return bits & _FULL


@njit(cache=True, nogil=True)
def _simple(code):
    """Whether the neighbourhood's foreground without its centre is at most one 26-connected component."""
    fg = code & ~_CENTRE
    grown = fg & -fg  # the lowest voxel's component, grown until it stops
    while True:
        new = _dilate(grown) & fg
        if new == grown:
            return grown == fg
        grown = new


@njit(cache=True, nogil=True)
def _deletable(code, euler_low, euler_high):
    """Whether a foreground voxel of neighbourhood ``code`` may go, its border aside: not an end point,
    Euler-invariant and simple."""
    rest = code & ~_CENTRE
    if rest != 0 and rest & (rest - 1) == 0:  # one neighbour: an end point (none: Euler keeps it, below)
        return False
    if euler_low[code & 0x3FFFF] + euler_high[code >> 9] != 0:
        return False
    return _simple(code)


# A voxel's byte: bit 0 foreground; bits 1-2 its test, valid while its neighbourhood stays as it was (0 not known,
# 1 on a border but not tested yet, 2 deletable, 3 not deletable); bit 3 listed in the border list.
_FG = 1
_STATE = 6
_BORDERED = 2
_DELETABLE = 4
_KEPT = 6
_LISTED = 8
_FG4 = np.uint32(0x00010101)  # the low three bytes' bit 0, of a word of four
_LISTED4 = np.uint32(0x00080808)
_STATE3 = np.uint32(0x00060606)


@njit(cache=True, nogil=True)
def _border(vox, shape, faces):
    """Every foreground voxel with a background face neighbour, in raster order (listed in ``vox``)."""
    sz, sy, sx = shape
    n = 0
    border = np.empty(1024, np.int32)
    for z in range(1, sz - 1):
        for y in range(1, sy - 1):
            base = (z * sy + y) * sx
            for x in range(1, sx - 1):
                f = base + x
                if vox[f]:
                    for k in range(6):
                        if vox[f + faces[k]] == 0:
                            if n == border.size:
                                border = np.concatenate((border, np.empty(n, np.int32)))
                            border[n] = f
                            vox[f] |= _LISTED
                            n += 1
                            break
    return border[:n]


@njit(cache=True, nogil=True)
def _candidates(vox, border, b, offsets, plane, line, faces, euler_low, euler_high, candidates):
    """A direction's candidates, in raster order, as the mask before its sweep has them. The border list is
    compacted in place: a voxel off the border or not deletable leaves it until its neighbourhood changes.
    Returns (the list's new length, the candidates' count)."""
    n_cand = 0
    kept = 0
    last = -2  # the last voxel whose code was read, and its code
    code = 0
    for i in range(border.size):
        f = border[i]
        v = vox[f]
        state = v & _STATE
        if state == 0:  # its neighbourhood changed: is it still on a border?
            state = _BORDERED
            for k in range(6):
                if (vox[f + faces[k]] & _FG) == 0:
                    break
            else:
                vox[f] = v & ~_LISTED
                continue
        if state == _BORDERED and (vox[f + b] & _FG) == 0:  # tested when its direction comes
            if f == last + 1:
                code = _code_next(vox, f, code, plane, line)
            else:
                code = _code(vox, f, offsets)
            last = f
            state = _DELETABLE if _deletable(code, euler_low, euler_high) else _KEPT
        if state == _KEPT:
            vox[f] = (v & ~(_LISTED | _STATE)) | _KEPT
            continue
        vox[f] = (v & ~_STATE) | state
        border[kept] = f
        kept += 1
        if state == _DELETABLE and (vox[f + b] & _FG) == 0:
            candidates[n_cand] = f
            n_cand += 1
    return kept, n_cand


@njit(cache=True, nogil=True)
def _delete(vox, candidates, offsets, plane, line, fresh):
    """Scikit-image's sequential re-check: delete the candidates still simple (known simple while their
    neighbourhood is unchanged since their test). A deletion makes its neighbours' tests unknown and lists them
    again. Returns (deletions, the count of newly listed voxels in ``fresh``, ``fresh``)."""
    n_del = 0
    n_fresh = 0
    last = -2  # the last voxel whose code was read, and its code (as the mask is now)
    code = 0
    for i in range(candidates.size):
        f = candidates[i]
        if (vox[f] & _STATE) != _DELETABLE:
            if f == last + 1:
                code = _code_next(vox, f, code, plane, line)
            else:
                code = _code(vox, f, offsets)
            last = f
            if not _simple(code):
                continue
            code &= ~_CENTRE  # deleted below: f + 1 reads the code on
        vox[f] = 0
        n_del += 1
        for dz in range(-1, 2):
            for dy in range(-1, 2):
                row = f + dz * plane + dy * line - 1
                word = _load4(vox, row)  # the row's three neighbours in the low bytes, four bytes at once
                join = (word & _FG4) & ~((word & _LISTED4) >> 3)  # foreground and not listed: bit 0 of the byte
                _store4(vox, row, (word & ~_STATE3) | (join << 3))
                while join:
                    lane = join & -join
                    join ^= lane
                    if n_fresh == fresh.size:
                        fresh = np.concatenate((fresh, np.empty(n_fresh, np.int32)))
                    fresh[n_fresh] = row + (1 if lane == 0x100 else (2 if lane == 0x10000 else 0))
                    n_fresh += 1
    return n_del, n_fresh, fresh


@njit(cache=True, nogil=True)
def _merge(vox, border, added):
    """The foreground voxels of two sorted lists, one sorted list."""
    merged = np.empty(border.size + added.size, np.int32)
    a, c, m = 0, 0, 0
    while a < border.size or c < added.size:
        if c == added.size or (a < border.size and border[a] < added[c]):
            f = border[a]
            a += 1
        else:
            f = added[c]
            c += 1
        if vox[f]:
            merged[m] = f
            m += 1
    return merged[:m]


def _thin(vox: np.ndarray, shape: np.ndarray, offsets: np.ndarray, faces: np.ndarray, borders: np.ndarray) -> None:
    """Lee's sweeps on ``vox``, the padded mask flattened (one slack byte after it), changed in place."""
    plane, line = int(shape[1] * shape[2]), int(shape[2])
    border = _border(vox, shape, faces)
    candidates = np.empty(border.size, np.int32)
    fresh = np.empty(1024, np.int32)
    unchanged = 0
    while unchanged < borders.size:
        unchanged = 0
        for b in borders:
            if candidates.size < border.size:
                candidates = np.empty(border.size, np.int32)
            n, n_cand = _candidates(vox, border, b, offsets, plane, line, faces, _EULER_LOW, _EULER_HIGH, candidates)
            n_del, n_fresh, fresh = _delete(vox, candidates[:n_cand], offsets, plane, line, fresh)
            border = _merge(vox, border[:n], np.sort(fresh[:n_fresh]))
            unchanged += n_del == 0


def thin(mask: np.ndarray) -> np.ndarray:
    """Lee's thinning of a 3D mask: ``skimage.morphology.skeletonize(mask)`` for a 3D ``mask``, the same voxels.

    Args:
        mask: (Z, Y, X) array; nonzero is foreground.

    Returns:
        bool array of ``mask``'s shape, True on the skeleton.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        msg = f"thin takes a 3D mask, got shape {mask.shape}"
        raise ValueError(msg)
    if sys.byteorder != "little":  # the four-byte row updates read bytes as a little-endian word
        from skimage.morphology import skeletonize

        return skeletonize(mask.astype(bool))
    shape = np.array(mask.shape, dtype=np.int64) + 2
    vox = np.zeros(int(np.prod(shape)) + 1, dtype=np.uint8)  # the mask padded by one, and a slack byte for the words
    padded = vox[:-1].reshape(shape)
    padded[1:-1, 1:-1, 1:-1] = mask != 0
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    n_borders = 4 if shape[0] == 3 else 6  # a single slice: no z borders (as scikit-image)
    _thin(vox, shape, _DELTAS @ strides, _FACES @ strides, (_BORDERS @ strides)[:n_borders])
    return (padded[1:-1, 1:-1, 1:-1] & _FG).astype(bool)
