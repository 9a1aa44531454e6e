"""tumorseg/sources/nifti.py: image/label volume pairs cut into slices, every input problem refused up front."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from conftest import interrupt_on_call, metadata_rows, oblique_affine, png_pixels, write_nifti as write_volume
from tumorseg.data.checks import verify_dataset
from tumorseg.sources.nifti import NIFTI_METADATA_COLUMNS, convert_case, pattern_ending

OBLIQUE = oblique_affine((0.9, 1.1, 5.0))  # in-plane voxels of 0.9 x 1.1 mm, 5 mm slices


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """`data` saved as NIfTI with the anisotropic oblique affine unless another is given."""
    return write_volume(path, data, OBLIQUE if affine is None else affine)


# Per case: volume shape, and the labelled boxes (slice along axis 2, rows, cols, label value).
# Slices 0 and the last are blank (all zero, outside the head), so never drawn as tumour-free slices.
NIFTI_CASES = {
    "caseA": ((20, 16, 9), [(2, slice(3, 8), slice(4, 9), 1), (3, slice(3, 6), slice(4, 6), 2),
                            (3, slice(10, 12), slice(2, 5), 1), (5, slice(10, 13), slice(5, 8), 4),
                            (6, slice(1, 3), slice(1, 3), 2)]),
    "caseB": ((18, 22, 7), [(1, slice(5, 9), slice(5, 9), 4), (2, slice(5, 9), slice(5, 9), 1),
                            (2, slice(9, 10), slice(5, 9), 4)]),
}


def case_volumes(case: str) -> tuple[np.ndarray, np.ndarray]:
    """Float image (head of noisy tissue, brighter tumour) and uint8 label volume of a synthetic case."""
    shape, boxes = NIFTI_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    image = rng.normal(300, 80, shape).astype(np.float32)
    image[:, :, [0, -1]] = 0
    labels = np.zeros(shape, np.uint8)
    for k, rows, cols, value in boxes:
        labels[rows, cols, k] = value
        image[rows, cols, k] += 400
    return image, labels


def tumour_slices(case: str, labels: tuple[int, ...] = (1, 2, 4)) -> list[int]:
    """Slice indices (axis 2) of a synthetic case holding any of `labels`."""
    return sorted({k for k, _, _, value in NIFTI_CASES[case][1] if value in labels})


def write_cases(images: Path, masks: Path, image_name: str = "{case}.nii.gz",
                mask_name: str = "{case}.nii.gz") -> None:
    """Every synthetic case as an image volume under `images` and a label volume under `masks`."""
    for case in NIFTI_CASES:
        image, labels = case_volumes(case)
        write_nifti(images / image_name.format(case=case), image)
        write_nifti(masks / mask_name.format(case=case), labels)


def nifti(*args: object) -> int:
    """prepare_data's exit status for `nifti` with these arguments."""
    return prepare_data.main(["nifti", *map(str, args)])


