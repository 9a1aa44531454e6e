"""Train the U-Net; keep the checkpoint with the best validation Dice.

    python train.py                                   # config.py as it is
    python train.py --epochs 3 --image-size 128       # any config key as --foo-bar VALUE
    python train.py --resume runs/<name>              # continue a run from its last.pt
    torchrun --standalone --nproc_per_node 4 train.py # 4 GPUs of one machine (BATCH_SIZE per process)

Writes RUNS_DIR/<run name>/: config.json, split.json, history.csv,
summary.json, best.pt, last.pt and TensorBoard event files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import dataset
from tumorseg.runs.checkpoints import restore_random_draws, restore_training_state, training_state
from config import TRAINING_KEYS, Config, build_parser, config_from_args
from tumorseg.training.ema import ModelEMA
from tumorseg.inference.predict import sigmoid32
from losses import BCEDiceLoss
from metrics import MetricTracker, dice_per_image
from model import build_model, count_parameters
from tumorseg.inference.postprocess import choose_decision_rule
from tumorseg.runs.runfolder import SUMMARY_FILE, is_unfinished_run, read_saved_config, read_split, read_summary, run_progress
from tumorseg.files import OutputError, new_output_dir, remove_stale_staging, save_json, write_atomic
from tumorseg.runs.checkpoints import CheckpointError, load_checkpoint, save_checkpoints
from tumorseg.runs.lock import RunFolderBusy, lock_run_folder
from utils import (autocast, average_over_processes, compile_model, from_main_process, gather_objects, interruption,
                   is_main_process, memory_format_for, pick_device, rank_and_world, resolve_amp, set_seed,
                   setup_runtime, sigterm_as_interrupt)

HISTORY_COLUMNS = ["epoch", "train_loss", "train_dice", "val_loss", "val_dice", "val_iou",
                   "val_pixel_accuracy", "val_dice_pooled", "val_iou_pooled", "learning_rate",
                   "train_images_per_second", "data_wait_share", "epoch_seconds"]
# split.json's lists: what each set of images does in a run.
SPLIT_ROLES = {"train": "fits the weights", "val": "chooses the epoch and the decision rule (inner validation)",
               "test": "held out: chooses nothing; test.py --subset test scores it"}
ESTIMATE_AFTER_STEPS = 5  # steps timed before the whole run's duration is estimated
FAST_CPU_HINT = "--recipe cpu is made for a CPU (see README, Recipes, for its time)"
# Every config key but test.py's own: those are refused by name rather than silently ignored.


def make_loaders(data: dataset.LoadedDataset, train_idx: list[int], val_idx: list[int],
                 config: Config, pin_memory: bool = False,
                 types: list[int] | None = None) -> tuple[DataLoader, DataLoader]:
    """Shuffled, augmented training loader and a fixed-order validation loader (pinned batches copy faster to a GPU).

    Under torchrun each process loads its own share: a DistributedSampler's
    for training (call its set_epoch every epoch) and every world-th
    validation image, so no image is validated twice. HARD_SAMPLING > 0
    draws training batches with a dataset.HardExampleSampler (one process
    only: run refuses it under torchrun, see check_sampling), which train_one_epoch
    feeds the losses; BALANCE_COLUMN draws them with a dataset.BalancedSampler
    over that column's classes (one process only too). With `types` (a class
    index per image of `data`: TYPE_COLUMN) the training batches are
    (images, masks, type indices); validation's stay (images, masks).
    """
    rank, world = rank_and_world()
    augment = dataset.training_augmentation(config.SEED + rank, flips=config.AUGMENT, affine=config.AUG_AFFINE,
                                            intensity=config.AUG_INTENSITY, elastic=config.AUG_ELASTIC)
    train_set = dataset.SegmentationDataset(data.images, data.masks, config.NORMALIZATION, augment, train_idx,
                                            types)
    val_set = dataset.SegmentationDataset(data.images, data.masks, config.NORMALIZATION, indices=val_idx)
    # Workers are started afresh each epoch (not persistent): their augmentation seeds then come from the
    # loader's generator, which checkpoints save, so a resumed run draws exactly what it would have drawn.
    common = dict(batch_size=config.BATCH_SIZE, num_workers=config.NUM_WORKERS, worker_init_fn=dataset.seed_worker,
                  pin_memory=pin_memory)
    generator = torch.Generator().manual_seed(config.SEED)
    drop_last = drops_last_batch(len(train_set), config.BATCH_SIZE, world)
    # DistributedSampler pads the training shares to one length; validation must not count an image twice.
    train_sampler = DistributedSampler(train_set, seed=config.SEED) if world > 1 else None
    balance = balance_labels(config, data)
    if config.HARD_SAMPLING:
        train_sampler = dataset.HardExampleSampler(len(train_set), config.HARD_SAMPLING, config.BATCH_SIZE,
                                                   generator)
    elif balance is not None:  # Config refuses it together with HARD_SAMPLING
        train_sampler = dataset.BalancedSampler([balance[i] for i in train_idx], generator)
    return (DataLoader(train_set, shuffle=train_sampler is None, sampler=train_sampler, generator=generator,
                       drop_last=drop_last, **common),
            DataLoader(val_set, sampler=range(rank, len(val_set), world), **common))


def drops_last_batch(train_images: int, batch_size: int, world: int) -> bool:
    """Whether each process's last training batch would hold a single image, and is therefore dropped."""
    # BatchNorm cannot train on a batch of one image (at a 1x1 bottleneck it raises; elsewhere it normalises
    # by that image alone): drop such a last batch (its image is drawn again in other epochs, since the order
    # is reshuffled every epoch).
    return math.ceil(train_images / world) % batch_size == 1


