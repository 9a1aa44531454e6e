"""2-D U-Net (Ronneberger et al., 2015) with batch norm, built from small named parts,
and its Attention U-Net variant (Oktay et al., 2018) with gated skip connections.

At BASE_CHANNELS=64, DEPTH=4, 3 input channels and transposed-convolution
up-sampling it is the classic 31.0 M-parameter U-Net. Any input size works:
the input is padded to a multiple of 2**depth and the output cropped back.
`build_unet` picks either network by name; `build_model` builds the one a
config describes, and `model_arguments` are what checkpoints store to rebuild it.

Three optional parts, all off by default (without them the network has
exactly the plain U-Net's parameters and outputs): a `TypeHead` that classifies the
image (e.g. the tumour type) from the bottleneck, a space-to-depth stem
(`stem="space_to_depth"`) that folds each 2x2 block of the input into
channels before the first level and unfolds the output the same way, so a
2S px image costs about what an S px one costs in the plain network, and
deep supervision (`deep_supervision=N`): 1x1-convolution heads on the N
decoder levels below full resolution whose logits training adds to the loss
(nnU-Net; Isensee et al., 2021), returned in training mode only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from config import Config


class DoubleConv(nn.Sequential):
    """(3x3 conv, batch norm, ReLU) twice; the conv bias is dropped because BN re-centres."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid_channels = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then DoubleConv: halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Up-sample by 2, concatenate the skip connection, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = False):
        super().__init__()
        if bilinear:
            # Parameter-free up-sampling keeps all channels, so the conv narrows them instead.
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.conv = DoubleConv(in_channels + in_channels // 2, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up-sample `x` 2x, concatenate `skip` (of that size, its channels first), then DoubleConv."""
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class AttentionGate(nn.Module):
    """Additive attention gate: scales each skip pixel by a coefficient in [0, 1] computed from skip and gate.

    alpha = sigmoid(BN(psi(ReLU(BN(W_g g) + BN(W_x x))))), all three 1x1
    convolutions; the output is x * alpha. Convolution biases are dropped
    because each is followed by batch norm, as in the rest of this file.

    Args:
        gate_channels: channels of the gating signal g, the decoder feature that says where to look.
        skip_channels: channels of the skip connection x being gated (the output has the same).
        inter_channels: channels of the space where W_g g and W_x x are added.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int):
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(gate_channels, inter_channels, kernel_size=1, bias=False),
                                 nn.BatchNorm2d(inter_channels))
        self.w_x = nn.Sequential(nn.Conv2d(skip_channels, inter_channels, kernel_size=1, bias=False),
                                 nn.BatchNorm2d(inter_channels))
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, kernel_size=1, bias=False), nn.BatchNorm2d(1),
                                 nn.Sigmoid())

    def coefficients(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Attention coefficients in [0, 1], shape (N, 1, H, W) for a skip of shape (N, C, H, W).

        A gate of another spatial size is projected, then resized bilinearly to the skip's.
        """
        g = self.w_g(gate)
        if g.shape[-2:] != skip.shape[-2:]:
            g = F.interpolate(g, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.psi(F.relu(g + self.w_x(skip)))

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """`skip` scaled pixel by pixel by its attention coefficients (same shape as `skip`)."""
        return skip * self.coefficients(gate, skip)


class AttentionUp(Up):
    """Up whose skip connection is first gated by an AttentionGate, the gate being the up-sampled decoder feature.

    The intermediate width is half the skip's channels (at least 1), the
    default of Oktay et al.'s code.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = False):
        super().__init__(in_channels, out_channels, bilinear)
        skip_channels = in_channels // 2
        up_channels = in_channels if bilinear else in_channels // 2  # what self.up outputs
        self.gate = AttentionGate(up_channels, skip_channels, max(skip_channels // 2, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up-sample `x`, gate `skip` with it, concatenate (gated skip first) and convolve."""
        x = self.up(x)
        return self.conv(torch.cat([self.gate(x, skip), x], dim=1))


class OutConv(nn.Conv2d):
    """1x1 convolution to the output logits."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)


class TypeHead(nn.Sequential):
    """Global average pool of the bottleneck, then a linear layer: one logit per image class (e.g. tumour type)."""

    def __init__(self, in_channels: int, classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, classes))


STEMS = ("none", "space_to_depth")
# What UNet.forward gives: logits, or with deep supervision in training a list of them (full resolution
# first); with return_type, a pair of that and the type logits.
SegmentationOutput = (torch.Tensor | list[torch.Tensor]
                      | tuple[torch.Tensor | list[torch.Tensor], torch.Tensor])


class UNet(nn.Module):
    """U-Net returning one tumour logit per pixel, shape (N, 1, H, W) for input (N, C, H, W).

    Args:
        in_channels: channels of the input image (1 grayscale, 3 RGB).
        base_channels: feature maps at the first level; doubled at every level down.
        depth: number of 2x down-sampling steps (the bottleneck is at 1/2**depth resolution).
        bilinear: up-sample with bilinear interpolation instead of transposed convolutions.
        stem: "none", or "space_to_depth": nn.PixelUnshuffle(2) before `inc` (which then takes 4x the
            channels) and nn.PixelShuffle(2) after `outc` (which then gives 4 logits per position), so the
            levels run at half the input's resolution and the output is back at the input's.
        type_classes: names of the image classes a TypeHead on the bottleneck predicts; () = no head.
            With a head, `forward(x, return_type=True)` returns (segmentation logits, type logits (N, K)).
        deep_supervision: N auxiliary 1x1-conv heads (0 .. depth-1) on the decoder levels at 1/2, 1/4, ..
            1/2**N of the input's resolution (with N = depth-1 the coarsest is the level just above the
            bottleneck). In training mode the segmentation logits are then a list, full resolution first,
            then each head's logits at its level (see `forward`); in eval mode the output is the plain one.
    """

    up_block: type[Up] = Up  # the decoder step; subclasses swap it

    def __init__(self, in_channels: int = 3, base_channels: int = 64, depth: int = 4, bilinear: bool = False,
                 stem: str = "none", type_classes: Sequence[str] = (), deep_supervision: int = 0):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
        if not 0 <= deep_supervision < max(depth, 1):
            raise ValueError(f"deep_supervision must lie from 0 to depth-1 = {depth - 1}, got {deep_supervision}")
        self.depth, self.stem, self.deep_supervision = depth, stem, deep_supervision
        self.fold = 2 if stem == "space_to_depth" else 1  # side of the input block one stem position holds
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.inc = DoubleConv(in_channels * self.fold**2, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(self.up_block(widths[i + 1], widths[i], bilinear) for i in reversed(range(depth)))
        self.outc = OutConv(widths[0], self.fold**2)
        if self.fold > 1:  # parameter-free: the state dict of a plain network is unchanged
            self.unshuffle, self.shuffle = nn.PixelUnshuffle(self.fold), nn.PixelShuffle(self.fold)
        self.type_classes = tuple(type_classes)
        if self.type_classes:  # only then: a network without a head keeps its state dict
            self.type_head = TypeHead(widths[-1], len(self.type_classes))
        if deep_supervision:  # only then: a network without heads keeps its state dict
            # Head k sits on the decoder level at 1/2**k of the levels' resolution; like `outc` it gives
            # fold**2 logits per position, which the stem's shuffle unfolds: 1/2**k of the input's.
            self.deep_heads = nn.ModuleList(OutConv(widths[k], self.fold**2)
                                            for k in range(1, deep_supervision + 1))

    def set_output_prior(self, foreground_fraction: float) -> None:
        """Start the output bias at logit(foreground_fraction), the share of tumour pixels.

        With tumours covering ~1 % of a slice, a zero bias predicts 50 % tumour
        everywhere and the first hundreds of steps only unlearn that; starting
        at the prior skips this (Lin et al., 2017, focal-loss paper, sec. 4.1).
        """
        fraction = min(max(foreground_fraction, 1e-4), 1 - 1e-4)
        with torch.no_grad():
            for head in [self.outc, *getattr(self, "deep_heads", [])]:  # the heads start from it too
                head.bias.fill_(math.log(fraction / (1 - fraction)))

    def forward(self, x: torch.Tensor, return_type: bool = False) -> SegmentationOutput:
        """Segmentation logits (N, 1, H, W); with `return_type` (a network with a TypeHead only), also type logits.

        With deep supervision, in training mode only, the segmentation logits
        are a list: the (N, 1, H, W) logits, then head k's (N, 1, ceil(H/2**k),
        ceil(W/2**k)) for k = 1 .. deep_supervision. Eval mode (validation,
        test.py, export.py) always gets the single tensor, as without heads.
        """
        if return_type and not self.type_classes:
            raise ValueError("return_type=True needs a network built with type_classes (a TypeHead)")
        height, width = x.shape[-2:]
        multiple = 2**self.depth * self.fold
        pad_h, pad_w = -height % multiple, -width % multiple
        # Reflect padding keeps image statistics at the border; fall back to zeros for tiny inputs.
        mode = "reflect" if pad_h < height and pad_w < width else "constant"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        if self.fold > 1:
            x = self.unshuffle(x)

        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        type_logits = self.type_head(x) if return_type else None
        levels = []  # decoder outputs, coarsest first: level depth-1 .. 0
        for up in self.ups:
            x = up(x, skips.pop())
            levels.append(x)
        logits = self._unfold(self.outc(x), height, width)
        if self.deep_supervision and self.training:
            logits = [logits, *(self._unfold(head(levels[-1 - k]), -(-height // 2**k), -(-width // 2**k))
                                for k, head in enumerate(self.deep_heads, 1))]
        return (logits, type_logits) if return_type else logits

    def _unfold(self, logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A head's logits back to input pixels (the stem's shuffle), cropped to `height` x `width` (no padding)."""
        if self.fold > 1:
            logits = self.shuffle(logits)
        return logits[..., :height, :width]


