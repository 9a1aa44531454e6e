import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train
from config import Config
from conftest import ROOT, load_script
from losses import BCEDiceLoss
from tumorseg.files import staging_host
from tumorseg.runs import records
from tumorseg.runs.checkpoints import load_checkpoint
from tumorseg.training import loaders, steps, timing

def staging_left(run) -> list:
    """Hidden files in a run folder other than its lock: staging files an interrupted write left behind."""
    from tumorseg.runs.runfolder import RUN_LOCK_NAME
    return [p for p in run.iterdir() if p.name.startswith(".") and p.name != RUN_LOCK_NAME]


TINY = ["--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "8",
        "--in-channels", "1", "--normalization", "zscore"]


def test_short_run_writes_every_artefact(demo_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-name", "r1",
                       "--epochs", "2", "--split-group-column", "patient_id", *TINY])
    assert code == 0
    run = runs / "r1"
    for name in ("best.pt", "last.pt", "config.json", "split.json", "history.csv", "summary.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert set(records.HISTORY_COLUMNS) == set(history[0])
    assert json.loads((run / "config.json").read_text())["IMAGE_SIZE"] == 32
    split = json.loads((run / "split.json").read_text())
    roles = [set(split[role]) for role in ("train", "val", "test")]
    assert sum(map(len, roles)) == 24 and len(set.union(*roles)) == 24  # disjoint, every image placed
    last = load_checkpoint(run / "last.pt")
    assert last.state["epoch"] == 2 and last.config.BASE_CHANNELS == 4 and "optimizer" in last.state
    assert last.warnings == []
    best = load_checkpoint(run / "best.pt").state
    assert best["metrics"]["dice"] == max(float(row["val_dice"]) for row in history)
    out = capsys.readouterr().out
    assert str(run) in out and "tensorboard --logdir" in out and "best epoch" in out


def test_tensorboard_has_scalars_and_image_panel(demo_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "tb",
                "--epochs", "1", *TINY])
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "dice/train", "dice/val", "iou/val", "pixel_accuracy/val",
            "learning_rate"} <= scalars
    panel = events.Images("val/image_truth_prediction")[-1]
    assert (panel.width, panel.height) == (3 * 32, 4 * 32)  # image | truth | prediction, 4 slices stacked


def test_existing_run_name_is_refused(demo_root, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "taken",
                       "--epochs", "1", *TINY])
    assert code == 1 and "already exists" in capsys.readouterr().err


def test_broken_real_data_halts_naming_every_problem_and_leaves_no_run(real_root, tmp_path, capsys):
    stems = sorted(p.stem for p in (real_root / "images").iterdir())[:12]
    data = tmp_path / "copy"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for stem in stems:
            shutil.copy(real_root / sub / f"{stem}.png", data / sub / f"{stem}.png")
    (data / "masks" / f"{stems[0]}.png").unlink()                                   # missing mask
    (data / "images" / f"{stems[1]}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)  # corrupt PNG
    Image.open(data / "masks" / f"{stems[2]}.png").resize((128, 128)).save(data / "masks" / f"{stems[2]}.png")
    runs = tmp_path / "runs"
    code = train.main(["--data-root", str(data), "--runs-dir", str(runs), "--epochs", "1", *TINY])
    err = capsys.readouterr().err
    assert code == 1
    assert "3 problem(s)" in err
    for stem in stems[:3]:
        assert f"{stem}.png" in err
    assert not runs.exists()


def test_short_cpu_run_on_real_slices_learns(real_subset, tmp_path):
    """~240 real slices, grouped split: validation Dice well above the ~0.03 of 'tumour everywhere'."""
    code = train.main(["--data-root", str(real_subset), "--runs-dir", str(tmp_path), "--run-name", "real",
                       "--split-group-column", "patient_id", "--image-size", "64", "--base-channels", "8",
                       "--in-channels", "1", "--normalization", "zscore", "--epochs", "12",
                       "--lr-schedule", "cosine"])
    assert code == 0
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    split = json.loads((tmp_path / "real" / "split.json").read_text())
    groups = {row["image_id"]: row["patient_id"] for row in csv.DictReader(open(real_subset / "metadata.csv"))}
    patients = [{groups[s] for s in split[role]} for role in ("train", "val", "test")]
    assert all(patients) and not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert summary["best_val_dice"] >= 0.2, summary


def test_cosine_schedule_decays_the_learning_rate_to_zero(demo_root, tmp_path):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "cos",
                       "--epochs", "3", "--lr-schedule", "cosine", "--learning-rate", "0.01", *TINY]) == 0
    rates = [float(row["learning_rate"]) for row in csv.DictReader(open(tmp_path / "cos" / "history.csv"))]
    assert 0.01 > rates[0] > rates[1] > rates[2] and rates[2] < 1e-9


def test_unusable_device_stops_before_any_run_folder(demo_root, tmp_path, capsys):
    for name in ("gpu0", "cuda:9"):
        code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "dev",
                           "--device", name, "--epochs", "1", *TINY])
        assert code == 1 and name in capsys.readouterr().err
    assert not (tmp_path / "dev").exists()


def test_last_batch_of_one_image_is_dropped(demo_root, tmp_path):
    # Random split of 24: 19 train images; batch 9 would leave a batch of 1, which BatchNorm cannot train on.
    # 4 px with DEPTH 2: a 1x1 bottleneck, where BatchNorm raises on a batch of one (larger ones would not).
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "b1",
                       "--epochs", "1", *TINY, "--image-size", "4", "--batch-size", "9",
                       "--split-group-column", "none", "--test-fraction", "0"])
    assert code == 0
    assert len(json.loads((tmp_path / "b1" / "split.json").read_text())["train"]) % 9 == 1


@pytest.mark.parametrize("size, depth", [(16, 4), (4, 2)])
def test_a_batch_of_one_at_a_1x1_bottleneck_is_refused_before_any_run_folder(demo_root, tmp_path, capsys, size,
                                                                                depth):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", *TINY,
                    "--image-size", str(size), "--depth", str(depth), "--batch-size", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"BATCH_SIZE 1 cannot train at IMAGE_SIZE {size} with DEPTH {depth}: the bottleneck is 1x1" in err
    assert f"an IMAGE_SIZE above 2**DEPTH = {2 ** depth}" in err
    assert not (tmp_path / "runs").exists()


def test_a_batch_of_one_trains_where_the_bottleneck_is_larger(demo_root, tmp_path):
    # 17 px is padded to 32 (a multiple of 2**DEPTH): a 2x2 bottleneck, where one image per batch is fine.
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "one",
                       "--epochs", "1", *TINY, "--image-size", "17", "--depth", "4", "--batch-size", "1"]) == 0
    assert (tmp_path / "one" / "summary.json").is_file()


