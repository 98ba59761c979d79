"""A simulated multi-study MR-elastography cohort, written in the pipeline's input layout.

Real MRE data cannot be shipped, so the demo and the tests run on a cohort simulated
from nilearn's bundled MNI152 (ICBM 2009a sym) template and its grey/white-matter
probability maps, offline and deterministically from a seed.

On-disk layout written by :func:`simulate_cohort` (``root`` is the BIDS-like dataset)::

    root/dataset_description.json                 BIDS, DatasetType "raw", GeneratedBy
    root/participants.tsv                         participant_id, age, sex, study, group
    root/participants.json                        column descriptions
    root/sub-<label>/mre/sub-<label>_stiffness.nii.gz   float32, shear stiffness, kPa
    root/sub-<label>/anat/sub-<label>_T1w.nii.gz        int16, same grid (with_anatomy)
    root/derivatives/simulation/dataset_description.json
    root/derivatives/simulation/truth.tsv         one row per subject (see TRUTH_COLUMNS)
    root/derivatives/simulation/truth.json        the same column descriptions
    root/derivatives/simulation/sub-<label>/sub-<label>_desc-truth_mask.nii.gz

The ground truth lives under ``derivatives/`` so that a pipeline reading
``sub-*/mre`` never sees it.

Native space
------------
Each subject's native grid is axis-aligned with its world axes (diagonal affine, RAS,
sform/qform code 1), isotropic at the study's MRE voxel size (1.5-2.0 mm, see
``STUDY_ACQUISITION``) and large enough for the whole head plus 8 mm. The stiffness
map, the T1w-like image and the truth mask share that grid. The truth mask is the
template brain mask (nilearn's: template > 0.2, ventricles and sulcal CSF included)
after age-related shrinkage, posed into native space. The map is non-zero exactly on
``truth mask AND slab``, where the slab is a range of native k slices (third voxel
axis); ``coverage_fraction`` is that support's share of the truth mask. NaN voxels
(``nan_count`` of them) lie inside the support. The map carries a smooth multiplicative
bias (the pipeline N4-corrects it); the T1w-like image carries its own bias, a
skull/scalp shell and Rician background noise, so skull stripping has work to do.

The pose transform
------------------
Each subject's head is the (atrophied) template head, scaled, rotated and translated:
a point ``x_mni`` (MNI world mm) sits in the scanner at
``x_native = scale * R @ x_mni + t`` (native world mm, i.e. the image's own
``affine @ [i, j, k, 1]``), with ``R = Rz @ Ry @ Rx`` (rotation about the MNI origin,
angles ``rotation_{x,y,z}_deg``, right-handed, applied x first) and ``t`` the
translation in mm. ``truth.tsv`` stores the inverse as ``native_to_mni_affine``, a
JSON 4x4 matrix ``A`` with ``x_mni = A @ [x_native, 1]``: it maps world millimetres
of the native stiffness/T1w image to MNI152 world millimetres. A registration of the
native image to the template recovers ``A`` (ANTs writes the inverse direction, in LPS).

Modelling choices and sources
-----------------------------
- Demographics: the paper's Table 2 (METHOD.md section 1), scaled down proportionally.
- Atrophy after 40 years: the cortical surface retreats, partial-volume tissue turns
  into CSF (sulci widen) and the ventricles enlarge; together 0.29 %/year of
  parenchymal volume after 40, 14 % by 90 (longitudinal MRI: 0.2-0.5 %/year, Fotenos 2005,
  Fjell 2009).
- Stiffness: tissue baselines at age 30 (cortical GM 2.6, WM 2.9, deep GM 3.0-3.4 kPa,
  Johnson 2016, Hiscox 2016), exponential decline of 0.40-0.55 %/year by region, 1.5 x
  faster after 60 (Sack 2011: -0.75 %/year whole brain; Lv 2020: -0.32...-0.36 %/year,
  faster after 60), none in the hippocampus (Hiscox 2018), women 2 % stiffer (Sack
  2009; Arani 2015 found small sex effects), per-subject and per-region random effects,
  site (study) offsets and noise, a smooth inversion bias, partial slab coverage
  (paper Appendix Fig. 7) and occasional NaN voxels (failed inversions).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

LOGGER = logging.getLogger(__name__)

__all__ = [
    "STUDY_TABLE", "ACCELERATED_STUDY", "TRUTH_COLUMNS", "study_table", "draw_participants",
    "pose_to_native_affine", "simulate_cohort", "main",
]

# ---------------------------------------------------------------------------------------
# Demographics (paper Table 2)
# ---------------------------------------------------------------------------------------

#: Paper Table 2: study, n, age mean (years), age sd (years), n female, n male.
STUDY_TABLE = (
    ("study1", 134, 23.4, 4.0, 78, 56),
    ("study2", 60, 37.8, 20.9, 34, 26),
    ("study3", 12, 69.4, 2.4, 6, 6),
    ("study4", 68, 69.3, 5.8, 49, 19),
    ("study5", 37, 49.1, 16.6, 16, 21),
)
#: Study name of the optional accelerated-ageing group.
ACCELERATED_STUDY = "patients"
AGE_LIMITS_YEARS = (18.0, 90.0)
MIN_SUBJECTS_PER_STUDY = 2

# Study 2's sd (20.9 years) exceeds its distance from the 18-year floor (19.8 years), so
# no single truncated normal has its moments: it recruited a young and an old group.
# Study 2 is a young component N(24, 4) plus an old one N(b, 6) of weight w; the other
# studies are one normal N(m, s). _calibrated_age_mixture solves for (w, b) or (m, s) so
# that the mixture truncated to 18-90 years has exactly Table 2's mean and sd.
_STUDY2_YOUNG = (24.0, 4.0)
_STUDY2_OLD_SD = 6.0
# The accelerated group: middle-aged to older adults, 50:50 sex (not in the paper).
_ACCELERATED_AGE = ((1.0, 62.0, 8.0),)

_STUDY_CODES = {"study1": "st1", "study2": "st2", "study3": "st3", "study4": "st4",
                "study5": "st5", ACCELERATED_STUDY: "pat"}


def study_table() -> pd.DataFrame:
    """Paper Table 2 as a DataFrame.

    Returns
    -------
    pandas.DataFrame
        Columns ``study`` (str), ``n``, ``age_mean`` (years), ``age_sd`` (years),
        ``n_female``, ``n_male``; one row per study, 311 subjects in all.
    """
    return pd.DataFrame(list(STUDY_TABLE),
                        columns=["study", "n", "age_mean", "age_sd", "n_female", "n_male"])


def _scaled_study_sizes(n_subjects: int) -> dict[str, int]:
    """Split ``n_subjects`` over the studies in Table 2's proportions, each at least 2."""
    minimum_total = MIN_SUBJECTS_PER_STUDY * len(STUDY_TABLE)
    if n_subjects < minimum_total:
        raise ValueError(f"n_subjects={n_subjects} is too small: each of the "
                         f"{len(STUDY_TABLE)} studies needs at least {MIN_SUBJECTS_PER_STUDY} "
                         f"subjects, so use n_subjects >= {minimum_total}.")
    paper_sizes = np.array([row[1] for row in STUDY_TABLE], dtype=float)
    exact = n_subjects * paper_sizes / paper_sizes.sum()
    sizes = np.maximum(np.floor(exact).astype(int), MIN_SUBJECTS_PER_STUDY)
    # Largest remainder first when adding; when the floor of 2 overshot, take from the
    # study furthest above its exact share.
    while sizes.sum() < n_subjects:
        sizes[np.argmax(exact - sizes)] += 1
    while sizes.sum() > n_subjects:
        candidates = np.where(sizes > MIN_SUBJECTS_PER_STUDY, sizes - exact, -np.inf)
        sizes[np.argmax(candidates)] -= 1
    return {row[0]: int(size) for row, size in zip(STUDY_TABLE, sizes)}


