"""Synthetic subjects with known deformations: for the demo, the tests and phantoms.

A subject is made from a template (image and labels) by a random smooth *diffeomorphic* deformation
(a stationary velocity field integrated by scaling and squaring), a smooth multiplicative bias field
and Gaussian noise. The deformation is returned as the shared :class:`~hdar_pipeline.core.transforms.Transform`
(template grid -> subject), so a test knows the truth exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from hdar_pipeline.core.images import Grid, new_image
from hdar_pipeline.core.transforms import Transform


@dataclass
class SyntheticSubject:
    """A synthetic subject on the template grid.

    Attributes
    ----------
    image, labels : nibabel.Nifti1Image
        The deformed, biased, noisy image (float32) and its labels (int32).
    truth : Transform
        Template-to-subject mapping used to make it: ``subject(x) = template(truth^-1(x))``; the
        subject was produced by warping the template with the *inverse* field, so registering the
        template (fixed) to the subject (moving) should recover ``truth``.
    """

    image: nib.Nifti1Image
    labels: nib.Nifti1Image
    truth: Transform


def random_velocity(shape: tuple[int, int, int], rng: np.random.Generator, *, magnitude_vox: float,
                    smoothness_vox: float) -> np.ndarray:
    """A smooth random vector field ``(*shape, 3)`` in voxels with maximum norm ``magnitude_vox``."""
    v = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), smoothness_vox, mode="reflect")
                  for _ in range(3)], axis=-1)
    peak = np.sqrt((v ** 2).sum(-1)).max()
    return (v * (magnitude_vox / max(peak, 1e-12))).astype(np.float32)


def integrate_velocity(velocity_vox: np.ndarray, steps: int = 7) -> np.ndarray:
    """Scaling and squaring: displacement ``(*shape, 3)`` (voxels) of ``exp(v)``."""
    disp = velocity_vox / (2 ** steps)
    grid = np.indices(disp.shape[:3], dtype=np.float32)
    for _ in range(steps):
        coords = grid + np.moveaxis(disp, -1, 0)
        warped = np.stack([ndimage.map_coordinates(disp[..., c], coords, order=1, mode="nearest")
                           for c in range(3)], axis=-1)
        disp = disp + warped
    return disp.astype(np.float32)


def voxel_to_mm(disp_vox: np.ndarray, grid: Grid) -> np.ndarray:
    """Voxel-unit displacements ``(*shape, 3)`` to LPS millimetres on ``grid``."""
    return (disp_vox @ grid.lps_affine[:3, :3].T).astype(np.float32)


def bias_field(shape: tuple[int, int, int], rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """A smooth multiplicative field around 1 (``1 +- strength``) from a random low-order polynomial."""
    coords = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*coords, indexing="ij")
    c = rng.uniform(-1, 1, size=6)
    b = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * x
    b = b / max(np.abs(b).max(), 1e-12)
    return (1.0 + strength * b).astype(np.float32)


def make_subject(template: nib.spatialimages.SpatialImage, labels: nib.spatialimages.SpatialImage,
                 seed: int, *, magnitude_mm: float = 6.0, smoothness_mm: float = 12.0,
                 bias_strength: float = 0.15, noise: float = 0.02) -> SyntheticSubject:
    """Deform ``template`` and ``labels`` by a random diffeomorphism, add bias and noise.

    Parameters
    ----------
    template, labels : nibabel images on one grid
        Intensities in [0, 1] and integer labels.
    seed : int
        Seeds the deformation, bias and noise.
    magnitude_mm : float
        Largest displacement of the velocity field, in mm.
    smoothness_mm : float
        Gaussian smoothing of the random velocity, in mm.
    """
    grid = Grid.of(template)
    rng = np.random.default_rng(seed)
    spacing = float(grid.spacing.mean())
    v = random_velocity(grid.shape, rng, magnitude_vox=magnitude_mm / spacing,
                        smoothness_vox=smoothness_mm / spacing)
    forward = Transform(grid, field=voxel_to_mm(integrate_velocity(v), grid))    # exp(v)
    inverse = Transform(grid, field=voxel_to_mm(integrate_velocity(-v), grid))   # exp(-v)
    # subject = template o exp(-v): then template = subject o exp(v), so the truth is exp(v).
    img = np.asarray(inverse.apply(template).dataobj)
    img = img * bias_field(grid.shape, rng, bias_strength)
    img = img + noise * rng.standard_normal(img.shape).astype(np.float32) * (img > 0)
    img = np.clip(img, 0, None).astype(np.float32)
    lab = np.asarray(inverse.apply(labels, interpolation="nearest").dataobj).astype(np.int32)
    return SyntheticSubject(new_image(img, grid), new_image(lab, grid), forward)
