"""Medical volumes in and out: NIfTI files and DICOM series read as 3-D arrays with their geometry, cut into slices.

The 2-D pipeline sees each slice as an 8-bit grey image, as it sees a PNG:
`window_to_uint8` windows a volume to 0..255 once, the same way for test.py's
volume path and `prepare_data.py nifti`, so a slice is prepared exactly as
the PNG of it would be. Predicted masks go back out as NIfTI with the
input's affine (and, for a NIfTI input, its header), so they overlay the
input in any viewer. nibabel and pydicom are imported when first needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
WINDOW_PERCENTILES = (0.5, 99.5)  # intensity window of a non-8-bit volume: robust to a few hot or dark voxels
AXIS_LETTERS = "ijk"  # array axes 0, 1, 2 as they appear in slice names
DICOMDIR = "DICOMDIR"  # the file name DICOM media give their directory of files
PIXEL_KEYWORDS = {"PixelData", "FloatPixelData", "DoubleFloatPixelData"}  # a DICOM file holding an image has one
# Largest difference between a label's and its image's affine entries (mm, or direction cosine x mm) that
# still counts as the same voxel grid; float32 header storage alone differs by far less.
AFFINE_TOLERANCE = 1e-3


class VolumeError(ValueError):
    """A volume that cannot be used, with the file and the problem in the message."""


@dataclass
class Volume:
    """A 3-D image with its geometry: voxel array (X, Y, Z), 4x4 voxel-to-world affine (RAS, mm), voxel sizes."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]  # mm per voxel along each array axis
    source: Path  # the .nii/.nii.gz file, or the DICOM series' folder
    header: Any = None  # the NIfTI header to write masks with; None for DICOM (a fresh one is made)


def is_nifti(path: Path) -> bool:
    """True for a file named .nii or .nii.gz (any case)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def volume_stem(path: Path) -> str:
    """The name without .nii/.nii.gz: what pairs an image volume with its mask and names the outputs."""
    lowered = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lowered.endswith(suffix):
            return path.name[:-len(suffix)]
    return path.name


def is_dicom_series(folder: Path) -> bool:
    """True for a folder whose files include at least one DICOM file (the 'DICM' marker at byte 128), DICOMDIR aside."""
    return folder.is_dir() and next(_dicom_files(folder), None) is not None


def _dicom_files(folder: Path) -> Iterator[Path]:
    """The DICOM files of `folder`, sorted, without a DICOMDIR: an index of the medium, not a slice of a series."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.upper() != DICOMDIR and _has_dicom_marker(path):
            yield path


def _has_dicom_marker(path: Path) -> bool:
    """True when the file carries the DICOM preamble marker."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_volume(path: Path) -> Volume:
    """A NIfTI file or a DICOM series folder as a Volume; raises VolumeError naming it and the problem."""
    return read_dicom_series(path) if path.is_dir() else read_nifti(path)


def read_nifti(path: Path) -> Volume:
    """A .nii/.nii.gz file as a Volume (a 4-D file with one volume is taken as 3-D); raises VolumeError."""
    image = _load_nifti(path)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many kinds for a damaged or foreign file
        raise VolumeError(f"{path}: cannot read as NIfTI ({error})") from error
    data = data.reshape(_volume_shape(path, data.shape))
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return Volume(data, np.asarray(image.affine, dtype=np.float64), spacing, path, image.header)


def read_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape (3-D) and voxel-to-world affine of a volume: a NIfTI file's header alone, or a DICOM series read whole.

    Raises VolumeError naming the file, with the messages `read_volume` gives.
    """
    if path.is_dir():
        volume = read_dicom_series(path)
        return volume.data.shape, volume.affine
    image = _load_nifti(path)
    return _volume_shape(path, tuple(image.shape)), np.asarray(image.affine, dtype=np.float64)


def _load_nifti(path: Path) -> Any:
    """The nibabel image of a NIfTI file, its voxels not yet read; raises VolumeError."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises many kinds for a damaged or foreign file
        raise VolumeError(f"{path}: cannot read as NIfTI ({error})") from error


def _volume_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A NIfTI shape as 3-D (a 4-D file with one volume is 3-D); raises VolumeError unless 3-D and non-empty."""
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(f"{path}: a 3-D volume is needed, this one has shape {shape}")
    if min(shape) < 1:
        raise VolumeError(f"{path}: the volume is empty (shape {shape})")
    return shape


