"""Reading a train.py run folder: its split.json, config.json, summary.json and whether the run finished.

test.py, crossval.py and train.py's --resume read run folders only through
here, so each file's format is parsed in one place.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch

import dataset
from tumorseg.runs.checkpoints import CheckpointError

SPLIT_FILE = "split.json"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"  # written last: a run folder without it has not finished


def run_folder(checkpoint_path: Path) -> Path:
    """The run folder holding a checkpoint (resolved, so a bare 'best.pt' names the folder it lies in)."""
    return Path(checkpoint_path).resolve().parent


def read_split(folder: Path) -> dict:
    """The run's split.json as written by train.py; raises OSError or ValueError when unreadable."""
    return json.loads((Path(folder) / SPLIT_FILE).read_text())


def read_saved_config(folder: Path) -> dict:
    """The run's config.json as a dict; raises OSError or ValueError when unreadable."""
    return json.loads((Path(folder) / CONFIG_FILE).read_text())


def read_summary(folder: Path) -> dict:
    """The finished run's summary.json as a dict; raises OSError or ValueError when unreadable."""
    return json.loads((Path(folder) / SUMMARY_FILE).read_text())


def is_unfinished_run(folder: Path) -> bool:
    """Whether `folder` is a train.py run folder (config.json) without the summary.json a finished run writes last."""
    return (Path(folder) / CONFIG_FILE).is_file() and not (Path(folder) / SUMMARY_FILE).exists()


def run_progress(folder: Path) -> tuple[int, int] | None:
    """(epochs done, EPOCHS) from the run's last.pt; None when it has none that loads (nothing to resume)."""
    try:
        # mmap: only the two numbers are read, not a checkpoint's hundreds of MB of weights.
        state = torch.load(Path(folder) / "last.pt", map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]), int(state["config"]["EPOCHS"])
    except Exception:  # missing, truncated or foreign: any of them means no resumable progress
        return None


def newest_checkpoint(runs_dir: Path) -> Path:
    """best.pt of the most recently written run under runs_dir."""
    candidates = sorted(Path(runs_dir).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"{runs_dir}: no run with a best.pt; train first or pass --checkpoint")
    return candidates[-1]


def unfinished_run_warning(checkpoint_path: Path) -> str | None:
    """A warning when the checkpoint's run folder holds a train.py run that has not finished; None otherwise."""
    folder = Path(checkpoint_path).parent
    if not is_unfinished_run(folder):
        return None
    progress = run_progress(folder)
    if progress is None:  # best.pt but no loadable last.pt: killed between the two writes of its first epoch
        return (f"{folder} is an unfinished run (no summary.json, no loadable last.pt): {checkpoint_path.name} is "
                "its best epoch so far; pass --checkpoint to use another")
    return (f"{folder} is an unfinished run (epoch {progress[0]} of {progress[1]}, no summary.json): "
            f"{checkpoint_path.name} is its best epoch so far; continue it with "
            f"`python train.py --resume {shlex.quote(str(folder))}`, or pass --checkpoint to use another")


def subset_stems(checkpoint_path: Path, subset: str) -> set[str]:
    """The stems the checkpoint's split.json lists under `subset` ("train", "val" or "test"); errors name the file."""
    split_path = run_folder(checkpoint_path) / SPLIT_FILE
    try:
        split = read_split(split_path.parent)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{split_path}: cannot read the run's split ({error})") from error
    if subset == "test" and "test" not in split:
        raise ValueError(f"{split_path}: this run has no held-out patients (it was trained before train.py kept "
                         "them apart, so its validation patients also chose its epoch and rule); retrain it, "
                         "or use --subset val knowing that its scores are optimistic")
    if not split.get(subset):
        raise ValueError(f"{split_path}: the run holds no '{subset}' images (TEST_FRACTION 0 holds none out)")
    return set(split[subset])


def subset_images(images: list[Path], checkpoint_path: Path, subset: str) -> list[Path]:
    """The images whose stems the checkpoint's split.json lists under `subset`."""
    wanted = subset_stems(checkpoint_path, subset)
    chosen = [p for p in images if dataset.stem_key(p) in wanted]
    if not chosen:
        raise ValueError(f"{run_folder(checkpoint_path) / SPLIT_FILE}: none of its {len(wanted)} '{subset}' images "
                         "is in this folder")
    return chosen


def split_group_column(checkpoint_path: Path) -> str:
    """The metadata column the checkpoint's run split its patients by ("" for a random split or no split.json)."""
    try:
        return read_split(run_folder(checkpoint_path)).get("group_column") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def count_training_images(stems: list[str], checkpoint_paths: list[Path],
                          data_root: Path) -> tuple[int | None, str]:
    """How many of `stems` any of the checkpoints' runs trained on, and a note; None when that cannot be told.

    Uses each run's split.json; the count is given only when DATA_ROOT is the
    folder the runs were trained on (else the same names may be other images).
    """
    trained_on: set[str] = set()
    for checkpoint_path in checkpoint_paths:
        folder = run_folder(checkpoint_path)
        try:
            split = read_split(folder)
            trained_on |= set(split["train"])
        except (OSError, ValueError, KeyError):
            return None, f"no readable {folder / SPLIT_FILE}: cannot tell which images were seen in training"
        trained_root = split.get("data_root")
        if trained_root is not None and Path(trained_root) != Path(data_root).resolve():
            return None, (f"DATA_ROOT {data_root} is not the folder {checkpoint_path} was trained on "
                          f"({trained_root}); which of these images it saw in training is unknown")
    return sum(stem in trained_on for stem in stems), ""
