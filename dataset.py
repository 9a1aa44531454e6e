"""The PyTorch dataset: every pair checked and decoded once (`load_dataset`), then drawn as samples.

Every file is decoded once per run: `load_dataset` checks and decodes in a
single pass and keeps the resized uint8 arrays in memory, or (with a cache
folder) once per change of the files, into memory-mapped arrays on disk;
augmentation and normalisation then run on those arrays each time a sample
is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch

from tumorseg.data.cache import disk_cache
from tumorseg.data.checks import DatasetError, group_labels, scan
from tumorseg.data.preprocess import normalize, prepare_input, prepare_mask
from tumorseg.data.reading import Pair, pair_count


@dataclass
class LoadedDataset:
    """Every pair decoded and resized: images (N, S, S, C) uint8, masks (N, S, S) uint8 in {0, 1}.

    In memory, or memory-mapped from the disk cache (then index them with few rows at a time).
    """

    pairs: list[Pair]
    images: np.ndarray
    masks: np.ndarray
    groups: list[str] | None  # group label per pair when a group column was asked for


def load_dataset(root: Path, image_size: int, in_channels: int, group_column: str = "",
                 crop: bool = False, crop_margin: float = 0.05, cache_dir: Path | None = None) -> LoadedDataset:
    """Verify and decode the dataset in one pass; raise DatasetError listing every problem.

    With `crop`, each slice is cut to its head_box (widened by `crop_margin`) before resizing.
    With `cache_dir`, the slices are memory-mapped from the disk cache there (see `disk_cache`),
    decoded only when a file or one of these settings has changed since.
    """
    root = Path(root)
    if cache_dir is not None:
        pairs, cached_images, cached_masks = disk_cache(root, image_size, in_channels, crop, crop_margin,
                                                        Path(cache_dir))
        groups, problems = group_labels(root, group_column, pairs)
        if problems:
            raise DatasetError(root, problems)
        return LoadedDataset(pairs, cached_images, cached_masks, groups)
    # Filled in place: stacking a list of slices would hold every slice twice at the end of loading.
    count = pair_count(root)
    images = np.empty((count, image_size, image_size, in_channels), np.uint8)
    masks = np.empty((count, image_size, image_size), np.uint8)
    kept = 0

    def keep(pair: Pair, image: np.ndarray, mask: np.ndarray) -> None:
        nonlocal kept
        prepared, box = prepare_input(image, image_size, crop, crop_margin)
        images[kept] = prepared
        masks[kept] = prepare_mask(mask, image_size, box)
        kept += 1

    pairs, groups, problems = scan(root, group_column, in_channels, keep)
    if problems:
        raise DatasetError(root, problems)
    return LoadedDataset(pairs, images[:kept], masks[:kept], groups)


def mask_share(masks: np.ndarray, indices: Sequence[int]) -> float:
    """Share of tumour pixels over the masks at `indices`, read a block at a time (a disk cache stays on disk)."""
    block = 1024
    total = sum(int(masks[sorted(indices[start:start + block])].sum()) for start in range(0, len(indices), block))
    return total / (len(indices) * masks[0].size)


class SegmentationDataset(torch.utils.data.Dataset):
    """Samples (image float32 (C, S, S), mask float32 (1, S, S) in {0, 1}) from the rows `indices` of the arrays.

    The arrays may be in memory or memory-mapped (the disk cache); `indices`
    (default: every row) picks rows without copying the arrays. With `types`
    (a class index per row of the arrays, e.g. the tumour type: TYPE_COLUMN),
    samples are (image, mask, type index int64 scalar); the type is a label of the
    whole image, which flips, rotations, warps and intensity changes keep.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, normalization: str,
                 transform: A.Compose | None = None, indices: Sequence[int] | None = None,
                 types: Sequence[int] | None = None):
        self.images, self.masks = images, masks
        self.indices = list(range(len(images)) if indices is None else indices)
        self.normalization = normalization
        self.transform = transform
        self.types = None if types is None else torch.as_tensor(types, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        # A memory-mapped cache travels to workers started by spawn (macOS, Windows) as its file name,
        # not as a copy of every slice.
        state = dict(self.__dict__)
        for name in ("images", "masks"):
            if isinstance(state[name], np.memmap):
                state[name] = Path(state[name].filename)
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("images", "masks"):
            if isinstance(state[name], Path):
                state[name] = np.load(state[name], mmap_mode="r")
        self.__dict__.update(state)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        row = self.indices[index]
        image, mask = np.array(self.images[row]), np.array(self.masks[row])  # copies: a memory map stays read-only
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        sample = (torch.from_numpy(normalize(image, self.normalization)),
                  torch.from_numpy(mask[None].astype(np.float32)))
        return sample if self.types is None else (*sample, self.types[row])
