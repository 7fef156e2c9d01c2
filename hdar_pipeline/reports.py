"""Quality-control reports: a per-subject HTML page and the methods paragraph ("boilerplate").

Per-subject report
------------------
:func:`write_subject_report` writes one self-contained HTML page (plain HTML and inline CSS, no
JavaScript, no network resources) in the manner of fMRIPrep's reports. For each method that ran it
shows

* **label contours**: the subject's T1w warped onto the atlas grid, in three orthogonal slices through
  the centre of the atlas labels (or brain), with the atlas label boundaries drawn over it. After a
  good registration the contours follow the subject's anatomy;
* **the Jacobian determinant** ``det J`` of the transform on the same slices (blue: local shrinkage
  ``det J < 1``, red: expansion ``det J > 1``, white: ``det J = 1``; folded voxels, ``det J <= 0``, in
  green);
* a table of the method's metrics, runtime, peak memory, device and preset.

Methods that failed get a red box with their error message and no figures. Figures are PNG files
written beside the page (``<out_html parent>/sub-<label>/figures/`` by default) and linked with
relative paths, so the output folder can be moved or archived as a whole::

    sub-<label>[_ses-<label>]_space-<atlas>_desc-<method>_contours.png
    sub-<label>[_ses-<label>]_space-<atlas>_desc-<method>_jacobian.png

Methods paragraph
-----------------
:func:`methods_paragraph` turns what actually ran (methods, their parameters, preprocessing, seed,
versions, weights) into a Markdown paragraph with a reference list, for users to paste into a
manuscript; :func:`write_methods` writes it as ``CITATION.md`` and ``CITATION.html``. Only what is
given is described: a parameter that is not passed in is not mentioned, never guessed.

This module imports no workflow engine; figures are drawn on the Agg canvas (no display needed).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
import re
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from scipy import ndimage

from ._version import __version__
from .images import Grid, load_image

PathLike = str | os.PathLike

__all__ = ["ReportEntry", "write_subject_report", "methods_paragraph", "write_methods", "REFERENCES"]

#: Resolution of the report figures (dots per inch).
FIGURE_DPI = 100

#: Display names of the methods this package knows.
METHOD_TITLES = {"hdar": "HDAR", "syn": "ANTs SyN", "demons": "Diffeomorphic Demons", "affine": "Affine (ANTs)"}

#: Display names and units of whole-brain metrics (unknown keys are shown as they are).
METRIC_LABELS = {
    "mean_dice": "Mean Dice",
    "mean_target_overlap": "Mean target overlap",
    "mean_jaccard": "Mean Jaccard",
    "mean_hd95_mm": "Mean HD95 (mm)",
    "mean_msd_mm": "Mean surface distance (mm)",
    "folded_percent": "Folded voxels (%)",
    "folded_voxels": "Folded voxels",
    "log_jacobian_std": "SD of log|J|",
    "jacobian_min": "Minimum det J",
    "jacobian_max": "Maximum det J",
}


# ============================================================================ per-subject report


@dataclass
class ReportEntry:
    """One method's result for one subject, as shown in :func:`write_subject_report`.

    Attributes
    ----------
    method : str
        ``"hdar"``, ``"syn"``, ``"demons"``, ``"affine"`` (any name is accepted).
    status : str
        ``"ok"`` or ``"error"``.
    error : str
        The error message when ``status == "error"``.
    preset : str
        The method's preset, if any.
    warped : path-like, optional
        The subject's T1w warped onto the atlas grid (NIfTI).
    transform : path-like, optional
        ITK composite ``.h5`` (or any file list :meth:`Transform.read` accepts), mapping atlas points to
        subject points; used for the Jacobian determinant.
    jacobian : path-like, optional
        A precomputed Jacobian-determinant NIfTI on the atlas grid; used instead of ``transform``.
    metrics : mapping of str to float
        Whole-brain summary (``mean_dice``, ``mean_target_overlap``, ``mean_hd95_mm``, ``folded_percent``,
        ``log_jacobian_std``, ...); any subset; NaN or None allowed.
    runtime_s : float, optional
        Registration runtime in seconds.
    peak_memory_mb : float, optional
        Peak memory in MiB.
    device : str
        Where it ran (``"cpu"``, ``"cuda:0"``, ...).
    """

    method: str
    status: str = "ok"
    error: str = ""
    preset: str = ""
    warped: PathLike | None = None
    transform: PathLike | None = None
    jacobian: PathLike | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    runtime_s: float | None = None
    peak_memory_mb: float | None = None
    device: str = ""


@dataclass
class _View:
    """Three orthogonal display planes of volumes on the atlas grid, in RAS+ orientation."""

    ornt: np.ndarray       # nibabel orientation: atlas voxel axes -> RAS-ordered axes
    spacing: np.ndarray    # mm, along the RAS-ordered axes
    index: tuple[int, int, int]  # slice indices in the RAS-ordered array
    world: np.ndarray      # RAS mm of the slice centre

    def reorient(self, data: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(np.asarray(data), self.ornt)

    def planes(self, data_ras: np.ndarray) -> list[np.ndarray]:
        """Sagittal, coronal and axial slices, each transposed for ``imshow(origin="lower")``."""
        i, j, k = self.index
        return [data_ras[i, :, :].T, data_ras[:, j, :].T, data_ras[:, :, k].T]

    def aspects(self) -> list[float]:
        sx, sy, sz = self.spacing
        return [sz / sy, sz / sx, sy / sx]

    def titles(self) -> list[str]:
        x, y, z = self.world
        return [f"sagittal, x = {x:.1f} mm", f"coronal, y = {y:.1f} mm", f"axial, z = {z:.1f} mm"]


_PLANE_SIDES = [("P", "A"), ("L", "R"), ("L", "R")]


def _make_view(grid: Grid, mask: np.ndarray) -> _View:
    ornt = nib.orientations.io_orientation(grid.affine)
    spacing_in = grid.spacing
    spacing = np.empty(3)
    if np.any(mask):
        idx = np.array([float(np.mean(ax)) for ax in np.nonzero(mask)])
    else:
        idx = (np.asarray(grid.shape, dtype=float) - 1) / 2
    idx = np.rint(idx).astype(int)
    new = [0, 0, 0]
    for ax in range(3):
        out_ax, flip = int(ornt[ax, 0]), int(ornt[ax, 1])
        spacing[out_ax] = spacing_in[ax]
        new[out_ax] = int(idx[ax]) if flip == 1 else grid.shape[ax] - 1 - int(idx[ax])
    world = (grid.affine @ np.append(idx, 1.0))[:3]
    return _View(ornt, spacing, tuple(new), world)


def _label_colors(values: np.ndarray) -> dict[int, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {int(v): cmap(int(v) % 20) for v in values}


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def _draw_boundaries(ax, plane_labels: np.ndarray | None, plane_atlas: np.ndarray, edge_levels: list[float],
                     colors: dict[int, tuple], linewidth: float = 0.7) -> int:
    """Atlas label boundaries (or intensity edges) as contour lines; returns the number of labels drawn."""
    drawn = 0
    if plane_labels is not None:
        for value in np.unique(plane_labels):
            if value == 0:
                continue
            m = (plane_labels == value).astype(np.float32)
            if m.sum() < 2:
                continue
            ax.contour(m, levels=[0.5], colors=[colors.get(int(value), (1, 0, 0, 1))], linewidths=linewidth)
            drawn += 1
    else:
        levels = [lv for lv in edge_levels if plane_atlas.min() < lv < plane_atlas.max()]
        if levels:
            ax.contour(plane_atlas, levels=levels, colors=["#ff3030", "#30c0ff"][: len(levels)],
                       linewidths=linewidth)
    return drawn


def _save_png(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=FIGURE_DPI, facecolor=fig.get_facecolor())
    return path


def _contour_figure(warped: np.ndarray, atlas: np.ndarray, labels: np.ndarray | None, view: _View,
                    brain: np.ndarray, title: str, out_png: Path) -> Path:
    vol = view.reorient(warped)
    atl = view.reorient(atlas)
    lab = view.reorient(labels) if labels is not None else None
    inside = warped[brain] if np.any(brain) else warped.ravel()
    inside = inside[np.isfinite(inside)]
    vmin, vmax = (np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0))
    if not vmax > vmin:
        vmin, vmax = float(np.min(warped)), float(np.max(warped)) + 1e-6
    edge_levels: list[float] = []
    if lab is None:
        atlas_in = atlas[brain] if np.any(brain) else atlas.ravel()
        if atlas_in.size:
            low = float(np.percentile(atlas_in, 1)) if np.any(brain) else _otsu(atlas.ravel())
            edge_levels = [max(low, 1e-6), _otsu(atlas_in)]
    colors = _label_colors(np.unique(lab) if lab is not None else np.empty(0))
    fig = Figure(figsize=(11, 4.0), facecolor="black", layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, plane, plane_atl, plane_lab, aspect, sub, sides in zip(
            axes, view.planes(vol), view.planes(atl), view.planes(lab) if lab is not None else [None] * 3,
            view.aspects(), view.titles(), _PLANE_SIDES):
        ax.imshow(plane, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        _draw_boundaries(ax, plane_lab, plane_atl, edge_levels, colors)
        ax.set_title(sub, color="white", fontsize=9)
        ax.text(0.01, 0.5, sides[0], color="yellow", transform=ax.transAxes, fontsize=8, va="center")
        ax.text(0.99, 0.5, sides[1], color="yellow", transform=ax.transAxes, fontsize=8, va="center", ha="right")
        ax.set_axis_off()
    fig.suptitle(title, color="white", fontsize=10)
    return _save_png(fig, out_png)


@dataclass
class _JacobianSummary:
    voxels: int
    folded: int
    folded_brain: int
    brain_voxels: int
    minimum: float
    maximum: float
    log_std_brain: float

    @property
    def folded_percent(self) -> float:
        return 100.0 * self.folded / self.voxels if self.voxels else float("nan")

    @property
    def folded_brain_percent(self) -> float:
        return 100.0 * self.folded_brain / self.brain_voxels if self.brain_voxels else float("nan")


def _summarise_jacobian(jac: np.ndarray, brain: np.ndarray) -> _JacobianSummary:
    finite = np.isfinite(jac)
    folded = (jac <= 0) & finite
    inside = jac[brain & finite]
    positive = inside[inside > 0]
    return _JacobianSummary(
        voxels=int(finite.sum()), folded=int(folded.sum()), folded_brain=int((folded & brain).sum()),
        brain_voxels=int((brain & finite).sum()),
        minimum=float(np.min(jac[finite])) if finite.any() else float("nan"),
        maximum=float(np.max(jac[finite])) if finite.any() else float("nan"),
        log_std_brain=float(np.std(np.log(positive))) if positive.size > 1 else float("nan"))


def _jacobian_figure(jac: np.ndarray, view: _View, brain: np.ndarray,
                     summary: _JacobianSummary, title: str, out_png: Path) -> Path:
    vol = view.reorient(jac)
    outline = view.reorient(brain.astype(np.float32))
    finite = jac[np.isfinite(jac) & brain] if np.any(brain) else jac[np.isfinite(jac)]
    spread = float(np.percentile(np.abs(finite - 1.0), 99.5)) if finite.size else 0.5
    spread = min(max(spread, 0.25), 0.999)
    norm = TwoSlopeNorm(vmin=1.0 - spread, vcenter=1.0, vmax=1.0 + spread)
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    axes = fig.subplots(1, 3)
    image = None
    for ax, plane, plane_mask, aspect, sub, sides in zip(axes, view.planes(vol), view.planes(outline),
                                                         view.aspects(), view.titles(), _PLANE_SIDES):
        image = ax.imshow(plane, origin="lower", cmap="RdBu_r", norm=norm, aspect=aspect, interpolation="nearest")
        if plane_mask.max() > 0:
            ax.contour(plane_mask, levels=[0.5], colors=["0.25"], linewidths=0.6)
        folds = plane <= 0
        if folds.any():
            ax.imshow(np.ma.masked_where(~folds, np.ones_like(plane)), origin="lower",
                      cmap=ListedColormap(["#00d000"]), vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        ax.set_title(f"{sub} ({int(folds.sum())} folded)", fontsize=9)
        ax.text(0.01, 0.5, sides[0], transform=ax.transAxes, fontsize=8, va="center")
        ax.text(0.99, 0.5, sides[1], transform=ax.transAxes, fontsize=8, va="center", ha="right")
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="det J (blue < 1 < red)", extend="both")
    fig.suptitle(f"{title}: {summary.folded} folded voxels ({summary.folded_percent:.4g} %, green), "
                 f"det J in [{summary.minimum:.3g}, {summary.maximum:.3g}]", fontsize=10)
    return _save_png(fig, out_png)


def _bids_label(text: str, prefix: str = "") -> str:
    text = str(text)
    if prefix and text.startswith(prefix + "-"):
        text = text[len(prefix) + 1:]
    cleaned = re.sub(r"[^A-Za-z0-9]", "", text)
    return cleaned or "unknown"


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bool, np.bool_)):
        return False
    try:
        return bool(np.isnan(float(value)))
    except (TypeError, ValueError):
        return False


def _fmt(value: Any, digits: int = 4) -> str:
    """A number written for people: n/a for missing, thousands separators, 4 significant digits."""
    if _is_missing(value):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1e-3:
            return f"{v:.{digits}g}"
        return f"{v:.2e}"
    return str(value)


def _fmt_runtime(seconds: Any) -> str:
    if _is_missing(seconds):
        return "n/a"
    s = float(seconds)
    if s >= 120:
        return f"{s:,.0f} s ({s / 60:.1f} min)"
    return f"{s:.3g} s" if s < 10 else f"{s:.1f} s"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _href(target: Path, base: Path) -> str:
    rel = os.path.relpath(target, base)
    return urllib.parse.quote(Path(rel).as_posix(), safe="/")


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1em 2em 3em; color: #222; line-height: 1.45; }
h1 { border-bottom: 3px solid #3465a4; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .7em; text-align: left; }
th { background: #eef2f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: bold; }
.failed { color: #b00020; font-weight: bold; }
.error { border: 2px solid #b00020; background: #fdecee; padding: .6em 1em; border-radius: 4px; }
.error pre { white-space: pre-wrap; margin: .3em 0 0; }
.warning { border: 1px solid #c98a00; background: #fff6dd; padding: .4em 1em; border-radius: 4px; }
.note { color: #555; font-size: .92em; }
figure { margin: .8em 0 1.4em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: .92em; margin-top: .3em; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .4em; border-radius: 2px; }
footer { margin-top: 3em; color: #666; font-size: .85em; border-top: 1px solid #ccc; }
"""


