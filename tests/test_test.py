"""test.py: outputs at native resolution, metrics against original masks, and every failure mode."""

import csv
import errno
import functools
import json
import math
import os
import pickle
import shutil
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from tumorseg.inference import predict
import train
from config import Config
from conftest import ROOT, link_subset, load_script
import dataset
from metrics import dice_per_image, iou_per_image
from tumorseg import files
from tumorseg.data import reading
from tumorseg.data.reading import read_mask
from tumorseg.evaluation import evaluate
from tumorseg.evaluation.image_report import per_image_report
from tumorseg.files import staging_host
from tumorseg.inference import outputs
from tumorseg.runs.checkpoints import LoadedCheckpoint, load_checkpoint

test_script = load_script(ROOT / "test.py")


@pytest.fixture(scope="session")
def tiny_run(demo_root, tmp_path_factory):
    """A checkpoint trained briefly at 32 px on the synthetic set."""
    runs = tmp_path_factory.mktemp("runs")
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-name", "tiny",
                       "--epochs", "3", "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--in-channels", "1", "--normalization", "zscore"]) == 0
    return runs / "tiny"


@pytest.fixture
def mixed_sizes(demo_root, tmp_path):
    """Demo slices resized to 200x240 (W x H) and 512x512, masks resized with them."""
    root = tmp_path / "mixed"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for stem, size in (("demo_0000", (200, 240)), ("demo_0001", (512, 512)), ("demo_0002", (512, 512))):
        Image.open(demo_root / "images" / f"{stem}.png").resize(size, Image.Resampling.BILINEAR).save(
            root / "images" / f"{stem}.png")
        Image.open(demo_root / "masks" / f"{stem}.png").resize(size, Image.Resampling.NEAREST).save(
            root / "masks" / f"{stem}.png")
    return root


def run_test(*args: str) -> int:
    return test_script.main([str(a) for a in args])


