"""The workflow itself: dry-runs from a fresh folder, bad input and bad settings stopping the
run early, and what to run after a kill."""

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from brainage.config import validate_config
from brainage.interrupted import interrupted_run_notice, last_slurm_run_id
from brainage.logs import attempts_file
from brainage.paths import Layout
from brainage.preprocess.chain import subject_files
from brainage.simulate import draw_participants
from conftest import REPO, default_rows, local_snakemake_environment, write_tiny_dataset

pytestmark = pytest.mark.workflow

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def snakemake(workdir: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--cores", "1", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=local_snakemake_environment())


def user_config(tmp_path: Path, root: Path, **sections) -> Path:
    config = {"dataset": {"root": str(root), "simulate": {"enabled": False}}, **sections}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def readme_main_run_options() -> list[str]:
    """The options of the README main command's workflow run (its first `snakemake` call,
    the one without --report)."""
    main_command = next(line for line in (REPO / "README.md").read_text().splitlines()
                        if "pip install -q -e . &&" in line)
    run = next(part.split() for part in main_command.split("&&")
               if part.split()[0].endswith("/snakemake") and "--report" not in part)
    return run[1:]


@pytest.mark.workflow
def test_fresh_folder_dry_run_starts_with_the_simulation(tmp_path):
    # With the README's own options: a Snakemake release that drops or renames one of them
    # (--scheduler greedy, --max-jobs-per-timespan) fails here, not in a user's first run.
    options = readme_main_run_options()
    assert "--max-jobs-per-timespan" in options
    result = snakemake(tmp_path, "-n", *options)
    assert result.returncode == 0, result.stdout
    assert "simulate_cohort" in result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_the_qc_table_is_a_target_of_its_own(tmp_path):
    """A damaged QC file failed tabulate_qc, whose table Snakemake then removed; with the QC
    file removed as the message says, the next run planned nothing (a missing file that
    only feeds up-to-date outputs is not remade), so the table and the subject's QC record
    stayed missing. As a target of rule all, a missing QC table is always remade."""
    result = snakemake(tmp_path, "-n")
    assert result.returncode == 0, result.stdout
    targets = re.search(r"^rule all:\n\s+input: (.*)$", result.stdout, flags=re.M)[1]
    assert "results/qc/qc.tsv" in targets.split(", "), targets


@pytest.mark.workflow
def test_the_planning_benchmark_runs():
    """tests/benchmarks/bench_planning.py, which the README cites for planning at scale,
    failed once the first plan refused maps identical between subjects (its cohort linked
    every subject's images to one file), and no test ran it."""
    result = subprocess.run([sys.executable, str(REPO / "tests/benchmarks/bench_planning.py"),
                             "--subjects", "50", "--image-check-subjects", "0"],
                            capture_output=True, text=True, timeout=300,
                            env=local_snakemake_environment())
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["subjects"] == 50 and measured["jobs"] > 50 * 3, measured
    assert measured["wall_s"] > 0 and measured["first_wall_s"] > 0, measured


@pytest.mark.workflow
def test_planning_a_run_does_not_import_pytorch(tmp_path):
    # Snakemake reads the workflow at every start (and twice more in every SLURM job):
    # config validation and job planning are plain Python; PyTorch (1.3 s) loads in the
    # jobs that train. Python lists every import it makes under PYTHONPROFILEIMPORTTIME.
    result = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--cores", "1", "-n"],
                            capture_output=True, text=True, timeout=240,
                            env=local_snakemake_environment(PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "brainage.config" in imported and "snakemake.dag" in imported  # it did list them
    assert "torch" not in imported


@pytest.mark.workflow
def test_unknown_config_key_stops_the_run_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 3\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad))
    assert result.returncode != 0
    assert "epocs" in result.stdout and "train" in result.stdout


@pytest.mark.workflow
@pytest.mark.parametrize("break_dataset, expected", [
    (lambda root: (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tstudy\nsub-../x\t30\tF\ts1\n"), "letters and digits"),
    (lambda root: (root / "sub-01a/mre/sub-01a_stiffness.nii.gz").unlink(),
     "sub-01a: stiffness map"),
    (lambda root: nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4)),
                           root / "sub-02a/mre/sub-02a_stiffness.nii.gz"), "sub-02a"),
    (lambda root: (root / "sub-03a/mre/sub-03a_stiffness.nii.gz").write_bytes(b"garbage"),
     "not a readable NIfTI"),
    # copied with the times of a console a day fast: every job reading it would fail
    # after its work, and --touch would remove its outputs
    (lambda root: os.utime(root / "sub-01a/mre/sub-01a_stiffness.nii.gz",
                           (time.time() + 86400,) * 2),
     "are dated in the future, up to 24 h ahead"),
], ids=["escaping-label", "missing-map", "all-zero-map", "corrupt-map", "future-dated"])
def test_bad_dataset_stops_before_any_work(tmp_path, break_dataset, expected):
    root = write_tiny_dataset(tmp_path / "dataset", default_rows())
    break_dataset(root)
    work = tmp_path / "work"
    work.mkdir()
    result = snakemake(work, "--configfile", str(user_config(tmp_path, root)))
    assert result.returncode != 0
    assert expected in result.stdout
    assert not (work / "results").exists(), "nothing may be written to results/"


@pytest.mark.workflow
def test_bad_predict_cohort_image_stops_before_any_work(tmp_path):
    """The cohorts a model is applied to are checked like the training cohort: a damaged
    map stops the run while it is planned, not in that subject's job hours later."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    clinic = write_tiny_dataset(tmp_path / "clinic", default_rows(3))
    (clinic / "sub-01a/mre/sub-01a_stiffness.nii.gz").write_bytes(b"garbage")
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"clinic": str(clinic)}})
    work = tmp_path / "work"
    work.mkdir()
    result = snakemake(work, "--configfile", str(config))
    assert result.returncode != 0
    assert re.search(r"predict cohort clinic .*sub-01a: stiffness map .*clinic/sub-01a/mre/"
                     r"sub-01a_stiffness\.nii\.gz is not a readable NIfTI", result.stdout), \
        result.stdout
    assert not (work / "results").exists(), "nothing may be written to results/"


@pytest.mark.workflow
def test_a_predict_cohort_gives_the_map_the_training_preprocessing_was_built_around(tmp_path):
    """A model reading only the damping ratio, trained on [stiffness, damping_ratio]: its
    cohort's subjects are masked, registered (without a T1w) and QC'd by their stiffness
    maps, as the training subjects were, so a cohort without them stops the plan (found by
    a review: the cohort's chain was built around the damping ratio)."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6),
                              maps=("stiffness", "damping_ratio"))
    clinic = write_tiny_dataset(tmp_path / "clinic", default_rows(3),
                                maps=("stiffness", "damping_ratio"))
    (clinic / "sub-01a/mre/sub-01a_stiffness.nii.gz").unlink()
    config = user_config(
        tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
        experiments={"damping": {"seeds": [0], "variants": {
            "only": {"model": {"modalities": ["damping_ratio"]}}}}},
        predict={"cohorts": {"clinic": str(clinic)},
                 "model": {"experiment": "damping", "variant": "only", "seed": 0}})
    # dataset.modalities: written into the file (user_config takes whole sections)
    text = yaml.safe_load(config.read_text())
    text["dataset"]["modalities"] = ["stiffness", "damping_ratio"]
    config.write_text(yaml.safe_dump(text))
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode != 0
    assert re.search(r"predict cohort clinic .*sub-01a: stiffness map", result.stdout), \
        result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_missing_predict_cohort_folder_names_its_key(tmp_path):
    """A predict cohort's folder that does not exist is named with its own key; the message
    told the user to set dataset.root (the training cohort's, which was fine) or to turn
    on the demo's simulation."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"clinic": str(tmp_path / "clinik")}})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert re.search(r"predict cohort clinic \(config key predict\.cohorts\.clinic\): dataset "
                     r"root .*clinik does not exist\. Set config key predict\.cohorts\.clinic "
                     r"to the cohort's BIDS-like dataset folder", result.stdout), result.stdout
    assert "dataset.simulate.enabled" not in result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_missing_openbhb_release_names_its_key(tmp_path):
    """No rule writes the OpenBHB release: a folder without it stopped the plan with a
    MissingInputException of prepare_openbhb that named the file but not the setting."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    release = tmp_path / "openBHB"
    release.mkdir()
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         pretrain={"bhb": {"source": {"kind": "openbhb", "root": str(release)}}})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert "MissingInputException" not in result.stdout, result.stdout
    assert re.search(r"pretraining run bhb: .*openBHB/participants\.tsv is missing\. .*point "
                     r"config key pretrain\.bhb\.source\.root at that folder", result.stdout), \
        result.stdout
    # while rule all is planned, not only from prepare_openbhb's input: in a project with
    # finished outputs Snakemake did not ask that input, and the run ended on its
    # "filesystem latency" error
    assert "in check_openbhb_releases" in result.stdout, result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_two_simulations_into_one_folder_stop_naming_both_keys(tmp_path):
    """The demo's two simulations into one folder: Snakemake stopped with an
    AmbiguousRuleException between simulate_cohort and simulate_predict_cohort."""
    config = tmp_path / "same.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"root": "data/demo", "simulate": {"enabled": True}},
        "predict": {"cohorts": {"demo": "data/demo"}, "simulate": {"enabled": True},
                    "model": {"experiment": "table3", "variant": "yaware", "seed": 0}},
        "experiments": ONE_VARIANT}))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert "AmbiguousRuleException" not in result.stdout, result.stdout
    assert ("config keys 'dataset.root' and 'predict.cohorts.demo' are the same folder "
            "(data/demo), into which dataset.simulate and predict.simulate write their "
            "simulated cohorts") in result.stdout, result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_a_map_the_simulation_cannot_write_is_named_with_what_works(tmp_path):
    """The demo with loss_modulus among dataset.modalities was told to add it to
    dataset.simulate.maps, which the schema then refused (the simulator writes stiffness and
    damping_ratio only): two refusals sending the user back and forth."""
    config = tmp_path / "moduli.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"modalities": ["stiffness", "loss_modulus", "T1w"],
                    "simulate": {"enabled": True}},
        "experiments": ONE_VARIANT, "pretrain": {}, "predict": {"cohorts": {}}}))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert ("config key dataset.modalities needs loss_modulus, which the simulation "
            "(dataset.simulate) cannot write: it writes stiffness and damping_ratio only. Leave "
            "loss_modulus out of dataset.modalities (and model.modalities), or give your own "
            "data (dataset.simulate.enabled: false)."
            ) in " ".join(result.stdout.split()), result.stdout
    assert "add it to dataset.simulate.maps" not in result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
