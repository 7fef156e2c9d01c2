"""The pairs a benchmark registers: the subjects of a dataset (LPBA40's folder layout or a BIDS dataset with labels,
as :class:`~hdar_pipeline.core.subject.Subject`) and the moving -> fixed pairs made from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hdar_pipeline.core.subject import DatasetError, Subject, find_lpba40_subjects, lpba40_subject

REPO = Path(__file__).resolve().parents[3]


#: LPBA40's held-out (validation) subjects.
LPBA40_VALIDATION = tuple(f"S{i:02d}" for i in range(21, 31))


PAIR_MODES = ("consecutive", "onto-first", "all")


@dataclass(frozen=True)
class Pair:
    """A moving subject registered onto a fixed one (each with its skull-stripped ``t1w`` and ``labels`` on the
    same grid)."""

    moving: Subject
    fixed: Subject

    @property
    def name(self) -> str:
        return f"{self.moving.id}->{self.fixed.id}"

    @property
    def key(self) -> str:
        return f"{self.moving.id}-to-{self.fixed.id}"


class BenchmarkInputError(ValueError):
    """The dataset, the subjects or the pairs asked for cannot be used."""


def default_lpba40_dir() -> Path:
    """``$HDAR_LPBA40_DIR``, else ``../shared/data/lpba40`` beside the repository."""
    env = os.environ.get("HDAR_LPBA40_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "lpba40"


def lpba40_label(value: str) -> str:
    """``"21"``, ``"s21"``, ``"S21"`` -> ``"S21"``."""
    v = str(value).strip()
    if v[:1] in ("S", "s"):
        v = v[1:]
    if not v.isdigit():
        raise BenchmarkInputError(f"not an LPBA40 subject: {value!r} (expected e.g. S21 or 21)")
    return f"S{int(v):02d}"


def lpba40_files(data_dir: str | os.PathLike, subject: str) -> Subject:
    """The files of one LPBA40 subject (``"S21"`` or ``"21"``) in ``data_dir``, whether they exist or not."""
    return lpba40_subject(data_dir, lpba40_label(subject))


def lpba40_subjects(data_dir: str | os.PathLike, subjects: Sequence[str] | None = None) -> list[Subject]:
    """LPBA40 subjects (default: the validation subjects S21-S30); raises when a file is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BenchmarkInputError(f"{data_dir}: LPBA40 folder not found (give --lpba40 DIR or set HDAR_LPBA40_DIR)")
    names = [lpba40_label(s) for s in subjects] if subjects else list(LPBA40_VALIDATION)
    try:
        return find_lpba40_subjects(data_dir, names)
    except DatasetError as exc:
        raise BenchmarkInputError(str(exc)) from None


def bids_subjects(bids_dir: str | os.PathLike, labels_dir: str | os.PathLike,
                  subjects: Sequence[str] | None = None) -> tuple[list[Subject], list[str]]:
    """Subjects of a BIDS dataset with their labels: ``(subjects, notes)``.

    Without ``subjects``, participants lacking a T1w or a label map are skipped with a note; a requested
    participant lacking one is an error. Sessions: the first session of each subject.
    """
    from hdar_pipeline.bids_io.inputs import BIDSError, check_label, find_bids_subjects

    wanted = [check_label(s) for s in subjects] if subjects else None
    try:
        cohort = find_bids_subjects(bids_dir, participant_labels=wanted, labels_dir=labels_dir, validate=False)
    except BIDSError as exc:
        raise BenchmarkInputError(str(exc)) from None
    out: list[Subject] = []
    notes: list[str] = []
    seen: set[str] = set()
    for entry in cohort:
        if entry.id in seen:
            continue
        problem = ("no T1w image" if entry.t1w is None else
                   f"no label map in {labels_dir}" if entry.labels is None else "")
        if problem:
            if wanted:
                raise BenchmarkInputError(f"{bids_dir}: sub-{entry.id} has {problem}")
            notes.append(f"sub-{entry.id} skipped: {problem}")
            continue
        seen.add(entry.id)
        out.append(entry)
    return out, notes


