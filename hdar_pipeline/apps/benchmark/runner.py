"""Method comparison: every registration method on the same pairs, in the same run, in one table.

``hdar benchmark`` (and ``benchmarks/compare_methods.py``) register each pair of a dataset with the
variants below and report, per variant, mean +- sd Dice and target overlap (over the labels of the
fixed image), the % of folded voxels (Jacobian determinant <= 0), the standard deviation of log|J|, the
median seconds per pair, the peak memory and each variant's time as a ratio to SyN quality. All variants
are measured in the same process, pair by pair, so the timing ratios hold on a noisy, shared machine.

Variants
--------
======================  ==========================================================================
``affine``              antspyx rigid + affine only
``demons``              SimpleITK diffeomorphic Demons (three levels)
``lccdemons``           LCC-Demons (PyTorch; symmetric log-domain Demons with local correlation forces, three levels)
``fireants``            FireANTs' greedy registration with the settings of its LPBA40 experiment (optional extra;
                        10-15 min per LPBA40 pair on 2 CPU cores: by default 2 pairs)
``fireants-syn``        FireANTs' SyN registration, the same experiment's settings (optional extra; 2 pairs)
``syn-fast``            ANTs SyN, antspyx defaults
``syn-quality``         ANTs SyN at ``antsRegistrationSyN.sh`` quality (about 30 min per LPBA40 pair on 2
                        cores: by default it runs on 1 pair only, see ``--max-pairs-per-variant``)
``hdar``                HDAR with its default preset and options (:data:`~hdar_pipeline.methods.hdar_method.DEFAULT_PRESET`)
``hdar-fast``           HDAR, the paper's inference (S2/S3 on the hardest patches)
``hdar-full``           HDAR, S2/S3 on a sliding window over the brain
``hdar-refined``        HDAR fast + ``--refine-steps`` steps of instance optimisation
``hdar-accurate``       HDAR's ``accurate`` preset: 30 steps per level and 3 on the full-resolution grid
``voxelmorph``          VoxelMorph, the network alone (its ``fast`` preset: VoxelMorph as published, after
                        HDAR's affine pre-alignment)
``voxelmorph-refined``  VoxelMorph followed by HDAR's ``accurate`` refinement (its ``refined`` preset)
======================  ==========================================================================

A variant that cannot run here (HDAR or VoxelMorph when the requested weights are missing or unusable, FireANTs when
it is not installed) appears in the table as "not run: <reason>" and in the notes; it never stops the others. A pair that fails is reported and the
run goes on.

Pairs
-----
From a BIDS dataset with a labels derivatives dataset (``--bids-dir``, ``--labels-dir``: each subject's
``*_dseg.nii.gz`` in T1w space), or from the LPBA40 folder layout (``--lpba40 DIR``: ``SNN/SNN.delineation.
skullstripped.nii.gz`` and ``SNN/SNN.delineation.structure.label.nii.gz``). Pairs are given explicitly
(``--pairs MOVING:FIXED ...``) or made from the subjects (``--subjects``; default: every BIDS participant
with labels, LPBA40's validation subjects S21-S30) by ``--pairs-from``: ``consecutive`` (each subject onto
the next, the last onto the first: S21->S22, ..., S30->S21), ``onto-first`` (every subject onto the first)
or ``all`` (every ordered pair); ``--n-pairs`` keeps the first N.

Caching
-------
Each (variant, pair) result is one JSON row in ``OUT/rows/``; an interrupted run resumes where it stopped.
A cached row is reused only while the method's parameters, the threads, the seed, the affine stage and
the input files are unchanged; ``--no-cache`` reruns everything.

Outputs
-------
``OUT/benchmark_pairs.csv``
    One row per variant x pair (columns :data:`PAIR_COLUMNS`).
``OUT/benchmark_summary.csv``
    One row per variant (columns :data:`SUMMARY_COLUMNS`); ``time_ratio_to_syn_quality`` is the
    variant's median runtime over SyN quality's median runtime (NaN, with a note, when SyN quality did
    not run).
``OUT/benchmark.md``
    The table as markdown ("mean ± sd", pairs per variant), the machine (CPU, cores, torch/ANTs
    versions), the exact command line and the notes; when the default HDAR (``hdar``) ran, every other method
    against it pair by pair (:func:`paired_against`).
``OUT/benchmark_paired.csv``
    That comparison: per method, the pairs both registered, each one's mean Dice over them, HDAR's minus the
    method's per pair (mean, min, max), the pairs where HDAR is higher, a Wilcoxon signed-rank p and the ratio of
    their median seconds per pair.
``OUT/benchmark_dice_time.png`` (and ``.svg``)
    Mean Dice (SD bars) against the median seconds per pair (log scale), one labelled point per variant.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover (pandas is imported where tables are built: `hdar register`
    import pandas as pd  # never needs it, and it costs 0.15 s of start-up)

REPO = Path(__file__).resolve().parents[3]
DEFAULT_OUTPUT = "benchmark-results"
DEFAULT_REFINE_STEPS = 25  # the refined preset's (hdar_pipeline.methods.hdar_method.REFINED_STEPS)
#: Variants limited to fewer pairs unless ``--max-pairs-per-variant`` says otherwise (``fireants=all`` on a GPU: on
#: a 2-core CPU one LPBA40 pair takes FireANTs 10-15 min).
DEFAULT_MAX_PAIRS: dict[str, int] = {"syn-quality": 1, "fireants": 2, "fireants-syn": 2}
#: LPBA40's held-out (validation) subjects.
LPBA40_VALIDATION = tuple(f"S{i:02d}" for i in range(21, 31))
PAIR_MODES = ("consecutive", "onto-first", "all")
REFERENCE_VARIANT = "syn-quality"

PAIR_COLUMNS = [
    "variant", "method", "preset", "moving", "fixed", "status", "error", "cached",
    "mean_dice", "mean_dice_before", "mean_target_overlap", "n_labels", "n_labels_missing",
    "folded_percent", "folded_percent_mask", "std_log_jacobian", "jacobian_min", "jacobian_max",
    "runtime_s", "peak_memory_mb", "device", "load_avg_1min", "threads", "seed", "affine_stage",
    "finished_utc", "commit", "machine", "fixed_image", "moving_image", "parameters",
]
SUMMARY_COLUMNS = [
    "variant", "method", "preset", "status", "n_pairs", "n_pairs_planned", "n_failed",
    "dice_mean", "dice_sd", "target_overlap_mean", "target_overlap_sd", "dice_before_mean",
    "folded_percent_mean", "folded_percent_max", "folded_percent_mask_mean", "folded_percent_mask_max",
    "std_log_jacobian_mean", "std_log_jacobian_sd",
    "runtime_s_median", "runtime_s_mean", "peak_memory_mb_max", "time_ratio_to_syn_quality",
    "time_ratio_to_syn_fast",
]


# ----------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method, its preset and extra constructor arguments."""

    name: str
    method: str
    preset: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