def _mixture_cdf(components, ages: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    density = sum(weight * norm.pdf(ages, mean, sd) for weight, mean, sd in components)
    cdf = np.cumsum(density)
    return cdf / cdf[-1]


def _truncated_moments(components, ages: np.ndarray) -> tuple[float, float]:
    cdf = _mixture_cdf(components, ages)
    weights = np.diff(cdf, prepend=0.0)
    mean = float(np.sum(weights * ages))
    return mean, float(np.sqrt(np.sum(weights * (ages - mean) ** 2)))


@lru_cache(maxsize=None)
def _calibrated_age_mixture(study: str) -> tuple[tuple[float, float, float], ...]:
    """(weight, mean, sd) components whose truncation to 18-90 years matches Table 2."""
    from scipy.optimize import fsolve

    if study == ACCELERATED_STUDY:
        return _ACCELERATED_AGE
    _, _, target_mean, target_sd, _, _ = next(row for row in STUDY_TABLE if row[0] == study)
    if study == "study2":
        def components(parameters):
            old_weight, old_mean = parameters
            return ((1.0 - old_weight, *_STUDY2_YOUNG), (old_weight, old_mean, _STUDY2_OLD_SD))
        start = (0.3, 68.0)
    else:
        def components(parameters):
            return ((1.0, parameters[0], abs(parameters[1])),)
        start = (target_mean, target_sd)
    ages = np.arange(*AGE_LIMITS_YEARS, 0.01)

    def residual(parameters):
        mean, sd = _truncated_moments(components(parameters), ages)
        return (mean - target_mean, sd - target_sd)

    solution, _, converged, message = fsolve(residual, start, full_output=True)
    if converged != 1:
        raise RuntimeError(f"age distribution of {study} did not calibrate: {message}")
    return tuple(tuple(float(value) for value in component)
                 for component in components(solution))


def _sample_ages(rng: np.random.Generator, study: str, n: int) -> np.ndarray:
    """Stratified inverse-CDF draws, so even 2-4 subjects follow the study's shape.

    Each subject takes a random quantile from the middle half of its own 1/n stratum;
    a plain random draw would let 2 subjects land both in one tail.
    """
    ages = np.arange(*AGE_LIMITS_YEARS, 0.01)
    cdf = _mixture_cdf(_calibrated_age_mixture(study), ages)
    quantiles = (np.arange(n) + rng.uniform(0.25, 0.75, size=n)) / n
    drawn = np.interp(quantiles, cdf, ages)
    return np.round(rng.permutation(np.clip(drawn, *AGE_LIMITS_YEARS)), 1)


def _check_prefix(id_prefix: str) -> str:
    if not isinstance(id_prefix, str) or (id_prefix and not id_prefix.isalnum()) \
            or not id_prefix.isascii():
        raise ValueError(f"id_prefix={id_prefix!r} must be letters and digits only (BIDS "
                         f"labels), e.g. 'new'.")
    return id_prefix


def _seed_sequence(seed: int, id_prefix: str, *stream: int) -> np.random.SeedSequence:
    # The prefix enters the seed so a "new cohort" differs even at the same seed.
    return np.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(id_prefix.encode()),
                                                        *stream))


