"""Brain age for new subjects, from the command line (also ``brainage-predict``).

Two commands, each a thin layer over the package:

``export``
    After ``snakemake`` trained and evaluated the grid, copy the cell named by config key
    ``predict.model`` into ``results/models/<name>/`` (:func:`brainage.export.export_model`).
``run``
    For a lab with a bundle and no Snakemake: preprocess a BIDS-like dataset exactly as the
    bundle's training data were (the same chain, :func:`brainage.preprocess.chain.run_subject`,
    with the settings the bundle records), then predict (:func:`brainage.apply.predict_cohort`).

::

    python -m brainage.predict export --configfile config/config.yaml
    python -m brainage.predict run --bundle results/models/brainage \\
        --dataset /data/adni_mre --output results/predict/adni
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from brainage import brainage_version
from brainage.apply import BrainAgeModel, predict_cohort
from brainage.bundle import MANIFEST_FILE, BundleError, read_bundle
from brainage.config import (
    ConfigError,
    cell_settings,
    check_preprocessing_record,
    encoder_owners,
    exported_cell,
    preprocessing_record,
)
from brainage.export import ExportError, export_model
from brainage.inputs import (
    InputError,
    check_cohort_table,
    check_dataset_images,
    read_participants,
    same_grid,
    subject_inputs,
    unlisted_subject_folders,
)
from brainage.io import LockHeldError, WriteError, atomic_path, writer_lock
from brainage.logs import EarlyRecords, also_logging_to
from brainage.normalise import split_names
from brainage.paths import TRAINING_PREPROC, Layout
from brainage.preprocess.chain import STEP_RECORDS, WorkerKilledError, registered_maps, run_subjects
from brainage.preprocess.derivatives import describe_preprocessing
from brainage.preprocess.images import OUT_OF_MEMORY_HINT, PreprocessError
from brainage.preprocess.template import prepare_template, template_record

log = logging.getLogger(__name__)

#: What a user's mistake raises (a bundle, dataset, flag or config value; an output that
#: cannot be written): each message names the file or setting and the remedy, so
#: :func:`main` prints it in one line instead of a traceback.
USER_ERRORS = (BundleError, ConfigError, ExportError, InputError, WorkerKilledError, WriteError)

#: The file :func:`run_cohort` leaves in its ``--output`` first, so that a later run knows
#: the folder as one of its own: it removes and rewrites files there (the reports,
#: ``preproc/``), which in any other folder could be the user's.
OUTPUT_MARKER = ".brainage-predict-run"
#: Every run's log in ``<output>/logs/``, appended to (:func:`brainage.logs.also_logging_to`).
RUN_LOG = "predict_run.log"
#: Held by a `predict run` while it writes into its --output (:func:`writer_lock`).
RUN_LOCK = ".brainage-predict-run.lock"

#: The reports :func:`run_cohort` writes under ``--output`` (predict_cohort's argument ->
#: file name), one run's together.
REPORT_FILES = {"predictions_path": "predictions.tsv", "summary_path": "summary.tsv",
                "figure_path": "gap_by_group.png", "provenance_path": "provenance.json"}


def export_from_config(config: Mapping) -> dict:
    """Export the cell ``predict.model`` of a validated config (outputs of a finished run),
    from the first split of the scheme."""
    layout = Layout.from_config(config)
    experiment, variant, seed = exported_cell(config)
    trained_in = encoder_owners(config)[(experiment, variant, seed)]
    split = split_names(read_participants(config["dataset"]["root"], config["dataset"]["modalities"]),
                        **config["split"])[0]
    name = config["predict"]["model"]["name"]
    return export_model(
        layout.cell_dir(split, experiment, variant, seed),
        layout.cell_file(split, *trained_in, "encoder.pt"),
        layout.split_file(split, "stats.json"),
        cell_settings(config, experiment, variant, seed),
        bundle_dir=layout.model_bundle(name), name=name,
        template_t1=layout.template("T1w"), template_mask=layout.template("brain_mask"),
        preprocessing=preprocessing_record(config), bias_fit=config["predict"]["bias_fit"],
        # a finished run has it; without it the bundle only lacks the registration record
        qc_table=layout.qc_table() if Path(layout.qc_table()).is_file() else None)


def run_cohort(bundle_dir: str | Path, dataset_root: str | Path, output: str | Path, *,
               cohort: str | None = None, group_column: str | None = None,
               bias_reference_group: str | None = None, template_t1: str | None = None,
               template_mask: str | None = None, device: str | None = None,
               threads: int | None = None, jobs: int = 1) -> pd.DataFrame:
    """Preprocess a BIDS-like dataset as the bundle's training data were, then predict.

    The template is rebuilt (nilearn's MNI152, or the given files when the bundle's
    template was a file) and checked against the bundle's template record; each subject
    runs through the preprocessing chain with the bundle's ``preprocess`` settings; then
    :func:`brainage.apply.predict_cohort`; ``jobs`` subjects are preprocessed at a time,
    each in a process of its own. Outputs under ``output``: ``preproc/`` (a
    BIDS-Derivatives dataset with the template under ``tpl-<space>/``),
    ``predictions.tsv``, ``summary.tsv``, ``gap_by_group.png``, ``provenance.json``
    (:data:`REPORT_FILES`), and ``logs/`` (:data:`RUN_LOG`, every run's log appended). A
    rerun into the same folder reuses the subjects preprocessed before and removes the
    earlier run's reports once its inputs pass their checks, so a run that stops halfway
    leaves no reports that are not its own.
    """
    early = EarlyRecords()  # what is logged before the run's log file may be written
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, once it exists
            return _run_checked_cohort(
                early, held, bundle_dir, dataset_root, output, cohort=cohort,
                group_column=group_column, bias_reference_group=bias_reference_group,
                template_t1=template_t1, template_mask=template_mask, device=device,
                threads=threads, jobs=jobs)
    finally:
        early.stop()


def _run_checked_cohort(early: EarlyRecords, held: contextlib.ExitStack,
                        bundle_dir: str | Path, dataset_root: str | Path, output: str | Path, *,
                        cohort: str | None,
                        group_column: str | None, bias_reference_group: str | None,
                        template_t1: str | None, template_mask: str | None,
                        device: str | None, threads: int | None, jobs: int) -> pd.DataFrame:
    """:func:`run_cohort`'s work; ``early`` holds what was logged before the log opens,
    ``held`` keeps the output folder's lock until the run ends."""
    options = {"--cohort": cohort, "--group-column": group_column,  # as given, for the log
               "--bias-reference-group": bias_reference_group, "--template-t1": template_t1,
               "--template-mask": template_mask, "--device": device, "--threads": threads,
               "--jobs": jobs if jobs != 1 else None}
    for flag, path in (("--bundle", bundle_dir), ("--output", output),
                       ("--template-t1", template_t1), ("--template-mask", template_mask)):
        if path is not None and str(path).startswith("~"):  # `--output=~/x`, or quoted
            raise InputError(f"{flag} {path}: '~' is not expanded in paths (a folder named "
                             f"'~' would be made here). Set {flag} to the full path "
                             f"({Path(path).expanduser()}).")
    bundle = read_bundle(bundle_dir)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file, not a folder. Pass a folder for the "
                         f"predictions (it is created if it does not exist).")
    if output.resolve() == Path(dataset_root).resolve():
        raise InputError(f"--output {output} is the dataset folder itself: the predictions "
                         f"and preproc/ would be written among the raw data. Pass another "
                         f"folder, e.g. {Path(dataset_root) / 'derivatives' / 'brainage'}.")
    _check_output_folder(output, bundle.path)
    cohort = cohort or output.resolve().name  # `--output .` names the folder, not ""
    try:  # the bundle may come from another lab: its values name files here
        recorded = check_preprocessing_record(
            bundle.manifest.get("preprocessing"),
            source=f"model bundle {bundle.path}, {MANIFEST_FILE} 'preprocessing'")
    except ConfigError as error:
        raise BundleError(f"{error}\nThe bundle was not written by `brainage.predict "
                          f"export` or was edited since; re-export it.") from None
    preprocess = dict(recorded["preprocess"])
    if threads is not None:
        preprocess["threads"] = threads
    template = recorded["template"]
    if template["source"] != "file" and (template_t1 or template_mask):
        raise InputError(
            f"model bundle {bundle.path} was trained with nilearn's MNI152 template, which "
            f"is rebuilt here; --template-t1 and --template-mask are for a bundle trained "
            f"with a template from files. Drop them.")
    if template["source"] == "file" and not (template_t1 and template_mask):
        raise InputError(
            f"model bundle {bundle.path} was trained with a template from files "
            f"({template['t1']}, {template['mask']}); pass the same files with "
            f"--template-t1 and --template-mask.")
    modalities = bundle.cohort_modalities  # the model's maps and the training grid's
    participants = read_participants(dataset_root, modalities, root_setting="--dataset",
                                     needed_by=f"model bundle {bundle.path}",
                                     to_predict=True)
    labels = [pid[len("sub-"):] for pid in participants["participant_id"]]
    # the table's problems before the minutes of preprocessing, not after them, and
    # before anything is written under the output folder
    check_cohort_table(participants, Path(dataset_root) / "participants.tsv", cohort=cohort,
                       group_column=group_column, bias_reference_group=bias_reference_group)
    if output.is_symlink() and not output.exists():
        raise InputError(f"--output {output} is a link to {os.readlink(output)}, which does "
                         f"not exist (a scratch area purged?). Create that folder, or pass "
                         f"another --output.")
    try:  # the first writes: an unwritable --output named as the flag, with what to do
        output.mkdir(parents=True, exist_ok=True)
        if not (output / OUTPUT_MARKER).is_file():  # a colleague's: not rewritten in place
            with atomic_path(output / OUTPUT_MARKER) as temporary:
                temporary.write_text(
                    "This folder is the --output of `brainage-predict run`: a rerun into it "
                    "reuses preproc/ and rewrites the reports.\n")
        # two runs into one folder did all the work twice, interleaved their logs, and one
        # could delete the other's reports
        held.enter_context(writer_lock(output / RUN_LOCK, wait=False,
                                       what=f"--output {output} (a `brainage-predict run`)"))
    except LockHeldError as error:
        raise InputError(f"{error} Or pass another --output.") from None
    except OSError as error:  # a WriteError too: its cause says why, the folder is named
        cause = error.__cause__ if isinstance(error, WriteError) and error.__cause__ else error
        reason = getattr(cause, "strerror", None) or cause
        raise InputError(f"--output {output} cannot be written ({reason}). Choose a folder "
                         f"you can write to, on a disk with room.") from None
    # the run's log beside its outputs: a subject's warnings (a T1w missing, NaN holes)
    # outlive the console, and a rerun that reuses the subject does not repeat them
    heading = " ".join([f"brainage.predict run --bundle {Path(bundle.path).resolve()} "
                        f"--dataset {Path(dataset_root).resolve()} --output {output.resolve()}",
                        *(f"{flag} {value}" for flag, value in options.items()
                          if value is not None)])
    with also_logging_to(output / "logs" / RUN_LOG, heading=heading, earlier=early.stop()):
        layout = Layout(str(output), str(output / "logs"), str(output / "benchmarks"),
                        template["space"])
        t1_path, mask_path = layout.template("T1w"), layout.template("brain_mask")
        prepared = prepare_template(t1_path, mask_path, source=template["source"], t1=template_t1,
                                    mask=template_mask)
        rebuilt = template_record(t1_path, mask_path, source=template["source"],
                                  space=template["space"])
        expected = bundle.manifest["template"]
        # the mask checksum covers its voxels only: the grid they lie on is compared too
        if rebuilt["mask_voxels_sha256"] != expected["mask_voxels_sha256"] or not same_grid(
                rebuilt["shape"], rebuilt["affine"], expected.get("shape", ()),
                expected.get("affine", np.full((4, 4), np.nan))):
            raise InputError(
                f"the template rebuilt here ({rebuilt['id']}, {rebuilt['n_brain_voxels']} brain "
                f"voxels, grid {rebuilt['shape']} with affine {rebuilt['affine']}) differs from "
                f"the one model bundle {bundle.path} was trained with ({expected['id']}, "
                f"{expected['n_brain_voxels']} brain voxels, grid {expected.get('shape')} with "
                f"affine {expected.get('affine')}). Use the same template files "
                f"(--template-t1/--template-mask) or the same nilearn version.")
        # absent in bundles exported before it was recorded
        if expected.get("t1_voxels_sha256") not in (None, rebuilt["t1_voxels_sha256"]):
            raise InputError(
                f"the template T1 rebuilt here ({template_t1 or rebuilt['id']}) differs from the "
                f"one model bundle {bundle.path} was trained with (its voxels' sha256 "
                f"{rebuilt['t1_voxels_sha256'][:12]}... against {expected['t1_voxels_sha256'][:12]}"
                f"...): subjects would be registered to another image. Use the same template "
                f"files (--template-t1/--template-mask) or the same nilearn version.")
        # every image opened once before the first subject's minutes of preprocessing, and
        # before preproc/ is described as a derivative of this dataset (the template, checked
        # in seconds before these minutes, holds nothing of the dataset)
        check_dataset_images(dataset_root, labels, modalities,
                             cache_file=output / "logs" / "checked_inputs.json", announce=log.info)
        # the network and read-out built once before any subject's minutes of preprocessing:
        # a bundle whose parts do not fit each other (or a device this machine lacks) stops here
        BrainAgeModel.from_bundle(bundle, device=device)
        describe_preprocessing(layout.preproc_dir(), space=template["space"],
                               template_shape=prepared["shape"], source=str(dataset_root),
                               version=brainage_version(), template=True, modalities=modalities,
                               n4=preprocess["n4"])
        # a rerun that stops (a subject's chain fails) must not leave the last run's reports
        # beside its own new preprocessing, where they would read as this run's result; the
        # preprocessed subjects, the costly part, are kept and reused
        previous = [output / name for name in REPORT_FILES.values() if (output / name).exists()]
        for path in previous:
            path.unlink()
        if previous:
            log.info("removed the previous run's reports (%s) from %s; this run writes them anew",
                     ", ".join(path.name for path in previous), output)
        _warn_about_other_subjects(layout.preproc_dir(), labels, dataset_root)
        try:
            processed = run_subjects(
                {label: subject_inputs(dataset_root, label, modalities, root_setting="--dataset")
                 for label in labels},
                layout, preproc=TRAINING_PREPROC, preprocess=preprocess, template_t1=t1_path,
                template_mask=mask_path, modalities=modalities, jobs=jobs, cohort=cohort)
        except (InputError, PreprocessError) as error:
            # its config-key remedies do not apply here: the bundle fixes the preprocessing
            remedy = ("run it again where more memory is free, or with fewer --jobs"
                      if OUT_OF_MEMORY_HINT in str(error) else
                      f"fix this subject's file, or remove its row from "
                      f"{Path(dataset_root) / 'participants.tsv'}")
            raise InputError(
                f"{error}\nWith a model bundle the preprocessing settings are the bundle's: "
                f"{remedy}. The subjects preprocessed so far are kept: the same command "
                f"continues where it stopped.") from None
        channels = bundle.normalisation["modalities"]
        maps = {label: registered_maps(files, channels) for label, files in processed.items()}
        qc = {label: files["qc_json"] for label, files in processed.items()}
        return predict_cohort(bundle, dataset_root, maps, qc,
                              **{argument: output / name for argument, name in REPORT_FILES.items()},
                              cohort=cohort, group_column=group_column,
                              bias_reference_group=bias_reference_group, device=device)


