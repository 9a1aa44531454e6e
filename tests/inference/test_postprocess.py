import itertools
import json

import numpy as np
import pytest
from scipy import ndimage

from metrics import dice_per_image
from tumorseg.inference.postprocess import DecisionRule, search_rule


def square(size: int, top: int, left: int, side: int, value: float = 0.9) -> np.ndarray:
    """A (size, size) map of zeros with one `side` x `side` square of `value`."""
    image = np.zeros((size, size))
    image[top:top + side, left:left + side] = value
    return image


def test_largest_component_removes_a_detached_blob():
    probability = square(32, 2, 2, 10) + square(32, 20, 20, 3)
    assert DecisionRule().apply(probability).sum() == 100 + 9
    kept = DecisionRule(keep_largest=True).apply(probability)
    assert kept.sum() == 100 and kept[2:12, 2:12].all()


def test_largest_component_ties_keep_the_first_in_label_order():
    kept = DecisionRule(keep_largest=True).apply(square(32, 20, 2, 4) + square(32, 2, 20, 4))
    assert kept.sum() == 16 and kept[2:6, 20:24].all()  # the square on the upper rows is labelled first


def test_diagonal_neighbours_are_one_component():
    probability = np.zeros((8, 8))
    probability[[1, 2, 3], [1, 2, 3]] = 0.9  # a diagonal line: one 8-connected component of 3 pixels
    assert DecisionRule(min_component_pixels=3).apply(probability).sum() == 3


def test_min_size_drops_small_components_and_keeps_big_ones():
    probability = square(32, 2, 2, 6) + square(32, 20, 20, 2)  # 36 and 4 pixels
    assert DecisionRule(min_component_pixels=5).apply(probability).sum() == 36
    assert DecisionRule(min_component_pixels=36).apply(probability).sum() == 36  # "smaller than": 36 stays
    assert not DecisionRule(min_component_pixels=37).apply(probability).any()  # all too small: empty
    assert not DecisionRule(min_component_pixels=37, keep_largest=True).apply(probability).any()


def test_fill_holes_fills_an_enclosed_hole_but_not_an_open_notch():
    ring = square(20, 2, 2, 7)
    ring[4:7, 4:7] = 0  # 3x3 hole, enclosed
    notch = square(20, 10, 10, 7)
    notch[12:15, 12:17] = 0  # 3x5 notch open to the right edge of the square
    filled = DecisionRule(fill_holes=True).apply(ring + notch)
    assert filled[4:7, 4:7].all()
    assert not filled[12:15, 12:17].any()
    ring[2, 2] = 0  # a missing corner is a diagonal gap only: the hole stays closed
    assert DecisionRule(fill_holes=True).apply(ring)[4:7, 4:7].all()


def test_fill_runs_before_the_size_limit():
    ring = square(20, 2, 2, 7)
    ring[3:8, 3:8] = 0  # a 24-pixel rim around a 25-pixel hole
    assert not DecisionRule(min_component_pixels=40).apply(ring).any()
    assert DecisionRule(min_component_pixels=40, fill_holes=True).apply(ring).sum() == 49


def test_threshold_is_strictly_greater():
    probability = np.array([[0.5, np.nextafter(0.5, 1.0), 0.49, np.nan]])
    assert DecisionRule(threshold=0.5).apply(probability).tolist() == [[False, True, False, False]]
    assert not DecisionRule(threshold=1.0).apply(np.ones((3, 3))).any()


@pytest.mark.parametrize("keep_largest, min_pixels, fill", itertools.product([False, True], [0, 16], [False, True]))
def test_empty_input_stays_empty(keep_largest, min_pixels, fill):
    rule = DecisionRule(0.5, keep_largest, min_pixels, fill)
    mask = rule.apply(np.zeros((16, 16)))
    assert mask.dtype == bool and mask.shape == (16, 16) and not mask.any()


def test_apply_refuses_maps_that_are_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        DecisionRule().apply(np.zeros((1, 8, 8)))


