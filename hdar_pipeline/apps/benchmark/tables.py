"""The benchmark's tables: the per-variant summary of the rows, every method against HDAR pair by pair, the
markdown report and the console tables, the machine they ran on.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from hdar_pipeline.core.provenance import machine_description

if TYPE_CHECKING:  # pragma: no cover (pandas is imported where tables are built: `hdar register`
    import pandas as pd  # never needs it, and it costs 0.15 s of start-up)

    from hdar_pipeline.apps.benchmark.runner import BenchmarkConfig, Variant


REFERENCE_VARIANT = "syn-quality"


SUMMARY_COLUMNS = [
    "variant", "method", "preset", "status", "n_pairs", "n_pairs_planned", "n_failed",
    "dice_mean", "dice_sd", "target_overlap_mean", "target_overlap_sd", "dice_before_mean",
    "folded_percent_mean", "folded_percent_max", "folded_percent_mask_mean", "folded_percent_mask_max",
    "std_log_jacobian_mean", "std_log_jacobian_sd",
    "runtime_s_median", "runtime_s_mean", "peak_memory_mb_max", "time_ratio_to_syn_quality",
    "time_ratio_to_syn_fast",
]


def rows_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """The rows as a table with at least ``columns`` (missing ones NaN)."""
    import pandas as pd

    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(columns))
    for col in columns:
        if col not in table:
            table[col] = np.nan
    return table


def failure_notes(rows: pd.DataFrame) -> list[str]:
    """One note per failed row: ``"<variant> <moving>-><fixed> failed: <error>"``."""
    return [f"{r.variant} {r.moving}->{r.fixed} failed: {r.error}" for r in rows[rows["status"] != "ok"].itertuples()]


def _tradeoff_figure(summary: pd.DataFrame, out_base: Path) -> dict[str, Path]:
    """``benchmark_dice_time.png``/``.svg``: mean Dice (SD bars) against median seconds per pair, one labelled point
    per variant with its pair count; ``{}`` when no variant has both."""
    import pandas as pd

    from hdar_pipeline.evaluation.figures import plot_tradeoff

    ok = summary[pd.to_numeric(summary["n_pairs"], errors="coerce").fillna(0) > 0]
    try:
        png, svg = plot_tradeoff(ok, out_base, title="Dice against time per pair")
    except ValueError:
        return {}
    return {"figure": png, "figure_svg": svg}


def wall_time_note(rows: pd.DataFrame, elapsed_s: float) -> str:
    """How long this run took, how many rows came from the cache and what the rows' registrations add up to."""
    import pandas as pd

    cached = rows["cached"].fillna(False).astype(bool) if "cached" in rows else pd.Series(False, index=rows.index)
    total = float(pd.to_numeric(rows.get("runtime_s"), errors="coerce").sum()) if len(rows) else 0.0
    return (f"this run took {elapsed_s / 60:.1f} min of wall time for {len(rows)} rows ({int(cached.sum())} from the "
            f"cache); the registrations of all rows add up to {total / 60:.1f} min (cached rows count their "
            "original runtime).")


def variant_rows(rows: pd.DataFrame, variant: str) -> tuple[pd.DataFrame, int]:
    """A variant's successful rows and its number of failed ones.

    Parameters
    ----------
    rows : DataFrame
        Result rows with ``variant`` and ``status`` (``"ok"`` for a success) columns.
    variant : str

    Returns
    -------
    (DataFrame, int)
    """
    ok = rows[rows["status"] == "ok"]
    return ok[ok["variant"] == variant], int(((rows["variant"] == variant) & (rows["status"] != "ok")).sum())


def summary_stat(values: pd.Series, how: str) -> float:
    """One statistic of a column over pairs, NaN where it is undefined.

    Parameters
    ----------
    values : Series
        The values (as floats; missing ones dropped).
    how : str
        A ``pandas.Series`` reduction: ``"mean"``, ``"std"``, ``"median"``, ``"max"``, ...

    Returns
    -------
    float
        NaN for no values, and for ``"std"`` of fewer than two.
    """
    s = values.astype(float).dropna()
    if s.empty or (how == "std" and len(s) < 2):
        return float("nan")
    return float(getattr(s, how)())


