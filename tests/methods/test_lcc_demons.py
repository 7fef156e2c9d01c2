"""LCC-Demons (hdar_pipeline.methods.lcc_demons) on phantoms with a known deformation, its exact LCC gradient, its
registry entry and presets, and the BIDS App's --methods lccdemons.

The phantom is conftest's brain-like volume on a 32^3 grid of 3 mm voxels, deformed by a smooth random
diffeomorphism (:func:`hdar_pipeline.core.synthetic.make_subject`: mean 3.8 mm, i.e. 1.3 voxels, inside the brain).
The ANTs round trip (``hdar register --method lccdemons`` then ``ants.apply_transforms``) is one case of
tests/apps/test_cli_register.py's parametrised round-trip test.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import check_recovery, mapping_error_mm
from hdar_pipeline.core.images import new_image
from hdar_pipeline.methods import get_method
from hdar_pipeline.core.transforms import Transform

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def registered(phantom, subject, torch_one_thread):
    """The default preset's transform of the subject onto the phantom (each test reads it; none changes it)."""
    return get_method("lccdemons", threads=1, device="cpu").register(phantom.image, subject.image)


def _labels(img) -> np.ndarray:
    return np.asarray(img.dataobj)


# ---------------------------------------------------------------------- the registration


def test_recovers_a_known_deformation_without_folding(phantom, subject, registered):
    assert registered.affine is None and registered.grid.same_as(phantom.grid)
    check_recovery(registered, phantom, subject)
    meta = registered.metadata
    assert meta["method"] == "lccdemons" and meta["device"] == "cpu" and meta["runtime_s"] > 0
    assert meta["parameters"]["iterations"] == (30, 20, 10) and meta["parameters"]["sigma_lcc"] == 3.0


def test_inverse_field_is_the_inverse_of_the_field(phantom, registered):
    """exp(-v) undoes exp(v): p -> p + u(p) -> q + w(q) returns within a tenth of the 3 mm voxel on average."""
    inverse = registered.metadata["inverse_field"]
    assert inverse.shape == registered.field.shape and inverse.dtype == np.float32
    p = phantom.grid.lps_points(np.float64)[phantom.mask]
    q = p + registered.field_at(p)
    back = q + Transform(phantom.grid, field=inverse).field_at(q)
    residual = np.linalg.norm(back - p, axis=-1)
    moved = np.linalg.norm(q - p, axis=-1)
    assert moved.mean() > 2.0
    assert residual.mean() < 0.1 * 3.0 and residual.max() < 1.0, (residual.mean(), residual.max())
    # the inverse is the method's own: hdar_pipeline.core.inverse takes it as given
    from hdar_pipeline.core.inverse import invert

    result = invert(registered, phantom.grid, inverse_field=inverse)
    assert result.source == "method"


@pytest.mark.parametrize("change", ["affine", "bias"])
def test_moving_intensities_may_differ(phantom, subject, registered, change, torch_one_thread):
    """LCC's point: the moving image need not share the fixed image's intensity profile. An affine change of its
    intensities gives the same field (LCC, its forces and the steps are invariant to it). Under a smooth
    multiplicative bias field (a factor 0.75 to 1.25 across the brain: locally linear), rescaled, it still
    registers, and better than SimpleITK's Demons (SSD forces, even after its histogram matching)."""
    moving = _labels(subject.image).astype(np.float32)
    if change == "affine":
        changed = 4.0 * moving + 0.3
    else:
        i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in moving.shape), indexing="ij")
        bias = (1.0 + 0.25 * i - 0.125 * j + 0.2 * i * k).astype(np.float32)
        assert bias[phantom.mask].min() < 0.8 and bias[phantom.mask].max() > 1.2  # strong across the brain
        changed = 3.0 * moving * bias + 0.2
    image = new_image(changed, phantom.grid)
    transform = get_method("lccdemons", threads=1, device="cpu").register(phantom.image, image)
    if change == "affine":
        assert np.abs(transform.field - registered.field).max() < 0.01  # mm
    else:
        error, magnitude = check_recovery(transform, phantom, subject, max_ratio=0.55, min_gain=0.08)
        demons = get_method("demons", threads=1).register(phantom.image, image)
        demons_error, _ = mapping_error_mm(demons, subject.truth, phantom.mask)
        assert error < 0.75 * demons_error, (error, demons_error)


