"""One simulated subject: acquisition, anatomy, stiffness and damping ratio (see
:mod:`brainage.simulate`).

The template anatomy (nilearn's MNI152 and its tissue maps) is built once per process;
:func:`simulate_subject` poses an aged copy of it in a subject's native MRE grid and
returns stiffness (kPa), optionally the damping ratio (dimensionless), an optional
T1w-like image and the true brain mask as arrays. The helpers for atrophy, pose and the
T1w-like image are shared with the T1w-only cohort (:mod:`brainage.simulate.t1w_cohort`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from brainage.simulate.demographics import ACCELERATED_STUDY, OptionError, seed_sequence

# ---------------------------------------------------------------------------------------
# Acquisition (site) parameters
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyAcquisition:
    """What a study's scanner and MRE protocol do to the map.

    Attributes
    ----------
    voxel_size_mm : float
        Isotropic native voxel size (mm); clinical MRE protocols use 2-3 mm.
    stiffness_factor : float
        Multiplicative site offset of the stiffness (driver, frequency, inversion).
    noise_sd : float
        Relative sd of the voxel noise of the stiffness map.
    low_coverage_probability : float
        Probability that the slab misses 10-20 % of the brain instead of 0-10 %.
    damping_ratio_factor : float
        Multiplicative site offset of the damping ratio (driver, frequency, inversion).
    damping_ratio_noise_sd : float
        Relative sd of the voxel noise of the damping-ratio map.
    """

    voxel_size_mm: float
    stiffness_factor: float
    noise_sd: float
    low_coverage_probability: float
    damping_ratio_factor: float
    damping_ratio_noise_sd: float


#: Clinical MRE maps are typically 2-3 mm isotropic (e.g. 2.0 mm in Johnson 2016's
#: high-resolution protocol, 3.0 mm in clinical 2D multislice acquisitions). The damping
#: ratio is the less certain output of an inversion, hence its larger site offsets
#: (+-6 % against +-4 %) and noise (1.5 x the stiffness noise).
STUDY_ACQUISITION = {
    "study1": StudyAcquisition(2.0, 1.00, 0.06, 0.10, 1.00, 0.09),
    "study2": StudyAcquisition(2.5, 0.97, 0.08, 0.15, 1.06, 0.12),
    "study3": StudyAcquisition(2.0, 1.04, 0.05, 0.25, 0.94, 0.075),
    "study4": StudyAcquisition(3.0, 0.98, 0.07, 0.30, 1.05, 0.105),
    "study5": StudyAcquisition(2.5, 1.03, 0.08, 0.15, 0.96, 0.12),
    ACCELERATED_STUDY: StudyAcquisition(2.5, 1.00, 0.07, 0.15, 1.00, 0.105),
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
#: A subject's atrophy runs on an age of its own, drawn around its chronological age (sd,
#: years), at a rate of its own (lognormal sd): brains of one age differ in volume, and
#: anatomy must not give a subject's age exactly (the T1w channel, the pretraining cohort).
ATROPHY_AGE_SD_YEARS = 6.0
ATROPHY_RATE_SD = 0.3
#: Random stream (spawn key) of the atrophy course, apart from the others, so that a
#: seed's stiffness, pose, noise and T1w intensities do not depend on it.
ATROPHY_STREAM = 5
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

# Damping ratio xi = G'' / (2 G') (dimensionless; 0 = purely elastic). Sources read:
# - Definition, maps in MNI space: Hiscox et al. 2020, Hum Brain Mapp 41(18):5282-5300
#   (MRE134 atlas: 134 adults of 18-35 years at 50 Hz; github.com/mechneurolab/MRE134).
#   Subcortical grey matter, white-matter tracts and cortex differ in mu and xi.
# - Johnson et al. 2016, Hum Brain Mapp 37:4221: subcortical grey-matter structures differ
#   from each other and from the cerebrum in xi as well as in stiffness.
# - Weak age effect: Hiscox et al. 2018 (PMC5883326; young 19-30 against older 66-73
#   years): stiffness lower in every region but the hippocampus, xi not different.
#   Delgorio et al. 2021, Cereb Cortex 31(6):2799-2811: xi of the hippocampal subfields
#   higher with age (P = 0.002). Hence a small positive slope, far weaker than stiffness's.
# - White matter more dissipative than grey matter in transversely isotropic inversions
#   ("Mechanical stiffness and anisotropy measured by MRE during brain development in the
#   minipig"; an animal study, taken as the direction only).
# The regional values are simulation choices inside the typical healthy range of 0.1-0.3;
# the regional tables of these papers were not at hand, so no value is copied from one.
#: Relative change of the tissue damping ratio per year of (stiffness) age, all regions.
DAMPING_RATIO_SLOPE_PERCENT_PER_YEAR = 0.15
#: CSF inside the brain mask: inversions of fluid return a high damping ratio.
CSF_DAMPING_RATIO = 0.30
#: Relative sd of a subject's whole-brain and per-region damping ratio.
SUBJECT_DAMPING_RATIO_SD = 0.05
REGION_DAMPING_RATIO_SD = 0.04
DAMPING_RATIO_BIAS_SD = 0.04
#: Finite values stay strictly positive, so the map's support equals the stiffness map's.
DAMPING_RATIO_LIMITS = (0.01, 1.0)
#: The MRE maps a cohort can write; stiffness is the pipeline's input and always written.
MRE_MAPS = ("stiffness", "damping_ratio")


@dataclass(frozen=True)
class Region:
    """A tissue region: stiffness at 30 years (kPa) and its ageing slope (%/year), and the
    damping ratio at 30 years (dimensionless)."""

    name: str
    baseline_kpa: float
    slope_percent_per_year: float
    # Deep structures: (centre MNI mm, semi-axes mm); both hemispheres when x != 0.
    ellipsoid: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    damping_ratio: float = 0.22


REGIONS = (
    Region("cortical_gm", 2.6, -0.40, damping_ratio=0.19),
    Region("white_matter", 2.9, -0.50, damping_ratio=0.25),
    Region("caudate", 3.0, -0.55, ((13, 12, 10), (5, 9, 8)), damping_ratio=0.28),
    Region("putamen", 3.4, -0.55, ((25, 2, 1), (5, 13, 8)), damping_ratio=0.25),
    Region("pallidum", 3.4, -0.50, ((19, -3, -1), (3.5, 6, 4)), damping_ratio=0.22),
    Region("thalamus", 3.2, -0.55, ((11, -18, 7), (7, 11, 7)), damping_ratio=0.26),
    Region("hippocampus", 2.7, 0.0, ((27, -22, -14), (6, 15, 6)), damping_ratio=0.23),
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

#: Truth columns of a simulated subject's pose and grid (:func:`_pose_truth`), shared by
#: the MRE and the T1w-only cohorts.
POSE_TRUTH_COLUMNS = {
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
}

#: Truth columns of the atrophy model and the volumes it gives, shared by both cohorts.
ATROPHY_TRUTH_COLUMNS = {
    "atrophy_age_years": "the age the subject's atrophy follows (chronological age plus a "
                         "subject's own offset; years)",
    "atrophy_rate_factor": "the subject's own factor on the atrophy rates",
    "cortical_shrink_mm": "outer brain surface retreat from atrophy (template mm)",
    "ventricle_dilation_mm": "ventricle wall retreat from atrophy (template mm)",
    "brain_volume_ml": "truth mask volume in native space (ml)",
    "parenchyma_volume_ml": "grey + white matter volume in template space (ml)",
}

TRUTH_COLUMNS = {
    "participant_id": "sub-<label>, as in participants.tsv",
    "study": "study name",
    "group": "healthy or accelerated",
    "age": "chronological age (years); drives the anatomy (atrophy)",
    "sex": "F or M",
    "stiffness_age_offset_years": "years added to age for the stiffness model",
    "stiffness_age_years": "age + offset: the age the stiffness was simulated at (years)",
    **POSE_TRUTH_COLUMNS,
    "coverage_fraction": "brain voxels (truth mask) inside the MRE slab / all brain voxels",
    "slab_first_slice": "first native k index (0-based) of the slab",
    "slab_last_slice": "last native k index (inclusive) of the slab",
    "nan_count": "NaN voxels in the stiffness map (all inside truth mask and slab)",
    **ATROPHY_TRUTH_COLUMNS,
    "site_stiffness_factor": "study's multiplicative stiffness offset",
    "subject_stiffness_factor": "subject's multiplicative random effect (with sex effect)",
    "mean_stiffness_kpa": "mean of the finite non-zero voxels of the written map (kPa)",
}

#: Columns appended to :data:`TRUTH_COLUMNS` when the cohort writes damping-ratio maps.
DAMPING_RATIO_TRUTH_COLUMNS = {
    "damping_ratio_age_factor": "tissue damping ratio at stiffness_age_years relative to 30 "
                                "years: exp(slope / 100 * (stiffness_age_years - 30))",
    "site_damping_ratio_factor": "study's multiplicative damping-ratio offset",
    "subject_damping_ratio_factor": "subject's multiplicative damping-ratio random effect",
    "mean_damping_ratio": "mean of the finite non-zero voxels of the damping-ratio map",
}


class SimulatedSubject(NamedTuple):
    """Arrays (native grid) and ground truth of one subject."""

    affine: np.ndarray            # 4x4 native voxel -> native world mm
    maps: dict[str, np.ndarray]   # MRE map name -> float32 array (stiffness in kPa)
    t1w: np.ndarray | None        # int16 T1w-like image, or None without anatomy
    brain: np.ndarray             # bool truth mask
    truth: dict                   # one row of truth.tsv


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


def one_blas_thread():
    """A context in which BLAS runs on one thread: OpenBLAS splits a product's sums by its
    thread count, so a simulation from the command line (every core) differed from the
    rule's (Snakemake's one thread) in the last bit of a few voxels, against "the same seed
    gives identical files on one machine". threadpoolctl comes with scikit-learn; where it
    is absent (envs/preprocess.yaml), Snakemake's job environment limits BLAS to the job's
    threads already."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


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


