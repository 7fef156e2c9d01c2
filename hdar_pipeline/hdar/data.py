"""Training data for HDAR: find images (a list, a folder or a BIDS dataset) and their labels, load them
onto one grid, and draw random, augmented registration pairs.

Sources
-------
* a list of image files;
* a folder (``pattern`` relative to it, default every image file directly inside it except names that
  look like label maps or masks: ``*label*``, ``*_dseg*``, ``*_mask*``);
* a BIDS dataset: the ``T1w`` images of every subject (and session), through pybids when it is
  installed, otherwise by globbing ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``.

Labels (optional) come from a folder (or a list of files in the order of the images) or, for BIDS,
from ``derivatives/**/*_dseg.nii[.gz]`` in subject (native) space. An image and a label file match when
they have the same file name, else the same BIDS ``sub``/``ses`` entities, else the same leading
identifier (the file name up to its first ``.`` or ``_``: ``S01`` for ``S01.delineation.skullstripped.nii.gz``).

Loading
-------
Every image is intensity-normalised to [0, 1] (:func:`~hdar_pipeline.core.images.normalize_intensity`) and
must lie on the grid of the first image; an image on another grid is resampled onto it in world
coordinates (labels with nearest neighbour), with a warning, or rejected with ``on_grid_mismatch="error"``.
HDAR expects affinely aligned inputs, so resampling only makes sense for images that are already
aligned in world space.

Pairs
-----
:meth:`PairDataset.sample` draws an ordered pair ``(fixed, moving)`` of two different subjects with a
seeded :class:`numpy.random.Generator` and applies the same random flips and axis permutation to both
images and both label maps. Tensors are ``(1, 1, X, Y, Z)``: float32 intensities, int64 labels.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import nibabel as nib
import numpy as np
import torch

from hdar_pipeline.core.images import (SUPPORTED_SUFFIXES, Grid, ImageError, check_labels_match, load_image, normalize_intensity,
                      resample_to)
from hdar_pipeline.core.subject import Subject

PathLike = str | os.PathLike

_LABEL_LIKE = re.compile(r"(label|_dseg|_mask)", re.IGNORECASE)
_ENTITY = re.compile(r"(?:^|_)(sub|ses)-([a-zA-Z0-9]+)")
_NATIVE_SPACES = {"T1w", "orig", "native", "individual"}


class DataError(ValueError):
    """The training data cannot be assembled (no images, unmatched labels, ...)."""


# ------------------------------------------------------------------------------------------- discovery


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in SUPPORTED_SUFFIXES) and not name.endswith(".hdr")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def subject_name(path: PathLike) -> str:
    """A short name for an image file: ``sub-01[_ses-1]`` for BIDS names, else the file stem."""
    stem = _stem(Path(path))
    ents = dict(_ENTITY.findall(stem))
    if "sub" in ents:
        return f"sub-{ents['sub']}" + (f"_ses-{ents['ses']}" if "ses" in ents else "")
    return stem


def _keys(path: Path) -> tuple[str | None, str]:
    """Matching keys of a file: its BIDS ``sub[_ses]`` key (or None) and its leading identifier."""
    stem = _stem(path)
    ents = dict(_ENTITY.findall(stem))
    bids_key = None
    if "sub" in ents:
        bids_key = f"sub-{ents['sub']}" + (f"_ses-{ents['ses']}" if "ses" in ents else "")
    return bids_key, re.split(r"[._]", stem, maxsplit=1)[0]


def find_folder_images(folder: PathLike, pattern: str | None = None) -> list[Path]:
    """Image files in ``folder`` matching ``pattern`` (a glob relative to it, ``**`` allowed).

    Without ``pattern`` every image directly inside ``folder`` is returned except names that look like
    label maps or masks (``*label*``, ``*_dseg*``, ``*_mask*``). Sorted by path.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    if pattern:
        files = [p for p in folder.glob(pattern) if _is_image(p)]
    else:
        files = [p for p in folder.iterdir() if _is_image(p) and not _LABEL_LIKE.search(p.name)]
    files = sorted(files)
    if not files:
        raise DataError(f"{folder}: no image files found" + (f" matching {pattern!r}" if pattern else ""))
    return files


