"""An image's failure category: the rules, in plain words and as tests, with their thresholds."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


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

