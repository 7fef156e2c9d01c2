"""One subject of a cohort on disk (:class:`Subject`) and the finders for the layouts public datasets ship in.

A :class:`Subject` is the one record every part of the package uses for a subject's files: the BIDS App's
cohort (:func:`hdar_pipeline.bids_io.inputs.find_bids_subjects`, pybids), HDAR training
(:func:`hdar_pipeline.hdar.data.collect_subjects`), the benchmark (:mod:`hdar_pipeline.apps.benchmark.pairs`)
and the converter (:mod:`hdar_pipeline.bids_io.convert`).

Finders here (no pybids):

* :func:`find_dataset_subjects`: the subjects of a public labelled dataset in the layout its distribution
  ships (:data:`DATASET_LAYOUTS`: LPBA40, IBSR18, CUMC12, MGH10, Mindboggle-101) or of a folder of images and
  label maps given by glob patterns (``"folder"``); what ``hdar convert`` reads;
* :func:`find_lpba40_subjects`: LPBA40 subjects in LONI's delineation-space folders
  (``SNN/SNN.delineation.skullstripped.nii.gz``), what the benchmark registers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

PathLike = str | os.PathLike


@dataclass
class Subject:
    """One subject (x session) and its files.

    Attributes
    ----------
    id : str
        The subject's identifier: the BIDS participant label without ``sub-`` (``"01"``) for a BIDS dataset,
        else the id its distribution or file names give it (``"S21"``, ``"OASIS-TRT-20-1"``, a file stem).
    session : str
        The BIDS session label without ``ses-``; ``""`` when there is none.
    t1w : Path or None
        The T1-weighted image; ``None`` when the subject has none (the App then reports it as failed, the
        converter refuses it).
    labels : Path or None
        The subject's label map on the grid of ``t1w`` (a BIDS ``dseg`` in T1w space), or ``None``.
    entities : dict of str to str
        The BIDS entities of ``t1w`` as pybids names them (``{"subject": "01", "session": "1", "run": "2"}``);
        empty for files not named by BIDS.
    notes : list of str
        What the finder noticed about the files: which one it chose among several matches, which file is
        missing or ambiguous, each naming the file. The App logs them; the converter refuses a subject with any.
    brain_mask, anat_xfm : Path or None
        sMRIPrep/fMRIPrep derivatives the BIDS App reuses (``--derivatives``, see
        :func:`hdar_pipeline.bids_io.anat_derivatives.find_anat_derivatives`): the brain mask and the
        transform to the atlas space, or ``None``.
    name : str
        How training logs and the trained weights' metadata call the subject (``sub-01_ses-1``, or the file
        stem); ``""`` where the finder sets none.
    """

    id: str
    session: str = ""
    t1w: Path | None = None
    labels: Path | None = None
    entities: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    brain_mask: Path | None = None
    anat_xfm: Path | None = None
    name: str = ""

    @property
    def key(self) -> str:
        """``sub-<id>[_ses-<session>]``: the BIDS file-name prefix of this subject (x session)."""
        return f"sub-{self.id}" + (f"_ses-{self.session}" if self.session else "")


class DatasetError(ValueError):
    """A dataset's files cannot be found as its layout says; the message names the folder or file."""


# ----------------------------------------------------------------------------- image file names

#: Image file suffixes a pattern may match (an Analyze ``.hdr`` is read through its ``.img``).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".img.gz", ".img", ".mgz", ".mgh")
#: Which file wins when one subject has the same file in several formats.
_SUFFIX_PRIORITY = {s: i for i, s in enumerate((".nii.gz", ".nii", ".img", ".img.gz", ".mgz", ".mgh"))}


def split_suffix(name: str) -> tuple[str, str]:
    """``("S01.delineation.skullstripped", ".img.gz")`` from a file name (suffix lower-cased)."""
    low = name.lower()
    for suffix in IMAGE_SUFFIXES + (".hdr.gz", ".hdr"):
        if low.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _is_image(path: Path) -> bool:
    return path.is_file() and split_suffix(path.name)[1] in IMAGE_SUFFIXES


