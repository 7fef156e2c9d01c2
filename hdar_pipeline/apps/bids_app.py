"""The ``hdar-pipeline`` BIDS App: participant and group levels over a BIDS dataset.

``participant``
    Reads the cohort with pybids (:func:`hdar_pipeline.bids_io.inputs.find_bids_subjects`), resolves the atlas
    (files, a participant of the dataset, or the embedded MNI template), runs the cohort workflow
    (:func:`hdar_pipeline.engine.init_cohort_wf`) through Pydra's ``cf`` or ``slurm`` worker with
    ``--work-dir`` as its cache (a rerun resumes and skips finished work), then writes the
    derivatives (:func:`hdar_pipeline.bids_io.outputs.write_subject_derivatives`), one HTML report per subject
    and the methods paragraph (``logs/CITATION.md``).
``group``
    Pools every ``*_metrics.json``/``*_metrics.tsv`` of the output dataset into ``group/group.tsv``
    and ``group/group_labels.tsv`` with their JSON data dictionaries, BIDS_DIR's ``participants.tsv``
    columns and QC flags (:func:`hdar_pipeline.pipeline.subject_steps.collect_records`), writes the group statistics and
    figures (:func:`hdar_pipeline.evaluation.stats.write_group_statistics`, ``--reference``) beside them and
    ``group/group.html`` linking everything.

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
from typing import Any, Mapping, Sequence

from hdar_pipeline.bids_io import inputs as bids
from hdar_pipeline.bids_io import outputs as bids_out
from hdar_pipeline._version import __version__
from hdar_pipeline.core.input_guard import InputError, InputGuard
from hdar_pipeline.core.subject import Subject
from hdar_pipeline.core.subject_record import RecordError, SubjectRecord

log = logging.getLogger("hdar_pipeline.app")

#: Exit codes of the app.
EXIT_OK, EXIT_FAILED_SUBJECTS, EXIT_ERROR = 0, 3, 1


def _method_preset_fields(cls: type) -> type:
    """Give the options class a field ``<method>_preset: str = <its default preset>`` after ``methods`` for every
    registered method with presets (the BIDS App's ``--<method>-preset``; :mod:`hdar_pipeline.methods.registry`)."""
    from hdar_pipeline.methods.registry import specs_with_presets

    annotations: dict[str, Any] = {}
    for name, annotation in cls.__annotations__.items():
        annotations[name] = annotation
        if name == "methods":
            for spec in specs_with_presets():
                annotations[f"{spec.name}_preset"] = "str"
                setattr(cls, f"{spec.name}_preset", spec.default_preset)
    cls.__annotations__ = annotations
    return cls


@dataclass
@_method_preset_fields
class AppOptions:
    """Everything the app's command line sets (see ``hdar-pipeline --help``); one ``<method>_preset`` field per
    method with presets (e.g. ``syn_preset``, ``hdar_preset``) follows ``methods``."""

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
    reference: str | None = None  # group level: the paired tests' reference method (default hdar, else the first)
    qc_folding_threshold: float = 0.1  # group level: hdar_pipeline.evaluation.group_tables.DEFAULT_FOLDING_THRESHOLD
    mem_mb: int | None = None
    boilerplate_only: bool = False
    derivatives: list[Path] = field(default_factory=list)


@dataclass
class Atlas:
    """The fixed image of every registration, with its name in the derivatives (``space-<name>``)."""

    image: Path
    labels: Path | None
    space: str
    description: str
    label_table: Path | None = None
    exclude: list[str] = field(default_factory=list)
    #: the files the atlas was made from (a participant's T1w, a user's file), for its sidecar's ``Sources``
    sources: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------- set-up


#: Loggers whose records reach the log file at every level; any other logger's only from WARNING up.
APP_LOGGERS = ("hdar_pipeline",)


class _AppOrWarning(logging.Filter):
    """Pass every record of :data:`APP_LOGGERS` (and their children) and the others' from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return any(record.name == name or record.name.startswith(name + ".") for name in APP_LOGGERS)


def command_line(argv: Sequence[str] | None) -> str:
    """The command line as a shell would take it back: ``hdar-pipeline`` and the arguments, quoted."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["hdar-pipeline", *map(str, args)])


def setup_logging(output_dir: Path, level: str, verbose: int, *, argv: Sequence[str] | None = None) -> Path:
    """Log to ``OUTPUT/logs/hdar-pipeline_<level>_<time>.log`` and to the console.

    The file gets everything hdar-pipeline logs (DEBUG up) and the warnings and errors of every other
    library (pydra, matplotlib, PIL, bids, ...: never their debug chatter, whatever ``verbose`` says); its
    first lines are the command line, the working directory, the host and the version. The console gets
    WARNING up, INFO up with ``verbose`` 1, DEBUG (Pydra's included) with 2.

    Parameters
    ----------
    output_dir : Path
        The app's OUTPUT_DIR (``logs/`` is created in it).
    level : str
        The analysis level (in the file name).
    verbose : int
        How many ``-v`` were given.
    argv : sequence of str, optional
        The app's arguments (without the program name); default ``sys.argv[1:]``.

    Returns
    -------
    Path
        The log file.
    """
    import socket

    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"hdar-pipeline_{level}_{time.strftime('%Y%m%d-%H%M%S')}.log"
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_hdar_app", False):
            root.removeHandler(h)
            h.close()
    with open(path, "a", encoding="utf-8") as head:  # the command line first, then the log
        head.write(f"# command: {command_line(argv)}\n# cwd: {os.getcwd()}\n"
                   f"# host: {socket.gethostname()}; hdar-pipeline {__version__}; "
                   f"started {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setLevel(logging.DEBUG)
    fh.addFilter(_AppOrWarning())
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ch = logging.StreamHandler()
    ch.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING)
    ch.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    for h in (fh, ch):
        h._hdar_app = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.DEBUG)
    for noisy in ("matplotlib", "PIL", "fsspec", "asyncio", "filelock", "bids", "bidsschematools", "nibabel",
                  "urllib3", "h5py", "numexpr", "fontTools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pydra").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)
    return path


