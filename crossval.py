"""Cross-validation by patient in one command: train K folds, score each fold's held-out patients, tabulate.

    python crossval.py run --name cpu --folds 5 --data-root DATA --recipe cpu     # any train.py flag after
    python crossval.py table runs/cv/cpu                                          # the table of finished folds
    python crossval.py compare runs/cv/cpu runs/cv/cpu-glioma                     # paired, per patient

`run` trains fold k of K (`train.py --folds K --fold k`, or the values of
`--fold-column`) into RUNS_DIR/<name>/fold<k>/, scores that fold's held-out
patients with `test.py --subset test` into RUNS_DIR/<name>/heldout/fold<k>/,
and writes RUNS_DIR/<name>/crossval.json and crossval.md. A fold already
finished is not trained again and an interrupted one resumes, so running the
same command again continues where it stopped. Within each fold the inner
validation patients choose the epoch and the decision rule; the held-out
patients choose nothing.

`compare A B` pairs the two cross-validations' held-out patients on the folds
both have scored (the same folds: same SPLIT_SEED, data and fold count) and
tests the per-patient mean Dice of B minus A with a Wilcoxon signed-rank
test, overall and per tumour class.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

import dataset
from metrics import describe_paired_comparison, paired_comparison
from report import read_metrics
from runfolder import read_split, read_summary
from scoring import TAIL_DICE  # the table's "share of slices below" this Dice, as in test.py's summary
from utils import json_ready, write_atomic

HERE = Path(__file__).resolve().parent
CLASS_COLUMN = "tumor_class"  # scored per value where metadata.csv has it
# train.py flags that `run` sets itself for each fold.
RESERVED_FLAGS = ("--folds", "--fold", "--fold-column", "--run-name", "--runs-dir", "--data-root", "--resume")


def fold_dirs(cv_dir: Path) -> list[Path]:
    """cv_dir's fold<k> run folders, in fold order."""
    return sorted((p for p in Path(cv_dir).glob("fold*") if p.is_dir() and p.name[4:].isdigit()),
                  key=lambda p: int(p.name[4:]))


def train_fold(cv_dir: Path, fold: int, folds: int, args: argparse.Namespace, train_flags: list[str]) -> int:
    """Train fold `fold` unless it has finished; resume it if it was interrupted. The exit code."""
    run_dir = cv_dir / f"fold{fold}"
    if (run_dir / "summary.json").is_file():
        print(f"fold {fold}: trained already ({run_dir})")
        return 0
    if (run_dir / "last.pt").is_file():
        command = [sys.executable, str(HERE / "train.py"), "--resume", str(run_dir)]
    else:
        split = ["--fold-column", args.fold_column] if args.fold_column else ["--folds", str(folds)]
        command = [sys.executable, str(HERE / "train.py"), "--data-root", str(args.data_root), *split,
                   "--fold", str(fold), "--runs-dir", str(cv_dir), "--run-name", f"fold{fold}", *train_flags]
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
        for fold in chosen:
            code = train_fold(cv_dir, fold, folds, args, train_flags)
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


# ----------------------------------------------------------------------------- the table