def default_variants(refine_steps: int = DEFAULT_REFINE_STEPS) -> dict[str, Variant]:
    """The variants in table order (cheap first; SyN quality, the reference, last)."""
    variants = [
        Variant("affine", "affine", None, {}, "antspyx rigid + affine only"),
        Variant("demons", "demons", None, {}, "SimpleITK diffeomorphic Demons, 3 levels"),
        Variant("lccdemons", "lccdemons", None, {}, "LCC-Demons (PyTorch), the paper's parameters, 3 levels"),
        Variant("fireants", "fireants", "greedy", {}, "FireANTs greedy, its LPBA40 settings (200/100/50 at 4/2/1)"),
        Variant("fireants-syn", "fireants", "syn", {}, "FireANTs SyN, its LPBA40 settings (100/75/50 at 4/2/1)"),
        Variant("syn-fast", "syn", "fast", {}, "ANTs SyN, antspyx defaults"),
        Variant("hdar", "hdar", None, {}, "HDAR with its default preset and options (what users get)"),
        Variant("hdar-fast", "hdar", "fast", {}, "HDAR, S2/S3 on the hardest patches"),
        Variant("hdar-full", "hdar", "full", {}, "HDAR, S2/S3 on a sliding window"),
        Variant("hdar-refined", "hdar", "refined", {"refine": int(refine_steps)},
                f"HDAR fast + {int(refine_steps)} instance-optimisation steps per refinement level"),
        Variant("hdar-accurate", "hdar", "accurate", {},
                "HDAR fast + 30 steps per refinement level and 3 on the full-resolution grid"),
        Variant("voxelmorph", "voxelmorph", "fast", {}, "VoxelMorph, the network alone (after the affine "
                "pre-alignment HDAR uses)"),
        Variant("voxelmorph-refined", "voxelmorph", "refined", {},
                "VoxelMorph + HDAR accurate's refinement (30 steps per level, 2 at full resolution)"),
        Variant("syn-quality", "syn", "quality", {}, "ANTs SyN, antsRegistrationSyN.sh quality"),
    ]
    return {v.name: v for v in variants}


VARIANT_NAMES = tuple(default_variants())


class VariantUnavailable(RuntimeError):
    """A variant cannot run on this installation (e.g. HDAR without weights)."""


def build_method(variant: Variant, *, seed: int | None, threads: int | None, device: str | None = None,
                 hdar_weights: str | os.PathLike | None = None, voxelmorph_weights: str | os.PathLike | None = None):
    """The registration method of ``variant`` (``hdar_weights``, ``voxelmorph_weights``: the weights of the HDAR and
    VoxelMorph variants, default the shipped ones).

    Raises
    ------
    VariantUnavailable
        The method cannot be built here (HDAR, VoxelMorph: no weights, unusable weights, or no HDAR module).
    """
    from hdar_pipeline.methods import get_method

    if variant.method not in ("hdar", "voxelmorph"):
        if variant.kwargs:
            raise ValueError(f"variant {variant.name}: only HDAR and VoxelMorph variants take extra arguments")
        try:
            return get_method(variant.method, preset=variant.preset, seed=seed, threads=threads, device=device)
        except ImportError as exc:  # an optional extra (FireANTs) is not installed
            raise VariantUnavailable(str(exc)) from None
    try:
        from hdar_pipeline.hdar.weights import WeightsError
        from hdar_pipeline.methods.hdar_method import DEFAULT_PRESET, HDARMethod
        from hdar_pipeline.methods.voxelmorph_method import DEFAULT_PRESET as VXM_DEFAULT, VoxelMorphMethod
    except ImportError as exc:  # the HDAR module or torch is missing
        raise VariantUnavailable(f"HDAR is not available in this installation ({exc})") from None
    cls, default, weights = ((HDARMethod, DEFAULT_PRESET, hdar_weights) if variant.method == "hdar"
                             else (VoxelMorphMethod, VXM_DEFAULT, voxelmorph_weights))
    kwargs = dict(variant.kwargs)
    if weights is not None:
        kwargs["weights"] = weights
    try:
        return cls(preset=variant.preset or default, seed=seed, threads=threads, device=device or "auto", **kwargs)
    except WeightsError as exc:  # NoWeightsError included
        raise VariantUnavailable(one_line(str(exc))) from None


# -------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class SubjectFiles:
    """One subject: its skull-stripped T1w image and its label map (same grid)."""

    subject: str
    image: Path
    labels: Path


@dataclass(frozen=True)
class Pair:
    """A moving subject registered onto a fixed one."""

    moving: SubjectFiles
    fixed: SubjectFiles

    @property
    def name(self) -> str:
        return f"{self.moving.subject}->{self.fixed.subject}"

    @property
    def key(self) -> str:
        return f"{self.moving.subject}-to-{self.fixed.subject}"


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


def lpba40_files(data_dir: str | os.PathLike, subject: str) -> SubjectFiles:
    s = lpba40_label(subject)
    d = Path(data_dir) / s
    return SubjectFiles(s, d / f"{s}.delineation.skullstripped.nii.gz", d / f"{s}.delineation.structure.label.nii.gz")


def lpba40_subjects(data_dir: str | os.PathLike, subjects: Sequence[str] | None = None) -> list[SubjectFiles]:
    """LPBA40 subjects (default: the validation subjects S21-S30); raises when a file is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BenchmarkInputError(f"{data_dir}: LPBA40 folder not found (give --lpba40 DIR or set HDAR_LPBA40_DIR)")
    names = [lpba40_label(s) for s in subjects] if subjects else list(LPBA40_VALIDATION)
    out = [lpba40_files(data_dir, s) for s in dict.fromkeys(names)]
    missing = [str(p) for s in out for p in (s.image, s.labels) if not p.is_file()]
    if missing:
        raise BenchmarkInputError(f"{data_dir}: LPBA40 files missing: {', '.join(missing[:4])}"
                                  f"{' ...' if len(missing) > 4 else ''}")
    return out


def bids_subjects(bids_dir: str | os.PathLike, labels_dir: str | os.PathLike,
                  subjects: Sequence[str] | None = None) -> tuple[list[SubjectFiles], list[str]]:
    """Subjects of a BIDS dataset with their labels: ``(subjects, notes)``.

    Without ``subjects``, participants lacking a T1w or a label map are skipped with a note; a requested
    participant lacking one is an error. Sessions: the first session of each subject.
    """
    from hdar_pipeline.bids_io.inputs import BIDSError, check_label, query_cohort

    wanted = [check_label(s) for s in subjects] if subjects else None
    try:
        cohort = query_cohort(bids_dir, participant_labels=wanted, labels_dir=labels_dir, validate=False)
    except BIDSError as exc:
        raise BenchmarkInputError(str(exc)) from None
    out: list[SubjectFiles] = []
    notes: list[str] = []
    seen: set[str] = set()
    for entry in cohort:
        if entry.subject in seen:
            continue
        problem = ("no T1w image" if entry.t1w is None else
                   f"no label map in {labels_dir}" if entry.labels is None else "")
        if problem:
            if wanted:
                raise BenchmarkInputError(f"{bids_dir}: sub-{entry.subject} has {problem}")
            notes.append(f"sub-{entry.subject} skipped: {problem}")
            continue
        seen.add(entry.subject)
        out.append(SubjectFiles(entry.subject, Path(entry.t1w), Path(entry.labels)))
    return out, notes


def make_pairs(subjects: Sequence[SubjectFiles], mode: str = "consecutive", n_pairs: int | None = None) -> list[Pair]:
    """Pairs from subjects: ``consecutive`` (each onto the next, cyclic), ``onto-first``, or ``all``."""
    subs = list(subjects)
    if len(subs) < 2:
        raise BenchmarkInputError(f"need at least two subjects to make pairs (got {len(subs)})")
    if mode == "consecutive":
        pairs = [Pair(subs[i], subs[(i + 1) % len(subs)]) for i in range(len(subs))]  # 2 subjects: both ways
    elif mode == "onto-first":
        pairs = [Pair(s, subs[0]) for s in subs[1:]]
    elif mode == "all":
        pairs = [Pair(m, f) for m in subs for f in subs if m.subject != f.subject]
    else:
        raise BenchmarkInputError(f"unknown pair mode {mode!r}; choose from {', '.join(PAIR_MODES)}")
    if n_pairs is not None:
        if n_pairs < 1:
            raise BenchmarkInputError("--n-pairs must be >= 1")
        pairs = pairs[:n_pairs]
    return pairs


def parse_pair_specs(specs: Sequence[str], lookup: Callable[[str], SubjectFiles]) -> list[Pair]:
    """``["02:01", ...]`` (MOVING:FIXED) -> pairs, with ``lookup(label)`` giving a subject's files."""
    pairs = []
    for spec in specs:
        if spec.count(":") != 1 or not all(spec.split(":")):
            raise BenchmarkInputError(f"--pairs takes MOVING:FIXED (e.g. 02:01), got {spec!r}")
        moving, fixed = spec.split(":")
        m, f = lookup(moving), lookup(fixed)
        if m.subject == f.subject:
            raise BenchmarkInputError(f"pair {spec!r} registers a subject to itself")
        pairs.append(Pair(m, f))
    return list(dict.fromkeys(pairs))


