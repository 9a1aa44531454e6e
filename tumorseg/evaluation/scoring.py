"""Scoring predictions: what to group and stratify by, each image's metrics.csv row, and summary.json's scores.

`settle_scoring` reads metadata.csv and the pixel spacing once, before
predicting; `score_image` gives one image's row; `score_summary` aggregates
the rows (overall, per group and stratum, calibration, uncertainty), and
`print_summary` shows its main figures on the console. `write_metrics`
writes metrics.csv; `read_metrics` and `parse_metric` read it back.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metrics import Spacing, pooled_scores
from tumorseg.data import reading
from tumorseg.data.spacing import SPACING_FORM, format_spacing, parse_spacing
from tumorseg.evaluation.calibration import CalibrationTracker
from tumorseg.evaluation.failures import FAILURE_RULES, POOR_MAX_DICE
from tumorseg.evaluation.image_report import per_image_report
from tumorseg.evaluation.stats import auroc, classification_scores, rank_correlation, summarise
from tumorseg.evaluation.uncertainty import UNCERTAINTY_REGION_PROBABILITY, region_uncertainty
from tumorseg.files import write_atomic
from tumorseg.runs.runfolder import split_group_column

# metrics.csv's numeric columns, in order; those an image lacks (mm without a spacing, uncertainty
# without TTA or an ensemble) are left out. Text columns follow: category, tumour_size, metadata.
NUMBER_COLUMNS = ("dice", "iou", "pixel_accuracy", "precision", "sensitivity", "hd95_px", "assd_px", "hd95_mm",
                  "assd_mm", "pred_components", "true_components", "gt_pixels", "pred_pixels", "overlap_pixels",
                  "uncertainty")
SIZE_COLUMN = "tumour_size"
VOLUME_COLUMNS = ("volume", "slice_axis", "slice_index")  # metrics.csv: which volume a slice row comes from
VOLUME_TABLE_COLUMNS = ("volume", "dice", "iou", "precision", "sensitivity", "hd95_mm", "assd_mm", "gt_voxels",
                        "pred_voxels", "overlap_voxels", "slice_axis", "slices", "slices_with_tumour_predicted",
                        "shape", "spacing_mm", "source")
# A TypeHead's answer per image (checkpoints trained with TYPE_COLUMN): its most probable class and that probability.
TYPE_COLUMNS = ("predicted_type", "type_probability")
PATIENT_VOTE = ("majority of the patient's slices' predicted types; a tie goes to the tied type whose votes carry "
                "the larger summed probability")
SIZE_STRATA = ("small", "medium", "large", "no tumour")  # terciles of the true tumour area, then empty masks
NO_TUMOUR = SIZE_STRATA[-1]  # images (and volume slices) whose mask is empty: any predicted pixel is a false alarm
TAIL_DICE = 0.3  # summary.json and the console give the share of images scoring below this Dice


@dataclass
class Scoring:
    """How scores are grouped and measured, settled from the options and metadata.csv before predicting."""

    group_column: str  # per-group scores by this metadata column; "" = none
    strata_columns: list[str]  # per-stratum scores by these metadata columns (tumour size always)
    labels: dict[str, dict[str, str]]  # metadata column -> image stem -> value
    spacing: dict[str, Spacing] | None  # image stem -> pixel size in mm; None = distances in pixels only
    spacing_source: str  # where the spacing came from, for summary.json
    class_mix: tuple[str, dict[str, float]] | None  # --class-mix: column and each value's weight


def metadata_column(data_root: Path, column: str, images: list[Path], option: str) -> dict[str, str]:
    """Each image's value in metadata.csv's `column` ("" when its row is missing); `option` names the flag in errors."""
    path = Path(data_root) / reading.METADATA_FILE
    try:
        columns, rows = reading.read_metadata(Path(data_root))
    except (OSError, ValueError, csv.Error) as error:
        raise FileNotFoundError(f"{path}: cannot read it for {option} ({error})") from error
    if column not in columns:
        raise ValueError(f"{path}: no column '{column}' for {option} (columns: {', '.join(columns)})")
    return {p.stem: rows.get(reading.stem_key(p), {}).get(column) or "" for p in images}


def pixel_spacings(data_root: Path, images: list[Path], spacing_mm: Spacing | None,
                   column: str | None) -> tuple[dict[str, Spacing] | None, str]:
    """Each image's pixel size in mm (rows, columns), and where it came from; (None, "") when neither option
    gives one.

    `column` (metadata.csv: one number per image for square pixels, or rows x
    columns as `parse_spacing` reads it) wins; `spacing_mm` serves every image
    without a value there, or all images without `column`.
    """
    if column is None:
        if spacing_mm is None:
            return None, ""
        return {p.stem: spacing_mm for p in images}, f"--pixel-spacing-mm {format_spacing(spacing_mm)}"
    path = Path(data_root) / reading.METADATA_FILE
    spacing = {}
    for stem, text in metadata_column(data_root, column, images, "--spacing-column").items():
        if not text.strip():
            if spacing_mm is None:
                raise ValueError(f"{path}: no '{column}' value for image_id '{stem}'; fill it in or give "
                                 "--pixel-spacing-mm for images without one")
            spacing[stem] = spacing_mm
            continue
        try:
            spacing[stem] = parse_spacing(text)
        except ValueError:
            raise ValueError(f"{path}: '{column}' of image_id '{stem}' is {text!r}, "
                             f"not a pixel size in mm ({SPACING_FORM})") from None
    fallback = "" if spacing_mm is None else f", else --pixel-spacing-mm {format_spacing(spacing_mm)}"
    return spacing, f"metadata.csv column '{column}'{fallback}"


def settle_scoring(data_root: Path, images: list[Path], checkpoint_path: Path,
                   args: argparse.Namespace, volume_stems: Sequence[str] = ()) -> tuple[Scoring, list[str]]:
    """Group and strata columns with each image's (and volume's) values, and pixel spacings; raises ValueError
    naming the file.

    Without --group-by, scores are grouped by the column the checkpoint's run
    split by, when DATA_ROOT's metadata.csv has it (a note says why not otherwise).
    Volumes take the metadata row whose image_id is their name; their slices'
    spacing comes from their headers, not from these options.
    """
    named = [*images, *(Path(f"{stem}.nii") for stem in volume_stems)]  # metadata_column keys rows by stem
    notes = []
    group_column = args.group_by if args.group_by is not None else split_group_column(checkpoint_path)
    if args.group_by is None and group_column:
        try:
            metadata_column(data_root, group_column, named, "--group-by")
        except (FileNotFoundError, ValueError) as error:
            notes.append(f"not grouping by the run's split column '{group_column}': {error}")
            group_column = ""
    options = {group_column: "--group-by"} if group_column else {}
    strata_asked = [*args.strata, *([args.class_mix[0]] if args.class_mix else [])]
    options.update({column: "--strata" for column in strata_asked if column not in options})
    taken = {"image", "category", SIZE_COLUMN, *NUMBER_COLUMNS, *VOLUME_COLUMNS}
    for column, option in options.items():
        if column in taken:  # metrics.csv holds metadata values beside the scores, by column name
            raise ValueError(f"{option} {column}: metrics.csv already has a column of that name; "
                             "rename the column in metadata.csv")
    labels = {column: metadata_column(data_root, column, named, option) for column, option in options.items()}
    spacing, spacing_source = pixel_spacings(data_root, images, args.pixel_spacing_mm, args.spacing_column)
    strata = [column for column in options if column != group_column]
    if args.class_mix:
        column, weights = args.class_mix
        missing = sorted(set(weights) - set(labels[column].values()))
        if missing:
            raise ValueError(f"--class-mix: no image here has {column} = {', '.join(missing)} "
                             f"(values: {', '.join(sorted(set(labels[column].values())))})")
    return Scoring(group_column, strata, labels, spacing, spacing_source, args.class_mix), notes


def score_image(stem: str, predicted: np.ndarray, truth: np.ndarray, probability: np.ndarray,
                spread: np.ndarray | None, spacing: Spacing | None) -> dict:
    """One image's metrics.csv row: its scores against `truth` (mm with `spacing`), its uncertainty with `spread`."""
    row = {"image": stem, **per_image_report(predicted, truth, spacing)}
    if spread is not None:
        row["uncertainty"] = region_uncertainty(spread, probability)
    return row


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


