"""tumorseg/sources/figshare.py: download, resume, MD5 refusal, conversion and `--from`, all offline.

The figshare release is imitated with small MATLAB-v7.3-layout files written by
h5py, zipped, and served with a fake API listing by a local HTTP server.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import h5py
import numpy as np
import pytest

import prepare_data
from conftest import interrupt_on_call, metadata_rows, png_pixels
from tumorseg.data.checks import verify_dataset
from tumorseg.sources.figshare import DOWNLOAD_ATTEMPTS, METADATA_COLUMNS, convert_slice

# ----------------------------------------------------------------------------- a small fake release

MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Fri Apr  7 10:00:00 2017 HDF5 schema 1.00 ."


def matlab_v73(fill: Callable[[h5py.File], None]) -> bytes:
    """Bytes of a MATLAB v7.3 file: HDF5 behind the 512-byte user block that holds MATLAB's header."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=512) as f:
        fill(f)
    data = bytearray(buffer.getvalue())
    data[:128] = MATLAB_HEADER.ljust(116) + bytes(8) + b"\x00\x02IM"  # text, subsystem offset, version, endian
    return bytes(data)


def slice_mat(image: np.ndarray, mask: np.ndarray, label: int, pid: str, drop: str = "") -> bytes:
    """A `cjdata` slice file laid out as MATLAB writes it; `drop` leaves one field out."""

    def fill(f: h5py.File) -> None:
        struct = f.create_group("cjdata")
        struct.attrs["MATLAB_class"] = np.bytes_("struct")
        # MATLAB is column-major: an H x W matrix reaches h5py as W x H.
        fields = {
            "image": (image.T.astype(np.int16), "int16"),
            "tumorMask": (mask.T.astype(np.uint8), "logical"),
            "label": (np.array([[float(label)]]), "double"),
            "PID": (np.array([[ord(c)] for c in pid], np.uint16), "char"),  # a 1 x n char row
            "tumorBorder": (np.array([[2.0], [3.0], [4.0], [5.0]]), "double"),
        }
        for name, (values, matlab_class) in fields.items():
            if name != drop:
                struct.create_dataset(name, data=values).attrs["MATLAB_class"] = np.bytes_(matlab_class)

    return matlab_v73(fill)


def cvind_mat(folds: list[int]) -> bytes:
    """cvind.mat as MATLAB v7.3 writes an n x 1 double column."""
    return matlab_v73(lambda f: f.create_dataset("cvind", data=np.array([folds], np.float64)))


