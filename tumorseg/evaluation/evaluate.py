"""One test.py evaluation: predict every image, write and score each one, and summarise the run in summary.json.

Ties the pieces together: `predict.predict` gives probability maps, the
decision rule turns them into masks, `outputs` writes the PNGs, `scoring`
scores and aggregates, `runfolder` tells which images the run trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import Config
from metrics import Spacing
from tumorseg.data import reading
from tumorseg.data import volumes
from tumorseg.evaluation.calibration import CalibrationTracker
from tumorseg.evaluation.image_report import volume_report
from tumorseg.evaluation.scoring import (Scoring, label_rows, metadata_column, score_image, score_summary, type_classification,
                     type_columns, write_metrics, write_volume_table)
from tumorseg.evaluation.stats import summarise
from tumorseg.files import json_ready, save_json
from tumorseg.inference import predict
from tumorseg.inference.outputs import (PNG_COMPRESS_LEVEL, WRITE_THREADS, OrderedJobs, slice_has_pngs,
                                        write_image_outputs)
from tumorseg.inference.postprocess import DecisionRule
from tumorseg.runs.checkpoints import LoadedCheckpoint
from tumorseg.runs.runfolder import count_training_images, split_group_column


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


def finish_image(p: predict.Prediction, rule: DecisionRule, scoring: Scoring, staging: Path,
                 compress_level: int) -> dict | None:
    """Threshold one prediction, write its PNGs into `staging` and score it: its metrics.csv row, None unscored."""
    spacing = None if scoring.spacing is None else scoring.spacing[p.stem]
    return write_and_score(p, rule.apply(p.probability), staging, compress_level, spacing)


def write_and_score(p: predict.Prediction, predicted: np.ndarray, staging: Path, compress_level: int,
                    spacing: Spacing | None, columns: dict | None = None, pngs: bool = True) -> dict | None:
    """Write one thresholded prediction's PNGs (when `pngs`) and score it: its metrics.csv row (plus
    `columns`), None unscored."""
    if pngs:
        write_image_outputs(staging, p.stem, p.image, predicted, p.mask, p.spread, compress_level)
    if p.mask is None:
        return None
    row = {**score_image(p.stem, predicted, p.mask, p.probability, p.spread, spacing), **(columns or {})}
    return row if p.types is None else {**row, **type_columns(p.types)}


@dataclass
class VolumeInputs:
    """The volumes of a test.py run and how to cut them."""

    entries: Sequence[volumes.VolumeEntry] = ()
    axis: str = "auto"  # "auto" (SLICE_AXIS_RULE) or an array axis "0", "1", "2"


@dataclass
class Scored:
    """What predicting gives: metrics.csv rows (images and volume slices), calibration, volumes.csv rows."""

    rows: list[dict]
    calibration: CalibrationTracker
    volume_rows: list[dict]
    volume_problems: list[str]  # volumes that could not be read, each named with the problem


def predict_and_score(models: list[LoadedCheckpoint], images: list[Path], masks: dict[str, Path] | None,
                      rule: DecisionRule, scoring: Scoring, staging: Path, device: torch.device, options: Config,
                      with_spread: bool, unreadable: list[str], write_threads: int,
                      compress_level: int, volume_inputs: VolumeInputs = VolumeInputs()) -> Scored:
    """Predict every image, then every volume, finishing each on the writing threads; unreadable images are
    named in `unreadable`, unreadable volumes in the result's `volume_problems`, and skipped."""
    rows: list[dict] = []
    calibration = CalibrationTracker()
    volume_rows, volume_problems = [], []
    with OrderedJobs(write_threads) as jobs:
        for p in predict.predict(models, images, masks, device, options, with_spread, unreadable):
            if p.mask is not None:
                calibration.update(np.clip(p.probability, 0, 1), p.mask)  # resizing back may overshoot 1 slightly
            done = jobs.submit(finish_image, p, rule, scoring, staging, compress_level)
            rows += [row for row in done if row is not None]
        for entry in volume_inputs.entries:
            try:
                volume_row, done = predict_volume(models, entry, volume_inputs.axis, rule, staging, device, options,
                                                  with_spread, calibration, jobs, compress_level)
            except volumes.VolumeError as error:
                volume_problems.append(f"skipped, {error}")  # the error names the file
                continue
            volume_rows.append(volume_row)
            rows += [row for row in done if row is not None]
        rows += [row for row in jobs.finish() if row is not None]
    return Scored(rows, calibration, volume_rows, volume_problems)