def read_dicom_series(folder: Path) -> Volume:
    """The DICOM files of one series in `folder`, sorted by position along the slice normal, as a Volume.

    The array is (columns, rows, slices), so that, like NIfTI, axis 0 runs
    along a row. The affine maps voxels to RAS millimetres (DICOM's LPS with
    x and y negated). Raises VolumeError naming the folder on mixed series,
    missing geometry or unequal slice sizes.
    """
    import pydicom

    datasets = []
    for path in _dicom_files(folder):
        try:
            ds = pydicom.dcmread(path)
            if not any(keyword in ds for keyword in PIXEL_KEYWORDS):  # a report, a presentation state...: no slice of the series
                continue
            pixels = ds.pixel_array.astype(np.float64)
        except Exception as error:  # one unreadable slice makes the volume unusable: say the series goes
            raise VolumeError(f"{folder}: the whole DICOM series is left out, its file {path.name} cannot be "
                              f"read as a DICOM image ({error})") from error
        datasets.append((ds, pixels * float(getattr(ds, "RescaleSlope", 1) or 1)
                         + float(getattr(ds, "RescaleIntercept", 0) or 0), path))
    if not datasets:
        raise VolumeError(f"{folder}: no DICOM image files (DICOMDIR and DICOM files without pixel data are "
                          "ignored)")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds, _, _ in datasets}
    if len(series) > 1:
        raise VolumeError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    try:
        orientation = np.array([float(v) for v in datasets[0][0].ImageOrientationPatient]).reshape(2, 3)
        spacing_rc = [float(v) for v in datasets[0][0].PixelSpacing]  # between rows, between columns
        positions = [np.array([float(v) for v in ds.ImagePositionPatient]) for ds, _, _ in datasets]
    except (AttributeError, ValueError) as error:
        raise VolumeError(f"{folder}: DICOM geometry is missing (ImageOrientationPatient, ImagePositionPatient "
                          f"or PixelSpacing): {error}") from error
    normal = np.cross(orientation[0], orientation[1])
    order = np.argsort([position @ normal for position in positions], kind="stable")
    shapes = {pixels.shape for _, pixels, _ in datasets}
    if len(shapes) > 1:
        raise VolumeError(f"{folder}: slices differ in size ({', '.join(f'{s[1]}x{s[0]}' for s in sorted(shapes))})")
    rows_first = np.stack([datasets[i][1] for i in order], axis=-1)  # (rows, columns, slices)
    data = rows_first.transpose(1, 0, 2)  # (columns, rows, slices)
    sorted_positions = [positions[i] for i in order]
    gaps = [float(np.linalg.norm(b - a)) for a, b in zip(sorted_positions, sorted_positions[1:], strict=False)]
    if gaps and min(gaps) <= 0:
        raise VolumeError(f"{folder}: two slices share a position; is it one series?")
    thickness = float(np.median(gaps)) if gaps else float(getattr(datasets[0][0], "SliceThickness", 1) or 1)
    step = (sorted_positions[-1] - sorted_positions[0]) / (len(gaps)) if gaps else normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = orientation[0] * spacing_rc[1]  # along a row: the column index grows
    lps[:3, 1] = orientation[1] * spacing_rc[0]  # down a column: the row index grows
    lps[:3, 2] = step
    lps[:3, 3] = sorted_positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    return Volume(data, affine, (spacing_rc[1], spacing_rc[0], thickness), folder)


def thinnest_axis(volume: Volume) -> int:
    """The axis with the fewest voxels (the slice axis of most scans); ties go to the coarser spacing, then the last."""
    return min(range(3), key=lambda axis: (volume.data.shape[axis], -volume.spacing[axis], -axis))


def window_to_uint8(data: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """The volume as 0..255 grey: 8-bit data as it is, anything else clipped to its percentiles and scaled.

    One window per volume, so slices keep their relative brightness. Whole
    numbers within 0..255 are taken unchanged, so a volume stacked from PNG
    slices gives back the very same pixels. A constant volume gives zeros.
    """
    values = np.asarray(data)
    finite = values[np.isfinite(values)]
    if finite.size and np.all(finite == np.round(finite)) and finite.min() >= 0 and finite.max() <= 255 \
            and finite.size == values.size:
        return values.astype(np.uint8)
    if not finite.size:
        return np.zeros(values.shape, np.uint8)
    low, high = np.percentile(finite, percentiles)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.nan_to_num(values.astype(np.float64), nan=low) - low) / (high - low) * 255
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def slices_along(data: np.ndarray, axis: int) -> Iterator[np.ndarray]:
    """Each 2-D slice across `axis`, rows along the first remaining array axis."""
    for index in range(data.shape[axis]):
        yield np.take(data, index, axis=axis)


def slice_name(stem: str, axis: int, index: int) -> str:
    """A slice's name, the same in `prepare_data.py nifti`'s PNGs and test.py's outputs: '<stem>_k012'."""
    return f"{stem}_{AXIS_LETTERS[axis]}{index:03d}"


def stack_along(slices: list[np.ndarray], axis: int) -> np.ndarray:
    """`slices_along`'s inverse: 2-D slices back into a volume."""
    return np.stack(slices, axis=axis)


def slice_spacing(volume: Volume, axis: int) -> tuple[float, float]:
    """In-plane voxel size (rows, columns) in mm of slices across `axis`."""
    rows, columns = (a for a in range(3) if a != axis)
    return volume.spacing[rows], volume.spacing[columns]


