"""Scoring predictions: per-image reports, failures, calibration, statistics, comparison, report page."""
