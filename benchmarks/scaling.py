"""Scaling: registration time and peak memory against volume size, cohort wall time against cohort size.

Part 1, volume size. For each size N (default 64 96 128 160 192, cubic N^3 grids) the embedded MNI
ICBM152 2009a template (:func:`hdar_pipeline.apps.demo_dataset.demo_atlas`) is resampled onto an N^3 grid covering the
brain (isotropic voxels: the brain's largest extent / N, the other axes padded), and a synthetic subject
is made from it (:func:`hdar_pipeline.core.synthetic.make_subject`, seed ``--seed``). The subject (moving) is
registered onto the template (fixed) with each variant (``--variants``; names as in ``hdar benchmark``:
affine, demons, syn-fast, syn-quality, hdar-fast, hdar-full, hdar-refined). The deformable methods run
without an affine stage (the pair lies on one grid; ``--affine-stage`` adds it), so each row times the
method alone and the ``affine`` row times the affine stage. Each (size, variant) runs in a fresh Python
process (``scaling.py --one SIZE VARIANT --json FILE``) so that its peak memory is its own, not the
high-water mark of the runs before it. Per row: ``runtime_s`` (registration only, median of
``--repeats`` processes), ``peak_memory_mb`` (resident set of that process sampled every 20 ms during
the registration, by :func:`hdar_pipeline.core.runtime.measure`; it includes the interpreter, the libraries
and the two images), ``rss_before_mb`` (resident set just before the registration, with SimpleITK and
antspyx, and torch for HDAR, already loaded), ``peak_added_mb`` (peak - before: what the registration
itself allocated) and ``max_rss_mb`` (the process's whole-life high-water mark, ``VmHWM``). HDAR
variants run only where trained weights exist; otherwise their rows say "not run: <reason>".

Part 2, cohort size. The Pydra cohort workflow (:func:`hdar_pipeline.engine.init_cohort_wf`, method
``--cohort-method``, default demons, with its affine stage and evaluation) on synthetic cohorts of
``--cohort-sizes`` subjects at ``--cohort-size-voxels``^3 (default 64), with the ``cf`` worker and 1 and 2
processes (``--workers``); each job gets ``--threads / workers`` threads, so every run uses the same
cores. Each run has a fresh Pydra cache and runs in a fresh process; ``wall_s`` is the workflow's wall
time (submit to result), ``registration_s_sum`` the sum of the registrations' own runtimes.

Caching. Each measurement is one JSON row in ``OUT/rows/``; an interrupted run resumes where it stopped.
A cached row is reused only while its parameters (size, variant and its method parameters, threads,
seed, repeats, affine stage; for the cohort: method, preset, cohort size, workers, threads per job,
voxels, seed) match; ``--no-cache`` reruns everything. The generated images are kept in ``OUT/work/``.

Outputs in ``-o OUT`` (default ``benchmarks/results/scaling``): ``scaling_size.csv`` (one row per size x
variant), ``scaling_cohort.csv`` (one row per cohort size x workers), ``scaling.md`` (both tables, the
machine, the load average and the exact command) and ``scaling.png`` (runtime and peak memory against
voxels, log-log, per variant; cohort wall time against cohort size per number of workers). The markdown
tables are printed at the end.

    python benchmarks/scaling.py      # the full run: about 15-30 min on 2 cores (syn-quality adds ~1 h)
    python benchmarks/scaling.py --sizes 64 96 --variants affine demons --skip-cohort
    python benchmarks/scaling.py --skip-size --cohort-sizes 1 2 4 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "scaling"
DEFAULT_SIZES = (64, 96, 128, 160, 192)
DEFAULT_VARIANTS = ("affine", "demons", "syn-fast", "hdar-fast")
DEFAULT_COHORT_SIZES = (1, 2, 4, 8)
DEFAULT_WORKERS = (1, 2)
SCHEMA = 1  # bump when the measurement itself changes: every cached row becomes stale

SIZE_COLUMNS = ["size", "voxels", "spacing_mm", "variant", "method", "preset", "status", "runtime_s",
                "peak_memory_mb", "peak_added_mb", "rss_before_mb", "max_rss_mb", "repeats", "runtime_s_all",
                "threads", "seed", "affine_stage", "device", "load_avg_1min", "finished_utc", "commit", "cached"]
COHORT_COLUMNS = ["cohort_size", "workers", "threads_per_job", "method", "preset", "size", "voxels", "status",
                  "wall_s", "registration_s_sum", "registration_s_max", "n_failed",
                  "seed", "load_avg_1min", "finished_utc", "commit", "cached"]


# ------------------------------------------------------------------------------------------- inputs


def brain_extent_mm() -> float:
    """The largest extent (mm) of the demo atlas's brain box (its 1 mm grid: an upper bound)."""
    from hdar_pipeline.apps.demo_dataset import demo_atlas

    img, _ = demo_atlas(1.0)
    return float(max(img.shape[:3]))


