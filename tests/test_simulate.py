"""The simulated cohorts: demographics of Table 2, layout, ground truth, determinism; the
damping-ratio maps; the T1w-only (pretraining) cohort."""

from __future__ import annotations

import fnmatch
import inspect
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from acl_fixture import shared_folder
from bids_validator import assert_bids_valid
from brainage import simulate
from brainage.simulate import (
    ACCELERATED_STUDY,
    DAMPING_RATIO_TRUTH_COLUMNS,
    STUDY_TABLE,
    T1W_TRUTH_COLUMNS,
    TRUTH_COLUMNS,
    draw_participants,
    draw_t1w_participants,
    simulate_cohort,
    simulate_t1w_cohort,
    simulated_participants,
    simulation_options,
    study_table,
)
from brainage.simulate import cohort as simulate_cohort_module
from brainage.simulate import t1w_cohort as t1w_cohort_module
from brainage.simulate.anatomy import (
    ATROPHY_STREAM,
    DAMPING_RATIO_LIMITS,
    DAMPING_RATIO_SLOPE_PERCENT_PER_YEAR,
    STUDY_ACQUISITION,
    SimulatedSubject,
    check_maps,
    draw_atrophy_course,
    simulate_subject,
)
from brainage.simulate.t1w_cohort import T1W_SITES, SimulatedT1w, simulate_t1w_subject

N_HEALTHY = 20
N_ACCELERATED = 4
ACCELERATION_YEARS = 8.0
BOTH_MAPS = ["stiffness", "damping_ratio"]


def _load(path: Path):
    image = nib.load(str(path))
    return image, np.asanyarray(image.dataobj)


