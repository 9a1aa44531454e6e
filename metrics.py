"""Segmentation metrics from thresholded predictions: Dice (primary), IoU, pixel accuracy,
precision, sensitivity, and boundary distances (HD95, ASSD).

Each metric is computed per image, then averaged over images ("mean"), so a
small tumour counts as much as a large one. The "pooled" figures sum the
pixel counts of all images first, which weighs large tumours more.

Edge cases, per image: prediction and ground truth both empty scores 1.0 on
every overlap metric (correctly found nothing); exactly one of them empty
scores 0.0 on Dice and IoU. Metrics that are undefined for an image (a ratio
over nothing, a distance to an empty mask) are NaN; `stats.summarise` leaves them
out of means and counts them separately. Each function's docstring states its
own cases; every `*_per_image` function takes the arguments of `dice_per_image`.
Built on these, in tumorseg/evaluation/: every per-image number with
components and a failure category (image_report.py, failures.py), calibration
(calibration.py) and statistics over images (stats.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import KDTree

ArrayLike = torch.Tensor | np.ndarray
Spacing = tuple[float, float]  # pixel size along H then W, e.g. in mm


@dataclass
class Counts:
    """Pixel counts per image, each a tensor of shape (N,) (int64 from `confusion_counts`)."""

    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    tn: torch.Tensor


def confusion_counts(pred: ArrayLike, target: ArrayLike) -> Counts:
    """True/false positive/negative pixel counts per image.

    Args:
        pred: binary prediction, shape (N, H, W) or (N, 1, H, W); nonzero = tumour (NaN too, being nonzero).
        target: ground-truth mask with as many pixels per image; nonzero = tumour.

    Returns:
        Counts of int64 tensors of shape (N,): tp, fp, fn, tn. Empty masks give zeros where expected,
        e.g. tp = fp = fn = 0 when both masks of an image are empty.

    Raises:
        ValueError: `pred` and `target` differ in shape once each image is flattened (so (N, 1, H, W)
            against (N, H, W) is accepted).
    """
    pred = torch.as_tensor(pred).flatten(1).bool()
    target = torch.as_tensor(target).flatten(1).bool()
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    # int64, not float64: exact, and MPS (Apple GPUs, where training computes Dice every step) has no float64.
    return Counts((pred & target).sum(1), (pred & ~target).sum(1), (~pred & target).sum(1), (~pred & ~target).sum(1))


def ratio_dtype(device: torch.device) -> torch.dtype:
    """The float type ratios of counts are taken in: float64, or float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _real(values: torch.Tensor) -> torch.Tensor:
    """Counts (or sums of them) as floats of `ratio_dtype`, for dividing."""
    return values.to(ratio_dtype(values.device))


