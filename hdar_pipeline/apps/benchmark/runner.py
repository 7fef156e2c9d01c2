"""The benchmark run: variants of the registration methods, each pair registered and scored once (a JSON row per
(variant, pair), cached), the results written with their tables (:mod:`.tables`). What it measures, its variants,
pairs, caching and outputs are described in :mod:`hdar_pipeline.apps.benchmark`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from hdar_pipeline.apps.benchmark.pairs import REPO, BenchmarkInputError, Pair
from hdar_pipeline.core.provenance import git_commit, machine_summary
from hdar_pipeline.apps.benchmark.tables import (
    _tradeoff_figure,
    failure_notes,
    markdown_report,
    paired_against,
    rows_frame,
    run_console,
    summarise,
    wall_time_note,
)

if TYPE_CHECKING:  # pragma: no cover (pandas is imported where tables are built: `hdar register`
    import pandas as pd  # never needs it, and it costs 0.15 s of start-up)

DEFAULT_OUTPUT = "benchmark-results"
DEFAULT_REFINE_STEPS = 25  # the refined preset's (hdar_pipeline.methods.hdar_method.REFINED_STEPS)


#: Variants limited to fewer pairs unless ``--max-pairs-per-variant`` says otherwise (``fireants=all`` on a GPU: on
#: a 2-core CPU one LPBA40 pair takes FireANTs 10-15 min).
DEFAULT_MAX_PAIRS: dict[str, int] = {"syn-quality": 1, "fireants": 2, "fireants-syn": 2}


PAIR_COLUMNS = [
    "variant", "method", "preset", "moving", "fixed", "status", "error", "cached",
    "mean_dice", "mean_dice_before", "mean_target_overlap", "n_labels", "n_labels_missing",
    "folded_percent", "folded_percent_mask", "std_log_jacobian", "jacobian_min", "jacobian_max",
    "runtime_s", "peak_memory_mb", "device", "load_avg_1min", "threads", "seed", "affine_stage",
    "finished_utc", "commit", "machine", "fixed_image", "moving_image", "parameters",
]


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method, its preset and extra constructor arguments."""

    name: str
    method: str
    preset: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


def default_variants(refine_steps: int = DEFAULT_REFINE_STEPS) -> dict[str, Variant]:
    """The variants in table order (cheap first; SyN quality, the reference, last): every registered method's
    (:attr:`~hdar_pipeline.methods.registry.MethodSpec.variants`), ordered by their ``order``.

    Parameters
    ----------
    refine_steps : int
        Instance-optimisation steps per refinement level of the learned methods' refined variants
        (``--refine-steps``).
    """
    from hdar_pipeline.methods.registry import method_specs

    rows = [(v.order, Variant(v.name, spec.name, v.preset, dict(v.options), v.description))
            for spec in method_specs() for v in spec.benchmark_variants(refine_steps)]
    variants = [variant for _, variant in sorted(rows, key=lambda row: row[0])]  # stable on equal orders
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"two benchmark variants share a name: {', '.join(names)}")
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
    from hdar_pipeline.methods.registry import method_spec

    if not method_spec(variant.method).learned:
        if variant.kwargs:
            raise ValueError(f"variant {variant.name}: only HDAR and VoxelMorph variants take extra arguments")
        try:
            return get_method(variant.method, preset=variant.preset, seed=seed, threads=threads, device=device)
        except ImportError as exc:  # an optional extra (FireANTs) is not installed
            raise VariantUnavailable(str(exc)) from None
    try:
        from hdar_pipeline.hdar.weights import WeightsError
    except ImportError as exc:  # torch is missing
        raise VariantUnavailable(f"HDAR is not available in this installation ({exc})") from None
    weights = {"hdar": hdar_weights, "voxelmorph": voxelmorph_weights}.get(variant.method)
    kwargs = dict(variant.kwargs)
    if weights is not None:
        kwargs["weights"] = weights
    try:
        return get_method(variant.method, preset=variant.preset, seed=seed, threads=threads, device=device,
                          options=kwargs)
    except WeightsError as exc:  # NoWeightsError included
        raise VariantUnavailable(one_line(str(exc))) from None


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

    return {"fixed": load_image(pair.fixed.t1w), "moving": load_image(pair.moving.t1w),
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
        :func:`hdar_pipeline.core.provenance.machine_summary`.
    commit : str
        :func:`hdar_pipeline.core.provenance.git_commit` (short form).
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
        return cls(machine_summary(), git_commit(short=True), time.time(), os.getloadavg()[0])

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
                "fixed_image": str(pair.fixed.t1w), "moving_image": str(pair.moving.t1w),
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
                                   "moving": pair.moving.id, "fixed": pair.fixed.id, **expect}
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


def _ignore_in_repo(output: Path) -> None:
    """Results written inside this repository stay out of git (LPBA40 terms; machine-specific numbers)."""
    try:
        inside = output.resolve().is_relative_to(REPO) and (REPO / ".git").exists()
    except OSError:  # pragma: no cover
        return
    ignore = output / ".gitignore"
    if inside and not ignore.exists():
        ignore.write_text("# written by hdar benchmark: results are not committed\n*\n")
