"""Every experiment setting in one place.

Edit the defaults below, or override any key for one run from the command
line without touching this file: key `FOO_BAR` is `--foo-bar VALUE`

    python train.py --epochs 3 --image-size 128 --augment false

The defaults reproduce the seed pipeline (RGB input, ImageNet statistics,
256 px, 64 base channels). On a CPU, `--image-size 128 --base-channels 16
--in-channels 1 --normalization zscore --lr-schedule cosine` trains about 60x
faster per image; see docs/speed.md and docs/results.md for the measured speed and Dice.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import math
import tokenize
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any


@dataclass
class Config:
    """Every setting of one run with its default; key `FOO_BAR` is the flag `--foo-bar`.

    Raises:
        ValueError: at construction, "invalid config: " and the problems joined by "; ": the NaN or
            infinite floats alone when there are any (they would slip through the range checks),
            otherwise every value out of range, every clashing pair of keys and every unknown choice.
    """

    # --- data
    DATA_ROOT: str = "data/demo"  # folder holding images/ and masks/ (+ optional metadata.csv)
    IMAGE_SIZE: int = 256  # side length the network sees; inputs are resized to it
    IN_CHANNELS: int = 3  # 3 = RGB (grayscale replicated, as in the seed), 1 = grayscale
    NORMALIZATION: str = "imagenet"  # "imagenet" statistics or "zscore" per image
    CROP: bool = False  # crop each slice to the head's square bounding box before resizing (train and test)
    CROP_MARGIN: float = 0.05  # margin around the head box, as a share of its side
    AUGMENT: bool = True  # flips and 90-degree rotations, training only
    AUG_AFFINE: bool = False  # also small scale (0.9-1.1), rotation (15 deg) and shift (6 %), training only
    AUG_INTENSITY: bool = False  # also brightness/contrast (15 %) and gamma (0.8-1.2), training only
    AUG_ELASTIC: bool = False  # also a mild grid distortion, training only
    TEST_FRACTION: float = 0.2  # share of patients held out for test.py --subset test (they choose nothing); 0 = none
    VAL_FRACTION: float = 0.2  # share of the other patients that validate: choose the epoch and decision rule
    SPLIT_GROUP_COLUMN: str = "auto"  # metadata column kept on one side of every split; "auto" = patient_id if present; "none" = random
    FOLDS: int = 0  # K >= 2: hold out fold FOLD of a K-fold split by patient instead of TEST_FRACTION; 0 = off
    FOLD: int = 0  # which fold (0 .. FOLDS-1, or of FOLD_COLUMN's values in order) is held out
    FOLD_COLUMN: str = ""  # metadata column whose values are the folds (e.g. the release's `fold`); "" = none
    SPLIT_FILE: str = ""  # splits.json (crossval.py writes one): entry FOLD gives the train/val/test images; "" = none
    SPLIT_SEED: int = 42  # seeds the split and the folds; runs to compare or ensemble share it, whatever their SEED
    CACHE: str = "memory"  # decoded slices kept in "memory", or on "disk" (memory-mapped, for sets larger than RAM)
    CACHE_DIR: str = ""  # folder of the disk cache; "" = RUNS_DIR/.cache (the data folder may be read-only)
    # --- model
    MODEL: str = "unet"  # "unet", or "attention_unet" (attention gates on the skip connections)
    BASE_CHANNELS: int = 64  # width of the first U-Net level; doubles per level
    DEPTH: int = 4  # number of down-sampling steps
    BILINEAR: bool = False  # bilinear up-sampling instead of transposed convolutions
    STEM: str = "none"  # "none", or "space_to_depth": 2x2 pixel blocks in as channels, out as pixels (~half-size cost)
    TYPE_COLUMN: str = ""  # metadata.csv column a bottleneck head learns to classify (tumor_class); "" = no head
    TYPE_WEIGHT: float = 0.1  # weight of the type head's cross-entropy in the loss (with TYPE_COLUMN)
    DEEP_SUPERVISION: int = 0  # N (1 .. DEPTH-1): also train 1x1-conv outputs at the N decoder levels below full size; 0 = off
    # --- optimisation
    BATCH_SIZE: int = 16  # images per step
    HARD_SAMPLING: float = 0.0  # share of each epoch drawn in proportion to each slice's latest loss; 0 = plain shuffle
    BALANCE_COLUMN: str = ""  # metadata.csv column (tumor_class) whose values are drawn equally often per epoch; "" = off
    LEARNING_RATE: float = 1e-3  # Adam step size
    LR_SCHEDULE: str = "constant"  # "constant", or "cosine" decay to 0 over EPOCHS (per step)
    EPOCHS: int = 50  # upper bound on training epochs
    TIME_LIMIT_MINUTES: float = 0.0  # stop after the epoch that passes this wall time; 0 = no limit
    PATIENCE: int = 0  # stop after this many epochs without a better validation Dice; 0 = never
    BCE_WEIGHT: float = 1.0  # weight of binary cross-entropy in the loss
    DICE_WEIGHT: float = 1.0  # weight of soft Dice in the loss
    DICE_RECALL_WEIGHT: float = 0.5  # Dice term's weight of missed tumour vs false alarm; 0.5 = Dice, 0.7 = Tversky
    EMA_DECAY: float = 0.0  # validate and save a moving average of the weights, decay per step (e.g. 0.999); 0 = off
    THRESHOLD: float = 0.5  # probability above which a pixel counts as tumour (in training's validation)
    SEARCH_RULE: bool = True  # after training, choose threshold and component rules on validation (test.py uses it)
    RULE_MOST_PROBABLE: bool = False  # the rule search also tries keeping only the component of highest summed probability
    TTA: bool = False  # test.py averages each image's 8 flips/90-degree rotations (8x slower)
    SEED: int = 42  # seeds the weights, the data order and the augmentation
    RECIPE: str = ""  # named set of values from RECIPES below ("seed", "cpu", "cpu-long", "gpu"); flags override it
    # --- machine
    DEVICE: str = "auto"  # "auto" picks cuda, then mps, then cpu; or name one
    NUM_WORKERS: int = 0  # DataLoader worker processes; 0 loads in the main process
    AMP: str = "off"  # precision of the network: "off", "bf16", "fp16" (loss-scaled) or "auto" (bf16 if native, else off)
    CHANNELS_LAST: bool = False  # channels-last memory format for the model and its batches (bench.py --compare: faster?)
    COMPILE: bool = False  # torch.compile the model (slower first steps); falls back with a warning where it cannot
    # --- outputs
    RUNS_DIR: str = "runs"  # each training run writes RUNS_DIR/<run name>/
    RUN_NAME: str = ""  # name of this run's folder; "" = a timestamp
    PREDICTION_ROOT: str = "predictions"  # test.py writes PREDICTION_ROOT/<run name>/
    PREVIEW_IMAGES: int = 4  # validation images shown in TensorBoard each epoch

    def __post_init__(self) -> None:
        # nan slips through every comparison below and inf through most: refuse both first.
        non_finite = [f"{f.name} must be a finite number, got {getattr(self, f.name)}"
                      for f in dataclasses.fields(self)
                      if type(f.default) is float and not math.isfinite(getattr(self, f.name))]
        if non_finite:
            raise ValueError("invalid config: " + "; ".join(non_finite))
        checks = [
            (self.IMAGE_SIZE >= 2**self.DEPTH, f"IMAGE_SIZE must be at least 2**DEPTH = {2**self.DEPTH}"),
            # A batch of one image at a 1x1 bottleneck gives BatchNorm a single value per channel: it raises. The
            # input is padded to a multiple of 2**DEPTH, so the bottleneck is 1x1 exactly at IMAGE_SIZE = 2**DEPTH.
            (self.BATCH_SIZE != 1 or self.IMAGE_SIZE != 2**self.DEPTH,
             f"BATCH_SIZE 1 cannot train at IMAGE_SIZE {self.IMAGE_SIZE} with DEPTH {self.DEPTH}: the bottleneck "
             f"is 1x1 (IMAGE_SIZE = 2**DEPTH), where BatchNorm needs at least 2 images per batch; use "
             f"BATCH_SIZE >= 2, an IMAGE_SIZE above 2**DEPTH = {2**self.DEPTH} or a smaller DEPTH"),
            (0 < self.VAL_FRACTION < 1, "VAL_FRACTION must lie strictly between 0 and 1"),
            (0 <= self.TEST_FRACTION < 1, "TEST_FRACTION must lie from 0 to below 1"),
            (not (self.FOLDS and self.FOLD_COLUMN), "give FOLDS or FOLD_COLUMN, not both (the column sets the folds)"),
            (not (self.SPLIT_FILE and (self.FOLDS or self.FOLD_COLUMN)),
             "give SPLIT_FILE or FOLDS/FOLD_COLUMN, not both (the file lists every fold's images)"),
            ((self.FOLD_COLUMN == "" and not self.SPLIT_FILE) or self.FOLD >= 0, "FOLD must not be negative"),
            (0 < self.THRESHOLD < 1, "THRESHOLD must lie strictly between 0 and 1"),
            (min(self.BATCH_SIZE, self.EPOCHS, self.BASE_CHANNELS, self.DEPTH) >= 1,
             "BATCH_SIZE, EPOCHS, BASE_CHANNELS and DEPTH must be at least 1"),
            (self.LEARNING_RATE > 0, "LEARNING_RATE must be positive"),
            (min(self.NUM_WORKERS, self.PREVIEW_IMAGES, self.TIME_LIMIT_MINUTES, self.PATIENCE) >= 0,
             "NUM_WORKERS, PREVIEW_IMAGES, TIME_LIMIT_MINUTES and PATIENCE must not be negative"),
            (0 <= self.CROP_MARGIN <= 1, "CROP_MARGIN must lie between 0 and 1"),
            (0 <= self.HARD_SAMPLING <= 1, "HARD_SAMPLING must lie between 0 and 1"),
            (self.FOLDS == 0 or (self.FOLDS >= 2 and 0 <= self.FOLD < self.FOLDS),
             f"FOLDS must be 0 or at least 2, and FOLD between 0 and FOLDS-1 (got FOLDS={self.FOLDS}, "
             f"FOLD={self.FOLD})"),
            (min(self.BCE_WEIGHT, self.DICE_WEIGHT) >= 0, "BCE_WEIGHT and DICE_WEIGHT must not be negative"),
            (self.TYPE_WEIGHT >= 0, "TYPE_WEIGHT must not be negative"),
            (0 <= self.DEEP_SUPERVISION <= self.DEPTH - 1,
             f"DEEP_SUPERVISION must lie from 0 to DEPTH-1 = {self.DEPTH - 1} (one head per decoder level below "
             f"full resolution), got {self.DEEP_SUPERVISION}"),
            # Both choose the epoch's draws; combining the two rules is not defined.
            (not (self.BALANCE_COLUMN and self.HARD_SAMPLING),
             "BALANCE_COLUMN and HARD_SAMPLING both choose each epoch's slices: use one (--hard-sampling 0 "
             'or --balance-column "")'),
            (0 < self.DICE_RECALL_WEIGHT < 1, "DICE_RECALL_WEIGHT must lie strictly between 0 and 1"),
            (0 <= self.EMA_DECAY < 1, "EMA_DECAY must lie from 0 (off) to below 1"),
            # The stem halves the resolution once more: the padded input is a multiple of 2**(DEPTH + 1).
            (self.STEM != "space_to_depth" or self.IMAGE_SIZE >= 2**(self.DEPTH + 1),
             f"IMAGE_SIZE must be at least 2**(DEPTH + 1) = {2**(self.DEPTH + 1)} with STEM space_to_depth"),
            (self.STEM != "space_to_depth" or self.BATCH_SIZE != 1 or self.IMAGE_SIZE != 2**(self.DEPTH + 1),
             f"BATCH_SIZE 1 cannot train at IMAGE_SIZE {self.IMAGE_SIZE} with DEPTH {self.DEPTH} and STEM "
             "space_to_depth: the bottleneck is 1x1, where BatchNorm needs at least 2 images per batch"),
            (self.BCE_WEIGHT + self.DICE_WEIGHT > 0,
             "BCE_WEIGHT and DICE_WEIGHT must not both be 0 (the loss would not depend on the model)"),
            (self.SPLIT_GROUP_COLUMN != "", 'SPLIT_GROUP_COLUMN must name a column, "auto" or "none" (random slices)'),
            (not self.RUN_NAME or _is_plain_folder_name(self.RUN_NAME),
             f"RUN_NAME {self.RUN_NAME!r} must be a plain folder name inside RUNS_DIR "
             "(no '/', '\\', drive or leading '.')"),
        ]
        for value, choices in ((self.NORMALIZATION, ("imagenet", "zscore")), (self.IN_CHANNELS, (1, 3)),
                               (self.LR_SCHEDULE, ("constant", "cosine")),
                               (self.MODEL, ("unet", "attention_unet")), (self.RECIPE, ("", *RECIPES)),
                               (self.STEM, ("none", "space_to_depth")),
                               (self.AMP, ("off", "bf16", "fp16", "auto")), (self.CACHE, ("memory", "disk"))):
            checks.append((value in choices, f"{value!r} is not one of {choices}"))
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("invalid config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every key."""
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> tuple[Config, list[str]]:
        """Rebuild from a saved `to_dict`, e.g. a checkpoint's: returns (config, keys ignored).

        Keys this version does not know (renamed or removed ones) are ignored
        and listed. A key missing from `values` takes its default, chosen so
        that a config saved without the key runs as it was trained; the few
        keys whose meaning moved are translated below (see CHANGELOG.md).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        if "SEED" in values and "SPLIT_SEED" not in values:  # without SPLIT_SEED, SEED seeded the split too
            values = {**values, "SPLIT_SEED": values["SEED"]}
        if values.get("SPLIT_GROUP_COLUMN") == "":  # "" in a saved config means a random split
            values = {**values, "SPLIT_GROUP_COLUMN": "none"}
        if "TEST_FRACTION" not in values:  # without TEST_FRACTION the split has two sides, no held-out patients
            values = {**values, "TEST_FRACTION": 0.0}
        return cls(**{k: v for k, v in values.items() if k in known}), sorted(set(values) - known)


# Keys only test.py uses; train.py takes every other key.
TEST_ONLY_KEYS = ("TTA", "PREDICTION_ROOT")
TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in TEST_ONLY_KEYS)

# Named sets of values, selected with --recipe NAME; flags given explicitly still override them.
RECIPES: dict[str, dict[str, Any]] = {
    # The seed pipeline exactly: RGB input with ImageNet statistics, 256 px, 31 M parameters.
    "seed": {"IMAGE_SIZE": 256, "IN_CHANNELS": 3, "NORMALIZATION": "imagenet", "BASE_CHANNELS": 64, "DEPTH": 4,
             "LEARNING_RATE": 1e-3, "BATCH_SIZE": 16, "EPOCHS": 50, "LR_SCHEDULE": "constant", "AUGMENT": True,
             "SEARCH_RULE": False},
    # At most 20 minutes per run on one CPU core with bf16 instructions (AVX512-BF16 or AMX): small, grayscale,
    # four levels, a 22-epoch cosine, head crop and every augmentation, and a recall-weighted Dice (0.7).
    # Each chosen by the inner validation of the patient folds (docs/results.md).
    "cpu": {"IMAGE_SIZE": 128, "IN_CHANNELS": 1, "NORMALIZATION": "zscore", "BASE_CHANNELS": 16, "DEPTH": 4,
            "LEARNING_RATE": 1e-3, "BATCH_SIZE": 16, "EPOCHS": 22, "LR_SCHEDULE": "cosine", "CROP": True,
            "AUGMENT": True, "AUG_AFFINE": True, "AUG_INTENSITY": True, "AUG_ELASTIC": True,
            "DICE_RECALL_WEIGHT": 0.7, "AMP": "auto", "CHANNELS_LAST": True},
    # The budget curve's best measured point (docs/results.md): the 13-epoch five-level baseline trained 44
    # epochs, about 50 minutes on one core, with the levers adopted for "cpu" (the recall-weighted Dice).
    # Chosen over "cpu" by inner validation in 5 of 5 folds; the inner validation chose epochs 24 to 37.
    "cpu-long": {"IMAGE_SIZE": 128, "IN_CHANNELS": 1, "NORMALIZATION": "zscore", "BASE_CHANNELS": 16, "DEPTH": 5,
                 "LEARNING_RATE": 1e-3, "BATCH_SIZE": 16, "EPOCHS": 44, "LR_SCHEDULE": "cosine", "CROP": True,
                 "AUGMENT": True, "AUG_AFFINE": True, "AUG_INTENSITY": True, "AUG_ELASTIC": True,
                 "DICE_RECALL_WEIGHT": 0.7, "AMP": "auto", "CHANNELS_LAST": True},
    # One GPU: the shared data's full 256 px, twice the width, 40 epochs, bf16.
    "gpu": {"IMAGE_SIZE": 256, "IN_CHANNELS": 1, "NORMALIZATION": "zscore", "BASE_CHANNELS": 32, "DEPTH": 4,
            "LEARNING_RATE": 1e-3, "BATCH_SIZE": 16, "EPOCHS": 40, "LR_SCHEDULE": "cosine", "CROP": True,
            "AUGMENT": True, "AUG_AFFINE": True, "AUG_INTENSITY": True, "AUG_ELASTIC": True, "NUM_WORKERS": 4,
            "AMP": "auto", "CHANNELS_LAST": True},
}


def _is_plain_folder_name(name: str) -> bool:
    """True for one path component that stays inside its parent on every OS and is not hidden."""
    # Comparing with the last component catches '/', '\\', absolute paths and drives ('C:x').
    return (name == PurePosixPath(name).name == PureWindowsPath(name).name
            and not name.startswith(".") and "\0" not in name)


def parse_bool(text: str) -> bool:
    """'true/false', 'yes/no', 'on/off', '1/0' in any case, surrounding spaces ignored.

    Raises:
        argparse.ArgumentTypeError: any other text (argparse reports it as a bad value of the flag).
    """
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_PARSERS = {bool: parse_bool, int: int, float: float, str: str}


def field_comments() -> dict[str, str]:
    """Each Config key's trailing `# comment` in this file: the one description --help shows."""
    source = inspect.getsource(Config)
    # tokenize, not str.split("#"): a '#' inside a string default is not a comment.
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    class_body = ast.parse(source).body[0].body
    return {node.target.id: comments.get(node.lineno, "")
            for node in class_body if isinstance(node, ast.AnnAssign)}