@pytest.mark.parametrize("model, variant_model, named", [
    ({"modalities": ["stiffness", "loss_modulus"]}, {}, "model.modalities"),
    ({}, {"modalities": ["stiffness", "loss_modulus"]},
     "experiments.table3.variants.adaptive.model.modalities"),
    ({"modalities": None}, {},
     "dataset.modalities (an unset model.modalities takes them all; that retrains the "
     "exported cell)")])
def test_a_map_the_predict_simulation_cannot_write_names_the_key_that_sets_it(
        tmp_path, model, variant_model, named):
    """The simulated predict cohort's refusal said to leave the map out of "the exported
    cell's model.modalities", a key with no list to edit when unset, and not the one that
    sets it when the exported variant overrides it."""
    config = tmp_path / "predict_moduli.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"root": "data", "simulate": {"enabled": False},
                    "modalities": ["stiffness", "loss_modulus", "T1w"]},
        "model": model,
        "experiments": {"table3": {"seeds": [0], "variants": {
            "adaptive": {"loss": {"name": "adaptive"}, "model": variant_model}}}},
        "predict": {"cohorts": {"demo": "new"}, "simulate": {"enabled": True, "cohort": "demo"},
                    "model": {"experiment": "table3", "variant": "adaptive", "seed": 0}},
        "pretrain": {}}))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert (f"the exported model (config key predict.model) needs loss_modulus, which the "
            f"simulation (predict.simulate) cannot write: it writes stiffness and damping_ratio "
            f"only. Leave loss_modulus out of {named}") in " ".join(result.stdout.split()), \
        result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_unknown_bias_reference_group_stops_before_any_work(tmp_path):
    """predict.bias_reference_group names a group of each cohort's table; a typo used to
    fail in predict_cohort, after the cohort's whole preprocessing. So did a group too
    small to fit the age-bias line."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    clinic = write_tiny_dataset(tmp_path / "clinic", [dict(row, group="patient")
                                                      for row in default_rows(2)])
    expected = {
        "controls": r"the age-bias reference group 'controls' \(config key "
                    r"predict.bias_reference_group.*\) is not a value of column 'group' of "
                    r".*clinic/participants\.tsv, whose groups are patient",
        "patient": r"group 'patient' .*: it has only 2 subjects; the line needs at least 3"}
    for group, message in expected.items():
        config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                             predict={"cohorts": {"clinic": str(clinic)},
                                      "bias_reference_group": group})
        result = snakemake(tmp_path, "-n", "--configfile", str(config))
        assert result.returncode != 0
        assert re.search(rf"predict cohort clinic .*{message}", result.stdout), result.stdout
    assert not (tmp_path / "results").exists()
    # a group large enough but for subjects the model has seen (their ids are the training
    # cohort's): a warning, since the key is one for every cohort and the others go on
    clinic = write_tiny_dataset(tmp_path / "clinic3", [dict(row, group="patient")
                                                       for row in default_rows(4)])
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"clinic": str(clinic)},
                                  "bias_reference_group": "patient"})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    assert re.search(r"Warning: predict cohort clinic: .*group 'patient' .*: it has only \d "
                     r"subjects? new to the model \(\d (is a subject|are subjects) the model "
                     r"has seen, by participant_id or by a byte-identical map.*\); the line "
                     r"needs at least 3 .* Its "
                     r"predict_cohort job will stop before embedding a subject: run with "
                     r"--keep-going", result.stdout), result.stdout


@pytest.mark.workflow
def test_a_simulated_cohort_missing_an_image_is_told_to_simulate_it_again(tmp_path):
    """The plan advised adding the file or removing the subject's row, edits that the next
    simulation of the demo's folder undoes."""
    from brainage.simulate import simulate_cohort

    root = tmp_path / "demo"
    simulate_cohort(root, n_subjects=10, seed=5, with_anatomy=False)
    missing = sorted(root.glob("sub-*/mre/*_stiffness.nii.gz"))[3]
    missing.unlink()
    config = tmp_path / "user.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"root": str(root), "modalities": ["stiffness"],
                    "simulate": {"enabled": True, "n_subjects": 10, "seed": 5,
                                 "maps": ["stiffness"]}},
        "train": {"batch_size": 4}, "loss": {"nn_final": 2}}))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert re.search(rf"{re.escape(missing.name)} .*is missing.*\n\s*But {re.escape(str(root))} "
                     rf"is the simulated cohort \(dataset\.simulate\.enabled\), which the next "
                     rf"simulation rewrites: instead of editing it, simulate it again with "
                     rf"--forcerun simulate_cohort", result.stdout), result.stdout


@pytest.mark.workflow
def test_a_new_simulated_root_under_finished_results_is_warned_of(tmp_path):
    """dataset.root moved (or mistyped) with the simulation on, over finished results: the
    checkpoint may never run for the new root, nothing reran, and describe_preprocessing
    named the empty new root as the source of the old cohort's results. A warning, not a
    refusal: another config sharing the results folder plans its simulation as before."""
    old = tmp_path / "old_demo"
    description = tmp_path / "results" / "preproc" / "dataset_description.json"
    description.parent.mkdir(parents=True)
    description.write_text(json.dumps({"SourceDatasets": [{"URL": old.as_uri()}]}))
    config = tmp_path / "user.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"root": str(tmp_path / "nonexist"),
                                                  "simulate": {"enabled": True}}}))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"simulate_cohort +1", result.stdout), result.stdout[-3000:]
    assert re.search(rf"config key dataset\.root \(.*nonexist\) holds no simulation yet, but "
                     rf"results/preproc/dataset_description\.json describes subjects "
                     rf"preprocessed from {re.escape(old.as_uri())}\. If this run plans no "
                     rf"simulate_cohort job, .*--forcerun simulate_cohort",
                     result.stdout), result.stdout[-3000:]
    # once a run named the empty root as the source (or the cohort was deleted after the
    # run), the warning stays: it erased itself after one run
    description.write_text(json.dumps({"SourceDatasets": [
        {"URL": (tmp_path / "nonexist").as_uri()}]}))
    again = snakemake(tmp_path, "-n", "--configfile", str(config)).stdout
    assert re.search(r"config key dataset\.root \(.*nonexist\) holds no simulation, but .* "
                     r"describes the results as preprocessed from it: .*Restore it, or "
                     r"simulate it again with --forcerun simulate_cohort", again), again[-3000:]


