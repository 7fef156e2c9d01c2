"""Convert public labelled brain MR distributions into BIDS (behind ``hdar convert``).

``convert(preset, src, dest)`` reads a dataset in the layout its distribution ships and writes

* a BIDS raw dataset: ``DEST/sub-<label>/anat/sub-<label>_T1w.nii.gz``, ``DEST/dataset_description.json``
  (``DatasetType: raw``, ``BIDSVersion: 1.9.0``), ``DEST/README``, ``DEST/participants.tsv`` (columns
  ``participant_id``, ``source_id`` and, for Mindboggle-101, ``group``) and ``participants.json``;
* a BIDS derivatives dataset with the label maps:
  ``DEST/derivatives/labels/sub-<label>/anat/sub-<label>_dseg.nii.gz`` (+ a ``.json`` sidecar),
  ``DEST/derivatives/labels/dseg.tsv`` (the BIDS look-up table: columns ``index``, ``name``) and
  ``DEST/derivatives/labels/dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``,
  ``SourceDatasets``).

Images keep their voxel values and data type (``float64`` that ``float32`` holds exactly becomes
``float32``; nothing is rescaled or resampled); label maps are written as integer NIfTI with the image's exact
voxel-to-world affine, after checking that the label map lies on the image's grid (same shape, affines equal
within 1e-3). Nothing is ever written into ``SRC``. ``DEST`` must be empty, absent, or a dataset that
``hdar convert`` wrote from the same preset and source with the same ``use_heads`` (then the run adds or
replaces subjects); ``overwrite=True`` writes into any other folder (files of the same name are replaced,
nothing is deleted). The run records itself in ``DEST/.hdar-convert.json`` (a dot file, which BIDS tools
ignore).

Layouts each preset expects
---------------------------
The finder is :func:`hdar_pipeline.core.subject.find_dataset_subjects` (the layouts:
:data:`~hdar_pipeline.core.subject.DATASET_LAYOUTS`); it gives each subject as a
:class:`~hdar_pipeline.core.subject.Subject`, and a subject with a note (a missing or ambiguous file) is not
converted. ``SRC`` may be the dataset folder itself or its parent (e.g. ``SRC/CUMC12/Brains/...``). File names are
matched by glob patterns relative to the dataset folder; ``images=``/``labels=`` (``--images``/``--labels``)
replace a preset's patterns and ``subject_regex=`` (``--subject-regex``) its way of reading the subject id.
Every pattern accepts Analyze ``.img``/``.hdr`` pairs (also ``.img.gz`` beside a plain ``.hdr``), ``.nii``,
``.nii.gz`` and MGH/MGZ.

Per preset, the patterns tried (in this order; the first layout whose images match is used), with one
example path per kind of file (brain image; head image used with ``use_heads``; label map):

* ``lpba40``, LONI LPBA40 delineation space, at any depth under ``SRC`` (so ``SRC/S01/...`` and
  ``SRC/LPBA40/delineation_space/S01/...`` both work): brain ``**/*.delineation.skullstripped.*``, e.g.
  ``S01/S01.delineation.skullstripped.img.gz`` (+ ``S01/S01.delineation.skullstripped.hdr``); no head image;
  labels ``**/*.delineation.structure.label.*``, e.g. ``S01/S01.delineation.structure.label.img.gz`` (+ ``.hdr``).
* ``lpba40``, Klein et al. 2009 archive: brain ``Brains/*`` (e.g. ``Brains/l1.img``), head ``Heads/*``
  (``Heads/l1.img``), labels ``Atlases/*`` (``Atlases/l1.img``).
* ``ibsr18``, Klein et al. 2009 archive (``SRC`` or ``SRC/IBSR18/``): brain ``Brains/*``, head ``Heads/*``,
  labels ``Atlases/*``, the same file name in each folder (e.g. ``Brains/IBSR_01.img``, ``Atlases/IBSR_01.img``).
* ``ibsr18``, IBSR v2.0 as NITRC ships it (at any depth under ``SRC``): brain
  ``**/IBSR_[0-9][0-9]_ana_strip.*`` (``IBSR_01/IBSR_01_ana_strip.nii.gz``), head ``**/IBSR_[0-9][0-9]_ana.*``
  (``IBSR_01/IBSR_01_ana.nii.gz``), labels ``**/IBSR_[0-9][0-9]_seg_ana.*`` (``IBSR_01/IBSR_01_seg_ana.nii.gz``).
* ``cumc12`` (``SRC`` or ``SRC/CUMC12/``): brain ``Brains/*`` (``Brains/m1.img`` ... ``m12``), head ``Heads/*``
  (``Heads/m1.img``), labels ``Atlases/*`` (``Atlases/m1.img``).
* ``mgh10`` (``SRC`` or ``SRC/MGH10/``): brain ``Brains/*`` (``Brains/g1.img`` ... ``g10``), head ``Heads/*``
  (``Heads/g1.img``), labels ``Atlases/*`` (``Atlases/g1.img``).
* ``mindboggle101``: brain ``*_volumes/*/t1weighted_brain.nii.gz``
  (``OASIS-TRT-20_volumes/OASIS-TRT-20-1/t1weighted_brain.nii.gz``), head ``*_volumes/*/t1weighted.nii.gz``,
  labels ``*_volumes/*/labels.DKT31.manual+aseg.nii.gz`` (cortical labels only:
  ``labels=["*_volumes/*/labels.DKT31.manual.nii.gz"]``); ``SRC`` may also be one ``<group>_volumes`` folder
  (then the patterns are ``*/t1weighted_brain.nii.gz`` etc.).
* ``folder``: ``images=GLOB`` and ``labels=GLOB`` (both required), e.g. ``images/*_T1.nii.gz`` and
  ``seg/*_seg.nii.gz``; a label map is paired with the image of the same subject id.

Analyze headers hold no orientation: the NIfTI written for an Analyze input carries nibabel's default
affine for it (voxel sizes, first axis flipped); check the orientation of Analyze-sourced data.

* Subject ids: LONI LPBA40 ``S01`` (from the file name); Klein archives: the file name without its extension
  (``m1``, ``g1``), the same name in ``Brains/``, ``Heads/`` and ``Atlases/``; IBSR v2.0 ``IBSR_01``;
  Mindboggle-101 the subject folder (``OASIS-TRT-20-1``; the groups are ``OASIS-TRT-20``, ``MMRR-21``,
  ``MMRR-3T7T-2``, ``NKI-RS-22``, ``NKI-TRT-20``, ``HLN-12``, ``Colin27-1``, ``Twins-2``, ``Afterthought-1``,
  each ``<group>_volumes/<group>-<n>/``; ``SRC`` may also be one ``<group>_volumes`` folder).
  ``subject_regex`` (any preset) is searched in the file name, then in its path under the dataset folder
  (the group named ``id``, else the first group, else the whole match). ``folder`` by default takes the
  first run of letters and digits of the file name without its extension.
* BIDS labels: when every source id is one common prefix plus a number (``S01``...``S40``, ``m1``...``m12``,
  ``IBSR_01``...), the number, zero-padded to at least two digits (``sub-01``); otherwise the source id
  without its non-alphanumeric characters (``OASIS-TRT-20-1`` -> ``sub-OASISTRT201``).
  ``subject_labels="source"`` always uses the latter. ``participants.tsv`` maps ``participant_id`` to
  ``source_id``.
* Label names (``dseg.tsv``): ``label_table=`` (a BIDS ``dseg.tsv`` or a FreeSurfer colour LUT) when given;
  else a table found in the dataset folder or ``SRC`` (``lpba40_labels.tsv``, ``*dseg.tsv``, ``*labels*.tsv``,
  ``FreeSurferColorLUT.txt``, ``*LUT*.txt``); else, for ``lpba40``, the 56 LPBA40 structure names built in
  here; else the label value itself as the name. A BIDS table is written as given (plus any label the maps
  hold that it does not list); a FreeSurfer LUT names only the labels the maps hold.

Not verified against the archives themselves (the matching is by pattern, so other names work with
``images=``/``labels=``): the file names inside Klein et al.'s LPBA40 and IBSR18 archives (the converter
pairs ``Brains/``, ``Heads/`` and ``Atlases/`` files by identical names, whatever they are).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np

from hdar_pipeline._version import __version__
from hdar_pipeline.core.images import ImageError, check_labels_match, load_image
from hdar_pipeline.core.labels import LabelTableError, read_label_table
from hdar_pipeline.core.subject import (DATASET_LAYOUTS, DatasetError, DatasetLayout, Layout, Subject,
                                        find_dataset_subjects, natural_key)

PathLike = str | os.PathLike

BIDS_VERSION = "1.9.0"
GENERATOR = "hdar-pipeline convert"
MARKER = ".hdar-convert.json"
LABELS_SUBDIR = Path("derivatives") / "labels"

#: The 56 structures of the LPBA40 atlas (Shattuck et al., NeuroImage 2008), label value -> name, as LONI
#: lists them.
LPBA40_LABELS: dict[int, str] = {
    21: "L superior frontal gyrus", 22: "R superior frontal gyrus",
    23: "L middle frontal gyrus", 24: "R middle frontal gyrus",
    25: "L inferior frontal gyrus", 26: "R inferior frontal gyrus",
    27: "L precentral gyrus", 28: "R precentral gyrus",
    29: "L middle orbitofrontal gyrus", 30: "R middle orbitofrontal gyrus",
    31: "L lateral orbitofrontal gyrus", 32: "R lateral orbitofrontal gyrus",
    33: "L gyrus rectus", 34: "R gyrus rectus",
    41: "L postcentral gyrus", 42: "R postcentral gyrus",
    43: "L superior parietal gyrus", 44: "R superior parietal gyrus",
    45: "L supramarginal gyrus", 46: "R supramarginal gyrus",
    47: "L angular gyrus", 48: "R angular gyrus",
    49: "L precuneus", 50: "R precuneus",
    61: "L superior occipital gyrus", 62: "R superior occipital gyrus",
    63: "L middle occipital gyrus", 64: "R middle occipital gyrus",
    65: "L inferior occipital gyrus", 66: "R inferior occipital gyrus",
    67: "L cuneus", 68: "R cuneus",
    81: "L superior temporal gyrus", 82: "R superior temporal gyrus",
    83: "L middle temporal gyrus", 84: "R middle temporal gyrus",
    85: "L inferior temporal gyrus", 86: "R inferior temporal gyrus",
    87: "L parahippocampal gyrus", 88: "R parahippocampal gyrus",
    89: "L lingual gyrus", 90: "R lingual gyrus",
    91: "L fusiform gyrus", 92: "R fusiform gyrus",
    101: "L insular cortex", 102: "R insular cortex",
    121: "L cingulate gyrus", 122: "R cingulate gyrus",
    161: "L caudate", 162: "R caudate",
    163: "L putamen", 164: "R putamen",
    165: "L hippocampus", 166: "R hippocampus",
    181: "cerebellum", 182: "brainstem",
}

_KLEIN_2009 = ("Klein A, Andersson J, Ardekani BA, et al. Evaluation of 14 nonlinear deformation algorithms "
               "applied to human brain MRI registration. NeuroImage 46(3):786-802, 2009. "
               "doi:10.1016/j.neuroimage.2008.12.037")


class ConvertError(ValueError):
    """The conversion cannot go on. The message names the file (or folder) and the problem."""


@dataclass(frozen=True)
class Preset:
    """A dataset ``hdar convert`` reads: where its files are (:class:`~hdar_pipeline.core.subject.DatasetLayout`)
    and what the converted dataset says about it."""

    dataset: DatasetLayout
    #: label tables looked for in the dataset folder and SRC (glob patterns, first match wins)
    tables: tuple[str, ...] = ("*dseg.tsv", "*labels*.tsv", "FreeSurferColorLUT.txt", "*LUT*.txt")
    builtin_labels: Mapping[int, str] | None = None
    references: tuple[str, ...] = ()
    notice: str = ""

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def title(self) -> str:
        return self.dataset.title


PRESETS: dict[str, Preset] = {
    "lpba40": Preset(
        DATASET_LAYOUTS["lpba40"],
        tables=("lpba40_labels.tsv", "*dseg.tsv", "*labels*.tsv"),
        builtin_labels=LPBA40_LABELS,
        references=("Shattuck DW, Mirza M, Adisetiyo V, et al. Construction of a 3D probabilistic atlas of human "
                    "cortical structures. NeuroImage 39(3):1064-1080, 2008. doi:10.1016/j.neuroimage.2007.09.031",
                    _KLEIN_2009),
        notice="LONI's LPBA40 terms allow use, not redistribution: do not publish or share this converted copy."),
    "ibsr18": Preset(
        DATASET_LAYOUTS["ibsr18"],
        references=("Internet Brain Segmentation Repository (IBSR), Center for Morphometric Analysis, "
                    "Massachusetts General Hospital; https://www.nitrc.org/projects/ibsr", _KLEIN_2009)),
    "cumc12": Preset(DATASET_LAYOUTS["cumc12"], references=(_KLEIN_2009,)),
    "mgh10": Preset(DATASET_LAYOUTS["mgh10"], references=(_KLEIN_2009,)),
    "mindboggle101": Preset(
        DATASET_LAYOUTS["mindboggle101"],
        references=("Klein A, Tourville J. 101 labeled brain images and a consistent human cortical labeling "
                    "protocol. Frontiers in Neuroscience 6:171, 2012. doi:10.3389/fnins.2012.00171",),
        notice="Mindboggle-101 data are shared under a Creative Commons licence (see mindboggle.info); cite "
               "Klein & Tourville 2012."),
    "folder": Preset(DATASET_LAYOUTS["folder"]),
}


@dataclass
class ConvertResult:
    """What :func:`convert` did."""

    dest: Path
    preset: str
    layout: str
    converted: list[dict]
    skipped: list[tuple[str, str]]
    label_table: str
    notes: list[str]

    @property
    def n_subjects(self) -> int:
        return len(self.converted)

    @property
    def labels_dir(self) -> Path:
        return self.dest / LABELS_SUBDIR


# ----------------------------------------------------------------------------- BIDS labels


def bids_labels(ids: Sequence[str], style: str = "auto") -> list[str]:
    """The BIDS participant label (without ``sub-``) of each source id, in order (rules in the module
    docstring); raises ConvertError on a clash."""
    labels: list[str] | None = None
    if style == "auto" and ids:
        matches = [re.fullmatch(r"([A-Za-z_\-. ]*?)(\d+)", i) for i in ids]
        if all(matches) and len({m.group(1) for m in matches}) == 1:
            width = max(2, max(len(str(int(m.group(2)))) for m in matches))
            labels = [f"{int(m.group(2)):0{width}d}" for m in matches]
            if len(set(labels)) != len(labels):
                labels = None
    elif style not in ("auto", "source"):
        raise ValueError(f"subject_labels must be 'auto' or 'source', not {style!r}")
    if labels is None:
        labels = [re.sub(r"[^A-Za-z0-9]", "", i) for i in ids]
        seen: dict[str, str] = {}
        for i, lab in zip(ids, labels):
            if not lab:
                raise ConvertError(f"subject id {i!r} has no letters or digits for a BIDS label")
            if lab in seen:
                raise ConvertError(f"subject ids {seen[lab]!r} and {i!r} both become sub-{lab}; "
                                   "use --subject-regex to read distinct ids")
            seen[lab] = i
    return labels


# ----------------------------------------------------------------------------- label tables


def find_label_table(preset: Preset, root: Path, src: Path) -> Path | None:
    for folder in dict.fromkeys([root, src]):
        for pattern in preset.tables:
            for path in sorted(folder.glob(pattern)):
                if path.is_file():
                    return path
    return None


def _resolve_table(preset: Preset, root: Path, src: Path, label_table: PathLike | None,
                   notes: list[str]) -> tuple[dict[int, str] | None, str, str]:
    """(table, format, description). format: bids | freesurfer | numeric."""
    if label_table is not None:
        table = read_label_table(label_table)  # LabelTableError names the file
        return dict(table), table.format, str(Path(label_table))
    found = find_label_table(preset, root, src)
    if found is not None:
        try:
            table = read_label_table(found)
            return dict(table), table.format, str(found)
        except LabelTableError as exc:
            notes.append(f"ignored a label table that cannot be read: {exc}")
    if preset.builtin_labels:
        return dict(preset.builtin_labels), "bids", f"the {preset.title} label names built into hdar-pipeline"
    return None, "numeric", "none (label values used as names)"


def _dseg_rows(table: dict[int, str] | None, fmt: str, present: set[int], notes: list[str]) -> dict[int, str]:
    if fmt == "bids" and table is not None:
        rows = dict(table)
        extra = sorted(v for v in present if v not in rows and v != 0)
        if extra:
            notes.append(f"label values missing from the label table, named by their value: {extra}")
            rows.update({v: str(v) for v in extra})
        return rows
    rows = {}
    for v in sorted(present):
        if v == 0:
            continue
        rows[v] = (table or {}).get(v, str(v))
    unnamed = [v for v in rows if table is not None and v not in table]
    if unnamed:
        notes.append(f"label values the look-up table does not name, named by their value: {unnamed}")
    return rows


def _read_dseg(path: Path) -> dict[int, str]:
    try:
        return dict(read_label_table(path)) if path.is_file() else {}
    except LabelTableError:
        return {}


# ----------------------------------------------------------------------------- writing


def _check_dest(src: Path, dest: Path, preset: str, use_heads: bool, overwrite: bool) -> bool:
    """True when ``dest`` already holds this conversion (same preset, source and choice of head images)."""
    s, d = src.resolve(), dest.resolve()
    if d == s or s in d.parents:
        raise ConvertError(f"{dest}: the destination is inside the source folder {src}; "
                           "hdar convert never writes into SRC")
    if d.exists() and not d.is_dir():
        raise ConvertError(f"{dest}: exists and is not a folder")
    if not d.exists() or not any(d.iterdir()):
        return False
    marker = d / MARKER
    try:
        record = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        record = None
    same = bool(record) and record.get("preset") == preset and record.get("source") == str(s) \
        and bool(record.get("use_heads")) == use_heads
    if same or overwrite:
        return same
    what = (f"a dataset converted from {record.get('source')} with preset {record.get('preset')}"
            f"{' (head images)' if record.get('use_heads') else ''}" if record
            else "not a dataset written by `hdar convert`")
    raise ConvertError(f"{dest}: the destination is not empty and is {what}; choose an empty folder or pass "
                       "--overwrite to write into it anyway")


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def _image_array(img: nib.Nifti1Image) -> np.ndarray:
    """The voxel values as read: the file's data type, except float64 that float32 holds exactly (e.g. scaled
    integers) becomes float32; never rescaled."""
    arr = np.asanyarray(img.dataobj)
    if arr.dtype == np.float64:
        single = arr.astype(np.float32)
        if np.array_equal(single, arr):
            arr = single
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _label_array(labels: nib.Nifti1Image) -> np.ndarray:
    arr = np.asarray(labels.dataobj)
    top = int(arr.max()) if arr.size else 0
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.int16 if top <= np.iinfo(np.int16).max \
        else np.int32
    return arr.astype(dtype)


def _nifti(arr: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _convert_subject(s: Subject, label: str, dest: Path, root: Path) -> tuple[dict, set[int]]:
    """Write one subject (BIDS participant label ``label``); a subject with notes is refused with them."""
    if s.notes:
        raise ConvertError("; ".join(s.notes))
    participant_id = f"sub-{label}"
    image = load_image(s.t1w, dtype=None)
    labels = load_image(s.labels, labels=True)
    check_labels_match(image, labels, image_source=s.t1w, labels_source=s.labels)
    affine = np.asarray(image.affine, dtype=np.float64)
    lab = _label_array(labels)
    present = {int(v) for v in np.unique(lab)}
    anat = dest / participant_id / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    t1w = anat / f"{participant_id}_T1w.nii.gz"
    nib.save(_nifti(_image_array(image), affine), str(t1w))
    lab_dir = dest / LABELS_SUBDIR / participant_id / "anat"
    lab_dir.mkdir(parents=True, exist_ok=True)
    dseg = lab_dir / f"{participant_id}_dseg.nii.gz"
    nib.save(_nifti(lab, affine), str(dseg))
    rel = (lambda p: p.relative_to(root).as_posix() if root in p.parents else str(p))
    _write_json(dseg.with_name(f"{participant_id}_dseg.json"),
                {"Description": f"label map of {s.id}, converted from the distribution's file {rel(s.labels)}",
                 "Sources": [f"bids:raw:{participant_id}/anat/{t1w.name}"]})
    return ({"participant_id": participant_id, "source_id": s.id, "image": str(s.t1w),
             "labels": str(s.labels), "t1w": str(t1w), "dseg": str(dseg)}, present)


def _read_participants(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]


def _write_participants(dest: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    text = "\t".join(columns) + "\n" + "".join("\t".join(r.get(c, "n/a") or "n/a" for c in columns) + "\n"
                                               for r in rows)
    (dest / "participants.tsv").write_text(text, encoding="utf-8")
    desc = {"source_id": {"Description": "the subject's identifier in the source distribution"}}
    if "group" in columns:
        desc["group"] = {"Description": "the Mindboggle-101 group (sub-dataset) the subject belongs to"}
    _write_json(dest / "participants.json", desc)


def _readme(preset: Preset, layout: Layout, src: Path, use_heads: bool, table_source: str, n: int) -> str:
    refs = "\n".join(f"- {r}" for r in preset.references) or "- (none recorded)"
    notice = f"\n**Terms.** {preset.notice}\n" if preset.notice else ""
    kind = ("the head images (not skull-stripped)" if use_heads else "the images the patterns matched"
            if preset.name == "folder" else "the distribution's skull-stripped brain images")
    return f"""# {preset.title} in BIDS

