"""Splits and the dataset-wide z-normalisation, checked against plain numpy on small arrays."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage.inputs import InputError
from brainage.normalise import (
    analysis_grid,
    apply,
    assign_split,
    block_average,
    check_pretraining_cohort,
    combine_moments,
    crop_or_pad,
    normalise_dataset,
    split_name_pattern,
    split_names,
    training_counts,
    volume_moments,
)
from brainage.split_data import load_split

SPLIT = {"scheme": "holdout", "test_fraction": 0.25, "n_folds": 4, "seed": 7}


def participants_of(studies: dict[str, int]) -> pd.DataFrame:
    rows = []
    for study, count in studies.items():
        for index in range(count):
            rows.append({"participant_id": f"sub-{study.replace(' ', '')}{index:02d}",
                         "age": 20.0 + index, "sex": "F" if index % 2 else "M",
                         "study": study})
    return pd.DataFrame(rows)


# -- splits -------------------------------------------------------------------------------------

def test_split_names_per_scheme():
    table = participants_of({"study 1": 3, "st-2": 3, "B": 2})
    assert split_names(table, "holdout") == ["holdout"]
    assert split_names(table, "kfold", n_folds=3) == ["fold1", "fold2", "fold3"]
    assert split_names(table, "loso", unknown_key="ignored") == ["losoB", "losost2", "losostudy1"]


@pytest.mark.parametrize("settings, names, others", [
    ({"scheme": "holdout"}, ["holdout"], ["fold1", "losoA", "holdout2"]),
    ({"scheme": "kfold", "n_folds": 12}, [f"fold{k}" for k in range(1, 13)],
     ["fold0", "fold13", "fold01", "holdout"]),
    ({"scheme": "loso", "test_fraction": 0.3}, ["losoB", "losost2", "losostudy1"],
     ["holdout", "fold1", "loso"]),
])
def test_split_name_pattern_matches_the_schemes_names_only(settings, names, others):
    """The workflow's {split} wildcard: a split of another scheme (results/train/fold1/...
    under holdout) was planned, and its normalisation failed when it ran."""
    table = participants_of({"study 1": 6, "st-2": 6, "B": 6})
    pattern = re.compile(split_name_pattern(**settings))
    assert split_names(table, **settings)[:len(names)] == names
    assert all(pattern.fullmatch(name) for name in split_names(table, **settings))
    assert not any(pattern.fullmatch(name) for name in others)


def test_loso_names_must_stay_distinct():
    table = participants_of({"a-b": 2, "ab": 2})
    with pytest.raises(InputError, match="same split name"):
        split_names(table, "loso")
    # losoMRE and losomre: one folder on a case-insensitive file system
    with pytest.raises(InputError, match=r"\['MRE', 'mre'\] give the same split name .* case"):
        split_names(participants_of({"MRE": 2, "mre": 2}), "loso")
    with pytest.raises(InputError, match="n_folds=5 but only 4 subjects"):
        split_names(table, "kfold", n_folds=5)
    # letters, but not ASCII ones: a folder name needs A-Z, a-z or 0-9
    with pytest.raises(InputError, match=r"\['東京'\] have no ASCII letters or digits .*"
                                         r"transliteration"):
        split_names(participants_of({"東京": 2, "Osaka": 2}), "loso")


def test_holdout_is_stratified_seeded_and_order_free():
    table = participants_of({"s1": 40, "s2": 20, "s3": 8, "s4": 2})
    subset = assign_split(table, "holdout", **SPLIT)
    assert (subset == "test").sum() == round(0.25 * len(table))
    per_study = (subset == "test").groupby(table["study"]).sum()
    assert per_study["s1"] == 10 and per_study["s2"] == 5 and per_study["s3"] == 2
    assert assign_split(table, "holdout", **SPLIT).equals(subset)
    shuffled = table.sample(frac=1.0, random_state=3)
    again = assign_split(shuffled, "holdout", **SPLIT)
    assert again.loc[table.index].equals(subset)  # same subjects, whatever the row order
    other = assign_split(table, "holdout", **{**SPLIT, "seed": 8})
    assert not other.equals(subset)


def test_holdout_keeps_its_rule_for_one_subject_studies(small_dataset, caplog):
    """Studies of 10, 10, 10, 1, 1, 1 subjects: 7 test places, the seventh to the first
    singleton by name (a tie of remainders). The rule stays, as finished projects' splits,
    the seen-subject marks and the pretraining leak check depend on it; the split says that
    the study is tested from a site that training never saw."""
    table = participants_of({"A": 10, "B": 10, "C": 10, "Tiny1": 1, "Tiny2": 1, "Tiny3": 1})
    subset = assign_split(table, "holdout", **{**SPLIT, "test_fraction": 0.2})
    per_study = (subset == "test").groupby(table["study"]).sum()
    assert per_study.to_dict() == {"A": 2, "B": 2, "C": 2, "Tiny1": 1, "Tiny2": 0, "Tiny3": 0}
    data = dict(small_dataset)
    data["table"] = data["table"].assign(study=["Solo"] + ["s2"] * 11)
    split = {**SPLIT, "test_fraction": 0.5}  # 6 places: Solo's 0.5 ties s2's 5.5; Solo wins
    out = data["out"]
    with caplog.at_level(logging.INFO, logger="brainage"):
        normalise_dataset(data["maps"], data["table"], data["qc"], data["mask"],
                          out / "images.npy", out / "participants.tsv", out / "stats.json",
                          split="holdout", split_settings=split)
    assert ("split holdout: study/studies Solo have no training subject: their test MAE is "
            "that of a site the model never saw.") in caplog.text


def test_a_split_names_studies_all_on_one_side(small_dataset, caplog):
    """A kfold fold that tests a one-subject study evaluates a site that training never saw,
    and a holdout leaves a study too small for a test place out of the per-study results:
    both are said, by study, rather than read off Table 3 later."""
    data = dict(small_dataset)
    table = data["table"].copy()
    table.loc[0, "study"] = "Solo"
    data["table"] = table
    out = data["out"]
    kfold = {**SPLIT, "scheme": "kfold"}
    fold = next(name for name in split_names(table, **kfold)  # the fold that tests Solo
                if (assign_split(table, name, **kfold)[0] == "test"))
    with caplog.at_level(logging.INFO, logger="brainage"):
        normalise_dataset(data["maps"], table, data["qc"], data["mask"], out / "images.npy",
                          out / "participants.tsv", out / "stats.json", split=fold,
                          split_settings=kfold)
    assert re.search(rf"split {fold}: study/studies Solo have no training subject: their "
                     r"test MAE is that of a site the model never saw", caplog.text)
    assert "no test subject" not in caplog.text  # usual in a fold: the folds pool a study
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="brainage"):
        _run(data)
    assert ("split holdout: study/studies Solo have no test subject (too few subjects for a "
            "place): trained on, without a per-study result of their own.") in caplog.text
    assert "no training subject" not in caplog.text


def test_holdout_refuses_an_empty_side():
    table = participants_of({"s1": 2})
    with pytest.raises(InputError, match=r"split\.test_fraction=0\.1 of 2 subjects leaves the "
                                         r"test set empty"):
        assign_split(table, "holdout", scheme="holdout", test_fraction=0.1)


def test_an_empty_validation_set_names_the_pretraining_runs_key(small_dataset):
    """A pretraining cohort's holdout is drawn with pretrain.<run>.validation_fraction
    (rules/common.smk, pretrain_split): when it leaves no validation subject, the message
    named split.test_fraction, a key of the grid's splits that changes nothing there."""
    settings = {"scheme": "holdout", "test_fraction": 0.02, "n_folds": 5, "seed": 0}
    with pytest.raises(InputError, match=r"pretrain\.t1\.validation_fraction=0\.02 of 12 "
                                         r"subjects leaves the validation set empty") as error:
        training_counts(small_dataset["table"], settings,
                        fraction_key="pretrain.t1.validation_fraction", eval_subset="validation")
    assert "split.test_fraction" not in str(error.value)
    out = small_dataset["out"]
    with pytest.raises(InputError, match=r"validation_fraction=0\.02 of 12 subjects leaves "
                                         r"the validation set empty") as error:
        normalise_dataset(small_dataset["maps"], small_dataset["table"], small_dataset["qc"],
                          small_dataset["mask"], out / "images.npy", out / "participants.tsv",
                          out / "stats.json", split="holdout", split_settings=settings,
                          eval_subset="validation")
    assert "split.test_fraction" not in str(error.value)


