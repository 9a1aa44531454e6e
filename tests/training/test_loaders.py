"""tumorseg/training/loaders.py: steps per epoch, and each rank's own augmentation."""

import pytest
import torch
from torch.utils.data import SequentialSampler

from config import Config
import dataset
from tumorseg.training import loaders


@pytest.mark.parametrize("images, batch, world, steps", [(19, 9, 1, 2), (18, 9, 1, 2), (20, 9, 1, 3), (1, 4, 1, 0),
                                                         (1, 1, 1, 1), (2, 4, 2, 0), (3, 2, 2, 1)])
def test_steps_per_epoch_leave_out_a_dropped_batch_of_one(images, batch, world, steps):
    assert loaders.steps_per_epoch(images, batch, world) == steps


CONFIG = dict(IMAGE_SIZE=32, IN_CHANNELS=1, BATCH_SIZE=4, NUM_WORKERS=1, AUGMENT=True, AUG_AFFINE=True,
              AUG_INTENSITY=True)


def train_loader(demo_root, monkeypatch, rank: int, world: int) -> torch.utils.data.DataLoader:
    """Rank `rank` of `world`'s training loader (one worker), every rank given the same slices in one order."""
    monkeypatch.setattr(loaders, "rank_and_world", lambda: (rank, world))
    monkeypatch.setattr(loaders, "DistributedSampler", lambda data, seed: SequentialSampler(data))
    data = dataset.load_dataset(demo_root, 32, 1)
    return loaders.make_loaders(data, list(range(8)), [8, 9], Config(DATA_ROOT=str(demo_root), **CONFIG))[0]


def first_batch(demo_root, monkeypatch, rank: int, world: int) -> torch.Tensor:
    """The augmented images of the first training batch of rank `rank` of `world`."""
    return next(iter(train_loader(demo_root, monkeypatch, rank, world)))[0]


def test_each_rank_draws_its_own_augmentation_and_a_rank_repeats_itself(demo_root, monkeypatch):
    rank0, rank1 = first_batch(demo_root, monkeypatch, 0, 2), first_batch(demo_root, monkeypatch, 1, 2)
    assert not torch.equal(rank0, rank1)  # the same slices, augmented differently on each rank
    assert torch.equal(rank0, first_batch(demo_root, monkeypatch, 0, 2))  # and reproducibly (exact resume)
    # one process seeds its order and its workers from SEED, as before ranks had seeds of their own
    assert train_loader(demo_root, monkeypatch, 0, 1).generator.initial_seed() == Config().SEED
