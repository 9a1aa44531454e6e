import shutil
import warnings
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

import torch.nn.functional as F

import dataset
from conftest import spread_stems
from dataset import (DatasetError, SegmentationDataset, crop_to_box, head_box, load_dataset, normalize, paste_back,
                     prepare_input, prepare_mask, read_image, read_mask, resize_image, resize_mask,
                     restore_probability, split_indices, three_way_split, training_augmentation,
                     verify_dataset)


@pytest.fixture
def demo_copy(demo_root, tmp_path):
    """A writable copy of the synthetic set, to break in one way per test."""
    return shutil.copytree(demo_root, tmp_path / "data")


@pytest.fixture(scope="module")
def real_slices(real_root) -> list[tuple[np.ndarray, np.ndarray]]:
    """One native 256 px slice from each of 56 patients: (image uint8 (H, W, 1), mask {0, 1} (H, W))."""
    return [(read_image(real_root / "images" / f"{stem}.png", 1), read_mask(real_root / "masks" / f"{stem}.png"))
            for stem in spread_stems(real_root, 3, 1)]


def test_sound_dataset_has_no_problems(demo_root):
    assert verify_dataset(demo_root) == []
    assert verify_dataset(demo_root, group_column="patient_id") == []


@pytest.mark.parametrize("break_it, file_name, words", [
    (lambda r: (r / "masks/demo_0003.png").unlink(), "images/demo_0003.png", "no mask"),
    (lambda r: shutil.copy(r / "masks/demo_0001.png", r / "masks/extra.png"), "masks/extra.png", "orphan mask"),
    (lambda r: shutil.copy(r / "images/demo_0002.png", r / "images/demo_0002.JPG"), "demo_0002.JPG", "share the stem"),
    (lambda r: (r / "images/demo_0004.png").write_bytes((r / "images/demo_0004.png").read_bytes()[:200]),
     "images/demo_0004.png", "corrupt image"),
    (lambda r: (r / "masks/demo_0005.png").write_text("not a png"), "masks/demo_0005.png", "corrupt mask"),
    (lambda r: Image.new("L", (32, 32)).save(r / "masks/demo_0006.png"), "images/demo_0006.png", "but its mask"),
    (lambda r: Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(r / "masks/demo_0007.png"),
     "masks/demo_0007.png", "not two-level"),
])
def test_each_integrity_failure_names_its_file(demo_copy, break_it, file_name, words):
    break_it(demo_copy)
    problems = verify_dataset(demo_copy)
    assert len(problems) == 1, problems
    assert file_name in problems[0] and words in problems[0]


def test_all_problems_are_reported_at_once_and_loading_refuses(demo_copy):
    (demo_copy / "masks/demo_0000.png").unlink()
    (demo_copy / "images/demo_0001.png").write_bytes(b"\x89PNG broken")
    Image.new("L", (10, 10)).save(demo_copy / "masks/demo_0002.png")
    with pytest.raises(DatasetError) as error:
        load_dataset(demo_copy, image_size=32, in_channels=1)
    assert len(error.value.problems) == 3
    for name in ("demo_0000", "demo_0001", "demo_0002"):
        assert name in str(error.value)


def test_missing_folders_and_empty_dataset(tmp_path):
    assert "images: folder is missing" in verify_dataset(tmp_path)[0]
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    assert "no image/mask pairs" in verify_dataset(tmp_path)[0]


def test_grouping_problems(demo_copy):
    assert "no column 'hospital'" in verify_dataset(demo_copy, "hospital")[0]
    lines = (demo_copy / "metadata.csv").read_text().splitlines()
    kept = [line for line in lines if not line.startswith("demo_0009")]
    (demo_copy / "metadata.csv").write_text("\n".join(kept) + "\n")
    problems = verify_dataset(demo_copy, "patient_id")
    assert len(problems) == 1 and "demo_0009" in problems[0] and "patient_id" in problems[0]
    assert verify_dataset(demo_copy) == []  # without grouping, metadata is not needed
    (demo_copy / "metadata.csv").unlink()
    assert "metadata.csv" in verify_dataset(demo_copy, "patient_id")[0]