def test_kfold_tests_every_subject_once_and_loso_one_study():
    table = participants_of({"s1": 9, "s2": 6, "s3": 3})
    settings = {**SPLIT, "scheme": "kfold", "n_folds": 3}
    folds = [assign_split(table, name, **settings) for name in split_names(table, **settings)]
    tested = sum((fold == "test").astype(int) for fold in folds)
    assert (tested == 1).all()
    for fold in folds:
        assert ((fold == "test").groupby(table["study"]).sum() == [3, 2, 1]).all()
    loso = assign_split(table, "losos2", scheme="loso")
    assert (loso == "test").equals(table["study"] == "s2")
    with pytest.raises(ValueError, match="not a split of scheme 'loso'"):
        assign_split(table, "holdout", scheme="loso")


def test_kfold_folds_are_drawn_with_the_seed():
    """The folds are seeded (split.seed): dealt in participant-id order instead, every seed
    gave the same folds, and a cohort whose ids follow recruitment (and so age) put each
    fold's test subjects at fixed ranks of the id order."""
    table = participants_of({"s1": 12})
    settings = {**SPLIT, "scheme": "kfold", "n_folds": 3}
    drawn = {seed: frozenset(table["participant_id"][
        assign_split(table, "fold1", **{**settings, "seed": seed}) == "test"])
        for seed in range(6)}
    assert all(len(tested) == 4 for tested in drawn.values())
    assert len(set(drawn.values())) > 1
    every_third = frozenset(table["participant_id"][::3])  # ids dealt in turn, unshuffled
    assert any(tested != every_third for tested in drawn.values())


def test_kfold_with_as_many_folds_as_subjects_is_leave_one_out():
    """n_folds equal to the number of subjects (leave-one-out) is a valid k-fold; only
    fewer subjects than folds leaves a fold without a test subject."""
    table = participants_of({"s1": 3, "s2": 2})
    settings = {**SPLIT, "scheme": "kfold", "n_folds": 5}
    names = split_names(table, **settings)
    assert names == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    tested = [set(table["participant_id"][assign_split(table, name, **settings) == "test"])
              for name in names]
    assert all(len(subjects) == 1 for subjects in tested)
    assert set.union(*tested) == set(table["participant_id"])


def test_training_counts_are_each_splits_training_subjects():
    """The planning checks (a batch larger than a split's training set) read these counts:
    counting every subject of the split overstated each split's training set by its test
    subjects."""
    from brainage.normalise import training_study_sizes

    table = participants_of({"s1": 6, "s2": 2})
    holdout = {**SPLIT, "test_fraction": 0.25}  # round(0.25 * 8) = 2 test subjects
    assert training_counts(table, holdout) == {"holdout": 6}
    kfold = {**SPLIT, "scheme": "kfold", "n_folds": 4}  # 8 subjects, 2 tested per fold
    assert training_counts(table, kfold) == {f"fold{k}": 6 for k in range(1, 5)}
    loso = {**SPLIT, "scheme": "loso"}
    assert training_counts(table, loso) == {"losos1": 2, "losos2": 6}
    assert training_study_sizes(table, loso) == {"losos1": {"s2": 2}, "losos2": {"s1": 6}}


