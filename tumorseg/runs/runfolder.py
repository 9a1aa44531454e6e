"""A train.py run folder: its states (new, unfinished, finished, resumed, extended) and the reading of its files.

train.py opens, resumes and gives up run folders through here; test.py,
crossval.py and train.py's --resume read them only through here, so each
file's format is parsed in one place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

try:
    import fcntl  # POSIX file locks; absent on Windows, where run folders are not locked
except ImportError:
    fcntl = None

from config import Config
import dataset
from tumorseg.data import reading, splits
from tumorseg.files import new_output_dir, remove_stale_staging
from tumorseg.runs.checkpoints import CheckpointError, load_checkpoint
from tumorseg.training.timing import stop_reason
from utils import from_main_process, is_main_process, pick_device, rank_and_world, resolve_amp

SPLIT_FILE = "split.json"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"  # written last: a run folder without it has not finished
# split.json's lists: what each set of images does in a run.
SPLIT_ROLES = {"train": "fits the weights", "val": "chooses the epoch and the decision rule (inner validation)",
               "test": "held out: chooses nothing; test.py --subset test scores it"}


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
    chosen = [p for p in images if reading.stem_key(p) in wanted]
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


@dataclass
class RunProgress:
    """What a run has finished so far: told to the user when it stops early."""

    run_dir: Path
    resumed: bool = False  # a resumed run's folder is never removed
    epochs_done: int = 0
    best_dice: float = -1.0
    best_epoch: int = 0


def resume_settings(run_dir: Path, flags: dict) -> tuple[Config, dict, IO[str] | None]:
    """--resume: the run's config, its last.pt contents, and the run folder's lock (main process).

    `flags` are the config keys given explicitly on the command line (see resume_point).
    """
    lock = None
    if is_main_process() and (run_dir / "last.pt").is_file():  # taken before last.pt is read
        lock = lock_run_folder(run_dir)
    try:
        config, resumed = resume_point(run_dir, flags)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return config, resumed, lock


def resume_point(run_dir: Path, flags: dict) -> tuple[Config, dict]:
    """The config saved in `run_dir` (EPOCHS from `flags` if given) and its last.pt contents.

    Raises ValueError when a flag contradicts the saved config, when --epochs
    would change a cosine schedule, or when last.pt cannot be resumed.
    """
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: not a run folder of train.py (no config.json)")
    saved, _ = Config.from_saved(read_saved_config(run_dir))
    contradicting = [f"--{name.lower().replace('_', '-')} {value} (the run has {getattr(saved, name)})"
                     for name, value in flags.items() if name != "EPOCHS" and not flag_matches(name, value, saved)]
    if contradicting:
        raise ValueError(f"--resume takes every setting from {config_path}; these flags contradict it: "
                         f"{', '.join(contradicting)}. Only --epochs may change; start a new run to change others")
    state = load_checkpoint(run_dir / "last.pt").state
    if "rng" not in state:
        raise ValueError(f"{run_dir / 'last.pt'}: written by a train.py without resume support "
                         "(no optimiser schedule or random states saved); start a new run")
    epochs = flags.get("EPOCHS", saved.EPOCHS)
    if epochs != saved.EPOCHS and saved.LR_SCHEDULE == "cosine":
        # T_max is EPOCHS x steps: another EPOCHS would bend the rest of a curve already half followed.
        raise ValueError(f"--epochs {epochs}: {run_dir} uses the cosine schedule, which decays to 0 over its "
                         f"{saved.EPOCHS} epochs; it cannot be extended or shortened. Start a new run instead")
    if epochs < state["epoch"]:
        raise ValueError(f"--epochs {epochs}: {run_dir} has already run {state['epoch']} epochs")
    return dataclasses.replace(saved, EPOCHS=epochs), state


def flag_matches(name: str, value: object, saved: Config) -> bool:
    """Whether flag `name` asks for what the run's `saved` config holds; "auto" values as they resolve now."""
    # config.json records what auto resolved to: AMP e.g. bf16 on this device, the split column e.g. patient_id
    if name == "AMP" and value == "auto":
        value = resolve_amp(pick_device(saved.DEVICE), value)
    if name == "SPLIT_GROUP_COLUMN" and value == "auto":
        value = splits.resolve_split_column(Path(saved.DATA_ROOT), value)[0] or "none"
    return value == getattr(saved, name)


def check_same_split(run_dir: Path, data: dataset.LoadedDataset, split: splits.Split) -> None:
    """Raise ValueError unless the data gives the split `run_dir` was trained on (its split.json)."""
    saved = read_split(run_dir)
    if any(saved.get(role, []) != [data.pairs[i].stem for i in getattr(split, role)] for role in SPLIT_ROLES):
        raise ValueError(f"the data at {saved['data_root']} no longer gives the split of "
                         f"{run_dir / 'split.json'} (files added, removed or renamed); start a new run")


