"""BIDS-style group tables: tab-separated values with a JSON data dictionary beside each table.

The group tables of a cohort (:func:`hdar_pipeline.pipeline.subject_steps.collect_records`) are written the way BIDS
writes tabular files: ``.tsv``, missing values as ``n/a``, booleans as ``true``/``false``, and a
``.json`` data dictionary of the same stem that describes every column (``Description``, ``Units``
where a column has units, ``Levels`` for categorical columns and ``Format``: ``string``, ``integer``,
``number`` or ``boolean``). Subjects and sessions are identified as BIDS writes them in
``participants.tsv``: ``participant_id`` (``sub-02``) and ``session_id`` (``ses-a``, ``n/a`` without
sessions), so that ``pandas.read_csv(path, sep="\\t")`` reads them as strings; :func:`read_group_table`
restores every column's type from the dictionary.

QC flags (:func:`qc_flags`)
---------------------------
``qc_folding``
    The registration folds more than ``folding_threshold`` percent of the brain: ``folded_percent_mask``
    (voxels with det J <= 0 inside the atlas labels) or, where a row has no mask value,
    ``folded_percent`` (the whole atlas grid), above the threshold (default 0.1 %).
``qc_dice_outlier``
    The subject's ``mean_dice`` is a low outlier within its method: below Tukey's lower fence
    Q1 - 1.5 IQR of that method's ok subjects (a one-sided rule: only a low Dice is flagged).
``qc_failed``
    The subject x method did not finish (``status`` is not ``ok``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from hdar_pipeline.evaluation.metrics import DISTANCE_COLUMNS, OVERLAP_COLUMNS

PathLike = str | os.PathLike

log = logging.getLogger(__name__)

#: How BIDS writes a missing value in a ``.tsv``.
NA = "n/a"
#: Default of ``--qc-folding-threshold``: percent of the brain's voxels with det J <= 0.
DEFAULT_FOLDING_THRESHOLD = 0.1
QC_COLUMNS = ["qc_folding", "qc_dice_outlier", "qc_failed"]
#: The warning written in the log, the dictionary and group.html when the labels have no names.
MISSING_NAMES_WARNING = ("label names are missing: the labels dataset has no dseg.tsv look-up table (columns "
                         "index, name), so the 'name' column is n/a and the labels are known by number only")

_METRIC_TEXT = {
    "dice": "Dice overlap 2|A∩B|/(|A|+|B|) of the warped subject label with the atlas label",
    "jaccard": "Jaccard overlap |A∩B|/|A∪B|",
    "target_overlap": "target overlap |A∩B|/|A| (A: the atlas label)",
    "mean_overlap": "mean overlap (Dice)",
    "false_negative": "false negative error 1 - |A∩B|/|A|",
    "false_positive": "false positive error 1 - |A∩B|/|B|",
    "volume_similarity": "volume similarity 2(|B|-|A|)/(|A|+|B|)",
    "hd95_mm": "95th percentile of the symmetric surface distance",
    "msd_mm": "mean symmetric surface distance",
    "hd_mm": "Hausdorff distance",
}


def _entry(description: str, fmt: str, units: str | None = None, levels: Mapping[str, str] | None = None
           ) -> dict[str, Any]:
    out: dict[str, Any] = {"Description": description, "Format": fmt}
    if units:
        out["Units"] = units
    if levels:
        out["Levels"] = dict(levels)
    return out


def _known_columns() -> dict[str, dict[str, Any]]:
    cols = {
        "participant_id": _entry("participant, as in the input dataset's participants.tsv (sub-<label>)", "string"),
        "session_id": _entry("session (ses-<label>); n/a when the dataset has no sessions", "string"),
        "method": _entry("registration method", "string"),
        "preset": _entry("the method's parameter preset", "string"),
        "status": _entry("outcome of the subject x method", "string",
                         levels={"ok": "registered (and evaluated when labels exist)",
                                 "error": "failed: see error and failed_step; no metrics"}),
        "error": _entry("error message of a failed subject x method (n/a when ok)", "string"),
        "failed_step": _entry("the step that failed (preprocess, register, evaluate); n/a when ok", "string"),
        "runtime_s": _entry("wall time of the registration", "number", "s"),
        "peak_memory_mb": _entry("peak resident memory of the registration", "number", "MB"),
        "device": _entry("device the registration ran on", "string"),
        "evaluated": _entry("whether the warped labels were compared with the atlas labels", "boolean",
                            levels={"true": "evaluated", "false": "not evaluated (no labels, or failed)"}),
        "folded_percent": _entry("voxels of the atlas grid where the Jacobian determinant is <= 0", "number", "%"),
        "folded_percent_mask": _entry("brain voxels (atlas labels > 0) where the Jacobian determinant is <= 0",
                                      "number", "%"),
        "log_jacobian_std": _entry("standard deviation of log(det J) over the grid voxels with det J > 0", "number",
                                   "dimensionless"),
        "log_jacobian_std_mask": _entry("standard deviation of log(det J) inside the brain", "number",
                                        "dimensionless"),
        "jacobian_min": _entry("minimum Jacobian determinant over the grid", "number", "dimensionless"),
        "jacobian_max": _entry("maximum Jacobian determinant over the grid", "number", "dimensionless"),
        "jacobian_mean": _entry("mean Jacobian determinant over the grid", "number", "dimensionless"),
        "n_voxels": _entry("voxels of the atlas grid", "integer"),
        "mask_voxels": _entry("voxels of the brain mask (atlas labels > 0)", "integer"),
        "n_labels": _entry("labels evaluated (rows of the per-label table)", "integer"),
        "n_labels_evaluated": _entry("labels with a Dice (the atlas's labels, lost ones included)", "integer"),
        "n_labels_missing": _entry("labels missing from one of the two label maps (flagged)", "integer"),
        "label": _entry("label value (index of the labels' dseg.tsv)", "integer"),
        "name": _entry("label name from the labels dataset's dseg.tsv", "string"),
        "flag": _entry("label missing from one image (n/a when present in both)", "string",
                       levels={"missing_in_labels": "the warped subject labels lost it (scores 0)",
                               "missing_in_reference": "the atlas labels lack it (not scored)",
                               "missing_in_both": "listed in dseg.tsv, absent from both (not scored)"}),
        "reference_voxels": _entry("voxels of the label in the atlas labels", "integer"),
        "labels_voxels": _entry("voxels of the label in the warped subject labels", "integer"),
        "qc_folding": _entry("QC flag: folded_percent_mask (folded_percent where there is no mask value) above "
                             "the folding threshold", "boolean",
                             levels={"true": "folds above the threshold", "false": "within the threshold"}),
        "qc_dice_outlier": _entry("QC flag: mean_dice below Tukey's lower fence Q1 - 1.5 IQR of the ok subjects of "
                                  "the same method (only low Dice is flagged)", "boolean",
                                  levels={"true": "low outlier", "false": "not an outlier, or no mean_dice"}),
        "qc_failed": _entry("QC flag: the subject x method did not finish (status is not ok)", "boolean",
                            levels={"true": "failed", "false": "finished"}),
    }
    for metric in [*OVERLAP_COLUMNS, *DISTANCE_COLUMNS]:
        units = "mm" if metric.endswith("_mm") else "dimensionless"
        cols[metric] = _entry(_METRIC_TEXT.get(metric, metric), "number", units)
        cols[f"mean_{metric}"] = _entry(f"mean over the labels of: {_METRIC_TEXT.get(metric, metric)}", "number",
                                        units)
    return cols


#: Dictionary entries of the columns hdar-pipeline writes.
COLUMNS: dict[str, dict[str, Any]] = _known_columns()


# ----------------------------------------------------------------------------- identifiers


def _prefixed(value: Any, prefix: str) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    text = str(value).strip()
    if not text:
        return np.nan
    return text if text.startswith(prefix) else prefix + text


def bids_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """Replace ``subject``/``session`` by BIDS's ``participant_id``/``session_id`` as the first columns.

    ``"02"`` becomes ``"sub-02"``, ``"a"`` ``"ses-a"``, an empty session NaN (``n/a`` once written).
    """
    df = frame.copy()
    subject = df.pop("subject") if "subject" in df else pd.Series(np.nan, index=df.index)
    session = df.pop("session") if "session" in df else pd.Series(np.nan, index=df.index)
    df.insert(0, "session_id", session.map(lambda v: _prefixed(v, "ses-")).astype(object))
    df.insert(0, "participant_id", subject.map(lambda v: _prefixed(v, "sub-")).astype(object))
    return df


# ----------------------------------------------------------------------------- participants.tsv


def read_participants(bids_dir: PathLike | None) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The input dataset's ``participants.tsv`` (types as pandas infers them, ``n/a`` missing) and the
    entries of its ``participants.json`` data dictionary; ``(None, {})`` when there is no table."""
    if bids_dir is None:
        return None, {}
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return None, {}
    table = pd.read_csv(path, sep="\t", na_values=NA, keep_default_na=False, dtype={"participant_id": str})
    if "participant_id" not in table:
        log.warning("%s has no participant_id column; its columns are not merged into the group tables", path)
        return None, {}
    table["participant_id"] = table["participant_id"].map(lambda v: _prefixed(v, "sub-"))
    table = table.drop_duplicates("participant_id", keep="first")
    sidecar = path.with_suffix(".json")
    dictionary: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            dictionary = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s cannot be read (%s); the participants columns get no descriptions", sidecar, exc)
    return table, {k: v for k, v in dictionary.items() if isinstance(v, dict)}