def _check_output_folder(output: Path, bundle_path: str | Path) -> None:
    """Refuse an ``--output`` that :func:`run_cohort` would damage: a folder inside the
    model bundle (the next export replaces the bundle folder as a whole, and a copied
    bundle would carry the cohort's images), or a folder that holds files and is not the
    output of an earlier run (its ``preproc/`` could be a pipeline's training cohort,
    e.g. ``results/``, and files named like the reports would be deleted).

    An earlier run is known by :data:`OUTPUT_MARKER`, or by the step records that runs
    before the marker kept (:data:`brainage.preprocess.chain.STEP_RECORDS`).
    """
    resolved, bundle = output.resolve(), Path(bundle_path).resolve()
    if resolved == bundle or bundle in resolved.parents:
        raise InputError(f"--output {output} is inside model bundle {bundle_path}: the next "
                         f"export replaces the bundle folder as a whole and would delete the "
                         f"predictions, and a copy of the bundle would carry this cohort's "
                         f"images. Pass a folder outside the bundle.")
    if not output.is_dir() or (output / OUTPUT_MARKER).is_file() or \
            (output / STEP_RECORDS).is_dir():
        return
    entries = sorted(entry.name for entry in output.iterdir())
    if entries:
        raise InputError(
            f"--output {output} already holds files that `predict run` did not write "
            f"({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}): a run removes "
            f"and rewrites {', '.join(REPORT_FILES.values())} and preproc/ there, and a "
            f"pipeline's results folder would lose its training cohort's preprocessing. "
            f"Pass a new or empty folder, or the --output of an earlier run.")


