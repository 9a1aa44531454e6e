"""Running a trained model on whole images: the preprocessing training used, TTA, probabilities at native size.

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


def view_probabilities(model: torch.nn.Module, inputs: torch.Tensor, tta: bool) -> list[torch.Tensor]:
    """sigmoid(model(view)) in float32 for each view of `inputs`, turned back to the inputs' orientation.

    The views are the 8 flips and 90-degree rotations with `tta`, else the inputs alone.
    """
    with torch.no_grad():
        if not tta:
            return [torch.sigmoid(model(inputs)).float()]
        views = []
        for turns in range(4):
            for flip in (False, True):
                view = torch.rot90(inputs, turns, dims=(2, 3))
                view = view.flip(3) if flip else view
                output = torch.sigmoid(model(view)).float()
                output = output.flip(3) if flip else output
                views.append(torch.rot90(output, -turns, dims=(2, 3)))
        return views


def probabilities(model: torch.nn.Module, inputs: torch.Tensor, tta: bool) -> torch.Tensor:
    """sigmoid(model(inputs)); with `tta`, averaged over the 8 flips and 90-degree rotations.

    The training augmentation makes the model (nearly) invariant to these
    transforms, so averaging them cancels some of its orientation-specific errors.
    """
    return mean_view(view_probabilities(model, inputs, tta))


def mean_view(views: list[torch.Tensor]) -> torch.Tensor:
    """The views' mean, summed one after another."""
    return sum(views[1:], views[0]) / len(views)


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
    views, boxes = model_views(model, config, images, device, tta, amp, channels_last)
    return dataset.restore_probabilities(mean_view(views)[:, 0], boxes, [image.shape[:2] for image in images])


def native_probabilities_and_spreads(model: torch.nn.Module, config: Config, images: Sequence[np.ndarray],
                                     device: torch.device, tta: bool = False, amp: str = "off",
                                     channels_last: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`native_probabilities`, and the per-pixel standard deviation of the views (0 without `tta`) at the same size.

    The deviation is taken where the views are compared, at the model's
    resolution and in float32, and only then resized: resizing E[p] and
    E[p**2] apart leaves resize(p**2) - resize(p)**2 > 0 wherever the map
    changes, an uncertainty that the views do not have.
    """
    views, boxes = model_views(model, config, images, device, tta, amp, channels_last)
    shapes = [image.shape[:2] for image in images]
    spread = torch.stack(views).std(dim=0, correction=0)
    return (dataset.restore_probabilities(mean_view(views)[:, 0], boxes, shapes),
            dataset.restore_probabilities(spread[:, 0], boxes, shapes))


def model_views(model: torch.nn.Module, config: Config, images: Sequence[np.ndarray], device: torch.device,
                tta: bool, amp: str, channels_last: bool) -> tuple[list[torch.Tensor], list[dataset.Box]]:
    """`view_probabilities` (N, 1, S, S) of a batch of native images as the model was trained, and their crop boxes."""
    model.eval()
    prepared = [prepare_image(image, config) for image in images]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = torch.stack([tensor for tensor, _ in prepared]).to(device, memory_format=memory_format)
    with autocast(device, amp):
        views = view_probabilities(model, inputs, tta)
    return views, [box for _, box in prepared]
