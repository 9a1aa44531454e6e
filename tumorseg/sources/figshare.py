"""The figshare brain tumour set of Cheng et al.: downloaded with resume and MD5 checks, its MATLAB slices to PNGs."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from urllib.request import Request, urlopen

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from tumorseg.sources.output import PrepareError, refuse_existing_output, staging_folder, write_metadata

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
