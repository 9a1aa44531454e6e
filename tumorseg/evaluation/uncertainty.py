"""An image's uncertainty from the spread of several probability maps (TTA views or ensemble members)."""

from __future__ import annotations

import numpy as np

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