def held_out_rows(cv_dir: Path) -> dict[int, tuple[list[dict[str, str]], str]]:
    """Each scored fold's metrics.csv rows and patient column (its split.json's group column), by fold number.

    Raises FileNotFoundError when no fold is scored.
    """
    found = {}
    for run_dir in fold_dirs(cv_dir):
        path = cv_dir / "heldout" / run_dir.name / "metrics.csv"
        if path.is_file():
            found[int(run_dir.name[4:])] = (read_metrics(path), read_split(run_dir).get("group_column") or "")
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
    """Per fold, pooled over every held-out slice, and mean +- sd over folds (sd with ddof 1)."""
    by_fold = held_out_rows(cv_dir)
    folds = {fold: slice_scores(rows, patients, class_mix) for fold, (rows, patients) in by_fold.items()}
    pooled = slice_scores([row for rows, _ in by_fold.values() for row in rows],
                          next(iter(by_fold.values()))[1], class_mix)
    over_folds = {}
    for key in pooled:
        values = [scores[key] for scores in folds.values() if key in scores and not math.isnan(scores[key])]
        if key not in ("slices", "patients") and values:
            over_folds[key] = {"mean": float(np.mean(values)),
                               "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan}
    minutes = {int(d.name[4:]): read_summary(d).get("minutes")
               for d in fold_dirs(cv_dir) if (d / "summary.json").is_file()}
    return {"cv_dir": str(cv_dir), "folds": folds, "pooled": pooled, "over_folds": over_folds,
            "training_minutes": minutes, "class_mix": class_mix, "dice_below": TAIL_DICE}


def markdown_table(result: dict) -> str:
    """crossval.md: one row per fold, the pooled row, and mean +- sd over folds."""
    pooled = result["pooled"]
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
    lines.append("| " + " | ".join(["**pooled**", *(f"**{text(c, pooled.get(c))}**" for c in columns), ""]) + " |")
    spread = result["over_folds"]
    lines.append("| " + " | ".join(["mean ± sd over folds",
                                    *(text(c, spread[c]["mean"], spread[c]["sd"]) if c in spread else ""
                                      for c in columns), ""]) + " |")
    return "\n".join(lines) + "\n"


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


def compare(first: Path, second: Path) -> int:
    """Print the paired per-patient comparison of two cross-validations (B minus A) on the folds both scored."""
    try:
        common = set(held_out_rows(first)) & set(held_out_rows(second))
        if not common:
            raise ValueError(f"{first} and {second} have no scored fold in common")
        means_a, classes, slices_a = patient_means(first, common)
        means_b, _, slices_b = patient_means(second, common)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if slices_a != slices_b:
        print(f"error: {first} and {second} did not hold out the same slices in the same folds (another "
              "SPLIT_SEED, data or fold count?), so their patients cannot be paired fold by fold", file=sys.stderr)
        return 1
    patients = sorted(means_a)
    print(f"A = {first}\nB = {second}\nfolds scored in both: {', '.join(map(str, sorted(common)))}\n"
          f"{len(patients)} held-out patients, each scored by the mean Dice of its slices, B minus A:")
    groups = {"all patients": patients}
    for name in sorted(set(classes.values()) - {""}):
        groups[name] = [p for p in patients if classes[p] == name]
    for name, members in groups.items():
        result = paired_comparison([means_b[p] - means_a[p] for p in members])
        print(f"\n{name} ({len(members)}): A {np.mean([means_a[p] for p in members]):.4f}, "
              f"B {np.mean([means_b[p] for p in members]):.4f}\n{describe_paired_comparison(result)}")
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
    """crossval.py's command line (run, table, compare); the exit code."""
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
    for sub in (run_parser, table_parser := commands.add_parser("table", help="the table of the scored folds")):
        sub.add_argument("--class-mix", type=class_mix, metavar="CLASS=W,...",
                         help="also the mean Dice re-weighted to this tumour class mix, e.g. "
                              "glioma=0.465,pituitary=0.304,meningioma=0.231")
    table_parser.add_argument("cv_dir", type=Path, help="a cross-validation's folder, e.g. runs/cv/cpu")
    compare_parser = commands.add_parser("compare", help="paired per-patient test of B against A")
    compare_parser.add_argument("first", type=Path, metavar="A")
    compare_parser.add_argument("second", type=Path, metavar="B")
    args, train_flags = parser.parse_known_args(argv)
    if args.command != "run" and train_flags:
        parser.error(f"unrecognized arguments: {' '.join(train_flags)}")
    if args.command == "run":
        return run(args, train_flags)
    if args.command == "table":
        return write_table(args.cv_dir, args.class_mix)
    return compare(args.first, args.second)


if __name__ == "__main__":
    sys.exit(main())
