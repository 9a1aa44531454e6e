"""The optimiser, its learning-rate schedule, the fp16 loss scaler and the loss, as a config asks for them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LRScheduler

from config import Config
from losses import BCEDiceLoss


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
