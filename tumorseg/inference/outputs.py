"""test.py's output folder: staging it, the PNGs it holds (overlays, uncertainty heat maps), publishing it.

Predictions are written into a hidden staging folder and published
(tumorseg.files.publish) only when complete, so an interrupted or failed run
leaves earlier outputs untouched, --overwrite included. OrderedJobs runs the per-image writing on background threads.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from metrics import mask_border
from tumorseg.files import (OutputError, OutputExists, describe_write_error, publish, remove_stale_staging,
                            staging_name)
from tumorseg.runs.runfolder import run_folder

PREDICTION_COLOUR = np.array([255, 40, 40], np.float32)  # red fill, semi-transparent
TRUTH_COLOUR = np.array([40, 255, 40], np.uint8)  # green outline
OVERLAY_ALPHA = 0.4
# The blended colour of each channel level (256, 3), computed once: float32 blending, then rounding, per pixel.
OVERLAY_BLEND = ((1 - OVERLAY_ALPHA) * np.arange(256, dtype=np.float32)[:, None]
                 + OVERLAY_ALPHA * PREDICTION_COLOUR).round().astype(np.uint8)
OUTPUT_FOLDERS = ("masks", "segmented", "overlays")
# zlib level 1: PNGs stay lossless, a little larger, and encode several times faster than PIL's default 6.
PNG_COMPRESS_LEVEL = 1
# Threads writing and scoring finished images while the next batch is decoded and predicted.
WRITE_THREADS = 3
UNCERTAINTY_PNG_MAX = 0.5  # the largest possible std of probabilities: drawn white


def overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """Prediction as a semi-transparent red fill, ground truth (if any) as a green outline."""
    blended = np.stack([OVERLAY_BLEND[:, c][image[..., c]] for c in range(3)], axis=-1)  # table look-ups: fast
    out = np.where(predicted[..., None], blended, image)
    if truth is not None:
        out[mask_border(truth.astype(bool))] = TRUTH_COLOUR
    return out


def heat_colours(spread: np.ndarray) -> np.ndarray:
    """A spread map (0 .. UNCERTAINTY_PNG_MAX) as uint8 RGB: black, red, yellow, white as it grows."""
    level = np.clip(spread / UNCERTAINTY_PNG_MAX, 0, 1)[..., None]
    rgb = np.clip(3 * level - np.array([0, 1, 2]), 0, 1)  # red rises first, then green, then blue
    return (rgb * 255).round().astype(np.uint8)


def save_png(path: Path, pixels: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> None:
    """Write a uint8 array as PNG; a write error names the file (a full disk says so)."""
    try:
        Image.fromarray(pixels).save(path, compress_level=compress_level)
    except OSError as error:
        raise OutputError(describe_write_error(path, error)) from error


def write_image_outputs(staging: Path, stem: str, image: np.ndarray, predicted: np.ndarray,
                        truth: np.ndarray | None, spread: np.ndarray | None, compress_level: int) -> None:
    """One image's PNGs in `staging`: mask, segmented image, overlay, and the uncertainty map when there is one."""
    save_png(staging / "masks" / f"{stem}.png", predicted.astype(np.uint8) * 255, compress_level)
    save_png(staging / "segmented" / f"{stem}.png", np.where(predicted[..., None], image, 0), compress_level)
    save_png(staging / "overlays" / f"{stem}.png", overlay(image, predicted, truth), compress_level)
    if spread is not None:
        save_png(staging / "uncertainty" / f"{stem}.png", heat_colours(spread), compress_level)


def slice_has_pngs(mask_pixels: int, predicted_pixels: int) -> bool:
    """Whether a volume slice gets PNGs: only with tumour in its mask or its prediction.

    Every slice with a mask still gets its metrics.csv row; the tumour-free
    slices predicted empty (most of a scan) would only add black images.
    """
    return mask_pixels > 0 or predicted_pixels > 0


def output_name(checkpoint_path: Path) -> str:
    """The run's folder name, from the resolved path (so 'best.pt' inside the run folder names the run too)."""
    name = run_folder(checkpoint_path).name
    if not name:
        raise ValueError(f"{checkpoint_path}: cannot name the output after a checkpoint at the file system root")
    return name


def start_staging(root: Path, name: str, overwrite: bool) -> Path:
    """A fresh staging folder for this process only, under root; checks --overwrite may replace root/name."""
    root = Path(root)
    existing = root / name
    if overwrite and existing.exists() and not (existing / "summary.json").is_file():
        raise ValueError(f"{existing}: exists but is not a test.py output (no summary.json); "
                         "--overwrite replaces only earlier predictions: move it or choose another PREDICTION_ROOT")
    root.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_staging(root):
        print(f"removed {stale}, left by an interrupted test.py")
    staging = root / staging_name(name, "partial")
    for sub in OUTPUT_FOLDERS:
        (staging / sub).mkdir(parents=True)
    return staging


def publish_predictions(staging: Path, root: Path, name: str, overwrite: bool) -> Path:
    """Publish the finished staging folder as root/name, or the first free root/name-N; never onto another output.

    With `overwrite`, root/name is replaced (tumorseg.files.publish: the
    earlier predictions are swapped out, and put back if anything fails or
    the run is interrupted before the new folder is in place).
    """
    root = Path(root)
    suffix = 1
    while True:
        final = root / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            publish({final: staging}, overwrite=overwrite and suffix == 1)
            return final
        except OutputExists:  # another run's output holds the name
            suffix += 1


class OrderedJobs:
    """Runs jobs on `threads` background threads (inline with 0) and hands their results back in submission order.

    test.py finishes each image (PNG encoding, scoring) here while the main
    thread decodes and predicts the next ones: zlib, scipy and NumPy release
    the GIL. A job's exception (an OutputError) is raised from a later `submit`
    or from `finish`; leaving the `with` block (done, failed or Ctrl-C) waits
    for the jobs under way and drops queued ones, so no file lands after the
    staging folder is removed.
    """

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="finish") if threads else None
        self.limit = 4 * threads  # queued images held in memory at most
        self.pending: deque[Future] = deque()

    def __enter__(self) -> OrderedJobs:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Callable[..., Any], *args: Any) -> list:
        """Queue `job(*args)`; returns the results of the jobs finished by now, oldest first."""
        if self.pool is None:
            return [job(*args)]
        self.pending.append(self.pool.submit(job, *args))
        results = []
        while self.pending and (len(self.pending) > self.limit or self.pending[0].done()):
            results.append(self.pending.popleft().result())  # re-raises the job's OutputError here
        return results

    def finish(self) -> list:
        """Wait for every queued job; their results, oldest first."""
        results = []
        while self.pending:
            results.append(self.pending.popleft().result())
        return results