def test_study_quotas_break_exact_ties_by_study_name():
    """Two studies with the same remainder compete for the last place: it goes to the
    first study name whatever the order of the sizes mapping. The search's validation set
    passes its studies in set order (which changes with PYTHONHASHSEED), so a tie broken by
    that order drew another validation set in another run."""
    from brainage.split_data import study_quotas

    assert study_quotas({"b": 1, "a": 1}, 0.5) == {"a": 1, "b": 0}
    assert study_quotas({"a": 1, "b": 1}, 0.5) == {"a": 1, "b": 0}
    # 1.5 places round up to 2, three equal remainders: the first two names get them
    assert study_quotas({"c": 1, "b": 1, "a": 1}, 0.5) == {"a": 1, "b": 1, "c": 0}


# -- grid, blocks, moments ----------------------------------------------------------------------

def test_block_average_over_brain_voxels_with_half_rule():
    volume = np.zeros((4, 2, 2), dtype=np.float32)
    volume[:2, :, :] = [[[1, 2], [3, 0]], [[5, 0], [0, 0]]]  # 4 of 8 non-zero: kept
    volume[2:, :, :] = [[[9, 0], [0, 0]], [[0, 0], [0, 1]]]  # 2 of 8: background
    result = block_average(volume, 2)
    assert result.shape == (2, 1, 1)
    assert result[0, 0, 0] == pytest.approx((1 + 2 + 3 + 5) / 4)
    assert result[1, 0, 0] == 0.0
    assert np.array_equal(block_average(volume, 1), volume)


def test_analysis_grid_crops_background_and_pads_brain():
    brain = np.zeros((9, 10, 7), dtype=bool)
    brain[2:7, 3:7, 0:7] = True  # touches both z faces
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    start, stop, shape, blocked = analysis_grid(brain, affine, factor=2)
    assert start.tolist() == [0, 0, 0] and stop.tolist() == [8, 10, 8]  # x cropped, z padded
    assert shape == (4, 5, 4)
    start, stop, shape, blocked = analysis_grid(brain, affine, factor=3)
    assert start.tolist() == [0, 0, -1] and stop.tolist() == [9, 9, 8]  # y cropped at the end
    assert shape == (3, 3, 3)
    # Block (0, 0, 0) covers template voxels 0..2 (x), 0..2 (y), -1..1 (z): its centre.
    assert np.allclose(blocked @ [0, 0, 0, 1], [2.0, 2.0, 0.0, 1.0])
    volume = np.arange(1, 9 * 10 * 7 + 1).reshape(9, 10, 7)
    window = crop_or_pad(volume, start, stop)
    assert window.shape == (9, 9, 9)
    assert window[0, 0, 0] == 0 and window[0, 0, 8] == 0  # padding below and above
    assert np.array_equal(window[:, :, 1:8], volume[:, :9, :])


def test_chan_combination_equals_numpy():
    rng = np.random.default_rng(1)
    parts = [rng.normal(3, 1, size) * (rng.uniform(size=size) > 0.3) for size in (50, 7, 300)]
    moments = (0, 0.0, 0.0)
    for part in parts:
        moments = combine_moments(moments, volume_moments(part))
    everything = np.concatenate([p[p != 0] for p in parts])
    count, mean, m2 = moments
    assert count == everything.size
    assert mean == pytest.approx(everything.mean(), rel=1e-12)
    assert np.sqrt(m2 / count) == pytest.approx(everything.std(), rel=1e-12)


def test_apply_scores_each_channel_with_its_own_statistics_and_scaling():
    # The split tests above have one channel, where channel 0's mean, sd and scaling are
    # every channel's: a second channel scored with the first one's statistics, or a T1w
    # divided by the mean or by a median that counts the background, went unnoticed.
    record = {"window_start": [0, 0, 0], "window_stop": [2, 2, 2], "block_factor": 1,
              "modalities": ["stiffness", "T1w"], "scale_by_brain_median": [False, True],
              "mean": [2.0, 1.5], "sd": [0.5, 0.25], "dtype": "float32"}
    stiffness = np.zeros((2, 2, 2), np.float32)
    stiffness[0, 0] = [2.5, 1.0]
    t1w = np.zeros((2, 2, 2), np.float32)
    t1w[1, 1] = [100.0, 200.0]
    t1w[0, 1, 0] = 600.0  # brain values 100, 200, 600: median 200 (mean 300), 5 zeros
    result = apply({"T1w": t1w, "stiffness": stiffness}, record)
    assert result.shape == (2, 2, 2, 2) and result.dtype == np.float32
    expected_stiffness = np.zeros((2, 2, 2))
    expected_stiffness[0, 0] = [(2.5 - 2.0) / 0.5, (1.0 - 2.0) / 0.5]
    expected_t1w = np.zeros((2, 2, 2))
    expected_t1w[1, 1] = [(0.5 - 1.5) / 0.25, (1.0 - 1.5) / 0.25]
    expected_t1w[0, 1, 0] = (3.0 - 1.5) / 0.25
    np.testing.assert_allclose(result[0], expected_stiffness, atol=1e-6)
    np.testing.assert_allclose(result[1], expected_t1w, atol=1e-6)


def test_apply_without_a_channel_names_the_subject():
    """A volume missing from apply's input was reported without the subject it belonged
    to ("no registered T1w map given"), the one message of apply that did not use what."""
    record = {"window_start": [0, 0, 0], "window_stop": [2, 2, 2], "block_factor": 1,
              "modalities": ["stiffness", "T1w"], "scale_by_brain_median": [False, True],
              "mean": [2.0, 1.5], "sd": [0.5, 0.25], "dtype": "float32"}
    with pytest.raises(InputError, match=r"^subject sub-07: no registered T1w map given; "
                                         r"the normalisation needs stiffness, T1w"):
        apply({"stiffness": np.ones((2, 2, 2), np.float32)}, record, what="subject sub-07")


