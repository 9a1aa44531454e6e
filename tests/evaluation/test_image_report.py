"""image_report.py: every per-image number of one prediction, and a volume's scores."""

import math

import numpy as np
import pytest

from conftest import square
from tumorseg.evaluation.failures import failure_category
from tumorseg.evaluation.image_report import component_count, per_image_report, volume_report


def test_component_count_is_8_connected():
    diagonal = np.eye(4, dtype=bool)
    assert component_count(diagonal) == 1
    assert component_count(square(0, 0, 2) | square(0, 3, 2)) == 2
    assert component_count(np.zeros((4, 4), bool)) == 0

def test_per_image_report_numbers():
    pred, target = square(0, 0, 4), square(0, 10, 4)
    report = per_image_report(pred, target)
    assert "hd95_mm" not in report and "assd_mm" not in report
    assert report["dice"] == 0.0 and report["iou"] == 0.0 and report["precision"] == 0.0
    assert report["pixel_accuracy"] == pytest.approx(1 - 32 / 1024)
    assert report["hd95_px"] == pytest.approx(10.0) and report["assd_px"] == pytest.approx(8.5)
    assert (report["gt_pixels"], report["pred_pixels"], report["overlap_pixels"]) == (16, 16, 0)
    assert (report["pred_components"], report["true_components"]) == (1, 1)
    with_mm = per_image_report(pred | square(20, 20, 2), target, spacing=(0.5, 0.25))
    assert with_mm["pred_components"] == 2
    assert with_mm["hd95_mm"] < with_mm["hd95_px"] and not math.isnan(with_mm["assd_mm"])
    missed = per_image_report(np.zeros((8, 8), bool), square(1, 1, 2, (8, 8)), spacing=(1.0, 1.0))
    assert math.isnan(missed["hd95_mm"]) and math.isnan(missed["precision"]) and missed["sensitivity"] == 0.0

def test_volume_report_identity_and_a_shift_measured_in_mm():
    cube = np.zeros((12, 12, 10), bool)
    cube[3:8, 3:8, 2:6] = True
    same = volume_report(cube, cube, (0.5, 0.5, 3.0))
    assert same["dice"] == 1.0 and same["hd95_mm"] == 0.0 and same["assd_mm"] == 0.0
    assert same["gt_voxels"] == same["pred_voxels"] == same["overlap_voxels"] == 100
    shifted = np.roll(cube, 2, axis=2)  # two slices further along Z, 3 mm apart: 6 mm
    report = volume_report(shifted, cube, (0.5, 0.5, 3.0))
    assert report["dice"] == pytest.approx(2 * 50 / 200) and report["hd95_mm"] == pytest.approx(6.0)
    empty = volume_report(np.zeros_like(cube), cube, (1, 1, 1))
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95_mm"])
    with pytest.raises(ValueError, match=r"\(X, Y, Z\)"):
        volume_report(cube[..., 0], cube[..., 0], (1, 1))

def test_two_empty_masks_are_a_correct_no_tumour_with_undefined_distances():
    empty = np.zeros((8, 8), bool)
    report = per_image_report(empty, empty, spacing=(1.0, 1.0))
    assert all(report[key] == 1.0 for key in ("dice", "iou", "pixel_accuracy", "precision", "sensitivity"))
    assert all(math.isnan(report[key]) for key in ("hd95_px", "assd_px", "hd95_mm", "assd_mm"))
    assert report["category"] == "no tumour: correct" and report["pred_components"] == 0
    assert failure_category(1.0, math.nan, math.nan, 0, 0, 0, 0) == "no tumour: correct"
