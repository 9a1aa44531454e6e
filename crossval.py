"""Cross-validation by patient in one command: train K folds, score each fold's held-out patients, tabulate.

    python crossval.py run --name cpu --folds 5 --data-root DATA --recipe cpu     # any train.py flag after
    python crossval.py table runs/cv/cpu                                          # the table of finished folds
    python crossval.py compare runs/cv/cpu runs/cv/cpu-glioma                     # paired, per patient
    python crossval.py rerule runs/cv/cpu --name cpu-mostprob --rule-most-probable true  # no retraining

`run` first writes the cross-validation's plan, once: RUNS_DIR/<name>/splits.json
(every fold's train, inner-validation and held-out images, the single source
each fold trains from with `train.py --split-file`) and plan.json (the train.py
settings after the recipe is applied, the fold count or column, the data root
and a fingerprint of its files, the pixel spacing, and the code's git commit).
It then trains fold k into RUNS_DIR/<name>/fold<k>/, scores that fold's held-out
patients with `test.py --subset test` into RUNS_DIR/<name>/heldout/fold<k>/,
and writes RUNS_DIR/<name>/crossval.json and crossval.md. Running `run` again
into the same folder continues (finished folds are kept, an interrupted one
resumes) only when its plan matches the saved one; otherwise it stops before
training anything and names every differing setting. Within each fold the
inner validation patients choose the epoch and the decision rule; the
held-out patients choose nothing.

`rerule A --name B` makes cross-validation B from A's finished folds with
other decision-rule settings (RULE_KEYS: they act only after training): each
fold's weights are copied unchanged, its rule is searched again on the fold's
own inner-validation patients, and its held-out patients are scored again. A
rule lever is measured this way in minutes instead of hours.

`compare A B` first shows each fold's inner-validation Dice of both sides (the
evidence a lever is adopted or dropped on), then pairs the two
cross-validations' held-out patients on the folds both have scored (their
plans must make the same splits) and tests the per-patient mean Dice of B
minus A with a Wilcoxon signed-rank test, overall and per tumour class. Each
comparison is a look at those held-out folds: it is appended to looks.csv in
the folder holding A, and its p-value is shown with the number of looks at
those folds and Holm's adjustment over them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import dataset
from config import TRAINING_KEYS, Config, build_parser, config_from_args
from metrics import FAILURE_RULES, describe_paired_comparison, holm_adjusted, paired_comparison
from report import read_metrics
from tumorseg.inference.postprocess import choose_decision_rule
from tumorseg.runs.runfolder import read_saved_config, read_split, read_summary
from tumorseg.evaluation.scoring import TAIL_DICE  # the table's "share of slices below" this Dice, as in test.py's summary
from tumorseg.files import json_ready, save_json, write_atomic
from utils import pick_device, resolve_amp

HERE = Path(__file__).resolve().parent
CLASS_COLUMN = "tumor_class"  # scored per value where metadata.csv has it
# train.py flags that `run` sets itself for each fold.
RESERVED_FLAGS = ("--folds", "--fold", "--fold-column", "--split-file", "--run-name", "--runs-dir", "--data-root",
                  "--resume")
PLAN_FILE = "plan.json"
SPLITS_FILE = "splits.json"
LOOKS_FILE = "looks.csv"
LOOKS_COLUMNS = ["time", "a", "b", "splits_sha256", "folds", "patients", "mean_difference", "p_value"]
# Config keys each fold sets for itself: left out of the plan's train_config.
PER_FOLD_KEYS = ("FOLDS", "FOLD", "FOLD_COLUMN", "SPLIT_FILE", "RUN_NAME", "RUNS_DIR", "DATA_ROOT")
# Plan keys that decide which patients each fold holds out: two cross-validations pair only where all agree.
SPLIT_KEYS = ("data.pairs", "data.sha256", "folds", "fold_column", "train_config.SPLIT_SEED",
              "train_config.VAL_FRACTION", "train_config.SPLIT_GROUP_COLUMN", "splits_sha256")
# Plan keys that record, not decide: a later run may differ in them.
RECORD_ONLY_KEYS = ("train_flags", "code.commit", "code.uncommitted_changes", "created")
# Config keys that act only after training (the decision rule's search): `rerule` may change them.
RULE_KEYS = ("RULE_MOST_PROBABLE",)
# The inner-validation rule a lever is adopted by (README, "How a lever is chosen").
ADOPT_MIN_MEAN_GAIN = 0.005
ADOPT_MAX_FOLD_LOSS = 0.005


def fold_dirs(cv_dir: Path) -> list[Path]:
    """cv_dir's fold<k> run folders, in fold order."""
    return sorted((p for p in Path(cv_dir).glob("fold*") if p.is_dir() and p.name[4:].isdigit()),
                  key=lambda p: int(p.name[4:]))


