"""Bias-field correction (step ``correct_bias`` of rule ``correct_and_register``): ANTs N4
inside the brain.

The paper applies N4 to the stiffness map itself; we do the same (and to the moduli), not
to the damping ratio (:mod:`brainage.modalities`), and to the anatomical reference that
registration aligns. N4 must get a mask: on an image with a zero
background and no mask it fits the field to the background and changes nothing useful.
The stiffness map's mask is the brain mask AND the map's own support (zero beyond the MRE
slab is "no data", not tissue).

N4's field has an arbitrary scale, so the corrected image is rescaled to keep its mean
inside the mask: the map stays in kPa and subjects stay comparable before the dataset-wide
normalisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from brainage.inputs import MADE_AGAIN, InputError
from brainage.modalities import modality
from brainage.preprocess.images import (
    PreprocessError,
    clean_nonfinite,
    configure_itk_threads,
    deeper_than,
    filled_in_any_plane,
    load_mask,
    load_volume,
    require_same_grid,
    save_volume,
)
from brainage.preprocess.skullstrip import read_reference_info

log = logging.getLogger(__name__)

#: A subject's map after the first should have data wherever the first has, but within
#: this distance (mm) of the first map's edge: maps resampled from another grid (onto a
#: T1w's) differ there by partial volume, e.g. a damping ratio whose NaN background (0/0)
#: grows inwards while the stiffness map's positive region grows outwards. In mm, not
#: voxels: one voxel of a native 3 mm grid, two or three of a T1w's.
COVERAGE_EDGE_MM = 3.0

#: N4 settings. The first B-spline mesh spans every 200 mm (ANTs' usual brain setting) and
#: each of the 3 fitting levels halves it (final knots ~50 mm apart); the field is fitted
#: on a grid of about 10 mm. Both in mm, so the result does not depend on the voxel size.
#: Fewer levels than ANTs' 4 keep the field smooth: regional stiffness differences (deep
#: grey matter vs cortex) carry the age signal and must not be absorbed as "bias". On a
#: 2 mm phantom with a +-15 % field (tests/test_preprocess.py) the log-field spread
#: drops from 0.073 to 0.025-0.027; 4 levels leave 0.046 (tissue contrast flattened).
N4_ITERATIONS = (50, 50, 50)
N4_TOLERANCE = 1e-7
N4_WORKING_SPACING_MM = 10.0
N4_SPLINE_DISTANCE_MM = 200.0


def n4_inside_mask(data: np.ndarray, mask: np.ndarray, affine: np.ndarray, *,
                   what: str = "image") -> np.ndarray:
    """N4-correct ``data`` inside ``mask``; zero outside, mean inside the mask unchanged.

    Parameters
    ----------
    data : float32 [X, Y, Z], positive inside ``mask`` (kPa or T1w units).
    mask : bool [X, Y, Z].
    affine : voxel -> world mm (the spline mesh is set in mm).
    what : the image, for messages (e.g. "subject sub-01: stiffness map <path>").

    Returns
    -------
    float32 [X, Y, Z].
    """
    import ants

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    image = ants.from_numpy(data.astype(np.float32), spacing=tuple(float(s) for s in spacing))
    ants_mask = ants.from_numpy(mask.astype(np.float32), spacing=tuple(float(s) for s in spacing))
    extent_mm = np.array(data.shape) * spacing
    mesh = [max(int(round(e / N4_SPLINE_DISTANCE_MM)), 1) for e in extent_mm]
    shrink = int(max(1, min(round(N4_WORKING_SPACING_MM / spacing.min()), min(data.shape) // 8)))
    corrected = ants.n4_bias_field_correction(
        image, mask=ants_mask, shrink_factor=shrink,
        convergence={"iters": list(N4_ITERATIONS), "tol": N4_TOLERANCE}, spline_param=mesh)
    result = np.where(mask, corrected.numpy(), 0).astype(np.float32)
    inside_before = float(data[mask].mean())
    inside_after = float(result[mask].mean())
    if not np.isfinite(inside_after) or inside_after <= 0:
        raise PreprocessError(
            f"{what}: N4 returned a non-positive or non-finite image inside the brain mask "
            f"(mean {inside_after}). Look at the map and its mask, or set preprocess.n4: "
            f"false for maps that are already bias-free.")
    return (result * np.float32(inside_before / inside_after)).astype(np.float32)


def _warn_of_holes(data: np.ndarray, interior: np.ndarray, what: str, where: str,
                   max_nan_fraction: float) -> None:
    """Warn of a map without data (0 or negative) over more than ``max_nan_fraction`` of
    ``interior`` (``where`` describes it): a further map where the grid map has data more
    than :data:`COVERAGE_EDGE_MM` inside its edge, the grid map where its own data enclose
    the brain. Those voxels become background, the channel's training mean. The same holes
    stored as NaN stop the subject (:func:`clean_nonfinite`); stored as 0 or -1 (a damping
    ratio masked more tightly than the stiffness, an inversion's failed voxels: a review's
    hole of 1.2 % of the brain moved a predicted age by 2.5 years) they went on without a
    word. Warned, not refused: an inversion may leave the ventricles without data. Give
    ``interior`` without the map's NaN voxels: :func:`clean_nonfinite` counts those."""
    holes, inside = int(np.count_nonzero(interior & (data <= 0))), int(interior.sum())
    if inside and holes > max_nan_fraction * inside:
        log.warning("%s has no data (0 or negative) in %d of the %d voxels %s (%.1f%%, more "
                    "than preprocess.max_nan_fraction=%g): they become background, read as "
                    "the channel's mean. Check the map's own mask or threshold: a failed "
                    "inversion, or ventricles the inversion left without data (then "
                    "expected). NaN holes are counted against that setting instead.", what, holes,
                    inside, where, 100 * holes / inside, max_nan_fraction)