def variant_status(variant: str, n_ok: int, n_failed: int, unavailable: Mapping[str, str]) -> str:
    """A variant's status in the summary.

    Returns
    -------
    str
        ``"not run: <why>"`` (``variant`` in ``unavailable``), ``"failed"`` / ``"no pairs"`` (no success),
        ``"ok"`` or ``"ok (<n> failed)"``.
    """
    if variant in unavailable:
        return f"not run: {unavailable[variant]}"
    if not n_ok:
        return "failed" if n_failed else "no pairs"
    return "ok" if not n_failed else f"ok ({n_failed} failed)"


#: The variant every other is compared with pair by pair (:func:`paired_against`): the default HDAR.
PAIRED_REFERENCE = "hdar"


PAIRED_HEADER = ["method", "pairs", "Dice, method", f"Dice, {PAIRED_REFERENCE}", f"{PAIRED_REFERENCE} - method (mean)",
                 "(min to max)", f"{PAIRED_REFERENCE} higher", "Wilcoxon p", f"time {PAIRED_REFERENCE} / method"]


def paired_against(rows: pd.DataFrame, reference: str = PAIRED_REFERENCE) -> pd.DataFrame:
    """Every variant against ``reference`` over the pairs both registered (status ``ok``), pair by pair.

    Parameters
    ----------
    rows : DataFrame
        One row per variant x pair (``benchmark_pairs.csv``): ``variant``, ``moving``, ``fixed``, ``status``,
        ``mean_dice``, ``runtime_s``.
    reference : str
        The variant the others are compared with.

    Returns
    -------
    DataFrame
        One row per other variant with at least one pair in common: ``variant``, ``reference``, ``n_pairs``,
        ``mean_dice`` and ``mean_dice_reference`` (over the common pairs), ``mean_difference``,
        ``min_difference``, ``max_difference`` (``reference - variant`` mean Dice per pair), ``reference_higher``
        (pairs where the reference's Dice is higher), ``wilcoxon_p`` (two-sided signed-rank,
        :func:`hdar_pipeline.evaluation.stats.paired_test`; NaN below two pairs), ``time_ratio`` (median seconds per pair of
        the reference over the variant's, on the common pairs). Empty when ``reference`` has no ``ok`` row.
    """
    import pandas as pd

    from hdar_pipeline.evaluation.stats import paired_test

    columns = ["variant", "reference", "n_pairs", "mean_dice", "mean_dice_reference", "mean_difference",
               "min_difference", "max_difference", "reference_higher", "wilcoxon_p", "time_ratio"]
    ok = rows[rows["status"] == "ok"]
    ref = ok[ok["variant"] == reference].set_index(["moving", "fixed"])
    out = []
    if len(ref):
        for variant in dict.fromkeys(ok["variant"]):
            if variant == reference:
                continue
            other = ok[ok["variant"] == variant].set_index(["moving", "fixed"])
            common = ref.index.intersection(other.index)
            if not len(common):
                continue
            a = ref.loc[common, "mean_dice"].astype(float).to_numpy()
            b = other.loc[common, "mean_dice"].astype(float).to_numpy()
            diff = a - b
            test = paired_test(b, a)
            out.append({"variant": variant, "reference": reference, "n_pairs": len(common),
                        "mean_dice": float(b.mean()), "mean_dice_reference": float(a.mean()),
                        "mean_difference": float(diff.mean()), "min_difference": float(diff.min()),
                        "max_difference": float(diff.max()), "reference_higher": int((diff > 0).sum()),
                        "wilcoxon_p": test["wilcoxon_p"],
                        "time_ratio": float(ref.loc[common, "runtime_s"].astype(float).median()
                                            / other.loc[common, "runtime_s"].astype(float).median())})
    return pd.DataFrame(out, columns=columns)


def paired_table_rows(paired: pd.DataFrame) -> list[list[str]]:
    """:data:`PAIRED_HEADER` cells for each row of :func:`paired_against`."""
    cells = []
    for r in paired.itertuples():
        p = f"{r.wilcoxon_p:.2g}" if math.isfinite(r.wilcoxon_p) else ""
        cells.append([r.variant, str(r.n_pairs), f"{r.mean_dice:.3f}", f"{r.mean_dice_reference:.3f}",
                      f"{r.mean_difference:+.4f}", f"{r.min_difference:+.3f} to {r.max_difference:+.3f}",
                      f"{r.reference_higher} of {r.n_pairs}", p, f"{r.time_ratio:.3g}"])
    return cells


