"""A simulated multi-study MR-elastography cohort, written in the pipeline's input layout.

Real MRE data cannot be shipped, so the demo and the tests run on a cohort simulated
from nilearn's bundled MNI152 (ICBM 2009a nonlinear symmetric) template and its grey/white-matter
probability maps, offline and deterministically from a seed.

On-disk layout written by :func:`simulate_cohort` (``root`` is the BIDS-like dataset)::

    root/dataset_description.json                 BIDS, DatasetType "raw", GeneratedBy
    root/.bidsignore                              sub-*/mre (BIDS has no MRE datatype)
    root/participants.tsv                         participant_id, age, sex, study, group
    root/participants.json                        column descriptions
    root/sub-<label>/mre/sub-<label>_stiffness.nii.gz   float32, shear stiffness, kPa
    root/sub-<label>/mre/sub-<label>_damping_ratio.nii.gz  float32, 0-1 (maps option)
    root/sub-<label>/anat/sub-<label>_T1w.nii.gz        int16, same grid (with_anatomy)
    root/derivatives/simulation/dataset_description.json
    root/derivatives/simulation/truth.tsv         one row per subject (see TRUTH_COLUMNS)
    root/derivatives/simulation/truth.json        the same column descriptions
    root/derivatives/simulation/.bidsignore       truth.tsv and truth.json
    root/derivatives/simulation/sub-<label>/sub-<label>_desc-truth_mask.nii.gz

The ground truth lives under ``derivatives/`` so that a pipeline reading
``sub-*/mre`` never sees it. :func:`simulate_t1w_cohort` writes a T1w-only cohort for
pretraining instead (own subjects, ``anat`` only; see :mod:`brainage.simulate.t1w_cohort`).

Native space
------------
Each subject's native grid is axis-aligned with its world axes (diagonal affine, RAS,
sform/qform code 1), isotropic at the study's MRE voxel size (2.0-3.0 mm, see
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
- Demographics: the paper's Table 2 (docs/method.md §1), scaled down proportionally.
- Atrophy after 40 years: the cortical surface retreats, partial-volume tissue turns
  into CSF (sulci widen) and the ventricles enlarge; together 0.29 %/year of
  parenchymal volume after 40, 14 % by 90 (longitudinal MRI: 0.2-0.5 %/year, Fotenos 2005,
  Fjell 2009). Each subject follows a course of its own: an atrophy age (its age plus a
  normal offset, sd 6 years) and a rate factor (lognormal, sd 0.3), so that brains of one
  age differ (their volume alone would otherwise give the age).
- Stiffness: tissue baselines at age 30 (cortical GM 2.6, WM 2.9, deep GM 3.0-3.4 kPa,
  Johnson 2016, Hiscox 2016), exponential decline of 0.40-0.55 %/year by region, 1.5 x
  faster after 60 (Sack 2011: -0.75 %/year whole brain; Lv 2020: -0.32...-0.36 %/year,
  faster after 60), none in the hippocampus (Hiscox 2018), women 2 % stiffer (Sack
  2009; Arani 2015 found small sex effects), per-subject and per-region random effects,
  site (study) offsets and noise, a smooth inversion bias, partial slab coverage
  (paper Appendix Fig. 7) and occasional NaN voxels (failed inversions).
- Damping ratio (``maps`` option): xi = G''/(2 G'), regional values at 30 years of
  0.19 (cortex) to 0.28 (caudate), white matter 0.25, CSF 0.30; +0.15 %/year, far
  weaker than stiffness's decline (Hiscox 2018: no young-old difference; Delgorio 2021:
  higher with age in the hippocampal subfields); own subject, region and site effects,
  bias and noise, from a random stream of its own (sources in
  :mod:`brainage.simulate.anatomy`). Same grid, support and NaN voxels as the stiffness.
"""

from brainage.simulate.anatomy import (
                                       DAMPING_RATIO_TRUTH_COLUMNS,
                                       MRE_MAPS,
                                       TRUTH_COLUMNS,
                                       pose_to_native_affine,
)
from brainage.simulate.cohort import (
                                       main,
                                       replace_simulation,
                                       simulate_cohort,
                                       simulated_participants,
                                       simulation_options,
)
from brainage.simulate.demographics import (
                                       ACCELERATED_STUDY,
                                       STUDY_TABLE,
                                       draw_participants,
                                       study_table,
)
from brainage.simulate.t1w_cohort import (
                                       T1W_TRUTH_COLUMNS,
                                       draw_t1w_participants,
                                       simulate_t1w_cohort,
)

__all__ = [
    "STUDY_TABLE", "ACCELERATED_STUDY", "TRUTH_COLUMNS", "DAMPING_RATIO_TRUTH_COLUMNS",
    "MRE_MAPS", "T1W_TRUTH_COLUMNS", "study_table", "draw_participants",
    "draw_t1w_participants", "pose_to_native_affine", "simulate_cohort",
    "simulate_t1w_cohort", "simulated_participants", "simulation_options",
    "replace_simulation", "main",
]