def draw_participants(n_subjects: int = 60, *, seed: int = 0, accelerated_group_n: int = 0,
                      accelerated_ageing_years: float = 8.0,
                      id_prefix: str = "") -> pd.DataFrame:
    """Draw the cohort's demographics (no images).

    Parameters
    ----------
    n_subjects : int
        Healthy subjects, split over the 5 studies in Table 2's proportions (each study
        at least 2, so at least 10).
    seed : int
        Random seed; the same seed and prefix give the same table.
    accelerated_group_n : int
        Extra subjects in study ``"patients"``, ``group == "accelerated"``.
    accelerated_ageing_years : float
        Years added to the accelerated group's age for its stiffness (not its anatomy).
    id_prefix : str
        Letters and digits prepended to every label (``sub-<prefix>st1s001``), for a
        second, independent cohort.

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``age`` (years, 1 decimal, 18-90), ``sex`` (``F``/``M``),
        ``study``, ``group`` (``healthy``/``accelerated``), ``stiffness_age_offset_years``.
    """
    _check_prefix(id_prefix)
    if accelerated_group_n < 0:
        raise ValueError(f"accelerated_group_n={accelerated_group_n} must be >= 0.")
    rng = np.random.default_rng(_seed_sequence(seed, id_prefix, 0))
    sizes = _scaled_study_sizes(int(n_subjects))
    female_share = {row[0]: row[4] / row[1] for row in STUDY_TABLE}
    if accelerated_group_n:
        sizes[ACCELERATED_STUDY] = int(accelerated_group_n)
        female_share[ACCELERATED_STUDY] = 0.5
    rows = []
    for study, size in sizes.items():
        ages = _sample_ages(rng, study, size)
        n_female = int(np.floor(size * female_share[study] + rng.uniform()))
        sexes = rng.permutation(np.array(["F"] * n_female + ["M"] * (size - n_female)))
        accelerated = study == ACCELERATED_STUDY
        for index, (age, sex) in enumerate(zip(ages, sexes), start=1):
            rows.append({
                "participant_id": f"sub-{id_prefix}{_STUDY_CODES[study]}s{index:03d}",
                "age": float(age), "sex": str(sex), "study": study,
                "group": "accelerated" if accelerated else "healthy",
                "stiffness_age_offset_years":
                    float(accelerated_ageing_years) if accelerated else 0.0,
            })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------
# Acquisition (site) parameters
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyAcquisition:
    """What a study's scanner and MRE protocol do to the map.

    Attributes
    ----------
    voxel_size_mm : float
        Isotropic native voxel size (mm); MRE protocols use 1.5-3 mm.
    stiffness_factor : float
        Multiplicative site offset of the stiffness (driver, frequency, inversion).
    noise_sd : float
        Relative sd of the voxel noise of the stiffness map.
    low_coverage_probability : float
        Probability that the slab misses 10-20 % of the brain instead of 0-10 %.
    """

    voxel_size_mm: float
    stiffness_factor: float
    noise_sd: float
    low_coverage_probability: float


STUDY_ACQUISITION = {
    "study1": StudyAcquisition(1.6, 1.00, 0.06, 0.10),
    "study2": StudyAcquisition(2.0, 0.97, 0.08, 0.15),
    "study3": StudyAcquisition(1.5, 1.04, 0.05, 0.25),
    "study4": StudyAcquisition(1.8, 0.98, 0.07, 0.30),
    "study5": StudyAcquisition(2.0, 1.03, 0.08, 0.15),
    ACCELERATED_STUDY: StudyAcquisition(2.0, 1.00, 0.07, 0.15),
}

MAX_ROTATION_DEG = 10.0
MAX_TRANSLATION_MM = 10.0
MAX_SCALE_CHANGE = 0.05
#: Head-to-edge margin of the native field of view (mm).
FOV_MARGIN_MM = 8.0

# ---------------------------------------------------------------------------------------
# Tissue model
# ---------------------------------------------------------------------------------------

#: Age (years) at which the regional baselines below hold.
REFERENCE_AGE_YEARS = 30.0
#: Stiffness decline speeds up by this factor after 60 years (Lv 2020).
LATE_LIFE_ACCELERATION = 1.5
LATE_LIFE_ONSET_YEARS = 60.0
ATROPHY_ONSET_YEARS = 40.0
#: Outer brain surface retreat (template mm per year after 40).
CORTICAL_SHRINK_MM_PER_YEAR = 0.05
#: Ventricle wall retreat (template mm per year after 40); ventricular CSF about doubles
#: from 40 to 90 years.
VENTRICLE_DILATION_MM_PER_YEAR = 0.10
#: Grey/white-matter probability turned into CSF per year after 40 (sulcal widening).
PARTIAL_VOLUME_LOSS_PER_YEAR = 0.008
#: CSF inside the brain mask (kPa): MRE inversions return low, non-zero values there.
CSF_STIFFNESS_KPA = 1.2
#: Women's brains slightly stiffer (relative factor).
FEMALE_STIFFNESS_FACTOR = 1.02
#: Relative sd of a subject's whole-brain and per-region stiffness.
SUBJECT_STIFFNESS_SD = 0.03
REGION_STIFFNESS_SD = 0.03
#: Smooth multiplicative bias: sd of each Legendre coefficient (log scale).
STIFFNESS_BIAS_SD = 0.04
T1W_BIAS_SD = 0.08
#: Noise of the T1w-like image relative to white matter (Rician).
T1W_NOISE_SD = 0.02
STIFFNESS_LIMITS_KPA = (0.2, 10.0)


@dataclass(frozen=True)
class Region:
    """A stiffness region: baseline at 30 years (kPa) and ageing slope (%/year)."""

    name: str
    baseline_kpa: float
    slope_percent_per_year: float
    # Deep structures: (centre MNI mm, semi-axes mm); both hemispheres when x != 0.
    ellipsoid: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None


REGIONS = (
    Region("cortical_gm", 2.6, -0.40),
    Region("white_matter", 2.9, -0.50),
    Region("caudate", 3.0, -0.55, ((13, 12, 10), (5, 9, 8))),
    Region("putamen", 3.4, -0.55, ((25, 2, 1), (5, 13, 8))),
    Region("pallidum", 3.4, -0.50, ((19, -3, -1), (3.5, 6, 4))),
    Region("thalamus", 3.2, -0.55, ((11, -18, 7), (7, 11, 7))),
    Region("hippocampus", 2.7, 0.0, ((27, -22, -14), (6, 15, 6))),
)

