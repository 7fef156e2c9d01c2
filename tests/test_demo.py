"""`hdar demo` end to end on one small synthetic subject (the full demo is the README's first command)."""

from __future__ import annotations

import pandas as pd

from hdar_pipeline.cli import main


def test_demo_writes_results_for_every_method(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--subjects", "1", "--methods", "demons", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "results (one row" in printed and "group statistics" in printed
    assert (out / "group" / "summary.csv").exists() and (out / "group" / "boxplot_labels_dice.png").exists()
    table = pd.read_csv(out / "results.csv")
    assert set(table["method"]) == {"demons"} and set(table["subject"]) == {"sub-01"}
    assert len(table) == 6  # six tissue labels
    assert {"dice", "target_overlap", "hd95_mm", "endpoint_error_mm", "folded_percent", "runtime_s"} <= set(table)
    # Demons recovers the known synthetic deformation well, without folding.
    assert table["mean_dice"].iloc[0] > 0.8
    assert table["folded_percent"].iloc[0] == 0.0
    assert table["endpoint_error_mm"].iloc[0] < 2.0
    for name in ("atlas/atlas_T1w.nii.gz", "atlas/atlas_dseg.nii.gz", "sub-01/sub-01_T1w.nii.gz",
                 "sub-01/demons/sub-01_space-atlas_dseg.nii.gz", "sub-01/demons/registration.json"):
        assert (out / name).exists(), name