def _method_title(method: str) -> str:
    return METHOD_TITLES.get(method.lower(), method)


def _load_warped(path: PathLike, grid: Grid) -> np.ndarray:
    img = load_image(path)
    if not Grid.of(img).same_as(grid, atol=1e-3):
        raise ValueError(f"{path}: the warped image is not on the atlas grid (shape {img.shape}, atlas "
                         f"{grid.shape}); the report shows images in atlas space")
    return np.asarray(img.dataobj, dtype=np.float32)


def _load_jacobian(entry: ReportEntry, atlas_img: nib.Nifti1Image) -> np.ndarray | None:
    grid = Grid.of(atlas_img)
    if entry.jacobian is not None:
        img = nib.load(str(entry.jacobian))
        data = np.squeeze(np.asarray(img.dataobj, dtype=np.float32))
        if data.shape != grid.shape:
            raise ValueError(f"{entry.jacobian}: Jacobian map shape {data.shape} does not match the atlas "
                             f"grid {grid.shape}")
        return data
    if entry.transform is not None:
        from .transforms import Transform

        return Transform.read(entry.transform, grid=atlas_img).jacobian_determinant()
    return None


def write_subject_report(
    out_html: PathLike,
    *,
    subject: str,
    session: str = "",
    atlas: PathLike,
    atlas_labels: PathLike | None,
    entries: Sequence[ReportEntry],
    atlas_name: str = "atlas",
    figures_dir: PathLike | None = None,
    title_extra: str = "",
) -> Path:
    """Write the QC report of one subject: every method's alignment and deformation on one HTML page.

    Parameters
    ----------
    out_html : path-like
        The HTML file to write (parent folders are created).
    subject : str
        Subject label (with or without ``sub-``).
    session : str
        Session label (with or without ``ses-``); empty when there are no sessions.
    atlas : path-like
        The atlas (fixed) image; defines the grid every figure is drawn on.
    atlas_labels : path-like or None
        The atlas label map on the atlas grid; its boundaries are drawn over the warped subject. Without
        it, two intensity contours of the atlas (brain outline and a grey/white-like Otsu level) are drawn.
    entries : sequence of ReportEntry
        One per method, in display order; ``status == "error"`` entries get an error box and no figures.
    atlas_name : str
        The ``space-`` label of the figure names (e.g. ``MNI152NLin2009aSym``).
    figures_dir : path-like, optional
        Where the PNGs go; default ``<out_html parent>/sub-<subject>/figures/``.
    title_extra : str
        Appended to the page title (e.g. the dataset name).

    Returns
    -------
    Path
        ``out_html``.

    Notes
    -----
    Slices pass through the centre (mean voxel position) of the atlas labels, or of the atlas brain (the
    voxels above 1 % of its maximum) when there are no labels; they are shown in RAS orientation (left of the
    brain on the left of the image). A figure that cannot be made (an unreadable file, a warped image on
    another grid) gives a warning box in that method's section instead of stopping the report.
    """
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    sub = _bids_label(subject, "sub")
    ses = _bids_label(session, "ses") if session else ""
    space = _bids_label(atlas_name)
    figures = Path(figures_dir) if figures_dir is not None else out_html.parent / f"sub-{sub}" / "figures"
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")

    atlas_img = load_image(atlas)
    grid = Grid.of(atlas_img)
    atlas_data = np.asarray(atlas_img.dataobj, dtype=np.float32)
    labels_data = None
    if atlas_labels is not None:
        labels_img = load_image(atlas_labels, labels=True)
        if labels_img.shape != grid.shape:
            raise ValueError(f"{atlas_labels}: atlas label map shape {labels_img.shape} does not match the "
                             f"atlas {grid.shape}")
        labels_data = np.asarray(labels_img.dataobj)
    # The brain: atlas voxels above 1 % of its maximum plus every labelled voxel, holes filled.
    brain = atlas_data > 0.01 * float(np.max(atlas_data))
    if labels_data is not None:
        brain |= labels_data > 0
    brain = ndimage.binary_fill_holes(brain)
    view = _make_view(grid, labels_data > 0 if labels_data is not None else brain)

    used_desc: dict[str, int] = {}
    sections: list[str] = []
    summary_rows: list[str] = []
    for entry in entries:
        desc = _bids_label(entry.method)
        used_desc[desc] = used_desc.get(desc, 0) + 1
        if used_desc[desc] > 1:
            desc = f"{desc}{used_desc[desc]}"
        anchor = f"method-{desc}"
        title = _method_title(entry.method)
        ok = str(entry.status).lower() == "ok"
        jac_summary: _JacobianSummary | None = None
        body: list[str] = []
        if ok:
            body, jac_summary = _method_body(entry, desc, title, stem, space, figures, out_html.parent, grid,
                                             atlas_data, labels_data, brain, view, atlas_img)
        else:
            message = entry.error or "(no message)"
            body.append(f'<div class="error"><strong>{_e(title)} failed.</strong> No figures were made for this '
                        f'method.<pre>{_e(message)}</pre></div>')
        status_html = '<span class="ok">ok</span>' if ok else '<span class="failed">error</span>'
        sections.append(f'<section id="{_e(anchor)}"><h2>{_e(title)}'
                        + (f' <span class="note">(preset {_e(entry.preset)})</span>' if entry.preset else "")
                        + "</h2>\n" + "\n".join(body) + "</section>")
        folded = entry.metrics.get("folded_percent") if entry.metrics else None
        if _is_missing(folded) and jac_summary is not None:
            folded = jac_summary.folded_brain_percent if jac_summary.brain_voxels else jac_summary.folded_percent
        summary_rows.append(
            f'<tr><td><a href="#{_e(anchor)}">{_e(title)}</a></td><td>{status_html}</td>'
            f'<td>{_e(entry.preset) or "&ndash;"}</td>'
            f'<td class="num">{_e(_fmt((entry.metrics or {}).get("mean_dice")))}</td>'
            f'<td class="num">{_e(_fmt(folded))}</td>'
            f'<td class="num">{_e(_fmt_runtime(entry.runtime_s))}</td></tr>')

    label_text = f"sub-{sub}" + (f", ses-{ses}" if ses else "")
    page_title = f"Registration QC: {label_text}" + (f" ({title_extra})" if title_extra else "")
    n_ok = sum(str(e.status).lower() == "ok" for e in entries)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    guide = (
        "<p>Each method registered this subject's T1w image onto the atlas "
        f"<strong>{_e(atlas_name)}</strong>; everything below is shown on the atlas grid, in three orthogonal "
        "slices through the centre of the atlas "
        + ("labels" if labels_data is not None else "brain") + " (left of the brain on the left).</p>"
        "<ul><li><strong>Label contours</strong>: the warped subject in grey with the atlas "
        + ("label boundaries drawn as coloured lines" if labels_data is not None else
           "intensity edges (brain outline in red, a grey/white level in blue)")
        + ". After a good registration the lines follow the subject's anatomy (sulci, ventricles, deep grey "
        "matter); lines that cut across structures show misalignment.</li>"
        "<li><strong>Jacobian determinant</strong> det J of the transform: the local volume change. White "
        "(det J = 1) keeps volume, blue shrinks, red expands; <span style=\"color:#00a000\">green</span> voxels "
        "(det J &le; 0) are folded, i.e. the transform is not invertible there. A smooth, mostly pale map "
        "without green is what a plausible deformation looks like.</li>"
        "<li><strong>Metrics</strong>: Dice and target overlap of the warped subject labels against the atlas "
        "labels (1 is perfect), HD95 the 95th percentile surface distance in mm (lower is better), folded "
        "voxels in percent.</li></ul>")
    summary = ("<table><tr><th>Method</th><th>Status</th><th>Preset</th><th>Mean Dice</th>"
               "<th>Folded voxels (%)</th><th>Runtime</th></tr>\n" + "\n".join(summary_rows) + "</table>"
               '<p class="note">Folded voxels: the method\'s <code>folded_percent</code> metric when given, '
               "otherwise the voxels with det J &le; 0 inside the atlas brain, from the Jacobian map.</p>")
    doc = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(page_title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(page_title)}</h1>
