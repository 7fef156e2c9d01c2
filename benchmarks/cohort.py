"""Where a cohort run's time goes: a 35-subject cohort through the BIDS App with the default HDAR, stage by stage.

The cohort: LPBA40 S01-S30 re-stored in scanner frames (:mod:`restored_cohort`: other axis orders, brains off-centre
in large fields of view, 0.9-1.3 mm voxels, int16 with scales and offsets; skull-stripped, as LPBA40 is) and the
five IXI development heads as they are (raw heads, 2 mm, P-S-R, not skull-stripped). S01 is the atlas
participant; the LPBA40 subjects have their manual labels, so they are evaluated too (the IXI heads' DLMUSE labels
are another protocol than the atlas' and are left out).

Each configuration runs the App's participant level (``--methods hdar``, every other option at its default) on a
fresh work dir, timed from outside, and reads back what each subject's steps recorded
(``timing_s`` in each ``*_metrics.json``: the preprocessing's parts, the registration's reading, registration and
writing, the evaluation) and what the App spent after the workflow (``logs/participant_timings.json``:
derivatives, reports, the methods text). Configurations: ``cf:JOBSxTHREADS`` (Pydra's process pool on this
machine) and ``slurm:JOBSxTHREADS`` (one sbatch job per step on a running SLURM cluster, e.g. the single-node
test cluster ``tests/slurm/start_cluster.sh`` starts).

Usage::

    python benchmarks/cohort.py --lpba40 ../shared/data/lpba40 --ixi ../shared/data/ixi -w /tmp/cohort \\
        -o benchmarks/results/cohort/v1 --configs cf:1x2 cf:2x1 slurm:2x1

Writes into ``-o``: ``stages.csv`` (one row per configuration x subject: the seconds of every stage),
``summary.csv`` (per configuration and kind of input: median seconds per stage, wall per subject),
``runs.csv`` (per configuration: wall, exit code, mean Dice), ``stages.png`` and ``README.md``'s table on stdout.
The datasets and the App's outputs go to ``-w`` (LONI's terms: LPBA40 may not be redistributed; keep it out of
the project).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from restored_cohort import write_cohort  # noqa: E402

#: Stages in the order a subject goes through them, with the record keys they are read from.
PREPROCESS_PARTS = ("read", "skull_strip_check", "n4", "brain_extraction", "n4_brain", "normalise",
                    "affine_to_atlas", "resample", "write")
REGISTER_PARTS = ("read", "register", "write")
STAGE_LABELS = {
    "pre.read": "read T1w + atlas", "pre.skull_strip_check": "skull-strip check", "pre.n4": "N4",
    "pre.brain_extraction": "brain extraction", "pre.n4_brain": "N4 in the brain", "pre.normalise": "normalise",
    "pre.affine_to_atlas": "affine to atlas", "pre.resample": "resample", "pre.write": "write preprocessed",
    "pre.overhead": "preprocess job overhead", "reg.read": "read + import", "reg.register": "HDAR",
    "reg.write": "write outputs",
    "reg.overhead": "register job overhead", "evaluate": "evaluation",
}


def build_dataset(lpba40: Path, ixi: Path, root: Path, subjects: Sequence[str]) -> tuple[Path, Path]:
    """``root/rawdata`` (BIDS) and ``root/labels`` (LPBA40's labels); IXI heads copied as they are."""
    raw, labels = root / "rawdata", root / "labels"
    if not (raw / "participants.tsv").is_file():
        write_cohort(lpba40, root, subjects)
        rows = (raw / "participants.tsv").read_text()
        for head in sorted((ixi / "nifti").glob("IXI*_ds.nii.gz")):
            label = head.name.split("-")[0]  # IXI034
            dst = raw / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(head, dst)
            rows += f"sub-{label}\tixi-raw-head\n"
        (raw / "participants.tsv").write_text(rows)
    return raw, labels


def run_app(raw: Path, labels: Path, out: Path, work: Path, *, worker: str, jobs: int, threads: int,
            atlas: str, seed: int) -> dict:
    """The App's participant level in a fresh process; returns wall seconds and exit code."""
    for d in (out, work):
        if d.exists():
            shutil.rmtree(d)
    cmd = [str(Path(sys.executable).parent / "hdar-pipeline"), str(raw), str(out), "participant",
           "--labels-dir", str(labels), "--atlas-participant", atlas, "--methods", "hdar",
           "--nprocs", str(jobs), "--omp-nthreads", str(threads), "--seed", str(seed), "-w", str(work),
           "--worker", worker, "--no-progress"]
    if worker == "slurm":
        cmd.append(f"--slurm-args=--cpus-per-task={threads}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_ET": "1"})
    wall = time.perf_counter() - start
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / "benchmark_stdout.txt").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    return {"command": " ".join(cmd), "wall_s": wall, "exit_code": proc.returncode}


