"""The HDAR network: layers, the attention U-Net, difficulty-aware patch selection, the cascade, losses.

Conventions shared by every module of this sub-package
------------------------------------------------------
* Volumes are torch tensors ``(B, C, X, Y, Z)``; the spatial axes are the array axes ``(i, j, k)`` of
  the fixed image's NIfTI array (no transposition anywhere).
* A displacement field is ``(B, 3, X, Y, Z)`` in **voxel units of the grid it lives on**; channel ``c``
  is the displacement along array axis ``c``. Warping samples the moving volume at ``x + u(x)``
  (a fixed-to-moving mapping, the convention of :mod:`hdar_pipeline.core.transforms`).
* Resizing (images and fields) is *cell-centred* (``align_corners=False``): a grid of ``m`` voxels
  covering the same extent as one of ``n`` voxels has voxel ``q`` at fine coordinate
  ``(q + 0.5) * n / m - 0.5``; displacements scale by ``m / n`` per axis.
* :func:`~hdar_pipeline.hdar.cascade.field_voxels_to_transform` is the one exit to the shared
  :class:`~hdar_pipeline.core.transforms.Transform` (LPS millimetres).

The library never imports this sub-package at module import time of :mod:`hdar_pipeline`, so
torch stays an import-on-use dependency for the rest of the package.
"""

from __future__ import annotations
