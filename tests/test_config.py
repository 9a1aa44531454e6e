import pytest

from config import Config, build_parser, config_from_args, parse_config


def test_defaults_are_the_seed_pipeline():
    c = Config()
    assert (c.IMAGE_SIZE, c.IN_CHANNELS, c.NORMALIZATION, c.AUGMENT) == (256, 3, "imagenet", True)
    assert (c.BATCH_SIZE, c.LEARNING_RATE, c.EPOCHS, c.THRESHOLD, c.VAL_FRACTION) == (16, 1e-3, 50, 0.5, 0.2)
    assert (c.BASE_CHANNELS, c.DEPTH, c.DEVICE, c.SPLIT_GROUP_COLUMN) == (64, 4, "auto", "")


def test_command_line_overrides_each_type():
    c = parse_config(["--epochs", "3", "--image-size", "128", "--augment", "false",
                      "--learning-rate", "3e-4", "--split-group-column", "approx_patient"])
    assert (c.EPOCHS, c.IMAGE_SIZE, c.AUGMENT, c.LEARNING_RATE) == (3, 128, False, 3e-4)
    assert c.SPLIT_GROUP_COLUMN == "approx_patient"
    assert c.BATCH_SIZE == Config().BATCH_SIZE  # untouched keys keep config.py values


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "three"], "invalid int value"),
    (["--no-such-key", "1"], "unrecognized arguments"),
    (["--epoch", "3"], "unrecognized arguments"),  # no silent abbreviations
    (["--augment", "maybe"], "expected true or false"),
    (["--normalization", "minmax"], "not one of"),
    (["--val-fraction", "1.5"], "VAL_FRACTION"),
])
def test_bad_overrides_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_round_trip_through_a_saved_dict_ignores_and_lists_unknown_keys():
    c = Config(IMAGE_SIZE=128, BASE_CHANNELS=16)
    assert Config.from_saved(c.to_dict()) == (c, [])
    assert Config.from_saved({**c.to_dict(), "BOGUS": 1}) == (c, ["BOGUS"])


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
