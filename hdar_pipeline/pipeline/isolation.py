"""Run one job in a child process, so that a death outside Python's reach fails that job only.

A registration that the kernel's out-of-memory killer stops, or that anyone ends with ``kill -9``, takes its
process with it; run in the process of a cohort's worker pool, it takes the pool and every job beside it. Run
through :func:`run_isolated` it takes only a child process: the caller gets a :class:`WorkerDied` error naming
the signal, records that job as failed with the reason, and goes on with the others.

Children come from a ``forkserver`` (a clean single-threaded server process that has imported numpy,
nibabel and torch once, so a child starts in milliseconds instead of re-importing them; a plain ``fork`` of a
process whose ITK or OpenMP threads are running is unsafe). The caller's environment at the time of the call
is applied in the child first, so thread counts, seeds and ``NO_ET`` set by the caller hold there.

The BIDS App starts the server first thing (:func:`start_fork_server`, which also imports ANTs and the pipeline's
modules there) and the cohort's worker processes, forked from the App's process, use that server
(:func:`_adopt_inherited_fork_server`): the imports overlap with the App reading the dataset instead of
delaying the first job.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

__all__ = ["WorkerDied", "run_isolated", "start_fork_server", "PID_FILE", "PIPELINE_MODULES"]

T = TypeVar("T")

#: Written into ``job_dir`` while a child runs: ``{"pid": ..., "label": ..., "waiting": ...}`` (which process is this
#: job, and which process waits for its result: the cohort's pool worker; the job's parent is the fork server).
PID_FILE = ".worker.json"

# modules worth importing once in the fork server (pure imports: none of them starts threads)
_PRELOAD = ["numpy", "nibabel", "scipy.ndimage", "torch", "hdar_pipeline.core.images", "hdar_pipeline.core.transforms"]
#: what a cohort's isolated jobs import (preprocessing, every registration method; the evaluation runs in the
#: worker itself): :func:`start_fork_server`
PIPELINE_MODULES = ("ants", "SimpleITK", "hdar_pipeline.pipeline.preprocess", "hdar_pipeline.pipeline.registration",
                    "hdar_pipeline.methods.hdar_method", "hdar_pipeline.hdar.instance", "hdar_pipeline.hdar.weights",
                    "hdar_pipeline.core.inverse")
_context: multiprocessing.context.BaseContext | None = None
_adopted_pid: int | None = None


class WorkerDied(RuntimeError):
    """The child process running a job ended without a result (killed by a signal, or it exited)."""


def _forget_fork_server(server: Any) -> None:
    """Drop this process's handle on ``server`` (its copy of the "alive" pipe only: the process that started the
    server keeps it alive); the next isolated job starts a server of its own."""
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    for name in ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_inherited_fds",
                 "_forkserver_authkey"):
        if hasattr(server, name):
            setattr(server, name, None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a pid reused by another user's process
        return False
    return True


def _ensure_adopted(server: Any, original: Callable[[Any], None]) -> None:
    """``ensure_running`` for a server this process inherited: the server is not this process's child, so
    multiprocessing's own check (``waitpid``) would fail; look at the pid instead, and start a server of this
    process's own only when the inherited one has gone."""
    from multiprocessing import resource_tracker

    pid = server._forkserver_pid
    if pid is not None and pid == _adopted_pid:
        if _alive(pid):
            resource_tracker.ensure_running()
            return
        _forget_fork_server(server)
    original(server)


def _adopt_inherited_fork_server() -> None:
    """In a process forked from one that had started the fork server (the cohort's worker pool, forked from the
    BIDS App's process, which starts the server first thing: :func:`start_fork_server`), use that server: it has
    imported the heavy modules already, while the parent was busy with other things. Children of a fork server
    were never its clients' children anyway (they report their exit through a pipe), so only the liveness check
    differs (:func:`_ensure_adopted`)."""
    global _adopted_pid
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    server._lock = threading.Lock()  # a copy of the parent's lock may have been held at the fork
    _adopted_pid = server._forkserver_pid
    server.ensure_running = functools.partial(_ensure_adopted, server, type(server).ensure_running)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_adopt_inherited_fork_server)