def check_outputs_match_metrics(out, data_root):
    """Every output at its image's size, masks strictly 0/255, metrics.csv equal to a recomputation."""
    rows = {r["image"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    for image_path in sorted((data_root / "images").iterdir()):
        stem, size = image_path.stem, Image.open(image_path).size
        for sub in ("masks", "segmented", "overlays"):
            assert Image.open(out / sub / f"{stem}.png").size == size, (sub, stem)
        predicted = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert set(np.unique(predicted)) <= {0, 255}
        truth = read_mask(data_root / "masks" / f"{stem}.png")
        assert float(rows[stem]["dice"]) == pytest.approx(dice_per_image(predicted[None] > 0, truth[None]).item())
        assert float(rows[stem]["iou"]) == pytest.approx(iou_per_image(predicted[None] > 0, truth[None]).item())
        assert int(rows[stem]["gt_pixels"]) == truth.sum() and int(rows[stem]["pred_pixels"]) == (predicted > 0).sum()
        for key, value in per_image_report(predicted > 0, truth).items():  # every column, undefined ones empty
            if key == "category":
                assert rows[stem][key] == value
            elif math.isnan(value):
                assert rows[stem][key] == "", (stem, key)
            else:
                assert float(rows[stem][key]) == pytest.approx(value), (stem, key)
    return rows


def test_mixed_sizes_give_native_resolution_outputs_and_matching_metrics(tiny_run, mixed_sizes, tmp_path):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    out = preds / "tiny"
    rows = check_outputs_match_metrics(out, mixed_sizes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 3 and summary["image_size"] == 32 and summary["checkpoint_epoch"] >= 1
    assert summary["dice_mean"] == pytest.approx(np.mean([float(r["dice"]) for r in rows.values()]))
    for key in ("dice_median", "dice_std", "iou_mean", "dice_pooled", "pixel_accuracy", "wall_seconds",
                "images_per_second", "threshold", "checkpoint"):
        assert key in summary
    # segmented: black outside the prediction, the image inside it
    seg = np.asarray(Image.open(out / "segmented" / "demo_0001.png"))
    predicted = np.asarray(Image.open(out / "masks" / "demo_0001.png")) > 0
    assert not seg[~predicted].any()


def test_tta_run_writes_the_same_outputs(tiny_run, mixed_sizes, tmp_path):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--tta", "true") == 0
    check_outputs_match_metrics(preds / "tiny", mixed_sizes)
    assert json.loads((preds / "tiny" / "summary.json").read_text())["tta"] is True


@pytest.mark.parametrize("native", [True, False])
def test_bf16_channels_last_inference_matches_float32(tiny_run, mixed_sizes, tmp_path, monkeypatch, capsys, native):
    import utils
    monkeypatch.setattr(utils, "native_bf16", lambda device: native)  # a CPU with or without bf16 instructions
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--amp", "bf16", "--channels-last", "true", "--report", "false") == 0
    assert ("warning: AMP 'bf16' is emulated on this CPU" in capsys.readouterr().err) is not native
    check_outputs_match_metrics(preds / "tiny", mixed_sizes)
    summary = json.loads((preds / "tiny" / "summary.json").read_text())
    assert (summary["amp"], summary["channels_last"]) == ("bf16", True)
    loaded = load_checkpoint(tiny_run / "best.pt")
    images = [reading.read_image(p, loaded.config.IN_CHANNELS) for p in sorted((mixed_sizes / "images").iterdir())]
    plain = predict.native_probabilities(loaded.model, loaded.config, images, torch.device("cpu"))
    loaded.model.to(memory_format=torch.channels_last)
    fast = predict.native_probabilities(loaded.model, loaded.config, images, torch.device("cpu"), amp="bf16",
                                          channels_last=True)
    for a, b in zip(plain, fast, strict=True):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        assert np.abs(a - b).max() < 0.05 and not np.array_equal(a, b)  # bf16 really ran, and stays close


def test_threaded_writing_gives_the_same_outputs_as_a_sequential_run(tiny_run, mixed_sizes, tmp_path, monkeypatch):
    args = ["--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--tta", "true", "--report", "false"]
    assert outputs.WRITE_THREADS > 0 and outputs.PNG_COMPRESS_LEVEL != 6
    assert run_test(*args, "--prediction-root", tmp_path / "threaded") == 0
    # as test.py wrote before: inline, PIL's default compression
    monkeypatch.setattr(evaluate, "predict_and_write",
                        functools.partial(evaluate.predict_and_write, write_threads=0, compress_level=6))
    assert run_test(*args, "--prediction-root", tmp_path / "sequential") == 0
    threaded, sequential = tmp_path / "threaded" / "tiny", tmp_path / "sequential" / "tiny"
    for sub in (*outputs.OUTPUT_FOLDERS, "uncertainty"):
        names = sorted(p.name for p in (sequential / sub).iterdir())
        assert names and names == sorted(p.name for p in (threaded / sub).iterdir())
        for name in names:
            assert np.array_equal(np.asarray(Image.open(threaded / sub / name)),
                                  np.asarray(Image.open(sequential / sub / name))), (sub, name)
    assert (threaded / "metrics.csv").read_text() == (sequential / "metrics.csv").read_text()
    timing = {"wall_seconds", "images_per_second"}
    summaries = [{k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k not in timing}
                 for out in (threaded, sequential)]
    assert summaries[0] == summaries[1]


def test_predict_only_without_masks(tiny_run, mixed_sizes, tmp_path):
    shutil.rmtree(mixed_sizes / "masks")
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    out = preds / "tiny"
    assert len(list((out / "masks").iterdir())) == 3 and not (out / "metrics.csv").exists()
    assert "dice_mean" not in json.loads((out / "summary.json").read_text())


def test_newest_run_is_the_default_and_reruns_never_mix(tiny_run, mixed_sizes, tmp_path):
    preds = tmp_path / "preds"
    args = ["--runs-dir", tiny_run.parent, "--data-root", mixed_sizes, "--prediction-root", preds]
    assert run_test(*args) == 0 and (preds / "tiny" / "metrics.csv").exists()
    (preds / "tiny" / "stale.txt").write_text("old")
    assert run_test(*args) == 0 and (preds / "tiny-2" / "metrics.csv").exists()
    assert run_test(*args, "--overwrite") == 0
    assert not (preds / "tiny" / "stale.txt").exists() and (preds / "tiny" / "metrics.csv").exists()


def test_the_newest_run_if_unfinished_is_used_with_a_warning_and_the_resume_command(tiny_run, mixed_sizes, tmp_path,
                                                                                     capsys):
    runs = tmp_path / "runs"
    killed = runs / "killed"
    shutil.copytree(tiny_run, killed)
    (killed / "summary.json").unlink()  # as a kill -9 leaves it: best.pt and last.pt of epoch 2 of 6
    last = torch.load(killed / "last.pt", weights_only=True)
    last["epoch"], last["config"]["EPOCHS"] = 2, 6
    torch.save(last, killed / "last.pt")
    preds = tmp_path / "preds"
    assert run_test("--runs-dir", runs, "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    err = capsys.readouterr().err
    assert f"warning: {killed} is an unfinished run (epoch 2 of 6, no summary.json)" in err, err
    assert f"`python train.py --resume {killed}`" in err and "pass --checkpoint" in err
    assert run_test("--checkpoint", killed / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    assert "unfinished" not in capsys.readouterr().err  # a checkpoint chosen by name: no warning
    assert run_test("--runs-dir", tiny_run.parent, "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    assert "unfinished" not in capsys.readouterr().err  # a finished run


def test_subset_test_scores_only_the_held_out_images(tiny_run, demo_root, tmp_path, capsys):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--subset", "test") == 0
    split = json.loads((tiny_run / "split.json").read_text())
    assert sorted(r["image"] for r in csv.DictReader(open(preds / "tiny" / "metrics.csv"))) == sorted(split["test"])
    assert "optimistic" not in capsys.readouterr().err
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--subset", "val") == 0  # the inner validation patients: scored, with a warning
    assert sorted(r["image"] for r in csv.DictReader(open(preds / "tiny-2" / "metrics.csv"))) == sorted(split["val"])
    assert "chose its epoch and decision rule" in capsys.readouterr().err
    training_only = tmp_path / "training_only"  # an existing folder holding none of the validation images
    for sub in ("images", "masks"):
        (training_only / sub).mkdir(parents=True)
        for stem in json.loads((tiny_run / "split.json").read_text())["train"][:3]:
            shutil.copy(demo_root / sub / f"{stem}.png", training_only / sub / f"{stem}.png")
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", training_only, "--subset", "test",
                    "--prediction-root", preds) == 1
    assert "'test' images is in this folder" in capsys.readouterr().err


def test_subset_test_of_a_run_without_held_out_patients_is_refused(tiny_run, demo_root, tmp_path, capsys):
    """A run folder from before held-out patients (split.json without 'test'): refused, with what to do."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    split = json.loads((old / "split.json").read_text())
    del split["test"]
    (old / "split.json").write_text(json.dumps(split))
    assert run_test("--checkpoint", old / "best.pt", "--data-root", demo_root, "--prediction-root",
                    tmp_path / "preds", "--subset", "test") == 1
    assert "no held-out patients" in capsys.readouterr().err and not (tmp_path / "preds").exists()


def test_scores_per_metadata_group(tiny_run, demo_root, tmp_path, capsys):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--group-by", "tumor_class") == 0
    out = preds / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    classes = {r["image_id"]: r["tumor_class"] for r in csv.DictReader(open(demo_root / "metadata.csv"))}
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    groups = summary["by_group"]["groups"]
    assert summary["by_group"]["column"] == "tumor_class" and set(groups) == set(classes.values())
    for name, scores in groups.items():
        dice = [float(r["dice"]) for r in rows if classes[r["image"]] == name]
        assert scores["count"] == len(dice) and scores["dice_mean"] == pytest.approx(np.mean(dice))
    assert "tumor_class glioma" in capsys.readouterr().out
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--group-by", "scanner") == 1
    assert "no column 'scanner'" in capsys.readouterr().err


def test_unreadable_image_is_skipped_by_name_and_exit_code_says_so(tiny_run, mixed_sizes, tmp_path, capsys):
    (mixed_sizes / "images" / "demo_0002.png").write_bytes(b"garbage")
    preds = tmp_path / "preds"
    code = run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds)
    assert code == 2
    assert "demo_0002.png" in capsys.readouterr().err
    assert sorted(p.name for p in (preds / "tiny" / "masks").iterdir()) == ["demo_0000.png", "demo_0001.png"]


def test_a_broken_link_among_the_images_is_named_and_exit_code_says_so(tiny_run, mixed_sizes, tmp_path, capsys):
    link = mixed_sizes / "images" / "demo_0002.png"
    link.unlink()
    link.symlink_to(tmp_path / "gone.png")
    preds = tmp_path / "preds"
    code = run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds)
    captured = capsys.readouterr()
    assert code == 2
    assert f"warning: {link}: skipped, broken link (target missing: {tmp_path / 'gone.png'})" in captured.err
    assert f"images:     2 from {mixed_sizes}, 1 more skipped (named below)" in captured.out
    summary = json.loads((preds / "tiny" / "summary.json").read_text())
    assert summary["count"] == 2 and any("demo_0002.png: skipped, broken link" in p for p in summary["problems"])
    assert sorted(p.name for p in (preds / "tiny" / "masks").iterdir()) == ["demo_0000.png", "demo_0001.png"]
    only_links = tmp_path / "only_links"
    (only_links / "images").mkdir(parents=True)
    (only_links / "images" / "a.png").symlink_to(tmp_path / "gone.png")
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", only_links,
                    "--prediction-root", preds) == 1
    assert "no .png/.jpg/.jpeg images or NIfTI/DICOM volumes; a.png: broken link" in capsys.readouterr().err


def test_a_broken_link_outside_the_subset_is_not_counted_against_it(tiny_run, demo_root, tmp_path, capsys):
    split = json.loads((tiny_run / "split.json").read_text())
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    for stem in (split["train"][0], split["test"][0]):
        (data / "images" / f"{stem}.png").unlink()
        (data / "images" / f"{stem}.png").symlink_to(tmp_path / "gone.png")
    code = run_test("--checkpoint", tiny_run / "best.pt", "--data-root", data, "--subset", "test",
                    "--prediction-root", tmp_path / "preds")
    err = capsys.readouterr().err
    assert code == 2 and f"{split['test'][0]}.png: skipped, broken link" in err
    assert f"{split['train'][0]}.png" not in err


def test_image_without_mask_is_predicted_but_not_scored(tiny_run, mixed_sizes, tmp_path, capsys):
    (mixed_sizes / "masks" / "demo_0000.png").unlink()
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    assert "no mask for 'demo_0000'" in capsys.readouterr().err
    summary = json.loads((preds / "tiny" / "summary.json").read_text())
    assert (summary["count"], summary["scored"]) == (3, 2)
    assert (preds / "tiny" / "masks" / "demo_0000.png").exists()


def test_images_sharing_a_stem_are_refused(tiny_run, mixed_sizes, tmp_path, capsys):
    Image.open(mixed_sizes / "images" / "demo_0000.png").save(mixed_sizes / "images" / "demo_0000.jpg")
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes,
                    "--prediction-root", tmp_path / "preds") == 1
    assert "share the stem(s) demo_0000" in capsys.readouterr().err


def test_no_checkpoint_found(tmp_path, mixed_sizes, capsys):
    assert run_test("--runs-dir", tmp_path / "empty", "--data-root", mixed_sizes) == 1
    assert "no run with a best.pt" in capsys.readouterr().err
    assert run_test("--checkpoint", tmp_path / "missing.pt", "--data-root", mixed_sizes) == 1
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err


def test_weights_that_do_not_fit_their_config(tiny_run, mixed_sizes, tmp_path, capsys):
    checkpoint = torch.load(tiny_run / "best.pt", weights_only=True)
    checkpoint["model_args"]["base_channels"] = 8
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    assert run_test("--checkpoint", tmp_path / "mismatch.pt", "--data-root", mixed_sizes,
                    "--prediction-root", tmp_path / "preds") == 1
    assert "weights do not fit" in capsys.readouterr().err
    assert not (tmp_path / "preds").exists()


def test_unwritable_output_folder(tiny_run, mixed_sizes, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes,
                    "--prediction-root", blocker / "preds") == 1
    assert "cannot write predictions" in capsys.readouterr().err


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle file, on purpose
def test_checkpoint_crafted_to_run_code_is_refused(tmp_path, mixed_sizes, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": {}, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    for path in ("evil.pt", "evil.pkl"):
        assert run_test("--checkpoint", tmp_path / path, "--data-root", mixed_sizes) == 1
        err = capsys.readouterr().err
        assert "cannot be loaded safely" in err or "not a checkpoint written by torch.save" in err
    assert not marker.exists()


def test_real_model_at_128px_predicts_512px_slices(real_root, tmp_path):
    """Trained at 128 px on the shared 256 px slices, run on 512 px copies: outputs and scores at 512 px."""
    stems = sorted(p.stem for p in (real_root / "images").iterdir())[:40]
    train_root = link_subset(real_root, tmp_path / "train", stems[:32])
    assert train.main(["--data-root", str(train_root), "--runs-dir", str(tmp_path / "runs"), "--run-name", "r128",
                       "--epochs", "1", "--image-size", "128", "--base-channels", "4", "--depth", "3",
                       "--in-channels", "1", "--normalization", "zscore"]) == 0
    big = tmp_path / "big"
    for sub in ("images", "masks"):
        (big / sub).mkdir(parents=True)
    for stem in stems[32:36]:
        Image.open(real_root / "images" / f"{stem}.png").resize((512, 512), Image.Resampling.BICUBIC).save(
            big / "images" / f"{stem}.png")
        Image.open(real_root / "masks" / f"{stem}.png").resize((512, 512), Image.Resampling.NEAREST).save(
            big / "masks" / f"{stem}.png")
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tmp_path / "runs" / "r128" / "best.pt", "--data-root", big,
                    "--prediction-root", preds) == 0
    rows = check_outputs_match_metrics(preds / "r128", big)
    assert len(rows) == 4


def test_bare_checkpoint_name_inside_the_run_folder_never_replaces_other_runs(tiny_run, mixed_sizes, tmp_path,
                                                                            monkeypatch):
    preds = tmp_path / "preds"
    (preds / "other-run").mkdir(parents=True)
    (preds / "other-run" / "summary.json").write_text("{}")
    monkeypatch.chdir(tiny_run)
    args = ["--checkpoint", "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds]
    assert run_test(*args) == 0 and run_test(*args, "--overwrite") == 0
    assert (preds / "other-run" / "summary.json").exists()
    assert sorted(p.name for p in preds.iterdir()) == ["other-run", "tiny"]


@pytest.mark.parametrize("fault", ["Ctrl-C", "disk error"])
def test_an_overwrite_interrupted_or_failing_while_swapping_keeps_the_earlier_predictions(
        tiny_run, mixed_sizes, tmp_path, monkeypatch, capsys, fault):
    preds = tmp_path / "preds"
    args = ["--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
            "--report", "false"]
    assert run_test(*args) == 0
    (preds / "tiny" / "notes.txt").write_text("earlier")
    earlier = {p.relative_to(preds): p.read_bytes() for p in sorted(preds.rglob("*")) if p.is_file()}
    real_put_in_place = files.put_in_place

    def swapped_then_stopped(swap, overwrite):  # the new folder is in place, the earlier one not yet deleted
        real_put_in_place(swap, overwrite)
        if fault == "Ctrl-C":
            raise KeyboardInterrupt
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "put_in_place", swapped_then_stopped)
    assert run_test(*args, "--overwrite") == (130 if fault == "Ctrl-C" else 1)
    assert "nothing was written; earlier predictions are untouched" in capsys.readouterr().err
    assert {p.relative_to(preds): p.read_bytes() for p in sorted(preds.rglob("*")) if p.is_file()} == earlier
    assert [p.name for p in preds.iterdir()] == ["tiny"]  # no staging folder left


def test_overwrite_refuses_a_folder_that_is_not_a_prediction_output(tiny_run, mixed_sizes, tmp_path, capsys):
    preds = tmp_path / "preds"
    (preds / "tiny").mkdir(parents=True)
    (preds / "tiny" / "thesis.tex").write_text("precious")
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--overwrite") == 1
    assert "not a test.py output" in capsys.readouterr().err and (preds / "tiny" / "thesis.tex").exists()


def test_a_live_runs_staging_folder_is_left_alone(tiny_run, mixed_sizes, tmp_path):
    preds = tmp_path / "preds"
    live = preds / f".tiny.{staging_host()}.1.0123abcd.partial"  # pid 1 always runs: another test.py still writing
    (live / "masks").mkdir(parents=True)
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    assert live.exists()


def test_full_disk_while_writing_leaves_nothing_and_says_so(tiny_run, mixed_sizes, tmp_path, monkeypatch, capsys):
    import errno
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    saved = []
    real_save = Image.Image.save

    def save_until_full(self, path, *args, **kwargs):
        saved.append(path)
        if len(saved) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--overwrite") == 1
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "Traceback" not in err
    assert sorted(p.name for p in preds.iterdir()) == ["tiny"]  # the earlier output, intact, no staging
    assert len(list((preds / "tiny" / "masks").iterdir())) == 3


def test_ctrl_c_leaves_no_partial_output(tiny_run, mixed_sizes, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict", interrupted)
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 130
    assert "interrupted" in capsys.readouterr().err and list(preds.iterdir()) == []


def test_sigterm_mid_output_cleans_up_like_ctrl_c(tiny_run, mixed_sizes, tmp_path, monkeypatch, capsys):
    import os
    import signal
    real_predict = predict.predict

    def terminated_after_the_first_batch(*args, **kwargs):
        for number, result in enumerate(real_predict(*args, **kwargs)):
            if number == 1:  # the first batch's files are being written: a real SIGTERM to this process
                os.kill(os.getpid(), signal.SIGTERM)
            yield result

    monkeypatch.setattr(predict, "predict", terminated_after_the_first_batch)
    preds = tmp_path / "preds"
    handler_before = signal.getsignal(signal.SIGTERM)
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--batch-size", "1") == 143
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM): nothing was written" in err and "Traceback" not in err
    assert list(preds.iterdir()) == []  # no staging folder, no half output
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the previous handler is back


@pytest.mark.parametrize("flag", [["--image-size", "512"], ["--epochs", "3"], ["--in-channels", "3"],
                                  ["--learning-rate", "0.1"]])
def test_training_keys_are_refused(tiny_run, mixed_sizes, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, *flag)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def predict_with_edited_checkpoint(checkpoint: dict, data_root, tmp_path, *flags) -> dict:
    """Save `checkpoint` as tmp_path/run/best.pt, run test.py on data_root, return its summary.json."""
    (tmp_path / "run").mkdir(exist_ok=True)
    torch.save(checkpoint, tmp_path / "run" / "best.pt")
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tmp_path / "run" / "best.pt", "--data-root", data_root,
                    "--prediction-root", preds, *flags) == 0
    newest = max(preds.iterdir(), key=lambda p: (p / "summary.json").stat().st_mtime)
    return json.loads((newest / "summary.json").read_text())


def test_threshold_comes_from_the_checkpoint_unless_given(tiny_run, mixed_sizes, tmp_path):
    checkpoint = torch.load(tiny_run / "best.pt", weights_only=True)
    checkpoint["config"]["THRESHOLD"] = 0.8
    del checkpoint["decision_rule"]  # as written with SEARCH_RULE false
    preds = tmp_path / "preds"
    summary = predict_with_edited_checkpoint(checkpoint, mixed_sizes, tmp_path)
    assert (summary["threshold"], summary["decision_rule_source"]) == (0.8, "checkpoint THRESHOLD")
    assert run_test("--checkpoint", tmp_path / "run" / "best.pt", "--data-root", mixed_sizes,
                    "--prediction-root", preds, "--threshold", "0.3") == 0
    summary = json.loads((preds / "run-2" / "summary.json").read_text())
    assert summary["threshold"] == 0.3 and summary["decision_rule_source"].endswith("--threshold")


def test_the_rule_chosen_on_validation_is_applied_by_default(tiny_run, mixed_sizes, tmp_path):
    """train.py stored a rule; test.py applies it unless --postprocess none, and says so in summary.json."""
    from tumorseg.inference.postprocess import DecisionRule
    checkpoint = torch.load(tiny_run / "best.pt", weights_only=True)
    stored = DecisionRule.from_dict(checkpoint["decision_rule"])
    assert json.loads((tiny_run / "decision_rule.json").read_text())["rule"] == stored.to_dict()
    rule = DecisionRule(threshold=0.35, keep_largest=True)
    checkpoint["decision_rule"] = rule.to_dict()
    preds = tmp_path / "preds"
    summary = predict_with_edited_checkpoint(checkpoint, mixed_sizes, tmp_path)
    assert summary["decision_rule"] == rule.to_dict() and summary["decision_rule_source"].startswith("checkpoint")
    for mask_path in (preds / "run" / "masks").iterdir():  # at most one component each
        from scipy import ndimage
        assert ndimage.label(np.asarray(Image.open(mask_path)) > 0, np.ones((3, 3)))[1] <= 1
    assert run_test("--checkpoint", tmp_path / "run" / "best.pt", "--data-root", mixed_sizes,
                    "--prediction-root", preds, "--postprocess", "none") == 0
    summary = json.loads((preds / "run-2" / "summary.json").read_text())
    assert summary["decision_rule"] == DecisionRule(threshold=0.35).to_dict()


def test_an_ensemble_averages_its_members(tiny_run, mixed_sizes, tmp_path):
    preds = tmp_path / "preds"
    best = tiny_run / "best.pt"
    assert run_test("--checkpoint", best, best, "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    assert run_test("--checkpoint", best, "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    single, pair = preds / "tiny", preds / "tiny-ensemble2"
    assert len(json.loads((pair / "summary.json").read_text())["ensemble"]) == 2
    for mask_path in (single / "masks").iterdir():  # two copies of one model average to that model
        assert np.array_equal(np.asarray(Image.open(mask_path)), np.asarray(Image.open(pair / "masks" / mask_path.name)))


def test_scoring_training_images_is_counted_and_said(tiny_run, demo_root, tmp_path, capsys):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds) == 0
    train_stems = json.loads((tiny_run / "split.json").read_text())["train"]
    summary = json.loads((preds / "tiny" / "summary.json").read_text())
    assert summary["training_images_scored"] == len(train_stems) > 0
    assert f"{len(train_stems)} of the 24 scored images were training images" in capsys.readouterr().err
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--subset", "test") == 0
    assert json.loads((preds / "tiny-2" / "summary.json").read_text())["training_images_scored"] == 0


def test_training_images_and_unscored_ones_are_told_by_the_stems_the_run_paired(tiny_run, mixed_sizes, tmp_path,
                                                                                  capsys):
    nfd = unicodedata.normalize("NFD", "tumeur_é")  # 'é' as two code points, as macOS names files
    for sub in ("images", "masks"):
        os.rename(mixed_sizes / sub / "demo_0000.png", mixed_sizes / sub / "case.01.png")  # a dot in the stem
        os.rename(mixed_sizes / sub / "demo_0001.png", mixed_sizes / sub / f"{nfd}.png")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "best.pt", run / "best.pt")
    (run / "split.json").write_text(json.dumps({  # as train.py writes it: stems in NFC
        "train": ["case.01", unicodedata.normalize("NFC", nfd)], "val": ["demo_0002"],
        "data_root": str(mixed_sizes.resolve())}))
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--report", "false") == 0
    summary = json.loads((preds / "run" / "summary.json").read_text())
    assert summary["scored"] == 3 and summary["training_images_scored"] == 2
    assert not any("not scored" in problem for problem in summary["problems"])
    assert "2 of the 3 scored images were training images" in capsys.readouterr().err


def test_other_data_than_the_training_folder_is_noted(tiny_run, mixed_sizes, tmp_path):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    summary = json.loads((preds / "tiny" / "summary.json").read_text())
    assert summary["training_images_scored"] is None and "not the folder" in summary["training_overlap_note"]


def test_file_names_that_are_not_utf8(tiny_run, mixed_sizes, tmp_path):
    odd = os.fsdecode(b"scan_\xff\xfe")
    for sub in ("images", "masks"):
        os.rename(mixed_sizes / sub / "demo_0000.png", mixed_sizes / sub / f"{odd}.png")
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds) == 0
    assert (preds / "tiny" / "masks" / f"{odd}.png").exists()
    assert b"scan_\xff\xfe" in (preds / "tiny" / "metrics.csv").read_bytes()


def test_unusable_device_is_explained(tiny_run, mixed_sizes, tmp_path, capsys):
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--device", "gpu0",
                    "--prediction-root", tmp_path / "preds") == 1
    assert "gpu0" in capsys.readouterr().err and not (tmp_path / "preds").exists()


def test_training_and_test_py_prepare_one_file_identically(demo_root, tmp_path):
    """One file gives the identical model input through the training path and the inference path."""
    from config import Config
    for crop in (False, True):
        config = Config(IMAGE_SIZE=48, IN_CHANNELS=1, NORMALIZATION="zscore", CROP=crop)
        data = dataset.load_dataset(demo_root, config.IMAGE_SIZE, config.IN_CHANNELS, crop=config.CROP,
                                    crop_margin=config.CROP_MARGIN)
        training_input = dataset.SegmentationDataset(data.images, data.masks, config.NORMALIZATION)[3][0]
        image = reading.read_image(data.pairs[3].image_path, config.IN_CHANNELS)
        inference_input, _ = predict.prepare_image(image, config)
        assert torch.equal(training_input, inference_input)


def test_a_head_cropped_model_writes_native_size_outputs_that_match_its_metrics(demo_root, mixed_sizes, tmp_path):
    runs = tmp_path / "runs"
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-name", "crop",
                       "--epochs", "2", "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--in-channels", "1", "--normalization", "zscore", "--crop", "true"]) == 0
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", runs / "crop" / "best.pt", "--data-root", mixed_sizes,
                    "--prediction-root", preds) == 0
    check_outputs_match_metrics(preds / "crop", mixed_sizes)


# ---- issue 9: metrics, groups and strata, uncertainty, report, comparing runs

def metrics_rows(folder):
    return list(csv.DictReader(open(folder / "metrics.csv", newline="")))


def write_metadata(root, rows):
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_summary_counts_every_image_once_and_undefined_values_apart(tiny_run, demo_root, tmp_path):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--threshold", "0.001") == 0  # a very low threshold: large masks, so distances are defined
    rows, summary = metrics_rows(preds / "tiny"), json.loads((preds / "tiny" / "summary.json").read_text())
    assert sum(summary["failure_counts"].values()) == len(rows) == summary["scored"]
    assert [rule["category"] for rule in summary["failure_rules"]] == list(summary["failure_counts"])
    for key, stats in summary["metrics"].items():
        assert stats["count"] + stats["count_undefined"] == len(rows), key
    empty = sum(int(r["pred_pixels"]) == 0 or int(r["gt_pixels"]) == 0 for r in rows)
    assert summary["metrics"]["hd95_px"]["count_undefined"] == empty < len(rows)
    defined = [float(r["hd95_px"]) for r in rows if r["hd95_px"]]
    assert summary["metrics"]["hd95_px"]["mean"] == pytest.approx(np.mean(defined))
    size = summary["strata"]["tumour_size"]
    low, high = size["edges_px"]
    for row in rows:
        area = int(row["gt_pixels"])
        assert row["tumour_size"] == ("small" if area <= low else "medium" if area <= high else "large")
    assert sum(g["count"] for g in size["groups"].values()) == len(rows) and list(size["groups"])[0] == "small"
    assert 0 <= summary["calibration"]["ece"] <= 1 and sum(summary["calibration"]["counts"]) > 0
    assert (preds / "tiny" / "report.html").is_file()


def test_pixel_spacing_in_mm_from_a_value_or_a_metadata_column(tiny_run, mixed_sizes, tmp_path, capsys):
    preds = tmp_path / "preds"
    common = ["--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
              "--threshold", "0.001", "--report", "false"]
    assert run_test(*common, "--pixel-spacing-mm", "0.5") == 0
    rows = metrics_rows(preds / "tiny")
    assert all(r["hd95_px"] for r in rows)
    for row in rows:
        assert float(row["hd95_mm"]) == pytest.approx(0.5 * float(row["hd95_px"]))
        assert float(row["assd_mm"]) == pytest.approx(0.5 * float(row["assd_px"]))
    assert json.loads((preds / "tiny" / "summary.json").read_text())["pixel_spacing_source"] == "--pixel-spacing-mm 0.5"
    spacing = {"demo_0000": "0.25", "demo_0001": "2", "demo_0002": ""}
    write_metadata(mixed_sizes, [{"image_id": stem, "mm": value} for stem, value in spacing.items()])
    assert run_test(*common, "--spacing-column", "mm") == 1  # demo_0002 has none, and no fallback
    assert "metadata.csv: no 'mm' value for image_id 'demo_0002'" in capsys.readouterr().err
    assert run_test(*common, "--spacing-column", "mm", "--pixel-spacing-mm", "4") == 0
    for row in metrics_rows(preds / "tiny-2"):
        assert float(row["hd95_mm"]) == pytest.approx(float(spacing[row["image"]] or 4) * float(row["hd95_px"]))
    write_metadata(mixed_sizes, [{"image_id": stem, "mm": "-1"} for stem in spacing])
    assert run_test(*common, "--spacing-column", "mm") == 1
    assert "'mm' of image_id 'demo_0000' is '-1', not a pixel size in mm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_test(*common, "--pixel-spacing-mm", "nan")
    assert exit_info.value.code == 2 and "expected a positive number" in capsys.readouterr().err
    assert sorted(p.name for p in preds.iterdir()) == ["tiny", "tiny-2"]  # refusals write nothing


def test_pixel_spacing_as_rows_by_columns_gives_distances_on_non_square_pixels(tiny_run, mixed_sizes, tmp_path,
                                                                              capsys):
    """--pixel-spacing-mm ROWSxCOLS (and such a metadata.csv value) measures each axis in its own size."""
    preds = tmp_path / "preds"
    common = ["--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
              "--threshold", "0.001", "--report", "false"]
    assert run_test(*common, "--pixel-spacing-mm", "0.5x2") == 0
    rows = metrics_rows(preds / "tiny")
    assert json.loads((preds / "tiny" / "summary.json").read_text())["pixel_spacing_source"] == \
        "--pixel-spacing-mm 0.5x2.0"
    for row in rows:
        predicted = read_mask(preds / "tiny" / "masks" / f"{row['image']}.png").astype(bool)
        truth = read_mask(mixed_sizes / "masks" / f"{row['image']}.png").astype(bool)
        expected = per_image_report(predicted, truth, (0.5, 2.0))
        assert float(row["hd95_mm"]) == pytest.approx(expected["hd95_mm"])
        assert float(row["assd_mm"]) == pytest.approx(expected["assd_mm"])
    assert any(float(r["hd95_mm"]) != pytest.approx(1.25 * float(r["hd95_px"])) for r in rows)  # not the mean
    assert run_test(*common, "--pixel-spacing-mm", "0.5 x 0.5") == 0  # an equal pair is the square size
    assert run_test(*common, "--pixel-spacing-mm", "0.5") == 0
    for square_pair, square in zip(metrics_rows(preds / "tiny-2"), metrics_rows(preds / "tiny-3"), strict=True):
        assert (square_pair["hd95_mm"], square_pair["assd_mm"]) == (square["hd95_mm"], square["assd_mm"])
    write_metadata(mixed_sizes, [{"image_id": stem, "mm": "0.5x2"} for stem in ("demo_0000", "demo_0001")])
    assert run_test(*common, "--spacing-column", "mm", "--pixel-spacing-mm", "0.5X2") == 0
    assert [r["hd95_mm"] for r in metrics_rows(preds / "tiny-4")] == [r["hd95_mm"] for r in rows]
    for bad in ("0.5x", "x2", "1x2x3", "0.5,2", "0.5x-2", "0.5xnan"):
        with pytest.raises(SystemExit) as exit_info:
            run_test(*common, "--pixel-spacing-mm", bad)
        assert exit_info.value.code == 2
        assert f"or rows x columns (e.g. 0.9x1.2), got {bad!r}" in capsys.readouterr().err
    write_metadata(mixed_sizes, [{"image_id": "demo_0000", "mm": "2x"}])
    assert run_test(*common, "--spacing-column", "mm", "--pixel-spacing-mm", "1") == 1
    assert "'mm' of image_id 'demo_0000' is '2x', not a pixel size in mm (one positive number (square pixels, " \
           "e.g. 0.98) or rows x columns (e.g. 0.9x1.2))" in capsys.readouterr().err


def test_scores_per_patient_by_default_and_per_stratum(tiny_run, demo_root, tmp_path, capsys):
    run = tmp_path / "grouped"  # tiny_run as if trained with --split-group-column patient_id
    shutil.copytree(tiny_run, run)
    split = json.loads((run / "split.json").read_text())
    (run / "split.json").write_text(json.dumps({**split, "group_column": "patient_id", "data_root": str(demo_root)}))
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--strata", "tumor_class", "--threshold", "0.001") == 0
    summary, rows = json.loads((preds / "grouped" / "summary.json").read_text()), metrics_rows(preds / "grouped")
    assert summary["by_group"]["column"] == "patient_id" and "patient_id p000" in capsys.readouterr().out
    for patient, scores in summary["by_group"]["groups"].items():
        members = [r for r in rows if r["patient_id"] == patient]
        overlap = sum(int(r["overlap_pixels"]) for r in members)
        pixels = sum(int(r["gt_pixels"]) + int(r["pred_pixels"]) for r in members)
        assert scores["count"] == len(members) == 4
        assert scores["dice_mean"] == pytest.approx(np.mean([float(r["dice"]) for r in members]))
        assert scores["dice_pooled"] == pytest.approx(2 * overlap / pixels)  # all its pixels together
    classes = summary["strata"]["tumor_class"]["groups"]
    assert set(classes) == {r["tumor_class"] for r in rows} and sum(g["count"] for g in classes.values()) == 24
    failures = summary["failure_counts_by_stratum"]["tumor_class"]  # as metrics.csv's categories tell
    assert list(failures) == list(classes)
    for value, counts in failures.items():
        assert counts == {name: sum(r["category"] == name for r in rows if r["tumor_class"] == value)
                          for name in summary["failure_counts"]}
    assert run_test("--checkpoint", run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--group-by", "", "--report", "false") == 0
    without = json.loads((preds / "grouped-2" / "summary.json").read_text())
    assert "by_group" not in without and list(without["failure_counts_by_stratum"]) == ["tumour_size"]
    other = tmp_path / "other"  # data without that column: a note, no groups
    shutil.copytree(demo_root, other)
    write_metadata(other, [{"image_id": r["image_id"], "site": "a"}
                           for r in csv.DictReader(open(demo_root / "metadata.csv"))])
    assert run_test("--checkpoint", run / "best.pt", "--data-root", other, "--prediction-root", preds,
                    "--report", "false") == 0
    assert "not grouping by the run's split column 'patient_id'" in capsys.readouterr().out
    write_metadata(other, [{"image_id": r["image_id"], "dice": "x"}
                           for r in csv.DictReader(open(demo_root / "metadata.csv"))])
    assert run_test("--checkpoint", run / "best.pt", "--data-root", other, "--prediction-root", preds,
                    "--strata", "dice") == 1
    assert "--strata dice: metrics.csv already has a column of that name" in capsys.readouterr().err


def dihedral_invariant_model() -> torch.nn.Module:
    """A 1x1 convolution: each pixel's output depends on that pixel alone, so every flip and turn gives the same map."""
    model = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(-1.0)
    return model


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_views_that_agree_have_no_uncertainty_at_any_image_size(mixed_sizes, amp):
    config = Config(IMAGE_SIZE=32, IN_CHANNELS=1, NORMALIZATION="zscore", DEPTH=1)  # the images: 200x240, 512
    member = LoadedCheckpoint(dihedral_invariant_model(), config, {}, [])
    images, masks = predict.find_images(mixed_sizes)
    options = Config(TTA=True, AMP=amp, BATCH_SIZE=2)
    for models in ([member], [member, member]):  # TTA alone, and an ensemble of one model twice
        predictions = list(predict.predict(models, images, masks, torch.device("cpu"), options, True, []))
        assert len(predictions) == 3
        for p in predictions:
            assert p.spread.shape == p.probability.shape and p.spread.dtype == np.float32
            assert p.spread.max() < 1e-6, (p.stem, p.spread.max())
            assert p.probability.max() - p.probability.min() > 0.5  # the map changes: edges are there to light up


def test_tta_writes_uncertainty_maps_and_scores(tiny_run, mixed_sizes, tmp_path):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--tta", "true", "--threshold", "0.001") == 0
    out = preds / "tiny"
    for image_path in (mixed_sizes / "images").iterdir():
        shown = Image.open(out / "uncertainty" / image_path.name)
        assert shown.size == Image.open(image_path).size and shown.mode == "RGB"
    rows = metrics_rows(out)
    assert all(0 <= float(r["uncertainty"]) <= 0.5 for r in rows)
    uncertainty = json.loads((out / "summary.json").read_text())["uncertainty"]
    assert uncertainty["poor_images"] == sum(float(r["dice"]) < 0.5 for r in rows)
    assert set(uncertainty) >= {"spearman_with_dice", "auroc_poor", "region_min_probability"}
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--report", "false") == 0
    assert not (preds / "tiny-2" / "uncertainty").exists() and "uncertainty" not in metrics_rows(preds / "tiny-2")[0]
    assert not (preds / "tiny-2" / "report.html").exists()


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_an_ensemble_of_one_model_twice_is_certain(tiny_run, mixed_sizes, tmp_path, amp):
    preds = tmp_path / "preds"
    best = tiny_run / "best.pt"
    assert run_test("--checkpoint", best, best, "--data-root", mixed_sizes, "--prediction-root", preds,
                    "--threshold", "0.001", "--report", "false", "--amp", amp) == 0
    assert all(float(r["uncertainty"]) < 1e-6 for r in metrics_rows(preds / "tiny-ensemble2"))
    for path in (preds / "tiny-ensemble2" / "uncertainty").iterdir():
        assert np.asarray(Image.open(path)).max() == 0
    loaded = load_checkpoint(best)  # the maps themselves, finer than the PNGs' 256 levels
    images, masks = predict.find_images(mixed_sizes)
    options = Config(AMP=amp, BATCH_SIZE=2)
    for p in predict.predict([loaded, loaded], images, masks, torch.device("cpu"), options, True, []):
        assert p.spread.max() < 1e-6, (p.stem, p.spread.max())


def test_compare_two_prediction_folders(tiny_run, mixed_sizes, tmp_path, capsys):
    preds = tmp_path / "preds"
    for threshold in ("0.001", "0.3"):
        assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root",
                        preds, "--threshold", threshold, "--report", "false") == 0
    capsys.readouterr()
    a, b = preds / "tiny", preds / "tiny-2"
    assert run_test("--compare", a, b) == 0
    out = capsys.readouterr().out
    dice_a = {r["image"]: float(r["dice"]) for r in metrics_rows(a)}
    differences = [float(r["dice"]) - dice_a[r["image"]] for r in metrics_rows(b)]
    assert f"mean difference {np.mean(differences):+.4f}" in out and "3 images in both" in out
    assert "Wilcoxon signed-rank test" in out and all(name in out for name in dice_a)
    assert run_test("--compare", a, a) == 0
    assert "B better on 0, worse on 0, equal on 3" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.csv").write_text("image,dice\nsomething_else,0.5\n")
    assert run_test("--compare", a, other) == 1
    assert "share no scored image" in capsys.readouterr().err
    (other / "metrics.csv").write_text("image,dice\ndemo_0000,high\n")
    assert run_test("--compare", a, other) == 1
    assert "metrics.csv: line 2: Dice 'high' is not a number" in capsys.readouterr().err
    (other / "metrics.csv").unlink()
    assert run_test("--compare", a, other) == 1
    assert f"{other / 'metrics.csv'}: not found" in capsys.readouterr().err


def write_scored_folder(folder, dice, patients=None, data_root=None):
    """A prediction folder as --compare reads it: metrics.csv (with patient_id if given), summary.json's data_root."""
    folder.mkdir(parents=True)
    rows = [{"image": image, "dice": value, **({"patient_id": patients[image]} if patients else {})}
            for image, value in dice.items()]
    write_metadata(folder, rows)
    (folder / "metrics.csv").write_text((folder / "metadata.csv").read_text())
    (folder / "metadata.csv").unlink()
    if data_root is not None:
        (folder / "summary.json").write_text(json.dumps({"data_root": str(data_root)}))
    return folder


def test_compare_pairs_patients_not_their_slices(tmp_path, capsys):
    from tumorseg.evaluation.stats import paired_comparison
    patients = {f"p0_s{i:02d}": "p0" for i in range(20)}  # one patient's 20 slices, all better in B
    patients |= {f"p{p}_s{i}": f"p{p}" for p in range(1, 6) for i in range(2)}
    rng = np.random.default_rng(0)
    dice_a = {image: float(rng.uniform(0.3, 0.6)) for image in patients}
    dice_b = {image: value + (0.2 if patients[image] == "p0" else float(rng.uniform(-0.05, 0.05)))
              for image, value in dice_a.items()}
    means = {side: {p: np.mean([d[i] for i in patients if patients[i] == p]) for p in set(patients.values())}
             for side, d in (("a", dice_a), ("b", dice_b))}
    per_patient = paired_comparison([means["b"][p] - means["a"][p] for p in sorted(means["a"])])
    per_slice = paired_comparison([dice_b[i] - dice_a[i] for i in patients])
    assert per_patient["wilcoxon_p"] != pytest.approx(per_slice["wilcoxon_p"], rel=1e-3)
    a = write_scored_folder(tmp_path / "a", dice_a, patients)
    b = write_scored_folder(tmp_path / "b", dice_b, patients)
    assert run_test("--compare", a, b) == 0
    out = capsys.readouterr().out
    assert "paired per patient: 6 patients (patient_id of " in out and "30 images in both" in out
    assert f"p = {per_patient['wilcoxon_p']:.4g}" in out
    assert f"B better on {per_patient['b_better']}, worse on {per_patient['b_worse']}, equal on 0" in out
    assert out.index("p0_s00") > out.index("per-image Dice")  # the per-image table is still listed
    # the same patients from the data root's metadata.csv: summary.json's, or --data-root's
    data = tmp_path / "data"
    data.mkdir()
    write_metadata(data, [{"image_id": image, "patient_id": patient} for image, patient in patients.items()])
    a2, b2 = (write_scored_folder(tmp_path / name, d, data_root=data) for name, d in (("a2", dice_a), ("b2", dice_b)))
    assert run_test("--compare", a2, b2) == 0
    out = capsys.readouterr().out
    assert f"paired per patient: 6 patients (patient_id of {data / 'metadata.csv'})" in out
    assert f"p = {per_patient['wilcoxon_p']:.4g}" in out
    a3, b3 = (write_scored_folder(tmp_path / name, d) for name, d in (("a3", dice_a), ("b3", dice_b)))
    assert run_test("--compare", a3, b3, "--data-root", data) == 0
    assert f"p = {per_patient['wilcoxon_p']:.4g}" in capsys.readouterr().out
    # without any patient column: per image, and said so
    assert run_test("--compare", a3, b3) == 0
    out = capsys.readouterr().out
    assert "paired per image: 30 images, no patient_id known" in out
    assert f"p = {per_slice['wilcoxon_p']:.4g}" in out
    assert run_test("--compare", a3, b3, "--data-root", tmp_path) == 1  # asked for, but no metadata.csv there
    assert f"{tmp_path / 'metadata.csv'}: cannot read it for --compare" in capsys.readouterr().err
    # one image's patient unknown in both (an empty cell): per image, since its slices cannot be pooled
    unknown = {image: ("" if image == "p3_s1" else patient) for image, patient in patients.items()}
    a5, b5 = (write_scored_folder(tmp_path / name, d, unknown) for name, d in (("a5", dice_a), ("b5", dice_b)))
    assert run_test("--compare", a5, b5) == 0
    assert "paired per image: 30 images, 1 of 30 images without a known patient_id" in capsys.readouterr().out
    # A and B disagree about a patient: refused
    moved = {**patients, "p0_s05": "p1"}
    assert run_test("--compare", a, write_scored_folder(tmp_path / "b4", dice_b, moved)) == 1
    assert "image p0_s05 is patient_id 'p0' in A" in capsys.readouterr().err

def test_training_logs_hparams_for_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    events = EventAccumulator(str(tiny_run))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["IMAGE_SIZE"].number_value == 32 and hparams["NORMALIZATION"].string_value == "zscore"
    assert "hparam/best_val_dice" in events.Tags()["scalars"]


def test_class_mix_reweights_the_per_class_means_and_the_tail_share_is_given(tiny_run, demo_root, tmp_path, capsys):
    preds = tmp_path / "preds"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--class-mix", "tumor_class:glioma=3,meningioma=1") == 0
    summary = json.loads((preds / "tiny" / "summary.json").read_text())
    classes = {r["image_id"]: r["tumor_class"] for r in csv.DictReader(open(demo_root / "metadata.csv"))}
    rows = list(csv.DictReader(open(preds / "tiny" / "metrics.csv")))
    mean = {c: np.mean([float(r["dice"]) for r in rows if classes[r["image"]] == c]) for c in ("glioma", "meningioma")}
    assert summary["class_mix"]["dice_mean"] == pytest.approx(0.75 * mean["glioma"] + 0.25 * mean["meningioma"])
    assert summary["share_dice_below_tail"] == pytest.approx(np.mean([float(r["dice"]) < 0.3 for r in rows]))
    assert "class-mix Dice" in capsys.readouterr().out
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", preds,
                    "--class-mix", "tumor_class:astrocytoma=1") == 1
    assert "no image here has tumor_class = astrocytoma" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--class-mix", "tumor_class:glioma=-1")


@pytest.mark.parametrize("script", ["train.py", "test.py", "bench.py", "prepare_data.py"])
def test_each_script_runs_from_the_command_line(script):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


# ----------------------------------------------------------------------------- type head


@pytest.fixture(scope="session")
def typed_run(demo_root, tmp_path_factory):
    """A checkpoint with a tumour-type head (TYPE_COLUMN tumor_class), trained briefly at 32 px."""
    runs = tmp_path_factory.mktemp("typed_runs")
    assert train.main(["--data-root", str(demo_root), "--runs-dir", str(runs), "--run-name", "typed",
                       "--epochs", "3", "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--in-channels", "1", "--normalization", "zscore", "--type-column", "tumor_class",
                       "--split-group-column", "patient_id"]) == 0
    return runs / "typed"


def test_a_type_head_adds_its_answer_per_image_and_the_confusion_matrices(typed_run, demo_root, tmp_path):
    out = tmp_path / "pred"
    assert run_test("--checkpoint", typed_run / "best.pt", "--data-root", demo_root, "--prediction-root", out) == 0
    folder = out / "typed"
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    classes = ["glioma", "meningioma", "pituitary"]
    assert len(rows) == 24 and all(row["predicted_type"] in classes for row in rows)
    assert all(1 / 3 <= float(row["type_probability"]) <= 1 for row in rows)
    metadata = reading.read_metadata(demo_root)[1]
    truth = {stem: row["tumor_class"] for stem, row in metadata.items()}
    types = json.loads((folder / "summary.json").read_text())["type_classification"]
    assert types["column"] == "tumor_class" and types["classes"] == classes
    per_image = types["per_image"]
    matrix = np.array(per_image["confusion_matrix"])  # rows: true type, columns: predicted type
    assert per_image["classes"] == classes and per_image["count"] == 24
    assert matrix.sum(axis=1).tolist() == [sum(value == name for value in truth.values()) for name in classes]
    assert matrix.sum(axis=0).tolist() == [sum(row["predicted_type"] == name for row in rows) for name in classes]
    assert per_image["accuracy"] == pytest.approx(np.trace(matrix) / 24)
    assert per_image["accuracy"] == pytest.approx(np.mean([row["predicted_type"] == truth[row["image"]]
                                                           for row in rows]))
    recalls = [matrix[i, i] / matrix[i].sum() for i in range(3) if matrix[i].sum()]
    assert per_image["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    per_patient = types["per_patient"]
    patients = {row["patient_id"] for row in metadata.values()}
    assert per_patient["group_column"] == "patient_id" and per_patient["count"] == len(patients) == 6
    assert sum(map(sum, per_patient["confusion_matrix"])) == 6 and "majority" in per_patient["vote"]
    page = (folder / "report.html").read_text()
    assert '<th data-type="text">predicted_type</th><th data-type="num">type probability</th>' in page


def test_a_checkpoint_without_a_head_loads_and_predicts_as_before(tiny_run, demo_root, tmp_path):
    from model import UNet
    loaded = load_checkpoint(tiny_run / "best.pt")
    args = loaded.state["model_args"]
    assert set(args) == {"name", "in_channels", "base_channels", "depth", "bilinear"}  # as checkpoints always held
    assert loaded.model.type_classes == () and not hasattr(loaded.model, "type_head") and loaded.warnings == []
    reference = UNet(args["in_channels"], args["base_channels"], args["depth"], args["bilinear"])
    reference.load_state_dict(loaded.state["model"])  # strict: the same weights, no more, no fewer
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(loaded.model.eval()(x), reference.eval()(x))
    assert predict.head_classes([loaded]) == ()
    out = tmp_path / "pred"
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", demo_root, "--prediction-root", out) == 0
    assert "predicted_type" not in next(csv.DictReader(open(out / "tiny" / "metrics.csv")))
    assert "type_classification" not in json.loads((out / "tiny" / "summary.json").read_text())


def test_a_type_head_without_the_column_in_metadata_still_answers_per_image(typed_run, demo_root, tmp_path):
    data = tmp_path / "nometa"
    shutil.copytree(demo_root, data)
    (data / "metadata.csv").unlink()
    out = tmp_path / "pred"
    assert run_test("--checkpoint", typed_run / "best.pt", "--data-root", data, "--prediction-root", out) == 0
    assert "predicted_type" in next(csv.DictReader(open(out / "typed" / "metrics.csv")))
    assert "type_classification" not in json.loads((out / "typed" / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- volumes


@pytest.fixture(scope="session")
def real_tiny_run(real_root, tmp_path_factory):
    """A small model trained for one epoch at 64 px on 32 real slices: it predicts real tumours, if roughly."""
    runs = tmp_path_factory.mktemp("real_runs")
    stems = sorted(p.stem for p in (real_root / "images").iterdir())[:32]
    train_root = link_subset(real_root, tmp_path_factory.mktemp("real_train") / "train", stems)
    assert train.main(["--data-root", str(train_root), "--runs-dir", str(runs), "--run-name", "real64",
                       "--epochs", "1", "--image-size", "64", "--base-channels", "4", "--depth", "3",
                       "--in-channels", "1", "--normalization", "zscore", "--search-rule", "false",
                       "--threshold", "0.3"]) == 0
    return runs / "real64"


def patient_slices(real_root, count: int) -> list[str]:
    """`count` slices of one patient of the shared set (the first with that many)."""
    with open(real_root / "metadata.csv", newline="") as f:
        by_patient: dict[str, list[str]] = {}
        for row in csv.DictReader(f):
            by_patient.setdefault(row["patient_id"], []).append(row["image_id"])
    return next(sorted(ids)[:count] for _, ids in sorted(by_patient.items()) if len(ids) >= count)


def test_a_volume_of_real_slices_scores_as_its_png_slices_and_its_mask_keeps_the_geometry(real_root, real_tiny_run,
                                                                                          tmp_path):
    """Stacked into a NIfTI volume, real slices get the predictions and scores their PNGs get."""
    import nibabel as nib
    from conftest import oblique_affine
    stems = patient_slices(real_root, 5)
    pngs = link_subset(real_root, tmp_path / "pngs", stems)
    grey = np.stack([np.asarray(Image.open(real_root / "images" / f"{s}.png").convert("L")) for s in stems], -1)
    truth = np.stack([read_mask(real_root / "masks" / f"{s}.png") for s in stems], -1)
    vols = tmp_path / "vols"
    (vols / "images").mkdir(parents=True)
    (vols / "masks").mkdir()
    nib.save(nib.Nifti1Image(grey, oblique_affine()), str(vols / "images" / "case.nii.gz"))  # 0.9 x 0.9 x 5 mm
    nib.save(nib.Nifti1Image(truth, oblique_affine()), str(vols / "masks" / "case.nii.gz"))
    checkpoint = real_tiny_run / "best.pt"
    assert run_test("--checkpoint", checkpoint, "--data-root", pngs, "--prediction-root", tmp_path / "p",
                    "--pixel-spacing-mm", "0.9") == 0
    assert run_test("--checkpoint", checkpoint, "--data-root", vols, "--prediction-root", tmp_path / "v") == 0
    by_png = {r["image"]: r for r in metrics_rows(tmp_path / "p" / "real64")}
    by_volume = metrics_rows(tmp_path / "v" / "real64")
    assert len(by_volume) == len(stems)  # every slice has tumour: every slice is scored
    for index, stem in enumerate(stems):
        row = next(r for r in by_volume if r["slice_index"] == str(index))
        assert row["image"] == f"case_k{index:03d}" and row["volume"] == "case" and row["slice_axis"] == "2"
        for key in ("dice", "iou", "hd95_px", "hd95_mm", "pred_pixels"):
            assert row[key] == by_png[stem][key], (stem, key)
    written = nib.load(str(tmp_path / "v" / "real64" / "masks" / "case.nii.gz"))
    assert written.shape == grey.shape and np.allclose(written.affine, oblique_affine())
    png_masks = np.stack([np.asarray(Image.open(tmp_path / "p" / "real64" / "masks" / f"{s}.png")) > 0
                          for s in stems], -1)
    assert np.array_equal(np.asarray(written.dataobj) > 0, png_masks)
    summary = json.loads((tmp_path / "v" / "real64" / "summary.json").read_text())
    volume = summary["volumes"]["per_volume"][0]
    assert volume["dice"] == pytest.approx(dice_per_image(png_masks.reshape(1, -1), truth.reshape(1, -1)).item())
    assert summary["volumes"]["count"] == summary["volumes"]["scored"] == 1
    with open(tmp_path / "v" / "real64" / "volumes.csv", newline="") as f:
        assert [r["volume"] for r in csv.DictReader(f)] == ["case"]
    assert "Volumes (3-D)" in (tmp_path / "v" / "real64" / "report.html").read_text()


def test_a_dicom_series_is_predicted_into_a_nifti_mask_with_its_geometry(tiny_run, tmp_path, capsys):
    import nibabel as nib
    from tumorseg.data import volumes
    from conftest import write_dicom_series
    data = np.random.default_rng(4).integers(0, 3000, size=(40, 36, 5)).astype(np.uint16)
    write_dicom_series(tmp_path / "data" / "images" / "series1", data)
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", tmp_path / "data",
                    "--prediction-root", tmp_path / "out") == 0
    assert "volumes:    1 (0 with a mask volume), cut across the axis with the fewest voxels" in capsys.readouterr().out
    written = nib.load(str(tmp_path / "out" / "tiny" / "masks" / "series1.nii.gz"))
    source = volumes.read_volume(tmp_path / "data" / "images" / "series1")
    assert written.shape == data.shape and np.allclose(written.affine, source.affine)
    summary = json.loads((tmp_path / "out" / "tiny" / "summary.json").read_text())
    assert summary["volumes"]["count"] == 1 and summary["volumes"]["scored"] == 0


def test_bad_volumes_are_named_and_the_good_ones_still_predicted(tiny_run, tmp_path, capsys):
    import nibabel as nib
    from conftest import oblique_affine
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    good = np.random.default_rng(5).normal(size=(32, 30, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(good, oblique_affine()), str(root / "images" / "good.nii.gz"))
    nib.save(nib.Nifti1Image((good > 1).astype(np.uint8), oblique_affine()), str(root / "masks" / "good.nii.gz"))
    nib.save(nib.Nifti1Image(good, oblique_affine()), str(root / "images" / "offsize.nii"))
    nib.save(nib.Nifti1Image(np.zeros((32, 30, 3), np.uint8), oblique_affine()), str(root / "masks" / "offsize.nii"))
    nib.save(nib.Nifti1Image(good[..., 0], np.eye(4)), str(root / "images" / "flat.nii.gz"))
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root",
                    tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "flat.nii.gz: a 3-D volume is needed" in err
    assert "offsize.nii: mask volume is (32, 30, 3), its image volume is (32, 30, 4)" in err
    out = tmp_path / "out" / "tiny"
    assert (out / "masks" / "good.nii.gz").is_file() and not (out / "masks" / "flat.nii.gz").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["volumes"]["count"] == 1 and summary["volumes"]["of"] == 3
    assert sum("flat.nii.gz" in problem or "offsize.nii" in problem for problem in summary["problems"]) == 2


def test_a_mask_volume_on_another_voxel_grid_is_refused_naming_both_files_and_orientations(tiny_run, tmp_path,
                                                                                            capsys):
    """A mask of its image's shape saved flipped would be scored against the wrong voxels: refused, nothing written."""
    import nibabel as nib
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.random.default_rng(7).normal(size=(32, 30, 4)).astype(np.float32)
    truth = (image > 1).astype(np.uint8)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "images" / "case.nii.gz"))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # x and y reversed: the same shape in another orientation
    lps[:2, 3] = [31, 29]  # the same voxel positions in the world, stored in reverse order
    nib.save(nib.Nifti1Image(np.ascontiguousarray(truth[::-1, ::-1]), lps), str(root / "masks" / "case.nii.gz"))
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root",
                    tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{root / 'masks' / 'case.nii.gz'}: label volume's affine differs from that of its image volume " \
           f"{root / 'images' / 'case.nii.gz'} (orientation LPS vs RAS" in err
    assert not (tmp_path / "out").exists()


def test_a_broken_link_among_the_volumes_is_named_and_exit_code_says_so(tiny_run, tmp_path, capsys):
    import nibabel as nib
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    good = np.random.default_rng(6).normal(size=(32, 30, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(good, np.eye(4)), str(root / "images" / "good.nii.gz"))
    link = root / "images" / "x.nii.gz"
    link.symlink_to(tmp_path / "gone.nii.gz")
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root",
                    tmp_path / "out") == 2  # as for a PNG link: predicted, but not everything
    assert f"warning: {link}: skipped, broken link (target missing: {tmp_path / 'gone.nii.gz'})" in \
        capsys.readouterr().err
    assert (tmp_path / "out" / "tiny" / "masks" / "good.nii.gz").is_file()
    good_path = root / "images" / "good.nii.gz"
    good_path.unlink()  # only the link left: refused, naming it
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root",
                    tmp_path / "out2") == 1
    assert "x.nii.gz: broken link" in capsys.readouterr().err


def test_an_image_named_like_a_volume_slice_is_refused_before_predicting(tiny_run, tmp_path, capsys):
    import nibabel as nib
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((32, 30, 4), np.float32), np.eye(4)), str(root / "images" / "case.nii.gz"))
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(root / "images" / "case_k002.png")  # slice 2 along axis 2
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(root / "images" / "case_notes.png")  # no slice name
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root",
                    tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{root / 'images' / 'case_k002.png'} and the slice case_k002 of the volume " \
           f"{root / 'images' / 'case.nii.gz'} would write the same outputs" in err and "case_notes" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root",
                    tmp_path / "out", "--slice-axis", "0") == 0  # across axis 0 its slices are case_i000...


