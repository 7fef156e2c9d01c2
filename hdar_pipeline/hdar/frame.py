"""The canonical frame HDAR works in, whatever grid the fixed image is stored on.

A network sees voxel arrays. Trained on LPBA40 (arrays L-P-S, 1 mm voxels, a 160 x 192 x 160 box with the
brain in the middle, skull-stripped, intensities rescaled by robust percentiles), it registers well only
pairs that look like that. Scanners and datasets store brains in other array orientations, at other voxel
sizes, in larger fields of view with the brain off-centre, padded, with other intensity ranges. So HDAR
never runs on the fixed grid itself: it runs in a **canonical frame**,

* the fixed grid's axes flipped and permuted into the training data's axis order (no rotation, so an
  oblique scan keeps its own direction cosines and nothing is interpolated for orientation alone),
* at the training data's voxel size,
* a box of the training data's shape (larger if the brain does not fit in it), centred on the fixed
  image's brain,

and its displacement field is mapped back onto the fixed grid exactly once, as a world-space (LPS mm)
vector field. Where the fixed grid's voxels already have the training voxel size, the canonical box is
snapped onto them, so going into the frame copies voxels instead of interpolating them: the same pair
stored in two frames gives the network the same arrays.

Shapes and units: arrays ``(X, Y, Z)`` on a grid; displacement fields ``(1, 3, X, Y, Z)`` in voxels of the
canonical grid, channel ``c`` along canonical array axis ``c`` (as in :mod:`hdar_pipeline.hdar.layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from hdar_pipeline.core.images import RAS_TO_LPS, Grid, robust_unit_range
from hdar_pipeline.hdar.layers import grid_sample_3d

__all__ = ["CanonicalFrame", "brain_box", "canonical_frame"]

#: Extra room around the brain's bounding box (mm per side) when the training box is too small for it.
BOX_MARGIN_MM = 8.0
#: Canonical box sizes are rounded up to a multiple of this many voxels (the cascade's downsampling).
BOX_MULTIPLE = 16


def brain_box(data: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The brain's bounding box in voxel indices, ``(lo, hi)`` inclusive, robust to stray voxels.

    Parameters
    ----------
    data : ndarray ``(X, Y, Z)``
        Intensities (any range).
    mask : ndarray of bool, optional
        A brain mask on the same grid; by default the voxels brighter than 5 % of the robust maximum
        (the 99.5th percentile of the non-zero voxels), which is the brain of a skull-stripped image.

    Returns
    -------
    (ndarray, ndarray) or None
        Per axis the first and last index at which more than 0.1 % of the foreground voxels lie before
        (after) it; ``None`` when there is no foreground.
    """
    if mask is None:
        nonzero = data[data > 0]
        if nonzero.size == 0:
            return None
        mask = data > 0.05 * float(np.percentile(nonzero, 99.5))
    total = int(np.count_nonzero(mask))
    if total == 0:
        return None
    # per axis, the 0.1 % tails of the foreground's projection; counted from each end, so a flipped array
    # gives the flipped box (the same brain centre)
    cut = 0.001 * total
    lo, hi = np.empty(3), np.empty(3)
    for axis in range(3):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        lo[axis] = int(np.argmax(np.cumsum(counts) > cut))
        hi[axis] = len(counts) - 1 - int(np.argmax(np.cumsum(counts[::-1]) > cut))
    return lo, hi


def _axis_codes_matrix(codes: Sequence[str]) -> np.ndarray:
    """``(3, 2)`` nibabel ornt of the target axis codes (world axis, sign) per target array axis."""
    codes = tuple(str(c).upper() for c in codes)
    target = nib.orientations.axcodes2ornt(codes)
    if len(codes) != 3 or np.isnan(target).any() or len({int(a) for a in target[:, 0]}) != 3:
        raise ValueError(f"not an orientation: {''.join(codes)!r}")
    return target


