"""BIDS-Derivatives out: derivative names, sidecars, the dataset description, the atlas and each subject's
registration outputs.

:func:`derivative_path` builds fMRIPrep-style names inside the output dataset::

    sub-<l>[/ses-<s>]/anat/sub-<l>[_ses-<s>]_space-<atlas>_desc-<method>_T1w.nii.gz
    sub-<l>[/ses-<s>]/anat/sub-<l>[_ses-<s>]_from-T1w_to-<atlas>_mode-image_desc-<method>_xfm.h5
    sub-<l>[/ses-<s>]/anat/sub-<l>[_ses-<s>]_space-<atlas>_desc-<method>_dseg.nii.gz
    sub-<l>[/ses-<s>]/anat/sub-<l>[_ses-<s>]_space-<atlas>_desc-<method>_metrics.json / .tsv

The ``xfm.h5`` is an ITK composite transform mapping atlas points to native subject points, so
``ants.apply_transforms(fixed=atlas, moving=subject_T1w, transformlist=[xfm])`` brings the subject to
the atlas. :func:`write_subject_derivatives` copies one registration record's files under those
names with a JSON sidecar each; :func:`read_subject_metrics` reads them back for the group level.

The library never writes into the input dataset: every writer here takes the *output* folder, and the
commands check it against every input before the work (:mod:`hdar_pipeline.core.input_guard`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hdar_pipeline._version import __version__
from hdar_pipeline.bids_io.inputs import BIDS_VERSION, BIDSError, check_label

PathLike = str | os.PathLike
from hdar_pipeline.core.provenance import json_default
from hdar_pipeline.core.subject_record import SubjectRecord, as_record


def check_output_dir(output_dir: PathLike, bids_dir: PathLike | None = None, *, what: str = "output folder") -> Path:
    """Resolve an output (or work) folder, refusing one inside the input dataset: nothing is ever
    written into BIDS_DIR, not even under its ``derivatives/``. A thin front to
    :meth:`hdar_pipeline.core.input_guard.InputGuard.output_folder`, where the rule lives (the folder is not created).

    Raises
    ------
    BIDSError
        The folder is, or lies inside, BIDS_DIR, or is a file.
    """
    from hdar_pipeline.core.input_guard import InputError, InputGuard

    try:
        guard = InputGuard(folders={"BIDS_DIR": bids_dir} if bids_dir is not None else {})
        return guard.output_folder(output_dir, what, create=False)
    except InputError as exc:
        raise BIDSError(str(exc)) from None


def entity_prefix(subject: str, session: str = "") -> str:
    """``sub-<l>[_ses-<s>]``."""
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def subject_dir(output_dir: PathLike, subject: str, session: str = "", datatype: str = "anat") -> Path:
    """``OUTPUT/sub-<l>[/ses-<s>]/<datatype>``."""
    d = Path(output_dir) / f"sub-{subject}"
    if session:
        d = d / f"ses-{session}"
    return d / datatype


def derivative_path(output_dir: PathLike, subject: str, session: str = "", *, suffix: str, extension: str,
                    space: str | None = None, desc: str | None = None, from_: str | None = None,
                    to: str | None = None, mode: str | None = None, seg: str | None = None) -> Path:
    """The BIDS-Derivatives path of one output (entities in the order fMRIPrep writes them).

    Examples
    --------
    >>> derivative_path("out", "01", space="MNI", desc="syn", suffix="T1w", extension=".nii.gz").as_posix()
    'out/sub-01/anat/sub-01_space-MNI_desc-syn_T1w.nii.gz'
    >>> derivative_path("out", "01", "a", from_="T1w", to="MNI", mode="image", desc="syn", suffix="xfm",
    ...                 extension=".h5").name
    'sub-01_ses-a_from-T1w_to-MNI_mode-image_desc-syn_xfm.h5'
    """
    parts = [entity_prefix(subject, session)]
    for key, value in (("from", from_), ("to", to), ("mode", mode), ("space", space), ("seg", seg), ("desc", desc)):
        if value:
            parts.append(f"{key}-{check_label(value, key)}")
    return subject_dir(output_dir, subject, session) / ("_".join(parts) + f"_{suffix}{extension}")


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar of a data file (``x_T1w.nii.gz`` -> ``x_T1w.json``)."""
    p = Path(path)
    name = p.name
    for ext in (".nii.gz", ".nii", ".h5", ".csv", ".tsv", ".mat"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


def write_json(path: PathLike, data: Mapping[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, sort_keys=False, default=json_default) + "\n")
    return p


def code_url() -> str | None:
    """Where the code that made the derivatives lives: the package's ``Project-URL`` (or ``Home-page``) when its
    metadata has one, else ``None`` (never a path on this machine: a ``CodeURL`` must let a reader find the
    code)."""
    from importlib import metadata

    try:
        meta = metadata.metadata("hdar-pipeline")
        for entry in meta.get_all("Project-URL") or []:
            _, _, url = entry.partition(",")
            if url.strip():
                return url.strip()
        if meta.get("Home-page"):
            return str(meta["Home-page"])
    except metadata.PackageNotFoundError:
        pass
    return None


def bids_uri(path: PathLike | None, datasets: Mapping[str, PathLike] | None = None) -> str | None:
    """A file as a BIDS URI: ``bids:<name>:<relative path>`` when it lies in one of ``datasets`` (name ->
    root; ``""`` is the current dataset, written ``bids::``), else its ``file://`` URI; ``None`` for ``None``.

    Examples
    --------
    >>> bids_uri("/data/raw/sub-01/anat/sub-01_T1w.nii.gz", {"raw": "/data/raw"})
    'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    """
    if path is None:
        return None
    p = Path(path).absolute()
    for name, root in (datasets or {}).items():
        try:
            rel = p.relative_to(Path(root).absolute())
        except ValueError:
            continue
        return f"bids:{name}:{rel.as_posix()}"
    return p.as_uri()


def write_dataset_description(output_dir: PathLike, *, source: PathLike | None = None,
                              name: str = "hdar-pipeline derivatives",
                              links: Mapping[str, PathLike] | None = None) -> Path:
    """``dataset_description.json`` of the derivatives (``DatasetType: derivative``, ``GeneratedBy``,
    ``SourceDatasets``, and ``DatasetLinks`` for every name that ``bids:<name>:`` URIs in the sidecars use:
    ``raw`` is ``source``)."""
    from hdar_pipeline.core.provenance import git_commit

    generated: dict[str, Any] = {"Name": "hdar-pipeline", "Version": __version__}
    url = code_url()
    if url:
        generated["CodeURL"] = url
    commit = git_commit()
    if commit != "unknown":
        generated["Description"] = f"git commit {commit}"
    data: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
    }
    all_links = {**({"raw": source} if source is not None else {}), **dict(links or {})}
    if source is not None:
        data["SourceDatasets"] = [{"URL": Path(source).resolve().as_uri()}]
    if all_links:
        data["DatasetLinks"] = {k: Path(v).resolve().as_uri() for k, v in all_links.items()}
    return write_json(Path(output_dir) / "dataset_description.json", data)