# -- normalise_dataset -----------------------------------------------------------------------------

@pytest.fixture
def small_dataset(tmp_path):
    """12 subjects in 3 studies, 'registered maps' on a 6x8x6 template grid with a 4x6x4
    brain; QC table with subject 3 failing."""
    table = participants_of({"s1": 4, "s2": 4, "s3": 4})
    table["site"] = "x"  # an extra column, carried through
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-6, -8, -6]
    brain = np.zeros((6, 8, 6), dtype=bool)
    brain[1:5, 1:7, 1:5] = True
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), tmp_path / "mask.nii.gz")
    rng = np.random.default_rng(0)
    maps, arrays = [], {}
    for row, participant_id in enumerate(table["participant_id"]):
        data = np.where(brain, rng.normal(2.5 + 0.1 * row, 0.3, brain.shape), 0)
        data[1, 1, 1:5] = 0  # a slab edge: brain voxels without data stay background
        data = data.astype(np.float32)
        path = tmp_path / f"{participant_id}_space-MNI152_res-2_desc-preproc_stiffness.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        maps.append(str(path))
        arrays[participant_id] = data
    qc = pd.DataFrame({"participant_id": table["participant_id"], "study": table["study"],
                       "dice": 0.95, "correlation": 0.6, "coverage": 0.9, "qc_pass": True,
                       "qc_failures": ""})
    qc.loc[3, ["dice", "qc_pass", "qc_failures"]] = [0.5, False, "dice 0.500 < 0.85"]
    qc.to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    return {"table": table, "maps": maps, "arrays": arrays, "qc": tmp_path / "qc.tsv",
            "mask": tmp_path / "mask.nii.gz", "out": tmp_path / "out"}


def _run(data, **options):
    out = data["out"]
    stats = normalise_dataset(data["maps"], data["table"], data["qc"], data["mask"],
                              out / "images.npy", out / "participants.tsv", out / "stats.json",
                              split="holdout", split_settings=SPLIT, **options)
    return stats, np.load(out / "images.npy", mmap_mode="r"), pd.read_csv(
        out / "participants.tsv", sep="\t")


def test_a_full_disk_while_writing_the_images_is_named_not_a_crash(small_dataset, monkeypatch,
                                                                  small_disk):
    """images.npy was a sparse file written through a memory map: on a full disk the job
    died of SIGBUS (exit 135), without a message and with its log cut short. The room is
    checked first, and a disk that fills up after the check is a WriteError."""
    from brainage.io import WriteError

    _, images, _ = _run(small_dataset)
    needed = images.nbytes
    monkeypatch.setattr("brainage.io.free_bytes", lambda folder: 100)
    with pytest.raises(WriteError, match=rf"writing {re.escape(str(small_dataset['out']))}"
                                         rf"/images\.npy needs about {needed} bytes but only "
                                         rf"100 bytes are free"):
        _run(small_dataset)
    monkeypatch.undo()
    if not small_disk.real:
        return
    # another writer fills the disk after the check: leave less room than the rows need
    filler = small_disk.folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:  # full
            handle.truncate(handle.tell() - 4096 * (needed // 2 // 4096 + 1))
    assert 0 < shutil.disk_usage(small_disk.folder).free < needed
    monkeypatch.setattr("brainage.normalise.ensure_room", lambda final, size: None)
    out = small_disk.folder / "out"
    with pytest.raises(WriteError, match=rf"writing {re.escape(str(out))}/images\.npy failed: "
                                         rf"No space left on device"):
        normalise_dataset(small_dataset["maps"], small_dataset["table"], small_dataset["qc"],
                          small_dataset["mask"], out / "images.npy", out / "participants.tsv",
                          out / "stats.json", split="holdout", split_settings=SPLIT)
    assert not (out / "images.npy").exists()


def test_the_arrays_do_not_depend_on_the_row_order_of_participants_tsv(small_dataset):
    """Training's batches, the search's carve-out and the read-out's folds are drawn over
    row positions: the same cohort in another row order (a re-sorted spreadsheet) trained
    other encoders, and two losses swapped places in a review's Table 3. The rows are in
    participant-id order whatever the table's."""
    _, images, table = _run(small_dataset)
    stored = np.array(images)
    shuffled = dict(small_dataset, table=small_dataset["table"].iloc[::-1].reset_index(
        drop=True), out=small_dataset["out"].with_name("reversed"))
    stats, reversed_images, reversed_table = _run(shuffled)
    assert table["participant_id"].tolist() == sorted(table["participant_id"])
    pd.testing.assert_frame_equal(reversed_table, table)
    assert reversed_images.tobytes() == stored.tobytes()
    assert stats["images_sha256"] == json.loads(
        (small_dataset["out"] / "stats.json").read_text())["images_sha256"]


def test_progress_lines_count_the_subjects_done_so_far(small_dataset, caplog, monkeypatch):
    """'normalised 25/40 subjects' read as 15 subjects dropped, to a lab's first run."""
    monkeypatch.setattr("brainage.normalise.PROGRESS_EVERY", 5)
    with caplog.at_level(logging.INFO, logger="brainage.normalise"):
        _run(small_dataset)
    assert "statistics: 5 of 9 subjects read so far" in caplog.text, caplog.text
    assert "normalised 10 of 12 subjects so far" in caplog.text, caplog.text


def test_normalisation_equals_numpy_with_training_statistics(small_dataset):
    # what a killed run left (atomic_path's temporaries; the images' one is the array's
    # size, kept for good in results/dataset/<split>/): removed by the rerun
    small_dataset["out"].mkdir()
    for name in (".images.npy.k3j_x9ab.npy", ".stats.json.a1b2c3d4.json",
                 ".participants.tsv.zz99yy88.tsv"):
        (small_dataset["out"] / name).write_bytes(b"half")
    stats, images, table = _run(small_dataset)
    subset = assign_split(small_dataset["table"], "holdout", **SPLIT)
    train = [pid for pid, s in zip(small_dataset["table"]["participant_id"], subset)
             if s == "train"]
    values = np.concatenate([small_dataset["arrays"][p][small_dataset["arrays"][p] != 0]
                             for p in train]).astype(np.float64)
    assert stats["modalities"] == ["stiffness"]
    assert stats["mean"] == [pytest.approx(values.mean(), rel=1e-10)]
    assert stats["sd"] == [pytest.approx(values.std(), rel=1e-10)]
    assert stats["n_voxels"] == [values.size] and stats["statistics_subjects"] == train
    assert images.shape == (12, 1, 6, 8, 6) and images.dtype == np.float32
    for row, participant_id in enumerate(table["participant_id"]):
        raw = small_dataset["arrays"][participant_id]
        expected = np.where(raw != 0, (raw - values.mean()) / values.std(), 0)
        assert np.allclose(images[row, 0], expected, atol=1e-5)
        assert np.all(images[row, 0][raw == 0] == 0)  # background exactly 0
    assert list(table.columns) == ["participant_id", "age", "sex", "study", "site", "subset",
                                   "coverage"]
    assert table["subset"].tolist() == subset.tolist()
    assert stats["shape"] == [6, 8, 6] and stats["resolution_mm"] == 2
    assert np.allclose(stats["affine"], nib.load(small_dataset["mask"]).affine)
    assert json.loads((small_dataset["out"] / "stats.json").read_text())["split"] == "holdout"
    assert stats["images_sha256"] == hashlib.sha256(np.asarray(images).tobytes()).hexdigest()
    assert sorted(p.name for p in small_dataset["out"].iterdir()) == [
        "images.npy", "participants.tsv", "stats.json"]  # no temporary files left


def test_statistics_never_see_test_subjects(small_dataset):
    stats, _, table = _run(small_dataset)
    test_ids = table.loc[table["subset"] == "test", "participant_id"]
    for path in small_dataset["maps"]:
        if Path(path).name.split("_")[0] in set(test_ids):
            image = nib.load(path)
            nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32) * 50, image.affine), path)
    changed, images, _ = _run(small_dataset)
    assert (changed["mean"], changed["sd"]) == (stats["mean"], stats["sd"])
    # ... but the images did change, and with them a training's resume fingerprint
    assert changed["images_sha256"] != stats["images_sha256"]
    split = load_split(small_dataset["out"])
    assert split.identity() != replace(split, stats=stats).identity()
    all_scope, _, _ = _run(small_dataset, scope="all")
    assert all_scope["mean"][0] > 5 * stats["mean"][0] and all_scope["scope"] == "all"
    assert len(all_scope["statistics_subjects"]) == 12


