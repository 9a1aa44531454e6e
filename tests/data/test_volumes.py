"""tumorseg/data/volumes.py: NIfTI and DICOM volumes read with their geometry, windowed, sliced and written back."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import oblique_affine, write_dicom_series, write_nifti
from tumorseg.data import volumes
from tumorseg.data.volumes import Volume, VolumeError


def test_a_nifti_volume_reads_with_its_geometry_and_a_mask_is_written_with_the_same(tmp_path):
    data = np.random.default_rng(0).normal(300, 80, size=(40, 36, 7)).astype(np.float32)
    volume = volumes.read_volume(write_nifti(tmp_path / "case.nii.gz", data))
    assert volume.data.shape == (40, 36, 7) and np.allclose(volume.affine, oblique_affine())
    assert np.allclose(volume.spacing, (0.9, 0.9, 5.0), atol=1e-5)
    assert volumes.thinnest_axis(volume) == 2
    mask = np.zeros(data.shape, np.uint8)
    mask[10:20, 5:9, 3] = 1
    volumes.write_mask_like(tmp_path / "mask.nii.gz", mask, volume)
    written = nib.load(str(tmp_path / "mask.nii.gz"))
    assert written.shape == data.shape and np.allclose(written.affine, oblique_affine())
    assert written.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(written.dataobj), mask)
    assert np.array_equal(volumes.read_mask_volume(tmp_path / "mask.nii.gz", volume), mask)


def test_stem_and_suffix_of_nifti_names():
    assert volumes.volume_stem(Path("BraTS_001.nii.gz")) == "BraTS_001"
    assert volumes.volume_stem(Path("a.b.NII")) == "a.b"
    assert volumes.is_nifti(Path("x.Nii.Gz")) and not volumes.is_nifti(Path("x.png"))


def test_thinnest_axis_is_the_one_with_fewest_voxels_then_the_coarsest():
    def volume(shape, spacing):
        return Volume(np.zeros(shape), np.eye(4), spacing, Path("v"))
    assert volumes.thinnest_axis(volume((12, 64, 64), (1, 1, 1))) == 0
    assert volumes.thinnest_axis(volume((64, 64, 64), (1, 3, 1))) == 1
    assert volumes.thinnest_axis(volume((64, 64, 64), (1, 1, 1))) == 2


def test_window_keeps_8_bit_volumes_and_scales_others_to_their_percentiles():
    eight_bit = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3)).astype(np.int16)
    assert np.array_equal(volumes.window_to_uint8(eight_bit), eight_bit.astype(np.uint8))
    values = np.linspace(-1000, 3000, 10_000).reshape(100, 100, 1)
    windowed = volumes.window_to_uint8(values)
    assert windowed.dtype == np.uint8 and windowed.min() == 0 and windowed.max() == 255
    low, high = np.percentile(values, volumes.WINDOW_PERCENTILES)
    inside = (values > low) & (values < high)
    assert np.all(np.diff(windowed[inside].astype(int)) >= 0)  # monotonic inside the window
    assert not volumes.window_to_uint8(np.full((4, 4, 2), 7.5)).any()  # constant: zeros, no division by 0


def test_slices_along_an_axis_stack_back_to_the_volume():
    data = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    for axis in range(3):
        cut = list(volumes.slices_along(data, axis))
        assert len(cut) == data.shape[axis] and np.array_equal(volumes.stack_along(cut, axis), data)
    assert np.array_equal(next(volumes.slices_along(data, 2)), data[:, :, 0])


def test_bad_volumes_are_named(tmp_path):
    flat = write_nifti(tmp_path / "flat.nii", np.zeros((8, 8), np.float32))
    with pytest.raises(VolumeError, match=r"flat\.nii.*3-D"):
        volumes.read_volume(flat)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a volume")
    with pytest.raises(VolumeError, match=r"junk\.nii\.gz.*cannot read"):
        volumes.read_volume(junk)
    mask = write_nifti(tmp_path / "mask.nii.gz", np.zeros((8, 8, 3), np.uint8))
    image = volumes.read_volume(write_nifti(tmp_path / "image.nii.gz", np.zeros((8, 8, 4), np.float32)))
    with pytest.raises(VolumeError, match=r"mask\.nii\.gz.*\(8, 8, 3\).*\(8, 8, 4\)"):
        volumes.read_mask_volume(mask, image)


def test_a_dicom_series_reads_sorted_by_position_with_its_spacing_and_world_geometry(tmp_path):
    data = np.random.default_rng(3).integers(0, 4000, size=(20, 16, 6)).astype(np.uint16)
    write_dicom_series(tmp_path / "series", data)
    (tmp_path / "series" / "notes.txt").write_text("not DICOM: ignored")
    assert volumes.is_dicom_series(tmp_path / "series") and not volumes.is_dicom_series(tmp_path)
    volume = volumes.read_volume(tmp_path / "series")
    assert np.array_equal(volume.data, data)  # slices back in position order, whatever the file names
    assert volume.spacing == pytest.approx((0.7, 0.8, 4.0))
    assert volumes.thinnest_axis(volume) == 2
    # Voxel (i, j, k) lies at LPS (x0 + 0.7 i, y0 + 0.8 j, z0 + 4 k), i.e. RAS with x and y negated.
    world = volume.affine @ np.array([3, 5, 2, 1])
    assert world[:3] == pytest.approx([100.0 - 0.7 * 3, 90.0 - 0.8 * 5, 20.0 + 4 * 2])
    mask = (data > 3000).astype(np.uint8)
    volumes.write_mask_like(tmp_path / "mask.nii.gz", mask, volume)
    written = nib.load(str(tmp_path / "mask.nii.gz"))
    assert np.allclose(written.affine, volume.affine) and np.array_equal(np.asarray(written.dataobj), mask)
    assert written.header.get_zooms() == pytest.approx((0.7, 0.8, 4.0))


def write_pixelless_dicom(path: Path, sop_class: str) -> None:
    """A valid DICOM file without pixel data, as a DICOMDIR (1.2.840.10008.1.3.10) or a structured report is."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_a_dicomdir_and_non_image_dicom_files_in_a_series_folder_are_ignored(tmp_path):
    data = np.random.default_rng(5).integers(0, 4000, size=(12, 10, 3)).astype(np.uint16)
    write_dicom_series(tmp_path / "series", data)
    write_pixelless_dicom(tmp_path / "series" / "DICOMDIR", "1.2.840.10008.1.3.10")  # Media Storage Directory
    write_pixelless_dicom(tmp_path / "series" / "report.dcm", "1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    assert np.array_equal(volumes.read_volume(tmp_path / "series").data, data)
    only_index = tmp_path / "only_index"
    only_index.mkdir()
    write_pixelless_dicom(only_index / "DICOMDIR", "1.2.840.10008.1.3.10")
    assert not volumes.is_dicom_series(only_index)  # an index alone is no series


def test_an_unreadable_slice_says_the_whole_series_is_left_out(tmp_path):
    write_dicom_series(tmp_path / "series", np.zeros((8, 8, 3), np.uint16))
    broken = sorted((tmp_path / "series").iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:-40])  # pixel data cut short
    with pytest.raises(VolumeError, match=f"series: the whole DICOM series is left out, its file {broken.name} "):
        volumes.read_volume(tmp_path / "series")


