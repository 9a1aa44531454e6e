import pytest
import torch

from model import UNet, count_parameters


def test_classic_unet_has_31_million_parameters():
    assert count_parameters(UNet(in_channels=3, base_channels=64, depth=4)) == 31_037_633


@pytest.mark.parametrize("height, width", [(64, 64), (37, 50), (101, 33), (5, 7)])
@pytest.mark.parametrize("bilinear", [False, True])
def test_any_input_size_gives_one_logit_per_pixel(height, width, bilinear):
    model = UNet(in_channels=1, base_channels=4, depth=3, bilinear=bilinear).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, height, width)).shape == (2, 1, height, width)


def test_width_and_depth_follow_the_arguments():
    small, deeper = UNet(3, 8, 2), UNet(3, 8, 3)
    assert len(small.downs) == 2 and len(deeper.downs) == 3
    assert count_parameters(deeper) > count_parameters(small)
    assert small.inc[0].out_channels == 8


def test_output_prior_sets_the_starting_probability():
    model = UNet(1, 4, 2).eval()
    model.set_output_prior(0.02)
    torch.nn.init.zeros_(model.outc.weight)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.randn(1, 1, 16, 16)))
    assert torch.allclose(probs, torch.full_like(probs, 0.02), atol=1e-6)