def _ratio_or_one(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 1.0 where the denominator is 0 (both masks empty)."""
    numerator, denominator = _real(numerator), _real(denominator)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.ones_like(numerator))


def dice_from_counts(c: Counts) -> torch.Tensor:
    """Dice 2 TP / (2 TP + FP + FN) per image, of `ratio_dtype`, shape (N,).

    Returns:
        1.0 where both masks are empty (nothing to find, nothing claimed), 0.0 where exactly one is
        (a miss, or a false alarm on an empty truth).
    """
    return _ratio_or_one(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def iou_from_counts(c: Counts) -> torch.Tensor:
    """IoU (Jaccard) TP / (TP + FP + FN) per image, of `ratio_dtype`, shape (N,).

    Returns:
        1.0 where both masks are empty, 0.0 where exactly one is, as for Dice.
    """
    return _ratio_or_one(c.tp, c.tp + c.fp + c.fn)


def pixel_accuracy_from_counts(c: Counts) -> torch.Tensor:
    """(TP + TN) / all pixels per image, of `ratio_dtype`, shape (N,); 1.0 where both masks are empty."""
    return _real(c.tp + c.tn) / _real(c.tp + c.fp + c.fn + c.tn)


def _ratio_one_if_both_empty(numerator: torch.Tensor, denominator: torch.Tensor, c: Counts) -> torch.Tensor:
    """numerator / denominator; where the denominator is 0: 1.0 if both masks are empty, else NaN.

    Precision has no predicted pixels to judge, sensitivity no tumour pixels to
    find; only when both masks are empty is the answer known (nothing to find,
    nothing claimed), which matches Dice's convention.
    """
    numerator, denominator = _real(numerator), _real(denominator)
    both_empty = (c.tp + c.fp + c.fn) == 0
    undefined = torch.where(both_empty, 1.0, float("nan")).to(numerator.dtype)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), undefined)


def precision_from_counts(c: Counts) -> torch.Tensor:
    """Positive predictive value TP / (TP + FP) per image, of `ratio_dtype`, shape (N,).

    Returns:
        Where nothing is predicted: 1.0 if the ground truth is empty too, NaN (undefined) if it holds
        tumour; that image counts as a miss through sensitivity 0.0. A false alarm on an empty ground
        truth gives 0.0.
    """
    return _ratio_one_if_both_empty(c.tp, c.tp + c.fp, c)


def sensitivity_from_counts(c: Counts) -> torch.Tensor:
    """Sensitivity (recall) TP / (TP + FN) per image, of `ratio_dtype`, shape (N,).

    Returns:
        Where the ground truth is empty: 1.0 if nothing is predicted either, NaN (undefined) otherwise;
        that image's false alarm shows in precision 0.0. A tumour with nothing predicted gives 0.0.
    """
    return _ratio_one_if_both_empty(c.tp, c.tp + c.fn, c)


def dice_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Dice of each image, shape (N,): 1.0 for two empty masks, 0.0 when exactly one is empty.

    Args:
        pred, target: binary prediction and ground truth, (N, H, W) or (N, 1, H, W); nonzero = tumour.

    Raises:
        ValueError: the shapes differ (see `confusion_counts`).
    """
    return dice_from_counts(confusion_counts(pred, target))


def iou_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """IoU (Jaccard) of each image, shape (N,); empty masks, arguments and errors as `dice_per_image`."""
    return iou_from_counts(confusion_counts(pred, target))


def pixel_accuracy_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Share of correctly classified pixels of each image, shape (N,); 1.0 for two empty masks."""
    return pixel_accuracy_from_counts(confusion_counts(pred, target))


def precision_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Precision of each image, shape (N,); empty masks as `precision_from_counts`."""
    return precision_from_counts(confusion_counts(pred, target))


def sensitivity_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Sensitivity of each image, shape (N,); empty masks as `sensitivity_from_counts`."""
    return sensitivity_from_counts(confusion_counts(pred, target))


@dataclass
class MetricTracker:
    """Accumulates per-image metrics over batches; `summary()` gives means and pooled figures.

    Each image's Dice, IoU and pixel accuracy follow `dice_from_counts` and its
    neighbours (two empty masks score 1.0, exactly one empty mask 0.0 on Dice
    and IoU), so Dice and IoU are never NaN and every image enters their means.
    """

    dice: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    pixel_accuracy: list[float] = field(default_factory=list)
    totals: np.ndarray = field(default_factory=lambda: np.zeros(4))  # pooled tp, fp, fn, tn

    def update(self, pred: ArrayLike, target: ArrayLike) -> Counts:
        """Add a batch of binary predictions and masks; returns the batch's per-image counts.

        Args:
            pred, target: as `confusion_counts`.

        Raises:
            ValueError: the shapes differ; nothing is added then.
        """
        c = confusion_counts(pred, target)
        self.dice += dice_from_counts(c).tolist()
        self.iou += iou_from_counts(c).tolist()
        self.pixel_accuracy += pixel_accuracy_from_counts(c).tolist()
        self.totals += np.array([c.tp.sum().item(), c.fp.sum().item(), c.fn.sum().item(), c.tn.sum().item()])
        return c

    def summary(self) -> dict[str, float]:
        """Mean per-image Dice, IoU and pixel accuracy, plus pooled Dice and IoU over all pixels.

        Returns:
            {"dice", "iou", "pixel_accuracy", "dice_pooled", "iou_pooled"} as floats; the pooled
            figures are 1.0 when no image held or predicted any tumour (see `pooled_scores`).

        Raises:
            ValueError: no images were added.
        """
        if not self.dice:
            raise ValueError("no images were added")
        tp, fp, fn, _ = self.totals
        return {
            "dice": float(np.mean(self.dice)),
            "iou": float(np.mean(self.iou)),
            "pixel_accuracy": float(np.mean(self.pixel_accuracy)),
            **pooled_scores(tp, fp, fn),
        }


def pooled_scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    """dice_pooled and iou_pooled of pixel counts summed over images (large tumours weigh more).

    Args:
        tp: true positive pixels of all images together.
        fp: false positive pixels of all images together.
        fn: false negative pixels of all images together.

    Returns:
        {"dice_pooled": ..., "iou_pooled": ...}; both 1.0 when the summed counts hold no tumour pixel
        at all (tp = fp = fn = 0), as for one image.
    """
    pooled = Counts(*(torch.tensor([float(v)], dtype=torch.float64) for v in (tp, fp, fn, 0)))
    return {"dice_pooled": dice_from_counts(pooled).item(), "iou_pooled": iou_from_counts(pooled).item()}


# ---- Boundary distances --------------------------------------------------------------------------
# Conventions follow MONAI 1.6 (`compute_hausdorff_distance`, `compute_average_surface_distance`),
# which the tests cross-check: a mask's border is the mask minus its binary erosion with scipy's
# default 4-connected cross, and distances are Euclidean between border pixel centres.

HAUSDORFF_PERCENTILE = 95


def mask_pair(pred: np.ndarray, target: np.ndarray, dims: tuple[int, ...] = (2,)) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays, checked to have one of `dims` dimensions and the same shape."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.ndim not in dims or pred.shape != target.shape:
        shape = " or ".join({2: "(H, W)", 3: "(X, Y, Z)"}[d] for d in dims)
        raise ValueError(f"expected two {shape} masks of one shape, got {pred.shape} and {target.shape}")
    return pred, target


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The mask's bounding box grown by margin pixels, clipped to the array; None when the mask is empty."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        # Slices past the far edge are clipped by numpy; only the near edge needs max().
        box.append(slice(max(occupied[0] - margin, 0), occupied[-1] + margin + 1))
    return tuple(box)


def mask_border(mask: np.ndarray) -> np.ndarray:
    """Pixels of a bool mask with at least one of their face neighbours outside it (4 in 2-D, 6 in 3-D).

    Pixels on the edge of the array count as border (outside it is
    background). A single pixel or a one-pixel-wide line is all border; an
    empty mask has none.

    Args:
        mask: bool array (H, W), or (X, Y, Z) for a volume.
    """
    return mask & ~ndimage.binary_erosion(mask)  # default structure: the face-connected cross


def _border_points(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Positions of a non-empty mask's border pixels (see `mask_border`) in units of spacing, shape (P, ndim)."""
    # Eroding the bounding box with a 1-pixel margin of background gives the same border as eroding
    # the whole array, at a fraction of the cost.
    box = bounding_box(mask, margin=1)
    offset = tuple(axis.start for axis in box)
    return (np.argwhere(mask_border(mask[box])) + offset) * np.asarray(spacing, dtype=np.float64)


class SurfaceDistances(NamedTuple):
    """Euclidean distances between the borders of two masks, in units of the spacing."""

    pred_to_target: np.ndarray  # from each border pixel of the prediction to the nearest of the target
    target_to_pred: np.ndarray  # from each border pixel of the target to the nearest of the prediction


def surface_distances(pred: np.ndarray, target: np.ndarray,
                      spacing: float | Sequence[float] | None = None) -> SurfaceDistances:
    """Distances from each border pixel (see `mask_border`) of one mask to the nearest of the other.

    Works on images and on volumes alike (a volume's border is its surface).

    Args:
        pred: predicted bool mask (H, W), or (X, Y, Z).
        target: ground-truth bool mask of the same shape.
        spacing: pixel (voxel) size along each axis, e.g. (row_mm, col_mm) for an image, or one number
            for every axis (square pixels); distances come out in its unit. None = 1 per axis.

    Returns:
        SurfaceDistances (pred_to_target, target_to_pred), float arrays with one value per border pixel
        of the mask they start from. When either mask is empty (or both), both arrays are empty, since
        there is no border to measure to; the metrics built on them are then NaN. Identical masks give
        all zeros.

    Raises:
        ValueError: the masks are not both 2-D or both 3-D of one shape, or `spacing` has another
            number of values than the masks have axes.
    """
    pred, target = mask_pair(pred, target, dims=(2, 3))
    if spacing is None or isinstance(spacing, (int, float)):
        spacing = (1.0 if spacing is None else float(spacing),) * pred.ndim
    spacing = tuple(spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for {pred.ndim}-D masks")
    if not pred.any() or not target.any():
        return SurfaceDistances(np.empty(0), np.empty(0))
    pred_points, target_points = _border_points(pred, spacing), _border_points(target, spacing)
    # Nearest neighbours among border points (as MONAI does on CPU) rather than a distance transform:
    # the cost follows the length of the borders, not the area between far-apart masks.
    return SurfaceDistances(KDTree(target_points).query(pred_points)[0],
                            KDTree(pred_points).query(target_points)[0])


def hausdorff95_from_distances(distances: SurfaceDistances) -> float:
    """95th-percentile Hausdorff distance: the larger of the two directed 95th percentiles.

    As MONAI's `compute_hausdorff_distance(percentile=95)`: each direction's
    percentile uses linear interpolation between the sorted distances, and the
    maximum of the two is taken (not the percentile of both directions pooled).

    Args:
        distances: the output of `surface_distances`.

    Returns:
        The distance in the spacing's unit; 0.0 for identical non-empty masks, NaN when either mask
        is empty (never inf).
    """
    if distances.pred_to_target.size == 0:
        return math.nan
    return float(max(np.percentile(distances.pred_to_target, HAUSDORFF_PERCENTILE),
                     np.percentile(distances.target_to_pred, HAUSDORFF_PERCENTILE)))


def average_surface_distance_from_distances(distances: SurfaceDistances) -> float:
    """Average symmetric surface distance: the mean of both directions' distances pooled together.

    As MONAI's `compute_average_surface_distance(symmetric=True)`: a sum over
    all border pixels of both masks divided by their total number, so the
    larger border weighs more (not the mean of the two directed means).
    Argument and edge cases as `hausdorff95_from_distances`.
    """
    if distances.pred_to_target.size == 0:
        return math.nan
    return float(np.concatenate(distances).mean())


def hausdorff95(pred: np.ndarray, target: np.ndarray,
                spacing: float | Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance between two masks; see `hausdorff95_from_distances`.

    Args:
        pred: predicted bool mask (H, W), or (X, Y, Z).
        target: ground-truth bool mask of the same shape.
        spacing: pixel size along each axis (row_mm, col_mm), or one number for every axis; the distance
            comes out in its unit (None: pixels).

    Returns:
        The distance; 0.0 for identical non-empty masks, NaN when either mask is empty (a missed
        tumour, a false alarm on an empty slice, or both empty), never inf.

    Raises:
        ValueError: as `surface_distances` (shapes, dimensions, spacing).
    """
    return hausdorff95_from_distances(surface_distances(pred, target, spacing))


def average_surface_distance(pred: np.ndarray, target: np.ndarray,
                             spacing: float | Sequence[float] | None = None) -> float:
    """Average symmetric surface distance between two masks; see `average_surface_distance_from_distances`.

    Arguments, edge cases and errors as `hausdorff95`: 0.0 for identical non-empty masks, NaN when
    either mask is empty, never inf.
    """
    return average_surface_distance_from_distances(surface_distances(pred, target, spacing))
