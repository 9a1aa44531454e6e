"""A slice to the network's input and its output back: head crop, resize, normalisation, pasting back."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage


# Slices carry a wide black border around the head; cropping to the head before resizing gives the
# network more tumour pixels for the same compute. Training and inference share one path:
#   image (H, W, C) --prepare_input--> (S, S, C) + box --model--> probability (S, S)
#   --restore_probability--> (H, W), zero outside the box.

# Pixels above this share of the slice's 99th percentile count as head. On the Figshare slices 0.05
# still catches the scanner's faint field-of-view band; 0.1 to 0.2 give nearly the same boxes.
HEAD_THRESHOLD_FRACTION = 0.1
HEAD_THUMBNAIL_SIDE = 64  # head_box looks at a block-mean thumbnail about this size: cheap, and averages out noise

Box = tuple[int, int, int, int]  # top, left, bottom, right in pixels; bottom and right exclusive


def head_box(image: np.ndarray, margin: float = 0.05) -> Box:
    """Bounding box of the head in uint8 (H, W, C) or (H, W), widened by `margin` x its size on each side.

    The box is then made square, so resizing it keeps the aspect ratio (on a non-square image whose
    head spans more than the shorter side, it covers that whole side instead). A slice without
    foreground gives the full image.
    """
    pixels = image.reshape(*image.shape[:2], -1)  # (H, W, C) with or without a channel axis given
    height, width = pixels.shape[:2]
    cell = max(1, min(height, width) // HEAD_THUMBNAIL_SIDE)
    rows, cols = height // cell, width // cell
    # Sum over each cell x cell block as strided views: several times faster than a reshaped mean
    # (sums, not means: the threshold below is relative). Then the brightest channel.
    thumbnail = np.zeros((rows, cols, pixels.shape[2]), np.float32)
    for i in range(cell):
        for j in range(cell):
            thumbnail += pixels[i:rows * cell:cell, j:cols * cell:cell]
    thumbnail = thumbnail.max(axis=-1)
    foreground = thumbnail > HEAD_THRESHOLD_FRACTION * np.percentile(thumbnail, 99)
    # Dilating by one cell joins scalp, skull and brain into one blob; keeping only the largest blob
    # drops isolated specks and burned-in text outside the head.
    labels, count = ndimage.label(ndimage.binary_dilation(foreground))
    if count == 0:
        return 0, 0, height, width
    head = foreground & (labels == np.bincount(labels.ravel())[1:].argmax() + 1)
    head_rows, head_cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    # Thumbnail cells back to pixels; the last row or column of cells also owns the leftover pixels past it.
    top, left = int(head_rows[0]) * cell, int(head_cols[0]) * cell
    bottom = height if head_rows[-1] == rows - 1 else (int(head_rows[-1]) + 1) * cell
    right = width if head_cols[-1] == cols - 1 else (int(head_cols[-1]) + 1) * cell

    pad_rows, pad_cols = round(margin * (bottom - top)), round(margin * (right - left))
    top, bottom = max(top - pad_rows, 0), min(bottom + pad_rows, height)
    left, right = max(left - pad_cols, 0), min(right + pad_cols, width)
    side = max(bottom - top, right - left)
    top, bottom = _widen(top, bottom, side, height)
    left, right = _widen(left, right, side, width)
    return top, left, bottom, right


def _widen(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """[low, high) grown evenly to `length` (at most `limit`), then shifted to lie in [0, limit).

    The result still contains [low, high): it is at least as long and only moves where it would stick out.
    """
    length = min(length, limit)
    start = min(max(low - (length - (high - low)) // 2, 0), limit - length)
    return start, start + length


def crop_to_box(array: np.ndarray, box: Box) -> np.ndarray:
    """The box's part of an (H, W) or (H, W, C) array (a view)."""
    top, left, bottom, right = box
    return array[top:bottom, left:right]