def select_pairs(subjects: Sequence[SubjectFiles], lookup: Callable[[str], SubjectFiles],
                 pair_specs: Sequence[str] | None = None, mode: str = "consecutive",
                 n_pairs: int | None = None) -> list[Pair]:
    """The pairs a run registers: the explicit ``pair_specs``, else pairs made from ``subjects``.

    Parameters
    ----------
    subjects : sequence of SubjectFiles
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
    by_label = {s.subject: s for s in found}
    return select_pairs(found, lambda label: by_label[lpba40_label(label)], pair_specs, mode, n_pairs)


def parse_max_pairs(specs: Iterable[str] | None, defaults: Mapping[str, int] = DEFAULT_MAX_PAIRS,
                    known: Iterable[str] = VARIANT_NAMES) -> dict[str, int | None]:
    """``["syn-quality=1", "demons=all"]`` -> ``{"syn-quality": 1, "demons": None}`` over the defaults."""
    out: dict[str, int | None] = dict(defaults)
    known = set(known)
    for spec in specs or ():
        name, sep, value = spec.partition("=")
        if not sep or name not in known:
            raise BenchmarkInputError(f"--max-pairs-per-variant takes VARIANT=N with VARIANT one of "
                                      f"{', '.join(sorted(known))} (got {spec!r})")
        if value.lower() in ("all", "none", "0"):
            out[name] = None
            continue
        try:
            n = int(value)
        except ValueError:
            raise BenchmarkInputError(f"--max-pairs-per-variant {spec!r}: N must be an integer or 'all'") from None
        if n < 0:
            raise BenchmarkInputError(f"--max-pairs-per-variant {spec!r}: N must be >= 1")
        out[name] = n
    return out


# ------------------------------------------------------------------------------------------ running


@dataclass
class BenchmarkConfig:
    """Everything one benchmark run needs (see :func:`run_benchmark`)."""

    pairs: list[Pair]
    output: Path = Path(DEFAULT_OUTPUT)
    variants: Sequence[str] = VARIANT_NAMES
    max_pairs: Mapping[str, int | None] = field(default_factory=lambda: dict(DEFAULT_MAX_PAIRS))
    affine: bool = False
    threads: int | None = None
    seed: int = 1
    device: str = "auto"
    refine_steps: int = DEFAULT_REFINE_STEPS
    hdar_weights: str | None = None
    voxelmorph_weights: str | None = None
    use_cache: bool = True
    dataset: str = ""
    command: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchmarkResult:
    """What a run wrote: the rows (one per variant x pair), the summary, the markdown, its notes, the paths
    (``pairs``, ``summary``, ``markdown``; see :func:`write_results`)."""

    rows: pd.DataFrame
    summary: pd.DataFrame
    markdown: str
    notes: list[str]
    paths: dict[str, Path]


@dataclass
class _Job:
    variant: Variant
    pair: Pair
    index: int


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (white space folded), cut to ``limit`` characters with ``"..."``.

    Parameters
    ----------
    text : str
        Any message (an exception's, typically).
    limit : int
        The longest result, ``"..."`` included.

    Returns
    -------
    str
    """
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."




def _stale(row: Mapping[str, Any], expect: Mapping[str, Any]) -> str:
    """Why a cached row no longer matches what this run would do ('' when it still does)."""
    changed = []
    if row.get("status") != "ok":
        return "not a successful row"
    old, new = row.get("parameters") or {}, expect["parameters"]
    if old != new:
        changed.append("parameters (" + ", ".join(sorted(k for k in set(old) | set(new)
                                                        if old.get(k) != new.get(k))) + ")")
    for key in ("threads", "seed", "affine_stage", "fixed_image", "moving_image", "fixed_labels", "moving_labels"):
        if row.get(key) != expect[key]:
            changed.append(key)
    return ", ".join(changed)


class PairImageCache:
    """The images of the latest pair (:func:`load_pair_images`), read once while consecutive jobs register it."""

    def __init__(self) -> None:
        self._images: dict[str, Any] = {}

    def get(self, pair: Pair) -> dict[str, Any]:
        """The images of ``pair`` (with its ``key``), read unless they are the latest ones."""
        if self._images.get("key") != pair.key:
            self._images = {"key": pair.key, **load_pair_images(pair)}
        return self._images


def load_pair_images(pair: Pair) -> dict[str, Any]:
    """The four images of a pair, as :func:`evaluate_pair` takes them.

    Parameters
    ----------
    pair : Pair

    Returns
    -------
    dict
        ``fixed``, ``moving`` (intensities) and ``fixed_labels``, ``moving_labels`` (label maps).
    """
    from hdar_pipeline.core.images import load_image

    return {"fixed": load_image(pair.fixed.image), "moving": load_image(pair.moving.image),
            "fixed_labels": load_image(pair.fixed.labels, labels=True),
            "moving_labels": load_image(pair.moving.labels, labels=True)}


def evaluate_pair(images: Mapping[str, Any], method, *, affine: bool, seed: int | None,
                  threads: int | None) -> dict[str, Any]:
    """Register one pair with ``method`` and measure it (the metric part of a row)."""
    from hdar_pipeline.core.images import Grid
    from hdar_pipeline.evaluation.metrics import jacobian_statistics, label_metrics, mean_over_labels
    from hdar_pipeline.methods import register_pair
    from hdar_pipeline.core.runtime import seed_everything

    seed_everything(seed)
    transform, info = register_pair(images["fixed"], images["moving"], method, affine=affine, seed=seed,
                                    threads=threads)
    reference = np.asarray(images["fixed_labels"].dataobj)
    warped = np.asarray(transform.apply(images["moving_labels"], interpolation="nearest").dataobj)
    overlap = mean_over_labels(label_metrics(reference, warped, distances=False))
    before = float("nan")
    if Grid.of(images["moving_labels"]).same_as(Grid.of(images["fixed_labels"]), atol=1e-3):
        before = mean_over_labels(label_metrics(reference, np.asarray(images["moving_labels"].dataobj),
                                                distances=False))["mean_dice"]
    fixed_data = np.asarray(images["fixed"].dataobj)
    jac = jacobian_statistics(transform, mask=fixed_data > fixed_data.min())  # the fixed brain (skull-stripped)
    return {
        "mean_dice": overlap["mean_dice"], "mean_dice_before": before,
        "mean_target_overlap": overlap["mean_target_overlap"], "n_labels": overlap["n_labels"],
        "n_labels_missing": overlap["n_labels_missing"],
        "folded_percent": jac["folded_percent"], "folded_percent_mask": jac["folded_percent_mask"],
        "std_log_jacobian": jac["log_jacobian_std"],
        "jacobian_min": jac["jacobian_min"], "jacobian_max": jac["jacobian_max"],
        "runtime_s": float(info["runtime_s"]), "peak_memory_mb": float(info["peak_memory_mb"]),
        "device": str(info.get("device") or "cpu"),
    }


