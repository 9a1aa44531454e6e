"""Decision rule: probability map -> binary tumour mask, and its choice on validation data.

A `DecisionRule` thresholds a probability map and may then clean the mask:
fill enclosed holes, drop small connected components, keep only the largest
one or only the most probable one (the highest summed probability). `search_rule` tries every combination of a grid of such settings on
validation maps and returns the one with the best mean per-image Dice.

Rules are applied at each image's native resolution: test.py resizes the
probability map back to the image before thresholding, so
`min_component_pixels` counts native pixels. Search on maps at that same
resolution, or the chosen size limit means something else at test time.

Components are 8-connected (diagonal neighbours touch); holes are background
regions that no 4-connected path joins to the image border, scipy's default
and the complement of 8-connectivity, so a one-pixel diagonal gap in a ring
does not open its hole.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from config import Config
from metrics import Counts, dice_from_counts, dice_per_image
from tumorseg.data import reading
from tumorseg.files import save_json
from tumorseg.inference.predict import native_probabilities
from tumorseg.runs.checkpoints import load_checkpoint, save_checkpoints

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

DEFAULT_THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
DEFAULT_MIN_SIZES = (0, 16, 64, 256)


@dataclass(frozen=True)
class DecisionRule:
    """How a probability map becomes a mask; the defaults are a plain `probability > 0.5`.

    The steps run in this order: threshold, fill holes, drop small components,
    keep the largest or the most probable. Filling first means a component's size is the area
    inside its outline, so a ring-shaped tumour with a dark core is not judged
    by its rim alone, and removing components afterwards cannot open new holes.

    Args:
        threshold: a pixel is tumour where its probability is strictly greater
            (`>`, as everywhere in this project); a pixel exactly at the
            threshold is background. In [0, 1]; 1 gives an empty mask.
        keep_largest: keep only the largest 8-connected component; on a tie in
            size the first in label order (row-major position of its top-left
            pixel) wins.
        min_component_pixels: drop components with fewer pixels than this,
            counted at the resolution the rule is applied at; 0 or 1 drops
            nothing. If every component is smaller, the result is empty.
            With `keep_largest` the largest survives only if it is big enough.
        fill_holes: fill background regions fully enclosed by tumour.
        keep_most_probable: keep only the component with the highest summed
            probability (its pixels' probabilities added, filled holes
            included) among those big enough; ties go to the first in label
            order. Unlike `keep_largest`, a large but faint false alarm on
            normal anatomy loses to a smaller confident lesion. Not together
            with `keep_largest`.

    Edge cases: an empty thresholded mask stays empty under every rule; NaN
    probabilities are background (NaN > threshold is false).

    Raises:
        ValueError: a field has the wrong type or is out of range.
    """

    threshold: float = 0.5
    keep_largest: bool = False
    min_component_pixels: int = 0
    fill_holes: bool = False
    keep_most_probable: bool = False

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 <= t <= 1:  # also refuses NaN
            raise ValueError(f"threshold must be a number in [0, 1], got {t!r}")
        for name in ("keep_largest", "fill_holes", "keep_most_probable"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.keep_largest and self.keep_most_probable:
            raise ValueError("keep_largest and keep_most_probable exclude each other: each keeps one component")
        m = self.min_component_pixels
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
            raise ValueError(f"min_component_pixels must be an integer >= 0, got {m!r}")

    def apply(self, probability: np.ndarray) -> np.ndarray:
        """The boolean mask, shape (H, W), of a probability map of shape (H, W).

        Raises:
            ValueError: `probability` is not 2-D.
        """
        probability = np.asarray(probability)
        if probability.ndim != 2:
            raise ValueError(f"expected a 2-D probability map, got shape {probability.shape}")
        mask = probability > self.threshold
        if self.fill_holes:
            mask = ndimage.binary_fill_holes(mask)
        if self.keep_largest or self.keep_most_probable or self.min_component_pixels > 1:
            labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
            masses = np.bincount(labels.ravel(), weights=np.nan_to_num(probability.ravel()), minlength=count + 1)
            mask = _kept_labels(np.bincount(labels.ravel(), minlength=count + 1), self, masses)[labels]
        return mask

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (JSON-ready)."""
        return {"threshold": float(self.threshold), "keep_largest": self.keep_largest,
                "min_component_pixels": int(self.min_component_pixels), "fill_holes": self.fill_holes,
                "keep_most_probable": self.keep_most_probable}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecisionRule:
        """The rule saved by `to_dict`; missing keys take their defaults.

        Raises:
            ValueError: unknown keys (all named), or a bad value (see the class).
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown decision-rule keys: {', '.join(unknown)} "
                             f"(expected some of: {', '.join(names)})")
        return cls(**d)

    def describe(self) -> str:
        """Short text in the order the steps run, e.g. "threshold 0.45, fill holes, largest component"."""
        parts = [f"threshold {self.threshold:g}"]
        if self.fill_holes:
            parts.append("fill holes")
        if self.min_component_pixels > 1:
            parts.append(f"components of {self.min_component_pixels}+ px")
        if self.keep_largest:
            parts.append("largest component")
        if self.keep_most_probable:
            parts.append("most probable component")
        return ", ".join(parts)


def _kept_labels(sizes: np.ndarray, rule: DecisionRule, masses: np.ndarray) -> np.ndarray:
    """Which labels survive the rule's component steps: bool array indexed by label (0 = background, never kept).

    Args:
        sizes: pixels per label, sizes[0] the background (as `np.bincount(labels)` gives).
        rule: supplies `min_component_pixels`, `keep_largest` and `keep_most_probable`.
        masses: summed probability per label, indexed like `sizes`.
    """
    sizes = sizes.copy()
    sizes[0] = 0
    keep = sizes >= max(rule.min_component_pixels, 1)
    if rule.keep_largest:
        # argmax returns the first maximum: ties go to the lowest label. Background's size is 0,
        # so it is the argmax only when there are no components, and then nothing is kept anyway.
        keep &= np.arange(len(sizes)) == sizes.argmax()
    if rule.keep_most_probable and keep.any():
        # Chosen among the components big enough, so a tiny bright speck cannot win over the lesion.
        keep &= np.arange(len(sizes)) == np.where(keep, masses, -np.inf).argmax()
    return keep


def _component_counts(binary: np.ndarray, truth: np.ndarray,
                      probability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels, true-positive pixels and summed probability per 8-connected label of `binary` (0 = background).

    Args:
        binary: the predicted mask, (H, W) bool.
        truth: the ground-truth mask, (H, W) bool.
        probability: the map `binary` came from, (H, W); NaN counts as 0.
    """
    labels = ndimage.label(binary, structure=EIGHT_CONNECTED)[0]
    sizes = np.bincount(labels.ravel())
    masses = np.bincount(labels.ravel(), weights=np.nan_to_num(probability.ravel()), minlength=len(sizes))
    return sizes, np.bincount(labels[truth], minlength=len(sizes)), masses


