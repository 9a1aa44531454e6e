"""Patient splits: the split column, train/validation/held-out indices, folds, split files, data fingerprints."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold, ShuffleSplit

from tumorseg.data.checks import group_labels
from tumorseg.data.reading import METADATA_FILE, PATIENT_COLUMN, listed_pairs, read_metadata


def resolve_split_column(root: Path, requested: str) -> tuple[str, str]:
    """The column a split groups by ("" = random slices) for SPLIT_GROUP_COLUMN `requested`, and a note saying why.

    "auto" takes PATIENT_COLUMN when root/metadata.csv has it; "none" (or
    "auto" without such a column) splits by random slice, and the note warns
    that scores are then inflated wherever a patient has several slices.
    """
    inflated = ("scores are inflated when a patient has several slices (slices of one patient land on both "
                "sides); name the patient column with --split-group-column")
    if requested == "none":
        return "", f"split by random slice (--split-group-column none): {inflated}"
    if requested != "auto":
        return requested, f"split by '{requested}' of {root / METADATA_FILE}"
    try:
        columns = read_metadata(Path(root))[0] if (Path(root) / METADATA_FILE).is_file() else []
    except (OSError, ValueError, csv.Error):
        columns = []  # the integrity check names an unreadable metadata.csv when a column is asked of it
    if PATIENT_COLUMN in columns:
        return PATIENT_COLUMN, f"split by patient ('{PATIENT_COLUMN}' of {root / METADATA_FILE})"
    return "", f"split by random slice (no '{PATIENT_COLUMN}' column in {root / METADATA_FILE}): {inflated}"


def _check_split_sizes(count: int, fraction: float, groups: Sequence[str] | None = None,
                      group_column: str = "", root: Path | None = None, name: str = "VAL_FRACTION") -> None:
    """Raise ValueError in plain words unless both sides of the split get at least one image or group.

    `group_column` and `root` only name the items in the message; `name` is the setting `fraction` came from.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {fraction}")
    if groups is None:
        units, unit, where = count, "image", f" in {root}" if root else ""
    else:
        units, unit = len(set(groups)), "group"
        where = ((f" in column '{group_column}'" if group_column else "")
                 + (f" of {Path(root) / METADATA_FILE}" if root else ""))
    if units < 2:
        kind = "grouped split" if groups is not None else "train/validation split"
        raise ValueError(f"{kind} needs at least 2 {unit}s{where}, found {units}")
    # scikit-learn's sizes: ceil(fraction * n) for the split-off side, >= 1 as 0 < fraction; the rest stays.
    if math.ceil(fraction * units) >= units:
        needed = max(2, int(1 / (1 - fraction)) - 1)  # at or just below the answer despite float rounding
        while math.ceil(fraction * needed) >= needed:
            needed += 1
        side = "held out" if name == "TEST_FRACTION" else "in validation"
        raise ValueError(f"{name} {fraction} of {units} {unit}s{where} puts all of them {side} "
                         f"and leaves no training {unit}; use at least {needed} {unit}s or a smaller {name}")


def split_indices(count: int, val_fraction: float, seed: int, groups: Sequence[str] | None = None,
                  group_column: str = "", root: Path | None = None,
                  name: str = "VAL_FRACTION") -> tuple[list[int], list[int]]:
    """Kept and split-off indices (`val_fraction` of them), reproducible from `seed`.

    With `groups`, whole groups go to one side (GroupShuffleSplit: `val_fraction`
    is then the share of groups, not of images); without, a random split.
    A split that would leave a side empty raises ValueError before scikit-learn is called,
    naming `name`, `group_column` and the metadata file or folder under `root`.
    """
    _check_split_sizes(count, val_fraction, groups, group_column, root, name)
    placeholder = np.zeros(count)
    if groups is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter.split(placeholder, groups=list(groups)))
    else:
        splitter = ShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter.split(placeholder))
    return sorted(train.tolist()), sorted(val.tolist())


def fold_indices(count: int, folds: int, fold: int, seed: int, groups: Sequence[str] | None = None,
                 group_column: str = "", root: Path | None = None) -> tuple[list[int], list[int]]:
    """Kept and held-out indices of fold `fold` (0-based) of a `folds`-fold split, reproducible from `seed`.

    With `groups`, whole groups form the folds (GroupKFold, groups shuffled by
    `seed`); without, images are shuffled into folds (KFold). Every image is
    held out in exactly one fold. Too few images or groups raise ValueError.
    """
    units = count if groups is None else len(set(groups))
    if units < folds:
        unit = "images" if groups is None else "groups" + (f" in column '{group_column}'" if group_column else "")
        where = f" of {Path(root) / METADATA_FILE}" if root is not None and groups is not None else ""
        raise ValueError(f"{folds}-fold split needs at least {folds} {unit}{where}, found {units}")
    placeholder = np.zeros(count)
    if groups is not None:
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = list(splitter.split(placeholder, groups=list(groups)))[fold]
    else:
        train, val = list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(placeholder))[fold]
    return sorted(train.tolist()), sorted(val.tolist())