def paste_back(values: np.ndarray, box: Box, native_shape: tuple[int, int]) -> np.ndarray:
    """float32 (H, W) map holding `values` (the box's size) inside the box and 0 outside it."""
    full = np.zeros(native_shape, np.float32)
    top, left, bottom, right = box
    full[top:bottom, left:right] = values
    return full


def prepare_input(image: np.ndarray, image_size: int, crop: bool, margin: float = 0.05) -> tuple[np.ndarray, Box]:
    """uint8 (H, W, C) to the network's (S, S, C) input, and the box it was taken from (full image without `crop`).

    Training and inference both go through here, so the model always sees slices framed the same way.
    """
    box = head_box(image, margin) if crop else (0, 0, image.shape[0], image.shape[1])
    return resize_image(crop_to_box(image, box), image_size), box


def prepare_mask(mask: np.ndarray, image_size: int, box: Box) -> np.ndarray:
    """A {0, 1} (H, W) mask through the same box as its image, to (S, S), still binary."""
    return resize_mask(crop_to_box(mask, box), image_size)


def restore_probability(probability: np.ndarray | torch.Tensor, box: Box,
                        native_shape: tuple[int, int]) -> np.ndarray:
    """Inverse of prepare_input for a predicted (S, S) probability map: float32 (H, W), 0 outside the box.

    The probability map is resized, not a thresholded mask, so the tumour edge is placed at sub-pixel
    precision; bilinear without align_corners matches the pixel-centre convention of resize_image.
    """
    return restore_probabilities(torch.as_tensor(probability)[None], [box], [native_shape])[0]


def restore_probabilities(probabilities: torch.Tensor, boxes: list[Box],
                          native_shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """`restore_probability` of each (S, S) map in (N, S, S), resizing all maps of one box size in one call."""
    values = probabilities.to(torch.float32)
    sizes = [(bottom - top, right - left) for top, left, bottom, right in boxes]
    restored: list[np.ndarray] = [np.empty(0)] * len(boxes)
    for size in dict.fromkeys(sizes):  # each size once, in order of appearance
        indices = [i for i, other in enumerate(sizes) if other == size]
        resized = F.interpolate(values[indices][:, None], size=size, mode="bilinear", align_corners=False)
        for i, map_ in zip(indices, resized[:, 0].cpu().numpy(), strict=True):
            restored[i] = paste_back(map_, boxes[i], native_shapes[i])
    return restored


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (H, W, C) to (size, size, C) with bilinear interpolation (antialiased when shrinking)."""
    channels = [Image.fromarray(image[..., c]).resize((size, size), Image.Resampling.BILINEAR)
                for c in range(image.shape[-1])]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a {0, 1} mask to (size, size) with nearest neighbour, so it stays binary."""
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))


# ImageNet statistics (RGB), as the seed used them; grayscale input uses their mean.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
ZSCORE_MIN_STD = 1e-6  # z-score divides by at least this, so a blank slice stays finite


def imagenet_statistics(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet mean and std per channel for 0..1 pixels: the RGB values for 3 channels, their means for 1."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return IMAGENET_MEAN.mean(keepdims=True), IMAGENET_STD.mean(keepdims=True)


def normalize(image: np.ndarray, method: str) -> np.ndarray:
    """uint8 (H, W, C) to float32 (C, H, W): ImageNet statistics, or z-score per image and channel."""
    values = image.astype(np.float32) / 255.0
    if method == "imagenet":
        mean, std = imagenet_statistics(values.shape[-1])
        values = (values - mean) / std
    elif method == "zscore":
        mean = values.mean(axis=(0, 1), keepdims=True)
        std = values.std(axis=(0, 1), keepdims=True)
        values = (values - mean) / np.maximum(std, ZSCORE_MIN_STD)
    else:
        raise ValueError(f"unknown normalization {method!r}; use 'imagenet' or 'zscore'")
    return np.ascontiguousarray(values.transpose(2, 0, 1))
