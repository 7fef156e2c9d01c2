"""Cohort processing, one subject at a time, with failures recorded instead of raised.

This is the library behind the cohort workflow (:mod:`hdar_pipeline.engine.cohort_workflow`) and its Pydra
tasks (:mod:`hdar_pipeline.engine.pydra_tasks`). It never imports a workflow engine.

Two kinds of functions live here:

* **file-level steps that raise** on bad input, like the rest of the library:
  :func:`apply_transform_files` (re-apply written transforms) and :func:`preprocess_files`
  (:func:`hdar_pipeline.pipeline.preprocess.preprocess_t1w` from and to files);
* **per-subject wrappers that never raise** for a problem with one subject:
  :func:`preprocess_subject`, :func:`register_subject` and :func:`evaluate_subject` catch the
  exception of the step they run and return a :class:`~hdar_pipeline.core.subject_record.SubjectRecord`
  (also written as a JSON file) whose ``status`` is ``"error"`` and whose ``error`` holds the message (which
  names the file and the problem, see :class:`hdar_pipeline.core.images.ImageError`). A wrapper handed a failed
  upstream record passes the failure on unchanged, so one bad subject becomes one ``status="error"``
  row of the group tables (:func:`collect_records`) and never stops the others. With
  ``stop_on_first_crash=True`` (the BIDS App's ``--stop-on-first-crash``, an input of every task so that
  Pydra's cache key sees it) the wrappers re-raise instead.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from hdar_pipeline.core.subject_record import STATUS_ERROR, STATUS_OK, SubjectRecord, as_record

PathLike = str | os.PathLike

_log = logging.getLogger(__name__)

#: Leading columns of the group tables, in this order.
GROUP_ID_COLUMNS = ["subject", "session", "method", "preset", "status", "error", "failed_step"]
#: Whole-registration columns carried from the records into the group table (when present).
GROUP_RUN_COLUMNS = ["runtime_s", "peak_memory_mb", "device", "evaluated"]

RECORD_NAMES = {"preprocess": "preprocess_record.json", "register": "register_record.json",
                "evaluate": "evaluate_record.json"}


# ----------------------------------------------------------------------------- file-level steps (raise)


def apply_transform_files(
    reference: PathLike,
    moving: PathLike,
    transforms: PathLike | Sequence[PathLike],
    out_file: PathLike,
    *,
    interpolation: Literal["linear", "nearest"] = "linear",
) -> Path:
    """Warp ``moving`` onto the grid of ``reference`` with written transform files.

    Parameters
    ----------
    reference : path-like
        Image whose grid is the fixed grid (e.g. the atlas).
    moving : path-like
        Image (``"linear"``) or label map (``"nearest"``) in moving space.
    transforms : path-like or sequence
        ITK/ANTs transform files in ``ants.apply_transforms`` order (e.g. a registration's composite
        ``transform.h5``, or its ``transforms`` list).
    out_file : path-like
        Output image (parent folders are created).
    interpolation : {"linear", "nearest"}

    Returns
    -------
    Path of the written image.
    """
    from hdar_pipeline.core.images import load_image, save_image
    from hdar_pipeline.core.transforms import Transform

    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    ref = load_image(reference)
    img = load_image(moving, labels=interpolation == "nearest")
    transform = Transform.read(transforms, grid=ref)
    return save_image(transform.apply(img, interpolation=interpolation), out_file)


def preprocess_files(
    t1w: PathLike,
    atlas: PathLike,
    out_dir: PathLike,
    *,
    labels: PathLike | None = None,
    atlas_mask: PathLike | None = None,
    skull_stripped: str | bool = "auto",
    n4: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    affine_method: str = "fast",
    brain_mask: PathLike | None = None,
    anat_xfm: PathLike | None = None,
) -> dict[str, Any]:
    """Run :func:`hdar_pipeline.pipeline.preprocess.preprocess_t1w` on files and write its results (``affine_method``:
    the affine to the atlas, ``"fast"`` or ``"ants"``).

    Reused derivatives (the BIDS App's ``--derivatives``, see :mod:`hdar_pipeline.bids_io.anat_derivatives`): ``brain_mask``
    (the T1w's native-space brain mask, on its grid) replaces brain extraction; ``anat_xfm`` (an ITK composite
    transform from the atlas space to the T1w, sMRIPrep's ``from-T1w_to-<space>_mode-image_xfm.h5``) gives,
    through its linear part only (:func:`hdar_pipeline.bids_io.anat_derivatives.linear_part`), the affine to the atlas
    instead of a registration. The steps and ``reused_derivatives`` of the record name the files.

    Writes into ``out_dir``: ``preproc_T1w.nii.gz`` (skull-stripped, bias-corrected, [0, 1], on the
    atlas grid), ``brain_mask.nii.gz`` (atlas grid), ``native_brain.nii.gz`` and
    ``native_brain_mask.nii.gz`` (subject grid), ``to_atlas_affine.mat`` and ``to_atlas.h5`` (atlas
    points -> subject points, ITK), ``preproc_dseg.nii.gz`` when ``labels`` are given (nearest
    neighbour onto the atlas grid), and ``preprocess.json``.

    Returns
    -------
    dict
        The content of ``preprocess.json``: absolute output paths (``preproc``, ``mask``,
        ``native_brain``, ``native_mask``, ``to_atlas``, ``to_atlas_files``, ``preproc_labels``), the
        steps that ran, ``skull_stripped_input``, ``reused_derivatives`` (``{"brain_mask": path,
        "anat_xfm": path}``, the files given and used) and ``runtime_s`` per step.
    """
    from hdar_pipeline.core.images import check_labels_match, load_image, save_image
    from hdar_pipeline.pipeline.preprocess import preprocess_t1w
    from hdar_pipeline.core.provenance import library_versions, sha256

    out = Path(out_dir)
    t0 = time.perf_counter()
    img = load_image(t1w)
    atlas_img = load_image(atlas)
    labels_img = None
    if labels is not None:
        labels_img = load_image(labels, labels=True)
        check_labels_match(img, labels_img, image_source=t1w, labels_source=labels)
    mask_img = load_image(atlas_mask, labels=True) if atlas_mask is not None else None
    reused = {k: str(Path(v).resolve()) for k, v in (("brain_mask", brain_mask), ("anat_xfm", anat_xfm))
              if v is not None}
    to_atlas_affine = None
    if anat_xfm is not None:
        from hdar_pipeline.bids_io.anat_derivatives import linear_part

        to_atlas_affine = linear_part(anat_xfm)
    read_s = time.perf_counter() - t0
    result = preprocess_t1w(img, atlas_img, skull_stripped=skull_stripped_flag(skull_stripped), n4=n4, seed=seed,
                            threads=threads, atlas_mask=mask_img, affine_method=affine_method,
                            brain_mask=reused.get("brain_mask"), to_atlas_affine=to_atlas_affine,
                            to_atlas_source=f"the linear part of {reused['anat_xfm']}" if anat_xfm else None)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "preproc": save_image(result.image, out / "preproc_T1w.nii.gz"),
        "mask": save_image(result.mask, out / "brain_mask.nii.gz"),
        "native_brain": save_image(result.native_brain, out / "native_brain.nii.gz"),
        "native_mask": save_image(result.native_mask, out / "native_brain_mask.nii.gz"),
    }
    xfm_files = result.to_atlas.write(out, prefix="to_atlas_")
    paths["to_atlas"] = result.to_atlas.write_composite(out / "to_atlas.h5")
    if labels_img is not None:
        paths["preproc_labels"] = save_image(result.to_atlas.apply(labels_img, interpolation="nearest"),
                                             out / "preproc_dseg.nii.gz")
    runtime_s = {"read": read_s, **result.runtime_s, "write": time.perf_counter() - t0}
    record = {
        **{k: str(Path(v).resolve()) for k, v in paths.items()},
        "preproc_labels": str(paths["preproc_labels"].resolve()) if "preproc_labels" in paths else None,
        "to_atlas_files": [str(p.resolve()) for p in xfm_files],
        "steps": list(result.steps),
        "skull_stripped_input": bool(result.skull_stripped_input),
        "reused_derivatives": reused,
        "runtime_s": {k: float(v) for k, v in runtime_s.items()},
        "seed": seed,
        "affine_method": affine_method if anat_xfm is None else None,
        "inputs": {"t1w": str(Path(t1w).resolve()), "atlas": str(Path(atlas).resolve()),
                   "labels": str(Path(labels).resolve()) if labels is not None else None,
                   "t1w_sha256": sha256(t1w), "atlas_sha256": sha256(atlas),
                   **{f"{k}_sha256": sha256(v) for k, v in reused.items()}},
        "versions": library_versions(),
    }
    (out / "preprocess.json").write_text(json.dumps(record, indent=2, default=str))
    return record


#: Margin (mm) kept around the brain when a participant is prepared as the atlas: its grid, on which every subject's
#: outputs lie, is cut to the brain's box plus this margin (a scanner's field of view is mostly air: LPBA40's S01
#: re-stored in a 256 x 256 x 180 field of view has 9 % brain voxels, and every per-voxel step of every subject
#: scaled with the rest).
ATLAS_MARGIN_MM = 10.0


class PreparedAtlas(NamedTuple):
    """The files :func:`prepare_atlas_files` writes: the prepared image and, when labels were given, the labels
    on its grid."""

    image: Path
    labels: Path | None


def prepare_atlas_files(
    t1w: PathLike,
    out_dir: PathLike,
    *,
    name: str = "atlas",
    labels: PathLike | None = None,
    skull_stripped: str | bool = "auto",
    n4: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    margin_mm: float | None = ATLAS_MARGIN_MM,
) -> PreparedAtlas:
    """Prepare a dataset's own T1w as the atlas, as its subjects are prepared, and return the prepared files.

    A participant of the cohort chosen as atlas is stored as the others are: a raw head, as often as not.
    Registering skull-stripped subjects to a head aligns brains to skulls, so the atlas goes through
    :func:`hdar_pipeline.pipeline.preprocess.prepare_brain` (skull-strip check, N4, brain extraction where needed,
    normalisation to [0, 1]) once. Its grid is then cut to the brain's box plus ``margin_mm`` (same voxels, same
    world coordinates; ``None`` keeps the whole field of view), and ``labels`` (on the T1w's grid) are cut with it.

    Writes ``<name>_desc-brain_T1w.nii.gz``, ``<name>_desc-brain_T1w.json`` (the steps, the sources' paths and
    SHA-256, the options) and with ``labels`` ``<name>_desc-brain_dseg.nii.gz`` into ``out_dir``; a later call with
    the same source bytes and options returns the existing files without recomputing them.

    Returns
    -------
    PreparedAtlas
        ``image``: the prepared atlas (float32, 0 outside the brain); ``labels``: its labels, or ``None``.

    Raises
    ------
    ImageError
        ``labels`` do not lie on the T1w's grid, or an input cannot be read (the message names the file).
    """
    from hdar_pipeline.core.images import check_labels_match, crop_to_mask, load_image, save_image
    from hdar_pipeline.pipeline.preprocess import prepare_brain
    from hdar_pipeline.core.provenance import sha256

    out = Path(out_dir)
    image_path = out / f"{name}_desc-brain_T1w.nii.gz"
    labels_path = out / f"{name}_desc-brain_dseg.nii.gz" if labels is not None else None
    sidecar = image_path.with_name(f"{name}_desc-brain_T1w.json")
    key = {"source": str(Path(t1w).resolve()), "source_sha256": sha256(t1w),
           "labels": str(Path(labels).resolve()) if labels is not None else None,
           "labels_sha256": sha256(labels) if labels is not None else None,
           "skull_stripped": str(skull_stripped), "n4": bool(n4), "seed": seed, "margin_mm": margin_mm}
    if image_path.is_file() and sidecar.is_file() and (labels_path is None or labels_path.is_file()):
        try:
            if json.loads(sidecar.read_text()).get("key") == key:
                return PreparedAtlas(image_path, labels_path)
        except (OSError, ValueError):
            pass
    img = load_image(t1w)
    label_img = None
    if labels is not None:
        label_img = load_image(labels, labels=True)
        check_labels_match(img, label_img, image_source=t1w, labels_source=labels)
    result = prepare_brain(img, skull_stripped=skull_stripped_flag(skull_stripped), n4=n4, seed=seed,
                           threads=threads)
    brain = result.native_brain
    if margin_mm is not None:
        mask = np.asarray(result.native_mask.dataobj) > 0
        brain = crop_to_mask(brain, mask, margin_mm)
        if label_img is not None:
            label_img = crop_to_mask(label_img, mask, margin_mm)
    out.mkdir(parents=True, exist_ok=True)
    save_image(brain, image_path)
    if label_img is not None:
        save_image(label_img, labels_path)
    steps = list(result.steps)
    if margin_mm is not None:
        steps.append(f"cut to the brain's box plus {margin_mm:g} mm: {' x '.join(map(str, brain.shape[:3]))} of "
                     f"{' x '.join(map(str, img.shape[:3]))} voxels")
    sidecar.write_text(json.dumps({"key": key, "steps": steps,
                                   "skull_stripped_input": bool(result.skull_stripped_input),
                                   "runtime_s": {k: float(v) for k, v in result.runtime_s.items()}}, indent=2))
    return PreparedAtlas(image_path, labels_path)


def skull_stripped_flag(value: str | bool) -> Literal["auto"] | bool:
    """``"auto"``, or a bool from ``True``/``False``/``"yes"``/``"no"``/``"true"``/``"false"`` (any case)."""
    if isinstance(value, bool):
        return value
    flags = {"auto": "auto", "yes": True, "true": True, "no": False, "false": False}
    try:
        return flags[str(value).strip().lower()]
    except KeyError:
        raise ValueError(f"skull_stripped must be auto, yes or no, got {value!r}") from None


def count_failed(records: Iterable[PathLike | Mapping[str, Any] | SubjectRecord]) -> int:
    """Number of records whose ``status`` is not ``"ok"``."""
    return sum(not as_record(r).ok for r in records)


# ----------------------------------------------------------------------------- records


def error_message(exc: BaseException) -> str:
    """One line for a table: ``"<ExceptionType>: <message>"`` (the message names the file where the
    library raised :class:`~hdar_pipeline.core.images.ImageError`)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _run_step(step: str, base: SubjectRecord, fn: Callable[[], dict[str, Any]], *,
              stop_on_first_crash: bool = False) -> SubjectRecord:
    """Run ``fn`` (it returns the step's fields); on an exception return ``base`` marked as failed at ``step``
    (never raises ``Exception`` unless ``stop_on_first_crash``; ``KeyboardInterrupt`` and ``SystemExit`` still
    propagate)."""
    t0 = time.perf_counter()
    try:
        out = base.updated(**fn(), status=STATUS_OK, error="", failed_step="")
        # the wall time of each step the record went through: the earlier steps' come with ``base``
        return out.updated(stage_wall_s={**(out.stage_wall_s or {}), step: time.perf_counter() - t0})
    except Exception as exc:  # noqa: BLE001 - one subject's failure must not stop the cohort
        if stop_on_first_crash:
            raise
        from hdar_pipeline.pipeline.isolation import WorkerDied

        # a process killed from outside (out of memory, kill -9): may not happen again on a rerun
        return base.failed(step, error_message(exc),
                           traceback=getattr(exc, "child_traceback", None) or traceback.format_exc(),
                           transient=isinstance(exc, WorkerDied))


def _call(isolate: bool, fn: Callable[..., dict[str, Any]], *args: Any, job_dir: Path, label: str,
          **kwargs: Any) -> dict[str, Any]:
    """``fn(*args, **kwargs)``, in a child process when ``isolate``."""
    if not isolate:
        return fn(*args, **kwargs)
    from hdar_pipeline.pipeline.isolation import run_isolated

    return run_isolated(fn, *args, job_dir=job_dir, label=label, **kwargs)


def _same_file(a: PathLike | None, b: PathLike | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _passed_on(upstream: SubjectRecord, base: SubjectRecord) -> SubjectRecord:
    """A failed upstream record carried into the next step (its error and failed step kept)."""
    return base.updated(status=upstream.status, error=upstream.error, failed_step=upstream.failed_step,
                        traceback=upstream.traceback)


# ----------------------------------------------------------------------------- per-subject wrappers (never raise)


def preprocess_subject(
    subject: str,
    t1w: PathLike | None,
    atlas: PathLike,
    out_dir: PathLike,
    *,
    session: str | None = None,
    labels: PathLike | None = None,
    atlas_mask: PathLike | None = None,
    skull_stripped: str | bool = "auto",
    n4: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    isolate: bool = True,
    affine_method: str = "fast",
    brain_mask: PathLike | None = None,
    anat_xfm: PathLike | None = None,
    stop_on_first_crash: bool = False,
) -> SubjectRecord:
    """:func:`preprocess_files` for one subject, as a record that reports failure instead of raising
    (``brain_mask``, ``anat_xfm``: reused sMRIPrep/fMRIPrep derivatives, see :func:`preprocess_files`;
    ``stop_on_first_crash``: raise instead).

    With ``isolate`` (default) the work runs in a child process (:func:`~hdar_pipeline.pipeline.isolation.run_isolated`):
    a kill by a signal or by the out-of-memory killer fails this subject only, with the signal in ``error``.

    Returns
    -------
    SubjectRecord
        The record (also written to ``out_dir/preprocess_record.json``): the ids, ``status``,
        ``error``, ``failed_step``, ``t1w``, ``labels`` (the native inputs) and, when ok,
        ``preproc`` (image on the atlas grid), ``preproc_labels``, ``mask``, ``to_atlas`` (ITK
        ``.h5``), ``preprocess_json``, ``preprocess_runtime_s`` (seconds, all steps), ``preprocess_steps``
        (what ran, one line each: a reused derivative file is named there) and ``reused_derivatives``
        (``{"brain_mask": path, "anat_xfm": path}``, those given).
    """
    out = Path(out_dir)
    reused = {k: _abs(v) for k, v in (("brain_mask", brain_mask), ("anat_xfm", anat_xfm)) if v is not None}
    base = SubjectRecord(str(subject), session or "", t1w=_abs(t1w), labels=_abs(labels), atlas=_abs(atlas),
                         reused_derivatives=reused or None)

    def step() -> dict[str, Any]:
        if t1w is None:
            raise ValueError(f"subject {subject}: no T1w image given")
        rec = _call(isolate, preprocess_files, t1w, atlas, out, labels=labels, atlas_mask=atlas_mask,
                    skull_stripped=skull_stripped, n4=n4, seed=seed, threads=threads, affine_method=affine_method,
                    brain_mask=brain_mask, anat_xfm=anat_xfm, job_dir=out, label=f"sub-{subject} preprocess")
        return {"preproc": rec["preproc"], "preproc_labels": rec["preproc_labels"], "mask": rec["mask"],
                "native_brain": rec["native_brain"], "native_mask": rec["native_mask"],
                "preprocess_steps": list(rec["steps"]), "skull_stripped_input": rec["skull_stripped_input"],
                "to_atlas": rec["to_atlas"], "preprocess_json": str((out / "preprocess.json").resolve()),
                "reused_derivatives": rec["reused_derivatives"],
                "preprocess_runtime_s": float(sum(rec["runtime_s"].values())),
                "preprocess_steps_s": {k: float(v) for k, v in rec["runtime_s"].items()}}

    return _run_step("preprocess", base, step, stop_on_first_crash=stop_on_first_crash).write(
        out / RECORD_NAMES["preprocess"])


def register_subject(
    subject: str,
    t1w: PathLike | None,
    atlas: PathLike,
    out_dir: PathLike,
    *,
    method: str,
    session: str | None = None,
    labels: PathLike | None = None,
    preprocessed: PathLike | Mapping[str, Any] | None = None,
    preset: str | None = None,
    affine: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    isolate: bool = True,
    affine_method: str = "fast",
    atlas_labels: PathLike | None = None,
    inverse: bool = True,
    stop_on_first_crash: bool = False,
) -> SubjectRecord:
    """Register one subject to the atlas with one method, as a record that reports failure.

    With ``isolate`` (default) the registration runs in a child process
    (:func:`~hdar_pipeline.pipeline.isolation.run_isolated`): a kill by a signal or by the out-of-memory killer fails
    this subject x method only, with the signal in ``error`` and ``transient`` set (a rerun of the BIDS App runs such a job again).

    Without ``preprocessed`` this is :func:`hdar_pipeline.pipeline.registration.register_files` (atlas fixed,
    the subject's T1w moving, its labels warped with nearest neighbour).

    With ``preprocessed`` (a :func:`preprocess_subject` record, or its JSON file; ``subject``,
    ``session``, ``t1w`` and ``labels`` default to the record's), the deformable
    method registers the preprocessed image (already affinely on the atlas grid, so no affine stage
    runs), and the preprocessing affine follows it in the written transform (``register_files``' ``then``,
    composed exactly): ``transform.h5`` maps atlas points to the *native* subject, and the native labels are
    warped once (no double interpolation). The displacement field is written once, in that composite. A
    failed preprocessing record is passed on as this subject x method's failure.

    With ``inverse`` (default) the inverse transform (native T1w points -> atlas points, on the T1w's grid) is
    written too, with its inverse consistency, and ``atlas_labels`` are brought onto the native T1w with it
    (``register_files``' ``inverse_on``/``fixed_labels``). ``stop_on_first_crash``: raise instead of recording
    a failure.

    Returns
    -------
    SubjectRecord
        The record (also ``out_dir/register_record.json``): ids, ``status``, ``error``,
        ``failed_step``, and when ok ``registration_json``, ``warped`` (image on the atlas grid),
        ``warped_labels`` (or ``None``), ``transform`` (ITK composite ``.h5``, atlas -> native
        subject), ``transforms`` (``[transform]``, the ``ants.apply_transforms`` list),
        ``runtime_s``, ``peak_memory_mb``, ``device``, ``folded_percent``; with ``inverse``
        ``inverse_transform`` (ITK composite ``.h5``, native -> atlas), ``inverse`` (how it was obtained, its
        consistency in mm) and ``atlas_labels_native`` (when ``atlas_labels``).
    """
    out = Path(out_dir)
    upstream = None if preprocessed is None else as_record(preprocessed)
    if upstream is not None:  # identifiers and native inputs travel with the preprocessing record
        subject = subject or upstream.subject
        session = session or upstream.session
        t1w = t1w if t1w is not None else upstream.t1w
        labels = labels if labels is not None else upstream.labels
    base = SubjectRecord(str(subject), session or "", method or "", preset or "", t1w=_abs(t1w), labels=_abs(labels),
                         atlas=_abs(atlas))
    if upstream is not None:  # the preprocessing's times and native outputs travel on with the record
        base = base.updated(**{k: getattr(upstream, k) for k in (
            "stage_wall_s", "preprocess_steps_s", "native_brain", "native_mask", "preprocess_steps",
            "skull_stripped_input", "reused_derivatives", "preproc")})
    if upstream is not None and not upstream.ok:
        return _passed_on(upstream, base).write(out / RECORD_NAMES["register"])

    def step() -> dict[str, Any]:
        from hdar_pipeline.pipeline.registration import register_files

        if upstream is None:
            if t1w is None:
                raise ValueError(f"subject {subject}: no T1w image given")
            moving, then, use_affine = t1w, None, affine
        else:  # the preprocessed image is on the atlas grid already; the preprocessing's affine follows
            moving, then, use_affine = upstream.preproc, upstream.to_atlas, False
        rec = _call(isolate, register_files, atlas, moving, out, method=method, preset=preset, moving_labels=labels,
                    affine=use_affine, affine_method=affine_method, seed=seed, threads=threads, device=device,
                    then=then, separate_files=False, jacobian_map=True, inverse_on=t1w if inverse else None,
                    fixed_labels=atlas_labels if inverse else None, job_dir=out, label=f"sub-{subject} {method}")
        composite = str((out / rec["composite_transform"]).resolve())
        transforms = [composite]  # the field is written once, in the composite
        warped_labels = rec["outputs"].get("warped_labels")
        warped_labels = str((out / warped_labels).resolve()) if warped_labels else None
        return {"registration_json": str((out / "registration.json").resolve()),
                "warped": str((out / rec["outputs"]["warped"]).resolve()), "warped_labels": warped_labels,
                "jacobian_map": str((out / rec["outputs"]["jacobian"]).resolve()),
                "transform": composite, "transforms": transforms, "preset": rec.get("preset") or preset or "",
                "runtime_s": float(rec["runtime_s"]), "peak_memory_mb": float(rec["peak_memory_mb"]),
                "device": rec.get("device", "cpu"), "folded_percent": float(rec["jacobian"]["folded_percent_grid"]),
                "folded_percent_mask": float(rec["jacobian"]["folded_percent_mask"]),
                "preprocessed": upstream is not None,
                "register_steps_s": {k: float(v) for k, v in rec.get("wall_s", {}).items()},
                **_inverse_outputs(rec, out, atlas_labels)}

    return _run_step("register", base, step, stop_on_first_crash=stop_on_first_crash).write(
        out / RECORD_NAMES["register"])


def _inverse_outputs(rec: Mapping[str, Any], out: Path, atlas_labels: PathLike | None) -> dict[str, Any]:
    """The inverse transform's part of a register record (absolute paths, how it was obtained, its consistency)."""
    if "inverse" not in rec["outputs"]:
        return {}
    native = rec["outputs"].get("fixed_labels_native")
    return {"atlas_labels": _abs(atlas_labels),"inverse_transform": str((out / rec["outputs"]["inverse"]).resolve()),
            "atlas_labels_native": str((out / native).resolve()) if native else None,
            "inverse": {k: rec["inverse"][k] for k in ("source", "iterations", "residual_mm", "consistency_mm")}}


def evaluate_subject(
    record: PathLike | Mapping[str, Any],
    out_dir: PathLike,
    *,
    atlas_labels: PathLike | None = None,
    warped_labels: PathLike | None = None,
    transform: PathLike | None = None,
    label_table: PathLike | None = None,
    distances: bool = True,
    stop_on_first_crash: bool = False,
) -> SubjectRecord:
    """Evaluate one registration record against the atlas labels, as a record that reports failure.

    The subject's warped labels are compared with ``atlas_labels`` by
    :func:`hdar_pipeline.evaluation.evaluate.evaluate_files` (label overlap and surface distances, and the
    Jacobian of the record's transform). With no atlas labels or no subject labels nothing is
    evaluated (``evaluated`` is ``False``) and the record stays ok. A failed registration record is
    passed on.

    ``warped_labels`` and ``transform`` default to the record's own (a workflow passes them as
    files so that their content takes part in its cache keys). ``stop_on_first_crash``: raise instead of
    recording a failure.

    Returns
    -------
    SubjectRecord
        The registration record plus ``evaluated``, and when evaluated ``labels_csv`` (one row per
        label), ``summary_csv``, ``jacobian_csv`` and ``metrics`` (the one-row summary: ``mean_dice``
        ... and the Jacobian statistics). Also written to ``out_dir/evaluate_record.json``.
    """
    out = Path(out_dir)
    reg = as_record(record)
    base = reg.updated(evaluated=False, record_file=None)
    if not reg.ok:
        return base.write(out / RECORD_NAMES["evaluate"])

    def step() -> dict[str, Any]:
        from hdar_pipeline.evaluation.evaluate import evaluate_files

        labels = warped_labels if warped_labels is not None else reg.warped_labels
        xfm = transform if transform is not None else reg.transform
        if atlas_labels is None or not labels:
            return {}
        ids = {"subject": reg.subject, "session": reg.session, "method": reg.method}
        extra = {k: getattr(reg, k) for k in ("runtime_s", "peak_memory_mb") if getattr(reg, k) is not None}
        # the registration's own Jacobian map when it wrote one (computed once), else from the transform
        jac = reg.jacobian_map
        if jac and not (Path(jac).is_file() and (transform is None or _same_file(transform, reg.transform))):
            jac = None
        result, written = evaluate_files(atlas_labels, labels, out / "evaluation.csv",
                                         transform=None if jac else xfm, jacobian=jac,
                                         label_table=label_table, ids=ids, extra=extra, distances=distances,
                                         figures=False)
        summary = result.summary.iloc[0].to_dict()
        metrics = {k: _plain(v) for k, v in summary.items() if k not in (*ids, *extra)}
        return {"evaluated": True, "atlas_labels": _abs(atlas_labels),
                "labels_csv": str(Path(written["labels"]).resolve()),
                "summary_csv": str(Path(written["summary"]).resolve()),
                "jacobian_csv": str(Path(written["jacobian"]).resolve()) if "jacobian" in written else None,
                "metrics": metrics, "evaluation_notes": list(result.notes)}

    return _run_step("evaluate", base, step, stop_on_first_crash=stop_on_first_crash).write(
        out / RECORD_NAMES["evaluate"])


# ----------------------------------------------------------------------------- group tables


def collect_records(
    records: Iterable[PathLike | Mapping[str, Any]],
    out_dir: PathLike,
    *,
    prefix: str = "group",
    participants: PathLike | None = None,
    qc_folding_threshold: float | None = None,
) -> dict[str, Any]:
    """Pool per-subject records into the tidy group tables, written as BIDS tables
    (:mod:`hdar_pipeline.evaluation.group_tables`: ``.tsv``, ``n/a`` for missing values, a ``.json`` data dictionary
    beside each; read them back with :func:`hdar_pipeline.evaluation.group_tables.read_group_table`).

    Writes into ``out_dir``:

    ``<prefix>.tsv`` / ``<prefix>.json``
        One row per subject x session x method: ``participant_id`` (``sub-<label>``), ``session_id``
        (``ses-<label>``, ``n/a`` without sessions), the columns of ``participants.tsv`` when given, the rest
        of :data:`GROUP_ID_COLUMNS` and :data:`GROUP_RUN_COLUMNS`, the evaluation summary (``mean_dice``,
        ``mean_hd95_mm`` ..., ``folded_percent``, ``log_jacobian_std`` ...) and the QC flags ``qc_folding``,
        ``qc_dice_outlier``, ``qc_failed`` (:func:`hdar_pipeline.evaluation.group_tables.qc_flags`). Failed rows have
        ``status="error"`` and the message in ``error``.
    ``<prefix>_labels.tsv`` / ``<prefix>_labels.json``
        One row per evaluated subject x session x method x label (the evaluation's per-label table with
        ``participant_id``, ``session_id`` and the status columns; ``label`` is an integer). A failed or
        unevaluated subject x method has no row here (its row in ``<prefix>.tsv`` says why). With the
        failed rows of ``<prefix>.tsv`` this is the input of
        :func:`hdar_pipeline.evaluation.stats.write_group_statistics` (see :func:`group_statistics_files`).

    Rows are sorted by participant, session and method (and label).

    Parameters
    ----------
    records : iterable of path-like or mapping
        Evaluate (or register) records, one per subject x method.
    out_dir : path-like
        Output folder (created).
    prefix : str
        Stem of the table names.
    participants : path-like, optional
        A BIDS dataset folder: the columns of its ``participants.tsv`` are merged into ``<prefix>.tsv`` by
        ``participant_id`` (types kept; descriptions copied from ``participants.json`` when present).
    qc_folding_threshold : float, optional
        Percent of folded brain voxels above which ``qc_folding`` is set (default
        :data:`hdar_pipeline.evaluation.group_tables.DEFAULT_FOLDING_THRESHOLD`, 0.1).

    Returns
    -------
    dict
        ``{"group": tsv, "labels": tsv, "group_json": json, "labels_json": json}``; a ``"warnings"`` entry is
        not a path: the list of warnings (e.g. label names missing), also logged and written in the
        dictionaries.
    """
    from hdar_pipeline.evaluation import group_tables as gt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = [as_record(r) for r in records]
    rows, label_frames = [], []
    for r in recs:
        row = {c: getattr(r, c) for c in GROUP_ID_COLUMNS}
        row.update({c: getattr(r, c) for c in GROUP_RUN_COLUMNS})
        row["evaluated"] = bool(r.evaluated)
        if r.ok and r.folded_percent is not None:
            row["folded_percent"] = r.folded_percent
            if r.folded_percent_mask is not None:
                row["folded_percent_mask"] = r.folded_percent_mask
        row.update(r.metrics or {})
        rows.append(row)
        status_cols = {c: row[c] for c in ("status", "error", "failed_step")}
        if r.labels_csv:
            table = Path(r.labels_csv)
            frame = pd.read_csv(table, sep="\t" if table.suffix.lower() == ".tsv" else ",", na_values=[gt.NA, ""],
                                keep_default_na=False, dtype={"subject": str, "session": str, "method": str,
                                                              "name": str, "flag": str})
            frame = frame[pd.to_numeric(frame["label"], errors="coerce").notna()] if "label" in frame else frame
            frame["session"] = frame["session"].fillna("") if "session" in frame else ""
            for pos, (c, v) in enumerate(status_cols.items(), start=3):
                frame.insert(min(pos, len(frame.columns)), c, v)
            label_frames.append(frame)
    group = pd.DataFrame(rows)
    if group.empty:
        group = pd.DataFrame(columns=[*GROUP_ID_COLUMNS, *GROUP_RUN_COLUMNS])
    group = group.sort_values(["subject", "session", "method"], kind="stable").reset_index(drop=True)
    group = gt.qc_flags(group, folding_threshold=gt.DEFAULT_FOLDING_THRESHOLD if qc_folding_threshold is None
                        else qc_folding_threshold)
    labels = pd.concat(label_frames, ignore_index=True, sort=False) if label_frames else \
        pd.DataFrame(columns=["subject", "session", "method", "status", "error", "failed_step", "label"])
    sort_cols = [c for c in ("subject", "session", "method", "label") if c in labels]
    labels = labels.sort_values(sort_cols, kind="stable").reset_index(drop=True)
    if "label" in labels:
        labels["label"] = pd.to_numeric(labels["label"]).astype("int64")
    warnings_: list[str] = []
    notes: dict[str, str] = {}
    if gt.missing_label_names(labels):
        warnings_.append(gt.MISSING_NAMES_WARNING)
        notes["name"] = f"Warning: {gt.MISSING_NAMES_WARNING}"
        _log.warning("group tables: %s", gt.MISSING_NAMES_WARNING)
    group, labels = gt.bids_ids(group), gt.bids_ids(labels)
    extra: dict[str, Any] = {}
    if participants is not None:
        table, extra = gt.read_participants(participants)
        group = gt.merge_participants(group, table)
    group_dict = gt.data_dictionary(group, extra=extra, notes=notes)
    labels_dict = gt.data_dictionary(labels, notes=notes)
    paths: dict[str, Any] = {}
    paths["group"], paths["group_json"] = gt.write_group_table(group, out / f"{prefix}.tsv", group_dict)
    paths["labels"], paths["labels_json"] = gt.write_group_table(labels, out / f"{prefix}_labels.tsv", labels_dict)
    paths["warnings"] = warnings_
    return paths


def group_statistics_files(
    tables: PathLike | Sequence[PathLike],
    out_dir: PathLike,
    *,
    reference: str = "hdar",
    figures: bool = True,
    group: PathLike | None = None,
    extension: str = ".tsv",
) -> tuple[list[Path], list[str]]:
    """:func:`hdar_pipeline.evaluation.stats.write_group_statistics` on tidy tables, for a workflow's last step.

    Unusable tables (:class:`~hdar_pipeline.evaluation.stats.StatsError`, e.g. every subject failed) do not
    raise: the reason is written to ``out_dir/notes.txt`` and returned, so the per-subject outputs
    of the cohort survive.

    Parameters
    ----------
    tables : path-like or sequence of path-like
        Per-label tables (e.g. :func:`collect_records`' ``group_labels.tsv``); a ``.tsv`` with a JSON data
        dictionary beside it is read with :func:`hdar_pipeline.evaluation.group_tables.read_group_table`.
    out_dir : path-like
        Output folder.
    reference : str
        The method the paired tests compare every other method with.
    figures : bool
        Write the figures.
    group : path-like, optional
        The subject x method table (``group.tsv``): its rows whose status is not ok (failed subjects, which
        have no per-label rows) are added, so that they are listed in ``excluded`` and counted in
        ``n_failed``.
    extension : str
        ``.tsv`` (tab-separated, ``n/a`` for missing values) or ``.csv`` for the statistics tables.

    Returns
    -------
    (list of Path, list of str)
        The files written (``notes.txt`` always among them) and the notes.
    """
    from hdar_pipeline.evaluation.group_tables import read_group_table
    from hdar_pipeline.evaluation.stats import StatsError, write_group_statistics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [tables] if isinstance(tables, (str, os.PathLike)) else list(tables)

    def read(path: PathLike) -> pd.DataFrame:
        path = Path(path)
        if path.suffix.lower() == ".tsv" and path.with_suffix(".json").is_file():
            frame = read_group_table(path)
            frame["source_table"] = str(path)
            return frame
        from hdar_pipeline.evaluation.stats import read_tables

        return read_tables([path])

    try:
        frames = [read(p) for p in paths]
        if group is not None:
            rows = read(group)
            if "status" in rows:
                keep = [c for c in ("participant_id", "session_id", "subject", "session", "method", "status", "error",
                                    "failed_step", "source_table") if c in rows]
                frames.append(rows.loc[rows["status"].astype(str) != "ok", keep])
        table = pd.concat(frames, ignore_index=True, sort=False) if frames else paths
        result, written = write_group_statistics(table, out, reference=reference, figures=figures,
                                                 extension=extension)
        notes = list(result.notes)
    except StatsError as exc:
        written, notes = [], [f"no group statistics: {exc}"]
    notes_file = out / "notes.txt"
    notes_file.write_text("".join(f"{n}\n" for n in notes))
    return [*map(Path, written), notes_file], notes


def report_subject(
    records: Iterable[PathLike | Mapping[str, Any]],
    out_html: PathLike,
    *,
    atlas: PathLike,
    atlas_labels: PathLike | None = None,
    atlas_name: str = "atlas",
    figures_dir: PathLike | None = None,
) -> Path:
    """The HTML QC report of one subject from its records (one per method; see
    :func:`hdar_pipeline.reports.subject_report.write_subject_report`): each method's atlas/subject flicker with the atlas
    label boundaries, the before (affine only: the preprocessing's ``preproc``)/after view, its Jacobian map and
    metrics, and the brain mask on the native T1w (the records' ``t1w`` and ``native_mask``); a failed method
    shows its error.

    Raises
    ------
    ValueError
        The records belong to more than one subject (x session).
    """
    from hdar_pipeline.reports.subject_report import ReportEntry, write_subject_report

    recs = [as_record(r) for r in records]
    ids = {(r.subject, r.session) for r in recs}
    if len(ids) != 1:
        raise ValueError(f"report_subject needs the records of one subject, got {sorted(ids)}")
    subject, session = ids.pop()
    entries = []
    for r in recs:
        metrics = dict(r.metrics or {})
        if r.folded_percent is not None:
            metrics.setdefault("folded_percent", r.folded_percent)
        if r.folded_percent_mask is not None:
            metrics.setdefault("folded_percent_mask", r.folded_percent_mask)
        entries.append(ReportEntry(method=r.method, status=r.status, error=r.error or "",
                                   failed_step=r.failed_step or "", preset=r.preset or "",
                                   warped=r.warped if r.ok else None, affine=r.preproc if r.ok else None,
                                   transform=r.transform if r.ok else None,
                                   jacobian=r.jacobian_map if r.ok and r.jacobian_map
                                   and Path(r.jacobian_map).is_file() else None, metrics=metrics,
                                   runtime_s=r.runtime_s, peak_memory_mb=r.peak_memory_mb, device=r.device or ""))
    native = next(((r.t1w, r.native_mask) for r in recs if r.t1w and r.native_mask), (None, None))
    return write_subject_report(out_html, subject=subject, session=session, atlas=atlas, atlas_labels=atlas_labels,
                                entries=entries, atlas_name=atlas_name, figures_dir=figures_dir, t1w=native[0],
                                brain_mask=native[1])


# ----------------------------------------------------------------------------- helpers


def _abs(path: PathLike | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


__all__ = [
    "GROUP_ID_COLUMNS",
    "GROUP_RUN_COLUMNS",
    "STATUS_ERROR",
    "STATUS_OK",
    "apply_transform_files",
    "collect_records",
    "count_failed",
    "error_message",
    "evaluate_subject",
    "group_statistics_files",
    "preprocess_files",
    "preprocess_subject",
    "register_subject",
    "report_subject",
    "ATLAS_MARGIN_MM",
    "PreparedAtlas",
    "prepare_atlas_files",
    "skull_stripped_flag",
]