def test_extensions_in_any_case_and_masks_0_1_are_accepted(demo_copy):
    (demo_copy / "images/demo_0000.png").rename(demo_copy / "images/demo_0000.PNG")
    image = Image.open(demo_copy / "images/demo_0001.png")
    image.save(demo_copy / "images/demo_0001.jpeg", quality=95)
    (demo_copy / "images/demo_0001.png").unlink()
    mask = np.asarray(Image.open(demo_copy / "masks/demo_0002.png")) // 255
    Image.fromarray(mask.astype(np.uint8)).save(demo_copy / "masks/demo_0002.png")
    assert verify_dataset(demo_copy) == []
    data = load_dataset(demo_copy, image_size=32, in_channels=1)
    assert len(data.pairs) == 24 and set(np.unique(data.masks)) <= {0, 1}
    assert data.masks[2].any()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_every_image_mode_decodes_to_uint8(tmp_path, mode):
    gray = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (16, 1))
    image = Image.fromarray(gray).convert(mode) if mode != "I;16" else Image.fromarray(gray.astype(np.uint16) * 256)
    path = tmp_path / "x.png"
    image.save(path)
    one, three = read_image(path, 1), read_image(path, 3)
    assert one.shape == (16, 16, 1) and three.shape == (16, 16, 3)
    assert one.dtype == three.dtype == np.uint8
    assert np.array_equal(three[..., 0], three[..., 2])  # grayscale replicated
    assert one[0, 0, 0] < one[0, -1, 0]  # intensity order kept (16-bit is rescaled)


def test_palette_and_colour_masks(tmp_path):
    indices = np.zeros((8, 8), np.uint8)
    indices[2:4, 2:4] = 1
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.save(tmp_path / "p.png")
    red = np.zeros((8, 8, 3), np.uint8)
    red[2:4, 2:4, 0] = 255
    Image.fromarray(red).save(tmp_path / "rgb.png")
    assert np.array_equal(read_mask(tmp_path / "p.png"), indices)
    assert np.array_equal(read_mask(tmp_path / "rgb.png"), indices)


def test_resize_keeps_masks_binary(demo_root):
    data = load_dataset(demo_root, image_size=48, in_channels=3)
    assert data.images.shape == (24, 48, 48, 3) and data.masks.shape == (24, 48, 48)
    assert set(np.unique(data.masks)) == {0, 1}


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


def test_grouped_split_keeps_groups_apart_and_is_reproducible():
    groups = [f"g{i // 5}" for i in range(100)]
    train, val = split_indices(100, 0.2, seed=3, groups=groups)
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert sorted(train + val) == list(range(100)) and len(val) == 20
    assert (train, val) == split_indices(100, 0.2, seed=3, groups=groups)
    assert (train, val) != split_indices(100, 0.2, seed=4, groups=groups)
    random_train, random_val = split_indices(100, 0.2, seed=3)
    assert len(random_val) == 20 and not set(random_train) & set(random_val)
    with pytest.raises(ValueError, match="at least 2 groups"):
        split_indices(10, 0.2, seed=0, groups=["a"] * 10)


@pytest.mark.parametrize("count, fraction, groups, words", [
    (1, 0.2, None, "train/validation split needs at least 2 images in data, found 1"),
    (0, 0.2, None, "needs at least 2 images in data, found 0"),
    (3, 0.9, None, "VAL_FRACTION 0.9 of 3 images in data puts all of them in validation and leaves no training "
                   "image; use at least 10 images or a smaller VAL_FRACTION"),
    (4, 0.2, ["a"] * 4, "grouped split needs at least 2 groups in column 'patient_id' of data/metadata.csv, found 1"),
    (6, 0.7, list("aabbcc"), "VAL_FRACTION 0.7 of 3 groups in column 'patient_id' of data/metadata.csv puts all of "
                             "them in validation and leaves no training group; use at least 4 groups"),
    (10, 1.0, None, "VAL_FRACTION must lie strictly between 0 and 1, got 1.0"),
])
def test_impossible_splits_are_explained_in_plain_words(count, fraction, groups, words):
    with pytest.raises(ValueError) as error:
        split_indices(count, fraction, seed=0, groups=groups, group_column="patient_id", root=Path("data"))
    assert words in str(error.value)


