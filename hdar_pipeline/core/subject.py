"""One subject of a cohort on disk (:class:`Subject`) and every finder that returns subjects.

A :class:`Subject` is the one record every part of the package uses for a subject's files: the BIDS App's
cohort (:func:`hdar_pipeline.bids_io.inputs.find_bids_subjects`, pybids), HDAR training
(:func:`find_image_subjects`, what ``hdar train`` reads), the benchmark (:mod:`hdar_pipeline.apps.benchmark.pairs`)
and the converter (:mod:`hdar_pipeline.bids_io.convert`).

Finders here (all but :func:`find_bids_images` without pybids, which uses it only when it is installed):

* :func:`find_dataset_subjects`: the subjects of a public labelled dataset in the layout its distribution
  ships (:data:`DATASET_LAYOUTS`: LPBA40, IBSR18, CUMC12, MGH10, Mindboggle-101) or of a folder of images and
  label maps given by glob patterns (``"folder"``); what ``hdar convert`` reads;
* :func:`find_lpba40_subjects`: LPBA40 subjects in LONI's delineation-space folders
  (``SNN/SNN.delineation.skullstripped.nii.gz``), what the benchmark registers;
* :func:`find_image_subjects`: subjects from their images, given as a list of files, a folder
  (:func:`find_folder_images`) or a BIDS dataset's T1w images (:func:`find_bids_images`), each with its label
  map from a folder, a list of files or, for BIDS, ``derivatives/**/*_dseg`` (:func:`find_bids_labels`), paired
  by :func:`match_labels`; what ``hdar train`` reads.

Every finder raises :class:`DatasetError` with a message naming the folder or file.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

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


# ----------------------------------------------------------------------------- images: a list, a folder, BIDS

#: File names a folder's default search skips: label maps and masks.
_LABEL_LIKE = re.compile(r"(label|_dseg|_mask)", re.IGNORECASE)
_ENTITY = re.compile(r"(?:^|_)(sub|ses)-([a-zA-Z0-9]+)")
#: ``space-`` entities of a label map in the subject's own (native T1w) space.
_NATIVE_SPACES = {"T1w", "orig", "native", "individual"}


def _stem(path: Path) -> str:
    """The file name without its image suffix (``.nii.gz``, ``.img``, ``.hdr``, ...), else without its last
    suffix."""
    base, suffix = split_suffix(path.name)
    return base if suffix in IMAGE_SUFFIXES or suffix == ".hdr" else path.stem


def subject_name(path: PathLike) -> str:
    """A short name for an image file: ``sub-01[_ses-1]`` for BIDS names, else the file stem."""
    stem = _stem(Path(path))
    ents = dict(_ENTITY.findall(stem))
    if "sub" in ents:
        return f"sub-{ents['sub']}" + (f"_ses-{ents['ses']}" if "ses" in ents else "")
    return stem


def _match_keys(path: Path) -> tuple[str | None, str]:
    """Matching keys of a file: its BIDS ``sub[_ses]`` key (or None) and its leading identifier."""
    stem = _stem(path)
    ents = dict(_ENTITY.findall(stem))
    bids_key = None
    if "sub" in ents:
        bids_key = f"sub-{ents['sub']}" + (f"_ses-{ents['ses']}" if "ses" in ents else "")
    return bids_key, re.split(r"[._]", stem, maxsplit=1)[0]


def find_folder_images(folder: PathLike, pattern: str | None = None) -> list[Path]:
    """Image files in ``folder`` matching ``pattern`` (a glob relative to it, ``**`` allowed).

    Without ``pattern`` every image directly inside ``folder`` is returned except names that look like
    label maps or masks (``*label*``, ``*_dseg*``, ``*_mask*``, case-insensitively). An image is a file ending
    in one of :data:`IMAGE_SUFFIXES` (an Analyze ``.hdr`` is not: its ``.img`` is). Sorted by path.

    Raises
    ------
    DatasetError
        ``folder`` is not a folder, or no image matches.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    if pattern:
        files = [p for p in folder.glob(pattern) if _is_image(p)]
    else:
        files = [p for p in folder.iterdir() if _is_image(p) and not _LABEL_LIKE.search(p.name)]
    files = sorted(files)
    if not files:
        raise DatasetError(f"{folder}: no image files found" + (f" matching {pattern!r}" if pattern else ""))
    return files