def cubic_atlas(size: int, extent_mm: float):
    """The demo atlas (image, labels) on a ``size``^3 grid of isotropic ``extent_mm / size`` voxels.

    ``demo_atlas`` at that spacing fits inside ``size`` voxels on its largest axis; the other axes are
    zero-padded (exactly: the grid is shifted by whole voxels), centred on the brain box.
    """
    import numpy as np

    from hdar_pipeline.apps.demo_dataset import demo_atlas
    from hdar_pipeline.core.images import Grid, new_image

    spacing = extent_mm / size
    img, lab = demo_atlas(spacing)
    shape = np.array(img.shape[:3])
    start = (shape - size) // 2  # negative: pad before
    affine = img.affine.copy()
    affine[:3, 3] = (img.affine @ np.r_[start, 1.0])[:3]
    grid = Grid((size, size, size), affine)

    def place(data):
        out = np.zeros((size,) * 3, dtype=data.dtype)
        src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, shape))
        dst = tuple(slice(max(-s, 0), max(-s, 0) + (sl.stop - sl.start)) for s, sl in zip(start, src))
        out[dst] = data[src]
        return out

    return (new_image(place(np.asarray(img.dataobj)), grid), new_image(place(np.asarray(lab.dataobj)), grid),
            float(spacing))


def prepare_pair(out: Path, size: int, seed: int) -> dict[str, Any]:
    """Fixed (atlas) and moving (synthetic subject) images at ``size``^3, written once under ``OUT/work``."""
    folder = out / "work" / f"pair-{size}_seed-{seed}"
    meta_file = folder / "pair.json"
    if meta_file.exists():
        return json.loads(meta_file.read_text())
    from hdar_pipeline.core.images import save_image
    from hdar_pipeline.core.synthetic import make_subject

    folder.mkdir(parents=True, exist_ok=True)
    atlas, labels, spacing = cubic_atlas(size, brain_extent_mm())
    subject = make_subject(atlas, labels, seed=seed)
    meta = {"size": size, "seed": seed, "spacing_mm": spacing,
            "fixed": str(save_image(atlas, folder / "fixed_T1w.nii.gz")),
            "fixed_labels": str(save_image(labels, folder / "fixed_dseg.nii.gz")),
            "moving": str(save_image(subject.image, folder / "moving_T1w.nii.gz")),
            "moving_labels": str(save_image(subject.labels, folder / "moving_dseg.nii.gz"))}
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta


def prepare_cohort(out: Path, size: int, n_subjects: int, seed: int) -> dict[str, Any]:
    """The atlas at ``size``^3 and ``n_subjects`` synthetic subjects (seeds ``seed + i``), written once."""
    folder = out / "work" / f"cohort-{size}_seed-{seed}"
    meta_file = folder / "cohort.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
    if meta is None:
        from hdar_pipeline.core.images import save_image

        folder.mkdir(parents=True, exist_ok=True)
        atlas, labels, spacing = cubic_atlas(size, brain_extent_mm())
        meta = {"size": size, "seed": seed, "spacing_mm": spacing,
                "atlas": str(save_image(atlas, folder / "atlas_T1w.nii.gz")),
                "atlas_labels": str(save_image(labels, folder / "atlas_dseg.nii.gz")), "subjects": []}
    if len(meta["subjects"]) < n_subjects:
        from hdar_pipeline.core.images import load_image, save_image
        from hdar_pipeline.core.synthetic import make_subject

        atlas, labels = load_image(meta["atlas"]), load_image(meta["atlas_labels"], labels=True)
        for i in range(len(meta["subjects"]), n_subjects):
            sub = f"{i + 1:02d}"
            s = make_subject(atlas, labels, seed=seed + i)
            meta["subjects"].append({"subject": sub,
                                     "t1w": str(save_image(s.image, folder / f"sub-{sub}_T1w.nii.gz")),
                                     "labels": str(save_image(s.labels, folder / f"sub-{sub}_dseg.nii.gz"))})
        meta_file.write_text(json.dumps(meta, indent=2))
    return meta