Converted by `hdar convert {preset.name}` (hdar-pipeline {__version__}) from `{src}`
(layout: {layout.name}); {n} subject(s).

- `sub-<label>/anat/sub-<label>_T1w.nii.gz`: {kind}; voxel values and data type as in the
  source files (nothing rescaled or resampled).
- `derivatives/labels/`: the manual label maps on each image's grid (`sub-<label>_dseg.nii.gz`) and their
  look-up table `dseg.tsv` (label names from: {table_source}).
- `participants.tsv`: `participant_id` and the subject's id in the source distribution (`source_id`).

These "raw" images are what the distribution ships: its authors may have skull-stripped, re-oriented or
resampled them before release.
{notice}
## References

{refs}
"""


def convert(preset: str, src: PathLike, dest: PathLike, *, images: str | Sequence[str] | None = None,
            labels: str | Sequence[str] | None = None, subject_regex: str | None = None,
            label_table: PathLike | None = None, use_heads: bool = False, subjects: Sequence[str] | None = None,
            skip_bad: bool = False, overwrite: bool = False, subject_labels: str = "auto",
            log: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert a labelled dataset in its distribution's layout into BIDS (see the module docstring).

    Parameters
    ----------
    preset : {"lpba40", "ibsr18", "cumc12", "mgh10", "mindboggle101", "folder"}
    src, dest : path-like
        The distribution (read only) and the BIDS dataset to write.
    images, labels : glob or list of globs, optional
        Patterns relative to the dataset folder replacing the preset's (required for ``folder``).
    subject_regex : str, optional
        Regex searched in each file name for the subject id (group ``id``, else group 1, else the match).
    label_table : path-like, optional
        Label names: a BIDS ``dseg.tsv`` or a FreeSurfer colour LUT.
    use_heads : bool
        Convert the head (non-skull-stripped) images where the layout has them.
    subjects : list of str, optional
        Convert only these subjects (source ids such as ``S01``, or BIDS labels ``01`` / ``sub-01``).
    skip_bad : bool
        Skip a subject whose files are missing, unreadable or mismatched (listed in ``skipped``) instead of
        stopping with its error.
    overwrite : bool
        Write into a non-empty ``dest`` that is not this conversion.
    subject_labels : {"auto", "source"}
        BIDS label style (see the module docstring).
    log : callable, optional
        Receives one line per converted or skipped subject.

    Raises
    ------
    ConvertError, ImageError, LabelTableError
        With a message naming the file and the problem.
    """
    if preset not in PRESETS:
        raise ConvertError(f"unknown preset {preset!r} (one of {', '.join(PRESETS)})")
    p = PRESETS[preset]
    src, dest = Path(src), Path(dest)
    try:
        root, layout, found = find_dataset_subjects(p.dataset, src, images=images, labels=labels,
                                                    subject_regex=subject_regex, use_heads=use_heads)
    except DatasetError as exc:
        raise ConvertError(str(exc)) from None
    # (subject, BIDS label): subjects with files, and files whose name gives no subject id (no label)
    named = [s for s in found if s.t1w is not None or s.labels is not None]
    planned = list(zip(named, bids_labels([s.id for s in named], subject_labels)))
    orphans = [(s, "") for s in found if s.t1w is None and s.labels is None]
    if subjects:
        wanted = {str(x) for x in subjects}
        wanted |= {x[len("sub-"):] for x in wanted if x.startswith("sub-")}
        chosen = [(s, lab) for s, lab in planned if s.id in wanted or lab in wanted]
        matched = {s.id for s, _ in chosen} | {lab for _, lab in chosen}
        unknown = sorted(x for x in map(str, subjects) if x not in matched and x.removeprefix("sub-") not in matched)
        if unknown:
            raise ConvertError(f"{root}: subject(s) {', '.join(unknown)} not found; available: "
                               f"{', '.join(s.id for s in named)}")
        planned, orphans = chosen, []
    updating = _check_dest(src, dest, preset, use_heads, overwrite)
    from hdar_pipeline.core.input_guard import InputGuard

    # SRC and --label-table are never written: DEST may not hold them, and must be writable (checked here,
    # before the first subject)
    InputGuard({"--label-table": label_table}, {"SRC": src}, hash_files=False).output_folder(dest, "DEST")
    notes: list[str] = []
    table, fmt, table_source = _resolve_table(p, root, src, label_table, notes)

    # mark DEST as ours first, so a run stopped by a bad subject can simply be re-run
    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / MARKER, {"preset": preset, "source": str(src.resolve()), "layout": layout.name,
                                "use_heads": use_heads, "hdar_pipeline_version": __version__})
    _write_descriptions(p, layout, src, dest, use_heads)

    converted: list[dict] = []
    skipped: list[tuple[str, str]] = []
    present: set[int] = set()
    for s, label in orphans + planned:
        try:
            row, values = _convert_subject(s, label, dest, root)
        except (ConvertError, ImageError) as exc:
            if not skip_bad:
                raise
            skipped.append((s.id, str(exc)))
            if log:
                log(f"skipped {s.id}: {exc}")
            continue
        if preset == "mindboggle101":
            row["group"] = s.id.rsplit("-", 1)[0]
        converted.append(row)
        present |= values
        if log:
            log(f"{s.id} -> {row['participant_id']}")
    if not converted:
        raise ConvertError(f"{src}: no subject could be converted" +
                           (f" ({len(skipped)} skipped: " + "; ".join(m for _, m in skipped) + ")" if skipped else ""))

    # participants.tsv (kept rows of earlier runs whose files are still there) and dseg.tsv
    columns = ["participant_id", "source_id"] + (["group"] if preset == "mindboggle101" else [])
    rows = {r["participant_id"]: r for r in (_read_participants(dest / "participants.tsv") if updating else [])
            if (dest / r.get("participant_id", "") / "anat").is_dir()}
    for r in converted:
        rows[r["participant_id"]] = {c: r.get(c, "n/a") for c in columns}
    _write_participants(dest, [rows[k] for k in sorted(rows, key=natural_key)], columns)
    dseg_tsv = dest / LABELS_SUBDIR / "dseg.tsv"
    if updating:
        present |= set(_read_dseg(dseg_tsv))
    dseg_rows = _dseg_rows(table, fmt, present, notes)
    dseg_tsv.write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in dseg_rows.items()), encoding="utf-8")
    (dest / "README").write_text(_readme(p, layout, src, use_heads, table_source, len(rows)), encoding="utf-8")
    return ConvertResult(dest=dest, preset=preset, layout=layout.name, converted=converted, skipped=skipped,
                         label_table=table_source, notes=notes)