@dataclass
class RowCache:
    """Result rows cached as one JSON file each (``<directory>/<name>.json``), so that a run resumes.

    Parameters
    ----------
    directory : Path
        The folder of the rows (created).
    reuse : bool
        Whether :meth:`load` returns cached rows (``False``: ``--no-cache``; rows are still saved).
    """

    directory: Path
    reuse: bool = True

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """The file of row ``name``."""
        return self.directory / f"{name}.json"

    def load(self, name: str) -> tuple[Any, str]:
        """The cached row ``name``: ``(row, "")``; ``(None, "")`` when there is none or reuse is off;
        ``(None, "unreadable (<error>)")`` when its file cannot be read or parsed."""
        path = self.path(name)
        if not (self.reuse and path.exists()):
            return None, ""
        try:
            return json.loads(path.read_text()), ""
        except (OSError, ValueError) as exc:
            return None, f"unreadable ({exc})"

    def save(self, name: str, row: Mapping[str, Any]) -> None:
        """Write row ``name`` (indented JSON; values JSON cannot hold as their ``str``)."""
        self.path(name).write_text(json.dumps(row, indent=2, default=str))


@dataclass
class RunStamp:
    """Where and when a run happens: what every row records besides its numbers.

    Attributes
    ----------
    machine : str
        :func:`machine_summary`.
    commit : str
        :func:`git_commit`.
    started : float
        ``time.time()`` at the start.
    load_start : float
        The 1-min load average at the start.
    """

    machine: str
    commit: str
    started: float
    load_start: float

    @classmethod
    def now(cls) -> "RunStamp":
        """The stamp of a run starting now."""
        return cls(machine_summary(), git_commit(), time.time(), os.getloadavg()[0])

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.time() - self.started

    def row_fields(self, **extra: Any) -> dict[str, Any]:
        """A finished row's fields: ``load_avg_1min``, ``commit``, ``machine``, then ``extra``, then
        ``finished_utc`` (ISO 8601, seconds)."""
        return {"load_avg_1min": float(os.getloadavg()[0]), "commit": self.commit, "machine": self.machine,
                **extra, "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def load_note(self, pairs_csv: str) -> str:
        """The note on the load average at the start and now (per row in ``pairs_csv``)."""
        return (f"1-min load average {self.load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
                f"(per row in {pairs_csv}): timings on a loaded machine are only as good as this.")


def run_console(console=None, width: int = 160):
    """``console``, else a new rich console on stdout (``width`` columns when stdout is not a terminal).

    Parameters
    ----------
    console : rich.console.Console, optional
    width : int

    Returns
    -------
    rich.console.Console
    """
    if console is not None:
        return console
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=width)


def check_variants(requested: Iterable[str], known: Iterable[str],
                   error: type[Exception] = BenchmarkInputError) -> None:
    """Raise ``error("unknown variant(s) A, B; choose from X, Y, ...")`` unless every requested variant is known.

    Parameters
    ----------
    requested : iterable of str
        The variants asked for.
    known : iterable of str
        The variants there are, in table order.
    error : exception class
        What to raise (default :class:`BenchmarkInputError`).
    """
    known = list(known)
    unknown = [v for v in requested if v not in known]
    if unknown:
        raise error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")


