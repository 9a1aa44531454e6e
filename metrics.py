"""Segmentation metrics from thresholded predictions: Dice (primary), IoU, pixel accuracy,
precision, sensitivity, boundary distances (HD95, ASSD), a failure category per
image, an image's uncertainty from the spread of several probability maps,
calibration of the probability maps, and summaries over images.

Each metric is computed per image, then averaged over images ("mean"), so a
small tumour counts as much as a large one. The "pooled" figures sum the
pixel counts of all images first, which weighs large tumours more.

Edge cases, per image: prediction and ground truth both empty scores 1.0 on
every overlap metric (correctly found nothing); exactly one of them empty
scores 0.0 on Dice and IoU. Metrics that are undefined for an image (a ratio
over nothing, a distance to an empty mask) are NaN; `summarise` leaves them
out of means and counts them separately. Each function's docstring states its
own cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    """IoU (Jaccard) of each image, shape (N,): 1.0 for two empty masks, 0.0 when exactly one is empty.

    Args:
        pred, target: binary prediction and ground truth, (N, H, W) or (N, 1, H, W); nonzero = tumour.

    Raises:
        ValueError: the shapes differ (see `confusion_counts`).
    """
    return iou_from_counts(confusion_counts(pred, target))


def pixel_accuracy_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Share of correctly classified pixels of each image, shape (N,); 1.0 for two empty masks.

    Args:
        pred, target: binary prediction and ground truth, (N, H, W) or (N, 1, H, W); nonzero = tumour.

    Raises:
        ValueError: the shapes differ (see `confusion_counts`).
    """
    return pixel_accuracy_from_counts(confusion_counts(pred, target))


def precision_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Precision of each image, shape (N,); empty masks as `precision_from_counts`.

    Args:
        pred, target: binary prediction and ground truth, (N, H, W) or (N, 1, H, W); nonzero = tumour.

    Raises:
        ValueError: the shapes differ (see `confusion_counts`).
    """
    return precision_from_counts(confusion_counts(pred, target))


def sensitivity_per_image(pred: ArrayLike, target: ArrayLike) -> torch.Tensor:
    """Sensitivity of each image, shape (N,); empty masks as `sensitivity_from_counts`.

    Args:
        pred, target: binary prediction and ground truth, (N, H, W) or (N, 1, H, W); nonzero = tumour.

    Raises:
        ValueError: the shapes differ (see `confusion_counts`).
    """
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


def _mask_pair(pred: np.ndarray, target: np.ndarray, dims: tuple[int, ...] = (2,)) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays, checked to have one of `dims` dimensions and the same shape."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.ndim not in dims or pred.shape != target.shape:
        shape = " or ".join({2: "(H, W)", 3: "(X, Y, Z)"}[d] for d in dims)
        raise ValueError(f"expected two {shape} masks of one shape, got {pred.shape} and {target.shape}")
    return pred, target


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
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
    box = _bounding_box(mask, margin=1)
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
    pred, target = _mask_pair(pred, target, dims=(2, 3))
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

    Args:
        distances: the output of `surface_distances`.

    Returns:
        The distance in the spacing's unit; 0.0 for identical non-empty masks, NaN when either mask
        is empty (never inf).
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

    Args:
        pred: predicted bool mask (H, W), or (X, Y, Z).
        target: ground-truth bool mask of the same shape.
        spacing: pixel size along each axis (row_mm, col_mm), or one number for every axis; the distance
            comes out in its unit (None: pixels).

    Returns:
        The distance; 0.0 for identical non-empty masks, NaN when either mask is empty, never inf.

    Raises:
        ValueError: as `surface_distances` (shapes, dimensions, spacing).
    """
    return average_surface_distance_from_distances(surface_distances(pred, target, spacing))


