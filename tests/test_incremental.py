"""Incremental reruns, the main way labs use the pipeline, proven with Snakemake job lists.

A real run preprocesses 6 simulated subjects (3 studies, stiffness maps only, skull
stripping "none") and normalises them. Then dry runs must list:
- nothing, when nothing changed;
- after changing preprocess.n4: bias correction and what follows, not skull stripping;
- after changing preprocess.freesurfer_tool while FreeSurfer never runs: nothing;
- after changing a QC threshold: nothing for the split (the thresholds only flag subjects
  in the QC table), unless qc.exclude_failed lets them choose the split's subjects: then
  the QC table and the normalisation;
- after writing the same settings with keys in another order, or a default written out:
  nothing;
- after adding a study (rows + files): the new subjects' preprocessing and the
  dataset-wide rules, no job of the subjects already done;
- after deleting the files the README's "Freeing disk space" calls free: nothing, and a
  changed setting still reruns what it changes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import local_snakemake_environment

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]
PER_SUBJECT_RULES = {"strip_skull", "correct_and_register"}
#: What a split needs beyond its subjects' jobs; the QC table only with qc.exclude_failed.
DATASET_RULES = {("normalise_dataset", "split=holdout")}
QC_TABLE = ("tabulate_qc", "")
TARGET = "results/dataset/holdout/images.npy"



def snakemake(workdir: Path, config: Path, *arguments: str) -> str:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
               str(workdir), "--configfile", str(config), "--cores", "2", *arguments, TARGET]
    # a limit, so that a hang fails this file's tests and not the whole CI run: the real
    # run of the fixture took 132 s on a loaded 2-core machine
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env=local_snakemake_environment(), timeout=900)
    if result.returncode:
        raise AssertionError(f"snakemake {' '.join(arguments)} failed:\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout + result.stderr


def planned_jobs(workdir: Path, config: Path) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run would run."""
    output = snakemake(workdir, config, "--dry-run")
    jobs = set()
    for block in re.split(r"\n\s*rule ", output)[1:]:
        rule = block.split(":", 1)[0].strip()
        wildcards = re.search(r"^\s*wildcards: (.*)$", block, re.M)
        jobs.add((rule, wildcards.group(1).strip() if wildcards else ""))
    return jobs


def subject_wildcards(label: str) -> str:
    """How a dry run lists a training-cohort subject's wildcards."""
    return f"preproc=preproc, subject={label}"


def subject_jobs(labels) -> set[tuple[str, str]]:
    return {(rule, subject_wildcards(label)) for rule in PER_SUBJECT_RULES for label in labels}


def write_config(path: Path, dataset: Path, **changes) -> Path:
    config = {"dataset": {"root": str(dataset), "simulate": {"enabled": False}},
              "preprocess": {"skullstrip": "none", "n4": True},
              "normalise": {"resolution_mm": 8},
              "split": {"scheme": "holdout", "test_fraction": 0.3}}
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """Six subjects (studies 2, 4, 5) preprocessed and normalised for real; the two
    subjects of study 1 kept aside as the "new study"."""
    from brainage.simulate import simulate_cohort

    base = tmp_path_factory.mktemp("incremental")
    full = base / "full"
    simulate_cohort(full, n_subjects=10, seed=1, with_anatomy=False, nan_probability=0.0)
    participants = pd.read_csv(full / "participants.tsv", sep="\t", dtype=str)
    first = participants[participants["study"].isin(["study2", "study4", "study5"])]
    new = participants[participants["study"] == "study1"]
    dataset = base / "dataset"
    dataset.mkdir()
    for participant_id in first["participant_id"]:
        shutil.copytree(full / participant_id, dataset / participant_id)
    first.to_csv(dataset / "participants.tsv", sep="\t", index=False)
    workdir = base / "work"
    config = write_config(base / "config.yaml", dataset)
    snakemake(workdir, config)
    assert (workdir / TARGET).is_file()
    return {"base": base, "full": full, "dataset": dataset, "workdir": workdir,
            "config": config, "first": first, "new": new}


def labels(table: pd.DataFrame) -> list[str]:
    return [pid[len("sub-"):] for pid in table["participant_id"]]


def test_nothing_to_do_after_a_run(preprocessed):
    assert planned_jobs(preprocessed["workdir"], preprocessed["config"]) == set()


def test_changing_n4_reruns_bias_correction_and_after_only(preprocessed):
    """N4, registration and QC share a job (correct_and_register); skull stripping is its
    own and stays done."""
    config = write_config(preprocessed["base"] / "no_n4.yaml", preprocessed["dataset"],
                          preprocess={"n4": False})
    jobs = planned_jobs(preprocessed["workdir"], config)
    expected = {(rule, subject_wildcards(label)) for label in labels(preprocessed["first"])
                for rule in ("correct_and_register",)}
    assert jobs == expected | DATASET_RULES
    assert not any(rule in ("strip_skull", "prepare_template") for rule, _ in jobs)