def correct_bias(maps: Mapping[str, str | Path], mask: str | Path, reference: str | Path,
                 reference_info: str | Path, out_maps: Mapping[str, str | Path],
                 out_reference: str | Path, *, n4: bool = True, max_nan_fraction: float = 0.01,
                 threads: int = 1, deterministic: bool = True, subject: str = "") -> dict:
    """Clean and bias-correct the subject's MRE maps and the registration reference.

    Every map, on the brain mask's grid: NaN/inf voxels -> background (refused above
    ``max_nan_fraction`` of the brain), zero outside the brain mask, non-positive voxels ->
    background; values outside the modality's valid range (a damping ratio outside [0, 1])
    stop with the subject and the file named. The first map is the grid map: its support
    is the slab's coverage, and the other maps keep data only there (one acquisition, one
    coverage). Then N4 inside brain mask AND support for the modalities that take it
    (``n4``; pass-through when false; :data:`brainage.modalities.MODALITIES`).
    The reference: N4 inside its non-zero support (skull-stripped T1w), inside a head mask
    (T1w as given), or the corrected grid map itself (no T1w).

    Parameters
    ----------
    maps : ``{modality: native map}`` of the MRE maps, grid map first (kPa, or
        dimensionless for the damping ratio); empty for a cohort without MRE maps.
    mask : brain mask on the maps' grid (from ``strip_skull``).
    reference, reference_info : registration reference and its sidecar (``strip_skull``).
    out_maps : ``{modality: corrected map}`` (float32 NIfTI), the keys of ``maps``.
    out_reference : corrected reference (float32 NIfTI).
    n4 : config key ``preprocess.n4``.
    max_nan_fraction : config key ``preprocess.max_nan_fraction``.
    threads, deterministic : ITK threads (one when deterministic).
    subject : label for messages.

    Returns
    -------
    dict with ``nonfinite_voxels`` ({modality: count}), ``brain_voxels``,
    ``covered_voxels`` (grid map voxels with data in the brain), ``n4``.

    Raises
    ------
    brainage.inputs.InputError : corrupt/empty map, too many NaN voxels, grids differ, values
        outside the modality's range.
    PreprocessError : no non-zero voxel of the grid map inside the brain mask, or of another
        map where the grid map has data.
    """
    name = f"subject sub-{subject}" if subject else "subject"
    configure_itk_threads(threads, deterministic=deterministic)
    brain, mask_affine = load_mask(mask, what=f"{name}: brain mask")
    corrected: dict[str, np.ndarray] = {}
    nonfinite: dict[str, int] = {}
    covered, grid_description = None, ""  # the grid map's coverage and name, once read
    interior = None  # its voxels deeper than COVERAGE_EDGE_MM, once a further map needs them
    affine = mask_affine
    for modality_name, path in maps.items():
        kind = modality(modality_name)
        what = f"{name}: {kind.description} {path}"
        data, affine = load_volume(path, what=f"{name}: {kind.description}")
        finite = np.isfinite(data)  # its NaN holes are clean_nonfinite's to count
        require_same_grid(data.shape, affine, what, brain.shape, mask_affine,
                          f"brain mask {mask}")
        # a map after the grid map should have data wherever the grid map has, but for
        # the edge, where maps resampled from another grid differ by partial volume
        if covered is not None and interior is None:  # every map is on the grid map's grid
            interior = deeper_than(covered, affine, COVERAGE_EDGE_MM)
        data, nonfinite[modality_name] = clean_nonfinite(
            data, brain, max_fraction=max_nan_fraction, what=what,
            within=None if covered is None else (
                interior, f"where the {grid_description} has data (more than "
                          f"{COVERAGE_EDGE_MM:g} mm inside its edge)"))
        check_range(data, brain if covered is None else covered, kind, what=what)
        outside = int(np.count_nonzero((data != 0) & ~brain))
        negative = int(np.count_nonzero((data < 0) & brain))
        data = np.where(brain & (data > 0), data, 0).astype(np.float32)
        if covered is None:  # the grid map: its support is the acquisition's coverage
            covered, grid_description = data > 0, f"{kind.description} {path}"
            log.info("%s: %d non-zero map voxels outside the brain mask set to 0; %d negative "
                     "voxels inside set to 0; %d of %d brain voxels have data (%.1f%%)", name,
                     outside, negative, covered.sum(), brain.sum(),
                     100 * covered.sum() / brain.sum())
            if not covered.any():
                raise PreprocessError(
                    f"{name}: no positive voxel of {path} lies inside the brain mask {mask}. "
                    f"The mask and the map do not overlap: check that the T1w and the map "
                    f"are in the same space, or use preprocess.skullstrip: none for maps "
                    f"already masked.")
            _warn_of_holes(data, filled_in_any_plane(covered) & brain & finite, what,
                           "of the brain that its own data enclose", max_nan_fraction)
        else:
            if negative:
                log.info("%s: %d negative voxels of %s inside the brain mask set to 0", name,
                         negative, path)
            data = np.where(covered, data, 0).astype(np.float32)
            if not data.any():
                # Otherwise an all-zero channel went on to training (the damping ratio, or
                # with preprocess.n4 false), or N4 was blamed for its empty mask.
                raise PreprocessError(
                    f"{what} has no positive voxel where the {grid_description} has data "
                    f"inside the brain mask {mask}. Check that it is this subject's map of the "
                    f"same acquisition, or remove {kind.name} from config key "
                    f"dataset.modalities.")
            _warn_of_holes(data, interior & finite, what, f"more than {COVERAGE_EDGE_MM:g} mm inside "
                           f"the {grid_description}'s data", max_nan_fraction)
        if n4 and kind.n4:
            log.info("%s: N4 on the %s inside brain mask and map support", name,
                     kind.description)
            data = n4_inside_mask(data, data > 0, affine, what=what)
        corrected[modality_name] = data
    if not n4:
        log.info("%s: preprocess.n4 is false; bias correction skipped (maps cleaned only)", name)

    info = read_reference_info(reference_info)
    reference_data, reference_affine = load_volume(reference, what=f"{name}: reference image",
                                                   remedy=MADE_AGAIN)
    reference_kind = info["reference_kind"]
    if reference_kind in corrected:  # no T1w: the corrected grid map is the reference
        reference_data, reference_affine = corrected[reference_kind], affine
    elif n4:
        if reference_kind == "T1w_brain":
            reference_mask = reference_data > 0
        else:
            import ants

            head = ants.get_mask(ants.from_numpy(reference_data))
            reference_mask = (head.numpy() > 0) & (reference_data > 0)
        log.info("%s: N4 on the %s reference inside %d voxels", name, reference_kind,
                 reference_mask.sum())
        reference_data = n4_inside_mask(np.maximum(reference_data, 0), reference_mask,
                                        reference_affine,
                                        what=f"{name}: reference image {reference}")
    for modality_name, data in corrected.items():
        kind = modality(modality_name)
        save_volume(out_maps[modality_name], data, affine,
                    description=f"{modality_name} ({kind.unit}){', N4' if n4 and kind.n4 else ''}")
    save_volume(out_reference, reference_data, reference_affine,
                description=f"reference ({reference_kind})")
    return {"nonfinite_voxels": nonfinite, "brain_voxels": int(brain.sum()),
            "covered_voxels": int(covered.sum()) if covered is not None else int(brain.sum()),
            "n4": bool(n4)}


