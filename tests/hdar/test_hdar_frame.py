"""hdar/frame.py and restoring.py: HDAR's canonical frame (axis order, voxel size, brain-centred box) and the
re-storing of an image in other frames; images.robust_unit_range (one normalisation for training and
inference)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from hdar_pipeline.hdar.frame import brain_box, canonical_frame, normalise_in_frame
from hdar_pipeline.core.images import Grid, new_image, robust_unit_range
from hdar_pipeline.core.restoring import FRAMES, StorageFrame, restore, storage_grid


def lps_brain(shape=(40, 48, 40), centre_shift=(3, -4, 2), seed=0) -> nib.Nifti1Image:
    """A smooth textured ellipsoid on an LPS 1 mm grid, off the grid's centre, zero outside."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(float)
    c = (np.asarray(shape) - 1) / 2 + np.asarray(centre_shift)
    r = np.sqrt(sum(((idx[a] - c[a]) / (0.3 * shape[a])) ** 2 for a in range(3)))
    tex = ndimage.gaussian_filter(rng.random(shape), 1.5)
    data = ((r < 1) * (0.2 + tex)).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS affine of an L-P-S array
    affine[:3, 3] = [20.0, 30.0, -10.0]
    return new_image(data, Grid(shape, affine))


def test_robust_unit_range_background_offsets_and_idempotence():
    img = np.asarray(lps_brain().dataobj)
    once = robust_unit_range(img)
    assert once.min() == 0.0 and once.max() == 1.0 and once.dtype == np.float32
    assert np.array_equal(once == 0, img == 0)  # the background is exactly 0, the brain above it
    np.testing.assert_array_equal(robust_unit_range(once), once)  # a second pass changes nothing
    # an int16 file with an offset background and another scale: the same image
    stored = np.rint(img * 1500.0 + 40.0).astype(np.int16)
    np.testing.assert_allclose(robust_unit_range(stored), once, atol=2e-3)
    # no background (every voxel above the minimum): percentiles at both ends
    noisy = np.random.default_rng(0).normal(100.0, 10.0, (20, 20, 20)).astype(np.float32)
    out = robust_unit_range(noisy)
    assert out.min() == 0.0 and out.max() == 1.0 and 0.3 < out.mean() < 0.7


@pytest.mark.parametrize("name", ["asl-offcentre", "ras-int16"])
def test_exact_frames_give_the_network_the_same_arrays(name):
    """Re-stored with the same voxel size (another axis order, a larger off-centre field of view, int16 with an
    offset), the canonical box is snapped onto the voxels: the normalised arrays are the native ones."""
    img = lps_brain()
    data = np.asarray(img.dataobj)
    frame = canonical_frame(Grid.of(img), brain_box(data), shape=(48, 48, 48))
    assert frame.exact and frame.grid.shape == (48, 48, 48)
    native = normalise_in_frame(frame.to_canonical(data))
    small = StorageFrame(name, FRAMES[name].orientation, (64, 70, 56) if FRAMES[name].shape else None, None,
                         (6.0, -5.0, 4.0) if FRAMES[name].shape else (0, 0, 0), FRAMES[name].dtype,
                         FRAMES[name].intensity_scale, FRAMES[name].intensity_offset)
    other = restore(img, small)
    assert nib.aff2axcodes(other.affine) == tuple(small.orientation)
    odata = np.asarray(other.dataobj)
    oframe = canonical_frame(Grid.of(other), brain_box(odata), shape=(48, 48, 48))
    assert oframe.exact
    np.testing.assert_allclose(oframe.grid.affine, frame.grid.affine, atol=1e-4)  # the same box in the world
    np.testing.assert_allclose(normalise_in_frame(oframe.to_canonical(odata)).numpy(), native.numpy(), atol=2e-3)


