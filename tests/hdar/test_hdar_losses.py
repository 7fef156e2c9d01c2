"""hdar/losses.py: local NCC, smoothness, the anti-folding variant, soft Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from hdar_pipeline.hdar.losses import (LocalNCC, anti_folding_loss, box_sum, diffusion_loss, jacobian_determinant,
                                       local_ncc, local_ncc_loss, one_hot, soft_dice_loss, spatial_gradients)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def texture(shape, seed, sigma=1.5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = ndimage.gaussian_filter(rng.random(shape), sigma)
    t = (t - t.min()) / (t.max() - t.min())
    return torch.from_numpy(t.astype(np.float32))[None, None]


def test_box_sum_equals_a_dense_box_filter():
    x = torch.rand(1, 2, 13, 11, 9, dtype=torch.float64)
    dense = torch.nn.functional.conv3d(x.view(2, 1, 13, 11, 9), torch.ones(1, 1, 5, 5, 5, dtype=torch.float64),
                                       padding=2).view(1, 2, 13, 11, 9)
    assert torch.allclose(box_sum(x, 5), dense)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("autograd", [False, True])
def test_box_sum_of_every_width_is_the_sum_of_its_shifted_views(transpose, autograd):
    """Every width, odd and even (centred on the high side, or the low side for the adjoint), equals the plain
    sum of the window's shifted views of the zero-padded volume, on both paths: accumulated in place (no
    gradient needed) and by shifted views of a padded copy (windows over 4 by doubling) when autograd needs
    the graph, whose gradient is then the adjoint box sum. Widths up to beyond the smallest axis."""
    x = torch.rand(1, 2, 17, 15, 14, dtype=torch.float64, requires_grad=autograd)
    for w in range(2, 18):
        low, high = ((w - 1) // 2, w // 2) if not transpose else (w // 2, (w - 1) // 2)
        padded = torch.nn.functional.pad(x.detach(), [low, high] * 3)
        plain = sum(padded[..., i:i + 17, j:j + 15, k:k + 14]
                    for i in range(w) for j in range(w) for k in range(w))
        out = box_sum(x, w, transpose=transpose)
        assert out.requires_grad == autograd
        assert torch.allclose(out, plain), w
        if autograd:
            y = torch.rand_like(plain)
            (grad,) = torch.autograd.grad((out * y).sum(), x)
            assert torch.allclose(grad, box_sum(y, w, transpose=not transpose)), w


def test_ncc_of_an_image_with_itself_is_minus_one():
    img = texture((32, 30, 28), 0)
    assert local_ncc_loss(img, img).item() == pytest.approx(-1.0, abs=2e-3)
    assert local_ncc_loss(img, 0.3 * img + 0.2).item() == pytest.approx(-1.0, abs=5e-3)  # affine invariance
    other = texture((32, 30, 28), 1)
    assert local_ncc_loss(img, other).item() > -0.2
    cc = local_ncc(img, other)
    assert cc.shape == (1, 1, 32, 30, 28) and cc.min() >= 0 and cc.max() <= 1 + 1e-5


def test_ncc_is_finite_on_flat_and_zero_regions_and_has_finite_gradients():
    img = torch.zeros(1, 1, 20, 20, 20)
    img[:, :, 5:15, 5:15, 5:15] = texture((10, 10, 10), 2)
    moving = img.clone().requires_grad_(True)
    loss = local_ncc_loss(img, torch.roll(moving, 1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(moving.grad).all()
    const = torch.full((1, 1, 12, 12, 12), 0.5)
    assert torch.isfinite(local_ncc_loss(const, const))


def test_ncc_decreases_as_images_align():
    img = texture((28, 28, 28), 3, sigma=2.0)
    losses = [local_ncc_loss(img, torch.roll(img, s, 2)).item() for s in (4, 2, 1, 0)]
    assert losses == sorted(losses, reverse=True)


def test_diffusion_is_zero_for_translations_and_scales_quadratically():
    flow = torch.zeros(1, 3, 10, 12, 8)
    flow[:, 0] = 2.0
    assert diffusion_loss(flow).item() == 0.0
    ramp = torch.arange(10, dtype=torch.float32).view(1, 10, 1, 1).expand(1, 10, 12, 8)
    lin = torch.zeros(1, 3, 10, 12, 8)
    lin[:, 1] = 0.1 * ramp
    assert diffusion_loss(lin).item() == pytest.approx(0.01 / 9)  # mean over 3 axes x 3 components
    assert diffusion_loss(2 * lin).item() == pytest.approx(4 * 0.01 / 9)


def test_anti_folding_costs_compression_more_than_expansion():
    ramp = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1).expand(1, 16, 10, 10)
    expand = torch.zeros(1, 3, 16, 10, 10)
    expand[:, 0] = 0.2 * ramp  # d u_0 / d x_0 = +0.2
    compress = -expand  # -0.2
    shear = torch.zeros(1, 3, 16, 10, 10)
    shear[:, 1] = 0.2 * ramp  # off-diagonal, same magnitude
    e = anti_folding_loss(expand, compress_weight=3.0, fold_weight=0.0)
    c = anti_folding_loss(compress, compress_weight=3.0, fold_weight=0.0)
    s = anti_folding_loss(shear, compress_weight=3.0, fold_weight=0.0)
    assert c.item() == pytest.approx(3.0 * e.item()) and s.item() == pytest.approx(e.item())
    # With compress_weight 1 and no fold term it is the diffusion loss.
    f = torch.randn(1, 3, 9, 8, 7) * 0.3
    assert anti_folding_loss(f, compress_weight=1.0, fold_weight=0.0).item() == pytest.approx(diffusion_loss(f).item())


def test_fold_term_is_zero_without_folds_and_positive_with_them():
    ramp = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1).expand(1, 16, 10, 10)
    mild = torch.zeros(1, 3, 16, 10, 10)
    mild[:, 0] = -0.5 * ramp  # det = 0.5
    folded = torch.zeros(1, 3, 16, 10, 10)
    folded[:, 0] = -1.5 * ramp  # det = -0.5
    assert torch.allclose(jacobian_determinant(mild), torch.full((1, 15, 9, 9), 0.5))
    base = anti_folding_loss(mild, fold_weight=0.0)
    assert anti_folding_loss(mild, fold_weight=10.0).item() == pytest.approx(base.item())
    folded_base = anti_folding_loss(folded, fold_weight=0.0).item()
    assert anti_folding_loss(folded, fold_weight=10.0).item() == pytest.approx(folded_base + 10.0 * 0.25, rel=1e-4)


def test_jacobian_matches_transform_jacobian_on_an_isotropic_grid():
    from hdar_pipeline.hdar.cascade import field_voxels_to_transform
    from hdar_pipeline.core.images import Grid

    rng = np.random.default_rng(5)
    flow = np.stack([ndimage.gaussian_filter(rng.normal(size=(20, 18, 16)), 3) for _ in range(3)])
    flow = (flow / np.abs(flow).max() * 3).astype(np.float32)
    ours = jacobian_determinant(torch.from_numpy(flow)[None])[0].numpy()
    ref = field_voxels_to_transform(flow, Grid((20, 18, 16), np.eye(4))).jacobian_determinant()
    # forward vs central differences: compare the interior on average
    assert np.abs(ours[2:-2, 2:-2, 2:-2] - ref[2:-3, 2:-3, 2:-3]).mean() < 0.05


def test_soft_dice():
    lab = torch.zeros(1, 1, 10, 10, 10, dtype=torch.int64)
    lab[..., 2:6, 2:6, 2:6] = 1
    lab[..., 6:9, 6:9, 6:9] = 2
    oh = one_hot(lab, [0, 1, 2])
    assert oh.shape == (1, 3, 10, 10, 10) and torch.all(oh.sum(1) == 1)
    assert soft_dice_loss(oh, oh).item() == pytest.approx(0.0, abs=1e-6)
    shifted = one_hot(torch.roll(lab, 2, 2), [0, 1, 2])
    assert 0.3 < soft_dice_loss(shifted, oh).item() < 1.0
    assert soft_dice_loss(torch.zeros_like(oh), oh).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------ closed-form gradients


def _autograd_ncc_loss(fixed, warped, window, mask=None):
    """The loss through autograd: a fixed image that needs a gradient takes local_ncc_loss's autograd path."""
    return local_ncc_loss(fixed.clone().requires_grad_(True), warped, window, mask=mask)


