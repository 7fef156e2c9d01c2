"""Group statistics from tidy per-subject evaluation tables.

Input
-----
One or more tidy tables (CSV/TSV, or DataFrames) with the identifier columns ``subject``, ``method``
and optionally ``session``; per-label rows have a ``label`` column (and optionally ``name``, ``flag``)
and the per-label metrics of :data:`hdar_pipeline.evaluation.metrics.LABEL_METRICS`. Any other numeric column
(``runtime_s``, ``peak_memory_mb``, ``folded_percent`` ...) is a *subject-level* metric: one value per
subject x session x method, either repeated on every label row or given on rows without a label.

Rows whose ``status`` is present and not ``"ok"`` (failed subjects) are kept out of every statistic
and reported in :attr:`GroupStats.excluded`. A row without a status (NaN) counts as ok.

Outputs (README, "Column reference", documents every column)
------------------------------------------------------
``subjects``        one row per subject x session x method: label metrics averaged over labels;
``summary``         per method and metric (over subjects): n, mean, sd, median, quartiles, IQR, min, max;
``summary_by_label`` the same per label and method;
``paired``          every method against the reference method, per label and metric, on the subjects
                    both have: mean difference, Wilcoxon signed-rank and paired t p-values, Cohen's d_z,
                    Benjamini-Hochberg q across labels;
``paired_subjects`` the same for the whole-brain (subject-level) metrics;
``ranking`` / ``ranking_counts`` which method is best for each label (Klein et al. 2009 style);
``excluded`` / ``unpaired`` what was left out and why.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from hdar_pipeline.evaluation.metrics import LABEL_METRICS, METRIC_DIRECTION, _flagged
from hdar_pipeline.evaluation.group_tables import read_group_table  # noqa: F401 - the group tables' reader, also here

PathLike = str | os.PathLike

KEY = ["subject", "session"]
IDS = ["subject", "session", "method"]
#: Columns never treated as metrics.
NON_METRIC = {"subject", "session", "method", "label", "name", "flag", "status", "error", "message",
              "reference_voxels", "labels_voxels", "intersection_voxels", "n_voxels", "mask_voxels",
              "n_labels", "n_labels_evaluated", "n_labels_missing", "mask_source", "source_table", "seed",
              "threads", "run", "device", "preset", "participant_id", "session_id", "failed_step", "evaluated",
              "qc_folding", "qc_dice_outlier", "qc_failed"}
SUMMARY_STATS = ["n", "mean", "sd", "median", "q1", "q3", "iqr", "min", "max"]


class StatsError(ValueError):
    """The input tables cannot be used (missing columns, nothing to analyse)."""


@dataclass
class GroupStats:
    """All tables of a group analysis (see the module docstring and the README column reference)."""

    reference: str
    methods: list[str]
    label_metrics: list[str]
    subject_metrics: list[str]
    labels: pd.DataFrame
    subjects: pd.DataFrame
    summary: pd.DataFrame
    summary_by_label: pd.DataFrame
    paired: pd.DataFrame
    paired_subjects: pd.DataFrame
    ranking: pd.DataFrame
    ranking_counts: pd.DataFrame
    excluded: pd.DataFrame
    unpaired: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The output tables by file stem."""
        return {"subjects": self.subjects, "summary": self.summary, "summary_by_label": self.summary_by_label,
                "paired": self.paired, "paired_subjects": self.paired_subjects, "ranking": self.ranking,
                "ranking_counts": self.ranking_counts, "excluded": self.excluded, "unpaired": self.unpaired}


# --------------------------------------------------------------------------- input


def read_tables(paths: Iterable[PathLike]) -> pd.DataFrame:
    """Read and stack tidy tables (``.tsv`` tab-separated, anything else comma-separated).

    A ``source_table`` column records the file each row came from.
    """
    frames = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise StatsError(f"{p}: table not found")
        try:
            frame = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",",
                                dtype={"subject": str, "session": str, "method": str, "status": str,
                                       "flag": str, "name": str, "participant_id": str, "session_id": str})
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise StatsError(f"{p}: cannot be read as a table ({exc})") from None
        frame["source_table"] = str(p)
        frames.append(frame)
    if not frames:
        raise StatsError("no tables given")
    return pd.concat(frames, ignore_index=True, sort=False)


