"""calibration.py: reliability bins, ECE and Brier score over pixels."""

import math

import numpy as np
import pytest

from tumorseg.evaluation.calibration import CalibrationTracker


def calibration_bins(probabilities: np.ndarray, targets: np.ndarray, bins: int = 10) -> dict:
    """`CalibrationTracker.summary` of all pixels at once."""
    tracker = CalibrationTracker(bins)
    tracker.update(probabilities, targets)
    return tracker.summary()

def test_calibration_hand_computed_and_accumulated():
    p = np.array([0.05, 0.05, 0.95, 1.0])
    y = np.array([False, True, True, True])
    # bin 0: conf 0.05, freq 0.5; bin 9 (holds p = 1): conf 0.975, freq 1.0
    summary = calibration_bins(p, y)
    assert summary["counts"] == [2] + [0] * 8 + [2]
    assert summary["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.025)
    assert math.isnan(summary["mean_confidence"][5]) and summary["observed_frequency"][0] == 0.5
    tracker = CalibrationTracker()
    tracker.update(p[:2].reshape(1, 2), y[:2].reshape(1, 2))
    tracker.update(p[2:], y[2:])
    np.testing.assert_equal(tracker.summary(), summary)  # treats NaN (empty bins) as equal
    with pytest.raises(ValueError, match="must lie in"):
        tracker.update(np.array([1.5]), np.array([True]))
    with pytest.raises(ValueError, match="no pixels"):
        CalibrationTracker().summary()

def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = rng.random(p.size) < p                       # tumour with exactly the predicted probability
    assert calibration_bins(p, y)["ece"] < 0.01
    overconfident = np.where(p > 0.5, 1 - (1 - p) / 4, p / 4)  # pushed towards 0 and 1
    assert calibration_bins(overconfident, y)["ece"] > 0.1

def test_calibration_refuses_nan_probabilities_and_fewer_than_one_bin():
    tracker = CalibrationTracker()
    with pytest.raises(ValueError, match="must lie in"):
        tracker.update(np.array([0.5, math.nan]), np.array([True, False]))
    assert not tracker.counts.any()
    with pytest.raises(ValueError, match="bins must be at least 1"):
        CalibrationTracker(bins=0)
