"""The simulated cohort: demographics of Table 2, layout, ground truth, determinism."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from brainage import simulate
from brainage.simulate import (
    ACCELERATED_STUDY,
    STUDY_TABLE,
    TRUTH_COLUMNS,
    draw_participants,
    simulate_cohort,
    study_table,
)
from brainage.simulate import cohort as simulate_cohort_module
from brainage.simulate.anatomy import simulate_subject

N_HEALTHY = 20
N_ACCELERATED = 4
ACCELERATION_YEARS = 8.0


def _load(path: Path):
    image = nib.load(str(path))
    return image, np.asanyarray(image.dataobj)


def _subject_files(root: Path, participant_id: str) -> dict[str, Path]:
    return {
        "stiffness": root / participant_id / "mre" / f"{participant_id}_stiffness.nii.gz",
        "t1w": root / participant_id / "anat" / f"{participant_id}_T1w.nii.gz",
        "mask": root / "derivatives" / "simulation" / participant_id
        / f"{participant_id}_desc-truth_mask.nii.gz",
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One cohort with an accelerated group and frequent NaNs, loaded once."""
    root = tmp_path_factory.mktemp("simulated") / "dataset"
    truth = simulate_cohort(root, n_subjects=N_HEALTHY, seed=3,
                            accelerated_group_n=N_ACCELERATED,
                            accelerated_ageing_years=ACCELERATION_YEARS, nan_probability=0.5)
    images = {}
    for participant_id in truth["participant_id"]:
        files = _subject_files(root, participant_id)
        stiffness_image, stiffness = _load(files["stiffness"])
        t1w_image, t1w = _load(files["t1w"])
        mask_image, mask = _load(files["mask"])
        images[participant_id] = dict(stiffness_image=stiffness_image, stiffness=stiffness,
                                      t1w_image=t1w_image, t1w=t1w, mask_image=mask_image,
                                      mask=mask.astype(bool))
    return root, truth, images


# ---- demographics ------------------------------------------------------------------------
def test_study_table_is_papers_table2():
    table = study_table()
    assert list(table.columns) == ["study", "n", "age_mean", "age_sd", "n_female", "n_male"]
    assert table["n"].sum() == 311
    assert (table["n_female"].sum(), table["n_male"].sum()) == (183, 128)
    assert (table["n_female"] + table["n_male"] == table["n"]).all()


@pytest.mark.parametrize("n_subjects", [10, 20, 37, 311])
def test_study_sizes_scale_proportionally_with_at_least_two(n_subjects):
    participants = draw_participants(n_subjects, seed=0)
    sizes = participants["study"].value_counts()
    assert sizes.sum() == n_subjects and sizes.min() >= 2
    assert set(sizes.index) == {row[0] for row in STUDY_TABLE}
    if n_subjects == 10:
        return  # the floor of 2 per study leaves no room for proportions
    for study, paper_n, *_ in STUDY_TABLE:
        assert abs(sizes[study] - n_subjects * paper_n / 311) <= 2


def test_too_few_subjects_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        draw_participants(9)


def test_full_size_demographics_match_table2():
    participants = draw_participants(311, seed=1)
    for study, n, age_mean, age_sd, n_female, _ in STUDY_TABLE:
        rows = participants[participants["study"] == study]
        assert len(rows) == n
        assert abs(rows["age"].mean() - age_mean) < 0.1 * age_sd + 0.3, study
        assert abs(rows["age"].std() - age_sd) < 0.15 * age_sd, study
        assert abs((rows["sex"] == "F").sum() - n_female) <= 1, study
    ages = participants["age"]
    assert ages.between(18, 90).all()
    assert np.allclose(ages, ages.round(1))
    assert abs(ages.mean() - 41.0) < 1.5 and abs(ages.std() - 21.9) < 1.5


@pytest.mark.parametrize("seed", range(5))
def test_scaled_demographics_stay_close_and_bimodal(seed):
    participants = draw_participants(20, seed=seed)
    for study, n, age_mean, age_sd, n_female, _ in STUDY_TABLE:
        rows = participants[participants["study"] == study]
        assert abs(rows["age"].mean() - age_mean) < 0.6 * age_sd + 1.0, study
        assert abs((rows["sex"] == "F").mean() - n_female / n) <= 1 / len(rows) + 1e-9
    ages = participants["age"]
    young, old = (ages < 35).mean(), (ages >= 60).mean()
    middle = ages.between(40, 55).mean()
    assert young >= 0.3 and old >= 0.2 and middle < min(young, old)
    assert abs((participants["sex"] == "F").mean() - 183 / 311) < 0.12