def summarise(rows: pd.DataFrame, variants: Sequence[Variant], planned: Mapping[str, int],
              unavailable: Mapping[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per variant (columns :data:`SUMMARY_COLUMNS`) and the notes it adds."""
    import pandas as pd

    notes: list[str] = []
    ok = rows[rows["status"] == "ok"]
    ref = ok[ok["variant"] == REFERENCE_VARIANT]["runtime_s"].astype(float)
    ref_median = float(ref.median()) if len(ref) else float("nan")
    if not len(ref):
        notes.append("time_ratio_to_syn_quality is NaN: syn-quality did not run in this benchmark "
                     "(add it to --variants to get the ratios).")
    else:
        notes.append(f"time_ratio_to_syn_quality: median seconds per pair over syn-quality's median "
                     f"({ref_median:.1f} s, on {len(ref)} pair{'s' if len(ref) != 1 else ''}).")
    fast = ok[ok["variant"] == "syn-fast"]["runtime_s"].astype(float)
    fast_median = float(fast.median()) if len(fast) else float("nan")
    if len(fast):
        notes.append(f"time_ratio_to_syn_fast: median seconds per pair over syn-fast's median ({fast_median:.1f} s), "
                     "measured in this run.")
    out = []
    for v in variants:
        sub, n_failed = variant_rows(rows, v.name)

        def stat(name: str, how: str) -> float:
            return summary_stat(sub[name], how)

        status = variant_status(v.name, len(sub), n_failed, unavailable)
        runtime = stat("runtime_s", "median")
        out.append({
            "variant": v.name, "method": v.method, "preset": v.preset or "", "status": status,
            "n_pairs": int(len(sub)), "n_pairs_planned": int(planned.get(v.name, 0)), "n_failed": n_failed,
            "dice_mean": stat("mean_dice", "mean"), "dice_sd": stat("mean_dice", "std"),
            "target_overlap_mean": stat("mean_target_overlap", "mean"),
            "target_overlap_sd": stat("mean_target_overlap", "std"),
            "dice_before_mean": stat("mean_dice_before", "mean"),
            "folded_percent_mean": stat("folded_percent", "mean"), "folded_percent_max": stat("folded_percent", "max"),
            "folded_percent_mask_mean": stat("folded_percent_mask", "mean"),
            "folded_percent_mask_max": stat("folded_percent_mask", "max"),
            "std_log_jacobian_mean": stat("std_log_jacobian", "mean"),
            "std_log_jacobian_sd": stat("std_log_jacobian", "std"),
            "runtime_s_median": runtime, "runtime_s_mean": stat("runtime_s", "mean"),
            "peak_memory_mb_max": stat("peak_memory_mb", "max"),
            "time_ratio_to_syn_quality": runtime / ref_median if len(ref) and ref_median > 0 else float("nan"),
            "time_ratio_to_syn_fast": runtime / fast_median if len(fast) and fast_median > 0 else float("nan"),
        })
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS), notes


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_mean_sd(mean: float | None, sd: float, digits: int = 3) -> str:
    """``"mean ± sd"`` with ``digits`` decimals; ``"mean"`` alone when sd is NaN, ``"–"`` without a mean."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if not math.isnan(sd) else f"{mean:.{digits}f}"


TABLE_HEADER = ["method", "pairs", "Dice (mean ± sd)", "target overlap (mean ± sd)", "% folded (brain)",
                "% folded (grid)", "std log\\|J\\|", "s / pair (median)", "time / SyN fast", "time / SyN quality",
                "peak MiB"]


def table_rows(summary: pd.DataFrame, n_pairs: int) -> list[list[str]]:
    """The summary as table cells (strings), one list per variant."""
    out = []
    for r in summary.itertuples():
        if str(r.status).startswith("not run"):  # the short reason here; the whole one is in the notes
            why = str(r.status).split(";")[0]
            out.append([r.variant, "0", why if len(why) <= 90 else why[:87] + "...", "", "", "", "", "", "", "", ""])
            continue
        pairs = str(r.n_pairs) if r.n_pairs == n_pairs else f"{r.n_pairs} of {n_pairs}"
        if r.n_failed:
            pairs += f" ({r.n_failed} failed)"
        ratio, fast_ratio = r.time_ratio_to_syn_quality, r.time_ratio_to_syn_fast
        out.append([r.variant, pairs, format_mean_sd(r.dice_mean, r.dice_sd),
                    format_mean_sd(r.target_overlap_mean, r.target_overlap_sd),
                    _fmt(r.folded_percent_mask_mean, 4), _fmt(r.folded_percent_mean, 4), _fmt(r.std_log_jacobian_mean),
                    _fmt(r.runtime_s_median, 1), "–" if math.isnan(fast_ratio) else f"{fast_ratio:.3g}",
                    "–" if math.isnan(ratio) else f"{ratio:.3g}", _fmt(r.peak_memory_mb_max, 0)])
    return out


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], left_columns: int = 1) -> list[str]:
    """A markdown table's lines: the header, the alignment row (the first ``left_columns`` columns
    left-aligned, the others right-aligned) and one line per row (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] * left_columns + ["---:"] * (len(header) - left_columns)) + " |"]
    for cells in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def report_sections(device: str | None, command: str, notes: Sequence[str]) -> list[str]:
    """The closing sections of a markdown report: ``## Machine`` (:func:`hdar_pipeline.core.provenance.machine_description`),
    ``## Command`` (``command``, or "(Python API)") and ``## Notes`` (when there are notes)."""
    lines = ["", "## Machine", ""] + [f"- {s}" for s in machine_description(device)]
    lines += ["", "## Command", "", "```", command or "(Python API)", "```"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return lines


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]], console=None, title: str = "",
                left_columns: int = 1) -> None:
    """A table on the console (rich): the first ``left_columns`` columns left-justified, the others right.

    Parameters
    ----------
    header : sequence of str
        Column names (markdown-escaped ``\\|`` shown as ``|``).
    rows : iterable of sequences of str
    console : rich.console.Console, optional
        Default: a new console on stdout (160 columns when it is not a terminal).
    title : str
    left_columns : int
    """
    from rich.table import Table

    console = run_console(console)
    table = Table(title=title or None, title_justify="left")
    for i, col in enumerate(header):
        table.add_column(col.replace("\\|", "|"), justify="left" if i < left_columns else "right")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)


