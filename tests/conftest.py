"""Shared fixtures and helpers: a tiny synthetic dataset, the shared real MRI data, test volumes and readers."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import shutil
import sys
from collections.abc import Callable
from types import ModuleType
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# A suite started in the background (`... &` in a script, nohup) inherits SIGINT ignored, and so would every
# command it starts; the Ctrl-C tests need Python's own handler, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, str(ROOT))

from tumorseg.data.reading import read_image, read_mask  # noqa: E402
from tumorseg.sources.demo import make_demo_dataset  # noqa: E402

NFC, NFD = "caf\u00e9", "cafe\u0301"  # one name, two Unicode spellings (macOS writes NFD)
REAL_DATA = Path(os.environ.get("REAL_DATA_ROOT", ROOT.parent / "shared" / "data" / "figshare-brain-tumor"))


def load_script(path: Path) -> ModuleType:
    """Import a script by path (test.py would otherwise clash with the standard library's `test`)."""
    name = f"script_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """24 synthetic 64 px slices, 4 per patient, with metadata.csv (read-only: copy before changing)."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", count=24, size=64, seed=1,
                             slices_per_patient=4)


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The shared Figshare development set; skips where absent, fails in CI (REQUIRE_REAL_DATA=1)."""
    if not (REAL_DATA / "images").is_dir():
        if os.environ.get("REQUIRE_REAL_DATA"):
            pytest.fail(f"real data required but not found at {REAL_DATA}")
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture
def demo_copy(demo_root, tmp_path):
    """A writable copy of the synthetic set, to break in one way per test."""
    return shutil.copytree(demo_root, tmp_path / "data")


@pytest.fixture(scope="module")
def real_slices(real_root) -> list[tuple[np.ndarray, np.ndarray]]:
    """One native 256 px slice from each of 56 patients: (image uint8 (H, W, 1), mask {0, 1} (H, W))."""
    return [(read_image(real_root / "images" / f"{stem}.png", 1), read_mask(real_root / "masks" / f"{stem}.png"))
            for stem in spread_stems(real_root, 3, 1)]


@pytest.fixture(scope="session")
def real_subset(real_root, tmp_path_factory) -> Path:
    """About 200 real slices from ~70 patient groups (symlinks), with their metadata rows."""
    return link_subset(real_root, tmp_path_factory.mktemp("real") / "subset", spread_stems(real_root, 2, 3))


def link_subset(source: Path, dest: Path, stems: list[str]) -> Path:
    """A dataset at `dest` made of symlinks to `stems` of `source`, with their metadata rows."""
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for stem in stems:
        for sub in ("images", "masks"):
            (dest / sub / f"{stem}.png").symlink_to(source / sub / f"{stem}.png")
    with open(source / "metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if row["image_id"] in set(stems)]
        columns = reader.fieldnames
    with open(dest / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return dest


def spread_stems(source: Path, every_nth_group: int, per_group: int) -> list[str]:
    """A few slices from every n-th patient group: many patients in a small subset."""
    with open(source / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_group: dict[str, list[str]] = {}
    for row in rows:
        by_group.setdefault(row["patient_id"], []).append(row["image_id"])
    stems = []
    for group in sorted(by_group)[::every_nth_group]:
        ids = by_group[group]
        stems += ids[:: max(1, len(ids) // per_group)][:per_group]
    return stems


def metadata_rows(root: Path) -> list[dict[str, str]]:
    """Rows of root/metadata.csv."""
    with open(root / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def png_pixels(path: Path) -> np.ndarray:
    """Pixels of a PNG."""
    with Image.open(path) as image:
        return np.asarray(image)


def interrupt_on_call(number: int, function: Callable) -> Callable:
    """`function`, except that its `number`-th call raises KeyboardInterrupt, as Ctrl-C would."""
    calls = []

    def wrapped(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapped


def oblique_affine(spacing: tuple[float, float, float] = (0.9, 0.9, 5.0)) -> np.ndarray:
    """A non-trivial voxel-to-world map: voxels of `spacing` mm, rotated 20 degrees, shifted."""
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [-80.5, 12.25, -30.0]
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """`data` saved as NIfTI at `path` (folders created) with the oblique affine unless another is given."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, oblique_affine() if affine is None else affine), str(path))
    return path


def write_dicom_series(folder: Path, data: np.ndarray, spacing=(0.8, 0.7), gap=4.0, series_uid="1.2.3.4.5",
                       origin=(-100.0, -90.0, 20.0)) -> None:
    """Write (columns, rows, slices) `data` as one axial DICOM file per slice, in shuffled file-name order."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(2).permutation(data.shape[2])
    for file_index, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series_uid, "MR"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + gap * float(k)]
        ds.PixelSpacing = [spacing[0], spacing[1]]  # between rows, between columns
        ds.SliceThickness = gap
        pixels = data[:, :, k].T.astype(np.uint16)  # DICOM stores (rows, columns)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = pixels.tobytes()
        pydicom.dcmwrite(folder / f"img{file_index:03d}.dcm", ds, enforce_file_format=True)


@pytest.fixture(scope="session")
def real_predictions(real_root, tmp_path_factory) -> Path:
    """test.py's output folder for ~60 real slices of ~20 patients, with TTA, a pixel spacing and strata."""
    import train  # only this fixture trains
    test_script = load_script(ROOT / "test.py")
    tmp = tmp_path_factory.mktemp("report")
    data = link_subset(real_root, tmp / "data", spread_stems(real_root, 8, 3))
    # a high learning rate, so that 12 short epochs give masks of every kind: HD95 needs some predicted
    assert train.main(["--data-root", str(data), "--runs-dir", str(tmp / "runs"), "--run-name", "r",
                       "--epochs", "12", "--learning-rate", "0.01", "--batch-size", "8", "--image-size", "32",
                       "--base-channels", "4", "--depth", "2", "--in-channels", "1", "--normalization", "zscore",
                       "--split-group-column", "patient_id", "--search-rule", "false"]) == 0
    assert test_script.main(["--checkpoint", str(tmp / "runs/r/best.pt"), "--data-root", str(data),
                             "--prediction-root", str(tmp / "preds"), "--tta", "true",
                             "--pixel-spacing-mm", "0.98", "--strata", "tumor_class"]) == 0
    return tmp / "preds" / "r"


def square(top: int, left: int, side: int, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A bool mask of `shape` holding one filled square."""
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask
