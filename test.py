"""Predict tumour masks with a trained checkpoint; score them where ground truth exists; write a report.

    python test.py                                        # best.pt of the newest run, on DATA_ROOT
    python test.py --checkpoint runs/x/best.pt --data-root path/to/folder --threshold 0.4
    python test.py --data-root DATA --subset test         # only the patients the run held out
    python test.py --data-root DATA --group-by tumor_class  # also scores per metadata.csv value
    python test.py --data-root DATA --pixel-spacing-mm 0.98 --strata tumor_class --tta true
    python test.py --compare predictions/a predictions/b  # paired per-image Dice differences

The folder needs `images/` (any sizes); with `masks/` each image is also
scored against its mask at the image's own resolution. The model runs at the
size it was trained at, as rebuilt from the config inside the checkpoint; its
probability map is resized back to each image before thresholding.

Writes PREDICTION_ROOT/<run name>/: masks/, segmented/, overlays/ (PNG per
image; uncertainty/ too with TTA or an ensemble), metrics.csv, summary.json
and report.html. Exit code 0 when every image was processed, 1 on a fatal
error, 2 when some images could not be read.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dataset
import report
from config import Config, parse_bool, build_parser, config_from_args
from inference import native_probabilities, native_probabilities_and_spreads
from metrics import (FAILURE_RULES, POOR_MAX_DICE, UNCERTAINTY_REGION_PROBABILITY, CalibrationTracker, Spacing,
                     auroc, describe_paired_comparison, paired_comparison, per_image_report, pooled_scores,
                     rank_correlation, region_uncertainty, summarise)
from postprocess import DecisionRule
from utils import (CheckpointError, LoadedCheckpoint, OutputError, check_amp, describe_write_error, interruption,
                   is_unfinished_run, load_checkpoint, pick_device, remove_stale_staging, resolve_amp, run_progress,
                   save_json, sigterm_as_interrupt, staging_name, tolerant_console, write_atomic)

PREDICTION_COLOUR = np.array([255, 40, 40], np.float32)  # red fill, semi-transparent
TRUTH_COLOUR = np.array([40, 255, 40], np.uint8)  # green outline
OVERLAY_ALPHA = 0.4
# The blended colour of each channel level (256, 3), computed once: float32 blending, then rounding, per pixel.
OVERLAY_BLEND = ((1 - OVERLAY_ALPHA) * np.arange(256, dtype=np.float32)[:, None]
                 + OVERLAY_ALPHA * PREDICTION_COLOUR).round().astype(np.uint8)
OUTPUT_FOLDERS = ("masks", "segmented", "overlays")
# zlib level 1: PNGs stay lossless, a little larger, and encode several times faster than PIL's default 6.
PNG_COMPRESS_LEVEL = 1
# Threads writing and scoring finished images while the next batch is decoded and predicted.
WRITE_THREADS = 3
# The only config keys inference uses; training keys (size, channels...) come from the checkpoint.
INFERENCE_KEYS = ("DATA_ROOT", "RUNS_DIR", "PREDICTION_ROOT", "BATCH_SIZE", "DEVICE", "THRESHOLD", "TTA", "AMP",
                  "CHANNELS_LAST")
# metrics.csv's numeric columns, in order; those an image lacks (mm without a spacing, uncertainty
# without TTA or an ensemble) are left out. Text columns follow: category, tumour_size, metadata.
NUMBER_COLUMNS = ("dice", "iou", "pixel_accuracy", "precision", "sensitivity", "hd95_px", "assd_px", "hd95_mm",
                  "assd_mm", "pred_components", "true_components", "gt_pixels", "pred_pixels", "overlap_pixels",
                  "uncertainty")
SIZE_COLUMN = "tumour_size"
SIZE_STRATA = ("small", "medium", "large", "no tumour")  # terciles of the true tumour area, then empty masks
UNCERTAINTY_PNG_MAX = 0.5  # the largest possible std of probabilities: drawn white
TAIL_DICE = 0.3  # summary.json and the console give the share of images scoring below this Dice
PRINTED_GROUPS = 12  # more groups than this (e.g. patients) are summed up in one console line


@dataclass
class Prediction:
    """One image's probability map at its own resolution, with the decoded image and optional mask."""

    stem: str
    image: np.ndarray  # uint8 (H, W, 3) for display
    probability: np.ndarray  # float32 (H, W)
    mask: np.ndarray | None  # uint8 {0, 1} (H, W), None without ground truth
    spread: np.ndarray | None  # float32 (H, W) std of the views'/members' probabilities; None with one view


@dataclass
class Scoring:
    """How scores are grouped and measured, settled from the options and metadata.csv before predicting."""

    group_column: str  # per-group scores by this metadata column; "" = none
    strata_columns: list[str]  # per-stratum scores by these metadata columns (tumour size always)
    labels: dict[str, dict[str, str]]  # metadata column -> image stem -> value
    spacing: dict[str, Spacing] | None  # image stem -> pixel size in mm; None = distances in pixels only
    spacing_source: str  # where the spacing came from, for summary.json
    class_mix: tuple[str, dict[str, float]] | None  # --class-mix: column and each value's weight


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


