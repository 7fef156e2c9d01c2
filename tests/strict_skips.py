"""A pytest plugin: with ``HDAR_STRICT_SKIPS=1`` a skip is a failure, unless the machine explains it.

A green run must mean the tests ran. A test module that skips itself because ``pydra``, ``bids`` or ``nipype``
does not import (``pytest.importorskip``), or a test that skips for any other reason, hides a broken
install: every dependency the tests need is declared in ``pyproject.toml`` (``.[test]``), so ``.ci/run``,
which installs them, sets ``HDAR_STRICT_SKIPS=1`` and such a skip fails the run. What a machine may lack is
marked, and only those skips stay skips:

- ``cuda``: a CUDA device;
- ``realdata``: the LPBA40 data in ``../shared`` (never part of the repository);
- ``slurm``: a SLURM cluster (``.ci/run`` makes its absence fail on its own, with ``HDAR_REQUIRE_SLURM=1``).
"""

from __future__ import annotations

import os

import pytest

#: Markers whose tests may skip in strict mode: what a machine may lack, not what an install may break.
MACHINE_MARKERS = ("cuda", "realdata", "slurm")


def strict() -> bool:
    return os.environ.get("HDAR_STRICT_SKIPS") == "1"


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (strict() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if any(item.get_closest_marker(m) is not None for m in MACHINE_MARKERS):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped, and HDAR_STRICT_SKIPS=1 counts that as a failure (only tests marked "
                       f"{', '.join(MACHINE_MARKERS)} may skip): {_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if strict() and report.outcome == "skipped":
        # a whole module skipped at import time (pytest.importorskip of a declared dependency)
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid}: the module skipped itself, and HDAR_STRICT_SKIPS=1 counts that "
                           f"as a failure: {_reason(report.longrepr)}")
