"""Figures for evaluations and group statistics (matplotlib, Agg canvas, PNG and SVG).

Every function draws on its own :class:`matplotlib.figure.Figure` (no pyplot state, so it is safe in
workers and never opens a window) and writes ``<out_base>.png`` and ``<out_base>.svg``; it returns the
two paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

PathLike = str | os.PathLike

#: Human-readable axis titles.
METRIC_TITLES = {
    "dice": "Dice", "jaccard": "Jaccard", "target_overlap": "Target overlap", "mean_overlap": "Mean overlap",
    "false_negative": "False negative error", "false_positive": "False positive error",
    "volume_similarity": "Volume similarity", "hd95_mm": "HD95 (mm)", "msd_mm": "Mean surface distance (mm)",
    "hd_mm": "Hausdorff distance (mm)", "runtime_s": "Runtime per pair (s)",
}


def _title(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric)


def save_figure(fig: Figure, out_base: PathLike, dpi: int = 120) -> list[Path]:
    """Write ``fig`` to ``<out_base>.png`` and ``<out_base>.svg`` (parent folders created)."""
    base = Path(out_base)
    if base.suffix.lower() in (".png", ".svg"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    paths = [base.with_name(base.name + ".png"), base.with_name(base.name + ".svg")]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def method_colors(methods: Sequence[str]) -> dict[str, tuple]:
    """A stable colour per method, in the given order: matplotlib's tab10, or tab20 for more than ten methods (so
    no two share a colour up to twenty)."""
    from matplotlib import colormaps

    n = 10 if len(methods) <= 10 else 20
    cmap = colormaps[f"tab{n}"]
    return {m: cmap(i % n) for i, m in enumerate(methods)}


def _ordered_methods(values: pd.Series, methods: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(values.astype(str)))
    if methods is None:
        return present
    return [m for m in methods if m in present] + [m for m in present if m not in methods]


def plot_label_boxplots(
    table: pd.DataFrame,
    out_base: PathLike,
    *,
    metric: str = "dice",
    methods: Sequence[str] | None = None,
    labels_per_row: int = 28,
    title: str | None = None,
) -> list[Path]:
    """Per-label box plots of ``metric`` across subjects, one box per method (as in Huang et al. 2021).

    Parameters
    ----------
    table : pandas.DataFrame
        Tidy per-label rows with columns ``label``, ``method``, ``metric`` and optionally ``name``.
    out_base : path-like
        Output path without suffix.
    metric : str
        Column to plot.
    methods : sequence of str, optional
        Method order (others follow in order of appearance).
    labels_per_row : int
        Labels per panel; more labels are wrapped onto further panels.
    """
    data = table[table["label"].notna() & table[metric].notna()].copy()
    if data.empty:
        raise ValueError(f"no finite values of {metric!r} to plot")
    order = _ordered_methods(data["method"], methods)
    colors = method_colors(order)
    labels = sorted(data["label"].unique().tolist())
    names = {}
    if "name" in data:
        for lab, name in data.groupby("label")["name"].first().items():
            if isinstance(name, str) and name:
                names[lab] = name
    n_rows = -(-len(labels) // labels_per_row)
    per_row = -(-len(labels) // n_rows)  # balanced panels
    chunks = [labels[i:i + per_row] for i in range(0, len(labels), per_row)]
    width = max(6.0, 0.12 * len(order) * per_row + 2.5)
    fig = Figure(figsize=(width, 3.6 * len(chunks) + 0.6))
    axes = fig.subplots(len(chunks), 1, squeeze=False, sharey=True)[:, 0]
    step = len(order) + 1
    grouped = {key: g[metric].to_numpy(dtype=float) for key, g in data.groupby(["label", "method"])}
    for ax, chunk in zip(axes, chunks):
        for m_i, method in enumerate(order):
            boxes = [grouped.get((lab, method), np.empty(0)) for lab in chunk]
            positions = [c * step + m_i for c in range(len(chunk))]
            keep = [i for i, b in enumerate(boxes) if b.size]
            if not keep:
                continue
            bp = ax.boxplot([boxes[i] for i in keep], positions=[positions[i] for i in keep], widths=0.8,
                            patch_artist=True, showfliers=True, manage_ticks=False,
                            flierprops={"markersize": 2, "markeredgecolor": colors[method]},
                            medianprops={"color": "black", "linewidth": 0.8})
            for patch in bp["boxes"]:
                patch.set_facecolor(colors[method])
                patch.set_alpha(0.85)
        ax.set_xticks([c * step + (len(order) - 1) / 2 for c in range(len(chunk))])
        ax.set_xticklabels([names.get(lab, str(int(lab)) if float(lab).is_integer() else str(lab)) for lab in chunk],
                           rotation=90, fontsize=7)
        ax.set_xlim(-1, per_row * step - 1)
        ax.set_ylabel(_title(metric))
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    axes[0].legend(handles=[Patch(facecolor=colors[m], label=m) for m in order], ncol=len(order),
                   loc="best", fontsize=8, frameon=True)
    axes[0].set_title(title or f"{_title(metric)} per label")
    fig.tight_layout()
    return save_figure(fig, out_base)


def plot_method_boxplot(
    subjects: pd.DataFrame,
    out_base: PathLike,
    *,
    metric: str = "dice",
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Box plot of a whole-brain metric (one value per subject, e.g. mean Dice over labels) by method."""
    data = subjects[subjects[metric].notna()]
    if data.empty:
        raise ValueError(f"no finite values of {metric!r} to plot")
    order = _ordered_methods(data["method"], methods)
    colors = method_colors(order)
    fig = Figure(figsize=(max(3.5, 1.1 * len(order) + 1.5), 4.0))
    ax = fig.subplots()
    values = [data.loc[data["method"] == m, metric].to_numpy(dtype=float) for m in order]
    bp = ax.boxplot(values, patch_artist=True, medianprops={"color": "black"})
    for patch, m in zip(bp["boxes"], order):
        patch.set_facecolor(colors[m])
        patch.set_alpha(0.85)
    rng = np.random.default_rng(0)
    for i, v in enumerate(values, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=10, color="black", zorder=3)
    ax.set_xticks(range(1, len(order) + 1))
    ax.set_xticklabels(order, rotation=30)
    ax.set_ylabel(f"{_title(metric)} (mean over labels)" if metric in METRIC_TITLES else metric)
    ax.set_title(title or f"Whole-brain {_title(metric)} by method")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_base)