def steps_per_epoch(train_images: int, batch_size: int, world: int) -> int:
    """Optimiser steps in one epoch: the batches of each process's share, less a dropped last batch of one."""
    share = math.ceil(train_images / world)  # DistributedSampler pads the shares to one length
    return math.ceil(share / batch_size) - drops_last_batch(train_images, batch_size, world)


def check_steps(train_images: int, config: Config, world: int) -> None:
    """Raise ValueError when an epoch would make no optimiser step (a run that never trains must not start)."""
    if steps_per_epoch(train_images, config.BATCH_SIZE, world) > 0:
        return
    per_process = f" shared by {world} processes" if world > 1 else ""
    raise ValueError(f"the training split has {train_images} image(s){per_process}, too few for one optimiser "
                     f"step of BATCH_SIZE {config.BATCH_SIZE}: its only batch would hold 1 image, and a batch of "
                     "one image is dropped (BatchNorm needs more than one). Add images to "
                     f"{config.DATA_ROOT}, or hold fewer out (--val-fraction, --test-fraction, --folds), so that "
                     f"training gets at least {world + 1}")


def check_sampling(config: Config, world: int) -> None:
    """Raise ValueError if HARD_SAMPLING or BALANCE_COLUMN is asked of `world` > 1 processes.

    Hard sampling would need every process's losses in each process; the
    balanced sampler draws one process's epoch (sharing it out like
    DistributedSampler does is not implemented).
    """
    if config.HARD_SAMPLING and world > 1:
        raise ValueError("HARD_SAMPLING works in one process only (each process would need the losses of "
                         "all); use --hard-sampling 0 under torchrun")
    if config.BALANCE_COLUMN and world > 1:
        raise ValueError("BALANCE_COLUMN works in one process only (its draws are not shared out among "
                         'processes); use --balance-column "" under torchrun')


def train_step(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: LRScheduler | None = None, amp: str = "off",
               scaler: torch.amp.GradScaler | None = None,
               types: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on the model's device; returns (losses, logits).

    `loss_fn` gives one loss per image (reduction "none") or their mean; the
    step minimises the mean and returns what `loss_fn` gave. The forward
    pass runs in the precision `amp` names; the loss is taken in float32.
    `scaler` (for fp16, whose small gradients would underflow) scales the
    loss and skips steps whose gradients overflowed. With `types` (class
    indices, for a model with a TypeHead) the loss also takes the type logits.
    A model with deep supervision gives a list of logits in training, full
    resolution first: the loss takes them all, the returned logits are the first.
    """
    with autocast(images.device, amp):
        output = model(images) if types is None else model(images, return_type=True)
    segmentation, type_logits = (output, None) if types is None else output
    levels = segmentation if isinstance(segmentation, list) else [segmentation]
    logits = levels[0]
    taken = [level.float() for level in levels] if len(levels) > 1 else logits.float()
    losses = loss_fn(taken, masks) if types is None else loss_fn(taken, masks, type_logits.float(), types)
    loss = losses.mean()
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:
        scheduler.step()
    return losses, logits


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the weights of that step are not to be trusted."""


class NoStepError(RuntimeError):
    """An epoch ended without a single optimiser step: its loss and Dice would be NaN, its weights untrained."""


def train_one_epoch(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler | None, device: torch.device, threshold: float, desc: str,
                    on_step: Callable[[int, float], None] | None = None, amp: str = "off",
                    scaler: torch.amp.GradScaler | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format,
                    ema: ModelEMA | None = None) -> dict[str, float]:
    """One pass over the training data; returns mean loss, mean batch Dice, speed and data-wait share.

    `on_step(steps_done, seconds_so_far)` is called after every step (used for the
    time estimate); `amp`, `scaler`: see train_step; batches are given
    `memory_format`; `ema` (EMA_DECAY) is updated after every step. Raises
    NonFiniteLossError as soon as a loss is NaN or infinite, and NoStepError
    when the loader gave no batch.
    """
    model.train()
    losses, dices, seen, waited = [], [], 0, 0.0
    start = ready = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main_process())
    for step, (images, masks, *labels) in enumerate(bar, 1):  # labels: [type indices] with a TypeHead
        waited += time.perf_counter() - ready  # time this step spent waiting for the batch
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        types = labels[0].to(device, non_blocking=True) if labels else None
        image_losses, logits = train_step(model, images, masks, loss_fn, optimizer, scheduler, amp, scaler, types)
        if ema is not None:
            ema.update()  # the average follows every optimiser step
        if isinstance(loader.sampler, dataset.HardExampleSampler):
            loader.sampler.record(step - 1, image_losses)
        loss = image_losses.mean()
        dice = dice_per_image(sigmoid32(logits.detach()) > threshold, masks > 0.5).mean()
        # Averaged over all processes, so a NaN anywhere stops every process at the same step.
        loss_value, dice_value = average_over_processes(torch.stack([loss.detach().float(), dice])).tolist()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"the training loss became {loss_value} at step {step} of {desc}")
        if on_step is not None:
            on_step(step, time.perf_counter() - start)
        losses.append(loss_value)
        dices.append(dice_value)
        seen += len(images)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", dice=f"{np.mean(dices):.4f}")
        ready = time.perf_counter()
    if not losses:  # check_steps refuses such runs up front; this guards every other caller
        raise NoStepError(f"{desc}: the training loader gave no batch, so no optimiser step was made "
                          f"({len(loader.dataset)} training image(s), batch size {loader.batch_size}, "
                          f"last batch {'dropped' if loader.drop_last else 'kept'})")
    elapsed = time.perf_counter() - start
    return {"loss": float(np.mean(losses)), "dice": float(np.mean(dices)),
            "images_per_second": seen * rank_and_world()[1] / elapsed, "data_wait_share": waited / elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device | str, threshold: float,
             desc: str, keep: int = 0,
             memory_format: torch.memory_format = torch.contiguous_format) -> tuple[dict[str, float], torch.Tensor]:
    """Validation loss and metrics (per-image means and pooled), and the probabilities of the first `keep` images.

    Only `keep` maps are held (the TensorBoard previews): all of them would
    cost 123 MB per epoch at 256 px for nothing. Always in float32, whatever
    AMP trains in, so the scores are those test.py reproduces. Under torchrun
    each process scores its share and the per-image values of all are
    gathered, so every process returns the scores of the whole validation set.
    """
    model.eval()
    tracker, total_loss, count, probabilities = MetricTracker(), 0.0, 0, []
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main_process())
    for images, masks in bar:
        images, masks = images.to(device, memory_format=memory_format), masks.to(device)
        logits = model(images)
        total_loss += loss_fn(logits, masks).mean().item() * len(images)
        count += len(images)
        probs = sigmoid32(logits)
        tracker.update(probs > threshold, masks > 0.5)
        kept = sum(len(p) for p in probabilities)
        if kept < keep:
            probabilities.append(probs[:keep - kept].cpu())
        bar.set_postfix(loss=f"{total_loss / count:.4f}", dice=f"{np.mean(tracker.dice):.4f}")
    kept_maps = torch.cat(probabilities) if probabilities else torch.empty(0)
    shares = gather_objects((tracker, total_loss, count))
    if len(shares) > 1:
        trackers = [share[0] for share in shares]
        tracker = MetricTracker(dice=[v for t in trackers for v in t.dice], iou=[v for t in trackers for v in t.iou],
                                pixel_accuracy=[v for t in trackers for v in t.pixel_accuracy],
                                totals=sum(t.totals for t in trackers))
        total_loss, count = sum(share[1] for share in shares), sum(share[2] for share in shares)
    return {"loss": total_loss / count, **tracker.summary()}, kept_maps