def _write_descriptions(p: Preset, layout: Layout, src: Path, dest: Path, use_heads: bool) -> None:
    from hdar_pipeline.bids_io.outputs import code_url

    url = code_url()  # the package's Project-URL; none (no machine path) until its metadata names one
    generated = [{"Name": GENERATOR, "Version": __version__, **({"CodeURL": url} if url else {}),
                  "Description": f"hdar convert {p.name} ({layout.name}{', head images' if use_heads else ''})"}]
    raw = {"Name": f"{p.title} (converted to BIDS by hdar-pipeline)", "BIDSVersion": BIDS_VERSION,
           "DatasetType": "raw", "GeneratedBy": generated}
    if p.references:
        raw["ReferencesAndLinks"] = list(p.references)
        raw["HowToAcknowledge"] = "Please cite: " + "; ".join(p.references)
    _write_json(dest / "dataset_description.json", raw)
    deriv = {"Name": f"{p.title} manual labels", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
             "GeneratedBy": generated, "SourceDatasets": [{"URL": "bids:raw:"}],
             "DatasetLinks": {"raw": "../../"}}
    if p.references:
        deriv["ReferencesAndLinks"] = list(p.references)
    _write_json(dest / LABELS_SUBDIR / "dataset_description.json", deriv)


def format_summary(result: ConvertResult) -> str:
    """The lines ``hdar convert`` prints."""
    lines = [f"converted {result.n_subjects} subject(s) ({result.preset}: {result.layout})",
             f"BIDS raw dataset: {result.dest}",
             f"label maps (BIDS derivatives): {result.labels_dir}  (names from {result.label_table})"]
    lines += [f"note: {n}" for n in result.notes]
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} subject(s):")
        lines += [f"  {sid}: {msg}" for sid, msg in result.skipped]
    notice = PRESETS[result.preset].notice
    if notice:
        lines.append(notice)
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `hdar convert`")