# ----------------------------------------------------------------------------- the plan


def resolved_train_config(train_flags: list[str], data_root: Path) -> dict:
    """The config every fold's config.json will hold (recipe applied, "auto" values resolved), less PER_FOLD_KEYS.

    A bad train.py flag exits through argparse with its message, before anything is written.
    """
    parser = build_parser("train.py flags given to crossval.py run", keys=TRAINING_KEYS)
    parser.prog = "crossval.py run (train.py flags)"
    config = config_from_args(parser, parser.parse_args(train_flags))
    config = dataclasses.replace(
        config, DATA_ROOT=str(data_root), AMP=resolve_amp(pick_device(config.DEVICE), config.AMP),
        SPLIT_GROUP_COLUMN=dataset.resolve_split_column(data_root, config.SPLIT_GROUP_COLUMN)[0] or "none")
    return {key: value for key, value in config.to_dict().items() if key not in PER_FOLD_KEYS}


def code_version() -> dict:
    """The project's git commit and whether tracked files differ from it; commit None outside a git checkout."""
    def git(*arguments: str) -> str:
        done = subprocess.run(["git", *arguments], cwd=HERE, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}


def make_plan(args: argparse.Namespace, train_flags: list[str], folds: int) -> tuple[dict, str]:
    """plan.json's contents and splits.json's text for this `run`; raises ValueError when the data cannot be split.

    The data is verified first (as train.py would), so a plan is never written for data that cannot train.
    """
    root = Path(args.data_root)
    train_config = resolved_train_config(train_flags, root)
    group_column = "" if train_config["SPLIT_GROUP_COLUMN"] == "none" else train_config["SPLIT_GROUP_COLUMN"]
    problems = dataset.verify_dataset(root, group_column)
    if problems:
        raise ValueError(str(dataset.DatasetError(root, problems)))
    lists = dataset.fold_split_lists(root, folds, args.fold_column, group_column, train_config["SPLIT_SEED"],
                                     train_config["VAL_FRACTION"])
    splits_text = json.dumps({"group_column": group_column, "folds": lists}, indent=1) + "\n"
    plan = {"data_root": str(root.resolve()), "data": dataset.data_fingerprint(root), "folds": len(lists),
            "fold_column": args.fold_column, "pixel_spacing_mm": args.pixel_spacing_mm,
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


# ----------------------------------------------------------------------------- training and scoring


def train_fold(cv_dir: Path, fold: int, args: argparse.Namespace, train_flags: list[str]) -> int:
    """Train fold `fold` from splits.json unless it has finished; resume it if it was interrupted. The exit code."""
    run_dir = cv_dir / f"fold{fold}"
    if (run_dir / "summary.json").is_file():
        print(f"fold {fold}: trained already ({run_dir})")
        return 0
    if (run_dir / "last.pt").is_file():
        command = [sys.executable, str(HERE / "train.py"), "--resume", str(run_dir)]
    else:
        command = [sys.executable, str(HERE / "train.py"), "--data-root", str(args.data_root),
                   "--split-file", str(cv_dir / SPLITS_FILE), "--fold", str(fold), "--runs-dir", str(cv_dir),
                   "--run-name", f"fold{fold}", *train_flags]
    print(f"fold {fold}: " + " ".join(command[1:]), flush=True)
    return subprocess.run(command).returncode


def score_fold(cv_dir: Path, fold: int, args: argparse.Namespace, columns: list[str]) -> int:
    """Score fold `fold`'s held-out patients with test.py --subset test into cv_dir/heldout/fold<k>. The exit code.

    `columns` are metadata.csv's: the tumour class is scored as a stratum where it is one of them.
    """
    if (cv_dir / "heldout" / f"fold{fold}" / "metrics.csv").is_file():
        return 0
    command = [sys.executable, str(HERE / "test.py"), "--checkpoint", str(cv_dir / f"fold{fold}" / "best.pt"),
               "--data-root", str(args.data_root), "--subset", "test", "--prediction-root", str(cv_dir / "heldout"),
               "--report", "false", "--overwrite"]
    if args.pixel_spacing_mm:
        command += ["--pixel-spacing-mm", str(args.pixel_spacing_mm)]
    if CLASS_COLUMN in columns:
        command += ["--strata", CLASS_COLUMN]
    print(f"fold {fold}: scoring its held-out patients", flush=True)
    return subprocess.run(command, stdout=subprocess.DEVNULL).returncode


def metadata_columns(data_root: Path) -> tuple[list[str], list[dict[str, str]]]:
    """data_root/metadata.csv's columns and rows; ([], []) without one. Raises ValueError naming a bad file."""
    if not (data_root / dataset.METADATA_FILE).is_file():
        return [], []
    try:
        columns, rows = dataset.read_metadata(data_root)
    except (OSError, ValueError, csv.Error) as error:  # read_metadata's messages do not name the file
        raise ValueError(f"{data_root / dataset.METADATA_FILE}: {error}") from error
    return columns, list(rows.values())


def fold_count(args: argparse.Namespace, columns: list[str], rows: list[dict[str, str]]) -> int:
    """K: --folds, or the number of values in --fold-column (of metadata.csv's `columns` and `rows`)."""
    if not args.fold_column:
        return args.folds
    if args.fold_column not in columns:
        raise ValueError(f"{Path(args.data_root) / dataset.METADATA_FILE}: no column '{args.fold_column}'")
    return len(dataset.fold_values([row[args.fold_column] or "" for row in rows]))


def run(args: argparse.Namespace, train_flags: list[str]) -> int:
    """Train and score every fold (continuing finished or interrupted ones), then write the table."""
    clash = [flag for flag in train_flags if flag.split("=")[0] in RESERVED_FLAGS]
    if clash:
        print(f"error: {', '.join(clash)}: crossval.py sets these for each fold; give --data-root, --folds or "
              "--fold-column to crossval.py itself", file=sys.stderr)
        return 1
    try:
        columns, rows = metadata_columns(Path(args.data_root))
        folds = fold_count(args, columns, rows)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if folds < 2:
        print(f"error: cross-validation needs at least 2 folds, got {folds}", file=sys.stderr)
        return 1
    cv_dir = Path(args.runs_dir) / args.name
    chosen = args.only_folds if args.only_folds is not None else list(range(folds))
    outside = [fold for fold in chosen if not 0 <= fold < folds]
    if outside:
        print(f"error: --only-folds {', '.join(map(str, outside))}: there are {folds} folds, 0 to {folds - 1}",
              file=sys.stderr)
        return 1
    try:
        plan, splits_text = make_plan(args, train_flags, folds)
        refusal = settle_plan(cv_dir, plan, splits_text)
        strays = [] if refusal else stray_folds(cv_dir, plan)
    except (OSError, ValueError) as error:
        refusal, strays = str(error), []
    if refusal or strays:
        print("error: " + (refusal or "folders that are not folds of this plan:\n    " + "\n    ".join(strays)
                           + "\nmove them away, or start a new cross-validation with another --name"),
              file=sys.stderr)
        return 1
    try:
        for fold in chosen:
            code = train_fold(cv_dir, fold, args, train_flags)
            if code:
                print(f"error: training fold {fold} failed (exit code {code}); see its messages above. Finished "
                      "folds are kept: run the same command again to continue", file=sys.stderr)
                return code
            code = score_fold(cv_dir, fold, args, columns)
            if code not in (0, 2):
                print(f"error: scoring fold {fold} failed (exit code {code})", file=sys.stderr)
                return code
    except KeyboardInterrupt:
        print("\ninterrupted: finished folds are kept; run the same command again to continue "
              "(an interrupted fold resumes from its last.pt)", file=sys.stderr)
        return 130
    return write_table(cv_dir, args.class_mix)


# ----------------------------------------------------------------------------- another decision rule


def rule_changes(flags: list[str]) -> dict:
    """The RULE_KEYS values `flags` set (parsed as train.py would); argparse exits on any other flag."""
    parser = build_parser("decision-rule settings", keys=RULE_KEYS,
                          refusal="{option} changes training: use `crossval.py run` under a new --name")
    parser.prog = "crossval.py rerule"
    parsed = parser.parse_args(flags)
    return {key: getattr(parsed, key) for key in RULE_KEYS if hasattr(parsed, key)}


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
    pairs = {pair.stem: pair for pair in dataset.listed_pairs(data_root)}
    val_pairs = [pairs[stem] for stem in read_split(staging)["val"]]
    rule = choose_decision_rule(staging / "best.pt", val_pairs, config, pick_device("cpu"))
    save_json(staging / "summary.json", {**read_summary(source / f"fold{fold}"), "decision_rule": rule,
                                         "rule_searched_again_from": str((source / f"fold{fold}").resolve())})
    staging.rename(target / f"fold{fold}")


def rerule(args: argparse.Namespace, flags: list[str]) -> int:
    """`rerule`: cross-validation args.name beside args.source, its folds' rules searched with other settings."""
    source = Path(args.source)
    target = (Path(args.runs_dir) if args.runs_dir else source.parent) / args.name
    try:
        plan = read_plan(source)
        changes = rule_changes(flags)
        if not changes:
            raise ValueError(f"give a decision-rule setting to change ({', '.join(RULE_KEYS)}), "
                             "e.g. --rule-most-probable true")
        new_plan = with_new_keys(plan)
        new_plan = {**new_plan, "train_config": {**new_plan["train_config"], **changes}, "code": code_version(),
                    "created": datetime.datetime.now().isoformat(timespec="seconds"),
                    "rule_searched_again_from": str(source.resolve())}
        refusal = settle_plan(target, new_plan, (source / SPLITS_FILE).read_text())
    except (OSError, ValueError) as error:
        refusal = str(error)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    data_root = Path(plan["data_root"])
    scoring = argparse.Namespace(data_root=data_root, pixel_spacing_mm=plan.get("pixel_spacing_mm"))
    columns = metadata_columns(data_root)[0]
    for fold in range(plan["folds"]):
        if not (source / f"fold{fold}" / "summary.json").is_file():
            continue  # not finished in the source: nothing to search a rule for
        if not (target / f"fold{fold}" / "summary.json").is_file():
            print(f"fold {fold}: searching the decision rule again on its inner validation", flush=True)
            rerule_fold(source, target, fold, changes, data_root)
        code = score_fold(target, fold, scoring, columns)
        if code not in (0, 2):
            print(f"error: scoring fold {fold} failed (exit code {code})", file=sys.stderr)
            return code
    return write_table(target, args.class_mix)


# ----------------------------------------------------------------------------- the table


def held_out_rows(cv_dir: Path) -> dict[int, tuple[list[dict[str, str]], str]]:
    """Each scored fold's metrics.csv rows and patient column (its split.json's group column), by fold number.

    Only the plan's folds count, and only once trained to the end (summary.json) and scored: a stray
    fold<k> folder is never pooled. Raises FileNotFoundError (no plan, or no scored fold) or ValueError.
    """
    cv_dir = Path(cv_dir)
    found = {}
    for fold in range(read_plan(cv_dir)["folds"]):
        run_dir, path = cv_dir / f"fold{fold}", cv_dir / "heldout" / f"fold{fold}" / "metrics.csv"
        if path.is_file() and (run_dir / "summary.json").is_file():
            found[fold] = (read_metrics(path), read_split(run_dir).get("group_column") or "")
    if not found:
        raise FileNotFoundError(f"{cv_dir}: no scored fold (heldout/fold<k>/metrics.csv); run crossval.py run first")
    return found


def number(text: str | None) -> float:
    """A metrics.csv cell as a float; NaN for an empty (undefined) cell."""
    return float(text) if text not in (None, "") else math.nan


def slice_scores(rows: list[dict[str, str]], patients: str, class_mix: dict[str, float] | None) -> dict[str, float]:
    """The table's figures for one set of held-out slices (a fold, or all folds pooled); `patients` names the column.

    Keys: slices, patients, dice_mean, dice_median, patient_dice_mean, share_below_tail,
    hd95_mm_median (or hd95_px_median without a pixel spacing), dice_<class> per
    tumour class, class_mix_dice with `class_mix`. HD95's median leaves out
    slices where it is undefined (nothing predicted).
    """
    dice = np.array([number(r["dice"]) for r in rows])
    hd95_key = "hd95_mm" if "hd95_mm" in rows[0] else "hd95_px"
    hd95 = np.array([number(r.get(hd95_key)) for r in rows])
    scores = {"slices": len(rows), "dice_mean": float(dice.mean()), "dice_median": float(np.median(dice)),
              "share_below_tail": float((dice < TAIL_DICE).mean()),
              f"{hd95_key}_median": float(np.nanmedian(hd95)) if np.isfinite(hd95).any() else math.nan}
    if patients and patients in rows[0]:
        by_patient: dict[str, list[float]] = {}
        for row, value in zip(rows, dice, strict=True):
            by_patient.setdefault(row[patients], []).append(value)
        scores["patients"] = len(by_patient)
        scores["patient_dice_mean"] = float(np.mean([np.mean(v) for v in by_patient.values()]))
    if CLASS_COLUMN in rows[0]:
        for name in sorted({r[CLASS_COLUMN] for r in rows}):
            scores[f"dice_{name}"] = float(dice[[r[CLASS_COLUMN] == name for r in rows]].mean())
        if class_mix:
            scores["class_mix_dice"] = sum(w * scores.get(f"dice_{c}", math.nan) for c, w in class_mix.items())
    return scores


def collect(cv_dir: Path, class_mix: dict[str, float] | None) -> dict:
    """Per fold, over all held-out slices of the scored folds together, and mean +- sd over folds (sd with ddof 1)."""
    by_fold = held_out_rows(cv_dir)
    folds = {fold: slice_scores(rows, patients, class_mix) for fold, (rows, patients) in by_fold.items()}
    all_slices = slice_scores([row for rows, _ in by_fold.values() for row in rows],
                              next(iter(by_fold.values()))[1], class_mix)
    over_folds = {}
    for key in all_slices:
        values = [scores[key] for scores in folds.values() if key in scores and not math.isnan(scores[key])]
        if key not in ("slices", "patients") and values:
            over_folds[key] = {"mean": float(np.mean(values)),
                               "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan}
    minutes = {fold: read_summary(Path(cv_dir) / f"fold{fold}").get("minutes") for fold in folds}
    return {"cv_dir": str(cv_dir), "folds": folds, "all_slices": all_slices, "over_folds": over_folds,
            "training_minutes": minutes, "class_mix": class_mix, "dice_below": TAIL_DICE,
            "looks": look_counts(Path(cv_dir), range(read_plan(Path(cv_dir))["folds"]))}


def markdown_table(result: dict) -> str:
    """crossval.md: one row per fold, the all-slices row, mean +- sd over folds, and the looks at each fold."""
    pooled = result["all_slices"]
    order = ["slices", "patients", "dice_mean", "dice_median", "patient_dice_mean", "class_mix_dice",
             "share_below_tail"]
    columns = [key for key in order if key in pooled] + sorted(k for k in pooled if k.startswith("dice_")
                                                               and k not in order)
    columns += [key for key in pooled if key.startswith("hd95")]
    titles = {"slices": "slices", "patients": "patients", "dice_mean": "mean Dice", "dice_median": "median Dice",
              "patient_dice_mean": "per-patient mean", "class_mix_dice": "class-mix mean",
              "share_below_tail": f"slices < {TAIL_DICE}", "hd95_mm_median": "HD95 median (mm)",
              "hd95_px_median": "HD95 median (px)"}

    def text(key: str, value: float | int | None, sd: float | None = None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, int):
            return str(value)
        share = key == "share_below_tail"
        shown = f"{value:.1%}" if share else f"{value:.3f}"
        if sd is not None and not math.isnan(sd):
            shown += f" ± {sd:.1%}" if share else f" ± {sd:.3f}"
        return shown

    header = ["", *(titles.get(c, c.removeprefix("dice_")) for c in columns), "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for fold, scores in sorted(result["folds"].items()):
        minutes = result["training_minutes"].get(fold)
        lines.append("| " + " | ".join([f"fold {fold}", *(text(c, scores.get(c)) for c in columns),
                                        f"{minutes:.1f}" if minutes else ""]) + " |")
    lines.append("| " + " | ".join(["**all slices**", *(f"**{text(c, pooled.get(c))}**" for c in columns), ""])
                 + " |")
    spread = result["over_folds"]
    lines.append("| " + " | ".join(["mean ± sd over folds",
                                    *(text(c, spread[c]["mean"], spread[c]["sd"]) if c in spread else ""
                                      for c in columns), ""]) + " |")
    looks = ", ".join(f"fold {fold}: {count}" + (" (fresh)" if not count else "")
                      for fold, count in sorted(result["looks"].items()))
    return ("\n".join(lines) + "\n\n**all slices**: every held-out slice of the scored folds, each counted once "
            f"(the mean of per-slice Dice, not pixel-pooled).\nComparisons that looked at each held-out fold "
            f"({LOOKS_FILE}): {looks}\n")


def write_table(cv_dir: Path, class_mix: dict[str, float] | None) -> int:
    """Write cv_dir/crossval.json and crossval.md and print the table; the exit code."""
    try:
        result = collect(Path(cv_dir), class_mix)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = markdown_table(result)
    write_atomic(Path(cv_dir) / "crossval.json", json.dumps(json_ready(result), indent=2) + "\n")
    write_atomic(Path(cv_dir) / "crossval.md", table)
    print(table + f"\nwritten: {Path(cv_dir) / 'crossval.md'} and crossval.json")
    return 0


# ----------------------------------------------------------------------------- paired comparison


def patient_means(cv_dir: Path, folds: set[int]) -> tuple[dict[str, float], dict[str, str], dict[int, list[str]]]:
    """Each held-out patient's mean Dice in `folds`, its tumour class ("" if unknown), and each fold's slices."""
    dice: dict[str, list[float]] = {}
    classes: dict[str, str] = {}
    slices = {}
    for fold, (rows, column) in held_out_rows(cv_dir).items():
        if fold not in folds:
            continue
        if not column or column not in rows[0]:
            raise ValueError(f"{cv_dir}: fold {fold} was not split by patient (or its metrics.csv lacks the "
                             "patient column), so its patients cannot be paired")
        for row in rows:
            dice.setdefault(row[column], []).append(number(row["dice"]))
            classes[row[column]] = row.get(CLASS_COLUMN, "")
        slices[fold] = sorted(r["image"] for r in rows)
    return {p: float(np.mean(v)) for p, v in dice.items()}, classes, slices


def inner_validation_lines(first: Path, second: Path, folds: list[int]) -> list[str]:
    """Each fold's inner-validation Dice of A and B, and the adoption rule's verdict on them.

    Two figures per run, both on the inner-validation patients: the best
    epoch's Dice (threshold THRESHOLD; it chose the epoch) and the Dice with
    the decision rule searched on them (the pipeline as test.py applies it).
    The verdict uses the second where both runs searched a rule, so that a
    rule lever (which changes only the rule) is judged too; else the first.
    B is adopted over A when better in every fold, or better by a mean of at
    least ADOPT_MIN_MEAN_GAIN with no fold worse by more than
    ADOPT_MAX_FOLD_LOSS. The held-out patients take no part in this.
    """
    summaries = {fold: [read_summary(Path(cv) / f"fold{fold}") for cv in (first, second)] for fold in folds}
    with_rule = all(s.get("decision_rule") for pair in summaries.values() for s in pair)
    lines, gains = [], []
    for fold, (a, b) in summaries.items():
        scores = [s["decision_rule"]["val_dice_with_rule"] if with_rule else s["best_val_dice"] for s in (a, b)]
        gains.append(scores[1] - scores[0])
        lines.append(f"  fold {fold}: best epoch A {a['best_val_dice']:.4f} (epoch {a['best_epoch']}), "
                     f"B {b['best_val_dice']:.4f} (epoch {b['best_epoch']})"
                     + (f"; with its rule A {scores[0]:.4f}, B {scores[1]:.4f}" if with_rule else "")
                     + f"; B - A {gains[-1]:+.4f}")
    adopt = all(g > 0 for g in gains) or (np.mean(gains) >= ADOPT_MIN_MEAN_GAIN
                                          and min(gains) >= -ADOPT_MAX_FOLD_LOSS)
    lines.append(f"  on the Dice {'with the rule' if with_rule else 'of the best epoch'}: mean B - A "
                 f"{np.mean(gains):+.4f}, B better in {sum(g > 0 for g in gains)} of {len(gains)} folds, so by the "
                 f"inner-validation rule B is {'ADOPTED' if adopt else 'NOT adopted'} over A (better in every "
                 f"fold, or by a mean >= +{ADOPT_MIN_MEAN_GAIN} with no fold below -{ADOPT_MAX_FOLD_LOSS})")
    return lines


def read_looks(runs_dir: Path) -> list[dict[str, str]]:
    """The rows of runs_dir/looks.csv (none when it does not exist)."""
    path = Path(runs_dir) / LOOKS_FILE
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []


def look_counts(cv_dir: Path, folds: range | list[int]) -> dict[int, int]:
    """How many recorded comparisons looked at each of `folds` of cv_dir's split (by its splits.json's hash)."""
    splits = read_plan(cv_dir).get("splits_sha256")
    rows = [row for row in read_looks(cv_dir.parent) if row["splits_sha256"] == splits]
    return {fold: sum(str(fold) in row["folds"].split() for row in rows) for fold in folds}


def record_look(first: Path, second: Path, splits: str, folds: list[int], patients: int,
                result: dict) -> tuple[int, float]:
    """Append this comparison to looks.csv beside A; the number of looks at these folds and Holm's p over them."""
    row = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "a": str(first), "b": str(second),
           "splits_sha256": splits, "folds": " ".join(map(str, folds)), "patients": patients,
           "mean_difference": f"{result['mean_difference']:.6f}", "p_value": f"{result['wilcoxon_p']:.6g}"}
    rows = [*read_looks(first.parent), row]
    text = io.StringIO()
    writer = csv.DictWriter(text, LOOKS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(first.parent / LOOKS_FILE, text.getvalue())
    folds_looked_at = set(row["folds"].split())
    overlapping = [r for r in rows if r["splits_sha256"] == splits and folds_looked_at & set(r["folds"].split())]
    return len(overlapping), holm_adjusted([float(r["p_value"]) for r in overlapping])[-1]


def category_lines(first: Path, second: Path, folds: list[int]) -> list[str]:
    """Held-out slices per failure category (metrics.csv's `category`), A -> B, for all slices and per tumour class."""
    rows = {side: [row for fold, (found, _) in held_out_rows(cv).items() if fold in folds for row in found]
            for side, cv in (("a", first), ("b", second))}
    if "category" not in rows["a"][0] or "category" not in rows["b"][0]:
        return []
    found = {row["category"] for side in rows.values() for row in side}
    categories = [name for name, _ in FAILURE_RULES if name in found]
    groups = ["all"] + sorted({row.get(CLASS_COLUMN, "") for row in rows["a"]} - {""})
    width = max(len(c) for c in categories) + 2
    lines = [f"  {'':<{width}}" + "".join(f"{g:>18}" for g in groups)]
    for category in categories:
        cells = []
        for group in groups:
            a, b = (sum(row["category"] == category and group in ("all", row.get(CLASS_COLUMN)) for row in rows[side])
                    for side in ("a", "b"))
            cells.append(f"{f'{a} -> {b}':>18}")
        lines.append(f"  {category:<{width}}" + "".join(cells))
    return lines


def compare(first: Path, second: Path) -> int:
    """Print the inner-validation evidence and the paired per-patient held-out comparison (B minus A); exit code.

    Only folds both have trained and scored are compared; their plans must split alike.
    """
    try:
        plans = read_plan(first), read_plan(second)
        differing = plan_differences(*plans, keys=SPLIT_KEYS)
        if differing:
            raise ValueError(f"{first} and {second} do not split the patients alike, so they cannot be paired "
                             "fold by fold; their plans differ in:\n    " + "\n    ".join(differing))
        common = sorted(set(held_out_rows(first)) & set(held_out_rows(second)))
        if not common:
            raise ValueError(f"{first} and {second} have no scored fold in common")
        means_a, classes, slices_a = patient_means(first, set(common))
        means_b, _, slices_b = patient_means(second, set(common))
        if slices_a != slices_b:
            raise ValueError(f"{first} and {second} did not hold out the same slices in the same folds, so their "
                             "patients cannot be paired fold by fold")
        inner = inner_validation_lines(first, second, common)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    patients = sorted(means_a)
    print(f"A = {first}\nB = {second}\nfolds scored in both: {', '.join(map(str, common))}\n\n"
          "inner validation (the patients that chose each run's epoch; a lever is adopted or dropped on these):")
    print("\n".join(inner))
    overall = paired_comparison([means_b[p] - means_a[p] for p in patients])
    looks, holm_p = record_look(Path(first), Path(second), plans[0]["splits_sha256"], common, len(patients), overall)
    print(f"\nheld-out patients (they report only): {len(patients)}, each scored by the mean Dice of its slices, "
          f"B minus A. This is look {looks} at these folds ({Path(first).parent / LOOKS_FILE}); Holm's adjustment "
          f"over the {looks} looks gives p = {holm_p:.4g} for all patients.")
    groups = {"all patients": patients}
    for name in sorted(set(classes.values()) - {""}):
        groups[name] = [p for p in patients if classes[p] == name]
    for name, members in groups.items():
        result = overall if name == "all patients" else paired_comparison([means_b[p] - means_a[p] for p in members])
        print(f"\n{name} ({len(members)}): A {np.mean([means_a[p] for p in members]):.4f}, "
              f"B {np.mean([means_b[p] for p in members]):.4f}\n{describe_paired_comparison(result)}")
    categories = category_lines(Path(first), Path(second), common)
    if categories:
        print("\nheld-out slices per failure category (test.py's categories), A -> B:\n" + "\n".join(categories))
    return 0


def class_mix(text: str) -> dict[str, float]:
    """'glioma=0.465,pituitary=0.304,meningioma=0.231' as weights by tumour class (they must sum to 1)."""
    try:
        weights = {name.strip(): float(value) for name, value in (part.split("=") for part in text.split(","))}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected CLASS=WEIGHT,..., got {text!r}") from error
    if not math.isclose(sum(weights.values()), 1.0, abs_tol=1e-3) or min(weights.values()) < 0:
        raise argparse.ArgumentTypeError(f"weights must be non-negative and sum to 1, got {text!r}")
    return weights


def fold_list(text: str) -> list[int]:
    """'0,2' as [0, 2]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 0,2, got {text!r}") from error


def main(argv: list[str] | None = None) -> int:
    """crossval.py's command line (run, rerule, table, compare); the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", allow_abbrev=False,
                                     help="train and score every fold, then write the table; other flags go to "
                                          "train.py (e.g. --recipe cpu)")
    run_parser.add_argument("--name", required=True, help="the cross-validation's folder under --runs-dir")
    run_parser.add_argument("--data-root", type=Path, required=True, help="folder with images/, masks/, metadata.csv")
    run_parser.add_argument("--folds", type=int, default=5, help="K patient folds made by train.py (default 5)")
    run_parser.add_argument("--fold-column", default="",
                            help="metadata.csv column whose values are the folds, instead of --folds")
    run_parser.add_argument("--only-folds", type=fold_list, metavar="K,K",
                            help="train and score only these folds (the table covers every scored fold)")
    run_parser.add_argument("--runs-dir", type=Path, default=Path("runs/cv"), help="default: runs/cv")
    run_parser.add_argument("--pixel-spacing-mm", type=float, help="adds HD95 in mm (the shared slices: 0.98)")
    rerule_parser = commands.add_parser("rerule", help="search each finished fold's decision rule again with other "
                                                       "rule settings (no retraining), as a new cross-validation")
    rerule_parser.add_argument("source", type=Path, metavar="A", help="a finished cross-validation's folder")
    rerule_parser.add_argument("--name", required=True, help="the new cross-validation's folder name")
    rerule_parser.add_argument("--runs-dir", type=Path, help="where to put it (default: beside A)")
    for sub in (run_parser, rerule_parser,
                table_parser := commands.add_parser("table", help="the table of the scored folds")):
        sub.add_argument("--class-mix", type=class_mix, metavar="CLASS=W,...",
                         help="also the mean Dice re-weighted to this tumour class mix, e.g. "
                              "glioma=0.465,pituitary=0.304,meningioma=0.231")
    table_parser.add_argument("cv_dir", type=Path, help="a cross-validation's folder, e.g. runs/cv/cpu")
    compare_parser = commands.add_parser("compare", help="paired per-patient test of B against A")
    compare_parser.add_argument("first", type=Path, metavar="A")
    compare_parser.add_argument("second", type=Path, metavar="B")
    args, train_flags = parser.parse_known_args(argv)
    if args.command not in ("run", "rerule") and train_flags:
        parser.error(f"unrecognized arguments: {' '.join(train_flags)}")
    if args.command == "run":
        return run(args, train_flags)
    try:
        if args.command == "rerule":
            return rerule(args, train_flags)
        if args.command == "table":
            return write_table(args.cv_dir, args.class_mix)
        return compare(args.first, args.second)
    except KeyboardInterrupt:  # files are written whole (staged, renamed); a rerule's half-copied fold is redone
        print(f"\ninterrupted: nothing half-written was left in place; run `crossval.py {args.command}` again "
              "to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