<p class="note">Atlas: {_e(atlas_name)} ({_e(Path(atlas).name)}{", labels " + _e(Path(atlas_labels).name) if atlas_labels is not None else ", no label map"});
{len(entries)} method(s), {n_ok} succeeded. Generated by hdar-pipeline {_e(__version__)} on {_e(created)}.</p>
<h2>Summary</h2>
{summary}
<h2>How to read this report</h2>
{guide}
{chr(10).join(sections)}
<footer>hdar-pipeline {_e(__version__)} &middot; figures in <code>{_e(_href(figures, out_html.parent))}/</code></footer>
</body>
</html>
"""
    out_html.write_text(doc, encoding="utf-8")
    return out_html


def _method_body(entry: ReportEntry, desc: str, title: str, stem: str, space: str, figures: Path, base: Path,
                 grid: Grid, atlas_data: np.ndarray, labels_data: np.ndarray | None, brain: np.ndarray,
                 view: _View, atlas_img) -> tuple[list[str], _JacobianSummary | None]:
    body: list[str] = []
    # (a) label contours
    if entry.warped is None:
        body.append('<p class="warning">No warped image was given; no contour figure.</p>')
    else:
        try:
            warped = _load_warped(entry.warped, grid)
            png = _contour_figure(warped, atlas_data, labels_data, view, brain, f"{title}: warped subject with "
                                  + ("atlas label contours" if labels_data is not None else "atlas edges"),
                                  figures / f"{stem}_space-{space}_desc-{desc}_contours.png")
            body.append(f'<figure><img src="{_e(_href(png, base))}" alt="{_e(title)}: warped subject with atlas '
                        f'contours"><figcaption>The subject warped onto the atlas with the atlas '
                        + ("label boundaries" if labels_data is not None else "intensity edges")
                        + " drawn over it. The lines should follow the anatomy.</figcaption></figure>")
        except Exception as exc:  # one bad file never stops the report
            warnings.warn(f"QC report: no contour figure for {entry.method}: {exc}", stacklevel=3)
            body.append(f'<p class="warning">No contour figure: {_e(exc)}</p>')
    # (b) Jacobian
    jac_summary = None
    if entry.jacobian is None and entry.transform is None:
        body.append('<p class="warning">No transform (and no Jacobian map) was given; no Jacobian figure.</p>')
    else:
        try:
            jac = _load_jacobian(entry, atlas_img)
            jac_summary = _summarise_jacobian(jac, brain)
            png = _jacobian_figure(jac, view, brain, jac_summary, f"{title}: det J",
                                   figures / f"{stem}_space-{space}_desc-{desc}_jacobian.png")
            body.append(f'<figure><img src="{_e(_href(png, base))}" alt="{_e(title)}: Jacobian determinant">'
                        f"<figcaption>Jacobian determinant of the transform (white 1, blue shrinkage, red "
                        f"expansion, green folded voxels det J &le; 0). Grey line: the atlas brain outline. "
                        f"<strong>{jac_summary.folded:,} folded voxels</strong> in the volume "
                        f"({_e(_fmt(jac_summary.folded_percent))} %), {jac_summary.folded_brain:,} inside the "
                        f"brain.</figcaption></figure>")
        except Exception as exc:
            warnings.warn(f"QC report: no Jacobian figure for {entry.method}: {exc}", stacklevel=3)
            body.append(f'<p class="warning">No Jacobian figure: {_e(exc)}</p>')
    # (c) metrics
    rows: list[tuple[str, str]] = []  # (label as HTML, value as text)
    for key, value in (entry.metrics or {}).items():
        rows.append((_e(METRIC_LABELS.get(key, key)), _fmt(value)))
    if jac_summary is not None:
        rows += [("Folded voxels, from the Jacobian map (det J &le; 0)",
                  f"{jac_summary.folded:,} of {jac_summary.voxels:,} ({_fmt(jac_summary.folded_percent)} %)"),
                 ("Folded voxels inside the brain", f"{jac_summary.folded_brain:,} ({_fmt(jac_summary.folded_brain_percent)} %)"),
                 ("det J range", f"{_fmt(jac_summary.minimum)} to {_fmt(jac_summary.maximum)}"),
                 ("SD of log det J inside the brain", _fmt(jac_summary.log_std_brain))]
    rows += [("Runtime", _fmt_runtime(entry.runtime_s)),
             ("Peak memory", "n/a" if _is_missing(entry.peak_memory_mb) else f"{float(entry.peak_memory_mb):,.0f} MiB"),
             ("Device", entry.device or "n/a"), ("Preset", entry.preset or "n/a")]
    table = "\n".join(f'<tr><th>{lab}</th><td class="num">{_e(val)}</td></tr>' for lab, val in rows)
    body.append(f"<h3>Metrics</h3><table>{table}</table>")
    return body, jac_summary


# ============================================================================ methods paragraph

#: Full citations, keyed by the short key used in :func:`methods_paragraph`.
REFERENCES: dict[str, str] = {
    "huang2021": "Huang Y, Ahmad S, Fan J, Shen D, Yap PT. Difficulty-aware hierarchical convolutional neural "
                 "networks for deformable registration of brain MR images. *Medical Image Analysis*. "
                 "2021;67:101817. doi:10.1016/j.media.2020.101817",
    "avants2008": "Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image registration with "
                  "cross-correlation: evaluating automated labeling of elderly and neurodegenerative brain. "
                  "*Medical Image Analysis*. 2008;12(1):26-41. doi:10.1016/j.media.2007.06.004",
    "avants2011": "Avants BB, Tustison NJ, Song G, Cook PA, Klein A, Gee JC. A reproducible evaluation of ANTs "
                  "similarity metric performance in brain image registration. *NeuroImage*. 2011;54(3):2033-2044. "
                  "doi:10.1016/j.neuroimage.2010.09.025",
    "vercauteren2009": "Vercauteren T, Pennec X, Perchant A, Ayache N. Diffeomorphic demons: efficient "
                       "non-parametric image registration. *NeuroImage*. 2009;45(1 Suppl):S61-S72. "
                       "doi:10.1016/j.neuroimage.2008.10.040",
    "lowekamp2013": "Lowekamp BC, Chen DT, Ibáñez L, Blezek D. The design of SimpleITK. *Frontiers in "
                    "Neuroinformatics*. 2013;7:45. doi:10.3389/fninf.2013.00045",
    "tustison2010": "Tustison NJ, Avants BB, Cook PA, Zheng Y, Egan A, Yushkevich PA, Gee JC. N4ITK: improved N3 "
                    "bias correction. *IEEE Transactions on Medical Imaging*. 2010;29(6):1310-1320. "
                    "doi:10.1109/TMI.2010.2046908",
    "klein2009": "Klein A, Andersson J, Ardekani BA, Ashburner J, Avants B, Chiang MC, Christensen GE, Collins DL, "
                 "Gee J, Hellier P, Song JH, Jenkinson M, Lepage C, Rueckert D, Thompson P, Vercauteren T, Woods RP, "
                 "Mann JJ, Parsey RV. Evaluation of 14 nonlinear deformation algorithms applied to human brain MRI "
                 "registration. *NeuroImage*. 2009;46(3):786-802. doi:10.1016/j.neuroimage.2008.12.037",
    "jarecka2020": "Jarecka D, Goncalves M, Markiewicz CJ, Esteban O, Lo N, Kaczmarzyk J, Ghosh S. Pydra: a "
                   "flexible and lightweight dataflow engine for scientific analyses. In: *Proceedings of the 19th "
                   "Python in Science Conference (SciPy 2020)*. 2020",
    "fonov2009": "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average "
                 "age-appropriate brain templates from birth to adulthood. *NeuroImage*. 2009;47(Suppl 1):S102. "
                 "doi:10.1016/S1053-8119(09)70884-5",
}

_CITE_TEXT = {
    "huang2021": "Huang et al. 2021", "avants2008": "Avants et al. 2008", "avants2011": "Avants et al. 2011",
    "vercauteren2009": "Vercauteren et al. 2009", "lowekamp2013": "Lowekamp et al. 2013",
    "tustison2010": "Tustison et al. 2010", "klein2009": "Klein et al. 2009", "jarecka2020": "Jarecka et al. 2020",
    "fonov2009": "Fonov et al. 2009",
}

#: Package names in :func:`provenance.library_versions` and how the text names them.
_LIBRARY_NAMES = {"python": "Python", "antspyx": "ANTsPy (antspyx)", "SimpleITK": "SimpleITK", "nibabel": "NiBabel",
                  "numpy": "NumPy", "scipy": "SciPy", "torch": "PyTorch", "pydra": "Pydra"}


class _Citer:
    """Collects cited references in order of first use."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, *keys: str) -> str:
        for k in keys:
            if k not in self.keys:
                self.keys.append(k)
        return "(" + self.inner(*keys) + ")"

    def inner(self, *keys: str) -> str:
        """The citation without parentheses, for use inside a parenthesis."""
        for k in keys:
            if k not in self.keys:
                self.keys.append(k)
        return "; ".join(_CITE_TEXT[k] for k in keys)


