"""The SLURM worker's bound on requeues and the App's reading of lost jobs, without a cluster
(the cluster tests are in test_slurm.py)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

os.environ.setdefault("NO_ET", "1")
pytest.importorskip("pydra")

from pydra.workers.slurm import SlurmWorker  # noqa: E402

from hdar_pipeline.apps.bids_app import _workflow_errors, lost_subjects  # noqa: E402
from hdar_pipeline.engine.slurm_worker import BoundedRequeueSlurmWorker, SlurmJobLost  # noqa: E402


@pytest.fixture
def always(monkeypatch):
    """Make SLURM answer every poll with the given state."""
    def set_state(state):
        async def poll(self, jobid):
            return state
        monkeypatch.setattr(SlurmWorker, "_poll_job", poll)
    return set_state


def test_a_lost_job_is_requeued_once_then_fails_naming_the_state(always):
    always("TIMEOUT")
    worker = BoundedRequeueSlurmWorker(sbatch_args="--time=00:01:00")
    assert asyncio.run(worker._poll_job("17")) == "TIMEOUT"  # Pydra's worker requeues it
    with pytest.raises(SlurmJobLost, match=r"SLURM job 17 ended TIMEOUT 2 time\(s\)"):
        asyncio.run(worker._poll_job("17"))
    assert asyncio.run(worker._poll_job("18")) == "TIMEOUT"  # the bound is per job


def test_no_requeue_fails_the_first_time(always):
    always("CANCELLED")
    worker = BoundedRequeueSlurmWorker(sbatch_args="--no-requeue")
    with pytest.raises(SlurmJobLost, match="ended CANCELLED 1 time"):
        asyncio.run(worker._poll_job("5"))


def test_finished_and_running_jobs_pass_through(always):
    worker = BoundedRequeueSlurmWorker(max_requeue=0)
    for state in (True, False):
        always(state)
        assert asyncio.run(worker._poll_job("9")) is state


def test_the_worker_keeps_the_slurm_plugin_name_and_pickles_without_its_run_state():
    import pickle

    worker = BoundedRequeueSlurmWorker(sbatch_args="-p debug", max_requeue=2)
    worker.requeued["3"] = 1
    worker.lost.append((None, "x"))
    assert worker.plugin_name() == "slurm"
    back = pickle.loads(pickle.dumps(worker))
    assert back.max_requeue == 2 and back.sbatch_args == "-p debug" and not back.requeued and back.lost == []


def test_lost_jobs_are_told_by_subject_from_their_inputs_or_their_record(tmp_path):
    class Register:
        subject, session = "03", "pre"

    class Evaluate:
        record = tmp_path / "register_record.json"

    class Unknown:
        pass

    Evaluate.record.write_text(json.dumps({"subject": "04", "session": ""}))
    lost = lost_subjects([(Register(), "job 1 lost"), (Evaluate(), "job 2 lost"), (Unknown(), "job 3 lost"),
                          (None, "job 4 lost")])
    assert lost == {("03", "pre"): "job 1 lost", ("04", ""): "job 2 lost"}


def test_the_workflow_error_is_one_line_per_failed_job_without_a_traceback():
    class Result:
        errors = {"error message": [
            "Traceback (most recent call last):\n", '  File "submitter.py"\n',
            "RuntimeError: Workflow job wf failed with errors:\n\n"
            "Job 'register(0)', RegisterSubject(subject='03'), errored:Traceback (most recent call last):\n"
            '  File "slurm_worker.py"\nSlurmJobLost: SLURM job 12 ended CANCELLED 2 time(s)\n\n'
            "Job 'evaluate(1)', EvaluateSubject(), errored:Traceback (most recent call last):\n"
            "ValueError: bad labels\n\nSee output directory for details: /work/x\n"]}

    text = _workflow_errors(Result())
    assert text == "SlurmJobLost: SLURM job 12 ended CANCELLED 2 time(s) | ValueError: bad labels"
    Result.errors = {"error message": ["Traceback (most recent call last):\n", "BrokenProcessPool: gone\n"]}
    assert _workflow_errors(Result()) == "BrokenProcessPool: gone"
