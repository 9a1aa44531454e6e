"""failures.py: the failure rules, checked in order."""

import numpy as np

from conftest import square
from tumorseg.evaluation.failures import (FAILURE_RULES, FRAGMENTED_MAX_DICE, FRAGMENTED_MIN_COMPONENTS, GOOD_MIN_DICE,
                                          HIGH_RATE, LOW_RATE, POOR_MAX_DICE, failure_category)
from tumorseg.evaluation.image_report import per_image_report


def test_failure_rules_apply_in_order():
    # fragmented comes before under-segmented, though both hold
    assert failure_category(0.3, 1.0, 0.2, 3, 100, 20, 20) == "fragmented"
    assert failure_category(0.3, 1.0, 0.2, 2, 100, 20, 20) == "under-segmented"
    assert failure_category(0.79, 0.7, 0.9, 1, 100, 130, 90) == "fair"


def test_every_failure_category_is_reached():
    empty, target = np.zeros((32, 32), bool), square(5, 5, 10)  # 100 tumour pixels
    fragments = square(5, 5, 2) | square(9, 9, 2) | square(13, 13, 2)  # 3 pieces inside the tumour
    half = target.copy()
    half[:, 10:] = False                                       # left half of the tumour
    cases = {
        "no tumour: correct": (empty, empty),
        "no tumour: false positive": (square(0, 0, 2), empty),
        "missed": (empty, target),
        "wrong place": (square(20, 20, 5), target),
        "fragmented": (fragments, target),
        "under-segmented": (half, target),                      # sensitivity 0.5, precision 1
        "over-segmented": (target, half),                       # precision 0.5, sensitivity 1
        "poor": (square(5, 11, 10), target),                    # 4 of 10 columns shared: Dice 0.4
        "good": (target, target),
        "fair": (square(5, 8, 10), target),                     # 7 of 10 columns shared: Dice 0.7
    }
    for expected, (pred, truth) in cases.items():
        assert per_image_report(pred, truth)["category"] == expected
    assert [name for name, _ in FAILURE_RULES] == list(cases)
    # each rule's words carry the constants the code uses
    rules = dict(FAILURE_RULES)
    assert f"{FRAGMENTED_MIN_COMPONENTS} or more" in rules["fragmented"]
    assert str(FRAGMENTED_MAX_DICE) in rules["fragmented"]
    assert str(LOW_RATE) in rules["under-segmented"] and str(HIGH_RATE) in rules["over-segmented"]
    assert str(POOR_MAX_DICE) in rules["poor"] and str(GOOD_MIN_DICE) in rules["good"]