def test_slice_axis_flag_cuts_volumes_across_the_axis_given(tiny_run, tmp_path):
    import nibabel as nib
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.random.default_rng(6).normal(size=(6, 20, 24)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[2, 5:9, 5:9] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "images" / "v.nii.gz"))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(root / "masks" / "v.nii.gz"))
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root",
                    tmp_path / "auto", "--postprocess", "none", "--threshold", "0.999") == 0
    rows = metrics_rows(tmp_path / "auto" / "tiny")
    assert rows and {r["slice_axis"] for r in rows} == {"0"}  # 6 voxels: the thinnest axis
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root",
                    tmp_path / "axis2", "--slice-axis", "2") == 0
    summary = json.loads((tmp_path / "axis2" / "tiny" / "summary.json").read_text())
    assert summary["volumes"]["per_volume"][0]["slice_axis"] == 2
    assert summary["volumes"]["per_volume"][0]["slices"] == 24


def test_a_volume_predicts_as_its_prepare_data_nifti_slices(tiny_run, tmp_path):
    """`prepare_data.py nifti` and the volume path window and cut a volume alike: same slices, same scores."""
    import nibabel as nib
    import prepare_data
    from conftest import oblique_affine
    rng = np.random.default_rng(7)
    image = rng.normal(400, 120, size=(30, 28, 5)).astype(np.float32)  # not 8-bit: windowed to percentiles
    labels = np.zeros(image.shape, np.uint8)
    labels[8:16, 6:14, 1:4] = 2
    image[labels > 0] += 300
    vols = tmp_path / "vols"
    for sub, data in (("images", image), ("masks", labels)):
        (vols / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, oblique_affine()), str(vols / sub / "case.nii.gz"))
    assert prepare_data.main(["nifti", "--images", str(vols / "images"), "--masks", str(vols / "masks"),
                              "--out", str(tmp_path / "pngs")]) == 0
    common = ("--checkpoint", tiny_run / "best.pt", "--postprocess", "none", "--threshold", "0.2")
    assert run_test(*common, "--data-root", tmp_path / "pngs", "--prediction-root", tmp_path / "p") == 0
    assert run_test(*common, "--data-root", vols, "--prediction-root", tmp_path / "v") == 0
    by_png = {r["image"]: r for r in metrics_rows(tmp_path / "p" / "tiny")}
    by_volume = {r["image"]: r for r in metrics_rows(tmp_path / "v" / "tiny")}
    assert set(by_png) <= set(by_volume) and len(by_png) == 3  # the 3 tumour slices (plus any false alarms)
    for stem, row in by_png.items():
        assert (row["dice"], row["pred_pixels"]) == (by_volume[stem]["dice"], by_volume[stem]["pred_pixels"])