@pytest.mark.workflow
def test_a_predict_subject_without_the_models_map_is_told_to_add_it(tmp_path):
    """The maps a predict cohort needs are the exported model's inputs: the plan said that
    config key dataset.modalities lists the missing map and to remove it from the
    modalities, which would not change what the model reads."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    clinic = write_tiny_dataset(tmp_path / "clinic", default_rows(3))
    missing = next((clinic / "sub-02a" / "mre").glob("*_stiffness.nii.gz"))
    missing.unlink()
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"clinic": str(clinic)}})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert re.search(r"predict cohort clinic .*subject sub-02a: .*is missing; the model to "
                     r"apply \(config key predict\.model\) reads stiffness of every subject\. "
                     r"Add the file, or remove the subject's row from .*clinic/participants"
                     r"\.tsv\.", result.stdout), result.stdout
    assert "dataset.modalities" not in result.stdout, result.stdout
    assert not (tmp_path / "results").exists()
    # a cohort to predict may lack ages (predicted ages, no gaps), sexes and studies: planned
    rows = default_rows(3)
    rows[1]["age"] = "n/a"
    ageless = write_tiny_dataset(tmp_path / "ageless", rows)
    (ageless / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"{row['participant_id']}\n" for row in rows))
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"ageless": str(ageless)}})
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    assert job_counts(result.stdout)["predict_cohort"] == 1
    # its ids are those of training subjects (sub-00a ...): said once, as maybe the same people
    said = re.findall(r"Warning: predict cohort ageless .* has \d subject\(s\) with the "
                      r"participant_id of a subject the model has seen: sub-0\da \(train "
                      r"\(split holdout of dataset\.root\)\)", result.stdout)
    assert len(said) == 1, result.stdout
    assert re.search(r"each is marked in column seen_in_training of .*predict/ageless/"
                     r"predictions\.tsv and left out of its summary\.tsv", result.stdout)
    # the same ids in another case are the same people too (compared as the pretraining
    # cohort's leakage check compares them)
    rows = default_rows(3)
    for row in rows:
        row["participant_id"] = "sub-" + row["participant_id"][len("sub-"):].upper()
    upper = write_tiny_dataset(tmp_path / "upper", rows)
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"upper": str(upper)}})
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    assert re.search(r"Warning: predict cohort upper .* has \d subject\(s\) with the "
                     r"participant_id of a subject the model has seen: .*sub-0\dA \(train "
                     r"\(split holdout of dataset\.root\), as sub-0\da\)", result.stdout), \
        result.stdout
    # and without the leading zeros that a spreadsheet drops (sub-1a for sub-01a); under
    # predict.bias_fit test the split's test subjects are seen too, by the age-bias line
    rows = default_rows(6)
    for row in rows:
        row["participant_id"] = "sub-" + row["participant_id"][len("sub-0"):]
    unpadded = write_tiny_dataset(tmp_path / "unpadded", rows)
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"unpadded": str(unpadded)}, "bias_fit": "test"})
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    said = re.search(r"Warning: predict cohort unpadded .* has 6 subject\(s\) with the "
                     r"participant_id of a subject the model has seen: (.*)\. If they",
                     result.stdout)
    assert said, result.stdout
    assert re.search(r"sub-\da \(train \(split holdout of dataset\.root\), as sub-0\da\)",
                     said.group(1)), said.group(1)
    assert re.search(r"sub-\da \(age-bias line \(split holdout test, predict\.bias_fit test\), "
                     r"as sub-0\da\)", said.group(1)), said.group(1)
    # ids that only coincide: the lab says they are other people, for that cohort only
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"unpadded": str(unpadded), "upper": str(upper)},
                                  "unrelated_cohorts": ["unpadded"]})
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    assert re.findall(r"Warning: predict cohort (\w+) .* has seen", result.stdout) == ["upper"]
    # a misspelt cohort would silently keep the subjects out
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"unpadded": str(unpadded)},
                                  "unrelated_cohorts": ["unpaded"]})
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode != 0 and re.search(
        r"config key predict\.unrelated_cohorts names unpaded, which predict\.cohorts does "
        r"not have \(it has unpadded\)", result.stdout), result.stdout
    # the same scans exported again under a clinic's ids: found by their bytes, whatever
    # the ids and also in a cohort of predict.unrelated_cohorts
    rows = [{**row, "participant_id": f"sub-c{index}"} for index, row in
            enumerate(default_rows(6))]
    copies = write_tiny_dataset(tmp_path / "copies", rows)
    for index, row in enumerate(default_rows(6)):
        label = row["participant_id"][len("sub-"):]
        shutil.copyfile(root / f"sub-{label}" / "mre" / f"sub-{label}_stiffness.nii.gz",
                        copies / f"sub-c{index}" / "mre" / f"sub-c{index}_stiffness.nii.gz")
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"copies": str(copies)},
                                  "unrelated_cohorts": ["copies"]})
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    said = re.search(r"Warning: predict cohort copies .* has (\d) subject\(s\) with an MRE "
                     r"map byte-identical to one the model has seen \(the same scan\): (.*)\. "
                     r"Their predictions are optimistic: each is marked .*refit\.$",
                     result.stdout, flags=re.MULTILINE)
    assert said, result.stdout
    matched = re.findall(r"sub-c(\d) \(train \(split holdout of dataset\.root\): a map "
                         r"byte-identical to sub-0(\d)a's\)", said.group(2))
    assert len(matched) == int(said.group(1)) == 5  # the split holds one of 6 out
    assert all(copy == original for copy, original in matched)


@pytest.mark.workflow
def test_the_plan_says_when_voxel_read_outs_need_more_memory_than_evaluation_gets(tmp_path):
    """PCA + Ridge on the voxels holds every subject's voxels (about 8 MB per subject and
    map at 2 mm): from about 1,000 subjects the default 8,000 MB stopped its jobs for memory
    on a cluster, after the whole grid had trained, with nothing said before."""
    from brainage.config import voxel_readout_memory_mb

    assert voxel_readout_memory_mb(1000, 1, 2) == 8922  # 7.9 MB per subject, + 1,000
    assert voxel_readout_memory_mb(1000, 1, 8) == 1123  # a 64th of the voxels
    assert voxel_readout_memory_mb(1000, 3, 2) == 24768
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         resources={"evaluate": {"mem_mb": 1000}})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    said = re.findall(r"Warning: the evaluate_encoder jobs of table3/pca_ridge fit their "
                      r"read-out on the voxels of 6 subjects and need about 1,047 MB each; "
                      r"config key resources\.evaluate\.mem_mb gives 1,000\. Raise it",
                      result.stdout)
    assert len(said) == 1, result.stdout


@pytest.mark.workflow
def test_valid_user_dataset_plans_every_subject(tmp_path):
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    # 5 training subjects: the paper's batch of 32 stops the run (the next test)
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    counts = job_counts(result.stdout)
    assert counts["strip_skull"] == counts["correct_and_register"] == 6
    assert counts["normalise_dataset"] == 1
    assert "no longer lists" not in result.stdout
    # a subject whose row was removed keeps its derivative folder: named, once
    (tmp_path / "results" / "preproc" / "sub-gone1" / "anat").mkdir(parents=True)
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    said = re.findall(r"Warning: results/preproc holds 1 subject folder\(s\) that .*"
                      r"participants\.tsv no longer lists: sub-gone1\. Nothing uses their "
                      r"files", result.stdout)
    assert len(said) == 1, result.stdout
    assert "left the cohort" in result.stdout
    # the demo's subjects, when a lab runs its data in the demo's working directory: they
    # never were this dataset's, and the description says where they came from
    (tmp_path / "results" / "preproc" / "dataset_description.json").write_text(json.dumps(
        {"SourceDatasets": [{"URL": "file:///elsewhere/resources/demo/dataset"}]}))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    assert re.search(r"participants\.tsv does not list: sub-gone1\. .* preprocessed from "
                     r"file:///elsewhere/resources/demo/dataset, another dataset\. Give each "
                     r"dataset a results folder of its own", result.stdout), result.stdout
    assert "left the cohort" not in result.stdout
    # a project moved to another path: its description names the old path, but listed
    # subjects have their folders there, so the departed ones left the cohort
    (tmp_path / "results" / "preproc" / "sub-00a").mkdir()
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert "no longer lists: sub-gone1" in result.stdout and "left the cohort" in result.stdout
    # a cohort to predict's subject who withdrew: its brain images stayed without a word
    rows = [{**row, "participant_id": f"sub-c{index}"} for index, row in
            enumerate(default_rows(3))]
    clinic = write_tiny_dataset(tmp_path / "clinic", rows)
    (tmp_path / "results" / "predict" / "clinic" / "preproc" / "sub-left1" / "mre").mkdir(
        parents=True)
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"clinic": str(clinic)}})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    assert re.search(r"Warning: results/predict/clinic/preproc holds 1 subject folder\(s\) "
                     r"that .*clinic/participants\.tsv no longer lists: sub-left1\. Nothing "
                     r"uses their files.*left the cohort \(README: Removing a subject",
                     result.stdout), result.stdout


@pytest.mark.workflow
def test_summaries_of_a_bundle_without_its_lines_statistics_are_named_at_planning(tmp_path):
    """After the upgrade that widened predict's group intervals by the age-bias line's own
    uncertainty, finished summaries kept the narrow ones (no rule's code changed), and the
    job's warning came only with a rerun that nothing planned (a review)."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    clinic = write_tiny_dataset(tmp_path / "clinic", [
        {**row, "participant_id": f"sub-c{index}"} for index, row in enumerate(default_rows(3))])
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2},
                         predict={"cohorts": {"clinic": str(clinic)}})
    summary = tmp_path / "results" / "predict" / "clinic" / "summary.tsv"
    summary.parent.mkdir(parents=True)
    summary.write_text("group\n")
    manifest = tmp_path / "results" / "models" / "brainage" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    line = {"intercept": 2.0, "slope": -0.1, "n_subjects": 32}  # as exported before
    manifest.write_text(json.dumps({"bias_correction": line}))
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    said = re.findall(r"Warning: the group intervals of results/predict/clinic/summary\.tsv take "
                      r"the age-bias line as exact \(too narrow\).*For the full intervals: "
                      r"snakemake predict --forcerun "
                      r"results/train/holdout/table3/adaptive/seed-0/metrics\.json ", result.stdout)
    assert len(said) == 1, result.stdout
    # not in the run it recommends, nor for a damaged record (predict_cohort names that)
    metrics = "results/train/holdout/table3/adaptive/seed-0/metrics.json"
    result = snakemake(tmp_path, "-n", "predict", "--forcerun", metrics, "--configfile", str(config))
    assert result.returncode == 0 and "as exact" not in result.stdout, result.stdout
    manifest.write_text(json.dumps({"bias_correction": None}))
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode == 0 and "as exact" not in result.stdout, result.stdout
    manifest.write_text(json.dumps({"bias_correction": {
        **line, "age_mean": 45.0, "age_sxx": 9000.0, "residual_variance": 16.0}}))
    result = snakemake(tmp_path, "-n", "predict", "--configfile", str(config))
    assert result.returncode == 0 and "as exact" not in result.stdout, result.stdout


