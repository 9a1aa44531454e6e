"""uncertainty.py: an image's uncertainty over the region any view could call tumour."""

import math

import numpy as np
import pytest

from tumorseg.evaluation.uncertainty import region_uncertainty


def test_region_uncertainty_averages_where_any_view_sees_tumour():
    probability = np.array([[0.0, 0.05, 0.1, 0.9]])
    spread = np.array([[0.0, 0.04, 0.2, 0.1]])
    assert region_uncertainty(spread, probability) == pytest.approx(0.15)  # the last two pixels
    assert region_uncertainty(spread, np.zeros_like(probability)) == 0.0  # all agree: nothing there


def test_region_uncertainty_leaves_out_nan_probabilities_and_refuses_other_shapes():
    assert region_uncertainty(np.array([0.1, 0.2]), np.array([math.nan, 0.5])) == pytest.approx(0.2)
    assert math.isnan(region_uncertainty(np.array([math.nan, 0.2]), np.array([0.5, 0.5])))
    with pytest.raises(IndexError):
        region_uncertainty(np.zeros((2, 2)), np.ones((2, 3)))
