"""Checkpoint files: writing and reading them, and the full training state they hold for an exact resume.

last.pt and best.pt hold the model, optimiser, learning-rate schedule, loss
scaler, hard-example or balanced sampler and every process's random states, so that
`train.py --resume` continues exactly; `save_checkpoints` and `load_checkpoint`
write and read the files themselves. With EMA_DECAY, "model" holds the
averaged weights (what test.py, export.py and the decision rule's search
load), "trained_model" the last step's and "ema" the average's update count.
"""

from __future__ import annotations

import io
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from config import Config
from model import build_model_from_arguments, model_arguments
from tumorseg.data import sampling
from tumorseg.files import write_atomic
from tumorseg.training.ema import ModelEMA
from utils import gather_objects, random_states, restore_random_states


STATEFUL_SAMPLERS = (sampling.HardExampleSampler, sampling.BalancedSampler)  # their state goes into checkpoints


def stateful_sampler(
        loader: torch.utils.data.DataLoader) -> sampling.HardExampleSampler | sampling.BalancedSampler | None:
    """The loader's sampler when it keeps state across epochs (HARD_SAMPLING, BALANCE_COLUMN); None otherwise."""
    return loader.sampler if isinstance(loader.sampler, STATEFUL_SAMPLERS) else None


def training_state(config: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None,
                   scaler: torch.amp.GradScaler, train_loader: torch.utils.data.DataLoader,
                   progress: dict[str, Any], val: dict[str, float], ema: ModelEMA | None = None) -> dict[str, Any]:
    """Everything a checkpoint saves after an epoch; `progress` holds epoch, best_dice, best_epoch and minutes.

    Collective under torchrun: every process's random states are gathered.
    With `ema`, "model" is the averaged weights (see `model_entries`).
    """
    sampler = stateful_sampler(train_loader)
    return {"model_args": model_arguments(config, getattr(model, "type_classes", ())), **model_entries(model, ema),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(),
            "sampler": sampler.state_dict() if sampler is not None else None,
            **progress,
            "rng": gather_objects(random_states(train_loader.generator, train_loader.dataset.transform)),
            "metrics": {k: float(v) for k, v in val.items()}, "config": config.to_dict()}


def model_entries(model: nn.Module, ema: ModelEMA | None) -> dict[str, Any]:
    """A checkpoint's weights: {"model": ...} alone without `ema` (EMA_DECAY 0).

    With `ema`, "model" is the averaged weights, the key every loader reads
    (load_checkpoint: test.py, export.py, the decision rule's search),
    so they use the average unchanged; the last step's weights ("trained_model")
    and the average's state ("ema") are kept for an exact --resume.
    """
    if ema is None:
        return {"model": model.state_dict()}
    return {"model": ema.module.state_dict(), "trained_model": model.state_dict(), "ema": ema.state_dict()}


def restore_training_state(resumed: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any | None, scaler: torch.amp.GradScaler,
                           train_loader: torch.utils.data.DataLoader, ema: ModelEMA | None = None) -> None:
    """Load last.pt's weights, optimiser, schedule, scaler, sampler and `ema` state into the freshly built objects."""
    if ema is None:
        model.load_state_dict(resumed["model"])
    else:
        model.load_state_dict(resumed["trained_model"])
        ema.load_state_dict(resumed["model"], resumed["ema"])
    optimizer.load_state_dict(resumed["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(resumed["scheduler"])
    scaler.load_state_dict(resumed["scaler"])
    sampler = stateful_sampler(train_loader)
    if sampler is not None:
        sampler.load_state_dict(resumed["sampler"])


def restore_random_draws(resumed: dict[str, Any], train_loader: torch.utils.data.DataLoader, rank: int, world: int,
                         speak: bool) -> None:
    """Give this process the random states it had when last.pt was written; a warning (if `speak`) if it cannot.

    Call last, after everything that draws random numbers while being built (the model's initial weights).
    """
    if len(resumed["rng"]) == world:
        restore_random_states(resumed["rng"][rank], train_loader.generator, train_loader.dataset.transform)
    elif speak:
        print(f"warning: the run had {len(resumed['rng'])} process(es), this resume has {world}: it goes on "
              "from last.pt, but draws other random batches than the original run would have", file=sys.stderr)


CHECKPOINT_FORMAT = 2  # 2: model_args stored apart from the config; 1: config only


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not fit the model its config describes."""


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """torch.save of `state` into memory: serialised once, then written to one or more files."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoints(paths: list[Path], state: dict[str, Any]) -> None:
    """Write one checkpoint state to each path, atomically; serialised once."""
    payload = checkpoint_bytes({"format_version": CHECKPOINT_FORMAT, **state})
    for path in paths:
        write_atomic(path, payload)


@dataclass
class LoadedCheckpoint:
    """A checkpoint's rebuilt model (weights loaded), its training config, raw contents and load warnings."""

    model: nn.Module
    config: Config
    state: dict[str, Any]
    warnings: list[str]


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Rebuild the model a checkpoint was trained as, with its weights.

    Loads with weights_only=True: tensors and plain values only, so a crafted
    file cannot run code. The network is rebuilt from the checkpoint's own
    `model_args`, so renaming a config key never orphans old weights; config
    keys this version does not know are dropped with a warning, missing ones
    take today's defaults (new keys default to the old behaviour). Checkpoints
    written before `format_version` existed load with a warning. Raises
    CheckpointError naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); an interrupted copy or save? "
                              "use another checkpoint, e.g. last.pt or best.pt of the run")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"{path}: not a checkpoint written by torch.save (not a zip archive); "
                              "truncated, or another kind of file?")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused an object beyond tensors and plain values
        raise CheckpointError(f"{path}: cannot be loaded safely as a checkpoint: it holds Python objects "
                              "that could run code when loaded; use a checkpoint written by train.py") from error
    except Exception as error:  # truncated zips, random bytes, other formats
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint of this project ({reason})") from error
    if not isinstance(state, dict) or not {"model", "config"} <= set(state):
        raise CheckpointError(f"{path}: not a checkpoint of this project (needs 'model' and 'config')")
    warnings: list[str] = []
    version = state.get("format_version", 1)
    if version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: written by a newer version of this project (format {version}, "
                              f"this one reads up to {CHECKPOINT_FORMAT}); update the code")
    if version < CHECKPOINT_FORMAT:
        warnings.append(f"{path}: written by an older version of this project (format {version}); "
                        "loaded, but re-save it by training again to silence this warning")
    try:
        config, dropped = Config.from_saved(state["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its saved config is not valid for this version ({error})") from error
    if dropped:
        warnings.append(f"{path}: config keys this version does not know were ignored: {', '.join(dropped)}")
    try:
        arguments = state.get("model_args") or model_arguments(config)
        model = build_model_from_arguments(arguments)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path}: weights do not fit the model the checkpoint describes ({error})") from error
    return LoadedCheckpoint(model.to(device), config, state, warnings)
