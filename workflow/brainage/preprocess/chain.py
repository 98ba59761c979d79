"""One subject's preprocessing chain, defined once for every cohort.

The chain is four steps, each one package function::

    strip_skull -> correct_bias -> register_to_template -> compute_qc

and two Snakemake jobs per subject (:data:`JOBS`, workflow/rules/preprocess.smk): rule
``strip_skull`` (the skull-stripping network or FreeSurfer), and rule
``correct_and_register``, which runs the other three steps in one process. Starting Python
and importing ANTsPy, PyTorch and matplotlib costs a few seconds per job, as much as a
step's work at clinical MRE resolutions, so the steps that share those libraries share a
process; the skull stripping stays a job of its own, so that changing a bias-correction or
registration setting does not redo it.

:func:`subject_files` names every file a subject's chain reads and writes; the rules take
their inputs and outputs from it (with wildcards for the subject and the cohort's
preprocessing folder), and :func:`run_subject` runs the same functions on the same files
in-process for a lab that applies a model bundle without Snakemake. Settings come from
the validated ``preprocess`` section (the config's, or the one a bundle records) through
:func:`step_options`, so both routes preprocess alike.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib

from brainage.logs import log_files, log_to_files
from brainage.modalities import DEFAULT_MODALITIES, grid_modality, modality, mre_maps
from brainage.paths import TRAINING_PREPROC, Layout

log = logging.getLogger(__name__)

STEPS = ("strip_skull", "correct_bias", "register_to_template", "compute_qc")
#: Snakemake job (rule) -> the steps it runs, in order.
JOBS = {"strip_skull": ("strip_skull",),
        "correct_and_register": ("correct_bias", "register_to_template", "compute_qc")}


def subject_files(layout: Layout, subject: str, preproc: str = TRAINING_PREPROC,
                  modalities: Sequence[str] = DEFAULT_MODALITIES) -> dict[str, str]:
    """Every file of one subject's chain (``subject``/``preproc`` may be wildcards) for the
    cohort's ``modalities`` (:mod:`brainage.modalities`).

    Keys: ``mask``, ``mask_json``, ``reference``, ``reference_info`` (strip_skull);
    ``corrected_<map>`` for each MRE map, ``corrected_reference`` (correct_bias);
    ``registered_<modality>`` for each modality (the network's input channels),
    ``registered_T1w_json`` when the modalities list T1w, ``registered_mask``,
    ``registered_mask_json``, ``transform``, ``registered_reference``
    (register_to_template); ``qc_json``, ``qc_png`` (compute_qc). The JSON sidecars of the
    masks and of the T1w channel make the preprocessing folder a valid BIDS-Derivatives
    dataset.
    """
    native = dict(preproc=preproc)
    return {
        "mask": layout.subject_native(subject, "brain", "mask", **native),
        "mask_json": layout.subject_native(subject, "brain", "mask", ".json", **native),
        "reference": layout.subject_native(subject, "brain", "reference", **native),
        "reference_info": layout.subject_native(subject, "brain", "reference", ".json",
                                                **native),
        **{f"corrected_{name}": layout.subject_native(
            subject, "biascorr" if modality(name).n4 else "clean", name, **native)
           for name in mre_maps(modalities)},
        "corrected_reference": layout.subject_native(subject, "biascorr", "reference",
                                                     **native),
        **{f"registered_{name}": layout.subject_mni(subject, "preproc", name, **native)
           for name in modalities},
        **({"registered_T1w_json": layout.subject_mni(subject, "preproc", "T1w", ".json",
                                                      **native)}
           if "T1w" in modalities else {}),
        "registered_mask": layout.subject_mni(subject, "brain", "mask", **native),
        "registered_mask_json": layout.subject_mni(subject, "brain", "mask", ".json",
                                                   **native),
        "transform": layout.subject_transform(subject, **native),
        "registered_reference": layout.subject_mni(subject, "preproc", "reference", **native),
        "qc_json": layout.subject_qc(subject, ".json", **native),
        "qc_png": layout.subject_qc(subject, ".png", **native),
    }


def registered_maps(files: Mapping[str, str], modalities: Sequence[str]) -> dict[str, str]:
    """``{modality: registered map}`` of a subject's :func:`subject_files`."""
    return {name: files[f"registered_{name}"] for name in modalities}


def step_threads(preprocess: Mapping) -> int:
    """ITK/PyTorch threads per step: one when ``preprocess.deterministic`` (bit-identical
    reruns), otherwise ``preprocess.threads``."""
    return 1 if preprocess["deterministic"] else int(preprocess["threads"])


def step_options(step: str, preprocess: Mapping) -> dict:
    """The keyword options of ``step`` from a validated ``preprocess`` section: exactly
    the settings that change the step's result (Snakemake passes them as params)."""
    threads = step_threads(preprocess)
    if step == "strip_skull":
        # The FreeSurfer program matters only where FreeSurfer may run (auto picks it when
        # that program is installed); otherwise the default, so that changing it reruns
        # no subject. The default, not nothing: the options recorded so far name it.
        uses_freesurfer = preprocess["skullstrip"] in ("auto", "freesurfer")
        return {"method": preprocess["skullstrip"],
                "freesurfer_tool": (preprocess["freesurfer_tool"] if uses_freesurfer
                                    else "synthstrip"),
                "threads": threads}
    if step == "correct_bias":
        return {"n4": preprocess["n4"], "max_nan_fraction": preprocess["max_nan_fraction"],
                "deterministic": preprocess["deterministic"], "threads": threads}
    if step == "register_to_template":
        return {"deterministic": preprocess["deterministic"], "threads": threads}
    if step == "compute_qc":
        return {}
    raise ValueError(f"unknown preprocessing step {step!r}; the steps are {', '.join(STEPS)}.")


def run_step(step: str, files: Mapping[str, str], inputs: Mapping[str, str], *,
             template_t1: str, template_mask: str, options: Mapping, subject: str,
             modalities: Sequence[str] = DEFAULT_MODALITIES, n4: bool = True) -> None:
    """Run one step on a subject's files: the function a rule's script calls.

    ``inputs``: ``{map: native file}`` of the cohort's MRE maps and ``anat`` (the T1w) when
    the subject has one (:func:`brainage.inputs.subject_inputs`). ``n4``: config key
    ``preprocess.n4`` (an option of correct_bias), for the registered T1w's sidecar.
    """
    from brainage.preprocess import correct_bias, register_to_template, strip_skull
    from brainage.preprocess.derivatives import describe_mask, describe_registered_t1w
    from brainage.qc import compute_qc

    maps = mre_maps(modalities)
    grid = grid_modality(modalities)
    if step == "strip_skull":
        strip_skull(inputs["anat"] if grid == "T1w" else inputs[grid], files["mask"],
                    files["reference"], files["reference_info"], anat=inputs.get("anat"),
                    subject=subject, grid_modality=grid, **options)
        describe_mask(files["mask"], grid=modality(grid).description)
    elif step == "correct_bias":
        correct_bias({name: inputs[name] for name in maps}, files["mask"], files["reference"],
                     files["reference_info"],
                     {name: files[f"corrected_{name}"] for name in maps},
                     files["corrected_reference"], subject=subject, **options)
    elif step == "register_to_template":
        register_to_template({name: files[f"corrected_{name}"] for name in maps},
                             files["mask"], files["corrected_reference"],
                             files["reference_info"], template_t1, template_mask,
                             registered_maps(files, modalities), files["registered_mask"],
                             files["transform"], files["registered_reference"],
                             subject=subject, **options)
        if "T1w" in modalities:
            describe_registered_t1w(files["registered_T1w"], template_mask=template_mask,
                                    n4=n4)
        describe_mask(files["registered_mask"], template_mask=template_mask)  # written last
    elif step == "compute_qc":
        compute_qc(files[f"registered_{grid}"], files["registered_mask"],
                   files["registered_reference"], files["reference_info"], template_t1,
                   template_mask, files["qc_json"], files["qc_png"], subject=subject,
                   grid_modality=grid, maps=registered_maps(files, modalities), **options)
    else:
        raise ValueError(f"unknown preprocessing step {step!r}; the steps are "
                         f"{', '.join(STEPS)}.")


def job_options(job: str, preprocess: Mapping) -> dict:
    """``{step: options}`` of the steps of a Snakemake job (its params)."""
    return {step: step_options(step, preprocess) for step in JOBS[job]}


#: A preprocessing job's memory apart from its images (MB): Python with ANTsPy or PyTorch,
#: and on a cluster node the Snakemake process that runs the job (110-160 MB).
JOB_BASE_MB = 600
#: ... and per million voxels of its registration reference, the T1w where it has one (MB):
#: N4 corrects the skull-stripped T1w on its own grid (brainage.preprocess.bias), holding
#: several float copies of it. Measured peaks of correct_and_register: 943 MiB for a 1 mm
#: T1w (256 x 256 x 176), 1,797 MiB at 0.7 mm (320 x 320 x 256), 4,017 MiB at 0.5 mm
#: (448 x 448 x 320): 58 MiB per million voxels, here with a quarter to spare.
JOB_MB_PER_MILLION_VOXELS = 75


def job_memory_mb(reference: str | Path | None, given_mb: int) -> int:
    """What a subject's preprocessing job asks for (MB): ``given_mb``
    (``resources.preprocess.mem_mb``), raised to what its registration reference (the
    T1w, or the grid map without one) needs (:data:`JOB_BASE_MB` +
    :data:`JOB_MB_PER_MILLION_VOXELS`), in hundreds of MB.

    The default 2,000 MB holds a T1w of up to about 18 million voxels (a whole head is 11.5
    million at 1 mm, 21 million at 0.8 mm); a 0.5 mm T1w needs over 4 GB, and SLURM killed
    its job at every retry (1.5 and 2 times the request). Images are read by their headers
    only; one that does not exist yet (a simulated cohort before its simulation: Snakemake
    evaluates the request again before the job starts) or cannot be read counts for
    nothing, and the job's own checks name it."""
    voxels = _voxel_count(reference) if reference else 0
    needed = JOB_BASE_MB + JOB_MB_PER_MILLION_VOXELS * voxels / 1e6
    return max(int(given_mb), 100 * math.ceil(needed / 100))


def _voxel_count(path: str | Path) -> int:
    try:
        stat = os.stat(path)
    except OSError:
        return 0
    return _header_voxel_count(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=None)
def _header_voxel_count(path: str, size: int, mtime_ns: int) -> int:
    """Cached by the file's size and time: a subject's two jobs read one T1w (0.8 ms each,
    a second and a half of planning for 2,000 subjects)."""
    try:
        return math.prod(nib.load(path).header.get_data_shape())
    except Exception:  # nibabel raises many types; broken: the job says which
        return 0


def run_job(job: str, files: Mapping[str, str], inputs: Mapping[str, str], *,
            template_t1: str | None, template_mask: str | None, options: Mapping,
            subject: str, modalities: Sequence[str] = DEFAULT_MODALITIES) -> None:
    """Run the steps of one Snakemake job (:data:`JOBS`), in one process."""
    n4 = options.get("correct_bias", {}).get("n4", True)
    for step in JOBS[job]:
        run_step(step, files, inputs, template_t1=template_t1, template_mask=template_mask,
                 options=options[step], subject=subject, modalities=modalities, n4=n4)


#: The output whose presence means a step is done (each step writes it last).
STEP_DONE = {"strip_skull": "mask_json", "correct_bias": "corrected_reference",
             "register_to_template": "registered_mask_json", "compute_qc": "qc_png"}


def step_outputs(files: Mapping[str, str], step: str) -> list[str]:
    """Every file ``step`` writes, of a subject's :func:`subject_files`."""
    if step == "strip_skull":
        keys = ["mask", "mask_json", "reference", "reference_info"]
    elif step == "correct_bias":
        keys = [key for key in files if key.startswith("corrected_")]
    elif step == "register_to_template":
        keys = [key for key in files if key.startswith("registered_") or key == "transform"]
    elif step == "compute_qc":
        keys = ["qc_json", "qc_png"]
    else:
        raise ValueError(f"unknown preprocessing step {step!r}; the steps are "
                         f"{', '.join(STEPS)}.")
    return [files[key] for key in keys]


def step_records(inputs: Mapping[str, str], preprocess: Mapping, *, template_t1: str,
                 template_mask: str, modalities: Sequence[str]) -> dict[str, str]:
    """What each step's outputs are made from, as JSON text per step: the subject's input
    files (name, bytes, modification time), the template's sha256, the modalities and the
    options of this step and of every step before it (an earlier step redone invalidates
    the later ones). Thread counts are left out: deterministic steps do not depend on them.
    """
    from brainage.io import sha256_file

    identity = {}
    for kind, path in sorted(inputs.items()):
        stat = Path(path).stat()
        identity[kind] = [Path(path).name, stat.st_size, stat.st_mtime_ns]
    template = {"t1": sha256_file(template_t1), "mask": sha256_file(template_mask)}
    records, options = {}, {}
    for step in STEPS:
        options[step] = {key: value for key, value in step_options(step, preprocess).items()
                         if key != "threads"}
        records[step] = json.dumps({"inputs": identity, "template": template,
                                    "modalities": list(modalities), "options": options},
                                   sort_keys=True, default=str)
    return records


def _only_times_differ(kept: str, current: str) -> bool:
    """Whether two records of :func:`step_records` differ in their input files'
    modification times alone (a cohort copied without its times)."""
    try:
        kept_record, current_record = json.loads(kept), json.loads(current)
        for record in (kept_record, current_record):
            record["inputs"] = {kind: identity[:2]
                                for kind, identity in record["inputs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):  # an older or damaged record
        return False
    return kept_record == current_record


#: Beside a cohort's BIDS-Derivatives folder, not in it: each subject's step records.
STEP_RECORDS = ".step_records"


def step_record_path(layout: Layout, subject: str, preproc: str, step: str) -> Path:
    """Where :func:`run_subject` keeps a step's record: beside the cohort's
    BIDS-Derivatives folder, not in it."""
    return Path(layout.preproc_dir(preproc)).parent / STEP_RECORDS / f"sub-{subject}" / \
        f"{step}.json"


def chain_products(files: Mapping[str, str], modalities: Sequence[str]) -> set[str]:
    """What is read after a subject's chain, of its :func:`subject_files`: the registered
    maps of ``modalities`` (the network's input) and ``qc.json`` (the QC table, a cohort's
    prediction). The other outputs (the masks, the QC figure, the sidecars) are read by
    nothing after their own step or only by the steps after it: deleted (README, "Freeing
    disk space"), they are made again only where a step that reads them must run, as
    Snakemake does."""
    return {*registered_maps(files, modalities).values(), files["qc_json"]}


#: What a step's record holds while the step runs: a step stopped or failed then is done
#: again with a line that says so, not blamed on other inputs or settings.
UNFINISHED = "unfinished"


def run_subject(inputs: Mapping[str, str], layout: Layout, subject: str, *, preproc: str,
                preprocess: Mapping, template_t1: str, template_mask: str,
                modalities: Sequence[str] = DEFAULT_MODALITIES) -> dict[str, str]:
    """The whole chain for one subject, in-process; returns :func:`subject_files`.

    A step whose record (:func:`step_records`, written when it finished) matches and whose
    :func:`chain_products` exist is skipped, so an interrupted run continues; its other
    outputs may have been deleted, unless a later step must run and reads them. A step
    made from other input files or settings (a replaced map, another bundle's
    preprocessing), or with a product deleted since, is done again, with the steps after
    it, and a warning says so; before the records, such outputs were reused silently.
    """
    from brainage.io import atomic_path

    files = subject_files(layout, subject, preproc, modalities)
    records = step_records(inputs, preprocess, template_t1=template_t1,
                           template_mask=template_mask, modalities=modalities)
    products = chain_products(files, modalities)
    record_paths = {step: step_record_path(layout, subject, preproc, step) for step in STEPS}
    kept = {step: path.read_text() if path.is_file() else None
            for step, path in record_paths.items()}
    lost = {step: [path for path in step_outputs(files, step) if path in products
                   and not Path(path).is_file()] for step in STEPS}
    # from the last step back: a step runs when it is not done as recorded or lost a
    # product, or when a later step runs and outputs of this one that it reads are gone
    must_run, later_runs = [], False
    for step in reversed(STEPS):
        if kept[step] != records[step] or lost[step] or later_runs and any(
                not Path(path).is_file() for path in step_outputs(files, step)):
            must_run.append(step)
            later_runs = True
    if not must_run:
        log.info("sub-%s: reused (every step's record matches its inputs and settings)",
                 subject)
        return files
    first = min(STEPS.index(step) for step in must_run)
    _say_why_steps_are_done_again(STEPS[first], files, kept, records, lost, subject)
    for step in STEPS[first:]:  # every later step reads this step's new outputs
        record_paths[step].parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(record_paths[step]) as temporary:
            temporary.write_text(UNFINISHED)
        run_step(step, files, inputs, template_t1=template_t1, template_mask=template_mask,
                 options=step_options(step, preprocess), subject=subject,
                 modalities=modalities, n4=preprocess["n4"])
        with atomic_path(record_paths[step]) as temporary:
            temporary.write_text(records[step])
    return files


def _say_why_steps_are_done_again(first: str, files: Mapping[str, str],
                                  kept: Mapping[str, str | None], records: Mapping[str, str],
                                  lost: Mapping[str, list[str]], subject: str) -> None:
    """Warn why :func:`run_subject` does ``first`` and the steps after it again: for the
    earliest step that must run of itself (its record differs, or it lost a product),
    unless that step never finished (a new subject, or a killed run)."""
    step = next(step for step in STEPS
                if kept[step] != records[step] or lost[step])
    folder = Path(files[STEP_DONE[step]]).parent
    if kept[step] == records[step]:  # deleted since (by hand, or a clean-up of large files)
        log.warning("sub-%s: %s is missing; doing %s and the steps after it again",
                    subject, lost[step][0], first)
    elif kept[step] == UNFINISHED:
        log.info("sub-%s: %s did not finish (stopped, or failed); doing %s and the steps "
                 "after it again", subject, step, first)
    elif kept[step] is not None and _only_times_differ(kept[step], records[step]):
        log.warning("sub-%s: the input files of the %s outputs in %s have new modification "
                    "times (the same names and sizes): copied without keeping them? (cp -a "
                    "and rsync -a keep them.) Their content may differ, so %s and the steps "
                    "after it are done again", subject, step, folder, first)
    elif kept[step] is not None or Path(files[STEP_DONE[step]]).is_file():
        log.warning("sub-%s: the %s outputs in %s were made from other input files or "
                    "preprocessing settings (or kept no record of them); doing %s and the "
                    "steps after it again", subject, step, folder, first)


class WorkerKilledError(RuntimeError):
    """A process of :func:`run_subjects` died without an error of its own (killed)."""


def run_subjects(inputs: Mapping[str, Mapping[str, str]], layout: Layout, *, preproc: str,
                 preprocess: Mapping, template_t1: str, template_mask: str,
                 modalities: Sequence[str] = DEFAULT_MODALITIES, jobs: int = 1,
                 cohort: str = "") -> dict[str, dict[str, str]]:
    """:func:`run_subject` for every subject of ``inputs`` (``{label: its input files}``),
    ``jobs`` subjects at a time; returns ``{label: subject_files}`` in the order given.

    With ``jobs`` > 1 each subject runs in a process of its own, started fresh (spawn: no
    threads or state inherited from this process), as a Snakemake job would; with
    ``preprocess.deterministic`` the files are the same bit for bit whatever ``jobs``.
    A failure stops the subjects not yet started and is raised (the first in the given
    order); the subjects already done keep their files, so a rerun continues.
    """
    settings = dict(preproc=preproc, preprocess=preprocess, template_t1=template_t1,
                    template_mask=template_mask, modalities=modalities)
    name = f"cohort {cohort}: " if cohort else ""
    done: dict[str, dict[str, str]] = {}
    if jobs <= 1:
        for number, (label, files) in enumerate(inputs.items(), start=1):
            log.info("%spreprocessing sub-%s (%d of %d)", name, label, number, len(inputs))
            done[label] = run_subject(files, layout, label, **settings)
        return done
    try:
        pool = ProcessPoolExecutor(max_workers=jobs,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=log_to_files,
                                   initargs=(log_files(), logging.getLogger().getEffectiveLevel()))
    except OSError as error:  # its semaphores live in /dev/shm, read-only in some containers
        log.warning("%s%d subjects at a time need a writable /dev/shm for the processes' "
                    "semaphores (%s); preprocessing one subject at a time instead (the same "
                    "files with preprocess.deterministic)", name, jobs, error)
        return run_subjects(inputs, layout, jobs=1, cohort=cohort, **settings)
    log.info("%spreprocessing %d subjects, %d at a time", name, len(inputs), jobs)
    with pool:
        futures = {label: pool.submit(run_subject, files, layout, label, **settings)
                   for label, files in inputs.items()}
        try:
            for label, future in futures.items():
                done[label] = future.result()
                log.info("%ssub-%s preprocessed (%d of %d)", name, label, len(done),
                         len(inputs))
        except BrokenProcessPool:  # a worker killed from outside, mostly for memory
            # done in any order: those that finished before the pool broke have a result
            finished = [label for label, future in futures.items() if future.done()
                        and not future.cancelled() and future.exception() is None]
            unfinished = [f"sub-{label}" for label in futures if label not in finished]
            shown = ", ".join(unfinished[:10]) + (
                f" and {len(unfinished) - 10} more" if len(unfinished) > 10 else "")
            raise WorkerKilledError(
                f"{name}a preprocessing process was killed (by the out-of-memory killer, or "
                f"a signal); {len(finished)} of {len(inputs)} subjects were done, not "
                f"{shown}. Run the same command again to continue (finished subjects and "
                f"steps are kept), with a lower --jobs if memory ran out.") from None
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the running subjects finish
            raise
    return done