def _value_text(value: Any) -> str:
    """Parameter values as written in the text: sequences as 100x70x50, floats without noise."""
    if isinstance(value, (list, tuple)):
        return "x".join(_value_text(v) for v in value)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _join(parts: Sequence[str]) -> str:
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _other_parameters(params: Mapping[str, Any], used: set[str]) -> str:
    rest = [f"`{k}={_value_text(v)}`" for k, v in params.items() if k not in used and v is not None]
    return f" Other settings: {', '.join(rest)}." if rest else ""


def _pick(params: Mapping[str, Any], *keys: str) -> tuple[str | None, Any]:
    for k in keys:
        if k in params and params[k] is not None:
            return k, params[k]
    return None, None


_ALWAYS_SKIPPED = {"preset", "seed", "name"}


def _describe_affine(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED)
    details = []
    for key, what in (("rigid_iterations", "rigid iterations"), ("affine_iterations", "affine iterations"),
                      ("shrink_factors", "shrink factors"), ("smoothing_sigmas_vox", "smoothing sigmas (voxels)")):
        if params.get(key) is not None:
            details.append(f"{what} {_value_text(params[key])}")
            used.add(key)
    if params.get("sampling_rate") is not None:
        details.append(f"{100 * float(params['sampling_rate']):g} % of the voxels sampled for the metric")
        used.add("sampling_rate")
    text = ("Each image was aligned to the atlas with a rigid and then an affine registration, both driven by "
            f"Mattes mutual information, with `antsRegistration` through ANTsPy{version}")
    text += (f" ({'; '.join(details)}; {cite.inner('avants2011')})." if details else f" {cite('avants2011')}.")
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _describe_syn(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED)
    text = ("Deformable registration with symmetric image normalisation (SyN; " + cite.inner("avants2008")
            + f") used the SyN stage of `antsRegistration` through ANTsPy{version} " + cite("avants2011"))
    details = []
    mk, metric = _pick(params, "syn_metric", "metric")
    sk, sampling = _pick(params, "syn_sampling", "sampling", "radius")
    if metric is not None:
        used.add(mk)
        m = str(metric).lower()
        if m in ("cc", "ants_cc", "neighborhood_cc"):
            name = "local (neighbourhood) cross-correlation"
            if sampling is not None:
                name += f" with a radius of {_value_text(sampling)} voxels"
                used.add(sk)
        elif m in ("mattes", "mi"):
            name = "Mattes mutual information"
            if sampling is not None:
                name += f" with {_value_text(sampling)} histogram bins"
                used.add(sk)
        else:
            name = f"the `{metric}` metric"
            if sampling is not None:
                name += f" (sampling parameter {_value_text(sampling)})"
                used.add(sk)
        details.append(f"similarity metric {name}")
    elif sampling is not None:
        details.append(f"metric sampling parameter {_value_text(sampling)}")
        used.add(sk)
    ik, iterations = _pick(params, "reg_iterations", "iterations")
    if iterations is not None:
        used.add(ik)
        details.append(f"{_value_text(iterations)} iterations (coarse to fine)")
    if params.get("grad_step") is not None:
        used.add("grad_step")
        details.append(f"gradient step {_value_text(params['grad_step'])}")
    if params.get("flow_sigma") is not None:
        used.add("flow_sigma")
        details.append(f"update-field smoothing (flow sigma) {_value_text(params['flow_sigma'])}")
    if params.get("total_sigma") is not None:
        used.add("total_sigma")
        details.append(f"total-field smoothing (total sigma) {_value_text(params['total_sigma'])}")
    text += f", with {_join(details)}." if details else "."
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _describe_demons(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED)
    text = ("Diffeomorphic Demons registration " + cite("vercauteren2009") + " used SimpleITK" + version + "'s "
            "`DiffeomorphicDemonsRegistrationFilter` " + cite("lowekamp2013"))
    details = []
    shrink, iters = params.get("shrink_factors"), params.get("iterations")
    if shrink is not None and iters is not None and np.ndim(shrink) == 1 and np.ndim(iters) == 1:
        used |= {"shrink_factors", "iterations"}
        details.append(f"{len(shrink)} resolution levels (shrink factors {_value_text(shrink)}; "
                       f"{_value_text(iters)} iterations per level)")
    else:
        if shrink is not None:
            used.add("shrink_factors")
            details.append(f"shrink factors {_value_text(shrink)}")
        if iters is not None:
            used.add("iterations")
            details.append(f"{_value_text(iters)} iterations per level")
    if params.get("smoothing_sigmas_vox") is not None:
        used.add("smoothing_sigmas_vox")
        details.append(f"image smoothing {_value_text(params['smoothing_sigmas_vox'])} voxels per level")
    sk, sigma = _pick(params, "smoothing_sigma_vox", "sigma", "field_sigma")
    if sigma is not None:
        used.add(sk)
        details.append(f"the displacement field regularised after every iteration by a Gaussian of standard "
                       f"deviation {_value_text(sigma)} voxels")
    if params.get("update_sigma_vox") is not None:
        used.add("update_sigma_vox")
        u = float(params["update_sigma_vox"])
        details.append("no update-field smoothing" if u == 0 else
                       f"update-field smoothing of {_value_text(u)} voxels")
    if params.get("max_step_length") is not None:
        used.add("max_step_length")
        details.append(f"a maximum step of {_value_text(params['max_step_length'])} voxels per iteration")
    text += f", with {_join(details)}." if details else "."
    if "histogram_matching" in params and params["histogram_matching"] is not None:
        used.add("histogram_matching")
        text += (" The moving image's histogram was matched to the atlas's first." if params["histogram_matching"]
                 else " No histogram matching was applied.")
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _describe_hdar(params: Mapping[str, Any], preset: str, version: str, weights: Mapping | None,
                   cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED) | {"weights", "weights_sha256"}
    card_cfg: Mapping[str, Any] = {}
    if weights and isinstance(weights.get("config"), Mapping):
        cfg = weights["config"]
        card_cfg = cfg.get("cascade", cfg) if isinstance(cfg.get("cascade", cfg), Mapping) else {}

    def get(*keys: str) -> Any:
        k, v = _pick(params, *keys)
        if k is not None:
            used.add(k)
            return v
        k, v = _pick(card_cfg, *keys)
        return v

    text = ("Deformable registration with HDAR, the hierarchical difficulty-aware registration network "
            + cite("huang2021") + f", used the PyTorch{version} implementation in hdar-pipeline")
    details = []
    levels = get("levels", "n_levels", "num_levels")
    if levels is not None:
        details.append(f"{_value_text(levels)} cascaded sub-network level" + ("s" if str(levels) != "1" else ""))
    width = get("width", "widths")
    if width is not None:
        details.append(f"network width `{_value_text(width)}`")
    mode = get("mode")
    mode = mode if mode is not None else (preset if preset in ("fast", "full") else None)
    k = get("top_k", "K", "k", "patches", "n_patches")
    if mode is not None:
        if str(mode) == "fast":
            details.append("*fast* mode (the first level on the whole image pair, the finer levels on the "
                           + (f"K = {_value_text(k)} " if k is not None else "")
                           + "hardest patches selected by the difficulty-aware attention)")
        elif str(mode) == "full":
            details.append("*full* mode (the finer levels on a sliding window covering the brain, blended "
                           "without seams)")
        else:
            details.append(f"mode `{_value_text(mode)}`")
    elif k is not None:
        details.append(f"K = {_value_text(k)} patches per level")
    if mode is not None and str(mode) != "fast" and k is not None:
        details.append(f"K = {_value_text(k)}")
    diffeo = get("diffeomorphic")
    if diffeo is not None:
        details.append("diffeomorphic (stationary velocity fields integrated by scaling and squaring)" if diffeo
                       else "non-diffeomorphic displacement fields")
    text += f", with {_join(details)}." if details else "."
    prealign = get("prealign")
    if prealign:
        text += (" Before the network, a 12-parameter affine map was fitted on local normalised cross-correlation "
                 "at a quarter of the image resolution (Adam).")
    refine = get("refine", "refine_steps", "refinement_steps")
    if refine is not None:
        if int(refine) > 0:
            extra = []
            lr = get("refine_lr")
            if lr is not None:
                extra.append(f"learning rate {_value_text(lr)}")
            levels = get("refine_levels")
            if levels:
                extra.append("on each of the resolutions " + ", ".join(_value_text(x) for x in levels)
                             + " times the image size, coarse to fine")
            if get("refine_similarity") == "full":
                extra.append("the finest level's similarity computed on the full-resolution images, linearised "
                             "around the current warp and re-warped every few steps")
            full_res = get("refine_full_resolution")
            if full_res:
                extra.append(f"then {int(full_res)} step{'s' if int(full_res) != 1 else ''} on a correction at the "
                             "full resolution of the image, "
                             "restricted to the brain's bounding box")
            if get("refine_diffeomorphic"):
                extra.append("each correction integrated from a stationary velocity field by scaling and squaring "
                             "and composed with the field")
            text += (f" The network's field was refined by {int(refine)} steps per level of instance optimisation (Adam on "
                     "local normalised cross-correlation plus an anti-folding smoothness term"
                     + (f"; {', '.join(extra)}" if extra else "") + ").")
        else:
            text += " No instance-optimisation refinement was applied."
    name = params.get("weights") or (weights or {}).get("name") or (weights or {}).get("model")
    sha = params.get("weights_sha256") or (weights or {}).get("sha256")
    if name is not None or sha is not None:
        text += " Network weights: " + (f"`{name}`" if name is not None else "") + (
            f" (SHA-256 `{sha}`)" if sha is not None else "")
        if weights and weights.get("data"):
            text += f", trained on {weights['data']}"
        text += "."
    device = get("device")
    if device is not None:
        text += f" Device: `{device}`."
    if preset and not (mode is not None and preset == str(mode)):
        text += f" Preset: `{preset}`."
    elif preset:
        used.add("mode")
    return text + _other_parameters(params, used)