def default_subject_id(name: str) -> str | None:
    """The first run of letters and digits of a file name without its extension."""
    m = re.search(r"[A-Za-z0-9]+", split_suffix(name)[0])
    return m.group(0) if m else None


def natural_key(text: str) -> list:
    """Sort key that orders the numbers in ``text`` by value (``S2`` before ``S10``), case-insensitively."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


# ----------------------------------------------------------------------------- dataset layouts


@dataclass(frozen=True)
class Layout:
    """One way a distribution lays out its files (patterns relative to the dataset folder)."""

    name: str
    images: tuple[str, ...]
    labels: tuple[str, ...]
    heads: tuple[str, ...] | None = None
    #: regex searched in the file name (group ``id``, else group 1); None: the name without its extension
    subject_regex: str | None = None
    #: ``"name"``: the id comes from the file name; ``"parent"``: from the file's folder name
    id_from: str = "name"


@dataclass(frozen=True)
class DatasetLayout:
    """Where one dataset's distribution keeps its images and label maps.

    Attributes
    ----------
    name : str
        The preset name (``"lpba40"``).
    title : str
        The dataset's name in messages (``"LPBA40"``).
    layouts : tuple of Layout
        The layouts tried, in order; the first whose images match is used.
    roots : tuple of str
        Sub-folders of the source folder tried as the dataset folder (besides the source folder itself),
        compared case-insensitively.
    """

    name: str
    title: str
    layouts: tuple[Layout, ...]
    roots: tuple[str, ...] = ()


def _klein_layout() -> Layout:
    return Layout("Klein et al. 2009 archive (Brains/, Heads/, Atlases/)", images=("Brains/*",),
                  labels=("Atlases/*",), heads=("Heads/*",))


#: The layouts of the datasets ``hdar convert`` reads (documented in :mod:`hdar_pipeline.bids_io.convert`).
DATASET_LAYOUTS: dict[str, DatasetLayout] = {
    "lpba40": DatasetLayout(
        "lpba40", "LPBA40",
        layouts=(
            Layout("LONI LPBA40, delineation space",
                   images=("**/*.delineation.skullstripped.*",),
                   labels=("**/*.delineation.structure.label.*",),
                   subject_regex=r"^(?P<id>[^.]+)\.delineation\."),
            _klein_layout(),
        ),
        roots=("LPBA40", "LPBA40_Subjects_Delineation_Space")),
    "ibsr18": DatasetLayout(
        "ibsr18", "IBSR18",
        layouts=(
            _klein_layout(),
            Layout("IBSR v2.0 (NITRC): IBSR_XX/IBSR_XX_ana_strip, _ana, _seg_ana",
                   images=("**/IBSR_[0-9][0-9]_ana_strip.*",), labels=("**/IBSR_[0-9][0-9]_seg_ana.*",),
                   heads=("**/IBSR_[0-9][0-9]_ana.*",), subject_regex=r"^(?P<id>IBSR_\d+)_"),
        ),
        roots=("IBSR18",)),
    "cumc12": DatasetLayout("cumc12", "CUMC12", layouts=(_klein_layout(),), roots=("CUMC12",)),
    "mgh10": DatasetLayout("mgh10", "MGH10", layouts=(_klein_layout(),), roots=("MGH10",)),
    "mindboggle101": DatasetLayout(
        "mindboggle101", "Mindboggle-101",
        layouts=(
            Layout("Mindboggle-101 volumes (<group>_volumes/<subject>/)",
                   images=("*_volumes/*/t1weighted_brain.nii.gz", "*/t1weighted_brain.nii.gz"),
                   labels=("*_volumes/*/labels.DKT31.manual+aseg.nii.gz", "*/labels.DKT31.manual+aseg.nii.gz"),
                   heads=("*_volumes/*/t1weighted.nii.gz", "*/t1weighted.nii.gz"), id_from="parent"),
        ),
        roots=("mindboggle101", "Mindboggle-101", "volumes")),
    "folder": DatasetLayout("folder", "folder of images and label maps",
                            layouts=(Layout("user patterns", images=(), labels=()),)),
}


def _id_getter(layout: Layout, subject_regex: str | None, root: Path) -> Callable[[Path], str | None]:
    """How a file's subject id is read: a user regex (file name, then the path under ``root``), else the
    layout's regex or rule, else (``folder``) the first run of letters and digits of the file name."""
    regex = subject_regex if subject_regex is not None else layout.subject_regex
    compiled = re.compile(regex) if regex else None

    def from_match(m: re.Match | None) -> str | None:
        if not m:
            return None
        if "id" in compiled.groupindex:
            return m.group("id")
        return m.group(1) if compiled.groups else m.group(0)

    def get(path: Path) -> str | None:
        if subject_regex is not None:
            found = from_match(compiled.search(path.name))
            if found is None:
                rel = path.relative_to(root).as_posix() if root in path.parents else path.as_posix()
                found = from_match(compiled.search(rel))
            return found
        text = path.parent.name if layout.id_from == "parent" else path.name
        if compiled is not None:
            return from_match(compiled.search(text))
        if layout.id_from == "parent":
            return text
        if not layout.images:  # the folder preset
            return default_subject_id(text)
        return split_suffix(text)[0]

    return get


