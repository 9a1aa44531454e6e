"""Tests of tumorseg/data/sampling.py: the hard-example and class-balanced samplers."""

import pytest
import torch

from tumorseg.data.sampling import BalancedSampler, HardExampleSampler


def test_hard_sampler_draws_uniformly_until_it_knows_losses_then_favours_hard_slices():
    sampler = HardExampleSampler(4, 0.5, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sampler.probabilities(), torch.full((4,), 0.25))
    order = list(sampler)
    assert len(order) == 4 and all(0 <= i < 4 for i in order)
    sampler.record(0, torch.tensor([3.0, 3.0]))  # the first batch: positions order[0], order[1]
    sampler.record(1, torch.tensor([1.0, 1.0]))
    expected = torch.zeros(4)
    for position, loss in zip(order, [3.0, 3.0, 1.0, 1.0], strict=True):
        expected[position] = loss  # a position drawn twice keeps its latest loss
    assert torch.equal(sampler.losses[order], expected[order])
    assert torch.isnan(sampler.losses[[i for i in range(4) if i not in order]]).all()
    probabilities = sampler.probabilities()
    assert probabilities.sum().item() == pytest.approx(1.0)
    known = [i for i in range(4) if i in order]
    filled = torch.where(torch.isnan(sampler.losses), sampler.losses[known].mean(), sampler.losses)
    assert torch.allclose(probabilities, 0.5 / 4 + 0.5 * filled / filled.sum())  # unseen slices: the mean loss


def test_hard_sampler_share_sets_how_much_the_loss_counts():
    losses = torch.tensor([9.0, 1.0, 1.0, 1.0, 0.0])
    for share, hardest in ((0.0, 0.2), (0.5, 0.5 / 5 + 0.5 * 9 / 12), (1.0, 9 / 12)):
        sampler = HardExampleSampler(5, share, 5, torch.Generator())
        sampler.load_state_dict({"losses": losses})
        assert sampler.probabilities()[0].item() == pytest.approx(hardest)
        assert sampler.probabilities()[4].item() == pytest.approx((1 - share) / 5)  # a solved slice, never 0 unless 1
    # Drawn often enough, the hard slice comes up in proportion.
    sampler = HardExampleSampler(5, 1.0, 5, torch.Generator().manual_seed(1))
    sampler.load_state_dict({"losses": losses})
    draws = torch.cat([torch.tensor(list(sampler)) for _ in range(400)])
    assert (draws == 0).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert (draws == 4).sum().item() == 0


def test_hard_sampler_repeats_its_epochs_from_the_same_generator_state_and_refuses_bad_input():
    first = HardExampleSampler(50, 0.5, 8, torch.Generator().manual_seed(3))
    second = HardExampleSampler(50, 0.5, 8, torch.Generator().manual_seed(3))
    epochs_first, epochs_second = [list(first) for _ in range(2)], [list(second) for _ in range(2)]
    assert epochs_first == epochs_second and epochs_first[0] != epochs_first[1]  # same stream, a new draw each epoch
    with pytest.raises(ValueError, match="batch 9 holds 0 positions"):
        first.record(9, torch.ones(8))
    with pytest.raises(ValueError, match="cover 3 slices"):
        first.load_state_dict({"losses": torch.ones(3)})
    with pytest.raises(ValueError, match="hard_share"):
        HardExampleSampler(5, 1.5, 2, torch.Generator())


SKEWED = ["glioma"] * 50 + ["meningioma"] * 7 + ["pituitary"] * 4  # 61 slices: 61 = 3 x 20 + 1


def test_balanced_sampler_draws_each_class_equally_often_and_cycles_through_each_class_without_replacement():
    labels = SKEWED
    sampler = BalancedSampler(labels, torch.Generator().manual_seed(0))
    epochs = [list(sampler) for _ in range(5)]
    for order in epochs:
        assert len(order) == len(sampler) == 61 and all(0 <= i < 61 for i in order)
        counts = [sum(labels[i] == c for i in order) for c in ("glioma", "meningioma", "pituitary")]
        assert sorted(counts) == [20, 20, 21]  # equal within 1, the one extra to a class drawn at random
    draws = [i for order in epochs for i in order]
    # Shuffled cycling: over 5 epochs (about 101 draws of the 50 gliomas) every glioma slice comes up
    # twice or three times, never once or 4 times, as draws with replacement would allow.
    assert {draws.count(i) for i in range(50)} <= {2, 3}
    small = [draws.count(i) for i in range(57, 61)]  # 4 pituitary slices share 100 to 105 draws: evenly
    assert max(small) - min(small) <= 1 and sum(small) in range(100, 106)
    assert epochs[0] != epochs[1]


def test_balanced_sampler_repeats_its_epochs_from_its_state_and_the_generators_and_refuses_a_foreign_state():
    generator = torch.Generator().manual_seed(3)
    first = BalancedSampler(SKEWED, generator)
    list(first)
    state, generator_state = first.state_dict(), generator.get_state()
    expected = [list(first) for _ in range(2)]
    resumed_generator = torch.Generator().manual_seed(99)  # a fresh run's generator, put back as a resume does
    resumed = BalancedSampler(SKEWED, resumed_generator)
    resumed.load_state_dict(state)
    resumed_generator.set_state(generator_state)
    assert [list(resumed) for _ in range(2)] == expected
    with pytest.raises(ValueError, match="do not fit this split's 2 classes of 5 slices"):
        BalancedSampler([0, 0, 1, 1, 1], torch.Generator()).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one"):
        BalancedSampler([], torch.Generator())
