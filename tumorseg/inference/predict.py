"""Running trained models on whole images: the preprocessing training used, TTA, ensembles, native-size maps.

One path serves train.py (choosing the decision rule on validation images)
and test.py (`predict`: a folder's images, batched, through one model or an
ensemble), so an image is prepared exactly as the model saw images in
training: decoded with `reading.read_image`, cropped and resized with
`preprocess.prepare_input`, normalised with `preprocess.normalize`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from config import Config
from tumorseg.data import preprocess, reading
from tumorseg.data import volumes
from tumorseg.runs.checkpoints import LoadedCheckpoint
from utils import autocast, memory_format_for


def prepare_image(image: np.ndarray, config: Config) -> tuple[torch.Tensor, preprocess.Box]:
    """uint8 (H, W, IN_CHANNELS) at native size to the model's float input (C, S, S), with the crop box used."""
    resized, box = preprocess.prepare_input(image, config.IMAGE_SIZE, config.CROP, config.CROP_MARGIN)
    return torch.from_numpy(preprocess.normalize(resized, config.NORMALIZATION)), box


def sigmoid32(logits: torch.Tensor) -> torch.Tensor:
    """sigmoid(logits) computed in float32, whatever precision the logits came in.

    Under bf16 autocast the model's logits are bf16; a sigmoid applied to them
    stays bf16, whose step near 0.5 (2**-8) is coarser than the decision rule
    chosen on float32 maps. Casting first keeps only the logits quantised.
    """
    return torch.sigmoid(logits.float())


def view_probabilities(model: torch.nn.Module, inputs: torch.Tensor, tta: bool) -> list[torch.Tensor]:
    """sigmoid(model(view)) in float32 for each view of `inputs`, turned back to the inputs' orientation.

    The views are the 8 flips and 90-degree rotations with `tta`, else the inputs alone.
    """
    with torch.no_grad():
        if not tta:
            return [sigmoid32(model(inputs))]
        views = []
        for turns in range(4):
            for flip in (False, True):
                view = torch.rot90(inputs, turns, dims=(2, 3))
                view = view.flip(3) if flip else view
                output = sigmoid32(model(view))
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

    `images` are (H, W, IN_CHANNELS) as `reading.read_image(path, config.IN_CHANNELS)` gives;
    each may have its own size. The model runs at the trained size, in the
    precision `amp` names ("off" or "bf16"/"fp16", already checked on `device`)
    and, with `channels_last`, on channels-last batches (the model must be
    converted to match); its map is resized back (and pasted into the crop box)
    in float32 before any thresholding.
    """
    views, boxes = model_views(model, config, images, device, tta, amp, channels_last)
    return preprocess.restore_probabilities(mean_view(views)[:, 0], boxes, [image.shape[:2] for image in images])


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
    return (preprocess.restore_probabilities(mean_view(views)[:, 0], boxes, shapes),
            preprocess.restore_probabilities(spread[:, 0], boxes, shapes))


def type_probabilities(model: torch.nn.Module, config: Config, images: Sequence[np.ndarray], device: torch.device,
                       amp: str = "off", channels_last: bool = False) -> np.ndarray:
    """Softmax of a TypeHead's logits, (N, classes) float32, for a batch of native images prepared as in training.

    One view (no TTA): the head classifies the whole image, so its answer is the same for flips and rotations.
    """
    model.eval()
    inputs = torch.stack([prepare_image(image, config)[0] for image in images])
    inputs = inputs.to(device, memory_format=memory_format_for(channels_last))
    with torch.no_grad(), autocast(device, amp):
        _, logits = model(inputs, return_type=True)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def head_classes(models: Sequence[LoadedCheckpoint]) -> tuple[str, ...]:
    """The class names of the first model's TypeHead; () when it has none."""
    return tuple(getattr(models[0].model, "type_classes", ()))


