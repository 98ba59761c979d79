"""Skull stripping (rule ``strip_skull``): a brain mask on the grid of the subject's maps.

Routes (config key ``preprocess.skullstrip``), each a nipype interface
(:mod:`brainage.preprocess.interfaces`):

``freesurfer``
    FreeSurfer's ``mri_synthstrip`` or ``mri_watershed`` (``preprocess.freesurfer_tool``)
    on the T1w image, as the paper did.
``deepbet``
    The deepbet network on the T1w image (CPU or GPU, weights shipped with the package).
``auto``
    ``freesurfer`` when its program is on PATH and ``FREESURFER_HOME`` is set, otherwise
    ``deepbet``; the log and the sidecar JSON say which ran.
``none``
    The maps are already masked: the mask is the grid map's support.

The *grid map* is the subject's first MRE map in ``dataset.modalities`` (usually the
stiffness; :func:`brainage.modalities.grid_modality`), or the T1w itself in a cohort
without MRE maps (a T1w pretraining cohort). Without an anatomical image there is nothing
to strip: the mask is the grid map's support (largest component, holes filled) whatever
the route, and the log says so. With one, the T1w mask is carried to the maps' grid (both
are in the same scanner space). The image that registration will align (the *reference*) is written alongside,
with a sidecar JSON that says what it is (:data:`REFERENCE_KINDS`).

Without a T1w the reference is the (masked) grid map itself, not its mask: white
matter is stiffer than cortex and CSF, as it is brighter in a T1w, so mutual information
with the template T1 aligns it, and the slab's cut planes can be left out of the metric
(see :mod:`brainage.preprocess.register`). A support mask cut by the slab cannot be
matched to a whole template brain mask (15 mm errors at 85 % coverage in our tests).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from brainage.inputs import same_grid
from brainage.io import work_folder, write_json
from brainage.modalities import MODALITIES, modality
from brainage.preprocess.images import (
    OUT_OF_MEMORY_HINT,
    PreprocessError,
    load_mask,
    load_volume,
    resample_mask,
    save_volume,
)

log = logging.getLogger(__name__)

METHODS = ("auto", "freesurfer", "deepbet", "none")
#: preprocess.freesurfer_tool -> FreeSurfer program.
FREESURFER_PROGRAMS = {"synthstrip": "mri_synthstrip", "watershed": "mri_watershed"}
#: What the reference image is, and so which template image it is registered to:
#: T1w_brain -> template T1 x brain mask; T1w_head -> template T1 (head);
#: an MRE map (stiffness, ...) -> template T1 x brain mask, only where the map has data.
REFERENCE_KINDS = ("T1w_brain", "T1w_head",
                   *(name for name, kind in MODALITIES.items() if kind.is_mre))


def freesurfer_available(tool: str = "synthstrip") -> bool:
    """True when FreeSurfer's program for ``tool`` is on PATH and FREESURFER_HOME is a folder."""
    home = os.environ.get("FREESURFER_HOME", "")
    return bool(home) and Path(home).is_dir() and shutil.which(FREESURFER_PROGRAMS[tool]) is not None


#: The memory FreeSurfer's SynthStrip needs for a 1 mm T1w (MB). It conforms the image to
#: 1 mm and runs its U-Net over the whole cropped volume at once: 5.8 GB for 192 x 256 x 256
#: voxels and 7.7 GB for 256^3 (its network on the CPU, one thread; MRIQC declares 6 GB for
#: it). deepbet took 1.1 GB for 256^3, within resources.preprocess.mem_mb.
SYNTHSTRIP_MEM_MB = 8000


def strip_skull_memory_mb(method: str, freesurfer_tool: str, given_mb: int) -> int:
    """What a skull-stripping job asks for (MB): ``given_mb`` (resources.preprocess.mem_mb),
    raised to :data:`SYNTHSTRIP_MEM_MB` where SynthStrip may run: ``method`` freesurfer, or
    auto with SynthStrip usable where the plan is made (jobs run in the environment they
    were submitted from). Every job asking for 2 GB was killed, three times on SLURM."""
    synthstrip = freesurfer_tool == "synthstrip" and (
        method == "freesurfer" or (method == "auto" and freesurfer_available("synthstrip")))
    return max(given_mb, SYNTHSTRIP_MEM_MB) if synthstrip else given_mb


