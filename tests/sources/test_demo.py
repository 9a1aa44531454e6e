"""tumorseg/sources/demo.py: the synthetic demo set, its options and its cleanup on Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import pytest

import prepare_data
from conftest import interrupt_on_call, metadata_rows, png_pixels
from tumorseg.sources.demo import DEMO_MIN_SIZE, make_demo_dataset, make_demo_slice


def test_the_smallest_allowed_demo_size_draws_a_tumour_in_every_slice(tmp_path: Path) -> None:
    out = make_demo_dataset(tmp_path / "demo", count=60, size=DEMO_MIN_SIZE, seed=3)
    assert all(png_pixels(path).any() for path in (out / "masks").iterdir())


def test_demo_slices_per_patient_option(tmp_path: Path) -> None:
    assert prepare_data.main(["demo", "--out", str(tmp_path / "demo"), "--count", "6", "--size", "24",
                              "--slices-per-patient", "2"]) == 0
    assert [row["patient_id"] for row in metadata_rows(tmp_path / "demo")] == ["p000", "p000", "p001", "p001",
                                                                        "p002", "p002"]


def test_ctrl_c_during_demo_removes_the_partial_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tumorseg.sources.demo.make_demo_slice", interrupt_on_call(3, make_demo_slice))
    assert prepare_data.main(["demo", "--out", str(tmp_path / "demo"), "--count", "5", "--size", "24"]) == 130
    assert capsys.readouterr().err == f"interrupted (Ctrl-C)\nthe unfinished {tmp_path / 'demo.partial'} was removed\n"
    assert list(tmp_path.iterdir()) == []
