from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, NormalizeIntensityd, SpatialCropd

from transforms.intensity import CacheBoundary, NormalizeWithStatsd, VolumeStatsd


def _volume():
    return {"image": torch.as_tensor(np.random.default_rng(0).integers(0, 255, (1, 9, 10, 11)).astype(np.uint8))}


def test_patch_normalised_with_volume_stats_equals_whole_volume_zscore():
    data = _volume()
    reference = NormalizeIntensityd("image")(dict(data))["image"][:, 2:7, 1:8, 3:9]
    crop = SpatialCropd("image", roi_start=(2, 1, 3), roi_end=(7, 8, 9))
    out = NormalizeWithStatsd("image")(crop(VolumeStatsd("image")(data)))["image"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.as_tensor(reference, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_cache_holds_the_stored_dtype_and_fetch_is_normalised():
    ds = CacheDataset([_volume()], transform=Compose([VolumeStatsd("image"), CacheBoundary(), NormalizeWithStatsd("image")]),
                      progress=False)
    assert ds._cache[0]["image"].dtype == torch.uint8  # cached as read: a quarter of float32
    item = ds[0]
    assert item["image"].dtype == torch.float32
    assert abs(float(item["image"].mean())) < 1e-4 and abs(float(item["image"].std(unbiased=False)) - 1) < 1e-4


def test_missing_stats_is_a_clear_error():
    with pytest.raises(KeyError, match=r"run VolumeStatsd\('image'\) before"):
        NormalizeWithStatsd("image")(_volume())