def model_views(model: torch.nn.Module, config: Config, images: Sequence[np.ndarray], device: torch.device,
                tta: bool, amp: str, channels_last: bool) -> tuple[list[torch.Tensor], list[preprocess.Box]]:
    """`view_probabilities` (N, 1, S, S) of a batch of native images as the model was trained, and their crop boxes."""
    model.eval()
    prepared = [prepare_image(image, config) for image in images]
    inputs = torch.stack([tensor for tensor, _ in prepared])
    inputs = inputs.to(device, memory_format=memory_format_for(channels_last))
    with autocast(device, amp):
        views = view_probabilities(model, inputs, tta)
    return views, [box for _, box in prepared]


@dataclass
class Prediction:
    """One image's probability map at its own resolution, with the decoded image and optional mask."""

    stem: str
    image: np.ndarray  # uint8 (H, W, 3) for display
    probability: np.ndarray  # float32 (H, W)
    mask: np.ndarray | None  # uint8 {0, 1} (H, W), None without ground truth
    spread: np.ndarray | None  # float32 (H, W) std of the views'/members' probabilities; None with one view
    types: dict[str, float] | None = None  # a TypeHead's probability of each class; None without a head


def find_images(data_root: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """Images under data_root/images, and masks by stem when data_root/masks exists (volumes: `volumes.find_volumes`).

    Raises FileNotFoundError when the folder holds neither images nor volumes.
    """
    image_dir = Path(data_root) / "images"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: folder of images to predict is missing")
    by_stem = reading.files_by_stem(image_dir)
    if not by_stem and not volumes.find_volumes(data_root):
        unusable = "".join(f"; {path.name}: {reason}" for path, reason in unusable_inputs(image_dir).items())
        raise FileNotFoundError(f"{image_dir}: no {'/'.join(reading.IMAGE_EXTENSIONS)} images or NIfTI/DICOM "
                                f"volumes{unusable}")
    shared = sorted(stem for stem, files in by_stem.items() if len(files) > 1)
    if shared:  # their outputs would overwrite each other
        raise ValueError(f"{image_dir}: several images share the stem(s) {', '.join(shared)}")
    images = [files[0] for _, files in sorted(by_stem.items())]
    mask_dir = Path(data_root) / "masks"
    if not mask_dir.is_dir():
        return images, None
    return images, {stem: files[0] for stem, files in reading.files_by_stem(mask_dir).items()}


def unusable_inputs(folder: Path) -> dict[Path, str]:
    """Entries of an images/ or masks/ folder that neither `find_images` nor `volumes.find_volumes` takes, and why.

    Image-named entries that are not regular files, and links to nothing
    whatever their name (a volume or DICOM series that is gone).
    """
    return {**reading.unusable_entries(folder), **reading.broken_links(folder)}


def combined_spread(means: list[np.ndarray], spreads: list[np.ndarray]) -> np.ndarray:
    """Standard deviation over every view of every member, from each member's views' mean and deviation.

    Members (each with as many views) are compared at the image's size, where
    their maps meet: total variance = mean within-member variance + variance
    of the members' means. Two copies of one model add exactly nothing.
    """
    mean = sum(means) / len(means)
    within = sum(spread ** 2 for spread in spreads) / len(spreads)
    between = sum((member - mean) ** 2 for member in means) / len(means)
    return np.sqrt(within + between)


def read_input(path: Path, channels: list[int],
               masks: dict[str, Path] | None) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    """An image decoded once per channel count, and its mask (None without one); raises on a bad file."""
    decoded = reading.read_image_as(path, channels)  # RGB for display, and as each model was trained
    key = reading.stem_key(path)
    if masks is None or key not in masks:
        return decoded, None
    mask = reading.read_mask(masks[key])
    if mask.shape != decoded[3].shape[:2]:
        raise ValueError(f"mask {masks[key].name} is {mask.shape[1]}x{mask.shape[0]}, "
                         f"image is {decoded[3].shape[1]}x{decoded[3].shape[0]}")
    return decoded, mask


# An image ready to predict: its output stem, its pixels per channel count (`reading.read_image_as`), its mask or None.
Decoded = tuple[str, dict[int, np.ndarray], np.ndarray | None]


def predict_batch(models: list[LoadedCheckpoint], batch: list[Decoded],
                  device: torch.device, options: Config, with_spread: bool) -> Iterator[Prediction]:
    """The Predictions of one batch of decoded images: the members' mean map, and their spread when asked."""
    speed = {"tta": options.TTA, "amp": options.AMP, "channels_last": options.CHANNELS_LAST}
    maps, spreads, types = [], [], []  # per member: a map per image; per member with the first one's head: (N, K)
    classes = head_classes(models)
    for loaded in models:
        inputs = [decoded[loaded.config.IN_CHANNELS] for _, decoded, _ in batch]
        if classes and tuple(getattr(loaded.model, "type_classes", ())) == classes:
            types.append(type_probabilities(loaded.model, loaded.config, inputs, device, options.AMP,
                                            options.CHANNELS_LAST))
        if with_spread:
            member_maps, member_spreads = native_probabilities_and_spreads(loaded.model, loaded.config, inputs,
                                                                           device, **speed)
            spreads.append(member_spreads)
        else:
            member_maps = native_probabilities(loaded.model, loaded.config, inputs, device, **speed)
        maps.append(member_maps)
    for index, (stem, decoded, mask) in enumerate(batch):
        means = [member[index] for member in maps]
        spread = combined_spread(means, [member[index] for member in spreads]) if with_spread else None
        type_means = dict(zip(classes, (sum(types) / len(types))[index].tolist(), strict=True)) if types else None
        yield Prediction(stem, decoded[3], sum(means) / len(models), mask, spread, type_means)


def predict(models: list[LoadedCheckpoint], images: list[Path], masks: dict[str, Path] | None,
            device: torch.device, options: Config, with_spread: bool,
            unreadable: list[str]) -> Iterator[Prediction]:
    """Yield a Prediction per readable image file; unreadable files are named in `unreadable` and skipped.

    See `predict_decoded` for what `options` and `with_spread` do.
    """
    channels = input_channels(models)

    def readable() -> Iterator[Decoded]:
        for path in tqdm(images, desc="predict", dynamic_ncols=True):
            try:
                decoded, mask = read_input(path, channels, masks)
            except Exception as error:  # any decoder error: report the file, keep going
                unreadable.append(f"{path}: skipped, {error}")
                continue
            yield path.stem, decoded, mask

    yield from predict_decoded(models, readable(), device, options, with_spread)


def input_channels(models: Sequence[LoadedCheckpoint]) -> list[int]:
    """The channel counts to decode each image in: RGB for display, and each member's IN_CHANNELS."""
    return sorted({3, *(loaded.config.IN_CHANNELS for loaded in models)})


def grey_as_channels(grey: np.ndarray, channel_counts: Sequence[int]) -> dict[int, np.ndarray]:
    """A uint8 (H, W) grey image as `reading.read_image_as` decodes a grey PNG: (H, W, 1) and (H, W, 3)."""
    return {count: np.repeat(grey[..., None], count, axis=-1) for count in channel_counts}


def predict_decoded(models: list[LoadedCheckpoint], items: Iterable[Decoded], device: torch.device,
                    options: Config, with_spread: bool) -> Iterator[Prediction]:
    """Yield a Prediction per decoded image: the mean probability of `models`, each run as it was trained.

    `options` gives the batch size, TTA, AMP and CHANNELS_LAST (the models
    already in that memory format). With `with_spread`, also the per-pixel
    standard deviation over every TTA view of every model.
    """
    batch: list[Decoded] = []
    for item in items:
        batch.append(item)
        if len(batch) == options.BATCH_SIZE:
            yield from predict_batch(models, batch, device, options, with_spread)
            batch = []
    if batch:
        yield from predict_batch(models, batch, device, options, with_spread)
