"""Overlap, surface-distance and Jacobian metrics: hand-computed values, SimpleITK agreement, NaN flags,
and label tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from hdar_pipeline.core.images import Grid, to_sitk
from hdar_pipeline.core.labels import LabelTableError, label_names, read_label_table, write_label_table
from hdar_pipeline.evaluation.metrics import (
    LABEL_COLUMNS,
    directed_surface_distances,
    jacobian_statistics,
    label_metrics,
    mean_over_labels,
    overlap_counts,
    surface,
    surface_distances,
)
from hdar_pipeline.core.transforms import Transform


def two_boxes():
    """S (labels) = 4x4x4 box, T (reference) = 5x4x4 box; |S| = 64, |T| = 80, |S∩T| = 48."""
    s = np.zeros((10, 10, 10), np.int32)
    t = np.zeros_like(s)
    s[1:5, 1:5, 1:5] = 1
    t[2:7, 1:5, 1:5] = 1
    return t, s


def test_overlap_hand_computed():
    t, s = two_boxes()
    row = label_metrics(t, s).iloc[0]
    assert (row.reference_voxels, row.labels_voxels) == (80, 64)
    assert row.dice == pytest.approx(2 * 48 / 144)
    assert row.mean_overlap == pytest.approx(2 * 48 / 144)
    assert row.jaccard == pytest.approx(48 / 96)
    assert row.target_overlap == pytest.approx(48 / 80)
    assert row.false_negative == pytest.approx(32 / 80)
    assert row.false_positive == pytest.approx(16 / 64)
    assert row.volume_similarity == pytest.approx(2 * (64 - 80) / 144)
    assert row.flag == ""
    # The boxes differ by two voxel layers along axis 0 on one side and one layer on the other.
    assert row.hd_mm == pytest.approx(2.0)


def test_surface_distances_hand_computed_with_anisotropic_spacing():
    # One-voxel-thick objects (so every voxel is a surface voxel): A at i=1, j=0..3; B at i=3, j=0..1.
    a = np.zeros((6, 5, 1), bool)
    b = np.zeros_like(a)
    a[1, 0:4, 0] = True
    b[3, 0:2, 0] = True
    spacing = (2.0, 1.0, 1.0)  # 2 voxels along i are 4 mm
    d_ab, d_ba = directed_surface_distances(a, b, spacing)
    assert sorted(d_ab) == pytest.approx([4, 4, math.sqrt(17), math.sqrt(20)])
    assert sorted(d_ba) == pytest.approx([4, 4])
    d = surface_distances(a, b, spacing)
    p95_ab = math.sqrt(17) + 0.85 * (math.sqrt(20) - math.sqrt(17))  # linear interpolation at rank 2.85 of 0..3
    assert d["hd95_mm"] == pytest.approx(max(p95_ab, 4.0))
    assert d["msd_mm"] == pytest.approx(((8 + math.sqrt(17) + math.sqrt(20)) + 8) / 6)
    assert d["hd_mm"] == pytest.approx(math.sqrt(20))


def test_surface_definition():
    cube = np.zeros((7, 7, 7), bool)
    cube[1:6, 1:6, 1:6] = True
    surf = surface(cube)
    assert surf.sum() == 5**3 - 3**3
    assert not surf[3, 3, 3] and surf[1, 3, 3]
    # An object touching the array border has a surface there (outside the image is background).
    full = np.ones((4, 4, 4), bool)
    assert surface(full).sum() == 4**3 - 2**3


def _brute_force(a, b, spacing):
    """Independent implementation: surfaces by explicit neighbour checks, distances by cdist."""
    def surf_points(m):
        pts = []
        for idx in zip(*np.nonzero(m)):
            for axis in range(3):
                for step in (-1, 1):
                    n = list(idx)
                    n[axis] += step
                    if not (0 <= n[axis] < m.shape[axis]) or not m[tuple(n)]:
                        pts.append(idx)
                        break
                else:
                    continue
                break
        return np.asarray(pts, float) * np.asarray(spacing)

    pa, pb = surf_points(a), surf_points(b)
    d = cdist(pa, pb)
    return d.min(axis=1), d.min(axis=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((18, 16, 14)), 2.0)
    a = noise > 0.05
    b = ndimage.shift(noise, (1.3, -0.7, 0.4), order=1, mode="nearest") > 0.0
    spacing = (1.0, 1.5, 0.8)
    d_ab, d_ba = directed_surface_distances(a, b, spacing)
    e_ab, e_ba = _brute_force(a, b, spacing)
    np.testing.assert_allclose(np.sort(d_ab), np.sort(e_ab), atol=1e-9)
    np.testing.assert_allclose(np.sort(d_ba), np.sort(e_ba), atol=1e-9)
    d = surface_distances(a, b, spacing)
    assert d["hd95_mm"] == pytest.approx(max(np.percentile(e_ab, 95), np.percentile(e_ba, 95)))
    assert d["msd_mm"] == pytest.approx(np.concatenate([e_ab, e_ba]).mean())


def random_label_maps(seed=0, shape=(40, 36, 32), n_labels=6):
    """Two label maps: smooth random partitions of a ball, the second one perturbed."""
    rng = np.random.default_rng(seed)
    ii = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2
    ball = sum(((ii[k] - centre[k]) / (0.45 * shape[k])) ** 2 for k in range(3)) <= 1
    fields = ndimage.gaussian_filter(rng.standard_normal((n_labels, *shape)), (0, 4, 4, 4))
    ref = (np.argmax(fields, axis=0) + 1) * ball
    fields2 = fields + 0.3 * ndimage.gaussian_filter(rng.standard_normal(fields.shape), (0, 3, 3, 3))
    lab = (np.argmax(fields2, axis=0) + 1) * np.roll(ball, 1, axis=0)
    return ref.astype(np.int32), lab.astype(np.int32)


def test_agrees_with_simpleitk_overlap_and_hausdorff():
    import SimpleITK as sitk

    ref, lab = random_label_maps()
    grid = Grid(ref.shape, np.diag([1.0, 1.5, 2.0, 1.0]))
    table = label_metrics(ref, lab, spacing=grid.spacing)
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(to_sitk(lab, grid), to_sitk(ref, grid))  # (source, target)
    h = sitk.HausdorffDistanceImageFilter()
    hd_agree = 0
    for r in table.itertuples():
        v = int(r.label)
        assert r.dice == pytest.approx(f.GetDiceCoefficient(v), abs=1e-12)
        assert r.mean_overlap == pytest.approx(f.GetMeanOverlap(v), abs=1e-12)
        assert r.jaccard == pytest.approx(f.GetJaccardCoefficient(v), abs=1e-12)
        assert r.jaccard == pytest.approx(f.GetUnionOverlap(v), abs=1e-12)
        assert r.false_negative == pytest.approx(f.GetFalseNegativeError(v), abs=1e-12)
        assert r.target_overlap == pytest.approx(1 - f.GetFalseNegativeError(v), abs=1e-12)
        assert r.volume_similarity == pytest.approx(f.GetVolumeSimilarity(v), abs=1e-12)
        # Klein's false positive error is ITK's false discovery rate, not ITK's false positive error.
        assert r.false_positive == pytest.approx(f.GetFalseDiscoveryRate(v), abs=1e-12)
        assert r.false_positive != pytest.approx(f.GetFalsePositiveError(v), abs=1e-6)
        h.Execute(to_sitk((ref == v).astype(np.uint8), grid), to_sitk((lab == v).astype(np.uint8), grid))
        hd_agree += abs(r.hd_mm - h.GetHausdorffDistance()) < 1e-6
    # The surface Hausdorff distance is ITK's whenever the farthest point is outside the other object.
    assert hd_agree >= len(table) - 1


def test_hausdorff_equals_simpleitk_for_offset_balls():
    import SimpleITK as sitk

    shape = (30, 28, 26)
    ii = np.indices(shape).astype(float)
    a = ((ii[0] - 12) ** 2 + (ii[1] - 14) ** 2 + (ii[2] - 13) ** 2) <= 36
    b = ((ii[0] - 16) ** 2 + (ii[1] - 13) ** 2 + (ii[2] - 12) ** 2) <= 49
    grid = Grid(shape, np.diag([1.2, 0.9, 1.5, 1.0]))
    h = sitk.HausdorffDistanceImageFilter()
    h.Execute(to_sitk(a.astype(np.uint8), grid), to_sitk(b.astype(np.uint8), grid))
    assert surface_distances(a, b, grid.spacing)["hd_mm"] == pytest.approx(h.GetHausdorffDistance(), abs=1e-6)


def test_cropping_is_exact():
    ref, lab = random_label_maps(seed=3)
    spacing = (1.0, 1.2, 0.9)
    table = label_metrics(ref, lab, spacing=spacing)
    for r in table.itertuples():
        a, b = ref == r.label, lab == r.label
        # Full-volume distance transforms, no cropping.
        sa, sb = surface(a), surface(b)
        d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
        d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
        assert r.hd95_mm == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
        assert r.msd_mm == pytest.approx(np.concatenate([d_ab, d_ba]).mean())


def test_a_lost_label_scores_zero_and_a_label_the_reference_lacks_is_not_scored():
    t, s = two_boxes()
    t[8:10, 8:10, 8:10] = 3  # only in the reference
    s[0, 8:10, 0] = 4  # only in the labels
    table = label_metrics(t, s, label_values=[1, 3, 4, 7], names={1: "box", 3: "corner", 7: "nowhere"})
    assert list(table.columns) == LABEL_COLUMNS
    assert table["label"].tolist() == [1, 3, 4, 7]
    by = table.set_index("label")
    assert by.loc[1, "flag"] == "" and by.loc[1, "name"] == "box"
    assert by.loc[3, "flag"] == "missing_in_labels"
    assert by.loc[4, "flag"] == "missing_in_reference" and by.loc[4, "name"] == ""
    assert by.loc[7, "flag"] == "missing_in_both"
    # label 3 was lost: no overlap, which scores 0 (skipping it would reward losing a structure)
    lost = by.loc[3]
    assert (lost["dice"], lost["jaccard"], lost["target_overlap"], lost["mean_overlap"]) == (0, 0, 0, 0)
    assert (lost["false_negative"], lost["volume_similarity"]) == (1, -2)
    assert lost[["false_positive", "hd95_mm", "msd_mm", "hd_mm"]].isna().all()
    for lab in (4, 7):  # not in the reference: not scored
        assert by.loc[lab, ["dice", "jaccard", "target_overlap", "false_negative", "false_positive",
                            "volume_similarity", "hd95_mm", "msd_mm", "hd_mm"]].isna().all()
    assert (by.loc[3, "reference_voxels"], by.loc[3, "labels_voxels"]) == (8, 0)
    means = mean_over_labels(table)
    assert means["mean_dice"] == pytest.approx((2 / 3 + 0) / 2)  # the lost label counts, 4 and 7 do not
    assert (means["n_labels"], means["n_labels_evaluated"], means["n_labels_missing"]) == (4, 2, 3)
    # Background is never evaluated; default labels are the reference's.
    assert label_metrics(t, s)["label"].tolist() == [1, 3]


def test_overlap_counts_and_input_checks():
    t, s = two_boxes()
    counts = overlap_counts(t, s, [1, 2])
    assert counts.loc[1].tolist() == [80, 64, 48] and counts.loc[2].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="shape"):
        label_metrics(t, s[:-1])
    with pytest.raises(ValueError, match="non-integer"):
        label_metrics(t.astype(float) + 0.5, s)


def test_jacobian_statistics_hand_computed():
    jac = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 1.0, 1.0]).reshape(2, 2, 2)
    mask = np.zeros((2, 2, 2), bool)
    mask.flat[[1, 2, 5]] = True  # 0.0, 0.5, 4.0
    s = jacobian_statistics(jac, mask)
    assert s["folded_percent"] == pytest.approx(100 * 2 / 8)
    assert s["folded_percent_mask"] == pytest.approx(100 / 3)
    assert s["log_jacobian_std"] == pytest.approx(np.std(np.log([0.5, 1, 2, 4, 1, 1])))
    assert s["log_jacobian_std_mask"] == pytest.approx(np.std(np.log([0.5, 4.0])))
    assert (s["jacobian_min"], s["jacobian_max"]) == (-1.0, 4.0)
    assert (s["n_voxels"], s["mask_voxels"]) == (8, 3)
    s = jacobian_statistics(jac)
    assert math.isnan(s["folded_percent_mask"]) and s["mask_voxels"] == 0


def test_jacobian_statistics_of_a_transform():
    grid = Grid((8, 8, 8), np.eye(4))
    scale = Transform.from_affine(np.diag([2.0, 1.0, 1.5, 1.0]), grid)
    s = jacobian_statistics(scale)
    assert s["jacobian_min"] == pytest.approx(3.0) and s["jacobian_max"] == pytest.approx(3.0)
    assert s["folded_percent"] == 0 and s["log_jacobian_std"] == pytest.approx(0, abs=1e-7)
    # A displacement u_x = -2 x (mm) has det(I + du/dx) = -1 everywhere: all folded.
    field = np.zeros((8, 8, 8, 3), np.float32)
    field[..., 0] = -2.0 * grid.lps_points()[..., 0]
    s = jacobian_statistics(Transform(grid, field=field))
    assert s["folded_percent"] == pytest.approx(100.0)
    assert math.isnan(s["log_jacobian_std"])


# --------------------------------------------------------------------------- label tables


def test_read_bids_dseg_tsv(tmp_path):
    p = tmp_path / "atlas_dseg.tsv"
    p.write_text("index\tname\tabbreviation\n0\tBackground\tBG\n21\tL superior frontal gyrus\tLSFG\n22\tR sfg\tRSFG\n")
    table = read_label_table(p)
    assert table == {0: "Background", 21: "L superior frontal gyrus", 22: "R sfg"}
    assert table.format == "bids"
    assert label_names([22, 99], table) == ["R sfg", ""]
    assert read_label_table(write_label_table(table, tmp_path / "copy.tsv")) == table


def test_read_freesurfer_lut(tmp_path):
    p = tmp_path / "FreeSurferColorLUT.txt"
    p.write_text("#$Id: FreeSurferColorLUT.txt$\n\n#No. Label Name:  R G B A\n"
                 "0   Unknown                 0   0   0   0\n"
                 "2   Left-Cerebral-White-Matter  245 245 245 0\n"
                 "17  Left-Hippocampus        220 216  20 0\n")
    table = read_label_table(p)
    assert table == {0: "Unknown", 2: "Left-Cerebral-White-Matter", 17: "Left-Hippocampus"}
    assert table.format == "freesurfer" and table.source == str(p)


@pytest.mark.parametrize("content, message", [
    ("index\tname\nx\tfoo\n", "not an integer"),
    ("index\tname\n1\ta\n1\tb\n", "listed twice"),
    ("# only a comment\n", "empty"),
    ("index\tname\n", "no rows"),
])
def test_label_table_errors(tmp_path, content, message):
    p = tmp_path / "bad.tsv"
    p.write_text(content)
    with pytest.raises(LabelTableError, match=message):
        read_label_table(p)
    with pytest.raises(LabelTableError, match="not found"):
        read_label_table(tmp_path / "absent.tsv")
