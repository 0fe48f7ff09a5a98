"""Small encoders shared by the reference methods and their evaluation.

* ``SmallConvEncoder``: 3 conv layers for images (the calibration encoder of the cluttered-digit
  benchmark), global average pooling to a ``feature_dim`` vector; ``feature_maps`` exposes the
  intermediate maps that Deep InfoMax, AMDIM and CMC contrast.
* ``SequenceEncoder``: strided 1-D convolutions for CPC, (B, C, T) -> (B, feature_dim, T / 16).
"""
from torch import nn

from .._validation import check_int


def _conv_block(conv, channels):
    return nn.Sequential(conv, nn.BatchNorm2d(channels) if isinstance(conv, nn.Conv2d)
                         else nn.BatchNorm1d(channels), nn.ReLU(inplace=True))


class SmallConvEncoder(nn.Module):
    """x (B, in_channels, H, W) -> features (B, feature_dim).

    conv3x3(in, w) BN ReLU maxpool2 -> conv3x3(w, 2w) BN ReLU maxpool2 -> conv3x3(2w, out_dim)
    BN ReLU -> mean over the spatial positions. BatchNorm is part of the calibrated architecture
    (and what MoCo's shuffle-BN acts on). ``feature_maps(x)`` returns the three maps after each
    block (B, w, H/2, W/2), (B, 2w, H/4, W/4), (B, out_dim, H/4, W/4); any H, W >= 4 works."""

    def __init__(self, in_channels=1, out_dim=128, width=32):
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        width = check_int("width", width)
        self.feature_dim = check_int("out_dim", out_dim)
        self.blocks = nn.ModuleList([
            nn.Sequential(_conv_block(nn.Conv2d(in_channels, width, 3, padding=1), width),
                          nn.MaxPool2d(2)),
            nn.Sequential(_conv_block(nn.Conv2d(width, 2 * width, 3, padding=1), 2 * width),
                          nn.MaxPool2d(2)),
            _conv_block(nn.Conv2d(2 * width, out_dim, 3, padding=1), out_dim),
        ])
        self.channels = (width, 2 * width, out_dim)

    def feature_maps(self, x):
        if x.dim() != 4 or x.shape[1] != self.blocks[0][0][0].in_channels:
            raise ValueError(f"x must be (B, {self.blocks[0][0][0].in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, x):
        return self.feature_maps(x)[-1].mean(dim=(2, 3))


class SequenceEncoder(nn.Module):
    """x (B, in_channels, T) -> latents z (B, feature_dim, T // 16), one per 16 samples.

    Four conv1d(kernel 2s, stride s, padding s/2) BN ReLU blocks with strides (4, 2, 2, 1)
    (each latent sees 76 samples), followed by a 1x1 conv to ``feature_dim``: CPC's
    strided encoder g_enc, scaled down. T must be a multiple of 16."""

    downsample = 16

    def __init__(self, in_channels=1, feature_dim=64, width=64):
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        width = check_int("width", width)
        self.feature_dim = check_int("feature_dim", feature_dim)
        layers, channels = [], in_channels
        for stride in (4, 2, 2, 1):
            kernel = 2 * stride if stride > 1 else 3
            layers.append(_conv_block(nn.Conv1d(channels, width, kernel, stride,
                                                padding=(kernel - stride) // 2), width))
            channels = width
        layers.append(nn.Conv1d(width, self.feature_dim, 1))
        self.net = nn.Sequential(*layers)
        self.in_channels = in_channels

    def forward(self, x):
        if x.dim() != 3 or x.shape[1] != self.in_channels or x.shape[2] % self.downsample:
            raise ValueError(f"x must be (B, {self.in_channels}, T) with T a multiple of "
                             f"{self.downsample}, got shape {tuple(x.shape)}")
        return self.net(x)
