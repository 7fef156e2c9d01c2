"""hdar_pipeline.core.morphology: ball closing gives the voxels of the distance-transform definition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hdar_pipeline.core.morphology import ball, close


def _edt_close(mask, radius, spacing, pad):
    if pad:
        width = int(np.ceil(radius / min(spacing))) + 1
        m = np.pad(mask, width)
    else:
        m = mask
    dilated = ndimage.distance_transform_edt(~m, sampling=spacing) <= radius
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius
    if pad:
        closed = closed[width:-width, width:-width, width:-width] | mask
    return closed


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.2, 2.0), (2.0, 2.0, 1.0)])
@pytest.mark.parametrize("radius", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("pad", [True, False])
def test_ball_closing_equals_the_distance_transform_closing(spacing, radius, pad):
    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((30, 26, 22)), 1.5) > 0.52  # blobs touching the border too
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(close(mask, radius, spacing, pad=pad), _edt_close(mask, radius, spacing, pad))


def test_ball_holds_the_offsets_within_the_radius_in_mm():
    b = ball(2.0, (1.0, 2.0, 0.5))
    assert b.shape == (5, 3, 9)
    assert b[2, 1, 4] and b[0, 1, 4] and b[2, 0, 4] and b[2, 1, 0]  # 2 mm along each axis
    assert not b[0, 0, 4]  # sqrt(2^2 + 2^2) mm


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.2, 2.0)])
def test_ball_erosion_and_dilation_equal_the_distance_transform_thresholds(spacing):
    from hdar_pipeline.core.morphology import dilate, erode

    rng = np.random.default_rng(1)
    mask = ndimage.gaussian_filter(rng.random((28, 24, 20)), 1.5) > 0.5
    for radius in (1.0, 1.5, 2.5):
        np.testing.assert_array_equal(dilate(mask, radius, spacing),
                                      ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius)
        np.testing.assert_array_equal(erode(mask, radius, spacing),
                                      ndimage.distance_transform_edt(mask, sampling=spacing) > radius)