def rows_by_label(rows: list[dict], column: str, order: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """The rows sharing each value of `column`: the values in `order` first (those present), the rest sorted."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row[column], []).append(row)
    labels = [label for label in order if label in by_label] + sorted(set(by_label) - set(order))
    return {label: by_label[label] for label in labels}


def scores_by_label(rows: list[dict], column: str, order: tuple[str, ...] = ()) -> dict[str, dict]:
    """`group_scores` of the rows sharing each value of `column`, in `rows_by_label`'s order."""
    return {label: group_scores(members) for label, members in rows_by_label(rows, column, order).items()}


def failure_counts(rows: list[dict]) -> dict[str, int]:
    """How many of `rows` fell in each failure category, every category of FAILURE_RULES named (zeros too)."""
    return {name: sum(r["category"] == name for r in rows) for name, _ in FAILURE_RULES}


def failure_counts_by_stratum(rows: list[dict], strata_columns: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    """summary.json's failure_counts_by_stratum: column -> value -> category -> count.

    The columns of summary.json's `strata`: tumour size always, then `strata_columns`
    (--strata), values in the same order as there. Each column's counts sum to the overall failure_counts.
    """
    orders = {SIZE_COLUMN: SIZE_STRATA}
    return {column: {label: failure_counts(members)
                     for label, members in rows_by_label(rows, column, orders.get(column, ())).items()}
            for column in [SIZE_COLUMN, *strata_columns]}


def size_scores(rows: list[dict]) -> dict[str, dict]:
    """summary.json's tumour-size strata: `group_scores` per SIZE_STRATA value; the "no tumour" one also
    counts its false alarms (images with any predicted pixel) and their share of its images."""
    groups = scores_by_label(rows, SIZE_COLUMN, SIZE_STRATA)
    if NO_TUMOUR in groups:
        alarms = sum(r["pred_pixels"] > 0 for r in rows if r[SIZE_COLUMN] == NO_TUMOUR)
        groups[NO_TUMOUR].update(false_alarms=alarms, false_alarm_rate=alarms / groups[NO_TUMOUR]["count"])
    return groups


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


def label_rows(rows: list[dict], scoring: Scoring) -> list[float]:
    """Add each row's tumour-size stratum and metadata values; returns the size terciles' edges in pixels.

    A volume's slice takes its own metadata row if there is one, else its volume's. A number that some
    rows have and others lack (mm distances of volume slices beside images without a spacing) is NaN
    (undefined) in the others.
    """
    for key in NUMBER_COLUMNS:
        if any(key in row for row in rows):
            for row in rows:
                row.setdefault(key, math.nan)
    edges = size_strata(rows)
    for column, values in scoring.labels.items():
        for row in rows:
            row[column] = values.get(row["image"]) or values.get(row.get("volume", ""), "")
    return edges


def write_metrics(path: Path, rows: list[dict], scoring: Scoring) -> None:
    """metrics.csv: one row per scored image or volume slice, numbers first, then text; undefined numbers empty.

    A volume's slices carry its name, the slice axis and index (VOLUME_COLUMNS); images leave those empty.
    """
    columns = ["image", *(key for key in NUMBER_COLUMNS if key in rows[0]), "category", SIZE_COLUMN,
               *(key for key in TYPE_COLUMNS if key in rows[0]),
               *(key for key in VOLUME_COLUMNS if any(key in row for row in rows)), *scoring.labels]
    write_table(path, columns, rows)


def write_volume_table(path: Path, rows: list[dict]) -> None:
    """volumes.csv: one row per predicted volume, with its 3-D scores where it has a mask volume."""
    write_table(path, [key for key in VOLUME_TABLE_COLUMNS if any(key in row for row in rows)], rows)


def write_table(path: Path, columns: list[str], rows: list[dict]) -> None:
    """A CSV of `rows` under `columns` (missing and NaN values left empty), written atomically."""
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, restval="")
    writer.writeheader()
    writer.writerows({key: "" if isinstance(value, float) and math.isnan(value) else value
                      for key, value in row.items()} for row in rows)
    write_atomic(path, table.getvalue())


def read_metrics(path: Path) -> list[dict[str, str]]:
    """metrics.csv's rows as text; FileNotFoundError or ValueError naming the file when it is missing or not one."""
    path = Path(path)
    try:
        # surrogateescape: image names that are not UTF-8 come back as test.py wrote them
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: not found; test.py writes it when it scores images against masks") \
            from error
    except (OSError, csv.Error) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from error
    missing = {"image", "dice"} - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"{path}: not a metrics.csv of test.py (no column {', '.join(sorted(missing))})")
    return rows


