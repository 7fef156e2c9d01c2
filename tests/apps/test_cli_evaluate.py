"""`hdar evaluate` end to end: columns, hand-computed values on a flipped anisotropic grid, Jacobian tables,
flags for missing labels, errors, tidy ids feeding `hdar stats`, and LPBA40 against SimpleITK."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from hdar_pipeline.apps.cli import main
from hdar_pipeline.evaluation.evaluate import evaluate
from hdar_pipeline.core.images import Grid, new_image, save_image
from hdar_pipeline.evaluation.stats import group_statistics
from hdar_pipeline.core.transforms import Transform

SPEC_COLUMNS = ["label", "name", "dice", "jaccard", "target_overlap", "mean_overlap", "false_negative",
                "false_positive", "volume_similarity", "hd95_mm", "msd_mm", "reference_voxels", "labels_voxels"]
AFFINE = np.array([[-1.2, 0, 0, 10.0], [0, 1.0, 0, -5.0], [0, 0, 1.5, 2.0], [0, 0, 0, 1]])


def label_maps():
    """Reference: label 1 = 5x4x4 box, label 2 = 3x3x3 box, label 3 (absent from the labels).
    Labels: label 1 = 4x4x4 box (|S∩T| = 48), label 2 identical to the reference."""
    ref = np.zeros((16, 12, 10), np.int16)
    lab = np.zeros_like(ref)
    ref[2:7, 1:5, 1:5] = 1
    lab[1:5, 1:5, 1:5] = 1
    ref[9:12, 6:9, 5:8] = 2
    lab[9:12, 6:9, 5:8] = 2
    ref[13:15, 9:11, 7:9] = 3
    return ref, lab


@pytest.fixture()
def files(tmp_path):
    ref, lab = label_maps()
    grid = Grid(ref.shape, AFFINE)
    table = tmp_path / "atlas_dseg.tsv"
    table.write_text("index\tname\n1\tbox\n2\tcube\n3\tcorner\n4\tunused\n")
    return {"ref": save_image(new_image(ref, grid), tmp_path / "ref_dseg.nii.gz"),
            "lab": save_image(new_image(lab, grid), tmp_path / "warped_dseg.nii.gz"),
            "table": table, "grid": grid, "dir": tmp_path}


def test_evaluate_writes_label_table_with_hand_computed_values(files, capsys):
    out = files["dir"] / "out" / "eval.csv"
    rc = main(["evaluate", str(files["ref"]), str(files["lab"]), "-o", str(out), "--label-table", str(files["table"])])
    assert rc == 0
    printed = capsys.readouterr()
    assert str(out) in printed.out and "missing" in printed.err
    table = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(table.columns[:13]) == SPEC_COLUMNS
    assert table["label"].tolist() == [1, 2, 3, 4]  # the reference's labels, and the table's unused one
    by = table.set_index("label")
    assert by.loc[1, "name"] == "box" and by.loc[3, "name"] == "corner"
    row = by.loc[1]
    assert row["dice"] == pytest.approx(96 / 144) and row["jaccard"] == pytest.approx(0.5)
    assert row["target_overlap"] == pytest.approx(0.6) and row["false_negative"] == pytest.approx(0.4)
    assert row["false_positive"] == pytest.approx(0.25) and row["volume_similarity"] == pytest.approx(-32 / 144)
    assert (row["reference_voxels"], row["labels_voxels"]) == (80, 64)
    # The boxes differ by 2 voxels along the flipped first axis, whose voxels are 1.2 mm.
    assert row["hd_mm"] == pytest.approx(2.4)
    assert by.loc[2, "dice"] == 1.0 and by.loc[2, "hd95_mm"] == 0.0 and by.loc[2, "msd_mm"] == 0.0
    assert by.loc[3, "flag"] == "missing_in_labels" and by.loc[3, "dice"] == 0  # lost: scored 0
    assert by.loc[3, "reference_voxels"] == 8 and by.loc[3, "labels_voxels"] == 0
    assert by.loc[4, "flag"] == "missing_in_both" and np.isnan(by.loc[4, "hd95_mm"])
    summary = pd.read_csv(out.with_name("eval_summary.csv")).iloc[0]
    assert summary["mean_dice"] == pytest.approx((96 / 144 + 1 + 0) / 3)  # label 4 is in neither: not scored
    assert (summary["n_labels"], summary["n_labels_evaluated"], summary["n_labels_missing"]) == (4, 3, 2)
    assert not out.with_name("eval_jacobian.csv").exists()  # no transform, no Jacobian table
    # Inputs are untouched and nothing is written beside them.
    assert sorted(p.name for p in files["dir"].iterdir()) == ["atlas_dseg.tsv", "out", "ref_dseg.nii.gz",
                                                              "warped_dseg.nii.gz"]


def test_freesurfer_lut_names_only_present_labels(files):
    lut = files["dir"] / "FreeSurferColorLUT.txt"
    lut.write_text("# FreeSurfer colour table\n0 Unknown 0 0 0 0\n1 Left-Box 10 20 30 0\n2 Cube 1 2 3 0\n"
                   + "".join(f"{k} Other-{k} 1 1 1 0\n" for k in range(4, 400)))
    out = files["dir"] / "fs.csv"
    assert main(["evaluate", str(files["ref"]), str(files["lab"]), "-o", str(out), "--label-table", str(lut),
                 "--no-distances"]) == 0
    table = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert table["label"].tolist() == [1, 2, 3]
    assert table["name"].tolist()[:2] == ["Left-Box", "Cube"] and np.isnan(table["name"].iloc[2])
    assert table["hd95_mm"].isna().all() and table["dice"].tolist()[2] == 0  # label 3 lost


def test_evaluate_with_transform_mask_ids_and_record(files, capsys):
    grid = files["grid"]
    # A smooth displacement field plus an affine scaling, written as ANTs files (warp first).
    pts = grid.lps_points()
    field = np.zeros((*grid.shape, 3), np.float32)
    field[..., 0] = 0.8 * np.sin(pts[..., 0] / 3.0)  # d(u_x)/dx in [-0.27, 0.27]: no folds
    transform = Transform(grid, affine=np.diag([1.1, 0.9, 1.2, 1.0]), field=field)
    tx_files = transform.write(files["dir"] / "xfm")
    mask = np.zeros(grid.shape, np.uint8)
    mask[:8] = 1
    mask_path = save_image(new_image(mask, grid), files["dir"] / "mask.nii.gz")
    record = files["dir"] / "registration.json"
    record.write_text(json.dumps({"method": "syn", "runtime_s": 12.5, "peak_memory_mb": 900.0, "device": "cpu"}))
    out = files["dir"] / "res" / "sub-01_syn.csv"
    rc = main(["evaluate", str(files["ref"]), str(files["lab"]), "-o", str(out), "--transform", *map(str, tx_files),
               "--mask", str(mask_path), "--subject", "sub-01", "--session", "ses-1", "--method", "syn",
               "--record", str(record)])
    assert rc == 0
    assert "Jacobian: folded" in capsys.readouterr().out
    labels = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(labels.columns[:16]) == ["subject", "session", "method", *SPEC_COLUMNS]
    assert set(labels["subject"]) == {"sub-01"} and set(labels["method"]) == {"syn"}
    assert set(labels["runtime_s"]) == {12.5} and set(labels["peak_memory_mb"]) == {900.0}
    jac = pd.read_csv(out.with_name("sub-01_syn_jacobian.csv")).iloc[0]
    expected = Transform.read(tx_files, grid=grid).jacobian_determinant().astype(np.float64)
    assert jac["jacobian_min"] == pytest.approx(expected.min(), rel=1e-5)
    assert jac["jacobian_max"] == pytest.approx(expected.max(), rel=1e-5)
    assert jac["folded_percent"] == pytest.approx(100 * np.mean(expected <= 0))
    assert jac["log_jacobian_std"] == pytest.approx(np.log(expected[expected > 0]).std(), rel=1e-5)
    assert jac["log_jacobian_std_mask"] == pytest.approx(np.log(expected[:8]).std(), rel=1e-5)
    assert jac["mask_voxels"] == mask.sum() and jac["mask_source"] == str(mask_path)
    assert jac["subject"] == "sub-01" and jac["runtime_s"] == 12.5
    # With det(affine) = 1.188 and a small field, nothing folds; std log|J| > 0 because of the field.
    assert jac["folded_percent"] == 0 and jac["log_jacobian_std"] > 0.01
    for ext in ("png", "svg"):
        assert out.with_name(f"sub-01_syn_jacobian.{ext}").stat().st_size > 5000


def test_default_jacobian_mask_is_the_reference_labels(files):
    grid = files["grid"]
    result = evaluate(files["ref"], files["lab"], transform=Transform.from_affine(np.diag([2.0, 1, 1, 1]), grid))
    ref = np.asarray(nib.load(str(files["ref"])).dataobj)
    assert result.jacobian.iloc[0]["mask_voxels"] == int((ref > 0).sum())
    assert result.jacobian.iloc[0]["mask_source"] == "reference_labels>0"
    assert result.jacobian.iloc[0]["jacobian_min"] == pytest.approx(2.0)


def test_evaluate_errors(files, capsys):
    out = str(files["dir"] / "e.csv")
    other = save_image(new_image(np.ones((8, 8, 8), np.int16), files["grid"]), files["dir"] / "other.nii.gz")
    assert main(["evaluate", str(files["ref"]), str(other), "-o", out]) == 2
    err = capsys.readouterr().err
    assert "other.nii.gz" in err and "shape" in err
    bad_table = files["dir"] / "bad.tsv"
    bad_table.write_text("index\tname\nx\ty\n")
    assert main(["evaluate", str(files["ref"]), str(files["lab"]), "-o", out, "--label-table", str(bad_table)]) == 2
    assert "bad.tsv" in capsys.readouterr().err
    assert main(["evaluate", str(files["ref"]), str(files["dir"] / "absent.nii.gz"), "-o", out]) == 2
    assert "not found" in capsys.readouterr().err
    small_mask = save_image(new_image(np.ones((4, 4, 4), np.uint8), Grid((4, 4, 4), np.eye(4))),
                            files["dir"] / "small_mask.nii.gz")
    tx = Transform.from_affine(np.eye(4), files["grid"]).write(files["dir"] / "id")
    assert main(["evaluate", str(files["ref"]), str(files["lab"]), "-o", out, "--transform", *map(str, tx),
                 "--mask", str(small_mask)]) == 2
    assert "small_mask.nii.gz" in capsys.readouterr().err
    assert not Path(out).exists()


def test_tidy_evaluations_feed_group_statistics(files):
    """Two methods x three subjects evaluated in memory, stacked, and compared."""
    ref, lab = label_maps()
    grid = files["grid"]
    tables = []
    for s in range(3):
        for method, shift in (("hdar", 0), ("syn", 1 + s % 2)):
            moved = np.roll(lab, shift, axis=1)
            result = evaluate(new_image(ref, grid), new_image(moved, grid), label_table={1: "box", 2: "cube"},
                              ids={"subject": f"sub-{s}", "method": method}, extra={"runtime_s": 1.0 + 10 * shift})
            tables.append(result.labels)
    g = group_statistics(pd.concat(tables, ignore_index=True), reference="hdar")
    summary = g.summary.set_index(["method", "metric"])
    assert summary.loc[("hdar", "dice"), "n"] == 3
    assert summary.loc[("hdar", "dice"), "mean"] > summary.loc[("syn", "dice"), "mean"]
    paired = g.paired.set_index(["method", "metric", "label"])
    assert paired.loc[("syn", "dice", 2), "n_subjects"] == 3 and paired.loc[("syn", "dice", 2), "mean_difference"] < 0
    # label 3 is lost by both methods in every subject: Dice 0 for both, a difference of 0 (no crash); its
    # distances are undefined, so no test of them
    assert paired.loc[("syn", "dice", 3), "mean_difference"] == 0
    assert ("syn", "hd95_mm", 3) not in paired.index
    assert set(g.labels.loc[g.labels["label"] == 3, "flag"]) == {"missing_in_labels"}


# --------------------------------------------------------------------------- real data


def lpba40_dir() -> Path:
    default = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lpba40"
    return Path(os.environ.get("HDAR_LPBA40_DIR", default))


@pytest.mark.realdata
def test_lpba40_agrees_with_simpleitk(tmp_path, capsys):
    import SimpleITK as sitk

    root = lpba40_dir()
    ref_path = root / "S01" / "S01.delineation.structure.label.nii.gz"
    lab_path = root / "S02" / "S02.delineation.structure.label.nii.gz"
    names_path = root / "lpba40_labels.tsv"
    if not (ref_path.exists() and lab_path.exists() and names_path.exists()):
        pytest.skip(f"LPBA40 not found under {root} (set HDAR_LPBA40_DIR)")
    out = tmp_path / "S02_to_S01.csv"
    assert main(["evaluate", str(ref_path), str(lab_path), "-o", str(out), "--label-table", str(names_path)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out, keep_default_na=False, na_values=[""])
    names = pd.read_csv(names_path, sep="\t")
    assert len(table) == 56 and table["label"].tolist() == sorted(names["index"])
    assert (table["name"] == table["label"].map(dict(zip(names["index"], names["name"])))).all()
    assert table["flag"].isna().all()  # an empty field: no flag

    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(sitk.ReadImage(str(lab_path)), sitk.ReadImage(str(ref_path)))  # (source, target)
    for r in table.itertuples():
        v = int(r.label)
        assert abs(r.dice - f.GetDiceCoefficient(v)) < 1e-6
        assert abs(r.mean_overlap - f.GetMeanOverlap(v)) < 1e-6
        assert abs(r.jaccard - f.GetJaccardCoefficient(v)) < 1e-6
        assert abs(r.target_overlap - (1 - f.GetFalseNegativeError(v))) < 1e-6
        assert abs(r.false_negative - f.GetFalseNegativeError(v)) < 1e-6
        assert abs(r.false_positive - f.GetFalseDiscoveryRate(v)) < 1e-6
        assert abs(r.volume_similarity - f.GetVolumeSimilarity(v)) < 1e-6
    mean_dice = table["dice"].mean()
    assert 0.4 < mean_dice < 0.8  # two different brains, no registration
    assert np.isfinite(table[["hd95_mm", "msd_mm"]].to_numpy()).all()
    seconds = float(printed.split("(")[1].split(" s)")[0])
    print(f"LPBA40 S02 vs S01: mean Dice {mean_dice:.4f}, evaluation {seconds:.1f} s")
    assert seconds < 30
