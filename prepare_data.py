"""Make datasets in the layout the pipeline reads: `images/`, `masks/`, `metadata.csv`.

    python prepare_data.py demo --out data/demo            # synthetic MRI-like slices, no download
    python prepare_data.py figshare --out data/figshare-brain-tumor   # the real set (Cheng et al.)
    python prepare_data.py figshare --from ~/Downloads/1512427.zip    # archives you already have
    python prepare_data.py nifti --images BraTS2021 --masks BraTS2021 --out data/brats-flair \
        --image-pattern '*_flair.nii.gz' --mask-pattern '*_seg.nii.gz'   # any image/label volume pairs

Every subcommand writes into `<out>.partial` beside `--out` and renames it at
the end, so an interrupted run never leaves an output that looks complete; on
an error, Ctrl-C or SIGTERM the `.partial` folder is removed again (exit code
1, 130, 143).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import re
import shutil
import sys
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from urllib.request import Request, urlopen

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from utils import interruption, sigterm_as_interrupt
from tumorseg.data.volumes import (AXIS_LETTERS, WINDOW_PERCENTILES, VolumeError, is_nifti, read_nifti, slice_name, slice_spacing,
                     thinnest_axis, volume_stem, window_to_uint8)


class PrepareError(Exception):
    """A problem that stops data preparation; the message names the file."""


# ----------------------------------------------------------------------------- demo

DEMO_CLASSES = ("meningioma", "glioma", "pituitary")
# Below 24 px the smallest tumour make_demo_slice draws (radius 0.04 x wobble 0.75, squeezed
# 1.3x) can fall between pixel centres, leaving an empty mask; from 24 px every slice has one.
DEMO_MIN_SIZE = 24


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: coarse random grid upsampled bilinearly."""
    coarse = rng.random((scale, scale)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def make_demo_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic T1-like slice (uint8) and its exact tumour mask (uint8, 0/255).

    A bright skull ring around textured brain tissue, plus one lobulated
    tumour blob that is brighter than the tissue around it, so a segmenter
    has to learn shape and contrast rather than a global threshold.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ry, rx = rng.uniform(0.36, 0.44), rng.uniform(0.30, 0.38)
    head = (yy / ry) ** 2 + (xx / rx) ** 2
    brain = head < 0.85
    skull = (head >= 0.85) & (head < 1.0)

    image = np.zeros((size, size), np.float32)
    image[brain] = 0.35 + 0.25 * _smooth_noise(rng, size, 8)[brain]
    image[skull] = 0.85

    # Tumour: an ellipse whose radius wobbles with angle, placed inside the brain.
    cy, cx = rng.uniform(-0.18, 0.18), rng.uniform(-0.15, 0.15)
    radius = rng.uniform(0.04, 0.12)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6.3)) * rng.uniform(0.2, 1.0)
    tumour = (np.hypot(yy - cy, (xx - cx) * rng.uniform(0.7, 1.3)) < radius * wobble) & brain
    image[tumour] = 0.7 + 0.2 * _smooth_noise(rng, size, 16)[tumour]

    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    image_u8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image_u8, tumour.astype(np.uint8) * 255


def make_demo_dataset(out: Path, count: int = 240, size: int = 128, seed: int = 0,
                      slices_per_patient: int = 6) -> Path:
    """Write `count` synthetic slices to `out` (images/, masks/, metadata.csv).

    Deterministic for a given seed. Consecutive slices share a `patient_id`
    so grouped splits can be exercised on the demo set too.
    """
    rng = np.random.default_rng(seed)
    with staging_folder(out) as staging:
        rows = []
        for index in range(count):
            image, mask = make_demo_slice(rng, size)
            stem = f"demo_{index:04d}"
            Image.fromarray(image).save(staging / "images" / f"{stem}.png")
            Image.fromarray(mask).save(staging / "masks" / f"{stem}.png")
            patient = index // slices_per_patient
            rows.append({"image_id": stem, "patient_id": f"p{patient:03d}",
                         "tumor_class": DEMO_CLASSES[patient % len(DEMO_CLASSES)]})
        write_metadata(staging / "metadata.csv", ["image_id", "patient_id", "tumor_class"], rows)
    return out


# ----------------------------------------------------------------------------- figshare
#
# Cheng's release (figshare article 1512427, CC BY 4.0): 3064 T1 contrast-enhanced
# slices from 233 patients, as four zips of MATLAB v7.3 files `N.mat` plus
# `cvind.mat`, the five patient-wise cross-validation folds.

