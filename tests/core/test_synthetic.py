"""synthetic.py: known diffeomorphic deformations, used by the demo and the phantom tests."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from hdar_pipeline.core.images import Grid, new_image
from hdar_pipeline.core.synthetic import integrate_velocity, make_subject, random_velocity


def ball_phantom(shape=(40, 44, 36), spacing=2.0):
    grid = Grid(shape, np.diag([spacing, spacing, spacing, 1.0]))
    idx = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape, np.float32) / 2)[:, None, None, None]
    r = np.sqrt(((idx - centre) ** 2).sum(0))
    image = (r < 15) * 0.4 + (r < 9) * 0.4 + (np.abs(idx[0] - centre[0]) < 2) * (r < 15) * 0.2
    labels = (r < 15).astype(np.int32) + (r < 9) + 2 * ((np.abs(idx[0] - centre[0]) < 2) & (r < 15))
    image = ndimage.gaussian_filter(image.astype(np.float32), 1.5)  # smooth: interpolation error stays small
    return new_image(image, grid), new_image(labels.astype(np.int32), grid)


def test_zero_velocity_integrates_to_zero_and_small_velocity_to_itself():
    assert np.all(integrate_velocity(np.zeros((8, 9, 10, 3), np.float32)) == 0)
    v = np.full((12, 12, 12, 3), 0.3, np.float32)
    assert np.allclose(integrate_velocity(v)[3:-3, 3:-3, 3:-3], 0.3, atol=1e-4)


def test_subject_is_template_under_the_known_truth():
    image, labels = ball_phantom()
    subject = make_subject(image, labels, seed=3, magnitude_mm=6.0, bias_strength=0.0, noise=0.0)
    moved = np.abs(np.asarray(subject.image.dataobj) - np.asarray(image.dataobj)).mean()
    back = np.asarray(subject.truth.apply(subject.image).dataobj)
    err = np.abs(back - np.asarray(image.dataobj)).mean()
    assert moved > 0.005 and err < 0.35 * moved  # truth undoes the deformation (up to interpolation)
    jac = subject.truth.jacobian_determinant()
    assert jac.min() > 0  # diffeomorphic
    disp = np.linalg.norm(subject.truth.field, axis=-1).max()
    assert 3.0 < disp < 9.0


def test_random_velocity_magnitude_and_seed():
    rng = np.random.default_rng(0)
    v = random_velocity((20, 20, 20), rng, magnitude_vox=2.5, smoothness_vox=4)
    assert np.isclose(np.sqrt((v ** 2).sum(-1)).max(), 2.5)
    image, labels = ball_phantom()
    a = make_subject(image, labels, seed=5)
    b = make_subject(image, labels, seed=5)
    assert np.array_equal(np.asarray(a.image.dataobj), np.asarray(b.image.dataobj))
