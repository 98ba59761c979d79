"""The experiment grid as Snakemake sees it: dry runs of the real workflow.

- The paper's full grid (config/paper.yaml) on a tiny fake dataset: every experiment
  expands to one evaluate_encoder job per variant x seed and one train_encoder job per
  distinct training, plus one make_tables and one make_figures job.
- Cells that differ only in their read-out share one trained encoder.
- Rerun semantics: after a (simulated) complete run, editing one loss setting of one
  variant reruns exactly that variant's jobs and the reports, nothing else; a new random
  search result reruns exactly the cells that train with it (loss.nn_from_search).
- The report targets agree with the configuration (no table or figure for an experiment
  the config does not run).

The workflow runs in a temporary working directory (``--directory``) on a tiny BIDS-like
dataset with valid NIfTI files (``conftest.write_tiny_dataset``), simulation disabled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from brainage.config import encoder_owners, grid_cells, load_config
from brainage.paths import Layout
from brainage.report import targets
from conftest import REPO, default_rows, local_snakemake_environment, write_tiny_dataset
from openbhb_fixture import write_openbhb_release

pytestmark = pytest.mark.workflow

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
N_SUBJECTS = 10
#: The paper's batch of 32 needs 32 training subjects for the random search's trials, which
#: hold out 20 % of the training subjects for validation: 40 training subjects, 50 at its
#: 80:20 split (the workflow stops before any job otherwise).
PAPER_SUBJECTS = 50
#: The report rules need every grid cell; asking for them (not for `all`) keeps these tests
#: about the grid and the reports whatever else the default target holds.
REPORT_RULES = ("make_tables", "make_figures", "plot_embeddings")


def run_snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True
                  ) -> subprocess.CompletedProcess:
    command = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(configfile), "--replace-workflow-config", "--cores", "1",
               *args]
    environment = local_snakemake_environment(PYTHONPATH=str(REPO / "workflow"))
    result = subprocess.run(command, capture_output=True, text=True, env=environment,
                            timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def job_counts(output: str) -> Counter:
    """Parse Snakemake's "Job stats" table (``rule  count`` lines up to ``total``)."""
    counts: Counter = Counter()
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("Job stats"))
    except StopIteration:
        return counts  # "Nothing to be done"
    for line in lines[start + 3:]:
        match = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not match or match.group(1) == "total":
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def dataset(tmp_path: Path, n: int = N_SUBJECTS, **options) -> Path:
    rows = default_rows(n)
    for index, row in enumerate(rows):  # five studies, as the paper; adult ages
        row["study"] = f"study{index % 5 + 1}"
        row["age"] = 20.0 + 60.0 * index / n
    return write_tiny_dataset(tmp_path / "dataset", rows, **options)


def write_config(path: Path, base: str | Path | dict, **overrides) -> Path:
    config = yaml.safe_load(Path(base).read_text()) if not isinstance(base, dict) else base
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_test_config(root: Path) -> dict:
    """config/test.yaml on a tiny dataset of stiffness maps: without the experiment whose
    channels need maps this dataset lacks, and without the pretraining run and the cell
    that fine-tunes it (their own test below), so the counts are those of the grid."""
    base = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    base["dataset"] = {"root": str(root), "simulate": {"enabled": False}}
    del base["experiments"]["modality"]
    del base["pretrain"]
    del base["experiments"]["table3"]["variants"]["adaptive_pretrained"]
    return base


