"""A training checkpoint's full state (beyond the weights), and putting a resumed run back where it stopped.

last.pt and best.pt hold the model, optimiser, learning-rate schedule, loss
scaler, hard-example or balanced sampler and every process's random states, so that
`train.py --resume` continues exactly; utils.save_checkpoints and
utils.load_checkpoint write and read the files themselves. With EMA_DECAY,
"model" holds the averaged weights (what test.py, export.py and the decision
rule's search load), "trained_model" the last step's and "ema" the average's
update count.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from tumorseg.data import sampling
from config import Config
from tumorseg.training.ema import ModelEMA
from utils import gather_objects, model_arguments, random_states, restore_random_states


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
    (utils.load_checkpoint: test.py, export.py, the decision rule's search),
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
