"""assets/make_assets.py draws its three pictures from a real run's files."""

from PIL import Image

import train
from conftest import ROOT, link_subset, load_script

make_assets = load_script(ROOT / "assets" / "make_assets.py")
test_script = load_script(ROOT / "test.py")


def test_pictures_from_a_real_run(real_root, tmp_path):
    stems = sorted(p.stem for p in (real_root / "images").iterdir())[::40][:40]
    data = link_subset(real_root, tmp_path / "data", stems)
    assert train.main(["--data-root", str(data), "--runs-dir", str(tmp_path / "runs"), "--run-name", "r",
                       "--epochs", "2", "--image-size", "32", "--base-channels", "4", "--depth", "2",
                       "--in-channels", "1", "--normalization", "zscore"]) == 0
    assert test_script.main(["--checkpoint", str(tmp_path / "runs/r/best.pt"), "--data-root", str(data),
                             "--prediction-root", str(tmp_path / "preds"), "--subset", "test"]) == 0
    out = tmp_path / "assets"
    assert make_assets.main(["--data-root", str(data), "--run", str(tmp_path / "runs/r"),
                             "--predictions", str(tmp_path / "preds/r"), "--out-dir", str(out)]) == 0
    for name in ("dataset_example.png", "curves.png", "overlays.png"):
        width, height = Image.open(out / name).size
        assert width > 300 and height > 200, name