def test_paper_grid_dry_run_has_every_experiment(tmp_path):
    root = dataset(tmp_path, PAPER_SUBJECTS, with_anat=True, maps=("stiffness", "damping_ratio"))
    configfile = write_config(tmp_path / "paper.yaml", REPO / "config" / "paper.yaml",
                              dataset__root=str(root))
    config = load_config(configfile)
    cells = grid_cells(config)
    # Table 3: the paper's 7 losses and its 5 baselines, 5 seeds each
    assert Counter(e for e, _, _ in cells) == {"table3": 70, "distance": 20, "predictor": 25,
                                               "augmentation": 25, "projection": 10,
                                               "lambda": 35, "reduction": 10, "modality": 25}
    # every cell fine-tunes the encoder pretrained on the OpenBHB release the config names
    write_openbhb_release(tmp_path / "work" / config["pretrain"]["openbhb"]["source"]["root"],
                          n_train=5, n_validation=2)
    result = run_snakemake(tmp_path / "work", configfile, *REPORT_RULES, "--dry-run", "--quiet",
                           "rules")
    counts = job_counts(result.stdout)
    # 50 cells train what an earlier cell trains (the default Adaptive Neighborhoods encoder,
    # read by five read-outs, both arms of the projection ablation, three ablation defaults
    # and the modality experiment's stiffness row), and the 15 voxel-baseline cells train
    # nothing: 155 trainings (15 of them the untrained, pretrained-frozen and supervised
    # baselines, 10 Table 3's Adaptive Neighborhoods fine-tuned and from scratch with the
    # search's nn_final and nn_step, 20 the modality experiment's other input channels)
    assert counts["train_encoder"] == len(set(encoder_owners(config).values())) == 155
    assert counts["evaluate_encoder"] == len(cells) == 220
    assert counts["prepare_openbhb"] == counts["pretrain_encoder"] == 1
    # every subject's three maps through one chain: two jobs per subject
    assert counts["strip_skull"] == counts["correct_and_register"] == PAPER_SUBJECTS
    assert counts["make_tables"] == 1 and counts["make_figures"] == 1
    assert counts["search_hyperparameters"] == 1  # the random search, one per split
    assert "simulate_cohort" not in counts


def test_skull_stripping_by_synthstrip_asks_for_its_memory(tmp_path):
    """FreeSurfer's SynthStrip runs its U-Net over a whole 1 mm T1w: 5.8-7.7 GB. Its jobs
    asked for resources.preprocess.mem_mb (2 GB by default), and on SLURM every subject was
    killed three times; mri_watershed and deepbet fit the request."""
    from brainage.preprocess.skullstrip import SYNTHSTRIP_MEM_MB

    root = dataset(tmp_path, 6)
    base = tiny_test_config(root)
    base["resources"] = {"preprocess": {"mem_mb": 2500, "runtime_min": 30}}
    requested = {}
    for tool in ("synthstrip", "watershed"):
        base["preprocess"] = {**base.get("preprocess", {}), "skullstrip": "freesurfer",
                              "freesurfer_tool": tool}
        configfile = write_config(tmp_path / f"{tool}.yaml", base)
        listed = run_snakemake(tmp_path / "work", configfile, "--dry-run").stdout
        jobs = re.findall(r"rule strip_skull:\n((?: {4}.*\n)+)", listed)
        requested[tool] = {int(re.search(r"\bmem_mb=(\d+)", job)[1]) for job in jobs}
        assert len(jobs) == 6, listed[-3000:]
    assert requested == {"synthstrip": {SYNTHSTRIP_MEM_MB}, "watershed": {2500}}


def test_a_subject_with_a_large_t1w_asks_for_the_memory_its_n4_needs(tmp_path):
    """N4 corrects the T1w on its own grid: 4 GB for a 0.5 mm T1w, 1.8 GB at 0.7 mm (a
    review's measurements), and SLURM killed a 0.5 mm subject's job at the 2,000 MB default
    and at both retries. Each subject's jobs ask for what its own T1w needs; the others
    keep resources.preprocess.mem_mb."""
    from brainage.preprocess.chain import JOB_BASE_MB, JOB_MB_PER_MILLION_VOXELS

    root = dataset(tmp_path, 6, with_anat=True)
    shape = (320, 320, 256)  # 0.7 mm whole-head: 26.2 million voxels
    data = np.zeros(shape, np.uint8)
    data[60:260, 50:270, 40:220] = 100
    large = root / "sub-03a" / "anat" / "sub-03a_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 0.7, 1.0])), large)
    base = tiny_test_config(root)
    base["dataset"]["modalities"] = ["stiffness", "T1w"]
    base["resources"] = {"preprocess": {"mem_mb": 2000, "runtime_min": 30}}
    configfile = write_config(tmp_path / "config.yaml", base)
    listed = run_snakemake(tmp_path / "work", configfile, "--dry-run").stdout
    requested = {}
    for rule in ("strip_skull", "correct_and_register"):
        for job in re.findall(rf"rule {rule}:\n((?: {{4}}.*\n)+)", listed):
            subject = re.search(r"subject=([A-Za-z0-9]+)", job)[1]
            requested[rule, subject] = int(re.search(r"\bmem_mb=(\d+)", job)[1])
    needed = JOB_BASE_MB + JOB_MB_PER_MILLION_VOXELS * np.prod(shape) / 1e6
    assert 2000 < needed, needed
    expected = 100 * int(np.ceil(needed / 100))
    assert {key: mb for key, mb in requested.items() if key[1] == "03a"} == {
        ("strip_skull", "03a"): expected, ("correct_and_register", "03a"): expected}
    assert len(requested) == 12, listed[-3000:]
    assert {mb for key, mb in requested.items() if key[1] != "03a"} == {2000}