def _glob(root: Path, patterns: Iterable[str]) -> list[Path]:
    found: dict[Path, None] = {}
    for pattern in patterns:
        for p in sorted(root.glob(pattern)):
            if _is_image(p):
                found.setdefault(p, None)
    return list(found)


def _candidate_roots(src: Path, dataset: DatasetLayout) -> list[Path]:
    roots = [src]
    wanted = {r.lower() for r in dataset.roots}
    if wanted and src.is_dir():
        roots += sorted(p for p in src.iterdir() if p.is_dir() and p.name.lower() in wanted)
    return roots


def find_dataset_subjects(dataset: str | DatasetLayout, src: PathLike, *, images: str | Sequence[str] | None = None,
                          labels: str | Sequence[str] | None = None, subject_regex: str | None = None,
                          use_heads: bool = False) -> tuple[Path, Layout, list[Subject]]:
    """Find each subject's image and label map in a dataset's distribution folder.

    Parameters
    ----------
    dataset : str or DatasetLayout
        A key of :data:`DATASET_LAYOUTS` (``"lpba40"``, ..., ``"folder"``) or a layout.
    src : path-like
        The dataset folder or its parent (one of the dataset's ``roots`` below it).
    images, labels : glob or list of globs, optional
        Patterns relative to the dataset folder replacing the layout's (both required for ``"folder"``).
    subject_regex : str, optional
        Regex searched in each file name, then in its path under the dataset folder, for the subject id
        (group ``id``, else group 1, else the whole match).
    use_heads : bool
        Find the head (non-skull-stripped) images instead of the brains.

    Returns
    -------
    root : Path
        The dataset folder used.
    layout : Layout
        The layout that matched.
    subjects : list of Subject
        In natural order of ``id`` (``t1w`` is the image found, ``labels`` the label map). A subject with a
        missing or ambiguous file carries the problem in ``notes`` (it is reported, not dropped); an image or
        label file whose name gives no id comes last, as a subject named by the file name, with neither file
        set and a note.

    Raises
    ------
    DatasetError
        ``src`` is not a folder, ``"folder"`` lacks a pattern, or no image matches any layout.
    """
    p = DATASET_LAYOUTS[dataset] if isinstance(dataset, str) else dataset
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder not found")
    as_tuple = (lambda v: None if v is None else (v,) if isinstance(v, str) else tuple(v))
    images, labels = as_tuple(images), as_tuple(labels)
    if p.name == "folder" and (not images or not labels):
        raise DatasetError("the folder preset needs both --images GLOB and --labels GLOB (relative to SRC)")
    looked = []
    for root in _candidate_roots(src, p):
        for layout in p.layouts:
            if images:
                image_globs = images
            elif use_heads:
                if layout.heads is None:
                    looked.append(f"{layout.name}: has no head images (drop --use-heads)")
                    continue
                image_globs = layout.heads
            else:
                image_globs = layout.images
            label_globs = labels or layout.labels
            label_files = _glob(root, label_globs)
            found = [f for f in _glob(root, image_globs) if f not in set(label_files)]
            looked.append(f"{root}/{{{','.join(image_globs)}}}")
            if not found:
                continue
            return root, layout, _pair(root, found, label_files, layout, subject_regex, label_globs)
    raise DatasetError(f"{src}: no {p.title} images found; looked for " + "; ".join(dict.fromkeys(looked)))


