"""Baselines on LPBA40: affine-only, SyN fast, SyN quality and Demons on the same pairs, one table.

Pairs S02..S06 are moved onto S01 (no affine stage first: LPBA40's delineation space is already
affinely aligned). Each (method, pair) result is cached as one JSON row in ``OUT/rows/`` so an
interrupted run resumes where it stopped (SyN quality takes about half an hour per pair on 2 cores);
a cached row is reused only while the method's parameters, threads and seed are unchanged, and
``--no-cache`` reruns everything. The cheap methods run first, so their rows land early. Prints the
table and writes ``OUT/baselines_pairs.csv`` (one row per method x pair), ``OUT/baselines_summary.csv``
(one row per method) and ``OUT/baselines.md``.

Columns: ``mean_dice`` (mean over the 56 labels), ``mean_dice_before`` (no registration),
``folded_percent`` (% of voxels with Jacobian determinant <= 0), ``std_log_jacobian``,
``runtime_s`` (registration only), ``peak_memory_mb`` (resident set of the process),
``load_avg_1min`` (machine load when the pair finished: timings on a shared machine are only as good
as this).

    python benchmarks/baselines.py --threads 2 --seed 1
    python benchmarks/baselines.py --methods affine demons --pairs S02 S03:S01
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("HDAR_LPBA40_DIR", REPO.parent / "shared" / "data" / "lpba40"))
# name in the table -> (method, preset)
VARIANTS = {"affine": ("affine", None), "syn-fast": ("syn", "fast"), "demons": ("demons", None),
            "syn-quality": ("syn", "quality")}


def subject_files(data: Path, subject: str) -> tuple[Path, Path]:
    return (data / subject / f"{subject}.delineation.skullstripped.nii.gz",
            data / subject / f"{subject}.delineation.structure.label.nii.gz")


def mean_dice(reference: np.ndarray, labels: np.ndarray) -> float:
    values = []
    for lab in np.unique(reference[reference > 0]):
        a, b = reference == lab, labels == lab
        values.append(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(values))


def run_one(variant: str, data: Path, fixed: str, moving: str, threads: int, seed: int) -> dict:
    from hdar_pipeline.core.images import load_image
    from hdar_pipeline.methods import get_method, register_pair

    method_name, preset = VARIANTS[variant]
    f_img, f_lab = subject_files(data, fixed)
    m_img, m_lab = subject_files(data, moving)
    fixed_img, moving_img = load_image(f_img), load_image(m_img)
    reference = np.asarray(load_image(f_lab, labels=True).dataobj)
    moving_labels = load_image(m_lab, labels=True)
    method = get_method(method_name, preset=preset, seed=seed, threads=threads)
    transform, info = register_pair(fixed_img, moving_img, method, affine=False, seed=seed, threads=threads)
    warped = np.asarray(transform.apply(moving_labels, interpolation="nearest").dataobj)
    jac = transform.jacobian_determinant()
    positive = jac[jac > 0]
    return {
        "method": variant, "fixed": fixed, "moving": moving,
        "mean_dice": mean_dice(reference, warped),
        "mean_dice_before": mean_dice(reference, np.asarray(moving_labels.dataobj)),
        "folded_percent": float(100 * np.mean(jac <= 0)),
        "std_log_jacobian": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "runtime_s": info["runtime_s"], "peak_memory_mb": info["peak_memory_mb"],
        "threads": threads, "seed": seed, "parameters": info["parameters"],
    }


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per method (in the order of ``rows['method']``'s categories when categorical)."""
    summary = rows.groupby("method", observed=True, sort=True).agg(
        n_pairs=("mean_dice", "size"), dice_mean=("mean_dice", "mean"), dice_sd=("mean_dice", "std"),
        dice_before_mean=("mean_dice_before", "mean"),
        folded_percent=("folded_percent", "mean"), std_log_jacobian=("std_log_jacobian", "mean"),
        seconds_per_pair_median=("runtime_s", "median"), peak_memory_mb=("peak_memory_mb", "max"),
    )
    summary = summary.reset_index()
    summary["method"] = summary["method"].astype(str)
    return summary