def _simplicity(rule: DecisionRule) -> tuple:
    """Sort key preferring the simplest rule: the default, then fewer steps, then threshold nearest 0.5."""
    steps = rule.keep_largest + rule.keep_most_probable + (rule.min_component_pixels > 0) + rule.fill_holes
    # Rounded so 0.45 and 0.55 are equally near 0.5 despite float error; the lower threshold then wins.
    return (rule != DecisionRule(), steps, round(abs(rule.threshold - 0.5), 9), rule.threshold,
            rule.min_component_pixels, rule.keep_largest, rule.keep_most_probable, rule.fill_holes)


def search_rule(probabilities: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                keep_largest: Sequence[bool] = (False, True),
                min_component_pixels: Sequence[int] = DEFAULT_MIN_SIZES,
                fill_holes: Sequence[bool] = (False, True),
                keep_most_probable: Sequence[bool] = (False,)) -> tuple[DecisionRule, list[dict[str, Any]]]:
    """The rule with the highest mean per-image Dice over every combination of the grids.

    Dice follows metrics.py per image (both masks empty = 1, exactly one
    empty = 0), then is averaged over images. Ties in the mean go to the
    simplest rule: the default `DecisionRule()` if it is in the grid, then
    the fewest steps, then the threshold nearest 0.5 (the lower of two
    equally near), then the smaller size limit. Equal masks give bit-equal
    scores, so rules that change nothing on these images do tie.

    Each image is labelled once per threshold (twice where filling holes
    changes the mask); the component steps are then scored from per-label
    pixel counts, without building their masks. Work is confined to the
    bounding box of the pixels above the lowest threshold, which for a
    trained model's maps is small.

    Args:
        probabilities: probability maps, each (H, W), at native resolution (see the module docstring).
        masks: ground-truth masks, same count and shapes; nonzero = tumour.
        thresholds: values for `DecisionRule.threshold`; the default is 0.3 to 0.7 in steps of 0.05.
        keep_largest: values for `DecisionRule.keep_largest`.
        min_component_pixels: values for `DecisionRule.min_component_pixels`.
        fill_holes: values for `DecisionRule.fill_holes`.
        keep_most_probable: values for `DecisionRule.keep_most_probable` (default off: (False, True) adds
            the candidates; combinations with `keep_largest` are skipped, as the rule refuses them).

    Returns:
        The best rule, and a table of every rule tried, best first: dicts of
        `DecisionRule.to_dict()` plus "mean_dice". Duplicate grid values are tried once.

    Raises:
        ValueError: no images, counts or shapes that differ, maps that are not
            2-D, an empty grid, or a grid value `DecisionRule` refuses.
    """
    if len(probabilities) != len(masks):
        raise ValueError(f"{len(probabilities)} probability maps but {len(masks)} masks")
    if not probabilities:
        raise ValueError("no images to choose a rule on")
    rules = list(dict.fromkeys(DecisionRule(*values) for values in itertools.product(
        thresholds, keep_largest, min_component_pixels, fill_holes, keep_most_probable)
        if not (values[1] and values[4])))
    if not rules:
        raise ValueError("every grid must have at least one value")
    row = {rule: i for i, rule in enumerate(rules)}
    # Rules sharing a threshold and hole setting share one labelling.
    groups: dict[float, dict[bool, list[DecisionRule]]] = {}
    for rule in rules:
        groups.setdefault(rule.threshold, {}).setdefault(rule.fill_holes, []).append(rule)
    # Per rule and image: true positives and predicted pixels; with the truth's size that is all Dice needs.
    tp = np.zeros((len(rules), len(probabilities)))
    predicted = np.zeros_like(tp)
    truth_pixels = np.zeros(len(probabilities))
    lowest = min(groups)
    for i, (probability, truth) in enumerate(zip(probabilities, masks, strict=True)):
        probability, truth = np.asarray(probability), np.asarray(truth) != 0
        if probability.ndim != 2 or probability.shape != truth.shape:
            raise ValueError(f"image {i}: probability map {probability.shape} and mask {truth.shape} "
                             "must be the same 2-D shape")
        truth_pixels[i] = truth.sum()
        box = ndimage.find_objects((probability > lowest).astype(np.int8))
        if not box:
            continue  # nothing above any threshold: every rule predicts an empty mask
        # Every rule's mask lies inside this box, and cropping does not change which regions are holes:
        # background on the box's edge reaches the image border in a straight line outside the box.
        probability, truth = probability[box[0]], truth[box[0]]
        for threshold, by_fill in groups.items():
            thresholded = probability > threshold
            counts = {False: _component_counts(thresholded, truth, probability)} if False in by_fill else {}
            if True in by_fill:
                filled = ndimage.binary_fill_holes(thresholded)
                # Without holes filling changes nothing, and the plain labelling is reused.
                unchanged = False in counts and np.array_equal(filled, thresholded)
                counts[True] = counts[False] if unchanged else _component_counts(filled, truth, probability)
            for fill, group in by_fill.items():
                sizes, hits, masses = counts[fill]
                for rule in group:
                    keep = _kept_labels(sizes, rule, masses)
                    tp[row[rule], i], predicted[row[rule], i] = hits[keep].sum(), sizes[keep].sum()
    # True negatives do not enter Dice; zeros stand in for them.
    per_rule = Counts(*(torch.from_numpy(a) for a in (tp, predicted - tp, truth_pixels - tp, np.zeros_like(tp))))
    mean_dice = dice_from_counts(per_rule).mean(dim=1).tolist()
    order = sorted(range(len(rules)), key=lambda r: (-mean_dice[r], _simplicity(rules[r])))
    table = [{**rules[r].to_dict(), "mean_dice": mean_dice[r]} for r in order]
    return rules[order[0]], table


