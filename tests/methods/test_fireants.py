"""FireANTs (hdar_pipeline.methods.fireants): phantoms with a known deformation, the conversion of its warp to our
Transform (against FireANTs' own ANTs export and against antspyx re-applying our files), presets and installation.

FireANTs is an optional extra (``pip install -e '.[fireants]'`` then ``pip install --no-deps fireants==1.5.0``):
this module skips itself where it is absent, which ``HDAR_STRICT_SKIPS=1`` (.ci/run) turns into a failure.

The phantom is conftest's brain-like volume on a 32^3 grid of 3 mm voxels, deformed by a smooth random
diffeomorphism (:func:`hdar_pipeline.core.synthetic.make_subject`: mean 3.8 mm, i.e. 1.3 voxels, inside the brain). The
fast tests run each algorithm with fewer iterations than its preset (FireANTs keeps every level at 32 voxels or
more, so on 32^3 every level is the full grid); the presets themselves run in the slow tests.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import check_recovery, make_brain_phantom, mapping_error_mm, mean_dice
from hdar_pipeline.core.images import Grid, new_image, save_image
from hdar_pipeline.core.synthetic import make_subject
from hdar_pipeline.core.transforms import Transform

pytestmark = pytest.mark.fireants

torch = pytest.importorskip("torch")
pytest.importorskip("fireants", reason="FireANTs is not installed (pip install -e '.[fireants]' && "
                                       "pip install --no-deps fireants==1.5.0)")

from hdar_pipeline.methods.fireants import (  # noqa: E402 - after the skip
    FIREANTS_PRESETS, FireANTsMethod, FireANTsNotInstalled, warp_to_mm)

#: Fewer iterations than the presets (which the slow tests run): the fast tests' budget.
SHORT = {"greedy": (40, 20, 10), "syn": (30, 20, 10)}


@pytest.fixture(scope="module")
def greedy(phantom, subject, torch_one_thread):
    """The greedy algorithm's transform of the subject onto the phantom (each test reads it; none changes it)."""
    method = FireANTsMethod(preset="greedy", iterations=SHORT["greedy"], device="cpu", threads=1)
    return method.register(phantom.image, subject.image)


def oblique_grid(shape: tuple[int, int, int]) -> Grid:
    """A grid with anisotropic voxels (2.5, 3.5, 3 mm), rotated (20 and -12 degrees) and with its array axes
    permuted and flipped against RAS: every part of the index-to-LPS geometry that the conversion must honour."""
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ \
        np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    perm = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # array axes -> (-S, R, -A)
    affine = np.eye(4)
    affine[:3, :3] = rot @ perm @ np.diag([2.5, 3.5, 3.0])
    affine[:3, 3] = [31.0, -47.0, 12.5]
    return Grid(tuple(shape), affine)


@pytest.fixture(scope="module")
def oblique(phantom, subject):
    """The phantom pair and labels, the same arrays stored on :func:`oblique_grid`."""
    grid = oblique_grid(phantom.grid.shape)

    def restore(img):
        return new_image(np.asarray(img.dataobj), grid)

    return {"grid": grid, "fixed": restore(phantom.image), "moving": restore(subject.image),
            "fixed_labels": restore(phantom.labels), "labels": restore(subject.labels)}


def _labels(img) -> np.ndarray:
    return np.asarray(img.dataobj)


# ---------------------------------------------------------------------- the registration


def test_greedy_recovers_a_known_deformation_without_folding(phantom, subject, greedy):
    assert greedy.affine is None and greedy.grid.same_as(phantom.grid)
    check_recovery(greedy, phantom, subject, max_ratio=0.4)
    meta = greedy.metadata
    assert meta["method"] == "fireants" and meta["device"] == "cpu" and meta["runtime_s"] > 0
    assert meta["fireants_loss"] == "LocalNormalizedCrossCorrelationLoss"  # "cc" on the CPU
    assert meta["parameters"]["algorithm"] == "greedy" and meta["parameters"]["iterations"] == SHORT["greedy"]
    assert meta["fireants_version"] and isinstance(meta["fireants_fused_ops"], bool)


def test_syn_recovers_a_known_deformation_without_folding(phantom, subject, torch_one_thread):
    method = FireANTsMethod(preset="syn", iterations=SHORT["syn"], device="cpu", threads=1)
    transform = method.register(phantom.image, subject.image)
    check_recovery(transform, phantom, subject, max_ratio=0.45)
    assert transform.metadata["parameters"]["algorithm"] == "syn" and method.device_used == "cpu"


