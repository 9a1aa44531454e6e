"""Tests of tumorseg/data/preprocess.py: the head box, crop and paste back, resize, normalisation."""

import numpy as np
import torch
import torch.nn.functional as F

from dataset import load_dataset
from tumorseg.data.preprocess import (crop_to_box, head_box, normalize, paste_back, prepare_input, prepare_mask,
                                      resize_image, resize_mask, restore_probability)
from tumorseg.data.reading import read_image, read_mask


def test_head_box_is_square_inside_the_slice_and_keeps_every_tumour_pixel(real_slices):
    sides = []
    for image, mask in real_slices:
        top, left, bottom, right = box = head_box(image)
        assert 0 <= top < bottom <= image.shape[0] and 0 <= left < right <= image.shape[1]
        assert bottom - top == right - left
        assert crop_to_box(mask, box).sum() == mask.sum()  # the tumour is never cropped away
        sides.append(bottom - top)
    assert np.mean(sides) < 0.95 * real_slices[0][0].shape[0]  # the black border is really cut off


def test_head_box_frames_the_largest_blob_with_its_margin_and_stays_inside():
    image = np.zeros((100, 120), np.uint8)
    image[30:70, 50:80] = 120  # the head: 40 rows x 30 columns
    image[2, 115] = 255  # an isolated speck, to be ignored
    # Rows: 40 + 2 x 4 margin = 26..74; columns: 30 + 2 x 3 = 47..83, widened evenly to 48.
    assert head_box(image, margin=0.1) == (26, 41, 74, 89)
    assert head_box(image[..., None], margin=0.1) == head_box(image.repeat(3).reshape(100, 120, 3), margin=0.1)
    corner = np.zeros((100, 120), np.uint8)
    corner[0:40, 90:120] = 120
    # Margin clipped at the top and right; the widened columns shift left to stay inside.
    assert head_box(corner, margin=0.1) == (0, 76, 44, 120)
    wide = np.zeros((60, 120), np.uint8)
    wide[10:50, 5:115] = 120
    assert head_box(wide, margin=0.0) == (0, 5, 60, 115)  # cannot be square: keeps the head whole instead


def test_head_box_of_a_black_slice_is_the_whole_slice():
    assert head_box(np.zeros((64, 80, 3), np.uint8)) == (0, 0, 64, 80)
    assert head_box(np.zeros((64, 80), np.uint8)) == (0, 0, 64, 80)


def test_crop_then_paste_back_at_the_box_size_restores_the_mask_exactly(real_slices):
    for image, mask in real_slices[:10]:
        box = head_box(image)
        side = box[2] - box[0]
        prepared, same_box = prepare_input(image, side, crop=True)
        assert same_box == box and np.array_equal(prepared, crop_to_box(image, box))
        restored = restore_probability(prepare_mask(mask, side, box).astype(np.float32), box, mask.shape)
        assert restored.dtype == np.float32 and np.array_equal(restored, mask)
        assert np.array_equal(paste_back(crop_to_box(mask, box), box, mask.shape), mask)


def test_probability_mapped_back_through_a_resize_matches_the_mask(real_slices):
    for image, mask in real_slices:
        _, box = prepare_input(image, 256, crop=True)
        probability = torch.from_numpy(prepare_mask(mask, 256, box).astype(np.float32))
        predicted = restore_probability(probability, box, mask.shape) > 0.5
        assert 2 * (predicted & (mask > 0)).sum() / (predicted.sum() + mask.sum()) > 0.95


def test_without_crop_loading_and_restoring_are_the_plain_resize(demo_root):
    data = load_dataset(demo_root, image_size=48, in_channels=3)
    expected_images = np.stack([resize_image(read_image(p.image_path, 3), 48) for p in data.pairs])
    expected_masks = np.stack([resize_mask(read_mask(p.mask_path), 48) for p in data.pairs])
    assert np.array_equal(data.images, expected_images) and np.array_equal(data.masks, expected_masks)
    image = read_image(data.pairs[0].image_path, 3)
    prepared, box = prepare_input(image, 48, crop=False)
    assert box == (0, 0, *image.shape[:2]) and np.array_equal(prepared, expected_images[0])
    probability = torch.rand(1, 48, 48, generator=torch.Generator().manual_seed(0))
    resized = F.interpolate(probability[None], size=image.shape[:2], mode="bilinear", align_corners=False)
    assert torch.equal(torch.from_numpy(restore_probability(probability[0], box, image.shape[:2])), resized[0, 0])


def test_loading_with_crop_gives_the_tumours_more_pixels(real_subset):
    plain = load_dataset(real_subset, image_size=64, in_channels=1)
    cropped = load_dataset(real_subset, image_size=64, in_channels=1, crop=True, crop_margin=0.05)
    assert cropped.images.shape == plain.images.shape and set(np.unique(cropped.masks)) == {0, 1}
    assert cropped.masks.mean() > 1.1 * plain.masks.mean()


def test_normalizations():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    z = normalize(image, "zscore")
    assert z.shape == (3, 8, 8)
    assert np.allclose(z.mean(axis=(1, 2)), 0, atol=1e-5) and np.allclose(z.std(axis=(1, 2)), 1, atol=1e-4)
    imagenet = normalize(image, "imagenet")
    expected = (image[..., 0] / 255 - 0.485) / 0.229
    assert np.allclose(imagenet[0], expected, atol=1e-5)
    assert np.isfinite(normalize(np.zeros((4, 4, 1), np.uint8), "zscore")).all()
