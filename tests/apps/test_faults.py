"""Issue 14, under faults: a BIDS App run where one subject's registration is killed (SIGKILL, as the
out-of-memory killer does) still writes the others, records that subject as failed with the reason, and a
rerun with the same work dir finishes it.

Each registration runs in a child process of its own (:mod:`hdar_pipeline.pipeline.isolation`), which writes its pid
and label into its job folder; a watcher thread here kills the child registering the victim from outside,
as the kernel would.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")
pytest.importorskip("bids")

from hdar_pipeline.apps.bids_app_cli import bids_app_main  # noqa: E402
from hdar_pipeline.pipeline.isolation import PID_FILE  # noqa: E402

from test_bids_app import MARGIN, before_dice, make_bids_dataset  # noqa: E402
from test_input_guard import run_cli  # noqa: E402


class Killer:
    """SIGKILL every job process whose label names ``victim`` (every time, or only the first time), from a
    thread that watches ``root`` for the jobs' pid files; ``pool_worker=True`` kills instead the process of
    the worker pool that runs it (the pid file's ``waiting``: the jobs' fork server is the App's), as if the evaluation beside it had run out
    of memory; ``kill`` replaces the SIGKILL (it gets the job process's pid). An error in the watcher is
    raised when the ``with`` block ends."""

    def __init__(self, root: Path, victim: str, *, once: bool, pool_worker: bool = False,
                 kill: Callable[[int], None] | None = None) -> None:
        self.root, self.victim, self.once, self.pool_worker = root, victim, once, pool_worker
        self._kill = kill or self._sigkill
        self.killed: list[int] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "Killer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():
                self._look()
                time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported by __exit__
            self._error = exc

    def _look(self) -> None:
        try:
            paths = list(self.root.rglob(PID_FILE))
        except OSError:  # a job folder went away during the walk: look again next time
            return
        for path in paths:
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if self.victim in job.get("label", "") and job["pid"] not in self.killed:
                if self.once and self.killed:
                    continue
                try:
                    if self.pool_worker:
                        os.kill(int(job["waiting"]), signal.SIGKILL)
                    else:
                        self._kill(int(job["pid"]))
                except (ProcessLookupError, FileNotFoundError):
                    continue
                self.killed.append(int(job["pid"]))

    def _sigkill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)


def statuses(out: Path) -> dict[str, dict]:
    return {p.name.split("_")[0]: json.loads(p.read_text())
            for p in sorted(out.glob("sub-*/anat/*_desc-demons_metrics.json"))}


def argv(root: Path, bids_dir: Path, labels_dir: Path, nprocs: int) -> list:
    return [bids_dir, root / "out", "participant", "--atlas-participant", "01", "--labels-dir", labels_dir,
            "--methods", "demons", "--work-dir", root / "work", "--nprocs", str(nprocs), "--omp-nthreads", "1",
            "--no-preprocess", "--no-progress", "--skip-bids-validation"]


def test_a_killed_registration_fails_that_subject_only_and_a_rerun_finishes_it(tmp_path, capsys):
    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    with Killer(tmp_path / "work", "sub-03", once=False) as killer:
        code, err = run_cli(bids_app_main, argv(tmp_path, bids_dir, labels_dir, 2), capsys)
    assert killer.killed, "no registration was killed: the test did not test anything"
    assert code == 3 and "Traceback" not in err  # 3: failed subjects (sub-04's T1w is corrupt, on purpose)
    rec = statuses(tmp_path / "out")
    assert set(rec) == {"sub-02", "sub-03", "sub-04"}  # every subject has its row, none is lost
    assert rec["sub-02"]["status"] == "ok"
    assert rec["sub-02"]["metrics"]["mean_dice"] > before_dice(labels_dir, "02") + MARGIN
    assert rec["sub-03"]["status"] == "error" and rec["sub-03"]["failed_step"] == "register"
    assert "killed by SIGKILL" in rec["sub-03"]["error"]
    assert rec["sub-04"]["status"] == "error" and "cannot be read" in rec["sub-04"]["error"]
    # the fault goes away (memory freed): the rerun with the same work dir finishes sub-03 and keeps sub-02
    code, err = run_cli(bids_app_main, argv(tmp_path, bids_dir, labels_dir, 2), capsys)
    assert code == 3 and "Traceback" not in err
    again = statuses(tmp_path / "out")
    assert again["sub-02"]["status"] == "ok"
    assert again["sub-02"]["metrics"]["mean_dice"] == rec["sub-02"]["metrics"]["mean_dice"]  # from the cache
    assert again["sub-03"]["status"] == "ok"
    assert again["sub-03"]["metrics"]["mean_dice"] > before_dice(labels_dir, "03") + MARGIN
    assert again["sub-04"]["status"] == "error"


def test_a_killed_pool_worker_has_its_jobs_run_again_and_the_cohort_completes(tmp_path, capsys):
    """A worker of the pool itself lost once (not a registration's own process): the run resubmits the
    unfinished jobs and every subject finishes."""
    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    with Killer(tmp_path / "work", "sub-03", once=True, pool_worker=True) as killer:
        code, err = run_cli(bids_app_main, argv(tmp_path, bids_dir, labels_dir, 2), capsys)
    assert killer.killed, "no worker was killed: the test did not test anything"
    assert code == 3 and "Traceback" not in err  # 3: sub-04's T1w is corrupt, on purpose
    rec = statuses(tmp_path / "out")
    assert rec["sub-02"]["status"] == rec["sub-03"]["status"] == "ok"
    assert rec["sub-03"]["metrics"]["mean_dice"] > before_dice(labels_dir, "03") + MARGIN
    assert rec["sub-04"]["status"] == "error" and "cannot be read" in rec["sub-04"]["error"]


def test_two_runs_never_share_a_work_dir(tmp_path, capsys):
    import fcntl

    bids_dir, labels_dir = make_bids_dataset(tmp_path)
    (tmp_path / "work" / "pydra").mkdir(parents=True)
    with open(tmp_path / "work" / "pydra" / ".hdar-pipeline.lock", "w") as held:  # another run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run_cli(bids_app_main, argv(tmp_path, bids_dir, labels_dir, 1), capsys)
    assert code == 2 and "Traceback" not in err
    assert "in use by another hdar-pipeline run" in err.strip().splitlines()[-1]
    assert not list((tmp_path / "out").glob("sub-*"))


def test_a_run_keeps_its_work_dir_lock_so_a_second_run_is_refused(tmp_path):
    """The clean-up of stale Pydra locks at the start of a run must not delete the run's own lock file: a second
    run would then lock a new file and share the work dir."""
    from hdar_pipeline.bids_io import inputs as bids
    from hdar_pipeline.apps.bids_app import WORK_DIR_LOCK, claim_work_dir

    cache = tmp_path / "work" / "pydra"
    cache.mkdir(parents=True)
    (cache / "abc123.lock").write_text("")  # a Pydra job lock left by a killed run
    first = claim_work_dir(cache)
    try:
        assert (cache / WORK_DIR_LOCK).exists() and not (cache / "abc123.lock").exists()
        with pytest.raises(bids.BIDSError, match="in use by another hdar-pipeline run"):
            claim_work_dir(cache)
    finally:
        first.close()
    claim_work_dir(cache).close()  # free again once the first run ends


def test_a_second_run_in_one_process_reads_its_own_dataset_not_a_copy_with_the_same_bytes(tmp_path, capsys):
    """Pydra caches constructed workflows process-wide by the content of their file inputs: a second App run in
    the same process on a byte-identical copy of a dataset got the first run's workflow, and registered the
    first dataset's files (its records named them as Sources). Each run must read its own dataset."""
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        bids_dir, labels_dir = make_bids_dataset(root)
        code, err = run_cli(bids_app_main, [*argv(root, bids_dir, labels_dir, 1), "--participant-label", "02",
                                            "--seed", "1"], capsys)
        assert code == 0, err
    for root in roots:
        rec = statuses(root / "out")["sub-02"]
        assert rec["status"] == "ok", rec
        # a T1w of another dataset would not be written relative to this run's raw dataset (bids:raw:)
        assert rec["Sources"] == ["bids:raw:sub-02/anat/sub-02_T1w.nii.gz"], rec["Sources"]
        links = json.loads((root / "out" / "dataset_description.json").read_text())["DatasetLinks"]
        assert links["raw"] == (root / "rawdata").resolve().as_uri()
        registrations = [json.loads(p.read_text()) for p in (root / "work").rglob("registration.json")]
        assert registrations and all(r["inputs"]["fixed"] == str(root / "rawdata" / "sub-01" / "anat" /
                                                                  "sub-01_T1w.nii.gz") for r in registrations)
