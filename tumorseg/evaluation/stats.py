"""Statistics over images and patients: summaries, rank correlation, AUROC, class scores, and paired tests.

test.py's summaries and `--compare` (tumorseg/evaluation/comparison.py) and crossval.py's table and
`compare` all take their statistics from here, so both commands pair, test and adjust alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def _defined_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """x and y as float arrays without the pairs in which either is NaN."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two 1-D sequences of one length, got shapes {x.shape} and {y.shape}")
    defined = ~(np.isnan(x) | np.isnan(y))
    return x[defined], y[defined]


def classification_scores(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy and confusion matrix of class labels; every label must be in `classes`.

    The matrix's rows are the true classes and its columns the predicted ones,
    both in `classes` order (a row sums to that class's count). Balanced
    accuracy is the mean recall over the classes present in `truth`. NaN when
    `truth` is empty.
    """
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    for true, guess in zip(truth, predicted, strict=True):
        matrix[index[true], index[guess]] += 1
    present = matrix.sum(axis=1) > 0
    recalls = np.diag(matrix)[present] / matrix.sum(axis=1)[present]
    count = int(matrix.sum())
    return {"count": count, "accuracy": float(np.trace(matrix) / count) if count else math.nan,
            "balanced_accuracy": float(recalls.mean()) if count else math.nan,
            "classes": list(classes), "confusion_matrix": matrix.tolist()}


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of x and y, e.g. of per-image uncertainty and Dice.

    Pairs in which either value is NaN (an undefined metric) are left out.
    NaN when fewer than 2 pairs remain or either side is constant.

    Args:
        x: one value per image.
        y: another value per image, in the same order.
    """
    from scipy import stats  # here, not at the top: it adds about 0.5 s to every import of this module

    x, y = _defined_pairs(x, y)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of scores for telling labels apart, e.g. uncertainty for failed images.

    1.0: every positive scores above every negative; 0.5: no better than
    chance. Images whose score is NaN are left out; NaN when the remaining
    labels are all of one class, or every score is the same (nothing ranks:
    e.g. the zero uncertainty of a model ensembled with itself).

    Args:
        scores: one value per image; higher should mean "more likely positive".
        labels: True for positive images (e.g. failures), in the same order.
    """
    from sklearn.metrics import roc_auc_score  # here, not at the top: it adds about 1 s to every import of this module

    scores, labels = _defined_pairs(scores, labels)
    if labels.size == 0 or np.all(labels == labels[0]) or np.all(scores == scores[0]):
        return math.nan
    return float(roc_auc_score(labels.astype(bool), scores))


def summarise(values: Sequence[float]) -> dict[str, float | int]:
    """mean, median and std (population, ddof=0) of the defined values; count of defined and of NaN ones.

    NaN marks an undefined per-image metric (e.g. HD95 with an empty mask): it
    is left out of the statistics and counted in count_undefined. With no
    defined value, mean, median and std are NaN.

    Args:
        values: one value per image.
    """
    array = np.asarray(values, dtype=np.float64)
    defined = array[~np.isnan(array)]
    has_values = defined.size > 0
    return {
        "mean": float(defined.mean()) if has_values else math.nan,
        "median": float(np.median(defined)) if has_values else math.nan,
        "std": float(defined.std()) if has_values else math.nan,
        "count": int(defined.size),
        "count_undefined": int(array.size - defined.size),
    }


def paired_comparison(differences: Sequence[float]) -> dict[str, float | int | None]:
    """Summary of paired differences (B minus A, one per image or patient) with a two-sided Wilcoxon signed-rank test.

    Zero differences are left out of the test, as in Wilcoxon's original
    test; when every difference is zero (a model compared with itself),
    `wilcoxon_p` is 1.0 and `wilcoxon_w` None: there is nothing to test.

    Args:
        differences: B's score minus A's for each paired unit; NaN is not allowed.
    """
    from scipy import stats  # here, not at the top: only comparisons need it

    array = np.asarray(differences, dtype=np.float64)
    if array.size == 0 or np.isnan(array).any():
        raise ValueError("paired_comparison needs at least one difference and no NaN")
    improved, worsened = int((array > 0).sum()), int((array < 0).sum())
    result: dict[str, float | int | None] = {
        "count": int(array.size), "mean_difference": float(array.mean()),
        "median_difference": float(np.median(array)), "b_better": improved, "b_worse": worsened,
        "equal": int(array.size) - improved - worsened, "wilcoxon_w": None, "wilcoxon_p": 1.0}
    if improved + worsened:
        test = stats.wilcoxon(array, zero_method="wilcox")
        result.update(wilcoxon_w=float(test.statistic), wilcoxon_p=float(test.pvalue))
    return result


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for testing them together, in the order given.

    The smallest p is multiplied by m, the next by m - 1, and so on, each kept
    at least as large as the one before and at most 1. One p-value is returned
    unchanged; an empty list gives an empty list.
    """
    order = np.argsort(np.asarray(p_values, dtype=np.float64), kind="stable")
    adjusted = [0.0] * len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted


def describe_paired_comparison(result: dict) -> str:
    """paired_comparison's result in two lines of words."""
    text = (f"mean difference {result['mean_difference']:+.4f} (median {result['median_difference']:+.4f}); "
            f"B better on {result['b_better']}, worse on {result['b_worse']}, equal on {result['equal']}\n")
    if result["wilcoxon_w"] is None:
        return text + "Wilcoxon signed-rank test: not applicable, every difference is 0"
    return text + (f"Wilcoxon signed-rank test (paired, two-sided): W = {result['wilcoxon_w']:.1f}, "
                   f"p = {result['wilcoxon_p']:.4g}")


def patient_means(values: Iterable[float], patients: Iterable[str]) -> dict[str, float]:
    """Each patient's mean of its images' values (e.g. the Dice of its slices), in order of first appearance.

    Slices of one patient are not independent, so a paired test pairs patients
    scored this way, not slices.

    Args:
        values: one value per image.
        patients: each image's patient, in the same order.
    """
    grouped: dict[str, list[float]] = {}
    for patient, value in zip(patients, values, strict=True):
        grouped.setdefault(patient, []).append(value)
    return {patient: float(np.mean(group)) for patient, group in grouped.items()}