def test_a_run_that_could_make_no_optimiser_step_is_refused_before_any_run_folder(tmp_path, capsys):
    from tumorseg.sources.demo import make_demo_dataset
    data = make_demo_dataset(tmp_path / "two", count=2, size=64, seed=1)  # 1 train / 1 val image
    runs = tmp_path / "runs"
    code = train.main(["--data-root", str(data), "--runs-dir", str(runs), "--run-name", "never",
                       "--epochs", "1", *TINY, "--batch-size", "4", "--split-group-column", "none",
                       "--test-fraction", "0"])
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "the training split has 1 image(s), too few for one optimiser step of BATCH_SIZE 4" in captured.err
    assert "Traceback" not in captured.err and "nan" not in captured.out
    assert not runs.exists()


def test_an_epoch_without_a_step_stops_the_run_and_removes_its_folder(tmp_path, monkeypatch, capsys):
    from tumorseg.sources.demo import make_demo_dataset
    data = make_demo_dataset(tmp_path / "two", count=2, size=64, seed=1)
    monkeypatch.setattr(loaders, "check_steps", lambda *args: None)  # as if the up-front check had missed it
    code = train.main(["--data-root", str(data), "--runs-dir", str(tmp_path / "runs"), "--run-name", "never",
                       "--epochs", "1", *TINY, "--batch-size", "4", "--split-group-column", "none",
                       "--test-fraction", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "no optimiser step was made" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "never").exists()


def interrupt_at_epoch(monkeypatch, epoch, error):
    """Make train_one_epoch raise `error` when it starts epoch `epoch`."""
    real = steps.train_one_epoch
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "train_one_epoch", fake)


def test_ctrl_c_before_the_first_epoch_removes_the_run_folder(demo_root, tmp_path, monkeypatch, capsys):
    interrupt_at_epoch(monkeypatch, 1, KeyboardInterrupt())
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "c1",
                       "--epochs", "3", *TINY])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "removed the run folder" in err
    assert not (tmp_path / "c1").exists()


def test_ctrl_c_later_keeps_the_finished_epochs(demo_root, tmp_path, monkeypatch, capsys):
    interrupt_at_epoch(monkeypatch, 3, KeyboardInterrupt())
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "c2",
                       "--epochs", "5", *TINY])
    err = capsys.readouterr().err
    assert code == 130 and "kept" in err and "last.pt (epoch 2)" in err
    assert load_checkpoint(tmp_path / "c2" / "last.pt").state["epoch"] == 2
    assert load_checkpoint(tmp_path / "c2" / "best.pt").state["epoch"] <= 2
    assert len(list(csv.DictReader(open(tmp_path / "c2" / "history.csv")))) == 2


def test_rerunning_the_command_of_an_unfinished_run_gives_the_resume_command(demo_root, tmp_path, monkeypatch,
                                                                            capsys):
    args = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "killed", "--epochs", "6",
            *TINY]
    interrupt_at_epoch(monkeypatch, 3, KeyboardInterrupt())  # stopped after epoch 2 of 6, as a kill would leave it
    assert train.main(args) == 130
    run = tmp_path / "killed"
    monkeypatch.undo()
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert train.main(args) == 1
    err = capsys.readouterr().err
    assert "holds an unfinished train.py run (epoch 2 of 6 in last.pt, no summary.json" in err, err
    assert f"python train.py --resume {run}\n" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files  # nothing touched
    assert train.main(["--resume", str(run)]) == 0 and (run / "summary.json").is_file()  # the command given works
    assert train.main(args) == 1  # a finished run: no resume advice
    err = capsys.readouterr().err
    assert "already exists; choose another name or remove it" in err and "--resume" not in err


def test_sigterm_stops_like_ctrl_c_keeping_the_finished_epochs_and_the_run_resumes(demo_root, tmp_path,
                                                                                     monkeypatch, capsys):
    import os
    import signal
    real = steps.train_one_epoch
    calls = []

    def terminated_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # a real SIGTERM, as a batch scheduler sends before it kills a job
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "train_one_epoch", terminated_in_epoch_2)
    args = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--epochs", "3", *TINY]
    assert train.main([*args, "--run-name", "term"]) == 143
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM) during epoch 2" in err and "last.pt (epoch 1)" in err and "Traceback" not in err
    assert not staging_left(tmp_path / "term")
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "term")]) == 0
    assert len(history_rows(tmp_path / "term")) == 3


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(demo_root, tmp_path, monkeypatch,
                                                                          capsys):
    real_forward = BCEDiceLoss.forward
    calls = []

    def poisoned(self, logits, target):
        calls.append(1)
        loss = real_forward(self, logits, target)
        return loss * float("nan") if len(calls) > 4 else loss  # 3 batches an epoch: NaN in epoch 2

    monkeypatch.setattr(BCEDiceLoss, "forward", poisoned)
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "nan",
                       "--epochs", "4", *TINY])
    err = capsys.readouterr().err
    assert code == 1 and "loss became nan" in err and "Traceback" not in err
    last = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert last.state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last.model.state_dict().values() if v.is_floating_point())


def test_full_disk_names_the_file_and_keeps_earlier_checkpoints(demo_root, tmp_path, monkeypatch, capsys):
    import errno

    from tumorseg import files
    real_open = open
    opened = []

    def full_on_second_last(path, mode="r", *args, **kwargs):
        if ".last.pt." in str(path):
            opened.append(path)
            if len(opened) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", full_on_second_last, raising=False)
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "full",
                       "--epochs", "3", *TINY])
    err = capsys.readouterr().err
    run = tmp_path / "full"
    assert code == 1 and f"no space left on device while writing {run / 'last.pt'}" in err
    assert load_checkpoint(run / "last.pt").state["epoch"] == 1 and load_checkpoint(run / "best.pt")
    assert not staging_left(run)


def test_time_estimate_and_cpu_hint_after_the_first_steps(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timing, "estimate_minutes", lambda *args: 19 * 60.0)
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "eta",
                       "--epochs", "1", *TINY, "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "estimated time: 19.0 h" in out.out + out.err and "hint:" in out.out + out.err