def test_every_split_either_has_both_sides_or_is_refused_before_scikit_learn():
    for count in range(1, 13):
        for fraction in (0.01, 0.1, 0.2, 0.5, 0.67, 0.9):
            for groups in (None, [str(i // 2) for i in range(count)]):
                try:
                    train, val = split_indices(count, fraction, seed=0, groups=groups)
                except ValueError as error:  # ours, not scikit-learn's "Adjust any of the aforementioned ..."
                    assert "VAL_FRACTION" in str(error) or "needs at least 2" in str(error)
                    continue
                assert train and val and sorted(train + val) == list(range(count))


def test_one_pair_is_refused_at_split_time(demo_copy):
    for sub in ("images", "masks"):
        for path in sorted((demo_copy / sub).iterdir())[1:]:
            path.unlink()
    data = load_dataset(demo_copy, image_size=32, in_channels=1)
    with pytest.raises(ValueError, match=f"needs at least 2 images in {demo_copy}, found 1"):
        split_indices(len(data.pairs), 0.2, seed=0, root=demo_copy)


def test_metadata_with_an_excel_byte_order_mark_is_read(demo_copy):
    metadata = demo_copy / "metadata.csv"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
    assert verify_dataset(demo_copy, "patient_id") == []
    assert dataset.read_metadata(demo_copy)[0][0] == "image_id"


def test_metadata_that_is_not_utf8_is_named(demo_copy):
    (demo_copy / "metadata.csv").write_bytes(b"image_id,patient_id\ndemo_0000,Jos\xe9\n")
    problems = verify_dataset(demo_copy, "patient_id")
    assert len(problems) == 1 and "metadata.csv: is not UTF-8 text" in problems[0] and "CSV UTF-8" in problems[0]


@pytest.mark.parametrize("sub, partner", [("images", "masks"), ("masks", "images")])
def test_a_broken_link_is_reported_as_such_and_not_as_a_missing_partner(demo_copy, sub, partner):
    link = demo_copy / sub / "demo_0003.png"
    link.unlink()
    link.symlink_to(demo_copy / "gone.png")
    problems = verify_dataset(demo_copy)
    assert problems == [f"{link}: broken link (target missing: {demo_copy / 'gone.png'})"]
    with pytest.raises(DatasetError, match="broken link"):
        load_dataset(demo_copy, image_size=32, in_channels=1)


def test_a_folder_with_an_image_name_is_reported(demo_copy):
    (demo_copy / "images" / "odd.png").mkdir()
    assert verify_dataset(demo_copy) == [f"{demo_copy / 'images' / 'odd.png'}: not a regular file "
                                         "(a folder or special file with an image name)"]


NFC, NFD = "caf\u00e9", "cafe\u0301"  # one name, two Unicode spellings (macOS writes NFD)


def test_nfc_and_nfd_spellings_of_one_name_pair_up(demo_copy):
    (demo_copy / "images/demo_0000.png").rename(demo_copy / f"images/{NFC}.png")
    (demo_copy / "masks/demo_0000.png").rename(demo_copy / f"masks/{NFD}.png")
    metadata = demo_copy / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("demo_0000,", f"{NFD},"), encoding="utf-8")
    assert verify_dataset(demo_copy, "patient_id") == []
    data = load_dataset(demo_copy, image_size=32, in_channels=1, group_column="patient_id")
    assert NFC in [pair.stem for pair in data.pairs]


def test_two_files_whose_names_differ_only_in_unicode_form_are_reported_once(demo_copy):
    shutil.copy(demo_copy / "images/demo_0000.png", demo_copy / f"images/{NFC}.png")
    shutil.copy(demo_copy / "images/demo_0000.png", demo_copy / f"images/{NFD}.png")
    shutil.copy(demo_copy / "masks/demo_0000.png", demo_copy / f"masks/{NFC}.png")
    problems = verify_dataset(demo_copy)
    assert len(problems) == 1, problems
    assert f"2 files share the stem '{NFC}'" in problems[0] and "different Unicode forms, NFC and NFD" in problems[0]
    assert "'caf\\xe9.png'" in problems[0] and "'cafe\\u0301.png'" in problems[0]


def test_a_short_metadata_row_is_a_missing_group_not_a_crash(demo_copy):
    rows = "".join(f"p0,demo_{i:04d}\n" for i in range(1, 24))
    (demo_copy / "metadata.csv").write_text("patient_id,image_id\np0\n" + rows)  # demo_0000's row is cut short
    problems = verify_dataset(demo_copy, "patient_id")
    assert len(problems) == 1 and "no 'patient_id' for image_id 'demo_0000'" in problems[0]


def assert_patients_apart(split: dataset.Split, groups: list[str]) -> None:
    """No patient in two of training, inner validation and held-out; every image in one of them."""
    sets = [{groups[i] for i in indices} for indices in (split.train, split.val, split.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sorted(split.train + split.val + split.test) == list(range(len(groups)))


def test_real_data_passes_integrity_and_splits_by_patient(real_root):
    assert verify_dataset(real_root, "patient_id") == []
    data = load_dataset(real_root, image_size=64, in_channels=1, group_column="patient_id")
    assert len(data.pairs) == len(list((real_root / "images").iterdir()))
    single = three_way_split(len(data.pairs), 0.2, 0.2, seed=42, groups=data.groups)
    assert_patients_apart(single, data.groups)
    assert 0.1 < len(single.test) / len(data.pairs) < 0.3 and 0.1 < len(single.val) / len(data.pairs) < 0.3
    held_out = []
    for fold in range(5):
        split = three_way_split(len(data.pairs), 0.2, 0.0, seed=42, folds=5, fold=fold, groups=data.groups)
        assert_patients_apart(split, data.groups)
        held_out += split.test
    assert sorted(held_out) == list(range(len(data.pairs)))  # every slice held out exactly once over the folds
    # Tumours are small: mean foreground share is a few percent at most.
    assert 0.002 < data.masks.mean() < 0.05


def test_worker_seeding_gives_workers_different_streams(demo_root):
    data = load_dataset(demo_root, image_size=32, in_channels=1)
    train = SegmentationDataset(data.images[:1].repeat(8, 0), data.masks[:1].repeat(8, 0), "zscore",
                                training_augmentation(seed=0))
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=2, worker_init_fn=dataset.seed_worker)
    first, second = list(loader)
    assert not torch.equal(first[0], second[0])  # without reseeding both workers draw the same flips


# ----------------------------------------------------------------------------- disk cache

def test_disk_cache_serves_exactly_the_batches_of_the_memory_cache(demo_root, tmp_path, monkeypatch):
    from tumorseg.training import loaders
    from config import Config
    cache = tmp_path / "cache"
    memory = load_dataset(demo_root, 32, 1, "patient_id", crop=True)
    disk = load_dataset(demo_root, 32, 1, "patient_id", crop=True, cache_dir=cache)
    assert isinstance(disk.images, np.memmap) and not disk.images.flags.writeable
    assert disk.pairs == memory.pairs and disk.groups == memory.groups
    assert np.array_equal(disk.images, memory.images) and np.array_equal(disk.masks, memory.masks)
    assert dataset.mask_share(disk.masks, [3, 1, 2]) == pytest.approx(memory.masks[[1, 2, 3]].mean())

    config = Config(IMAGE_SIZE=32, IN_CHANNELS=1, NORMALIZATION="zscore", BATCH_SIZE=5, NUM_WORKERS=2,
                    AUG_AFFINE=True)
    train_idx, val_idx = split_indices(len(memory.pairs), 0.2, 0, memory.groups)
    for memory_loader, disk_loader in zip(loaders.make_loaders(memory, train_idx, val_idx, config),
                                          loaders.make_loaders(disk, train_idx, val_idx, config), strict=True):
        for _ in range(2):  # two epochs, read by 2 worker processes
            for (image_a, mask_a), (image_b, mask_b) in zip(memory_loader, disk_loader, strict=True):
                assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)

    def no_decoding(*args):
        raise AssertionError("a valid cache was decoded again")

    monkeypatch.setattr(dataset, "_scan", no_decoding)
    again = load_dataset(demo_root, 32, 1, "patient_id", crop=True, cache_dir=cache)
    assert np.array_equal(again.images, memory.images) and again.groups == memory.groups
    assert len(list(cache.iterdir())) == 1


def test_disk_cache_is_rebuilt_when_a_file_or_setting_changes(demo_copy, tmp_path):
    import os
    cache = tmp_path / "cache"
    first = load_dataset(demo_copy, 32, 1, cache_dir=cache)
    (old_folder,) = cache.iterdir()
    image_path = demo_copy / "images" / "demo_0002.png"
    Image.fromarray(255 - np.asarray(Image.open(image_path))).save(image_path)
    os.utime(image_path, ns=(1, 1))  # an edit keeps the size here: the time alone must tell
    second = load_dataset(demo_copy, 32, 1, cache_dir=cache)
    (new_folder,) = cache.iterdir()  # the replaced cache is gone
    assert new_folder != old_folder
    changed = [i for i in range(len(first.pairs)) if not np.array_equal(first.images[i], second.images[i])]
    assert [first.pairs[i].stem for i in changed] == ["demo_0002"]
    load_dataset(demo_copy, 16, 1, cache_dir=cache)  # another size: its own cache, beside the other
    assert len(list(cache.iterdir())) == 2


def test_a_broken_dataset_leaves_no_disk_cache(demo_copy, tmp_path):
    (demo_copy / "masks" / "demo_0004.png").unlink()
    with pytest.raises(DatasetError, match="demo_0004"):
        load_dataset(demo_copy, 32, 1, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(DatasetError, match="patient_id"):  # groups are checked on a cache hit too
        (demo_copy / "masks" / "demo_0004.png").symlink_to(demo_copy / "masks" / "demo_0005.png")
        load_dataset(demo_copy, 32, 1, cache_dir=tmp_path / "cache")
        (demo_copy / "metadata.csv").write_text("image_id,other\n")
        load_dataset(demo_copy, 32, 1, "patient_id", cache_dir=tmp_path / "cache")


def test_a_memory_mapped_dataset_pickles_as_its_file_name(demo_root, tmp_path):
    import pickle
    data = load_dataset(demo_root, 32, 1, cache_dir=tmp_path)
    samples = SegmentationDataset(data.images, data.masks, "zscore", indices=[5, 2])
    copy = pickle.loads(pickle.dumps(samples))  # what a worker started by spawn receives
    assert len(pickle.dumps(samples)) < 2000 and isinstance(copy.images, np.memmap)
    assert torch.equal(copy[1][0], samples[1][0]) and len(copy) == 2


def test_the_memory_cache_holds_each_slice_once_while_loading(demo_root):
    import tracemalloc

    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        data = load_dataset(demo_root, image_size=256, in_channels=3)  # 24 slices upsampled: 6.3 MB of arrays
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    arrays = data.images.nbytes + data.masks.nbytes
    assert data.images.shape == (24, 256, 256, 3) and data.masks.shape == (24, 256, 256)
    assert peak < 1.5 * arrays  # a list of slices stacked at the end would peak at twice the arrays


# ----------------------------------------------------------------------------- hard-example sampling

def test_hard_sampler_draws_uniformly_until_it_knows_losses_then_favours_hard_slices():
    sampler = dataset.HardExampleSampler(4, 0.5, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sampler.probabilities(), torch.full((4,), 0.25))
    order = list(sampler)
    assert len(order) == 4 and all(0 <= i < 4 for i in order)
    sampler.record(0, torch.tensor([3.0, 3.0]))  # the first batch: positions order[0], order[1]
    sampler.record(1, torch.tensor([1.0, 1.0]))
    expected = torch.zeros(4)
    for position, loss in zip(order, [3.0, 3.0, 1.0, 1.0], strict=True):
        expected[position] = loss  # a position drawn twice keeps its latest loss
    assert torch.equal(sampler.losses[order], expected[order])
    assert torch.isnan(sampler.losses[[i for i in range(4) if i not in order]]).all()
    probabilities = sampler.probabilities()
    assert probabilities.sum().item() == pytest.approx(1.0)
    known = [i for i in range(4) if i in order]
    filled = torch.where(torch.isnan(sampler.losses), sampler.losses[known].mean(), sampler.losses)
    assert torch.allclose(probabilities, 0.5 / 4 + 0.5 * filled / filled.sum())  # unseen slices: the mean loss


def test_hard_sampler_share_sets_how_much_the_loss_counts():
    losses = torch.tensor([9.0, 1.0, 1.0, 1.0, 0.0])
    for share, hardest in ((0.0, 0.2), (0.5, 0.5 / 5 + 0.5 * 9 / 12), (1.0, 9 / 12)):
        sampler = dataset.HardExampleSampler(5, share, 5, torch.Generator())
        sampler.load_state_dict({"losses": losses})
        assert sampler.probabilities()[0].item() == pytest.approx(hardest)
        assert sampler.probabilities()[4].item() == pytest.approx((1 - share) / 5)  # a solved slice, never 0 unless 1
    # Drawn often enough, the hard slice comes up in proportion.
    sampler = dataset.HardExampleSampler(5, 1.0, 5, torch.Generator().manual_seed(1))
    sampler.load_state_dict({"losses": losses})
    draws = torch.cat([torch.tensor(list(sampler)) for _ in range(400)])
    assert (draws == 0).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert (draws == 4).sum().item() == 0


def test_hard_sampler_repeats_its_epochs_from_the_same_generator_state_and_refuses_bad_input():
    first = dataset.HardExampleSampler(50, 0.5, 8, torch.Generator().manual_seed(3))
    second = dataset.HardExampleSampler(50, 0.5, 8, torch.Generator().manual_seed(3))
    epochs_first, epochs_second = [list(first) for _ in range(2)], [list(second) for _ in range(2)]
    assert epochs_first == epochs_second and epochs_first[0] != epochs_first[1]  # same stream, a new draw each epoch
    with pytest.raises(ValueError, match="batch 9 holds 0 positions"):
        first.record(9, torch.ones(8))
    with pytest.raises(ValueError, match="cover 3 slices"):
        first.load_state_dict({"losses": torch.ones(3)})
    with pytest.raises(ValueError, match="hard_share"):
        dataset.HardExampleSampler(5, 1.5, 2, torch.Generator())


# ----------------------------------------------------------------------------- class-balanced sampling

SKEWED = ["glioma"] * 50 + ["meningioma"] * 7 + ["pituitary"] * 4  # 61 slices: 61 = 3 x 20 + 1


def test_balanced_sampler_draws_each_class_equally_often_and_cycles_through_each_class_without_replacement():
    labels = SKEWED
    sampler = dataset.BalancedSampler(labels, torch.Generator().manual_seed(0))
    epochs = [list(sampler) for _ in range(5)]
    for order in epochs:
        assert len(order) == len(sampler) == 61 and all(0 <= i < 61 for i in order)
        counts = [sum(labels[i] == c for i in order) for c in ("glioma", "meningioma", "pituitary")]
        assert sorted(counts) == [20, 20, 21]  # equal within 1, the one extra to a class drawn at random
    draws = [i for order in epochs for i in order]
    # Shuffled cycling: over 5 epochs (about 101 draws of the 50 gliomas) every glioma slice comes up
    # twice or three times, never once or 4 times, as draws with replacement would allow.
    assert {draws.count(i) for i in range(50)} <= {2, 3}
    small = [draws.count(i) for i in range(57, 61)]  # 4 pituitary slices share 100 to 105 draws: evenly
    assert max(small) - min(small) <= 1 and sum(small) in range(100, 106)
    assert epochs[0] != epochs[1]


def test_balanced_sampler_repeats_its_epochs_from_its_state_and_the_generators_and_refuses_a_foreign_state():
    generator = torch.Generator().manual_seed(3)
    first = dataset.BalancedSampler(SKEWED, generator)
    list(first)
    state, generator_state = first.state_dict(), generator.get_state()
    expected = [list(first) for _ in range(2)]
    resumed_generator = torch.Generator().manual_seed(99)  # a fresh run's generator, put back as a resume does
    resumed = dataset.BalancedSampler(SKEWED, resumed_generator)
    resumed.load_state_dict(state)
    resumed_generator.set_state(generator_state)
    assert [list(resumed) for _ in range(2)] == expected
    with pytest.raises(ValueError, match="do not fit this split's 2 classes of 5 slices"):
        dataset.BalancedSampler([0, 0, 1, 1, 1], torch.Generator()).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one"):
        dataset.BalancedSampler([], torch.Generator())


def test_a_tiny_set_whose_held_out_share_takes_a_patient_says_so():
    with pytest.raises(ValueError) as caught:
        three_way_split(2, 0.2, 0.2, seed=0, groups=["p1", "p2"], group_column="patient_id")
    message = str(caught.value)
    assert message.startswith("grouped split needs at least 2 groups in column 'patient_id', found 1")
    assert "the held-out share (--test-fraction 0.2) took 1 of the 2 groups first and left 1" in message
    assert "a smaller --test-fraction" in message
    with pytest.raises(ValueError, match="--folds 2.*took 1 of the 2 groups first.*more --folds"):
        three_way_split(2, 0.2, 0.0, seed=0, folds=2, fold=0, groups=["p1", "p2"])


def test_three_way_split_draws_validation_from_the_other_folds_only():
    groups = [f"p{i // 4}" for i in range(80)]
    for fold in range(4):
        split = three_way_split(80, 0.25, 0.0, seed=1, folds=4, fold=fold, groups=groups)
        assert_patients_apart(split, groups)
        assert len({groups[i] for i in split.test}) == 5 and len({groups[i] for i in split.val}) == 4
    plain = three_way_split(80, 0.25, 0.2, seed=1, groups=groups)
    assert_patients_apart(plain, groups)
    assert len({groups[i] for i in plain.test}) == 4 and plain == three_way_split(80, 0.25, 0.2, 1, groups=groups)
    assert three_way_split(80, 0.25, 0.0, seed=1, groups=groups).test == []
    with pytest.raises(ValueError, match="TEST_FRACTION 0.99"):
        three_way_split(80, 0.25, 0.99, seed=1, groups=groups)


def test_fold_column_serves_as_the_folds_and_names_a_patient_in_two_folds():
    groups = [f"p{i // 4}" for i in range(40)]
    labels = [str(1 + (i // 4) % 5) for i in range(40)]  # patients 0, 5 in fold 1; 1, 6 in fold 2 ...
    split = three_way_split(40, 0.25, 0.0, seed=0, fold=1, groups=groups, fold_labels=labels, fold_column="fold")
    assert {labels[i] for i in split.test} == {"2"}
    assert_patients_apart(split, groups)
    labels[5] = "4"  # patient p1's second slice moves to fold 4
    with pytest.raises(ValueError, match=r"1 group\(s\) have images in two or more folds.*p1 in folds 2, 4"):
        three_way_split(40, 0.25, 0.0, seed=0, fold=0, groups=groups, fold_labels=labels, fold_column="fold")
    with pytest.raises(ValueError, match="choose FOLD 0 to 4"):
        three_way_split(40, 0.25, 0.0, seed=0, fold=5, fold_labels=[str(1 + i % 5) for i in range(40)])


def test_the_release_folds_put_patients_in_two_folds_and_are_refused(real_root):
    """The shared set's `fold` column (the release's own) counts repeat studies apart: refused, patients named."""
    data = load_dataset(real_root, image_size=16, in_channels=1, group_column="patient_id")
    labels, problems = dataset.group_labels(real_root, "fold", data.pairs)
    assert problems == []
    folds_of: dict[str, set[str]] = {}
    for group, label in zip(data.groups, labels, strict=True):
        folds_of.setdefault(group, set()).add(label)
    crossing = sorted(group for group, found in folds_of.items() if len(found) > 1)
    assert len(crossing) >= 10  # 15 of the release's 209 patients; those of them in the shared subset
    with pytest.raises(ValueError, match=rf"{len(crossing)} group\(s\) have images in two or more folds") as error:
        three_way_split(len(data.pairs), 0.2, 0.0, 42, fold=0, groups=data.groups, fold_labels=labels,
                        fold_column="fold")
    assert all(f"{group} in folds " in str(error.value) for group in crossing)


def test_a_split_file_is_refused_where_it_no_longer_describes_the_data(tmp_path):
    import json
    stems = ["a1", "a2", "b1", "b2", "c1"]
    groups = ["a", "a", "b", "b", "c"]
    path = tmp_path / "splits.json"

    def refusal(entry: dict, fold: int = 0) -> str:
        path.write_text(json.dumps({"folds": [entry]}))
        with pytest.raises(ValueError) as error:
            dataset.read_split_file(path, fold, stems, groups)
        return str(error.value)

    good = {"train": ["a1", "a2"], "val": ["b1", "b2"], "test": ["c1"]}
    path.write_text(json.dumps({"folds": [good]}))
    split = dataset.read_split_file(path, 0, stems, groups)
    assert (split.train, split.val, split.test) == ([0, 1], [2, 3], [4])
    assert "FOLD 3: the file has 1 folds" in refusal(good, fold=3)
    assert "1 listed images are not in the data: z9" in refusal({**good, "test": ["c1", "z9"]})
    assert "1 images of the data are in no role: c1" in refusal({**good, "test": []})
    assert "1 images are listed twice: a1" in refusal({**good, "val": ["b1", "b2", "a1"]})
    assert "1 groups sit in two roles: b" in refusal({"train": ["a1", "a2", "b1"], "val": ["b2"], "test": ["c1"]})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable split file"):
        dataset.read_split_file(path, 0, stems, groups)


def test_fold_split_lists_are_the_folds_train_py_makes(demo_root):
    lists = dataset.fold_split_lists(demo_root, 3, "", "patient_id", 42, 0.2)
    data = dataset.load_dataset(demo_root, 32, 1, "patient_id")
    for fold, entry in enumerate(lists):
        split = dataset.three_way_split(len(data.pairs), 0.2, 0.0, 42, 3, fold, data.groups, None, "patient_id")
        assert entry == {role: [data.pairs[i].stem for i in getattr(split, role)] for role in ("train", "val", "test")}
    assert sorted(s for entry in lists for s in entry["test"]) == [p.stem for p in data.pairs]


def test_the_data_fingerprint_changes_with_a_file_or_the_metadata(demo_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_root, copy)
    assert dataset.data_fingerprint(copy) == dataset.data_fingerprint(demo_root)
    (copy / "metadata.csv").write_text((copy / "metadata.csv").read_text() + "\n")
    changed = dataset.data_fingerprint(copy)
    assert changed["sha256"] != dataset.data_fingerprint(demo_root)["sha256"] and changed["pairs"] == 24
    next((copy / "masks").iterdir()).unlink()
    assert dataset.data_fingerprint(copy)["pairs"] == 23
