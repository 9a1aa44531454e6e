"""Every per-image number of one prediction (overlap, distances, components, failure category); a volume's scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from metrics import (Spacing, average_surface_distance_from_distances, bounding_box, confusion_counts, dice_from_counts,
                     hausdorff95_from_distances, iou_from_counts, mask_pair, pixel_accuracy_from_counts,
                     precision_from_counts, sensitivity_from_counts, surface_distances)
from tumorseg.evaluation.failures import failure_category

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def component_count(mask: np.ndarray) -> int:
    """Number of 8-connected components of a bool mask: diagonal neighbours join.

    Args:
        mask: bool array (H, W); nonzero = foreground.

    Returns:
        The number of components; 0 when the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    box = bounding_box(mask, margin=0)
    if box is None:
        return 0
    return int(ndimage.label(mask[box], structure=_EIGHT_CONNECTED)[1])  # the box alone: faster, same count


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
    pred, target = mask_pair(pred, target)
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
    pred, target = mask_pair(pred, target, dims=(3,))
    counts = confusion_counts(pred.reshape(1, -1), target.reshape(1, -1))
    distances = surface_distances(pred, target, spacing)
    overlap = int(counts.tp.item())
    return {"dice": dice_from_counts(counts).item(), "iou": iou_from_counts(counts).item(),
            "precision": precision_from_counts(counts).item(), "sensitivity": sensitivity_from_counts(counts).item(),
            "hd95_mm": hausdorff95_from_distances(distances),
            "assd_mm": average_surface_distance_from_distances(distances),
            "gt_voxels": overlap + int(counts.fn.item()), "pred_voxels": overlap + int(counts.fp.item()),
            "overlap_voxels": overlap}