def merge_participants(frame: pd.DataFrame, participants: pd.DataFrame | None) -> pd.DataFrame:
    """``frame`` with the columns of ``participants`` (one row per ``participant_id``) joined on
    ``participant_id``, after the identifier columns (``participant_id``, ``session_id``, ``method``); a column
    the group table already has is skipped."""
    if participants is None or "participant_id" not in frame:
        return frame
    extra = [c for c in participants.columns if c != "participant_id" and c not in frame]
    if not extra:
        return frame
    merged = frame.merge(participants[["participant_id", *extra]], on="participant_id", how="left")
    ids = [c for c in ("participant_id", "session_id", "method") if c in merged]
    rest = [c for c in merged.columns if c not in ids and c not in extra]
    return merged[[*ids, *extra, *rest]]


# ----------------------------------------------------------------------------- QC flags


def qc_flags(group: pd.DataFrame, *, folding_threshold: float = DEFAULT_FOLDING_THRESHOLD) -> pd.DataFrame:
    """``group`` (one row per subject x session x method) with the QC flag columns added.

    See the module docstring for the rules (``qc_folding``, ``qc_dice_outlier``, ``qc_failed``).

    Parameters
    ----------
    group : pandas.DataFrame
        The group table, with ``method``, ``status`` and, where present, ``folded_percent(_mask)`` and
        ``mean_dice``.
    folding_threshold : float
        Percent of the brain's voxels folded above which ``qc_folding`` is set.
    """
    df = group.copy()
    ok = (df["status"].astype(str) == "ok") if "status" in df else pd.Series(True, index=df.index)
    folded = pd.Series(np.nan, index=df.index, dtype=float)
    if "folded_percent" in df:
        folded = pd.to_numeric(df["folded_percent"], errors="coerce")
    if "folded_percent_mask" in df:
        folded = pd.to_numeric(df["folded_percent_mask"], errors="coerce").fillna(folded)
    df["qc_folding"] = (folded > float(folding_threshold)).fillna(False).astype(bool)
    outlier = pd.Series(False, index=df.index)
    if "mean_dice" in df and "method" in df:
        dice = pd.to_numeric(df["mean_dice"], errors="coerce").where(ok)
        for _, idx in df.groupby("method", sort=False).groups.items():
            values = dice.loc[idx].dropna()
            if values.empty:
                continue
            q1, q3 = np.percentile(values.to_numpy(float), [25, 75])
            outlier.loc[values.index] = values < q1 - 1.5 * (q3 - q1)
    df["qc_dice_outlier"] = outlier.astype(bool)
    df["qc_failed"] = (~ok).astype(bool)
    return df


