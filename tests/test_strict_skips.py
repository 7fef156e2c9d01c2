"""tests/strict_skips.py: with HDAR_STRICT_SKIPS=1 a skip fails the run unless a machine marker explains it."""

from __future__ import annotations

import pytest

GENERATED = '''
import pytest

def test_runs():
    assert True

def test_skips_for_no_reason_a_machine_has():
    pytest.skip("some optional thing is missing")

@pytest.mark.cuda
def test_needs_a_gpu():
    pytest.skip("needs a CUDA device")

@pytest.mark.realdata
def test_needs_the_data():
    pytest.skip("LPBA40 data not found")

@pytest.mark.xfail(reason="known")
def test_known_failure():
    assert False
'''

MODULE_SKIP = '''
import pytest
pytest.importorskip("a_dependency_that_does_not_import")

def test_never_collected():
    assert True
'''


def _run(pytester, monkeypatch, strict: bool, **files):
    monkeypatch.setenv("HDAR_STRICT_SKIPS", "1" if strict else "0")
    pytester.makeconftest('pytest_plugins = ["strict_skips"]')
    pytester.makeini("[pytest]\nmarkers =\n    cuda: x\n    realdata: x\n    slurm: x\n")
    pytester.makepyfile(**files)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_strict_mode_fails_unexplained_skips_only(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, True, test_generated=GENERATED)
    result.assert_outcomes(passed=1, failed=1, skipped=2, xfailed=1)
    result.stdout.fnmatch_lines(["*test_skips_for_no_reason_a_machine_has*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_without_strict_mode_skips_stay_skips(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, False, test_generated=GENERATED)
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_strict_mode_fails_a_module_that_skips_itself_at_import(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, True, test_module_skip=MODULE_SKIP)
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*the module skipped itself*a_dependency_that_does_not_import*"])
    relaxed = _run(pytester, monkeypatch, False, test_module_skip=MODULE_SKIP)
    assert relaxed.ret == pytest.ExitCode.NO_TESTS_COLLECTED
