"""Glue shared by train.py and test.py: seeding, devices, run folders, checkpoints, files."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from config import Config
from model import UNet


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not fit the model its config describes."""


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; any other name is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_model(config: Config) -> UNet:
    """The U-Net described by a config (IN_CHANNELS, BASE_CHANNELS, DEPTH, BILINEAR)."""
    return UNet(config.IN_CHANNELS, config.BASE_CHANNELS, config.DEPTH, config.BILINEAR)


def new_output_dir(parent: Path, name: str) -> Path:
    """Create parent/name, or parent/<timestamp> when name is empty; never reuse an existing folder."""
    parent = Path(parent)
    if not name:
        name = datetime.now().strftime("%Y%m%d-%H%M%S")
        base, suffix = name, 1
        while (parent / name).exists():  # two runs started in the same second
            suffix += 1
            name = f"{base}-{suffix}"
    folder = parent / name
    if folder.exists():
        raise FileExistsError(f"{folder}: already exists; choose another name or remove it")
    folder.mkdir(parents=True)
    return folder


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path), then rename onto `path`, so readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    metrics: dict[str, float], config: Config) -> None:
    """Weights, optimiser state, epoch, validation metrics and the config, atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "metrics": metrics, "config": config.to_dict()}
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[UNet, Config, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as, with its weights; returns (model, config, checkpoint).

    Loads with weights_only=True: tensors and plain values only, so a crafted
    file cannot run code. Raises CheckpointError naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # pickle, zip and weights-only refusals all land here
        raise CheckpointError(f"{path}: cannot be loaded safely as a checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= set(checkpoint):
        raise CheckpointError(f"{path}: not a checkpoint of this project (needs 'model' and 'config')")
    try:
        config = Config.from_dict(checkpoint["config"])
        model = build_model(config)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes ({error})") from error
    return model.to(device), config, checkpoint
