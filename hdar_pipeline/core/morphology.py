"""Binary morphology with Euclidean balls in millimetres, on grids of any voxel size.

A ball of radius ``r`` mm on a grid of ``spacing`` holds the voxel offsets ``d`` with ``|d * spacing| <= r``.
Dilating or eroding with it gives the same voxels as thresholding a Euclidean distance transform at ``r``
(``distance <= r`` from the mask; ``distance > r`` from the background), and for the small radii of brain masks
(1-3 voxels) it is several times faster than the two distance transforms on a whole head.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["ball", "close", "dilate", "erode"]


def ball(radius_mm: float, spacing: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """The structuring element of a ball.

    Parameters
    ----------
    radius_mm : float
        Radius in mm.
    spacing : array-like of 3 floats
        Voxel size (mm) along each array axis.

    Returns
    -------
    numpy.ndarray of bool
        Shape ``2 * floor(radius_mm / spacing) + 1`` per axis, centred; True where ``|d * spacing| <= radius_mm``.
    """
    half = [int(np.floor(radius_mm / float(s) + 1e-9)) for s in spacing]
    axes = np.meshgrid(*[np.arange(-k, k + 1) * float(s) for k, s in zip(half, spacing)], indexing="ij")
    return sum(a * a for a in axes) <= radius_mm * radius_mm + 1e-9


def close(mask: np.ndarray, radius_mm: float, spacing: np.ndarray | tuple[float, ...], *,
          pad: bool = True) -> np.ndarray:
    """Morphological closing (dilation, then erosion) of a boolean mask by a ball of ``radius_mm``.

    Parameters
    ----------
    mask : numpy.ndarray of bool, 3-D
    radius_mm : float
    spacing : array-like of 3 floats
        Voxel size in mm.
    pad : bool
        Pad the mask with background first, so that a closing never grows across the volume border (and
        keep the input's voxels: the result is ``closed | mask``). Without it the volume border is neither
        background nor mask for the erosion (as a distance transform sees it).

    Returns
    -------
    numpy.ndarray of bool, the shape of ``mask``
    """
    structure = ball(radius_mm, spacing)
    if not pad:
        return ndimage.binary_erosion(ndimage.binary_dilation(mask, structure), structure, border_value=1)
    width = int(np.ceil(radius_mm / float(np.min(spacing)))) + 1
    padded = np.pad(mask, width)
    closed = ndimage.binary_erosion(ndimage.binary_dilation(padded, structure), structure, border_value=1)
    return closed[width:-width, width:-width, width:-width] | mask


def dilate(mask: np.ndarray, radius_mm: float, spacing: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """The voxels within ``radius_mm`` of ``mask`` (``distance_transform_edt(~mask) <= radius_mm``)."""
    return ndimage.binary_dilation(mask, ball(radius_mm, spacing))


def erode(mask: np.ndarray, radius_mm: float, spacing: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """The voxels of ``mask`` farther than ``radius_mm`` from its background inside the volume
    (``distance_transform_edt(mask) > radius_mm``: the volume's border is not background)."""
    return ndimage.binary_erosion(mask, ball(radius_mm, spacing), border_value=1)