def markdown(summary: pd.DataFrame, header: str) -> str:
    lines = [header, "", "| method | pairs | mean Dice (sd) | % folded | std log\\|J\\| | s / pair (median) | peak MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary.itertuples():
        lines.append(f"| {r.method} | {r.n_pairs} | {r.dice_mean:.3f} ({r.dice_sd:.3f}) | {r.folded_percent:.4f} | "
                     f"{r.std_log_jacobian:.3f} | {r.seconds_per_pair_median:.1f} | {r.peak_memory_mb:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LPBA40 folder (SNN/ subfolders)")
    p.add_argument("--pairs", nargs="+", default=["S02", "S03", "S04", "S05", "S06"], metavar="MOVING[:FIXED]",
                   help="subjects moved onto --fixed, or MOVING:FIXED pairs (default S02..S06)")
    p.add_argument("--fixed", default="S01", help="fixed subject of pairs given without one (default S01)")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "baselines")
    p.add_argument("--no-cache", action="store_true", help="rerun pairs that already have a cached row")
    args = p.parse_args(argv)

    pairs = [tuple(p.split(":", 1)) if ":" in p else (p, args.fixed) for p in args.pairs]
    missing = sorted({s for pair in pairs for s in pair for f in subject_files(args.data, s) if not f.is_file()})
    if missing:
        print(f"baselines: LPBA40 data not found at {args.data} (subjects {', '.join(missing)}); "
              "set --data or HDAR_LPBA40_DIR", file=sys.stderr)
        return 2
    from hdar_pipeline.core.provenance import git_commit
    from hdar_pipeline.core.runtime import configure_threads

    configure_threads(args.threads)
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    if args.out.resolve().is_relative_to(REPO):  # results stay out of git (LPBA40 terms; machine-specific)
        ignore = args.out / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# written by benchmarks/baselines.py: results are not committed\n*\n")
    # Cheap methods first (VARIANTS order), so their rows land before the long SyN quality runs.
    variants = [v for v in VARIANTS if v in args.methods]
    jobs = [(v, m, f) for v in variants for m, f in pairs]
    started = time.time()
    for i, (variant, moving, fixed) in enumerate(jobs, 1):
        cache = rows_dir / f"{variant}_{moving}-to-{fixed}.json"
        tag = f"[{i}/{len(jobs)}] {variant} {moving}->{fixed}"
        if cache.exists() and not args.no_cache:
            why = _stale(json.loads(cache.read_text()), variant, args.threads, args.seed)
            if not why:
                print(f"{tag}: cached", flush=True)
                continue
            print(f"{tag}: cached row is stale ({why}), rerunning", flush=True)
        print(f"{tag} ...", end=" ", flush=True)
        row = run_one(variant, args.data, fixed, moving, args.threads, args.seed)
        row["load_avg_1min"] = os.getloadavg()[0]
        row["commit"] = git_commit(short=True)
        row["machine"] = f"{platform.node()} {os.cpu_count()} cores"
        cache.write_text(json.dumps(row, indent=2, default=str))
        print(f"Dice {row['mean_dice']:.3f} (before {row['mean_dice_before']:.3f}), folded "
              f"{row['folded_percent']:.4f} %, {row['runtime_s']:.1f} s, load {row['load_avg_1min']:.1f}  "
              f"[elapsed {time.time() - started:.0f} s]", flush=True)
    wanted = {(v, m, f) for v, m, f in jobs}
    rows = [json.loads(f.read_text()) for f in sorted(rows_dir.glob("*.json"))]
    rows = pd.DataFrame([r for r in rows if (r["method"], r["moving"], r["fixed"]) in wanted])
    if rows.empty:
        print("baselines: no results", file=sys.stderr)
        return 1
    rows["method"] = pd.Categorical(rows["method"], categories=variants, ordered=True)
    rows = rows.sort_values(["method", "moving", "fixed"])
    summary = summarise(rows)
    rows.drop(columns=["parameters"]).to_csv(args.out / "baselines_pairs.csv", index=False)
    summary.to_csv(args.out / "baselines_summary.csv", index=False)
    names = ", ".join(f"{m}->{f}" for m, f in pairs)
    header = (f"LPBA40 pairs {names} (no affine stage), {args.threads} threads, seed {args.seed}; "
              f"mean Dice over the 56 labels; machine {platform.node()} ({os.cpu_count()} cores).")
    (args.out / "baselines.md").write_text(markdown(summary, header))
    print_table(summary, header)
    print(f"\nwrote {args.out / 'baselines_pairs.csv'}, {args.out / 'baselines_summary.csv'}, "
          f"{args.out / 'baselines.md'}")
    return 0


def _stale(row: dict, variant: str, threads: int, seed: int) -> str:
    """Why a cached row no longer matches what this run would do ('' when it still does)."""
    from hdar_pipeline.methods import get_method

    method_name, preset = VARIANTS[variant]
    current = json.loads(json.dumps(get_method(method_name, preset=preset, seed=seed, threads=threads).parameters,
                                    default=str))
    if row.get("parameters") != current:
        changed = sorted(k for k in set(current) | set(row.get("parameters") or {})
                         if (row.get("parameters") or {}).get(k) != current.get(k))
        return "parameters changed: " + ", ".join(changed)
    return ""


def print_table(summary: pd.DataFrame, header: str) -> None:
    """The summary as a rich table (plain markdown when rich is unavailable)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(markdown(summary, header))
        return
    table = Table(title=header, title_justify="left")
    for col, justify in (("method", "left"), ("pairs", "right"), ("mean Dice (sd)", "right"),
                         ("% folded", "right"), ("std log|J|", "right"), ("s / pair (median)", "right"),
                         ("peak MiB", "right")):
        table.add_column(col, justify=justify)
    for r in summary.itertuples():
        table.add_row(str(r.method), str(r.n_pairs), f"{r.dice_mean:.3f} ({r.dice_sd:.3f})",
                      f"{r.folded_percent:.4f}", f"{r.std_log_jacobian:.3f}", f"{r.seconds_per_pair_median:.1f}",
                      f"{r.peak_memory_mb:.0f}")
    console = Console()
    if not console.is_terminal:  # a log file: do not wrap the table at 80 columns
        console = Console(width=130)
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
