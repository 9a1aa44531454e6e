import pytest
import torch
import torch.nn.functional as F

from config import Config
from model import (AttentionGate, AttentionUNet, TypeHead, UNet, build_model, build_model_from_arguments, build_unet,
                   count_parameters, model_arguments)


def test_classic_unet_has_31_million_parameters():
    assert count_parameters(UNet(in_channels=3, base_channels=64, depth=4)) == 31_037_633


def expected_parameters(in_channels: int, base_channels: int, depth: int, attention: bool) -> int:
    """Parameters of a U-Net with transposed-convolution up-sampling, added up layer by layer."""

    def conv(c_in, c_out, kernel, bias=False):
        return c_in * c_out * kernel**2 + (c_out if bias else 0)

    def bn(c):
        return 2 * c  # weight and bias

    def double_conv(c_in, c_out):
        return conv(c_in, c_out, 3) + bn(c_out) + conv(c_out, c_out, 3) + bn(c_out)

    def gate(c_gate, c_skip, c_inter):
        w_g, w_x = conv(c_gate, c_inter, 1) + bn(c_inter), conv(c_skip, c_inter, 1) + bn(c_inter)
        return w_g + w_x + conv(c_inter, 1, 1) + bn(1)  # + psi

    widths = [base_channels * 2**level for level in range(depth + 1)]
    total = double_conv(in_channels, widths[0]) + conv(widths[0], 1, 1, bias=True)  # inc, outc
    for narrow, wide in zip(widths, widths[1:]):
        total += double_conv(narrow, wide)  # Down
        total += conv(wide, narrow, 2, bias=True) + double_conv(wide, narrow)  # Up: transposed conv, DoubleConv
        if attention:
            total += gate(narrow, narrow, narrow // 2)  # gate = up-sampled feature, same width as the skip
    return total


@pytest.mark.parametrize("in_channels, base_channels, expected", [(3, 64, 31_388_201), (1, 16, 1_964_657)])
def test_attention_unet_parameter_count_follows_the_layer_shapes(in_channels, base_channels, expected):
    assert expected_parameters(3, 64, 4, attention=False) == 31_037_633  # the formula agrees with UNet's count
    assert expected_parameters(in_channels, base_channels, 4, attention=True) == expected
    assert count_parameters(AttentionUNet(in_channels, base_channels, 4)) == expected


@pytest.mark.parametrize("height, width", [(64, 64), (37, 50), (101, 33), (5, 7)])
@pytest.mark.parametrize("bilinear", [False, True])
def test_any_input_size_gives_one_logit_per_pixel(height, width, bilinear):
    model = UNet(in_channels=1, base_channels=4, depth=3, bilinear=bilinear).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, height, width)).shape == (2, 1, height, width)


@pytest.mark.parametrize("bilinear", [False, True])
def test_attention_unet_takes_odd_sizes(bilinear):
    model = AttentionUNet(in_channels=3, base_channels=4, depth=4, bilinear=bilinear).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 37, 53)).shape == (2, 1, 37, 53)


def test_width_and_depth_follow_the_arguments():
    small, deeper = UNet(3, 8, 2), UNet(3, 8, 3)
    assert len(small.downs) == 2 and len(deeper.downs) == 3
    assert count_parameters(deeper) > count_parameters(small)
    assert small.inc[0].out_channels == 8


@pytest.mark.parametrize("architecture", [UNet, AttentionUNet])
def test_output_prior_sets_the_starting_probability(architecture):
    model = architecture(1, 4, 2).eval()
    model.set_output_prior(0.02)
    torch.nn.init.zeros_(model.outc.weight)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.randn(1, 1, 16, 16)))
    assert torch.allclose(probs, torch.full_like(probs, 0.02), atol=1e-6)


@pytest.mark.parametrize("gate_size", [(10, 14), (5, 7)])  # same size as the skip, and coarser
def test_gate_coefficients_are_in_0_1_and_keep_the_skip_shape(gate_size):
    torch.manual_seed(0)
    gate = AttentionGate(gate_channels=8, skip_channels=6, inter_channels=3)
    g, skip = torch.randn(2, 8, *gate_size) * 5, torch.randn(2, 6, 10, 14)
    alpha = gate.coefficients(g, skip)
    assert alpha.shape == (2, 1, 10, 14)
    assert alpha.min() >= 0 and alpha.max() <= 1 and alpha.std() > 0
    gated = gate(g, skip)
    assert gated.shape == skip.shape and torch.allclose(gated, skip * alpha)


