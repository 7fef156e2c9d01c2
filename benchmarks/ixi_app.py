"""Raw heads on real data: the IXI development heads through the BIDS App, brain masks and registration scored.

The five IXI heads of ``../shared/data/ixi`` (2 mm, P-S-R, not skull-stripped, not bias-corrected) are written as a
BIDS dataset (``rawdata/``) with their DLMUSE parcellations as a labels derivatives dataset (``labels/``); the first
head's brain (its T1w masked by DLMUSE > 0) with its DLMUSE labels is the atlas. The App's participant and group
levels run with every option at its default (``--methods`` as given: by default HDAR, Demons and SyN fast), then:

* each subject's brain mask (``desc-brain_mask``, the App's brain extraction, native grid) is scored against the
  DLMUSE brain (labels > 0): Dice, and the mask's volume against DLMUSE's;
* each method's mean Dice over the DLMUSE labels (atlas space, from ``group/group.tsv``) and, through the inverse
  transform, of the atlas labels on the native T1w (``space-T1w_seg-<atlas>`` against the subject's own DLMUSE);
* each inverse's consistency (its sidecar's ``InverseConsistencyMM``).

Usage::

    python benchmarks/ixi_app.py --ixi ../shared/data/ixi -w /tmp/ixi-app -o benchmarks/results/ixi-bids-app/v9

Writes into ``-o``: ``masks.csv``, ``registration.csv``, ``README.md``'s tables on stdout. The datasets and the
App's outputs go to ``-w`` (IXI's files are read from ``--ixi`` and never committed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hdar_pipeline.apps.benchmark.tables import markdown_table  # noqa: E402

ATLAS = "IXI034"


def ixi_names(ixi: Path) -> dict[str, str]:
    """IXI id (``IXI039``) -> file stem (``IXI039-HH-1261-T1_ds``)."""
    return {p.name.split("-")[0]: p.name[: -len(".nii.gz")] for p in sorted((ixi / "nifti").glob("IXI*.nii.gz"))}


def build_dataset(ixi: Path, root: Path) -> tuple[Path, Path, Path, Path]:
    """rawdata/, labels/ and the atlas (brain image, labels) under ``root``."""
    raw, labels, atlas_dir = root / "rawdata", root / "labels", root / "atlas"
    names = ixi_names(ixi)
    if ATLAS not in names:
        raise SystemExit(f"{ixi}: no {ATLAS} head (the atlas)")
    for d in (raw, labels, atlas_dir):
        d.mkdir(parents=True, exist_ok=True)
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "IXI development heads",
                                                              "BIDSVersion": "1.9.0"}))
    (raw / "README").write_text("IXI T1w heads (CC BY-SA 3.0, brain-development.org), 2 mm.\n")
    subjects = [s for s in names if s != ATLAS]
    (raw / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    (labels / "dataset_description.json").write_text(json.dumps({
        "Name": "DLMUSE labels", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "DLMUSE"}]}))
    for s in subjects:
        for src, dst in ((ixi / "nifti" / f"{names[s]}.nii.gz", raw / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz"),
                         (ixi / "dlmuse" / f"{names[s]}_DLMUSE.nii.gz",
                          labels / f"sub-{s}" / "anat" / f"sub-{s}_dseg.nii.gz")):
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.write_bytes(src.read_bytes())
    head = nib.load(ixi / "nifti" / f"{names[ATLAS]}.nii.gz")
    dl = nib.load(ixi / "dlmuse" / f"{names[ATLAS]}_DLMUSE.nii.gz")
    brain = np.asarray(head.dataobj, np.float32) * (np.asarray(dl.dataobj) > 0)
    atlas = atlas_dir / f"tpl-{ATLAS}_desc-brain_T1w.nii.gz"
    nib.save(nib.Nifti1Image(brain, head.affine), atlas)
    atlas_labels = atlas_dir / f"tpl-{ATLAS}_dseg.nii.gz"
    atlas_labels.write_bytes((ixi / "dlmuse" / f"{names[ATLAS]}_DLMUSE.nii.gz").read_bytes())
    return raw, labels, atlas, atlas_labels


def table(frame: pd.DataFrame) -> str:
    """A data frame as a markdown table (numbers to 4 decimals, missing values as n/a)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.4f}"
        return str(v)

    rows = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join(markdown_table(list(frame.columns), rows))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def mean_label_dice(ref: np.ndarray, seg: np.ndarray) -> float:
    values = [v for v in np.unique(ref) if v > 0]
    return float(np.mean([dice(ref == v, seg == v) for v in values]))


