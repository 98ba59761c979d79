"""Benchmark of planning the paper's grid for a large cohort (prints numbers; not a test).

1. Before a lab's first job runs, Snakemake reads the workflow, validates the config and
   builds the job graph of every subject and grid cell. This measures that start-up, a dry
   run of ``config/paper.yaml`` (Table 3, every ablation, the OpenBHB pretraining), on
   BIDS-like cohorts of N subjects (stiffness, damping ratio and T1w each): wall time, CPU
   time, peak memory and the number of jobs planned, of the second dry run (every later
   plan: the images' checks are kept), and the first one's wall time (``first_wall_s``:
   with the checks of these small images).
2. The first run also opens every input image once (brainage.inputs.check_dataset_images):
   seconds per subject with a 1 mm T1w (176 x 256 x 256, int16, ~11 MB gzipped) and two
   2.5 mm maps, read by one thread and by the default threads.

The subjects' images are small valid NIfTIs (16^3 voxels), each subject's own: the first
plan's image check refuses maps that are byte-identical between subjects (a copy under
another id). The OpenBHB release is a placeholder participants.tsv (the rule that reads
it does not run). ``SLURM_CONF=/dev/null``: where slurm-client is installed without a
running controller, the SLURM executor plugin would otherwise wait ~9 s in ``scontrol``
at every start (tests/conftest.local_snakemake_environment), which is not planning time.

Usage::

    .venv/bin/python tests/benchmarks/bench_planning.py --subjects 500 2000 \
        --image-check-subjects 24
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    """``n_subjects`` in 5 studies, ages 10-80 years, each image its subject's own."""
    inside = np.zeros((16, 16, 16), dtype=np.float32)
    inside[4:12, 4:12, 4:12] = 1.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    rows = ["participant_id\tage\tsex\tstudy"]
    for index in range(n_subjects):
        label = f"sub-s{index % 5}n{index:05d}"
        for pattern, value in IMAGES.items():
            path = root / "dataset" / label / pattern.format(label=label)
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(inside * value * (1 + index * 1e-4), affine), path)
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
        returncode, stdout, stderr, _, first_wall = _dry_run(command)  # checks the images
        if not returncode:  # every later plan: the checks are kept
            returncode, stdout, stderr, usage, wall = _dry_run(command)
    if returncode:
        raise SystemExit(f"dry run of {n_subjects} subjects failed:\n{stdout[-3000:]}"
                         f"\n{stderr[-3000:]}")
    jobs = re.search(r"^total\s+(\d+)", stdout, flags=re.MULTILINE)
    return {"subjects": n_subjects, "jobs": int(jobs.group(1)) if jobs else None,
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "first_wall_s": round(first_wall, 1)}


def _dry_run(command: list[str]):
    """Return code, stdout, stderr, resource usage and wall seconds of one dry run."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True,
                                   env={**os.environ, "SLURM_CONF": "/dev/null"})
        # this child's own usage: RUSAGE_CHILDREN's peak is the largest of every child so
        # far, which gave a smaller cohort the peak of a larger one planned before it
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must know
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return process.returncode, out.read(), err.read(), usage, wall


def image_check(n_subjects: int) -> dict:
    """Seconds of the first check_dataset_images per subject, 1 thread and default threads."""
    from brainage import inputs

    rng = np.random.default_rng(0)
    shape = (176, 256, 256)
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    radius = np.sqrt((((grid - centre) / (centre * 0.8)) ** 2).sum(axis=0))
    head = np.where(radius < 1, 600 + 200 * np.cos(radius * 20), 0)
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="bench_image_check-") as folder:
        root = Path(folder)
        rows = ["participant_id\tage\tsex\tstudy"]
        for index in range(n_subjects):
            label = f"s{index:03d}"
            (root / f"sub-{label}" / "mre").mkdir(parents=True)
            (root / f"sub-{label}" / "anat").mkdir()
            t1w = np.clip(head + rng.normal(0, 20, shape), 0, None).astype(np.int16)
            nib.save(nib.Nifti1Image(t1w, np.eye(4)),
                     root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz")
            for name, value in (("stiffness", 2.8), ("damping_ratio", 0.25)):
                data = (value * (1 + 0.1 * rng.standard_normal((80, 96, 48)))).astype(np.float32)
                nib.save(nib.Nifti1Image(data, np.diag([2.5, 2.5, 2.5, 1.0])),
                         root / f"sub-{label}" / "mre" / f"sub-{label}_{name}.nii.gz")
            rows.append(f"sub-{label}\t40\tF\tstudy1")
        labels = [f"s{index:03d}" for index in range(n_subjects)]
        default_threads = inputs.IMAGE_CHECK_THREADS
        for threads in (1, default_threads):
            inputs.IMAGE_CHECK_THREADS = threads
            start = time.perf_counter()
            inputs.check_dataset_images(root, labels, ["stiffness", "damping_ratio", "T1w"])
            seconds[f"threads_{threads}_s_per_subject"] = round(
                (time.perf_counter() - start) / n_subjects, 3)
        inputs.IMAGE_CHECK_THREADS = default_threads
    return {"image_check_subjects": n_subjects, "cpus": len(os.sched_getaffinity(0)),
            **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[500, 2000],
                        help="cohort sizes to plan (at least 50 each: config/paper.yaml's "
                             "search trains batches of 32 on 64 %% of them)")
    parser.add_argument("--image-check-subjects", type=int, default=24)
    arguments = parser.parse_args()
    if min(arguments.subjects) < 50:
        parser.error("--subjects: at least 50 each (config/paper.yaml's search trains "
                     "batches of 32 on 64 % of them)")
    for n_subjects in arguments.subjects:
        print(json.dumps(plan(n_subjects)), flush=True)
    if arguments.image_check_subjects:
        print(json.dumps(image_check(arguments.image_check_subjects)), flush=True)


if __name__ == "__main__":
    main()
