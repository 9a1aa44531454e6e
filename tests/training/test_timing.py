import pytest

from config import Config
from tumorseg.training import timing


def test_estimate_counts_every_epoch_and_the_time_limit():
    config = Config(EPOCHS=50)
    assert timing.estimate_minutes(1.0, config, 60, 0.0) == pytest.approx(50.0)
    assert timing.estimate_minutes(1.0, Config(EPOCHS=50, TIME_LIMIT_MINUTES=20), 60, 0.0) == 20