@dataclass(frozen=True)
class _Atrophy:
    """A subject's anatomy (template space, brain voxel vectors)."""

    tissue: np.ndarray       # grey + white matter probability left after atrophy
    kept_share: np.ndarray   # tissue / template tissue (0 where the template had none)
    shrink_mm: float         # outer brain surface retreat (template mm)
    ventricle_mm: float      # ventricle wall retreat (template mm)
    age_years: float         # the age the atrophy follows
    rate_factor: float       # the subject's factor on the atrophy rates

    def truth(self) -> dict:
        return {"atrophy_age_years": self.age_years, "atrophy_rate_factor": self.rate_factor,
                "cortical_shrink_mm": self.shrink_mm, "ventricle_dilation_mm": self.ventricle_mm}


def draw_atrophy_course(seed: int, id_prefix: str, stream: int, index: int,
                        age: float) -> tuple[float, float]:
    """A subject's atrophy age (years) and rate factor, from a random stream of its own:
    its chronological age plus a normal offset (sd :data:`ATROPHY_AGE_SD_YEARS`), and a
    lognormal factor (sd :data:`ATROPHY_RATE_SD`)."""
    rng = np.random.default_rng(seed_sequence(seed, id_prefix, stream, index))
    return (age + float(rng.normal(0.0, ATROPHY_AGE_SD_YEARS)),
            float(rng.lognormal(0.0, ATROPHY_RATE_SD)))


