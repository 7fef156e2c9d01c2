"""The HDAR sub-network: a 3-D U-Net with a difficulty-attention block at its second encoder scale.

Architecture (widths ``w0, w1, w2, w3``; ``paper`` = 32, 64, 128, 256; ``small`` = 8, 16, 16, 32)::

    input (C_in = 3, or 6 with the coarser field)     full resolution      (X, Y, Z)
    e0 = conv(C_in -> w0)                             full
    e1 = conv(w0 -> w1, stride 2)                     1/2
    e2 = conv(w1 -> w2)                               1/2
    e3 = conv(w2 -> w3, stride 2)                     1/4
    b  = conv(w3 -> w3)                               1/4
    a  = attention(e1, e2)          (w2 channels, in (0, 1))  1/2   <- the difficulty map
    d2 = conv(conv(cat(up(b), e2 * a) -> w2) -> w2)   1/2
    d1 = conv(conv(cat(up(d2), e0 * up(mean_c a)) -> w1) -> w0)   full
    flow = conv(w0 -> 3)  (initialised ~N(0, 1e-5), zero bias)

Every ``conv`` is 3x3x3 followed by LeakyReLU(0.2) (the flow head has no activation); ``up`` is
nearest-neighbour x2 upsampling. The input is zero-padded at its high end to a multiple of 4 and
every output is cropped back, so any input size works.

Attention block (:class:`DifficultyAttention`): both second-scale encoder features are reduced by
1x1x1 convolutions to ``w_att`` channels and summed into a context feature (LeakyReLU), then a 3x3x3
convolution (LeakyReLU) and a 1x1x1 convolution with a sigmoid give a ``w2``-channel map that gates the
skip connection at that scale (element-wise product) and, averaged over channels and upsampled, the
full-resolution skip connection. Its channel mean is what the cascade uses to rank patches.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hdar_pipeline.hdar.layers import crop_to, pad_to_multiple

WIDTHS: dict[str, tuple[int, int, int, int]] = {
    "paper": (32, 64, 128, 256),
    "small": (8, 16, 16, 32),
}

Width = Literal["paper", "small"] | Sequence[int]


def resolve_widths(width: Width) -> tuple[int, int, int, int]:
    """Encoder widths ``(w0, w1, w2, w3)`` for a preset name or an explicit 4-tuple."""
    if isinstance(width, str):
        try:
            return WIDTHS[width]
        except KeyError:
            raise ValueError(f"unknown width {width!r}; choose from {', '.join(WIDTHS)} or give 4 ints") from None
    w = tuple(int(v) for v in width)
    if len(w) != 4 or min(w) < 1:
        raise ValueError(f"width must be 4 positive ints, got {width!r}")
    return w  # type: ignore[return-value]


class ConvBlock(nn.Module):
    """3x3x3 convolution (optionally strided) + LeakyReLU(0.2). Shape ``(B, Cin, ...) -> (B, Cout, .../stride)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class DifficultyAttention(nn.Module):
    """Attention from the two second-scale encoder features.

    Parameters
    ----------
    low_channels, high_channels : int
        Channels of ``e1`` (after the strided conv) and ``e2``.
    att_channels : int
        Width of the context feature.
    out_channels : int
        Channels of the attention map (those of the skip connection it gates).

    ``forward(e1, e2)`` -> map ``(B, out_channels, X/2, Y/2, Z/2)`` with values in ``(0, 1)``.
    """

    def __init__(self, low_channels: int, high_channels: int, att_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce_low = nn.Conv3d(low_channels, att_channels, 1)
        self.reduce_high = nn.Conv3d(high_channels, att_channels, 1)
        self.act = nn.LeakyReLU(0.2)
        self.conv = nn.Conv3d(att_channels, att_channels, 3, padding=1)
        self.out = nn.Conv3d(att_channels, out_channels, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        context = self.act(self.reduce_low(low) + self.reduce_high(high))
        return torch.sigmoid(self.out(self.act(self.conv(context))))


class AttentionUNet(nn.Module):
    """One HDAR sub-network (S1, S2 or S3).

    Parameters
    ----------
    in_channels : int
        3 for S1 (moving, fixed, moving - fixed); 6 for S2/S3 (plus the 3 components of the coarser
        field, in voxels of the network input grid).
    width : "paper", "small" or 4 ints
        Encoder widths, see the module docstring.

    ``forward(x)`` with ``x`` ``(B, in_channels, X, Y, Z)`` (any size) returns ``(flow, attention)``:
    ``flow`` ``(B, 3, X, Y, Z)`` in voxels of the input grid and ``attention``
    ``(B, w2, ceil(X/2), ceil(Y/2), ceil(Z/2))`` in ``(0, 1)``.
    """

    def __init__(self, in_channels: int = 3, width: Width = "paper") -> None:
        super().__init__()
        w0, w1, w2, w3 = resolve_widths(width)
        self.in_channels = in_channels
        self.widths = (w0, w1, w2, w3)
        self.enc0 = ConvBlock(in_channels, w0)
        self.enc1 = ConvBlock(w0, w1, stride=2)
        self.enc2 = ConvBlock(w1, w2)
        self.enc3 = ConvBlock(w2, w3, stride=2)
        self.bottom = ConvBlock(w3, w3)
        self.attention = DifficultyAttention(w1, w2, w1, w2)
        self.dec2a = ConvBlock(w3 + w2, w2)
        self.dec2b = ConvBlock(w2, w2)
        self.dec1a = ConvBlock(w2 + w0, w1)
        self.dec1b = ConvBlock(w1, w0)
        self.flow = nn.Conv3d(w0, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        x, shape = pad_to_multiple(x, 4)
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        b = self.bottom(self.enc3(e2))
        att = self.attention(e1, e2)
        d2 = torch.cat([F.interpolate(b, scale_factor=2, mode="nearest"), e2 * att], dim=1)
        d2 = self.dec2b(self.dec2a(d2))
        gate0 = F.interpolate(att.mean(dim=1, keepdim=True), scale_factor=2, mode="nearest")
        d1 = torch.cat([F.interpolate(d2, scale_factor=2, mode="nearest"), e0 * gate0], dim=1)
        flow = self.flow(self.dec1b(self.dec1a(d1)))
        half = tuple((n + 1) // 2 for n in shape)
        return crop_to(flow, shape), crop_to(att, half)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
