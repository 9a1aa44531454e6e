"""The data a training run draws on: the data set loaded and split, its per-image labels, the loaders batching it."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from config import Config
import dataset
from tumorseg.data import augmentation, checks, sampling, splits
from utils import is_main_process, rank_and_world


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
    return checks.type_labels(Path(config.DATA_ROOT), config.TYPE_COLUMN, data.pairs)


def balance_labels(config: Config, data: dataset.LoadedDataset) -> list[int] | None:
    """BALANCE_COLUMN's class index of each image of `data`; None without a BALANCE_COLUMN.

    Raises DatasetError naming a missing metadata.csv or column, and every image without a value.
    """
    if not config.BALANCE_COLUMN:
        return None
    return checks.type_labels(Path(config.DATA_ROOT), config.BALANCE_COLUMN, data.pairs)[1]


def split_run(config: Config, data: dataset.LoadedDataset) -> splits.Split:
    """The run's training, inner validation and held-out images (see splits.three_way_split); raises ValueError."""
    root = Path(config.DATA_ROOT)
    if config.SPLIT_FILE:
        return splits.read_split_file(Path(config.SPLIT_FILE), config.FOLD, [pair.stem for pair in data.pairs],
                                       data.groups)
    fold_labels = None
    if config.FOLD_COLUMN:
        fold_labels, problems = checks.group_labels(root, config.FOLD_COLUMN, data.pairs)
        if problems:
            raise checks.DatasetError(root, problems)
    return splits.three_way_split(len(data.pairs), config.VAL_FRACTION, config.TEST_FRACTION, config.SPLIT_SEED,
                                   config.FOLDS, config.FOLD, data.groups, fold_labels, split_column(config),
                                   config.FOLD_COLUMN, root)


def split_column(config: Config) -> str:
    """The metadata column `config` splits by ("auto" resolved); "" for a random split."""
    return splits.resolve_split_column(Path(config.DATA_ROOT), config.SPLIT_GROUP_COLUMN)[0]


def make_loaders(data: dataset.LoadedDataset, train_idx: list[int], val_idx: list[int],
                 config: Config, pin_memory: bool = False,
                 types: list[int] | None = None) -> tuple[DataLoader, DataLoader]:
    """Shuffled, augmented training loader and a fixed-order validation loader (pinned batches copy faster to a GPU).

    Under torchrun each process loads its own share: a DistributedSampler's
    for training (call its set_epoch every epoch) and every world-th
    validation image, so no image is validated twice. HARD_SAMPLING > 0
    draws training batches with a sampling.HardExampleSampler (one process
    only: run refuses it under torchrun, see check_sampling), which train_one_epoch
    feeds the losses; BALANCE_COLUMN draws them with a sampling.BalancedSampler
    over that column's classes (one process only too). With `types` (a class
    index per image of `data`: TYPE_COLUMN) the training batches are
    (images, masks, type indices); validation's stay (images, masks).
    """
    rank, world = rank_and_world()
    augment = augmentation.training_augmentation(config.SEED + rank, flips=config.AUGMENT, affine=config.AUG_AFFINE,
                                            intensity=config.AUG_INTENSITY, elastic=config.AUG_ELASTIC)
    train_set = dataset.SegmentationDataset(data.images, data.masks, config.NORMALIZATION, augment, train_idx,
                                            types)
    val_set = dataset.SegmentationDataset(data.images, data.masks, config.NORMALIZATION, indices=val_idx)
    # Workers are started afresh each epoch (not persistent): their augmentation seeds then come from the
    # loader's generator, which checkpoints save, so a resumed run draws exactly what it would have drawn.
    common = dict(batch_size=config.BATCH_SIZE, num_workers=config.NUM_WORKERS, worker_init_fn=augmentation.seed_worker,
                  pin_memory=pin_memory)
    # Per rank: the generator seeds the workers' augmentation, which must differ between ranks (one process
    # draws the order from it too; under torchrun DistributedSampler does, seeded alike on every rank).
    generator = torch.Generator().manual_seed(config.SEED + rank)
    drop_last = drops_last_batch(len(train_set), config.BATCH_SIZE, world)
    # DistributedSampler pads the training shares to one length; validation must not count an image twice.
    train_sampler = DistributedSampler(train_set, seed=config.SEED) if world > 1 else None
    balance = balance_labels(config, data)
    if config.HARD_SAMPLING:
        train_sampler = sampling.HardExampleSampler(len(train_set), config.HARD_SAMPLING, config.BATCH_SIZE,
                                                   generator)
    elif balance is not None:  # Config refuses it together with HARD_SAMPLING
        train_sampler = sampling.BalancedSampler([balance[i] for i in train_idx], generator)
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
