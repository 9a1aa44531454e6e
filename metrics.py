"""Segmentation metrics from thresholded predictions: Dice (primary), IoU, pixel accuracy,
precision and sensitivity.

Each metric is computed per image, then averaged over images ("mean"), so a
small tumour counts as much as a large one. The "pooled" figures sum the
pixel counts of all images first, which weighs large tumours more.

Edge cases, per image: prediction and ground truth both empty scores 1.0 on
every metric (correctly found nothing); exactly one of them empty scores 0.0
on Dice and IoU. Precision with nothing predicted and sensitivity with no
tumour are ratios over nothing: NaN. Each function's docstring states its
own cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


@dataclass
class Counts:
    """Pixel counts per image, each a float64 tensor of shape (N,)."""

    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    tn: torch.Tensor


def confusion_counts(pred: ArrayLike, target: ArrayLike) -> Counts:
    """True/false positive/negative pixel counts per image.

    Args:
        pred: binary prediction, shape (N, H, W) or (N, 1, H, W); nonzero = tumour.
        target: ground-truth mask of the same shape; nonzero = tumour.
    """
    pred = torch.as_tensor(pred).flatten(1).bool()
    target = torch.as_tensor(target).flatten(1).bool()
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    tp = (pred & target).sum(1).double()
    fp = (pred & ~target).sum(1).double()
    fn = (~pred & target).sum(1).double()
    tn = (~pred & ~target).sum(1).double()
    return Counts(tp, fp, fn, tn)


def _ratio_or_one(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 1.0 where the denominator is 0 (both masks empty)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.ones_like(numerator))


def dice_from_counts(c: Counts) -> torch.Tensor:
    """2 TP / (2 TP + FP + FN); 1.0 when both masks are empty."""
    return _ratio_or_one(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def iou_from_counts(c: Counts) -> torch.Tensor:
    """TP / (TP + FP + FN); 1.0 when both masks are empty."""
    return _ratio_or_one(c.tp, c.tp + c.fp + c.fn)


def pixel_accuracy_from_counts(c: Counts) -> torch.Tensor:
    """(TP + TN) / all pixels."""
    return (c.tp + c.tn) / (c.tp + c.fp + c.fn + c.tn)


def _ratio_one_if_both_empty(numerator: torch.Tensor, denominator: torch.Tensor, c: Counts) -> torch.Tensor:
    """numerator / denominator; where the denominator is 0: 1.0 if both masks are empty, else NaN.

    Precision has no predicted pixels to judge, sensitivity no tumour pixels to
    find; only when both masks are empty is the answer known (nothing to find,
    nothing claimed), which matches Dice's convention.
    """
    both_empty = (c.tp + c.fp + c.fn) == 0
    undefined = torch.where(both_empty, 1.0, float("nan")).to(numerator.dtype)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), undefined)


def precision_from_counts(c: Counts) -> torch.Tensor:
    """Positive predictive value TP / (TP + FP).

    Nothing predicted: 1.0 when the ground truth is empty too, NaN (undefined)
    when it holds tumour; that image counts as a miss through sensitivity 0.0.
    """
    return _ratio_one_if_both_empty(c.tp, c.tp + c.fp, c)


def sensitivity_from_counts(c: Counts) -> torch.Tensor:
    """Sensitivity (recall) TP / (TP + FN).

    Empty ground truth: 1.0 when nothing is predicted either, NaN (undefined)
    otherwise; that image's false alarm shows in precision 0.0.
    """
    return _ratio_one_if_both_empty(c.tp, c.tp + c.fn, c)


def dice_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Dice of each image, shape (N,)."""
    return dice_from_counts(confusion_counts(pred, target))


def iou_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """IoU (Jaccard) of each image, shape (N,)."""
    return iou_from_counts(confusion_counts(pred, target))


def pixel_accuracy_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Share of correctly classified pixels of each image, shape (N,)."""
    return pixel_accuracy_from_counts(confusion_counts(pred, target))


def precision_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Precision of each image, shape (N,); see `precision_from_counts` for empty masks."""
    return precision_from_counts(confusion_counts(pred, target))


def sensitivity_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Sensitivity of each image, shape (N,); see `sensitivity_from_counts` for empty masks."""
    return sensitivity_from_counts(confusion_counts(pred, target))


@dataclass
class MetricTracker:
    """Accumulates per-image metrics over batches; `summary()` gives means and pooled figures."""

    dice: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    pixel_accuracy: list[float] = field(default_factory=list)
    totals: np.ndarray = field(default_factory=lambda: np.zeros(4))  # pooled tp, fp, fn, tn

    def update(self, pred: ArrayLike, target: ArrayLike) -> Counts:
        """Add a batch of binary predictions and masks; returns the batch's per-image counts."""
        c = confusion_counts(pred, target)
        self.dice += dice_from_counts(c).tolist()
        self.iou += iou_from_counts(c).tolist()
        self.pixel_accuracy += pixel_accuracy_from_counts(c).tolist()
        self.totals += np.array([c.tp.sum().item(), c.fp.sum().item(), c.fn.sum().item(), c.tn.sum().item()])
        return c

    def summary(self) -> dict[str, float]:
        """Mean per-image Dice, IoU and pixel accuracy, plus pooled Dice and IoU over all pixels."""
        if not self.dice:
            raise ValueError("no images were added")
        pooled = Counts(*(torch.tensor([v], dtype=torch.float64) for v in self.totals))
        return {
            "dice": float(np.mean(self.dice)),
            "iou": float(np.mean(self.iou)),
            "pixel_accuracy": float(np.mean(self.pixel_accuracy)),
            "dice_pooled": dice_from_counts(pooled).item(),
            "iou_pooled": iou_from_counts(pooled).item(),
        }