@pytest.mark.workflow
def test_the_warnings_of_the_runs_jobs_are_named_at_its_end(tmp_path):
    """Snakemake shows a job's log only when the job fails (on SLURM its stderr goes to a
    file): a warning of a job that succeeded was seen only by whoever read every log."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6), with_anat=True)
    config = user_config(tmp_path, root)
    home = tmp_path / "freesurfer_home"  # FreeSurfer half there: auto warns, deepbet runs
    home.mkdir()
    mask = subject_files(Layout(), "00a")["mask"]
    environment = local_snakemake_environment(FREESURFER_HOME=str(home))
    run = [*SNAKEMAKE, "--directory", str(tmp_path), "--cores", "1", mask,
           "--configfile", str(config)]
    result = subprocess.run(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=240, env=environment)
    assert result.returncode == 0, result.stdout
    summary = result.stdout[result.stdout.index("steps (100%) done"):]
    # and the tiny fixture's brain, far below any real one's volume
    listed = (r"brainage: the jobs of this run logged 2 warning\(s\); read them before "
              r"the results \(paths relative to the run's folder\):\n  "
              r"logs/preproc/sub-00a/strip_skull\.log: "
              r"preprocess\.skullstrip auto: FREESURFER_HOME is set \(.*\) but "
              r"mri_synthstrip is not on PATH.*\n  logs/preproc/sub-00a/strip_skull\.log: "
              r"subject sub-00a: the brain mask deepbet made of the T1w .* holds \d+ ml")
    assert re.search(listed, summary), summary
    # and in Snakemake's own log of the run, read after the terminal's scrollback is gone
    run_log = max((tmp_path / ".snakemake" / "log").glob("*.snakemake.log"))
    assert re.search(listed, run_log.read_text()), run_log.read_text()[-3000:]
    # the next run ran no job: the earlier run's warnings are not repeated
    again = subprocess.run(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=240, env=environment)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout
    assert "logged" not in again.stdout


def test_a_job_that_fails_while_importing_says_why_in_its_log(tmp_path):
    """Every script imports PyTorch, ANTsPy or nibabel before it calls log_to_file: a failure
    there (a CUDA library missing on a node) left the log Snakemake points to empty, and the
    attempt out of the log's history. The package opens the log at its first import; the
    script's own call then opens no second attempt."""
    (tmp_path / "broken.py").write_text(
        "import brainage  # a Snakemake job's log is opened here\n"
        "import a_library_missing_on_this_node\n")
    (tmp_path / "fine.py").write_text(
        "import logging\n"
        "from brainage.logs import log_to_file\n"
        "log_to_file(snakemake.log[0])\n"
        "logging.getLogger('brainage').info('done')\n"
        "open(snakemake.output[0], 'w').close()\n")
    (tmp_path / "Snakefile").write_text(
        "rule broken:\n    output: 'broken.txt'\n    log: 'logs/broken.log'\n"
        "    script: 'broken.py'\n\n"
        "rule fine:\n    output: 'fine.txt'\n    log: 'logs/fine.log'\n"
        "    script: 'fine.py'\n")
    # as this workflow's jobs run (brainage.io.prepare_job_environment)
    environment = local_snakemake_environment(PYTHONPATH=str(REPO / "workflow"),
                                              BRAINAGE_PACKAGE_DIR=str(REPO / "workflow"))
    run = [sys.executable, "-m", "snakemake", "--directory", str(tmp_path), "--cores", "1",
           "-s", str(tmp_path / "Snakefile"), "--retries", "1"]
    broken = subprocess.run([*run, "broken.txt"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=120, env=environment)
    assert broken.returncode != 0, broken.stdout
    log = (tmp_path / "logs" / "broken.log").read_text()
    assert re.findall(r"^===== attempt (\d+)", log, flags=re.M) == ["1", "2"], log
    assert log.count("ModuleNotFoundError: No module named 'a_library_missing_on_this_node'"
                     ) == 2, log
    fine = subprocess.run([*run, "fine.txt"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120, env=environment)
    assert fine.returncode == 0, fine.stdout
    log = (tmp_path / "logs" / "fine.log").read_text()
    assert re.findall(r"^===== attempt (\d+)", log, flags=re.M) == ["1"], log
    assert log.count("INFO brainage: done") == 1, log
    # another lab's workflow that imports the package in a script of its own keeps its
    # logging (handlers, level, format), its hooks and its signals
    (tmp_path / "lab.py").write_text(
        "import logging, signal, sys\n"
        "logging.basicConfig(filename=snakemake.log[0], level=logging.DEBUG,\n"
        "                    format='LAB %(levelname)s %(message)s')\n"
        "hooks = (sys.excepthook, sys.exit, signal.getsignal(signal.SIGTERM))\n"
        "import brainage.apply\n"
        "assert (sys.excepthook, sys.exit, signal.getsignal(signal.SIGTERM)) == hooks\n"
        "logging.getLogger('lab').debug('after the import')\n"
        "open(snakemake.output[0], 'w').close()\n")
    with open(tmp_path / "Snakefile", "a") as snakefile:
        snakefile.write("\nrule lab:\n    output: 'lab.txt'\n    log: 'logs/lab.log'\n"
                        "    script: 'lab.py'\n")
    lab = subprocess.run([*run, "lab.txt"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=120,
                         env=local_snakemake_environment(PYTHONPATH=str(REPO / "workflow")))
    assert lab.returncode == 0, lab.stdout
    log = (tmp_path / "logs" / "lab.log").read_text()
    assert log.endswith("LAB DEBUG after the import\n") and "=====" not in log, log
    assert not (tmp_path / "logs" / ".lab.log.attempts").exists()


def test_jobs_import_the_checkouts_package_not_another_on_the_path(tmp_path):
    """Snakemake appends a script's folder to sys.path, behind PYTHONPATH and site-packages:
    another brainage there (a stale install, a colleague's checkout) ran the jobs planned
    by this checkout, unnoticed. Here the other copy cannot even be imported."""
    other = tmp_path / "other_copy" / "brainage"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('the other copy of brainage')\n")
    template = Layout().template("brain_mask")
    result = subprocess.run(
        [*SNAKEMAKE, "--directory", str(tmp_path), "--cores", "1", template],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240,
        env=local_snakemake_environment(PYTHONPATH=str(other.parent)))
    assert result.returncode == 0, result.stdout
    assert (tmp_path / template).is_file()
    assert "the other copy" not in result.stdout


ONE_VARIANT = {"table3": {"seeds": [0], "variants": {"yaware": {"loss": {"name": "yaware"}}}}}


@pytest.mark.workflow
def test_dry_run_stops_on_a_batch_larger_than_the_training_split(tmp_path):
    """10 subjects, 30% held out: 7 train; a batch of 64 used to fail only in train_encoder,
    after the whole preprocessing."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(10))
    config = user_config(tmp_path, root, split={"scheme": "holdout", "test_fraction": 0.3},
                         train={"batch_size": 64}, experiments=ONE_VARIANT)
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert ("config key train.batch_size is 64 (used by experiments.table3.variants.yaware) "
            "but split holdout has only 7 training subjects") in result.stdout, result.stdout
    assert ("For a first run on a CPU, take config/config.yaml's normalise, train, model "
            "and loss keys") in " ".join(result.stdout.split()), result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_the_demo_config_on_a_labs_results_stops_naming_the_missing_configfile(tmp_path):
    """--configfile forgotten once (the README's most repeated caveat): the demo's config
    simulated its cohort into the lab's working directory and replaced the lab's QC table,
    tables and bundle under their own names, with one warning that pointed elsewhere."""
    root = write_tiny_dataset(tmp_path / "my data Zürich", default_rows(6))  # %20, %C3%BC
    description = tmp_path / Layout().preproc_description()
    description.parent.mkdir(parents=True)
    description.write_text(json.dumps({"Name": "lab", "DatasetType": "derivative",
                                       "SourceDatasets": [{"URL": root.resolve().as_uri()}]}))
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert ("no --configfile was given, so this run is the built-in demo's "
            "config/config.yaml, but") in result.stdout, result.stdout
    assert not (tmp_path / "resources").exists()  # nothing simulated into the lab's folder
    # a table that is a link to content not fetched (DataLad) is the lab's data too
    table = root / "participants.tsv"
    table.unlink()
    table.symlink_to(root / ".git" / "annex" / "objects" / "not-fetched")
    assert "no --configfile was given" in snakemake(tmp_path, "-n").stdout
    # a copied demo project names the old folder's simulated cohort, and the demo plans
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "demo", "GeneratedBy": [{"Name": "brainage.simulate"}]}))
    result = snakemake(tmp_path, "-n")
    assert "no --configfile was given" not in result.stdout, result.stdout
    # ... and so does a moved one: the folder its results name is gone
    shutil.rmtree(root)
    result = snakemake(tmp_path, "-n")
    assert "no --configfile was given" not in result.stdout, result.stdout


@pytest.mark.workflow
def test_a_template_file_that_is_not_there_stops_the_plan_naming_its_key(tmp_path):
    """A misspelt template.mask in a finished project: Snakemake dropped prepare_template
    (outputs there, input missing) without a word, and the bundle exported next named the
    missing file as the template the model was registered to."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(10))
    t1 = tmp_path / "tpl_T1w.nii.gz"
    t1.write_bytes(b"not read by a dry run")
    config = user_config(tmp_path, root, experiments=ONE_VARIANT, train={"batch_size": 4},
                         template={"source": "file", "space": "MNI152NLin6Asym",
                                   "t1": str(t1), "mask": str(tmp_path / "typo_mask.nii.gz")})
    layout = Layout()
    for name in ("T1w", "brain_mask"):  # a finished project's template
        made = tmp_path / layout.template(name)
        made.parent.mkdir(parents=True, exist_ok=True)
        made.write_bytes(b"made before")
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert (f"config key template.mask is {str(tmp_path / 'typo_mask.nii.gz')!r}, which is "
            f"not a file") in result.stdout, result.stdout


def _write_qc_files(project: Path, root: Path, *, failing: int) -> list[str]:
    """QC files of an earlier run for every subject of ``root``, the first ``failing``
    failing on coverage; returns their participant_ids."""
    participants = [line.split("\t")[0] for line in
                    (root / "participants.tsv").read_text().splitlines()[1:]]
    for number, pid in enumerate(participants):
        path = project / subject_files(Layout(), pid[len("sub-"):])["qc_json"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"participant_id": pid, "dice": 0.95, "correlation": 0.8,
                                    "coverage": 0.5 if number < failing else 0.9}))
    return participants[:failing]


@pytest.mark.workflow
def test_dry_run_warns_when_qc_exclusions_leave_a_split_fewer_subjects_than_a_batch(tmp_path):
    """qc.exclude_failed drops the subjects failing QC after the plan's batch check, which
    counted them: every train_encoder job then failed, after the normalisation, naming a
    pretraining key and not QC. Where the QC files of an earlier run are there, the plan
    says it, as a warning: this run may preprocess those subjects again."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(10))
    config = user_config(tmp_path, root, split={"scheme": "holdout", "test_fraction": 0.3},
                         train={"batch_size": 6}, qc={"exclude_failed": True},
                         experiments=ONE_VARIANT)
    failing = _write_qc_files(tmp_path, root, failing=5)  # 7 train, 3 test: at most 5 left
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    assert re.search(r"Warning: config: config key train\.batch_size is 6 \(used by "
                     r"experiments\.table3\.variants\.yaware\) but split holdout has only "
                     r"[0-5] training subjects \(after qc\.exclude_failed leaves out the 5 "
                     r"subject\(s\) whose QC files fail: " + re.escape(", ".join(failing))
                     + r"\)\. Lower train\.batch_size to at most [0-5]\. Else the jobs that "
                     r"train with this batch fail", result.stdout), result.stdout
    for path in (tmp_path / "results" / "preproc").rglob("*_qc.json"):  # all pass: nothing
        path.write_text(path.read_text().replace('"coverage": 0.5', '"coverage": 0.9'))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0 and "qc.exclude_failed leaves out" not in result.stdout


@pytest.mark.workflow
def test_dry_run_warns_when_qc_exclusions_leave_the_search_fewer_subjects_than_its_batch(
        tmp_path):
    """The random search's trials train on what its validation hold-out leaves of a split:
    the plan's warning about QC exclusions counted only the grid's cells, so a search job
    failed after the normalisation without one."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(10))
    config = user_config(tmp_path, root, split={"scheme": "holdout", "test_fraction": 0.3},
                         train={"batch_size": 3}, qc={"exclude_failed": True},
                         experiments=ONE_VARIANT,
                         search={"enabled": True, "validation_fraction": 0.5,
                                 "nn_final_range": [2, 3]})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0 and "Warning" not in result.stdout, result.stdout
    failing = _write_qc_files(tmp_path, root, failing=6)  # of the 7 training, 4 left at most
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    assert re.search(r"Warning: config: config key train\.batch_size is 3, the batch of the "
                     r"random search's trials \(search\.enabled\), but split holdout leaves "
                     r"them only [0-2] training subjects once .* held out for validation "
                     r"\(after qc\.exclude_failed leaves out the 6 subject\(s\) whose QC "
                     r"files fail: " + re.escape(", ".join(failing)) + r"\)\. .*Else the jobs "
                     r"that train with this batch fail after the normalisation",
                     result.stdout), result.stdout


@pytest.mark.workflow
@pytest.mark.parametrize("target", [
    "results/pretrain/t1x/qc.tsv",                                  # no such run: a KeyError
    "results/train/fold1/table3/yaware/seed-0/metrics.json",        # holdout: a job that failed
    "results/train/holdout/table3/yaware/seed-00/metrics.json",     # seed-0 planned twice
    "results/train/holdout/table3/adaptive/seed-0/metrics.json",    # no such variant
    "results/predict/clinic/predictions.tsv",                       # no such cohort: a KeyError
], ids=["pretraining-run", "split", "seed", "variant", "cohort"])
def test_a_file_the_config_does_not_define_has_no_rule(tmp_path, target):
    """The wildcards match the names the config defines: a file of a pretraining run,
    split, cell or cohort it lacks (a typed target, a run since removed) stopped the plan
    with a KeyError in an input function, or was planned and failed when it ran."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(10))
    config = user_config(tmp_path, root, train={"batch_size": 4}, experiments=ONE_VARIANT,
                         pretrain={"t1w": {"source": {"kind": "simulate", "n_subjects": 8},
                                           "train": {"batch_size": 4}}})
    result = snakemake(tmp_path, "-n", target, "--configfile", str(config))
    assert result.returncode != 0
    assert f"No rule to produce {target}" in result.stdout, result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
@pytest.mark.parametrize("variant, expected", [
    ("mean", "table3/mean/seed-0 has no encoder (model.encoder: none), so it has no "
             "encoder.pt"),
    ("yaware_twin", "table3/yaware_twin/seed-0 trains no encoder of its own: cells with "
                    "equal training settings share the one trained first, "
                    "results/train/holdout/table3/yaware/seed-0/encoder.pt"),
], ids=["baseline-without-encoder", "shared-encoder"])
def test_a_typed_encoder_of_a_cell_that_trains_none_stops_the_plan(tmp_path, variant,
                                                                   expected):
    """A training output typed by hand for a baseline without an encoder was planned and
    failed after the preprocessing; for a cell sharing an earlier cell's encoder (only
    its read-out differs) it trained that encoder a second time. (user_config writes the
    variants in sorted order: yaware is the first of the two equal ones.)"""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(10))
    experiments = {"table3": {"seeds": [0], "variants": {
        "yaware": {"loss": {"name": "yaware"}},
        "yaware_twin": {"loss": {"name": "yaware"}, "readout": {"alphas": [1.0, 10.0]}},
        "mean": {"model": {"encoder": "none"}, "readout": {"method": "train_mean"}}}}}
    config = user_config(tmp_path, root, train={"batch_size": 4}, experiments=experiments)
    target = f"results/train/holdout/table3/{variant}/seed-0/encoder.pt"
    result = snakemake(tmp_path, "-n", target, "--configfile", str(config))
    assert result.returncode != 0
    assert expected in " ".join(result.stdout.split()), result.stdout
    assert not (tmp_path / "results").exists()
    own = snakemake(tmp_path, "-n", "results/train/holdout/table3/yaware/seed-0/encoder.pt",
                    "--configfile", str(config))
    assert own.returncode == 0 and "train_encoder" in own.stdout, own.stdout


@pytest.mark.workflow
def test_dry_run_stops_on_a_search_batch_larger_than_its_training_subjects(tmp_path):
    """7 training subjects fit a batch of 6, but the random search holds half of them out
    for validation and its trials train on fewer: that used to fail only in the search
    job, after the whole preprocessing."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(10))
    config = user_config(tmp_path, root, split={"scheme": "holdout", "test_fraction": 0.3},
                         train={"batch_size": 6}, experiments=ONE_VARIANT,
                         search={"enabled": True, "validation_fraction": 0.5,
                                 "nn_final_range": [2, 4]})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert ("config key train.batch_size is 6, the batch of the random search's trials "
            "(search.enabled), but split holdout leaves them only") in result.stdout, \
        result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_a_pilot_is_told_the_searchs_limit_first_and_its_subjects_without_a_t1w(tmp_path):
    # a 12-subject pilot under the paper's defaults was refused three times in a row (the
    # grid's batch limit, then the search's smaller one, then nn_final); and its subject
    # without a T1w was named only by tabulate_qc, after every subject's preprocessing
    rows = [dict(row, age=20.0 + 5 * number) for number, row in enumerate(default_rows(12))]
    root = write_tiny_dataset(tmp_path / "dataset", rows, with_anat=True)
    (root / "sub-03a" / "anat" / "sub-03a_T1w.nii.gz").unlink()
    config = user_config(tmp_path, root, split={"scheme": "holdout", "test_fraction": 0.2},
                         experiments={"table3": {"seeds": [0], "variants": {
                             "adaptive": {"loss": {"name": "adaptive", "nn_final": 14}}}}},
                         search={"enabled": True, "validation_fraction": 0.5,
                                 "nn_final_range": [2, 4]})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert ("1 of 12 subjects in " + str(root) + " (config key dataset.root) have no T1w "
            "(anat/sub-<label>_T1w.nii.gz): sub-03a.") in result.stdout, result.stdout
    refusal = result.stdout[result.stdout.index("invalid configuration"):]
    assert ("the batch of the random search's trials (search.enabled), but split holdout "
            "leaves them only 5 training subjects") in refusal, refusal
    assert ("Lower train.batch_size to at most 5 or search.validation_fraction, and "
            "experiments.table3.variants.adaptive.loss.nn_final (14) to at most the new batch "
            "size") in refusal, refusal


@pytest.mark.workflow
def test_dry_run_stops_on_an_adaptive_schedule_longer_than_the_training(tmp_path):
    config = tmp_path / "short.yaml"
    config.write_text(yaml.safe_dump({
        "train": {"epochs": 2}, "loss": {"name": "adaptive", "nn_step": 2},
        "experiments": {"table3": {"seeds": [0], "variants": {"adaptive": {}}}}}))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert "config key experiments.table3.variants.adaptive (loss.name adaptive)" in result.stdout
    assert "train.epochs 2" in result.stdout and "loss.nn_step 2" in result.stdout


# -- after a kill ----------------------------------------------------------------------------

def _incomplete_marker(workdir: Path, output: str) -> None:
    """An incomplete marker as Snakemake 9 writes it (persistence/file.py)."""
    folder = workdir / ".snakemake" / "incomplete"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / base64.urlsafe_b64encode(output.encode()).decode()).write_text(
        '{"external_jobid": null}')


