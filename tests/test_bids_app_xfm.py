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

from hdar_pipeline.cli import bids_app_main  # noqa: E402
from hdar_pipeline.images import save_image  # noqa: E402
from hdar_pipeline.synthetic import make_subject  # noqa: E402


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
    xfm = next(anat.glob("sub-02_from-T1w_to-*_mode-image_desc-demons_xfm.h5"))
    ours = next(anat.glob("sub-02_space-*_desc-demons_dseg.nii.gz"))
    fixed = json.loads(xfm.with_suffix(".json").read_text())["Atlas"]
    theirs = ants.apply_transforms(ants.image_read(fixed), ants.image_read(str(native_labels)),
                                   transformlist=[str(xfm)], interpolator="nearestNeighbor").numpy()
    ours = np.asarray(nib.load(str(ours)).dataobj)
    theirs = np.rint(theirs).astype(int)
    assert ours.shape == theirs.shape
    for label in np.unique(ours[ours > 0]):
        a, b = ours == label, theirs == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, label
    # and the registration itself did its job: the warped labels overlap the atlas labels well
    rec = json.loads(next(anat.glob("sub-02_space-*_desc-demons_metrics.json")).read_text())
    assert rec["status"] == "ok" and rec["metrics"]["mean_dice"] > 0.8
    # the Jacobian map beside it is that of the written transform, computed once by the registration
    from hdar_pipeline.transforms import Transform

    jac = next(anat.glob("sub-02_space-*_desc-demons_jacobian.nii.gz"))
    det = Transform.read(xfm, grid=nib.load(fixed)).jacobian_determinant()
    assert np.allclose(np.asarray(nib.load(jac).dataobj), det, atol=1e-5)
    # and the field was written once: the registration's job folder holds the composite alone
    jobs = [p.parent for p in (tmp_path / "work").rglob("registration.json")]
    assert jobs and all(sorted(p.name for p in j.iterdir() if "transform" in p.name) == ["transform.h5"]
                        for j in jobs)
