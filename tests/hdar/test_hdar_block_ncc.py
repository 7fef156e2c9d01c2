"""hdar/block_ncc.py: the full-resolution local NCC of a linearised warp, on a grid of blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hdar_pipeline.hdar.block_ncc import LinearisedBlockNCC, block_product_sums, block_sums, image_gradient
from hdar_pipeline.hdar.layers import SpatialTransformer
from hdar_pipeline.hdar.losses import box_sum
from test_hdar_layers import blob_image

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_block_sums_and_image_gradient():
    x = torch.rand(2, 3, 12, 9, 6, dtype=torch.float64)
    assert torch.allclose(block_sums(x, 3), F.avg_pool3d(x, 3) * 27)
    assert torch.allclose(block_sums(x[..., :8, :8, :6], 2), F.avg_pool3d(x[..., :8, :8, :6], 2) * 8)
    y = x[:, :1]
    assert torch.equal(image_gradient(y), torch.cat(torch.gradient(y, dim=(2, 3, 4)), dim=1))
    for block in (1, 2, 3):
        a, b = x[:, :1, :6, :6, :6], x[..., :6, :6, :6]
        assert torch.allclose(block_product_sums(a, b, block), block_sums(a * b, block))


def _reference_loss(fixed, warped, d, block, window):
    """The definition, spelled out at full resolution: moving = W + G . (d repeated over each block),
    window statistics over block-aligned windows, autograd for the gradient."""
    up = d.repeat_interleave(block, 2).repeat_interleave(block, 3).repeat_interleave(block, 4)
    w = warped - warped.mean()
    j = w + (image_gradient(w) * up).sum(1, keepdim=True)
    i = fixed - fixed.mean()
    grid = d.shape[2:]
    n = box_sum(torch.ones(1, 1, *grid, dtype=fixed.dtype), window) * block ** 3
    stats = box_sum(block_sums(torch.cat([i, i * i, j, j * j, i * j], 1), block), window) / n
    mi, ii, mj, jj, ij = stats.unbind(1)
    var_i, var_j = torch.clamp(ii - mi * mi, min=0), torch.clamp(jj - mj * mj, min=0)
    cov = ij - mi * mj
    return -(cov * cov / (var_i * var_j + 1e-8)).mean()


@pytest.mark.parametrize("block, window", [(2, 3), (3, 2), (2, 5), (1, 3), (1, 5)])
def test_loss_and_gradient_equal_the_full_resolution_definition(block, window):
    torch.manual_seed(0)
    shape = (4 * block, 3 * block, 5 * block)
    fixed = torch.rand(1, 1, *shape, dtype=torch.float64)
    fixed[..., :block] = 0.0
    warped = torch.rand(1, 1, *shape, dtype=torch.float64)
    d = (torch.randn(1, 3, 4, 3, 5, dtype=torch.float64) * 0.3).requires_grad_(True)
    ncc = LinearisedBlockNCC(fixed, block, window)
    ncc.linearise(warped)
    fast = ncc.loss(d)
    (g_fast,) = torch.autograd.grad(fast, d)
    ref = _reference_loss(fixed, warped, d, block, window)
    (g_ref,) = torch.autograd.grad(ref, d)
    assert float(fast) == pytest.approx(float(ref), rel=1e-10)
    assert torch.allclose(g_fast, g_ref, rtol=1e-8, atol=1e-14)


def test_the_linear_model_follows_a_real_sub_voxel_shift():
    """Moved by a small uniform d, the linear model's loss changes the way the loss of the image really
    warped by d does: down towards alignment, up away from it, and most where the real change is largest."""
    shape = (32, 28, 24)
    fixed = torch.from_numpy(blob_image(shape, seed=1))[None, None]
    st = SpatialTransformer("bilinear", "zeros")
    shift = torch.zeros(1, 3, *shape)
    shift[:, 1] = 1.5
    ncc = LinearisedBlockNCC(fixed, 2, 3)
    ncc.linearise(st(fixed, shift))  # misaligned by 1.5 voxels along axis 1
    zero = torch.zeros(1, 3, 16, 14, 12)
    base = float(ncc.loss(zero))
    model, real = {}, {}
    for step in (-0.6, -0.3, 0.3):
        d = zero.clone()
        d[:, 1] = step
        moved = shift.clone()
        moved[:, 1] += step
        exact = LinearisedBlockNCC(fixed, 2, 3)
        exact.linearise(st(fixed, moved))
        model[step], real[step] = float(ncc.loss(d)) - base, float(exact.loss(zero)) - base
    # measured: model -0.089, -0.058, +0.008; real -0.085, -0.025, +0.036
    assert all((model[s] < 0) == (real[s] < 0) for s in model), (model, real)
    assert model[-0.6] < model[-0.3] < 0 < model[0.3]
    assert abs(model[-0.6] - real[-0.6]) < 0.3 * abs(real[-0.6])


def test_a_crop_with_mean_over_gives_the_whole_volume_loss():
    torch.manual_seed(3)
    fixed = torch.zeros(1, 1, 24, 20, 16, dtype=torch.float64)
    fixed[..., 8:16, 6:14, 4:12] = torch.rand(8, 8, 8, dtype=torch.float64)
    warped = torch.rand(1, 1, 24, 20, 16, dtype=torch.float64)
    d = torch.randn(1, 3, 12, 10, 8, dtype=torch.float64) * 0.2
    whole = LinearisedBlockNCC(fixed, 2, 3)
    whole.linearise(warped)
    # blocks 4..8, 3..7, 2..6 hold the brain; two half-windows (1 block each) on every side, plus one block
    # whose image gradient (one-sided at the crop's faces) differs from the whole volume's
    box = (slice(1, 11), slice(0, 10), slice(0, 8))
    full_box = tuple(slice(2 * s.start, 2 * s.stop) for s in box)
    part = LinearisedBlockNCC(fixed[(..., *full_box)], 2, 3, mean_over=12 * 10 * 8)
    part.linearise(warped[(..., *full_box)])
    assert float(part.loss(d[(..., *box)])) == pytest.approx(float(whole.loss(d)), rel=1e-9)


def test_input_checks():
    with pytest.raises(ValueError, match="blocks"):
        LinearisedBlockNCC(torch.rand(1, 1, 9, 8, 8), 2)
    ncc = LinearisedBlockNCC(torch.rand(1, 1, 8, 8, 8), 2)
    with pytest.raises(RuntimeError, match="linearise"):
        ncc.loss(torch.zeros(1, 3, 4, 4, 4))