def test_dict_round_trip_through_json():
    rule = DecisionRule(threshold=0.45, keep_largest=True, min_component_pixels=64, fill_holes=True)
    assert DecisionRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert DecisionRule.from_dict({"threshold": 0.4}) == DecisionRule(threshold=0.4)  # missing keys: defaults


def test_from_dict_names_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown decision-rule keys: largest, thresh"):
        DecisionRule.from_dict({"thresh": 0.5, "largest": True})
    for key, value in [("threshold", 1.5), ("threshold", float("nan")), ("threshold", "0.5"),
                       ("keep_largest", 1), ("fill_holes", "yes"), ("min_component_pixels", -1),
                       ("min_component_pixels", 2.5)]:
        with pytest.raises(ValueError, match=key):
            DecisionRule.from_dict({key: value})


def test_describe():
    assert DecisionRule().describe() == "threshold 0.5"
    assert (DecisionRule(0.45, True, 64, True).describe()
            == "threshold 0.45, fill holes, components of 64+ px, largest component")


def test_search_picks_largest_component_when_every_image_has_a_false_blob():
    truths = [square(64, 4 + i, 4, 30, 1.0) > 0 for i in range(5)]  # 900 pixels each
    # The false blob has 289 pixels: too big for any size limit in the grid, so only keep_largest removes it.
    probabilities = [np.where(t, 0.9, 0.05) + square(64, 40, 40, 17, 0.8) for t in truths]
    best, table = search_rule(probabilities, truths)
    assert best == DecisionRule(keep_largest=True)  # fill holes and other thresholds tie; the simplest wins
    assert table[0]["mean_dice"] == pytest.approx(1.0)
    plain = next(row for row in table if DecisionRule.from_dict({k: row[k] for k in row if k != "mean_dice"})
                 == DecisionRule())
    assert plain["mean_dice"] == pytest.approx(2 * 900 / (900 + 900 + 289))


def test_search_keeps_the_plain_default_when_nothing_helps():
    truths = [square(48, 5, 5 + i, 20, 1.0) > 0 for i in range(4)] + [np.zeros((48, 48), bool)]
    probabilities = [np.where(t, 0.8, 0.2) for t in truths]  # already perfect: every rule scores 1
    best, table = search_rule(probabilities, truths)
    assert best == DecisionRule() and table[0]["mean_dice"] == 1.0
    assert len(table) == 9 * 2 * 4 * 2


def test_search_table_is_sorted_best_first():
    rng = np.random.default_rng(0)
    probabilities = [ndimage.gaussian_filter(rng.random((40, 40)), 2) * 2 - 0.5 for _ in range(4)]
    truths = [p > 0.55 for p in probabilities]
    best, table = search_rule(probabilities, truths)
    scores = [row["mean_dice"] for row in table]
    assert scores == sorted(scores, reverse=True) and len(set(map(str, table))) == len(table)
    assert DecisionRule.from_dict({k: v for k, v in table[0].items() if k != "mean_dice"}) == best
    assert set(table[0]) == {"threshold", "keep_largest", "min_component_pixels", "fill_holes", "keep_most_probable",
                             "mean_dice"}


def test_search_scores_match_applying_each_rule():
    rng = np.random.default_rng(1)
    probabilities = [ndimage.gaussian_filter(rng.random((48, 48)), 1.5) for _ in range(5)]
    probabilities = [(p - p.min()) / (p.max() - p.min()) for p in probabilities]
    nested = square(48, 5, 5, 15)
    nested[8:17, 8:17] = 0
    nested[11:14, 11:14] = 0.9  # an island inside a ring's hole
    probabilities += [nested + square(48, 30, 30, 6), np.zeros((48, 48))]  # and one map with nothing above threshold
    truths = [ndimage.gaussian_filter(rng.random((48, 48)), 2) > 0.5 for _ in probabilities[:-1]]
    truths.append(np.zeros((48, 48), bool))  # an empty truth too
    grids = dict(thresholds=(0.4, 0.5, 0.6), min_component_pixels=(0, 5, 40), keep_most_probable=(False, True))
    _, table = search_rule(probabilities, truths, **grids)
    assert len(table) == 3 * 3 * 3 * 2  # keep: all, largest or most probable (never both)
    for row in table:
        rule = DecisionRule.from_dict({k: v for k, v in row.items() if k != "mean_dice"})
        masks = np.stack([rule.apply(p) for p in probabilities])
        assert row["mean_dice"] == pytest.approx(dice_per_image(masks, np.stack(truths)).mean().item(), abs=1e-12), rule


