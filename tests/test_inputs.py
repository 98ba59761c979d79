"""Each bad input (participants.tsv, labels, images) stops with one clear message naming
the file, subject or column and what to do."""

import gzip
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage import inputs
from brainage.inputs import (
    ALL_SUBJECTS,
    IMAGE_CHECKS_VERSION,
    NO_GROUP,
    InputError,
    check_cohort_table,
    check_dataset_images,
    check_label,
    checked_map_digests,
    cohort_groups,
    load_nifti_checked,
    read_participants,
    same_grid,
    subject_inputs,
    subjects_without_t1w,
)
from brainage.preprocess.images import load_volume
from conftest import default_rows, write_tiny_dataset


def _rewrite_table(root: Path, mutate):
    table = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
    table = mutate(table)
    table.to_csv(root / "participants.tsv", sep="\t", index=False)


def test_subjects_without_a_t1w_among_others_are_named_before_any_job(tmp_path):
    # a lab's subject whose T1w is missing was named only by tabulate_qc, after every
    # subject's preprocessing; all or none without one is a cohort's choice, not a mix
    root = write_tiny_dataset(tmp_path / "data", default_rows(4), with_anat=True)
    labels = [row["participant_id"][len("sub-"):] for row in default_rows(4)]
    assert subjects_without_t1w(root, labels, where="config key dataset.root") is None
    (root / "sub-01a" / "anat" / "sub-01a_T1w.nii.gz").unlink()
    warning = subjects_without_t1w(root, labels, where="config key dataset.root")
    assert warning.startswith(f"1 of 4 subjects in {root} (config key dataset.root) have no "
                              f"T1w (anat/sub-<label>_T1w.nii.gz): sub-01a. They will be "
                              f"skull-stripped and registered by their map")
    for label in labels:
        (root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz").unlink(missing_ok=True)
    assert subjects_without_t1w(root, labels, where="config key dataset.root") is None


def test_valid_dataset_reads_with_extra_columns(tmp_path):
    rows = [dict(r, group="healthy") for r in default_rows()]
    root = write_tiny_dataset(tmp_path / "d", rows, with_anat=True)
    table = read_participants(root)
    assert list(table["participant_id"]) == [r["participant_id"] for r in rows]
    assert table["age"].dtype == float and "group" in table
    inputs = subject_inputs(root, "00a")
    assert set(inputs) == {"stiffness", "anat"}


def test_subject_folders_without_a_row_are_named_not_dropped_silently(tmp_path, caplog):
    root = write_tiny_dataset(tmp_path / "d", default_rows())
    (root / "sub-99z" / "mre").mkdir(parents=True)
    (root / "sub-notes.txt").write_text("not a subject folder")
    caplog.set_level("WARNING", logger="brainage.inputs")
    table = read_participants(root)
    assert "sub-99z" not in set(table["participant_id"])
    assert [r.getMessage() for r in caplog.records if "no row" in r.getMessage()] == [
        f"1 subject folder(s) in {root.resolve()} have no row in "
        f"{root.resolve() / 'participants.tsv'} and are not used: sub-99z. Add their rows "
        f"(participant_id, age, sex, study) to use them."]


def test_a_missing_input_names_what_is_there_instead(tmp_path):
    root = write_tiny_dataset(tmp_path / "d", default_rows())
    stiffness = root / "sub-00a" / "mre" / "sub-00a_stiffness.nii.gz"
    with gzip.open(stiffness) as packed:
        (stiffness.parent / "sub-00a_stiffness.nii").write_bytes(packed.read())
    stiffness.unlink()
    with pytest.raises(InputError, match=r"sub-00a_stiffness\.nii\.gz is missing.*There is "
                                         r"sub-00a_stiffness\.nii: compress it"):
        read_participants(root)
    (root / "sub-00a" / "mre").rename(root / "sub-00a" / "ses-1")
    (root / "sub-00a" / "ses-1").mkdir(exist_ok=True)
    with pytest.raises(InputError, match=r"has session folders \(ses-1\); the dataset "
                                         r"layout has none"):
        subject_inputs(root, "00a")


def test_a_map_put_in_anat_is_named_where_it_is(tmp_path):
    """A lab's stiffness map saved beside its T1w in anat/: 'is missing' alone sent it
    looking for a file it had."""
    root = write_tiny_dataset(tmp_path / "d", default_rows(), with_anat=True)
    subject = root / "sub-00a"
    (subject / "mre" / "sub-00a_stiffness.nii.gz").rename(
        subject / "anat" / "sub-00a_stiffness.nii.gz")
    with pytest.raises(InputError, match=r"sub-00a_stiffness\.nii\.gz is missing.* holds "
                                         r"anat/sub-00a_stiffness\.nii\.gz: move it into "
                                         r"mre/ \("):
        read_participants(root)


def test_a_bids_session_dataset_is_told_each_step_and_one_session_per_person(tmp_path):
    """A BIDS dataset with sessions: ses-01/mre/sub-00a_ses-01_stiffness.nii.gz. The first
    refusal said to list other sessions as subjects of their own, which puts one person on
    both sides of the split (a test MAE of people trained on); moving mre/ up as told gave
    the same message again, as the files still carried the session in their names."""
    root = write_tiny_dataset(tmp_path / "d", default_rows())
    subject = root / "sub-00a"
    (subject / "ses-01").mkdir()
    (subject / "mre").rename(subject / "ses-01" / "mre")
    (subject / "ses-01" / "mre" / "sub-00a_stiffness.nii.gz").rename(
        subject / "ses-01" / "mre" / "sub-00a_ses-01_stiffness.nii.gz")
    with pytest.raises(InputError) as refused:
        read_participants(root)
    assert "has session folders (ses-01)" in str(refused.value)
    assert "name its files without the session (sub-00a_stiffness.nii.gz)" in str(refused.value)
    assert "Train on one session per person" in str(refused.value)
    assert "subjects of their own" not in str(refused.value)
    # the other sessions of training subjects are people the model was trained on
    assert "those of its training subjects come out optimistic" in str(refused.value)
    (subject / "ses-01" / "mre").rename(subject / "mre")  # the first half of the advice
    with pytest.raises(InputError, match=r"mre holds sub-00a_ses-01_stiffness\.nii\.gz: name "
                                         r"the file sub-00a_stiffness\.nii\.gz"):
        read_participants(root)
    (subject / "mre" / "sub-00a_ses-01_stiffness.nii.gz").rename(
        subject / "mre" / "sub-00a_stiffness.nii.gz")
    assert len(read_participants(root)) == 4


def test_a_cohort_to_predict_with_sessions_is_told_where_they_go_once(tmp_path):
    """The same layout as a cohort to predict: its message spoke of training and of the
    split, and said it again for each missing map of each subject."""
    root = write_tiny_dataset(tmp_path / "d", default_rows(),
                              maps=("stiffness", "damping_ratio"))
    for label in ("00a", "01a"):
        subject = root / f"sub-{label}"
        (subject / "ses-01").mkdir()
        (subject / "mre").rename(subject / "ses-01" / "mre")
    with pytest.raises(InputError) as refused:
        read_participants(root, ("stiffness", "damping_ratio"), to_predict=True)
    message = str(refused.value)
    assert message.startswith("4 input images are missing")
    assert message.count("has session folders (ses-01)") == 4
    assert message.count("predict each further session as a cohort of its own") == 1
    assert "Train on" not in message and "split" not in message
    with pytest.raises(InputError) as refused:  # the training cohort: said once too
        read_participants(root, ("stiffness", "damping_ratio"))
    assert str(refused.value).count("Train on one session per person") == 1


def test_a_renamed_subjects_files_under_the_old_label_are_named(tmp_path):
    """A label refused (sub-st1_s003), the folder and row renamed as told: the files inside
    still carry the old label, which the 'missing' message now names."""
    rows = default_rows()
    root = write_tiny_dataset(tmp_path / "d", rows)
    (root / "sub-01a").rename(root / "sub-01b")
    rows[1]["participant_id"] = "sub-01b"
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"sub-01b_stiffness\.nii\.gz is missing.* holds "
                                         r"sub-01a_stiffness\.nii\.gz: name the file "
                                         r"sub-01b_stiffness\.nii\.gz"):
        read_participants(root)


def test_every_bad_row_is_named_at_once_and_an_empty_row_is_skipped(tiny_dataset, caplog):
    """A table exported in a locale with decimal commas has every age bad: each subject is
    named in one message, not one per run; a row of tabs only (a spreadsheet's formatted
    empty rows) holds no subject: it was taken for a participant_id 'nan', then refused,
    while pandas skipped a line of spaces without a word. Both are skipped now, logged."""
    def mutate(table):
        table["age"] = ["24,8", "30,5", "41,0", "52,25"]
        table.loc[1, "participant_id"] = "sub-01_a"
        return table
    _rewrite_table(tiny_dataset, mutate)
    with pytest.raises(InputError) as refused:
        read_participants(tiny_dataset)
    message = str(refused.value)
    # a row with two problems counts once, and each problem names its line
    assert message.startswith(f"4 rows of {tiny_dataset / 'participants.tsv'} need fixing:")
    assert re.search(r"line 3: subject label '01_a' is not a BIDS label.* line 3: subject "
                     r"sub-01_a has age '30,5'", message), message
    for line, subject, age in [(2, "sub-00a", "24,8"), (4, "sub-02a", "41,0"),
                               (5, "sub-03a", "52,25")]:
        assert f"line {line}: subject {subject} has age '{age}'; ages must be numbers in " \
               f"years, with a decimal point, not a comma" in message
    table = tiny_dataset / "participants.tsv"
    _rewrite_table(tiny_dataset, lambda table: table.assign(
        age=[20.0, 30.0, 40.0, 50.0], participant_id=["sub-00a", "sub-01a", "sub-02a", "sub-03a"]))
    clean = table.read_text()
    # a later row of more tabs than the header's (pandas' tokenizer stopped at it), and one
    # before the header
    table.write_text("\n" + clean.replace("\n", "\n\t \t\t\n", 2) + "\t\t\t\t\t\t\n  \n")
    with caplog.at_level(logging.INFO, logger="brainage"):
        participants = read_participants(tiny_dataset)
    assert participants["age"].tolist() == [20.0, 30.0, 40.0, 50.0]
    assert "line(s) 3, 5, 9 hold only tabs or spaces and are skipped" in caplog.text
    table.write_text(clean.replace("\n", "\n\t\t\t\n", 1).replace("\t20", "\tx", 1))
    with pytest.raises(InputError, match=r"participants\.tsv line 3: subject sub-00a has age "):
        read_participants(tiny_dataset)  # the lines named are the file's, empty rows counted
    # a line pandas takes for the header but the csv module skips (a quoted empty value),
    # with a wide row below: refused as a table, not a traceback
    table.write_text('""\n' + clean + "\t\t\t\t\t\t\n")
    with pytest.raises(InputError, match=r"participants\.tsv"):
        read_participants(tiny_dataset)


def test_extra_columns_of_a_training_table_keep_their_text(tiny_dataset, tmp_path):
    """A site code 007 stayed 7 and an integer group with a blank became 1.0 in a split's
    participants.tsv: extra columns are the lab's, carried as written."""
    def mutate(table):
        table["site"] = ["007", "012", "007", "3"]
        table["group"] = ["1", "", "2", "1"]
        return table
    _rewrite_table(tiny_dataset, mutate)
    table = read_participants(tiny_dataset)
    assert table["site"].tolist() == ["007", "012", "007", "3"]
    assert table["group"].tolist()[0] == "1" and table["group"].tolist()[2] == "2"
    assert table["age"].tolist() == [20.0, 30.0, 40.0, 50.0]


def test_spreadsheet_trailing_tabs_are_read_and_extra_values_refused(tmp_path):
    root = write_tiny_dataset(tmp_path / "d", default_rows())
    lines = (root / "participants.tsv").read_text().splitlines()
    expected = read_participants(root)
    # every data row ends in a tab (an export of a sheet with an empty last column)
    rows = [line + "\t" for line in lines[1:]]
    (root / "participants.tsv").write_text("\n".join([lines[0], *rows]) + "\n")
    pd.testing.assert_frame_equal(read_participants(root), expected)
    # the header too: its empty column is not carried into the results
    (root / "participants.tsv").write_text("\n".join(line + "\t" for line in lines) + "\n")
    pd.testing.assert_frame_equal(read_participants(root), expected)
    (root / "participants.tsv").write_text("\n".join([lines[0] + "\tage", *rows]) + "\n")
    with pytest.raises(InputError, match=r"participants\.tsv: the header names column\(s\) "
                                         r"age twice"):
        read_participants(root)
    lines[2] += "\tlefthanded"
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"participants\.tsv line 3: 5 fields for the header's "
                                         r"4 columns.*'lefthanded' belong to no column"):
        read_participants(root)


def test_a_stray_quote_that_swallows_the_rows_below_is_refused(tiny_dataset):
    # a quoted field runs until the next quote: two stray quotes read sub-02a's row into
    # sub-01a's study, and sub-02a was left out with only a warning
    table = tiny_dataset / "participants.tsv"
    text = table.read_text()
    table.write_text(text.replace("\tstudy2\n", '\t"study2\n', 1)
                     .replace("\tstudy1\n", '\tstudy1"\n', 2).replace('study1"', "study1", 1))
    assert table.read_text().count('"') == 2
    with pytest.raises(InputError, match=r"participants\.tsv line 3, column 'study': the value "
                                         r"opens a double quote that is not closed on its "
                                         r"line.*runs over 2 lines.*Remove the stray quote"):
        read_participants(tiny_dataset)
    # one stray quote alone runs to the end of the file
    table.write_text(text.replace("\tstudy2\n", '\t"study2\n', 1))
    with pytest.raises(InputError, match=r"line 3, column 'study'.*runs over 3 lines"):
        read_participants(tiny_dataset)


def test_a_stray_quote_in_a_long_table_is_named_with_its_line(tiny_dataset):
    """A stray quote whose value runs past the csv module's 128 KiB field limit (a few
    thousand rows below it) stopped the table check with a bare csv.Error traceback."""
    table = tiny_dataset / "participants.tsv"
    header, first, second, *rest = table.read_text().splitlines()
    notes = [f"sub-x{row}\t40\tF\tstudy1" for row in range(5000)]  # 100 KiB +
    table.write_text("\n".join([header, first, second.replace("\tstudy", '\t"study', 1),
                                 *rest, *notes, *notes]) + "\n")
    with pytest.raises(InputError, match=r"participants\.tsv line 3: a value opens a double "
                                         r"quote that is not closed.*Remove the stray quote"):
        read_participants(tiny_dataset)


