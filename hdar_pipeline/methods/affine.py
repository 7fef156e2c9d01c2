"""Affine registration with antspyx: a rigid stage, then an affine stage (Mattes MI, multi-resolution)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ants

from ..transforms import Transform
from ._ants import ants_workdir, as_ants_float, as_ants_mask, transform_from_ants
from .base import MethodBase


@dataclass
class AffineMethod(MethodBase):
    """Rigid then affine registration (antsRegistration through antspyx).

    Both stages use Mattes mutual information (32 bins, 20 % regular sampling), shrink factors
    6x4x2x1 and smoothing 3x2x1x0 voxels, starting from an alignment of the centres of mass.

    Parameters
    ----------
    rigid_iterations, affine_iterations : tuple of int
        Iterations per resolution level (coarse to fine).
    seed : int, optional
        ``ANTS_RANDOM_SEED`` for the metric's random sampling.
    threads : int, optional
        ITK threads.
    """

    name: ClassVar[str] = "affine"
    rigid_iterations: tuple[int, ...] = (2100, 1200, 1200, 10)
    affine_iterations: tuple[int, ...] = (2100, 1200, 1200, 10)
    shrink_factors: tuple[int, ...] = (6, 4, 2, 1)
    smoothing_sigmas_vox: tuple[float, ...] = (3, 2, 1, 0)
    sampling_rate: float = 0.2
    seed: int | None = None
    threads: int | None = None

    def _register(self, fixed, moving, fixed_mask) -> Transform:
        with ants_workdir(self.threads, self.seed) as prefix:
            f, m, mask = as_ants_float(fixed), as_ants_float(moving), as_ants_mask(fixed_mask)
            common = dict(aff_metric="mattes", aff_sampling=32, aff_random_sampling_rate=self.sampling_rate,
                          aff_shrink_factors=self.shrink_factors, aff_smoothing_sigmas=self.smoothing_sigmas_vox,
                          mask=mask)
            rigid = ants.registration(f, m, type_of_transform="Rigid", outprefix=prefix + "rigid_",
                                      aff_iterations=self.rigid_iterations, **common)
            # antsRegistration collapses the initial (rigid) transform into the affine output (-z 1).
            affine = ants.registration(f, m, type_of_transform="Affine", outprefix=prefix + "affine_",
                                       initial_transform=rigid["fwdtransforms"][0],
                                       aff_iterations=self.affine_iterations, **common)
            return transform_from_ants(affine["fwdtransforms"], fixed)