#: Files of the derivatives that no BIDS rule names (``.bidsignore``): reports, figures, group tables, logs, the
#: per-label metric tables and regional volumes.
BIDSIGNORE = ("logs/", "figures/", "group/", "*.html", "*_metrics.tsv", "*_metrics.json", "*_morph.tsv",
              "*_morph.json", "*_jacobian.nii.gz", "*_jacobian.json", "*_xfm.json")


def write_bidsignore(output_dir: PathLike) -> Path:
    """``.bidsignore`` of the derivatives: :data:`BIDSIGNORE`, one pattern a line, keeping lines a user added."""
    path = Path(output_dir) / ".bidsignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    lines += [p for p in BIDSIGNORE if p not in lines]
    path.write_text("\n".join(lines) + "\n")
    return path


def template_path(output_dir: PathLike, space: str, suffix: str, extension: str) -> Path:
    """``OUTPUT/tpl-<space>/tpl-<space>_<suffix><extension>``: the atlas every registration used."""
    check_label(space, "space")
    return Path(output_dir) / f"tpl-{space}" / f"tpl-{space}_{suffix}{extension}"


def write_atlas(output_dir: PathLike, space: str, image: PathLike, *, labels: PathLike | None = None,
                label_table: PathLike | None = None, description: str = "",
                datasets: Mapping[str, PathLike] | None = None,
                sources: Sequence[PathLike] = ()) -> dict[str, str]:
    """Copy the atlas (the fixed image of every registration) into the derivatives as ``tpl-<space>``, so that
    ``SpatialReference`` can name it inside the dataset (``bids::tpl-<space>/tpl-<space>_T1w.nii.gz``).
    ``sources`` are the files it was made from (default: ``image``), as URIs in its sidecar.

    Returns
    -------
    dict
        ``"T1w"``, and ``"dseg"``/``"dseg_tsv"`` when given: ``bids::`` URIs of the copies.
    """
    out = Path(output_dir)
    written = {"T1w": _copy(image, template_path(out, space, "T1w", ".nii.gz"))}
    write_json(sidecar_path(written["T1w"]), {
        "Description": description or f"the atlas {space}: the fixed image of every registration",
        "Sources": [bids_uri(p, datasets) for p in (sources or [image])]})
    if labels is not None:
        written["dseg"] = _copy(labels, template_path(out, space, "dseg", ".nii.gz"))
        write_json(sidecar_path(written["dseg"]), {"Description": f"labels of the atlas {space}",
                                                   "Sources": [bids_uri(labels, datasets)]})
    if label_table is not None:
        written["dseg_tsv"] = _write_dseg_tsv(label_table, template_path(out, space, "dseg", ".tsv"))
    return {k: bids_uri(v, {"": out}) for k, v in written.items()}


