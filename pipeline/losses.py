"""Dice + BCE on one-channel logits that ignores an unlabeled label value.

MONAI 1.6.1's ``DiceCELoss`` has no ``ignore_index``; this composes ``DiceLoss`` and BCE over the labeled voxels
only, so label 2 (unlabeled) contributes neither to the loss nor to its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["MaskedDiceBCELoss"]


class MaskedDiceBCELoss(nn.Module):
    """Dice + binary cross-entropy on logits, both restricted to voxels whose label is not ``ignore_index``.

    Args:
        ignore_index: label value excluded from the loss (2 = unlabeled in the competition data).
        lambda_dice: weight of the soft Dice term.
        lambda_bce: weight of the BCE term.
        batch_dice: compute Dice over the whole batch (as nnU-Net does) rather than per sample; steadier on
            patches with little foreground.
        smooth: Dice smoothing added to numerator and denominator.

    Example::

        loss = MaskedDiceBCELoss(ignore_index=2)
        value = loss(logits, labels)  # logits (B, 1, Z, Y, X), labels (B, 1, Z, Y, X) in {0, 1, 2}
    """

    def __init__(
        self,
        ignore_index: int | None = 2,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        batch_dice: bool = True,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce
        self.dice = DiceLoss(sigmoid=False, batch=batch_dice, smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape[1] != 1:
            msg = f"expected one-channel logits (B, 1, ...), got shape {tuple(input.shape)}"
            raise ValueError(msg)
        logits = input.float()
        target = target.to(logits.device)
        valid = (target != self.ignore_index).float() if self.ignore_index is not None else torch.ones_like(logits)
        fg = (target == 1).float()
        prob = torch.sigmoid(logits) * valid
        dice = self.dice(prob, fg * valid)
        bce = F.binary_cross_entropy_with_logits(logits, fg, weight=valid, reduction="sum") / valid.sum().clamp_min(1.0)
        return self.lambda_dice * dice + self.lambda_bce * bce
