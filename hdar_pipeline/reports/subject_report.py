"""Quality-control reports: a per-subject HTML page and the methods paragraph ("boilerplate").

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

Methods paragraph
-----------------
:func:`methods_paragraph` turns what actually ran (methods, their parameters, preprocessing, seed,
versions, weights, the devices used) into a Markdown paragraph with a reference list, for users to paste into a
manuscript; :func:`write_methods` writes it as ``CITATION.md``, ``CITATION.html`` and ``CITATION.bib`` (BibTeX
entries of the references cited). Only what is given is described: a parameter that is not passed in is not
mentioned, never guessed.

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

PathLike = str | os.PathLike

__all__ = ["ReportEntry", "write_subject_report", "methods_paragraph", "write_methods", "REFERENCES", "bibtex",
           "cited_keys"]

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
METHOD_TITLES = {"hdar": "HDAR", "syn": "ANTs SyN", "demons": "Diffeomorphic Demons", "lccdemons": "LCC-Demons",
                 "fireants": "FireANTs", "voxelmorph": "VoxelMorph", "affine": "Affine (ANTs)"}

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


def _method_title(method: str) -> str:
    return METHOD_TITLES.get(method.lower(), method)


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
        facts.append((f"Device, {_method_title(entry.method)} (as run)", entry.device or "n/a"))
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
        title = _method_title(entry.method)
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
    "lorenzi2013": "Lorenzi M, Ayache N, Frisoni GB, Pennec X. LCC-Demons: a robust and accurate symmetric "
                   "diffeomorphic registration algorithm. *NeuroImage*. 2013;81:470-483. "
                   "doi:10.1016/j.neuroimage.2013.04.114",
    "jena2024": "Jena R, Chaudhari P, Gee JC. FireANTs: Adaptive Riemannian Optimization for Multi-Scale "
                "Diffeomorphic Registration. arXiv:2404.01249. 2024",
    "balakrishnan2019": "Balakrishnan G, Zhao A, Sabuncu MR, Guttag J, Dalca AV. VoxelMorph: a learning framework "
                        "for deformable medical image registration. *IEEE Transactions on Medical Imaging*. "
                        "2019;38(8):1788-1800. doi:10.1109/TMI.2019.2897538",
    "dalca2019": "Dalca AV, Balakrishnan G, Guttag J, Sabuncu MR. Unsupervised learning of probabilistic "
                 "diffeomorphic registration for images and surfaces. *Medical Image Analysis*. 2019;57:226-236. "
                 "doi:10.1016/j.media.2019.07.006",
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
    "lorenzi2013": "Lorenzi et al. 2013", "jena2024": "Jena et al. 2024", "balakrishnan2019": "Balakrishnan et al. 2019",
    "dalca2019": "Dalca et al. 2019",
    "tustison2010": "Tustison et al. 2010", "klein2009": "Klein et al. 2009", "jarecka2020": "Jarecka et al. 2020",
    "fonov2009": "Fonov et al. 2009",
}

#: BibTeX entries of :data:`REFERENCES` (same keys, same facts): key -> (entry type, fields).
_BIBTEX: dict[str, tuple[str, dict[str, str]]] = {
    "huang2021": ("article", {
        "author": "Huang, Y. and Ahmad, S. and Fan, J. and Shen, D. and Yap, P.-T.",
        "title": "Difficulty-aware hierarchical convolutional neural networks for deformable registration of brain "
                 "{MR} images",
        "journal": "Medical Image Analysis", "year": "2021", "volume": "67", "pages": "101817",
        "doi": "10.1016/j.media.2020.101817"}),
    "avants2008": ("article", {
        "author": "Avants, B. B. and Epstein, C. L. and Grossman, M. and Gee, J. C.",
        "title": "Symmetric diffeomorphic image registration with cross-correlation: evaluating automated labeling "
                 "of elderly and neurodegenerative brain",
        "journal": "Medical Image Analysis", "year": "2008", "volume": "12", "number": "1", "pages": "26--41",
        "doi": "10.1016/j.media.2007.06.004"}),
    "avants2011": ("article", {
        "author": "Avants, B. B. and Tustison, N. J. and Song, G. and Cook, P. A. and Klein, A. and Gee, J. C.",
        "title": "A reproducible evaluation of {ANTs} similarity metric performance in brain image registration",
        "journal": "NeuroImage", "year": "2011", "volume": "54", "number": "3", "pages": "2033--2044",
        "doi": "10.1016/j.neuroimage.2010.09.025"}),
    "lorenzi2013": ("article", {
        "author": "Lorenzi, M. and Ayache, N. and Frisoni, G. B. and Pennec, X.",
        "title": "{LCC-Demons}: a robust and accurate symmetric diffeomorphic registration algorithm",
        "journal": "NeuroImage", "year": "2013", "volume": "81", "pages": "470--483",
        "doi": "10.1016/j.neuroimage.2013.04.114"}),
    "jena2024": ("misc", {
        "author": "Jena, R. and Chaudhari, P. and Gee, J. C.",
        "title": "{FireANTs}: Adaptive {Riemannian} Optimization for Multi-Scale Diffeomorphic Registration",
        "year": "2024", "eprint": "2404.01249", "archiveprefix": "arXiv"}),
    "balakrishnan2019": ("article", {
        "author": "Balakrishnan, G. and Zhao, A. and Sabuncu, M. R. and Guttag, J. and Dalca, A. V.",
        "title": "{VoxelMorph}: a learning framework for deformable medical image registration",
        "journal": "IEEE Transactions on Medical Imaging", "year": "2019", "volume": "38", "number": "8",
        "pages": "1788--1800", "doi": "10.1109/TMI.2019.2897538"}),
    "dalca2019": ("article", {
        "author": "Dalca, A. V. and Balakrishnan, G. and Guttag, J. and Sabuncu, M. R.",
        "title": "Unsupervised learning of probabilistic diffeomorphic registration for images and surfaces",
        "journal": "Medical Image Analysis", "year": "2019", "volume": "57", "pages": "226--236",
        "doi": "10.1016/j.media.2019.07.006"}),
    "vercauteren2009": ("article", {
        "author": "Vercauteren, T. and Pennec, X. and Perchant, A. and Ayache, N.",
        "title": "Diffeomorphic demons: efficient non-parametric image registration",
        "journal": "NeuroImage", "year": "2009", "volume": "45", "number": "1 Suppl", "pages": "S61--S72",
        "doi": "10.1016/j.neuroimage.2008.10.040"}),
    "lowekamp2013": ("article", {
        "author": "Lowekamp, B. C. and Chen, D. T. and Ib{\\'a}{\\~n}ez, L. and Blezek, D.",
        "title": "The design of {SimpleITK}",
        "journal": "Frontiers in Neuroinformatics", "year": "2013", "volume": "7", "pages": "45",
        "doi": "10.3389/fninf.2013.00045"}),
    "tustison2010": ("article", {
        "author": "Tustison, N. J. and Avants, B. B. and Cook, P. A. and Zheng, Y. and Egan, A. and Yushkevich, P. A. "
                  "and Gee, J. C.",
        "title": "{N4ITK}: improved {N3} bias correction",
        "journal": "IEEE Transactions on Medical Imaging", "year": "2010", "volume": "29", "number": "6",
        "pages": "1310--1320", "doi": "10.1109/TMI.2010.2046908"}),
    "klein2009": ("article", {
        "author": "Klein, A. and Andersson, J. and Ardekani, B. A. and Ashburner, J. and Avants, B. and Chiang, M.-C. "
                  "and Christensen, G. E. and Collins, D. L. and Gee, J. and Hellier, P. and Song, J. H. and "
                  "Jenkinson, M. and Lepage, C. and Rueckert, D. and Thompson, P. and Vercauteren, T. and Woods, R. P. "
                  "and Mann, J. J. and Parsey, R. V.",
        "title": "Evaluation of 14 nonlinear deformation algorithms applied to human brain {MRI} registration",
        "journal": "NeuroImage", "year": "2009", "volume": "46", "number": "3", "pages": "786--802",
        "doi": "10.1016/j.neuroimage.2008.12.037"}),
    "jarecka2020": ("inproceedings", {
        "author": "Jarecka, D. and Goncalves, M. and Markiewicz, C. J. and Esteban, O. and Lo, N. and Kaczmarzyk, J. "
                  "and Ghosh, S.",
        "title": "{Pydra}: a flexible and lightweight dataflow engine for scientific analyses",
        "booktitle": "Proceedings of the 19th Python in Science Conference ({SciPy} 2020)", "year": "2020"}),
    "fonov2009": ("article", {
        "author": "Fonov, V. S. and Evans, A. C. and McKinstry, R. C. and Almli, C. R. and Collins, D. L.",
        "title": "Unbiased nonlinear average age-appropriate brain templates from birth to adulthood",
        "journal": "NeuroImage", "year": "2009", "volume": "47", "number": "Suppl 1", "pages": "S102",
        "doi": "10.1016/S1053-8119(09)70884-5"}),
}

#: Package names in :func:`provenance.library_versions` and how the text names them.
_LIBRARY_NAMES = {"python": "Python", "antspyx": "ANTsPy (antspyx)", "SimpleITK": "SimpleITK", "nibabel": "NiBabel",
                  "numpy": "NumPy", "scipy": "SciPy", "torch": "PyTorch", "pydra": "Pydra", "fireants": "FireANTs"}


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


def _inverse_text(methods: Sequence[str]) -> str:
    """How each method's inverse was obtained: its own (SyN's inverse warp, LCC-Demons' negated velocity) or the
    displacement field inverted by Newton's method (:mod:`hdar_pipeline.core.inverse`)."""
    own = [t for m, t in (("syn", "SyN's own inverse"), ("lccdemons", "LCC-Demons' negated velocity"))
           if m in methods]
    numerical = [m for m in methods if m not in ("syn", "lccdemons", "affine")]
    parts = list(own)
    if numerical:
        parts.append(("for the other methods " if own else "") + "the displacement field inverted by Newton's method")
    return _join(parts) if parts else "the affine inverted exactly"


