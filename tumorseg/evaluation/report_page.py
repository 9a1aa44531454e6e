"""The evaluation report: report.html from a prediction folder's summary.json and metrics.csv, and its metric tables.

The page is self-contained: its CSS, script and figures (matplotlib PNGs,
base64) are inline and it links overlays/ and uncertainty/ by relative paths,
so it opens from disk with no server and no network. Open it as
report.html?selftest=1 and it sorts the image table by Dice and writes what it
found into #selftest (the tests read that from a headless browser).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from urllib.parse import quote

from tumorseg.evaluation.failures import FAILURE_RULES, POOR_MAX_DICE
from tumorseg.evaluation.scoring import NO_TUMOUR, SIZE_COLUMN, parse_metric, read_metrics
from tumorseg.evaluation.uncertainty import UNCERTAINTY_REGION_PROBABILITY
from tumorseg.files import write_atomic
from tumorseg.inference.outputs import slice_has_pngs

# Every per-image number metrics.csv may hold: (column, name, unit, meaning). The page's tables and
# docs/reference.md's metric table (`python report.py --readme`) both come from here.
METRICS = [
    ("dice", "Dice", "", "2 x overlap / (predicted + true pixels), 0 to 1; both masks empty: 1, one empty: 0"),
    ("iou", "IoU", "", "overlap / union (Jaccard); empty masks as Dice"),
    ("pixel_accuracy", "pixel accuracy", "", "share of the image's pixels classified right"),
    ("precision", "precision", "", "share of the predicted pixels that are tumour; nothing predicted: "
                                   "undefined (1 if the truth is empty too)"),
    ("sensitivity", "sensitivity", "", "share of the tumour pixels found; no tumour: undefined "
                                       "(1 if nothing is predicted either)"),
    ("hd95_px", "HD95", "px", "95th-percentile Hausdorff distance between the two masks' borders (the larger "
                              "of both directions' 95th percentiles); undefined when either mask is empty"),
    ("assd_px", "ASSD", "px", "average symmetric surface distance: mean distance from each border pixel of "
                              "either mask to the other's border; undefined when either mask is empty"),
    ("hd95_mm", "HD95", "mm", "HD95 with the pixel spacing (--pixel-spacing-mm or --spacing-column)"),
    ("assd_mm", "ASSD", "mm", "ASSD with the pixel spacing"),
    ("pred_components", "predicted components", "", "8-connected pieces of the prediction"),
    ("true_components", "true components", "", "8-connected pieces of the expert mask"),
    ("gt_pixels", "true pixels", "px", "tumour pixels in the expert mask (its area)"),
    ("pred_pixels", "predicted pixels", "px", "tumour pixels in the prediction"),
    ("overlap_pixels", "overlap pixels", "px", "pixels in both"),
    ("uncertainty", "uncertainty", "", "with --tta true or an ensemble: mean standard deviation of the views' "
                                       "(members') probabilities over the pixels whose mean probability reaches "
                                       f"{UNCERTAINTY_REGION_PROBABILITY}; 0 when none does"),
]
COUNT_COLUMNS = {"pred_components", "true_components", "gt_pixels", "pred_pixels", "overlap_pixels"}
# The image table's number columns; the mm distances replace the pixel ones when a spacing is known.
TABLE_NUMBERS = ["dice", "iou", "precision", "sensitivity", "hd95", "assd", "pred_components", "true_components",
                 "gt_pixels", "pred_pixels", "uncertainty"]
TYPE_PROBABILITY = "type_probability"  # a type head's probability of its predicted_type (TYPE_COLUMN checkpoints)


def write_report(folder: Path) -> Path:
    """Write folder/report.html from folder/summary.json and folder/metrics.csv; returns its path."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder / 'summary.json'}: cannot be read ({error})") from error
    if "metrics" not in summary:
        raise ValueError(f"{folder / 'summary.json'}: no scores; test.py scored no image there (no masks?)")
    rows = read_metrics(folder / "metrics.csv")
    numbers = set(summary["metrics"]) | ({TYPE_PROBABILITY} & set(rows[0] if rows else ()))  # a type head's answer
    rows = numbers_parsed(rows, numbers, folder / "metrics.csv")
    path = folder / "report.html"
    write_atomic(path, render(summary, rows))
    return path