@pytest.mark.parametrize("shape, window, masked", [((13, 11, 9), 5, False), ((12, 10, 14), (4, 5, 3), True),
                                                   ((20, 20, 20), 9, False)])
def test_closed_form_ncc_gradient_equals_autograd(shape, window, masked):
    torch.manual_seed(0)
    fixed = torch.rand(2, 1, *shape, dtype=torch.float64)
    fixed[..., :3] = 0.0  # a flat region: clamped variances, eps
    warped = torch.rand(2, 1, *shape, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 1, *shape) > 0.3) if masked else None
    ref = _autograd_ncc_loss(fixed, warped, window, mask)
    (g_ref,) = torch.autograd.grad(ref, warped)
    fast = local_ncc_loss(fixed, warped, window, mask=mask)  # fixed needs no gradient: LocalNCC
    (g_fast,) = torch.autograd.grad(fast, warped)
    assert float(fast) == pytest.approx(float(ref), rel=1e-12)
    assert torch.allclose(g_fast, g_ref, atol=1e-14 * float(g_ref.abs().max()) + 1e-18, rtol=1e-9)
    # one LocalNCC reused across evaluations gives the same value
    ncc = LocalNCC(fixed, window, mask=mask)
    assert float(ncc.loss(warped)) == pytest.approx(float(ref), rel=1e-12)


