import math

import numpy as np
import pytest
import torch

from conftest import square
from metrics import (MetricTracker, average_surface_distance, confusion_counts, dice_per_image, hausdorff95,
                     iou_per_image, mask_border, pixel_accuracy_per_image, pooled_scores, precision_per_image,
                     ratio_dtype, sensitivity_per_image, surface_distances)
from tumorseg.evaluation.image_report import per_image_report


def test_hand_computed_values_on_one_image():
    target = np.zeros((1, 4, 4), bool)
    target[0, :2, :2] = True          # 4 tumour pixels
    pred = np.zeros((1, 4, 4), bool)
    pred[0, :2, :3] = True            # 6 predicted, 4 of them right
    c = confusion_counts(pred, target)
    assert (c.tp.item(), c.fp.item(), c.fn.item(), c.tn.item()) == (4, 2, 0, 10)
    assert dice_per_image(pred, target).item() == pytest.approx(8 / 10)
    assert iou_per_image(pred, target).item() == pytest.approx(4 / 6)
    assert pixel_accuracy_per_image(pred, target).item() == pytest.approx(14 / 16)


def test_counts_and_ratios_need_no_float64_which_mps_lacks():
    target = np.zeros((2, 4, 4), bool)
    target[:, :2, :2] = True          # 4 tumour pixels each
    pred = np.zeros((2, 4, 4), bool)
    pred[0, :2, :3] = True            # 6 predicted, 4 of them right; nothing predicted on the second
    c = confusion_counts(pred, target)
    assert [t.dtype for t in (c.tp, c.fp, c.fn, c.tn)] == [torch.int64] * 4  # Dice runs every step on the device
    assert [t.tolist() for t in (c.tp, c.fp, c.fn, c.tn)] == [[4, 0], [2, 0], [0, 4], [10, 12]]
    assert ratio_dtype(torch.device("mps")) == torch.float32 and ratio_dtype(torch.device("cpu")) == torch.float64
    # elsewhere the ratios are float64 of exact counts
    assert dice_per_image(pred, target).tolist() == [8 / 10, 0.0] and iou_per_image(pred, target)[0] == 4 / 6
    assert pixel_accuracy_per_image(pred, target).tolist() == [14 / 16, 12 / 16]
    assert precision_per_image(pred, target)[0] == 4 / 6 and math.isnan(precision_per_image(pred, target)[1])
    assert sensitivity_per_image(pred, target).tolist() == [1.0, 0.0]


def test_empty_cases():
    empty = torch.zeros(1, 5, 5, dtype=torch.bool)
    blob = empty.clone()
    blob[0, 1, 1] = True
    assert dice_per_image(empty, empty).item() == 1.0 and iou_per_image(empty, empty).item() == 1.0
    assert dice_per_image(blob, empty).item() == 0.0 and iou_per_image(blob, empty).item() == 0.0
    assert dice_per_image(empty, blob).item() == 0.0 and iou_per_image(empty, blob).item() == 0.0


def test_mean_is_per_image_and_pooled_is_per_pixel():
    # Large tumour (100 px) found exactly; small tumour (4 px) half found with no false positives.
    target = np.zeros((2, 20, 20), bool)
    pred = np.zeros((2, 20, 20), bool)
    target[0, :10, :10] = True
    pred[0, :10, :10] = True
    target[1, :2, :2] = True
    pred[1, :1, :2] = True
    tracker = MetricTracker()
    tracker.update(pred[:1], target[:1])   # two batches, as in a loader
    tracker.update(pred[1:], target[1:])
    summary = tracker.summary()
    small_dice = 2 * 2 / (2 * 2 + 0 + 2)   # = 2/3
    assert summary["dice"] == pytest.approx((1.0 + small_dice) / 2)
    assert summary["dice_pooled"] == pytest.approx(2 * 102 / (2 * 102 + 0 + 2))
    assert summary["iou"] == pytest.approx((1.0 + 2 / 4) / 2)
    assert summary["pixel_accuracy"] == pytest.approx((1.0 + 398 / 400) / 2)


