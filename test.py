"""Predict tumour masks with a trained checkpoint; score them where ground truth exists; write a report.

    python test.py                                        # best.pt of the newest run, on DATA_ROOT
    python test.py --checkpoint runs/x/best.pt --data-root path/to/folder --threshold 0.4
    python test.py --data-root DATA --subset test         # only the patients the run held out
    python test.py --data-root DATA --group-by tumor_class  # also scores per metadata.csv value
    python test.py --data-root DATA --pixel-spacing-mm 0.98 --strata tumor_class --tta true
    python test.py --compare predictions/a predictions/b  # paired Dice differences, per patient where known
    python test.py --data-root VOLUMES --slice-axis auto  # NIfTI files / DICOM series folders in VOLUMES/images

The folder needs `images/` (any sizes); with `masks/` each image is also
scored against its mask at the image's own resolution. `images/` may also
hold volumes: NIfTI files (.nii, .nii.gz) and DICOM series (one folder per
series), with optional `masks/<name>.nii.gz`; each is predicted slice by
slice and its mask written as NIfTI with the input's affine (docs/reference.md
"Volumes"). The model runs at the size it was trained at, as rebuilt from
the config inside the checkpoint; its probability map is resized back to
each image before thresholding.

Writes PREDICTION_ROOT/<run name>/: masks/, segmented/, overlays/ (PNG per
image; uncertainty/ too with TTA or an ensemble), metrics.csv, summary.json
and report.html; with volumes also masks/<name>.nii.gz and volumes.csv.
Exit code 0 when every image and volume was processed, 1 on a fatal error,
2 when some could not be read.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Config, build_parser, config_from_args, parse_bool
from metrics import Spacing
from tumorseg.data import reading
from tumorseg.data.spacing import parse_spacing
from tumorseg.data.volumes import VolumeEntry, find_volumes, misaligned_masks, slice_name_clashes
from tumorseg.evaluation import evaluate
from tumorseg.evaluation import report_page
from tumorseg.evaluation.comparison import compare_predictions
from tumorseg.evaluation.console import print_summary
from tumorseg.evaluation.scoring import Scoring, class_mix, settle_scoring
from tumorseg.files import OutputError, describe_write_error
from tumorseg.inference.outputs import output_name, publish_predictions, start_staging
from tumorseg.inference.predict import find_images, unusable_inputs
from tumorseg.runs.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint
from tumorseg.runs.runfolder import newest_checkpoint, subset_images, subset_stems, unfinished_run_warning
from utils import interruption, setup_runtime, sigterm_as_interrupt, tolerant_console

# The only config keys inference uses; training keys (size, channels...) come from the checkpoint.
INFERENCE_KEYS = ("DATA_ROOT", "RUNS_DIR", "PREDICTION_ROOT", "BATCH_SIZE", "DEVICE", "THRESHOLD", "TTA", "AMP",
                  "CHANNELS_LAST")
SUBSET_NOTES = {
    "val": "the run's inner validation patients chose its epoch and decision rule: their scores are optimistic, "
           "not a held-out figure; use --subset test",
}


@dataclass
class Job:
    """Everything settled before predicting: the models, the images and how to score and name the output."""

    options: Config
    device: torch.device
    checkpoint_paths: list[Path]
    models: list[LoadedCheckpoint]
    images: list[Path]
    masks: dict[str, Path] | None
    volumes: list[VolumeEntry]  # NIfTI files and DICOM series in images/, each with its mask volume or None
    skipped: dict[Path, str]  # entries of images/ left out before predicting, and why
    unusable_masks: dict[Path, str]  # entries of masks/ that cannot be read (broken links...), and why
    scoring: Scoring
    notes: list[str]
    name: str  # the output folder's name under PREDICTION_ROOT
    staging: Path
    unfinished: str | None  # a warning when the chosen run never finished


def main(argv: list[str] | None = None) -> int:
    """test.py's command line; the exit code."""
    with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C
        return predict_and_publish(argv)


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """The command line's flags, and the inference settings they give."""
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
    class_mix_example = "tumor_class:glioma=0.465,pituitary=0.304,meningioma=0.231"
    parser.add_argument("--class-mix", type=class_mix, metavar="COLUMN:VALUE=W,...",
                        help=f"also the mean Dice re-weighted to this mix of a metadata.csv column's values, e.g. "
                             f"{class_mix_example} (the column is also scored as a stratum)")
    parser.add_argument("--strata", metavar="COLUMN", nargs="+", default=[],
                        help="also scores per value of these metadata.csv columns (e.g. tumor_class); "
                             "tumour-size terciles are always scored")
    parser.add_argument("--pixel-spacing-mm", type=pixel_spacing, metavar="MM",
                        help="pixel size of the images as they are, in mm: adds HD95 and ASSD in mm; one number "
                             "for square pixels (the shared 256 px figshare slices: 0.98) or rows x columns "
                             "(e.g. 0.9x1.2)")
    parser.add_argument("--spacing-column", metavar="COLUMN",
                        help="metadata.csv column holding each image's pixel size in mm (as --pixel-spacing-mm: "
                             "0.98 or 0.9x1.2); --pixel-spacing-mm "
                             "then serves only images with an empty cell")
    parser.add_argument("--report", type=parse_bool, default=True, metavar="BOOL",
                        help="write report.html, one self-contained page of the scores (default: true)")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"),
                        help="compare two prediction folders instead of predicting: per-image Dice differences "
                             "(B minus A) and a paired Wilcoxon signed-rank test over patients (each the mean Dice "
                             "of its slices) where patient_id is known (metrics.csv, --data-root's or summary.json's "
                             "data root's metadata.csv), else over images")
    parser.add_argument("--slice-axis", choices=("auto", "0", "1", "2"), default="auto",
                        help="array axis volumes are cut across; 'auto': the one with the fewest voxels (ties: the "
                             "coarser spacing, then the last)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace PREDICTION_ROOT/<run name>/ instead of writing a fresh <run name>-N/")
    args = parser.parse_args(argv)
    return args, config_from_args(parser, args)


