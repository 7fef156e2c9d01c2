"""HDAR: the hierarchical, difficulty-aware cascade (:mod:`hdar_pipeline.hdar`) as a registration method.

Presets
-------
``fast``
    S1 on the whole pair, S2/S3 on the K hardest patches (the paper's inference).
``full``
    S1 everywhere, S2/S3 on a sliding window over the brain, blended without seams.
``refined``
    ``fast`` followed by ``refine=25`` (:data:`REFINED_STEPS`) instance-optimisation steps per level, a few seconds
    more than ``fast`` on a CPU (0.124 of SyN fast's time on the 20 LPBA40 validation pairs, mean Dice 0.7246).
``accurate``
    ``fast`` followed by 30 steps per level (:data:`ACCURATE_STEPS`) and 2 steps of a last level on the
    full-resolution grid (:data:`ACCURATE_FULL_RESOLUTION_STEPS`): the most accurate HDAR, about 1.6 times
    ``refined``'s time (0.197 of SyN fast's, mean Dice 0.7301) and the default.

Before the network, ``prealign`` (default on) fits a 12-parameter affine map of the moving image on the same
local NCC at 1/4 resolution (under a second on a CPU): the network was trained on LPBA40's rigidly aligned
space, and the affine residual between two subjects (scale, shear) costs it accuracy.

``refine=N`` adds instance optimisation after the network: a pyramid of corrections (``refine_levels``,
default 1/4 then 1/2 of the image size), each optimised by N Adam steps on the training loss (local NCC +
anti-folding smoothness, weight from the model card, default 1.5) and added to the field
(:func:`hdar_pipeline.hdar.instance.refine_flow`). The coarse level's loss is on the images downsampled to
it; the finest level's (``refine_similarity="full"``) on the full-resolution images, linearised around the
warp (:mod:`hdar_pipeline.hdar.block_ncc`), which is where the fine anatomical detail is.
``refine_diffeomorphic`` composes ``exp(v)`` corrections on the downsampled levels instead.

The inputs are expected affinely aligned on the fixed grid (as :func:`~hdar_pipeline.methods.register_pair`
provides them); a moving image on another grid is resampled onto the fixed grid first. The pair is then
taken into the canonical frame of the training data (:mod:`hdar_pipeline.hdar.frame`) and rescaled there
with :func:`~hdar_pipeline.core.images.robust_unit_range`, the function the training data went through, whatever
intensity range the inputs have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from hdar_pipeline.core.images import Grid, resample_to, robust_unit_range
from hdar_pipeline.core.runtime import configure_threads, seed_everything
from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.methods.base import MethodBase
from hdar_pipeline.methods.registry import BenchmarkVariant, MethodSpec
from hdar_pipeline.methods.text import (ALWAYS_SKIPPED, Reference, SentenceContext, devices_text, join,
                                        other_parameters, pick, value_text)

#: Instance-optimisation steps per refinement level of the ``refined`` preset: the most that keep it within a fifth
#: of SyN fast's time with a margin (three tuning pairs: 20 steps 0.7316 mean Dice, 25 steps 0.7330). A level at
#: full resolution would give more (one step after 20: 0.7350) but took it to 0.20-0.23 of SyN fast's time.
REFINED_STEPS = 25

#: Steps per refinement level, and steps of the last, full-resolution level, of the ``accurate`` preset.
ACCURATE_STEPS = 30
ACCURATE_FULL_RESOLUTION_STEPS = 2

#: The preset used when none is named: the most accurate whose runtime stays within a fifth of SyN fast's
#: (README "Results", ``benchmarks/results/lpba40-v5``: on the 20 LPBA40 validation pairs ``accurate`` scores
#: 0.7301 in 0.199 of SyN fast's time, ``refined`` 0.7246 in 0.124; also the re-stored frames and the IXI heads).
#: ``accurate`` is at the edge of that fifth on a 2-core CPU; ``refined`` is the choice where time matters.
DEFAULT_PRESET = "accurate"

HDAR_PRESETS: dict[str, dict[str, Any]] = {"fast": {"mode": "fast"}, "full": {"mode": "full"},
                                           "refined": {"mode": "fast"}, "accurate": {"mode": "fast"}}

#: Anti-folding smoothness weight of the refinement when the model card names none that applies (HDAR's training
#: weight; also what a model trained with another smoothness term, e.g. VoxelMorph's diffusion, is refined with).
REFINE_SMOOTH_WEIGHT = 1.5


@dataclass
class HDARMethod(MethodBase):
    """The HDAR cascade with verified weights.

    Parameters
    ----------
    preset : {"fast", "full", "refined", "accurate"}
        Default :data:`DEFAULT_PRESET`.
    prealign : bool
        Fit an affine map on local NCC before the network (:func:`hdar_pipeline.hdar.instance.affine_prealign`).
    refine : int, optional
        Instance-optimisation steps on each refinement level after the network (0: none); default: the
        preset's (:data:`REFINED_STEPS` for ``refined``, :data:`ACCURATE_STEPS` for ``accurate``, 0 for the others).
    refine_levels : tuple of float
        Resolutions of the refinement levels relative to the image, coarse to fine.
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
    refine_full_resolution : int, optional
        Steps of a last refinement level on the full-resolution grid, after ``refine_levels`` (0: none; default:
        the preset's, :data:`ACCURATE_FULL_RESOLUTION_STEPS` for ``accurate``, 0 for the others). The
        correction lives on the fixed brain's box at 1 voxel and is composed as ``exp(v)`` like the others
        (:func:`~hdar_pipeline.hdar.instance.default_refine_levels`); about 1 s per step plus 1 s once (warping,
        linearising, integrating) on 2 CPU cores for a 160 x 192 x 160 pair. Needs ``refine > 0`` and
        ``refine_similarity="full"``.
    weights : str or Path
        A shipped name (``"default"``) or the path of an exported ``.pt`` (model card beside it).
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``.
    seed, threads : int, optional

    Attributes
    ----------
    device_used : str
        The device of the latest registration.

    Raises
    ------
    hdar_pipeline.hdar.weights.NoWeightsError
        At construction, when the requested weights do not exist.
    """

    name: ClassVar[str] = "hdar"
    #: How messages name the method.
    title: ClassVar[str] = "HDAR"
    #: The S1 network the weights must hold (model card ``config.cascade.network``).
    network: ClassVar[str] = "hdar"
    #: Preset name -> cascade settings; and each preset's default ``refine`` and ``refine_full_resolution``.
    presets: ClassVar[dict[str, dict[str, Any]]] = HDAR_PRESETS
    preset_refine: ClassVar[dict[str, int]] = {"refined": REFINED_STEPS, "accurate": ACCURATE_STEPS}
    preset_full_resolution: ClassVar[dict[str, int]] = {"accurate": ACCURATE_FULL_RESOLUTION_STEPS}
    preset: str = DEFAULT_PRESET
    prealign: bool = True
    refine: int | None = None
    refine_levels: tuple[float, ...] = (0.25, 0.5)
    refine_lr: float = 0.2
    refine_similarity: str = "full"
    refine_diffeomorphic: bool = True
    refine_smooth_weight: float | None = None
    refine_gradient_sigma: float = 1.0
    refine_full_resolution: int | None = None
    weights: str | Path = "default"
    device: str = "auto"
    seed: int | None = None
    threads: int | None = None
    device_used: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.preset not in self.presets:
            raise ValueError(f"unknown {self.title} preset {self.preset!r}; choose from {sorted(self.presets)}")
        if self.refine is None:
            self.refine = self.preset_refine.get(self.preset, 0)
        self.refine = int(self.refine)
        if self.refine < 0:
            raise ValueError("refine must be >= 0")
        if self.refine_full_resolution is None:
            # the preset's, where the other options leave room for it (a refinement whose finest level is
            # already at full resolution, or on the downsampled images, gets none rather than an error)
            fits = (self.refine and self.refine_similarity == "full"
                    and max(float(x) for x in self.refine_levels) < 1.0)
            self.refine_full_resolution = self.preset_full_resolution.get(self.preset, 0) if fits else 0
        self.refine_full_resolution = int(self.refine_full_resolution)
        if self.refine_full_resolution < 0:
            raise ValueError("refine_full_resolution must be >= 0")
        if self.refine_full_resolution and not (self.refine and self.refine_similarity == "full"):
            raise ValueError("refine_full_resolution needs refine > 0 and refine_similarity='full'")
        self.refine_levels = tuple(float(x) for x in self.refine_levels)
        if not self.refine_levels or not all(0 < x <= 1 for x in self.refine_levels):
            raise ValueError(f"refine_levels must be scales in (0, 1], got {self.refine_levels}")
        if self.refine_similarity not in ("full", "level"):
            raise ValueError(f"refine_similarity must be 'full' or 'level', got {self.refine_similarity!r}")
        if self.refine and self.refine_similarity == "full":
            from hdar_pipeline.hdar.instance import default_refine_levels

            # checks: a finest scale of 1/b, b whole; below 1 when a full-resolution level follows
            default_refine_levels(self.refine, self.refine_levels, full_resolution_steps=self.refine_full_resolution)
        self._check_weights()
        self._loaded: Any = None

    def _check_weights(self) -> dict[str, Any]:
        """Fail early, with the clear message, when the weights do not exist or hold another network (read from
        the model card; the ``.pt`` is verified and loaded at the first registration). Returns the card."""
        from hdar_pipeline.hdar.weights import WeightsError, card_network, read_card, resolve_weights

        _, card = resolve_weights(self.weights)
        content = read_card(card)
        held = card_network(content)
        if held != self.network:
            names = {"hdar": "an HDAR cascade", "voxelmorph": "a VoxelMorph network"}
            raise WeightsError(f"{card}: these weights hold {names.get(held, repr(held))}, not "
                               f"{names.get(self.network, repr(self.network))}; use --method {held} "
                               f"(method {held!r}) with them")
        return content

    @property
    def parameters(self) -> dict[str, Any]:
        out = {k: v for k, v in super().parameters.items() if k not in ("device_used", "_loaded")}
        out["weights"] = str(self.weights)
        out.update(self.presets[self.preset])
        return out

    def _model(self, device):
        from hdar_pipeline.hdar.weights import load_weights

        key = (str(self.weights), str(device))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = (key, load_weights(self.weights, device=device))
        return self._loaded[1]

    def _register(self, fixed, moving, fixed_mask) -> Transform:
        from hdar_pipeline.hdar.train import resolve_device

        configure_threads(self.threads)
        seed_everything(self.seed)
        grid = Grid.of(fixed)
        if not Grid.of(moving).same_as(grid, atol=1e-3):
            moving = resample_to(moving, grid, interpolation="linear")
        dev = resolve_device(self.device)
        transform, self.device_used = register_with_model(
            self._model(dev), fixed, moving, fixed_mask, mode=self.presets[self.preset].get("mode", "fast"),
            prealign=self.prealign, refine=self.refine, refine_levels=self.refine_levels, refine_lr=self.refine_lr,
            refine_similarity=self.refine_similarity, refine_diffeomorphic=self.refine_diffeomorphic,
            refine_smooth_weight=self.refine_smooth_weight, refine_gradient_sigma=self.refine_gradient_sigma,
            refine_full_resolution=self.refine_full_resolution, device=dev)
        return transform


def unit_range(img) -> np.ndarray:
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


def register_with_model(loaded: Any, fixed, moving, fixed_mask=None, *, mode: str = "fast",
                        levels: int | None = None, selection: str | None = None, prealign: bool = True,
                        refine: int = 0, refine_levels: tuple[float, ...] = (0.25, 0.5), refine_lr: float = 0.2,
                        refine_similarity: str = "full", refine_diffeomorphic: bool = True,
                        refine_smooth_weight: float | None = None, refine_gradient_sigma: float = 1.0,
                        refine_full_resolution: int = 0, device: Any = None) -> tuple[Transform, str]:
    """Register an aligned pair with an already loaded HDAR model (the core of :class:`HDARMethod`).

    An affine pre-alignment (``prealign``, :func:`~hdar_pipeline.hdar.instance.affine_prealign`) comes
    first; the network runs without gradients on the pre-aligned moving image, its fields on its finest
    level's grid (``resolution="level"``); ``refine`` steps per level of
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
        On the same grid (the moving image already resampled onto the fixed grid).
    fixed_mask : nibabel image, optional
        Brain mask on the fixed grid for patch placement.
    mode : {"fast", "full"}
        The cascade's inference mode.
    levels : int, optional
        Run only the first ``levels`` sub-networks (default: all).
    selection : {"attention", "random"}, optional
        Fast mode's patch ranking (default: the model's).
    prealign : bool
        Fit an affine map on local NCC before the network.
    refine : int
        Instance-optimisation steps per refinement level (0: none).
    refine_levels : tuple of float
        The levels' resolutions relative to the image, coarse to fine.
    refine_lr : float
        Adam's learning rate on every level.
    refine_similarity : {"full", "level"}
        The finest refinement level's loss (see :class:`HDARMethod`).
    refine_diffeomorphic : bool
        Compose ``exp(v)`` corrections (forced for a diffeomorphic model) instead of adding them.
    refine_smooth_weight : float, optional
        The refinement's anti-folding smoothness weight (default :func:`refine_smooth_weight_of` the model card:
        its training weight when it trained with the anti-folding term, else 1.5).
    refine_gradient_sigma : float
        Gradient smoothing on the refinement levels coarser than the finest (see :class:`HDARMethod`).
    refine_full_resolution : int
        Steps of a last refinement level on the full-resolution grid (0: none; see :class:`HDARMethod`).
    device : torch.device, optional
        Where the model is (default: the device of its parameters).

    Returns
    -------
    (Transform, str)
        The transform (weights' name, SHA-256, device and refine steps in its metadata) and the device used
        (``"cpu"``, ``"cuda:N"``).

    Raises
    ------
    ValueError
        ``fixed_mask`` is not on the fixed image's grid.
    """
    import torch

    from hdar_pipeline.hdar.frame import brain_box, normalise_in_frame
    from hdar_pipeline.hdar.instance import ImagePyramid, affine_prealign, default_refine_levels, refine_flow
    from hdar_pipeline.hdar.layers import SpatialTransformer, compose_flows, resize_flow

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
    work = model.work_grid(shape, levels)
    s1 = model.config.s1_size(shape)
    with torch.no_grad():
        pre = affine_prealign(fp, mp, out_shape=work) if prealign else None
        inputs = {size: mp.at(size) for size in (s1, work)}
        if pre is not None:
            # The pre-aligned moving image at the network's two input resolutions. (Handing the network
            # the original image and the affine map as a starting field, i.e. one interpolation instead
            # of two, measured 0.01 lower Dice on LPBA40 pairs with the shipped weights.)
            warp = SpatialTransformer("bilinear", "zeros")
            inputs = {size: warp(image, resize_flow(pre, size)) for size, image in inputs.items()}
        out = model(ft, mt, mask=mk, mode=mode, levels=levels, selection=selection, resolution="level",
                    s1_inputs=(fp.at(s1), inputs[s1]), work_inputs=(fp.at(work), inputs[work]))
        flow = out.levels[-1].flow.float()
        if pre is not None:
            flow = compose_flows(pre, flow)
    if refine:
        pyramid = default_refine_levels(refine, refine_levels, lr=refine_lr, similarity=refine_similarity,
                                        coarse_gradient_sigma=refine_gradient_sigma,
                                        full_resolution_steps=refine_full_resolution)
        weight = refine_smooth_weight if refine_smooth_weight is not None else refine_smooth_weight_of(loaded.card)
        flow = refine_flow(fp, mp, flow, pyramid, smooth_weight=float(weight),
                           diffeomorphic=bool(refine_diffeomorphic or model.config.diffeomorphic), out_shape=shape)
    with torch.no_grad():
        field = frame.field_to_fixed(resize_flow(flow, shape))
    device_used = str(dev) if dev.type != "cuda" else f"cuda:{dev.index or 0}"
    return Transform(grid, field=field, metadata=dict(
        weights_sha256=loaded.sha256, weights=loaded.name, device=device_used, refine_steps=int(refine),
        refine_full_resolution_steps=int(refine_full_resolution),
        prealign=bool(prealign), frame={"shape": list(frame.grid.shape), "exact": frame.exact,
                                        "voxel_size_mm": [float(v) for v in frame.grid.spacing]})), device_used


def refine_smooth_weight_of(card: dict) -> float:
    """The refinement's default anti-folding smoothness weight for a model card: the weight the model was trained
    with when its training used the anti-folding term (HDAR's cards; cards without ``smoothness`` did), else
    :data:`REFINE_SMOOTH_WEIGHT` (a weight of another term, such as VoxelMorph's diffusion weight of 1, does not
    carry over)."""
    config = card.get("config") if isinstance(card.get("config"), dict) else {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    if (training.get("smoothness") or "anti_folding") != "anti_folding":
        return REFINE_SMOOTH_WEIGHT
    return float(training.get("smooth_weight", REFINE_SMOOTH_WEIGHT))


def frame_for(card: dict, grid: Grid, box) -> Any:
    """The canonical frame (:func:`~hdar_pipeline.hdar.frame.canonical_frame`) of the model card's training
    data (``data.orientation``, ``data.voxel_size_mm``, ``data.grid_shape``) for a fixed ``grid`` and its
    brain ``box``. What the card does not say is taken from the fixed grid (its own axis order, voxel size
    or shape), so a card that describes no training data runs the network on the fixed grid as it is."""
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


# ----------------------------------------------------------------------------- the method's registry entry

HUANG2021 = Reference(
    "huang2021",
    "Huang Y, Ahmad S, Fan J, Shen D, Yap PT. Difficulty-aware hierarchical convolutional neural "
    "networks for deformable registration of brain MR images. *Medical Image Analysis*. "
    "2021;67:101817. doi:10.1016/j.media.2020.101817",
    "Huang et al. 2021", "article", {
        "author": "Huang, Y. and Ahmad, S. and Fan, J. and Shen, D. and Yap, P.-T.",
        "title": "Difficulty-aware hierarchical convolutional neural networks for deformable registration of brain "
                 "{MR} images",
        "journal": "Medical Image Analysis", "year": "2021", "volume": "67", "pages": "101817",
        "doi": "10.1016/j.media.2020.101817"})


def describe(params: Mapping[str, Any], preset: str, context: SentenceContext) -> str:
    """The methods paragraph's sentence on HDAR (see :class:`~.registry.MethodSpec`): the cascade and its mode,
    the pre-alignment, the refinement, the weights (``params`` first, else ``context.weights``' model card) and
    the devices."""
    cite, weights = context.cite, context.weights
    used = set(ALWAYS_SKIPPED) | {"weights", "weights_sha256"}
    card_cfg: Mapping[str, Any] = {}
    if weights and isinstance(weights.get("config"), Mapping):
        cfg = weights["config"]
        card_cfg = cfg.get("cascade", cfg) if isinstance(cfg.get("cascade", cfg), Mapping) else {}

    def get(*keys: str) -> Any:
        k, v = pick(params, *keys)
        if k is not None:
            used.add(k)
            return v
        k, v = pick(card_cfg, *keys)
        return v

    text = ("Deformable registration with HDAR, the hierarchical difficulty-aware registration network "
            + cite("huang2021") + f", used the PyTorch{context.version('torch')} implementation in hdar-pipeline")
    details = []
    levels = get("levels", "n_levels", "num_levels")
    if levels is not None:
        details.append(f"{value_text(levels)} cascaded sub-network level" + ("s" if str(levels) != "1" else ""))
    width = get("width", "widths")
    if width is not None:
        details.append(f"network width `{value_text(width)}`")
    mode = get("mode")
    mode = mode if mode is not None else (preset if preset in ("fast", "full") else None)
    k = get("top_k", "K", "k", "patches", "n_patches")
    if mode is not None:
        if str(mode) == "fast":
            details.append("*fast* mode (the first level on the whole image pair, the finer levels on the "
                           + (f"K = {value_text(k)} " if k is not None else "")
                           + "hardest patches selected by the difficulty-aware attention)")
        elif str(mode) == "full":
            details.append("*full* mode (the finer levels on a sliding window covering the brain, blended "
                           "without seams)")
        else:
            details.append(f"mode `{value_text(mode)}`")
    elif k is not None:
        details.append(f"K = {value_text(k)} patches per level")
    if mode is not None and str(mode) != "fast" and k is not None:
        details.append(f"K = {value_text(k)}")
    diffeo = get("diffeomorphic")
    if diffeo is not None:
        details.append("diffeomorphic (stationary velocity fields integrated by scaling and squaring)" if diffeo
                       else "non-diffeomorphic displacement fields")
    text += f", with {join(details)}." if details else "."
    prealign = get("prealign")
    if prealign:
        text += (" Before the network, a 12-parameter affine map was fitted on local normalised cross-correlation "
                 "at a quarter of the image resolution (Adam).")
    refine = get("refine", "refine_steps", "refinement_steps")
    if refine is not None:
        if int(refine) > 0:
            extra = []
            lr = get("refine_lr")
            if lr is not None:
                extra.append(f"learning rate {value_text(lr)}")
            levels = get("refine_levels")
            if levels:
                extra.append("on each of the resolutions " + ", ".join(value_text(x) for x in levels)
                             + " times the image size, coarse to fine")
            if get("refine_similarity") == "full":
                extra.append("the finest level's similarity computed on the full-resolution images, linearised "
                             "around the current warp and re-warped every few steps")
            full_res = get("refine_full_resolution")
            if full_res:
                extra.append(f"then {int(full_res)} step{'s' if int(full_res) != 1 else ''} on a correction at the "
                             "full resolution of the image, "
                             "restricted to the brain's bounding box")
            if get("refine_diffeomorphic"):
                extra.append("each correction integrated from a stationary velocity field by scaling and squaring "
                             "and composed with the field")
            text += (f" The network's field was refined by {int(refine)} steps per level of instance optimisation (Adam on "
                     "local normalised cross-correlation plus an anti-folding smoothness term"
                     + (f"; {', '.join(extra)}" if extra else "") + ").")
        else:
            text += " No instance-optimisation refinement was applied."
    name = params.get("weights") or (weights or {}).get("name") or (weights or {}).get("model")
    sha = params.get("weights_sha256") or (weights or {}).get("sha256")
    if name is not None or sha is not None:
        text += " Network weights: " + (f"`{name}`" if name is not None else "") + (
            f" (SHA-256 `{sha}`)" if sha is not None else "")
        if weights and weights.get("data"):
            text += f", trained on {weights['data']}"
        text += "."
    text += devices_text(get("device"), context.devices)
    if preset and not (mode is not None and preset == str(mode)):
        text += f" Preset: `{preset}`."
    elif preset:
        used.add("mode")
    return text + other_parameters(params, used)


def _variants(refine_steps: int) -> list[BenchmarkVariant]:
    return [
        BenchmarkVariant("hdar", None, {}, "HDAR with its default preset and options (what users get)", order=60),
        BenchmarkVariant("hdar-fast", "fast", {}, "HDAR, S2/S3 on the hardest patches", order=61),
        BenchmarkVariant("hdar-full", "full", {}, "HDAR, S2/S3 on a sliding window", order=62),
        BenchmarkVariant("hdar-refined", "refined", {"refine": int(refine_steps)},
                         f"HDAR fast + {int(refine_steps)} instance-optimisation steps per refinement level", order=63),
        BenchmarkVariant("hdar-accurate", "accurate", {},
                         "HDAR fast + 30 steps per refinement level and 3 on the full-resolution grid", order=64),
    ]


SPEC = MethodSpec(
    name="hdar", title="HDAR", method_class=HDARMethod, describe=describe, references=(HUANG2021,),
    presets={"accurate": "fast plus 30 diffeomorphic instance-optimisation steps per level and 2 at full "
                         "resolution, the most accurate within a fifth of SyN fast's time",
             "refined": "25 steps per level, none at full resolution: 0.6 times as long, slightly less accurate",
             "fast": "the network on the hardest patches",
             "full": "on a sliding window"},
    default_preset=DEFAULT_PRESET,
    presets_summary="default accurate: the network then 30 diffeomorphic refinement steps per level and 2 at full "
                    "resolution, the most accurate within a fifth of SyN fast's time; refined: 25 per level, none "
                    "at full resolution, 0.6 times as long; fast: the network alone",
    default_weights="default", uses_device=True, variants=_variants)