def _atrophy(anatomy: _TemplateAnatomy, atrophy_age: float, rate_factor: float = 1.0
             ) -> _Atrophy:
    """Atrophy after 40 years of ``atrophy_age`` at ``rate_factor`` times the rates below
    (see the module docstring of the package)."""
    years_atrophy = max(atrophy_age - ATROPHY_ONSET_YEARS, 0.0) * rate_factor
    shrink_mm = CORTICAL_SHRINK_MM_PER_YEAR * years_atrophy
    ventricle_mm = VENTRICLE_DILATION_MM_PER_YEAR * years_atrophy
    lost = min(PARTIAL_VOLUME_LOSS_PER_YEAR * years_atrophy, 0.9)
    tissue = np.clip((anatomy.tissue_probability - lost) / (1.0 - lost), 0.0, 1.0)
    tissue *= np.clip((anatomy.ventricle_distance_mm - (ventricle_mm - 2.0)) / 2.0, 0.0, 1.0)
    tissue *= np.clip((anatomy.brain_signed_distance_vec - shrink_mm) / 2.0 + 0.5, 0.0, 1.0)
    kept_share = np.divide(tissue, anatomy.tissue_probability,
                           out=np.zeros_like(tissue), where=anatomy.tissue_probability > 0)
    return _Atrophy(tissue, kept_share, shrink_mm, ventricle_mm, float(atrophy_age),
                    float(rate_factor))


@dataclass(frozen=True)
class _Pose:
    """A subject's head pose and its native grid."""

    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    scale: float
    pose: np.ndarray                       # MNI mm -> native mm
    native_affine: np.ndarray
    shape: tuple[int, int, int]
    native_to_template_voxel: np.ndarray