def test_a_folder_mixing_two_series_is_refused(tmp_path):
    data = np.zeros((8, 8, 2), np.uint16)
    write_dicom_series(tmp_path / "mixed", data, series_uid="1.1")
    write_dicom_series(tmp_path / "other", data, series_uid="2.2")
    for path in (tmp_path / "other").iterdir():
        path.rename(tmp_path / "mixed" / f"b_{path.name}")
    with pytest.raises(VolumeError, match="mixed.*2 DICOM series"):
        volumes.read_volume(tmp_path / "mixed")


def flipped(affine: np.ndarray, axis: int = 0) -> np.ndarray:
    """The affine of the same voxels stored with `axis` reversed: same shape, other orientation."""
    flip = np.eye(4)
    flip[axis, axis] = -1
    return affine @ flip


def test_read_geometry_gives_the_shape_and_affine_read_volume_gives(tmp_path):
    data = np.zeros((6, 5, 4, 1), np.float32)  # 4-D with one volume: 3-D, as read_volume takes it
    path = write_nifti(tmp_path / "one.nii.gz", data)
    shape, affine = volumes.read_geometry(path)
    assert shape == (6, 5, 4) == volumes.read_volume(path).data.shape and np.allclose(affine, oblique_affine())
    write_dicom_series(tmp_path / "series", np.zeros((8, 6, 3), np.uint16))
    shape, affine = volumes.read_geometry(tmp_path / "series")
    assert shape == (8, 6, 3) and np.allclose(affine, volumes.read_volume(tmp_path / "series").affine)
    with pytest.raises(VolumeError, match=r"flat\.nii.*a 3-D volume is needed"):
        volumes.read_geometry(write_nifti(tmp_path / "flat.nii", np.zeros((8, 8), np.float32)))


