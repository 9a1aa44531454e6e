"""stats.py: summaries, rank correlation, AUROC, the paired Wilcoxon test, Holm's adjustment, per-patient means."""

import math

import pytest

from tumorseg.evaluation.stats import (auroc, describe_paired_comparison, holm_adjusted, paired_comparison, patient_means,
                                       rank_correlation, summarise)


def test_rank_correlation_and_auroc():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, math.nan], [3, 2, 1, 0]) == pytest.approx(-1.0)  # NaN pair left out
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert math.isnan(auroc([0.1, 0.2], [True, True]))
    assert math.isnan(auroc([0.0, 0.0, 0.0], [True, False, True]))  # a self-ensemble's zero uncertainty ranks nothing


def test_summarise_leaves_out_undefined_values():
    s = summarise([1.0, math.nan, 3.0, 2.0])
    assert s == {"mean": 2.0, "median": 2.0, "std": pytest.approx(math.sqrt(2 / 3)), "count": 3,
                 "count_undefined": 1}
    s = summarise([math.nan])
    assert math.isnan(s["mean"]) and s["count"] == 0 and s["count_undefined"] == 1


def test_paired_comparison_of_a_model_with_itself_is_no_difference():
    same = paired_comparison([0.0] * 7)
    assert same["mean_difference"] == 0 and same["wilcoxon_p"] == 1.0 and same["wilcoxon_w"] is None
    assert same["equal"] == 7 and "not applicable" in describe_paired_comparison(same)
    better = paired_comparison([0.1, 0.2, 0.15, 0.05, 0.3, 0.12, 0.08, 0.2, 0.11, 0.09])
    assert better["b_better"] == 10 and better["wilcoxon_p"] < 0.01
    with pytest.raises(ValueError):
        paired_comparison([0.1, float("nan")])


def test_holm_adjustment_matches_the_step_down_by_hand_and_leaves_one_p_alone():
    assert holm_adjusted([0.03]) == [0.03] and holm_adjusted([]) == []
    # sorted 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (kept monotone), in the order given
    assert holm_adjusted([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm_adjusted([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_patient_means_average_each_patients_images_in_order_of_first_appearance():
    means = patient_means([0.2, 0.9, 0.4, 1.0], ["p2", "p1", "p2", "p1"])
    assert list(means) == ["p2", "p1"] and means == {"p2": pytest.approx(0.3), "p1": pytest.approx(0.95)}
    assert patient_means([], []) == {}
    with pytest.raises(ValueError):
        patient_means([0.5], ["p1", "p2"])
