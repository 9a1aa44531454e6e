"""Loss for binary segmentation: weighted BCE + soft Dice (or Tversky), both from logits (+ an optional type term).

With deep supervision the segmentation term is a weighted sum over the
network's outputs at several resolutions (`deep_supervision_weights`), each
against the mask max-pooled to its size (`downsample_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "none")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   reduction: str = "mean", recall_weight: float = 0.5) -> torch.Tensor:
    """1 - (2 sum(p t) + smooth) / (2(1-b) sum p + 2b sum t + smooth) per image, p = sigmoid(logits), b = recall_weight.

    At b = 0.5 (the default) this is soft Dice, 1 - (2 TP + s) / (sum p + sum t + s).
    Otherwise it is the Tversky loss: the denominator equals
    2 TP + 2(1-b) FP + 2b FN, so b > 0.5 charges a missed tumour pixel more
    than a false alarm (b = 0.7: 7 to 3), which rewards recall on faint
    targets. Computed per image so a small tumour weighs as much as a large
    one. `smooth` (1.0, in pixels) keeps the ratio defined on slices whose
    mask and prediction are both empty, and softens the gradient when the
    mask is tiny.

    Args:
        logits: raw network output, shape (N, 1, H, W) or (N, H, W).
        target: {0, 1} mask of the same shape.
        smooth: additive smoothing in numerator and denominator. Keep it above 0: at 0 an empty mask
            scores loss 1 however right the prediction (NaN where every probability underflows to 0).
        reduction: "mean" over the images (a scalar) or "none" (one value per image, shape (N,)).
        recall_weight: b, strictly between 0 and 1: the weight of false negatives against false positives.

    Returns:
        The loss in [0, 1] per image, reduced: ~0 for a confident perfect prediction, an empty mask
        with an empty prediction included (smooth > 0); close to 1 for a confident miss or false
        alarm, less on masks of a few pixels, where `smooth` weighs in (4 tumour pixels missed: 0.8).
        NaN logits give NaN (nothing is checked).

    Raises:
        ValueError: `recall_weight` outside (0, 1), or an unknown `reduction`.
    """
    if not 0 < recall_weight < 1:
        raise ValueError(f"recall_weight must lie strictly between 0 and 1, got {recall_weight}")
    probs = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1).to(probs.dtype)
    intersection = (probs * target).sum(dim=1)
    # FP = sum p - TP and FN = sum t - TP, so 2 TP + 2(1-b) FP + 2b FN needs no TP; at b = 0.5 both factors are 1.
    total = 2 * (1 - recall_weight) * probs.sum(dim=1) + 2 * recall_weight * target.sum(dim=1)
    return _reduce(1 - (2 * intersection + smooth) / (total + smooth), reduction)


def deep_supervision_weights(outputs: int) -> list[float]:
    """Loss weights of `outputs` segmentation outputs, full resolution first: 1, 1/2, 1/4, .. normalised to sum to 1.

    As nnU-Net weights them: each level down counts half the one above, so
    the full-resolution output, the one predictions use, dominates.

    Args:
        outputs: number of outputs, at least 1.

    Returns:
        `outputs` floats summing to 1; one output gets weight 1.0 exactly (the loss without deep
        supervision); 0 outputs give an empty list.
    """
    raw = [0.5**level for level in range(outputs)]
    return [weight / sum(raw) for weight in raw]


def downsample_mask(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """`target` ({0, 1}, (N, 1, H, W) or (N, H, W)) max-pooled to `size` (h, w).

    A coarse pixel is tumour where any pixel of its block is. nnU-Net takes
    the nearest pixel instead; here tumours often cover a few dozen pixels,
    and at 1/8 resolution a nearest-neighbour (or area above 0.5) mask
    would drop them, or keep them by chance of the sampling grid, teaching
    the coarse heads "no tumour" on exactly the slices where small tumours
    are at stake. Max-pooling keeps every tumour, widened by under one
    coarse pixel at its border: a bias only the auxiliary heads see.

    Args:
        target: the full-resolution mask.
        size: (h, w) of the output; sides that do not divide H and W get ceil-sized bins.

    Returns:
        `target` itself (same object and dtype) when it already has that size, otherwise a float mask
        of that size; an empty mask stays empty.
    """
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    # Adaptive pooling: a mask whose side is not a multiple of the level's factor still gets ceil-sized bins.
    return F.adaptive_max_pool2d(target.float(), tuple(size))


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
        recall_weight: the Dice term's weight of missed tumour pixels (`soft_dice_loss`); 0.5 = soft Dice.

    Raises:
        ValueError: an unknown `reduction`, or `recall_weight` outside (0, 1), at construction.

    `forward` also takes a list of logits (deep supervision: full resolution
    first, then coarser): the BCE + Dice terms are then summed over them with
    `deep_supervision_weights`, each against `downsample_mask` of the target;
    the type term is added once.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 reduction: str = "mean", type_weight: float = 0.0, recall_weight: float = 0.5):
        super().__init__()
        _check_reduction(reduction)  # at construction, not at the first batch
        if not 0 < recall_weight < 1:
            raise ValueError(f"recall_weight must lie strictly between 0 and 1, got {recall_weight}")
        self.recall_weight = recall_weight
        self.bce_weight, self.dice_weight, self.smooth, self.reduction = bce_weight, dice_weight, smooth, reduction
        self.type_weight = type_weight

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                type_logits: torch.Tensor | None = None, type_target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of segmentation `logits` against `target`, plus the type term when given.

        Args:
            logits: (N, 1, H, W) logits, or a non-empty list of them, full resolution first (deep supervision).
            target: {0, 1} mask of the full-resolution logits' shape.
            type_logits: (N, K) logits of a type head, or None.
            type_target: (N,) class indices, or None; the type term (type_weight x cross-entropy) is added
                only when both are given.

        Returns:
            A scalar ("mean") or one loss per image ("none"), not negative with non-negative weights:
            near 0 for a confident perfect prediction, also on an empty mask, and large (BCE grows
            linearly with the logit) for a confident error. NaN logits give NaN.
        """
        levels = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        # A single level has weight 1.0 and its own mask: exactly the loss without deep supervision.
        per_image = sum(weight * self._segmentation_loss(level, downsample_mask(target, level.shape[-2:]))
                        for weight, level in zip(deep_supervision_weights(len(levels)), levels, strict=True))
        if type_logits is not None and type_target is not None:
            per_image = per_image + self.type_weight * F.cross_entropy(type_logits.float(), type_target,
                                                                       reduction="none")
        return _reduce(per_image, self.reduction)

    def _segmentation_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """bce_weight x BCE + dice_weight x soft Dice of one output, per image (shape (N,))."""
        bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").flatten(1)
        return (self.bce_weight * bce.mean(dim=1)
                + self.dice_weight * soft_dice_loss(logits, target, self.smooth, reduction="none",
                                                    recall_weight=self.recall_weight))
