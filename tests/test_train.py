import csv
import json
import shutil

import torch
from PIL import Image

import train
from utils import load_checkpoint

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
    assert set(train.HISTORY_COLUMNS) == set(history[0])
    assert json.loads((run / "config.json").read_text())["IMAGE_SIZE"] == 32
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 24 and not set(split["train"]) & set(split["val"])
    model, config, checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["epoch"] == 2 and config.BASE_CHANNELS == 4 and "optimizer" in checkpoint
    best = load_checkpoint(run / "best.pt")[2]
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
    torch.set_num_threads(2)
    code = train.main(["--data-root", str(real_subset), "--runs-dir", str(tmp_path), "--run-name", "real",
                       "--split-group-column", "approx_patient", "--image-size", "64", "--base-channels", "8",
                       "--in-channels", "1", "--normalization", "zscore", "--epochs", "30",
                       "--time-limit-minutes", "1.5"])
    assert code == 0
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    split = json.loads((tmp_path / "real" / "split.json").read_text())
    groups = {row["image_id"]: row["approx_patient"] for row in csv.DictReader(open(real_subset / "metadata.csv"))}
    assert not {groups[s] for s in split["train"]} & {groups[s] for s in split["val"]}
    assert summary["best_val_dice"] >= 0.2, summary


def test_cosine_schedule_decays_the_learning_rate_to_zero(demo_root, tmp_path):
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(tmp_path), "--run-name", "cos",
                       "--epochs", "3", "--lr-schedule", "cosine", "--learning-rate", "0.01", *TINY]) == 0
    rates = [float(row["learning_rate"]) for row in csv.DictReader(open(tmp_path / "cos" / "history.csv"))]
    assert 0.01 > rates[0] > rates[1] > rates[2] and rates[2] < 1e-9