def _describe_generic(method: str, params: Mapping[str, Any], preset: str) -> str:
    text = f"The `{method}` method was run"
    text += f" with preset `{preset}`" if preset else ""
    rest = [f"`{k}={_value_text(v)}`" for k, v in params.items() if k not in _ALWAYS_SKIPPED and v is not None]
    return text + (f" ({', '.join(rest)})." if rest else ".")


def _version_suffix(versions: Mapping[str, str], key: str) -> str:
    v = versions.get(key)
    return f" {v}" if v and v != "not installed" else ""


def methods_paragraph(
    *,
    methods: Sequence[str],
    parameters: Mapping[str, Mapping] | None = None,
    presets: Mapping[str, str] | None = None,
    preprocessing: Mapping | None = None,
    atlas_description: str,
    n_subjects: int | None = None,
    seed: int | None = None,
    versions: Mapping[str, str] | None = None,
    weights: Mapping | None = None,
    engine: str | None = None,
) -> str:
    """The methods section of a manuscript, in Markdown, generated from what actually ran.

    Parameters
    ----------
    methods : sequence of str
        The methods that ran (``"affine"``, ``"syn"``, ``"demons"``, ``"hdar"``; other names are described
        generically). Only these are described and cited.
    parameters : mapping, optional
        Per method, the parameters it ran with (e.g. ``SyNMethod(...).parameters``). Known keys are written
        out in words, unknown ones as ``key=value``; missing ones are not mentioned.
    presets : mapping, optional
        Per method, the preset name.
    preprocessing : mapping, optional
        Any of ``n4`` (bool), ``brain_extraction`` (str, e.g. ``"atlas-based"``), ``skull_stripped``
        (``"auto"``, ``"yes"``, ``"no"``), ``affine`` (bool: an affine stage before the deformable methods);
        other keys are listed as ``key=value``.
    atlas_description : str
        What the atlas is (e.g. ``"the MNI ICBM152 2009a nonlinear symmetric template"``); the MNI template
        paper is cited when it mentions MNI.
    n_subjects : int, optional
        Number of subjects registered.
    seed : int, optional
        The random seed.
    versions : mapping, optional
        Package versions; default :func:`~hdar_pipeline.provenance.library_versions` plus ``hdar-pipeline``.
    weights : mapping, optional
        HDAR weights description: ``name``, ``sha256`` and optionally ``data`` and ``config`` (a model card).
    engine : str, optional
        ``"pydra"`` when a Pydra workflow ran the registrations (then Pydra is cited). A ``pydra`` entry in
        ``versions`` has the same effect.

    Returns
    -------
    str
        Markdown: a ``# Methods`` heading, paragraphs, and a ``## References`` numbered list.
    """
    if versions is None:
        from .provenance import library_versions

        versions = {**library_versions(), "hdar-pipeline": __version__}
    versions = dict(versions)
    versions.setdefault("hdar-pipeline", __version__)
    parameters = parameters or {}
    presets = presets or {}
    prep = dict(preprocessing or {})
    cite = _Citer()
    methods = [str(m) for m in methods]
    lower = [m.lower() for m in methods]
    uses_pydra = (engine or "").lower() == "pydra" or _version_suffix(versions, "pydra") != ""

    paragraphs: list[str] = []
    # ------------------------------------------------------------------ overview
    who = (f"{n_subjects} T1-weighted (T1w) image{'s' if n_subjects != 1 else ''}" if n_subjects is not None
           else "The T1-weighted (T1w) images")
    atlas_cite = " " + cite("fonov2009") if "mni" in atlas_description.lower() else ""
    names = [_method_title(m) if m.lower() in METHOD_TITLES else f"`{m}`" for m in methods]
    intro = (f"{who[0].upper() + who[1:]} {'were' if n_subjects != 1 else 'was'} registered to "
             f"{atlas_description}{atlas_cite} with hdar-pipeline {versions['hdar-pipeline']}")
    intro += (", a Python package" + (f" (Python {versions['python']})" if versions.get("python") else "")
              + f", using {_join(names)}." if names else ".")
    if uses_pydra:
        intro += (f" The processing was organised as a workflow in Pydra{_version_suffix(versions, 'pydra')} "
                  + cite("jarecka2020") + ".")
    paragraphs.append(intro)

    # ------------------------------------------------------------------ preprocessing
    pre: list[str] = []
    used_prep = set()
    if "n4" in prep and prep["n4"] is not None:
        used_prep.add("n4")
        pre.append("Intensity non-uniformity was corrected with N4 (`N4BiasFieldCorrection` through ANTsPy"
                   + f"{_version_suffix(versions, 'antspyx')}; " + cite.inner("tustison2010", "avants2011") + ")."
                   if prep["n4"] else "No intensity non-uniformity correction was applied.")
    if prep.get("skull_stripped") is not None:
        used_prep.add("skull_stripped")
        s = str(prep["skull_stripped"]).lower()
        if s == "auto":
            pre.append("Whether each input image was already skull-stripped was detected automatically (a zeroed "
                       "background and a brain-sized foreground); skull-stripped inputs kept their non-zero voxels "
                       "as the brain mask.")
        elif s in ("yes", "true", "1"):
            pre.append("The input images were already skull-stripped, and no brain extraction was run.")
        elif s in ("no", "false", "0"):
            pre.append("The input images were treated as whole-head images.")
        else:
            pre.append(f"Skull-stripped input: `{prep['skull_stripped']}`.")
    if prep.get("brain_extraction"):
        used_prep.add("brain_extraction")
        be = str(prep["brain_extraction"])
        if be.lower() in ("atlas-based", "atlas", "template", "template-based"):
            mni = "" if "fonov2009" in cite.keys else " " + cite("fonov2009")
            pre.append("The brain was extracted with an atlas-based procedure in the manner of "
                       "`antsBrainExtraction.sh`: the brain mask of the MNI ICBM152 2009a template" + mni
                       + " was carried onto each image through an ANTs registration (rigid, affine and a "
                       "coarse SyN stage; " + cite.inner("avants2011") + ") and refined with tissue intensities and morphology.")
        else:
            pre.append(f"The brain was extracted with {be}.")
    reuse = dict(prep.get("reused_derivatives") or {})
    if reuse:  # sMRIPrep/fMRIPrep derivatives (the BIDS App's --derivatives)
        used_prep.add("reused_derivatives")
        of, space = reuse.get("of"), reuse.get("space") or "the atlas space"

        def which(n: int | None) -> str:
            if n is None or of is None:
                return "Where an sMRIPrep/fMRIPrep derivatives dataset held one for an image"
            return "For every image" if n >= of else f"For {n} of the {of} images"

        if reuse.get("brain_mask") is None or reuse["brain_mask"] > 0:
            pre.append(f"{which(reuse.get('brain_mask'))}, no brain extraction was run: the brain mask computed by "
                       "sMRIPrep/fMRIPrep (`desc-brain_mask`, in native T1w space) was applied to the "
                       + ("N4-corrected " if prep.get("n4") else "") + "T1w image.")
        if reuse.get("affine") is None or reuse["affine"] > 0:
            pre.append(f"{which(reuse.get('affine'))}, the affine to the atlas was not registered but taken from "
                       f"sMRIPrep's spatial normalisation to `{space}` (`from-T1w_to-{space}_mode-image_xfm.h5`): its "
                       "affine part only, read with SimpleITK; its nonlinear part was not used.")
    affine_first = bool(prep.get("affine")) and "affine" not in lower
    if reuse.get("affine") is not None and reuse.get("of") and reuse["affine"] >= reuse["of"]:
        affine_first = False  # every image's affine came from sMRIPrep (said above)
    affine_method = str(prep.get("affine_method") or "ants")
    used_prep.add("affine_method")
    if "affine" in prep and prep["affine"] is not None:
        used_prep.add("affine")
        if not prep["affine"]:
            pre.append("No affine registration was run before the deformable methods; the images were already "
                       "affinely aligned on the atlas grid.")
    rest = [f"`{k}={_value_text(v)}`" for k, v in prep.items() if k not in used_prep and v is not None]
    if rest:
        pre.append(f"Other preprocessing settings: {', '.join(rest)}.")
    if pre:
        paragraphs.append("*Preprocessing.* " + " ".join(pre))

    # ------------------------------------------------------------------ registration
    reg: list[str] = []
    ants_v = _version_suffix(versions, "antspyx")
    if affine_first and affine_method == "fast":
        from .methods.fast_affine import FastAffineMethod

        fast = FastAffineMethod()  # the settings the pipeline runs it with: its defaults
        levels = " and ".join(f"{mm:g} mm" for mm in fast.levels_mm)
        reg.append("Before the deformable methods, each image was aligned to the atlas with a rigid and then an "
                   f"affine registration driven by the local normalised cross-correlation of {fast.window}-voxel "
                   f"windows, coarse to fine on {levels} isotropic grids over the atlas brain, starting from the "
                   "alignment of the intensity-weighted centres of mass, with Adam in PyTorch"
                   + _version_suffix(versions, "torch") + " (hdar-pipeline's fast affine).")
    elif affine_first:
        aff = dict(parameters.get("affine", {}) or {})
        reg.append(_describe_affine(aff, str(presets.get("affine", "") or aff.get("preset") or ""), ants_v, cite)
                   .replace("Each image was aligned", "Before the deformable methods, each image was aligned", 1))
    for m, key in zip(methods, lower):
        params = dict(parameters.get(m, parameters.get(key, {})) or {})
        preset = str(presets.get(m, presets.get(key, "")) or params.get("preset") or "")
        if key == "affine":
            reg.append(_describe_affine(params, preset, ants_v, cite))
        elif key == "syn":
            reg.append(_describe_syn(params, preset, ants_v, cite))
        elif key == "demons":
            reg.append(_describe_demons(params, preset, _version_suffix(versions, "SimpleITK"), cite))
        elif key == "hdar":
            reg.append(_describe_hdar(params, preset, _version_suffix(versions, "torch"), weights, cite))
        else:
            reg.append(_describe_generic(m, params, preset))
    if reg:
        paragraphs.append("*Registration.* " + " ".join(reg) + " All transforms map atlas points to subject "
                          "points (the ITK/ANTs convention); the subjects' images were resampled onto the atlas "
                          "grid with linear interpolation and their label maps with nearest-neighbour "
                          "interpolation. Each transform was also inverted (subject points to atlas points, stored "
                          "on the subject's grid: SyN's own inverse, and for the other methods the displacement "
                          "field inverted by Newton's method), its inverse consistency measured over the atlas "
                          "brain, and the atlas labels were brought onto each subject's native image with it "
                          "(nearest neighbour), from which the regional volumes were counted.")

    # ------------------------------------------------------------------ evaluation
    paragraphs.append(
        "*Evaluation.* Each subject's label map, warped onto the atlas, was compared with the atlas labels, label "
        "by label: the Dice coefficient, the target overlap " + cite("klein2009") + " and the 95th percentile of "
        "the symmetric surface distance (Hausdorff 95 %, in mm). The regularity of each deformation was "
        "measured by the Jacobian determinant of the transform: folded voxels are those with a determinant "
        "<= 0, reported as a percentage of the voxels. Runtime and peak memory were recorded for each "
        "registration.")

    # ------------------------------------------------------------------ reproducibility
    repro = []
    uses_ants = bool(set(lower) & {"affine", "syn"}) or (affine_first and affine_method != "fast") or bool(
        prep.get("n4")) or bool(prep.get("brain_extraction"))
    uses_torch = "hdar" in lower or (affine_first and affine_method == "fast")
    if seed is not None:
        rngs = ["Python", "NumPy"] + (["PyTorch"] if uses_torch else []) + (
            ["ANTs, through `ANTS_RANDOM_SEED`"] if uses_ants else [])
        repro.append(f"The random number generators ({_join(rngs)}) were seeded with {seed}.")
    skip = {"hdar-pipeline", "hdar_pipeline"} | (set() if uses_torch else {"torch"}) | (
        set() if uses_ants else {"antspyx"}) | (set() if uses_pydra else {"pydra"})
    libs = [f"{_LIBRARY_NAMES.get(k, k)} {v}" for k, v in versions.items()
            if k not in skip and v and v != "not installed"]
    if libs:
        repro.append(f"Software versions: hdar-pipeline {versions['hdar-pipeline']}, {', '.join(libs)}.")
    if repro:
        paragraphs.append(" ".join(repro))

    refs = "\n".join(f"{i}. {REFERENCES[k]}" for i, k in enumerate(cite.keys, start=1))
    note = ("*This text was generated automatically by hdar-pipeline from the settings of the run, to be copied "
            "into a manuscript; it is released under the CC0 licence.*")
    return "# Methods\n\n" + "\n\n".join(paragraphs) + f"\n\n{note}\n\n## References\n\n{refs}\n"


