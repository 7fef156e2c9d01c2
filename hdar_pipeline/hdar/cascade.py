"""The HDAR cascade: S1 on the whole pair, S2 / S3 on difficulty-selected (or sliding-window) patches.

Data flow (one pair; every field is a full-resolution displacement in voxels, ``(B, 3, X, Y, Z)``)::

    S1   fixed, moving resized to ``s1_shape`` (default ``round(shape * s1_scale)``, 1/4)
         -> net S1 -> field at S1 resolution -> upsampled (vectors rescaled)         = u1
         attention map of S1 -> candidate windows, NMS, top K -> S2 patches
    S2   for each patch (``s2_patch`` = 112 full-res voxels, resized to ``s2_input`` = 56):
           fixed patch, moving warped by u1 then cropped, and u1's patch (resized, rescaled)
           -> net S2 -> residual r -> upsampled to the patch
         residuals blended with smooth weights into R (zero where no patch)
         u2 = u1 o (id + R)   i.e. u2(x) = R(x) + u1(x + R(x))                       (composition)
         attention maps of the S2 patches -> windows inside them, NMS, top K -> S3 patches
    S3   same with ``s3_patch`` = ``s3_input`` = 56 (full resolution)                  -> u3

Design decisions
----------------
* **Residual composition.** Each patch level sees the moving image already warped by the current
  field, so what it predicts is a residual ``r`` with ``M(u(x + r(x)) + x + r(x)) ~ F(x)``; the exact
  total is the composition ``R + u o (id + R)`` (:func:`~hdar_pipeline.hdar.layers.compose_flows`),
  which is what we use by default. ``composition="add"`` (``u + R``, the first-order approximation
  used by some cascades) is kept for comparison. Where no patch covers a voxel ``R = 0`` and the
  coarser field is kept exactly.
* **Coarser field as input.** Besides warped moving, fixed and their difference, S2/S3 get the
  current field's patch in voxels of their input grid, as in the paper.
* **Blending** (:class:`~hdar_pipeline.hdar.patches.PatchBlender`): raised-cosine ramps over
  ``taper`` (a fraction of the patch size) at inner patch faces; the blended residual is continuous
  and fades to zero outside the patches. Full mode uses a sliding-window stride of
  ``(1 - taper) * patch`` by default so neighbouring ramps sum to exactly one.
* **Diffeomorphic mode.** Every network output is a stationary velocity. S1 integrates its velocity at
  its own resolution (``VecInt``, ``int_steps`` squarings); patch levels blend the patch velocities at
  full resolution (a smooth weighted average of velocities is again a velocity) and integrate the
  blended velocity there, so every level's residual is a diffeomorphism and so is their composition.
* **Selection.** ``selection="random"`` (ablation control) draws the fast-mode patches uniformly among the
  same candidate windows, under the same NMS and brain-mask rules, from a seeded generator
  (:meth:`HDARCascade.seed_selection`); ``"attention"`` (default) ranks them by attention.
* **Modes.** ``fast``: S2/S3 only on the K hardest patches (the paper). ``full``: S2/S3 on a sliding
  window over the brain mask (default ``fixed > 0``). ``levels`` 1, 2 or 3 (1 = a single VoxelMorph-like
  network, at ``s1_scale``).
* **The S1 network** (``network``): HDAR's attention U-Net (``"hdar"``, the default) or VoxelMorph's U-Net
  (``"voxelmorph"``, :mod:`~hdar_pipeline.hdar.voxelmorph_net`; one level only, no attention, so no patch selection).
  Everything around the network (resizing to S1's grid, integration, training, weights, inference) is shared, so
  the two are compared like for like.
* **Sizes** are configurable; the paper's are 56^3 network inputs, 112^3 S2 patches, 56^3 S3 patches.
  For LPBA40's 160x192x160 the S1 input is 40x48x40 (exactly 1/4).

* **Working resolution.** By default (``resolution="full"``, what training uses) every field lives on the
  full-resolution grid. ``resolution="level"`` (inference) keeps the fields on the grid of the finest
  level that runs, ``input / patch`` of the full grid (1/2 for a two-level cascade with the paper's sizes):
  S2 then crops its 56^3 inputs straight from half-resolution images instead of resizing 112^3 crops,
  and warps, blending and compositions cost an eighth. The field is upsampled to full resolution only
  when ``CascadeOutput.flow`` is read.

Batches: S1 runs batched; patch levels loop over batch elements (each has its own patches).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field as dc_field
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn

from hdar_pipeline.core.images import Grid
from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.hdar.layers import (SpatialTransformer, VecInt, as_triple, compose_flows, crop_patch, resize_flow,
                     resize_volume)
from hdar_pipeline.hdar.patches import Patch, PatchBlender, candidate_patches, select_patches, sliding_window_patches
from hdar_pipeline.hdar.unet import AttentionUNet, count_parameters, resolve_widths
from hdar_pipeline.hdar.voxelmorph_net import VoxelMorphUNet, check_variant

Mode = Literal["fast", "full"]
Selection = Literal["attention", "random"]
Network = Literal["hdar", "voxelmorph"]

#: The S1 network types and their default widths.
NETWORK_WIDTHS: dict[str, str] = {"hdar": "small", "voxelmorph": "vm2"}


@dataclass
class CascadeConfig:
    """Hyper-parameters of an :class:`HDARCascade` (all sizes in voxels of the full-resolution grid
    unless named ``*_input``, which are network input sizes).

    Attributes
    ----------
    network : "hdar" or "voxelmorph"
        The S1 network: HDAR's attention U-Net or VoxelMorph's U-Net (:mod:`~hdar_pipeline.hdar.voxelmorph_net`;
        ``levels`` must then be 1). Configurations and model cards without it are ``"hdar"``.
    levels : 1, 2 or 3
        Default: 3 for ``"hdar"``, 1 for ``"voxelmorph"``.
    width : "paper", "small" or 4 ints (``"hdar"``); "vm2" or "vm1" (``"voxelmorph"``)
        Default: ``"small"`` for ``"hdar"``, ``"vm2"`` for ``"voxelmorph"``.
    s1_shape : 3 ints, optional
        S1 input size; default ``round(shape * s1_scale)`` per axis (the paper resizes to 56^3).
    s1_scale : float
    s2_patch, s2_input, s3_patch, s3_input : int or 3 ints
        Patch size at full resolution and the network input size it is resized to.
    top_k, iou_threshold, candidate_stride : selection (K, NMS IoU, window step in attention voxels).
    min_mask_fraction : float
        Fast mode: candidates with no more than this fraction of brain-mask voxels are skipped.
    mode : "fast" or "full"
    selection : "attention" or "random"
        Fast mode: rank the candidate windows by mean attention (the paper) or draw them at random among
        the same candidates under the same NMS and mask rules (the ablation control).
    selection_seed : int, optional
        Seed of the model's selection generator (``selection="random"``); see
        :meth:`HDARCascade.seed_selection`.
    taper : float
        Blending ramp length at each inner patch face, as a fraction of the patch size.
    full_stride : float, optional
        Full-mode window step as a fraction of the patch size; default ``1 - taper``.
    diffeomorphic : bool
    int_steps : int
        Scaling-and-squaring steps in diffeomorphic mode.
    composition : "compose" or "add"
    patch_batch : int
        Patches per network call at S2/S3 (memory against speed; results do not depend on it).
    """

    levels: int | None = None
    width: str | tuple[int, int, int, int] | None = None
    network: Network = "hdar"
    s1_shape: tuple[int, int, int] | None = None
    s1_scale: float = 0.25
    s2_patch: int | tuple[int, int, int] = 112
    s2_input: int | tuple[int, int, int] = 56
    s3_patch: int | tuple[int, int, int] = 56
    s3_input: int | tuple[int, int, int] = 56
    top_k: int = 8
    iou_threshold: float = 0.5
    candidate_stride: int = 1
    min_mask_fraction: float = 0.0
    mode: Mode = "fast"
    selection: Selection = "attention"
    selection_seed: int | None = 0
    taper: float = 0.25
    full_stride: float | None = None
    diffeomorphic: bool = False
    int_steps: int = 7
    composition: Literal["compose", "add"] = "compose"
    patch_batch: int = 8

    def __post_init__(self) -> None:
        if self.network not in NETWORK_WIDTHS:
            raise ValueError(f"network must be one of {', '.join(NETWORK_WIDTHS)}, got {self.network!r}")
        if self.levels is None:
            self.levels = 1 if self.network == "voxelmorph" else 3
        if self.width is None:
            self.width = NETWORK_WIDTHS[self.network]
        if self.levels not in (1, 2, 3):
            raise ValueError(f"levels must be 1, 2 or 3, got {self.levels}")
        if self.network == "voxelmorph" and self.levels != 1:
            raise ValueError(f"VoxelMorph is a single network: levels must be 1, got {self.levels}")
        if self.mode not in ("fast", "full"):
            raise ValueError(f"mode must be 'fast' or 'full', got {self.mode!r}")
        if self.selection not in ("attention", "random"):
            raise ValueError(f"selection must be 'attention' or 'random', got {self.selection!r}")
        if self.selection_seed is not None:
            self.selection_seed = int(self.selection_seed)
        if self.composition not in ("compose", "add"):
            raise ValueError(f"composition must be 'compose' or 'add', got {self.composition!r}")
        if not 0.0 <= self.taper < 0.5:
            raise ValueError("taper must be in [0, 0.5)")
        if not isinstance(self.width, str):
            self.width = tuple(int(v) for v in self.width)  # type: ignore[assignment]
        if self.network == "voxelmorph":
            if not isinstance(self.width, str):
                raise ValueError(f"VoxelMorph's width is a variant name (vm2, vm1), got {self.width!r}")
            check_variant(self.width)
        else:
            resolve_widths(self.width)
        if self.s1_shape is not None:
            self.s1_shape = tuple(int(v) for v in as_triple(self.s1_shape))  # type: ignore[assignment]
        for name in ("s2_patch", "s2_input", "s3_patch", "s3_input"):
            value = getattr(self, name)
            if not isinstance(value, int):
                setattr(self, name, tuple(int(v) for v in as_triple(value)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists); :meth:`from_dict` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CascadeConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown cascade settings: {', '.join(sorted(unknown))}")
        return cls(**data)

    def patch_size(self, level: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in as_triple(self.s2_patch if level == 2 else self.s3_patch))  # type: ignore

    def input_size(self, level: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in as_triple(self.s2_input if level == 2 else self.s3_input))  # type: ignore

    def s1_size(self, shape: Sequence[int]) -> tuple[int, int, int]:
        if self.s1_shape is not None:
            return tuple(self.s1_shape)  # type: ignore[return-value]
        return tuple(max(4, int(round(n * self.s1_scale))) for n in shape)  # type: ignore[return-value]


@dataclass
class LevelResult:
    """What one level did, for inspection and for the next level's selection.

    Attributes
    ----------
    level : int
        1, 2 or 3.
    flow : Tensor ``(B, 3, x, y, z)``
        The cumulative field after this level, in voxels of its own grid: the full-resolution grid, or
        the cascade's working grid with ``resolution="level"``.
    patches : list (per batch element) of list of Patch
        Level 1: one patch covering the volume.
    attention : list (per batch element) of list of Tensor ``(1, 1, x, y, z)``
        Channel-mean attention map of each patch (detached), at half the network input resolution;
        it covers its patch's full-resolution box. Empty for a network without attention (VoxelMorph).
    shape : 3 ints, optional
        The full-resolution grid (default: ``flow``'s).
    """

    level: int
    flow: torch.Tensor
    patches: list[list[Patch]]
    attention: list[list[torch.Tensor]]
    shape: tuple[int, int, int] | None = None

    @property
    def full_shape(self) -> tuple[int, int, int]:
        """The full-resolution grid the patches refer to (``flow`` may be on a coarser working grid)."""
        return tuple(self.shape) if self.shape is not None else tuple(self.flow.shape[2:])  # type: ignore

    def attention_volume(self, batch: int = 0) -> torch.Tensor:
        """This level's attention painted on the full-resolution grid, ``(X, Y, Z)`` in [0, 1], for QC.

        Each patch's map is resized to its box; overlapping boxes are averaged; voxels in no patch are 0.
        """
        blender = PatchBlender(self.full_shape, channels=1, taper=0, device=self.flow.device)
        for patch, att in zip(self.patches[batch], self.attention[batch]):
            blender.add(resize_volume(att.to(self.flow.dtype), patch.size, antialias=False), patch)
        return blender.result()[0, 0]


@dataclass
class CascadeOutput:
    """Result of :meth:`HDARCascade.forward`.

    ``levels``: one :class:`LevelResult` per level run; ``flow``: ``(B, 3, X, Y, Z)`` full-resolution
    displacement in voxels of the fixed grid (sample the moving image at ``x + flow``), the last level's
    field upsampled from the working grid when that is coarser (computed when first read).
    """

    levels: list[LevelResult] = dc_field(default_factory=list)
    _flow: torch.Tensor | None = dc_field(default=None, repr=False)

    @property
    def flow(self) -> torch.Tensor:
        if self._flow is None:
            last = self.levels[-1]
            self._flow = resize_flow(last.flow, last.full_shape)
        return self._flow

    def patches(self, level: int, batch: int = 0) -> list[Patch]:
        return self.levels[level - 1].patches[batch]


class HDARCascade(nn.Module):
    """The hierarchical, difficulty-aware registration network.

    Parameters
    ----------
    config : CascadeConfig, optional
        Defaults as in :class:`CascadeConfig`; keyword arguments override single settings.

    ``forward(fixed, moving, mask=None, mode=None)`` with ``fixed``, ``moving`` ``(B, 1, X, Y, Z)`` in
    [0, 1] on the same (fixed) grid returns a :class:`CascadeOutput`. An untrained cascade returns a
    field close to zero (every flow head starts near zero).
    """

    def __init__(self, config: CascadeConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = CascadeConfig(**overrides)
        elif overrides:
            config = CascadeConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        first = VoxelMorphUNet(config.width) if config.network == "voxelmorph" else AttentionUNet(3, config.width)
        self.nets = nn.ModuleList([first] + [AttentionUNet(6, config.width) for _ in range(config.levels - 1)])
        self.warp = SpatialTransformer("bilinear", "zeros")
        self.integrate = VecInt(config.int_steps)
        self.seed_selection()

    def seed_selection(self, seed: int | None = None) -> None:
        """(Re)start the generator of random patch selection from ``seed`` (default
        ``config.selection_seed``). It advances with every random selection, so reseed before each pair
        to make a pair's patches independent of what ran before."""
        self.selection_rng = np.random.default_rng(self.config.selection_seed if seed is None else seed)

    # ------------------------------------------------------------------ building blocks

    def s1_output(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The S1 network on ``fixed`` and ``moving`` ``(B, 1, x, y, z)`` already at S1's input size.

        Returns its raw output ``(B, 3, x, y, z)`` in voxels of that grid (a stationary velocity in diffeomorphic
        mode, before integration, else a displacement) and its attention ``(B, w2, x/2, y/2, z/2)``, or None for
        VoxelMorph, which has none. The input is what each network was designed for: moving, fixed and their
        difference for HDAR; moving and fixed for VoxelMorph."""
        if self.config.network == "voxelmorph":
            return self.nets[0](torch.cat([moving, fixed], dim=1)), None
        return self.nets[0](torch.cat([moving, fixed, moving - fixed], dim=1))

    def level1(self, fixed: torch.Tensor, moving: torch.Tensor,
               inputs: tuple[torch.Tensor, torch.Tensor] | None = None, *,
               out_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run S1. Returns its field (voxels) on ``out_shape`` (default: the full-resolution grid of
        ``fixed``) and S1's attention ``(B, w2, x, y, z)`` (half the S1 input size, covering the volume; None
        for VoxelMorph).

        ``inputs``: fixed and moving already resized to ``config.s1_size`` (a trainer's cache); by default
        they are resized here."""
        size = self.config.s1_size(fixed.shape[2:])
        if inputs is not None and all(tuple(t.shape[2:]) == tuple(size) for t in inputs):
            f, m = inputs
        else:
            f = resize_volume(fixed, size)
            m = resize_volume(moving, size)
        out, att = self.s1_output(f, m)
        if self.config.diffeomorphic:
            out = self.integrate(out)
        return resize_flow(out, fixed.shape[2:] if out_shape is None else out_shape), att

    def refine_patch(self, level: int, fixed: torch.Tensor, warped: torch.Tensor, flow: torch.Tensor,
                     patch: Patch) -> tuple[torch.Tensor, torch.Tensor]:
        """Run S2 (``level=2``) or S3 on one patch.

        Parameters
        ----------
        fixed, warped : ``(1, 1, X, Y, Z)``
            Fixed image and the moving image already warped by ``flow`` (full resolution).
        flow : ``(1, 3, X, Y, Z)``
            Current full-resolution field (voxels).
        patch : Patch

        Returns
        -------
        residual : ``(1, 3, *patch.size)``
            Displacement (or velocity in diffeomorphic mode) in full-resolution voxels.
        attention : ``(1, w2, x, y, z)``
            The sub-network's attention map for the patch.
        """
        residuals, atts = self.refine_patches(level, fixed, warped, flow, [patch])
        return residuals[0], atts[0]

    def refine_patches(self, level: int, fixed: torch.Tensor, warped: torch.Tensor, flow: torch.Tensor,
                       patches: Sequence[Patch]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run S2/S3 on several patches of one pair, ``config.patch_batch`` of them per network call
        (patches of a level share one size, so they stack into a batch; batched 3-D convolutions are also
        the fast path of PyTorch's CPU kernels). Returns per patch what :meth:`refine_patch` returns."""
        size = self.config.input_size(level)
        residuals: list[torch.Tensor] = []
        attention: list[torch.Tensor] = []
        step = max(1, int(self.config.patch_batch))
        for first in range(0, len(patches), step):
            chunk = patches[first:first + step]
            f = torch.cat([resize_volume(crop_patch(fixed, p.start, p.size), size) for p in chunk], 0)
            m = torch.cat([resize_volume(crop_patch(warped, p.start, p.size), size) for p in chunk], 0)
            u = torch.cat([resize_flow(crop_patch(flow, p.start, p.size, mode="replicate"), size)
                           for p in chunk], 0)
            out, att = self.nets[level - 1](torch.cat([m, f, m - f, u], dim=1))
            for index, p in enumerate(chunk):
                residuals.append(resize_flow(out[index:index + 1], p.size))
                attention.append(att[index:index + 1])
        return residuals, attention

    def refine(self, level: int, fixed: torch.Tensor, moving: torch.Tensor, flow: torch.Tensor,
               patches: Sequence[Patch], *, scale: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Refine ``flow`` ``(1, 3, X, Y, Z)`` with S2/S3 on ``patches``; return the new field and the
        attention map of each patch. This is the unit a stage-wise trainer calls for S2/S3.

        ``scale``: ``fixed``, ``moving`` and ``flow`` are on a working grid at this fraction of the
        full-resolution grid that ``patches`` refer to (the field in voxels of the working grid)."""
        shape = fixed.shape[2:]
        if scale != 1.0:
            patches = [scale_patch(p, scale) for p in patches]
        warped = self.warp(moving, flow)
        taper = [int(round(self.config.taper * p * scale)) for p in self.config.patch_size(level)]
        blender = PatchBlender(shape, channels=3, taper=taper, device=flow.device, dtype=flow.dtype)
        if not patches:
            return flow, []
        residuals, attention = self.refine_patches(level, fixed, warped, flow, patches)
        for residual, patch in zip(residuals, patches):
            blender.add(residual, patch)
        residual = blender.result()
        if self.config.diffeomorphic:
            residual = self.integrate(residual)
        new = compose_flows(flow, residual) if self.config.composition == "compose" else flow + residual
        return new, attention

    def select(self, level: int, previous: LevelResult, batch: int, mask: torch.Tensor | None,
               mode: Mode, selection: Selection | None = None, top_k: int | None = None) -> list[Patch]:
        """Patches for ``level`` (2 or 3) of batch element ``batch``, from the previous level's result.

        ``selection`` (default ``config.selection``): ``"attention"`` ranks the fast-mode candidates by
        mean attention, ``"random"`` draws them with :attr:`selection_rng` (same candidates and rules)."""
        cfg = self.config
        selection = selection or cfg.selection
        if selection not in ("attention", "random"):
            raise ValueError(f"selection must be 'attention' or 'random', got {selection!r}")
        shape = previous.full_shape
        size = cfg.patch_size(level)
        mask_np = None if mask is None else mask[batch, 0].detach().cpu().numpy().astype(bool)
        if mode == "full":
            frac = cfg.full_stride if cfg.full_stride is not None else 1.0 - cfg.taper
            stride = [max(1, int(round(frac * p))) for p in size]
            return sliding_window_patches(shape, size, stride, mask=mask_np)
        candidates: list[Patch] = []
        for index, (parent, att) in enumerate(zip(previous.patches[batch], previous.attention[batch])):
            candidates += candidate_patches(
                att, patch_size=size, full_shape=shape, region_start=parent.start, region_size=parent.size,
                stride=cfg.candidate_stride, parent=index if previous.level > 1 else -1)
        k = cfg.top_k if top_k is None else int(top_k)
        return select_patches(candidates, top_k=k, iou_threshold=cfg.iou_threshold,
                              mask=mask_np, min_mask_fraction=cfg.min_mask_fraction,
                              ranking="random" if selection == "random" else "score", rng=self.selection_rng)

    # ------------------------------------------------------------------ forward

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, *, mask: torch.Tensor | None = None,
                mode: Mode | None = None, levels: int | None = None,
                selection: Selection | None = None, top_k: int | None = None,
                s1_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
                resolution: Literal["full", "level"] = "full",
                work_inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> CascadeOutput:
        """Register ``moving`` to ``fixed``.

        Parameters
        ----------
        fixed, moving : ``(B, 1, X, Y, Z)``
            Intensities in [0, 1], same grid (the moving image affinely resampled onto the fixed grid).
        mask : ``(B, 1, X, Y, Z)`` bool, optional
            Brain mask on the fixed grid for patch placement; default ``fixed > 0`` (no mask when the
            fixed image has no zeros).
        mode : "fast" or "full", optional
            Overrides ``config.mode``.
        levels : int, optional
            Run only the first ``levels`` sub-networks (at most ``config.levels``).
        selection : "attention" or "random", optional
            Overrides ``config.selection`` (fast mode's patch ranking).
        top_k : int, optional
            Overrides ``config.top_k`` (fast mode's patches per level; the trainer may use fewer).
        s1_inputs : (fixed, moving) at S1's input size, optional
            Skips S1's resizing (see :meth:`level1`).
        resolution : "full" or "level"
            The grid the fields live on while the levels run: the full-resolution grid (training), or the
            finest level's own grid (:meth:`work_scale`; inference: same networks, fewer full-resolution
            operations). ``CascadeOutput.flow`` is full-resolution either way; the levels' ``flow`` are on
            the working grid.
        work_inputs : (fixed, moving) on the working grid, optional
            Skips their resizing with ``resolution="level"``. Like ``s1_inputs`` they take precedence over
            ``fixed`` and ``moving``, which then only give the full-resolution grid and the default mask
            (a caller may pass a pre-aligned moving image here only, at the low resolutions).
        """
        if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[1] != 1:
            raise ValueError(f"fixed and moving must both be (B, 1, X, Y, Z); got {tuple(fixed.shape)} "
                             f"and {tuple(moving.shape)}")
        mode = mode or self.config.mode
        n_levels = self.config.levels if levels is None else min(levels, self.config.levels)
        if mask is None:
            mask = fixed > 0
            if bool(mask.all()):
                mask = None
        shape = tuple(fixed.shape[2:])
        batch = fixed.shape[0]
        if resolution not in ("full", "level"):
            raise ValueError(f"resolution must be 'full' or 'level', got {resolution!r}")
        scale = 1.0 if resolution == "full" else self.work_scale(n_levels)
        work = shape if resolution == "full" else self.work_grid(shape, n_levels)
        fixed_w, moving_w = fixed, moving
        if work != shape:
            if work_inputs is not None and all(tuple(t.shape[2:]) == work for t in work_inputs):
                fixed_w, moving_w = work_inputs
            else:
                fixed_w, moving_w = resize_volume(fixed, work), resize_volume(moving, work)
        whole = Patch((0, 0, 0), shape)  # type: ignore[arg-type]
        flow, att = self.level1(fixed, moving, s1_inputs, out_shape=work)
        result = LevelResult(1, flow, [[whole] for _ in range(batch)],
                             [[att[b:b + 1].detach().mean(1, keepdim=True)] if att is not None else []
                              for b in range(batch)], shape)
        results = [result]
        for level in range(2, n_levels + 1):
            flows, patches, attention = [], [], []
            for b in range(batch):
                chosen = self.select(level, result, b, mask, mode, selection, top_k)
                new, atts = self.refine(level, fixed_w[b:b + 1], moving_w[b:b + 1], result.flow[b:b + 1], chosen,
                                        scale=scale)
                flows.append(new)
                patches.append(chosen)
                attention.append([a.detach().mean(1, keepdim=True) for a in atts])
            result = LevelResult(level, torch.cat(flows, 0), patches, attention, shape)
            results.append(result)
        return CascadeOutput(results)

    def work_scale(self, levels: int | None = None) -> float:
        """Resolution of the finest of the first ``levels`` levels relative to the full grid: 1 with S3
        (full-resolution patches), ``input / patch`` (1/2) with S2 as the finest, 1 for S1 alone (whose
        fields :meth:`work_grid` keeps on S1's own grid instead)."""
        n = self.config.levels if levels is None else min(int(levels), self.config.levels)
        if n == 1:
            return 1.0
        ratios = [i / p for i, p in zip(self.config.input_size(n), self.config.patch_size(n))]
        return float(max(ratios)) if max(ratios) < 1.0 else 1.0

    def work_grid(self, shape: Sequence[int], levels: int | None = None) -> tuple[int, int, int]:
        """The grid the fields live on with ``resolution="level"`` for a full-resolution ``shape``: S1's own
        grid (:meth:`CascadeConfig.s1_size`) when S1 runs alone (its field is no finer than that, so nothing
        is gained by carrying it at full resolution), else :meth:`work_shape` of :meth:`work_scale`."""
        n = self.config.levels if levels is None else min(int(levels), self.config.levels)
        if n == 1:
            return self.config.s1_size(shape)
        return self.work_shape(shape, self.work_scale(n))

    @staticmethod
    def work_shape(shape: Sequence[int], scale: float) -> tuple[int, int, int]:
        """The working grid for ``scale``: ``round(n * scale)`` per axis (the full grid for 1)."""
        if scale == 1.0:
            return tuple(int(n) for n in shape)  # type: ignore[return-value]
        return tuple(max(4, int(round(int(n) * scale))) for n in shape)  # type: ignore[return-value]

    # ------------------------------------------------------------------ bookkeeping

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per sub-network (``S1``, ``S2``, ``S3``) and in ``total``."""
        counts = {f"S{i + 1}": count_parameters(net) for i, net in enumerate(self.nets)}
        counts["total"] = sum(counts.values())
        return counts

    def checkpoint(self) -> dict[str, Any]:
        """``{"config": ..., "state_dict": ...}``; :meth:`from_checkpoint` rebuilds the model."""
        return {"config": self.config.to_dict(), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], **overrides: Any) -> "HDARCascade":
        """Rebuild from :meth:`checkpoint`; inference-only settings (mode, top_k, selection, selection_seed,
        ...) may be overridden."""
        model = cls(CascadeConfig.from_dict({**checkpoint["config"], **overrides}))
        model.load_state_dict(checkpoint["state_dict"])
        return model


def scale_patch(patch: Patch, scale: float) -> Patch:
    """``patch`` on a grid at ``scale`` of its own (start floored, size rounded, at least 1 voxel)."""
    start = tuple(int(np.floor(s * scale)) for s in patch.start)
    size = tuple(max(1, int(round(n * scale))) for n in patch.size)
    return Patch(start, size, patch.score, patch.parent)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- conversion


def field_voxels_to_transform(flow: torch.Tensor | np.ndarray, grid: Grid, **metadata: Any) -> Transform:
    """The shared :class:`~hdar_pipeline.core.transforms.Transform` of a voxel-unit field on the fixed grid.

    Parameters
    ----------
    flow : ``(3, X, Y, Z)`` or ``(1, 3, X, Y, Z)``, torch or numpy
        Displacement in voxels along the array axes ``(i, j, k)`` of ``grid`` (the cascade's output).
    grid : Grid
        The fixed grid (``flow.shape[-3:] == grid.shape``).

    Returns
    -------
    Transform with ``field[..., c] = sum_a L[c, a] * flow[a]`` in LPS millimetres,
    ``L = grid.lps_affine[:3, :3]``: fixed voxel ``v`` maps to the world point of voxel ``v + flow(v)``,
    so ``Transform.apply`` samples a moving image on the fixed grid exactly where
    :class:`~hdar_pipeline.hdar.layers.SpatialTransformer` does.
    """
    arr = flow.detach().cpu().numpy() if isinstance(flow, torch.Tensor) else np.asarray(flow)
    if arr.ndim == 5:
        if arr.shape[0] != 1:
            raise ValueError(f"expected one field, got a batch of {arr.shape[0]}")
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[0] != 3 or tuple(arr.shape[1:]) != tuple(grid.shape):
        raise ValueError(f"flow must be (3, *{tuple(grid.shape)}), got {arr.shape}")
    lin = grid.lps_affine[:3, :3].astype(np.float64)
    arr = arr.astype(np.float32, copy=False)
    field = np.empty((*arr.shape[1:], 3), np.float32)
    for c in range(3):
        # a sum of scaled components (most grids have one non-zero per row); float32 like the result
        terms = [(a, np.float32(lin[c, a])) for a in range(3) if lin[c, a] != 0.0]
        out = field[..., c]
        if not terms:
            out[...] = 0.0
            continue
        np.multiply(arr[terms[0][0]], terms[0][1], out=out)
        for a, w in terms[1:]:
            out += arr[a] * w
    return Transform(grid, field=field, metadata=dict(metadata))


def transform_to_field_voxels(transform: Transform) -> np.ndarray:
    """Inverse of :func:`field_voxels_to_transform` for a field-only transform: ``(3, X, Y, Z)`` voxels."""
    if transform.affine is not None and not np.allclose(transform.affine, np.eye(4)):
        raise ValueError("the transform has an affine part; use transform.to_dense() first")
    if transform.field is None:
        return np.zeros((3, *transform.grid.shape), np.float32)
    inv = np.linalg.inv(transform.grid.lps_affine[:3, :3].astype(np.float64))
    return np.einsum("ac,xyzc->axyz", inv, transform.field.astype(np.float64)).astype(np.float32)


def build_cascade(width: str | Sequence[int] | None = "small", levels: int | None = 3, *, seed: int | None = None,
                  **settings: Any) -> HDARCascade:
    """A freshly initialised cascade; ``seed`` makes the initial weights reproducible. ``None`` for ``width`` or
    ``levels``: the network's default (:class:`CascadeConfig`)."""
    if seed is not None:
        torch.manual_seed(seed)
    widths = width if width is None or isinstance(width, str) else tuple(width)
    return HDARCascade(CascadeConfig(width=widths, levels=levels, **settings))  # type: ignore[arg-type]

