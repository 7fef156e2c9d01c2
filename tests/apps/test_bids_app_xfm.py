"""The BIDS App's ``xfm.h5`` re-applied by antspyx (issue 14): with preprocessing on, the composite transform
holds the preprocessing affine (subject -> atlas) and the method's field; ``ants.apply_transforms`` of it to the
subject's native labels must give the app's own ``dseg`` derivative (Dice >= 0.99 for every label).

The subject is a deformed copy of the atlas participant stored 6 mm and a few degrees away in world space, so a
transform without the affine would not agree.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")
pytest.importorskip("bids")

from conftest import make_brain_phantom, write_json  # noqa: E402

from hdar_pipeline.apps.bids_app_cli import bids_app_main  # noqa: E402
from hdar_pipeline.core.images import save_image  # noqa: E402
from hdar_pipeline.core.synthetic import make_subject  # noqa: E402

SPACE = "sub01"


def moved(img: nib.Nifti1Image, angle_deg: float = 5.0, shift_mm=(6.0, -4.0, 3.0)) -> nib.Nifti1Image:
    """The same voxels stored elsewhere in world space (rotated about z, then shifted)."""
    a = np.deg2rad(angle_deg)
    world = np.eye(4)
    world[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    world[:3, 3] = shift_mm
    return nib.Nifti1Image(np.asarray(img.dataobj), world @ img.affine)


def test_xfm_h5_with_the_preprocessing_affine_is_what_ants_reapplies(tmp_path):
    import ants

    raw, labels = tmp_path / "rawdata", tmp_path / "labels"
    write_json(raw / "dataset_description.json", {"Name": "xfm", "BIDSVersion": "1.9.0"})
    write_json(labels / "dataset_description.json", {"Name": "labels", "BIDSVersion": "1.9.0",
                                                "DatasetType": "derivative", "GeneratedBy": [{"Name": "manual"}]})
    atlas = make_brain_phantom((32, 32, 32), 3.0)
    save_image(atlas.image, raw / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    save_image(atlas.labels, labels / "sub-01" / "anat" / "sub-01_dseg.nii.gz")
    s = make_subject(atlas.image, atlas.labels, seed=5, magnitude_mm=6.0, smoothness_mm=15.0)
    save_image(moved(s.image), raw / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    native_labels = save_image(moved(s.labels), labels / "sub-02" / "anat" / "sub-02_dseg.nii.gz")
    out = tmp_path / "out"
    code = bids_app_main([str(raw), str(out), "participant", "--atlas-participant", "01", "--labels-dir", str(labels),
                          "--methods", "demons", "--work-dir", str(tmp_path / "work"), "--nprocs", "1",
                          "--omp-nthreads", "1", "--skull-stripped", "yes", "--no-n4", "--seed", "1",
                          "--no-progress", "--skip-bids-validation"])
    assert code == 0
    anat = out / "sub-02" / "anat"
    xfm = anat / f"sub-02_from-T1w_to-{SPACE}_mode-image_desc-demons_xfm.h5"
    ours = anat / f"sub-02_space-{SPACE}_desc-demons_dseg.nii.gz"
    reference = json.loads(xfm.with_suffix(".json").read_text())["SpatialReference"]
    assert reference.startswith("bids::tpl-")  # the atlas, copied into the derivatives
    fixed = str(out / reference.removeprefix("bids::"))
    theirs = ants.apply_transforms(ants.image_read(fixed), ants.image_read(str(native_labels)),
                                   transformlist=[str(xfm)], interpolator="nearestNeighbor").numpy()
    ours = np.asarray(nib.load(str(ours)).dataobj)
    theirs = np.rint(theirs).astype(int)
    assert ours.shape == theirs.shape
    for label in np.unique(ours[ours > 0]):
        a, b = ours == label, theirs == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, label
    # and the registration itself did its job: the warped labels overlap the atlas labels well
    rec = json.loads((anat / f"sub-02_space-{SPACE}_desc-demons_metrics.json").read_text())
    assert rec["status"] == "ok" and rec["metrics"]["mean_dice"] > 0.8
    # the Jacobian map beside it is that of the written transform, computed once by the registration
    from hdar_pipeline.core.transforms import Transform

    jac = anat / f"sub-02_space-{SPACE}_desc-demons_jacobian.nii.gz"
    det = Transform.read(xfm, grid=nib.load(fixed)).jacobian_determinant()
    assert np.allclose(np.asarray(nib.load(jac).dataobj), det, atol=1e-5)
    # and the field was written once: the registration's job folder holds the composite alone
    jobs = [p.parent for p in (tmp_path / "work").rglob("registration.json")]
    assert jobs and all(sorted(p.name for p in j.iterdir() if "transform" in p.name) == ["transform.h5"]
                        for j in jobs)
    # the inverse (atlas -> T1w) re-applied by antspyx to the atlas labels gives the native-space atlas labels
    inverse = anat / f"sub-02_from-{SPACE}_to-T1w_mode-image_desc-demons_xfm.h5"
    native = anat / f"sub-02_space-T1w_seg-{SPACE}_desc-demons_dseg.nii.gz"
    t1w = raw / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    theirs = ants.apply_transforms(ants.image_read(str(t1w)), ants.image_read(str(out / f"tpl-{SPACE}" /
                                                                                  f"tpl-{SPACE}_dseg.nii.gz")),
                                   transformlist=[str(inverse)], interpolator="nearestNeighbor").numpy()
    native_ours = np.asarray(nib.load(str(native)).dataobj)
    assert native_ours.shape == nib.load(str(t1w)).shape
    assert (np.rint(theirs).astype(int) == native_ours).mean() > 0.999
    # ... and they overlap the subject's own labels where the subject lies (6 mm and 5 degrees away)
    own = np.asarray(nib.load(str(native_labels)).dataobj)
    dice = [2 * ((own == v) & (native_ours == v)).sum() / ((own == v).sum() + (native_ours == v).sum())
            for v in np.unique(own[own > 0])]
    assert np.mean(dice) > 0.8, dice
    side = json.loads(inverse.with_suffix(".json").read_text())
    assert side["InverseConsistencyMM"]["mean_mm"] < 0.5 and side["InverseConsistencyMM"]["voxels"] > 1000
    assert side["Sources"] == ["bids:raw:sub-02/anat/sub-02_T1w.nii.gz"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"]["raw"] == raw.resolve().as_uri()
    # the label names travel with the native labels; the regional volumes agree with the map and the Jacobian
    assert (anat / native.name.replace(".nii.gz", ".tsv")).read_text().startswith("index\tname\n1\t")
    import pandas as pd

    volumes = pd.read_csv(anat / f"sub-02_seg-{SPACE}_desc-demons_morph.tsv", sep="\t")
    voxel_mm3 = abs(np.linalg.det(nib.load(str(t1w)).affine[:3, :3]))
    for row in volumes.itertuples():
        assert row.voxels == (native_ours == row.index).sum()
        assert row.volume_mm3 == pytest.approx(row.voxels * voxel_mm3)
        assert row.volume_jacobian_mm3 == pytest.approx(row.volume_mm3, rel=0.1)
    # the preprocessed T1w and its brain mask on the subject's own grid
    preproc = anat / "sub-02_desc-preproc_T1w.nii.gz"
    mask = anat / "sub-02_desc-brain_mask.nii.gz"
    assert nib.load(str(preproc)).shape == nib.load(str(mask)).shape == nib.load(str(t1w)).shape
    assert json.loads((anat / "sub-02_desc-preproc_T1w.json").read_text())["SkullStripped"] is True
    # pybids, validating, indexes them by their entities
    import bids

    layout = bids.BIDSLayout(out, validate=True, is_derivative=True)
    for query in ({"desc": "preproc", "suffix": "T1w"}, {"desc": "brain", "suffix": "mask"},
                  {"space": "T1w", "desc": "demons", "suffix": "dseg", "extension": ".nii.gz"},
                  {"desc": "demons", "suffix": "xfm", "extension": ".h5"}):
        assert layout.get(subject="02", **query), query
