"""Registration methods behind one protocol, and the two-stage (affine, then deformable) runner."""

from __future__ import annotations

from typing import Any

import nibabel as nib

from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.methods.base import MethodBase, RegistrationMethod
from hdar_pipeline.methods.registry import DEFAULT_METHOD, method_names, method_spec, specs_by_name

def get_method(name: str, *, preset: str | None = None, seed: int | None = None, threads: int | None = None,
               device: str | None = None, options: dict[str, Any] | None = None) -> RegistrationMethod:
    """Build a registration method by name (from its :class:`~hdar_pipeline.methods.registry.MethodSpec`).

    Parameters
    ----------
    name : str
        A registered method (:func:`~.registry.method_names`: ``"affine"``, ``"syn"``, ``"demons"``, ``"lccdemons"``,
        ``"fireants"``, ``"hdar"``, ``"voxelmorph"``).
    preset : str, optional
        One of the method's presets (``hdar register --help``), ``None`` for its default; a method without presets
        takes ``None`` or ``"default"``.
    seed : int, optional
        Seeds the method (``ANTS_RANDOM_SEED`` for the ANTs methods; Demons is deterministic).
    threads : int, optional
        Worker threads (ITK, torch); ``None`` keeps the library defaults.
    device : str, optional
        ``"auto"`` (default), ``"cpu"`` or ``"cuda[:N]"``; used by the methods that run on one (PyTorch:
        ``hdar``, ``voxelmorph``, ``lccdemons``, ``fireants``).
    options : dict, optional
        Method-specific settings passed to the method's constructor, e.g. for ``hdar`` (and ``voxelmorph``)
        ``{"weights": "model.pt", "refine": 50}``; ``None`` values are ignored. An option the method does not
        have is an error.

    Returns
    -------
    RegistrationMethod

    Raises
    ------
    ValueError
        Unknown method, preset or option.
    NotImplementedError
        ``"fireants"`` while FireANTs is not installed (:class:`~hdar_pipeline.methods.fireants.FireANTsNotInstalled`,
        also an ``ImportError``).
    """
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    return method_spec(name).build(preset=preset, seed=seed, threads=threads, device=device, options=opts)


#: The affine stages :func:`register_pair` and the preprocessing can run.
AFFINE_METHODS = ("fast", "ants")


def affine_stage(name: str = "fast", *, seed: int | None = None, threads: int | None = None,
                 device: str = "cpu") -> MethodBase:
    """The affine registration called ``name``: ``"fast"`` (:class:`~.fast_affine.FastAffineMethod`: as accurate
    as the ANTs affine or more on LPBA40 pairs in scanner poses and on the IXI heads, in a sixth of its time at
    1 mm: benchmarks/affine_accuracy.py) or ``"ants"`` (:class:`~.affine.AffineMethod`: rigid then affine, Mattes MI)."""
    if name == "fast":
        from hdar_pipeline.methods.fast_affine import FastAffineMethod

        return FastAffineMethod(seed=seed, threads=threads, device=device)
    if name == "ants":
        from hdar_pipeline.methods.affine import AffineMethod  # imports antspyx (seconds): only when it runs

        return AffineMethod(seed=seed, threads=threads)
    raise ValueError(f"unknown affine method {name!r}; choose from {', '.join(AFFINE_METHODS)}")


def register_pair(
    fixed: nib.spatialimages.SpatialImage,
    moving: nib.spatialimages.SpatialImage,
    method: RegistrationMethod,
    *,
    affine: bool = True,
    fixed_mask: nib.spatialimages.SpatialImage | None = None,
    seed: int | None = None,
    threads: int | None = None,
    affine_method: str = "fast",
) -> tuple[Transform, dict[str, Any]]:
    """Register ``moving`` to ``fixed``: optional affine stage, then ``method`` on the aligned pair.

    The affine stage is ``affine_method``: ``"fast"`` (default, :class:`~.fast_affine.FastAffineMethod`, PyTorch,
    on the deformable method's device) or ``"ants"`` (:class:`~.affine.AffineMethod`, antsRegistration).

    The deformable method sees the moving image resampled onto the fixed grid by the affine stage;
    the returned transform is ``affine_stage ∘ deformable`` (exact: an affine after a field on the
    fixed grid), so the moving image is interpolated once when the result is applied.

    Returns
    -------
    transform : Transform
        Fixed-to-moving mapping on the fixed grid.
    info : dict
        ``method``, ``preset``, ``parameters``, ``runtime_s`` and ``peak_memory_mb`` (totals over the
        stages), ``stages`` (one dict per stage), ``device``.
    """
    stages: list[dict[str, Any]] = []
    if method.name == "affine" or not affine:
        if method.name != "affine" and not _same_grid(fixed, moving):
            raise ValueError("with no affine stage the moving image must already lie on the fixed grid "
                             "(resample it, or keep the affine stage)")
        transform = method.register(fixed, moving, fixed_mask=fixed_mask)
        stages.append(_stage(method))
    else:
        aff_method = affine_stage(affine_method, seed=seed, threads=threads,
                                  device=getattr(method, "device", None) or "cpu")
        aff = aff_method.register(fixed, moving, fixed_mask=fixed_mask)
        stages.append(_stage(aff_method))
        aligned = aff.apply(moving, interpolation="linear")
        deformable = method.register(fixed, aligned, fixed_mask=fixed_mask)
        stages.append(_stage(method))
        transform = aff.compose(deformable)
        # the field is unchanged by an affine after it; the weights are the deformable stage's
        for key in ("inverse_field", "weights_sha256"):
            if key in deformable.metadata:
                transform.metadata[key] = deformable.metadata[key]
    info = {
        "method": method.name,
        "preset": getattr(method, "preset", None),
        "parameters": method.parameters,
        "runtime_s": float(sum(s["runtime_s"] for s in stages)),
        "peak_memory_mb": float(max(s["peak_memory_mb"] for s in stages)),
        "stages": stages,
        "device": getattr(method, "device_used", "cpu"),
    }
    for key in ("weights_sha256",):
        if key in transform.metadata:
            info[key] = transform.metadata[key]
    transform.metadata.update(info)
    return transform, info


def model_identity(method: str) -> str:
    """What identifies the trained model behind ``method`` with its default options: for ``"hdar"`` the
    shipped default weights' ``"<name>@sha256:<hex>"`` (for ``"voxelmorph"`` the shipped ``voxelmorph`` weights';
    ``""`` when none ship), ``""`` for the classical methods. Workflows pass it to registration tasks so that
    cached results follow the weights."""
    spec = specs_by_name().get(method)
    if spec is None or not spec.learned:
        return ""
    from hdar_pipeline.hdar.weights import weights_identity

    return weights_identity(spec.default_weights)


def _stage(method: MethodBase) -> dict[str, Any]:
    run = method.last_run
    return {"method": method.name, "parameters": method.parameters, "runtime_s": run.runtime_s,
            "peak_memory_mb": run.peak_memory_mb}


def _same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> bool:
    from hdar_pipeline.core.images import Grid

    return Grid.of(a).same_as(Grid.of(b), atol=1e-3)


__all__ = ["AFFINE_METHODS", "DEFAULT_METHOD", "MethodBase", "RegistrationMethod", "affine_stage", "get_method",
           "method_names", "model_identity", "register_pair"]
