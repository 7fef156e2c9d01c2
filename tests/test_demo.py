"""`hdar demo` end to end on one small synthetic subject (the full demo is the README's first command)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")

from hdar_pipeline.cli import main  # noqa: E402


def test_demo_runs_the_bids_app_on_a_synthetic_cohort(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--subjects", "1", "--methods", "demons", "--nprocs", "1",
                 "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    deriv = out / "derivatives" / "hdar-pipeline"
    assert f"group CSV: {deriv / 'group' / 'group.csv'}" in printed
    assert f"report: {deriv / 'sub-01.html'}" in printed and "synthetic" in printed
    # the BIDS input and the labels derivatives it wrote
    assert (out / "rawdata" / "sub-01" / "anat" / "sub-01_T1w.nii.gz").is_file()
    assert json.loads((out / "labels" / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    group = pd.read_csv(deriv / "group" / "group.csv", dtype={"subject": str})
    assert list(group["method"]) == ["demons"] and list(group["status"]) == ["ok"]
    # Demons recovers the synthetic deformation (after N4 and the affine stage) without folding.
    assert group["mean_dice"].iloc[0] > 0.8
    assert group["folded_percent"].iloc[0] == 0.0
    space = "MNI152NLin2009aSym"
    anat = deriv / "sub-01" / "anat"
    for name in (f"sub-01_space-{space}_desc-demons_T1w.nii.gz", f"sub-01_space-{space}_desc-demons_dseg.nii.gz",
                 f"sub-01_from-T1w_to-{space}_mode-image_desc-demons_xfm.h5"):
        assert (anat / name).is_file(), name
    assert (deriv / "sub-01.html").is_file() and (deriv / "logs" / "CITATION.md").is_file()
    labels = pd.read_csv(deriv / "group" / "group_labels.csv")
    assert len(labels) == 6  # six tissue labels
