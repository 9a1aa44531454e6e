import pytest

from tumorseg.training import loaders


@pytest.mark.parametrize("images, batch, world, steps", [(19, 9, 1, 2), (18, 9, 1, 2), (20, 9, 1, 3), (1, 4, 1, 0),
                                                         (1, 1, 1, 1), (2, 4, 2, 0), (3, 2, 2, 1)])
def test_steps_per_epoch_leave_out_a_dropped_batch_of_one(images, batch, world, steps):
    assert loaders.steps_per_epoch(images, batch, world) == steps
