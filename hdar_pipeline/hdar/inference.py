"""HDAR inference: one aligned pair through a loaded model, its pre-alignment and its refinement.

:class:`InferenceSettings` says how a pair is registered; :func:`register_with_model` registers it. Both are
shared by every caller of a trained network: the HDAR and VoxelMorph methods
(:class:`~hdar_pipeline.methods.hdar_method.HDARMethod`, which turn a preset and their options into one
:class:`InferenceSettings`), hence ``hdar register``, the BIDS App and ``hdar benchmark``, and the ablations
(``benchmarks/hdar_ablations.py``).

Steps
-----
Before the network, ``prealign`` (default on) fits a 12-parameter affine map of the moving image on the same
local NCC at 1/4 resolution (under a second on a CPU;
:func:`~hdar_pipeline.hdar.instance.affine_prealign`): the network was trained on LPBA40's rigidly aligned
space, and the affine residual between two subjects (scale, shear) costs it accuracy.

The network then runs without gradients on the pre-aligned moving image, its fields on its finest level's grid
(``resolution="level"``, :meth:`~hdar_pipeline.hdar.cascade.HDARCascade.forward`).

``refine=N`` adds instance optimisation after the network: a pyramid of corrections (``refine_levels``,
default 1/4 then 1/2 of the image size), each optimised by N Adam steps on the training loss (local NCC +
anti-folding smoothness, weight from the model card, default 1.5: :func:`refine_smooth_weight_of`) and added
to the field (:func:`hdar_pipeline.hdar.instance.refine_flow`). The coarse level's loss is on the images
downsampled to it; the finest level's (``refine_similarity="full"``) on the full-resolution images, linearised
around the warp (:mod:`hdar_pipeline.hdar.block_ncc`), which is where the fine anatomical detail is.
``refine_diffeomorphic`` composes ``exp(v)`` corrections on the downsampled levels instead.
One :class:`~hdar_pipeline.hdar.instance.ImagePyramid` per image feeds the pre-alignment, the network's inputs
and every refinement level.

Frame and intensities
---------------------
The inputs are expected affinely aligned on the fixed grid (as :func:`~hdar_pipeline.methods.register_pair`
provides them; :class:`~hdar_pipeline.methods.hdar_method.HDARMethod` resamples a moving image on another grid
onto the fixed grid first). Everything runs in the canonical frame of the training data (:func:`frame_for`,
:mod:`hdar_pipeline.hdar.frame`: the card's axis order, e.g. ``"LPS"``, voxel size and box, centred on the
fixed brain), where the pair is rescaled with :func:`~hdar_pipeline.core.images.robust_unit_range`, the
function the training data went through, whatever intensity range the inputs have; the field is mapped back
onto the fixed image's grid once, at the end, as a world-space (LPS mm) displacement.

Torch is imported when a function runs, not with this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hdar_pipeline.core.images import Grid, robust_unit_range
from hdar_pipeline.core.transforms import Transform

if TYPE_CHECKING:  # pragma: no cover
    import nibabel as nib
    import torch

    from hdar_pipeline.hdar.frame import CanonicalFrame
    from hdar_pipeline.hdar.weights import LoadedWeights

__all__ = ["REFINE_SMOOTH_WEIGHT", "InferenceSettings", "frame_for", "refine_smooth_weight_of",
           "register_with_model", "unit_range"]

#: Anti-folding smoothness weight of the refinement when the model card names none that applies (HDAR's training
#: weight; also what a model trained with another smoothness term, e.g. VoxelMorph's diffusion, is refined with).
REFINE_SMOOTH_WEIGHT = 1.5


@dataclass(frozen=True)
class InferenceSettings:
    """How :func:`register_with_model` registers a pair: the cascade's mode, the pre-alignment, the refinement.

    The defaults are the network alone after the pre-alignment (no refinement); the methods' presets
    (:class:`~hdar_pipeline.methods.hdar_method.HDARMethod`) choose ``mode``, ``refine`` and
    ``refine_full_resolution``. Construction checks the settings and normalises ``refine`` and
    ``refine_full_resolution`` to ``int`` and ``refine_levels`` to a tuple of ``float``.

    Parameters
    ----------
    mode : {"fast", "full"}
        The cascade's inference mode: S2/S3 on the K hardest patches, or on a sliding window over the brain.
    levels : int, optional
        Run only the first ``levels`` sub-networks (1, 2 or 3; default: all the model has).
    selection : {"attention", "random"}, optional
        Fast mode's patch ranking (default: the model's).
    prealign : bool
        Fit an affine map on local NCC before the network (:func:`hdar_pipeline.hdar.instance.affine_prealign`).
    refine : int
        Instance-optimisation steps on each refinement level after the network (0: none).
    refine_levels : tuple of float
        Resolutions of the refinement levels relative to the image, each in (0, 1], coarse to fine.
    refine_lr : float
        Adam learning rate of the correction, in voxels of each level's grid per step.
    refine_similarity : {"full", "level"}
        The finest refinement level's loss: ``"full"`` (default) the local NCC of the full-resolution
        images, linearised around the warp (:class:`~hdar_pipeline.hdar.block_ncc.LinearisedBlockNCC`;
        re-warped every 5 steps, windows of 3 correction voxels); ``"level"`` the images downsampled to
        the level, like the coarser levels.
    refine_diffeomorphic : bool
        Compose corrections integrated from stationary velocity fields, ``u o exp(v)``, on every refinement
        level including the full-resolution one (default), instead of adding displacements ``u + c``. With a
        diffeomorphic network (stationary-velocity output) the whole chain is then a composition of
        diffeomorphisms: no folded voxels by construction. Forced on for a diffeomorphic model.
    refine_smooth_weight : float, optional
        Weight of the anti-folding smoothness in the refinement loss; default: the model's training weight
        (model card ``config.training.smooth_weight``, 1.5 when absent or when the model was trained with another
        smoothness term; :func:`refine_smooth_weight_of`).
    refine_gradient_sigma : float
        Gaussian smoothing (sigma, voxels of the level's grid) of the correction's gradient on every refinement
        level but the finest (:class:`~hdar_pipeline.hdar.instance.RefineLevel`); 0 turns it off. Default 1:
        +0.0024 mean Dice on three held-out LPBA40 pairs (0.7291 -> 0.7315, each pair better) for about 1 % of
        the time.
    refine_full_resolution : int
        Steps of a last refinement level on the full-resolution grid, after ``refine_levels`` (0: none). The
        correction lives on the fixed brain's box at 1 voxel and is composed as ``exp(v)`` like the others
        (:func:`~hdar_pipeline.hdar.instance.default_refine_levels`); about 1 s per step plus 1 s once (warping,
        linearising, integrating) on 2 CPU cores for a 160 x 192 x 160 pair. Needs ``refine > 0`` and
        ``refine_similarity="full"``, and the finest of ``refine_levels`` below 1.

    Raises
    ------
    ValueError
        A setting out of its range, or ``refine_full_resolution`` without what it needs.
    """

    mode: str = "fast"
    levels: int | None = None
    selection: str | None = None
    prealign: bool = True
    refine: int = 0
    refine_levels: tuple[float, ...] = (0.25, 0.5)
    refine_lr: float = 0.2
    refine_similarity: str = "full"
    refine_diffeomorphic: bool = True
    refine_smooth_weight: float | None = None
    refine_gradient_sigma: float = 1.0
    refine_full_resolution: int = 0

    def __post_init__(self) -> None:
        # frozen: the normalised values are set through object.__setattr__
        if self.mode not in ("fast", "full"):
            raise ValueError(f"mode must be 'fast' or 'full', got {self.mode!r}")
        if self.levels is not None and self.levels not in (1, 2, 3):
            raise ValueError(f"levels must be 1, 2 or 3, got {self.levels}")
        if self.selection not in (None, "attention", "random"):
            raise ValueError(f"selection must be 'attention' or 'random', got {self.selection!r}")
        object.__setattr__(self, "refine", int(self.refine))
        if self.refine < 0:
            raise ValueError("refine must be >= 0")
        object.__setattr__(self, "refine_full_resolution", int(self.refine_full_resolution))
        if self.refine_full_resolution < 0:
            raise ValueError("refine_full_resolution must be >= 0")
        if self.refine_full_resolution and not (self.refine and self.refine_similarity == "full"):
            raise ValueError("refine_full_resolution needs refine > 0 and refine_similarity='full'")
        object.__setattr__(self, "refine_levels", tuple(float(x) for x in self.refine_levels))
        if not self.refine_levels or not all(0 < x <= 1 for x in self.refine_levels):
            raise ValueError(f"refine_levels must be scales in (0, 1], got {self.refine_levels}")
        if self.refine_similarity not in ("full", "level"):
            raise ValueError(f"refine_similarity must be 'full' or 'level', got {self.refine_similarity!r}")
        if self.refine and self.refine_similarity == "full":
            from hdar_pipeline.hdar.instance import default_refine_levels

            # checks: a finest scale of 1/b, b whole; below 1 when a full-resolution level follows
            default_refine_levels(self.refine, self.refine_levels, full_resolution_steps=self.refine_full_resolution)


def unit_range(img: "nib.spatialimages.SpatialImage") -> np.ndarray:
    """An image's intensities as a contiguous float32 array in [0, 1], rescaled by
    :func:`~hdar_pipeline.core.images.robust_unit_range` (HDAR's one normalisation; idempotent, so an image
    normalised before is unchanged).

    Parameters
    ----------
    img : nibabel image

    Returns
    -------
    numpy.ndarray
        ``float32``, C-contiguous, the image's shape.
    """
    return np.ascontiguousarray(robust_unit_range(np.asarray(img.dataobj, dtype=np.float32)))


def register_with_model(loaded: "LoadedWeights", fixed: "nib.spatialimages.SpatialImage",
                        moving: "nib.spatialimages.SpatialImage",
                        fixed_mask: "nib.spatialimages.SpatialImage | None" = None, *,
                        settings: InferenceSettings | None = None,
                        device: "torch.device | None" = None) -> tuple[Transform, str]:
    """Register an aligned pair with an already loaded HDAR (or VoxelMorph) model, as ``settings`` say.

    An affine pre-alignment (``settings.prealign``, :func:`~hdar_pipeline.hdar.instance.affine_prealign`) comes
    first; the network runs without gradients on the pre-aligned moving image, its fields on its finest
    level's grid (``resolution="level"``); ``settings.refine`` steps per level of
    :func:`~hdar_pipeline.hdar.instance.refine_flow` follow (smoothness weight from the model card's
    training config, default 1.5). One :class:`~hdar_pipeline.hdar.instance.ImagePyramid` per image feeds
    all of them. All run in the canonical frame of the training data (:func:`frame_for`,
    :mod:`hdar_pipeline.hdar.frame`: the card's axis order, e.g. ``"LPS"``, voxel size and box, centred on the
    fixed brain), and the field is mapped back onto the fixed image's grid once.
    Threads, seeds and the random-selection generator are left as the caller set them.

    Parameters
    ----------
    loaded : hdar_pipeline.hdar.weights.LoadedWeights
        The model (on its device), its card, name and SHA-256.
    fixed, moving : nibabel image
        On the same grid (the moving image already resampled onto the fixed grid), any intensity range.
    fixed_mask : nibabel image, optional
        Brain mask on the fixed grid (non-zero: brain) for patch placement and the brain box of the frame.
    settings : InferenceSettings, optional
        Mode, levels, selection, pre-alignment and refinement; default ``InferenceSettings()`` (the network
        alone after the pre-alignment).
    device : torch.device, optional
        Where the model is (default: the device of its parameters).

    Returns
    -------
    (Transform, str)
        The transform on the fixed grid (a dense LPS-millimetre displacement field; weights' name, SHA-256,
        device, refine steps, pre-alignment and canonical frame in its metadata) and the device used
        (``"cpu"``, ``"cuda:N"``).

    Raises
    ------
    ValueError
        ``moving`` or ``fixed_mask`` is not on the fixed image's grid.
    """
    import torch

    from hdar_pipeline.hdar.frame import brain_box, normalise_in_frame
    from hdar_pipeline.hdar.instance import ImagePyramid, affine_prealign, default_refine_levels, refine_flow
    from hdar_pipeline.hdar.layers import SpatialTransformer, compose_flows, resize_flow

    s = InferenceSettings() if settings is None else settings
    model = loaded.model
    dev = next(model.parameters()).device if device is None else device
    grid = Grid.of(fixed)
    if not Grid.of(moving).same_as(grid, atol=1e-3):
        raise ValueError("register_with_model: the moving image must lie on the fixed grid")
    fixed_arr = np.asarray(fixed.dataobj, dtype=np.float32)
    mask = None
    if fixed_mask is not None:
        mask = np.asarray(fixed_mask.dataobj) > 0
        if mask.shape != grid.shape:
            raise ValueError(f"fixed_mask shape {mask.shape} does not match the fixed image {grid.shape}")
    # The network and the refinement run in the canonical frame of the training data (model card):
    # its axis order and voxel size, a box of its shape centred on the fixed brain. The field comes back
    # onto the fixed grid once, at the end.
    frame = frame_for(loaded.card, grid, brain_box(fixed_arr, mask))
    ft = normalise_in_frame(frame.to_canonical(fixed_arr, device=dev))
    mt = normalise_in_frame(frame.to_canonical(np.asarray(moving.dataobj, dtype=np.float32), device=dev))
    mk = None if mask is None else frame.to_canonical(mask.astype(np.float32), interpolation="nearest",
                                                      device=dev) > 0.5
    shape = tuple(ft.shape[2:])
    fp, mp = ImagePyramid(ft), ImagePyramid(mt)
    # The cascade keeps its fields on its finest level's grid (S1's alone, 1/2 with S2) and the refinement
    # carries them on, so the only full-resolution field operation is the final upsampling.
    work = model.work_grid(shape, s.levels)
    s1 = model.config.s1_size(shape)
    with torch.no_grad():
        pre = affine_prealign(fp, mp, out_shape=work) if s.prealign else None
        inputs = {size: mp.at(size) for size in (s1, work)}
        if pre is not None:
            # The pre-aligned moving image at the network's two input resolutions. (Handing the network
            # the original image and the affine map as a starting field, i.e. one interpolation instead
            # of two, measured 0.01 lower Dice on LPBA40 pairs with the shipped weights.)
            warp = SpatialTransformer("bilinear", "zeros")
            inputs = {size: warp(image, resize_flow(pre, size)) for size, image in inputs.items()}
        out = model(ft, mt, mask=mk, mode=s.mode, levels=s.levels, selection=s.selection, resolution="level",
                    s1_inputs=(fp.at(s1), inputs[s1]), work_inputs=(fp.at(work), inputs[work]))
        flow = out.levels[-1].flow.float()
        if pre is not None:
            flow = compose_flows(pre, flow)
    if s.refine:
        pyramid = default_refine_levels(s.refine, s.refine_levels, lr=s.refine_lr, similarity=s.refine_similarity,
                                        coarse_gradient_sigma=s.refine_gradient_sigma,
                                        full_resolution_steps=s.refine_full_resolution)
        weight = s.refine_smooth_weight if s.refine_smooth_weight is not None else refine_smooth_weight_of(loaded.card)
        flow = refine_flow(fp, mp, flow, pyramid, smooth_weight=float(weight),
                           diffeomorphic=bool(s.refine_diffeomorphic or model.config.diffeomorphic), out_shape=shape)
    with torch.no_grad():
        field = frame.field_to_fixed(resize_flow(flow, shape))
    device_used = str(dev) if dev.type != "cuda" else f"cuda:{dev.index or 0}"
    return Transform(grid, field=field, metadata=dict(
        weights_sha256=loaded.sha256, weights=loaded.name, device=device_used, refine_steps=int(s.refine),
        refine_full_resolution_steps=int(s.refine_full_resolution),
        prealign=bool(s.prealign), frame={"shape": list(frame.grid.shape), "exact": frame.exact,
                                          "voxel_size_mm": [float(v) for v in frame.grid.spacing]})), device_used


def refine_smooth_weight_of(card: dict[str, Any]) -> float:
    """The refinement's default anti-folding smoothness weight for a model card: the weight the model was trained
    with when its training used the anti-folding term (HDAR's cards; cards without ``smoothness`` did), else
    :data:`REFINE_SMOOTH_WEIGHT` (a weight of another term, such as VoxelMorph's diffusion weight of 1, does not
    carry over).

    Parameters
    ----------
    card : dict
        The model card (``config.training.smoothness`` and ``config.training.smooth_weight`` are read).

    Returns
    -------
    float
        The weight (dimensionless; it multiplies the anti-folding term of the refinement loss).
    """
    config = card.get("config") if isinstance(card.get("config"), dict) else {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    if (training.get("smoothness") or "anti_folding") != "anti_folding":
        return REFINE_SMOOTH_WEIGHT
    return float(training.get("smooth_weight", REFINE_SMOOTH_WEIGHT))


def frame_for(card: dict[str, Any], grid: Grid,
              box: tuple[np.ndarray, np.ndarray] | None) -> "CanonicalFrame":
    """The canonical frame (:func:`~hdar_pipeline.hdar.frame.canonical_frame`) of the model card's training
    data (``data.orientation``, ``data.voxel_size_mm``, ``data.grid_shape``) for a fixed ``grid`` and its
    brain ``box``. What the card does not say is taken from the fixed grid (its own axis order, voxel size
    or shape), so a card that describes no training data runs the network on the fixed grid as it is.

    Parameters
    ----------
    card : dict
        The model card.
    grid : Grid
        The fixed image's grid.
    box : (lo, hi) or None
        The fixed brain's bounding box in fixed voxel indices, inclusive
        (:func:`~hdar_pipeline.hdar.frame.brain_box`); ``None`` centres the box on the grid.

    Returns
    -------
    hdar_pipeline.hdar.frame.CanonicalFrame
        Array axes in the card's ``orientation`` codes (e.g. ``"LPS"``), its voxel size (mm) and box shape
        (voxels), the box centred on the brain; enlarged to hold the whole brain only when the card gives a
        ``grid_shape``.
    """
    import nibabel as nib

    from hdar_pipeline.hdar.frame import canonical_frame

    data = card.get("data") if isinstance(card.get("data"), dict) else {}
    own = nib.orientations.io_orientation(grid.affine)
    codes = data.get("orientation") or "".join(nib.orientations.ornt2axcodes(own))
    order = [int(np.nonzero(own[:, 0] == w)[0][0]) for w in nib.orientations.axcodes2ornt(tuple(codes))[:, 0]]
    voxel = data.get("voxel_size_mm") or [float(grid.spacing[a]) for a in order]
    shape = data.get("grid_shape") or [int(grid.shape[a]) for a in order]
    return canonical_frame(grid, box, orientation=codes, voxel_size=voxel, shape=shape,
                           fit_brain=bool(data.get("grid_shape")))
