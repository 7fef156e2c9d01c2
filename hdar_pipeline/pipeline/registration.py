"""Register one moving image to a fixed image from files and write everything a user re-applies.

This is the library behind ``hdar register`` and the registration task of the workflows.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hdar_pipeline.core.input_guard import InputGuard
from hdar_pipeline.core.images import check_labels_match, load_image, normalize_intensity, save_image
from hdar_pipeline.core.provenance import json_default, library_versions
from hdar_pipeline.methods.registry import DEFAULT_METHOD

#: What :func:`register_files` may write in its output folder (nothing else is ever touched there).
REGISTER_OUTPUTS = ("warped.nii.gz", "warped_labels.nii.gz", "transform_warp.nii.gz", "transform_affine.mat",
                    "transform.h5", "registration.json", "jacobian.nii.gz", "inverse.h5", "fixed_labels_native.nii.gz")

PathLike = str | os.PathLike


def register_files(
    fixed: PathLike,
    moving: PathLike,
    out_dir: PathLike,
    *,
    method: str = DEFAULT_METHOD,
    preset: str | None = None,
    moving_labels: PathLike | None = None,
    fixed_mask: PathLike | None = None,
    affine: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    normalize: bool = True,
    method_options: dict | None = None,
    affine_method: str = "fast",
    then: PathLike | None = None,
    separate_files: bool = True,
    jacobian_map: bool = False,
    inverse_on: PathLike | None = None,
    fixed_labels: PathLike | None = None,
) -> dict:
    """Register ``moving`` onto ``fixed`` and write the results into ``out_dir``.

    Writes ``warped.nii.gz`` (moving image on the fixed grid, linear), ``warped_labels.nii.gz`` when
    ``moving_labels`` is given (nearest neighbour), the transform as ITK files
    (``transform_warp.nii.gz`` and/or ``transform_affine.mat``, plus the composite
    ``transform.h5``) and ``registration.json``.

    Parameters
    ----------
    fixed, moving : path-like
        3-D images (NIfTI, MGZ or Analyze). Intensities are rescaled to [0, 1] (robust percentiles)
        before registration unless ``normalize=False``; the warped image keeps the moving image's
        original intensities.
    method : str
        A registered method (:mod:`hdar_pipeline.methods.registry`: ``"affine"``, ``"syn"``, ``"demons"``,
        ``"lccdemons"``, ``"fireants"``, ``"hdar"``, ``"voxelmorph"``); default
        :data:`~hdar_pipeline.methods.registry.DEFAULT_METHOD` (``"hdar"``).
    preset : str, optional
        Method preset (``hdar register --help``; ``None``: the method's default).
    affine : bool
        Run the affine stage before a deformable method.
    affine_method : {"fast", "ants"}
        The affine stage (:func:`hdar_pipeline.methods.affine_stage`).
    seed, threads, device
        Reproducibility and resources (``device`` matters for ``hdar``, ``voxelmorph``, ``lccdemons`` and
        ``fireants``).
    method_options : dict, optional
        Method-specific settings (``hdar``, ``voxelmorph``: ``weights``, ``refine``), see
        :func:`hdar_pipeline.methods.get_method`.
    then : path-like, optional
        An affine ITK transform file that maps ``moving``'s points on to another image's, e.g. the preprocessing's
        atlas -> native T1w affine when ``moving`` is the preprocessed image. The written transform is then the
        registration followed by it (fixed points -> that image's points; composed exactly, no resampling), and
        ``moving_labels`` lie on that image's grid and are warped once, by the whole mapping. ``warped.nii.gz`` is
        ``moving`` warped by the registration alone; the Jacobian statistics are the whole mapping's (its affine
        scales the determinant, not the folding).
    separate_files : bool
        Also write the transform as separate files (``transform_warp.nii.gz``, ``transform_affine.mat``) beside
        the composite ``transform.h5``; without it the displacement field is written once, in the composite.
    jacobian_map : bool
        Also write ``jacobian.nii.gz``: the Jacobian determinant of the written transform at every fixed voxel
        (float32), the map the statistics in ``registration.json`` come from, so that an evaluation or a report
        does not compute it again.
    inverse_on : path-like, optional
        Also write ``inverse.h5``: the inverse of the written transform (points of this image -> fixed points,
        ITK composite on this image's grid; :func:`hdar_pipeline.core.inverse.invert`: the method's own inverse where
        it has one, SyN's, else a fixed-point inverse), with its inverse consistency over the fixed brain in
        ``registration.json`` (``inverse``). Typically the native T1w (``moving``, or the image ``then`` leads to).
    fixed_labels : path-like, optional
        With ``inverse_on``: labels on the fixed grid (the atlas labels) brought onto ``inverse_on``'s grid by the
        inverse (nearest neighbour), written as ``fixed_labels_native.nii.gz``.

    Returns
    -------
    dict
        The content of ``registration.json``. Its ``transforms`` list holds the transform files
        relative to ``out_dir`` in the order ``ants.apply_transforms(fixed, moving, transformlist)``
        expects; ``inputs`` holds the SHA-256 of every input, taken before anything was written.

    Raises
    ------
    InputError
        Before any work: an input is missing, ``out_dir`` is a file or cannot be written, or one of the
        outputs (:data:`REGISTER_OUTPUTS`) would overwrite an input (e.g. ``MOVING`` is ``out_dir/warped.nii.gz``).
    ImageError
        An input image is unusable (the message names the file).
    """
    from hdar_pipeline.methods import AFFINE_METHODS, get_method, register_pair

    if affine_method not in AFFINE_METHODS:
        raise ValueError(f"unknown affine method {affine_method!r}; choose from {', '.join(AFFINE_METHODS)}")

    t_start = time.perf_counter()
    importing = _import_hdar_in_background(method)
    guard = InputGuard({"FIXED": fixed, "MOVING": moving, "--moving-labels": moving_labels,
                        "--fixed-mask": fixed_mask, "then": then, "inverse_on": inverse_on,
                        "fixed_labels": fixed_labels})
    if fixed_labels is not None and inverse_on is None:
        raise ValueError("fixed_labels are brought onto inverse_on's grid: give inverse_on too")
    # Reading is mostly zlib inflating, one call per file without the GIL (images.load_image), so the inputs are
    # read side by side, beside the background import; an unusable file is reported in argument order.
    with ThreadPoolExecutor(max_workers=4) as pool:
        reads = [pool.submit(load_image, fixed), pool.submit(load_image, moving),
                 pool.submit(load_image, moving_labels, labels=True) if moving_labels is not None else None,
                 pool.submit(load_image, fixed_mask, labels=True) if fixed_mask is not None else None,
                 pool.submit(load_image, inverse_on) if inverse_on is not None else None,
                 pool.submit(load_image, fixed_labels, labels=True) if fixed_labels is not None else None]
        fixed_img, moving_img, labels_img, mask_img, native_img, fixed_labels_img = (
            r.result() if r is not None else None for r in reads)
    if labels_img is not None and then is None:  # with ``then`` they lie on the grid of the image it leads to
        check_labels_match(moving_img, labels_img, image_source=moving, labels_source=moving_labels)
    if mask_img is not None:
        check_labels_match(fixed_img, mask_img, image_source=fixed, labels_source=fixed_mask)
    if fixed_labels_img is not None:
        check_labels_match(fixed_img, fixed_labels_img, image_source=fixed, labels_source=fixed_labels)
    f_in = normalize_intensity(fixed_img) if normalize else fixed_img
    m_in = normalize_intensity(moving_img) if normalize else moving_img
    if importing is not None:
        importing.join()
    # HDAR's weights: verified against their card (and protected from the outputs) before anything is written
    guard.add_files({"--weights": _weights_files(method, method_options)})
    method_obj = get_method(method, preset=preset, seed=seed, threads=threads, device=device, options=method_options)
    out = guard.output_folder(out_dir, "-o/--output", writes=REGISTER_OUTPUTS)  # last check: creates the folder
    t_register = time.perf_counter()
    transform, info = register_pair(f_in, m_in, method_obj, affine=affine, fixed_mask=mask_img,
                                    seed=seed, threads=threads, affine_method=affine_method)

    t_write = time.perf_counter()
    written = transform if then is None else _then(transform, then, fixed_img)
    outputs = {"warped": "warped.nii.gz"}
    if labels_img is not None:
        outputs["warped_labels"] = "warped_labels.nii.gz"
    if jacobian_map:
        outputs["jacobian"] = "jacobian.nii.gz"
    if native_img is not None:
        outputs["inverse"] = "inverse.h5"
    if fixed_labels_img is not None:
        outputs["fixed_labels_native"] = "fixed_labels_native.nii.gz"
    brain, brain_source = brain_mask_of(fixed_img, mask_img)
    # The outputs are independent and their heavy parts (interpolation, zlib, HDF5) run in C without the
    # GIL, so they are written side by side: about half the wall time on two cores.
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = {}
        if native_img is not None:  # the longest job (the inverse, then its files): first, never queued
            jobs["inverse"] = pool.submit(_write_inverse, written, transform.metadata.get("inverse_field"),
                                          native_img, fixed_labels_img, brain, out)
        jobs.update({
            "warped": pool.submit(lambda: save_image(transform.apply(moving_img, interpolation="linear"),
                                                     out / "warped.nii.gz")),
            "composite": pool.submit(written.write_composite, out / "transform.h5"),
            "jacobian": pool.submit(_jacobian, written, brain, out / "jacobian.nii.gz" if jacobian_map else None),
        })
        if separate_files:
            jobs["files"] = pool.submit(written.write, out, prefix="transform_")
        if labels_img is not None:
            jobs["labels"] = pool.submit(lambda: save_image(written.apply(labels_img, interpolation="nearest"),
                                                            out / "warped_labels.nii.gz"))
        done = {k: j.result() for k, j in jobs.items()}
    composite, jac = done["composite"], done["jacobian"]
    files = done.get("files", [composite])
    record = {
        "method": method,
        "preset": info.get("preset", preset),
        "affine_stage": method == "affine" or bool(affine),
        "affine_method": ("ants" if method == "affine" else affine_method) if method == "affine" or affine else None,
        "runtime_s": info["runtime_s"],
        # wall time of this call's parts: reading, checking and normalising the inputs (and importing the method),
        # the registration (affine stage included), writing the outputs and the Jacobian statistics
        "wall_s": {"read": t_register - t_start, "register": t_write - t_register,
                   "write": time.perf_counter() - t_write},
        "peak_memory_mb": info["peak_memory_mb"],
        "stages": info.get("stages", []),
        "device": info.get("device", "cpu"),
        "seed": seed,
        "threads": threads,
        "parameters": info.get("parameters", {}),
        "inputs": {
            "fixed": str(Path(fixed).resolve()),
            "moving": str(Path(moving).resolve()),
            "moving_labels": str(Path(moving_labels).resolve()) if moving_labels else None,
            "fixed_mask": str(Path(fixed_mask).resolve()) if fixed_mask else None,
            "fixed_sha256": guard.sha256(fixed),
            "moving_sha256": guard.sha256(moving),
            "moving_labels_sha256": guard.sha256(moving_labels) if moving_labels else None,
            "fixed_mask_sha256": guard.sha256(fixed_mask) if fixed_mask else None,
            **({"then": str(Path(then).resolve()), "then_sha256": guard.sha256(then)} if then is not None else {}),
        },
        "outputs": outputs,
        "transforms": [p.name for p in files],
        "composite_transform": composite.name,
        "transform_convention": "ITK/ANTs: fixed-space points -> moving-space points (LPS, mm); "
                                "ants.apply_transforms(fixed, moving, transformlist=transforms)",
        "jacobian": {"folded_percent_mask": jac["folded_percent_mask"],
                     "folded_percent_grid": jac["folded_percent"],
                     "mask": brain_source, "mask_voxels": jac["mask_voxels"], "grid_voxels": jac["n_voxels"],
                     "log_jacobian_std_mask": jac["log_jacobian_std_mask"],
                     "min": jac["jacobian_min"], "max": jac["jacobian_max"]},
        "versions": library_versions(),
    }
    if "inverse" in done:
        record["inverse"] = {**done["inverse"], "grid_of": str(Path(inverse_on).resolve()),
                             "inverse_on_sha256": guard.sha256(inverse_on),
                             "convention": "native points -> fixed points (ITK/ANTs); ants.apply_transforms("
                                           "fixed=<inverse_on image>, moving=<fixed-space image>, "
                                           "transformlist=['inverse.h5'])"}
        if fixed_labels is not None:
            record["inputs"].update({"fixed_labels": str(Path(fixed_labels).resolve()),
                                     "fixed_labels_sha256": guard.sha256(fixed_labels)})
    if "weights_sha256" in info:
        record["weights_sha256"] = info["weights_sha256"]
    guard.verify()
    (out / "registration.json").write_text(json.dumps(record, indent=2, default=json_default))
    return record


def _jacobian(transform, brain: np.ndarray, path: Path | None) -> dict:
    """Jacobian statistics of ``transform`` over the fixed grid and ``brain``; the map saved to ``path`` too."""
    from hdar_pipeline.core.images import new_image
    from hdar_pipeline.evaluation.metrics import jacobian_statistics

    det = transform.jacobian_determinant()
    if path is not None:
        save_image(new_image(det, transform.grid), path)
    return jacobian_statistics(det, brain)


def _write_inverse(written, inverse_field, native_img, fixed_labels_img, brain: np.ndarray, out: Path) -> dict:
    """Invert ``written`` onto ``native_img``'s grid, write ``inverse.h5`` (and the fixed labels brought onto that
    grid); return how the inverse was obtained and its inverse consistency over ``brain`` (mm)."""
    from hdar_pipeline.core.images import Grid
    from hdar_pipeline.core.inverse import inverse_consistency, invert

    t0 = time.perf_counter()
    result = invert(written, Grid.of(native_img), inverse_field=inverse_field)
    t_invert = time.perf_counter() - t0
    with ThreadPoolExecutor(max_workers=1) as pool:  # measured beside the writing (the other outputs are done)
        consistency = pool.submit(inverse_consistency, written, result.transform, mask=brain)
        result.transform.write_composite(out / "inverse.h5")
        if fixed_labels_img is not None:
            save_image(result.transform.apply(fixed_labels_img, interpolation="nearest"),
                       out / "fixed_labels_native.nii.gz")
        consistency = consistency.result()
    return {"source": result.source, "iterations": result.iterations, "residual_mm": result.residual_mm,
            "consistency_mm": consistency, "invert_s": t_invert, "wall_s": time.perf_counter() - t0}


def _then(transform, then: PathLike, fixed_img):
    """``then`` (an affine ITK file) after ``transform``: exact, the affine is kept beside the field."""
    from hdar_pipeline.core.transforms import Transform

    after = Transform.read(then, grid=fixed_img)
    if after.field is not None:
        raise ValueError(f"{then}: expected an affine transform file, found a displacement field")
    return after.compose(transform)


def _import_hdar_in_background(method: str) -> threading.Thread | None:
    """For ``hdar`` (and ``voxelmorph``), import torch and HDAR's modules in a thread, so that the 2-3 s this takes
    in a fresh process overlap with hashing, reading and normalising the images (whose zlib and numpy work release
    the GIL); ``None`` for the other methods. An import error is left for the first real import to raise."""
    if method not in ("hdar", "voxelmorph"):
        return None

    def work() -> None:
        try:
            from hdar_pipeline.hdar import instance, weights  # noqa: F401  (imports torch)
            from hdar_pipeline.methods import hdar_method  # noqa: F401
        except Exception:  # noqa: BLE001 - reported, with its message, where the module is used
            pass

    thread = threading.Thread(target=work, name="hdar-import", daemon=True)
    thread.start()
    return thread


def _weights_files(method: str, options: dict | None) -> list[Path]:
    """The HDAR (or VoxelMorph) weights (``.pt`` and model card) a registration reads, present and verified against
    the card's SHA-256 before the work, and protected from the outputs; ``[]`` for the other methods.

    Raises
    ------
    WeightsError
        The weights are missing, their card is missing, or the file does not match the card.
    """
    if method not in ("hdar", "voxelmorph"):
        return []
    weights = (options or {}).get("weights", "default" if method == "hdar" else "voxelmorph")
    try:
        from hdar_pipeline.hdar.weights import NoWeightsError, resolve_weights, verify_weights
    except ImportError:  # no torch: the method says so
        return []
    try:
        pt, card = resolve_weights(weights)
    except NoWeightsError as exc:
        if method != "voxelmorph":
            raise
        from hdar_pipeline.methods.voxelmorph_method import missing_weights

        raise missing_weights(exc, weights) from None
    verify_weights(pt, card)
    return [pt, card]


def brain_mask_of(fixed_img, mask_img=None) -> tuple[np.ndarray, str]:
    """The fixed image's brain voxels for the folding figure: ``mask_img > 0`` when a mask is given, else the
    voxels above the fixed image's minimum (the brain of a skull-stripped image, as ANTs users count it:
    ``fixed > 0``). Returns the mask and a description of where it came from."""
    if mask_img is not None:
        return np.asarray(mask_img.dataobj) > 0, "fixed_mask > 0"
    data = np.asarray(fixed_img.dataobj)
    return data > data.min(), "fixed image above its minimum (the brain of a skull-stripped image)"


def register(
    fixed,
    moving,
    *,
    method: str = DEFAULT_METHOD,
    preset: str | None = None,
    affine: bool = True,
    fixed_mask=None,
    seed: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    normalize: bool = True,
    **options,
):
    """Register one or several moving images onto a fixed image and return the shared Transform(s).

    The method is built once, so several pairs in one call share it (HDAR loads its network once,
    on CUDA when ``device="auto"`` finds one).

    Parameters
    ----------
    fixed : path-like or nibabel image
        The fixed (atlas) image; every Transform lives on its grid.
    moving : path-like or nibabel image, or a list of them
        One moving image, or several (one Transform each, in order).
    method : str
        A registered method; default :data:`~hdar_pipeline.methods.registry.DEFAULT_METHOD` (``"hdar"``).
    preset : str, optional
        Method preset (``hdar register --help``; ``None``: the method's default).
    affine : bool
        Run the affine stage first (skip it for images already aligned on the fixed grid).
    fixed_mask : path-like or nibabel image, optional
        Restricts the similarity metric to a region of the fixed grid.
    seed, threads, device
        Reproducibility and resources.
    normalize : bool
        Rescale intensities to [0, 1] (robust percentiles) before registering.
    **options
        Method-specific settings, e.g. ``weights="model.pt"``, ``refine=50`` for HDAR.

    Returns
    -------
    Transform or list of Transform
        Fixed-space points -> moving-space points (ITK/ANTs convention); a list when ``moving`` is a list.

    Examples
    --------
    >>> from hdar_pipeline import register  # doctest: +SKIP
    >>> transform = register("atlas_T1w.nii.gz", "sub-01_T1w.nii.gz", method="syn")  # doctest: +SKIP
    >>> warped = transform.apply(load_image("sub-01_dseg.nii.gz", labels=True), interpolation="nearest")  # doctest: +SKIP
    """
    from hdar_pipeline.methods import get_method, register_pair

    def as_image(x, labels=False):
        return load_image(x, labels=labels) if isinstance(x, (str, os.PathLike)) else x

    several = isinstance(moving, (list, tuple))
    fixed_img = as_image(fixed)
    mask_img = as_image(fixed_mask, labels=True) if fixed_mask is not None else None
    f_in = normalize_intensity(fixed_img) if normalize else fixed_img
    method_obj = get_method(method, preset=preset, seed=seed, threads=threads, device=device, options=options)
    out = []
    for m in (moving if several else [moving]):
        m_img = as_image(m)
        m_in = normalize_intensity(m_img) if normalize else m_img
        transform, _ = register_pair(f_in, m_in, method_obj, affine=affine, fixed_mask=mask_img, seed=seed,
                                     threads=threads)
        out.append(transform)
    return out if several else out[0]