def finished_already(run_dir: Path, config: Config, resumed: dict) -> bool:
    """Whether a resumed run has nothing left to do (said so on the console)."""
    if not ((run_dir / SUMMARY_FILE).is_file()
            and stop_reason(config, resumed["epoch"], resumed["best_epoch"], resumed["minutes"])):
        return False
    summary = read_summary(run_dir)
    if is_main_process():
        print(f"{run_dir} has finished ({summary['epochs_run']} epochs, {summary['stop_reason']}): "
              "nothing to do" + ("; give a larger --epochs to train it longer"
                                 if config.LR_SCHEDULE == "constant" and not config.PATIENCE else ""))
    return True


def open_run_folder(config: Config, resume_dir: Path | None) -> tuple[Path | str, IO[str] | None]:
    """The run folder (a new one, locked, or the resumed one) on every process, and its lock; a str says why not."""
    run_dir: Path | str | None = None
    lock = None
    if is_main_process():
        folders = [resume_dir] if resume_dir is not None else Path(config.RUNS_DIR).glob("*/")
        for folder in folders:
            for stale in remove_stale_staging(folder):
                print(f"removed {stale}, a temporary file left by an interrupted run")
        if resume_dir is not None:
            run_dir = resume_dir
        else:
            try:
                run_dir = new_output_dir(Path(config.RUNS_DIR), config.RUN_NAME)
                lock = lock_run_folder(run_dir)  # a --resume of this run while it trains is refused
            except OSError as error:
                run_dir = run_folder_refusal(Path(config.RUNS_DIR) / config.RUN_NAME, error)
    return from_main_process(run_dir), lock  # the other processes only need to know whether it exists


def run_folder_refusal(folder: Path, error: OSError) -> str:
    """Why the run folder cannot be created; for an unfinished run already there, the command that continues it."""
    progress = run_progress(folder) if isinstance(error, FileExistsError) and is_unfinished_run(folder) else None
    if progress is None:
        return f"cannot create the run folder: {error}"
    done, epochs = progress
    _, world = rank_and_world()
    launcher = f"torchrun --nproc_per_node={world} train.py" if world > 1 else "python train.py"  # as launched
    return (f"cannot create the run folder: {folder} already exists and holds an unfinished train.py run "
            f"(epoch {done} of {epochs} in last.pt, no summary.json: it was stopped or killed, or is still "
            f"training). Continue it with\n    {launcher} --resume {shlex.quote(str(folder))}\n"
            "or choose another --run-name (or remove the folder) to start afresh")


def stop_early(progress: RunProgress, reason: str, code: int) -> int:
    """Say why the run stopped and what it kept; remove its folder if no epoch finished (main process only)."""
    if not is_main_process():
        return code
    if progress.epochs_done == 0 and not progress.resumed:
        shutil.rmtree(progress.run_dir, ignore_errors=True)  # created by this run, holds no result
        print(f"\nerror: {reason}\nno epoch had finished: removed the run folder {progress.run_dir}",
              file=sys.stderr)
        return code
    print(f"\nerror: {reason}\nkept {progress.run_dir}: best.pt (epoch {progress.best_epoch}, validation Dice "
          f"{progress.best_dice:.4f}) and last.pt (epoch {progress.epochs_done})", file=sys.stderr)
    return code


def reopen_extension(run_dir: Path) -> None:
    """A resumed finished run (an extension) is unfinished again: its summary.json goes until its new last epoch."""
    if (run_dir / SUMMARY_FILE).is_file():
        (run_dir / SUMMARY_FILE).unlink()
        print(f"{run_dir / SUMMARY_FILE} removed until the extension finishes (a killed extension "
              "is an unfinished run); the decision rule is searched again at its end")


# ---- The lock: one train.py process per run folder at a time ----------------------------------------

RUN_LOCK_NAME = ".train.lock"


class RunFolderBusy(Exception):
    """Another live process is training in this run folder."""


def lock_run_folder(folder: Path) -> IO[str] | None:
    """Hold an exclusive lock on run folder `folder` while the returned file stays open; raise RunFolderBusy if taken.

    Two train.py processes in one folder (two `--resume`s, or a resume of a
    run still training) would interleave checkpoints and history rows, so the
    second is refused, with the holder named. The operating system drops the
    lock when its holder ends, even by kill -9, so a crashed run never blocks
    its own resume. Without fcntl (Windows) nothing is locked: None.
    """
    if fcntl is None:
        return None
    handle = open(Path(folder) / RUN_LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderBusy(f"{folder} is in use by {holder} (a run still training there, or another --resume); "
                            "wait for it to end or stop it, then resume") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