def test_error_lines_count_the_blank_lines_pandas_skips(tiny_dataset):
    # pandas skips blank and spaces-only lines: the line numbers counted its rows instead
    table = tiny_dataset / "participants.tsv"
    header, *rows = table.read_text().splitlines()
    rows[2] = rows[2].replace("sub-02a", "sub-02_a")
    lines = [header, rows[0], "", rows[1], "   ", rows[2], rows[3]]
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"participants\.tsv line 6: subject label '02_a'"):
        read_participants(tiny_dataset)
    # a blank first line too (it was refused: "4 fields for the header's 0 columns")
    table.write_text("\n".join(["", *lines]) + "\n")
    with pytest.raises(InputError, match=r"participants\.tsv line 7: subject label '02_a'"):
        read_participants(tiny_dataset)
    table.write_text("\n".join(["", *lines]).replace("sub-02_a", "sub-02a") + "\n")
    assert list(read_participants(tiny_dataset)["participant_id"]) == [
        "sub-00a", "sub-01a", "sub-02a", "sub-03a"]


def test_missing_root(tmp_path):
    with pytest.raises(InputError, match=r"dataset root .*nowhere.* does not exist.*dataset\.root"):
        read_participants(tmp_path / "nowhere")


@pytest.mark.parametrize("blank", ["n/a", "  ", " n/a", "N/A ", "nan"])
def test_a_cohort_to_predict_may_lack_ages_a_training_cohort_may_not(tmp_path, blank):
    """A cell of spaces, or a missing-value code padded with them, is a missing age too: it
    was refused as an age that is not a number."""
    rows = default_rows(3)
    rows[1]["age"] = blank
    root = write_tiny_dataset(tmp_path / "dataset", rows)
    with pytest.raises(InputError, match=r"subject sub-01a has no age"):
        read_participants(root)
    table = read_participants(root, to_predict=True)
    assert np.isnan(table["age"][1]) and table["age"][[0, 2]].tolist() == [20.0, 40.0]
    rows[1]["age"] = "old"  # not a number: refused either way
    root = write_tiny_dataset(tmp_path / "other", rows)
    with pytest.raises(InputError, match=r"has age 'old'"):
        read_participants(root, to_predict=True)


def test_a_cohort_to_predict_needs_only_its_ids(tmp_path):
    """The model reads no age, sex or study: a cohort to predict may omit the columns or
    leave cells blank, and gets an age column of NaN when it has none; a training cohort
    needs all four, as before."""
    rows = [{"participant_id": row["participant_id"]} for row in default_rows(3)]
    root = write_tiny_dataset(tmp_path / "dataset", rows)
    with pytest.raises(InputError, match=r"lacks column\(s\) age, sex, study"):
        read_participants(root)
    table = read_participants(root, to_predict=True)
    assert list(table.columns) == ["participant_id", "age"] and table["age"].isna().all()
    # beside the ids, where a table with ages has it: predictions.tsv's columns keep their
    # order for scripts that read them by position
    rows = [{"study": row["study"], "participant_id": row["participant_id"], "sex": row["sex"]}
            for row in default_rows(3)]
    root = write_tiny_dataset(tmp_path / "no_ages", rows)
    assert list(read_participants(root, to_predict=True).columns) == [
        "study", "participant_id", "age", "sex"]
    rows = default_rows(3)
    rows[0]["sex"], rows[1]["study"] = "n/a", ""
    root = write_tiny_dataset(tmp_path / "blanks", rows)
    with pytest.raises(InputError, match=r"column 'sex' is empty for sub-00a"):
        read_participants(root)
    table = read_participants(root, to_predict=True)
    assert table["sex"].isna().tolist() == [True, False, False]
    assert cohort_groups(table, "study").tolist() == ["study1", NO_GROUP, "study1"]
    assert cohort_groups(table, None).tolist() == [ALL_SUBJECTS] * 3
    assert check_cohort_table(table[["participant_id", "age"]], root / "participants.tsv",
                              cohort="new") is None
    assert check_cohort_table(table, root / "participants.tsv", cohort="new") == "study"


def test_sex_codes_table_2_cannot_count_are_warned_about(tmp_path, caplog):
    """Sex coded 1/2 passed silently and Table 2 showed every subject as 'other'; F/M in
    any spelling (female, m, ...) count and are not warned about."""
    rows = [dict(row, sex=code) for row, code in zip(default_rows(4), ["1", "2", "female", "m"])]
    root = write_tiny_dataset(tmp_path / "dataset", rows)
    with caplog.at_level("WARNING", logger="brainage.inputs"):
        read_participants(root)
    assert re.search(r"participants\.tsv: column 'sex' has value\(s\) '1', '2', which start "
                     r"with neither F nor M: Table 2 counts them as 'other'", caplog.text)
    assert "'female'" not in caplog.text and "'m'" not in caplog.text


def test_missing_root_says_how_its_path_was_read(tmp_path, monkeypatch):
    """A relative root is read from the working directory, which the message names; a '~'
    is kept as typed (YAML, Snakemake), which the message says, with the full path."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=rf"^dataset root nowhere \(relative to "
                                         rf"{re.escape(str(tmp_path))}, the working "
                                         rf"directory\) does not exist\. Set config key "
                                         rf"dataset\.root"):
        read_participants("nowhere")
    with pytest.raises(InputError, match=rf"^dataset root ~/nowhere-xyz does not exist: '~' is "
                                         rf"not expanded in paths\. Set config key "
                                         rf"dataset\.root to the full path "
                                         rf"\({re.escape(str(Path('~/nowhere-xyz').expanduser()))}"
                                         rf"\)\.$"):
        read_participants("~/nowhere-xyz")


def test_missing_root_names_the_setting_that_gave_it(tmp_path):
    """A predict or pretraining cohort's folder is set by its own key: the message told its
    user to set dataset.root, the training cohort's, or to simulate the demo."""
    with pytest.raises(InputError) as raised:
        read_participants(tmp_path / "nowhere", root_setting="config key predict.cohorts.clinic")
    message = str(raised.value)
    assert re.search(r"dataset root .*nowhere does not exist\. Set config key "
                     r"predict\.cohorts\.clinic to the cohort's BIDS-like dataset folder",
                     message), message
    assert "dataset.root" not in message and "simulate" not in message


def test_missing_participants_file(tiny_dataset):
    (tiny_dataset / "participants.tsv").unlink()
    with pytest.raises(InputError, match=r"participants\.tsv is missing"):
        read_participants(tiny_dataset)


def test_a_root_one_level_off_is_told_where_the_dataset_is(tiny_dataset):
    """dataset.root set to the project folder above the dataset (project/rawdata/), or to
    a subject's folder below it: 'participants.tsv is missing' alone did not say which."""
    project = tiny_dataset.parent
    message = r"participants\.tsv is missing\..* {} has one: set the dataset root to"
    with pytest.raises(InputError, match=message.format(re.escape(str(tiny_dataset)))):
        read_participants(project)
    with pytest.raises(InputError, match=message.format(re.escape(str(tiny_dataset)))):
        read_participants(tiny_dataset / "sub-00a")
    (tiny_dataset / "participants.tsv").unlink()
    with pytest.raises(InputError) as refused:
        read_participants(project)
    assert "has one" not in str(refused.value)


def test_missing_column(tiny_dataset):
    _rewrite_table(tiny_dataset, lambda t: t.drop(columns="study"))
    # BIDS' own participants.tsv has no study: the refusal named the column, not the fix
    with pytest.raises(InputError, match=r"lacks column\(s\) study.* for a dataset of one "
                                         r"study, add a column 'study' with one value \(e\.g\. "
                                         r"mystudy\) in every row\."):
        read_participants(tiny_dataset)


def test_a_required_column_under_another_common_name_is_named(tiny_dataset):
    # a table's 'gender' for the sex, a multi-site sheet's 'site' for the study
    _rewrite_table(tiny_dataset, lambda t: t.rename(columns={"sex": "Gender", "study": "site"}))
    with pytest.raises(InputError) as refused:
        read_participants(tiny_dataset)
    assert "If its 'Gender' is the sex, rename it to 'sex'." in str(refused.value)
    assert "If its 'site' is the study, rename it to 'study'." in str(refused.value)


def test_a_required_column_with_spaces_around_its_name_is_named(tiny_dataset):
    # the message said "lacks column(s) age; it has participant_id, age , sex, study"
    table = tiny_dataset / "participants.tsv"
    table.write_text(table.read_text().replace("\tage\t", "\tage \t", 1))
    with pytest.raises(InputError, match=r"lacks column\(s\) age;.* The header's 'age ' has "
                                         r"spaces around its name: remove them\."):
        read_participants(tiny_dataset)


def test_an_age_column_in_another_case_is_named_not_ignored(tiny_dataset):
    """A cohort to predict may lack ages, so its 'Age' column was ignored: every subject got
    a predicted age and no gap, with one warning that did not name the column. A training
    table's missing 'age' now names the 'Age' it has."""
    table = tiny_dataset / "participants.tsv"
    table.write_text(table.read_text().replace("\tage\t", "\tAge\t", 1))
    with pytest.raises(InputError, match=r"has a column 'Age' but none named 'age', so its "
                                         r"ages would not be read.*Rename it to 'age'"):
        read_participants(tiny_dataset, to_predict=True)
    with pytest.raises(InputError, match=r"lacks column\(s\) age;.* The header's 'Age' is "
                                         r"'age' in another case: rename it"):
        read_participants(tiny_dataset)


@pytest.mark.parametrize("name", ["age_years", "Age (years)", "AgeAtScan", "scan_age",
                                  "participant_age", "Patient_Age", "age_at_first_scan",
                                  "Alter", "Edad", "21003-2.0", "PATIENTAGE", "Lebensalter"])
def test_an_age_column_under_another_name_is_named_not_ignored(tiny_dataset, name, caplog):
    """Clinical exports' spellings of the age: a cohort to predict lost every gap to them,
    with one log line after the preprocessing that named no column. Named, not refused: a
    'mother_age' or an 'age_at_onset' is an age too, but not the one to read."""
    table = tiny_dataset / "participants.tsv"
    text = table.read_text()
    table.write_text(text.replace("\tage\t", f"\t{name}\t", 1))
    with caplog.at_level(logging.WARNING, logger="brainage.inputs"):
        assert read_participants(tiny_dataset, to_predict=True)["age"].isna().all()
    assert re.search(rf"has no column 'age' but '{re.escape(name)}': only 'age' is read, so "
                     rf"the cohort gets predicted ages and no brain-age gaps\. If one is the "
                     rf"age at the scan in years, rename it to 'age'", caplog.text), caplog.text
    with pytest.raises(InputError, match=rf"lacks column\(s\) age;.* If its "
                                         rf"'{re.escape(name)}' is the age at the scan in years, "
                                         rf"rename it to 'age'"):
        read_participants(tiny_dataset)


@pytest.mark.parametrize("name", ["age_group", "agent", "stage", "image_quality"])
def test_columns_without_ages_are_not_named_as_ages(tiny_dataset, name, caplog):
    """An age group of '60-70', or a name without the word 'age': nothing to say."""
    table = tiny_dataset / "participants.tsv"
    table.write_text(table.read_text().replace("\tage\t", f"\t{name}\t", 1))
    if name == "age_group":
        _rewrite_table(tiny_dataset, lambda t: t.assign(age_group="60-70"))
    with caplog.at_level(logging.WARNING, logger="brainage.inputs"):
        assert read_participants(tiny_dataset, to_predict=True)["age"].isna().all()
    assert "has no column 'age' but" not in caplog.text


@pytest.mark.parametrize("to_predict", [False, True])
def test_ages_that_participants_json_gives_in_months_are_refused(tiny_dataset, to_predict,
                                                                caplog):
    """A paediatric cohort's ages in months (27 to 117) pass every check on the values and
    were read as years; BIDS says the unit in participants.json, which nothing read."""
    assert len(read_participants(tiny_dataset, to_predict=to_predict)) == 4  # no sidecar yet
    sidecar = tiny_dataset / "participants.json"  # added beside the same table: read again
    sidecar.write_text(json.dumps({"age": {"Description": "age at scan", "Units": "months"}}))
    with pytest.raises(InputError, match=r"participants\.json gives the unit of column 'age' as "
                                         r"'months'; the pipeline reads ages in years\. "
                                         r"Convert .*months / 12"):
        read_participants(tiny_dataset, to_predict=to_predict)
    for unit in ("weeks", "Monate", "mois", "meses"):  # a lab's own language too
        sidecar.write_text(json.dumps({"age": {"Units": unit}}))
        with pytest.raises(InputError, match=rf"as '{unit}'; the pipeline reads ages in years"):
            read_participants(tiny_dataset, to_predict=to_predict)
    # BIDS's own spelling, others of years, and units that say nothing of months or weeks
    for years in ("year", "Years", " y ", "years (decimal)", "yrs.", "",
                  "decimal years (months / 12)"):
        sidecar.write_text(json.dumps({"Age": {"units": years}}))
        assert len(read_participants(tiny_dataset, to_predict=to_predict)) == 4
    # the pipeline needs no sidecar: a broken one (a trailing comma) is no unit, but was
    # ignored without a word, and the months then went unchecked
    sidecar.write_text('{"age": {"Units": "months",}}')
    with caplog.at_level("WARNING", logger="brainage.inputs"):
        assert len(read_participants(tiny_dataset, to_predict=to_predict)) == 4
    assert re.search(r"participants\.json cannot be read as JSON \(.*\), so the unit it may "
                     r"give the ages is not checked: correct it", caplog.text), caplog.text


def test_a_training_cohort_of_one_age_is_refused(tiny_dataset):
    """Every subject 73: the whole grid trained and Table 3 read MAE 0.000 for every row,
    then the export's advice (predict.bias_fit: test) sent the user back and forth."""
    _rewrite_table(tiny_dataset, lambda t: t.assign(age="73"))
    with pytest.raises(InputError, match=r"participants\.tsv: every subject is 73 years old, "
                                         r"so there is no age to learn"):
        read_participants(tiny_dataset)
    assert read_participants(tiny_dataset, to_predict=True)["age"].eq(73).all()  # predicted


