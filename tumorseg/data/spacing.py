"""Pixel sizes as text: "0.98" for square pixels, "0.9x1.2" for rows x columns, read and written one way."""

from __future__ import annotations

import math

SPACING_FORM = "one positive number (square pixels, e.g. 0.98) or rows x columns (e.g. 0.9x1.2)"


def parse_spacing(text: str) -> tuple[float, float]:
    """A pixel size in mm as (rows, columns) from "0.98" (square pixels) or "0.9x1.2" (rows x columns).

    Raises ValueError for anything else: a number that is not positive and
    finite, an empty part, or more than two parts.
    """
    parts = text.strip().lower().split("x")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{text!r} is not a pixel size in mm: give {SPACING_FORM}")
        values.append(value)
    if len(values) > 2:
        raise ValueError(f"{text!r} is not a pixel size in mm: give {SPACING_FORM}")
    return values[0], values[-1]


def format_spacing(spacing: tuple[float, float], significant: int | None = None) -> str:
    """A pixel size (rows, columns) as `parse_spacing` reads it: one number when both sides print alike, else
    rows x columns.

    Args:
        spacing: the pixel size along rows, then columns.
        significant: digits kept per number (metadata.csv written from a volume header keeps 6); None keeps
            Python's shortest exact form, so the text reads back to the same floats.
    """
    rows, columns = (f"{value}" if significant is None else f"{value:.{significant}g}" for value in spacing)
    return rows if rows == columns else f"{rows}x{columns}"