def test_a_moving_image_on_another_grid_is_resampled_and_a_mask_is_ignored_with_a_warning(phantom, subject,
                                                                                          torch_one_thread):
    # the subject cropped to 32 x 32 x 30 voxels: another grid (the method resamples it onto the fixed one)
    other = new_image(_labels(subject.image)[:, :, :30], Grid((32, 32, 30), phantom.grid.affine))
    method = FireANTsMethod(iterations=(3, 0, 0), device="cpu", threads=1)
    with pytest.warns(UserWarning, match="ignores fixed_mask"):
        transform = method.register(phantom.image, other, fixed_mask=phantom.labels)
    assert transform.grid.same_as(phantom.grid) and np.isfinite(transform.field).all()


def test_syn_refuses_a_grid_below_fireants_minimum_level_size(phantom):
    """FireANTs' SyN computes the reverse warp's inverse on levels of at least 32 voxels per axis and, when that
    inverse comes back on another grid than the fixed one, composes with the reverse warp itself: refused."""
    grid = Grid((24, 32, 32), phantom.grid.affine)
    small = new_image(np.zeros(grid.shape, np.float32), grid)
    with pytest.raises(ValueError, match="at least 32 voxels"):
        FireANTsMethod(preset="syn", device="cpu").register(small, small)


# ---------------------------------------------------------------------- FireANTs' warp -> our Transform


def test_warp_to_mm_maps_normalised_units_through_the_grid():
    """A displacement of one voxel along ITK index axis x in FireANTs' normalised units (2 / (n_x - 1)) is the
    grid's step along array axis 0 in LPS mm, at every voxel; FireANTs' [z, y, x] arrays become ours [x, y, z]."""
    grid = oblique_grid((5, 6, 7))
    u = np.zeros((1, 7, 6, 5, 3), np.float32)  # [batch, z, y, x, xyz]
    u[..., 0] = 2.0 / (5 - 1)
    u[0, 3, 2, 1, 2] = 2.0 / (7 - 1)  # and one voxel along z at index (x, y, z) = (1, 2, 3)
    field = warp_to_mm(np.eye(3, 4)[None], u, grid)
    step = grid.lps_affine[:3, :3]
    assert field.shape == (5, 6, 7, 3) and field.dtype == np.float32
    expected = np.broadcast_to(step[:, 0], field.shape).copy()
    expected[1, 2, 3] += step[:, 2]
    np.testing.assert_allclose(field, expected, atol=1e-5)
    with pytest.raises(ValueError, match="not the identity"):
        warp_to_mm(np.array([[[1.0, 0, 0, 0.01], [0, 1, 0, 0], [0, 0, 1, 0]]]), u, grid)
    with pytest.raises(ValueError, match="not on the fixed grid"):
        warp_to_mm(np.eye(3, 4)[None], u, Grid((7, 6, 5), grid.affine))


@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")  # FireANTs' Logger.warn
def test_the_field_is_fireants_own_ants_export(oblique, tmp_path, torch_one_thread):
    """On the oblique grid, the field the adapter builds from FireANTs' warp parameters equals the displacement
    field FireANTs' ``save_as_ants_transforms`` writes (physical LPS mm, on the fixed image's geometry)."""
    import SimpleITK as sitk

    from hdar_pipeline.core.images import from_sitk
    from hdar_pipeline.methods.fireants import _batched, _import_fireants

    fa = _import_fireants()
    grid = oblique["grid"]
    fixed = _batched(fa, oblique["fixed"], grid, torch.device("cpu"))
    moving = _batched(fa, oblique["moving"], grid, torch.device("cpu"))
    reg = fa.GreedyRegistration(scales=[2, 1], iterations=[20, 10], fixed_images=fixed, moving_images=moving,
                                cc_kernel_size=5, deformation_type="compositive", optimizer="adam",
                                optimizer_lr=0.5, smooth_grad_sigma=1.0, smooth_warp_sigma=0.5, progress_bar=False)
    reg.optimize()
    params = reg.get_warp_parameters(fixed, moving)
    ours = warp_to_mm(params["affine"], params["grid"], grid)
    path = tmp_path / "fireants_warp.nii.gz"
    reg.save_as_ants_transforms(str(path))
    theirs = from_sitk(sitk.ReadImage(str(path)))
    assert Grid.of(theirs).same_as(grid)
    assert np.abs(ours).max() > 2.0  # it moved (mm)
    np.testing.assert_allclose(ours, np.asarray(theirs.dataobj), atol=1e-3)


