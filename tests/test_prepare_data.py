"""prepare_data.py's command line: bad values refused before anything is written, the help, the output folder.

What each source writes is tested beside it, in tests/sources/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import prepare_data
from tumorseg.sources.figshare import FIGSHARE_API_URL


def figshare(*args: object) -> int:
    """prepare_data's exit status for `figshare` with these arguments."""
    return prepare_data.main(["figshare", *map(str, args)])


def nifti(*args: object) -> int:
    """prepare_data's exit status for `nifti` with these arguments."""
    return prepare_data.main(["nifti", *map(str, args)])


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


@pytest.mark.parametrize("command, shown", [
    ("demo", ["(default: data/demo)", "(default: 240)", "(default: 128)", "(default: 0)", "(default: 6)"]),
    ("figshare", ["(default: data/figshare-brain-tumor)", "(default: download)", "(default: keep)",
                  "(default: .downloads beside --out)", f"(default: {FIGSHARE_API_URL})"]),
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


def test_a_write_error_is_named_and_removes_the_partial_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path: Path, *args: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("tumorseg.sources.demo.write_metadata", full_disk)
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
    assert figshare("--from", tmp_path / "missing", "--out", tmp_path / "out") == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert (tmp_path / "out.partial").is_dir()


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


def test_a_folder_made_at_out_just_before_publishing_is_never_replaced(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tumorseg import files
    real_fsync_tree = files.fsync_tree

    def another_process_makes_out(path: Path) -> None:  # after every check, right before the rename
        real_fsync_tree(path)
        (tmp_path / "demo").mkdir()  # empty: a plain rename onto it would replace it

    monkeypatch.setattr(files, "fsync_tree", another_process_makes_out)
    assert prepare_data.main(["demo", "--out", str(tmp_path / "demo"), "--count", "2", "--size", "24"]) == 1
    assert "output folder already exists" in capsys.readouterr().err
    assert list((tmp_path / "demo").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