def test_block_averaged_resolution_and_float16(small_dataset):
    stats, images, _ = _run(small_dataset, resolution_mm=4, dtype="float16")
    assert images.dtype == np.float16 and images.shape == (12, 1, 3, 4, 3)
    assert stats["resolution_mm"] == 4 and stats["dtype"] == "float16"
    blocked = {p: block_average(a, 2) for p, a in small_dataset["arrays"].items()}
    train = stats["statistics_subjects"]
    values = np.concatenate([blocked[p][blocked[p] != 0] for p in train]).astype(np.float64)
    assert stats["mean"] == [pytest.approx(values.mean(), rel=1e-6)]
    first = small_dataset["table"]["participant_id"][0]
    expected = np.where(blocked[first] != 0, (blocked[first] - values.mean()) / values.std(), 0)
    assert np.allclose(images[0, 0].astype(np.float32), expected, atol=2e-3)


def test_qc_metrics_on_a_constructed_case():
    from brainage.qc import qc_metrics

    rng = np.random.default_rng(0)
    template_t1 = rng.uniform(1, 2, (10, 10, 10))
    template_mask = np.zeros((10, 10, 10), bool)
    template_mask[:, :, :5] = True  # 500 template brain voxels
    subject_mask = np.zeros_like(template_mask)
    subject_mask[:, :, 1:6] = True  # 400 of its 500 voxels inside the template's
    stiffness = np.zeros((10, 10, 10))
    stiffness[:, :, 3:] = 2.0 * template_t1[:, :, 3:]  # a slab that reaches past the brain
    reference = 3.0 * template_t1
    reference[:, :, :2] = 0.0  # a warped reference without data in part of the brain
    metrics = qc_metrics(stiffness, subject_mask, reference, template_t1, template_mask)
    assert metrics["coverage"] == pytest.approx(200 / 500)  # only template-brain voxels count
    assert metrics["dice"] == pytest.approx(2 * 400 / (500 + 500))
    assert metrics["correlation"] == pytest.approx(1.0)  # the map is the T1 times 2 there
    # the reference is compared where it has data, as the map is: its zeros counted, it
    # correlated about 0.23 with the template (the reference was the template T1 itself here,
    # so no region or operand mattered)
    assert metrics["reference_correlation"] == pytest.approx(1.0)