@pytest.fixture(scope="module")
def volume_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with images/ and labels/ of the synthetic cases, same file name per pair (read-only)."""
    root = tmp_path_factory.mktemp("volumes")
    write_cases(root / "images", root / "labels")
    return root


def convert_pairs(volume_pairs: Path, out: Path, *options: object) -> int:
    return nifti("--images", volume_pairs / "images", "--masks", volume_pairs / "labels", "--out", out, *options)


def test_nifti_writes_one_png_pair_per_tumour_slice_with_the_volume_window(volume_pairs: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from tumorseg.data.volumes import read_nifti, window_to_uint8

    out = tmp_path / "out"
    assert convert_pairs(volume_pairs, out) == 0
    rows = metadata_rows(out)
    assert list(rows[0]) == NIFTI_METADATA_COLUMNS
    expected_ids = [f"{case}_k{k:03d}" for case in NIFTI_CASES for k in tumour_slices(case)]
    assert [row["image_id"] for row in rows] == expected_ids
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(p.stem for p in (out / "masks").iterdir()) \
        == sorted(expected_ids)
    for row in rows:
        case, k = row["patient_id"], int(row["slice_index"])
        assert row["image_id"].startswith(case) and row["slice_axis"] == "2"
        assert row["source_volume"] == row["source_mask"] == f"{case}.nii.gz"
        windowed = window_to_uint8(read_nifti(volume_pairs / "images" / f"{case}.nii.gz").data)
        assert np.array_equal(png_pixels(out / "images" / f"{row['image_id']}.png"), windowed[:, :, k])
        mask = png_pixels(out / "masks" / f"{row['image_id']}.png")
        assert set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask > 0, case_volumes(case)[1][:, :, k] > 0)
        assert row["has_tumour"] == "1" and int(row["tumour_pixels"]) == np.count_nonzero(mask)
        assert (row["height"], row["width"]) == tuple(str(n) for n in NIFTI_CASES[case][0][:2])
        # In-plane voxels 0.9 x 1.1 mm (the affine's column lengths), kept apart: rows x columns.
        assert (row["pixel_spacing_rows_mm"], row["pixel_spacing_cols_mm"], row["pixel_spacing_mm"]) == \
            ("0.9", "1.1", "0.9x1.1")
    assert verify_dataset(out, group_column="patient_id") == []
    printed = capsys.readouterr().out
    assert f"wrote {len(expected_ids)} slices of 2 cases" in printed and "0 tumour-free" in printed
    assert "percentiles 0.5 to 99.5" in printed and "label values found: 1, 2, 4" in printed


def test_nifti_tumour_labels_keep_only_the_chosen_values(volume_pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert convert_pairs(volume_pairs, out, "--tumour-labels", "4") == 0
    rows = metadata_rows(out)
    assert [row["image_id"] for row in rows] == [f"{case}_k{k:03d}" for case in NIFTI_CASES
                                                 for k in tumour_slices(case, (4,))]
    for row in rows:
        labels = case_volumes(row["patient_id"])[1][:, :, int(row["slice_index"])]
        mask = png_pixels(out / "masks" / f"{row['image_id']}.png")
        assert np.array_equal(mask > 0, labels == 4) and (labels[mask == 0] != 4).all()


def test_nifti_empty_share_adds_non_blank_tumour_free_slices(volume_pairs: Path, tmp_path: Path) -> None:
    assert convert_pairs(volume_pairs, tmp_path / "a", "--empty-share", "0.5", "--seed", "3") == 0
    rows = metadata_rows(tmp_path / "a")
    tumour = sum(len(tumour_slices(case)) for case in NIFTI_CASES)
    empty = [row for row in rows if row["has_tumour"] == "0"]
    assert len(rows) - len(empty) == tumour and len(empty) == round(0.5 * tumour)
    for row in empty:
        k, shape = int(row["slice_index"]), NIFTI_CASES[row["patient_id"]][0]
        assert k not in tumour_slices(row["patient_id"]) and 0 < k < shape[2] - 1  # blank end slices never
        assert row["tumour_pixels"] == "0" and not png_pixels(tmp_path / "a" / "masks" / f"{row['image_id']}.png").any()
    assert verify_dataset(tmp_path / "a", group_column="patient_id") == []
    # The same seed draws the same slices.
    assert convert_pairs(volume_pairs, tmp_path / "b", "--empty-share", "0.5", "--seed", "3") == 0
    assert metadata_rows(tmp_path / "b") == rows


def test_nifti_axis_and_size_options(volume_pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert convert_pairs(volume_pairs, out, "--axis", "0", "--size", "12") == 0
    rows = metadata_rows(out)
    assert {row["slice_axis"] for row in rows} == {"0"} and rows[0]["image_id"].startswith("caseA_i")
    for row in rows:
        assert png_pixels(out / "images" / f"{row['image_id']}.png").shape == (12, 12)
        assert set(np.unique(png_pixels(out / "masks" / f"{row['image_id']}.png"))) <= {0, 255}
    # Across axis 0 a slice is (16 or 22) x (9 or 7) voxels of 1.1 x 5 mm, resampled to 12 x 12.
    row = next(row for row in rows if row["patient_id"] == "caseA")
    assert float(row["pixel_spacing_rows_mm"]) == pytest.approx(1.1 * 16 / 12, rel=1e-5)
    assert float(row["pixel_spacing_cols_mm"]) == pytest.approx(5.0 * 9 / 12, rel=1e-5)


@pytest.mark.parametrize("pattern, ending", [
    ("*_flair.nii.gz", "_flair"), ("**/*_seg.nii*", "_seg"), ("*.nii*", ""), ("*.nii.gz", ""), ("*", ""),
    ("sub-*_T1w.nii", "_T1w"), ("*_t1ce.NII.GZ", "_t1ce"), ("*/*_mask[0-9].nii.gz", ""),
])
def test_pattern_ending_is_the_text_after_the_last_wildcard(pattern: str, ending: str) -> None:
    assert pattern_ending(pattern) == ending


def test_nifti_pairs_brats_names_in_one_folder_per_case(tmp_path: Path) -> None:
    root = tmp_path / "BraTS2021"
    write_cases(root, root, image_name="BraTS2021_{case}/BraTS2021_{case}_flair.nii.gz",
                mask_name="BraTS2021_{case}/BraTS2021_{case}_seg.nii.gz")
    for case in NIFTI_CASES:  # other sequences of the case lie beside them and are not taken
        write_nifti(root / f"BraTS2021_{case}" / f"BraTS2021_{case}_t1.nii.gz", case_volumes(case)[0] * 2)
    (root / "._BraTS2021_caseA_flair.nii.gz").write_bytes(b"macOS metadata")  # hidden: skipped
    out = tmp_path / "out"
    assert nifti("--images", root, "--masks", root, "--out", out, "--image-pattern", "*_flair.nii.gz",
                 "--mask-pattern", "*_seg.nii.gz", "--tumour-labels", "1,2,4") == 0
    rows = metadata_rows(out)
    assert {row["patient_id"] for row in rows} == {"BraTS2021_caseA", "BraTS2021_caseB"}
    assert rows[0]["image_id"] == "BraTS2021_caseA_k002"
    assert rows[0]["source_volume"] == "BraTS2021_caseA/BraTS2021_caseA_flair.nii.gz"
    assert rows[0]["source_mask"] == "BraTS2021_caseA/BraTS2021_caseA_seg.nii.gz"
    assert len(rows) == sum(len(tumour_slices(case)) for case in NIFTI_CASES)
    # A recursive path glob does the same.
    assert nifti("--images", root, "--masks", root, "--out", tmp_path / "out2", "--image-pattern",
                 "**/*_flair.nii.gz", "--mask-pattern", "**/*_seg.nii.gz") == 0
    assert metadata_rows(tmp_path / "out2") == rows


def break_shape(images: Path, masks: Path) -> str:
    write_nifti(masks / "caseB.nii.gz", np.zeros((18, 21, 7), np.uint8))
    return f"{masks / 'caseB.nii.gz'}: label volume has shape (18, 21, 7), its image volume"


def break_missing_label(images: Path, masks: Path) -> str:
    (masks / "caseB.nii.gz").unlink()
    return f"{images / 'caseB.nii.gz'}: image volume without a label volume"


def break_orphan_label(images: Path, masks: Path) -> str:
    (images / "caseB.nii.gz").unlink()
    return f"{masks / 'caseB.nii.gz'}: label volume without an image volume"


def break_2d(images: Path, masks: Path) -> str:
    write_nifti(images / "caseB.nii.gz", np.zeros((18, 22), np.float32))
    return f"{images / 'caseB.nii.gz'}: a 3-D volume is needed, this one has shape (18, 22)"


def break_unreadable(images: Path, masks: Path) -> str:
    (images / "caseB.nii.gz").write_bytes(b"not a volume")
    return f"{images / 'caseB.nii.gz'}: cannot read as NIfTI"


def break_affine(images: Path, masks: Path) -> str:
    write_nifti(masks / "caseB.nii.gz", case_volumes("caseB")[1], affine=np.diag([-0.9, 1.1, 5.0, 1.0]))
    return f"{masks / 'caseB.nii.gz'}: label volume's affine differs from that of its image volume"


def break_fractional_labels(images: Path, masks: Path) -> str:  # met while converting, after caseA was written
    write_nifti(masks / "caseB.nii.gz", case_volumes("caseB")[0])
    return f"{masks / 'caseB.nii.gz'}: label volume holds"


@pytest.mark.parametrize("damage", [break_shape, break_missing_label, break_orphan_label, break_2d,
                                    break_unreadable, break_affine, break_fractional_labels],
                         ids=lambda damage: damage.__name__[len("break_"):])
def test_nifti_bad_volume_refuses_the_whole_conversion(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       damage: Callable[[Path, Path], str]) -> None:
    images, masks = tmp_path / "in" / "images", tmp_path / "in" / "labels"
    write_cases(images, masks)
    message = damage(images, masks)
    assert nifti("--images", images, "--masks", masks, "--out", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert message in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no out, no out.partial


def test_nifti_resampled_float_labels_are_refused_showing_the_real_values(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    images, masks = tmp_path / "in" / "images", tmp_path / "in" / "labels"
    write_cases(images, masks)
    labels = case_volumes("caseB")[1].astype(np.float32)  # as a linear resampling leaves them
    labels[labels == 1] = np.float32(0.9999999)
    labels.flat[np.flatnonzero(labels == 0)[:3]] = 1.5
    write_nifti(masks / "caseB.nii.gz", labels)
    assert nifti("--images", images, "--masks", masks, "--out", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "(2 distinct: 0.9999999, 1.5)" in error and "e.g. 1)" not in error
    assert "nearest-neighbour" in error and "round them" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_nifti_lists_every_input_problem_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, masks = tmp_path / "images", tmp_path / "labels"
    write_cases(images, masks)
    break_missing_label(images, masks)
    write_nifti(masks / "caseA.nii.gz", np.zeros((20, 16, 8), np.uint8))
    assert nifti("--images", images, "--masks", masks, "--out", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "2 problem(s) with the input volumes; nothing was written" in error
    assert "caseA.nii.gz: label volume has shape (20, 16, 8)" in error and "caseB.nii.gz: image volume without" in error


def test_nifti_ignore_affine_pairs_by_index(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "labels"
    write_cases(images, masks)
    break_affine(images, masks)
    assert nifti("--images", images, "--masks", masks, "--out", tmp_path / "out", "--ignore-affine") == 0
    assert verify_dataset(tmp_path / "out", group_column="patient_id") == []


def test_nifti_same_folder_with_same_patterns_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_cases(tmp_path / "in", tmp_path / "in", mask_name="{case}_seg.nii.gz")
    assert nifti("--images", tmp_path / "in", "--masks", tmp_path / "in", "--out", tmp_path / "out") == 1
    assert "(and 3 more files): matches both --image-pattern '*.nii*' and --mask-pattern" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_nifti_ctrl_c_leaves_nothing(volume_pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tumorseg.sources.nifti.convert_case", interrupt_on_call(2, convert_case))
    assert convert_pairs(volume_pairs, tmp_path / "out") == 130
    assert f"the unfinished {tmp_path / 'out.partial'} was removed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_nifti_sigterm_leaves_nothing_like_ctrl_c(volume_pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    calls = []

    def terminated_on_the_second_case(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # the first case's slices are in out.partial: a real SIGTERM to this process
            os.kill(os.getpid(), signal.SIGTERM)
        return convert_case(*args, **kwargs)

    monkeypatch.setattr("tumorseg.sources.nifti.convert_case", terminated_on_the_second_case)
    handler_before = signal.getsignal(signal.SIGTERM)
    assert convert_pairs(volume_pairs, tmp_path / "out") == 143
    assert f"interrupted (SIGTERM)\nthe unfinished {tmp_path / 'out.partial'} was removed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the previous handler is back


def test_nifti_output_trains_for_an_epoch(tmp_path: Path) -> None:
    import train

    images, masks = tmp_path / "volumes" / "images", tmp_path / "volumes" / "labels"
    for number in range(5):  # five patients: a grouped three-way split needs a few
        for case in NIFTI_CASES:
            image, labels = case_volumes(case)
            write_nifti(images / f"p{number}{case}.nii.gz", image + number)
            write_nifti(masks / f"p{number}{case}.nii.gz", labels)
    assert nifti("--images", images, "--masks", masks, "--out", tmp_path / "data", "--empty-share", "0.2") == 0
    assert verify_dataset(tmp_path / "data", group_column="patient_id") == []
    assert train.main(["--data-root", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"), "--run-name", "r",
                       "--epochs", "1", "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--batch-size", "4", "--in-channels", "1", "--normalization", "zscore"]) == 0
    split = json.loads((tmp_path / "runs" / "r" / "split.json").read_text())
    assert (tmp_path / "runs" / "r" / "best.pt").is_file() and split["test"]
