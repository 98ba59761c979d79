"""Benchmark of planning the paper's grid for a large cohort (prints numbers; not a test).

Before a lab's first job runs, Snakemake reads the workflow, validates the config and
builds the job graph of every subject and grid cell. This measures that start-up, a dry
run of ``config/paper.yaml`` (Table 3, every ablation, the OpenBHB pretraining), on BIDS-
like cohorts of N subjects (stiffness, damping ratio and T1w each): wall time, CPU time,
peak memory and the number of jobs planned.

The subjects' images are symbolic links to one small valid NIfTI per kind (a dry run reads
no voxel), and the OpenBHB release is a placeholder participants.tsv (the rule that reads
it does not run). ``SLURM_CONF=/dev/null``: where slurm-client is installed without a
running controller, the SLURM executor plugin would otherwise wait ~9 s in ``scontrol``
at every start (tests/conftest.local_snakemake_environment), which is not planning time.

Usage::

    cd /work/main && .venv/bin/python tests/benchmarks/bench_planning.py --subjects 500 2000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGES = {"mre/{label}_stiffness.nii.gz": 2.8, "mre/{label}_damping_ratio.nii.gz": 0.25,
          "anat/{label}_T1w.nii.gz": 100.0}


def write_cohort(root: Path, n_subjects: int) -> None:
    """``n_subjects`` in 5 studies, ages 10-80 years, every image a link to one file."""
    sources = root / "sources"
    sources.mkdir(parents=True)
    inside = np.zeros((16, 16, 16), dtype=np.float32)
    inside[4:12, 4:12, 4:12] = 1.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    source_files = {}
    for pattern, value in IMAGES.items():
        source_files[pattern] = sources / Path(pattern).name.replace("{label}_", "")
        nib.save(nib.Nifti1Image(inside * value, affine), source_files[pattern])
    rng = np.random.default_rng(0)
    rows = ["participant_id\tage\tsex\tstudy"]
    for index in range(n_subjects):
        label = f"sub-s{index % 5}n{index:05d}"
        for pattern, source in source_files.items():
            link = root / "dataset" / label / pattern.format(label=label)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
        rows.append(f"{label}\t{rng.uniform(10, 80):.1f}\t{'FM'[index % 2]}\tstudy{index % 5}")
    (root / "dataset" / "participants.tsv").write_text("\n".join(rows) + "\n")
    openbhb = root / "openBHB"
    openbhb.mkdir()
    (openbhb / "participants.tsv").write_text("participant_id\tage\n")


def plan(n_subjects: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_planning-") as folder:
        root = Path(folder)
        write_cohort(root, n_subjects)
        override = root / "cohort.yaml"
        override.write_text(yaml.safe_dump({
            "dataset": {"root": str(root / "dataset")},
            "pretrain": {"openbhb": {"source": {"root": str(root / "openBHB")}}}}))
        work = root / "work"
        work.mkdir()
        command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                   "--directory", str(work), "--configfile", str(REPO / "config/paper.yaml"),
                   str(override), "--cores", "2", "--dry-run"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "SLURM_CONF": "/dev/null"})
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(f"dry run of {n_subjects} subjects failed:\n{result.stdout[-3000:]}"
                         f"\n{result.stderr[-3000:]}")
    jobs = re.search(r"^total\s+(\d+)", result.stdout, flags=re.MULTILINE)
    return {"subjects": n_subjects, "jobs": int(jobs.group(1)) if jobs else None,
            "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime
                           - before.ru_stime, 1),
            "peak_rss_mb": round(after.ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[500, 2000])
    arguments = parser.parse_args()
    for n_subjects in arguments.subjects:
        print(json.dumps(plan(n_subjects)), flush=True)


if __name__ == "__main__":
    main()
