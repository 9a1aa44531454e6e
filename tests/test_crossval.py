"""crossval.py: K folds by patient trained, their held-out patients scored, the table and the paired comparison."""

import csv
import json
import shutil
from pathlib import Path

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
        assert split["split_file"] == str((cv_dir / "splits.json").resolve()) and split["fold"] == fold
        assert split["group_column"] == "patient_id"
        planned = json.loads((cv_dir / "splits.json").read_text())["folds"][fold]
        assert all(planned[role] == split[role] for role in ("train", "val", "test"))
        scored = (cv_dir / "heldout" / f"fold{fold}" / "metrics.csv").read_text().splitlines()[1:]
        assert sorted(line.split(",")[0] for line in scored) == sorted(split["test"])
        held_out += split["test"]
    assert sorted(held_out) == sorted(p.stem for p in (demo_root / "images").iterdir())  # each slice once
    plan = json.loads((cv_dir / "plan.json").read_text())
    assert plan["folds"] == 3 and plan["train_config"]["EPOCHS"] == 2 and plan["train_config"]["IMAGE_SIZE"] == 32
    assert plan["data"]["pairs"] == 24 and len(plan["data"]["sha256"]) == 64 and "FOLD" not in plan["train_config"]


def test_the_table_has_every_fold_the_all_slices_row_and_the_documented_columns(cv_dir):
    result = json.loads((cv_dir / "crossval.json").read_text())
    assert sorted(result["folds"]) == ["0", "1", "2"] and result["all_slices"]["slices"] == 24
    assert result["all_slices"]["patients"] == 6
    for key in ("dice_mean", "dice_median", "patient_dice_mean", "class_mix_dice", "share_below_tail",
                "hd95_mm_median", "dice_glioma", "dice_meningioma", "dice_pituitary"):
        assert key in result["all_slices"], key
    # a class missing from a fold leaves that fold's class-mix mean undefined: the pooled one stands
    assert {"dice_mean", "dice_median", "patient_dice_mean", "share_below_tail"} <= set(result["over_folds"])
    means = [scores["dice_mean"] for scores in result["folds"].values()]
    assert result["over_folds"]["dice_mean"]["mean"] == pytest.approx(sum(means) / 3)
    table = (cv_dir / "crossval.md").read_text()
    for text in ("| fold 0 |", "| fold 2 |", "**all slices**", "fold 0: 0 (fresh)", "mean ± sd over folds", "class-mix mean", "glioma",
                 "slices < 0.3", "HD95 median (mm)"):
        assert text in table, text


def test_running_again_trains_nothing_and_collects_the_finished_folds(cv_dir, demo_root, capsys):
    assert crossval.main(["run", "--name", "tiny", "--data-root", str(demo_root), "--folds", "3",
                          "--runs-dir", str(cv_dir.parent), "--pixel-spacing-mm", "0.98", *TINY]) == 0
    out = capsys.readouterr().out
    assert out.count("trained already") == 3 and "scoring" not in out


def copy_of(cv_dir: Path, dest: Path, shift: float = 0.0, plan_change: dict | None = None) -> Path:
    """A copy of a cross-validation's records (no checkpoints) with every held-out Dice raised by `shift`."""
    shutil.copytree(cv_dir, dest, ignore=shutil.ignore_patterns("*.pt", "events.*"))
    for path in dest.glob("heldout/fold*/metrics.csv"):
        rows = list(csv.DictReader(path.open()))
        for row in rows:
            row["dice"] = f"{float(row['dice']) + shift:.6f}"
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if plan_change:
        plan = json.loads((dest / "plan.json").read_text())
        plan["train_config"].update(plan_change)
        (dest / "plan.json").write_text(json.dumps(plan))
    return dest