def _describe_lccdemons(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED) | {"device", "threads"}
    text = ("LCC-Demons registration " + cite("lorenzi2013") + " used hdar-pipeline's PyTorch" + version
            + " implementation of symmetric log-domain diffeomorphic Demons with local correlation coefficient "
              "forces")
    details = []
    if params.get("sigma_lcc") is not None:
        used.add("sigma_lcc")
        details.append(f"a Gaussian correlation window of {_value_text(params['sigma_lcc'])} voxels")
    if params.get("sigma_i") is not None:
        used.add("sigma_i")
        details.append(f"step trade-off sigma_i {_value_text(params['sigma_i'])}")
    if params.get("sigma_fluid") is not None:
        used.add("sigma_fluid")
        details.append(f"each update smoothed by a Gaussian of {_value_text(params['sigma_fluid'])} voxels "
                       "(fluid-like)")
    if params.get("sigma_diff") is not None:
        used.add("sigma_diff")
        details.append(f"the stationary velocity field by one of {_value_text(params['sigma_diff'])} voxels "
                       "(diffusion-like)")
    shrink, iters = params.get("shrink_factors"), params.get("iterations")
    if shrink is not None and iters is not None:
        used |= {"shrink_factors", "iterations"}
        details.append(f"{_value_text(iters)} iterations at shrink factors {_value_text(shrink)}")
    text += (" (" + "; ".join(details) + ")") if details else ""
    text += (", the transformation being the velocity field's exponential computed by scaling and squaring, "
             "and the inverse that of the negated velocity.")
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _describe_fireants(params: Mapping[str, Any], preset: str, version: str, cite: _Citer) -> str:
    used = set(_ALWAYS_SKIPPED) | {"device", "threads", "loss"}
    algorithm = params.get("algorithm")
    used.add("algorithm")
    text = ("Deformable registration used FireANTs" + version + " " + cite("jena2024") + ": "
            + ("symmetric (SyN) " if algorithm == "syn" else "greedy " if algorithm == "greedy" else "")
            + "diffeomorphic registration with compositive warps, adaptive Riemannian optimisation (Adam) and local "
              "normalised cross-correlation")
    details = []
    if params.get("cc_kernel_size") is not None:
        used.add("cc_kernel_size")
        details.append(f"a correlation window of {_value_text(params['cc_kernel_size'])} voxels")
    scales, iters = params.get("scales"), params.get("iterations")
    if scales is not None and iters is not None:
        used |= {"scales", "iterations"}
        details.append(f"{_value_text(iters)} iterations at scales {_value_text(scales)}")
    for key, what in (("smooth_grad_sigma", "gradients smoothed by a Gaussian of {} voxels"),
                      ("smooth_warp_sigma", "the warp by one of {} voxels"), ("optimizer_lr", "learning rate {}")):
        if params.get(key) is not None:
            used.add(key)
            details.append(what.format(_value_text(params[key])))
    text += (" (" + "; ".join(details) + ")") if details else ""
    text += "."
    if preset:
        text += f" Preset: `{preset}`."
    return text + _other_parameters(params, used)


