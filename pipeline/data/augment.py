"""Random augmentation on the training device, after the crop: the loader only cuts patches, the GPU augments.

On a fast GPU the CPU loader, not the network, bounds the step when it also flips, rotates and adds noise to every
patch. :class:`DeviceAugment` is a ``prepare_batch`` for MONAI's ``SupervisedTrainer``: it moves the collated batch
to the device (non-blocking from pinned memory) and applies a MONAI dictionary transform chain to each sample there
(MONAI's flips, rot90, intensity scale/shift and noise take CUDA tensors). train.yaml uses it on CUDA only
(``augment_on_device``); on the CPU the same chain runs in the loader, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose

__all__ = ["DeviceAugment"]


class DeviceAugment:
    """``prepare_batch`` that moves ``image``/``label`` to the device and augments each sample there.

    The loader may send the target as uint8 (train.yaml does with ``augment_on_device``): it is cast to
    ``target_dtype`` on the device, before the augmentation, so the CPU never converts it and the copy is 4x
    smaller than float32.

    Args:
        transform: a dictionary transform (or a list of them) applied to ``{"image": x, "label": y}`` of each sample.
        keys: the batch keys returned, as (inputs, targets).
        target_dtype: dtype of the targets on the device (None: as sent).

    Example::

        trainer = SupervisedTrainer(..., prepare_batch=DeviceAugment([RandFlipd(["image", "label"], prob=0.5)]))
    """

    def __init__(
        self,
        transform: Callable | list[Callable],
        keys: tuple[str, str] = ("image", "label"),
        target_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        self.transform = Compose(transform) if isinstance(transform, list) else transform
        self.keys = keys
        self.target_dtype = target_dtype

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        moved = [torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking, **kwargs) for k in self.keys]
        if self.target_dtype is not None:
            moved[1] = moved[1].to(self.target_dtype)  # on the device: the loader sent it as it was cut
        outs: list[list[torch.Tensor]] = [[] for _ in self.keys]
        for i in range(moved[0].shape[0]):
            sample = self.transform({k: m[i] for k, m in zip(self.keys, moved, strict=True)})
            for out, k in zip(outs, self.keys, strict=True):
                value = sample[k]
                out.append(value.as_tensor() if isinstance(value, MetaTensor) else value)
        inputs, targets = (torch.stack(o) for o in outs)
        return inputs, targets