def test_ants_reapplies_the_written_transform_on_an_oblique_grid(oblique, tmp_path, torch_one_thread):
    """The transform registered on the oblique grid, written as ANTs files (warp NIfTI and composite .h5), warps the
    labels and the image with antspyx as our own warp does; the registration improves Dice there without folding."""
    import ants

    method = FireANTsMethod(preset="greedy", iterations=SHORT["greedy"], device="cpu", threads=1)
    transform = method.register(oblique["fixed"], oblique["moving"])
    assert transform.grid.same_as(oblique["grid"]) and transform.jacobian_determinant().min() > 0
    ours = _labels(transform.apply(oblique["labels"], interpolation="nearest"))
    fixed_labels = _labels(oblique["fixed_labels"])
    assert mean_dice(fixed_labels, ours) > mean_dice(fixed_labels, _labels(oblique["labels"])) + 0.12
    files = {name: save_image(oblique[name], tmp_path / f"{name}.nii.gz") for name in ("fixed", "moving", "labels")}
    written = [str(p) for p in transform.write(tmp_path / "xfm")]
    composite = str(transform.write_composite(tmp_path / "xfm" / "transform.h5"))
    fixed = ants.image_read(str(files["fixed"]))
    for transformlist in (written, [composite]):
        theirs = ants.apply_transforms(fixed, ants.image_read(str(files["labels"])), transformlist=transformlist,
                                       interpolator="nearestNeighbor").numpy()
        assert (np.rint(theirs).astype(int) == ours).mean() > 0.999
    theirs = ants.apply_transforms(fixed, ants.image_read(str(files["moving"])), transformlist=written,
                                   interpolator="linear").numpy()
    warped = np.asarray(transform.apply(oblique["moving"]).dataobj)
    assert np.abs(theirs - warped).mean() < 1e-3


# ---------------------------------------------------------------------- presets, options, installation


def test_presets_are_fireants_lpba40_settings_and_options_override_them():
    greedy = FireANTsMethod()
    assert greedy.preset == "greedy" and greedy.device == "auto" and greedy.loss == "auto"
    # fireants/scripts/pairwise/test_lpba40.py (the paper's LPBA40 experiment)
    assert (greedy.algorithm, greedy.scales, greedy.iterations, greedy.cc_kernel_size, greedy.smooth_grad_sigma,
            greedy.smooth_warp_sigma, greedy.optimizer_lr) == ("greedy", (4, 2, 1), (200, 100, 50), 7, 2.0, 0.5, 0.5)
    syn = FireANTsMethod(preset="syn", seed=3)
    assert (syn.algorithm, syn.scales, syn.iterations, syn.cc_kernel_size, syn.smooth_grad_sigma,
            syn.smooth_warp_sigma, syn.optimizer_lr) == ("syn", (4, 2, 1), (100, 75, 50), 5, 1.0, 0.5, 0.5)
    params = syn.parameters
    assert {k: params[k] for k in FIREANTS_PRESETS["syn"]} == FIREANTS_PRESETS["syn"]
    assert params["seed"] == 3 and "device_used" not in params
    assert FireANTsMethod(preset="syn", cc_kernel_size=7).cc_kernel_size == 7
    for bad, match in [(dict(preset="quality"), "preset"), (dict(algorithm="ffd"), "algorithm"),
                       (dict(loss="mi"), "loss"), (dict(scales=(1, 2), iterations=(1, 1)), "decreasing"),
                       (dict(scales=(4, 2), iterations=(1, 2, 3)), "same length"),
                       (dict(cc_kernel_size=4), "odd"), (dict(optimizer_lr=0.0), "optimizer_lr")]:
        with pytest.raises(ValueError, match=match):
            FireANTsMethod(**bad)


def test_a_missing_fireants_is_one_clear_error(monkeypatch):
    import hdar_pipeline.methods.fireants as module

    monkeypatch.setattr(module, "fireants_available", lambda: False)
    with pytest.raises(FireANTsNotInstalled, match=r"--no-deps \"fireants==1\.5\.0\"") as info:
        FireANTsMethod()
    # the command line reports NotImplementedError as a one-line error; importers can catch ImportError
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, ImportError)