def test_a_space_separated_table_is_named_as_such(tiny_dataset):
    table = tiny_dataset / "participants.tsv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join(" ".join(f'"{value}"' for value in line.split("\t"))
                               for line in lines) + "\n")  # R's write.table defaults
    with pytest.raises(InputError, match=r"Its columns are separated by spaces: save it "
                                         r"tab-separated"):
        read_participants(tiny_dataset)


def test_a_row_typed_with_spaces_is_told_to_use_tabs(tiny_dataset):
    table = tiny_dataset / "participants.tsv"
    lines = table.read_text().splitlines()
    lines[2] = lines[2].replace("\t", " ")
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 3: participant_id 'sub-01a 30\.0 F study2' "
                                         r"holds spaces: a row typed with spaces between its "
                                         r"values, not tabs\? Separate the row's values by tabs"):
        read_participants(tiny_dataset)


def test_map_digests_come_from_the_image_checks_and_only_while_the_file_is_unchanged(
        tmp_path):
    """A predict cohort's copy of a training subject's scan is found by the digests the
    image checks recorded: the same bytes under another id match, a map edited since its
    check has none (its digest would be stale)."""
    training = write_tiny_dataset(tmp_path / "training", default_rows())
    clinic = write_tiny_dataset(tmp_path / "clinic", [
        {**row, "participant_id": f"sub-c{index}"} for index, row in enumerate(default_rows(2))])
    copied = clinic / "sub-c1" / "mre" / "sub-c1_stiffness.nii.gz"
    shutil.copyfile(training / "sub-02a" / "mre" / "sub-02a_stiffness.nii.gz", copied)
    cache = tmp_path / "checked.json"
    check_dataset_images(training, ["00a", "01a", "02a", "03a"], cache_file=cache)
    assert checked_map_digests(clinic, ["c0", "c1"], ["stiffness"], cache) == {}  # unchecked
    check_dataset_images(clinic, ["c0", "c1"], cache_file=cache)
    known = checked_map_digests(training, ["00a", "01a", "02a", "03a"], ["stiffness"], cache)
    found = checked_map_digests(clinic, ["c0", "c1"], ["stiffness", "T1w"], cache)
    assert len(known) == 4 and len(found) == 2
    assert {known[digest] for digest in found if digest in known} == {"sub-02a"}
    assert found[next(digest for digest in found if digest in known)] == "sub-c1"
    os.utime(copied, ns=(0, 0))  # edited since its check: no digest until checked again
    assert list(checked_map_digests(clinic, ["c0", "c1"], ["stiffness"], cache).values()) == [
        "sub-c0"]
    # a subject removed (consent withdrawn): its scan's path and digest leave the cache at
    # the next check; the other cohort's entries stay
    shutil.rmtree(training / "sub-03a")
    entries = json.loads(cache.read_text())
    check_dataset_images(training, ["00a", "01a", "02a"], cache_file=cache)
    left = json.loads(cache.read_text())
    assert set(entries) - set(left) == {
        str((training / "sub-03a" / "mre" / "sub-03a_stiffness.nii.gz").resolve())}


def test_r_row_names_are_named_as_such(tiny_dataset):
    """R's write.table(..., sep = "\\t", quote = FALSE) writes row names without a header
    field: the message blamed the last value of the row, not the number before it."""
    table = tiny_dataset / "participants.tsv"
    header, *rows = table.read_text().splitlines()
    table.write_text("\n".join([header] + [f"{number}\t{row}" for number, row in
                                           enumerate(rows, start=1)]) + "\n")
    with pytest.raises(InputError, match=r"line 2: 5 fields for the header's 4 columns, the "
                                         r"first being the row's number '1': a column of row "
                                         r"names .* row\.names = FALSE"):
        read_participants(tiny_dataset)


def test_a_labs_own_none_and_na_come_back_as_written(tiny_dataset):
    """pandas' missing-value list erased a medication 'None', 'null' or 'NA' (a North American
    site), and a group 'None' was pooled with the subjects without a group; only BIDS's n/a
    and an empty cell are missing in a lab's own columns."""
    _rewrite_table(tiny_dataset, lambda t: t.assign(medication=["None", "null", "NA", "n/a"],
                                                    group=["None", "None", "", "AD"],
                                                    study=["NA", "NA", "", "EU"]))
    table = read_participants(tiny_dataset, to_predict=True)
    assert table["medication"].tolist()[:3] == ["None", "null", "NA"]
    assert pd.isna(table["medication"].iloc[3]) and pd.isna(table["group"].iloc[2])
    assert list(cohort_groups(table, "group")) == ["None", "None", NO_GROUP, "AD"]
    # a cohort to predict needs no study: its 'NA' (a North American site) is a study there
    assert list(cohort_groups(table.drop(columns="group"), "study")) == [
        "NA", "NA", NO_GROUP, "EU"]
    with pytest.raises(InputError, match=r"column 'study' is empty for sub-00a, sub-01a, "
                                         r"sub-02a"):  # training: a missing-value code
        read_participants(tiny_dataset)


def test_a_cohort_to_predict_keeps_its_columns_as_written(tiny_dataset):
    """Only the age of a cohort to predict is a number: its other columns come back in the
    predictions as the lab wrote them (a site code 007 came back as 7, a group 0 as 0.0,
    which --bias-reference-group 0 did not name)."""
    n = len(read_participants(tiny_dataset))
    _rewrite_table(tiny_dataset, lambda t: t.assign(site="007", group=["0"] * (n - 1) + [""]))
    table = read_participants(tiny_dataset, to_predict=True)
    assert set(table["site"]) == {"007"} and list(table["group"][:-1]) == ["0"] * (n - 1)
    assert pd.isna(table["group"].iloc[-1]) and table["age"].dtype == float
    assert check_cohort_table(table, "participants.tsv", cohort="c",
                              bias_reference_group=0) == "group"


@pytest.mark.parametrize("mark, name", [(",", "commas"), (";", "semicolons"),
                                        ("|", "vertical bars")])
def test_a_comma_separated_table_is_named_as_such(tiny_dataset, mark, name):
    # semicolons: the "CSV" of a spreadsheet in a locale with decimal commas (German Excel)
    table = tiny_dataset / "participants.tsv"
    lines = table.read_text().splitlines()
    # an extra column whose name holds a comma: the separator is the most frequent mark
    table.write_text("\n".join([lines[0] + "\tnotes, misc"] + [line + "\t" for line in lines[1:]])
                     .replace("\t", mark) + "\n")
    with pytest.raises(InputError, match=rf"lacks column\(s\) participant_id, .*separated by "
                                         rf"{name}: save it tab-separated"):
        read_participants(tiny_dataset)


def test_a_table_without_rows_says_what_to_add(tiny_dataset):
    table = tiny_dataset / "participants.tsv"
    table.write_text(table.read_text().splitlines()[0] + "\n")
    with pytest.raises(InputError, match=r"lists no participants\. Add a row per subject "
                                         r"\(participant_id, age, sex, study\)"):
        read_participants(tiny_dataset)


def test_a_table_without_rows_is_refused_by_our_message_under_pandas_string_columns(
        tiny_dataset):
    """pandas 3 reads text as its string dtype, where ``or`` between booleans and strings
    is deprecated (pandas 4 raises): an empty table's blank-cell mask must be booleans,
    or the user gets pandas' TypeError instead of what to add."""
    table = tiny_dataset / "participants.tsv"
    table.write_text(table.read_text().splitlines()[0] + "\n")
    with (pd.option_context("future.infer_string", True), warnings.catch_warnings()):
        warnings.simplefilter("error")
        with pytest.raises(InputError, match=r"lists no participants\."):
            read_participants(tiny_dataset)


@pytest.mark.parametrize("column", ["subset", "gap"])
def test_a_column_the_pipeline_writes_is_refused(tiny_dataset, column):
    """A user's `subset` was replaced by the split's train/test labels, a `gap` by the
    predicted brain-age gap, without a word."""
    _rewrite_table(tiny_dataset, lambda t: t.assign(**{column: "x"}))
    with pytest.raises(InputError, match=rf"participants\.tsv has column\(s\) {column}, "
                                         rf"which the pipeline writes .* Rename them "
                                         rf"\(e\.g\. {column}_original\)"):
        read_participants(tiny_dataset)


def test_every_column_the_pipeline_adds_is_refused_in_participants():
    from brainage.apply import PREDICTION_COLUMNS
    from brainage.inputs import DERIVED_COLUMNS, PREDICTION_ONLY_COLUMNS
    from brainage.normalise import ADDED_COLUMNS

    assert (set(ADDED_COLUMNS) | set(PREDICTION_COLUMNS)
            == set(DERIVED_COLUMNS) | set(PREDICTION_ONLY_COLUMNS))


def test_columns_predictions_gained_later_are_refused_in_a_cohort_to_predict_only(tmp_path):
    """registered_by and skull_stripped_by came to predictions.tsv on 2026-12-06: a training
    table with such a column planned before, and nothing derived from it writes them."""
    rows = [dict(row, registered_by="RA") for row in default_rows(3)]
    root = write_tiny_dataset(tmp_path / "dataset", rows)
    assert read_participants(root)["registered_by"].tolist() == ["RA"] * 3
    with pytest.raises(InputError, match=r"has column\(s\) registered_by, which the pipeline "
                                         r"writes"):
        read_participants(root, to_predict=True)


def test_duplicate_participant(tiny_dataset):
    _rewrite_table(tiny_dataset, lambda t: pd.concat([t, t.iloc[[1]]]))
    with pytest.raises(InputError, match=r"duplicate participant_id sub-01a") as refused:
        read_participants(tiny_dataset)
    assert "session" not in str(refused.value)
    # a table of one row per session (longitudinal data) is told the documented route
    _rewrite_table(tiny_dataset, lambda t: t.assign(session_id=["ses-01"] * 4 + ["ses-02"]))
    with pytest.raises(InputError, match=r"duplicate participant_id sub-01a; each subject must "
                                         r"appear once\. Its column session_id suggests one row "
                                         r"per session: keep one session per person here .* "
                                         r"predict the others as cohorts of their own"):
        read_participants(tiny_dataset)


def test_participants_differing_only_in_case_are_refused(tiny_dataset):
    def add_upper_case_twin(table):
        twin = table.iloc[[1]].copy()
        twin["participant_id"] = twin["participant_id"].str.upper().str.replace("SUB-", "sub-")
        return pd.concat([table, twin])

    _rewrite_table(tiny_dataset, add_upper_case_twin)
    with pytest.raises(InputError, match=r"participant_id sub-01a and sub-01A differ only in "
                                         r"case.*Rename one"):
        read_participants(tiny_dataset)


@pytest.mark.parametrize("to_predict", [False, True])
def test_participants_differing_only_in_leading_zeros_are_refused(tiny_dataset, to_predict):
    """sub-1a beside sub-01a: a predict cohort's subjects the model has seen are found by the
    id without case and leading zeros, so the two would be one person there, and a training
    cohort that lists one person twice can put them on both sides of the split."""
    def add_twin(table):
        twin = table.iloc[[1]].copy()
        twin["participant_id"] = "sub-1A"  # of sub-01a
        twin["age"] = 41.0
        return pd.concat([table, twin])

    _rewrite_table(tiny_dataset, add_twin)
    (tiny_dataset / "sub-01a").rename(tiny_dataset / "sub-1A")  # its own files
    for path in (tiny_dataset / "sub-1A").rglob("*.nii.gz"):
        path.rename(path.with_name(path.name.replace("sub-01a", "sub-1A")))
    (tiny_dataset / "sub-01a").mkdir()
    for path in (tiny_dataset / "sub-1A").iterdir():
        shutil.copytree(path, tiny_dataset / "sub-01a" / path.name)
    for path in (tiny_dataset / "sub-01a").rglob("*.nii.gz"):
        path.rename(path.with_name(path.name.replace("sub-1A", "sub-01a")))
    with pytest.raises(InputError, match=r"participant_id sub-01a and sub-1A differ only in "
                                         r"leading zeros \(or case\): one person listed "
                                         r"twice\?.*rename one of each pair"):
        read_participants(tiny_dataset, to_predict=to_predict)


@pytest.mark.parametrize("bad_id", ["sub-../x", "sub-a_b", "01a", "sub-"])
def test_label_that_could_escape_results(tiny_dataset, bad_id):
    def mutate(table):
        table.loc[0, "participant_id"] = bad_id
        return table
    _rewrite_table(tiny_dataset, mutate)
    with pytest.raises(InputError, match="letters and digits"):
        read_participants(tiny_dataset)


@pytest.mark.parametrize("spaced", [" sub-01a", "sub-01a "])
def test_an_id_with_spaces_around_it_says_so(tiny_dataset, spaced):
    def mutate(table):
        table.loc[0, "participant_id"] = spaced
        return table
    _rewrite_table(tiny_dataset, mutate)
    with pytest.raises(InputError, match=r"line 2: participant_id '\s?sub-01a\s?' has spaces "
                                         r"around it; remove them"):
        read_participants(tiny_dataset)


def test_label_with_a_trailing_newline_is_refused():
    # "^...$" alone accepts "01\n" (a quoted participant_id in a hand-edited table)
    with pytest.raises(InputError, match="letters and digits"):
        check_label("01\n", where="participants.tsv")
    assert check_label("01a", where="participants.tsv") == "01a"


@pytest.mark.parametrize("age, message", [("", "has no age \\(an empty cell or n/a\\); "
                                                "every subject needs its age"),
                                          ("n/a", "has no age"),  # was "has age nan"
                                          ("old", "has age 'old'"),
                                          ("-3", "outside"), ("250", "outside"),
                                          # the bounds are not ages either: 0 is a blank cell
                                          # a spreadsheet exported as a number
                                          ("0", "outside"), ("120", "outside"),
                                          ("45,5", "has age '45,5'; ages must be numbers in "
                                                   "years, with a decimal point, not a comma")])
def test_bad_age(tiny_dataset, age, message):
    def mutate(table):
        table.loc[2, "age"] = age
        return table
    _rewrite_table(tiny_dataset, mutate)
    with pytest.raises(InputError, match=rf"sub-02a.*{message}"):
        read_participants(tiny_dataset)


@pytest.mark.parametrize("column, value", [("sex", " "), ("study", "  ")])
def test_blank_sex_or_study_is_empty(tiny_dataset, column, value):
    def mutate(table):
        table.loc[1, column] = value
        return table
    _rewrite_table(tiny_dataset, mutate)
    with pytest.raises(InputError, match=rf"column '{column}' is empty for sub-01a"):
        read_participants(tiny_dataset)