def progress_bar(console, show: bool, n_pairs: int, n_variants: int, total: int):
    """The rich progress bar of a run (description, bar, n of N, elapsed, eta) and its one task.

    Parameters
    ----------
    console : rich.console.Console
    show : bool
        ``False``: a disabled bar (the per-row lines printed through its console stay).
    n_pairs, n_variants : int
        For the description, ``"<n_pairs> pairs x <n_variants> variants"``.
    total : int
        The number of jobs.

    Returns
    -------
    (rich.progress.Progress, rich.progress.TaskID)
        The bar (use it as a context manager) and its task.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=console, disable=not show, transient=False)
    return progress, progress.add_task(f"{n_pairs} pairs x {n_variants} variants", total=total)


def measured_row(measure: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    """Run one measurement: its fields with ``status="ok"``, ``error=""``; or, when it raises,
    ``status="failed"`` and the exception on one line (one failed pair never stops the others;
    ``KeyboardInterrupt`` does)."""
    try:
        row = dict(measure())
        row.update(status="ok", error="")
        return row
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return {"status": "failed", "error": one_line(f"{type(exc).__name__}: {exc}")}


def rows_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """The rows as a table with at least ``columns`` (missing ones NaN)."""
    import pandas as pd

    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(columns))
    for col in columns:
        if col not in table:
            table[col] = np.nan
    return table


def failure_notes(rows: pd.DataFrame) -> list[str]:
    """One note per failed row: ``"<variant> <moving>-><fixed> failed: <error>"``."""
    return [f"{r.variant} {r.moving}->{r.fixed} failed: {r.error}" for r in rows[rows["status"] != "ok"].itertuples()]


def write_results(output: Path, stem: str, rows: pd.DataFrame, summary: pd.DataFrame,
                  markdown: str) -> dict[str, Path]:
    """Write ``<stem>_pairs.csv``, ``<stem>_summary.csv`` and ``<stem>.md`` into ``output``.

    Returns
    -------
    dict
        Their paths under ``pairs``, ``summary`` and ``markdown``.
    """
    output = Path(output)
    paths = {"pairs": output / f"{stem}_pairs.csv", "summary": output / f"{stem}_summary.csv",
             "markdown": output / f"{stem}.md"}
    rows.to_csv(paths["pairs"], index=False)
    summary.to_csv(paths["summary"], index=False)
    paths["markdown"].write_text(markdown)
    return paths


def plan_jobs(pairs: Sequence[Pair], variants: Sequence[Variant],
              max_pairs: Mapping[str, int | None]) -> list[_Job]:
    """Pair by pair, every variant (until it reaches its pair limit), in variant order."""
    jobs: list[_Job] = []
    for i, pair in enumerate(pairs):
        for v in variants:
            limit = max_pairs.get(v.name)
            if limit is None or i < limit:
                jobs.append(_Job(v, pair, i))
    return jobs


def run_benchmark(config: BenchmarkConfig, *, console=None, show_progress: bool = True) -> BenchmarkResult:
    """Run (or resume) the benchmark and write its CSVs and markdown into ``config.output``.

    Parameters
    ----------
    config : BenchmarkConfig
    console : rich.console.Console, optional
        Where progress and the per-row lines go (a new console on stdout by default).
    show_progress : bool
        Show the rich progress bar (pairs x variants); the per-row lines are printed either way.
    """
    from hdar_pipeline.core.runtime import configure_threads

    console = run_console(console, 140)
    if not config.pairs:
        raise BenchmarkInputError("no pairs to register")
    all_variants = default_variants(config.refine_steps)
    check_variants(config.variants, all_variants)
    selected = [all_variants[v] for v in all_variants if v in set(config.variants)]
    output = Path(config.output)
    cache = RowCache(output / "rows", reuse=config.use_cache)
    _ignore_in_repo(output)
    configure_threads(config.threads)
    notes = list(config.notes)

    # Build each method once; a variant that cannot run here becomes a "not run" row.
    methods: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for v in selected:
        try:
            methods[v.name] = build_method(v, seed=config.seed, threads=config.threads, device=config.device,
                                           hdar_weights=config.hdar_weights,
                                           voxelmorph_weights=config.voxelmorph_weights)
        except VariantUnavailable as exc:
            unavailable[v.name] = str(exc)
    for name, why in unavailable.items():
        notes.append(f"{name} not run: {why}")
    runnable = [v for v in selected if v.name in methods]
    jobs = plan_jobs(config.pairs, runnable, config.max_pairs)
    planned = {v.name: sum(j.variant.name == v.name for j in jobs) for v in selected}
    for v in runnable:
        if planned[v.name] < len(config.pairs):
            notes.append(f"{v.name} ran on {planned[v.name]} of {len(config.pairs)} pairs "
                         f"(--max-pairs-per-variant {v.name}={config.max_pairs.get(v.name)}).")

    stamp = RunStamp.now()
    rows: list[dict[str, Any]] = []
    images = PairImageCache()
    progress, task = progress_bar(console, show_progress, len(config.pairs), len(runnable), len(jobs))
    with progress:
        for n, job in enumerate(jobs, 1):
            v, pair = job.variant, job.pair
            tag = f"[{n}/{len(jobs)}] {v.name:<12} {pair.name}"
            progress.update(task, description=f"{v.name} {pair.name}")
            method = methods[v.name]
            expect = {
                "parameters": _jsonable(method.parameters), "threads": config.threads, "seed": config.seed,
                "affine_stage": bool(config.affine and v.method != "affine"),
                "fixed_image": str(pair.fixed.image), "moving_image": str(pair.moving.image),
                "fixed_labels": str(pair.fixed.labels), "moving_labels": str(pair.moving.labels),
            }
            name = f"{v.name}_{pair.key}"
            cached, why = cache.load(name)
            if cached is not None:
                why = _stale(cached, expect)
                if not why:
                    cached["cached"] = True
                    rows.append(cached)
                    progress.console.print(f"{tag}: cached (Dice {cached['mean_dice']:.3f}, "
                                           f"{cached['runtime_s']:.1f} s)", highlight=False, markup=False)
                    progress.advance(task)
                    continue
            if why:
                progress.console.print(f"{tag}: cached row is stale ({why}), rerunning", highlight=False,
                                       markup=False)
            row: dict[str, Any] = {"variant": v.name, "method": v.method, "preset": v.preset or "",
                                   "moving": pair.moving.subject, "fixed": pair.fixed.subject, **expect}
            row.update(measured_row(lambda: evaluate_pair(images.get(pair), method, affine=config.affine,
                                                          seed=config.seed, threads=config.threads)))
            row.update(stamp.row_fields(cached=False))
            if row["status"] == "ok":
                cache.save(name, row)
                msg = (f"{tag}: Dice {row['mean_dice']:.3f} (before {row['mean_dice_before']:.3f}), "
                       f"target overlap {row['mean_target_overlap']:.3f}, folded {row['folded_percent']:.4f} %, "
                       f"{row['runtime_s']:.1f} s, {row['peak_memory_mb']:.0f} MiB, "
                       f"load {row['load_avg_1min']:.1f} [elapsed {stamp.elapsed():.0f} s]")
            else:
                msg = f"{tag}: FAILED {row['error']}"
            progress.console.print(msg, highlight=False, markup=False)
            rows.append(row)
            progress.advance(task)

    table = rows_frame(rows, PAIR_COLUMNS)
    table["parameters"] = [json.dumps(p, sort_keys=True, default=str) if isinstance(p, dict) else p
                           for p in table["parameters"]]
    order = {name: i for i, name in enumerate(all_variants)}
    table = table.assign(_o=table["variant"].map(order)).sort_values(["_o", "moving", "fixed"], kind="stable")
    table = table.drop(columns="_o")[PAIR_COLUMNS].reset_index(drop=True)
    notes.extend(failure_notes(table))
    summary, summary_notes = summarise(table, selected, planned, unavailable)
    notes.extend(summary_notes)
    notes.append("peak_memory_mb is the resident set of the benchmark process while the method ran (the "
                 "pair's images and earlier variants' freed memory included): an upper bound per method.")
    notes.append(stamp.load_note("benchmark_pairs.csv"))
    notes.append(wall_time_note(table, stamp.elapsed()))
    if "commit" in table and table["commit"].notna().any():
        notes.append("rows measured at commit " + ", ".join(sorted(set(table["commit"].dropna().astype(str))))
                     + " (the Machine section's commit is the one that wrote this report).")
    paired = paired_against(table)
    md = markdown_report(summary, config, notes, n_pairs=len(config.pairs), paired=paired)
    paths = write_results(output, "benchmark", table, summary, md)
    if len(paired):
        paths["paired"] = output / "benchmark_paired.csv"
        paired.to_csv(paths["paired"], index=False)
    paths.update(_tradeoff_figure(summary, output / "benchmark_dice_time"))
    return BenchmarkResult(table, summary, md, notes, paths)


def _tradeoff_figure(summary: pd.DataFrame, out_base: Path) -> dict[str, Path]:
    """``benchmark_dice_time.png``/``.svg``: mean Dice (SD bars) against median seconds per pair, one labelled point
    per variant with its pair count; ``{}`` when no variant has both."""
    import pandas as pd

    from hdar_pipeline.evaluation.figures import plot_tradeoff

    ok = summary[pd.to_numeric(summary["n_pairs"], errors="coerce").fillna(0) > 0]
    try:
        png, svg = plot_tradeoff(ok, out_base, title="Dice against time per pair")
    except ValueError:
        return {}
    return {"figure": png, "figure_svg": svg}


def wall_time_note(rows: pd.DataFrame, elapsed_s: float) -> str:
    """How long this run took, how many rows came from the cache and what the rows' registrations add up to."""
    import pandas as pd

    cached = rows["cached"].fillna(False).astype(bool) if "cached" in rows else pd.Series(False, index=rows.index)
    total = float(pd.to_numeric(rows.get("runtime_s"), errors="coerce").sum()) if len(rows) else 0.0
    return (f"this run took {elapsed_s / 60:.1f} min of wall time for {len(rows)} rows ({int(cached.sum())} from the "
            f"cache); the registrations of all rows add up to {total / 60:.1f} min (cached rows count their "
            "original runtime).")


def variant_rows(rows: pd.DataFrame, variant: str) -> tuple[pd.DataFrame, int]:
    """A variant's successful rows and its number of failed ones.

    Parameters
    ----------
    rows : DataFrame
        Result rows with ``variant`` and ``status`` (``"ok"`` for a success) columns.
    variant : str

    Returns
    -------
    (DataFrame, int)
    """
    ok = rows[rows["status"] == "ok"]
    return ok[ok["variant"] == variant], int(((rows["variant"] == variant) & (rows["status"] != "ok")).sum())


def summary_stat(values: pd.Series, how: str) -> float:
    """One statistic of a column over pairs, NaN where it is undefined.

    Parameters
    ----------
    values : Series
        The values (as floats; missing ones dropped).
    how : str
        A ``pandas.Series`` reduction: ``"mean"``, ``"std"``, ``"median"``, ``"max"``, ...

    Returns
    -------
    float
        NaN for no values, and for ``"std"`` of fewer than two.
    """
    s = values.astype(float).dropna()
    if s.empty or (how == "std" and len(s) < 2):
        return float("nan")
    return float(getattr(s, how)())


def variant_status(variant: str, n_ok: int, n_failed: int, unavailable: Mapping[str, str]) -> str:
    """A variant's status in the summary.

    Returns
    -------
    str
        ``"not run: <why>"`` (``variant`` in ``unavailable``), ``"failed"`` / ``"no pairs"`` (no success),
        ``"ok"`` or ``"ok (<n> failed)"``.
    """
    if variant in unavailable:
        return f"not run: {unavailable[variant]}"
    if not n_ok:
        return "failed" if n_failed else "no pairs"
    return "ok" if not n_failed else f"ok ({n_failed} failed)"


#: The variant every other is compared with pair by pair (:func:`paired_against`): the default HDAR.
PAIRED_REFERENCE = "hdar"
PAIRED_HEADER = ["method", "pairs", "Dice, method", f"Dice, {PAIRED_REFERENCE}", f"{PAIRED_REFERENCE} - method (mean)",
                 "(min to max)", f"{PAIRED_REFERENCE} higher", "Wilcoxon p", f"time {PAIRED_REFERENCE} / method"]


