"""A repair of the Snakemake scheduler, applied by the workflow (``common.smk``).

Snakemake 9.10 to 9.16 (snakemake/snakemake#3913, fixed in 9.17) run a job that is the only
ready one without reserving its cores, but give the cores back when it finishes. Every lone
job therefore adds its threads to the pool. In this pipeline lone jobs (the simulation, the
template, the QC table, the normalisation) come before every fan-out, and on ``--cores 2``
the demo trained 7 encoders at once, each asking for 16 GB.

A newer Snakemake would fix it too, but it requires ``packaging<26``, which moves nilearn
back a release and slows every fresh install; so the workflow repairs the affected
versions itself and leaves every other version alone.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: The releases that skip the reservation: [first, first fixed).
AFFECTED = ((9, 10), (9, 17))


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def reserve_cores_of_lone_jobs() -> bool:
    """Make the local scheduler reserve the resources of a lone ready job, on the affected
    Snakemake releases only. Returns whether the repair was applied (idempotent)."""
    import snakemake
    from snakemake.scheduling import job_scheduler

    scheduler = job_scheduler.JobScheduler
    if not (AFFECTED[0] <= _release(snakemake.__version__) < AFFECTED[1]):
        return False
    if getattr(scheduler.job_selector, "_reserves_lone_jobs", False):
        return True
    if not hasattr(scheduler, "update_available_resources"):
        log.warning("Snakemake %s: cannot repair the scheduler (snakemake#3913); a lone job "
                    "may let more jobs run than --cores allows", snakemake.__version__)
        return False
    original = scheduler.job_selector

    def job_selector(self, jobs):
        selected = original(self, jobs)
        if len(jobs) == 1 and selected:  # the branch that returned before reserving
            self.update_available_resources(selected)
        return selected

    job_selector._reserves_lone_jobs = True
    scheduler.job_selector = job_selector
    return True