def _get_context() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
        except ValueError:  # no forkserver on this platform (Windows)
            ctx = multiprocessing.get_context("spawn")
        _context = ctx
    return _context


def start_fork_server(modules: Sequence[str] = PIPELINE_MODULES) -> bool:
    """Start the fork server of :func:`run_isolated` now, importing ``modules`` too, and return at once.

    The server imports them in its own process while this one goes on (reading the dataset, building the
    workflow), so the first isolated job starts at once instead of after the imports (torch, ANTs: 4-5 s on a
    2-core machine). Processes forked from this one afterwards (a worker pool) use the same server.

    Returns
    -------
    bool
        Whether a server was started (``False`` where there is no fork server, or one runs already).
    """
    ctx = _get_context()
    if ctx.get_start_method() != "forkserver":
        return False
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None:
        return False
    ctx.set_forkserver_preload(list(dict.fromkeys([*_PRELOAD, *modules])))
    forkserver.ensure_running()
    return True


def _child(conn, env: dict[str, str], fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    os.environ.clear()
    os.environ.update(env)
    try:
        result = (True, fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        text = traceback.format_exc()
        try:
            import pickle

            pickle.loads(pickle.dumps(exc))  # both ways: an exception whose constructor pickle cannot call
            error: BaseException = exc       # fails only when it is rebuilt, on the other side
        except Exception:  # noqa: BLE001 - an exception that cannot travel is sent as its text
            error = RuntimeError(f"{type(exc).__name__}: {exc}")
        error.child_traceback = text  # type: ignore[attr-defined]
        result = (False, error)
    conn.send(result)
    conn.close()


def describe_exit(exitcode: int | None) -> str:
    """Why a child ended without a result, in words (``-9``: killed by SIGKILL, as the out-of-memory killer
    does)."""
    if exitcode is None:
        return "the worker process did not end"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the out-of-memory killer, or kill -9)" if -exitcode == signal.SIGKILL else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process exited with status {exitcode} without a result"


def run_isolated(fn: Callable[..., T], /, *args: Any, job_dir: str | os.PathLike | None = None,
                 label: str = "", **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a child process; its result, or its exception re-raised here.

    Parameters
    ----------
    fn : callable
        Importable by name (a module-level function): it is sent to the child by reference.
    *args, **kwargs
        Picklable arguments; the result must be picklable too.
    job_dir : path, optional
        Folder of the job: the child's pid and ``label`` are written to :data:`PID_FILE` there while it runs.
    label : str
        Names the job in that file.

    Raises
    ------
    WorkerDied
        The child ended without a result (the message names the signal).
    BaseException
        Whatever ``fn`` raised in the child (its traceback text in ``child_traceback``).
    """
    ctx = _get_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, dict(os.environ), fn, args, kwargs), daemon=False)
    proc.start()
    send.close()
    pid_file = None
    if job_dir is not None:
        pid_file = Path(job_dir) / PID_FILE
        try:
            pid_file.parent.mkdir(parents=True, exist_ok=True)
            pid_file.write_text(json.dumps({"pid": proc.pid, "label": label, "waiting": os.getpid()}))
        except OSError:
            pid_file = None
    try:
        try:
            ok, value = receive.recv()
        except EOFError:  # the child ended without sending
            proc.join()
            raise WorkerDied(f"{label + ': ' if label else ''}{describe_exit(proc.exitcode)}") from None
        proc.join()
    except BaseException:
        if proc.is_alive():  # interrupted here (Ctrl-C, a timeout): do not leave the child behind
            proc.kill()
            proc.join()
        raise
    finally:
        receive.close()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    if ok:
        return value
    raise value
