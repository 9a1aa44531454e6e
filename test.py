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

import csv
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import dataset
from config import Config, build_parser, config_from_args
from metrics import MetricTracker
from utils import CheckpointError, load_checkpoint, pick_device, save_json

PREDICTION_COLOUR = np.array([255, 40, 40], np.float32)  # red fill, semi-transparent
TRUTH_COLOUR = np.array([40, 255, 40], np.uint8)  # green outline
OVERLAY_ALPHA = 0.4
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
    chosen = [p for p in images if p.stem in val]
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
    return {p.stem: rows.get(p.stem, {}).get(column, "") for p in images}


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


def probabilities(model: torch.nn.Module, inputs: torch.Tensor, tta: bool) -> torch.Tensor:
    """sigmoid(model(inputs)); with `tta`, averaged over the 8 flips and 90-degree rotations.

    The training augmentation makes the model (nearly) invariant to these
    transforms, so averaging them cancels some of its orientation-specific errors.
    """
    with torch.no_grad():
        if not tta:
            return torch.sigmoid(model(inputs)).float()
        total = torch.zeros_like(inputs[:, :1], dtype=torch.float32)
        for turns in range(4):
            for flip in (False, True):
                view = torch.rot90(inputs, turns, dims=(2, 3))
                view = view.flip(3) if flip else view
                output = torch.sigmoid(model(view)).float()
                output = output.flip(3) if flip else output
                total += torch.rot90(output, -turns, dims=(2, 3))
        return total / 8


def predict(model: torch.nn.Module, config: Config, images: list[Path], masks: dict[str, Path] | None,
            device: torch.device, batch_size: int, tta: bool, unreadable: list[str]):
    """Yield a Prediction per readable image, batched at the trained size; unreadable files go to `unreadable`."""
    model.eval()
    batch: list[tuple[Path, np.ndarray, np.ndarray | None, np.ndarray]] = []

    def run(batch):
        inputs = torch.stack([torch.from_numpy(dataset.normalize(x, config.NORMALIZATION)) for *_, x in batch])
        outputs = probabilities(model, inputs.to(device), tta)
        for (path, image, mask, _), probability in zip(batch, outputs, strict=True):
            # Resize the probability map, not the thresholded mask, back to the image's own size.
            native = F.interpolate(probability[None], size=image.shape[:2], mode="bilinear", align_corners=False)
            yield Prediction(path.stem, image, native[0, 0].cpu().numpy(), mask)

    for path in tqdm(images, desc="predict", dynamic_ncols=True):
        try:
            image = dataset.read_image(path, 3)  # decoded once: shown as RGB, fed as the model expects
            model_input = image
            if config.IN_CHANNELS == 1:  # the same luma conversion read_image(path, 1) applies
                model_input = np.asarray(Image.fromarray(image).convert("L"))[..., None]
            mask = None
            if masks is not None and path.stem in masks:
                mask = dataset.read_mask(masks[path.stem])
                if mask.shape != image.shape[:2]:
                    raise ValueError(f"mask {masks[path.stem].name} is {mask.shape[1]}x{mask.shape[0]}, "
                                     f"image is {image.shape[1]}x{image.shape[0]}")
        except Exception as error:  # any decoder error: report the file, keep going
            unreadable.append(f"{path}: skipped, {error}")
            continue
        batch.append((path, image, mask, dataset.resize_image(model_input, config.IMAGE_SIZE)))
        if len(batch) == batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


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


