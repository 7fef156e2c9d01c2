"""The inverse of a registration (hdar_pipeline.core.inverse) and the regional volumes (hdar_pipeline.core.volumes)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hdar_pipeline.core.images import Grid, save_image
from hdar_pipeline.core.inverse import inverse_consistency, invert, invert_field
from hdar_pipeline.core.transforms import Transform
from hdar_pipeline.core.volumes import label_volumes


def smooth_field(shape, sigma: float, amplitude_mm: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(3)], -1)
    return (field * amplitude_mm / np.abs(field).max()).astype(np.float32)


def oblique_grid(shape, spacing=(1.2, 1.0, 1.1), origin=(50.0, -60.0, -40.0)) -> Grid:
    affine = np.diag([*spacing, 1.0])
    affine[:3, :3] = affine[:3, :3] @ np.array([[1, 0.05, 0], [-0.05, 1, 0], [0, 0, 1]])
    affine[:3, 3] = origin
    return Grid(shape, affine)


AFFINE = np.array([[1.05, 0.05, 0.0, 3.0], [-0.03, 0.95, 0.02, -5.0], [0.0, 0.01, 1.1, 8.0], [0, 0, 0, 1]])


def test_inverse_maps_native_points_back_to_the_atlas():
    atlas = oblique_grid((40, 48, 40))
    forward = Transform(atlas, affine=AFFINE, field=smooth_field(atlas.shape, 5, 6.0))
    assert forward.jacobian_determinant().min() > 0.2
    # a 1 mm native grid (RAS axes) around the mapped atlas, with a margin
    lps = forward.mapped_grid().reshape(-1, 3)
    ras_low = np.minimum((lps * [-1, -1, 1]).min(0), (lps * [-1, -1, 1]).max(0)) - 10
    ras_high = np.maximum((lps * [-1, -1, 1]).min(0), (lps * [-1, -1, 1]).max(0)) + 10
    native_affine = np.eye(4)
    native_affine[:3, 3] = ras_low
    native = Grid(tuple(int(v) for v in np.ceil(ras_high - ras_low)), native_affine)
    result = invert(forward, native)
    assert result.source == "newton" and result.residual_mm < 0.05
    assert result.transform.grid.same_as(native) and np.allclose(result.transform.affine, np.linalg.inv(AFFINE))
    inside = np.zeros(atlas.shape, bool)
    inside[5:-5, 5:-5, 5:-5] = True
    c = inverse_consistency(forward, result.transform, mask=inside)
    # the field is resampled once onto the 1 mm native grid: within a few hundredths of a voxel
    assert c["mean_mm"] < 0.05 and c["max_mm"] < 0.2 and c["voxels"] == inside.sum()
    # a wrong inverse is seen: the forward transform itself is far from it
    assert inverse_consistency(forward, Transform(native, affine=np.linalg.inv(AFFINE)), mask=inside)["mean_mm"] > 1


@pytest.mark.parametrize("native_shape", [(30, 25, 12), (13, 1, 11)])
def test_inverse_field_is_sampled_at_every_native_voxel(native_shape):
    """The native field is ``L w(A^-1 q)``, ``w`` linearly interpolated (edge-extended) at each native voxel ``q``:
    checked against scipy's interpolation on an oblique anisotropic native grid, one with a single-voxel axis."""
    atlas = oblique_grid((20, 17, 9), spacing=(1.5, 1.2, 2.5))
    w = smooth_field(atlas.shape, 2, 3.0, seed=3)
    forward = Transform(atlas, affine=AFFINE, field=-w)
    native_affine = np.array([[0.0, 0.7, 0.1, 45.0], [-0.7, 0.0, 0.2, -40.0], [0.0, 0.1, 1.0, -35.0], [0, 0, 0, 1]])
    native = Grid(native_shape, native_affine)
    field = invert(forward, native, inverse_field=w).transform.field
    index = np.stack(np.meshgrid(*[np.arange(n) for n in native_shape], indexing="ij"), -1).reshape(-1, 3)
    to_atlas = np.linalg.inv(atlas.lps_affine) @ np.linalg.inv(AFFINE) @ native.lps_affine
    at = index @ to_atlas[:3, :3].T + to_atlas[:3, 3]
    lw = w @ AFFINE[:3, :3].T
    expected = np.stack([ndimage.map_coordinates(lw[..., c], at.T, order=1, mode="nearest") for c in range(3)], -1)
    assert np.abs(field.reshape(-1, 3) - expected).max() < 1e-4


def test_newton_converges_where_the_mapping_stretches_threefold():
    """A plain fixed point (w <- -u(y + w)) diverges where x + u(x) stretches more than twofold."""
    n = 64
    grid = Grid((n, 8, 8), np.eye(4))
    x = np.arange(n, dtype=np.float64)
    # x -> x + u(x) with slope 3 between 24 and 40 (smoothly joined), invertible everywhere
    slope = 1 + 2 * ndimage.gaussian_filter1d(((x > 24) & (x < 40)).astype(float), 2)
    mapping = np.cumsum(slope) - slope[0]
    mapping = mapping * (n - 1) / mapping[-1]
    u = np.zeros((n, 8, 8, 3), np.float32)
    u[..., 0] = (mapping - x)[:, None, None]
    # the grid's LPS x is -i: the field's LPS component along i is the negative
    u[..., 0] *= -1
    w, iterations, residual = invert_field(u, grid)
    assert residual < 0.05 and iterations <= 12
    # plain fixed point on the same problem does not get there in as many steps
    fixed = -u[:, 0, 0, 0].astype(np.float64)
    for _ in range(12):
        fixed = -np.interp(x + (-fixed), x, -u[:, 0, 0, 0])
    fixed_residual = np.abs(-fixed + np.interp(x - fixed, x, -u[:, 0, 0, 0]))
    assert fixed_residual.max() > 0.05