def test_report_targets_follow_the_config(tmp_path):
    root = dataset(tmp_path)
    base = tiny_test_config(root)
    base["experiments"]["projection"] = {"seeds": [0], "variants": {
        "with": {"model": {"features": "projection"}},
        "without": {"model": {"features": "encoder"}}}}
    configfile = write_config(tmp_path / "config.yaml", base)
    result = run_snakemake(tmp_path / "work", configfile, *REPORT_RULES, "--dry-run", "--quiet",
                           "rules")
    counts = job_counts(result.stdout)
    # both arms of the projection ablation read table3/adaptive/seed-0's encoder (features
    # before or after the head are read-out settings)
    assert counts["train_encoder"] == 2 * 2
    names = targets.report_names(load_config(configfile))
    assert "fig4d_projection" in names["figures"] and "fig6_lambda" not in names["figures"]
    listed = run_snakemake(tmp_path / "work", configfile, "--dry-run", *REPORT_RULES,
                           "--workflow-profile",
                           str(REPO / "workflow" / "profiles" / "default")).stdout
    # training asks for a GPU through Snakemake's gpu resource (config resources.train)
    train_jobs = re.findall(r"rule train_encoder:\n((?: {4}.*\n)+)", listed)
    assert len(train_jobs) == 4
    assert all(re.search(r"resources: .*\bgpu=1\b", job) for job in train_jobs)
    assert all(re.search(r"resources: .*\bmem_mb=3000\b", job) for job in train_jobs)
    for name in names["figures"]:
        assert f"results/figures/{name}.png" in listed
    assert "results/figures/fig6_lambda.png" not in listed  # lambda is not in this config
    assert "results/tables/ablation_projection.md" in listed


def test_cells_that_differ_in_the_readout_share_one_encoder(tmp_path):
    root = dataset(tmp_path)
    base = tiny_test_config(root)
    base["experiments"]["predictor"] = {"seeds": [0], "variants": {
        "ridge": {"readout": {"method": "ridge"}}, "mse": {"readout": {"method": "mse"}}}}
    configfile = write_config(tmp_path / "config.yaml", base)
    listed = run_snakemake(tmp_path / "work", configfile, "--dry-run", *REPORT_RULES).stdout
    counts = job_counts(listed)
    assert counts["train_encoder"] == 4 and counts["evaluate_encoder"] == 6, counts
    evaluations = re.findall(r"rule evaluate_encoder:\n((?: {4}.*\n)+)", listed)
    shared = "results/train/holdout/table3/adaptive/seed-0/features.npz"
    readers = sorted(re.search(r"output: results/train/holdout/(\S+)/metrics\.json", job)[1]
                     for job in evaluations if shared in job)
    assert readers == ["predictor/mse/seed-0", "predictor/ridge/seed-0",
                       "table3/adaptive/seed-0"], readers
    assert "results/train/holdout/predictor/" not in "".join(
        re.findall(r"rule train_encoder:\n((?: {4}.*\n)+)", listed))


def _fake_complete_run(workdir: Path, configfile: Path,
                       targets: tuple[str, ...] = REPORT_RULES) -> None:
    """Create every output of the DAG (empty), then let Snakemake record them as made by
    their jobs (``--touch`` writes the same metadata a real run writes: params, code)."""
    summary = run_snakemake(workdir, configfile, "--summary", *targets).stdout
    for line in summary.splitlines()[1:]:
        path = workdir / line.split("\t")[0]
        if "." not in path.name:  # directory() outputs (embeddings): no extension
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    for rule in REPORT_RULES:  # benchmarks count as outputs of the requested jobs
        benchmark = workdir / Layout().benchmark("aggregate", rule)
        benchmark.parent.mkdir(parents=True, exist_ok=True)
        benchmark.touch()
    run_snakemake(workdir, configfile, *targets, "--touch", "--quiet", "all")
    assert job_counts(run_snakemake(workdir, configfile, "--dry-run",
                                    *targets).stdout) == Counter()


