"""looks.csv: every comparison of held-out folds, so each new look is counted and its p-value adjusted (Holm)."""

from __future__ import annotations

import csv
import datetime
import io
from pathlib import Path

from tumorseg.crossval.plan import read_plan
from tumorseg.evaluation.stats import holm_adjusted
from tumorseg.files import write_atomic

LOOKS_FILE = "looks.csv"
LOOKS_COLUMNS = ["time", "a", "b", "splits_sha256", "folds", "patients", "mean_difference", "p_value"]


def read_looks(runs_dir: Path) -> list[dict[str, str]]:
    """The rows of runs_dir/looks.csv (none when it does not exist)."""
    path = Path(runs_dir) / LOOKS_FILE
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []


def look_counts(cv_dir: Path, folds: range | list[int]) -> dict[int, int]:
    """How many recorded comparisons looked at each of `folds` of cv_dir's split (by its splits.json's hash)."""
    splits = read_plan(cv_dir).get("splits_sha256")
    rows = [row for row in read_looks(cv_dir.parent) if row["splits_sha256"] == splits]
    return {fold: sum(str(fold) in row["folds"].split() for row in rows) for fold in folds}


def record_look(first: Path, second: Path, splits: str, folds: list[int], patients: int,
                result: dict) -> tuple[int, float]:
    """Append this comparison to looks.csv beside A; the number of looks at these folds and Holm's p over them."""
    row = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "a": str(first), "b": str(second),
           "splits_sha256": splits, "folds": " ".join(map(str, folds)), "patients": patients,
           "mean_difference": f"{result['mean_difference']:.6f}", "p_value": f"{result['wilcoxon_p']:.6g}"}
    rows = [*read_looks(first.parent), row]
    text = io.StringIO()
    writer = csv.DictWriter(text, LOOKS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(first.parent / LOOKS_FILE, text.getvalue())
    folds_looked_at = set(row["folds"].split())
    overlapping = [r for r in rows if r["splits_sha256"] == splits and folds_looked_at & set(r["folds"].split())]
    return len(overlapping), holm_adjusted([float(r["p_value"]) for r in overlapping])[-1]
