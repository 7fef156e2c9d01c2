"""``hdar demo``: the main job on embedded data, with no network.

The demo atlas is the MNI ICBM152 2009a template that the ``nilearn`` wheel ships (T1 plus grey- and
white-matter probability maps), resampled to 2 mm. Its labels are six tissue classes: left/right
x {CSF and other brain, grey matter, white matter}. Subjects are made from it by random smooth
diffeomorphic deformations, bias fields and noise (:mod:`hdar_pipeline.core.synthetic`), so the true
deformation is known. The cohort is synthetic: it shows the tool working, it is no benchmark.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from hdar_pipeline.core.images import Grid, new_image, normalize_intensity, resample_to, save_image
from hdar_pipeline.core.synthetic import make_subject
from hdar_pipeline.core.templates import MNI_GM_FILE, MNI_T1_FILE, MNI_WM_FILE, nilearn_data_dir

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


def write_demo_dataset(out_dir: PathLike, *, n_subjects: int = 3, seed: int = 0,
                       spacing_mm: float = 2.0) -> tuple[Path, Path]:
    """Write the synthetic demo cohort as a BIDS dataset and a labels derivatives dataset.

    Each subject is the demo atlas (:func:`demo_atlas`) deformed by a random smooth diffeomorphism,
    with a bias field and noise (:func:`hdar_pipeline.core.synthetic.make_subject`, seed ``seed + i``),
    on the atlas grid.

    Returns
    -------
    (Path, Path)
        ``OUT/rawdata`` (``sub-<NN>/anat/sub-<NN>_T1w.nii.gz``, ``dataset_description.json``,
        ``participants.tsv``, ``README``) and ``OUT/labels`` (``sub-<NN>/anat/sub-<NN>_dseg.nii.gz``
        in T1w space, ``dseg.tsv``, ``dataset_description.json`` with ``DatasetType: derivative``).
    """
    from hdar_pipeline._version import __version__

    out = Path(out_dir)
    raw, labels_dir = out / "rawdata", out / "labels"
    atlas, atlas_labels = demo_atlas(spacing_mm)
    subjects = [f"{i + 1:02d}" for i in range(n_subjects)]
    for i, sub in enumerate(subjects):
        s = make_subject(atlas, atlas_labels, seed=seed + i)
        save_image(s.image, raw / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz")
        save_image(s.labels, labels_dir / f"sub-{sub}" / "anat" / f"sub-{sub}_dseg.nii.gz")
    generated = [{"Name": "hdar-pipeline demo", "Version": __version__}]
    (raw / "dataset_description.json").write_text(json.dumps(
        {"Name": "hdar-pipeline synthetic demo cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
         "GeneratedBy": generated}, indent=2))
    (raw / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    (raw / "README").write_text(
        "Synthetic demo cohort of hdar-pipeline: the MNI ICBM152 2009a template (shipped with nilearn), "
        "deformed by random smooth diffeomorphisms, with bias fields and noise. Not real subjects.\n")
    (labels_dir / "dataset_description.json").write_text(json.dumps(
        {"Name": "hdar-pipeline demo labels", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": generated}, indent=2))
    (labels_dir / "dseg.tsv").write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in DEMO_LABELS.items()))
    return raw, labels_dir
