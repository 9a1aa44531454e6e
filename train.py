"""Train the U-Net; keep the checkpoint with the best validation Dice.

    python train.py                                   # config.py as it is
    python train.py --epochs 3 --image-size 128       # any config key as --foo-bar VALUE

Writes RUNS_DIR/<run name>/: config.json, split.json, history.csv,
summary.json, best.pt, last.pt and TensorBoard event files.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import dataset
from config import Config, parse_config
from losses import BCEDiceLoss
from metrics import MetricTracker, dice_per_image
from model import count_parameters
from utils import build_model, new_output_dir, pick_device, save_checkpoint, save_json, set_seed

HISTORY_COLUMNS = ["epoch", "train_loss", "train_dice", "val_loss", "val_dice", "val_iou",
                   "val_pixel_accuracy", "val_dice_pooled", "val_iou_pooled", "learning_rate",
                   "train_images_per_second", "data_wait_share", "epoch_seconds"]


def make_loaders(data: dataset.LoadedDataset, train_idx: list[int], val_idx: list[int],
                 config: Config) -> tuple[DataLoader, DataLoader]:
    """Shuffled, augmented training loader and a fixed-order validation loader."""
    augment = dataset.training_augmentation(config.SEED) if config.AUGMENT else None
    train_set = dataset.SegmentationDataset(data.images[train_idx], data.masks[train_idx],
                                            config.NORMALIZATION, augment)
    val_set = dataset.SegmentationDataset(data.images[val_idx], data.masks[val_idx], config.NORMALIZATION)
    common = dict(batch_size=config.BATCH_SIZE, num_workers=config.NUM_WORKERS,
                  persistent_workers=config.NUM_WORKERS > 0, worker_init_fn=dataset.seed_worker)
    generator = torch.Generator().manual_seed(config.SEED)
    return (DataLoader(train_set, shuffle=True, generator=generator, **common),
            DataLoader(val_set, shuffle=False, **common))


def train_step(model, images, masks, loss_fn, optimizer, scheduler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on the model's device; returns (loss, logits)."""
    logits = model(images)
    loss = loss_fn(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss, logits


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, device, threshold, desc) -> dict[str, float]:
    """One pass over the training data; returns mean loss, mean batch Dice, speed and data-wait share."""
    model.train()
    losses, dices, seen, waited = [], [], 0, 0.0
    start = ready = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for images, masks in bar:
        waited += time.perf_counter() - ready  # time this step spent waiting for the batch
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        loss, logits = train_step(model, images, masks, loss_fn, optimizer, scheduler)
        dice = dice_per_image(torch.sigmoid(logits.detach()) > threshold, masks > 0.5).mean().item()
        losses.append(loss.item())
        dices.append(dice)
        seen += len(images)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", dice=f"{np.mean(dices):.4f}")
        ready = time.perf_counter()
    elapsed = time.perf_counter() - start
    return {"loss": float(np.mean(losses)), "dice": float(np.mean(dices)),
            "images_per_second": seen / elapsed, "data_wait_share": waited / elapsed}


@torch.no_grad()
def evaluate(model, loader, loss_fn, device, threshold, desc) -> tuple[dict[str, float], torch.Tensor]:
    """Validation loss and metrics (per-image means and pooled); also returns all probabilities."""
    model.eval()
    tracker, total_loss, count, probabilities = MetricTracker(), 0.0, 0, []
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for images, masks in bar:
        images, masks = images.to(device), masks.to(device)
        logits = model(images)
        total_loss += loss_fn(logits, masks).item() * len(images)
        count += len(images)
        probs = torch.sigmoid(logits)
        tracker.update(probs > threshold, masks > 0.5)
        probabilities.append(probs.cpu())
        bar.set_postfix(loss=f"{total_loss / count:.4f}", dice=f"{np.mean(tracker.dice):.4f}")
    return {"loss": total_loss / count, **tracker.summary()}, torch.cat(probabilities)