# ---------------------------------------------------------------------------------- one measurement


def variant_spec(name: str):
    from hdar_pipeline.apps.benchmark.runner import default_variants

    return default_variants()[name]


def variant_parameters(name: str, threads: int, seed: int) -> dict[str, Any]:
    """The method parameters of ``name`` (raises ``VariantUnavailable`` when it cannot run here)."""
    from hdar_pipeline.apps.benchmark.runner import VariantUnavailable, build_method
    from hdar_pipeline.core.provenance import json_default

    try:
        method = build_method(variant_spec(name), seed=seed, threads=threads, device="auto")
    except (NotImplementedError, ImportError) as exc:
        raise VariantUnavailable(str(exc)) from None
    return json.loads(json.dumps(method.parameters, default=json_default))


def max_rss_mb() -> float:
    """This process's resident high-water mark (MiB) since it started (``VmHWM``).

    Not ``ru_maxrss``: Linux carries that over an ``exec`` from the forked parent, so a child started
    by a big parent would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def run_one(out: Path, size: int, variant: str, threads: int, seed: int, affine_stage: bool) -> dict[str, Any]:
    """One registration in this process (the ``--one`` child): its runtime and memory."""
    from hdar_pipeline.core.runtime import configure_threads, measure

    configure_threads(threads)
    from hdar_pipeline.apps.benchmark.runner import build_method
    from hdar_pipeline.core.images import load_image
    from hdar_pipeline.methods import register_pair

    pair = prepare_pair(out, size, seed)
    spec = variant_spec(variant)
    method = build_method(spec, seed=seed, threads=threads, device="auto")
    # The libraries loaded before the baseline is taken, the same for every variant, so that "added"
    # is what the registration allocates rather than an import (torch only where the method uses it).
    import ants  # noqa: F401
    import SimpleITK  # noqa: F401

    if spec.method == "hdar":
        import torch  # noqa: F401
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    with measure() as before:  # the resident set now (a no-op block)
        pass
    transform, info = register_pair(fixed, moving, method, affine=affine_stage, seed=seed, threads=threads)
    return {"size": size, "spacing_mm": pair["spacing_mm"], "variant": variant, "method": spec.method,
            "preset": spec.preset, "runtime_s": info["runtime_s"], "peak_memory_mb": info["peak_memory_mb"],
            "rss_before_mb": before.peak_memory_mb, "peak_added_mb": info["peak_memory_mb"] - before.peak_memory_mb,
            "max_rss_mb": max_rss_mb(),
            "device": info.get("device", "cpu"), "parameters": info["parameters"]}


def run_cohort(out: Path, n_subjects: int, workers: int, threads_per_job: int, method: str, preset: str | None,
               size: int, seed: int) -> dict[str, Any]:
    """One cohort workflow run in this process (the ``--one-cohort`` child), with a fresh Pydra cache."""
    import pandas as pd
    from pydra.engine.submitter import Submitter

    from hdar_pipeline.engine import init_cohort_wf

    cohort = prepare_cohort(out, size, n_subjects, seed)
    subjects = cohort["subjects"][:n_subjects]
    cache_root = out / "work" / f"pydra-{n_subjects}x{workers}-{os.getpid()}"
    shutil.rmtree(cache_root, ignore_errors=True)
    Wf = init_cohort_wf(methods=[method], presets={method: preset} if preset else None, seed=seed,
                        threads=threads_per_job)
    wf = Wf(atlas=cohort["atlas"], atlas_labels=cohort["atlas_labels"], subjects=[s["subject"] for s in subjects],
            t1w=[s["t1w"] for s in subjects], labels=[s["labels"] for s in subjects])
    try:
        start = time.perf_counter()
        with Submitter(worker="cf", n_procs=workers, cache_root=cache_root) as sub:
            result = sub(wf)
        wall = time.perf_counter() - start
        if result.errored:
            raise RuntimeError(f"the cohort workflow failed: {result}")
        group = pd.read_csv(result.outputs.group_csv.fspath, sep="\t")  # group.tsv
        n_failed = int(result.outputs.n_failed)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return {"cohort_size": n_subjects, "workers": workers, "threads_per_job": threads_per_job, "method": method,
            "preset": preset, "size": size, "wall_s": wall,
            "registration_s_sum": float(group["runtime_s"].sum()),
            "registration_s_max": float(group["runtime_s"].max()), "n_failed": n_failed}


# ------------------------------------------------------------------------------------------ driving


def _child(args: list[str], json_file: Path, threads: int, timeout: float | None) -> dict[str, Any]:
    """Run this script with ``args`` in a fresh process; its result row (raises RuntimeError on failure)."""
    env = dict(os.environ, NO_ET="1", MPLBACKEND=os.environ.get("MPLBACKEND", "Agg"))
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    json_file.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--json", str(json_file)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not json_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}")
    row = json.loads(json_file.read_text())
    json_file.unlink()
    return row


def _stale(row: dict, key: dict) -> str:
    old = row.get("key") or {}
    changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    return "" if not changed else "changed: " + ", ".join(changed)


def _cached(cache: Path, key: dict, use_cache: bool, tag: str) -> dict | None:
    if not cache.exists() or not use_cache:
        return None
    row = json.loads(cache.read_text())
    why = _stale(row, key)
    if why:
        print(f"{tag}: cached row is stale ({why}), rerunning", flush=True)
        return None
    print(f"{tag}: cached", flush=True)
    row["cached"] = True
    return row


def _stamp(row: dict) -> dict:
    import datetime as dt

    from hdar_pipeline.core.provenance import git_commit

    row["load_avg_1min"] = os.getloadavg()[0]
    row["finished_utc"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    row["commit"] = git_commit(short=True)
    row["machine"] = f"{platform.node()} {os.cpu_count()} cores"
    return row


def measure_sizes(args, rows_dir: Path) -> list[dict]:
    import statistics

    from hdar_pipeline.apps.benchmark.runner import VariantUnavailable

    out_rows: list[dict] = []
    jobs = [(n, v) for v in args.variants for n in args.sizes]  # variant by variant, small sizes first
    unavailable: dict[str, str] = {}
    for i, (size, variant) in enumerate(jobs, 1):
        tag = f"[size {i}/{len(jobs)}] {variant} {size}^3"
        spec = variant_spec(variant)
        base = {"size": size, "voxels": size ** 3, "variant": variant, "method": spec.method, "preset": spec.preset,
                "threads": args.threads, "seed": args.seed, "affine_stage": args.affine_stage,
                "repeats": args.repeats}
        if variant not in unavailable:
            try:
                params = variant_parameters(variant, args.threads, args.seed)
            except VariantUnavailable as exc:
                unavailable[variant] = str(exc)
        if variant in unavailable:
            print(f"{tag}: not run: {unavailable[variant]}", flush=True)
            out_rows.append({**base, "status": f"not run: {unavailable[variant]}", "cached": False})
            continue
        key = {**base, "parameters": params, "schema": SCHEMA}
        cache = rows_dir / f"size-{size}_{variant}.json"
        row = _cached(cache, key, args.use_cache, tag)
        if row is None:
            print(f"{tag} ...", end=" ", flush=True)
            prepare_pair(args.out, size, args.seed)  # outside the measured process
            runs = []
            try:
                for r in range(args.repeats):
                    child_args = ["--one", str(size), variant, "-o", str(args.out), "--threads", str(args.threads),
                                  "--seed", str(args.seed)] + (["--affine-stage"] if args.affine_stage else [])
                    runs.append(_child(child_args, rows_dir / f".child-{size}_{variant}.json", args.threads,
                                       args.timeout))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(f"failed: {msg}", flush=True)
                out_rows.append(_stamp({**base, "status": f"error: {msg}", "cached": False}))
                continue  # failures are not cached: the next run tries again
            row = {**base, "status": "ok", "spacing_mm": runs[0]["spacing_mm"],
                   "runtime_s": statistics.median(r["runtime_s"] for r in runs),
                   "runtime_s_all": " ".join(f"{r['runtime_s']:.3f}" for r in runs),
                   "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in runs),
                   "peak_added_mb": statistics.median(r["peak_added_mb"] for r in runs),
                   "max_rss_mb": statistics.median(r["max_rss_mb"] for r in runs),
                   "rss_before_mb": statistics.median(r["rss_before_mb"] for r in runs),
                   "device": runs[0]["device"], "key": key}
            row = _stamp(row)
            cache.write_text(json.dumps(row, indent=2, default=str))
            row["cached"] = False
            print(f"{row['runtime_s']:.2f} s, peak {row['peak_memory_mb']:.0f} MiB "
                  f"(before {row['rss_before_mb']:.0f}), load {row['load_avg_1min']:.1f}", flush=True)
        out_rows.append(row)
    return out_rows


def measure_cohorts(args, rows_dir: Path) -> list[dict]:
    from hdar_pipeline.apps.benchmark.runner import one_line

    out_rows: list[dict] = []
    jobs = [(n, k) for k in args.workers for n in args.cohort_sizes]
    method, preset = args.cohort_method, args.cohort_preset
    for i, (n, k) in enumerate(jobs, 1):
        tag = f"[cohort {i}/{len(jobs)}] {n} subject{'s' if n != 1 else ''}, {k} worker{'s' if k != 1 else ''}"
        tpj = max(1, args.threads // k)
        base = {"cohort_size": n, "workers": k, "threads_per_job": tpj, "method": method, "preset": preset,
                "size": args.cohort_size_voxels, "voxels": args.cohort_size_voxels ** 3, "seed": args.seed}
        key = {**base, "schema": SCHEMA}
        cache = rows_dir / f"cohort-{n}_workers-{k}.json"
        row = _cached(cache, key, args.use_cache, tag)
        if row is None:
            print(f"{tag}, {tpj} thread{'s' if tpj != 1 else ''} per job ...", end=" ", flush=True)
            prepare_cohort(args.out, args.cohort_size_voxels, max(args.cohort_sizes), args.seed)
            child_args = ["--one-cohort", str(n), str(k), "-o", str(args.out), "--threads", str(tpj),
                          "--seed", str(args.seed), "--cohort-method", method,
                          "--cohort-size-voxels", str(args.cohort_size_voxels)]
            if preset:
                child_args += ["--cohort-preset", preset]
            try:
                result = _child(child_args, rows_dir / f".child-cohort-{n}_{k}.json", tpj, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                msg = one_line(str(exc)) or type(exc).__name__
                print(f"failed: {msg}", flush=True)
                out_rows.append(_stamp({**base, "status": f"error: {msg}", "cached": False}))
                continue
            row = _stamp({**base, **result, "status": "ok", "key": key})
            cache.write_text(json.dumps(row, indent=2, default=str))
            row["cached"] = False
            print(f"{row['wall_s']:.1f} s (registrations {row['registration_s_sum']:.1f} s), "
                  f"load {row['load_avg_1min']:.1f}", flush=True)
        out_rows.append(row)
    return out_rows


# ------------------------------------------------------------------------------------------ reports


def _f(x, digits=1) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def _short(status, limit: int = 90) -> str:
    """A status for a table cell: the first sentence of a long reason (the whole one is in the CSV)."""
    text = str(status).split(";")[0].replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def size_table(size_df) -> list[str]:
    lines = ["| variant | size | voxels | voxel mm | status | s (median) | peak MiB | added MiB | process max MiB |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in size_df.to_dict("records"):
        ok = r["status"] == "ok"
        cells = [_f(r.get(c), d) if ok else "–" for c, d in
                 (("runtime_s", 2), ("peak_memory_mb", 0), ("peak_added_mb", 0), ("max_rss_mb", 0))]
        lines.append(f"| {r['variant']} | {r['size']}^3 | {r['voxels']:,} | {_f(r.get('spacing_mm'), 2)} | "
                     f"{_short(r['status'])} | " + " | ".join(cells) + " |")
    return lines


def cohort_table(cohort_df) -> list[str]:
    lines = ["| subjects | workers | threads / job | status | wall s | registrations s (sum) | "
             "speed-up vs 1 worker |", "| ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    serial = {r["cohort_size"]: r.get("wall_s") for r in cohort_df.to_dict("records")
              if r["workers"] == 1 and r["status"] == "ok"}
    for r in cohort_df.to_dict("records"):
        ok = r["status"] == "ok"
        base = serial.get(r["cohort_size"])
        speed = f"{base / r['wall_s']:.2f}" if ok and base else "–"
        lines.append(f"| {r['cohort_size']} | {r['workers']} | {r['threads_per_job']} | "
                     f"{_short(r['status'])} | {_f(r.get('wall_s')) if ok else '–'} | "
                     f"{_f(r.get('registration_s_sum')) if ok else '–'} | {speed} |")
    return lines


def markdown_report(args, size_df, cohort_df, command: str) -> str:
    from hdar_pipeline.core.provenance import machine_description

    lines = ["# Scaling", ""]
    stage = ("affine stage before each deformable method" if args.affine_stage else
             "no affine stage before the deformable methods (one grid)")
    if size_df is not None and len(size_df):
        lines += ["## Time and peak memory against volume size", "",
                  f"The MNI ICBM152 2009a template on N^3 grids (isotropic voxels: brain extent / N) and a "
                  f"synthetic subject (seed {args.seed}); {args.threads} threads; "
                  f"{stage}; "
                  f"each (size, variant) in a fresh process, median of {args.repeats} run(s). Seconds: registration "
                  "only. Peak MiB: the process's resident set during the registration (interpreter, libraries and "
                  "images included); added MiB: peak minus the resident set just before the registration; process "
                  "max MiB: the process's high-water mark over its life (loading included). Full reasons of rows "
                  "not run are in `scaling_size.csv`.", ""]
        lines += size_table(size_df) + [""]
    if cohort_df is not None and len(cohort_df):
        lines += ["## Cohort wall time against cohort size", "",
                  f"Pydra cohort workflow (`init_cohort_wf`, method {args.cohort_method}"
                  f"{' ' + args.cohort_preset if args.cohort_preset else ''}, affine stage and evaluation), "
                  f"synthetic subjects at {args.cohort_size_voxels}^3, `cf` worker with 1..k processes, "
                  f"{args.threads} threads shared among them, a fresh cache and process per run.", ""]
        lines += cohort_table(cohort_df) + [""]
    load = os.getloadavg()
    lines += ["## Machine", ""] + [f"- {s}" for s in machine_description()]
    lines += [f"- load average at the end (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; "
              "per-row load in the CSVs (`load_avg_1min`)"]
    lines += ["", "## Command", "", "```", command, "```", ""]
    return "\n".join(lines)


def plot(size_df, cohort_df, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    panels = []
    if size_df is not None and (size_df["status"] == "ok").any():
        panels += ["runtime", "memory"]
    if cohort_df is not None and (cohort_df["status"] == "ok").any():
        panels.append("cohort")
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 4.2), squeeze=False)
    axes = axes[0]
    if not panels:
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, panel in zip(axes, panels):
        if panel in ("runtime", "memory"):
            ok = size_df[size_df["status"] == "ok"]
            col = "runtime_s" if panel == "runtime" else "peak_memory_mb"
            for variant, g in ok.groupby("variant", sort=False):
                g = g.sort_values("voxels")
                line, = ax.plot(g["voxels"], g[col], "o-", label=variant)
                if panel == "memory":  # what the registration itself added, same colour, dashed
                    added = g["peak_added_mb"].clip(lower=1)
                    ax.plot(g["voxels"], added, "s--", color=line.get_color(), alpha=0.6, lw=1, ms=3)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("voxels (N^3)")
            ax.set_ylabel("seconds per registration" if panel == "runtime" else "MiB")
            ax.set_title("runtime vs volume size" if panel == "runtime" else
                         "peak memory (solid) and added by the registration (dashed)", fontsize=10)
            sizes = sorted(ok["size"].unique())
            ax.set_xticks([s ** 3 for s in sizes], [f"{s}^3" for s in sizes])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8)
        else:
            ok = cohort_df[cohort_df["status"] == "ok"]
            for k, g in ok.groupby("workers"):
                g = g.sort_values("cohort_size")
                ax.plot(g["cohort_size"], g["wall_s"], "o-", label=f"{k} worker{'s' if k != 1 else ''}")
            ax.set_xlabel("subjects in the cohort")
            ax.set_ylabel("workflow wall time (s)")
            ax.set_title(f"cohort workflow ({ok['method'].iloc[0]}, {int(ok['size'].iloc[0])}^3)")
            ax.set_xticks(sorted(ok["cohort_size"].unique()))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None):
    from hdar_pipeline.apps.benchmark.runner import VARIANT_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES), metavar="N",
                   help=f"cubic grid sizes (default {' '.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=list(DEFAULT_VARIANTS), metavar="VARIANT",
                   help=f"variants (default {' '.join(DEFAULT_VARIANTS)}; also syn-quality, hdar-full, hdar-refined)")
    p.add_argument("--affine-stage", action="store_true",
                   help="run the affine stage before each deformable method (default: the method alone)")
    p.add_argument("--repeats", type=int, default=1, help="processes per (size, variant); the median is kept")
    p.add_argument("--cohort-sizes", nargs="+", type=int, default=list(DEFAULT_COHORT_SIZES), metavar="N",
                   help=f"subjects per cohort (default {' '.join(map(str, DEFAULT_COHORT_SIZES))})")
    p.add_argument("--workers", nargs="+", type=int, default=list(DEFAULT_WORKERS), metavar="K",
                   help="cf worker processes (default 1 2); each job gets --threads / K threads")
    p.add_argument("--cohort-method", default="demons", choices=["affine", "syn", "demons", "hdar"],
                   help="method of the cohort workflow (default demons)")
    p.add_argument("--cohort-preset", default=None, help="its preset (e.g. syn: fast or quality)")
    p.add_argument("--cohort-size-voxels", type=int, default=64, metavar="N", help="cohort images are N^3 (default 64)")
    p.add_argument("--skip-size", action="store_true", help="no volume-size part")
    p.add_argument("--skip-cohort", action="store_true", help="no cohort part")
    p.add_argument("--threads", type=int, default=2, help="threads per registration; cores shared by the cohort "
                                                          "workers (default 2)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up on one measurement after S s")
    p.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="output folder (rows cached in OUT/rows)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="rerun cached measurements")
    p.add_argument("--no-plot", action="store_true", help=argparse.SUPPRESS)
    # the measured child processes
    p.add_argument("--one", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--one-cohort", nargs=2, type=int, metavar=("SUBJECTS", "WORKERS"), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("sizes", "cohort_sizes", "workers"):
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    if any(s < 8 for s in args.sizes) or args.cohort_size_voxels < 8:
        p.error("sizes must be >= 8")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("NO_ET", "1")
    args = parse_args(argv)
    if args.one or args.one_cohort:  # a measured child: one result as JSON
        if args.json is None:
            print("scaling.py: --one / --one-cohort need --json FILE", file=sys.stderr)
            return 2
        if args.one:
            row = run_one(args.out, int(args.one[0]), args.one[1], args.threads, args.seed, args.affine_stage)
        else:
            row = run_cohort(args.out, args.one_cohort[0], args.one_cohort[1], args.threads, args.cohort_method,
                             args.cohort_preset, args.cohort_size_voxels, args.seed)
        args.json.write_text(json.dumps(row, indent=2, default=str))
        return 0

    import pandas as pd

    from hdar_pipeline.apps.benchmark.benchmark_cli import command_line

    command = command_line([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    size_df = cohort_df = None
    if not args.skip_size:
        size_df = pd.DataFrame(measure_sizes(args, rows_dir))
        size_df = size_df.reindex(columns=SIZE_COLUMNS)
        size_df["variant"] = pd.Categorical(size_df["variant"], categories=args.variants, ordered=True)
        size_df = size_df.sort_values(["variant", "size"]).reset_index(drop=True)
        size_df["variant"] = size_df["variant"].astype(str)
        size_df.to_csv(args.out / "scaling_size.csv", index=False)
    if not args.skip_cohort:
        cohort_df = pd.DataFrame(measure_cohorts(args, rows_dir)).reindex(columns=COHORT_COLUMNS)
        cohort_df = cohort_df.sort_values(["workers", "cohort_size"]).reset_index(drop=True)
        cohort_df.to_csv(args.out / "scaling_cohort.csv", index=False)
    report = markdown_report(args, size_df, cohort_df, command)
    (args.out / "scaling.md").write_text(report)
    written = [args.out / "scaling.md"]
    if not args.no_plot:
        written.append(plot(size_df, cohort_df, args.out / "scaling.png"))
    if size_df is not None:
        written.insert(0, args.out / "scaling_size.csv")
    if cohort_df is not None:
        written.insert(1 if size_df is not None else 0, args.out / "scaling_cohort.csv")
    print()
    print(report)
    print(f"wrote {', '.join(str(w) for w in written)}  [{time.time() - started:.0f} s]")
    failed = [r for df in (size_df, cohort_df) if df is not None for r in df["status"] if str(r).startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
