"""Tests for transforms.postprocess on tiny constructed volumes with known outcomes."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms.postprocess import (
    BinaryClosing,
    BinaryClosingd,
    FillSheetHoles,
    FillSheetHolesd,
    HysteresisThreshold,
    HysteresisThresholdd,
    RemoveSmallComponents,
    RemoveSmallComponentsd,
    build_postprocessing,
)


def _n_components(mask: np.ndarray | torch.Tensor, connectivity: int = 6) -> int:
    return cc3d.connected_components(np.asarray(mask)[0] != 0, connectivity=connectivity, return_N=True)[1]


def _as(kind: str, array: np.ndarray) -> np.ndarray | torch.Tensor:
    return torch.from_numpy(array) if kind == "torch" else array


def _probs() -> np.ndarray:
    """Weak blob touching a strong voxel, isolated weak blob, isolated strong voxel."""
    probs = np.zeros((1, 12, 12, 12), dtype=np.float32)
    probs[0, 1:4, 1:4, 1:4] = 0.4
    probs[0, 2, 2, 2] = 0.9
    probs[0, 7:10, 7:10, 7:10] = 0.4
    probs[0, 1, 10, 10] = 0.95
    return probs


def _sheet() -> np.ndarray:
    """A 1-voxel-thick Z-sheet (Y, X in 2..17) with a pinhole at (10, 5, 5) and a 4x4 hole."""
    mask = np.zeros((1, 20, 20, 20), dtype=np.uint8)
    mask[0, 10, 2:18, 2:18] = 1
    mask[0, 10, 5, 5] = 0
    mask[0, 10, 10:14, 10:14] = 0
    return mask


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_hysteresis_keeps_weak_blob_touching_strong_voxel(kind: str) -> None:
    out = HysteresisThreshold(low=0.3, high=0.85)(_as(kind, _probs()))
    assert type(out) is type(_as(kind, _probs()))
    assert out.shape == (1, 12, 12, 12)
    assert str(out.dtype).endswith("uint8")
    out = np.asarray(out)
    assert out[0, 1:4, 1:4, 1:4].all()
    assert not out[0, 7:10, 7:10, 7:10].any()
    assert out[0, 1, 10, 10] == 1
    assert out.sum() == 27 + 1


def test_hysteresis_connectivity_decides_diagonal_contact() -> None:
    probs = np.zeros((1, 6, 6, 6), dtype=np.float32)
    probs[0, 1, 1, 1] = 0.9
    probs[0, 2, 2, 2] = 0.4
    assert HysteresisThreshold(0.3, 0.85, connectivity=26)(probs)[0, 2, 2, 2] == 1
    assert HysteresisThreshold(0.3, 0.85, connectivity=6)(probs)[0, 2, 2, 2] == 0


def test_hysteresis_equal_thresholds_is_plain_threshold() -> None:
    probs = np.random.default_rng(0).random((1, 10, 11, 12), dtype=np.float32)
    np.testing.assert_array_equal(HysteresisThreshold(0.5, 0.5)(probs), (probs >= 0.5).astype(np.uint8))


def test_hysteresis_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="low=0.9"):
        HysteresisThreshold(low=0.9, high=0.5)
    with pytest.raises(ValueError, match="connectivity"):
        HysteresisThreshold(0.3, 0.8, connectivity=8)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        HysteresisThreshold(0.3, 0.8)(np.zeros((4, 4, 4), dtype=np.float32))


def test_hysteresis_dict_keeps_metadata() -> None:
    image = MetaTensor(torch.from_numpy(_probs()), meta={"filename_or_obj": "vol.tif"})
    data = HysteresisThresholdd(keys="pred", low=0.3, high=0.85)({"pred": image, "other": 1})
    assert isinstance(data["pred"], MetaTensor)
    assert data["pred"].meta["filename_or_obj"] == "vol.tif"
    assert data["pred"].dtype == torch.uint8
    assert int(data["pred"].sum()) == 28
    assert data["other"] == 1


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.float32])
def test_remove_small_components(kind: str, dtype: type) -> None:
    mask = np.zeros((1, 16, 16, 16), dtype=dtype)
    mask[0, 2:6, 2:6, 2:6] = 1  # 64 voxels
    mask[0, 10:12, 10:12, 10:12] = 1  # 8 voxels
    mask[0, 14, 14, 14] = 1  # 1 voxel
    mask[0, 13, 13, 13] = 1  # 26-adjacent to the previous one, not 6-adjacent
    out = RemoveSmallComponents(min_size=8)(_as(kind, mask))
    assert type(out) is type(_as(kind, mask))
    assert out.shape == mask.shape
    assert out.dtype == _as(kind, mask).dtype
    out = np.asarray(out)
    assert out[0, 2:6, 2:6, 2:6].all()
    assert out[0, 10:12, 10:12, 10:12].all()
    assert out.sum() == 64 + 8


def test_remove_small_components_connectivity_and_dict() -> None:
    mask = np.zeros((1, 8, 8, 8), dtype=np.uint8)
    mask[0, 1, 1, 1] = mask[0, 2, 2, 2] = 1
    assert RemoveSmallComponents(min_size=2, connectivity=26)(mask).sum() == 2
    data = RemoveSmallComponentsd(keys=["pred"], min_size=2)({"pred": torch.from_numpy(mask)})
    assert int(data["pred"].sum()) == 0
    with pytest.raises(ValueError, match="-1"):
        RemoveSmallComponents(min_size=-1)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_fill_sheet_holes_plugs_pinhole_keeps_big_hole(kind: str) -> None:
    mask = _sheet()
    out = FillSheetHoles()(_as(kind, mask))
    assert type(out) is type(_as(kind, mask))
    assert out.shape == mask.shape
    assert str(out.dtype).endswith("uint8")
    out = np.asarray(out)
    assert out[0, 10, 5, 5] == 1
    assert not out[0, 10, 10:14, 10:14].any()
    assert out.sum() == mask.sum() + 1


def test_fill_sheet_holes_leaves_gap_between_parallel_sheets() -> None:
    mask = np.zeros((1, 12, 12, 12), dtype=np.uint8)
    mask[0, 4, 2:10, 2:10] = mask[0, 6, 2:10, 2:10] = 1
    np.testing.assert_array_equal(FillSheetHoles()(mask), mask)
    assert FillSheetHoles(min_axes=1)(mask)[0, 5, 5, 5] == 1


def test_fill_sheet_holes_bridges_diagonal_staircase() -> None:
    mask = np.zeros((1, 14, 14, 14), dtype=np.uint8)
    for k in range(2, 12):
        mask[0, k, 2:12, k] = 1  # sheet stepping one voxel in Z per voxel in X: edge contacts only
    assert _n_components(mask, 6) == 10
    out = FillSheetHoles()(mask)
    assert _n_components(out, 6) == 1
    assert (out >= mask).all()
    assert out.sum() == mask.sum() + 9 * 10
    assert (np.asarray(FillSheetHoles(bridge_diagonals=False)(mask)) == mask).all()


def test_fill_sheet_holes_bridges_corner_contact() -> None:
    mask = np.zeros((1, 6, 6, 6), dtype=bool)
    mask[0, 1, 1, 1] = mask[0, 2, 2, 2] = True
    out = FillSheetHoles()(torch.from_numpy(mask))
    assert out.dtype == torch.bool
    assert _n_components(out, 6) == 1
    assert int(out.sum()) == 4


def test_fill_sheet_holes_dict_and_arguments() -> None:
    data = FillSheetHolesd(keys="pred")({"pred": _sheet()})
    assert data["pred"][0, 10, 5, 5] == 1
    with pytest.raises(ValueError, match="min_axes"):
        FillSheetHoles(min_axes=0)
    with pytest.raises(ValueError, match="max_iter"):
        FillSheetHoles(max_iter=0)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_binary_closing_fills_gap_and_keeps_border(kind: str) -> None:
    mask = np.zeros((1, 16, 16, 16), dtype=np.uint8)
    mask[0, :, 4:12, 0:7] = 1
    mask[0, :, 4:12, 8:16] = 1  # touches the borders, 1-voxel gap at x=7 from z=0 to z=15
    out = BinaryClosing(radius=1)(_as(kind, mask))
    assert type(out) is type(_as(kind, mask))
    assert out.shape == mask.shape
    assert str(out.dtype).endswith("uint8")
    out = np.asarray(out)
    assert out[0, :, 5:11, 7].all()
    assert (out >= mask).all()
    assert (np.asarray(BinaryClosing(radius=0)(mask)) == mask).all()
    data = BinaryClosingd(keys="pred", radius=1)({"pred": mask})
    np.testing.assert_array_equal(data["pred"], out)
    with pytest.raises(ValueError, match="-2"):
        BinaryClosing(radius=-2)


def test_build_postprocessing_steps_on_and_off() -> None:
    probs = np.zeros((1, 20, 20, 20), dtype=np.float32)
    probs[0, 10, 2:18, 2:18] = 0.5  # weak sheet ...
    probs[0, 10, 3, 3] = 0.9  # ... reaching the strong threshold
    probs[0, 10, 5, 5] = 0.1  # pinhole
    probs[0, 3:5, 3:5, 3:5] = 0.7  # 8-voxel blob, weak only under hysteresis

    plain = build_postprocessing(threshold=0.4, plug_holes=False)(probs)
    assert plain.dtype == np.uint8
    assert plain[0, 10, 5, 5] == 0
    assert plain.sum() == 16 * 16 - 1 + 8

    full = build_postprocessing(
        threshold=0.4, hysteresis_high=0.85, min_size=10, plug_holes=True, closing_radius=None
    )(torch.from_numpy(probs))
    assert full.dtype == torch.uint8
    assert int(full.sum()) == 16 * 16
    assert full[0, 10, 5, 5] == 1

    dusted = build_postprocessing(threshold=0.6, min_size=10, plug_holes=False)(probs)
    assert dusted.sum() == 0

    data = build_postprocessing(threshold=0.4, hysteresis_low=0.3, hysteresis_high=0.85, keys="pred")(
        {"pred": probs}
    )
    np.testing.assert_array_equal(data["pred"], np.asarray(full))