def test_accepts_channel_dimension_and_rejects_shape_mismatch():
    a = torch.ones(3, 1, 6, 6)
    assert dice_per_image(a, a).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="differ in shape"):
        dice_per_image(torch.ones(1, 6, 6), torch.ones(1, 6, 5))
    with pytest.raises(ValueError, match="no images"):
        MetricTracker().summary()


def test_precision_and_sensitivity_hand_values_and_empty_rules():
    target = np.zeros((1, 4, 4), bool)
    target[0, :2, :2] = True          # 4 tumour pixels
    pred = np.zeros((1, 4, 4), bool)
    pred[0, :2, 1:4] = True           # 6 predicted, 2 of them right
    assert precision_per_image(pred, target).item() == pytest.approx(2 / 6)
    assert sensitivity_per_image(pred, target).item() == pytest.approx(2 / 4)
    empty = np.zeros((1, 4, 4), bool)
    # both empty: 1.0, as Dice; a ratio over nothing otherwise: NaN, the other metric 0.0
    assert precision_per_image(empty, empty).item() == 1.0
    assert sensitivity_per_image(empty, empty).item() == 1.0
    assert math.isnan(precision_per_image(empty, target).item())
    assert sensitivity_per_image(empty, target).item() == 0.0
    assert math.isnan(sensitivity_per_image(pred, empty).item())
    assert precision_per_image(pred, empty).item() == 0.0


def test_border_is_4_connected_and_includes_the_image_edge():
    plus = np.zeros((5, 5), bool)
    plus[2, 1:4] = plus[1:4, 2] = True
    expected = plus.copy()
    expected[2, 2] = False            # its 4 neighbours are all in the mask: interior
    assert (mask_border(plus) == expected).all()
    full = np.ones((4, 4), bool)
    assert mask_border(full).sum() == 12 and not mask_border(full)[1:3, 1:3].any()


def test_distances_of_two_squares_k_pixels_apart():
    # 4x4 squares in the same rows, 10 columns apart. Each border has 12 pixels; the nearest border
    # pixel of the other square is in the same row: distances 10 (x4), 9 (x2), 8 (x2), 7 (x4).
    a, b = square(0, 0, 4), square(0, 10, 4)
    d = surface_distances(a, b)
    assert sorted(d.pred_to_target) == sorted(d.target_to_pred) == [7] * 4 + [8] * 2 + [9] * 2 + [10] * 4
    assert hausdorff95(a, b) == pytest.approx(10.0)
    assert average_surface_distance(a, b) == pytest.approx(102 / 12)
    # overlapping 3x3 squares one column apart: 4 border pixels of each are 1 away, 4 on the other border
    a, b = square(2, 2, 3), square(2, 3, 3)
    assert hausdorff95(a, b) == pytest.approx(1.0)
    assert average_surface_distance(a, b) == pytest.approx(0.5)


def test_distances_of_a_single_pixel_in_a_square():
    pixel, box = square(2, 2, 1, (5, 5)), square(0, 0, 5, (5, 5))
    # pixel -> border of box: 2. border of box -> pixel: 4 x 2, 8 x sqrt 5, 4 x sqrt 8
    assert hausdorff95(pixel, box) == pytest.approx(math.sqrt(8))  # max of 2 and the 95th pct of the 16
    border_sum = 4 * 2 + 8 * math.sqrt(5) + 4 * math.sqrt(8)
    assert average_surface_distance(pixel, box) == pytest.approx((2 + border_sum) / 17)
    assert hausdorff95(pixel, pixel) == 0.0 and average_surface_distance(pixel, pixel) == 0.0


def test_spacing_scales_distances_along_its_own_axis():
    a, b = square(0, 0, 4), square(0, 10, 4)  # apart along W only
    assert hausdorff95(a, b, (0.5, 0.5)) == pytest.approx(5.0)
    assert average_surface_distance(a, b, (0.5, 0.5)) == pytest.approx(102 / 12 / 2)
    assert hausdorff95(a, b, (1.0, 2.0)) == pytest.approx(20.0)
    assert hausdorff95(a, b, (3.0, 1.0)) == pytest.approx(10.0)


