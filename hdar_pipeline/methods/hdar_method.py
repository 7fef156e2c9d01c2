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
from typing import Any, ClassVar

from hdar_pipeline.core.images import Grid, resample_to
from hdar_pipeline.core.runtime import configure_threads, resolve_device, seed_everything
from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.hdar.inference import InferenceSettings, register_with_model
from hdar_pipeline.methods.base import MethodBase

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

