"""The output layout (brainage.paths.Layout): the paths its docstring and
docs/architecture.md promise. Rules and scripts share one Layout, so a renamed path still
runs; only a comparison with the documented names catches it."""

from __future__ import annotations

from pathlib import Path

from brainage.paths import Layout


def test_per_subject_files_have_the_documented_bids_names():
    layout = Layout(results="out", space="MNI152NLin2009aSym")
    anat = Path("out", "preproc", "sub-01", "anat")
    assert layout.subject_native("01", "brain", "mask") == str(
        anat / "sub-01_desc-brain_mask.nii.gz")
    assert layout.subject_mni("01", "preproc", "stiffness") == str(
        anat / "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_stiffness.nii.gz")
    # BIDS names a transform by where it comes from, then where it goes
    assert layout.subject_transform("01") == str(
        anat / "sub-01_from-native_to-MNI152NLin2009aSym_mode-image_xfm.mat")
    figures = Path("out", "preproc", "sub-01", "figures")
    assert layout.subject_qc("01", ".json") == str(figures / "sub-01_qc.json")
    assert layout.subject_qc("01", ".png", preproc=Layout.cohort_preproc("site")) == str(
        Path("out", "predict", "site", "preproc", "sub-01", "figures", "sub-01_qc.png"))


def test_logs_and_benchmarks_mirror_results():
    layout = Layout(results="r", logs="l", benchmarks="b")
    assert layout.log("train", "encoder") == str(Path("l", "train", "encoder.log"))
    assert layout.benchmark("train", "encoder") == str(Path("b", "train", "encoder.tsv"))
    assert layout.preproc_log("preproc", "01", "register") == str(
        Path("l", "preproc", "sub-01", "register.log"))
    assert layout.preproc_benchmark("preproc", "01", "register") == str(
        Path("b", "preproc", "sub-01", "register.tsv"))


def test_a_grid_cell_is_split_experiment_variant_seed():
    layout = Layout(results="r")
    assert layout.cell_file("holdout", "table3", "adaptive", 2, "metrics.json") == str(
        Path("r", "train", "holdout", "table3", "adaptive", "seed-2", "metrics.json"))
