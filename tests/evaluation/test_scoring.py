"""scoring.py: summary.json's scores from metrics rows, on hand-made masks whose every category is known."""

import argparse
import math

import numpy as np
import pytest

from tumorseg.evaluation.calibration import CalibrationTracker
from tumorseg.evaluation.failures import FAILURE_RULES
from tumorseg.evaluation.scoring import Scoring, class_mix, label_rows, parse_metric, score_image, score_summary

SIZE = 16


def square(top: int, left: int, side: int) -> np.ndarray:
    """A SIZE x SIZE bool mask holding one filled square."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[top:top + side, left:left + side] = True
    return mask


EMPTY = np.zeros((SIZE, SIZE), bool)
# image -> (prediction, truth, tumor_class, the failure category it must get)
CASES = {
    "g_missed": (EMPTY, square(2, 2, 4), "glioma", "missed"),
    "g_elsewhere": (square(10, 10, 4), square(2, 2, 4), "glioma", "wrong place"),
    "g_good": (square(2, 2, 6), square(2, 2, 6), "glioma", "good"),
    "m_under": (square(4, 4, 2), square(2, 2, 8), "meningioma", "under-segmented"),  # sensitivity 4/64
    "m_over": (square(2, 2, 8), square(4, 4, 2), "meningioma", "over-segmented"),  # precision 4/64
    "m_missed": (EMPTY, square(6, 6, 3), "meningioma", "missed"),
    "p_empty": (EMPTY, EMPTY, "pituitary", "no tumour: correct"),
}


def hand_made_summary(strata: list[str]) -> dict:
    """score_summary of CASES, with tumor_class as a --strata column when `strata` names it."""
    rows = [score_image(stem, predicted, truth, predicted.astype(np.float32), None, None)
            for stem, (predicted, truth, _, _) in CASES.items()]
    assert {row["image"]: row["category"] for row in rows} == {stem: case[3] for stem, case in CASES.items()}
    labels = {"tumor_class": {stem: case[2] for stem, case in CASES.items()}} if strata else {}
    scoring = Scoring("", strata, labels, None, "", None)
    calibration = CalibrationTracker()
    for predicted, truth, _, _ in CASES.values():
        calibration.update(predicted.astype(np.float32), truth)
    return score_summary(rows, scoring, label_rows(rows, scoring), calibration)


def test_failure_counts_per_stratum_value_sum_to_the_overall_counts():
    summary = hand_made_summary(["tumor_class"])
    by_class = summary["failure_counts_by_stratum"]["tumor_class"]
    categories = [name for name, _ in FAILURE_RULES]
    assert list(by_class) == ["glioma", "meningioma", "pituitary"]
    assert all(list(counts) == categories for counts in by_class.values())  # every category, zeros too
    expected = {"glioma": {"missed": 1, "wrong place": 1, "good": 1},
                "meningioma": {"under-segmented": 1, "over-segmented": 1, "missed": 1},
                "pituitary": {"no tumour: correct": 1}}
    for value, counts in by_class.items():
        assert counts == {name: expected[value].get(name, 0) for name in categories}, value
    for column, by_value in summary["failure_counts_by_stratum"].items():
        assert list(by_value) == list(summary["strata"][column]["groups"])  # the same values, same order
        for name in categories:
            assert sum(counts[name] for counts in by_value.values()) == summary["failure_counts"][name], column


def test_without_strata_only_tumour_size_is_counted_like_summary_strata():
    summary = hand_made_summary([])
    assert list(summary["failure_counts_by_stratum"]) == list(summary["strata"]) == ["tumour_size"]
    by_size = summary["failure_counts_by_stratum"]["tumour_size"]
    assert by_size["no tumour"]["no tumour: correct"] == 1 and sum(by_size["no tumour"].values()) == 1


def test_tumour_free_images_are_a_stratum_with_their_false_alarm_rate():
    cases = {"a": (EMPTY, EMPTY), "b": (EMPTY, EMPTY), "c": (square(1, 1, 2), EMPTY), "d": (EMPTY, EMPTY),
             "e": (square(2, 2, 4), square(2, 2, 4))}
    rows = [score_image(stem, predicted, truth, predicted.astype(np.float32), None, None)
            for stem, (predicted, truth) in cases.items()]
    scoring = Scoring("", [], {}, None, "", None)
    calibration = CalibrationTracker()
    for predicted, truth in cases.values():
        calibration.update(predicted.astype(np.float32), truth)
    summary = score_summary(rows, scoring, label_rows(rows, scoring), calibration)
    groups = summary["strata"]["tumour_size"]["groups"]
    assert (groups["no tumour"]["count"], groups["no tumour"]["false_alarms"]) == (4, 1)
    assert groups["no tumour"]["false_alarm_rate"] == 0.25 and groups["no tumour"]["dice_mean"] == 0.75
    assert all("false_alarm_rate" not in scores for label, scores in groups.items() if label != "no tumour")


def test_parse_metric_reads_an_empty_or_missing_cell_as_nan_and_refuses_text():
    assert parse_metric("0.25") == 0.25 and parse_metric("3") == 3.0
    assert math.isnan(parse_metric("")) and math.isnan(parse_metric(None)) and math.isnan(parse_metric("nan"))
    with pytest.raises(ValueError):
        parse_metric("high")


def test_class_mix_is_one_parser_for_test_py_and_crossval_py():
    assert class_mix("tumor_class:glioma=3,meningioma=1") == ("tumor_class", {"glioma": 0.75, "meningioma": 0.25})
    mix = "glioma=0.465,pituitary=0.304,meningioma=0.231"  # crossval.py's form: the column is its own
    assert class_mix(mix, "tumor_class") == ("tumor_class", {"glioma": 0.465, "pituitary": 0.304, "meningioma": 0.231})
    for bad in ("glioma=1", "tumor_class:glioma=-1", "tumor_class:glioma=0", "tumor_class:glioma", ":glioma=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="COLUMN:VALUE=WEIGHT"):
            class_mix(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="values of tumor_class"):
        class_mix("glioma=1,meningioma=x", "tumor_class")


def test_patient_vote_is_the_majority_and_a_tie_goes_to_the_larger_summed_probability():
    from tumorseg.evaluation.scoring import type_classification
    rows = [{"image": "a1", "predicted_type": "x", "type_probability": 0.9},
            {"image": "a2", "predicted_type": "y", "type_probability": 0.6},
            {"image": "b1", "predicted_type": "y", "type_probability": 0.5},
            {"image": "b2", "predicted_type": "y", "type_probability": 0.5},
            {"image": "b3", "predicted_type": "x", "type_probability": 0.99},
            {"image": "c1", "predicted_type": "x", "type_probability": 0.7}]
    truth = {"a1": "x", "a2": "x", "b1": "y", "b2": "y", "b3": "y", "c1": ""}  # c1: no label, left out
    groups = {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "b3": "B", "c1": "C"}
    result = type_classification(rows, "kind", truth, ["x", "y"], "patient", groups)
    assert result["images_without_label"] == 1
    assert result["per_image"]["confusion_matrix"] == [[1, 1], [1, 2]]
    assert result["per_patient"]["confusion_matrix"] == [[1, 0], [0, 1]]  # A: tie, x's 0.9 beats y's 0.6; B: 2 to 1
    assert result["per_patient"]["accuracy"] == 1.0 and result["per_image"]["accuracy"] == 0.6