def test_affine_only_inverse_is_exact():
    atlas = oblique_grid((10, 12, 10))
    native = Grid((20, 20, 20), np.eye(4))
    result = invert(Transform(atlas, affine=AFFINE), native)
    assert result.transform.field is None and np.allclose(result.transform.affine, np.linalg.inv(AFFINE))


def test_syn_keeps_its_own_inverse_and_register_files_writes_it(tmp_path):
    pytest.importorskip("ants")
    import ants

    from conftest import make_brain_phantom
    from hdar_pipeline.pipeline.registration import register_files
    from hdar_pipeline.core.synthetic import make_subject

    atlas = make_brain_phantom((32, 32, 32), 3.0)
    s = make_subject(atlas.image, atlas.labels, seed=3, magnitude_mm=8.0, smoothness_mm=15.0)
    fixed, moving = save_image(atlas.image, tmp_path / "f.nii.gz"), save_image(s.image, tmp_path / "m.nii.gz")
    fixed_labels = save_image(atlas.labels, tmp_path / "fl.nii.gz")
    moving_labels = save_image(s.labels, tmp_path / "ml.nii.gz")
    rec = register_files(fixed, moving, tmp_path / "out", method="syn", moving_labels=moving_labels, seed=1,
                         threads=1, inverse_on=moving, fixed_labels=fixed_labels)
    assert rec["inverse"]["source"] == "method"
    assert rec["inverse"]["consistency_mm"]["mean_mm"] < 0.3  # 3 mm voxels
    written = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert written["inverse"]["grid_of"] == str(moving.resolve())
    # antspyx applies inverse.h5 to the atlas labels exactly as we did
    ours = np.asarray(nib.load(tmp_path / "out" / "fixed_labels_native.nii.gz").dataobj)
    theirs = ants.apply_transforms(ants.image_read(str(moving)), ants.image_read(str(fixed_labels)),
                                   transformlist=[str(tmp_path / "out" / "inverse.h5")],
                                   interpolator="nearestNeighbor").numpy()
    assert (np.rint(theirs).astype(int) == ours).mean() > 0.999
    # and the atlas labels land on the subject's own labels
    own = np.asarray(s.labels.dataobj)
    dice = [2 * ((own == v) & (ours == v)).sum() / ((own == v).sum() + (ours == v).sum())
            for v in np.unique(own[own > 0])]
    assert np.mean(dice) > 0.8


def test_fixed_labels_need_inverse_on(tmp_path):
    from conftest import make_brain_phantom
    from hdar_pipeline.pipeline.registration import register_files

    atlas = make_brain_phantom((16, 16, 16), 3.0)
    f = save_image(atlas.image, tmp_path / "f.nii.gz")
    with pytest.raises(ValueError, match="inverse_on"):
        register_files(f, f, tmp_path / "out", method="demons",
                       fixed_labels=save_image(atlas.labels, tmp_path / "l.nii.gz"))


def test_label_volumes_count_native_voxels_and_integrate_the_jacobian(tmp_path):
    native = np.zeros((10, 10, 10), np.int16)
    native[:4] = 1
    native[6:] = 2
    native_path = save_image(nib.Nifti1Image(native, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "native.nii.gz")
    atlas = np.zeros((8, 8, 8), np.int16)
    atlas[:4] = 1
    atlas[4:] = 2
    atlas[0, 0, 0] = 3  # a label the subject lost: volume 0, not left out
    atlas_path = save_image(nib.Nifti1Image(atlas, np.eye(4)), tmp_path / "atlas.nii.gz")
    jac = np.where(atlas == 1, 2.0, 0.5).astype(np.float32)
    jac_path = save_image(nib.Nifti1Image(jac, np.eye(4)), tmp_path / "jac.nii.gz")
    table = label_volumes(native_path, atlas_labels=atlas_path, jacobian=jac_path, names={1: "a", 2: "b"})
    assert list(table["index"]) == [1, 2, 3] and list(table["name"]) == ["a", "b", "n/a"]
    assert list(table["voxels"]) == [400, 400, 0]
    assert table["volume_mm3"].tolist() == pytest.approx([3200.0, 3200.0, 0.0])  # 8 mm^3 voxels
    assert table["volume_jacobian_mm3"].tolist() == pytest.approx([(256 - 1) * 2.0, 256 * 0.5, 0.5])
    with pytest.raises(ValueError, match="Jacobian map of shape"):
        label_volumes(native_path, atlas_labels=atlas_path, jacobian=native_path)