def paired_against(rows: pd.DataFrame, reference: str = PAIRED_REFERENCE) -> pd.DataFrame:
    """Every variant against ``reference`` over the pairs both registered (status ``ok``), pair by pair.

    Parameters
    ----------
    rows : DataFrame
        One row per variant x pair (``benchmark_pairs.csv``): ``variant``, ``moving``, ``fixed``, ``status``,
        ``mean_dice``, ``runtime_s``.
    reference : str
        The variant the others are compared with.

    Returns
    -------
    DataFrame
        One row per other variant with at least one pair in common: ``variant``, ``reference``, ``n_pairs``,
        ``mean_dice`` and ``mean_dice_reference`` (over the common pairs), ``mean_difference``,
        ``min_difference``, ``max_difference`` (``reference - variant`` mean Dice per pair), ``reference_higher``
        (pairs where the reference's Dice is higher), ``wilcoxon_p`` (two-sided signed-rank,
        :func:`hdar_pipeline.evaluation.stats.paired_test`; NaN below two pairs), ``time_ratio`` (median seconds per pair of
        the reference over the variant's, on the common pairs). Empty when ``reference`` has no ``ok`` row.
    """
    import pandas as pd

    from hdar_pipeline.evaluation.stats import paired_test

    columns = ["variant", "reference", "n_pairs", "mean_dice", "mean_dice_reference", "mean_difference",
               "min_difference", "max_difference", "reference_higher", "wilcoxon_p", "time_ratio"]
    ok = rows[rows["status"] == "ok"]
    ref = ok[ok["variant"] == reference].set_index(["moving", "fixed"])
    out = []
    if len(ref):
        for variant in dict.fromkeys(ok["variant"]):
            if variant == reference:
                continue
            other = ok[ok["variant"] == variant].set_index(["moving", "fixed"])
            common = ref.index.intersection(other.index)
            if not len(common):
                continue
            a = ref.loc[common, "mean_dice"].astype(float).to_numpy()
            b = other.loc[common, "mean_dice"].astype(float).to_numpy()
            diff = a - b
            test = paired_test(b, a)
            out.append({"variant": variant, "reference": reference, "n_pairs": len(common),
                        "mean_dice": float(b.mean()), "mean_dice_reference": float(a.mean()),
                        "mean_difference": float(diff.mean()), "min_difference": float(diff.min()),
                        "max_difference": float(diff.max()), "reference_higher": int((diff > 0).sum()),
                        "wilcoxon_p": test["wilcoxon_p"],
                        "time_ratio": float(ref.loc[common, "runtime_s"].astype(float).median()
                                            / other.loc[common, "runtime_s"].astype(float).median())})
    return pd.DataFrame(out, columns=columns)


def paired_table_rows(paired: pd.DataFrame) -> list[list[str]]:
    """:data:`PAIRED_HEADER` cells for each row of :func:`paired_against`."""
    cells = []
    for r in paired.itertuples():
        p = f"{r.wilcoxon_p:.2g}" if math.isfinite(r.wilcoxon_p) else ""
        cells.append([r.variant, str(r.n_pairs), f"{r.mean_dice:.3f}", f"{r.mean_dice_reference:.3f}",
                      f"{r.mean_difference:+.4f}", f"{r.min_difference:+.3f} to {r.max_difference:+.3f}",
                      f"{r.reference_higher} of {r.n_pairs}", p, f"{r.time_ratio:.3g}"])
    return cells


def summarise(rows: pd.DataFrame, variants: Sequence[Variant], planned: Mapping[str, int],
              unavailable: Mapping[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per variant (columns :data:`SUMMARY_COLUMNS`) and the notes it adds."""
    import pandas as pd

    notes: list[str] = []
    ok = rows[rows["status"] == "ok"]
    ref = ok[ok["variant"] == REFERENCE_VARIANT]["runtime_s"].astype(float)
    ref_median = float(ref.median()) if len(ref) else float("nan")
    if not len(ref):
        notes.append("time_ratio_to_syn_quality is NaN: syn-quality did not run in this benchmark "
                     "(add it to --variants to get the ratios).")
    else:
        notes.append(f"time_ratio_to_syn_quality: median seconds per pair over syn-quality's median "
                     f"({ref_median:.1f} s, on {len(ref)} pair{'s' if len(ref) != 1 else ''}).")
    fast = ok[ok["variant"] == "syn-fast"]["runtime_s"].astype(float)
    fast_median = float(fast.median()) if len(fast) else float("nan")
    if len(fast):
        notes.append(f"time_ratio_to_syn_fast: median seconds per pair over syn-fast's median ({fast_median:.1f} s), "
                     "measured in this run.")
    out = []
    for v in variants:
        sub, n_failed = variant_rows(rows, v.name)

        def stat(name: str, how: str) -> float:
            return summary_stat(sub[name], how)

        status = variant_status(v.name, len(sub), n_failed, unavailable)
        runtime = stat("runtime_s", "median")
        out.append({
            "variant": v.name, "method": v.method, "preset": v.preset or "", "status": status,
            "n_pairs": int(len(sub)), "n_pairs_planned": int(planned.get(v.name, 0)), "n_failed": n_failed,
            "dice_mean": stat("mean_dice", "mean"), "dice_sd": stat("mean_dice", "std"),
            "target_overlap_mean": stat("mean_target_overlap", "mean"),
            "target_overlap_sd": stat("mean_target_overlap", "std"),
            "dice_before_mean": stat("mean_dice_before", "mean"),
            "folded_percent_mean": stat("folded_percent", "mean"), "folded_percent_max": stat("folded_percent", "max"),
            "folded_percent_mask_mean": stat("folded_percent_mask", "mean"),
            "folded_percent_mask_max": stat("folded_percent_mask", "max"),
            "std_log_jacobian_mean": stat("std_log_jacobian", "mean"),
            "std_log_jacobian_sd": stat("std_log_jacobian", "std"),
            "runtime_s_median": runtime, "runtime_s_mean": stat("runtime_s", "mean"),
            "peak_memory_mb_max": stat("peak_memory_mb", "max"),
            "time_ratio_to_syn_quality": runtime / ref_median if len(ref) and ref_median > 0 else float("nan"),
            "time_ratio_to_syn_fast": runtime / fast_median if len(fast) and fast_median > 0 else float("nan"),
        })
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS), notes


# ------------------------------------------------------------------------------------------ reports


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_mean_sd(mean: float | None, sd: float, digits: int = 3) -> str:
    """``"mean ± sd"`` with ``digits`` decimals; ``"mean"`` alone when sd is NaN, ``"–"`` without a mean."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if not math.isnan(sd) else f"{mean:.{digits}f}"



TABLE_HEADER = ["method", "pairs", "Dice (mean ± sd)", "target overlap (mean ± sd)", "% folded (brain)",
                "% folded (grid)", "std log\\|J\\|", "s / pair (median)", "time / SyN fast", "time / SyN quality",
                "peak MiB"]


def table_rows(summary: pd.DataFrame, n_pairs: int) -> list[list[str]]:
    """The summary as table cells (strings), one list per variant."""
    out = []
    for r in summary.itertuples():
        if str(r.status).startswith("not run"):  # the short reason here; the whole one is in the notes
            why = str(r.status).split(";")[0]
            out.append([r.variant, "0", why if len(why) <= 90 else why[:87] + "...", "", "", "", "", "", "", "", ""])
            continue
        pairs = str(r.n_pairs) if r.n_pairs == n_pairs else f"{r.n_pairs} of {n_pairs}"
        if r.n_failed:
            pairs += f" ({r.n_failed} failed)"
        ratio, fast_ratio = r.time_ratio_to_syn_quality, r.time_ratio_to_syn_fast
        out.append([r.variant, pairs, format_mean_sd(r.dice_mean, r.dice_sd),
                    format_mean_sd(r.target_overlap_mean, r.target_overlap_sd),
                    _fmt(r.folded_percent_mask_mean, 4), _fmt(r.folded_percent_mean, 4), _fmt(r.std_log_jacobian_mean),
                    _fmt(r.runtime_s_median, 1), "–" if math.isnan(fast_ratio) else f"{fast_ratio:.3g}",
                    "–" if math.isnan(ratio) else f"{ratio:.3g}", _fmt(r.peak_memory_mb_max, 0)])
    return out


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], left_columns: int = 1) -> list[str]:
    """A markdown table's lines: the header, the alignment row (the first ``left_columns`` columns
    left-aligned, the others right-aligned) and one line per row (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] * left_columns + ["---:"] * (len(header) - left_columns)) + " |"]
    for cells in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def report_sections(device: str | None, command: str, notes: Sequence[str]) -> list[str]:
    """The closing sections of a markdown report: ``## Machine`` (:func:`machine_description`),
    ``## Command`` (``command``, or "(Python API)") and ``## Notes`` (when there are notes)."""
    lines = ["", "## Machine", ""] + [f"- {s}" for s in machine_description(device)]
    lines += ["", "## Command", "", "```", command or "(Python API)", "```"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return lines


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]], console=None, title: str = "",
                left_columns: int = 1) -> None:
    """A table on the console (rich): the first ``left_columns`` columns left-justified, the others right.

    Parameters
    ----------
    header : sequence of str
        Column names (markdown-escaped ``\\|`` shown as ``|``).
    rows : iterable of sequences of str
    console : rich.console.Console, optional
        Default: a new console on stdout (160 columns when it is not a terminal).
    title : str
    left_columns : int
    """
    from rich.table import Table

    console = run_console(console)
    table = Table(title=title or None, title_justify="left")
    for i, col in enumerate(header):
        table.add_column(col.replace("\\|", "|"), justify="left" if i < left_columns else "right")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)


