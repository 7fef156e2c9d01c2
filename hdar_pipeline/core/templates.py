"""Templates that ship inside installed packages (no download): the MNI ICBM152 2009a brain.

The ``nilearn`` wheel carries the skull-stripped MNI ICBM152 2009a nonlinear symmetric T1 template
and its grey- and white-matter probability maps (1 mm, 197 x 233 x 189 voxels, RAS+, MNI coordinates
in mm; intensities 0-255 stored as uint8) in ``nilearn/datasets/data``. This module reads those files
with nibabel through the installed package's location, without importing ``nilearn`` itself (importing
it pulls in scikit-learn and friends and takes seconds).

The brain mask is built from the tissue maps, much as nilearn's ``load_mni152_brain_mask`` thresholds
the template: ``GM + WM >= 0.5``, closed with a 3 mm ball and hole-filled (sulcal and ventricular CSF
join the brain), plus a 1 mm CSF margin restricted to where the skull-stripped template is non-zero.
It matches the template's non-zero support with a Dice of 0.996.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from hdar_pipeline.core import morphology
from hdar_pipeline.core.images import Grid, ImageError, new_image, resample_to

MNI_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"

#: Name used in derivative file names (``space-<atlas>``), as TemplateFlow spells this template.
MNI_TEMPLATE_NAME = "MNI152NLin2009aSym"


def nilearn_data_dir() -> Path:
    """The folder of data files inside the installed ``nilearn`` package (not imported).

    Raises
    ------
    ImageError
        ``nilearn`` is not installed or its data folder lacks the MNI ICBM152 files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImageError("nilearn", "the MNI ICBM152 2009a template ships with the nilearn package, which is "
                         "not installed: pip install 'nilearn>=0.10' (no download happens at run time)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in (MNI_T1_FILE, MNI_GM_FILE, MNI_WM_FILE) if not (folder / name).is_file()]
    if missing:
        raise ImageError(folder, f"the installed nilearn lacks the MNI ICBM152 template file(s) {', '.join(missing)}; "
                         "reinstall nilearn>=0.10 from its wheel (pip install --force-reinstall nilearn)")
    return folder


@lru_cache(maxsize=1)
def _mni_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 scaled to [0, 1] (float32), brain mask (bool) and the RAS affine, read once per process."""
    folder = nilearn_data_dir()
    try:
        t1_img = nib.load(str(folder / MNI_T1_FILE))
        t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
        gm = np.asarray(nib.load(str(folder / MNI_GM_FILE)).dataobj, dtype=np.float32)
        wm = np.asarray(nib.load(str(folder / MNI_WM_FILE)).dataobj, dtype=np.float32)
    except Exception as exc:  # corrupt installation
        raise ImageError(folder, f"cannot read the MNI ICBM152 template files ({type(exc).__name__}: {exc})") from None
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 /= max(float(t1.max()), 1e-6)
    tissue = (gm + wm) / 255.0 >= 0.5
    spacing = Grid.of(t1_img).spacing
    # Morphology inside the bounding box of the template's non-zero voxels (padded by 5 voxels).
    idx = np.argwhere(t1 > 0)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = np.pad(tissue[box], 5)
    closed = morphology.close(sub, 3.0, spacing, pad=False)
    closed = ndimage.binary_fill_holes(closed | sub)
    margin = ndimage.binary_dilation(closed, morphology.ball(1.0, spacing))
    mask = np.zeros(t1.shape, dtype=bool)
    mask[box] = (closed | margin)[5:-5, 5:-5, 5:-5]
    mask &= t1 > 0
    mask |= tissue
    t1.setflags(write=False)
    mask.setflags(write=False)
    affine.setflags(write=False)
    return t1, mask, affine


def mni_template(spacing_mm: float | None = None) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The MNI ICBM152 2009a (nonlinear, symmetric) T1 template and its brain mask.

    Parameters
    ----------
    spacing_mm : float, optional
        Resample both onto an isotropic grid with this voxel size (mm) covering the same field of view
        (linear for the T1, the mask from its linearly resampled indicator at 0.5). Default: the native
        1 mm grid, 197 x 233 x 189 voxels.

    Returns
    -------
    t1 : nibabel.Nifti1Image
        float32, skull-stripped, intensities in [0, 1], RAS+ affine in MNI millimetres.
    mask : nibabel.Nifti1Image
        uint8 brain mask (1 inside, about 1.87 L) on the same grid.

    Raises
    ------
    ImageError
        The template files cannot be found (nilearn missing) or read.
    """
    t1, mask, affine = _mni_arrays() if spacing_mm is None else _mni_resampled(round(float(spacing_mm), 4))
    grid = Grid(tuple(int(s) for s in t1.shape), np.array(affine))
    return new_image(t1.copy(), grid), new_image(mask.astype(np.uint8), grid)


@lru_cache(maxsize=4)
def _mni_resampled(spacing_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template arrays on an isotropic ``spacing_mm`` grid (cached, read-only)."""
    t1, mask, affine = _mni_arrays()
    grid = Grid(tuple(int(s) for s in t1.shape), np.array(affine))
    if np.allclose(grid.spacing, spacing_mm):
        return t1, mask, affine
    target = isotropic_grid(grid, spacing_mm)
    t1_out = np.asarray(resample_to(_presmooth(new_image(t1, grid), spacing_mm), target).dataobj, dtype=np.float32)
    soft = np.asarray(resample_to(new_image(mask.astype(np.float32), grid), target).dataobj)
    mask_out = soft >= 0.5
    out_affine = np.array(target.affine)
    for arr in (t1_out, mask_out, out_affine):
        arr.setflags(write=False)
    return t1_out, mask_out, out_affine


def isotropic_grid(grid: Grid, spacing_mm: float) -> Grid:
    """An isotropic grid with the same axes and field of view as ``grid`` and voxels of ``spacing_mm``.

    The first voxel corner coincides with ``grid``'s first voxel corner; the number of voxels along
    each axis is the field of view divided by ``spacing_mm``, rounded up.
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    old = grid.spacing
    extent = np.asarray(grid.shape) * old
    shape = tuple(int(max(2, np.ceil(e / spacing_mm - 1e-6))) for e in extent)
    directions = grid.affine[:3, :3] / old[None, :]
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing_mm
    # Keep the corner of voxel 0 fixed: centre(0) = corner + R @ (s / 2).
    corner = grid.affine[:3, 3] - directions @ (old / 2)
    affine[:3, 3] = corner + directions @ (np.full(3, spacing_mm) / 2)
    return Grid(shape, affine)


def _presmooth(img: nib.Nifti1Image, spacing_mm: float) -> nib.Nifti1Image:
    """Gaussian anti-aliasing before downsampling to ``spacing_mm`` (sigma = half the voxel ratio)."""
    spacing = Grid.of(img).spacing
    ratio = spacing_mm / spacing
    if np.all(ratio <= 1.0):
        return img
    sigma = np.where(ratio > 1.0, 0.5 * ratio, 0.0)
    data = ndimage.gaussian_filter(np.asarray(img.dataobj, dtype=np.float32), sigma)
    return new_image(data, img)


__all__ = ["MNI_TEMPLATE_NAME", "isotropic_grid", "mni_template", "nilearn_data_dir"]