def test_interrupted_run_notice_reports_locks_and_existing_incomplete_outputs(tmp_path):
    assert interrupted_run_notice(tmp_path) is None
    _incomplete_marker(tmp_path, "results/never_written.npy")  # Snakemake ignores these
    assert interrupted_run_notice(tmp_path) is None
    (tmp_path / "results" / "embeddings").mkdir(parents=True)
    _incomplete_marker(tmp_path, "results/embeddings")
    notice = interrupted_run_notice(tmp_path)
    assert "1 unfinished output(s): results/embeddings" in notice
    assert "--rerun-incomplete" in notice and "--unlock" not in notice
    (tmp_path / ".snakemake" / "locks").mkdir()
    (tmp_path / ".snakemake" / "locks" / "0.output.lock").write_text("results/embeddings\n")
    notice = interrupted_run_notice(tmp_path)
    assert "1 lock file(s)" in notice and notice.count("\n") == 0
    assert notice.index("--unlock") < notice.index("--rerun-incomplete")


def test_interrupted_run_notice_names_the_forcerun_that_resumes_a_killed_training(tmp_path):
    """A demo cell retrained with --forcerun and killed: --rerun-incomplete, as the notice
    said, planned nothing for it (its evaluation up to date, Snakemake did not see the
    unfinished files behind the simulated cohort's checkpoint), run after run."""
    cell = "results/train/holdout/table3/simclr/seed-1"
    (tmp_path / cell / "embeddings").mkdir(parents=True)
    (tmp_path / cell / "history.tsv").write_text("epoch\tloss\n1\t2.0\n")
    for name in ("history.tsv", "embeddings", "encoder.pt"):
        _incomplete_marker(tmp_path, f"{cell}/{name}")
    notice = interrupted_run_notice(tmp_path)
    assert notice.endswith(f"if that run plans nothing for them, as after a --forcerun of the "
                           f"killed job, add --forcerun {cell}/encoder.pt).")
    (tmp_path / cell / "history.tsv").unlink()
    shutil.rmtree(tmp_path / cell / "embeddings")
    # another job's: a subject's registration forced and stopped with Ctrl-C left three of
    # its outputs, and --rerun-incomplete, as the notice said, planned nothing, run after run
    anat = "results/preproc/sub-st1s007/anat"
    (tmp_path / anat).mkdir(parents=True)
    for name in ("sub-st1s007_desc-biascorr_reference.nii.gz",
                 "sub-st1s007_desc-biascorr_stiffness.nii.gz"):
        (tmp_path / anat / name).write_bytes(b"finished before the kill")
        _incomplete_marker(tmp_path, f"{anat}/{name}")
    assert interrupted_run_notice(tmp_path).endswith(
        f"if that run plans nothing for them, as after a --forcerun of the killed job, add "
        f"--forcerun {anat}/sub-st1s007_desc-biascorr_reference.nii.gz "
        f"{anat}/sub-st1s007_desc-biascorr_stiffness.nii.gz).")