def test_hd95_on_a_1_by_2_mm_grid_is_the_hand_computed_value():
    """A 3x3 square against itself moved one pixel, on pixels 1 mm tall and 2 mm wide (rows x columns).

    Moved one column, 4 border pixels of each square are 0 away from the other's border, 3 are one column
    (2 mm) away and 1 (the side one reaches from the other's centre) one row (1 mm) away: sorted
    [0, 0, 0, 0, 1, 2, 2, 2] mm each way, so HD95 = 2 mm and ASSD = 14 / 16 mm. Moved one row instead: 1 mm
    and 0.5 mm. Square 1 mm or 1.5 mm pixels (one number, or the mean of the two) would give other values.
    """
    base = square(2, 2, 3, (8, 8))
    across, down = square(2, 3, 3, (8, 8)), square(3, 2, 3, (8, 8))
    assert hausdorff95(base, across, (1.0, 2.0)) == pytest.approx(2.0)
    assert average_surface_distance(base, across, (1.0, 2.0)) == pytest.approx(14 / 16)
    assert hausdorff95(base, down, (1.0, 2.0)) == pytest.approx(1.0)
    assert average_surface_distance(base, down, (1.0, 2.0)) == pytest.approx(0.5)
    assert per_image_report(across, base, (1.0, 2.0))["hd95_mm"] == pytest.approx(2.0)


def test_one_number_is_a_square_pixel_and_agrees_with_the_equal_pair():
    a, b = square(0, 0, 4), square(3, 10, 5)
    for size in (0.7, 2):
        assert hausdorff95(a, b, size) == hausdorff95(a, b, (size, size))
        assert average_surface_distance(a, b, size) == average_surface_distance(a, b, (size, size))
        assert surface_distances(a, b, size).pred_to_target.tolist() == \
            surface_distances(a, b, (size, size)).pred_to_target.tolist()
        assert per_image_report(a, b, size) == per_image_report(a, b, (size, size))
    assert hausdorff95(a, b, 2) == pytest.approx(2 * hausdorff95(a, b))
    volume = np.zeros((6, 6, 6), bool)
    volume[1:3, 1:3, 1:3] = True
    assert hausdorff95(volume, np.roll(volume, 2, axis=2), 1.5) == hausdorff95(volume, np.roll(volume, 2, axis=2),
                                                                             (1.5, 1.5, 1.5))


def test_distances_are_nan_when_either_mask_is_empty():
    empty, blob = np.zeros((8, 8), bool), square(2, 2, 3, (8, 8))
    for pred, target in [(empty, empty), (blob, empty), (empty, blob)]:
        assert surface_distances(pred, target).pred_to_target.size == 0
        assert math.isnan(hausdorff95(pred, target)) and math.isnan(average_surface_distance(pred, target))
    with pytest.raises(ValueError, match="one shape"):
        hausdorff95(np.zeros((8, 8), bool), np.zeros((8, 9), bool))


def _disc(row: float, col: float, radius: float, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - row) ** 2 + (cols - col) ** 2 <= radius ** 2


def _shape_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ring = _disc(16, 16, 9) & ~_disc(16, 16, 5)
    ell = square(4, 4, 12) & ~square(4, 8, 12)                  # L: 4 wide, 12 tall, with a foot
    ell |= square(12, 4, 4) | square(12, 8, 4) | square(12, 12, 4)
    two_blobs = _disc(8, 8, 4) | _disc(24, 22, 5)
    pixel = square(16, 16, 1)
    return {
        "identical squares": (square(4, 4, 10), square(4, 4, 10)),
        "overlapping squares": (square(4, 4, 10), square(7, 9, 10)),
        "apart squares": (square(2, 2, 6), square(20, 18, 8)),
        "discs": (_disc(15, 15, 8), _disc(17, 14, 6.5)),
        "ring vs disc": (ring, _disc(16, 16, 9)),
        "ring vs offset ring": (ring, np.roll(ring, (2, -3), (0, 1))),
        "L vs square": (ell, square(5, 5, 11)),
        "two blobs vs one": (two_blobs, _disc(10, 10, 6)),
        "pixel vs square": (pixel, square(10, 10, 13)),
        "pixel vs pixel": (pixel, square(3, 28, 1)),
        "edge-touching": (square(0, 0, 9), square(0, 4, 12)),
        "line vs disc": (np.eye(32, dtype=bool), _disc(20, 12, 7)),
    }