def oracle_volume_run(tiny_run, tmp_path, monkeypatch, name: str, changed: dict):
    """test.py on a 6-slice volume (tumour in slices 2 and 3; pixels 1 mm between rows, 2 mm between columns) whose
    prediction is its own mask, with `changed` slices (index -> probability map function of the mask) instead.

    Returns metrics.csv's rows, summary.json and the output folder.
    """
    import nibabel as nib
    root = tmp_path / "data"
    if not root.exists():
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        image = np.random.default_rng(8).normal(size=(24, 20, 6)).astype(np.float32)
        mask = np.zeros(image.shape, np.uint8)
        mask[8:14, 6:11, 2:4] = 1
        nib.save(nib.Nifti1Image(image, np.diag([1.0, 2.0, 5.0, 1.0])), str(root / "images" / "case.nii.gz"))
        nib.save(nib.Nifti1Image(mask, np.diag([1.0, 2.0, 5.0, 1.0])), str(root / "masks" / "case.nii.gz"))
    real = predict.predict_decoded

    def oracle(*args, **kwargs):
        for p in real(*args, **kwargs):
            index = int(p.stem[-3:])
            probability = changed.get(index, lambda m: m)(p.mask).astype(np.float32)
            yield predict.Prediction(p.stem, p.image, probability, p.mask, p.spread, p.types)

    monkeypatch.setattr(predict, "predict_decoded", oracle)
    assert run_test("--checkpoint", tiny_run / "best.pt", "--data-root", root, "--prediction-root", tmp_path / name,
                    "--postprocess", "none", "--threshold", "0.5") == 0
    out = tmp_path / name / "tiny"
    return metrics_rows(out), json.loads((out / "summary.json").read_text()), out


