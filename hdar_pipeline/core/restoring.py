"""Re-store an image in another frame: the same anatomy as another scanner or dataset would store it.

Used to test that a method gives the same answer whatever the array orientation, field of view, voxel size and
intensity range of its inputs (``benchmarks/frames.py``, ``tests/hdar/test_hdar_frames_lpba40.py``). The world position
of the anatomy never changes: only the grid it is sampled on and the stored values do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np

from hdar_pipeline.core.images import Grid, resample_to

__all__ = ["FRAMES", "StorageFrame", "restore", "restore_all", "storage_grid"]


@dataclass(frozen=True)
class StorageFrame:
    """How an image is stored.

    Attributes
    ----------
    name : str
    orientation : str
        Array axis codes, e.g. ``"ASL"`` (first axis points anterior).
    shape : 3 ints or None
        Array shape; ``None`` keeps the extent of the source grid at the new voxel size.
    voxel_size : 3 floats or None
        mm along the array axes; ``None`` keeps the source's (permuted like the axes).
    offset_mm : 3 floats
        World (RAS) shift of the grid's centre away from the source grid's centre: the anatomy sits off the
        centre of the field of view by minus this.
    dtype : str
        Stored data type of intensities (``"float32"``, ``"int16"``, ...).
    intensity_scale, intensity_offset : float
        Stored intensity ``= value * scale + offset`` (before the cast).
    """

    name: str
    orientation: str = "LPS"
    shape: tuple[int, int, int] | None = None
    voxel_size: tuple[float, float, float] | None = None
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    dtype: str = "float32"
    intensity_scale: float = 1.0
    intensity_offset: float = 0.0


#: The frames the generalisation checks use (LPBA40 is LPS, 1 mm, 160 x 192 x 160, float in [0, 1]).
FRAMES: dict[str, StorageFrame] = {f.name: f for f in (
    StorageFrame("native"),
    StorageFrame("asl-offcentre", "ASL", (256, 256, 180), None, (18.0, -22.0, 14.0), "int16", 3000.0, 0.0),
    StorageFrame("ras-int16", "RAS", None, None, (0.0, 0.0, 0.0), "int16", 1200.0, 40.0),
    StorageFrame("psr-0.9mm", "PSR", (224, 192, 192), (0.9, 0.9, 0.9), (-6.0, 10.0, 0.0)),
    StorageFrame("las-1.3mm", "LAS", (136, 160, 128), (1.3, 1.2, 1.25), (4.0, 0.0, -8.0), "int16", 800.0, 0.0),
)}


def storage_grid(source: Grid, frame: StorageFrame) -> Grid:
    """The grid ``frame`` stores ``source``'s anatomy on (axes aligned with the world axes)."""
    ornt = nib.orientations.axcodes2ornt(tuple(frame.orientation))
    src_ornt = nib.orientations.io_orientation(source.affine)
    src_spacing = source.spacing
    spacing = np.empty(3)
    shape = np.empty(3, dtype=int)
    lin = np.zeros((3, 3))
    for t in range(3):
        world, sign = int(ornt[t, 0]), float(ornt[t, 1])
        a = int(np.nonzero(src_ornt[:, 0] == world)[0][0])
        spacing[t] = frame.voxel_size[t] if frame.voxel_size else src_spacing[a]
        shape[t] = frame.shape[t] if frame.shape else int(round(source.shape[a] * src_spacing[a] / spacing[t]))
        lin[world, t] = sign * spacing[t]
    centre = source.affine[:3, :3] @ ((np.asarray(source.shape) - 1) / 2) + source.affine[:3, 3]
    centre = centre + np.asarray(frame.offset_mm, float)
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = centre - lin @ ((shape - 1) / 2)
    return Grid(tuple(int(n) for n in shape), affine)


def restore(img: nib.spatialimages.SpatialImage, frame: StorageFrame, *, labels: bool = False) -> nib.Nifti1Image:
    """``img`` re-stored in ``frame`` (labels: nearest neighbour, stored as ``uint8``/``int16``/``int32``;
    intensities: linear, scaled and cast to ``frame.dtype``)."""
    grid = storage_grid(Grid.of(img), frame)
    out = resample_to(img, grid, interpolation="nearest" if labels else "linear")
    data = np.asarray(out.dataobj)
    if labels:
        data = np.rint(data)
        kind = np.uint8 if data.max() < 256 else np.int32
        stored = data.astype(kind)
    else:
        values = data.astype(np.float64) * frame.intensity_scale + frame.intensity_offset
        dtype = np.dtype(frame.dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            values = np.clip(np.rint(values), info.min, info.max)
        stored = values.astype(dtype)
    res = nib.Nifti1Image(stored, grid.affine)
    res.header.set_data_dtype(stored.dtype)
    res.set_qform(grid.affine, code=1)
    res.set_sform(grid.affine, code=1)
    return res


def restore_all(img, frames: Sequence[StorageFrame] | None = None, *, labels: bool = False) -> dict[str, nib.Nifti1Image]:
    """``{frame.name: restore(img, frame)}`` for every frame (default: :data:`FRAMES`)."""
    return {f.name: restore(img, f, labels=labels) for f in (frames or FRAMES.values())}