def test_kill_9_at_any_moment_leaves_loadable_checkpoints_and_the_next_start_cleans_up(demo_root, tmp_path):
    """SIGKILL while training (checkpoint writes included): every .pt stays loadable; stale staging goes."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    args = [sys.executable, str(ROOT / "train.py"), "--data-root", str(demo_root), "--runs-dir", str(tmp_path),
            "--run-name", "k", "--epochs", "200", *TINY, "--preview-images", "0"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:  # kill during the epoch after the first finished one
        if line.startswith("epoch   2"):
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    run = tmp_path / "k"
    finished = len(list(csv.DictReader(open(run / "history.csv"))))
    assert finished >= 2
    assert load_checkpoint(run / "best.pt") and load_checkpoint(run / "last.pt").state["epoch"] >= finished
    staging = run / f".last.pt.{staging_host()}.{process.pid}.0123abcd.tmp"  # what a kill mid-write would leave
    staging.write_bytes(b"half a checkpoint")
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "k2",
                       "--epochs", "1", *TINY]) == 0
    assert not staging.exists()


def _corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def _empty(path):
    path.write_bytes(b"")


def _grey_levels(path):
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 7 * 30).astype(np.uint8)).save(path)


def _resize(path):
    Image.open(path).resize((40, 40), Image.Resampling.NEAREST).save(path)


def _dangling(path):
    path.unlink()
    path.symlink_to(path.parent / "nowhere.png")


def _as_16_bit(path):
    Image.fromarray(np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 256).save(path)


def _as_rgba(path):
    Image.open(path).convert("RGBA").save(path)


def _as_palette(path):
    Image.open(path).convert("P").save(path)


# The bad-input matrix: (what is done, to which file, whether training must refuse, text the message has).
BAD_INPUTS = [
    ("corrupt image", _corrupt, "images", True, "corrupt"),
    ("truncated image", _truncate, "images", True, "corrupt"),
    ("empty image file", _empty, "images", True, "corrupt"),
    ("mask with grey levels", _grey_levels, "masks", True, "not two-level"),
    ("mask of another size", _resize, "masks", True, "but its mask"),
    ("dangling link as image", _dangling, "images", True, "broken link"),
    ("dangling link as mask", _dangling, "masks", True, "broken link"),
    ("missing mask", lambda path: path.unlink(), "masks", True, "no mask"),
    ("16-bit image", _as_16_bit, "images", False, ""),
    ("RGBA image", _as_rgba, "images", False, ""),
    ("palette image", _as_palette, "images", False, ""),
]


@pytest.mark.parametrize("case, change, sub, refused, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_matrix(demo_root, tmp_path, capsys, case, change, sub, refused, words):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    victim = data / sub / "demo_0005.png"
    change(victim)
    code = train.main(["--data-root", str(data), "--runs-dir", str(tmp_path / "runs"), "--run-name", "m",
                       "--epochs", "1", "--split-group-column", "patient_id", *TINY])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if refused:
        assert code == 1 and "demo_0005" in err and words in err, err
        assert not (tmp_path / "runs" / "m").exists()
    else:
        assert code == 0


def test_early_stopping_after_patience_epochs_without_improvement(demo_root, tmp_path, monkeypatch):
    dice_by_epoch = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.9])  # best at epoch 2, then three worse epochs
    real_evaluate = steps.evaluate

    def scripted(*args, **kwargs):
        metrics, kept = real_evaluate(*args, **kwargs)
        return {**metrics, "dice": next(dice_by_epoch)}, kept

    monkeypatch.setattr(steps, "evaluate", scripted)
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "p",
                       "--epochs", "6", "--patience", "3", "--search-rule", "false", *TINY]) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert (summary["epochs_run"], summary["best_epoch"], summary["patience"]) == (5, 2, 3)
    assert summary["stop_reason"].startswith("early stop")


def test_recipe_values_are_recorded_and_flags_override_them(demo_root, tmp_path):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "rc",
                       "--recipe", "cpu", "--epochs", "1", "--image-size", "32", "--base-channels", "4",
                       "--depth", "2"]) == 0
    config = json.loads((tmp_path / "rc" / "config.json").read_text())
    assert config["RECIPE"] == "cpu" and config["CROP"] is True and config["AUG_ELASTIC"] is True
    assert (config["EPOCHS"], config["IMAGE_SIZE"], config["LR_SCHEDULE"]) == (1, 32, "cosine")
    assert config["AMP"] in ("bf16", "off") and config["CHANNELS_LAST"] is True  # "auto" is recorded as it ran


def test_group_folds_hold_out_every_group_once(demo_root, tmp_path):
    seen = []
    for fold in range(3):
        assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", f"f{fold}",
                           "--split-group-column", "patient_id", "--folds", "3", "--fold", str(fold),
                           "--epochs", "1", "--search-rule", "false", *TINY]) == 0
        split = json.loads((tmp_path / f"f{fold}" / "split.json").read_text())
        assert (split["folds"], split["fold"]) == (3, fold)
        assert not (set(split["train"]) & set(split["val"]) or set(split["test"]) & set(split["train"] + split["val"]))
        seen += split["test"]
    assert sorted(seen) == sorted(p.stem for p in (demo_root / "images").iterdir())


def test_attention_unet_and_head_crop_train_and_store_the_rule(demo_root, tmp_path):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "att",
                       "--model", "attention_unet", "--crop", "true", "--aug-affine", "true", "--aug-intensity",
                       "true", "--aug-elastic", "true", "--epochs", "2", *TINY]) == 0
    best = load_checkpoint(tmp_path / "att" / "best.pt")
    assert best.state["model_args"]["name"] == "attention_unet" and best.config.CROP
    rule = json.loads((tmp_path / "att" / "decision_rule.json").read_text())
    assert rule["rule"] == best.state["decision_rule"]
    # Both Dice scores recomputed apart from the search (its per-label pixel counts), from the stored model.
    stems = json.loads((tmp_path / "att" / "split.json").read_text())["val"]
    recomputed = validation_dice(best, demo_root, stems, [rule["rule"], {"threshold": rule["threshold_only"]}])
    assert recomputed == pytest.approx([rule["val_dice_with_rule"], rule["val_dice_threshold_only"]], abs=1e-6)
    assert len(rule["candidates"]) == 144


def validation_dice(loaded, data_root, stems, rules):
    """Mean per-image Dice at native size of each of `rules` (dicts) on the images `stems`, as test.py scores."""
    from tumorseg.data import reading
    from tumorseg.inference.predict import native_probabilities
    from metrics import dice_per_image
    from tumorseg.inference.postprocess import DecisionRule
    images = [reading.read_image(data_root / "images" / f"{stem}.png", loaded.config.IN_CHANNELS) for stem in stems]
    maps = native_probabilities(loaded.model, loaded.config, images, torch.device("cpu"))
    masks = [reading.read_mask(data_root / "masks" / f"{stem}.png") for stem in stems]
    return [float(np.mean([dice_per_image(DecisionRule.from_dict(rule).apply(p)[None], m[None]).item()
                           for p, m in zip(maps, masks, strict=True)])) for rule in rules]
# ----------------------------------------------------------------------------- resume

def history_rows(run):
    return list(csv.DictReader(open(run / "history.csv")))


def assert_same_training(run_a, run_b):
    """Two runs trained alike: the same history (but timings) and the same final weights."""
    rows_a, rows_b = history_rows(run_a), history_rows(run_b)
    assert [row["epoch"] for row in rows_a] == [row["epoch"] for row in rows_b]
    for a, b in zip(rows_a, rows_b):
        for column in ("train_loss", "train_dice", "val_loss", "val_dice", "val_dice_pooled", "learning_rate"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-6), (column, a["epoch"])
    state_a = load_checkpoint(run_a / "last.pt").state
    state_b = load_checkpoint(run_b / "last.pt").state
    assert state_a.get("ema") == state_b.get("ema")  # EMA_DECAY: the average's update count
    for key in ("model", "trained_model"):  # with EMA_DECAY: the average, and the last step's weights
        assert (key in state_a) == (key in state_b), key
        for name, value in state_a.get(key, {}).items():
            assert torch.allclose(value.float(), state_b[key][name].float(), atol=1e-6), (key, name)


@pytest.mark.parametrize("workers, hard_sampling, balance_column, ema_decay",
                         [(0, 0.0, "", 0.0), (2, 0.0, "", 0.0), (2, 0.5, "", 0.0), (2, 0.0, "tumor_class", 0.0),
                          (0, 0.0, "", 0.5)])
def test_resumed_run_repeats_the_uninterrupted_one(demo_root, tmp_path, monkeypatch, capsys, workers, hard_sampling,
                                                   balance_column, ema_decay):
    """3 epochs in one go == 1 epoch, Ctrl-C in epoch 2, --resume: same history, weights and curves.

    With EMA_DECAY also the same average (weights and update count) and the same last step's weights.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--epochs", "3", *TINY,
            "--learning-rate", "0.01", "--lr-schedule", "cosine", "--aug-intensity", "true",
            "--num-workers", str(workers), "--hard-sampling", str(hard_sampling), "--balance-column", balance_column,
            "--ema-decay", str(ema_decay)]
    assert train.main([*args, "--run-name", "whole"]) == 0
    interrupt_at_epoch(monkeypatch, 2, KeyboardInterrupt())
    assert train.main([*args, "--run-name", "split"]) == 130
    monkeypatch.undo()
    assert len(history_rows(tmp_path / "split")) == 1
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "split")]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "decision rule:" in out
    assert_same_training(tmp_path / "whole", tmp_path / "split")
    if ema_decay:
        assert load_checkpoint(tmp_path / "split" / "last.pt").state["ema"]["updates"] == 3 * loaders.steps_per_epoch(
            len(json.loads((tmp_path / "split" / "split.json").read_text())["train"]), 8, 1)
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["stop_reason"] == "all 3 epochs"
    assert "decision_rule" in load_checkpoint(tmp_path / "split" / "best.pt").state
    events = EventAccumulator(str(tmp_path / "split")).Reload()
    # Each epoch once (purge_step dropped nothing twice). Sorted: in one test process both event files can
    # carry the same second and pid, and then their counters ("...2" after "...10") decide the file order.
    assert sorted(event.step for event in events.Scalars("dice/val")) == [1, 2, 3]


