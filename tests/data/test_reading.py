"""Tests of tumorseg/data/reading.py: decoding every image and mask mode, pairing by stem, metadata.csv."""

import numpy as np
import pytest
from PIL import Image

from conftest import NFC, NFD
from dataset import load_dataset
from tumorseg.data.checks import verify_dataset
from tumorseg.data.reading import read_image, read_mask, read_metadata


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


def test_metadata_with_an_excel_byte_order_mark_is_read(demo_copy):
    metadata = demo_copy / "metadata.csv"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
    assert verify_dataset(demo_copy, "patient_id") == []
    assert read_metadata(demo_copy)[0][0] == "image_id"


def test_metadata_that_is_not_utf8_is_named(demo_copy):
    (demo_copy / "metadata.csv").write_bytes(b"image_id,patient_id\ndemo_0000,Jos\xe9\n")
    problems = verify_dataset(demo_copy, "patient_id")
    assert len(problems) == 1 and "metadata.csv: is not UTF-8 text" in problems[0] and "CSV UTF-8" in problems[0]


def test_nfc_and_nfd_spellings_of_one_name_pair_up(demo_copy):
    (demo_copy / "images/demo_0000.png").rename(demo_copy / f"images/{NFC}.png")
    (demo_copy / "masks/demo_0000.png").rename(demo_copy / f"masks/{NFD}.png")
    metadata = demo_copy / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("demo_0000,", f"{NFD},"), encoding="utf-8")
    assert verify_dataset(demo_copy, "patient_id") == []
    data = load_dataset(demo_copy, image_size=32, in_channels=1, group_column="patient_id")
    assert NFC in [pair.stem for pair in data.pairs]
