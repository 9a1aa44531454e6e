"""One fold's work: train it (train.py), score its held-out patients (test.py), or search its decision rule again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from config import Config
from tumorseg.crossval.heldout import CLASS_COLUMN
from tumorseg.crossval.plan import REPO_ROOT, SPLITS_FILE
from tumorseg.data import reading
from tumorseg.files import save_json
from tumorseg.inference.postprocess import choose_decision_rule
from tumorseg.runs.runfolder import read_saved_config, read_split, read_summary
from utils import pick_device


def train_fold(cv_dir: Path, fold: int, data_root: Path, train_flags: list[str]) -> int:
    """Train fold `fold` from splits.json unless it has finished; resume it if it was interrupted. The exit code."""
    run_dir = cv_dir / f"fold{fold}"
    if (run_dir / "summary.json").is_file():
        print(f"fold {fold}: trained already ({run_dir})")
        return 0
    if (run_dir / "last.pt").is_file():
        command = [sys.executable, str(REPO_ROOT / "train.py"), "--resume", str(run_dir)]
    else:
        command = [sys.executable, str(REPO_ROOT / "train.py"), "--data-root", str(data_root),
                   "--split-file", str(cv_dir / SPLITS_FILE), "--fold", str(fold), "--runs-dir", str(cv_dir),
                   "--run-name", f"fold{fold}", *train_flags]
    print(f"fold {fold}: " + " ".join(command[1:]), flush=True)
    return subprocess.run(command).returncode


def score_fold(cv_dir: Path, fold: int, data_root: Path, pixel_spacing_mm: float | None, columns: list[str]) -> int:
    """Score fold `fold`'s held-out patients with test.py --subset test into cv_dir/heldout/fold<k>. The exit code.

    `columns` are metadata.csv's: the tumour class is scored as a stratum where it is one of them.
    """
    if (cv_dir / "heldout" / f"fold{fold}" / "metrics.csv").is_file():
        return 0
    command = [sys.executable, str(REPO_ROOT / "test.py"), "--checkpoint", str(cv_dir / f"fold{fold}" / "best.pt"),
               "--data-root", str(data_root), "--subset", "test", "--prediction-root", str(cv_dir / "heldout"),
               "--report", "false", "--overwrite"]
    if pixel_spacing_mm:
        command += ["--pixel-spacing-mm", str(pixel_spacing_mm)]
    if CLASS_COLUMN in columns:
        command += ["--strata", CLASS_COLUMN]
    print(f"fold {fold}: scoring its held-out patients", flush=True)
    return subprocess.run(command, stdout=subprocess.DEVNULL).returncode


def rerule_fold(source: Path, target: Path, fold: int, changes: dict, data_root: Path) -> None:
    """Copy fold `fold` of `source` into `target` with `changes` to its config, and search its rule again.

    The copy is staged as .fold<k>.partial and renamed into place with its summary.json, so a killed
    rerule leaves no fold that looks finished.
    """
    staging = target / f".fold{fold}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # this command's own leftover from a killed run
    shutil.copytree(source / f"fold{fold}", staging, ignore=shutil.ignore_patterns("summary.json", "events.*"))
    saved = read_saved_config(staging)
    config, _ = Config.from_saved({**saved, **changes})
    save_json(staging / "config.json", {**saved, **changes})
    pairs = {pair.stem: pair for pair in reading.listed_pairs(data_root)}
    val_pairs = [pairs[stem] for stem in read_split(staging)["val"]]
    rule = choose_decision_rule(staging / "best.pt", val_pairs, config, pick_device("cpu"))
    save_json(staging / "summary.json", {**read_summary(source / f"fold{fold}"), "decision_rule": rule,
                                         "rule_searched_again_from": str((source / f"fold{fold}").resolve())})
    staging.rename(target / f"fold{fold}")
