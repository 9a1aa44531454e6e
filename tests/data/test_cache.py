"""Tests of tumorseg/data/cache.py: the disk cache serves what memory does and is rebuilt when a file changes."""

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from dataset import load_dataset
from tumorseg.data.checks import DatasetError
from tumorseg.data.splits import split_indices


def test_disk_cache_serves_exactly_the_batches_of_the_memory_cache(demo_root, tmp_path, monkeypatch):
    from tumorseg.training import loaders
    from config import Config
    cache = tmp_path / "cache"
    memory = load_dataset(demo_root, 32, 1, "patient_id", crop=True)
    disk = load_dataset(demo_root, 32, 1, "patient_id", crop=True, cache_dir=cache)
    assert isinstance(disk.images, np.memmap) and not disk.images.flags.writeable
    assert disk.pairs == memory.pairs and disk.groups == memory.groups
    assert np.array_equal(disk.images, memory.images) and np.array_equal(disk.masks, memory.masks)
    assert dataset.mask_share(disk.masks, [3, 1, 2]) == pytest.approx(memory.masks[[1, 2, 3]].mean())

    config = Config(IMAGE_SIZE=32, IN_CHANNELS=1, NORMALIZATION="zscore", BATCH_SIZE=5, NUM_WORKERS=2,
                    AUG_AFFINE=True)
    train_idx, val_idx = split_indices(len(memory.pairs), 0.2, 0, memory.groups)
    for memory_loader, disk_loader in zip(loaders.make_loaders(memory, train_idx, val_idx, config),
                                          loaders.make_loaders(disk, train_idx, val_idx, config), strict=True):
        for _ in range(2):  # two epochs, read by 2 worker processes
            for (image_a, mask_a), (image_b, mask_b) in zip(memory_loader, disk_loader, strict=True):
                assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)

    def no_decoding(*args):
        raise AssertionError("a valid cache was decoded again")

    monkeypatch.setattr("tumorseg.data.cache.scan", no_decoding)  # where a cache is built
    monkeypatch.setattr("dataset.scan", no_decoding)  # where memory is loaded
    again = load_dataset(demo_root, 32, 1, "patient_id", crop=True, cache_dir=cache)
    assert np.array_equal(again.images, memory.images) and again.groups == memory.groups
    assert len(list(cache.iterdir())) == 1


def test_disk_cache_is_rebuilt_when_a_file_or_setting_changes(demo_copy, tmp_path):
    import os
    cache = tmp_path / "cache"
    first = load_dataset(demo_copy, 32, 1, cache_dir=cache)
    (old_folder,) = cache.iterdir()
    image_path = demo_copy / "images" / "demo_0002.png"
    Image.fromarray(255 - np.asarray(Image.open(image_path))).save(image_path)
    os.utime(image_path, ns=(1, 1))  # an edit keeps the size here: the time alone must tell
    second = load_dataset(demo_copy, 32, 1, cache_dir=cache)
    (new_folder,) = cache.iterdir()  # the replaced cache is gone
    assert new_folder != old_folder
    changed = [i for i in range(len(first.pairs)) if not np.array_equal(first.images[i], second.images[i])]
    assert [first.pairs[i].stem for i in changed] == ["demo_0002"]
    load_dataset(demo_copy, 16, 1, cache_dir=cache)  # another size: its own cache, beside the other
    assert len(list(cache.iterdir())) == 2


def test_a_broken_dataset_leaves_no_disk_cache(demo_copy, tmp_path):
    (demo_copy / "masks" / "demo_0004.png").unlink()
    with pytest.raises(DatasetError, match="demo_0004"):
        load_dataset(demo_copy, 32, 1, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(DatasetError, match="patient_id"):  # groups are checked on a cache hit too
        (demo_copy / "masks" / "demo_0004.png").symlink_to(demo_copy / "masks" / "demo_0005.png")
        load_dataset(demo_copy, 32, 1, cache_dir=tmp_path / "cache")
        (demo_copy / "metadata.csv").write_text("image_id,other\n")
        load_dataset(demo_copy, 32, 1, "patient_id", cache_dir=tmp_path / "cache")
