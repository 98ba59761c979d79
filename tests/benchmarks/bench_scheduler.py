"""Benchmark of Snakemake's own CPU time while it runs jobs (prints numbers; not a test).

Snakemake (9.x up to at least 9.27.1) starts a re-evaluation timer after every scheduling
pass, also after the passes that finished jobs trigger, so each finished job adds one more
pass per ``--max-jobs-per-timespan`` timespan for the rest of the run, and every pass checks
the inputs of every ready job (README, "--max-jobs-per-timespan"). This runs N jobs that
only sleep (no CPU of their own) in a throwaway workflow, once per rate-limit setting, and
prints Snakemake's CPU seconds (user + system, its job processes included: a few ms each),
the wall time and the seconds per job beyond the jobs' own sleep.

Usage, from the repository root::

    .venv/bin/python tests/benchmarks/bench_scheduler.py --jobs 1000 --sleep 1 --slots 8 \
        --settings 100/1s 100/5s 100/10s
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SNAKEFILE = """\
N = {jobs}

rule all:
    input:
        expand("out/{{i}}.txt", i=range(N)),

rule sleep_then_touch:
    output:
        "out/{{i}}.txt",
    shell:
        "sleep {sleep}; touch {{output}}"
"""


def run_once(folder: Path, setting: str, slots: int) -> tuple[float, float]:
    """One Snakemake run in ``folder``: (wall seconds, CPU seconds of Snakemake and its jobs)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(slots), "--scheduler",
                    "greedy", "--max-jobs-per-timespan", setting, "--quiet", "all"],
                   cwd=folder, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "SLURM_CONF": "/dev/null"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each job sleeps")
    parser.add_argument("--slots", type=int, default=8, help="--cores (jobs at once)")
    parser.add_argument("--settings", nargs="+", default=["100/1s", "100/5s"],
                        help="--max-jobs-per-timespan values (100/1s is Snakemake's default)")
    args = parser.parse_args()
    ideal = args.jobs * args.sleep / args.slots
    print(f"{args.jobs} jobs of {args.sleep:g} s on {args.slots} slots "
          f"(ideal wall {ideal:.1f} s)")
    print(f"{'setting':>10} {'wall s':>8} {'CPU s':>8} {'CPU ms/job':>11} {'s/job over sleep':>17}")
    for setting in args.settings:
        with tempfile.TemporaryDirectory(prefix="bench_scheduler_") as folder:
            Path(folder, "Snakefile").write_text(
                SNAKEFILE.format(jobs=args.jobs, sleep=args.sleep))
            wall, cpu = run_once(Path(folder), setting, args.slots)
        print(f"{setting:>10} {wall:8.1f} {cpu:8.1f} {1000 * cpu / args.jobs:11.1f} "
              f"{(wall - ideal) * args.slots / args.jobs:17.3f}")


if __name__ == "__main__":
    main()