def monai_distances(pred: np.ndarray, target: np.ndarray, spacing) -> tuple[float, float]:
    """MONAI's HD95 and symmetric ASSD of two bool masks (2-D or 3-D): the reference our distances must match."""
    monai_metrics = pytest.importorskip("monai.metrics")
    y_pred, y = (torch.from_numpy(m)[None, None].float() for m in (pred, target))  # one-hot (B, C, ...)
    return (monai_metrics.compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                     spacing=list(spacing)).item(),
            monai_metrics.compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                                           spacing=list(spacing)).item())


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI's own internal call
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 0.8)])
@pytest.mark.parametrize("name", list(_shape_pairs()))
def test_distances_match_monai(name: str, spacing: tuple[float, float]):
    pred, target = _shape_pairs()[name]
    expected_hd95, expected_assd = monai_distances(pred, target, spacing)
    # MONAI works in float32: agreement to its precision
    assert hausdorff95(pred, target, spacing) == pytest.approx(expected_hd95, rel=1e-6, abs=1e-6)
    assert average_surface_distance(pred, target, spacing) == pytest.approx(expected_assd, rel=1e-6, abs=1e-6)


def test_pooled_scores_sum_pixels_over_images():
    # image 1: tp 10, fp 0, fn 0; image 2: tp 0, fp 5, fn 5
    assert pooled_scores(10, 5, 5) == {"dice_pooled": pytest.approx(20 / 30), "iou_pooled": pytest.approx(10 / 20)}
    assert pooled_scores(0, 0, 0) == {"dice_pooled": 1.0, "iou_pooled": 1.0}  # nothing anywhere, nothing claimed


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI's own internal call
def test_volume_surface_distances_match_monai_on_random_blobs():
    from scipy import ndimage
    rng = np.random.default_rng(5)
    pred = ndimage.gaussian_filter(rng.random((20, 18, 9)), 2) > 0.5
    target = ndimage.gaussian_filter(rng.random((20, 18, 9)), 2) > 0.5
    spacing = (0.8, 0.9, 2.5)
    expected_hd95, expected_assd = monai_distances(pred, target, spacing)
    assert hausdorff95(pred, target, spacing) == pytest.approx(expected_hd95, rel=1e-5, abs=1e-5)
    assert average_surface_distance(pred, target, spacing) == pytest.approx(expected_assd, rel=1e-5, abs=1e-5)


def test_a_perfect_prediction_scores_one_on_every_overlap_metric_and_zero_distance():
    target = square(4, 6, 9)[None]
    for metric in (dice_per_image, iou_per_image, pixel_accuracy_per_image, precision_per_image,
                   sensitivity_per_image):
        assert metric(target, target).tolist() == [1.0]
    assert hausdorff95(target[0], target[0]) == 0.0 and average_surface_distance(target[0], target[0]) == 0.0


def test_a_nan_prediction_pixel_counts_as_tumour():
    counts = confusion_counts(np.array([[math.nan, 0.0]]), np.array([[1, 0]]))
    assert [t.tolist() for t in (counts.tp, counts.fp, counts.fn, counts.tn)] == [[1], [0], [0], [1]]


def test_a_batch_of_mismatched_shapes_adds_nothing_and_all_empty_images_pool_to_one():
    tracker = MetricTracker()
    with pytest.raises(ValueError, match="differ in shape"):
        tracker.update(torch.ones(2, 6, 6), torch.ones(2, 6, 5))
    assert tracker.dice == [] and not tracker.totals.any()
    tracker.update(torch.zeros(3, 1, 6, 6), torch.zeros(3, 6, 6))
    assert tracker.summary() == {"dice": 1.0, "iou": 1.0, "pixel_accuracy": 1.0, "dice_pooled": 1.0,
                                 "iou_pooled": 1.0}


def test_distances_refuse_a_spacing_of_another_dimension():
    with pytest.raises(ValueError, match="has 3 values for 2-D masks"):
        hausdorff95(square(1, 1, 3, (8, 8)), square(2, 2, 3, (8, 8)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="has 2 values for 3-D masks"):
        surface_distances(np.ones((4, 4, 4), bool), np.ones((4, 4, 4), bool), (1.0, 1.0))