def reference_table() -> str:
    """docs/reference.md's table of every config key: its default and its comment (`python config.py --reference`)."""
    comments = field_comments()
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{field.name}` | `{field.default!r}` | {comments[field.name]} |"
              for field in dataclasses.fields(Config)]
    return "\n".join(lines) + "\n"


class _Refused(argparse.Action):
    """A config key the script does not take: parsing stops with the parser's `refusal` message."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(self.const.format(option=option_string))


def build_parser(description: str = "", keys: tuple[str, ...] | None = None,
                 refusal: str = "") -> argparse.ArgumentParser:
    """Argument parser with one `--foo-bar` option per config key (or per key in `keys`), typed like its default.

    Scripts may add options of their own before parsing. Abbreviations are
    off, so a mistyped key is an error rather than a silent match; a key not
    in `keys` is refused as unknown, or with `refusal` (its `{option}` filled
    in) where given, e.g. to say which script takes it.
    """
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("config overrides (defaults from config.py)")
    comments = field_comments()
    for field in dataclasses.fields(Config):
        option = "--" + field.name.lower().replace("_", "-")
        if keys is not None and field.name not in keys:
            if refusal:
                group.add_argument(option, action=_Refused, const=refusal, default=argparse.SUPPRESS,
                                   help=argparse.SUPPRESS)
            continue
        kind = type(field.default)
        group.add_argument(
            option,
            dest=field.name,
            type=_PARSERS[kind],
            default=argparse.SUPPRESS,  # absent means "keep the config.py value"
            metavar=kind.__name__.upper(),
            # '%' escaped: argparse expands %-formats in help texts.
            help=f"{comments[field.name]} (default: {field.default!r})".replace("%", "%%"),
        )
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """config.py's defaults, then the recipe's values (if any), then the flags in `args`; bad values exit via `parser`."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    try:
        return with_recipe(Config(), overrides)
    except ValueError as error:
        parser.error(str(error))


def with_recipe(base: Config, overrides: dict[str, Any]) -> Config:
    """`base` with its RECIPE's values (RECIPE from `overrides` if given there) and then `overrides` applied.

    Raises:
        ValueError: an unknown recipe, or a combination that Config refuses.
    """
    recipe = overrides.get("RECIPE", base.RECIPE)
    if recipe and recipe not in RECIPES:
        raise ValueError(f"invalid config: unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return dataclasses.replace(base, **{**RECIPES.get(recipe, {}), **overrides})


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["--reference"]:
        sys.exit("usage: python config.py --reference   # prints docs/reference.md's config table")
    print(reference_table(), end="")
