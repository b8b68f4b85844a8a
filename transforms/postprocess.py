"""Topology post-processing of predicted surface probabilities.

Each transform has an array form (channel-first ``(C, Z, Y, X)`` numpy array or torch tensor in, same type out,
every channel processed independently) and a dictionary twin (suffix ``d``). Binary inputs treat any non-zero voxel
as foreground. :func:`build_postprocessing` chains them from probabilities to a ``uint8`` mask: binarise, close,
plug holes, drop dust.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence

import cc3d
import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import Compose, MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy
from scipy import ndimage

__all__ = [
    "BinaryClosing",
    "BinaryClosingd",
    "FillSheetHoles",
    "FillSheetHolesd",
    "HysteresisThreshold",
    "HysteresisThresholdd",
    "RemoveSmallComponents",
    "RemoveSmallComponentsd",
    "build_postprocessing",
]

_CC3D_CONNECTIVITIES = (6, 18, 26)


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in _CC3D_CONNECTIVITIES:
        msg = f"connectivity must be one of {_CC3D_CONNECTIVITIES}, got {connectivity}."
        raise ValueError(msg)


def _apply_per_channel(
    img: NdarrayOrTensor, fn: Callable[[np.ndarray], np.ndarray], dtype: np.dtype | type | None = None
) -> NdarrayOrTensor:
    """Run ``fn`` on each 3D channel of ``img`` as numpy and return the result in ``img``'s type and device.

    Args:
        img: channel-first ``(C, Z, Y, X)`` array or tensor.
        fn: maps one ``(Z, Y, X)`` numpy channel to an array of the same shape.
        dtype: output dtype; ``None`` keeps ``img``'s dtype.

    Returns:
        The stacked per-channel results, same container type (and MetaTensor metadata) as ``img``.

    Raises:
        ValueError: when ``img`` is not 4D.
    """
    if img.ndim != 4:
        msg = f"expected a channel-first (C, Z, Y, X) input, got shape {tuple(img.shape)}."
        raise ValueError(msg)
    img_np = convert_to_numpy(img)
    out = np.stack([fn(channel) for channel in img_np])
    out, *_ = convert_to_dst_type(out, img, dtype=img_np.dtype if dtype is None else dtype)
    return out


class HysteresisThreshold(Transform):
    """Binarise probabilities with hysteresis: keep weak voxels connected to a strong one.

    A voxel is foreground when its probability is ``>= low`` and its connected component of ``>= low`` voxels
    contains at least one voxel ``>= high``. With ``low == high`` this is a plain threshold (computed without
    labelling), so the same transform serves both cases.

    Args:
        low: weak threshold; every foreground voxel is ``>= low``.
        high: strong threshold; a weak component survives only if it reaches ``high``.
        connectivity: neighbourhood for the weak components (6, 18 or 26).

    Raises:
        ValueError: when ``low > high`` or ``connectivity`` is not 6, 18 or 26.

    Example::

        import torch
        from transforms.postprocess import HysteresisThreshold

        probs = torch.rand(1, 32, 32, 32)
        mask = HysteresisThreshold(low=0.3, high=0.85)(probs)  # torch.uint8, shape (1, 32, 32, 32)
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, low: float, high: float, connectivity: int = 26) -> None:
        if low > high:
            msg = f"hysteresis needs low <= high, got low={low}, high={high}."
            raise ValueError(msg)
        _check_connectivity(connectivity)
        self.low = low
        self.high = high
        self.connectivity = connectivity

    def _threshold(self, probs: np.ndarray) -> np.ndarray:
        weak = probs >= self.low
        if self.low == self.high:
            return weak
        labels, n_labels = cc3d.connected_components(weak, connectivity=self.connectivity, return_N=True)
        # Lookup table over component ids: a component is kept when any of its voxels is strong.
        keep = np.zeros(n_labels + 1, dtype=bool)
        keep[labels[probs >= self.high]] = True
        return keep[labels]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Binarise ``img``.

        Args:
            img: probabilities, channel-first ``(C, Z, Y, X)``.

        Returns:
            A 0/1 ``uint8`` mask of the same shape and container type.
        """
        return _apply_per_channel(img, self._threshold, dtype=np.uint8)


class RemoveSmallComponents(Transform):
    """Drop foreground connected components smaller than ``min_size`` voxels (``cc3d.dust``).

    Args:
        min_size: components with fewer voxels are set to 0; ``0`` or ``1`` keeps everything.
        connectivity: neighbourhood defining a component (6, 18 or 26). 6 matches the TopoScore's foreground
            components; run :class:`FillSheetHoles` first so diagonally touching sheet pieces count as one.

    Raises:
        ValueError: when ``min_size`` is negative or ``connectivity`` is not 6, 18 or 26.

    Example::

        import numpy as np
        from transforms.postprocess import RemoveSmallComponents

        mask = np.zeros((1, 32, 32, 32), dtype=np.uint8)
        mask[0, 4:20, 4:20, 10] = 1  # 256-voxel sheet, kept
        mask[0, 25, 25, 25] = 1  # speck, dropped
        cleaned = RemoveSmallComponents(min_size=20)(mask)
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, min_size: int, connectivity: int = 6) -> None:
        if min_size < 0:
            msg = f"min_size must be >= 0, got {min_size}."
            raise ValueError(msg)
        _check_connectivity(connectivity)
        self.min_size = min_size
        self.connectivity = connectivity

    def _dust(self, mask: np.ndarray) -> np.ndarray:
        return cc3d.dust(mask, threshold=self.min_size, connectivity=self.connectivity, binary_image=True)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Remove small components from ``img``.

        Args:
            img: binary mask, channel-first ``(C, Z, Y, X)``.

        Returns:
            ``img`` with small components zeroed; shape, dtype, values and container type kept.
        """
        return _apply_per_channel(img, self._dust)


def _window(axes: Sequence[int], offsets: Sequence[int]) -> tuple[slice, ...]:
    """Slices selecting, along each of ``axes``, voxel ``i + offset`` for ``i`` in ``[0, n - 1)`` (3D arrays)."""
    index = [slice(None)] * 3
    for axis, offset in zip(axes, offsets, strict=True):
        index[axis] = slice(offset, None) if offset else slice(0, -1)
    return tuple(index)


def _plug_pinholes(mask: np.ndarray, min_axes: int) -> np.ndarray:
    """Set background voxels with foreground on both sides along at least ``min_axes`` axes."""
    between = np.zeros(mask.shape, dtype=np.uint8)
    for axis in range(3):
        before, centre, after = ([slice(None)] * 3 for _ in range(3))
        before[axis], centre[axis], after[axis] = slice(0, -2), slice(1, -1), slice(2, None)
        between[tuple(centre)] += mask[tuple(before)] & mask[tuple(after)]
    return mask | (between >= min_axes)


def _bridge_diagonals(mask: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Give every diagonal-only contact within a 2x2 (or 2x2x2) block over ``axes`` a 6-connected path.

    Two opposite corners of the block that are foreground while every other voxel of the block is background
    touch only diagonally; the path from one to the other flipping one axis at a time is set to foreground.
    """
    corners = list(itertools.product((0, 1), repeat=len(axes)))
    views = {corner: mask[_window(axes, corner)] for corner in corners}
    count = views[corners[0]].astype(np.uint8)
    for corner in corners[1:]:
        count += views[corner]
    two_in_block = count == 2
    out = mask.copy()
    # product() lists the corners with a leading 0 first: one per opposite pair.
    for start in corners[: len(corners) // 2]:
        isolated = two_in_block & views[start] & views[tuple(1 - i for i in start)]
        step = list(start)
        for i in range(len(axes) - 1):
            step[i] = 1 - step[i]
            out[_window(axes, step)] |= isolated
    return out


class FillSheetHoles(Transform):
    """Plug 1-voxel holes and diagonal-only contacts so predicted sheets are 6-connected and watertight.

    The TopoScore counts foreground components with 6-connectivity (background 26-connected), so a 1-voxel
    pinhole in a sheet is a tunnel and two sheet voxels touching only along an edge or a corner are separate
    pieces with a gap the background leaks through. One pass applies, in order:

    1. **Pinholes**: a background voxel becomes foreground when, along at least ``min_axes`` of the 3 axes, both
       of its 6-neighbours on that axis are foreground. With ``min_axes=2`` this plugs a 1-voxel hole in a sheet
       (foreground on both sides in-plane) but not the 1-voxel gap between two parallel sheets (one axis only),
       nor a hole 2 or more voxels long in either in-plane direction, nor concave corners.
    2. **Edge diagonals**: in every 2x2 square (in each of the 3 axis planes) holding exactly two diagonally
       opposite foreground voxels, one of the two other voxels (the one reached by first stepping along the
       lower axis) becomes foreground.
    3. **Corner diagonals**: in every 2x2x2 cube holding exactly two opposite-corner foreground voxels, the two
       voxels of the path stepping Z then Y become foreground.

    Passes repeat until nothing changes or ``max_iter`` passes are done; foreground is never removed.

    Args:
        min_axes: number of axes (1 to 3) along which a background voxel must be flanked to be plugged.
            1 also closes gaps between parallel sheets; 3 plugs only voxels enclosed on all sides.
        bridge_diagonals: also apply steps 2 and 3.
        max_iter: upper bound on the number of passes.

    Raises:
        ValueError: when ``min_axes`` is not in 1..3 or ``max_iter < 1``.

    Example::

        import numpy as np
        from transforms.postprocess import FillSheetHoles

        mask = np.zeros((1, 16, 16, 16), dtype=np.uint8)
        mask[0, 8, 2:14, 2:14] = 1
        mask[0, 8, 7, 7] = 0  # pinhole
        assert FillSheetHoles()(mask)[0, 8, 7, 7] == 1
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, min_axes: int = 2, bridge_diagonals: bool = True, max_iter: int = 3) -> None:
        if min_axes not in (1, 2, 3):
            msg = f"min_axes must be 1, 2 or 3, got {min_axes}."
            raise ValueError(msg)
        if max_iter < 1:
            msg = f"max_iter must be >= 1, got {max_iter}."
            raise ValueError(msg)
        self.min_axes = min_axes
        self.bridge_diagonals = bridge_diagonals
        self.max_iter = max_iter

    def _fill(self, channel: np.ndarray) -> np.ndarray:
        mask = channel != 0
        for _ in range(self.max_iter):
            filled = _plug_pinholes(mask, self.min_axes)
            if self.bridge_diagonals:
                for axes in itertools.combinations(range(3), 2):
                    filled = _bridge_diagonals(filled, axes)
                filled = _bridge_diagonals(filled, (0, 1, 2))
            if np.array_equal(filled, mask):
                break
            mask = filled
        return np.where(mask, np.ones_like(channel), channel)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Plug holes in ``img``.

        Args:
            img: binary mask, channel-first ``(C, Z, Y, X)``.

        Returns:
            ``img`` with plugged voxels set to 1; shape, dtype and container type kept.
        """
        return _apply_per_channel(img, self._fill)


class BinaryClosing(Transform):
    """Morphological closing with a ball of ``radius`` voxels (``scipy.ndimage.binary_closing``).

    The mask is edge-padded by ``radius`` first: scipy's erosion treats outside voxels as background, which
    would otherwise leave gaps that touch the volume border open.

    Args:
        radius: ball radius in voxels (``1`` is the 6-neighbourhood cross); ``0`` returns the input unchanged.

    Raises:
        ValueError: when ``radius`` is negative.

    Example::

        import numpy as np
        from transforms.postprocess import BinaryClosing

        mask = np.zeros((1, 16, 16, 16), dtype=np.uint8)
        mask[0, 4:12, 4:12, 2:7] = mask[0, 4:12, 4:12, 8:13] = 1  # 1-voxel gap at x=7
        assert BinaryClosing(radius=1)(mask)[0, 8, 8, 7] == 1
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, radius: int) -> None:
        if radius < 0:
            msg = f"radius must be >= 0, got {radius}."
            raise ValueError(msg)
        self.radius = radius
        grid = np.ogrid[(slice(-radius, radius + 1),) * 3]
        self.structure = sum(g**2 for g in grid) <= radius**2

    def _close(self, channel: np.ndarray) -> np.ndarray:
        if self.radius == 0:
            return channel
        r = self.radius
        padded = np.pad(channel != 0, r, mode="edge")
        closed = ndimage.binary_closing(padded, structure=self.structure)[r:-r, r:-r, r:-r]
        return np.where(closed, np.ones_like(channel), channel)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Close ``img``.

        Args:
            img: binary mask, channel-first ``(C, Z, Y, X)``.

        Returns:
            The closed mask (a superset of ``img``); shape, dtype and container type kept.
        """
        return _apply_per_channel(img, self._close)


class _ArrayTransformd(MapTransform):
    """Apply ``self.transform`` (set by subclasses) to every selected key."""

    transform: Transform

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class HysteresisThresholdd(_ArrayTransformd):
    """Dictionary-based wrapper of :class:`HysteresisThreshold`.

    Args:
        keys: keys of the probability maps to binarise.
        low: weak threshold.
        high: strong threshold.
        connectivity: neighbourhood for the weak components (6, 18 or 26).
        allow_missing_keys: don't raise when a key is missing.

    Example::

        post = HysteresisThresholdd(keys="pred", low=0.3, high=0.85)
        data = post({"pred": probs})
    """

    backend = HysteresisThreshold.backend

    def __init__(
        self, keys: KeysCollection, low: float, high: float, connectivity: int = 26, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = HysteresisThreshold(low=low, high=high, connectivity=connectivity)


class RemoveSmallComponentsd(_ArrayTransformd):
    """Dictionary-based wrapper of :class:`RemoveSmallComponents`.

    Args:
        keys: keys of the masks to clean.
        min_size: components with fewer voxels are removed.
        connectivity: neighbourhood defining a component (6, 18 or 26).
        allow_missing_keys: don't raise when a key is missing.

    Example::

        post = RemoveSmallComponentsd(keys="pred", min_size=20_000)
    """

    backend = RemoveSmallComponents.backend

    def __init__(
        self, keys: KeysCollection, min_size: int, connectivity: int = 6, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = RemoveSmallComponents(min_size=min_size, connectivity=connectivity)


class FillSheetHolesd(_ArrayTransformd):
    """Dictionary-based wrapper of :class:`FillSheetHoles`.

    Args:
        keys: keys of the masks to plug.
        min_axes: number of axes along which a background voxel must be flanked to be plugged.
        bridge_diagonals: also make diagonal-only contacts 6-connected.
        max_iter: upper bound on the number of passes.
        allow_missing_keys: don't raise when a key is missing.

    Example::

        post = FillSheetHolesd(keys="pred")
    """

    backend = FillSheetHoles.backend

    def __init__(
        self,
        keys: KeysCollection,
        min_axes: int = 2,
        bridge_diagonals: bool = True,
        max_iter: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = FillSheetHoles(min_axes=min_axes, bridge_diagonals=bridge_diagonals, max_iter=max_iter)


class BinaryClosingd(_ArrayTransformd):
    """Dictionary-based wrapper of :class:`BinaryClosing`.

    Args:
        keys: keys of the masks to close.
        radius: ball radius in voxels.
        allow_missing_keys: don't raise when a key is missing.

    Example::

        post = BinaryClosingd(keys="pred", radius=1)
    """

    backend = BinaryClosing.backend

    def __init__(self, keys: KeysCollection, radius: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = BinaryClosing(radius=radius)


def build_postprocessing(
    threshold: float = 0.5,
    hysteresis_low: float | None = None,
    hysteresis_high: float | None = None,
    min_size: int | None = None,
    plug_holes: bool = True,
    closing_radius: int | None = None,
    keys: KeysCollection | None = None,
) -> Compose:
    """Chain the post-processing from probabilities to a 0/1 ``uint8`` mask.

    Steps, in order (each skipped when its argument is ``None``, ``0`` or ``False``):

    1. binarise: :class:`HysteresisThreshold` with ``low = hysteresis_low or threshold`` and
       ``high = hysteresis_high`` when ``hysteresis_high`` is set, else a plain ``probs >= threshold``;
    2. :class:`BinaryClosing` with ``closing_radius``;
    3. :class:`FillSheetHoles` when ``plug_holes``;
    4. :class:`RemoveSmallComponents` with ``min_size`` (6-connected), last so pieces joined by the steps
       above are measured whole.

    Args:
        threshold: probability threshold for plain binarisation, and the hysteresis low threshold by default.
        hysteresis_low: weak hysteresis threshold; defaults to ``threshold``.
        hysteresis_high: strong hysteresis threshold; unset means no hysteresis.
        min_size: minimum component size in voxels.
        plug_holes: plug pinholes and diagonal-only contacts.
        closing_radius: ball radius of the morphological closing.
        keys: ``None`` builds array transforms; otherwise the dictionary twins on these keys.

    Returns:
        The composed transform.

    Example::

        post = build_postprocessing(hysteresis_low=0.3, hysteresis_high=0.85, min_size=20_000, closing_radius=1)
        mask = post(probs)  # probs: (1, Z, Y, X) -> uint8 mask, same type as probs
    """
    low = hysteresis_low or threshold
    high = hysteresis_high or low
    steps: list[Transform] = [
        HysteresisThreshold(low, high) if keys is None else HysteresisThresholdd(keys, low, high)
    ]
    if closing_radius:
        steps.append(BinaryClosing(closing_radius) if keys is None else BinaryClosingd(keys, closing_radius))
    if plug_holes:
        steps.append(FillSheetHoles() if keys is None else FillSheetHolesd(keys))
    if min_size:
        steps.append(RemoveSmallComponents(min_size) if keys is None else RemoveSmallComponentsd(keys, min_size))
    return Compose(steps)