def find_bids_images(root: PathLike) -> list[Path]:
    """The T1w images of a BIDS dataset (every subject and session), sorted.

    Uses pybids (``BIDSLayout(root, validate=False)``) when it can be imported and index the dataset;
    otherwise globs ``sub-*/anat/*_T1w.nii[.gz]`` and ``sub-*/ses-*/anat/*_T1w.nii[.gz]``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: BIDS dataset folder not found")
    files: list[Path] | None = None
    try:
        import bids  # type: ignore[import-not-found]
    except ImportError:
        bids = None
    if bids is not None:
        try:
            layout = bids.BIDSLayout(str(root), validate=False)
            files = [Path(f) for f in layout.get(suffix="T1w", datatype="anat", extension=[".nii.gz", ".nii"],
                                                 return_type="filename")]
        except Exception as exc:  # an incomplete dataset_description.json, an unreadable tree, ...
            warnings.warn(f"pybids could not index {root} ({type(exc).__name__}: {exc}); globbing instead",
                          stacklevel=2)
            files = None
    if files is None:
        files = []
        for pat in ("sub-*/anat/*_T1w.nii.gz", "sub-*/anat/*_T1w.nii",
                    "sub-*/ses-*/anat/*_T1w.nii.gz", "sub-*/ses-*/anat/*_T1w.nii"):
            files += list(root.glob(pat))
    files = sorted(set(files))
    if not files:
        raise DataError(f"{root}: no T1w images found (expected sub-*/[ses-*/]anat/*_T1w.nii.gz)")
    return files


def _space(path: Path) -> str | None:
    m = re.search(r"(?:^|_)space-([a-zA-Z0-9]+)", _stem(path))
    return m.group(1) if m else None


def find_bids_labels(root: PathLike, desc: str | None = None) -> list[Path]:
    """Label maps in subject space under ``root/derivatives``: ``*_dseg.nii[.gz]`` with no ``space-``
    entity (or a native one: T1w, orig), optionally only those with ``desc-<desc>``."""
    deriv = Path(root) / "derivatives"
    if not deriv.is_dir():
        return []
    out = []
    for p in deriv.rglob("*_dseg.nii*"):
        if not _is_image(p):
            continue
        space = _space(p)
        if space is not None and space not in _NATIVE_SPACES:
            continue
        if desc is not None and f"_desc-{desc}_" not in f"_{_stem(p)}_":
            continue
        out.append(p)
    return sorted(out)


def match_labels(images: Sequence[Path], candidates: Sequence[Path], *, required: bool = True) -> list[Path | None]:
    """The label file of each image among ``candidates`` (see the module docstring for the rules).

    Raises
    ------
    DataError
        An image matches several candidates, or (``required``) none.
    """
    images = [Path(p) for p in images]
    image_set = {p.resolve() for p in images}
    cands = [Path(c) for c in candidates if Path(c).resolve() not in image_set]
    by_name: dict[str, list[Path]] = {}
    by_bids: dict[str, list[Path]] = {}
    by_lead: dict[str, list[Path]] = {}
    for c in cands:
        by_name.setdefault(c.name, []).append(c)
        bk, lead = _keys(c)
        if bk is not None:
            by_bids.setdefault(bk, []).append(c)
        by_lead.setdefault(lead, []).append(c)
    out: list[Path | None] = []
    for img in images:
        bk, lead = _keys(img)
        for found in (by_name.get(img.name), by_bids.get(bk) if bk else None, None if bk else by_lead.get(lead)):
            if found:
                break
        else:
            found = None
        if not found:
            if required:
                raise DataError(f"{img}: no label map found for it (looked for the same file name, BIDS "
                                f"sub/ses entities or the leading identifier {lead!r})")
            out.append(None)
        elif len(found) > 1:
            raise DataError(f"{img}: several label maps match it ({', '.join(str(f) for f in found)}); "
                            "pass the label files explicitly or narrow the pattern/desc")
        else:
            out.append(found[0])
    return out


def collect_subjects(
    *,
    images: Sequence[PathLike] | None = None,
    folder: PathLike | None = None,
    bids: PathLike | None = None,
    pattern: str | None = None,
    labels: PathLike | Sequence[PathLike] | Literal["auto"] | None = "auto",
    labels_pattern: str | None = None,
    labels_desc: str | None = None,
) -> list[Subject]:
    """The training subjects from exactly one source, with their label maps.

    Parameters
    ----------
    images, folder, bids
        Exactly one: a list of image files, a folder (with ``pattern``) or a BIDS dataset root.
    pattern : str, optional
        Glob for ``folder`` (default: every image directly inside it that is not label-like).
    labels : folder, list of files, "auto" or None
        A folder of label maps (searched with ``labels_pattern``, default every image file below it),
        a list of label files in the order of the images, ``"auto"`` (BIDS: ``derivatives/**/*_dseg``
        where present, subjects without one train without Dice; otherwise no labels), or ``None``.
    labels_desc : str, optional
        BIDS: only ``*_desc-<labels_desc>_*dseg`` files.

    Returns
    -------
    list of Subject
        Sorted as found: ``t1w`` the image, ``labels`` its label map or None, ``name`` ``sub-01[_ses-1]`` for a
        BIDS file name (the file stem when two images share it), else the file stem; ``id`` and ``session``
        (and ``entities``) from the file name's ``sub-``/``ses-`` entities, else the name.
    """
    given = [x is not None for x in (images, folder, bids)]
    if sum(given) != 1:
        raise DataError("give exactly one of images, folder or bids")
    if images is not None:
        paths = [Path(p) for p in images]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"image file(s) not found: {', '.join(missing)}")
    elif folder is not None:
        paths = find_folder_images(folder, pattern)
    else:
        paths = find_bids_images(bids)  # type: ignore[arg-type]
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise DataError("the same image is listed more than once")

    label_paths: list[Path | None]
    if labels is None:
        label_paths = [None] * len(paths)
    elif isinstance(labels, str) and labels == "auto":
        if bids is not None:
            label_paths = match_labels(paths, find_bids_labels(bids, labels_desc), required=False)
            missing = [subject_name(p) for p, lab in zip(paths, label_paths) if lab is None]
            if missing and len(missing) < len(paths):
                warnings.warn(f"no *_dseg label map for {len(missing)} of {len(paths)} subjects "
                              f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                              "their pairs train without the Dice term", stacklevel=2)
        else:
            label_paths = [None] * len(paths)
    elif isinstance(labels, (str, os.PathLike)) and Path(labels).is_dir():
        candidates = [p for p in (Path(labels).glob(labels_pattern) if labels_pattern else Path(labels).rglob("*"))
                      if _is_image(p)]
        label_paths = match_labels(paths, candidates, required=True)
    else:
        files = [Path(labels)] if isinstance(labels, (str, os.PathLike)) else [Path(p) for p in labels]
        if len(files) != len(paths):
            raise DataError(f"{len(files)} label files for {len(paths)} images; give one per image (same order) "
                            "or a folder")
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise DataError(f"label file(s) not found: {', '.join(missing)}")
        label_paths = list(files)
    names = [subject_name(p) for p in paths]
    if len(set(names)) != len(names):  # e.g. two runs of one subject: fall back to full stems
        names = [_stem(p) for p in paths]
    return [_subject(p, lab, n) for p, lab, n in zip(paths, label_paths, names)]


def _subject(image: Path, labels: Path | None, name: str) -> Subject:
    ents = dict(_ENTITY.findall(_stem(image)))
    if "sub" not in ents:
        return Subject(name, t1w=image, labels=labels, name=name)
    entities = {"subject": ents["sub"], **({"session": ents["ses"]} if "ses" in ents else {})}
    return Subject(ents["sub"], session=ents.get("ses", ""), t1w=image, labels=labels, entities=entities, name=name)


# ------------------------------------------------------------------------------------------- loading


@dataclass
class Volume:
    """One loaded subject on the dataset grid.

    Attributes
    ----------
    name : str
    image : ndarray ``(X, Y, Z)`` float32 in [0, 1]
    labels : ndarray ``(X, Y, Z)`` of non-negative ints (uint8/int16/int32), optional
    source, labels_source : Path, optional
    """

    name: str
    image: np.ndarray
    labels: np.ndarray | None = None
    source: Path | None = None
    labels_source: Path | None = None


def _compact_labels(arr: np.ndarray) -> np.ndarray:
    top = int(arr.max()) if arr.size else 0
    dtype = np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32
    return np.asarray(arr, dtype=dtype)


def load_volumes(
    subjects: Sequence[Subject | tuple[nib.spatialimages.SpatialImage, nib.spatialimages.SpatialImage | None]],
    *,
    grid: Grid | None = None,
    normalize: bool = True,
    on_grid_mismatch: Literal["resample", "error"] = "resample",
    names: Sequence[str] | None = None,
) -> tuple[list[Volume], Grid]:
    """Load (or take in-memory) images and labels onto one grid.

    Parameters
    ----------
    subjects : Subject (its ``t1w`` and ``labels``), or ``(image, labels_or_None)`` nibabel pairs
    grid : Grid, optional
        Target grid; default the first image's.
    normalize : bool
        Rescale intensities to [0, 1] with :func:`~hdar_pipeline.core.images.normalize_intensity`.
    on_grid_mismatch : "resample" or "error"
    names : optional names for in-memory subjects.

    Returns
    -------
    volumes, grid
    """
    volumes: list[Volume] = []
    first_source = None
    for index, subj in enumerate(subjects):
        if isinstance(subj, Subject):
            img = load_image(subj.t1w)
            lab = load_image(subj.labels, labels=True) if subj.labels is not None else None
            if lab is not None:
                check_labels_match(img, lab, image_source=subj.t1w, labels_source=subj.labels)
            name, source, lsource = subj.name or subject_name(subj.t1w), subj.t1w, subj.labels
        else:
            img, lab = subj
            name = names[index] if names is not None else f"subject{index:03d}"
            source = lsource = None
            if lab is not None:
                check_labels_match(img, lab, image_source=name, labels_source=f"{name} labels")
        if grid is None:
            grid = Grid.of(img)
            first_source = source or name
        elif not Grid.of(img).same_as(grid, atol=1e-3):
            problem = (f"grid {Grid.of(img).shape} (affine {np.round(Grid.of(img).affine, 3).tolist()}) differs "
                       f"from the training grid {grid.shape} of {first_source or 'the first image'}")
            if on_grid_mismatch == "error":
                raise ImageError(source or name, problem + "; HDAR trains on affinely aligned images on one grid "
                                 "(resample them first, or allow resampling)")
            warnings.warn(f"{source or name}: {problem}; resampling it onto the training grid", stacklevel=2)
            img = resample_to(img, grid, interpolation="linear")
            if lab is not None:
                lab = resample_to(lab, grid, interpolation="nearest")
        data = normalize_intensity(img) if normalize else img
        arr = np.asarray(data.dataobj, dtype=np.float32)
        labels = None if lab is None else _compact_labels(np.asarray(lab.dataobj))
        volumes.append(Volume(name, arr, labels, source, lsource))
    if grid is None:
        raise DataError("no images to load")
    return volumes, grid


# ------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class IntensityAugmentation:
    """A random change of acquisition, applied to one image of a pair: what another scanner or protocol
    would have recorded of the same anatomy.

    In order: a Gaussian blur (a coarser acquisition resampled to the training voxel size), a smooth
    multiplicative bias field (a quadratic polynomial in the exponent), a gamma change of contrast, Gaussian
    noise inside the brain, and the robust rescaling to [0, 1] every image gets
    (:func:`~hdar_pipeline.core.images.robust_unit_range`, as at inference). Voxels that are 0 (outside a
    skull-stripped brain) stay 0.

    Attributes
    ----------
    blur : float
        Gaussian sigma in voxels of the full-resolution training grid (scaled for down-sampled copies).
    bias : tuple of 10 floats
        Coefficients of ``1, x, y, z, x^2, y^2, z^2, xy, xz, yz`` (coordinates in [-1, 1] over the grid);
        the image is multiplied by ``exp`` of the polynomial.
    gamma : float
        ``x -> x ** gamma`` on the [0, 1] image.
    noise : float
        Standard deviation of the added noise, in units of the [0, 1] range.
    seed : int
        Seeds the noise.
    """

    blur: float = 0.0
    bias: tuple[float, ...] = ()
    gamma: float = 1.0
    noise: float = 0.0
    seed: int = 0

    @classmethod
    def draw(cls, rng: np.random.Generator, probability: float = 0.8) -> "IntensityAugmentation":
        """Each component with ``probability``: blur sigma U(0.3, 1.2) voxels, bias coefficients N(0, 0.15),
        gamma exp(N(0, 0.25)), noise U(0.005, 0.04)."""
        on = rng.random(4) < probability
        blur = float(rng.uniform(0.3, 1.2)) if on[0] else 0.0
        bias = tuple(float(v) for v in rng.normal(0.0, 0.15, 10)) if on[1] else ()
        gamma = float(np.exp(rng.normal(0.0, 0.25))) if on[2] else 1.0
        noise = float(rng.uniform(0.005, 0.04)) if on[3] else 0.0
        return cls(blur, bias, gamma, noise, int(rng.integers(2**31)))

    @property
    def is_identity(self) -> bool:
        return self.blur == 0 and not self.bias and self.gamma == 1 and self.noise == 0

    def apply(self, arr: np.ndarray, full_shape: Sequence[int] | None = None) -> np.ndarray:
        """Augment a volume ``(X, Y, Z)`` in [0, 1]; ``full_shape`` is the full-resolution grid it was
        down-sampled from (default: its own). Returns float32 in [0, 1]."""
        if self.is_identity:
            return arr
        from scipy.ndimage import gaussian_filter

        from hdar_pipeline.core.images import robust_unit_range

        x = np.asarray(arr, dtype=np.float32)
        brain = x > 0
        scale = arr.shape[0] / float((full_shape or arr.shape)[0])
        if self.blur > 0 and self.blur * scale > 0.1:
            x = gaussian_filter(x, self.blur * scale).astype(np.float32) * brain
        if self.bias:
            c = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in x.shape]
            gx, gy, gz = c[0][:, None, None], c[1][None, :, None], c[2][None, None, :]
            b = self.bias
            poly = (b[0] + b[1] * gx + b[2] * gy + b[3] * gz + b[4] * gx ** 2 + b[5] * gy ** 2 + b[6] * gz ** 2
                    + b[7] * gx * gy + b[8] * gx * gz + b[9] * gy * gz)
            x = x * np.exp(poly).astype(np.float32)
        if self.gamma != 1.0:
            x = np.clip(x, 0.0, None) ** np.float32(self.gamma)
        if self.noise > 0:
            noise = np.random.default_rng(self.seed).standard_normal(x.shape).astype(np.float32)
            x = np.clip(x + self.noise * float(np.percentile(x[brain], 99.5) if brain.any() else 1.0) * noise, 0.0,
                        None) * brain
        if not brain.any():
            return x.astype(np.float32)
        return robust_unit_range(x)


@dataclass(frozen=True)
class Augmentation:
    """Flips (per array axis, applied first), an axis permutation (applied second), both to the whole pair,
    and an optional :class:`IntensityAugmentation` per image (fixed, moving), applied before them."""

    flips: tuple[bool, bool, bool] = (False, False, False)
    permutation: tuple[int, int, int] = (0, 1, 2)
    intensity: tuple[IntensityAugmentation | None, IntensityAugmentation | None] = (None, None)

    @classmethod
    def draw(cls, rng: np.random.Generator, *, flip_probability: float = 0.5, permute: bool = True,
             geometry: bool = True, intensity: bool = False) -> "Augmentation":
        """``geometry``: the paper's random flips and permutation; ``intensity``: an independent
        :class:`IntensityAugmentation` for each image (the pair then looks like two protocols)."""
        flips, perm = (False, False, False), (0, 1, 2)
        if geometry:
            flips = tuple(bool(v) for v in rng.random(3) < flip_probability)  # type: ignore[assignment]
            perm = tuple(int(v) for v in rng.permutation(3)) if permute else (0, 1, 2)  # type: ignore[assignment]
        inten = (IntensityAugmentation.draw(rng), IntensityAugmentation.draw(rng)) if intensity else (None, None)
        return cls(flips, perm, inten)  # type: ignore[arg-type]

    @property
    def is_identity(self) -> bool:
        return (not any(self.flips) and self.permutation == (0, 1, 2)
                and all(a is None or a.is_identity for a in self.intensity))

    def apply(self, arr: np.ndarray, role: int | None = None, full_shape: Sequence[int] | None = None) -> np.ndarray:
        """Augment a volume ``(X, Y, Z)``; returns a contiguous array. ``role`` (0 fixed, 1 moving) selects
        the intensity change of an image; label maps pass ``None`` and only move."""
        out = arr
        if role is not None and self.intensity[role] is not None:
            out = self.intensity[role].apply(out, full_shape)  # type: ignore[union-attr]
        axes = [a for a in range(3) if self.flips[a]]
        out = np.flip(out, axis=axes) if axes else out
        out = np.transpose(out, self.permutation)
        return np.ascontiguousarray(out)


AUGMENTATIONS = ("none", "geometry", "intensity", "all")


def augmentation_flags(kind: str | bool) -> tuple[bool, bool]:
    """``(geometry, intensity)`` of an augmentation setting: ``"none"``, ``"geometry"`` (the paper's flips and
    permutations), ``"intensity"`` or ``"all"``; ``True``/``False`` are the historical ``"geometry"``/``"none"``."""
    if kind is True:
        kind = "geometry"
    elif kind is False:
        kind = "none"
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")
    return kind in ("geometry", "all"), kind in ("intensity", "all")


@dataclass
class Pair:
    """One registration pair, tensors ``(1, 1, X, Y, Z)`` on the CPU.

    ``fixed``/``moving``: float32 in [0, 1]; ``fixed_labels``/``moving_labels``: int64 or None;
    ``indices``: ``(fixed, moving)`` subject indices; ``augmentation``: what was applied.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor | None
    moving_labels: torch.Tensor | None
    indices: tuple[int, int]
    names: tuple[str, str]
    augmentation: Augmentation

    @property
    def has_labels(self) -> bool:
        return self.fixed_labels is not None and self.moving_labels is not None