def test_a_table_that_cannot_be_opened_is_named_not_a_traceback(tiny_dataset, monkeypatch):
    # IsADirectoryError (and a colleague's file of mode 600: PermissionError) passed every
    # handler, and `predict run` or the plan stopped with a traceback
    table = tiny_dataset / "participants.tsv"
    text = table.read_text()
    table.unlink()
    table.mkdir()
    with pytest.raises(InputError, match=rf"{re.escape(str(table.resolve()))} cannot be read "
                                         rf"\(Is a directory\); it must be a file that this "
                                         rf"user may read\."):
        read_participants(tiny_dataset)
    table.rmdir()
    table.write_text(text)
    real_open = open

    def refusing_open(file, *args, **kwargs):  # root reads a file of mode 000 all the same
        if Path(file).name == "participants.tsv":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(InputError, match=r"cannot be read \(Permission denied\)"):
        read_participants(tiny_dataset)


def test_a_table_not_in_utf8_names_its_line_and_how_to_save_it(tiny_dataset):
    # a spreadsheet's plain text export in Windows-1252 (a study named Zürich) stopped with
    # "'utf-8' codec can't decode byte 0xfc in position 46", no line and no remedy
    table = tiny_dataset / "participants.tsv"
    table.write_bytes(table.read_text().replace("study2", "Zürich").encode("cp1252"))
    with pytest.raises(InputError, match=rf"{re.escape(str(table.resolve()))} line 3 \(byte "
                                         rf"0xfc\) is not UTF-8 text\. Save the table as UTF-8"
                                         rf".* iconv -f cp1252 -t utf-8"):
        read_participants(tiny_dataset)
    # Excel's "Unicode Text" is UTF-16 with a byte-order mark: converting it from cp1252,
    # as the message said, gave a table without a participant_id column
    text = table.read_bytes().decode("cp1252")
    table.write_bytes(text.encode("utf-16"))
    with pytest.raises(InputError, match=r"is not UTF-8 text\..* from UTF-16 .*: iconv -f "
                                         r"utf-16 -t utf-8 participants\.tsv > converted"):
        read_participants(tiny_dataset)
    table.write_bytes(table.read_bytes().decode("utf-16").encode("utf-8"))  # what iconv does
    assert "Zürich" in set(read_participants(tiny_dataset)["study"])
    # Excel for Mac's "Tab delimited Text": Mac Roman, lines ending in CR alone; the line was
    # counted by LF (line 1), and cp1252 turned every Zürich into ZŸrich without an error
    table.write_bytes(table.read_text().replace("\n", "\r").encode("mac_roman"))
    with pytest.raises(InputError, match=r"line 3 \(byte 0x9f\) is not UTF-8 text\..* from Mac "
                                         r"Roman .*: iconv -f macintosh -t utf-8 "):
        read_participants(tiny_dataset)
    table.write_bytes(table.read_bytes().decode("mac_roman").encode("utf-8"))
    assert "Zürich" in set(read_participants(tiny_dataset)["study"])


def test_a_missing_value_code_is_not_called_empty(tiny_dataset):
    # pandas reads NA, None, null... as missing: the message said the cell was empty
    table = tiny_dataset / "participants.tsv"
    table.write_text(table.read_text().replace("study2", "NA"))
    with pytest.raises(InputError, match=r"column 'study' is empty for sub-01a, sub-03a \(a "
                                         r"blank cell, or a missing-value code: n/a, NA, None, "
                                         r"null, nan, \.\.\.\)\. Fill in the study\."):
        read_participants(tiny_dataset)


def test_a_cohort_group_written_with_and_without_spaces_is_refused(tmp_path):
    """A cohort's group 'healthy ' beside 'healthy' was a group of its own: its subjects
    left out of the summary of 'healthy' and of the age-bias reference group."""
    from brainage.inputs import check_cohort_table

    # (a reference group needs 3 members of different ages: check_bias_reference_group)
    table = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
                          "age": [30.0, 40.0, 50.0, 60.0],
                          "group": ["healthy", "healthy ", "healthy", "patient"]})
    with pytest.raises(InputError, match=r"column 'group' writes one value as 'healthy' "
                                         r"\(sub-01\), 'healthy ' \(sub-02\).* summary by "
                                         r"group and the age-bias reference group"):
        check_cohort_table(table, "clinic/participants.tsv", cohort="clinic")
    table["group"] = ["healthy", "healthy", "healthy", "patient"]
    assert check_cohort_table(table, "clinic/participants.tsv", cohort="clinic",
                              bias_reference_group="healthy") == "group"
    # a header's 'group ' (a spreadsheet's trailing space) was no group column: the
    # cohort was summarised by study without a word
    for spelling in ("group ", "Group"):  # nor was a 'Group'
        misspelt = table.rename(columns={"group": spelling}).assign(study="s1")
        with pytest.raises(InputError, match=rf"clinic/participants\.tsv's header has "
                                             rf"'{spelling}', with spaces around its name or "
                                             rf"in another case: name it 'group'"):
            check_cohort_table(misspelt, "clinic/participants.tsv", cohort="clinic")
    # a 'Study' with no group column made one group of every subject, without a word
    sites = table.drop(columns="group").rename(columns={"study": "Study"}) \
        if "study" in table.columns else table.drop(columns="group").assign(Study="s1")
    with pytest.raises(InputError, match=r"header has 'Study', .* name it 'study' to "
                                         r"summarise by study"):
        check_cohort_table(sites, "clinic/participants.tsv", cohort="clinic")


def test_a_reference_group_of_subjects_the_model_has_seen_is_refused_at_planning():
    """The age-bias refit leaves out the subjects the model has seen: a reference group of
    the training subjects' other sessions (the README's route) passed the plan and failed
    after the whole cohort was embedded, saying none of them had a prediction."""
    from brainage.inputs import check_cohort_table

    table = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
                          "age": [30.0, 40.0, 50.0, 60.0], "group": ["healthy"] * 4})
    assert check_cohort_table(table, "clinic/participants.tsv", cohort="clinic",
                              bias_reference_group="healthy", seen={"sub-01"}) == "group"
    with pytest.raises(InputError, match=r"group 'healthy' .*: it has only 2 subjects new to "
                                         r"the model \(2 are subjects the model has seen, by "
                                         r"participant_id or by a byte-identical map, and are "
                                         r"left out: sub-01, sub-03; add the cohort to "
                                         r"predict\.unrelated_cohorts if ids only coincide with "
                                         r"other people's\); the line needs at least 3"):
        check_cohort_table(table, "clinic/participants.tsv", cohort="clinic",
                           bias_reference_group="healthy", seen={"sub-01", "sub-03"})


def test_a_group_written_in_two_spellings_or_as_punctuation_is_refused():
    """'healthy control' beside 'healthy_control' were two groups: the age-bias refit on
    'healthy control' left the others out; '.' was a group of its own."""
    from brainage.inputs import check_cohort_table

    table = pd.DataFrame({"participant_id": [f"sub-0{index}" for index in range(1, 6)],
                          "age": [30.0, 40.0, 50.0, 60.0, 70.0],
                          "group": ["healthy control", "healthy control", "healthy_control",
                                    "healthy  control", "AD"]})
    with pytest.raises(InputError, match=r"column 'group' writes one value as 'healthy "
                                         r"control' \(sub-01\), 'healthy_control' \(sub-03\), "
                                         r"'healthy  control' \(sub-04\), which differ only"):
        check_cohort_table(table, "clinic/participants.tsv", cohort="clinic",
                           bias_reference_group="healthy control")
    table["group"] = ["healthy control"] * 4 + ["."]
    with pytest.raises(InputError, match=r"column 'group' holds '\.' \(sub-05\), punctuation "
                                         r"and no name.*or leave the cell empty \(n/a\)"):
        check_cohort_table(table, "clinic/participants.tsv", cohort="clinic")
    table["group"] = ["healthy control"] * 4 + [None]  # unknown: the n/a group
    assert check_cohort_table(table, "clinic/participants.tsv", cohort="clinic") == "group"
    table["group"] = ["+", "-", "+", "-", "+"]  # a status written as signs: two groups
    assert check_cohort_table(table, "clinic/participants.tsv", cohort="clinic") == "group"
    table["group"] = ["+/+", "+/-", "-/-", "-/-", "+/+"]  # and a genotype: three
    assert check_cohort_table(table, "clinic/participants.tsv", cohort="clinic") == "group"


def test_one_study_written_in_two_spellings_is_refused(tiny_dataset):
    # a spreadsheet's trailing space made 'study2 ' a study of its own: two strata of the
    # split, two rows of Table 2, two study means
    table = tiny_dataset / "participants.tsv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:4] + [lines[4] + " "]) + "\n")  # sub-03a's study2
    with pytest.raises(InputError, match=r"column 'study' writes one value as 'study2' "
                                         r"\(sub-01a\), 'study2 ' \(sub-03a\), which differ "
                                         r"only in case, spaces"):
        read_participants(tiny_dataset)
    # so did a capital: 'Study2' split, tabulated and averaged apart from 'study2'
    table.write_text("\n".join(lines[:4] + [lines[4].replace("study2", "Study2")]) + "\n")
    with pytest.raises(InputError, match=r"column 'study' writes one value as 'study2' "
                                         r"\(sub-01a\), 'Study2' \(sub-03a\), which differ "
                                         r"only in case"):
        read_participants(tiny_dataset)
    # neither spelling is lower case: the message names the two, not a third
    table.write_text("\n".join(lines[:2] + [lines[2].replace("study2", "Study 2"), lines[3],
                                            lines[4].replace("study2", "Study 2 ")]) + "\n")
    with pytest.raises(InputError) as refused:
        read_participants(tiny_dataset)
    assert "'Study 2' (sub-01a), 'Study 2 ' (sub-03a)" in str(refused.value)
    assert "'study 2'" not in str(refused.value)
    # 'Zürich' composed beside 'Zürich' decomposed (macOS folder names): they print
    # alike, so the message shows their code points; under loso they were two splits
    composed, decomposed = "Z\u00fcrich", "Zu\u0308rich"
    table.write_text("\n".join(lines[:2] + [lines[2].replace("study2", composed), lines[3],
                                            lines[4].replace("study2", decomposed)]) + "\n",
                     encoding="utf-8")
    with pytest.raises(InputError) as refused:
        read_participants(tiny_dataset)
    assert ("'Zürich' (sub-01a), 'Zu\\u0308rich' (sub-03a), which differ only in case, "
            "spaces, punctuation, leading zeros, accents or Unicode form") in str(refused.value)
    # a merged sheet's 'Zürich' beside another system's ASCII 'Zurich', 'São Paulo' beside
    # 'Sao Paulo': two studies, two strata and two rows of Table 2
    for first, second in (("Zürich", "Zurich"), ("São Paulo", "Sao Paulo"), ("Montréal", "MONTREAL"),
                          ("Łódź", "Lodz"), ("Białystok", "Bialystok"), ("Tromsø", "Tromso"),
                          ("Kırıkkale", "Kirikkale"), ("Đà Nẵng", "Da Nang")):
        table.write_text("\n".join(lines[:2] + [lines[2].replace("study2", first), lines[3],
                                                lines[4].replace("study2", second)]) + "\n",
                         encoding="utf-8")
        with pytest.raises(InputError, match=rf"'{first}' \(sub-01a\), '{second}' \(sub-03a\), "
                                             r"which differ only in case, spaces, punctuation, "
                                             r"leading zeros, accents"):
            read_participants(tiny_dataset)
    # a direction mark pasted into one row: the same name, two values, unless refused
    table.write_text("\n".join(lines[:4] + [lines[4].replace("study2", "study2\u200e")])
                     + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"'study2' \(sub-01a\), 'study2\\u200e' \(sub-03a\), "
                                         r"which differ only"):
        read_participants(tiny_dataset)
    # a zero-width space pasted from a web page: one value, shown nowhere
    table.write_text("\n".join(lines[:4] + [lines[4].replace("study2", "study2\u200b")])
                     + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"column 'study' of sub-03a holds U\+200B \(invisible "
                                         r"or control characters\) in 'study2\\u200b': delete"):
        read_participants(tiny_dataset)
    # the joiners and direction marks of Persian, Hindi and Hebrew names are spelling
    for name in ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\u0915\u094d\u200d\u0937",
                 "\u200f\u05d0\u05d1"):
        table.write_text("\n".join(line.replace("study2", name) for line in lines) + "\n",
                         encoding="utf-8")
        assert name in set(read_participants(tiny_dataset)["study"])
    # a merged multi-site sheet: inner spaces, punctuation, a dropped space; numbers by
    # their value; each split a stratum of the holdout split and a row of Table 2
    for first, second in (("Site A", "Site  A"), ("Site A", "Site_A"), ("Site-A", "SiteA"),
                          ("1", "01"), ("1", "1.0"), ("Site 01", "Site1"), ("ST01", "ST1")):
        table.write_text("\n".join(lines[:2] + [lines[2].replace("study2", first), lines[3],
                                                lines[4].replace("study2", second)]) + "\n")
        with pytest.raises(InputError) as refused:
            read_participants(tiny_dataset)
        assert f"{first!r} (sub-01a), {second!r} (sub-03a), which differ only" in str(
            refused.value)
    for first, second in (("10", "1.0"), ("2", "12"), ("Site A", "Site B"),  # other values
                          ("Study 1.1", "Study 11"), ("Wave 1-2", "Wave 12"), ("1.10", "1.1"),
                          (".5", "5"), ("CN", "CN-"), ("A+", "A-"),
                          ("\u0939\u0938", "\u0939\u0902\u0938")):  # Hindi's anusvara: a word
        table.write_text("\n".join(lines[:2] + [lines[2].replace("study2", first), lines[3],
                                                lines[4].replace("study2", second)]) + "\n")
        assert read_participants(tiny_dataset)["study"].nunique() == 3
    # SPSS, SAS and Stata write '.' for a missing value: a study of its own, without a word
    for code in (".", "-", "?"):
        table.write_text("\n".join(lines[:4] + [lines[4].replace("study2", code)]) + "\n")
        with pytest.raises(InputError, match=rf"column 'study' holds '\{code}' \(sub-03a\), "
                                             rf"punctuation and no name: a missing-value code"):
            read_participants(tiny_dataset)
    # spaces after every row's study are one study, as before
    table.write_text("\n".join(line + (" " if number else "")
                               for number, line in enumerate(lines)) + "\n")
    assert read_participants(tiny_dataset)["study"].nunique() == 2