def test_hard_sampling_records_each_drawn_slices_loss_and_is_refused_under_torchrun(demo_root, tmp_path,
                                                                                     monkeypatch, capsys):
    args = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--epochs", "2", *TINY,
            "--learning-rate", "0.01", "--hard-sampling", "0.8"]
    assert train.main([*args, "--run-name", "hard"]) == 0
    state = load_checkpoint(tmp_path / "hard" / "last.pt").state
    losses = state["sampler"]["losses"]
    train_count = len(json.loads((tmp_path / "hard" / "split.json").read_text())["train"])
    assert losses.shape == (train_count,)
    seen = losses[~torch.isnan(losses)]
    assert len(seen) > train_count // 2 and (seen > 0).all()  # drawn with replacement: most, not all, slices
    assert json.loads((tmp_path / "hard" / "config.json").read_text())["HARD_SAMPLING"] == 0.8
    assert load_checkpoint(tmp_path / "hard" / "best.pt").state["config"]["HARD_SAMPLING"] == 0.8

    monkeypatch.setattr(train, "rank_and_world", lambda: (0, 2))  # as if started by torchrun with 2 processes
    capsys.readouterr()
    assert train.main([*args, "--run-name", "hard2"]) == 1
    err = capsys.readouterr().err
    assert "HARD_SAMPLING works in one process only" in err and "Traceback" not in err
    assert not (tmp_path / "hard2").exists()


def test_balanced_sampling_draws_each_class_equally_often_and_refuses_what_cannot_work(demo_root, tmp_path,
                                                                                      monkeypatch, capsys):
    import dataset
    from tumorseg.data import reading, sampling
    config = Config(DATA_ROOT=str(demo_root), IMAGE_SIZE=32, IN_CHANNELS=1, BATCH_SIZE=4,
                    BALANCE_COLUMN="tumor_class")
    data = dataset.load_dataset(demo_root, 32, 1)
    classes = [row["tumor_class"] for row in (reading.read_metadata(demo_root)[1][p.stem] for p in data.pairs)]
    train_idx = [i for i in range(len(data.pairs)) if classes[i] != "pituitary"][:14]  # 14 slices, skewed
    train_idx += [i for i, c in enumerate(classes) if c == "pituitary"][:2]
    loader, _ = loaders.make_loaders(data, train_idx, [0, 1], config)
    assert isinstance(loader.sampler, sampling.BalancedSampler)
    for _ in range(3):
        drawn = [classes[train_idx[i]] for i in loader.sampler]
        assert len(drawn) == 16 and sorted(drawn.count(c) for c in set(classes)) == [5, 5, 6]
    args = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", *TINY]
    assert train.main([*args, "--balance-column", "grade"]) == 1
    assert "no column 'grade'" in capsys.readouterr().err
    blanked = shutil.copytree(demo_root, tmp_path / "blanked")
    metadata = (blanked / "metadata.csv").read_text().splitlines()
    metadata[4] = ",".join(metadata[4].split(",")[:-1]) + ","  # the 4th image's tumor_class emptied
    (blanked / "metadata.csv").write_text("\n".join(metadata) + "\n")
    stem = metadata[4].split(",")[0]
    assert train.main([*args, "--data-root", str(blanked), "--balance-column", "tumor_class"]) == 1
    err = capsys.readouterr().err
    assert f"images/{stem}.png: no 'tumor_class' for image_id '{stem}'" in err and "Traceback" not in err
    monkeypatch.setattr(train, "rank_and_world", lambda: (0, 2))  # as if started by torchrun with 2 processes
    assert train.main([*args, "--balance-column", "tumor_class"]) == 1
    err = capsys.readouterr().err
    assert "BALANCE_COLUMN works in one process only" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder left


