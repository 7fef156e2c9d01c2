"""The VoxelMorph network (Balakrishnan et al., IEEE TMI 2019; diffeomorphic variant: Dalca et al., MICCAI 2018 /
MedIA 2019), written here in PyTorch on this package's layers.

Architecture (``vm2``; the paper's Fig. 4 and the authors' original code)::

    x  = cat(moving, fixed)                               full resolution   2 channels
    e1 = conv(x  -> 16, stride 2)                         1/2
    e2 = conv(e1 -> 32, stride 2)                         1/4
    e3 = conv(e2 -> 32, stride 2)                         1/8
    e4 = conv(e3 -> 32, stride 2)                         1/16
    y  = conv(e4 -> 32);           up, cat e3             1/8
    y  = conv(y  -> 32);           up, cat e2             1/4
    y  = conv(y  -> 32);           up, cat e1             1/2
    y  = conv(y  -> 32); y = conv(y -> 32)                1/2
    up, cat x;  y = conv(y -> 16); y = conv(y -> 16)      full             (vm2's extra full-resolution conv)
    flow = conv(16 -> 3)   (weights ~N(0, 1e-5), zero bias; no activation)

Every ``conv`` is 3x3x3 followed by LeakyReLU(0.2), initialised He-normal with zero bias as in the authors' Keras
code (PyTorch's default initialisation shrinks the activations through the eleven layers so much that the network
barely moves its field in the first hundred steps); ``up`` is nearest-neighbour x2 upsampling. ``vm1`` has the
decoder widths 32, 32, 32, 32, 8, 8 and no extra full-resolution convolution. The input is zero-padded at its high
end to a multiple of 16 (four stride-2 levels) and the flow is cropped back, so any input size works.

The output is in voxels of the input grid: a displacement, or in the diffeomorphic variant a stationary velocity
field that :class:`~hdar_pipeline.hdar.cascade.HDARCascade` integrates by scaling and squaring
(:class:`~hdar_pipeline.hdar.layers.VecInt`, 7 squarings as in VoxelMorph). The network takes the place of HDAR's
S1 in a one-level cascade (``CascadeConfig(network="voxelmorph")``), so training, weights, the canonical frame, the
affine pre-alignment and the instance optimisation are HDAR's own.

Why not the ``voxelmorph`` package: its current PyTorch model (0.3.x, "under active development, interfaces may
change") is neurite's ``BasicUNet`` (max pooling, ReLU, other widths), not the published architecture, and it pulls
neurite, pystrum and scikit-image in.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hdar_pipeline.hdar.layers import crop_to, pad_to_multiple
from hdar_pipeline.hdar.unet import ConvBlock

#: Encoder widths (both variants) and decoder widths of ``vm1`` and ``vm2`` (Balakrishnan et al. 2019).
ENCODER_WIDTHS: tuple[int, int, int, int] = (16, 32, 32, 32)
DECODER_WIDTHS: dict[str, tuple[int, ...]] = {"vm1": (32, 32, 32, 32, 8, 8), "vm2": (32, 32, 32, 32, 32, 16, 16)}

#: Spatial sizes are padded to a multiple of this (four stride-2 encoder levels).
MULTIPLE = 16


def check_variant(variant: str) -> str:
    """``variant`` if it names a VoxelMorph architecture (``"vm1"``, ``"vm2"``), else a ValueError."""
    if variant not in DECODER_WIDTHS:
        raise ValueError(f"unknown VoxelMorph variant {variant!r}; choose from {', '.join(DECODER_WIDTHS)}")
    return variant


def he_normal_(conv: nn.Conv3d) -> None:
    """Keras' ``he_normal`` in place: weights from a normal of standard deviation ``sqrt(2 / fan_in)`` truncated at
    two standard deviations (Keras divides the standard deviation by 0.8796, the truncated normal's own, so the
    variance is ``2 / fan_in``); zero bias."""
    fan_in = conv.in_channels * int(torch.tensor(conv.kernel_size).prod())
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(conv.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class VoxelMorphUNet(nn.Module):
    """VoxelMorph's U-Net with its flow head.

    Parameters
    ----------
    variant : {"vm2", "vm1"}
        Decoder widths, see the module docstring.
    in_channels : int
        2: moving and fixed image, in this order (the paper's input).

    ``forward(x)`` with ``x`` ``(B, in_channels, X, Y, Z)`` (any size) returns the field ``(B, 3, X, Y, Z)`` in
    voxels of the input grid (channel ``c`` along array axis ``c``).
    """

    def __init__(self, variant: str = "vm2", in_channels: int = 2) -> None:
        super().__init__()
        dec = DECODER_WIDTHS[check_variant(variant)]
        e1, e2, e3, e4 = ENCODER_WIDTHS
        self.variant = variant
        self.in_channels = in_channels
        self.encoder = nn.ModuleList([ConvBlock(in_channels, e1, stride=2), ConvBlock(e1, e2, stride=2),
                                      ConvBlock(e2, e3, stride=2), ConvBlock(e3, e4, stride=2)])
        # three levels of conv -> up -> concatenate the encoder feature of the level above
        self.up_convs = nn.ModuleList([ConvBlock(e4, dec[0]), ConvBlock(dec[0] + e3, dec[1]),
                                       ConvBlock(dec[1] + e2, dec[2])])
        self.half_convs = nn.ModuleList([ConvBlock(dec[2] + e1, dec[3]), ConvBlock(dec[3], dec[4])])
        full = [ConvBlock(dec[4] + in_channels, dec[5])]
        if len(dec) == 7:
            full.append(ConvBlock(dec[5], dec[6]))
        self.full_convs = nn.ModuleList(full)
        for block in [*self.encoder, *self.up_convs, *self.half_convs, *self.full_convs]:
            he_normal_(block.conv)
        self.flow = nn.Conv3d(dec[-1], 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        x, shape = pad_to_multiple(x, MULTIPLE)
        skips = [x]
        for conv in self.encoder:
            skips.append(conv(skips[-1]))
        y = skips.pop()
        for conv in self.up_convs:
            y = torch.cat([F.interpolate(conv(y), scale_factor=2, mode="nearest"), skips.pop()], dim=1)
        for conv in self.half_convs:
            y = conv(y)
        y = torch.cat([F.interpolate(y, scale_factor=2, mode="nearest"), skips.pop()], dim=1)
        for conv in self.full_convs:
            y = conv(y)
        return crop_to(self.flow(y), shape)
