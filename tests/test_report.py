"""report.py: the page test.py writes, opened in a real headless browser, and docs/reference.md's generated tables."""

import csv
import html
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

import report
import train
from conftest import ROOT, link_subset, load_script, spread_stems

test_script = load_script(ROOT / "test.py")
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium() -> str:
    """Path of a Chromium binary; skips the test without one, except in CI (CI=true), where it fails."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    reason = f"no Chromium binary ({' or '.join(CHROMIUM_NAMES)}) on PATH; .ci/run installs Debian's chromium"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def browser_dom(page: Path, query: str, profile: Path) -> str:
    """The DOM of a local page after its scripts ran, from headless Chromium with networking off."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri() + query],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def real_predictions(real_root, tmp_path_factory) -> Path:
    """test.py's output folder for ~60 real slices of ~20 patients, with TTA, a pixel spacing and strata."""
    tmp = tmp_path_factory.mktemp("report")
    data = link_subset(real_root, tmp / "data", spread_stems(real_root, 8, 3))
    # a high learning rate, so that 12 short epochs give masks of every kind: HD95 needs some predicted
    assert train.main(["--data-root", str(data), "--runs-dir", str(tmp / "runs"), "--run-name", "r",
                       "--epochs", "12", "--learning-rate", "0.01", "--batch-size", "8", "--image-size", "32",
                       "--base-channels", "4", "--depth", "2", "--in-channels", "1", "--normalization", "zscore",
                       "--split-group-column", "patient_id", "--search-rule", "false"]) == 0
    assert test_script.main(["--checkpoint", str(tmp / "runs/r/best.pt"), "--data-root", str(data),
                             "--prediction-root", str(tmp / "preds"), "--tta", "true",
                             "--pixel-spacing-mm", "0.98", "--strata", "tumor_class"]) == 0
    return tmp / "preds" / "r"


def test_report_loads_without_errors_lists_every_image_and_sorts_by_dice(real_predictions, tmp_path):
    rows = list(csv.DictReader(open(real_predictions / "metrics.csv", newline="")))
    dom = browser_dom(real_predictions / "report.html", "?selftest=1", tmp_path / "profile")
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    assert found, "the page's script did not run its self-test"
    result = json.loads(html.unescape(found.group(1)))
    assert result["errors"] == []
    assert result["rows"] == len(rows) and sorted(result["images"]) == sorted(r["image"] for r in rows)
    dice = [float(d) for d in result["dice"]]
    assert dice == sorted(dice) and dice[0] == min(float(r["dice"]) for r in rows)
    # the browser's DOM itself, not only the script's account of it: the first image row is the lowest Dice
    first_row = dom[dom.index('id="image-table"'):].split("<tbody>")[1].split("</tr>")[0]
    assert float(re.search(r'data-sort="([^"]+)"', first_row).group(1)) == dice[0]


def test_report_is_self_contained_and_shows_every_part(real_predictions):
    page = (real_predictions / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # no CDN, no network
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    local = [unquote(link) for link in links if not link.startswith(("data:", "#"))]
    assert local and all((real_predictions / link).is_file() for link in local)
    summary = json.loads((real_predictions / "summary.json").read_text())
    for stem in (r["image"] for r in csv.DictReader(open(real_predictions / "metrics.csv", newline=""))):
        assert f"overlays/{stem}.png" in local and f"uncertainty/{stem}.png" in local
    for title in ("Dice histogram", "HD95 histogram", "Reliability diagram", "Uncertainty against Dice"):
        assert f'alt="{title}" src="data:image/png;base64,' in page
    assert "Per patient_id" in page and "By tumor class" in page and "By tumour size" in page
    assert "Failure categories by tumor class" in page and "Failure categories by tumour size" in page
    for rule in summary["failure_rules"]:
        assert f">{html.escape(rule['category'])}</a>" in page and html.escape(rule["rule"]) in page
    assert "HD95 (mm)" in page and summary["metrics"]["hd95_mm"]["count"] > 0
    assert summary["metrics"]["uncertainty"]["mean"] > 0 and summary["uncertainty"]["poor_images"] > 0


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


def test_docs_reference_carries_the_generated_metric_and_rule_tables():
    reference = (ROOT / "docs" / "reference.md").read_text()
    assert report.readme_tables() in reference, (
        "docs/reference.md is out of date: paste `python report.py --readme` into it")


def test_number_cells_sort_undefined_values_last():
    assert report.number_cell(math.nan, 3) == '<td data-sort="">n/a</td>'
    assert report.number_cell(None, 3) == '<td data-sort="">n/a</td>'
    assert report.number_cell(0.25, 2) == '<td data-sort="0.25">0.25</td>'


def test_image_names_that_need_escaping(tmp_path):
    cell = report.thumbnail("overlays", 'a b#"<x>')
    assert 'href="overlays/a%20b%23%22%3Cx%3E.png"' in cell
    assert Path(unquote("overlays/a%20b%23%22%3Cx%3E.png")).name == 'a b#"<x>.png'


def test_stratum_failure_table_has_a_row_per_value_with_its_images_and_each_category():
    counts = {"glioma": {"missed": 2, "wrong place": 0, "good": 5},
              "": {"missed": 0, "wrong place": 1, "good": 0}}  # images without a value
    page = report.stratum_failure_table("tumor_class", counts)
    header = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert header == ["tumor_class", "images", "missed", "wrong place", "good"]
    rows = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in page.split("<tbody>")[1].split("</tr>")[:-1]]
    assert rows == [["glioma", "7", "2", "0", "5"], ["(none)", "1", "0", "1", "0"]]
    assert report.stratum_failure_table("tumor_class", None) == ""  # a summary.json from before the key
