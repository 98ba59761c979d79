"""Affine registration to MNI152 at 2 mm (step ``register_to_template`` of rule
``correct_and_register``), ANTsPy.

The subject's reference (from ``strip_skull``/``correct_bias``) is registered to the
matching template image with Mattes mutual information: skull-stripped T1w -> template
T1 x brain mask; T1w head -> template T1; the grid map, e.g. stiffness (no anatomical
image) -> template T1 x brain mask. The metric samples the template brain (dilated 6 mm). For a stiffness
reference it also ignores template points that map outside the map's field of view (a
moving-image mask, the bounding box of the map's support): the slab's cut planes are not
brain edges, and without this mask a slab covering 85 % of the brain was misplaced by
15 mm in our tests. The one transform is then applied to every MRE map of the subject
(linear), to the brain mask (nearest neighbour) and to the reference (linear): the maps of
one subject share one registration. The T1w channel (modality ``T1w``) is the warped
reference inside the warped brain mask of the map's grid. The registered brain mask (the
``desc-brain_mask`` file, QC's Dice) also holds, with a skull-stripped T1w reference, the
T1w's own warped brain mask (the reference's non-zero voxels): the mask on the map's grid
ends where an MRE slab stored on a grid of its own ends, and Dice against the template
brain then measured the slab's coverage, not the registration.

A registered map is exactly 0 outside the warped brain mask and wherever the native map
had no data (beyond the MRE slab): each map is interpolated by normalised convolution,
``warp(map) / warp(support)`` where ``warp(support) >= 0.5`` (support: the map's non-zero
voxels), so linear interpolation neither smears values outside the slab nor darkens its
edge. Coverage stays visible. A map that is a voxel-wise function of another keeps that
relation wherever both are smooth (tests/test_preprocess.py).

``deterministic`` (one ITK thread, fixed seed for the metric's sampling: a regular grid
jittered by it) makes reruns bit-identical.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from brainage.inputs import MADE_AGAIN
from brainage.io import atomic_path, work_folder
from brainage.modalities import MODALITIES, modality
from brainage.preprocess.images import (
    PreprocessError,
    configure_itk_threads,
    load_mask,
    load_volume,
    read_xform_code,
    require_same_grid,
    save_volume,
)
from brainage.preprocess.skullstrip import read_reference_info

log = logging.getLogger(__name__)

#: Multi-resolution affine schedule (voxels of the 2 mm template): coarse to fine. On 10
#: simulated subjects (1.5-2 mm, as the simulator then wrote them; now 2-3 mm; rotations
#: up to 10 degrees, shifts up to 10 mm) it
#: recovers the pose of the T1w route to 0.14-0.62 mm mean displacement, the same as
#: (200, 100, 50) iterations at half the time; the fine level only polishes.
AFFINE_ITERATIONS = (100, 50, 10)
AFFINE_SHRINK_FACTORS = (4, 2, 1)
AFFINE_SMOOTHING_SIGMAS = (2, 1, 0)
#: The metric samples the template brain mask dilated by this many 2 mm voxels.
SAMPLING_MASK_DILATION_VOXELS = 3
#: Share of voxels sampled by the metric (ANTs' default); the seed fixes which ones.
AFFINE_SAMPLING_RATE = 0.2
REGISTRATION_SEED = 20241001
#: An affine that changes any axis by more than this factor (either way) is a failure:
#: adult heads differ from MNI152 by far less.
MAX_AXIS_SCALE = 1.6
#: Template image registered to, per reference kind.
#: nilearn's MNI152 (the default) is itself brain-only, so "t1" equals "t1_brain" there and
#: a head (route ``none`` with a T1w) is registered to a brain; mutual information copes on
#: the simulated cohort (pose recovered < 1 mm, tests/test_preprocess.py), but a skull-
#: stripping route is the better choice for real heads. A user's whole-head template
#: (``template.source: file``) gives the head route a head to match.
TARGETS = {"T1w_brain": "t1_brain", "T1w_head": "t1",
           **{name: "t1_brain" for name, kind in MODALITIES.items() if kind.is_mre}}

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class RegistrationError(PreprocessError):
    """ANTs failed, or returned a transform no head could need."""


def template_to_native_matrix(transform: str | Path) -> np.ndarray:
    """The 4x4 matrix of an ANTs affine ``.mat`` in RAS world mm.

    ANTs' forward transform maps template points to native points (it pulls the native
    image onto the template grid), in ITK's LPS coordinates, as
    ``y = A (x - c) + t + c``. Returns ``M`` with ``x_native = M @ [x_template, 1]`` (RAS).
    """
    import ants

    ants_transform = ants.read_transform(str(transform))
    parameters = np.asarray(ants_transform.parameters, dtype=float)
    centre = np.asarray(ants_transform.fixed_parameters, dtype=float)
    linear, translation = parameters[:9].reshape(3, 3), parameters[9:12]
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = translation + centre - linear @ centre
    return _LPS @ matrix @ _LPS


def field_of_view_box(support: np.ndarray) -> np.ndarray:
    """The voxel-index bounding box of ``support``, less one voxel at each face (float32 0/1).

    An MRE slab is a block of slices of the map's own grid, so the box is where the map
    has data; the one-voxel margin keeps interpolated cut-plane voxels out of the metric.
    """
    box = np.zeros(support.shape, dtype=np.float32)
    index = np.argwhere(support)
    low = np.minimum(index.min(axis=0) + 1, index.max(axis=0))
    high = np.maximum(index.max(axis=0) - 1, low)
    box[low[0]:high[0] + 1, low[1]:high[1] + 1, low[2]:high[2] + 1] = 1.0
    return box


@contextlib.contextmanager
def ants_random_seed(seed: int | None):
    """Yield the keyword arguments that make ``ants.registration`` use ``seed``.

    ANTsPy up to 0.6.1 took a ``random_seed`` argument; 0.6.2 reads the seed from
    ``ants.config._random_seed`` instead (a module older releases lack) and silently
    swallows ``random_seed`` in its ``**kwargs``, so every run sampled the metric
    differently. ``None``: ANTs' own random seed. The module value is restored
    afterwards, so other ANTs calls in the process keep theirs.
    """
    import ants

    if "random_seed" in inspect.signature(ants.registration).parameters:
        yield {"random_seed": seed}
        return
    import ants.config

    previous = ants.config._random_seed
    ants.config._random_seed = seed
    try:
        yield {}
    finally:
        ants.config._random_seed = previous


def check_transform(matrix: np.ndarray, *, what: str) -> None:
    """Refuse a transform that is not finite or scales an axis beyond :data:`MAX_AXIS_SCALE`.

    Raises
    ------
    RegistrationError
    """
    if not np.all(np.isfinite(matrix)):
        raise RegistrationError(f"{what}: registration returned a non-finite transform.")
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    if scales.max() > MAX_AXIS_SCALE or scales.min() < 1 / MAX_AXIS_SCALE \
            or np.linalg.det(matrix[:3, :3]) <= 0:
        raise RegistrationError(
            f"{what}: registration failed: the affine scales the axes by "
            f"{np.round(scales, 3).tolist()} (allowed {1 / MAX_AXIS_SCALE:.2f}-"
            f"{MAX_AXIS_SCALE}, no reflection). Look at the reference image and the brain "
            f"mask of this subject (skull stripping, orientation in the NIfTI header).")


def register_to_template(maps: Mapping[str, str | Path], mask: str | Path,
                         reference: str | Path, reference_info: str | Path,
                         template_t1: str | Path, template_mask: str | Path,
                         out_maps: Mapping[str, str | Path], out_mask: str | Path,
                         out_transform: str | Path, out_reference: str | Path, *,
                         deterministic: bool = True, threads: int = 1,
                         seed: int = REGISTRATION_SEED, subject: str = "") -> dict:
    """Affine-register the subject to the template; warp its maps, mask and reference.

    Parameters
    ----------
    maps : ``{modality: bias-corrected native map}`` of the MRE maps (zero outside brain
        and slab), grid map first; empty for a cohort without MRE maps.
    mask : native brain mask on the maps' grid.
    reference, reference_info : corrected registration reference and its sidecar.
    template_t1, template_mask : MNI152 2 mm (rule ``prepare_template``).
    out_maps : ``{modality: registered map}`` (float32, template grid) for every key of
        ``maps``, plus ``T1w`` for the T1w channel when the reference is a T1w.
    out_mask : warped brain mask (uint8, template grid).
    out_transform : ANTs affine ``.mat`` (template -> native; apply to native images).
    out_reference : the warped reference (float32, template grid), for QC.
    deterministic, threads : one ITK thread and a fixed ``seed`` when deterministic.
    subject : label for messages.

    Returns
    -------
    dict with ``template_to_native`` (4x4 list, RAS mm), ``axis_scales``,
    ``reference_kind``, ``metric``.

    Raises
    ------
    RegistrationError : ANTs failed or the transform is implausible.
    PreprocessError : the warped brain mask or the grid map is empty; a T1w channel is
        asked for a subject registered without a T1w.
    """
    name = f"subject sub-{subject}" if subject else "subject"
    itk_threads = configure_itk_threads(threads, deterministic=deterministic)
    import ants
    from scipy import ndimage

    info = read_reference_info(reference_info)
    if "T1w" in out_maps and not info["reference_kind"].startswith("T1w"):
        raise PreprocessError(f"{name}: the T1w channel needs a T1w image, but the subject was "
                              f"registered with its {info['reference_kind']} map (no "
                              f"anat/sub-{subject}_T1w.nii.gz). Add the subject's T1w image, or "
                              f"remove T1w from dataset.modalities.")
    target, metric = TARGETS[info["reference_kind"]], "mattes"
    mask_data, mask_affine = load_mask(mask, what=f"{name}: brain mask")
    native_maps = {}
    for modality_name, path in maps.items():
        what = f"{name}: {modality(modality_name).description}"
        data, affine = load_volume(path, what=what, remedy=MADE_AGAIN)  # bias-corrected
        require_same_grid(data.shape, affine, f"{what} {path}", mask_data.shape, mask_affine,
                          f"brain mask {mask}")
        native_maps[modality_name] = data
    template_data, template_affine = load_volume(template_t1, what="template T1",
                                                 remedy=MADE_AGAIN)
    template_brain, _ = load_mask(template_mask, what="template brain mask")

    template_image = ants.image_read(str(template_t1)).clone("float")
    template_mask_image = ants.image_read(str(template_mask)).clone("float")
    fixed = {"t1": template_image, "t1_brain": template_image * template_mask_image}[target]
    sampling_mask = template_mask_image.new_image_like(ndimage.binary_dilation(
        template_brain, iterations=SAMPLING_MASK_DILATION_VOXELS).astype(np.float32))
    moving = ants.image_read(str(reference)).clone("float")
    moving_mask = None
    if info["reference_kind"] in MODALITIES:  # a map: leave the slab's cut planes out
        moving_mask = moving.new_image_like(field_of_view_box(moving.numpy() > 0))
    log.info("%s: registering the %s reference to the template (%s, metric %s), ITK threads "
             "%d, seed %s", name, info["reference_kind"], target, metric, itk_threads,
             seed if deterministic else "random")

    Path(out_transform).parent.mkdir(parents=True, exist_ok=True)
    with work_folder(Path(out_transform).parent, ".register-") as tmp:
        try:
            with ants_random_seed(int(seed) if deterministic else None) as seed_argument:
                result = ants.registration(
                    fixed, moving, type_of_transform="Affine", aff_metric=metric,
                    aff_iterations=AFFINE_ITERATIONS, aff_shrink_factors=AFFINE_SHRINK_FACTORS,
                    aff_smoothing_sigmas=AFFINE_SMOOTHING_SIGMAS,
                    aff_random_sampling_rate=AFFINE_SAMPLING_RATE, mask=sampling_mask,
                    moving_mask=moving_mask, outprefix=str(Path(tmp) / "affine_"),
                    **seed_argument)
            transform = result["fwdtransforms"][0]
            matrix = template_to_native_matrix(transform)
        except (RuntimeError, ValueError, IndexError, KeyError) as error:
            raise RegistrationError(f"{name}: ANTs registration of {reference} to the template "
                                    f"failed: {error}") from None
        check_transform(matrix, what=f"{name} (reference {reference}, brain mask {mask})")

        native_grid = ants.image_read(str(mask)).clone("float")

        def warp(data: np.ndarray, interpolator: str) -> np.ndarray:
            moving_image = native_grid.new_image_like(data.astype(np.float32))
            warped = ants.apply_transforms(fixed=template_image, moving=moving_image,
                                           transformlist=[transform], interpolator=interpolator)
            return warped.numpy()

        warped_mask = warp(mask_data.astype(np.float32), "nearestNeighbor") > 0.5
        # The brain mask on the grid map's grid ends where that grid ends: an MRE slab
        # stored on a grid of its own. A skull-stripped T1w reference holds the whole brain
        # (its non-zero voxels: the T1w's brain mask), so the registered brain mask (QC's
        # Dice) adds it. The model's inputs keep the map grid's mask, whole or not: every
        # map and the T1w channel, as the encoders of finished cells were trained on them.
        brain_mask = warped_mask
        if info["reference_kind"] == "T1w_brain":
            brain_mask = warped_mask | (ants.apply_transforms(
                fixed=template_image, moving=moving.new_image_like(
                    (moving.numpy() > 0).astype(np.float32)),
                transformlist=[transform], interpolator="nearestNeighbor").numpy() > 0.5)
        registered = {}
        for modality_name, data in native_maps.items():
            # normalised convolution with the map's own support (module docstring)
            warped_sum = warp(data, "linear")
            warped_support = warp((data > 0).astype(np.float32), "linear")
            keep = warped_mask & (warped_support >= 0.5)
            volume = np.zeros(template_data.shape, dtype=np.float32)
            volume[keep] = warped_sum[keep] / warped_support[keep]
            registered[modality_name] = volume
        warped_reference = ants.apply_transforms(
            fixed=template_image, moving=moving, transformlist=[transform],
            interpolator="linear").numpy()
        transform_bytes = Path(transform).read_bytes()

    if not warped_mask.any():
        raise PreprocessError(f"{name}: the warped brain mask is empty: the registration moved "
                              f"the brain out of the template's field of view. Look at the "
                              f"registration reference {reference} and the brain mask {mask} "
                              f"(orientation in the NIfTI header, skull stripping).")
    if "T1w" in out_maps:
        registered["T1w"] = np.where(warped_mask, np.maximum(warped_reference, 0),
                                     0).astype(np.float32)
    grid_name = next(iter(registered), None)
    if grid_name is not None and not registered[grid_name].any():
        raise PreprocessError(f"{name}: no {modality(grid_name).description} voxel lands inside "
                              f"the warped brain mask. Check that the map and the registration "
                              f"reference {reference} are in the same space (their NIfTI "
                              f"affines), and that the map has values inside the brain mask "
                              f"{mask}.")
    with atomic_path(out_transform) as temp:
        temp.write_bytes(transform_bytes)
    # The template's xform code (MNI152 or another template: prepare_template) says in
    # whose world coordinates the registered images are.
    space_code = read_xform_code(template_t1)
    for modality_name, volume in registered.items():
        kind = modality(modality_name)
        save_volume(out_maps[modality_name], volume, template_affine, xform_code=space_code,
                    description=f"{modality_name} ({kind.unit}), MNI152 2 mm")
    save_volume(out_mask, brain_mask, template_affine, dtype=np.uint8, xform_code=space_code,
                description="brain mask, MNI152 2 mm")
    save_volume(out_reference, warped_reference, template_affine, xform_code=space_code,
                description=f"reference ({info['reference_kind']}), MNI152 2 mm")
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    dice = 2 * np.count_nonzero(brain_mask & template_brain) / (
        brain_mask.sum() + template_brain.sum())
    log.info("%s: affine axis scales %s; warped brain mask Dice %.3f against the template "
             "mask; %s", name, np.round(scales, 3).tolist(), dice,
             ", ".join(f"{np.count_nonzero(v)} voxels of {k}" for k, v in registered.items()))
    return {"template_to_native": matrix.tolist(), "axis_scales": scales.tolist(),
            "reference_kind": info["reference_kind"], "metric": metric}
