"""The ``hdar-pipeline`` BIDS App: participant and group levels over a BIDS dataset.

``participant``
    Reads the cohort with pybids (:func:`hdar_pipeline.bids.query_cohort`), resolves the atlas
    (files, a participant of the dataset, or the embedded MNI template), runs the cohort workflow
    (:func:`hdar_pipeline.workflows.init_cohort_wf`) through Pydra's ``cf`` or ``slurm`` worker with
    ``--work-dir`` as its cache (a rerun resumes and skips finished work), then writes the
    derivatives (:func:`hdar_pipeline.bids.write_subject_derivatives`), one HTML report per subject
    and the methods paragraph (``logs/CITATION.md``).
``group``
    Pools every ``*_metrics.json``/``*_metrics.csv`` of the output dataset into ``group/group.csv``
    and ``group/group_labels.csv`` (:func:`hdar_pipeline.cohort.collect_records`) and writes the group
    statistics and figures (:func:`hdar_pipeline.stats.write_group_statistics`) beside them.

The only Pydra here is the submission in :func:`run_participant`; the rest is library calls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hdar_pipeline import bids
from hdar_pipeline._version import __version__
from hdar_pipeline.guard import InputError, InputGuard

log = logging.getLogger("hdar_pipeline.app")

#: Exit codes of the app.
EXIT_OK, EXIT_FAILED_SUBJECTS, EXIT_ERROR = 0, 3, 1


@dataclass
class AppOptions:
    """Everything the app's command line sets (see ``hdar-pipeline --help``)."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    bids_filter_file: Path | None = None
    atlas: Path | None = None
    atlas_labels: Path | None = None
    atlas_participant: str | None = None
    atlas_space: str | None = None
    atlas_resolution: float = 1.0
    labels_dir: Path | None = None
    methods: list[str] = field(default_factory=lambda: ["hdar", "syn", "demons"])
    syn_preset: str = "fast"
    hdar_preset: str = "accurate"  # hdar_pipeline.methods.hdar.DEFAULT_PRESET (a test holds them equal)
    device: str = "auto"
    nprocs: int | None = None
    omp_nthreads: int | None = None
    work_dir: Path = Path("work")
    worker: str = "cf"
    slurm_args: str = ""
    seed: int | None = None
    skip_bids_validation: bool = False
    stop_on_first_crash: bool = False
    reports_only: bool = False
    preprocess: bool = True
    affine: bool = True
    affine_method: str = "fast"
    skull_stripped: str = "auto"
    n4: bool = True
    verbose: int = 0
    progress: bool = True


@dataclass
class Atlas:
    """The fixed image of every registration, with its name in the derivatives (``space-<name>``)."""

    image: Path
    labels: Path | None
    space: str
    description: str
    label_table: Path | None = None
    exclude: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- set-up


def setup_logging(output_dir: Path, level: str, verbose: int) -> Path:
    """Log to ``OUTPUT/logs/hdar-pipeline_<level>_<time>.log`` (DEBUG) and to the console."""
    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"hdar-pipeline_{level}_{time.strftime('%Y%m%d-%H%M%S')}.log"
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_hdar_app", False):
            root.removeHandler(h)
    fh = logging.FileHandler(path)
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ch = logging.StreamHandler()
    ch.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING)
    ch.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    for h in (fh, ch):
        h._hdar_app = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.DEBUG)
    for noisy in ("matplotlib", "PIL", "fsspec", "asyncio", "filelock", "bids", "bidsschematools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pydra").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)
    return path


