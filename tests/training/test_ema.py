import pytest
import torch
from torch import nn

from tumorseg.training.ema import ModelEMA


def toy_model(weight: float) -> nn.Sequential:
    """One weight (no bias) and a BatchNorm with running statistics: a parameter to average, buffers to copy."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(weight)
    return model


def test_the_average_follows_the_warm_up_formula_by_hand():
    """decay 0.2: d_0 = min(0.2, 1/10) = 0.1, d_1 = min(0.2, 2/11) = 2/11, d_2 = min(0.2, 3/12) = 0.2 (capped)."""
    model = toy_model(0.0)
    ema = ModelEMA(model, decay=0.2)
    expected = [0.1 * 0.0 + 0.9 * 1.0,             # step 1: the weight became 1 -> 0.9
                2 / 11 * 0.9 + 9 / 11 * 2.0,       # step 2: weight 2 -> 1.8
                0.2 * 1.8 + 0.8 * 3.0]             # step 3: weight 3 -> 2.76, the decay capped at 0.2
    assert expected == pytest.approx([0.9, 1.8, 2.76])
    for step, value in enumerate(expected, 1):
        assert ema.current_decay() == pytest.approx([0.1, 2 / 11, 0.2][step - 1])
        with torch.no_grad():
            model[0].weight.fill_(float(step))  # what an optimiser step would have done
            model[1].running_mean.fill_(10.0 * step)
        model[1].num_batches_tracked += 1
        ema.update()
        assert ema.module[0].weight.item() == pytest.approx(value, abs=1e-6)
        assert ema.updates == step
        # Buffers are copied, not averaged; BatchNorm's own weight and bias stayed 1 and 0, so their average did too.
        assert ema.module[1].running_mean.item() == 10.0 * step
        assert ema.module[1].num_batches_tracked.item() == step
        assert (ema.module[1].weight.item(), ema.module[1].bias.item()) == (1.0, 0.0)
    assert model[0].weight.item() == 3.0  # the live model is never touched by the average


def test_the_copy_is_apart_frozen_in_eval_mode_and_its_state_round_trips():
    model = toy_model(0.5)
    ema = ModelEMA(model, decay=0.9)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert ema.module[0].weight.data_ptr() != model[0].weight.data_ptr()
    with torch.no_grad():
        model[0].weight.fill_(1.5)
    ema.update()
    ema.update()
    restored = ModelEMA(toy_model(-7.0), decay=0.9)
    restored.load_state_dict(ema.module.state_dict(), ema.state_dict())
    assert restored.updates == 2 and restored.current_decay() == ema.current_decay()
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ModelEMA(toy_model(0.0), decay)