def resolve_method(method: str, freesurfer_tool: str = "synthstrip") -> str:
    """The route that will run: ``freesurfer``, ``deepbet`` or ``none``.

    Raises
    ------
    PreprocessError
        ``freesurfer`` requested but not installed.
    ValueError
        Unknown method or tool.
    """
    if method not in METHODS:
        raise ValueError(f"preprocess.skullstrip={method!r}; choose one of {', '.join(METHODS)}")
    if freesurfer_tool not in FREESURFER_PROGRAMS:
        raise ValueError(f"preprocess.freesurfer_tool={freesurfer_tool!r}; choose one of "
                         f"{', '.join(FREESURFER_PROGRAMS)}")
    if method == "auto":
        if freesurfer_available(freesurfer_tool):
            return "freesurfer"
        _say_why_not_freesurfer(FREESURFER_PROGRAMS[freesurfer_tool])
        return "deepbet"
    if method == "freesurfer" and not freesurfer_available(freesurfer_tool):
        program = FREESURFER_PROGRAMS[freesurfer_tool]
        raise PreprocessError(
            f"preprocess.skullstrip is 'freesurfer' but FreeSurfer's {program} is not usable "
            f"(on PATH: {shutil.which(program) or 'no'}; FREESURFER_HOME: "
            f"{os.environ.get('FREESURFER_HOME') or 'unset'}). Source FreeSurfer's "
            f"SetUpFreeSurfer.sh on the node, or set preprocess.skullstrip: auto (deepbet "
            f"when FreeSurfer is absent) or deepbet.")
    return method


def _say_why_not_freesurfer(program: str) -> None:
    """Warn when ``auto`` passes over a FreeSurfer that is half there: a lab that loaded
    FreeSurfer would otherwise learn only from the sidecar's route that deepbet ran."""
    home = os.environ.get("FREESURFER_HOME", "")
    found = shutil.which(program)
    if found and not (home and Path(home).is_dir()):
        log.warning("preprocess.skullstrip auto: %s is on PATH (%s) but FREESURFER_HOME is %s, "
                    "so deepbet runs. To use FreeSurfer, source its SetUpFreeSurfer.sh in the "
                    "job's environment.", program, found,
                    f"not a folder ({home})" if home else "unset")
    elif home and not found:
        older = ("FreeSurfer before 7.3 has no mri_synthstrip: set preprocess.freesurfer_tool: "
                 "watershed to use its mri_watershed. Otherwise, "
                 if program == "mri_synthstrip" else "")
        log.warning("preprocess.skullstrip auto: FREESURFER_HOME is set (%s) but %s is not on "
                    "PATH, so deepbet runs. %ssource FreeSurfer's SetUpFreeSurfer.sh in the "
                    "job's environment (it puts FreeSurfer's programs on PATH).",
                    home, program, older)


def tool_version(ran: str) -> str | None:
    """The version of the tool that made the brain mask, for the sidecar: FreeSurfer's
    build stamp (the first line of ``$FREESURFER_HOME/build-stamp.txt``, e.g.
    ``freesurfer-linux-ubuntu22_x86_64-7.4.1-20230614-7eb8460``), deepbet's package
    version; None for the support mask or where the stamp cannot be read. A site's
    FreeSurfer is whatever its module provides, and its masks act like a site effect."""
    if ran == "deepbet":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"deepbet {version('deepbet')}"
        except PackageNotFoundError:
            return None
    if ran in FREESURFER_PROGRAMS.values():
        stamp = Path(os.environ.get("FREESURFER_HOME", "")) / "build-stamp.txt"
        try:
            lines = stamp.read_text(errors="replace").split("\n")
        except OSError:
            return None
        return lines[0].strip() or None
    return None


