"""Command-line entry points: the ``hdar`` toolbox and the ``hdar-pipeline`` BIDS App.

Each ``hdar`` subcommand is added by one ``_add_<name>(subparsers)`` function below, which sets
``func`` to the function that runs it. Subcommands import their heavy modules lazily so that
``hdar --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from hdar_pipeline._version import __version__


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line (exit 2): the command, the argument and the problem."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(exc: BaseException, limit: int = 600) -> str:
    """An error message on one line: whitespace (the line breaks of ITK's messages) collapsed, and cut at
    ``limit`` characters; the file and the problem come first in every message of this package."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _integer_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, refused in one line naming ``what`` it must be."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


#: argparse type: an integer >= 1 (threads, processes, counts)
positive_int = _integer_at_least(1, "a positive integer")
#: argparse type: an integer >= 0 (seeds, step counts)
non_negative_int = _integer_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (voxel sizes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _add_register(sub: argparse._SubParsersAction) -> None:
    from hdar_pipeline.methods.registry import DEFAULT_METHOD, method_names, presets_help

    p = sub.add_parser(
        "register", help="register one moving image to a fixed image",
        description="Register MOVING onto FIXED and write the warped image, the warped labels, ITK "
                    "transform files that ants.apply_transforms re-applies, and registration.json.")
    p.add_argument("fixed", help="fixed (atlas) image: NIfTI, MGZ or Analyze")
    p.add_argument("moving", help="moving (subject) image")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("--method", choices=method_names(), default=DEFAULT_METHOD,
                   help=f"registration method (default {DEFAULT_METHOD}, the best measured)")
    p.add_argument("--preset", default=None, help=presets_help())
    p.add_argument("--moving-labels", default=None, help="label map on the moving grid, warped with nearest neighbour")
    p.add_argument("--fixed-mask", default=None, help="mask on the fixed grid restricting the metric")
    p.add_argument("--inverse", action="store_true",
                   help="also write inverse.h5: the inverse transform (moving points -> fixed points) on the moving "
                        "image's grid, with its inverse consistency in registration.json")
    p.add_argument("--fixed-labels", default=None,
                   help="with --inverse: a label map on the fixed grid brought onto the moving grid by the inverse "
                        "(fixed_labels_native.nii.gz, nearest neighbour)")
    p.add_argument("--affine", dest="affine", action="store_true", default=True,
                   help="run the affine stage first (default)")
    p.add_argument("--no-affine", dest="affine", action="store_false",
                   help="skip the affine stage (inputs already affinely aligned on the same grid)")
    p.add_argument("--affine-method", choices=["fast", "ants"], default="fast",
                   help="the affine stage: fast (PyTorch, local NCC, rigid then affine, coarse to fine) or ants "
                        "(antsRegistration rigid then affine, Mattes MI; about six times slower at 1 mm)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="do not rescale intensities to [0, 1] before registering")
    p.add_argument("--seed", type=non_negative_int, default=None, help="seeds numpy, torch and ANTs (ANTS_RANDOM_SEED)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (ITK, torch)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (HDAR, VoxelMorph, LCC-Demons and FireANTs)")
    p.add_argument("--weights", default=None,
                   help="HDAR or VoxelMorph weights: a shipped name (default: default for hdar, voxelmorph for "
                        "voxelmorph) or an exported .pt with its model card beside it")
    p.add_argument("--refine", type=non_negative_int, default=None, metavar="N",
                   help="HDAR, VoxelMorph: N instance-optimisation steps on each refinement level after the network "
                        "(default: the preset's, hdar 25 for refined, 30 for accurate, 0 for fast and full; voxelmorph "
                        "30 for refined, 0 for fast)")
    p.add_argument("--refine-levels", type=positive_float, nargs="+", default=None, metavar="S",
                   help="HDAR, VoxelMorph: resolutions of the refinement levels relative to the image, coarse to fine "
                        "(default 0.25 0.5); --refine steps run on each")
    p.add_argument("--refine-similarity", choices=("full", "level"), default=None,
                   help="HDAR, VoxelMorph: the finest refinement level's loss: 'full' (default) the local NCC of the "
                        "full-resolution images, linearised around the warp; 'level' the images downsampled "
                        "to that level")
    p.add_argument("--refine-additive", dest="refine_diffeomorphic", action="store_false", default=None,
                   help="HDAR, VoxelMorph: add the refinement's corrections (u + c) instead of composing "
                        "diffeomorphic ones (u o exp(v), the default); faster, may fold")
    p.add_argument("--no-prealign", dest="prealign", action="store_false", default=None,
                   help="HDAR, VoxelMorph: skip the affine pre-alignment before the network")
    p.set_defaults(func=_run_register)


def _method_options(args: argparse.Namespace) -> dict | None:
    options = {k: getattr(args, k) for k in ("weights", "refine", "refine_levels", "refine_similarity", "prealign",
                                            "refine_diffeomorphic")
               if getattr(args, k, None) is not None}
    if "refine_levels" in options:
        options["refine_levels"] = tuple(options["refine_levels"])
    from hdar_pipeline.methods.registry import method_specs

    learned = [s.name for s in method_specs() if s.learned]
    if options and args.method not in learned:
        raise ValueError(f"--{' and --'.join(k.replace('_', '-') for k in options)} only apply to --method "
                         f"{' and '.join(learned)}")
    return options or None


def _run_register(args: argparse.Namespace) -> int:
    from hdar_pipeline.core.runtime import configure_threads

    configure_threads(args.threads)  # before ITK starts
    from hdar_pipeline.core.images import ImageError
    from hdar_pipeline.pipeline.registration import register_files

    try:
        record = register_files(args.fixed, args.moving, args.output, method=args.method, preset=args.preset,
                                moving_labels=args.moving_labels, fixed_mask=args.fixed_mask,
                                affine=args.affine, affine_method=args.affine_method, seed=args.seed,
                                threads=args.threads, device=args.device,
                                normalize=args.normalize, method_options=_method_options(args),
                                inverse_on=args.moving if args.inverse or args.fixed_labels else None,
                                fixed_labels=args.fixed_labels)
    except (ImageError, ValueError, NotImplementedError, OSError) as exc:
        print(f"hdar register: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"{record['method']} ({record.get('preset') or 'default'}): {record['runtime_s']:.1f} s, "
          f"peak {record['peak_memory_mb']:.0f} MiB, folded {record['jacobian']['folded_percent_mask']:.4f} % of the "
          f"fixed brain's voxels ({record['jacobian']['folded_percent_grid']:.4f} % of the grid)")
    print(f"wrote {args.output}/registration.json; transforms (ants.apply_transforms order): "
          f"{', '.join(record['transforms'])}")
    if "inverse" in record:
        c = record["inverse"]["consistency_mm"]
        print(f"inverse.h5 (moving -> fixed, {record['inverse']['source']}): consistent to {c['mean_mm']:.3f} mm on "
              f"average (99th percentile {c['p99_mm']:.3f} mm) over the fixed brain")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from hdar_pipeline.methods.registry import method_names

    p = sub.add_parser("demo", help="run the BIDS App on an embedded synthetic cohort (no network)",
                       description="Write a small synthetic BIDS cohort (made from the MNI152 template nilearn "
                                   "ships), run the hdar-pipeline participant and group levels on it, and print "
                                   "the paths of the group table (TSV) and the reports. The cohort is synthetic: it "
                                   "shows the tool working, it is no benchmark.")
    p.add_argument("-o", "--output", default="hdar-demo", help="output folder (default ./hdar-demo)")
    p.add_argument("--subjects", type=positive_int, default=3, help="number of synthetic subjects (default 3)")
    p.add_argument("--methods", nargs="+", default=["hdar", "syn", "demons"],
                   choices=method_names(),
                   help="methods (default hdar syn demons; hdar and voxelmorph are left out, with a note, when their "
                        "weights do not ship)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--nprocs", type=positive_int, default=None, help="parallel jobs (default: all cores)")
    p.add_argument("--threads", type=positive_int, default=None, help="threads per job (default: cores / nprocs)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("NO_ET", "1")
    try:
        from hdar_pipeline.apps.demo import run_demo
    except ImportError as exc:
        print(f"hdar demo: error: the demo runs the BIDS App, which needs the workflow extras "
              f"(pip install 'hdar-pipeline[workflows]'): {exc}", file=sys.stderr)
        return 2
    import pandas as pd

    from hdar_pipeline.core.input_guard import InputError

    try:
        paths = run_demo(args.output, n_subjects=args.subjects, methods=args.methods, seed=args.seed,
                         nprocs=args.nprocs, omp_nthreads=args.threads, progress=args.progress)
    except InputError as exc:
        print(f"hdar demo: error: {one_line(exc)}", file=sys.stderr)
        return 2
    from hdar_pipeline.evaluation.group_tables import read_group_table

    group = read_group_table(paths["group_tsv"])
    cols = [c for c in ("mean_dice", "mean_target_overlap", "folded_percent", "runtime_s") if c in group]
    ok = group[group["status"] == "ok"]
    if len(ok):
        print(ok.groupby("method")[cols].mean().round(3).to_string())
    failed = int((group["status"] != "ok").sum())
    if failed:
        print(f"{failed} subject x method row(s) failed; see the 'error' column", file=sys.stderr)
    print("The demo cohort is synthetic (the MNI template deformed at random); see README for a real dataset.")
    print(f"group table: {paths['group_tsv']}")
    print(f"report: {paths['reports']}")
    # the BIDS App's code for "finished, some subjects failed": a demo with a failed row is not a working demo
    return 3 if failed else 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="label overlap and surface distances of warped labels (and a transform's Jacobian)",
        description="Compare LABELS (e.g. a method's warped labels) with REFERENCE_LABELS on the same grid and "
                    "write one row per label: Klein 2009 overlap measures, HD95 and mean surface distance (mm). "
                    "With --transform, also write Jacobian determinant statistics (OUT_jacobian.csv) and a "
                    "Jacobian slice figure; OUT_summary.csv holds the means over labels.")
    p.add_argument("reference_labels", help="reference (target) label map; its grid is the fixed grid")
    p.add_argument("labels", help="label map to evaluate (source), on the reference grid")
    p.add_argument("-o", "--output", required=True, help="output CSV (OUT.csv; .tsv writes tab-separated)")
    p.add_argument("--label-table", default=None, help="label names: BIDS dseg.tsv (index, name) or FreeSurfer LUT")
    p.add_argument("--transform", nargs="+", default=None,
                   help="transform files in ants.apply_transforms order (fixed grid = reference labels' grid)")
    p.add_argument("--mask", default=None,
                   help="mask on the reference grid for the Jacobian statistics (default: reference labels > 0)")
    p.add_argument("--subject", default=None, help="adds a subject column (tidy tables for `hdar stats`)")
    p.add_argument("--session", default=None, help="adds a session column")
    p.add_argument("--method", default=None, help="adds a method column")
    p.add_argument("--record", default=None,
                   help="registration.json of the method: adds its runtime_s and peak_memory_mb columns")
    p.add_argument("--no-distances", dest="distances", action="store_false",
                   help="skip the surface distances (hd95_mm, msd_mm, hd_mm are left empty)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="do not draw the Jacobian figure")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from hdar_pipeline.evaluation.evaluate import evaluate_files, read_registration_record
    from hdar_pipeline.core.images import ImageError
    from hdar_pipeline.core.labels import LabelTableError

    ids = {k: getattr(args, k) for k in ("subject", "session", "method") if getattr(args, k) is not None}
    try:
        extra = read_registration_record(args.record) if args.record else None
        if extra:
            extra.pop("device", None)
        result, written = evaluate_files(args.reference_labels, args.labels, args.output, transform=args.transform,
                                         mask=args.mask, label_table=args.label_table, ids=ids, extra=extra,
                                         distances=args.distances, figures=args.figures,
                                         other_inputs={"--record": args.record})
    except (ImageError, LabelTableError, ValueError, OSError) as exc:
        print(f"hdar evaluate: error: {one_line(exc)}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"hdar evaluate: warning: {note}", file=sys.stderr)
    s = result.summary.iloc[0]
    print(f"{int(s['n_labels_evaluated'])} of {int(s['n_labels'])} labels evaluated: mean Dice {s['mean_dice']:.4f}, "
          f"target overlap {s['mean_target_overlap']:.4f}, HD95 {s['mean_hd95_mm']:.2f} mm "
          f"({result.runtime_s:.1f} s)")
    if result.jacobian is not None:
        j = result.jacobian.iloc[0]
        print(f"Jacobian: folded {j['folded_percent']:.4f} % (in mask {j['folded_percent_mask']:.4f} %), "
              f"std log|J| {j['log_jacobian_std']:.4f}, min {j['jacobian_min']:.4f}, max {j['jacobian_max']:.4f}")
    for value in written.values():
        for path in (value if isinstance(value, list) else [value]):
            print(path)
    return 0


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats", help="group statistics, paired tests and figures from tidy evaluation tables",
        description="Pool tidy per-subject tables (columns subject, [session], method, label, metrics; rows with "
                    "a status other than 'ok' are reported, not used) and write summary, per-label, paired-test "
                    "and ranking CSVs plus figures into OUTDIR.")
    p.add_argument("tables", nargs="+", help="tidy CSV/TSV tables (e.g. from `hdar evaluate --subject ... --method ...`)")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("--reference", default="hdar", help="method the others are compared with (default hdar)")
    p.add_argument("--figure-metrics", nargs="+", default=["dice"],
                   help="metrics drawn as per-label and per-method box plots (default dice)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="write the CSVs only")
    p.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from hdar_pipeline.evaluation.stats import StatsError, write_group_statistics

    try:
        result, written = write_group_statistics(args.tables, args.output, reference=args.reference,
                                                 figures=args.figures, figure_metrics=args.figure_metrics)
    except (StatsError, ValueError, OSError) as exc:
        print(f"hdar stats: error: {one_line(exc)}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"hdar stats: note: {note}", file=sys.stderr)
    n = result.subjects.groupby("method").size() if len(result.subjects) else {}
    print("methods: " + ", ".join(f"{m} ({int(n[m]) if m in n else 0} subjects)" for m in result.methods)
          + f"; reference {result.reference}")
    for path in written:
        print(path)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the HDAR cascade stage by stage (S1, then S2, then S3), or VoxelMorph",
        description="Train HDAR (or, with --network voxelmorph, VoxelMorph as the only level, with the same data, "
                    "augmentation, validation and schedule) on random pairs of affinely aligned, skull-stripped images "
                    "on one grid (the first image's; others are resampled onto it). Writes OUTDIR/train_log.csv, "
                    "OUTDIR/checkpoints/ (resume with --resume) and, with --export NAME, OUTDIR/NAME.pt plus its model "
                    "card NAME.json.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="training image files")
    src.add_argument("--folder", help="folder of training images (see --pattern)")
    src.add_argument("--bids", help="BIDS dataset: every sub-*/[ses-*/]anat/*_T1w image")
    p.add_argument("--pattern", default=None,
                   help="glob under --folder (default: every image directly inside it that is not label-like)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="label maps: a folder (matched by file name, BIDS sub/ses or leading identifier) or one file "
                        "per image; with --bids the default is derivatives/**/*_dseg.nii.gz")
    p.add_argument("--labels-pattern", default=None, help="glob under the --labels folder (default: every image file)")
    p.add_argument("--labels-desc", default=None, help="BIDS: use *_desc-<DESC>_dseg label maps only")
    p.add_argument("--no-labels", action="store_true", help="train without labels (no Dice term, NCC validation only)")
    p.add_argument("--val-images", nargs="+", default=None, help="held-out validation images (default: --val-fraction)")
    p.add_argument("--val-labels", nargs="+", default=None,
                   help="labels of --val-images (folder or files; default: the --labels folder)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the subjects held out for validation when no --val-images (default 0.1, at least 2)")
    p.add_argument("--val-pairs", type=int, default=8, help="validation pairs (default 8)")
    p.add_argument("--network", choices=["hdar", "voxelmorph"], default="hdar",
                   help="the S1 network: hdar (HDAR's attention U-Net, default) or voxelmorph (VoxelMorph's U-Net, "
                        "Balakrishnan et al. 2019, as the only level; its loss defaults to the paper's: diffusion "
                        "smoothness with weight 1, on the velocity field with --diffeomorphic)")
    p.add_argument("--width", choices=["small", "paper", "vm2", "vm1"], default=None,
                   help="network width: small (default) or paper for hdar, vm2 (default) or vm1 for voxelmorph")
    p.add_argument("--levels", type=int, choices=[1, 2, 3], default=None,
                   help="sub-networks S1..S3 to train (default 3; voxelmorph: 1, its only choice)")
    p.add_argument("--steps-per-stage", type=int, nargs="+", default=[2000],
                   help="optimiser steps of stage 1 [2 [3]] (one value: every stage; default 2000)")
    p.add_argument("--val-every", type=int, default=250, help="validate every N steps (default 250)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, the paper's)")
    p.add_argument("--smooth-weight", type=float, default=None,
                   help="smoothness weight (default: 1.5 for hdar, 1 for voxelmorph)")
    p.add_argument("--smoothness", choices=["anti_folding", "diffusion"], default=None,
                   help="smoothness term (default: anti_folding for hdar, diffusion for voxelmorph)")
    p.add_argument("--dice-weight", type=float, default=1.0, help="Dice weight on pairs with labels (default 1)")
    p.add_argument("--loss-resolution", choices=["level", "full"], default="level",
                   help="compute each stage's loss at its network's resolution (default; S1 1/4, S2 1/2, S3 full on "
                        "its patches) or on the whole full-resolution volume (much slower on a CPU)")
    p.add_argument("--augment", choices=["none", "geometry", "intensity", "all"], default="intensity",
                   help="training augmentation: 'intensity' (default: an independent random acquisition change per "
                        "image: blur, bias field, gamma, noise), 'geometry' (the paper's random flips and axis "
                        "permutations), 'all' (both) or 'none'")
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="same as --augment none")
    p.add_argument("--diffeomorphic", action="store_true", help="predict stationary velocity fields")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision on CUDA (default auto: bf16 where supported); the CPU always uses float32")
    for name, default, what in (("s1-scale", None, "S1 input size relative to the image (default 0.25)"),
                                ("s2-patch", None, "S2 patch size, full-resolution voxels (default 112)"),
                                ("s2-input", None, "S2 network input size (default 56)"),
                                ("s3-patch", None, "S3 patch size (default 56)"),
                                ("s3-input", None, "S3 network input size (default 56)"),
                                ("top-k", None, "patches per level, K (default 8)")):
        p.add_argument(f"--{name}", type=float if name == "s1-scale" else int, default=default, help=what)
    p.add_argument("--train-top-k", type=int, default=None,
                   help="patches per level in a training step (default: --top-k); fewer make S2/S3 steps cheaper "
                        "on a CPU, validation and inference keep --top-k")
    p.add_argument("-o", "--output", required=True, help="run folder (created)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from CHECKPOINT (default OUTDIR/checkpoints/last.pt)")
    p.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this global step")
    p.add_argument("--export", default=None, metavar="NAME", help="write OUTDIR/NAME.pt and its model card at the end")
    p.add_argument("--export-dir", default=None, help="where --export writes (default OUTDIR)")
    p.add_argument("--on-grid-mismatch", choices=["resample", "error"], default="resample",
                   help="images not on the first image's grid: resample them (default) or stop")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds weights, pair sampling and augmentation (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_train)


def relative_locations(files: Sequence[str]) -> list[str]:
    """Training files as a model card records them: relative to their common folder, that folder's own name
    first (``lpba40/S01/S01.delineation.skullstripped.nii.gz``), never an absolute machine path."""
    import os
    from pathlib import Path

    paths = [Path(f).resolve() for f in files]
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [str(Path(root.name) / p.relative_to(root)) for p in paths]


def _run_train(args: argparse.Namespace) -> int:
    from hdar_pipeline.core.runtime import configure_threads

    configure_threads(args.threads)
    from pathlib import Path

    import nibabel as nib
    import numpy as np

    from hdar_pipeline.core.subject import DatasetError, find_image_subjects
    from hdar_pipeline.hdar.data import PairDataset
    from hdar_pipeline.hdar.train import TrainConfig, export, train
    from hdar_pipeline.core.images import ImageError

    def labels_arg(values):
        if values is None:
            return None
        return values[0] if len(values) == 1 and Path(values[0]).is_dir() else values

    from hdar_pipeline.core.input_guard import InputError, InputGuard

    def split(values):  # a list of label files, or one labels folder
        one = labels_arg(values)
        return (None, one) if isinstance(one, str) else (one, None)

    try:
        labels_files, labels_folder = split(args.labels)
        val_labels_files, val_labels_folder = split(args.val_labels)
        guard = InputGuard({"--images": args.images, "--val-images": args.val_images, "--labels": labels_files,
                            "--val-labels": val_labels_files},
                           {"--folder": args.folder, "--bids": args.bids, "--labels": labels_folder,
                            "--val-labels": val_labels_folder}, hash_files=False)
        if isinstance(args.resume, str):  # a named checkpoint: an input, unless it is this run's own state
            resume = Path(args.resume)
            if resume.is_dir():
                raise InputError("--resume", resume, "is a folder, not a checkpoint file")
            if not resume.is_file():
                raise InputError("--resume", resume, "checkpoint not found")
            if not resume.resolve().is_relative_to(Path(args.output).resolve() / "checkpoints"):
                guard.add_files({"--resume": resume})
        guard.output_folder(args.output, "-o/--output")  # the training folder belongs to the run
        if args.export:
            guard.output_folder(args.export_dir or args.output, "--export-dir" if args.export_dir else "-o/--output",
                                writes=(f"{args.export}.pt", f"{args.export}.json"))
    except InputError as exc:
        print(f"hdar train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    try:
        labels = None if args.no_labels else (labels_arg(args.labels) if args.labels else "auto")
        subjects = find_image_subjects(images=args.images, folder=args.folder, bids=args.bids, pattern=args.pattern,
                                       labels=labels, labels_pattern=args.labels_pattern, labels_desc=args.labels_desc)
        data = PairDataset.from_subjects(subjects, on_grid_mismatch=args.on_grid_mismatch)
        val = None
        if args.val_images:
            val_labels = None if args.no_labels else labels_arg(args.val_labels) if args.val_labels else \
                (labels if isinstance(labels, str) and labels != "auto" else None)
            val = PairDataset.from_subjects(find_image_subjects(images=args.val_images, labels=val_labels,
                                                                labels_pattern=args.labels_pattern),
                                            grid=data.grid, on_grid_mismatch=args.on_grid_mismatch)
        elif args.val_fraction > 0:
            n_val = max(2, int(round(args.val_fraction * len(data))))
            if len(data) - n_val >= 2:
                data, val = data.split(n_val, np.random.default_rng(args.seed))
            else:
                print(f"hdar train: warning: {len(data)} subjects are too few to hold out {n_val} for validation; "
                      "not validating", file=sys.stderr)
        cascade = {k: getattr(args, k) for k in ("s1_scale", "s2_patch", "s2_input", "s3_patch", "s3_input", "top_k")
                   if getattr(args, k) is not None}
        config = TrainConfig(network=args.network, width=args.width, levels=args.levels,
                             diffeomorphic=args.diffeomorphic,
                             steps_per_stage=tuple(args.steps_per_stage), lr=args.lr, smooth_weight=args.smooth_weight,
                             smoothness=args.smoothness, dice_weight=args.dice_weight, augment=args.augment,
                             loss_resolution=args.loss_resolution,
                             val_every=args.val_every, val_pairs=args.val_pairs, checkpoint_every=args.checkpoint_every,
                             seed=args.seed, amp=args.amp, cascade=cascade, train_top_k=args.train_top_k)
        description = {
            "source": "bids" if args.bids else "folder" if args.folder else "images",
            # no machine paths on a model card: folder names, and files relative to their common folder
            "location": Path(args.bids or args.folder).resolve().name if (args.bids or args.folder)
            else relative_locations(args.images),
            "train_subjects": data.names, "val_subjects": val.names if val is not None else [],
            "labelled_train_subjects": data.n_labelled, "grid_shape": list(data.shape),
            "voxel_size_mm": [round(float(v), 4) for v in data.grid.spacing],
            "orientation": "".join(nib.aff2axcodes(data.grid.affine))}
        result = train(data, args.output, config, val_data=val, resume=args.resume, device=args.device,
                       threads=args.threads, progress=args.progress, max_steps=args.max_steps,
                       data_description=description)
        written = []
        if args.export:
            if not result.completed:
                print(f"hdar train: warning: exporting after step {result.step} of {config.total_steps} "
                      "(training not finished)", file=sys.stderr)
            import shlex

            command = shlex.join(["hdar", *sys.argv[1:]] if Path(sys.argv[0]).name == "hdar" else sys.argv)
            written = export(result, args.export, args.export_dir or args.output, command=command,
                             data_description=description)
    except (DatasetError, ImageError, ValueError, FileNotFoundError) as exc:
        print(f"hdar train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    final = result.final_validation
    print(f"{result.step} of {config.total_steps} steps on {result.device} in {result.elapsed_s:.1f} s "
          f"({result.train_seconds / max(1, result.step):.3f} s per step)"
          + (f"; validation Dice {final['val_dice']:.4f}, NCC {final['val_ncc']:.4f}" if final else ""))
    print(f"log: {result.log_path}")
    if result.checkpoint_path is not None:
        print(f"checkpoint: {result.checkpoint_path}")
    for path in written:
        print(f"exported: {path}")
    if written:
        print("to ship these weights, copy both files into hdar_pipeline/hdar/weights/ (--method hdar loads "
              "default.pt/.json by default, --method voxelmorph voxelmorph.pt/.json)")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert LPBA40, IBSR18, CUMC12, MGH10, Mindboggle-101 or a folder of images into BIDS",
        description="Read a labelled dataset in its distribution's layout (SRC, never written to) and write a BIDS "
                    "raw dataset (DEST/sub-<label>/anat/sub-<label>_T1w.nii.gz, participants.tsv) plus the label "
                    "maps as BIDS derivatives (DEST/derivatives/labels/sub-<label>/anat/sub-<label>_dseg.nii.gz, "
                    "dseg.tsv). The layout each preset expects is documented in hdar_pipeline/convert.py and the "
                    "README.")
    p.add_argument("preset", choices=["lpba40", "ibsr18", "cumc12", "mgh10", "mindboggle101", "folder"])
    p.add_argument("src", help="the distribution's folder (or its parent)")
    p.add_argument("dest", help="BIDS dataset to write (absent, empty, or written by an earlier `hdar convert`)")
    p.add_argument("--images", nargs="+", default=None, metavar="GLOB",
                   help="image file pattern(s) relative to the dataset folder (required for folder; replaces a "
                        "preset's)")
    p.add_argument("--labels", nargs="+", default=None, metavar="GLOB",
                   help="label map pattern(s) relative to the dataset folder (required for folder)")
    p.add_argument("--subject-regex", default=None,
                   help="regex giving the subject id from a file name (group 'id', else group 1); folder default: "
                        "the first run of letters and digits of the name without its extension")
    p.add_argument("--label-table", default=None, help="label names: BIDS dseg.tsv (index, name) or FreeSurfer LUT")
    p.add_argument("--use-heads", action="store_true",
                   help="convert the head (non-skull-stripped) images instead of the brains, where the layout has them")
    p.add_argument("--subjects", nargs="+", default=None, metavar="ID",
                   help="convert only these subjects (source ids such as S01, or BIDS labels such as 01)")
    p.add_argument("--subject-labels", choices=["auto", "source"], default="auto",
                   help="BIDS labels: auto (numbers, sub-01, when the ids are numbered) or source (the id's letters "
                        "and digits, sub-S01)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip a subject whose files are missing, unreadable or mismatched, and list it at the end")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty DEST that is not this conversion (same-named files are replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="print the summary only")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from hdar_pipeline.bids_io.convert import ConvertError, convert, format_summary
    from hdar_pipeline.core.input_guard import InputError
    from hdar_pipeline.core.images import ImageError
    from hdar_pipeline.core.labels import LabelTableError

    try:
        result = convert(args.preset, args.src, args.dest, images=args.images, labels=args.labels,
                         subject_regex=args.subject_regex, label_table=args.label_table, use_heads=args.use_heads,
                         subjects=args.subjects, skip_bad=args.skip_bad, overwrite=args.overwrite,
                         subject_labels=args.subject_labels, log=None if args.quiet else print)
    except (ConvertError, ImageError, InputError, LabelTableError, OSError) as exc:
        print(f"hdar convert: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0


# Subcommands, in the order `hdar --help` lists them.
def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    from hdar_pipeline.apps.benchmark.benchmark_cli import add_benchmark_arguments

    p = sub.add_parser("benchmark", help="compare affine, Demons, SyN (fast, quality) and HDAR on a dataset's pairs",
                       description="Run every method on the same registration pairs in one run and print one "
                                   "table (Dice, target overlap, folding, time as a ratio to SyN quality); "
                                   "writes CSVs and a markdown table. Resumes from cached rows.")
    add_benchmark_arguments(p)
    p.set_defaults(func=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from hdar_pipeline.apps.benchmark.benchmark_cli import run_benchmark_cli

    return run_benchmark_cli(args)


SUBCOMMANDS = [_add_register, _add_demo, _add_evaluate, _add_stats, _add_train, _add_benchmark]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hdar", description="hdar-pipeline toolbox")
    parser.add_argument("--version", action="version", version=f"hdar-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    _add_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def console_main() -> None:
    """The ``hdar`` command: :func:`main`, then the process exit.

    Once torch is loaded, the interpreter's teardown (freeing torch's modules and their memory) takes about
    0.7 s on two cores, a sixth of an HDAR registration; nothing of ours needs it (files are closed, temporary
    files removed, worker threads joined when a command returns), so the streams and log handlers are flushed
    and the process ends at once. Without torch the usual exit runs.
    """
    code = main()
    if "torch" in sys.modules:
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
