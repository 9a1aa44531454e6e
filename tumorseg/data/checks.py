"""The integrity check of a dataset folder, and metadata columns read per pair with their problems."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tumorseg.data.reading import (IMAGE_EXTENSIONS, METADATA_FILE, NotTwoLevelError, Pair, files_by_stem, read_image,
                                   read_mask, read_metadata, stem_key, unusable_entries)


class DatasetError(Exception):
    """The dataset failed its integrity check; `problems` lists every finding, each naming its file."""

    def __init__(self, root: Path, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in dataset {root}:\n{lines}")


def scan(root: Path, group_column: str, in_channels: int,
         on_pair: Callable[[Pair, np.ndarray, np.ndarray], None]) -> tuple[list[Pair], list[str] | None, list[str]]:
    """Check names, contents and metadata of every pair, calling `on_pair` with each decoded pair.

    The one pass that `verify_dataset`, `dataset.load_dataset` and the disk cache share: each pair
    that passes is handed to `on_pair(pair, image (H, W, in_channels) uint8, mask (H, W) in {0, 1})`
    in stem order, before the next file is read.

    Returns the good pairs, their groups in `group_column` (None when not grouping) and every problem found.
    """
    root = Path(root)
    problems: list[str] = []
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            problems.append(f"{folder}: folder is missing")
    if problems:
        return [], None, problems

    images, masks = files_by_stem(image_dir), files_by_stem(mask_dir)
    unusable = {**unusable_entries(image_dir), **unusable_entries(mask_dir)}
    problems += [f"{path}: {reason}" for path, reason in unusable.items()]
    # The partner of a broken link is not also reported as lacking its image or mask.
    unusable_stems = {stem_key(path) for path in unusable}
    for stem, files in list(images.items()) + list(masks.items()):
        if len(files) > 1:
            problem = f"{', '.join(str(f) for f in files)}: {len(files)} files share the stem '{stem}'"
            if len({f.stem for f in files}) > 1:  # they print alike, so show the code points
                problem += (" (the same name in different Unicode forms, NFC and NFD: "
                            f"{', '.join(ascii(f.name) for f in files)})")
            problems.append(problem + "; keep one")
    for stem in sorted(set(images) - set(masks) - unusable_stems):
        problems.append(f"{images[stem][0]}: no mask with stem '{stem}' in {mask_dir}")
    for stem in sorted(set(masks) - set(images) - unusable_stems):
        problems.append(f"{masks[stem][0]}: orphan mask, no image with stem '{stem}' in {image_dir}")

    pairs: list[Pair] = []
    for stem in sorted(set(images) & set(masks)):
        pair = Pair(stem, images[stem][0], masks[stem][0])
        try:
            image = read_image(pair.image_path, in_channels)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            problems.append(f"{pair.image_path}: unreadable or corrupt image ({error})")
            continue
        try:
            mask = read_mask(pair.mask_path)
        except NotTwoLevelError as error:
            problems.append(f"{pair.mask_path}: {error}")
            continue
        except Exception as error:
            problems.append(f"{pair.mask_path}: unreadable or corrupt mask ({error})")
            continue
        if image.shape[:2] != mask.shape:
            problems.append(f"{pair.image_path}: image is {image.shape[1]}x{image.shape[0]} but its mask "
                            f"{pair.mask_path.name} is {mask.shape[1]}x{mask.shape[0]}")
            continue
        pairs.append(pair)
        on_pair(pair, image, mask)

    if not images and not masks:
        problems.append(f"{root}: no image/mask pairs ({'/'.join(IMAGE_EXTENSIONS)}) found")
    groups, group_problems = group_labels(root, group_column, pairs)
    return pairs, groups, problems + group_problems


def verify_dataset(root: Path, group_column: str = "") -> list[str]:
    """Every integrity problem of the dataset at `root`, each naming its file; empty when sound.

    Checks: missing `images/` or `masks/`, image without mask, orphan mask, two
    files with one stem, unreadable or corrupt file, image/mask size mismatch,
    mask not two-level, no pairs at all, and, when `group_column` is given, a
    missing metadata.csv or column, or an image without a group.
    """
    return scan(Path(root), group_column, 1, lambda *_: None)[2]


def group_labels(root: Path, group_column: str, pairs: Sequence[Pair]) -> tuple[list[str] | None, list[str]]:
    """Each pair's value in `group_column` of root/metadata.csv, and every problem; (None, []) without a column."""
    if not group_column:
        return None, []
    try:
        columns, rows = read_metadata(root)
    except (OSError, ValueError, csv.Error) as error:
        return None, [f"{root / METADATA_FILE}: {error}"]
    if group_column not in columns:
        return None, [f"{root / METADATA_FILE}: no column '{group_column}' (columns: {', '.join(columns)})"]
    groups = [(rows.get(pair.stem) or {}).get(group_column) or "" for pair in pairs]
    problems = [f"{pair.image_path}: no '{group_column}' for image_id '{pair.stem}' in {root / METADATA_FILE}"
                for pair, group in zip(pairs, groups, strict=True) if not group]
    return groups, problems


def type_labels(root: Path, column: str, pairs: Sequence[Pair]) -> tuple[list[str], list[int]]:
    """The sorted distinct values of metadata.csv's `column` (the classes) and each pair's class index.

    Raises DatasetError naming a missing file or column and every image without a value.
    """
    labels, problems = group_labels(root, column, pairs)
    if problems or labels is None:
        raise DatasetError(root, problems)
    classes = sorted(set(labels))
    return classes, [classes.index(label) for label in labels]
