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
import datetime
import sys
from pathlib import Path

import numpy as np

from config import build_parser
from tumorseg.crossval.adoption import inner_validation_lines
from tumorseg.crossval.folds import rerule_fold, score_fold, train_fold
from tumorseg.crossval.heldout import CLASS_COLUMN, category_lines, held_out_patients, held_out_rows, write_table
from tumorseg.crossval.looks import LOOKS_FILE, record_look
from tumorseg.crossval.plan import (RULE_KEYS, SPLIT_KEYS, SPLITS_FILE, code_version, make_plan, plan_differences,
                                    read_plan, settle_plan, stray_folds, with_new_keys)
from tumorseg.data import reading, splits
from tumorseg.data.spacing import format_spacing, parse_spacing
from tumorseg.evaluation.scoring import class_mix
from tumorseg.evaluation.stats import describe_paired_comparison, paired_comparison

# train.py flags that `run` sets itself for each fold.
RESERVED_FLAGS = ("--folds", "--fold", "--fold-column", "--split-file", "--run-name", "--runs-dir", "--data-root",
                  "--resume")


def metadata_columns(data_root: Path) -> tuple[list[str], list[dict[str, str]]]:
    """data_root/metadata.csv's columns and rows; ([], []) without one. Raises ValueError naming a bad file."""
    if not (data_root / reading.METADATA_FILE).is_file():
        return [], []
    try:
        columns, rows = reading.read_metadata(data_root)
    except (OSError, ValueError, csv.Error) as error:  # read_metadata's messages do not name the file
        raise ValueError(f"{data_root / reading.METADATA_FILE}: {error}") from error
    return columns, list(rows.values())


def fold_count(args: argparse.Namespace, columns: list[str], rows: list[dict[str, str]]) -> int:
    """K: --folds, or the number of values in --fold-column (of metadata.csv's `columns` and `rows`)."""
    if not args.fold_column:
        return args.folds
    if args.fold_column not in columns:
        raise ValueError(f"{Path(args.data_root) / reading.METADATA_FILE}: no column '{args.fold_column}'")
    return len(splits.fold_values([row[args.fold_column] or "" for row in rows]))


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
        plan, splits_text = make_plan(args.data_root, args.fold_column, args.pixel_spacing_mm, train_flags, folds)
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
            code = train_fold(cv_dir, fold, args.data_root, train_flags)
            if code:
                print(f"error: training fold {fold} failed (exit code {code}); see its messages above. Finished "
                      "folds are kept: run the same command again to continue", file=sys.stderr)
                return code
            code = score_fold(cv_dir, fold, args.data_root, args.pixel_spacing_mm, columns)
            if code not in (0, 2):
                print(f"error: scoring fold {fold} failed (exit code {code})", file=sys.stderr)
                return code
    except KeyboardInterrupt:
        print("\ninterrupted: finished folds are kept; run the same command again to continue "
              "(an interrupted fold resumes from its last.pt)", file=sys.stderr)
        return 130
    return write_table(cv_dir, args.class_mix)


def rule_changes(flags: list[str]) -> dict:
    """The RULE_KEYS values `flags` set (parsed as train.py would); argparse exits on any other flag."""
    parser = build_parser("decision-rule settings", keys=RULE_KEYS,
                          refusal="{option} changes training: use `crossval.py run` under a new --name")
    parser.prog = "crossval.py rerule"
    parsed = parser.parse_args(flags)
    return {key: getattr(parsed, key) for key in RULE_KEYS if hasattr(parsed, key)}


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
    columns = metadata_columns(data_root)[0]
    for fold in range(plan["folds"]):
        if not (source / f"fold{fold}" / "summary.json").is_file():
            continue  # not finished in the source: nothing to search a rule for
        if not (target / f"fold{fold}" / "summary.json").is_file():
            print(f"fold {fold}: searching the decision rule again on its inner validation", flush=True)
            rerule_fold(source, target, fold, changes, data_root)
        code = score_fold(target, fold, data_root, plan.get("pixel_spacing_mm"), columns)
        if code not in (0, 2):
            print(f"error: scoring fold {fold} failed (exit code {code})", file=sys.stderr)
            return code
    return write_table(target, args.class_mix)


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
        means_a, classes, slices_a = held_out_patients(first, set(common))
        means_b, _, slices_b = held_out_patients(second, set(common))
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


def fold_list(text: str) -> list[int]:
    """'0,2' as [0, 2]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 0,2, got {text!r}") from error


def spacing_mm(text: str) -> float | str:
    """argparse type for --pixel-spacing-mm: a number for square pixels (as plans record it), else "RxC"."""
    try:
        rows, columns = parse_spacing(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return rows if rows == columns else format_spacing((rows, columns))


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
    run_parser.add_argument("--pixel-spacing-mm", type=spacing_mm, metavar="MM",
                            help="adds HD95 in mm: one number (the shared slices: 0.98) or rows x columns (0.9x1.2)")
    rerule_parser = commands.add_parser("rerule", help="search each finished fold's decision rule again with other "
                                                       "rule settings (no retraining), as a new cross-validation")
    rerule_parser.add_argument("source", type=Path, metavar="A", help="a finished cross-validation's folder")
    rerule_parser.add_argument("--name", required=True, help="the new cross-validation's folder name")
    rerule_parser.add_argument("--runs-dir", type=Path, help="where to put it (default: beside A)")
    for sub in (run_parser, rerule_parser,
                table_parser := commands.add_parser("table", help="the table of the scored folds")):
        sub.add_argument("--class-mix", type=lambda text: class_mix(text, CLASS_COLUMN)[1], metavar="CLASS=W,...",
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
