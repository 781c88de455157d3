"""2D U-Net as used by the published IOP-FL code (Ronneberger et al., MICCAI 2015).

Encoder of ``depth`` down-sampling stages doubling the width each time, a bottleneck, a decoder with
transposed-convolution up-sampling and skip connections, and a final 1x1 convolution to class logits.
Every block is conv3x3 -> BatchNorm -> ReLU, twice. Convolutions carry no bias (BatchNorm follows).
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net for 2D segmentation.

    Args:
        in_channels: input channels C (3 for 2.5D slices or RGB).
        num_classes: output classes K, background included.
        width: channels of the first stage (32 in the paper).
        depth: number of 2x down-sampling stages (4 in the paper); H and W must be divisible by 2**depth.

    Shapes: input ``[B, C, H, W]`` -> logits ``[B, K, H, W]``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 32, depth: int = 4):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError("UNet needs depth >= 1 and width >= 1")
        self.depth = depth
        widths = [width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.encoders.append(_block(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(widths[-2], widths[-1])
        self.upconvs = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_hi, w_lo in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            self.upconvs.append(nn.ConvTranspose2d(w_hi, w_lo, 2, stride=2))
            self.decoders.append(_block(2 * w_lo, w_lo))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.upconvs, self.decoders, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def build_model(in_channels: int, num_classes: int, width: int = 32, depth: int = 4) -> UNet:
    """The project's segmentation network; one place so every engine builds the same thing."""
    return UNet(in_channels=in_channels, num_classes=num_classes, width=width, depth=depth)