def numbers_parsed(rows: list[dict[str, str]], numbers: set[str], path: Path) -> list[dict]:
    """metrics.csv's rows with the `numbers` columns as floats (parse_metric: an empty cell is NaN, undefined)."""
    missing = (numbers | {"category"}) - set(rows[0] if rows else ())
    if missing or not rows:
        raise ValueError(f"{path}: does not match summary.json (no rows, or no column {', '.join(sorted(missing))})")
    parsed = []
    for line, row in enumerate(rows, start=2):
        try:
            parsed.append({key: parse_metric(value) if key in numbers else value for key, value in row.items()})
        except (TypeError, ValueError):
            raise ValueError(f"{path}: line {line} holds a value that is not a number in a number column") from None
    return parsed


# ---------------------------------------------------------------------------------------------- page


def render(summary: dict, rows: list[dict]) -> str:
    """The whole page as one HTML string."""
    unit = "mm" if "hd95_mm" in summary["metrics"] else "px"
    figures = draw_figures(summary, rows, unit)
    sections = [overview(summary, unit),
                "<div class=figures>" + "".join(f'<img alt="{html.escape(name)}" src="{uri}">'
                                                for name, uri in figures.items()) + "</div>",
                failure_table(summary), metric_table(summary)]
    if "volumes" in summary:
        sections.append(volume_section(summary["volumes"]))
    if "uncertainty" in summary:
        u = summary["uncertainty"]
        sections.append(
            f"<h2>Uncertainty</h2><p>Per image: {html.escape(METRICS[-1][3])}. Spearman correlation with "
            f"Dice: <b>{format_number_or_na(u['spearman_with_dice'])}</b> (negative: uncertain images score "
            f"lower). AUROC of uncertainty for telling the {u['poor_images']} images with Dice below "
            f"{u['poor_dice_below']} from the rest: <b>{format_number_or_na(u['auroc_poor'])}</b> (0.5: chance, "
            "1: perfect).</p>")
    if "by_group" in summary:
        column = summary["by_group"]["column"]
        sections.append(f"<h2>Per {html.escape(column)}</h2><p>Mean over each group's images, and the pooled "
                        "Dice of all its pixels together.</p>"
                        + group_table(column, summary["by_group"]["groups"], unit))
    for column, stratum in summary["strata"].items():
        note = ""
        if column == SIZE_COLUMN and stratum["edges_px"]:
            low, high = stratum["edges_px"]
            note = (f"<p>Terciles of the true tumour area: small up to {low:.0f} px, medium up to "
                    f"{high:.0f} px, large above.</p>")
        if column == SIZE_COLUMN:
            note += false_alarm_note(stratum["groups"].get(NO_TUMOUR))
        sections.append(f"<h2>By {html.escape(column.replace('_', ' '))}</h2>{note}"
                        + group_table(column, stratum["groups"], unit)
                        # summary.json from before failure_counts_by_stratum: its page is still drawn
                        + stratum_failure_table(column, summary.get("failure_counts_by_stratum", {}).get(column)))
    sections.append(image_table(summary, rows, unit))
    body = "\n".join(sections)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>Evaluation report</title>"
            f"<style>{STYLE}</style><script>{ERROR_CATCHER}</script></head>\n<body>\n"
            f"<h1>Evaluation report</h1>\n{body}\n<pre id=selftest hidden></pre>\n<script>{SCRIPT}</script>\n"
            f"</body></html>\n")


