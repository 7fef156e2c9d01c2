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
from typing import Any, ClassVar, Mapping

import numpy as np

from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.methods._ants import ants_workdir, as_ants_float, as_ants_mask, transform_from_ants
from hdar_pipeline.methods.base import MethodBase
from hdar_pipeline.methods.registry import BenchmarkVariant, MethodSpec
from hdar_pipeline.methods.text import (ALWAYS_SKIPPED, AVANTS2011, Reference, SentenceContext, join,
                                        other_parameters, pick, value_text)

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
        import ants  # antspyx takes seconds to import: only when a registration runs

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


AVANTS2008 = Reference(
    "avants2008",
    "Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image registration with "
    "cross-correlation: evaluating automated labeling of elderly and neurodegenerative brain. "
    "*Medical Image Analysis*. 2008;12(1):26-41. doi:10.1016/j.media.2007.06.004",
    "Avants et al. 2008", "article", {
        "author": "Avants, B. B. and Epstein, C. L. and Grossman, M. and Gee, J. C.",
        "title": "Symmetric diffeomorphic image registration with cross-correlation: evaluating automated labeling "
                 "of elderly and neurodegenerative brain",
        "journal": "Medical Image Analysis", "year": "2008", "volume": "12", "number": "1", "pages": "26--41",
        "doi": "10.1016/j.media.2007.06.004"})


def describe(params: Mapping[str, Any], preset: str, context: SentenceContext) -> str:
    """The methods paragraph's sentence on SyN (see :class:`~.registry.MethodSpec`)."""
    cite = context.cite
    used = set(ALWAYS_SKIPPED)
    text = ("Deformable registration with symmetric image normalisation (SyN; " + cite.inner("avants2008")
            + f") used the SyN stage of `antsRegistration` through ANTsPy{context.version('antspyx')} "
            + cite("avants2011"))
    details = []
    mk, metric = pick(params, "syn_metric", "metric")
    sk, sampling = pick(params, "syn_sampling", "sampling", "radius")
    if metric is not None:
        used.add(mk)
        m = str(metric).lower()
        if m in ("cc", "ants_cc", "neighborhood_cc"):
            name = "local (neighbourhood) cross-correlation"
            if sampling is not None:
                name += f" with a radius of {value_text(sampling)} voxels"
                used.add(sk)
        elif m in ("mattes", "mi"):
            name = "Mattes mutual information"
            if sampling is not None:
                name += f" with {value_text(sampling)} histogram bins"
                used.add(sk)
        else:
            name = f"the `{metric}` metric"
            if sampling is not None:
                name += f" (sampling parameter {value_text(sampling)})"
                used.add(sk)
        details.append(f"similarity metric {name}")
    elif sampling is not None:
        details.append(f"metric sampling parameter {value_text(sampling)}")
        used.add(sk)
    ik, iterations = pick(params, "reg_iterations", "iterations")
    if iterations is not None:
        used.add(ik)
        details.append(f"{value_text(iterations)} iterations (coarse to fine)")
    if params.get("grad_step") is not None:
        used.add("grad_step")
        details.append(f"gradient step {value_text(params['grad_step'])}")
    if params.get("flow_sigma") is not None:
        used.add("flow_sigma")
        details.append(f"update-field smoothing (flow sigma) {value_text(params['flow_sigma'])}")
    if params.get("total_sigma") is not None:
        used.add("total_sigma")
        details.append(f"total-field smoothing (total sigma) {value_text(params['total_sigma'])}")
    text += f", with {join(details)}." if details else "."
    if preset:
        text += f" Preset: `{preset}`."
    return text + other_parameters(params, used)


SPEC = MethodSpec(
    name="syn", title="ANTs SyN", method_class=SyNMethod, describe=describe, references=(AVANTS2008, AVANTS2011),
    presets={"fast": "antspyx's SyN defaults, Mattes MI",
             "quality": "antsRegistrationSyN.sh's deformable stage, CC"},
    default_preset="fast", inverse="SyN's own inverse",
    variants=(BenchmarkVariant("syn-fast", "fast", {}, "ANTs SyN, antspyx defaults", order=50),
              BenchmarkVariant("syn-quality", "quality", {}, "ANTs SyN, antsRegistrationSyN.sh quality", order=100)))
