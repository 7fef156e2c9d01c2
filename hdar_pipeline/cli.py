"""Command-line entry points: the ``hdar`` toolbox and the ``hdar-pipeline`` BIDS App.

Each ``hdar`` subcommand is added by one ``_add_<name>(subparsers)`` function below, which sets
``func`` to the function that runs it. Subcommands import their heavy modules lazily so that
``hdar --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._version import __version__


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register", help="register one moving image to a fixed image",
        description="Register MOVING onto FIXED and write the warped image, the warped labels, ITK "
                    "transform files that ants.apply_transforms re-applies, and registration.json.")
    p.add_argument("fixed", help="fixed (atlas) image: NIfTI, MGZ or Analyze")
    p.add_argument("moving", help="moving (subject) image")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("--method", choices=["affine", "syn", "demons", "hdar"], default="syn")
    p.add_argument("--preset", default=None,
                   help="method preset: syn fast|quality (default fast), hdar fast|full (default fast)")
    p.add_argument("--moving-labels", default=None, help="label map on the moving grid, warped with nearest neighbour")
    p.add_argument("--fixed-mask", default=None, help="mask on the fixed grid restricting the metric")
    p.add_argument("--affine", dest="affine", action="store_true", default=True,
                   help="run the affine stage first (default)")
    p.add_argument("--no-affine", dest="affine", action="store_false",
                   help="skip the affine stage (inputs already affinely aligned on the same grid)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="do not rescale intensities to [0, 1] before registering")
    p.add_argument("--seed", type=int, default=None, help="seeds numpy, torch and ANTs (ANTS_RANDOM_SEED)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (ITK, torch)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (HDAR only)")
    p.set_defaults(func=_run_register)


def _run_register(args: argparse.Namespace) -> int:
    from .runtime import configure_threads

    configure_threads(args.threads)  # before ITK starts
    from .images import ImageError
    from .registration import register_files

    try:
        record = register_files(args.fixed, args.moving, args.output, method=args.method, preset=args.preset,
                                moving_labels=args.moving_labels, fixed_mask=args.fixed_mask,
                                affine=args.affine, seed=args.seed, threads=args.threads, device=args.device,
                                normalize=args.normalize)
    except (ImageError, ValueError, NotImplementedError) as exc:
        print(f"hdar register: error: {exc}", file=sys.stderr)
        return 2
    print(f"{record['method']} ({record.get('preset') or 'default'}): {record['runtime_s']:.1f} s, "
          f"peak {record['peak_memory_mb']:.0f} MiB, folded {record['jacobian']['folded_percent']:.4f} %")
    print(f"wrote {args.output}/registration.json; transforms (ants.apply_transforms order): "
          f"{', '.join(record['transforms'])}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on embedded synthetic data (no network)",
                       description="Register a small synthetic cohort (made from the MNI152 template nilearn "
                                   "ships) to its atlas with each method and write a results CSV.")
    p.add_argument("-o", "--output", default="hdar-demo", help="output folder (default ./hdar-demo)")
    p.add_argument("--subjects", type=int, default=3, help="number of synthetic subjects (default 3)")
    p.add_argument("--methods", nargs="+", default=["syn", "demons"], choices=["affine", "syn", "demons", "hdar"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .runtime import configure_threads

    configure_threads(args.threads)
    from .demo import run_demo

    csv = run_demo(args.output, n_subjects=args.subjects, methods=tuple(args.methods), seed=args.seed,
                   threads=args.threads)
    import pandas as pd

    table = pd.read_csv(csv).drop_duplicates(["subject", "method"])
    summary = table.groupby("method")[["mean_dice", "endpoint_error_mm", "folded_percent", "runtime_s"]].mean()
    print(summary.round(3).to_string())
    print(f"results: {csv}")
    return 0


# Subcommands, in the order `hdar --help` lists them.
SUBCOMMANDS = [_add_register, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hdar", description="hdar-pipeline toolbox")
    parser.add_argument("--version", action="version", version=f"hdar-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def bids_app_main(argv: Sequence[str] | None = None) -> int:
    print("hdar-pipeline: the BIDS App arrives with the workflows; use `hdar` for single registrations.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
