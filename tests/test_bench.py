import json

import bench


def test_bench_reports_throughput_and_data_share(demo_root, capsys):
    assert bench.main(["--data-root", str(demo_root), "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--batch-size", "4", "--steps", "2", "--warmup", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train_images_per_second"] > 0 and report["data_images_per_second"] > 0
    assert 0 < report["data_share_of_step"] < 1
    assert report["image_size"] == 32 and report["base_channels"] == 4