def machine_summary() -> str:
    """The machine in one line: ``"<host> (<CPU model>, <N> cores)"`` (each result row records it)."""
    return f"{platform.node()} ({_cpu_model()}, {os.cpu_count()} cores)"


def machine_description(device: str | None = None) -> list[str]:
    """Lines describing the machine and the library versions."""
    from hdar_pipeline.core.provenance import library_versions
    from hdar_pipeline.core.runtime import usable_cpus

    versions = library_versions()
    lines = [f"CPU: {_cpu_model()}, {os.cpu_count()} cores ({usable_cpus()} usable by this process); "
             f"host {platform.node()}, {platform.system()} {platform.release()}"]
    gpu = _gpu_name()
    if gpu:
        lines.append(f"GPU: {gpu}")
    lines.append("versions: " + ", ".join(f"{k} {versions[k]}" for k in
                                          ("hdar-pipeline", "torch", "antspyx", "SimpleITK", "numpy", "python")
                                          if k in versions))
    lines.append(f"commit: {git_commit()}")
    return lines


def markdown_report(summary: pd.DataFrame, config: BenchmarkConfig, notes: Sequence[str], *, n_pairs: int,
                    paired: pd.DataFrame | None = None) -> str:
    names = ", ".join(p.name for p in config.pairs)
    lines = ["# Method comparison", "",
             f"{config.dataset or 'dataset'}: {n_pairs} pair{'s' if n_pairs != 1 else ''} (moving->fixed: {names}); "
             f"{'affine stage before each deformable method' if config.affine else 'no affine stage (images already aligned)'}; "
             f"threads {config.threads if config.threads else 'library default'}, seed {config.seed}, "
             f"device {config.device}. Dice and target overlap: mean over the fixed image's labels per pair, "
             "then mean ± sd over pairs; % folded: voxels with det J <= 0, of the fixed image's brain "
             "(voxels above its background) and of the whole grid; seconds: registration only.", "",
             *markdown_table(TABLE_HEADER, table_rows(summary, n_pairs))]
    if paired is not None and len(paired):
        ref = paired["reference"].iloc[0]
        lines += ["", f"## Against {ref}, pair by pair", "",
                  f"Each method against {ref} on the pairs both registered: mean Dice of each over those pairs, "
                  f"{ref}'s minus the method's per pair (mean, range), the pairs where {ref} is higher, a two-sided "
                  f"Wilcoxon signed-rank test, and {ref}'s median seconds per pair over the method's.", "",
                  *markdown_table(PAIRED_HEADER, paired_table_rows(paired))]
    lines += report_sections(config.device, config.command, notes)
    return "\n".join(lines) + "\n"


def print_summary(summary: pd.DataFrame, n_pairs: int, console=None, title: str = "") -> None:
    """The summary table on the console (rich)."""
    print_table(TABLE_HEADER, table_rows(summary, n_pairs), console, title)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # pragma: no cover
        pass
    return ""


def git_commit() -> str:
    """The repository's short commit hash (``+dirty`` when modified), ``"unknown"`` when git cannot tell."""
    from hdar_pipeline.core.provenance import git_commit as commit

    return commit(short=True)


def _ignore_in_repo(output: Path) -> None:
    """Results written inside this repository stay out of git (LPBA40 terms; machine-specific numbers)."""
    try:
        inside = output.resolve().is_relative_to(REPO) and (REPO / ".git").exists()
    except OSError:  # pragma: no cover
        return
    ignore = output / ".gitignore"
    if inside and not ignore.exists():
        ignore.write_text("# written by hdar benchmark: results are not committed\n*\n")


