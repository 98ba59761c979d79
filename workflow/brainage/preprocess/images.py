"""Volume helpers shared by the preprocessing steps.

Checked loading, atomic saving, masks from an image's support, moving a mask between
two grids of the same physical space, non-finite voxels, and ITK's thread count.
Arrays are in the NIfTI file's voxel order; affines map voxel indices to world mm (RAS).

scipy.ndimage is imported in the functions that use it: skull stripping by deepbet or
FreeSurfer with the T1w on the map's grid calls none of them (the demo's 4.6 s jobs, 0.25 s
of which was the import); a T1w on its own grid (:func:`resample_mask`) or the map's support
does.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

from brainage.inputs import MADE_AGAIN, REEXPORT, InputError, load_nifti_checked, same_grid
from brainage.io import atomic_path

log = logging.getLogger(__name__)


class PreprocessError(RuntimeError):
    """A preprocessing step produced no usable result; the message names subject and step."""


#: What a PreprocessError says of an allocation failure, so that `predict run` does not
#: advise dropping the subject then.
OUT_OF_MEMORY_HINT = "out of memory"


def load_volume(path: str | Path, *, what: str, remedy: str = REEXPORT,
                kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume as float32 with its affine.

    Parameters
    ----------
    path : path of the NIfTI file.
    what : how to name the file in an error message, e.g. ``"subject sub-01: T1w image"``.
    remedy : what a damaged file's message tells to do: :data:`~brainage.inputs.REEXPORT`
        for a raw input, :data:`~brainage.inputs.MADE_AGAIN` for the pipeline's own file.
    kind : a modality name: its unit and sign are checked as a raw map's are.

    Returns
    -------
    data : float32 array [X, Y, Z] (non-finite values are kept).
    affine : float64 array [4, 4], voxel index -> world mm.

    Raises
    ------
    brainage.inputs.InputError
        Unreadable, corrupt, 4D, or all-zero file (from :func:`brainage.inputs.load_nifti_checked`).
    """
    image = load_nifti_checked(path, what=what, remedy=remedy, kind=kind)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    return data, image.affine.astype(np.float64)


