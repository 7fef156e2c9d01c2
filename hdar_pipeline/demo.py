"""``hdar demo``: the main job on embedded data, with no network.

The demo atlas is the MNI ICBM152 2009a template that the ``nilearn`` wheel ships (T1 plus grey- and
white-matter probability maps), resampled to 2 mm. Its labels are six tissue classes: left/right
x {CSF and other brain, grey matter, white matter}. Subjects are made from it by random smooth
diffeomorphic deformations, bias fields and noise (:mod:`hdar_pipeline.synthetic`), so the true
deformation is known. The cohort is synthetic: it shows the tool working, it is no benchmark.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .images import Grid, new_image, normalize_intensity, resample_to, save_image
from .synthetic import make_subject
from .templates import MNI_GM_FILE, MNI_T1_FILE, MNI_WM_FILE, nilearn_data_dir

PathLike = str | os.PathLike

DEMO_LABELS = {1: "left csf and other", 2: "left grey matter", 3: "left white matter",
               4: "right csf and other", 5: "right grey matter", 6: "right white matter"}


def demo_atlas(spacing_mm: float = 2.0) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The demo atlas: T1 in [0, 1] and six tissue labels, on a ``spacing_mm`` grid cropped to the brain."""
    folder = nilearn_data_dir()
    t1 = nib.load(str(folder / MNI_T1_FILE))
    gm = np.asarray(nib.load(str(folder / MNI_GM_FILE)).dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(str(folder / MNI_WM_FILE)).dataobj, dtype=np.float32)
    data = np.asarray(t1.dataobj, dtype=np.float32)
    brain = data > 0
    tissue = np.where(wm >= np.maximum(gm, 0.5 * 255), 3, np.where(gm >= 0.35 * 255, 2, 1)) * brain
    # Hemisphere from the world x coordinate (RAS: x < 0 is left).
    x_world = (t1.affine @ np.c_[np.indices(data.shape).reshape(3, -1).T, np.ones(data.size)].T)[0]
    right = (x_world.reshape(data.shape) > 0) & brain
    labels = (tissue + 3 * right * (tissue > 0)).astype(np.int32)
    idx = np.argwhere(brain)
    lo, hi = np.maximum(idx.min(0) - 4, 0), np.minimum(idx.max(0) + 5, data.shape)
    crop_aff = t1.affine.copy()
    crop_aff[:3, 3] = (t1.affine @ np.r_[lo, 1.0])[:3]
    extent = (hi - lo) * np.sqrt((t1.affine[:3, :3] ** 2).sum(0))
    shape = tuple(int(np.ceil(e / spacing_mm)) for e in extent)
    target_aff = crop_aff.copy()
    target_aff[:3, :3] = t1.affine[:3, :3] / np.sqrt((t1.affine[:3, :3] ** 2).sum(0)) * spacing_mm
    target = Grid(shape, target_aff)
    img = normalize_intensity(resample_to(new_image(data, t1), target))
    lab = resample_to(new_image(labels, t1), target, interpolation="nearest")
    return img, lab


def run_demo(out_dir: PathLike = "hdar-demo", *, n_subjects: int = 3, methods: tuple[str, ...] = ("syn", "demons"),
             seed: int = 0, threads: int | None = None, progress: bool = True) -> Path:
    """Make a synthetic cohort, register every subject to the atlas with each method, write a CSV.

    Returns the path of ``results.csv``: one row per subject x method x label with the per-label
    metrics of :func:`hdar_pipeline.metrics.label_metrics` (``dice``, ``target_overlap``, ``hd95_mm``...)
    and the whole-registration columns ``mean_dice``, ``folded_percent`` (brain), ``endpoint_error_mm``
    (mean distance to the known deformation inside the brain), ``runtime_s`` and ``peak_memory_mb``.
    """
    from .methods import get_method, register_pair
    from .metrics import jacobian_statistics, label_metrics
    from .runtime import configure_threads

    configure_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atlas, atlas_labels = demo_atlas()
    save_image(atlas, out / "atlas" / "atlas_T1w.nii.gz")
    save_image(atlas_labels, out / "atlas" / "atlas_dseg.nii.gz")
    ref = np.asarray(atlas_labels.dataobj)
    brain = ref > 0
    rows = []
    for s in range(n_subjects):
        sub = f"sub-{s + 1:02d}"
        subject = make_subject(atlas, atlas_labels, seed=seed + s)
        save_image(subject.image, out / sub / f"{sub}_T1w.nii.gz")
        save_image(subject.labels, out / sub / f"{sub}_dseg.nii.gz")
        true_pts = subject.truth.mapped_grid()
        for name in methods:
            method = get_method(name, seed=seed, threads=threads)
            transform, info = register_pair(atlas, subject.image, method, affine=False, seed=seed, threads=threads)
            mdir = out / sub / name
            save_image(transform.apply(subject.labels, interpolation="nearest"), mdir / f"{sub}_space-atlas_dseg.nii.gz")
            save_image(transform.apply(subject.image), mdir / f"{sub}_space-atlas_T1w.nii.gz")
            files = transform.write(mdir, prefix=f"{sub}_")
            warped = np.asarray(nib.load(str(mdir / f"{sub}_space-atlas_dseg.nii.gz")).dataobj)
            jstats = jacobian_statistics(transform, brain)
            epe = float(np.linalg.norm(transform.mapped_grid() - true_pts, axis=-1)[brain].mean())
            table = label_metrics(ref, warped, spacing=Grid.of(atlas).spacing, names=DEMO_LABELS)
            summary = dict(subject=sub, method=name, mean_dice=float(table["dice"].mean()),
                           folded_percent=jstats["folded_percent"], endpoint_error_mm=epe,
                           runtime_s=info["runtime_s"], peak_memory_mb=info["peak_memory_mb"])
            (mdir / "registration.json").write_text(json.dumps(
                {**summary, "transforms": [p.name for p in files], "parameters": info.get("parameters", {})},
                indent=2, default=str))
            rows += [dict(summary, **r) for r in table.to_dict("records")]
            if progress:
                print(f"{sub} {name:7s} mean Dice {summary['mean_dice']:.3f}  end-point error {epe:.2f} mm  "
                      f"folded {summary['folded_percent']:.3f} %  {summary['runtime_s']:.1f} s", flush=True)
    table = pd.DataFrame(rows)
    csv = out / "results.csv"
    table.to_csv(csv, index=False)
    return csv
