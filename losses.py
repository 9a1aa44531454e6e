"""Loss for binary segmentation: weighted BCE + soft Dice, both computed from logits (+ an optional type term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "none")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   reduction: str = "mean") -> torch.Tensor:
    """1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth) per image, p = sigmoid(logits).

    Computed per image so a small tumour weighs as much as a large one.
    `smooth` (1.0, in pixels) keeps the ratio defined on slices whose mask
    and prediction are both empty, where the loss is then ~0, and softens
    the gradient when the mask is tiny.

    Args:
        logits: raw network output, shape (N, 1, H, W) or (N, H, W).
        target: {0, 1} mask of the same shape.
        smooth: additive smoothing in numerator and denominator.
        reduction: "mean" over the images (a scalar) or "none" (one value per image, shape (N,)).
    """
    probs = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1).to(probs.dtype)
    intersection = (probs * target).sum(dim=1)
    total = probs.sum(dim=1) + target.sum(dim=1)
    return _reduce(1 - (2 * intersection + smooth) / (total + smooth), reduction)


def _check_reduction(reduction: str) -> None:
    """Raise ValueError unless `reduction` is one of REDUCTIONS."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    """`per_image` as it is ("none") or its mean ("mean")."""
    _check_reduction(reduction)
    return per_image.mean() if reduction == "mean" else per_image


class BCEDiceLoss(nn.Module):
    """bce_weight * BCE-with-logits + dice_weight * soft Dice (see `soft_dice_loss`).

    BCE is taken on logits (log-sum-exp form), so it is stable for large
    logits; on an empty mask it still pushes every pixel towards background.
    Both terms are per-image means first, so "mean" over a batch of
    equal-sized images is the plain pixel mean of BCE.

    Args:
        bce_weight: weight of the pixel-wise binary cross-entropy term.
        dice_weight: weight of the soft Dice term.
        smooth: Dice smoothing, in pixels.
        reduction: "mean" over the images, or "none" for one loss per image (hard-example sampling uses them).
        type_weight: weight of the cross-entropy of a type head's logits, added per image when
            `forward` is given them (TYPE_WEIGHT); without them the loss is BCE + Dice alone.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 reduction: str = "mean", type_weight: float = 0.0):
        super().__init__()
        _check_reduction(reduction)  # at construction, not at the first batch
        self.bce_weight, self.dice_weight, self.smooth, self.reduction = bce_weight, dice_weight, smooth, reduction
        self.type_weight = type_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, type_logits: torch.Tensor | None = None,
                type_target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of segmentation `logits` against `target`; plus type_weight x cross-entropy of
        `type_logits` (N, K) against class indices `type_target` (N,) when both are given."""
        bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").flatten(1)
        per_image = (self.bce_weight * bce.mean(dim=1)
                     + self.dice_weight * soft_dice_loss(logits, target, self.smooth, reduction="none"))
        if type_logits is not None and type_target is not None:
            per_image = per_image + self.type_weight * F.cross_entropy(type_logits.float(), type_target,
                                                                       reduction="none")
        return _reduce(per_image, self.reduction)