def test_interrupted_run_notice_tells_a_live_run_from_a_killed_one(tmp_path):
    """A second terminal's (or a colleague's) run in the same folder holds the locks too:
    the notice told to --unlock and --rerun-incomplete "if none is running", with no way
    to tell, which starts a second copy of the live run's jobs. A Snakemake working in the
    folder on this machine is named, and no --unlock is advised."""
    (tmp_path / ".snakemake" / "locks").mkdir(parents=True)
    (tmp_path / ".snakemake" / "locks" / "0.output.lock").write_text("results/x\n")
    program = tmp_path / "bin" / "snakemake"  # what a running Snakemake's command line shows
    program.parent.mkdir()
    program.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    program.chmod(0o755)
    live = subprocess.Popen([str(program), "--cores", "2"], cwd=tmp_path)
    # processes that only name Snakemake: watching its log, or the run's own `| tee`
    watchers = [subprocess.Popen(["tail", "-f", "/dev/null", "x.snakemake.log"], cwd=tmp_path,
                                 stderr=subprocess.DEVNULL),
                subprocess.Popen(["tee", "snakemake.log"], cwd=tmp_path, stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not Path(f"/proc/{live.pid}/cmdline").read_bytes():
            time.sleep(0.05)
        notice = interrupted_run_notice(tmp_path)
        assert f"another Snakemake run is working in {tmp_path.resolve()} on this machine " \
               f"(process {live.pid}; 1 lock file(s)" in notice, notice
        assert "do not add --unlock" in notice and "--rerun-incomplete" not in notice
        elsewhere = tmp_path / "elsewhere"
        (elsewhere / ".snakemake" / "locks").mkdir(parents=True)
        (elsewhere / ".snakemake" / "locks" / "0.output.lock").write_text("results/x\n")
        assert "run the same command once with --unlock" in interrupted_run_notice(elsewhere)
    finally:
        for process in (live, *watchers):
            process.kill()
            process.wait()
    watchers = [subprocess.Popen(["tail", "-f", "/dev/null", "x.snakemake.log"], cwd=tmp_path,
                                 stderr=subprocess.DEVNULL)]
    try:  # the watcher alone is no run
        assert "run the same command once with --unlock" in interrupted_run_notice(tmp_path)
    finally:
        watchers[0].kill()
        watchers[0].wait()
    # a colleague's run: /proc hides its folder, the lock file names its owner
    if os.getuid() == 0:
        os.chown(tmp_path / ".snakemake" / "locks" / "0.output.lock", 65534, 65534)
        notice = interrupted_run_notice(tmp_path)
        assert re.search(r"the locks are (nobody|uid 65534)'s: ask whether their run still "
                         r"works before you --unlock", notice), notice


def test_interrupted_run_notice_names_the_first_outputs_in_order(tmp_path):
    """Sorted paths, the first three named and ', ...' only when there are more; a path
    whose marker name is too long for one folder entry (Snakemake cuts it into pieces
    nested as folders, all but the last prefixed with '@') is decoded like any other."""
    names = ["results/d", "results/b", "results/c"]
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        _incomplete_marker(tmp_path, name)
    notice = interrupted_run_notice(tmp_path)
    assert "3 unfinished output(s): results/b, results/c, results/d)" in notice

    long = f"results/{'a' * 150}/{'b' * 150}"
    (tmp_path / long).mkdir(parents=True)
    encoded = base64.urlsafe_b64encode(long.encode()).decode()
    assert len(encoded) > 254
    pieces = [encoded[start:start + 254] for start in range(0, len(encoded), 254)]
    marker = tmp_path.joinpath(".snakemake", "incomplete",
                               *(f"@{piece}" for piece in pieces[:-1]), pieces[-1])
    marker.parent.mkdir(parents=True)
    marker.write_text('{"external_jobid": null}')
    notice = interrupted_run_notice(tmp_path)
    assert f"4 unfinished output(s): {long}, results/b, results/c, ...)" in notice


def test_interrupted_run_notice_names_the_slurm_jobs_to_cancel(tmp_path):
    """Jobs of a killed SLURM run stay queued or running; a rerun started each a second
    time beside it, two trainings writing one cell. The notice names the run ID (the jobs'
    name) from the newest Snakemake log that has one, only when a run was interrupted."""
    logs = tmp_path / ".snakemake" / "log"
    logs.mkdir(parents=True)
    older = logs / "2026-12-01T100000.000000.snakemake.log"
    older.write_text("Building DAG of jobs...\nSLURM run ID: 11111111-aaaa\nJob 1 ...\n")
    killed = logs / "2026-12-02T100000.000000.snakemake.log"
    killed.write_text("Building DAG of jobs...\nUsing shell: /usr/bin/bash\n"
                      "SLURM run ID: 90d6e715-404b-4598\nJob 3 has been submitted\n")
    os.utime(older, (1, 1))
    assert interrupted_run_notice(tmp_path) is None  # nothing was interrupted
    (tmp_path / ".snakemake" / "locks").mkdir()
    (tmp_path / ".snakemake" / "locks" / "0.output.lock").write_text("results/x\n")
    notice = interrupted_run_notice(tmp_path)
    assert "`scancel --name 90d6e715-404b-4598`" in notice and "11111111" not in notice
    assert notice.index("scancel") < notice.index("--unlock") < notice.index("--rerun-incomplete")
    # this run's own log (no ID yet: the executor starts after the plan) hides nothing, nor
    # do the logs of the runs a user makes after a kill: the one LockException stopped, and
    # the --unlock (the ID was gone after one of them)
    later = [("2026-12-03", "Building DAG of jobs...\nUpdating checkpoint dependencies.\n"
                            "LockException:\nError: Directory cannot be locked.\n"),
             ("2026-12-04", "Unlocked working directory.\n"),
             ("2026-12-05", "Building DAG of jobs...\n")]
    for index, (day, text) in enumerate(later):
        log = logs / f"{day}T100000.000000.snakemake.log"
        log.write_text(text)
        os.utime(log, (10 + index, 10 + index))
    os.utime(killed, (5, 5))
    assert last_slurm_run_id(tmp_path) == "90d6e715-404b-4598"
    # a local run was killed: the newest run that planned jobs has no ID
    killed.write_text("Building DAG of jobs...\nJob stats:\njob  count\n\nlocalrule all:\n")
    os.utime(killed, (5, 5))
    assert last_slurm_run_id(tmp_path) is None
    assert "scancel" not in interrupted_run_notice(tmp_path)



def test_a_log_that_cannot_be_read_never_stops_the_interrupted_run_notice(tmp_path):
    """A colleague's log under umask 077 (here a folder by that name: open fails as root
    too), or one removed between the listing and its stat, made every snakemake command,
    --unlock included, stop with a traceback while planning."""
    logs = tmp_path / ".snakemake" / "log"
    logs.mkdir(parents=True)
    killed = logs / "2026-12-01T100000.000000.snakemake.log"
    killed.write_text("Building DAG of jobs...\nSLURM run ID: 90d6e715-404b-4598\n")
    os.utime(killed, (1, 1))
    (logs / "2026-12-02T100000.000000.snakemake.log").mkdir()
    (logs / "2026-12-03T100000.000000.snakemake.log").symlink_to(logs / "gone")
    (tmp_path / ".snakemake" / "locks").mkdir()
    (tmp_path / ".snakemake" / "locks" / "0.output.lock").write_text("results/x\n")
    assert last_slurm_run_id(tmp_path) == "90d6e715-404b-4598"
    assert "`scancel --name 90d6e715-404b-4598`" in interrupted_run_notice(tmp_path)


NOTICE = "a previous Snakemake run in"


@pytest.mark.workflow
def test_readme_commands_resume_a_killed_run(tmp_path):
    """Snakemake and its job SIGKILLed mid-job, as a closed session or a reboot would. The
    same command then stops (lock), and the workflow says what to run before Snakemake's
    error; the README's two commands finish the run. config/test.yaml with fast
    preprocessing, up to one subject's registered map; the killed job is the simulation."""
    settings = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    settings["preprocess"].update(skullstrip="none", n4=False)
    config = tmp_path / "test.yaml"
    config.write_text(yaml.safe_dump(settings))
    layout = Layout.from_config(validate_config(settings))
    first = draw_participants(settings["dataset"]["simulate"]["n_subjects"],
                              seed=settings["dataset"]["simulate"]["seed"])["participant_id"][0]
    target = subject_files(layout, first[len("sub-"):])["registered_stiffness"]
    work = tmp_path / "work"
    work.mkdir()
    arguments = (target, "--configfile", str(config))  # --configfile takes several files

    killed_job = work / attempts_file(layout.log("data", "simulate_cohort"))
    run = subprocess.Popen([*SNAKEMAKE, "--directory", str(work), "--cores", "1", *arguments],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True, env=local_snakemake_environment())
    deadline = time.monotonic() + 120
    while not (killed_job.exists() and any((work / ".snakemake" / "locks").glob("*.lock"))):
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"the simulation job never started:\n{run.communicate()[0][-4000:]}")
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    output = run.communicate(timeout=60)[0]
    assert NOTICE not in output, "a run must not report its own lock"

    again = snakemake(work, *arguments)
    assert again.returncode != 0
    assert NOTICE in again.stdout and "--unlock" in again.stdout, again.stdout[-4000:]
    assert again.stdout.index(NOTICE) < again.stdout.index("cannot be locked")

    unlocked = snakemake(work, "--unlock", *arguments)
    assert unlocked.returncode == 0, unlocked.stdout[-4000:]
    assert NOTICE not in unlocked.stdout, "the --unlock was told to run --unlock"
    # it simulates the cohort again and preprocesses a subject: 80 s in CI, about 125 s
    # under a loaded machine's other jobs, twice that on the slower CPUs
    resumed = snakemake(work, "--rerun-incomplete", *arguments, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert (work / target).is_file()
    log = (work / layout.log("data", "simulate_cohort")).read_text()
    assert "===== attempt 1 (" in log and "===== attempt 2 (" in log, log
    # each attempt names its run (inherited from Snakemake): the run's warnings are told
    # from the killed run's by it, not by the clocks of the machines
    runs = re.findall(r"^===== attempt \d \(.*, run ([0-9a-f]{16})\) =====$", log, re.M)
    assert len(runs) == 2 and runs[0] != runs[1], log

    done = snakemake(work, *arguments)
    assert done.returncode == 0 and "Nothing to be done" in done.stdout, done.stdout[-4000:]
    assert NOTICE not in done.stdout


def job_counts(stdout: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table into {rule: count}."""
    counts, inside = {}, False
    for line in stdout.splitlines():
        if line.startswith("job ") and "count" in line:
            inside = True
            continue
        if inside:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
            elif parts and not set(line.strip()) <= {"-", " "}:
                if parts[0] == "total":
                    break
    return counts


@pytest.mark.workflow
def test_a_real_dataset_with_the_simulation_on_is_refused_and_a_simulated_one_named(tmp_path):
    """A lab that copies the demo config and changes only dataset.root: the simulation
    never ran there (participants.tsv exists), and the plan skipped the checks that read a
    real cohort (test subjects in a pretraining cohort, batch sizes). The mirror case, a
    config without dataset (the schema's root is where the demo simulates), trains on
    simulated subjects: it is named in a warning."""
    from brainage.inputs import simulation_mismatches

    root = write_tiny_dataset(tmp_path / "real", default_rows())
    config = tmp_path / "copied_demo.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"root": str(root),
                                                  "simulate": {"enabled": True}}}))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert (f"config key dataset.root ({root}) holds a dataset that the simulation did not "
            f"write") in result.stdout and "dataset.simulate.enabled: false" in result.stdout
    # the whole demo config copied, its dataset switched to the lab's: the T1w pretraining
    # and the cohort to predict were still simulated, without a word
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    demo["dataset"].update(root=str(root), simulate={"enabled": False})
    config.write_text(yaml.safe_dump(demo))
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert ("Warning: config key pretrain.t1w.source.kind is 'simulate' while the training "
            "cohort is real data") in result.stdout, result.stdout[-3000:]
    assert ("Warning: config key predict.simulate.enabled is true while the training cohort "
            "is real data (dataset.simulate.enabled: false): cohort demo") in result.stdout
    (root / "dataset_description.json").write_text(
        '{"Name": "x", "GeneratedBy": [{"Name": "brainage.simulate"}]}')
    problems, warnings = simulation_mismatches([("dataset.root", root, False)])
    assert problems == [] and "is a simulated cohort (written by brainage.simulate)" in \
        warnings[0]
    assert simulation_mismatches([("dataset.root", root, True)]) == ([], [])
    assert simulation_mismatches([("dataset.root", tmp_path / "empty", True)]) == ([], [])


def test_a_single_subject_of_a_cohort_under_a_missing_root_names_its_config_key(tmp_path):
    """A single subject's target under a missing root said "the subject has no folder ...
    remove the subject" (found by a review): the root is named with the key that sets it,
    here a cohort to predict's."""
    (tmp_path / "cfg.yaml").write_text("predict:\n  cohorts:\n    clinic: ../no such cohort\n")
    target = ("results/predict/clinic/preproc/sub-c01/anat/"
              "sub-c01_space-MNI152NLin2009aSym_res-2_desc-preproc_stiffness.nii.gz")
    planned = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(tmp_path / "cfg.yaml"), "--cores", "1", target],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        env=local_snakemake_environment())
    assert planned.returncode != 0
    assert (f"dataset root ../no such cohort (relative to {tmp_path}, the working directory) "
            f"does not exist. Set config key predict.cohorts.clinic to the cohort's") in (
        " ".join(planned.stdout.split())), planned.stdout[-3000:]
    assert "remove the subject" not in planned.stdout