def test_compare_with_itself_is_no_difference_and_other_splits_are_refused_by_name(cv_dir, tmp_path, capsys):
    a = copy_of(cv_dir, tmp_path / "runs" / "a")
    assert crossval.main(["compare", str(a), str(a)]) == 0
    out = capsys.readouterr().out
    assert "held-out patients (they report only): 6," in out and "mean difference +0.0000" in out and "not applicable" in out
    assert ("fold 0: best epoch A 0.0000 (epoch 1), B 0.0000 (epoch 1); with its rule A 0.0000, B 0.0000; "
            "B - A +0.0000") in out and "NOT adopted" in out
    other = copy_of(cv_dir, tmp_path / "runs" / "other", plan_change={"SPLIT_SEED": 7})
    assert crossval.main(["compare", str(a), str(other)]) == 1
    assert "train_config.SPLIT_SEED: 42 -> 7" in capsys.readouterr().err


def test_compare_reports_a_known_shift_per_patient_and_counts_the_looks(cv_dir, tmp_path, capsys):
    a = copy_of(cv_dir, tmp_path / "runs" / "a")
    b = copy_of(cv_dir, tmp_path / "runs" / "b", shift=0.05)
    assert crossval.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    # 6 patients all better by 0.05: the exact two-sided Wilcoxon p is 2 / 2**6
    assert "all patients (6): A 0.0000, B 0.0500\nmean difference +0.0500" in out
    assert f"p = {2 / 2**6:.4g}" in out and "B better on 6, worse on 0" in out and "look 1 at these folds" in out
    assert "held-out slices per failure category" in out  # the same slices' categories: A -> B equal
    assert crossval.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "look 2 at these folds" in out and f"gives p = {2 * 2 / 2**6:.4g}" in out  # Holm over two equal p
    looks = list(csv.DictReader((tmp_path / "runs" / "looks.csv").open()))
    assert len(looks) == 2 and looks[0]["folds"] == "0 1 2" and looks[0]["b"] == str(b)
    assert crossval.main(["table", str(a)]) == 0
    assert "fold 0: 2, fold 1: 2, fold 2: 2" in capsys.readouterr().out


def test_run_with_other_flags_into_the_same_folder_stops_and_names_each_difference(cv_dir, demo_root, capsys):
    before = sorted(p.name for p in cv_dir.iterdir())
    changed = [*TINY[:-1], "3", "--learning-rate", "0.01"]  # --epochs 3 instead of 2, another learning rate
    assert crossval.main(["run", "--name", "tiny", "--data-root", str(demo_root), "--folds", "3",
                          "--runs-dir", str(cv_dir.parent), "--pixel-spacing-mm", "0.98", *changed]) == 1
    err = capsys.readouterr().err
    assert "train_config.EPOCHS: 2 -> 3" in err and "train_config.LEARNING_RATE: 0.001 -> 0.01" in err
    assert "another --name" in err and sorted(p.name for p in cv_dir.iterdir()) == before
    assert crossval.main(["run", "--name", "tiny", "--data-root", str(demo_root), "--folds", "2",
                          "--runs-dir", str(cv_dir.parent), "--pixel-spacing-mm", "0.98", *TINY]) == 1
    assert "folds: 3 -> 2" in capsys.readouterr().err


def test_rerule_searches_each_folds_rule_again_without_retraining(cv_dir, tmp_path, capsys):
    import torch
    from tumorseg.runs.checkpoints import load_checkpoint
    source = copy_of(cv_dir, tmp_path / "runs" / "a")
    for fold in range(3):  # copy_of leaves out checkpoints: rerule needs the source's weights
        shutil.copy(cv_dir / f"fold{fold}" / "best.pt", source / f"fold{fold}" / "best.pt")
    assert crossval.main(["rerule", str(source), "--name", "b", "--rule-most-probable", "true"]) == 0
    target = tmp_path / "runs" / "b"
    plan = json.loads((target / "plan.json").read_text())
    assert plan["train_config"]["RULE_MOST_PROBABLE"] is True and plan["rule_searched_again_from"] == str(source)
    assert (target / "splits.json").read_text() == (source / "splits.json").read_text()
    for fold in range(3):
        candidates = json.loads((target / f"fold{fold}" / "decision_rule.json").read_text())["candidates"]
        assert len(candidates) == 9 * 3 * 4 * 2 and any(row["keep_most_probable"] for row in candidates)
        before = load_checkpoint(source / f"fold{fold}" / "best.pt").state["model"]
        after = load_checkpoint(target / f"fold{fold}" / "best.pt").state["model"]
        assert all(torch.equal(before[key], after[key]) for key in before)  # the weights are not retrained
        assert (target / "heldout" / f"fold{fold}" / "metrics.csv").is_file()
    assert not list(target.glob(".*partial"))
    with pytest.raises(SystemExit) as refused:  # a training flag changes the weights: argparse refuses it
        crossval.main(["rerule", str(source), "--name", "c", "--epochs", "3"])
    assert refused.value.code == 2
    assert "changes training" in capsys.readouterr().err and not (tmp_path / "runs" / "c").exists()


