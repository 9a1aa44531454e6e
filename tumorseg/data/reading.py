"""Reading a dataset folder: image and mask files paired by stem, their decoding, and metadata.csv.

A dataset folder holds `images/` and `masks/` whose files pair up by stem
(`images/17.png` with `masks/17.jpg` is fine), and optionally `metadata.csv`
whose `image_id` column names those stems (used for grouped splits). Stems
are compared in Unicode NFC form, so a name typed on macOS (NFD) still pairs.
"""

from __future__ import annotations

import csv
import os
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.csv"
METADATA_ID_COLUMN = "image_id"
PATIENT_COLUMN = "patient_id"  # the column SPLIT_GROUP_COLUMN "auto" splits by


class NotTwoLevelError(ValueError):
    """A mask holds values other than 0/1 or 0/255."""


@dataclass(frozen=True)
class Pair:
    """One image and its mask, matched by file stem."""

    stem: str
    image_path: Path
    mask_path: Path


def stem_key(path: Path) -> str:
    """The stem that pairs files and metadata rows: NFC, so 'é' as one or as two code points match."""
    return name_key(Path(path).stem)


def name_key(stem: str) -> str:
    """`stem_key` of a stem already taken from its file name (a Path of it would lose 'case.01''s '.01')."""
    return unicodedata.normalize("NFC", stem)


def image_named(folder: Path) -> Iterator[Path]:
    """Entries of `folder` with an image extension (matched in any case), sorted."""
    return (path for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS)


def files_by_stem(folder: Path) -> dict[str, list[Path]]:
    """Image files in `folder` that are regular files (or links to them), keyed by `stem_key`."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in image_named(folder):
        if path.is_file():
            found[stem_key(path)].append(path)
    return found


def unusable_entries(folder: Path) -> dict[Path, str]:
    """Image-named entries of `folder` that `files_by_stem` skips, each with the reason."""
    found = {}
    for path in image_named(folder):
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


def listed_pairs(root: Path) -> list[Pair]:
    """The image/mask pairs by stem, in `load_dataset`'s order, without decoding a file (check with verify_dataset)."""
    images, masks = files_by_stem(Path(root) / "images"), files_by_stem(Path(root) / "masks")
    return [Pair(stem, images[stem][0], masks[stem][0]) for stem in sorted(set(images) & set(masks))]


def pair_count(root: Path) -> int:
    """How many stems have both an image and a mask (0 without both folders).

    An upper bound on the slices `checks.scan` keeps, so arrays can be sized before decoding.
    """
    folders = (root / "images", root / "masks")
    if not all(folder.is_dir() for folder in folders):
        return 0  # checks.scan names the missing folder
    return len(set(files_by_stem(folders[0])) & set(files_by_stem(folders[1])))