def test_subject_without_stiffness_file(tiny_dataset):
    (tiny_dataset / "sub-03a" / "mre" / "sub-03a_stiffness.nii.gz").unlink()
    with pytest.raises(InputError, match=r"subject sub-03a: stiffness map .* is missing"):
        read_participants(tiny_dataset)


def test_every_missing_image_is_named_at_once(tiny_dataset, monkeypatch):
    """A lab with many missing files fixes them in one go: the message names each one (a
    subject without a folder says so), up to MAX_MISSING_NAMED, and counts the rest."""
    (tiny_dataset / "sub-01a" / "mre" / "sub-01a_stiffness.nii.gz").unlink()
    shutil.rmtree(tiny_dataset / "sub-03a")
    with pytest.raises(InputError) as error:
        read_participants(tiny_dataset)
    lines = str(error.value).splitlines()
    assert lines[0] == "2 input images are missing or unread:"
    # not "or remove stiffness from the modalities": the map the preprocessing is built
    # around; without it a model of the other maps alone would train
    assert re.fullmatch(r"  subject sub-01a: stiffness map .*sub-01a_stiffness\.nii\.gz is "
                        r"missing \(config key dataset\.modalities lists stiffness\)\. Add the "
                        r"file, or remove the subject's row from .*participants\.tsv\.",
                        lines[1])
    assert re.fullmatch(r"  subject sub-03a: stiffness map .* is missing \(the subject has no "
                        r"folder .*sub-03a\) \(config key .*", lines[2])
    (tiny_dataset / "sub-00a").rename(tiny_dataset / "sub-00A")
    with pytest.raises(InputError, match=r"subject sub-00a: .* is missing \(the subject has no "
                                         r"folder .*\)\. There is sub-00A/, which differs in "
                                         r"case"):
        read_participants(tiny_dataset)
    (tiny_dataset / "sub-00A").rename(tiny_dataset / "sub-00a")
    # a lab's own name for the map, which no other hint found
    (tiny_dataset / "sub-00a" / "mre" / "sub-00a_stiffness.nii.gz").rename(
        tiny_dataset / "sub-00a" / "mre" / "sub-00a_mu.nii.gz")
    with pytest.raises(InputError, match=r"subject sub-00a: .* is missing .*mre holds "
                                         r"sub-00a_mu\.nii\.gz: if one is this image, name it "
                                         r"sub-00a_stiffness\.nii\.gz\."):
        read_participants(tiny_dataset)
    (tiny_dataset / "sub-00a" / "mre" / "sub-00a_mu.nii.gz").rename(
        tiny_dataset / "sub-00a" / "mre" / "sub-00a_stiffness.nii.gz")
    # not an image of another kind (a FLAIR beside a missing T1w), nor macOS' ._ files
    anat = tiny_dataset / "sub-00a" / "anat"
    anat.mkdir(exist_ok=True)
    for name in ("sub-00a_FLAIR.nii.gz", "._sub-00a_T1w.nii.gz"):
        (anat / name).write_bytes(b"")
    (anat / "sub-00a_T1w.nii.gz").unlink(missing_ok=True)
    with pytest.raises(InputError) as refused:
        read_participants(tiny_dataset, ("stiffness", "T1w"))
    assert "FLAIR" not in str(refused.value) and "._sub" not in str(refused.value)
    monkeypatch.setattr(inputs, "MAX_MISSING_NAMED", 1)
    with pytest.raises(InputError, match=r"(?s)^2 input images are missing or unread:\n  subject "
                                         r"sub-01a: [^\n]*\n  \.\.\. and 1 more\.$"):
        read_participants(tiny_dataset)


def test_an_uncompressed_optional_t1w_is_refused_not_skipped(tiny_dataset):
    """Only ``_T1w.nii.gz`` is read: a ``_T1w.nii`` beside a subject's maps (dcm2niix's
    default) was left out without a word, and the subject was skull-stripped and
    registered from its stiffness map. In the plan's check and in a subject's inputs."""
    t1w = tiny_dataset / "sub-01a" / "anat" / "sub-01a_T1w.nii"
    t1w.parent.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), t1w)
    message = (r"subject sub-01a: T1w .*sub-01a_T1w\.nii is not compressed, so it would not "
               r"be read, and the subject's brain mask and registration would come from its "
               r"MRE map .* Compress it \(gzip .*sub-01a_T1w\.nii\)")
    with pytest.raises(InputError, match=message):
        read_participants(tiny_dataset)
    with pytest.raises(InputError, match=message):
        subject_inputs(tiny_dataset, "01a")
    Path(f"{t1w}.gz").write_bytes(gzip.compress(t1w.read_bytes()))
    t1w.unlink()
    assert subject_inputs(tiny_dataset, "01a")["anat"] == f"{t1w}.gz"


def test_an_optional_t1w_under_another_name_or_not_fetched_is_refused(tiny_dataset):
    """Only anat/sub-<label>_T1w.nii.gz is read: a T1w named with BIDS entities
    (sub-01a_acq-mprage_T1w.nii.gz) or a DataLad/git-annex link whose content was never
    fetched was skipped without a word, and the subject masked and registered by its map.
    A required map behind a broken link is named as such, not as missing."""
    anat = tiny_dataset / "sub-01a" / "anat"
    anat.mkdir(exist_ok=True)
    other = anat / "sub-01a_acq-mprage_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), other)
    message = (r"subject sub-01a: .*anat holds sub-01a_acq-mprage_T1w\.nii\.gz but no "
               r"sub-01a_T1w\.nii\.gz, the one T1w name read, and the subject's brain mask")
    with pytest.raises(InputError, match=message):
        read_participants(tiny_dataset)
    with pytest.raises(InputError, match=message):
        subject_inputs(tiny_dataset, "01a")
    other.rename(anat / "sub-01a_T1w.nii.gz")
    assert subject_inputs(tiny_dataset, "01a")["anat"] == str(anat / "sub-01a_T1w.nii.gz")
    (anat / "sub-01a_T1w.nii.gz").unlink()
    (anat / "sub-01a_T1w.nii.gz").symlink_to("../../.git/annex/objects/XX/sub-01a_T1w.nii.gz")
    with pytest.raises(InputError, match=r"T1w .*sub-01a_T1w\.nii\.gz is a broken link "
                                         r"\(a DataLad or git-annex file not fetched\?\)"):
        subject_inputs(tiny_dataset, "01a")
    (anat / "sub-01a_T1w.nii.gz").unlink()
    stiffness = _stiffness(tiny_dataset, "01a")
    stiffness.unlink()
    stiffness.symlink_to("../../.git/annex/objects/YY/sub-01a_stiffness.nii.gz")
    with pytest.raises(InputError, match=r"stiffness map .*sub-01a_stiffness\.nii\.gz is a "
                                         r"broken link"):
        subject_inputs(tiny_dataset, "01a")
    with pytest.raises(InputError, match=r"stiffness map .*sub-01a_stiffness\.nii\.gz is a "
                                         r"broken link .* Fetch it \(datalad get / git annex "
                                         r"get\)"):  # not "Add the file"
        read_participants(tiny_dataset)


def test_a_plain_broken_link_says_where_it_points(tiny_dataset, tmp_path):
    """Every broken link was called "a DataLad or git-annex file not fetched?" with the
    advice to fetch it: a lab's link to a scan export that moved says where it points, and
    what to do (found by a review); a link into a git-annex store keeps the fetch advice."""
    stiffness = _stiffness(tiny_dataset, "01a")
    stiffness.unlink()
    moved = tmp_path / "scanner export" / "gone.nii.gz"
    stiffness.symlink_to(moved)
    message = (rf"stiffness map .*sub-01a_stiffness\.nii\.gz is a broken link to "
               rf"{re.escape(str(moved))} .*Repair the link or add the file")
    with pytest.raises(InputError, match=message) as refused:
        read_participants(tiny_dataset)
    assert "DataLad" not in str(refused.value) and "datalad get" not in str(refused.value)
    with pytest.raises(InputError, match=rf"broken link to {re.escape(str(moved))}"):
        subject_inputs(tiny_dataset, "01a")
    table = tiny_dataset / "participants.tsv"
    table.rename(tmp_path / "elsewhere.tsv")
    table.symlink_to(tmp_path / "moved.tsv")
    with pytest.raises(InputError, match=r"participants\.tsv is a broken link to .*moved\.tsv\. "
                                         r"Repair the link or put the table there"):
        read_participants(tiny_dataset)


def test_a_missing_dataset_root_is_named_for_a_single_subject(tmp_path):
    """A single subject's target under a wrong dataset.root said "the subject has no folder
    ... remove the subject", while the whole run's target named the root (found by a
    review): the root is named, with the key that sets it."""
    missing = tmp_path / "data lnk"
    with pytest.raises(InputError, match=rf"dataset root {re.escape(str(missing))} does not "
                                         rf"exist\. Set config key predict\.cohorts\.clinic to"):
        subject_inputs(missing, "01a", root_setting="config key predict.cohorts.clinic")
    with pytest.raises(InputError, match=r"dataset root ~/data does not exist: '~' is not "
                                         r"expanded in paths\. Set config key dataset\.root"):
        subject_inputs("~/data", "01a")


def test_a_participants_table_not_fetched_is_named_and_kept(tiny_dataset):
    """DataLad annexes participants.tsv too: a link whose content was never fetched was
    reported as "missing", and with the simulation left on (a demo config with only
    dataset.root changed) the plan let the simulation claim the folder, and Snakemake
    deleted the link before the simulation refused the folder."""
    from brainage.inputs import simulation_mismatches

    table = tiny_dataset / "participants.tsv"
    table.unlink()
    table.symlink_to(".git/annex/objects/dea/dbe/MD5E-s1--x.tsv/MD5E-s1--x.tsv")
    with pytest.raises(InputError, match=rf"{re.escape(str(table))} is a broken link \(a "
                                         rf"DataLad or git-annex file not fetched\?\)\. Fetch "
                                         rf"it \(datalad get participants\.tsv"):
        read_participants(tiny_dataset)
    problems, _ = simulation_mismatches([("dataset.root", tiny_dataset, True)])
    assert "holds a dataset that the simulation did not write" in problems[0]
    assert table.is_symlink()


def test_a_header_claiming_a_huge_volume_is_refused_before_it_is_read(tmp_path):
    """nibabel allocates what a header claims before it finds the file short: 79 bytes
    claiming 1000x1000x500 float32 took 2.3 GB of memory (four such files are read at
    once at planning, on a login node) before the 'not readable' error."""
    from brainage.inputs import load_nifti_checked

    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 500))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path = tmp_path / "sub-01_stiffness.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64))
    with pytest.raises(InputError, match=r"its header claims a 1000x1000x500 volume of float32 "
                                         r"\(1\.9 GiB\), more than the 1 GiB"):
        load_nifti_checked(path, what="stiffness map")


def test_a_label_too_long_for_the_file_names_is_refused(tiny_dataset):
    """A 300-letter label passed the check and stopped at the first file name made from it
    (OSError: File name too long); 64 letters leave room for every output's name."""
    assert check_label("a" * 64, where="test") == "a" * 64
    with pytest.raises(InputError, match=r"at most 64"):
        check_label("a" * 65, where="test")
    table = tiny_dataset / "participants.tsv"
    table.write_text(table.read_text().replace("sub-01a", "sub-" + "a" * 300))
    with pytest.raises(InputError, match=r"participants\.tsv line \d: subject label 'a+' is "
                                         r"not a BIDS label \(letters and digits only, at "
                                         r"most 64"):
        read_participants(tiny_dataset)


def _stiffness(root, label):
    return root / f"sub-{label}" / "mre" / f"sub-{label}_stiffness.nii.gz"


def test_file_that_is_not_nifti(tiny_dataset):
    _stiffness(tiny_dataset, "01a").write_bytes(gzip.compress(b"this is a text file" * 50))
    with pytest.raises(InputError, match=r"subject sub-01a: stiffness map .*sub-01a_stiffness"
                                         r".* not a readable NIfTI"):
        check_dataset_images(tiny_dataset, ["00a", "01a"])


def test_a_missing_file_or_a_folder_is_named_as_such_not_as_unreadable(tmp_path):
    """nibabel's message for a missing file repeated the path, and the advice to re-export
    a file that is not there did not help (a preprocessed map deleted between runs)."""
    missing = tmp_path / "sub-01_stiffness.nii.gz"
    with pytest.raises(InputError, match=rf"^stiffness map {re.escape(str(missing))} does not "
                                         rf"exist; a NIfTI file \(\.nii\.gz\) is expected there\.$"):
        load_nifti_checked(missing, what="stiffness map")
    missing.mkdir()
    with pytest.raises(InputError, match=r"sub-01_stiffness\.nii\.gz is a folder; a NIfTI"):
        load_nifti_checked(missing, what="stiffness map")


def test_a_map_in_another_unit_is_refused_before_any_work(tmp_path):
    """A stiffness map in Pa or a damping ratio in percent was found only at its subject's
    preprocessing, one subject per run; the image check before any work now names every
    one. A median a few times the plausible bound passes there (an unmasked map's
    background moves it): preprocessing's brain-masked check keeps the exact bounds."""
    root = write_tiny_dataset(tmp_path / "dataset", default_rows(3),
                              maps=("stiffness", "damping_ratio"))
    modalities = ("stiffness", "damping_ratio")

    def scale(label, name, factor):
        path = root / f"sub-{label}" / "mre" / f"sub-{label}_{name}.nii.gz"
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * np.float32(factor), image.affine),
                 path)

    scale("00a", "stiffness", 1000.0)
    scale("01a", "damping_ratio", 100.0)
    scale("02a", "stiffness", 5.0)  # a few kPa x 5: high, but not another unit
    with pytest.raises(InputError) as error:
        check_dataset_images(root, ["00a", "01a", "02a"], modalities)
    lines = str(error.value).splitlines()
    assert lines[0] == "2 input images cannot be used:"
    assert re.fullmatch(r"subject sub-00a: stiffness map .*sub-00a_stiffness\.nii\.gz: the "
                        r"median of its non-zero voxels is \d+, far above the plausible "
                        r"0\.05-50 kPa of a stiffness map\. Is it in Pa \(divide by 1000\) .*"
                        r"Convert it to kPa, or remove the subject's row from "
                        r"participants\.tsv\.", lines[1])
    assert re.fullmatch(r"subject sub-01a: damping-ratio map .*: the median of its non-zero "
                        r"voxels is [\d.]+, far above the plausible 0-1 of a damping-ratio "
                        r"map\. Is it in percent \(divide by 100\)\? Convert it to a ratio, "
                        r"or remove the subject's row from participants\.tsv\.", lines[2])
    assert len(lines) == 3


