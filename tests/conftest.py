"""Shared fixtures: a tiny synthetic dataset and the shared real MRI data."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from types import ModuleType
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prepare_data import make_demo_dataset  # noqa: E402

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