def prepare_output_dir(root: Path, name: str, overwrite: bool) -> tuple[Path, Path]:
    """(staging folder to write into, final folder): a fresh name unless --overwrite replaces the old one."""
    final = Path(root) / name
    if final.exists() and not overwrite:
        suffix = 2
        while (Path(root) / f"{name}-{suffix}").exists():
            suffix += 1
        final = Path(root) / f"{name}-{suffix}"
    staging = final.with_name(final.name + ".partial")
    if staging.exists():  # left over from an interrupted run
        shutil.rmtree(staging)
    for sub in ("masks", "segmented", "overlays"):
        (staging / sub).mkdir(parents=True)
    return staging, final


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to use (default: best.pt of the newest run)")
    parser.add_argument("--subset", choices=("all", "val"), default="all",
                        help="'val': only the images the checkpoint's run held out (its split.json)")
    parser.add_argument("--group-by", metavar="COLUMN",
                        help="also report scores per value of this metadata.csv column (e.g. tumor_class)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace PREDICTION_ROOT/<run name>/ instead of writing a fresh <run name>-N/")
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    device = pick_device(config.DEVICE)
    started = time.perf_counter()

    try:
        checkpoint_path = args.checkpoint or newest_checkpoint(Path(config.RUNS_DIR))
        model, trained, checkpoint = load_checkpoint(checkpoint_path, device)
        images, masks = find_images(Path(config.DATA_ROOT))
        if args.subset == "val":
            images = validation_images(images, checkpoint_path.parent / "split.json")
        groups = image_groups(Path(config.DATA_ROOT), args.group_by, images) if args.group_by else None
        staging, out_dir = prepare_output_dir(Path(config.PREDICTION_ROOT), checkpoint_path.parent.name,
                                              args.overwrite)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot write predictions under {config.PREDICTION_ROOT}: {error}", file=sys.stderr)
        return 1
    print(f"checkpoint: {checkpoint_path} (epoch {checkpoint.get('epoch')}, trained at {trained.IMAGE_SIZE} px, "
          f"{trained.IN_CHANNELS} channel(s), {trained.NORMALIZATION})")
    print(f"images:     {len(images)} from {config.DATA_ROOT}" + ("" if masks is not None else " (predict only)"))

    unreadable: list[str] = []
    tracker, rows = MetricTracker(), []
    predict_start = time.perf_counter()
    for p in predict(model, trained, images, masks, device, config.BATCH_SIZE, config.TTA, unreadable):
        predicted = p.probability > config.THRESHOLD
        Image.fromarray(predicted.astype(np.uint8) * 255).save(staging / "masks" / f"{p.stem}.png")
        Image.fromarray(np.where(predicted[..., None], p.image, 0)).save(staging / "segmented" / f"{p.stem}.png")
        Image.fromarray(overlay(p.image, predicted, p.mask)).save(staging / "overlays" / f"{p.stem}.png")
        if p.mask is not None:
            tracker.update(predicted[None], p.mask[None])
            rows.append({"image": p.stem, "dice": tracker.dice[-1], "iou": tracker.iou[-1],
                         "pixel_accuracy": tracker.pixel_accuracy[-1], "gt_pixels": int(p.mask.sum()),
                         "pred_pixels": int(predicted.sum())})
    unscored = [] if masks is None else [f"{config.DATA_ROOT}/masks: no mask for '{p.stem}', not scored"
                                         for p in images if p.stem not in masks]
    failures = unreadable + unscored
    processed = len(images) - len(unreadable)
    summary = {"count": processed, "scored": len(rows), "subset": args.subset, "threshold": config.THRESHOLD,
               "tta": config.TTA,
               "checkpoint": str(checkpoint_path), "checkpoint_epoch": checkpoint.get("epoch"),
               "image_size": trained.IMAGE_SIZE, "data_root": str(config.DATA_ROOT),
               "wall_seconds": time.perf_counter() - started,
               # prediction loop only: decoding, inference, resizing back and writing the PNGs
               "images_per_second": processed / (time.perf_counter() - predict_start), "problems": failures}
    if rows:
        with open(staging / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
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
    if out_dir.exists():  # --overwrite: the old results go only once the new ones are complete
        shutil.rmtree(out_dir)
    staging.rename(out_dir)

    print(f"\n{'images processed':<18}{processed}\n{'scored':<18}{len(rows)}")
    if rows:
        for key in ("dice_mean", "dice_median", "dice_pooled", "iou_mean", "pixel_accuracy"):
            print(f"{key:<18}{summary[key]:.4f}")
        for group, scores in summary.get("by_group", {}).get("groups", {}).items():
            print(f"  {args.group_by} {group or '(none)'}: {scores['count']} images, "
                  f"Dice mean {scores['dice_mean']:.4f}, median {scores['dice_median']:.4f}")
    print(f"{'images/s':<18}{summary['images_per_second']:.1f}\n{'outputs':<18}{out_dir}")
    for failure in failures:
        print(f"warning: {failure}", file=sys.stderr)
    return 2 if processed < len(images) else 0


if __name__ == "__main__":
    sys.exit(main())
