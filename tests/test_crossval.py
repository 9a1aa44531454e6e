"""crossval.py: K folds by patient trained, their held-out patients scored, the table and the paired comparison."""

import json

import pytest

import crossval
from conftest import ROOT

TINY = ["--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--in-channels", "1",
        "--normalization", "zscore", "--epochs", "2"]


@pytest.fixture(scope="module")
def cv_dir(demo_root, tmp_path_factory):
    """A 3-fold cross-validation of tiny runs on the synthetic set (6 patients of 4 slices)."""
    runs = tmp_path_factory.mktemp("cv")
    assert crossval.main(["run", "--name", "tiny", "--data-root", str(demo_root), "--folds", "3",
                          "--runs-dir", str(runs), "--pixel-spacing-mm", "0.98",
                          "--class-mix", "glioma=0.5,meningioma=0.25,pituitary=0.25", *TINY]) == 0
    return runs / "tiny"


def test_run_trains_every_fold_and_scores_its_held_out_patients(cv_dir, demo_root):
    held_out = []
    for fold in range(3):
        split = json.loads((cv_dir / f"fold{fold}" / "split.json").read_text())
        assert split["folds"] == 3 and split["fold"] == fold and split["group_column"] == "patient_id"
        scored = (cv_dir / "heldout" / f"fold{fold}" / "metrics.csv").read_text().splitlines()[1:]
        assert sorted(line.split(",")[0] for line in scored) == sorted(split["test"])
        held_out += split["test"]
    assert sorted(held_out) == sorted(p.stem for p in (demo_root / "images").iterdir())  # each slice once


def test_the_table_has_every_fold_the_pooled_row_and_the_documented_columns(cv_dir):
    result = json.loads((cv_dir / "crossval.json").read_text())
    assert sorted(result["folds"]) == ["0", "1", "2"] and result["pooled"]["slices"] == 24
    assert result["pooled"]["patients"] == 6
    for key in ("dice_mean", "dice_median", "patient_dice_mean", "class_mix_dice", "share_below_tail",
                "hd95_mm_median", "dice_glioma", "dice_meningioma", "dice_pituitary"):
        assert key in result["pooled"], key
    # a class missing from a fold leaves that fold's class-mix mean undefined: the pooled one stands
    assert {"dice_mean", "dice_median", "patient_dice_mean", "share_below_tail"} <= set(result["over_folds"])
    means = [scores["dice_mean"] for scores in result["folds"].values()]
    assert result["over_folds"]["dice_mean"]["mean"] == pytest.approx(sum(means) / 3)
    table = (cv_dir / "crossval.md").read_text()
    for text in ("| fold 0 |", "| fold 2 |", "**pooled**", "mean ± sd over folds", "class-mix mean", "glioma",
                 "slices < 0.3", "HD95 median (mm)"):
        assert text in table, text


def test_running_again_trains_nothing_and_collects_the_finished_folds(cv_dir, demo_root, capsys):
    assert crossval.main(["run", "--name", "tiny", "--data-root", str(demo_root), "--folds", "3",
                          "--runs-dir", str(cv_dir.parent), *TINY]) == 0
    out = capsys.readouterr().out
    assert out.count("trained already") == 3 and "scoring" not in out


def test_compare_with_itself_is_no_difference_and_other_folds_are_refused(cv_dir, tmp_path, capsys):
    assert crossval.main(["compare", str(cv_dir), str(cv_dir)]) == 0
    out = capsys.readouterr().out
    assert "6 held-out patients" in out and "mean difference +0.0000" in out and "not applicable" in out
    other = tmp_path / "other"
    (other / "fold0").mkdir(parents=True)
    (other / "heldout" / "fold0").mkdir(parents=True)
    (other / "fold0" / "split.json").write_text(json.dumps({"group_column": "patient_id"}))
    (other / "heldout" / "fold0" / "metrics.csv").write_text("image,dice,patient_id\ndemo_0000,0.5,p000\n")
    assert crossval.main(["compare", str(cv_dir), str(other)]) == 1
    assert "did not hold out the same slices" in capsys.readouterr().err


def test_flags_crossval_sets_itself_are_refused(demo_root, tmp_path, capsys):
    assert crossval.main(["run", "--name", "x", "--data-root", str(demo_root), "--runs-dir", str(tmp_path),
                          "--fold", "2"]) == 1
    assert "crossval.py sets these for each fold" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_table_without_scored_folds_says_what_to_do(tmp_path, capsys):
    assert crossval.main(["table", str(tmp_path)]) == 1
    assert "run crossval.py run first" in capsys.readouterr().err


def test_crossval_runs_from_the_command_line():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / "crossval.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "compare" in done.stdout



def test_only_folds_outside_the_fold_count_are_refused(demo_root, tmp_path, capsys):
    assert crossval.main(["run", "--name", "x", "--data-root", str(demo_root), "--runs-dir", str(tmp_path),
                          "--folds", "3", "--only-folds", "0,7"]) == 1
    assert "--only-folds 7: there are 3 folds, 0 to 2" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_unreadable_metadata_is_named_before_any_fold_runs(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "metadata.csv").write_bytes(b"image_id,patient_id\n1,\xff\xfe\n")  # not UTF-8
    assert crossval.main(["run", "--name", "x", "--data-root", str(data), "--runs-dir", str(tmp_path / "runs"),
                          "--folds", "3"]) == 1
    assert f"{data / 'metadata.csv'}: is not UTF-8" in capsys.readouterr().err and not (tmp_path / "runs").exists()
