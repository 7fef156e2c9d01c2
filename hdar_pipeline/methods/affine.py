"""Affine registration with antspyx: a rigid stage, then an affine stage (Mattes MI, multi-resolution)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.methods._ants import ants_workdir, as_ants_float, as_ants_mask, transform_from_ants
from hdar_pipeline.methods.base import MethodBase
from hdar_pipeline.methods.registry import BenchmarkVariant, MethodSpec
from hdar_pipeline.methods.text import ALWAYS_SKIPPED, AVANTS2011, SentenceContext, other_parameters, value_text


#: The fewest voxels along any axis a resolution level may keep. Below it the level has too few samples for the
#: 32-bin Mattes histogram: a 32^3 phantom at 3 mm shrunk 6x (5^3 voxels, 25 samples) failed for one seed in four
#: (mean Dice 0.52-0.67 instead of 0.86-0.93) and, with its schedule capped at 2x, for none of 12 seeds.
MIN_LEVEL_VOXELS = 12


def level_schedule(shrink_factors: tuple[int, ...], smoothing_sigmas_vox: tuple[float, ...],
                   shapes: list[tuple[int, ...]], min_voxels: int = MIN_LEVEL_VOXELS
                   ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The multi-resolution schedule for images of these shapes.

    Each shrink factor is capped at ``min(shape) // min_voxels`` (at least 1) over every shape, and its
    smoothing sigma scaled by the same ratio, so a level keeps its smoothing relative to its voxels.

    Parameters
    ----------
    shrink_factors, smoothing_sigmas_vox : tuple
        The schedule for a large image, coarse to fine (sigmas in voxels of the full-resolution image).
    shapes : list of tuple of int
        The voxel shapes of the images registered (fixed and moving).
    min_voxels : int
        The fewest voxels along any axis at any level.

    Returns
    -------
    tuple
        ``(shrink_factors, smoothing_sigmas_vox)``, as many levels as given; unchanged on a large grid.
    """
    if len(shrink_factors) != len(smoothing_sigmas_vox):
        raise ValueError("shrink_factors and smoothing_sigmas_vox need one value per level")
    cap = max(1, min(min(int(n) for n in shape[:3]) for shape in shapes) // int(min_voxels))
    shrinks = tuple(min(int(f), cap) for f in shrink_factors)
    sigmas = tuple(float(s) * new / int(f) for s, f, new in zip(smoothing_sigmas_vox, shrink_factors, shrinks))
    return shrinks, sigmas


@dataclass
class AffineMethod(MethodBase):
    """Rigid then affine registration (antsRegistration through antspyx).

    Both stages use Mattes mutual information (32 bins, 20 % regular sampling), shrink factors
    6x4x2x1 and smoothing 3x2x1x0 voxels, starting from an alignment of the centres of mass. On a small
    grid the shrink factors are capped so that every level keeps at least :data:`MIN_LEVEL_VOXELS` voxels
    along each axis (:func:`level_schedule`); the schedule used is in ``transform.metadata["schedule"]``.

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
        import ants  # antspyx takes seconds to import: only when a registration runs

        shrinks, sigmas = level_schedule(self.shrink_factors, self.smoothing_sigmas_vox,
                                         [fixed.shape, moving.shape])
        with ants_workdir(self.threads, self.seed) as prefix:
            f, m, mask = as_ants_float(fixed), as_ants_float(moving), as_ants_mask(fixed_mask)
            common = dict(aff_metric="mattes", aff_sampling=32, aff_random_sampling_rate=self.sampling_rate,
                          aff_shrink_factors=shrinks, aff_smoothing_sigmas=sigmas, mask=mask)
            rigid = ants.registration(f, m, type_of_transform="Rigid", outprefix=prefix + "rigid_",
                                      aff_iterations=self.rigid_iterations, **common)
            # antsRegistration collapses the initial (rigid) transform into the affine output (-z 1).
            affine = ants.registration(f, m, type_of_transform="Affine", outprefix=prefix + "affine_",
                                       initial_transform=rigid["fwdtransforms"][0],
                                       aff_iterations=self.affine_iterations, **common)
            transform = transform_from_ants(affine["fwdtransforms"], fixed)
        transform.metadata["schedule"] = {"shrink_factors": list(shrinks), "smoothing_sigmas_vox": list(sigmas)}
        return transform


def describe(params: Mapping[str, Any], preset: str, context: SentenceContext) -> str:
    """The methods paragraph's sentence on the affine registration (see :class:`~.registry.MethodSpec`)."""
    cite = context.cite
    used = set(ALWAYS_SKIPPED)
    details = []
    for key, what in (("rigid_iterations", "rigid iterations"), ("affine_iterations", "affine iterations"),
                      ("shrink_factors", "shrink factors"), ("smoothing_sigmas_vox", "smoothing sigmas (voxels)")):
        if params.get(key) is not None:
            details.append(f"{what} {value_text(params[key])}")
            used.add(key)
    if params.get("sampling_rate") is not None:
        details.append(f"{100 * float(params['sampling_rate']):g} % of the voxels sampled for the metric")
        used.add("sampling_rate")
    text = ("Each image was aligned to the atlas with a rigid and then an affine registration, both driven by "
            f"Mattes mutual information, with `antsRegistration` through ANTsPy{context.version('antspyx')}")
    text += (f" ({'; '.join(details)}; {cite.inner('avants2011')})." if details else f" {cite('avants2011')}.")
    if preset:
        text += f" Preset: `{preset}`."
    return text + other_parameters(params, used)


SPEC = MethodSpec(
    name="affine", title="Affine (ANTs)", method_class=AffineMethod, describe=describe, references=(AVANTS2011,),
    inverse="exact",
    variants=(BenchmarkVariant("affine", None, {}, "antspyx rigid + affine only", order=10),))
