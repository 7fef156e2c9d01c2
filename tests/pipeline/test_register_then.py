"""``register_files(then=...)``: the registration followed by an affine, written once (issue 16).

The cohort runs register the preprocessed image (on the atlas grid) and follow it with the preprocessing's atlas ->
native affine: one composite holds both, the native labels are warped once by the whole mapping, and the Jacobian
map written beside it is that of the whole mapping.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from conftest import make_brain_phantom, mean_dice
from test_bids_app_xfm import moved

from hdar_pipeline.core.images import save_image
from hdar_pipeline.pipeline.registration import register_files
from hdar_pipeline.core.synthetic import make_subject
from hdar_pipeline.core.transforms import Transform, write_affine

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def test_then_composes_the_affine_and_warps_the_native_labels_once(tmp_path):
    atlas = make_brain_phantom((32, 32, 32), 3.0)
    fixed = save_image(atlas.image, tmp_path / "atlas.nii.gz")
    s = make_subject(atlas.image, atlas.labels, seed=5, magnitude_mm=8.0, smoothness_mm=15.0)
    # the "preprocessed" subject on the atlas grid, and the same subject as its scanner stored it: the same voxels
    # 5 degrees and a few mm away in world space
    preproc = save_image(s.image, tmp_path / "preproc.nii.gz")
    native_labels = save_image(moved(s.labels), tmp_path / "native_dseg.nii.gz")
    on_grid_labels = save_image(s.labels, tmp_path / "preproc_dseg.nii.gz")
    world = moved(s.labels).affine @ np.linalg.inv(s.labels.affine)  # atlas-grid world -> native world (RAS)
    then = write_affine(RAS_TO_LPS @ world @ RAS_TO_LPS, tmp_path / "to_native.mat")

    plain = register_files(fixed, preproc, tmp_path / "plain", method="demons", moving_labels=on_grid_labels,
                           affine=False, seed=1, threads=1)
    rec = register_files(fixed, preproc, tmp_path / "then", method="demons", moving_labels=native_labels,
                         affine=False, seed=1, threads=1, then=then, separate_files=False, jacobian_map=True)
    out = tmp_path / "then"
    # the field is written once, in the composite; no separate field or affine file
    assert rec["transforms"] == ["transform.h5"] and rec["composite_transform"] == "transform.h5"
    assert not (out / "transform_warp.nii.gz").exists() and not (out / "transform_affine.mat").exists()
    assert rec["inputs"]["then_sha256"]
    # the native labels, warped once by registration + affine, are the on-grid labels warped by the registration
    ref = np.asarray(atlas.labels.dataobj)
    a = np.asarray(nib.load(out / "warped_labels.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "plain" / "warped_labels.nii.gz").dataobj)
    assert mean_dice(b, a) > 0.99
    assert abs(mean_dice(ref, a) - mean_dice(ref, b)) < 0.01
    # the composite maps atlas points to native points: the plain field, then the affine
    composite = Transform.read(out / "transform.h5", grid=atlas.image)
    field = Transform.read(tmp_path / "plain" / "transform.h5", grid=atlas.image)
    pts = composite.grid.lps_points(np.float64)[::3, ::3, ::3]
    expect = (RAS_TO_LPS @ world @ RAS_TO_LPS)[:3, :3] @ field.map_points(pts)[..., None]
    expect = expect[..., 0] + (RAS_TO_LPS @ world @ RAS_TO_LPS)[:3, 3]
    assert np.abs(composite.map_points(pts) - expect).max() < 1e-3
    # the Jacobian map is the whole mapping's, and its statistics are the record's
    det = np.asarray(nib.load(out / "jacobian.nii.gz").dataobj)
    assert np.allclose(det, composite.jacobian_determinant(), atol=1e-5)
    assert rec["jacobian"]["folded_percent_grid"] == plain["jacobian"]["folded_percent_grid"]
    assert rec["jacobian"]["min"] == float(det.min())


def test_the_evaluation_takes_the_written_jacobian_map_instead_of_the_transform(tmp_path):
    import pytest

    from hdar_pipeline.evaluation.evaluate import evaluate
    from hdar_pipeline.core.images import ImageError
    from hdar_pipeline.evaluation.metrics import JACOBIAN_COLUMNS

    atlas = make_brain_phantom((32, 32, 32), 3.0)
    fixed = save_image(atlas.image, tmp_path / "atlas.nii.gz")
    ref = save_image(atlas.labels, tmp_path / "atlas_dseg.nii.gz")
    s = make_subject(atlas.image, atlas.labels, seed=7, magnitude_mm=8.0, smoothness_mm=15.0)
    moving = save_image(s.image, tmp_path / "moving.nii.gz")
    labels = save_image(s.labels, tmp_path / "moving_dseg.nii.gz")
    register_files(fixed, moving, tmp_path / "r", method="demons", moving_labels=labels, affine=False, seed=1,
                   threads=1, jacobian_map=True)
    warped = tmp_path / "r" / "warped_labels.nii.gz"
    from_transform = evaluate(ref, warped, transform=tmp_path / "r" / "transform.h5")
    from_map = evaluate(ref, warped, jacobian=tmp_path / "r" / "jacobian.nii.gz")
    cols = [c for c in JACOBIAN_COLUMNS if c in from_map.jacobian]
    assert cols and np.allclose(from_map.jacobian[cols].to_numpy(float), from_transform.jacobian[cols].to_numpy(float),
                                rtol=1e-5, atol=1e-6, equal_nan=True)
    other = save_image(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.diag([6.0, 6.0, 6.0, 1.0])),
                       tmp_path / "other_jacobian.nii.gz")
    with pytest.raises(ImageError, match="other_jacobian.nii.gz"):
        evaluate(ref, warped, jacobian=other)
