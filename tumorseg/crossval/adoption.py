"""The adoption rule: whether lever B is adopted over A, judged on each fold's inner-validation patients only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tumorseg.runs.runfolder import read_summary

# The inner-validation rule a lever is adopted by (README, "How a lever is chosen").
ADOPT_MIN_MEAN_GAIN = 0.005
ADOPT_MAX_FOLD_LOSS = 0.005


def inner_validation_lines(first: Path, second: Path, folds: list[int]) -> list[str]:
    """Each fold's inner-validation Dice of A and B, and the adoption rule's verdict on them.

    Two figures per run, both on the inner-validation patients: the best
    epoch's Dice (threshold THRESHOLD; it chose the epoch) and the Dice with
    the decision rule searched on them (the pipeline as test.py applies it).
    The verdict uses the second where both runs searched a rule, so that a
    rule lever (which changes only the rule) is judged too; else the first.
    B is adopted over A when better in every fold, or better by a mean of at
    least ADOPT_MIN_MEAN_GAIN with no fold worse by more than
    ADOPT_MAX_FOLD_LOSS. The held-out patients take no part in this.
    """
    summaries = {fold: [read_summary(Path(cv) / f"fold{fold}") for cv in (first, second)] for fold in folds}
    with_rule = all(s.get("decision_rule") for pair in summaries.values() for s in pair)
    lines, gains = [], []
    for fold, (a, b) in summaries.items():
        scores = [s["decision_rule"]["val_dice_with_rule"] if with_rule else s["best_val_dice"] for s in (a, b)]
        gains.append(scores[1] - scores[0])
        lines.append(f"  fold {fold}: best epoch A {a['best_val_dice']:.4f} (epoch {a['best_epoch']}), "
                     f"B {b['best_val_dice']:.4f} (epoch {b['best_epoch']})"
                     + (f"; with its rule A {scores[0]:.4f}, B {scores[1]:.4f}" if with_rule else "")
                     + f"; B - A {gains[-1]:+.4f}")
    adopt = all(g > 0 for g in gains) or (np.mean(gains) >= ADOPT_MIN_MEAN_GAIN
                                          and min(gains) >= -ADOPT_MAX_FOLD_LOSS)
    lines.append(f"  on the Dice {'with the rule' if with_rule else 'of the best epoch'}: mean B - A "
                 f"{np.mean(gains):+.4f}, B better in {sum(g > 0 for g in gains)} of {len(gains)} folds, so by the "
                 f"inner-validation rule B is {'ADOPTED' if adopt else 'NOT adopted'} over A (better in every "
                 f"fold, or by a mean >= +{ADOPT_MIN_MEAN_GAIN} with no fold below -{ADOPT_MAX_FOLD_LOSS})")
    return lines
