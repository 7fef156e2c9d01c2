"""One evaluation: warped labels against reference labels, plus the deformation quality of a transform.

This is the library behind ``hdar evaluate`` and the evaluation task of the workflows. It reads
files (or takes images in memory), calls :mod:`hdar_pipeline.evaluation.metrics` and returns tidy tables.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from hdar_pipeline.core.images import Grid, ImageError, check_labels_match, load_image
from hdar_pipeline.core.labels import read_label_table
from hdar_pipeline.evaluation.metrics import JACOBIAN_COLUMNS, jacobian_statistics, label_metrics, mean_over_labels

PathLike = str | os.PathLike
ImageLike = PathLike | nib.spatialimages.SpatialImage

#: Identifier columns that :func:`evaluate` prepends when given (in this order).
ID_COLUMNS = ("subject", "session", "method")


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes
    ----------
    labels : pandas.DataFrame
        One row per label (the identifier columns first, then
        :data:`hdar_pipeline.evaluation.metrics.LABEL_COLUMNS`, then any ``extra`` columns).
    summary : pandas.DataFrame
        One row: identifiers, ``mean_<metric>`` over the labels, label counts, the Jacobian statistics
        when a transform was given, and ``extra``.
    jacobian : pandas.DataFrame or None
        One row of Jacobian statistics (identifiers, :data:`~hdar_pipeline.evaluation.metrics.JACOBIAN_COLUMNS`,
        ``mask_source``, ``extra``), or ``None`` without a transform.
    jacobian_map : ndarray, shape (X, Y, Z), or None
        The Jacobian determinant on the reference grid (for figures).
    mask : ndarray of bool or None
        The mask used for the ``*_mask`` Jacobian statistics.
    grid : Grid
        The reference grid.
    runtime_s : float
        Wall-clock seconds the evaluation took.
    """

    labels: pd.DataFrame
    summary: pd.DataFrame
    jacobian: pd.DataFrame | None = None
    jacobian_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    grid: Grid | None = None
    runtime_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def _load_labels(value: ImageLike, what: str, *, allow_empty: bool = False
                 ) -> tuple[nib.spatialimages.SpatialImage, str | None]:
    if isinstance(value, (str, os.PathLike)):
        return load_image(value, labels=True, allow_empty=allow_empty), str(value)
    if not hasattr(value, "dataobj"):
        raise TypeError(f"{what} must be a path or a nibabel image, got {type(value).__name__}")
    return value, None


