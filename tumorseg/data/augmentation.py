"""Training augmentation, and its seeding in each DataLoader worker."""

from __future__ import annotations

import albumentations as A
import cv2
import torch


def training_augmentation(seed: int, flips: bool = True, affine: bool = False, intensity: bool = False,
                          elastic: bool = False) -> A.Compose | None:
    """The switched-on training augmentations, reproducible from `seed`; None when all are off.

    flips: horizontal/vertical flips and 90-degree rotations, label-preserving for MRI slices.
    affine: the patient lies a little differently in each scan (scale 0.9-1.1, +-15 degrees, +-6 % shift per axis).
    elastic: smooth geometric warp like gradient non-linearity (mean ~3 px, at most ~10 px at 256 px).
    intensity: gain, contrast and gamma differ between scanners and protocols.
    Geometric transforms move image and mask alike (mask by nearest neighbour, so it stays {0, 1},
    uncovered pixels 0); intensity transforms touch the image only.
    """
    geometry = dict(interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)
    transforms: list[A.BasicTransform] = []
    if flips:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if affine:
        # keep_ratio: one zoom for both axes, as heads differ in size, not in pixel aspect ratio
        transforms.append(A.Affine(scale=(0.9, 1.1), keep_ratio=True, rotate=(-15, 15),
                                   translate_percent=(-0.06, 0.06), p=0.5, **geometry))
    if elastic:  # GridDistortion's limit is relative to the image, so it is equally mild at any IMAGE_SIZE
        transforms.append(A.GridDistortion(num_steps=5, distort_limit=(-0.1, 0.1), p=0.25, **geometry))
    if intensity:
        transforms += [A.RandomBrightnessContrast(brightness_limit=(-0.15, 0.15), contrast_limit=(-0.15, 0.15),
                                                  p=0.5),
                       A.RandomGamma(gamma_limit=(80, 120), p=0.5)]
    return A.Compose(transforms, seed=seed) if transforms else None


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker its own augmentation stream (else all repeat one)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(info.seed % 2**32)