def test_a_mask_off_its_images_voxel_grid_is_named_with_both_files_and_orientations(tmp_path):
    image, mask = tmp_path / "case.nii.gz", tmp_path / "case_seg.nii.gz"
    assert volumes.affine_mismatch(image, np.eye(4), mask, np.eye(4) + 5e-4) is None  # within the tolerance
    problem = volumes.affine_mismatch(image, np.eye(4), mask, flipped(np.eye(4)))
    assert problem == (f"{mask}: label volume's affine differs from that of its image volume {image} (orientation "
                       "LAS vs RAS, entries apart by up to 2), so their voxels may not line up")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient axes
    assert "orientation LPS vs RAS" in volumes.affine_mismatch(image, np.eye(4), mask, lps)
    shifted = np.eye(4)
    shifted[:3, 3] = [0, 0, 2.5]  # same orientation, another place
    assert "orientation RAS vs RAS, entries apart by up to 2.5" in volumes.affine_mismatch(image, np.eye(4), mask,
                                                                                            shifted)


def test_read_mask_volume_refuses_a_mask_of_the_images_shape_but_another_affine(tmp_path):
    data = np.zeros((8, 8, 4), np.float32)
    image = volumes.read_volume(write_nifti(tmp_path / "image.nii.gz", data))
    labels = np.zeros((8, 8, 4), np.uint8)
    labels[1:3, 2:4, 1] = 1
    mask = write_nifti(tmp_path / "mask.nii.gz", labels[::-1], flipped(oblique_affine()))  # same voxels, stored flipped
    with pytest.raises(VolumeError, match=r"mask\.nii\.gz: label volume's affine differs .*image\.nii\.gz"):
        volumes.read_mask_volume(mask, image)
    assert np.array_equal(volumes.read_mask_volume(write_nifti(tmp_path / "same.nii.gz", labels), image), labels)


def test_misaligned_masks_names_only_masks_of_the_right_shape_on_another_grid(tmp_path):
    data = np.zeros((8, 8, 4), np.float32)
    for stem in ("good", "flipped", "offsize", "unreadable", "nomask"):
        write_nifti(tmp_path / "images" / f"{stem}.nii.gz", data)
    write_nifti(tmp_path / "masks" / "good.nii.gz", data.astype(np.uint8))
    write_nifti(tmp_path / "masks" / "flipped.nii.gz", data.astype(np.uint8), flipped(oblique_affine(), 1))
    write_nifti(tmp_path / "masks" / "offsize.nii.gz", np.zeros((8, 8, 3), np.uint8), np.eye(4))
    (tmp_path / "masks" / "unreadable.nii.gz").write_bytes(b"not a volume")
    problems = volumes.misaligned_masks(volumes.find_volumes(tmp_path))
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'masks' / 'flipped.nii.gz'}: label volume's affine differs from "
                                  f"that of its image volume {tmp_path / 'images' / 'flipped.nii.gz'} (orientation ")
