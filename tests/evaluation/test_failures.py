"""failures.py: the failure rules, checked in order."""

from tumorseg.evaluation.failures import failure_category


def test_failure_rules_apply_in_order():
    # fragmented comes before under-segmented, though both hold
    assert failure_category(0.3, 1.0, 0.2, 3, 100, 20, 20) == "fragmented"
    assert failure_category(0.3, 1.0, 0.2, 2, 100, 20, 20) == "under-segmented"
    assert failure_category(0.79, 0.7, 0.9, 1, 100, 130, 90) == "fair"