def ramp(height: int, width: int) -> np.ndarray:
    """Intensities rising in reading order (row by row): any transposition breaks the order."""
    return (np.arange(height * width) * 3000 // (height * width)).reshape(height, width).astype(np.int16)


def box_mask(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    """A rectangle of ones, deliberately off-centre."""
    mask = np.zeros((height, width), np.uint8)
    mask[rows, cols] = 1
    return mask


def outlier_image() -> np.ndarray:
    """A 40 x 24 ramp 0..999 with one pixel at 30000, far brighter than the rest."""
    image = (np.arange(960) * 1000 // 960).reshape(40, 24).astype(np.int16)
    image[5, 7] = 30000
    return image


SLICES = {  # N: (image, mask, label, PID)
    1: (ramp(256, 256), box_mask(256, 256, slice(10, 40), slice(150, 200)), 1, "MR040237H"),
    2: (ramp(40, 24), box_mask(40, 24, slice(2, 10), slice(15, 22)), 2, "100360"),
    3: (outlier_image(), box_mask(40, 24, slice(30, 38), slice(1, 5)), 3, "100360"),
    4: (ramp(24, 40), box_mask(24, 40, slice(0, 3), slice(30, 40)), 1, "MR040237H"),
}
FOLDS = [3, 1, 1, 5]
EXPECTED_ROWS = [
    {"image_id": "1", "patient_id": "MR040237", "release_pid": "MR040237H", "tumor_class": "meningioma", "height": "256", "width": "256",
     "fold": "3"},
    {"image_id": "2", "patient_id": "100360", "release_pid": "100360", "tumor_class": "glioma", "height": "40",
     "width": "24", "fold": "1"},
    {"image_id": "3", "patient_id": "100360", "release_pid": "100360", "tumor_class": "pituitary", "height": "40",
     "width": "24", "fold": "1"},
    {"image_id": "4", "patient_id": "MR040237", "release_pid": "MR040237H", "tumor_class": "meningioma", "height": "24", "width": "40",
     "fold": "5"},
]
ZIP_A, ZIP_B = "brainTumorDataPublic_1-2.zip", "brainTumorDataPublic_3-4.zip"


def mat_files() -> dict[str, bytes]:
    """`N.mat` for every test slice, plus cvind.mat."""
    files = {f"{n}.mat": slice_mat(*spec) for n, spec in SLICES.items()}
    files["cvind.mat"] = cvind_mat(FOLDS)
    return files


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A deflated zip archive of `members`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release() -> dict[str, bytes]:
    """The files of the fake figshare article: two zips of slices, cvind.mat and a README."""
    mats = mat_files()
    return {ZIP_A: zip_bytes({"1.mat": mats["1.mat"], "2.mat": mats["2.mat"]}),
            ZIP_B: zip_bytes({"3.mat": mats["3.mat"], "4.mat": mats["4.mat"]}),
            "cvind.mat": mats["cvind.mat"], "README.txt": b"brain tumor dataset\n"}


# ----------------------------------------------------------------------------- a fake figshare server


class FakeFigshare:
    """The figshare API listing and file downloads on 127.0.0.1, with Range support and fault injection."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.md5 = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
        self.cuts_left: dict[str, int] = {}  # name: responses still to cut off halfway
        self.honours_range = True  # False: answer every Range request with the whole file (200)
        self.downloads: list[tuple[str, str | None]] = []  # (name, Range header) of each file request
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.api_url = f"{self.base}/v2"

    def listing(self) -> list[dict]:
        """What GET /v2/articles/1512427/files answers."""
        return [{"id": index, "name": name, "size": len(data), "is_link_only": False,
                 "download_url": f"{self.base}/files/{name}", "supplied_md5": self.md5[name],
                 "computed_md5": self.md5[name]}
                for index, (name, data) in enumerate(self.files.items())]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/v2/articles/1512427/files":
                    self._send(200, json.dumps(fake.listing()).encode(), {})
                elif path.startswith("/files/") and path[len("/files/"):] in fake.files:
                    self._send_file(path[len("/files/"):])
                else:
                    self._send(404, b"not found", {})

            def _send_file(self, name: str) -> None:
                data, requested = fake.files[name], self.headers.get("Range")
                fake.downloads.append((name, requested))
                requested = requested if fake.honours_range else None
                start = int(re.fullmatch(r"bytes=(\d+)-", requested)[1]) if requested else 0
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if requested else {}
                body = data[start:]
                if fake.cuts_left.get(name, 0) > 0:  # announce the whole body, send half, hang up
                    fake.cuts_left[name] -= 1
                    self._send(206 if requested else 200, body[:len(body) // 2], headers, len(body))
                else:
                    self._send(206 if requested else 200, body, headers)

            def _send(self, status: int, body: bytes, headers: dict[str, str], length: int | None = None) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(length or len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler


@pytest.fixture
def figshare(release: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFigshare]:
    """A running fake figshare; requests to it bypass any proxy set in the environment."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    fake = FakeFigshare(release)
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


# ----------------------------------------------------------------------------- helpers


def run(*args: object) -> int:
    """prepare_data's exit status for `figshare` with these arguments."""
    return prepare_data.main(["figshare", *map(str, args)])


def download(fake: FakeFigshare, tmp_path: Path) -> int:
    """Download and convert from the fake server into tmp_path/out, caching in tmp_path/cache."""
    return run("--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--api-url", fake.api_url)

def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    """Write `files` into `folder`, creating it; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, release: dict[str, bytes]) -> Path:
    """The fake release converted once with `--from` a folder of its zips."""
    root = tmp_path_factory.mktemp("converted")
    source = write_files(root / "downloads", {ZIP_A: release[ZIP_A], ZIP_B: release[ZIP_B],
                                              "cvind.mat": release["cvind.mat"]})
    assert run("--from", source, "--out", root / "out") == 0
    return root / "out"


# ----------------------------------------------------------------------------- download


def test_download_verifies_and_converts(figshare: FakeFigshare, tmp_path: Path, release: dict[str, bytes]) -> None:
    assert download(figshare, tmp_path) == 0
    assert metadata_rows(tmp_path / "out") == EXPECTED_ROWS
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == sorted([ZIP_A, ZIP_B, "cvind.mat"])  # no README, no .part
    assert all((cache / name).read_bytes() == release[name] for name in (ZIP_A, ZIP_B, "cvind.mat"))


def test_download_resumes_after_a_cut_connection(figshare: FakeFigshare, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    figshare.cuts_left[ZIP_A] = 1
    assert download(figshare, tmp_path) == 0
    half = len(figshare.files[ZIP_A]) // 2
    assert [r for name, r in figshare.downloads if name == ZIP_A] == [None, f"bytes={half}-"]
    assert "warning" in capsys.readouterr().err
    assert metadata_rows(tmp_path / "out") == EXPECTED_ROWS


def test_failed_download_leaves_no_output_and_a_rerun_resumes(figshare: FakeFigshare, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    figshare.cuts_left[ZIP_B] = DOWNLOAD_ATTEMPTS  # every attempt of this run is cut
    assert download(figshare, tmp_path) == 1
    error = capsys.readouterr().err
    assert f"error: {ZIP_B}: network error" in error and "run again to resume" in error
    part = tmp_path / "cache" / f"{ZIP_B}.part"
    assert 0 < part.stat().st_size < len(figshare.files[ZIP_B])
    assert not (tmp_path / "out").exists()

    kept = part.stat().st_size
    assert download(figshare, tmp_path) == 0
    assert [r for name, r in figshare.downloads if name == ZIP_B][-1] == f"bytes={kept}-"
    assert [name for name, _ in figshare.downloads].count(ZIP_A) == 1  # the verified zip was not fetched again
    assert metadata_rows(tmp_path / "out") == EXPECTED_ROWS


def test_server_ignoring_range_restarts_the_download(figshare: FakeFigshare, tmp_path: Path,
                                                      release: dict[str, bytes]) -> None:
    figshare.honours_range = False
    write_files(tmp_path / "cache", {f"{ZIP_A}.part": release[ZIP_A][:1000]})
    assert download(figshare, tmp_path) == 0
    assert (tmp_path / "cache" / ZIP_A).read_bytes() == release[ZIP_A]


def test_md5_mismatch_is_refused(figshare: FakeFigshare, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    figshare.md5[ZIP_A] = "0" * 32
    assert download(figshare, tmp_path) == 1
    assert f"error: {ZIP_A}: MD5 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "cache" / ZIP_A).exists() and not (tmp_path / "cache" / f"{ZIP_A}.part").exists()
    assert not (tmp_path / "out").exists()


def test_unreachable_api_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there any more
    assert run("--out", tmp_path / "out", "--api-url", f"http://127.0.0.1:{port}/v2") == 1
    assert "cannot list the article's files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_downloading(figshare: FakeFigshare, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "out").mkdir()
    assert download(figshare, tmp_path) == 1
    assert "already exists" in capsys.readouterr().err
    assert figshare.downloads == []


# ----------------------------------------------------------------------------- conversion values


def test_image_orientation_and_size(converted: Path) -> None:
    for number, (image, *_rest) in SLICES.items():
        pixels = png_pixels(converted / "images" / f"{number}.png")
        assert pixels.dtype == np.uint8 and pixels.shape == image.shape
    for number in (1, 2, 4):  # the ramps rise in reading order only if nothing was transposed
        flat = png_pixels(converted / "images" / f"{number}.png").ravel().astype(int)
        assert np.all(np.diff(flat) >= 0) and flat[0] == 0 and flat[-1] == 255


def test_masks_align_with_images(converted: Path) -> None:
    for number, (image, mask, *_rest) in SLICES.items():
        pixels = png_pixels(converted / "masks" / f"{number}.png")
        assert pixels.shape == image.shape
        np.testing.assert_array_equal(pixels, mask * 255)


def test_intensity_window_ignores_an_outlier(converted: Path) -> None:
    pixels = png_pixels(converted / "images" / "3.png")
    assert pixels[5, 7] == 255  # the outlier saturates ...
    assert 110 <= np.median(pixels) <= 145  # ... instead of squeezing the rest into a few grey levels
    assert pixels.min() == 0


def test_metadata_has_patient_ids_classes_and_folds(converted: Path) -> None:
    assert metadata_rows(converted) == EXPECTED_ROWS
    assert list(metadata_rows(converted)[0]) == METADATA_COLUMNS


def test_output_passes_the_integrity_check(converted: Path) -> None:
    assert verify_dataset(converted, group_column="patient_id") == []


def test_size_resamples_images_and_keeps_masks_binary(tmp_path: Path, release: dict[str, bytes]) -> None:
    source = write_files(tmp_path / "in", {ZIP_A: release[ZIP_A], ZIP_B: release[ZIP_B]})
    assert run("--from", source, "--out", tmp_path / "out", "--size", 64) == 0
    for number in SLICES:
        image, mask = png_pixels(tmp_path / "out/images" / f"{number}.png"), png_pixels(tmp_path / "out/masks" / f"{number}.png")
        assert image.shape == mask.shape == (64, 64)
        assert set(np.unique(mask)) == {0, 255}
    assert {(row["height"], row["width"], row["fold"]) for row in metadata_rows(tmp_path / "out")} == {("64", "64", "")}
    assert verify_dataset(tmp_path / "out", group_column="patient_id") == []


# ----------------------------------------------------------------------------- --from


def test_from_a_folder_of_mat_files(tmp_path: Path) -> None:
    source = write_files(tmp_path / "unzipped" / "brainTumorDataPublic_1-766", mat_files()).parent
    (tmp_path / "out.partial").mkdir()  # left over by an interrupted run
    (tmp_path / "out.partial" / "junk.png").write_bytes(b"")
    assert run("--from", source, "--out", tmp_path / "out") == 0
    assert metadata_rows(tmp_path / "out") == EXPECTED_ROWS
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out" / "junk.png").exists()


def test_from_figshare_download_all_zip(tmp_path: Path, release: dict[str, bytes]) -> None:
    """The "Download all" zip of the figshare page holds the part zips, cvind.mat and README.txt."""
    (tmp_path / "1512427.zip").write_bytes(zip_bytes(release))
    assert run("--from", tmp_path / "1512427.zip", "--out", tmp_path / "out") == 0
    assert metadata_rows(tmp_path / "out") == EXPECTED_ROWS


def test_truncated_archive_is_named(tmp_path: Path, release: dict[str, bytes], capsys: pytest.CaptureFixture) -> None:
    source = write_files(tmp_path / "in", {ZIP_A: release[ZIP_A][: len(release[ZIP_A]) // 2]})
    assert run("--from", source, "--out", tmp_path / "out") == 1
    assert re.search(rf"error: .*{ZIP_A}: not a readable zip archive", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_corrupt_member_is_named(tmp_path: Path, release: dict[str, bytes], capsys: pytest.CaptureFixture) -> None:
    data = bytearray(release[ZIP_A])
    data[2000:2100] = bytes(100)  # inside the compressed bytes of 1.mat; the directory stays intact
    source = write_files(tmp_path / "in", {ZIP_A: bytes(data)})
    assert run("--from", source, "--out", tmp_path / "out") == 1
    assert re.search(rf"error: .*{ZIP_A}: cannot read 1\.mat, the archive is truncated or corrupt",
                     capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mat, message", [
    (slice_mat(ramp(8, 8), box_mask(8, 8, slice(1, 3), slice(1, 3)), 1, "P1", drop="tumorMask"),
     "'cjdata' lacks the field(s) tumorMask"),
    (slice_mat(ramp(8, 8), box_mask(8, 6, slice(1, 3), slice(1, 3)), 1, "P1"), "but tumorMask is (8, 6)"),
    (slice_mat(ramp(8, 8), box_mask(8, 8, slice(1, 3), slice(1, 3)), 4, "P1"), "label is [4.0], expected 1, 2 or 3"),
    (slice_mat(ramp(8, 8), box_mask(8, 8, slice(1, 3), slice(1, 3)), 1, " "), "PID is empty"),
    (matlab_v73(lambda f: f.create_dataset("x", data=[1])), "has no 'cjdata' struct"),
    (b"MATLAB 5.0 MAT-file, not HDF5", "not a readable MATLAB v7.3 (HDF5) file"),
], ids=["missing-field", "mask-size", "bad-label", "empty-pid", "no-cjdata", "not-hdf5"])
def test_bad_mat_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, mat: bytes, message: str) -> None:
    files = mat_files()
    files["3.mat"] = mat
    source = write_files(tmp_path / "in", files)
    assert run("--from", source, "--out", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert f"error: {source / '3.mat'}: " in error and message in error
    assert f"the unfinished {tmp_path / 'out.partial'} was removed" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_old_style_cvind_is_read_with_scipy(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")  # installed with scikit-learn
    files = mat_files()
    buffer = io.BytesIO()
    scipy_io.savemat(buffer, {"cvind": np.array([FOLDS], np.float64).T})  # MATLAB v5 format
    files["cvind.mat"] = buffer.getvalue()
    assert run("--from", write_files(tmp_path / "in", files), "--out", tmp_path / "out") == 0
    assert [row["fold"] for row in metadata_rows(tmp_path / "out")] == [str(f) for f in FOLDS]


def test_old_style_cvind_without_scipy_leaves_folds_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import ...` fail
    files = mat_files()
    files["cvind.mat"] = b"MATLAB 5.0 MAT-file, Platform: PCWIN64" + bytes(100)
    assert run("--from", write_files(tmp_path / "in", files), "--out", tmp_path / "out") == 0
    assert "needs scipy" in capsys.readouterr().err
    assert [row["fold"] for row in metadata_rows(tmp_path / "out")] == ["", "", "", ""]


def test_ctrl_c_during_figshare_conversion_removes_the_partial_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_files(tmp_path / "in", mat_files())
    monkeypatch.setattr("tumorseg.sources.figshare.convert_slice", interrupt_on_call(2, convert_slice))
    assert run("--from", source, "--out", tmp_path / "out") == 130
    assert f"the unfinished {tmp_path / 'out.partial'} was removed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
