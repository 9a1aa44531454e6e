"""Predict tumour masks with a trained checkpoint; score them where ground truth exists.

    python test.py                                        # best.pt of the newest run, on DATA_ROOT
    python test.py --checkpoint runs/x/best.pt --data-root path/to/folder --threshold 0.4
    python test.py --data-root DATA --subset val          # only the patients the run held out
    python test.py --data-root DATA --group-by tumor_class  # also scores per metadata.csv value

The folder needs `images/` (any sizes); with `masks/` each image is also
scored against its mask at the image's own resolution. The model runs at the
size it was trained at, as rebuilt from the config inside the checkpoint; its
probability map is resized back to each image before thresholding.

Writes PREDICTION_ROOT/<run name>/: masks/, segmented/, overlays/ (PNG per
image), metrics.csv and summary.json. Exit code 0 when every image was
processed, 1 on a fatal error, 2 when some images could not be read.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dataset
from config import Config, build_parser, config_from_args
from inference import native_probabilities
from metrics import MetricTracker
from postprocess import DecisionRule
from utils import (CheckpointError, LoadedCheckpoint, OutputError, describe_write_error, load_checkpoint, pick_device,
                   remove_stale_staging, save_json, staging_name, tolerant_console, write_atomic)

PREDICTION_COLOUR = np.array([255, 40, 40], np.float32)  # red fill, semi-transparent
TRUTH_COLOUR = np.array([40, 255, 40], np.uint8)  # green outline
OVERLAY_ALPHA = 0.4
OUTPUT_FOLDERS = ("masks", "segmented", "overlays")
# The only config keys inference uses; training keys (size, channels...) come from the checkpoint.
INFERENCE_KEYS = ("DATA_ROOT", "RUNS_DIR", "PREDICTION_ROOT", "BATCH_SIZE", "DEVICE", "THRESHOLD", "TTA")
METRIC_COLUMNS = ["image", "dice", "iou", "pixel_accuracy", "gt_pixels", "pred_pixels"]


@dataclass
class Prediction:
    """One image's probability map at its own resolution, with the decoded image and optional mask."""

    stem: str
    image: np.ndarray  # uint8 (H, W, 3) for display
    probability: np.ndarray  # float32 (H, W)
    mask: np.ndarray | None  # uint8 {0, 1} (H, W), None without ground truth


def newest_checkpoint(runs_dir: Path) -> Path:
    """best.pt of the most recently written run under runs_dir."""
    candidates = sorted(Path(runs_dir).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"{runs_dir}: no run with a best.pt; train first or pass --checkpoint")
    return candidates[-1]