def _subject_files(root: Path, participant_id: str) -> dict[str, Path]:
    return {
        "stiffness": root / participant_id / "mre" / f"{participant_id}_stiffness.nii.gz",
        "damping_ratio": root / participant_id / "mre"
        / f"{participant_id}_damping_ratio.nii.gz",
        "t1w": root / participant_id / "anat" / f"{participant_id}_T1w.nii.gz",
        "mask": root / "derivatives" / "simulation" / participant_id
        / f"{participant_id}_desc-truth_mask.nii.gz",
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One cohort with an accelerated group, frequent NaNs and both MRE maps, loaded once."""
    root = tmp_path_factory.mktemp("simulated") / "dataset"
    truth = simulate_cohort(root, n_subjects=N_HEALTHY, seed=3,
                            accelerated_group_n=N_ACCELERATED,
                            accelerated_ageing_years=ACCELERATION_YEARS, nan_probability=0.5,
                            maps=BOTH_MAPS)
    images = {}
    for participant_id in truth["participant_id"]:
        files = _subject_files(root, participant_id)
        stiffness_image, stiffness = _load(files["stiffness"])
        damping_image, damping = _load(files["damping_ratio"])
        t1w_image, t1w = _load(files["t1w"])
        mask_image, mask = _load(files["mask"])
        images[participant_id] = dict(stiffness_image=stiffness_image, stiffness=stiffness,
                                      damping_image=damping_image, damping=damping,
                                      t1w_image=t1w_image, t1w=t1w, mask_image=mask_image,
                                      mask=mask.astype(bool))
    return root, truth, images


@pytest.fixture(scope="module")
def cohort40(tmp_path_factory):
    """40 healthy subjects with both maps (no T1w, to stay fast), for the age effects."""
    root = tmp_path_factory.mktemp("simulated40") / "dataset"
    truth = simulate_cohort(root, n_subjects=40, seed=0, with_anatomy=False, maps=BOTH_MAPS)
    return root, truth


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


@pytest.mark.parametrize("option, value", [
    ("seed", -1), ("seed", 1.9), ("n_subjects", 10.7), ("n_subjects", "12"),
    ("accelerated_group_n", -1), ("accelerated_group_n", 1.5),
    ("accelerated_ageing_years", float("nan")), ("accelerated_ageing_years", float("inf"))])
def test_an_option_out_of_range_is_refused_by_its_name(tmp_path, tiny_subjects, option,
                                                       value):
    """seed=-1 stopped in NumPy with 'expected non-negative integer', naming no option;
    seed=1.9, n_subjects=10.7 and accelerated_group_n=1.5 were truncated in silence (1.9 made
    seed 1's cohort, recorded as seed 1.9); an offset of NaN years made every map of the
    accelerated group NaN."""
    options = {"n_subjects": 10, "accelerated_group_n": 2, option: value}
    message = re.escape(f"{option}={value!r}")
    with pytest.raises(ValueError, match=message):
        draw_participants(**options)
    with pytest.raises(ValueError, match=message):
        simulated_participants(**options)
    with pytest.raises(ValueError, match=message):
        simulate_cohort(tmp_path / "dataset", **options)
    assert not (tmp_path / "dataset").exists()
    if option in ("seed", "n_subjects"):
        with pytest.raises(ValueError, match=message):
            draw_t1w_participants(**{"n_subjects": 4, option: value})


def test_whole_numbers_of_any_type_give_the_same_cohort(tmp_path, tiny_subjects):
    """A NumPy integer (n_subjects read from a table, say) stopped the simulation at its
    very end: json could not write np.int64 into dataset_description.json."""
    expected = draw_participants(10, seed=3, accelerated_group_n=2)
    for number in (np.int64, float):
        assert draw_participants(number(10), seed=number(3),
                                 accelerated_group_n=number(2)).equals(expected)
    simulate_cohort(tmp_path / "mre", n_subjects=np.int64(10), seed=np.int64(3),
                    accelerated_group_n=np.int64(2), with_anatomy=np.bool_(True),
                    nan_probability=np.float64(0.1))
    parameters = json.loads((tmp_path / "mre" / "dataset_description.json").read_text())[
        "SimulationParameters"]
    assert parameters["n_subjects"] == 10 and parameters["seed"] == 3
    assert parameters["with_anatomy"] is True
    simulate_t1w_cohort(tmp_path / "t1w", n_subjects=np.int64(4), seed=np.int64(3))
    parameters = json.loads((tmp_path / "t1w" / "dataset_description.json").read_text())[
        "SimulationParameters"]
    assert parameters["seed"] == 3
    assert draw_t1w_participants(4.0, seed=3.0).equals(draw_t1w_participants(4, seed=3))


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


def test_the_seed_selects_the_demographics():
    first = draw_participants(20, seed=0, accelerated_group_n=4)
    assert first.equals(draw_participants(20, seed=0, accelerated_group_n=4))
    other = draw_participants(20, seed=1, accelerated_group_n=4)
    assert list(other["participant_id"]) == list(first["participant_id"])
    assert not np.array_equal(other["age"], first["age"])


def test_labels_number_each_study_from_one_and_do_not_follow_age():
    participants = draw_participants(311, seed=0, accelerated_group_n=3)
    t1w = draw_t1w_participants(8, seed=0)
    for table, prefix in ((participants, "sub-"), (t1w, "sub-pre")):
        for study, rows in table.groupby("study"):
            labels = rows["participant_id"].str.removeprefix(prefix)
            assert list(labels.str[-3:]) == [f"{n:03d}" for n in range(1, len(rows) + 1)], study
    # Ages are drawn per study in quantile order, then shuffled: a label says nothing of age.
    study1 = participants.loc[participants["study"] == "study1", "age"]
    assert not study1.is_monotonic_increasing and not study1.is_monotonic_decreasing
    assert abs(np.corrcoef(np.arange(len(study1)), study1)[0, 1]) < 0.5


def test_only_the_accelerated_group_carries_the_offset_and_it_is_older_and_balanced():
    participants = draw_participants(10, seed=0, accelerated_group_n=200,
                                     accelerated_ageing_years=-3.5)
    accelerated = participants["group"] == "accelerated"
    assert accelerated.sum() == 200
    assert (participants.loc[accelerated, "study"] == ACCELERATED_STUDY).all()
    assert (participants.loc[accelerated, "stiffness_age_offset_years"] == -3.5).all()
    assert (participants.loc[~accelerated, "stiffness_age_offset_years"] == 0.0).all()
    patients = participants[accelerated]
    # Middle-aged to older adults, 50:50 sex (the group is not in the paper's Table 2).
    assert 58 < patients["age"].mean() < 66 and patients["age"].between(18, 90).all()
    assert abs((patients["sex"] == "F").sum() - 100) <= 1


@pytest.mark.parametrize(("options", "named"), [
    ({"id_prefix": "café"}, "id_prefix='café'"), ({"seed": True}, "seed=True"),
    ({"n_subjects": True}, "n_subjects=True")])
def test_non_ascii_prefixes_and_booleans_are_refused(options, named):
    """BIDS labels are ASCII letters and digits; True is not a whole number of subjects."""
    with pytest.raises(ValueError, match=re.escape(named)):
        draw_participants(**{"n_subjects": 10, **options})


# ---- layout ------------------------------------------------------------------------------
def test_layout_and_participants(cohort):
    root, truth, _ = cohort
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "brainage.simulate"
    assert description["SimulationParameters"]["seed"] == 3
    assert description["SimulationParameters"]["maps"] == BOTH_MAPS
    participants = pd.read_csv(root / "participants.tsv", sep="\t", dtype={"study": str})
    assert list(participants.columns) == ["participant_id", "age", "sex", "study", "group"]
    assert set(participants["sex"]) <= {"F", "M"}
    assert list(participants["participant_id"]) == list(truth["participant_id"])
    # Ground truth never sits in a subject folder of the raw dataset.
    assert not list(root.glob("sub-*/**/*truth*"))
    assert list(truth.columns) == list(TRUTH_COLUMNS) + list(DAMPING_RATIO_TRUTH_COLUMNS)
    on_disk = pd.read_csv(root / "derivatives" / "simulation" / "truth.tsv", sep="\t")
    assert len(on_disk) == len(truth) and list(on_disk.columns) == list(truth.columns)
    described = json.loads((root / "derivatives" / "simulation" / "truth.json").read_text())
    assert list(described) == list(truth.columns)
    assert not list(root.parent.glob(".dataset.*")), "staging folder left behind"


def test_mre_maps_and_truth_tables_are_listed_in_bidsignore(cohort, t1w_cohort):
    """BIDS has no MRE datatype: the validator rejected the simulated dataset (an error
    for every stiffness and damping-ratio map) and the truth folder (truth.tsv/json)."""
    root = cohort[0]
    patterns = (root / ".bidsignore").read_text().split()

    def ignored(path: Path) -> bool:  # a pattern matches the file or a folder above it
        relative = path.relative_to(root)
        names = [relative.name] + [parent.as_posix() for parent in
                                   (relative, *relative.parents) if parent.name]
        return any(fnmatch.fnmatch(name, pattern) for pattern in patterns for name in names)

    maps = list(root.glob("sub-*/mre/*"))
    assert len(maps) == 2 * len(cohort[1]) and all(ignored(path) for path in maps)
    anatomy = list(root.glob("sub-*/anat/*"))
    assert len(anatomy) == len(cohort[1]) and not any(ignored(path) for path in anatomy)
    for dataset in (root, t1w_cohort[0]):
        truth = dataset / "derivatives" / "simulation"
        assert set((truth / ".bidsignore").read_text().split()) == {"truth.tsv", "truth.json"}


def test_bids_validator_accepts_the_simulated_datasets(cohort, t1w_cohort):
    for dataset in (cohort[0], t1w_cohort[0]):
        for folder in (dataset, dataset / "derivatives" / "simulation"):
            assert_bids_valid(folder)


def test_the_pipeline_reader_accepts_the_dataset(cohort):
    from brainage.inputs import read_participants

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



def test_method_md_states_the_studies_native_voxel_sizes():
    """docs/method.md section 8 names the range of the studies' native MRE voxel sizes."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    stated = re.search(r"native voxels of ([\d.]+)-([\d.]+) mm", " ".join(text.split()))
    assert stated, "docs/method.md no longer states the native voxel sizes"
    voxel_sizes = [STUDY_ACQUISITION[study].voxel_size_mm for study, *_ in STUDY_TABLE]
    assert (float(stated[1]), float(stated[2])) == (min(voxel_sizes), max(voxel_sizes))

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


def test_pose_rotates_x_first_then_scales_and_translates():
    """Documented: x_native = scale * Rz @ Ry @ Rx @ x_mni + t, right-handed rotations."""
    pose = simulate.pose_to_native_affine([90.0, 0.0, 90.0], [1.0, 2.0, 3.0], 2.0)
    # Rx(90) takes y to z, and Rz(90) leaves z; Rz first would take y to -x.
    assert np.allclose(pose @ [0, 1, 0, 1], [1, 2, 5, 1])
    # Rx(90) leaves x, Rz(90) takes it to y.
    assert np.allclose(pose @ [1, 0, 0, 1], [1, 4, 3, 1])
    assert np.allclose(pose @ [0, 0, 0, 1], [1, 2, 3, 1])


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


@pytest.mark.slow
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


def test_stiffness_age_in_the_truth_is_the_age_the_stiffness_was_simulated_at():
    """accelerated_ageing_years is any number (schema); truth.tsv's stiffness_age_years was
    rounded to 0.1 year, so with an offset of 8.25 years it was not age + offset, and
    damping_ratio_age_factor (documented as exp(slope / 100 * (stiffness_age_years - 30)))
    disagreed with it in the same row. Offsets of whole tenths write what they did."""
    subject = {"participant_id": "sub-pat001", "age": 60.3, "sex": "F",
               "study": ACCELERATED_STUDY, "group": "accelerated"}
    kwargs = dict(seed=0, id_prefix="", index=0, with_anatomy=False, nan_probability=0.0,
                  maps=BOTH_MAPS)
    for offset in (8.25, 8.0, 0.0):
        truth = simulate_subject(dict(subject, stiffness_age_offset_years=offset),
                                 **kwargs).truth
        assert truth["stiffness_age_years"] == pytest.approx(60.3 + offset, abs=1e-9)
        assert truth["damping_ratio_age_factor"] == pytest.approx(np.exp(
            DAMPING_RATIO_SLOPE_PERCENT_PER_YEAR / 100 * (truth["stiffness_age_years"] - 30)),
            rel=1e-12)
    assert repr(simulate_subject(dict(subject, stiffness_age_offset_years=8.0), **kwargs)
                .truth["stiffness_age_years"]) == "68.3"  # as before: 60.3 + 8.0 = 68.300...01


def _subject_at(age: float, **changes) -> dict:
    subject = {"participant_id": "sub-st1s001", "age": age, "sex": "M", "study": "study1",
               "group": "healthy", "stiffness_age_offset_years": 0.0}
    return dict(subject, **changes)


def test_stiffness_declines_faster_after_60_and_women_are_stiffer():
    kwargs = dict(seed=0, id_prefix="", index=0, with_anatomy=False, nan_probability=0.0)

    def mean_stiffness(**changes):
        return simulate_subject(_subject_at(30.0, **changes), **kwargs).truth[
            "mean_stiffness_kpa"]

    # Same anatomy and random streams: only the stiffness age changes (40-50 vs 70-80 years).
    middle = np.log(mean_stiffness(stiffness_age_offset_years=20.0)
                    / mean_stiffness(stiffness_age_offset_years=10.0))
    late = np.log(mean_stiffness(stiffness_age_offset_years=50.0)
                  / mean_stiffness(stiffness_age_offset_years=40.0))
    assert middle < 0 and 1.3 < late / middle < 1.7, "1.5 x faster after 60 (Lv 2020)"
    female = simulate_subject(_subject_at(30.0, sex="F"), **kwargs).truth
    male = simulate_subject(_subject_at(30.0), **kwargs).truth
    assert female["subject_stiffness_factor"] / male["subject_stiffness_factor"] \
        == pytest.approx(1.02)
    assert female["mean_stiffness_kpa"] / male["mean_stiffness_kpa"] == pytest.approx(
        1.02, abs=0.003)


def test_atrophy_starts_when_the_subjects_own_atrophy_age_passes_40_and_shrinks_the_mask():
    kwargs = dict(seed=0, id_prefix="", index=0, with_anatomy=False, nan_probability=0.0)
    offset, rate = draw_atrophy_course(0, "", ATROPHY_STREAM, 0, 0.0)
    assert offset != 0.0 and rate != 1.0  # this subject's own course
    young, thirties, old = (simulate_subject(_subject_at(age), **kwargs)
                            for age in (29.0 - offset, 39.0 - offset, 85.0))
    assert young.truth["atrophy_age_years"] == pytest.approx(29.0)
    assert old.truth["atrophy_rate_factor"] == rate
    assert np.array_equal(young.brain, thirties.brain), "no atrophy before an atrophy age of 40"
    for column in ("cortical_shrink_mm", "ventricle_dilation_mm", "brain_volume_ml",
                   "parenchyma_volume_ml"):
        assert young.truth[column] == thirties.truth[column], column
    assert young.truth["cortical_shrink_mm"] == 0.0
    assert old.truth["cortical_shrink_mm"] == pytest.approx(
        0.05 * (85.0 + offset - 40.0) * rate)
    # Same pose and grid: the surface retreats 2.25 mm by 85 years.
    assert old.brain.shape == young.brain.shape and not (old.brain & ~young.brain).any()
    assert old.truth["brain_volume_ml"] < 0.95 * young.truth["brain_volume_ml"]
    assert old.truth["parenchyma_volume_ml"] < 0.95 * young.truth["parenchyma_volume_ml"]


def test_brains_of_one_age_differ_so_anatomy_does_not_give_the_age():
    """Atrophy was a function of age alone: after 40 the brain volume gave a subject's age
    to 0.6 years (found by a review), a shortcut no real cohort offers. Each subject's
    course is its own; stiffness and pose of a seed do not depend on it."""
    kwargs = dict(seed=0, id_prefix="", with_anatomy=False, nan_probability=0.0)
    volumes = [simulate_subject(_subject_at(70.0), index=index, **kwargs)
               .truth["parenchyma_volume_ml"] for index in range(5)]
    assert np.std(volumes) > 20.0  # ml, against about 1 ml when age alone decided
    first = simulate_subject(_subject_at(70.0), index=0, **kwargs).truth
    atrophy_age, rate = draw_atrophy_course(0, "", ATROPHY_STREAM, 0, 70.0)
    assert (first["atrophy_age_years"], first["atrophy_rate_factor"]) == (atrophy_age, rate)


def test_subjects_have_random_streams_of_their_own():
    subject = _subject_at(30.0)
    poses = [simulate_subject(subject, seed=0, id_prefix="", index=index, with_anatomy=False,
                              nan_probability=0.0).truth["native_to_mni_affine"]
             for index in (0, 1)]
    assert poses[0] != poses[1]
    t1w_subject = draw_t1w_participants(4, seed=0).iloc[0].to_dict()
    t1w_poses = [simulate_t1w_subject(t1w_subject, seed=0, id_prefix="pre", index=index)
                 .truth["native_to_mni_affine"] for index in (0, 1)]
    assert t1w_poses[0] != t1w_poses[1]


def test_one_subject_maps_respect_slab_nans_grid_and_pose():
    """The fast tier's check of what the cohort tests check on a whole cohort."""
    from nilearn.datasets import load_mni152_brain_mask

    template = load_mni152_brain_mask(resolution=2)
    template_mask = template.get_fdata() > 0
    for index, study in enumerate(("study4", "study2", "study4")):
        subject = _subject_at(30.0, study=study)
        result = simulate_subject(subject, seed=1, id_prefix="", index=index,
                                  with_anatomy=False, nan_probability=1.0, maps=BOTH_MAPS)
        truth, stiffness = result.truth, result.maps["stiffness"]
        voxel_mm = STUDY_ACQUISITION[study].voxel_size_mm
        assert np.allclose(result.affine[:3, :3], np.diag([voxel_mm] * 3))
        nans = np.isnan(stiffness)
        assert 1 <= nans.sum() == truth["nan_count"] <= 10
        support = stiffness != 0  # NaN voxels included
        assert not (support & ~result.brain).any()
        slices = np.flatnonzero(support.any(axis=(0, 1)))
        assert (slices.min(), slices.max()) == (truth["slab_first_slice"],
                                                 truth["slab_last_slice"])
        assert support.sum() / result.brain.sum() == pytest.approx(truth["coverage_fraction"])
        assert truth["coverage_fraction"] < 1.0
        # The damping ratio comes from a stream of its own: the stiffness is as without it.
        alone = simulate_subject(subject, seed=1, id_prefix="", index=index,
                                 with_anatomy=False, nan_probability=1.0)
        assert np.array_equal(alone.maps["stiffness"], stiffness, equal_nan=True)
        if index == 0:  # ... and the T1w image does not change the damping ratio
            with_t1w = simulate_subject(subject, seed=1, id_prefix="", index=index,
                                        with_anatomy=True, nan_probability=1.0, maps=BOTH_MAPS)
            assert np.array_equal(with_t1w.maps["damping_ratio"], result.maps["damping_ratio"],
                                  equal_nan=True)
        # The native grid and the saved pose put the truth mask onto the template's.
        native_to_mni = np.array(json.loads(truth["native_to_mni_affine"]))
        mni_to_native_voxel = (np.linalg.inv(result.affine) @ np.linalg.inv(native_to_mni)
                               @ template.affine)
        resampled = ndimage.affine_transform(
            result.brain.astype(np.float32), mni_to_native_voxel[:3, :3],
            offset=mni_to_native_voxel[:3, 3], output_shape=template_mask.shape,
            order=1) > 0.5
        dice = 2 * (resampled & template_mask).sum() / (resampled.sum() + template_mask.sum())
        assert dice > 0.97, (study, dice)
        shift_mm = 2.0 * (np.array(ndimage.center_of_mass(resampled))
                          - ndimage.center_of_mass(template_mask))  # template voxels: 2 mm
        assert np.abs(shift_mm).max() < 0.5, (study, shift_mm)


# ---- determinism and writing -------------------------------------------------------------
def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(path.relative_to(root)): np.asanyarray(nib.load(str(path)).dataobj)
            for path in sorted(root.rglob("*.nii.gz"))}


@pytest.mark.slow
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
    # The default writes today's files: stiffness only, truth and description as before.
    assert not list((tmp_path / "a").rglob("*damping_ratio*"))
    truth = pd.read_csv(tmp_path / "a" / "derivatives/simulation/truth.tsv", sep="\t")
    assert list(truth.columns) == list(TRUTH_COLUMNS)
    description = json.loads((tmp_path / "a" / "dataset_description.json").read_text())
    assert "maps" not in description["SimulationParameters"]


def test_regenerating_a_subject_reproduces_its_files(cohort):
    root, truth, images = cohort
    participants = pd.read_csv(root / "participants.tsv", sep="\t", dtype={"study": str})
    index = 5
    subject = dict(participants.iloc[index], stiffness_age_offset_years=0.0)
    affine, maps, t1w, mask, _ = simulate_subject(
        subject, seed=3, id_prefix="", index=index, with_anatomy=True, nan_probability=0.5,
        maps=BOTH_MAPS)
    written = images[subject["participant_id"]]
    assert np.allclose(affine, written["stiffness_image"].affine, atol=1e-4)
    assert np.array_equal(maps["stiffness"], written["stiffness"], equal_nan=True)
    assert np.array_equal(maps["damping_ratio"], written["damping"], equal_nan=True)
    assert np.array_equal(t1w, written["t1w"]) and np.array_equal(mask, written["mask"])
    # Without the damping ratio, the stiffness, T1w and mask come out the same.
    alone = simulate_subject(subject, seed=3, id_prefix="", index=index, with_anatomy=True,
                             nan_probability=0.5)
    assert list(alone.maps) == ["stiffness"]
    assert np.array_equal(alone.maps["stiffness"], maps["stiffness"], equal_nan=True)
    assert np.array_equal(alone.t1w, t1w) and np.array_equal(alone.brain, mask)


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


def _tiny_subject(subject, **kwargs):
    """A fake 4x4x4 subject: for tests of the writing, not of the images."""
    data = np.zeros((4, 4, 4), np.float32)
    truth = {column: 0 for column in TRUTH_COLUMNS}
    truth["participant_id"] = subject["participant_id"]
    return SimulatedSubject(np.eye(4), {"stiffness": data}, None, data.astype(bool), truth)


def _tiny_t1w_subject(subject, **kwargs):
    """A fake 4x4x4 subject of the T1w-only cohort."""
    truth = {column: 0 for column in T1W_TRUTH_COLUMNS}
    truth["participant_id"] = subject["participant_id"]
    return SimulatedT1w(np.eye(4), np.zeros((4, 4, 4), np.int16),
                        np.zeros((4, 4, 4), bool), truth)


@pytest.fixture
def tiny_subjects(monkeypatch):
    """Both cohorts write tiny fake subjects: only the writing is under test."""
    monkeypatch.setattr(simulate_cohort_module, "simulate_subject", _tiny_subject)
    monkeypatch.setattr(t1w_cohort_module, "simulate_t1w_subject", _tiny_t1w_subject)


def test_overwrite_replaces_the_root(tmp_path, tiny_subjects):
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


def test_root_and_image_options_are_checked_before_anything_is_written(tmp_path,
                                                                       tiny_subjects):
    afile = tmp_path / "dataset"
    afile.write_text("mine")
    for write in (simulate_cohort, simulate_t1w_cohort):
        with pytest.raises(FileExistsError, match="not a folder"):
            write(afile, n_subjects=10, overwrite=True)
    assert afile.read_text() == "mine"
    for probability in (-0.1, 1.5):
        with pytest.raises(ValueError, match="nan_probability"):
            simulate_cohort(tmp_path / "mre", n_subjects=10, nan_probability=probability)
    for voxel_size_mm in (0.5, 4.5):
        with pytest.raises(ValueError, match=re.escape(f"voxel_size_mm={voxel_size_mm}")):
            simulate_t1w_cohort(tmp_path / "t1w", n_subjects=2, voxel_size_mm=voxel_size_mm)
    with pytest.raises(ValueError, match=re.escape("age_range_years=(50, 50)")):
        simulate_t1w_cohort(tmp_path / "t1w", n_subjects=2, age_range_years=(50, 50))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset"]


def test_images_carry_scanner_sform_and_qform_and_default_parameters_stay_out(
        tmp_path, tiny_subjects):
    simulate_cohort(tmp_path / "mre", n_subjects=10)
    image = nib.load(str(tmp_path / "mre" / "sub-st1s001" / "mre"
                         / "sub-st1s001_stiffness.nii.gz"))
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    # The default maps option stays out, so earlier datasets' descriptions are unchanged.
    description = json.loads((tmp_path / "mre" / "dataset_description.json").read_text())
    assert "maps" not in description["SimulationParameters"]


def test_a_root_behind_a_symbolic_link_is_written_where_the_link_points(tmp_path, monkeypatch,
                                                                        tiny_subjects):
    """A dataset root linked to scratch space failed after the whole simulation ('Not a
    directory' when empty); with overwrite the link was moved aside (left behind as
    .dataset.old-*), the dataset put in its place and the linked folder kept its old files.
    A root of "." failed the same way ('Device or resource busy')."""
    real = tmp_path / "scratch" / "dataset"
    real.mkdir(parents=True)
    link = tmp_path / "project" / "dataset"
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    simulate_cohort(link, n_subjects=10)
    assert link.is_symlink() and (real / "participants.tsv").is_file()
    (real / "stale.txt").write_text("old")
    simulate_t1w_cohort(link, n_subjects=3, overwrite=True)
    assert link.is_symlink() and not (real / "stale.txt").exists()
    assert len(pd.read_csv(real / "participants.tsv", sep="\t")) == 3
    assert [path.name for path in link.parent.iterdir()] == ["dataset"]
    assert [path.name for path in real.parent.iterdir()] == ["dataset"]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    simulate_cohort(".", n_subjects=10)
    assert (here / "participants.tsv").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["here", "project", "scratch"]


def test_a_new_simulation_removes_what_a_killed_one_left_beside_its_root(tmp_path,
                                                                         tiny_subjects):
    """A simulation killed while it wrote (Snakemake stopped, a job out of time) left its
    hidden staging folder, up to a whole dataset of images, beside the root; every further
    kill added one. A new simulation of that root removes them, and nothing else."""
    root = tmp_path / "dataset"
    stale = [tmp_path / ".dataset.staging-k3j_x9ab", tmp_path / ".dataset.old-0a1b2c3d"]
    kept = [tmp_path / ".dataset2.staging-k3j_x9ab", tmp_path / ".dataset.staging-mine",
            tmp_path / "notes"]
    for folder in stale + kept:
        (folder / "sub-st1s001").mkdir(parents=True)
        (folder / "sub-st1s001" / "image.nii.gz").write_bytes(b"x")
    simulate_cohort(root, n_subjects=10)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["dataset"] + [folder.name for folder in kept])
    stale[0].mkdir()
    simulate_t1w_cohort(root, n_subjects=2, overwrite=True)
    assert not stale[0].exists()


