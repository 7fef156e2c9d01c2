"""The BIDS App's ``--atlas-participant`` on a dataset of raw heads: the atlas is prepared as the subjects are.

Subjects are brain-extracted before they are registered; an atlas participant taken as it is stored (a head)
would have their brains aligned to its skull. The atlas image the App uses must be that participant's brain,
prepared in the work dir (the dataset untouched), on its own grid so that its labels still apply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hdar_pipeline.core.images import Grid, load_image, save_image
from hdar_pipeline.pipeline.preprocess import is_skull_stripped
from hdar_pipeline.core.templates import mni_template
from hdar_pipeline.apps.bids_app import AppOptions, resolve_atlas
from test_preprocess import synthetic_head

os.environ.setdefault("NO_ET", "1")


def _dataset(root: Path) -> tuple[Path, Path]:
    """sub-01 stored as a raw head (3 mm), with a label map on its grid."""
    bids_dir = root / "rawdata"
    (bids_dir / "sub-01" / "anat").mkdir(parents=True)
    (bids_dir / "dataset_description.json").write_text(json.dumps({"Name": "heads", "BIDSVersion": "1.9.0"}))
    (bids_dir / "participants.tsv").write_text("participant_id\nsub-01\n")
    t1, mask = mni_template(3.0)
    head, brain_mask = synthetic_head(t1, np.asarray(mask.dataobj) > 0, seed=2)
    t1w = save_image(head, bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    return bids_dir, t1w


def test_atlas_participant_raw_head_is_brain_extracted_in_the_work_dir(tmp_path):
    bids_dir, t1w = _dataset(tmp_path)
    before = t1w.read_bytes()
    opts = dict(bids_dir=bids_dir, output_dir=tmp_path / "out", analysis_level="participant",
                atlas_participant="01", work_dir=tmp_path / "work", seed=1, omp_nthreads=2,
                skip_bids_validation=True)
    prepared = resolve_atlas(AppOptions(**opts))
    assert prepared.image.parent == (tmp_path / "work" / "atlas").resolve() and prepared.exclude == ["01"]
    img = load_image(prepared.image)
    assert is_skull_stripped(img) and not is_skull_stripped(load_image(t1w))
    # the head's voxels cut to the brain's box plus a margin, in the head's world coordinates
    head = Grid.of(load_image(t1w))
    start = np.linalg.solve(head.affine, Grid.of(img).affine)[:3, 3]
    assert np.allclose(start, np.round(start)) and (start >= 0).all()
    assert all(s + n <= m for s, n, m in zip(np.round(start).astype(int), img.shape, head.shape))
    assert np.prod(img.shape) < 0.6 * np.prod(head.shape)
    assert "prepared as the subjects are" in prepared.description and "brain's box" in prepared.description
    assert t1w.read_bytes() == before and not any(p.name.endswith("desc-brain_T1w.nii.gz") for p in bids_dir.rglob("*"))
    # without preprocessing the subjects are used as stored, and so is the atlas participant
    as_stored = resolve_atlas(AppOptions(**opts, preprocess=False))
    assert as_stored.image == t1w.resolve()