def test_a_map_in_another_unit_than_kpa_is_not_told_to_divide_pascals():
    """A modality added in its own unit (docs/architecture.md §9) was told its values were
    in Pa: the hint follows the map's unit."""
    from brainage.inputs import _check_unit
    from brainage.modalities import Modality

    speed = Modality("shear_speed", "mre", "m/s", "shear-wave-speed map", n4=False,
                     white_matter_higher=True, valid_range=(0.1, 20.0))
    with pytest.raises(InputError) as error:
        _check_unit(np.full(100, 2500.0), speed, Path("sub-01_shear_speed.nii.gz"), "map")
    assert "Is it in another unit than m/s or an unscaled integer export? Convert it to m/s" \
        in str(error.value) and "Pa" not in str(error.value)


def test_corrupt_file(tiny_dataset):
    path = _stiffness(tiny_dataset, "02a")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(InputError, match=r"sub-02a.* not a readable NIfTI"):
        check_dataset_images(tiny_dataset, ["02a"])


def test_4d_file(tiny_dataset):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)),
             _stiffness(tiny_dataset, "00a"))
    with pytest.raises(InputError, match=r"sub-00a.*shape \(4, 4, 4, 3\); a 3D volume.*"
                                          r"holds 3 volumes: split the series"):
        check_dataset_images(tiny_dataset, ["00a"])


@pytest.mark.parametrize(("shape", "advice"), [
    ((4, 4, 4, 1, 1), "one volume with extra axes of length 1; save it as a 3D image"),
    ((4, 4, 4, 1, 2), "holds 2 volumes: split the series"),
    ((4, 4), "not a slice"),
    ((4, 4, 1), "not a slice"),  # [X, Y, 1] passed, to be preprocessed and fail QC
    ((4, 2, 4), "not a slice"),
])
def test_an_image_that_is_not_3d_gets_advice_for_its_shape(tiny_dataset, shape, advice):
    """A 5D file of one volume was told to split a 4D series."""
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)),
             _stiffness(tiny_dataset, "00a"))
    with pytest.raises(InputError) as error:
        check_dataset_images(tiny_dataset, ["00a"])
    assert f"shape {shape}" in str(error.value) and advice in str(error.value)


def test_4d_file_of_one_volume_is_read_as_3d(tiny_dataset):
    # some converters write a single map as X x Y x Z x 1
    volume = np.random.default_rng(0).uniform(1, 4, (4, 4, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume[..., None], np.eye(4)), _stiffness(tiny_dataset, "00a"))
    check_dataset_images(tiny_dataset, ["00a"])
    data, _ = load_volume(_stiffness(tiny_dataset, "00a"), what="subject sub-00a")
    assert np.array_equal(data, volume)


def test_all_zero_file(tiny_dataset):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
             _stiffness(tiny_dataset, "00a"))
    with pytest.raises(InputError, match=r"sub-00a.*no non-zero finite voxel"):
        load_nifti_checked(_stiffness(tiny_dataset, "00a"), what="subject sub-00a")


def test_singular_affine_and_non_real_voxels_are_named(tiny_dataset):
    volume = np.random.default_rng(0).uniform(1, 4, (4, 4, 4)).astype(np.float32)
    # an sform with a zero row (nibabel refuses to write such an affine itself)
    header = nib.Nifti1Header()
    header.set_data_shape(volume.shape)
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = [2, 0, 0, 0], [0, 2, 0, 0], [0] * 4
    nib.save(nib.Nifti1Image(volume, None, header), _stiffness(tiny_dataset, "00a"))
    nib.save(nib.Nifti1Image(volume.astype(np.complex64), np.eye(4)),
             _stiffness(tiny_dataset, "01a"))
    with pytest.raises(InputError, match=r"(?s)2 input images.*sub-00a: stiffness map .*singular "
                                         r"or non-finite affine.*sub-01a: stiffness map .*holds "
                                         r"complex64 voxels"):
        check_dataset_images(tiny_dataset, ["00a", "01a"])


def test_a_header_without_orientation_is_refused(tiny_dataset):
    """qform_code and sform_code 0 (MATLAB's make_nii): nibabel guesses LAS, so a map
    stored left to right came out mirrored, and registration and QC passed."""
    volume = np.random.default_rng(0).uniform(1, 4, (4, 4, 4)).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_shape(volume.shape)
    header.set_zooms((2.0, 2.0, 2.0))
    nib.save(nib.Nifti1Image(volume, None, header), _stiffness(tiny_dataset, "00a"))
    saved = nib.load(_stiffness(tiny_dataset, "00a")).header
    assert saved["qform_code"] == saved["sform_code"] == 0
    with pytest.raises(InputError, match=r"subject sub-00a: stiffness map .*sub-00a_stiffness"
                                         r"\.nii\.gz declares no orientation \(qform_code and "
                                         r"sform_code are both 0.*set_sform"):
        check_dataset_images(tiny_dataset, ["00a"])
    for code in ("qform_code", "sform_code"):  # either one declares it
        image = nib.Nifti1Image(volume, np.diag([2.0, 2, 2, 1]))
        image.header["qform_code"], image.header["sform_code"] = 0, 0
        image.header[code] = 1
        nib.save(image, _stiffness(tiny_dataset, "00a"))
        check_dataset_images(tiny_dataset, ["00a"])


def test_a_stiffness_map_of_the_opposite_sign_is_refused_before_any_job(tiny_dataset):
    """It passed the plan and failed at the subject's bias correction, which blamed the
    T1w and the map for lying in different spaces."""
    volume = np.random.default_rng(0).uniform(1, 4, (4, 4, 4)).astype(np.float32)
    volume = -volume
    volume[0, 0, :2] = 0.5  # a few positive voxels (3 %) do not make it a positive map
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2, 2, 1])), _stiffness(tiny_dataset, "00a"))
    with pytest.raises(InputError, match=r"subject sub-00a: stiffness map .*: its negative voxels "
                                         r"outweigh its positive ones \(the median of its non-zero "
                                         r"voxels is -\d.*is positive.*opposite sign convention"):
        check_dataset_images(tiny_dataset, ["00a"])
    # a loss modulus has negative noise voxels (here 14 %): flipped, 14 % are positive
    loss = np.random.default_rng(2).normal(0.6, 0.55, (8, 8, 8)).astype(np.float32)
    path = tiny_dataset / "sub-00a" / "mre" / "sub-00a_loss_modulus.nii.gz"
    nib.save(nib.Nifti1Image(loss, np.diag([2.0, 2, 2, 1])), path)
    load_nifti_checked(path, kind="loss_modulus")
    nib.save(nib.Nifti1Image(-loss, np.diag([2.0, 2, 2, 1])), path)
    with pytest.raises(InputError, match=r"outweigh its positive ones"):
        load_nifti_checked(path, kind="loss_modulus")
    # a few "no data" codes among a loss modulus's voxels are no flipped map
    loss[0, 0, :4] = -999.0
    nib.save(nib.Nifti1Image(loss, np.diag([2.0, 2, 2, 1])), path)
    load_nifti_checked(path, kind="loss_modulus")
    # noise around zero outside a positive brain cancels, even where it outnumbers the brain
    noisy = np.random.default_rng(3).normal(0, 0.05, (8, 8, 8)).astype(np.float32)
    noisy[3:5, 3:5, 3:5] = 2.5
    nib.save(nib.Nifti1Image(noisy, np.diag([2.0, 2, 2, 1])), _stiffness(tiny_dataset, "00a"))
    check_dataset_images(tiny_dataset, ["00a"])
    # a constant negative background ("no data", -1) around a positive brain is no flipped
    # map, even where it outnumbers the brain: preprocessing reads it as background
    filled = np.full((8, 8, 8), -1.0, np.float32)
    filled[2:5, 2:5, 2:5] = np.random.default_rng(1).uniform(1, 4, (3, 3, 3))
    nib.save(nib.Nifti1Image(filled, np.diag([2.0, 2, 2, 1])), _stiffness(tiny_dataset, "00a"))
    check_dataset_images(tiny_dataset, ["00a"])


def test_a_non_finite_origin_is_refused_like_a_non_finite_matrix(tiny_dataset):
    # only the 3x3 part was checked: a NaN offset passed, and ITK read a NaN origin
    volume = np.random.default_rng(0).uniform(1, 4, (4, 4, 4)).astype(np.float32)
    affine = np.diag([2.0, 2, 2, 1])
    affine[1, 3] = np.nan
    nib.save(nib.Nifti1Image(volume, affine), _stiffness(tiny_dataset, "00a"))
    with pytest.raises(InputError, match=r"subject sub-00a: stiffness map .*sub-00a_stiffness"
                                         r"\.nii\.gz has a singular or non-finite affine "
                                         r"\(voxel-to-world matrix .*nan"):
        check_dataset_images(tiny_dataset, ["00a"])


def test_a_sheared_affine_is_refused_and_an_oblique_one_accepted(tiny_dataset):
    """ITK keeps only perpendicular axes of a sheared grid, nibabel uses it as it is: the
    steps put the same voxels a few mm apart. An oblique (rotated) grid is fine."""
    volume = np.random.default_rng(0).uniform(1, 4, (4, 4, 4)).astype(np.float32)
    sheared = np.diag([2.0, 2, 2, 1])
    sheared[0, 1] = 0.6  # the second axis leans 16.7 degrees towards the first
    nib.save(nib.Nifti1Image(volume, sheared), _stiffness(tiny_dataset, "00a"))
    with pytest.raises(InputError, match=r"subject sub-00a: .*sub-00a_stiffness\.nii\.gz has a "
                                         r"sheared affine: .*16\.70 degrees off perpendicular"):
        check_dataset_images(tiny_dataset, ["00a"])
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rotation @ np.diag([2.5, 2.5, 4.0])
    nib.save(nib.Nifti1Image(volume, oblique), _stiffness(tiny_dataset, "00a"))
    check_dataset_images(tiny_dataset, ["00a"])


def test_voxel_sizes_not_in_mm_are_refused_with_the_fix(tiny_dataset):
    """A header in metres was read by nibabel as 0.002 mm voxels (and by ANTs, which scales
    declared metres, as 2 mm): the steps disagreed about the image's size."""
    volume = np.random.default_rng(0).uniform(1, 4, (4, 4, 4)).astype(np.float32)
    declared = nib.Nifti1Image(volume, np.diag([0.002, 0.002, 0.002, 1]))
    declared.header.set_xyzt_units("meter")
    nib.save(declared, _stiffness(tiny_dataset, "00a"))
    silent = nib.Nifti1Image(volume, np.diag([0.002, 0.002, 0.002, 1]))
    silent.header.set_xyzt_units("unknown")
    nib.save(silent, _stiffness(tiny_dataset, "01a"))
    with pytest.raises(InputError, match=r"(?s)2 input images.*sub-00a: stiffness map .*"
                                         r"declares its voxel sizes \(0\.002, 0\.002, 0\.002\) "
                                         r"in meters.*multiply the affine .* by 1000.*"
                                         r"sub-01a: stiffness map .*voxel sizes of 0\.002.*"
                                         r"declares the unit 'unknown'.*probably in metres"):
        check_dataset_images(tiny_dataset, ["00a", "01a"])
    microns = nib.Nifti1Image(volume, np.diag([2000.0, 2000, 2000, 1]))
    microns.header.set_xyzt_units("micron")
    nib.save(microns, _stiffness(tiny_dataset, "00a"))
    with pytest.raises(InputError, match=r"in microns.*by 0\.001"):
        load_volume(_stiffness(tiny_dataset, "00a"), what="subject sub-00a: stiffness map")
    for unit in ("mm", "unknown"):  # 2 mm voxels, declared or not, pass
        image = nib.Nifti1Image(volume, np.diag([2.0, 2, 2, 1]))
        image.header.set_xyzt_units(unit)
        nib.save(image, _stiffness(tiny_dataset, "00a"))
        assert load_volume(_stiffness(tiny_dataset, "00a"), what="map")[1][0, 0] == 2.0


def test_image_check_is_cached_by_size_and_mtime(tiny_dataset, tmp_path):
    cache = tmp_path / "cache.json"
    check_dataset_images(tiny_dataset, ["00a", "01a"], cache_file=cache)
    assert cache.is_file() and len(__import__("json").loads(cache.read_text())) == 2
    # A file changed after the check is opened again and caught.
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
             _stiffness(tiny_dataset, "01a"))
    with pytest.raises(InputError, match="sub-01a"):
        check_dataset_images(tiny_dataset, ["00a", "01a"], cache_file=cache)


