"""hdar/layers.py: warping conventions, integration, resizing, crop/pad, and the exit to Transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from hdar_pipeline.hdar.cascade import field_voxels_to_transform, transform_to_field_voxels
from hdar_pipeline.hdar.layers import (ResizeFlow, SpatialTransformer, VecInt, add_patch_, compose_flows,
                                       crop_patch, crop_to, grid_sample_3d, pad_to_multiple, resize_volume,
                                       sampling_locations, smooth)
from hdar_pipeline.core.images import Grid, new_image


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def smooth_field(shape, amplitude, seed, sigma=3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(3)], 0)
    return (f / np.abs(f).max() * amplitude).astype(np.float32)


def blob_image(shape, seed=0) -> np.ndarray:
    """Smooth random texture inside an ellipsoid, zero (with a margin) outside."""
    rng = np.random.default_rng(seed)
    tex = ndimage.gaussian_filter(rng.random(shape), 1.5)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    idx = np.indices(shape).astype(np.float64)
    c = (np.asarray(shape) - 1) / 2.0
    r = sum(((idx[a] - c[a]) / (0.33 * shape[a])) ** 2 for a in range(3))
    return (tex * (r < 1)).astype(np.float32)


def test_translation_moves_along_the_right_axis():
    """flow channel c = +d samples voxel x + d along array axis c (so content moves by -d)."""
    shape = (9, 11, 7)
    img = torch.zeros(1, 1, *shape)
    img[0, 0, 4, 5, 3] = 1.0
    st = SpatialTransformer()
    for axis, d in [(0, 2.0), (1, -3.0), (2, 1.0)]:
        flow = torch.zeros(1, 3, *shape)
        flow[:, axis] = d
        out = st(img, flow)
        expected = [4, 5, 3]
        expected[axis] -= int(d)
        assert out[0, 0][tuple(expected)] == pytest.approx(1.0)
        assert out.sum().item() == pytest.approx(1.0)


def test_fractional_translation_is_linear_and_nearest_rounds():
    shape = (6, 8, 5)
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8, 1).expand(1, 1, *shape).contiguous()
    flow = torch.zeros(1, 3, *shape)
    flow[:, 1] = 0.25
    out = SpatialTransformer("bilinear")(ramp, flow)
    assert torch.allclose(out[0, 0, :, :7], ramp[0, 0, :, :7] + 0.25, atol=1e-5)
    flow[:, 1] = 0.75
    near = SpatialTransformer("nearest")(ramp, flow)
    assert torch.allclose(near[0, 0, :, :7], ramp[0, 0, :, :7] + 1.0)


def test_odd_shapes_and_batches():
    shape = (37, 45, 29)
    src = torch.rand(2, 4, *shape)
    out = SpatialTransformer()(src, torch.zeros(1, 3, *shape))
    assert out.shape == src.shape and torch.allclose(out, src, atol=1e-5)
    with pytest.raises(ValueError):
        SpatialTransformer()(src, torch.zeros(1, 3, 36, 45, 29))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")])
def test_grid_sample_3d_on_several_threads_is_grid_sample(threads, mode, padding):
    """The slab-batched sampler gives grid_sample's values (bit for bit) and gradients, for an output size
    that the thread count does not divide, sampling far outside the volume too."""
    rng = np.random.default_rng(3)
    vol = torch.tensor(rng.random((1, 2, 23, 19, 17)), dtype=torch.float32, requires_grad=True)
    flow = torch.tensor(rng.normal(scale=4.0, size=(1, 3, 47, 40, 37)), dtype=torch.float32)
    locs = sampling_locations(flow, vol.shape[2:]).requires_grad_(mode == "bilinear")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = grid_sample_3d(vol, locs, mode=mode, padding_mode=padding)
        ref = torch.nn.functional.grid_sample(vol, locs, mode=mode, padding_mode=padding, align_corners=True)
        assert ours.shape == ref.shape == (1, 2, 47, 40, 37)
        assert torch.equal(ours, ref)
        if mode == "bilinear":
            g_ours = torch.autograd.grad((ours * ref.detach()).sum(), [vol, locs])
            g_ref = torch.autograd.grad((ref * ref.detach()).sum(), [vol, locs])
            for a, b in zip(g_ours, g_ref):
                # the border voxels gather thousands of contributions: float32 sums in another order
                torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-4)
    finally:
        torch.set_num_threads(previous)


def test_sampling_locations_without_gradient_are_those_with_gradient_and_the_textbook_grid():
    """Written in place (no gradient) or stacked (gradient): the same values, bit for bit, on a box of a larger
    volume; both are the identity grid plus the flow in grid_sample's normalised (z, y, x) order; gradients reach
    the flow."""
    rng = np.random.default_rng(5)
    shape, start = (21, 17, 13), (3, 2, 4)
    flow = torch.tensor(rng.normal(scale=3.0, size=(1, 3, 11, 9, 7)), dtype=torch.float32)
    with torch.no_grad():
        fast = sampling_locations(flow, shape, start)
    grad_flow = flow.clone().requires_grad_(True)
    stacked = sampling_locations(grad_flow, shape, start)
    assert stacked.requires_grad and not fast.requires_grad
    assert torch.equal(fast, stacked.detach())
    idx = np.stack(np.meshgrid(*[np.arange(n) + s for n, s in zip(flow.shape[2:], start)], indexing="ij"), 0)
    points = idx + flow[0].numpy()
    textbook = np.stack([2.0 * points[c] / (shape[c] - 1) - 1.0 for c in (2, 1, 0)], -1)[None]
    np.testing.assert_allclose(fast.numpy(), textbook, rtol=0, atol=1e-5)
    (stacked.sum()).backward()
    assert grad_flow.grad is not None and float(grad_flow.grad.abs().sum()) > 0


def test_vecint_zero_and_constant_and_small_smooth():
    shape = (20, 18, 16)
    vi = VecInt(7)
    assert torch.count_nonzero(vi(torch.zeros(1, 3, *shape))) == 0
    const = torch.zeros(1, 3, *shape)
    const[:, 0], const[:, 1], const[:, 2] = 0.6, -0.3, 0.2
    assert torch.allclose(vi(const), const, atol=1e-5)  # a translation is its own exponential
    v = torch.from_numpy(smooth_field(shape, 0.3, 1, sigma=4.0))[None]
    assert (vi(v) - v).abs().max() < 0.02  # exp(v) ~ id + v for small smooth v


def test_vecint_gives_an_invertible_map_where_plain_displacement_folds():
    """A strongly compressive velocity used as a displacement folds; its exponential does not."""
    from hdar_pipeline.hdar.losses import jacobian_determinant

    shape = (32, 10, 8)
    x = np.arange(32, dtype=np.float64) - 15.5
    v = np.zeros((1, 3, *shape), np.float32)
    v[0, 0] = (-2.0 * x * np.exp(-x ** 2 / 32.0))[:, None, None]  # d v_0 / d x = -2 at the centre
    v = torch.from_numpy(v)
    assert (jacobian_determinant(v) <= 0).any()
    assert (jacobian_determinant(VecInt(7)(v)) > 0).all()


def test_resize_flow_rescales_vectors_and_keeps_odd_shapes():
    flow = torch.zeros(1, 3, 37, 45, 29)
    flow[:, 0], flow[:, 1], flow[:, 2] = 2.0, -4.0, 1.0
    down = ResizeFlow(0.5)(flow)
    assert down.shape[2:] == (18, 22, 14)  # round(n / 2)
    assert torch.allclose(down[0, :, 3, 3, 3], torch.tensor([2.0 * 18 / 37, -4.0 * 22 / 45, 1.0 * 14 / 29]),
                          atol=1e-5)
    up = ResizeFlow()(down, (37, 45, 29))
    assert torch.allclose(up, flow, atol=1e-5)


def test_resize_flow_describes_the_same_physical_map():
    """Warping at half resolution with the resized field ~ warping at full resolution, then resizing."""
    shape = (32, 40, 24)
    img = torch.from_numpy(blob_image(shape, 2))[None, None]
    flow = torch.from_numpy(smooth_field(shape, 3.0, 3, sigma=5.0))[None]
    st = SpatialTransformer()
    full = resize_volume(st(img, flow), (16, 20, 12))
    half = st(resize_volume(img, (16, 20, 12)), ResizeFlow()(flow, (16, 20, 12)))
    assert (full - half).abs().mean() < 0.1 * full.abs().mean()


def test_compose_flows_is_exact_for_linear_fields():
    """u(x) = A x + b after r(x) = c: the composed displacement is c + A (x + c) + b (trilinear is exact)."""
    shape = (20, 22, 18)
    grid = np.indices(shape).astype(np.float32)
    a = np.array([[0.05, -0.02, 0.01], [0.03, 0.04, -0.05], [0.0, 0.02, -0.03]], np.float32)
    b = np.array([0.5, -1.0, 0.25], np.float32)
    c = np.array([1.25, -0.5, 2.0], np.float32)
    u = np.einsum("ca,axyz->cxyz", a, grid) + b[:, None, None, None]
    r = np.broadcast_to(c[:, None, None, None], u.shape).copy()
    composed = compose_flows(torch.from_numpy(u)[None], torch.from_numpy(r)[None])[0].numpy()
    expected = c[:, None, None, None] + np.einsum("ca,axyz->cxyz", a, grid + c[:, None, None, None]) \
        + b[:, None, None, None]
    inner = (slice(None), slice(1, 17), slice(2, 20), slice(1, 15))  # x + c stays inside the grid
    assert np.abs(composed[inner] - expected[inner]).max() < 1e-4


def test_compose_flows_beats_adding_for_sequential_warps():
    shape = (24, 26, 22)
    img = torch.from_numpy(ndimage.gaussian_filter(blob_image(shape, 4), 2.0))[None, None]
    u = torch.from_numpy(smooth_field(shape, 3.0, 5, sigma=4.0))[None]
    r = torch.from_numpy(smooth_field(shape, 2.5, 6, sigma=4.0))[None]
    st = SpatialTransformer()
    sequential = st(st(img, u), r)  # M(x + r + u(x + r))
    err_compose = (sequential - st(img, compose_flows(u, r))).abs().mean()
    err_add = (sequential - st(img, u + r)).abs().mean()
    assert err_compose < 0.02 * img.max() and err_compose < err_add


def test_smooth_and_resize_volume_keep_constants():
    x = torch.full((1, 2, 17, 13, 11), 0.7)
    assert torch.allclose(smooth(x, 1.5), x, atol=1e-6)
    y = resize_volume(x, (5, 4, 3))
    assert y.shape == (1, 2, 5, 4, 3) and torch.allclose(y, torch.full_like(y, 0.7), atol=1e-6)


def test_smooth_matches_scipy_gaussian_with_nearest_edges():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 19, 14, 9)).astype(np.float32)
    for sigma in ((1.5, 0.0, 1.0), (0.5, 0.5, 0.5)):
        got = smooth(torch.from_numpy(x), sigma).numpy()
        assert got.shape == x.shape
        zeros = smooth(torch.from_numpy(x), sigma, padding="zeros").numpy()  # zero outside (LCC-Demons' windows)
        for b in range(2):
            want = gaussian_filter(x[b, 0].astype(np.float64), sigma, mode="nearest", truncate=3.0)
            # scipy's radius is int(3 sigma + 0.5), ours ceil(3 sigma): equal for these sigmas
            np.testing.assert_allclose(got[b, 0], want, atol=1e-5)
            want = gaussian_filter(x[b, 0].astype(np.float64), sigma, mode="constant", cval=0.0, truncate=3.0)
            np.testing.assert_allclose(zeros[b, 0], want, atol=1e-5)
    with pytest.raises(ValueError, match="padding"):
        smooth(torch.from_numpy(x), 1.0, padding="reflect")


def test_crop_pad_helpers():
    x = torch.arange(5 * 6 * 7, dtype=torch.float32).view(1, 1, 5, 6, 7)
    padded, shape = pad_to_multiple(x, 4)
    assert padded.shape[2:] == (8, 8, 8) and shape == (5, 6, 7)
    assert torch.equal(crop_to(padded, shape), x)
    box = crop_patch(x, (-2, 3, 4), (4, 4, 4))
    assert box.shape[2:] == (4, 4, 4)
    assert torch.equal(box[0, 0, 2:, :3, :3], x[0, 0, :2, 3:6, 4:7])
    assert box[0, 0, :2].abs().sum() == 0 and box[0, 0, :, 3:].abs().sum() == 0
    rep = crop_patch(x, (-2, 0, 0), (4, 2, 2), mode="replicate")
    assert torch.equal(rep[0, 0, 0], x[0, 0, 0, :2, :2])
    acc = torch.zeros(1, 1, 5, 6, 7)
    add_patch_(acc, torch.ones(1, 1, 4, 4, 4), (-2, 3, 4))
    assert acc.sum() == 2 * 3 * 3 and acc[0, 0, :2, 3:, 4:].min() == 1


# ------------------------------------------------------------------------ the exit to Transform


@pytest.fixture(scope="module")
def oblique_grid() -> Grid:
    """Anisotropic, rotated, non-cubic grid, so any axis or sign mix-up shows."""
    aff = np.diag([1.2, 0.9, 1.5, 1.0])
    th = 0.3
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = [-20.0, 15.0, -10.0]
    return Grid((30, 36, 24), aff)


def test_field_voxels_to_transform_agrees_with_transform_apply(oblique_grid):
    """Our torch warp and Transform.apply of the converted field give the same image."""
    shape = oblique_grid.shape
    img = blob_image(shape, 7)
    flow = smooth_field(shape, 3.0, 8, sigma=4.0)
    flow[0] += 1.5  # a net shift along i too, so axes cannot be confused
    flow[2] -= 0.7
    ours = SpatialTransformer()(torch.from_numpy(img)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()
    transform = field_voxels_to_transform(torch.from_numpy(flow)[None], oblique_grid)
    theirs = np.asarray(transform.apply(new_image(img, oblique_grid)).dataobj)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(ours - img).max() > 0.1  # the warp did something
    # The Transform's mapped points are the world points of voxel v + flow(v).
    v = np.array([10, 20, 5])
    p = oblique_grid.lps_affine @ np.r_[v, 1.0]
    q = transform.map_points(p[None, :3])[0]
    expected = oblique_grid.lps_affine @ np.r_[v + flow[:, v[0], v[1], v[2]], 1.0]
    assert np.allclose(q, expected[:3], atol=1e-4)
    # Nearest-neighbour labels agree too.
    labels = (img > 0.5).astype(np.int32) + (img > 0.3).astype(np.int32)
    ours_l = SpatialTransformer("nearest")(torch.from_numpy(labels.astype(np.float32))[None, None],
                                           torch.from_numpy(flow)[None])[0, 0].numpy()
    theirs_l = np.asarray(transform.apply(new_image(labels, oblique_grid), interpolation="nearest").dataobj)
    assert np.mean(ours_l != theirs_l) < 1e-3  # only exact .5 ties may differ
    back = transform_to_field_voxels(transform)
    assert np.allclose(back, flow, atol=1e-4)


def test_field_voxels_to_transform_rejects_wrong_shapes(oblique_grid):
    with pytest.raises(ValueError):
        field_voxels_to_transform(np.zeros((3, 30, 36, 25), np.float32), oblique_grid)
    with pytest.raises(ValueError):
        field_voxels_to_transform(np.zeros((30, 36, 24, 3), np.float32), oblique_grid)


def test_field_conversion_on_an_oblique_grid_matches_the_matrix_product():
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0.0, -1.2, 0.1], [0.9, 0.0, 0.0], [0.05, 0.0, 1.1]])
    grid = Grid((5, 6, 4), affine)
    flow = rng.normal(size=(3, 5, 6, 4)).astype(np.float32)
    field = field_voxels_to_transform(flow, grid).field
    expected = np.einsum("ca,axyz->xyzc", grid.lps_affine[:3, :3], flow.astype(np.float64))
    assert field.dtype == np.float32 and np.allclose(field, expected, atol=1e-5)
    assert np.allclose(transform_to_field_voxels(field_voxels_to_transform(flow, grid)), flow, atol=1e-5)
