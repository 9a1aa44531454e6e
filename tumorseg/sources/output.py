"""The output folder every source writes: staged beside `--out`, never overwritten, with its metadata.csv."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tumorseg.files import OutputError, OutputExists, publish


class PrepareError(Exception):
    """A problem that stops data preparation; the message names the file."""


def refuse_existing_output(out: Path) -> None:
    """Raise PrepareError if `out` exists: outputs are never overwritten."""
    if out.exists():
        raise PrepareError(f"{out}: output folder already exists; remove it or choose another --out")


def write_metadata(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Write `rows` as CSV with a header of `columns`."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """Yield `<out>.partial` with empty images/ and masks/ to write into; publish it as `out` on success.

    On any exception, Ctrl-C included, the folder is removed and a note on the
    exception says so. `out` itself is never written to or removed.
    """
    out = Path(out)
    refuse_existing_output(out)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # left by a run that could not clean up (killed, power cut)
        shutil.rmtree(partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir()  # fails if another run took the name meanwhile, so what we remove below is ours
    try:
        (partial / "images").mkdir()
        (partial / "masks").mkdir()
        yield partial
        try:  # fsynced, then renamed in by a rename that never replaces a folder made meanwhile
            publish({out: partial})
        except OutputExists:
            raise PrepareError(f"{out}: output folder already exists; remove it or choose another --out") from None
        except OutputError as error:
            raise PrepareError(str(error)) from error
    except BaseException as error:
        try:
            shutil.rmtree(partial)
            error.add_note(f"the unfinished {partial} was removed")
        except OSError as cleanup_error:
            error.add_note(f"the unfinished {partial} could not be removed ({cleanup_error}); delete it by hand")
        raise
