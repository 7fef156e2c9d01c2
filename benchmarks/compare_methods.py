"""Method comparison on a dataset's pairs: affine, Demons, SyN fast/quality and HDAR in one table.

A thin wrapper over :mod:`hdar_pipeline.apps.benchmark.runner` (the same as ``hdar benchmark``); see that module
for the variants, the pair sources, the caching and the outputs.

    python benchmarks/compare_methods.py --lpba40 ../shared/data/lpba40 --threads 2 -o benchmark-results
    python benchmarks/compare_methods.py --bids-dir ds/ --labels-dir ds/derivatives/labels \\
        --pairs 02:01 03:01 --variants affine demons syn-fast
"""

from __future__ import annotations

import argparse
import sys

from hdar_pipeline.apps.benchmark import __doc__ as BENCHMARK_DOC
from hdar_pipeline.apps.benchmark.benchmark_cli import add_benchmark_arguments, run_benchmark_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_methods.py", description=BENCHMARK_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser)
    return run_benchmark_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
