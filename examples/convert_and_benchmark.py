#!/usr/bin/env python
"""Convert a labelled dataset to BIDS, then compare the registration methods on it in one table.

::

    python examples/convert_and_benchmark.py /data/mine /data/mine-bids --preset folder \\
        --images 'img/*_T1.nii.gz' --labels 'seg/*_seg.nii.gz' -o bench-out \\
        --variants affine demons syn-fast --n-pairs 5 --threads 2

    python examples/convert_and_benchmark.py /data/LPBA40 /data/lpba40-bids --preset lpba40 -o bench-out

Steps (the library behind ``hdar convert`` and ``hdar benchmark``):

1. :func:`hdar_pipeline.bids_io.convert.convert` reads SRC in its distribution's layout (``--preset``: ``lpba40``,
   ``ibsr18``, ``cumc12``, ``mgh10``, ``mindboggle101``, or ``folder`` with ``--images``/``--labels``
   globs) and writes DEST, a BIDS raw dataset, with the label maps as a derivatives dataset in
   ``DEST/derivatives/labels``. SRC is never written to; rerunning into the same DEST updates it.
2. :func:`hdar_pipeline.apps.benchmark.runner.bids_subjects` and :func:`~hdar_pipeline.apps.benchmark.runner.make_pairs` pick
   the subjects and pairs (``--pairs-from consecutive``: each subject onto the next), and
   :func:`~hdar_pipeline.apps.benchmark.runner.run_benchmark` registers every pair with every variant (affine
   stage first: converted subjects are not aligned) and writes ``BENCH_OUT/benchmark_pairs.csv``,
   ``benchmark_summary.csv`` and ``benchmark.md``. Rows are cached in ``BENCH_OUT/rows``, so an
   interrupted run resumes.

The markdown table (Dice, target overlap, folding, seconds per pair, peak memory) is printed at the end.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hdar_pipeline.apps.cli import non_negative_int, positive_int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the dataset as distributed (read only)")
    parser.add_argument("dest", type=Path, help="the BIDS dataset to write")
    parser.add_argument("--preset", required=True,
                        choices=["lpba40", "ibsr18", "cumc12", "mgh10", "mindboggle101", "folder"])
    parser.add_argument("--images", default=None, help="folder preset: glob of the images under SRC")
    parser.add_argument("--labels", default=None, help="folder preset: glob of the label maps under SRC")
    parser.add_argument("--label-table", default=None, help="label names: BIDS dseg.tsv or FreeSurfer LUT")
    parser.add_argument("-o", "--output", type=Path, required=True, help="benchmark output folder")
    parser.add_argument("--variants", nargs="+", default=["affine", "demons", "syn-fast"],
                        help="methods to compare (affine demons syn-fast syn-quality hdar-fast hdar-full "
                             "hdar-refined; default affine demons syn-fast)")
    parser.add_argument("--pairs-from", default="consecutive", choices=["consecutive", "onto-first", "all"])
    parser.add_argument("--n-pairs", type=positive_int, default=None, help="keep the first N pairs")
    parser.add_argument("--hdar-weights", default=None, help="exported HDAR weights (.pt) for the hdar variants")
    parser.add_argument("--threads", type=positive_int, default=None, help="threads per registration")
    parser.add_argument("--seed", type=non_negative_int, default=1)
    args = parser.parse_args(argv)

    from hdar_pipeline.apps.benchmark.runner import BenchmarkConfig, run_benchmark
    from hdar_pipeline.apps.benchmark.pairs import bids_subjects, make_pairs
    from hdar_pipeline.bids_io.convert import convert, format_summary

    # 1. the dataset as BIDS
    converted = convert(args.preset, args.src, args.dest, images=args.images, labels=args.labels,
                        label_table=args.label_table, log=print)
    print(format_summary(converted))

    # 2. the benchmark on the converted dataset
    subjects, notes = bids_subjects(converted.dest, converted.labels_dir)
    pairs = make_pairs(subjects, args.pairs_from, args.n_pairs)
    config = BenchmarkConfig(
        pairs=pairs, output=args.output, variants=args.variants, affine=True, threads=args.threads,
        seed=args.seed, hdar_weights=args.hdar_weights, notes=notes,
        dataset=f"{converted.dest} (converted from {args.src} with preset {args.preset})",
        command=shlex.join(["python", "examples/convert_and_benchmark.py",
                            *(argv if argv is not None else sys.argv[1:])]))
    print(f"benchmark: {len(pairs)} pairs ({', '.join(p.name for p in pairs)}), variants {', '.join(args.variants)}")
    result = run_benchmark(config, show_progress=False)

    print()
    print(result.markdown)
    for path in result.paths.values():
        print(f"wrote {path}")
    return 0 if (result.rows["status"] == "ok").any() else 1


if __name__ == "__main__":
    sys.exit(main())
