"""Data: integrity check, decoding, train/validation split and the PyTorch dataset.

A dataset folder holds `images/` and `masks/` whose files pair up by stem
(`images/17.png` with `masks/17.jpg` is fine), and optionally `metadata.csv`
whose `image_id` column names those stems (used for grouped splits). Stems
are compared in Unicode NFC form, so a name typed on macOS (NFD) still pairs.

Every file is decoded once per run: `load_dataset` checks and decodes in a
single pass and keeps the resized uint8 arrays in memory; augmentation and
normalisation then run on those arrays each time a sample is drawn.
"""

from __future__ import annotations

import csv
import math
import os
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.csv"
METADATA_ID_COLUMN = "image_id"
# ImageNet statistics (RGB), as the seed used them; grayscale input uses their mean.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class DatasetError(Exception):
    """The dataset failed its integrity check; `problems` lists every finding, each naming its file."""

    def __init__(self, root: Path, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in dataset {root}:\n{lines}")


class NotTwoLevelError(ValueError):
    """A mask holds values other than 0/1 or 0/255."""


@dataclass(frozen=True)
class Pair:
    """One image and its mask, matched by file stem."""

    stem: str
    image_path: Path
    mask_path: Path


@dataclass
class LoadedDataset:
    """Every pair decoded and resized: images (N, S, S, C) uint8, masks (N, S, S) uint8 in {0, 1}."""

    pairs: list[Pair]
    images: np.ndarray
    masks: np.ndarray
    groups: list[str] | None  # group label per pair when a group column was asked for


# ----------------------------------------------------------------------------- reading files


def stem_key(path: Path) -> str:
    """The stem that pairs files and metadata rows: NFC, so 'é' as one or as two code points match."""
    return unicodedata.normalize("NFC", Path(path).stem)


def _image_named(folder: Path) -> Iterator[Path]:
    """Entries of `folder` with an image extension (matched in any case), sorted."""
    return (path for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS)


def files_by_stem(folder: Path) -> dict[str, list[Path]]:
    """Image files in `folder` that are regular files (or links to them), keyed by `stem_key`."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in _image_named(folder):
        if path.is_file():
            found[stem_key(path)].append(path)
    return found


def unusable_entries(folder: Path) -> dict[Path, str]:
    """Image-named entries of `folder` that `files_by_stem` skips, each with the reason."""
    found = {}
    for path in _image_named(folder):
        if path.is_file():
            continue
        if path.is_symlink() and not path.exists():
            found[path] = f"broken link (target missing: {os.readlink(path)})"
        else:
            found[path] = "not a regular file (a folder or special file with an image name)"
    return found


def read_image(path: Path, in_channels: int) -> np.ndarray:
    """Decode any image (gray, RGB, RGBA, palette, 16-bit) to uint8 (H, W, in_channels).

    16-bit and 32-bit integer images are scaled linearly from their own
    min..max to 0..255. Grayscale is replicated when 3 channels are asked for.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            values = np.asarray(image, np.float64)
            low, high = values.min(), values.max()
            scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
            image = Image.fromarray(scaled.round().astype(np.uint8))
        target_mode = "L" if in_channels == 1 else "RGB"
        array = np.asarray(image.convert(target_mode))
    return array[..., None] if in_channels == 1 else array


def read_mask(path: Path) -> np.ndarray:
    """Decode a binary mask to uint8 (H, W) in {0, 1}; 0/1 and 0/255 are both accepted.

    Palette masks are read by index; colour masks by their brightest channel.
    Raises NotTwoLevelError if the mask has any other values.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGB", "RGBA", "LA"):
            values = np.asarray(image)[..., :3 if image.mode != "LA" else 1].max(axis=-1)
        else:
            values = np.asarray(image)  # L, P (indices), 1, I;16 ...
    levels = np.unique(values)
    if not (set(levels.tolist()) <= {0, 1} or set(levels.tolist()) <= {0, 255}):
        shown = ", ".join(str(v) for v in levels[:6]) + (" ..." if len(levels) > 6 else "")
        raise NotTwoLevelError(
            f"mask is not two-level: has {len(levels)} values ({shown}); expected 0/1 or 0/255 "
            "(JPEG compression breaks masks: save them as PNG)"
        )
    return (values > 0).astype(np.uint8)


def read_metadata(root: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Columns and rows of `root/metadata.csv`, rows keyed by `image_id` in NFC (see `stem_key`)."""
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark that would stick to the first column name.
    with open(root / METADATA_FILE, newline="", encoding="utf-8-sig") as f:
        try:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if METADATA_ID_COLUMN not in columns:
                raise ValueError(f"has no '{METADATA_ID_COLUMN}' column (columns: {', '.join(columns)})")
            # A short row leaves its missing cells None.
            return columns, {unicodedata.normalize("NFC", row[METADATA_ID_COLUMN] or ""): row for row in reader}
        except UnicodeDecodeError as error:
            raise ValueError(f"is not UTF-8 text ({error}); save it as 'CSV UTF-8'") from error


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (H, W, C) to (size, size, C) with bilinear interpolation (antialiased when shrinking)."""
    channels = [Image.fromarray(image[..., c]).resize((size, size), Image.Resampling.BILINEAR)
                for c in range(image.shape[-1])]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a {0, 1} mask to (size, size) with nearest neighbour, so it stays binary."""
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))


