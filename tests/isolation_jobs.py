"""Jobs for tests/pipeline/test_isolation.py: importable by name, as a child process needs them."""

from __future__ import annotations

import os
import signal


def add(a: int, b: int, *, times: int = 1) -> int:
    return (a + b) * times


def environment(name: str) -> str | None:
    return os.environ.get(name)


def fail(message: str) -> None:
    raise ValueError(message)


def die(sig: int = int(signal.SIGKILL)) -> None:
    os.kill(os.getpid(), sig)


def exit_now(code: int) -> None:
    os._exit(code)


class Unpicklable(Exception):
    def __init__(self, handle) -> None:
        super().__init__("cannot travel")
        self.handle = handle


def fail_unpicklably() -> None:
    raise Unpicklable(lambda: None)


def pid_file_and_pid(path: str) -> tuple[str, int]:
    """The job's pid file as the child sees it (the parent writes it just after the start) and the pid."""
    import time

    for _ in range(500):
        if os.path.exists(path):
            with open(path) as fh:
                text = fh.read()
            if text:
                return text, os.getpid()
        time.sleep(0.01)
    return "", os.getpid()


def image_error(source: str, problem: str) -> None:
    from hdar_pipeline.core.images import ImageError

    raise ImageError(source, problem)


def parent_pid() -> int:
    """The pid of the process that forked the job (the fork server)."""
    return os.getppid()


def modules_loaded(names: list[str]) -> dict[str, bool]:
    import sys

    return {name: name in sys.modules for name in names}
