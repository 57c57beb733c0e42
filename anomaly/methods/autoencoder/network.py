"""ResNet-18 encoder and its block-by-block inverse with pixel-shuffle upsampling (Section IV-E).

Encoder: the torchvision ResNet-18 trunk (conv1, bn1, relu, maxpool, layer1..4;
no pooling, no fc), then a 1x1 conv down to ``latent_channels`` (the paper's
latent dimension 32) at 1/32 of the input resolution (7 x 7 at 224²).

Decoder: the same operations in reverse. Every stride-2 step of the encoder
becomes a conv to 4x the output channels followed by ``PixelShuffle(2)`` (Shi et
al.), which avoids the checkerboard artefacts of transposed convolutions:
layer4..layer2 each end with an upsampling residual block, layer1 keeps the
resolution, then the max-pool and the 7x7 stem are undone by one upsampling
each, and a sigmoid gives an image in [0, 1].
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import ResNet

RESNET18_WIDTHS = (64, 128, 256, 512)  # layer1..layer4


def upsample_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv to ``4 * out_channels``, then ``PixelShuffle(2)``: twice the resolution, ``out_channels`` deep."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4 * out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.PixelShuffle(2),
    )


class UpBlock(nn.Module):
    """The inverse of torchvision's ``BasicBlock``: two 3x3 convs and a shortcut, optionally upsampling x2."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        if upsample:
            self.conv2 = upsample_conv(in_channels, out_channels, 3)
        else:
            self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if upsample:
            self.shortcut = nn.Sequential(
                upsample_conv(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels)
            )
        elif in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Encoder(nn.Module):
    """ResNet-18 trunk, then a 1x1 conv to the latent channels."""

    def __init__(self, trunk: ResNet, latent_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.stages = nn.Sequential(trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
        self.to_latent = nn.Conv2d(RESNET18_WIDTHS[-1], latent_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.to_latent(self.stages(self.stem(x)))


class Decoder(nn.Module):
    """The encoder inverted block by block; the output is a [0, 1] image."""

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        widths = RESNET18_WIDTHS
        self.from_latent = nn.Sequential(
            nn.Conv2d(latent_channels, widths[-1], 1, bias=False),
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(inplace=True),
        )
        stages = []
        for wide, narrow in zip(widths[::-1][:-1], widths[::-1][1:], strict=True):  # layer4, layer3, layer2
            stages.append(nn.Sequential(UpBlock(wide, wide), UpBlock(wide, narrow, upsample=True)))
        stages.append(nn.Sequential(UpBlock(widths[0], widths[0]), UpBlock(widths[0], widths[0])))  # layer1
        self.stages = nn.Sequential(*stages)
        self.unpool = nn.Sequential(
            upsample_conv(widths[0], widths[0], 3), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        self.unstem = upsample_conv(widths[0], 3, 7)

    def forward(self, z: Tensor) -> Tensor:
        x = self.unpool(self.stages(self.from_latent(z)))
        return self.unstem(x).sigmoid()


class PixelShuffleAE(nn.Module):
    """Encoder + decoder; input normalised images (B, 3, S, S) with S a multiple of 32."""

    def __init__(self, trunk: ResNet, latent_channels: int = 32) -> None:
        super().__init__()
        self.encoder = Encoder(trunk, latent_channels)
        self.decoder = Decoder(latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))
