"""Shared test helpers: a brain-like phantom with known deformations, and the LPBA40 location.

Fixtures
--------
lpba40_dir
    The LPBA40 folder (``../shared/data/lpba40`` next to the repository, or ``$HDAR_LPBA40_DIR``);
    the test is skipped cleanly when it is absent.
brain_phantom
    A :class:`Phantom` (image, labels, brain mask) on a 48^3 grid of 2 mm voxels.

The plain functions (:func:`make_brain_phantom`, :func:`rotation_scaling_affine`,
:func:`mapping_error_mm`, :func:`mean_dice`) can be imported by test modules
(``from conftest import make_brain_phantom``; ``tests/`` is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hdar_pipeline.core.images import Grid, new_image
from hdar_pipeline.core.transforms import Transform

# strict_skips: with HDAR_STRICT_SKIPS=1 (.ci/run) a skip is a failure unless the machine explains it;
# pytester: runs pytest on generated test files (tests/test_strict_skips.py)
pytest_plugins = ["strict_skips", "pytester"]

REPO = Path(__file__).resolve().parents[1]


def write_json(path: Path, data) -> Path:
    """Write ``data`` as JSON to ``path`` (parents created) and return the path: the sidecars and
    dataset_description.json of the phantom BIDS datasets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def lpba40_path() -> Path:
    """Where LPBA40 is expected: ``$HDAR_LPBA40_DIR``, else ``<repo>/../shared/data/lpba40``."""
    env = os.environ.get("HDAR_LPBA40_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "lpba40"


@pytest.fixture(scope="session")
def lpba40_dir() -> Path:
    """The LPBA40 folder (``S01/S01.delineation.skullstripped.nii.gz`` ...); skips when absent."""
    path = lpba40_path()
    if not (path / "S01" / "S01.delineation.skullstripped.nii.gz").is_file():
        pytest.skip(f"LPBA40 data not found at {path} (set HDAR_LPBA40_DIR)")
    return path


@dataclass
class Phantom:
    """A synthetic brain-like volume.

    Attributes
    ----------
    image : nibabel.Nifti1Image
        float32 intensities in [0, 1] (background 0).
    labels : nibabel.Nifti1Image
        int32 labels: 1-3 tissue-like classes inside the brain, 4 the "ventricles".
    mask : ndarray of bool
        The brain (the outer ellipsoid).
    """

    image: nib.Nifti1Image
    labels: nib.Nifti1Image
    mask: np.ndarray

    @property
    def grid(self) -> Grid:
        return Grid.of(self.image)


def phantom_grid(shape: tuple[int, int, int] = (48, 48, 48), spacing: float = 2.0) -> Grid:
    """An axis-aligned RAS grid whose centre sits at the world origin."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2
    return Grid(tuple(shape), affine)


def make_brain_phantom(shape: tuple[int, int, int] = (48, 48, 48), spacing: float = 2.0,
                       seed: int = 0) -> Phantom:
    """A smooth brain-like phantom: an ellipsoid filled with three blob-shaped intensity classes
    (smoothed random noise, thresholded at its terciles), a brighter rim and two dark "ventricles".

    The texture gives the registration something to match everywhere inside the brain; the image
    is Gaussian-smoothed (1 voxel) so interpolation error stays small.
    """
    grid = phantom_grid(shape, spacing)
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    c = (np.asarray(shape, np.float32) - 1) / 2
    rel = [(idx[a] - c[a]) / (shape[a] / 2) for a in range(3)]
    ell = (rel[0] / 0.78) ** 2 + (rel[1] / 0.86) ** 2 + (rel[2] / 0.72) ** 2
    brain = ell < 1.0
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    t1, t2 = np.quantile(noise[brain], [1 / 3, 2 / 3])
    classes = np.where(noise < t1, 1, np.where(noise < t2, 2, 3)).astype(np.int32)
    vent = (((rel[0] - 0.12) / 0.09) ** 2 + (rel[1] / 0.3) ** 2 + (rel[2] / 0.16) ** 2 < 1) | \
           (((rel[0] + 0.12) / 0.09) ** 2 + (rel[1] / 0.3) ** 2 + (rel[2] / 0.16) ** 2 < 1)
    labels = np.where(brain, classes, 0)
    labels[vent & brain] = 4
    values = np.array([0.0, 0.35, 0.6, 0.85, 0.12], np.float32)
    image = values[labels]
    image[brain & (ell > 0.8)] = np.maximum(image[brain & (ell > 0.8)], 0.5)  # a cortex-like rim
    image = np.clip(ndimage.gaussian_filter(image, 1.0), 0, 1).astype(np.float32)
    return Phantom(new_image(image, grid), new_image(labels.astype(np.int32), grid), brain)


@pytest.fixture(scope="session")
def brain_phantom() -> Phantom:
    return make_brain_phantom()


def write_phantom_cohort(folder: Path, n_subjects: int, *, seed: int = 20) -> dict:
    """A 32^3 (3 mm) phantom atlas with labels and ``n_subjects`` deformed subjects, written as NIfTI files.

    Returns ``{"atlas", "atlas_labels", "t1w": [...], "labels": [...]}`` (paths); subject ``i`` is
    :func:`hdar_pipeline.core.synthetic.make_subject` with seed ``seed + i`` (9 mm, 15 mm smoothness), named
    ``sub-0<i+1>_T1w.nii.gz`` / ``sub-0<i+1>_dseg.nii.gz``.
    """
    from hdar_pipeline.core.images import save_image
    from hdar_pipeline.core.synthetic import make_subject

    atlas = make_brain_phantom((32, 32, 32), 3.0)
    files = {"atlas": save_image(atlas.image, folder / "atlas_T1w.nii.gz"),
             "atlas_labels": save_image(atlas.labels, folder / "atlas_dseg.nii.gz"), "t1w": [], "labels": []}
    for i in range(n_subjects):
        s = make_subject(atlas.image, atlas.labels, seed=seed + i, magnitude_mm=9.0, smoothness_mm=15.0)
        files["t1w"].append(save_image(s.image, folder / f"sub-0{i + 1}_T1w.nii.gz"))
        files["labels"].append(save_image(s.labels, folder / f"sub-0{i + 1}_dseg.nii.gz"))
    return files


def rotation_scaling_affine(grid: Grid, *, angles_deg=(8.0, -4.0, 3.0), translation_mm=(5.0, -3.0, 2.0),
                            scale=(1.05, 0.97, 1.02)) -> np.ndarray:
    """A 4x4 LPS affine: scaling, then rotation (x, y, z Euler angles) about the grid centre, then
    a translation."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = rz @ ry @ rx @ np.diag(scale)
    centre = grid.lps_points(np.float64).reshape(-1, 3).mean(0)
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = centre - m @ centre + np.asarray(translation_mm)
    return out


def warp_by(image: nib.spatialimages.SpatialImage, truth: Transform, *, labels: bool = False) -> nib.Nifti1Image:
    """The moving image whose fixed-to-moving mapping is ``truth``: ``moving(truth(p)) = image(p)``.

    ``truth`` must be affine-only (its inverse is exact); deformable truths come from
    :func:`hdar_pipeline.core.synthetic.make_subject`.
    """
    inverse = Transform(truth.grid, affine=np.linalg.inv(truth.matrix))
    return inverse.apply(image, interpolation="nearest" if labels else "linear")


def mapping_error_mm(estimate: Transform, truth: Transform, mask: np.ndarray) -> tuple[float, float]:
    """Mean distance (mm) between the mapped points of ``estimate`` and ``truth`` inside ``mask``,
    and the mean displacement of ``truth`` there (its distance from the identity)."""
    p = truth.grid.lps_points(np.float64)[mask]
    t = truth.map_points(p)
    e = estimate.map_points(p)
    return float(np.linalg.norm(e - t, axis=-1).mean()), float(np.linalg.norm(t - p, axis=-1).mean())


def mean_dice(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``reference``."""
    values = []
    for lab in np.unique(reference[reference > 0]):
        a, b = reference == lab, other == lab
        values.append(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(values))


def unregistered_dice(reference_labels: Path, labels: Path) -> float:
    """Mean Dice of two label maps on one grid, as stored: the score a registration has to beat."""
    return mean_dice(np.asarray(nib.load(reference_labels).dataobj), np.asarray(nib.load(labels).dataobj))


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's torch code on one thread (small tensors: threads cost more than they give)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def check_recovery(transform, phantom, subject, *, max_ratio: float = 0.45, min_gain: float = 0.12):
    """A registration of ``subject`` (a synthetic deformation of ``phantom``) onto ``phantom`` recovers the known
    mapping (mean error below ``max_ratio`` of its magnitude, which is more than a voxel), improves the label Dice
    by ``min_gain`` and folds nowhere on the grid; returns ``(error, magnitude)`` in mm."""
    error, magnitude = mapping_error_mm(transform, subject.truth, phantom.mask)
    assert magnitude > 3.0  # the test means something: more than a voxel
    assert error < max_ratio * magnitude, (error, magnitude)
    fixed = np.asarray(phantom.labels.dataobj)
    before = mean_dice(fixed, np.asarray(subject.labels.dataobj))
    after = mean_dice(fixed, np.asarray(transform.apply(subject.labels, interpolation="nearest").dataobj))
    assert after > before + min_gain, (before, after)
    assert transform.jacobian_determinant().min() > 0  # no folding anywhere on the grid
    return error, magnitude


@pytest.fixture(scope="module")
def phantom():
    """A 32^3, 3 mm brain phantom with labels (the registration methods' phantom tests, once per module)."""
    return make_brain_phantom((32, 32, 32), 3.0)


@pytest.fixture(scope="module")
def subject(phantom):
    """``phantom`` under a known smooth deformation of about 12 mm (``subject.truth``), no bias field."""
    from hdar_pipeline.core.synthetic import make_subject

    return make_subject(phantom.image, phantom.labels, seed=2, magnitude_mm=12.0, smoothness_mm=18.0,
                        bias_strength=0.0, noise=0.01)