def check_range(data: np.ndarray, region: np.ndarray, kind, *, what: str) -> None:
    """Raise :class:`brainage.inputs.InputError` when a voxel of ``region`` with data lies
    outside the modality's valid range (e.g. a damping ratio outside [0, 1]), or when the
    median of those voxels is outside the modality's plausible ``median_range`` (a
    stiffness map in Pa instead of kPa)."""
    if kind.median_range is None and kind.valid_range is None:
        return  # e.g. the T1w: nothing to check, no voxels to gather
    # a voxel with data: positive for the maps whose voxels <= 0 mean "no data"
    values = data[region & ((data > 0) if kind.positive else (data != 0))]
    if kind.median_range is not None and values.size:
        low, high = kind.median_range
        median = float(np.median(values))
        if not low <= median <= high:
            raise InputError(
                f"{what}: the median brain value is {median:.4g}, outside the plausible "
                f"[{low:g}, {high:g}] {kind.unit} of a {kind.description}. Is the map "
                f"{kind.unit_mix_up(too_high=median > high)}? Convert "
                f"it to {kind.unit}, or remove {kind.name} from config key "
                f"dataset.modalities.")
    if kind.valid_range is None:
        return
    low, high = kind.valid_range
    bad = (values < low) | (values > high)
    if bad.any():
        raise InputError(
            f"{what}: {int(bad.sum())} brain voxels lie outside [{low:g}, {high:g}] (values "
            f"from {float(values.min()):.4g} to {float(values.max()):.4g}); a "
            f"{kind.description} must lie in that range. Check the file (is it the right "
            f"map, in the right unit?) or remove {kind.name} from config key "
            f"dataset.modalities.")
