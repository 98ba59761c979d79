"""Benchmark of the preprocessing stage (prints numbers; not a test).

1. One simulated 2.0 mm subject (study1 of brainage.simulate, T1w included), one thread:
   wall time, CPU time and peak memory of strip_skull (deepbet), correct_bias (N4 on the
   map and the T1w) and register_to_template, each in a fresh process. "run" excludes the
   Python imports (torch, ANTsPy, nipype), "job" includes them. The pipeline runs
   correct_bias, register_to_template and compute_qc in one job (correct_and_register),
   which pays the imports once: its time is about the two steps' "run" plus one import,
   not the sum of their "job" columns.
2. normalise_dataset on 10..80 synthetic registered maps (2 mm template grid): wall time
   and peak memory, which should grow linearly and stay flat.
3. The cohort route of ``python -m brainage.predict run`` (brainage.preprocess.chain.
   run_subjects, deepbet + N4 + registration + QC, deterministic): 6 simulated subjects one
   at a time, then ``--jobs`` = the CPUs, in spawned processes: wall time per subject.

Usage::

    PYTHONPATH=workflow .venv/bin/python tests/benchmarks/bench_preprocess.py

Targets (issue 3): <= 10 s per subject for the three steps, <= 2 GB per job, normalisation
linear in subjects with constant memory. On a shared machine wall time includes waiting
for the CPU; CPU time is the number to compare with the target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

CHILD = textwrap.dedent("""
    import json, os, resource, sys, time
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    step, arguments = sys.argv[1], json.loads(sys.argv[2])
    if step == "strip_skull":
        from brainage.preprocess import strip_skull as function
        import torch, deepbet  # noqa: F401  (imports counted in "job", not "run")
    elif step == "correct_bias":
        from brainage.preprocess import correct_bias as function
        import ants  # noqa: F401
    elif step == "register_to_template":
        from brainage.preprocess import register_to_template as function
        import ants  # noqa: F401
    else:
        from brainage.normalise import normalise_dataset as function
        import pandas
        # A table, not the dataset's participants.tsv: there are no raw maps to check.
        arguments["args"][1] = pandas.read_csv(arguments["args"][1], sep="\t")
    imported_wall, imported_cpu = time.perf_counter(), time.process_time()
    function(*arguments["args"], **arguments["kwargs"])
    end_wall, end_cpu = time.perf_counter(), time.process_time()
    print(json.dumps({
        "job_wall_s": end_wall - start_wall, "job_cpu_s": end_cpu - start_cpu,
        "run_wall_s": end_wall - imported_wall, "run_cpu_s": end_cpu - imported_cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def run_child(step: str, *args, **kwargs) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(REPO / "workflow"))
    result = subprocess.run([PYTHON, "-c", CHILD, step, json.dumps({"args": args,
                                                                     "kwargs": kwargs})],
                            capture_output=True, text=True, env=environment, check=False)
    if result.returncode:
        raise SystemExit(f"{step} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_subject(work: Path) -> None:
    from brainage.paths import Layout
    from brainage.preprocess import prepare_template
    from brainage.preprocess.chain import subject_files
    from brainage.simulate import simulate_cohort

    dataset = work / "dataset"
    truth = simulate_cohort(dataset, n_subjects=10, seed=0)
    row = truth[truth["study"] == "study1"].iloc[0]
    participant_id = row["participant_id"]
    label = participant_id[len("sub-"):]
    layout = Layout(results=str(work / "results"))
    prepare_template(layout.template("T1w"), layout.template("brain_mask"))
    stiffness = str(dataset / participant_id / "mre" / f"{participant_id}_stiffness.nii.gz")
    anat = str(dataset / participant_id / "anat" / f"{participant_id}_T1w.nii.gz")
    files = subject_files(layout, label)
    native = {"mask": files["mask"], "reference": files["reference"],
              "info": files["reference_info"], "stiffness_n4": files["corrected_stiffness"],
              "reference_n4": files["corrected_reference"]}
    print(f"subject {participant_id}: {row['voxel_size_mm']} mm, grid {row['shape']}")
    timings = {
        "strip_skull (deepbet)": run_child(
            "strip_skull", stiffness, native["mask"], native["reference"], native["info"],
            anat=anat, method="deepbet", threads=1, subject=label),
        "correct_bias (N4 x2)": run_child(
            "correct_bias", {"stiffness": stiffness}, native["mask"], native["reference"],
            native["info"], {"stiffness": native["stiffness_n4"]}, native["reference_n4"],
            n4=True, threads=1,
            deterministic=True, subject=label),
        "register_to_template": run_child(
            "register_to_template", {"stiffness": native["stiffness_n4"]}, native["mask"],
            native["reference_n4"], native["info"], layout.template("T1w"),
            layout.template("brain_mask"), {"stiffness": files["registered_stiffness"]},
            files["registered_mask"],
            files["transform"], files["registered_reference"], deterministic=True, threads=1,
            subject=label),
    }
    print(f"{'step':<24}{'run wall s':>11}{'run CPU s':>11}{'job wall s':>11}{'job CPU s':>11}"
          f"{'peak MB':>9}")
    for step, numbers in timings.items():
        print(f"{step:<24}{numbers['run_wall_s']:>11.2f}{numbers['run_cpu_s']:>11.2f}"
              f"{numbers['job_wall_s']:>11.2f}{numbers['job_cpu_s']:>11.2f}"
              f"{numbers['peak_rss_mb']:>9.0f}")
    total = {key: sum(n[key] for n in timings.values())
             for key in ("run_wall_s", "run_cpu_s", "job_wall_s", "job_cpu_s")}
    print(f"{'total':<24}{total['run_wall_s']:>11.2f}{total['run_cpu_s']:>11.2f}"
          f"{total['job_wall_s']:>11.2f}{total['job_cpu_s']:>11.2f}")
    return layout


def bench_normalise(work: Path, layout) -> None:
    import nibabel as nib
    import numpy as np
    import pandas as pd

    template = nib.load(layout.template("brain_mask"))
    brain = np.asarray(template.dataobj) > 0
    rng = np.random.default_rng(0)
    maps_dir = work / "maps"
    maps_dir.mkdir()
    counts = (10, 20, 40, 80)
    paths = []
    for index in range(max(counts)):
        data = np.where(brain, rng.normal(2.5, 0.4, brain.shape), 0).astype(np.float32)
        path = maps_dir / f"sub-b{index:03d}_space-MNI152_res-2_desc-preproc_stiffness.nii.gz"
        nib.save(nib.Nifti1Image(data, template.affine), path)
        paths.append(str(path))
    print("\nnormalise_dataset (2 mm, scope train, holdout 80:20)")
    print(f"{'subjects':>9}{'wall s':>9}{'CPU s':>9}{'s/subject':>11}{'peak MB':>9}")
    for count in counts:
        folder = work / f"normalise{count}"
        folder.mkdir()
        ids = [f"sub-b{i:03d}" for i in range(count)]
        participants = pd.DataFrame({"participant_id": ids, "age": 20.0 + np.arange(count) % 60,
                                     "sex": "F", "study": [f"s{i % 3}" for i in range(count)]})
        qc = pd.DataFrame({"participant_id": ids, "study": participants["study"], "dice": 0.95,
                           "correlation": 0.7, "coverage": 0.95, "qc_pass": True,
                           "qc_failures": ""})
        qc.to_csv(folder / "qc.tsv", sep="\t", index=False)
        participants.to_csv(folder / "participants.tsv", sep="\t", index=False)
        numbers = run_child(
            "normalise_dataset", paths[:count], str(folder / "participants.tsv"),
            str(folder / "qc.tsv"), layout.template("brain_mask"), str(folder / "images.npy"),
            str(folder / "out_participants.tsv"), str(folder / "stats.json"),
            split="holdout", split_settings={"scheme": "holdout", "test_fraction": 0.2,
                                             "n_folds": 5, "seed": 42})
        print(f"{count:>9}{numbers['run_wall_s']:>9.2f}{numbers['run_cpu_s']:>9.2f}"
              f"{numbers['run_wall_s'] / count:>11.3f}{numbers['peak_rss_mb']:>9.0f}")


def bench_cohort(work: Path, layout) -> None:
    import time

    from brainage.inputs import subject_inputs
    from brainage.paths import Layout
    from brainage.preprocess.chain import run_subjects

    dataset = work / "dataset"
    labels = sorted(path.name[len("sub-"):] for path in dataset.glob("sub-*"))[:6]
    inputs = {label: subject_inputs(dataset, label, ("stiffness",)) for label in labels}
    preprocess = {"skullstrip": "deepbet", "freesurfer_tool": "synthstrip", "n4": True,
                  "deterministic": True, "threads": 1, "max_nan_fraction": 0.01}
    cpus = len(os.sched_getaffinity(0))
    print(f"\ncohort route (predict run), {len(labels)} subjects, {cpus} CPUs")
    print(f"{'jobs':>5}{'wall s':>9}{'s/subject':>11}")
    for jobs in sorted({1, cpus}):
        out = Layout(results=str(work / f"cohort{jobs}"))
        start = time.perf_counter()
        run_subjects(inputs, out, preproc="preproc", preprocess=preprocess,
                     template_t1=layout.template("T1w"),
                     template_mask=layout.template("brain_mask"), jobs=jobs)
        wall = time.perf_counter() - start
        print(f"{jobs:>5}{wall:>9.1f}{wall / len(labels):>11.2f}")


def main() -> None:
    sys.path.insert(0, str(REPO / "workflow"))
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench_preprocess-") as tmp:
        work = Path(tmp)
        layout = bench_subject(work)
        bench_normalise(work, layout)
        bench_cohort(work, layout)


if __name__ == "__main__":
    main()
