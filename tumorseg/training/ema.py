"""An exponential moving average (EMA) of a model's weights, updated after every optimiser step (EMA_DECAY).

train.py validates and checkpoints the average instead of the last step's
weights; the average of the recent steps is often smoother and scores better
(an option to measure, off by default).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

WARMUP = 10  # the warm-up's denominator offset: d_k <= (1 + k) / (WARMUP + k)


class ModelEMA:
    """A copy of `source` whose parameters follow the exponential moving average of `source`'s.

    Update k (k = 0 after the first optimiser step, 1 after the second, ...)
    does, for every parameter,

        d_k = min(decay, (1 + k) / (10 + k))
        average_k = d_k * average_(k-1) + (1 - d_k) * weights_k

    with average_(-1) the weights at construction (the random initialisation).
    The warm-up factor (TensorFlow's ExponentialMovingAverage with num_updates,
    timm's warm-up alike) keeps the first averages from being dominated by the
    random initial weights: d_0 = 0.1, d_8 = 0.5, d_80 = 0.9, d_890 = 0.99, d_8991 = 0.999.

    Buffers (BatchNorm's running statistics, num_batches_tracked) are copied
    from `source`, not averaged: they are already a running average (momentum
    0.1) of the live network's activations, and an integer counter cannot be
    averaged; averaging them again would only add lag. They then describe the
    live weights' activations rather than exactly the averaged weights' (which
    only a pass over data could measure); timm's default of averaging them is
    no more exact.

    `source` is the plain model: torch.compile's and DistributedDataParallel's
    wrappers share its parameters, so the average follows whatever trains them.
    Under torchrun every process's parameters are identical after each step,
    so every process keeps the same average without communicating.
    """

    def __init__(self, source: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie strictly between 0 and 1, got {decay}")
        self.source = source
        self.decay = decay
        self.updates = 0  # k of the next update
        # deepcopy keeps the device, dtype and memory format (channels last) of every tensor, draws no random number
        self.module = copy.deepcopy(source).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """d_k of the next update: min(decay, (1 + k) / (10 + k)) with k = `updates`."""
        return min(self.decay, (1 + self.updates) / (WARMUP + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards `source`'s current parameters (one optimiser step's) and copy its buffers."""
        decay = self.current_decay()
        for average, weights in zip(self.module.parameters(), self.source.parameters(), strict=True):
            average.lerp_(weights.detach(), 1 - decay)  # average + (1 - d) (weights - average)
        self.copy_buffers()
        self.updates += 1

    @torch.no_grad()
    def copy_buffers(self) -> None:
        """Give the average `source`'s buffers (e.g. after torchrun's processes took rank 0's statistics)."""
        for own, live in zip(self.module.buffers(), self.source.buffers(), strict=True):
            own.copy_(live)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the averaged weights (which it stores as its model): the update count."""
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Put back a checkpoint's averaged `weights` and `state_dict()`, in place (compiled wrappers stay valid)."""
        self.module.load_state_dict(weights)
        self.updates = state["updates"]
