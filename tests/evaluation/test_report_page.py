"""report_page.py: the page test.py writes, opened in headless Chromium, its cells, and docs/reference.md's tables."""

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

from conftest import ROOT
from tumorseg.evaluation import report_page

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


def test_docs_reference_carries_the_generated_metric_and_rule_tables():
    reference = (ROOT / "docs" / "reference.md").read_text()
    assert report_page.readme_tables() in reference, (
        "docs/reference.md is out of date: paste `python report.py --readme` into it")


def test_number_cells_sort_undefined_values_last():
    assert report_page.number_cell(math.nan, 3) == '<td data-sort="">n/a</td>'
    assert report_page.number_cell(None, 3) == '<td data-sort="">n/a</td>'
    assert report_page.number_cell(0.25, 2) == '<td data-sort="0.25">0.25</td>'


def test_image_names_that_need_escaping(tmp_path):
    cell = report_page.thumbnail("overlays", 'a b#"<x>')
    assert 'href="overlays/a%20b%23%22%3Cx%3E.png"' in cell
    assert Path(unquote("overlays/a%20b%23%22%3Cx%3E.png")).name == 'a b#"<x>.png'


def test_stratum_failure_table_has_a_row_per_value_with_its_images_and_each_category():
    counts = {"glioma": {"missed": 2, "wrong place": 0, "good": 5},
              "": {"missed": 0, "wrong place": 1, "good": 0}}  # images without a value
    page = report_page.stratum_failure_table("tumor_class", counts)
    header = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert header == ["tumor_class", "images", "missed", "wrong place", "good"]
    rows = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in page.split("<tbody>")[1].split("</tr>")[:-1]]
    assert rows == [["glioma", "7", "2", "0", "5"], ["(none)", "1", "0", "1", "0"]]
    assert report_page.stratum_failure_table("tumor_class", None) == ""  # a summary.json from before the key


def test_false_alarm_note_counts_the_tumour_free_images_with_a_prediction():
    note = report_page.false_alarm_note({"count": 8, "false_alarms": 2, "false_alarm_rate": 0.25})
    assert note == ("<p>False alarms: <b>2</b> of the 8 images with an empty mask have a predicted tumour "
                    "(<b>25.0%</b>).</p>")
    assert report_page.false_alarm_note(None) == ""  # no tumour-free images
    assert report_page.false_alarm_note({"count": 3, "dice_mean": 1.0}) == ""  # a summary.json from before the count
