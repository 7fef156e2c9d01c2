"""The per-subject quality-control report: one HTML page per subject (the methods text it embeds is
:mod:`hdar_pipeline.reports.methods_text`).

Per-subject report
------------------
:func:`write_subject_report` writes one HTML page per subject in the manner of the NiPreps (fMRIPrep) reports,
from reportlets composed with nireports (the NiPreps visual report system): SVG files with :data:`N_CUTS` slices
per axis (axial, sagittal and coronal rows). For each method that ran it shows

* **atlas vs subject**: the atlas (fixed) and the subject's T1w warped onto it (moving) alternate while the
  pointer is over the figure (nireports' ``compose_view`` flicker), the atlas label boundaries drawn on both;
* **before / after**: the subject on the atlas grid after the affine alone and after the method, alternating
  the same way;
* **the Jacobian determinant** ``det J`` of the transform (blue: local shrinkage ``det J < 1``, red: expansion,
  white: ``det J = 1``; folded voxels, ``det J <= 0``, in green);
* **one metrics table**: label overlap, deformation and run facts, each statistic once by name and unit
  (:data:`METRIC_LABELS`), the device the record says it ran on.

and, for the subject, its brain mask outlined on its native T1w, the run's provenance (version, command line,
options) and the methods text. Methods that failed get a red box with the failed step and the message, and no
figures. The reportlets are written beside the page (``<out_html parent>/sub-<label>/figures/`` by default)
and embedded with ``<object>`` and relative paths (as nireports' assembler does), so the output folder can be
moved or archived as a whole; the page loads nothing from the network and runs no script::

    sub-<label>[_ses-<label>]_space-<atlas>_desc-<method>_flicker.svg
    sub-<label>[_ses-<label>]_space-<atlas>_desc-<method>_beforeafter.svg
    sub-<label>[_ses-<label>]_space-<atlas>_desc-<method>_jacobian.svg
    sub-<label>[_ses-<label>]_desc-brain_mask.svg

nireports' own page assembler (``nireports.assembler.report.Report``) is not used: its template loads jQuery and
Bootstrap from CDNs and it imports nipype; the page here is plain HTML and CSS.

The reportlets' rows are written as SVG here, each one PNG image of its slices (a pixel per voxel, the label
boundaries painted in) with its labels as text, the way nilearn's ``plot_anat`` and nireports' ``extract_svg`` laid
them out (the same slices, orientation and colours) in a fraction of their time. This module imports no workflow
engine; nireports' SVG composition and matplotlib's colour maps are imported when a report is drawn (no nilearn,
no ``pyplot``, no nipype, no TemplateFlow).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
import re
import urllib.parse
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from hdar_pipeline._version import __version__
from hdar_pipeline.core.images import Grid, load_image
from hdar_pipeline.reports.methods_text import _markdown_fragment, method_title

PathLike = str | os.PathLike

__all__ = ["ReportEntry", "write_subject_report"]

#: Width of a reportlet row, in SVG user units (points: 15.4 inches, as nilearn's figures were); the page scales
#: the figures to its width, so this sizes the text.
_ROW_WIDTH = 1108

#: Heights of the strips above a row's slices (their L/R sides) and below them (their positions), and of the
#: title's strip over the first row, in the same units.
_BAND, _TITLE_BAND = 19.0, 25.0

#: Room at the right of the Jacobian's rows for its colour bar, and black at the two sides of every row.
_COLORBAR_SPACE, _MARGIN = 72.0, 5.0

#: Black between two slices of a row, as a fraction of a slice's width.
_GAP = 0.05

#: Font size of a reportlet's labels (its title: 3 more).
_FONT_SIZE = 11

#: A reportlet's image has 256 colours (a PNG palette): the image's levels (a grey ramp, a colour map), black,
#: and the overlays (boundaries, folded voxels) at ``_OVERLAY`` and ``_OVERLAY + 1``.
_LEVELS, _BLACK, _OVERLAY = 253, 253, 254

#: Slices per axis in every reportlet (as in the NiPreps reports).
N_CUTS = 7

#: The rows of a reportlet: axial, sagittal, coronal (nireports' order).
_ORDER = ("z", "x", "y")

#: The two voxel axes (of an image in RAS orientation) that span a ``display_mode``'s slices.
_IN_PLANE = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}

#: Display names of the methods this package knows.
#: The metrics a report shows, in this order: the key in a record's ``metrics`` -> (name, unit). Every statistic
#: has one name and one definition; the Jacobian statistics are those of
#: :func:`hdar_pipeline.evaluation.metrics.jacobian_statistics` ("brain": the atlas labels, the evaluation's mask).
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "mean_dice": ("Mean Dice", ""),
    "mean_jaccard": ("Mean Jaccard index", ""),
    "mean_target_overlap": ("Mean target overlap", ""),
    "mean_false_negative": ("Mean false-negative rate", ""),
    "mean_false_positive": ("Mean false-positive rate", ""),
    "mean_volume_similarity": ("Mean volume similarity", ""),
    "mean_hd95_mm": ("Mean Hausdorff distance, 95th percentile", "mm"),
    "mean_hd_mm": ("Mean Hausdorff distance (maximum)", "mm"),
    "mean_msd_mm": ("Mean surface distance", "mm"),
    "folded_percent_mask": ("Folded voxels (det J \u2264 0), brain", "%"),
    "folded_percent": ("Folded voxels (det J \u2264 0), whole atlas grid", "%"),
    "log_jacobian_std_mask": ("SD of log det J, brain", ""),
    "log_jacobian_std": ("SD of log det J, whole atlas grid", ""),
    "jacobian_min": ("det J, minimum", ""),
    "jacobian_max": ("det J, maximum", ""),
    "jacobian_mean": ("det J, mean", ""),
}

#: Metrics a report does not list as rows: the same statistic as another row (the mean overlap is the Dice
#: coefficient), or counts shown inside another row.
_HIDDEN_METRICS = {"mean_mean_overlap", "n_labels", "n_labels_evaluated", "n_labels_missing", "n_voxels",
                   "mask_voxels"}

_OVERLAP_KEYS = [k for k in METRIC_LABELS if k.startswith("mean_")]
_JACOBIAN_KEYS = [k for k in METRIC_LABELS if not k.startswith("mean_")]


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
    failed_step : str
        The step that failed (``"preprocess"``, ``"register"``, ``"evaluate"``), when ``status == "error"``.
    preset : str
        The method's preset, if any.
    warped : path-like, optional
        The subject's T1w warped onto the atlas grid (NIfTI).
    affine : path-like, optional
        The subject's T1w on the atlas grid after the affine alone (the preprocessing's ``preproc_T1w``): the
        "before" of the before/after view.
    transform : path-like, optional
        ITK composite ``.h5`` (or any file list :meth:`Transform.read` accepts), mapping atlas points to
        subject points; used for the Jacobian determinant.
    jacobian : path-like, optional
        A precomputed Jacobian-determinant NIfTI on the atlas grid; used instead of ``transform``.
    metrics : mapping of str to float
        The evaluation's summary (:data:`METRIC_LABELS`: ``mean_dice``, ``mean_hd95_mm``, ``folded_percent_mask``,
        ``log_jacobian_std_mask``, ..., and ``n_labels``, ``n_labels_evaluated``, ``mask_voxels``); any subset;
        NaN or None allowed. Jacobian statistics it lacks are computed from the Jacobian map.
    runtime_s : float, optional
        Registration runtime in seconds.
    peak_memory_mb : float, optional
        Peak memory in MiB.
    device : str
        Where it ran, as the record says (``"cpu"``, ``"cuda:0"``, ...).
    """

    method: str
    status: str = "ok"
    error: str = ""
    failed_step: str = ""
    preset: str = ""
    warped: PathLike | None = None
    affine: PathLike | None = None
    transform: PathLike | None = None
    jacobian: PathLike | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    runtime_s: float | None = None
    peak_memory_mb: float | None = None
    device: str = ""


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


