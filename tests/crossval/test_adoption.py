"""adoption.py: the inner-validation rule by which lever B is adopted over A."""

import json
from pathlib import Path

from tumorseg.crossval.adoption import inner_validation_lines


def cross_validation(folder: Path, rule_dice: list[float]) -> Path:
    """A cross-validation folder whose fold k's summary.json has `rule_dice[k]` as its Dice with the rule."""
    for fold, dice in enumerate(rule_dice):
        (folder / f"fold{fold}").mkdir(parents=True)
        summary = {"best_val_dice": 0.0, "best_epoch": 1, "decision_rule": {"val_dice_with_rule": dice}}
        (folder / f"fold{fold}" / "summary.json").write_text(json.dumps(summary))
    return folder


def test_the_inner_validation_verdict_follows_the_adoption_rule(tmp_path):
    a = cross_validation(tmp_path / "runs" / "a", [0.0, 0.0, 0.0])
    for gains, adopted in (((0.001, 0.001, 0.001), True), ((0.02, 0.0, -0.004), True), ((0.02, 0.0, -0.006), False),
                           ((0.004, 0.004, 0.0), False)):
        b = cross_validation(tmp_path / "runs" / f"b{gains}", [0.0 + gain for gain in gains])
        lines = inner_validation_lines(a, b, [0, 1, 2])
        assert ("is ADOPTED" in lines[-1]) == adopted, (gains, lines[-1])
    assert "with its rule A 0.0000, B 0.0040; B - A +0.0040" in lines[0]