def volume_report(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> dict[str, float | int]:
    """3-D scores of one predicted volume against its ground truth: every voxel counts once.

    Args:
        pred: predicted bool volume (X, Y, Z).
        target: ground-truth bool volume of the same shape.
        spacing: voxel size in mm along X, Y, Z.

    Returns:
        dice, iou, precision, sensitivity, hd95_mm, assd_mm (surface distances over the 3-D surfaces,
        in the voxel spacing's unit), gt_voxels, pred_voxels, overlap_voxels. As per image: Dice and
        IoU are 1.0 when both volumes are empty, 0.0 when exactly one is; precision is NaN with
        nothing predicted on a tumour, sensitivity NaN with a false alarm on an empty truth (both
        1.0 when both are empty); distances are NaN when either volume is empty.

    Raises:
        ValueError: the volumes are not 3-D of one shape, or `spacing` does not have 3 values.
    """
    pred, target = _mask_pair(pred, target, dims=(3,))
    counts = confusion_counts(pred.reshape(1, -1), target.reshape(1, -1))
    distances = surface_distances(pred, target, spacing)
    overlap = int(counts.tp.item())
    return {"dice": dice_from_counts(counts).item(), "iou": iou_from_counts(counts).item(),
            "precision": precision_from_counts(counts).item(), "sensitivity": sensitivity_from_counts(counts).item(),
            "hd95_mm": hausdorff95_from_distances(distances),
            "assd_mm": average_surface_distance_from_distances(distances),
            "gt_voxels": overlap + int(counts.fn.item()), "pred_voxels": overlap + int(counts.fp.item()),
            "overlap_voxels": overlap}


# ---- Components and failure categories -----------------------------------------------------------

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def component_count(mask: np.ndarray) -> int:
    """Number of 8-connected components of a bool mask: diagonal neighbours join.

    Args:
        mask: bool array (H, W); nonzero = foreground.

    Returns:
        The number of components; 0 when the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    box = _bounding_box(mask, margin=0)
    if box is None:
        return 0
    return int(ndimage.label(mask[box], structure=_EIGHT_CONNECTED)[1])  # the box alone: faster, same count


FRAGMENTED_MIN_COMPONENTS = 3  # this many predicted components or more ...
FRAGMENTED_MAX_DICE = 0.7  # ... with Dice below this is "fragmented"
LOW_RATE = 0.6  # precision or sensitivity below this is low
HIGH_RATE = 0.8  # precision or sensitivity at or above this is high
POOR_MAX_DICE = 0.5  # Dice below this is "poor"
GOOD_MIN_DICE = 0.8  # Dice at or above this is "good"


class _Outcome(NamedTuple):
    """The per-image numbers that the failure rules read; see `failure_category`."""

    dice: float
    precision: float
    sensitivity: float
    pred_components: int
    true_pixels: int
    pred_pixels: int
    overlap_pixels: int


# (name, rule in words, test), checked in order: the first rule that holds names the image.
# One table, so the words written into reports cannot drift from the code.
_FAILURE_RULE_TABLE: list[tuple[str, str, Callable[[_Outcome], bool]]] = [
    ("no tumour: correct", "no tumour in the ground truth and nothing predicted",
     lambda o: o.true_pixels == 0 and o.pred_pixels == 0),
    ("no tumour: false positive", "no tumour in the ground truth but something predicted",
     lambda o: o.true_pixels == 0),
    ("missed", "tumour present, nothing predicted",
     lambda o: o.pred_pixels == 0),
    ("wrong place", "something predicted, but none of it on the tumour (false positive only)",
     lambda o: o.overlap_pixels == 0),
    ("fragmented", f"{FRAGMENTED_MIN_COMPONENTS} or more predicted components (8-connected) "
                   f"and Dice below {FRAGMENTED_MAX_DICE}",
     lambda o: o.pred_components >= FRAGMENTED_MIN_COMPONENTS and o.dice < FRAGMENTED_MAX_DICE),
    ("under-segmented", f"sensitivity below {LOW_RATE} and precision at least {HIGH_RATE}",
     lambda o: o.sensitivity < LOW_RATE and o.precision >= HIGH_RATE),
    ("over-segmented", f"precision below {LOW_RATE} and sensitivity at least {HIGH_RATE}",
     lambda o: o.precision < LOW_RATE and o.sensitivity >= HIGH_RATE),
    ("poor", f"Dice below {POOR_MAX_DICE}",
     lambda o: o.dice < POOR_MAX_DICE),
    ("good", f"Dice at least {GOOD_MIN_DICE}",
     lambda o: o.dice >= GOOD_MIN_DICE),
    ("fair", f"none of the above (Dice from {POOR_MAX_DICE} to below {GOOD_MIN_DICE})",
     lambda o: True),
]

FAILURE_RULES: list[tuple[str, str]] = [(name, rule) for name, rule, _ in _FAILURE_RULE_TABLE]
"""(category, rule in plain English) in the order `failure_category` checks them; the first to hold wins."""


def failure_category(dice: float, precision: float, sensitivity: float, pred_components: int,
                     true_pixels: int, pred_pixels: int, overlap_pixels: int) -> str:
    """Name of the first rule of `FAILURE_RULES` that an image's numbers satisfy.

    Images without tumour get "no tumour: correct" or "no tumour: false
    positive"; the other categories describe images with tumour. NaN precision
    or sensitivity (nothing predicted, or no tumour) only occurs in images that
    the first rules already settle, so NaN never reaches a comparison.

    Args:
        dice: the image's Dice.
        precision: the image's precision (see `precision_from_counts`).
        sensitivity: the image's sensitivity (see `sensitivity_from_counts`).
        pred_components: 8-connected components of the prediction (`component_count`).
        true_pixels: tumour pixels in the ground truth.
        pred_pixels: predicted tumour pixels.
        overlap_pixels: pixels both predicted and in the ground truth (true positives).

    Returns:
        One category name of `FAILURE_RULES`; there always is one, "fair" being the last resort.
    """
    outcome = _Outcome(dice, precision, sensitivity, pred_components, true_pixels, pred_pixels,
                       overlap_pixels)
    return next(name for name, _, holds in _FAILURE_RULE_TABLE if holds(outcome))


def per_image_report(pred: np.ndarray, target: np.ndarray,
                     spacing: float | Spacing | None = None) -> dict[str, float | int | str]:
    """Every per-image number of one prediction against its ground truth, at the image's resolution.

    Args:
        pred: predicted bool mask (H, W).
        target: ground-truth bool mask (H, W).
        spacing: pixel size in mm along H then W (rows, columns), or one number for square pixels;
            None when unknown (no mm distances).

    Returns:
        dice, iou, pixel_accuracy, precision, sensitivity, hd95_px, assd_px, hd95_mm and assd_mm
        (only with spacing), pred_components, true_components, gt_pixels, pred_pixels,
        overlap_pixels, category. Undefined values are NaN, as each metric states: the distances
        when either mask is empty, precision with nothing predicted on a tumour, sensitivity with a
        false alarm on an empty truth. Two empty masks give Dice, IoU, precision and sensitivity 1.0,
        NaN distances and the category "no tumour: correct".

    Raises:
        ValueError: the masks are not 2-D of one shape, or `spacing` does not have 2 values.
    """
    pred, target = _mask_pair(pred, target)
    counts = confusion_counts(pred[None], target[None])
    dice, precision, sensitivity = (dice_from_counts(counts).item(), precision_from_counts(counts).item(),
                                    sensitivity_from_counts(counts).item())
    overlap_pixels = int(counts.tp.item())
    gt_pixels = overlap_pixels + int(counts.fn.item())
    pred_pixels = overlap_pixels + int(counts.fp.item())
    pred_components = component_count(pred)
    in_pixels = surface_distances(pred, target)
    report: dict[str, float | int | str] = {
        "dice": dice,
        "iou": iou_from_counts(counts).item(),
        "pixel_accuracy": pixel_accuracy_from_counts(counts).item(),
        "precision": precision,
        "sensitivity": sensitivity,
        "hd95_px": hausdorff95_from_distances(in_pixels),
        "assd_px": average_surface_distance_from_distances(in_pixels),
    }
    if spacing is not None:
        in_mm = surface_distances(pred, target, spacing)
        report["hd95_mm"] = hausdorff95_from_distances(in_mm)
        report["assd_mm"] = average_surface_distance_from_distances(in_mm)
    report.update(
        pred_components=pred_components,
        true_components=component_count(target),
        gt_pixels=gt_pixels,
        pred_pixels=pred_pixels,
        overlap_pixels=overlap_pixels,
        category=failure_category(dice, precision, sensitivity, pred_components, gt_pixels, pred_pixels,
                                  overlap_pixels),
    )
    return report


# ---- Uncertainty ------------------------------------------------------------------------------

# Pixels whose mean probability reaches this form an image's uncertain region: what any view could
# call tumour. Elsewhere every view agrees on background, and averaging their near-zero spread in would
# only dilute the figure by the image's size.
UNCERTAINTY_REGION_PROBABILITY = 0.1


def region_uncertainty(spread: np.ndarray, probability: np.ndarray) -> float:
    """One image's uncertainty: the mean spread over pixels whose mean probability reaches
    UNCERTAINTY_REGION_PROBABILITY.

    Args:
        spread: per-pixel standard deviation of the views' (or ensemble members') probabilities (H, W).
        probability: their mean probability, of the same shape.

    Returns:
        The mean spread over that region; 0.0 when no pixel reaches it (every view agreed there is no
        tumour). A NaN probability is outside the region; a NaN spread inside it makes the result NaN.

    Raises:
        IndexError: the two maps differ in shape.
    """
    region = np.asarray(probability) >= UNCERTAINTY_REGION_PROBABILITY
    return float(np.asarray(spread)[region].mean()) if region.any() else 0.0


# ---- Calibration and ranking ---------------------------------------------------------------------

@dataclass
class CalibrationTracker:
    """Reliability of per-pixel tumour probabilities, accumulated over images.

    Each pixel goes into one of `bins` equal-width bins of its predicted tumour
    probability p over [0, 1]: bin floor(p * bins), and p = 1 into the last
    (bin b holds b/bins <= p < (b+1)/bins, up to rounding). Per bin: n_b
    pixels, mean confidence conf_b (mean p) and observed frequency acc_b (share
    of those pixels that are tumour). The expected calibration error is
    ECE = sum_b n_b / N * |acc_b - conf_b| over all N pixels: the
    positive-class ECE of a binary reliability diagram, not the top-label ECE
    that uses max(p, 1 - p) as confidence. Empty bins add nothing to ECE and
    report NaN confidence and frequency.

    Args:
        bins: number of equal-width probability bins, at least 1.

    Raises:
        ValueError: `bins` is below 1.
    """

    bins: int = 10
    counts: np.ndarray = field(init=False)  # pixels per bin
    probability_sums: np.ndarray = field(init=False)  # sum of p per bin
    positive_counts: np.ndarray = field(init=False)  # tumour pixels per bin

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise ValueError(f"bins must be at least 1, got {self.bins}")
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.probability_sums = np.zeros(self.bins)
        self.positive_counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def bin_edges(self) -> np.ndarray:
        """The bins + 1 edges from 0 to 1."""
        return np.linspace(0.0, 1.0, self.bins + 1)

    def update(self, prob_map: np.ndarray, mask: np.ndarray) -> None:
        """Add the pixels of one image (or of a batch: any shape, as long as both match).

        Args:
            prob_map: predicted tumour probability of each pixel, in [0, 1].
            mask: ground truth of the same shape; nonzero = tumour.

        Raises:
            ValueError: the shapes differ, or a probability lies outside [0, 1] or is NaN; nothing is
                added then.
        """
        if np.shape(prob_map) != np.shape(mask):
            raise ValueError(f"probabilities {np.shape(prob_map)} and mask {np.shape(mask)} differ in shape")
        p = np.asarray(prob_map, dtype=np.float64).ravel()
        tumour = np.asarray(mask, dtype=bool).ravel()
        if not np.all((p >= 0) & (p <= 1)):  # also catches NaN
            raise ValueError("probabilities must lie in [0, 1]")
        index = np.minimum((p * self.bins).astype(np.intp), self.bins - 1)  # 2x faster than searchsorted
        self.counts += np.bincount(index, minlength=self.bins)
        self.probability_sums += np.bincount(index, weights=p, minlength=self.bins)
        self.positive_counts += np.bincount(index[tumour], minlength=self.bins)

    def summary(self) -> dict[str, float | list[float] | list[int]]:
        """The reliability diagram and ECE of every pixel added so far.

        Returns:
            bin_edges (bins + 1 values), and per bin (lists of `bins` values) counts, mean_confidence and
            observed_frequency (NaN for an empty bin), and ece (a float in [0, 1]).

        Raises:
            ValueError: no pixels were added.
        """
        total = int(self.counts.sum())
        if total == 0:
            raise ValueError("no pixels were added")
        filled = self.counts > 0
        confidence = np.full(self.bins, np.nan)
        frequency = np.full(self.bins, np.nan)
        confidence[filled] = self.probability_sums[filled] / self.counts[filled]
        frequency[filled] = self.positive_counts[filled] / self.counts[filled]
        ece = np.sum(self.counts[filled] / total * np.abs(frequency[filled] - confidence[filled]))
        return {
            "bin_edges": self.bin_edges.tolist(),
            "counts": self.counts.tolist(),
            "mean_confidence": confidence.tolist(),
            "observed_frequency": frequency.tolist(),
            "ece": float(ece),
        }


def _defined_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """x and y as float arrays without the pairs in which either is NaN."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two 1-D sequences of one length, got shapes {x.shape} and {y.shape}")
    defined = ~(np.isnan(x) | np.isnan(y))
    return x[defined], y[defined]


