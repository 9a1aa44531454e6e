"""Folders of image/label volume pairs (BraTS, the Medical Segmentation Decathlon, your own) cut into 2-D slices."""

from __future__ import annotations

import math
import re
import sys
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tumorseg.data.spacing import format_spacing
from tumorseg.data.volumes import (AXIS_LETTERS, WINDOW_PERCENTILES, VolumeError, affine_mismatch, is_nifti,
                                   read_geometry, read_nifti, slice_name, slice_spacing, thinnest_axis, volume_stem,
                                   window_to_uint8)
from tumorseg.sources.output import PrepareError, refuse_existing_output, staging_folder, write_metadata

# Every volume is checked (pairing, header, shape, geometry) before anything is written; a bad one stops the
# whole conversion, as a bad slice stops the figshare conversion.

NIFTI_METADATA_COLUMNS = ["image_id", "patient_id", "source_volume", "source_mask", "slice_axis", "slice_index",
                          "has_tumour", "tumour_pixels", "pixel_spacing_mm", "pixel_spacing_rows_mm",
                          "pixel_spacing_cols_mm", "height", "width"]
# A pattern's NIfTI ending, dropped before its fixed end is taken: `*_seg.nii*` ends in `_seg`, like `*_seg.nii.gz`.
PATTERN_NIFTI_END = re.compile(r"\.nii(\.gz)?\*?$", re.IGNORECASE)
WILDCARD_ENDS = "*?]"  # the last of these in a pattern closes its last wildcard
MAX_LISTED_PROBLEMS = 50  # input problems named in the error; the rest are counted
METADATA_DIGITS = 6  # significant digits of the pixel sizes written to metadata.csv


@dataclass(frozen=True)
class NiftiOptions:
    """How `convert_nifti` cuts, labels and selects slices (the `nifti` command's options)."""

    image_pattern: str = "*.nii*"
    mask_pattern: str = "*.nii*"
    tumour_labels: tuple[int, ...] | None = None  # None: every label above 0
    axis: int | None = None  # None: volumes.thinnest_axis of each image volume
    size: int | None = None  # None: native slice size
    empty_share: float = 0.0
    seed: int = 0
    ignore_affine: bool = False


@dataclass(frozen=True)
class VolumePair:
    """An image volume and its label volume, paired by case name."""

    case: str
    image: Path
    mask: Path


@dataclass
class NiftiSummary:
    """What `convert_nifti` wrote, for the closing message."""

    cases: int = 0
    tumour_slices: int = 0
    empty_slices: int = 0
    axes: dict[int, int] = field(default_factory=dict)  # slice axis: number of cases cut along it
    labels_found: set[int] = field(default_factory=set)  # every label value above 0 in the label volumes
    cases_without_tumour: list[str] = field(default_factory=list)

    @property
    def slices(self) -> int:
        return self.tumour_slices + self.empty_slices


def pattern_ending(pattern: str) -> str:
    """The fixed end of a pattern's file-name part that the case name drops.

    The text after the last wildcard (`*`, `?` or a `[...]` set) of the part after the last `/`,
    once a trailing `.nii`, `.nii.gz` or `.nii*` is removed: `*_flair.nii.gz` -> `_flair`,
    `**/*_seg.nii*` -> `_seg`, `*.nii*` -> `` (the whole stem is the case name).
    """
    name = PATTERN_NIFTI_END.sub("", pattern.rsplit("/", 1)[-1])
    last = max(name.rfind(mark) for mark in WILDCARD_ENDS)
    return name[last + 1:]


def case_name(path: Path, ending: str) -> str:
    """The case a volume belongs to: its stem (volumes.volume_stem) without the pattern's fixed end."""
    stem = volume_stem(path)
    if ending and stem.lower().endswith(ending.lower()) and len(stem) > len(ending):
        return stem[:-len(ending)]
    return stem