FIGSHARE_ARTICLE_ID = 1512427
FIGSHARE_API_URL = "https://api.figshare.com/v2"
FIGSHARE_CLASSES = {1: "meningioma", 2: "glioma", 3: "pituitary"}  # cjdata.label
SLICE_FIELDS = ("image", "tumorMask", "label", "PID")  # the cjdata fields the conversion reads
SLICE_FILE = re.compile(r"(\d+)\.mat")  # N.mat holds slice N
FOLDS_FILE = "cvind.mat"  # variable `cvind`: the fold (1-5) of slice N at index N-1
# Each slice's raw intensities map linearly from these percentiles to 0..255, clipped
# outside, so a few very bright pixels (vessels, fat) do not darken the whole slice.
INTENSITY_PERCENTILES = (0.5, 99.5)
METADATA_COLUMNS = ["image_id", "patient_id", "release_pid", "tumor_class", "height", "width", "fold"]
# A release PID with letters after its digits (MR024780B beside MR024780) is a repeat study of the same person:
# such IDs always share the tumour class, so patient_id drops the letters and a split keeps the person whole.
REPEAT_STUDY_SUFFIX = re.compile(r"(?<=\d)[A-Za-z]+$")
API_PAGE_SIZE = 100
DOWNLOAD_ATTEMPTS = 3  # per file and run; each attempt resumes where the previous one stopped
HTTP_TIMEOUT_S = 60
HTTP_HEADERS = {"User-Agent": "brain-tumour-segmentation prepare_data.py (urllib)"}
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of the figshare article, as its API lists it."""

    name: str
    url: str
    size: int
    md5: str


@dataclass(frozen=True)
class MatFile:
    """A .mat file on disk or inside a zip; `origin` names it in messages."""

    name: str
    origin: str
    read: Callable[[], bytes]


@dataclass(frozen=True)
class FigshareSlice:
    """The fields of one `cjdata` struct that the conversion uses, in image orientation."""

    image: np.ndarray  # (H, W) raw intensities
    mask: np.ndarray  # (H, W) bool
    tumor_class: str
    patient_id: str


def list_article_files(api_url: str, article_id: int) -> list[dict]:
    """Every file entry the figshare API lists for the article (name, size, download_url, MD5s)."""
    entries: list[dict] = []
    page = 1
    while True:
        url = f"{api_url.rstrip('/')}/articles/{article_id}/files?page={page}&page_size={API_PAGE_SIZE}"
        try:
            with urlopen(Request(url, headers=HTTP_HEADERS), timeout=HTTP_TIMEOUT_S) as response:
                batch = json.load(response)
        except (OSError, HTTPException, ValueError) as error:  # URLError is an OSError; ValueError: not JSON
            raise PrepareError(f"{url}: cannot list the article's files ({error})") from error
        if not isinstance(batch, list):
            raise PrepareError(f"{url}: expected a JSON list of files, got {str(batch)[:200]}")
        entries += batch
        if len(batch) < API_PAGE_SIZE:
            return entries
        page += 1


def release_files(entries: list[dict], api_url: str) -> list[RemoteFile]:
    """The zips and cvind.mat among the listed entries, each checked to have a URL, size and MD5."""
    files = []
    for entry in entries:
        name = str(entry.get("name", ""))
        # Only plain file names: the name becomes a path inside the download cache.
        if PurePosixPath(name).name != name or not (name.endswith(".zip") or name == FOLDS_FILE):
            continue
        md5 = entry.get("computed_md5") or entry.get("supplied_md5")
        if not (md5 and entry.get("download_url") and isinstance(entry.get("size"), int)):
            raise PrepareError(f"{api_url}: the listing of {name} lacks a download_url, size or MD5: {entry}")
        files.append(RemoteFile(name, entry["download_url"], entry["size"], md5))
    if not any(file.name.endswith(".zip") for file in files):
        listed = ", ".join(str(entry.get("name")) for entry in entries)
        raise PrepareError(f"{api_url}: article {FIGSHARE_ARTICLE_ID} lists no .zip archive (files: {listed})")
    return files


def file_md5(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def append_remaining(file: RemoteFile, part: Path) -> None:
    """Fetch the bytes of `file` that `part` lacks (HTTP Range from its length) and append them."""
    done = part.stat().st_size if part.exists() else 0
    if done > file.size:  # cannot be a prefix of the file: start again
        part.unlink()
        done = 0
    if done == file.size:
        return
    headers = {**HTTP_HEADERS, "Range": f"bytes={done}-"} if done else HTTP_HEADERS
    with urlopen(Request(file.url, headers=headers), timeout=HTTP_TIMEOUT_S) as response:
        if response.status != 206:  # the server ignored the Range header and sends everything
            done = 0
        with open(part, "ab" if done else "wb") as f, \
                tqdm(total=file.size, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=file.name) as progress:
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                done += len(chunk)
                progress.update(len(chunk))
    if done < file.size:
        raise ConnectionError(f"connection closed after {done} of {file.size} bytes")


def download_verified(file: RemoteFile, cache_dir: Path) -> Path:
    """`cache_dir/<name>`, downloaded (resuming `<name>.part`) unless already there, with its MD5 checked."""
    target = cache_dir / file.name
    if target.exists() and file_md5(target) == file.md5:
        return target
    part = cache_dir / (file.name + ".part")
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            append_remaining(file, part)
            break
        except (OSError, HTTPException) as error:  # URLError, resets, timeouts, short transfers
            if attempt == DOWNLOAD_ATTEMPTS:
                raise PrepareError(f"{file.name}: network error, download failed {DOWNLOAD_ATTEMPTS} times "
                                   f"({error}); run again to resume from {part}") from error
            print(f"warning: {file.name}: {error}; resuming", file=sys.stderr)
    actual = file_md5(part)
    if actual != file.md5:
        part.unlink()  # resuming cannot repair wrong bytes
        raise PrepareError(f"{file.name}: MD5 mismatch (expected {file.md5}, got {actual}); "
                           "the download was deleted, run again to fetch it anew")
    part.replace(target)
    return target


def fetch_figshare(api_url: str, cache_dir: Path) -> list[Path]:
    """Download the release's zips and cvind.mat into `cache_dir`, each MD5-checked; return their paths."""
    files = release_files(list_article_files(api_url, FIGSHARE_ARTICLE_ID), api_url)
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"downloads go to {cache_dir} (kept so a re-run resumes; delete it afterwards to free the space)")
    return [download_verified(file, cache_dir) for file in files]


