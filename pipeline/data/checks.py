"""Settings that cannot work, refused before training starts with one line saying what to change.

Without these checks a patch size the UNet cannot halve evenly fails in every iteration (``Sizes of tensors must
match``), and a patch larger than every volume trains on padding only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pipeline.data.datalist import check_volume_shape
from pipeline.utils.errors import SettingsError
from transforms.io import read_volume_shape

__all__ = ["check_patch_size", "check_training_settings"]


def check_patch_size(patch_size: Sequence[int], network_strides: Sequence[int], key: str = "patch_size") -> None:
    """Refuse a patch (or sliding-window roi) that the network's down-sampling cannot divide.

    Args:
        patch_size: (Z, Y, X) in voxels.
        network_strides: the UNet's strides; their product is the total stride.
        key: the setting's name, for the message.

    Raises:
        SettingsError: a size that is not a positive multiple of the total stride.
    """
    total = math.prod(int(s) for s in network_strides)
    sizes = [int(p) for p in patch_size]
    if len(sizes) != 3 or any(p < total or p % total for p in sizes):
        fixed = [max(total, p // total * total) for p in sizes]
        msg = (
            f"{key} {sizes}: every size must be a multiple of {total}, the network's total stride "
            f"(network_strides {list(network_strides)}); use e.g. --{key} \"{fixed}\""
        )
        raise SettingsError(msg)


def check_training_settings(
    patch_size: Sequence[int], network_strides: Sequence[int], cases: Sequence[Mapping[str, str]]
) -> None:
    """Refuse training settings that cannot work on ``cases``: a patch the network cannot divide, or a patch larger
    than every training volume along an axis (every crop would be mostly padding).

    Args:
        patch_size: the training patch (Z, Y, X).
        network_strides: the UNet's strides.
        cases: the training datalist (dicts with ``image``); shapes are read from the headers only.

    Raises:
        SettingsError: the first problem, with the value to use instead.
        DatasetError: a training image that is not a 3D volume (or too small), naming the file.
    """
    check_patch_size(patch_size, network_strides)
    if not cases:
        return
    shapes = [read_volume_shape(c["image"]) for c in cases]
    for case, shape in zip(cases, shapes, strict=True):  # before any volume is decoded: a 2D image is named here
        check_volume_shape(case["image"], shape)
    largest = [max(s[axis] for s in shapes) for axis in range(3)]
    too_big = [axis for axis in range(3) if int(patch_size[axis]) > largest[axis]]
    if too_big:
        total = math.prod(int(s) for s in network_strides)
        fixed = [min(int(p), max(total, n // total * total)) for p, n in zip(patch_size, largest, strict=True)]
        msg = (
            f"patch_size {list(patch_size)} is larger than every training volume along axis {too_big} (largest "
            f"volume extents {largest}): crops would be mostly padding; use e.g. --patch_size \"{fixed}\""
        )
        raise SettingsError(msg)