def _failure_hint(error: Exception) -> str:
    """What to do after a skull-stripping tool failed, chosen by how it failed."""
    from brainage.preprocess.interfaces import ToolExitError

    if isinstance(error, ToolExitError) and error.returncode == 2:
        return (f"{error.program} refused the options it was given (exit code 2, a usage "
                f"error): check the FreeSurfer version on the node (mri_synthstrip needs 7.3 "
                f"or newer), or try another preprocess.skullstrip route.")
    if isinstance(error, ToolExitError) and error.returncode in (137, -9):
        return (f"{error.program} was killed (exit code {error.returncode}): usually the job "
                f"ran {OUT_OF_MEMORY_HINT}, at its memory limit, and the image is not at fault. "
                f"SynthStrip needs 6-8 GB for a 1 mm T1w: raise resources.preprocess.mem_mb "
                f"(SynthStrip's jobs ask for at least {SYNTHSTRIP_MEM_MB} MB; for predict run: "
                f"a node with more memory, or fewer --jobs).")
    if out_of_memory(error):
        return (f"The job ran {OUT_OF_MEMORY_HINT}: the image is not at fault. "
                f"Raise resources.preprocess.mem_mb (for predict run: a node with more "
                f"memory, or fewer --jobs).")
    return ("Check the image (contrast, orientation, field of view), or try another "
            "preprocess.skullstrip route.")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: deepbet runs in this process, where
    PyTorch reports one as a RuntimeError ("DefaultCPUAllocator: can't allocate memory",
    "not enough memory"), and numpy as MemoryError."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(
        words in text for words in ("can't allocate memory", "not enough memory",
                                    "out of memory", "cannot allocate memory"))


# -- the rule's function ----------------------------------------------------------------------

def _run_mask_interface(route: str, freesurfer_tool: str, in_file: str, work: Path,
                        threads: int) -> Path:
    """Run the route's nipype interface on ``in_file``; return the mask file it wrote
    (for mri_watershed, the stripped brain: its non-zero voxels are the mask)."""
    from brainage.preprocess.interfaces import DeepBet, SupportMask, SynthStrip, WatershedSkullStrip

    mask_file = work / "mask.nii.gz"
    if route == "deepbet":
        # Always on the CPU, also where a GPU is visible: the same mask on every machine
        # (GPU convolutions differ from the CPU's, and between runs, in the last bits, which
        # can move a voxel across deepbet's threshold), and bit-identical reruns with
        # preprocess.deterministic's one thread. Its two forward passes take about 1.6 s
        # (at brainage.preprocess.masks.DEEPBET_SHAPE, one thread).
        log.info("deepbet on the CPU (%d threads)", threads)
        interface = DeepBet(in_file=in_file, mask_file=str(mask_file), num_threads=threads,
                            use_gpu=False)
    elif route == "freesurfer" and freesurfer_tool == "synthstrip":
        interface = SynthStrip(in_file=in_file, mask_file=str(mask_file), num_threads=threads)
    elif route == "freesurfer":
        interface = WatershedSkullStrip(in_file=in_file, out_file=str(work / "brain.nii.gz"),
                                        subjects_dir=str(work))
    else:
        interface = SupportMask(in_file=in_file, mask_file=str(mask_file))
    if hasattr(interface, "cmdline"):
        log.info("running: %s", interface.cmdline)
    result = interface.run(cwd=str(work))
    return Path(result.outputs.get().get("mask_file") or result.outputs.out_file)


