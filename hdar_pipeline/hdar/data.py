"""Training data for HDAR: load the subjects' images and labels onto one grid, and draw random, augmented
registration pairs.

Subjects
--------
The subjects come from :func:`hdar_pipeline.core.subject.find_image_subjects` (a list of images, a folder or a
BIDS dataset's T1w images, with their label maps from a folder, a list of files or BIDS ``derivatives/**/*_dseg``),
the finder ``hdar train`` uses; :mod:`hdar_pipeline.core.subject` documents how images and labels are found and
matched. :class:`PairDataset` loads any :class:`~hdar_pipeline.core.subject.Subject` list, or in-memory images.

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

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import nibabel as nib
import numpy as np
import torch

from hdar_pipeline.core.images import (Grid, ImageError, check_labels_match, load_image, normalize_intensity,
                                       resample_to)
from hdar_pipeline.core.subject import DatasetError, Subject, subject_name


class DataError(DatasetError):
    """The training data cannot be assembled (no images to load, too few subjects, volumes of different
    shapes, ...). Finding the subjects raises the :class:`~hdar_pipeline.core.subject.DatasetError` this derives
    from, so ``except DatasetError`` catches both."""


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