# ----------------------------------------------------------------------------- integrity


def _scan(root: Path, group_column: str, in_channels: int,
          on_pair: Callable[[Pair, np.ndarray, np.ndarray], None]) -> tuple[list[Pair], list[str] | None, list[str]]:
    """Check names, contents and metadata of every pair, calling `on_pair` with each decoded pair.

    Returns the good pairs, their groups (None when not grouping) and every problem found.
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

    metadata_rows: dict[str, dict[str, str]] | None = None
    if group_column:
        try:
            columns, metadata_rows = read_metadata(root)
            if group_column not in columns:
                problems.append(f"{root / METADATA_FILE}: no column '{group_column}' to group by "
                                f"(columns: {', '.join(columns)})")
                metadata_rows = None
        except (OSError, ValueError, csv.Error) as error:
            problems.append(f"{root / METADATA_FILE}: {error}")

    pairs: list[Pair] = []
    groups: list[str] = []
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
        if metadata_rows is not None:
            row = metadata_rows.get(stem)
            if row is None or not row[group_column]:
                problems.append(f"{pair.image_path}: no '{group_column}' for image_id '{stem}' in "
                                f"{root / METADATA_FILE}")
                continue
            groups.append(row[group_column])
        pairs.append(pair)
        on_pair(pair, image, mask)

    if not images and not masks:
        problems.append(f"{root}: no image/mask pairs ({'/'.join(IMAGE_EXTENSIONS)}) found")
    return pairs, (groups if group_column else None), problems


def verify_dataset(root: Path, group_column: str = "") -> list[str]:
    """Every integrity problem of the dataset at `root`, each naming its file; empty when sound.

    Checks: missing `images/` or `masks/`, image without mask, orphan mask, two
    files with one stem, unreadable or corrupt file, image/mask size mismatch,
    mask not two-level, no pairs at all, and, when `group_column` is given, a
    missing metadata.csv or column, or an image without a group.
    """
    return _scan(Path(root), group_column, 1, lambda *_: None)[2]


def load_dataset(root: Path, image_size: int, in_channels: int, group_column: str = "") -> LoadedDataset:
    """Verify and decode the dataset in one pass; raise DatasetError listing every problem."""
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []

    def keep(pair: Pair, image: np.ndarray, mask: np.ndarray) -> None:
        images.append(resize_image(image, image_size))
        masks.append(resize_mask(mask, image_size))

    pairs, groups, problems = _scan(Path(root), group_column, in_channels, keep)
    if problems:
        raise DatasetError(Path(root), problems)
    return LoadedDataset(pairs, np.stack(images), np.stack(masks), groups)


# ----------------------------------------------------------------------------- split


def _check_split_sizes(count: int, val_fraction: float, groups: Sequence[str] | None = None,
                      group_column: str = "", root: Path | None = None) -> None:
    """Raise ValueError in plain words unless both sides of the split get at least one image or group.

    `group_column` and `root` only name the items in the message.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"VAL_FRACTION must lie strictly between 0 and 1, got {val_fraction}")
    if groups is None:
        units, unit, where = count, "image", f" in {root}" if root else ""
    else:
        units, unit = len(set(groups)), "group"
        where = ((f" in column '{group_column}'" if group_column else "")
                 + (f" of {Path(root) / METADATA_FILE}" if root else ""))
    if units < 2:
        kind = "grouped split" if groups is not None else "train/validation split"
        raise ValueError(f"{kind} needs at least 2 {unit}s{where}, found {units}")
    # scikit-learn's sizes: ceil(fraction * n) for validation, >= 1 as 0 < fraction; the rest for training.
    if math.ceil(val_fraction * units) >= units:
        needed = max(2, int(1 / (1 - val_fraction)) - 1)  # at or just below the answer despite float rounding
        while math.ceil(val_fraction * needed) >= needed:
            needed += 1
        raise ValueError(f"VAL_FRACTION {val_fraction} of {units} {unit}s{where} puts all of them in validation "
                         f"and leaves no training {unit}; use at least {needed} {unit}s or a smaller VAL_FRACTION")