def find_case_volumes(root: Path, pattern: str, option: str, problems: list[str]) -> dict[str, Path]:
    """NIfTI files under `root` matching `pattern`, keyed by case name; collisions go to `problems`.

    A pattern without `/` matches file names at any depth (one folder per case, as BraTS ships it);
    one with `/` is a glob relative to `root` (`**/` for any depth). Hidden files and folders are skipped.
    """
    if not root.is_dir():
        raise PrepareError(f"{root}: no such folder ({option})")
    try:
        matched = root.glob(pattern) if "/" in pattern else root.rglob(pattern)
        paths = sorted(p for p in matched if is_nifti(p) and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    except (ValueError, NotImplementedError) as error:  # pathlib: absolute or malformed patterns
        raise PrepareError(f"{option} {pattern!r}: not a usable pattern relative to {root} ({error})") from error
    if not paths:
        raise PrepareError(f"{root}: no .nii or .nii.gz file matches {option} {pattern!r}")
    ending = pattern_ending(pattern)
    found: dict[str, Path] = {}
    seen: dict[str, Path] = {}  # NFC + casefold: names that collide on a case-insensitive file system
    for path in paths:
        case = unicodedata.normalize("NFC", case_name(path, ending))
        key = case.casefold()
        if key in seen:
            problems.append(f"{path}: gives the case name '{case}', as {seen[key]} does ({option} {pattern!r}); "
                            "each case needs one volume")
            continue
        seen[key] = path
        found[case] = path
    return found


def pair_volumes(images_root: Path, masks_root: Path, options: NiftiOptions, problems: list[str]) -> list[VolumePair]:
    """Image and label volumes paired by case name; every unpaired or doubly matched file goes to `problems`."""
    images = find_case_volumes(images_root, options.image_pattern, "--image-pattern", problems)
    masks = find_case_volumes(masks_root, options.mask_pattern, "--mask-pattern", problems)
    both = {path.resolve() for path in images.values()} & {path.resolve() for path in masks.values()}
    if both:
        first = sorted(both)[0]
        more = f" (and {len(both) - 1} more files)" if len(both) > 1 else ""
        problems.append(f"{first}{more}: matches both --image-pattern {options.image_pattern!r} and --mask-pattern "
                        f"{options.mask_pattern!r}; give patterns that tell images from labels "
                        "(BraTS: '*_flair.nii.gz' and '*_seg.nii.gz')")
    pairs = []
    for case, image in images.items():
        if image.resolve() in both:
            continue
        if case not in masks:
            problems.append(f"{image}: image volume without a label volume (no file of case '{case}' matching "
                            f"--mask-pattern {options.mask_pattern!r} under {masks_root})")
        elif masks[case].resolve() not in both:
            pairs.append(VolumePair(case, image, masks[case]))
    for case, mask in masks.items():
        if case not in images and mask.resolve() not in both:
            problems.append(f"{mask}: label volume without an image volume (no file of case '{case}' matching "
                            f"--image-pattern {options.image_pattern!r} under {images_root})")
    return sorted(pairs, key=lambda pair: pair.case)


def volume_header(path: Path, problems: list[str]) -> tuple[tuple[int, ...], np.ndarray] | None:
    """Shape (3-D, as volumes.read_nifti sees it) and affine from a NIfTI header; None after adding a problem."""
    try:
        return read_geometry(path)
    except VolumeError as error:
        problems.append(str(error))
        return None


def check_pair(pair: VolumePair, options: NiftiOptions, problems: list[str]) -> None:
    """Header checks of one pair: both readable 3-D volumes of one shape on one voxel grid."""
    image, mask = volume_header(pair.image, problems), volume_header(pair.mask, problems)
    if image is None or mask is None:
        return
    if mask[0] != image[0]:
        problems.append(f"{pair.mask}: label volume has shape {mask[0]}, its image volume {pair.image} "
                        f"has {image[0]}")
    elif not options.ignore_affine and (mismatch := affine_mismatch(pair.image, image[1], pair.mask, mask[1])):
        problems.append(f"{mismatch}; check the files, or give --ignore-affine if the voxels do match by index "
                        "(a label saved without geometry)")


def label_values(labels: np.ndarray, path: Path) -> np.ndarray:
    """A label volume's values as integers; raises PrepareError for fractions or NaN.

    Such labels come from a label map resampled with linear interpolation
    (0.9999999, 1.5), or from an image volume the mask pattern caught.
    """
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    values = np.asarray(labels)  # in its own dtype, so the values are shown as stored (float32 0.9999999, not 1)
    whole = np.isfinite(values) & (values == np.round(values))
    if not whole.all():
        raise PrepareError(fractional_labels_message(values[~whole], path))
    return values.astype(np.int64)


def fractional_labels_message(offending: np.ndarray, path: Path, shown: int = 5) -> str:
    """Why a label volume with the `offending` (not whole) values is refused, with the values and the remedies."""
    distinct = np.unique(offending)
    values = ", ".join(str(value) for value in distinct[:shown]) + (", ..." if len(distinct) > shown else "")
    return (f"{path}: label volume holds {offending.size} voxel(s) whose value is not a whole number "
            f"({len(distinct)} distinct: {values}); labels must be whole numbers: resample label volumes with "
            "nearest-neighbour interpolation, or round them (numpy.rint) where they are whole numbers off by "
            "rounding; if this file is an image volume, check --mask-pattern")


def tumour_mask(labels: np.ndarray, tumour_labels: tuple[int, ...] | None) -> np.ndarray:
    """Bool volume: voxels whose label is one of `tumour_labels` (None: any label above 0)."""
    return labels > 0 if tumour_labels is None else np.isin(labels, tumour_labels)


def spread_empty_slices(candidates: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """`count` of the tumour-free slice indices `candidates` (all when fewer), drawn without replacement."""
    if count >= len(candidates):
        return candidates.tolist()
    return sorted(rng.choice(candidates, size=count, replace=False).tolist())


def convert_case(pair: VolumePair, images_root: Path, masks_root: Path, options: NiftiOptions, staging: Path,
                 empty_wanted: Callable[[int], int], summary: NiftiSummary) -> list[dict[str, object]]:
    """Write the PNG pairs of one case into `staging`; return their metadata rows.

    `empty_wanted(tumour_slices)` says how many tumour-free slices this case adds.
    """
    try:
        volume = read_nifti(pair.image)
        labels = label_values(read_nifti(pair.mask).data, pair.mask)
    except VolumeError as error:
        raise PrepareError(str(error)) from error
    if labels.shape != volume.data.shape:  # the header check saw the same; a file changed meanwhile
        raise PrepareError(f"{pair.mask}: label volume has shape {labels.shape}, its image volume {pair.image} "
                           f"has {volume.data.shape}")
    summary.labels_found.update(int(v) for v in np.unique(labels) if v > 0)
    tumour = tumour_mask(labels, options.tumour_labels)
    axis = thinnest_axis(volume) if options.axis is None else options.axis
    summary.axes[axis] = summary.axes.get(axis, 0) + 1
    pixels = window_to_uint8(volume.data)  # one window per volume, as test.py's volume path uses
    in_plane = tuple(a for a in range(3) if a != axis)
    tumour_counts = tumour.sum(axis=in_plane)
    tumour_slices = np.flatnonzero(tumour_counts)
    if not len(tumour_slices):
        summary.cases_without_tumour.append(pair.case)
    # Tumour-free slices worth showing: not blank (a constant slice lies outside the head).
    candidates = np.flatnonzero((tumour_counts == 0) & (pixels.max(axis=in_plane) > pixels.min(axis=in_plane)))
    seed = [options.seed, zlib.crc32(pair.case.encode())]  # per case: adding a case changes no other case's draw
    empty = spread_empty_slices(candidates, empty_wanted(len(tumour_slices)), np.random.default_rng(seed))
    summary.tumour_slices += len(tumour_slices)
    summary.empty_slices += len(empty)
    rows_mm, cols_mm = slice_spacing(volume, axis)
    rows = []
    for index in sorted([*tumour_slices.tolist(), *empty]):
        image = np.take(pixels, index, axis=axis)
        mask = np.take(tumour, index, axis=axis).astype(np.uint8) * 255
        height, width = image.shape
        if options.size:
            image = np.asarray(Image.fromarray(image).resize((options.size, options.size), Image.Resampling.BOX))
            mask = np.asarray(Image.fromarray(mask).resize((options.size, options.size), Image.Resampling.NEAREST))
        scaled_rows_mm, scaled_cols_mm = rows_mm * height / image.shape[0], cols_mm * width / image.shape[1]
        stem = slice_name(pair.case, axis, index)
        Image.fromarray(image).save(staging / "images" / f"{stem}.png")
        Image.fromarray(mask).save(staging / "masks" / f"{stem}.png")
        tumour_pixels = int(np.count_nonzero(mask))
        rows.append({"image_id": stem, "patient_id": pair.case,
                     "source_volume": pair.image.relative_to(images_root).as_posix(),
                     "source_mask": pair.mask.relative_to(masks_root).as_posix(),
                     "slice_axis": axis, "slice_index": index, "has_tumour": int(tumour_pixels > 0),
                     "tumour_pixels": tumour_pixels,
                     "pixel_spacing_mm": format_spacing((scaled_rows_mm, scaled_cols_mm), METADATA_DIGITS),
                     "pixel_spacing_rows_mm": f"{scaled_rows_mm:.{METADATA_DIGITS}g}",
                     "pixel_spacing_cols_mm": f"{scaled_cols_mm:.{METADATA_DIGITS}g}",
                     "height": image.shape[0], "width": image.shape[1]})
    return rows


def convert_nifti(images_root: Path, masks_root: Path, out: Path, options: NiftiOptions) -> NiftiSummary:
    """The `nifti` command: pair, check every volume, then write the slices into `out` via its staging folder.

    Every pairing and header problem is collected and raised together before
    anything is written; a problem met while converting stops the conversion
    and removes the staging folder. `out` appears only when all cases converted.
    """
    refuse_existing_output(out)
    images_root, masks_root = Path(images_root), Path(masks_root)
    problems: list[str] = []
    pairs = pair_volumes(images_root, masks_root, options, problems)
    for pair in tqdm(pairs, desc="checking", unit="case", disable=len(pairs) < 20):
        check_pair(pair, options, problems)
    if problems:
        listed = "\n".join(f"  {problem}" for problem in problems[:MAX_LISTED_PROBLEMS])
        if len(problems) > MAX_LISTED_PROBLEMS:
            listed += f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"
        raise PrepareError(f"{len(problems)} problem(s) with the input volumes; nothing was written:\n{listed}")

    summary = NiftiSummary(cases=len(pairs))
    tumour_so_far = 0

    def empty_wanted(tumour_slices: int) -> int:
        # Rounded on the running totals, so all cases together add round(share x tumour slices),
        # spread in proportion to each case's tumour slices, a shortfall of one case carried to the next.
        nonlocal tumour_so_far
        tumour_so_far += tumour_slices
        return max(0, math.floor(options.empty_share * tumour_so_far + 0.5) - summary.empty_slices)

    with staging_folder(out) as staging:
        rows = []
        for pair in tqdm(pairs, desc="converting", unit="case"):
            rows += convert_case(pair, images_root, masks_root, options, staging, empty_wanted, summary)
        if not rows:
            chosen = "above 0" if options.tumour_labels is None else ", ".join(map(str, options.tumour_labels))
            raise PrepareError(f"{images_root}: no slice of the {len(pairs)} case(s) has a tumour label ({chosen}); "
                               f"label values found: {sorted(summary.labels_found) or 'none above 0'}")
        write_metadata(staging / "metadata.csv", NIFTI_METADATA_COLUMNS, rows)
    return summary


def print_nifti_summary(summary: NiftiSummary, out: Path, options: NiftiOptions) -> None:
    """The closing lines of `nifti`: what was written, how it was cut, windowed and labelled."""
    axes = ", ".join(f"{AXIS_LETTERS[axis]} (axis {axis}) in {count}" for axis, count in sorted(summary.axes.items()))
    chosen = "every label above 0" if options.tumour_labels is None else ", ".join(map(str, options.tumour_labels))
    low, high = WINDOW_PERCENTILES
    print(f"wrote {summary.slices} slices of {summary.cases} cases to {out}: {summary.tumour_slices} with tumour, "
          f"{summary.empty_slices} tumour-free (--empty-share {options.empty_share:g})")
    print(f"slice axis: {axes} case(s) ({'auto: the thinnest' if options.axis is None else '--axis'})")
    print(f"tumour labels: {chosen}; label values found: {', '.join(map(str, sorted(summary.labels_found))) or 'none'}")
    print(f"intensity window: percentiles {low:g} to {high:g} of each image volume to 0..255 "
          "(volumes already holding whole numbers 0..255 are kept as they are)")
    if options.size:
        print(f"resampled to {options.size} x {options.size} px; pixel_spacing_mm is that of the written pixels")
    missing = sorted(set(options.tumour_labels or ()) - summary.labels_found)
    if missing:
        print(f"warning: tumour label(s) {', '.join(map(str, missing))} occur in no label volume "
              "(BraTS 2023 numbers the enhancing tumour 3, earlier releases 4)", file=sys.stderr)
    if summary.cases_without_tumour:
        cases = summary.cases_without_tumour
        shown = ", ".join(cases[:10]) + (" ..." if len(cases) > 10 else "")
        print(f"warning: {len(cases)} case(s) have no tumour voxel of the chosen labels and "
              f"add no tumour slice: {shown}", file=sys.stderr)