def test_ctrl_c_during_rerule_is_said_and_leaves_no_fold_that_looks_finished(cv_dir, tmp_path, monkeypatch, capsys):
    source = copy_of(cv_dir, tmp_path / "runs" / "a")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("tumorseg.crossval.folds.choose_decision_rule", interrupted)
    assert crossval.main(["rerule", str(source), "--name", "b", "--rule-most-probable", "true"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "b" / "fold0").exists()  # only its staging copy, redone by the next rerule


def test_a_stray_fold_folder_is_refused_and_never_pooled(cv_dir, demo_root, tmp_path, capsys):
    a = copy_of(cv_dir, tmp_path / "runs" / "a")
    shutil.copytree(a / "fold0", a / "fold3")
    shutil.copytree(a / "heldout" / "fold0", a / "heldout" / "fold3")
    assert crossval.main(["table", str(a)]) == 0
    assert json.loads((a / "crossval.json").read_text())["all_slices"]["slices"] == 24
    capsys.readouterr()
    assert crossval.main(["run", "--name", "a", "--data-root", str(demo_root), "--folds", "3",
                          "--runs-dir", str(a.parent), "--pixel-spacing-mm", "0.98", *TINY]) == 1
    assert f"{a / 'fold3'}: the plan has 3 folds" in capsys.readouterr().err


def test_a_folder_without_a_plan_is_refused(demo_root, tmp_path, capsys):
    (tmp_path / "old" / "fold0").mkdir(parents=True)
    assert crossval.main(["run", "--name", "old", "--data-root", str(demo_root), "--folds", "3",
                          "--runs-dir", str(tmp_path), *TINY]) == 1
    assert "holds no plan.json" in capsys.readouterr().err
    assert crossval.main(["table", str(tmp_path / "old")]) == 1
    assert "plan.json: missing" in capsys.readouterr().err


def test_flags_crossval_sets_itself_are_refused(demo_root, tmp_path, capsys):
    assert crossval.main(["run", "--name", "x", "--data-root", str(demo_root), "--runs-dir", str(tmp_path),
                          "--fold", "2"]) == 1
    assert "crossval.py sets these for each fold" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_table_of_a_mistyped_folder_says_it_does_not_exist(tmp_path, capsys):
    assert crossval.main(["table", str(tmp_path / "cpu-typo")]) == 1
    assert f"{tmp_path / 'cpu-typo'}: no such folder" in capsys.readouterr().err


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


def test_pixel_spacing_is_one_number_or_rows_by_columns_and_nothing_else(capsys):
    assert crossval.spacing_mm("0.98") == 0.98  # square: a number, as plans have recorded it
    assert crossval.spacing_mm("0.9x1.2") == "0.9x1.2" and crossval.spacing_mm(" 0.9 X 1.2 ") == "0.9x1.2"
    with pytest.raises(SystemExit) as stop:
        crossval.main(["run", "--name", "n", "--data-root", ".", "--pixel-spacing-mm", "0.9,1.2"])
    assert stop.value.code == 2 and "not a pixel size in mm" in capsys.readouterr().err