def predict_and_publish(argv: list[str] | None) -> int:
    """Parse, check, predict into a staging folder, publish it; the exit code."""
    tolerant_console()
    args, options = parse_arguments(argv)
    if args.compare:
        # --data-root only when given: config.py's default may be other data than the folders scored
        given_root = Path(args.DATA_ROOT) if hasattr(args, "DATA_ROOT") else None
        return compare_predictions(*args.compare, data_root=given_root)
    started = time.perf_counter()
    try:
        job = prepare(options, args)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot write predictions under {options.PREDICTION_ROOT}: {error}", file=sys.stderr)
        return 1
    announce(job, args)
    try:
        summary, failures = evaluate.predict_and_write(
            job.models, job.checkpoint_paths, job.images, job.masks, job.scoring, job.staging, job.device,
            job.options, args, started,
            skipped=[*(f"{entry}: skipped, {why}" for entry, why in job.skipped.items()),
                     *(f"{entry}: mask unusable, {why}; its image is predicted, not scored"
                       for entry, why in job.unusable_masks.items())],
            volume_inputs=evaluate.VolumeInputs(job.volumes, args.slice_axis))
        report_seconds = None
        if args.report and summary["scored"]:
            report_started = time.perf_counter()
            report_page.write_report(job.staging)
            report_seconds = time.perf_counter() - report_started
        out_dir = publish_predictions(job.staging, Path(job.options.PREDICTION_ROOT), job.name, args.overwrite)
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (utils.Terminated)
        shutil.rmtree(job.staging, ignore_errors=True)
        cause, code = interruption(error)
        print(f"\ninterrupted ({cause}): nothing was written; earlier predictions are untouched", file=sys.stderr)
        return code
    except (OutputError, OSError) as error:
        shutil.rmtree(job.staging, ignore_errors=True)
        reason = str(error) if isinstance(error, OutputError) else describe_write_error(job.staging, error)
        print(f"error: {reason}\nnothing was written; earlier predictions are untouched", file=sys.stderr)
        return 1
    print_summary(summary, job.scoring)
    if report_seconds is not None:
        print(f"{'report':<18}{out_dir / 'report.html'} (written in {report_seconds:.1f} s)")
    print(f"{'images/s':<18}{summary['images_per_second']:.1f}\n{'outputs':<18}{out_dir}")
    for failure in failures:
        print(f"warning: {failure}", file=sys.stderr)
    volumes_done = summary.get("volumes", {}).get("count", 0)
    incomplete = summary["count"] < len(job.images) or volumes_done < len(job.volumes)
    return 2 if incomplete or job.skipped or job.unusable_masks else 0


