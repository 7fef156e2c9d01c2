"""``hdar demo``: the BIDS App, participant then group level, on a synthetic cohort it writes first.

No network: the atlas is the MNI template the ``nilearn`` wheel ships (2 mm, six tissue labels) and
the subjects are made from it (:func:`hdar_pipeline.apps.demo_dataset.write_demo_dataset`). The cohort is
synthetic: it shows the tool working end to end; it is not a benchmark.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hdar_pipeline.apps.demo_dataset import write_demo_dataset

from hdar_pipeline.apps.bids_app import EXIT_OK, AppOptions, run

DEFAULT_METHODS = ("hdar", "syn", "demons")


def available_methods(methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """``methods`` split into those that can run here and notes on those left out (the learned methods, HDAR and
    VoxelMorph, without their shipped weights)."""
    from hdar_pipeline.methods.registry import specs_by_name

    specs = specs_by_name()
    keep, notes = [], []
    for m in methods:
        if m in specs and specs[m].learned:
            from hdar_pipeline.hdar.weights import NoWeightsError, resolve_weights

            try:
                resolve_weights(specs[m].default_weights)
            except NoWeightsError as exc:
                notes.append(f"{m} left out: {exc}")
                continue
        keep.append(m)
    return keep, notes


def run_demo(out_dir: str | os.PathLike = "hdar-demo", *, n_subjects: int = 3,
             methods: Sequence[str] = DEFAULT_METHODS, seed: int = 0, nprocs: int | None = None,
             omp_nthreads: int | None = None, progress: bool = True, verbose: int = 0) -> dict[str, Path]:
    """Write the demo cohort, run the participant and group levels, return the main output paths.

    Layout of ``out_dir``: ``rawdata/`` (BIDS), ``labels/`` (labels derivatives), ``work/`` (the
    Pydra cache; a rerun resumes), ``derivatives/hdar-pipeline/`` (the app's outputs).

    Returns
    -------
    dict
        ``group_tsv`` (``group/group.tsv``), ``labels_tsv`` (``group/group_labels.tsv``), ``group_html``
        (``group/group.html``), ``reports`` (first subject's HTML), ``derivatives``,
        ``citation`` (``logs/CITATION.md``), ``rawdata``, ``labels``.

    Raises
    ------
    InputError
        ``out_dir`` is a file or cannot be written (before anything is written).
    RuntimeError
        When a level ends with an error exit code other than "some subjects failed".
    """
    from hdar_pipeline.core.input_guard import InputGuard

    out = InputGuard().output_folder(out_dir, "-o/--output", writes=("rawdata", "labels", "work", "derivatives"))
    methods, notes = available_methods(methods)
    for note in notes:
        print(f"hdar demo: {note}")
    if not methods:
        raise RuntimeError("no method left to run")
    raw, labels = write_demo_dataset(out, n_subjects=n_subjects, seed=seed)
    deriv = out / "derivatives" / "hdar-pipeline"
    common = dict(bids_dir=raw, output_dir=deriv, labels_dir=labels, work_dir=out / "work",
                  methods=list(methods), atlas_resolution=2.0, seed=seed + 1, nprocs=nprocs,
                  omp_nthreads=omp_nthreads, progress=progress, verbose=verbose)
    for level in ("participant", "group"):
        code = run(AppOptions(analysis_level=level, **common))
        if code not in (EXIT_OK, 3):
            raise RuntimeError(f"the {level} level ended with exit code {code}; see {deriv / 'logs'}")
    return {"group_tsv": deriv / "group" / "group.tsv", "labels_tsv": deriv / "group" / "group_labels.tsv",
            "group_html": deriv / "group" / "group.html",
            "reports": deriv / "sub-01.html", "derivatives": deriv, "citation": deriv / "logs" / "CITATION.md",
            "rawdata": raw, "labels": labels}


__all__ = ["DEFAULT_METHODS", "available_methods", "run_demo"]