def evaluate(
    reference_labels: ImageLike,
    labels: ImageLike,
    *,
    transform=None,
    jacobian: ImageLike | None = None,
    mask: ImageLike | np.ndarray | None = None,
    label_table: PathLike | Mapping[int, str] | None = None,
    ids: Mapping[str, object] | None = None,
    extra: Mapping[str, object] | None = None,
    distances: bool = True,
) -> Evaluation:
    """Evaluate warped labels against reference labels (and a transform's Jacobian).

    Parameters
    ----------
    reference_labels : path or nibabel image
        Target label map T; its grid is the fixed grid.
    labels : path or nibabel image
        Source label map S on the same grid (e.g. a method's warped labels).
    transform : Transform, path or list of paths, optional
        The fixed-to-moving transform; files are given in ``ants.apply_transforms`` order and read
        onto the reference grid.
    jacobian : path or nibabel image, optional
        The transform's Jacobian determinant map on the reference grid (e.g. the ``jacobian.nii.gz`` that
        :func:`~hdar_pipeline.pipeline.registration.register_files` wrote), used instead of computing it from
        ``transform``; the same statistics follow.
    mask : path, image or bool array, optional
        Region for the ``*_mask`` Jacobian statistics; by default the reference labels > 0. A mask on
        another grid than the reference is an error.
    label_table : path or mapping, optional
        BIDS ``dseg.tsv`` or FreeSurfer LUT (or ``{label: name}``). The labels of a ``dseg.tsv`` or a
        mapping are evaluated too, so a label listed there but absent from both images still gets a
        (flagged) row; a FreeSurfer LUT only supplies names.
    ids : mapping, optional
        Identifier columns (``subject``, ``session``, ``method`` ...) prepended to every table.
    extra : mapping, optional
        Per-evaluation values appended to every table (e.g. ``runtime_s``, ``peak_memory_mb`` from the
        method).
    distances : bool
        Compute the surface distances (``hd95_mm``, ``msd_mm``, ``hd_mm``).

    Returns
    -------
    Evaluation

    Notes
    -----
    Rows are the union of the non-zero labels of the reference, of ``labels`` and of the label table
    (unless it is a FreeSurfer LUT), sorted. A label absent from either image gets a ``flag``
    (``missing_in_labels``, ``missing_in_reference`` or ``missing_in_both``); a reference label that ``labels``
    lost scores 0 (Dice, overlaps) and counts in the means, a label the reference lacks is NaN and does not.
    """
    start = time.perf_counter()
    ref_img, ref_src = _load_labels(reference_labels, "reference_labels")
    lab_img, lab_src = _load_labels(labels, "labels", allow_empty=True)  # a method may lose every label
    check_labels_match(ref_img, lab_img, image_source=ref_src, labels_source=lab_src)
    grid = Grid.of(ref_img)
    ref = np.asarray(ref_img.dataobj)
    lab = np.asarray(lab_img.dataobj)

    names: Mapping[int, str] = {}
    if label_table is not None:
        names = label_table if isinstance(label_table, Mapping) else read_label_table(label_table)
    # A BIDS dseg.tsv (or a mapping) lists the segmentation's labels: each gets a row even when absent from
    # both images. A FreeSurfer LUT names ~1300 labels, so it only names the labels that are present.
    listed = set() if getattr(names, "format", "bids") == "freesurfer" else set(names)
    values = sorted(set(np.unique(ref).tolist()) | set(np.unique(lab).tolist()) | listed)
    values = [int(v) for v in values if int(v) != 0]
    table = label_metrics(ref, lab, spacing=grid.spacing, label_values=values, names=names, distances=distances)
    notes = []
    if values and not np.any(lab):
        # every label lost (e.g. a registration that failed): each scores 0, as any lost label does
        notes.append(f"{lab_src or 'labels'}: the label map is all background (every label lost); scored 0")
    n_flagged = int((table["flag"] != "").sum())
    if n_flagged:
        notes.append(f"{n_flagged} label(s) missing from one image: "
                     + ", ".join(f"{r.label} ({r.flag})" for r in table[table["flag"] != ""].itertuples()))

    summary = mean_over_labels(table)
    jac_table = None
    jac_map = None
    mask_arr = None
    if jacobian is not None or transform is not None:
        mask_arr, mask_source = _mask_on(mask, grid, ref_src, ref)
        if jacobian is not None:
            jac_src = str(jacobian) if isinstance(jacobian, (str, os.PathLike)) else None
            jac_img = load_image(jacobian) if jac_src else jacobian
            if not Grid.of(jac_img).same_as(grid, atol=1e-3):
                raise ImageError(jac_src, f"the Jacobian map's grid {Grid.of(jac_img).shape} differs from the "
                                          f"reference labels' grid {grid.shape} ({ref_src or 'reference'})")
            jac_map = np.asarray(jac_img.dataobj, dtype=np.float32)
        else:
            from hdar_pipeline.core.transforms import Transform

            if not isinstance(transform, Transform):
                transform = Transform.read(transform, grid=grid)
            if not transform.grid.same_as(grid):
                raise ImageError(ref_src, "the transform's fixed grid differs from the reference labels' grid")
            jac_map = transform.jacobian_determinant()
        stats = jacobian_statistics(jac_map, mask_arr)
        stats["mask_source"] = mask_source
        jac_table = pd.DataFrame([stats])[[*JACOBIAN_COLUMNS, "mask_source"]]
        summary.update({k: v for k, v in stats.items() if k != "mask_source"})
    elif mask is not None:
        _mask_on(mask, grid, ref_src, ref)  # checked all the same: a bad input is never passed over
        notes.append("--mask is used for the Jacobian statistics only; no transform was given")

    summary_table = pd.DataFrame([summary])
    tables = [table, summary_table] + ([jac_table] if jac_table is not None else [])
    for t in tables:
        for key, value in (extra or {}).items():
            t[key] = value
        for pos, (key, value) in enumerate((ids or {}).items()):
            t.insert(pos, key, "" if value is None else value)
    return Evaluation(labels=table, summary=summary_table, jacobian=jac_table, jacobian_map=jac_map, mask=mask_arr,
                      grid=grid, runtime_s=time.perf_counter() - start, notes=notes)


