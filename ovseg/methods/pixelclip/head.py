"""PixelCLIP's decoder: a small convolutional upsampler applied to each cluster's cost map independently."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvHead", "DoubleConv"]


class DoubleConv(nn.Module):
    """[conv3×3 (no bias), GroupNorm, ReLU] × 2; GroupNorm groups = channels // ``group_channels``."""

    def __init__(self, in_channels: int, out_channels: int, group_channels: int = 16):
        """The two convolutions.

        Args:
            in_channels: input channels.
            out_channels: output channels (of both convolutions).
            group_channels: GroupNorm channels per group.
        """
        super().__init__()
        groups = max(1, out_channels // group_channels)
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class ConvHead(nn.Module):
    """conv3×3 in->c0; ConvTranspose ×2 c0->c1; DoubleConv; ConvTranspose ×2 c1->c2; DoubleConv; conv3×3 c2->out.

    Module names follow the authors' checkpoint (``conv0``, ``up1``, ``conv1.double_conv.*``, ``up2``,
    ``conv2.double_conv.*``, ``proj``) so their weights load without renaming. Output is 4× the input size.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: tuple[int, int, int] = (64, 64, 32),
                 group_channels: int = 16):
        """The decoder's layers.

        Args:
            in_channels: input channels (one cost map).
            out_channels: output channels.
            channels: the widths c0, c1, c2.
            group_channels: GroupNorm channels per group.
        """
        super().__init__()
        c0, c1, c2 = channels
        self.conv0 = nn.Conv2d(in_channels, c0, kernel_size=3, padding=1)
        self.up1 = nn.ConvTranspose2d(c0, c1, kernel_size=2, stride=2)
        self.conv1 = DoubleConv(c1, c1, group_channels)
        self.up2 = nn.ConvTranspose2d(c1, c2, kernel_size=2, stride=2)
        self.conv2 = DoubleConv(c2, c2, group_channels)
        self.proj = nn.Conv2d(c2, out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv0(x)
        x = self.conv1(self.up1(x))
        x = self.conv2(self.up2(x))
        return self.proj(x)
