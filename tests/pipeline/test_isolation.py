"""hdar_pipeline.pipeline.isolation: a job in a child process; its result, its exception, or the signal that killed it."""

from __future__ import annotations

import json
import os
import signal

import pytest

from hdar_pipeline.pipeline.subject_steps import register_subject
from hdar_pipeline.pipeline.isolation import PID_FILE, WorkerDied, describe_exit, run_isolated

import isolation_jobs as jobs


def test_result_and_arguments_travel():
    assert run_isolated(jobs.add, 2, 3, times=4) == 20


def test_the_callers_environment_holds_in_the_child(monkeypatch):
    monkeypatch.setenv("HDAR_ISOLATION_PROBE", "set after the server started")
    assert run_isolated(jobs.environment, "HDAR_ISOLATION_PROBE") == "set after the server started"


def test_an_exception_is_raised_here_with_the_childs_traceback():
    with pytest.raises(ValueError, match="bad subject") as info:
        run_isolated(jobs.fail, "bad subject")
    assert "isolation_jobs.py" in info.value.child_traceback and "raise ValueError" in info.value.child_traceback
    with pytest.raises(RuntimeError, match="Unpicklable: cannot travel"):
        run_isolated(jobs.fail_unpicklably)


@pytest.mark.parametrize("sig, words", [(signal.SIGKILL, "killed by SIGKILL (the out-of-memory killer"),
                                        (signal.SIGSEGV, "killed by SIGSEGV")])
def test_a_killed_child_is_a_worker_died_error_naming_the_signal(tmp_path, sig, words):
    with pytest.raises(WorkerDied, match=r"sub-01 demons: the worker process was") as info:
        run_isolated(jobs.die, int(sig), job_dir=tmp_path, label="sub-01 demons")
    assert words in str(info.value)
    assert not (tmp_path / PID_FILE).exists()  # the pid file goes with the job
    with pytest.raises(WorkerDied, match="exited with status 3 without a result"):
        run_isolated(jobs.exit_now, 3)


def test_describe_exit():
    assert describe_exit(-9).startswith("the worker process was killed by SIGKILL")
    assert describe_exit(1) == "the worker process exited with status 1 without a result"
    assert describe_exit(None) == "the worker process did not end"


def test_the_pid_file_names_the_running_job(tmp_path):
    text, pid = run_isolated(jobs.pid_file_and_pid, str(tmp_path / PID_FILE), job_dir=tmp_path, label="sub-02 syn")
    assert json.loads(text) == {"pid": pid, "label": "sub-02 syn", "waiting": os.getpid()} and pid != os.getpid()
    assert not (tmp_path / PID_FILE).exists()


def test_a_killed_registration_is_a_transient_failure_record(tmp_path, monkeypatch):
    """register_subject isolates the registration: a kill fails that record, marked transient, and the
    process that asked goes on."""
    import threading
    import time

    from conftest import make_brain_phantom
    from hdar_pipeline.core.images import save_image

    ph = make_brain_phantom(shape=(32, 32, 32))
    atlas = save_image(ph.image, tmp_path / "atlas.nii.gz")
    t1w = save_image(ph.image, tmp_path / "t1w.nii.gz")
    out = tmp_path / "job"
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            try:
                os.kill(json.loads((out / PID_FILE).read_text())["pid"], signal.SIGKILL)
                return
            except (OSError, ValueError, KeyError):
                time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        rec = register_subject("01", t1w, atlas, out, method="demons", seed=1, threads=1)
    finally:
        stop.set()
        thread.join()
    assert rec.status == "error" and rec.failed_step == "register" and rec.transient is True
    assert "WorkerDied: sub-01 demons: the worker process was killed by SIGKILL" in rec.error
    assert json.loads((out / "register_record.json").read_text())["error"] == rec.error
    # the same job again, not killed: it finishes
    again = register_subject("01", t1w, atlas, out, method="demons", seed=1, threads=1)
    assert again.ok and not again.transient


def test_an_image_error_travels_as_itself():
    """ImageError (two constructor arguments) comes back with its type, file and problem."""
    from hdar_pipeline.core.images import ImageError

    with pytest.raises(ImageError) as info:
        run_isolated(jobs.image_error, "/data/sub-04_T1w.nii.gz", "cannot be read")
    assert info.value.source == "/data/sub-04_T1w.nii.gz" and info.value.problem == "cannot be read"
    assert str(info.value) == "/data/sub-04_T1w.nii.gz: cannot be read"


_FORKED_WORKER = r"""
import json, multiprocessing, os, sys
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, {tests!r})
from multiprocessing import forkserver
from hdar_pipeline.pipeline.isolation import run_isolated, start_fork_server
import isolation_jobs as jobs

def in_worker(_):
    # a pool worker forked from this process, as Pydra's cf worker forks them
    return run_isolated(jobs.parent_pid), run_isolated(jobs.modules_loaded, ["json", "colorsys"])

if __name__ == "__main__":
    assert start_fork_server(modules=["colorsys"]) is True
    assert start_fork_server(modules=["colorsys"]) is False  # one server
    server = forkserver._forkserver._forkserver_pid
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        got = list(pool.map(in_worker, range(2)))
    print(json.dumps({{"server": server, "workers": got, "here": run_isolated(jobs.parent_pid)}}))
"""


def test_forked_workers_use_the_fork_server_started_before_them(tmp_path):
    """start_fork_server: the server started first (with the modules it imports) serves the jobs of processes
    forked afterwards (a worker pool), and this process's own, instead of each worker starting one."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "forked.py"
    script.write_text(_FORKED_WORKER.format(tests=str(Path(__file__).resolve().parents[1])))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for parent, loaded in result["workers"]:
        assert parent == result["server"]
        assert loaded == {"json": True, "colorsys": True}  # imported by the server, inherited by the job
    assert result["here"] == result["server"]