def find_bids_images(root: PathLike) -> list[Path]:
    """The T1w images of a BIDS dataset (every subject and session), sorted.

    Uses pybids (``BIDSLayout(root, validate=False)``) when it can be imported and index the dataset (a
    warning says when it cannot); otherwise globs ``sub-*/anat/*_T1w.nii[.gz]`` and
    ``sub-*/ses-*/anat/*_T1w.nii[.gz]``.

    Raises
    ------
    DatasetError
        ``root`` is not a folder, or it holds no T1w image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: BIDS dataset folder not found")
    files: list[Path] | None = None
    try:
        import bids  # type: ignore[import-not-found]
    except ImportError:
        bids = None
    if bids is not None:
        try:
            layout = bids.BIDSLayout(str(root), validate=False)
            files = [Path(f) for f in layout.get(suffix="T1w", datatype="anat", extension=[".nii.gz", ".nii"],
                                                 return_type="filename")]
        except Exception as exc:  # an incomplete dataset_description.json, an unreadable tree, ...
            warnings.warn(f"pybids could not index {root} ({type(exc).__name__}: {exc}); globbing instead",
                          stacklevel=2)
            files = None
    if files is None:
        files = []
        for pat in ("sub-*/anat/*_T1w.nii.gz", "sub-*/anat/*_T1w.nii",
                    "sub-*/ses-*/anat/*_T1w.nii.gz", "sub-*/ses-*/anat/*_T1w.nii"):
            files += list(root.glob(pat))
    files = sorted(set(files))
    if not files:
        raise DatasetError(f"{root}: no T1w images found (expected sub-*/[ses-*/]anat/*_T1w.nii.gz)")
    return files


def _space(path: Path) -> str | None:
    m = re.search(r"(?:^|_)space-([a-zA-Z0-9]+)", _stem(path))
    return m.group(1) if m else None


def find_bids_labels(root: PathLike, desc: str | None = None) -> list[Path]:
    """Label maps in subject space under ``root/derivatives``: ``*_dseg.nii[.gz]`` with no ``space-``
    entity (or a native one: T1w, orig, native, individual), optionally only those with ``desc-<desc>``.
    Sorted; empty when there is no ``derivatives`` folder."""
    deriv = Path(root) / "derivatives"
    if not deriv.is_dir():
        return []
    out = []
    for p in deriv.rglob("*_dseg.nii*"):
        if not _is_image(p):
            continue
        space = _space(p)
        if space is not None and space not in _NATIVE_SPACES:
            continue
        if desc is not None and f"_desc-{desc}_" not in f"_{_stem(p)}_":
            continue
        out.append(p)
    return sorted(out)


def match_labels(images: Sequence[Path], candidates: Sequence[Path], *, required: bool = True) -> list[Path | None]:
    """The label file of each image among ``candidates``.

    An image and a candidate match when they have the same file name, else (for a BIDS file name) the same
    ``sub``/``ses`` entities, else (for other names) the same leading identifier: the file name up to its
    first ``.`` or ``_`` (``S01`` for ``S01.delineation.skullstripped.nii.gz``). A candidate that is one of
    the images is ignored.

    Returns
    -------
    list of Path or None
        One per image, in order; ``None`` where nothing matches (only without ``required``).

    Raises
    ------
    DatasetError
        An image matches several candidates, or (``required``) none; the message names the image.
    """
    images = [Path(p) for p in images]
    image_set = {p.resolve() for p in images}
    cands = [Path(c) for c in candidates if Path(c).resolve() not in image_set]
    by_name: dict[str, list[Path]] = {}
    by_bids: dict[str, list[Path]] = {}
    by_lead: dict[str, list[Path]] = {}
    for c in cands:
        by_name.setdefault(c.name, []).append(c)
        bk, lead = _match_keys(c)
        if bk is not None:
            by_bids.setdefault(bk, []).append(c)
        by_lead.setdefault(lead, []).append(c)
    out: list[Path | None] = []
    for img in images:
        bk, lead = _match_keys(img)
        for found in (by_name.get(img.name), by_bids.get(bk) if bk else None, None if bk else by_lead.get(lead)):
            if found:
                break
        else:
            found = None
        if not found:
            if required:
                raise DatasetError(f"{img}: no label map found for it (looked for the same file name, BIDS "
                                   f"sub/ses entities or the leading identifier {lead!r})")
            out.append(None)
        elif len(found) > 1:
            raise DatasetError(f"{img}: several label maps match it ({', '.join(str(f) for f in found)}); "
                               "pass the label files explicitly or narrow the pattern/desc")
        else:
            out.append(found[0])
    return out


def find_image_subjects(
    *,
    images: Sequence[PathLike] | None = None,
    folder: PathLike | None = None,
    bids: PathLike | None = None,
    pattern: str | None = None,
    labels: PathLike | Sequence[PathLike] | Literal["auto"] | None = "auto",
    labels_pattern: str | None = None,
    labels_desc: str | None = None,
) -> list[Subject]:
    """Subjects from their images (exactly one source) with their label maps: what ``hdar train`` reads.

    Parameters
    ----------
    images, folder, bids
        Exactly one: a list of image files, a folder (with ``pattern``, see :func:`find_folder_images`) or a
        BIDS dataset root (its T1w images, see :func:`find_bids_images`).
    pattern : str, optional
        Glob for ``folder`` (default: every image directly inside it that is not label-like).
    labels : folder, list of files, "auto" or None
        A folder of label maps (searched with ``labels_pattern``, default every image file below it, paired
        by :func:`match_labels`), a list of label files in the order of the images, ``"auto"`` (BIDS:
        ``derivatives/**/*_dseg`` where present (:func:`find_bids_labels`), subjects without one train
        without Dice, with a warning; otherwise no labels), or ``None``.
    labels_pattern : str, optional
        Glob relative to a ``labels`` folder.
    labels_desc : str, optional
        BIDS: only ``*_desc-<labels_desc>_*dseg`` files.

    Returns
    -------
    list of Subject
        Sorted as found: ``t1w`` the image, ``labels`` its label map or None, ``name`` ``sub-01[_ses-1]`` for a
        BIDS file name (the file stem when two images share it), else the file stem; ``id`` and ``session``
        (and ``entities``) from the file name's ``sub-``/``ses-`` entities, else the name.

    Raises
    ------
    DatasetError
        Not exactly one source, a file or folder missing, an image listed twice, a label file count that
        differs from the image count, or a label map missing or ambiguous; the message names the file.
    """
    given = [x is not None for x in (images, folder, bids)]
    if sum(given) != 1:
        raise DatasetError("give exactly one of images, folder or bids")
    if images is not None:
        paths = [Path(p) for p in images]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"image file(s) not found: {', '.join(missing)}")
    elif folder is not None:
        paths = find_folder_images(folder, pattern)
    else:
        paths = find_bids_images(bids)  # type: ignore[arg-type]
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise DatasetError("the same image is listed more than once")

    label_paths: list[Path | None]
    if labels is None:
        label_paths = [None] * len(paths)
    elif isinstance(labels, str) and labels == "auto":
        if bids is not None:
            label_paths = match_labels(paths, find_bids_labels(bids, labels_desc), required=False)
            missing = [subject_name(p) for p, lab in zip(paths, label_paths) if lab is None]
            if missing and len(missing) < len(paths):
                warnings.warn(f"no *_dseg label map for {len(missing)} of {len(paths)} subjects "
                              f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                              "their pairs train without the Dice term", stacklevel=2)
        else:
            label_paths = [None] * len(paths)
    elif isinstance(labels, (str, os.PathLike)) and Path(labels).is_dir():
        candidates = [p for p in (Path(labels).glob(labels_pattern) if labels_pattern else Path(labels).rglob("*"))
                      if _is_image(p)]
        label_paths = match_labels(paths, candidates, required=True)
    else:
        files = [Path(labels)] if isinstance(labels, (str, os.PathLike)) else [Path(p) for p in labels]
        if len(files) != len(paths):
            raise DatasetError(f"{len(files)} label files for {len(paths)} images; give one per image (same order) "
                               "or a folder")
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise DatasetError(f"label file(s) not found: {', '.join(missing)}")
        label_paths = list(files)
    names = [subject_name(p) for p in paths]
    if len(set(names)) != len(names):  # e.g. two runs of one subject: fall back to full stems
        names = [_stem(p) for p in paths]
    return [_image_subject(p, lab, n) for p, lab, n in zip(paths, label_paths, names)]


def _image_subject(image: Path, labels: Path | None, name: str) -> Subject:
    ents = dict(_ENTITY.findall(_stem(image)))
    if "sub" not in ents:
        return Subject(name, t1w=image, labels=labels, name=name)
    entities = {"subject": ents["sub"], **({"session": ents["ses"]} if "ses" in ents else {})}
    return Subject(ents["sub"], session=ents.get("ses", ""), t1w=image, labels=labels, entities=entities, name=name)