def test_editing_one_loss_setting_reruns_only_that_variant(tmp_path):
    root = dataset(tmp_path, 6)
    base = tiny_test_config(root)
    base["experiments"]["distance"] = {"seeds": [0], "variants": {
        "manhattan": {"loss": {"distance": "manhattan"}},
        "cosine": {"loss": {"distance": "cosine"}}}}
    configfile = write_config(tmp_path / "config.yaml", base)
    workdir = tmp_path / "work"
    _fake_complete_run(workdir, configfile)

    base["experiments"]["table3"]["variants"]["adaptive"]["loss"]["sigma"] = 3.0
    write_config(configfile, base)
    result = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES)
    counts = job_counts(result.stdout)
    # distance/manhattan (the default distance) had shared table3/adaptive's seed-0
    # encoder; no longer equal to it, it trains its own
    assert counts["train_encoder"] == 3 and counts["evaluate_encoder"] == 3, counts
    assert set(counts) == {"train_encoder", "evaluate_encoder", *REPORT_RULES}, counts
    rerun = set(re.findall(r"results/train/holdout/(\S+?)/seed-(\d)/encoder\.pt", result.stdout))
    assert rerun == {("table3/adaptive", "0"), ("table3/adaptive", "1"),
                     ("distance/manhattan", "0")}
    assert "Params have changed" in result.stdout or "params" in result.stdout.lower()

    # a base setting that every cell inherits reruns every cell
    base["loss"]["sigma"] = 2.5
    write_config(configfile, base)
    counts = job_counts(run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES).stdout)
    assert counts["train_encoder"] == len(grid_cells(load_config(configfile))) == 6

    # the read-out is not a training setting: editing it re-evaluates every cell, and
    # trains none of them again
    del base["loss"]["sigma"]
    base["experiments"]["table3"]["variants"]["adaptive"]["loss"].pop("sigma")
    base["readout"]["alphas"] = [0.1, 1.0, 10.0]
    write_config(configfile, base)
    counts = job_counts(run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES).stdout)
    assert "train_encoder" not in counts, counts
    assert counts["evaluate_encoder"] == 6, counts


def test_a_qc_threshold_retrains_nothing_unless_it_excludes_subjects(tmp_path):
    """The thresholds only flag subjects unless qc.exclude_failed drops them: editing one
    remakes the QC table and the report. It used to renormalise the dataset and retrain
    every encoder, because the split carried each subject's verdict."""
    root = dataset(tmp_path, 6)
    base = tiny_test_config(root)
    configfile = write_config(tmp_path / "config.yaml", base)
    workdir = tmp_path / "work"
    _fake_complete_run(workdir, configfile)
    base.setdefault("qc", {})["min_dice"] = 0.9
    write_config(configfile, base)
    counts = job_counts(run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES).stdout)
    assert counts["tabulate_qc"] == 1, counts
    assert set(counts) <= {"tabulate_qc", "tabulate_pretrain_qc", *REPORT_RULES}, counts
    # with exclusion the verdicts choose the training subjects: everything after them reruns
    base["qc"]["exclude_failed"] = True
    write_config(configfile, base)
    counts = job_counts(run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES).stdout)
    assert counts["normalise_dataset"] == 1 and counts["train_encoder"] >= 1, counts


def _refused_pretraining_plan(tmp_path, n_subjects: int, **run) -> tuple[dict, Path, str]:
    """Dry-run the tiny config with a simulated pretraining run t1 of ``n_subjects`` (a
    quarter held out, 2 epochs, batch 4; ``run`` adds to the run's section), which must
    stop before any job: (config, config file, the run's output)."""
    base = tiny_test_config(dataset(tmp_path, 6))
    base["pretrain"] = {"t1": {"source": {"kind": "simulate", "n_subjects": n_subjects},
                               "validation_fraction": 0.25,
                               "train": {"epochs": 2, "batch_size": 4}, **run}}
    configfile = write_config(tmp_path / "config.yaml", base)
    result = run_snakemake(tmp_path / "work", configfile, "--dry-run", check=False)
    assert result.returncode != 0, result.stdout[-2000:]
    return base, configfile, result.stdout + result.stderr


def test_a_pretraining_batch_larger_than_its_cohort_stops_before_any_job(tmp_path):
    """Four simulated T1w subjects, one held out for validation: a batch of 4 stops the dry
    run naming the run's key (pretrain_encoder used to fail after the preprocessing, naming
    the top-level train.batch_size)."""
    base, configfile, output = _refused_pretraining_plan(tmp_path, 4)
    assert ("config key pretrain.t1.train.batch_size is 4 but pretraining run t1's T1w "
            "cohort has only 3 training subjects") in output, output[-3000:]
    write_config(configfile, base, pretrain__t1__train__batch_size=3)
    run_snakemake(tmp_path / "work", configfile, "--dry-run")