def resolve_atlas(opts: AppOptions) -> Atlas:
    """The atlas of the run: ``--atlas`` files, ``--atlas-participant``, or the embedded MNI template."""
    if opts.atlas_participant and opts.atlas:
        raise bids.BIDSError("give either --atlas or --atlas-participant, not both")
    if opts.atlas is not None:
        atlas = Path(opts.atlas)
        if not atlas.is_file():
            raise bids.BIDSError(f"{atlas}: --atlas file not found")
        if opts.atlas_labels is not None and not Path(opts.atlas_labels).is_file():
            raise bids.BIDSError(f"{opts.atlas_labels}: --atlas-labels file not found")
        space = opts.atlas_space or _space_from_name(atlas.name)
        return Atlas(atlas.resolve(), Path(opts.atlas_labels).resolve() if opts.atlas_labels else None,
                     bids.check_label(space, "space"), f"the user-supplied atlas {atlas.name}",
                     label_table=bids.label_table(opts.labels_dir))
    if opts.atlas_participant:
        label = bids.check_label(opts.atlas_participant)
        entry = bids.participant_files(opts.bids_dir, label, labels_dir=opts.labels_dir,
                                       validate=not opts.skip_bids_validation)
        labels = Path(opts.atlas_labels) if opts.atlas_labels else entry.labels
        space = opts.atlas_space or f"sub{label}"
        image = entry.t1w.resolve()
        description = f"participant sub-{label} of the dataset (T1w {entry.t1w.name})"
        if opts.preprocess:
            # prepared as its fellow subjects are (a raw head gets its brain extracted), once per work dir
            from hdar_pipeline.cohort import ATLAS_MARGIN_MM, prepare_atlas_files

            log.info("preparing the atlas participant sub-%s as the subjects are prepared", label)
            image, prepared_labels = prepare_atlas_files(
                image, Path(opts.work_dir).resolve() / "atlas", name=f"sub-{label}", labels=labels,
                skull_stripped=opts.skull_stripped, n4=opts.n4, seed=opts.seed, threads=opts.omp_nthreads)
            labels = prepared_labels
            description += (", prepared as the subjects are (N4, brain extraction where needed, normalisation) "
                            f"and cut to its brain's box plus {ATLAS_MARGIN_MM:g} mm")
        return Atlas(image, labels.resolve() if labels else None, bids.check_label(space, "space"), description,
                     label_table=bids.label_table(opts.labels_dir), exclude=[label])
    # The embedded default: the MNI ICBM152 2009a template nilearn ships, with six tissue labels.
    from hdar_pipeline.demo import DEMO_LABELS, demo_atlas
    from hdar_pipeline.images import save_image
    from hdar_pipeline.templates import MNI_TEMPLATE_NAME

    folder = Path(opts.work_dir).resolve() / "atlas"
    res = f"{opts.atlas_resolution:g}".replace(".", "p")
    img_path = folder / f"tpl-{MNI_TEMPLATE_NAME}_res-{res}mm_T1w.nii.gz"
    lab_path = folder / f"tpl-{MNI_TEMPLATE_NAME}_res-{res}mm_dseg.nii.gz"
    table = folder / f"tpl-{MNI_TEMPLATE_NAME}_dseg.tsv"
    if not (img_path.is_file() and lab_path.is_file()):
        img, lab = demo_atlas(spacing_mm=opts.atlas_resolution)
        save_image(img, img_path)
        save_image(lab, lab_path)
    if not table.is_file():
        table.write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in DEMO_LABELS.items()))
    return Atlas(img_path, lab_path, MNI_TEMPLATE_NAME,
                 f"the MNI ICBM152 2009a nonlinear symmetric template (shipped with nilearn), "
                 f"{opts.atlas_resolution:g} mm, with six tissue labels (left/right CSF, grey and white matter)",
                 label_table=table)


def _space_from_name(name: str) -> str:
    for part in name.split("_"):
        if part.startswith("tpl-"):
            return part[4:]
    stem = name.split(".")[0]
    clean = "".join(ch for ch in stem if ch.isalnum())
    return clean or "atlas"


# ----------------------------------------------------------------------------- progress


class ProgressWatcher:
    """Counts finished registrations and evaluations in the Pydra cache while the workflow runs.

    Every cohort job writes ``register_record.json`` (then ``evaluate_record.json``) into its job
    folder when it ends, ok or failed, so counting those newer than the start of the run works for
    the ``cf`` and the ``slurm`` worker alike. The bar counts registrations (the long part; Pydra
    starts the evaluations once every registration of the split is done); each finished step is
    logged with ``k/N`` and the time left.
    """

    STAGES = (("registered", "register_record.json"), ("evaluated", "evaluate_record.json"))

    def __init__(self, cache_root: Path, expected: set[tuple[str, str, str]], *, show: bool = True,
                 interval_s: float = 3.0):
        self.cache_root, self.expected, self.show, self.interval_s = cache_root, expected, show, interval_s
        self.start = time.time()
        self.done: dict[str, set[tuple[str, str, str]]] = {stage: set() for stage, _ in self.STAGES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._progress = None

    def __enter__(self):
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=False)
            self._task = self._progress.add_task("subjects x methods registered", total=len(self.expected))
            self._progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()
        if self._progress is not None:
            self._progress.stop()

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - progress must never break the run
                log.debug("progress poll failed", exc_info=True)

    def poll(self) -> int:
        """Look for new records; returns the number of subject x method combinations evaluated."""
        n = len(self.expected)
        for stage, name in self.STAGES:
            done = self.done[stage]
            for path in self.cache_root.rglob(name):
                try:
                    if path.stat().st_mtime < self.start - 1:
                        continue
                    rec = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                key = (str(rec.get("subject", "")), str(rec.get("session") or ""), str(rec.get("method", "")))
                if key in self.expected and key not in done:
                    done.add(key)
                    elapsed = time.time() - self.start
                    left = elapsed / len(done) * (n - len(done))
                    log.info("%s %d/%d (sub-%s %s: %s), about %.0f min left in this step", stage, len(done), n,
                             key[0], key[2], rec.get("status"), left / 60)
        if self._progress is not None:
            registered, evaluated = len(self.done["registered"]), len(self.done["evaluated"])
            if registered < n or not evaluated:
                self._progress.update(self._task, completed=registered)
            else:
                self._progress.update(self._task, description="subjects x methods evaluated", completed=evaluated)
        return len(self.done["evaluated"])