def subject_stages(out: Path) -> pd.DataFrame:
    """One row per subject: the seconds of every stage its records hold, and its status and Dice."""
    rows = []
    for path in sorted(out.glob("sub-*/anat/*_desc-hdar_metrics.json")):
        rec = json.loads(path.read_text())
        timing = rec.get("timing_s", {})
        steps, pre, reg = timing.get("steps", {}), timing.get("preprocess", {}), timing.get("register", {})
        row = {"subject": rec["subject"], "status": rec["status"], "mean_dice": rec["metrics"].get("mean_dice")}
        for part in PREPROCESS_PARTS:
            row[f"pre.{part}"] = pre.get(part, 0.0)
        row["pre.overhead"] = steps.get("preprocess", float("nan")) - sum(pre.values())
        for part in REGISTER_PARTS:
            row[f"reg.{part}"] = reg.get(part, 0.0)
        row["reg.overhead"] = steps.get("register", float("nan")) - sum(reg.values())
        row["evaluate"] = steps.get("evaluate", 0.0)
        row["steps_total"] = sum(steps.values())
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(stages: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Median seconds per stage per configuration and kind of input, and the wall per subject of each run."""
    out = []
    stage_cols = [c for c in STAGE_LABELS if c in stages]
    for (config, kind), g in stages.groupby(["config", "kind"], sort=False):
        run = runs.set_index("config").loc[config]
        row = {"config": config, "kind": kind, "subjects": len(g), "ok": int((g["status"] == "ok").sum())}
        row.update({c: float(g[c].median()) for c in stage_cols})
        row["steps_total"] = float(g["steps_total"].median())
        row["run_wall_s"] = float(run["wall_s"])
        row["run_wall_per_subject_s"] = float(run["wall_s"]) / float(run["subjects"])
        out.append(row)
    return pd.DataFrame(out)


def plot(summary: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in STAGE_LABELS if c in summary and summary[c].max() > 0.05]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(summary) + 2.2))
    left = pd.Series(0.0, index=summary.index)
    cmap = plt.get_cmap("tab20")
    names = [f"{r.config} {r.kind}" for r in summary.itertuples()]
    for i, c in enumerate(cols):
        ax.barh(names, summary[c], left=left, color=cmap(i % 20), label=STAGE_LABELS[c])
        left += summary[c]
    ax.scatter(summary["run_wall_per_subject_s"], names, marker="|", s=300, color="k", zorder=3,
               label="run wall / subjects")
    ax.set_xlabel("seconds per subject (median of each stage; one job's own time)")
    ax.invert_yaxis()
    # beside the axes: below them it overprints the x label when there are few rows
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lpba40", type=Path, default=Path("../shared/data/lpba40"))
    parser.add_argument("--ixi", type=Path, default=Path("../shared/data/ixi"))
    parser.add_argument("-w", "--work", type=Path, required=True, help="datasets and App outputs (outside the project)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="results folder")
    parser.add_argument("--subjects", nargs="+", default=[f"S{i:02d}" for i in range(1, 31)],
                        help="LPBA40 subjects (the first is the atlas participant)")
    parser.add_argument("--configs", nargs="+", default=["cf:1x2", "cf:2x1"],
                        help="WORKER:JOBSxTHREADS, e.g. cf:1x2 cf:2x1 slurm:2x1")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    raw, labels = build_dataset(args.lpba40, args.ixi, args.work / "dataset", args.subjects)
    frames = pd.read_csv(raw / "participants.tsv", sep="\t", dtype=str).set_index("participant_id")["storage_frame"]
    args.output.mkdir(parents=True, exist_ok=True)
    all_stages, runs = [], []
    for config in args.configs:
        worker, shape = config.split(":")
        jobs, threads = (int(x) for x in shape.split("x"))
        name = f"{worker}-{jobs}x{threads}"
        print(f"{config}: running ...", flush=True)
        run = run_app(raw, labels, args.work / name / "out", args.work / name / "work", worker=worker, jobs=jobs,
                      threads=threads, atlas=args.subjects[0], seed=args.seed)
        stages = subject_stages(args.work / name / "out")
        stages.insert(0, "config", config)
        stages.insert(2, "kind", ["raw head, 2 mm" if frames.get(f"sub-{s}") == "ixi-raw-head"
                                  else "skull-stripped, ~1 mm" for s in stages["subject"]])
        after = json.loads((args.work / name / "out" / "logs" / "participant_timings.json").read_text())["seconds"]
        run.update({"config": config, "subjects": len(stages), "ok": int((stages["status"] == "ok").sum()),
                    "mean_dice_lpba40": float(stages.loc[stages["kind"] != "raw head, 2 mm", "mean_dice"].mean()),
                    **{f"after_workflow_{k}_s": v for k, v in after.items()}})
        print(f"{config}: exit {run['exit_code']}, {run['ok']}/{run['subjects']} ok, wall {run['wall_s']:.0f} s "
              f"({run['wall_s'] / max(1, run['subjects']):.1f} s per subject), LPBA40 mean Dice "
              f"{run['mean_dice_lpba40']:.4f}", flush=True)
        all_stages.append(stages)
        runs.append(run)
        # written after every configuration, so a long run that stops keeps what it measured
        pd.concat(all_stages).to_csv(args.output / "stages.csv", index=False, float_format="%.3f")
        pd.DataFrame(runs).to_csv(args.output / "runs.csv", index=False, float_format="%.3f")
    stages, runs_df = pd.concat(all_stages), pd.DataFrame(runs)
    summary = summarise(stages, runs_df)
    summary.to_csv(args.output / "summary.csv", index=False, float_format="%.3f")
    plot(summary, args.output / "stages.png")
    print("\n".join(stage_table(summary)))
    return 0


def stage_table(summary: pd.DataFrame) -> list[str]:
    """Markdown: one row per stage (median seconds per subject), one column per configuration x kind of input."""
    from hdar_pipeline.apps.benchmark.tables import markdown_table

    shown = [c for c in STAGE_LABELS if c in summary and summary[c].max() > 0.05]
    header = ["stage (median s per subject)", *[f"{r.config}, {r.kind} ({r.ok}/{r.subjects} ok)"
                                                 for r in summary.itertuples()]]
    rows = [[STAGE_LABELS[c], *[f"{v:.1f}" for v in summary[c]]] for c in shown]
    rows.append(["**one subject's steps**", *[f"**{v:.1f}**" for v in summary["steps_total"]]])
    rows.append(["run wall / subjects (whole run, every kind)",
                 *[f"{v:.1f}" for v in summary["run_wall_per_subject_s"]]])
    return markdown_table(header, rows)


if __name__ == "__main__":
    raise SystemExit(main())
