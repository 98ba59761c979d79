"""The workflow itself: dry-runs from a fresh folder, and bad input and bad settings stopping
the run early."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import REPO, default_rows, write_tiny_dataset

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def snakemake(workdir: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--cores", "1", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def user_config(tmp_path: Path, root: Path, **sections) -> Path:
    config = {"dataset": {"root": str(root), "simulate": {"enabled": False}}, **sections}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.workflow
def test_fresh_folder_dry_run_starts_with_the_simulation(tmp_path):
    result = snakemake(tmp_path, "-n")
    assert result.returncode == 0, result.stdout
    assert "simulate_cohort" in result.stdout
    assert not (tmp_path / "results").exists()


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
], ids=["escaping-label", "missing-map", "all-zero-map", "corrupt-map"])
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
def test_valid_user_dataset_plans_every_subject(tmp_path):
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(6))
    # 5 training subjects: the paper's batch of 32 stops the run (the next test)
    config = user_config(tmp_path, root, train={"batch_size": 4}, loss={"nn_final": 2})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert result.returncode == 0, result.stdout
    counts = job_counts(result.stdout)
    assert counts["strip_skull"] == counts["register_to_template"] == 6
    assert counts["normalise_dataset"] == 1


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
    assert not (tmp_path / "results").exists()


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