def test_cli_names_a_root_the_system_refuses_without_a_traceback(tmp_path, capsys,
                                                                  tiny_subjects):
    """A --root the system refuses (here: a name longer than a file name may be; an
    unwritable or full disk alike) gave a Python traceback, not the CLI's error line."""
    with pytest.raises(SystemExit) as exited:
        simulate.main(["--root", str(tmp_path / ("d" * 300)), "--n-subjects", "10"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("brainage.simulate: error: ") and "File name too long" in error
    # the failing path is a staging folder next to the root: the root and a remedy named
    assert re.search(r"could not write --root .*ddd: .*File name too long.*\. Choose a "
                     r"folder you can write to", error)


def test_cli_overwrites_only_an_earlier_simulation(tmp_path, capsys, tiny_subjects):
    """The refusal of a non-empty --root suggested --overwrite, which then replaced any
    folder as a whole: one wrong --root deleted a lab's own dataset."""
    mine = tmp_path / "my_study"
    (mine / "sub-01" / "mre").mkdir(parents=True)
    (mine / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\n")
    for flags in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exited:
            simulate.main(["--root", str(mine), "--n-subjects", "10", *flags])
        assert exited.value.code == 2
    assert re.search(r"--overwrite replaces only an earlier simulation, and .*my_study holds "
                     r"files the simulator did not write", capsys.readouterr().err)
    assert (mine / "participants.tsv").read_text().startswith("participant_id\tage\nsub-01")
    simulated = tmp_path / "simulated"
    simulate.main(["--root", str(simulated), "--n-subjects", "10", "--no-anatomy"])
    simulate.main(["--root", str(simulated), "--n-subjects", "10", "--seed", "1",
                   "--no-anatomy", "--overwrite"])
    assert json.loads((simulated / "dataset_description.json").read_text())[
        "SimulationParameters"]["seed"] == 1
    mine = simulated / "derivatives" / "brainage" / "predictions.tsv"  # predict run's advice
    mine.parent.mkdir()
    mine.write_text("my predictions\n")
    with pytest.raises(SystemExit):
        simulate.main(["--root", str(simulated), "--n-subjects", "10", "--seed", "2",
                       "--no-anatomy", "--overwrite"])
    assert re.search(rf"holds files the simulator did not write \(e\.g\. "
                     rf"{re.escape(str(mine))}\)", capsys.readouterr().err)
    assert mine.read_text() == "my predictions\n"


def test_cli_refuses_an_ageing_offset_without_an_accelerated_group(tmp_path, capsys,
                                                                     tiny_subjects):
    """--accelerated-ageing-years without --accelerated-group-n was accepted and ignored:
    the cohort had no accelerated group, silently. --help printed half a sentence
    ('... input layout (rules') under the program name __main__.py."""
    root = tmp_path / "dataset"
    for group in ([], ["--accelerated-group-n", "0"]):
        with pytest.raises(SystemExit):
            simulate.main(["--root", str(root), "--n-subjects", "10",
                           "--accelerated-ageing-years", "12", *group])
        assert "--accelerated-group-n" in capsys.readouterr().err
        assert not root.exists()
    simulate.main(["--root", str(root), "--n-subjects", "10", "--accelerated-group-n", "2",
                   "--accelerated-ageing-years", "12"])
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert (participants["group"] == "accelerated").sum() == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        simulate.main(["--help"])
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m brainage.simulate")
    assert "layout (rules" not in usage and "--t1w-only" in usage


# ---- reproducibility of earlier datasets -------------------------------------------------
#: Fingerprints of two subjects of the ``cohort`` fixture's options (seed 3, 20 healthy +
#: 4 accelerated, nan_probability 0.5), written by the simulator since each subject's atrophy
#: follows a course of its own (2026-12-05; before, commit 30ba0f7's simulator, whose
#: anatomy was a function of age). Sums and picked voxels, not a byte checksum: float32
#: arithmetic may differ in the last bit between CPUs, a changed random stream by far more.
EARLIER_SIMULATION = {
    "sub-st1s001": {
        "shape": (105, 127, 123), "nan_flat": [1272737], "nonzero": 198978,
        "sum": 535086.3528664112, "sum_sq": 1469792.8832469308,
        "picks": [475190, 660699, 831536, 993517, 1176906],
        "values": [2.428690195083618, 2.8920400142669678, 2.5646238327026367,
                   2.705050230026245, 1.8635754585266113],
        "t1w_sum": 261125593, "mask_count": 213089},
    "sub-pats004": {
        "shape": (89, 109, 101),
        "nan_flat": [300638, 314777, 432013, 457805, 492309, 590002, 597752, 665233, 687881],
        "nonzero": 112126, "sum": 221680.86098706722, "sum_sq": 445649.5528638656,
        "picks": [291336, 398399, 490702, 586569, 688251],
        "values": [2.0554864406585693, 2.049612045288086, 1.961121678352356,
                   2.2500879764556885, 2.008157730102539],
        "t1w_sum": 156397102, "mask_count": 114910},
}


@pytest.mark.parametrize("participant_id", sorted(EARLIER_SIMULATION))
def test_stiffness_t1w_and_anatomy_are_those_of_the_earlier_simulator(cohort, participant_id):
    # The fixture also writes damping ratios: they must not disturb the other streams.
    expected = EARLIER_SIMULATION[participant_id]
    subject = cohort[2][participant_id]
    stiffness = subject["stiffness"]
    finite = np.isfinite(stiffness)
    assert stiffness.shape == expected["shape"]
    assert np.flatnonzero(~finite).tolist() == expected["nan_flat"]
    assert int((finite & (stiffness != 0)).sum()) == expected["nonzero"]
    values = stiffness[finite].astype(np.float64)
    assert np.isclose(values.sum(), expected["sum"], rtol=1e-6)
    assert np.isclose((values ** 2).sum(), expected["sum_sq"], rtol=1e-6)
    assert np.allclose(stiffness.ravel()[expected["picks"]], expected["values"], rtol=1e-6)
    assert abs(int(subject["t1w"].astype(np.int64).sum()) - expected["t1w_sum"]) <= 100
    assert abs(int(subject["mask"].sum()) - expected["mask_count"]) <= 2


# ---- damping ratio -------------------------------------------------------------------------
def test_damping_ratio_shares_grid_support_and_nans_and_stays_within_0_1(cohort):
    _, truth, images = cohort
    low, high = DAMPING_RATIO_LIMITS
    assert 0.0 < low and high <= 1.0
    for row in truth.itertuples():
        subject = images[row.participant_id]
        damping, stiffness, mask = subject["damping"], subject["stiffness"], subject["mask"]
        assert subject["damping_image"].get_data_dtype() == np.float32
        assert damping.shape == stiffness.shape
        assert np.allclose(subject["damping_image"].affine, subject["stiffness_image"].affine)
        assert np.array_equal(np.isnan(damping), np.isnan(stiffness))
        assert np.array_equal(damping != 0, stiffness != 0), "same slab and brain"
        assert (damping[~mask] == 0).all(), "outside the brain exactly 0"
        values = damping[np.isfinite(damping) & (damping != 0)]
        assert values.min() >= low and values.max() <= high
        assert 0.15 < np.median(values) < 0.35, "healthy brain: about 0.1-0.3"
        assert np.isclose(values.mean(), row.mean_damping_ratio, rtol=1e-4)


def test_damping_ratio_differs_between_grey_and_white_matter(cohort):
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    _, truth, images = cohort
    grey_image = load_mni152_gm_template(resolution=2)
    grey = grey_image.get_fdata() > 0.7
    white = load_mni152_wm_template(resolution=2).get_fdata() > 0.9
    for row in truth[truth["age"] < 40].iloc[:3].itertuples():
        native = images[row.participant_id]["damping_image"]
        native_to_mni = np.array(json.loads(row.native_to_mni_affine))
        mni_to_native_voxel = (np.linalg.inv(native.affine) @ np.linalg.inv(native_to_mni)
                               @ grey_image.affine)
        damping = np.nan_to_num(images[row.participant_id]["damping"])
        resampled = ndimage.affine_transform(
            damping, mni_to_native_voxel[:3, :3], offset=mni_to_native_voxel[:3, 3],
            output_shape=grey.shape, order=0)
        covered = resampled > 0
        ratio = np.median(resampled[white & covered]) / np.median(resampled[grey & covered])
        # White matter 0.25 against cortex 0.19 at 30 years, blurred by two resamplings.
        assert 1.08 < ratio < 1.35, (row.participant_id, ratio)


def test_damping_ratio_age_effect_is_present_but_weaker_than_stiffness(cohort40):
    _, truth = cohort40
    age = truth["age"]
    stiffness_r = np.corrcoef(age, truth["mean_stiffness_kpa"])[0, 1]
    damping_r = np.corrcoef(age, truth["mean_damping_ratio"])[0, 1]
    assert stiffness_r < -0.7
    assert damping_r > 0.2, "damping ratio rises slightly with age (Delgorio 2021)"
    assert abs(damping_r) < abs(stiffness_r) - 0.2
    expected = np.exp(DAMPING_RATIO_SLOPE_PERCENT_PER_YEAR / 100 * (truth["stiffness_age_years"]
                                                                    - 30.0))
    assert np.allclose(truth["damping_ratio_age_factor"], expected)


def test_the_same_subject_ages_less_in_damping_ratio_than_in_stiffness():
    participants = draw_participants(10, seed=0)
    subject = participants.iloc[0].to_dict()
    kwargs = dict(seed=0, id_prefix="", index=0, with_anatomy=False, nan_probability=0.0,
                  maps=BOTH_MAPS)
    young = simulate_subject(dict(subject, stiffness_age_offset_years=0.0), **kwargs)
    old = simulate_subject(dict(subject, stiffness_age_offset_years=30.0), **kwargs)
    stiffness_ratio = old.truth["mean_stiffness_kpa"] / young.truth["mean_stiffness_kpa"]
    damping_ratio = old.truth["mean_damping_ratio"] / young.truth["mean_damping_ratio"]
    # 30 years: exp(0.0015 * 30) = +4.6 % against -12...-19 % of stiffness.
    assert 1.03 < damping_ratio < 1.06 and stiffness_ratio < 0.9
    assert abs(np.log(damping_ratio)) < abs(np.log(stiffness_ratio)) / 2


def test_damping_ratio_has_site_offsets_of_its_own():
    # study1 and study3 share the voxel size, so one subject lands on the same grid.
    subject = dict(draw_participants(10, seed=0).iloc[0].to_dict(), study="study1")
    kwargs = dict(seed=0, id_prefix="", index=0, with_anatomy=False, nan_probability=0.0,
                  maps=BOTH_MAPS)
    first = simulate_subject(subject, **kwargs)
    third = simulate_subject(dict(subject, study="study3"), **kwargs)
    both = (first.maps["stiffness"] != 0) & (third.maps["stiffness"] != 0)

    def mean_ratio(name):
        return third.maps[name][both].mean() / first.maps[name][both].mean()

    sites = STUDY_ACQUISITION["study3"], STUDY_ACQUISITION["study1"]
    assert sites[0].damping_ratio_factor != sites[1].damping_ratio_factor
    assert np.isclose(mean_ratio("damping_ratio"),
                      sites[0].damping_ratio_factor / sites[1].damping_ratio_factor, atol=0.01)
    assert np.isclose(mean_ratio("stiffness"),
                      sites[0].stiffness_factor / sites[1].stiffness_factor, atol=0.01)


def test_maps_option_is_checked_and_stays_out_of_default_params():
    for wrong in (["damping_ratio"], ["T1w"], ["stiffness", "stiffness"]):
        with pytest.raises(ValueError, match="stiffness"):
            simulated_participants(n_subjects=10, maps=wrong)
    section = {"enabled": True, "cohort": "demo", "n_subjects": 10, "seed": 1,
               "maps": ["stiffness"]}
    assert simulation_options(section) == {"n_subjects": 10, "seed": 1}
    assert simulation_options(dict(section, maps=BOTH_MAPS))["maps"] == BOTH_MAPS
    planned = simulated_participants(n_subjects=10, seed=1, id_prefix="new", maps=BOTH_MAPS)
    assert planned.equals(draw_participants(10, seed=1, id_prefix="new"))
    # The workflow plans subjects with every simulate_cohort option: the two stay in step.
    options = dict(inspect.signature(simulate_cohort).parameters)
    del options["root"], options["overwrite"]
    assert options == dict(inspect.signature(simulated_participants).parameters)


# ---- T1w-only cohort ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def t1w_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretraining") / "dataset"
    truth = simulate_t1w_cohort(root, n_subjects=8, seed=0)
    return root, truth


def test_t1w_cohort_layout_has_no_mre_maps(t1w_cohort, cohort):
    root, truth = t1w_cohort
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex", "study"]
    assert list(participants["participant_id"]) == list(truth["participant_id"])
    assert participants["participant_id"].str.fullmatch(r"sub-pre[A-Za-z0-9]+").all()
    assert set(participants["study"]) == set(T1W_SITES)
    assert not list(root.rglob("mre")) and not list(root.rglob("*stiffness*"))
    subjects = sorted(path.name for path in root.glob("sub-*"))
    assert subjects == sorted(participants["participant_id"])
    for participant_id in participants["participant_id"]:
        assert [path.name for path in (root / participant_id).rglob("*") if path.is_file()] \
            == [f"{participant_id}_T1w.nii.gz"]
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["SimulationParameters"]["cohort"] == "T1w-only"
    assert list(truth.columns) == list(T1W_TRUTH_COLUMNS)
    # Own subjects: no id shared with an MRE cohort, even one with the same prefix.
    mre_ids = set(cohort[1]["participant_id"]) | set(
        draw_participants(311, id_prefix="pre", accelerated_group_n=20)["participant_id"])
    assert not mre_ids & set(participants["participant_id"])


def test_t1w_cohort_images_voxel_size_and_ages(t1w_cohort):
    root, truth = t1w_cohort
    for row in truth.itertuples():
        image, t1w = _load(root / row.participant_id / "anat" / f"{row.participant_id}_T1w.nii.gz")
        mask_image, mask = _load(root / "derivatives" / "simulation" / row.participant_id
                                 / f"{row.participant_id}_desc-truth_mask.nii.gz")
        assert image.get_data_dtype() == np.int16 and t1w.shape == mask.shape
        assert np.allclose(image.header.get_zooms(), 2.0)
        assert np.allclose(image.affine, mask_image.affine)
        inside = np.median(t1w[mask.astype(bool)])
        assert inside > 5 * np.median(t1w[0]), "brain well above background noise"
    wide = draw_t1w_participants(40, seed=1)
    assert wide["age"].between(8, 85).all() and wide["age"].min() < 15 \
        and wide["age"].max() > 78
    assert abs((wide["sex"] == "F").mean() - 0.5) <= 0.05
    assert wide["study"].value_counts().tolist() == [10, 10, 10, 10]
    # The atrophy model: less parenchyma in older brains (nothing before 40 years).
    older = truth[truth["age"] > 40]
    assert np.corrcoef(older["age"], older["parenchyma_volume_ml"])[0, 1] < -0.8
    with pytest.raises(ValueError, match="voxel_size_mm"):
        simulate_t1w_cohort(root.parent / "fine", n_subjects=2, voxel_size_mm=0.5)
    with pytest.raises(ValueError, match="age_range_years"):
        draw_t1w_participants(4, age_range_years=(85, 8))


@pytest.mark.slow
def test_t1w_ages_as_written_are_ages_the_pipeline_reads(tmp_path, tiny_subjects):
    """Ages are written to 0.1 year: --min-age 0.01 wrote ages of 0.0 and --max-age 119.99
    ages of 120.0, and the pipeline's reader refused the dataset the simulator had just
    written (ages lie strictly between 0 and 120). Such a range is refused by its name."""
    from brainage.inputs import AGE_RANGE_YEARS, read_participants

    for age_range in ((0.01, 2.0), (100.0, 119.99)):
        with pytest.raises(ValueError, match=re.escape(f"age_range_years={age_range}")):
            draw_t1w_participants(400, age_range_years=age_range)
    for age_range in ((0.1, 2.0), (100.0, 119.9)):
        root = tmp_path / f"from{age_range[0]}"
        simulate_t1w_cohort(root, n_subjects=400, age_range_years=age_range)
        ages = read_participants(root, ("T1w",))["age"]
        assert ages.between(*age_range).all()
        assert (AGE_RANGE_YEARS[0] < ages).all() and (ages < AGE_RANGE_YEARS[1]).all()


def test_t1w_sites_scale_intensities():
    subject = dict(draw_t1w_participants(4, seed=0).iloc[0].to_dict(), study="t1site1")
    reference = simulate_t1w_subject(subject, seed=0, id_prefix="pre", index=0)
    brighter = simulate_t1w_subject(dict(subject, study="t1site3"), seed=0, id_prefix="pre",
                                    index=0)
    brain = reference.brain
    assert np.array_equal(brain, brighter.brain), "the site changes intensities, not anatomy"
    ratio = np.median(brighter.t1w[brain]) / np.median(reference.t1w[brain])
    # Gain 1.25, contrast exponent 0.9 (brightens tissue below 1.0 a little more).
    assert 1.2 < ratio < 1.4


@pytest.mark.slow
def test_t1w_cohort_is_reproducible_by_seed_and_cli(tmp_path, t1w_cohort):
    simulate.main(["--root", str(tmp_path / "cli"), "--t1w-only", "--n-subjects", "8",
                   "--seed", "0"])
    first, second = _arrays(t1w_cohort[0]), _arrays(tmp_path / "cli")
    assert first.keys() == second.keys() and len(first) == 16
    for name in first:
        assert np.array_equal(first[name], second[name]), name
    for table in ("participants.tsv", "derivatives/simulation/truth.tsv"):
        assert (t1w_cohort[0] / table).read_bytes() == (tmp_path / "cli" / table).read_bytes()
    other = draw_t1w_participants(8, seed=1)
    assert not np.array_equal(other["age"], t1w_cohort[1]["age"])
    for wrong in (["--maps", "stiffness"], ["--accelerated-group-n", "2"]):
        with pytest.raises(SystemExit):
            simulate.main(["--root", str(tmp_path / "x"), "--t1w-only", *wrong])
    with pytest.raises(SystemExit):
        simulate.main(["--root", str(tmp_path / "x"), "--voxel-size-mm", "2"])
    assert not (tmp_path / "x").exists()


def test_cli_names_the_age_options_it_refuses(tmp_path, capsys):
    """--min-age 90 (above the default oldest age, 85) was refused as
    'age_range_years=(90.0, 85.0) ...', an option the command line does not have."""
    with pytest.raises(SystemExit):
        simulate.main(["--root", str(tmp_path / "x"), "--t1w-only", "--min-age", "90"])
    error = capsys.readouterr().err
    assert "--min-age 90.0 --max-age 85.0" in error and "age_range_years" not in error
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("options", "typed"), [
    (["--n-subjects", "5"], "--n-subjects 5 is too small"),
    (["--seed", "-1"], "--seed -1 must be a whole number >= 0"),
    (["--accelerated-group-n", "-1"], "--accelerated-group-n -1 must be a whole number"),
    (["--accelerated-group-n", "2", "--accelerated-ageing-years", "nan"],
     "--accelerated-ageing-years nan must be a finite number of years"),
    (["--id-prefix", "a-b"], "--id-prefix a-b must be letters and digits only"),
    (["--maps", "damping_ratio"], "--maps damping_ratio: give each MRE map once"),
    (["--t1w-only", "--n-subjects", "0"], "--n-subjects 0 must be a whole number >= 1"),
    (["--t1w-only", "--seed", "-2"], "--seed -2 must be a whole number >= 0"),
    (["--t1w-only", "--id-prefix", "x_y"], "--id-prefix x_y must be letters and digits only"),
    (["--t1w-only", "--voxel-size-mm", "0.5"], "--voxel-size-mm 0.5 must be within"),
    (["--t1w-only", "--min-age", "90"], "--min-age 90.0 --max-age 85.0: "),
])
def test_cli_errors_name_the_flags_typed(tmp_path, capsys, options, typed):
    """The CLI printed the library's message for Python callers, naming its arguments
    ('n_subjects=5 is too small ... use n_subjects >= 10'): no flag a CLI user can find."""
    root = tmp_path / "x"
    with pytest.raises(SystemExit) as exited:
        simulate.main(["--root", str(root), *options])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"brainage.simulate: error: {typed}"), error
    assert not re.search(r"[a-z]=|age_range_years|voxel_size_mm", error), error
    assert not root.exists()


def test_library_errors_name_the_python_arguments():
    """Python callers (and config dataset.simulate, whose keys are the same) still see the
    arguments by name."""
    with pytest.raises(ValueError, match=r"^n_subjects=5 is too small"):
        draw_participants(5)
    with pytest.raises(ValueError, match=r"^seed=-1 must be a whole number >= 0"):
        draw_participants(10, seed=-1)
    with pytest.raises(ValueError, match=r"^id_prefix='a-b' must be letters and digits"):
        draw_participants(10, id_prefix="a-b")
    with pytest.raises(ValueError, match=re.escape("maps=['damping_ratio']: give each MRE map "
                                                   "once") + r".*e\.g\. maps=\['stiffness', "
                                                              r"'damping_ratio'\]"):
        check_maps(["damping_ratio"])
    with pytest.raises(ValueError, match=r"^n_subjects=0 must be a whole number >= 1"):
        draw_t1w_participants(0)
    with pytest.raises(ValueError, match=re.escape("age_range_years=(90.0, 85.0)")):
        draw_t1w_participants(4, age_range_years=(90.0, 85.0))


@pytest.mark.parametrize("acl", [False, True], ids=["umask", "default ACL"])
def test_a_simulated_dataset_folder_gets_the_permissions_of_a_plain_folder(tmp_path, acl):
    """The dataset was staged in a tempfile.mkdtemp folder (0700) given 0777 less the umask:
    under a shared folder's default ACL (group rwx, others nothing) it became readable by
    every user and not writable by the group."""
    import stat

    from brainage.simulate.writing import staged_dataset

    folder, expected = shared_folder(tmp_path, acl)
    with staged_dataset(folder / "dataset") as staging:
        (staging / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\n")
    assert oct(stat.S_IMODE((folder / "dataset").stat().st_mode)) == oct(expected)
    assert (folder / "dataset" / "participants.tsv").read_text().startswith("participant_id")


@pytest.mark.parametrize(("options", "expected"), [([], 60), (["--t1w-only"], 40)])
def test_the_cli_draws_as_many_subjects_as_the_api_by_default(tmp_path, tiny_subjects, options,
                                                              expected):
    """--n-subjects defaulted to 60 for a T1w-only cohort too, whose API default is 40."""
    simulate.main(["--root", str(tmp_path / "cli"), *options])
    assert len(pd.read_csv(tmp_path / "cli" / "participants.tsv", sep="\t")) == expected


@pytest.mark.slow
def test_the_same_seed_gives_the_same_bytes_whatever_the_blas_threads(tmp_path):
    """OpenBLAS splits a product's sums by its thread count: a simulation from the command
    line (every core) differed from the rule's (one thread) in the last bit of a few
    voxels of 16 of the demo's 80 maps."""
    import os
    import subprocess
    import sys

    roots = {}
    for threads in ("1", "2"):
        roots[threads] = tmp_path / f"threads-{threads}"
        subprocess.run([sys.executable, "-m", "brainage.simulate", "--root", str(roots[threads]),
                        "--n-subjects", "10", "--seed", "3", "--maps", "stiffness",
                        "damping_ratio", "--no-anatomy"], check=True, timeout=300,
                       env={**os.environ, "OPENBLAS_NUM_THREADS": threads,
                            "OMP_NUM_THREADS": threads,
                            "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "workflow")})
    maps = sorted(path.relative_to(roots["1"]) for path in roots["1"].rglob("*.nii.gz"))
    assert len(maps) >= 20
    different = [path for path in maps
                 if (roots["1"] / path).read_bytes() != (roots["2"] / path).read_bytes()]
    assert not different, different
