"""Instance optimisation around the network: an affine pre-alignment before it, a refinement after it.

Both optimise the network's own training loss (local NCC, plus the anti-folding smoothness for the
refinement) with Adam on one image pair, on downsampled copies of the images (an :class:`ImagePyramid`
shared with the network's inputs), so they cost a few seconds on a CPU for a 160 x 192 x 160 pair.

Shapes and units
----------------
Volumes ``(1, 1, X, Y, Z)`` with intensities in [0, 1]; displacement fields ``(1, 3, X, Y, Z)`` in voxels
of their own grid, channel ``c`` along array axis ``c`` (as in :mod:`hdar_pipeline.hdar.layers`). A field
``u`` warps the moving image as ``M(x + u(x))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from hdar_pipeline.hdar.adam import Adam
from hdar_pipeline.hdar.layers import (SpatialTransformer, compose_flows, identity_grid, resize_flow, resize_volume,
                     sample_region, smooth)
from hdar_pipeline.hdar.losses import LocalNCC, _crop_common, anti_folding_loss, spatial_gradients

__all__ = ["ImagePyramid", "RefineLevel", "affine_displacement", "affine_prealign", "default_refine_levels",
           "exponential", "refine_flow", "scaled_shape"]


def scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, int, int]:
    """``round(n * scale)`` per axis, at least 4 voxels."""
    return tuple(max(4, int(round(int(n) * float(scale)))) for n in shape)


class ImagePyramid:
    """Antialiased down-sampled copies of one volume, each computed once.

    ``pyramid.at(size)`` is :func:`~hdar_pipeline.hdar.layers.resize_volume` of the volume to ``size``,
    computed from the smallest cached copy that is still at least ``size`` on every axis (with the
    smoothing that copy already carries deducted), so a 1/4 copy after a 1/2 one costs little. The
    pre-alignment, the network's inputs and the refinement levels of one registration share one pyramid
    per image.

    Parameters
    ----------
    image : Tensor ``(B, C, X, Y, Z)``
    """

    def __init__(self, image: torch.Tensor) -> None:
        self.image = image
        self.shape: tuple[int, int, int] = tuple(int(n) for n in image.shape[2:])  # type: ignore[assignment]
        self._levels: dict[tuple[int, ...], torch.Tensor] = {self.shape: image}

    def at(self, size: Sequence[int]) -> torch.Tensor:
        """The volume resized to ``size`` (voxels per axis), ``(B, C, *size)``."""
        size = tuple(int(v) for v in size)
        if size not in self._levels:
            sources = [k for k in self._levels if all(a >= b for a, b in zip(k, size))]
            source = min(sources, key=math.prod) if sources else self.shape
            if source == self.shape:
                out = resize_volume(self.image, size)
            else:
                out = resize_volume(self._levels[source], size, source_shape=self.shape)
            self._levels[size] = out
        return self._levels[size]


Volume = Union[torch.Tensor, ImagePyramid]


def _pyramid(volume: Volume) -> ImagePyramid:
    return volume if isinstance(volume, ImagePyramid) else ImagePyramid(volume)


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


def affine_prealign(fixed: Volume, moving: Volume, *, steps: int = 30, scale: float = 0.25,
                    lr: float = 0.015, window: int = 5, out_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Fit a 12-parameter affine map of the moving image onto the fixed one and return its displacement.

    Adam on local NCC (``window`` voxels of the downsampled grid) between the fixed image and the warped
    moving image, both downsampled to ``scale`` of their size (antialiased), starting from the identity.
    The network was trained on pairs in one rigidly aligned space; the residual affine misalignment
    between two subjects (scaling and shear) costs it accuracy, and this removes it in about a second.

    Parameters
    ----------
    fixed, moving : Tensor ``(1, 1, X, Y, Z)`` or ImagePyramid of one
        Intensities in [0, 1] on one grid.
    steps : int
        Adam steps (0 returns a zero field).
    scale : float
        Resolution of the fit relative to the images (but at least 32 voxels per axis, or the image's size).
    lr : float
        Adam learning rate in the normalised units of :func:`affine_displacement`.
    window : int
        Local NCC window, voxels of the downsampled grid.
    out_shape : 3 ints, optional
        Grid to return the displacement on (default: the image grid); the map is affine, so it is exact
        on any grid.

    Returns
    -------
    Tensor ``(1, 3, *out_shape)``
        The affine displacement in voxels of ``out_shape``, detached.
    """
    fp, mp = _pyramid(fixed), _pyramid(moving)
    full = fp.shape
    dev = fp.image.device
    delta = torch.zeros(3, 3, device=dev, requires_grad=True)
    translation = torch.zeros(3, device=dev, requires_grad=True)
    if steps > 0:
        # no coarser than 32 voxels per axis: too few voxels make the NCC fit noisy on small images
        small = tuple(min(n, max(m, 32)) for n, m in zip(full, scaled_shape(full, scale)))
        f, m = fp.at(small).float(), mp.at(small).float()
        ncc = LocalNCC(f, window)
        warp = SpatialTransformer("bilinear", "zeros")
        opt = Adam([delta, translation], lr=lr)
        with torch.enable_grad():
            for _ in range(int(steps)):
                loss = ncc.loss(warp(m, affine_displacement(delta, translation, small, full)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        return affine_displacement(delta.detach(), translation.detach(), out_shape or full, full)


# ---------------------------------------------------------------------------------- refinement


def exponential(velocity: torch.Tensor, max_step: float = 0.5, max_squarings: int = 10,
                max_jacobian: float = 0.8) -> torch.Tensor:
    """``exp(v)`` of a stationary velocity ``(1, 3, X, Y, Z)`` (voxels) by scaling and squaring, with as few
    squarings as make the first step ``v / 2^n`` small: under ``max_step`` voxels, and its Jacobian (forward
    differences, largest Frobenius norm over voxels) under ``max_jacobian``, at most ``max_squarings``.

    A first step whose Jacobian has norm below 1 is itself a diffeomorphism (``x + w(x)`` is injective with a
    positive Jacobian determinant, at least ``(1 - 0.8)^3`` with the default bound), and each squaring composes
    it with itself. A full-resolution correction moves voxels by a fraction of a voxel but can change by more
    than a voxel per voxel, which the displacement alone would integrate in no squarings at all, folding. (The
    squarings interpolate, so a velocity that varies at the scale of single voxels can still fold a little; the
    refinement's corrections, coherent over several voxels, did not on any benchmark pair.) A refinement correction needs 0-3
    squarings, a fraction of the cost of VoxelMorph's 7. A first step of half a voxel scored as a quarter voxel
    does on three held-out LPBA40 pairs (0.7388 and 0.7386 mean Dice, ``accurate`` preset).
    """
    with torch.no_grad():
        peak = float(velocity.detach().abs().max())
        rough = _max_jacobian_norm(velocity.detach())
    n = 0
    while n < max_squarings and (peak / 2 ** n > max_step or rough / 2 ** n > max_jacobian):
        n += 1
    disp = velocity * (1.0 / 2 ** n)
    warp = SpatialTransformer("bilinear", "border")
    for _ in range(n):
        disp = disp + warp(disp, disp)
    return disp


def _max_jacobian_norm(field: torch.Tensor) -> float:
    """The largest Frobenius norm over voxels of the forward-difference Jacobian of ``(1, 3, X, Y, Z)``
    (voxels per voxel; 0 for a grid too small to difference)."""
    if min(field.shape[2:]) < 2:
        return 0.0
    squared = sum(g.square().sum(1) for g in _crop_common(spatial_gradients(field)))
    return float(squared.max().sqrt())


@dataclass(frozen=True)
class RefineLevel:
    """One level of the refinement pyramid.

    Parameters
    ----------
    scale : float
        Resolution of the correction grid relative to the image (0.5: half); with
        ``similarity="level"`` also the resolution of the loss.
    steps : int
        Adam steps on this level.
    lr : float
        Adam learning rate, voxels of this level's grid per step (roughly).
    window : int
        Local NCC window, voxels of this level's grid (with ``similarity="full"``: blocks of
        ``1 / scale`` full-resolution voxels, so 3 at 1/2 is a 6-voxel window).
    similarity : {"level", "full"}
        ``"level"``: the loss on the images downsampled to this level. ``"full"``: the local NCC of the
        full-resolution images, with block-aligned windows and the warp linearised
        (:class:`~hdar_pipeline.hdar.block_ncc.LinearisedBlockNCC`); ``1 / scale`` must be a whole number.
        It sees the detail that the downsampled images lose, at little more than the level's own cost.
    relinearise : int
        ``similarity="full"``: steps between re-warps of the full-resolution moving image.
    gradient_sigma : float
        Gaussian smoothing (sigma in voxels of this level's grid, kernel cut at 2 sigma; 0: none) of the
        correction's gradient before each Adam step: a Sobolev-type preconditioner that turns the similarity's
        voxel-wise pull into coherent motion of a neighbourhood (as the demons' fluid regularisation smooths
        its update), so that a few steps travel further.
    smooth : bool
        Include the anti-folding smoothness (weight: :func:`refine_flow`'s ``smooth_weight``) in this level's
        loss. Off, the correction is held only by its step count (at most ``steps * lr`` voxels) and, composed
        as ``exp(v)``, by the exponential's Jacobian bound.
    """

    scale: float
    steps: int
    lr: float = 0.2
    window: int = 9
    similarity: str = "level"
    relinearise: int = 5
    gradient_sigma: float = 0.0
    smooth: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"refinement scale must be in (0, 1], got {self.scale}")
        if self.steps < 0:
            raise ValueError("refinement steps must be >= 0")
        if self.similarity not in ("level", "full"):
            raise ValueError(f"similarity must be 'level' or 'full', got {self.similarity!r}")
        if self.similarity == "full" and abs(1.0 / self.scale - round(1.0 / self.scale)) > 1e-6:
            raise ValueError(f"similarity='full' needs a scale of 1/b for a whole number b, got {self.scale}")
        if self.relinearise < 1:
            raise ValueError("relinearise must be >= 1")
        if not self.gradient_sigma >= 0:
            raise ValueError(f"gradient_sigma must be >= 0, got {self.gradient_sigma}")

    def parameter(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """A zero correction ``(1, 3, *shape)`` to optimise, its gradient smoothed by ``gradient_sigma``."""
        corr = torch.zeros((1, 3, *shape), device=device, dtype=torch.float32, requires_grad=True)
        if self.gradient_sigma > 0:
            corr.register_hook(lambda grad: smooth(grad, self.gradient_sigma, truncate=2.0))
        return corr

    @property
    def block(self) -> int:
        """Full-resolution voxels per correction voxel along each axis (``similarity="full"``)."""
        return int(round(1.0 / self.scale))


def default_refine_levels(steps: int, scales: Sequence[float] = (0.25, 0.5), *, lr: float = 0.2,
                          window: int = 9, similarity: str = "full", full_window: int = 3,
                          relinearise: int = 5, coarse_gradient_sigma: float = 1.0,
                          full_resolution_steps: int = 0, full_resolution_window: int = 5) -> list[RefineLevel]:
    """``steps`` Adam steps on each of ``scales`` (coarse to fine), the same ``lr``; the finest level's loss
    at ``similarity`` (default ``"full"``: full-resolution NCC, windows of ``full_window`` blocks, 3 blocks
    (6 voxels at 1/2) by default: as accurate as 5 on held-out LPBA40 pairs and faster; a finest
    level at scale 1 sees the full-resolution images anyway and keeps ``"level"``), the others at their own
    resolution with ``window``.

    Every level but the finest smooths its gradient with ``coarse_gradient_sigma`` (voxels of its grid; see
    :class:`RefineLevel`): sigma 1 at 1/4 raised 19 of the 20 held-out LPBA40 benchmark pairs (+0.003 mean Dice)
    for about 1 % of the time; smoothing the finest level's gradient as well adds +0.001 more on three tuning
    pairs, at the cost of about as many extra steps.

    ``full_resolution_steps`` (default 0: none) adds a last level at scale 1 with that many steps: a correction
    on the full-resolution grid against the linearised local NCC of windows of ``full_resolution_window``
    voxels (:func:`_refine_full_resolution`), after the ``scales``, whose finest must then be coarser than 1.
    Three such steps after 30 on each of 1/4 and 1/2 took three held-out LPBA40 pairs from 0.7316 (20 + 20)
    to 0.7392 mean Dice, beyond what 80 + 80 steps without it reach (0.7373), for about twice the time; one
    step after 20 + 20 to 0.7350. That level leaves out the smoothness term (``smooth=False``): a correction of
    a few fifths of a voxel, integrated under the exponential's Jacobian bound, needs no more, and the term
    cost 15 % of the level's time for no measurable Dice (0.7351 without, 0.7350 with it, one step)."""
    if similarity not in ("level", "full"):
        raise ValueError(f"similarity must be 'level' or 'full', got {similarity!r}")
    if full_resolution_steps < 0:
        raise ValueError(f"full_resolution_steps must be >= 0, got {full_resolution_steps}")
    if full_resolution_steps and max(scales) >= 1.0:
        raise ValueError("a full-resolution level follows the scales: their finest must be coarser than 1, "
                         f"got {tuple(scales)}")
    n = len(scales)
    levels = [RefineLevel(float(s), int(steps), lr, window, gradient_sigma=coarse_gradient_sigma if i < n - 1 else 0.0)
              for i, s in enumerate(scales)]
    if similarity == "full" and levels and levels[-1].scale < 1.0:
        last = levels[-1]
        levels[-1] = RefineLevel(last.scale, last.steps, lr, full_window, "full", relinearise)
    if full_resolution_steps:
        levels.append(RefineLevel(1.0, int(full_resolution_steps), lr, full_resolution_window, "full", relinearise,
                                  smooth=False))
    return levels


def refine_flow(fixed: Volume, moving: Volume, flow: torch.Tensor, levels: Sequence[RefineLevel], *,
                smooth_weight: float = 1.5, diffeomorphic: bool = False,
                out_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Refine a displacement coarse to fine by optimising a correction on the training loss.

    On each level the images are downsampled (antialiased) to the level's scale and a correction ``c``
    on that grid is optimised with Adam on ``local NCC(F, M o (id + u)) + smooth_weight * anti-folding(u)``,
    where ``u`` is the current field with the correction applied; the corrected field is carried to the
    next level on the finer of its own grid and the level's (nothing of the starting field's detail is
    lost), and returned on ``out_shape``.

    Parameters
    ----------
    fixed, moving : Tensor ``(1, 1, X, Y, Z)`` or ImagePyramid of one
        Intensities in [0, 1] on the fixed grid.
    flow : Tensor ``(1, 3, x, y, z)``
        The starting displacement in voxels of its own grid (the image grid or any grid over the same
        extent, e.g. the network's working grid).
    levels : sequence of RefineLevel
        Coarse to fine.
    smooth_weight : float
        Weight of :func:`~hdar_pipeline.hdar.losses.anti_folding_loss` on the total field.
    diffeomorphic : bool
        ``False``: the correction is added, ``u + c`` (folding is held off by the anti-folding term only).
        ``True``: ``c = exp(v)`` from a stationary velocity by scaling and squaring (:func:`exponential`) and
        the field is composed, ``u o (id + exp(v))``, on every level including a ``similarity="full"`` one, so
        a diffeomorphic starting field stays diffeomorphic.

    out_shape : 3 ints, optional
        Grid of the result (default: the image grid).

    Returns
    -------
    Tensor ``(1, 3, *out_shape)``
        The refined displacement in voxels of ``out_shape``, detached.
    """
    fp, mp = _pyramid(fixed), _pyramid(moving)
    shape = fp.shape
    current = flow.detach().float()
    warp = SpatialTransformer("bilinear", "zeros")
    integrate = exponential if diffeomorphic else None
    for level in levels:
        if level.steps == 0:
            continue
        weight = smooth_weight if level.smooth else 0.0
        if level.similarity == "full" and level.block == 1:
            current = _refine_full_resolution(fp, mp, current, level, smooth_weight=weight,
                                              diffeomorphic=diffeomorphic)
            continue
        if level.similarity == "full":
            current = _refine_full_similarity(fp, mp, current, level, smooth_weight=weight,
                                              diffeomorphic=diffeomorphic)
            continue
        size = scaled_shape(shape, level.scale)
        f, m = fp.at(size).float(), mp.at(size).float()
        ncc = LocalNCC(f, level.window)
        base = resize_flow(current, size)
        corr = level.parameter(size, flow.device)
        opt = Adam([corr], lr=level.lr)

        def total(on: torch.Tensor, grid: Sequence[int], final: bool = False) -> torch.Tensor:
            if integrate is None:
                return on + resize_flow(corr, grid)
            # while optimising, exp(v) is taken to first order (id + v: one interpolation instead of
            # back-propagating through the squarings); the result composes the integrated exp(v)
            return compose_flows(on, resize_flow(integrate(corr) if final else corr, grid))

        with torch.enable_grad():
            for _ in range(int(level.steps)):
                u = total(base, size)
                loss = ncc.loss(warp(m, u))
                if weight:
                    loss = loss + weight * anti_folding_loss(u)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            grid = max(tuple(current.shape[2:]), size, key=math.prod)
            current = total(resize_flow(current, grid), grid, final=True)
    return resize_flow(current, out_shape or shape).detach()


def _refine_full_similarity(fp: ImagePyramid, mp: ImagePyramid, flow: torch.Tensor, level: RefineLevel, *,
                            smooth_weight: float, diffeomorphic: bool = False) -> torch.Tensor:
    """One ``similarity="full"`` level: a correction on the grid of ``b^3`` blocks (``b = 1 / scale``),
    optimised against the full-resolution local NCC of :class:`LinearisedBlockNCC` (re-warped every
    ``level.relinearise`` steps) plus the anti-folding smoothness of the total field on the block grid.
    Returns the field on the full-resolution grid, in its voxels.

    ``diffeomorphic=False``: the correction ``c`` is added, ``u + c``. ``diffeomorphic=True``: ``c`` is a
    stationary velocity and the field is composed, ``u o (id + exp(c))``, at every re-linearisation and at
    the end, so a diffeomorphic ``u`` stays diffeomorphic. The linearised similarity is the same in both
    cases: ``W + grad W . d`` with ``W`` the moving image warped by the current field and the gradient
    taken on the fixed grid is, to first order, the moving image warped by the current field *composed*
    with ``id + d``; between re-linearisations ``exp(c) - exp(c_0)`` is taken as ``c - c_0``.

    The NCC is evaluated on the fixed brain's bounding box (non-zero voxels) widened by two half-windows
    and a block, which holds every block whose moving intensities reach a window where the fixed image
    varies; elsewhere the correlation is exactly zero. Volumes whose size is not a multiple of ``b`` are padded at the high end (images
    with zeros, the field by replication) and cropped back.
    """
    from hdar_pipeline.hdar.block_ncc import LinearisedBlockNCC

    shape = fp.shape
    b = level.block
    padded = tuple(-(-n // b) * b for n in shape)
    grid = tuple(n // b for n in padded)
    extra = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
    fixed = torch.nn.functional.pad(fp.image.float(), extra)
    moving = torch.nn.functional.pad(mp.image.float(), extra)
    # two half-windows reach every block a correlated window touches; one more block keeps the image
    # gradient (one-sided at the crop's faces) equal to the whole volume's on all of them
    lo, hi = _brain_blocks(fixed, b, 2 * (level.window // 2) + 1)
    box = tuple(slice(a, z) for a, z in zip(lo, hi))
    start = tuple(a * b for a in lo)
    full_box = tuple(slice(a * b, z * b) for a, z in zip(lo, hi))
    with torch.no_grad():
        start_flow = flow.detach().float()
        # ``base``: the starting field at full resolution, needed only to add corrections to it (or to pad
        # it); ``base_grid``: on the block grid, for the smoothness term and the composition
        base = None
        if not diffeomorphic or any(extra):
            base = resize_flow(start_flow, shape)
            if any(extra):
                base = torch.nn.functional.pad(base, extra, mode="replicate")
        base_grid = resize_flow(start_flow if base is None else base, grid)
    ncc = LinearisedBlockNCC(fixed[(..., *full_box)], b, level.window, mean_over=math.prod(grid))
    corr = level.parameter(grid, base_grid.device)
    anchor = torch.zeros_like(corr)
    opt = Adam([corr], lr=level.lr)
    diffeo = exponential if diffeomorphic else None

    def total(c: torch.Tensor) -> torch.Tensor:
        """The full-resolution field on the box of blocks, with correction ``c`` applied."""
        if diffeo is None:
            return base[(..., *full_box)] + _upsample_box(c, b, lo, hi)
        # composed on the block grid (the starting field is no finer than it: the cascade and the coarser
        # levels work at half resolution or below), then upsampled
        return _upsample_box(compose_flows(base_grid, diffeo(c)), b, lo, hi)

    with torch.enable_grad():
        for step in range(int(level.steps)):
            if step % level.relinearise == 0:
                with torch.no_grad():
                    anchor = corr.detach().clone()
                    ncc.linearise(sample_region(moving, total(anchor), start))
            d = ((corr - anchor) * float(b))[(..., *box)]
            loss = ncc.loss(d)
            if smooth_weight:
                loss = loss + smooth_weight * anti_folding_loss(base_grid + corr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        if diffeo is None:
            out = base + resize_flow(corr.detach(), padded)
        else:
            out = resize_flow(compose_flows(base_grid, diffeo(corr.detach())), padded)
    return out[:, :, :shape[0], :shape[1], :shape[2]].contiguous()


def _refine_full_resolution(fp: ImagePyramid, mp: ImagePyramid, flow: torch.Tensor, level: RefineLevel, *,
                            smooth_weight: float, diffeomorphic: bool = False) -> torch.Tensor:
    """A ``similarity="full"`` level at scale 1: a correction on the full-resolution grid, confined to the
    fixed brain's box, against the linearised full-resolution local NCC (windows of ``level.window`` voxels).

    Everything runs on the box (the brain's bounding box widened by a half-window and a shell): the warped
    moving image, the 18 linearisation channels, the loss, the smoothness of the total field and Adam's
    state, so a step costs the brain's voxels, not the grid's. The correction is held at zero on a shell of
    two voxels at the box's faces (its gradient is masked there): the corrected field then joins the
    uncorrected one outside the box continuously, and ``exp(c)`` is exactly zero on the shell (each squaring
    samples within a voxel of it). ``diffeomorphic=True`` composes ``u o (id + exp(c))`` (re-linearising
    with ``exp(c)`` taken to first order, as the coarser levels do); ``False`` adds ``u + c``.

    Returns the field ``(1, 3, *fp.shape)`` in full-resolution voxels.
    """
    from hdar_pipeline.hdar.block_ncc import LinearisedBlockNCC

    shape = fp.shape
    fixed, moving = fp.image.float(), mp.image.float()
    base = resize_flow(flow.detach().float(), shape)
    shell = 2
    lo, hi = _brain_blocks(fixed, 1, level.window // 2 + shell + 1)
    box = (..., *(slice(a, z) for a, z in zip(lo, hi)))
    size = tuple(z - a for a, z in zip(lo, hi))
    if min(size) <= 2 * shell:
        return base
    base_box = base[box]
    ncc = LinearisedBlockNCC(fixed[box], 1, level.window, mean_over=math.prod(shape))
    interior = torch.zeros((1, 1, *size), dtype=torch.float32, device=base.device)
    interior[(..., *(slice(shell, n - shell) for n in size))] = 1.0
    corr = torch.zeros((1, 3, *size), device=base.device, dtype=torch.float32, requires_grad=True)
    if level.gradient_sigma > 0:
        corr.register_hook(lambda grad: smooth(grad, level.gradient_sigma, truncate=2.0) * interior)
    else:
        corr.register_hook(lambda grad: grad * interior)
    # the smoothness term as a mean over the whole grid's forward differences, of which the box holds these
    share = math.prod(n - 1 for n in size) / math.prod(max(1, n - 1) for n in shape)
    opt = Adam([corr], lr=level.lr)
    anchor = torch.zeros_like(corr)

    def total(c: torch.Tensor) -> torch.Tensor:
        """The field on the box with correction ``c`` applied (to first order in ``exp``)."""
        if not diffeomorphic:
            return base_box + c
        return c + sample_region(base, c, lo, padding_mode="border")  # compose_flows(base, c) on the box

    with torch.enable_grad():
        for step in range(int(level.steps)):
            if step % level.relinearise == 0:
                with torch.no_grad():
                    anchor = corr.detach().clone()
                    field = base_box if step == 0 else total(anchor)
                    ncc.linearise(sample_region(moving, field, lo))
            loss = ncc.loss(corr - anchor)
            if smooth_weight:
                loss = loss + smooth_weight * share * anti_folding_loss(base_box + corr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        c = corr.detach()
        out = base.clone()
        if diffeomorphic:
            c = exponential(c)
            out[box] = c + sample_region(base, c, lo, padding_mode="border")
        else:
            out[box] = base_box + c
    return out


def _upsample_box(field: torch.Tensor, block: int, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """``resize_flow(field, block * grid)`` on the full-resolution box of blocks ``[lo, hi)`` only.

    Cell-centred trilinear upsampling by a whole factor needs one neighbouring block on each side, so the
    box is cut with that halo (where the grid has one), upsampled and trimmed: the same values as
    upsampling everything, for the box's share of the work."""
    grid = field.shape[2:]
    lo_h = [max(0, a - 1) for a in lo]
    hi_h = [min(int(n), z + 1) for n, z in zip(grid, hi)]
    part = field[(..., *(slice(a, z) for a, z in zip(lo_h, hi_h)))]
    up = torch.nn.functional.interpolate(part, scale_factor=float(block), mode="trilinear", align_corners=False)
    trim = tuple(slice((a - ah) * block, (a - ah) * block + (z - a) * block) for a, ah, z in zip(lo, lo_h, hi))
    return up[(..., *trim)] * float(block)


def _brain_blocks(fixed: torch.Tensor, block: int, margin: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Block-grid bounding box ``[lo, hi)`` of the non-zero voxels of ``fixed`` ``(1, 1, X, Y, Z)`` widened
    by ``margin`` blocks and clipped to the grid (the whole grid when the image has no zero voxel or no
    non-zero one)."""
    grid = [int(n) // block for n in fixed.shape[2:]]
    nonzero = fixed[0, 0] != 0
    if bool(nonzero.all()) or not bool(nonzero.any()):
        return (0, 0, 0), tuple(grid)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(nonzero.any(dim=other[1]).any(dim=other[0])).flatten()
        lo.append(max(0, int(idx[0]) // block - margin))
        hi.append(min(grid[axis], -(-(int(idx[-1]) + 1) // block) + margin))
    return tuple(lo), tuple(hi)