def test_other_voxel_sizes_are_resampled_into_the_same_world_box():
    img = lps_brain()
    data = np.asarray(img.dataobj)
    frame = canonical_frame(Grid.of(img), brain_box(data), shape=(48, 48, 48))
    native = normalise_in_frame(frame.to_canonical(data))
    coarse = restore(img, StorageFrame("psr-1.25", "PSR", None, (1.25, 1.25, 1.25)))
    cframe = canonical_frame(Grid.of(coarse), brain_box(np.asarray(coarse.dataobj)), shape=(48, 48, 48))
    assert not cframe.exact and cframe.grid.shape == (48, 48, 48)
    assert np.allclose(cframe.grid.spacing, 1.0)
    # the brain's centre agrees to a coarse voxel; the resampled intensities agree on average
    assert np.abs(cframe.grid.affine[:3, 3] - frame.grid.affine[:3, 3]).max() < 1.3
    out = normalise_in_frame(cframe.to_canonical(np.asarray(coarse.dataobj)))
    assert float((out - native).abs().mean()) < 0.05


def test_field_back_on_the_fixed_grid_is_a_world_vector_and_exact_on_snapped_frames():
    img = lps_brain()
    other = restore(img, StorageFrame("asl", "ASL", (64, 70, 56), None, (6.0, -5.0, 4.0)))
    odata = np.asarray(other.dataobj)
    frame = canonical_frame(Grid.of(other), brain_box(odata), shape=(48, 48, 48))
    # one canonical voxel along the first canonical axis (L in LPS) is +1 mm along LPS x, wherever it lands
    flow = torch.zeros((1, 3, *frame.grid.shape))
    flow[:, 0] = 1.0
    field = frame.field_to_fixed(flow)
    assert field.shape == (*other.shape, 3)
    np.testing.assert_allclose(field.reshape(-1, 3), np.tile([1.0, 0.0, 0.0], (field[..., 0].size, 1)), atol=1e-6)
    # a varying field: the value at each fixed voxel is the canonical value at the same world point
    rng = np.random.default_rng(1)
    flow = torch.from_numpy(rng.normal(size=(1, 3, *frame.grid.shape)).astype(np.float32))
    field = frame.field_to_fixed(flow)
    fixed_grid = Grid.of(other)
    for v in ([10, 20, 30], [32, 35, 28], [40, 30, 20]):
        world = fixed_grid.affine @ np.r_[v, 1.0]
        q = np.rint(np.linalg.solve(frame.grid.affine, world)[:3]).astype(int)
        if all(0 <= q[a] < frame.grid.shape[a] for a in range(3)):
            lps_lin = (np.diag([-1.0, -1.0, 1.0, 1.0]) @ frame.grid.affine)[:3, :3]
            np.testing.assert_allclose(field[tuple(v)], lps_lin @ flow[0, :, q[0], q[1], q[2]].numpy(), atol=1e-5)


def test_box_grows_for_a_large_brain_and_brain_box_ignores_stray_voxels():
    data = np.zeros((100, 100, 100), np.float32)
    data[5:95, 10:90, 20:80] = 1.0
    data[0, 0, 0] = 1.0  # a stray voxel
    lo, hi = brain_box(data)
    assert np.all(lo >= [4, 9, 19]) and np.all(hi <= [95, 90, 80])
    grid = Grid((100, 100, 100), np.diag([-1.0, -1.0, 1.0, 1.0]))
    frame = canonical_frame(grid, (lo, hi), shape=(64, 64, 64))
    assert frame.grid.shape == (112, 96, 80)  # 90 + 16 mm -> 112, 80 + 16 -> 96, 60 + 16 -> 80
    assert canonical_frame(grid, (lo, hi), shape=(64, 64, 64), fit_brain=False).grid.shape == (64, 64, 64)
    with pytest.raises(ValueError, match="not an orientation"):
        canonical_frame(grid, None, orientation="LLS")


def test_storage_grid_keeps_the_anatomy_in_place():
    img = lps_brain()
    for frame in FRAMES.values():
        g = storage_grid(Grid.of(img), frame)
        assert nib.aff2axcodes(g.affine) == tuple(frame.orientation)
        centre = g.affine @ np.r_[(np.asarray(g.shape) - 1) / 2, 1.0]
        src = img.affine @ np.r_[(np.asarray(img.shape) - 1) / 2, 1.0]
        np.testing.assert_allclose(centre[:3] - src[:3], frame.offset_mm, atol=1e-6)
    labels = new_image((np.asarray(img.dataobj) > 0.5).astype(np.int32), img)
    stored = restore(labels, FRAMES["asl-offcentre"], labels=True)
    assert stored.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(stored.dataobj))) <= {0, 1}