def test_every_volume_slice_is_scored_and_tumour_free_slices_are_their_own_stratum(tiny_run, tmp_path, monkeypatch,
                                                                                   capsys):
    """Correct empty slices count (Dice 1) as false alarms on empty slices do: a row per slice, as for PNGs."""
    rows, summary, out = oracle_volume_run(tiny_run, tmp_path, monkeypatch, "exact", {})
    assert sorted(int(r["slice_index"]) for r in rows) == list(range(6)) and summary["scored"] == 6
    assert all(float(r["dice"]) == 1 for r in rows) and summary["dice_mean"] == 1
    tumour_free = summary["strata"]["tumour_size"]["groups"]["no tumour"]
    assert (tumour_free["count"], tumour_free["false_alarms"], tumour_free["false_alarm_rate"]) == (4, 0, 0)
    assert tumour_free["dice_mean"] == 1 and summary["failure_counts"]["no tumour: correct"] == 4
    assert "no tumour: 4 images with an empty mask, false alarm in 0 (0.0%)" in capsys.readouterr().out
    # PNGs only where the mask or the prediction has tumour; the report leaves the others' thumbnails out
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["case_k002.png", "case_k003.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["case.nii.gz", "case_k002.png", "case_k003.png"]
    page = (out / "report.html").read_text()
    assert 'src="overlays/case_k002.png"' in page and "overlays/case_k000.png" not in page

    alarm = np.zeros((24, 20), np.uint8)
    alarm[1:3, 1:3] = 1
    changed = {5: lambda m: alarm, 3: lambda m: np.roll(m, 1, axis=1)}  # a false alarm; one column off
    rows, summary, out = oracle_volume_run(tiny_run, tmp_path, monkeypatch, "alarm", changed)
    by_index = {int(r["slice_index"]): r for r in rows}
    assert len(rows) == 6 and float(by_index[5]["dice"]) == 0 and by_index[5]["category"] == "no tumour: false positive"
    assert float(by_index[3]["dice"]) == pytest.approx(0.8)  # 24 of 30 pixels overlap
    assert summary["dice_mean"] == pytest.approx((4 * 1 + 0.8 + 0) / 6)
    tumour_free = summary["strata"]["tumour_size"]["groups"]["no tumour"]
    assert (tumour_free["count"], tumour_free["false_alarms"], tumour_free["false_alarm_rate"]) == (4, 1, 0.25)
    assert "no tumour: 4 images with an empty mask, false alarm in 1 (25.0%)" in capsys.readouterr().out
    assert "False alarms: <b>1</b> of the 4 images with an empty mask have a predicted tumour (<b>25.0%</b>)" \
        in (out / "report.html").read_text()
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["case_k002.png", "case_k003.png", "case_k005.png"]
    # non-square pixels: the header's row (1 mm) and column (2 mm) spacing, not their mean
    assert float(by_index[3]["hd95_px"]) == 1 and float(by_index[3]["hd95_mm"]) == pytest.approx(2.0)


def test_a_broken_link_among_the_masks_is_named_and_exit_code_says_so(tiny_run, mixed_sizes, tmp_path, capsys):
    link = mixed_sizes / "masks" / "demo_0001.png"
    link.unlink()
    link.symlink_to(tmp_path / "gone.png")
    code = run_test("--checkpoint", tiny_run / "best.pt", "--data-root", mixed_sizes, "--prediction-root",
                    tmp_path / "preds")
    err = capsys.readouterr().err
    assert code == 2
    assert f"{link}: mask unusable, broken link (target missing: {tmp_path / 'gone.png'}); its image is predicted, " \
           "not scored" in err
    summary = json.loads((tmp_path / "preds" / "tiny" / "summary.json").read_text())
    assert summary["count"] == 3 and summary["scored"] == 2
