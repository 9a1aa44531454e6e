"""Turn a test.py prediction folder's numbers and images into report.html, one self-contained page.

    python report.py predictions/<run name>     # (re)write predictions/<run name>/report.html
    python report.py --readme                   # the metric and failure-rule tables docs/reference.md carries

test.py writes the page by default; this command writes it again from the
folder's summary.json and metrics.csv. The page itself is drawn by
tumorseg/evaluation/report_page.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tumorseg.evaluation.report_page import readme_tables, write_report
from utils import run_interruptible, tolerant_console


def main(argv: list[str] | None = None) -> int:
    """report.py's command line: (re)write a prediction folder's report.html; the exit code."""
    tolerant_console()
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--readme"]:
        print(readme_tables(), end="")
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if not (folder / "summary.json").is_file():
        print(f"error: {folder}: no summary.json; give a prediction folder written by test.py", file=sys.stderr)
        return 1
    return run_interruptible(lambda: report_folder(folder), f"{folder / 'report.html'} was not changed")


def report_folder(folder: Path) -> int:
    """Write `folder`'s report.html and print its path; the exit code (1 when the folder's files are unusable)."""
    try:
        print(write_report(folder))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyError as error:  # a summary.json edited by hand, or from another program
        print(f"error: {folder / 'summary.json'}: not one test.py wrote (no {error})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
