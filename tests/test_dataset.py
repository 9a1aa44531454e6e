"""Tests of dataset.py: loading checks and decodes in one pass, and the torch Dataset over memory or a disk cache."""

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import SegmentationDataset, load_dataset
from tumorseg.data.checks import DatasetError


def test_all_problems_are_reported_at_once_and_loading_refuses(demo_copy):
    (demo_copy / "masks/demo_0000.png").unlink()
    (demo_copy / "images/demo_0001.png").write_bytes(b"\x89PNG broken")
    Image.new("L", (10, 10)).save(demo_copy / "masks/demo_0002.png")
    with pytest.raises(DatasetError) as error:
        load_dataset(demo_copy, image_size=32, in_channels=1)
    assert len(error.value.problems) == 3
    for name in ("demo_0000", "demo_0001", "demo_0002"):
        assert name in str(error.value)


def test_resize_keeps_masks_binary(demo_root):
    data = load_dataset(demo_root, image_size=48, in_channels=3)
    assert data.images.shape == (24, 48, 48, 3) and data.masks.shape == (24, 48, 48)
    assert set(np.unique(data.masks)) == {0, 1}


def test_a_memory_mapped_dataset_pickles_as_its_file_name(demo_root, tmp_path):
    import pickle
    data = load_dataset(demo_root, 32, 1, cache_dir=tmp_path)
    samples = SegmentationDataset(data.images, data.masks, "zscore", indices=[5, 2])
    copy = pickle.loads(pickle.dumps(samples))  # what a worker started by spawn receives
    assert len(pickle.dumps(samples)) < 2000 and isinstance(copy.images, np.memmap)
    assert torch.equal(copy[1][0], samples[1][0]) and len(copy) == 2


def test_the_memory_cache_holds_each_slice_once_while_loading(demo_root):
    import tracemalloc

    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        data = load_dataset(demo_root, image_size=256, in_channels=3)  # 24 slices upsampled: 6.3 MB of arrays
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    arrays = data.images.nbytes + data.masks.nbytes
    assert data.images.shape == (24, 256, 256, 3) and data.masks.shape == (24, 256, 256)
    assert peak < 1.5 * arrays  # a list of slices stacked at the end would peak at twice the arrays