# T1w-like intensities in the template's units (white matter ~0.88, cortex ~0.6).
T1W_CSF = 0.25
# Head layers outside the smoothed brain hull: (outer distance mm, intensity).
T1W_HEAD_LAYERS = ((2.0, T1W_CSF), (4.0, 0.05), (6.5, 0.40), (8.5, 0.05), (11.0, 0.45),
                   (15.0, 0.85))
T1W_SCALE = 1000.0
# Bottom padding of the template grid (voxels): the template cuts the brainstem at its
# lower edge, and the head needs room below it to close.
_PAD_BELOW_VOXELS = 10

TRUTH_COLUMNS = {
    "participant_id": "sub-<label>, as in participants.tsv",
    "study": "study name",
    "group": "healthy or accelerated",
    "age": "chronological age (years); drives the anatomy (atrophy)",
    "sex": "F or M",
    "stiffness_age_offset_years": "years added to age for the stiffness model",
    "stiffness_age_years": "age + offset: the age the stiffness was simulated at (years)",
    "rotation_x_deg": "rotation about the MNI x axis (degrees), applied first",
    "rotation_y_deg": "rotation about the MNI y axis (degrees), second",
    "rotation_z_deg": "rotation about the MNI z axis (degrees), third",
    "translation_x_mm": "translation t (mm): x_native = scale * R @ x_mni + t",
    "translation_y_mm": "see translation_x_mm",
    "translation_z_mm": "see translation_x_mm",
    "scale": "isotropic head size relative to the template",
    "native_to_mni_affine": "JSON 4x4 A: x_mni = A @ [x_native, 1], both world mm",
    "voxel_size_mm": "isotropic native voxel size (mm)",
    "shape": "JSON native grid shape",
    "coverage_fraction": "brain voxels (truth mask) inside the MRE slab / all brain voxels",
    "slab_first_slice": "first native k index (0-based) of the slab",
    "slab_last_slice": "last native k index (inclusive) of the slab",
    "nan_count": "NaN voxels in the stiffness map (all inside truth mask and slab)",
    "cortical_shrink_mm": "outer brain surface retreat from atrophy (template mm)",
    "ventricle_dilation_mm": "ventricle wall retreat from atrophy (template mm)",
    "brain_volume_ml": "truth mask volume in native space (ml)",
    "parenchyma_volume_ml": "grey + white matter volume in template space (ml)",
    "site_stiffness_factor": "study's multiplicative stiffness offset",
    "subject_stiffness_factor": "subject's multiplicative random effect (with sex effect)",
    "mean_stiffness_kpa": "mean of the finite non-zero voxels of the written map (kPa)",
}


# ---------------------------------------------------------------------------------------
# Template anatomy (computed once per process)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TemplateAnatomy:
    """MNI152 2 mm anatomy on a grid padded below; brain quantities as voxel vectors."""

    affine: np.ndarray                 # 4x4 voxel -> MNI mm of the padded grid
    shape: tuple[int, int, int]
    brain_signed_distance_mm: np.ndarray  # grid, > 0 inside the brain mask
    brain_flat_index: np.ndarray        # flat grid index of each brain voxel
    nearest_brain_voxel: np.ndarray     # grid -> position in the brain vectors
    tissue_probability: np.ndarray      # brain vector, GM + WM probability
    region_weights: np.ndarray          # (n_regions, n_brain), sum = 1
    ventricle_distance_mm: np.ndarray   # brain vector, distance to the ventricles
    brain_signed_distance_vec: np.ndarray
    template_t1w: np.ndarray            # brain vector, template intensity
    head_t1w: np.ndarray                # grid, intensity outside the brain mask
    head_corners_mm: np.ndarray         # (8, 3) corners of the head's bounding box
    brain_corners_mm: np.ndarray        # (8, 3) corners of the brain's bounding box


def _soft_ellipsoid(points_mm: np.ndarray, centre, semi_axes) -> np.ndarray:
    radius = np.sqrt(np.sum(((points_mm - np.asarray(centre)) / np.asarray(semi_axes)) ** 2,
                            axis=1))
    # 2 mm ramp at the edge, like partial volume at the template's resolution.
    return np.clip((1.0 - radius) * np.mean(semi_axes) / 2.0 + 0.5, 0.0, 1.0)


