"""ANTs SyN deformable registration (antspyx), in two presets.

``fast``
    antspyx's defaults for its SyN stage: Mattes MI (32 bins), 40x20x0 iterations at shrink 4x2x1,
    smoothing 2x1x0 voxels, ``SyN[0.2, 3, 0]``.
``quality``
    The deformable stage of ``antsRegistrationSyN.sh`` (``-t s``): CC radius 4, 100x70x50x20
    iterations, shrink 8x4x2x1, smoothing 3x2x1x0 voxels, ``SyN[0.1, 3, 0]``. (antspyx passes a
    convergence window of ``[.., 1e-7, 8]`` where the script uses ``[.., 1e-6, 10]``.)

The SyN stage runs alone (``SyNOnly``); the affine part, when wanted, is the separate
:class:`~hdar_pipeline.methods.affine.AffineMethod` stage, composed by
:func:`hdar_pipeline.methods.register_pair`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ants
import numpy as np

from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.methods._ants import ants_workdir, as_ants_float, as_ants_mask, transform_from_ants
from hdar_pipeline.methods.base import MethodBase

SYN_PRESETS: dict[str, dict] = {
    "fast": dict(syn_metric="mattes", syn_sampling=32, reg_iterations=(40, 20, 0), grad_step=0.2,
                 flow_sigma=3.0, total_sigma=0.0),
    "quality": dict(syn_metric="CC", syn_sampling=4, reg_iterations=(100, 70, 50, 20), grad_step=0.1,
                    flow_sigma=3.0, total_sigma=0.0),
}


@dataclass
class SyNMethod(MethodBase):
    """ANTs symmetric normalisation (deformable stage only; see the module docstring for presets).

    Parameters
    ----------
    preset : {"fast", "quality"}
    seed : int, optional
        ``ANTS_RANDOM_SEED``.
    threads : int, optional
        ITK threads.
    """

    name: ClassVar[str] = "syn"
    preset: str = "fast"
    seed: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in SYN_PRESETS:
            raise ValueError(f"unknown SyN preset {self.preset!r}; choose from {sorted(SYN_PRESETS)}")

    @property
    def parameters(self) -> dict:
        return {**super().parameters, **SYN_PRESETS[self.preset]}

    def _register(self, fixed, moving, fixed_mask) -> Transform:
        with ants_workdir(self.threads, self.seed) as prefix:
            out = ants.registration(as_ants_float(fixed), as_ants_float(moving), type_of_transform="SyNOnly",
                                    outprefix=prefix, mask=as_ants_mask(fixed_mask),
                                    **SYN_PRESETS[self.preset])
            # fwdtransforms: [warp, identity affine] (SyNOnly starts from the identity); invtransforms end
            # with SyN's own inverse warp on the same grid, kept for hdar_pipeline.core.inverse
            transform = transform_from_ants(out["fwdtransforms"], fixed)
            inverse = [p for p in out["invtransforms"] if str(p).endswith("InverseWarp.nii.gz")]
            if inverse and transform.field is not None:
                field = Transform.read(inverse[0]).field
                if field is not None and field.shape == transform.field.shape:
                    transform.metadata["inverse_field"] = field
        if transform.affine is not None and np.allclose(transform.affine, np.eye(4), atol=1e-9):
            transform.affine = None  # field only, like every deformable stage
        return transform
