"""Group statistics on a synthetic 5-subject, 3-method run: every table against values computed here
independently (exact Wilcoxon by enumeration, t test by formula, BH by hand), failed and missing subjects."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from hdar_pipeline.apps.cli import main
from hdar_pipeline.evaluation.stats import StatsError, bh_qvalues, group_statistics, paired_test, read_tables

SUBJECTS = [f"sub-{i:02d}" for i in range(1, 6)]
METHODS = ["hdar", "syn", "demons"]
LABELS = {1: "L frontal", 2: "R frontal", 3: "L occipital", 4: "R occipital"}
BASE = {"hdar": 0.76, "syn": 0.70, "demons": 0.72}
RUNTIME = {"hdar": 3.0, "syn": 30.0, "demons": 25.0}


def synthetic_values(seed=0):
    """values[method][subject][label] = (dice, target_overlap, hd95_mm); runtime[method][subject]."""
    rng = np.random.default_rng(seed)
    values, runtime = {}, {}
    for m in METHODS:
        values[m], runtime[m] = {}, {}
        for s in SUBJECTS:
            runtime[m][s] = RUNTIME[m] * (1 + 0.1 * rng.standard_normal())
            values[m][s] = {}
            for lab in LABELS:
                dice = BASE[m] + 0.03 * lab / 4 + 0.02 * rng.standard_normal()
                values[m][s][lab] = (dice, dice + 0.05 + 0.01 * rng.standard_normal(),
                                     5.0 - 3 * dice + 0.2 * rng.standard_normal())
    # Scenarios: syn lacks sub-05 entirely; demons failed on sub-02; hdar lost label 2 on sub-03.
    del values["syn"]["sub-05"], runtime["syn"]["sub-05"]
    del values["demons"]["sub-02"], runtime["demons"]["sub-02"]
    values["hdar"]["sub-03"][2] = (np.nan, np.nan, np.nan)
    return values, runtime


def tidy(values, runtime, methods=METHODS):
    rows = []
    for m in methods:
        for s, labs in values[m].items():
            for lab, (dice, to, hd) in labs.items():
                rows.append({"subject": s, "session": "", "method": m, "label": lab, "name": LABELS[lab],
                             "dice": dice, "target_overlap": to, "hd95_mm": hd,
                             "flag": "missing_in_labels" if np.isnan(dice) else "", "runtime_s": runtime[m][s],
                             "status": "ok"})
    if "demons" in methods:
        rows.append({"subject": "sub-02", "session": "", "method": "demons", "status": "failed",
                     "error": "registration diverged"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data():
    values, runtime = synthetic_values()
    return values, runtime, tidy(values, runtime)


def exact_wilcoxon_p(diff):
    """Two-sided exact Wilcoxon signed-rank p-value by enumerating every sign pattern (no ties/zeros)."""
    ranks = sps.rankdata(np.abs(diff))
    w = ranks[diff > 0].sum()
    centre = ranks.sum() / 2
    dist = [sum(r for r, sign in zip(ranks, signs) if sign) for signs in itertools.product([0, 1], repeat=len(diff))]
    return float(np.mean([abs(d - centre) >= abs(w - centre) - 1e-12 for d in dist]))


def t_p(diff):
    n = len(diff)
    t = diff.mean() / (diff.std(ddof=1) / math.sqrt(n))
    return float(2 * sps.t.sf(abs(t), n - 1))


def bh(p):
    p = np.asarray(p, float)
    order = np.argsort(p)
    m = len(p)
    q = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return q


def subject_mean(values, m, s, k=0):
    return float(np.nanmean([v[k] for v in values[m][s].values()]))


def test_subject_and_summary_tables(data):
    values, runtime, table = data
    g = group_statistics(table, reference="hdar")
    assert g.methods == METHODS
    assert g.label_metrics == ["dice", "target_overlap", "hd95_mm"] and g.subject_metrics == ["runtime_s"]
    subj = g.subjects.set_index(["subject", "method"])
    assert len(subj) == 5 + 4 + 4
    for m in METHODS:
        for s in values[m]:
            assert subj.loc[(s, m), "dice"] == pytest.approx(subject_mean(values, m, s))
            assert subj.loc[(s, m), "runtime_s"] == pytest.approx(runtime[m][s])
    assert subj.loc[("sub-03", "hdar"), "n_labels_missing"] == 1 and subj.loc[("sub-03", "hdar"), "n_labels"] == 4
    summary = g.summary.set_index(["method", "metric"])
    for m in METHODS:
        v = np.array([subject_mean(values, m, s) for s in values[m]])
        row = summary.loc[(m, "dice")]
        q1, q3 = np.percentile(v, [25, 75])
        assert row["n"] == len(v)
        assert row["mean"] == pytest.approx(v.mean()) and row["sd"] == pytest.approx(v.std(ddof=1))
        assert row["median"] == pytest.approx(np.median(v)) and row["iqr"] == pytest.approx(q3 - q1)
        assert (row["min"], row["max"]) == pytest.approx((v.min(), v.max()))
        assert row["n_failed"] == (1 if m == "demons" else 0)
        r = np.array(list(runtime[m].values()))
        assert summary.loc[(m, "runtime_s"), "mean"] == pytest.approx(r.mean())


def test_summary_by_label(data):
    values, _, table = data
    g = group_statistics(table)
    by = g.summary_by_label.set_index(["metric", "label", "method"])
    for m in METHODS:
        for lab in LABELS:
            v = np.array([values[m][s][lab][2] for s in values[m]])
            v = v[np.isfinite(v)]
            row = by.loc[("hd95_mm", lab, m)]
            assert row["n"] == len(v) and row["mean"] == pytest.approx(v.mean())
            assert row["median"] == pytest.approx(np.median(v)) and row["name"] == LABELS[lab]


def test_paired_tests_against_independent_computation(data):
    values, _, table = data
    g = group_statistics(table, reference="hdar")
    paired = g.paired.set_index(["method", "metric", "label"])
    for m in ("syn", "demons"):
        for k, metric in enumerate(["dice", "target_overlap", "hd95_mm"]):
            p_w, p_t = [], []
            for lab in LABELS:
                common = [s for s in SUBJECTS if s in values[m] and s in values["hdar"]
                          and np.isfinite(values["hdar"][s][lab][k]) and np.isfinite(values[m][s][lab][k])]
                ref = np.array([values["hdar"][s][lab][k] for s in common])
                met = np.array([values[m][s][lab][k] for s in common])
                diff = met - ref
                row = paired.loc[(m, metric, lab)]
                assert row["n_subjects"] == len(common)
                assert row["mean_difference"] == pytest.approx(diff.mean())
                assert row["mean_reference"] == pytest.approx(ref.mean())
                assert row["cohens_dz"] == pytest.approx(diff.mean() / diff.std(ddof=1))
                assert row["wilcoxon_p"] == pytest.approx(exact_wilcoxon_p(diff))
                assert row["ttest_p"] == pytest.approx(t_p(diff))
                p_w.append(exact_wilcoxon_p(diff))
                p_t.append(t_p(diff))
            q_w, q_t = bh(p_w), bh(p_t)
            for i, lab in enumerate(LABELS):
                assert paired.loc[(m, metric, lab), "wilcoxon_q"] == pytest.approx(q_w[i])
                assert paired.loc[(m, metric, lab), "ttest_q"] == pytest.approx(q_t[i])
    # Subjects: syn vs hdar on sub-01..04 (3 for label 2, where hdar lost sub-03); demons lacks sub-02.
    assert paired.loc[("syn", "dice", 1), "n_subjects"] == 4
    assert paired.loc[("syn", "dice", 2), "n_subjects"] == 3
    assert paired.loc[("demons", "dice", 1), "n_subjects"] == 4
    assert paired.loc[("syn", "dice", 1), "unpaired_subjects"] == "sub-05 (hdar only)"
    assert paired.loc[("demons", "dice", 1), "unpaired_subjects"] == "sub-02 (hdar only)"
    assert paired.loc[("syn", "dice", 1), "favours"] == "reference"  # hdar's Dice is higher
    assert paired.loc[("syn", "hd95_mm", 1), "favours"] == "reference"  # and its HD95 lower
    unpaired = g.unpaired
    assert set(map(tuple, unpaired[["method", "subject", "present_in"]].to_numpy().tolist())) == {
        ("syn", "sub-05", "hdar"), ("demons", "sub-02", "hdar")}


def test_paired_subject_level(data):
    values, runtime, table = data
    g = group_statistics(table, reference="hdar")
    ps = g.paired_subjects.set_index(["method", "metric"])
    common = [s for s in SUBJECTS if s in values["syn"]]
    ref = np.array([subject_mean(values, "hdar", s) for s in common])
    met = np.array([subject_mean(values, "syn", s) for s in common])
    assert ps.loc[("syn", "dice"), "n_subjects"] == 4
    assert ps.loc[("syn", "dice"), "mean_difference"] == pytest.approx((met - ref).mean())
    assert ps.loc[("syn", "dice"), "wilcoxon_p"] == pytest.approx(exact_wilcoxon_p(met - ref))
    r = np.array([runtime["syn"][s] - runtime["hdar"][s] for s in common])
    assert ps.loc[("syn", "runtime_s"), "mean_difference"] == pytest.approx(r.mean())
    assert ps.loc[("syn", "runtime_s"), "favours"] == "reference"


def test_ranking(data):
    values, _, table = data
    g = group_statistics(table)
    ranking = g.ranking.set_index(["metric", "label", "method"])
    best_counts = {m: 0 for m in METHODS}
    for lab in LABELS:
        common = [s for s in SUBJECTS if all(s in values[m] and np.isfinite(values[m][s][lab][0]) for m in METHODS)]
        means = {m: np.mean([values[m][s][lab][0] for s in common]) for m in METHODS}
        best = max(means, key=means.get)
        best_counts[best] += 1
        for m in METHODS:
            assert ranking.loc[("dice", lab, m), "mean"] == pytest.approx(means[m])
            assert ranking.loc[("dice", lab, m), "n_subjects"] == len(common)
            assert bool(ranking.loc[("dice", lab, m), "best"]) == (m == best)
        # Lower is better for distances.
        hd = {m: np.mean([values[m][s][lab][2] for s in common]) for m in METHODS}
        assert ranking.loc[("hd95_mm", lab, min(hd, key=hd.get)), "rank"] == 1
    counts = g.ranking_counts.set_index(["metric", "method"])
    for m in METHODS:
        assert counts.loc[("dice", m), "n_best"] == best_counts[m]
        assert counts.loc[("dice", m), "n_labels"] == len(LABELS)


def test_failed_rows_are_reported_not_used(data):
    _, _, table = data
    g = group_statistics(table)
    assert g.excluded[["subject", "method", "status"]].values.tolist() == [["sub-02", "demons", "failed"]]
    assert g.excluded["message"].iloc[0] == "registration diverged" and bool(g.excluded["fully_excluded"].iloc[0])
    assert not ((g.subjects["subject"] == "sub-02") & (g.subjects["method"] == "demons")).any()
    assert any("excluded.csv" in n for n in g.notes)
    # A failed row that still carries numbers is not used either.
    bad = table.copy()
    bad.loc[(bad["method"] == "syn") & (bad["subject"] == "sub-01"), "status"] = "failed"
    g2 = group_statistics(bad)
    assert not ((g2.subjects["subject"] == "sub-01") & (g2.subjects["method"] == "syn")).any()
    assert g2.summary.set_index(["method", "metric"]).loc[("syn", "dice"), "n"] == 3


def test_minimal_tables_and_edge_cases(data):
    values, runtime, table = data
    minimal = table.drop(columns=["session", "status", "flag", "name"]).dropna(subset=["label"])
    g = group_statistics(minimal)
    assert len(g.subjects) == 13 and g.excluded.empty
    # No reference in the tables: a note, empty paired tables, everything else still there.
    g = group_statistics(table, reference="ants")
    assert g.paired.empty and g.paired_subjects.empty and any("'ants'" in n for n in g.notes)
    assert len(g.summary) > 0 and len(g.ranking) > 0
    with pytest.raises(StatsError, match="method"):
        group_statistics(table.drop(columns=["method"]))
    # Duplicated rows (pooled runs that overlap): the last one wins, with a note.
    dup = pd.concat([table, table.iloc[:1].assign(dice=0.0)], ignore_index=True)
    g = group_statistics(dup)
    assert any("duplicate" in n for n in g.notes)
    row = table.iloc[0]
    kept = g.labels[(g.labels["subject"] == row["subject"]) & (g.labels["method"] == row["method"])
                    & (g.labels["label"] == row["label"])]
    assert kept["dice"].tolist() == [0.0]
    # Subject-level rows without a label (e.g. a Jacobian table) join the subject table.
    jac = pd.DataFrame([{"subject": s, "method": m, "folded_percent": 0.1 * i}
                        for i, (m, s) in enumerate((m, s) for m in METHODS for s in values[m])])
    g = group_statistics(pd.concat([table, jac], ignore_index=True))
    assert "folded_percent" in g.subject_metrics
    assert g.subjects.set_index(["subject", "method"]).loc[("sub-02", "hdar"), "folded_percent"] == pytest.approx(0.1)
    assert "folded_percent" in set(g.paired_subjects["metric"])


def test_paired_test_degenerate_inputs():
    assert math.isnan(paired_test(np.array([0.5]), np.array([0.6]))["wilcoxon_p"])
    same = paired_test(np.array([0.5, 0.6, 0.7]), np.array([0.5, 0.6, 0.7]))
    assert math.isnan(same["wilcoxon_p"]) and math.isnan(same["ttest_p"]) and same["mean_difference"] == 0
    q = bh_qvalues([0.01, np.nan, 0.04, 0.03])
    assert math.isnan(q[1]) and q[[0, 2, 3]] == pytest.approx(bh([0.01, 0.04, 0.03]))


def test_cli_stats_pools_tables(tmp_path, data, capsys):
    values, runtime, table = data
    a = tmp_path / "run1.csv"
    b = tmp_path / "run2.tsv"
    table[table["method"] == "hdar"].to_csv(a, index=False)
    table[table["method"] != "hdar"].to_csv(b, index=False, sep="\t")
    out = tmp_path / "group"
    assert main(["stats", str(a), str(b), "-o", str(out), "--reference", "hdar"]) == 0
    printed = capsys.readouterr()
    for stem in ("subjects", "summary", "summary_by_label", "paired", "paired_subjects", "ranking",
                 "ranking_counts", "excluded", "unpaired"):
        assert (out / f"{stem}.csv").exists()
        assert str(out / f"{stem}.csv") in printed.out
    for stem in ("boxplot_labels_dice", "boxplot_methods_dice", "dice_vs_runtime"):
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 5000
    assert "excluded.csv" in printed.err
    # The written CSVs hold the independently computed values.
    summary = pd.read_csv(out / "summary.csv").set_index(["method", "metric"])
    for m in METHODS:
        v = np.array([subject_mean(values, m, s) for s in values[m]])
        assert summary.loc[(m, "dice"), "mean"] == pytest.approx(v.mean())
        assert summary.loc[(m, "dice"), "sd"] == pytest.approx(v.std(ddof=1))
    paired = pd.read_csv(out / "paired.csv").set_index(["method", "metric", "label"])
    common = [s for s in SUBJECTS if s in values["demons"]]
    diff = np.array([values["demons"][s][3][0] - values["hdar"][s][3][0] for s in common])
    assert paired.loc[("demons", "dice", 3), "wilcoxon_p"] == pytest.approx(exact_wilcoxon_p(diff))
    assert paired.loc[("demons", "dice", 3), "n_subjects"] == 4
    excluded = pd.read_csv(out / "excluded.csv")
    assert excluded["subject"].tolist() == ["sub-02"]
    assert set(read_tables([a, b])["source_table"]) == {str(a), str(b)}


def test_cli_stats_errors(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "absent.csv"), "-o", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"x": [1]}).to_csv(bad, index=False)
    assert main(["stats", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "subject" in capsys.readouterr().err