def derivative_checks(out: Path) -> str:
    """Per derivative kind, how many files pybids indexes for each subject (``BIDSLayout(validate=True)``), and the
    dtypes ``pandas.read_csv(sep="\\t")`` gives the group tables' identifier, label and flag columns."""
    import bids

    layout = bids.BIDSLayout(out, validate=True, is_derivative=True)
    kinds = {"desc-preproc T1w": {"desc": "preproc", "suffix": "T1w", "extension": ".nii.gz"},
             "desc-brain mask": {"suffix": "mask", "extension": ".nii.gz"},
             "xfm.h5 (both ways)": {"suffix": "xfm", "extension": ".h5"},
             "space-T1w dseg": {"space": "T1w", "suffix": "dseg", "extension": ".nii.gz"},
             "morph.tsv": {"suffix": "morph", "extension": ".tsv"},
             "jacobian": {"suffix": "jacobian", "extension": ".nii.gz"}}
    subjects = layout.get_subjects()
    rows = [[kind, *[str(len(layout.get(subject=s, **q))) for s in subjects]] for kind, q in kinds.items()]
    lines = markdown_table(["derivative", *subjects], rows)
    group = pd.read_csv(out / "group" / "group.tsv", sep="\t")
    labels = pd.read_csv(out / "group" / "group_labels.tsv", sep="\t")
    lines.append("")
    lines.append("group.tsv: " + ", ".join(f"{c} {group[c].dtype}" for c in ("participant_id", "mean_dice",
                                                                            "qc_folding", "qc_dice_outlier")))
    lines.append("group_labels.tsv: " + ", ".join(f"{c} {labels[c].dtype}" for c in ("participant_id", "label")))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ixi", type=Path, required=True, help="IXI development folder (nifti/, dlmuse/)")
    p.add_argument("-w", "--work", type=Path, required=True, help="datasets, App outputs and work dir")
    p.add_argument("-o", "--output", type=Path, required=True, help="results folder")
    p.add_argument("--methods", nargs="+", default=["hdar", "demons", "syn"])
    p.add_argument("--seed", default="1")
    p.add_argument("--score-only", action="store_true", help="score the outputs already in -w (no App run)")
    args = p.parse_args(argv)
    raw, labels, atlas, atlas_labels = build_dataset(args.ixi, args.work)
    out, work = args.work / "out", args.work / "work"
    command = ["hdar-pipeline", str(raw), str(out), "participant", "--labels-dir", str(labels), "--atlas", str(atlas),
               "--atlas-labels", str(atlas_labels), "--methods", *args.methods, "--random-seed", args.seed,
               "-w", str(work), "--no-progress"]
    env = {**os.environ, "NO_ET": "1"}
    code, group, wall = 0, 0, float("nan")
    if not args.score_only:
        t0 = time.perf_counter()
        code = subprocess.run(command, env=env).returncode
        wall = time.perf_counter() - t0
        group = subprocess.run(["hdar-pipeline", str(raw), str(out), "group", "--labels-dir", str(labels)],
                               env=env).returncode
        print(f"participant exit {code} in {wall:.0f} s; group exit {group}")
    space = ATLAS
    masks, regs = [], []
    for sub in sorted(p.name[4:] for p in raw.glob("sub-*")):
        anat = out / f"sub-{sub}" / "anat"
        own = np.asarray(nib.load(labels / f"sub-{sub}" / "anat" / f"sub-{sub}_dseg.nii.gz").dataobj)
        mask_path = anat / f"sub-{sub}_desc-brain_mask.nii.gz"
        if mask_path.is_file():
            mask_img = nib.load(mask_path)
            mask = np.asarray(mask_img.dataobj) > 0
            voxel = abs(np.linalg.det(mask_img.affine[:3, :3])) / 1e6  # litres
            masks.append({"subject": sub, "mask_dice": dice(mask, own > 0), "mask_volume_l": mask.sum() * voxel,
                          "dlmuse_brain_volume_l": (own > 0).sum() * voxel})
        for method in args.methods:
            metrics = anat / f"sub-{sub}_space-{space}_desc-{method}_metrics.json"
            rec = json.loads(metrics.read_text()) if metrics.is_file() else {}
            row = {"subject": sub, "method": method, "status": rec.get("status", "missing"),
                   "atlas_space_dice": (rec.get("metrics") or {}).get("mean_dice"),
                   "folded_percent": rec.get("folded_percent")}
            native = anat / f"sub-{sub}_space-T1w_seg-{space}_desc-{method}_dseg.nii.gz"
            if native.is_file():
                row["native_space_dice"] = mean_label_dice(own, np.asarray(nib.load(native).dataobj))
            inverse = anat / f"sub-{sub}_from-{space}_to-T1w_mode-image_desc-{method}_xfm.json"
            if inverse.is_file():
                c = json.loads(inverse.read_text()).get("InverseConsistencyMM", {})
                row.update({"inverse_mean_mm": c.get("mean_mm"), "inverse_p99_mm": c.get("p99_mm")})
            row["register_wall_s"] = sum((rec.get("timing_s", {}).get("register") or {}).values()) or None
            regs.append(row)
    args.output.mkdir(parents=True, exist_ok=True)
    masks_df, regs_df = pd.DataFrame(masks), pd.DataFrame(regs)
    masks_df.to_csv(args.output / "masks.csv", index=False)
    regs_df.to_csv(args.output / "registration.csv", index=False)
    print("\nBrain masks (desc-brain_mask) against the DLMUSE brain (labels > 0):\n")
    print(table(masks_df))
    summary = regs_df.groupby("method", sort=False)[[c for c in ("atlas_space_dice", "native_space_dice",
                                                                 "folded_percent", "inverse_mean_mm",
                                                                 "inverse_p99_mm", "register_wall_s")
                                                     if c in regs_df]].mean().reset_index()
    print("\nRegistration, mean over the subjects:\n")
    print(table(summary))
    print(f"\nparticipant level wall: {wall:.0f} s")
    print("\nWhat pybids (validate=True) indexes per subject, and the group tables' types as pandas reads them:\n")
    print(derivative_checks(out))
    return 0 if code == 0 and group == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