def test_qc_correlation_of_a_map_constant_inside_the_brain_is_zero(recwarn):
    """A map constant in the template brain has no correlation; _pearson says 0.0 then, but
    tested constancy with the float32 np.std, which is 2.4e-7 for 1000 voxels of 3.1 kPa:
    np.corrcoef returned NaN (with a RuntimeWarning), written to the QC JSON as the
    non-standard token NaN."""
    from brainage.qc import qc_metrics

    rng = np.random.default_rng(0)
    template_t1 = rng.uniform(1, 2, (10, 10, 10))
    template_mask = np.ones((10, 10, 10), bool)
    stiffness = np.full((10, 10, 10), 3.1, dtype=np.float32)
    assert np.std(stiffness) != 0  # the rounding the check tripped over
    metrics = qc_metrics(stiffness, template_mask, stiffness, template_t1, template_mask)
    assert metrics["correlation"] == 0.0
    assert metrics["reference_correlation"] == 0.0
    assert metrics["coverage"] == 1.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_qc_correlation_is_zero_when_undefined():
    """_pearson's documented 0.0: fewer than 3 covered voxels (two points always correlate
    +-1), or a template T1 constant where the map has data (np.corrcoef: NaN)."""
    from brainage.qc import qc_metrics

    template_mask = np.ones((4, 4, 4), bool)
    template_t1 = np.arange(64, dtype=np.float64).reshape(4, 4, 4) + 1.0
    stiffness = np.zeros((4, 4, 4))
    stiffness[0, 0, :2] = [2.0, 3.0]  # two voxels, rising with the T1
    assert qc_metrics(stiffness, template_mask, template_t1, template_t1,
                      template_mask)["correlation"] == 0.0
    varied = np.random.default_rng(0).uniform(1, 2, (4, 4, 4))
    with np.errstate(all="raise"):
        flat = qc_metrics(varied, template_mask, varied, np.full((4, 4, 4), 1.5),
                          template_mask)
    assert flat["correlation"] == 0.0 and flat["reference_correlation"] == 0.0


def test_qc_thresholds_name_what_the_qc_section_lacks():
    from brainage.qc import thresholds

    assert thresholds({"min_dice": 0.8, "min_correlation": "0.3", "min_coverage": 1,
                       "other": 2}) == {"min_dice": 0.8, "min_correlation": 0.3,
                                        "min_coverage": 1.0}
    with pytest.raises(KeyError, match=r"QC thresholds min_correlation, min_coverage are "
                                       r"missing \(config section qc\)"):
        thresholds({"min_dice": 0.8})


def test_map_summary_reads_the_brains_non_zero_voxels():
    from brainage.qc import map_summary

    values = np.zeros((10, 10, 10))
    values[:5] = np.arange(1, 501, dtype=np.float64).reshape(5, 10, 10)  # 1 .. 500 kPa
    values[6:] = 1000.0  # outside the brain
    brain = np.zeros((10, 10, 10), bool)
    brain[:6] = True  # and 100 brain voxels without data
    summary = map_summary(values, brain)
    expected = np.percentile(np.arange(1, 501), [1, 50, 99])
    assert summary == {"voxels": 500, "p01": pytest.approx(expected[0]),
                       "median": pytest.approx(250.5), "p99": pytest.approx(expected[2])}
    assert summary["p99"] == pytest.approx(495.01)
    assert map_summary(np.zeros((10, 10, 10)), brain) == {"voxels": 0, "p01": None,
                                                          "median": None, "p99": None}