def prepare(options: Config, args: argparse.Namespace) -> Job:
    """Device, models, images, scoring and a staging folder; raises CheckpointError, FileNotFoundError, ValueError."""
    device, options = setup_runtime(options)
    checkpoint_paths = args.checkpoint or [newest_checkpoint(Path(options.RUNS_DIR))]
    # Chosen for the user: say so when that run never finished (a kill leaves best.pt without summary.json).
    unfinished = None if args.checkpoint else unfinished_run_warning(checkpoint_paths[0])
    models = [load_checkpoint(path, device) for path in checkpoint_paths]
    if options.CHANNELS_LAST:
        for loaded in models:
            loaded.model.to(memory_format=torch.channels_last)
    images, masks = find_images(Path(options.DATA_ROOT))
    volumes = find_volumes(Path(options.DATA_ROOT))
    # find_images and find_volumes list regular files and folders (or links to them) only: the rest would vanish
    # without a word.
    skipped = unusable_inputs(Path(options.DATA_ROOT) / "images")
    # A mask that is a broken link leaves its image unscored: say why, not just "no mask".
    unusable_masks = unusable_inputs(Path(options.DATA_ROOT) / "masks") if masks is not None else {}
    if args.subset != "all":
        for path in checkpoint_paths:  # in that subset for every member of an ensemble
            images = subset_images(images, path, args.subset)
            wanted = subset_stems(path, args.subset)
            skipped = {entry: why for entry, why in skipped.items() if reading.stem_key(entry) in wanted}
            unusable_masks = {entry: why for entry, why in unusable_masks.items()
                              if reading.stem_key(entry) in wanted}
    notes = []
    if volumes and args.subset != "all":  # a run's split lists images, not volumes
        notes.append(f"{len(volumes)} volume(s) left out: --subset {args.subset} selects the run's split images")
        volumes = []
    clashes = slice_name_clashes(volumes, images, args.slice_axis)
    if clashes:  # refused before predicting: one output would silently replace the other
        raise ValueError(f"{len(clashes)} name clash(es) between images and volume slices; rename one of each "
                         "pair: " + "; ".join(clashes))
    misaligned = misaligned_masks(volumes)
    if misaligned:  # refused before predicting: voxel-by-voxel scores against such a mask would be wrong
        raise ValueError(f"{len(misaligned)} mask volume(s) not on their image volume's voxel grid; resample each "
                         "mask onto its image's grid (or save it with the image's affine): " + "; ".join(misaligned))
    scoring, scoring_notes = settle_scoring(Path(options.DATA_ROOT), images, checkpoint_paths[0], args,
                                            [entry.stem for entry in volumes])
    notes += scoring_notes
    name = output_name(checkpoint_paths[0])
    if len(models) > 1:
        name = f"{name}-ensemble{len(models)}"
    staging = start_staging(Path(options.PREDICTION_ROOT), name, args.overwrite)
    return Job(options, device, checkpoint_paths, models, images, masks, volumes, skipped, unusable_masks, scoring,
               notes, name, staging, unfinished)


def announce(job: Job, args: argparse.Namespace) -> None:
    """Say what is about to be predicted: the checkpoints, the images, notes and warnings."""
    if job.unfinished:
        print(f"warning: {job.unfinished}", file=sys.stderr)
    for path, loaded in zip(job.checkpoint_paths, job.models, strict=True):
        for warning in loaded.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        trained = loaded.config  # the checkpoint's own config: how the model was trained
        print(f"checkpoint: {path} (epoch {loaded.state.get('epoch')}, {trained.MODEL} trained at "
              f"{trained.IMAGE_SIZE} px{', head crop' if trained.CROP else ''}, {trained.IN_CHANNELS} channel(s), "
              f"{trained.NORMALIZATION})")
    print(f"images:     {len(job.images)} from {job.options.DATA_ROOT}"
          + ("" if job.masks is not None else " (predict only)")
          + (f", {len(job.skipped)} more skipped (named below)" if job.skipped else ""))
    if job.volumes:
        axis = (evaluate.SLICE_AXIS_RULE if args.slice_axis == "auto" else f"array axis {args.slice_axis}")
        print(f"volumes:    {len(job.volumes)} ({sum(e.mask is not None for e in job.volumes)} with a mask volume), "
              f"cut across {axis}")
    for note in job.notes:
        print(f"note: {note}")
    if args.subset in SUBSET_NOTES:
        print(f"warning: {SUBSET_NOTES[args.subset]}", file=sys.stderr)


def pixel_spacing(text: str) -> Spacing:
    """argparse type: a pixel size in mm, "0.98" (square) or "0.9x1.2" (rows x columns), as (rows, columns)."""
    try:
        return parse_spacing(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number in mm (square pixels, e.g. 0.98) or rows x "
                                         f"columns (e.g. 0.9x1.2), got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
