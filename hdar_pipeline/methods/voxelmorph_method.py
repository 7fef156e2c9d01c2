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
from typing import Any, ClassVar

from hdar_pipeline.methods.hdar_method import ACCURATE_FULL_RESOLUTION_STEPS, ACCURATE_STEPS, HDARMethod

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
