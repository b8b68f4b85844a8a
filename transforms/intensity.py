"""Per-volume z-scoring split in two, so that ``CacheDataset`` holds volumes in their stored dtype.

``NormalizeIntensityd`` before the cache makes every cached volume float32: four times the uint8 it was read as
(806 Kaggle volumes of 320^3 are about 26 GB as uint8, 106 GB as float32). ``VolumeStatsd`` runs in the cached
part and records each volume's mean and standard deviation; ``NormalizeWithStatsd`` z-scores with them after
the cache (after the patch crop in training), so the network sees exactly what whole-volume z-scoring gives.
``CacheBoundary`` ends the cached part explicitly where no random transform does (validation): ``CacheDataset``
caches the leading ``Transform`` objects and stops at the first callable that is not one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["VolumeStatsd", "NormalizeWithStatsd", "CacheBoundary"]


class VolumeStatsd(MapTransform):
    """Store each volume's intensity mean and standard deviation as ``<key><stats_postfix>`` (a float32 tensor
    ``[mean, std]``), leaving the volume itself untouched (uint8 stays uint8).

    Args:
        keys: keys of the volumes.
        stats_postfix: suffix of the key the statistics are stored under.
        allow_missing_keys: do not raise on missing keys.

    Example::

        VolumeStatsd("image")({"image": vol})["image_stats"]  # tensor([mean, std])
    """

    def __init__(self, keys: KeysCollection, stats_postfix: str = "_stats", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.stats_postfix = stats_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            arr = np.asarray(d[key].detach().cpu() if isinstance(d[key], torch.Tensor) else d[key])
            d[f"{key}{self.stats_postfix}"] = torch.tensor([arr.mean(dtype=np.float64), arr.std(dtype=np.float64)], dtype=torch.float32)
        return d


class NormalizeWithStatsd(MapTransform):
    """Z-score ``key`` with the statistics ``VolumeStatsd`` stored, into float32: ``(x - mean) / std`` (``std``
    floored at ``eps`` for constant volumes). On a patch this equals z-scoring the whole volume, then cropping.

    Args:
        keys: keys of the volumes or patches.
        stats_postfix: suffix of the key holding ``[mean, std]``.
        eps: smallest standard deviation divided by.
        allow_missing_keys: do not raise on missing keys.

    Raises:
        KeyError: no statistics for a key (``VolumeStatsd`` did not run before).
    """

    def __init__(
        self, keys: KeysCollection, stats_postfix: str = "_stats", eps: float = 1e-8, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.stats_postfix = stats_postfix
        self.eps = eps

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            stats_key = f"{key}{self.stats_postfix}"
            if stats_key not in d:
                msg = f"no {stats_key!r} in the data: run VolumeStatsd({key!r}) before NormalizeWithStatsd"
                raise KeyError(msg)
            mean, std = (float(v) for v in d[stats_key])
            img = d[key]
            img = img.to(torch.float32) if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img, dtype=np.float32))
            d[key] = (img - mean) / max(std, self.eps)
        return d


class CacheBoundary:
    """A no-op that ends the part of a transform chain ``CacheDataset`` caches (it caches leading MONAI
    ``Transform`` objects up to the first random transform or the first callable that is not a ``Transform``).

    Example::

        Compose([LoadImaged("image"), VolumeStatsd("image"), CacheBoundary(), NormalizeWithStatsd("image")])
    """

    def __call__(self, data: Any) -> Any:
        return data
