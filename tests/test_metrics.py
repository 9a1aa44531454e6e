import math

import numpy as np
import pytest
import torch

from metrics import (MetricTracker, confusion_counts, dice_per_image, iou_per_image, pixel_accuracy_per_image,
                     precision_per_image, sensitivity_per_image)

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
