"""Shared plumbing for the antspyx-based methods: temporary output prefixes, masks, result reading."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from hdar_pipeline.core.images import Grid, to_ants
from hdar_pipeline.core.runtime import configure_threads, seed_everything
from hdar_pipeline.core.transforms import Transform


@contextmanager
def ants_workdir(threads: int | None, seed: int | None) -> Iterator[str]:
    """A private temporary folder for antspyx outputs (its default prefix writes to /tmp).

    Threads and ``ANTS_RANDOM_SEED`` are set before antsRegistration starts.
    """
    configure_threads(threads)
    seed_everything(seed)
    with tempfile.TemporaryDirectory(prefix="hdar-ants-") as tmp:
        yield str(Path(tmp) / "reg_")


def as_ants_float(img: nib.spatialimages.SpatialImage):
    data = np.asarray(img.dataobj, dtype=np.float32)
    return to_ants(nib.Nifti1Image(data, img.affine))


def as_ants_mask(mask: nib.spatialimages.SpatialImage | None):
    if mask is None:
        return None
    data = (np.asarray(mask.dataobj) > 0).astype(np.float32)
    return to_ants(nib.Nifti1Image(data, mask.affine))


def transform_from_ants(fwdtransforms: list[str], fixed: nib.spatialimages.SpatialImage) -> Transform:
    """Read antsRegistration's ``fwdtransforms`` (ANTs order) into the shared Transform."""
    return Transform.read(fwdtransforms, grid=Grid.of(fixed))