def _markdown_to_html(text: str, title: str = "Methods") -> str:
    """The small Markdown subset :func:`methods_paragraph` writes (headings, paragraphs, a numbered list,
    ``*emphasis*`` and ```code```), as a standalone HTML page."""

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"<em>\1</em>", s)
        return s

    out: list[str] = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        if block.startswith("## "):
            out.append(f"<h2>{inline(block[3:])}</h2>")
        elif block.startswith("# "):
            out.append(f"<h1>{inline(block[2:])}</h1>")
        elif all(re.match(r"\d+\. ", ln) for ln in lines):
            out.append("<ol>\n" + "\n".join(f"<li>{inline(ln.split('. ', 1)[1])}</li>" for ln in lines) + "\n</ol>")
        else:
            out.append(f"<p>{inline(' '.join(lines))}</p>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            "<style>body { font-family: Georgia, serif; max-width: 50em; margin: 2em auto; line-height: 1.5; "
            "padding: 0 1em; } code { font-size: .9em; }</style>\n</head>\n<body>\n" + "\n".join(out)
            + "\n</body>\n</html>\n")


def write_methods(out_dir: PathLike, **kwargs: Any) -> list[Path]:
    """Write :func:`methods_paragraph` ``(**kwargs)`` as ``CITATION.md`` and ``CITATION.html`` in ``out_dir``.

    Returns
    -------
    list of Path
        ``[CITATION.md, CITATION.html]`` (same text, references included).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = methods_paragraph(**kwargs)
    md = out / "CITATION.md"
    md.write_text(text, encoding="utf-8")
    page = out / "CITATION.html"
    page.write_text(_markdown_to_html(text), encoding="utf-8")
    return [md, page]
