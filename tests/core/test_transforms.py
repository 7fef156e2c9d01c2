"""transforms.py: the one Transform type, its algebra, Jacobians and the ANTs/ITK file round trip."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hdar_pipeline.core.images import Grid, new_image, to_ants
from hdar_pipeline.core.transforms import Transform, folding_fraction


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for lab in np.unique(a[a > 0]):
        x, y = a == lab, b == lab
        out[int(lab)] = 2 * np.logical_and(x, y).sum() / (x.sum() + y.sum())
    return out


@pytest.fixture(scope="module")
def grid() -> Grid:
    aff = np.diag([1.2, 1.0, 1.5, 1.0])
    th = 0.15
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = [-25.0, -20.0, -27.0]
    return Grid((40, 48, 36), aff)


@pytest.fixture(scope="module")
def labels(grid) -> np.ndarray:
    rng = np.random.default_rng(3)
    lab = np.zeros(grid.shape, np.int32)
    for value in range(1, 7):
        c = rng.integers(10, 28, 3)
        lab[c[0] - 6:c[0] + 6, c[1] - 7:c[1] + 7, c[2] - 5:c[2] + 5] = value
    return lab


@pytest.fixture(scope="module")
def affine() -> np.ndarray:
    a = 0.1
    A = np.eye(4)
    A[:3, :3] = 1.05 * np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    A[:3, 3] = [2.0, -3.0, 1.5]
    return A


@pytest.fixture(scope="module")
def field(grid) -> np.ndarray:
    rng = np.random.default_rng(4)
    f = np.stack([ndimage.gaussian_filter(rng.normal(size=grid.shape), 4) for _ in range(3)], -1)
    return (f / np.abs(f).max() * 4.0).astype(np.float32)  # up to 4 mm, smooth


@pytest.mark.parametrize("parts", ["affine", "affine+field", "field"])
def test_ants_round_trip_warps_labels_identically(tmp_path, grid, labels, affine, field, parts):
    """Our warp and ants.apply_transforms on our written files agree (Dice >= 0.99 per label)."""
    import ants

    transform = Transform(grid, affine=affine if "affine" in parts else None,
                          field=field if "field" in parts else None)
    ours = np.asarray(transform.apply(new_image(labels, grid), interpolation="nearest").dataobj)
    files = transform.write(tmp_path, prefix="sub_")
    assert [p.name for p in files] == [n for n in ("sub_warp.nii.gz", "sub_affine.mat")
                                       if ("field" in parts or n.endswith("mat")) and
                                       ("affine" in parts or n.endswith("gz"))]
    image = to_ants(new_image(labels.astype(np.float32), grid))
    for transformlist in ([str(p) for p in files], [str(transform.write_composite(tmp_path / "xfm.h5"))]):
        theirs = ants.apply_transforms(image, image, transformlist=transformlist,
                                       interpolator="nearestNeighbor").numpy()
        scores = dice_per_label(ours, np.rint(theirs).astype(np.int32))
        assert len(scores) == 6 and min(scores.values()) >= 0.99, scores
    # The warp really moved the labels (the round trip is not trivially the identity).
    assert min(dice_per_label(labels, ours).values()) < 0.9


def test_read_back_gives_the_same_mapping(tmp_path, grid, affine, field):
    transform = Transform(grid, affine=affine, field=field)
    from_files = Transform.read(transform.write(tmp_path), grid=grid)
    from_h5 = Transform.read(transform.write_composite(tmp_path / "c.h5"))
    for other in (from_files, from_h5):
        assert np.allclose(other.matrix, affine, atol=1e-6)
        assert np.abs(other.mapped_grid() - transform.mapped_grid()).max() < 1e-4
    with pytest.raises(ValueError, match="needs the fixed grid"):
        Transform.read(Transform(grid, affine=affine).write(tmp_path / "aff"))


def test_composite_h5_stores_the_field_as_float32_losslessly(tmp_path, grid, affine, field):
    import h5py

    transform = Transform(grid, affine=affine, field=field)
    compact = transform.write_composite(tmp_path / "compact.h5")
    gzipped = transform.write_composite(tmp_path / "gzipped.h5", gzip_level=1)
    itk = transform.write_composite(tmp_path / "itk.h5", compact=False)
    for path, compression in ((compact, None), (gzipped, "gzip")):
        with h5py.File(path) as fh:
            params = fh["TransformGroup/2/TransformParameters"]
            assert params.dtype == np.float32 and params.compression == compression and params.size == field.size
            assert fh["TransformGroup/1/TransformParameters"].dtype == np.float64  # the affine, untouched
    with h5py.File(itk) as fh:
        assert fh["TransformGroup/2/TransformParameters"].dtype == np.float64
    assert compact.stat().st_size < 0.6 * itk.stat().st_size
    assert gzipped.stat().st_size < compact.stat().st_size
    for path in (compact, gzipped):
        back = Transform.read(path)
        assert np.array_equal(back.field, transform.field) and np.allclose(back.matrix, transform.matrix)


def test_identity_apply_is_exact(grid, labels):
    img = new_image(labels, grid)
    out = Transform.identity(grid).apply(img, interpolation="nearest")
    assert np.array_equal(np.asarray(out.dataobj), labels)
    zero = Transform(grid, field=np.zeros((*grid.shape, 3), np.float32))
    assert np.array_equal(np.asarray(zero.apply(img, interpolation="nearest").dataobj), labels)


def test_translation_field_shifts_image_by_one_voxel(grid):
    data = np.random.default_rng(0).uniform(size=grid.shape).astype(np.float32)
    step = grid.lps_affine[:3, 0]  # one voxel along i, in LPS mm
    shift = Transform(grid, field=np.broadcast_to(step, (*grid.shape, 3)).copy())
    out = np.asarray(shift.apply(new_image(data, grid)).dataobj)
    assert np.allclose(out[:-1], data[1:], atol=1e-5)  # T(p) = p + step samples the next voxel
    assert np.all(out[-1] == 0)


def test_map_points_agrees_with_mapped_grid(grid, affine, field):
    transform = Transform(grid, affine=affine, field=field)
    idx = np.array([[3, 4, 5], [20, 30, 10], [39, 47, 35]])
    pts = (grid.lps_affine @ np.c_[idx, np.ones(3)].T).T[:, :3]
    assert np.allclose(transform.map_points(pts), transform.mapped_grid()[tuple(idx.T)], atol=1e-4)


def test_compose_matches_sequential_application(grid, labels, affine, field):
    img = new_image(labels.astype(np.float32), grid)
    outer_affine = Transform(grid, affine=affine)
    inner_field = Transform(grid, field=field)
    composed = outer_affine.compose(inner_field)
    assert composed.affine is not None and composed.field is not None
    assert np.allclose(composed.mapped_grid(), outer_affine.map_points(inner_field.mapped_grid()), atol=1e-4)
    # A field after a field: compose folds both into one field; points agree with sequential mapping.
    other = Transform(grid, field=np.roll(field, 5, axis=0) * 0.5)
    both = other.compose(Transform(grid, affine=affine, field=field))
    seq = other.map_points(Transform(grid, affine=affine, field=field).mapped_grid().astype(np.float64))
    assert np.abs(both.mapped_grid() - seq).max() < 1e-3
    dense = Transform(grid, affine=affine, field=field).to_dense()
    assert dense.affine is None
    assert np.abs(dense.mapped_grid() - Transform(grid, affine=affine, field=field).mapped_grid()).max() < 1e-3
    del img


def test_jacobian_of_affine_and_of_linear_field(grid, affine):
    assert np.allclose(Transform(grid, affine=affine).jacobian_determinant(), np.linalg.det(affine[:3, :3]))
    # u(p) = B p (linear in LPS mm) has Jacobian det(I + B) everywhere, whatever the grid's orientation.
    B = np.array([[0.1, 0.05, 0.0], [0.0, -0.2, 0.03], [0.02, 0.0, 0.15]])
    pts = grid.lps_points(np.float64)
    lin = Transform(grid, field=(pts @ B.T).astype(np.float32))
    jac = lin.jacobian_determinant()
    assert np.allclose(jac, np.linalg.det(np.eye(3) + B), atol=1e-4)
    assert folding_fraction(jac) == 0.0


def test_folding_detected(grid):
    # A displacement that reverses the i axis locally folds space.
    f = np.zeros((*grid.shape, 3), np.float32)
    pts = grid.lps_points(np.float64)
    axis = grid.lps_affine[:3, 0] / np.linalg.norm(grid.lps_affine[:3, 0])
    f[10:20] = (-2.0 * (pts[10:20] @ axis))[..., None] * axis
    jac = Transform(grid, field=f).jacobian_determinant()
    frac = folding_fraction(jac)
    assert 0.1 < frac < 0.35
    mask = np.zeros(grid.shape, bool)
    mask[:5] = True
    assert folding_fraction(jac, mask) == 0.0


def test_bad_shapes_rejected(grid):
    with pytest.raises(ValueError, match="field must have shape"):
        Transform(grid, field=np.zeros((3, 3, 3, 3)))
    with pytest.raises(ValueError, match="affine must be 4x4"):
        Transform(grid, affine=np.eye(3))


def test_folding_over_the_brain_agrees_with_ants_composing_the_written_files(tmp_path):
    """registration.json's folded_percent_mask is jacobian_statistics over the fixed brain; ANTs composing the
    files we wrote (as shared/tools/evaltool.py does) must count the same folded brain voxels."""
    import ants

    from hdar_pipeline.core.images import save_image
    from hdar_pipeline.evaluation.metrics import jacobian_statistics

    grid = Grid((30, 34, 28), np.array([[-1.2, 0, 0, 10], [0, -1.0, 0, 5], [0, 0, 1.1, -3], [0, 0, 0, 1]]))
    idx = np.indices(grid.shape).astype(float)
    centre = (np.asarray(grid.shape) - 1) / 2
    r2 = sum(((idx[a] - centre[a]) / (0.35 * grid.shape[a])) ** 2 for a in range(3))
    brain = r2 < 1
    # a displacement with a strong local compression: folds near the centre, smooth elsewhere
    bump = np.exp(-((idx[0] - centre[0]) ** 2 + (idx[1] - centre[1]) ** 2 + (idx[2] - centre[2]) ** 2) / 8.0)
    field = np.zeros((*grid.shape, 3), np.float32)
    field[..., 0] = (-3.5 * (idx[0] - centre[0]) * bump).astype(np.float32)
    t = Transform(grid, affine=np.diag([1.05, 0.97, 1.0, 1.0]), field=field)
    ours = jacobian_statistics(t, brain)
    assert ours["folded_percent_mask"] > 0.5
    fixed_path = tmp_path / "fixed.nii.gz"
    save_image(new_image(brain.astype(np.float32), grid), fixed_path)
    files = [str(p) for p in t.write(tmp_path, prefix="t_")]
    fixed = ants.image_read(str(fixed_path))
    composed = ants.apply_transforms(fixed, fixed, transformlist=files, compose=str(tmp_path / "comp"))
    disp = ants.image_read(composed).numpy()
    d = np.array(fixed.direction).reshape(3, 3)
    u = np.einsum("ij,xyzj->xyzi", np.linalg.inv(d), disp)
    jac = np.zeros(u.shape[:3] + (3, 3))
    for i in range(3):
        g = np.gradient(u[..., i] / fixed.spacing[i], axis=(0, 1, 2))
        for j in range(3):
            jac[..., i, j] = g[j] + (1.0 if i == j else 0.0)
    theirs = 100.0 * np.mean(np.linalg.det(jac)[fixed.numpy() > 0] <= 0)
    assert ours["folded_percent_mask"] == pytest.approx(theirs, abs=0.3)


def test_transform_files_written_and_read_from_threads_at_once(tmp_path, grid, affine, field):
    """ITK's HDF5 is not thread-safe: ``register_files`` writes transform.h5 and inverse.h5 from two threads (an
    affine-only inverse is ready at once), which failed with "H5Dwrite failed" or a segmentation fault."""
    from concurrent.futures import ThreadPoolExecutor

    transforms = [Transform(grid, affine=affine @ np.diag([1 + k / 100, 1, 1, 1])) for k in range(6)]
    transforms += [Transform(grid, affine=affine, field=field * (k + 1)) for k in range(2)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for rep in range(3):
            paths = list(pool.map(lambda kt: kt[1].write_composite(tmp_path / f"t{rep}_{kt[0]}.h5"),
                                  enumerate(transforms)))
            back = list(pool.map(lambda p: Transform.read(p, grid=grid), paths))
            for t, b in zip(transforms, back):
                pts = grid.lps_points(np.float64)[::4, ::4, ::4].reshape(-1, 3)
                assert np.allclose(b.map_points(pts), t.map_points(pts), atol=1e-4)
