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
    p = sub.add_parser("register", help="register one moving image to a fixed image")
    p.set_defaults(func=_run_register)


def _run_register(args: argparse.Namespace) -> int:
    raise NotImplementedError


# Subcommands, in the order `hdar --help` lists them.
SUBCOMMANDS = [_add_register]


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