def fold_values(labels: Sequence[str]) -> list[str]:
    """The distinct fold labels in order: numerically where all are integers ("2" before "10"), else by text."""
    values = set(labels)
    numeric = all(value.lstrip("-").isdigit() for value in values)
    return sorted(values, key=int) if numeric else sorted(values)


def column_fold_indices(labels: Sequence[str], fold: int, groups: Sequence[str] | None = None,
                        column: str = "", root: Path | None = None) -> tuple[list[int], list[int]]:
    """Kept and held-out indices where the held-out images are those whose label is the `fold`-th of `fold_values`.

    Raises ValueError naming every group (patient) whose images carry more
    than one label, since a patient in two folds sits on both sides of
    the split, and when `fold` is out of range.
    """
    where = f"column '{column}' of {Path(root) / METADATA_FILE}" if root else f"column '{column}'"
    values = fold_values(labels)
    if len(values) < 2:
        raise ValueError(f"{where} holds {len(values)} fold value(s); folds need at least 2")
    if not 0 <= fold < len(values):
        raise ValueError(f"FOLD {fold}: {where} has {len(values)} folds ({', '.join(values)}): "
                         f"choose FOLD 0 to {len(values) - 1}")
    if groups is not None:
        folds_of: dict[str, set[str]] = defaultdict(set)
        for group, label in zip(groups, labels, strict=True):
            folds_of[group].add(label)
        crossing = sorted(group for group, found in folds_of.items() if len(found) > 1)
        if crossing:
            shown = "; ".join(f"{group} in folds {', '.join(fold_values(list(folds_of[group])))}"
                              for group in crossing)
            raise ValueError(f"{where}: {len(crossing)} group(s) have images in two or more folds, so they would "
                             f"sit on both sides of the split: {shown}. Fix the fold column, or let train.py "
                             "make the folds by group with --folds K and no --fold-column")
    held_out = values[fold]
    return ([i for i, label in enumerate(labels) if label != held_out],
            [i for i, label in enumerate(labels) if label == held_out])


@dataclass
class Split:
    """Indices of a run's three disjoint sets of images (whole groups each, when grouping)."""

    train: list[int]  # fit the weights
    val: list[int]  # inner validation: chooses the epoch and the decision rule
    test: list[int]  # held out: chooses nothing; only test.py --subset test scores it


def three_way_split(count: int, val_fraction: float, test_fraction: float, seed: int, folds: int = 0,
                    fold: int = 0, groups: Sequence[str] | None = None, fold_labels: Sequence[str] | None = None,
                    group_column: str = "", fold_column: str = "", root: Path | None = None) -> Split:
    """Training, inner validation and held-out indices, reproducible from `seed`.

    The held-out images are, in order of precedence: the `fold`-th value of
    `fold_labels` (a metadata fold column), fold `fold` of a `folds`-fold
    split, or `test_fraction` of the groups (none when 0). The inner
    validation set is `val_fraction` of the remaining groups only, so the
    held-out patients never take part in a choice. Raises ValueError when a
    side would be empty or a group crosses folds.
    """
    if fold_labels is not None:
        kept, test = column_fold_indices(fold_labels, fold, groups, fold_column, root)
    elif folds:
        kept, test = fold_indices(count, folds, fold, seed, groups, group_column, root)
    elif test_fraction:
        kept, test = split_indices(count, test_fraction, seed, groups, group_column, root, name="TEST_FRACTION")
    else:
        kept, test = list(range(count)), []
    kept_groups = None if groups is None else [groups[i] for i in kept]
    try:
        train, val = split_indices(len(kept), val_fraction, seed, kept_groups, group_column, root)
    except ValueError as error:
        if not test:
            raise
        # Else the message counts only what the held-out set left, as if the data were that small.
        held_out = held_out_share(test_fraction, folds, fold, fold_column)
        unit, total = ("image", count) if groups is None else ("group", len(set(groups)))
        taken = len(test) if groups is None else len({groups[i] for i in test})
        raise ValueError(f"{error}: {held_out} took {taken} of the {total} {unit}s first and left "
                         f"{total - taken} for training and validation; use more {unit}s, or "
                         f"{held_out_remedy(folds, fold_column)}") from error
    return Split([kept[i] for i in train], [kept[i] for i in val], test)


SPLIT_ROLES = ("train", "val", "test")  # a split file's lists for each fold, as in split.json


