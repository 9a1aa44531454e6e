"""Running a trained model on whole images: the preprocessing training used, TTA, and probabilities at native size.

One path serves train.py (choosing the decision rule on validation images)
and test.py, so an image is prepared exactly as the model saw images in
training: decoded with `dataset.read_image`, cropped and resized with
`dataset.prepare_input`, normalised with `dataset.normalize`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

import dataset
from config import Config
from utils import autocast


def prepare_image(image: np.ndarray, config: Config) -> tuple[torch.Tensor, dataset.Box]:
    """uint8 (H, W, IN_CHANNELS) at native size to the model's float input (C, S, S), with the crop box used."""
    resized, box = dataset.prepare_input(image, config.IMAGE_SIZE, config.CROP, config.CROP_MARGIN)
    return torch.from_numpy(dataset.normalize(resized, config.NORMALIZATION)), box


def probabilities(model: torch.nn.Module, inputs: torch.Tensor, tta: bool) -> torch.Tensor:
    """sigmoid(model(inputs)); with `tta`, averaged over the 8 flips and 90-degree rotations.

    The training augmentation makes the model (nearly) invariant to these
    transforms, so averaging them cancels some of its orientation-specific errors.
    """
    with torch.no_grad():
        if not tta:
            return torch.sigmoid(model(inputs)).float()
        total = torch.zeros_like(inputs[:, :1], dtype=torch.float32)
        for turns in range(4):
            for flip in (False, True):
                view = torch.rot90(inputs, turns, dims=(2, 3))
                view = view.flip(3) if flip else view
                output = torch.sigmoid(model(view)).float()
                output = output.flip(3) if flip else output
                total += torch.rot90(output, -turns, dims=(2, 3))
        return total / 8


def native_probabilities(model: torch.nn.Module, config: Config, images: Sequence[np.ndarray],
                         device: torch.device, tta: bool = False, amp: str = "off",
                         channels_last: bool = False) -> list[np.ndarray]:
    """Probability maps (H, W) float32 at each image's own size, for a batch of native uint8 images.

    `images` are (H, W, IN_CHANNELS) as `dataset.read_image(path, config.IN_CHANNELS)` gives;
    each may have its own size. The model runs at the trained size, in the
    precision `amp` names ("off" or "bf16"/"fp16", already checked on `device`)
    and, with `channels_last`, on channels-last batches (the model must be
    converted to match); its map is resized back (and pasted into the crop box)
    in float32 before any thresholding.
    """
    model.eval()
    prepared = [prepare_image(image, config) for image in images]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = torch.stack([tensor for tensor, _ in prepared]).to(device, memory_format=memory_format)
    with autocast(device, amp):
        outputs = probabilities(model, inputs, tta)
    return dataset.restore_probabilities(outputs[:, 0], [box for _, box in prepared],
                                         [image.shape[:2] for image in images])