def test_three_bch_terms_and_the_fast_preset(phantom, subject, registered, torch_one_thread):
    """The Lie-bracket term keeps the recovery; the fast preset (the two coarse levels) runs in a fraction of the
    default's time and recovers part of the deformation."""
    bch = get_method("lccdemons", threads=1, device="cpu", options={"bch_terms": 3})
    assert bch.bch_terms == 3 and bch.preset == "default"
    check_recovery(bch.register(phantom.image, subject.image), phantom, subject)
    fast = get_method("lccdemons", preset="fast", threads=1, device="cpu")
    assert fast.shrink_factors == (4, 2) and fast.iterations == (30, 20)
    check_recovery(fast.register(phantom.image, subject.image), phantom, subject, max_ratio=0.6, min_gain=0.05)
    assert fast.last_run.runtime_s < registered.metadata["runtime_s"]


def test_a_moving_image_on_another_grid_is_resampled_and_a_mask_is_ignored_with_a_warning(phantom, subject,
                                                                                          torch_one_thread):
    from hdar_pipeline.core.images import Grid

    # the subject cropped to 32 x 32 x 30 voxels: another grid (the method resamples it onto the fixed one)
    other = new_image(_labels(subject.image)[:, :, :30], Grid((32, 32, 30), phantom.grid.affine))
    method = get_method("lccdemons", threads=1, device="cpu", options={"iterations": (5, 0, 0)})
    with pytest.warns(UserWarning, match="ignores fixed_mask"):
        transform = method.register(phantom.image, other, fixed_mask=phantom.labels)
    assert transform.grid.same_as(phantom.grid) and np.isfinite(transform.field).all()


# ---------------------------------------------------------------------- the LCC forces


def test_lcc_derivative_is_exact_against_autograd():
    """``local_correlation``'s closed-form dE/dW equals autograd's gradient of the summed LCC (float64), borders
    included (the zero-padded, normalised window is a symmetric operator)."""
    from hdar_pipeline.hdar.layers import smooth
    from hdar_pipeline.methods.lcc_demons import local_correlation

    gen = torch.Generator().manual_seed(0)
    shape = (1, 1, 14, 15, 13)
    f = smooth(torch.rand(shape, generator=gen, dtype=torch.float64), 1.0)
    w = (smooth(torch.rand(shape, generator=gen, dtype=torch.float64), 1.0) + f).requires_grad_(True)
    sigma, eps = 2.0, 1e-4
    n = smooth(torch.ones_like(f), sigma, padding="zeros")

    def window(x):
        return smooth(x, sigma, padding="zeros") / n

    fc, wc = f - f.mean(), w - w.mean().detach()  # LCC ignores a global offset: the mean's gradient is 0
    mf, mw = window(fc), window(wc)
    var_f = window(fc * fc) - mf * mf + eps * f.var() + 1e-12
    var_w = window(wc * wc) - mw * mw + eps * w.var().detach() + 1e-12
    energy = ((window(fc * wc) - mf * mw) / torch.sqrt(var_f * var_w)).sum()
    energy.backward()
    lcc, d_energy = local_correlation(f, w.detach(), sigma_lcc=sigma, eps=eps)
    assert float(lcc.sum()) == pytest.approx(float(energy.detach()), rel=1e-10)
    assert float(lcc.abs().max()) <= 1.0
    assert torch.allclose(d_energy, w.grad, rtol=1e-8, atol=1e-10)


