"""Pydra's SLURM worker with a bound on requeues.

Pydra's :class:`~pydra.workers.slurm.SlurmWorker` requeues a job that ended ``CANCELLED``, ``TIMEOUT`` or
``PREEMPTED`` (``scontrol requeue``) as often as it ends so: right for a preemption, a hang for a job that
always runs past ``--time`` or is always cancelled (an administrator's limit, a memory limit enforced by
cancelling). This worker requeues such a job at most ``max_requeue`` times and then fails it with the
state SLURM gave, so the workflow goes on with the other jobs and the run records the subject as failed; a
rerun with the same work dir tries it again.
"""

from __future__ import annotations

from collections import Counter

import attrs
from pydra.workers.slurm import SlurmWorker

__all__ = ["LOST_STATES", "BoundedRequeueSlurmWorker", "SlurmJobLost"]

LOST_STATES = ("CANCELLED", "TIMEOUT", "PREEMPTED")  # the states Pydra's worker requeues


class SlurmJobLost(RuntimeError):
    """A SLURM job ended cancelled, timed out or preempted more often than it may be requeued."""


@attrs.define
class BoundedRequeueSlurmWorker(SlurmWorker):
    """:class:`~pydra.workers.slurm.SlurmWorker` that requeues a lost job at most ``max_requeue`` times.

    Parameters
    ----------
    max_requeue : int
        Requeues allowed per job (0: none; ``--no-requeue`` in ``sbatch_args`` means none as well).
    """

    _plugin_name = "slurm"  # the same scripts folder and job names as Pydra's own SLURM worker

    max_requeue: int = attrs.field(default=1, converter=int)
    requeued: Counter = attrs.field(factory=Counter)
    #: ``(task, message)`` of every job lost for good in this worker's run: the task (its inputs) says
    #: which subject it was, the message what SLURM did
    lost: list = attrs.field(factory=list)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("requeued", None)
        state.pop("lost", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state["requeued"], state["lost"] = Counter(), []
        super().__setstate__(state)

    async def run(self, job, rerun: bool = False):
        try:
            return await super().run(job, rerun=rerun)
        except SlurmJobLost as exc:
            self.lost.append((getattr(job, "task", None), str(exc)))
            raise

    async def _poll_job(self, jobid):
        state = await super()._poll_job(jobid)
        if state in LOST_STATES:
            allowed = 0 if "--no-requeue" in self.sbatch_args else self.max_requeue
            if self.requeued[jobid] >= allowed:
                raise SlurmJobLost(
                    f"SLURM job {jobid} ended {state} {self.requeued[jobid] + 1} time(s) (requeued "
                    f"{self.requeued[jobid]}); see `sacct -j {jobid}` and its output under slurm_scripts/")
            self.requeued[jobid] += 1
        return state
