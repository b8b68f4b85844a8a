"""Block-wise Gaussian sliding-window inference that reproduces whole-volume ``SlidingWindowInferer`` exactly.

MONAI's sliding window lays one grid of windows over the whole (padded) volume and divides the Gaussian-weighted sum
of the window outputs by the sum of the weights. Both sums at a voxel only involve the windows that cover it, so a
block of the output is exact when it sums over the windows of the *global* grid that touch the block: the block is
read with a halo reaching to the far edges of those windows. Mirror TTA (``pipeline.inference.inferers.MirrorTTAInferer``)
runs the window grid on the flipped volume; here the flipped grid is mapped back to the original coordinates, so
each flip sees the same windows it would see on the whole volume.

Windows that straddle a block border are needed by two blocks; their outputs are kept in a bounded LRU cache, so in
raster order the neighbour along the last axis (and, while the cache holds them, the others) reuses them instead of
running the network again.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from pipeline.utils.amp import autocast_for

__all__ = ["AxisGrid", "window_grid", "BlockwiseSlidingWindow"]

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
        cache_bytes: bound on the window outputs kept for neighbouring blocks.

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
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cached = 0
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

    def _remember(self, key: tuple, out: torch.Tensor) -> None:
        size = out.element_size() * out.nelement()
        if size > self.cache_bytes:
            return
        self._cache[key] = out
        self._cached += size
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.element_size() * old.nelement()

    def _run(self, batch: list[np.ndarray], flip: tuple[int, ...]) -> list[torch.Tensor]:
        # padded to a full batch: a window's output then never depends on how many windows shared its pass
        n = len(batch)
        batch = batch + [np.zeros_like(batch[0])] * (self.sw_batch_size - n)
        dims = [d + 2 for d in flip]
        x = torch.from_numpy(np.stack(batch)[:, None]).to(self.device)
        if dims:
            x = torch.flip(x, dims)
        with torch.no_grad(), autocast_for(self.device, self.amp_dtype):
            out = self.network(x)
        out = out.float()
        if dims:
            out = torch.flip(out, dims)
        self.windows_run += n
        # weighted once here, as MONAI does (output * importance map), not once per block the window touches; one
        # tensor per window (not views of the batch), so the cache's byte count is what it holds
        weight = self._weight(self.roi)
        return [o * weight for o in out[:n].cpu()]

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
        # one read of the block with its halo (the union of the windows of every flip), zero outside the volume
        h_lo = [min(min(t[d]) for t in touching.values()) for d in range(3)]
        h_hi = [max(max(t[d]) for t in touching.values()) + r for d, r in zip(range(3), self.roi)]
        halo = np.zeros([b - a for a, b in zip(h_lo, h_hi)], dtype=np.float32)
        inner = tuple(slice(max(a, 0), min(b, int(s))) for a, b, s in zip(h_lo, h_hi, shape))
        # normalised in place: the zero padding outside the volume stays 0, as MONAI pads after normalising
        view = halo[tuple(slice(i.start - a, i.stop - a) for i, a in zip(inner, h_lo))]
        view[...] = read(inner)
        view -= np.float32(mean)
        view /= np.float32(std)
        weight = self._weight(self.roi)
        total: torch.Tensor | None = None
        for flip in self.flips:
            starts = list(itertools.product(*touching[flip]))
            # cached outputs are pinned for this block: the ones computed below may evict them from the cache
            hits = {st: self._cache[(flip, st)] for st in starts if (flip, st) in self._cache}
            for st in hits:
                self._cache.move_to_end((flip, st))
            todo = [st for st in starts if st not in hits]
            pending: dict[tuple[int, ...], torch.Tensor] = {}
            num = den = None
            # summed in the grid's order whatever was cached, and each window run in a full batch (padded), so a
            # block's result does not depend on what ran before it (a resumed run equals an uninterrupted one)
            for st in starts:
                if st in hits:
                    out = hits.pop(st)
                else:
                    if st not in pending:
                        chunk, todo = todo[: self.sw_batch_size], todo[self.sw_batch_size :]
                        patches = [halo[tuple(slice(s - a, s - a + r) for s, a, r in zip(c, h_lo, self.roi))] for c in chunk]
                        for c, o in zip(chunk, self._run(patches, flip)):
                            pending[c] = o
                            self._remember((flip, c), o)
                    out = pending.pop(st)
                if num is None:
                    num = torch.zeros((out.shape[0], *(b - a for a, b in zip(lo, hi))), dtype=torch.float32)
                    den = torch.zeros((1, *num.shape[1:]), dtype=torch.float32)
                src = tuple(slice(max(a - s, 0), min(b - s, r)) for s, a, b, r in zip(st, lo, hi, self.roi))
                dst = tuple(slice(max(s - a, 0), min(s + r, b) - a) for s, a, b, r in zip(st, lo, hi, self.roi))
                num[(slice(None), *dst)] += out[(slice(None), *src)]
                den[(slice(None), *dst)] += weight[src]
            probs = num.div_(den).sigmoid_()
            del den
            total = probs if total is None else total.add_(probs)
        return total.div_(len(self.flips)).numpy()