def test_inputs_dated_in_the_future_are_refused_before_any_is_read(tiny_dataset, tmp_path):
    """A copy that kept a fast clock's times (rsync -a from a scanner console a day
    ahead): Snakemake failed every job reading such a file after its work, run after run,
    and --touch removed their outputs. Refused by the outputs' file system's clock, with
    the files and the commands that fix them, a link's own time too (Snakemake takes the
    later of a link's and its file's); a few seconds' skew passes."""
    from brainage.io import file_system_clock_ns

    cache = tmp_path / "cache.json"
    now = file_system_clock_ns(tmp_path / "results" / "not_made_yet")
    assert abs(now - time.time_ns()) < 60 * 10**9  # a local disk: this host's clock
    assert not (tmp_path / "results").exists()  # probed in the nearest existing folder
    check_dataset_images(tiny_dataset, ["00a", "01a", "02a"], cache_file=cache, clock_ns=now)
    day_ahead = now / 1e9 + 86400
    os.utime(_stiffness(tiny_dataset, "01a"), (day_ahead, day_ahead))
    os.utime(tiny_dataset / "participants.tsv", (day_ahead, day_ahead))
    os.utime(_stiffness(tiny_dataset, "00a"), (now / 1e9 + 3, now / 1e9 + 3))
    # a dataset of links (DataLad, or a folder of links copied with rsync -a): the link
    # dated ahead, its file not
    linked = _stiffness(tiny_dataset, "02a")
    target = tmp_path / "store" / linked.name
    target.parent.mkdir()
    linked.rename(target)
    linked.symlink_to(target)
    os.utime(linked, (day_ahead, day_ahead), follow_symlinks=False)
    checked = json.loads(cache.read_text())
    with pytest.raises(InputError) as raised:
        check_dataset_images(tiny_dataset, ["00a", "01a", "02a"], cache_file=cache,
                             clock_ns=now)
    lines = str(raised.value).splitlines()
    assert lines[0].startswith(f"3 input file(s) under {tiny_dataset} are dated in the "
                               f"future, up to 24 h ahead of this file system's clock")
    assert "--touch would not help" in lines[0]
    assert lines[0].endswith(f"find -H {tiny_dataset} -newermt now -exec touch -ch {{}} + ; "
                             f"find -L {tiny_dataset} -newermt now -exec touch -c {{}} +")
    assert [line.split(" (")[0].strip() for line in lines[1:]] == [
        str(_stiffness(tiny_dataset, "01a")), str(linked), str(tiny_dataset / "participants.tsv")]
    assert json.loads(cache.read_text()) == checked  # refused before any file was read
    # without a clock (predict run: no Snakemake to compare times) the files are fine
    check_dataset_images(tiny_dataset, ["00a", "01a", "02a"], cache_file=cache)
    # the commands the message gives, as given
    fix = lines[0].split("or for every such file and link: ")[1]
    subprocess.run(fix, shell=True, check=True)
    check_dataset_images(tiny_dataset, ["00a", "01a", "02a"], cache_file=cache,
                         clock_ns=file_system_clock_ns(tmp_path))
    # a dataset root that is a link (data -> the release), its participants.tsv a link
    # dated ahead: named, and fixed by the commands the message gives
    root = tmp_path / "data"
    root.symlink_to(tiny_dataset)
    table = tiny_dataset / "participants.tsv"
    table.rename(target.parent / table.name)
    table.symlink_to(target.parent / table.name)
    os.utime(table, (day_ahead, day_ahead), follow_symlinks=False)
    with pytest.raises(InputError) as raised:
        check_dataset_images(root, ["00a", "01a", "02a"], cache_file=cache,
                             clock_ns=file_system_clock_ns(tmp_path))
    lines = str(raised.value).splitlines()
    assert [line.split(" (")[0].strip() for line in lines[1:]] == [str(root / table.name)]
    subprocess.run(lines[0].split("or for every such file and link: ")[1], shell=True,
                   check=True)
    check_dataset_images(root, ["00a", "01a", "02a"], cache_file=cache,
                         clock_ns=file_system_clock_ns(tmp_path))


def test_every_bad_image_is_named_at_once_and_the_good_ones_are_remembered(tiny_dataset,
                                                                           tmp_path):
    cache = tmp_path / "cache.json"
    _stiffness(tiny_dataset, "03a").write_bytes(b"not an image")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
             _stiffness(tiny_dataset, "01a"))
    said = []
    with pytest.raises(InputError) as raised:
        check_dataset_images(tiny_dataset, ["00a", "01a", "02a", "03a"], cache_file=cache,
                             announce=said.append)
    lines = str(raised.value).splitlines()
    assert lines[0] == "2 input images cannot be used:"
    assert re.search(r"^subject sub-01a: stiffness map .*sub-01a_stiffness.* no non-zero",
                     lines[1])
    assert re.search(r"^subject sub-03a: stiffness map .*sub-03a_stiffness.* not a readable",
                     lines[2])
    assert len(lines) == 3
    assert said and said[0].startswith("Checking 4 input image(s) of 4 subject(s) once")
    remembered = {Path(key).name for key in json.loads(cache.read_text())}
    assert remembered == {"sub-00a_stiffness.nii.gz", "sub-02a_stiffness.nii.gz"}
    # The next check opens only the files it has not passed, and says nothing when none.
    said.clear()
    for label, seed in (("01a", 1), ("03a", 3)):  # each subject its own map
        image = nib.load(_stiffness(tiny_dataset, "00a"))
        noise = np.random.default_rng(seed).normal(0, 0.01, image.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32) + noise, image.affine),
                 _stiffness(tiny_dataset, label))
    check_dataset_images(tiny_dataset, ["00a", "01a", "02a", "03a"], cache_file=cache,
                         announce=said.append)
    assert said[0].startswith("Checking 2 input image(s) of 4 subject(s)")
    said.clear()
    check_dataset_images(tiny_dataset, ["00a", "01a", "02a", "03a"], cache_file=cache,
                         announce=said.append)
    assert said == []


def test_an_interrupted_image_check_keeps_the_files_it_passed(tiny_dataset, tmp_path,
                                                             monkeypatch):
    """The first check of a few thousand subjects takes minutes on a login node; the cache
    was written only once every file was read, so a Ctrl-C, a lost session or one crashed
    read threw away everything already read."""
    import concurrent.futures

    from brainage import inputs as inputs_module

    labels, cache = ["00a", "01a", "02a", "03a"], tmp_path / "cache.json"
    read = inputs_module._image_grid_or_problem

    def crashing(path, *args):  # a read that fails with no InputError, in its thread
        if "sub-02a" in str(path):
            raise KeyboardInterrupt
        return read(path, *args)

    monkeypatch.setattr(inputs_module, "_image_grid_or_problem", crashing)
    with pytest.raises(KeyboardInterrupt):
        check_dataset_images(tiny_dataset, labels, cache_file=cache)
    kept = {Path(key).name.split("_")[0] for key in json.loads(cache.read_text())}
    # the files read before the crash are kept; the crash stops the files not yet started
    assert {"sub-00a", "sub-01a"} <= kept <= {"sub-00a", "sub-01a", "sub-03a"}, kept

    # Ctrl-C while waiting: the files not yet started are not read; those read are kept
    cache.unlink()
    monkeypatch.setattr(inputs_module, "IMAGE_CHECK_THREADS", 1)
    monkeypatch.setattr(inputs_module, "_image_grid_or_problem",
                        lambda *args: (__import__("time").sleep(0.5), read(*args))[1])

    def interrupted(futures):
        yield next(concurrent.futures.as_completed(futures))
        raise KeyboardInterrupt

    monkeypatch.setattr(inputs_module, "as_completed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        check_dataset_images(tiny_dataset, labels, cache_file=cache)
    kept = json.loads(cache.read_text())
    assert 1 <= len(kept) < 4  # one thread: the files queued behind the interrupt are left
    monkeypatch.undo()
    said = []
    check_dataset_images(tiny_dataset, labels, cache_file=cache, announce=said.append)
    assert said[0].startswith(f"Checking {4 - len(kept)} input image(s) of 4 subject(s)")


def test_one_ctrl_c_stops_the_image_check_under_snakemakes_event_loop(tiny_dataset, tmp_path,
                                                                     monkeypatch):
    """Snakemake plans inside asyncio, whose first Ctrl-C only cancels a task that waits
    for the check to return: the check of thousands of scans went on for minutes, and only
    a second Ctrl-C stopped it. A handler that only takes note stands for asyncio's here;
    the first SIGINT now stops the check, and the handler is put back after it."""
    import signal

    from brainage import inputs as inputs_module

    noted = []

    def asyncio_like(signum, frame):
        noted.append(signum)

    previous = signal.signal(signal.SIGINT, asyncio_like)
    try:
        read = inputs_module._image_grid_or_problem
        started = []

        def slow_read(path, *args):  # Ctrl-C as the first file is read
            started.append(path)
            if len(started) == 1:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            return read(path, *args)

        monkeypatch.setattr(inputs_module, "IMAGE_CHECK_THREADS", 1)
        monkeypatch.setattr(inputs_module, "_image_grid_or_problem", slow_read)
        with pytest.raises(KeyboardInterrupt):
            check_dataset_images(tiny_dataset, ["00a", "01a", "02a", "03a"],
                                 cache_file=tmp_path / "cache.json")
        assert noted == [] and len(started) < 4
        assert signal.getsignal(signal.SIGINT) is asyncio_like
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_killed_image_check_keeps_the_files_it_had_passed(tiny_dataset, tmp_path):
    """A lost login session (SIGHUP) or a time limit (SIGTERM) ends the process without
    any Python clean-up: the cache is saved while the check reads, not only at its end."""
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, time
        from brainage import inputs
        read = inputs._image_grid_or_problem
        def killing(path, *args):
            if "sub-02a" in str(path):
                time.sleep(1.0)  # the files before it are kept meanwhile
                os.kill(os.getpid(), signal.SIGTERM)
            return read(path, *args)
        inputs._image_grid_or_problem = killing
        inputs.IMAGE_CHECK_THREADS, inputs.IMAGE_CACHE_SAVE_SECONDS = 1, 0.0
        inputs.check_dataset_images({str(tiny_dataset)!r}, ["00a", "01a", "02a", "03a"],
                                    cache_file={str(tmp_path / "cache.json")!r})
    """))
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert finished.returncode == -signal.SIGTERM, finished.stderr
    kept = json.loads((tmp_path / "cache.json").read_text())
    assert {Path(key).name.split("_")[0] for key in kept} == {"sub-00a", "sub-01a"}


def test_a_subjects_maps_on_different_grids_are_refused_before_any_job(tmp_path):
    # The maps of one subject share its brain mask and transform; before this check a
    # damping ratio on another grid failed only in correct_and_register, after skull stripping.
    root = write_tiny_dataset(tmp_path / "d", default_rows(3), with_anat=True,
                              maps=("stiffness", "damping_ratio"))
    ratio = root / "sub-01a" / "mre" / "sub-01a_damping_ratio.nii.gz"
    image = nib.load(ratio)
    shifted = image.affine.copy()
    shifted[0, 3] += 2.0  # half a voxel: the same shape, another grid
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), shifted), ratio)
    # a T1w on a grid of its own is fine: it is resampled to the maps' grid
    anat = root / "sub-02a" / "anat" / "sub-02a_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 24, 24), np.float32), np.diag([2.0, 2, 2, 1])), anat)
    cache = tmp_path / "cache.json"
    modalities = ["stiffness", "damping_ratio"]
    for _ in range(2):  # the first check reads the files, the second their cached grids
        with pytest.raises(InputError) as raised:
            check_dataset_images(root, ["00a", "01a", "02a"], modalities, cache_file=cache)
        message = str(raised.value)
        assert message.startswith("subject sub-01a: its maps are not on one voxel grid (")
        assert "sub-01a_stiffness.nii.gz: shape (12, 12, 12)" in message
        assert "sub-01a_damping_ratio.nii.gz: shape (12, 12, 12)" in message
        assert "[4.0, 0.0, 0.0, 2.0]" in message and "resample them onto the grid" in message
        assert "reorient" not in message  # shifted: resampling is the remedy
        assert "sub-00a" not in message and "sub-02a" not in message
    assert len(json.loads(cache.read_text())) == 9  # every file passed on its own
    check_dataset_images(root, ["00a", "02a"], modalities, cache_file=cache)
    check_dataset_images(root, ["01a"], ["stiffness"], cache_file=cache)
    # the same voxels in another order (LAS, same data): reorienting is lossless, and said
    image = nib.load(root / "sub-00a" / "mre" / "sub-00a_damping_ratio.nii.gz")
    flipped = image.as_reoriented(np.array([[0, -1], [1, 1], [2, 1]]))
    nib.save(flipped, root / "sub-00a" / "mre" / "sub-00a_damping_ratio.nii.gz")
    with pytest.raises(InputError, match=r"they cover the same voxels in another order: "
                                         r"reorient them to one orientation"):
        check_dataset_images(root, ["00a"], modalities, cache_file=cache)


def test_the_image_checks_version_is_raised_with_the_checks():
    """A check added to load_nifti_checked without raising IMAGE_CHECKS_VERSION lets files
    cached before it pass the plan and fail in their subject's job (the header-extension
    check was added so). When this digest changes: if what a file must pass changed, raise
    IMAGE_CHECKS_VERSION; then record the new digest here."""
    import hashlib
    import inspect

    from brainage import inputs
    from brainage.modalities import MODALITIES

    checks = (inputs.load_nifti_checked, inputs._header_extension_bytes, inputs._check_unit,
              inputs._sign_flipped, inputs._check_spatial_unit,
              inputs._check_perpendicular_axes, inputs._check_orientation_declared)
    checks += (inputs._image_grid_or_problem, inputs._positive_fill)  # what the cache keeps
    source = "".join(map(inspect.getsource, checks)) + repr(
        (inputs.MAX_IMAGE_BYTES, inputs.MAX_HEADER_EXTENSION_BYTES, inputs.UNIT_CHECK_FACTOR,
         inputs.MAX_AXIS_COSINE, inputs.MIN_VOXEL_SIZE_MM, sorted(inputs.OTHER_SPATIAL_UNITS),
         inputs.FILL_VALUE_SHARE, inputs.FILL_VALUE_RATIO, inputs.MIN_SLICES,
         [(kind.name, kind.median_range, kind.valid_range, kind.positive)
          for kind in MODALITIES.values()]))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert (IMAGE_CHECKS_VERSION, digest) == (4, "3c850a1ac67ae732")


def test_one_scan_under_two_labels_is_refused_before_any_work(tiny_dataset, tmp_path):
    """A rescan relabelled from the same export, or a subject copied into a second study:
    the split drew it on both sides (a review: 3 of 6 copied people in a holdout split),
    and nothing said so although the plan opens every file."""
    import shutil

    labels, cache = ["00a", "01a", "02a", "03a"], tmp_path / "cache.json"
    check_dataset_images(tiny_dataset, labels, cache_file=cache)  # distinct maps pass
    shutil.copy(_stiffness(tiny_dataset, "00a"), _stiffness(tiny_dataset, "02a"))
    with pytest.raises(InputError) as refused:
        check_dataset_images(tiny_dataset, labels, cache_file=cache)
    assert re.fullmatch(
        r"subjects sub-00a and sub-02a: their stiffness maps \S+sub-00a_stiffness\.nii\.gz "
        r"and \S+sub-02a_stiffness\.nii\.gz are identical, byte for byte\. One scan under two "
        r"labels can land on both sides of the split .* remove one subject's row from "
        r"participants\.tsv, or replace the file copied by mistake\.", str(refused.value)), \
        str(refused.value)
    # from the cache alone too (the planning of every later run)
    with pytest.raises(InputError, match="identical, byte for byte"):
        check_dataset_images(tiny_dataset, labels, cache_file=cache)
    # the same person's own maps may be alike: only maps of two subjects are compared
    check_dataset_images(tiny_dataset, ["00a", "01a", "03a"], cache_file=cache)


def test_a_background_written_as_a_small_positive_value_is_refused(tiny_dataset):
    """A uint16 map whose intercept decodes its 0 background to 1e-4 kPa (or a float map
    with that floor): preprocessing read it as tissue over 11 % of the brain and QC passed,
    the predicted age 2.6 years off (a review). The same background as 0, NaN or -1 is no
    data, and a map quantised to a few levels is not a fill."""
    path = _stiffness(tiny_dataset, "00a")
    image = nib.load(path)
    data = image.get_fdata(dtype=np.float32)
    stored = np.round(data / 0.001).astype(np.uint16)  # 0 stays 0: the background
    scaled = nib.Nifti1Image(stored, image.affine)
    scaled.header.set_slope_inter(0.001, 0.0001)
    nib.save(scaled, path)
    assert nib.load(path).get_fdata()[0, 0, 0] == pytest.approx(1e-4)  # decoded so
    with pytest.raises(InputError) as refused:
        check_dataset_images(tiny_dataset, ["00a"])
    assert re.fullmatch(r"subject sub-00a: stiffness map \S+sub-00a_stiffness\.nii\.gz: \d+ of "
                        r"its \d+ non-zero voxels \(\d+%\) hold the one value 0\.0001, far below "
                        r"the others: a background written as 0\.0001 instead of 0 .* Set those "
                        r"voxels to 0 \(or NaN\) and export the map again, or remove the "
                        r"subject's row from participants\.tsv\.", str(refused.value)), \
        str(refused.value)
    for background in (0.0, np.nan, -1.0):
        nib.save(nib.Nifti1Image(np.where(data == 0, background, data).astype(np.float32),
                                 image.affine), path)
        check_dataset_images(tiny_dataset, ["00a"])
    # coarse levels (0.5 kPa steps) are tissue, however few
    nib.save(nib.Nifti1Image(np.round(data * 2) / 2, image.affine), path)
    check_dataset_images(tiny_dataset, ["00a"])


def test_image_check_cache_of_an_older_version_is_read_again(tiny_dataset, tmp_path):
    """Entries without a grid (size and mtime only) cannot serve the grid check; entries of
    older checks (without the checks version) let a file the new checks refuse through the
    plan, to fail hours later in its subject's job."""
    cache = tmp_path / "cache.json"
    path = _stiffness(tiny_dataset, "00a")
    stat = path.stat()
    cache.write_text(json.dumps({str(path.resolve()): [stat.st_size, stat.st_mtime_ns]}))
    said = []
    check_dataset_images(tiny_dataset, ["00a"], cache_file=cache, announce=said.append)
    assert said and said[0].startswith("Checking 1 input image(s)")
    entry = json.loads(cache.read_text())[str(path.resolve())]
    assert entry[:2] == [stat.st_size, stat.st_mtime_ns] and entry[2][0] == [12, 12, 12]
    assert entry[3] == IMAGE_CHECKS_VERSION
    said.clear()
    check_dataset_images(tiny_dataset, ["00a"], cache_file=cache, announce=said.append)
    assert said == []  # this version's entry serves
    header = nib.Nifti1Header()  # no orientation: refused since version 2
    header.set_data_shape((4, 4, 4))
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None, header), path)
    stat = path.stat()
    cache.write_text(json.dumps({str(path.resolve()): [stat.st_size, stat.st_mtime_ns,
                                                       entry[2]]}))  # passed by version 1
    with pytest.raises(InputError, match=r"sub-00a_stiffness\.nii\.gz declares no orientation"):
        check_dataset_images(tiny_dataset, ["00a"], cache_file=cache)