def test_search_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="2 probability maps but 1 masks"):
        search_rule([np.zeros((4, 4))] * 2, [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="image 0"):
        search_rule([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="no images"):
        search_rule([], [])
    with pytest.raises(ValueError, match="threshold"):
        search_rule([np.zeros((4, 4))], [np.zeros((4, 4))], thresholds=(2.0,))


def faint_lesion_and_bright_speck_and_large_faint_false_alarm() -> tuple[np.ndarray, np.ndarray]:
    """A 10x10 confident lesion, a 3x3 bright speck and a 20x20 faint false alarm; the truth is the lesion."""
    probability = square(64, 5, 5, 10, 0.95) + square(64, 5, 40, 3, 0.99) + square(64, 35, 35, 20, 0.55)
    return probability, square(64, 5, 5, 10, 1.0) > 0


def test_keep_most_probable_keeps_the_component_of_highest_summed_probability():
    probability, truth = faint_lesion_and_bright_speck_and_large_faint_false_alarm()
    # masses: false alarm 400 x 0.55 = 220, lesion 100 x 0.95 = 95, speck 9 x 0.99 = 8.9
    assert DecisionRule(keep_largest=True).apply(probability).sum() == 400
    assert DecisionRule(keep_most_probable=True).apply(probability).sum() == 400
    # at threshold 0.6 the faint alarm is gone, and the most probable of the rest is the lesion, not the speck
    kept = DecisionRule(threshold=0.6, keep_most_probable=True).apply(probability)
    assert (kept == truth).all()
    assert DecisionRule(threshold=0.6, keep_most_probable=True, min_component_pixels=200).apply(probability).sum() == 0
    assert DecisionRule(keep_most_probable=True).describe() == "threshold 0.5, most probable component"
    with pytest.raises(ValueError, match="exclude each other"):
        DecisionRule(keep_largest=True, keep_most_probable=True)
    assert not DecisionRule(keep_most_probable=True).apply(np.zeros((8, 8))).any()


def test_keep_most_probable_picks_a_dim_but_wide_lesion_over_a_bright_small_blob():
    probability = square(64, 5, 5, 14, 0.7) + square(64, 40, 40, 10, 0.98)  # masses 137.2 vs 98
    truth = square(64, 5, 5, 14, 1.0) > 0
    assert (DecisionRule(keep_most_probable=True).apply(probability) == truth).all()
    peak_mass = DecisionRule(keep_most_probable=True).apply(np.where(truth, 0.51, probability))  # now 99.96 vs 98
    assert (peak_mass == truth).all()


def test_search_tries_the_most_probable_component_only_when_asked():
    truths, probabilities = [], []
    for shift in range(4):
        truth = square(64, 4 + shift, 4, 12, 1.0) > 0  # 144 px lesion at 0.9: mass 129.6
        truths.append(truth)
        probabilities.append(np.where(truth, 0.9, 0.0) + square(64, 40, 40, 13, 0.75))  # 169 px alarm: mass 126.75
    best, table = search_rule(probabilities, truths)  # no threshold of the grid removes the alarm; largest keeps it
    assert not best.keep_most_probable and table[0]["mean_dice"] < 1
    best, table = search_rule(probabilities, truths, keep_most_probable=(False, True))
    assert best == DecisionRule(keep_most_probable=True) and table[0]["mean_dice"] == pytest.approx(1.0)
