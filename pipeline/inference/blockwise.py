"""Block-wise Gaussian sliding-window inference that reproduces whole-volume ``SlidingWindowInferer`` exactly.

MONAI's sliding window lays one grid of windows over the whole (padded) volume and divides the Gaussian-weighted sum
of the window outputs by the sum of the weights. Both sums at a voxel only involve the windows that cover it, so a
block of the output is exact when it sums over the windows of the *global* grid that touch the block: the block is
read with a halo reaching to the far edges of those windows. Mirror TTA (``pipeline.inference.inferers.MirrorTTAInferer``)
runs the window grid on the flipped volume; here the flipped grid is mapped back to the original coordinates, so
each flip sees the same windows it would see on the whole volume.

Windows that straddle a block border are needed by two blocks or more; the outputs of those that reach past the
block's far side on some axis (the only ones a later block in raster order can need) are kept in a bounded LRU cache
(:class:`WindowCache`), so the neighbour along the last axis (and, while the cache holds them, the others) reuses them
instead of running the network again; a cached window is let go once the last block that can need it has used it.
The cache is one preallocated slab of window-sized slots, not a tensor per window: freed small tensors of a few
hundred KiB, interleaved with the batches' own, left glibc's heap fragmented (768^3 volume, 32^3 windows: 1.2 GiB of
window outputs held, 2.6 GiB more free inside malloc and never returned, 4.4 GiB RSS).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from pipeline.utils.amp import autocast_for

__all__ = ["AxisGrid", "BlockwiseSlidingWindow", "WindowCache", "window_grid"]

Reader = Callable[[tuple[slice, ...]], np.ndarray]


@dataclass(frozen=True)
class AxisGrid:
    """The window starts along one axis, in the volume's own coordinates (negative where MONAI pads).

    Attributes:
        size: the volume's length on this axis.
        roi: the window's length.
        starts: first voxel of each window; a window covers ``[start, start + roi)``.
    """

    size: int
    roi: int
    starts: tuple[int, ...]

    def touching(self, lo: int, hi: int) -> list[int]:
        """Starts of the windows that overlap ``[lo, hi)``."""
        return [s for s in self.starts if s < hi and s + self.roi > lo]


def window_grid(size: int, roi: int, overlap: float, flipped: bool = False) -> AxisGrid:
    """The window starts ``monai.inferers.sliding_window_inference`` uses on one axis, as volume coordinates.

    MONAI pads an axis shorter than the window by ``(roi - size) // 2`` zeros in front (the rest behind), uses an
    interval of ``int(roi * (1 - overlap))`` (the whole window when it equals the padded size) and clips the last
    window to the end. With ``flipped`` the grid is the one laid over the axis reversed (mirror TTA), mapped back.

    Args:
        size: the axis length.
        roi: the window length.
        overlap: the overlap fraction, in [0, 1).
        flipped: the grid of the mirrored axis, in the unmirrored coordinates.
    """
    padded = max(size, roi)
    pad_lo = (padded - size) // 2
    interval = roi if roi == padded else max(int(roi * (1 - overlap)), 1)
    starts = [s[0].start - pad_lo for s in dense_patch_slices((padded,), (roi,), (interval,))]
    if flipped:
        starts = [size - s - roi for s in starts]
    return AxisGrid(size=size, roi=roi, starts=tuple(sorted(starts)))


class WindowCache:
    """Weighted window outputs kept for later blocks: an LRU over the slots of a few preallocated slabs.

    The slots (``budget // window bytes`` of them, each one window's output) live in slabs of at most
    :attr:`SLAB_BYTES`, allocated as the slots are first needed and kept until the cache goes; a dropped or evicted
    slot is reused. What the cache holds thus never exceeds ``budget``, and it allocates nothing per window: a
    tensor per window, freed and reallocated among the batches' own buffers, had fragmented glibc's heap (768^3
    volume, 32^3 windows: malloc held 1.2 GiB in use and 2.6 GiB free it never returned; 4.4 GiB RSS). Pinned keys
    (the cached windows of the block being predicted, views of a slab) are never evicted.

    An ensemble gives each model's window its own cache from a share of one budget (``budget / models``): the fused
    per-block probabilities then cost the same cache memory as one model.

    Args:
        budget: bytes the slots may take; below one window's output nothing is kept.

    Example::

        cache = WindowCache(1 << 30)
        cache.put(key, weighted_output)      # copied into a slot; False when every slot is pinned
        view = cache.get(key)                # a view of the slot, valid until the key is evicted or dropped
    """

    SLAB_BYTES = 64 << 20

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._slabs: list[torch.Tensor] = []
        self._shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None
        self._slot_bytes = 1
        self._per_slab = 0
        self._slots: OrderedDict[tuple, int] = OrderedDict()  # key -> slot, least recently used first
        self._free: list[int] = []  # slots allocated and unused, the most recently freed last
        self.pinned: set[tuple] = set()

    def __contains__(self, key: tuple) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[tuple]:
        """The keys held, least recently used first."""
        return iter(list(self._slots))

    @property
    def capacity(self) -> int:
        """Slots the budget allows (0 before the first ``put``)."""
        return 0 if self._shape is None else self.budget // self._slot_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the slabs allocated so far (at most the budget)."""
        return sum(t.nbytes for t in self._slabs)

    @property
    def nbytes(self) -> int:
        """Bytes of the outputs held."""
        return 0 if self._shape is None else len(self._slots) * self._slot_bytes

    def _view(self, slot: int) -> torch.Tensor:
        return self._slabs[slot // self._per_slab][slot % self._per_slab]

    def get(self, key: tuple) -> torch.Tensor:
        """The output stored under ``key``, made the most recently used."""
        self._slots.move_to_end(key)
        return self._view(self._slots[key])

    def pin(self, keys: set[tuple]) -> None:
        """Pin ``keys`` (the cached windows of one block; those not cached are ignored) and make them the most
        recently used, unpinning any others."""
        self.pinned = {k for k in keys if k in self._slots}
        for k in self.pinned:
            self._slots.move_to_end(k)

    def _new_slot(self) -> int | None:
        """A free slot: an unused one, one of a new slab while the budget allows, or the least recently used
        unpinned one; None when every slot is pinned."""
        if self._free:
            return self._free.pop()
        made = sum(t.shape[0] for t in self._slabs)
        if made < self.capacity:
            n = min(self._per_slab, self.capacity - made)
            self._slabs.append(torch.empty((n, *self._shape), dtype=self._dtype))  # type: ignore[misc]
            self._free = list(range(made + n - 1, made, -1))
            return made
        victim = next((k for k in self._slots if k not in self.pinned), None)
        return None if victim is None else self._slots.pop(victim)

    def put(self, key: tuple, out: torch.Tensor) -> bool:
        """Copy ``out`` into a slot; False when the budget is below one window or every slot is pinned."""
        if self._shape is None:
            self._shape, self._dtype = tuple(out.shape), out.dtype
            self._slot_bytes = max(out.nbytes, 1)
            self._per_slab = max(1, self.SLAB_BYTES // self._slot_bytes)
        if tuple(out.shape) != self._shape or out.dtype != self._dtype:
            msg = f"window output {tuple(out.shape)} {out.dtype} does not fit the cache's slots {self._shape} {self._dtype}"
            raise ValueError(msg)
        if key in self._slots:
            self._slots.move_to_end(key)
            return True
        slot = self._new_slot()
        if slot is None:
            return False
        self._view(slot).copy_(out)
        self._slots[key] = slot
        return True

    def drop(self, key: tuple) -> None:
        """Let the slot of ``key`` go (no later block needs it)."""
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free.append(slot)
            self.pinned.discard(key)


class BlockwiseSlidingWindow:
    """Gaussian sliding-window probabilities of one block of a volume, equal to whole-volume inference's.

    ``predict(read, shape, block)`` gives, for the voxels of ``block``, what
    ``pipeline.inference.inferers.make_inferer(roi_size, sw_batch_size, overlap, tta=..., tta_axes=...)`` gives on the whole
    volume (sigmoid of the blended logits, averaged over mirror flips), up to float rounding.

    Args:
        network: the model (eval mode is set here); takes ``(B, 1, *roi)`` and returns ``(B, C, *roi)`` logits.
        roi_size: the window (Z, Y, X).
        overlap: window overlap fraction.
        sw_batch_size: windows per forward pass.
        mode: blending, ``"gaussian"`` or ``"constant"``.
        sigma_scale: the Gaussian's sigma as a fraction of the window (MONAI's default 0.125).
        tta_axes: spatial axes mirrored (all subsets, the empty one included); None or empty: no TTA.
        device: where the network runs; blending is on the CPU.
        amp_dtype: autocast dtype for the forward pass, or None for full precision.
        cache_bytes: bound on the window outputs kept for neighbouring blocks (:class:`WindowCache`'s slab).

    Example::

        sw = BlockwiseSlidingWindow(net, (64, 64, 64), overlap=0.5)
        probs = sw.predict(lambda region: normalised[region], normalised.shape, (slice(0, 128),) * 3)
    """

    def __init__(
        self,
        network: torch.nn.Module,
        roi_size: Sequence[int],
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        mode: str = "gaussian",
        sigma_scale: float = 0.125,
        tta_axes: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        cache_bytes: int = 1 << 30,
    ) -> None:
        if len(roi_size) != 3:
            msg = f"roi_size must have 3 entries (Z, Y, X), got {roi_size}"
            raise ValueError(msg)
        if not 0 <= overlap < 1:
            msg = f"overlap must be in [0, 1), got {overlap}"
            raise ValueError(msg)
        self.network = network.eval()
        self.roi = tuple(int(r) for r in roi_size)
        self.overlap = float(overlap)
        self.sw_batch_size = max(1, int(sw_batch_size))
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.mode = mode
        self.sigma_scale = sigma_scale
        axes = tuple(tta_axes or ())
        self.flips = [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]
        self.cache_bytes = int(cache_bytes)
        self.cache = WindowCache(self.cache_bytes)
        self._weights: dict[tuple[int, ...], torch.Tensor] = {}
        self.windows_run = 0

    def _weight(self, shape: tuple[int, ...]) -> torch.Tensor:
        # MONAI clips the window to the padded volume (``get_valid_patch_size``); that is the roi here as every axis
        # is padded to at least the roi
        if shape not in self._weights:
            self._weights[shape] = compute_importance_map(shape, mode=self.mode, sigma_scale=self.sigma_scale, device="cpu")
        return self._weights[shape]

    def _grids(self, shape: Sequence[int], flip: tuple[int, ...]) -> list[AxisGrid]:
        return [window_grid(int(s), r, self.overlap, flipped=d in flip) for d, (s, r) in enumerate(zip(shape, self.roi))]

    def _batch(
        self, raw: np.ndarray, raw_lo: Sequence[int], starts: Sequence[tuple[int, ...]], mean: float, std: float
    ) -> np.ndarray:
        """The normalised inputs of the windows at ``starts``, ``(sw_batch_size, 1, *roi)`` float32, zero-padded to
        a full batch: a window's output then never depends on how many windows shared its pass.

        ``raw`` is the block's halo inside the volume (stored dtype, from ``raw_lo``); each window is cast and
        z-scored in place on its own (the same float32 operations as on the whole volume), and its part outside the
        volume stays 0, as MONAI pads after normalising. A float32 copy of the whole halo is never made (216 MiB for
        a 256^3 block with 128^3 windows, against 54 MiB of uint8).
        """
        x = np.zeros((self.sw_batch_size, 1, *self.roi), dtype=np.float32)
        for i, st in enumerate(starts):
            a = [max(s, o) for s, o in zip(st, raw_lo)]
            b = [min(s + r, o + n) for s, r, o, n in zip(st, self.roi, raw_lo, raw.shape)]
            view = x[(i, 0, *(slice(p - s, q - s) for p, q, s in zip(a, b, st)))]
            view[...] = raw[tuple(slice(p - o, q - o) for p, q, o in zip(a, b, raw_lo))]
            view -= np.float32(mean)
            view /= np.float32(std)
        return x

    def _run(self, batch: np.ndarray, n: int, flip: tuple[int, ...]) -> list[torch.Tensor]:
        """The weighted outputs of the first ``n`` windows of ``batch`` (:meth:`_batch`), in the unflipped frame."""
        dims = [d + 2 for d in flip]
        x = torch.from_numpy(batch).to(self.device)
        if dims:
            x = torch.flip(x, dims)
        with torch.no_grad(), autocast_for(self.device, self.amp_dtype):
            out = self.network(x)
        out = out.float()
        if dims:
            out = torch.flip(out, dims)
        self.windows_run += n
        # weighted once here, as MONAI does (output * importance map), not once per block the window touches; in
        # place on the batch (the same products as one window at a time): the windows are views of it, and the ones
        # kept for later blocks are copied into the cache's slab
        out = out[:n].cpu().mul_(self._weight(self.roi))
        return list(out)

    def predict(
        self, read: Reader, shape: Sequence[int], block: Sequence[slice], mean: float = 0.0, std: float = 1.0
    ) -> np.ndarray:
        """Probabilities of ``block``, shaped ``(C, *block)`` float32.

        Args:
            read: returns the input of a region (slices inside the volume), any real dtype.
            shape: the whole volume's shape (Z, Y, X).
            block: the output region, one slice per axis with explicit start and stop.
            mean: subtracted from the input (``NormalizeIntensity``'s z-score, in float32, in place).
            std: the input is divided by it after ``mean`` is subtracted.
        """
        lo = [int(s.start) for s in block]
        hi = [int(s.stop) for s in block]
        touching = {f: [g.touching(a, b) for g, a, b in zip(self._grids(shape, f), lo, hi)] for f in self.flips}
        # one read of the block with its halo (the union of the windows of every flip), clipped to the volume and in
        # the stored dtype; each batch is cast and normalised from it (``_batch``)
        h_lo = [min(min(t[d]) for t in touching.values()) for d in range(3)]
        h_hi = [max(max(t[d]) for t in touching.values()) + r for d, r in zip(range(3), self.roi)]
        inner = tuple(slice(max(a, 0), min(b, int(s))) for a, b, s in zip(h_lo, h_hi, shape))
        raw = np.asarray(read(inner))
        raw_lo = [i.start for i in inner]
        weight = self._weight(self.roi)
        total: torch.Tensor | None = None
        cache = self.cache
        for flip in self.flips:
            starts = list(itertools.product(*touching[flip]))
            # a window reaching past the block's far side on an axis (not the volume's end) is needed by a later
            # block in raster order; the others never again
            later = {st for st in starts if any(s + r > b < n for s, r, b, n in zip(st, self.roi, hi, shape))}
            # cached outputs are pinned for this block: the ones computed below may not evict them from the cache
            hits = {st for st in starts if (flip, st) in cache}
            cache.pin({(flip, st) for st in hits})
            todo = [st for st in starts if st not in hits]
            pending: dict[tuple[int, ...], torch.Tensor] = {}
            num = den = None
            # summed in the grid's order whatever was cached, and each window run in a full batch (padded), so a
            # block's result does not depend on what ran before it (a resumed run equals an uninterrupted one)
            try:
                for st in starts:
                    if st in hits:
                        out = cache.get((flip, st))
                    else:
                        if st not in pending:
                            chunk, todo = todo[: self.sw_batch_size], todo[self.sw_batch_size :]
                            batch = self._batch(raw, raw_lo, chunk, mean, std)
                            for c, o in zip(chunk, self._run(batch, len(chunk), flip)):
                                pending[c] = o
                                if c in later:
                                    cache.put((flip, c), o)
                        out = pending.pop(st)
                    if num is None:
                        num = torch.zeros((out.shape[0], *(b - a for a, b in zip(lo, hi))), dtype=torch.float32)
                        den = torch.zeros((1, *num.shape[1:]), dtype=torch.float32)
                    src = tuple(slice(max(a - s, 0), min(b - s, r)) for s, a, b, r in zip(st, lo, hi, self.roi))
                    dst = tuple(slice(max(s - a, 0), min(s + r, b) - a) for s, a, b, r in zip(st, lo, hi, self.roi))
                    num[(slice(None), *dst)] += out[(slice(None), *src)]
                    den[(slice(None), *dst)] += weight[src]
                    if st in hits:
                        cache.pinned.discard((flip, st))
                        if st not in later:
                            cache.drop((flip, st))
            finally:
                cache.pin(set())
            probs = num.div_(den).sigmoid_()
            del den
            total = probs if total is None else total.add_(probs)
        return total.div_(len(self.flips)).numpy()
