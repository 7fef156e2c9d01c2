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

How a pair is registered (the affine pre-alignment, the network in the canonical frame of its training data,
the refinement) is :mod:`hdar_pipeline.hdar.inference`; the method turns its preset and options into one
:class:`~hdar_pipeline.hdar.inference.InferenceSettings` and loads the weights.

The inputs are expected affinely aligned on the fixed grid (as :func:`~hdar_pipeline.methods.register_pair`
provides them); a moving image on another grid is resampled onto the fixed grid first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from hdar_pipeline.core.images import Grid, resample_to
from hdar_pipeline.core.runtime import configure_threads, resolve_device, seed_everything
from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.hdar.inference import InferenceSettings, register_with_model
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


@dataclass
class HDARMethod(MethodBase):
    """The HDAR cascade with verified weights.

    Parameters
    ----------
    preset : {"fast", "full", "refined", "accurate"}
        Default :data:`DEFAULT_PRESET`.
    refine : int, optional
        Instance-optimisation steps on each refinement level after the network (0: none); default: the
        preset's (:data:`REFINED_STEPS` for ``refined``, :data:`ACCURATE_STEPS` for ``accurate``, 0 for the others).
    prealign, refine_levels, refine_lr, refine_similarity, refine_diffeomorphic, refine_smooth_weight, \
refine_gradient_sigma
        Pre-alignment and refinement settings, with their meaning, units and defaults in
        :class:`~hdar_pipeline.hdar.inference.InferenceSettings` (``prealign``: the affine map on local NCC
        before the network; ``refine_levels``: resolutions relative to the image, coarse to fine;
        ``refine_lr``: voxels of each level's grid per step; ``refine_similarity``: ``"full"`` or ``"level"``,
        the finest level's loss; ``refine_diffeomorphic``: ``exp(v)`` corrections, forced on for a
        diffeomorphic model; ``refine_smooth_weight``: default the model card's training weight;
        ``refine_gradient_sigma``: voxels of the level's grid).
    refine_full_resolution : int, optional
        Steps of a last refinement level on the full-resolution grid, after ``refine_levels`` (0: none; default:
        the preset's, :data:`ACCURATE_FULL_RESOLUTION_STEPS` for ``accurate``, 0 for the others, and 0 where
        the other options leave no room for it: no refinement, ``refine_similarity="level"`` or a finest
        refinement level already at full resolution). About 1 s per step plus 1 s once on 2 CPU cores for a
        160 x 192 x 160 pair (:class:`~hdar_pipeline.hdar.inference.InferenceSettings`). Needs ``refine > 0``
        and ``refine_similarity="full"``.
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
    ValueError
        At construction, for an unknown preset or settings that
        :class:`~hdar_pipeline.hdar.inference.InferenceSettings` refuses.
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
    prealign: bool = InferenceSettings.prealign
    refine: int | None = None
    refine_levels: tuple[float, ...] = InferenceSettings.refine_levels
    refine_lr: float = InferenceSettings.refine_lr
    refine_similarity: str = InferenceSettings.refine_similarity
    refine_diffeomorphic: bool = InferenceSettings.refine_diffeomorphic
    refine_smooth_weight: float | None = InferenceSettings.refine_smooth_weight
    refine_gradient_sigma: float = InferenceSettings.refine_gradient_sigma
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
        if self.refine_full_resolution is None:
            # the preset's, where the other options leave room for it (a refinement whose finest level is
            # already at full resolution, or on the downsampled images, gets none rather than an error)
            fits = (int(self.refine) and self.refine_similarity == "full"
                    and max((float(x) for x in self.refine_levels), default=1.0) < 1.0)
            self.refine_full_resolution = self.preset_full_resolution.get(self.preset, 0) if fits else 0
        settings = self.inference_settings  # checks the settings, once
        self.refine = settings.refine
        self.refine_full_resolution = settings.refine_full_resolution
        self.refine_levels = settings.refine_levels
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

    @property
    def inference_settings(self) -> InferenceSettings:
        """The preset's cascade settings and this method's options, as :func:`register_with_model` takes them."""
        return InferenceSettings(
            mode=self.presets[self.preset].get("mode", "fast"), prealign=self.prealign, refine=self.refine,
            refine_levels=self.refine_levels, refine_lr=self.refine_lr, refine_similarity=self.refine_similarity,
            refine_diffeomorphic=self.refine_diffeomorphic, refine_smooth_weight=self.refine_smooth_weight,
            refine_gradient_sigma=self.refine_gradient_sigma, refine_full_resolution=self.refine_full_resolution)

    def _register(self, fixed, moving, fixed_mask) -> Transform:
        configure_threads(self.threads)
        seed_everything(self.seed)
        grid = Grid.of(fixed)
        if not Grid.of(moving).same_as(grid, atol=1e-3):
            moving = resample_to(moving, grid, interpolation="linear")
        dev = resolve_device(self.device)
        transform, self.device_used = register_with_model(self._model(dev), fixed, moving, fixed_mask,
                                                           settings=self.inference_settings, device=dev)
        return transform


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
