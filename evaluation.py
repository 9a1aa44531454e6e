"""One test.py evaluation: predict every image, write and score each one, and summarise the run in summary.json.

Ties the pieces together: `inference.predict` gives probability maps, the
decision rule turns them into masks, `outputs` writes the PNGs, `scoring`
scores and aggregates, `runfolder` tells which images the run trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import dataset
import inference
from config import Config
from metrics import CalibrationTracker
from outputs import PNG_COMPRESS_LEVEL, WRITE_THREADS, OrderedJobs, write_image_outputs
from postprocess import DecisionRule
from runfolder import count_training_images, split_group_column
from scoring import (Scoring, label_rows, metadata_column, score_image, score_summary, type_classification,
                     type_columns, write_metrics)
from utils import LoadedCheckpoint, json_ready, save_json


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


def finish_image(p: inference.Prediction, rule: DecisionRule, scoring: Scoring, staging: Path,
                 compress_level: int) -> dict | None:
    """Threshold one prediction, write its PNGs into `staging` and score it: its metrics.csv row, None unscored."""
    predicted = rule.apply(p.probability)
    write_image_outputs(staging, p.stem, p.image, predicted, p.mask, p.spread, compress_level)
    if p.mask is None:
        return None
    row = score_image(p.stem, predicted, p.mask, p.probability, p.spread, scoring)
    return row if p.types is None else {**row, **type_columns(p.types)}


def predict_and_score(models: list[LoadedCheckpoint], images: list[Path], masks: dict[str, Path] | None,
                      rule: DecisionRule, scoring: Scoring, staging: Path, device: torch.device, options: Config,
                      with_spread: bool, unreadable: list[str], write_threads: int,
                      compress_level: int) -> tuple[list[dict], CalibrationTracker]:
    """Predict every image and finish it on the writing threads: the scored images' rows, and their calibration."""
    rows: list[dict] = []
    calibration = CalibrationTracker()
    with OrderedJobs(write_threads) as jobs:
        for p in inference.predict(models, images, masks, device, options, with_spread, unreadable):
            if p.mask is not None:
                calibration.update(np.clip(p.probability, 0, 1), p.mask)  # resizing back may overshoot 1 slightly
            done = jobs.submit(finish_image, p, rule, scoring, staging, compress_level)
            rows += [row for row in done if row is not None]
        rows += [row for row in jobs.finish() if row is not None]
    return rows, calibration


def training_overlap(rows: list[dict], checkpoint_paths: list[Path], data_root: Path) -> tuple[int | None, str]:
    """How many scored images the runs trained on, and a note for the problems ("" when there is nothing to say)."""
    seen_in_training, note = count_training_images([dataset.name_key(r["image"]) for r in rows],
                                                   checkpoint_paths, data_root)
    if seen_in_training:
        note = (f"{seen_in_training} of the {len(rows)} scored images were training images of this run: "
                "their scores flatter the model; use --subset test for a held-out figure")
    return seen_in_training, note


def type_summary(rows: list[dict], loaded: LoadedCheckpoint, checkpoint_path: Path, images: list[Path],
                 data_root: Path) -> dict | None:
    """summary.json's type_classification for a checkpoint with a TypeHead, per image and per patient (the run's
    split group column); None without a head or where data_root/metadata.csv lacks the head's column."""
    classes = inference.head_classes([loaded])
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
    predict_start = time.perf_counter()
    rows, calibration = predict_and_score(models, images, masks, rule, scoring, staging, device, options,
                                          with_spread, unreadable, write_threads, compress_level)
    unscored = [] if masks is None else [f"{options.DATA_ROOT}/masks: no mask for '{p.stem}', not scored"
                                         for p in images if dataset.stem_key(p) not in masks]
    failures = [*skipped, *unreadable, *unscored]
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
               # prediction loop only: decoding, inference, resizing back, writing the PNGs, per-image scores
               "images_per_second": processed / (time.perf_counter() - predict_start), "problems": failures}
    if rows:
        size_edges = label_rows(rows, scoring)
        write_metrics(staging / "metrics.csv", rows, scoring)
        summary.update(score_summary(rows, scoring, size_edges, calibration))
        types = type_summary(rows, models[0], checkpoint_paths[0], images, Path(options.DATA_ROOT))
        if types is not None:
            summary["type_classification"] = types
    save_json(staging / "summary.json", json_ready(summary))
    return summary, failures