def test_a_pretraining_cohort_holding_a_test_subject_stops_before_any_job(tmp_path):
    """A lab's own T1w cohort that holds some of its MRE test subjects (same ids) was
    planned without a word, and every fine-tuned cell reported an optimistic MAE; a T1w scan
    missing there was blamed on dataset.modalities."""
    from brainage.normalise import assign_split

    root = dataset(tmp_path, 10)
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    base = tiny_test_config(root)
    tested = participants.loc[assign_split(participants, "holdout", **base["split"]) == "test",
                              "participant_id"].tolist()
    rows = [{**row, "participant_id": f"sub-t1w{index}"} for index, row in
            enumerate(default_rows(8))]
    rows[0]["participant_id"] = tested[0]
    t1w_root = write_tiny_dataset(tmp_path / "t1w", rows, with_anat=True)
    base["pretrain"] = {"t1": {"source": {"kind": "bids", "root": str(t1w_root)},
                               "train": {"epochs": 2, "batch_size": 4},
                               "resources": {"gpus": 0}}}
    configfile = write_config(tmp_path / "config.yaml", base)
    result = run_snakemake(tmp_path / "work", configfile, "--dry-run", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(rf"pretraining run t1 \(config key pretrain\.t1\.source\.root\): the "
                     rf"pretraining cohort .*t1w holds 1 test subject\(s\) of the training "
                     rf"cohort .*: {tested[0]}\.", output), output[-3000:]
    next((t1w_root / tested[0] / "anat").glob("*_T1w.nii.gz")).unlink()
    result = run_snakemake(tmp_path / "work", configfile, "--dry-run", check=False)
    assert re.search(rf"subject {tested[0]}: T1w image .* is missing; pretraining run t1 \(it "
                     rf"trains on T1w scans\) reads T1w of every subject", result.stdout), \
        result.stdout[-3000:]
    assert "dataset.modalities" not in result.stdout


def test_a_cohort_to_predict_sharing_ids_with_the_pretraining_cohort_is_warned_about(
        tmp_path):
    """A lab's own T1w pretraining cohort that holds people it later predicts: the encoder
    has seen their images and ages, but only the MRE training subjects were compared."""
    root = dataset(tmp_path, 6)
    t1w_rows = [{**row, "participant_id": f"sub-t1w{index}"}
                for index, row in enumerate(default_rows(6))]
    t1w_root = write_tiny_dataset(tmp_path / "t1w", t1w_rows, with_anat=True)
    clinic_rows = [{**row, "participant_id": f"sub-c{index}"}
                   for index, row in enumerate(default_rows(3))]
    clinic_rows[1]["participant_id"] = "sub-T1W4"  # the same person, in another case
    clinic = write_tiny_dataset(tmp_path / "clinic", clinic_rows)
    base = tiny_test_config(root)
    base["pretrain"] = {"t1": {"source": {"kind": "bids", "root": str(t1w_root)},
                               "train": {"epochs": 2, "batch_size": 4},
                               "resources": {"gpus": 0}}}
    base["experiments"]["table3"]["variants"]["adaptive_pretrained"] = {
        "loss": {"name": "adaptive"}, "model": {"init": "pretrained:t1"}}
    base["predict"] = {"model": {"experiment": "table3", "variant": "adaptive_pretrained",
                                 "seed": 0},
                       "cohorts": {"clinic": str(clinic)}, "simulate": {"enabled": False}}
    configfile = write_config(tmp_path / "config.yaml", base)
    result = run_snakemake(tmp_path / "work", configfile, "--dry-run")
    said = re.findall(r"Warning: predict cohort clinic .*", result.stdout + result.stderr)
    assert said == [
        "Warning: predict cohort clinic (config key predict.cohorts.clinic) has 1 subject(s) "
        "with the participant_id of a subject the model has seen: sub-T1W4 (pretraining "
        "(pretrain.t1.source.root), as sub-t1w4). If they are the same people, their "
        "predictions are optimistic: each is marked in column seen_in_training of "
        "results/predict/clinic/predictions.tsv and left out of its summary.tsv, figure and "
        "any age-bias refit. If the ids only coincide (other people), add clinic to config "
        "key predict.unrelated_cohorts."], \
        result.stderr[-3000:]
    assert "no longer lists" not in result.stdout + result.stderr
    # a subject removed from the T1w cohort: its preprocessed brain stays, named once
    (tmp_path / "work" / "results" / "pretrain" / "t1" / "preproc" / "sub-gone" / "anat").mkdir(
        parents=True)
    result = run_snakemake(tmp_path / "work", configfile, "--dry-run")
    said = re.findall(r"Warning: results/pretrain/t1/preproc holds (\d) subject folder\(s\) "
                      r"that .*t1w/participants\.tsv no longer lists: ([\w-]+)\.",
                      result.stdout + result.stderr)
    assert said == [("1", "sub-gone")], result.stderr[-3000:]


def test_a_pretraining_batch_its_processes_cannot_share_stops_before_any_job(tmp_path):
    """Eight simulated T1w subjects, two held out: 6 training subjects in batches of 4 and
    2 cannot feed 2 GPUs x 2 nodes; pretrain_encoder used to find out after the cohort's
    preprocessing, on the cluster's GPU nodes."""
    base, configfile, output = _refused_pretraining_plan(
        tmp_path, 8, resources={"gpus": 2, "nodes": 2})
    assert ("config key pretrain.t1.train.batch_size is 4: with 6 training subjects the "
            "last batch of every epoch has 2 subjects, fewer than the 4 processes") in output, \
        output[-3000:]
    write_config(configfile, base, pretrain__t1__resources__nodes=1)  # 2 processes: fine
    run_snakemake(tmp_path / "work", configfile, "--dry-run")


def test_a_pretraining_change_reruns_the_run_and_the_cells_that_fine_tune_it(tmp_path):
    """model.init pretrained:<run> puts the run's encoder in the cell's inputs: editing the
    run reruns its training, its validation read-out and the fine-tuned cells (and the
    reports), not its preprocessing and not the cells trained from scratch."""
    root = dataset(tmp_path, 6)
    t1w_rows = [{**row, "participant_id": f"sub-t1w{index}", "age": 10.0 + 12 * index}
                for index, row in enumerate(default_rows(6))]
    t1w_root = write_tiny_dataset(tmp_path / "t1w", t1w_rows, with_anat=True)
    base = tiny_test_config(root)
    base["pretrain"] = {"t1": {"source": {"kind": "bids", "root": str(t1w_root)},
                               "train": {"epochs": 2, "batch_size": 4},
                               "resources": {"gpus": 0}},
                        # a release in OpenBHB's layout: resampled, not preprocessed again
                        "bhb": {"source": {"kind": "openbhb",
                                           "root": str(tmp_path / "openBHB")},
                                "train": {"epochs": 2, "batch_size": 4},
                                "resources": {"gpus": 2}}}
    write_openbhb_release(tmp_path / "openBHB", n_train=5, n_validation=2)
    base["experiments"]["table3"]["variants"]["adaptive_pretrained"] = {
        "loss": {"name": "adaptive"}, "model": {"init": "pretrained:t1"}}
    configfile = write_config(tmp_path / "config.yaml", base)
    workdir = tmp_path / "work"
    # each run's UMAP figure too (a wildcard rule: requested by its file)
    reports = (*REPORT_RULES, *(Layout().figure(targets.pretraining_embeddings_figure(run))
                                for run in ("t1", "bhb")))
    planned = job_counts(run_snakemake(workdir, configfile, "--dry-run", *reports).stdout)
    assert planned["plot_pretraining_embeddings"] == 2, planned
    # the T1w cohort goes through the same two per-subject jobs as the stiffness maps
    assert planned["strip_skull"] == 6 + 6, planned
    assert planned["correct_and_register_T1w"] == 6, planned
    assert planned["prepare_openbhb"] == 1 and planned["normalise_pretrain_cohort"] == 1
    assert planned["pretrain_encoder"] == 2 and planned["evaluate_pretrained_encoder"] == 2
    assert planned["train_encoder"] == 6, planned
    # the T1w cohort's QC table is a target of the default run of its own (the
    # normalisation reads it only with qc.exclude_failed), and its preprocessing folder is
    # a derivative dataset like the training cohort's; OpenBHB's release has neither
    everything = job_counts(run_snakemake(workdir, configfile, "--dry-run").stdout)
    assert everything["tabulate_pretrain_qc"] == 1, everything
    assert everything["describe_preprocessing"] == 2, everything
    _fake_complete_run(workdir, configfile, reports)
    # two GPUs: brainage.launch starts torchrun, one training process per GPU on the node
    launch = run_snakemake(workdir, configfile, "--dry-run", "--printshellcmds", "--forcerun",
                           "pretrain_encoder", *REPORT_RULES).stdout
    for run, gpus in (("bhb", 2), ("t1", 0)):
        assert re.search(rf'"\$BRAINAGE_TRAINING_PYTHON" -m brainage\.launch --gpus {gpus} '
                         rf"--nodes 1 -- --split-dir results/pretrain/{run}/split",
                         launch), launch[-3000:]
    # more GPUs for a finished run retrain nothing: the counts are resources, not params
    # (as params they retrained the run and every cell fine-tuned from it)
    base["pretrain"]["t1"]["resources"]["gpus"] = 4
    write_config(configfile, base)
    assert job_counts(run_snakemake(workdir, configfile, "--dry-run", *reports).stdout) \
        == Counter()

    base["pretrain"]["t1"]["loss"] = {"name": "exponential", "sigma": 3.0}
    write_config(configfile, base)
    result = run_snakemake(workdir, configfile, "--dry-run", *reports)
    counts = job_counts(result.stdout)
    assert counts == Counter({"pretrain_encoder": 1, "evaluate_pretrained_encoder": 1,
                              "plot_pretraining_embeddings": 1, "train_encoder": 2,
                              "evaluate_encoder": 2, "make_tables": 1, "make_figures": 1}), counts
    rerun = set(re.findall(r"results/train/holdout/(\S+?)/seed-(\d)/encoder\.pt", result.stdout))
    assert rerun == {("table3/adaptive_pretrained", "0"), ("table3/adaptive_pretrained", "1")}


def test_an_external_starting_checkpoint_is_an_input_of_the_cells_that_start_from_it(
        tmp_path):
    """model.init_checkpoint names a file outside the workflow: a missing one is named when
    the workflow is planned (it was found when the training started), and replacing it in
    place retrains the cells that start from it, not the others (they kept its old
    weights, silently)."""
    root = dataset(tmp_path, 6)
    base = tiny_test_config(root)
    checkpoint = tmp_path / "external" / "encoder.pt"
    base["experiments"]["table3"]["variants"]["adaptive_external"] = {
        "loss": {"name": "adaptive"}, "model": {"init_checkpoint": str(checkpoint)}}
    configfile = write_config(tmp_path / "config.yaml", base)
    workdir = tmp_path / "work"
    missing = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES, check=False)
    assert missing.returncode != 0
    said = missing.stdout + missing.stderr
    def refusal(path):
        return (rf"config key experiments\.table3\.variants\.adaptive_external\.model\."
                rf"init_checkpoint is '{re.escape(str(path))}', "
                rf"which is not a file; a relative path is read from the working directory")
    assert re.search(refusal(checkpoint), said), said[-3000:]

    checkpoint.parent.mkdir()
    checkpoint.touch()
    listed = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES).stdout
    trainings = re.findall(r"rule train_encoder:\n((?: {4}.*\n)+)", listed)
    reading = sorted(re.search(r"output: results/train/holdout/(\S+)/encoder\.pt", job)[1]
                     for job in trainings if str(checkpoint) in job)
    assert reading == ["table3/adaptive_external/seed-0", "table3/adaptive_external/seed-1"]
    _fake_complete_run(workdir, configfile)

    checkpoint.write_bytes(b"other weights")  # (a file touched, same bytes: no rerun)
    later = time.time() + 5
    os.utime(checkpoint, (later, later))
    result = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES)
    assert job_counts(result.stdout) == Counter({"train_encoder": 2, "evaluate_encoder": 2,
                                                 "make_tables": 1, "make_figures": 1})
    rerun = set(re.findall(r"results/train/holdout/(\S+?)/seed-(\d)/encoder\.pt", result.stdout))
    assert rerun == {("table3/adaptive_external", "0"), ("table3/adaptive_external", "1")}

    # the cells trained from it, then the file purged (scratch space) and a training
    # setting edited: Snakemake drops a job whose outputs exist and whose input is missing,
    # whatever else changed, and reran the read-outs on the old encoders under the new
    # setting; so a missing file stops every plan, saying to put it back. (The file's
    # mtime back to now: --touch refuses outputs older than an input, which the file dated
    # 5 s ahead made them when this line came within 5 s.)
    os.utime(checkpoint)
    _fake_complete_run(workdir, configfile)
    checkpoint.unlink()
    base["experiments"]["table3"]["variants"]["adaptive_external"]["train"] = {"lr": 0.5}
    write_config(configfile, base)
    purged = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES, check=False)
    said = purged.stdout + purged.stderr
    assert purged.returncode != 0 and re.search(refusal(checkpoint), said), said[-3000:]
    assert "if the file was deleted after training (a scratch purge), put it back" in said
    # the key edited to a path that is not there (a typo): the same
    checkpoint = checkpoint.with_name("typo.pt")
    base["experiments"]["table3"]["variants"]["adaptive_external"]["model"] = {
        "init_checkpoint": str(checkpoint)}
    write_config(configfile, base)
    edited = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES, check=False)
    assert edited.returncode != 0 and re.search(refusal(checkpoint),
                                                edited.stdout + edited.stderr), \
        (edited.stdout + edited.stderr)[-3000:]


