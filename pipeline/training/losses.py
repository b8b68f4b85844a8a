"""Dice + BCE on one-channel logits that ignores an unlabeled label value (with an optional skeleton recall term),
and its deep-supervision wrapper.

MONAI 1.6.1's ``DiceCELoss`` has no ``ignore_index``; :class:`MaskedDiceBCELoss` composes ``DiceLoss`` and BCE over
the labeled voxels only, so label 2 (unlabeled) contributes neither to the loss nor to its gradient. Its skeleton
recall term (Kirchhoff et al. 2024, "Skeleton Recall Loss", used by the competition host's nnU-Net baseline)
rewards covering the label's tubed skeleton (``pipeline.data.store.tubed_skeleton``), which a thin sheet must keep to stay
in one piece. :class:`DeepSupervisionLoss` applies a loss to every head of a deeply supervised network (DynUNet)
with nnU-Net's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["DeepSupervisionLoss", "MaskedDiceBCELoss", "deep_supervision_weights"]


class MaskedDiceBCELoss(nn.Module):
    """Dice + binary cross-entropy on logits, both restricted to voxels whose label is not ``ignore_index``, plus
    ``skeleton_recall_weight`` x (1 - soft recall of the skeleton) when that weight is not 0.

    With the skeleton term the target carries the skeleton as a second channel: ``target[:, 0]`` the label,
    ``target[:, 1]`` the tubed skeleton (train.yaml concatenates them after the crop, so augmentation moves both
    and the trainer's ``loss_function(pred, target)`` call is unchanged). The soft recall is
    ``(sum(p * s * valid) + smooth) / (sum(s * valid) + smooth)`` over the whole batch, ``p = sigmoid(logits)``,
    ``valid = label != ignore_index``; a batch without skeleton adds 0. A deep-supervision wrapper that calls this
    loss per head downsamples both channels alike (max-pooling keeps label 2 and the skeleton).

    Args:
        ignore_index: label value excluded from the loss (2 = unlabeled in the competition data).
        lambda_dice: weight of the soft Dice term.
        lambda_bce: weight of the BCE term.
        batch_dice: compute Dice over the whole batch (as nnU-Net does) rather than per sample; steadier on
            patches with little foreground.
        smooth: Dice and recall smoothing added to numerator and denominator.
        skeleton_recall_weight: weight of the skeleton recall term; 0 turns it off (one-channel target).

    Example::

        loss = MaskedDiceBCELoss(ignore_index=2)
        value = loss(logits, labels)  # logits (B, 1, Z, Y, X), labels (B, 1, Z, Y, X) in {0, 1, 2}
        with_skeleton = MaskedDiceBCELoss(skeleton_recall_weight=1.0)
        value = with_skeleton(logits, torch.cat([labels, skeletons], dim=1))
    """

    def __init__(
        self,
        ignore_index: int | None = 2,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        batch_dice: bool = True,
        smooth: float = 1e-5,
        skeleton_recall_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce
        self.smooth = smooth
        self.skeleton_recall_weight = float(skeleton_recall_weight)
        self.dice = DiceLoss(sigmoid=False, batch=batch_dice, smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape[1] != 1:
            msg = f"expected one-channel logits (B, 1, ...), got shape {tuple(input.shape)}"
            raise ValueError(msg)
        channels = 2 if self.skeleton_recall_weight else 1
        if target.shape[1] != channels:
            what = "label and skeleton channels (skeleton_recall_weight > 0)" if channels == 2 else "one label channel"
            msg = f"expected a target with {what}, got shape {tuple(target.shape)}"
            raise ValueError(msg)
        logits = input.float()
        target = target.to(logits.device)
        label = target[:, :1]
        valid = (label != self.ignore_index).float() if self.ignore_index is not None else torch.ones_like(logits)
        fg = (label == 1).float()
        prob = torch.sigmoid(logits) * valid
        dice = self.dice(prob, fg * valid)
        bce = F.binary_cross_entropy_with_logits(logits, fg, weight=valid, reduction="sum") / valid.sum().clamp_min(1.0)
        loss = self.lambda_dice * dice + self.lambda_bce * bce
        if self.skeleton_recall_weight:
            skeleton = target[:, 1:].float() * valid
            recall = ((prob * skeleton).sum() + self.smooth) / (skeleton.sum() + self.smooth)
            loss = loss + self.skeleton_recall_weight * (1.0 - recall)
        return loss


def deep_supervision_weights(heads: int) -> list[float]:
    """nnU-Net's deep-supervision weights for ``heads`` outputs, full resolution first.

    Head ``i`` (resolution 1/2^i) weighs 1/2^i, the lowest-resolution head 0, and the weights are normalised to sum
    to 1 (nnU-Net v2's ``nnUNetTrainer._build_loss``): ``[1.0]`` for one head, ``[1.0, 0.0]`` for two,
    ``[2/3, 1/3, 0]`` for three, ``[4/7, 2/7, 1/7, 0]`` for four.
    """
    if heads < 1:
        msg = f"deep supervision needs at least one head, got {heads}"
        raise ValueError(msg)
    weights = [0.5**i for i in range(heads)]
    if heads > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisionLoss(nn.Module):
    """``loss`` over every head of a deeply supervised output, weighted as nnU-Net does; other outputs pass through.

    MONAI's ``DynUNet`` in training mode returns its heads stacked on dim 1, ``(B, H, C, Z, Y, X)``, head 0 the
    main output, each head already upsampled (nearest neighbour) to the full patch size. Every head is therefore
    compared with the full-resolution label: label 2 ("ignore") is excluded exactly at every scale, voxel by voxel,
    and no label is ever down-sampled (nnU-Net down-samples the label instead, which would have to decide what an
    ignored voxel mixed with labeled ones becomes). An output with the label's number of dimensions (UNet,
    SegResNet, DynUNet in eval mode) is one head: ``loss(input, target)``.

    MONAI's own ``DeepSupervisionLoss`` takes a list of heads, not the stacked tensor, clamps its weights at 1/16
    instead of giving the lowest head 0, does not normalise them and down-samples the target: hence this wrapper.

    The zero-weighted head is still computed (times 0), so that its parameters stay in the autograd graph: DDP
    without ``find_unused_parameters`` requires every parameter to receive a gradient.

    Args:
        loss: the loss of one head, e.g. :class:`MaskedDiceBCELoss`.
        weights: per-head weights; default :func:`deep_supervision_weights`.

    Example::

        loss = DeepSupervisionLoss(MaskedDiceBCELoss(ignore_index=2))
        value = loss(net(x), label)  # net(x): (B, H, 1, Z, Y, X) in training, or (B, 1, Z, Y, X)
    """

    def __init__(self, loss: nn.Module, weights: list[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.weights = list(weights) if weights is not None else None

    def head_weights(self, heads: int) -> list[float]:
        """The weights of ``heads`` heads."""
        if self.weights is None:
            return deep_supervision_weights(heads)
        if len(self.weights) < heads:
            msg = f"{heads} deep-supervision heads but only {len(self.weights)} weights given"
            raise ValueError(msg)
        return self.weights[:heads]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        if input.ndim != target.ndim + 1:
            return self.loss(input, target)
        heads = input.unbind(dim=1)
        weights = self.head_weights(len(heads))
        total = weights[0] * self.loss(heads[0], target)
        for weight, head in zip(weights[1:], heads[1:]):
            total = total + weight * self.loss(head, target)
        return total