def preview_panel(images: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """One row [image | true mask | predicted mask] per slice, stacked: (3, N*H, 3W) in [0, 1]."""
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    shown = ((images - low) / (high - low).clamp(min=1e-6)).mean(dim=1, keepdim=True)
    rows = torch.cat([shown, masks, (probs > threshold).float()], dim=3)  # (N, 1, H, 3W)
    return torch.cat(list(rows), dim=1).repeat(3, 1, 1)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, __doc__)

    # Check and decode the data before anything is written: a bad dataset leaves no run folder.
    try:
        data = dataset.load_dataset(Path(config.DATA_ROOT), config.IMAGE_SIZE, config.IN_CHANNELS,
                                    config.SPLIT_GROUP_COLUMN)
        train_idx, val_idx = dataset.split_indices(len(data.pairs), config.VAL_FRACTION, config.SEED, data.groups)
    except (dataset.DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        run_dir = new_output_dir(Path(config.RUNS_DIR), config.RUN_NAME)
    except OSError as error:
        print(f"error: cannot create the run folder: {error}", file=sys.stderr)
        return 1

    set_seed(config.SEED)
    device = pick_device(config.DEVICE)
    save_json(run_dir / "config.json", config.to_dict())
    save_json(run_dir / "split.json", {
        "group_column": config.SPLIT_GROUP_COLUMN, "seed": config.SEED, "val_fraction": config.VAL_FRACTION,
        "train": [data.pairs[i].stem for i in train_idx], "val": [data.pairs[i].stem for i in val_idx]})
    print(f"data: {len(data.pairs)} pairs from {config.DATA_ROOT}, {len(train_idx)} train / {len(val_idx)} val"
          + (f" (grouped by {config.SPLIT_GROUP_COLUMN})" if config.SPLIT_GROUP_COLUMN else " (random split)"))

    train_loader, val_loader = make_loaders(data, train_idx, val_idx, config)
    model = build_model(config)
    model.set_output_prior(float(data.masks[train_idx].mean()))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.LEARNING_RATE)
    scheduler = None
    if config.LR_SCHEDULE == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.EPOCHS * len(train_loader))
    loss_fn = BCEDiceLoss(config.BCE_WEIGHT, config.DICE_WEIGHT)
    print(f"model: U-Net, {count_parameters(model) / 1e6:.2f} M parameters, on {device}")

    writer = SummaryWriter(log_dir=str(run_dir))
    previews = [val_loader.dataset[i] for i in range(min(config.PREVIEW_IMAGES, len(val_idx)))]
    preview_images, preview_masks = map(torch.stack, zip(*previews, strict=True)) if previews else (None, None)

    history_path = run_dir / "history.csv"
    with open(history_path, "w", newline="") as f:
        csv.writer(f).writerow(HISTORY_COLUMNS)
    best_dice, best_epoch, started = -1.0, 0, time.perf_counter()
    for epoch in range(1, config.EPOCHS + 1):
        epoch_start = time.perf_counter()
        train = train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, device, config.THRESHOLD,
                                f"epoch {epoch}/{config.EPOCHS} train")
        val, probs = evaluate(model, val_loader, loss_fn, device, config.THRESHOLD,
                              f"epoch {epoch}/{config.EPOCHS} val")
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, "train_loss": train["loss"], "train_dice": train["dice"], "val_loss": val["loss"],
               "val_dice": val["dice"], "val_iou": val["iou"], "val_pixel_accuracy": val["pixel_accuracy"],
               "val_dice_pooled": val["dice_pooled"], "val_iou_pooled": val["iou_pooled"], "learning_rate": lr,
               "train_images_per_second": train["images_per_second"],
               "data_wait_share": train["data_wait_share"], "epoch_seconds": time.perf_counter() - epoch_start}
        with open(history_path, "a", newline="") as f:
            csv.DictWriter(f, HISTORY_COLUMNS).writerow(row)

        for name in ("loss", "dice"):
            writer.add_scalar(f"{name}/train", train[name], epoch)
        for name in ("loss", "dice", "iou", "pixel_accuracy", "dice_pooled"):
            writer.add_scalar(f"{name}/val", val[name], epoch)
        writer.add_scalar("learning_rate", lr, epoch)
        if previews:
            writer.add_image("val/image_truth_prediction",
                             preview_panel(preview_images, preview_masks, probs[:len(previews)], config.THRESHOLD),
                             epoch)
        writer.flush()

        metrics = {k: float(v) for k, v in val.items()}
        save_checkpoint(run_dir / "last.pt", model, optimizer, epoch, metrics, config)
        improved = val["dice"] > best_dice
        if improved:
            best_dice, best_epoch = val["dice"], epoch
            save_checkpoint(run_dir / "best.pt", model, optimizer, epoch, metrics, config)
        print(f"epoch {epoch:3d}  train loss {train['loss']:.4f} dice {train['dice']:.4f}  |  "
              f"val loss {val['loss']:.4f} dice {val['dice']:.4f} iou {val['iou']:.4f} "
              f"acc {val['pixel_accuracy']:.4f}  |  {train['images_per_second']:.1f} img/s"
              + ("  * best" if improved else ""), flush=True)

        minutes = (time.perf_counter() - started) / 60
        if config.TIME_LIMIT_MINUTES and minutes >= config.TIME_LIMIT_MINUTES and epoch < config.EPOCHS:
            print(f"time limit of {config.TIME_LIMIT_MINUTES} min reached after epoch {epoch}")
            break
    writer.close()

    save_json(run_dir / "summary.json", {
        "best_epoch": best_epoch, "best_val_dice": best_dice, "epochs_run": epoch,
        "minutes": (time.perf_counter() - started) / 60, "train_images": len(train_idx),
        "val_images": len(val_idx), "device": str(device)})
    print(f"\nrun folder: {run_dir}\nbest epoch: {best_epoch}, validation Dice {best_dice:.4f}\n"
          f"curves:     tensorboard --logdir {config.RUNS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
