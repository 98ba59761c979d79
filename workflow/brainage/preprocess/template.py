"""The registration target (rule ``prepare_template``): MNI152 T1 and brain mask at 2 mm.

Default: the MNI152 template bundled with nilearn, ICBM 2009a nonlinear symmetric
(TemplateFlow ``MNI152NLin2009aSym``; 99 x 117 x 95 voxels of 2 mm, offline; nilearn
ships it already skull-stripped, and references are registered to T1 x brain mask). Or a
user's pair of files (``template.source: file``), e.g. FSL's ``MNI152_T1_2mm.nii.gz``
(TemplateFlow ``MNI152NLin6Asym``, 91 x 109 x 91) with its brain mask; config key
``template.space`` then names it, and every registered file carries that name.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from brainage.inputs import InputError
from brainage.preprocess.images import (
    MNI152_XFORM_CODE,
    OTHER_TEMPLATE_XFORM_CODE,
    load_volume,
    read_xform_code,
    require_same_grid,
    save_volume,
)

log = logging.getLogger(__name__)

TEMPLATE_VOXEL_MM = 2.0


def _nilearn_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    mask = datasets.load_mni152_brain_mask(resolution=2)
    return (t1.get_fdata(dtype=np.float32), np.asarray(mask.get_fdata()) > 0.5,
            t1.affine.astype(np.float64))


def _file_template(t1: str | Path | None, mask: str | Path | None):
    if not t1 or not mask:
        raise InputError("template.source is 'file' but template.t1 and/or template.mask is not "
                         "set. Give both paths (T1 template at 2 mm and its brain mask), or use "
                         "template.source: nilearn.")
    t1_data, t1_affine = load_volume(t1, what="template.t1")
    mask_data, mask_affine = load_volume(mask, what="template.mask")
    require_same_grid(t1_data.shape, t1_affine, f"template.t1 {t1}", mask_data.shape,
                      mask_affine, f"template.mask {mask}")
    spacing = np.sqrt((t1_affine[:3, :3] ** 2).sum(axis=0))
    if not np.allclose(spacing, TEMPLATE_VOXEL_MM, atol=0.01):
        raise InputError(f"template.t1 {t1} has voxels of {np.round(spacing, 3).tolist()} mm; "
                         f"the pipeline registers at {TEMPLATE_VOXEL_MM:g} mm isotropic (outputs "
                         f"named res-2). Resample the template to 2 mm first.")
    # Non-finite voxels are background: nan_to_num's defaults would turn an inf into
    # 3.4e38, a T1 value that spans the registration metric's range and a "brain" voxel.
    def finite(data):
        return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)

    return finite(t1_data), finite(mask_data) > 0.5, t1_affine


def prepare_template(out_t1: str | Path, out_mask: str | Path, *, source: str = "nilearn",
                     t1: str | Path | None = None, mask: str | Path | None = None) -> dict:
    """Write the template T1 (float32) and brain mask (uint8) at 2 mm.

    Parameters
    ----------
    out_t1, out_mask : output NIfTI paths (``Layout.template("T1w"/"brain_mask")``).
    source : ``nilearn`` (bundled MNI152 2009a sym) or ``file`` (config ``template.source``).
    t1, mask : with ``source="file"``, the user's template files (``template.t1/mask``).

    The files carry NIfTI sform/qform code 4 (MNI152) for nilearn's template (nilearn's
    own file says 2, "aligned"), a user's template its own sform code (FSL's MNI152 files
    say 4; 5, "another template", when it has none). Registered images copy the code
    (``register_to_template``).

    Returns
    -------
    dict with ``shape``, ``affine`` (4x4 list) and ``brain_voxels``.
    """
    if source == "nilearn":
        data, brain, affine = _nilearn_template()
        origin = "nilearn MNI152 ICBM 2009a nonlinear symmetric"
        code = MNI152_XFORM_CODE
    elif source == "file":
        data, brain, affine = _file_template(t1, mask)
        # the name, not the path given: the files' bytes key predict run's step records,
        # and the same template given by another path must not redo every subject
        origin = f"file {Path(t1).name}"
        code = read_xform_code(t1) or OTHER_TEMPLATE_XFORM_CODE
    else:
        raise InputError(f"template.source={source!r}; choose nilearn or file.")
    if not brain.any():
        raise InputError(f"the template brain mask ({origin}) is empty.")
    save_volume(out_t1, data, affine, description=f"template T1, {origin}", xform_code=code)
    save_volume(out_mask, brain, affine, dtype=np.uint8, xform_code=code,
                description=f"template brain mask, {origin}")
    log.info("template from %s: shape %s, %d brain voxels of %g mm", origin, data.shape,
             brain.sum(), TEMPLATE_VOXEL_MM)
    return {"shape": list(data.shape), "affine": affine.tolist(), "brain_voxels": int(brain.sum())}


def template_record(t1_path: str | Path, mask_path: str | Path, *, source: str,
                    space: str) -> dict:
    """What identifies the registration template: id, grid and checksums of the mask and
    of the T1 that subjects are registered to.

    The checksums cover the voxels (not the .nii.gz bytes, whose gzip header differs
    between writers), so a lab that rebuilds the same template matches them.

    Raises
    ------
    InputError
        The T1 and the mask are not on one grid.
    """
    import nibabel as nib

    mask = nib.load(str(mask_path))
    data = np.ascontiguousarray(np.asanyarray(mask.dataobj) > 0, dtype=np.uint8)
    t1 = nib.load(str(t1_path))
    if tuple(t1.shape[:3]) != tuple(mask.shape[:3]) or not np.allclose(t1.affine, mask.affine):
        raise InputError(f"template {t1_path} and its mask {mask_path} are not on the same "
                         f"grid; rerun rule prepare_template.")
    return {"id": f"{space}_res-2", "space": space, "source": source,
            # the voxel edge whatever the axis order (a permuted affine has 0 at [0, 0])
            "resolution_mm": float(np.sqrt((mask.affine[:3, :3] ** 2).sum(axis=0)).mean()),
            "shape": [int(size) for size in mask.shape[:3]],
            "affine": np.asarray(mask.affine, dtype=float).tolist(),
            "mask_voxels_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            "t1_voxels_sha256": hashlib.sha256(np.ascontiguousarray(
                np.asanyarray(t1.dataobj), dtype=np.float32).tobytes()).hexdigest(),
            "n_brain_voxels": int(data.sum())}