def save_command(logfile: Path, opts: AppOptions, argv: Sequence[str] | None = None) -> Path:
    """Write what was run beside the log: ``<log name>_command.json`` in ``logs/``.

    It holds ``argv`` (the arguments as given), ``command`` (one shell line), the resolved options
    (:class:`AppOptions`, paths as absolute strings), the version, the time, the host, the working
    directory, the Python executable and, under SLURM, the job id.

    Parameters
    ----------
    logfile : Path
        The run's log file (:func:`setup_logging`); the JSON takes its name.
    opts : AppOptions
        The options after :func:`check_inputs` (OUTPUT_DIR and ``--work-dir`` resolved).
    argv : sequence of str, optional
        The app's arguments (without the program name); default ``sys.argv[1:]``.

    Returns
    -------
    Path
        The JSON file.
    """
    import dataclasses
    import platform
    import socket
    import sys

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value.resolve()) if not value.is_absolute() else str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    args = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    path = logfile.with_name(logfile.stem + "_command.json")
    content = {
        "argv": args, "command": command_line(args),
        "options": {f.name: plain(getattr(opts, f.name)) for f in dataclasses.fields(opts)},
        "version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
        "cwd": os.getcwd(), "python": sys.executable, "python_version": platform.python_version(),
        "log": logfile.name,
    }
    if os.environ.get("SLURM_JOB_ID"):
        content["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return path


def resolve_atlas(opts: AppOptions, *, write: bool = True) -> Atlas:
    """The atlas of the run: ``--atlas`` files, ``--atlas-participant``, or the embedded MNI template.

    With ``write=False`` (``--boilerplate-only``) nothing is prepared or written: the atlas is described, with
    the paths it would have."""
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
                     label_table=bids.label_table(opts.labels_dir), sources=[atlas.resolve()])
    if opts.atlas_participant:
        label = bids.check_label(opts.atlas_participant)
        entry = bids.find_bids_participant(opts.bids_dir, label, labels_dir=opts.labels_dir,
                                           validate=not opts.skip_bids_validation)
        labels = Path(opts.atlas_labels) if opts.atlas_labels else entry.labels
        space = opts.atlas_space or f"sub{label}"
        image = entry.t1w.resolve()
        description = f"participant sub-{label} of the dataset (T1w {entry.t1w.name})"
        if opts.preprocess:
            # prepared as its fellow subjects are (a raw head gets its brain extracted), once per work dir
            from hdar_pipeline.pipeline.subject_steps import ATLAS_MARGIN_MM, prepare_atlas_files

            if write:
                log.info("preparing the atlas participant sub-%s as the subjects are prepared", label)
                image, prepared_labels = prepare_atlas_files(
                    image, Path(opts.work_dir).resolve() / "atlas", name=f"sub-{label}", labels=labels,
                    skull_stripped=opts.skull_stripped, n4=opts.n4, seed=opts.seed, threads=opts.omp_nthreads)
                labels = prepared_labels
            description += (", prepared as the subjects are (N4, brain extraction where needed, normalisation) "
                            f"and cut to its brain's box plus {ATLAS_MARGIN_MM:g} mm")
        return Atlas(image, labels.resolve() if labels else None, bids.check_label(space, "space"), description,
                     label_table=bids.label_table(opts.labels_dir), exclude=[label],
                     sources=[p.resolve() for p in (entry.t1w, labels) if p])
    # The embedded default: the MNI ICBM152 2009a template nilearn ships, with six tissue labels.
    from hdar_pipeline.apps.demo_dataset import DEMO_LABELS, demo_atlas
    from hdar_pipeline.core.images import save_image
    from hdar_pipeline.core.templates import MNI_TEMPLATE_NAME

    folder = Path(opts.work_dir).resolve() / "atlas"
    res = f"{opts.atlas_resolution:g}".replace(".", "p")
    img_path = folder / f"tpl-{MNI_TEMPLATE_NAME}_res-{res}mm_T1w.nii.gz"
    lab_path = folder / f"tpl-{MNI_TEMPLATE_NAME}_res-{res}mm_dseg.nii.gz"
    table = folder / f"tpl-{MNI_TEMPLATE_NAME}_dseg.tsv"
    if write and not (img_path.is_file() and lab_path.is_file()):
        img, lab = demo_atlas(spacing_mm=opts.atlas_resolution)
        save_image(img, img_path)
        save_image(lab, lab_path)
    if write and not table.is_file():
        table.write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in DEMO_LABELS.items()))
    return Atlas(img_path, lab_path, MNI_TEMPLATE_NAME,
                 f"the MNI ICBM152 2009a nonlinear symmetric template (shipped with nilearn), "
                 f"{opts.atlas_resolution:g} mm, with six tissue labels (left/right CSF, grey and white matter)",
                 label_table=table)


def input_datasets(opts: AppOptions) -> dict[str, Path]:
    """The datasets the run reads, by the names its ``bids:<name>:`` URIs use: ``raw`` (BIDS_DIR) and ``labels``
    (``--labels-dir``)."""
    out = {"raw": Path(opts.bids_dir).resolve()}
    if opts.labels_dir is not None:
        out["labels"] = Path(opts.labels_dir).resolve()
    return out


def _space_from_name(name: str) -> str:
    for part in name.split("_"):
        if part.startswith("tpl-"):
            return part[4:]
    stem = name.split(".")[0]
    clean = "".join(ch for ch in stem if ch.isalnum())
    return clean or "atlas"


# ----------------------------------------------------------------------------- progress


class _StageCount:
    """What :class:`ProgressWatcher` knows of one stage: the keys it waits for and what finished."""

    def __init__(self, name: str, record: str, expected: set[tuple[str, str, str]]):
        self.name, self.record, self.expected = name, record, expected
        self.done: set[tuple[str, str, str]] = set()
        self.cached: set[tuple[str, str, str]] = set()
        self.failed: set[tuple[str, str, str]] = set()
        self.times: list[float] = []  # when each of this run's completions was written (the record's mtime)

    def time_left(self) -> float | None:
        """Seconds left in the stage at its latest completion, from the rate of this run's completions since
        its first one (cached results do not count: they took no time); ``None`` before two completions or when
        they all came at once."""
        remaining = len(self.expected) - len(self.done)
        if remaining <= 0:
            return 0.0
        if len(self.times) < 2:
            return None
        span = max(self.times) - min(self.times)
        if span < 1.0:  # a burst of parallel jobs ending together says nothing of the rate
            return None
        return span / (len(self.times) - 1) * remaining

    def summary(self) -> str:
        notes = [f"{n} {what}" for n, what in ((len(self.cached), "cached"), (len(self.failed), "failed")) if n]
        return f"{self.name} {len(self.done)}/{len(self.expected)}" + (f" ({', '.join(notes)})" if notes else "")


def _format_left(seconds: float | None) -> str:
    """``"about 4 min left in this stage"``, or ``""`` without an estimate."""
    if seconds is None or seconds <= 0:
        return ""
    if seconds < 60:
        text = "less than a minute"
    elif seconds < 3600:
        text = f"about {seconds / 60:.0f} min"
    else:
        text = f"about {int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{text} left in this stage"