def markdown_report(summary: pd.DataFrame, config: BenchmarkConfig, notes: Sequence[str], *, n_pairs: int,
                    paired: pd.DataFrame | None = None) -> str:
    names = ", ".join(p.name for p in config.pairs)
    lines = ["# Method comparison", "",
             f"{config.dataset or 'dataset'}: {n_pairs} pair{'s' if n_pairs != 1 else ''} (moving->fixed: {names}); "
             f"{'affine stage before each deformable method' if config.affine else 'no affine stage (images already aligned)'}; "
             f"threads {config.threads if config.threads else 'library default'}, seed {config.seed}, "
             f"device {config.device}. Dice and target overlap: mean over the fixed image's labels per pair, "
             "then mean ± sd over pairs; % folded: voxels with det J <= 0, of the fixed image's brain "
             "(voxels above its background) and of the whole grid; seconds: registration only.", "",
             *markdown_table(TABLE_HEADER, table_rows(summary, n_pairs))]
    if paired is not None and len(paired):
        ref = paired["reference"].iloc[0]
        lines += ["", f"## Against {ref}, pair by pair", "",
                  f"Each method against {ref} on the pairs both registered: mean Dice of each over those pairs, "
                  f"{ref}'s minus the method's per pair (mean, range), the pairs where {ref} is higher, a two-sided "
                  f"Wilcoxon signed-rank test, and {ref}'s median seconds per pair over the method's.", "",
                  *markdown_table(PAIRED_HEADER, paired_table_rows(paired))]
    lines += report_sections(config.device, config.command, notes)
    return "\n".join(lines) + "\n"


def print_summary(summary: pd.DataFrame, n_pairs: int, console=None, title: str = "") -> None:
    """The summary table on the console (rich)."""
    print_table(TABLE_HEADER, table_rows(summary, n_pairs), console, title)


def run_console(console=None, width: int = 160):
    """``console``, else a new rich console on stdout (``width`` columns when stdout is not a terminal).

    Parameters
    ----------
    console : rich.console.Console, optional
    width : int

    Returns
    -------
    rich.console.Console
    """
    if console is not None:
        return console
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=width)