def test_a_qc_metric_that_could_not_be_computed_fails():
    from brainage.qc import qc_failures, thresholds

    minimums = thresholds({"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7})
    assert qc_failures({"dice": 0.9, "correlation": 0.5, "coverage": 0.8}, minimums) == []
    failures = qc_failures({"dice": float("nan"), "correlation": 0.5, "coverage": 0.7},
                           minimums)
    assert failures == ["dice nan < 0.85"]  # NaN fails; a value at the minimum passes
    # a value just below its minimum shows the digits that put it there, not "0.700 < 0.7"
    assert qc_failures({"dice": 0.9, "correlation": 0.5, "coverage": 0.6999}, minimums) == [
        "coverage 0.6999 < 0.7"]
    assert qc_failures({"dice": 0.812, "correlation": 0.5, "coverage": 0.8}, minimums) == [
        "dice 0.812 < 0.85"]


def test_qc_failures_are_excluded_with_their_reason_or_the_split_ignores_the_thresholds(
        small_dataset, caplog, tmp_path):
    stats, images, table = _run(small_dataset)
    assert stats["excluded"] == [] and len(table) == 12 and "qc_pass" not in table
    # without exclusion the workflow passes the subjects' QC files, which hold no verdict:
    # a threshold edited later reruns neither this split nor any training
    files = []
    for row in pd.read_csv(small_dataset["qc"], sep="\t").itertuples(index=False):
        files.append(tmp_path / f"{row.participant_id}_qc.json")
        files[-1].write_text(json.dumps({"participant_id": row.participant_id,
                                         "dice": row.dice, "correlation": row.correlation,
                                         "coverage": 0.5 + 0.01 * len(files)}))
    from_files, _, files_table = _run({**small_dataset, "qc": [str(f) for f in files]})
    assert from_files["excluded"] == [] and len(files_table) == 12
    assert files_table["coverage"].tolist() == pytest.approx(
        [0.5 + 0.01 * (index + 1) for index in range(12)])
    with pytest.raises(ValueError, match="exclude_failed needs the QC table"):
        _run({**small_dataset, "qc": [str(f) for f in files]}, exclude_failed=True)
    with pytest.raises(InputError, match="no QC file was given for sub-s100"):
        _run({**small_dataset, "qc": [str(f) for f in files[1:]]})
    with caplog.at_level(logging.WARNING):
        stats, images, table = _run(small_dataset, exclude_failed=True)
    assert stats["excluded"] == [{"participant_id": "sub-s103",
                                  "reason": "QC: dice 0.500 < 0.85"}]
    assert "sub-s103" not in table["participant_id"].tolist() and images.shape[0] == 11
    assert "excluding sub-s103" in caplog.text
    assert "without any subject" not in caplog.text
    # a whole study failing (its slab short of qc.min_coverage) was named subject by subject,
    # and no line said that the study left the split, the tables and the model
    qc = pd.read_csv(small_dataset["qc"], sep="\t")
    qc.loc[qc["study"] == "s3", ["coverage", "qc_pass", "qc_failures"]] = [
        0.45, False, "coverage 0.450 < 0.7"]
    qc.to_csv(small_dataset["qc"], sep="\t", index=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stats, images, table = _run(small_dataset, exclude_failed=True)
    assert set(table["study"]) == {"s1", "s2"}
    assert ("split holdout: qc.exclude_failed leaves study/studies s3 without any subject "
            "(every one failed QC)") in caplog.text


def test_qc_exclusions_that_empty_the_test_set_stop_the_split_naming_qc(small_dataset):
    """Leave-one-study-out where every subject of the held-out study fails QC: the split
    was written without a test subject, and its first reader (train_encoder's load_split)
    said to check split.test_fraction / split.scheme; the cause is qc.exclude_failed."""
    qc = pd.read_csv(small_dataset["qc"], sep="\t")
    failing = qc["study"] == "s2"
    qc.loc[failing, ["qc_pass", "qc_failures"]] = [False, "dice 0.500 < 0.85"]
    qc.to_csv(small_dataset["qc"], sep="\t", index=False)
    out = small_dataset["out"]
    with pytest.raises(InputError, match=r"split losos2: no test subject left after the QC "
                                         r"exclusions .*qc\.exclude_failed"):
        normalise_dataset(small_dataset["maps"], small_dataset["table"], small_dataset["qc"],
                          small_dataset["mask"], out / "images.npy", out / "participants.tsv",
                          out / "stats.json", split="losos2",
                          split_settings={**SPLIT, "scheme": "loso"}, exclude_failed=True)
    # ... and the same for the training side: the message named neither QC's key nor a remedy
    qc.loc[:, ["qc_pass", "qc_failures"]] = [False, "dice 0.500 < 0.85"]
    qc.loc[failing, ["qc_pass", "qc_failures"]] = [True, ""]
    qc.to_csv(small_dataset["qc"], sep="\t", index=False)
    with pytest.raises(InputError, match=r"split losos2: no training subject left after the "
                                         r"QC exclusions \(8 subjects failed QC, config key "
                                         r"qc\.exclude_failed\).*set qc\.exclude_failed: false"):
        normalise_dataset(small_dataset["maps"], small_dataset["table"], small_dataset["qc"],
                          small_dataset["mask"], out / "images.npy", out / "participants.tsv",
                          out / "stats.json", split="losos2",
                          split_settings={**SPLIT, "scheme": "loso"}, exclude_failed=True)


def test_a_subject_without_data_at_the_resolution_is_warned_of(small_dataset, caplog):
    """A map whose data leave every 4 mm block under half measured gives an all-zero row,
    read as average tissue, and was trained or tested on without a word."""
    path = Path(small_dataset["maps"][2])
    image = nib.load(path)
    one_voxel = np.zeros(image.shape, np.float32)
    one_voxel[2, 3, 2] = 2.5
    nib.save(nib.Nifti1Image(one_voxel, image.affine), path)
    with caplog.at_level(logging.WARNING, logger="brainage.normalise"):
        _, images, _ = _run(small_dataset, resolution_mm=4)
    assert not images[2].any() and images[1].any()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "split holdout: subject sub-s102 has no stiffness data at 4 mm (every block under half "
        "measured): its row is all zero, read as average tissue. Look at its QC coverage and "
        "registered map; set qc.exclude_failed: true to leave QC failures out, or remove the "
        "subject."]


def test_bad_maps_are_named(small_dataset):
    path = Path(small_dataset["maps"][2])
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match=r"sub-s102: registered map .* is not on the template "
                                         r"grid"):
        _run(small_dataset)
    small_dataset["maps"].pop(2)
    with pytest.raises(InputError, match=r"no registered map given for sub-s102"):
        _run(small_dataset)


def test_a_damaged_registered_map_is_named_as_the_pipelines_own_file(small_dataset):
    """A registered map cut short (a full disk, a shared file system's hiccup) was told to
    be re-exported as .nii.gz, a raw scan's remedy, in a message that broke mid-line."""
    import gzip

    path = Path(small_dataset["maps"][2])
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:len(raw) // 2]))
    with pytest.raises(InputError) as caught:
        _run(small_dataset)
    message = str(caught.value)
    assert re.search(r"sub-s102: registered map .* is not a readable NIfTI file \(.*\)\. The "
                     r"pipeline made this file: delete it and run the same command again",
                     message), message
    assert "\n" not in message and "Re-export" not in message


def test_an_empty_or_4d_registered_map_is_named_as_the_pipelines_own_file(small_dataset):
    """An empty brain mask or map the pipeline made (a truncated write) was told to be
    re-exported from its source, or its subject dropped from participants.tsv."""
    path = Path(small_dataset["maps"][2])
    image = nib.load(path)
    for data in (np.zeros(image.shape, np.float32),
                 np.ones((*image.shape, 2), np.float32)):
        nib.save(nib.Nifti1Image(data, image.affine), path)
        with pytest.raises(InputError) as caught:
            _run(small_dataset)
        message = str(caught.value)
        assert "The pipeline made this file: delete it and run the same command" in message
        assert "participants.tsv" not in message and "Re-export" not in message


def test_constant_training_maps_name_the_subjects_and_the_remedy(small_dataset):
    """Registered maps that are constant in the brain (a failed registration can give
    them) have no sd to divide by: the error names the statistics subjects and says where
    to look and how to redo them, instead of only that the maps are empty or constant."""
    for path in small_dataset["maps"]:
        image = nib.load(path)
        data = image.get_fdata(dtype=np.float32)
        nib.save(nib.Nifti1Image(np.where(data != 0, 2.5, 0).astype(np.float32),
                                 image.affine), path)
    with pytest.raises(InputError, match=r"split holdout: the statistics subjects \(sub-s1\d\d, "
                                         r".* and \d+ more\) have \d+ non-zero stiffness voxels "
                                         r"\(sd 0\.0\).*preproc/.*delete a subject's "
                                         r"preprocessed files"):
        _run(small_dataset)
    assert not (small_dataset["out"] / "images.npy").exists()


def test_missing_qc_row_is_an_error(small_dataset):
    qc = pd.read_csv(small_dataset["qc"], sep="\t")
    qc.iloc[1:].to_csv(small_dataset["qc"], sep="\t", index=False)
    with pytest.raises(InputError, match=r"qc\.tsv has no row for sub-s100"):
        _run(small_dataset)


def test_float16_overflow_stops_the_split_naming_the_subject(small_dataset):
    """A test subject's outlier voxel (z of about 3e5 with the training statistics) was
    stored as inf in a float16 images.npy without an error; the split's first reader
    (load_split) then said to rerun the normalisation, which wrote the same inf."""
    table = small_dataset["table"]
    subset = assign_split(table, "holdout", **SPLIT)
    subject = table["participant_id"][np.flatnonzero(subset == "test")[0]]
    path = next(p for p in small_dataset["maps"] if Path(p).name.startswith(f"{subject}_"))
    image = nib.load(path)
    data = image.get_fdata(dtype=np.float32)
    data[2, 2, 2] = 1e5
    nib.save(nib.Nifti1Image(data, image.affine), path)
    with pytest.raises(InputError, match=rf"split holdout: subject {subject}: .*stiffness.* "
                                         rf"float16.*normalise\.dtype: float32"):
        _run(small_dataset, dtype="float16")
    assert not (small_dataset["out"] / "images.npy").exists()
    stats, images, _ = _run(small_dataset)  # float32 holds it
    assert np.isfinite(images).all()


def test_a_pretraining_cohort_holding_a_test_subject_is_refused():
    """A lab's own T1w cohort numbers its people as its MRE cohort does: a participant_id
    of both that the training cohort tests would show the encoder that subject's image and
    age before the test. Sharing training subjects is fine; with kfold every subject is
    tested in one fold."""
    participants = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(10)],
                                 "age": np.linspace(20, 80, 10), "sex": "F",
                                 "study": ["a", "b"] * 5})
    holdout = {"scheme": "holdout", "test_fraction": 0.2, "n_folds": 5, "seed": 42}
    subset = assign_split(participants, "holdout", **holdout)
    tested = participants.loc[subset == "test", "participant_id"].tolist()
    trained = participants.loc[subset == "train", "participant_id"].tolist()
    others = pd.DataFrame({"participant_id": ["sub-t1w1", "sub-t1w2"]})
    check_pretraining_cohort(others, participants, holdout, root="t1w")
    check_pretraining_cohort(pd.DataFrame({"participant_id": trained[:3] + ["sub-t1w1"]}),
                             participants, holdout, root="t1w")
    with pytest.raises(InputError, match=rf"the pretraining cohort t1w holds 1 test subject\(s\) "
                                         rf"of the training cohort \(dataset.root, split scheme "
                                         rf"holdout\): {tested[0]}\. .*Remove their rows"):
        check_pretraining_cohort(pd.DataFrame({"participant_id": trained[:2] + tested[:1]}),
                                 participants, holdout, root="t1w")
    kfold = dict(holdout, scheme="kfold")
    with pytest.raises(InputError, match=rf"scheme kfold, which tests every subject in one of "
                                         rf"its splits\): {trained[0]}\."):
        check_pretraining_cohort(pd.DataFrame({"participant_id": trained[:1]}), participants,
                                 kfold, root="t1w")
    # whatever the case: sub-S00 and sub-s00 are one folder on a case-insensitive file
    # system, and one person in a lab that spells its ids both ways (it was accepted)
    lettered = participants.assign(participant_id=[f"sub-S{i:02d}" for i in range(10)])
    lettered_tested = lettered.loc[assign_split(lettered, "holdout", **holdout) == "test",
                                   "participant_id"].tolist()
    lower = pd.DataFrame({"participant_id": [pid.replace("S", "s") for pid in lettered_tested]})
    with pytest.raises(InputError, match=rf"holds 2 test subject\(s\) .*: "
                                         rf"{lower['participant_id'][0]} \(as "
                                         rf"{lettered_tested[0]}\), "):
        check_pretraining_cohort(lower, lettered, holdout, root="t1w")