SLICE_AXIS_RULE = "the axis with the fewest voxels (ties: the coarser spacing, then the last)"


def predict_volume(models: list[LoadedCheckpoint], entry: volumes.VolumeEntry, axis_option: str,
                   rule: DecisionRule, staging: Path, device: torch.device, options: Config,
                   with_spread: bool, calibration: CalibrationTracker, jobs: OrderedJobs,
                   compress_level: int) -> tuple[dict, list[dict | None]]:
    """Predict a volume slice by slice, write its mask volume (NIfTI, the input's affine) and score it.

    Each slice is windowed as `prepare_data.py nifti` windows it, then
    prepared like any image. With a mask volume, every slice is scored as an
    image is (a metrics.csv row; mm from the header's row and column spacing),
    and the volume in 3-D (every voxel once, distances in mm). Only slices with
    tumour in the mask or the prediction get the usual PNGs (`slice_has_pngs`).
    Returns its volumes.csv row, and the writing jobs' results that finished
    meanwhile (this volume's slice rows, or earlier images'). Raises
    VolumeError naming the file when it cannot be read.
    """
    volume = volumes.read_volume(entry.path)
    truth = None if entry.mask is None else volumes.read_mask_volume(entry.mask, volume)
    axis = volumes.thinnest_axis(volume) if axis_option == "auto" else int(axis_option)
    channels = predict.input_channels(models)
    truths = None if truth is None else list(volumes.slices_along(truth, axis))
    items = ((volumes.slice_name(entry.stem, axis, index), predict.grey_as_channels(grey, channels),
              None if truths is None else truths[index])
             for index, grey in enumerate(volumes.slices_along(volumes.window_to_uint8(volume.data), axis)))
    spacing = volumes.slice_spacing(volume, axis)
    predicted_slices, finished = [], []
    for index, p in enumerate(predict.predict_decoded(models, items, device, options, with_spread)):
        predicted = rule.apply(p.probability)
        predicted_slices.append(predicted)
        pngs = slice_has_pngs(0 if p.mask is None else int(p.mask.sum()), int(predicted.sum()))
        if not (pngs or p.mask is not None):
            continue  # nothing to write, nothing to score
        if p.mask is not None:
            calibration.update(np.clip(p.probability, 0, 1), p.mask)
        columns = {"volume": entry.stem, "slice_axis": axis, "slice_index": index}
        finished += jobs.submit(write_and_score, p, predicted, staging, compress_level, spacing, columns, pngs)
    predicted_volume = volumes.stack_along(predicted_slices, axis).astype(np.uint8)
    volumes.write_mask_like(staging / "masks" / f"{entry.stem}.nii.gz", predicted_volume, volume)
    row = {"volume": entry.stem, "source": str(entry.path), "shape": "x".join(map(str, volume.data.shape)),
           "spacing_mm": "x".join(f"{value:g}" for value in volume.spacing), "slice_axis": axis,
           "slices": volume.data.shape[axis], "slices_with_tumour_predicted": int(predicted_volume.any(
               axis=tuple(a for a in range(3) if a != axis)).sum())}
    if truth is not None:
        row.update(volume_report(predicted_volume.astype(bool), truth.astype(bool), volume.spacing))
    return row, finished


def training_overlap(rows: list[dict], checkpoint_paths: list[Path], data_root: Path) -> tuple[int | None, str]:
    """How many scored images the runs trained on, and a note for the problems ("" when there is nothing to say)."""
    seen_in_training, note = count_training_images([reading.name_key(r["image"]) for r in rows],
                                                   checkpoint_paths, data_root)
    if seen_in_training:
        note = (f"{seen_in_training} of the {len(rows)} scored images were training images of this run: "
                "their scores flatter the model; use --subset test for a held-out figure")
    return seen_in_training, note


def type_summary(rows: list[dict], loaded: LoadedCheckpoint, checkpoint_path: Path, images: list[Path],
                 data_root: Path) -> dict | None:
    """summary.json's type_classification for a checkpoint with a TypeHead, per image and per patient (the run's
    split group column); None without a head or where data_root/metadata.csv lacks the head's column."""
    classes = predict.head_classes([loaded])
    column = loaded.config.TYPE_COLUMN
    if not classes or not column:
        return None
    try:
        truth = metadata_column(data_root, column, images, "the type head")
    except (FileNotFoundError, ValueError):
        return None  # nothing to score the head against: metrics.csv still has its answers
    group_column = split_group_column(checkpoint_path)
    try:
        groups = metadata_column(data_root, group_column, images, "the split group column") if group_column else None
    except (FileNotFoundError, ValueError):
        groups = None
    return type_classification(rows, column, truth, classes, group_column if groups else "", groups)


