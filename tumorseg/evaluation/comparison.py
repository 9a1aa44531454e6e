"""test.py --compare: the paired Dice comparison of two prediction folders, per patient where known, else per image.

Slices of one patient are not independent: a test over them as if they were
gives too small a p-value. So the pairs are patients (each scored by the mean
Dice of its slices, as crossval.py compare does) wherever every compared
image's patient is known, and images otherwise, said in the output.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.data import reading
from tumorseg.evaluation.scoring import metadata_column, read_metrics
from tumorseg.evaluation.stats import describe_paired_comparison, paired_comparison, patient_means

PATIENT_COLUMN = reading.PATIENT_COLUMN


@dataclass
class ScoredFolder:
    """One prediction folder's per-image Dice and, where known, each image's patient."""

    path: Path
    dice: dict[str, float]  # image -> Dice
    patients: dict[str, str]  # image -> patient id; images without a known patient are absent
    source: str  # where `patients` came from, or why there are none


def dice_by_image(path: Path, rows: list[dict[str, str]]) -> dict[str, float]:
    """Each image's Dice from metrics.csv's `rows` (read from `path`); errors name the file and line."""
    dice = {}
    for line, row in enumerate(rows, start=2):
        try:
            value = float(row["dice"])
        except (TypeError, ValueError):
            value = math.nan
        if not 0 <= value <= 1:
            raise ValueError(f"{path}: line {line}: Dice {row['dice']!r} is not a number from 0 to 1")
        dice[row["image"]] = value
    return dice


def summary_data_root(folder: Path) -> Path | None:
    """The data root the folder's summary.json names (test.py's DATA_ROOT); None without a readable one."""
    try:
        root = json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("data_root")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(root) if isinstance(root, str) and root else None


def patients_of(folder: Path, rows: list[dict[str, str]], data_root: Path | None) -> tuple[dict[str, str], str]:
    """Each image's patient ("" where unknown) and where it came from, first source found of three.

    1. `data_root`'s metadata.csv (--data-root given): it must exist and have PATIENT_COLUMN, else
       FileNotFoundError or ValueError naming the file.
    2. metrics.csv's own PATIENT_COLUMN (test.py writes it when it grouped or stratified by patient).
    3. metadata.csv of the data root the folder's summary.json names, where it is readable and has the column.

    A volume slice without a metadata row of its own takes its volume's, as test.py's scoring does.
    Returns ({}, why not) when no source names patients.
    """
    def look_up(root: Path) -> dict[str, str]:
        names = {row["image"] for row in rows} | {row["volume"] for row in rows if row.get("volume")}
        # metadata_column keys by file stem: a suffix keeps a name like 'case.01' whole
        found = metadata_column(root, PATIENT_COLUMN, [Path(f"{name}.png") for name in names], "--compare")
        return {row["image"]: found[row["image"]] or found.get(row.get("volume") or "", "") for row in rows}

    if data_root is not None:  # asked for: a missing file or column is an error (raised by metadata_column)
        return look_up(data_root), f"{PATIENT_COLUMN} of {data_root / reading.METADATA_FILE}"
    if rows and PATIENT_COLUMN in rows[0]:
        return {row["image"]: row[PATIENT_COLUMN] for row in rows}, f"{PATIENT_COLUMN} of {folder / 'metrics.csv'}"
    root = summary_data_root(folder)
    if root is None:
        return {}, f"{folder}: no {PATIENT_COLUMN} column in metrics.csv and no data root in summary.json"
    try:
        return look_up(root), f"{PATIENT_COLUMN} of {root / reading.METADATA_FILE}"
    except (FileNotFoundError, ValueError) as error:
        return {}, f"{folder}: no {PATIENT_COLUMN} column in metrics.csv, and its data root's: {error}"


def read_folder(folder: Path, data_root: Path | None) -> ScoredFolder:
    """A prediction folder's Dice and patients; FileNotFoundError or ValueError naming the file."""
    path = Path(folder) / "metrics.csv"
    rows = read_metrics(path)
    patients, source = patients_of(Path(folder), rows, data_root)
    # an empty cell or a missing metadata row: unknown, left out so that the other folder may know it
    known = {image: patient for image, patient in patients.items() if patient}
    return ScoredFolder(Path(folder), dice_by_image(path, rows), known, source)