def test_a_split_blames_qc_only_for_the_studies_whose_side_it_took(small_dataset, caplog):
    """The "no test subject" line said "after the QC exclusions" for every study once any
    subject of the cohort failed QC, also for a one-subject study too small for a place."""
    data = dict(small_dataset)
    table = data["table"].assign(study=["Solo"] + list(data["table"]["study"][1:]))
    tested = table["participant_id"][(assign_split(table, "holdout", **SPLIT) == "test")
                                     & (table["study"] == "s2")].tolist()
    assert len(tested) == 1 and not (assign_split(table, "holdout", **SPLIT)[0] == "test")
    qc = pd.read_csv(data["qc"], sep="\t").assign(qc_pass=True, qc_failures="")
    qc.loc[qc["participant_id"] == tested[0], ["qc_pass", "qc_failures"]] = [False, "dice"]
    qc.to_csv(data["qc"], sep="\t", index=False)
    out = data["out"]
    with caplog.at_level(logging.INFO, logger="brainage"):
        normalise_dataset(data["maps"], table, data["qc"], data["mask"], out / "images.npy",
                          out / "participants.tsv", out / "stats.json", split="holdout",
                          split_settings=SPLIT, exclude_failed=True)
    assert ("split holdout: study/studies Solo, s2 have no test subject (QC exclusions took "
            "that of s2): trained on, without a per-study result of their own.") in caplog.text