def preview_panel(images: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """One row [image | true mask | predicted mask] per slice, stacked: (3, N*H, 3W) in [0, 1]."""
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    shown = ((images - low) / (high - low).clamp(min=1e-6)).mean(dim=1, keepdim=True)
    rows = torch.cat([shown, masks, (probs > threshold).float()], dim=3)  # (N, 1, H, 3W)
    return torch.cat(list(rows), dim=1).repeat(3, 1, 1)


@dataclass
class RunProgress:
    """What a run has finished so far: told to the user when it stops early."""

    run_dir: Path
    resumed: bool = False  # a resumed run's folder is never removed
    epochs_done: int = 0
    best_dice: float = -1.0
    best_epoch: int = 0


def main(argv: list[str] | None = None) -> int:
    """train.py's command line; the exit code (the process group is left on the way out)."""
    try:
        with sigterm_as_interrupt():
            return run(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(argv: list[str] | None) -> int:
    """Parse, check, then train in this process (one of several under torchrun); the exit code."""
    parser = build_parser(__doc__, keys=TRAINING_KEYS,
                          refusal="{option} is a test.py setting; train.py does not use it")
    parser.add_argument("--resume", metavar="RUN_FOLDER",
                        help="continue the run in RUN_FOLDER from its last.pt, with the settings of its "
                             "config.json; only --epochs may change (to extend a constant-schedule run)")
    args = parser.parse_args(argv)
    resumed, lock = None, None  # the lock is held until this function returns
    try:
        if args.resume:
            try:
                config, resumed, lock = resume_settings(args)
            except (ValueError, CheckpointError, OSError, RunFolderBusy) as error:
                return fail(str(error))
            if finished_already(Path(args.resume), config, resumed):
                return 0
        else:
            config = config_from_args(parser, args)
        # Check the device and the data before anything is written: a bad dataset leaves no run folder.
        try:
            config, device, data, split = check_run(config, args.resume if resumed is not None else None)
        except (dataset.DatasetError, ValueError) as error:
            return fail(str(error))
        run_dir, new_lock = open_run_folder(config, Path(args.resume) if resumed is not None else None)
        lock = lock or new_lock
        if isinstance(run_dir, str):
            return fail(run_dir)
        return train_and_report(config, data, split, device, RunProgress(run_dir, resumed=resumed is not None),
                                resumed)
    finally:
        if lock is not None:
            lock.close()  # releases the run folder


def resume_settings(args: argparse.Namespace) -> tuple[Config, dict, IO[str] | None]:
    """--resume: the run's config, its last.pt contents, and the run folder's lock (main process)."""
    # Flags given explicitly are the upper-case attributes present (the others are suppressed).
    flags = {name: value for name, value in vars(args).items() if name.isupper()}
    lock = None
    if is_main_process() and Path(args.resume, "last.pt").is_file():  # taken before last.pt is read
        lock = lock_run_folder(Path(args.resume))
    try:
        config, resumed = resume_point(Path(args.resume), flags)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return config, resumed, lock


def finished_already(run_dir: Path, config: Config, resumed: dict) -> bool:
    """Whether a resumed run has nothing left to do (said so on the console)."""
    if not ((run_dir / SUMMARY_FILE).is_file()
            and stop_reason(config, resumed["epoch"], resumed["best_epoch"], resumed["minutes"])):
        return False
    summary = read_summary(run_dir)
    if is_main_process():
        print(f"{run_dir} has finished ({summary['epochs_run']} epochs, {summary['stop_reason']}): "
              "nothing to do" + ("; give a larger --epochs to train it longer"
                                 if config.LR_SCHEDULE == "constant" and not config.PATIENCE else ""))
    return True


def check_run(config: Config, resume_dir: str | None) -> tuple[Config, torch.device, dataset.LoadedDataset,
                                                                dataset.Split]:
    """Device, precision, split column, data and split, checked; raises DatasetError or ValueError."""
    device, config = setup_runtime(config, distributed=True)  # config.json records the resolved AMP
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")  # one process speaks for all (errors still reach stderr)
    check_sampling(config, rank_and_world()[1])
    group_column, split_note = dataset.resolve_split_column(Path(config.DATA_ROOT), config.SPLIT_GROUP_COLUMN)
    config = dataclasses.replace(config, SPLIT_GROUP_COLUMN=group_column or "none")  # config.json: the result
    if is_main_process():
        print(("warning: " if not group_column else "") + split_note,
              file=sys.stderr if not group_column else sys.stdout)
    data = load_data(config)
    type_targets(config, data)  # a missing TYPE_COLUMN or value is refused before any run folder
    balance_labels(config, data)  # and so is a missing BALANCE_COLUMN or value
    split = split_run(config, data)
    check_steps(len(split.train), config, rank_and_world()[1])
    if resume_dir is not None:
        check_same_split(Path(resume_dir), data, split)
    return config, device, data, split


def open_run_folder(config: Config, resume_dir: Path | None) -> tuple[Path | str, IO[str] | None]:
    """The run folder (a new one, locked, or the resumed one) on every process, and its lock; a str says why not."""
    run_dir: Path | str | None = None
    lock = None
    if is_main_process():
        folders = [resume_dir] if resume_dir is not None else Path(config.RUNS_DIR).glob("*/")
        for folder in folders:
            for stale in remove_stale_staging(folder):
                print(f"removed {stale}, a temporary file left by an interrupted run")
        if resume_dir is not None:
            run_dir = resume_dir
        else:
            try:
                run_dir = new_output_dir(Path(config.RUNS_DIR), config.RUN_NAME)
                lock = lock_run_folder(run_dir)  # a --resume of this run while it trains is refused
            except OSError as error:
                run_dir = run_folder_refusal(Path(config.RUNS_DIR) / config.RUN_NAME, error)
    return from_main_process(run_dir), lock  # the other processes only need to know whether it exists


def train_and_report(config: Config, data: dataset.LoadedDataset, split: dataset.Split, device: torch.device,
                     progress: RunProgress, resumed: dict | None) -> int:
    """Train; on an interruption or failure, say what was kept. The exit code."""
    if resumed is not None and is_main_process():
        print(f"resuming {progress.run_dir} after epoch {resumed['epoch']} of {config.EPOCHS}")
    try:
        train(config, data, split, device, progress, resumed)
        return 0
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (utils.Terminated)
        cause, code = interruption(error)
        return stop_early(progress, f"interrupted ({cause}) during epoch {progress.epochs_done + 1}", code)
    except NonFiniteLossError as error:
        return stop_early(progress, f"{error}; stopped. Lower --learning-rate, check the loss weights "
                                    "and the data", 1)
    except (NoStepError, OutputError) as error:
        return stop_early(progress, str(error), 1)


def run_folder_refusal(folder: Path, error: OSError) -> str:
    """Why the run folder cannot be created; for an unfinished run already there, the command that continues it."""
    progress = run_progress(folder) if isinstance(error, FileExistsError) and is_unfinished_run(folder) else None
    if progress is None:
        return f"cannot create the run folder: {error}"
    done, epochs = progress
    _, world = rank_and_world()
    launcher = f"torchrun --nproc_per_node={world} train.py" if world > 1 else "python train.py"  # as launched
    return (f"cannot create the run folder: {folder} already exists and holds an unfinished train.py run "
            f"(epoch {done} of {epochs} in last.pt, no summary.json: it was stopped or killed, or is still "
            f"training). Continue it with\n    {launcher} --resume {shlex.quote(str(folder))}\n"
            "or choose another --run-name (or remove the folder) to start afresh")


def load_data(config: Config) -> dataset.LoadedDataset:
    """The checked, decoded data set, in memory or from the disk cache (CACHE); raises DatasetError.

    Under torchrun the main process builds a missing disk cache first; the others then open it.
    """
    cache_dir = Path(config.CACHE_DIR or Path(config.RUNS_DIR) / ".cache") if config.CACHE == "disk" else None
    builds_first = cache_dir is not None and dist.is_initialized()
    if builds_first and not is_main_process():
        dist.barrier()
    data = dataset.load_dataset(Path(config.DATA_ROOT), config.IMAGE_SIZE, config.IN_CHANNELS,
                                split_column(config), config.CROP, config.CROP_MARGIN, cache_dir)
    if builds_first and is_main_process():
        dist.barrier()
    return data


def type_targets(config: Config, data: dataset.LoadedDataset) -> tuple[list[str], list[int] | None]:
    """TYPE_COLUMN's classes (sorted values) and each image's class index; ([], None) without a TYPE_COLUMN."""
    if not config.TYPE_COLUMN:
        return [], None
    return dataset.type_labels(Path(config.DATA_ROOT), config.TYPE_COLUMN, data.pairs)


def balance_labels(config: Config, data: dataset.LoadedDataset) -> list[int] | None:
    """BALANCE_COLUMN's class index of each image of `data`; None without a BALANCE_COLUMN.

    Raises DatasetError naming a missing metadata.csv or column, and every image without a value.
    """
    if not config.BALANCE_COLUMN:
        return None
    return dataset.type_labels(Path(config.DATA_ROOT), config.BALANCE_COLUMN, data.pairs)[1]


def split_run(config: Config, data: dataset.LoadedDataset) -> dataset.Split:
    """The run's training, inner validation and held-out images (see dataset.three_way_split); raises ValueError."""
    root = Path(config.DATA_ROOT)
    if config.SPLIT_FILE:
        return dataset.read_split_file(Path(config.SPLIT_FILE), config.FOLD, [pair.stem for pair in data.pairs],
                                       data.groups)
    fold_labels = None
    if config.FOLD_COLUMN:
        fold_labels, problems = dataset.group_labels(root, config.FOLD_COLUMN, data.pairs)
        if problems:
            raise dataset.DatasetError(root, problems)
    return dataset.three_way_split(len(data.pairs), config.VAL_FRACTION, config.TEST_FRACTION, config.SPLIT_SEED,
                                   config.FOLDS, config.FOLD, data.groups, fold_labels, split_column(config),
                                   config.FOLD_COLUMN, root)


def split_record(config: Config, data: dataset.LoadedDataset, split: dataset.Split) -> dict:
    """split.json: how the split was made and every image's role (train, val or test)."""
    stems = {role: [data.pairs[i].stem for i in getattr(split, role)] for role in SPLIT_ROLES}
    return {"group_column": split_column(config), "seed": config.SPLIT_SEED, "val_fraction": config.VAL_FRACTION,
            "test_fraction": 0.0 if config.FOLDS or config.FOLD_COLUMN or config.SPLIT_FILE else config.TEST_FRACTION,
            "folds": config.FOLDS, "fold": config.FOLD, "fold_column": config.FOLD_COLUMN,
            "split_file": str(Path(config.SPLIT_FILE).resolve()) if config.SPLIT_FILE else "",
            "data_root": str(Path(config.DATA_ROOT).resolve()), "roles": SPLIT_ROLES, **stems}


def split_column(config: Config) -> str:
    """The metadata column `config` splits by ("auto" resolved); "" for a random split."""
    return dataset.resolve_split_column(Path(config.DATA_ROOT), config.SPLIT_GROUP_COLUMN)[0]


def fail(message: str) -> int:
    """Print `message` as an error (once, from the main process) and return exit code 1."""
    if is_main_process():
        print(f"error: {message}", file=sys.stderr)
    return 1


def stop_early(progress: RunProgress, reason: str, code: int) -> int:
    """Say why the run stopped and what it kept; remove its folder if no epoch finished (main process only)."""
    if not is_main_process():
        return code
    if progress.epochs_done == 0 and not progress.resumed:
        shutil.rmtree(progress.run_dir, ignore_errors=True)  # created by this run, holds no result
        print(f"\nerror: {reason}\nno epoch had finished: removed the run folder {progress.run_dir}",
              file=sys.stderr)
        return code
    print(f"\nerror: {reason}\nkept {progress.run_dir}: best.pt (epoch {progress.best_epoch}, validation Dice "
          f"{progress.best_dice:.4f}) and last.pt (epoch {progress.epochs_done})", file=sys.stderr)
    return code


def resume_point(run_dir: Path, flags: dict) -> tuple[Config, dict]:
    """The config saved in `run_dir` (EPOCHS from `flags` if given) and its last.pt contents.

    Raises ValueError when a flag contradicts the saved config, when --epochs
    would change a cosine schedule, or when last.pt cannot be resumed.
    """
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: not a run folder of train.py (no config.json)")
    saved, _ = Config.from_saved(read_saved_config(run_dir))
    contradicting = [f"--{name.lower().replace('_', '-')} {value} (the run has {getattr(saved, name)})"
                     for name, value in flags.items() if name != "EPOCHS" and not flag_matches(name, value, saved)]
    if contradicting:
        raise ValueError(f"--resume takes every setting from {config_path}; these flags contradict it: "
                         f"{', '.join(contradicting)}. Only --epochs may change; start a new run to change others")
    state = load_checkpoint(run_dir / "last.pt").state
    if "rng" not in state:
        raise ValueError(f"{run_dir / 'last.pt'}: written by a train.py without resume support "
                         "(no optimiser schedule or random states saved); start a new run")
    epochs = flags.get("EPOCHS", saved.EPOCHS)
    if epochs != saved.EPOCHS and saved.LR_SCHEDULE == "cosine":
        # T_max is EPOCHS x steps: another EPOCHS would bend the rest of a curve already half followed.
        raise ValueError(f"--epochs {epochs}: {run_dir} uses the cosine schedule, which decays to 0 over its "
                         f"{saved.EPOCHS} epochs; it cannot be extended or shortened. Start a new run instead")
    if epochs < state["epoch"]:
        raise ValueError(f"--epochs {epochs}: {run_dir} has already run {state['epoch']} epochs")
    return dataclasses.replace(saved, EPOCHS=epochs), state


def flag_matches(name: str, value: object, saved: Config) -> bool:
    """Whether flag `name` asks for what the run's `saved` config holds; "auto" values as they resolve now."""
    # config.json records what auto resolved to: AMP e.g. bf16 on this device, the split column e.g. patient_id
    if name == "AMP" and value == "auto":
        value = resolve_amp(pick_device(saved.DEVICE), value)
    if name == "SPLIT_GROUP_COLUMN" and value == "auto":
        value = dataset.resolve_split_column(Path(saved.DATA_ROOT), value)[0] or "none"
    return value == getattr(saved, name)


def check_same_split(run_dir: Path, data: dataset.LoadedDataset, split: dataset.Split) -> None:
    """Raise ValueError unless the data gives the split `run_dir` was trained on (its split.json)."""
    saved = read_split(run_dir)
    if any(saved.get(role, []) != [data.pairs[i].stem for i in getattr(split, role)] for role in SPLIT_ROLES):
        raise ValueError(f"the data at {saved['data_root']} no longer gives the split of "
                         f"{run_dir / 'split.json'} (files added, removed or renamed); start a new run")


def stop_reason(config: Config, epoch: int, best_epoch: int, minutes: float) -> str | None:
    """Why training stops after `epoch`: all epochs done, the time limit or PATIENCE; None to go on."""
    if epoch >= config.EPOCHS:
        return f"all {config.EPOCHS} epochs"
    if config.TIME_LIMIT_MINUTES and minutes >= config.TIME_LIMIT_MINUTES:
        return f"time limit of {config.TIME_LIMIT_MINUTES} min reached after epoch {epoch}"
    if config.PATIENCE and epoch - best_epoch >= config.PATIENCE:
        return f"early stop: no better validation Dice for {config.PATIENCE} epochs (best at epoch {best_epoch})"
    return None


def estimate_minutes(seconds_per_step: float, config: Config, train_steps: int, val_share: float) -> float:
    """Whole-run minutes from the first steps' speed: training steps plus validation (forward only, ~1/3 cost)."""
    per_epoch = seconds_per_step * train_steps * (1 + val_share / 3)
    minutes = per_epoch * config.EPOCHS / 60
    return min(minutes, config.TIME_LIMIT_MINUTES) if config.TIME_LIMIT_MINUTES else minutes


@dataclass
class Optimisation:
    """What a training step uses besides the model: built by `build_optimisation` for train.py and bench.py alike."""

    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    scaler: torch.amp.GradScaler  # a pass-through unless AMP is fp16
    loss_fn: BCEDiceLoss


def build_optimisation(model: torch.nn.Module, config: Config, device: torch.device,
                       steps_per_epoch: int) -> Optimisation:
    """Adam, the learning-rate schedule over the whole run, the fp16 loss scaler and the loss, as `config` says."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.LEARNING_RATE)
    scheduler = None
    if config.LR_SCHEDULE == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.EPOCHS * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=config.AMP == "fp16")
    loss_fn = BCEDiceLoss(config.BCE_WEIGHT, config.DICE_WEIGHT, reduction="none",  # per image: HARD_SAMPLING
                          type_weight=config.TYPE_WEIGHT, recall_weight=config.DICE_RECALL_WEIGHT)
    return Optimisation(optimizer, scheduler, scaler, loss_fn)


@dataclass
class Trainer:
    """One run's training objects, built by `setup_training`."""

    config: Config
    device: torch.device
    model: torch.nn.Module  # holds the weights the optimiser steps (checkpoints save them, or `ema`'s average)
    evaluated: torch.nn.Module  # what validation runs, compiled or not: `ema`'s average with EMA_DECAY, else `model`
    trained: torch.nn.Module  # `model` as it trains: compiled or not, in DDP under torchrun (averages the gradients)
    optimisation: Optimisation
    train_loader: DataLoader
    val_loader: DataLoader
    previews: tuple[torch.Tensor, torch.Tensor] | None  # the TensorBoard panel's validation images and masks
    memory_format: torch.memory_format
    announce_estimate: Callable[[int, float], None]
    ema: ModelEMA | None = None  # the average of `model`'s weights (EMA_DECAY), updated after every step


def train(config: Config, data: dataset.LoadedDataset, split: dataset.Split, device: torch.device,
          progress: RunProgress, resumed: dict | None = None) -> None:
    """The training run: writes the run folder, records each finished epoch in `progress`.

    `resumed` (last.pt's contents) continues that run exactly where it stopped.
    Under torchrun every process trains and validates its share; only the
    main process writes files.
    """
    set_seed(config.SEED)
    write_run_records(config, data, split, progress.run_dir, resumed is None)
    trainer = setup_training(config, data, split, device)
    minutes_before = start_or_restore(trainer, progress, resumed)
    reason, training_minutes = epoch_loop(trainer, progress, resumed is not None, minutes_before)
    if reason != f"all {config.EPOCHS} epochs":
        print(reason)
    if is_main_process():
        finish_run(trainer, data, split, progress, reason, training_minutes)


def write_run_records(config: Config, data: dataset.LoadedDataset, split: dataset.Split, run_dir: Path,
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


def setup_training(config: Config, data: dataset.LoadedDataset, split: dataset.Split,
                   device: torch.device) -> Trainer:
    """Loaders, model (on the device, compiled, DDP-wrapped as asked), optimisation and preview images."""
    type_classes, types = type_targets(config, data)
    train_loader, val_loader = make_loaders(data, split.train, split.val, config, pin_memory=device.type == "cuda",
                                            types=types)
    memory_format = memory_format_for(config.CHANNELS_LAST)
    model = build_model(config, type_classes)
    model.set_output_prior(dataset.mask_share(data.masks, split.train))
    model.to(device, memory_format=memory_format)
    optimisation = build_optimisation(model, config, device, len(train_loader))
    print(f"model: {config.MODEL}, {count_parameters(model) / 1e6:.2f} M parameters, on {device}"
          + "".join(f", {name}" for name, on in ((f"AMP {config.AMP}", config.AMP != "off"),
                                                 ("channels last", config.CHANNELS_LAST),
                                                 ("compiled", config.COMPILE),
                                                 (f"weight average (EMA) {config.EMA_DECAY}", config.EMA_DECAY)) if on)
          + (f", stem {config.STEM}" if config.STEM != "none" else "")
          + (f", deep supervision on {config.DEEP_SUPERVISION} decoder level(s)" if config.DEEP_SUPERVISION else "")
          + (f", type head on '{config.TYPE_COLUMN}' ({', '.join(type_classes)}; weight {config.TYPE_WEIGHT})"
             if type_classes else ""))
    example = next(iter(val_loader))[0].to(device, memory_format=memory_format) if config.COMPILE else None
    evaluated, trained, ema = runnable_models(model, config, device, example)
    shown = [val_loader.dataset[i] for i in list(val_loader.sampler)[:config.PREVIEW_IMAGES]]
    previews = tuple(map(torch.stack, zip(*shown, strict=True))) if shown else None
    announce = estimate_announcer(config, device, len(train_loader), len(split.val) / len(split.train))
    return Trainer(config, device, model, evaluated, trained, optimisation, train_loader, val_loader, previews,
                   memory_format, announce, ema)


def runnable_models(model: nn.Module, config: Config, device: torch.device,
                    example: torch.Tensor | None) -> tuple[nn.Module, nn.Module, ModelEMA | None]:
    """What validation runs, what trains, and the weight average (EMA_DECAY; None when 0): see Trainer.

    With COMPILE (`example`: a validation batch on the device) the model is
    compiled once; the average's copy is compiled apart, once: its parameters
    change in place, so validation does not recompile it every epoch. Where
    the model cannot be compiled (a warning said so), neither is the copy.
    """
    compiled = compile_model(model, example) if example is not None else model
    trained = compiled
    if rank_and_world()[1] > 1:
        trained = DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    if not config.EMA_DECAY:
        return compiled, trained, None
    ema = ModelEMA(model, config.EMA_DECAY)
    evaluated = compile_model(ema.module, example) if compiled is not model else ema.module
    return evaluated, trained, ema


def estimate_announcer(config: Config, device: torch.device, train_steps: int,
                       val_share: float) -> Callable[[int, float], None]:
    """An on_step callback that, after the first few steps, says how long the run will take (and how to go faster)."""
    def announce_estimate(step: int, seconds: float) -> None:
        """Called after each of the first epoch's steps; speaks once."""
        if step != min(ESTIMATE_AFTER_STEPS, train_steps):
            return
        minutes = estimate_minutes(seconds / step, config, train_steps, val_share)
        tqdm.write(f"estimated time: {format_minutes(minutes)} for {config.EPOCHS} epochs "
                   f"(from the speed of the first {step} steps)")
        if device.type == "cpu" and minutes > 60:
            tqdm.write("hint: these settings are slow on a CPU; " + FAST_CPU_HINT)
    return announce_estimate


def start_or_restore(trainer: Trainer, progress: RunProgress, resumed: dict | None) -> float:
    """A new run's history.csv header, or a resumed run's state put back; the minutes trained before."""
    history_path = progress.run_dir / "history.csv"
    if resumed is None:
        if is_main_process():
            save_csv_row(history_path, HISTORY_COLUMNS)
        return 0.0
    o = trainer.optimisation
    restore_training_state(resumed, trainer.model, o.optimizer, o.scheduler, o.scaler, trainer.train_loader,
                           trainer.ema)
    progress.epochs_done, progress.best_dice = resumed["epoch"], resumed["best_dice"]
    progress.best_epoch = resumed["best_epoch"]
    if is_main_process():
        keep_history_until(history_path, progress.epochs_done)
        if (progress.run_dir / SUMMARY_FILE).is_file():  # an extension: unfinished again until its new last epoch
            (progress.run_dir / SUMMARY_FILE).unlink()
            print(f"{progress.run_dir / SUMMARY_FILE} removed until the extension finishes (a killed extension "
                  "is an unfinished run); the decision rule is searched again at its end")
    rank, world = rank_and_world()
    restore_random_draws(resumed, trainer.train_loader, rank, world, speak=is_main_process())
    return resumed["minutes"]


def epoch_loop(trainer: Trainer, progress: RunProgress, resumed: bool, minutes_before: float) -> tuple[str, float]:
    """Train epoch after epoch until `stop_reason` says stop; the reason, and the minutes trained in all."""
    config, run_dir = trainer.config, progress.run_dir
    # purge_step: a resumed run drops the curves' points after its last checkpoint, so no segment is doubled.
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=progress.epochs_done + 1 if resumed else None) \
        if is_main_process() else None
    started = time.perf_counter() - minutes_before * 60  # the time limit counts the time before a resume too
    reason = stop_reason(config, progress.epochs_done, progress.best_epoch, minutes_before) if resumed else None
    try:
        epoch = progress.epochs_done
        while reason is None:
            epoch += 1
            train_metrics, val, probs, row = run_epoch(trainer, epoch)
            # Records first, then the checkpoints, best.pt before last.pt: a kill in between leaves records
            # of an epoch last.pt lacks, which a resume drops (history rows, purge_step); once last.pt holds
            # an epoch, best.pt exists and every record of it is written.
            if writer is not None:
                record_epoch(writer, run_dir / "history.csv", trainer, row, train_metrics, val, probs)
            minutes = (time.perf_counter() - started) / 60
            improved = save_epoch(trainer, progress, epoch, val, minutes)
            print(f"epoch {epoch:3d}  train loss {train_metrics['loss']:.4f} dice {train_metrics['dice']:.4f}  |  "
                  f"val loss {val['loss']:.4f} dice {val['dice']:.4f} iou {val['iou']:.4f} "
                  f"acc {val['pixel_accuracy']:.4f}  |  {train_metrics['images_per_second']:.1f} img/s"
                  + ("  * best" if improved else ""), flush=True)
            reason = from_main_process(stop_reason(config, epoch, progress.best_epoch, minutes))  # clocks differ
    finally:
        if writer is not None:
            writer.close()
    return reason, (time.perf_counter() - started) / 60


def run_epoch(trainer: Trainer, epoch: int) -> tuple[dict[str, float], dict[str, float], torch.Tensor, dict]:
    """Train one epoch and validate: training metrics, validation metrics, preview maps and the history row."""
    t, o, config = trainer, trainer.optimisation, trainer.config
    epoch_start = time.perf_counter()
    if isinstance(t.train_loader.sampler, DistributedSampler):
        t.train_loader.sampler.set_epoch(epoch)  # another shuffle each epoch, the same in every process
    train_metrics = train_one_epoch(t.trained, t.train_loader, o.loss_fn, o.optimizer, o.scheduler, t.device,
                                    config.THRESHOLD, f"epoch {epoch}/{config.EPOCHS} train",
                                    t.announce_estimate if epoch == 1 else None, config.AMP, o.scaler,
                                    t.memory_format, t.ema)
    if rank_and_world()[1] > 1:  # BatchNorm statistics: each process updated its own; validate with the saved ones
        for buffer in t.model.buffers():
            dist.broadcast(buffer, src=0)
        if t.ema is not None:
            t.ema.copy_buffers()  # the average's are the model's (see ModelEMA): rank 0's now, as saved
    val, probs = evaluate(t.evaluated, t.val_loader, o.loss_fn, t.device, config.THRESHOLD,
                          f"epoch {epoch}/{config.EPOCHS} val", 0 if t.previews is None else len(t.previews[0]),
                          t.memory_format)
    row = {"epoch": epoch, "train_loss": train_metrics["loss"], "train_dice": train_metrics["dice"],
           "val_loss": val["loss"], "val_dice": val["dice"], "val_iou": val["iou"],
           "val_pixel_accuracy": val["pixel_accuracy"], "val_dice_pooled": val["dice_pooled"],
           "val_iou_pooled": val["iou_pooled"], "learning_rate": o.optimizer.param_groups[0]["lr"],
           "train_images_per_second": train_metrics["images_per_second"],
           "data_wait_share": train_metrics["data_wait_share"],
           "epoch_seconds": time.perf_counter() - epoch_start}
    return train_metrics, val, probs, row


def record_epoch(writer: SummaryWriter, history_path: Path, trainer: Trainer, row: dict,
                 train_metrics: dict[str, float], val: dict[str, float], probs: torch.Tensor) -> None:
    """One finished epoch in history.csv and TensorBoard (curves and the preview panel)."""
    epoch = row["epoch"]
    save_csv_row(history_path, [row[c] for c in HISTORY_COLUMNS], append=True)
    for name in ("loss", "dice"):
        writer.add_scalar(f"{name}/train", train_metrics[name], epoch)
    for name in ("loss", "dice", "iou", "pixel_accuracy", "dice_pooled"):
        writer.add_scalar(f"{name}/val", val[name], epoch)
    writer.add_scalar("learning_rate", row["learning_rate"], epoch)
    if trainer.previews is not None:
        writer.add_image("val/image_truth_prediction",
                         preview_panel(*trainer.previews, probs, trainer.config.THRESHOLD), epoch)
    writer.flush()


def save_epoch(trainer: Trainer, progress: RunProgress, epoch: int, val: dict[str, float], minutes: float) -> bool:
    """Checkpoint the epoch (last.pt, and best.pt when it improved) and record it in `progress`; whether it improved."""
    improved = val["dice"] > progress.best_dice
    best_dice, best_epoch = (val["dice"], epoch) if improved else (progress.best_dice, progress.best_epoch)
    o = trainer.optimisation
    state = training_state(trainer.config, trainer.model, o.optimizer, o.scheduler, o.scaler, trainer.train_loader,
                           {"epoch": epoch, "best_dice": best_dice, "best_epoch": best_epoch, "minutes": minutes},
                           val, trainer.ema)  # collective: every process takes part
    if is_main_process():
        run_dir = progress.run_dir
        save_checkpoints([run_dir / "best.pt", run_dir / "last.pt"] if improved else [run_dir / "last.pt"], state)
    progress.best_dice, progress.best_epoch, progress.epochs_done = best_dice, best_epoch, epoch
    return improved


def finish_run(trainer: Trainer, data: dataset.LoadedDataset, split: dataset.Split, progress: RunProgress,
               reason: str, training_minutes: float) -> None:
    """After the last epoch (main process): the decision rule search, summary.json and TensorBoard's HParams."""
    config, run_dir = trainer.config, progress.run_dir
    rule_summary = choose_decision_rule(run_dir / "best.pt", [data.pairs[i] for i in split.val], config,
                                        trainer.device) \
        if config.SEARCH_RULE else None
    save_json(run_dir / SUMMARY_FILE, {
        "best_epoch": progress.best_epoch, "best_val_dice": progress.best_dice, "epochs_run": progress.epochs_done,
        "stop_reason": reason, "patience": config.PATIENCE, "minutes": training_minutes,
        "train_images": len(split.train), "val_images": len(split.val), "test_images": len(split.test),
        "device": str(trainer.device),
        "recipe": config.RECIPE, "decision_rule": rule_summary})
    # TensorBoard's HParams tab: this run's settings beside its final scores, to compare runs side by side.
    final_scores = {"hparam/best_val_dice": progress.best_dice, "hparam/best_epoch": progress.best_epoch,
                    "hparam/epochs_run": progress.epochs_done, "hparam/minutes": training_minutes}
    if rule_summary is not None:
        final_scores["hparam/val_dice_with_rule"] = rule_summary["val_dice_with_rule"]
    with SummaryWriter(log_dir=str(run_dir)) as hparams_writer:
        hparams_writer.add_hparams(config.to_dict(), final_scores, run_name=".")  # ".": the run folder itself
    print(f"\nrun folder: {run_dir}\nbest epoch: {progress.best_epoch}, validation Dice {progress.best_dice:.4f}\n"
          f"curves:     tensorboard --logdir {config.RUNS_DIR}")


def format_minutes(minutes: float) -> str:
    """'45 s', '12.5 min' or '19.2 h'."""
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


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


if __name__ == "__main__":
    sys.exit(main())
