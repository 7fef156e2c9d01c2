"""Registration methods on phantoms with known truths; the registry; the two-stage runner; LPBA40.

Truths: an affine (rotation, scaling, translation) and a smooth random diffeomorphism
(:func:`hdar_pipeline.core.synthetic.make_subject`) applied to the brain-like phantom of ``conftest``
(48^3 voxels of 2 mm). A method passes when its fixed-to-moving mapping lies close to the truth
inside the brain and the warped labels overlap the fixed labels better than before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from conftest import mapping_error_mm, mean_dice, rotation_scaling_affine, warp_by
from hdar_pipeline.core.images import load_image
from hdar_pipeline.methods import MethodBase, RegistrationMethod, get_method, method_names, register_pair
from hdar_pipeline.core.synthetic import make_subject, voxel_to_mm
from hdar_pipeline.core.transforms import Transform



@pytest.fixture(scope="module")
def deformed(brain_phantom):
    """The phantom moved by a smooth diffeomorphism (mean 3.5 mm, max 7.6 mm inside the brain)."""
    return make_subject(brain_phantom.image, brain_phantom.labels, seed=1, magnitude_mm=18.0,
                        smoothness_mm=16.0, bias_strength=0.0, noise=0.01)


def _labels(img) -> np.ndarray:
    return np.asarray(img.dataobj)


def check_recovery(transform: Transform, truth: Transform, phantom, moving_labels, *, max_ratio: float):
    error, magnitude = mapping_error_mm(transform, truth, phantom.mask)
    assert magnitude > 2.0  # the test means something
    assert error < max_ratio * magnitude, (error, magnitude)
    fixed = _labels(phantom.labels)
    before = mean_dice(fixed, _labels(moving_labels))
    after = mean_dice(fixed, _labels(transform.apply(moving_labels, interpolation="nearest")))
    assert after > before + 0.1, (before, after)
    assert transform.jacobian_determinant()[phantom.mask].min() > 0  # no folds in the brain
    return error, magnitude


def check_run_info(method) -> None:
    run = method.last_run
    assert np.isfinite(run.runtime_s) and run.runtime_s > 0
    assert np.isfinite(run.peak_memory_mb) and run.peak_memory_mb > 0


# ---------------------------------------------------------------------- registry


def test_registry_builds_every_available_method():
    assert set(method_names()) == {"affine", "syn", "demons", "lccdemons", "fireants", "hdar", "voxelmorph"}
    for name in ("affine", "syn", "demons"):
        method = get_method(name, seed=3, threads=1)
        assert isinstance(method, RegistrationMethod) and method.name == name
        assert method.parameters["seed"] == 3 and method.parameters["threads"] == 1
    assert get_method("syn").preset == "fast"
    assert get_method("syn", preset="quality").parameters["syn_metric"] == "CC"


def test_registry_rejects_unknown_names_and_presets():
    with pytest.raises(ValueError, match="unknown method"):
        get_method("elastix")
    with pytest.raises(ValueError, match="preset"):
        get_method("syn", preset="ultra")
    with pytest.raises(ValueError, match="preset"):
        get_method("demons", preset="quality")


def test_registry_builds_hdar_or_says_no_weights_ship():
    """The registry reaches HDARMethod; while no trained weights ship, that is one clear error."""
    from pathlib import Path

    import hdar_pipeline.hdar as hdar_pkg

    shipped = (Path(hdar_pkg.__file__).parent / "weights" / "default.pt").exists()
    if not shipped:
        with pytest.raises(Exception, match="no trained HDAR weights"):
            get_method("hdar", seed=2, threads=1, device="cpu")
    else:
        method = get_method("hdar", seed=2, threads=1, device="cpu")
        assert isinstance(method, RegistrationMethod) and method.name == "hdar" and method.preset == "accurate"


# ---------------------------------------------------------------------- affine


def test_affine_recovers_a_known_affine(brain_phantom):
    """Rotation (8, -4, 3 degrees), scaling (1.05, 0.97, 1.02) and a 6 mm translation.

    This also checks that the rigid stage's result is folded into the affine output file
    (antsRegistration ``-z 1`` with an initial transform): were it not, the returned affine would
    miss the rigid part.
    """
    truth = Transform(brain_phantom.grid, affine=rotation_scaling_affine(brain_phantom.grid))
    moving = warp_by(brain_phantom.image, truth)
    method = get_method("affine", seed=1, threads=1)
    estimate = method.register(brain_phantom.image, moving)
    assert estimate.field is None and estimate.affine is not None
    error, magnitude = mapping_error_mm(estimate, truth, brain_phantom.mask)
    assert magnitude > 5.0
    assert error < 0.5, error  # mm, on 2 mm voxels
    check_run_info(method)
    assert estimate.metadata["method"] == "affine" and estimate.metadata["runtime_s"] > 0


def test_affine_schedule_keeps_enough_voxels_per_level():
    from hdar_pipeline.methods.affine import level_schedule

    big = level_schedule((6, 4, 2, 1), (3, 2, 1, 0), [(160, 192, 160), (120, 120, 90)])
    assert big == ((6, 4, 2, 1), (3.0, 2.0, 1.0, 0.0))  # 1 mm brains and 2 mm heads: unchanged
    small = level_schedule((6, 4, 2, 1), (3, 2, 1, 0), [(32, 32, 32), (64, 64, 64)])
    assert small == ((2, 2, 2, 1), (1.0, 1.0, 1.0, 0.0))  # 32 // 12: no level under 12 voxels per axis
    assert level_schedule((4, 2, 1), (2, 1, 0), [(10, 40, 40)]) == ((1, 1, 1), (0.5, 0.5, 0.0))


def test_affine_on_a_small_grid_does_not_depend_on_the_seed(tmp_path):
    """The phantom BIDS dataset's sub-02 (32^3 at 3 mm): with the 6x4x2x1 schedule applied as it is, the
    coarsest level kept 5^3 voxels and the affine failed for seeds 3, 7 and 11 (mean Dice 0.60-0.67 instead of
    0.93); every seed must now land."""
    import nibabel as nib
    from test_bids_app import make_bids_dataset

    bids_dir, labels_dir = make_bids_dataset(tmp_path, magnitude_mm=8.0)  # the dataset of the failing runs
    fixed = nib.load(bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    ref = np.asarray(nib.load(labels_dir / "sub-01" / "anat" / "sub-01_dseg.nii.gz").dataobj).astype(int)
    moving = nib.load(bids_dir / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    moving_labels = nib.load(labels_dir / "sub-02" / "anat" / "sub-02_dseg.nii.gz")
    for seed in (3, 7, 11):
        estimate = get_method("affine", seed=seed, threads=1).register(fixed, moving)
        warped = np.asarray(estimate.apply(moving_labels, interpolation="nearest").dataobj).astype(int)
        dice = np.mean([2 * np.sum((ref == k) & (warped == k)) / (np.sum(ref == k) + np.sum(warped == k))
                        for k in (1, 2, 3, 4)])
        assert dice > 0.9, (seed, dice)
        assert estimate.metadata["schedule"]["shrink_factors"] == [2, 2, 2, 1]


# ---------------------------------------------------------------------- deformable


@pytest.mark.parametrize("name", ["syn", "demons"])
def test_deformable_method_recovers_a_known_deformation(brain_phantom, deformed, name):
    method = get_method(name, seed=1, threads=1)
    estimate = method.register(brain_phantom.image, deformed.image)
    assert estimate.affine is None and estimate.field is not None
    assert estimate.grid.same_as(brain_phantom.grid)
    check_recovery(estimate, deformed.truth, brain_phantom, deformed.labels, max_ratio=0.4)
    check_run_info(method)


@pytest.mark.parametrize("name", ["syn", "affine"])
def test_ants_methods_are_reproducible_with_a_seed_and_one_thread(brain_phantom, deformed, name):
    """``ANTS_RANDOM_SEED`` fixes the metric sampling (the affine stage samples 20 % of the voxels)."""
    results = [get_method(name, seed=7, threads=1).register(brain_phantom.image, deformed.image) for _ in range(2)]
    assert np.array_equal(results[0].matrix, results[1].matrix)
    if name == "syn":
        assert np.array_equal(results[0].field, results[1].field)


# ---------------------------------------------------------------------- register_pair


@dataclass
class KnownField(MethodBase):
    """A stand-in deformable method that returns a fixed smooth field and records what it saw."""

    name: ClassVar[str] = "known-field"
    magnitude_mm: float = 3.0

    def _register(self, fixed, moving, fixed_mask) -> Transform:
        self.seen_moving = moving
        grid = Transform.identity(fixed).grid
        idx = np.indices(grid.shape, dtype=np.float32) / np.asarray(grid.shape, np.float32)[:, None, None, None]
        disp = np.stack([np.sin(2 * np.pi * idx[1]), np.cos(2 * np.pi * idx[2]), np.sin(2 * np.pi * idx[0])], -1)
        return Transform(grid, field=voxel_to_mm(disp * self.magnitude_mm / 2.0, grid))


def test_register_pair_composes_the_affine_stage_and_the_deformable_stage_exactly(brain_phantom):
    truth = Transform(brain_phantom.grid, affine=rotation_scaling_affine(brain_phantom.grid))
    moving = warp_by(brain_phantom.image, truth)
    stub = KnownField()
    transform, info = register_pair(brain_phantom.image, moving, stub, affine=True, seed=1, threads=1)
    # The deformable stage saw the moving image resampled onto the fixed grid by the affine stage...
    assert transform.grid.same_as(brain_phantom.grid)
    seen = np.asarray(stub.seen_moving.dataobj)
    inside = brain_phantom.mask
    assert np.abs(seen - np.asarray(brain_phantom.image.dataobj))[inside].mean() < 0.02
    # ...and the result is affine-only outer, field-only inner: exactly A(p + u(p)).
    field = stub._register(brain_phantom.image, moving, None).field
    assert np.array_equal(transform.field, field)
    assert mapping_error_mm(Transform(brain_phantom.grid, affine=transform.affine), truth, inside)[0] < 0.5
    p = brain_phantom.grid.lps_points(np.float64)[inside][::97]
    expected = (p + Transform(brain_phantom.grid, field=field).field_at(p)) @ transform.affine[:3, :3].T \
        + transform.affine[:3, 3]
    assert np.allclose(transform.map_points(p), expected, atol=1e-4)
    # Accounting: one entry per stage, totals over stages.
    assert [s["method"] for s in info["stages"]] == ["affine-fast", "known-field"]  # the default affine stage
    assert info["method"] == "known-field"
    assert info["runtime_s"] == pytest.approx(sum(s["runtime_s"] for s in info["stages"]))
    assert info["peak_memory_mb"] == max(s["peak_memory_mb"] for s in info["stages"]) > 0
    assert all(s["runtime_s"] > 0 for s in info["stages"])
    assert transform.metadata["stages"] == info["stages"]


def test_register_pair_affine_method_is_one_stage(brain_phantom):
    truth = Transform(brain_phantom.grid, affine=rotation_scaling_affine(brain_phantom.grid))
    moving = warp_by(brain_phantom.image, truth)
    for affine in (True, False):
        transform, info = register_pair(brain_phantom.image, moving, get_method("affine", seed=1, threads=1),
                                        affine=affine, seed=1, threads=1)
        assert [s["method"] for s in info["stages"]] == ["affine"]
        assert transform.field is None
        assert mapping_error_mm(transform, truth, brain_phantom.mask)[0] < 0.5


def test_register_pair_without_affine_needs_one_grid(brain_phantom):
    from hdar_pipeline.core.images import new_image
    from conftest import phantom_grid

    other = new_image(np.zeros((40, 40, 40), np.float32), phantom_grid((40, 40, 40)))
    with pytest.raises(ValueError, match="fixed grid"):
        register_pair(brain_phantom.image, other, get_method("demons"), affine=False)


@pytest.mark.slow
def test_register_pair_recovers_an_affine_plus_a_deformation(brain_phantom, deformed):
    """Moving = phantom under A ∘ exp(v): the affine stage and Demons together recover the mapping."""
    a = rotation_scaling_affine(brain_phantom.grid, angles_deg=(6.0, 0.0, -3.0), translation_mm=(4.0, 2.0, -3.0),
                                scale=(1.04, 1.0, 0.98))
    truth = Transform(brain_phantom.grid, affine=a, field=deformed.truth.field)
    moving = warp_by(deformed.image, Transform(brain_phantom.grid, affine=a))
    moving_labels = warp_by(deformed.labels, Transform(brain_phantom.grid, affine=a), labels=True)
    transform, info = register_pair(brain_phantom.image, moving, get_method("demons", threads=1), affine=True,
                                    seed=1, threads=1)
    assert transform.affine is not None and transform.field is not None
    error, total = mapping_error_mm(transform, truth, brain_phantom.mask)
    assert error < 0.2 * total, (error, total)
    # The affine stage also fits the deformation's low-frequency part (it lands ~2.5 mm from ``a``), so the
    # pipeline is held to Demons on the deformation alone: measured 1.38 mm against 1.19 mm here (1.42 mm on
    # CI's CPU), with 0.5 mm of slack for ITK's platform-dependent arithmetic.
    alone = get_method("demons", seed=1, threads=1).register(brain_phantom.image, deformed.image)
    alone_error, _ = mapping_error_mm(alone, deformed.truth, brain_phantom.mask)
    assert error < alone_error + 0.5, (error, alone_error)
    fixed = _labels(brain_phantom.labels)
    after = mean_dice(fixed, _labels(transform.apply(moving_labels, interpolation="nearest")))
    assert after > mean_dice(fixed, _labels(moving_labels)) + 0.1
    assert [s["method"] for s in info["stages"]] == ["affine-fast", "demons"]  # the default affine stage
    assert info["runtime_s"] > 0 and info["peak_memory_mb"] > 0


# ---------------------------------------------------------------------- LPBA40


@pytest.mark.slow
@pytest.mark.realdata
def test_demons_on_an_lpba40_pair(lpba40_dir):
    """S02 onto S01 (already affinely aligned): mean Dice over the 56 labels > 0.65, no folds."""
    def files(s):
        return (lpba40_dir / s / f"{s}.delineation.skullstripped.nii.gz",
                lpba40_dir / s / f"{s}.delineation.structure.label.nii.gz")

    fixed, fixed_labels = (load_image(files("S01")[0]), load_image(files("S01")[1], labels=True))
    moving, moving_labels = (load_image(files("S02")[0]), load_image(files("S02")[1], labels=True))
    method = get_method("demons", threads=2)
    transform, info = register_pair(fixed, moving, method, affine=False)
    reference = _labels(fixed_labels)
    assert len(np.unique(reference[reference > 0])) == 56
    before = mean_dice(reference, _labels(moving_labels))
    after = mean_dice(reference, _labels(transform.apply(moving_labels, interpolation="nearest")))
    assert after > 0.65 and after > before + 0.08, (before, after)
    assert float(np.mean(transform.jacobian_determinant() <= 0)) == 0.0
    assert info["runtime_s"] > 0 and info["peak_memory_mb"] > 0


@pytest.mark.parametrize("method, default, other", [("lccdemons", "default", "fast"), ("fireants", "greedy", "syn"),
                                                    ("voxelmorph", "refined", "fast")])
def test_bids_app_and_register_accept_each_method_and_its_presets(tmp_path, method, default, other):
    """Every method with presets: in the App's --methods with its own --<method>-preset (default and choices), carried
    into the workflow's presets, and in hdar register --method/--preset."""
    pytest.importorskip("pydra")
    from hdar_pipeline.apps.bids_app_cli import build_bids_app_parser
    from hdar_pipeline.apps.cli import build_parser
    from hdar_pipeline.apps.bids_app import AppOptions, method_presets

    app = build_bids_app_parser()
    option = f"--{method}-preset"
    args = app.parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--methods", method, "syn",
                           option, other])
    assert args.methods == [method, "syn"] and getattr(args, f"{method}_preset") == other
    assert method_presets(AppOptions(**vars(args)))[method] == other
    assert getattr(app.parse_args([str(tmp_path), str(tmp_path / "o"), "participant"]), f"{method}_preset") == default
    with pytest.raises(SystemExit):
        app.parse_args([str(tmp_path), str(tmp_path / "o"), "participant", option, "quality"])
    reg = build_parser().parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", str(tmp_path), "--method", method,
                                     "--preset", other])
    assert reg.method == method and reg.preset == other