def _prepare(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str], list[str]]:
    """Clean ids, split off excluded rows, find metric columns. Returns (ok, excluded, label_metrics,
    subject_metrics, notes)."""
    if "subject" not in table and "participant_id" in table:  # a BIDS group table (group_labels.tsv)
        table = table.rename(columns={"participant_id": "subject", "session_id": "session"})
    missing = [c for c in ("subject", "method") if c not in table]
    if missing:
        raise StatsError(f"tables lack the identifier column(s) {', '.join(missing)} "
                         f"(columns: {', '.join(map(str, table.columns))})")
    df = table.copy()
    if "session" not in df:
        df["session"] = ""
    for c in IDS:
        df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    notes: list[str] = []
    if "status" in df:
        status = df["status"].astype(object).where(df["status"].notna(), "ok").astype(str).str.strip().str.lower()
        bad = status != "ok"
    else:
        bad = pd.Series(False, index=df.index)
    excluded_rows = df[bad]
    df = df[~bad].copy()
    if "label" not in df:
        df["label"] = np.nan
    lab = pd.to_numeric(df["label"], errors="coerce")
    if lab.notna().sum() == df["label"].notna().sum():
        df["label"] = lab  # numeric labels (NaN for subject-level rows)
    label_metrics = [c for c in LABEL_METRICS if c in df]
    for c in label_metrics:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    recomputed = {f"mean_{m}" for m in label_metrics}
    subject_metrics = []
    for c in df.columns:
        if c in NON_METRIC or c in label_metrics or c in recomputed or c.startswith("Unnamed"):
            continue
        values = pd.to_numeric(df[c], errors="coerce")
        if values.notna().any() and values.notna().sum() == df[c].notna().sum():
            df[c] = values
            subject_metrics.append(c)
    # Duplicates (the same subject/session/method/label twice, e.g. pooled runs that overlap): keep the last.
    is_label = df["label"].notna()
    dup = df[is_label].duplicated(subset=[*IDS, "label"], keep="last")
    if dup.any():
        notes.append(f"{int(dup.sum())} duplicate subject/session/method/label row(s): the last occurrence was kept")
        df = df.drop(index=dup[dup].index)
    return df, excluded_rows, label_metrics, subject_metrics, notes


def _excluded_table(excluded_rows: pd.DataFrame, ok: pd.DataFrame) -> pd.DataFrame:
    cols = ["subject", "session", "method", "status", "n_rows", "message", "fully_excluded"]
    if excluded_rows.empty:
        return pd.DataFrame(columns=cols)
    message_col = next((c for c in ("error", "message") if c in excluded_rows), None)
    rows = []
    ok_keys = set(map(tuple, ok[IDS].to_numpy().tolist()))
    for key, g in excluded_rows.groupby(IDS, sort=True):
        msgs = g[message_col].dropna().astype(str).unique().tolist() if message_col else []
        rows.append({"subject": key[0], "session": key[1], "method": key[2],
                     "status": ";".join(sorted(g["status"].astype(str).unique())), "n_rows": len(g),
                     "message": " | ".join(msgs), "fully_excluded": tuple(key) not in ok_keys})
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- tables


def subject_table(df: pd.DataFrame, label_metrics: Sequence[str], subject_metrics: Sequence[str]) -> pd.DataFrame:
    """One row per subject x session x method: label metrics averaged over labels (NaN skipped),
    label counts, and the subject-level metrics (averaged over the rows that carry them)."""
    labelled = df[df["label"].notna()]
    parts = []
    if len(labelled) and label_metrics:
        g = labelled.groupby(IDS, sort=False)
        means = g[list(label_metrics)].mean()
        counts = g.size().rename("n_labels")
        primary = label_metrics[0]
        if "flag" in labelled:
            missing = g["flag"].apply(lambda s: int(_flagged(s).sum()))
        else:
            missing = g[primary].apply(lambda s: int(s.isna().sum()))
        parts.append(pd.concat([means, counts, missing.rename("n_labels_missing")], axis=1))
    if subject_metrics:
        parts.append(df.groupby(IDS, sort=False)[list(subject_metrics)].mean())
    if not parts:
        return pd.DataFrame(columns=IDS)
    out = pd.concat(parts, axis=1, join="outer").reset_index()
    if "n_labels" in out:
        out["n_labels"] = out["n_labels"].fillna(0).astype(int)
        out["n_labels_missing"] = out["n_labels_missing"].fillna(0).astype(int)
    return out.sort_values(IDS, kind="stable").reset_index(drop=True)


