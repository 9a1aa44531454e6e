"""A cross-validation's plan: plan.json and splits.json, written once, and every check against them.

plan.json holds the train.py settings after the recipe is applied, the fold
count or column, the data root and a fingerprint of its files, the pixel
spacing and the code's git commit; splits.json holds every fold's train,
inner-validation and held-out images. A later `run` continues only under the
same plan, and two cross-validations pair only where their plans split alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from config import TRAINING_KEYS, Config, build_parser, config_from_args
from tumorseg.data import checks, splits
from tumorseg.files import json_ready, write_atomic
from tumorseg.runs.runfolder import read_saved_config
from utils import pick_device, resolve_amp

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: the plan records its commit, folds run its train.py
PLAN_FILE = "plan.json"
SPLITS_FILE = "splits.json"
# Config keys each fold sets for itself: left out of the plan's train_config.
PER_FOLD_KEYS = ("FOLDS", "FOLD", "FOLD_COLUMN", "SPLIT_FILE", "RUN_NAME", "RUNS_DIR", "DATA_ROOT")
# Plan keys that decide which patients each fold holds out: two cross-validations pair only where all agree.
SPLIT_KEYS = ("data.pairs", "data.sha256", "folds", "fold_column", "train_config.SPLIT_SEED",
              "train_config.VAL_FRACTION", "train_config.SPLIT_GROUP_COLUMN", "splits_sha256")
# Plan keys that record, not decide: a later run may differ in them.
RECORD_ONLY_KEYS = ("train_flags", "code.commit", "code.uncommitted_changes", "created")
# Config keys that act only after training (the decision rule's search): `rerule` may change them.
RULE_KEYS = ("RULE_MOST_PROBABLE",)


def fold_dirs(cv_dir: Path) -> list[Path]:
    """cv_dir's fold<k> run folders, in fold order."""
    return sorted((p for p in Path(cv_dir).glob("fold*") if p.is_dir() and p.name[4:].isdigit()),
                  key=lambda p: int(p.name[4:]))


def resolved_train_config(train_flags: list[str], data_root: Path) -> dict:
    """The config every fold's config.json will hold (recipe applied, "auto" values resolved), less PER_FOLD_KEYS.

    A bad train.py flag exits through argparse with its message, before anything is written.
    """
    parser = build_parser("train.py flags given to crossval.py run", keys=TRAINING_KEYS)
    parser.prog = "crossval.py run (train.py flags)"
    config = config_from_args(parser, parser.parse_args(train_flags))
    config = dataclasses.replace(
        config, DATA_ROOT=str(data_root), AMP=resolve_amp(pick_device(config.DEVICE), config.AMP),
        SPLIT_GROUP_COLUMN=splits.resolve_split_column(data_root, config.SPLIT_GROUP_COLUMN)[0] or "none")
    return {key: value for key, value in config.to_dict().items() if key not in PER_FOLD_KEYS}


def code_version() -> dict:
    """The project's git commit and whether tracked files differ from it; commit None outside a git checkout."""
    def git(*arguments: str) -> str:
        done = subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}


def make_plan(data_root: Path, fold_column: str, pixel_spacing_mm: float | None, train_flags: list[str],
              folds: int) -> tuple[dict, str]:
    """plan.json's contents and splits.json's text for a `run`; raises ValueError when the data cannot be split.

    The data is verified first (as train.py would), so a plan is never written for data that cannot train.
    `folds` is K, the fold count (of `fold_column`'s values where that is given).
    """
    root = Path(data_root)
    train_config = resolved_train_config(train_flags, root)
    group_column = "" if train_config["SPLIT_GROUP_COLUMN"] == "none" else train_config["SPLIT_GROUP_COLUMN"]
    problems = checks.verify_dataset(root, group_column)
    if problems:
        raise ValueError(str(checks.DatasetError(root, problems)))
    lists = splits.fold_split_lists(root, folds, fold_column, group_column, train_config["SPLIT_SEED"],
                                     train_config["VAL_FRACTION"])
    splits_text = json.dumps({"group_column": group_column, "folds": lists}, indent=1) + "\n"
    plan = {"data_root": str(root.resolve()), "data": splits.data_fingerprint(root), "folds": len(lists),
            "fold_column": fold_column, "pixel_spacing_mm": pixel_spacing_mm,
            "train_config": train_config, "splits_sha256": hashlib.sha256(splits_text.encode()).hexdigest(),
            "train_flags": train_flags, "code": code_version(),
            "created": datetime.datetime.now().isoformat(timespec="seconds")}
    return plan, splits_text


def flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} as {"a.b": 1}: plan keys as the messages name them."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def with_new_keys(plan: dict) -> dict:
    """`plan` with config keys added since it was written at their defaults, which reproduce the old behaviour."""
    defaults = {field.name: field.default for field in dataclasses.fields(Config) if field.name not in PER_FOLD_KEYS}
    return {**plan, "train_config": {**defaults, **plan.get("train_config", {})}} if "train_config" in plan else plan


def plan_differences(old: dict, new: dict, keys: tuple[str, ...] | None = None) -> list[str]:
    """'key: old -> new' for each plan key (of `keys`, or every deciding key) whose values differ.

    A config key one side lacks counts as its default (a key added to config.py since is no difference).
    """
    before, after = flatten(with_new_keys(old)), flatten(with_new_keys(new))
    compared = keys or sorted((set(before) | set(after)) - set(RECORD_ONLY_KEYS))
    missing = "(absent)"
    return [f"{key}: {before.get(key, missing)!r} -> {after.get(key, missing)!r}"
            for key in compared if before.get(key, missing) != after.get(key, missing)]


def read_plan(cv_dir: Path) -> dict:
    """cv_dir's plan.json; FileNotFoundError or ValueError say what the folder is instead."""
    cv_dir = Path(cv_dir)
    if not cv_dir.is_dir():
        raise FileNotFoundError(f"{cv_dir}: no such folder; `crossval.py run --name NAME --runs-dir DIR` "
                                "writes DIR/NAME")
    path = cv_dir / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing, so {cv_dir} is not a cross-validation folder of crossval.py "
                                "run (or one from before plans were written, whose folds cannot be told from "
                                "stray folders): run it again under a new --name")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from error


def settle_plan(cv_dir: Path, plan: dict, splits_text: str) -> str | None:
    """Write the plan into a new cv_dir, or check it against the saved one; None to go on, else why not."""
    new_name = "start a new cross-validation with another --name (the finished folds here stay as they are)"
    if (cv_dir / PLAN_FILE).is_file():
        saved = read_plan(cv_dir)
        differences = plan_differences(saved, plan)
        if differences:
            return (f"{cv_dir / PLAN_FILE} was made with other settings, so its folds cannot be continued with "
                    "these:\n    " + "\n    ".join(differences) + f"\nRepeat the saved settings, or {new_name}")
        on_disk = (cv_dir / SPLITS_FILE).read_bytes() if (cv_dir / SPLITS_FILE).is_file() else b""
        if hashlib.sha256(on_disk).hexdigest() != saved.get("splits_sha256"):
            return (f"{cv_dir / SPLITS_FILE} is missing or was changed since {PLAN_FILE} was written, so the "
                    f"folds' patients are no longer known: {new_name}")
        if saved.get("code", {}).get("commit") != plan["code"]["commit"]:
            print(f"note: the plan was written at commit {saved['code'].get('commit')}, this is "
                  f"{plan['code']['commit']}: folds trained from here on run other code", file=sys.stderr)
        return None
    existing = {p.name for p in cv_dir.iterdir()} if cv_dir.is_dir() else set()
    # Only a splits.json identical to this plan's (a run stopped between the two writes) may be there already.
    if existing - {SPLITS_FILE} or (existing and (cv_dir / SPLITS_FILE).read_text() != splits_text):
        return f"{cv_dir} exists but holds no {PLAN_FILE} (not made by crossval.py run, or made before plans): {new_name}"
    cv_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(cv_dir / SPLITS_FILE, splits_text)
    write_atomic(cv_dir / PLAN_FILE, json.dumps(json_ready(plan), indent=2) + "\n")  # last: the plan's commit point
    print(f"plan written: {cv_dir / PLAN_FILE} and {SPLITS_FILE} ({plan['folds']} folds)")
    return None


def stray_folds(cv_dir: Path, plan: dict) -> list[str]:
    """Each fold<k> folder that is not fold k of this plan (out of range, or trained with other settings)."""
    problems = []
    for run_dir in fold_dirs(cv_dir):
        if int(run_dir.name[4:]) >= plan["folds"]:
            problems.append(f"{run_dir}: the plan has {plan['folds']} folds")
        elif (run_dir / "config.json").is_file():
            saved = {k: v for k, v in read_saved_config(run_dir).items() if k not in PER_FOLD_KEYS}
            differences = plan_differences({"train_config": saved}, {"train_config": plan["train_config"]})
            if differences:
                problems.append(f"{run_dir} was trained with other settings: " + "; ".join(differences))
    return problems