def test_the_search_starts_from_the_models_checkpoint_and_a_folder_is_no_checkpoint(
        tmp_path):
    """The random search's trials fine-tune the top-level model's starting encoder: it is
    an input of the search job, so a new encoder reruns the search whose nn_final/nn_step
    the cells then train with (config/paper.yaml starts every cell from OpenBHB). A
    checkpoint path that is a folder stops the plan as a missing file does."""
    root = dataset(tmp_path, 8)
    base = tiny_test_config(root)
    base["search"] = {"enabled": True, "trials": 2}
    checkpoint = tmp_path / "external" / "encoder.pt"
    checkpoint.mkdir(parents=True)
    base["model"]["init_checkpoint"] = str(checkpoint)
    configfile = write_config(tmp_path / "config.yaml", base)
    workdir = tmp_path / "work"
    folder = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES, check=False)
    said = folder.stdout + folder.stderr
    assert folder.returncode != 0 and re.search(
        rf"config key model\.init_checkpoint is '{re.escape(str(checkpoint))}', which is not "
        rf"a file", said), said[-3000:]
    checkpoint.rmdir()
    checkpoint.touch()
    listed = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES).stdout
    searches = re.findall(r"rule search_hyperparameters:\n((?: {4}.*\n)+)", listed)
    assert len(searches) == 1 and str(checkpoint) in searches[0], listed[-3000:]


