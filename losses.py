"""Loss for binary segmentation: weighted BCE + soft Dice, both computed from logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over images of 1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth), p = sigmoid(logits).

    Computed per image so a small tumour weighs as much as a large one.
    `smooth` (1.0, in pixels) keeps the ratio defined on slices whose mask
    and prediction are both empty, where the loss is then ~0, and softens
    the gradient when the mask is tiny.

    Args:
        logits: raw network output, shape (N, 1, H, W) or (N, H, W).
        target: {0, 1} mask of the same shape.
        smooth: additive smoothing in numerator and denominator.
    """
    probs = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1).to(probs.dtype)
    intersection = (probs * target).sum(dim=1)
    total = probs.sum(dim=1) + target.sum(dim=1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


class BCEDiceLoss(nn.Module):
    """bce_weight * BCE-with-logits + dice_weight * soft Dice (see `soft_dice_loss`).

    BCE is taken on logits (log-sum-exp form), so it is stable for large
    logits; on an empty mask it still pushes every pixel towards background.

    Args:
        bce_weight: weight of the pixel-wise binary cross-entropy term.
        dice_weight: weight of the soft Dice term.
        smooth: Dice smoothing, in pixels.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return self.bce_weight * bce + self.dice_weight * soft_dice_loss(logits, target, self.smooth)