@lru_cache(maxsize=1)
def _template_anatomy() -> _TemplateAnatomy:
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    pad = ((0, 0), (0, 0), (_PAD_BELOW_VOXELS, 0))
    template_t1w = np.pad(template.get_fdata(dtype=np.float32), pad)
    grey = np.pad(datasets.load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32),
                  pad)
    white = np.pad(datasets.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32),
                   pad)
    # nilearn's brain mask is the template thresholded at 0.2; same here, on the padded grid.
    brain = template_t1w > 0.2
    affine = template.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * _PAD_BELOW_VOXELS
    voxel_mm = float(affine[0, 0])

    inside = ndimage.distance_transform_edt(brain, sampling=voxel_mm)
    outside, nearest = ndimage.distance_transform_edt(~brain, sampling=voxel_mm,
                                                      return_indices=True)
    # Zero half-way between the last brain voxel and the first background voxel.
    signed = np.where(brain, inside - voxel_mm / 2, -(outside - voxel_mm / 2))
    brain_flat_index = np.flatnonzero(brain)
    position = np.full(brain.size, -1, dtype=np.int64)
    position[brain_flat_index] = np.arange(brain_flat_index.size)
    nearest_flat = np.ravel_multi_index(tuple(nearest), brain.shape)
    nearest_brain_voxel = position[nearest_flat].reshape(brain.shape)

    grid_index = np.indices(brain.shape).reshape(3, -1)[:, brain_flat_index]
    points_mm = (affine[:3, :3] @ grid_index + affine[:3, 3:]).T

    probability = np.clip(grey + white, 0.0, 1.0).ravel()[brain_flat_index]
    grey_share = np.divide(grey.ravel()[brain_flat_index], grey.ravel()[brain_flat_index]
                           + white.ravel()[brain_flat_index] + 1e-6)

    structure_weights = []
    for region in REGIONS:
        if region.ellipsoid is None:
            continue
        centre, semi_axes = region.ellipsoid
        mirrored = (-centre[0], centre[1], centre[2])
        structure_weights.append(np.maximum(_soft_ellipsoid(points_mm, centre, semi_axes),
                                            _soft_ellipsoid(points_mm, mirrored, semi_axes)))
    structure_weights = np.array(structure_weights)
    structure_total = structure_weights.sum(axis=0)
    deep_share = np.clip(structure_total, 0.0, 1.0)
    structure_weights *= np.divide(deep_share, structure_total,
                                   out=np.zeros_like(structure_total),
                                   where=structure_total > 0)
    region_weights = np.vstack([(1 - deep_share) * grey_share,
                                (1 - deep_share) * (1 - grey_share),
                                structure_weights]).astype(np.float32)

    # Lateral and third ventricles: CSF in a central ellipsoid of the template.
    csf = brain & (np.clip(grey + white, 0, 1) < 0.3)
    all_points = (affine[:3, :3] @ np.indices(brain.shape).reshape(3, -1)
                  + affine[:3, 3:]).T.reshape(brain.shape + (3,))
    central = np.sum(((all_points - (0.0, -10.0, 12.0)) / (26.0, 40.0, 22.0)) ** 2,
                     axis=-1) <= 1
    ventricles = csf & central
    ventricle_distance = ndimage.distance_transform_edt(~ventricles, sampling=voxel_mm)

    # Skull and scalp follow a smoothed hull of the brain, not its sulci.
    hull = ndimage.gaussian_filter(brain.astype(np.float32), sigma=3.0) > 0.25
    hull = ndimage.binary_fill_holes(hull | brain)
    hull_distance = ndimage.distance_transform_edt(~hull, sampling=voxel_mm)
    head_t1w = np.zeros(brain.shape, dtype=np.float32)
    for outer_mm, intensity in reversed(T1W_HEAD_LAYERS):
        head_t1w[hull_distance <= outer_mm] = intensity
    head = hull_distance <= T1W_HEAD_LAYERS[-1][0]

    return _TemplateAnatomy(
        affine=affine, shape=brain.shape,
        brain_signed_distance_mm=signed.astype(np.float32),
        brain_flat_index=brain_flat_index,
        nearest_brain_voxel=nearest_brain_voxel,
        tissue_probability=probability.astype(np.float32),
        region_weights=region_weights,
        ventricle_distance_mm=ventricle_distance.ravel()[brain_flat_index].astype(np.float32),
        brain_signed_distance_vec=signed.ravel()[brain_flat_index].astype(np.float32),
        template_t1w=template_t1w.ravel()[brain_flat_index],
        head_t1w=head_t1w, head_corners_mm=_box_corners_mm(head, affine),
        brain_corners_mm=_box_corners_mm(brain, affine, margin_mm=2 * voxel_mm),
    )


def _box_corners_mm(region: np.ndarray, affine: np.ndarray, margin_mm: float = 0.0):
    """The 8 corners (MNI mm) of the bounding box of a boolean region, widened by margin."""
    index = np.argwhere(region)
    low = affine[:3, :3] @ index.min(axis=0) + affine[:3, 3] - margin_mm
    high = affine[:3, :3] @ index.max(axis=0) + affine[:3, 3] + margin_mm
    return np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1])
                     for z in (low[2], high[2])])


# ---------------------------------------------------------------------------------------
# One subject
# ---------------------------------------------------------------------------------------

