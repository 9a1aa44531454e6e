"""Tests of tumorseg/data/checks.py: every integrity problem named with its file, metadata columns per pair."""

import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import NFC, NFD
from dataset import load_dataset
from tumorseg.data.checks import DatasetError, verify_dataset


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