def _same_input(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return Path(a).resolve() == Path(b).resolve()


def _cached_record_is_this_job(rec: SubjectRecord, job: dict[str, Any] | None) -> bool:
    """Whether a record found in the cache before the run is this run's job (its T1w, atlas, preset and, where
    it wrote a ``registration.json``, its seed); with no job described, any record is."""
    if job is None:
        return True
    if not (_same_input(rec.t1w, job.get("t1w")) and _same_input(rec.atlas, job.get("atlas"))):
        return False
    if job.get("preset") and rec.preset and rec.preset != job["preset"]:
        return False
    if rec.registration_json and "seed" in job:
        try:
            return json.loads(Path(rec.registration_json).read_text()).get("seed") == job["seed"]
        except (OSError, json.JSONDecodeError):
            return False
    return True


class ProgressWatcher:
    """Counts the finished preprocessings, registrations and evaluations in the Pydra cache while the workflow
    runs.

    Every cohort job writes its record (:data:`hdar_pipeline.pipeline.subject_steps.RECORD_NAMES`: ``preprocess_record.json``
    per subject, ``register_record.json`` and ``evaluate_record.json`` per subject x method) into its job
    folder when it ends, ok or failed, so polling the cache works for the ``cf`` and the ``slurm`` worker alike.

    * Records already there when the watcher starts, in a folder Pydra finished (``_result.pklz``) and of this
      run's job (``jobs``), are results a resumed run takes from the cache: counted as done (and cached) at once;
      one whose upstream step is not cached (it runs again) waits for its new record, or for the end.
    * The time left in a stage comes from the rate of that stage's completions in this run since its first one
      (the records' modification times), from the second completion on.
    * On a terminal (``live``) a bar per stage; otherwise (SLURM logs, redirected output) one plain, flushed
      line per finished preprocessing and subject x method, e.g. ``[12/70 register] sub-03 hdar ok (8.1 s)``.
      Without ``show`` the lines go to the log only.

    Parameters
    ----------
    cache_root : Path
        The Pydra cache (``<work dir>/pydra``).
    expected : set of (subject, session, method)
        The subject x method combinations of the run.
    show : bool
        Show progress on ``stream`` (else log it only).
    interval_s : float
        Seconds between polls of the cache.
    preprocess : bool
        The run preprocesses each subject first (a stage of its own).
    jobs : dict, optional
        Per (subject, session, method): ``t1w``, ``atlas``, ``preset`` and ``seed`` of this run's job, which
        a record found in the cache at the start must match to count as done.
    stream : file object, optional
        Where progress goes (default ``sys.stdout``).
    live : bool, optional
        Draw bars (default: when ``stream`` is a terminal).
    """

    STAGES = ("preprocess", "register", "evaluate")

    def __init__(self, cache_root: Path, expected: set[tuple[str, str, str]], *, show: bool = True,
                 interval_s: float = 3.0, preprocess: bool = False,
                 jobs: dict[tuple[str, str, str], dict[str, Any]] | None = None, stream: Any = None,
                 live: bool | None = None):
        import sys

        from hdar_pipeline.pipeline.subject_steps import RECORD_NAMES

        self.cache_root, self.expected, self.show, self.interval_s = Path(cache_root), set(expected), show, interval_s
        self.start = time.time()
        subjects = {(s, ses, "") for s, ses, _ in self.expected} if preprocess else set()
        keys = {"preprocess": subjects, "register": self.expected, "evaluate": self.expected}
        self.stages = {name: _StageCount(name, RECORD_NAMES[name], keys[name]) for name in self.STAGES if keys[name]}
        #: per stage, the keys done (cached ones included)
        self.done = {name: stage.done for name, stage in self.stages.items()}
        self.stream = stream if stream is not None else sys.stdout
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self._seen: dict[Path, float] = {}  # record file -> its mtime when last read
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._deferred: list[tuple[_StageCount, tuple[str, str, str], SubjectRecord]] = []
        self._count_cached(jobs)

    # -- the cache

    def _records(self, stage: _StageCount):
        for path in sorted(self.cache_root.glob(f"*/{stage.record}")):
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._seen.get(path) == mtime:
                continue
            try:
                rec = SubjectRecord.read(path)
            except RecordError:  # being written: read again at the next poll
                continue
            self._seen[path] = mtime
            key = (rec.subject, rec.session, rec.method if stage.name != "preprocess" else "")
            if key in stage.expected and key not in stage.done:
                yield path, mtime, key, rec

    def _count_cached(self, jobs: dict[tuple[str, str, str], dict[str, Any]] | None) -> None:
        by_subject = {(s, ses, ""): {**job, "preset": None} for (s, ses, _), job in (jobs or {}).items()}
        upstream = {"preprocess": None, "register": "preprocess", "evaluate": "register"}
        for stage in self.stages.values():
            before = self.stages.get(upstream[stage.name] or "")
            for path, _, key, rec in list(self._records(stage)):
                job = None if jobs is None else (by_subject if stage.name == "preprocess" else jobs).get(key, {})
                # a record without Pydra's result beside it is of a job that did not finish: it runs again
                if not ((path.parent / "_result.pklz").is_file() and _cached_record_is_this_job(rec, job)):
                    continue
                up_key = (key[0], key[1], "") if before is not None and before.name == "preprocess" else key
                if before is not None and up_key not in before.cached:
                    # its upstream step runs again (a killed job's folder was cleared): it most likely does too
                    # (a new record), else Pydra took it from the cache after all (counted at the end)
                    self._deferred.append((stage, key, rec))
                    continue
                self._count(stage, key, rec, cached=True)

    def _count(self, stage: _StageCount, key: tuple[str, str, str], rec: SubjectRecord, *, cached: bool) -> None:
        stage.done.add(key)
        if cached:
            stage.cached.add(key)
        if not rec.ok:
            stage.failed.add(key)

    def poll(self) -> int:
        """Look for new records; returns the number of subject x method combinations evaluated."""
        with self._lock:
            found = [(mtime, name, key, rec) for name, stage in self.stages.items()
                     for _, mtime, key, rec in self._records(stage)]
            for mtime, name, key, rec in sorted(found, key=lambda item: (item[0], self.STAGES.index(item[1]))):
                if key not in self.stages[name].done:  # a job run twice (two folders) counts once
                    self._finished(self.stages[name], key, rec, mtime)
            self._draw()
        return len(self.stages["evaluate"].done)

    # -- reporting

    def _finished(self, stage: _StageCount, key: tuple[str, str, str], rec: SubjectRecord, mtime: float) -> None:
        self._count(stage, key, rec, cached=False)
        stage.times.append(mtime)
        who = f"sub-{key[0]}" + (f" ses-{key[1]}" if key[1] else "") + (f" {key[2]}" if key[2] else "")
        what = "ok" if rec.ok else f"failed at {rec.failed_step or stage.name}"
        seconds = (rec.stage_wall_s or {}).get(stage.name)
        line = f"[{len(stage.done)}/{len(stage.expected)} {stage.name}] {who} {what}"
        if isinstance(seconds, (int, float)):
            line += f" ({seconds:.1f} s)"
        left = _format_left(stage.time_left())
        if left:
            line += f"; {left}"
        self._say(line)

    def _say(self, line: str) -> None:
        if self.show and not self.live:
            print(line, file=self.stream, flush=True)
            log.debug("%s", line)  # the log file has it; the console has the line already
        else:
            log.info("%s", line)

    def summary(self) -> str:
        """One line: done/total per stage, with how many were cached and how many failed."""
        return "; ".join(stage.summary() for stage in self.stages.values())

    def _draw(self) -> None:
        if self._progress is None:
            return
        for name, stage in self.stages.items():
            notes = [f"{len(stage.cached)} cached"] if stage.cached else []
            left = stage.time_left()
            if left and len(stage.done) < len(stage.expected):
                notes.append(_format_left(left).replace(" in this stage", ""))
            self._progress.update(self._tasks[name], completed=len(stage.done), note=", ".join(notes))

    # -- context

    def __enter__(self) -> ProgressWatcher:
        if self.show and self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
                                      console=Console(file=self.stream), transient=False)
            for name, stage in self.stages.items():
                self._tasks[name] = self._progress.add_task(name, total=len(stage.expected), note="")
            self._progress.start()
        if any(stage.cached for stage in self.stages.values()):
            self._say("resumed from the work dir: " + "; ".join(
                f"{stage.name} {len(stage.cached)}/{len(stage.expected)} cached" for stage in self.stages.values()))
        self._draw()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - progress must never break the run
            log.debug("progress poll failed", exc_info=True)
        for stage, key, rec in self._deferred:  # no new record came: Pydra used the cached one
            if key not in stage.done:
                self._count(stage, key, rec, cached=True)
        self._draw()
        if self._progress is not None:
            self._progress.stop()
        line = f"progress: {self.summary()} after {_format_duration(time.time() - self.start)}"
        self._say(line)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - progress must never break the run
                log.debug("progress poll failed", exc_info=True)


def _format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


# ----------------------------------------------------------------------------- participant level


#: One job's peak memory (MB) that ``--mem-mb`` divides by when the work folder holds no measurement yet. The
#: peaks measured so far (each job's resident set, ``peak_memory_mb`` in its record): 1440 MiB at most in the
#: App's runs (HDAR accurate on LPBA40 heads, ``benchmarks/results/lpba40-frames-app/v2/group.csv``; IXI heads:
#: HDAR accurate 1380, SyN fast 592, Demons 556, ``benchmarks/results/ixi-bids-app/v8/group.csv``), and 1879 MiB
#: in the scaling benchmark (Demons on a 192^3 grid, README "Scaling"). The preprocessing jobs (N4, brain
#: extraction, the affine) record no peak; this constant is the largest measured peak plus a third for them and
#: for larger grids: conservative, so that a cap from it does not end in the out-of-memory killer.
JOB_MEMORY_MB = 2500

#: Headroom on a peak measured in the work folder (see :func:`job_memory_estimate`).
MEASURED_HEADROOM = 1.25


@dataclass
class JobPlan:
    """How the participant level runs its jobs (:func:`plan_jobs`): ``nprocs`` processes of ``threads`` threads,
    each job estimated at ``job_mb``; ``notes`` say why (logged)."""

    nprocs: int
    threads: int
    job_mb: float | None = None
    notes: list[str] = field(default_factory=list)