def format_number_or_na(value: float | None, digits: int = 3) -> str:
    """A figure for the page; 'n/a' for an undefined one (NaN here, null in summary.json)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


SUBSET_WORDS = {"test": "the run's held-out patients, which chose nothing",
                "val": "the run's inner validation patients, which chose its epoch and rule: optimistic"}


def overview(summary: dict, unit: str) -> str:
    """What was scored, with which checkpoint and rule, and the main scores, as a definition list."""
    models = summary["ensemble"]
    checkpoints = ", ".join(f"{m['checkpoint']} (epoch {m['epoch']}, {m['image_size']} px)" for m in models)
    views = "8 flips and rotations (TTA)" if summary["tta"] else "one"
    items = {
        "data": f"{summary['data_root']} ("
                + SUBSET_WORDS.get(summary["subset"], "all images") + ")",
        "images": f"{summary['scored']} scored of {summary['count']} predicted",
        "checkpoint" + ("s (ensemble)" if len(models) > 1 else ""): checkpoints,
        "views per image": views,
        "decision rule": f"{summary['decision_rule_text']} ({summary['decision_rule_source']})",
        "pixel spacing": summary["pixel_spacing_source"] or "unknown: distances in pixels only",
        "Dice": f"mean {format_number_or_na(summary['dice_mean'])}, median "
                f"{format_number_or_na(summary['dice_median'])}, pooled over all pixels "
                f"{format_number_or_na(summary['dice_pooled'])}",
        "HD95": f"median {format_number_or_na(summary['metrics'][f'hd95_{unit}']['median'], 2)} {unit}",
        "calibration": f"ECE {format_number_or_na(summary['calibration']['ece'], 4)}",
    }
    if "uncertainty" in summary:
        items["uncertainty"] = (f"AUROC for Dice below {summary['uncertainty']['poor_dice_below']}: "
                                f"{format_number_or_na(summary['uncertainty']['auroc_poor'])}")
    if summary.get("training_overlap_note"):
        items["caution"] = summary["training_overlap_note"]
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items()) \
        + "</dl>"


def metric_table(summary: dict) -> str:
    """Mean, median, std and counts of every per-image number, with what each means."""
    body = []
    for key, name, unit, meaning in METRICS:
        stats = summary["metrics"].get(key)
        if stats is None:
            continue
        digits = 1 if key in COUNT_COLUMNS else 3
        body.append([text_cell(name), text_cell(unit)]
                    + [number_cell(stats[k], digits) for k in ("mean", "median", "std")]
                    + [number_cell(stats["count"], 0), number_cell(stats["count_undefined"], 0), text_cell(meaning)])
    header = [("metric", "text"), ("unit", "text"), ("mean", "num"), ("median", "num"), ("std", "num"),
              ("images", "num"), ("undefined", "num"), ("meaning", "text")]
    return ("<h2>Scores per image</h2><p>Each number is computed per image at the image's own resolution, "
            "then summarised over images; undefined values (see each meaning) are left out and counted.</p>"
            + table(header, body))


def failure_table(summary: dict) -> str:
    """How many images fell in each failure category, with its rule; a click filters the image table."""
    total = summary["scored"]
    body = []
    for rule in summary["failure_rules"]:
        count = summary["failure_counts"][rule["category"]]
        name = html.escape(rule["category"])
        body.append([f'<td><a href="#images" class=category data-category="{name}">{name}</a></td>',
                     text_cell(rule["rule"]), number_cell(count, 0), number_cell(100 * count / total, 1)])
    return ("<h2>Failure categories</h2><p>Each image gets the first category whose rule its numbers satisfy, "
            "in this order. Click one to list its images.</p>"
            + table([("category", "text"), ("rule", "text"), ("images", "num"), ("%", "num")], body))


def stratum_failure_table(column: str, counts: dict[str, dict[str, int]] | None) -> str:
    """The failure categories per value of a stratum column: one row per value, its image count and each count.

    Args:
        column: the stratum column (e.g. tumour_size, tumor_class).
        counts: summary.json's failure_counts_by_stratum[column]; None (an older summary.json) gives "".
    """
    if not counts:
        return ""
    categories = list(next(iter(counts.values())))
    body = [[text_cell(label or "(none)"), number_cell(sum(by_category.values()), 0)]
            + [number_cell(by_category[name], 0) for name in categories]
            for label, by_category in counts.items()]
    return (f"<p>Failure categories by {html.escape(column.replace('_', ' '))} (images per category; each "
            "row sums to its images):</p>"
            + table([(column, "text"), ("images", "num")] + [(name, "num") for name in categories], body))


def volume_section(volumes: dict) -> str:
    """Per volume, in 3-D: what the rest of the page scores per slice."""
    keys = [("dice", "Dice (3-D)", 3), ("iou", "IoU", 3), ("sensitivity", "sensitivity", 3),
            ("precision", "precision", 3), ("hd95_mm", "HD95 (mm)", 2), ("assd_mm", "ASSD (mm)", 2),
            ("gt_voxels", "true voxels", 0), ("pred_voxels", "predicted voxels", 0), ("slices", "slices", 0)]
    keys = [k for k in keys if any(k[0] in row for row in volumes["per_volume"])]
    body = [[text_cell(row["volume"]), text_cell(str(row["slice_axis"]))]
            + [number_cell(row.get(key, math.nan), digits) for key, _, digits in keys]
            for row in volumes["per_volume"]]
    return (f"<h2>Volumes (3-D)</h2><p>{volumes['count']} of {volumes['of']} volume(s) predicted slice by slice "
            f"across {html.escape(volumes['slice_axis'])}; their masks are NIfTI files in masks/. Scores: "
            f"{html.escape(volumes['scores'])}. Every other table on this page scores images and slices.</p>"
            + table([("volume", "text"), ("slice axis", "text")] + [(title, "num") for _, title, _ in keys], body,
                    "volumes"))


def false_alarm_note(tumour_free: dict | None) -> str:
    """A sentence on the tumour-free images: how many had any predicted pixel; "" when there are none
    (or the summary.json predates the count)."""
    if not tumour_free or "false_alarms" not in tumour_free:
        return ""
    return (f"<p>False alarms: <b>{tumour_free['false_alarms']}</b> of the {tumour_free['count']} images with an "
            f"empty mask have a predicted tumour (<b>{tumour_free['false_alarm_rate']:.1%}</b>).</p>")


def group_table(column: str, groups: dict[str, dict], unit: str) -> str:
    """One row of scores per group or stratum."""
    keys = [("count", "images", 0), ("dice_mean", "Dice mean", 3), ("dice_median", "Dice median", 3),
            ("dice_pooled", "Dice pooled", 3), ("iou_mean", "IoU mean", 3), ("sensitivity_mean", "sensitivity", 3),
            ("precision_mean", "precision", 3), (f"hd95_{unit}_mean", f"HD95 ({unit})", 2),
            (f"assd_{unit}_mean", f"ASSD ({unit})", 2), ("uncertainty_mean", "uncertainty", 3),
            ("poor", f"Dice < {POOR_MAX_DICE}", 0)]
    keys = [k for k in keys if k[0] in next(iter(groups.values()))]
    body = [[text_cell(label or "(none)")] + [number_cell(scores[key], digits) for key, _, digits in keys]
            for label, scores in groups.items()]
    return table([(column, "text")] + [(title, "num") for _, title, _ in keys], body)


def image_table(summary: dict, rows: list[dict], unit: str) -> str:
    """The sortable, filterable per-image table with thumbnails linking to the full-size PNGs."""
    uncertainty = summary["uncertainty_maps"]
    # Text columns (tumour size, metadata, a type head's predicted_type), and the type head's probability as a number.
    labels = [key for key in rows[0] if key not in summary["metrics"] and key not in ("image", "category")]
    numbers = [key if key in summary["metrics"] else f"{key}_{unit}" for key in TABLE_NUMBERS]
    numbers = [key for key in numbers if key in summary["metrics"]]
    titles = {key: f"{name} ({metric_unit})" if key.startswith(("hd95", "assd")) else name
              for key, name, metric_unit, _ in METRICS}
    header = [("overlay", "none")] + ([("uncertainty map", "none")] if uncertainty else []) \
        + [("image", "text"), ("category", "text")] \
        + [("type probability", "num") if label == TYPE_PROBABILITY else (label, "text") for label in labels] \
        + [(titles[key], "num") for key in numbers]
    body = []
    for row in rows:
        name = row["image"]
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # any file name prints
        cells = [thumbnail("overlays", name)] + ([thumbnail("uncertainty", name)] if uncertainty else [])
        if row.get("volume") and not slice_has_pngs(row["gt_pixels"], row["pred_pixels"]):
            cells = ["<td></td>"] * len(cells)  # a tumour-free volume slice predicted empty has no PNGs
        cells += [text_cell(shown), text_cell(row["category"])]
        cells += [number_cell(row[label], 3) if label == TYPE_PROBABILITY else text_cell(row[label])
                  for label in labels]
        cells += [number_cell(row[key], 0 if key in COUNT_COLUMNS else 3) for key in numbers]
        body.append(cells)
    categories = "".join(f"<option>{html.escape(name)}</option>" for name, _ in FAILURE_RULES)
    controls = (f'<p><input id=filter type=search placeholder="filter: name, category, group..." size=36> '
                f'<select id=category><option value="">every category</option>{categories}</select> '
                f'<span id=shown>{len(rows)} of {len(rows)} images</span>. Click a column to sort it, a '
                'thumbnail to open it full size.</p>')
    return f"<h2 id=images>Images</h2>{controls}" + table(header, body, table_id="image-table")


def thumbnail(folder: str, name: str) -> str:
    """A table cell with a small copy of folder/name.png that opens the full image."""
    url = html.escape(quote(f"{folder}/{name}.png", errors="surrogateescape"))
    return f'<td><a href="{url}" target=_blank><img class=thumb loading=lazy alt="" src="{url}"></a></td>'


def text_cell(value: str) -> str:
    """A table cell of text, sorted as text."""
    return f"<td>{html.escape(str(value))}</td>"


def number_cell(value: float | None, digits: int) -> str:
    """A table cell of a number, sorted by its exact value; undefined ones sort last."""
    undefined = value is None or (isinstance(value, float) and math.isnan(value))
    return f'<td data-sort="{"" if undefined else repr(float(value))}">{format_number_or_na(value, digits)}</td>'


def table(header: list[tuple[str, str]], body: list[list[str]], table_id: str = "") -> str:
    """A sortable table: header (title, "num" | "text" | "none") and rows of ready <td> cells."""
    head = "".join(f'<th data-type="{kind}">{html.escape(title)}</th>' for title, kind in header)
    rows = "\n".join(f"<tr>{''.join(cells)}</tr>" for cells in body)
    identity = f" id={table_id}" if table_id else ""
    return f"<table class=sortable{identity}><thead><tr>{head}</tr></thead><tbody>\n{rows}\n</tbody></table>"


# ---------------------------------------------------------------------------------------------- figures


def draw_figures(summary: dict, rows: list[dict], unit: str) -> dict[str, str]:
    """Histograms of Dice and HD95, the reliability diagram and, with uncertainty, its scatter against Dice.

    Returned as {title: data URI of a PNG}, so the page carries them inline.
    """
    from matplotlib.figure import Figure  # here, not at the top: it adds 0.3 s to importing test.py

    def png(figure: Figure) -> str:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    figures = {}
    dice = [row["dice"] for row in rows]
    figure = Figure(figsize=(4.6, 3.2))
    axes = figure.subplots()
    axes.hist(dice, bins=20, range=(0, 1), color="#4878a8")
    axes.axvline(summary["dice_mean"], color="#c03030", label=f"mean {summary['dice_mean']:.3f}")
    axes.axvline(summary["dice_median"], color="#30a030", linestyle="--", label=f"median {summary['dice_median']:.3f}")
    axes.set(xlabel="Dice per image", ylabel="images", title=f"Dice of {len(dice)} images")
    axes.legend(loc="upper left")
    figures["Dice histogram"] = png(figure)

    distances = [row[f"hd95_{unit}"] for row in rows if not math.isnan(row[f"hd95_{unit}"])]
    figure = Figure(figsize=(4.6, 3.2))
    axes = figure.subplots()
    if distances:
        axes.hist(distances, bins=25, color="#4878a8")
    axes.set(xlabel=f"HD95 per image ({unit})", ylabel="images",
             title=f"HD95 of {len(distances)} images ({len(rows) - len(distances)} undefined: an empty mask)")
    figures["HD95 histogram"] = png(figure)

    calibration = summary["calibration"]
    edges = calibration["bin_edges"]
    centres = [(low + high) / 2 for low, high in zip(edges[:-1], edges[1:])]
    observed = [math.nan if f is None else f for f in calibration["observed_frequency"]]
    confidence = [math.nan if c is None else c for c in calibration["mean_confidence"]]
    figure = Figure(figsize=(4.6, 4.2))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres, observed, width=edges[1] - edges[0], color="#4878a8", edgecolor="white", label="observed")
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    top.plot(confidence, observed, "o", color="#c03030", markersize=4, label="mean probability of the bin")
    top.set(ylabel="share of pixels that are tumour", xlim=(0, 1), ylim=(0, 1),
            title=f"Reliability of pixel probabilities: ECE {calibration['ece']:.4f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, calibration["counts"], width=edges[1] - edges[0], color="#888888", log=True)
    bottom.set(xlabel="predicted tumour probability", ylabel="pixels")
    figures["Reliability diagram"] = png(figure)

    if "uncertainty" in summary:
        poor = [d < POOR_MAX_DICE for d in dice]
        figure = Figure(figsize=(4.6, 3.2))
        axes = figure.subplots()
        axes.scatter([row["uncertainty"] for row in rows], dice, s=8,
                     c=["#c03030" if p else "#4878a8" for p in poor])
        u = summary["uncertainty"]
        axes.set(xlabel="uncertainty per image", ylabel="Dice",
                 title=f"Spearman {format_number_or_na(u['spearman_with_dice'])}, AUROC (Dice < {POOR_MAX_DICE}) "
                       f"{format_number_or_na(u['auroc_poor'])}")
        figures["Uncertainty against Dice"] = png(figure)
    return figures


# ---------------------------------------------------------------------------------------------- inline CSS and JS

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; } dd { margin: 0; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 2px 6px; }
th { background: #f2f2f2; cursor: pointer; position: sticky; top: 0; user-select: none; }
th[data-type=none] { cursor: default; } th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
td[data-sort] { text-align: right; font-variant-numeric: tabular-nums; } #image-table td { white-space: nowrap; }
img.thumb { width: 72px; height: 72px; object-fit: contain; display: block; background: #000; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
#selftest:not([hidden]) { background: #fee; }
"""