def _read_tool_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A skull-stripping tool's mask (non-zero voxels), empty or not: an empty one gets its
    own message; and its affine. A T1w stored as one volume of a 4D file (X, Y, Z, 1), which
    the input check accepts, gets a mask of that shape from deepbet (and FreeSurfer): its
    one volume."""
    import nibabel as nib

    image = nib.load(str(path))
    mask = np.asanyarray(image.dataobj) > 0
    return (mask[..., 0] if mask.ndim == 4 and mask.shape[3] == 1 else mask), image.affine


#: Volumes (ml) outside which a T1w's brain mask is more likely a failed stripping than a
#: brain: brain with its CSF is about 1,000-2,000 ml from childhood on (the simulator's
#: heads: 1,700-2,400). A 38,700 ml mask of a padded T1w, or the reverse, went to QC with
#: an INFO line, and only a Dice well below qc.min_dice flagged it there.
PLAUSIBLE_BRAIN_ML = (600.0, 3000.0)


def _say_if_implausible(name: str, tool: str, anat, anat_mask: np.ndarray,
                        anat_affine: np.ndarray, out_mask) -> None:
    """Warn when the tool's mask of the T1w holds a volume no brain has
    (:data:`PLAUSIBLE_BRAIN_ML`)."""
    volume_ml = float(anat_mask.sum()) * abs(np.linalg.det(anat_affine[:3, :3])) / 1000.0
    low, high = PLAUSIBLE_BRAIN_ML
    if not low <= volume_ml <= high:
        log.warning("%s: the brain mask %s made of the T1w %s holds %.0f ml, where a brain "
                    "with its CSF holds %.0f-%.0f ml: it may keep the skull or miss part of "
                    "the brain. Look at %s over the T1w; qc.exclude_failed leaves out the "
                    "subjects that QC flags.", name, tool, anat, volume_ml, low, high, out_mask)


def _absolute(path: str | Path) -> str:
    return str(Path(path).resolve())


def strip_skull(grid_image: str | Path, out_mask: str | Path, out_reference: str | Path,
                out_info: str | Path, *, anat: str | Path | None = None,
                method: str = "auto", freesurfer_tool: str = "synthstrip", threads: int = 1,
                subject: str = "", grid_modality: str = "stiffness") -> dict:
    """Brain mask on the grid of the subject's maps, and the image registration will align.

    Parameters
    ----------
    grid_image : the subject's native grid map (``grid_modality``; the stiffness map in
        kPa, or the T1w itself in a cohort without MRE maps).
    out_mask : brain mask on the grid map's grid (uint8 NIfTI).
    out_reference : the registration reference (float32 NIfTI): the skull-stripped T1w
        (route freesurfer/deepbet), the T1w as given (route none), or the grid map inside
        the mask (no anatomical image).
    out_info : sidecar JSON: ``route`` that ran and its ``tool_version``
        (:func:`tool_version`), ``mask_source``, ``reference_kind`` (one of
        :data:`REFERENCE_KINDS`), mask volume (ml).
    anat : the subject's T1w (or MRE magnitude) image in the same space, if any.
    grid_modality : what ``grid_image`` is (:data:`brainage.modalities.MODALITIES`).
    method, freesurfer_tool : config keys ``preprocess.skullstrip`` / ``freesurfer_tool``.
    threads : CPU threads of the network (deepbet, SynthStrip).
    subject : label for messages.

    Returns
    -------
    The sidecar's content.

    Raises
    ------
    brainage.inputs.InputError : unreadable, corrupt or empty input image.
    PreprocessError : empty brain mask; FreeSurfer requested but absent.
    """
    name = f"subject sub-{subject}" if subject else "subject"
    grid_kind = modality(grid_modality)
    data, affine = load_volume(grid_image, what=f"{name}: {grid_kind.description}")
    Path(out_mask).parent.mkdir(parents=True, exist_ok=True)
    with work_folder(Path(out_mask).parent, ".strip_skull-") as tmp:
        work = Path(tmp).resolve()  # interfaces run in it: every path must be absolute
        if anat is None:
            if not grid_kind.is_mre:
                raise PreprocessError(f"{name}: no T1w image given to strip, and the cohort "
                                      f"has no MRE map to take the brain from. Add the "
                                      f"subject's anat/sub-{subject}_T1w.nii.gz.")
            log.info("%s: no anatomical image; brain mask = the %s's support (largest "
                     "component, holes filled); skull stripping (%s) not run", name,
                     grid_kind.description, method)
            mask_file = _run_mask_interface("none", freesurfer_tool, _absolute(grid_image),
                                            work, threads)
            mask, _ = load_mask(mask_file, what=f"{name}: support mask")
            reference = np.where(mask & np.isfinite(data), data, 0).astype(np.float32)
            anat_mask, reference_affine = None, affine
            kind, source, ran = grid_modality, f"{grid_modality}_support", "none"
        else:
            anat_data, reference_affine = load_volume(anat, what=f"{name}: T1w image")
            # NaN and inf voxels are background, as in the maps (nan_to_num made an inf
            # 3.4e38, which then filled the reference's intensity range alone)
            anat_data = np.where(np.isfinite(anat_data), anat_data, 0).astype(np.float32)
            # only a T1w needs the tool: a subject without one gets its map's support
            # whatever the route, also where FreeSurfer is asked for and absent
            route = resolve_method(method, freesurfer_tool)
            if route == "none":
                log.info("%s: preprocess.skullstrip none: brain mask = the %s's support; the "
                         "T1w is registered as given (head)", name, grid_kind.description)
                mask_file = _run_mask_interface("none", freesurfer_tool, _absolute(grid_image),
                                                work, threads)
                mask, _ = load_mask(mask_file, what=f"{name}: support mask")
                anat_mask, reference = None, anat_data
                kind, source, ran = "T1w_head", f"{grid_modality}_support", "none"
            else:
                ran = "deepbet" if route == "deepbet" else FREESURFER_PROGRAMS[freesurfer_tool]
                log.info("%s: skull stripping the T1w image %s with %s (preprocess.skullstrip "
                         "%s)", name, anat, ran, method)
                try:
                    mask_file = _run_mask_interface(route, freesurfer_tool, _absolute(anat),
                                                    work, threads)
                except (AssertionError, ValueError, RuntimeError, OSError, MemoryError) as error:
                    # deepbet asserts "Not enough foreground" (or fails on an empty
                    # component list) when it finds no brain; FreeSurfer exits non-zero.
                    detail = (str(error).strip().splitlines() or [type(error).__name__])[-1]
                    raise PreprocessError(
                        f"{name}: skull stripping ({ran}) of {anat} failed: {detail}. "
                        f"{_failure_hint(error)}") from error
                anat_mask, mask_affine = _read_tool_mask(mask_file)
                # a cubic T1w's mask reoriented by a tool keeps its shape: the grid is compared
                if not same_grid(anat_mask.shape, mask_affine, anat_data.shape,
                                 reference_affine):
                    raise PreprocessError(f"{name}: {ran} wrote a mask of shape "
                                          f"{anat_mask.shape} with affine\n"
                                          f"{np.round(mask_affine, 3)}\nfor the T1w {anat} of "
                                          f"shape {anat_data.shape} with affine\n"
                                          f"{np.round(reference_affine, 3)}. Try another "
                                          f"preprocess.skullstrip route.")
                _say_if_implausible(name, ran, anat, anat_mask, reference_affine, out_mask)
                mask = resample_mask(anat_mask, reference_affine, data.shape, affine)
                reference = np.where(anat_mask, anat_data, 0).astype(np.float32)
                kind, source = "T1w_brain", "T1w"
        if anat_mask is not None and not anat_mask.any():
            raise PreprocessError(f"{name}: skull stripping ({ran}) of {anat} returned an empty "
                                  f"brain mask. Check the image (contrast, orientation), or "
                                  f"try another preprocess.skullstrip route.")
        if not mask.any():
            raise PreprocessError(
                f"{name}: the brain mask on the grid of {grid_image} is empty (mask from "
                f"{source}). Check that the T1w and the map are in the same space.")
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    # the T1w's path absolute (`predict run` is given the cohort relative to any folder),
    # links kept: a DataLad dataset's images are links into its annex
    info = {"subject": subject, "skullstrip": method, "route": ran,
            "tool_version": tool_version(ran), "mask_source": source, "reference_kind": kind,
            "anat": os.path.abspath(anat) if anat is not None else None,
            "mask_volume_ml": round(float(mask.sum() * voxel_ml), 2)}
    save_volume(out_mask, mask, affine, dtype=np.uint8, description=f"brain mask ({ran})")
    save_volume(out_reference, reference, reference_affine,
                description=f"registration reference ({kind})")
    write_json(out_info, info)
    log.info("%s: brain mask %.0f ml on the %s grid; reference %s", name,
             info["mask_volume_ml"], grid_modality, kind)
    return info


def read_reference_info(path: str | Path) -> dict:
    """The sidecar written by :func:`strip_skull`."""
    info = json.loads(Path(path).read_text())
    if info.get("reference_kind") not in REFERENCE_KINDS:
        raise PreprocessError(f"{path}: reference_kind {info.get('reference_kind')!r} is not one "
                              f"of {REFERENCE_KINDS}; rerun strip_skull.")
    return info