@dataclass(frozen=True)
class CanonicalFrame:
    """A canonical grid and how it sits on the fixed grid.

    Attributes
    ----------
    grid : Grid
        The canonical grid (RAS+ affine, mm).
    fixed : Grid
        The fixed image's grid.
    index_map : tuple or None
        When every canonical voxel centre is a fixed voxel centre: ``(axes, signs, offsets)`` such that
        canonical index ``q[t] = signs[t] * v[axes[t]] + offsets[t]`` for fixed index ``v`` (the box is
        then cut out of the fixed array by flips, a permutation and integer shifts); else ``None``.
    """

    grid: Grid
    fixed: Grid
    index_map: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None

    @property
    def exact(self) -> bool:
        """Whether entering the frame copies voxels (no interpolation)."""
        return self.index_map is not None

    # ----------------------------------------------------------------------------------- into the frame

    def to_canonical(self, data: np.ndarray | torch.Tensor, *, interpolation: str = "linear",
                     device: torch.device | str | None = None) -> torch.Tensor:
        """A volume on the fixed grid resampled onto the canonical grid, ``(1, 1, *grid.shape)`` float32.

        Parameters
        ----------
        data : array ``(X, Y, Z)`` on the fixed grid
        interpolation : {"linear", "nearest"}
            Used only when the frame is not exact. Outside the fixed grid the value is the volume's minimum
            (its background: 0 for a skull-stripped image, the offset of one stored with an offset).
        """
        vol = torch.as_tensor(np.asarray(data, dtype=np.float32) if not isinstance(data, torch.Tensor) else data,
                              device=device).float()
        background = float(vol.min()) if vol.numel() else 0.0
        if self.index_map is not None:
            return self._cut(vol, background)[None, None].contiguous()
        coords = self._sample_coords(self.grid, self.fixed, vol.device)
        mode = "nearest" if interpolation == "nearest" else "bilinear"
        out = grid_sample_3d(vol[None, None] - background, coords, mode=mode, padding_mode="zeros")
        return (out + background).contiguous()

    def _cut(self, vol: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        axes, signs, offsets = self.index_map  # type: ignore[misc]
        moved = vol.permute(*axes)
        flips = [t for t in range(3) if signs[t] < 0]
        if flips:
            moved = torch.flip(moved, flips)
        out = torch.full(self.grid.shape, fill, dtype=vol.dtype, device=vol.device)
        src, dst = [], []
        for t in range(3):
            n = moved.shape[t]
            # after the flip, source index s sits at canonical index s + shift
            shift = offsets[t] - (n - 1 if signs[t] < 0 else 0)
            lo, hi = max(0, shift), min(self.grid.shape[t], n + shift)
            if hi <= lo:
                return out
            dst.append(slice(lo, hi))
            src.append(slice(lo - shift, hi - shift))
        out[tuple(dst)] = moved[tuple(src)]
        return out

    # ----------------------------------------------------------------------------------- back onto the fixed grid

    def field_to_fixed(self, flow: torch.Tensor) -> np.ndarray:
        """A canonical displacement field as the fixed grid's LPS-millimetre field.

        Parameters
        ----------
        flow : Tensor ``(1, 3, *grid.shape)``
            Displacement in canonical voxels (component ``c`` along canonical axis ``c``); the warped
            moving image is ``M(x + flow(x))``.

        Returns
        -------
        ndarray ``(*fixed.shape, 3)`` float32
            The displacement at every fixed voxel centre in LPS millimetres (the layout of
            :class:`~hdar_pipeline.core.transforms.Transform`). Outside the canonical box the field continues
            the box's border values (no step, so no folding at the box's faces).
        """
        lin = torch.as_tensor((RAS_TO_LPS @ self.grid.affine)[:3, :3], dtype=torch.float32, device=flow.device)
        mm = torch.einsum("ca,ba...->bc...", lin, flow.float())  # (1, 3, *canon) LPS mm
        if self.index_map is not None:
            out = self._uncut(mm[0])
        else:
            coords = self._sample_coords(self.fixed, self.grid, mm.device)
            out = grid_sample_3d(mm, coords, mode="bilinear", padding_mode="border")[0]
        return np.ascontiguousarray(out.permute(1, 2, 3, 0).cpu().numpy(), dtype=np.float32)

    def _uncut(self, field: torch.Tensor) -> torch.Tensor:
        """``(3, *canon)`` -> ``(3, *fixed)`` by the inverse index map, replicating the box's border."""
        axes, signs, offsets = self.index_map  # type: ignore[misc]
        fixed_shape = self.fixed.shape
        # canonical index of fixed index v along target axis t: signs[t] * v[axes[t]] + offsets[t]
        idx = []
        for t in range(3):
            n = fixed_shape[axes[t]]
            q = signs[t] * torch.arange(n, device=field.device) + offsets[t]
            idx.append(q.clamp(0, self.grid.shape[t] - 1))
        out = field[:, idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]  # (3, fixed axes permuted)
        inv = [0, 0, 0]
        for t, a in enumerate(axes):
            inv[a] = t
        return out.permute(0, *(1 + i for i in inv))

    @staticmethod
    def _sample_coords(target: Grid, source: Grid, device) -> torch.Tensor:
        """grid_sample coordinates ``(1, *target.shape, 3)`` of every target voxel in the source array
        (normalised, align_corners=True, last dim ordered (z, y, x) as grid_sample wants)."""
        m = torch.as_tensor(np.linalg.inv(source.affine) @ target.affine, dtype=torch.float64)
        axes = [torch.arange(n, dtype=torch.float64) for n in target.shape]
        out = torch.empty((*target.shape, 3), dtype=torch.float32, device=device)
        for c in range(3):
            v = (m[c, 0] * axes[0][:, None, None] + m[c, 1] * axes[1][None, :, None]
                 + m[c, 2] * axes[2][None, None, :] + m[c, 3])
            n = source.shape[c]
            out[..., 2 - c] = (2.0 * v / max(n - 1, 1) - 1.0).float().to(device)
        return out[None]


def canonical_frame(fixed: Grid, box: tuple[np.ndarray, np.ndarray] | None, *, orientation: Sequence[str] = "LPS",
                    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                    shape: Sequence[int] = (160, 192, 160), fit_brain: bool = True) -> CanonicalFrame:
    """The canonical frame of a fixed grid.

    Parameters
    ----------
    fixed : Grid
        The fixed image's grid.
    box : (lo, hi) or None
        The brain's bounding box in fixed voxel indices (:func:`brain_box`); ``None`` centres the box on
        the grid.
    orientation : axis codes
        The training data's array orientation (model card ``data.orientation``).
    voxel_size : 3 floats, mm
        The training data's voxel size along its array axes (model card ``data.voxel_size_mm``).
    shape : 3 ints
        The training data's array shape (model card ``data.grid_shape``); enlarged (to a multiple of
        :data:`BOX_MULTIPLE`) where the brain's extent plus :data:`BOX_MARGIN_MM` per side does not fit
        (unless ``fit_brain`` is false).
    fit_brain : bool
        Enlarge the box to hold the whole brain (default).

    Returns
    -------
    CanonicalFrame
    """
    target = _axis_codes_matrix(orientation)
    voxel_size = np.asarray([float(v) for v in voxel_size])
    if voxel_size.shape != (3,) or (voxel_size <= 0).any():
        raise ValueError(f"voxel_size must be three positive sizes in mm, got {voxel_size}")
    src = nib.orientations.io_orientation(fixed.affine)  # fixed axis a -> (world axis, sign)
    spacing = fixed.spacing
    lin = np.zeros((3, 3))
    axes, signs = [0, 0, 0], [1, 1, 1]
    for t in range(3):
        world, sign = int(target[t, 0]), int(target[t, 1])
        a = int(np.nonzero(src[:, 0] == world)[0][0])
        s = sign * int(src[a, 1])
        axes[t], signs[t] = a, s
        lin[:, t] = fixed.affine[:3, a] / spacing[a] * s * voxel_size[t]
    fixed_lin = fixed.affine[:3, :3]
    if box is None:
        centre_vox = (np.asarray(fixed.shape, float) - 1) / 2
        extent_mm = np.zeros(3)
    else:
        lo, hi = (np.asarray(b, float) for b in box)
        centre_vox = (lo + hi) / 2
        extent_mm = np.array([(hi[axes[t]] - lo[axes[t]] + 1) * spacing[axes[t]] for t in range(3)])
    need = np.ceil((extent_mm + 2 * BOX_MARGIN_MM) / voxel_size / BOX_MULTIPLE) * BOX_MULTIPLE
    out_shape = tuple(int(max(int(s), n)) if fit_brain else int(s) for s, n in zip(shape, need))
    centre_world = fixed_lin @ centre_vox + fixed.affine[:3, 3]
    origin = centre_world - lin @ ((np.asarray(out_shape, float) - 1) / 2)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = lin, origin
    index_map = None
    if np.allclose([spacing[a] for a in axes], voxel_size, rtol=0, atol=1e-3 * voxel_size.min()):
        # snap the box onto the fixed voxels: canonical voxel 0 at a whole fixed index
        v0 = np.linalg.solve(fixed_lin, origin - fixed.affine[:3, 3])
        # round along the canonical axes (floor(x + 0.5) of the signed index), so a flipped storage of the same
        # image snaps onto the same world voxel
        for t in range(3):
            v0[axes[t]] = signs[t] * np.floor(signs[t] * v0[axes[t]] + 0.5)
        affine[:3, 3] = fixed_lin @ v0 + fixed.affine[:3, 3]
        offsets = tuple(int(-signs[t] * v0[axes[t]]) for t in range(3))
        index_map = (tuple(axes), tuple(signs), offsets)
    return CanonicalFrame(Grid(out_shape, affine), fixed, index_map)


def normalise_in_frame(volume: torch.Tensor) -> torch.Tensor:
    """Intensities of a canonical volume ``(1, 1, X, Y, Z)`` rescaled to [0, 1] by
    :func:`~hdar_pipeline.core.images.robust_unit_range` (the training data's normalisation)."""
    arr = robust_unit_range(volume[0, 0].cpu().numpy())
    return torch.as_tensor(arr, device=volume.device)[None, None]