def parse_metric(text: str | None) -> float:
    """One number cell of metrics.csv (as read_metrics gives it) as a float.

    Args:
        text: the cell; None where a short row lacks it.

    Returns:
        The number; NaN for '' (write_metrics leaves an undefined metric empty) and for None.
        'nan' also gives NaN, and 'inf' infinity, as float() reads them.

    Raises:
        ValueError: text that is not a number.
    """
    return float(text) if text not in (None, "") else math.nan


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
        "failure_counts": failure_counts(rows),
        "failure_counts_by_stratum": failure_counts_by_stratum(rows, scoring.strata_columns),
        "strata": {SIZE_COLUMN: {"edges_px": size_edges, "groups": size_scores(rows)},
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


def type_columns(probabilities: dict[str, float]) -> dict[str, str | float]:
    """An image's TYPE_COLUMNS from its TypeHead's probability of each class."""
    predicted = max(probabilities, key=probabilities.__getitem__)
    return {"predicted_type": predicted, "type_probability": probabilities[predicted]}


def type_classification(rows: list[dict], column: str, truth: dict[str, str], classes: Sequence[str],
                        group_column: str = "", groups: dict[str, str] | None = None) -> dict:
    """summary.json's type_classification: a TypeHead's answers (rows' TYPE_COLUMNS) against metadata's `column`.

    `truth` and `groups` map image stems to the true class and to the patient
    (`group_column`). Images without a true class are left out. Scored per image
    and, with `groups`, per patient: the patient's predicted type is the
    PATIENT_VOTE of its slices, its true type the most common true type of its
    slices. Classes are the head's, then any true class the head lacks.
    """
    labelled = [row for row in rows if truth.get(row["image"])]
    order = [*classes, *sorted({truth[row["image"]] for row in labelled} - set(classes))]
    result = {"column": column, "classes": order, "images_without_label": len(rows) - len(labelled),
              "per_image": classification_scores([truth[row["image"]] for row in labelled],
                                                 [row["predicted_type"] for row in labelled], order)}
    if groups:
        by_patient: dict[str, list[dict]] = {}
        for row in labelled:
            by_patient.setdefault(groups[row["image"]], []).append(row)
        true_types = [Counter(truth[row["image"]] for row in slices).most_common(1)[0][0]
                      for slices in by_patient.values()]
        votes = [max(order, key=lambda name: (sum(row["predicted_type"] == name for row in slices),
                                              sum(row["type_probability"] for row in slices
                                                  if row["predicted_type"] == name)))
                 for slices in by_patient.values()]
        result["per_patient"] = {"group_column": group_column, "vote": PATIENT_VOTE,
                                 **classification_scores(true_types, votes, order)}
    return result


def class_mix(text: str, column: str = "") -> tuple[str, dict[str, float]]:
    """argparse type for --class-mix: a metadata.csv column and a weight per value, normalised to sum 1.

    The one parser of test.py's and crossval.py's --class-mix. Weights must be
    positive numbers; an empty weight, zero, a negative or no pair at all
    raises argparse.ArgumentTypeError naming the expected form.

    Args:
        text: 'COLUMN:VALUE=WEIGHT,...', e.g. 'tumor_class:glioma=3,meningioma=1'; with `column`
            given, 'VALUE=WEIGHT,...' of that column, e.g. 'glioma=0.465,pituitary=0.304,meningioma=0.231'.
        column: the column the weights are of, when the text does not name it (crossval.py: tumor_class).
    """
    form = f"VALUE=WEIGHT,... (values of {column})" if column else "COLUMN:VALUE=WEIGHT,..."
    pairs = text
    if not column:
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
        raise argparse.ArgumentTypeError(f"expected {form} with positive weights, got {text!r}")
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


def reweighted_dice(rows: list[dict], column: str, weights: dict[str, float]) -> dict:
    """Mean Dice with each value of `column` weighted as in `weights` (e.g. another set's class mix).

    NaN (null in summary.json) when a weighted value has no scored image: its weight cannot be honoured.
    """
    means = {value: float(np.mean([r["dice"] for r in rows if r[column] == value] or [math.nan]))
             for value in weights}
    return {"column": column, "weights": weights, "dice_mean_by_value": means,
            "dice_mean": sum(weights[value] * means[value] for value in weights)}
