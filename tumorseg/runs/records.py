"""A run's records besides its checkpoints: config.json, split.json, history.csv, summary.json and TensorBoard's."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from config import Config
import dataset
from tumorseg.data import splits
from tumorseg.files import save_json, write_atomic
from tumorseg.runs.runfolder import SPLIT_ROLES, SUMMARY_FILE, RunProgress
from tumorseg.training.loaders import split_column
from utils import is_main_process

HISTORY_FILE = "history.csv"
HISTORY_COLUMNS = ["epoch", "train_loss", "train_dice", "val_loss", "val_dice", "val_iou",
                   "val_pixel_accuracy", "val_dice_pooled", "val_iou_pooled", "learning_rate",
                   "train_images_per_second", "data_wait_share", "epoch_seconds"]


def write_run_records(config: Config, data: dataset.LoadedDataset, split: splits.Split, run_dir: Path,
                      new_run: bool) -> None:
    """config.json (on resume too: EPOCHS may have grown), split.json of a new run, and the data's line."""
    if is_main_process():
        save_json(run_dir / "config.json", config.to_dict())
        if new_run:
            save_json(run_dir / "split.json", split_record(config, data, split))
    # split.test is never trained or validated on: it chooses nothing
    print(f"data: {len(data.pairs)} pairs from {config.DATA_ROOT}: {len(split.train)} train, {len(split.val)} "
          f"validation (choose the epoch and rule), {len(split.test)} held out (test.py --subset test)"
          + (f", grouped by {split_column(config)}" if split_column(config) else ", random by slice"))


def split_record(config: Config, data: dataset.LoadedDataset, split: splits.Split) -> dict:
    """split.json: how the split was made and every image's role (train, val or test)."""
    stems = {role: [data.pairs[i].stem for i in getattr(split, role)] for role in SPLIT_ROLES}
    return {"group_column": split_column(config), "seed": config.SPLIT_SEED, "val_fraction": config.VAL_FRACTION,
            "test_fraction": 0.0 if config.FOLDS or config.FOLD_COLUMN or config.SPLIT_FILE else config.TEST_FRACTION,
            "folds": config.FOLDS, "fold": config.FOLD, "fold_column": config.FOLD_COLUMN,
            "split_file": str(Path(config.SPLIT_FILE).resolve()) if config.SPLIT_FILE else "",
            "data_root": str(Path(config.DATA_ROOT).resolve()), "roles": SPLIT_ROLES, **stems}


def start_history(run_dir: Path) -> None:
    """A new run's history.csv: the header row."""
    save_csv_row(run_dir / HISTORY_FILE, HISTORY_COLUMNS)


def history_row(epoch: int, train_metrics: dict[str, float], val: dict[str, float], learning_rate: float,
                epoch_seconds: float) -> dict:
    """One epoch's history.csv row, by column."""
    return {"epoch": epoch, "train_loss": train_metrics["loss"], "train_dice": train_metrics["dice"],
            "val_loss": val["loss"], "val_dice": val["dice"], "val_iou": val["iou"],
            "val_pixel_accuracy": val["pixel_accuracy"], "val_dice_pooled": val["dice_pooled"],
            "val_iou_pooled": val["iou_pooled"], "learning_rate": learning_rate,
            "train_images_per_second": train_metrics["images_per_second"],
            "data_wait_share": train_metrics["data_wait_share"], "epoch_seconds": epoch_seconds}


def record_epoch(writer: SummaryWriter, run_dir: Path, row: dict, train_metrics: dict[str, float],
                 val: dict[str, float], probs: torch.Tensor,
                 previews: tuple[torch.Tensor, torch.Tensor] | None, threshold: float) -> None:
    """One finished epoch in history.csv and TensorBoard (curves and the preview panel of `previews`)."""
    epoch = row["epoch"]
    save_csv_row(run_dir / HISTORY_FILE, [row[c] for c in HISTORY_COLUMNS], append=True)
    for name in ("loss", "dice"):
        writer.add_scalar(f"{name}/train", train_metrics[name], epoch)
    for name in ("loss", "dice", "iou", "pixel_accuracy", "dice_pooled"):
        writer.add_scalar(f"{name}/val", val[name], epoch)
    writer.add_scalar("learning_rate", row["learning_rate"], epoch)
    if previews is not None:
        writer.add_image("val/image_truth_prediction", preview_panel(*previews, probs, threshold), epoch)
    writer.flush()


def preview_panel(images: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """One row [image | true mask | predicted mask] per slice, stacked: (3, N*H, 3W) in [0, 1]."""
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    shown = ((images - low) / (high - low).clamp(min=1e-6)).mean(dim=1, keepdim=True)
    rows = torch.cat([shown, masks, (probs > threshold).float()], dim=3)  # (N, 1, H, 3W)
    return torch.cat(list(rows), dim=1).repeat(3, 1, 1)


def write_summary(config: Config, split: splits.Split, progress: RunProgress, reason: str, training_minutes: float,
                  device: torch.device, rule_summary: dict | None) -> None:
    """summary.json (the finished run's outcome; written last) and TensorBoard's HParams."""
    run_dir = progress.run_dir
    save_json(run_dir / SUMMARY_FILE, {
        "best_epoch": progress.best_epoch, "best_val_dice": progress.best_dice, "epochs_run": progress.epochs_done,
        "stop_reason": reason, "patience": config.PATIENCE, "minutes": training_minutes,
        "train_images": len(split.train), "val_images": len(split.val), "test_images": len(split.test),
        "device": str(device),
        "recipe": config.RECIPE, "decision_rule": rule_summary})
    # TensorBoard's HParams tab: this run's settings beside its final scores, to compare runs side by side.
    final_scores = {"hparam/best_val_dice": progress.best_dice, "hparam/best_epoch": progress.best_epoch,
                    "hparam/epochs_run": progress.epochs_done, "hparam/minutes": training_minutes}
    if rule_summary is not None:
        final_scores["hparam/val_dice_with_rule"] = rule_summary["val_dice_with_rule"]
    with SummaryWriter(log_dir=str(run_dir)) as hparams_writer:
        hparams_writer.add_hparams(config.to_dict(), final_scores, run_name=".")  # ".": the run folder itself


def keep_history_until(path: Path, epoch: int) -> None:
    """Drop history.csv rows after `epoch` (written by an epoch whose checkpoint a kill prevented)."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    kept = io.StringIO()
    csv.writer(kept).writerows([rows[0], *(row for row in rows[1:] if int(row[0]) <= epoch)])
    write_atomic(path, kept.getvalue())


def save_csv_row(path: Path, values: list, append: bool = False) -> None:
    """Write (or append) one CSV row, atomically: the file is rewritten whole, so a crash never halves a row."""
    previous = path.read_text() if append else ""
    line = io.StringIO()
    csv.writer(line).writerow(values)
    write_atomic(path, previous + line.getvalue())