def load_mask(path: str | Path, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a binary mask written by this package; returns (bool [X, Y, Z], affine)."""
    data, affine = load_volume(path, what=what, remedy=MADE_AGAIN)
    return data > 0.5, affine


#: NIfTI xform codes (nifti1.h): world coordinates of the scanner, of MNI152, of another
#: template. Viewers read them: FSLeyes offers its MNI atlases only for code 4.
SCANNER_XFORM_CODE = 1
MNI152_XFORM_CODE = 4
OTHER_TEMPLATE_XFORM_CODE = 5


def read_xform_code(path: str | Path) -> int:
    """Whose world coordinates the NIfTI file at ``path`` gives (its header only): the
    sform code, or without an sform (code 0) the qform code when it names a space other
    than the scanner's (2-5), as nibabel then takes the qform's affine; else 0."""
    import nibabel as nib

    header = nib.load(str(path)).header
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code:
        return sform_code
    return qform_code if qform_code > SCANNER_XFORM_CODE else 0


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, *,
                dtype=np.float32, description: str = "",
                xform_code: int = SCANNER_XFORM_CODE) -> None:
    """Write ``data`` as NIfTI with ``affine`` as sform and qform, atomically.

    ``xform_code`` says whose world coordinates the affine gives: the scanner's
    (native images) or a template's (:func:`brainage.preprocess.template.prepare_template`).
    """
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    image.set_sform(affine, code=xform_code)
    image.set_qform(affine, code=xform_code)
    image.header.set_xyzt_units("mm")
    if description:
        image.header["descrip"] = description.encode()[:79]
    with atomic_path(path) as temp:
        nib.save(image, str(temp))


def require_same_grid(shape_a, affine_a, what_a: str, shape_b, affine_b, what_b: str) -> None:
    if not same_grid(shape_a, affine_a, shape_b, affine_b):
        raise InputError(
            f"{what_a} (shape {tuple(shape_a)}) and {what_b} (shape {tuple(shape_b)}) are not "
            f"on the same voxel grid; affines\n{np.round(affine_a, 3)}\nand\n"
            f"{np.round(affine_b, 3)}. Resample one onto the other, or rerun the step that "
            f"wrote them.")


def largest_component_filled(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``mask`` with its enclosed holes filled."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == sizes.argmax())


def filled_in_any_plane(mask: np.ndarray) -> np.ndarray:
    """``mask`` [X, Y, Z] with every hole filled that it encloses in 3D or within one slice
    along any axis: a hole on a slab's first or last slice touches the array's border, so
    only its slice encloses it."""
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(mask)
    for axis in range(mask.ndim):
        for index in range(mask.shape[axis]):
            plane = (slice(None),) * axis + (index,)
            filled[plane] |= ndimage.binary_fill_holes(mask[plane])
    return filled


def deeper_than(mask: np.ndarray, affine: np.ndarray, distance_mm: float) -> np.ndarray:
    """The voxels of ``mask`` [X, Y, Z] whose centres lie more than ``distance_mm`` (mm)
    inside its edge, the array's border counting as an edge: the distance to the nearest
    voxel outside (a Euclidean distance transform, centre to centre) less half that
    voxel's size along the way's main axis, so coarse and anisotropic voxels are measured
    from the edge, not from the next centre. Bool [X, Y, Z]."""
    from scipy import ndimage

    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    if np.allclose(sizes, sizes[0], rtol=1e-3):  # isotropic: the same half voxel every way
        depth = ndimage.distance_transform_edt(padded, sampling=sizes) - 0.5 * sizes[0]
    else:
        nearest = ndimage.distance_transform_edt(padded, sampling=sizes,
                                                 return_distances=False, return_indices=True)
        steps = np.stack([(nearest[axis] - np.arange(padded.shape[axis]).reshape(
            [-1 if other == axis else 1 for other in range(3)])) * sizes[axis]
            for axis in range(3)])
        del nearest
        depth = np.sqrt((steps ** 2).sum(axis=0)) \
            - 0.5 * sizes[np.abs(steps).argmax(axis=0)]
    return (padded & (depth > distance_mm))[1:-1, 1:-1, 1:-1]


def support_mask(data: np.ndarray) -> np.ndarray:
    """Brain mask of an already-masked map or image: its positive voxels, largest
    component, holes (NaN voxels, zero-valued inversions) filled. Bool [X, Y, Z].
    Positive, not non-zero: a "no data" background written as -1 (or a scaled integer's
    0 decoding to -1e-8) made the whole field of view the brain (a review: 13,660 ml, QC
    Dice 0.35, the T1w channel unmasked)."""
    return largest_component_filled(np.isfinite(data) & (data > 0))


def resample_mask(mask: np.ndarray, source_affine: np.ndarray, target_shape,
                  target_affine: np.ndarray) -> np.ndarray:
    """Carry a mask to another grid of the same physical space.

    Linear interpolation of the 0/1 mask, kept where >= 0.5: the partial-volume boundary
    of a fine mask on a coarse grid, rather than nearest-neighbour staircase.
    """
    if same_grid(mask.shape, source_affine, target_shape, target_affine):
        return mask.copy()
    from scipy import ndimage

    target_to_source = np.linalg.inv(source_affine) @ target_affine
    moved = ndimage.affine_transform(mask.astype(np.float32), target_to_source[:3, :3],
                                     offset=target_to_source[:3, 3], output_shape=tuple(target_shape),
                                     order=1, mode="constant", cval=0.0)
    return moved >= 0.5


#: Share of the brain (NaN/inf voxels the map's data enclose) above which a subject that
#: passes ``preprocess.max_nan_fraction`` is warned about: the holes become background (0),
#: which a network reads as tissue missing, not as unknown (a review's test: a hole of
#: 0.09 % of the brain moved a predicted age by 0.3 years, one of 0.73 % by 3.6 years).
NAN_WARNING_FRACTION = 0.001


def clean_nonfinite(data: np.ndarray, brain: np.ndarray, *, max_fraction: float, what: str,
                    within: tuple[np.ndarray, str] | None = None) -> tuple[np.ndarray, int]:
    """Set NaN/inf voxels to background (0), refusing maps with too many inside the brain
    where the map should have data: by default where its own finite non-zero voxels enclose
    them (:func:`filled_in_any_plane`), the holes of a failed inversion. NaN that reaches
    the edge of the map's data (beyond its slab, between the inversion's own mask and a
    T1w's larger brain mask, a failed region at the edge) is missing coverage, as zeros
    there are: QC's coverage judges it (brainage.qc), whatever its encoding.

    Parameters
    ----------
    data : float array [X, Y, Z] (kPa); not modified.
    brain : bool array [X, Y, Z], the brain mask.
    max_fraction : largest allowed share of brain voxels that are counted NaN/inf voxels
        (config key ``preprocess.max_nan_fraction``).
    what : names the map in messages.
    within : (bool array [X, Y, Z], its description): where the map should also have
        data, e.g. the grid map's coverage for a subject's other maps.

    Returns
    -------
    cleaned : a float32 copy of ``data`` with non-finite voxels set to 0.
    count : number of non-finite voxels (whole volume).

    Raises
    ------
    brainage.inputs.InputError
        More than ``max_fraction`` of the brain voxels are counted NaN/inf voxels.
    """
    nonfinite = ~np.isfinite(data)
    region = filled_in_any_plane(np.isfinite(data) & (data > 0))  # a -1 background is none
    where = "enclosed by the map's data"
    if within is not None:
        region, where = region | within[0], f"{where} or {within[1]}"
    inside = int(np.count_nonzero(nonfinite & brain & region))
    brain_voxels = max(int(np.count_nonzero(brain)), 1)
    share = inside / brain_voxels
    if share > max_fraction:
        raise InputError(
            f"{what} has {inside} NaN/inf voxels inside the brain, {where} ({share:.1%} of "
            f"{brain_voxels} brain voxels), more than preprocess.max_nan_fraction="
            f"{max_fraction}. The inversion probably failed for this map: re-run it, remove "
            f"the subject, or raise preprocess.max_nan_fraction (a setting of every "
            f"subject's preprocessing: changing it reruns them all).")
    total = int(np.count_nonzero(nonfinite))
    if share > NAN_WARNING_FRACTION:
        log.warning(
            "%s: %d NaN/inf voxels inside the brain, %s (%.2f%% of brain voxels, within "
            "preprocess.max_nan_fraction=%g), set to background (0): the network sees a hole "
            "there, and a hole of 0.7%% of the brain moved a predicted age by 3.6 years in a "
            "test. Check the map's inversion, or lower preprocess.max_nan_fraction to refuse "
            "such subjects.", what, inside, where, 100 * share, max_fraction)
    elif total:
        log.info("%s: %d NaN/inf voxels set to background (%d inside the brain, %s: %.3f%% "
                 "of brain voxels)", what, total, inside, where, 100 * share)
    else:
        log.info("%s: no NaN/inf voxels", what)
    return np.where(nonfinite, np.float32(0), data).astype(np.float32), total


def configure_itk_threads(threads: int, *, deterministic: bool) -> int:
    """Set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` before ANTsPy is imported.

    ITK reads the variable once per process, so it must be set before the first ANTs
    call; the Snakemake scripts run each job in a fresh process, where this holds.
    Deterministic runs use one thread: ITK's multi-threaded metrics sum in a
    thread-dependent order and the last bits of the result would vary.

    Returns the number of threads set.
    """
    count = 1 if deterministic else max(int(threads), 1)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(count)
    if "ants" in sys.modules:
        log.debug("ANTsPy was already imported; ITK may keep the thread count it read first")
    return count
