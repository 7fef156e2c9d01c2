"""Array orientation of the network's inputs.

A network sees voxel arrays, not world coordinates: trained on LPBA40 (arrays stored L-P-S, i.e. the first
array axis points to the subject's left), it has never seen a brain whose array runs R-A-S unless training
flipped and permuted the axes. The model card records the training data's orientation
(``card["data"]["orientation"]``, axis codes such as ``"LPS"``); at inference the pair is flipped and permuted
into that orientation (:func:`to_orientation`), the network runs there, and its displacement field is brought
back onto the fixed image's array (:func:`reorient_field`). Only whole-axis flips and permutations are used,
so no voxel is interpolated.

``ornt`` arrays follow :mod:`nibabel.orientations`: row ``i`` is ``[j, s]``, source array axis ``i`` becomes
target axis ``j``, reversed when ``s == -1``.
"""

from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np
import torch


def orientation_to(affine: np.ndarray, codes: str | Sequence[str]) -> np.ndarray:
    """The ``ornt`` taking an array with voxel-to-world ``affine`` (RAS+ mm) to the axis ``codes``.

    Parameters
    ----------
    affine : ndarray ``(4, 4)``
    codes : str or sequence of str
        Three axis codes, one of L/R, one of P/A, one of I/S, e.g. ``"LPS"``.

    Raises
    ------
    ValueError
        ``codes`` are not three distinct axis codes.
    """
    codes = tuple(str(c).upper() for c in codes)
    try:
        target = nib.orientations.axcodes2ornt(codes)
    except Exception as exc:  # nibabel raises ValueError or KeyError on bad codes
        raise ValueError(f"not an orientation: {''.join(codes)!r} ({exc})") from None
    if len(codes) != 3 or np.isnan(target).any() or len({int(a) for a in target[:, 0]}) != 3:
        raise ValueError(f"not an orientation: {''.join(codes)!r}")
    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), target)


def is_identity(ornt: np.ndarray) -> bool:
    """Whether ``ornt`` leaves arrays as they are."""
    return bool(np.array_equal(ornt[:, 0], np.arange(3)) and (ornt[:, 1] > 0).all())


def inverse(ornt: np.ndarray) -> np.ndarray:
    """The ``ornt`` that undoes ``ornt``."""
    out = np.zeros_like(ornt)
    for i, (j, s) in enumerate(ornt):
        out[int(j)] = (i, s)
    return out


def to_orientation(x: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """Flip and permute the spatial axes of ``(B, C, X, Y, Z)`` as :func:`nibabel.orientations.apply_orientation`
    does for an array (a scalar volume or a mask; use :func:`reorient_field` for displacements). The result is
    contiguous (a copy unless ``ornt`` is the identity), so the network and the refinement loop do not work on
    strided views."""
    if is_identity(ornt):
        return x
    flips = [2 + i for i in range(3) if ornt[i, 1] < 0]
    if flips:
        x = torch.flip(x, flips)
    order = [int(a) for a in np.argsort(ornt[:, 0])]
    return x.permute(0, 1, *(2 + a for a in order)).contiguous()


def reorient_field(flow: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """A displacement field ``(B, 3, X, Y, Z)`` (voxels, component ``c`` along array axis ``c``) expressed on the
    reoriented array: the volume is flipped and permuted like :func:`to_orientation`, component ``i`` becomes
    component ``ornt[i, 0]`` and changes sign where axis ``i`` is reversed."""
    moved = to_orientation(flow, ornt)
    components = [None, None, None]
    for i, (j, s) in enumerate(ornt):
        components[int(j)] = moved[:, i] * float(s)
    return torch.stack(components, dim=1)
