"""Label overlap, surface distance and deformation-quality metrics.

Overlap measures (Klein et al. 2009, NeuroImage 46:786-802)
-----------------------------------------------------------
For one label ``r``, let ``S`` be the voxels labelled ``r`` in the *source* (the warped labels that a
method produced, "labels") and ``T`` the voxels labelled ``r`` in the *target* (the reference, e.g. the
atlas or fixed-image labels). With ``|.|`` the number of voxels:

===================  ==================================  ========================================
column               definition                          SimpleITK ``LabelOverlapMeasuresImageFilter``
                                                         ``.Execute(source=S, target=T)``
===================  ==================================  ========================================
``target_overlap``   ``|S∩T| / |T|``                     not provided; equals ``1 - GetFalseNegativeError``
``mean_overlap``     ``2|S∩T| / (|S|+|T|)``              ``GetMeanOverlap`` (identical)
``dice``             same as ``mean_overlap``            ``GetDiceCoefficient`` (identical)
``jaccard``          ``|S∩T| / |S∪T|`` (union overlap)   ``GetJaccardCoefficient`` / ``GetUnionOverlap``
``false_negative``   ``|T\\S| / |T|``                     ``GetFalseNegativeError`` (identical)
``false_positive``   ``|S\\T| / |S|``                     **differs**: ITK's ``GetFalsePositiveError`` is
                                                         ``|S\\T| / |complement of T|`` (the false
                                                         positive *rate*, whose denominator counts every
                                                         voxel of the image not labelled ``r`` in T).
                                                         Klein's definition is ITK's
                                                         ``GetFalseDiscoveryRate``.
``volume_similarity`` ``2(|S|-|T|) / (|S|+|T|)``         ``GetVolumeSimilarity`` (identical, same sign:
                                                         positive when the warped label is larger)
===================  ==================================  ========================================

Surface distances
-----------------
The *surface* ``∂X`` of a binary object ``X`` is the set of voxels of ``X`` that have at least one of
their 6 face neighbours outside ``X`` (voxels beyond the image border count as outside). For a voxel
``x`` of ``∂A``, ``d(x, ∂B)`` is the Euclidean distance in millimetres between the centre of ``x`` and
the nearest voxel centre of ``∂B``, with the voxel spacing of the image honoured
(``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``; the grid axes are assumed
orthogonal, which holds for every affine without shear). With ``D_AB = {d(a, ∂B) : a ∈ ∂A}`` and
``D_BA = {d(b, ∂A) : b ∈ ∂B}``:

* ``hd95_mm = max(P95(D_AB), P95(D_BA))``, ``P95`` the 95th percentile with linear interpolation
  (``numpy.percentile``), as MONAI's ``compute_hausdorff_distance(percentile=95)`` defines it;
* ``msd_mm`` (mean symmetric surface distance, ASSD) ``= (ΣD_AB + ΣD_BA) / (|∂A| + |∂B|)``;
* ``hd_mm = max(max D_AB, max D_BA)``, the surface Hausdorff distance. SimpleITK's
  ``HausdorffDistanceImageFilter`` measures from every voxel of one object to the nearest voxel of the
  other (interior voxels included, distance 0 inside the other object); the two agree whenever the
  farthest point lies outside the other object, which is the usual case, and can differ when one object
  is nested deep inside the other.

Each label is cropped to the bounding box of ``A ∪ B`` (plus one voxel) before the distance
transforms, which is exact (every surface voxel of either object lies in the box) and makes 56 labels
of a 160x192x160 volume take about a second.

Labels are scored against the reference. A reference label that the other map lost entirely
(``missing_in_labels``) overlaps nothing: Dice, Jaccard, target and mean overlap 0, false negative 1, volume
similarity -2, counted in every mean (skipping it would reward a method for losing a structure); its false
positive rate and surface distances are undefined (NaN). A label absent from the reference
(``missing_in_reference``, ``missing_in_both``) is not scored: NaN everywhere. The ``flag`` column says which
image lacks a label (never a dropped row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # pragma: no cover (pandas is imported where tables are built: `hdar register`
    import pandas as pd  # never needs it, and it costs 0.15 s of start-up)

    from hdar_pipeline.core.transforms import Transform

#: Per-label columns written by :func:`label_metrics`, in order.
OVERLAP_COLUMNS = ["dice", "jaccard", "target_overlap", "mean_overlap", "false_negative", "false_positive",
                   "volume_similarity"]
DISTANCE_COLUMNS = ["hd95_mm", "msd_mm", "hd_mm"]
LABEL_METRICS = OVERLAP_COLUMNS + DISTANCE_COLUMNS
LABEL_COLUMNS = ["label", "name", *OVERLAP_COLUMNS, "hd95_mm", "msd_mm", "reference_voxels", "labels_voxels",
                 "hd_mm", "flag"]

#: Values of the ``flag`` column.
FLAG_OK = ""
FLAG_MISSING_IN_LABELS = "missing_in_labels"
FLAG_MISSING_IN_REFERENCE = "missing_in_reference"
FLAG_MISSING_IN_BOTH = "missing_in_both"

#: Direction of each metric: +1 higher is better, -1 lower is better, 0 closer to zero is better.
METRIC_DIRECTION: dict[str, int] = {
    "dice": 1, "jaccard": 1, "target_overlap": 1, "mean_overlap": 1,
    "false_negative": -1, "false_positive": -1, "volume_similarity": 0,
    "hd95_mm": -1, "msd_mm": -1, "hd_mm": -1,
    "folded_percent": -1, "folded_percent_mask": -1, "log_jacobian_std": -1, "log_jacobian_std_mask": -1,
    "runtime_s": -1, "peak_memory_mb": -1,
}


# --------------------------------------------------------------------------- overlap


def _as_label_array(data) -> np.ndarray:
    arr = np.asarray(data.dataobj) if hasattr(data, "dataobj") else np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D label array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if np.any(rounded != arr):
            raise ValueError("label array has non-integer values")
        arr = rounded
    if arr.size and arr.min() < 0:
        raise ValueError("label array has negative values")
    return arr.astype(np.intp, copy=False)


def overlap_counts(reference: np.ndarray, labels: np.ndarray, label_values: Sequence[int]) -> pd.DataFrame:
    """Voxel counts ``|T|``, ``|S|`` and ``|S∩T|`` for each label.

    Parameters
    ----------
    reference, labels : ndarray of int, shape (X, Y, Z)
        Target (reference) and source (warped) label maps on the same grid.
    label_values : sequence of int
        Labels to count (values absent from an image get 0).

    Returns
    -------
    pandas.DataFrame
        Index ``label``; int64 columns ``reference_voxels``, ``labels_voxels``, ``intersection_voxels``.
    """
    import pandas as pd

    ref = _as_label_array(reference)
    lab = _as_label_array(labels)
    if ref.shape != lab.shape:
        raise ValueError(f"label maps differ in shape: {ref.shape} vs {lab.shape}")
    values = np.asarray([int(v) for v in label_values], dtype=np.intp)
    n = int(max(ref.max(initial=0), lab.max(initial=0), values.max(initial=0))) + 1
    t = np.bincount(ref.ravel(), minlength=n)
    s = np.bincount(lab.ravel(), minlength=n)
    same = ref == lab
    i = np.bincount(ref[same], minlength=n)
    return pd.DataFrame({"reference_voxels": t[values].astype(np.int64),
                         "labels_voxels": s[values].astype(np.int64),
                         "intersection_voxels": i[values].astype(np.int64)},
                        index=pd.Index(values.astype(np.int64), name="label"))


def overlap_from_counts(t: np.ndarray, s: np.ndarray, i: np.ndarray) -> dict[str, np.ndarray]:
    """Klein 2009 overlap measures from voxel counts (see the module docstring).

    Parameters
    ----------
    t, s, i : array_like of int
        ``|T|`` (reference), ``|S|`` (labels) and ``|S∩T|`` per label.

    Returns
    -------
    dict of str to ndarray of float
        One array per column of :data:`OVERLAP_COLUMNS`; NaN where ``|T| == 0`` (a label the reference
        lacks is not scored); where ``|S| == 0 < |T|`` (a lost label) the measures are the zero-overlap
        values (Dice 0, false negative 1, volume similarity -2) and the false positive rate is NaN.
    """
    t = np.asarray(t, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    i = np.asarray(i, dtype=np.float64)
    scored = t > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "dice": 2 * i / (s + t),
            "jaccard": i / (s + t - i),
            "target_overlap": i / t,
            "mean_overlap": 2 * i / (s + t),
            "false_negative": (t - i) / t,
            "false_positive": (s - i) / s,
            "volume_similarity": 2 * (s - t) / (s + t),
        }
    out = {k: np.where(scored, v, np.nan) for k, v in out.items()}
    out["false_positive"] = np.where(scored & (s > 0), out["false_positive"], np.nan)
    return out


# --------------------------------------------------------------------------- surface distances


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a binary object: voxels of ``mask`` with a 6-neighbour outside it.

    Voxels beyond the array border count as outside, so an object touching the border has a surface
    there. Returns a bool array of the same shape.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            sl = [slice(1, -1)] * mask.ndim
            sl[axis] = slice(1 + shift, padded.shape[axis] - 1 + shift)
            interior &= padded[tuple(sl)]
    return mask & ~interior


def directed_surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``, and the reverse.

    Parameters
    ----------
    a, b : ndarray of bool, shape (X, Y, Z)
        Two non-empty binary objects on the same grid.
    spacing : sequence of 3 float
        Voxel size in mm along the array axes.

    Returns
    -------
    d_ab, d_ba : ndarray of float64, shapes (|∂a|,), (|∂b|,)
        ``d(x, ∂b)`` for ``x`` in ``∂a`` and ``d(y, ∂a)`` for ``y`` in ``∂b``. Empty arrays when an
        object is empty.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        return np.empty(0), np.empty(0)
    box = _bounding_box(a | b, margin=1)
    a, b = a[box], b[box]
    sa, sb = surface(a), surface(b)
    spacing = [float(x) for x in spacing]
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return d_ab, d_ba


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def surface_distance_summary(d_ab: np.ndarray, d_ba: np.ndarray, percentile: float = 95.0) -> dict[str, float]:
    """``hd95_mm``, ``msd_mm`` and ``hd_mm`` from two directed surface-distance sets (module docstring).

    NaN for all three when either set is empty.
    """
    if d_ab.size == 0 or d_ba.size == 0:
        return {"hd95_mm": float("nan"), "msd_mm": float("nan"), "hd_mm": float("nan")}
    hd95 = max(float(np.percentile(d_ab, percentile)), float(np.percentile(d_ba, percentile)))
    msd = float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))
    hd = max(float(d_ab.max()), float(d_ba.max()))
    return {"hd95_mm": hd95, "msd_mm": msd, "hd_mm": hd}


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      percentile: float = 95.0) -> dict[str, float]:
    """``hd95_mm``, ``msd_mm`` and ``hd_mm`` between two binary objects (see the module docstring)."""
    return surface_distance_summary(*directed_surface_distances(a, b, spacing), percentile=percentile)


# --------------------------------------------------------------------------- per label


def label_metrics(
    reference: np.ndarray,
    labels: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    label_values: Iterable[int] | None = None,
    names: Mapping[int, str] | None = None,
    distances: bool = True,
) -> pd.DataFrame:
    """Overlap and surface-distance metrics for every label.

    Parameters
    ----------
    reference : ndarray of int, shape (X, Y, Z)
        Target label map (T), e.g. the atlas or fixed-image labels.
    labels : ndarray of int, shape (X, Y, Z)
        Source label map (S), e.g. the moving labels warped onto the reference grid.
    spacing : sequence of 3 float
        Voxel size in mm along the array axes (for the distances).
    label_values : iterable of int, optional
        Labels to report; by default every non-zero label of ``reference``. Background (0) is never
        evaluated. Labels absent from one image still get a row and a ``flag`` (a lost reference label
        scores 0, a label the reference lacks NaN: see the module docstring).
    names : mapping of int to str, optional
        Label names (``""`` where missing).
    distances : bool
        Compute ``hd95_mm``, ``msd_mm`` and ``hd_mm`` (NaN otherwise).

    Returns
    -------
    pandas.DataFrame
        One row per label, columns :data:`LABEL_COLUMNS`.
    """
    import pandas as pd

    ref = _as_label_array(reference)
    lab = _as_label_array(labels)
    if ref.shape != lab.shape:
        raise ValueError(f"label maps differ in shape: {ref.shape} vs {lab.shape}")
    if label_values is None:
        values = np.unique(ref)
    else:
        values = np.unique(np.asarray([int(v) for v in label_values], dtype=np.int64))
    values = [int(v) for v in values if v != 0]
    counts = overlap_counts(ref, lab, values)
    t, s, i = (counts[c].to_numpy() for c in ("reference_voxels", "labels_voxels", "intersection_voxels"))
    table = pd.DataFrame({"label": np.asarray(values, dtype=np.int64)})
    names = names or {}
    table["name"] = [names.get(v, "") for v in values]
    for key, value in overlap_from_counts(t, s, i).items():
        table[key] = value
    dist = {k: np.full(len(values), np.nan) for k in ("hd95_mm", "msd_mm", "hd_mm")}
    if distances and values:
        boxes_r = ndimage.find_objects(ref, max_label=max(values))
        boxes_l = ndimage.find_objects(lab, max_label=max(values))

        def one(row: int) -> tuple[int, dict[str, float] | None]:
            v = values[row]
            br, bl = boxes_r[v - 1], boxes_l[v - 1]
            if br is None or bl is None:
                return row, None
            box = tuple(slice(max(min(p.start, q.start) - 1, 0), min(max(p.stop, q.stop) + 1, n))
                        for p, q, n in zip(br, bl, ref.shape))
            return row, surface_distances(ref[box] == v, lab[box] == v, spacing)

        # the distance transforms release the GIL: the labels side by side, on the threads this process may use
        from concurrent.futures import ThreadPoolExecutor

        from hdar_pipeline.core.runtime import configured_threads

        with ThreadPoolExecutor(max_workers=max(1, min(configured_threads(), len(values)))) as pool:
            for row, d in pool.map(one, range(len(values))):
                if d is not None:
                    for k in dist:
                        dist[k][row] = d[k]
    table["hd95_mm"] = dist["hd95_mm"]
    table["msd_mm"] = dist["msd_mm"]
    table["reference_voxels"] = t.astype(np.int64)
    table["labels_voxels"] = s.astype(np.int64)
    table["hd_mm"] = dist["hd_mm"]
    flag = np.full(len(values), FLAG_OK, dtype=object)
    flag[(t > 0) & (s == 0)] = FLAG_MISSING_IN_LABELS
    flag[(t == 0) & (s > 0)] = FLAG_MISSING_IN_REFERENCE
    flag[(t == 0) & (s == 0)] = FLAG_MISSING_IN_BOTH
    table["flag"] = flag
    return table[LABEL_COLUMNS]


def mean_over_labels(table: pd.DataFrame) -> dict[str, float]:
    """Means of the per-label metrics over the labels where they are defined.

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`label_metrics`.

    Returns
    -------
    dict
        ``mean_<metric>`` for each metric of :data:`LABEL_METRICS` present (NaN values skipped: labels the
        reference lacks; a lost reference label counts with its 0),
        ``n_labels`` (rows), ``n_labels_evaluated`` (rows with a Dice: the reference's labels, lost ones
        included; rows without a flag when the table has no Dice) and ``n_labels_missing`` (rows with a flag).
    """
    import pandas as pd

    out: dict[str, float] = {}
    for col in LABEL_METRICS:
        if col in table:
            values = pd.to_numeric(table[col], errors="coerce")
            out[f"mean_{col}"] = float(values.mean()) if values.notna().any() else float("nan")
    flagged = _flagged(table["flag"]) if "flag" in table else np.zeros(len(table), bool)
    out["n_labels"] = int(len(table))
    if "dice" in table:  # the labels the means run over: the reference's, lost ones included
        out["n_labels_evaluated"] = int(pd.to_numeric(table["dice"], errors="coerce").notna().sum())
    else:
        out["n_labels_evaluated"] = int((~flagged).sum())
    out["n_labels_missing"] = int(flagged.sum())
    return out


def _flagged(flags: pd.Series) -> np.ndarray:
    """True where a ``flag`` value is set (not empty, not NaN: CSV readers turn "" into NaN)."""
    values = flags.astype(object)
    return np.asarray(values.notna() & (values.astype(str).str.strip() != ""), dtype=bool)


# --------------------------------------------------------------------------- deformation quality

JACOBIAN_COLUMNS = ["folded_percent", "folded_percent_mask", "log_jacobian_std", "log_jacobian_std_mask",
                    "jacobian_min", "jacobian_max", "jacobian_mean", "n_voxels", "mask_voxels"]


def jacobian_statistics(jacobian: "np.ndarray | Transform", mask: np.ndarray | None = None) -> dict[str, float]:
    """Deformation-quality statistics of a Jacobian determinant map.

    Parameters
    ----------
    jacobian : ndarray, shape (X, Y, Z), or Transform
        Jacobian determinant at every fixed voxel (dimensionless), or a
        :class:`~hdar_pipeline.core.transforms.Transform` whose :meth:`jacobian_determinant` is taken.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Region (e.g. the brain) for the ``*_mask`` statistics; NaN for them when absent or empty.

    Returns
    -------
    dict
        ``folded_percent``: % of all voxels with ``det J <= 0``; ``folded_percent_mask``: the same inside
        ``mask``; ``log_jacobian_std``: standard deviation (ddof 0) of ``log(det J)`` over the voxels with
        ``det J > 0``; ``log_jacobian_std_mask``: the same inside ``mask``; ``jacobian_min``,
        ``jacobian_max``, ``jacobian_mean`` over all voxels; ``n_voxels``; ``mask_voxels``.
    """
    if not isinstance(jacobian, np.ndarray):
        jacobian = jacobian.jacobian_determinant()
    # float32 values (no float64 copy of the map), float64 sums
    jac = np.asarray(jacobian, dtype=np.float32)

    def folded(values: np.ndarray) -> float:
        return float(100.0 * np.count_nonzero(values <= 0) / values.size) if values.size else float("nan")

    def log_std(values: np.ndarray) -> float:
        pos = values[values > 0]
        return float(np.log(pos).std(dtype=np.float64)) if pos.size else float("nan")

    out = {"folded_percent": folded(jac.ravel()), "folded_percent_mask": float("nan"),
           "log_jacobian_std": log_std(jac.ravel()), "log_jacobian_std_mask": float("nan"),
           "jacobian_min": float(jac.min()), "jacobian_max": float(jac.max()),
           "jacobian_mean": float(jac.mean(dtype=np.float64)), "n_voxels": int(jac.size), "mask_voxels": 0}
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != jac.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the Jacobian map {jac.shape}")
        inside = jac[mask]
        out["mask_voxels"] = int(inside.size)
        out["folded_percent_mask"] = folded(inside)
        out["log_jacobian_std_mask"] = log_std(inside)
    return out
