import argparse
import dataclasses

import pytest

from config import Config, build_parser, config_from_args


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """A command line made only of config overrides, parsed as the scripts do; bad ones exit with a message."""
    parser = build_parser(description)
    return config_from_args(parser, parser.parse_args(argv))


def test_defaults_are_the_seed_pipeline():
    c = Config()
    assert (c.IMAGE_SIZE, c.IN_CHANNELS, c.NORMALIZATION, c.AUGMENT) == (256, 3, "imagenet", True)
    assert (c.BATCH_SIZE, c.LEARNING_RATE, c.EPOCHS, c.THRESHOLD, c.VAL_FRACTION) == (16, 1e-3, 50, 0.5, 0.2)
    assert (c.BASE_CHANNELS, c.DEPTH, c.DEVICE, c.SPLIT_GROUP_COLUMN) == (64, 4, "auto", "auto")


def test_weight_average_is_off_by_default_and_takes_a_decay_below_1():
    assert Config().EMA_DECAY == 0.0
    assert parse_config(["--ema-decay", "0.999"]).EMA_DECAY == 0.999
    assert parse_config(["--ema-decay", "0"]).EMA_DECAY == 0.0


def test_command_line_overrides_each_type():
    c = parse_config(["--epochs", "3", "--image-size", "128", "--augment", "false",
                      "--learning-rate", "3e-4", "--split-group-column", "patient_id"])
    assert (c.EPOCHS, c.IMAGE_SIZE, c.AUGMENT, c.LEARNING_RATE) == (3, 128, False, 3e-4)
    assert c.SPLIT_GROUP_COLUMN == "patient_id"
    assert c.BATCH_SIZE == Config().BATCH_SIZE  # untouched keys keep config.py values


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "three"], "invalid int value"),
    (["--no-such-key", "1"], "unrecognized arguments"),
    (["--epoch", "3"], "unrecognized arguments"),  # no silent abbreviations
    (["--augment", "maybe"], "expected true or false"),
    (["--normalization", "minmax"], "not one of"),
    (["--val-fraction", "1.5"], "VAL_FRACTION"),
    (["--hard-sampling", "1.2"], "HARD_SAMPLING must lie between 0 and 1"),
    (["--deep-supervision", "4"], "DEEP_SUPERVISION must lie from 0 to DEPTH-1 = 3"),  # DEPTH 4: 3 decoder levels
    (["--deep-supervision", "2", "--depth", "2"], "DEEP_SUPERVISION must lie from 0 to DEPTH-1 = 1"),
    (["--deep-supervision=-1"], "DEEP_SUPERVISION must lie from 0 to DEPTH-1"),
    (["--balance-column", "tumor_class", "--hard-sampling", "0.5"],
     "BALANCE_COLUMN and HARD_SAMPLING both choose each epoch's slices"),
    (["--learning-rate", "nan"], "LEARNING_RATE must be a finite number, got nan"),
    (["--val-fraction", "nan"], "VAL_FRACTION must be a finite number"),
    (["--threshold", "nan"], "THRESHOLD must be a finite number"),
    (["--bce-weight", "inf"], "BCE_WEIGHT must be a finite number, got inf"),
    (["--dice-weight=-inf"], "DICE_WEIGHT must be a finite number, got -inf"),
    (["--time-limit-minutes", "inf"], "TIME_LIMIT_MINUTES must be a finite number"),
    (["--bce-weight", "-1"], "BCE_WEIGHT and DICE_WEIGHT must not be negative"),
    (["--dice-recall-weight", "1"], "DICE_RECALL_WEIGHT must lie strictly between 0 and 1"),
    (["--ema-decay", "1"], "EMA_DECAY must lie from 0 (off) to below 1"),
    (["--ema-decay=-0.1"], "EMA_DECAY must lie from 0 (off) to below 1"),
    (["--ema-decay", "nan"], "EMA_DECAY must be a finite number"),
    (["--bce-weight", "0", "--dice-weight", "0"], "must not both be 0"),
    (["--run-name", "a/b"], "must be a plain folder name inside RUNS_DIR"),
    (["--run-name", "a\\b"], "must be a plain folder name inside RUNS_DIR"),
    (["--run-name", "/tmp/x"], "must be a plain folder name inside RUNS_DIR"),
    (["--run-name", "C:x"], "must be a plain folder name inside RUNS_DIR"),
    (["--run-name", "."], "must be a plain folder name inside RUNS_DIR"),
    (["--run-name", ".."], "must be a plain folder name inside RUNS_DIR"),
    (["--run-name", ".hidden"], "must be a plain folder name inside RUNS_DIR"),
])
def test_bad_overrides_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_every_float_key_is_checked_for_finiteness():
    for name in ("LEARNING_RATE", "BCE_WEIGHT", "DICE_WEIGHT", "THRESHOLD", "VAL_FRACTION", "TIME_LIMIT_MINUTES"):
        with pytest.raises(ValueError, match=f"^invalid config: {name} must be a finite number"):
            Config(**{name: float("nan")})


def test_deep_supervision_up_to_depth_minus_one_is_accepted_and_off_by_default():
    assert parse_config(["--deep-supervision", "3"]).DEEP_SUPERVISION == 3
    assert parse_config(["--deep-supervision", "1", "--depth", "2"]).DEEP_SUPERVISION == 1
    assert Config().DEEP_SUPERVISION == 0


