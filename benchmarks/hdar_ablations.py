"""HDAR ablations on LPBA40 validation pairs: what each part of the method is worth.

Every variant registers the same pairs (default: consecutive pairs among the validation subjects
S21-S30, S21->S22, ..., S30->S21) with no affine stage (LPBA40's delineation space is already aligned),
and is scored the same way: mean Dice and target overlap over the fixed image's labels (LPBA40: 56),
% folded voxels (det J <= 0), std of log|J|, seconds per pair (registration only) and the device.

Variants (groups of the table)
------------------------------
=================  ==========================================================================
``levels-1``       S1 only (``levels=1`` at inference: one network at 1/4, VoxelMorph-like)
``levels-2``       S1 + S2
``levels-3``       S1 + S2 + S3 (fast mode, attention-ranked patches)
``attention``      fast mode, 3 levels, patches ranked by the networks' attention (the paper)
``random``         the same with the K patches drawn at random among the same candidate windows (same
                   NMS and brain-mask rules, ``--random-seeds`` seeds, mean over seeds per pair)
``fast``           S2/S3 on the K hardest patches
``full``           S2/S3 on a sliding window over the brain
``refine-0``       no instance optimisation
``refine-N``       ``--refine-steps`` (20) Adam steps per level of instance optimisation after the network
                   (1/4, then 1/2 with the loss on the full-resolution images, linearised)
``refine-N-level`` the same with the finest level's loss on the half-resolution images
``diffeomorphic``  stationary velocity fields integrated by scaling and squaring
``displacement``   plain displacement fields
=================  ==========================================================================

The levels/selection/mode/refine variants use the weights of ``--weights``. ``levels-1`` there is the
3-level network stopped after S1; a separately trained 1-level network (``hdar train --levels 1``) is the
stricter VoxelMorph-like control: give it with ``--weights-1level FILE``. Diffeomorphic vs displacement
compares two trained models: ``--weights`` and ``--weights-other`` (trained with the other setting,
``hdar train --diffeomorphic`` or without it); with only one, the other row reads "not run".

Rows with identical settings (``levels-3``, ``attention``, ``fast``, ``refine-0`` and the
diffeomorphic/displacement row of ``--weights``) are one registration, reported under each name.

Caching
-------
Each (variant, pair[, seed]) row is one JSON file in ``OUT/rows/``, named by the variant, the pair, the
weights' SHA-256 and a hash of every setting (the inference settings: levels, mode, selection, refine and the
rest of :class:`~hdar_pipeline.hdar.inference.InferenceSettings`; seed, threads, device, input files): an
interrupted run resumes, a run with other weights or settings never reuses a row.
``--no-cache`` reruns everything.

Outputs
-------
``OUT/ablations_pairs.csv`` (one row per variant x pair x seed), ``OUT/ablations_summary.csv`` (one row per
variant: mean and sd over pairs), ``OUT/ablations.md`` (the table "mean ± sd", pairs, the machine, the
command, the notes; printed at the end).

    python benchmarks/hdar_ablations.py --weights runs/lpba40/default.pt --threads 2
    python benchmarks/hdar_ablations.py --weights A.pt --weights-other B.pt --weights-1level S1.pt --device cuda
    python benchmarks/hdar_ablations.py --weights A.pt --variants levels-1 levels-3 --n-pairs 3

Exit status: 0 when some row ran, 1 when none did, 2 for unusable input (no weights, no data).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import pandas as pd

from hdar_pipeline.apps.benchmark.pairs import BenchmarkInputError, default_lpba40_dir, lpba40_pairs
from hdar_pipeline.apps.benchmark.runner import (BenchmarkResult, PairImageCache, RowCache, RunStamp,

      check_variants, evaluate_pair, measured_row, progress_bar, write_results)

from hdar_pipeline.apps.benchmark.benchmark_cli import command_line
from hdar_pipeline.apps.benchmark.tables import (failure_notes, format_mean_sd, markdown_table, print_table,

      report_sections, rows_frame, run_console, summary_stat, variant_rows, variant_status)
from hdar_pipeline.hdar.inference import InferenceSettings, register_with_model, unit_range
from hdar_pipeline.methods.base import MethodBase

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "ablations"
DEFAULT_REFINE_STEPS = 20
DEFAULT_RANDOM_SEEDS = 3
VARIANT_NAMES = ("levels-1", "levels-2", "levels-3", "attention", "random", "fast", "full", "refine-0", "refine-N",
                 "refine-N-level", "diffeomorphic", "displacement")
#: How to get the model a parameterisation row needs.
TRAIN_HINT = {True: "hdar train --diffeomorphic", False: "hdar train without --diffeomorphic, the default"}

PAIR_COLUMNS = [
    "variant", "group", "weights_role", "moving", "fixed", "selection_seed", "status", "error", "cached",
    "shared_with", "mean_dice", "mean_dice_before", "mean_target_overlap", "n_labels", "n_labels_missing",
    "folded_percent", "std_log_jacobian", "jacobian_min", "jacobian_max", "runtime_s", "peak_memory_mb",
    "device", "levels", "mode", "selection", "refine", "refine_similarity", "diffeomorphic", "weights",
    "weights_sha256", "threads", "seed", "load_avg_1min", "finished_utc", "commit", "machine", "key", "fixed_image", "moving_image",
]
SUMMARY_COLUMNS = [
    "variant", "group", "description", "status", "weights", "n_pairs", "n_pairs_planned", "n_seeds", "n_failed",
    "dice_mean", "dice_sd", "dice_seed_sd", "target_overlap_mean", "target_overlap_sd",
    "folded_percent_mean", "folded_percent_sd", "std_log_jacobian_mean", "std_log_jacobian_sd",
    "runtime_s_mean", "runtime_s_sd", "device",
]


class AblationInputError(ValueError):
    """The weights, the data or the options cannot be used (exit status 2)."""


# ----------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Ablation:
    """One table row: which weights, and how the cascade runs at inference.

    ``weights`` is a role: ``main`` (``--weights``), ``1level`` (``--weights-1level`` when given, else
    main), ``diffeomorphic`` / ``displacement`` (whichever of ``--weights`` / ``--weights-other`` was
    trained that way).
    """

    name: str
    group: str
    description: str
    weights: str = "main"
    levels: int = 3
    mode: str = "fast"
    selection: str = "attention"
    refine: int = 0
    refine_similarity: str = "full"


def ablations(refine_steps: int = DEFAULT_REFINE_STEPS) -> dict[str, Ablation]:
    """Every variant, keyed by its CLI name (``refine-N`` is shown as ``refine-<steps>``)."""
    n = int(refine_steps)
    rows = [
        Ablation("levels-1", "levels", "S1 only (1 network at 1/4 resolution, VoxelMorph-like)", "1level", levels=1),
        Ablation("levels-2", "levels", "S1 + S2 (fast)", levels=2),
        Ablation("levels-3", "levels", "S1 + S2 + S3 (fast)", levels=3),
        Ablation("attention", "selection", "fast, patches ranked by attention (the paper)"),
        Ablation("random", "selection", "fast, the K patches drawn at random among the same candidates",
                 selection="random"),
        Ablation("fast", "mode", "S2/S3 on the K hardest patches"),
        Ablation("full", "mode", "S2/S3 on a sliding window over the brain", mode="full"),
        Ablation("refine-0", "refinement", "no instance optimisation"),
        Ablation(f"refine-{n}", "refinement", f"fast + {n} instance-optimisation steps per level (finest level's "
                 "loss on the full-resolution images)", refine=n),
        Ablation(f"refine-{n}-level", "refinement", f"fast + {n} instance-optimisation steps per level (finest "
                 "level's loss on the half-resolution images)", refine=n, refine_similarity="level"),
        Ablation("diffeomorphic", "parameterisation", "stationary velocity, scaling and squaring", "diffeomorphic"),
        Ablation("displacement", "parameterisation", "displacement field", "displacement"),
    ]
    return {(("refine-N" + ("-level" if a.refine_similarity == "level" else "")) if a.refine else a.name): a
            for a in rows}


# --------------------------------------------------------------------------------------- the method


@dataclass
class Settings:
    """How one variant runs (also the cache key, with the weights' SHA-256 and the input files): the inference
    settings (``levels``, ``mode``, ``selection``, ``refine`` and ``refine_similarity`` from the variant, the
    others :class:`~hdar_pipeline.hdar.inference.InferenceSettings`' defaults, which are HDAR's) and the run's
    selection seed, seed, threads and device."""

    weights: str
    weights_sha256: str
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    selection_seed: int | None = None
    device: str = "auto"
    seed: int | None = None
    threads: int | None = None


@dataclass
class AblationHDAR(MethodBase):
    """HDAR with an already loaded model (``hdar_pipeline.hdar.weights.LoadedWeights``, on its device) run
    as ``settings`` says: :func:`~hdar_pipeline.hdar.inference.register_with_model` with ``settings.inference``
    (``levels``, ``mode`` and ``selection`` at inference after the affine pre-alignment, then ``refine`` steps
    per level of :func:`~hdar_pipeline.hdar.instance.refine_flow`), the selection generator reseeded with
    ``selection_seed`` before each pair."""

    name: ClassVar[str] = "hdar"
    settings: Settings = None  # type: ignore[assignment]
    loaded: Any = field(default=None, repr=False, compare=False)
    device_used: str | None = field(default=None, init=False, compare=False)

    @property
    def parameters(self) -> dict[str, Any]:
        return asdict(self.settings)

    def _register(self, fixed, moving, fixed_mask):
        from hdar_pipeline.core.runtime import configure_threads, seed_everything

        cfg = self.settings
        configure_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.loaded.model.seed_selection(cfg.selection_seed if cfg.selection_seed is not None else cfg.seed)
        transform, self.device_used = register_with_model(self.loaded, fixed, moving, fixed_mask,
                                                           settings=cfg.inference)
        return transform


def _measure(images: Mapping[str, Any], loaded, settings: Settings, warmed: set[str], config) -> dict[str, Any]:
    """One row's numbers: the model warmed up once (untimed), then the pair registered and scored."""
    if loaded.sha256 not in warmed:
        _warm_up(loaded, images)
        warmed.add(loaded.sha256)
    method = AblationHDAR(settings=settings, loaded=loaded)
    return evaluate_pair(images, method, affine=False, seed=config.seed, threads=config.threads)


def _warm_up(loaded, images: Mapping[str, Any]) -> None:
    """One untimed forward pass per model (first-call costs: allocator, cuDNN, lazy imports)."""
    import torch

    model = loaded.model
    dev = next(model.parameters()).device
    f = torch.as_tensor(unit_range(images["fixed"]), device=dev)[None, None]
    with torch.no_grad():
        model(f, f, mode="fast")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ----------------------------------------------------------------------------------------- the run


@dataclass
class AblationConfig:
    """Everything one ablation run needs (see :func:`run_ablations`)."""

    pairs: list  # of hdar_pipeline.apps.benchmark.runner.Pair
    weights: str = "default"
    weights_other: str | None = None
    weights_1level: str | None = None
    output: Path = DEFAULT_OUTPUT
    variants: Sequence[str] = VARIANT_NAMES
    refine_steps: int = DEFAULT_REFINE_STEPS
    random_seeds: int = DEFAULT_RANDOM_SEEDS
    threads: int | None = None
    seed: int = 1
    device: str = "auto"
    use_cache: bool = True
    dataset: str = ""
    command: str = ""


@dataclass
class AblationResult(BenchmarkResult):
    """What :func:`run_ablations` wrote (the fields of :class:`~hdar_pipeline.apps.benchmark.runner.BenchmarkResult`)."""


def _load(weights: str, device) -> Any:
    from hdar_pipeline.hdar.weights import WeightsError, load_weights

    try:
        return load_weights(weights, device=device)
    except WeightsError as exc:  # NoWeightsError included: the library's message
        raise AblationInputError(" ".join(str(exc).split())) from None


def _key(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def resolve_models(config: AblationConfig, device) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Load the weights and assign them to roles: ``({role: LoadedWeights}, {variant: why not run}, notes)``."""
    notes: list[str] = []
    wanted = set(config.variants)
    unavailable: dict[str, str] = {}
    main = _load(config.weights, device)
    roles: dict[str, Any] = {"main": main}
    if config.weights_1level:
        one = _load(config.weights_1level, device)
        roles["1level"] = one
        notes.append(f"levels-1 uses the separately trained network {one.path.name} (sha256 {one.sha256[:12]}, "
                     f"{one.model.config.levels} level(s)), run with levels=1: the VoxelMorph-like control.")
    else:
        roles["1level"] = main
        if wanted & {"levels-1", "levels-2"}:
            notes.append("levels-1 and levels-2 are the same network as levels-3 stopped after S1 / S2 (levels=1/2 at "
                         "inference); a separately trained 1-level network (hdar train --levels 1, given with "
                         "--weights-1level) is the stricter VoxelMorph-like control.")
    main_diffeo = bool(main.model.config.diffeomorphic)
    roles["diffeomorphic" if main_diffeo else "displacement"] = main
    missing = "displacement" if main_diffeo else "diffeomorphic"
    if config.weights_other:
        other = _load(config.weights_other, device)
        if bool(other.model.config.diffeomorphic) == main_diffeo:
            unavailable[missing] = (f"--weights-other ({other.path.name}) was trained with the same setting as "
                                    f"--weights (diffeomorphic={main_diffeo}); needs a model trained with the "
                                    f"other setting ({TRAIN_HINT[not main_diffeo]})")
        else:
            roles[missing] = other
            notes.append(f"diffeomorphic vs displacement compares two trained models: {main.path.name} "
                         f"(diffeomorphic={main_diffeo}) and {other.path.name} "
                         f"(diffeomorphic={not main_diffeo}); their training runs may differ in more than that "
                         f"(see their model cards).")
    else:
        unavailable[missing] = (f"needs a model trained with the other setting ({TRAIN_HINT[not main_diffeo]}), "
                                f"given as --weights-other; --weights is {'diffeomorphic' if main_diffeo else 'a displacement model'}")
    return roles, unavailable, notes


def run_ablations(config: AblationConfig, *, console=None, show_progress: bool = True) -> AblationResult:
    """Run (or resume) the ablations; write the CSVs and the markdown into ``config.output``.

    Raises
    ------
    AblationInputError
        No pairs, unknown variants, or weights that cannot be used (the library's message).
    """
    from hdar_pipeline.core.runtime import configure_threads, resolve_device

    console = run_console(console, 150)
    if not config.pairs:
        raise AblationInputError("no pairs to register")
    if config.refine_steps < 1:
        raise AblationInputError("--refine-steps must be >= 1")
    if config.random_seeds < 1:
        raise AblationInputError("--random-seeds must be >= 1")
    table = ablations(config.refine_steps)
    check_variants(config.variants, table, AblationInputError)
    wanted = set(config.variants)
    selected = [(cli, a) for cli, a in table.items() if cli in wanted]
    configure_threads(config.threads)
    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        raise AblationInputError(str(exc)) from None
    roles, missing, notes = resolve_models(config, device)
    unavailable = {a.name: missing[a.name] for _, a in selected if a.name in missing}
    for _, a in selected:
        model = roles.get(a.weights)
        if a.name in unavailable or model is None:
            continue
        n_levels = model.model.config.levels
        if a.group == "levels" and a.levels > n_levels:
            unavailable[a.name] = (f"{model.path.name} has {n_levels} level(s) (trained with --levels {n_levels}); "
                                   f"{a.name} needs {a.levels}")
        elif a.levels > n_levels:
            notes.append(f"{a.name} runs the {n_levels} level(s) of {model.path.name} (not {a.levels}).")
    for name, why in unavailable.items():
        notes.append(f"{name} not run: {why}")

    output = Path(config.output)
    cache = RowCache(output / "rows", reuse=config.use_cache)
    runnable = [a for _, a in selected if a.name not in unavailable]
    seeds = [config.seed + i for i in range(config.random_seeds)]
    jobs = [(i, pair, a, s) for i, pair in enumerate(config.pairs) for a in runnable
            for s in (seeds if a.selection == "random" else [None])]
    stamp = RunStamp.now()
    done: dict[str, dict[str, Any]] = {}  # run key -> row, to share identical registrations
    warmed: set[str] = set()
    rows: list[dict[str, Any]] = []
    images = PairImageCache()
    progress, task = progress_bar(console, show_progress, len(config.pairs), len(runnable), len(jobs))
    with progress:
        for n, (_, pair, a, sel_seed) in enumerate(jobs, 1):
            loaded = roles[a.weights]
            label = a.name if sel_seed is None else f"{a.name}-seed{sel_seed}"
            tag = f"[{n}/{len(jobs)}] {label:<16} {pair.name}"
            progress.update(task, description=f"{label} {pair.name}")
            levels = min(a.levels, loaded.model.config.levels)
            inference = InferenceSettings(levels=levels, mode=a.mode, selection=a.selection, refine=a.refine,
                                          refine_similarity=a.refine_similarity)
            settings = Settings(weights=str(loaded.path), weights_sha256=loaded.sha256, inference=inference,
                                selection_seed=sel_seed, device=str(device), seed=config.seed, threads=config.threads)
            spec = {**asdict(settings), "weights": loaded.sha256,
                    "fixed_image": str(pair.fixed.t1w), "moving_image": str(pair.moving.t1w),
                    "fixed_labels": str(pair.fixed.labels), "moving_labels": str(pair.moving.labels)}
            key = _key(spec)
            name = f"{label}_{pair.key}_{loaded.sha256[:12]}_{key[:12]}"
            base = {"variant": a.name, "group": a.group, "weights_role": a.weights, "moving": pair.moving.id,
                    "fixed": pair.fixed.id, "selection_seed": sel_seed, "levels": levels, "mode": a.mode,
                    "selection": a.selection, "refine": a.refine, "refine_similarity": a.refine_similarity,
                    "diffeomorphic": bool(loaded.model.config.diffeomorphic),
                    "weights": str(loaded.path), "weights_sha256": loaded.sha256, "threads": config.threads,
                    "seed": config.seed, "key": key, "fixed_image": str(pair.fixed.t1w),
                    "moving_image": str(pair.moving.t1w)}
            row: dict[str, Any] | None = None
            cached, why = cache.load(name)
            if cached is not None and cached.get("status") == "ok" and cached.get("key") == key:
                row = {**cached, "cached": True}
            elif why:
                progress.console.print(f"{tag}: cached row {why}, rerunning", markup=False, highlight=False)
            if row is not None:
                msg = f"{tag}: cached (Dice {row['mean_dice']:.3f}, {row['runtime_s']:.2f} s)"
            elif key in done:
                src = done[key]
                row = {**src, **base, "cached": False, "shared_with": src.get("shared_with") or src["variant"]}
                msg = f"{tag}: same settings as {row['shared_with']} (Dice {row['mean_dice']:.3f})"
            else:
                row = dict(base)
                row.update(measured_row(lambda: _measure(images.get(pair), loaded, settings, warmed, config)))
                row.update(cached=False, shared_with="")
                row.update(stamp.row_fields())
                if row["status"] == "ok":
                    msg = (f"{tag}: Dice {row['mean_dice']:.3f} (before {row['mean_dice_before']:.3f}), target "
                           f"overlap {row['mean_target_overlap']:.3f}, folded {row['folded_percent']:.4f} %, "
                           f"{row['runtime_s']:.2f} s on {row['device']} [elapsed {stamp.elapsed():.0f} s]")
                else:
                    msg = f"{tag}: FAILED {row['error']}"
            if row["status"] == "ok":
                done.setdefault(key, row)
                if not row.get("cached"):
                    cache.save(name, row)
            progress.console.print(msg, markup=False, highlight=False)
            rows.append(row)
            progress.advance(task)

    pairs_df = rows_frame(rows, PAIR_COLUMNS)
    order = {a.name: i for i, a in enumerate(table.values())}
    pairs_df = pairs_df.assign(_o=pairs_df["variant"].map(order)).sort_values(
        ["_o", "moving", "fixed", "selection_seed"], kind="stable").drop(columns="_o")[PAIR_COLUMNS]
    pairs_df = pairs_df.reset_index(drop=True)
    notes.extend(failure_notes(pairs_df))
    planned = {a.name: len(config.pairs) if a.name not in unavailable else 0 for _, a in selected}
    summary = summarise(pairs_df, [a for _, a in selected], planned, unavailable, roles)
    if any(a.selection == "random" for a in runnable):
        notes.append(f"random: {len(seeds)} selection seed(s) ({', '.join(map(str, seeds))}) per pair, averaged per "
                     "pair before the mean ± sd over pairs; 'seed sd' in ablations_summary.csv (dice_seed_sd) is "
                     "the mean over pairs of the sd over seeds.")
    shared = sorted({r for r in pairs_df["shared_with"].dropna() if isinstance(r, str) and r})
    if shared:
        same = sorted({v for v, s in zip(pairs_df["variant"], pairs_df["shared_with"]) if isinstance(s, str) and s})
        notes.append(f"{', '.join(same)}: the same settings as {', '.join(shared)} (one registration per pair, "
                     "reported under each name; timings are that run's).")
    notes.append("Each model runs one untimed warm-up pass before its first timed pair; seconds are the network "
                 "(and refinement) on the aligned pair, loading and metrics excluded.")
    notes.append(stamp.load_note("ablations_pairs.csv"))
    md = markdown_report(summary, config, notes, roles, device)
    paths = write_results(output, "ablations", pairs_df, summary, md)
    return AblationResult(pairs_df, summary, md, notes, paths)


def summarise(rows: pd.DataFrame, variants: Sequence[Ablation], planned: Mapping[str, int],
              unavailable: Mapping[str, str], roles: Mapping[str, Any]) -> pd.DataFrame:
    """One row per variant: per pair the mean over selection seeds, then mean and sd over pairs."""
    metrics = ["mean_dice", "mean_target_overlap", "folded_percent", "std_log_jacobian", "runtime_s"]
    out = []
    for a in variants:
        sub, n_failed = variant_rows(rows, a.name)
        per_pair = sub.groupby(["moving", "fixed"], sort=False)[metrics].agg(lambda s: s.astype(float).mean()) \
            if len(sub) else pd.DataFrame(columns=metrics)
        seed_sd = float("nan")
        if a.selection == "random" and len(sub):
            sds = sub.groupby(["moving", "fixed"])["mean_dice"].agg(lambda s: s.astype(float).std())
            seed_sd = float(sds.mean()) if sds.notna().any() else float("nan")

        def stat(col: str, how: str) -> float:
            return summary_stat(per_pair[col], how)

        status = variant_status(a.name, len(sub), n_failed, unavailable)
        loaded = roles.get(a.weights)
        out.append({
            "variant": a.name, "group": a.group, "description": a.description, "status": status,
            "weights": "" if loaded is None or a.name in unavailable else f"{loaded.path.name} ({loaded.sha256[:12]})",
            "n_pairs": int(len(per_pair)), "n_pairs_planned": int(planned.get(a.name, 0)),
            "n_seeds": int(sub["selection_seed"].nunique()) if a.selection == "random" and len(sub) else (1 if len(sub) else 0),
            "n_failed": n_failed,
            "dice_mean": stat("mean_dice", "mean"), "dice_sd": stat("mean_dice", "std"), "dice_seed_sd": seed_sd,
            "target_overlap_mean": stat("mean_target_overlap", "mean"),
            "target_overlap_sd": stat("mean_target_overlap", "std"),
            "folded_percent_mean": stat("folded_percent", "mean"), "folded_percent_sd": stat("folded_percent", "std"),
            "std_log_jacobian_mean": stat("std_log_jacobian", "mean"),
            "std_log_jacobian_sd": stat("std_log_jacobian", "std"),
            "runtime_s_mean": stat("runtime_s", "mean"), "runtime_s_sd": stat("runtime_s", "std"),
            "device": ", ".join(sorted(set(map(str, sub["device"].dropna())))) if len(sub) else "",
        })
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


# ------------------------------------------------------------------------------------------ reports


TABLE_HEADER = ["group", "variant", "pairs", "Dice (mean ± sd)", "target overlap (mean ± sd)", "% folded",
                "std log\\|J\\|", "s / pair (mean ± sd)", "device"]


def table_rows(summary: pd.DataFrame, n_pairs: int) -> list[list[str]]:
    out = []
    for r in summary.itertuples():
        if str(r.status).startswith("not run"):
            why = str(r.status)
            out.append([r.group, r.variant, "0", why if len(why) <= 110 else why[:107] + "...", "", "", "", "", ""])
            continue
        pairs = str(r.n_pairs) if r.n_pairs == n_pairs else f"{r.n_pairs} of {n_pairs}"
        if r.n_seeds > 1:
            pairs += f" x {r.n_seeds} seeds"
        if r.n_failed:
            pairs += f" ({r.n_failed} failed)"
        out.append([r.group, r.variant, pairs, format_mean_sd(r.dice_mean, r.dice_sd),
                    format_mean_sd(r.target_overlap_mean, r.target_overlap_sd),
                    format_mean_sd(r.folded_percent_mean, r.folded_percent_sd, 4),
                    format_mean_sd(r.std_log_jacobian_mean, r.std_log_jacobian_sd),
                    format_mean_sd(r.runtime_s_mean, r.runtime_s_sd, 2), str(r.device or "–")])
    return out


def markdown_report(summary: pd.DataFrame, config: AblationConfig, notes: Sequence[str], roles: Mapping[str, Any],
                    device) -> str:
    n = len(config.pairs)
    main = roles["main"]
    cfg = main.model.config
    lines = ["# HDAR ablations", "",
             f"{config.dataset or 'dataset'}: {n} pair{'s' if n != 1 else ''} (moving->fixed: "
             f"{', '.join(p.name for p in config.pairs)}); no affine stage (images already aligned); weights "
             f"{main.path.name} (sha256 {main.sha256[:12]}, {cfg.levels} levels, width {cfg.width}, "
             f"{'diffeomorphic' if cfg.diffeomorphic else 'displacement'}, K={cfg.top_k}); threads "
             f"{config.threads or 'library default'}, seed {config.seed}, device {device}. Dice and target overlap: "
             "mean over the fixed image's labels per pair, then mean ± sd over pairs; % folded: voxels with "
             "det J <= 0; seconds: registration only.", "",
             *markdown_table(TABLE_HEADER, table_rows(summary, n), left_columns=2)]
    lines += report_sections(str(device), config.command, notes)
    return "\n".join(lines) + "\n"


def print_summary(summary: pd.DataFrame, n_pairs: int, console) -> None:
    print_table(TABLE_HEADER, table_rows(summary, n_pairs), console, "HDAR ablations", left_columns=2)


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdar_ablations.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lpba40", type=Path, metavar="DIR",
                   help="LPBA40 folder (SNN/SNN.delineation.skullstripped.nii.gz, SNN.delineation.structure.label."
                        "nii.gz); default $HDAR_LPBA40_DIR or ../shared/data/lpba40")
    p.add_argument("--subjects", nargs="+", metavar="SNN", help="subjects to pair (default the validation S21-S30)")
    p.add_argument("--pairs", nargs="+", metavar="MOVING:FIXED", help="explicit pairs, e.g. S22:S21 23:22")
    p.add_argument("--n-pairs", type=int, metavar="N", help="keep the first N pairs")
    p.add_argument("--weights", default="default", metavar="NAME|PATH",
                   help="HDAR weights for every variant (default: the shipped 'default')")
    p.add_argument("--weights-other", metavar="PATH",
                   help="a model trained with the other parameterisation (hdar train --diffeomorphic, or without "
                        "it) for the diffeomorphic vs displacement rows")
    p.add_argument("--weights-1level", metavar="PATH",
                   help="a separately trained 1-level network (hdar train --levels 1) for levels-1")
    p.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=list(VARIANT_NAMES), metavar="VARIANT",
                   help=f"variants to run (default all: {', '.join(VARIANT_NAMES)})")
    p.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE_STEPS, metavar="N",
                   help=f"instance-optimisation steps per refinement level of refine-N (default {DEFAULT_REFINE_STEPS})")
    p.add_argument("--random-seeds", type=int, default=DEFAULT_RANDOM_SEEDS, metavar="N",
                   help=f"selection seeds of the random variant, SEED..SEED+N-1 (default {DEFAULT_RANDOM_SEEDS})")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), metavar="N",
                   help=f"torch / ITK threads (default {os.cpu_count()}, the cores here)")
    p.add_argument("--seed", type=int, default=1, help="seeds torch, numpy and the random selection (default 1)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, metavar="DIR",
                   help="output folder (default benchmarks/results/ablations); cached rows in DIR/rows")
    p.add_argument("--no-cache", action="store_true", help="rerun rows that are already cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-row lines stay)")
    return p


def config_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> AblationConfig:
    from hdar_pipeline.hdar.weights import NoWeightsError, WeightsError, resolve_weights

    for opt, value in (("--weights", args.weights), ("--weights-other", args.weights_other),
                       ("--weights-1level", args.weights_1level)):
        if value is not None:
            try:
                resolve_weights(value)
            except WeightsError as exc:  # the library's message (NoWeightsError: how to get weights)
                hint = " (give this script the exported .pt with --weights PATH)" if opt == "--weights" and \
                    isinstance(exc, NoWeightsError) and value == "default" else ""
                raise AblationInputError(f"{opt}: {' '.join(str(exc).split())}{hint}") from None
    data = args.lpba40 if args.lpba40 is not None else default_lpba40_dir()
    try:
        pairs = lpba40_pairs(data, args.subjects, args.pairs, "consecutive", args.n_pairs)
    except BenchmarkInputError as exc:
        raise AblationInputError(str(exc)) from None
    return AblationConfig(pairs=pairs, weights=args.weights, weights_other=args.weights_other,
                          weights_1level=args.weights_1level, output=args.output, variants=list(args.variants),
                          refine_steps=args.refine_steps, random_seeds=args.random_seeds, threads=args.threads,
                          seed=args.seed, device=args.device, use_cache=not args.no_cache,
                          dataset=f"LPBA40 ({data})",
                          command=command_line(None if argv is None else [str(Path(__file__)), *argv]))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = run_console()
    try:
        config = config_from_args(args, argv)
        console.print(f"HDAR ablations: {config.dataset}, {len(config.pairs)} pairs, variants "
                      f"{', '.join(config.variants)} -> {config.output}", highlight=False, markup=False)
        result = run_ablations(config, console=console, show_progress=not args.no_progress)
    except AblationInputError as exc:
        print(f"hdar_ablations.py: error: {exc}", file=sys.stderr)
        return 2
    console.print()
    print_summary(result.summary, len(config.pairs), console)
    console.print(result.markdown, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {result.paths['pairs']}, {result.paths['summary']}, {result.paths['markdown']}",
                  highlight=False, markup=False)
    return 0 if (result.rows["status"] == "ok").any() else 1


if __name__ == "__main__":
    sys.exit(main())