def predict_and_write(models: list[LoadedCheckpoint], checkpoint_paths: list[Path], images: list[Path],
                      masks: dict[str, Path] | None, scoring: Scoring, staging: Path,
                      device: torch.device, options: Config, args: argparse.Namespace,
                      started: float, write_threads: int = WRITE_THREADS,
                      compress_level: int = PNG_COMPRESS_LEVEL, skipped: Sequence[str] = (),
                      volume_inputs: VolumeInputs = VolumeInputs()) -> tuple[dict, list[str]]:
    """Predict every image into `staging` (PNGs, metrics.csv, summary.json); returns (summary, warnings).

    `write_threads` (0: inline) and `compress_level` change only the speed and PNG file sizes, not
    the pixels written; bench.py --inference compares them. `skipped` names inputs left out before
    predicting (broken links...): they lead the warnings and summary.json's problems. `volume_inputs`'
    volumes follow the images: a NIfTI mask each under masks/, their slices in metrics.csv, volumes.csv.
    """
    rule, rule_source = decision_rule(models[0], args)
    with_spread = options.TTA or len(models) > 1  # several views or members: their disagreement is measurable
    if with_spread:
        (staging / "uncertainty").mkdir()
    unreadable: list[str] = []
    predict_start = time.perf_counter()
    scored = predict_and_score(models, images, masks, rule, scoring, staging, device, options, with_spread,
                               unreadable, write_threads, compress_level, volume_inputs)
    rows, calibration = scored.rows, scored.calibration
    unscored = [] if masks is None else [f"{options.DATA_ROOT}/masks: no mask for '{p.stem}', not scored"
                                         for p in images if reading.stem_key(p) not in masks]
    unscored += [f"{options.DATA_ROOT}/masks: no mask volume for '{entry.stem}', not scored"
                 for entry in volume_inputs.entries if entry.mask is None]
    failures = [*skipped, *unreadable, *scored.volume_problems, *unscored]
    processed = len(images) - len(unreadable)
    seen_in_training, note = training_overlap(rows, checkpoint_paths, Path(options.DATA_ROOT))
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
               # prediction loop only: decoding, inference, resizing back, writing the PNGs, per-image scores;
               # a volume's slices count as images
               "images_per_second": (processed + sum(row["slices"] for row in scored.volume_rows))
               / (time.perf_counter() - predict_start), "problems": failures}
    if rows:
        size_edges = label_rows(rows, scoring)
        write_metrics(staging / "metrics.csv", rows, scoring)
        summary.update(score_summary(rows, scoring, size_edges, calibration))
        types = type_summary(rows, models[0], checkpoint_paths[0], images, Path(options.DATA_ROOT))
        if types is not None:
            summary["type_classification"] = types
    if volume_inputs.entries:
        summary["volumes"] = volume_summary(scored.volume_rows, len(volume_inputs.entries), volume_inputs.axis)
        if scored.volume_rows:
            write_volume_table(staging / "volumes.csv", scored.volume_rows)
    save_json(staging / "summary.json", json_ready(summary))
    return summary, failures


def volume_summary(volume_rows: list[dict], count: int, axis: str) -> dict:
    """summary.json's `volumes`: how they were cut, per-volume 3-D scores and their means and medians."""
    scored = [row for row in volume_rows if "dice" in row]
    summary = {"count": len(volume_rows), "of": count, "scored": len(scored),
               "slice_axis": SLICE_AXIS_RULE if axis == "auto" else f"array axis {axis} (--slice-axis)",
               "scores": "3-D per volume: every voxel counts once, HD95 and ASSD in mm over the 3-D surfaces "
                         "from the header's voxel size; metrics.csv scores every slice of a volume with a mask "
                         "as an image (tumour-free slices in the 'no tumour' stratum), volumes.csv the whole "
                         "volumes; PNGs only of slices with tumour in the mask or the prediction",
               "per_volume": volume_rows}
    for key in ("dice", "hd95_mm", "assd_mm"):
        if scored:
            values = summarise([row[key] for row in scored])
            summary[f"{key}_mean"], summary[f"{key}_median"] = values["mean"], values["median"]
    return summary