def _draw_pose(rng: np.random.Generator, anatomy: _TemplateAnatomy,
               voxel_size_mm: float) -> _Pose:
    """Random rotation, translation and head size, and the native grid holding the head."""
    rotation = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=3)
    translation = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, size=3)
    scale = 1.0 + rng.uniform(-MAX_SCALE_CHANGE, MAX_SCALE_CHANGE)
    pose = pose_to_native_affine(rotation, translation, scale)
    native_affine, shape = _native_grid(pose, anatomy.head_corners_mm, voxel_size_mm)
    native_to_template_voxel = (np.linalg.inv(anatomy.affine) @ np.linalg.inv(pose)
                                @ native_affine)
    return _Pose(rotation, translation, scale, pose, native_affine, shape,
                 native_to_template_voxel)


def _truth_mask(anatomy: _TemplateAnatomy, pose: _Pose, shrink_mm: float):
    """The atrophied template brain mask on the native grid, and the brain's bounding box
    (outside it every map is 0, so maps are only computed inside)."""
    brain_box = _native_box(pose.pose, anatomy.brain_corners_mm, pose.native_affine,
                            pose.shape)
    brain = np.zeros(pose.shape, dtype=bool)
    brain[brain_box] = _resample(anatomy.brain_signed_distance_mm,
                                 pose.native_to_template_voxel, pose.shape, outside=-100.0,
                                 box=brain_box) > shrink_mm
    return brain, brain_box


def _t1w_image(rng: np.random.Generator, anatomy: _TemplateAnatomy, atrophy: _Atrophy,
               pose: _Pose, *, bias_sd: float = T1W_BIAS_SD, noise_sd: float = T1W_NOISE_SD,
               contrast_exponent: float = 1.0, gain: float = 1.0) -> np.ndarray:
    """The T1w-like image (int16, arbitrary units) of the atrophied head on the native grid.

    ``contrast_exponent`` (applied to the noiseless intensities, white matter ~0.88) and
    ``gain`` (signal and noise alike) are a scanner's contrast and intensity scaling; at
    1.0 they are skipped, so the MRE cohort's images stay bit-identical.
    """
    brain_t1w = atrophy.kept_share * anatomy.template_t1w + (1.0 - atrophy.kept_share) * T1W_CSF
    t1w_template = anatomy.head_t1w.copy()
    t1w_template.ravel()[anatomy.brain_flat_index] = brain_t1w
    if contrast_exponent != 1.0:
        np.power(t1w_template, contrast_exponent, out=t1w_template)
    t1w = _resample(t1w_template, pose.native_to_template_voxel, pose.shape, outside=0.0)
    t1w *= _legendre_bias(rng, pose.shape, bias_sd)
    # Rician magnitude noise: the background is noise, not zeros, as in a scanner.
    real = t1w + rng.normal(0.0, noise_sd, size=pose.shape).astype(np.float32)
    imaginary = rng.normal(0.0, noise_sd, size=pose.shape).astype(np.float32)
    magnitude = np.hypot(real, imaginary) * T1W_SCALE
    if gain != 1.0:
        magnitude *= gain
    return np.round(magnitude).astype(np.int16)