def _rotation_matrix(rotation_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose_to_native_affine(rotation_deg, translation_mm, scale: float) -> np.ndarray:
    """The subject pose as a 4x4 map from MNI world mm to native world mm.

    Parameters
    ----------
    rotation_deg : sequence of 3 floats
        Rotations about the MNI x, y, z axes (degrees), applied in that order about the
        MNI origin: ``R = Rz @ Ry @ Rx``.
    translation_mm : sequence of 3 floats
        Translation (mm) applied after rotation and scaling.
    scale : float
        Isotropic scale (head size relative to the template).

    Returns
    -------
    numpy.ndarray
        ``P`` (4x4) with ``x_native = P @ [x_mni, 1]``; ``inv(P)`` is the
        ``native_to_mni_affine`` stored in ``truth.tsv``.
    """
    pose = np.eye(4)
    pose[:3, :3] = scale * _rotation_matrix(rotation_deg)
    pose[:3, 3] = translation_mm
    return pose


def _age_years_from_reference(age: float) -> float:
    """Effective ageing time (years) since the reference age, faster after 60."""
    return (age - REFERENCE_AGE_YEARS) + (LATE_LIFE_ACCELERATION - 1.0) * max(
        age - LATE_LIFE_ONSET_YEARS, 0.0)


def _legendre_bias(rng: np.random.Generator, shape, coefficient_sd: float,
                   box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """A smooth multiplicative field exp(sum of Legendre terms of degree <= 2), mean ~1.

    The field spans the whole grid of ``shape`` (coordinates -1..1 along each axis);
    only the part inside ``box`` is returned. Built from 1D factors broadcast over the
    grid, so it costs a few array passes.
    """
    box = box or tuple(slice(0, n) for n in shape)
    first = [np.linspace(-1.0, 1.0, n, dtype=np.float32)[part] for n, part in zip(shape, box)]
    second = [1.5 * values ** 2 - 0.5 for values in first]

    def along(values, axis):
        return values.reshape([-1 if other == axis else 1 for other in range(3)])

    coefficients = rng.normal(0.0, coefficient_sd, size=9).astype(np.float32)
    log_field = np.zeros([len(values) for values in first], dtype=np.float32)
    for axis in range(3):
        log_field += coefficients[axis] * along(first[axis], axis)
        log_field += coefficients[3 + axis] * along(second[axis], axis)
    for coefficient, (axis_a, axis_b) in zip(coefficients[6:], ((0, 1), (0, 2), (1, 2))):
        log_field += coefficient * along(first[axis_a], axis_a) * along(first[axis_b], axis_b)
    return np.exp(log_field, out=log_field)


def _smoothed_noise(rng: np.random.Generator, shape, sd: float) -> np.ndarray:
    """Gaussian noise smoothed over ~1 voxel (MRE inversions correlate neighbours)."""
    sigma = 0.8
    noise = rng.standard_normal(shape, dtype=np.float32)
    ndimage.gaussian_filter(noise, sigma, output=noise)
    # sd of white noise after a 3D Gaussian filter: 1 / (2 sqrt(pi) sigma)^(3/2).
    noise *= sd * (2.0 * np.sqrt(np.pi) * sigma) ** 1.5
    return noise


def _native_grid(pose: np.ndarray, corners_mm: np.ndarray, voxel_mm: float):
    """An axis-aligned native grid (affine, shape) that holds the whole posed head."""
    posed = corners_mm @ pose[:3, :3].T + pose[:3, 3]
    low = np.floor((posed.min(axis=0) - FOV_MARGIN_MM) / voxel_mm) * voxel_mm
    high = posed.max(axis=0) + FOV_MARGIN_MM
    shape = tuple(int(n) for n in np.ceil((high - low) / voxel_mm).astype(int) + 1)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = low
    return affine, shape


def _native_box(pose: np.ndarray, corners_mm: np.ndarray, native_affine: np.ndarray,
                shape) -> tuple[slice, slice, slice]:
    """Native voxel slices holding the posed box given by its MNI corners."""
    posed = corners_mm @ pose[:3, :3].T + pose[:3, 3]
    voxels = (posed - native_affine[:3, 3]) / np.diag(native_affine)[:3]
    low = np.clip(np.floor(voxels.min(axis=0)).astype(int), 0, None)
    high = np.minimum(np.ceil(voxels.max(axis=0)).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _resample(values: np.ndarray, native_voxel_to_template_voxel: np.ndarray, shape,
              outside: float, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """Linear interpolation of a template-grid array onto the native grid (or a box of it)."""
    box = box or tuple(slice(0, n) for n in shape)
    start = np.array([part.start for part in box], dtype=float)
    matrix = native_voxel_to_template_voxel[:3, :3]
    return ndimage.affine_transform(
        values, matrix, offset=native_voxel_to_template_voxel[:3, 3] + matrix @ start,
        output_shape=tuple(part.stop - part.start for part in box), order=1,
        mode="constant", cval=outside, output=np.float32)


def _slab(rng: np.random.Generator, brain: np.ndarray, low_coverage_probability: float):
    """Cut an MRE slab along native k; returns (first, last) slice, inclusive."""
    missing = rng.uniform(0.10, 0.20) if rng.uniform() < low_coverage_probability \
        else rng.uniform(0.0, 0.10)
    # Slabs are mostly placed to miss the cerebellum/brainstem rather than the vertex.
    missing_below = missing * rng.uniform(0.5, 1.0)
    missing_above = missing - missing_below
    per_slice = brain.sum(axis=(0, 1)).astype(float)
    cumulative = np.cumsum(per_slice) / per_slice.sum()
    first = int(np.searchsorted(cumulative, missing_below, side="right"))
    from_top = np.cumsum(per_slice[::-1]) / per_slice.sum()
    last = brain.shape[2] - 1 - int(np.searchsorted(from_top, missing_above, side="right"))
    return first, max(last, first)


def _simulate_subject(subject: dict, *, seed: int, id_prefix: str, index: int,
                      with_anatomy: bool, nan_probability: float):
    """Images and ground truth of one subject; see the module docstring for the model.

    Parameters
    ----------
    subject : dict
        One row of :func:`draw_participants` (age in years, sex, study,
        stiffness_age_offset_years, participant_id, group).
    seed, id_prefix, index : int, str, int
        Select the subject's own random stream, independent of the other subjects.
    with_anatomy : bool
        Also build the T1w-like image.
    nan_probability : float
        Chance of 1-10 NaN voxels in the map.

    Returns
    -------
    tuple
        ``(native_affine 4x4, stiffness float32 kPa, t1w int16 or None, truth_mask bool,
        truth dict)``; arrays share the native grid.
    """
    anatomy = _template_anatomy()
    rng = np.random.default_rng(_seed_sequence(seed, id_prefix, 1, index))
    acquisition = STUDY_ACQUISITION[subject["study"]]
    age = float(subject["age"])
    stiffness_age = age + float(subject["stiffness_age_offset_years"])

    # Anatomy at the chronological age (template space, brain voxels only).
    years_atrophy = max(age - ATROPHY_ONSET_YEARS, 0.0)
    shrink_mm = CORTICAL_SHRINK_MM_PER_YEAR * years_atrophy
    ventricle_mm = VENTRICLE_DILATION_MM_PER_YEAR * years_atrophy
    lost = PARTIAL_VOLUME_LOSS_PER_YEAR * years_atrophy
    tissue = np.clip((anatomy.tissue_probability - lost) / (1.0 - lost), 0.0, 1.0)
    tissue *= np.clip((anatomy.ventricle_distance_mm - (ventricle_mm - 2.0)) / 2.0, 0.0, 1.0)
    tissue *= np.clip((anatomy.brain_signed_distance_vec - shrink_mm) / 2.0 + 0.5, 0.0, 1.0)
    kept_share = np.divide(tissue, anatomy.tissue_probability,
                           out=np.zeros_like(tissue), where=anatomy.tissue_probability > 0)

    # Stiffness at the stiffness age.
    ageing = _age_years_from_reference(stiffness_age)
    region_stiffness = np.array([
        region.baseline_kpa * np.exp(region.slope_percent_per_year / 100.0 * ageing)
        for region in REGIONS]) * rng.lognormal(0.0, REGION_STIFFNESS_SD, size=len(REGIONS))
    tissue_stiffness = region_stiffness.astype(np.float32) @ anatomy.region_weights
    subject_factor = float(rng.lognormal(0.0, SUBJECT_STIFFNESS_SD)) * (
        FEMALE_STIFFNESS_FACTOR if subject["sex"] == "F" else 1.0)
    brain_stiffness = (tissue * tissue_stiffness + (1.0 - tissue) * CSF_STIFFNESS_KPA) * (
        subject_factor * acquisition.stiffness_factor)
    # Outside the brain, the nearest brain value: interpolation at the edge stays unbiased.
    stiffness_template = brain_stiffness[anatomy.nearest_brain_voxel]

    # Pose and native grid.
    rotation = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=3)
    translation = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, size=3)
    scale = 1.0 + rng.uniform(-MAX_SCALE_CHANGE, MAX_SCALE_CHANGE)
    pose = pose_to_native_affine(rotation, translation, scale)
    native_to_mni = np.linalg.inv(pose)
    native_affine, shape = _native_grid(pose, anatomy.head_corners_mm,
                                        acquisition.voxel_size_mm)
    native_to_template_voxel = np.linalg.inv(anatomy.affine) @ native_to_mni @ native_affine

    # The map only needs the brain's bounding box: outside it everything is 0 anyway.
    brain_box = _native_box(pose, anatomy.brain_corners_mm, native_affine, shape)
    brain = np.zeros(shape, dtype=bool)
    brain[brain_box] = _resample(anatomy.brain_signed_distance_mm, native_to_template_voxel,
                                 shape, outside=-100.0, box=brain_box) > shrink_mm
    first, last = _slab(rng, brain, acquisition.low_coverage_probability)
    covered = brain.copy()
    covered[:, :, :first] = False
    covered[:, :, last + 1:] = False

    stiffness_box = _resample(stiffness_template, native_to_template_voxel, shape,
                              outside=0.0, box=brain_box)
    stiffness_box *= _legendre_bias(rng, shape, STIFFNESS_BIAS_SD, brain_box)
    stiffness_box *= 1.0 + _smoothed_noise(rng, stiffness_box.shape, acquisition.noise_sd)
    np.clip(stiffness_box, *STIFFNESS_LIMITS_KPA, out=stiffness_box)
    stiffness = np.zeros(shape, dtype=np.float32)
    stiffness[brain_box] = stiffness_box
    stiffness[~covered] = 0.0
    nan_count = 0
    if rng.uniform() < nan_probability:
        candidates = np.flatnonzero(covered)
        nan_count = int(min(rng.integers(1, 11), candidates.size))
        stiffness.ravel()[rng.choice(candidates, size=nan_count, replace=False)] = np.nan

    t1w = None
    if with_anatomy:
        brain_t1w = kept_share * anatomy.template_t1w + (1.0 - kept_share) * T1W_CSF
        t1w_template = anatomy.head_t1w.copy()
        t1w_template.ravel()[anatomy.brain_flat_index] = brain_t1w
        t1w = _resample(t1w_template, native_to_template_voxel, shape, outside=0.0)
        t1w *= _legendre_bias(rng, shape, T1W_BIAS_SD)
        # Rician magnitude noise: the background is noise, not zeros, as in a scanner.
        real = t1w + rng.normal(0.0, T1W_NOISE_SD, size=shape).astype(np.float32)
        imaginary = rng.normal(0.0, T1W_NOISE_SD, size=shape).astype(np.float32)
        t1w = np.round(np.hypot(real, imaginary) * T1W_SCALE).astype(np.int16)

    voxel_ml = acquisition.voxel_size_mm ** 3 / 1000.0
    truth = {
        "participant_id": subject["participant_id"], "study": subject["study"],
        "group": subject["group"], "age": age, "sex": subject["sex"],
        "stiffness_age_offset_years": float(subject["stiffness_age_offset_years"]),
        "stiffness_age_years": round(stiffness_age, 1),
        "rotation_x_deg": rotation[0], "rotation_y_deg": rotation[1],
        "rotation_z_deg": rotation[2],
        "translation_x_mm": translation[0], "translation_y_mm": translation[1],
        "translation_z_mm": translation[2], "scale": scale,
        "native_to_mni_affine": json.dumps(native_to_mni.round(10).tolist()),
        "voxel_size_mm": acquisition.voxel_size_mm, "shape": json.dumps(list(shape)),
        "coverage_fraction": float(covered.sum() / brain.sum()),
        "slab_first_slice": first, "slab_last_slice": last, "nan_count": nan_count,
        "cortical_shrink_mm": shrink_mm, "ventricle_dilation_mm": ventricle_mm,
        "brain_volume_ml": float(brain.sum() * voxel_ml),
        "parenchyma_volume_ml": float(tissue.sum() * abs(np.linalg.det(anatomy.affine))
                                      / 1000.0),
        "site_stiffness_factor": acquisition.stiffness_factor,
        "subject_stiffness_factor": subject_factor,
        "mean_stiffness_kpa": float(np.nanmean(stiffness[covered])),
    }
    return native_affine, stiffness, t1w, brain, truth


# ---------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------

def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, description: str) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode()[:79]
    image.set_sform(affine, code=1)  # scanner coordinates
    image.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.to_filename(str(path))


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


_PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "subject label, sub-<letters and digits>"},
    "age": {"Description": "age at the MRE scan", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "study": {"Description": "study (site and protocol) the subject was scanned in"},
    "group": {"Description": "cohort group",
              "Levels": {"healthy": "healthy control",
                         "accelerated": "simulated accelerated brain ageing"}},
}