def _warn_about_other_subjects(preproc_dir: str | Path, labels: Sequence[str],
                               dataset_root: str | Path) -> None:
    """Name the subjects an earlier run left in ``preproc_dir`` that this dataset does not
    list (subjects removed from the dataset, or another dataset written to the same
    --output): they stay, unused, under a description that names this dataset."""
    others = unlisted_subject_folders(preproc_dir, {f"sub-{label}" for label in labels})
    if others:
        log.warning("%s holds %d subject(s) that %s does not list (%s). They are kept but "
                    "not used. If they left the dataset (consent withdrawn, a faulty scan), "
                    "delete their folders there and in %s (the rest is reused); if they are "
                    "another dataset's, give each dataset an --output of its own.",
                    preproc_dir, len(others), Path(dataset_root) / "participants.tsv",
                    ", ".join(others[:10]) + (", ..." if len(others) > 10 else ""),
                    Path(preproc_dir).parent / STEP_RECORDS)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _program_name() -> str:
    """The command as the user typed it, for usage lines and messages: the installed
    ``brainage-predict`` script or ``python -m brainage.predict`` (argv[0] is then a path
    to ``__main__.py`` or ``predict.py``)."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script if script == "brainage-predict" else "python -m brainage.predict"


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="Brain age for new subjects: export a trained grid cell as a model "
                    "bundle, or apply a bundle to a BIDS-like dataset.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="export the grid cell of config key predict.model to "
                       "results/models/<predict.model.name>/ (after `snakemake` evaluated it)")
    export.add_argument("--configfile", nargs="+", default=["config/config.yaml"],
                        help="config file(s), later ones override earlier ones")
    run = commands.add_parser(
        "run", help="preprocess a BIDS-like dataset as the bundle's training data were, "
                    "and predict brain age")
    run.add_argument("--bundle", required=True,
                     help="model bundle folder (results/models/<name>)")
    run.add_argument("--dataset", required=True,
                     help="BIDS-like root: participants.tsv, sub-*/mre/sub-*_stiffness.nii.gz")
    run.add_argument("--output", required=True, help="output folder (predictions.tsv, "
                                                     "summary.tsv, gap_by_group.png, preproc/)")
    run.add_argument("--cohort", default=None, help="cohort name (default: the output "
                                                    "folder's name)")
    run.add_argument("--group-column", default=None,
                     help="participants.tsv column to summarise by (default group, else "
                          "study, else one group of every subject)")
    run.add_argument("--bias-reference-group", default=None,
                     help="refit the age-bias correction on this group of the cohort (e.g. "
                          "healthy) instead of the bundle's")
    run.add_argument("--template-t1", default=None,
                     help="template T1 (2 mm) when the bundle's template is not nilearn's")
    run.add_argument("--template-mask", default=None, help="its brain mask")
    run.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    run.add_argument("--jobs", type=_positive_int, default=1,
                     help="subjects preprocessed at a time, each in a process of its own "
                          "(default 1; with the bundle's deterministic preprocessing the "
                          "results do not depend on it)")
    run.add_argument("--threads", type=_positive_int, default=None,
                     help="threads per preprocessing step when the bundle's preprocessing "
                          "is not deterministic (default: its preprocess.threads)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m brainage.predict {export,run} ...``"""
    from brainage.config import load_config
    from brainage.io import use_a_writable_matplotlib_cache
    from brainage.logs import log_to_file

    arguments = _parse_arguments(argv)
    log_to_file(None)
    use_a_writable_matplotlib_cache()
    try:
        if arguments.command == "export":
            for path in arguments.configfile:
                if not Path(path).is_file():
                    raise ConfigError(
                        f"--configfile {path} does not exist. Pass the config file(s) of the "
                        f"finished run (default config/config.yaml: run from the repository "
                        f"root).")
            try:
                manifest = export_from_config(load_config(*arguments.configfile))
            except FileNotFoundError as error:  # an output of the run: not finished yet
                raise ExportError(
                    f"{error}\nexport reads the outputs of a finished run: run snakemake "
                    f"to the end first, with the same config file(s).") from None
            log.info("exported model bundle %s", manifest["name"])
            return 0
        output = Path(arguments.output)
        run_cohort(arguments.bundle, arguments.dataset, output,
                   cohort=arguments.cohort, group_column=arguments.group_column,
                   bias_reference_group=arguments.bias_reference_group,
                   template_t1=arguments.template_t1, template_mask=arguments.template_mask,
                   device=arguments.device, threads=arguments.threads, jobs=arguments.jobs)
    except USER_ERRORS as error:
        print(f"{_program_name()} {arguments.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: finished steps are kept (atomic writes, records)
        print(f"{_program_name()} {arguments.command}: interrupted. Run the same command "
              f"again to continue: finished subjects and steps are kept.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # Run the package module's main, not this __main__ copy, so loggers are named
    # brainage.predict (log files and level settings address the package).
    from brainage.predict import main as package_main

    raise SystemExit(package_main())