def test_a_new_search_result_reruns_only_the_cells_that_train_with_it(tmp_path):
    """loss.nn_from_search puts the split's best.json among the cell's training inputs: a
    new search result retrains that cell (its own encoder, never shared with the cell that
    differs only in the flag) and re-evaluates it, and remakes the reports; nothing else.
    8 subjects: 6 training, 5 of them for the search's trials, at least its batch of 4."""
    root = dataset(tmp_path, 8)
    base = tiny_test_config(root)
    base["search"] = {"enabled": True, "trials": 2}
    base["experiments"]["table3"]["variants"]["adaptive_searched"] = {
        "loss": {"name": "adaptive", "nn_from_search": True}}
    configfile = write_config(tmp_path / "config.yaml", base)
    workdir = tmp_path / "work"
    best = "results/search/holdout/best.json"
    listed = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES).stdout
    trainings = re.findall(r"rule train_encoder:\n((?: {4}.*\n)+)", listed)
    reading = sorted(re.search(r"output: results/train/holdout/(\S+)/encoder\.pt", job)[1]
                     for job in trainings if best in job)
    assert reading == ["table3/adaptive_searched/seed-0", "table3/adaptive_searched/seed-1"]
    # 2 seeds x (yaware, adaptive, adaptive_searched): none shared
    assert job_counts(listed)["train_encoder"] == 6
    assert job_counts(listed)["search_hyperparameters"] == 1
    _fake_complete_run(workdir, configfile)

    # a new result (as a rerun of the search with other trials would write)
    path = workdir / best
    path.write_text(json.dumps({"nn_final": 3, "nn_step": 1, "validation_mae": 5.0, "trial": 2,
                                "n_trials": 2, "split": "holdout", "validation_subjects": []}))
    later = time.time() + 5
    os.utime(path, (later, later))
    result = run_snakemake(workdir, configfile, "--dry-run", *REPORT_RULES)
    counts = job_counts(result.stdout)
    assert counts == Counter({"train_encoder": 2, "evaluate_encoder": 2, "make_tables": 1,
                              "make_figures": 1}), counts
    rerun = set(re.findall(r"results/train/holdout/(\S+?)/seed-(\d)/encoder\.pt", result.stdout))
    assert rerun == {("table3/adaptive_searched", "0"), ("table3/adaptive_searched", "1")}