def _damping_ratio_map(rng: np.random.Generator, anatomy: _TemplateAnatomy,
                       atrophy: _Atrophy, pose: _Pose, *, stiffness: np.ndarray,
                       brain_box, acquisition: StudyAcquisition, stiffness_age: float):
    """The damping-ratio map (float32, dimensionless) on the stiffness map's grid.

    Zero exactly where the stiffness map is zero, NaN where it is NaN, finite values in
    :data:`DAMPING_RATIO_LIMITS`. Drawn from its own generator ``rng``, so asking for it
    changes nothing of the stiffness or the anatomy. Returns ``(map, truth columns)``.
    """
    age_factor = float(np.exp(DAMPING_RATIO_SLOPE_PERCENT_PER_YEAR / 100.0
                              * (stiffness_age - REFERENCE_AGE_YEARS)))
    region_damping = np.array([region.damping_ratio for region in REGIONS]) * age_factor \
        * rng.lognormal(0.0, REGION_DAMPING_RATIO_SD, size=len(REGIONS))
    with one_blas_thread():
        tissue_damping = region_damping.astype(np.float32) @ anatomy.region_weights
    subject_factor = float(rng.lognormal(0.0, SUBJECT_DAMPING_RATIO_SD))
    brain_damping = (atrophy.tissue * tissue_damping
                     + (1.0 - atrophy.tissue) * CSF_DAMPING_RATIO) * (
        subject_factor * acquisition.damping_ratio_factor)
    damping_template = brain_damping[anatomy.nearest_brain_voxel]

    damping_box = _resample(damping_template, pose.native_to_template_voxel, pose.shape,
                            outside=0.0, box=brain_box)
    damping_box *= _legendre_bias(rng, pose.shape, DAMPING_RATIO_BIAS_SD, brain_box)
    damping_box *= 1.0 + _smoothed_noise(rng, damping_box.shape,
                                         acquisition.damping_ratio_noise_sd)
    np.clip(damping_box, *DAMPING_RATIO_LIMITS, out=damping_box)
    damping = np.zeros(pose.shape, dtype=np.float32)
    damping[brain_box] = damping_box
    damping[stiffness == 0] = 0.0
    damping[np.isnan(stiffness)] = np.nan
    support = damping != 0
    truth = {
        "damping_ratio_age_factor": age_factor,
        "site_damping_ratio_factor": acquisition.damping_ratio_factor,
        "subject_damping_ratio_factor": subject_factor,
        "mean_damping_ratio": float(np.nanmean(damping[support])),
    }
    return damping, truth


def check_maps(maps) -> tuple[str, ...]:
    """Validate a ``maps`` option: a list of :data:`MRE_MAPS` names including stiffness."""
    if isinstance(maps, str):
        maps = [maps]
    chosen = tuple(maps)
    unknown = [name for name in chosen if name not in MRE_MAPS]
    if unknown or "stiffness" not in chosen or len(set(chosen)) != len(chosen):
        raise OptionError(
            f"{{given}}: give each MRE map once, from {list(MRE_MAPS)}, and always "
            f"'stiffness' (the pipeline's input), e.g. {{example}}. A T1w-only cohort is "
            f"simulate_t1w_cohort (CLI --t1w-only).",
            given=("maps", list(chosen)), example=("maps", ["stiffness", "damping_ratio"]))
    return chosen


