"""BIDS in: the cohort of a BIDS dataset (pybids), one :class:`~hdar_pipeline.core.subject.Subject` per subject
(x session).

:func:`find_bids_subjects` reads a BIDS dataset with pybids and returns one
:class:`~hdar_pipeline.core.subject.Subject` per subject (x session): its T1w image and, from a labels derivatives
dataset (``--labels-dir``), its ``*_dseg.nii.gz`` in T1w space. Participant and session labels are checked
against BIDS's alphanumeric rule (:func:`check_label`) before they ever become part of a path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from hdar_pipeline.core.subject import Subject

PathLike = str | os.PathLike


BIDS_VERSION = "1.9.0"


_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


class BIDSError(ValueError):
    """A problem with a BIDS input (dataset, label, filter file) that stops the run; names the culprit."""


def check_label(value: str, entity: str = "participant") -> str:
    """A BIDS label without its prefix (``"sub-01"`` -> ``"01"``), checked to be alphanumeric.

    Raises
    ------
    BIDSError
        The label is empty or holds anything but letters and digits (``../x``, ``01/anat``, spaces),
        so it can never walk out of a folder when it becomes part of a path.
    """
    prefix = {"participant": "sub-", "session": "ses-"}.get(entity, "")
    text = str(value).strip()
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    if not _LABEL_RE.match(text):
        raise BIDSError(f"invalid {entity} label {value!r}: BIDS labels are letters and digits only")
    return text


def load_bids_filter(path: PathLike | None) -> dict[str, Any]:
    """Read a ``--bids-filter-file`` (fMRIPrep's format: ``{"t1w": {"acquisition": "mprage", ...}}``).

    Returns the entities for the T1w query (``{}`` without a file). Keys other than ``t1w`` are
    rejected so that a typo does not silently select nothing.
    """
    if path is None:
        return {}
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BIDSError(f"{p}: cannot read the BIDS filter file ({exc})") from None
    if not isinstance(data, dict) or set(data) - {"t1w"}:
        raise BIDSError(f"{p}: a BIDS filter file is a JSON object with one key, 't1w' (got {sorted(data) if isinstance(data, dict) else type(data).__name__})")
    query = data.get("t1w", {})
    if not isinstance(query, dict):
        raise BIDSError(f"{p}: 't1w' must map entity names to values")
    return {k: v for k, v in query.items() if k not in ("subject", "session", "suffix", "extension", "datatype")}


def _layout(root: PathLike, *, validate: bool, derivative: bool = False):
    import bids

    root = Path(root)
    if not root.is_dir():
        raise BIDSError(f"{root}: not a folder")
    if not (root / "dataset_description.json").is_file():
        raise BIDSError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    try:
        if derivative:
            return bids.BIDSLayout(root, validate=False, is_derivative=True)
        return bids.BIDSLayout(root, validate=validate)
    except Exception as exc:  # pybids raises several types for a bad dataset
        raise BIDSError(f"{root}: pybids cannot index this dataset ({type(exc).__name__}: {exc})") from None


def find_bids_subjects(
    bids_dir: PathLike,
    *,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    bids_filter: Mapping[str, Any] | None = None,
    labels_dir: PathLike | None = None,
    validate: bool = True,
    exclude: Sequence[str] = (),
) -> list[Subject]:
    """The cohort of a BIDS dataset: each subject (x session) with its T1w and optional labels.

    Parameters
    ----------
    bids_dir : path-like
        BIDS raw dataset (read only).
    participant_labels : sequence of str, optional
        Subjects to keep (with or without ``sub-``); all by default. A requested subject missing
        from the dataset is an error.
    session_labels : sequence of str, optional
        Sessions to keep (with or without ``ses-``).
    bids_filter : mapping, optional
        Extra pybids entities for the T1w query (see :func:`load_bids_filter`).
    labels_dir : path-like, optional
        A derivatives dataset with each subject's ``*_dseg.nii.gz`` in T1w space (files with a
        ``space`` entity other than ``T1w`` are ignored).
    validate : bool
        Validate ``bids_dir`` with the BIDS validator (pybids ``validate=True``).
    exclude : sequence of str
        Subjects left out (e.g. the atlas participant).

    Returns
    -------
    list of Subject
        Sorted by subject and session. ``t1w`` is ``None`` when the subject (x session) has no T1w image (it
        then fails alone in the workflow); where several T1w images match, the first (sorted by name) is
        used and a note says so. ``labels`` is the ``dseg`` in T1w space of that image from ``labels_dir``,
        or ``None`` (notes say why when a label map was found but not used). ``entities`` are the chosen
        T1w's BIDS entities (``subject``, ``session``, ``run``, ...; just the subject and session without a
        T1w).
    """
    layout = _layout(bids_dir, validate=validate)
    all_subjects = sorted(layout.get_subjects())
    if participant_labels:
        wanted = [check_label(p) for p in participant_labels]
        missing = [p for p in wanted if p not in all_subjects]
        if missing:
            raise BIDSError(f"{bids_dir}: participant(s) {', '.join('sub-' + m for m in missing)} not found "
                            f"(the dataset has {len(all_subjects)}: {', '.join(all_subjects[:10])}"
                            f"{' ...' if len(all_subjects) > 10 else ''})")
        subjects = sorted(dict.fromkeys(wanted))
    else:
        subjects = all_subjects
    skip = {check_label(e) for e in exclude}
    subjects = [s for s in subjects if s not in skip]
    sessions_wanted = [check_label(s, "session") for s in session_labels] if session_labels else None
    if sessions_wanted is not None:
        have = sorted(layout.get_sessions(subject=subjects) if subjects else [])
        unknown = [s for s in sessions_wanted if s not in have]
        if unknown:
            who = "the participants to process have" if participant_labels or skip else "the dataset has"
            raise BIDSError(f"{bids_dir}: session(s) {', '.join('ses-' + s for s in unknown)} not found ("
                            + (f"{who} {len(have)}: {', '.join('ses-' + s for s in have[:10])}"
                               f"{' ...' if len(have) > 10 else ''})" if have else f"{who} no sessions)"))
    filters = dict(bids_filter or {})
    labels_layout = _layout(labels_dir, validate=False, derivative=True) if labels_dir is not None else None

    cohort: list[Subject] = []
    for sub in subjects:
        sessions = sorted(layout.get_sessions(subject=sub)) or [""]
        if sessions_wanted is not None:
            sessions = [s for s in sessions if s in sessions_wanted]
        for ses in sessions:
            entry = Subject(sub, session=ses, entities={"subject": sub, **({"session": ses} if ses else {})})
            query = {"subject": sub, "suffix": "T1w", "extension": [".nii", ".nii.gz"], "datatype": "anat",
                     **filters}
            if ses:
                query["session"] = ses
            found = sorted(layout.get(**query), key=lambda f: f.path)
            if found:
                entry.t1w = Path(found[0].path)
                entry.entities = {k: str(v) for k, v in found[0].get_entities().items()
                                  if k not in _NOT_ENTITIES}
                if len(found) > 1:
                    entry.notes.append(f"{len(found)} T1w images match; using {entry.t1w.name}")
            if labels_layout is not None:
                siblings = layout.get(subject=sub, suffix="T1w", extension=[".nii", ".nii.gz"], datatype="anat",
                                      **({"session": ses} if ses else {}))
                entry.labels = _find_labels(labels_layout, sub, ses, entry,
                                            t1w=found[0] if found else None, siblings=siblings)
            cohort.append(entry)
    return cohort


#: Entities that say which image a file belongs to (not what a derivative did to it): a label map that
#: carries one of them with a value its T1w does not have belongs to another image.
SOURCE_ENTITIES = ("task", "acquisition", "ceagent", "reconstruction", "direction", "run", "echo", "flip",
                   "inv", "mt", "part", "chunk")


_NOT_COMPARED = ("subject", "session", "suffix", "extension", "datatype")
#: What pybids lists among a file's entities that BIDS does not call entities
_NOT_ENTITIES = ("suffix", "extension", "datatype")


def _find_labels(layout, subject: str, session: str, entry: Subject, *, t1w=None,
                 siblings: Sequence = ()) -> Path | None:
    """The label map (``dseg``, in T1w space) of one subject's chosen T1w in the labels dataset.

    The label map must carry the entities of its T1w (``run``, ``acq``, ``rec``, ...): one with another
    value, or with a source entity the T1w lacks, belongs to another image and is never used. A label
    map that leaves out an entity of the T1w (``sub-01_dseg`` for ``sub-01_run-2_T1w``) is used only when
    that entity does not tell the subject's T1w images apart; otherwise the subject is not evaluated and a
    note says why.
    """
    query = {"subject": subject, "suffix": "dseg", "extension": [".nii", ".nii.gz"]}
    if session:
        query["session"] = session
    mine = {k: v for k, v in (t1w.get_entities() if t1w is not None else {}).items() if k not in _NOT_COMPARED}
    full, partial, ambiguous = [], [], []
    for f in layout.get(**query):
        ent = f.get_entities()
        if ent.get("space") not in (None, "T1w", "orig"):
            continue
        if any(k in ent and ent[k] != v for k, v in mine.items()):
            continue  # another run / acquisition / ... of this subject
        if any(k in ent and k not in mine for k in SOURCE_ENTITIES):
            continue  # names an image property the chosen T1w does not have
        missing = [k for k in mine if k not in ent]
        if not missing:
            full.append(f.path)
        elif all(len({s.get_entities().get(k) for s in siblings}) <= 1 for k in missing):
            partial.append(f.path)
        else:
            ambiguous.append((f.path, missing))
    files = sorted(full) or sorted(partial)
    if not files:
        if ambiguous and t1w is not None:
            path, missing = sorted(ambiguous)[0]
            entry.notes.append(f"label map {Path(path).name} does not say which T1w it belongs to (no "
                               f"{', '.join(missing)} entity, and the subject has several T1w images); "
                               f"{Path(t1w.path).name} is not evaluated")
        return None
    if len(files) > 1:
        entry.notes.append(f"{len(files)} label maps match {Path(t1w.path).name if t1w is not None else 'the subject'}; "
                           f"using {Path(files[0]).name}")
    return Path(files[0])


def find_bids_participant(bids_dir: PathLike, label: str, *, labels_dir: PathLike | None = None,
                          validate: bool = True) -> Subject:
    """One participant's T1w (and labels), e.g. for ``--atlas-participant``; raises when it has no T1w."""
    entries = find_bids_subjects(bids_dir, participant_labels=[label], labels_dir=labels_dir, validate=validate)
    entry = entries[0] if entries else Subject(check_label(label))
    if entry.t1w is None:
        raise BIDSError(f"{bids_dir}: participant sub-{entry.id} has no T1w image")
    return entry


def label_table(labels_dir: PathLike | None) -> Path | None:
    """The labels dataset's ``dseg.tsv`` lookup table (names of the label values), if it has one."""
    if labels_dir is None:
        return None
    candidate = Path(labels_dir) / "dseg.tsv"
    return candidate if candidate.is_file() else None