# ----------------------------------------------------------------------------- a trained model's rule


def choose_decision_rule(checkpoint_path: Path, pairs: Sequence[reading.Pair], config: Config,
                         device: torch.device) -> dict:
    """Search threshold and component rules on the validation images at native size; store the best in the checkpoint.

    The best checkpoint's model predicts every validation image as test.py
    would (same preprocessing, probability resized back to the image's own
    size); `postprocess.search_rule` keeps the rule with the highest mean
    per-image Dice. Only the run's own validation images (`pairs`) are used.
    With RULE_MOST_PROBABLE the search also tries the most probable component.
    The rule goes into best.pt (test.py applies it by default) and
    decision_rule.json; the summary (without the candidates' table) is returned.
    """
    loaded = load_checkpoint(checkpoint_path, device)
    probabilities, masks = [], []
    for start in tqdm(range(0, len(pairs), config.BATCH_SIZE), desc="choosing the decision rule", leave=False,
                      dynamic_ncols=True):
        batch = pairs[start:start + config.BATCH_SIZE]
        images = [reading.read_image(pair.image_path, config.IN_CHANNELS) for pair in batch]
        probabilities += native_probabilities(loaded.model, loaded.config, images, device)
        masks += [reading.read_mask(pair.mask_path) for pair in batch]
    rule, table = search_rule(probabilities, masks, keep_most_probable=(False, True) if config.RULE_MOST_PROBABLE
                              else (False,))
    plain_rule = DecisionRule(threshold=config.THRESHOLD)
    plain_dice = float(np.mean([dice_per_image(plain_rule.apply(p)[None], m[None]).item()
                                for p, m in zip(probabilities, masks, strict=True)]))
    result = {"rule": rule.to_dict(), "text": rule.describe(), "val_dice_with_rule": table[0]["mean_dice"],
              "val_dice_threshold_only": plain_dice, "threshold_only": config.THRESHOLD,
              "val_images": len(pairs), "candidates": table}
    save_json(checkpoint_path.parent / "decision_rule.json", result)
    save_checkpoints([checkpoint_path], {**loaded.state, "decision_rule": rule.to_dict()})
    print(f"decision rule: {rule.describe()}: validation Dice at native size {table[0]['mean_dice']:.4f} "
          f"(threshold {config.THRESHOLD} alone: {plain_dice:.4f})")
    return {k: v for k, v in result.items() if k != "candidates"}