def orientation(affine: np.ndarray) -> str:
    """The world directions the voxel axes point to, as nibabel names them: 'RAS', 'LPS', 'PIR'..."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine))


def affine_mismatch(image: Path, image_affine: np.ndarray, mask: Path, mask_affine: np.ndarray) -> str | None:
    """Why a label volume does not lie on its image's voxel grid, naming both files and orientations; None if it does.

    The grids match when every affine entry agrees within AFFINE_TOLERANCE;
    a mask saved flipped, with permuted axes or shifted does not, even with
    the image's shape, and scoring it voxel by voxel would be wrong.
    """
    if np.allclose(mask_affine, image_affine, rtol=0, atol=AFFINE_TOLERANCE):
        return None
    difference = float(np.abs(mask_affine - image_affine).max())
    return (f"{mask}: label volume's affine differs from that of its image volume {image} (orientation "
            f"{orientation(mask_affine)} vs {orientation(image_affine)}, entries apart by up to {difference:.4g}), "
            "so their voxels may not line up")


def read_mask_volume(path: Path, image: Volume) -> np.ndarray:
    """A label volume as uint8 {0, 1} (any label above 0 is tumour); raises VolumeError off `image`'s voxel grid.

    Off the grid: another shape, or an affine that `affine_mismatch` refuses.
    """
    mask = read_nifti(path)
    if mask.data.shape != image.data.shape:
        raise VolumeError(f"{path}: mask volume is {mask.data.shape}, its image volume is {image.data.shape}")
    problem = affine_mismatch(image.source, image.affine, path, mask.affine)
    if problem:
        raise VolumeError(problem)
    return (mask.data > 0).astype(np.uint8)


def write_mask_like(path: Path, mask: np.ndarray, like: Volume) -> None:
    """Write a uint8 mask volume as NIfTI with `like`'s affine (and header, where it has one)."""
    import nibabel as nib

    if like.header is not None:
        header = like.header.copy()
        header.set_data_dtype(np.uint8)
        image = nib.Nifti1Image(mask.astype(np.uint8), like.affine, header=header)
        image.header.set_slope_inter(1, 0)  # the input's intensity scaling must not apply to labels
    else:
        image = nib.Nifti1Image(mask.astype(np.uint8), like.affine)
        image.header.set_zooms(like.spacing)
    nib.save(image, str(path))


@dataclass
class VolumeEntry:
    """One volume of a data folder: its name, where it is, and its mask volume (None without one)."""

    stem: str
    path: Path  # a .nii/.nii.gz file or a DICOM series folder
    mask: Path | None


def find_volumes(data_root: Path) -> list[VolumeEntry]:
    """The volumes in data_root/images (NIfTI files, DICOM series folders), each with data_root/masks/<stem>.nii[.gz].

    Raises ValueError naming the folder when two volumes (or two mask volumes) share a name.
    """
    image_dir, mask_dir = Path(data_root) / "images", Path(data_root) / "masks"
    if not image_dir.is_dir():
        return []
    found = [path for path in sorted(image_dir.iterdir())
             if (path.is_file() and is_nifti(path)) or is_dicom_series(path)]
    masks = [path for path in sorted(mask_dir.iterdir()) if path.is_file() and is_nifti(path)] \
        if mask_dir.is_dir() else []
    for folder, paths in ((image_dir, found), (mask_dir, masks)):
        stems = [volume_stem(path) for path in paths]
        shared = sorted({stem for stem in stems if stems.count(stem) > 1})
        if shared:
            raise ValueError(f"{folder}: several volumes share the name(s) {', '.join(shared)}")
    mask_by_stem = {volume_stem(path): path for path in masks}
    return [VolumeEntry(volume_stem(path), path, mask_by_stem.get(volume_stem(path))) for path in found]


def slice_name_clashes(entries: list[VolumeEntry], images: list[Path], axis: str = "auto") -> list[str]:
    """Each image whose name is that of a slice of one of the volumes (`slice_name`), named with the volume.

    Their outputs (masks/<name>.png, metrics.csv rows...) would overwrite each
    other. Matched by name alone, before any volume is read: with `axis`
    "auto" any axis letter counts, else only that axis's.
    """
    letters = AXIS_LETTERS if axis == "auto" else AXIS_LETTERS[int(axis)]
    clashes = []
    for entry in entries:
        pattern = re.compile(rf"{re.escape(entry.stem)}_[{letters}]\d{{3,}}")
        clashes += [f"{image} and the slice {image.stem} of the volume {entry.path} would write the same outputs"
                    for image in images if pattern.fullmatch(image.stem)]
    return clashes


def misaligned_masks(entries: Sequence[VolumeEntry]) -> list[str]:
    """`affine_mismatch` of each volume whose mask volume has its shape but not its voxel grid, read from headers.

    A volume or mask that cannot be read, or differs in shape, is left to
    `read_mask_volume` when the volume is predicted, which names it.
    """
    problems = []
    for entry in entries:
        if entry.mask is None:
            continue
        try:
            image_shape, image_affine = read_geometry(entry.path)
            mask_shape, mask_affine = read_geometry(entry.mask)
        except VolumeError:
            continue
        if image_shape == mask_shape:
            problems += filter(None, [affine_mismatch(entry.path, image_affine, entry.mask, mask_affine)])
    return problems
