"""test.py --compare: the paired per-image Dice comparison of two prediction folders."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

import report
from metrics import describe_paired_comparison, paired_comparison


def dice_by_image(folder: Path) -> dict[str, float]:
    """Each image's Dice from a prediction folder's metrics.csv; errors name the file and line."""
    path = Path(folder) / "metrics.csv"
    dice = {}
    for line, row in enumerate(report.read_metrics(path), start=2):
        try:
            value = float(row["dice"])
        except (TypeError, ValueError):
            value = math.nan
        if not 0 <= value <= 1:
            raise ValueError(f"{path}: line {line}: Dice {row['dice']!r} is not a number from 0 to 1")
        dice[row["image"]] = value
    return dice


def compare_predictions(first: Path, second: Path) -> int:
    """Print per-image Dice of two prediction folders, B minus A, with a paired Wilcoxon signed-rank test.

    Only images scored in both folders are compared. Returns the exit code: 1
    when a folder has no readable metrics.csv or they share no image.
    """
    try:
        dice_a, dice_b = dice_by_image(first), dice_by_image(second)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    shared = sorted(set(dice_a) & set(dice_b))
    if not shared:
        print(f"error: {first} and {second} share no scored image; compare predictions of the same images",
              file=sys.stderr)
        return 1
    differences = np.array([dice_b[name] - dice_a[name] for name in shared])
    width = max(12, *(len(name) for name in shared)) + 2
    print(f"A = {first}\nB = {second}\nper-image Dice, most worsened first:")
    print(f"  {'image':<{width}}{'A':>8}{'B':>8}{'B - A':>9}")
    for index in np.argsort(differences, kind="stable"):
        name = shared[index]
        print(f"  {name:<{width}}{dice_a[name]:>8.4f}{dice_b[name]:>8.4f}{differences[index]:>+9.4f}")
    only_a, only_b = len(set(dice_a) - set(dice_b)), len(set(dice_b) - set(dice_a))
    print(f"\n{len(shared)} images in both" + (f" ({only_a} only in A, {only_b} only in B: left out)"
                                              if only_a or only_b else ""))
    print(describe_paired_comparison(paired_comparison(differences)))
    return 0