def test_a_balance_column_alone_is_accepted_and_off_by_default():
    assert parse_config(["--balance-column", "tumor_class"]).BALANCE_COLUMN == "tumor_class"
    assert Config().BALANCE_COLUMN == ""


def test_plain_run_names_and_one_zero_weight_are_accepted():
    assert Config(RUN_NAME="unet-128_v2.1").RUN_NAME == "unet-128_v2.1"
    assert Config(RUN_NAME="").RUN_NAME == ""  # a timestamp
    assert Config(BCE_WEIGHT=0.0).DICE_WEIGHT == 1.0


def test_round_trip_through_a_saved_dict_ignores_and_lists_unknown_keys():
    c = Config(IMAGE_SIZE=128, BASE_CHANNELS=16)
    assert Config.from_saved(c.to_dict()) == (c, [])
    assert Config.from_saved({**c.to_dict(), "BOGUS": 1}) == (c, ["BOGUS"])


def test_a_config_saved_before_split_seed_keeps_its_split():
    old = {k: v for k, v in Config(SEED=7).to_dict().items() if k != "SPLIT_SEED"}
    assert Config.from_saved(old)[0].SPLIT_SEED == 7  # SEED seeded the split then
    assert Config.from_saved(Config(SEED=7).to_dict())[0].SPLIT_SEED == 42


def test_a_parser_limited_to_some_keys_refuses_the_others(capsys):
    parser = build_parser(keys=("THRESHOLD",))
    with pytest.raises(SystemExit):
        parser.parse_args(["--image-size", "512"])
    assert "unrecognized arguments: --image-size" in capsys.readouterr().err


def test_scripts_can_add_their_own_options():
    parser = build_parser()
    parser.add_argument("--checkpoint")
    args = parser.parse_args(["--checkpoint", "x.pt", "--threshold", "0.3"])
    assert args.checkpoint == "x.pt" and config_from_args(parser, args).THRESHOLD == 0.3


def test_help_shows_each_keys_comment_from_config_py_and_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside the help texts
    parser = build_parser()
    assert "folder holding images/ and masks/ (+ optional metadata.csv) (default: 'data/demo')" in parser.format_help()
    helps = {action.dest: action.help for action in parser._actions}
    for field in dataclasses.fields(Config):
        comment, _, default = helps[field.name].rpartition(" (default: ")
        assert comment.strip(), f"{field.name} has no comment in config.py"
        assert default == f"{field.default!r})"


def test_reference_table_lists_every_config_key_with_its_default_and_comment():
    from config import field_comments, reference_table
    table = reference_table()
    for field in dataclasses.fields(Config):
        assert f"| `{field.name}` | `{field.default!r}` | {field_comments()[field.name]} |\n" in table


def test_docs_reference_carries_the_generated_config_table():
    from conftest import ROOT
    from config import reference_table
    reference = (ROOT / "docs" / "reference.md").read_text()
    assert reference_table() in reference, (
        "docs/reference.md's config table is out of date: paste `python config.py --reference` into it")


def test_config_py_prints_the_reference_table():
    import subprocess
    import sys
    from conftest import ROOT
    from config import reference_table
    printed = subprocess.run([sys.executable, "config.py", "--reference"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert printed == reference_table()


def test_the_long_cpu_recipe_is_the_cpu_recipe_trained_longer():
    from config import RECIPES
    long, short = RECIPES["cpu-long"], RECIPES["cpu"]
    assert long["EPOCHS"] > short["EPOCHS"] and long["LR_SCHEDULE"] == "cosine"  # the schedule spans the whole run
    assert parse_config(["--recipe", "cpu-long"]).EPOCHS == long["EPOCHS"]
    # The levers adopted for the short recipe ride along, so the long one is not a step back on them.
    assert long["DICE_RECALL_WEIGHT"] == short["DICE_RECALL_WEIGHT"] == 0.7


def test_a_split_file_excludes_folds_and_fold_columns():
    with pytest.raises(ValueError, match="give SPLIT_FILE or FOLDS/FOLD_COLUMN, not both"):
        Config(SPLIT_FILE="splits.json", FOLDS=5)
    with pytest.raises(ValueError, match="FOLD must not be negative"):
        Config(SPLIT_FILE="splits.json", FOLD=-1)
    assert Config(SPLIT_FILE="splits.json", FOLD=3).FOLD == 3


def test_a_non_finite_float_is_reported_alone_and_other_problems_all_together():
    from config import parse_bool, with_recipe
    with pytest.raises(ValueError, match=r"^invalid config: THRESHOLD must be a finite number, got nan$"):
        Config(THRESHOLD=float("nan"), EPOCHS=0)
    with pytest.raises(ValueError, match=r"^invalid config: THRESHOLD must lie .*; BATCH_SIZE, EPOCHS"):
        Config(THRESHOLD=2.0, EPOCHS=0)
    assert parse_bool(" Yes ") is True and parse_bool("OFF") is False
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false"):
        parse_bool("maybe")
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        with_recipe(Config(), {"RECIPE": "fast"})