def test_labels_are_bids_and_prefix_makes_a_new_cohort():
    first = draw_participants(12, seed=0)
    renamed = draw_participants(12, seed=0, id_prefix="new", accelerated_group_n=3)
    for table in (first, renamed):
        assert table["participant_id"].str.fullmatch(r"sub-[A-Za-z0-9]+").all()
        assert table["participant_id"].is_unique
    assert renamed["participant_id"].str.startswith("sub-new").all()
    assert not np.array_equal(first["age"], renamed["age"].iloc[:12])
    with pytest.raises(ValueError, match="letters and digits"):
        draw_participants(12, id_prefix="new_1")


# ---- layout ------------------------------------------------------------------------------
def test_layout_and_participants(cohort):
    root, truth, _ = cohort
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "brainage.simulate"
    assert description["SimulationParameters"]["seed"] == 3
    participants = pd.read_csv(root / "participants.tsv", sep="\t", dtype={"study": str})
    assert list(participants.columns) == ["participant_id", "age", "sex", "study", "group"]
    assert set(participants["sex"]) <= {"F", "M"}
    assert list(participants["participant_id"]) == list(truth["participant_id"])
    # Ground truth never sits in a subject folder of the raw dataset.
    assert not list(root.glob("sub-*/**/*truth*"))
    assert list(truth.columns) == list(TRUTH_COLUMNS)
    on_disk = pd.read_csv(root / "derivatives" / "simulation" / "truth.tsv", sep="\t")
    assert len(on_disk) == len(truth)
    assert not list(root.parent.glob(".dataset.*")), "staging folder left behind"


def test_the_pipeline_reader_accepts_the_dataset(cohort):
    from brainage.io import read_participants

    root, truth, _ = cohort
    table = read_participants(root)
    assert len(table) == len(truth) and "group" in table


def test_images_share_a_grid_and_contain_the_head(cohort):
    _, truth, images = cohort
    for row in truth.iloc[::3].itertuples():
        subject = images[row.participant_id]
        stiffness_image = subject["stiffness_image"]
        assert stiffness_image.get_data_dtype() == np.float32
        assert np.allclose(stiffness_image.header.get_zooms(), row.voxel_size_mm)
        for other in ("t1w_image", "mask_image"):
            assert subject[other].shape == stiffness_image.shape
            assert np.allclose(subject[other].affine, stiffness_image.affine)
        t1w = subject["t1w"].astype(float)
        faces = [t1w[0], t1w[-1], t1w[:, 0], t1w[:, -1], t1w[:, :, 0], t1w[:, :, -1]]
        # Only Rician background noise on the faces of the field of view: the head is inside.
        assert max(face.max() for face in faces) < 0.2 * np.percentile(t1w, 99)
        assert np.mean([face.mean() for face in faces]) > 0, "background should be noise"
        # Skull stripping matters: bright voxels outside the brain (scalp).
        outside = t1w[~ndimage.binary_dilation(subject["mask"], iterations=3)]
        assert np.percentile(outside, 99.5) > 0.5 * np.percentile(t1w[subject["mask"]], 90)


# ---- stiffness maps ----------------------------------------------------------------------
def test_background_is_zero_and_nans_are_documented(cohort):
    _, truth, images = cohort
    for row in truth.itertuples():
        stiffness, mask = images[row.participant_id]["stiffness"], \
            images[row.participant_id]["mask"]
        nans = np.isnan(stiffness)
        assert nans.sum() == row.nan_count
        assert mask[nans].all(), "NaNs only inside the brain"
        assert (stiffness[~mask] == 0).all(), "outside the brain exactly 0"
        values = stiffness[(stiffness != 0) & ~nans]
        assert values.min() >= 0.2 and values.max() <= 10.0 and np.median(values) > 1.5
    assert (truth["nan_count"] > 0).any() and (truth["nan_count"] == 0).any()
    assert truth["nan_count"].max() <= 10


def test_coverage_matches_the_stiffness_support(cohort):
    _, truth, images = cohort
    for row in truth.itertuples():
        stiffness, mask = images[row.participant_id]["stiffness"], \
            images[row.participant_id]["mask"]
        support = stiffness != 0  # NaN != 0: a failed voxel is still covered
        assert not (support & ~mask).any()
        assert abs(support.sum() / mask.sum() - row.coverage_fraction) < 0.02
        slices = np.flatnonzero(support.any(axis=(0, 1)))
        assert slices.min() >= row.slab_first_slice and slices.max() <= row.slab_last_slice
    coverage = truth["coverage_fraction"]
    assert coverage.between(0.78, 1.0).all() and coverage.median() > 0.9


