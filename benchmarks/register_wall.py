"""The time a user waits: ``hdar register`` wall time against the registration's own ``runtime_s``.

Each repeat runs ``hdar register FIXED MOVING -o DIR --method M [--no-affine]`` as a fresh process, exactly as
a user types it, and measures the wall time from process start to exit; ``runtime_s`` is what the command
writes into ``registration.json`` (the registration alone: model loading, frame resampling and optimisation
for HDAR; the ANTs or ITK call for the others). The difference is start-up (Python, torch, antspyx imports),
reading and normalising the images, writing the warped image and the transform files, the Jacobian and the
record. Pairs are LPBA40 subjects (already on one grid, so ``--no-affine`` by default).

    python benchmarks/register_wall.py --lpba40 ../shared/data/lpba40 -o benchmarks/results/register-wall

Prints a table (method: median wall, median runtime, wall / runtime, the outputs' size) and writes
``register_wall.csv`` and ``register_wall.md`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lpba40", required=True, help="LPBA40 folder (SNN/SNN.delineation.*.nii.gz)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--pair", default="S21:S24", help="MOVING:FIXED")
    p.add_argument("--methods", nargs="+", default=["hdar"], help="--method values of hdar register")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--affine", action="store_true", help="keep the affine stage (default: --no-affine)")
    p.add_argument("--threads", type=int, default=None, help="passed as --threads when given")
    args = p.parse_args(argv)
    root = Path(args.lpba40)
    mv, fx = args.pair.split(":")
    image = lambda s: root / s / f"{s}.delineation.skullstripped.nii.gz"  # noqa: E731
    hdar = shutil.which("hdar") or sys.exit("the `hdar` command is not on PATH (pip install -e .)")
    env = dict(os.environ, NO_ET="1")
    rows = []
    for method in args.methods:
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                cmd = [hdar, "register", str(image(fx)), str(image(mv)), "-o", str(out), "--method", method]
                cmd += [] if args.affine else ["--no-affine"]
                cmd += [] if args.threads is None else ["--threads", str(args.threads)]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if done.returncode != 0:
                    print(done.stdout + done.stderr, file=sys.stderr)
                    raise SystemExit(f"{' '.join(cmd)} exited with {done.returncode}")
                record = json.loads((out / "registration.json").read_text())
                size = sum(f.stat().st_size for f in out.iterdir()) / 2 ** 20
                rows.append({"method": method, "preset": record.get("preset"), "repeat": repeat, "wall_s": wall,
                             "runtime_s": record["runtime_s"], "ratio": wall / record["runtime_s"],
                             "outputs_mb": size})
                print(f"{method} #{repeat}: wall {wall:.1f} s, runtime {record['runtime_s']:.1f} s, "
                      f"ratio {wall / record['runtime_s']:.2f}, outputs {size:.0f} MB", flush=True)
    df = pd.DataFrame(rows)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "register_wall.csv", index=False)
    table = df.groupby(["method", "preset"], sort=False).agg(
        wall=("wall_s", "median"), runtime=("runtime_s", "median"), ratio=("ratio", "median"),
        worst=("ratio", "max"), mb=("outputs_mb", "median")).reset_index()
    lines = ["| method | preset | wall s (median) | runtime s (median) | wall / runtime (median, worst) | outputs MB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.method} | {r.preset} | {r.wall:.1f} | {r.runtime:.1f} | {r.ratio:.2f}, {r.worst:.2f} | {r.mb:.0f} |"
              for r in table.itertuples()]
    text = "\n".join(lines)
    command = "python benchmarks/register_wall.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()
    (out_dir / "register_wall.md").write_text(
        f"# `hdar register`: wall time against runtime\n\nPair {args.pair} (moving:fixed), "
        f"{'with' if args.affine else 'without'} the affine stage, {args.repeats} fresh processes per method; "
        f"{os.cpu_count()} CPUs, load average at the end {load[0]:.2f}.\n\n{text}\n\nCommand: `{command}`\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