def _canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A float32 (or label) volume as a NIfTI in the closest RAS orientation (voxels reordered, never resampled)."""
    return nib.as_closest_canonical(nib.Nifti1Image(data, affine))


def _edges(regions: nib.Nifti1Image) -> dict[str, nib.Nifti1Image]:
    """Per display mode, the boundaries between the regions of a label volume within its slices: voxels whose
    next voxel along one of the two in-plane axes holds another value (one voxel wide, binary)."""
    data = np.asarray(regions.dataobj)
    out = {}
    for mode, axes in _IN_PLANE.items():
        edge = np.zeros(data.shape, bool)
        for ax in axes:
            index = [slice(None)] * 3
            index[ax] = slice(0, -1)
            edge[tuple(index)] |= np.diff(data, axis=ax) != 0
        out[mode] = nib.Nifti1Image(edge.astype(np.uint8), regions.affine)
    return out


def _box(mask: np.ndarray, margin: int = 3) -> tuple[slice, slice, slice]:
    """The bounding box of a mask's voxels, ``margin`` voxels wider (the whole volume when it is empty): the
    figures are drawn from this part of the volumes only."""
    if not np.any(mask):
        return (slice(None),) * 3
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, mask.shape))


def _limits(data: np.ndarray, inside: np.ndarray) -> tuple[float, float]:
    """Display range: the 0.5 and 99.5 percentiles of the finite values inside the brain."""
    values = data[inside & np.isfinite(data)] if np.any(inside) else data[np.isfinite(data)]
    if not values.size:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return (vmin, vmax) if vmax > vmin else (vmin, vmin + 1e-6)


def _cut_indices(img: nib.Nifti1Image, mode: str, coords: Sequence[float]) -> list[int]:
    """The voxel index, along ``mode``'s axis, of each cut (a world coordinate) as nilearn picks it: the voxel nearest
    the point with that coordinate (and 0 for the two others), kept inside the volume."""
    axis = "xyz".index(mode)
    inverse = np.linalg.inv(img.affine)
    return [int(np.clip(np.round(inverse[axis, axis] * float(c) + inverse[axis, 3]), 0, img.shape[axis] - 1))
            for c in coords]


def _plane(volume: np.ndarray, mode: str, index: int) -> np.ndarray:
    """The slice ``index`` of a RAS volume along ``mode``'s axis as it is displayed: its first in-plane axis from
    left to right, its second from bottom to top (the array's first row at the top)."""
    axis = "xyz".index(mode)
    return np.rot90(volume[(slice(None),) * axis + (index,)])


def _palette(levels: np.ndarray, overlays: Sequence[str]) -> np.ndarray:
    """The 256 colours of a reportlet's image (8-bit RGB): :data:`_LEVELS` levels of the image, black (the space
    between the slices), then the overlays (at most two)."""
    from matplotlib.colors import to_rgb

    colours = np.zeros((256, 3), np.uint8)
    colours[:_LEVELS] = levels
    for i, colour in enumerate(overlays):
        colours[_OVERLAY + i] = np.round(np.asarray(to_rgb(colour)) * 255)
    return colours


def _png(indices: np.ndarray, palette: np.ndarray) -> str:
    """A palette image (``uint8`` indices into ``palette``, 256 x 3) as a base64 PNG data URI."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(indices, dtype=np.uint8))
    image.putpalette(palette.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _text(x: float, y: float, text: str, *, size: float = _FONT_SIZE, colour: str = "#ffffff",
          anchor: str = "start") -> str:
    """An SVG text element, ``y`` its vertical centre."""
    return (f'<text x="{x:.2f}" y="{y + 0.36 * size:.2f}" fill="{colour}" text-anchor="{anchor}" '
            f'style="font-size:{size}px;font-family:\'DejaVu Sans\',\'Bitstream Vera Sans\',Arial,Helvetica,sans-serif"'
            f">{html.escape(text, quote=False)}</text>")


def _text_width(text: str, size: float) -> float:
    """The width of a text in DejaVu Sans (matplotlib's font, the SVG's first choice) at ``size``; without the font
    (or FreeType), an estimate of it."""
    import matplotlib
    from PIL import ImageFont

    try:
        font = ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), round(size))
        return float(font.getlength(text))
    except (OSError, ImportError):
        return 0.62 * size * len(text)


def _row(planes: Sequence[np.ndarray], palette: np.ndarray, img: nib.Nifti1Image, mode: str,
         coords: Sequence[float], *, div_id: str, title: str | None = None,
         colorbar: tuple[np.ndarray, float, float] | None = None, right: float = 0.0) -> str:
    """One row of a reportlet as SVG text (the ``<svg>`` element alone, sized by its ``viewBox``, as nireports'
    ``extract_svg`` leaves it for ``compose_view``).

    The ``planes`` (slices of ``img`` at ``coords``, all one shape; indices into ``palette``) are laid side by side
    on black in one image, embedded as a PNG at the volume's resolution (a pixel per voxel, drawn without
    smoothing) with the voxels' aspect ratio, :data:`_ROW_WIDTH` wide less ``right`` and the margins; above the
    slices their L and R sides (not in the sagittal row) and the ``title``, below them their positions (nilearn's
    ``x=12`` labels); ``colorbar`` (the palette's levels, bottom to top, and the values of the two ends) at the
    right.
    """
    height, width = planes[0].shape
    gap = max(2, round(_GAP * width))
    step = width + gap
    mosaic = np.full((height, len(planes) * step - gap), _BLACK, np.uint8)
    for i, plane in enumerate(planes):
        mosaic[:, i * step:i * step + width] = plane
    sizes = nib.affines.voxel_sizes(img.affine)
    across, up = (float(sizes[a]) for a in _IN_PLANE[mode])
    image_w = _ROW_WIDTH - right - 2 * _MARGIN
    image_h = image_w * (height * up) / (mosaic.shape[1] * across)
    top = _BAND + (_TITLE_BAND if title else 0.0)
    # compose_view stacks the rows by their heights as integers: a whole number leaves no seam between them
    total = math.ceil(top + image_h + _BAND)
    scale = image_w / mosaic.shape[1]  # user units per mosaic column
    parts = [f'<rect width="{_ROW_WIDTH}" height="{total}" fill="#000000"/>',
             f'<image x="{_MARGIN}" y="{top:.3f}" width="{image_w:.3f}" height="{image_h:.3f}" '
             'preserveAspectRatio="none" style="image-rendering:crisp-edges;image-rendering:pixelated" '
             f'xlink:href="{_png(mosaic, palette)}"/>']
    below, above = top + image_h + _BAND / 2, top - _BAND / 2
    for i, coord in enumerate(coords):
        left = _MARGIN + i * step * scale
        parts.append(_text(left, below, f"{mode}={int(coord)}"))
        if mode != "x":  # the sagittal slices have no left and right
            parts += [_text(left, above, "L"), _text(left + width * scale, above, "R", anchor="end")]
    if title:  # black on a white box, as nilearn writes it
        size = _FONT_SIZE + 3
        parts += [f'<rect width="{_text_width(title, size) + 0.6 * size:.2f}" height="{_TITLE_BAND}" fill="#ffffff"/>',
                  _text(0.3 * size, _TITLE_BAND / 2, title, size=size, colour="#000000")]
    if colorbar is not None:
        levels, low, high = colorbar
        x, bar_w = _MARGIN + image_w + 11.0, 13.0
        ramp = np.arange(_LEVELS, dtype=np.uint8)[::-1, None]  # the highest level at the top
        parts.append(f'<image x="{x:.3f}" y="{top:.3f}" width="{bar_w}" height="{image_h:.3f}" '
                     f'preserveAspectRatio="none" xlink:href="{_png(ramp, _palette(levels, ()))}"/>')
        parts.append(f'<rect x="{x:.3f}" y="{top:.3f}" width="{bar_w}" height="{image_h:.3f}" fill="none" '
                     'stroke="#ffffff" stroke-width="0.8"/>')
        for value in np.linspace(low, high, 5):
            y = top + image_h * (high - value) / (high - low)
            parts += [f'<path d="M {x + bar_w:.3f} {y:.3f} h 3.5" stroke="#ffffff" stroke-width="0.8"/>',
                      _text(x + bar_w + 6.0, y, f"{value:.2g}")]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" version="1.1" '
            f'viewBox="0 0 {_ROW_WIDTH} {total}" preserveAspectRatio="xMidYMid meet">'
            f'<g id="{div_id}-{uuid.uuid4()}">' + "".join(parts) + "</g></svg>")


def _mosaic(img: nib.Nifti1Image, cuts: Mapping[str, Sequence[float]], *, div_id: str, label: str,
            limits: tuple[float, float], edges: Mapping[str, nib.Nifti1Image] | None = None,
            edge_color: str = "#ff3030") -> list[str]:
    """One SVG per axis (:data:`_ORDER`), ``len(cuts[axis])`` slices each (:func:`_row`): the image in grey between
    ``limits`` (black below, white above), the voxels of ``edges`` in ``edge_color`` over it; the rows of
    :func:`nireports.reportlets.mosaic.plot_registration`, with the atlas label boundaries instead of its single
    contour level."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    low, high = limits
    palette = _palette(np.repeat(np.linspace(0, 255, _LEVELS).round().astype(np.uint8)[:, None], 3, axis=1),
                       [edge_color])
    svgs = []
    for i, mode in enumerate(_ORDER):
        outline = np.asarray(edges[mode].dataobj) if edges is not None else None
        planes = []
        for index in _cut_indices(img, mode, cuts[mode]):
            level = np.clip((_plane(data, mode, index) - low) / (high - low), 0.0, 1.0)
            plane = (np.nan_to_num(level, nan=0.0) * (_LEVELS - 1) + 0.5).astype(np.uint8)
            if outline is not None:
                plane[_plane(outline, mode, index) > 0] = _OVERLAY
            planes.append(plane)
        svgs.append(_row(planes, palette, img, mode, cuts[mode], div_id=f"{div_id}-{mode}",
                         title=label if i == 0 else None))
    return svgs


def _compose(background: Sequence[str], foreground: Sequence[str] | None, out_svg: Path) -> Path:
    """nireports' :func:`~nireports.reportlets.utils.compose_view`: the background rows shown, the foreground rows
    over them in a CSS animation that alternates the two while the pointer is over the figure (none: a still)."""
    from nireports._vendored.svgutils.transform import fromstring
    from nireports.reportlets.utils import compose_view

    out_svg.parent.mkdir(parents=True, exist_ok=True)
    compose_view([fromstring(s) for s in background], [fromstring(s) for s in foreground] if foreground else None,
                 out_file=out_svg)
    return out_svg


def _jacobian_mosaic(img: nib.Nifti1Image, cuts: Mapping[str, Sequence[float]], edges: Mapping[str, nib.Nifti1Image],
                     brain_values: np.ndarray, title: str, out_svg: Path) -> Path:
    """The Jacobian determinant (``img``, as drawn) on the reportlet slices: white 1, blue < 1, red > 1 (matplotlib's
    ``RdBu_r`` over ``1 +- spread``, ``spread`` the 99.5th percentile of ``|det J - 1|`` over ``brain_values``, det
    J in the brain, kept between 0.25 and 0.999), folded voxels in green, the brain outline (``edges``) in grey, a
    colour bar by the axial row."""
    from matplotlib import colormaps

    data = np.asarray(img.dataobj, dtype=np.float32)
    finite = brain_values[np.isfinite(brain_values)]
    if not finite.size:
        finite = data.ravel()
    spread = float(np.percentile(np.abs(finite - 1.0), 99.5)) if finite.size else 0.5
    spread = min(max(spread, 0.25), 0.999)
    levels = colormaps["RdBu_r"](np.linspace(0.0, 1.0, _LEVELS), bytes=True)[:, :3]
    palette = _palette(levels, ["#808080", "#00d000"])
    svgs = []
    for i, mode in enumerate(_ORDER):
        outline = np.asarray(edges[mode].dataobj)
        planes = []
        for index in _cut_indices(img, mode, cuts[mode]):
            values = _plane(data, mode, index)
            level = np.clip((values - (1.0 - spread)) / (2 * spread), 0.0, 1.0)
            plane = (np.nan_to_num(level, nan=0.5) * (_LEVELS - 1) + 0.5).astype(np.uint8)
            plane[_plane(outline, mode, index) > 0] = _OVERLAY
            plane[values <= 0] = _OVERLAY + 1
            planes.append(plane)
        svgs.append(_row(planes, palette, img, mode, cuts[mode], div_id=f"jacobian-{mode}",
                         title=title if i == 0 else None, right=_COLORBAR_SPACE,
                         colorbar=(levels, 1.0 - spread, 1.0 + spread) if i == 0 else None))
    return _compose(svgs, None, out_svg)


def _mask_reportlet(t1w: PathLike, mask: PathLike, out_svg: Path) -> Path:
    """The brain-mask reportlet of the NiPreps reports: the mask's outline on the native T1w, :data:`N_CUTS`
    slices per axis through the mask's bounding box (nireports' ``cuts_from_bbox``), as a still SVG."""
    from nireports.reportlets.utils import cuts_from_bbox

    t1w_img, mask_img = load_image(t1w), load_image(mask, labels=True)
    if not Grid.of(mask_img).same_as(Grid.of(t1w_img), atol=1e-3):
        raise ValueError(f"{mask}: the brain mask is not on the grid of {Path(t1w).name}")
    binary = _canonical((np.asarray(mask_img.dataobj) > 0).astype(np.uint8), t1w_img.affine)
    box = _box(np.asarray(binary.dataobj) > 0, margin=12)
    binary = binary.slicer[box]
    image = _canonical(np.asarray(t1w_img.dataobj, dtype=np.float32), t1w_img.affine).slicer[box]
    inside = np.asarray(binary.dataobj) > 0
    svgs = _mosaic(image, cuts_from_bbox(binary, cuts=N_CUTS), div_id="brain-mask", label="brain mask",
                   limits=_limits(np.asarray(image.dataobj), inside), edges=_edges(binary))
    return _compose(svgs, None, out_svg)


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
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: .4em 0; z-index: 1; }
nav a { margin-right: 1.2em; }
h1 { border-bottom: 3px solid #3465a4; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .7em; text-align: left; vertical-align: top; }
th { background: #eef2f8; font-weight: normal; }
thead th, th.group { font-weight: bold; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: bold; }
.failed { color: #b00020; font-weight: bold; }
.error { border: 2px solid #b00020; background: #fdecee; padding: .6em 1em; border-radius: 4px; }
.error pre { white-space: pre-wrap; margin: .3em 0 0; }
.warning { border: 1px solid #c98a00; background: #fff6dd; padding: .4em 1em; border-radius: 4px; }
.note { color: #555; font-size: .92em; }
figure { margin: .8em 0 1.4em; }
.svg-reportlet { width: 100%; border: 1px solid #ddd; background: #000; }
figcaption { color: #444; font-size: .92em; margin-top: .3em; }
pre.command { background: #f4f4f4; padding: .6em 1em; white-space: pre-wrap; word-break: break-all; }
.methods { background: #fafafa; border-left: 4px solid #3465a4; padding: .2em 1.2em; }
footer { margin-top: 3em; color: #666; font-size: .85em; border-top: 1px solid #ccc; }
"""


def _load_on_grid(path: PathLike, grid: Grid, what: str) -> np.ndarray:
    img = load_image(path)
    if not Grid.of(img).same_as(grid, atol=1e-3):
        raise ValueError(f"{path}: the {what} is not on the atlas grid (shape {img.shape}, atlas "
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
        from hdar_pipeline.core.transforms import Transform

        return Transform.read(entry.transform, grid=atlas_img).jacobian_determinant()
    return None


def _metric_name(key: str) -> tuple[str, str]:
    """(name, unit) of a metric: :data:`METRIC_LABELS`, or the key made readable (``mean_foo_mm`` -> "Mean foo",
    "mm")."""
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    unit = ""
    words = key.split("_")
    if words[-1] in ("mm", "mm3", "s", "percent"):
        unit = {"mm3": "mm\u00b3", "percent": "%"}.get(words[-1], words[-1])
        words = words[:-1]
    text = " ".join(words).strip() or key
    return text[:1].upper() + text[1:], unit


def _metric_value(value: Any, unit: str) -> str:
    text = _fmt(value)
    return text if text == "n/a" or not unit else f"{text} {unit}"


def _metrics_table(entry: ReportEntry, metrics: Mapping[str, Any], computed: set[str]) -> str:
    """One table per method: label overlap, deformation, run; readable names and units, no raw keys."""
    rows: list[str] = []

    def group(title: str) -> None:
        rows.append(f'<tr><th class="group" colspan="2">{_e(title)}</th></tr>')

    def row(name: str, value: str, note: str = "") -> None:
        rows.append(f"<tr><th>{_e(name)}{_e(note)}</th><td class=\"num\">{_e(value)}</td></tr>")

    overlap = [k for k in _OVERLAP_KEYS if k in metrics]
    extra = [k for k in metrics if k not in METRIC_LABELS and k not in _HIDDEN_METRICS]
    if overlap or "n_labels" in metrics:
        group("Label overlap: the subject's labels warped onto the atlas vs the atlas labels, mean over labels")
        for key in overlap:
            name, unit = _metric_name(key)
            row(name, _metric_value(metrics[key], unit))
        if "n_labels" in metrics:
            evaluated = metrics.get("n_labels_evaluated", metrics["n_labels"])
            missing = metrics.get("n_labels_missing")
            row("Labels evaluated", f"{_fmt(evaluated)} of {_fmt(metrics['n_labels'])}"
                + (f" ({_fmt(missing)} missing)" if not _is_missing(missing) and missing else ""))
    jac = [k for k in _JACOBIAN_KEYS if k in metrics]
    if jac:
        group("Deformation: Jacobian determinant det J of the atlas \u2192 subject mapping (brain: the atlas "
              "labels)")
        for key in jac:
            name, unit = _metric_name(key)
            value = _metric_value(metrics[key], unit)
            if key == "folded_percent_mask" and not _is_missing(metrics.get("mask_voxels")) and metrics.get(
                    "mask_voxels") and not _is_missing(metrics[key]):
                n = int(round(float(metrics[key]) * float(metrics["mask_voxels"]) / 100))
                value += f" ({n:,} of {int(metrics['mask_voxels']):,} voxels)"
            elif key == "folded_percent" and not _is_missing(metrics.get("n_voxels")) and metrics.get(
                    "n_voxels") and not _is_missing(metrics[key]):
                n = int(round(float(metrics[key]) * float(metrics["n_voxels"]) / 100))
                value += f" ({n:,} of {int(metrics['n_voxels']):,} voxels)"
            row(name, value, " \u2020" if key in computed else "")
    if extra:
        group("Other metrics")
        for key in extra:
            name, unit = _metric_name(key)
            row(name, _metric_value(metrics[key], unit))
    group("Run")
    row("Runtime", _fmt_runtime(entry.runtime_s))
    row("Peak memory", "n/a" if _is_missing(entry.peak_memory_mb) else f"{float(entry.peak_memory_mb):,.0f} MiB")
    row("Device (as run)", entry.device or "n/a")
    row("Preset", entry.preset or "n/a")
    note = ('<p class="note">\u2020 computed for this report from the Jacobian map (the record has no '
            "evaluation of it), with the same definition.</p>" if computed else "")
    return f'<table class="metrics">{"".join(rows)}</table>{note}'


def _command_text(provenance: Mapping[str, Any]) -> str:
    command = provenance.get("command")
    if not command and provenance.get("argv") is not None:
        import shlex

        command = shlex.join(["hdar-pipeline", *map(str, provenance["argv"])])
    return str(command or "")


def _provenance_html(provenance: Mapping[str, Any] | None, entries: Sequence[ReportEntry], atlas: PathLike,
                     atlas_labels: PathLike | None, created: str) -> str:
    parts = []
    prov = dict(provenance or {})
    command = _command_text(prov)
    if command:
        parts.append(f'<h3>Command line</h3><pre class="command">{_e(command)}</pre>')
    else:
        parts.append('<p class="note">No command line was recorded for this report.</p>')
    facts = [("hdar-pipeline", prov.get("version") or __version__)]
    for key, name in (("time", "Run started"), ("host", "Host"), ("cwd", "Working directory"),
                      ("python_version", "Python"), ("slurm_job_id", "SLURM job"), ("log", "Log file")):
        if prov.get(key):
            facts.append((name, str(prov[key])))
    facts.append(("Report drawn", created))
    facts.append(("Atlas", str(atlas)))
    facts.append(("Atlas labels", str(atlas_labels) if atlas_labels is not None else "none"))
    for entry in entries:
        facts.append((f"Device, {method_title(entry.method)} (as run)", entry.device or "n/a"))
    parts.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts) + "</table>")
    options = prov.get("options")
    if isinstance(options, Mapping) and options:
        rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(_option_text(v))}</code></td></tr>"
                       for k, v in options.items())
        parts.append("<details><summary>Options of the run (as resolved; <code>device</code> is the one "
                     "requested, the devices above are those used)</summary>"
                     f"<table>{rows}</table></details>")
    return "\n".join(parts)


def _option_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "(none)"
    return "(not set)" if value is None else str(value)


def _methods_html(methods_file: PathLike | None, base: Path) -> str:
    if methods_file is None or not Path(methods_file).is_file():
        return '<p class="note">No methods text was found (it is written as <code>logs/CITATION.md</code>).</p>'
    md = Path(methods_file)
    links = [f'<a href="{_e(_href(p, base))}">{_e(p.name)}</a>' for p in
             (md, md.with_suffix(".html"), md.with_suffix(".bib")) if p.is_file()]
    body = _markdown_fragment(md.read_text(encoding="utf-8"), shift=1)
    return (f'<p class="note">The methods text of the run, to be copied into a manuscript: {", ".join(links)}.</p>'
            f'<div class="methods">{body}</div>')


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
    t1w: PathLike | None = None,
    brain_mask: PathLike | None = None,
    provenance: Mapping[str, Any] | None = None,
    methods_file: PathLike | None = None,
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
        The atlas (fixed) image; defines the grid every atlas-space figure is drawn on.
    atlas_labels : path-like or None
        The atlas label map on the atlas grid; its boundaries are drawn over the images and it is the brain of
        the Jacobian statistics. Without it, the boundaries of the atlas brain (voxels above 1 % of its maximum)
        and of a grey/white-like Otsu level are drawn.
    entries : sequence of ReportEntry
        One per method, in display order; ``status == "error"`` entries get an error box and no figures.
    atlas_name : str
        The ``space-`` label of the figure names (e.g. ``MNI152NLin2009aSym``).
    figures_dir : path-like, optional
        Where the SVG reportlets go; default ``<out_html parent>/sub-<subject>/figures/``.
    title_extra : str
        Appended to the page title (e.g. the dataset name).
    t1w, brain_mask : path-like, optional
        The subject's native T1w and its brain mask (same grid): the brain-mask reportlet.
    provenance : mapping, optional
        What ran: ``command`` (or ``argv``), ``options``, ``version``, ``time``, ``host``, ... (the App's
        ``logs/*_command.json``).
    methods_file : path-like, optional
        The methods text (``CITATION.md``), shown in the report and linked with its ``.html`` and ``.bib``.

    Returns
    -------
    Path
        ``out_html``.

    Notes
    -----
    The reportlets are SVG files composed with nireports (the NiPreps visual report system), :data:`N_CUTS`
    slices per axis through the bounding box of the atlas labels (or brain), in RAS orientation:

    * ``..._desc-<method>_flicker.svg``: the atlas (fixed) and the subject warped onto it (moving) alternate
      while the pointer is over the figure, the atlas label boundaries drawn on both;
    * ``..._desc-<method>_beforeafter.svg``: the subject after the affine alone and after the method, alternating
      the same way (when ``affine`` is given);
    * ``..._desc-<method>_jacobian.svg``: the Jacobian determinant of the transform;
    * ``<subject>_desc-brain_mask.svg``: the brain mask on the native T1w.

    The page embeds them with ``<object>`` (as the NiPreps reports do: the animation needs the SVG as a document,
    not an ``<img>``) from the figures folder, with relative links, and loads nothing from the network. A figure
    that cannot be made (an unreadable file, an image on another grid) gives a warning box instead of stopping
    the report.
    """
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    base = out_html.parent
    sub = _bids_label(subject, "sub")
    ses = _bids_label(session, "ses") if session else ""
    space = _bids_label(atlas_name)
    figures = Path(figures_dir) if figures_dir is not None else base / f"sub-{sub}" / "figures"
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    for old in figures.glob(f"{stem}_space-{space}_desc-*_contours.png"):  # an earlier version's figures
        old.unlink()
        old.with_name(old.name.replace("_contours.png", "_jacobian.png")).unlink(missing_ok=True)

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
    # The brain: the atlas labels (the evaluation's mask); without labels the atlas voxels above 1 % of its
    # maximum, holes filled.
    if labels_data is not None:
        brain = labels_data > 0
        regions = labels_data.astype(np.int32)
    else:
        brain = ndimage.binary_fill_holes(atlas_data > 0.01 * float(np.max(atlas_data)))
        regions = brain.astype(np.int32)
        if np.any(brain):
            regions += brain & (atlas_data > _otsu(atlas_data[brain]))
    from nireports.reportlets.utils import cuts_from_bbox

    brain_ras = _canonical(brain.astype(np.uint8), grid.affine)
    box = _box(np.asarray(brain_ras.dataobj) > 0)

    def view(data: np.ndarray) -> nib.Nifti1Image:
        """A volume on the atlas grid as drawn: RAS orientation, cropped to the brain's bounding box."""
        return _canonical(data, grid.affine).slicer[box]

    cuts = cuts_from_bbox(brain_ras if np.any(brain) else _canonical(np.ones(grid.shape, np.uint8), grid.affine),
                          cuts=N_CUTS)
    edges = _edges(view(regions))
    outline = _edges(view(brain.astype(np.uint8)))
    cache: dict[str, list[str]] = {}

    def rows(path: PathLike | np.ndarray, div_id: str, label: str) -> list[str]:
        key = f"{div_id}:{path if not isinstance(path, np.ndarray) else 'atlas'}"
        if key not in cache:
            data = path if isinstance(path, np.ndarray) else _load_on_grid(path, grid, "image")
            cache[key] = _mosaic(view(data), cuts, div_id=div_id, label=label, limits=_limits(data, brain),
                                 edges=edges)
        return cache[key]

    used_desc: dict[str, int] = {}
    sections: list[str] = []
    summary_rows: list[str] = []
    nav: list[tuple[str, str]] = [("summary", "Summary")]
    for entry in entries:
        desc = _bids_label(entry.method)
        used_desc[desc] = used_desc.get(desc, 0) + 1
        if used_desc[desc] > 1:
            desc = f"{desc}{used_desc[desc]}"
        anchor = f"method-{desc}"
        title = method_title(entry.method)
        nav.append((anchor, title))
        ok = str(entry.status).lower() == "ok"
        metrics: dict[str, Any] = dict(entry.metrics or {})
        body: list[str] = []
        if ok:
            body = _method_body(entry, desc, title, stem, space, figures, base, atlas_img, atlas_data, brain,
                                cuts, outline, metrics, rows, atlas_name, view)
        else:
            step = f" at the <strong>{_e(entry.failed_step)}</strong> step" if entry.failed_step else ""
            message = entry.error or "(no message)"
            body.append(f'<div class="error"><strong>{_e(title)} failed</strong>{step}. No figures were made for '
                        f"this method.<pre>{_e(message)}</pre></div>")
        status_html = '<span class="ok">ok</span>' if ok else (
            '<span class="failed">error</span>' + (f" ({_e(entry.failed_step)})" if entry.failed_step else ""))
        sections.append(f'<section id="{_e(anchor)}"><h2>{_e(title)}'
                        + (f' <span class="note">(preset {_e(entry.preset)})</span>' if entry.preset else "")
                        + "</h2>\n" + "\n".join(body) + "</section>")
        summary_rows.append(
            f'<tr><td><a href="#{_e(anchor)}">{_e(title)}</a></td><td>{status_html}</td>'
            f'<td>{_e(entry.preset) or "&ndash;"}</td>'
            f'<td class="num">{_e(_fmt(metrics.get("mean_dice")))}</td>'
            f'<td class="num">{_e(_fmt(metrics.get("folded_percent_mask")))}</td>'
            f'<td class="num">{_e(_fmt(metrics.get("log_jacobian_std_mask")))}</td>'
            f'<td class="num">{_e(_fmt_runtime(entry.runtime_s))}</td><td>{_e(entry.device or "n/a")}</td></tr>')

    mask_html = ""
    if t1w is not None and brain_mask is not None:
        nav.insert(1, ("brain-mask", "Brain mask"))
        try:
            svg = _mask_reportlet(t1w, brain_mask, figures / f"{stem}_desc-brain_mask.svg")
            mask_html = _figure(svg, base, "Brain mask", "The brain mask (outline) on the subject's T1w, in its own "
                                "space, " + f"{N_CUTS} slices per axis. The outline should follow the brain's surface: "
                                "no skull or dura inside, no cortex outside.")
        except Exception as exc:  # one bad file never stops the report
            warnings.warn(f"QC report: no brain-mask figure: {exc}", stacklevel=2)
            mask_html = f'<p class="warning">No brain-mask figure: {_e(exc)}</p>'
        mask_html = f'<section id="brain-mask"><h2>Brain mask</h2>{mask_html}</section>'
    nav += [("provenance", "Provenance"), ("methods", "Methods")]

    label_text = f"sub-{sub}" + (f", ses-{ses}" if ses else "")
    page_title = f"Registration QC: {label_text}" + (f" ({title_extra})" if title_extra else "")
    n_ok = sum(str(e.status).lower() == "ok" for e in entries)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = "labels" if labels_data is not None else "brain"
    guide = (
        f"<p>Each method registered this subject's T1w onto the atlas <strong>{_e(atlas_name)}</strong>. The "
        f"atlas-space figures show {N_CUTS} slices per axis (axial, sagittal, coronal rows) through the atlas "
        f"{where}, left of the brain on the left. <strong>Hover over a figure</strong> to alternate its two "
        "images.</p><ul>"
        "<li><strong>Atlas vs subject</strong>: the atlas and the subject warped onto it alternate, the atlas "
        + ("label boundaries" if labels_data is not None else "brain outline and grey/white level")
        + " drawn in red on both. After a good registration the anatomy does not move between the two and the "
        "lines follow the subject's anatomy (sulci, ventricles, deep grey matter).</li>"
        "<li><strong>Before / after</strong>: the subject after the affine alone and after the method: what the "
        "deformable step changed.</li>"
        "<li><strong>Jacobian determinant</strong> det J: the local volume change of the transform. White "
        "(det J = 1) keeps volume, blue shrinks, red expands; <span style=\"color:#00a000\">green</span> voxels "
        "(det J &le; 0) are folded: the transform is not invertible there. A smooth, mostly pale map without "
        "green is what a plausible deformation looks like.</li>"
        "<li><strong>Metrics</strong>: the overlap of the subject's labels warped onto the atlas with the atlas "
        "labels (1 is perfect; distances in mm, lower is better) and the deformation statistics, "
        "from the run's evaluation.</li></ul>")
    summary = ("<table><thead><tr><th>Method</th><th>Status</th><th>Preset</th><th>Mean Dice</th>"
               "<th>Folded voxels, brain (%)</th><th>SD of log det J, brain</th><th>Runtime</th>"
               "<th>Device (as run)</th></tr></thead>\n" + "\n".join(summary_rows) + "</table>")
    nav_html = "<nav>" + "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in nav) + "</nav>"
    doc = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(page_title)}</title>
<style>{_CSS}</style>
</head>
<body>
{nav_html}
<h1>{_e(page_title)}</h1>
<p class="note">Atlas: {_e(atlas_name)} ({_e(Path(atlas).name)}{", labels " + _e(Path(atlas_labels).name) if atlas_labels is not None else ", no label map"});
{len(entries)} method(s), {n_ok} succeeded. Generated by hdar-pipeline {_e(__version__)} on {_e(created)}.</p>
<section id="summary"><h2>Summary</h2>
{summary}
<h3>How to read this report</h3>
{guide}</section>
{mask_html}
{chr(10).join(sections)}
<section id="provenance"><h2>Provenance</h2>
{_provenance_html(provenance, entries, atlas, atlas_labels, created)}</section>
<section id="methods"><h2>Methods</h2>
{_methods_html(methods_file, base)}</section>
<footer>hdar-pipeline {_e(__version__)} &middot; reportlets (SVG, nireports) in <code>{_e(_href(figures, base))}/</code></footer>
</body>
</html>
"""
    out_html.write_text(doc, encoding="utf-8")
    return out_html


def _figure(svg: Path, base: Path, alt: str, caption: str) -> str:
    return (f'<figure><object class="svg-reportlet" type="image/svg+xml" data="{_e(_href(svg, base))}">'
            f"{_e(alt)}: the figure {_e(svg.name)} could not be shown by this browser.</object>"
            f"<figcaption>{caption}</figcaption></figure>")


def _method_body(entry: ReportEntry, desc: str, title: str, stem: str, space: str, figures: Path, base: Path,
                 atlas_img: nib.Nifti1Image, atlas_data: np.ndarray, brain: np.ndarray,
                 cuts: Mapping[str, Sequence[float]], outline: Mapping[str, nib.Nifti1Image],
                 metrics: dict[str, Any], rows: Any, atlas_name: str, view: Any) -> list[str]:
    body: list[str] = []
    name = f"{stem}_space-{space}_desc-{desc}"
    # (a) atlas vs warped subject, and (b) before (affine only) vs after
    if entry.warped is None:
        body.append('<p class="warning">No warped image was given; no registration figure.</p>')
    else:
        try:
            after = rows(entry.warped, "moving-image", f"subject, {title}")
            svg = _compose(rows(atlas_data, "fixed-image", f"atlas {atlas_name}"), after,
                           figures / f"{name}_flicker.svg")
            body.append("<h3>Atlas vs subject</h3>" + _figure(
                svg, base, f"{title}: atlas and warped subject",
                f"The atlas (shown) and the subject warped onto it by {_e(title)} (on hover) alternate; the atlas "
                "boundaries are drawn on both. Nothing should move between the two."))
            if entry.affine is None:
                body.append('<p class="note">No affine-only image was given (registration without the '
                            "preprocessing step); no before/after figure.</p>")
            else:
                svg = _compose(after, rows(entry.affine, "before-image", "subject, affine only"),
                               figures / f"{name}_beforeafter.svg")
                body.append("<h3>Before / after</h3>" + _figure(
                    svg, base, f"{title}: affine only and deformable",
                    f"The subject after {_e(title)} (shown) and after the affine alone (on hover), on the atlas "
                    "grid, with the atlas boundaries: what the deformable registration changed."))
        except Exception as exc:  # one bad file never stops the report
            warnings.warn(f"QC report: no registration figure for {entry.method}: {exc}", stacklevel=3)
            body.append(f'<p class="warning">No registration figure: {_e(exc)}</p>')
    # (c) Jacobian
    computed: set[str] = set()
    if entry.jacobian is None and entry.transform is None:
        body.append('<p class="warning">No transform (and no Jacobian map) was given; no Jacobian figure.</p>')
    else:
        try:
            jac = _load_jacobian(entry, atlas_img)
            from hdar_pipeline.evaluation.metrics import jacobian_statistics

            missing = [k for k in _JACOBIAN_KEYS if _is_missing(metrics.get(k))]
            if missing:  # the record was not evaluated: the same statistics, from the map
                stats = jacobian_statistics(jac, brain)
                for key in (*missing, "n_voxels", "mask_voxels"):
                    if _is_missing(metrics.get(key)) and not _is_missing(stats.get(key)):
                        metrics[key] = stats[key]
                        computed.add(key)
            svg = _jacobian_mosaic(view(np.nan_to_num(jac.astype(np.float32), nan=1.0)), cuts, outline, jac[brain],
                                   f"det J, {title}", figures / f"{name}_jacobian.svg")
            folded = _metric_value(metrics.get("folded_percent_mask"), "%")
            body.append("<h3>Jacobian determinant</h3>" + _figure(
                svg, base, f"{title}: Jacobian determinant",
                "Jacobian determinant of the transform (white 1, blue shrinkage, red expansion, green folded voxels "
                f"det J &le; 0); grey: the brain outline. <strong>Folded voxels in the brain: {_e(folded)}</strong>."))
        except Exception as exc:
            warnings.warn(f"QC report: no Jacobian figure for {entry.method}: {exc}", stacklevel=3)
            body.append(f'<p class="warning">No Jacobian figure: {_e(exc)}</p>')
    # (d) metrics
    body.append("<h3>Metrics</h3>" + _metrics_table(entry, metrics, computed))
    return body