def test_the_freesurfer_tool_reruns_nothing_when_freesurfer_never_runs(preprocessed):
    """preprocess.freesurfer_tool chooses FreeSurfer's program; with skull stripping
    "none" (or deepbet) no FreeSurfer program runs, so changing it changes no file."""
    config = write_config(preprocessed["base"] / "watershed.yaml", preprocessed["dataset"],
                          preprocess={"freesurfer_tool": "watershed"})
    assert planned_jobs(preprocessed["workdir"], config) == set()


def test_a_qc_threshold_reaches_the_split_only_when_it_excludes_subjects(preprocessed):
    config = write_config(preprocessed["base"] / "qc.yaml", preprocessed["dataset"],
                          qc={"min_dice": 0.5})
    assert planned_jobs(preprocessed["workdir"], config) == set()
    config = write_config(preprocessed["base"] / "qc_exclude.yaml", preprocessed["dataset"],
                          qc={"min_dice": 0.5, "exclude_failed": True})
    assert planned_jobs(preprocessed["workdir"], config) == DATASET_RULES | {QC_TABLE}


def test_key_order_and_written_out_defaults_rerun_nothing(preprocessed):
    """Snakemake compares params by their repr, where a dict's key order shows: the same
    settings with keys in another order, or with a default written out, plan nothing."""
    config = yaml.safe_load(preprocessed["config"].read_text())
    reordered = {section: dict(reversed(list(values.items())))
                 for section, values in reversed(list(config.items()))}
    reordered["normalise"] = {"dtype": "float32", **reordered["normalise"]}  # the default
    reordered["split"]["seed"] = 42                                       # the default
    path = preprocessed["base"] / "reordered.yaml"
    path.write_text(yaml.safe_dump(reordered, sort_keys=False))
    assert planned_jobs(preprocessed["workdir"], path) == set()


def jobs_with_a_new_study(preprocessed) -> set[tuple[str, str]]:
    """The jobs a dry run plans once study 1's subjects join the dataset; the module's
    dataset as it was afterwards, for the tests that run after."""
    dataset, new = preprocessed["dataset"], preprocessed["new"]
    try:
        for participant_id in new["participant_id"]:
            shutil.copytree(preprocessed["full"] / participant_id, dataset / participant_id)
        pd.concat([preprocessed["first"], new]).to_csv(dataset / "participants.tsv",
                                                       sep="\t", index=False)
        return planned_jobs(preprocessed["workdir"], preprocessed["config"])
    finally:
        for participant_id in new["participant_id"]:
            shutil.rmtree(dataset / participant_id, ignore_errors=True)
        preprocessed["first"].to_csv(dataset / "participants.tsv", sep="\t", index=False)


def test_adding_a_study_reruns_only_its_subjects(preprocessed):
    assert jobs_with_a_new_study(preprocessed) == \
        subject_jobs(labels(preprocessed["new"])) | DATASET_RULES


#: The README's "Freeing disk space" list of each subject's free files.
FREE_TO_DELETE = ("*_desc-biascorr_*", "*_desc-clean_*", "*_xfm.mat",
                  "*_space-*_desc-preproc_reference.nii.gz")


def test_the_files_the_readme_calls_free_rerun_nothing_when_deleted(preprocessed):
    """Last in this file: it deletes them from the module's run. Snakemake remakes no
    missing file while what it feeds is up to date, so only a change that reruns what
    reads them (a new study renormalises every subject) tells a free file from one to
    keep: without the registered maps, every subject would be registered again."""
    anat = sorted((preprocessed["workdir"] / "results" / "preproc").glob("sub-*/anat"))
    deleted = [path for folder in anat for pattern in FREE_TO_DELETE
               for path in folder.glob(pattern)]
    assert len(anat) == 6 and len(deleted) >= 3 * 6
    for path in deleted:
        path.unlink()
    assert planned_jobs(preprocessed["workdir"], preprocessed["config"]) == set()
    assert jobs_with_a_new_study(preprocessed) == \
        subject_jobs(labels(preprocessed["new"])) | DATASET_RULES
    config = write_config(preprocessed["base"] / "no_n4_after_freeing.yaml",
                          preprocessed["dataset"], preprocess={"n4": False})
    assert planned_jobs(preprocessed["workdir"], config) == \
        {("correct_and_register", subject_wildcards(label))
         for label in labels(preprocessed["first"])} | DATASET_RULES
