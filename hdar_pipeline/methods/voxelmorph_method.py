"""VoxelMorph (Balakrishnan et al., IEEE TMI 2019; diffeomorphic variant: Dalca et al., MICCAI 2018 / MedIA 2019)
as a registration method.

The network (:mod:`hdar_pipeline.hdar.voxelmorph_net`) is trained with ``hdar train --network voxelmorph`` on the same
data, augmentation, schedule and resolution as HDAR, and runs through HDAR's inference path
(:func:`~hdar_pipeline.hdar.inference.register_with_model`): the same canonical frame, the same affine pre-alignment
and, with ``refined``, the same instance optimisation. Only the network differs, so the two are compared like for
like.

Presets
-------
``fast``
    The affine pre-alignment, then the network alone: VoxelMorph as published.
``refined``
    ``fast`` followed by the instance optimisation of HDAR's ``accurate`` preset: 30 steps per refinement level
    (:data:`~hdar_pipeline.methods.hdar_method.ACCURATE_STEPS`) and 2 on the full-resolution grid
    (:data:`~hdar_pipeline.methods.hdar_method.ACCURATE_FULL_RESOLUTION_STEPS`).

:data:`DEFAULT_PRESET` is ``refined``, the better of the two measured: on the 20 held-out LPBA40 pairs with the shipped
weights mean Dice 0.730 against 0.661 for ``fast``, no folded voxel for either, in 0.19 of SyN fast's time
(``benchmarks/results/lpba40-v6``).

Weights are loaded by the name ``voxelmorph`` (``hdar_pipeline/hdar/weights/voxelmorph.pt`` and its model card) or
from an exported ``.pt``; weights that hold an HDAR cascade are refused, and HDAR refuses VoxelMorph weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from hdar_pipeline.methods.hdar_method import ACCURATE_FULL_RESOLUTION_STEPS, ACCURATE_STEPS, HDARMethod
from hdar_pipeline.methods.registry import BenchmarkVariant, MethodSpec
from hdar_pipeline.methods.text import (ALWAYS_SKIPPED, Reference, SentenceContext, devices_text, other_parameters,
                                        value_text)

#: Preset name -> cascade settings (none: the network has one level and no patches).
VOXELMORPH_PRESETS: dict[str, dict[str, Any]] = {"fast": {}, "refined": {}}

#: The preset used when none is named (see the module docstring).
DEFAULT_PRESET = "refined"

#: The shipped weights' name.
WEIGHTS_NAME = "voxelmorph"


def missing_weights(exc: Exception, weights: Any) -> Exception:
    """The error for missing VoxelMorph weights: for the shipped name, ``exc``'s message (a
    :class:`~hdar_pipeline.hdar.weights.NoWeightsError`) followed by how to train them; else ``exc`` itself."""
    from hdar_pipeline.hdar.weights import NoWeightsError

    if str(weights) != WEIGHTS_NAME or not isinstance(exc, NoWeightsError):
        return exc
    return NoWeightsError(f"{exc}. VoxelMorph weights are trained with `hdar train ... --network voxelmorph --export "
                          f"{WEIGHTS_NAME}` (hdar_pipeline/hdar/weights/README.md) and used with --weights "
                          "RUN/voxelmorph.pt until they ship")


@dataclass
class VoxelMorphMethod(HDARMethod):
    """VoxelMorph with verified weights, through HDAR's inference path.

    Parameters
    ----------
    preset : {"refined", "fast"}
        Default :data:`DEFAULT_PRESET`.
    weights : str or Path
        A shipped name (default ``"voxelmorph"``) or the path of an exported ``.pt`` (model card beside it) that
        holds a VoxelMorph network.

    The other parameters are :class:`~hdar_pipeline.methods.hdar_method.HDARMethod`'s (pre-alignment, refinement, device,
    seed, threads), with the same meaning and defaults; ``refine`` and ``refine_full_resolution`` default to the
    preset's.

    Raises
    ------
    hdar_pipeline.hdar.weights.NoWeightsError
        At construction, when the weights do not exist.
    hdar_pipeline.hdar.weights.WeightsError
        At construction, when they hold an HDAR cascade.
    """

    name: ClassVar[str] = "voxelmorph"
    title: ClassVar[str] = "VoxelMorph"
    network: ClassVar[str] = "voxelmorph"
    presets: ClassVar[dict[str, dict[str, Any]]] = VOXELMORPH_PRESETS
    preset_refine: ClassVar[dict[str, int]] = {"refined": ACCURATE_STEPS}
    preset_full_resolution: ClassVar[dict[str, int]] = {"refined": ACCURATE_FULL_RESOLUTION_STEPS}
    preset: str = DEFAULT_PRESET
    weights: str | Path = WEIGHTS_NAME

    @property
    def parameters(self) -> dict[str, Any]:
        # whether the network is the diffeomorphic variant (from the model card), for the methods text
        return {**super().parameters, "diffeomorphic": self._diffeomorphic}

    def _check_weights(self) -> dict[str, Any]:
        from hdar_pipeline.hdar.weights import NoWeightsError

        try:
            card = super()._check_weights()
        except NoWeightsError as exc:
            raise missing_weights(exc, self.weights) from None
        self._diffeomorphic = bool(card.get("config", {}).get("cascade", {}).get("diffeomorphic", False))
        return card


# ----------------------------------------------------------------------------- the method's registry entry

BALAKRISHNAN2019 = Reference(
    "balakrishnan2019",
    "Balakrishnan G, Zhao A, Sabuncu MR, Guttag J, Dalca AV. VoxelMorph: a learning framework "
    "for deformable medical image registration. *IEEE Transactions on Medical Imaging*. "
    "2019;38(8):1788-1800. doi:10.1109/TMI.2019.2897538",
    "Balakrishnan et al. 2019", "article", {
        "author": "Balakrishnan, G. and Zhao, A. and Sabuncu, M. R. and Guttag, J. and Dalca, A. V.",
        "title": "{VoxelMorph}: a learning framework for deformable medical image registration",
        "journal": "IEEE Transactions on Medical Imaging", "year": "2019", "volume": "38", "number": "8",
        "pages": "1788--1800", "doi": "10.1109/TMI.2019.2897538"})

DALCA2019 = Reference(
    "dalca2019",
    "Dalca AV, Balakrishnan G, Guttag J, Sabuncu MR. Unsupervised learning of probabilistic "
    "diffeomorphic registration for images and surfaces. *Medical Image Analysis*. 2019;57:226-236. "
    "doi:10.1016/j.media.2019.07.006",
    "Dalca et al. 2019", "article", {
        "author": "Dalca, A. V. and Balakrishnan, G. and Guttag, J. and Sabuncu, M. R.",
        "title": "Unsupervised learning of probabilistic diffeomorphic registration for images and surfaces",
        "journal": "Medical Image Analysis", "year": "2019", "volume": "57", "pages": "226--236",
        "doi": "10.1016/j.media.2019.07.006"})


def describe(params: Mapping[str, Any], preset: str, context: SentenceContext) -> str:
    """The VoxelMorph sentence: the network (its diffeomorphic variant), how it was trained (HDAR's pipeline), the
    pre-alignment and the refinement it ran with, and its weights (name and SHA-256 from ``params``)."""
    cite = context.cite
    used = set(ALWAYS_SKIPPED) | {"weights", "weights_sha256", "device", "threads", "diffeomorphic"}
    diffeomorphic = params.get("diffeomorphic", True)
    text = ("Deformable registration with VoxelMorph " + cite("balakrishnan2019")
            + (", in its diffeomorphic variant " + cite("dalca2019") if diffeomorphic else "")
            + f", used hdar-pipeline's PyTorch{context.version('torch')} implementation of the network (a U-Net "
            "predicting a "
            + ("stationary velocity field, integrated by scaling and squaring" if diffeomorphic
               else "displacement field")
            + "), trained with the package's training pipeline on local normalised cross-correlation, diffusion "
            "regularisation and an auxiliary Dice loss (the settings are in the weights' model card), and HDAR's "
            "inference around it.")
    if params.get("prealign"):
        used.add("prealign")
        text += (" Before the network, a 12-parameter affine map was fitted on local normalised cross-correlation "
                 "at a quarter of the image resolution (Adam).")
    refine = params.get("refine")
    if refine is not None:
        used |= {"refine", "refine_levels", "refine_lr", "refine_similarity", "refine_full_resolution",
                 "refine_diffeomorphic", "refine_gradient_sigma", "refine_smooth_weight"}
        if int(refine) > 0:
            levels = params.get("refine_levels")
            full_res = params.get("refine_full_resolution")
            text += (f" The network's field was refined by {int(refine)} steps per level of instance optimisation "
                     "(Adam on local normalised cross-correlation plus an anti-folding smoothness term"
                     + (", on each of the resolutions " + ", ".join(value_text(x) for x in levels)
                        + " times the image size" if levels else "")
                     + (f", then {int(full_res)} step{'s' if int(full_res) != 1 else ''} at full resolution"
                        if full_res else "")
                     + (", each correction integrated from a stationary velocity field and composed with the field"
                        if params.get("refine_diffeomorphic") else "") + "), as in HDAR.")
        else:
            text += " No instance-optimisation refinement was applied."
    name, sha = params.get("weights"), params.get("weights_sha256")
    if name is not None or sha is not None:
        text += (" Network weights: " + (f"`{name}`" if name is not None else "")
                 + (f" (SHA-256 `{sha}`)" if sha is not None else "") + ".")
    text += devices_text(params.get("device"), context.devices)
    if preset:
        text += f" Preset: `{preset}`."
    return text + other_parameters(params, used)


SPEC = MethodSpec(
    name="voxelmorph", title="VoxelMorph", method_class=VoxelMorphMethod, describe=describe,
    references=(BALAKRISHNAN2019, DALCA2019),
    presets={"refined": "the network, then HDAR's accurate refinement: 30 steps per level and 2 at full resolution",
             "fast": "the network alone, after the same affine pre-alignment"},
    default_preset=DEFAULT_PRESET,
    presets_summary="default refined: the network then HDAR's accurate refinement; fast: the network alone",
    default_weights=WEIGHTS_NAME, uses_device=True,
    variants=(BenchmarkVariant("voxelmorph", "fast", {}, "VoxelMorph, the network alone (after the affine "
                               "pre-alignment HDAR uses)", order=70),
              BenchmarkVariant("voxelmorph-refined", "refined", {},
                               "VoxelMorph + HDAR accurate's refinement (30 steps per level, 2 at full resolution)",
                               order=71)))
