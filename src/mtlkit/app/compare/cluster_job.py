"""The callable a submitit job runs (imported only with the ``submitit`` extra installed; see
:mod:`mtlkit.app.compare.cluster`)."""

from __future__ import annotations

import submitit

from mtlkit.app.compare.workers import Job, Outcome, execute


class GridJob(submitit.helpers.Checkpointable):
    """:func:`~mtlkit.app.compare.workers.execute` of one grid job on its node. Requeued as it
    is when SLURM stops it at its time limit or preempts it (``Checkpointable``): the requeued
    job resumes the run from its ``checkpoint.pt``, when it has one."""

    def __call__(self, job: Job, threads: int | None = None) -> Outcome:
        return execute(job, threads)
