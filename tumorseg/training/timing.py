"""How long a run goes on: when it stops (epochs, time limit, patience) and the estimate of its duration."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from config import Config

ESTIMATE_AFTER_STEPS = 5  # steps timed before the whole run's duration is estimated
FAST_CPU_HINT = "--recipe cpu is made for a CPU (see README, Recipes, for its time)"


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


def format_minutes(minutes: float) -> str:
    """'45 s', '12.5 min' or '19.2 h'."""
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