def _mask_on(mask, grid: Grid, ref_src: str | None, ref: np.ndarray) -> tuple[np.ndarray, str]:
    if mask is None:
        return ref > 0, "reference_labels>0"
    if isinstance(mask, np.ndarray):
        if mask.shape != grid.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the reference grid {grid.shape}")
        return mask.astype(bool), "array"
    source = str(mask) if isinstance(mask, (str, os.PathLike)) else None
    img = load_image(mask, labels=True) if source else mask
    if not Grid.of(img).same_as(grid, atol=1e-3):
        raise ImageError(source, f"mask grid {Grid.of(img).shape} differs from the reference labels' grid "
                                 f"{grid.shape} ({ref_src or 'reference'})")
    return np.asarray(img.dataobj) > 0, source or "image"


def output_paths(out_csv: PathLike) -> dict[str, Path]:
    """Paths that :func:`evaluate_files` writes for ``out_csv`` (``OUT.csv`` -> ``OUT_jacobian.csv`` ...)."""
    out = Path(out_csv)
    suffix = out.suffix if out.suffix.lower() in (".csv", ".tsv") else ".csv"
    stem = out.name[: -len(out.suffix)] if out.suffix.lower() in (".csv", ".tsv") else out.name
    base = out.parent / stem
    return {"labels": out if out.suffix.lower() in (".csv", ".tsv") else out.with_name(stem + suffix),
            "summary": Path(f"{base}_summary{suffix}"), "jacobian": Path(f"{base}_jacobian{suffix}"),
            "jacobian_figure": Path(f"{base}_jacobian")}


def write_table(table: pd.DataFrame, path: PathLike) -> Path:
    """Write a CSV (or TSV for a ``.tsv`` suffix); NaN as an empty field; parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    return path


def evaluate_files(
    reference_labels: PathLike,
    labels: PathLike,
    out_csv: PathLike,
    *,
    transform: PathLike | Sequence[PathLike] | None = None,
    jacobian: PathLike | None = None,
    mask: PathLike | None = None,
    label_table: PathLike | None = None,
    ids: Mapping[str, object] | None = None,
    extra: Mapping[str, object] | None = None,
    distances: bool = True,
    figures: bool = True,
    other_inputs: Mapping[str, PathLike | None] | None = None,
) -> tuple[Evaluation, dict[str, list[Path] | Path]]:
    """Run :func:`evaluate` and write its tables (and a Jacobian figure).

    Writes ``OUT.csv`` (one row per label), ``OUT_summary.csv`` (one row), and with a transform (or its
    ``jacobian`` map) ``OUT_jacobian.csv`` (one row) and, if ``figures``, ``OUT_jacobian.png`` / ``.svg``.

    Parameters
    ----------
    other_inputs : mapping, optional
        More files the caller read (``{"--record": path}``), protected like the others.

    Returns
    -------
    (Evaluation, dict)
        The evaluation and the written paths by kind.

    Raises
    ------
    InputError
        Before any work: an input is missing, or an output would be a folder, be unwritable or overwrite an
        input (``-o`` naming the reference labels, a transform file ...).
    """
    from hdar_pipeline.core.input_guard import InputGuard

    guard = InputGuard({"REFERENCE_LABELS": reference_labels, "LABELS": labels, "--transform": transform,
                        "--jacobian": jacobian, "--mask": mask, "--label-table": label_table, **dict(other_inputs or {})})
    paths = output_paths(out_csv)
    figure = paths["jacobian_figure"]
    guard.output_file(paths["labels"], "-o/--output",
                      also=[paths["summary"], paths["jacobian"], figure.with_name(figure.name + ".png"),
                            figure.with_name(figure.name + ".svg")])
    result = evaluate(reference_labels, labels, transform=transform, jacobian=jacobian, mask=mask,
                      label_table=label_table, ids=ids, extra=extra, distances=distances)
    written: dict[str, list[Path] | Path] = {"labels": write_table(result.labels, paths["labels"]),
                                             "summary": write_table(result.summary, paths["summary"])}
    if result.jacobian is not None:
        written["jacobian"] = write_table(result.jacobian, paths["jacobian"])
        if figures:
            from hdar_pipeline.evaluation.figures import plot_jacobian_slices

            written["jacobian_figure"] = plot_jacobian_slices(result.jacobian_map, paths["jacobian_figure"],
                                                              mask=result.mask, grid=result.grid)
    guard.verify()
    return result, written


def read_registration_record(path: PathLike) -> dict[str, object]:
    """``runtime_s``, ``peak_memory_mb`` (and ``device``) from a ``registration.json`` written by a method."""
    import json

    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be read as a registration record ({exc})") from None
    return {k: record[k] for k in ("runtime_s", "peak_memory_mb", "device") if k in record}