def job_memory_estimate(cache_root: Path | None) -> tuple[float, str]:
    """One job's peak memory (MB) and where the number comes from.

    The largest ``peak_memory_mb`` of the registration records an earlier run left in the work folder's Pydra
    cache (``*/register_record.json``: the same data, atlas and methods when it is a rerun), times
    :data:`MEASURED_HEADROOM`; without one, :data:`JOB_MEMORY_MB`.
    """
    peaks = []
    if cache_root is not None and cache_root.is_dir():
        for path in cache_root.glob("*/register_record.json"):
            try:
                peak = json.loads(path.read_text()).get("peak_memory_mb")
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(peak, (int, float)) and peak > 0:
                peaks.append(float(peak))
    if peaks:
        return (max(peaks) * MEASURED_HEADROOM,
                f"{max(peaks):.0f} MB, the largest peak of {len(peaks)} job(s) in the work folder, plus "
                f"{MEASURED_HEADROOM - 1:.0%}")
    return float(JOB_MEMORY_MB), f"{JOB_MEMORY_MB} MB, the built-in estimate (no job measured in the work folder yet)"


def plan_jobs(*, cpus: int, jobs: int, nprocs: int | None = None, omp_nthreads: int | None = None,
              mem_mb: int | None = None, job_mb: float = JOB_MEMORY_MB) -> JobPlan:
    """Processes and threads per job for the ``cf`` worker.

    Parameters
    ----------
    cpus : int
        Cores this process may use.
    jobs : int
        Jobs that could run side by side (subjects x methods): no more processes than that, so that one
        subject gets every core in one job instead of one core and idle ones.
    nprocs, omp_nthreads : int, optional
        ``--nprocs`` and ``--omp-nthreads``; by default ``min(cpus, jobs)`` processes of ``cpus // nprocs``
        threads.
    mem_mb : int, optional
        ``--mem-mb``: at most ``mem_mb // job_mb`` processes (at least one), ``--nprocs`` included (memory is
        the harder limit); the threads per job are then computed for the fewer processes.
    job_mb : float
        One job's estimated peak memory (:func:`job_memory_estimate`).

    Returns
    -------
    JobPlan
    """
    procs = nprocs or max(1, min(cpus, jobs))
    notes = []
    if mem_mb is not None:
        fit = max(1, int(mem_mb // job_mb))
        if mem_mb < job_mb:
            notes.append(f"--mem-mb {mem_mb} is below one job's estimated peak ({job_mb:.0f} MB): one process, "
                         "which may still run out of memory")
        if procs > fit:
            notes.append(f"--mem-mb {mem_mb} holds {fit} job(s) of about {job_mb:.0f} MB: {fit} process(es) "
                         f"instead of {procs}")
            procs = fit
        else:
            notes.append(f"--mem-mb {mem_mb} holds {fit} job(s) of about {job_mb:.0f} MB: {procs} process(es) fit")
    threads = omp_nthreads or max(1, cpus // procs)
    return JobPlan(nprocs=procs, threads=threads, job_mb=job_mb if mem_mb is not None else None, notes=notes)


def slurm_sbatch_args(slurm_args: str, mem_mb: int | None) -> str:
    """``--slurm-args`` with ``--mem=<mem_mb>M`` added for each job, unless they set the memory already
    (``--mem``, ``--mem-per-cpu`` or ``--mem-per-gpu``) or ``mem_mb`` is None."""
    args = (slurm_args or "").strip()
    if mem_mb is None or re.search(r"(^|\s)--mem(-per-cpu|-per-gpu)?(=|\s|$)", args):
        return args
    return f"{args} --mem={mem_mb}M".strip()


def _attach_derivatives(opts: AppOptions, cohort: Sequence[Subject], atlas: Atlas) -> None:
    """Set each subject's ``brain_mask`` and ``anat_xfm`` from the ``--derivatives`` datasets
    (:func:`hdar_pipeline.bids_io.anat_derivatives.find_anat_derivatives`; the transform only where its ``to-`` space is the
    atlas's space name) and log what was found."""
    if not opts.derivatives:
        return
    if not opts.preprocess:
        log.warning("--derivatives is not used with --no-preprocess (what it reuses replaces preprocessing steps)")
        return
    from hdar_pipeline.bids_io.anat_derivatives import derivative_layouts, find_anat_derivatives

    layouts = derivative_layouts(opts.derivatives)
    for entry in cohort:
        if entry.t1w is None:
            continue
        found = find_anat_derivatives(layouts, entry.id, entry.session, t1w=entry.t1w, space=atlas.space)
        entry.brain_mask, entry.anat_xfm = found.brain_mask, found.xfm
        for note in found.notes:
            log.warning("%s: --derivatives: %s", entry.key, note)
        log.info("%s: --derivatives: brain mask %s; transform to space-%s %s", entry.key,
                 found.brain_mask or "not found (brain extraction runs)", atlas.space,
                 found.xfm or "not found (the affine to the atlas is registered)")
    with_t1w = [e for e in cohort if e.t1w is not None]
    log.info("--derivatives: brain masks reused for %d of %d subject(s), affines to space-%s for %d",
             sum(e.brain_mask is not None for e in with_t1w), len(with_t1w), atlas.space,
             sum(e.anat_xfm is not None for e in with_t1w))


def run_participant(opts: AppOptions) -> int:
    """Register the cohort to the atlas with every method and write derivatives and reports."""
    from pydra.engine.submitter import Submitter
    from pydra.engine.workflow import Workflow

    from hdar_pipeline.pipeline.isolation import start_fork_server
    from hdar_pipeline.core.runtime import configure_threads, usable_cpus
    from hdar_pipeline.engine.cohort_workflow import init_cohort_wf

    if opts.worker == "cf":  # the jobs' process server imports torch and ANTs while the dataset is read
        start_fork_server()
    out = Path(opts.output_dir)
    # the cohort first (a wrong --participant-label or --session-label is refused before any work), then the
    # atlas (an atlas participant is prepared: N4, brain extraction)
    exclude = [bids.check_label(opts.atlas_participant)] if opts.atlas_participant and not opts.atlas else []
    cohort = bids.find_bids_subjects(opts.bids_dir, participant_labels=opts.participant_label or None,
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
    # subject x method): one subject gets every core in one job instead of one core and an idle one; with
    # --mem-mb, no more than fit in that memory
    job_mb, job_mb_source = (job_memory_estimate(Path(opts.work_dir).resolve() / "pydra") if opts.mem_mb is not None
                             else (float(JOB_MEMORY_MB), ""))
    plan = plan_jobs(cpus=n_cpu, jobs=len(cohort) * len(opts.methods), nprocs=opts.nprocs,
                     omp_nthreads=opts.omp_nthreads, mem_mb=opts.mem_mb if opts.worker == "cf" else None,
                     job_mb=job_mb)
    nprocs, threads = plan.nprocs, plan.threads
    if opts.mem_mb is not None and opts.worker == "cf":
        log.info("one job's peak memory estimated at %s", job_mb_source)
        for note in plan.notes:  # a warning where memory overrules --nprocs or one job may not fit
            log.log(logging.WARNING if "below" in note or (opts.nprocs or 0) > nprocs else logging.INFO, note)
    log.info("%d parallel job(s) of %d thread(s)", nprocs, threads)
    _attach_derivatives(opts, cohort, atlas)
    configure_threads(threads)
    if opts.preprocess and not opts.affine:
        raise bids.BIDSError("--no-affine needs --no-preprocess (preprocessing includes the affine to the atlas)")

    presets = method_presets(opts)
    Wf = init_cohort_wf(methods=opts.methods, presets={m: p for m, p in presets.items() if m in opts.methods},
                        preprocess=opts.preprocess, skull_stripped=opts.skull_stripped, n4=opts.n4,
                        affine=opts.affine, affine_method=opts.affine_method, seed=opts.seed, threads=threads,
                        device=opts.device, stop_on_first_crash=opts.stop_on_first_crash, name="hdar_participant_wf")

    def workflow(entries: list) -> Any:
        return Wf(atlas=atlas.image, atlas_labels=atlas.labels, label_table=atlas.label_table,
                  subjects=[e.id for e in entries], sessions=[e.session for e in entries],
                  t1w=[e.t1w for e in entries], labels=[e.labels for e in entries],
                  **({"brain_masks": [e.brain_mask for e in entries], "anat_xfms": [e.anat_xfm for e in entries]}
                     if any(e.brain_mask or e.anat_xfm for e in entries) else {}))

    cache_root = Path(opts.work_dir).resolve() / "pydra"
    cache_root.mkdir(parents=True, exist_ok=True)
    worker_kwargs: dict[str, Any] = {}
    worker: Any = opts.worker
    if opts.worker == "cf":
        worker_kwargs["n_procs"] = nprocs
    elif opts.worker == "slurm":
        from hdar_pipeline.engine.slurm_worker import BoundedRequeueSlurmWorker

        # a job SLURM cancels, times out or preempts is requeued once, not forever
        worker, worker_kwargs["sbatch_args"] = BoundedRequeueSlurmWorker, slurm_sbatch_args(opts.slurm_args,
                                                                                               opts.mem_mb)
        if opts.mem_mb is not None:
            log.info("SLURM jobs submitted with sbatch %s", worker_kwargs["sbatch_args"])
    else:
        raise bids.BIDSError(f"unknown worker {opts.worker!r}; choose cf or slurm")
    expected = {(e.id, e.session, m) for e in cohort for m in opts.methods}
    # what each subject x method's job is (a record found in the cache must match it to count as this run's)
    jobs = {(e.id, e.session, m): {"t1w": e.t1w, "atlas": atlas.image, "preset": presets.get(m),
                                        "seed": opts.seed} for e in cohort for m in opts.methods}
    work_lock = claim_work_dir(cache_root)  # held until the run ends; released by the OS if it is killed
    t0, started = time.perf_counter(), time.time()
    active, lost = list(cohort), {}  # lost: (subject, session) -> why its SLURM job was given up
    try:
        for attempt in (1, 2, 3):
            # Pydra keeps constructed workflows in a process-wide cache keyed by the *content* of the file
            # inputs, not their paths: a second run in this process on a copy of a dataset (or a file replaced
            # by one with the same bytes) would get the first run's nodes, with the first run's paths.
            Workflow.clear_cache()
            with ProgressWatcher(cache_root, expected, show=opts.progress, preprocess=opts.preprocess, jobs=jobs):
                with Submitter(worker=worker, cache_root=cache_root, **worker_kwargs) as sub:
                    result = sub(workflow(active), raise_errors=False)
                    lost_now = lost_subjects(getattr(sub.worker, "lost", []))
            if not result.errored or opts.stop_on_first_crash or attempt == 3:
                break
            if lost_now and set(lost_now) <= {(e.id, e.session) for e in active}:
                # SLURM lost a job for good (cancelled or timed out past its requeue): Pydra then holds back
                # every later step, of every subject; run the others' steps once more without that subject
                # (what finished comes from the cache)
                lost.update(lost_now)
                for (subject, session), why in lost_now.items():
                    log.error("sub-%s%s: %s", subject, f" ses-{session}" if session else "", why)
                active = [e for e in active if (e.id, e.session) not in lost]
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
        records = salvage_records(cache_root, expected, since=started, reason=msg, jobs=jobs)
    else:
        records = [SubjectRecord.read(r.fspath if hasattr(r, "fspath") else r) for r in result.outputs.records]
        if lost:  # what the lost subjects finished (their other methods), the rest failed with SLURM's reason
            records += salvage_records(cache_root, {k for k in expected if k[:2] in lost}, since=started)
    for i, rec in enumerate(records):
        why = lost.get((rec.subject, rec.session))
        if why and rec.error == UNFINISHED:
            records[i] = rec.updated(error=f"did not finish: {why}; rerun with the same --work-dir to try it again",
                                     traceback=why)
    if opts.stop_on_first_crash and any(not r.ok for r in records):
        # a failure cached by an earlier run without the flag: stop here, as a fresh run would have
        first = next(r for r in records if not r.ok)
        log.error("stopping on the first crash: sub-%s %s failed at %s: %s", first.subject, first.method,
                  first.failed_step, first.error)
        return EXIT_ERROR
    timings = {"workflow": time.perf_counter() - t0}
    extra = {"Seed": opts.seed, "Threads": threads, "Worker": opts.worker}
    t1 = time.perf_counter()
    datasets = input_datasets(opts)
    template = bids_out.write_atlas(out, atlas.space, atlas.image, labels=atlas.labels, label_table=atlas.label_table,
                                description=atlas.description, datasets=datasets,
                                sources=atlas.sources)
    for rec in records:
        bids_out.write_subject_derivatives(rec, out, space=atlas.space, atlas=atlas.image, extra=extra, datasets=datasets,
                                       spatial_reference=template["T1w"], label_table=atlas.label_table)
    bids_out.write_dataset_description(out, source=opts.bids_dir, links=datasets)
    bids_out.write_bidsignore(out)
    timings["derivatives"], t1 = time.perf_counter() - t1, time.perf_counter()
    ok = {(r.subject, r.session) for r in records if r.ok}
    reused = {kind: sum(getattr(e, attr) is not None and (e.id, e.session) in ok for e in cohort)
              for kind, attr in (("brain_mask", "brain_mask"), ("affine", "anat_xfm"))}
    # the methods text first: every report shows it
    write_citation(out, atlas, opts, records, reused=reused if opts.derivatives and opts.preprocess else None)
    timings["citation"], t1 = time.perf_counter() - t1, time.perf_counter()
    write_reports(out, atlas, opts, jobs=nprocs if opts.worker == "cf" else usable_cpus(), records=records)
    timings["reports"] = time.perf_counter() - t1
    log.info("after the workflow: derivatives %.1f s, reports %.1f s, methods text %.1f s",
             timings["derivatives"], timings["reports"], timings["citation"])
    bids_out.write_json(out / "logs" / "participant_timings.json",
                    {"seconds": timings, "subjects": len(cohort), "methods": list(opts.methods),
                     "worker": opts.worker, "nprocs": nprocs, "threads_per_job": threads})
    failed = [r for r in records if not r.ok]
    for r in failed:
        log.error("sub-%s%s %s failed at %s: %s", r.subject, f" ses-{r.session}" if r.session else "",
                  r.method, r.failed_step, r.error)
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
    :mod:`hdar_pipeline.pipeline.isolation`) ended with a failed record that Pydra cached like any result: its folder
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
                rec = SubjectRecord.read(path)
            except RecordError:
                continue
            if rec.transient:
                killed.append((path.parent, rec))
    if killed:
        import shutil

        for folder, rec in killed:
            log.info("running sub-%s %s again: its process was killed in an earlier run (%s)", rec.subject,
                     rec.method or rec.failed_step, rec.error)
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
                    ) -> list[SubjectRecord]:
    """The records of a run whose workflow stopped: each subject x method's evaluation record where it has one,
    else a failed record that says why (:data:`UNFINISHED`, and the workflow's error in ``traceback``).

    A record counts when it was written during this run, or, for a job this run found in the cache (written
    earlier), when it is this run's job: ``jobs`` gives, per subject x session x method, the T1w, atlas, preset
    and seed this run registers with, and a cached record must match them all (the seed as its
    ``registration.json`` records it). Without ``jobs`` only this run's records count."""
    found: dict[tuple[str, str, str], SubjectRecord] = {}
    registered: set[tuple[str, str, str]] = set()
    for name in ("register_record.json", "evaluate_record.json"):  # an evaluation record wins
        for path in cache_root.glob(f"*/{name}"):
            try:
                recent = path.stat().st_mtime >= since - 1
                rec = SubjectRecord.read(path)
            except (OSError, RecordError):
                continue
            key = rec.key
            if key not in expected:
                continue
            if not recent and not (rec.ok and _same_job(rec, (jobs or {}).get(key))):
                continue
            if name == "evaluate_record.json" or not rec.ok:
                found[key] = rec
            else:
                registered.add(key)
    records = []
    for key in sorted(expected):
        rec = found.get(key)
        if rec is None:
            rec = SubjectRecord(*key).failed("evaluate" if key in registered else "register", UNFINISHED,
                                             traceback=reason[:4000])
        records.append(rec)
    return records


def _same_job(rec: SubjectRecord, job: dict[str, Any] | None) -> bool:
    """Whether a cached record is the job described by ``job`` (see :func:`salvage_records`)."""
    if not job:
        return False

    def same_path(a: Any, b: Any) -> bool:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()

    if not (same_path(rec.t1w, job.get("t1w")) and same_path(rec.atlas, job.get("atlas"))):
        return False
    if job.get("preset") and rec.preset != job["preset"]:
        return False
    try:
        registration = json.loads(Path(rec.registration_json).read_text())
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
                rec = SubjectRecord.read(str(getattr(task, name)))
                subject, session = rec.subject, rec.session
            except (AttributeError, TypeError, RecordError):
                continue
        if subject:
            out[(subject, session)] = message
    return out


# ----------------------------------------------------------------------------- reports and methods


def _report_entries(out: Path, subject: str, session: str, space: str, affine: str | None = None):
    """The subject's :class:`~hdar_pipeline.reports.subject_report.ReportEntry` list from its ``*_metrics.json``; ``affine``: its
    image on the atlas grid after the affine alone (the before/after view), when known."""
    from hdar_pipeline.reports.subject_report import ReportEntry

    entries = []
    folder = bids_out.subject_dir(out, subject, session)
    prefix = bids_out.entity_prefix(subject, session)
    for path in sorted(folder.glob(f"{prefix}_space-{space}_desc-*_metrics.json")):
        rec = json.loads(path.read_text())
        method = rec["method"]
        warped = bids_out.derivative_path(out, subject, session, space=space, desc=method, suffix="T1w",
                                      extension=".nii.gz")
        xfm = bids_out.derivative_path(out, subject, session, from_="T1w", to=space, mode="image", desc=method,
                                   suffix="xfm", extension=".h5")
        jacobian = bids_out.derivative_path(out, subject, session, space=space, desc=method, suffix="jacobian",
                                        extension=".nii.gz")
        metrics = dict(rec.get("metrics") or {})
        if rec.get("folded_percent") is not None:
            metrics.setdefault("folded_percent", rec["folded_percent"])
        ok = rec.get("status") == "ok"
        entries.append(ReportEntry(method=method, status=rec.get("status", ""), error=rec.get("error", ""),
                                   failed_step=rec.get("failed_step") or "", preset=rec.get("preset", ""),
                                   warped=warped if warped.is_file() else None,
                                   affine=affine if ok and affine else None,
                                   transform=xfm if xfm.is_file() else None,
                                   jacobian=jacobian if jacobian.is_file() else None, metrics=metrics,
                                   runtime_s=rec.get("runtime_s"), peak_memory_mb=rec.get("peak_memory_mb"),
                                   device=rec.get("device", "")))
    return entries


def _affine_images(opts: AppOptions, records: Sequence[SubjectRecord] | None) -> dict[tuple[str, str], str]:
    """Per subject (x session), its image on the atlas grid after the affine alone (the preprocessing's
    ``preproc_T1w``, which register records carry as ``preproc``): from ``records``, or without them
    (``--reports-only``) from the newest register records in the work dir's cache."""
    found: dict[tuple[str, str], str] = {}
    if records is None:
        cache_root = Path(opts.work_dir).resolve() / "pydra"
        candidates = []
        for path in cache_root.glob("*/register_record.json") if cache_root.is_dir() else []:
            try:
                candidates.append((path.stat().st_mtime, SubjectRecord.read(path)))
            except (OSError, RecordError):
                continue
        records = [rec for _, rec in sorted(candidates, key=lambda c: c[0])]  # the newest last: it wins
    for rec in records:
        if rec.ok and rec.preproc and Path(rec.preproc).is_file():
            found[(rec.subject, rec.session)] = str(rec.preproc)
    return found


def _native_t1w(out: Path, opts: AppOptions, subject: str, session: str, space: str) -> tuple[Path | None, Path | None]:
    """The subject's T1w as given (the ``Sources`` of its metrics, in BIDS_DIR; else the ``desc-preproc_T1w``) and
    its ``desc-brain_mask``, for the brain-mask view; ``(None, None)`` without a mask (``--no-preprocess``)."""
    mask = bids_out.derivative_path(out, subject, session, desc="brain", suffix="mask", extension=".nii.gz")
    if not mask.is_file():
        return None, None
    datasets = input_datasets(opts)
    folder = bids_out.subject_dir(out, subject, session)
    for path in sorted(folder.glob(f"{bids_out.entity_prefix(subject, session)}_space-{space}_desc-*_metrics.json")):
        for uri in json.loads(path.read_text()).get("Sources") or []:
            name, _, rel = str(uri).removeprefix("bids:").partition(":")
            if str(uri).startswith("bids:") and name in datasets and (datasets[name] / rel).is_file():
                return datasets[name] / rel, mask
    preproc = bids_out.derivative_path(out, subject, session, desc="preproc", suffix="T1w", extension=".nii.gz")
    return (preproc if preproc.is_file() else None), mask


def _run_provenance(out: Path) -> dict[str, Any]:
    """What ran, for the reports: the newest ``logs/*_command.json`` of a participant run that registered (not
    ``--reports-only``), else the newest of any run; ``{}`` when there is none."""
    runs = []
    for path in (out / "logs").glob("*_command.json"):
        try:
            runs.append((path.stat().st_mtime, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    runs.sort(key=lambda r: r[0])
    registered = [r for _, r in runs if (r.get("options") or {}).get("analysis_level") == "participant"
                  and not (r.get("options") or {}).get("reports_only")]
    return (registered or [r for _, r in runs] or [{}])[-1]


def write_reports(out: Path, atlas: Atlas, opts: AppOptions, *, jobs: int = 1,
                  records: Sequence[SubjectRecord] | None = None) -> list[Path]:
    """One HTML report per subject (x session) found in the derivatives: ``OUTPUT/sub-<l>[_ses-<s>].html``, its
    SVG reportlets in ``OUTPUT/sub-<l>/figures/`` (:func:`hdar_pipeline.reports.subject_report.write_subject_report`).

    Each report also shows the subject's brain mask on its T1w, the before (affine only)/after view when the
    preprocessing's atlas-grid image is known (from ``records``, or the work dir's cache), the command line of
    the run (``logs/*_command.json``) and the methods text (``logs/CITATION.md``, written first).

    A report whose inputs (the subject's ``*_metrics.json``, the atlas, the affine-only image, the command line
    and the methods text) are unchanged since it was written is kept, so a cached rerun does not redraw every
    figure. The others are drawn in up to ``jobs`` processes side by side (a report of one method on a 1 mm atlas
    takes about 1.2 s).
    """
    import hashlib

    keys = set()
    for path in out.glob("sub-*/**/sub-*_metrics.json"):
        rec = json.loads(path.read_text())
        if bids_out.record_space(rec) not in (None, atlas.space):
            continue
        if opts.participant_label and rec["subject"] not in {bids.check_label(p) for p in opts.participant_label}:
            continue
        keys.add((rec["subject"], rec.get("session") or ""))
    affine = _affine_images(opts, records)
    provenance = _run_provenance(out)
    methods_file = out / "logs" / "CITATION.md"
    written, todo = [], []
    for subject, session in sorted(keys):
        html = out / f"{bids_out.entity_prefix(subject, session)}.html"
        folder = bids_out.subject_dir(out, subject, session)
        t1w, mask = _native_t1w(out, opts, subject, session, atlas.space)
        digest = hashlib.sha256(__version__.encode())
        for part in (atlas.image, affine.get((subject, session)), t1w, mask, provenance.get("command")):
            digest.update(f"{part}\n".encode())
        if methods_file.is_file():
            digest.update(methods_file.read_bytes())
        for p in sorted(folder.glob(f"{bids_out.entity_prefix(subject, session)}_space-{atlas.space}_*metrics.json")):
            digest.update(p.read_bytes())
        stamp = f"<!-- hdar-pipeline report inputs {digest.hexdigest()} -->"
        if html.is_file() and stamp in html.read_text(errors="replace"):
            written.append(html)
            continue
        todo.append(dict(html=html, stamp=stamp, subject=subject, session=session, atlas=atlas.image,
                         atlas_labels=atlas.labels,
                         entries=_report_entries(out, subject, session, atlas.space, affine.get((subject, session))),
                         atlas_name=atlas.space, figures_dir=out / f"sub-{subject}" / "figures", t1w=t1w,
                         brain_mask=mask, provenance=provenance,
                         methods_file=methods_file if methods_file.is_file() else None))
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

    from hdar_pipeline.reports.subject_report import write_subject_report

    job = dict(job)
    html, stamp = job.pop("html"), job.pop("stamp")
    try:
        write_subject_report(html, **job)
    except Exception as exc:  # noqa: BLE001 - reported by the caller, the other reports go on
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    with open(html, "a") as fh:
        fh.write(f"\n{stamp}\n")
    return None


def write_citation(out: Path, atlas: Atlas, opts: AppOptions, records: Sequence[SubjectRecord], *,
                   reused: Mapping[str, int] | None = None) -> list[Path]:
    """The methods paragraph of what ran (``OUTPUT/logs/CITATION.md``, ``.html`` and ``.bib``).

    Parameters
    ----------
    out : Path
        OUTPUT_DIR.
    atlas : Atlas
        The run's atlas (its description).
    opts : AppOptions
        The options.
    records : sequence of SubjectRecord
        The subject x method records. Without any (``--boilerplate-only``) the text describes what the options
        would run: each method's parameters from its preset (:func:`hdar_pipeline.methods.get_method`), no
        number of images.
    reused : mapping, optional
        With ``--derivatives``: for how many of the subjects registered an sMRIPrep/fMRIPrep brain mask
        (``brain_mask``) and affine (``affine``) were reused; without it the text says "where found".

    Returns
    -------
    list of Path
        ``[CITATION.md, CITATION.html, CITATION.bib]``, or ``[]`` when the text failed (logged).

    Notes
    -----
    The devices named are those the records say each method ran on, not the requested ``--device`` (``auto``
    is a request); without records the text says how ``auto`` chooses.
    """
    from hdar_pipeline.reports.methods_text import write_methods

    parameters: dict[str, dict] = {}
    presets: dict[str, str] = {}
    weights: dict[str, Any] = {}
    versions: dict[str, str] = {}
    devices: dict[str, set[str]] = {}
    for rec in records:
        if rec.ok and rec.device:
            devices.setdefault(rec.method, set()).add(str(rec.device))
        reg = {}
        if rec.registration_json and Path(rec.registration_json).is_file():
            reg = json.loads(Path(rec.registration_json).read_text())
        params = reg.get("parameters") or {}
        if params and rec.method not in parameters:
            parameters[rec.method] = params
            presets[rec.method] = rec.preset or reg.get("preset") or ""
        versions = versions or reg.get("versions") or {}
        sha = reg.get("weights_sha256")
        if sha and rec.method == "hdar":  # the paragraph's `weights` are HDAR's
            weights["sha256"] = sha
        elif sha and rec.method in parameters:  # VoxelMorph's: its own sentence names them from its parameters
            parameters[rec.method].setdefault("weights_sha256", sha)
    if not records:  # --boilerplate-only: what these options would run
        parameters, presets = _planned_parameters(opts)
    subjects = {(r.subject, r.session) for r in records if r.ok}
    preprocessing = {"n4": opts.n4, "brain_extraction": "atlas-based", "skull_stripped": opts.skull_stripped,
                     "affine": True} if opts.preprocess else {"affine": opts.affine}
    preprocessing["affine_method"] = opts.affine_method
    if opts.preprocess and opts.derivatives:
        preprocessing["reused_derivatives"] = {"brain_mask": (reused or {}).get("brain_mask"),
                                               "affine": (reused or {}).get("affine"), "space": atlas.space,
                                               "of": len(subjects) if reused is not None else None}
        if reused is not None and subjects and reused.get("brain_mask", 0) >= len(subjects):
            del preprocessing["brain_extraction"], preprocessing["skull_stripped"]  # no subject's brain extracted
    kwargs = dict(methods=[m for m in opts.methods if m in {r.method for r in records}] or opts.methods,
                  parameters=parameters, presets=presets, preprocessing=preprocessing,
                  atlas_description=atlas.description, n_subjects=len(subjects) if records else None, seed=opts.seed,
                  weights=weights or None, engine="pydra",
                  devices={m: sorted(d) for m, d in devices.items()} or None)
    if versions:
        kwargs["versions"] = {**versions, "hdar-pipeline": __version__}
    try:
        return write_methods(out / "logs", **kwargs)
    except Exception as exc:  # noqa: BLE001
        log.error("methods paragraph failed: %s", exc, exc_info=True)
        return []


def method_presets(opts: AppOptions) -> dict[str, str]:
    """The preset of each method that has app options for one (``--<method>-preset``)."""
    from hdar_pipeline.methods.registry import specs_with_presets

    return {s.name: getattr(opts, f"{s.name}_preset") for s in specs_with_presets()}


def _planned_parameters(opts: AppOptions) -> tuple[dict[str, dict], dict[str, str]]:
    """Each method's parameters and preset as these options would run it (nothing is run)."""
    from hdar_pipeline.methods import get_method

    parameters, presets = {}, {}
    for m in opts.methods:
        preset = method_presets(opts).get(m)
        try:
            parameters[m] = get_method(m, preset=preset, seed=opts.seed, device=opts.device).parameters
        except Exception as exc:  # noqa: BLE001 - the text then leaves the parameters out
            log.warning("%s: parameters not described (%s)", m, exc)
            continue
        presets[m] = preset or ""
    return parameters, presets


def run_boilerplate(opts: AppOptions) -> int:
    """``--boilerplate-only``: write the methods text (``OUTPUT/logs/CITATION.md``, ``.html`` and ``.bib``) that
    these options would give, and nothing else: no work folder, no log, no registration (the atlas is described,
    not prepared)."""
    atlas = resolve_atlas(opts, write=False)
    written = write_citation(Path(opts.output_dir), atlas, opts, [])
    for path in written:
        print(f"hdar-pipeline: methods text in {path}")
    return EXIT_OK if written else EXIT_ERROR


def run_reports_only(opts: AppOptions) -> int:
    atlas = resolve_atlas(opts)
    reports = write_reports(Path(opts.output_dir), atlas, opts)
    print(f"hdar-pipeline: {len(reports)} report(s) in {opts.output_dir}")
    return EXIT_OK if reports else EXIT_ERROR


# ----------------------------------------------------------------------------- group level


def run_group(opts: AppOptions) -> int:
    """Pool the participant-level metrics of the output dataset into the group tables, statistics, figures
    and ``group/group.html``.

    Writes in ``OUTPUT_DIR/group``: ``group.tsv`` and ``group_labels.tsv``, each with its JSON data dictionary
    (:func:`hdar_pipeline.pipeline.subject_steps.collect_records`: ``participant_id``, BIDS_DIR's ``participants.tsv`` columns,
    QC flags with ``--qc-folding-threshold``), the statistics tables (``.tsv``) and figures with ``--reference``
    as the paired tests' reference, and ``group.html`` linking the subject reports, the figures, the tables and
    ``logs/CITATION.md``. CSVs an earlier version wrote there are removed.

    Raises
    ------
    BIDSError
        No participant-level results, or ``--reference`` names a method that has none.
    """
    from hdar_pipeline.pipeline.subject_steps import collect_records, group_statistics_files
    from hdar_pipeline.evaluation.group_tables import read_group_table, write_group_html
    from hdar_pipeline.evaluation.stats import STATS_OUTPUTS

    out = Path(opts.output_dir)
    records = bids_out.read_subject_metrics(out, participants=opts.participant_label or None)
    if not records:
        raise bids.BIDSError(f"{out}: no participant-level results (*_metrics.json); run the participant level first")
    spaces = {bids_out.record_space(r) for r in records}
    if len(spaces) > 1:
        space = opts.atlas_space or sorted(s for s in spaces if s)[0]
        log.warning("results in several atlas spaces (%s); pooling space-%s (set --atlas-space)",
                    ", ".join(sorted(map(str, spaces))), space)
        records = [r for r in records if bids_out.record_space(r) == space]
    methods = sorted({r["method"] for r in records})
    reference = opts.reference or ("hdar" if "hdar" in methods else methods[0])
    if reference not in methods:
        raise bids.BIDSError(f"--reference {reference}: no results of that method in {out} "
                             f"(methods with results: {', '.join(methods)})")
    group_dir = out / "group"
    group_dir.mkdir(parents=True, exist_ok=True)
    for legacy in ["group.csv", "group_labels.csv", *(n for n in STATS_OUTPUTS if n.endswith(".csv"))]:
        if (group_dir / legacy).is_file():  # one format: an earlier version's CSVs would contradict the TSVs
            (group_dir / legacy).unlink()
    paths = collect_records([bids_out.metrics_record(r) for r in records], group_dir, participants=opts.bids_dir,
                            qc_folding_threshold=opts.qc_folding_threshold)
    files, notes = group_statistics_files(paths["labels"], group_dir, reference=reference, figures=True,
                                          group=paths["group"])
    for note in notes:
        log.warning("group statistics: %s", note)
    group = read_group_table(paths["group"])
    reports = {}
    for pid, ses in group[["participant_id", "session_id"]].drop_duplicates().itertuples(index=False):
        ses = ses if isinstance(ses, str) else ""
        html = out / f"{bids_out.entity_prefix(pid[4:], ses[4:])}.html"
        if html.is_file():
            reports[(pid, ses)] = html
        else:
            log.warning("%s: no subject report (run the participant level, or --reports-only)", html.name)
    tables = [paths[k] for k in ("group", "group_json", "labels", "labels_json")]
    page = write_group_html(group_dir / "group.html", group, reports=reports, files=[*tables, *files],
                            methods_text=out / "logs" / "CITATION.md", reference=reference,
                            warnings=list(paths["warnings"]), notes=notes,
                            folding_threshold=opts.qc_folding_threshold)
    bids_out.write_dataset_description(out, source=opts.bids_dir)
    n_failed = sum(r.get("status") != "ok" for r in records)
    flagged = int(group["qc_folding"].sum() + group["qc_dice_outlier"].sum())
    print(f"hdar-pipeline group: {len(records)} subject x method rows ({n_failed} failed, {flagged} QC flag(s)); "
          f"reference {reference}")
    print(f"group table: {paths['group']}")
    print(f"per-label table: {paths['labels']}")
    print(f"statistics and figures: {group_dir} ({len(files)} files)")
    print(f"group report: {page}")
    return EXIT_OK


#: What the app writes in OUTPUT_DIR (top-level names and patterns); an input there is refused up front.
APP_OUTPUTS = ("dataset_description.json", "sub-*", "group", "logs")


def check_inputs(opts: AppOptions) -> InputGuard:
    """Every check that can run before the work, before anything is written (see :mod:`hdar_pipeline.core.input_guard`).

    The inputs (BIDS_DIR, ``--labels-dir``, ``--derivatives``, ``--atlas``, ``--atlas-labels``,
    ``--bids-filter-file``) are protected: OUTPUT_DIR and ``--work-dir`` may not be or lie inside an input
    dataset, nor hold an input where the app writes. A user atlas must load as a 3-D image (and its labels as a
    label map on its grid); the filter file must parse; participant and session labels must be BIDS labels.
    With ``--boilerplate-only`` the work folder is checked but not created.

    Raises
    ------
    InputError, BIDSError, ImageError
        With one line naming the argument or file and the problem.
    """
    from hdar_pipeline.core.images import check_labels_match, load_image

    guard = InputGuard({"--atlas": opts.atlas, "--atlas-labels": opts.atlas_labels,
                        "--bids-filter-file": opts.bids_filter_file},
                       {"BIDS_DIR": opts.bids_dir, "--labels-dir": opts.labels_dir,
                        **{"--derivatives" + (f" ({i + 1})" if len(opts.derivatives) > 1 else ""): d
                           for i, d in enumerate(opts.derivatives)}})
    out = guard.output_folder(opts.output_dir, "OUTPUT_DIR", writes=APP_OUTPUTS, create=False)
    work = guard.output_folder(opts.work_dir, "-w/--work-dir", create=False)
    for label in opts.participant_label:
        bids.check_label(label)
    for label in opts.session_label:
        bids.check_label(label, "session")
    if opts.analysis_level == "participant" and not opts.reports_only:
        bids.load_bids_filter(opts.bids_filter_file)
        for folder in opts.derivatives:
            if not (Path(folder) / "dataset_description.json").is_file():
                raise InputError("--derivatives", folder, "is not a BIDS derivatives dataset (no "
                                 "dataset_description.json)")
        if opts.atlas_labels is not None and opts.atlas is None and not opts.atlas_participant:
            raise InputError("--atlas-labels", opts.atlas_labels, "needs --atlas (the image the labels belong to)")
        if opts.atlas is not None:
            atlas = load_image(opts.atlas)
            if opts.atlas_labels is not None:
                check_labels_match(atlas, load_image(opts.atlas_labels, labels=True), image_source=opts.atlas,
                                   labels_source=opts.atlas_labels)
    # last, once everything else passed: create the folders and prove them writable
    opts.output_dir = guard.output_folder(out, "OUTPUT_DIR", writes=APP_OUTPUTS)
    opts.work_dir = work if opts.boilerplate_only else guard.output_folder(work, "-w/--work-dir")
    return guard


def run(opts: AppOptions, argv: Sequence[str] | None = None) -> int:
    """Run the app at ``opts.analysis_level``; returns the exit code.

    Every input is checked (:func:`check_inputs`) before anything is written, and verified unchanged at
    the end. The command line (``argv``, the arguments without the program name; default ``sys.argv[1:]``)
    heads the log file, and with the resolved options goes to ``logs/<log name>_command.json``
    (:func:`save_command`).
    """
    guard = check_inputs(opts)
    if opts.boilerplate_only:  # the methods text only: no log, no work folder
        code = run_boilerplate(opts)
        guard.verify()
        return code
    logfile = setup_logging(opts.output_dir, opts.analysis_level, opts.verbose, argv=argv)
    command_json = save_command(logfile, opts, argv)
    log.info("hdar-pipeline %s, %s level; log %s; command and options in %s", __version__, opts.analysis_level,
             logfile, command_json.name)
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