def _write_dseg_tsv(table: PathLike | Mapping[int, str], dst: Path) -> Path:
    """A BIDS ``dseg.tsv`` (``index``, ``name``, by index) from a label table file (BIDS or FreeSurfer) or a mapping."""
    from hdar_pipeline.core.labels import read_label_table, write_label_table

    names = read_label_table(table) if isinstance(table, (str, os.PathLike)) else dict(table)
    return write_label_table(dict(sorted(names.items())), dst)


def _copy(src: PathLike, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = Path(src)
    if not (dst.is_file() and dst.stat().st_size == src.stat().st_size
            and _same_bytes(src, dst)):
        shutil.copyfile(src, dst)
    return dst


def _write_tsv(src: PathLike, dst: Path) -> Path:
    """A per-label table (CSV or TSV) as a BIDS ``.tsv``: tab-separated, ``n/a`` for missing values (and empty
    cells), every other value as the source wrote it; an unchanged file is left alone."""
    import pandas as pd

    src = Path(src)
    table = pd.read_csv(src, sep="\t" if src.suffix.lower() == ".tsv" else ",", keep_default_na=False,
                        na_values=["n/a", "", "NaN", "nan"], dtype=str)
    text = table.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not (dst.is_file() and dst.read_text(encoding="utf-8") == text):
        dst.write_text(text, encoding="utf-8")
    return dst


def _same_bytes(a: Path, b: Path) -> bool:
    from hdar_pipeline.core.provenance import sha256

    return sha256(a) == sha256(b)


def write_subject_derivatives(
    record: SubjectRecord | Mapping[str, Any],
    output_dir: PathLike,
    *,
    space: str,
    atlas: PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
    datasets: Mapping[str, PathLike] | None = None,
    spatial_reference: str | None = None,
    label_table: PathLike | None = None,
) -> dict[str, Path]:
    """Copy one subject x method record's outputs into the derivatives under BIDS names.

    Per subject (from the preprocessing, the same for every method): ``desc-preproc_T1w`` (the bias-corrected,
    skull-stripped T1w on its own grid) and ``desc-brain_mask``. Per method: the T1w and the subject's labels on
    the atlas (``space-<A>_desc-<m>_T1w``/``_dseg``), the transform both ways (``from-T1w_to-<A>`` and
    ``from-<A>_to-T1w``, ``mode-image``, ITK composite ``.h5``), the Jacobian determinant on the atlas grid, the
    atlas labels on the native T1w (``space-T1w_seg-<A>_desc-<m>_dseg`` with its ``dseg.tsv``), the regional
    volumes (``seg-<A>_desc-<m>_morph.tsv``: :func:`hdar_pipeline.core.volumes.label_volumes`) and the metrics.

    Parameters
    ----------
    record : SubjectRecord or its JSON mapping
        An evaluate (or register) record of :mod:`hdar_pipeline.pipeline.subject_steps`: ids, ``status``, and when ok
        ``warped``, ``warped_labels``, ``transform`` (atlas -> native subject ``.h5``),
        ``registration_json``, ``labels_csv`` and ``metrics``.
    output_dir : path-like
        The derivatives dataset.
    space : str
        Atlas name for the ``space-``/``to-`` entities.
    atlas : path-like, optional
        The atlas image (recorded in the sidecars).
    extra : mapping, optional
        More sidecar fields (e.g. the seed and the command line).
    datasets : mapping, optional
        Name -> root of the datasets the inputs come from (``raw``: the BIDS dataset, ``labels``: the labels
        dataset), for ``bids:<name>:`` URIs in ``Sources`` (``DatasetLinks`` of ``dataset_description.json``).
    spatial_reference : str, optional
        URI of the atlas image (e.g. ``bids::tpl-<A>/tpl-<A>_T1w.nii.gz``, :func:`write_atlas`); default: ``atlas``
        as a URI, else ``space``.
    label_table : path-like, optional
        The atlas labels' names (BIDS ``dseg.tsv`` or FreeSurfer LUT) for the native labels' ``dseg.tsv`` and the
        regional volumes.

    Returns
    -------
    dict
        ``kind -> path`` of what was written: always ``metrics_json`` (status, error, summary
        metrics, run facts); when ok ``T1w``, ``xfm``, ``dseg`` (if labels) and ``metrics_tsv`` (if
        evaluated), each with a JSON sidecar.
    """
    record = as_record(record)
    sub, ses, method = record.subject, record.session, record.method
    check_label(sub)
    if ses:
        check_label(ses, "session")
    reg = {}
    if record.registration_json and Path(record.registration_json).is_file():
        reg = json.loads(Path(record.registration_json).read_text())
    common = {
        "Method": method,
        "Preset": record.preset or reg.get("preset") or "",
        "Parameters": reg.get("parameters", {}),
        "Seed": reg.get("seed"),
        "RuntimeSeconds": record.runtime_s,
        "PeakMemoryMB": record.peak_memory_mb,
        "Device": record.device or "",
        "Versions": reg.get("versions", {}),
        "Atlas": space,
        "SpatialReference": spatial_reference or bids_uri(atlas if atlas is not None else record.atlas,
                                                          datasets) or space,
        "Sources": [bids_uri(s, datasets) for s in (record.t1w,) if s],
        **({"WeightsSHA256": reg["weights_sha256"]} if reg.get("weights_sha256") else {}),
        **dict(extra or {}),
    }
    written: dict[str, Path] = {}
    ok = record.status == "ok"
    if ok and record.warped:
        p = _copy(record.warped, derivative_path(output_dir, sub, ses, space=space, desc=method, suffix="T1w",
                                                    extension=".nii.gz"))
        write_json(sidecar_path(p), {**common, "Description": f"T1w image warped onto {space} by {method} (linear)"})
        written["T1w"] = p
    if ok and record.transform:
        p = _copy(record.transform, derivative_path(output_dir, sub, ses, from_="T1w", to=space, mode="image",
                                                       desc=method, suffix="xfm", extension=".h5"))
        write_json(sidecar_path(p), {
            **common, "Description": f"ITK composite transform from T1w to {space} ({method})",
            "Convention": "maps atlas points to native T1w points (ITK/ANTs); "
                          "ants.apply_transforms(fixed=atlas, moving=T1w, transformlist=[this file]) "
                          "resamples the T1w into atlas space",
            "FoldedPercent": record.folded_percent})
        written["xfm"] = p
    if ok and record.jacobian_map:
        p = _copy(record.jacobian_map, derivative_path(output_dir, sub, ses, space=space, desc=method,
                                                          suffix="jacobian", extension=".nii.gz"))
        write_json(sidecar_path(p), {**common, "Description": f"Jacobian determinant of the {method} transform at "
                                                              f"every {space} voxel (the atlas -> T1w mapping, "
                                                              "preprocessing affine included; <= 0: folded)",
                                     "Units": "dimensionless (volume ratio)"})
        written["jacobian"] = p
    if ok and record.warped_labels:
        p = _copy(record.warped_labels, derivative_path(output_dir, sub, ses, space=space, desc=method,
                                                           suffix="dseg", extension=".nii.gz"))
        write_json(sidecar_path(p), {**common, "Description": f"subject labels warped onto {space} by {method} "
                                                                "(nearest neighbour)",
                                     "Sources": [bids_uri(s, datasets) for s in (record.labels,) if s]})
        written["dseg"] = p
    if ok:
        written.update(_native_derivatives(record, output_dir, sub, ses, method, space=space, common=common,
                                           datasets=datasets, label_table=label_table))
    tsv_path = derivative_path(output_dir, sub, ses, space=space, desc=method, suffix="metrics", extension=".tsv")
    legacy_csv = tsv_path.with_suffix(".csv")
    if legacy_csv.exists():
        legacy_csv.unlink()  # the table of an earlier version, now written as .tsv
    if ok and record.labels_csv:
        written["metrics_tsv"] = _write_tsv(record.labels_csv, tsv_path)
    elif tsv_path.exists():
        tsv_path.unlink()  # a stale table of an earlier, now failed, run must not be pooled
    summary = {
        "subject": sub, "session": ses, "method": method, "space": space, "preset": common["Preset"],
        "status": record.status, "error": record.error, "failed_step": record.failed_step,
        "runtime_s": record.runtime_s, "peak_memory_mb": record.peak_memory_mb,
        "device": record.device or "", "evaluated": bool(record.evaluated),
        "folded_percent": record.folded_percent, "metrics": record.metrics or {},
        "inverse": record.inverse,
        # wall seconds of each step this subject x method went through (preprocess, register, evaluate) and of
        # the parts of the preprocessing and the registration
        "timing_s": {k: getattr(record, key) for k, key in (
            ("steps", "stage_wall_s"), ("preprocess", "preprocess_steps_s"), ("register", "register_steps_s"))
            if getattr(record, key)},
        "files": {k: v.name for k, v in written.items()},
        **{k: v for k, v in common.items() if k in ("Parameters", "Seed", "Versions", "Atlas", "SpatialReference",
                                                   "Sources", "WeightsSHA256")},
    }
    written["metrics_json"] = write_json(derivative_path(output_dir, sub, ses, space=space, desc=method,
                                                         suffix="metrics", extension=".json"), summary)
    return written


def _native_derivatives(record: SubjectRecord, output_dir: PathLike, sub: str, ses: str, method: str, *,
                        space: str, common: Mapping[str, Any], datasets: Mapping[str, PathLike] | None,
                        label_table: PathLike | None) -> dict[str, Path]:
    """The subject-space outputs of one ok record: the preprocessed T1w and brain mask, the inverse transform, the
    atlas labels on the native T1w with their ``dseg.tsv``, and the regional volumes."""
    from hdar_pipeline.core.labels import read_label_table
    from hdar_pipeline.core.volumes import label_volumes

    written: dict[str, Path] = {}
    t1w_uri = bids_uri(record.t1w, datasets)
    native = {"SpatialReference": t1w_uri, "Sources": [t1w_uri]}
    # a brain mask (and affine) reused from another pipeline's derivatives (--derivatives) is a source too
    reused = [bids_uri(p, datasets) for p in (record.reused_derivatives or {}).values() if p]
    preprocessing = {"SkullStripped": True,
                     "Steps": list(record.preprocess_steps or []),
                     "SkullStrippedInput": record.skull_stripped_input}
    if record.native_brain:
        p = _copy(record.native_brain, derivative_path(output_dir, sub, ses, desc="preproc", suffix="T1w",
                                                          extension=".nii.gz"))
        write_json(sidecar_path(p), {**preprocessing, **native, "Sources": [t1w_uri, *reused], "Description": (
            "the T1w on its own grid after the preprocessing (Steps); non-brain voxels are 0")})
        written["preproc_T1w"] = p
    if record.native_mask:
        p = _copy(record.native_mask, derivative_path(output_dir, sub, ses, desc="brain", suffix="mask",
                                                         extension=".nii.gz"))
        write_json(sidecar_path(p), {**native, "Sources": [t1w_uri, *reused], "Type": "Brain",
                                     "Steps": preprocessing["Steps"],
                                     "Description": "brain mask of the T1w on its own grid"})
        written["brain_mask"] = p
    inverse = record.inverse or {}
    if record.inverse_transform:
        p = _copy(record.inverse_transform, derivative_path(output_dir, sub, ses, from_=space, to="T1w",
                                                               mode="image", desc=method, suffix="xfm",
                                                               extension=".h5"))
        write_json(sidecar_path(p), {
            **common, "Sources": [t1w_uri], "Description": f"ITK composite transform from {space} to T1w ({method}): "
                                                           "the inverse of the from-T1w_to-" + space + " transform",
            "Convention": "maps native T1w points to atlas points (ITK/ANTs); ants.apply_transforms(fixed=T1w, "
                          "moving=<atlas image>, transformlist=[this file]) resamples an atlas image onto the T1w",
            "InverseMethod": {"method": "the registration's own inverse (SyN)",
                              "newton": "numerical: Newton's method on the displacement field, "
                                        "hdar_pipeline.core.inverse.invert_field",
                              "exact (affine)": "exact (affine)"}.get(inverse.get("source"), inverse.get("source")),
            "InverseConsistencyMM": {**(inverse.get("consistency_mm") or {}),
                                     "Description": "|inverse(forward(p)) - p| over the atlas brain voxels p, mm"}})
        written["inverse_xfm"] = p
    if record.atlas_labels_native:
        p = _copy(record.atlas_labels_native, derivative_path(output_dir, sub, ses, space="T1w", seg=space,
                                                                 desc=method, suffix="dseg", extension=".nii.gz"))
        names = read_label_table(label_table) if label_table else {}
        write_json(sidecar_path(p), {**common, **native,
                                     "Description": f"the atlas {space}'s labels on the native T1w, brought by the "
                                                    f"inverse of the {method} transform (nearest neighbour)",
                                     "Sources": [t1w_uri, bids_uri(record.atlas_labels, datasets)]})
        written["native_dseg"] = p
        volumes = label_volumes(p, atlas_labels=record.atlas_labels, jacobian=record.jacobian_map,
                                names=names)
        # every atlas label, named where the atlas has a table (n/a where not: the group level warns)
        written["native_dseg_tsv"] = _write_dseg_tsv(dict(zip(volumes["index"], volumes["name"])),
                                                     p.with_name(p.name.replace(".nii.gz", ".tsv")))
        vpath = derivative_path(output_dir, sub, ses, seg=space, desc=method, suffix="morph", extension=".tsv")
        vpath.parent.mkdir(parents=True, exist_ok=True)
        volumes.to_csv(vpath, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
        write_json(sidecar_path(vpath), {
            "Description": f"native-space volumes of the atlas {space}'s labels in this subject ({method})",
            "Sources": [bids_uri(p, {"": output_dir})],
            "index": {"Description": "label value"},
            "name": {"Description": "label name (the atlas's dseg.tsv; n/a when it has none)"},
            "voxels": {"Description": "voxels of the label in the native-space atlas labels"},
            "volume_mm3": {"Description": "voxels x the native voxel volume", "Units": "mm^3"},
            **({"volume_jacobian_mm3": {"Description": "sum over the label's atlas voxels of the Jacobian determinant "
                                                       "of the atlas -> T1w mapping x the atlas voxel volume",
                                        "Units": "mm^3"}} if "volume_jacobian_mm3" in volumes else {})})
        written["volumes"] = vpath
    return written


def record_space(record: Mapping[str, Any]) -> str | None:
    """The atlas space (``space-<label>``) of a ``*_metrics.json`` record: its ``space``, or the
    ``SpatialReference`` that held the bare name before it became a URI."""
    return record.get("space") or record.get("SpatialReference")


def metrics_record(summary: Mapping[str, Any]) -> SubjectRecord:
    """The :class:`~hdar_pipeline.core.subject_record.SubjectRecord` of a ``*_metrics.json`` summary (as
    :func:`read_subject_metrics` returns it): the fields the summary keeps of the record it was written from (ids,
    status, run facts, ``evaluated``, ``folded_percent``, ``metrics``, ``inverse``, the per-label table as
    ``labels_csv``), for the group level's tables."""
    fields = ("subject", "session", "method", "preset", "status", "error", "failed_step", "runtime_s", "peak_memory_mb",
              "device", "evaluated", "folded_percent", "metrics", "inverse", "labels_csv")
    return SubjectRecord.from_json({k: summary[k] for k in fields if summary.get(k) is not None},
                                   source=str(summary.get("metrics_json") or "metrics summary"))


def read_subject_metrics(output_dir: PathLike, *, space: str | None = None,
                         participants: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The records of every ``*_metrics.json`` in a derivatives dataset, for the group level.

    Each record is the JSON plus ``labels_csv`` (the absolute path of its per-label ``_metrics.tsv``, or the
    ``_metrics.csv`` an earlier version wrote, when it exists), in the shape
    :func:`hdar_pipeline.pipeline.subject_steps.collect_records` pools.
    """
    out = Path(output_dir)
    keep = {check_label(p) for p in participants} if participants else None
    records = []
    for path in sorted(out.glob("sub-*/**/sub-*_metrics.json")):
        rec = json.loads(path.read_text())
        if space is not None and record_space(rec) not in (None, space):
            continue
        if keep is not None and rec.get("subject") not in keep:
            continue
        table = next((t for t in (path.with_suffix(".tsv"), path.with_suffix(".csv")) if t.is_file()), None)
        rec["labels_csv"] = str(table.resolve()) if table is not None else None
        rec["metrics_json"] = str(path.resolve())
        records.append(rec)
    return records
