"""The affine stage: the fast PyTorch affine against the ANTs affine, Dice after the affine alone and time.

Two kinds of pairs, as users meet them:

- **LPBA40 in scanner poses**: a fixed LPBA40 subject as stored, the moving subject's head moved and turned in the
  scanner (a random rigid pose per pair, up to ``--pose-deg`` degrees about each axis and ``--pose-mm`` mm along
  each) and stored as another scanner would (ASL, 256x256x180 at 1 mm, off-centre, int16 with an offset). The
  moving labels go through the same pose and storage (nearest neighbour).
- **IXI heads as the BIDS App prepares them**: each raw IXI head through the App's brain preparation
  (:func:`hdar_pipeline.pipeline.preprocess.prepare_brain`: N4, brain extraction, on its own grid), then the App's affine
  step: the first head's brain as the atlas (its DLMUSE labels as reference), each other brain cut to its mask
  plus 10 mm as the moving image, the atlas brain mask restricting the metric.

Each pair is scored by the mean Dice over the fixed image's labels of the moving labels resampled by the affine
(nearest neighbour); time is the registration's own ``runtime_s``. Both methods run with their defaults, the
same seed and threads.

    python benchmarks/affine_accuracy.py --lpba40 ../shared/data/lpba40 --ixi ../shared/data/ixi \\
        -o benchmarks/results/affine/v1

Prints a table and writes ``affine_pairs.csv`` and ``affine.md``. Needs the data folders (not part of the project).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

LPBA40_PAIRS = (("S21", "S24"), ("S23", "S27"), ("S26", "S30"), ("S22", "S28"), ("S25", "S29"))


def _rotation(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    out = np.eye(4)
    out[i, i] = out[j, j] = c
    out[i, j], out[j, i] = -s, s
    return out


def scanner_pose(image, labels, k: int, deg: float, mm: float):
    """``image`` and ``labels`` with the head moved and turned in the scanner (pose ``k``), stored ASL off-centre."""
    from hdar_pipeline.core.restoring import StorageFrame, restore

    rng = np.random.default_rng(k)
    pose = _rotation(0, rng.uniform(-deg, deg)) @ _rotation(1, rng.uniform(-deg, deg)) @ _rotation(2, rng.uniform(-deg, deg))
    pose[:3, 3] = rng.uniform(-mm, mm, 3)
    im = nib.Nifti1Image(np.asarray(image.dataobj, np.float32), pose @ image.affine)
    lb = nib.Nifti1Image(np.asarray(labels.dataobj).astype(np.int32), pose @ labels.affine)
    frame = StorageFrame("scanner", "ASL", (256, 256, 180), (1.0, 1.0, 1.0), (18.0, -22.0, 10.0), "int16", 3.0, 40.0)
    return restore(im, frame), restore(lb, frame, labels=True)


def mean_dice(reference: np.ndarray, labels: np.ndarray) -> float:
    values = [v for v in np.unique(reference) if v]
    out = []
    for v in values:
        a, b = reference == v, labels == v
        out.append(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
    return float(np.mean(out))


def lpba40_cases(root: Path, deg: float, mm: float):
    from hdar_pipeline.core.images import load_image

    for k, (f, m) in enumerate(LPBA40_PAIRS):
        fixed = load_image(root / f / f"{f}.delineation.skullstripped.nii.gz")
        ref = load_image(root / f / f"{f}.delineation.structure.label.nii.gz", labels=True)
        moving, labels = scanner_pose(load_image(root / m / f"{m}.delineation.skullstripped.nii.gz"),
                                      load_image(root / m / f"{m}.delineation.structure.label.nii.gz", labels=True),
                                      k, deg, mm)
        yield "LPBA40, scanner pose", f"{m}->{f}", fixed, moving, labels, ref, None


def ixi_cases(root: Path, cache: Path, seed: int, threads: int):
    from hdar_pipeline.core.images import crop_to_mask, load_image, save_image
    from hdar_pipeline.pipeline.preprocess import prepare_brain

    heads = sorted((root / "nifti").glob("*.nii.gz"))
    brains = {}
    for head in heads:
        name = head.name.replace("-T1_ds.nii.gz", "")
        b, m = cache / f"{name}_brain.nii.gz", cache / f"{name}_mask.nii.gz"
        if not b.exists():
            prepared = prepare_brain(load_image(head), seed=seed, threads=threads)
            save_image(prepared.native_brain, b)
            save_image(prepared.native_mask, m)
        brains[name] = (load_image(b), load_image(m, labels=True),
                        load_image(root / "dlmuse" / f"{name}-T1_ds_DLMUSE.nii.gz", labels=True))
    names = list(brains)
    atlas, atlas_mask, atlas_labels = brains[names[0]]
    for name in names[1:]:
        brain, mask, labels = brains[name]
        moving = crop_to_mask(brain, np.asarray(mask.dataobj) > 0, 10.0)
        yield "IXI heads, App's affine step", f"{name}->{names[0]}", atlas, moving, labels, atlas_labels, atlas_mask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lpba40", type=Path, help="LPBA40 folder")
    p.add_argument("--ixi", type=Path, help="IXI development folder (nifti/, dlmuse/)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--pose-deg", type=float, default=12.0)
    p.add_argument("--pose-mm", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["ants", "fast"], choices=["ants", "fast"])
    args = p.parse_args(argv)
    if not args.lpba40 and not args.ixi:
        p.error("give --lpba40 and/or --ixi")
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    from hdar_pipeline.methods import affine_stage

    args.output.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if args.lpba40:
            cases += list(lpba40_cases(args.lpba40, args.pose_deg, args.pose_mm))
        if args.ixi:
            cases += list(ixi_cases(args.ixi, Path(tmp), args.seed, args.threads))
        for cohort, pair, fixed, moving, labels, ref, mask in cases:
            reference = np.asarray(ref.dataobj)
            for name in args.methods:
                method = affine_stage(name, seed=args.seed, threads=args.threads, device="cpu")
                start = time.perf_counter()
                transform = method.register(fixed, moving, fixed_mask=mask)
                wall = time.perf_counter() - start
                warped = np.asarray(transform.apply(labels, interpolation="nearest").dataobj)
                rows.append({"cohort": cohort, "pair": pair, "method": name, "dice": mean_dice(reference, warped),
                             "runtime_s": transform.metadata["runtime_s"], "wall_s": wall})
                print(f"{cohort:30s} {pair:34s} {name:5s} Dice {rows[-1]['dice']:.4f} {wall:6.1f} s", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.output / "affine_pairs.csv", index=False)
    lines = ["# The affine stage: fast (PyTorch) against ANTs", "",
             f"Dice after the affine alone (mean over the fixed labels), seconds per pair; {os.cpu_count()} CPUs, "
             f"{platform.processor() or platform.machine()}, threads {args.threads}, seed {args.seed}; poses up to "
             f"{args.pose_deg:g} degrees and {args.pose_mm:g} mm.", "",
             "| pairs | method | n | Dice (mean) | Dice (worst) | fast - ants (mean, worst pair) | s / pair (mean) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for cohort, sub in table.groupby("cohort", sort=False):
        wide = sub.pivot(index="pair", columns="method", values="dice")
        for name, rows_m in sub.groupby("method", sort=False):
            diff = ""
            if name == "fast" and "ants" in wide:
                d = wide["fast"] - wide["ants"]
                diff = f"{d.mean():+.4f}, {d.min():+.4f}"
            lines.append(f"| {cohort} | {name} | {len(rows_m)} | {rows_m['dice'].mean():.4f} | "
                         f"{rows_m['dice'].min():.4f} | {diff} | {rows_m['runtime_s'].mean():.1f} |")
    lines += ["", "Command: `python benchmarks/affine_accuracy.py " + " ".join(
        a if "/work/" not in a else "../shared/data/" + a.split("/data/")[-1] for a in (argv or sys.argv[1:])) + "`"]
    (args.output / "affine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