def find_images(data_root: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """Images under data_root/images, and masks by stem when data_root/masks exists."""
    image_dir = Path(data_root) / "images"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: folder of images to predict is missing")
    by_stem = dataset.files_by_stem(image_dir)
    if not by_stem:
        unusable = "".join(f"; {path.name}: {reason}" for path, reason in dataset.unusable_entries(image_dir).items())
        raise FileNotFoundError(f"{image_dir}: no {'/'.join(dataset.IMAGE_EXTENSIONS)} images{unusable}")
    shared = sorted(stem for stem, files in by_stem.items() if len(files) > 1)
    if shared:  # their outputs would overwrite each other
        raise ValueError(f"{image_dir}: several images share the stem(s) {', '.join(shared)}")
    images = [files[0] for _, files in sorted(by_stem.items())]
    mask_dir = Path(data_root) / "masks"
    if not mask_dir.is_dir():
        return images, None
    return images, {stem: files[0] for stem, files in dataset.files_by_stem(mask_dir).items()}


SUBSET_NOTES = {
    "val": "the run's inner validation patients chose its epoch and decision rule: their scores are optimistic, "
           "not a held-out figure; use --subset test",
}


def subset_stems(split_path: Path, subset: str) -> set[str]:
    """The stems the run's split.json lists under `subset` (a role: "train", "val" or "test"); errors name the file."""
    try:
        split = json.loads(Path(split_path).read_text())
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{split_path}: cannot read the run's split ({error})") from error
    if subset == "test" and "test" not in split:
        raise ValueError(f"{split_path}: this run has no held-out patients (it was trained before train.py kept "
                         "them apart, so its validation patients also chose its epoch and rule); retrain it, "
                         "or use --subset val knowing that its scores are optimistic")
    if not split.get(subset):
        raise ValueError(f"{split_path}: the run holds no '{subset}' images (TEST_FRACTION 0 holds none out)")
    return set(split[subset])


def subset_images(images: list[Path], split_path: Path, subset: str) -> list[Path]:
    """The images whose stems the run's split.json lists under `subset`."""
    wanted = subset_stems(split_path, subset)
    chosen = [p for p in images if dataset.stem_key(p) in wanted]
    if not chosen:
        raise ValueError(f"{split_path}: none of its {len(wanted)} '{subset}' images is in this folder")
    return chosen


def split_group_column(checkpoint_path: Path) -> str:
    """The metadata column the checkpoint's run split its patients by ("" for a random split or no split.json)."""
    try:
        return json.loads((Path(checkpoint_path).resolve().parent / "split.json").read_text()).get("group_column") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def metadata_column(data_root: Path, column: str, images: list[Path], option: str) -> dict[str, str]:
    """Each image's value in metadata.csv's `column` ("" when its row is missing); `option` names the flag in errors."""
    path = Path(data_root) / dataset.METADATA_FILE
    try:
        columns, rows = dataset.read_metadata(Path(data_root))
    except (OSError, ValueError, csv.Error) as error:
        raise FileNotFoundError(f"{path}: cannot read it for {option} ({error})") from error
    if column not in columns:
        raise ValueError(f"{path}: no column '{column}' for {option} (columns: {', '.join(columns)})")
    return {p.stem: rows.get(dataset.stem_key(p), {}).get(column) or "" for p in images}


def pixel_spacings(data_root: Path, images: list[Path], spacing_mm: float | None,
                   column: str | None) -> tuple[dict[str, Spacing] | None, str]:
    """Each image's pixel size in mm, and where it came from; (None, "") when neither option gives one.

    `column` (metadata.csv, one number per image: square pixels) wins; `spacing_mm`
    serves every image without a value there, or all images without `column`.
    """
    if column is None:
        if spacing_mm is None:
            return None, ""
        return {p.stem: (spacing_mm, spacing_mm) for p in images}, f"--pixel-spacing-mm {spacing_mm}"
    path = Path(data_root) / dataset.METADATA_FILE
    spacing = {}
    for stem, text in metadata_column(data_root, column, images, "--spacing-column").items():
        if not text.strip():
            if spacing_mm is None:
                raise ValueError(f"{path}: no '{column}' value for image_id '{stem}'; fill it in or give "
                                 "--pixel-spacing-mm for images without one")
            value = spacing_mm
        else:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{path}: '{column}' of image_id '{stem}' is {text!r}, "
                                 "not a pixel size in mm (a positive number)")
        spacing[stem] = (value, value)
    fallback = "" if spacing_mm is None else f", else --pixel-spacing-mm {spacing_mm}"
    return spacing, f"metadata.csv column '{column}'{fallback}"


def class_mix(text: str) -> tuple[str, dict[str, float]]:
    """argparse type for --class-mix: 'COLUMN:VALUE=WEIGHT,...' with positive weights, normalised to sum 1."""
    column, _, pairs = text.partition(":")
    weights = {}
    for pair in pairs.split(","):
        value, _, weight = pair.partition("=")
        try:
            weights[value.strip()] = positive_number(weight)
        except argparse.ArgumentTypeError:
            weights = {}
            break
    if not column or not weights:
        raise argparse.ArgumentTypeError(f"expected COLUMN:VALUE=WEIGHT,... with positive weights, got {text!r}")
    total = sum(weights.values())
    return column, {value: weight / total for value, weight in weights.items()}


def positive_number(text: str) -> float:
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def combined_spread(means: list[np.ndarray], spreads: list[np.ndarray]) -> np.ndarray:
    """Standard deviation over every view of every member, from each member's views' mean and deviation.

    Members (each with as many views) are compared at the image's size, where
    their maps meet: total variance = mean within-member variance + variance
    of the members' means. Two copies of one model add exactly nothing.
    """
    mean = sum(means) / len(means)
    within = sum(spread ** 2 for spread in spreads) / len(spreads)
    between = sum((member - mean) ** 2 for member in means) / len(means)
    return np.sqrt(within + between)