def patient_units(shared: list[str], a: ScoredFolder, b: ScoredFolder) -> tuple[dict[str, list[str]], list[str]]:
    """Each patient's images among `shared`, from either folder, and the shared images whose patient is unknown.

    Raises ValueError when A and B name different patients for one image: the folders would not
    describe the same slices, and pairing them would be meaningless.
    """
    units: dict[str, list[str]] = {}
    unknown = []
    for image in shared:
        in_a, in_b = a.patients.get(image, ""), b.patients.get(image, "")
        if in_a and in_b and in_a != in_b:
            raise ValueError(f"image {image} is {PATIENT_COLUMN} {in_a!r} in A ({a.source}) but {in_b!r} in B "
                             f"({b.source}); compare predictions of the same data")
        if in_a or in_b:
            units.setdefault(in_a or in_b, []).append(image)
        else:
            unknown.append(image)
    return units, unknown


def print_image_table(shared: list[str], a: ScoredFolder, b: ScoredFolder) -> None:
    """Every shared image's Dice in A and B and B minus A, most worsened first."""
    differences = np.array([b.dice[name] - a.dice[name] for name in shared])
    width = max(12, *(len(name) for name in shared)) + 2
    print(f"A = {a.path}\nB = {b.path}\nper-image Dice, most worsened first:")
    print(f"  {'image':<{width}}{'A':>8}{'B':>8}{'B - A':>9}")
    for index in np.argsort(differences, kind="stable"):
        name = shared[index]
        print(f"  {name:<{width}}{a.dice[name]:>8.4f}{b.dice[name]:>8.4f}{differences[index]:>+9.4f}")


def paired_differences(shared: list[str], a: ScoredFolder, b: ScoredFolder) -> tuple[list[float], str]:
    """B minus A per pairing unit, and a line saying which unit was paired, how many, and why.

    Per patient (its mean Dice over its shared slices in each folder) when every shared
    image's patient is known; per image otherwise. Raises ValueError as `patient_units`.
    """
    units, unknown = patient_units(shared, a, b)
    if not unknown:
        patient = {image: p for p, images in units.items() for image in images}
        means = {side.path: patient_means([side.dice[i] for i in shared], [patient[i] for i in shared])
                 for side in (a, b)}
        sources = "; ".join(dict.fromkeys(side.source for side in (a, b) if side.patients))
        return ([means[b.path][p] - means[a.path][p] for p in sorted(units)],
                f"paired per patient: {len(units)} patients ({sources}), each scored by the mean Dice of its "
                f"slices ({len(shared)} in all) in A and in B")
    why = (f"{len(unknown)} of {len(shared)} images without a known {PATIENT_COLUMN} ({a.source}; {b.source})"
           if units else f"no {PATIENT_COLUMN} known ({a.source}; {b.source})")
    return ([b.dice[name] - a.dice[name] for name in shared],
            f"paired per image: {len(shared)} images, {why}; slices of one patient are not independent, so "
            f"the p-value may be too small (give --data-root with a metadata.csv that has {PATIENT_COLUMN})")


def compare_predictions(first: Path, second: Path, data_root: Path | None = None) -> int:
    """Print per-image Dice of two prediction folders, B minus A, with a paired Wilcoxon signed-rank test.

    Only images scored in both folders are compared; they are paired per patient where
    `paired_differences` can, per image otherwise. Returns the exit code: 1 when a folder has
    no readable metrics.csv, they share no image, or A and B disagree about an image's patient.

    Args:
        first, second: the prediction folders A and B.
        data_root: --data-root, if given: its metadata.csv names each image's patient.
    """
    try:
        a, b = read_folder(first, data_root), read_folder(second, data_root)
        shared = sorted(set(a.dice) & set(b.dice))
        if not shared:
            raise ValueError(f"{first} and {second} share no scored image; compare predictions of the same images")
        differences, pairing = paired_differences(shared, a, b)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print_image_table(shared, a, b)
    only_a, only_b = len(set(a.dice) - set(b.dice)), len(set(b.dice) - set(a.dice))
    print(f"\n{len(shared)} images in both" + (f" ({only_a} only in A, {only_b} only in B: left out)"
                                              if only_a or only_b else ""))
    print(pairing)
    print(describe_paired_comparison(paired_comparison(differences)))
    return 0