def fold_split_lists(root: Path, folds: int, fold_column: str, group_column: str, seed: int,
                     val_fraction: float) -> list[dict[str, list[str]]]:
    """Each fold's train, val and test image stems, as train.py would make them with FOLDS or FOLD_COLUMN.

    Args:
        root: the data folder (images/, masks/, metadata.csv); checked beforehand with `verify_dataset`.
        folds: K of a K-fold split by group (ignored when `fold_column` is given).
        fold_column: metadata column whose values are the folds, or "".
        group_column: the column kept on one side ("" = random slices).
        seed: SPLIT_SEED. val_fraction: VAL_FRACTION of each fold's remaining groups.

    Returns one {"train", "val", "test": [stems]} per fold, in fold order.
    Raises ValueError where a fold cannot be made (too few groups, a group in two folds).
    """
    pairs = listed_pairs(root)
    stems = [pair.stem for pair in pairs]
    groups, problems = group_labels(root, group_column, pairs)
    fold_labels = None
    if fold_column:
        fold_labels, fold_problems = group_labels(root, fold_column, pairs)
        problems += fold_problems
    if problems:
        raise ValueError("; ".join(problems))
    count = len(fold_values(fold_labels)) if fold_labels is not None else folds
    lists = []
    for fold in range(count):
        split = three_way_split(len(stems), val_fraction, 0.0, seed, 0 if fold_labels else folds, fold, groups,
                                fold_labels, group_column, fold_column, root)
        lists.append({role: [stems[i] for i in getattr(split, role)] for role in SPLIT_ROLES})
    return lists


def read_split_file(path: Path, fold: int, stems: Sequence[str], groups: Sequence[str] | None) -> Split:
    """Entry `fold` of a splits.json (a list of {"train", "val", "test": [stems]}) as indices into `stems`.

    Every image of the data must be in exactly one role and every listed image
    in the data, and no group (patient) may sit in two roles: a split file is
    only trusted when it still describes this data. Raises ValueError naming
    the file and the first problems found.
    """
    try:
        entries = json.loads(Path(path).read_text())["folds"]
        entry = entries[fold] if 0 <= fold < len(entries) else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a readable split file ({error})") from error
    if entry is None:
        raise ValueError(f"{path}: FOLD {fold}: the file has {len(entries)} folds, 0 to {len(entries) - 1}")
    index = {stem: i for i, stem in enumerate(stems)}
    listed = [stem for role in SPLIT_ROLES for stem in entry.get(role, [])]
    missing = [stem for stem in listed if stem not in index]
    unlisted = sorted(set(stems) - set(listed))
    twice = sorted(stem for stem, times in Counter(listed).items() if times > 1)
    problems = [f"{len(found)} {what}: {', '.join(found[:5])}" + (", ..." if len(found) > 5 else "")
                for found, what in ((missing, "listed images are not in the data"),
                                    (unlisted, "images of the data are in no role"),
                                    (twice, "images are listed twice")) if found]
    if groups is not None and not problems:
        roles_of: dict[str, set[str]] = defaultdict(set)
        for role in SPLIT_ROLES:
            for stem in entry.get(role, []):
                roles_of[groups[index[stem]]].add(role)
        crossing = sorted(group for group, roles in roles_of.items() if len(roles) > 1)
        if crossing:
            problems.append(f"{len(crossing)} groups sit in two roles: {', '.join(crossing[:5])}")
    if problems:
        raise ValueError(f"{path}: fold {fold} does not describe this data ({'; '.join(problems)}); "
                         "the data changed since the file was written: start a new cross-validation")
    return Split(*([index[stem] for stem in entry.get(role, [])] for role in SPLIT_ROLES))


def data_fingerprint(root: Path) -> dict[str, object]:
    """A cheap identity of a data folder: pair count and a SHA-256 of every image/mask name and size and metadata.csv.

    Two folders with the same fingerprint hold the same file names and sizes and
    the same metadata, so the same split; an edited pixel of equal file size
    goes unnoticed (contents are not read, to stay fast on large sets).
    """
    digest = hashlib.sha256()
    root = Path(root)
    for sub in ("images", "masks"):
        for path in sorted((root / sub).iterdir()) if (root / sub).is_dir() else []:
            size = path.stat().st_size if path.exists() else -1  # a broken link has no size
            digest.update(f"{sub}/{path.name}\t{size}\n".encode())
    metadata = root / METADATA_FILE
    digest.update(metadata.read_bytes() if metadata.is_file() else b"no metadata")
    return {"pairs": len(listed_pairs(root)), "sha256": digest.hexdigest()}


def held_out_share(test_fraction: float, folds: int, fold: int, fold_column: str) -> str:
    """Which setting chose the held-out images, as `three_way_split` gives them precedence, in words."""
    if fold_column:
        return f"the held-out fold (--fold-column {fold_column}, --fold {fold})"
    if folds:
        return f"the held-out fold (--fold {fold} of --folds {folds})"
    return f"the held-out share (--test-fraction {test_fraction:g})"


def held_out_remedy(folds: int, fold_column: str) -> str:
    """How to hold out less, for the setting `held_out_share` names."""
    if fold_column:
        return "fewer images in that fold"
    if folds:
        return "more --folds"
    return "a smaller --test-fraction (0 holds out none)"
