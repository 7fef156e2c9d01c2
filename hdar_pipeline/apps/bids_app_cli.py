"""The ``hdar-pipeline`` command: the BIDS App's command line (BIDS App conventions: ``BIDS_DIR OUTPUT_DIR
LEVEL``) and its entry point; the run itself is :mod:`hdar_pipeline.apps.bids_app`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from hdar_pipeline._version import __version__
from hdar_pipeline.apps.cli import (_Parser, non_negative_float, non_negative_int, one_line, positive_float,
      positive_int)
from hdar_pipeline.methods.registry import method_names, specs_with_presets


class _AppHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where a default says nothing: flags (``--no-n4``,
    ``--boilerplate-only``, ``-v``: a store_true/store_false/count action takes no value, so "(default: True)"
    would only confuse), and defaults that are ``None`` or empty (the help text says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default in (None, [], "") or "default" in (action.help or "").lower():
            return action.help or ""
        return super()._get_help_string(action)


class _SkullStripAction(argparse.Action):
    """``--skull-strip-t1w {auto,skip,force}`` (fMRIPrep's words) stored in the ``--skull-stripped`` vocabulary
    (``auto``/``yes``/``no``) that the library takes: skip = the T1w is already skull-stripped (``yes``), force =
    always run brain extraction (``no``: treated as a head). The deprecated ``--skull-stripped`` (same dest) is
    stored as given, with a warning on stderr."""

    FMRIPREP = {"auto": "auto", "skip": "yes", "force": "no"}

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        if option_string == "--skull-stripped":
            instead = {v: k for k, v in self.FMRIPREP.items()}[values]
            print(f"{parser.prog}: warning: --skull-stripped is deprecated; use --skull-strip-t1w {instead}",
                  file=sys.stderr)
            setattr(namespace, self.dest, values)
        else:
            setattr(namespace, self.dest, self.FMRIPREP[values])


def build_bids_app_parser() -> argparse.ArgumentParser:
    """The ``hdar-pipeline`` command line (BIDS App conventions: BIDS_DIR OUTPUT_DIR LEVEL).

    Every option has a help text, and ``--help`` shows each option's default except for flags and empty
    defaults (:class:`_AppHelpFormatter`); ``tests/apps/test_bids_app_conventions.py`` holds both.
    """
    p = _Parser(
        prog="hdar-pipeline",
        description="Register every subject of a BIDS dataset to an atlas with HDAR, ANTs SyN and Demons, "
                    "evaluate label overlap, and write BIDS derivatives, reports and group statistics.",
        formatter_class=_AppHelpFormatter)
    p.add_argument("bids_dir", help="the BIDS dataset (read only: nothing is ever written into it)")
    p.add_argument("output_dir", help="the derivatives folder (outside BIDS_DIR)")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="participant: register each subject and write its derivatives and report; group: pool "
                        "the participant-level metrics into group tables, statistics and figures")
    p.add_argument("--version", action="version", version=f"hdar-pipeline {__version__}")
    g = p.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
                   help="subjects to process (with or without sub-); all by default")
    g.add_argument("--session-label", nargs="+", default=[], metavar="LABEL", help="sessions to process")
    g.add_argument("--bids-filter-file", default=None, metavar="FILE",
                   help='JSON selecting the T1w images, e.g. {"t1w": {"acquisition": "mprage"}}')
    g.add_argument("--labels-dir", default=None, metavar="DIR",
                   help="derivatives dataset with each subject's *_dseg.nii.gz in T1w space (for evaluation)")
    g.add_argument("--skip-bids-validation", action="store_true", help="do not validate BIDS_DIR")
    g.add_argument("--derivatives", action="extend", nargs="+", default=[], metavar="DIR",
                   help="sMRIPrep/fMRIPrep derivatives to reuse (may be given more than once): a subject's "
                        "native-space sub-<l>[_ses-<s>]_desc-brain_mask.nii.gz replaces brain extraction, and "
                        "the affine part of its sub-<l>_from-T1w_to-<SPACE>_mode-image_xfm.h5 replaces the "
                        "affine to the atlas when SPACE is the atlas's space name")
    g = p.add_argument_group("atlas (default: the embedded MNI ICBM152 2009a template with tissue labels)")
    g.add_argument("--atlas", default=None, metavar="T1W", help="atlas image (skull-stripped)")
    g.add_argument("--atlas-labels", default=None, metavar="DSEG", help="atlas label map")
    g.add_argument("--atlas-participant", default=None, metavar="LABEL",
                   help="use this participant of BIDS_DIR as the atlas (labels from --labels-dir); it is "
                        "left out of the cohort")
    g.add_argument("--atlas-space", default=None, metavar="NAME",
                   help="name of the atlas in output file names (space-NAME); default from the atlas")
    g.add_argument("--atlas-resolution", type=positive_float, default=1.0, metavar="MM",
                   help="voxel size of the embedded template")
    g = p.add_argument_group("registration")
    g.add_argument("--methods", nargs="+", default=["hdar", "syn", "demons"], choices=method_names(),
                   help="registration methods run on every subject")
    for spec in specs_with_presets():  # --<method>-preset, AppOptions' <method>_preset
        g.add_argument(f"--{spec.name}-preset", choices=list(spec.presets), default=spec.default_preset,
                       help=spec.preset_help())
    g.add_argument("--no-preprocess", dest="preprocess", action="store_false",
                   help="skip N4, brain extraction and the affine to the atlas (the affine stage of each "
                        "method still runs)")
    g.add_argument("--no-affine", dest="affine", action="store_false",
                   help="with --no-preprocess: also skip each method's affine stage (the T1w images are already "
                        "affinely aligned on the atlas grid, as LPBA40's delineation space is)")
    g.add_argument("--skull-strip-t1w", dest="skull_stripped", action=_SkullStripAction,
                   choices=["auto", "skip", "force"], default="auto",
                   help="brain extraction of the T1w images (fMRIPrep's option): force = always run it, skip = the "
                        "images are already skull-stripped, auto = detect each image (a zeroed background around a "
                        "brain-sized foreground)")
    g.add_argument("--skull-stripped", dest="skull_stripped", action=_SkullStripAction,
                   choices=["auto", "yes", "no"], default=argparse.SUPPRESS,
                   help="deprecated: use --skull-strip-t1w (yes = skip, no = force)")
    g.add_argument("--no-n4", dest="n4", action="store_false", help="skip N4 bias-field correction")
    g.add_argument("--affine-method", choices=["fast", "ants"], default="fast",
                   help="the affine to the atlas (and each method's affine stage with --no-preprocess): fast "
                        "(PyTorch, local NCC) or ants (antsRegistration, Mattes MI)")
    g.add_argument("--random-seed", "--seed", dest="seed", type=non_negative_int, default=None,
                   help="seeds numpy, torch and ANTs (--seed is the same option)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (HDAR, VoxelMorph, LCC-Demons, FireANTs)")
    g = p.add_argument_group("resources and execution")
    g.add_argument("--nprocs", "--n-cpus", type=positive_int, default=None,
                   help="parallel jobs (cf worker); default: the cores this process may use, at most one per "
                        "subject x method")
    g.add_argument("--omp-nthreads", type=positive_int, default=None, help="threads per job; default cores / nprocs")
    g.add_argument("--mem-mb", "--mem_mb", dest="mem_mb", type=positive_int, default=None, metavar="MB",
                   help="memory the run may use (MB): caps the parallel jobs (cf worker) at MB over an estimate "
                        "of one job's peak; with --worker slurm, each job's sbatch --mem unless --slurm-args "
                        "sets it; no limit by default")
    g.add_argument("-w", "--work-dir", default="work", help="Pydra cache: a rerun resumes and skips finished work")
    g.add_argument("--worker", choices=["cf", "slurm"], default="cf",
                   help="cf: processes on this machine; slurm: one sbatch job per step (a job SLURM cancels, "
                        "times out or preempts is requeued once, then recorded as failed)")
    g.add_argument("--slurm-args", default="", help='extra sbatch arguments, e.g. "--partition=cpu --mem=8G"')
    g.add_argument("--stop-on-first-crash", action="store_true",
                   help="stop at the first failed subject instead of reporting it and going on")
    g.add_argument("--reports-only", action="store_true", help="only regenerate the HTML reports from OUTPUT_DIR")
    g.add_argument("--boilerplate-only", "--boilerplate_only", dest="boilerplate_only", action="store_true",
                   help="only write the methods text (OUTPUT_DIR/logs/CITATION.md and .html) for these options, "
                        "and exit: nothing is registered and no work folder is created")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv: debug)")
    g = p.add_argument_group("group level")
    g.add_argument("--reference", default=None, metavar="METHOD",
                   help="the method every other method is compared with in the group's paired tests (default: "
                        "hdar when it has results, else the first method in alphabetical order); an error when "
                        "METHOD has no results")
    g.add_argument("--qc-folding-threshold", type=non_negative_float, default=0.1, metavar="PERCENT",
                   help="group.tsv's qc_folding flag is set when more than PERCENT %% of the brain's voxels fold "
                        "(Jacobian determinant <= 0)")
    return p


def bids_app_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hdar-pipeline`` (see :mod:`hdar_pipeline.apps.bids_app`)."""
    from pathlib import Path

    args = build_bids_app_parser().parse_args(argv)
    os.environ.setdefault("NO_ET", "1")  # Pydra: no telemetry look-ups
    if args.analysis_level == "participant" and args.worker == "cf" and not args.boilerplate_only:
        from hdar_pipeline.pipeline.isolation import start_fork_server

        start_fork_server()  # the jobs' process server imports torch and ANTs while this one imports the rest
    from hdar_pipeline.bids_io.inputs import BIDSError

    try:
        from hdar_pipeline.apps.bids_app import AppOptions, run
    except ImportError as exc:
        print(f"hdar-pipeline: error: the BIDS App needs the workflow extras "
              f"(pip install 'hdar-pipeline[workflows]'): {exc}", file=sys.stderr)
        return 2
    paths = {k: Path(getattr(args, k)) if getattr(args, k) is not None else None
             for k in ("bids_dir", "output_dir", "bids_filter_file", "atlas", "atlas_labels", "labels_dir",
                       "work_dir")}
    paths["derivatives"] = [Path(d) for d in args.derivatives]
    opts = AppOptions(**{**vars(args), **paths})
    from hdar_pipeline.core.input_guard import InputError
    from hdar_pipeline.core.images import ImageError

    try:
        return run(opts, argv)  # the command line heads the log and goes to logs/*_command.json
    except (BIDSError, InputError, ImageError, FileNotFoundError) as exc:
        print(f"hdar-pipeline: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(bids_app_main())
