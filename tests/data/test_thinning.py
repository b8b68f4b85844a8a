"""Lee's thinning (``pipeline.data.thinning.thin``) is scikit-image's 3D ``skeletonize``, voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import skeletonize

from pipeline.data.thinning import thin


def _masks(seed: int):
    """Random masks of every kind the sweeps meet: noise, blobs, tilted wavy sheets, solid blocks, thin shapes."""
    rng = np.random.default_rng(seed)
    for case in range(48):
        shape = tuple(int(v) for v in rng.integers(1, 26, 3))
        kind = case % 4
        if kind == 0:
            mask = rng.random(shape) < rng.uniform(0.05, 0.9)
        elif kind == 1:
            mask = ndimage.binary_dilation(rng.random(shape) < 0.05, iterations=int(rng.integers(1, 4)))
        elif kind == 2:
            z, y, x = np.indices(shape)
            wave = np.sin(x / rng.uniform(2, 6)) * rng.uniform(2, 8) + y * rng.uniform(-1, 1) - z * rng.uniform(-1, 1)
            mask = np.abs(wave) < rng.uniform(0.5, 3)
        else:
            mask = np.zeros(shape, bool)
            mask[tuple(slice(int(rng.integers(0, s)), None) for s in shape)] = True
        yield f"{seed}-{case}-{shape}", mask


@pytest.mark.parametrize("seed", [0, 1])
def test_thin_equals_scikit_image(seed: int) -> None:
    for name, mask in _masks(seed):
        assert np.array_equal(thin(mask), skeletonize(mask)), name


def test_thin_of_a_sheet_with_holes_and_a_tube() -> None:
    mask = np.zeros((40, 44, 48), bool)
    z, y, x = np.indices(mask.shape)
    mask |= np.abs(y - 20 - 6 * np.sin(x / 7)) < 3  # a thick wavy sheet
    mask &= ~(((z - 20) ** 2 + (x - 24) ** 2) < 25)  # with a hole
    mask |= ((y - 35) ** 2 + (x - 10) ** 2) < 9  # and a tube along z
    got = thin(mask)
    assert got.any() and np.array_equal(got, skeletonize(mask))
    assert not (got & ~mask).any()


def test_thin_takes_any_3d_array_and_keeps_its_input() -> None:
    rng = np.random.default_rng(3)
    mask = ndimage.binary_dilation(rng.random((12, 14, 16)) < 0.05, iterations=2)
    values = mask.astype(np.uint8) * 3  # nonzero is foreground
    view = np.asfortranarray(values).transpose(2, 0, 1)  # not C-contiguous
    expect = skeletonize(view.astype(bool))
    kept = view.copy()
    assert np.array_equal(thin(view), expect) and np.array_equal(view, kept)
    assert thin(np.zeros((3, 4, 5), bool)).shape == (3, 4, 5) and not thin(np.zeros((3, 4, 5))).any()
    assert np.array_equal(thin(np.ones((1, 1, 1), bool)), skeletonize(np.ones((1, 1, 1), bool)))
    with pytest.raises(ValueError, match="3D mask"):
        thin(np.ones((4, 4), bool))