def test_attention_unet_learns_a_tiny_batch():
    torch.manual_seed(0)
    masks = torch.zeros(4, 1, 32, 32)
    for i in range(4):
        masks[i, :, 4 + 4 * i:14 + 4 * i, 6 + 3 * i:18 + 3 * i] = 1
    images = masks + 0.3 * torch.randn_like(masks)
    model = AttentionUNet(in_channels=1, base_channels=4, depth=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.binary_cross_entropy_with_logits(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # 0.85 -> 0.50 with this seed


def test_build_unet_maps_names_to_classes():
    assert type(build_unet("unet", 1, 4, 2)) is UNet
    model = build_unet("attention_unet", in_channels=1, base_channels=4, depth=2, bilinear=True)
    assert type(model) is AttentionUNet and len(model.downs) == 2 and model.inc[0].in_channels == 1
    with pytest.raises(ValueError, match="unknown model 'Unet'; choose one of: unet, attention_unet"):
        build_unet("Unet")


# ----------------------------------------------------------------------------- type head and space-to-depth stem


@pytest.mark.parametrize("name", ["unet", "attention_unet"])
def test_type_head_gives_one_logit_per_class_and_leaves_the_segmentation_call_unchanged(name):
    torch.manual_seed(0)
    model = build_unet(name, in_channels=1, base_channels=4, depth=2, type_classes=("a", "b", "c")).eval()
    x = torch.randn(2, 1, 40, 36)
    logits, type_logits = model(x, return_type=True)
    assert logits.shape == (2, 1, 40, 36) and type_logits.shape == (2, 3)
    assert torch.equal(model(x), logits)  # every existing caller still gets the segmentation tensor alone
    assert model.type_classes == ("a", "b", "c")
    assert isinstance(model.type_head, TypeHead) and model.type_head[-1].in_features == 16  # bottleneck width


def test_a_network_without_a_head_keeps_its_state_dict_and_refuses_return_type():
    plain = UNet(in_channels=1, base_channels=4, depth=2)
    headed = UNet(in_channels=1, base_channels=4, depth=2, type_classes=("x", "y"))
    assert set(headed.state_dict()) - set(plain.state_dict()) == {k for k in headed.state_dict()
                                                                     if k.startswith("type_head.")}
    assert not hasattr(plain, "type_head")
    with pytest.raises(ValueError, match="type_classes"):
        plain(torch.randn(2, 1, 16, 16), return_type=True)


def multiply_adds(model: torch.nn.Module, size: int, channels: int = 1) -> int:
    """Multiply-adds of one forward pass of a (1, channels, size, size) input, as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, channels, size, size))
    return counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as 2 FLOPs


@pytest.mark.parametrize("name, bilinear", [("unet", False), ("attention_unet", False), ("unet", True)])
def test_space_to_depth_stem_maps_256_px_to_256_px(name, bilinear):
    model = build_unet(name, in_channels=1, base_channels=4, depth=3, bilinear=bilinear, stem="space_to_depth")
    assert model(torch.randn(2, 1, 256, 256)).shape == (2, 1, 256, 256)
    assert model(torch.randn(2, 1, 100, 75)).shape == (2, 1, 100, 75)  # padded to 2**(depth+1), cropped back
    logits, types = build_unet(name, 1, 4, 3, bilinear, "space_to_depth", ("a", "b"))(
        torch.randn(2, 1, 64, 64), return_type=True)
    assert logits.shape == (2, 1, 64, 64) and types.shape == (2, 2)


def test_space_to_depth_at_256_px_costs_what_the_plain_network_costs_at_128_px():
    """The 128 px CPU network (1 channel, 16 wide, 5 levels, as cpu-long): parameters and multiply-adds within 10 %."""
    plain = UNet(in_channels=1, base_channels=16, depth=5)
    stem = UNet(in_channels=1, base_channels=16, depth=5, stem="space_to_depth")
    parameter_ratio = count_parameters(stem) / count_parameters(plain)
    flop_ratio = multiply_adds(stem, 256) / multiply_adds(plain, 128)
    assert 1 <= parameter_ratio < 1.1 and 1 <= flop_ratio < 1.1, (parameter_ratio, flop_ratio)
    # The stem's only extra weights: inc's first conv sees 4x the channels, outc gives 4 logits.
    assert count_parameters(stem) - count_parameters(plain) == 3 * 16 * 9 + 3 * 16 + 3
    assert multiply_adds(plain, 256) > 3.9 * multiply_adds(plain, 128)  # what 256 px costs without the stem


def test_unknown_stem_is_refused():
    with pytest.raises(ValueError, match="space_to_depth"):
        build_unet("unet", stem="pixel_shuffle")


# ----------------------------------------------------------------------------- deep supervision


@pytest.mark.parametrize("name, stem", [("unet", "none"), ("attention_unet", "none"), ("unet", "space_to_depth")])
def test_deep_supervision_heads_add_coarser_logits_in_training_only(name, stem):
    torch.manual_seed(0)
    model = build_unet(name, in_channels=1, base_channels=4, depth=3, stem=stem, deep_supervision=2)
    x = torch.randn(2, 1, 37, 50)
    levels = model.train()(x)
    assert isinstance(levels, list)
    # Full resolution, then 1/2 and 1/4 of the input, ceil-sized: the padding is cropped off as for the output.
    assert [tuple(level.shape) for level in levels] == [(2, 1, 37, 50), (2, 1, 19, 25), (2, 1, 10, 13)]
    model.eval()
    with torch.no_grad():
        plain = build_unet(name, in_channels=1, base_channels=4, depth=3, stem=stem).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("deep_heads.")})
        assert torch.equal(model(x), plain(x))  # eval: exactly the network without heads, one tensor
    typed = build_unet(name, 1, 4, 3, stem=stem, type_classes=("a", "b"), deep_supervision=1)
    (full, half), type_logits = typed.train()(x, return_type=True)
    assert full.shape == (2, 1, 37, 50) and half.shape == (2, 1, 19, 25) and type_logits.shape == (2, 2)
    logits, type_logits = typed.eval()(x, return_type=True)
    assert logits.shape == (2, 1, 37, 50) and type_logits.shape == (2, 2)


def test_deep_supervision_adds_only_head_weights_and_their_prior_and_refuses_levels_beyond_the_decoder():
    plain, deep = UNet(1, 4, 3), UNet(1, 4, 3, deep_supervision=2)
    extra = set(deep.state_dict()) - set(plain.state_dict())
    assert extra == {f"deep_heads.{k}.{p}" for k in (0, 1) for p in ("weight", "bias")}
    assert deep.deep_heads[0].in_channels == 8 and deep.deep_heads[1].in_channels == 16  # levels 1/2 and 1/4
    assert not hasattr(plain, "deep_heads") and plain.deep_supervision == 0
    deep.set_output_prior(0.02)
    for head in deep.deep_heads:
        assert torch.allclose(torch.sigmoid(head.bias), torch.tensor(0.02))
    for bad in (3, -1):
        with pytest.raises(ValueError, match="deep_supervision must lie from 0 to depth-1 = 2"):
            UNet(1, 4, 3, deep_supervision=bad)


def test_build_model_makes_the_network_its_stored_arguments_rebuild():
    plain = Config(BASE_CHANNELS=4, DEPTH=2, IN_CHANNELS=1)
    assert model_arguments(plain) == {"name": plain.MODEL, "in_channels": 1, "base_channels": 4, "depth": 2,
                                      "bilinear": plain.BILINEAR}  # optional parts stored only when set
    extended = Config(BASE_CHANNELS=4, DEPTH=3, IN_CHANNELS=1, STEM="space_to_depth", DEEP_SUPERVISION=1)
    arguments = model_arguments(extended, ["a", "b"])
    assert arguments["stem"] == "space_to_depth" and arguments["deep_supervision"] == 1
    assert arguments["type_classes"] == ["a", "b"]
    built, rebuilt = build_model(extended, ["a", "b"]), build_model_from_arguments(arguments)
    assert built.state_dict().keys() == rebuilt.state_dict().keys()