def test_update_points_downhill_and_is_bounded():
    """On a shifted copy, every step is at most |rho| / (2 sqrt(sigma_i)) voxels and, on average, moves the
    warped image back towards the fixed one (``w(x) = f(x - 1)`` along axis 0: ``w(x + u)`` matches ``f`` for
    ``u = +1`` along that axis)."""
    from hdar_pipeline.hdar.layers import smooth
    from hdar_pipeline.methods.lcc_demons import lcc_update

    gen = torch.Generator().manual_seed(1)
    f = smooth(torch.rand((1, 1, 24, 24, 24), generator=gen), 1.5)
    w = torch.roll(f, shifts=1, dims=2)  # w(x) = f(x - 1): sampling w at x + 1 gives f
    step, lcc = lcc_update(f, w, sigma_lcc=2.0, sigma_i=0.15)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    bound = lcc.abs() / (2 * 0.15 ** 0.5)
    assert (step.norm(dim=1, keepdim=True) <= bound + 1e-5).all()
    mean_step = step[inner].mean(dim=(0, 2, 3, 4))
    assert mean_step[0] > 0.2 and mean_step[1:].abs().max() < 0.1 * mean_step[0], mean_step


def test_exponential_of_a_velocity_and_its_negative_compose_to_the_identity():
    from hdar_pipeline.hdar.layers import compose_flows, smooth
    from hdar_pipeline.methods.lcc_demons import exponential, lie_bracket, squaring_steps

    gen = torch.Generator().manual_seed(2)
    v = smooth(torch.randn((1, 3, 20, 20, 20), generator=gen), 3.0) * 8.0
    assert squaring_steps(v) >= 3 and float(v.norm(dim=1).max()) / 2 ** squaring_steps(v) <= 0.5
    residual = compose_flows(exponential(v), exponential(-v))[..., 3:-3, 3:-3, 3:-3]
    assert float(v.norm(dim=1).max()) > 1.5 and float(residual.norm(dim=1).max()) < 0.05
    assert torch.allclose(lie_bracket(v, v), torch.zeros_like(v), atol=1e-5)  # [v, v] = 0
    assert torch.allclose(lie_bracket(v, 2 * v + 1), -lie_bracket(2 * v + 1, v), atol=1e-5)  # antisymmetric


# ---------------------------------------------------------------------- registry, presets, the App


def test_registry_presets_and_options():
    from hdar_pipeline.methods import method_names
    from hdar_pipeline.methods.lcc_demons import LCC_DEMONS_PRESETS, LCCDemonsMethod

    assert "lccdemons" in method_names()
    method = get_method("lccdemons", seed=3, threads=1)
    assert isinstance(method, LCCDemonsMethod) and method.name == "lccdemons" and method.device == "auto"
    params = method.parameters
    assert {k: params[k] for k in LCC_DEMONS_PRESETS["default"]} == LCC_DEMONS_PRESETS["default"]
    assert params["preset"] == "default" and params["seed"] == 3 and "device_used" not in params
    # the paper's inter-subject brain parameters (the authors' README: -C 3 -a 30x20x10 -u 0.5 -d 1.0 -S 0.15)
    paper = (params["sigma_lcc"], params["sigma_fluid"], params["sigma_diff"], params["sigma_i"])
    assert paper == (3.0, 0.5, 1.0, 0.15)
    assert get_method("lccdemons", preset="fast").parameters["shrink_factors"] == (4, 2)
    assert get_method("lccdemons", options={"sigma_diff": 2.0}).sigma_diff == 2.0
    with pytest.raises(ValueError, match="preset"):
        get_method("lccdemons", preset="quality")
    with pytest.raises(ValueError, match="no option"):
        get_method("lccdemons", options={"radius": 4})
    with pytest.raises(ValueError, match="bch_terms"):
        LCCDemonsMethod(bch_terms=4)
    with pytest.raises(ValueError, match="same length"):
        LCCDemonsMethod(shrink_factors=(4, 2), iterations=(1, 2, 3))


def test_nipype_interface_accepts_lccdemons():
    pytest.importorskip("nipype")
    from traits.api import TraitError

    from hdar_pipeline.engine.nipype_interfaces import Register

    assert Register(method="lccdemons", preset="fast").inputs.method == "lccdemons"
    with pytest.raises(TraitError):
        Register(method="elastix")