def make_pairs(subjects: Sequence[Subject], mode: str = "consecutive", n_pairs: int | None = None) -> list[Pair]:
    """Pairs from subjects: ``consecutive`` (each onto the next, cyclic), ``onto-first``, or ``all``."""
    subs = list(subjects)
    if len(subs) < 2:
        raise BenchmarkInputError(f"need at least two subjects to make pairs (got {len(subs)})")
    if mode == "consecutive":
        pairs = [Pair(subs[i], subs[(i + 1) % len(subs)]) for i in range(len(subs))]  # 2 subjects: both ways
    elif mode == "onto-first":
        pairs = [Pair(s, subs[0]) for s in subs[1:]]
    elif mode == "all":
        pairs = [Pair(m, f) for m in subs for f in subs if m.id != f.id]
    else:
        raise BenchmarkInputError(f"unknown pair mode {mode!r}; choose from {', '.join(PAIR_MODES)}")
    if n_pairs is not None:
        if n_pairs < 1:
            raise BenchmarkInputError("--n-pairs must be >= 1")
        pairs = pairs[:n_pairs]
    return pairs


def parse_pair_specs(specs: Sequence[str], lookup: Callable[[str], Subject]) -> list[Pair]:
    """``["02:01", ...]`` (MOVING:FIXED) -> pairs, with ``lookup(label)`` giving a subject's files."""
    pairs = []
    for spec in specs:
        if spec.count(":") != 1 or not all(spec.split(":")):
            raise BenchmarkInputError(f"--pairs takes MOVING:FIXED (e.g. 02:01), got {spec!r}")
        moving, fixed = spec.split(":")
        m, f = lookup(moving), lookup(fixed)
        if m.id == f.id:
            raise BenchmarkInputError(f"pair {spec!r} registers a subject to itself")
        pairs.append(Pair(m, f))
    unique: dict[str, Pair] = {}
    for pair in pairs:  # a pair asked for twice runs once
        unique.setdefault(pair.key, pair)
    return list(unique.values())


def select_pairs(subjects: Sequence[Subject], lookup: Callable[[str], Subject],
                 pair_specs: Sequence[str] | None = None, mode: str = "consecutive",
                 n_pairs: int | None = None) -> list[Pair]:
    """The pairs a run registers: the explicit ``pair_specs``, else pairs made from ``subjects``.

    Parameters
    ----------
    subjects : sequence of Subject
        The subjects to pair when no ``pair_specs`` are given.
    lookup : callable
        ``lookup(label)`` gives a subject's files (for ``pair_specs``).
    pair_specs : sequence of str, optional
        ``MOVING:FIXED`` labels (see :func:`parse_pair_specs`).
    mode : {"consecutive", "onto-first", "all"}
        How ``subjects`` are paired (see :func:`make_pairs`).
    n_pairs : int, optional
        Keep the first ``n_pairs`` pairs.

    Returns
    -------
    list of Pair

    Raises
    ------
    BenchmarkInputError
        Malformed specs, fewer than two subjects, an unknown mode or ``n_pairs < 1``.
    """
    if pair_specs:
        pairs = parse_pair_specs(pair_specs, lookup)
        return pairs[:n_pairs] if n_pairs else pairs
    return make_pairs(subjects, mode, n_pairs)


def lpba40_pairs(data_dir: str | os.PathLike, subjects: Sequence[str] | None = None,
                 pair_specs: Sequence[str] | None = None, mode: str = "consecutive",
                 n_pairs: int | None = None) -> list[Pair]:
    """Pairs of LPBA40 subjects (the folder layout of :func:`lpba40_subjects`), as :func:`select_pairs` makes them.

    Parameters
    ----------
    data_dir : path
        The LPBA40 folder (``SNN/SNN.delineation.skullstripped.nii.gz``, ``SNN.delineation.structure.label.nii.gz``).
    subjects : sequence of str, optional
        Subjects to pair (``"S21"`` or ``"21"``); default the validation subjects S21-S30.
    pair_specs : sequence of str, optional
        Explicit ``MOVING:FIXED`` pairs (e.g. ``"S22:S21"``, ``"22:21"``); only their subjects are read.
    mode, n_pairs
        As in :func:`select_pairs`.

    Raises
    ------
    BenchmarkInputError
        No such folder, missing files, bad labels or specs.
    """
    if pair_specs:
        wanted = [lpba40_label(s) for spec in pair_specs for s in spec.split(":") if s]
        found = lpba40_subjects(data_dir, list(dict.fromkeys(wanted)))
    else:
        found = lpba40_subjects(data_dir, subjects)
    by_label = {s.id: s for s in found}
    return select_pairs(found, lambda label: by_label[lpba40_label(label)], pair_specs, mode, n_pairs)
