"""``hdar benchmark``'s command line: its options, the run configuration they make, the command line recorded
with the results.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from hdar_pipeline.apps.benchmark.pairs import (
    BenchmarkInputError,
    PAIR_MODES,
    bids_subjects,
    default_lpba40_dir,
    lpba40_pairs,
    select_pairs,
)
from hdar_pipeline.apps.benchmark.runner import (DEFAULT_OUTPUT, DEFAULT_REFINE_STEPS, BenchmarkConfig,
      VARIANT_NAMES, parse_max_pairs, run_benchmark)
from hdar_pipeline.apps.benchmark.tables import run_console




def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hdar benchmark`` (also used by ``benchmarks/compare_methods.py``)."""
    from hdar_pipeline.apps.cli import non_negative_int, positive_int

    src = parser.add_argument_group("data (one of)")
    src.add_argument("--bids-dir", type=Path, metavar="DIR", help="BIDS raw dataset (skull-stripped T1w)")
    src.add_argument("--labels-dir", type=Path, metavar="DIR",
                     help="derivatives dataset with each subject's *_dseg.nii.gz in T1w space (with --bids-dir)")
    src.add_argument("--lpba40", type=Path, metavar="DIR",
                     help="LPBA40 folder (SNN/SNN.delineation.skullstripped.nii.gz and "
                          "SNN.delineation.structure.label.nii.gz); the default when no --bids-dir is given "
                          "($HDAR_LPBA40_DIR or ../shared/data/lpba40)")
    pg = parser.add_argument_group("pairs")
    pg.add_argument("--pairs", nargs="+", metavar="MOVING:FIXED",
                    help="explicit pairs of participant labels, e.g. 02:01 03:01 (LPBA40: S22:S21 or 22:21)")
    pg.add_argument("--subjects", "--participant-label", dest="subjects", nargs="+", metavar="LABEL",
                    help="subjects to pair (default: every BIDS participant with labels; LPBA40: S21-S30)")
    pg.add_argument("--pairs-from", choices=PAIR_MODES, default="consecutive",
                    help="how --subjects are paired: consecutive (each onto the next, the last onto the "
                         "first), onto-first, all (every ordered pair); default consecutive")
    pg.add_argument("--n-pairs", type=positive_int, metavar="N", help="keep the first N pairs")
    mg = parser.add_argument_group("methods")
    mg.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=list(VARIANT_NAMES), metavar="VARIANT",
                    help=f"variants to run (default all: {', '.join(VARIANT_NAMES)})")
    mg.add_argument("--max-pairs-per-variant", nargs="+", metavar="VARIANT=N", default=[],
                    help="run VARIANT on its first N pairs only ('all' lifts the limit); default syn-quality=1 "
                         "(about 30 min per LPBA40 pair on 2 cores)")
    mg.add_argument("--refine-steps", type=non_negative_int, default=DEFAULT_REFINE_STEPS, metavar="N",
                    help=f"instance-optimisation steps per refinement level of hdar-refined (default {DEFAULT_REFINE_STEPS})")
    mg.add_argument("--hdar-weights", metavar="NAME|PATH", help="HDAR weights (default: the shipped 'default')")
    mg.add_argument("--voxelmorph-weights", metavar="NAME|PATH",
                    help="VoxelMorph weights (default: the shipped 'voxelmorph')")
    aff = mg.add_mutually_exclusive_group()
    aff.add_argument("--affine", dest="affine", action="store_true", default=None,
                     help="affine stage before each deformable method (default for --bids-dir)")
    aff.add_argument("--no-affine", dest="affine", action="store_false",
                     help="no affine stage: images already aligned on one grid (default for LPBA40)")
    rg = parser.add_argument_group("run")
    rg.add_argument("--threads", type=positive_int, default=os.cpu_count(), metavar="N",
                    help=f"worker threads for ITK and torch (default {os.cpu_count()}, the cores here)")
    rg.add_argument("--seed", type=non_negative_int, default=1, help="seeds numpy, torch and ANTs (default 1)")
    rg.add_argument("--device", default="auto", help="HDAR device: auto, cpu or cuda[:N] (default auto)")
    rg.add_argument("-o", "--output", type=Path, default=Path(DEFAULT_OUTPUT), metavar="DIR",
                    help=f"output folder (default {DEFAULT_OUTPUT}); cached rows in DIR/rows")
    rg.add_argument("--no-cache", action="store_true", help="rerun pairs that already have a cached row")
    rg.add_argument("--no-progress", action="store_true", help="no progress bar (the per-row lines stay)")


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """A :class:`BenchmarkConfig` from parsed :func:`add_benchmark_arguments` options."""
    notes: list[str] = []
    bids_dir, labels_dir = getattr(args, "bids_dir", None), getattr(args, "labels_dir", None)
    lpba40 = getattr(args, "lpba40", None)
    subjects_arg = getattr(args, "subjects", None)
    pair_specs = getattr(args, "pairs", None)
    pairs_from, n_pairs = getattr(args, "pairs_from", "consecutive"), getattr(args, "n_pairs", None)
    if bids_dir is not None and lpba40 is not None:
        raise BenchmarkInputError("give either --bids-dir (with --labels-dir) or --lpba40, not both")
    if bids_dir is not None:
        if labels_dir is None:
            raise BenchmarkInputError("--bids-dir needs --labels-dir (the subjects' label maps)")
        if pair_specs:
            wanted = sorted({s for spec in pair_specs for s in spec.split(":") if s})
            subjects, _ = bids_subjects(bids_dir, labels_dir, wanted)
        else:
            subjects, notes = bids_subjects(bids_dir, labels_dir, subjects_arg)
        from hdar_pipeline.bids_io.inputs import check_label

        by_label = {s.id: s for s in subjects}
        pairs = select_pairs(subjects, lambda label: by_label[check_label(label)], pair_specs, pairs_from, n_pairs)
        dataset = f"BIDS dataset {bids_dir} (labels {labels_dir})"
        affine_default = True
    else:
        if labels_dir is not None:
            raise BenchmarkInputError("--labels-dir goes with --bids-dir")
        data = Path(lpba40) if lpba40 is not None else default_lpba40_dir()
        pairs = lpba40_pairs(data, subjects_arg, pair_specs, pairs_from, n_pairs)
        dataset = f"LPBA40 ({data})"
        affine_default = False
    affine = getattr(args, "affine", None)
    refine = int(getattr(args, "refine_steps", DEFAULT_REFINE_STEPS))
    if refine < 1:
        raise BenchmarkInputError("--refine-steps must be >= 1")
    return BenchmarkConfig(
        pairs=pairs, output=Path(getattr(args, "output", DEFAULT_OUTPUT)),
        variants=list(getattr(args, "variants", None) or VARIANT_NAMES),
        max_pairs=parse_max_pairs(getattr(args, "max_pairs_per_variant", None)),
        affine=affine_default if affine is None else bool(affine),
        threads=getattr(args, "threads", None), seed=int(getattr(args, "seed", 1)),
        device=getattr(args, "device", "auto") or "auto", refine_steps=refine,
        hdar_weights=getattr(args, "hdar_weights", None),
        voxelmorph_weights=getattr(args, "voxelmorph_weights", None), use_cache=not getattr(args, "no_cache", False),
        dataset=dataset, command=getattr(args, "command_line", None) or command_line(), notes=notes)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed (``hdar benchmark ...`` or ``python benchmarks/compare_methods.py ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    prog = argv[0]
    if prog.endswith(".py"):
        try:
            prog = "python " + str(Path(prog).resolve().relative_to(Path.cwd()))
        except ValueError:
            prog = "python " + prog
    else:
        prog = Path(prog).name
    return " ".join([prog, *(shlex.quote(a) for a in argv[1:])])


def run_benchmark_cli(args: argparse.Namespace) -> int:
    """Run ``hdar benchmark`` from parsed options; print the table. Returns the exit status."""
    console = run_console()
    from hdar_pipeline.core.input_guard import InputError, InputGuard

    try:
        config = config_from_args(args)
        # the pairs' images and labels are never written: -o may not hold them (it belongs to the run)
        files = sorted({str(f) for pair in config.pairs for s in (pair.moving, pair.fixed) for f in (s.t1w, s.labels)
                        if f is not None})
        bids_dir = getattr(args, "bids_dir", None)
        lpba40 = None if bids_dir is not None else (getattr(args, "lpba40", None) or default_lpba40_dir())
        InputGuard({"--bids-dir/--lpba40": files}, {"--bids-dir": bids_dir, "--lpba40": lpba40,
                                                   "--labels-dir": getattr(args, "labels_dir", None)},
                   hash_files=False).output_folder(config.output, "-o/--output")
        console.print(f"benchmark: {config.dataset}, {len(config.pairs)} pairs, variants "
                      f"{', '.join(config.variants)} -> {config.output}", highlight=False)
        result = run_benchmark(config, console=console, show_progress=not getattr(args, "no_progress", False))
    except (BenchmarkInputError, InputError) as exc:
        from hdar_pipeline.apps.cli import one_line

        print(f"hdar benchmark: error: {one_line(exc)}", file=sys.stderr)
        return 2
    console.print()
    console.print(result.markdown, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {result.paths['pairs']}, {result.paths['summary']}, {result.paths['markdown']}",
                  highlight=False)
    return 0 if (result.rows["status"] == "ok").any() else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hdar benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser)
    return run_benchmark_cli(parser.parse_args(argv))
