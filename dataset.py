"""Data: integrity check, decoding, train/validation split and the PyTorch dataset.

A dataset folder holds `images/` and `masks/` whose files pair up by stem
(`images/17.png` with `masks/17.jpg` is fine), and optionally `metadata.csv`
whose `image_id` column names those stems (used for grouped splits). Stems
are compared in Unicode NFC form, so a name typed on macOS (NFD) still pairs.

Every file is decoded once per run: `load_dataset` checks and decodes in a
single pass and keeps the resized uint8 arrays in memory, or (with a cache
folder) once per change of the files, into memory-mapped arrays on disk;
augmentation and normalisation then run on those arrays each time a sample
is drawn.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from PIL import Image
from scipy import ndimage
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold, ShuffleSplit

from tumorseg.files import remove_stale_staging, staging_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.csv"
METADATA_ID_COLUMN = "image_id"
PATIENT_COLUMN = "patient_id"  # the column SPLIT_GROUP_COLUMN "auto" splits by
# ImageNet statistics (RGB), as the seed used them; grayscale input uses their mean.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
ZSCORE_MIN_STD = 1e-6  # z-score divides by at least this, so a blank slice stays finite


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
    """Every pair decoded and resized: images (N, S, S, C) uint8, masks (N, S, S) uint8 in {0, 1}.

    In memory, or memory-mapped from the disk cache (then index them with few rows at a time).
    """

    pairs: list[Pair]
    images: np.ndarray
    masks: np.ndarray
    groups: list[str] | None  # group label per pair when a group column was asked for


# ----------------------------------------------------------------------------- reading files


def stem_key(path: Path) -> str:
    """The stem that pairs files and metadata rows: NFC, so 'é' as one or as two code points match."""
    return name_key(Path(path).stem)


def name_key(stem: str) -> str:
    """`stem_key` of a stem already taken from its file name (a Path of it would lose 'case.01''s '.01')."""
    return unicodedata.normalize("NFC", stem)


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
            found[path] = broken_link_reason(path)
        else:
            found[path] = "not a regular file (a folder or special file with an image name)"
    return found


def broken_links(folder: Path) -> dict[Path, str]:
    """Every link in `folder` whose target is missing, whatever its name, with the reason.

    A volume (.nii.gz) or DICOM series folder that is such a link is neither a
    file nor a folder, so the volume search passes it over without a word.
    """
    if not Path(folder).is_dir():
        return {}
    return {path: broken_link_reason(path) for path in sorted(Path(folder).iterdir())
            if path.is_symlink() and not path.exists()}


def broken_link_reason(path: Path) -> str:
    """Why a link to nothing is skipped, with the target it names."""
    return f"broken link (target missing: {os.readlink(path)})"


def read_image(path: Path, in_channels: int) -> np.ndarray:
    """Decode any image (gray, RGB, RGBA, palette, 16-bit) to uint8 (H, W, in_channels).

    16-bit and 32-bit integer images are scaled linearly from their own
    min..max to 0..255. Grayscale is replicated when 3 channels are asked for.
    """
    return read_image_as(path, [in_channels])[in_channels]


def read_image_as(path: Path, channel_counts: list[int]) -> dict[int, np.ndarray]:
    """`read_image` for each channel count in `channel_counts`, decoding the file once."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            values = np.asarray(image, np.float64)
            low, high = values.min(), values.max()
            scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
            image = Image.fromarray(scaled.round().astype(np.uint8))
        return {count: np.asarray(image.convert("L"))[..., None] if count == 1 else np.asarray(image.convert("RGB"))
                for count in channel_counts}


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


# ----------------------------------------------------------------------------- head cropping
#
# Slices carry a wide black border around the head; cropping to the head before resizing gives the
# network more tumour pixels for the same compute. Training and inference share one path:
#   image (H, W, C) --prepare_input--> (S, S, C) + box --model--> probability (S, S)
#   --restore_probability--> (H, W), zero outside the box.

# Pixels above this share of the slice's 99th percentile count as head. On the Figshare slices 0.05
# still catches the scanner's faint field-of-view band; 0.1 to 0.2 give nearly the same boxes.
HEAD_THRESHOLD_FRACTION = 0.1
HEAD_THUMBNAIL_SIDE = 64  # head_box looks at a block-mean thumbnail about this size: cheap, and averages out noise

Box = tuple[int, int, int, int]  # top, left, bottom, right in pixels; bottom and right exclusive


def head_box(image: np.ndarray, margin: float = 0.05) -> Box:
    """Bounding box of the head in uint8 (H, W, C) or (H, W), widened by `margin` x its size on each side.

    The box is then made square, so resizing it keeps the aspect ratio (on a non-square image whose
    head spans more than the shorter side, it covers that whole side instead). A slice without
    foreground gives the full image.
    """
    pixels = image.reshape(*image.shape[:2], -1)  # (H, W, C) with or without a channel axis given
    height, width = pixels.shape[:2]
    cell = max(1, min(height, width) // HEAD_THUMBNAIL_SIDE)
    rows, cols = height // cell, width // cell
    # Sum over each cell x cell block as strided views: several times faster than a reshaped mean
    # (sums, not means: the threshold below is relative). Then the brightest channel.
    thumbnail = np.zeros((rows, cols, pixels.shape[2]), np.float32)
    for i in range(cell):
        for j in range(cell):
            thumbnail += pixels[i:rows * cell:cell, j:cols * cell:cell]
    thumbnail = thumbnail.max(axis=-1)
    foreground = thumbnail > HEAD_THRESHOLD_FRACTION * np.percentile(thumbnail, 99)
    # Dilating by one cell joins scalp, skull and brain into one blob; keeping only the largest blob
    # drops isolated specks and burned-in text outside the head.
    labels, count = ndimage.label(ndimage.binary_dilation(foreground))
    if count == 0:
        return 0, 0, height, width
    head = foreground & (labels == np.bincount(labels.ravel())[1:].argmax() + 1)
    head_rows, head_cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    # Thumbnail cells back to pixels; the last row or column of cells also owns the leftover pixels past it.
    top, left = int(head_rows[0]) * cell, int(head_cols[0]) * cell
    bottom = height if head_rows[-1] == rows - 1 else (int(head_rows[-1]) + 1) * cell
    right = width if head_cols[-1] == cols - 1 else (int(head_cols[-1]) + 1) * cell

    pad_rows, pad_cols = round(margin * (bottom - top)), round(margin * (right - left))
    top, bottom = max(top - pad_rows, 0), min(bottom + pad_rows, height)
    left, right = max(left - pad_cols, 0), min(right + pad_cols, width)
    side = max(bottom - top, right - left)
    top, bottom = _widen(top, bottom, side, height)
    left, right = _widen(left, right, side, width)
    return top, left, bottom, right


def _widen(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """[low, high) grown evenly to `length` (at most `limit`), then shifted to lie in [0, limit).

    The result still contains [low, high): it is at least as long and only moves where it would stick out.
    """
    length = min(length, limit)
    start = min(max(low - (length - (high - low)) // 2, 0), limit - length)
    return start, start + length


def crop_to_box(array: np.ndarray, box: Box) -> np.ndarray:
    """The box's part of an (H, W) or (H, W, C) array (a view)."""
    top, left, bottom, right = box
    return array[top:bottom, left:right]


def paste_back(values: np.ndarray, box: Box, native_shape: tuple[int, int]) -> np.ndarray:
    """float32 (H, W) map holding `values` (the box's size) inside the box and 0 outside it."""
    full = np.zeros(native_shape, np.float32)
    top, left, bottom, right = box
    full[top:bottom, left:right] = values
    return full


def prepare_input(image: np.ndarray, image_size: int, crop: bool, margin: float = 0.05) -> tuple[np.ndarray, Box]:
    """uint8 (H, W, C) to the network's (S, S, C) input, and the box it was taken from (full image without `crop`).

    Training and inference both go through here, so the model always sees slices framed the same way.
    """
    box = head_box(image, margin) if crop else (0, 0, image.shape[0], image.shape[1])
    return resize_image(crop_to_box(image, box), image_size), box


def prepare_mask(mask: np.ndarray, image_size: int, box: Box) -> np.ndarray:
    """A {0, 1} (H, W) mask through the same box as its image, to (S, S), still binary."""
    return resize_mask(crop_to_box(mask, box), image_size)


def restore_probability(probability: np.ndarray | torch.Tensor, box: Box,
                        native_shape: tuple[int, int]) -> np.ndarray:
    """Inverse of prepare_input for a predicted (S, S) probability map: float32 (H, W), 0 outside the box.

    The probability map is resized, not a thresholded mask, so the tumour edge is placed at sub-pixel
    precision; bilinear without align_corners matches the pixel-centre convention of resize_image.
    """
    return restore_probabilities(torch.as_tensor(probability)[None], [box], [native_shape])[0]


def restore_probabilities(probabilities: torch.Tensor, boxes: list[Box],
                          native_shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """`restore_probability` of each (S, S) map in (N, S, S), resizing all maps of one box size in one call."""
    values = probabilities.to(torch.float32)
    sizes = [(bottom - top, right - left) for top, left, bottom, right in boxes]
    restored: list[np.ndarray] = [np.empty(0)] * len(boxes)
    for size in dict.fromkeys(sizes):  # each size once, in order of appearance
        indices = [i for i, other in enumerate(sizes) if other == size]
        resized = F.interpolate(values[indices][:, None], size=size, mode="bilinear", align_corners=False)
        for i, map_ in zip(indices, resized[:, 0].cpu().numpy(), strict=True):
            restored[i] = paste_back(map_, boxes[i], native_shapes[i])
    return restored


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


def verify_dataset(root: Path, group_column: str = "") -> list[str]:
    """Every integrity problem of the dataset at `root`, each naming its file; empty when sound.

    Checks: missing `images/` or `masks/`, image without mask, orphan mask, two
    files with one stem, unreadable or corrupt file, image/mask size mismatch,
    mask not two-level, no pairs at all, and, when `group_column` is given, a
    missing metadata.csv or column, or an image without a group.
    """
    return _scan(Path(root), group_column, 1, lambda *_: None)[2]


def load_dataset(root: Path, image_size: int, in_channels: int, group_column: str = "",
                 crop: bool = False, crop_margin: float = 0.05, cache_dir: Path | None = None) -> LoadedDataset:
    """Verify and decode the dataset in one pass; raise DatasetError listing every problem.

    With `crop`, each slice is cut to its head_box (widened by `crop_margin`) before resizing.
    With `cache_dir`, the slices are memory-mapped from the disk cache there (see `disk_cache`),
    decoded only when a file or one of these settings has changed since.
    """
    root = Path(root)
    if cache_dir is not None:
        pairs, cached_images, cached_masks = disk_cache(root, image_size, in_channels, crop, crop_margin,
                                                        Path(cache_dir))
        groups, problems = group_labels(root, group_column, pairs)
        if problems:
            raise DatasetError(root, problems)
        return LoadedDataset(pairs, cached_images, cached_masks, groups)
    # Filled in place: stacking a list of slices would hold every slice twice at the end of loading.
    count = _pair_count(root)
    images = np.empty((count, image_size, image_size, in_channels), np.uint8)
    masks = np.empty((count, image_size, image_size), np.uint8)
    kept = 0

    def keep(pair: Pair, image: np.ndarray, mask: np.ndarray) -> None:
        nonlocal kept
        prepared, box = prepare_input(image, image_size, crop, crop_margin)
        images[kept] = prepared
        masks[kept] = prepare_mask(mask, image_size, box)
        kept += 1

    pairs, groups, problems = _scan(root, group_column, in_channels, keep)
    if problems:
        raise DatasetError(root, problems)
    return LoadedDataset(pairs, images[:kept], masks[:kept], groups)


def _pair_count(root: Path) -> int:
    """How many stems have both an image and a mask: an upper bound on the slices `_scan` keeps (0 without folders)."""
    folders = (root / "images", root / "masks")
    if not all(folder.is_dir() for folder in folders):
        return 0  # _scan names the missing folder
    return len(set(files_by_stem(folders[0])) & set(files_by_stem(folders[1])))


# ----------------------------------------------------------------------------- disk cache
#
# CACHE="disk": every slice decoded and resized once into two memory-mapped uint8 .npy files, so a data set
# larger than memory trains at the speed of reading its slices (64 KB each at 256 px, grayscale). The cache
# folder is named after a hash of everything that shapes those pixels, so changing a file or a setting builds
# a new one (and removes the one it replaces); it is built under a staging name and renamed whole.

CACHE_FORMAT = 1  # part of the key: raise it when what a cache holds changes
CACHE_INDEX = "cache.json"  # pairs and source of a cache folder, written last


def cache_key(root: Path, image_size: int, in_channels: int, crop: bool, crop_margin: float) -> str:
    """Hash of the settings and of every image and mask file's name, size and modification time."""
    files = []
    for sub in ("images", "masks"):
        for path in _image_named(root / sub):
            info = path.stat() if path.exists() else path.lstat()  # a broken link counts by itself
            files.append([sub, path.name, info.st_size, info.st_mtime_ns])
    described = json.dumps([CACHE_FORMAT, image_size, in_channels, crop, crop_margin, files])  # ASCII-escaped
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def disk_cache(root: Path, image_size: int, in_channels: int, crop: bool, crop_margin: float,
               cache_dir: Path) -> tuple[list[Pair], np.ndarray, np.ndarray]:
    """The pairs of `root` and their slices memory-mapped (read-only) from cache_dir/<key>/, built first if needed.

    Building checks every file as `load_dataset` does and raises DatasetError
    listing every problem (leaving no cache). Groups are not cached: metadata
    is read afresh by the caller.
    """
    if not ((root / "images").is_dir() and (root / "masks").is_dir()):
        raise DatasetError(root, _scan(root, "", in_channels, lambda *_: None)[2])  # nothing to key on
    folder = cache_dir / cache_key(root, image_size, in_channels, crop, crop_margin)
    if not (folder / CACHE_INDEX).is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a folder without its index was damaged by hand
        _build_cache(root, image_size, in_channels, crop, crop_margin, folder)
    index = json.loads((folder / CACHE_INDEX).read_text())
    pairs = [Pair(stem, root / "images" / image, root / "masks" / mask) for stem, image, mask in index["pairs"]]
    return pairs, np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r")


def _build_cache(root: Path, image_size: int, in_channels: int, crop: bool, crop_margin: float,
                 folder: Path) -> None:
    """Decode every pair of `root` into `folder` (images.npy, masks.npy, cache.json), atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder.parent)
    staging = folder.parent / staging_name(folder.name, "partial")
    staging.mkdir()
    try:
        count = _pair_count(root)
        files = {}
        for name, shape in (("images", (count, image_size, image_size, in_channels)),
                            ("masks", (count, image_size, image_size))):
            # open_memmap writes the .npy header and sizes the file; slices are then written in order through
            # plain file writes, which keep them out of this process's resident memory while building.
            offset = open_memmap(staging / f"{name}.npy", mode="w+", dtype=np.uint8, shape=shape).offset
            files[name] = open(staging / f"{name}.npy", "r+b")
            files[name].seek(offset)

        def keep(pair: Pair, image: np.ndarray, mask: np.ndarray) -> None:
            prepared, box = prepare_input(image, image_size, crop, crop_margin)
            files["images"].write(prepared.tobytes())
            files["masks"].write(prepare_mask(mask, image_size, box).tobytes())

        try:
            pairs, _, problems = _scan(root, "", in_channels, keep)
            for file in files.values():
                file.flush()
                os.fsync(file.fileno())  # on disk before the rename makes the folder count as complete
        finally:
            for file in files.values():
                file.close()
        if problems:
            raise DatasetError(root, problems)
        source = {"root": str(root.resolve()), "settings": [image_size, in_channels, crop, crop_margin]}
        index = {**source, "pairs": [[p.stem, p.image_path.name, p.mask_path.name] for p in pairs]}
        (staging / CACHE_INDEX).write_text(json.dumps(index))
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
        _remove_replaced_caches(folder, source)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_replaced_caches(folder: Path, source: dict) -> None:
    """Delete the other caches of the same data folder and settings: files have changed since they were built."""
    for other in folder.parent.iterdir():
        try:
            replaced = other != folder and {k: v for k, v in json.loads((other / CACHE_INDEX).read_text()).items()
                                            if k != "pairs"} == source
        except (OSError, ValueError):
            continue  # not a cache folder, or one being built
        if replaced:
            shutil.rmtree(other, ignore_errors=True)  # a run still reading it keeps its open file (POSIX)


def mask_share(masks: np.ndarray, indices: Sequence[int]) -> float:
    """Share of tumour pixels over the masks at `indices`, read a block at a time (a disk cache stays on disk)."""
    block = 1024
    total = sum(int(masks[sorted(indices[start:start + block])].sum()) for start in range(0, len(indices), block))
    return total / (len(indices) * masks[0].size)


# ----------------------------------------------------------------------------- split


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


def listed_pairs(root: Path) -> list[Pair]:
    """The image/mask pairs by stem, in `load_dataset`'s order, without decoding a file (check with verify_dataset)."""
    images, masks = files_by_stem(Path(root) / "images"), files_by_stem(Path(root) / "masks")
    return [Pair(stem, images[stem][0], masks[stem][0]) for stem in sorted(set(images) & set(masks))]


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


# ----------------------------------------------------------------------------- torch dataset


def imagenet_statistics(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet mean and std per channel for 0..1 pixels: the RGB values for 3 channels, their means for 1."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return IMAGENET_MEAN.mean(keepdims=True), IMAGENET_STD.mean(keepdims=True)


def normalize(image: np.ndarray, method: str) -> np.ndarray:
    """uint8 (H, W, C) to float32 (C, H, W): ImageNet statistics, or z-score per image and channel."""
    values = image.astype(np.float32) / 255.0
    if method == "imagenet":
        mean, std = imagenet_statistics(values.shape[-1])
        values = (values - mean) / std
    elif method == "zscore":
        mean = values.mean(axis=(0, 1), keepdims=True)
        std = values.std(axis=(0, 1), keepdims=True)
        values = (values - mean) / np.maximum(std, ZSCORE_MIN_STD)
    else:
        raise ValueError(f"unknown normalization {method!r}; use 'imagenet' or 'zscore'")
    return np.ascontiguousarray(values.transpose(2, 0, 1))


def training_augmentation(seed: int, flips: bool = True, affine: bool = False, intensity: bool = False,
                          elastic: bool = False) -> A.Compose | None:
    """The switched-on training augmentations, reproducible from `seed`; None when all are off.

    flips: horizontal/vertical flips and 90-degree rotations, label-preserving for MRI slices.
    affine: the patient lies a little differently in each scan (scale 0.9-1.1, +-15 degrees, +-6 % shift per axis).
    elastic: smooth geometric warp like gradient non-linearity (mean ~3 px, at most ~10 px at 256 px).
    intensity: gain, contrast and gamma differ between scanners and protocols.
    Geometric transforms move image and mask alike (mask by nearest neighbour, so it stays {0, 1},
    uncovered pixels 0); intensity transforms touch the image only.
    """
    geometry = dict(interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)
    transforms: list[A.BasicTransform] = []
    if flips:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if affine:
        # keep_ratio: one zoom for both axes, as heads differ in size, not in pixel aspect ratio
        transforms.append(A.Affine(scale=(0.9, 1.1), keep_ratio=True, rotate=(-15, 15),
                                   translate_percent=(-0.06, 0.06), p=0.5, **geometry))
    if elastic:  # GridDistortion's limit is relative to the image, so it is equally mild at any IMAGE_SIZE
        transforms.append(A.GridDistortion(num_steps=5, distort_limit=(-0.1, 0.1), p=0.25, **geometry))
    if intensity:
        transforms += [A.RandomBrightnessContrast(brightness_limit=(-0.15, 0.15), contrast_limit=(-0.15, 0.15),
                                                  p=0.5),
                       A.RandomGamma(gamma_limit=(80, 120), p=0.5)]
    return A.Compose(transforms, seed=seed) if transforms else None


class SegmentationDataset(torch.utils.data.Dataset):
    """Samples (image float32 (C, S, S), mask float32 (1, S, S) in {0, 1}) from the rows `indices` of the arrays.

    The arrays may be in memory or memory-mapped (the disk cache); `indices`
    (default: every row) picks rows without copying the arrays. With `types`
    (a class index per row of the arrays, e.g. the tumour type: TYPE_COLUMN),
    samples are (image, mask, type index int64 scalar); the type is a label of the
    whole image, which flips, rotations, warps and intensity changes keep.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, normalization: str,
                 transform: A.Compose | None = None, indices: Sequence[int] | None = None,
                 types: Sequence[int] | None = None):
        self.images, self.masks = images, masks
        self.indices = list(range(len(images)) if indices is None else indices)
        self.normalization = normalization
        self.transform = transform
        self.types = None if types is None else torch.as_tensor(types, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        # A memory-mapped cache travels to workers started by spawn (macOS, Windows) as its file name,
        # not as a copy of every slice.
        state = dict(self.__dict__)
        for name in ("images", "masks"):
            if isinstance(state[name], np.memmap):
                state[name] = Path(state[name].filename)
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("images", "masks"):
            if isinstance(state[name], Path):
                state[name] = np.load(state[name], mmap_mode="r")
        self.__dict__.update(state)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        row = self.indices[index]
        image, mask = np.array(self.images[row]), np.array(self.masks[row])  # copies: a memory map stays read-only
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        sample = (torch.from_numpy(normalize(image, self.normalization)),
                  torch.from_numpy(mask[None].astype(np.float32)))
        return sample if self.types is None else (*sample, self.types[row])


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker its own augmentation stream (else all repeat one)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(info.seed % 2**32)


class HardExampleSampler(torch.utils.data.Sampler[int]):
    """Draws an epoch of `count` positions with replacement, favouring the slices training finds hard.

    Each position's probability is (1 - hard_share) / count plus hard_share
    times its share of the summed latest training losses, so a slice whose
    loss is three times the average is drawn about (1 + 2 * hard_share)
    times as often and a solved one about (1 - hard_share) times. A slice
    not yet trained on counts as the average of those that were (the first
    epoch draws uniformly). The DataLoader takes batches of `batch_size`
    from `order` in sequence, so batch b holds order[b * batch_size:][:batch_size];
    `record(b, losses)` stores their losses.

    Args:
        count: number of training slices (dataset positions 0 .. count-1).
        hard_share: 0 (uniform with replacement) to 1 (in proportion to the loss alone).
        batch_size: the DataLoader's batch size.
        generator: the loader's generator, so a resumed run draws the same epochs.
    """

    def __init__(self, count: int, hard_share: float, batch_size: int, generator: torch.Generator):
        if count < 1 or not 0 <= hard_share <= 1 or batch_size < 1:
            raise ValueError(f"HardExampleSampler needs count >= 1, 0 <= hard_share <= 1 and batch_size >= 1, "
                             f"got {count}, {hard_share}, {batch_size}")
        self.count, self.hard_share, self.batch_size, self.generator = count, hard_share, batch_size, generator
        self.losses = torch.full((count,), float("nan"))  # latest training loss of each position
        self.order = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.count

    def probabilities(self) -> torch.Tensor:
        """Each position's chance per draw (sums to 1)."""
        known = ~torch.isnan(self.losses)
        losses = torch.where(known, self.losses, self.losses[known].mean() if known.any() else 1.0).clamp(min=0)
        total = losses.sum()
        loss_share = losses / total if total > 0 else torch.full_like(losses, 1 / self.count)
        return (1 - self.hard_share) / self.count + self.hard_share * loss_share

    def __iter__(self) -> Iterator[int]:
        self.order = torch.multinomial(self.probabilities(), self.count, replacement=True, generator=self.generator)
        return iter(self.order.tolist())

    def record(self, batch: int, losses: torch.Tensor) -> None:
        """Store the training losses of batch number `batch` (0-based) of the current epoch."""
        positions = self.order[batch * self.batch_size:][:len(losses)]
        if len(positions) != len(losses):
            raise ValueError(f"batch {batch} holds {len(positions)} positions of this epoch, got {len(losses)} losses")
        self.losses[positions] = losses.detach().float().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The latest losses: with the loader's generator, all a resumed run needs to draw the same epochs."""
        return {"losses": self.losses.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the losses a checkpoint saved (refused when they cover another number of slices)."""
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"saved sampler losses cover {len(state['losses'])} slices, this split has {self.count}")
        self.losses = state["losses"].clone().float()


class BalancedSampler(torch.utils.data.Sampler[int]):
    """Draws an epoch of `len(labels)` positions in which every class of `labels` comes up equally often (within 1).

    Each of the K classes gets count // K draws and count % K of them,
    chosen at random each epoch, one more. Inside a class the draws follow
    a shuffled cycle through its positions, without replacement, continued
    across epochs and reshuffled when used up: a large class shows every
    slice once before any slice twice, a small one repeats its slices
    evenly, never one slice many times by chance (as drawing with
    replacement would). The epoch's draws are then shuffled together.
    Everything random comes from `generator`; the cycles are `state_dict`,
    so with the generator's state a resumed run draws the same epochs.

    Args:
        labels: the class of each training position 0 .. count-1 (any sortable values, e.g. class indices).
        generator: the loader's generator, whose state checkpoints save.
    """

    def __init__(self, labels: Sequence, generator: torch.Generator):
        if not labels:
            raise ValueError("BalancedSampler needs at least one labelled position")
        self.count, self.generator = len(labels), generator
        classes = sorted(set(labels))
        self.members = [torch.tensor([i for i, label in enumerate(labels) if label == c]) for c in classes]
        self.cycles = [torch.empty(0, dtype=torch.long) for _ in classes]  # each class's current shuffled order
        self.cursors = [0] * len(classes)  # positions of its cycle already drawn

    def __len__(self) -> int:
        return self.count

    def quotas(self) -> list[int]:
        """Draws of each class this epoch: count // K, plus one for count % K classes chosen at random."""
        base, extra = divmod(self.count, len(self.members))
        lucky = set(torch.randperm(len(self.members), generator=self.generator)[:extra].tolist())
        return [base + (k in lucky) for k in range(len(self.members))]

    def _draw(self, k: int, number: int) -> list[int]:
        """The next `number` positions of class k's cycle, reshuffling it whenever it is used up."""
        drawn: list[int] = []
        while len(drawn) < number:
            if self.cursors[k] == len(self.cycles[k]):
                members = self.members[k]
                self.cycles[k] = members[torch.randperm(len(members), generator=self.generator)]
                self.cursors[k] = 0
            taken = self.cycles[k][self.cursors[k]:self.cursors[k] + number - len(drawn)]
            drawn += taken.tolist()
            self.cursors[k] += len(taken)
        return drawn

    def __iter__(self) -> Iterator[int]:
        # The whole epoch is drawn here, so the state after it is settled before its checkpoint is written.
        draws = torch.tensor([p for k, quota in enumerate(self.quotas()) for p in self._draw(k, quota)])
        return iter(draws[torch.randperm(self.count, generator=self.generator)].tolist())

    def state_dict(self) -> dict[str, Any]:
        """Each class's current cycle and how far it was drawn: with the loader's generator, all a resume needs."""
        return {"cycles": [cycle.clone() for cycle in self.cycles], "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the cycles a checkpoint saved; refused (ValueError) when they do not fit these labels."""
        cycles, cursors = state["cycles"], state["cursors"]
        fits = len(cycles) == len(cursors) == len(self.members) and all(
            0 <= cursor <= len(cycle) and (len(cycle) == 0 or sorted(cycle.tolist()) == members.tolist())
            for cycle, cursor, members in zip(cycles, cursors, self.members, strict=True))
        if not fits:
            raise ValueError(f"saved balanced-sampler cycles do not fit this split's {len(self.members)} classes "
                             f"of {self.count} slices")
        self.cycles = [torch.as_tensor(cycle, dtype=torch.long).cpu() for cycle in cycles]
        self.cursors = [int(cursor) for cursor in cursors]
