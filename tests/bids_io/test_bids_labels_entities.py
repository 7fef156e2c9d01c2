"""Issue 14, case 1: the labels of a T1w are found by its entities (run, acq, ses, ...), never another image's.

A subject with two T1w runs of different anatomy, each with its own ``_run-N_dseg`` in ``--labels-dir``, and
``--bids-filter-file '{"t1w": {"run": 2}}'``: the App must evaluate run-2 against run-2's labels (before the
fix it used run-1's: exit 0 and a Dice far below the truth).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")
pytest.importorskip("bids")

from conftest import make_brain_phantom, write_json  # noqa: E402

from hdar_pipeline.bids_io.inputs import load_bids_filter, find_bids_subjects  # noqa: E402
from hdar_pipeline.apps.bids_app_cli import bids_app_main  # noqa: E402
from hdar_pipeline.core.images import save_image  # noqa: E402
from hdar_pipeline.core.synthetic import make_subject  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """sub-01 (the atlas) and sub-02 with run-1 and run-2 T1w of different anatomy, each with its dseg."""
    root = tmp_path_factory.mktemp("runs")
    raw, labels = root / "rawdata", root / "labels"
    write_json(raw / "dataset_description.json", {"Name": "runs", "BIDSVersion": "1.9.0"})
    write_json(labels / "dataset_description.json", {"Name": "labels", "BIDSVersion": "1.9.0",
                                                  "DatasetType": "derivative", "GeneratedBy": [{"Name": "manual"}]})
    atlas = make_brain_phantom((32, 32, 32), 3.0)
    save_image(atlas.image, raw / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    save_image(atlas.labels, labels / "sub-01" / "anat" / "sub-01_dseg.nii.gz")
    for run, seed in ((1, 31), (2, 47)):
        s = make_subject(atlas.image, atlas.labels, seed=seed, magnitude_mm=8.0, smoothness_mm=15.0)
        save_image(s.image, raw / "sub-02" / "anat" / f"sub-02_run-{run}_T1w.nii.gz")
        save_image(s.labels, labels / "sub-02" / "anat" / f"sub-02_run-{run}_dseg.nii.gz")
    filt = write_json(root / "filter.json", {"t1w": {"run": 2}})
    return {"root": root, "bids": raw, "labels": labels, "filter": filt}


def test_query_pairs_each_run_with_its_own_labels(two_runs):
    for run in (1, 2):
        cohort = find_bids_subjects(two_runs["bids"], participant_labels=["02"], labels_dir=two_runs["labels"],
                                    bids_filter={"run": run}, validate=False)
        assert [e.t1w.name for e in cohort] == [f"sub-02_run-{run}_T1w.nii.gz"]
        assert cohort[0].entities == {"subject": "02", "run": str(run)}
        assert cohort[0].labels.name == f"sub-02_run-{run}_dseg.nii.gz"


def test_labels_without_the_run_entity_are_not_guessed(two_runs, tmp_path):
    """A plain sub-02_dseg cannot say which of two runs it delineates: no labels, and a note says why."""
    import shutil

    labels = tmp_path / "labels"
    shutil.copytree(two_runs["labels"], labels)
    for run in (1, 2):
        (labels / "sub-02" / "anat" / f"sub-02_run-{run}_dseg.nii.gz").rename(
            labels / "sub-02" / "anat" / "sub-02_dseg.nii.gz")
    cohort = find_bids_subjects(two_runs["bids"], participant_labels=["02"], labels_dir=labels,
                                bids_filter={"run": 2}, validate=False)
    assert cohort[0].labels is None
    assert any("does not say which T1w" in n for n in cohort[0].notes)
    # ... while the atlas participant, with one T1w, still gets its plain sub-01_dseg
    assert find_bids_subjects(two_runs["bids"], participant_labels=["01"], labels_dir=labels,
                              validate=False)[0].labels.name == "sub-01_dseg.nii.gz"


def test_app_evaluates_run_2_against_run_2_labels(two_runs):
    """The case as issue 14 writes it, through the BIDS App."""
    out, work = two_runs["root"] / "out", two_runs["root"] / "work"
    code = bids_app_main([str(two_runs["bids"]), str(out), "participant", "--atlas-participant", "01",
                          "--labels-dir", str(two_runs["labels"]), "--bids-filter-file", str(two_runs["filter"]),
                          "--methods", "demons", "--work-dir", str(work), "--nprocs", "1", "--omp-nthreads", "1",
                          "--seed", "1", "--no-preprocess", "--no-progress", "--skip-bids-validation"])
    assert code == 0
    rec = json.loads((out / "sub-02" / "anat" / "sub-02_space-sub01_desc-demons_metrics.json").read_text())
    assert rec["status"] == "ok"
    assert [Path(s).name for s in rec["Sources"]] == ["sub-02_run-2_T1w.nii.gz"]
    dseg = json.loads((out / "sub-02" / "anat" / "sub-02_space-sub01_desc-demons_dseg.json").read_text())
    assert [Path(s).name for s in dseg["Sources"]] == ["sub-02_run-2_dseg.nii.gz"]
    # run-2's own labels registered onto the atlas overlap it well; run-1's (the old bug) would not
    assert rec["metrics"]["mean_dice"] > 0.8
    assert load_bids_filter(two_runs["filter"]) == {"run": 2}
