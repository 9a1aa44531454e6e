"""Calibration of probability maps: reliability bins, expected calibration error and Brier score over pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CalibrationTracker:
    """Reliability of per-pixel tumour probabilities, accumulated over images.

    Each pixel goes into one of `bins` equal-width bins of its predicted tumour
    probability p over [0, 1]: bin floor(p * bins), and p = 1 into the last
    (bin b holds b/bins <= p < (b+1)/bins, up to rounding). Per bin: n_b
    pixels, mean confidence conf_b (mean p) and observed frequency acc_b (share
    of those pixels that are tumour). The expected calibration error is
    ECE = sum_b n_b / N * |acc_b - conf_b| over all N pixels: the
    positive-class ECE of a binary reliability diagram, not the top-label ECE
    that uses max(p, 1 - p) as confidence. Empty bins add nothing to ECE and
    report NaN confidence and frequency.

    Args:
        bins: number of equal-width probability bins, at least 1.

    Raises:
        ValueError: `bins` is below 1.
    """

    bins: int = 10
    counts: np.ndarray = field(init=False)  # pixels per bin
    probability_sums: np.ndarray = field(init=False)  # sum of p per bin
    positive_counts: np.ndarray = field(init=False)  # tumour pixels per bin

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise ValueError(f"bins must be at least 1, got {self.bins}")
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.probability_sums = np.zeros(self.bins)
        self.positive_counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def bin_edges(self) -> np.ndarray:
        """The bins + 1 edges from 0 to 1."""
        return np.linspace(0.0, 1.0, self.bins + 1)

    def update(self, prob_map: np.ndarray, mask: np.ndarray) -> None:
        """Add the pixels of one image (or of a batch: any shape, as long as both match).

        Args:
            prob_map: predicted tumour probability of each pixel, in [0, 1].
            mask: ground truth of the same shape; nonzero = tumour.

        Raises:
            ValueError: the shapes differ, or a probability lies outside [0, 1] or is NaN; nothing is
                added then.
        """
        if np.shape(prob_map) != np.shape(mask):
            raise ValueError(f"probabilities {np.shape(prob_map)} and mask {np.shape(mask)} differ in shape")
        p = np.asarray(prob_map, dtype=np.float64).ravel()
        tumour = np.asarray(mask, dtype=bool).ravel()
        if not np.all((p >= 0) & (p <= 1)):  # also catches NaN
            raise ValueError("probabilities must lie in [0, 1]")
        index = np.minimum((p * self.bins).astype(np.intp), self.bins - 1)  # 2x faster than searchsorted
        self.counts += np.bincount(index, minlength=self.bins)
        self.probability_sums += np.bincount(index, weights=p, minlength=self.bins)
        self.positive_counts += np.bincount(index[tumour], minlength=self.bins)

    def summary(self) -> dict[str, float | list[float] | list[int]]:
        """The reliability diagram and ECE of every pixel added so far.

        Returns:
            bin_edges (bins + 1 values), and per bin (lists of `bins` values) counts, mean_confidence and
            observed_frequency (NaN for an empty bin), and ece (a float in [0, 1]).

        Raises:
            ValueError: no pixels were added.
        """
        total = int(self.counts.sum())
        if total == 0:
            raise ValueError("no pixels were added")
        filled = self.counts > 0
        confidence = np.full(self.bins, np.nan)
        frequency = np.full(self.bins, np.nan)
        confidence[filled] = self.probability_sums[filled] / self.counts[filled]
        frequency[filled] = self.positive_counts[filled] / self.counts[filled]
        ece = np.sum(self.counts[filled] / total * np.abs(frequency[filled] - confidence[filled]))
        return {
            "bin_edges": self.bin_edges.tolist(),
            "counts": self.counts.tolist(),
            "mean_confidence": confidence.tolist(),
            "observed_frequency": frequency.tolist(),
            "ece": float(ece),
        }