def test_sigkill_mid_epoch_then_resume_finishes_with_every_epoch_once(demo_root, tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    run = tmp_path / "k"
    # 64 px, batches of 2: an epoch lasts long enough to be killed in the middle of it.
    args = [sys.executable, str(ROOT / "train.py"), "--data-root", str(demo_root), "--runs-dir", str(tmp_path),
            "--run-name", "k", "--epochs", "3", *TINY, "--image-size", "64", "--batch-size", "2"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("epoch   1"):
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and len(history_rows(run)) < 3
    for checkpoint in ("best.pt", "last.pt"):
        assert load_checkpoint(run / checkpoint)
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [row["epoch"] for row in history_rows(run)] == ["1", "2", "3"]
    assert load_checkpoint(run / "last.pt").state["epoch"] == 3 and (run / "summary.json").is_file()
    assert not staging_left(run)


def test_resume_refuses_contradicting_flags_and_a_cosine_extension(demo_root, tmp_path, capsys):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "r",
                       "--epochs", "1", "--lr-schedule", "cosine", *TINY]) == 0
    before = (tmp_path / "r" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "r"), "--image-size", "64", "--batch-size", "8"]) == 1
    err = capsys.readouterr().err
    assert "--image-size 64 (the run has 32)" in err and "batch-size" not in err and "Traceback" not in err
    assert train.main(["--resume", str(tmp_path / "r"), "--epochs", "2"]) == 1
    assert "cosine" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "nowhere")]) == 1
    assert "not a run folder" in capsys.readouterr().err
    assert (tmp_path / "r" / "last.pt").read_bytes() == before


def test_resume_with_amp_auto_is_accepted_where_auto_gives_the_runs_precision(demo_root, tmp_path, monkeypatch,
                                                                                capsys):
    import utils

    monkeypatch.setattr(utils, "native_bf16", lambda device: True)  # a CPU with bf16 instructions
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "a",
                       "--epochs", "1", *TINY, "--amp", "auto"]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["AMP"] == "bf16"  # what auto resolved to
    assert train.main(["--resume", str(tmp_path / "a"), "--amp", "auto", "--epochs", "2"]) == 0
    assert [row["epoch"] for row in history_rows(tmp_path / "a")] == ["1", "2"]
    monkeypatch.setattr(utils, "native_bf16", lambda device: False)  # here auto would train in float32
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "a"), "--amp", "auto", "--epochs", "3"]) == 1
    assert "--amp auto (the run has bf16)" in capsys.readouterr().err


def test_resume_with_split_group_column_auto_is_accepted(demo_root, tmp_path):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "a",
                       "--epochs", "1", *TINY]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["SPLIT_GROUP_COLUMN"] == "patient_id"
    assert train.main(["--resume", str(tmp_path / "a"), "--split-group-column", "auto", "--epochs", "2"]) == 0
    assert train.main(["--resume", str(tmp_path / "a"), "--split-group-column", "none", "--epochs", "3"]) == 1


@pytest.mark.parametrize("flag", [["--tta", "true"], ["--prediction-root", "elsewhere"]])
def test_test_py_settings_are_refused_by_name(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--data-root", str(tmp_path / "none"), "--runs-dir", str(tmp_path), *flag])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: {flag[0]} is a test.py setting; train.py does not use it" in err
    assert not list(tmp_path.iterdir())


def test_a_run_folder_in_use_is_refused_and_freed_when_its_holder_ends(demo_root, tmp_path, capsys):
    from tumorseg.runs import runfolder

    args = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "r", "--epochs", "1", *TINY]
    assert train.main(args) == 0
    run = tmp_path / "r"
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    held = runfolder.lock_run_folder(run)  # as a run still training there would hold it
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert f"is in use by process {os.getpid()}" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files  # nothing touched
    held.close()
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 0
    assert len((run / "history.csv").read_text().splitlines()) == 3  # header and two epochs


def test_resume_of_a_finished_run_has_nothing_to_do_unless_extended(demo_root, tmp_path, capsys):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "f",
                       "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "f")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert [row["epoch"] for row in history_rows(tmp_path / "f")] == ["1"]
    assert train.main(["--resume", str(tmp_path / "f"), "--epochs", "2"]) == 0  # constant schedule: extended
    assert [row["epoch"] for row in history_rows(tmp_path / "f")] == ["1", "2"]
    assert json.loads((tmp_path / "f" / "config.json").read_text())["EPOCHS"] == 2
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["epochs_run"] == 2


def test_a_killed_extension_of_a_finished_run_is_an_unfinished_run(demo_root, tmp_path, monkeypatch, capsys):
    from tumorseg.runs.runfolder import is_unfinished_run, unfinished_run_warning
    run = tmp_path / "f"
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "f",
                       "--epochs", "1", *TINY]) == 0
    assert not is_unfinished_run(run)
    interrupt_at_epoch(monkeypatch, 1, KeyboardInterrupt())  # the extension's first epoch, epoch 2
    assert train.main(["--resume", str(run), "--epochs", "3"]) == 130
    assert is_unfinished_run(run) and not (run / "summary.json").exists()
    assert "unfinished run" in unfinished_run_warning(run / "best.pt")
    monkeypatch.undo()
    assert train.main(["--resume", str(run), "--epochs", "3"]) == 0  # finished again, its rule searched anew
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 3
    assert "decision rule:" in capsys.readouterr().out


def test_a_split_file_trains_exactly_its_lists(demo_root, tmp_path):
    stems = sorted(p.stem for p in (demo_root / "images").iterdir())
    lists = {"train": stems[:16], "val": stems[16:20], "test": stems[20:]}  # the demo's patients: 4 slices each
    (tmp_path / "splits.json").write_text(json.dumps({"folds": [{"train": [], "val": [], "test": []}, lists]}))
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "s",
                       "--split-file", str(tmp_path / "splits.json"), "--fold", "1", "--epochs", "1", *TINY]) == 0
    split = json.loads((tmp_path / "s" / "split.json").read_text())
    assert {role: split[role] for role in lists} == lists and split["test_fraction"] == 0.0


# ----------------------------------------------------------------------------- precision and speed


def test_training_with_bf16_and_channels_last_writes_a_usable_run(demo_root, tmp_path, capsys):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "fast",
                       "--epochs", "1", *TINY, "--amp", "bf16", "--channels-last", "true"]) == 0
    assert "AMP bf16, channels last" in capsys.readouterr().out
    loaded = load_checkpoint(tmp_path / "fast" / "best.pt")
    assert loaded.config.AMP == "bf16" and 0 <= loaded.state["metrics"]["dice"] <= 1