def _pair(root: Path, image_files: list[Path], label_files: list[Path], layout: Layout,
          subject_regex: str | None, label_globs: Sequence[str]) -> list[Subject]:
    get_id = _id_getter(layout, subject_regex, root)
    subjects: dict[str, Subject] = {}
    orphans: list[Subject] = []
    field_of = {"image": "t1w", "labels": "labels"}

    def add(path: Path, kind: str) -> None:
        sid = get_id(path)
        if not sid:
            orphans.append(Subject(path.name, notes=[f"{path}: cannot read a subject id from this "
                                                     f"{kind} file name (see --subject-regex)"]))
            return
        s = subjects.setdefault(sid, Subject(sid))
        current = getattr(s, field_of[kind])
        if current is None:
            setattr(s, field_of[kind], path)
            return
        # the same file in two formats (S01.img and S01.nii.gz): keep the preferred one; else ambiguous
        a, b = split_suffix(current.name), split_suffix(path.name)
        if a[0] == b[0] and current.parent == path.parent:
            if _SUFFIX_PRIORITY[b[1]] < _SUFFIX_PRIORITY[a[1]]:
                setattr(s, field_of[kind], path)
        else:
            s.notes.append(f"two {kind} files for subject {sid}: {current} and {path} "
                           "(narrow --images/--labels or --subject-regex)")

    for f in image_files:
        add(f, "image")
    for f in label_files:
        add(f, "labels")
    for s in subjects.values():
        if s.t1w is None:
            s.notes.append(f"{s.labels}: label map of subject {s.id} has no image "
                           f"(no matching image file in {root})")
        elif s.labels is None:
            s.notes.append(f"{s.t1w}: no label map found for subject {s.id} (looked for "
                           f"{', '.join(str(root / g) for g in label_globs)})")
    return sorted(subjects.values(), key=lambda s: natural_key(s.id)) + orphans


# ----------------------------------------------------------------------------- LPBA40 (LONI's folders)


def lpba40_subject(data_dir: PathLike, subject_id: str) -> Subject:
    """The files of LPBA40 subject ``subject_id`` (``"S21"``) in LONI's delineation-space folders:
    ``DATA_DIR/S21/S21.delineation.skullstripped.nii.gz`` and ``S21.delineation.structure.label.nii.gz``
    (whether they exist or not)."""
    d = Path(data_dir) / subject_id
    return Subject(subject_id, t1w=d / f"{subject_id}.delineation.skullstripped.nii.gz",
                   labels=d / f"{subject_id}.delineation.structure.label.nii.gz")


def find_lpba40_subjects(data_dir: PathLike, subject_ids: Sequence[str]) -> list[Subject]:
    """LPBA40 subjects (``["S21", "S22"]``, repeats dropped) in LONI's delineation-space folders.

    Returns
    -------
    list of Subject
        In the order asked, each with ``t1w`` (the skull-stripped image) and ``labels`` (its label map).

    Raises
    ------
    DatasetError
        A file is missing (the message lists the first four).
    """
    out = [lpba40_subject(data_dir, s) for s in dict.fromkeys(subject_ids)]
    missing = [str(p) for s in out for p in (s.t1w, s.labels) if not p.is_file()]
    if missing:
        raise DatasetError(f"{Path(data_dir)}: LPBA40 files missing: {', '.join(missing[:4])}"
                           f"{' ...' if len(missing) > 4 else ''}")
    return out
