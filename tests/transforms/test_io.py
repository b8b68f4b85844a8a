from __future__ import annotations

import numpy as np
import pytest
import tifffile
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from transforms.io import (
    TiffReader,
    VolumeError,
    read_volume,
    read_volume_shape,
    write_volume,
)


@pytest.mark.parametrize("compression", ["lzw", "zlib", None])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_roundtrip_keeps_zyx_and_dtype(tmp_path, compression, dtype):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 200, size=(5, 7, 9)).astype(dtype)
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, compression=compression)
    out = read_volume(path)
    assert out.dtype == dtype and out.shape == (5, 7, 9)
    np.testing.assert_array_equal(out, vol)
    assert read_volume_shape(path) == (5, 7, 9)


def test_multipage_without_series_metadata(tmp_path):
    vol = np.arange(4 * 6 * 5, dtype=np.uint8).reshape(4, 6, 5)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as w:
        for page in vol:  # one 2D page at a time, no shaped-series metadata
            w.write(page, contiguous=False, metadata=None)
    np.testing.assert_array_equal(read_volume(path), vol)
    assert read_volume_shape(path) == vol.shape


def test_write_volume_is_lzw_uint8_and_atomic(tmp_path):
    mask = np.zeros((6, 5, 7), dtype=bool)
    mask[2:4, 1:3, 3:6] = True
    path = write_volume(tmp_path / "m.tif", mask)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
        arr = tif.asarray()
    assert arr.dtype == np.uint8 and arr.shape == mask.shape
    np.testing.assert_array_equal(arr, mask.astype(np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["m.tif"]  # no temporary left behind


def test_write_volume_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="3D"):
        write_volume(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 range"):
        write_volume(tmp_path / "b.tif", np.full((2, 2, 2), 300, np.int32))
    assert not any(tmp_path.iterdir())


def test_2d_and_unreadable_files_name_the_file(tmp_path):
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((8, 8), np.uint8))
    with pytest.raises(VolumeError, match=r"flat\.tif.*3D"):
        read_volume(flat)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(VolumeError, match=r"junk\.tif.*cannot read"):
        read_volume(junk)
    with pytest.raises(VolumeError, match="not found"):
        read_volume(tmp_path / "missing.tif")


def test_monai_loadimaged_with_tiff_and_nifti(tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(1).integers(0, 255, size=(6, 8, 10)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "v.tif", vol, compression="lzw")
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    load = Compose([LoadImaged("image", reader=TiffReader()), EnsureChannelFirstd("image", channel_dim="no_channel")])
    out = load({"image": str(tmp_path / "v.tif")})["image"]
    assert tuple(out.shape) == (1, 6, 8, 10)
    np.testing.assert_array_equal(out[0].numpy(), vol)
    # NIfTI falls through to MONAI's own nibabel reader
    nii = load({"image": str(tmp_path / "v.nii.gz")})["image"]
    assert tuple(nii.shape) == (1, 6, 8, 10)
    np.testing.assert_array_equal(nii[0].numpy(), vol)
