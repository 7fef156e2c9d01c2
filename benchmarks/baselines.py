"""Baselines on LPBA40: affine-only, SyN fast, SyN quality and Demons on the same pairs, one table.

Pairs S02..S06 are moved onto S01 (no affine stage first: LPBA40's delineation space is already
affinely aligned). Each (method, pair) result is cached as one JSON row in ``OUT/rows/`` so an
interrupted run resumes where it stopped (SyN quality takes about half an hour per pair on 2 cores);
``--no-cache`` reruns everything. Prints the table and writes ``OUT/baselines_pairs.csv``,
``OUT/baselines_summary.csv`` and ``OUT/baselines.md``.

    python benchmarks/baselines.py --threads 2 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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
    from hdar_pipeline.images import load_image
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
    order = [v for v in VARIANTS if v in set(rows["method"])]
    summary = rows.groupby("method").agg(
        n_pairs=("mean_dice", "size"), dice_mean=("mean_dice", "mean"), dice_sd=("mean_dice", "std"),
        folded_percent=("folded_percent", "mean"), std_log_jacobian=("std_log_jacobian", "mean"),
        seconds_per_pair_median=("runtime_s", "median"), peak_memory_mb=("peak_memory_mb", "max"),
    ).reindex(order)
    return summary.reset_index()


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
    p.add_argument("--fixed", default="S01")
    p.add_argument("--moving", nargs="+", default=["S02", "S03", "S04", "S05", "S06"])
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "baselines")
    p.add_argument("--no-cache", action="store_true", help="rerun pairs that already have a cached row")
    args = p.parse_args(argv)

    if not (args.data / args.fixed).is_dir():
        print(f"baselines: LPBA40 data not found at {args.data} (set --data or HDAR_LPBA40_DIR)", file=sys.stderr)
        return 2
    from hdar_pipeline.runtime import configure_threads

    configure_threads(args.threads)
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    # Cheap methods first, so their rows land before the long SyN quality runs.
    jobs = [(v, m) for v in args.methods for m in args.moving]
    started = time.time()
    for i, (variant, moving) in enumerate(jobs, 1):
        cache = rows_dir / f"{variant}_{moving}-to-{args.fixed}.json"
        if cache.exists() and not args.no_cache:
            print(f"[{i}/{len(jobs)}] {variant} {moving}->{args.fixed}: cached", flush=True)
            continue
        print(f"[{i}/{len(jobs)}] {variant} {moving}->{args.fixed} ...", end=" ", flush=True)
        row = run_one(variant, args.data, args.fixed, moving, args.threads, args.seed)
        row["commit"] = _git_commit()
        row["machine"] = f"{platform.node()} {os.cpu_count()} cores"
        cache.write_text(json.dumps(row, indent=2, default=str))
        print(f"Dice {row['mean_dice']:.3f} (before {row['mean_dice_before']:.3f}), folded "
              f"{row['folded_percent']:.4f} %, {row['runtime_s']:.1f} s  [elapsed {time.time() - started:.0f} s]",
              flush=True)
    rows = pd.DataFrame([json.loads(f.read_text()) for f in sorted(rows_dir.glob("*.json"))])
    rows = rows[rows["method"].isin(args.methods) & rows["moving"].isin(args.moving) & (rows["fixed"] == args.fixed)]
    summary = summarise(rows)
    rows.drop(columns=["parameters"]).to_csv(args.out / "baselines_pairs.csv", index=False)
    summary.to_csv(args.out / "baselines_summary.csv", index=False)
    header = (f"LPBA40, {', '.join(args.moving)} moved onto {args.fixed} (no affine stage), "
              f"{args.threads} threads, seed {args.seed}; mean Dice over the 56 labels.")
    text = markdown(summary, header)
    (args.out / "baselines.md").write_text(text)
    print()
    print(text)
    return 0


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