def test_importing_fireants_leaves_stdout_and_logging_alone():
    """FireANTs prints at import and calls logging.basicConfig(level=INFO); the adapter's import does neither to the
    host process (a fresh interpreter: the import happens once per process)."""
    code = ("import logging\n"
            "from hdar_pipeline.methods.fireants import _import_fireants\n"
            "fa = _import_fireants()\n"
            "root = logging.getLogger()\n"
            "assert not root.handlers and root.level == logging.WARNING, (root.handlers, root.level)\n"
            "assert logging.getLogger('fireants.registration.greedy').getEffectiveLevel() == logging.ERROR\n"
            "print('ok', fa.version)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("ok ") and len(done.stdout.splitlines()) == 1, done.stdout
    assert done.stderr == "", done.stderr


# ---------------------------------------------------------------------- the presets themselves, and CUDA


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["greedy", "syn"])
def test_presets_recover_a_known_deformation_on_a_finer_phantom(preset, torch_one_thread):
    """Each preset as shipped, on a 48^3 phantom of 2 mm voxels (levels at 32, 32 and 48 voxels): most of the
    deformation recovered, Dice up, no folding (about 9 s for greedy, 17 s for SyN on one thread)."""
    phantom = make_brain_phantom((48, 48, 48), 2.0)
    subject = make_subject(phantom.image, phantom.labels, seed=2, magnitude_mm=12.0, smoothness_mm=18.0,
                           bias_strength=0.0, noise=0.01)
    transform = FireANTsMethod(preset=preset, device="cpu", threads=1).register(phantom.image, subject.image)
    check_recovery(transform, phantom, subject, max_ratio=0.3, min_gain=0.2)


@pytest.mark.cuda
def test_cuda_gives_the_cpu_result(phantom, subject, greedy):
    """On CUDA (``fusedcc`` when FireANTs' fused ops are installed, else its plain ``cc``) the greedy registration
    recovers the deformation as on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    transform = FireANTsMethod(preset="greedy", iterations=SHORT["greedy"], device="cuda").register(
        phantom.image, subject.image)
    assert transform.metadata["device"].startswith("cuda")
    error, _ = check_recovery(transform, phantom, subject, max_ratio=0.4)
    cpu_error, _ = mapping_error_mm(greedy, subject.truth, phantom.mask)
    assert abs(error - cpu_error) < 0.25, (error, cpu_error)


# ---------------------------------------------------------------------- the registry, the command lines, Nipype


def test_registry_builds_fireants_with_presets_and_options():
    from hdar_pipeline.methods import get_method, method_names

    assert "fireants" in method_names()
    method = get_method("fireants", seed=3, threads=1)
    assert isinstance(method, FireANTsMethod) and method.name == "fireants" and method.preset == "greedy"
    assert method.device == "auto" and method.seed == 3 and method.threads == 1
    assert get_method("fireants", preset="syn").algorithm == "syn"
    assert get_method("fireants", options={"iterations": (3, 2, 1)}).iterations == (3, 2, 1)
    with pytest.raises(ValueError, match="preset"):
        get_method("fireants", preset="quality")
    with pytest.raises(ValueError, match="no option"):
        get_method("fireants", options={"radius": 4})


def test_nipype_interface_accepts_fireants():
    pytest.importorskip("nipype")
    from hdar_pipeline.engine.nipype_interfaces import Register

    assert Register(method="fireants", preset="syn").inputs.method == "fireants"


def test_without_fireants_the_cli_says_how_to_install_it_and_the_benchmark_skips_it(monkeypatch, tmp_path, capsys):
    import hdar_pipeline.apps.benchmark.runner as bm
    import hdar_pipeline.methods.fireants as module
    from hdar_pipeline.apps.cli import main

    monkeypatch.setattr(module, "fireants_available", lambda: False)
    with pytest.raises(bm.VariantUnavailable, match="--no-deps"):
        bm.build_method(bm.default_variants()["fireants"], seed=None, threads=1)
    fixed = save_image(make_brain_phantom((32, 32, 32), 3.0).image, tmp_path / "f.nii.gz")
    assert main(["register", str(fixed), str(fixed), "-o", str(tmp_path / "out"), "--method", "fireants",
                 "--no-affine"]) == 2
    assert "--no-deps" in capsys.readouterr().err
