"""A simulated T1w-only cohort, for pretraining the encoder before it is fine-tuned on
stiffness (rule ``simulate_pretrain_cohort_<run>`` for a pretraining run whose
``source.kind`` is ``simulate``; outside Snakemake :func:`simulate_t1w_cohort`, or ``python -m
brainage.simulate --t1w-only``).

Its own subjects: labels ``sub-<prefix>ts<site>s<NNN>`` (default prefix ``pre``), which no
MRE cohort label can equal when both use the same prefix (MRE codes are ``st<N>`` and
``pat``), and random streams of their own. Ages are spread evenly over a wide range
(default 8-85 years, like OpenBHB), over four sites that differ in intensity scaling,
grey/white contrast, noise and bias field. The anatomy is the MRE cohort's: the atrophy
model of :mod:`brainage.simulate.anatomy` (nothing before 40 years, so children and young
adults share the young-adult anatomy; brain development is not modelled), posed at a
random rotation, translation and head size, on an isotropic grid of its own voxel size
(default 2 mm, so it preprocesses as fast as the MRE cohort's T1w images).

Layout (``root``)::

    dataset_description.json                  BIDS raw, SimulationParameters
    participants.tsv / participants.json      participant_id, age, sex, study
    sub-<label>/anat/sub-<label>_T1w.nii.gz   int16, arbitrary units, no mre folder
    derivatives/simulation/truth.tsv|json     one row per subject (T1W_TRUTH_COLUMNS)
    derivatives/simulation/.bidsignore        truth.tsv and truth.json
    derivatives/simulation/sub-<label>/sub-<label>_desc-truth_mask.nii.gz
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from brainage.simulate.anatomy import (
    ATROPHY_TRUTH_COLUMNS,
    POSE_TRUTH_COLUMNS,
    _atrophy,
    _draw_pose,
    _parenchyma_volume_ml,
    _pose_truth,
    _t1w_image,
    _template_anatomy,
    _truth_mask,
    draw_atrophy_course,
)
from brainage.simulate.demographics import (
    OptionError,
    _check_prefix,
    check_whole_number,
    seed_sequence,
)
from brainage.simulate.writing import (
    TRUTH_BIDS_IGNORE,
    check_root,
    save_nifti,
    staged_dataset,
    write_bidsignore,
    write_json,
)

LOGGER = logging.getLogger(__name__)

T1W_ID_PREFIX = "pre"
T1W_VOXEL_SIZE_MM = 2.0
T1W_AGE_RANGE_YEARS = (8.0, 85.0)
#: Bounds of an age range: ages are written to 0.1 year, and the pipeline reads only ages
#: strictly between 0 and 120 years (brainage.inputs.AGE_RANGE_YEARS), so a youngest age
#: below 0.1 could be written as 0.0 and an oldest above 119.9 as 120.0.
AGE_RANGE_LIMITS_YEARS = (0.1, 119.9)
#: Finer grids cost memory and time as the cube of the voxel count; coarser ones lose
#: the cortex.
VOXEL_SIZE_LIMITS_MM = (1.0, 4.0)
#: Relative sd of a subject's intensity gain (coil loading, receiver gain).
SUBJECT_GAIN_SD = 0.05
# Random streams (spawn keys) of this cohort; the MRE cohort uses 0, 1, 2 and 5.
_DEMOGRAPHICS_STREAM = 3
_SUBJECT_STREAM = 4
_ATROPHY_STREAM = 6


@dataclass(frozen=True)
class T1wSite:
    """What a site's scanner does to the T1w image.

    Attributes
    ----------
    intensity_scale : float
        Multiplicative gain of signal and noise (arbitrary units).
    contrast_exponent : float
        Power applied to the noiseless intensities (white matter ~0.88, grey ~0.6, CSF
        0.25 before scaling): above 1 a stronger grey/white contrast.
    noise_sd : float
        Rician noise sd relative to white matter.
    bias_sd : float
        Sd of each Legendre coefficient of the smooth bias field (log scale).
    """

    intensity_scale: float
    contrast_exponent: float
    noise_sd: float
    bias_sd: float


#: Multi-site heterogeneity as in pooled T1w sets (OpenBHB pools 60+ sites): simulation
#: choices, not measured values.
T1W_SITES = {
    "t1site1": T1wSite(1.00, 1.00, 0.020, 0.08),
    "t1site2": T1wSite(0.80, 1.10, 0.030, 0.12),
    "t1site3": T1wSite(1.25, 0.90, 0.015, 0.06),
    "t1site4": T1wSite(0.90, 1.05, 0.025, 0.10),
}
_SITE_CODES = {"t1site1": "ts1", "t1site2": "ts2", "t1site3": "ts3", "t1site4": "ts4"}

T1W_TRUTH_COLUMNS = {
    "participant_id": "sub-<label>, as in participants.tsv",
    "study": "site name",
    "age": "chronological age (years); drives the anatomy (atrophy after 40 years)",
    "sex": "F or M",
    **POSE_TRUTH_COLUMNS,
    **ATROPHY_TRUTH_COLUMNS,
    "site_intensity_scale": "site's multiplicative intensity gain",
    "site_contrast_exponent": "site's contrast exponent",
    "subject_gain": "subject's multiplicative intensity gain",
}

_PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "subject label, sub-<letters and digits>"},
    "age": {"Description": "age at the T1w scan", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "study": {"Description": "site (scanner and protocol) the subject was scanned at"},
}


class SimulatedT1w(NamedTuple):
    """Arrays (native grid) and ground truth of one T1w-only subject."""

    affine: np.ndarray   # 4x4 native voxel -> native world mm
    t1w: np.ndarray      # int16, arbitrary units
    brain: np.ndarray    # bool truth mask
    truth: dict          # one row of truth.tsv (T1W_TRUTH_COLUMNS)


def _check_age_range(age_range_years) -> tuple[float, float]:
    youngest, oldest = (float(age) for age in age_range_years)
    low, high = AGE_RANGE_LIMITS_YEARS
    if not low <= youngest < oldest <= high:
        raise OptionError(f"{{given}}: the youngest and oldest age (years) must be {low} <= "
                          f"youngest < oldest <= {high} (ages are written to 0.1 year, and "
                          f"the pipeline reads ages between 0 and 120), e.g. {{example}}.",
                          given=("age_range_years", tuple(age_range_years)),
                          example=("age_range_years", (8, 85)))
    return youngest, oldest


def _check_voxel_size(voxel_size_mm) -> float:
    low_mm, high_mm = VOXEL_SIZE_LIMITS_MM
    if not low_mm <= float(voxel_size_mm) <= high_mm:
        raise OptionError(f"{{given}} must be within {low_mm}-{high_mm} mm (2 mm preprocesses "
                          f"fast; finer grids cost time and memory).",
                          given=("voxel_size_mm", voxel_size_mm))
    return float(voxel_size_mm)


#: Subjects of a T1w-only cohort unless told otherwise (the API's and the CLI's default).
T1W_N_SUBJECTS = 40


def draw_t1w_participants(n_subjects: int = T1W_N_SUBJECTS, *, seed: int = 0,
                          id_prefix: str = T1W_ID_PREFIX,
                          age_range_years=T1W_AGE_RANGE_YEARS) -> pd.DataFrame:
    """Draw the T1w-only cohort's demographics (no images).

    Ages are stratified over the range (each subject a random point in the middle half of
    its own 1/n of the range), so even a few subjects span it; sexes 50:50; sites as even
    as the count allows, assigned at random.

    Parameters
    ----------
    n_subjects : int
        Subjects (at least 1), spread over the 4 sites of :data:`T1W_SITES`.
    seed : int
        Random seed (>= 0); with ``id_prefix`` it selects the cohort.
    id_prefix : str
        Letters and digits before every label (``sub-<prefix>ts1s001``).
    age_range_years : (float, float)
        Youngest and oldest age (years).

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``age`` (years, 1 decimal), ``sex`` (``F``/``M``), ``study``
        (site), ordered by site and label.
    """
    _check_prefix(id_prefix)
    youngest, oldest = _check_age_range(age_range_years)
    n_subjects = check_whole_number("n_subjects", n_subjects, minimum=1)
    seed = check_whole_number("seed", seed)
    rng = np.random.default_rng(seed_sequence(seed, id_prefix, _DEMOGRAPHICS_STREAM))
    quantiles = (np.arange(n_subjects) + rng.uniform(0.25, 0.75, size=n_subjects)) / n_subjects
    ages = np.round(rng.permutation(youngest + quantiles * (oldest - youngest)), 1)
    n_female = int(np.floor(n_subjects / 2 + rng.uniform()))
    sexes = rng.permutation(np.array(["F"] * n_female + ["M"] * (n_subjects - n_female)))
    sites = rng.permutation(np.resize(np.array(list(T1W_SITES)), n_subjects))
    table = pd.DataFrame({"age": ages, "sex": sexes, "study": sites})
    table["site_order"] = table["study"].map({site: i for i, site in enumerate(T1W_SITES)})
    table = table.sort_values("site_order", kind="stable").reset_index(drop=True)
    table.insert(0, "participant_id", [
        f"sub-{id_prefix}{_SITE_CODES[site]}s{number:03d}"
        for site, number in zip(table["study"], table.groupby("study").cumcount() + 1)])
    return table.drop(columns="site_order")


def simulate_t1w_subject(subject: dict, *, seed: int, id_prefix: str, index: int,
                         voxel_size_mm: float = T1W_VOXEL_SIZE_MM) -> SimulatedT1w:
    """The T1w image, truth mask and ground truth of one subject of the T1w-only cohort.

    Parameters
    ----------
    subject : dict
        One row of :func:`draw_t1w_participants` (age in years, sex, study).
    seed, id_prefix, index : int, str, int
        Select the subject's own random stream.
    voxel_size_mm : float
        Isotropic native voxel size (mm).

    Returns
    -------
    SimulatedT1w
        ``(affine 4x4, t1w int16, truth mask bool, truth dict)`` on one native grid.
    """
    anatomy = _template_anatomy()
    rng = np.random.default_rng(seed_sequence(seed, id_prefix, _SUBJECT_STREAM, index))
    site = T1W_SITES[subject["study"]]
    age = float(subject["age"])
    atrophy = _atrophy(anatomy, *draw_atrophy_course(seed, id_prefix, _ATROPHY_STREAM, index,
                                                     age))
    pose = _draw_pose(rng, anatomy, float(voxel_size_mm))
    subject_gain = float(rng.lognormal(0.0, SUBJECT_GAIN_SD))
    brain, _ = _truth_mask(anatomy, pose, atrophy.shrink_mm)
    t1w = _t1w_image(rng, anatomy, atrophy, pose, bias_sd=site.bias_sd,
                     noise_sd=site.noise_sd, contrast_exponent=site.contrast_exponent,
                     gain=site.intensity_scale * subject_gain)
    truth = {
        "participant_id": subject["participant_id"], "study": subject["study"], "age": age,
        "sex": subject["sex"], **_pose_truth(pose), "voxel_size_mm": float(voxel_size_mm),
        "shape": json.dumps(list(pose.shape)),
        **atrophy.truth(),
        "brain_volume_ml": float(brain.sum() * float(voxel_size_mm) ** 3 / 1000.0),
        "parenchyma_volume_ml": _parenchyma_volume_ml(anatomy, atrophy),
        "site_intensity_scale": site.intensity_scale,
        "site_contrast_exponent": site.contrast_exponent, "subject_gain": subject_gain,
    }
    return SimulatedT1w(pose.native_affine, t1w, brain, truth)


def simulate_t1w_cohort(root: str | Path, *, n_subjects: int = T1W_N_SUBJECTS, seed: int = 0,
                        id_prefix: str = T1W_ID_PREFIX,
                        voxel_size_mm: float = T1W_VOXEL_SIZE_MM,
                        age_range_years=T1W_AGE_RANGE_YEARS,
                        overwrite: bool = False) -> pd.DataFrame:
    """Write a simulated T1w-only cohort (pretraining) to ``root``; layout in the module
    docstring. Written to a staging folder and renamed into place, like the MRE cohort.

    A function of its own rather than an MRE-cohort option (``maps: [T1w]``): its subjects,
    ages, sites, grid and ground truth all differ from the MRE cohort's, and its dataset
    has no stiffness map, so it is not a valid input of the MRE pipeline (dataset.root);
    ``simulate_cohort``'s ``maps`` keeps meaning "which MRE maps".

    Parameters
    ----------
    root : str or Path
        Dataset folder to create; it may exist only if empty, unless ``overwrite``.
    n_subjects : int
        Subjects, over 4 sites (at least 1).
    seed : int
        Random seed (>= 0); same arguments give identical files (on one machine).
    id_prefix : str
        Letters/digits before every label (default ``pre``).
    voxel_size_mm : float
        Isotropic voxel size of the T1w images (mm), 1-4; default 2.
    age_range_years : (float, float)
        Youngest and oldest age (years); default (8, 85).
    overwrite : bool
        Replace an existing non-empty ``root``.

    Returns
    -------
    pandas.DataFrame
        The ground truth (``derivatives/simulation/truth.tsv``), columns
        :data:`T1W_TRUTH_COLUMNS`.
    """
    root = Path(root)
    voxel_size_mm = _check_voxel_size(voxel_size_mm)
    check_root(root, overwrite=overwrite)
    participants = draw_t1w_participants(n_subjects, seed=seed, id_prefix=id_prefix,
                                         age_range_years=age_range_years)
    with staged_dataset(root) as staging:
        simulation = staging / "derivatives" / "simulation"
        truth_rows = []
        for index, subject in enumerate(participants.to_dict("records")):
            started = time.perf_counter()
            affine, t1w, brain, truth = simulate_t1w_subject(
                subject, seed=seed, id_prefix=id_prefix, index=index,
                voxel_size_mm=voxel_size_mm)
            subject_id = subject["participant_id"]
            save_nifti(staging / subject_id / "anat" / f"{subject_id}_T1w.nii.gz", t1w,
                       affine, "T1w-like image, simulated (T1w-only cohort)")
            save_nifti(simulation / subject_id / f"{subject_id}_desc-truth_mask.nii.gz",
                       brain.astype(np.uint8), affine, "true brain mask, simulated")
            truth_rows.append(truth)
            LOGGER.info("simulated %s (%d/%d, age %.1f years, %s) in %.2f s", subject_id,
                        index + 1, len(participants), subject["age"], subject["study"],
                        time.perf_counter() - started)
        truth_table = pd.DataFrame(truth_rows, columns=list(T1W_TRUTH_COLUMNS))
        participants.to_csv(staging / "participants.tsv", sep="\t", index=False,
                            float_format="%.1f")
        write_json(staging / "participants.json", _PARTICIPANT_COLUMNS)
        generated_by = [{"Name": "brainage.simulate",
                         "Description": f"simulated T1w-only cohort, seed {seed}"}]
        write_json(staging / "dataset_description.json", {
            "Name": "brainage simulated T1w-only pretraining cohort",
            "BIDSVersion": "1.9.0", "DatasetType": "raw", "GeneratedBy": generated_by,
            "SimulationParameters": {
                "cohort": "T1w-only", "n_subjects": int(n_subjects), "seed": seed,
                "id_prefix": id_prefix, "voxel_size_mm": float(voxel_size_mm),
                "age_range_years": [float(age) for age in age_range_years]},
        })
        write_json(simulation / "dataset_description.json", {
            "Name": "ground truth of the brainage simulation", "BIDSVersion": "1.9.0",
            "DatasetType": "derivative", "GeneratedBy": generated_by,
        })
        write_bidsignore(simulation, TRUTH_BIDS_IGNORE)
        truth_table.to_csv(simulation / "truth.tsv", sep="\t", index=False)
        write_json(simulation / "truth.json", {column: {"Description": text}
                                               for column, text in T1W_TRUTH_COLUMNS.items()})
    return truth_table
