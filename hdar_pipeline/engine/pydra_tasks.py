"""Pydra (1.0) task definitions: thin wiring over the library, no science here.

Every task calls one library function and turns its paths into ``fileformats`` ``File`` outputs, so
that downstream tasks hash the *content* of the files they receive (Pydra hashes a plain ``str`` or
``pathlib.Path`` by its text only). Tasks write into their own output directory: Pydra runs a job
with its working directory set to the job's cache directory, so ``Path.cwd()`` is that directory
(in the ``cf`` worker's processes as much as in the ``debug`` worker).

Two families:

* **Step tasks** (:class:`Register`, :class:`ApplyTransform`, :class:`Evaluate`,
  :class:`Preprocess`, :class:`GroupStatistics`, :class:`SubjectReport`) raise on bad input like the library does: drop them
  into any Pydra workflow.
* **Cohort tasks** (:class:`PreprocessSubject`, :class:`RegisterSubject`,
  :class:`EvaluateSubject`, :class:`CollectRecords`) wrap :mod:`hdar_pipeline.pipeline.subject_steps`, whose
  per-subject functions return a status record (JSON file) instead of raising, so that one bad
  subject of a split never stops the others. The tasks themselves catch nothing.

Caching note: Pydra's cache key of a task covers its inputs (files by content) and the *source of the
task function below*, not the library it calls. After upgrading hdar-pipeline, use a fresh cache
root (or ``rerun=True``) to recompute.

Example
-------
>>> from pydra.engine.submitter import Submitter
>>> from hdar_pipeline.engine.pydra_tasks import Register
>>> task = Register(fixed="atlas.nii.gz", moving="sub-01_T1w.nii.gz", method="syn")  # doctest: +SKIP
>>> with Submitter(worker="cf", cache_root="cache") as sub:  # doctest: +SKIP
...     result = sub(task)
>>> result.outputs.transform  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from fileformats.generic import Directory, File
from pydra.compose import python
from pydra.utils.typing import MultiInputObj

from hdar_pipeline.methods.registry import DEFAULT_METHOD, method_names, presets_text
from hdar_pipeline.pipeline import subject_steps as cohort

__all__ = [
    "ApplyTransform",
    "CollectRecords",
    "Evaluate",
    "EvaluateSubject",
    "GroupStatistics",
    "Preprocess",
    "PreprocessSubject",
    "Register",
    "RegisterSubject",
    "SubjectReport",
]


def _file(path) -> File | None:
    return None if path in (None, "") else File(path)


def _method_docs(func):
    """Fill ``{methods}``, ``{default}`` and ``{presets}`` in a task's docstring from the method registry (before Pydra reads
    it)."""
    names = method_names()
    func.__doc__ = func.__doc__.format(methods=", ".join(names[:-1]) + " or " + names[-1], presets=presets_text(),
                                       default=DEFAULT_METHOD)
    return func


# ----------------------------------------------------------------------------- step tasks (raise)


@python.define(outputs=["record", "warped", "warped_labels", "transform"])
@_method_docs
def Register(
    fixed: File,
    moving: File,
    method: str = DEFAULT_METHOD,
    moving_labels: File | None = None,
    preset: str | None = None,
    affine: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    device: str = "auto",
) -> tuple[File, File, File | None, File]:
    """Register a moving image to a fixed image (hdar_pipeline.pipeline.registration.register_files).

    Args:
        fixed: Fixed image (the atlas); the outputs lie on its grid.
        moving: Moving image (the subject).
        method: Registration method: {methods} (default {default}, the registry's DEFAULT_METHOD).
        moving_labels: Label map of the moving image, warped with nearest neighbour.
        preset: Method preset ({presets}).
        affine: Run the affine stage before a deformable method.
        seed: Random seed (numpy, torch, ANTS_RANDOM_SEED).
        threads: Worker threads (ITK, torch); None keeps the library defaults.
        device: auto, cpu or cuda[:N] (used by hdar, voxelmorph, lccdemons and fireants).

    Returns:
        record: registration.json (method, parameters, runtime, versions, transform list).
        warped: The moving image on the fixed grid (linear).
        warped_labels: The moving labels on the fixed grid, or None without moving_labels.
        transform: ITK composite transform (.h5), fixed points -> moving points.
    """
    from hdar_pipeline.pipeline.registration import register_files

    out = Path.cwd()
    rec = register_files(fixed, moving, out, method=method, preset=preset, moving_labels=moving_labels,
                         affine=affine, seed=seed, threads=threads, device=device)
    return (File(out / "registration.json"), File(out / rec["outputs"]["warped"]),
            _file(out / rec["outputs"]["warped_labels"] if "warped_labels" in rec["outputs"] else None),
            File(out / rec["composite_transform"]))


@python.define(outputs=["warped"])
def ApplyTransform(
    reference: File,
    moving: File,
    transform: File,
    interpolation: str = "linear",
) -> File:
    """Warp an image (or labels) onto a reference grid with a written transform.

    Args:
        reference: Image on the fixed grid (the atlas).
        moving: Image (interpolation linear) or label map (interpolation nearest) in moving space.
        transform: ITK/ANTs transform file (e.g. Register's composite .h5).
        interpolation: linear or nearest.

    Returns:
        warped: The moving image resampled onto the reference grid.
    """
    out = Path.cwd() / ("warped_labels.nii.gz" if interpolation == "nearest" else "warped.nii.gz")
    return File(cohort.apply_transform_files(reference, moving, transform, out, interpolation=interpolation))


@python.define(outputs=["labels_csv", "summary_csv", "jacobian_csv"])
def Evaluate(
    reference_labels: File,
    labels: File,
    transform: File | None = None,
    label_table: File | None = None,
    subject: str = "",
    session: str = "",
    method: str = "",
    distances: bool = True,
) -> tuple[File, File, File | None]:
    """Evaluate warped labels against reference labels (hdar_pipeline.evaluation.evaluate.evaluate_files).

    Args:
        reference_labels: Atlas labels (fixed grid).
        labels: Warped subject labels on the same grid.
        transform: The registration's transform, for the Jacobian statistics.
        label_table: BIDS dseg.tsv or FreeSurfer LUT with the label names.
        subject: Subject identifier written into the tables.
        session: Session identifier written into the tables.
        method: Method name written into the tables.
        distances: Compute surface distances (hd95_mm, msd_mm, hd_mm).

    Returns:
        labels_csv: One row per label.
        summary_csv: One row: means over the labels and the Jacobian statistics.
        jacobian_csv: One row of Jacobian statistics, or None without a transform.
    """
    from hdar_pipeline.evaluation.evaluate import evaluate_files

    ids = {"subject": subject, "session": session, "method": method}
    _, written = evaluate_files(reference_labels, labels, Path.cwd() / "evaluation.csv", transform=transform,
                                label_table=label_table, ids=ids, distances=distances, figures=False)
    return File(written["labels"]), File(written["summary"]), _file(written.get("jacobian"))


@python.define(outputs=["preproc", "mask", "to_atlas", "preproc_labels", "record"])
def Preprocess(
    t1w: File,
    atlas: File,
    labels: File | None = None,
    skull_stripped: str = "auto",
    n4: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    affine_method: str = "fast",
) -> tuple[File, File, File, File | None, File]:
    """N4, brain extraction and affine to the atlas (hdar_pipeline.pipeline.preprocess.preprocess_t1w).

    Args:
        t1w: The subject's T1w image (raw head or skull-stripped).
        atlas: The skull-stripped atlas; outputs lie on its grid.
        labels: Subject labels, resampled onto the atlas grid (nearest neighbour).
        skull_stripped: auto, yes or no: whether the input is already skull-stripped.
        n4: Run N4 bias-field correction.
        seed: Random seed.
        threads: ITK threads.
        affine_method: The affine to the atlas: fast (PyTorch) or ants.

    Returns:
        preproc: Preprocessed image on the atlas grid ([0, 1]).
        mask: Brain mask on the atlas grid.
        to_atlas: ITK composite .h5 (atlas points -> subject points).
        preproc_labels: Labels on the atlas grid, or None.
        record: preprocess.json.
    """
    rec = cohort.preprocess_files(t1w, atlas, Path.cwd(), labels=labels, skull_stripped=skull_stripped, n4=n4,
                                  seed=seed, threads=threads, affine_method=affine_method)
    return (File(rec["preproc"]), File(rec["mask"]), File(rec["to_atlas"]), _file(rec["preproc_labels"]),
            File(Path.cwd() / "preprocess.json"))


@python.define(outputs=["stats_dir", "files", "notes"])
def GroupStatistics(
    tables: MultiInputObj[File],
    reference: str = "hdar",
    figures: bool = True,
    group: File | None = None,
) -> tuple[Directory, list[File], list[str]]:
    """Group statistics and paired tests from tidy tables (hdar_pipeline.evaluation.stats).

    Args:
        tables: Tidy per-label CSV/TSV tables (e.g. CollectRecords' labels_csv); one file or a list.
        reference: Method every other method is compared with.
        figures: Write box plots and the Dice-versus-runtime figure.
        group: CollectRecords' group_csv (group.tsv): its failed rows are listed in excluded.tsv.

    Returns:
        stats_dir: Folder holding every table (.tsv) and figure.
        files: The files written.
        notes: What was left out and why.
    """
    out = Path.cwd() / "group_stats"
    written, notes = cohort.group_statistics_files(tables, out, reference=reference, figures=figures, group=group)
    return Directory(out), [File(p) for p in written], notes


@python.define(outputs=["report", "figures"])
def SubjectReport(
    records: list[File],
    atlas: File,
    atlas_labels: File | None = None,
    atlas_name: str = "atlas",
) -> tuple[File, Directory]:
    """One subject's HTML QC report from its records, one per method (hdar_pipeline.pipeline.subject_steps.report_subject).

    Args:
        records: EvaluateSubject (or RegisterSubject) records of one subject, one per method.
        atlas: The atlas image.
        atlas_labels: The atlas labels (drawn as contours over each warped subject).
        atlas_name: Atlas name in the figure file names (space-<name>).

    Returns:
        report: report.html.
        figures: Folder of the report's SVG reportlets (nireports; embedded with relative links).
    """
    out = Path.cwd()
    html = cohort.report_subject(records, out / "report.html", atlas=atlas, atlas_labels=atlas_labels,
                                 atlas_name=atlas_name, figures_dir=out / "figures")
    return File(html), Directory(out / "figures")


# ----------------------------------------------------------------------------- cohort tasks (status records)


@python.define(outputs=["record", "preproc", "preproc_labels"])
def PreprocessSubject(
    subject: str,
    t1w: File | None,
    atlas: File,
    session: str = "",
    labels: File | None = None,
    skull_stripped: str = "auto",
    n4: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    affine_method: str = "fast",
    brain_mask: File | None = None,
    anat_xfm: File | None = None,
    stop_on_first_crash: bool = False,
) -> tuple[File, File | None, File | None]:
    """Preprocess one subject; failure becomes a status record (hdar_pipeline.pipeline.subject_steps.preprocess_subject).

    Args:
        subject: Subject identifier.
        t1w: The subject's T1w image.
        atlas: The skull-stripped atlas.
        session: Session identifier.
        labels: Subject labels.
        skull_stripped: auto, yes or no.
        n4: Run N4 bias-field correction.
        seed: Random seed.
        threads: ITK threads.
        affine_method: The affine to the atlas: fast (PyTorch) or ants.
        brain_mask: A native-space brain mask to reuse (sMRIPrep's desc-brain_mask): no brain extraction.
        anat_xfm: sMRIPrep's T1w-to-atlas-space composite transform: its affine part replaces the affine
            registration to the atlas.
        stop_on_first_crash: Raise instead of recording a failure (the BIDS App's --stop-on-first-crash).

    Returns:
        record: preprocess_record.json (status, error, output paths).
        preproc: Preprocessed image on the atlas grid, or None on failure.
        preproc_labels: Labels on the atlas grid, or None.
    """
    rec = cohort.preprocess_subject(subject, t1w, atlas, Path.cwd(), session=session, labels=labels,
                                    skull_stripped=skull_stripped, n4=n4, seed=seed, threads=threads,
                                    affine_method=affine_method, brain_mask=brain_mask, anat_xfm=anat_xfm,
                                    stop_on_first_crash=stop_on_first_crash)
    return File(rec.record_file), _file(rec.preproc), _file(rec.preproc_labels)


@python.define(outputs=["record", "warped", "warped_labels", "transform"])
@_method_docs
def RegisterSubject(
    atlas: File,
    method: str,
    subject: str = "",
    t1w: File | None = None,
    session: str = "",
    labels: File | None = None,
    preprocessed: File | None = None,
    preset: str | None = None,
    affine: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    model: str = "",
    affine_method: str = "fast",
    atlas_labels: File | None = None,
    stop_on_first_crash: bool = False,
) -> tuple[File, File | None, File | None, File | None]:
    """Register one subject with one method; failure becomes a status record
    (hdar_pipeline.pipeline.subject_steps.register_subject).

    Args:
        atlas: The atlas (fixed image).
        method: Registration method: {methods}.
        subject: Subject identifier (default: preprocessed's).
        t1w: The subject's T1w image (default: preprocessed's).
        session: Session identifier (default: preprocessed's).
        labels: Subject labels (native space), warped to the atlas (default: preprocessed's).
        preprocessed: PreprocessSubject's record: register the preprocessed image instead.
        preset: Method preset.
        affine: Run the affine stage (ignored with preprocessed input).
        seed: Random seed.
        threads: Worker threads.
        device: auto, cpu or cuda[:N].
        model: Identity of the method's trained model (HDAR: weights name and SHA-256, see
            hdar_pipeline.hdar.weights.weights_identity). Not read here: it is part of the cache key,
            so results cached with other weights are recomputed.
        affine_method: The affine stage: fast (PyTorch) or ants (ignored with preprocessed input).
        atlas_labels: Atlas labels, brought onto the native T1w by the inverse transform.
        stop_on_first_crash: Raise instead of recording a failure (the BIDS App's --stop-on-first-crash).

    Returns:
        record: register_record.json (status, error, paths, runtime).
        warped: The subject on the atlas grid, or None on failure.
        warped_labels: The subject labels on the atlas grid, or None.
        transform: ITK composite .h5 (atlas -> native subject), or None on failure.
    """
    rec = cohort.register_subject(subject, t1w, atlas, Path.cwd(), method=method, session=session, labels=labels,
                                  preprocessed=preprocessed, preset=preset, affine=affine, seed=seed,
                                  threads=threads, device=device, affine_method=affine_method,
                                  atlas_labels=atlas_labels, stop_on_first_crash=stop_on_first_crash)
    return File(rec.record_file), _file(rec.warped), _file(rec.warped_labels), _file(rec.transform)


@python.define(outputs=["record"])
def EvaluateSubject(
    record: File,
    atlas_labels: File | None = None,
    warped_labels: File | None = None,
    transform: File | None = None,
    label_table: File | None = None,
    distances: bool = True,
    stop_on_first_crash: bool = False,
) -> File:
    """Evaluate one subject x method; failure becomes a status record
    (hdar_pipeline.pipeline.subject_steps.evaluate_subject).

    Args:
        record: RegisterSubject's record.
        atlas_labels: Atlas labels; without them nothing is evaluated.
        warped_labels: RegisterSubject's warped labels.
        transform: RegisterSubject's transform.
        label_table: BIDS dseg.tsv or FreeSurfer LUT with the label names.
        distances: Compute surface distances.
        stop_on_first_crash: Raise instead of recording a failure (the BIDS App's --stop-on-first-crash).

    Returns:
        record: evaluate_record.json (status, error, metrics, per-label CSV path).
    """
    rec = cohort.evaluate_subject(record, Path.cwd(), atlas_labels=atlas_labels, warped_labels=warped_labels,
                                  transform=transform, label_table=label_table, distances=distances,
                                  stop_on_first_crash=stop_on_first_crash)
    return File(rec.record_file)


@python.define(outputs=["group_csv", "labels_csv", "n_failed"])
def CollectRecords(records: list[File]) -> tuple[File, File, int]:
    """Pool per-subject records into the tidy group tables (hdar_pipeline.pipeline.subject_steps.collect_records).

    Args:
        records: EvaluateSubject (or RegisterSubject) records, one per subject x method.

    Returns:
        group_csv: group.tsv (with group.json, its data dictionary, beside it): one row per subject x session x
            method (participant_id, session_id, status, error, runtime, mean metrics, QC flags).
        labels_csv: group_labels.tsv (and group_labels.json): one row per evaluated subject x session x method x
            label.
        n_failed: Number of subject x method rows whose status is not ok.
    """
    paths = cohort.collect_records(records, Path.cwd())
    return File(paths["group"]), File(paths["labels"]), cohort.count_failed(records)