class AttentionUNet(UNet):
    """Attention U-Net (Oktay et al., 2018): the U-Net above with every skip connection gated by an AttentionGate.

    Same arguments, output, padding and `set_output_prior` as UNet. The gate
    is the decoder feature after up-sampling, at the skip's resolution (the
    common simplification of the paper's coarser gating signal). The gates
    add 1 % to the parameters: 31,388,201 at 3/64/4 against UNet's 31,037,633.
    """

    up_block = AttentionUp


ARCHITECTURES: dict[str, type[UNet]] = {"unet": UNet, "attention_unet": AttentionUNet}


def build_unet(name: str, in_channels: int = 3, base_channels: int = 64, depth: int = 4,
               bilinear: bool = False, stem: str = "none", type_classes: Sequence[str] = (),
               deep_supervision: int = 0) -> UNet:
    """The network called `name`, "unet" or "attention_unet" (exact spelling), with UNet's arguments.

    Args:
        name: key of ARCHITECTURES.
        in_channels: channels of the input image (1 grayscale, 3 RGB).
        base_channels: feature maps at the first level; doubled at every level down.
        depth: number of 2x down-sampling steps.
        bilinear: up-sample with bilinear interpolation instead of transposed convolutions.
        stem: "none" or "space_to_depth" (see UNet).
        type_classes: class names of a TypeHead on the bottleneck; () = none.
        deep_supervision: number of auxiliary decoder heads (see UNet); 0 = none.

    Raises:
        ValueError: unknown name or stem, or deep_supervision outside 0 .. depth-1; the message says which.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](in_channels, base_channels, depth, bilinear, stem, type_classes, deep_supervision)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_arguments(config: Config, type_classes: Sequence[str] = ()) -> dict[str, Any]:
    """The network's own constructor arguments, stored in checkpoints apart from the config.

    `stem`, `type_classes` (the TypeHead's class names, from the data) and
    `deep_supervision` (the auxiliary heads, whose weights the state dict
    holds, so a checkpoint rebuilds them to load) are stored only when set,
    so a plain network's arguments are what they always were.
    """
    arguments: dict[str, Any] = {"name": config.MODEL, "in_channels": config.IN_CHANNELS,
                                 "base_channels": config.BASE_CHANNELS, "depth": config.DEPTH,
                                 "bilinear": config.BILINEAR}
    if config.STEM != "none":
        arguments["stem"] = config.STEM
    if type_classes:
        arguments["type_classes"] = list(type_classes)
    if config.DEEP_SUPERVISION:
        arguments["deep_supervision"] = config.DEEP_SUPERVISION
    return arguments


def build_model_from_arguments(arguments: dict[str, Any]) -> UNet:
    """The network `model_arguments` describes."""
    return build_unet(**arguments)


def build_model(config: Config, type_classes: Sequence[str] = ()) -> UNet:
    """The network a config describes (MODEL, IN_CHANNELS, BASE_CHANNELS, DEPTH, BILINEAR, STEM,
    DEEP_SUPERVISION), with a TypeHead for `type_classes` when given."""
    return build_model_from_arguments(model_arguments(config, type_classes))
