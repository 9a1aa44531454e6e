"""Offline tests of `prepare_data.py`: figshare download, resume, MD5 refusal, conversion, `--from`;
the command line's checks and help; cleanup of `<out>.partial` on failure or Ctrl-C.

The figshare release is imitated with small MATLAB-v7.3-layout files written by
h5py, zipped, and served with a fake API listing by a local HTTP server.
"""

from __future__ import annotations

import csv
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
from PIL import Image

import prepare_data
from tumorseg.data.checks import verify_dataset
from test_volumes import oblique_affine, write_nifti as write_volume

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


def metadata(out: Path) -> list[dict[str, str]]:
    """Rows of out/metadata.csv."""
    with open(out / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def png(path: Path) -> np.ndarray:
    """Pixels of a PNG."""
    with Image.open(path) as image:
        return np.asarray(image)


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
    assert metadata(tmp_path / "out") == EXPECTED_ROWS
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
    assert metadata(tmp_path / "out") == EXPECTED_ROWS


def test_failed_download_leaves_no_output_and_a_rerun_resumes(figshare: FakeFigshare, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    figshare.cuts_left[ZIP_B] = prepare_data.DOWNLOAD_ATTEMPTS  # every attempt of this run is cut
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
    assert metadata(tmp_path / "out") == EXPECTED_ROWS


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
        pixels = png(converted / "images" / f"{number}.png")
        assert pixels.dtype == np.uint8 and pixels.shape == image.shape
    for number in (1, 2, 4):  # the ramps rise in reading order only if nothing was transposed
        flat = png(converted / "images" / f"{number}.png").ravel().astype(int)
        assert np.all(np.diff(flat) >= 0) and flat[0] == 0 and flat[-1] == 255


def test_masks_align_with_images(converted: Path) -> None:
    for number, (image, mask, *_rest) in SLICES.items():
        pixels = png(converted / "masks" / f"{number}.png")
        assert pixels.shape == image.shape
        np.testing.assert_array_equal(pixels, mask * 255)


def test_intensity_window_ignores_an_outlier(converted: Path) -> None:
    pixels = png(converted / "images" / "3.png")
    assert pixels[5, 7] == 255  # the outlier saturates ...
    assert 110 <= np.median(pixels) <= 145  # ... instead of squeezing the rest into a few grey levels
    assert pixels.min() == 0


def test_metadata_has_patient_ids_classes_and_folds(converted: Path) -> None:
    assert metadata(converted) == EXPECTED_ROWS
    assert list(metadata(converted)[0]) == prepare_data.METADATA_COLUMNS


def test_output_passes_the_integrity_check(converted: Path) -> None:
    assert verify_dataset(converted, group_column="patient_id") == []


def test_size_resamples_images_and_keeps_masks_binary(tmp_path: Path, release: dict[str, bytes]) -> None:
    source = write_files(tmp_path / "in", {ZIP_A: release[ZIP_A], ZIP_B: release[ZIP_B]})
    assert run("--from", source, "--out", tmp_path / "out", "--size", 64) == 0
    for number in SLICES:
        image, mask = png(tmp_path / "out/images" / f"{number}.png"), png(tmp_path / "out/masks" / f"{number}.png")
        assert image.shape == mask.shape == (64, 64)
        assert set(np.unique(mask)) == {0, 255}
    assert {(row["height"], row["width"], row["fold"]) for row in metadata(tmp_path / "out")} == {("64", "64", "")}
    assert verify_dataset(tmp_path / "out", group_column="patient_id") == []


# ----------------------------------------------------------------------------- --from


def test_from_a_folder_of_mat_files(tmp_path: Path) -> None:
    source = write_files(tmp_path / "unzipped" / "brainTumorDataPublic_1-766", mat_files()).parent
    (tmp_path / "out.partial").mkdir()  # left over by an interrupted run
    (tmp_path / "out.partial" / "junk.png").write_bytes(b"")
    assert run("--from", source, "--out", tmp_path / "out") == 0
    assert metadata(tmp_path / "out") == EXPECTED_ROWS
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out" / "junk.png").exists()


def test_from_figshare_download_all_zip(tmp_path: Path, release: dict[str, bytes]) -> None:
    """The "Download all" zip of the figshare page holds the part zips, cvind.mat and README.txt."""
    (tmp_path / "1512427.zip").write_bytes(zip_bytes(release))
    assert run("--from", tmp_path / "1512427.zip", "--out", tmp_path / "out") == 0
    assert metadata(tmp_path / "out") == EXPECTED_ROWS


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
    assert [row["fold"] for row in metadata(tmp_path / "out")] == [str(f) for f in FOLDS]


def test_old_style_cvind_without_scipy_leaves_folds_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import ...` fail
    files = mat_files()
    files["cvind.mat"] = b"MATLAB 5.0 MAT-file, Platform: PCWIN64" + bytes(100)
    assert run("--from", write_files(tmp_path / "in", files), "--out", tmp_path / "out") == 0
    assert "needs scipy" in capsys.readouterr().err
    assert [row["fold"] for row in metadata(tmp_path / "out")] == ["", "", "", ""]


# ----------------------------------------------------------------------------- command line and cleanup


@pytest.mark.parametrize("argv, message", [
    (["demo", "--size", "0"], "argument --size: must be at least 24"),
    (["demo", "--size", "23"], "argument --size: must be at least 24 (smaller slices can have empty tumour masks)"),
    (["demo", "--count", "0"], "argument --count: must be at least 1, got 0"),
    (["demo", "--count=-5"], "argument --count: must be at least 1, got -5"),
    (["demo", "--count", "many"], "argument --count: expected a whole number, got 'many'"),
    (["demo", "--slices-per-patient", "0"], "argument --slices-per-patient: must be at least 1"),
    (["demo", "--seed=-1"], "argument --seed: must be at least 0"),
    (["figshare", "--size", "0"], "argument --size: must be at least 1"),
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_smallest_allowed_demo_size_draws_a_tumour_in_every_slice(tmp_path: Path) -> None:
    out = prepare_data.make_demo_dataset(tmp_path / "demo", count=60, size=prepare_data.DEMO_MIN_SIZE, seed=3)
    assert all(png(path).any() for path in (out / "masks").iterdir())


def test_demo_slices_per_patient_option(tmp_path: Path) -> None:
    assert prepare_data.main(["demo", "--out", str(tmp_path / "demo"), "--count", "6", "--size", "24",
                              "--slices-per-patient", "2"]) == 0
    assert [row["patient_id"] for row in metadata(tmp_path / "demo")] == ["p000", "p000", "p001", "p001",
                                                                        "p002", "p002"]


@pytest.mark.parametrize("command, shown", [
    ("demo", ["(default: data/demo)", "(default: 240)", "(default: 128)", "(default: 0)", "(default: 6)"]),
    ("figshare", ["(default: data/figshare-brain-tumor)", "(default: download)", "(default: keep)",
                  "(default: .downloads beside --out)", f"(default: {prepare_data.FIGSHARE_API_URL})"]),
    ("nifti", ["(default: *.nii*)", "(default: every label above 0)", "(default: auto)", "(default: keep)",
               "(default: 0.0)", "(default: 0)", "(default: refuse such a pair)"]),
])
def test_help_shows_every_default(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                  command: str, shown: list[str]) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside the help texts
    with pytest.raises(SystemExit):
        prepare_data.main([command, "--help"])
    text = capsys.readouterr().out
    assert all(default in text for default in shown), text


def interrupt_on_call(number: int, function: Callable) -> Callable:
    """`function`, except that its `number`-th call raises KeyboardInterrupt, as Ctrl-C would."""
    calls = []

    def wrapped(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapped


def test_ctrl_c_during_demo_removes_the_partial_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_data, "make_demo_slice", interrupt_on_call(3, prepare_data.make_demo_slice))
    assert prepare_data.main(["demo", "--out", str(tmp_path / "demo"), "--count", "5", "--size", "24"]) == 130
    assert capsys.readouterr().err == f"interrupted (Ctrl-C)\nthe unfinished {tmp_path / 'demo.partial'} was removed\n"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_figshare_conversion_removes_the_partial_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_files(tmp_path / "in", mat_files())
    monkeypatch.setattr(prepare_data, "convert_slice", interrupt_on_call(2, prepare_data.convert_slice))
    assert run("--from", source, "--out", tmp_path / "out") == 130
    assert f"the unfinished {tmp_path / 'out.partial'} was removed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_write_error_is_named_and_removes_the_partial_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path: Path, *args: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(prepare_data, "write_metadata", full_disk)
    assert prepare_data.main(["demo", "--out", str(tmp_path / "demo"), "--count", "2", "--size", "24"]) == 1
    error = capsys.readouterr().err
    assert f"error: [Errno 28] No space left on device: '{tmp_path / 'demo.partial' / 'metadata.csv'}'" in error
    assert f"the unfinished {tmp_path / 'demo.partial'} was removed" in error
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_and_another_runs_partial_folder_are_left_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("a finished dataset")
    assert prepare_data.main(["demo", "--out", str(tmp_path / "demo"), "--count", "2", "--size", "24"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "demo" / "keep.txt").read_text() == "a finished dataset"
    # A failure before this run made its staging folder must not remove someone else's.
    (tmp_path / "out.partial").mkdir()
    assert run("--from", tmp_path / "missing", "--out", tmp_path / "out") == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert (tmp_path / "out.partial").is_dir()


# ----------------------------------------------------------------------------- nifti: volumes to slices


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
    rows = metadata(out)
    assert list(rows[0]) == prepare_data.NIFTI_METADATA_COLUMNS
    expected_ids = [f"{case}_k{k:03d}" for case in NIFTI_CASES for k in tumour_slices(case)]
    assert [row["image_id"] for row in rows] == expected_ids
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(p.stem for p in (out / "masks").iterdir()) \
        == sorted(expected_ids)
    for row in rows:
        case, k = row["patient_id"], int(row["slice_index"])
        assert row["image_id"].startswith(case) and row["slice_axis"] == "2"
        assert row["source_volume"] == row["source_mask"] == f"{case}.nii.gz"
        windowed = window_to_uint8(read_nifti(volume_pairs / "images" / f"{case}.nii.gz").data)
        assert np.array_equal(png(out / "images" / f"{row['image_id']}.png"), windowed[:, :, k])
        mask = png(out / "masks" / f"{row['image_id']}.png")
        assert set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask > 0, case_volumes(case)[1][:, :, k] > 0)
        assert row["has_tumour"] == "1" and int(row["tumour_pixels"]) == np.count_nonzero(mask)
        assert (row["height"], row["width"]) == tuple(str(n) for n in NIFTI_CASES[case][0][:2])
        # In-plane voxels 0.9 x 1.1 mm (the affine's column lengths); the single number is their mean.
        assert (row["pixel_spacing_rows_mm"], row["pixel_spacing_cols_mm"], row["pixel_spacing_mm"]) == \
            ("0.9", "1.1", "1")
    assert verify_dataset(out, group_column="patient_id") == []
    printed = capsys.readouterr().out
    assert f"wrote {len(expected_ids)} slices of 2 cases" in printed and "0 tumour-free" in printed
    assert "percentiles 0.5 to 99.5" in printed and "label values found: 1, 2, 4" in printed


def test_nifti_tumour_labels_keep_only_the_chosen_values(volume_pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert convert_pairs(volume_pairs, out, "--tumour-labels", "4") == 0
    rows = metadata(out)
    assert [row["image_id"] for row in rows] == [f"{case}_k{k:03d}" for case in NIFTI_CASES
                                                 for k in tumour_slices(case, (4,))]
    for row in rows:
        labels = case_volumes(row["patient_id"])[1][:, :, int(row["slice_index"])]
        mask = png(out / "masks" / f"{row['image_id']}.png")
        assert np.array_equal(mask > 0, labels == 4) and (labels[mask == 0] != 4).all()


def test_nifti_empty_share_adds_non_blank_tumour_free_slices(volume_pairs: Path, tmp_path: Path) -> None:
    assert convert_pairs(volume_pairs, tmp_path / "a", "--empty-share", "0.5", "--seed", "3") == 0
    rows = metadata(tmp_path / "a")
    tumour = sum(len(tumour_slices(case)) for case in NIFTI_CASES)
    empty = [row for row in rows if row["has_tumour"] == "0"]
    assert len(rows) - len(empty) == tumour and len(empty) == round(0.5 * tumour)
    for row in empty:
        k, shape = int(row["slice_index"]), NIFTI_CASES[row["patient_id"]][0]
        assert k not in tumour_slices(row["patient_id"]) and 0 < k < shape[2] - 1  # blank end slices never
        assert row["tumour_pixels"] == "0" and not png(tmp_path / "a" / "masks" / f"{row['image_id']}.png").any()
    assert verify_dataset(tmp_path / "a", group_column="patient_id") == []
    # The same seed draws the same slices.
    assert convert_pairs(volume_pairs, tmp_path / "b", "--empty-share", "0.5", "--seed", "3") == 0
    assert metadata(tmp_path / "b") == rows


def test_nifti_axis_and_size_options(volume_pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert convert_pairs(volume_pairs, out, "--axis", "0", "--size", "12") == 0
    rows = metadata(out)
    assert {row["slice_axis"] for row in rows} == {"0"} and rows[0]["image_id"].startswith("caseA_i")
    for row in rows:
        assert png(out / "images" / f"{row['image_id']}.png").shape == (12, 12)
        assert set(np.unique(png(out / "masks" / f"{row['image_id']}.png"))) <= {0, 255}
    # Across axis 0 a slice is (16 or 22) x (9 or 7) voxels of 1.1 x 5 mm, resampled to 12 x 12.
    row = next(row for row in rows if row["patient_id"] == "caseA")
    assert float(row["pixel_spacing_rows_mm"]) == pytest.approx(1.1 * 16 / 12, rel=1e-5)
    assert float(row["pixel_spacing_cols_mm"]) == pytest.approx(5.0 * 9 / 12, rel=1e-5)


@pytest.mark.parametrize("pattern, ending", [
    ("*_flair.nii.gz", "_flair"), ("**/*_seg.nii*", "_seg"), ("*.nii*", ""), ("*.nii.gz", ""), ("*", ""),
    ("sub-*_T1w.nii", "_T1w"), ("*_t1ce.NII.GZ", "_t1ce"), ("*/*_mask[0-9].nii.gz", ""),
])
def test_pattern_ending_is_the_text_after_the_last_wildcard(pattern: str, ending: str) -> None:
    assert prepare_data.pattern_ending(pattern) == ending


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
    rows = metadata(out)
    assert {row["patient_id"] for row in rows} == {"BraTS2021_caseA", "BraTS2021_caseB"}
    assert rows[0]["image_id"] == "BraTS2021_caseA_k002"
    assert rows[0]["source_volume"] == "BraTS2021_caseA/BraTS2021_caseA_flair.nii.gz"
    assert rows[0]["source_mask"] == "BraTS2021_caseA/BraTS2021_caseA_seg.nii.gz"
    assert len(rows) == sum(len(tumour_slices(case)) for case in NIFTI_CASES)
    # A recursive path glob does the same.
    assert nifti("--images", root, "--masks", root, "--out", tmp_path / "out2", "--image-pattern",
                 "**/*_flair.nii.gz", "--mask-pattern", "**/*_seg.nii.gz") == 0
    assert metadata(tmp_path / "out2") == rows


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
    monkeypatch.setattr(prepare_data, "convert_case", interrupt_on_call(2, prepare_data.convert_case))
    assert convert_pairs(volume_pairs, tmp_path / "out") == 130
    assert f"the unfinished {tmp_path / 'out.partial'} was removed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_nifti_sigterm_leaves_nothing_like_ctrl_c(volume_pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    convert_case, calls = prepare_data.convert_case, []

    def terminated_on_the_second_case(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # the first case's slices are in out.partial: a real SIGTERM to this process
            os.kill(os.getpid(), signal.SIGTERM)
        return convert_case(*args, **kwargs)

    monkeypatch.setattr(prepare_data, "convert_case", terminated_on_the_second_case)
    handler_before = signal.getsignal(signal.SIGTERM)
    assert convert_pairs(volume_pairs, tmp_path / "out") == 143
    assert f"interrupted (SIGTERM)\nthe unfinished {tmp_path / 'out.partial'} was removed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the previous handler is back


@pytest.mark.parametrize("argv, message", [
    (["--tumour-labels", "0,4"], "labels must be above 0 (0 is background)"),
    (["--tumour-labels", "whole"], "expected label values like 1,2,4, got 'whole'"),
    (["--empty-share=-0.1"], "expected a number of at least 0, got '-0.1'"),
    (["--axis", "3"], "invalid choice: '3'"),
])
def test_nifti_bad_options_are_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        nifti("--images", tmp_path, "--masks", tmp_path, "--out", tmp_path / "out", *argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


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
