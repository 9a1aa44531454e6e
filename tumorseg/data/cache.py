"""The disk cache: every slice decoded once into memory-mapped arrays, rebuilt when a file or setting changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from tumorseg.data.checks import DatasetError, scan
from tumorseg.data.preprocess import prepare_input, prepare_mask
from tumorseg.data.reading import Pair, image_named, pair_count
from tumorseg.files import remove_stale_staging, staging_name


# CACHE="disk": every slice decoded and resized once into two memory-mapped uint8 .npy files, so a data set
# larger than memory trains at the speed of reading its slices (64 KB each at 256 px, grayscale). The cache
# folder is named after a hash of everything that shapes those pixels, so changing a file or a setting builds
# a new one (and removes the one it replaces); it is built under a staging name and renamed whole.

CACHE_FORMAT = 1  # part of the key: raise it when what a cache holds changes
CACHE_INDEX = "cache.json"  # pairs and source of a cache folder, written last


def cache_key(root: Path, image_size: int, in_channels: int, crop: bool, crop_margin: float) -> str:
    """Hash of the settings and of every image and mask file's name, size and modification time."""
    files = []
    for sub in ("images", "masks"):
        for path in image_named(root / sub):
            info = path.stat() if path.exists() else path.lstat()  # a broken link counts by itself
            files.append([sub, path.name, info.st_size, info.st_mtime_ns])
    described = json.dumps([CACHE_FORMAT, image_size, in_channels, crop, crop_margin, files])  # ASCII-escaped
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def disk_cache(root: Path, image_size: int, in_channels: int, crop: bool, crop_margin: float,
               cache_dir: Path) -> tuple[list[Pair], np.ndarray, np.ndarray]:
    """The pairs of `root` and their slices memory-mapped (read-only) from cache_dir/<key>/, built first if needed.

    Building checks every file as `load_dataset` does and raises DatasetError
    listing every problem (leaving no cache). Groups are not cached: metadata
    is read afresh by the caller.
    """
    if not ((root / "images").is_dir() and (root / "masks").is_dir()):
        raise DatasetError(root, scan(root, "", in_channels, lambda *_: None)[2])  # nothing to key on
    folder = cache_dir / cache_key(root, image_size, in_channels, crop, crop_margin)
    if not (folder / CACHE_INDEX).is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a folder without its index was damaged by hand
        _build_cache(root, image_size, in_channels, crop, crop_margin, folder)
    index = json.loads((folder / CACHE_INDEX).read_text())
    pairs = [Pair(stem, root / "images" / image, root / "masks" / mask) for stem, image, mask in index["pairs"]]
    return pairs, np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r")


def _build_cache(root: Path, image_size: int, in_channels: int, crop: bool, crop_margin: float,
                 folder: Path) -> None:
    """Decode every pair of `root` into `folder` (images.npy, masks.npy, cache.json), atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder.parent)
    staging = folder.parent / staging_name(folder.name, "partial")
    staging.mkdir()
    try:
        count = pair_count(root)
        files = {}
        for name, shape in (("images", (count, image_size, image_size, in_channels)),
                            ("masks", (count, image_size, image_size))):
            # open_memmap writes the .npy header and sizes the file; slices are then written in order through
            # plain file writes, which keep them out of this process's resident memory while building.
            offset = open_memmap(staging / f"{name}.npy", mode="w+", dtype=np.uint8, shape=shape).offset
            files[name] = open(staging / f"{name}.npy", "r+b")
            files[name].seek(offset)

        def keep(pair: Pair, image: np.ndarray, mask: np.ndarray) -> None:
            prepared, box = prepare_input(image, image_size, crop, crop_margin)
            files["images"].write(prepared.tobytes())
            files["masks"].write(prepare_mask(mask, image_size, box).tobytes())

        try:
            pairs, _, problems = scan(root, "", in_channels, keep)
            for file in files.values():
                file.flush()
                os.fsync(file.fileno())  # on disk before the rename makes the folder count as complete
        finally:
            for file in files.values():
                file.close()
        if problems:
            raise DatasetError(root, problems)
        source = {"root": str(root.resolve()), "settings": [image_size, in_channels, crop, crop_margin]}
        index = {**source, "pairs": [[p.stem, p.image_path.name, p.mask_path.name] for p in pairs]}
        (staging / CACHE_INDEX).write_text(json.dumps(index))
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
        _remove_replaced_caches(folder, source)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_replaced_caches(folder: Path, source: dict) -> None:
    """Delete the other caches of the same data folder and settings: files have changed since they were built."""
    for other in folder.parent.iterdir():
        try:
            replaced = other != folder and {k: v for k, v in json.loads((other / CACHE_INDEX).read_text()).items()
                                            if k != "pairs"} == source
        except (OSError, ValueError):
            continue  # not a cache folder, or one being built
        if replaced:
            shutil.rmtree(other, ignore_errors=True)  # a run still reading it keeps its open file (POSIX)
