"""One optimisation step, one training epoch and one validation pass: the arithmetic of training."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from metrics import MetricTracker, dice_per_image
from tumorseg.data import sampling
from tumorseg.inference.predict import sigmoid32
from tumorseg.training.ema import ModelEMA
from utils import autocast, average_over_processes, gather_objects, is_main_process, rank_and_world


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
        if isinstance(loader.sampler, sampling.HardExampleSampler):
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