def simulate_cohort(root: str | Path, *, n_subjects: int = 60, seed: int = 0,
                    accelerated_group_n: int = 0, accelerated_ageing_years: float = 8.0,
                    id_prefix: str = "", with_anatomy: bool = True,
                    nan_probability: float = 0.15, overwrite: bool = False) -> pd.DataFrame:
    """Write a simulated MRE cohort to ``root`` in the pipeline's input layout.

    The dataset is built in a temporary folder next to ``root`` and renamed into place,
    so a crash never leaves a half-written dataset. The layout, the ground truth and
    the meaning of the pose transform are described in the module docstring.

    Parameters
    ----------
    root : str or Path
        Dataset folder to create. It may exist only if empty, unless ``overwrite``.
    n_subjects : int
        Healthy subjects over the 5 studies of the paper's Table 2 (at least 10).
    seed : int
        Random seed; same arguments give identical images and tables.
    accelerated_group_n : int
        Extra subjects (study ``patients``, group ``accelerated``) whose stiffness is
        simulated ``accelerated_ageing_years`` older than their age; anatomy at true age.
    accelerated_ageing_years : float
        Stiffness age offset of the accelerated group (years).
    id_prefix : str
        Letters/digits prepended to every label and mixed into the seed: a new cohort.
    with_anatomy : bool
        Also write ``sub-<label>/anat/sub-<label>_T1w.nii.gz`` (same grid as the map).
    nan_probability : float
        Probability that a subject's map has 1-10 NaN voxels (inside brain and slab).
    overwrite : bool
        Replace an existing non-empty ``root``.

    Returns
    -------
    pandas.DataFrame
        The ground-truth table (``derivatives/simulation/truth.tsv``), one row per
        subject, columns as in :data:`TRUTH_COLUMNS`.
    """
    root = Path(root)
    if not 0.0 <= nan_probability <= 1.0:
        raise ValueError(f"nan_probability={nan_probability} must be within 0-1.")
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"dataset root {root} exists and is not a folder; choose "
                              f"another root or remove the file.")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"dataset root {root} exists and is not empty; pass "
                              f"overwrite=True (CLI: --overwrite) to replace it, or choose "
                              f"an empty folder.")
    participants = draw_participants(
        n_subjects, seed=seed, accelerated_group_n=accelerated_group_n,
        accelerated_ageing_years=accelerated_ageing_years, id_prefix=id_prefix)

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        truth_rows = []
        simulation = staging / "derivatives" / "simulation"
        for index, subject in enumerate(participants.to_dict("records")):
            started = time.perf_counter()
            affine, stiffness, t1w, brain, truth = _simulate_subject(
                subject, seed=seed, id_prefix=id_prefix, index=index,
                with_anatomy=with_anatomy, nan_probability=nan_probability)
            subject_id = subject["participant_id"]
            _save_nifti(staging / subject_id / "mre" / f"{subject_id}_stiffness.nii.gz",
                        stiffness, affine, "MRE shear stiffness (kPa), simulated")
            if t1w is not None:
                _save_nifti(staging / subject_id / "anat" / f"{subject_id}_T1w.nii.gz",
                            t1w, affine, "T1w-like image, simulated")
            _save_nifti(simulation / subject_id / f"{subject_id}_desc-truth_mask.nii.gz",
                        brain.astype(np.uint8), affine, "true brain mask, simulated")
            truth_rows.append(truth)
            LOGGER.info("simulated %s (%d/%d, age %.1f years, %s) in %.2f s", subject_id,
                        index + 1, len(participants), subject["age"], subject["study"],
                        time.perf_counter() - started)
        truth_table = pd.DataFrame(truth_rows, columns=list(TRUTH_COLUMNS))

        participants[["participant_id", "age", "sex", "study", "group"]].to_csv(
            staging / "participants.tsv", sep="\t", index=False, float_format="%.1f")
        _write_json(staging / "participants.json", _PARTICIPANT_COLUMNS)
        generated_by = [{"Name": "brainage.simulate",
                         "Description": f"simulated MRE cohort, seed {seed}"}]
        _write_json(staging / "dataset_description.json", {
            "Name": "brainage simulated multi-study MRE cohort",
            "BIDSVersion": "1.9.0", "DatasetType": "raw", "GeneratedBy": generated_by,
            "SimulationParameters": {
                "n_subjects": n_subjects, "seed": seed, "id_prefix": id_prefix,
                "accelerated_group_n": accelerated_group_n,
                "accelerated_ageing_years": accelerated_ageing_years,
                "with_anatomy": with_anatomy, "nan_probability": nan_probability},
        })
        _write_json(simulation / "dataset_description.json", {
            "Name": "ground truth of the brainage simulation", "BIDSVersion": "1.9.0",
            "DatasetType": "derivative", "GeneratedBy": generated_by,
        })
        truth_table.to_csv(simulation / "truth.tsv", sep="\t", index=False)
        _write_json(simulation / "truth.json",
                    {column: {"Description": text} for column, text in TRUTH_COLUMNS.items()})
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a dataset is shared
        _move_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return truth_table


def _move_into_place(staging: Path, root: Path) -> None:
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.rmdir(old)
        os.replace(root, old)
    os.replace(staging, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> None:
    """``python -m brainage.simulate --root DIR [--n-subjects N] [--seed S] ...``"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset folder to write")
    parser.add_argument("--n-subjects", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerated-group-n", type=int, default=0)
    parser.add_argument("--accelerated-ageing-years", type=float, default=8.0)
    parser.add_argument("--id-prefix", default="")
    parser.add_argument("--no-anatomy", action="store_true", help="skip the T1w images")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        truth = simulate_cohort(
            args.root, n_subjects=args.n_subjects, seed=args.seed,
            accelerated_group_n=args.accelerated_group_n,
            accelerated_ageing_years=args.accelerated_ageing_years, id_prefix=args.id_prefix,
            with_anatomy=not args.no_anatomy, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as error:
        parser.exit(2, f"brainage.simulate: error: {error}\n")
    print(f"wrote {len(truth)} subjects to {args.root}")


if __name__ == "__main__":
    main()