def predict(models: list[LoadedCheckpoint], images: list[Path], masks: dict[str, Path] | None,
            device: torch.device, options: Config, with_spread: bool,
            unreadable: list[str]) -> Iterator[Prediction]:
    """Yield a Prediction per readable image: the mean probability of `models`, each run as it was trained.

    `options` gives the batch size, TTA, AMP and CHANNELS_LAST (the models
    already in that memory format). With `with_spread`, also the per-pixel
    standard deviation over every TTA view of every model. Unreadable files
    are named in `unreadable` and skipped.
    """
    speed = {"tta": options.TTA, "amp": options.AMP, "channels_last": options.CHANNELS_LAST}
    channels = sorted({3, *(loaded.config.IN_CHANNELS for loaded in models)})
    batch: list[tuple[Path, dict[int, np.ndarray], np.ndarray | None]] = []

    def run(batch):
        maps, spreads = [], []  # per member: a map per image
        for loaded in models:
            inputs = [decoded[loaded.config.IN_CHANNELS] for _, decoded, _ in batch]
            if with_spread:
                member_maps, member_spreads = native_probabilities_and_spreads(loaded.model, loaded.config, inputs,
                                                                               device, **speed)
                spreads.append(member_spreads)
            else:
                member_maps = native_probabilities(loaded.model, loaded.config, inputs, device, **speed)
            maps.append(member_maps)
        for index, (path, decoded, mask) in enumerate(batch):
            means = [member[index] for member in maps]
            spread = combined_spread(means, [member[index] for member in spreads]) if with_spread else None
            yield Prediction(path.stem, decoded[3], sum(means) / len(models), mask, spread)

    for path in tqdm(images, desc="predict", dynamic_ncols=True):
        try:
            # decoded once, converted per channel count: RGB for display, and as each model was trained
            decoded = dataset.read_image_as(path, channels)
            mask = None
            key = dataset.stem_key(path)
            if masks is not None and key in masks:
                mask = dataset.read_mask(masks[key])
                if mask.shape != decoded[3].shape[:2]:
                    raise ValueError(f"mask {masks[key].name} is {mask.shape[1]}x{mask.shape[0]}, "
                                     f"image is {decoded[3].shape[1]}x{decoded[3].shape[0]}")
        except Exception as error:  # any decoder error: report the file, keep going
            unreadable.append(f"{path}: skipped, {error}")
            continue
        batch.append((path, decoded, mask))
        if len(batch) == options.BATCH_SIZE:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


def heat_colours(spread: np.ndarray) -> np.ndarray:
    """A spread map (0 .. UNCERTAINTY_PNG_MAX) as uint8 RGB: black, red, yellow, white as it grows."""
    level = np.clip(spread / UNCERTAINTY_PNG_MAX, 0, 1)[..., None]
    rgb = np.clip(3 * level - np.array([0, 1, 2]), 0, 1)  # red rises first, then green, then blue
    return (rgb * 255).round().astype(np.uint8)


def group_scores(rows: list[dict]) -> dict[str, float | int]:
    """Count, per-image means (Dice also median), pooled Dice and IoU and poor images of a set of scored images."""
    dice = [r["dice"] for r in rows]
    scores: dict[str, float | int] = {"count": len(rows), "dice_mean": float(np.mean(dice)),
                                      "dice_median": statistics.median(dice)}
    overlap = sum(r["overlap_pixels"] for r in rows)
    scores.update(pooled_scores(overlap, sum(r["pred_pixels"] for r in rows) - overlap,
                                sum(r["gt_pixels"] for r in rows) - overlap))
    for key in ("iou", "precision", "sensitivity", "hd95_px", "assd_px", "hd95_mm", "assd_mm", "uncertainty"):
        if key in rows[0]:
            scores[f"{key}_mean"] = summarise([r[key] for r in rows])["mean"]  # undefined ones left out
    scores["poor"] = sum(d < POOR_MAX_DICE for d in dice)
    return scores