def test_auto_precision_is_recorded_as_what_ran(demo_root, tmp_path, monkeypatch, capsys):
    import utils

    monkeypatch.setattr(utils, "native_bf16", lambda device: False)  # e.g. an AVX2-only CPU
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "auto",
                       "--epochs", "1", *TINY, "--amp", "auto"]) == 0
    assert "AMP" not in capsys.readouterr().out.split("model:")[1].splitlines()[0]
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["AMP"] == "off"


def test_unsupported_precision_is_refused_before_any_run_folder(demo_root, tmp_path, monkeypatch, capsys):
    import utils

    def unsupported(device, amp):
        raise ValueError(f"AMP {amp!r} is not supported on {device} by this PyTorch (test); use --amp off")

    monkeypatch.setattr(utils, "check_amp", unsupported)
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "x",
                       "--epochs", "1", *TINY, "--amp", "fp16"])
    err = capsys.readouterr().err
    assert code == 1 and "'fp16' is not supported on cpu" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as stop:
        train.main(["--amp", "fp8"])
    assert stop.value.code == 2 and "'fp8' is not one of ('off', 'bf16', 'fp16', 'auto')" in capsys.readouterr().err
    monkeypatch.undo()  # the real check from here on, not the stand-in above
    real = utils.autocast  # an autocast that silently stays in float32 is caught by the dtype check
    monkeypatch.setattr(utils, "autocast", lambda device, amp: real(device, "off"))
    with pytest.raises(ValueError, match=r"AMP 'bf16' is not supported on cpu .*\(the convolution ran in "
                                         r"torch.float32\); use --amp off"):
        utils.check_amp(torch.device("cpu"), "bf16")


def test_emulated_precision_trains_with_a_warning_and_native_or_off_without(demo_root, tmp_path, monkeypatch,
                                                                              capsys):
    import utils
    cpu = torch.device("cpu")
    assert utils.check_amp(cpu, "off") is None
    monkeypatch.setattr(utils, "native_bf16", lambda device: True)  # e.g. AVX512-BF16
    assert utils.check_amp(cpu, "bf16") is None
    monkeypatch.setattr(utils, "native_bf16", lambda device: False)  # e.g. an AVX2-only CPU
    assert "emulated on this CPU" in utils.check_amp(cpu, "bf16")
    try:
        assert "emulated on a CPU" in utils.check_amp(cpu, "fp16")
    except ValueError as error:  # a PyTorch without fp16 on a CPU refuses it instead
        assert "not supported on cpu" in str(error)
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "slow",
                       "--epochs", "1", *TINY, "--amp", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "warning: AMP 'bf16' is emulated on this CPU" in err and "--amp auto" in err
    assert json.loads((tmp_path / "slow" / "config.json").read_text())["AMP"] == "bf16"  # warned, not changed


def test_compile_falls_back_to_the_plain_model_with_a_warning(demo_root, tmp_path, monkeypatch, capsys):
    class Uncompilable(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("InductorError: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Uncompilable())
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "c",
                       "--epochs", "1", *TINY, "--compile", "true"]) == 0
    err = capsys.readouterr().err
    assert "warning: COMPILE" in err and "no working C++ compiler" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / "c" / "last.pt").state["epoch"] == 1


# ----------------------------------------------------------------------------- weight average (EMA_DECAY)

def test_ema_off_trains_bit_identically_and_on_changes_only_what_is_validated_and_saved(demo_root, tmp_path):
    """--ema-decay 0 is the training without it; with an average the steps are the same, the saved model is not."""
    args = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--epochs", "2", *TINY,
            "--learning-rate", "0.01", "--search-rule", "false"]
    assert train.main([*args, "--run-name", "plain"]) == 0
    assert train.main([*args, "--run-name", "off", "--ema-decay", "0"]) == 0
    assert train.main([*args, "--run-name", "on", "--ema-decay", "0.5"]) == 0
    plain, off, on = (load_checkpoint(tmp_path / name / "last.pt").state for name in ("plain", "off", "on"))
    assert set(plain) == set(off) and not {"trained_model", "ema"} & set(off)  # the checkpoint as before
    for name, value in plain["model"].items():
        assert torch.equal(value, off["model"][name]), name  # bit for bit
        assert torch.equal(value, on["trained_model"][name]), name  # averaging never changes a step
    columns = ("train_loss", "train_dice", "val_loss", "val_dice", "val_dice_pooled", "learning_rate")
    rows = {name: [[row[c] for c in columns] for row in history_rows(tmp_path / name)] for name in ("plain", "off")}
    assert rows["plain"] == rows["off"]
    assert any(not torch.equal(value, on["model"][name]) for name, value in plain["model"].items())


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_ema_in_best_pt_is_the_average_of_every_steps_weights_and_validation_scored_it(demo_root, tmp_path,
                                                                                        monkeypatch):
    """The saved model is the hand-computed average (warm-up, then decay 0.3) of the weights after each step."""
    from torch.utils.data import DataLoader

    import dataset
    from losses import BCEDiceLoss
    weights, real_step = [], steps.train_step  # weights[0]: the initial ones, then after each step

    def recording_step(model, *args, **kwargs):
        weights.extend([snapshot(model)] if not weights else [])
        result = real_step(model, *args, **kwargs)
        weights.append(snapshot(model))
        return result

    monkeypatch.setattr(steps, "train_step", recording_step)
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "avg",
                       "--epochs", "2", *TINY, "--learning-rate", "0.01", "--ema-decay", "0.3",
                       "--search-rule", "false"]) == 0
    run = tmp_path / "avg"
    epoch_steps = (len(weights) - 1) // 2  # per epoch
    assert epoch_steps >= 2 and len(weights) == 1 + 2 * epoch_steps  # 4 updates at least: d_3 = min(0.3, 4/13) is capped
    average, by_epoch = weights[0], {}
    for k, after in enumerate(weights[1:]):  # update k: d_k = min(0.3, (1 + k) / (10 + k))
        decay = min(0.3, (1 + k) / (10 + k))
        average = {name: decay * average[name] + (1 - decay) * after[name] for name in after}
        if (k + 1) % epoch_steps == 0:
            by_epoch[(k + 1) // epoch_steps] = average
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    for loaded in (best, last):  # what test.py, export.py and the rule's search load
        expected = by_epoch[loaded.state["epoch"]]
        for name, value in loaded.model.named_parameters():
            assert torch.allclose(value, expected[name], atol=1e-6), name
            assert not torch.allclose(value, loaded.state["trained_model"][name], atol=1e-6), name
    for name, value in weights[-1].items():
        assert torch.equal(last.state["trained_model"][name], value), name  # the last step's, kept for --resume
    # Validation scored the average: best.pt's stored metrics are its model's on the validation images.
    data = dataset.load_dataset(demo_root, 32, 1)
    val_stems = json.loads((run / "split.json").read_text())["val"]
    val_idx = [i for i, pair in enumerate(data.pairs) if pair.stem in val_stems]
    loader = DataLoader(dataset.SegmentationDataset(data.images[val_idx], data.masks[val_idx], "zscore"),
                        batch_size=8)
    scores, _ = steps.evaluate(best.model, loader, BCEDiceLoss(), "cpu", 0.5, "val")
    for name in ("loss", "dice", "dice_pooled"):
        assert best.state["metrics"][name] == pytest.approx(scores[name], abs=1e-6), name


def test_ema_with_compile_validates_the_compiled_average_without_compiling_again_each_epoch(demo_root, tmp_path,
                                                                                           monkeypatch):
    """The average's copy is compiled once, at the start; later epochs reuse its graph (its weights change in place)."""
    graphs, real_compile, real_evaluate, built = [], torch.compile, steps.evaluate, {}

    def counting_backend(graph_module, example_inputs):  # dynamo calls it once per graph it compiles
        graphs.append(graph_module)
        return graph_module.forward

    def evaluate(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        built.setdefault("graphs_after_each_validation", []).append(len(graphs))
        return result

    def runnable_models(*args, **kwargs):
        built["evaluated"], built["trained"], built["ema"] = result = real_runnable(*args, **kwargs)
        return result

    real_runnable = train.runnable_models
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counting_backend))
    monkeypatch.setattr(steps, "evaluate", evaluate)
    monkeypatch.setattr(train, "runnable_models", runnable_models)
    torch._dynamo.reset()
    try:
        assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "ce",
                           "--epochs", "3", *TINY, "--compile", "true", "--ema-decay", "0.5",
                           "--search-rule", "false"]) == 0
    finally:
        torch._dynamo.reset()
    assert built["evaluated"]._orig_mod is built["ema"].module  # validation runs the compiled average
    assert built["trained"]._orig_mod is not built["ema"].module
    after = built["graphs_after_each_validation"]
    assert len(after) == 3 and after[0] == after[-1], after  # nothing compiled after the first epoch


