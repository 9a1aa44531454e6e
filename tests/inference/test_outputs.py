"""outputs.py: the prediction folder, staged and published."""

import json

from tumorseg.inference import outputs


def test_two_writers_of_one_run_name_each_publish_their_own_folder(tmp_path):
    first = outputs.start_staging(tmp_path, "run", overwrite=False)
    second = outputs.start_staging(tmp_path, "run", overwrite=False)  # started while the first runs
    assert first != second and first.exists()
    (first / "summary.json").write_text('{"threshold": 0.3}')
    (second / "summary.json").write_text('{"threshold": 0.7}')
    out_second = outputs.publish_predictions(second, tmp_path, "run", overwrite=False)
    out_first = outputs.publish_predictions(first, tmp_path, "run", overwrite=False)
    assert {out_first.name, out_second.name} == {"run", "run-2"}
    assert json.loads((out_first / "summary.json").read_text())["threshold"] == 0.3
    assert json.loads((out_second / "summary.json").read_text())["threshold"] == 0.7
    third = outputs.start_staging(tmp_path, "run", overwrite=True)
    (third / "summary.json").write_text('{"threshold": 0.5}')
    assert outputs.publish_predictions(third, tmp_path, "run", overwrite=True) == tmp_path / "run"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["threshold"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-2"]