def scores_by_label(rows: list[dict], column: str, order: tuple[str, ...] = ()) -> dict[str, dict]:
    """`group_scores` of the rows sharing each value of `column`: the values in `order` first, the rest sorted."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row[column], []).append(row)
    labels = [label for label in order if label in by_label] + sorted(set(by_label) - set(order))
    return {label: group_scores(by_label[label]) for label in labels}


def size_strata(rows: list[dict]) -> list[float]:
    """Label each row's SIZE_COLUMN by terciles of the true tumour area; returns the two edges in pixels.

    Terciles of the images with tumour: "small" up to the first edge, "medium"
    up to the second, "large" above; images without tumour are "no tumour".
    """
    areas = [r["gt_pixels"] for r in rows if r["gt_pixels"] > 0]
    edges = [float(e) for e in np.quantile(areas, [1 / 3, 2 / 3])] if areas else []
    for row in rows:
        area = row["gt_pixels"]
        row[SIZE_COLUMN] = ("no tumour" if area == 0 else "small" if area <= edges[0]
                            else "medium" if area <= edges[1] else "large")
    return edges


def decision_rule(loaded: LoadedCheckpoint, args: argparse.Namespace) -> tuple[DecisionRule, str]:
    """The rule that turns probabilities into masks, and where it came from.

    Default: the rule train.py chose on the run's validation images and stored
    in the checkpoint (else the checkpoint's THRESHOLD alone). `--postprocess
    none` keeps only its threshold; `--threshold X` replaces the threshold.
    """
    if "decision_rule" in loaded.state:
        rule, source = DecisionRule.from_dict(loaded.state["decision_rule"]), "checkpoint (chosen on validation)"
    else:
        rule, source = DecisionRule(threshold=loaded.config.THRESHOLD), "checkpoint THRESHOLD"
    if args.postprocess == "none":
        rule, source = DecisionRule(threshold=rule.threshold), f"{source}, --postprocess none"
    if hasattr(args, "THRESHOLD"):
        rule, source = dataclasses.replace(rule, threshold=args.THRESHOLD), f"{source}, --threshold"
    return rule, source


def overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """Prediction as a semi-transparent red fill, ground truth (if any) as a green outline."""
    blended = np.stack([OVERLAY_BLEND[:, c][image[..., c]] for c in range(3)], axis=-1)  # table look-ups: fast
    out = np.where(predicted[..., None], blended, image)
    if truth is not None:
        out[outline(truth.astype(bool))] = TRUTH_COLOUR
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with at least one 4-neighbour outside it (a one-pixel border)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def output_name(checkpoint_path: Path) -> str:
    """The run's folder name, from the resolved path (so 'best.pt' inside the run folder names the run too)."""
    name = Path(checkpoint_path).resolve().parent.name
    if not name:
        raise ValueError(f"{checkpoint_path}: cannot name the output after a checkpoint at the file system root")
    return name


def start_staging(root: Path, name: str, overwrite: bool) -> Path:
    """A fresh staging folder for this process only, under root; checks --overwrite may replace root/name."""
    root = Path(root)
    existing = root / name
    if overwrite and existing.exists() and not (existing / "summary.json").is_file():
        raise ValueError(f"{existing}: exists but is not a test.py output (no summary.json); "
                         "--overwrite replaces only earlier predictions: move it or choose another PREDICTION_ROOT")
    root.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_staging(root):
        print(f"removed {stale}, left by an interrupted test.py")
    staging = root / staging_name(name, "partial")
    for sub in OUTPUT_FOLDERS:
        (staging / sub).mkdir(parents=True)
    return staging


def publish(staging: Path, root: Path, name: str, overwrite: bool) -> Path:
    """Rename the finished staging folder to root/name (or root/name-N), never onto another run's output.

    A name is claimed by creating it (atomic: only one process succeeds), then
    the staging folder replaces that empty folder. With `overwrite`, the old
    root/name is first moved aside and deleted only once the new one is in place.
    """
    root = Path(root)
    old = None
    if overwrite and (root / name).exists():
        old = root / staging_name(name, "old")
        try:
            os.rename(root / name, old)
        except FileNotFoundError:  # another test.py moved it first
            old = None
    suffix = 1
    while True:
        final = root / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            final.mkdir()
        except FileExistsError:
            suffix += 1
            continue
        os.replace(staging, final)
        break
    if old is not None:
        shutil.rmtree(old)
    return final


def count_training_images(stems: list[str], checkpoint_paths: list[Path],
                          data_root: Path) -> tuple[int | None, str]:
    """How many of `stems` any of the checkpoints' runs trained on, and a note; None when that cannot be told.

    Uses each run's split.json; the count is given only when DATA_ROOT is the
    folder the runs were trained on (else the same names may be other images).
    """
    trained_on: set[str] = set()
    for checkpoint_path in checkpoint_paths:
        split_path = Path(checkpoint_path).resolve().parent / "split.json"
        try:
            split = json.loads(split_path.read_text())
            trained_on |= set(split["train"])
        except (OSError, ValueError, KeyError):
            return None, f"no readable {split_path}: cannot tell which images were seen in training"
        trained_root = split.get("data_root")
        if trained_root is not None and Path(trained_root) != Path(data_root).resolve():
            return None, (f"DATA_ROOT {data_root} is not the folder {checkpoint_path} was trained on "
                          f"({trained_root}); which of these images it saw in training is unknown")
    return sum(stem in trained_on for stem in stems), ""


def main(argv: list[str] | None = None) -> int:
    with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C
        return predict_and_publish(argv)


def predict_and_publish(argv: list[str] | None) -> int:
    """Parse, check, predict into a staging folder, publish it; the exit code."""
    tolerant_console()
    parser = build_parser(__doc__, keys=INFERENCE_KEYS)
    parser.add_argument("--checkpoint", type=Path, nargs="+",
                        help="checkpoint(s) to use (default: best.pt of the newest run); several are an ensemble: "
                             "their probabilities are averaged and the first one's decision rule applies")
    parser.add_argument("--postprocess", choices=("checkpoint", "none"), default="checkpoint",
                        help="'checkpoint': the threshold and component rules train.py chose on validation; "
                             "'none': threshold only")
    parser.add_argument("--subset", choices=("all", "test", "val"), default="all",
                        help="'test': only the patients the checkpoint's run held out, which chose nothing (its "
                             "split.json); 'val': its inner validation patients, which chose the epoch and rule")
    parser.add_argument("--group-by", metavar="COLUMN",
                        help="scores per value of this metadata.csv column, e.g. per patient (default: the column "
                             "the run's split grouped by, where DATA_ROOT's metadata.csv has it; '' for none)")
    parser.add_argument("--class-mix", type=class_mix, metavar="COLUMN:VALUE=W,...",
                        help="also the mean Dice re-weighted to this mix of a metadata.csv column's values, e.g. "
                             "tumor_class:glioma=0.465,pituitary=0.304,meningioma=0.231 (the column is also "
                             "scored as a stratum)")
    parser.add_argument("--strata", metavar="COLUMN", nargs="+", default=[],
                        help="also scores per value of these metadata.csv columns (e.g. tumor_class); "
                             "tumour-size terciles are always scored")
    parser.add_argument("--pixel-spacing-mm", type=positive_number, metavar="MM",
                        help="pixel size of the images as they are, in mm: adds HD95 and ASSD in mm "
                             "(the shared 256 px figshare slices: 0.98)")
    parser.add_argument("--spacing-column", metavar="COLUMN",
                        help="metadata.csv column holding each image's pixel size in mm; --pixel-spacing-mm "
                             "then serves only images with an empty cell")
    parser.add_argument("--report", type=parse_bool, default=True, metavar="BOOL",
                        help="write report.html, one self-contained page of the scores (default: true)")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"),
                        help="compare two prediction folders instead of predicting: per-image Dice differences "
                             "(B minus A) and a paired Wilcoxon signed-rank test")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace PREDICTION_ROOT/<run name>/ instead of writing a fresh <run name>-N/")
    args = parser.parse_args(argv)
    options = config_from_args(parser, args)  # the command line's inference settings
    if args.compare:
        return compare_predictions(*args.compare)
    started = time.perf_counter()

    try:
        device = pick_device(options.DEVICE)
        options = dataclasses.replace(options, AMP=resolve_amp(device, options.AMP))
        slow_precision = check_amp(device, options.AMP)
        if slow_precision:
            print(f"warning: {slow_precision}", file=sys.stderr)
        checkpoint_paths = args.checkpoint or [newest_checkpoint(Path(options.RUNS_DIR))]
        # Chosen for the user: say so when that run never finished (a kill leaves best.pt without summary.json).
        unfinished = None if args.checkpoint else unfinished_run_warning(checkpoint_paths[0])
        models = [load_checkpoint(path, device) for path in checkpoint_paths]
        if options.CHANNELS_LAST:
            for loaded in models:
                loaded.model.to(memory_format=torch.channels_last)
        images, masks = find_images(Path(options.DATA_ROOT))
        # find_images lists regular files (or links to them) only: the rest would vanish without a word.
        skipped = dataset.unusable_entries(Path(options.DATA_ROOT) / "images")
        if args.subset != "all":
            for path in checkpoint_paths:  # in that subset for every member of an ensemble
                split = path.resolve().parent / "split.json"
                images = subset_images(images, split, args.subset)
                wanted = subset_stems(split, args.subset)
                skipped = {entry: why for entry, why in skipped.items() if dataset.stem_key(entry) in wanted}
        scoring, notes = settle_scoring(Path(options.DATA_ROOT), images, checkpoint_paths[0], args)
        name = output_name(checkpoint_paths[0])
        if len(models) > 1:
            name = f"{name}-ensemble{len(models)}"
        staging = start_staging(Path(options.PREDICTION_ROOT), name, args.overwrite)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot write predictions under {options.PREDICTION_ROOT}: {error}", file=sys.stderr)
        return 1
    if unfinished:
        print(f"warning: {unfinished}", file=sys.stderr)
    for path, loaded in zip(checkpoint_paths, models, strict=True):
        for warning in loaded.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        trained = loaded.config  # the checkpoint's own config: how the model was trained
        print(f"checkpoint: {path} (epoch {loaded.state.get('epoch')}, {trained.MODEL} trained at "
              f"{trained.IMAGE_SIZE} px{', head crop' if trained.CROP else ''}, {trained.IN_CHANNELS} channel(s), "
              f"{trained.NORMALIZATION})")
    print(f"images:     {len(images)} from {options.DATA_ROOT}" + ("" if masks is not None else " (predict only)")
          + (f", {len(skipped)} more skipped (named below)" if skipped else ""))
    for note in notes:
        print(f"note: {note}")
    if args.subset in SUBSET_NOTES:
        print(f"warning: {SUBSET_NOTES[args.subset]}", file=sys.stderr)

    try:
        summary, failures = predict_and_write(models, checkpoint_paths, images, masks, scoring, staging, device,
                                              options, args, started,
                                              skipped=[f"{entry}: skipped, {why}" for entry, why in skipped.items()])
        report_seconds = None
        if args.report and summary["scored"]:
            report_started = time.perf_counter()
            report.write_report(staging)
            report_seconds = time.perf_counter() - report_started
        out_dir = publish(staging, Path(options.PREDICTION_ROOT), name, args.overwrite)
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (utils.Terminated)
        shutil.rmtree(staging, ignore_errors=True)
        cause, code = interruption(error)
        print(f"\ninterrupted ({cause}): nothing was written; earlier predictions are untouched", file=sys.stderr)
        return code
    except (OutputError, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = str(error) if isinstance(error, OutputError) else describe_write_error(staging, error)
        print(f"error: {reason}\nnothing was written; earlier predictions are untouched", file=sys.stderr)
        return 1

    print_summary(summary, scoring)
    if report_seconds is not None:
        print(f"{'report':<18}{out_dir / 'report.html'} (written in {report_seconds:.1f} s)")
    print(f"{'images/s':<18}{summary['images_per_second']:.1f}\n{'outputs':<18}{out_dir}")
    for failure in failures:
        print(f"warning: {failure}", file=sys.stderr)
    return 2 if summary["count"] < len(images) or skipped else 0


def settle_scoring(data_root: Path, images: list[Path], checkpoint_path: Path,
                   args: argparse.Namespace) -> tuple[Scoring, list[str]]:
    """Group and strata columns with each image's values, and pixel spacings; raises ValueError naming the file.

    Without --group-by, scores are grouped by the column the checkpoint's run
    split by, when DATA_ROOT's metadata.csv has it (a note says why not otherwise).
    """
    notes = []
    group_column = args.group_by if args.group_by is not None else split_group_column(checkpoint_path)
    if args.group_by is None and group_column:
        try:
            metadata_column(data_root, group_column, images, "--group-by")
        except (FileNotFoundError, ValueError) as error:
            notes.append(f"not grouping by the run's split column '{group_column}': {error}")
            group_column = ""
    options = {group_column: "--group-by"} if group_column else {}
    strata_asked = [*args.strata, *([args.class_mix[0]] if args.class_mix else [])]
    options.update({column: "--strata" for column in strata_asked if column not in options})
    taken = {"image", "category", SIZE_COLUMN, *NUMBER_COLUMNS}
    for column, option in options.items():
        if column in taken:  # metrics.csv holds metadata values beside the scores, by column name
            raise ValueError(f"{option} {column}: metrics.csv already has a column of that name; "
                             "rename the column in metadata.csv")
    labels = {column: metadata_column(data_root, column, images, option) for column, option in options.items()}
    spacing, spacing_source = pixel_spacings(data_root, images, args.pixel_spacing_mm, args.spacing_column)
    strata = [column for column in options if column != group_column]
    if args.class_mix:
        column, weights = args.class_mix
        missing = sorted(set(weights) - set(labels[column].values()))
        if missing:
            raise ValueError(f"--class-mix: no image here has {column} = {', '.join(missing)} "
                             f"(values: {', '.join(sorted(set(labels[column].values())))})")
    return Scoring(group_column, strata, labels, spacing, spacing_source, args.class_mix), notes


def print_summary(summary: dict, scoring: Scoring) -> None:
    """The summary's main figures on the console."""
    print(f"\n{'images processed':<18}{summary['count']}\n{'scored':<18}{summary['scored']}\n"
          f"{'decision rule':<18}{summary['decision_rule_text']} ({summary['decision_rule_source']})")
    if not summary["scored"]:
        return
    for key in ("dice_mean", "dice_median", "dice_pooled", "iou_mean", "pixel_accuracy"):
        print(f"{key:<18}{summary[key]:.4f}")
    print(f"{'Dice < ' + str(TAIL_DICE):<18}{summary['share_dice_below_tail']:.1%} of images "
          f"({summary['share_dice_zero']:.1%} at 0)")
    if "class_mix" in summary:
        print(f"{'class-mix Dice':<18}{summary['class_mix']['dice_mean']:.4f} (by {summary['class_mix']['column']})")
    for key in ("precision", "sensitivity", "hd95_px", "assd_px", "hd95_mm", "assd_mm"):
        stats = summary["metrics"].get(key)
        if stats is not None and stats["count"]:
            undefined = f" ({stats['count_undefined']} undefined)" if stats["count_undefined"] else ""
            print(f"{key + '_mean':<18}{stats['mean']:.4f}   median {stats['median']:.4f}{undefined}")
    print("failure categories: " + ", ".join(f"{name} {count}" for name, count in summary["failure_counts"].items()
                                             if count))
    print(f"{'calibration ECE':<18}{summary['calibration']['ece']:.4f}")
    if "uncertainty" in summary:
        u = summary["uncertainty"]
        print(f"{'uncertainty':<18}Spearman with Dice {format_number(u['spearman_with_dice'])}, AUROC for "
              f"Dice < {u['poor_dice_below']}: {format_number(u['auroc_poor'])} ({u['poor_images']} such images)")
    groups = summary.get("by_group", {}).get("groups", {})
    if len(groups) > PRINTED_GROUPS:
        means = [scores["dice_mean"] for scores in groups.values()]
        print(f"  per {scoring.group_column}: {len(groups)} groups, mean Dice from {min(means):.4f} to "
              f"{max(means):.4f} (each in summary.json and report.html)")
    else:
        for group, scores in groups.items():
            print(f"  {scoring.group_column} {group or '(none)'}: {scores['count']} images, "
                  f"Dice mean {scores['dice_mean']:.4f}, median {scores['dice_median']:.4f}, "
                  f"pooled {scores['dice_pooled']:.4f}")
    for column, stratum in summary["strata"].items():
        print(f"  by {column}: " + ", ".join(f"{label or '(none)'} {scores['dice_mean']:.3f} ({scores['count']})"
                                             for label, scores in stratum["groups"].items()))


def format_number(value: float | None) -> str:
    """A summary figure with 3 decimals; 'undefined' for None (a NaN in summary.json)."""
    return "undefined" if value is None or math.isnan(value) else f"{value:.3f}"


def predict_and_write(models: list[LoadedCheckpoint], checkpoint_paths: list[Path], images: list[Path],
                      masks: dict[str, Path] | None, scoring: Scoring, staging: Path,
                      device: torch.device, options: Config, args: argparse.Namespace,
                      started: float, write_threads: int = WRITE_THREADS,
                      compress_level: int = PNG_COMPRESS_LEVEL, skipped: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """Predict every image into `staging` (PNGs, metrics.csv, summary.json); returns (summary, warnings).

    `write_threads` (0: inline) and `compress_level` change only the speed and PNG file sizes, not
    the pixels written; bench.py --inference compares them. `skipped` names inputs left out before
    predicting (broken links...): they lead the warnings and summary.json's problems.
    """
    rule, rule_source = decision_rule(models[0], args)
    with_spread = options.TTA or len(models) > 1  # several views or members: their disagreement is measurable
    if with_spread:
        (staging / "uncertainty").mkdir()
    unreadable: list[str] = []
    rows: list[dict] = []
    calibration = CalibrationTracker()
    predict_start = time.perf_counter()
    with OrderedJobs(write_threads) as jobs:
        for p in predict(models, images, masks, device, options, with_spread, unreadable):
            if p.mask is not None:
                calibration.update(np.clip(p.probability, 0, 1), p.mask)  # resizing back may overshoot 1 slightly
            done = jobs.submit(finish_image, p, rule, scoring, staging, compress_level)
            rows += [row for row in done if row is not None]
        rows += [row for row in jobs.finish() if row is not None]
    unscored = [] if masks is None else [f"{options.DATA_ROOT}/masks: no mask for '{p.stem}', not scored"
                                         for p in images if dataset.stem_key(p) not in masks]
    failures = [*skipped, *unreadable, *unscored]
    processed = len(images) - len(unreadable)
    seen_in_training, note = count_training_images([dataset.name_key(r["image"]) for r in rows],
                                                   checkpoint_paths, Path(options.DATA_ROOT))
    if seen_in_training:
        note = (f"{seen_in_training} of the {len(rows)} scored images were training images of this run: "
                "their scores flatter the model; use --subset test for a held-out figure")
    if note and rows:
        failures.append(note)
    summary = {"count": processed, "scored": len(rows), "subset": args.subset,
               "decision_rule": rule.to_dict(), "decision_rule_text": rule.describe(),
               "decision_rule_source": rule_source, "threshold": rule.threshold, "tta": options.TTA,
               "amp": options.AMP, "channels_last": options.CHANNELS_LAST,
               "checkpoint": str(checkpoint_paths[0]), "checkpoint_epoch": models[0].state.get("epoch"),
               "image_size": models[0].config.IMAGE_SIZE, "data_root": str(options.DATA_ROOT),
               "ensemble": [{"checkpoint": str(path), "epoch": loaded.state.get("epoch"),
                             "image_size": loaded.config.IMAGE_SIZE, "crop": loaded.config.CROP}
                            for path, loaded in zip(checkpoint_paths, models, strict=True)],
               "training_images_scored": seen_in_training, "training_overlap_note": note,
               "pixel_spacing_source": scoring.spacing_source or None,
               "uncertainty_maps": with_spread,
               "wall_seconds": time.perf_counter() - started,
               # prediction loop only: decoding, inference, resizing back, writing the PNGs, per-image scores
               "images_per_second": processed / (time.perf_counter() - predict_start), "problems": failures}
    if rows:
        size_edges = label_rows(rows, scoring)
        write_metrics(staging / "metrics.csv", rows, scoring)
        summary.update(score_summary(rows, scoring, size_edges, calibration))
    save_json(staging / "summary.json", json_ready(summary))
    return summary, failures


def label_rows(rows: list[dict], scoring: Scoring) -> list[float]:
    """Add each row's tumour-size stratum and metadata values; returns the size terciles' edges in pixels."""
    edges = size_strata(rows)
    for column, values in scoring.labels.items():
        for row in rows:
            row[column] = values[row["image"]]
    return edges


def write_metrics(path: Path, rows: list[dict], scoring: Scoring) -> None:
    """metrics.csv: one row per scored image, numbers first, then text; an undefined number is left empty."""
    columns = ["image", *(key for key in NUMBER_COLUMNS if key in rows[0]), "category", SIZE_COLUMN,
               *scoring.labels]
    table = io.StringIO()
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows({key: "" if isinstance(value, float) and math.isnan(value) else value
                      for key, value in row.items()} for row in rows)
    write_atomic(path, table.getvalue())


def score_summary(rows: list[dict], scoring: Scoring, size_edges: list[float],
                  calibration: CalibrationTracker) -> dict:
    """summary.json's scores: overall, per metric, per failure category, per group and stratum, uncertainty."""
    metrics = {key: summarise([r[key] for r in rows]) for key in NUMBER_COLUMNS if key in rows[0]}
    overall = group_scores(rows)
    summary = {
        "dice_mean": overall["dice_mean"], "dice_median": overall["dice_median"], "dice_std": metrics["dice"]["std"],
        "iou_mean": metrics["iou"]["mean"], "iou_median": metrics["iou"]["median"], "iou_std": metrics["iou"]["std"],
        "dice_pooled": overall["dice_pooled"], "iou_pooled": overall["iou_pooled"],
        "pixel_accuracy": metrics["pixel_accuracy"]["mean"],
        "dice_below_tail": TAIL_DICE, "share_dice_below_tail": float(np.mean([r["dice"] < TAIL_DICE for r in rows])),
        "share_dice_zero": float(np.mean([r["dice"] == 0 for r in rows])),
        "metrics": metrics,
        "failure_rules": [{"category": name, "rule": rule} for name, rule in FAILURE_RULES],
        "failure_counts": {name: sum(r["category"] == name for r in rows) for name, _ in FAILURE_RULES},
        "strata": {SIZE_COLUMN: {"edges_px": size_edges, "groups": scores_by_label(rows, SIZE_COLUMN, SIZE_STRATA)},
                   **{column: {"groups": scores_by_label(rows, column)} for column in scoring.strata_columns}},
        "calibration": calibration.summary(),
    }
    if scoring.group_column:
        summary["by_group"] = {"column": scoring.group_column, "groups": scores_by_label(rows, scoring.group_column)}
    if scoring.class_mix is not None:
        summary["class_mix"] = reweighted_dice(rows, *scoring.class_mix)
    if "uncertainty" in rows[0]:
        uncertainty, dice = [r["uncertainty"] for r in rows], [r["dice"] for r in rows]
        summary["uncertainty"] = {
            "region_min_probability": UNCERTAINTY_REGION_PROBABILITY,
            "spearman_with_dice": rank_correlation(uncertainty, dice),
            "poor_dice_below": POOR_MAX_DICE, "poor_images": sum(d < POOR_MAX_DICE for d in dice),
            "auroc_poor": auroc(uncertainty, [d < POOR_MAX_DICE for d in dice])}
    return summary


def reweighted_dice(rows: list[dict], column: str, weights: dict[str, float]) -> dict:
    """Mean Dice with each value of `column` weighted as in `weights` (e.g. another set's class mix).

    NaN (null in summary.json) when a weighted value has no scored image: its weight cannot be honoured.
    """
    means = {value: float(np.mean([r["dice"] for r in rows if r[column] == value] or [math.nan]))
             for value in weights}
    return {"column": column, "weights": weights, "dice_mean_by_value": means,
            "dice_mean": sum(weights[value] * means[value] for value in weights)}


def json_ready(value):
    """`value` with every NaN replaced by None (null), so summary.json is strict JSON that browsers and jq read."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def dice_by_image(folder: Path) -> dict[str, float]:
    """Each image's Dice from a prediction folder's metrics.csv; errors name the file and line."""
    path = Path(folder) / "metrics.csv"
    dice = {}
    for line, row in enumerate(report.read_metrics(path), start=2):
        try:
            value = float(row["dice"])
        except (TypeError, ValueError):
            value = math.nan
        if not 0 <= value <= 1:
            raise ValueError(f"{path}: line {line}: Dice {row['dice']!r} is not a number from 0 to 1")
        dice[row["image"]] = value
    return dice


def compare_predictions(first: Path, second: Path) -> int:
    """Print per-image Dice of two prediction folders, B minus A, with a paired Wilcoxon signed-rank test.

    Only images scored in both folders are compared. Returns the exit code: 1
    when a folder has no readable metrics.csv or they share no image.
    """
    try:
        dice_a, dice_b = dice_by_image(first), dice_by_image(second)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    shared = sorted(set(dice_a) & set(dice_b))
    if not shared:
        print(f"error: {first} and {second} share no scored image; compare predictions of the same images",
              file=sys.stderr)
        return 1
    differences = np.array([dice_b[name] - dice_a[name] for name in shared])
    width = max(12, *(len(name) for name in shared)) + 2
    print(f"A = {first}\nB = {second}\nper-image Dice, most worsened first:")
    print(f"  {'image':<{width}}{'A':>8}{'B':>8}{'B - A':>9}")
    for index in np.argsort(differences, kind="stable"):
        name = shared[index]
        print(f"  {name:<{width}}{dice_a[name]:>8.4f}{dice_b[name]:>8.4f}{differences[index]:>+9.4f}")
    only_a, only_b = len(set(dice_a) - set(dice_b)), len(set(dice_b) - set(dice_a))
    print(f"\n{len(shared)} images in both" + (f" ({only_a} only in A, {only_b} only in B: left out)"
                                              if only_a or only_b else ""))
    print(describe_paired_comparison(paired_comparison(differences)))
    return 0


def save_png(path: Path, pixels: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> None:
    """Write a uint8 array as PNG; a write error names the file (a full disk says so)."""
    try:
        Image.fromarray(pixels).save(path, compress_level=compress_level)
    except OSError as error:
        raise OutputError(describe_write_error(path, error)) from error


def finish_image(p: Prediction, rule: DecisionRule, scoring: Scoring, staging: Path,
                 compress_level: int) -> dict | None:
    """Threshold one prediction, write its PNGs into `staging` and score it: its metrics.csv row, None unscored."""
    predicted = rule.apply(p.probability)
    save_png(staging / "masks" / f"{p.stem}.png", predicted.astype(np.uint8) * 255, compress_level)
    save_png(staging / "segmented" / f"{p.stem}.png", np.where(predicted[..., None], p.image, 0), compress_level)
    save_png(staging / "overlays" / f"{p.stem}.png", overlay(p.image, predicted, p.mask), compress_level)
    if p.spread is not None:
        save_png(staging / "uncertainty" / f"{p.stem}.png", heat_colours(p.spread), compress_level)
    if p.mask is None:
        return None
    spacing = None if scoring.spacing is None else scoring.spacing[p.stem]
    row = {"image": p.stem, **per_image_report(predicted, p.mask, spacing)}
    if p.spread is not None:
        row["uncertainty"] = region_uncertainty(p.spread, p.probability)
    return row


class OrderedJobs:
    """Runs jobs on `threads` background threads (inline with 0) and hands their results back in submission order.

    test.py finishes each image (PNG encoding, scoring) here while the main
    thread decodes and predicts the next ones: zlib, scipy and NumPy release
    the GIL. A job's exception (an OutputError) is raised from a later `submit`
    or from `finish`; leaving the `with` block (done, failed or Ctrl-C) waits
    for the jobs under way and drops queued ones, so no file lands after the
    staging folder is removed.
    """

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="finish") if threads else None
        self.limit = 4 * threads  # queued images held in memory at most
        self.pending: deque[Future] = deque()

    def __enter__(self) -> OrderedJobs:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, job, *args) -> list:
        """Queue `job(*args)`; returns the results of the jobs finished by now, oldest first."""
        if self.pool is None:
            return [job(*args)]
        self.pending.append(self.pool.submit(job, *args))
        results = []
        while self.pending and (len(self.pending) > self.limit or self.pending[0].done()):
            results.append(self.pending.popleft().result())  # re-raises the job's OutputError here
        return results

    def finish(self) -> list:
        """Wait for every queued job; their results, oldest first."""
        results = []
        while self.pending:
            results.append(self.pending.popleft().result())
        return results


if __name__ == "__main__":
    sys.exit(main())