def test_a_missing_map_of_the_modalities_names_subject_and_file(tiny_dataset):
    with pytest.raises(InputError, match=r"subject sub-00a: damping-ratio map .*sub-00a/mre/"
                                         r"sub-00a_damping_ratio\.nii\.gz is missing \(config "
                                         r"key dataset\.modalities lists damping_ratio\)"):
        read_participants(tiny_dataset, ("stiffness", "damping_ratio"))
    with pytest.raises(InputError, match=r"subject sub-01a: T1w image .*sub-01a_T1w\.nii\.gz "
                                         r"is missing"):
        subject_inputs(tiny_dataset, "01a", ("stiffness", "T1w"))
    assert set(subject_inputs(tiny_dataset, "01a")) == {"stiffness"}


@pytest.mark.parametrize("name", ["sub-01a_t1w.nii.gz", "sub-01a_T1W.nii.gz", "T1w.nii.gz",
                                  "sub-01a_mprage.nii.gz", "sub-01x_T1w.nii.gz",
                                  "sub-01a_T1w_defaced.nii.gz"])
def test_an_optional_t1w_in_another_case_or_label_is_refused(tiny_dataset, name):
    """A T1w named in another case, without the label, as the sequence, or under a
    renamed subject's old label was skipped without a word: the subject masked and
    registered by its stiffness map (QC still passes)."""
    anat = tiny_dataset / "sub-01a" / "anat"
    anat.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), anat / name)
    with pytest.raises(InputError, match=rf"anat holds {re.escape(name)} but no "
                                         r"sub-01a_T1w\.nii\.gz, the one T1w name read"):
        read_participants(tiny_dataset)


def test_an_optional_t1w_in_a_session_folder_is_refused_and_other_anat_images_are_not(
        tiny_dataset):
    """The maps moved up out of ses-01 as told, the T1w left in ses-01/anat: not read, and
    the subject registered by its map without a word. A T2w or a T1 map is no T1w, nor is
    an image whose BIDS suffix names another kind, whatever its entities hold (a
    multi-parameter-mapping echo is labelled acq-T1w; these stopped every subject)."""
    anat = tiny_dataset / "sub-01a" / "ses-01" / "anat"
    anat.mkdir(parents=True)
    image = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    nib.save(image, anat / "sub-01a_ses-01_T1w.nii.gz")
    with pytest.raises(InputError, match=r"subject sub-01a: ses-01/anat/sub-01a_ses-01_T1w"
                                         r"\.nii\.gz in .*sub-01a is in a session folder, "
                                         r"which is not read"):
        read_participants(tiny_dataset)
    shutil.rmtree(tiny_dataset / "sub-01a" / "ses-01")
    (tiny_dataset / "sub-01a" / "anat").mkdir()
    for other in ("sub-01a_T2w.nii.gz", "sub-01a_T1map.nii.gz",
                  "sub-01a_acq-T1w_echo-1_flip-2_mt-off_MPM.nii.gz",
                  "sub-01a_acq-mprageLike_FLAIR.nii.gz", "sub-01a_space-T1w_T2w.nii"):
        nib.save(image, tiny_dataset / "sub-01a" / "anat" / other)
    assert len(read_participants(tiny_dataset)) == 4


def test_a_header_claiming_huge_extensions_is_refused_before_it_is_read(tiny_dataset,
                                                                        monkeypatch):
    """nibabel reads every header extension into memory while it loads the header, before
    the size check of the voxels: a 2.5 MB file with a 400 MB extension took 466 MB."""
    stiffness = _stiffness(tiny_dataset, "01a")
    image = nib.load(stiffness)
    image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 4000))
    nib.save(image, stiffness)
    assert load_nifti_checked(stiffness) is not None  # converters' metadata: kilobytes
    monkeypatch.setattr(inputs, "MAX_HEADER_EXTENSION_BYTES", 2000)
    with pytest.raises(InputError, match=r"sub-01a_stiffness\.nii\.gz: its header claims 0 "
                                         r"MiB of header extensions before the voxels, more "
                                         r"than the 0 MiB"):
        load_nifti_checked(stiffness)


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_extensions_are_measured_in_every_nifti_flavour(tmp_path, monkeypatch,
                                                               image_class, byte_order, suffix):
    """NIfTI-1 and NIfTI-2, either byte order, gzipped or not: the extensions' size is read
    from the header's own fields (only NIfTI-1, little-endian, was tested)."""
    data = np.zeros((6, 6, 6), np.float32)
    data[2:4, 2:4, 2:4] = 2.5
    header = image_class(data, np.diag([2.0, 2.0, 2.0, 1.0])).header
    header.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    if byte_order == ">":
        header = header.as_byteswapped(">")
    image = image_class(data, None, header)
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 4000))
    path = tmp_path / f"map{suffix}"
    nib.save(image, path)
    raw = gzip.open(path).read(4) if suffix == ".nii.gz" else path.read_bytes()[:4]
    assert raw == (nib.load(path).header.sizeof_hdr).to_bytes(4, "big" if byte_order == ">"
                                                               else "little")
    monkeypatch.setattr(inputs, "MAX_HEADER_EXTENSION_BYTES", 4100)
    assert load_nifti_checked(path) is not None  # 4,016 bytes: the comment, padded
    monkeypatch.setattr(inputs, "MAX_HEADER_EXTENSION_BYTES", 4000)
    with pytest.raises(InputError, match=r"its header claims 0 MiB of header extensions"):
        load_nifti_checked(path)


def test_a_map_that_is_a_link_to_a_device_or_a_folder_is_named_as_such(tiny_dataset):
    """A link to /dev/zero was called a broken link, 'a DataLad or git-annex file not
    fetched?', and a folder in a map's place 'missing'."""
    stiffness = _stiffness(tiny_dataset, "01a")
    stiffness.unlink()
    stiffness.symlink_to("/dev/zero")
    with pytest.raises(InputError, match=r"sub-01a_stiffness\.nii\.gz is not a regular file "
                                         r"\(a link to /dev/zero\)"):
        read_participants(tiny_dataset)
    stiffness.unlink()
    stiffness.mkdir()
    with pytest.raises(InputError, match=r"sub-01a_stiffness\.nii\.gz is not a regular file "
                                         r"\(a folder\)"):
        read_participants(tiny_dataset)


def test_a_value_longer_than_the_csv_limit_is_not_blamed_on_a_quote(tiny_dataset):
    def mutate(table):
        table["notes"] = ["x" * 200_000, "", "", ""]
        return table
    _rewrite_table(tiny_dataset, mutate)
    with pytest.raises(InputError, match=r"line 2: a value is longer than 131,072 characters"):
        read_participants(tiny_dataset)
    table = tiny_dataset / "participants.tsv"
    lines = table.read_text().splitlines()
    lines[1] = lines[1].replace("x" * 200_000, '"' + "x" * 200_000 + '"')  # quoted, closed
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 2: a value is longer than 131,072 characters"):
        read_participants(tiny_dataset)


def test_fractional_ages_are_read_as_written(tiny_dataset):
    """Ages are years with a fraction (34.5 is 34 years and 6 months); a reader that rounded
    or truncated them would shift every subject's age, and so its brain-age gap, by up to
    a year."""
    def mutate(table):
        table["age"] = ["34.5", "67.25", "20.75", "81"]
        return table
    _rewrite_table(tiny_dataset, mutate)
    assert read_participants(tiny_dataset)["age"].tolist() == [34.5, 67.25, 20.75, 81.0]


def test_grids_differ_by_shape_or_by_more_than_the_tolerance():
    """Two maps share a grid only with the same shape and affines within 1e-3 mm: a map one
    voxel longer, or shifted by 0.01 mm, on the same affine is another grid, and taking it
    for the same would put a subject's maps under one mask and transform misaligned."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted = affine.copy()
    shifted[1, 3] += 0.01
    nearly = affine.copy()
    nearly[1, 3] += 1e-4
    assert same_grid((4, 4, 4), affine, [4, 4, 4], nearly)
    assert not same_grid((4, 4, 4), affine, (4, 4, 5), affine)
    assert not same_grid((4, 4, 4), affine, (4, 4, 4), shifted)


def test_subject_inputs_refuses_a_label_that_is_not_a_bids_label(tiny_dataset):
    """subject_inputs looks files up by the label it is given: a label with a dot or a
    dash ('0.1', which a folder sub-0.1 would give) names results folders that other ids
    can collide with or leave; it is refused even when its files exist."""
    source = tiny_dataset / "sub-00a"
    for label in ("0.1", "0-1"):
        target = tiny_dataset / f"sub-{label}" / "mre"
        target.mkdir(parents=True)
        shutil.copy(source / "mre" / "sub-00a_stiffness.nii.gz",
                    target / f"sub-{label}_stiffness.nii.gz")
        with pytest.raises(InputError, match=rf"subject label '{label}' is not a BIDS label"):
            subject_inputs(tiny_dataset, label)


@pytest.mark.parametrize("folder", ["Prüfung", "Łódź"])
def test_a_root_missing_only_under_a_latin1_locale_names_the_locale(tmp_path, folder):
    """On a login node whose locale is Latin-1, Python encodes file names as Latin-1 (ü as
    one byte) while the folder's name on disk is UTF-8: a dataset.root under 'Prüfung/' was
    refused as not existing, a folder that ls shows; one under 'Łódź/', whose Ł Latin-1
    cannot encode, then stopped with a UnicodeEncodeError from the hint's own check."""
    locales = tmp_path / "locales"
    locales.mkdir()
    made = subprocess.run(["localedef", "-i", "de_DE", "-f", "ISO-8859-1",
                           str(locales / "de_DE.ISO-8859-1")], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"no Latin-1 locale can be made here (localedef: {made.stderr[-200:]!r})")
    root = write_tiny_dataset(tmp_path / folder / "dataset", default_rows(2))
    # the path as the YAML config gives it, text decoded from UTF-8 (on the command line it
    # would arrive as the locale's bytes and round-trip)
    code = ("import sys\nfrom brainage.inputs import InputError, read_participants\n"
            f"try:\n    read_participants({ascii(str(root))})\n"
            "except InputError as error:\n"
            "    print(sys.getfilesystemencoding(), error, file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(inputs.__file__).parents[1]),
           "LOCPATH": str(locales), "LC_ALL": "de_DE.ISO-8859-1", "LANG": "de_DE.ISO-8859-1"}
    env.pop("PYTHONUTF8", None)
    # on stderr, as Snakemake logs it: Python writes a letter the locale cannot encode there
    # as an escape (stdout would stop at it)
    said = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          env=env).stderr.decode("latin-1")
    assert said.startswith("iso8859-1 "), said  # the locale took: the case to test
    assert ("is not found with this session's file-name encoding (iso8859-1, from its "
            "locale), but it exists under its UTF-8 name") in said, said
    assert "export PYTHONUTF8=1" in said, said
    utf8 = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          env={**env, "PYTHONUTF8": "1"}).stderr.decode()
    assert utf8 == "", utf8  # read: the folder is there