# ----------------------------------------------------------------------------- several processes

@pytest.mark.parametrize("ema", [[], ["--ema-decay", "0.5"]], ids=["plain", "ema"])
def test_two_gloo_processes_write_one_complete_run_scored_on_every_validation_image(demo_root, tmp_path, ema):
    """torchrun with 2 CPU processes: one run folder, and its checkpoint's scores are the whole validation set's.

    With EMA_DECAY each process validates its own copy of the average: the scores agree with rank 0's saved
    average only if every process kept the same one (weights and BatchNorm statistics).
    """
    import os
    import subprocess
    import sys

    from torch.utils.data import DataLoader

    import dataset
    from conftest import ROOT
    from losses import BCEDiceLoss
    run = tmp_path / "ddp"
    # 5 validation images: the processes score 3 and 2, none twice.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), "--data-root", str(demo_root), "--runs-dir", str(tmp_path),
                           "--run-name", "ddp", "--epochs", "1", *TINY, "--learning-rate", "0.01",
                           "--device", "cpu", "--split-group-column", "none", "--test-fraction", "0", *ema],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1 and done.stdout.count("epoch   1") == 1  # one process speaks
    for name in ("config.json", "split.json", "history.csv", "summary.json", "decision_rule.json", "best.pt",
                 "last.pt"):
        assert (run / name).is_file(), name
    writers = {p.name.split(".")[-2] for p in run.glob("events.out.tfevents.*")}  # ...<host>.<pid>.<n>
    assert len(writers) == 1 and len(history_rows(run)) == 1  # one process wrote TensorBoard (curves, HParams)
    assert not staging_left(run)

    loaded = load_checkpoint(run / "best.pt")
    assert len(loaded.state["rng"]) == 2  # each process's random streams, for an exact resume
    assert ("ema" in loaded.state) == bool(ema)
    data = dataset.load_dataset(demo_root, 32, 1)
    val_stems = json.loads((run / "split.json").read_text())["val"]
    val_idx = [i for i, pair in enumerate(data.pairs) if pair.stem in val_stems]
    assert len(val_idx) == 5
    loader = DataLoader(dataset.SegmentationDataset(data.images[val_idx], data.masks[val_idx], "zscore"), batch_size=8)
    single, _ = steps.evaluate(loaded.model, loader, BCEDiceLoss(), "cpu", 0.5, "val")
    for name in ("loss", "dice", "iou", "pixel_accuracy", "dice_pooled"):
        assert loaded.state["metrics"][name] == pytest.approx(single[name], abs=1e-6), name


def test_disk_cache_defaults_to_the_runs_folder_and_trains_like_memory(demo_root, tmp_path):
    args = ["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--epochs", "1", *TINY]
    assert train.main([*args, "--run-name", "mem"]) == 0
    assert train.main([*args, "--run-name", "disk", "--cache", "disk"]) == 0
    assert len(list((tmp_path / ".cache").iterdir())) == 1  # the shared data may be read-only: never written there
    assert_same_training(tmp_path / "mem", tmp_path / "disk")


# ----------------------------------------------------------------------------- patient split by default

def test_split_defaults_to_patient_id_and_random_split_warns(demo_root, tmp_path, capsys):
    """Without --split-group-column, metadata.csv's patient_id groups the split; 'none' splits by slice, warned."""
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "auto",
                       "--epochs", "1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "split by patient ('patient_id'" in out
    assert json.loads((tmp_path / "auto" / "split.json").read_text())["group_column"] == "patient_id"
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["SPLIT_GROUP_COLUMN"] == "patient_id"
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "random",
                       "--epochs", "1", "--split-group-column", "none", *TINY]) == 0
    err = capsys.readouterr().err
    assert "split by random slice (--split-group-column none)" in err and "inflated" in err
    assert json.loads((tmp_path / "random" / "split.json").read_text())["group_column"] == ""


def test_old_configs_with_an_empty_split_column_read_as_random():
    config, _ = Config.from_saved({"SPLIT_GROUP_COLUMN": ""})
    assert config.SPLIT_GROUP_COLUMN == "none"


