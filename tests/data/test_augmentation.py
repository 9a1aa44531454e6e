"""Tests of tumorseg/data/augmentation.py: each augmentation switch, image and mask moved together, worker seeds."""

import warnings

import albumentations as A
import numpy as np
import pytest
import torch

from dataset import SegmentationDataset, load_dataset
from tumorseg.data.augmentation import seed_worker, training_augmentation


def test_augmentation_moves_image_and_mask_together_and_only_in_training(demo_root):
    data = load_dataset(demo_root, image_size=32, in_channels=1)
    images, masks = data.images[:1], data.masks[:1]
    train = SegmentationDataset(images, masks, "zscore", training_augmentation(seed=0))
    plain = SegmentationDataset(images, masks, "zscore")
    reference_image, reference_mask = plain[0]
    seen = set()
    for _ in range(40):
        image, mask = train[0]
        # Whatever transform was drawn, the mask still covers the same pixels as the image's tumour.
        variants = [(torch.rot90(reference_image, k, (1, 2)), torch.rot90(reference_mask, k, (1, 2)))
                    for k in range(4)]
        variants += [(v[0].flip(2), v[1].flip(2)) for v in variants]
        match = [i for i, (vi, vm) in enumerate(variants) if torch.allclose(vi, image) and torch.equal(vm, mask)]
        assert match, "image and mask were transformed differently"
        seen.add(match[0])
    assert len(seen) > 3  # several different flips/rotations were drawn
    assert all(torch.equal(plain[0][1], reference_mask) for _ in range(5))


AUGMENTATION_SWITCHES = ("flips", "affine", "intensity", "elastic")


def test_augmentation_switches():
    assert training_augmentation(0, flips=False) is None
    assert [type(t) for t in training_augmentation(0).transforms] == [A.HorizontalFlip, A.VerticalFlip,
                                                                      A.RandomRotate90]
    every = training_augmentation(0, affine=True, intensity=True, elastic=True)
    assert [type(t) for t in every.transforms][3:] == [A.Affine, A.GridDistortion, A.RandomBrightnessContrast,
                                                       A.RandomGamma]


@pytest.mark.parametrize("switch", AUGMENTATION_SWITCHES)
def test_each_augmentation_keeps_masks_binary_and_intensity_spares_them(real_slices, switch):
    moved = 0
    for seed in range(4):
        transform = training_augmentation(seed, **{name: name == switch for name in AUGMENTATION_SWITCHES})
        for image, mask in real_slices[:6]:
            out = transform(image=image, mask=mask)
            assert out["image"].shape == image.shape and out["image"].dtype == np.uint8
            assert out["mask"].shape == mask.shape and out["mask"].dtype == np.uint8
            assert set(np.unique(out["mask"])) <= {0, 1}
            if switch == "intensity":
                assert np.array_equal(out["mask"], mask)
                moved += not np.array_equal(out["image"], image)
            else:
                moved += not np.array_equal(out["mask"], mask)
    assert moved >= 3  # the switch really transforms something


@pytest.mark.parametrize("switch", ["affine", "elastic"])
def test_warps_move_image_and_mask_together(real_slices, switch):
    warps = 0
    for seed in range(4):
        transform = training_augmentation(seed, flips=False, **{switch: True})
        for _, mask in real_slices[:6]:
            assert mask.sum() >= 300  # tumours large enough that a warp keeps most of them in the frame
            out = transform(image=mask[..., None] * 255, mask=mask)  # the mask drawn as an image, warped bilinearly
            drawn, warped = out["image"][..., 0] > 127, out["mask"] > 0
            # No way out for an empty result: a warp that loses the tumour (or both images) fails here.
            assert 2 * (drawn & warped).sum() / max(drawn.sum() + warped.sum(), 1) > 0.9
            assert warped.sum() >= 0.5 * mask.sum()
            warps += not np.array_equal(warped, mask > 0)
    assert warps >= 3


def test_augmentation_is_reproducible_from_its_seed_and_warns_of_nothing(real_slices):
    image, mask = real_slices[0]

    def draws(seed: int) -> list[dict[str, np.ndarray]]:
        transform = training_augmentation(seed, affine=True, intensity=True, elastic=True)
        return [transform(image=image, mask=mask) for _ in range(8)]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a deprecated argument name in albumentations 2.x
        first, again, other = draws(1), draws(1), draws(2)
    for key in ("image", "mask"):
        assert all(np.array_equal(a[key], b[key]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True))


def test_worker_seeding_gives_workers_different_streams(demo_root):
    data = load_dataset(demo_root, image_size=32, in_channels=1)
    train = SegmentationDataset(data.images[:1].repeat(8, 0), data.masks[:1].repeat(8, 0), "zscore",
                                training_augmentation(seed=0))
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=2, worker_init_fn=seed_worker)
    first, second = list(loader)
    assert not torch.equal(first[0], second[0])  # without reseeding both workers draw the same flips