def classification_scores(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy and confusion matrix of class labels; every label must be in `classes`.

    The matrix's rows are the true classes and its columns the predicted ones,
    both in `classes` order (a row sums to that class's count). Balanced
    accuracy is the mean recall over the classes present in `truth`. NaN when
    `truth` is empty.
    """
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    for true, guess in zip(truth, predicted, strict=True):
        matrix[index[true], index[guess]] += 1
    present = matrix.sum(axis=1) > 0
    recalls = np.diag(matrix)[present] / matrix.sum(axis=1)[present]
    count = int(matrix.sum())
    return {"count": count, "accuracy": float(np.trace(matrix) / count) if count else math.nan,
            "balanced_accuracy": float(recalls.mean()) if count else math.nan,
            "classes": list(classes), "confusion_matrix": matrix.tolist()}


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of x and y, e.g. of per-image uncertainty and Dice.

    Pairs in which either value is NaN (an undefined metric) are left out.
    NaN when fewer than 2 pairs remain or either side is constant.

    Args:
        x: one value per image.
        y: another value per image, in the same order.
    """
    from scipy import stats  # here, not at the top: it adds about 0.5 s to every `import metrics`

    x, y = _defined_pairs(x, y)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of scores for telling labels apart, e.g. uncertainty for failed images.

    1.0: every positive scores above every negative; 0.5: no better than
    chance. Images whose score is NaN are left out; NaN when the remaining
    labels are all of one class, or every score is the same (nothing ranks:
    e.g. the zero uncertainty of a model ensembled with itself).

    Args:
        scores: one value per image; higher should mean "more likely positive".
        labels: True for positive images (e.g. failures), in the same order.
    """
    from sklearn.metrics import roc_auc_score  # here, not at the top: it adds about 1 s to `import metrics`

    scores, labels = _defined_pairs(scores, labels)
    if labels.size == 0 or np.all(labels == labels[0]) or np.all(scores == scores[0]):
        return math.nan
    return float(roc_auc_score(labels.astype(bool), scores))


def summarise(values: Sequence[float]) -> dict[str, float | int]:
    """mean, median and std (population, ddof=0) of the defined values; count of defined and of NaN ones.

    NaN marks an undefined per-image metric (e.g. HD95 with an empty mask): it
    is left out of the statistics and counted in count_undefined. With no
    defined value, mean, median and std are NaN.

    Args:
        values: one value per image.
    """
    array = np.asarray(values, dtype=np.float64)
    defined = array[~np.isnan(array)]
    has_values = defined.size > 0
    return {
        "mean": float(defined.mean()) if has_values else math.nan,
        "median": float(np.median(defined)) if has_values else math.nan,
        "std": float(defined.std()) if has_values else math.nan,
        "count": int(defined.size),
        "count_undefined": int(array.size - defined.size),
    }


def paired_comparison(differences: Sequence[float]) -> dict[str, float | int | None]:
    """Summary of paired differences (B minus A, one per image or patient) with a two-sided Wilcoxon signed-rank test.

    Zero differences are left out of the test, as in Wilcoxon's original
    test; when every difference is zero (a model compared with itself),
    `wilcoxon_p` is 1.0 and `wilcoxon_w` None: there is nothing to test.

    Args:
        differences: B's score minus A's for each paired unit; NaN is not allowed.
    """
    from scipy import stats  # here, not at the top: only comparisons need it

    array = np.asarray(differences, dtype=np.float64)
    if array.size == 0 or np.isnan(array).any():
        raise ValueError("paired_comparison needs at least one difference and no NaN")
    improved, worsened = int((array > 0).sum()), int((array < 0).sum())
    result: dict[str, float | int | None] = {
        "count": int(array.size), "mean_difference": float(array.mean()),
        "median_difference": float(np.median(array)), "b_better": improved, "b_worse": worsened,
        "equal": int(array.size) - improved - worsened, "wilcoxon_w": None, "wilcoxon_p": 1.0}
    if improved + worsened:
        test = stats.wilcoxon(array, zero_method="wilcox")
        result.update(wilcoxon_w=float(test.statistic), wilcoxon_p=float(test.pvalue))
    return result


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for testing them together, in the order given.

    The smallest p is multiplied by m, the next by m - 1, and so on, each kept
    at least as large as the one before and at most 1. One p-value is returned
    unchanged; an empty list gives an empty list.
    """
    order = np.argsort(np.asarray(p_values, dtype=np.float64), kind="stable")
    adjusted = [0.0] * len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted


def describe_paired_comparison(result: dict) -> str:
    """paired_comparison's result in two lines of words."""
    text = (f"mean difference {result['mean_difference']:+.4f} (median {result['median_difference']:+.4f}); "
            f"B better on {result['b_better']}, worse on {result['b_worse']}, equal on {result['equal']}\n")
    if result["wilcoxon_w"] is None:
        return text + "Wilcoxon signed-rank test: not applicable, every difference is 0"
    return text + (f"Wilcoxon signed-rank test (paired, two-sided): W = {result['wilcoxon_w']:.1f}, "
                   f"p = {result['wilcoxon_p']:.4g}")