def simulate_subject(subject: dict, *, seed: int, id_prefix: str, index: int,
                     with_anatomy: bool, nan_probability: float,
                     maps=("stiffness",)) -> SimulatedSubject:
    """Images and ground truth of one subject; see the module docstring for the model.

    Parameters
    ----------
    subject : dict
        One row of :func:`draw_participants` (age in years, sex, study,
        stiffness_age_offset_years, participant_id, group).
    seed, id_prefix, index : int, str, int
        Select the subject's own random streams, independent of the other subjects.
    with_anatomy : bool
        Also build the T1w-like image.
    nan_probability : float
        Chance of 1-10 NaN voxels in the maps.
    maps : sequence of str
        MRE maps to return, from :data:`MRE_MAPS` (stiffness always). The damping ratio
        is drawn from a stream of its own: stiffness, T1w and anatomy do not change.

    Returns
    -------
    SimulatedSubject
        ``(affine 4x4, maps {name: float32 array; stiffness in kPa, damping_ratio
        dimensionless}, t1w int16 or None, truth mask bool, truth dict)``; arrays share
        the native grid.
    """
    maps = check_maps(maps)
    anatomy = _template_anatomy()
    rng = np.random.default_rng(seed_sequence(seed, id_prefix, 1, index))
    acquisition = STUDY_ACQUISITION[subject["study"]]
    age = float(subject["age"])
    stiffness_age = age + float(subject["stiffness_age_offset_years"])

    # Anatomy at the subject's own atrophy age and rate (template space, brain voxels only).
    atrophy = _atrophy(anatomy, *draw_atrophy_course(seed, id_prefix, ATROPHY_STREAM, index,
                                                     age))

    # Stiffness at the stiffness age.
    ageing = _age_years_from_reference(stiffness_age)
    region_stiffness = np.array([
        region.baseline_kpa * np.exp(region.slope_percent_per_year / 100.0 * ageing)
        for region in REGIONS]) * rng.lognormal(0.0, REGION_STIFFNESS_SD, size=len(REGIONS))
    with one_blas_thread():
        tissue_stiffness = region_stiffness.astype(np.float32) @ anatomy.region_weights
    subject_factor = float(rng.lognormal(0.0, SUBJECT_STIFFNESS_SD)) * (
        FEMALE_STIFFNESS_FACTOR if subject["sex"] == "F" else 1.0)
    brain_stiffness = (atrophy.tissue * tissue_stiffness
                       + (1.0 - atrophy.tissue) * CSF_STIFFNESS_KPA) * (
        subject_factor * acquisition.stiffness_factor)
    # Outside the brain, the nearest brain value: interpolation at the edge stays unbiased.
    stiffness_template = brain_stiffness[anatomy.nearest_brain_voxel]

    pose = _draw_pose(rng, anatomy, acquisition.voxel_size_mm)
    brain, brain_box = _truth_mask(anatomy, pose, atrophy.shrink_mm)
    first, last = _slab(rng, brain, acquisition.low_coverage_probability)
    covered = brain.copy()
    covered[:, :, :first] = False
    covered[:, :, last + 1:] = False

    stiffness_box = _resample(stiffness_template, pose.native_to_template_voxel, pose.shape,
                              outside=0.0, box=brain_box)
    stiffness_box *= _legendre_bias(rng, pose.shape, STIFFNESS_BIAS_SD, brain_box)
    stiffness_box *= 1.0 + _smoothed_noise(rng, stiffness_box.shape, acquisition.noise_sd)
    np.clip(stiffness_box, *STIFFNESS_LIMITS_KPA, out=stiffness_box)
    stiffness = np.zeros(pose.shape, dtype=np.float32)
    stiffness[brain_box] = stiffness_box
    stiffness[~covered] = 0.0
    nan_count = 0
    if rng.uniform() < nan_probability:
        candidates = np.flatnonzero(covered)
        nan_count = int(min(rng.integers(1, 11), candidates.size))
        stiffness.ravel()[rng.choice(candidates, size=nan_count, replace=False)] = np.nan

    t1w = _t1w_image(rng, anatomy, atrophy, pose) if with_anatomy else None

    voxel_ml = acquisition.voxel_size_mm ** 3 / 1000.0
    truth = {
        "participant_id": subject["participant_id"], "study": subject["study"],
        "group": subject["group"], "age": age, "sex": subject["sex"],
        "stiffness_age_offset_years": float(subject["stiffness_age_offset_years"]),
        # 6 decimals, not 1: an offset of any number of years (8.25) stays age + offset;
        # ages and offsets in whole tenths write the same value as before
        "stiffness_age_years": round(stiffness_age, 6),
        **_pose_truth(pose),
        "voxel_size_mm": acquisition.voxel_size_mm, "shape": json.dumps(list(pose.shape)),
        "coverage_fraction": float(covered.sum() / brain.sum()),
        "slab_first_slice": first, "slab_last_slice": last, "nan_count": nan_count,
        **atrophy.truth(), "brain_volume_ml": float(brain.sum() * voxel_ml),
        "parenchyma_volume_ml": _parenchyma_volume_ml(anatomy, atrophy),
        "site_stiffness_factor": acquisition.stiffness_factor,
        "subject_stiffness_factor": subject_factor,
        "mean_stiffness_kpa": float(np.nanmean(stiffness[covered])),
    }
    written = {"stiffness": stiffness}
    if "damping_ratio" in maps:
        damping_rng = np.random.default_rng(seed_sequence(seed, id_prefix, 2, index))
        written["damping_ratio"], damping_truth = _damping_ratio_map(
            damping_rng, anatomy, atrophy, pose, stiffness=stiffness, brain_box=brain_box,
            acquisition=acquisition, stiffness_age=stiffness_age)
        truth.update(damping_truth)
    return SimulatedSubject(pose.native_affine, written, t1w, brain, truth)


def _pose_truth(pose: _Pose) -> dict:
    """The pose columns of a truth table (see TRUTH_COLUMNS)."""
    return {
        "rotation_x_deg": pose.rotation_deg[0], "rotation_y_deg": pose.rotation_deg[1],
        "rotation_z_deg": pose.rotation_deg[2],
        "translation_x_mm": pose.translation_mm[0], "translation_y_mm": pose.translation_mm[1],
        "translation_z_mm": pose.translation_mm[2], "scale": pose.scale,
        "native_to_mni_affine": json.dumps(np.linalg.inv(pose.pose).round(10).tolist()),
    }


def _parenchyma_volume_ml(anatomy: _TemplateAnatomy, atrophy: _Atrophy) -> float:
    return float(atrophy.tissue.sum() * abs(np.linalg.det(anatomy.affine)) / 1000.0)
