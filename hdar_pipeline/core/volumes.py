"""Regional volumes: how large each atlas label is in a subject, in mm^3.

Two estimates of the same quantity, written side by side so that a user can see they agree:

* ``volume_mm3``: voxels of the label in the atlas labels brought onto the subject's native grid (nearest
  neighbour, by the inverse transform) times the native voxel volume;
* ``volume_jacobian_mm3``: the sum over the label's *atlas* voxels of the Jacobian determinant of the atlas ->
  native mapping times the atlas voxel volume (the "modulated" volume of voxel-based morphometry), free of
  the nearest-neighbour rounding at the label's border.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import pandas as pd

from hdar_pipeline.core.images import Grid, load_image

PathLike = str | os.PathLike

__all__ = ["label_volumes"]


def _voxel_volume(grid: Grid) -> float:
    return float(abs(np.linalg.det(grid.affine[:3, :3])))


def label_volumes(native_labels: PathLike, *, atlas_labels: PathLike | None = None,
                  jacobian: PathLike | None = None, names: Mapping[int, str] | None = None) -> pd.DataFrame:
    """Volumes (mm^3) of the atlas labels in one subject.

    Parameters
    ----------
    native_labels : path-like
        The atlas labels on the subject's native grid (integer map; 0 is background).
    atlas_labels : path-like, optional
        The atlas labels on the atlas grid; with ``jacobian``, adds ``volume_jacobian_mm3``.
    jacobian : path-like, optional
        The Jacobian determinant of the atlas -> native mapping on the atlas grid.
    names : mapping, optional
        Label index -> name (a ``dseg.tsv``); a missing name is written as ``n/a``.

    Returns
    -------
    pandas.DataFrame
        One row per non-zero label of the atlas (or, without ``atlas_labels``, of ``native_labels``):
        ``index`` (int), ``name``, ``voxels`` (native voxels), ``volume_mm3`` and, when computed,
        ``volume_jacobian_mm3``.
    """
    native = load_image(native_labels, labels=True)
    data = np.asarray(native.dataobj).astype(np.int64, copy=False)
    atlas = load_image(atlas_labels, labels=True) if atlas_labels is not None else None
    atlas_data = np.asarray(atlas.dataobj).astype(np.int64, copy=False) if atlas is not None else None
    present = np.unique(atlas_data if atlas_data is not None else data)
    index = [int(v) for v in present if v > 0]
    top = max([0, *index, int(data.max(initial=0))]) + 1
    counts = np.bincount(data.clip(0).ravel(), minlength=top)
    table = pd.DataFrame({
        "index": index,
        "name": [(names or {}).get(i, "n/a") for i in index],
        "voxels": [int(counts[i]) for i in index],
        "volume_mm3": [float(counts[i]) * _voxel_volume(Grid.of(native)) for i in index],
    })
    if atlas is not None and jacobian is not None:
        jac_img = load_image(jacobian)
        jac = np.asarray(jac_img.dataobj, dtype=np.float64)
        if jac.shape != atlas_data.shape:
            raise ValueError(f"{jacobian}: Jacobian map of shape {jac.shape} but the atlas labels "
                             f"{atlas_labels} have {atlas_data.shape}")
        sums = np.bincount(atlas_data.clip(0).ravel(), weights=jac.ravel(), minlength=top)
        table["volume_jacobian_mm3"] = [float(sums[i]) * _voxel_volume(Grid.of(atlas)) for i in index]
    return table