def missing_label_names(labels: pd.DataFrame) -> bool:
    """True when a per-label table has label rows but not one label name."""
    if "label" not in labels or not labels["label"].notna().any():
        return False
    if "name" not in labels:
        return True
    names = labels.loc[labels["label"].notna(), "name"].astype(object)
    return not (names.notna() & (names.astype(str).str.strip() != "")).any()


# ----------------------------------------------------------------------------- writing and reading


def _format_of(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    values = series.dropna()
    if pd.api.types.is_integer_dtype(series):
        return "integer"
    if pd.api.types.is_numeric_dtype(series):
        return "integer" if len(values) and np.all(np.mod(values.to_numpy(float), 1) == 0) and \
            series.name in COLUMNS and COLUMNS[series.name]["Format"] == "integer" else "number"
    if len(values) and values.map(lambda v: isinstance(v, (bool, np.bool_))).all():
        return "boolean"
    return "string"


def data_dictionary(frame: pd.DataFrame, *, extra: Mapping[str, Mapping[str, Any]] | None = None,
                    notes: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The BIDS data dictionary of ``frame``: one entry per column, in column order.

    Known columns get :data:`COLUMNS`' entry; ``extra`` entries (e.g. copied from ``participants.json``)
    come next; any other column gets a generic description. ``Format`` is always set from the data
    (``string``, ``integer``, ``number`` or ``boolean``: what :func:`read_group_table` restores), and
    ``Levels`` is completed for the ``method`` column. ``notes`` are appended to a column's description.
    """
    extra = dict(extra or {})
    out: dict[str, dict[str, Any]] = {}
    for col in frame.columns:
        entry = dict(extra.get(col) or COLUMNS.get(col) or {"Description": f"{col} (see the hdar-pipeline README)"})
        entry["Format"] = _format_of(frame[col])
        if col == "method":
            entry["Levels"] = {m: f"registered with {m}" for m in sorted(frame[col].dropna().astype(str).unique())}
        if notes and col in notes:
            entry["Description"] = f"{entry.get('Description', col)}. {notes[col]}"
        out[str(col)] = entry
    return out


def _clean_text(value: Any) -> Any:
    if isinstance(value, str):
        value = " ".join(value.replace("\t", " ").splitlines()).strip()
        return value if value else np.nan
    return value


def write_group_table(frame: pd.DataFrame, path: PathLike, dictionary: Mapping[str, Mapping[str, Any]]
                      ) -> tuple[Path, Path]:
    """Write ``frame`` as a BIDS ``.tsv`` and ``dictionary`` as the ``.json`` beside it.

    Strings lose tabs and line breaks (a message's lines are joined by spaces), empty strings and NaN
    become ``n/a``, booleans ``true``/``false``, integer columns are written without a decimal point.

    Returns
    -------
    (Path, Path)
        The ``.tsv`` and the ``.json``.
    """
    tsv = Path(path)
    tsv.parent.mkdir(parents=True, exist_ok=True)
    df = frame.copy()
    for col in df.columns:
        fmt = dictionary.get(col, {}).get("Format")
        if fmt == "boolean":
            df[col] = df[col].map(lambda v: NA if v is None or (isinstance(v, float) and np.isnan(v))
                                  else "true" if bool(v) else "false")
        elif fmt == "integer" and not pd.api.types.is_integer_dtype(df[col]):
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
        elif pd.api.types.is_object_dtype(df[col]) or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].astype(object).map(_clean_text)
    df.to_csv(tsv, sep="\t", index=False, na_rep=NA)
    sidecar = tsv.with_suffix(".json")
    sidecar.write_text(json.dumps({c: dictionary[c] for c in frame.columns if c in dictionary}, indent=2,
                                  ensure_ascii=False) + "\n", encoding="utf-8")
    return tsv, sidecar


def read_group_table(path: PathLike) -> pd.DataFrame:
    """Read a group ``.tsv`` with the types its JSON data dictionary gives.

    ``n/a`` (and empty cells) are missing; ``string`` columns (``participant_id``, ``session_id``,
    ``method`` ...) stay strings (``"sub-02"``, never the number 2), ``integer`` columns are ``int64`` (or
    pandas' nullable ``Int64`` where a value is missing), ``boolean`` columns ``bool`` (nullable ``boolean``
    with a missing value), ``number`` columns ``float64``. Without a ``.json`` beside the table, the
    identifier columns are read as strings and the rest as pandas infers them.

    Parameters
    ----------
    path : path-like
        The ``.tsv`` (e.g. ``OUTPUT_DIR/group/group.tsv``).

    Returns
    -------
    pandas.DataFrame
    """
    tsv = Path(path)
    sidecar = tsv.with_suffix(".json")
    dictionary: dict[str, Any] = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    formats = {c: e.get("Format") for c, e in dictionary.items() if isinstance(e, dict)}
    strings = {c for c, f in formats.items() if f in ("string", "boolean")}
    strings |= {"participant_id", "session_id", "subject", "session", "method"} - set(formats)
    frame = pd.read_csv(tsv, sep="\t", na_values=[NA, ""], keep_default_na=False,
                        dtype={c: str for c in strings})
    for col, fmt in formats.items():
        if col not in frame:
            continue
        if fmt == "boolean":
            values = frame[col].map(lambda v: {"true": True, "false": False}.get(str(v).strip().lower())
                                    if isinstance(v, str) else None)
            frame[col] = values.astype(bool) if values.notna().all() else values.astype("boolean")
        elif fmt == "integer":
            values = pd.to_numeric(frame[col], errors="coerce")
            frame[col] = values.astype("int64") if values.notna().all() else values.astype("Int64")
        elif fmt == "number":
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame


# ----------------------------------------------------------------------------- group.html


def _href(target: Path, base: Path) -> str:
    import urllib.parse

    return urllib.parse.quote(Path(os.path.relpath(target, base)).as_posix(), safe="/")


def _link(target: Path, base: Path, text: str | None = None) -> str:
    import html

    return f'<a href="{_href(target, base)}">{html.escape(text if text is not None else target.name)}</a>'


def _cell(value: Any, digits: int = 4) -> str:
    import html

    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return '<td class="na">n/a</td>'
    if isinstance(value, (bool, np.bool_)):
        return f'<td class="{"flag" if value else ""}">{"yes" if value else "no"}</td>'
    if isinstance(value, (float, np.floating)):
        return f'<td class="num">{value:.{digits}g}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def write_group_html(
    path: PathLike,
    group: pd.DataFrame,
    *,
    reports: Mapping[tuple[str, str], Path],
    files: list[Path],
    methods_text: PathLike | None = None,
    reference: str = "",
    warnings: list[str] | None = None,
    notes: list[str] | None = None,
    folding_threshold: float = DEFAULT_FOLDING_THRESHOLD,
    title: str = "hdar-pipeline: group report",
) -> Path:
    """The group level's HTML page: one self-contained file (inline style, no script, nothing fetched) that
    links, by relative paths, every subject report, the group figures, the tables and the methods text.

    Parameters
    ----------
    path : path-like
        The page (``OUTPUT_DIR/group/group.html``).
    group : pandas.DataFrame
        The group table (one row per subject x session x method, as :func:`read_group_table` reads it).
    reports : mapping
        ``(participant_id, session_id or "") -> report.html`` of the subject reports; a subject without one is
        listed without a link.
    files : list of Path
        The tables and figures of the group folder: ``.png`` figures are shown (linked to their ``.svg`` when
        one exists), ``.tsv``/``.json``/``.txt`` files are linked.
    methods_text : path-like, optional
        ``logs/CITATION.md``: linked (with its ``.html`` when present) and shown.
    reference : str
        The reference method of the paired tests.
    warnings, notes : list of str, optional
        Shown at the top (warnings) and under the tables (notes of the statistics).
    folding_threshold : float
        The threshold of ``qc_folding`` (percent), for the text.

    Returns
    -------
    Path
    """
    import html

    from hdar_pipeline._version import __version__

    out = Path(path)
    base = out.parent
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             "<style>body{font-family:Helvetica,Arial,sans-serif;max-width:1200px;margin:0 auto;padding:1em 2em;"
             "color:#222;line-height:1.45}h1{border-bottom:3px solid #3465a4}h2{border-bottom:1px solid #ccc;"
             "margin-top:2em}table{border-collapse:collapse;margin:.6em 0 1em}th,td{border:1px solid #ccc;"
             "padding:.2em .6em;text-align:left}th{background:#eef2f8}td.num{text-align:right}"
             "td.flag{background:#fdecee;color:#b00020;font-weight:bold}td.na{color:#999}"
             ".warning{border:1px solid #c98a00;background:#fff6dd;padding:.4em 1em;border-radius:4px}"
             "figure img{max-width:100%;border:1px solid #ddd}pre{white-space:pre-wrap;background:#f7f7f7;"
             "padding:.8em}</style></head><body>", f"<h1>{e(title)}</h1>"]
    ok = group["status"].astype(str) == "ok" if "status" in group else pd.Series(True, index=group.index)
    n_subjects = group[["participant_id", "session_id"]].astype(str).drop_duplicates().shape[0] \
        if "participant_id" in group else 0
    methods = sorted(group["method"].dropna().astype(str).unique()) if "method" in group else []
    parts.append(f"<p>{n_subjects} participant(s) x session(s), methods {e(', '.join(methods))}; "
                 f"{int(ok.sum())} of {len(group)} subject x method rows finished. Paired tests compare every "
                 f"method with the reference <b>{e(reference)}</b>.</p>")
    for w in warnings or []:
        parts.append(f'<p class="warning">Warning: {e(w)}</p>')
    # per-method summary and QC counts
    parts.append("<h2>Methods</h2><table><tr><th>method</th><th>ok</th><th>failed</th><th>mean Dice (mean)</th>"
                 "<th>mean Dice (SD)</th><th>qc_folding</th><th>qc_dice_outlier</th></tr>")
    for method in methods:
        rows = group[group["method"].astype(str) == method]
        dice = pd.to_numeric(rows.get("mean_dice", pd.Series(dtype=float)), errors="coerce")
        counts = [int(rows[c].astype(bool).sum()) if c in rows else 0 for c in ("qc_folding", "qc_dice_outlier")]
        parts.append(f"<tr><td>{e(method)}{' (reference)' if method == reference else ''}</td>"
                     f'<td class="num">{int((rows["status"].astype(str) == "ok").sum())}</td>'
                     f'<td class="num">{int((rows["status"].astype(str) != "ok").sum())}</td>'
                     + _cell(float(dice.mean()) if dice.notna().any() else None)
                     + _cell(float(dice.std()) if dice.notna().sum() > 1 else None)
                     + "".join(f'<td class="num">{n}</td>' for n in counts) + "</tr>")
    parts.append("</table>")
    parts.append(f"<p>QC flags: <b>qc_folding</b> when more than {folding_threshold:g} % of the brain's voxels fold "
                 "(det J &le; 0); <b>qc_dice_outlier</b> when the mean Dice is below Q1 &minus; 1.5 IQR of its "
                 "method's subjects; <b>qc_failed</b> when the subject x method did not finish.</p>")
    # subjects
    parts.append("<h2>Subjects</h2><table><tr><th>participant</th><th>session</th><th>method</th><th>status</th>"
                 "<th>mean Dice</th><th>folded % (brain)</th><th>qc_folding</th><th>qc_dice_outlier</th>"
                 "<th>report</th></tr>")
    for row in group.itertuples(index=False):
        r = row._asdict()
        pid, ses = str(r.get("participant_id")), r.get("session_id")
        ses = "" if ses is None or (isinstance(ses, float) and np.isnan(ses)) or ses is pd.NA else str(ses)
        report = reports.get((pid, ses))
        folded = r.get("folded_percent_mask")
        if folded is None or (isinstance(folded, float) and np.isnan(folded)):
            folded = r.get("folded_percent")
        parts.append(f"<tr><td>{e(pid)}</td><td>{e(ses) or 'n/a'}</td><td>{e(str(r.get('method')))}</td>"
                     f"<td>{e(str(r.get('status')))}</td>" + _cell(r.get("mean_dice")) + _cell(folded)
                     + _cell(r.get("qc_folding")) + _cell(r.get("qc_dice_outlier"))
                     + f"<td>{_link(report, base, report.name) if report is not None else 'no report'}</td></tr>")
    parts.append("</table>")
    if reports:
        parts.append("<h3>Subject reports</h3><ul>" + "".join(
            f"<li>{_link(p, base)}</li>" for _, p in sorted(reports.items())) + "</ul>")
    # figures
    figures = sorted(f for f in files if f.suffix == ".png")
    if figures:
        parts.append("<h2>Group figures</h2>")
        for fig in figures:
            svg = fig.with_suffix(".svg")
            caption = _link(fig, base) + (f" ({_link(svg, base)})" if svg.is_file() else "")
            parts.append(f'<figure><img src="{_href(fig, base)}" alt="{e(fig.stem)}">'
                         f"<figcaption>{caption}</figcaption></figure>")
    # tables
    tables = sorted(f for f in files if f.suffix in (".tsv", ".json", ".txt", ".csv"))
    if tables:
        parts.append("<h2>Tables</h2><p>Read a table with its types with "
                     "<code>hdar_pipeline.evaluation.group_tables.read_group_table(path)</code> (the <code>.json</code> beside each "
                     "<code>.tsv</code> is its data dictionary).</p><ul>"
                     + "".join(f"<li>{_link(t, base)}</li>" for t in tables) + "</ul>")
    for note in notes or []:
        parts.append(f'<p class="note">{e(note)}</p>')
    # methods text
    parts.append("<h2>Methods text</h2>")
    md = Path(methods_text) if methods_text is not None else None
    if md is not None and md.is_file():
        page = md.with_suffix(".html")
        parts.append(f"<p>{_link(md, base)}" + (f" ({_link(page, base)})" if page.is_file() else "") + "</p>")
        parts.append(f"<pre>{e(md.read_text(encoding='utf-8', errors='replace'))}</pre>")
    else:
        parts.append("<p>No methods text (logs/CITATION.md is written by the participant level).</p>")
    parts.append(f"<footer><p>hdar-pipeline {e(__version__)}</p></footer></body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


__all__ = [
    "COLUMNS",
    "DEFAULT_FOLDING_THRESHOLD",
    "MISSING_NAMES_WARNING",
    "NA",
    "QC_COLUMNS",
    "bids_ids",
    "data_dictionary",
    "merge_participants",
    "missing_label_names",
    "qc_flags",
    "read_group_table",
    "read_participants",
    "write_group_html",
    "write_group_table",
]
