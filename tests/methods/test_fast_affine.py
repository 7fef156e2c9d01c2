"""The fast affine (PyTorch, local NCC): a known affine recovered whatever frame the moving image is stored in."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import mapping_error_mm, rotation_scaling_affine, warp_by
from hdar_pipeline.methods import AFFINE_METHODS, affine_stage, register_pair
from hdar_pipeline.methods.fast_affine import FastAffineMethod
from hdar_pipeline.core.restoring import StorageFrame, restore
from hdar_pipeline.core.transforms import Transform

pytest.importorskip("torch")

#: the moving image as another scanner stores it: other axis order, voxel size, field of view and intensities
SCANNER = StorageFrame("scanner", "ASL", (64, 60, 56), (2.5, 1.8, 2.2), (14.0, -9.0, 6.0), "int16", 900.0, 40.0)


@pytest.mark.parametrize("window", [5, 0], ids=["local-ncc", "global-ncc"])
@pytest.mark.parametrize("frame", [None, SCANNER], ids=["same-grid", "scanner-frame"])
def test_fast_affine_recovers_a_known_affine(brain_phantom, frame, window):
    """Rotation (8, -4, 3 degrees), scaling (1.05, 0.97, 1.02) and a translation, then the whole head moved 30 mm
    and turned 10 degrees in the scanner (the image's affine, so nothing leaves the field of view): the map is
    recovered to a fraction of a voxel, from a moving image on the fixed grid's voxels or stored as another
    scanner would (ASL, anisotropic voxels, off-centre, int16 with another intensity range)."""
    import nibabel as nib

    from hdar_pipeline.core.images import RAS_TO_LPS

    grid = brain_phantom.grid
    small = Transform(grid, affine=rotation_scaling_affine(grid))
    moved = warp_by(brain_phantom.image, small)
    c, s = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
    pose = np.array([[c, -s, 0, 24.0], [s, c, 0, -15.0], [0, 0, 1, 10.0], [0, 0, 0, 1]])  # RAS
    moving = nib.Nifti1Image(np.asarray(moved.dataobj, np.float32), pose @ moved.affine)
    truth = Transform(grid, affine=RAS_TO_LPS @ pose @ RAS_TO_LPS @ small.matrix)
    if frame is not None:
        moving = restore(moving, frame)
    method = FastAffineMethod(seed=1, threads=1, device="cpu", window=window)
    estimate = method.register(brain_phantom.image, moving)
    assert estimate.field is None and estimate.grid.same_as(grid)
    error, magnitude = mapping_error_mm(estimate, truth, brain_phantom.mask)
    assert magnitude > 20.0
    assert error < 0.6, error  # mm, on 2 mm voxels
    assert estimate.metadata["method"] == "affine-fast" and method.device_used == "cpu"


def test_register_pair_runs_the_affine_stage_it_is_told(brain_phantom):
    grid = brain_phantom.grid
    truth = Transform(grid, affine=rotation_scaling_affine(grid))
    moving = warp_by(brain_phantom.image, truth)
    for name in AFFINE_METHODS:
        _, info = register_pair(brain_phantom.image, moving, affine_stage(name, seed=1, threads=1),
                                affine=False, seed=1, threads=1)
        assert info["stages"][0]["method"] == {"fast": "affine-fast", "ants": "affine"}[name]
    with pytest.raises(ValueError, match="unknown affine method 'rigid'"):
        affine_stage("rigid")


def test_fast_affine_rejects_bad_settings():
    with pytest.raises(ValueError, match="one step count per level"):
        FastAffineMethod(levels_mm=(6.0, 3.0), affine_steps=(10,))
    with pytest.raises(ValueError, match="positive"):
        FastAffineMethod(levels_mm=(0.0,), affine_steps=(10,))
    params = FastAffineMethod().parameters
    assert np.isfinite(params["window"]) and params["levels_mm"] == (6.0, 3.0) and "device_used" not in params
