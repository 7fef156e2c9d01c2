"""HDAR outside LPBA40's frame: held-out LPBA40 pairs re-stored as other scanners and datasets store brains.

Each pair (moving:fixed, LPBA40 validation subjects) is re-stored in every frame of
:data:`hdar_pipeline.core.restoring.FRAMES` (another axis order; the brain off-centre in a 256x256x180 field of
view; 0.9 and 1.3 mm voxels; int16 with another range and an offset) and registered there with every HDAR
preset (and Demons, for scale). Dice is the mean over the fixed image's labels on that frame's own grid,
with the labels warped by antspyx re-applying the transform files we write (what a user of that frame gets);
folding is the % of the fixed brain's voxels (fixed > its background) with det J <= 0.

A frame with other voxels changes the measurement as well as the registration (the fixed labels on another
grid, the moving labels interpolated once more), so each row also has ``native_here``: the Dice of the native
frame's transform files re-applied in that frame by antspyx (the same world mapping, measured on the frame's
grid). ``dice - native_here`` is the method's own dependence on the frame; ``dice - native`` mixes it with the
storage's.

    python benchmarks/frames.py --lpba40 ../shared/data/lpba40 -o benchmarks/results/frames --threads 2

Prints a table (frame x method: Dice, difference to the native frame, folding, seconds) and writes
``frames.csv`` and ``frames.md`` into the output folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("NO_ET", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lpba40", required=True, help="LPBA40 folder (SNN/SNN.delineation.*.nii.gz)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--pairs", nargs="+", default=["S21:S24", "S25:S28", "S29:S22"], help="MOVING:FIXED")
    p.add_argument("--methods", nargs="+", default=["hdar:fast", "hdar:full", "hdar:refined", "demons"])
    p.add_argument("--frames", nargs="+", default=None, help="frame names (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    from hdar_pipeline.core.runtime import configure_threads

    configure_threads(args.threads)
    import ants

    from hdar_pipeline.core.images import load_image, normalize_intensity, save_image
    from hdar_pipeline.methods import get_method
    from hdar_pipeline.evaluation.metrics import jacobian_statistics
    from hdar_pipeline.core.restoring import FRAMES, restore

    names = list(args.frames or FRAMES)
    # the native frame first: its transforms are re-applied in every other frame
    frames = [FRAMES[n] for n in ["native"] + [n for n in names if n != "native"]]
    root = Path(args.lpba40)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in args.pairs:
        mv, fx = pair.split(":")
        read = lambda s, kind, labels: load_image(root / s / f"{s}.delineation.{kind}.nii.gz", labels=labels)  # noqa: E731
        src = {"fixed": read(fx, "skullstripped", False), "moving": read(mv, "skullstripped", False),
               "fixed_labels": read(fx, "structure.label", True), "moving_labels": read(mv, "structure.label", True)}
        pair_dir = tempfile.TemporaryDirectory()
        native_files: dict[str, list[str]] = {}
        for frame in frames:
            stored = {k: restore(v, frame, labels=k.endswith("labels")) for k, v in src.items()}
            with tempfile.TemporaryDirectory() as tmp:
                paths = {k: Path(tmp) / f"{k}.nii.gz" for k in stored}
                for k, v in stored.items():
                    save_image(v, paths[k])
                fixed_ants = ants.image_read(str(paths["fixed"]))
                labels_ants = ants.image_read(str(paths["moving_labels"]))
                reference = np.asarray(stored["fixed_labels"].dataobj).astype(int)
                fdata = np.asarray(stored["fixed"].dataobj)
                brain = fdata > fdata.min()
                for spec in args.methods:
                    name, _, preset = spec.partition(":")
                    method = get_method(name, preset=preset or None, seed=args.seed, threads=args.threads)
                    t0 = time.perf_counter()
                    transform = method.register(normalize_intensity(stored["fixed"]),
                                                normalize_intensity(stored["moving"]))
                    seconds = time.perf_counter() - t0
                    where = Path(pair_dir.name if frame.name == "native" else tmp) / spec.replace(":", "-")
                    files = [str(f) for f in transform.write(where, prefix="t_")]
                    if frame.name == "native":
                        native_files[spec] = files

                    def dice_of(transform_files: list[str]) -> float:
                        warped = ants.apply_transforms(fixed_ants, labels_ants, transformlist=transform_files,
                                                       interpolator="nearestNeighbor").numpy()
                        warped = np.rint(warped).astype(int)
                        labs = [lab for lab in np.unique(reference) if lab > 0]
                        return float(np.mean([2 * np.sum((reference == lab) & (warped == lab))
                                              / (np.sum(reference == lab) + np.sum(warped == lab)) for lab in labs]))

                    dice = dice_of(files)
                    # in the native frame the native transform is this one: no second warp
                    native_here = dice if frame.name == "native" else dice_of(native_files[spec])
                    jac = jacobian_statistics(transform, brain)
                    rows.append({"pair": pair, "frame": frame.name, "method": spec, "mean_dice": dice,
                                 "native_here": native_here, "folded_percent_mask": jac["folded_percent_mask"],
                                 "runtime_s": seconds})
                    print(f"{pair} {frame.name:14s} {spec:14s} Dice {dice:.4f} (native transform here "
                          f"{native_here:.4f}) folded {jac['folded_percent_mask']:.4f} % {seconds:.1f} s", flush=True)
        pair_dir.cleanup()
    df = pd.DataFrame(rows)
    native = df[df["frame"] == "native"].set_index(["pair", "method"])["mean_dice"]
    df["dice_minus_native"] = [r.mean_dice - native.get((r.pair, r.method), np.nan) for r in df.itertuples()]
    df["dice_minus_native_here"] = df["mean_dice"] - df["native_here"]
    df = df[df["frame"].isin(names)]
    df.to_csv(out / "frames.csv", index=False)
    table = df.groupby(["method", "frame"], sort=False).agg(
        dice=("mean_dice", "mean"), worst_minus_native=("dice_minus_native", "min"),
        best_minus_native=("dice_minus_native", "max"), here=("native_here", "mean"),
        worst_minus_here=("dice_minus_native_here", "min"), best_minus_here=("dice_minus_native_here", "max"),
        folded=("folded_percent_mask", "max"), seconds=("runtime_s", "median")).reset_index()
    lines = ["| method | frame | mean Dice | Dice - native (min / max over pairs) | native transform here "
             "| Dice - native transform here (min / max) | max % folded (brain) | s (median) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in table.itertuples():
        lines.append(f"| {r.method} | {r.frame} | {r.dice:.4f} | {r.worst_minus_native:+.4f} / "
                     f"{r.best_minus_native:+.4f} | {r.here:.4f} | {r.worst_minus_here:+.4f} / {r.best_minus_here:+.4f} "
                     f"| {r.folded:.4f} | {r.seconds:.1f} |")
    text = "\n".join(lines)
    command = "python benchmarks/frames.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "frames.md").write_text(f"# HDAR outside LPBA40's frame\n\nPairs {', '.join(args.pairs)} (moving:fixed)."
                                   f"\n\n{text}\n\nCommand: `{command}`\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
