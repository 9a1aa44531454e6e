"""spacing.py: pixel sizes read from and written to text one way."""

import pytest

from tumorseg.data.spacing import format_spacing, parse_spacing


def test_a_pixel_size_is_one_number_or_rows_by_columns():
    assert parse_spacing("0.98") == (0.98, 0.98)
    assert parse_spacing("0.9x1.2") == parse_spacing(" 0.9 X 1.2 ") == (0.9, 1.2)
    for bad in ("", "x", "0.9x", "x1.2", "0.9x1.2x3", "0", "-1", "inf", "nan", "0.9,1.2", "1 mm"):
        with pytest.raises(ValueError, match="not a pixel size in mm"):
            parse_spacing(bad)


def test_formatting_reads_back_exactly_unless_digits_are_asked_for():
    for spacing in ((0.98, 0.98), (0.9, 1.2), (0.9765625, 0.9765625), (1 / 3, 0.5)):
        assert parse_spacing(format_spacing(spacing)) == spacing
    assert format_spacing((0.98, 0.98)) == "0.98" and format_spacing((0.9, 1.2)) == "0.9x1.2"
    assert format_spacing((0.9765625, 1.0), 6) == "0.976562x1"
    # sides that differ only beyond the kept digits print as one number, as they read back alike
    assert format_spacing((0.5, 0.5000001), 6) == "0.5" and format_spacing((0.5, 0.5000001)) == "0.5x0.5000001"
