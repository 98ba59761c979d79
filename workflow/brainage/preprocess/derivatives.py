"""A cohort's preprocessing folder as a BIDS-Derivatives dataset.

Each preprocessing folder (``results/preproc`` for the training cohort,
``results/predict/<cohort>/preproc`` for a new one; :mod:`brainage.paths`) gets what the
BIDS validator needs to accept it as a derivative dataset:

- ``dataset_description.json``: DatasetType ``derivative``, GeneratedBy brainage with its
  version, the raw dataset it derives from;
- ``README.md``: what the files are;
- a JSON sidecar beside every brain mask (:func:`describe_mask`): mask type and, for
  template-space masks, what ``res-2`` means; and beside the registered T1w channel
  (:func:`describe_registered_t1w`), which the validator checks as a derivative T1w;
- ``.bidsignore``: the files BIDS has no suffix for. There is no MR-elastography datatype,
  so every MRE map (stiffness, damping ratio, moduli), the registration references (T1w
  or stiffness, per subject),
  the ANTs transforms and the QC figures are listed there, and the validator checks the
  rest (checked by tests/test_derivatives.py with the schema-based validator).

The template files of the training cohort's folder (``tpl-<space>/``) get sidecars too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from brainage.io import atomic_path, write_json
from brainage.modalities import DEFAULT_MODALITIES, MODALITIES, grid_modality, modality, mre_maps
from brainage.paths import TEMPLATE_RESOLUTION

BIDS_VERSION = "1.10.0"
#: Files of a subject without a BIDS suffix (MRE has no datatype), ignored by the validator:
#: every MRE map of dataset.modalities, not only the stiffness.
BIDS_IGNORE = (*(f"*_{name}.nii.gz" for name, kind in MODALITIES.items() if kind.is_mre),
               "*_reference.nii.gz", "*_reference.json", "*_xfm.mat", "sub-*/figures")


def _resolution(space: str, template_shape) -> dict:
    shape = " x ".join(str(int(n)) for n in template_shape)
    return {"2": f"2 mm isotropic grid of the {space} template as the pipeline prepares it "
                 f"({shape} voxels)"}


def describe_preprocessing(folder: str | Path, *, space: str, template_shape,
                           source: str, version: str, template: bool = False,
                           modalities: Sequence[str] = DEFAULT_MODALITIES,
                           n4: bool = True) -> Path:
    """Write the dataset-level files of a preprocessing folder; returns
    ``dataset_description.json``.

    Parameters
    ----------
    folder : the preprocessing folder.
    space : TemplateFlow identifier of the template (config key ``template.space``).
    template_shape : voxels of the 2 mm template grid, for the ``res-2`` description.
    source : the raw BIDS-like dataset it derives from (config key ``dataset.root`` or a
        cohort's root).
    version : brainage's version (GeneratedBy).
    template : also describe the template files under ``tpl-<space>/`` (training cohort).
    modalities : the cohort's images (config key ``dataset.modalities``; ``[T1w]`` for a
        pretraining cohort), each described with its files and unit.
    n4 : config key ``preprocess.n4``: whether the ``desc-biascorr`` files are N4-corrected
        (their name does not change with it).
    """
    folder = Path(folder)
    resolution = _resolution(space, template_shape)
    with atomic_path(folder / "README.md") as temp:
        temp.write_text(_readme(space=space, source=source, version=version,
                                modalities=modalities, n4=n4))
    with atomic_path(folder / ".bidsignore") as temp:
        temp.write_text("\n".join(BIDS_IGNORE) + "\n")
    if template:
        name = f"tpl-{space}"
        write_json(folder / name / f"{name}_{TEMPLATE_RESOLUTION}_T1w.json", {
            "Description": f"{space} T1 template at 2 mm, the registration target",
            "Resolution": resolution})
        write_json(folder / name / f"{name}_{TEMPLATE_RESOLUTION}_desc-brain_mask.json", {
            "Type": "Brain", "Description": f"{space} brain mask at 2 mm",
            # no Sources: the mask is not made from the T1 (nilearn ships both; a user's
            # template gives both); it only shares the T1's grid
            "Resolution": resolution,
            "SpatialReference": f"bids::{name}/{name}_{TEMPLATE_RESOLUTION}_T1w.nii.gz"})
    description = folder / "dataset_description.json"
    # what the folder holds and what was done, as the README says: a pretraining cohort
    # holds T1w images only, and preprocess.n4: false leaves the bias uncorrected
    images = [f"{modality(name).description}s" for name in modalities]
    held = ", ".join(images[:-1]) + (" and " if len(images) > 1 else "") + images[-1]
    # not "skull stripping": preprocess.skullstrip none, or a subject without a T1w, masks
    # the map's support and registers the reference as given
    masking = "brain masks (by skull stripping unless preprocess.skullstrip is none)"
    steps = f"{masking}, N4 bias correction and affine" if n4 else (
        f"{masking}, no bias correction (preprocess.n4 false), and affine")
    write_json(description, {
        "Name": f"brainage: preprocessed {held}",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "brainage", "Version": version,
                         "Description": f"{steps} registration to {space} at 2 mm"}],
        # the root resolved, as in README.md and predict run's provenance.json: a link to
        # a release (current -> v2) is named by the release read
        "SourceDatasets": [{"URL": Path(source).resolve().as_uri()}],
        "DatasetLinks": {"raw": Path(source).resolve().as_uri()}})
    return description


def _readme(*, space: str, source: str, version: str, modalities: Sequence[str],
            n4: bool) -> str:
    """The README of a preprocessing folder: every file of a subject and what it holds."""
    registered = f"space-{space}_{TEMPLATE_RESOLUTION}_desc-preproc"
    corrected = "N4-corrected" if n4 else "not bias-corrected (preprocess.n4: false)"
    grid = modality(grid_modality(modalities)).description
    files = [f"- `desc-brain_mask`: the brain mask on the native grid of the {grid}",
             "- `desc-brain_reference` and its sidecar: the registration reference ("
             + ("the skull-stripped T1w where the subject has one (as given under "
                "preprocess.skullstrip none), else the grid map; the sidecar's "
                "reference_kind says which)" if "T1w" in modalities else f"the {grid})"),
             f"- `desc-biascorr_reference`: the reference, {corrected}"]
    for name in modalities:
        kind = modality(name)
        if not kind.is_mre:
            continue
        if kind.n4:
            files.append(f"- `desc-biascorr_{name}`: the {kind.description} ({kind.unit}) "
                         f"cleaned (no data = 0) and {corrected}")
        else:
            files.append(f"- `desc-clean_{name}`: the {kind.description} ({kind.unit}) "
                         f"cleaned (no data = 0); never N4-corrected, a ratio has no "
                         f"multiplicative bias")
        files.append(f"- `{registered}_{name}`: the {kind.description} affinely registered "
                     f"to {space} at 2 mm ({kind.unit}, zero outside the brain and the "
                     f"MRE slab)")
    has_maps = bool(mre_maps(modalities))
    if "T1w" in modalities:
        files.append(f"- `{registered}_T1w` and its sidecar: the registration reference in "
                     f"{space} at 2 mm (a.u.), zero outside the "
                     + ("MRE map grid's warped brain mask (smaller than `desc-brain_mask` for "
                        "maps stored on their slab's own grid)" if has_maps else
                        "warped brain mask"))
    files += [f"- `{registered}_reference`, `space-{space}_{TEMPLATE_RESOLUTION}_desc-brain_"
              f"mask`: the warped reference (for QC) and brain mask",
              f"- `from-native_to-{space}_mode-image_xfm.mat`: the ANTs affine that brings "
              f"native images into {space} (antsApplyTransforms with the template as "
              f"reference image; as a mapping of points it goes from template to native)",
              "- `sub-<label>/figures/`: the QC metrics and views"]
    return ("# brainage preprocessing derivatives\n\n"
            "Per subject (`sub-<label>/anat/`, file names after `sub-<label>_`):\n\n"
            + "\n".join(files) + "\n\n"
            f"Derived from {Path(source).resolve()} by brainage {version}. "
            + ("BIDS has no MR-elastography datatype; t" if has_maps else "T")
            + "he files without a BIDS suffix are listed in `.bidsignore`.\n")


def describe_mask(mask: str | Path, *, template_mask: str | Path | None = None,
                  grid: str = "stiffness map") -> Path:
    """Write the JSON sidecar of a subject's brain mask; returns its path.

    A native-space mask gets its type and description, which names the image whose grid it
    lives on (``grid``: the grid map's :attr:`brainage.modalities.Modality.description`,
    e.g. "T1w image" in a cohort without MRE maps); a template-space mask (pass the
    template mask it was warped onto) also what ``res-2`` means, which the BIDS validator
    requires for a file with a ``res`` entity, and that template image as its
    ``SpatialReference`` (:func:`_spatial_reference`).
    """
    mask = Path(mask)
    sidecar = _sidecar(mask)
    if template_mask is None:
        write_json(sidecar, {"Type": "Brain",
                             "Description": f"brain mask on the {grid}'s native grid"})
        return sidecar
    space = _space(mask)
    write_json(sidecar, {"Type": "Brain", "Description": f"brain mask warped to {space}",
                         "Resolution": _template_resolution(space, template_mask),
                         "SpatialReference": _spatial_reference(mask, template_mask)})
    return sidecar


def describe_registered_t1w(t1w: str | Path, *, template_mask: str | Path,
                            n4: bool = True) -> Path:
    """Write the JSON sidecar of a subject's registered T1w channel; returns its path.

    The validator checks ``..._res-2_desc-preproc_T1w.nii.gz`` as a derivative T1w and
    requires ``SkullStripped`` and ``Resolution`` (and ``SpatialReference`` for a space
    outside TemplateFlow's list: :func:`_spatial_reference`). The channel is zero outside
    the warped brain mask of the MRE map's grid
    (:func:`brainage.preprocess.register.register_to_template`), so it is skull-stripped
    whatever the skull-stripping route. ``n4``: config key
    ``preprocess.n4``, whether the reference was N4-corrected.
    """
    t1w = Path(t1w)
    sidecar = _sidecar(t1w)
    space = _space(t1w)
    corrected = "N4-corrected" if n4 else "not bias-corrected (preprocess.n4: false)"
    write_json(sidecar, {"Description": f"T1w registration reference, {corrected}, affinely "
                                        f"registered to {space} at 2 mm, zero outside the "
                                        f"MRE map grid's warped brain mask",
                         "SkullStripped": True,
                         "Resolution": _template_resolution(space, template_mask),
                         "SpatialReference": _spatial_reference(t1w, template_mask)})
    return sidecar


def _spatial_reference(image: Path, template_mask: str | Path) -> str:
    """``SpatialReference`` of a subject's template-space image: the template image it was
    resampled onto (the template brain mask, on the template's grid).

    BIDS wants the reference image itself, a URI or a path in the dataset, not the space
    label (which the ``space`` entity already gives): a BIDS URI when the template lies in
    the image's derivative dataset (the training cohort's ``tpl-<space>/``), else the
    template file's ``file:`` URI (a new cohort's folder reads the training cohort's
    template). A ``space`` label outside TemplateFlow's list (a user's template) makes the
    field required.
    """
    root = image.resolve().parents[2]  # <dataset>/sub-<label>/anat/<image>
    template = Path(template_mask).resolve()
    if template.is_relative_to(root):
        return f"bids::{template.relative_to(root).as_posix()}"
    return template.as_uri()


def _sidecar(image: Path) -> Path:
    """The JSON sidecar beside a ``.nii.gz`` image."""
    return image.with_name(image.name.replace(".nii.gz", ".json"))


def _space(path: Path) -> str:
    return next(part[len("space-"):] for part in path.name.split("_")
                if part.startswith("space-"))


def _template_resolution(space: str, template_mask: str | Path) -> dict:
    import nibabel as nib

    return _resolution(space, nib.load(str(template_mask)).shape)