def split_indices(count: int, val_fraction: float, seed: int, groups: Sequence[str] | None = None,
                  group_column: str = "", root: Path | None = None) -> tuple[list[int], list[int]]:
    """Train and validation indices, reproducible from `seed`.

    With `groups`, whole groups go to one side (GroupShuffleSplit: `val_fraction`
    is then the share of groups, not of images); without, a random split.
    A split that would leave a side empty raises ValueError before scikit-learn is called,
    naming `group_column` and the metadata file or folder under `root`.
    """
    _check_split_sizes(count, val_fraction, groups, group_column, root)
    placeholder = np.zeros(count)
    if groups is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter.split(placeholder, groups=list(groups)))
    else:
        splitter = ShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter.split(placeholder))
    return sorted(train.tolist()), sorted(val.tolist())


# ----------------------------------------------------------------------------- torch dataset


def normalize(image: np.ndarray, method: str) -> np.ndarray:
    """uint8 (H, W, C) to float32 (C, H, W): ImageNet statistics, or z-score per image and channel."""
    values = image.astype(np.float32) / 255.0
    if method == "imagenet":
        channels = values.shape[-1]
        mean = IMAGENET_MEAN if channels == 3 else IMAGENET_MEAN.mean(keepdims=True)
        std = IMAGENET_STD if channels == 3 else IMAGENET_STD.mean(keepdims=True)
        values = (values - mean) / std
    elif method == "zscore":
        mean = values.mean(axis=(0, 1), keepdims=True)
        std = values.std(axis=(0, 1), keepdims=True)
        values = (values - mean) / np.maximum(std, 1e-6)  # a blank slice stays finite
    else:
        raise ValueError(f"unknown normalization {method!r}; use 'imagenet' or 'zscore'")
    return np.ascontiguousarray(values.transpose(2, 0, 1))


def training_augmentation(seed: int) -> A.Compose:
    """Flips and 90-degree rotations: label-preserving for MRI slices, applied to image and mask alike."""
    return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)], seed=seed)


class SegmentationDataset(torch.utils.data.Dataset):
    """Samples from in-memory arrays: (image float32 (C, S, S), mask float32 (1, S, S) in {0, 1})."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, normalization: str,
                 transform: A.Compose | None = None):
        self.images, self.masks = images, masks
        self.normalization = normalization
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[index], self.masks[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return (torch.from_numpy(normalize(image, self.normalization)),
                torch.from_numpy(mask[None].astype(np.float32)))


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker its own augmentation stream (else all repeat one)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(info.seed % 2**32)