# ---------------------------------------------------------------------------------------------- CLI


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hdar benchmark`` (also used by ``benchmarks/compare_methods.py``)."""
    from hdar_pipeline.apps.cli import non_negative_int, positive_int

    src = parser.add_argument_group("data (one of)")
    src.add_argument("--bids-dir", type=Path, metavar="DIR", help="BIDS raw dataset (skull-stripped T1w)")
    src.add_argument("--labels-dir", type=Path, metavar="DIR",
                     help="derivatives dataset with each subject's *_dseg.nii.gz in T1w space (with --bids-dir)")
    src.add_argument("--lpba40", type=Path, metavar="DIR",
                     help="LPBA40 folder (SNN/SNN.delineation.skullstripped.nii.gz and "
                          "SNN.delineation.structure.label.nii.gz); the default when no --bids-dir is given "
                          "($HDAR_LPBA40_DIR or ../shared/data/lpba40)")
    pg = parser.add_argument_group("pairs")
    pg.add_argument("--pairs", nargs="+", metavar="MOVING:FIXED",
                    help="explicit pairs of participant labels, e.g. 02:01 03:01 (LPBA40: S22:S21 or 22:21)")
    pg.add_argument("--subjects", "--participant-label", dest="subjects", nargs="+", metavar="LABEL",
                    help="subjects to pair (default: every BIDS participant with labels; LPBA40: S21-S30)")
    pg.add_argument("--pairs-from", choices=PAIR_MODES, default="consecutive",
                    help="how --subjects are paired: consecutive (each onto the next, the last onto the "
                         "first), onto-first, all (every ordered pair); default consecutive")
    pg.add_argument("--n-pairs", type=positive_int, metavar="N", help="keep the first N pairs")
    mg = parser.add_argument_group("methods")
    mg.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=list(VARIANT_NAMES), metavar="VARIANT",
                    help=f"variants to run (default all: {', '.join(VARIANT_NAMES)})")
    mg.add_argument("--max-pairs-per-variant", nargs="+", metavar="VARIANT=N", default=[],
                    help="run VARIANT on its first N pairs only ('all' lifts the limit); default syn-quality=1 "
                         "(about 30 min per LPBA40 pair on 2 cores)")
    mg.add_argument("--refine-steps", type=non_negative_int, default=DEFAULT_REFINE_STEPS, metavar="N",
                    help=f"instance-optimisation steps per refinement level of hdar-refined (default {DEFAULT_REFINE_STEPS})")
    mg.add_argument("--hdar-weights", metavar="NAME|PATH", help="HDAR weights (default: the shipped 'default')")
    mg.add_argument("--voxelmorph-weights", metavar="NAME|PATH",
                    help="VoxelMorph weights (default: the shipped 'voxelmorph')")
    aff = mg.add_mutually_exclusive_group()
    aff.add_argument("--affine", dest="affine", action="store_true", default=None,
                     help="affine stage before each deformable method (default for --bids-dir)")
    aff.add_argument("--no-affine", dest="affine", action="store_false",
                     help="no affine stage: images already aligned on one grid (default for LPBA40)")
    rg = parser.add_argument_group("run")
    rg.add_argument("--threads", type=positive_int, default=os.cpu_count(), metavar="N",
                    help=f"worker threads for ITK and torch (default {os.cpu_count()}, the cores here)")
    rg.add_argument("--seed", type=non_negative_int, default=1, help="seeds numpy, torch and ANTs (default 1)")
    rg.add_argument("--device", default="auto", help="HDAR device: auto, cpu or cuda[:N] (default auto)")
    rg.add_argument("-o", "--output", type=Path, default=Path(DEFAULT_OUTPUT), metavar="DIR",
                    help=f"output folder (default {DEFAULT_OUTPUT}); cached rows in DIR/rows")
    rg.add_argument("--no-cache", action="store_true", help="rerun pairs that already have a cached row")
    rg.add_argument("--no-progress", action="store_true", help="no progress bar (the per-row lines stay)")


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """A :class:`BenchmarkConfig` from parsed :func:`add_benchmark_arguments` options."""
    notes: list[str] = []
    bids_dir, labels_dir = getattr(args, "bids_dir", None), getattr(args, "labels_dir", None)
    lpba40 = getattr(args, "lpba40", None)
    subjects_arg = getattr(args, "subjects", None)
    pair_specs = getattr(args, "pairs", None)
    pairs_from, n_pairs = getattr(args, "pairs_from", "consecutive"), getattr(args, "n_pairs", None)
    if bids_dir is not None and lpba40 is not None:
        raise BenchmarkInputError("give either --bids-dir (with --labels-dir) or --lpba40, not both")
    if bids_dir is not None:
        if labels_dir is None:
            raise BenchmarkInputError("--bids-dir needs --labels-dir (the subjects' label maps)")
        if pair_specs:
            wanted = sorted({s for spec in pair_specs for s in spec.split(":") if s})
            subjects, _ = bids_subjects(bids_dir, labels_dir, wanted)
        else:
            subjects, notes = bids_subjects(bids_dir, labels_dir, subjects_arg)
        from hdar_pipeline.bids_io.inputs import check_label

        by_label = {s.subject: s for s in subjects}
        pairs = select_pairs(subjects, lambda label: by_label[check_label(label)], pair_specs, pairs_from, n_pairs)
        dataset = f"BIDS dataset {bids_dir} (labels {labels_dir})"
        affine_default = True
    else:
        if labels_dir is not None:
            raise BenchmarkInputError("--labels-dir goes with --bids-dir")
        data = Path(lpba40) if lpba40 is not None else default_lpba40_dir()
        pairs = lpba40_pairs(data, subjects_arg, pair_specs, pairs_from, n_pairs)
        dataset = f"LPBA40 ({data})"
        affine_default = False
    affine = getattr(args, "affine", None)
    refine = int(getattr(args, "refine_steps", DEFAULT_REFINE_STEPS))
    if refine < 1:
        raise BenchmarkInputError("--refine-steps must be >= 1")
    return BenchmarkConfig(
        pairs=pairs, output=Path(getattr(args, "output", DEFAULT_OUTPUT)),
        variants=list(getattr(args, "variants", None) or VARIANT_NAMES),
        max_pairs=parse_max_pairs(getattr(args, "max_pairs_per_variant", None)),
        affine=affine_default if affine is None else bool(affine),
        threads=getattr(args, "threads", None), seed=int(getattr(args, "seed", 1)),
        device=getattr(args, "device", "auto") or "auto", refine_steps=refine,
        hdar_weights=getattr(args, "hdar_weights", None),
        voxelmorph_weights=getattr(args, "voxelmorph_weights", None), use_cache=not getattr(args, "no_cache", False),
        dataset=dataset, command=getattr(args, "command_line", None) or command_line(), notes=notes)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed (``hdar benchmark ...`` or ``python benchmarks/compare_methods.py ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    prog = argv[0]
    if prog.endswith(".py"):
        try:
            prog = "python " + str(Path(prog).resolve().relative_to(Path.cwd()))
        except ValueError:
            prog = "python " + prog
    else:
        prog = Path(prog).name
    return " ".join([prog, *(shlex.quote(a) for a in argv[1:])])


def run_benchmark_cli(args: argparse.Namespace) -> int:
    """Run ``hdar benchmark`` from parsed options; print the table. Returns the exit status."""
    console = run_console()
    from hdar_pipeline.core.input_guard import InputError, InputGuard

    try:
        config = config_from_args(args)
        # the pairs' images and labels are never written: -o may not hold them (it belongs to the run)
        files = sorted({str(f) for pair in config.pairs for s in (pair.moving, pair.fixed) for f in (s.image, s.labels)
                        if f is not None})
        bids_dir = getattr(args, "bids_dir", None)
        lpba40 = None if bids_dir is not None else (getattr(args, "lpba40", None) or default_lpba40_dir())
        InputGuard({"--bids-dir/--lpba40": files}, {"--bids-dir": bids_dir, "--lpba40": lpba40,
                                                   "--labels-dir": getattr(args, "labels_dir", None)},
                   hash_files=False).output_folder(config.output, "-o/--output")
        console.print(f"benchmark: {config.dataset}, {len(config.pairs)} pairs, variants "
                      f"{', '.join(config.variants)} -> {config.output}", highlight=False)
        result = run_benchmark(config, console=console, show_progress=not getattr(args, "no_progress", False))
    except (BenchmarkInputError, InputError) as exc:
        from hdar_pipeline.apps.cli import one_line

        print(f"hdar benchmark: error: {one_line(exc)}", file=sys.stderr)
        return 2
    console.print()
    console.print(result.markdown, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {result.paths['pairs']}, {result.paths['summary']}, {result.paths['markdown']}",
                  highlight=False)
    return 0 if (result.rows["status"] == "ok").any() else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hdar benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser)
    return run_benchmark_cli(parser.parse_args(argv))


__all__ = [
    "BenchmarkConfig", "BenchmarkInputError", "BenchmarkResult", "Pair", "PairImageCache", "RowCache", "RunStamp",
    "SubjectFiles", "Variant", "VariantUnavailable", "add_benchmark_arguments", "bids_subjects", "build_method",
    "check_variants", "command_line", "config_from_args", "default_variants", "evaluate_pair", "failure_notes",
    "format_mean_sd", "git_commit", "load_pair_images", "lpba40_pairs", "lpba40_subjects", "machine_description",
    "machine_summary", "make_pairs", "markdown_table", "measured_row", "one_line", "paired_against",
    "paired_table_rows", "parse_max_pairs", "parse_pair_specs", "print_table", "progress_bar", "report_sections",
    "rows_frame", "run_benchmark", "run_benchmark_cli", "run_console", "select_pairs", "summarise", "summary_stat",
    "variant_rows", "variant_status", "write_results",
]
