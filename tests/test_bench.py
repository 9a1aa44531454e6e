import json

import bench


def test_bench_reports_throughput_and_data_share(demo_root, capsys):
    assert bench.main(["--data-root", str(demo_root), "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--batch-size", "4", "--steps", "2", "--warmup", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train_images_per_second"] > 0 and report["data_images_per_second"] > 0
    assert 0 < report["data_share_of_step"] < 1
    assert report["image_size"] == 32 and report["base_channels"] == 4


def test_compare_times_each_supported_combination_side_by_side(demo_root, capsys):
    assert bench.main(["--data-root", str(demo_root), "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--batch-size", "4", "--steps", "1", "--warmup", "1", "--compare", "--compile", "false"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    combos = {(r["amp"], r["channels_last"]) for r in report["results"]}
    assert {("off", False), ("off", True), ("bf16", False), ("bf16", True)} <= combos  # fp16 where supported
    assert all(not r["compile"] and r["train_images_per_second"] > 0 for r in report["results"])
    assert lines[0].split()[:3] == ["AMP", "channels_last", "compile"] and len(lines) == len(combos) + 2


def test_bench_refuses_bad_step_counts(demo_root, capsys):
    import pytest
    with pytest.raises(SystemExit):
        bench.main(["--data-root", str(demo_root), "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_inference_mode_times_old_and_new_writing_side_by_side(demo_root, capsys):
    assert bench.main(["--data-root", str(demo_root), "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--batch-size", "4", "--inference", "6", "--native-size", "96"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["native_size"] == 96 and report["images"] == 6
    speeds = report["images_per_second"]
    assert len(speeds) == 2 and all(speed > 0 for speed in speeds.values())
    assert lines[0].startswith("network, writing") and len(lines) == 4
    assert list(speeds)[0] == "float32, inline, compress_level 6"  # test.py as it first ran


def test_inference_mode_runs_the_network_as_the_speed_keys_say(demo_root, capsys):
    assert bench.main(["--data-root", str(demo_root), "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--batch-size", "4", "--inference", "4", "--native-size", "64", "--amp", "bf16",
                       "--channels-last", "true"]) == 0
    speeds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images_per_second"]
    assert list(speeds)[1].startswith("bf16, channels last, ")


def test_sigterm_stops_like_ctrl_c_and_leaves_no_temporary_folder(demo_root, tmp_path, capsys, monkeypatch):
    import os
    import signal
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the native-size copies go

    def terminated(*args, **kwargs):  # the copies are written, the first timing starts: a real SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(bench, "predict_and_write", terminated)
    handler_before = signal.getsignal(signal.SIGTERM)
    assert bench.main(["--data-root", str(demo_root), "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--batch-size", "4", "--inference", "2", "--native-size", "64"]) == 143
    assert "interrupted (SIGTERM): the timings stop here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is handler_before
