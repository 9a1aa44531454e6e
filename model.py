"""2-D U-Net (Ronneberger et al., 2015) with batch norm, built from small named parts.

At BASE_CHANNELS=64, DEPTH=4, 3 input channels and transposed-convolution
up-sampling it is the classic 31.0 M-parameter U-Net. Any input size works:
the input is padded to a multiple of 2**depth and the output cropped back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class OutConv(nn.Conv2d):
    """1x1 convolution to the output logits."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)


class UNet(nn.Module):
    """U-Net returning one tumour logit per pixel, shape (N, 1, H, W) for input (N, C, H, W).

    Args:
        in_channels: channels of the input image (1 grayscale, 3 RGB).
        base_channels: feature maps at the first level; doubled at every level down.
        depth: number of 2x down-sampling steps (the bottleneck is at 1/2**depth resolution).
        bilinear: up-sample with bilinear interpolation instead of transposed convolutions.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, depth: int = 4, bilinear: bool = False):
        super().__init__()
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], bilinear) for i in reversed(range(depth)))
        self.outc = OutConv(widths[0], 1)

    def set_output_prior(self, foreground_fraction: float) -> None:
        """Start the output bias at logit(foreground_fraction), the share of tumour pixels.

        With tumours covering ~1 % of a slice, a zero bias predicts 50 % tumour
        everywhere and the first hundreds of steps only unlearn that; starting
        at the prior skips this (Lin et al., 2017, focal-loss paper, sec. 4.1).
        """
        fraction = min(max(foreground_fraction, 1e-4), 1 - 1e-4)
        with torch.no_grad():
            self.outc.bias.fill_(math.log(fraction / (1 - fraction)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        # Reflect padding keeps image statistics at the border; fall back to zeros for tiny inputs.
        mode = "reflect" if pad_h < height and pad_w < width else "constant"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)

        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)[..., :height, :width]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