class PairDataset:
    """Subjects in memory on one grid, from which registration pairs are drawn.

    Parameters
    ----------
    volumes : list of Volume
    grid : Grid
    """

    def __init__(self, volumes: Sequence[Volume], grid: Grid) -> None:
        if len(volumes) < 1:
            raise DataError("no subjects")
        shapes = {v.image.shape for v in volumes}
        if len(shapes) != 1:
            raise DataError(f"volumes have different shapes {sorted(shapes)}")
        self.volumes = list(volumes)
        self.grid = grid

    @classmethod
    def from_subjects(cls, subjects: Sequence[Subject], *, grid: Grid | None = None, normalize: bool = True,
                      on_grid_mismatch: Literal["resample", "error"] = "resample") -> "PairDataset":
        """Load :class:`~hdar_pipeline.core.subject.Subject` files (see :func:`load_volumes`)."""
        volumes, grid = load_volumes(subjects, grid=grid, normalize=normalize, on_grid_mismatch=on_grid_mismatch)
        return cls(volumes, grid)

    @classmethod
    def from_images(cls, images: Sequence[nib.spatialimages.SpatialImage],
                    labels: Sequence[nib.spatialimages.SpatialImage | None] | None = None, *,
                    names: Sequence[str] | None = None, grid: Grid | None = None, normalize: bool = True,
                    on_grid_mismatch: Literal["resample", "error"] = "resample") -> "PairDataset":
        """In-memory nibabel images (and optional labels, one per image or None)."""
        labels = list(labels) if labels is not None else [None] * len(images)
        if len(labels) != len(images):
            raise DataError(f"{len(labels)} label maps for {len(images)} images")
        volumes, grid = load_volumes(list(zip(images, labels)), grid=grid, normalize=normalize,
                                     on_grid_mismatch=on_grid_mismatch, names=names)
        return cls(volumes, grid)

    def __len__(self) -> int:
        return len(self.volumes)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.volumes]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volumes[0].image.shape)  # type: ignore[return-value]

    @property
    def n_labelled(self) -> int:
        return sum(v.labels is not None for v in self.volumes)

    def split(self, n_val: int, rng: np.random.Generator) -> tuple["PairDataset", "PairDataset"]:
        """Hold out ``n_val`` random subjects: ``(train, validation)``."""
        if not 0 < n_val < len(self):
            raise DataError(f"cannot hold out {n_val} of {len(self)} subjects")
        order = rng.permutation(len(self))
        val = sorted(int(i) for i in order[:n_val])
        train = sorted(int(i) for i in order[n_val:])
        return (PairDataset([self.volumes[i] for i in train], self.grid),
                PairDataset([self.volumes[i] for i in val], self.grid))

    def pair(self, fixed: int, moving: int, augmentation: Augmentation | None = None, *,
             full_resolution_intensity: bool = True) -> Pair:
        """The pair ``(fixed, moving)`` of subject indices, optionally augmented (the intensity changes left
        out of the full-resolution tensors with ``full_resolution_intensity=False``, for a caller that reads
        only down-sampled copies and augments those)."""
        aug = augmentation or Augmentation()
        f, m = self.volumes[fixed], self.volumes[moving]

        def vol(arr: np.ndarray | None, dtype, role: int | None = None) -> torch.Tensor | None:
            if arr is None:
                return None
            out = aug.apply(arr, role if full_resolution_intensity else None) if not aug.is_identity else arr
            return torch.from_numpy(np.asarray(out, dtype=dtype))[None, None]

        has = f.labels is not None and m.labels is not None
        return Pair(vol(f.image, np.float32, 0), vol(m.image, np.float32, 1),  # type: ignore[arg-type]
                    vol(f.labels, np.int64) if has else None, vol(m.labels, np.int64) if has else None,
                    (fixed, moving), (f.name, m.name), aug)

    def sample(self, rng: np.random.Generator, *, augment: str | bool = True,
               full_resolution_intensity: bool = True) -> Pair:
        """A random ordered pair of two different subjects, with a random :class:`Augmentation`
        (``augment``: see :func:`augmentation_flags`; flips and permutations identical for both images and
        labels, intensity changes independent per image)."""
        if len(self) < 2:
            raise DataError("need at least two subjects to draw pairs")
        i, j = (int(v) for v in rng.choice(len(self), size=2, replace=False))
        geometry, intensity = augmentation_flags(augment)
        aug = Augmentation.draw(rng, geometry=geometry, intensity=intensity) if geometry or intensity else None
        return self.pair(i, j, aug, full_resolution_intensity=full_resolution_intensity)

    def validation_pairs(self, n_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
        """Up to ``n_pairs`` fixed ordered pairs ``(fixed, moving)`` of different subjects, reproducible
        from ``seed``; pairs with labels on both sides come first."""
        pairs = [(i, j) for i in range(len(self)) for j in range(len(self)) if i != j]
        order = np.random.default_rng(seed).permutation(len(pairs))
        pairs = [pairs[k] for k in order]
        labelled = [p for p in pairs if self.volumes[p[0]].labels is not None and self.volumes[p[1]].labels is not None]
        rest = [p for p in pairs if p not in labelled]
        return (labelled + rest)[: max(0, n_pairs)]