def test_saved_pose_maps_the_true_mask_onto_the_template(cohort):
    from nilearn.datasets import load_mni152_brain_mask

    _, truth, images = cohort
    template = load_mni152_brain_mask(resolution=2)
    template_mask = template.get_fdata() > 0
    for row in truth.itertuples():
        mask_image = images[row.participant_id]["mask_image"]
        native_to_mni = np.array(json.loads(row.native_to_mni_affine))
        # MNI voxel -> MNI mm -> native mm -> native voxel.
        mni_to_native_voxel = (np.linalg.inv(mask_image.affine) @ np.linalg.inv(native_to_mni)
                               @ template.affine)
        resampled = ndimage.affine_transform(
            images[row.participant_id]["mask"].astype(np.float32),
            mni_to_native_voxel[:3, :3], offset=mni_to_native_voxel[:3, 3],
            output_shape=template_mask.shape, order=1) > 0.5
        dice = 2 * (resampled & template_mask).sum() / (resampled.sum() + template_mask.sum())
        # Atrophy shrinks the oldest brains by up to 2.5 mm at the surface.
        assert dice > (0.95 if row.age < 40 else 0.9), (row.participant_id, dice)
        assert np.isclose(abs(np.linalg.det(native_to_mni[:3, :3])), row.scale ** -3)


def test_pose_parameters_compose_the_saved_affine(cohort):
    _, truth, _ = cohort
    for row in truth.itertuples():
        pose = simulate.pose_to_native_affine(
            [row.rotation_x_deg, row.rotation_y_deg, row.rotation_z_deg],
            [row.translation_x_mm, row.translation_y_mm, row.translation_z_mm], row.scale)
        assert np.allclose(np.linalg.inv(pose), json.loads(row.native_to_mni_affine),
                           atol=1e-8)
    assert truth[["rotation_x_deg", "rotation_y_deg", "rotation_z_deg"]].abs().max().max() \
        <= 10
    assert truth["scale"].between(0.95, 1.05).all()


def test_stiffness_declines_with_age(cohort):
    _, truth, images = cohort
    healthy = truth[truth["group"] == "healthy"]
    means = [np.nanmean(images[pid]["stiffness"][images[pid]["stiffness"] != 0])
             for pid in healthy["participant_id"]]
    assert np.allclose(means, healthy["mean_stiffness_kpa"], rtol=1e-4)
    assert np.corrcoef(healthy["age"], means)[0, 1] < -0.5
    # Atrophy: older brains have less parenchyma.
    assert np.corrcoef(healthy["age"], healthy["parenchyma_volume_ml"])[0, 1] < -0.5


def test_accelerated_group_carries_the_documented_offset(cohort):
    root, truth, _ = cohort
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    accelerated = participants["group"] == "accelerated"
    assert accelerated.sum() == N_ACCELERATED
    assert (participants.loc[accelerated, "study"] == ACCELERATED_STUDY).all()
    assert (participants.loc[~accelerated, "group"] == "healthy").all()
    offsets = truth.set_index("participant_id")["stiffness_age_offset_years"]
    assert (offsets[participants.loc[accelerated, "participant_id"]] == ACCELERATION_YEARS).all()
    assert (offsets[participants.loc[~accelerated, "participant_id"]] == 0).all()
    assert np.allclose(truth["stiffness_age_years"], truth["age"] + offsets.values)


def test_the_offset_makes_the_same_subject_softer_by_its_ageing_slope():
    participants = draw_participants(10, seed=0, accelerated_group_n=1,
                                     accelerated_ageing_years=ACCELERATION_YEARS)
    subject = participants.iloc[-1].to_dict()
    kwargs = dict(seed=0, id_prefix="", index=10, with_anatomy=False, nan_probability=0.0)
    *_, mask_older, truth_older = simulate_subject(subject, **kwargs)
    *_, mask_true, truth_true = simulate_subject(
        dict(subject, stiffness_age_offset_years=0.0), **kwargs)
    assert np.array_equal(mask_older, mask_true), "anatomy stays at the true age"
    ratio = truth_older["mean_stiffness_kpa"] / truth_true["mean_stiffness_kpa"]
    # Regional slopes 0-0.55 %/year, 1.5 x after 60: 8 years cost 2-7 %.
    assert 0.93 < ratio < 0.98