def plot_metric_vs_runtime(
    subjects: pd.DataFrame,
    out_base: PathLike,
    *,
    metric: str = "dice",
    runtime: str = "runtime_s",
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Whole-brain ``metric`` against runtime per method: subjects as dots, method means with SD bars.

    The runtime axis is logarithmic when runtimes span more than a factor of 20.
    """
    data = subjects[subjects[metric].notna() & subjects[runtime].notna()]
    if data.empty:
        raise ValueError(f"no subjects with both {metric!r} and {runtime!r}")
    order = _ordered_methods(data["method"], methods)
    colors = method_colors(order)
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    for m in order:
        g = data[data["method"] == m]
        x, y = g[runtime].to_numpy(dtype=float), g[metric].to_numpy(dtype=float)
        ax.scatter(x, y, s=12, alpha=0.45, color=colors[m])
        ax.errorbar(x.mean(), y.mean(), xerr=x.std(ddof=1) if x.size > 1 else None,
                    yerr=y.std(ddof=1) if y.size > 1 else None, fmt="o", markersize=8, color=colors[m],
                    markeredgecolor="black", capsize=3, label=f"{m} (n={len(g)})")
    positive = data[runtime][data[runtime] > 0]
    if positive.size and positive.max() / positive.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel(_title(runtime))
    ax.set_ylabel(f"{_title(metric)} (mean over labels)")
    ax.set_title(title or f"{_title(metric)} vs runtime")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_base)


def plot_tradeoff(
    summary: pd.DataFrame,
    out_base: PathLike,
    *,
    label: str = "variant",
    metric: str = "dice_mean",
    spread: str | None = "dice_sd",
    runtime: str = "runtime_s_median",
    count: str | None = "n_pairs",
    title: str | None = None,
) -> list[Path]:
    """Accuracy against time, one labelled point per method (a benchmark's summary table).

    Parameters
    ----------
    summary : DataFrame
        One row per method: ``label`` (its name), ``metric`` (e.g. mean Dice over pairs), ``spread`` (its SD,
        drawn as a vertical bar; ``None``: no bar), ``runtime`` (seconds per pair, > 0) and ``count`` (pairs, shown
        beside the name; ``None``: not shown). Rows without a positive runtime or a metric are left out.
    out_base : path-like
        ``<out_base>.png`` and ``<out_base>.svg`` are written.

    Returns
    -------
    list of Path
        The PNG and SVG paths.

    Notes
    -----
    The time axis is logarithmic (methods here span seconds to tens of minutes per pair).
    """
    rt = pd.to_numeric(summary[runtime], errors="coerce")
    y = pd.to_numeric(summary[metric], errors="coerce")
    data = summary[(rt > 0) & y.notna()]
    if data.empty:
        raise ValueError(f"no rows with both {metric!r} and a positive {runtime!r}")
    names = [str(v) for v in data[label]]
    colors = method_colors(names)
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.subplots()
    points = []
    for name, (_, row) in zip(names, data.iterrows()):
        x, v = float(row[runtime]), float(row[metric])
        err = float(row[spread]) if spread is not None and pd.notna(row.get(spread)) else None
        ax.errorbar(x, v, yerr=err, fmt="o", markersize=7, color=colors[name], markeredgecolor="black",
                    capsize=3)
        text = name + (f" ({int(row[count])})" if count is not None and pd.notna(row.get(count)) else "")
        points.append((name, text, x, v))
    ax.set_xscale("log")
    ax.set_xlabel("seconds per pair (median, log scale)")
    ax.set_ylabel(_title(metric.removesuffix("_mean")) + " (mean over pairs)")
    ax.set_title(title or f"{_title(metric.removesuffix('_mean'))} against time")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _place_labels(ax, points, colors)  # after the layout: the names are placed where the points are drawn
    return save_figure(fig, out_base)


def _place_labels(ax, points, colors) -> list:
    """Name each point to its right, highest first; a name that would overlap one already placed moves down a line
    at a time, up to eleven lines (drawn in its point's colour, so that it still reads as that point's); returns
    the names' boxes (display units)."""
    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    placed = []
    for name, text, x, v in sorted(points, key=lambda p: -p[3]):
        for line in range(12):
            note = ax.annotate(text, (x, v), xytext=(6, 3 - 9 * line), textcoords="offset points", fontsize=7,
                               color=colors[name] if line else "black")
            box = note.get_window_extent(renderer)
            if line == 11 or not any(box.overlaps(other) for other in placed):
                break  # the last line is kept even if crowded: a name is never dropped
            note.remove()
        placed.append(box)
    return placed


def plot_jacobian_slices(
    jacobian: np.ndarray,
    out_base: PathLike,
    *,
    mask: np.ndarray | None = None,
    grid=None,
    index: Sequence[int] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Three orthogonal slices of a Jacobian determinant map, folds (``det J <= 0``) in green.

    Parameters
    ----------
    jacobian : ndarray, shape (X, Y, Z)
        Jacobian determinant per voxel.
    out_base : path-like
        Output path without suffix.
    mask : ndarray of bool, optional
        Slices pass through the centre of the mask (otherwise the volume's centre); outside the mask is
        drawn faded.
    grid : Grid, optional
        For the voxel aspect ratio (spacing).
    index : sequence of 3 int, optional
        Slice indices along the three axes.
    """
    jac = np.asarray(jacobian, dtype=np.float32)
    if jac.ndim != 3:
        raise ValueError(f"expected a 3-D Jacobian map, got shape {jac.shape}")
    if index is None:
        if mask is not None and np.any(mask):
            index = [int(round(float(np.mean(ax)))) for ax in np.nonzero(mask)]
        else:
            index = [n // 2 for n in jac.shape]
    spacing = np.asarray(grid.spacing if grid is not None else (1.0, 1.0, 1.0), dtype=float)
    finite = jac[np.isfinite(jac)]
    vmax = float(max(2.0, np.percentile(finite, 99.5))) if finite.size else 2.0
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    image = None
    names = ("i", "j", "k")
    for axis, ax in enumerate(axes):
        sl = [slice(None)] * 3
        sl[axis] = int(np.clip(index[axis], 0, jac.shape[axis] - 1))
        plane = jac[tuple(sl)]
        other = [a for a in range(3) if a != axis]
        image = ax.imshow(plane.T, origin="lower", cmap="RdBu_r", norm=norm,
                          aspect=spacing[other[1]] / spacing[other[0]], interpolation="nearest")
        if mask is not None:
            outside = ~np.asarray(mask, dtype=bool)[tuple(sl)]
            ax.imshow(np.ma.masked_where(~outside.T, np.ones_like(plane.T)), origin="lower", cmap="gray",
                      vmin=0, vmax=1, alpha=0.5, aspect=spacing[other[1]] / spacing[other[0]],
                      interpolation="nearest")
        folds = plane <= 0
        if folds.any():
            ax.imshow(np.ma.masked_where(~folds.T, np.ones_like(plane.T)), origin="lower",
                      cmap=ListedColormap(["#00d000"]), vmin=0, vmax=1, aspect=spacing[other[1]] / spacing[other[0]], interpolation="nearest")
        ax.set_title(f"{names[axis]} = {sl[axis]}  ({int(folds.sum())} folded voxels)", fontsize=9)
        ax.set_xlabel(names[other[0]])
        ax.set_ylabel(names[other[1]])
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="det J")
    folded = 100.0 * float(np.mean(jac <= 0))
    fig.suptitle(title or f"Jacobian determinant (folded {folded:.4f} % of voxels, green)")
    return save_figure(fig, out_base)