def _devices_text(requested: Any, used: Sequence[str] | None) -> str:
    """Where a method ran: the devices its records name (what was used), else the requested one; ``auto`` is
    never reported as if it were a device."""
    if used:
        names = sorted({str(d) for d in used if d})
        if names:
            return f" It ran on {_join([f'`{d}`' for d in names])}."
    if requested is None:
        return ""
    if str(requested).lower() == "auto":
        return (" Device: chosen at run time (`auto`: the first CUDA GPU when one is available, otherwise the "
                "CPU).")
    return f" Device: `{requested}`."


def _describe_hdar(params: Mapping[str, Any], preset: str, version: str, weights: Mapping | None,
                   cite: _Citer, devices: Sequence[str] | None = None) -> str:
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
    text += _devices_text(get("device"), devices)
    if preset and not (mode is not None and preset == str(mode)):
        text += f" Preset: `{preset}`."
    elif preset:
        used.add("mode")
    return text + _other_parameters(params, used)


def _describe_voxelmorph(params: Mapping[str, Any], preset: str, version: str, cite: _Citer,
                         devices: Sequence[str] | None = None) -> str:
    """The VoxelMorph sentence: the network (its diffeomorphic variant), how it was trained (HDAR's pipeline), the
    pre-alignment and the refinement it ran with, and its weights (name and SHA-256 from ``params``)."""
    used = set(_ALWAYS_SKIPPED) | {"weights", "weights_sha256", "device", "threads", "diffeomorphic"}
    diffeomorphic = params.get("diffeomorphic", True)
    text = ("Deformable registration with VoxelMorph " + cite("balakrishnan2019")
            + (", in its diffeomorphic variant " + cite("dalca2019") if diffeomorphic else "")
            + f", used hdar-pipeline's PyTorch{version} implementation of the network (a U-Net predicting a "
            + ("stationary velocity field, integrated by scaling and squaring" if diffeomorphic
               else "displacement field")
            + "), trained with the package's training pipeline on local normalised cross-correlation, diffusion "
            "regularisation and an auxiliary Dice loss (the settings are in the weights' model card), and HDAR's "
            "inference around it.")
    if params.get("prealign"):
        used.add("prealign")
        text += (" Before the network, a 12-parameter affine map was fitted on local normalised cross-correlation "
                 "at a quarter of the image resolution (Adam).")
    refine = params.get("refine")
    if refine is not None:
        used |= {"refine", "refine_levels", "refine_lr", "refine_similarity", "refine_full_resolution",
                 "refine_diffeomorphic", "refine_gradient_sigma", "refine_smooth_weight"}
        if int(refine) > 0:
            levels = params.get("refine_levels")
            full_res = params.get("refine_full_resolution")
            text += (f" The network's field was refined by {int(refine)} steps per level of instance optimisation "
                     "(Adam on local normalised cross-correlation plus an anti-folding smoothness term"
                     + (", on each of the resolutions " + ", ".join(_value_text(x) for x in levels)
                        + " times the image size" if levels else "")
                     + (f", then {int(full_res)} step{'s' if int(full_res) != 1 else ''} at full resolution"
                        if full_res else "")
                     + (", each correction integrated from a stationary velocity field and composed with the field"
                        if params.get("refine_diffeomorphic") else "") + "), as in HDAR.")
        else:
            text += " No instance-optimisation refinement was applied."
    name, sha = params.get("weights"), params.get("weights_sha256")
    if name is not None or sha is not None:
        text += (" Network weights: " + (f"`{name}`" if name is not None else "")
                 + (f" (SHA-256 `{sha}`)" if sha is not None else "") + ".")
    text += _devices_text(params.get("device"), devices)
    if preset:
        text += f" Preset: `{preset}`."
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
    devices: Mapping[str, Sequence[str]] | None = None,
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
        Package versions; default :func:`~hdar_pipeline.core.provenance.library_versions` plus ``hdar-pipeline``.
    weights : mapping, optional
        HDAR weights description: ``name``, ``sha256`` and optionally ``data`` and ``config`` (a model card).
    engine : str, optional
        ``"pydra"`` when a Pydra workflow ran the registrations (then Pydra is cited). A ``pydra`` entry in
        ``versions`` has the same effect.
    devices : mapping, optional
        Per method, the devices its registrations ran on, as their records say (``"cpu"``, ``"cuda:0"``). The
        text reports these, not the requested ``device`` parameter (``"auto"`` is a request, not a device).

    Returns
    -------
    str
        Markdown: a ``# Methods`` heading, paragraphs, and a ``## References`` numbered list.
    """
    if versions is None:
        from hdar_pipeline.core.provenance import library_versions

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
        from hdar_pipeline.methods.fast_affine import FastAffineMethod

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
        elif key == "lccdemons":
            reg.append(_describe_lccdemons(params, preset, _version_suffix(versions, "torch"), cite))
        elif key == "fireants":
            reg.append(_describe_fireants(params, preset, _version_suffix(versions, "fireants"), cite))
        elif key == "hdar":
            reg.append(_describe_hdar(params, preset, _version_suffix(versions, "torch"), weights, cite,
                                      (devices or {}).get(m, (devices or {}).get(key))))
        elif key == "voxelmorph":
            reg.append(_describe_voxelmorph(params, preset, _version_suffix(versions, "torch"), cite,
                                            (devices or {}).get(m, (devices or {}).get(key))))
        else:
            reg.append(_describe_generic(m, params, preset))
    if reg:
        paragraphs.append("*Registration.* " + " ".join(reg) + " All transforms map atlas points to subject "
                          "points (the ITK/ANTs convention); the subjects' images were resampled onto the atlas "
                          "grid with linear interpolation and their label maps with nearest-neighbour "
                          "interpolation. Each transform was also inverted (subject points to atlas points, stored "
                          "on the subject's grid: "
                          + _inverse_text(lower)
                          + "), its inverse consistency measured over the atlas "
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
    uses_torch = bool(set(lower) & {"hdar", "fireants"}) or (affine_first and affine_method == "fast")
    if seed is not None:
        rngs = ["Python", "NumPy"] + (["PyTorch"] if uses_torch else []) + (
            ["ANTs, through `ANTS_RANDOM_SEED`"] if uses_ants else [])
        repro.append(f"The random number generators ({_join(rngs)}) were seeded with {seed}.")
    skip = {"hdar-pipeline", "hdar_pipeline"} | (set() if uses_torch else {"torch"}) | (
        set() if uses_ants else {"antspyx"}) | (set() if uses_pydra else {"pydra"}) | (
        set() if "fireants" in lower else {"fireants"})
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


def _markdown_fragment(text: str, shift: int = 0) -> str:
    """The small Markdown subset :func:`methods_paragraph` writes (headings, paragraphs, a numbered list,
    ``*emphasis*`` and ```code```) as HTML elements; ``shift`` demotes the headings (``#`` -> ``<h{1+shift}>``)."""

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"<em>\1</em>", s)
        return s

    out: list[str] = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        if block.startswith("## "):
            out.append(f"<h{2 + shift}>{inline(block[3:])}</h{2 + shift}>")
        elif block.startswith("# "):
            out.append(f"<h{1 + shift}>{inline(block[2:])}</h{1 + shift}>")
        elif all(re.match(r"\d+\. ", ln) for ln in lines):
            out.append("<ol>\n" + "\n".join(f"<li>{inline(ln.split('. ', 1)[1])}</li>" for ln in lines) + "\n</ol>")
        else:
            out.append(f"<p>{inline(' '.join(lines))}</p>")
    return "\n".join(out)


