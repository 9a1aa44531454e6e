"""predict.py: test-time augmentation, float32 probabilities from bf16 logits, the spread of views and members."""

import numpy as np
import pytest
import torch

from config import Config
from tumorseg.inference import predict


def test_tta_averages_the_eight_orientations():
    inputs = torch.randn(2, 1, 8, 8)
    pointwise = lambda x: 3 * x  # noqa: E731  (commutes with every flip and rotation)
    assert torch.allclose(predict.probabilities(pointwise, inputs, tta=True),
                          predict.probabilities(pointwise, inputs, tta=False), atol=1e-6)
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    biased = lambda x: x + ramp  # noqa: E731  (prefers one side of the image)
    averaged = predict.probabilities(biased, inputs, tta=True)
    expected = sum(torch.sigmoid(inputs + torch.rot90(r, -k, (2, 3)))
                   for k in range(4) for r in (ramp, ramp.flip(3))) / 8
    assert torch.allclose(averaged, expected, atol=1e-6)


@pytest.mark.parametrize("tta", [False, True])
def test_bf16_logits_give_float32_probabilities(tta):
    # Logits a little either side of 0 (probability 0.5, the usual threshold): bf16's step there is 2**-8,
    # coarser than the decision rule tuned on float32 maps, so the sigmoid must run on float32 logits.
    inputs = torch.linspace(-0.02, 0.02, 64).reshape(1, 1, 8, 8)
    bf16_model = lambda x: x.to(torch.bfloat16)  # noqa: E731  (what autocast's bf16 forward pass returns)
    maps = predict.probabilities(bf16_model, inputs, tta=tta)
    expected = torch.sigmoid(inputs.to(torch.bfloat16).float())
    assert maps.dtype == torch.float32
    assert torch.allclose(maps, expected, rtol=0, atol=1e-6)  # bf16's step near 0.5 is 0.004
    assert not torch.equal(maps, maps.to(torch.bfloat16).float())  # not on the bf16 grid


def test_spread_over_tta_views_is_their_standard_deviation():
    images = [np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8) for _ in range(2)]
    config = Config(IMAGE_SIZE=8, IN_CHANNELS=1, NORMALIZATION="zscore", DEPTH=1)  # the images' own size
    ramp = torch.arange(8.0).expand(1, 1, 8, 8) / 4

    class Biased(torch.nn.Module):
        def forward(self, x):
            return x + ramp  # each view sees the ramp differently

    biased = Biased()
    inputs = torch.stack([predict.prepare_image(image, config)[0] for image in images])
    views = torch.stack([torch.sigmoid(inputs + torch.rot90(r, -k, (2, 3)))
                         for k in range(4) for r in (ramp, ramp.flip(3))])
    means, spreads = predict.native_probabilities_and_spreads(biased, config, images, torch.device("cpu"), tta=True)
    assert np.allclose(np.stack(means), views.mean(0)[:, 0], atol=1e-6)
    assert np.allclose(np.stack(spreads), views.std(0, correction=0)[:, 0], atol=1e-6)
    assert np.stack(spreads).max() > 0.05  # the views do disagree


def test_members_spread_adds_their_disagreement_to_their_views_spread():
    members = [np.array([0.2, 0.5], np.float32), np.array([0.4, 0.5], np.float32)]
    views_spread = [np.array([0.0, 0.1], np.float32), np.array([0.0, 0.3], np.float32)]
    # two members of two views each: views 0.2 0.2 0.4 0.4, and 0.4 0.6 0.2 0.8
    expected = [np.std([0.2, 0.2, 0.4, 0.4]), np.std([0.4, 0.6, 0.2, 0.8])]
    assert np.allclose(predict.combined_spread(members, views_spread), expected, atol=1e-6)
