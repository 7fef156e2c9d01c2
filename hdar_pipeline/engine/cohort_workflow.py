"""Cohort-to-atlas workflow: every subject x every method, registered, evaluated and tabulated.

Only composes the tasks of :mod:`hdar_pipeline.engine.pydra_tasks`; no arrays are touched here.
"""

from __future__ import annotations

from typing import Sequence

from fileformats.generic import File
from pydra.compose import workflow

from hdar_pipeline.methods import model_identity
from hdar_pipeline.methods.registry import method_names
from hdar_pipeline.engine.pydra_tasks import (
    CollectRecords,
    EvaluateSubject,
    GroupStatistics,
    PreprocessSubject,
    RegisterSubject,
)

__all__ = ["init_cohort_wf"]


def init_cohort_wf(
    *,
    methods: Sequence[str],
    presets: dict[str, str] | None = None,
    preprocess: bool = False,
    skull_stripped: str = "auto",
    n4: bool = True,
    affine: bool = True,
    affine_method: str = "fast",
    group_stats: bool = False,
    reference: str | None = None,
    figures: bool = True,
    distances: bool = True,
    seed: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    stop_on_first_crash: bool = False,
    name: str = "cohort_wf",
):
    """Build the cohort workflow: register each subject to the atlas with each method, evaluate, tabulate.

    Workflow graph::

        [preprocess]  (optional; split over subjects)
             |
        register      split over subjects x methods
             |
        evaluate      against the atlas labels, when the subject has labels; combined over
             |        subjects x methods
        collect       the tidy group CSVs
             |
        [group_stats] (optional) summaries and paired tests between methods

    Failures are per subject: a subject whose step raises (unreadable or corrupt T1w, failed
    registration ...) gets a row with ``status="error"`` and the message in ``error`` in the group
    tables; every other subject completes (see :mod:`hdar_pipeline.pipeline.subject_steps`).

    Every argument below becomes the *default of an input* of the returned workflow, so it takes
    part in Pydra's cache key (a value captured in a closure would not: a changed argument would
    silently reuse the old cache). They can still be overridden per run.

    Parameters
    ----------
    methods : sequence of str
        Registration methods to run on every subject (``affine``, ``syn``, ``demons``, ``lccdemons``, ``fireants``,
        ``hdar``, ``voxelmorph``).
    presets : dict, optional
        Method -> preset (e.g. ``{"syn": "quality"}``); methods not listed use their default.
    preprocess : bool
        Run N4, brain extraction and the affine to the atlas first
        (:func:`hdar_pipeline.pipeline.preprocess.preprocess_t1w`); the deformable step then registers the
        preprocessed image and its transform is composed back to the native subject.
    skull_stripped : {"auto", "yes", "no"}
        Whether the T1w images are already skull-stripped (preprocessing only).
    n4 : bool
        N4 bias-field correction (preprocessing only).
    affine : bool
        Run the affine stage before a deformable method (without ``preprocess``).
    affine_method : {"fast", "ants"}
        The affine to the atlas in the preprocessing, or each method's affine stage without it
        (:func:`hdar_pipeline.methods.affine_stage`).
    group_stats : bool
        Add the group statistics step (:func:`hdar_pipeline.evaluation.stats.write_group_statistics`).
    reference : str, optional
        Reference method of the paired tests (default: ``hdar`` if run, else the first method).
    figures : bool
        Group figures (box plots, Dice versus runtime).
    distances : bool
        Surface distances in the evaluation (``hd95_mm`` ...).
    seed : int, optional
        Seed of every step (numpy, torch, ANTs); ``None`` leaves them unseeded. Use a non-zero seed
        for reproducible reruns: ANTs reads a seed of 0 as "seed from the clock".
    threads : int, optional
        Threads per task (ITK, torch); with the ``cf`` worker, ``n_procs x threads`` should not
        exceed the cores.
    device : str
        ``auto``, ``cpu`` or ``cuda[:N]`` (HDAR).
    stop_on_first_crash : bool
        Let a subject's failure stop the workflow (the BIDS App's ``--stop-on-first-crash``) instead of recording
        it and going on.
    name : str
        Name of the workflow class.

    Returns
    -------
    type
        A Pydra workflow definition (a class). Instantiate it with the data and run it::

            wf = init_cohort_wf(methods=["syn", "demons"])(
                atlas="atlas_T1w.nii.gz", atlas_labels="atlas_dseg.nii.gz",
                subjects=["01", "02"], t1w=["sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"],
                labels=["sub-01_dseg.nii.gz", "sub-02_dseg.nii.gz"])
            with Submitter(worker="cf", cache_root="work") as sub:
                result = sub(wf)
            result.outputs.group_csv

    Inputs
    ------
    atlas : File
        The atlas (fixed) image; every output lies on its grid.
    subjects : list of str
        Subject labels (``01``, not ``sub-01``), one per T1w image.
    t1w : list of File or None
        One T1w image per subject (``None`` for a subject without one: it fails alone).
    labels : list of File or None, optional
        One label map per subject (``None`` where absent); absent altogether: nothing is evaluated.
    sessions : list of str, optional
        One session label per subject (``""`` for none).
    atlas_labels : File, optional
        The atlas labels; without them nothing is evaluated (registration still runs).
    label_table : File, optional
        BIDS ``dseg.tsv`` or FreeSurfer LUT with the label names.
    brain_masks, anat_xfms : list of File or None, optional
        Per subject, derivatives to reuse in the preprocessing (the BIDS App's ``--derivatives``): a native-space
        brain mask that replaces brain extraction, and an ITK composite transform to the atlas space whose affine
        part replaces the affine registration (:func:`hdar_pipeline.pipeline.subject_steps.preprocess_files`); ``None`` where
        absent.
    methods, presets, preprocess, skull_stripped, n4, affine, affine_method, reference, figures, distances, seed,
    threads, device, stop_on_first_crash
        As above (defaults from the factory).
    models : dict of str
        Method -> identity of its trained model (default, from the factory:
        :func:`hdar_pipeline.methods.model_identity`, i.e. the shipped HDAR weights' SHA-256). It is part
        of each registration's cache key, so a cache made with other weights is not reused.

    Outputs
    -------
    group_csv : File
        ``group.tsv`` (BIDS tabular, ``n/a`` for missing values; its ``group.json`` data dictionary stays in the
        collect task's folder, so :func:`hdar_pipeline.evaluation.group_tables.read_group_table` reads this copy with the
        ids as strings and the other types inferred): one row per subject x session x method:
        ``participant_id``, ``session_id``, ``method``, ``preset``, ``status``, ``error``, ``failed_step``,
        ``runtime_s``, ``peak_memory_mb``, ``device``, ``evaluated``, ``folded_percent``, the evaluation
        summary (``mean_dice`` ...) and the QC flags.
    labels_csv : File
        ``group_labels.tsv``: one row per evaluated subject x session x method x label (the
        input of the group statistics).
    records : list of File
        The per-subject x method JSON records (paths of the warped images, transforms, metrics).
    n_failed : int
        Subject x method combinations whose status is not ``ok``.
    stats_files : list of File
        Group statistics CSVs and figures (empty list without ``group_stats``).
    """
    methods = [str(m) for m in methods]
    if not methods:
        raise ValueError("init_cohort_wf needs at least one method")
    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    default_presets = dict(presets or {})
    default_reference = reference or ("hdar" if "hdar" in methods else methods[0])
    default_models = {m: model_identity(m) for m in methods}

    @workflow.define(outputs=["group_csv", "labels_csv", "records", "n_failed", "stats_files"])
    def CohortWorkflow(
        atlas: File,
        subjects: list[str],
        t1w: list[File | None],
        labels: list[File | None] | None = None,
        sessions: list[str] | None = None,
        atlas_labels: File | None = None,
        label_table: File | None = None,
        brain_masks: list[File | None] | None = None,
        anat_xfms: list[File | None] | None = None,
        methods: list[str] = methods,
        presets: dict[str, str] = default_presets,
        preprocess: bool = preprocess,
        skull_stripped: str = skull_stripped,
        n4: bool = n4,
        affine: bool = affine,
        affine_method: str = affine_method,
        group_stats: bool = group_stats,
        reference: str = default_reference,
        figures: bool = figures,
        distances: bool = distances,
        seed: int | None = seed,
        threads: int | None = threads,
        device: str = device,
        stop_on_first_crash: bool = stop_on_first_crash,
        models: dict[str, str] = default_models,
    ) -> tuple[File, File, list[File], int, list[File]]:
        n = len(subjects)
        if len(t1w) != n:
            raise ValueError(f"{n} subjects but {len(t1w)} T1w images")
        labels = list(labels) if labels is not None else [None] * n
        sessions = list(sessions) if sessions is not None else [""] * n
        if len(labels) != n or len(sessions) != n:
            raise ValueError(f"{n} subjects but {len(labels)} label maps and {len(sessions)} sessions")
        brain_masks = list(brain_masks) if brain_masks is not None else [None] * n
        anat_xfms = list(anat_xfms) if anat_xfms is not None else [None] * n
        if len(brain_masks) != n or len(anat_xfms) != n:
            raise ValueError(f"{n} subjects but {len(brain_masks)} brain masks and {len(anat_xfms)} transforms")
        method_list = list(methods)
        preset_list = [presets.get(m) for m in method_list]
        model_list = [models[m] if m in models else model_identity(m) for m in method_list]

        if preprocess:
            prep = workflow.add(
                PreprocessSubject(atlas=atlas, skull_stripped=skull_stripped, n4=n4, seed=seed, threads=threads,
                                  affine_method=affine_method, stop_on_first_crash=stop_on_first_crash)
                .split(("subject", "session", "t1w", "labels", "brain_mask", "anat_xfm"), subject=subjects,
                       session=sessions, t1w=t1w, labels=labels, brain_mask=brain_masks, anat_xfm=anat_xfms),
                name="preprocess")
            register = workflow.add(
                RegisterSubject(atlas=atlas, atlas_labels=atlas_labels, preprocessed=prep.record,
                                affine=False, seed=seed, threads=threads, device=device,
                                stop_on_first_crash=stop_on_first_crash)
                .split(("method", "preset", "model"), method=method_list, preset=preset_list, model=model_list),
                name="register")
            subject_state = "preprocess.subject"
        else:
            register = workflow.add(
                RegisterSubject(atlas=atlas, atlas_labels=atlas_labels, affine=affine, affine_method=affine_method,
                                seed=seed, threads=threads, device=device, stop_on_first_crash=stop_on_first_crash)
                .split([("subject", "session", "t1w", "labels"), ("method", "preset", "model")], subject=subjects,
                       session=sessions, t1w=t1w, labels=labels, method=method_list, preset=preset_list,
                       model=model_list),
                name="register")
            subject_state = "register.subject"

        evaluate = workflow.add(
            EvaluateSubject(record=register.record, atlas_labels=atlas_labels, warped_labels=register.warped_labels,
                            transform=register.transform, label_table=label_table, distances=distances,
                            stop_on_first_crash=stop_on_first_crash)
            .combine([subject_state, "register.method"]),
            name="evaluate")
        collect = workflow.add(CollectRecords(records=evaluate.record), name="collect")
        if group_stats:
            stats = workflow.add(GroupStatistics(tables=collect.labels_csv, reference=reference, figures=figures,
                                                   group=collect.group_csv),
                                 name="group_stats")
            stats_files = stats.files
        else:
            stats_files = []
        return collect.group_csv, collect.labels_csv, evaluate.record, collect.n_failed, stats_files

    CohortWorkflow.__name__ = CohortWorkflow.__qualname__ = name
    return CohortWorkflow