def test_held_out_masks_choose_nothing(demo_root, tmp_path):
    """Blank masks for the held-out patients: same chosen epoch, same decision rule, same weights."""
    blanked = tmp_path / "blanked"
    shutil.copytree(demo_root, blanked)
    args = ["--runs-dir", str(tmp_path / "runs"), "--epochs", "4", "--learning-rate", "0.01", *TINY]
    assert train.main(["--data-root", str(demo_root), "--run-name", "original", *args]) == 0
    held_out = json.loads((tmp_path / "runs" / "original" / "split.json").read_text())["test"]
    assert held_out
    for stem in held_out:
        mask = blanked / "masks" / f"{stem}.png"
        assert np.asarray(Image.open(mask)).any()  # the change is real: these masks had tumour
        Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    assert train.main(["--data-root", str(blanked), "--run-name", "blanked", *args]) == 0
    runs = [tmp_path / "runs" / name for name in ("original", "blanked")]
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    assert summaries[0]["best_epoch"] == summaries[1]["best_epoch"]
    assert summaries[0]["decision_rule"]["rule"] == summaries[1]["decision_rule"]["rule"]
    scores = [[(row["train_loss"], row["val_loss"], row["val_dice"]) for row in history_rows(run)] for run in runs]
    assert scores[0] == scores[1]
    weights = [load_checkpoint(run / "best.pt").state["model"] for run in runs]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    split = json.loads((runs[0] / "split.json").read_text())
    assert set(split["roles"]) == {"train", "val", "test"}
    every_image = sorted(p.stem for p in (demo_root / "images").iterdir())
    assert sorted(split["train"] + split["val"] + split["test"]) == every_image


def test_fold_column_holds_out_that_fold_and_a_patient_in_two_folds_is_refused(demo_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    rows = list(csv.DictReader(open(data / "metadata.csv")))
    for row in rows:
        row["fold"] = str(int(row["patient_id"][1:]) % 3 + 1)  # patients p000..p005 in folds 1, 2, 3
    def write(rows):
        with open(data / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write(rows)
    args = ["--data-root", str(data), "--runs-dir", str(tmp_path / "runs"), "--fold-column", "fold", *TINY,
            "--epochs", "1"]
    assert train.main([*args, "--fold", "1", "--run-name", "f1"]) == 0
    split = json.loads((tmp_path / "runs" / "f1" / "split.json").read_text())
    assert sorted(split["test"]) == sorted(r["image_id"] for r in rows if r["fold"] == "2")
    rows[0]["fold"] = "3"  # p000's first slice moves to another fold than its other slices
    write(rows)
    assert train.main([*args, "--fold", "0", "--run-name", "crossing"]) == 1
    err = capsys.readouterr().err
    assert "p000 in folds 1, 3" in err and not (tmp_path / "runs" / "crossing").exists()


# ----------------------------------------------------------------------------- type head and space-to-depth stem


def test_type_head_trains_with_the_segmentation_and_its_classes_go_into_the_checkpoint(demo_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-name", "typed", "--epochs", "6",
                       "--type-column", "tumor_class", "--type-weight", "0.5", "--search-rule", "false", *TINY])
    assert code == 0
    assert "type head on 'tumor_class' (glioma, meningioma, pituitary; weight 0.5)" in capsys.readouterr().out
    losses = [float(row["train_loss"]) for row in history_rows(runs / "typed")]
    assert losses[-1] < losses[0], losses
    loaded = load_checkpoint(runs / "typed" / "last.pt")
    assert loaded.state["model_args"]["type_classes"] == ["glioma", "meningioma", "pituitary"]
    assert loaded.model.type_classes == ("glioma", "meningioma", "pituitary") and "stem" not in loaded.state["model_args"]
    assert loaded.config.TYPE_COLUMN == "tumor_class" and loaded.config.TYPE_WEIGHT == 0.5
    logits, type_logits = loaded.model.eval()(torch.randn(2, 1, 32, 32), return_type=True)
    assert logits.shape == (2, 1, 32, 32) and type_logits.shape == (2, 3)


def test_a_missing_type_column_is_refused_before_any_run_folder(demo_root, tmp_path, capsys):
    code = train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1",
                       "--type-column", "grade", *TINY])
    assert code == 1 and "no column 'grade'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_space_to_depth_stem_trains_at_twice_the_size(demo_root, tmp_path):
    runs = tmp_path / "runs"
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-name", "stem", "--epochs", "2",
                       "--stem", "space_to_depth", "--search-rule", "false", *TINY]) == 0
    loaded = load_checkpoint(runs / "stem" / "best.pt")
    assert loaded.state["model_args"]["stem"] == "space_to_depth" and "type_classes" not in loaded.state["model_args"]
    assert loaded.model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="STEM space_to_depth"):
        Config(IMAGE_SIZE=4, DEPTH=2, STEM="space_to_depth")


def test_deep_supervision_trains_and_its_checkpoint_predicts_with_the_plain_single_output(demo_root, tmp_path):
    runs = tmp_path / "runs"
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-name", "deep", "--epochs", "2",
                       "--deep-supervision", "1", *TINY]) == 0  # DEPTH 2: one head, at 1/2 resolution
    best = load_checkpoint(runs / "deep" / "best.pt")  # as test.py and export.py load it, flag still on
    assert best.state["model_args"]["deep_supervision"] == 1 and best.config.DEEP_SUPERVISION == 1
    assert {"deep_heads.0.weight", "deep_heads.0.bias"} <= set(best.state["model"])
    assert "decision_rule" in best.state  # the rule search predicted the validation images with it
    assert best.model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    test_script = load_script(ROOT / "test.py")
    assert test_script.main(["--checkpoint", str(runs / "deep" / "best.pt"), "--data-root", str(demo_root),
                             "--subset", "test", "--report", "false",
                             "--prediction-root", str(tmp_path / "predictions")]) == 0


def test_type_head_on_real_slices_beats_chance_on_held_out_patients(real_subset, tmp_path):
    """~260 real slices at 48 px, 10 epochs (~15 s on one core): the held-out patients' types, better than
    always answering their most common type (measured: 0.67 against 0.44)."""
    test_script = load_script(ROOT / "test.py")
    assert train.main(["--data-root", str(real_subset), "--runs-dir", str(tmp_path), "--run-name", "typed",
                       "--split-group-column", "patient_id", "--image-size", "48", "--base-channels", "8",
                       "--depth", "3", "--in-channels", "1", "--normalization", "zscore", "--epochs", "10",
                       "--lr-schedule", "cosine", "--type-column", "tumor_class", "--type-weight", "1.0",
                       "--search-rule", "false"]) == 0
    assert test_script.main(["--checkpoint", str(tmp_path / "typed" / "last.pt"), "--data-root", str(real_subset),
                             "--prediction-root", str(tmp_path / "pred"), "--subset", "test", "--report", "false"]) == 0
    types = json.loads((tmp_path / "pred" / "typed" / "summary.json").read_text())["type_classification"]
    counts = [sum(row) for row in types["per_image"]["confusion_matrix"]]
    assert types["per_image"]["accuracy"] > max(counts) / sum(counts), types


