"""Reusing sMRIPrep/fMRIPrep anatomical derivatives (the BIDS App's ``--derivatives DIR``).

For a subject (x session) and its T1w image, :func:`find_anat_derivatives` looks in one or more derivatives
datasets (indexed with pybids, ``is_derivative=True``; the first dataset, in the order given, that has a file
wins) for:

``sub-<l>[_ses-<s>]_desc-brain_mask.nii.gz`` (datatype ``anat``, no ``space`` entity or ``space-T1w``)
    The brain mask in native T1w space. It replaces brain extraction: the T1w is N4-corrected inside this mask
    and the mask is applied to it (:func:`hdar_pipeline.pipeline.preprocess.prepare_brain`, ``brain_mask=``). It must lie
    on the T1w's own grid (same shape and voxel-to-world affine), as sMRIPrep's is when the subject has one T1w
    image; a mask on another grid (sMRIPrep's reference of several T1w images, another reorientation) is
    refused with an :class:`~hdar_pipeline.core.images.ImageError` naming the mask file.
``sub-<l>[_ses-<s>]_from-T1w_to-<SPACE>_mode-image_xfm.h5``
    sMRIPrep's spatial normalisation, looked for only when ``SPACE`` is the atlas's space name (``space-<name>``
    of the outputs, e.g. ``--atlas-space MNI152NLin2009cAsym``). It is an ITK composite transform written by
    antsRegistration (an affine, then a SyN displacement field), mapping SPACE points to T1w points. **Only its
    linear part is reused** (:func:`linear_part`): read with SimpleITK, the linear transforms of the composite
    (those applied after its displacement field, composed) give the 4x4 affine that replaces the
    preprocessing's own affine registration to the atlas. The nonlinear part is not used: each method computes
    its own deformation from the affinely aligned image.

Files of a session (``ses-<s>``) are preferred; a subject-level file (no ``ses`` entity, sMRIPrep's single
anatomical reference over sessions) is used otherwise. A file that names a source entity (``acq``, ``rec``,
``run``, ...) with a value other than the T1w's belongs to another image and is never used. Where several
files match, the first by name is used and a note says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hdar_pipeline.bids_io.inputs import SOURCE_ENTITIES, _layout
from hdar_pipeline.core.images import ImageError

PathLike = str | os.PathLike


@dataclass
class AnatDerivatives:
    """What :func:`find_anat_derivatives` found for one T1w image.

    Attributes
    ----------
    brain_mask : Path or None
        The native-space brain mask (``desc-brain_mask``).
    xfm : Path or None
        The composite transform to the atlas space (``from-T1w_to-<space>_mode-image_xfm.h5``).
    notes : list of str
        What was chosen where the lookup was ambiguous.
    """

    brain_mask: Path | None = None
    xfm: Path | None = None
    notes: list[str] = field(default_factory=list)


def derivative_layouts(folders: Sequence[PathLike]) -> list[Any]:
    """pybids layouts of the ``--derivatives`` datasets, in the order given.

    Raises
    ------
    BIDSError
        A folder is missing, has no ``dataset_description.json``, or pybids cannot index it.
    """
    return [_layout(folder, validate=False, derivative=True) for folder in folders]


def _choose(files: Sequence[Any], session: str, t1w_entities: dict[str, Any], what: str,
            notes: list[str]) -> Path | None:
    """The file of ``files`` (pybids BIDSFile) for this session and T1w: session-specific first, then subject-level."""
    session_files, subject_files = [], []
    for f in files:
        ent = f.get_entities()
        if any(k in ent and k in t1w_entities and ent[k] != t1w_entities[k] for k in SOURCE_ENTITIES):
            continue  # another acquisition / run / ... of this subject
        if any(k in ent and k not in t1w_entities for k in SOURCE_ENTITIES):
            continue  # names an image property the T1w does not have
        if "session" not in ent:
            subject_files.append(f.path)
        elif ent["session"] == session:
            session_files.append(f.path)
    chosen = sorted(session_files) or sorted(subject_files)
    if not chosen:
        return None
    if len(chosen) > 1:
        notes.append(f"{len(chosen)} {what} files match; using {Path(chosen[0]).name}")
    return Path(chosen[0])


def find_anat_derivatives(layouts: Sequence[Any], subject: str, session: str = "", *,
                          t1w: PathLike | None = None, space: str | None = None) -> AnatDerivatives:
    """One T1w image's sMRIPrep/fMRIPrep brain mask and (for ``space``) transform in ``layouts``.

    Parameters
    ----------
    layouts : sequence of pybids layouts
        :func:`derivative_layouts`; searched in order, the first with a file wins (each file on its own).
    subject, session : str
        Labels without ``sub-``/``ses-`` (``session`` empty for none).
    t1w : path-like, optional
        The T1w image: its source entities (``acq``, ``run``, ...) must not be contradicted by a derivative's.
    space : str, optional
        The atlas's space name; the transform is looked for only when given.

    Returns
    -------
    AnatDerivatives
        The files found (``None`` where none), and notes.
    """
    from bids.layout import parse_file_entities

    t1w_entities = parse_file_entities(str(t1w)) if t1w is not None else {}
    found = AnatDerivatives()
    for layout in layouts:
        if found.brain_mask is None:
            masks = [f for f in layout.get(subject=subject, suffix="mask", desc="brain", datatype="anat",
                                           extension=[".nii", ".nii.gz"])
                     if f.get_entities().get("space") in (None, "T1w")]
            found.brain_mask = _choose(masks, session, t1w_entities, "brain mask", found.notes)
        if found.xfm is None and space:
            xfms = layout.get(subject=subject, suffix="xfm", datatype="anat", extension=".h5",
                              **{"from": "T1w", "to": space, "mode": "image"})
            found.xfm = _choose(xfms, session, t1w_entities, f"T1w-to-{space} transform", found.notes)
    return found


def linear_part(path: PathLike) -> np.ndarray:
    """The affine part of an ITK composite transform file (sMRIPrep's ``from-T1w_to-<space>_mode-image_xfm.h5``).

    The file is read with SimpleITK. An antsRegistration composite holds its linear stages (collapsed into one
    affine) first in the queue and the SyN displacement field last; ITK applies the queue's last transform first,
    so a point ``p`` of the atlas space maps to ``A @ (p + u(p))``. The linear part is ``A``: the linear
    transforms before the first nonlinear one in the queue, composed (one, for sMRIPrep's files). A single linear
    transform (not a composite) is its own linear part.

    Returns
    -------
    ndarray, shape (4, 4)
        Homogeneous LPS matrix mapping atlas-space points to T1w points (mm), the convention of
        :class:`hdar_pipeline.core.transforms.Transform`.

    Raises
    ------
    ImageError
        The file is missing or unreadable, holds no linear transform, or has linear transforms after its
        nonlinear ones in the queue (applied before the field, so no affine stands for them).
    """
    import SimpleITK as sitk

    from hdar_pipeline.core.transforms import _matrix_from_itk, read_itk_transform

    p = Path(path)
    if not p.is_file():
        raise ImageError(p, "transform file not found")
    try:
        tx = read_itk_transform(p)
    except RuntimeError as exc:
        raise ImageError(p, f"cannot be read as an ITK transform ({' '.join(str(exc).split())[:300]})") from None
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        queue = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
    else:
        queue = [tx]
    linear = [t.IsLinear() for t in queue]
    n_front = next((i for i, lin in enumerate(linear) if not lin), len(queue))
    if n_front == 0:
        raise ImageError(p, "holds no linear (affine) transform before its nonlinear part: no affine to reuse")
    if any(linear[n_front:]):
        raise ImageError(p, "has linear transforms on both sides of its nonlinear part: its affine part is not "
                            "defined")
    matrix = np.eye(4)
    for t in queue[:n_front]:  # the queue's first transform is applied last: A = A_0 @ A_1 @ ...
        matrix = matrix @ _matrix_from_itk(t)
    return matrix


__all__ = ["AnatDerivatives", "derivative_layouts", "find_anat_derivatives", "linear_part"]
