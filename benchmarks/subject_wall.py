"""One subject through the BIDS App, as a user waits for it: wall time from the command's start to its exit.

Two single-subject datasets, each run through the App's participant level with ``--methods hdar`` and every other
option at its default (jobs, threads, preprocessing, evaluation, derivatives, reports), on a fresh output and work
folder each time:

- ``skull-stripped``: LPBA40 S02 re-stored as a scanner would store it (R-A-S, int16 with a scale and an offset:
  :data:`hdar_pipeline.core.restoring.FRAMES` ``ras-int16``), with its manual labels, so the run evaluates it;
- ``raw-head``: the IXI034 development head (not skull-stripped, P-S-R) resampled to 1 mm, int16, so the run
  extracts its brain.

The atlas is LPBA40 S01 prepared once beforehand (:func:`hdar_pipeline.pipeline.subject_steps.prepare_atlas_files`, as the App
prepares an atlas participant once per work folder) and given as ``--atlas``/``--atlas-labels``: the time measured
is one subject's, not the atlas'. Runs of the two datasets are interleaved (A B A B ...), so that a change of the
host's speed during the benchmark shows in both.

Usage::

    python benchmarks/subject_wall.py -w /tmp/subject-wall -o benchmarks/results/subject-wall/v1 --repeats 5

Writes ``runs.csv`` (one row per run: wall, exit code, the subject's recorded steps and stages) and ``README.md``'s
table on stdout. The datasets and the App's outputs go to ``-w`` (LONI's terms: LPBA40 may not be redistributed).
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

import nibabel as nib
import pandas as pd

from hdar_pipeline.core.restoring import StorageFrame, restore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from restored_cohort import write_cohort  # noqa: E402

#: The targets of issue 16, seconds of wall per subject.
TARGETS_S = {"skull-stripped": 30.0, "raw-head": 60.0}


def _head_dataset(raw: Path, subject: str, image: nib.Nifti1Image) -> None:
    """A one-subject BIDS dataset at ``raw`` (no labels: the head's DLMUSE labels are another protocol)."""
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "dataset_description.json").write_text(
        json.dumps({"Name": f"one raw head ({subject})", "BIDSVersion": "1.9.0"}, indent=2) + "\n")
    (raw / "participants.tsv").write_text(f"participant_id\nsub-{subject}\n")
    path = raw / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def build(lpba40: Path, ixi: Path, work: Path) -> dict[str, dict]:
    """The two datasets and the prepared atlas (reused when present)."""
    from hdar_pipeline.pipeline.subject_steps import prepare_atlas_files

    atlas = prepare_atlas_files(lpba40 / "S01" / "S01.delineation.skullstripped.nii.gz", work / "atlas",
                                name="sub-S01", labels=lpba40 / "S01" / "S01.delineation.structure.label.nii.gz",
                                seed=1)
    cases = {}
    root = work / "skull-stripped"
    if not (root / "rawdata" / "participants.tsv").is_file():
        write_cohort(lpba40, root, ["S02"], frames=("ras-int16",))
    cases["skull-stripped"] = {"raw": root / "rawdata", "labels": root / "labels"}
    root = work / "raw-head"
    if not (root / "rawdata" / "participants.tsv").is_file():
        head = nib.load(str(next(iter(sorted((ixi / "nifti").glob("IXI034*_ds.nii.gz"))))))
        codes = "".join(nib.aff2axcodes(head.affine))
        frame = StorageFrame("head-1mm", codes, None, (1.0, 1.0, 1.0), dtype="int16")
        _head_dataset(root / "rawdata", "IXI034", restore(head, frame))
    cases["raw-head"] = {"raw": root / "rawdata", "labels": None}
    for case in cases.values():
        case.update(atlas=atlas.image, atlas_labels=atlas.labels)
    return cases


def run_once(case: dict, out: Path) -> dict:
    """The App's participant level on ``case`` in a fresh process, every option but the atlas at its default."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [str(Path(sys.executable).parent / "hdar-pipeline"), str(case["raw"]), str(out / "derivatives"),
           "participant", "--atlas", str(case["atlas"]), "--atlas-labels", str(case["atlas_labels"]),
           "--methods", "hdar", "-w", str(out / "work"), "--no-progress"]
    if case["labels"] is not None:
        cmd[4:4] = ["--labels-dir", str(case["labels"])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "NO_ET": "1"})
    wall = time.perf_counter() - start
    (out / "stdout.txt").write_text(proc.stdout)
    row = {"wall_s": wall, "exit_code": proc.returncode, "load_1min_after": os.getloadavg()[0]}
    records = sorted((out / "derivatives").glob("sub-*/anat/*_desc-hdar_metrics.json"))
    if records:
        rec = json.loads(records[0].read_text())
        timing = rec.get("timing_s", {})
        row.update(status=rec.get("status"), mean_dice=rec.get("metrics", {}).get("mean_dice"))
        row.update({f"step.{k}": v for k, v in timing.get("steps", {}).items()})
        row.update({f"pre.{k}": v for k, v in timing.get("preprocess", {}).items()})
        row.update({f"reg.{k}": v for k, v in timing.get("register", {}).items()})
    after = out / "derivatives" / "logs" / "participant_timings.json"
    if after.is_file():
        timings = json.loads(after.read_text())
        row.update({f"after.{k}": v for k, v in timings.get("seconds", {}).items()})
        row.update(jobs=timings.get("nprocs"), threads_per_job=timings.get("threads_per_job"))
    return row


def table(runs: pd.DataFrame) -> str:
    lines = ["| input | runs (ok) | wall per run, s (each, in order) | median | target |",
             "| --- | ---: | --- | ---: | ---: |"]
    for case, g in runs.groupby("case", sort=False):
        walls = ", ".join(f"{w:.1f}" for w in g["wall_s"])
        lines.append(f"| {case} | {len(g)} ({int((g['exit_code'] == 0).sum())}) | {walls} | "
                     f"{g['wall_s'].median():.1f} | {TARGETS_S[case]:g} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lpba40", type=Path, default=Path("../shared/data/lpba40"))
    parser.add_argument("--ixi", type=Path, default=Path("../shared/data/ixi"))
    parser.add_argument("-w", "--work", type=Path, required=True, help="datasets and App outputs (outside the project)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(TARGETS_S), choices=list(TARGETS_S))
    args = parser.parse_args(argv)
    cases = build(args.lpba40, args.ixi, args.work.resolve())
    rows = []
    for k in range(args.repeats):
        for name in args.cases:
            row = {"case": name, "repeat": k, **run_once(cases[name], args.work.resolve() / "runs" / name)}
            print(f"{name} #{k}: {row['wall_s']:.1f} s (exit {row['exit_code']})", flush=True)
            rows.append(row)
    runs = pd.DataFrame(rows)
    args.output.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.output / "runs.csv", index=False, float_format="%.3f")
    print(table(runs))
    return 0 if (runs["exit_code"] == 0).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
