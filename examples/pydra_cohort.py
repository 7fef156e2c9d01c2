#!/usr/bin/env python
"""Register a cohort to an atlas with several methods: the Pydra cohort workflow, run from Python.

::

    python examples/pydra_cohort.py --atlas atlas_T1w.nii.gz --atlas-labels atlas_dseg.nii.gz \\
        --t1w sub-01_T1w.nii.gz sub-02_T1w.nii.gz --labels sub-01_dseg.nii.gz sub-02_dseg.nii.gz \\
        --methods syn demons -o cohort-out --n-procs 2 --threads 1

Builds :func:`hdar_pipeline.engine.init_cohort_wf` (register every subject x method, evaluate
against the atlas labels, collect the group tables), submits it with Pydra's
``Submitter(worker=..., cache_root=OUT/cache)``, copies the group tables to ``OUT/group.tsv`` (one row
per subject x method) and ``OUT/group_labels.tsv`` (per label), tab-separated with ``n/a`` for missing
values, and prints each method's mean Dice.
Pydra caches every step in ``OUT/cache``: a rerun with the same inputs returns at once, and adding a
method or a subject only runs what is new. A subject that fails (unreadable T1w ...) gets a row with
``status=error`` in the group table; the others complete.

``--worker slurm`` submits each step as an ``sbatch`` job (``--sbatch-args "-p short -t 60"``);
``OUT`` must then be on a filesystem the compute nodes see. ``--group-stats`` adds the paired tests
between methods (``hdar stats``). The same cohort as a BIDS dataset runs with ``hdar-pipeline``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from hdar_pipeline.apps.cli import non_negative_int, positive_int

os.environ.setdefault("NO_ET", "1")  # no telemetry look-ups (Pydra)


def subject_id(path: str) -> str:
    """``01`` from ``.../sub-01_T1w.nii.gz``; else the file name without its extensions."""
    stem = Path(path).name.split(".")[0]
    for part in stem.split("_"):
        if part.startswith("sub-"):
            return part[4:]
    return stem


def _path(value) -> Path:
    """A Pydra file output (a fileformats object) as a path."""
    return Path(value.fspath if hasattr(value, "fspath") else value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", required=True, type=Path, help="atlas (fixed) image")
    parser.add_argument("--atlas-labels", type=Path, default=None, help="atlas label map (evaluation)")
    parser.add_argument("--t1w", nargs="+", required=True, help="subject images")
    parser.add_argument("--labels", nargs="+", default=None, help="subject label maps, in the order of --t1w")
    parser.add_argument("--methods", nargs="+", default=["syn", "demons"], choices=["affine", "syn", "demons", "hdar"])
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (Pydra cache in OUT/cache)")
    parser.add_argument("--worker", default="cf", choices=["cf", "slurm"], help="Pydra worker (default cf)")
    parser.add_argument("--n-procs", type=positive_int, default=1, help="cf: parallel tasks (default 1)")
    parser.add_argument("--sbatch-args", default="", help="slurm: extra sbatch options")
    parser.add_argument("--threads", type=positive_int, default=None, help="threads per task")
    parser.add_argument("--seed", type=non_negative_int, default=1, help="random seed of every step (non-zero)")
    parser.add_argument("--group-stats", action="store_true", help="also run the group statistics")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.t1w):
        parser.error(f"{len(args.t1w)} T1w images but {len(args.labels)} label maps")
    subjects = [subject_id(p) for p in args.t1w]
    if len(set(subjects)) != len(subjects):
        parser.error(f"subject identifiers are not unique: {', '.join(subjects)}")

    from hdar_pipeline.evaluation.group_tables import read_group_table
    from pydra.engine.submitter import Submitter

    from hdar_pipeline.engine import init_cohort_wf

    # The factory's arguments become the workflow's input defaults (part of Pydra's cache key).
    CohortWf = init_cohort_wf(methods=args.methods, threads=args.threads, seed=args.seed,
                              group_stats=args.group_stats)
    wf = CohortWf(atlas=args.atlas.resolve(), atlas_labels=args.atlas_labels.resolve() if args.atlas_labels else None,
                  subjects=subjects, t1w=[Path(p).resolve() for p in args.t1w],
                  labels=[Path(p).resolve() for p in args.labels] if args.labels else None)

    cache_root = (args.output / "cache").resolve()
    cache_root.mkdir(parents=True, exist_ok=True)
    worker_kwargs = {"n_procs": args.n_procs} if args.worker == "cf" else {"sbatch_args": args.sbatch_args}
    with Submitter(worker=args.worker, cache_root=cache_root, **worker_kwargs) as submitter:
        result = submitter(wf)
    if result.errored:
        print(f"the workflow failed: {result}", file=sys.stderr)
        return 1

    # The results live in the Pydra cache; copy the group tables next to it.
    outputs = result.outputs
    # BIDS tables (.tsv); the workflow's outputs are the tables alone (their .json data dictionaries stay in the
    # collect task's folder of the cache): read_group_table then takes the ids as strings and infers the rest
    group_tsv = Path(shutil.copy(_path(outputs.group_csv), args.output / "group.tsv"))
    labels_tsv = Path(shutil.copy(_path(outputs.labels_csv), args.output / "group_labels.tsv"))
    print(f"group table (one row per subject x method): {group_tsv}")
    print(f"per-label table (one row per subject x method x label): {labels_tsv}")
    print(f"per-subject records (warped images, transforms): {len(outputs.records)} JSON files in {cache_root}")
    for f in outputs.stats_files or []:
        print(f"group statistics: {_path(f)}")

    group = read_group_table(group_tsv)  # participant_id as a string, flags as booleans
    ok = group[group["status"] == "ok"]
    for method in args.methods:
        rows = ok[ok["method"] == method]
        if "mean_dice" in rows and rows["mean_dice"].notna().any():
            print(f"{method}: mean Dice {rows['mean_dice'].mean():.3f} over {len(rows)} subject(s), "
                  f"median {rows['runtime_s'].median():.1f} s per subject")
        else:
            print(f"{method}: {len(rows)} subject(s) registered (nothing evaluated)")
    for r in group[group["status"] != "ok"].itertuples():
        print(f"{r.participant_id} {r.method} failed at {r.failed_step}: {r.error}")
    return 0 if outputs.n_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