# Runs before anything else, so it also catches errors of the main script below (a syntax error too).
ERROR_CATCHER = """
window.reportErrors = [];
window.onerror = function (message, source, line) { window.reportErrors.push(message + " (line " + line + ")"); };
"""

SCRIPT = """
function sortKey(row, column, numeric) {
  var cell = row.cells[column];
  if (!numeric) return cell.textContent.toLowerCase();
  var value = cell.getAttribute("data-sort");
  return value === "" ? null : parseFloat(value);
}
function sortTable(table, column, ascending) {
  var header = table.tHead.rows[0].cells[column];
  var numeric = header.getAttribute("data-type") === "num";
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = sortKey(a, column, numeric), y = sortKey(b, column, numeric);
    if (x === null || y === null) return (x === null) - (y === null);  // undefined values last either way
    return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
  });
  rows.forEach(function (row) { body.appendChild(row); });
  Array.prototype.forEach.call(header.parentNode.cells, function (th) { th.className = ""; });
  header.className = ascending ? "asc" : "desc";
}
document.querySelectorAll("table.sortable th").forEach(function (th) {
  if (th.getAttribute("data-type") === "none") return;
  th.addEventListener("click", function () {
    sortTable(th.closest("table"), th.cellIndex, th.className !== "asc");
  });
});
var imageTable = document.getElementById("image-table");
var filterBox = document.getElementById("filter"), categoryBox = document.getElementById("category");
function columnIndex(table, title) {
  return Array.prototype.map.call(table.tHead.rows[0].cells, function (th) { return th.textContent; }).indexOf(title);
}
var categoryColumn = columnIndex(imageTable, "category");
function applyFilter() {
  var words = filterBox.value.toLowerCase(), category = categoryBox.value, shown = 0;
  Array.prototype.forEach.call(imageTable.tBodies[0].rows, function (row) {
    var visible = row.textContent.toLowerCase().indexOf(words) >= 0 &&
                  (category === "" || row.cells[categoryColumn].textContent === category);
    row.hidden = !visible;
    shown += visible;
  });
  document.getElementById("shown").textContent = shown + " of " + imageTable.tBodies[0].rows.length + " images";
}
filterBox.addEventListener("input", applyFilter);
categoryBox.addEventListener("change", applyFilter);
document.querySelectorAll("a.category").forEach(function (link) {
  link.addEventListener("click", function () {
    categoryBox.value = link.getAttribute("data-category");
    applyFilter();
  });
});
if (/[?&]selftest=1\\b/.test(location.search)) {
  var diceColumn = columnIndex(imageTable, "Dice"), imageColumn = columnIndex(imageTable, "image");
  sortTable(imageTable, diceColumn, true);
  var rows = imageTable.tBodies[0].rows;
  var output = document.getElementById("selftest");
  output.textContent = JSON.stringify({
    errors: window.reportErrors, rows: rows.length,
    dice: Array.prototype.map.call(rows, function (row) { return row.cells[diceColumn].getAttribute("data-sort"); }),
    images: Array.prototype.map.call(rows, function (row) { return row.cells[imageColumn].textContent; })
  });
  output.hidden = false;
}
"""


# ---------------------------------------------------------------------------------------------- README tables


def readme_tables() -> str:
    """The Markdown tables of metrics and failure rules docs/reference.md carries, from METRICS and FAILURE_RULES."""
    lines = ["| metrics.csv column | unit | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {unit} | {meaning} |" for key, _, unit, meaning in METRICS]
    lines += ["", "| category | rule (checked in this order; the first that holds names the image) |",
              "| --- | --- |"]
    lines += [f"| {name} | {rule} |" for name, rule in FAILURE_RULES]
    return "\n".join(lines) + "\n"
