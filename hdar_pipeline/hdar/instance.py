"""Instance optimisation around the network: an affine pre-alignment before it, a refinement after it.

Both optimise the network's own training loss (local NCC, plus the anti-folding smoothness for the
refinement) with Adam on one image pair, on downsampled copies of the images, so they cost a few seconds
on a CPU for a 160 x 192 x 160 pair.

Shapes and units
----------------
Volumes ``(1, 1, X, Y, Z)`` with intensities in [0, 1]; displacement fields ``(1, 3, X, Y, Z)`` in voxels
of their own grid, channel ``c`` along array axis ``c`` (as in :mod:`hdar_pipeline.hdar.layers`). A field
``u`` warps the moving image as ``M(x + u(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .layers import SpatialTransformer, VecInt, compose_flows, identity_grid, resize_flow, resize_volume
from .losses import anti_folding_loss, local_ncc_loss

__all__ = ["RefineLevel", "affine_displacement", "affine_prealign", "default_refine_levels", "refine_flow",
           "scaled_shape"]


def scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, int, int]:
    """``round(n * scale)`` per axis, at least 4 voxels."""
    return tuple(max(4, int(round(int(n) * float(scale)))) for n in shape)


# ---------------------------------------------------------------------------------- affine pre-alignment


def affine_displacement(delta: torch.Tensor, translation: torch.Tensor, shape: Sequence[int],
                        full_shape: Sequence[int]) -> torch.Tensor:
    """Displacement of the affine map ``x -> x + h (delta q + t)`` sampled on a grid of ``shape``.

    Parameters
    ----------
    delta : Tensor ``(3, 3)``
        The matrix minus the identity, in normalised coordinates ``q = (x - centre) / h`` where ``x`` is
        in voxels of ``full_shape``, ``centre = (n - 1) / 2`` and ``h = n / 2`` per axis (so ``q`` spans
        about [-1, 1] and the entries are unit-free, comparable between axes).
    translation : Tensor ``(3,)``
        ``t``, in the same normalised units (0.1 is a tenth of the half-extent).
    shape : sequence of 3 ints
        The grid to sample the displacement on (cell-centred over the same extent as ``full_shape``).
    full_shape : sequence of 3 ints
        The image grid the map is defined on.

    Returns
    -------
    Tensor ``(1, 3, *shape)``
        Displacement in voxels of ``shape``.
    """
    dev, dt = delta.device, delta.dtype
    s = torch.tensor([a / b for a, b in zip(shape, full_shape)], device=dev, dtype=dt).view(1, 3, 1, 1, 1)
    centre = torch.tensor([(n - 1) / 2 for n in full_shape], device=dev, dtype=dt).view(1, 3, 1, 1, 1)
    half = torch.tensor([n / 2 for n in full_shape], device=dev, dtype=dt).view(1, 3, 1, 1, 1)
    x = (identity_grid(shape, device=dev, dtype=dt) + 0.5) / s - 0.5  # full-grid voxel coordinates
    q = (x - centre) / half
    d = torch.einsum("ij,bj...->bi...", delta, q) + translation.view(1, 3, 1, 1, 1)
    return d * half * s


def affine_prealign(fixed: torch.Tensor, moving: torch.Tensor, *, steps: int = 50, scale: float = 0.25,
                    lr: float = 0.01, window: int = 5) -> torch.Tensor:
    """Fit a 12-parameter affine map of the moving image onto the fixed one and return its displacement.

    Adam on local NCC (``window`` voxels of the downsampled grid) between the fixed image and the warped
    moving image, both downsampled to ``scale`` of their size (antialiased), starting from the identity.
    The network was trained on pairs in one rigidly aligned space; the residual affine misalignment
    between two subjects (scaling and shear) costs it accuracy, and this removes it in about a second.

    Parameters
    ----------
    fixed, moving : Tensor ``(1, 1, X, Y, Z)``
        Intensities in [0, 1] on one grid.
    steps : int
        Adam steps (0 returns a zero field).
    scale : float
        Resolution of the fit relative to the images (but at least 32 voxels per axis, or the image's size).
    lr : float
        Adam learning rate in the normalised units of :func:`affine_displacement`.
    window : int
        Local NCC window, voxels of the downsampled grid.

    Returns
    -------
    Tensor ``(1, 3, X, Y, Z)``
        The affine displacement in voxels of the image grid, detached.
    """
    full = tuple(fixed.shape[2:])
    dev = fixed.device
    delta = torch.zeros(3, 3, device=dev, requires_grad=True)
    translation = torch.zeros(3, device=dev, requires_grad=True)
    if steps > 0:
        # no coarser than 32 voxels per axis: too few voxels make the NCC fit noisy on small images
        small = tuple(min(n, max(m, 32)) for n, m in zip(full, scaled_shape(full, scale)))
        f, m = resize_volume(fixed.float(), small), resize_volume(moving.float(), small)
        warp = SpatialTransformer("bilinear", "zeros")
        opt = torch.optim.Adam([delta, translation], lr=lr)
        with torch.enable_grad():
            for _ in range(int(steps)):
                loss = local_ncc_loss(f, warp(m, affine_displacement(delta, translation, small, full)), window)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        return affine_displacement(delta.detach(), translation.detach(), full, full)


# ---------------------------------------------------------------------------------- refinement


@dataclass(frozen=True)
class RefineLevel:
    """One level of the refinement pyramid.

    Parameters
    ----------
    scale : float
        Resolution of both the loss and the correction grid relative to the image (0.5: half).
    steps : int
        Adam steps on this level.
    lr : float
        Adam learning rate, voxels of this level's grid per step (roughly).
    window : int
        Local NCC window, voxels of this level's grid.
    """

    scale: float
    steps: int
    lr: float = 0.2
    window: int = 9

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"refinement scale must be in (0, 1], got {self.scale}")
        if self.steps < 0:
            raise ValueError("refinement steps must be >= 0")


def default_refine_levels(steps: int, scales: Sequence[float] = (0.25, 0.5), *, lr: float = 0.2,
                          window: int = 9) -> list[RefineLevel]:
    """``steps`` Adam steps on each of ``scales`` (coarse to fine), the same ``lr`` and ``window``."""
    return [RefineLevel(float(s), int(steps), lr, window) for s in scales]


def refine_flow(fixed: torch.Tensor, moving: torch.Tensor, flow: torch.Tensor, levels: Sequence[RefineLevel], *,
                smooth_weight: float = 1.5, diffeomorphic: bool = False) -> torch.Tensor:
    """Refine a displacement coarse to fine by optimising a correction on the training loss.

    On each level the images are downsampled (antialiased) to the level's scale and a correction ``c``
    on that grid is optimised with Adam on ``local NCC(F, M o (id + u)) + smooth_weight * anti-folding(u)``,
    where ``u`` is the current field with the correction applied; the corrected field is carried to the
    next level at full resolution.

    Parameters
    ----------
    fixed, moving : Tensor ``(1, 1, X, Y, Z)``
        Intensities in [0, 1] on the fixed grid.
    flow : Tensor ``(1, 3, X, Y, Z)``
        The starting displacement (voxels), e.g. the network's.
    levels : sequence of RefineLevel
        Coarse to fine.
    smooth_weight : float
        Weight of :func:`~hdar_pipeline.hdar.losses.anti_folding_loss` on the total field.
    diffeomorphic : bool
        ``False``: the correction is added, ``u + c`` (cheapest; folding is held off by the anti-folding
        term). ``True``: ``c = exp(v)`` from a stationary velocity by scaling and squaring and the field is
        composed, ``u o (id + exp(v))`` (about 3x the cost per step at half resolution).

    Returns
    -------
    Tensor ``(1, 3, X, Y, Z)``
        The refined displacement in voxels, detached.
    """
    shape = tuple(flow.shape[2:])
    current = flow.detach().float()
    warp = SpatialTransformer("bilinear", "zeros")
    integrate = VecInt(7) if diffeomorphic else None
    for level in levels:
        if level.steps == 0:
            continue
        size = scaled_shape(shape, level.scale)
        f, m = resize_volume(fixed.float(), size), resize_volume(moving.float(), size)
        base = resize_flow(current, size)
        corr = torch.zeros((1, 3, *size), device=flow.device, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([corr], lr=level.lr)

        def total(on: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
            if integrate is None:
                return on + resize_flow(corr, grid)
            return compose_flows(on, resize_flow(integrate(corr), grid))

        with torch.enable_grad():
            for _ in range(int(level.steps)):
                u = total(base, size)
                loss = (local_ncc_loss(f, warp(m, u), level.window)
                        + smooth_weight * anti_folding_loss(u))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            current = total(current, shape)
    return current.detach()