def _markdown_to_html(text: str, title: str = "Methods") -> str:
    """:func:`_markdown_fragment` as a standalone HTML page."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            "<style>body { font-family: Georgia, serif; max-width: 50em; margin: 2em auto; line-height: 1.5; "
            "padding: 0 1em; } code { font-size: .9em; }</style>\n</head>\n<body>\n" + _markdown_fragment(text)
            + "\n</body>\n</html>\n")


def cited_keys(text: str) -> list[str]:
    """The keys of :data:`REFERENCES` that a methods text (:func:`methods_paragraph`) cites, in order of first
    citation."""
    found = [(text.find(cite), key) for key, cite in _CITE_TEXT.items() if cite in text]
    return [key for _, key in sorted(found)]


def bibtex(keys: Sequence[str]) -> str:
    """BibTeX entries of the given :data:`REFERENCES` keys (the same references, the same keys)."""
    entries = []
    for key in keys:
        kind, fields = _BIBTEX[key]
        body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields.items())
        entries.append(f"@{kind}{{{key},\n{body}\n}}\n")
    return "\n".join(entries)


def write_methods(out_dir: PathLike, **kwargs: Any) -> list[Path]:
    """Write :func:`methods_paragraph` ``(**kwargs)`` as ``CITATION.md``, ``CITATION.html`` and ``CITATION.bib``
    (BibTeX entries of every reference the text cites, keyed as :data:`REFERENCES`) in ``out_dir``.

    Returns
    -------
    list of Path
        ``[CITATION.md, CITATION.html, CITATION.bib]`` (same text, references included).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = methods_paragraph(**kwargs)
    md = out / "CITATION.md"
    md.write_text(text, encoding="utf-8")
    page = out / "CITATION.html"
    page.write_text(_markdown_to_html(text), encoding="utf-8")
    bib = out / "CITATION.bib"
    bib.write_text(bibtex(cited_keys(text)), encoding="utf-8")
    return [md, page, bib]