# ----------------------------------------------------------------------------- participant level


def run_participant(opts: AppOptions) -> int:
    """Register the cohort to the atlas with every method and write derivatives and reports."""
    from pydra.engine.submitter import Submitter
    from pydra.engine.workflow import Workflow

    from hdar_pipeline.runtime import configure_threads, usable_cpus

    from .cohort import init_cohort_wf

    out = Path(opts.output_dir)
    # the cohort first (a wrong --participant-label or --session-label is refused before any work), then the
    # atlas (an atlas participant is prepared: N4, brain extraction)
    exclude = [bids.check_label(opts.atlas_participant)] if opts.atlas_participant and not opts.atlas else []
    cohort = bids.query_cohort(opts.bids_dir, participant_labels=opts.participant_label or None,
                               session_labels=opts.session_label or None,
                               bids_filter=bids.load_bids_filter(opts.bids_filter_file),
                               labels_dir=opts.labels_dir, validate=not opts.skip_bids_validation,
                               exclude=exclude)
    atlas = resolve_atlas(opts)
    if not cohort:
        raise bids.BIDSError(f"{opts.bids_dir}: no participants to process"
                             + (f" (the atlas participant sub-{atlas.exclude[0]} is left out)" if atlas.exclude else ""))
    for entry in cohort:
        for note in entry.notes:
            log.warning("%s: %s", entry.key, note)
        if entry.t1w is None:
            log.warning("%s: no T1w image found; it will be reported as failed", entry.key)
    log.info("atlas: %s (space-%s)", atlas.image, atlas.space)
    if atlas.labels is None:
        log.warning("the atlas has no labels (--atlas-labels, or the atlas participant's dseg in --labels-dir): "
                    "subjects are registered but not evaluated")
    elif not any(e.labels for e in cohort):
        log.warning("no subject has labels in --labels-dir: subjects are registered but not evaluated")
    log.info("%d participant(s) x %d method(s): %s", len(cohort), len(opts.methods), ", ".join(opts.methods))

    n_cpu = usable_cpus()
    # no more processes than jobs can run side by side (preprocessing runs per subject, registration per
    # subject x method): one subject gets every core in one job instead of one core and an idle one
    nprocs = opts.nprocs or min(n_cpu, len(cohort) * len(opts.methods))
    threads = opts.omp_nthreads or max(1, n_cpu // nprocs)
    configure_threads(threads)
    if opts.preprocess and not opts.affine:
        raise bids.BIDSError("--no-affine needs --no-preprocess (preprocessing includes the affine to the atlas)")
    if opts.stop_on_first_crash:
        os.environ["HDAR_STOP_ON_FIRST_CRASH"] = "1"  # read by hdar_pipeline.cohort in every job

    presets = {"syn": opts.syn_preset, "hdar": opts.hdar_preset}
    Wf = init_cohort_wf(methods=opts.methods, presets={m: p for m, p in presets.items() if m in opts.methods},
                        preprocess=opts.preprocess, skull_stripped=opts.skull_stripped, n4=opts.n4,
                        affine=opts.affine, affine_method=opts.affine_method, seed=opts.seed, threads=threads,
                        device=opts.device, name="hdar_participant_wf")

    def workflow(entries: list) -> Any:
        return Wf(atlas=atlas.image, atlas_labels=atlas.labels, label_table=atlas.label_table,
                  subjects=[e.subject for e in entries], sessions=[e.session for e in entries],
                  t1w=[e.t1w for e in entries], labels=[e.labels for e in entries])

    cache_root = Path(opts.work_dir).resolve() / "pydra"
    cache_root.mkdir(parents=True, exist_ok=True)
    worker_kwargs: dict[str, Any] = {}
    worker: Any = opts.worker
    if opts.worker == "cf":
        worker_kwargs["n_procs"] = nprocs
    elif opts.worker == "slurm":
        from .slurm_worker import BoundedRequeueSlurmWorker

        # a job SLURM cancels, times out or preempts is requeued once, not forever
        worker, worker_kwargs["sbatch_args"] = BoundedRequeueSlurmWorker, opts.slurm_args or ""
    else:
        raise bids.BIDSError(f"unknown worker {opts.worker!r}; choose cf or slurm")
    expected = {(e.subject, e.session, m) for e in cohort for m in opts.methods}
    work_lock = claim_work_dir(cache_root)  # held until the run ends; released by the OS if it is killed
    t0, started = time.perf_counter(), time.time()
    active, lost = list(cohort), {}  # lost: (subject, session) -> why its SLURM job was given up
    try:
        for attempt in (1, 2, 3):
            # Pydra keeps constructed workflows in a process-wide cache keyed by the *content* of the file
            # inputs, not their paths: a second run in this process on a copy of a dataset (or a file replaced
            # by one with the same bytes) would get the first run's nodes, with the first run's paths.
            Workflow.clear_cache()
            with ProgressWatcher(cache_root, expected, show=opts.progress):
                with Submitter(worker=worker, cache_root=cache_root, **worker_kwargs) as sub:
                    result = sub(workflow(active), raise_errors=False)
                    lost_now = lost_subjects(getattr(sub.worker, "lost", []))
            if not result.errored or opts.stop_on_first_crash or attempt == 3:
                break
            if lost_now and set(lost_now) <= {(e.subject, e.session) for e in active}:
                # SLURM lost a job for good (cancelled or timed out past its requeue): Pydra then holds back
                # every later step, of every subject; run the others' steps once more without that subject
                # (what finished comes from the cache)
                lost.update(lost_now)
                for (subject, session), why in lost_now.items():
                    log.error("sub-%s%s: %s", subject, f" ses-{session}" if session else "", why)
                active = [e for e in active if (e.subject, e.session) not in lost]
                if not active:
                    break
                log.warning("running the other subjects' remaining steps once more")
            elif _worker_died(result) and attempt == 1:
                # a worker died (a signal, the out-of-memory killer) and took the jobs beside it along: run the
                # unfinished jobs once more; the finished ones come from the cache
                log.warning("a worker process died; running the unfinished jobs once more")
            elif result.errors is not None:
                break
            # (no error recorded: Pydra's state after a dead worker; a resubmission completes from the cache)
            clear_stale_pydra_state(cache_root)
    finally:
        work_lock.close()
    log.info("workflow finished in %.1f s", time.perf_counter() - t0)
    if result.errored:
        msg = _workflow_errors(result)
        log.error("the workflow stopped: %s", "a worker process died (killed by a signal or out of memory)"
                  if _worker_died(result) else msg[:500])
        log.debug("the workflow's error: %s", msg)
        if opts.stop_on_first_crash:
            return EXIT_ERROR
        # A job died outside Python's reach (a worker killed by a signal or by the kernel's out-of-memory
        # killer takes the process pool with it): keep what finished, record the rest as failed with the
        # reason; a rerun with the same --work-dir finishes them (finished jobs come from the cache).
        jobs = {(e.subject, e.session, m): {"t1w": e.t1w, "atlas": atlas.image, "preset": presets.get(m),
                                            "seed": opts.seed} for e in cohort for m in opts.methods}
        records = salvage_records(cache_root, expected, since=started, reason=msg, jobs=jobs)
    else:
        records = [json.loads(Path(r.fspath if hasattr(r, "fspath") else r).read_text())
                   for r in result.outputs.records]
        if lost:  # what the lost subjects finished (their other methods), the rest failed with SLURM's reason
            records += salvage_records(cache_root, {k for k in expected if k[:2] in lost}, since=started)
    for rec in records:
        why = lost.get((str(rec.get("subject", "")), str(rec.get("session") or "")))
        if why and rec.get("error") == UNFINISHED:
            rec["error"] = f"did not finish: {why}; rerun with the same --work-dir to try it again"
            rec["traceback"] = why
    if opts.stop_on_first_crash and any(r.get("status") != "ok" for r in records):
        # a failure cached by an earlier run without the flag: stop here, as a fresh run would have
        first = next(r for r in records if r.get("status") != "ok")
        log.error("stopping on the first crash: sub-%s %s failed at %s: %s", first["subject"], first["method"],
                  first.get("failed_step"), first.get("error"))
        return EXIT_ERROR
    timings = {"workflow": time.perf_counter() - t0}
    extra = {"Seed": opts.seed, "Threads": threads, "Worker": opts.worker}
    t1 = time.perf_counter()
    for rec in records:
        bids.write_subject_derivatives(rec, out, space=atlas.space, atlas=atlas.image, extra=extra)
    bids.write_dataset_description(out, source=opts.bids_dir)
    timings["derivatives"], t1 = time.perf_counter() - t1, time.perf_counter()
    write_reports(out, atlas, opts, jobs=nprocs if opts.worker == "cf" else usable_cpus())
    timings["reports"], t1 = time.perf_counter() - t1, time.perf_counter()
    write_citation(out, atlas, opts, records)
    timings["citation"] = time.perf_counter() - t1
    log.info("after the workflow: derivatives %.1f s, reports %.1f s, methods text %.1f s",
             timings["derivatives"], timings["reports"], timings["citation"])
    bids.write_json(out / "logs" / "participant_timings.json",
                    {"seconds": timings, "subjects": len(cohort), "methods": list(opts.methods),
                     "worker": opts.worker, "nprocs": nprocs, "threads_per_job": threads})
    failed = [r for r in records if r.get("status") != "ok"]
    for r in failed:
        log.error("sub-%s%s %s failed at %s: %s", r["subject"], f" ses-{r['session']}" if r.get("session") else "",
                  r["method"], r.get("failed_step"), r.get("error"))
    print(f"hdar-pipeline participant: {len(records) - len(failed)}/{len(records)} subject x method ok; "
          f"derivatives in {out}")
    return EXIT_FAILED_SUBJECTS if failed else EXIT_OK


#: The lock a run holds on its work dir (``flock``): the file must stay, or a second run would lock another one.
WORK_DIR_LOCK = ".hdar-pipeline.lock"


def claim_work_dir(cache_root: Path):
    """Take the work dir for this run (an ``flock`` on ``<cache_root>/.hdar-pipeline.lock``) and clear what a
    killed earlier run left there: Pydra's lock files of jobs that never ended and the error files of jobs
    and workflows that stopped, which would otherwise stall or fail the rerun. Returns the open lock file
    (close it to release).

    Raises
    ------
    BIDSError
        Another hdar-pipeline run holds the work dir.
    """
    import fcntl

    fh = open(cache_root / WORK_DIR_LOCK, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise bids.BIDSError(f"{cache_root.parent}: the work folder is in use by another hdar-pipeline run; "
                             "give each run its own --work-dir") from None
    except OSError:  # a file system without flock (some network mounts): no cleanup, no exclusion
        log.debug("no flock on %s; stale Pydra state is left as it is", cache_root)
        return fh
    clear_stale_pydra_state(cache_root)
    return fh


def clear_stale_pydra_state(cache_root: Path) -> None:
    """Remove the lock files of Pydra jobs that never ended and the error files of stopped jobs, and forget the
    jobs whose process was killed (only while this run holds the work dir: see :func:`claim_work_dir`).

    A job killed from outside (a signal, the out-of-memory killer; ``transient`` in its record, see
    :mod:`hdar_pipeline.isolation`) ended with a failed record that Pydra cached like any result: its folder
    goes, and with it every workflow's cached result (cheap: they are re-assembled from the cached jobs), so
    that this run registers it again and passes the new record on."""
    stale = [p for p in sorted(cache_root.glob("*.lock")) if p.name != WORK_DIR_LOCK]  # never this run's own
    for path in stale + sorted(cache_root.glob("*/_error.pklz")):
        log.info("removing %s, left by a job that did not finish", path.relative_to(cache_root))
        path.unlink(missing_ok=True)
    killed = []
    for name in ("preprocess_record.json", "register_record.json"):
        for path in sorted(cache_root.glob(f"*/{name}")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if rec.get("transient"):
                killed.append((path.parent, rec))
    if killed:
        import shutil

        for folder, rec in killed:
            log.info("running sub-%s %s again: its process was killed in an earlier run (%s)", rec.get("subject", ""),
                     rec.get("method") or rec.get("failed_step", ""), rec.get("error", ""))
            shutil.rmtree(folder, ignore_errors=True)
        for result in sorted(cache_root.glob("workflow-*/_result.pklz")):
            result.unlink(missing_ok=True)


def _worker_died(result) -> bool:
    return "BrokenProcessPool" in _workflow_error_text(result)


#: The reason given for a subject x method whose job never reported back.
UNFINISHED = ("did not finish: the workflow stopped when a job died (its process killed by a signal or the "
              "out-of-memory killer, or its SLURM job cancelled or timed out); rerun with the same --work-dir to "
              "finish it")


def salvage_records(cache_root: Path, expected: set[tuple[str, str, str]], *, since: float,
                    reason: str = "", jobs: dict[tuple[str, str, str], dict[str, Any]] | None = None
                    ) -> list[dict[str, Any]]:
    """The records of a run whose workflow stopped: each subject x method's evaluation record where it has one,
    else a failed record that says why (:data:`UNFINISHED`, and the workflow's error in ``traceback``).

    A record counts when it was written during this run, or, for a job this run found in the cache (written
    earlier), when it is this run's job: ``jobs`` gives, per subject x session x method, the T1w, atlas, preset
    and seed this run registers with, and a cached record must match them all (the seed as its
    ``registration.json`` records it). Without ``jobs`` only this run's records count."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    registered: set[tuple[str, str, str]] = set()
    for name in ("register_record.json", "evaluate_record.json"):  # an evaluation record wins
        for path in cache_root.glob(f"*/{name}"):
            try:
                recent = path.stat().st_mtime >= since - 1
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            key = (str(rec.get("subject", "")), str(rec.get("session") or ""), str(rec.get("method", "")))
            if key not in expected:
                continue
            if not recent and not (rec.get("status") == "ok" and _same_job(rec, (jobs or {}).get(key))):
                continue
            if name == "evaluate_record.json" or rec.get("status") != "ok":
                found[key] = rec
            else:
                registered.add(key)
    records = []
    for key in sorted(expected):
        rec = found.get(key)
        if rec is None:
            rec = {"subject": key[0], "session": key[1], "method": key[2], "status": "error",
                   "failed_step": "evaluate" if key in registered else "register", "error": UNFINISHED,
                   "traceback": reason[:4000]}
        records.append(rec)
    return records


def _same_job(rec: dict[str, Any], job: dict[str, Any] | None) -> bool:
    """Whether a cached record is the job described by ``job`` (see :func:`salvage_records`)."""
    if not job:
        return False

    def same_path(a: Any, b: Any) -> bool:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()

    if not (same_path(rec.get("t1w"), job.get("t1w")) and same_path(rec.get("atlas"), job.get("atlas"))):
        return False
    if job.get("preset") and rec.get("preset") != job["preset"]:
        return False
    try:
        registration = json.loads(Path(rec["registration_json"]).read_text())
    except (KeyError, TypeError, OSError, json.JSONDecodeError):
        return False
    return registration.get("seed") == job.get("seed")


def _workflow_errors(result) -> str:
    """The workflow's error in one line: what each failed job said (Pydra's ``errored:`` parts), or the
    last line of its traceback; never the traceback itself."""
    text = _workflow_error_text(result)
    # Pydra: "Job 'name', <task>, errored:<message>" per failed job, separated by blank lines
    parts = re.findall(r"errored:(.*?)(?=\n\s*Job '|\n\s*See output directory|\Z)", text, flags=re.S)
    said = [lines[-1] for lines in ([ln.strip() for ln in p.splitlines() if ln.strip()] for p in parts) if lines]
    if not said:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        said = lines[-1:] or ["unknown error (see the Pydra cache)"]
    return " ".join(" | ".join(dict.fromkeys(said))[:2000].split())


def _workflow_error_text(result) -> str:
    """Everything Pydra recorded of the workflow's error (its traceback included)."""
    try:
        errors = result.errors
        if isinstance(errors, dict):
            errors = errors.get("error message", errors)
        return "".join(errors) if isinstance(errors, (list, tuple)) else str(errors)
    except Exception:  # noqa: BLE001
        return "unknown error (see the Pydra cache)"


def lost_subjects(lost: Sequence[tuple[Any, str]]) -> dict[tuple[str, str], str]:
    """``(subject, session) -> message`` for the jobs a SLURM worker gave up
    (:attr:`~.slurm_worker.BoundedRequeueSlurmWorker.lost`); a job whose subject cannot be told (no
    ``subject`` input, no readable record input) is left out."""
    out: dict[tuple[str, str], str] = {}
    for task, message in lost:
        subject, session = str(getattr(task, "subject", "") or ""), str(getattr(task, "session", "") or "")
        for name in ("preprocessed", "record"):  # a step that takes an earlier step's record instead
            if subject:
                break
            try:
                rec = json.loads(Path(str(getattr(task, name))).read_text())
                subject, session = str(rec.get("subject", "")), str(rec.get("session") or "")
            except (AttributeError, TypeError, OSError, ValueError):
                continue
        if subject:
            out[(subject, session)] = message
    return out


# ----------------------------------------------------------------------------- reports and methods


def _report_entries(out: Path, subject: str, session: str, space: str):
    from hdar_pipeline.reports import ReportEntry

    entries = []
    folder = bids.subject_dir(out, subject, session)
    prefix = bids.entity_prefix(subject, session)
    for path in sorted(folder.glob(f"{prefix}_space-{space}_desc-*_metrics.json")):
        rec = json.loads(path.read_text())
        method = rec["method"]
        warped = bids.derivative_path(out, subject, session, space=space, desc=method, suffix="T1w",
                                      extension=".nii.gz")
        xfm = bids.derivative_path(out, subject, session, from_="T1w", to=space, mode="image", desc=method,
                                   suffix="xfm", extension=".h5")
        jacobian = bids.derivative_path(out, subject, session, space=space, desc=method, suffix="jacobian",
                                        extension=".nii.gz")
        metrics = dict(rec.get("metrics") or {})
        if rec.get("folded_percent") is not None:
            metrics.setdefault("folded_percent", rec["folded_percent"])
        entries.append(ReportEntry(method=method, status=rec.get("status", ""), error=rec.get("error", ""),
                                   preset=rec.get("preset", ""), warped=warped if warped.is_file() else None,
                                   transform=xfm if xfm.is_file() else None,
                                   jacobian=jacobian if jacobian.is_file() else None, metrics=metrics,
                                   runtime_s=rec.get("runtime_s"), peak_memory_mb=rec.get("peak_memory_mb"),
                                   device=rec.get("device", "")))
    return entries


def write_reports(out: Path, atlas: Atlas, opts: AppOptions, *, jobs: int = 1) -> list[Path]:
    """One HTML report per subject (x session) found in the derivatives: ``OUTPUT/sub-<l>[_ses-<s>].html``.

    A report whose inputs (the subject's ``*_metrics.json`` and the atlas) are unchanged since it
    was written is kept, so a cached rerun does not redraw every figure. The others are drawn in up to ``jobs``
    processes side by side (a report is about 1.5 s of figures for a 1 mm atlas).
    """
    import hashlib

    keys = set()
    for path in out.glob("sub-*/**/sub-*_metrics.json"):
        rec = json.loads(path.read_text())
        if rec.get("SpatialReference") not in (None, atlas.space):
            continue
        if opts.participant_label and rec["subject"] not in {bids.check_label(p) for p in opts.participant_label}:
            continue
        keys.add((rec["subject"], rec.get("session") or ""))
    written, todo = [], []
    for subject, session in sorted(keys):
        html = out / f"{bids.entity_prefix(subject, session)}.html"
        folder = bids.subject_dir(out, subject, session)
        digest = hashlib.sha256(__version__.encode())
        digest.update(str(atlas.image).encode())
        for p in sorted(folder.glob(f"{bids.entity_prefix(subject, session)}_space-{atlas.space}_*metrics.json")):
            digest.update(p.read_bytes())
        stamp = f"<!-- hdar-pipeline report inputs {digest.hexdigest()} -->"
        if html.is_file() and stamp in html.read_text(errors="replace"):
            written.append(html)
            continue
        todo.append(dict(html=html, stamp=stamp, subject=subject, session=session, atlas=atlas.image,
                         atlas_labels=atlas.labels, entries=_report_entries(out, subject, session, atlas.space),
                         atlas_name=atlas.space, figures_dir=out / f"sub-{subject}" / "figures"))
    results = None
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            # spawned, not forked: the parent may hold threads (and torch's) that a fork would copy mid-state
            with ProcessPoolExecutor(max_workers=min(jobs, len(todo)),
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_draw_report, todo))
        except Exception as exc:  # noqa: BLE001 - e.g. a caller whose __main__ a spawned process cannot import
            log.warning("drawing the reports in %d processes failed (%s: %s); drawing them one at a time",
                        jobs, type(exc).__name__, exc)
    if results is None:
        results = [_draw_report(job) for job in todo]
    for job, error in zip(todo, results):
        if error:  # a report must not cost the subject's results
            log.error("%s: report failed: %s", job["html"].name, error)
        else:
            written.append(job["html"])
    return sorted(written)


def _draw_report(job: dict[str, Any]) -> str | None:
    """Write one subject's report (a job of :func:`write_reports`); the error's text, or None."""
    import traceback

    from hdar_pipeline.reports import write_subject_report

    job = dict(job)
    html, stamp = job.pop("html"), job.pop("stamp")
    try:
        write_subject_report(html, **job)
    except Exception as exc:  # noqa: BLE001 - reported by the caller, the other reports go on
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    with open(html, "a") as fh:
        fh.write(f"\n{stamp}\n")
    return None


def write_citation(out: Path, atlas: Atlas, opts: AppOptions, records: Sequence[dict]) -> list[Path]:
    """The methods paragraph of what ran (``OUTPUT/logs/CITATION.md`` and ``.html``)."""
    from hdar_pipeline.reports import write_methods

    parameters: dict[str, dict] = {}
    presets: dict[str, str] = {}
    weights: dict[str, Any] = {}
    versions: dict[str, str] = {}
    for rec in records:
        reg = {}
        if rec.get("registration_json") and Path(rec["registration_json"]).is_file():
            reg = json.loads(Path(rec["registration_json"]).read_text())
        params = reg.get("parameters") or rec.get("Parameters") or {}
        if params and rec["method"] not in parameters:
            parameters[rec["method"]] = params
            presets[rec["method"]] = rec.get("preset") or reg.get("preset") or ""
        versions = versions or reg.get("versions") or rec.get("Versions") or {}
        sha = reg.get("weights_sha256") or rec.get("WeightsSHA256")
        if sha:
            weights["sha256"] = sha
    subjects = {(r["subject"], r.get("session") or "") for r in records if r.get("status") == "ok"}
    preprocessing = {"n4": opts.n4, "brain_extraction": "atlas-based", "skull_stripped": opts.skull_stripped,
                     "affine": True} if opts.preprocess else {"affine": opts.affine}
    preprocessing["affine_method"] = opts.affine_method
    kwargs = dict(methods=[m for m in opts.methods if m in {r["method"] for r in records}] or opts.methods,
                  parameters=parameters, presets=presets, preprocessing=preprocessing,
                  atlas_description=atlas.description, n_subjects=len(subjects), seed=opts.seed,
                  weights=weights or None, engine="pydra")
    if versions:
        kwargs["versions"] = {**versions, "hdar-pipeline": __version__}
    try:
        return write_methods(out / "logs", **kwargs)
    except Exception as exc:  # noqa: BLE001
        log.error("methods paragraph failed: %s", exc, exc_info=True)
        return []


def run_reports_only(opts: AppOptions) -> int:
    atlas = resolve_atlas(opts)
    reports = write_reports(Path(opts.output_dir), atlas, opts)
    print(f"hdar-pipeline: {len(reports)} report(s) in {opts.output_dir}")
    return EXIT_OK if reports else EXIT_ERROR


# ----------------------------------------------------------------------------- group level


def run_group(opts: AppOptions) -> int:
    """Pool the participant-level metrics of the output dataset into group CSVs, statistics and figures."""
    from hdar_pipeline.cohort import collect_records, group_statistics_files

    out = Path(opts.output_dir)
    records = bids.read_subject_metrics(out, participants=opts.participant_label or None)
    if not records:
        raise bids.BIDSError(f"{out}: no participant-level results (*_metrics.json); run the participant level first")
    spaces = {r.get("SpatialReference") for r in records}
    if len(spaces) > 1:
        space = opts.atlas_space or sorted(s for s in spaces if s)[0]
        log.warning("results in several atlas spaces (%s); pooling space-%s (set --atlas-space)",
                    ", ".join(sorted(map(str, spaces))), space)
        records = [r for r in records if r.get("SpatialReference") == space]
    group_dir = out / "group"
    paths = collect_records(records, group_dir)
    methods = sorted({r["method"] for r in records})
    reference = "hdar" if "hdar" in methods else methods[0]
    files, notes = group_statistics_files(paths["labels"], group_dir, reference=reference, figures=True)
    for note in notes:
        log.warning("group statistics: %s", note)
    bids.write_dataset_description(out, source=opts.bids_dir)
    n_failed = sum(r.get("status") != "ok" for r in records)
    print(f"hdar-pipeline group: {len(records)} subject x method rows ({n_failed} failed)")
    print(f"group CSV: {paths['group']}")
    print(f"per-label CSV: {paths['labels']}")
    print(f"statistics and figures: {group_dir} ({len(files)} files)")
    return EXIT_OK


#: What the app writes in OUTPUT_DIR (top-level names and patterns); an input there is refused up front.
APP_OUTPUTS = ("dataset_description.json", "sub-*", "group", "logs")


def check_inputs(opts: AppOptions) -> InputGuard:
    """Every check that can run before the work, before anything is written (see :mod:`hdar_pipeline.guard`).

    The inputs (BIDS_DIR, ``--labels-dir``, ``--atlas``, ``--atlas-labels``, ``--bids-filter-file``) are
    protected: OUTPUT_DIR and ``--work-dir`` may not be or lie inside an input dataset, nor hold an input
    where the app writes. A user atlas must load as a 3-D image (and its labels as a label map on its grid);
    the filter file must parse; participant and session labels must be BIDS labels.

    Raises
    ------
    InputError, BIDSError, ImageError
        With one line naming the argument or file and the problem.
    """
    from hdar_pipeline.images import check_labels_match, load_image

    guard = InputGuard({"--atlas": opts.atlas, "--atlas-labels": opts.atlas_labels,
                        "--bids-filter-file": opts.bids_filter_file},
                       {"BIDS_DIR": opts.bids_dir, "--labels-dir": opts.labels_dir})
    out = guard.output_folder(opts.output_dir, "OUTPUT_DIR", writes=APP_OUTPUTS, create=False)
    work = guard.output_folder(opts.work_dir, "-w/--work-dir", create=False)
    for label in opts.participant_label:
        bids.check_label(label)
    for label in opts.session_label:
        bids.check_label(label, "session")
    if opts.analysis_level == "participant" and not opts.reports_only:
        bids.load_bids_filter(opts.bids_filter_file)
        if opts.atlas_labels is not None and opts.atlas is None and not opts.atlas_participant:
            raise InputError("--atlas-labels", opts.atlas_labels, "needs --atlas (the image the labels belong to)")
        if opts.atlas is not None:
            atlas = load_image(opts.atlas)
            if opts.atlas_labels is not None:
                check_labels_match(atlas, load_image(opts.atlas_labels, labels=True), image_source=opts.atlas,
                                   labels_source=opts.atlas_labels)
    # last, once everything else passed: create the folders and prove them writable
    opts.output_dir = guard.output_folder(out, "OUTPUT_DIR", writes=APP_OUTPUTS)
    opts.work_dir = guard.output_folder(work, "-w/--work-dir")
    return guard


def run(opts: AppOptions) -> int:
    """Run the app at ``opts.analysis_level``; returns the exit code.

    Every input is checked (:func:`check_inputs`) before anything is written, and verified unchanged at
    the end.
    """
    guard = check_inputs(opts)
    logfile = setup_logging(opts.output_dir, opts.analysis_level, opts.verbose)
    log.info("hdar-pipeline %s, %s level; log %s", __version__, opts.analysis_level, logfile)
    if opts.reports_only:
        code = run_reports_only(opts)
    elif opts.analysis_level == "participant":
        code = run_participant(opts)
    elif opts.analysis_level == "group":
        code = run_group(opts)
    else:
        raise bids.BIDSError(f"unknown analysis level {opts.analysis_level!r}; choose participant or group")
    guard.verify()
    return code


__all__ = ["APP_OUTPUTS", "AppOptions", "Atlas", "ProgressWatcher", "check_inputs", "resolve_atlas", "run", "run_group", "run_participant",
           "write_reports"]
