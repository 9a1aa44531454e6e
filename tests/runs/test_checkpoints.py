"""tumorseg/runs/checkpoints.py: checkpoint files named when unreadable, loaded across versions."""

import pytest
import torch

from config import Config
from model import build_model, model_arguments
from tumorseg.runs.checkpoints import CheckpointError, load_checkpoint, save_checkpoints


def tiny_state(config: Config) -> dict:
    model = build_model(config)
    return {"model_args": model_arguments(config), "model": model.state_dict(), "config": config.to_dict(),
            "epoch": 1}


def test_empty_and_garbage_checkpoints_are_named(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: the file is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="junk.pt: not a checkpoint written by torch.save"):
        load_checkpoint(tmp_path / "junk.pt")


def test_checkpoint_survives_renamed_config_keys_with_a_warning(tmp_path):
    config = Config(BASE_CHANNELS=4, DEPTH=2, IN_CHANNELS=1)
    state = tiny_state(config)
    state["config"]["OLD_KEY_SINCE_RENAMED"] = 3
    save_checkpoints([tmp_path / "a.pt"], state)
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert loaded.config.BASE_CHANNELS == 4
    assert any("OLD_KEY_SINCE_RENAMED" in w for w in loaded.warnings)


def test_checkpoint_of_the_first_format_loads_with_a_warning(tmp_path):
    config = Config(BASE_CHANNELS=4, DEPTH=2, IN_CHANNELS=1)
    state = tiny_state(config)
    del state["model_args"]
    torch.save(state, tmp_path / "v1.pt")  # no format_version: written before it existed
    loaded = load_checkpoint(tmp_path / "v1.pt")
    assert any("older version" in w for w in loaded.warnings)
    x = torch.randn(1, 1, 16, 16)
    reference = build_model(config)
    reference.load_state_dict(state["model"])
    reference.eval(), loaded.model.eval()
    assert torch.equal(reference(x), loaded.model(x))


def test_checkpoint_from_a_newer_format_is_refused(tmp_path):
    save_checkpoints([tmp_path / "new.pt"], tiny_state(Config(BASE_CHANNELS=4, DEPTH=2)))
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer version"):
        load_checkpoint(tmp_path / "new.pt")
