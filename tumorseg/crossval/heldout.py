"""A cross-validation's held-out scores: read per fold, tabulated (crossval.md and .json), per patient, per category."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from tumorseg.crossval.looks import LOOKS_FILE, look_counts
from tumorseg.crossval.plan import read_plan
from tumorseg.evaluation.failures import FAILURE_RULES
# TAIL_DICE: the table's "share of slices below" this Dice, as in test.py's summary
from tumorseg.evaluation.scoring import TAIL_DICE, parse_metric, read_metrics
from tumorseg.evaluation.stats import patient_means
from tumorseg.runs.runfolder import read_split, read_summary
from tumorseg.files import json_ready, write_atomic

CLASS_COLUMN = "tumor_class"  # scored per value where metadata.csv has it


def held_out_rows(cv_dir: Path) -> dict[int, tuple[list[dict[str, str]], str]]:
    """Each scored fold's metrics.csv rows and patient column (its split.json's group column), by fold number.

    Only the plan's folds count, and only once trained to the end (summary.json) and scored: a stray
    fold<k> folder is never pooled. Raises FileNotFoundError (no plan, or no scored fold) or ValueError.
    """
    cv_dir = Path(cv_dir)
    found = {}
    for fold in range(read_plan(cv_dir)["folds"]):
        run_dir, path = cv_dir / f"fold{fold}", cv_dir / "heldout" / f"fold{fold}" / "metrics.csv"
        if path.is_file() and (run_dir / "summary.json").is_file():
            found[fold] = (read_metrics(path), read_split(run_dir).get("group_column") or "")
    if not found:
        raise FileNotFoundError(f"{cv_dir}: no scored fold (heldout/fold<k>/metrics.csv); run crossval.py run first")
    return found


def slice_scores(rows: list[dict[str, str]], patients: str, class_mix: dict[str, float] | None) -> dict[str, float]:
    """The table's figures for one set of held-out slices (a fold, or all folds pooled); `patients` names the column.

    Keys: slices, patients, dice_mean, dice_median, patient_dice_mean, share_below_tail,
    hd95_mm_median (or hd95_px_median without a pixel spacing), dice_<class> per
    tumour class, class_mix_dice with `class_mix`. HD95's median leaves out
    slices where it is undefined (nothing predicted).
    """
    dice = np.array([parse_metric(r["dice"]) for r in rows])
    hd95_key = "hd95_mm" if "hd95_mm" in rows[0] else "hd95_px"
    hd95 = np.array([parse_metric(r.get(hd95_key)) for r in rows])
    scores = {"slices": len(rows), "dice_mean": float(dice.mean()), "dice_median": float(np.median(dice)),
              "share_below_tail": float((dice < TAIL_DICE).mean()),
              f"{hd95_key}_median": float(np.nanmedian(hd95)) if np.isfinite(hd95).any() else math.nan}
    if patients and patients in rows[0]:
        means = patient_means(dice, [row[patients] for row in rows])
        scores["patients"] = len(means)
        scores["patient_dice_mean"] = float(np.mean(list(means.values())))
    if CLASS_COLUMN in rows[0]:
        for name in sorted({r[CLASS_COLUMN] for r in rows}):
            scores[f"dice_{name}"] = float(dice[[r[CLASS_COLUMN] == name for r in rows]].mean())
        if class_mix:
            scores["class_mix_dice"] = sum(w * scores.get(f"dice_{c}", math.nan) for c, w in class_mix.items())
    return scores


def collect(cv_dir: Path, class_mix: dict[str, float] | None) -> dict:
    """Per fold, over all held-out slices of the scored folds together, and mean +- sd over folds (sd with ddof 1)."""
    by_fold = held_out_rows(cv_dir)
    folds = {fold: slice_scores(rows, patients, class_mix) for fold, (rows, patients) in by_fold.items()}
    all_slices = slice_scores([row for rows, _ in by_fold.values() for row in rows],
                              next(iter(by_fold.values()))[1], class_mix)
    over_folds = {}
    for key in all_slices:
        values = [scores[key] for scores in folds.values() if key in scores and not math.isnan(scores[key])]
        if key not in ("slices", "patients") and values:
            over_folds[key] = {"mean": float(np.mean(values)),
                               "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan}
    minutes = {fold: read_summary(Path(cv_dir) / f"fold{fold}").get("minutes") for fold in folds}
    return {"cv_dir": str(cv_dir), "folds": folds, "all_slices": all_slices, "over_folds": over_folds,
            "training_minutes": minutes, "class_mix": class_mix, "dice_below": TAIL_DICE,
            "looks": look_counts(Path(cv_dir), range(read_plan(Path(cv_dir))["folds"]))}


def markdown_table(result: dict) -> str:
    """crossval.md: one row per fold, the all-slices row, mean +- sd over folds, and the looks at each fold."""
    pooled = result["all_slices"]
    order = ["slices", "patients", "dice_mean", "dice_median", "patient_dice_mean", "class_mix_dice",
             "share_below_tail"]
    columns = [key for key in order if key in pooled] + sorted(k for k in pooled if k.startswith("dice_")
                                                               and k not in order)
    columns += [key for key in pooled if key.startswith("hd95")]
    titles = {"slices": "slices", "patients": "patients", "dice_mean": "mean Dice", "dice_median": "median Dice",
              "patient_dice_mean": "per-patient mean", "class_mix_dice": "class-mix mean",
              "share_below_tail": f"slices < {TAIL_DICE}", "hd95_mm_median": "HD95 median (mm)",
              "hd95_px_median": "HD95 median (px)"}

    def text(key: str, value: float | int | None, sd: float | None = None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, int):
            return str(value)
        share = key == "share_below_tail"
        shown = f"{value:.1%}" if share else f"{value:.3f}"
        if sd is not None and not math.isnan(sd):
            shown += f" ± {sd:.1%}" if share else f" ± {sd:.3f}"
        return shown

    header = ["", *(titles.get(c, c.removeprefix("dice_")) for c in columns), "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for fold, scores in sorted(result["folds"].items()):
        minutes = result["training_minutes"].get(fold)
        lines.append("| " + " | ".join([f"fold {fold}", *(text(c, scores.get(c)) for c in columns),
                                        f"{minutes:.1f}" if minutes else ""]) + " |")
    lines.append("| " + " | ".join(["**all slices**", *(f"**{text(c, pooled.get(c))}**" for c in columns), ""])
                 + " |")
    spread = result["over_folds"]
    lines.append("| " + " | ".join(["mean ± sd over folds",
                                    *(text(c, spread[c]["mean"], spread[c]["sd"]) if c in spread else ""
                                      for c in columns), ""]) + " |")
    looks = ", ".join(f"fold {fold}: {count}" + (" (fresh)" if not count else "")
                      for fold, count in sorted(result["looks"].items()))
    return ("\n".join(lines) + "\n\n**all slices**: every held-out slice of the scored folds, each counted once "
            f"(the mean of per-slice Dice, not pixel-pooled).\nComparisons that looked at each held-out fold "
            f"({LOOKS_FILE}): {looks}\n")


def write_table(cv_dir: Path, class_mix: dict[str, float] | None) -> int:
    """Write cv_dir/crossval.json and crossval.md and print the table; the exit code."""
    try:
        result = collect(Path(cv_dir), class_mix)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = markdown_table(result)
    write_atomic(Path(cv_dir) / "crossval.json", json.dumps(json_ready(result), indent=2) + "\n")
    write_atomic(Path(cv_dir) / "crossval.md", table)
    print(table + f"\nwritten: {Path(cv_dir) / 'crossval.md'} and crossval.json")
    return 0


def held_out_patients(cv_dir: Path, folds: set[int]) -> tuple[dict[str, float], dict[str, str], dict[int, list[str]]]:
    """Each held-out patient's mean Dice in `folds`, its tumour class ("" if unknown), and each fold's slices."""
    dice: list[float] = []
    patients: list[str] = []
    classes: dict[str, str] = {}
    slices = {}
    for fold, (rows, column) in held_out_rows(cv_dir).items():
        if fold not in folds:
            continue
        if not column or column not in rows[0]:
            raise ValueError(f"{cv_dir}: fold {fold} was not split by patient (or its metrics.csv lacks the "
                             "patient column), so its patients cannot be paired")
        for row in rows:
            dice.append(parse_metric(row["dice"]))
            patients.append(row[column])
            classes[row[column]] = row.get(CLASS_COLUMN, "")
        slices[fold] = sorted(r["image"] for r in rows)
    return patient_means(dice, patients), classes, slices


def category_lines(first: Path, second: Path, folds: list[int]) -> list[str]:
    """Held-out slices per failure category (metrics.csv's `category`), A -> B, for all slices and per tumour class."""
    rows = {side: [row for fold, (found, _) in held_out_rows(cv).items() if fold in folds for row in found]
            for side, cv in (("a", first), ("b", second))}
    if "category" not in rows["a"][0] or "category" not in rows["b"][0]:
        return []
    found = {row["category"] for side in rows.values() for row in side}
    categories = [name for name, _ in FAILURE_RULES if name in found]
    groups = ["all"] + sorted({row.get(CLASS_COLUMN, "") for row in rows["a"]} - {""})
    width = max(len(c) for c in categories) + 2
    lines = [f"  {'':<{width}}" + "".join(f"{g:>18}" for g in groups)]
    for category in categories:
        cells = []
        for group in groups:
            a, b = (sum(row["category"] == category and group in ("all", row.get(CLASS_COLUMN)) for row in rows[side])
                    for side in ("a", "b"))
            cells.append(f"{f'{a} -> {b}':>18}")
        lines.append(f"  {category:<{width}}" + "".join(cells))
    return lines
