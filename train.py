"""Train the U-Net; keep the checkpoint with the best validation Dice.

    python train.py                                   # config.py as it is
    python train.py --epochs 3 --image-size 128       # any config key as --foo-bar VALUE
    python train.py --resume runs/<name>              # continue a run from its last.pt
    torchrun --standalone --nproc_per_node 4 train.py # 4 GPUs of one machine (BATCH_SIZE per process)

Writes RUNS_DIR/<run name>/: config.json, split.json, history.csv,
summary.json, best.pt, last.pt and TensorBoard event files.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from config import TRAINING_KEYS, Config, build_parser, config_from_args
import dataset
from model import build_model, count_parameters
from tumorseg.data import checks, splits
from tumorseg.files import OutputError
from tumorseg.inference.postprocess import choose_decision_rule
from tumorseg.runs import records, runfolder
from tumorseg.runs.checkpoints import (CheckpointError, restore_random_draws, restore_training_state, save_checkpoints,
                                       training_state)
from tumorseg.runs.runfolder import RunFolderBusy, RunProgress
from tumorseg.training import loaders, steps
from tumorseg.training.ema import ModelEMA
from tumorseg.training.optimisation import Optimisation, build_optimisation
from tumorseg.training.steps import NonFiniteLossError, NoStepError
from tumorseg.training.timing import estimate_announcer, stop_reason
from utils import (compile_model, from_main_process, interruption, is_main_process, memory_format_for, rank_and_world,
                   set_seed, setup_runtime, sigterm_as_interrupt)

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
            # Flags given explicitly are the upper-case attributes present (the others are suppressed).
            flags = {name: value for name, value in vars(args).items() if name.isupper()}
            try:
                config, resumed, lock = runfolder.resume_settings(Path(args.resume), flags)
            except (ValueError, CheckpointError, OSError, RunFolderBusy) as error:
                return fail(str(error))
            if runfolder.finished_already(Path(args.resume), config, resumed):
                return 0
        else:
            config = config_from_args(parser, args)
        # Check the device and the data before anything is written: a bad dataset leaves no run folder.
        try:
            config, device, data, split = check_run(config, args.resume if resumed is not None else None)
        except (checks.DatasetError, ValueError) as error:
            return fail(str(error))
        run_dir, new_lock = runfolder.open_run_folder(config, Path(args.resume) if resumed is not None else None)
        lock = lock or new_lock
        if isinstance(run_dir, str):
            return fail(run_dir)
        return train_and_report(config, data, split, device, RunProgress(run_dir, resumed=resumed is not None),
                                resumed)
    finally:
        if lock is not None:
            lock.close()  # releases the run folder


def train(config: Config, data: dataset.LoadedDataset, split: splits.Split, device: torch.device,
          progress: RunProgress, resumed: dict | None = None) -> None:
    """The training run: set up, then for each epoch train, validate, record, checkpoint; then the decision rule.

    Writes the run folder and records each finished epoch in `progress`.
    `resumed` (last.pt's contents) continues that run exactly where it stopped.
    Under torchrun every process trains and validates its share; only the
    main process writes files.
    """
    set_seed(config.SEED)
    run_dir = progress.run_dir
    records.write_run_records(config, data, split, run_dir, resumed is None)
    t = setup_training(config, data, split, device)
    minutes_before = start_or_restore(t, progress, resumed)
    # purge_step: a resumed run drops the curves' points after its last checkpoint, so no segment is doubled.
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=progress.epochs_done + 1 if resumed is not None else None) \
        if is_main_process() else None
    started = time.perf_counter() - minutes_before * 60  # the time limit counts the time before a resume too
    reason = stop_reason(config, progress.epochs_done, progress.best_epoch, minutes_before) \
        if resumed is not None else None
    try:
        epoch = progress.epochs_done
        while reason is None:
            epoch += 1
            epoch_start = time.perf_counter()
            train_metrics = train_epoch(t, epoch)
            val, probs = steps.evaluate(t.evaluated, t.val_loader, t.optimisation.loss_fn, device, config.THRESHOLD,
                                        f"epoch {epoch}/{config.EPOCHS} val",
                                        0 if t.previews is None else len(t.previews[0]), t.memory_format)
            row = records.history_row(epoch, train_metrics, val, t.optimisation.optimizer.param_groups[0]["lr"],
                                      time.perf_counter() - epoch_start)
            # Records first, then the checkpoints, best.pt before last.pt: a kill in between leaves records
            # of an epoch last.pt lacks, which a resume drops (history rows, purge_step); once last.pt holds
            # an epoch, best.pt exists and every record of it is written.
            if writer is not None:
                records.record_epoch(writer, run_dir, row, train_metrics, val, probs, t.previews, config.THRESHOLD)
            minutes = (time.perf_counter() - started) / 60
            improved = save_epoch(t, progress, epoch, val, minutes)
            print(f"epoch {epoch:3d}  train loss {train_metrics['loss']:.4f} dice {train_metrics['dice']:.4f}  |  "
                  f"val loss {val['loss']:.4f} dice {val['dice']:.4f} iou {val['iou']:.4f} "
                  f"acc {val['pixel_accuracy']:.4f}  |  {train_metrics['images_per_second']:.1f} img/s"
                  + ("  * best" if improved else ""), flush=True)
            reason = from_main_process(stop_reason(config, epoch, progress.best_epoch, minutes))  # clocks differ
    finally:
        if writer is not None:
            writer.close()
    training_minutes = (time.perf_counter() - started) / 60
    if reason != f"all {config.EPOCHS} epochs":
        print(reason)
    if is_main_process():  # the decision rule on the validation images, then summary.json: the run has finished
        rule_summary = choose_decision_rule(run_dir / "best.pt", [data.pairs[i] for i in split.val], config,
                                            device) if config.SEARCH_RULE else None
        records.write_summary(config, split, progress, reason, training_minutes, device, rule_summary)
        print(f"\nrun folder: {run_dir}\nbest epoch: {progress.best_epoch}, validation Dice {progress.best_dice:.4f}\n"
              f"curves:     tensorboard --logdir {config.RUNS_DIR}")


def check_run(config: Config, resume_dir: str | None) -> tuple[Config, torch.device, dataset.LoadedDataset,
                                                                splits.Split]:
    """Device, precision, split column, data and split, checked; raises DatasetError or ValueError."""
    device, config = setup_runtime(config, distributed=True)  # config.json records the resolved AMP
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")  # one process speaks for all (errors still reach stderr)
    loaders.check_sampling(config, rank_and_world()[1])
    group_column, split_note = splits.resolve_split_column(Path(config.DATA_ROOT), config.SPLIT_GROUP_COLUMN)
    config = dataclasses.replace(config, SPLIT_GROUP_COLUMN=group_column or "none")  # config.json: the result
    if is_main_process():
        print(("warning: " if not group_column else "") + split_note,
              file=sys.stderr if not group_column else sys.stdout)
    data = loaders.load_data(config)
    loaders.type_targets(config, data)  # a missing TYPE_COLUMN or value is refused before any run folder
    loaders.balance_labels(config, data)  # and so is a missing BALANCE_COLUMN or value
    split = loaders.split_run(config, data)
    loaders.check_steps(len(split.train), config, rank_and_world()[1])
    if resume_dir is not None:
        runfolder.check_same_split(Path(resume_dir), data, split)
    return config, device, data, split


def train_and_report(config: Config, data: dataset.LoadedDataset, split: splits.Split, device: torch.device,
                     progress: RunProgress, resumed: dict | None) -> int:
    """Train; on an interruption or failure, say what was kept. The exit code."""
    if resumed is not None and is_main_process():
        print(f"resuming {progress.run_dir} after epoch {resumed['epoch']} of {config.EPOCHS}")
    try:
        train(config, data, split, device, progress, resumed)
        return 0
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (utils.Terminated)
        cause, code = interruption(error)
        return runfolder.stop_early(progress, f"interrupted ({cause}) during epoch {progress.epochs_done + 1}",
                                    code)
    except NonFiniteLossError as error:
        return runfolder.stop_early(progress, f"{error}; stopped. Lower --learning-rate, check the loss weights "
                                              "and the data", 1)
    except (NoStepError, OutputError) as error:
        return runfolder.stop_early(progress, str(error), 1)


def fail(message: str) -> int:
    """Print `message` as an error (once, from the main process) and return exit code 1."""
    if is_main_process():
        print(f"error: {message}", file=sys.stderr)
    return 1


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


def setup_training(config: Config, data: dataset.LoadedDataset, split: splits.Split,
                   device: torch.device) -> Trainer:
    """Loaders, model (on the device, compiled, DDP-wrapped as asked), optimisation and preview images."""
    type_classes, types = loaders.type_targets(config, data)
    train_loader, val_loader = loaders.make_loaders(data, split.train, split.val, config,
                                                    pin_memory=device.type == "cuda", types=types)
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


def start_or_restore(trainer: Trainer, progress: RunProgress, resumed: dict | None) -> float:
    """A new run's history.csv header, or a resumed run's state put back; the minutes trained before."""
    if resumed is None:
        if is_main_process():
            records.start_history(progress.run_dir)
        return 0.0
    o = trainer.optimisation
    restore_training_state(resumed, trainer.model, o.optimizer, o.scheduler, o.scaler, trainer.train_loader,
                           trainer.ema)
    progress.epochs_done, progress.best_dice = resumed["epoch"], resumed["best_dice"]
    progress.best_epoch = resumed["best_epoch"]
    if is_main_process():
        records.keep_history_until(progress.run_dir / records.HISTORY_FILE, progress.epochs_done)
        runfolder.reopen_extension(progress.run_dir)
    rank, world = rank_and_world()
    restore_random_draws(resumed, trainer.train_loader, rank, world, speak=is_main_process())
    return resumed["minutes"]


def train_epoch(trainer: Trainer, epoch: int) -> dict[str, float]:
    """Train one epoch; under torchrun the processes then validate with rank 0's BatchNorm statistics, as saved."""
    t, o, config = trainer, trainer.optimisation, trainer.config
    if isinstance(t.train_loader.sampler, DistributedSampler):
        t.train_loader.sampler.set_epoch(epoch)  # another shuffle each epoch, the same in every process
    train_metrics = steps.train_one_epoch(t.trained, t.train_loader, o.loss_fn, o.optimizer, o.scheduler, t.device,
                                          config.THRESHOLD, f"epoch {epoch}/{config.EPOCHS} train",
                                          t.announce_estimate if epoch == 1 else None, config.AMP, o.scaler,
                                          t.memory_format, t.ema)
    if rank_and_world()[1] > 1:  # BatchNorm statistics: each process updated its own; validate with the saved ones
        for buffer in t.model.buffers():
            dist.broadcast(buffer, src=0)
        if t.ema is not None:
            t.ema.copy_buffers()  # the average's are the model's (see ModelEMA): rank 0's now, as saved
    return train_metrics


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




if __name__ == "__main__":
    sys.exit(main())