def read_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The bytes of one zip member; a corrupt or truncated archive raises PrepareError."""
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise PrepareError(f"{archive}: cannot read {info.filename}, the archive is truncated or corrupt "
                           f"({error})") from error


def zip_mat_files(archive: Path, stack: ExitStack) -> list[MatFile]:
    """The .mat members of a zip, also those of zips inside it (figshare's "Download all" zip)."""
    try:
        zf = stack.enter_context(zipfile.ZipFile(archive))
    except (zipfile.BadZipFile, OSError) as error:
        raise PrepareError(f"{archive}: not a readable zip archive, truncated or corrupt ({error})") from error
    found = []
    for info in zf.infolist():
        name = PurePosixPath(info.filename).name
        if name.endswith(".zip"):
            # Unpacked to disk once: reading members of a zip nested in a zip seeks too slowly.
            inner = Path(stack.enter_context(tempfile.TemporaryDirectory())) / name
            inner.write_bytes(read_member(archive, zf, info))
            found += zip_mat_files(inner, stack)
        elif name.endswith(".mat"):
            found.append(MatFile(name, f"{archive}:{info.filename}", partial(read_member, archive, zf, info)))
    return found


def find_mat_files(sources: list[Path], stack: ExitStack) -> dict[str, MatFile]:
    """Every .mat in `sources` (folders searched recursively, zips opened), keyed by file name."""
    found: dict[str, MatFile] = {}
    for source in sources:
        if source.is_dir():
            paths = sorted(p for p in source.rglob("*") if p.suffix in (".zip", ".mat"))
        elif source.is_file():
            paths = [source]
        else:
            raise PrepareError(f"{source}: no such file or folder")
        for path in paths:
            if path.suffix == ".zip":
                mats = zip_mat_files(path, stack)
            else:
                mats = [MatFile(path.name, str(path), path.read_bytes)]
            for mat in mats:
                found.setdefault(mat.name, mat)  # a slice both unpacked and zipped is the same slice
    return found


def decode_matlab_text(codes: np.ndarray) -> str:
    """A MATLAB char array as v7.3 files store it (one uint16 code per character) as a str."""
    return "".join(chr(code) for code in codes.ravel()).replace("\0", "").strip()


def read_slice(mat: MatFile) -> FigshareSlice:
    """Decode one `N.mat` (MATLAB v7.3 = HDF5, struct `cjdata`), checking every field it uses."""
    data = mat.read()
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            struct = f.get("cjdata")
            if not isinstance(struct, h5py.Group):
                raise PrepareError(f"{mat.origin}: has no 'cjdata' struct, so it is not a slice of this dataset")
            missing = [field for field in SLICE_FIELDS if field not in struct]
            if missing:
                raise PrepareError(f"{mat.origin}: 'cjdata' lacks the field(s) {', '.join(missing)}")
            # MATLAB stores arrays column-major, so h5py reads every matrix transposed.
            image = np.asarray(struct["image"]).T
            mask = np.asarray(struct["tumorMask"]).T
            label = np.asarray(struct["label"]).ravel()
            patient_id = decode_matlab_text(np.asarray(struct["PID"]))
    except OSError as error:  # h5py: "file signature not found" and other unreadable files
        raise PrepareError(f"{mat.origin}: not a readable MATLAB v7.3 (HDF5) file ({error})") from error
    if image.ndim != 2 or mask.shape != image.shape:
        raise PrepareError(f"{mat.origin}: image is {image.shape} but tumorMask is {mask.shape}; "
                           "expected two matrices of one size")
    if label.size != 1 or label[0] not in FIGSHARE_CLASSES:
        raise PrepareError(f"{mat.origin}: label is {label.tolist()}, expected 1, 2 or 3")
    if not patient_id:
        raise PrepareError(f"{mat.origin}: PID is empty")
    return FigshareSlice(image, mask > 0, FIGSHARE_CLASSES[int(label[0])], patient_id)


def read_folds(mat: MatFile) -> list[int] | None:
    """The fold of each slice (index N-1 for slice N) from cvind.mat; None when it cannot be read here."""
    data = mat.read()
    try:
        with h5py.File(io.BytesIO(data), "r") as f:  # MATLAB v7.3
            folds = np.asarray(f["cvind"]) if "cvind" in f else None
    except OSError:  # not HDF5: an older MAT file, which only scipy reads
        try:
            from scipy.io import loadmat
        except ImportError:
            print(f"warning: {mat.origin} is an old-style MAT file and reading it needs scipy "
                  "(pip install scipy); the fold column is left empty", file=sys.stderr)
            return None
        try:
            folds = loadmat(io.BytesIO(data)).get("cvind")
        except Exception as error:  # scipy raises several exception types for unreadable files
            raise PrepareError(f"{mat.origin}: not a readable MAT file ({error})") from error
    if folds is None:
        raise PrepareError(f"{mat.origin}: has no variable 'cvind'")
    return [int(fold) for fold in folds.ravel()]


def window_intensities(image: np.ndarray) -> np.ndarray:
    """Raw intensities to float32 0..255 through the INTENSITY_PERCENTILES window."""
    values = image.astype(np.float64)
    low, high = np.percentile(values, INTENSITY_PERCENTILES)
    if high <= low:  # nearly constant slice: fall back to the full range
        low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return (np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.float32)


def slice_pngs(figshare_slice: FigshareSlice, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit image and 0/255 mask of a slice, resampled to size x size when `size` is given."""
    image = window_intensities(figshare_slice.image)
    mask = figshare_slice.mask.astype(np.uint8) * 255
    if size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))
        mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    return np.rint(image).astype(np.uint8), mask


def convert_slice(number: int, mat: MatFile, staging: Path, size: int | None) -> dict[str, object]:
    """Write images/N.png and masks/N.png for slice N; return its metadata row, fold not yet set."""
    figshare_slice = read_slice(mat)
    image, mask = slice_pngs(figshare_slice, size)
    Image.fromarray(image).save(staging / "images" / f"{number}.png")
    Image.fromarray(mask).save(staging / "masks" / f"{number}.png")
    return {"image_id": number, "patient_id": REPEAT_STUDY_SUFFIX.sub("", figshare_slice.patient_id),
            "release_pid": figshare_slice.patient_id, "tumor_class": figshare_slice.tumor_class, "height": image.shape[0], "width": image.shape[1]}


def convert_figshare(sources: list[Path], out: Path, size: int | None) -> int:
    """Convert every N.mat in `sources` (plus folds from cvind.mat) into `out`; return the slice count."""
    with ExitStack() as stack:
        found = find_mat_files(sources, stack)
        slices = {int(match[1]): mat for name, mat in found.items() if (match := SLICE_FILE.fullmatch(name))}
        if not slices:
            raise PrepareError(f"{', '.join(map(str, sources))}: no slice files (N.mat) found")
        folds = None
        if FOLDS_FILE in found:
            folds = read_folds(found[FOLDS_FILE])
        else:
            print(f"note: no {FOLDS_FILE} found; the fold column is left empty", file=sys.stderr)
        if folds is not None and max(slices) > len(folds):
            raise PrepareError(f"{found[FOLDS_FILE].origin}: lists {len(folds)} folds, "
                               f"but slice {max(slices)}.mat exists")
        with staging_folder(out) as staging:
            rows = []
            for number in tqdm(sorted(slices), desc="converting", unit="slice"):
                row = convert_slice(number, slices[number], staging, size)
                row["fold"] = folds[number - 1] if folds else ""
                rows.append(row)
            write_metadata(staging / "metadata.csv", METADATA_COLUMNS, rows)
    return len(rows)


def prepare_figshare(out: Path, source: Path | None, size: int | None, cache_dir: Path | None,
                     api_url: str) -> int:
    """The `figshare` command: download the release (unless `source` is given) and convert it into `out`."""
    refuse_existing_output(out)  # before a long download, not after it
    if source is None:
        sources = fetch_figshare(api_url, cache_dir or out.parent / ".downloads")
    else:
        sources = [source]
    return convert_figshare(sources, out, size)


# ----------------------------------------------------------------------------- nifti
#
# Any folder of image/label volume pairs (BraTS, the Medical Segmentation Decathlon, your own) cut into the
# 2-D slices the pipeline trains on. Every volume is checked (pairing, header, shape, geometry) before anything
# is written; a bad one stops the whole conversion, as a bad slice stops `figshare`'s.

NIFTI_METADATA_COLUMNS = ["image_id", "patient_id", "source_volume", "source_mask", "slice_axis", "slice_index",
                          "has_tumour", "tumour_pixels", "pixel_spacing_mm", "pixel_spacing_rows_mm",
                          "pixel_spacing_cols_mm", "height", "width"]
# A pattern's NIfTI ending, dropped before its fixed end is taken: `*_seg.nii*` ends in `_seg`, like `*_seg.nii.gz`.
PATTERN_NIFTI_END = re.compile(r"\.nii(\.gz)?\*?$", re.IGNORECASE)
WILDCARD_ENDS = "*?]"  # the last of these in a pattern closes its last wildcard
# Largest difference between a label's and its image's affine entries (mm, or direction cosine x mm) that
# still counts as the same voxel grid; float32 header storage alone differs by far less.
AFFINE_TOLERANCE = 1e-3
MAX_LISTED_PROBLEMS = 50  # input problems named in the error; the rest are counted


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


def find_volumes(root: Path, pattern: str, option: str, problems: list[str]) -> dict[str, Path]:
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
    images = find_volumes(images_root, options.image_pattern, "--image-pattern", problems)
    masks = find_volumes(masks_root, options.mask_pattern, "--mask-pattern", problems)
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
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape, affine = tuple(image.shape), np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises many kinds for a damaged or foreign file
        problems.append(f"{path}: cannot read as NIfTI ({error})")
        return None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        problems.append(f"{path}: a 3-D volume is needed, this one has shape {shape}")
        return None
    if min(shape) < 1:
        problems.append(f"{path}: the volume is empty (shape {shape})")
        return None
    return shape, affine


def check_pair(pair: VolumePair, options: NiftiOptions, problems: list[str]) -> None:
    """Header checks of one pair: both readable 3-D volumes of one shape on one voxel grid."""
    image, mask = volume_header(pair.image, problems), volume_header(pair.mask, problems)
    if image is None or mask is None:
        return
    if mask[0] != image[0]:
        problems.append(f"{pair.mask}: label volume has shape {mask[0]}, its image volume {pair.image} "
                        f"has {image[0]}")
    elif not options.ignore_affine and not np.allclose(mask[1], image[1], rtol=0, atol=AFFINE_TOLERANCE):
        difference = float(np.abs(mask[1] - image[1]).max())
        problems.append(f"{pair.mask}: label volume's affine differs from that of its image volume {pair.image} "
                        f"(by up to {difference:.4g}), so their voxels may not line up; check the files, or give "
                        "--ignore-affine if the voxels do match by index (a label saved without geometry)")


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


def format_mm(value: float) -> str:
    """A spacing in mm for metadata.csv: 6 significant digits."""
    return f"{value:.6g}"


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
                     "pixel_spacing_mm": format_mm((scaled_rows_mm + scaled_cols_mm) / 2),
                     "pixel_spacing_rows_mm": format_mm(scaled_rows_mm),
                     "pixel_spacing_cols_mm": format_mm(scaled_cols_mm),
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


# ----------------------------------------------------------------------------- shared


def refuse_existing_output(out: Path) -> None:
    """Raise PrepareError if `out` exists: outputs are never overwritten."""
    if out.exists():
        raise PrepareError(f"{out}: output folder already exists; remove it or choose another --out")


def write_metadata(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Write `rows` as CSV with a header of `columns`."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """Yield `<out>.partial` with empty images/ and masks/ to write into; rename it to `out` on success.

    On any exception, Ctrl-C included, the folder is removed and a note on the
    exception says so. `out` itself is never written to or removed.
    """
    out = Path(out)
    refuse_existing_output(out)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # left by a run that could not clean up (killed, power cut)
        shutil.rmtree(partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir()  # fails if another run took the name meanwhile, so what we remove below is ours
    try:
        (partial / "images").mkdir()
        (partial / "masks").mkdir()
        yield partial
        refuse_existing_output(out)  # created meanwhile: renaming onto an empty folder would replace it
        partial.rename(out)
    except BaseException as error:
        try:
            shutil.rmtree(partial)
            error.add_note(f"the unfinished {partial} was removed")
        except OSError as cleanup_error:
            error.add_note(f"the unfinished {partial} could not be removed ({cleanup_error}); delete it by hand")
        raise


# ----------------------------------------------------------------------------- CLI


def int_at_least(minimum: int, reason: str = "") -> Callable[[str], int]:
    """An argparse `type` accepting whole numbers >= `minimum`; `reason` explains the bound in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{reason}, got {value}")
        return value

    return parse


def label_list(text: str) -> tuple[int, ...]:
    """argparse type for --tumour-labels: comma-separated whole numbers above 0 (0 is background)."""
    try:
        labels = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected label values like 1,2,4, got {text!r}") from None
    if labels[0] < 1:
        raise argparse.ArgumentTypeError(f"labels must be above 0 (0 is background), got {text!r}")
    return labels


def non_negative_number(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface: one subcommand per data source; bad values exit 2 before anything is written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="write a synthetic MRI-like demo set (no download)")
    demo.add_argument("--out", type=Path, default=Path("data/demo"),
                      help="output folder (must not exist) (default: %(default)s)")
    demo.add_argument("--count", type=int_at_least(1), default=240, help="number of slices (default: %(default)s)")
    demo.add_argument("--size", type=int_at_least(DEMO_MIN_SIZE, " (smaller slices can have empty tumour masks)"),
                      default=128, help="slice height and width in pixels (default: %(default)s)")
    demo.add_argument("--seed", type=int_at_least(0), default=0,
                      help="random seed (same seed, same data) (default: %(default)s)")
    demo.add_argument("--slices-per-patient", type=int_at_least(1), default=6,
                      help="consecutive slices sharing one patient_id, for grouped splits (default: %(default)s)")

    figshare = commands.add_parser(
        "figshare", help="download and convert the figshare brain tumour set of Cheng et al. (3064 slices)",
        description=f"Download figshare article {FIGSHARE_ARTICLE_ID} (or take --from) and convert it to "
                    "images/, masks/ and metadata.csv with patient IDs, tumour classes and folds.")
    figshare.add_argument("--out", type=Path, default=Path("data/figshare-brain-tumor"),
                          help="output folder (must not exist) (default: %(default)s)")
    figshare.add_argument("--from", dest="source", type=Path, metavar="PATH",
                          help="convert what you already have, without network: a folder, a .zip "
                               "(also figshare's 'Download all' zip) or a .mat (default: download)")
    figshare.add_argument("--size", type=int_at_least(1), help="resample every slice to SIZE x SIZE pixels "
                                                             "(area for images, nearest for masks) (default: keep)")
    figshare.add_argument("--cache-dir", type=Path,
                          help="where downloads are kept and resumed (default: .downloads beside --out)")
    figshare.add_argument("--api-url", default=FIGSHARE_API_URL,
                          help="figshare API base URL (default: %(default)s)")

    nifti = commands.add_parser(
        "nifti", help="cut folders of image/label volumes (.nii/.nii.gz, e.g. BraTS) into 2-D slices",
        description="Pair image volumes with label volumes by case name and write one PNG pair per slice "
                    "with tumour (plus --empty-share tumour-free ones) and metadata.csv. The case name is the "
                    "file name without .nii/.nii.gz and without its pattern's fixed end (the text after the "
                    "pattern's last wildcard, less any .nii/.nii.gz): BraTS2021_00001_flair.nii.gz with "
                    "--image-pattern '*_flair.nii.gz' and BraTS2021_00001_seg.nii.gz with --mask-pattern "
                    "'*_seg.nii.gz' are "
                    "case BraTS2021_00001. Every volume is checked before anything is written.")
    nifti.add_argument("--images", type=Path, required=True, metavar="DIR",
                       help="folder of image volumes, searched at any depth")
    nifti.add_argument("--masks", type=Path, required=True, metavar="DIR",
                       help="folder of label volumes, searched at any depth (may be --images itself, with "
                            "patterns that tell the two apart)")
    nifti.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    nifti.add_argument("--image-pattern", default="*.nii*", metavar="GLOB",
                       help="image file names to take, e.g. '*_flair.nii.gz' for BraTS; a pattern with '/' is a "
                            "path glob under --images ('**/' for any depth) (default: %(default)s)")
    nifti.add_argument("--mask-pattern", default="*.nii*", metavar="GLOB",
                       help="label file names to take, e.g. '*_seg.nii.gz' for BraTS (default: %(default)s)")
    nifti.add_argument("--tumour-labels", type=label_list, metavar="L,L,...",
                       help="label values that count as tumour, e.g. 4 for BraTS enhancing tumour, 1,2,4 for "
                            "the whole tumour (default: every label above 0)")
    nifti.add_argument("--axis", choices=("auto", "0", "1", "2"), default="auto",
                       help="voxel axis to slice across; auto: the axis with the fewest voxels of each image "
                            "volume (default: %(default)s)")
    nifti.add_argument("--size", type=int_at_least(1), help="resample every slice to SIZE x SIZE pixels "
                                                          "(area for images, nearest for masks) (default: keep)")
    nifti.add_argument("--empty-share", type=non_negative_number, default=0.0, metavar="X",
                       help="also write tumour-free slices, X times as many as tumour slices (0.1: 10 %%), drawn "
                            "at random from each case's non-blank tumour-free slices (default: %(default)s)")
    nifti.add_argument("--seed", type=int_at_least(0), default=0,
                       help="random seed of the tumour-free slice draw (default: %(default)s)")
    nifti.add_argument("--ignore-affine", action="store_true",
                       help="pair voxels by index even where a label volume's affine differs from its image's "
                            "(default: refuse such a pair)")

    # Further data sources register their subparsers here.
    return parser


def main(argv: list[str] | None = None) -> int:
    """prepare_data.py's command line; the exit code."""
    args = build_parser().parse_args(argv)
    with sigterm_as_interrupt():  # SIGTERM removes the .partial folder like Ctrl-C
        return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; the exit code (1 on an error, 130 on Ctrl-C, 143 on SIGTERM)."""
    try:
        if args.command == "demo":
            out = make_demo_dataset(args.out, count=args.count, size=args.size, seed=args.seed,
                                    slices_per_patient=args.slices_per_patient)
            print(f"wrote {args.count} demo slices to {out}")
        elif args.command == "figshare":
            count = prepare_figshare(args.out, args.source, args.size, args.cache_dir, args.api_url)
            print(f"wrote {count} slices to {args.out}")
        elif args.command == "nifti":
            options = NiftiOptions(args.image_pattern, args.mask_pattern, args.tumour_labels,
                                   None if args.axis == "auto" else int(args.axis), args.size, args.empty_share,
                                   args.seed, args.ignore_affine)
            summary = convert_nifti(args.images, args.masks, args.out, options)
            print_nifti_summary(summary, args.out, options)
    except (PrepareError, OSError) as error:  # OSError: a full disk or a folder we may not write to
        print(f"error: {error}", *getattr(error, "__notes__", ()), sep="\n", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (utils.Terminated)
        cause, code = interruption(interrupt)
        print(f"interrupted ({cause})", *getattr(interrupt, "__notes__", ()), sep="\n", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