def describe(values: pd.Series) -> dict[str, float]:
    """n, mean, sd (ddof 1), median, q1, q3, iqr, min, max of the finite values."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, **{k: np.nan for k in SUMMARY_STATS[1:]}}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else np.nan,
            "median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "min": float(v.min()), "max": float(v.max())}


def summary_table(subjects: pd.DataFrame, metrics: Sequence[str], methods: Sequence[str],
                  excluded: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method and metric: :func:`describe` over subjects, plus ``n_failed`` (fully excluded subjects)."""
    rows = []
    for method in methods:
        sub = subjects[subjects["method"] == method]
        failed = 0
        if excluded is not None and len(excluded):
            failed = int(((excluded["method"] == method) & excluded["fully_excluded"]).sum())
        for metric in metrics:
            if metric in sub:
                rows.append({"method": method, "metric": metric, **describe(sub[metric]), "n_failed": failed})
    return pd.DataFrame(rows, columns=["method", "metric", *SUMMARY_STATS, "n_failed"])


def summary_by_label_table(labelled: pd.DataFrame, metrics: Sequence[str], methods: Sequence[str]) -> pd.DataFrame:
    """Per label, method and metric: :func:`describe` over subjects."""
    rows = []
    names = _label_names(labelled)
    order = {m: i for i, m in enumerate(methods)}
    for (label, method), g in labelled.groupby(["label", "method"], sort=True):
        for metric in metrics:
            rows.append({"label": label, "name": names.get(label, ""), "method": method, "metric": metric,
                         **describe(g[metric])})
    out = pd.DataFrame(rows, columns=["label", "name", "method", "metric", *SUMMARY_STATS])
    if len(out):
        out["_o"] = out["method"].map(order)
        out = out.sort_values(["metric", "label", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)
    return out


def _label_names(labelled: pd.DataFrame) -> dict:
    if "name" not in labelled:
        return {}
    names = labelled.dropna(subset=["name"]).groupby("label")["name"].first()
    return {k: v for k, v in names.items() if isinstance(v, str)}


def _subject_id(subject: str, session: str) -> str:
    return f"{subject}/{session}" if session else subject


def paired_test(reference: np.ndarray, method: np.ndarray) -> dict[str, float]:
    """Paired comparison of two matched samples (``method - reference``).

    Returns ``n_subjects``, ``mean_reference``, ``mean_method``, ``mean_difference``, ``sd_difference``,
    ``cohens_dz`` (mean difference / SD of the differences), ``wilcoxon_p`` (two-sided Wilcoxon
    signed-rank, scipy's default zero handling; NaN when n < 2 or every difference is 0) and
    ``ttest_p`` (two-sided paired t test; NaN when n < 2 or the differences are constant).
    """
    ref = np.asarray(reference, dtype=float)
    met = np.asarray(method, dtype=float)
    diff = met - ref
    n = diff.size
    out = {"n_subjects": int(n), "mean_reference": float(ref.mean()) if n else np.nan,
           "mean_method": float(met.mean()) if n else np.nan, "mean_difference": float(diff.mean()) if n else np.nan,
           "sd_difference": float(diff.std(ddof=1)) if n > 1 else np.nan, "cohens_dz": np.nan,
           "wilcoxon_p": np.nan, "ttest_p": np.nan}
    if n < 2:
        return out
    sd = out["sd_difference"]
    if sd > 0:
        out["cohens_dz"] = out["mean_difference"] / sd
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["ttest_p"] = float(sps.ttest_rel(met, ref).pvalue)
    if np.any(diff != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out["wilcoxon_p"] = float(sps.wilcoxon(met, ref).pvalue)
            except ValueError:
                pass
    return out


def bh_qvalues(p: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values (``multipletests(method="fdr_bh")``); NaN p-values stay NaN and do not
    count towards the number of tests."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = multipletests(p[finite], method="fdr_bh")[1]
    return q


def _favours(metric: str, ref: np.ndarray, met: np.ndarray) -> str:
    direction = METRIC_DIRECTION.get(metric)
    if direction is None or ref.size == 0:
        return ""
    if direction == 0:
        delta = np.abs(ref).mean() - np.abs(met).mean()  # closer to zero is better
    else:
        delta = direction * (met.mean() - ref.mean())
    return "method" if delta > 0 else "reference" if delta < 0 else "tie"


def _presence(subjects: pd.DataFrame) -> dict[str, set[tuple[str, str]]]:
    return {m: set(map(tuple, g[KEY].to_numpy().tolist())) for m, g in subjects.groupby("method")}


def unpaired_table(presence: dict[str, set], reference: str, methods: Sequence[str]) -> pd.DataFrame:
    """Subjects that only one of (reference, method) has, for each method compared with the reference."""
    rows = []
    ref = presence.get(reference, set())
    for m in methods:
        if m == reference:
            continue
        have = presence.get(m, set())
        for key in sorted(ref - have):
            rows.append({"reference": reference, "method": m, "subject": key[0], "session": key[1],
                         "present_in": reference})
        for key in sorted(have - ref):
            rows.append({"reference": reference, "method": m, "subject": key[0], "session": key[1],
                         "present_in": m})
    return pd.DataFrame(rows, columns=["reference", "method", "subject", "session", "present_in"])


PAIRED_COLUMNS = ["method", "reference", "metric", "n_subjects", "mean_reference", "mean_method",
                  "mean_difference", "sd_difference", "cohens_dz", "wilcoxon_p", "ttest_p"]


def paired_tables(labelled: pd.DataFrame, subjects: pd.DataFrame, label_metrics: Sequence[str],
                  subject_metrics: Sequence[str], reference: str, methods: Sequence[str],
                  unpaired: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-label (with BH q across labels) and whole-brain paired comparisons with ``reference``."""
    label_cols = ["method", "reference", "metric", "label", "name", *PAIRED_COLUMNS[3:], "wilcoxon_q", "ttest_q",
                  "favours", "n_unpaired", "unpaired_subjects"]
    subj_cols = [*PAIRED_COLUMNS, "favours", "n_unpaired", "unpaired_subjects"]
    others = [m for m in methods if m != reference]
    if reference not in methods or not others:
        return pd.DataFrame(columns=label_cols), pd.DataFrame(columns=subj_cols)
    listed = {m: sorted(_subject_id(r.subject, r.session) + f" ({r.present_in} only)"
                        for r in unpaired[unpaired["method"] == m].itertuples()) for m in others}
    names = _label_names(labelled)
    label_rows, subj_rows = [], []
    for metric in label_metrics:
        wide = labelled.pivot_table(index=[*KEY, "label"], columns="method", values=metric, aggfunc="mean")
        if reference not in wide:
            continue
        for m in others:
            if m not in wide:
                continue
            block = []
            for label, g in wide[[reference, m]].groupby(level="label", sort=True):
                pair = g.dropna()
                r, v = pair[reference].to_numpy(float), pair[m].to_numpy(float)
                block.append({"method": m, "reference": reference, "metric": metric, "label": label,
                              "name": names.get(label, ""), **paired_test(r, v), "favours": _favours(metric, r, v),
                              "n_unpaired": len(listed[m]), "unpaired_subjects": "; ".join(listed[m])})
            if block:
                q_w = bh_qvalues([b["wilcoxon_p"] for b in block])
                q_t = bh_qvalues([b["ttest_p"] for b in block])
                for b, qw, qt in zip(block, q_w, q_t):
                    b["wilcoxon_q"], b["ttest_q"] = qw, qt
                label_rows.extend(block)
    for metric in [*label_metrics, *subject_metrics]:
        if metric not in subjects:
            continue
        wide = subjects.pivot_table(index=KEY, columns="method", values=metric, aggfunc="mean")
        if reference not in wide:
            continue
        for m in others:
            if m not in wide:
                continue
            pair = wide[[reference, m]].dropna()
            r, v = pair[reference].to_numpy(float), pair[m].to_numpy(float)
            subj_rows.append({"method": m, "reference": reference, "metric": metric, **paired_test(r, v),
                              "favours": _favours(metric, r, v), "n_unpaired": len(listed[m]),
                              "unpaired_subjects": "; ".join(listed[m])})
    return pd.DataFrame(label_rows, columns=label_cols), pd.DataFrame(subj_rows, columns=subj_cols)


def ranking_tables(labelled: pd.DataFrame, label_metrics: Sequence[str], methods: Sequence[str]
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank the methods for every label and metric (Klein et al. 2009 style).

    For each label, the subjects that every method has (with a finite value) are used; methods are
    ordered by their mean over those subjects in the metric's good direction (higher overlap, lower
    errors and distances, ``volume_similarity`` closest to 0 by mean absolute value). Rank 1 is best,
    ties share the best rank. ``ranking_counts`` counts, per metric and method, the labels where it is
    best and its mean rank.
    """
    rank_cols = ["metric", "label", "name", "method", "n_subjects", "mean", "score", "rank", "best"]
    count_cols = ["metric", "method", "n_best", "n_labels", "mean_rank"]
    names = _label_names(labelled)
    rows = []
    for metric in label_metrics:
        direction = METRIC_DIRECTION.get(metric)
        if direction is None:
            continue
        wide = labelled.pivot_table(index=[*KEY, "label"], columns="method", values=metric, aggfunc="mean")
        present = [m for m in methods if m in wide]
        if not present:
            continue
        for label, g in wide[present].groupby(level="label", sort=True):
            complete = g.dropna()
            if complete.empty:
                continue
            means = complete.mean()
            score = -complete.abs().mean() if direction == 0 else direction * means
            ranks = score.rank(ascending=False, method="min")
            for m in present:
                rows.append({"metric": metric, "label": label, "name": names.get(label, ""), "method": m,
                             "n_subjects": len(complete), "mean": float(means[m]), "score": float(score[m]),
                             "rank": int(ranks[m]), "best": bool(ranks[m] == 1)})
    ranking = pd.DataFrame(rows, columns=rank_cols)
    if ranking.empty:
        return ranking, pd.DataFrame(columns=count_cols)
    counts = (ranking.groupby(["metric", "method"], sort=False)
              .agg(n_best=("best", "sum"), n_labels=("label", "nunique"), mean_rank=("rank", "mean"))
              .reset_index())
    counts["n_best"] = counts["n_best"].astype(int)
    return ranking, counts[count_cols]


def group_statistics(table: pd.DataFrame, *, reference: str = "hdar",
                     methods: Sequence[str] | None = None) -> GroupStats:
    """Build every group table from a stacked tidy table (see the module docstring).

    Parameters
    ----------
    table : pandas.DataFrame
        Stacked tidy rows (e.g. from :func:`read_tables`).
    reference : str
        The method every other method is compared with. If absent, the paired tables are empty and a
        note says so.
    methods : sequence of str, optional
        Method order for the tables and figures (default: the reference first, then order of appearance).
    """
    df, excluded_rows, label_metrics, subject_metrics, notes = _prepare(table)
    excluded = _excluded_table(excluded_rows, df)
    if len(excluded):
        notes.append(f"{len(excluded)} subject/method combination(s) with a status other than 'ok' were left out "
                     f"of the statistics ({int(excluded['fully_excluded'].sum())} entirely): see excluded.csv "
                     "(excluded.tsv in the BIDS App's group folder)")
    seen = list(dict.fromkeys(df["method"].tolist()))
    if methods is None:
        methods = ([reference] if reference in seen else []) + [m for m in seen if m != reference]
    else:
        methods = [m for m in methods if m in seen] + [m for m in seen if m not in methods]
    if df.empty:
        notes.append("no rows with status 'ok' remain")
    if reference not in seen:
        notes.append(f"reference method {reference!r} is not in the tables (methods: {', '.join(seen) or 'none'}); "
                     "no paired comparisons were made")
    labelled = df[df["label"].notna()].copy()
    if pd.api.types.is_numeric_dtype(labelled["label"]) and np.all(np.mod(labelled["label"], 1) == 0):
        labelled["label"] = labelled["label"].astype(np.int64)
    subjects = subject_table(df, label_metrics, subject_metrics)
    metrics_all = [*label_metrics, *(c for c in subject_metrics if c in subjects)]
    summary = summary_table(subjects, metrics_all, methods, excluded)
    by_label = summary_by_label_table(labelled, label_metrics, methods)
    unpaired = unpaired_table(_presence(subjects), reference, methods) if reference in seen else \
        pd.DataFrame(columns=["reference", "method", "subject", "session", "present_in"])
    if len(unpaired):
        notes.append(f"{len(unpaired)} subject(s) present in only one of a compared pair of methods: "
                     "see unpaired.csv (unpaired.tsv in the BIDS App's group folder)")
    paired, paired_subjects = paired_tables(labelled, subjects, label_metrics, subject_metrics, reference, methods,
                                            unpaired)
    ranking, ranking_counts = ranking_tables(labelled, label_metrics, methods)
    return GroupStats(reference=reference, methods=list(methods), label_metrics=label_metrics,
                      subject_metrics=subject_metrics, labels=labelled, subjects=subjects, summary=summary,
                      summary_by_label=by_label, paired=paired, paired_subjects=paired_subjects, ranking=ranking,
                      ranking_counts=ranking_counts, excluded=excluded, unpaired=unpaired, notes=notes)


#: What :func:`write_group_statistics` writes in its folder (names and patterns); nothing else is touched.
STATS_OUTPUTS = tuple(f"{stem}.{ext}" for ext in ("csv", "tsv")
                      for stem in ("subjects", "summary", "summary_by_label", "paired", "paired_subjects", "ranking",
                                   "ranking_counts", "excluded", "unpaired")) + \
    ("boxplot_labels_*", "boxplot_methods_*", "dice_vs_runtime.*")


def write_group_statistics(
    tables: pd.DataFrame | Sequence[PathLike],
    out_dir: PathLike,
    *,
    reference: str = "hdar",
    figures: bool = True,
    figure_metrics: Sequence[str] = ("dice",),
    extension: str = ".csv",
) -> tuple[GroupStats, list[Path]]:
    """Compute :func:`group_statistics` and write its tables and figures into ``out_dir``.

    Parameters
    ----------
    tables : DataFrame or sequence of paths
        A stacked tidy table, or tidy CSV/TSV files to pool.
    out_dir : path-like
        Output folder (created). CSVs: ``subjects``, ``summary``, ``summary_by_label``, ``paired``,
        ``paired_subjects``, ``ranking``, ``ranking_counts``, ``excluded``, ``unpaired`` (``.csv``).
        Figures (``.png`` and ``.svg``): ``boxplot_labels_<metric>`` and ``boxplot_methods_<metric>`` for
        each of ``figure_metrics`` present, and ``dice_vs_runtime`` when a ``runtime_s`` column exists.
    extension : str
        ``.csv`` (comma-separated) or ``.tsv`` (tab-separated, missing values as ``n/a`` as BIDS writes them;
        the BIDS App's group level).

    Returns
    -------
    (GroupStats, list of Path)
        The statistics and every file written.
    """
    from hdar_pipeline.core.input_guard import InputGuard

    guard = InputGuard({"TABLES": None if isinstance(tables, pd.DataFrame) else list(tables)})
    out = guard.output_folder(out_dir, "-o/--output", writes=STATS_OUTPUTS)
    table = tables if isinstance(tables, pd.DataFrame) else read_tables(tables)
    result = group_statistics(table, reference=reference)
    written = []
    if extension not in (".csv", ".tsv"):
        raise ValueError(f"extension must be .csv or .tsv, not {extension!r}")
    for stem, frame in result.tables().items():
        path = out / f"{stem}{extension}"
        if extension == ".tsv":
            frame.to_csv(path, index=False, sep="\t", na_rep="n/a")
        else:
            frame.to_csv(path, index=False)
        written.append(path)
    if figures:
        from hdar_pipeline.evaluation import figures as fig

        for metric in figure_metrics:
            if metric in result.labels and result.labels[metric].notna().any():
                written += fig.plot_label_boxplots(result.labels, out / f"boxplot_labels_{metric}", metric=metric,
                                                   methods=result.methods)
            if metric in result.subjects and result.subjects[metric].notna().any():
                written += fig.plot_method_boxplot(result.subjects, out / f"boxplot_methods_{metric}", metric=metric,
                                                   methods=result.methods)
        if ("runtime_s" in result.subjects and "dice" in result.subjects
                and (result.subjects["runtime_s"].notna() & result.subjects["dice"].notna()).any()):
            written += fig.plot_metric_vs_runtime(result.subjects, out / "dice_vs_runtime", metric="dice",
                                                  methods=result.methods)
    guard.verify()
    return result, written