# ---- determinism and writing -------------------------------------------------------------
def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(path.relative_to(root)): np.asanyarray(nib.load(str(path)).dataobj)
            for path in sorted(root.rglob("*.nii.gz"))}


def test_same_seed_same_dataset_other_seed_other_dataset(tmp_path):
    # Maps only, to keep this fast; the T1w stream is checked on the cohort below.
    simulate.main(["--root", str(tmp_path / "a"), "--n-subjects", "10", "--seed", "5",
                   "--no-anatomy"])
    simulate_cohort(tmp_path / "b", n_subjects=10, seed=5, with_anatomy=False)
    simulate_cohort(tmp_path / "c", n_subjects=10, seed=6, with_anatomy=False)
    first, second, other = (_arrays(tmp_path / name) for name in "abc")
    assert first.keys() == second.keys() and len(first) == 20
    for name in first:
        assert np.array_equal(first[name], second[name], equal_nan=True), name
    for table in ("participants.tsv", "derivatives/simulation/truth.tsv"):
        assert (tmp_path / "a" / table).read_bytes() == (tmp_path / "b" / table).read_bytes()
        assert (tmp_path / "a" / table).read_bytes() != (tmp_path / "c" / table).read_bytes()
    maps = [name for name in first if "stiffness" in name]
    assert all(first[name].shape != other[name].shape
               or not np.array_equal(first[name], other[name], equal_nan=True)
               for name in maps)


def test_regenerating_a_subject_reproduces_its_files(cohort):
    root, truth, images = cohort
    participants = pd.read_csv(root / "participants.tsv", sep="\t", dtype={"study": str})
    index = 5
    subject = dict(participants.iloc[index], stiffness_age_offset_years=0.0)
    affine, stiffness, t1w, mask, _ = simulate_subject(
        subject, seed=3, id_prefix="", index=index, with_anatomy=True, nan_probability=0.5)
    written = images[subject["participant_id"]]
    assert np.allclose(affine, written["stiffness_image"].affine, atol=1e-4)
    assert np.array_equal(stiffness, written["stiffness"], equal_nan=True)
    assert np.array_equal(t1w, written["t1w"]) and np.array_equal(mask, written["mask"])


def test_refuses_a_non_empty_root_and_never_leaves_half_a_dataset(tmp_path, monkeypatch):
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        simulate_cohort(root, n_subjects=10)
    assert (root / "notes.txt").read_text() == "mine"

    real_subject = simulate_subject

    def fail_on_third_subject(subject, **kwargs):
        if kwargs["index"] == 2:
            raise RuntimeError("simulated crash")
        return real_subject(subject, **kwargs)

    monkeypatch.setattr(simulate_cohort_module, "simulate_subject", fail_on_third_subject)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="simulated crash"):
        simulate_cohort(fresh, n_subjects=10, with_anatomy=False)
    assert not fresh.exists()
    with pytest.raises(RuntimeError):
        simulate_cohort(root, n_subjects=10, with_anatomy=False, overwrite=True)
    assert (root / "notes.txt").read_text() == "mine", "a failed overwrite keeps the old data"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset"]


def test_overwrite_replaces_the_root(tmp_path, monkeypatch):
    # Only the writing is under test here: one tiny fake subject keeps it fast.
    def tiny_subject(subject, **kwargs):
        data = np.zeros((4, 4, 4), np.float32)
        truth = {column: 0 for column in TRUTH_COLUMNS}
        truth["participant_id"] = subject["participant_id"]
        return np.eye(4), data, None, data.astype(bool), truth

    monkeypatch.setattr(simulate_cohort_module, "simulate_subject", tiny_subject)
    root = tmp_path / "dataset"
    root.mkdir()  # an empty folder (as Snakemake leaves it) is fine without overwrite
    simulate_cohort(root, n_subjects=10, seed=0)
    (root / "stale.txt").write_text("old")
    simulate_cohort(root, n_subjects=12, seed=1, overwrite=True)
    assert not (root / "stale.txt").exists()
    assert len(pd.read_csv(root / "participants.tsv", sep="\t")) == 12
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset"]
    assert re.fullmatch(r"sub-st\d+s\d{3}", pd.read_csv(root / "participants.tsv",
                                                        sep="\t")["participant_id"][0])