def test_box_sum_transpose_is_the_adjoint():
    torch.manual_seed(1)
    x, y = torch.rand(1, 2, 9, 8, 7, dtype=torch.float64), torch.rand(1, 2, 9, 8, 7, dtype=torch.float64)
    for window in (4, (3, 6, 2), 5):
        lhs = (box_sum(x, window) * y).sum()
        rhs = (x * box_sum(y, window, transpose=True)).sum()
        assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)


def _autograd_anti_folding(flow, compress_weight=2.0, fold_weight=1.0, min_jacobian=0.0):
    """The definition in the docstring of anti_folding_loss, differentiated by autograd."""
    grads = spatial_gradients(flow)
    total = flow.new_zeros(())
    for a, g in enumerate(grads):
        sq = g.pow(2)
        weight = torch.where(g[:, a:a + 1] < 0, torch.full_like(sq[:, :1], compress_weight), torch.ones_like(sq[:, :1]))
        total = total + (sq.sum(dim=1, keepdim=True) + (weight - 1.0) * sq[:, a:a + 1]).mean() / 3.0
    loss = total / 3.0
    if fold_weight:
        loss = loss + fold_weight * torch.relu(min_jacobian - jacobian_determinant(flow)).pow(2).mean()
    return loss


@pytest.mark.parametrize("scale, kwargs", [(0.3, {}), (1.0, dict(compress_weight=3.0, fold_weight=10.0, min_jacobian=0.1)),
                                           (0.1, dict(fold_weight=0.0))])
def test_closed_form_anti_folding_gradient_equals_autograd(scale, kwargs):
    torch.manual_seed(2)
    flow = (torch.randn(2, 3, 7, 9, 6, dtype=torch.float64) * scale).requires_grad_(True)
    ref = _autograd_anti_folding(flow, **kwargs)
    (g_ref,) = torch.autograd.grad(ref, flow)
    fast = anti_folding_loss(flow, **kwargs)
    (g_fast,) = torch.autograd.grad(3.0 * fast, flow)
    assert float(fast) == pytest.approx(float(ref), rel=1e-12)
    assert torch.allclose(g_fast / 3.0, g_ref, rtol=1e-9, atol=1e-15)
    if scale == 1.0:
        assert bool((jacobian_determinant(flow) < 0.1).any())  # the folding branch was exercised
