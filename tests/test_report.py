"""report.py: the command that (re)writes a prediction folder's report.html, and the summary.json it reads."""

import json
import os
import shutil

import pytest

import report


def test_report_cli_rewrites_the_page_and_refuses_other_folders(real_predictions, tmp_path, capsys):
    copy = shutil.copytree(real_predictions, tmp_path / "copy")
    (copy / "report.html").unlink()
    assert report.main([str(copy)]) == 0 and (copy / "report.html").is_file()
    assert report.main([str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err
    summary = json.loads((copy / "summary.json").read_text())
    del summary["metrics"]  # as test.py writes it without masks
    (copy / "summary.json").write_text(json.dumps(summary))
    assert report.main([str(copy)]) == 1
    assert "no scores" in capsys.readouterr().err
    (copy / "summary.json").write_text("{")
    assert report.main([str(copy)]) == 1
    assert "summary.json: cannot be read" in capsys.readouterr().err
    shutil.copy(real_predictions / "summary.json", copy / "summary.json")
    text = (copy / "metrics.csv").read_text()
    first_dice = text.splitlines()[1].split(",")[1]
    (copy / "metrics.csv").write_text(text.replace(f",{first_dice},", ",high,", 1))
    assert report.main([str(copy)]) == 1
    assert "metrics.csv: line 2 holds a value that is not a number" in capsys.readouterr().err
    (copy / "metrics.csv").write_text("image,dice\n1,0.5\n")
    assert report.main([str(copy)]) == 1
    assert "metrics.csv: does not match summary.json" in capsys.readouterr().err
    summary = json.loads((copy / "summary.json").read_text())
    del summary["calibration"]
    (copy / "summary.json").write_text(json.dumps(summary))
    shutil.copy(real_predictions / "metrics.csv", copy / "metrics.csv")
    assert report.main([str(copy)]) == 1
    assert "summary.json: not one test.py wrote (no 'calibration')" in capsys.readouterr().err


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_reporting_is_said_with_its_exit_code(tmp_path, capsys, monkeypatch, signal_name, code):
    import signal
    (tmp_path / "summary.json").write_text("{}")

    def signalled(folder):
        os.kill(os.getpid(), getattr(signal, signal_name))  # a real signal, as a scheduler or Ctrl-C sends
        return folder / "report.html"

    monkeypatch.setattr(report, "write_report", signalled)
    assert report.main([str(tmp_path)]) == code
    cause = "SIGTERM" if signal_name == "SIGTERM" else "Ctrl-C"
    assert f"interrupted ({cause}): {tmp_path / 'report.html'} was not changed" in capsys.readouterr().err


def test_summary_json_is_strict_json(real_predictions):
    text = (real_predictions / "summary.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"summary.json holds {name}"))