def find_images(data_root: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """Images under data_root/images, and masks by stem when data_root/masks exists."""
    image_dir = Path(data_root) / "images"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: folder of images to predict is missing")
    by_stem = dataset.files_by_stem(image_dir)
    if not by_stem:
        raise FileNotFoundError(f"{image_dir}: no {'/'.join(dataset.IMAGE_EXTENSIONS)} images")
    shared = sorted(stem for stem, files in by_stem.items() if len(files) > 1)
    if shared:  # their outputs would overwrite each other
        raise ValueError(f"{image_dir}: several images share the stem(s) {', '.join(shared)}")
    images = [files[0] for _, files in sorted(by_stem.items())]
    mask_dir = Path(data_root) / "masks"
    if not mask_dir.is_dir():
        return images, None
    return images, {stem: files[0] for stem, files in dataset.files_by_stem(mask_dir).items()}


def validation_images(images: list[Path], split_path: Path) -> list[Path]:
    """The images whose stems the run's split.json put on the validation side."""
    try:
        val = set(json.loads(Path(split_path).read_text())["val"])
    except (OSError, ValueError, KeyError) as error:
        raise FileNotFoundError(f"{split_path}: cannot read the run's validation split ({error})") from error
    chosen = [p for p in images if dataset.stem_key(p) in val]
    if not chosen:
        raise ValueError(f"{split_path}: none of its {len(val)} validation images is in this folder")
    return chosen


def image_groups(data_root: Path, column: str, images: list[Path]) -> dict[str, str]:
    """Each image's value in metadata.csv's `column` ("" when its row is missing), for per-group scores."""
    path = Path(data_root) / dataset.METADATA_FILE
    try:
        columns, rows = dataset.read_metadata(Path(data_root))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{path}: cannot read it for --group-by ({error})") from error
    if column not in columns:
        raise ValueError(f"{path}: no column '{column}' for --group-by (columns: {', '.join(columns)})")
    return {p.stem: rows.get(dataset.stem_key(p), {}).get(column, "") for p in images}


def scores_by_group(rows: list[dict], groups: dict[str, str]) -> dict[str, dict[str, float]]:
    """Count, mean and median Dice and mean IoU of the scored images, per group."""
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        by_group.setdefault(groups[row["image"]], []).append(row)
    return {group: {"count": len(members),
                    "dice_mean": float(np.mean([r["dice"] for r in members])),
                    "dice_median": statistics.median(r["dice"] for r in members),
                    "iou_mean": float(np.mean([r["iou"] for r in members]))}
            for group, members in sorted(by_group.items())}


def predict(models: list[LoadedCheckpoint], images: list[Path], masks: dict[str, Path] | None,
            device: torch.device, batch_size: int, tta: bool, unreadable: list[str]) -> Iterator[Prediction]:
    """Yield a Prediction per readable image: the mean probability of `models`, each run as it was trained.

    Unreadable files are named in `unreadable` and skipped.
    """
    channels = sorted({3, *(loaded.config.IN_CHANNELS for loaded in models)})
    batch: list[tuple[Path, dict[int, np.ndarray], np.ndarray | None]] = []

    def run(batch):
        total = [np.zeros(decoded[3].shape[:2], np.float32) for _, decoded, _ in batch]
        for loaded in models:
            inputs = [decoded[loaded.config.IN_CHANNELS] for _, decoded, _ in batch]
            for sum_map, probability in zip(total, native_probabilities(loaded.model, loaded.config, inputs,
                                                                         device, tta), strict=True):
                sum_map += probability
        for (path, decoded, mask), sum_map in zip(batch, total, strict=True):
            yield Prediction(path.stem, decoded[3], sum_map / len(models), mask)

    for path in tqdm(images, desc="predict", dynamic_ncols=True):
        try:
            # decoded once per channel count: RGB for display, and as each model was trained
            decoded = {c: dataset.read_image(path, c) for c in channels}
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
        if len(batch) == batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


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
    out = image.astype(np.float32)
    out[predicted] = (1 - OVERLAY_ALPHA) * out[predicted] + OVERLAY_ALPHA * PREDICTION_COLOUR
    out = out.round().astype(np.uint8)
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
    tolerant_console()
    parser = build_parser(__doc__, keys=INFERENCE_KEYS)
    parser.add_argument("--checkpoint", type=Path, nargs="+",
                        help="checkpoint(s) to use (default: best.pt of the newest run); several are an ensemble: "
                             "their probabilities are averaged and the first one's decision rule applies")
    parser.add_argument("--postprocess", choices=("checkpoint", "none"), default="checkpoint",
                        help="'checkpoint': the threshold and component rules train.py chose on validation; "
                             "'none': threshold only")
    parser.add_argument("--subset", choices=("all", "val"), default="all",
                        help="'val': only the images the checkpoint's run held out (its split.json)")
    parser.add_argument("--group-by", metavar="COLUMN",
                        help="also report scores per value of this metadata.csv column (e.g. tumor_class)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace PREDICTION_ROOT/<run name>/ instead of writing a fresh <run name>-N/")
    args = parser.parse_args(argv)
    options = config_from_args(parser, args)  # the command line's inference settings
    started = time.perf_counter()

    try:
        device = pick_device(options.DEVICE)
        checkpoint_paths = args.checkpoint or [newest_checkpoint(Path(options.RUNS_DIR))]
        models = [load_checkpoint(path, device) for path in checkpoint_paths]
        images, masks = find_images(Path(options.DATA_ROOT))
        if args.subset == "val":
            for path in checkpoint_paths:  # held out by every member of an ensemble
                images = validation_images(images, path.resolve().parent / "split.json")
        groups = image_groups(Path(options.DATA_ROOT), args.group_by, images) if args.group_by else None
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
    for path, loaded in zip(checkpoint_paths, models, strict=True):
        for warning in loaded.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        trained = loaded.config  # the checkpoint's own config: how the model was trained
        print(f"checkpoint: {path} (epoch {loaded.state.get('epoch')}, {trained.MODEL} trained at "
              f"{trained.IMAGE_SIZE} px{', head crop' if trained.CROP else ''}, {trained.IN_CHANNELS} channel(s), "
              f"{trained.NORMALIZATION})")
    print(f"images:     {len(images)} from {options.DATA_ROOT}" + ("" if masks is not None else " (predict only)"))

    try:
        summary, failures = predict_and_write(models, checkpoint_paths, images, masks, groups, staging, device,
                                              options, args, started)
        out_dir = publish(staging, Path(options.PREDICTION_ROOT), name, args.overwrite)
    except KeyboardInterrupt:
        shutil.rmtree(staging, ignore_errors=True)
        print("\ninterrupted (Ctrl-C): nothing was written; earlier predictions are untouched", file=sys.stderr)
        return 130
    except (OutputError, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = str(error) if isinstance(error, OutputError) else describe_write_error(staging, error)
        print(f"error: {reason}\nnothing was written; earlier predictions are untouched", file=sys.stderr)
        return 1

    print(f"\n{'images processed':<18}{summary['count']}\n{'scored':<18}{summary['scored']}\n"
          f"{'decision rule':<18}{summary['decision_rule_text']} ({summary['decision_rule_source']})")
    if summary["scored"]:
        for key in ("dice_mean", "dice_median", "dice_pooled", "iou_mean", "pixel_accuracy"):
            print(f"{key:<18}{summary[key]:.4f}")
        for group, scores in summary.get("by_group", {}).get("groups", {}).items():
            print(f"  {args.group_by} {group or '(none)'}: {scores['count']} images, "
                  f"Dice mean {scores['dice_mean']:.4f}, median {scores['dice_median']:.4f}")
    print(f"{'images/s':<18}{summary['images_per_second']:.1f}\n{'outputs':<18}{out_dir}")
    for failure in failures:
        print(f"warning: {failure}", file=sys.stderr)
    return 2 if summary["count"] < len(images) else 0


def predict_and_write(models: list[LoadedCheckpoint], checkpoint_paths: list[Path], images: list[Path],
                      masks: dict[str, Path] | None, groups: dict[str, str] | None, staging: Path,
                      device: torch.device, options: Config, args: argparse.Namespace,
                      started: float) -> tuple[dict, list[str]]:
    """Predict every image into `staging` (PNGs, metrics.csv, summary.json); returns (summary, warnings)."""
    rule, rule_source = decision_rule(models[0], args)
    unreadable: list[str] = []
    tracker, rows = MetricTracker(), []
    predict_start = time.perf_counter()
    for p in predict(models, images, masks, device, options.BATCH_SIZE, options.TTA, unreadable):
        predicted = rule.apply(p.probability)
        save_png(staging / "masks" / f"{p.stem}.png", predicted.astype(np.uint8) * 255)
        save_png(staging / "segmented" / f"{p.stem}.png", np.where(predicted[..., None], p.image, 0))
        save_png(staging / "overlays" / f"{p.stem}.png", overlay(p.image, predicted, p.mask))
        if p.mask is not None:
            tracker.update(predicted[None], p.mask[None])
            rows.append({"image": p.stem, "dice": tracker.dice[-1], "iou": tracker.iou[-1],
                         "pixel_accuracy": tracker.pixel_accuracy[-1], "gt_pixels": int(p.mask.sum()),
                         "pred_pixels": int(predicted.sum())})
    unscored = [] if masks is None else [f"{options.DATA_ROOT}/masks: no mask for '{p.stem}', not scored"
                                         for p in images if p.stem not in masks]
    failures = unreadable + unscored
    processed = len(images) - len(unreadable)
    seen_in_training, note = count_training_images([dataset.stem_key(Path(r["image"])) for r in rows],
                                                   checkpoint_paths, Path(options.DATA_ROOT))
    if seen_in_training:
        note = (f"{seen_in_training} of the {len(rows)} scored images were training images of this run: "
                "their scores flatter the model; use --subset val for a held-out figure")
    if note and rows:
        failures.append(note)
    summary = {"count": processed, "scored": len(rows), "subset": args.subset,
               "decision_rule": rule.to_dict(), "decision_rule_text": rule.describe(),
               "decision_rule_source": rule_source, "threshold": rule.threshold, "tta": options.TTA,
               "checkpoint": str(checkpoint_paths[0]), "checkpoint_epoch": models[0].state.get("epoch"),
               "image_size": models[0].config.IMAGE_SIZE, "data_root": str(options.DATA_ROOT),
               "ensemble": [{"checkpoint": str(path), "epoch": loaded.state.get("epoch"),
                             "image_size": loaded.config.IMAGE_SIZE, "crop": loaded.config.CROP}
                            for path, loaded in zip(checkpoint_paths, models, strict=True)],
               "training_images_scored": seen_in_training, "training_overlap_note": note,
               "wall_seconds": time.perf_counter() - started,
               # prediction loop only: decoding, inference, resizing back and writing the PNGs
               "images_per_second": processed / (time.perf_counter() - predict_start), "problems": failures}
    if rows:
        table = io.StringIO()
        writer = csv.DictWriter(table, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(staging / "metrics.csv", table.getvalue())
        overall = tracker.summary()
        dice, iou = [r["dice"] for r in rows], [r["iou"] for r in rows]
        summary.update({
            "dice_mean": overall["dice"], "dice_median": statistics.median(dice), "dice_std": float(np.std(dice)),
            "iou_mean": overall["iou"], "iou_median": statistics.median(iou), "iou_std": float(np.std(iou)),
            "dice_pooled": overall["dice_pooled"], "iou_pooled": overall["iou_pooled"],
            "pixel_accuracy": overall["pixel_accuracy"]})
        if groups is not None:
            summary["by_group"] = {"column": args.group_by, "groups": scores_by_group(rows, groups)}
    save_json(staging / "summary.json", summary)
    return summary, failures


def save_png(path: Path, pixels: np.ndarray) -> None:
    """Write a uint8 array as PNG; a write error names the file (a full disk says so)."""
    try:
        Image.fromarray(pixels).save(path)
    except OSError as error:
        raise OutputError(describe_write_error(path, error)) from error


if __name__ == "__main__":
    sys.exit(main())
