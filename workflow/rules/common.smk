# Shared by every .smk file: validated config, the path helper, the cohorts and their
# subjects, the splits and the grid. All targets are chosen in all_targets(), nothing else.

import copy
import datetime
import json
import os
import re
import shlex
import sys
import uuid
from functools import lru_cache
from pathlib import Path

from snakemake.logging import logger as snakemake_logger
from snakemake.settings.types import DeploymentMethod

# The package is pip-installed (editable) by the README's commands; this keeps a plain
# checkout working too, e.g. on a cluster node that only has the conda envs.
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from brainage import brainage_version
from brainage.bundle import MANIFEST_FILE, PAYLOAD_FILES, README_FILE
from brainage.config import pretrain_settings, pretrained_run, training_settings
from brainage.config import exported_cell as exported_cell_of
from brainage.config import preprocessing_record, resource_for_attempt
from brainage.modalities import grid_modality, input_path, modalities_to_predict, mre_maps
from brainage.modalities import tag as modality_tag
from brainage.preprocess.chain import (
    job_memory_mb,
    job_options,
    registered_maps,
    step_threads,
    subject_files,
)
from brainage.preprocess.skullstrip import strip_skull_memory_mb
from brainage.qc import METRICS as QC_METRICS
from brainage.qc import qc_failures, read_qc_records, thresholds
from brainage.report.targets import (
    EMBEDDINGS_FIGURE,
    MODALITIES_FIGURE,
    PRETRAINING_NAME,
    ablation_experiments,
    ablation_figure_name,
    experiment_settings,
    focus_cell,
    is_umap_figure,
    pretraining_embeddings_figure,
    report_names,
    trained_cells,
)
from brainage.config import (
    BEFORE_QC_EXCLUSIONS,
    FEATURELESS_READOUTS,
    ConfigError,
    cell_settings,
    check_simulated_folders,
    check_batch_sizes,
    check_pretrain_batch_size,
    check_search_batch_size,
    encoder_owners,
    grid_cells,
    search_settings,
    simulated_beside_real_data,
    template_space_warnings,
    trains_an_encoder,
    uses_search_result,
    validate_config,
    variant_key,
    voxel_readout_memory_mb,
)
from brainage.interrupted import interrupted_run_notice
from brainage.io import file_system_clock_ns, prepare_job_environment
from brainage.logs import RUN_ID_VARIABLE, say_job_warnings
from brainage.inputs import (
    InputError,
    check_bias_reference_group,
    check_cohort_table,
    check_dataset_images,
    checked_map_digests,
    participant_match_key,
    lab_dataset_of,
    preprocessed_from,
    read_participants,
    simulation_mismatches,
    simulation_missing_under_results,
    subject_inputs,
    subjects_without_t1w,
    unlisted_subject_folders,
)
from brainage.normalise import check_pretraining_cohort, split_name_pattern, subjects_in
from brainage.normalise import split_names as scheme_split_names
from brainage.openbhb import release_participants
from brainage.normalise import training_counts, training_study_sizes
from brainage.paths import TRAINING_PREPROC, Layout
from brainage.simulate import MRE_MAPS as SIMULATED_MAPS
from brainage.simulate import simulated_participants, simulation_options
from brainage.simulate.t1w_cohort import draw_t1w_participants
from brainage.split_data import check_batch_shares, subjects_left_for_training


def _say(message):
    """A line to the user, on stderr beside Snakemake's own messages."""
    print(message, file=sys.stderr, flush=True)


# A killed run leaves locks and incomplete markers that stop the next one twice, with two
# different errors; say once what to run. Snakemake parses this file before it locks the
# directory, so a lock seen here is another process's. Jobs that Snakemake starts as
# processes of their own (cluster jobs) parse it too, while the main process holds its
# lock: only the main process speaks, and not to the --unlock the notice asks for.
SPEAKS = workflow.is_main_process and "--unlock" not in sys.argv
if SPEAKS:
    _notice = interrupted_run_notice()
    if _notice:
        _say(_notice)

#: The template section as the config files write it (validation fills in defaults).
_TEMPLATE_WRITTEN = dict(config.get("template") or {})
try:
    _validated = validate_config(config, source="config")
except ConfigError as error:
    raise WorkflowError(f"invalid configuration:\n{error}") from None
config.clear()
config.update(_validated)

LAYOUT = Layout.from_config(config)
#: When this run started: the warnings of the job attempts started after it are shown at
#: its end (the Snakefile's onsuccess and onerror).
RUN_STARTED = datetime.datetime.now().astimezone()
#: The same moment by the clock that stamps the logs (a network file system's server may
#: differ from this host by minutes): only the logs written since it are read. None in a
#: job's process, which does not look.
RUN_STARTED_ON_DISK = file_system_clock_ns(LAYOUT.logs) if workflow.is_main_process else None
#: This run's name in the header of each of its jobs' attempts (brainage.logs), which the
#: jobs inherit through the environment (on SLURM too: sbatch --export=ALL): the warnings
#: of this run are told from earlier runs' by it, not by clocks, which differ between
#: machines. None in a job's process.
RUN_ID = uuid.uuid4().hex[:16] if workflow.is_main_process else None
if RUN_ID is not None:
    os.environ[RUN_ID_VARIABLE] = RUN_ID
DATASET_ROOT = config["dataset"]["root"]
SIMULATED = config["dataset"]["simulate"]["enabled"]
PREDICT = config["predict"]
PREDICT_COHORTS = PREDICT["cohorts"]
SIMULATED_PREDICT_COHORT = PREDICT["simulate"]["cohort"] if PREDICT["simulate"]["enabled"] else None
#: simulate_cohort() options of the simulated training and predict cohorts.
DATASET_SIMULATION = simulation_options(config["dataset"]["simulate"])
PREDICT_SIMULATION = simulation_options(PREDICT["simulate"])
_unknown_cohorts = [name for name in PREDICT["unrelated_cohorts"] if name not in PREDICT_COHORTS]
if _unknown_cohorts:
    raise WorkflowError(
        f"config key predict.unrelated_cohorts names {', '.join(_unknown_cohorts)}, which "
        f"predict.cohorts does not have (it has {', '.join(PREDICT_COHORTS) or 'none'}): "
        f"correct the name."
    )
if SIMULATED_PREDICT_COHORT is not None and SIMULATED_PREDICT_COHORT not in PREDICT_COHORTS:
    raise WorkflowError(
        f"config key predict.simulate.cohort is {SIMULATED_PREDICT_COHORT!r} but "
        f"predict.cohorts has no such cohort; add `{SIMULATED_PREDICT_COHORT}: <an empty "
        f"folder>` under predict.cohorts (the simulation writes the dataset there)."
    )
_shared_folders = check_simulated_folders(config, source="config")
if _shared_folders:
    raise WorkflowError("invalid configuration:\n" + "\n".join(_shared_folders))
_simulation_problems, _simulation_warnings = simulation_mismatches(
    [
        ("dataset.root", DATASET_ROOT, SIMULATED),
        *(
            (f"predict.cohorts.{name}", root, name == SIMULATED_PREDICT_COHORT)
            for name, root in PREDICT_COHORTS.items()
        ),
    ]
)
if _simulation_problems:
    raise WorkflowError("invalid configuration:\n" + "\n".join(_simulation_problems))
# The README's most repeated caveat, forgotten once: without --configfile the demo's config
# simulated its cohort into a lab's working directory and replaced the lab's QC table,
# tables and bundle under their own names. The results' description names the lab's data:
# a folder that is there and is no simulation (a copied or moved demo project names the
# old folder's simulated cohort; a lab's data archived since are not seen).
if (
    SPEAKS
    and SIMULATED
    and not workflow.overwrite_configfiles
    and (_LAB_SOURCE := lab_dataset_of(LAYOUT.preproc_description(), DATASET_ROOT))
):
    raise WorkflowError(
        f"no --configfile was given, so this run is the built-in demo's config/config.yaml, "
        f"but {LAYOUT.preproc_description()} describes results preprocessed from "
        f"{_LAB_SOURCE}, a dataset of your own. Add --configfile <your file> (every command "
        f"of your project takes it); run the demo in a working directory of its own."
    )
if SIMULATED:
    _simulation_warnings += filter(
        None,
        [simulation_missing_under_results(DATASET_ROOT, LAYOUT.preproc_description())],
    )
if SPEAKS:
    for _warning in [
        *_simulation_warnings,
        *simulated_beside_real_data(config),
        *template_space_warnings(config["template"], _TEMPLATE_WRITTEN),
    ]:
        _say(_warning)

#: Every cohort's preprocessing folder (relative to results) -> its BIDS-like root: the
#: training cohort and each cohort a model is applied to go through one chain of rules.
PRETRAIN = config["pretrain"]
#: Pretraining runs whose T1w cohort goes through the per-subject chain (bids, simulate);
#: an OpenBHB release comes preprocessed (quasi-raw) and is only resampled.
PRETRAIN_CHAIN = [name for name, run in PRETRAIN.items() if run["source"]["kind"] != "openbhb"]
PRETRAIN_SIMULATED = [name for name, run in PRETRAIN.items() if run["source"]["kind"] == "simulate"]
PRETRAIN_OPENBHB = [name for name in PRETRAIN if name not in PRETRAIN_CHAIN]


def names_pattern(names):
    """A wildcard pattern matching exactly ``names`` (nothing when empty)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def pretrain_root(name):
    """The BIDS-like folder of a pretraining run's T1w cohort (simulated ones under results)."""
    if name in PRETRAIN_SIMULATED:
        return LAYOUT.pretrain_source(name)
    return PRETRAIN[name]["source"]["root"]


PREPROC_ROOTS = {
    TRAINING_PREPROC: DATASET_ROOT,
    **{LAYOUT.cohort_preproc(cohort): root for cohort, root in PREDICT_COHORTS.items()},
    **{LAYOUT.pretrain_preproc(name): pretrain_root(name) for name in PRETRAIN_CHAIN},
}
#: The config key that names each of PREPROC_ROOTS, for messages.
PREPROC_ROOT_KEYS = {
    TRAINING_PREPROC: "dataset.root",
    **{LAYOUT.cohort_preproc(cohort): f"predict.cohorts.{cohort}" for cohort in PREDICT_COHORTS},
    **{LAYOUT.pretrain_preproc(name): f"pretrain.{name}.source.root" for name in PRETRAIN_CHAIN},
}
MODALITIES = tuple(config["dataset"]["modalities"])


@lru_cache(maxsize=None)  # an input function of every predict cohort's jobs calls it
def exported_modalities():
    """The maps the exported model reads (its cell's model.modalities)."""
    try:
        return tuple(cell_settings(config, *exported_cell_of(config))["model"]["modalities"])
    except ConfigError as error:
        raise WorkflowError(str(error)) from None


def exported_modalities_key():
    """The config key that sets the exported model's maps, for messages: its variant's
    model.modalities, the top-level one, or dataset.modalities when that is unset."""
    experiment, variant, _ = exported_cell_of(config)
    key = variant_key(config, experiment, variant, "model.modalities")
    retrains = "that retrains the exported cell"
    if key == "model.modalities" and not config["model"].get("modalities"):
        return f"dataset.modalities (an unset model.modalities takes them all; {retrains})"
    return f"{key} ({retrains})"


#: Every preprocessing folder -> the modalities its subjects provide and the chain makes: a
#: predict cohort's are the exported model's maps, led by the training cohort's grid map.
PREPROC_MODALITIES = {
    TRAINING_PREPROC: MODALITIES,
    **{
        LAYOUT.cohort_preproc(cohort): modalities_to_predict(
            exported_modalities(), grid_modality(MODALITIES)
        )
        for cohort in PREDICT_COHORTS
    },
    **{LAYOUT.pretrain_preproc(name): ("T1w",) for name in PRETRAIN_CHAIN},
}


def check_simulated_maps(section, needed, why, leave_out):
    """Stop when a simulation (config section ``section``) would not write a map the
    pipeline reads from it; ``leave_out``: where the maps it cannot write come from."""
    written = config_value(section)["maps"]
    missing = [name for name in mre_maps(needed) if name not in written]
    # the simulator writes only SIMULATED_MAPS: adding another to `maps` is refused too
    beyond = [name for name in missing if name not in SIMULATED_MAPS]
    if beyond:
        raise WorkflowError(
            f"{why} needs {', '.join(beyond)}, which the simulation ({section}) cannot "
            f"write: it writes {' and '.join(SIMULATED_MAPS)} only. Leave "
            f"{', '.join(beyond)} out of {leave_out}, or give your own data "
            f"({section}.enabled: false)."
        )
    if missing:
        raise WorkflowError(
            f"config key {section}.maps ({', '.join(written)}) lacks {', '.join(missing)}, "
            f"which {why} needs; add it to {section}.maps."
        )


def config_value(dotted):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


if SIMULATED:
    check_simulated_maps(
        "dataset.simulate",
        MODALITIES,
        "config key dataset.modalities",
        "dataset.modalities (and model.modalities)",
    )
if SIMULATED_PREDICT_COHORT is not None:
    check_simulated_maps(
        "predict.simulate",
        PREPROC_MODALITIES[LAYOUT.cohort_preproc(SIMULATED_PREDICT_COHORT)],
        "the exported model (config key predict.model)",
        exported_modalities_key(),
    )

#: The name of each correct_and_register variant -> its set of modalities (preprocess.smk);
#: the training cohort's set keeps the plain name.
CHAIN_VARIANTS = {
    (
        "correct_and_register"
        if modalities == MODALITIES
        else f"correct_and_register_{modality_tag(modalities)}"
    ): modalities
    for modalities in dict.fromkeys([MODALITIES, *PREPROC_MODALITIES.values()])
}


# Names the config defines, not any name of their characters: a file of a split, cell,
# cohort or pretraining run the config lacks (a target typed by hand, a run removed) has
# no rule, instead of a job planned with a KeyError or one that fails when it runs. A seed
# is written as grid_cells writes it (seed-7, never seed-07).
wildcard_constraints:
    subject="[A-Za-z0-9]+",
    seed="0|[1-9][0-9]*",
    split=split_name_pattern(**config["split"]),
    experiment=names_pattern(config["experiments"]),
    variant=names_pattern(
        dict.fromkeys(
            variant
            for experiment in config["experiments"].values()
            for variant in experiment["variants"]
        )
    ),
    preproc=names_pattern(PREPROC_ROOTS),
    cohort=names_pattern(PREDICT_COHORTS),
    pretrain=names_pattern(PRETRAIN),


_IMAGES_CHECKED = set()
#: Where checked_participants keeps what it found of each input image (size, mtime,
#: grid, an MRE map's SHA-256): brainage.inputs.check_dataset_images.
IMAGE_CHECK_CACHE = Path(".snakemake", "brainage_checked_inputs.json")


def checked_participants(root, modalities, root_key, needed_by=None, to_predict=False):
    """A cohort's validated participants table. The first call per cohort also opens every
    subject's images (cached by size and mtime in .snakemake/), so a corrupt file stops
    the run before any job starts. ``root_key``: the config key that names ``root``;
    ``needed_by``: what reads ``modalities`` when dataset.modalities does not set them
    (brainage.inputs.read_participants); ``to_predict``: a cohort to predict, which may
    lack ages, sexes and studies. Raises brainage.inputs.InputError."""
    table = read_participants(
        root,
        modalities,
        root_setting=f"config key {root_key}",
        needed_by=needed_by,
        to_predict=to_predict,
    )
    key = (str(root), tuple(modalities))
    if key not in _IMAGES_CHECKED:
        labels = [pid[len("sub-") :] for pid in table["participant_id"]]
        try:
            check_dataset_images(
                root,
                labels,
                modalities,
                cache_file=IMAGE_CHECK_CACHE,
                announce=_say if workflow.is_main_process else None,
                # inputs dated after the clock that stamps the outputs fail their jobs; the
                # time of this check, not of the run's start: the demo's cohort is
                # simulated during the run
                clock_ns=(
                    file_system_clock_ns(LAYOUT.results) if workflow.is_main_process else None
                ),
            )
        except KeyboardInterrupt:  # one line, not the planner's 60 of traceback
            raise WorkflowError(
                f"stopped by Ctrl-C while checking the images of {root}: those checked so "
                f"far are remembered in {IMAGE_CHECK_CACHE}, and the next run checks the rest."
            ) from None
        _IMAGES_CHECKED.add(key)
        if SPEAKS and "T1w" not in modalities:  # a T1w channel is required of everyone
            without = subjects_without_t1w(root, labels, where=f"config key {root_key}")
            if without:
                _say(f"Warning: {without}")
    return table


def participants():
    """The training cohort's validated participants table (checked_participants); after
    the simulation when the demo simulates."""
    if SIMULATED:
        checkpoints.simulate_cohort.get()
    try:
        return checked_participants(DATASET_ROOT, MODALITIES, "dataset.root")
    except InputError as error:
        raise WorkflowError(input_error_message(error, SIMULATED)) from None


def input_error_message(error, simulated):
    """An input error's message; for the simulated training cohort with the remedy that
    lasts: its remedies (add the file, remove the row) are undone by the next simulation,
    which rewrites the folder."""
    if not simulated:
        return str(error)
    return (
        f"{error}\nBut {DATASET_ROOT} is the simulated cohort (dataset.simulate.enabled), "
        f"which the next simulation rewrites: instead of editing it, simulate it again with "
        f"--forcerun simulate_cohort added to the command."
    )


def subjects():
    """Labels (without 'sub-') of the training cohort, in participants.tsv order."""
    return [pid[len("sub-") :] for pid in participants()["participant_id"]]


def simulated_predict_labels():
    """Labels of the simulated predict cohort, known before it is simulated: the simulator
    draws its participants table from the options alone, so this cohort needs no
    checkpoint."""
    table = simulated_participants(**PREDICT_SIMULATION)
    return [pid[len("sub-") :] for pid in table["participant_id"]]


def cohort_subjects(cohort):
    """Labels of a predict cohort, from its participants.tsv (or its simulation options).
    The table is checked as predict_cohort will check it (its group column, the age-bias
    reference group), so a typo stops the run before the cohort's preprocessing."""
    try:
        if cohort == SIMULATED_PREDICT_COHORT:
            table = simulated_participants(**PREDICT_SIMULATION)
        else:
            table = checked_participants(
                PREDICT_COHORTS[cohort],
                PREPROC_MODALITIES[LAYOUT.cohort_preproc(cohort)],
                f"predict.cohorts.{cohort}",
                # the model's inputs: a subject's to add, not a modality to remove
                needed_by="the model to apply (config key predict.model)",
                to_predict=True,
            )
        group_column = check_cohort_table(
            table,
            Path(PREDICT_COHORTS[cohort], "participants.tsv"),
            cohort=cohort,
            bias_reference_group=PREDICT["bias_reference_group"],
        )
    except InputError as error:
        raise WorkflowError(
            f"predict cohort {cohort} (config key predict.cohorts.{cohort}): {error}"
        ) from None
    seen = seen_by_model(cohort, tuple(table["participant_id"]))
    warn_about_seen_subjects(cohort, seen)
    warn_about_reference_group_seen(cohort, table, group_column, seen)
    warn_about_narrow_gap_intervals()
    return [pid[len("sub-") :] for pid in table["participant_id"]]


_INTERVALS_CHECKED = []


def warn_about_narrow_gap_intervals():
    """Name, once per run in the main process, finished summaries whose group intervals
    take the bundle's age-bias line as exact: a bundle exported from an evaluation made
    before the line's reference statistics were saved (brainage.agebias.AgeBias). Nothing
    reruns by itself after the upgrade (the package's code is no rule's code)."""
    if _INTERVALS_CHECKED or not workflow.is_main_process:
        return
    if PREDICT["bias_reference_group"] is not None:  # refitted on the cohort, statistics too
        _INTERVALS_CHECKED.append(True)
        return
    summaries = [
        LAYOUT.prediction(cohort, "summary.tsv")
        for cohort in PREDICT_COHORTS
        if Path(LAYOUT.prediction(cohort, "summary.tsv")).is_file()
    ]
    try:
        record = json.loads(Path(BUNDLE_FILES[0]).read_text())["bias_correction"]
    except (OSError, ValueError, LookupError, TypeError):
        return  # no finished bundle (or a damaged one, which predict_cohort names)
    # the record's key, not AgeBias.has_reference_statistics: brainage.agebias imports the
    # read-outs (scikit-learn), which no planning needs
    if not summaries or not isinstance(record, dict) or "residual_variance" in record:
        _INTERVALS_CHECKED.append(True)
        return
    # raises IncompleteCheckpointException until the split is known: Snakemake calls again
    metrics = cell_output(*exported_cell(), "metrics.json")
    _INTERVALS_CHECKED.append(True)
    if metrics in workflow.dag_settings.forcerun:  # the run that refreshes them
        return
    _say(
        f"Warning: the group intervals of {', '.join(summaries)} take the age-bias line "
        f"as exact (too narrow): the model bundle was exported from an evaluation made "
        f"before the line's reference statistics were saved. For the full intervals: "
        f"snakemake predict --forcerun {metrics} (reruns that cell's evaluation, the export "
        f"and the predictions)."
    )


_PREDICT_COHORTS_WARNED = set()


def seen_in_training(cohort):
    """seen_by_model of predict cohort `cohort`'s subjects (read from its table)."""
    return seen_by_model(cohort, tuple(f"sub-{label}" for label in cohort_subjects(cohort)))


@lru_cache(maxsize=None)  # asked for by every input function of the cohort's jobs
def seen_by_model(cohort, ids):
    """{participant_id: what saw it} for the subjects of predict cohort `cohort` (`ids`:
    its participant_ids, a tuple) that the exported model has seen: a training
    subject of its split, a test subject under predict.bias_fit test (the age-bias line),
    a subject of the lab's T1w cohort its encoder was pretrained on. Found by the
    participant_id, case and leading zeros ignored (brainage.inputs.participant_match_key):
    a lab numbers its people the same in all (other sessions predicted as a cohort of their
    own); and by an MRE map byte-identical to one of the training cohort's (the same scan
    exported again under a clinic's id), from the digests the image checks recorded. A
    subject the model has seen gets an optimistic prediction: predict_cohort marks them and
    leaves them out of the summary. Empty for the simulated cohort and beside a simulated
    training cohort; a cohort of predict.unrelated_cohorts is matched by its maps only."""
    if cohort == SIMULATED_PREDICT_COHORT or SIMULATED:
        return {}
    by_id = cohort not in PREDICT["unrelated_cohorts"]
    split, *cell = exported_cell()
    # (what saw them, their participant_ids, whether their MRE maps are the training cohort's)
    sources = [
        (
            f"train (split {split} of dataset.root)",
            subjects_in(participants(), config["split"], "train", splits=[split]),
            True,
        )
    ]
    if PREDICT["bias_fit"] == "test":
        sources.append(
            (
                f"age-bias line (split {split} test, predict.bias_fit test)",
                subjects_in(participants(), config["split"], "test", splits=[split]),
                True,
            )
        )
    run = pretrained_run(_resolved_cell(cell[0], cell[1], int(cell[2]))["model"])
    if run is not None and PRETRAIN[run]["source"]["kind"] == "bids":
        sources.append(
            (
                f"pretraining (pretrain.{run}.source.root)",
                pretrain_participants_table(run)["participant_id"],
                False,  # T1w scans: no MRE map to compare
            )
        )
    cohort_maps = checked_map_digests(
        PREDICT_COHORTS[cohort],
        [pid[len("sub-") :] for pid in ids],
        PREPROC_MODALITIES[LAYOUT.cohort_preproc(cohort)],
        IMAGE_CHECK_CACHE,
    )
    training_maps = checked_map_digests(DATASET_ROOT, subjects(), MODALITIES, IMAGE_CHECK_CACHE)
    seen = {}
    for what, known_ids, with_maps in sources:
        if by_id:
            known = {participant_match_key(pid): pid for pid in known_ids}
            for pid in sorted(ids):
                match = known.get(participant_match_key(pid))
                if match is not None and pid not in seen:
                    seen[pid] = what if match == pid else f"{what}, as {match}"
        if with_maps:
            known_ids = set(known_ids)
            for digest, pid in sorted(cohort_maps.items(), key=lambda item: item[1]):
                match = training_maps.get(digest)
                if match in known_ids and pid not in seen:
                    seen[pid] = f"{what}: a map byte-identical to {match}'s"
    return seen


_REFERENCE_GROUPS_WARNED = set()


def warn_about_reference_group_seen(cohort, table, group_column, seen):
    """Say once per cohort, in the main process, when the seen subjects leave its
    predict.bias_reference_group too few for the refit: that cohort's job will stop before
    embedding a subject. A warning, not a refusal: the key is one for every cohort, and a
    lab's own follow-up sessions beside an external cohort would lose the external one's
    predictions too."""
    group = PREDICT["bias_reference_group"]
    if not seen or group is None or cohort in _REFERENCE_GROUPS_WARNED:
        return
    if not workflow.is_main_process:
        return
    _REFERENCE_GROUPS_WARNED.add(cohort)
    try:
        check_bias_reference_group(table, group_column, group, cohort=cohort, seen=seen)
    except InputError as error:
        _say(
            f"Warning: predict {error} Its predict_cohort job will stop before embedding a "
            f"subject: run with --keep-going for the other cohorts' predictions, or ask for "
            f"them by name."
        )


def warn_about_seen_subjects(cohort, seen):
    """Say once per cohort, in the main process, which of its subjects the model has seen
    (seen_in_training) and what the prediction does with them."""
    if not seen or cohort in _PREDICT_COHORTS_WARNED or not workflow.is_main_process:
        return
    _PREDICT_COHORTS_WARNED.add(cohort)
    named = [f"{pid} ({what})" for pid, what in seen.items()]
    more = f" and {len(named) - 10} more" if len(named) > 10 else ""
    by_map = sum("byte-identical" in what for what in seen.values())
    if not by_map:
        found = "with the participant_id of a subject the model has seen"
        optimistic = "If they are the same people, their predictions are optimistic"
    elif by_map == len(seen):
        found = "with an MRE map byte-identical to one the model has seen (the same scan)"
        optimistic = "Their predictions are optimistic"
    else:
        found = "the model has seen, by participant_id or by a byte-identical MRE map"
        optimistic = (
            "Their predictions are optimistic (those matched by participant_id if they "
            "are the same people)"
        )
    _say(
        f"Warning: predict cohort {cohort} (config key predict.cohorts.{cohort}) has "
        f"{len(seen)} subject(s) {found}: {', '.join(named[:10])}{more}. {optimistic}: "
        f"each is marked in column seen_in_training of "
        f"{LAYOUT.prediction(cohort, 'predictions.tsv')} and left out of its summary.tsv, "
        f"figure and any age-bias refit."
        + (
            f" If the ids only coincide (other people), add {cohort} to config key "
            f"predict.unrelated_cohorts."
            if by_map < len(seen)
            else ""
        )
    )


def raw_inputs(wildcards):
    """Input files of one subject of a cohort: {map: path} for the cohort's MRE maps and
    'anat': path (the T1w, when present or among its modalities).

    Derived from the dataset folder, never from participants.tsv, so editing the table
    (adding a study) does not rerun the subjects already preprocessed.
    """
    root = PREPROC_ROOTS[wildcards.preproc]
    modalities = PREPROC_MODALITIES[wildcards.preproc]
    if wildcards.preproc == TRAINING_PREPROC and SIMULATED:
        checkpoints.simulate_cohort.get()
    elif wildcards.preproc in SIMULATED_PREPROCS:
        # files still to be simulated by simulate_predict_cohort or simulate_pretrain_cohort
        return simulated_inputs(root, wildcards.subject, modalities)
    try:
        return subject_inputs(
            root,
            wildcards.subject,
            modalities,
            root_setting=f"config key {PREPROC_ROOT_KEYS[wildcards.preproc]}",
        )
    except InputError as error:
        simulated = wildcards.preproc == TRAINING_PREPROC and SIMULATED
        raise WorkflowError(input_error_message(error, simulated)) from None


#: Preproc folders of cohorts that a plain rule simulates (their files are declared).
SIMULATED_PREPROCS = [
    *([LAYOUT.cohort_preproc(SIMULATED_PREDICT_COHORT)] if SIMULATED_PREDICT_COHORT else []),
    *[LAYOUT.pretrain_preproc(name) for name in PRETRAIN_SIMULATED],
]


def simulated_inputs(root, label, modalities):
    """The files the simulation will write for a subject: its MRE maps and the T1w."""
    inputs = {name: str(input_path(root, label, name)) for name in mre_maps(modalities)}
    return {**inputs, "anat": str(input_path(root, label, "T1w"))}


def preproc_modalities(wildcards):
    return PREPROC_MODALITIES[wildcards.preproc]


def preproc_pattern(modalities):
    """The wildcard pattern of the preproc folders whose cohorts have ``modalities``."""
    return names_pattern(
        folder for folder, chosen in PREPROC_MODALITIES.items() if chosen == modalities
    )


def chain_outputs(modalities):
    """The files a correct_and_register job writes for a cohort with ``modalities``."""
    files = subject_files(LAYOUT, "{subject}", "{preproc}", modalities)
    return {key: path for key, path in files.items() if key not in STRIP_SKULL_OUTPUTS}


def split_names():
    return scheme_split_names(participants(), **config["split"])


def planned_participants():
    """The training cohort's participants, known before any job runs: drawn from the
    options of dataset.simulate when the demo simulates it (as the simulation does),
    else read from dataset.root."""
    if SIMULATED:
        return simulated_participants(**DATASET_SIMULATION)
    return participants()


_BATCH_SIZES_CHECKED = []


def check_training_set_sizes():
    """Stop while the job graph is built, before any job, when a grid cell's
    train.batch_size exceeds a split's training subjects, or the random search's exceeds
    what its validation hold-out leaves (else train_encoder or search_hyperparameters
    fails, on a GPU node, after the preprocessing). Once per run, in the main process."""
    if _BATCH_SIZES_CHECKED or not workflow.is_main_process:
        return
    try:
        study_sizes = training_study_sizes(planned_participants(), config["split"])
    except ConfigError as error:  # the split settings (e.g. loso of one study)
        raise WorkflowError(f"invalid configuration:\n{error}") from None
    except InputError as error:  # the cohort's table, not a setting
        raise WorkflowError(f"the training cohort (config key dataset.root):\n{error}") from None
    try:
        check_batch_sizes_of_splits(study_sizes, counted=BEFORE_QC_EXCLUSIONS)
    except ConfigError as error:  # checked before any job: a pilot's first command
        # (--until tabulate_qc) too
        raise WorkflowError(
            f"invalid configuration:\n{error} For a first run on a CPU, take "
            f"config/config.yaml's normalise, train, model and loss keys (README, 'Your own "
            f"data'): the batch is checked before any job, preprocessing too."
        ) from None
    _BATCH_SIZES_CHECKED.append(True)
    if config["qc"]["exclude_failed"]:
        warn_about_training_sets_after_qc_exclusions()


def check_batch_sizes_of_splits(study_sizes, counted):
    """The random search's batch check, then the grid's, on the training subjects per
    study of every split (``counted``: how they were counted, as the messages say it)."""
    # the search's first: its trials keep fewer subjects than the grid's splits, so its
    # limit on train.batch_size is the one to lower to (not the grid's, then its)
    fraction = config["search"]["validation_fraction"]
    check_search_batch_size(
        config,
        {
            split: subjects_left_for_training(sizes, fraction)
            for split, sizes in study_sizes.items()
        },
        source="config",
        counted=counted,
    )
    check_batch_sizes(
        config,
        {split: sum(sizes.values()) for split, sizes in study_sizes.items()},
        source="config",
        counted=counted,
    )


def warn_about_training_sets_after_qc_exclusions():
    """With qc.exclude_failed, say while the job graph is built when the subjects whose QC
    files (of an earlier run) fail would leave a split fewer training subjects than a grid
    cell's batch, or the random search's trials fewer than theirs: those jobs would fail
    after the normalisation. A warning, not a refusal: this run may preprocess those
    subjects again (a fixed T1w), and a refusal would stop it, --until tabulate_qc too."""
    files = {label: subject_files(LAYOUT, label)["qc_json"] for label in subjects()}
    if not all(Path(path).is_file() for path in files.values()):
        return  # the first run: QC comes later
    try:
        records = read_qc_records(list(files.values()), require=QC_METRICS)
    except InputError:
        return  # a file this run remakes
    minimums = thresholds(config["qc"])
    failing = sorted(pid for pid, record in records.items() if qc_failures(record, minimums))
    if not failing:
        return
    sizes = training_study_sizes(planned_participants(), config["split"], left_out=failing)
    try:
        check_batch_sizes_of_splits(
            sizes,
            counted=f"after qc.exclude_failed leaves out the {len(failing)} subject(s) "
            f"whose QC files fail: {', '.join(failing[:10])}"
            + (", ..." if len(failing) > 10 else ""),
        )
    except ConfigError as error:
        _say(
            f"Warning: {error} Else the jobs that train with this batch fail after the "
            f"normalisation; or fix those subjects' preprocessing, or set "
            f"qc.exclude_failed: false."
        )


_VOXEL_MEMORY_CHECKED = []


def check_voxel_readout_memory():
    """Say, once per run while the job graph is built, when the cells whose read-out fits
    on the voxels (PCA + Ridge without an encoder) need more memory than config key
    resources.evaluate.mem_mb gives each evaluate_encoder job: on a cluster such a job is
    stopped for memory after the whole grid has trained."""
    if _VOXEL_MEMORY_CHECKED or not workflow.is_main_process:
        return
    _VOXEL_MEMORY_CHECKED.append(True)
    n_subjects = len(planned_participants())
    needed = {}
    for experiment, variant, seed in grid_cells(config):
        settings = _resolved_cell(experiment, variant, seed)
        if (
            settings["model"]["encoder"] == "none"
            and settings["readout"]["method"] not in FEATURELESS_READOUTS
        ):
            channels = len(settings["model"]["modalities"] or config["dataset"]["modalities"])
            needed[f"{experiment}/{variant}"] = voxel_readout_memory_mb(
                n_subjects, channels, config["normalise"]["resolution_mm"]
            )
    given = config["resources"]["evaluate"]["mem_mb"]
    short = {cell: mb for cell, mb in needed.items() if mb > given}
    if short:
        _say(
            f"Warning: the evaluate_encoder jobs of {', '.join(short)} fit their read-out on "
            f"the voxels of {n_subjects} subjects and need about "
            f"{max(short.values()):,} MB each; config key resources.evaluate.mem_mb gives "
            f"{given:,}. Raise it, or a cluster stops these jobs for memory after the grid "
            f"has trained."
        )


_PRETRAIN_BATCH_SIZES_CHECKED = []


def check_pretraining_set_sizes():
    """Stop while the job graph is built when a pretraining run's train.batch_size exceeds
    its cohort's training subjects (else pretrain_encoder fails after the cohort's
    preprocessing). Runs whose cohort the workflow preprocesses, whose subjects are known
    before any job (pretrain_participants_table); once per run, in the main process."""
    if _PRETRAIN_BATCH_SIZES_CHECKED or not workflow.is_main_process:
        return
    for name in PRETRAIN_CHAIN:
        try:
            counts = training_counts(
                pretrain_participants_table(name),
                pretrain_split(name),
                fraction_key=f"pretrain.{name}.validation_fraction",
                eval_subset="validation",
            )
            check_pretrain_batch_size(config, name, counts["holdout"], source="config")
            # each of the run's training processes (one per GPU and node) needs a share
            # of every batch: else pretrain_encoder fails after the cohort's preprocessing
            run = pretrain_settings(config, name)
            if run["train"]["epochs"] > 0:
                resources = PRETRAIN[name]["resources"]
                check_batch_shares(
                    counts["holdout"],
                    int(run["train"]["batch_size"]),
                    max(int(resources["gpus"]), 1) * int(resources["nodes"]),
                    key=f"pretrain.{name}.train.batch_size",
                )
        except (ConfigError, InputError) as error:
            raise WorkflowError(f"invalid configuration:\n{error}") from None
    _PRETRAIN_BATCH_SIZES_CHECKED.append(True)


def cell_params(wildcards):
    """A grid cell's settings (brainage.config.cell_settings), each caller its own copy:
    Snakemake asks for them several times per job, so each cell is resolved once."""
    return copy.deepcopy(
        _resolved_cell(wildcards.experiment, wildcards.variant, int(wildcards.seed))
    )


@lru_cache(maxsize=None)
def _resolved_cell(experiment, variant, seed):
    return cell_settings(config, experiment, variant, seed)


_ENCODER_OWNERS = {}
#: Files train_encoder writes; every other cell file (metrics.json, predictions.tsv, the
#: read-out) is the cell's own.
TRAINING_OUTPUTS = ("encoder.pt", "history.tsv", "embeddings", "features.npz")


def cell_output(split, experiment, variant, seed, name):
    """A file of a grid cell; a training output comes from the cell that trains its
    encoder (encoder_file)."""
    if name in TRAINING_OUTPUTS:
        return encoder_file(split, experiment, variant, seed, name)
    return LAYOUT.cell_file(split, experiment, variant, seed, name)


def encoder_file(split, experiment, variant, seed, name):
    """A training output (encoder.pt, history.tsv, embeddings) of the cell that trains this
    cell's encoder: cells with equal training settings share one (encoder_owners)."""
    if not _ENCODER_OWNERS:  # once per Snakemake process, on first use (~0.1 s, 220 cells)
        _ENCODER_OWNERS.update(encoder_owners(config))
    try:
        owner = _ENCODER_OWNERS[(experiment, variant, int(seed))]
    except KeyError:
        if (experiment, variant, int(seed)) in grid_cells(config, include_disabled=True):
            raise WorkflowError(
                f"{experiment}/{variant}/seed-{seed} has no encoder (model.encoder: none), "
                f"so it has no {name}."
            ) from None
        raise WorkflowError(
            f"{experiment}/{variant}/seed-{seed} is no grid cell of this config: config key "
            f"experiments.{experiment} has no variant {variant!r} with seed {seed}."
        ) from None
    return LAYOUT.cell_file(split, *owner, name)


def grid_targets(name="metrics.json"):
    return [
        LAYOUT.cell_file(split, experiment, variant, seed, name)
        for split in split_names()
        for experiment, variant, seed in grid_cells(config)
    ]


_DEPARTED_CHECKED = []


def warn_about_departed_subjects():
    """Name, for each cohort the workflow preprocesses (the training cohort, each cohort to
    predict, each BIDS pretraining cohort), the subject folders of its preprocessing (a
    BIDS-Derivatives dataset) whose subjects its participants.tsv no longer lists: nothing
    reads their files, but the derivative dataset still holds them (a subject who withdrew
    consent). Simulated cohorts are left out. Once per run, in the main process."""
    if _DEPARTED_CHECKED or not workflow.is_main_process:
        return
    _DEPARTED_CHECKED.append(True)
    for preproc, root in PREPROC_ROOTS.items():
        simulated = preproc in SIMULATED_PREPROCS or (preproc == TRAINING_PREPROC and SIMULATED)
        folder = Path(LAYOUT.preproc_dir(preproc))
        if simulated or not folder.is_dir():
            continue
        listed = listed_subjects(preproc)
        departed = unlisted_subject_folders(folder, listed)
        if departed:
            _say(departed_message(folder, departed, root, preproc, listed))


def listed_subjects(preproc):
    """The participant_ids the cohort preprocessed into `preproc` lists."""
    if preproc == TRAINING_PREPROC:
        return {f"sub-{label}" for label in subjects()}
    for cohort in PREDICT_COHORTS:
        if LAYOUT.cohort_preproc(cohort) == preproc:
            return {f"sub-{label}" for label in cohort_subjects(cohort)}
    name = next(name for name in PRETRAIN_CHAIN if LAYOUT.pretrain_preproc(name) == preproc)
    return set(pretrain_participants_table(name)["participant_id"])


def departed_message(folder, departed, root, preproc, listed):
    """The warning for `departed` subject folders of `folder` that `root`'s
    participants.tsv does not list."""
    # a lab's first run in the demo's working directory: the demo's subjects never were
    # this dataset's, so 'left the cohort' would mislead. A project moved to another path
    # names its old path there too, but holds folders of listed subjects
    source = preprocessed_from(LAYOUT.preproc_description(preproc))
    other_dataset = source not in (None, Path(root).resolve().as_uri()) and not any(
        (folder / pid).is_dir() for pid in listed
    )
    return (
        f"Warning: {folder} holds {len(departed)} subject folder(s) that "
        f"{Path(root, 'participants.tsv')} "
        f"{'does not list' if other_dataset else 'no longer lists'}: "
        f"{', '.join(departed[:10])}{' ...' if len(departed) > 10 else ''}. Nothing "
        f"uses their files, but the derivative dataset still holds them: "
        + (
            f"its dataset_description.json says they were preprocessed from {source}, "
            f"another dataset. Give each dataset a results folder of its own (config key "
            f"output.results, or another working directory), or delete those folders."
            if other_dataset
            else "delete those folders if the subjects left the cohort (README: Removing a "
            "subject, for everything else that names them)."
        )
    )


def all_targets(wildcards):
    """What `snakemake` builds by default: the training cohort's derivative dataset and QC
    table, every table and figure, and the predictions for the configured cohorts
    (report_targets and predict_targets below). The QC table is a target of its own, as a
    pretraining run's is: Snakemake does not remake a missing file that only feeds outputs
    that are up to date, so a table removed by its failed job (a damaged QC file, removed
    as its message says) would stay missing, and the subject's QC file unmade."""
    check_training_set_sizes()
    check_pretraining_set_sizes()
    check_openbhb_releases()
    check_voxel_readout_memory()
    warn_about_departed_subjects()
    search = (
        [LAYOUT.search_file(split, "best.json") for split in split_names()]
        if config["search"]["enabled"]
        else []
    )
    return [
        LAYOUT.preproc_description(TRAINING_PREPROC),
        LAYOUT.qc_table(),
        *report_targets(),
        *predict_targets(),
        *pretrain_targets(),
        *search,
    ]


def grows_per_attempt(amount):
    """A rule's memory (MB) that grows with each retry of its job
    (brainage.config.resource_for_attempt): a job that SLURM stopped for its memory would
    fail the same way again. Not the wall time: a request above the partition's time limit
    is not refused but left pending for ever (SLURM's default EnforcePartLimits=NO), and
    training resumes anyway. Not a pretraining run's memory either: a larger request may
    not fit its nodes, and it resumes. Resources rerun nothing."""
    return lambda wildcards, attempt: resource_for_attempt(amount, attempt)


def subject_job_memory(given_mb):
    """A subject's preprocessing job's memory (MB), grown with each retry like
    grows_per_attempt: given_mb, or more for a large registration reference (the T1w, or
    the grid map without one: its header's voxel count, brainage.preprocess.chain.
    job_memory_mb). Resources rerun nothing."""

    def memory(wildcards, input, attempt):
        grid = grid_modality(PREPROC_MODALITIES[wildcards.preproc])
        reference = input.get("anat") or input.get(grid)
        return resource_for_attempt(job_memory_mb(reference, given_mb), attempt)

    return memory


# -- per-subject preprocessing (preprocess.smk) ----------------------------------

PREPROCESS = config["preprocess"]
PREPROCESS_RESOURCES = config["resources"]["preprocess"]
STRIP_SKULL_MEM_MB = strip_skull_memory_mb(
    PREPROCESS["skullstrip"], PREPROCESS["freesurfer_tool"], PREPROCESS_RESOURCES["mem_mb"]
)
SUBJECT = subject_files(LAYOUT, "{subject}", "{preproc}")
TEMPLATE = {"t1": LAYOUT.template("T1w"), "mask": LAYOUT.template("brain_mask")}


def template_sources(wildcards):
    """The user's template files (template.source: file), so editing them reruns.

    A path that is not a file stops the plan, naming its key: in a finished project
    Snakemake drops prepare_template (its outputs exist, its input is missing) without a
    word, and the bundle exported next named the missing file as the template the model
    was registered to (as starting_checkpoint says of model.init_checkpoint)."""
    if config["template"]["source"] != "file":
        return {}
    for key in ("t1", "mask"):
        path = config["template"][key]
        if not Path(path).is_file():
            raise WorkflowError(
                f"{not_a_file(f'template.{key}', path)} Correct the path (template.source: "
                f"file takes the template from template.t1 and template.mask), or set "
                f"template.source: nilearn."
            )
    return {"t1": config["template"]["t1"], "mask": config["template"]["mask"]}


def not_a_file(key, path):
    """The start of a refusal of config key `key`, a `path` that is not a file."""
    tilde = " (a ~ is not expanded: write the whole path)" if path.startswith("~") else ""
    return (
        f"config key {key} is {path!r}, which is not a file{tilde}; a relative path is read "
        f"from the working directory {os.getcwd()}."
    )


#: The files rule strip_skull writes (the first of a subject's two jobs).
STRIP_SKULL_OUTPUTS = ("mask", "mask_json", "reference", "reference_info")


def concrete_files(wildcards):
    """The subject's files with the wildcards filled in, for the step's script."""
    return subject_files(
        LAYOUT, wildcards.subject, wildcards.preproc, PREPROC_MODALITIES[wildcards.preproc]
    )


def step_log(step):
    return LAYOUT.preproc_log("{preproc}", "{subject}", step)


def step_benchmark(step):
    return LAYOUT.preproc_benchmark("{preproc}", "{subject}", step)


# -- training and evaluation (train.smk) -----------------------------------------

SPLIT_INPUTS = {
    name.split(".")[0]: LAYOUT.split_file("{split}", name)
    for name in ("images.npy", "participants.tsv", "stats.json")
}
CELL = ("{split}", "{experiment}", "{variant}", "{seed}")
CELL_NAME = "{split}/{experiment}/{variant}/seed-{seed}"


def cell_file(name):
    def path(wildcards):
        return LAYOUT.cell_file(
            wildcards.split, wildcards.experiment, wildcards.variant, wildcards.seed, name
        )

    return path


def training_params(wildcards):
    """The cell's training settings (brainage.config.training_settings): without the
    read-out, so editing readout.* reruns evaluate_encoder (and what follows), not the
    training; without the cell's names, since cells with equal settings share the
    encoder trained in the first of them (encoder_file)."""
    check_training_set_sizes()
    check_trains_its_own_encoder(wildcards)
    settings = training_settings(cell_params(wildcards))
    run = pretrained_run(settings["model"])
    if run is not None:
        # the run's encoder is this job's input (cell_starting_checkpoint); the trainer loads it
        # like any starting checkpoint, and its digest enters the resume fingerprint
        settings["model"]["init_checkpoint"] = LAYOUT.pretrain_file(run, "encoder.pt")
    return settings


def check_trains_its_own_encoder(wildcards):
    """Stop while the job graph is built when a training output is asked for by hand
    (a target on the command line) of a cell that trains no encoder of its own: a
    baseline without one (model.encoder: none), which would fail after the preprocessing,
    or a cell that shares the encoder of an earlier cell with equal training settings,
    which would train that encoder a second time."""
    cell = (wildcards.split, wildcards.experiment, wildcards.variant, wildcards.seed)
    trained_in = encoder_file(*cell, "encoder.pt")  # names a baseline without an encoder
    if trained_in != LAYOUT.cell_file(*cell, "encoder.pt"):
        raise WorkflowError(
            f"{wildcards.experiment}/{wildcards.variant}/seed-{wildcards.seed} trains no "
            f"encoder of its own: cells with equal training settings share the one trained "
            f"first, {trained_in}. Ask for that cell's training outputs, or for this "
            f"cell's metrics.json and predictions.tsv."
        )


def starting_checkpoint(model, key):
    """The file a model section starts from, if any: a pretraining run's encoder
    (model.init pretrained:<name>) or an external checkpoint (model.init_checkpoint, set by
    config key ``key``). It is an input of the jobs that train from it, so that a new
    encoder of the run, or an external file replaced in place, reruns them.

    A missing external file stops the plan, naming the key: as an input alone it stopped
    nothing once the cells had trained (Snakemake drops a job whose outputs exist and whose
    input is missing, whatever else changed), and their read-outs reran on the old encoders
    under settings they were not trained with: another path, or any training setting
    edited after the file was deleted (a scratch purge)."""
    run = pretrained_run(model)
    if run is not None:
        return LAYOUT.pretrain_file(run, "encoder.pt")
    external = model.get("init_checkpoint")
    if external and not Path(external).is_file():
        raise WorkflowError(
            f"{not_a_file(key, external)} Correct the path; if the file was deleted after "
            f"training (a scratch purge), put it back: without "
            f"it a changed setting could not retrain the cells that start from it, which "
            f"would keep their old encoders under the new settings, so every plan stops. "
            f"(Set the key to null to train from scratch, which retrains those cells.)"
        )
    return external or []


def search_starting_checkpoint():
    """The encoder the search trials fine-tune, when the config's model starts from one
    (so the chosen nn_final/nn_step fit the cells that fine-tune it)."""
    return starting_checkpoint(config["model"], "model.init_checkpoint")


def search_params():
    """The trials' settings (brainage.config.search_settings), with the pretrained start."""
    settings = search_settings(config)
    run = pretrained_run(settings["model"])
    if run is not None:
        settings["model"]["init_checkpoint"] = LAYOUT.pretrain_file(run, "encoder.pt")
    return settings


def cell_starting_checkpoint(wildcards):
    """The encoder a cell fine-tunes (starting_checkpoint), if any: changing that
    pretraining run, or the external file, reruns this cell."""
    return starting_checkpoint(
        cell_params(wildcards)["model"],
        variant_key(config, wildcards.experiment, wildcards.variant, "model.init_checkpoint"),
    )


def search_result(wildcards):
    """The random search's choice on the cell's split (results/search/<split>/best.json)
    when the cell trains with it (loss.nn_from_search): a new search result retrains exactly
    those cells. The training script puts its nn_final and nn_step in the settings
    (brainage.search.apply_search_result)."""
    if not uses_search_result(cell_params(wildcards)):
        return []
    return LAYOUT.search_file(wildcards.split, "best.json")


def shared_features(wildcards):
    """The features of the encoder a cell evaluates (written by its training); none for a
    cell without an encoder (model.encoder: none)."""
    if not trains_an_encoder(cell_params(wildcards)):
        return []
    return encoder_file(
        wildcards.split, wildcards.experiment, wildcards.variant, wildcards.seed, "features.npz"
    )


def cell_threads(wildcards):
    return cell_params(wildcards)["train"]["threads"]


# -- pretraining (pretrain.smk) --------------------------------------------------


_PRETRAIN_COHORTS_CHECKED = set()


def pretrain_participants_table(name):
    """The participants of a pretraining run's T1w cohort: from the simulation's options
    (known before it is written) or the cohort's participants.tsv, which must not hold a
    test subject of the training cohort (brainage.normalise.check_pretraining_cohort)."""
    source = PRETRAIN[name]["source"]
    if name in PRETRAIN_SIMULATED:
        return draw_t1w_participants(source["n_subjects"], seed=source["seed"])
    try:
        table = checked_participants(
            source["root"],
            ("T1w",),
            f"pretrain.{name}.source.root",
            needed_by=f"pretraining run {name} (it trains on T1w scans)",
        )
        # once per run; a simulated training cohort's ids are its own (st<k>s<n>)
        if not SIMULATED and name not in _PRETRAIN_COHORTS_CHECKED:
            check_pretraining_cohort(table, participants(), config["split"], root=source["root"])
            _PRETRAIN_COHORTS_CHECKED.add(name)
    except InputError as error:
        raise WorkflowError(
            f"pretraining run {name} (config key pretrain.{name}.source." f"root): {error}"
        ) from None
    return table


def pretrain_subjects(name):
    """Labels of a pretraining run's T1w cohort (pretrain_participants_table)."""
    table = pretrain_participants_table(name)
    return [pid[len("sub-") :] for pid in table["participant_id"]]


def qc_input(table, subject_qc_files):
    """The QC input of a normalisation rule: the cohort's QC table (the thresholds'
    verdicts) when qc.exclude_failed drops failing subjects, else its subjects' QC files,
    whose metrics do not depend on the thresholds, so that editing one reruns no
    normalisation and no training."""
    return table if config["qc"]["exclude_failed"] else subject_qc_files


def training_qc_files(wildcards):
    """Every training-cohort subject's QC file (compute_qc)."""
    return [subject_files(LAYOUT, label)["qc_json"] for label in subjects()]


def pretrain_subject_files(kind):
    """One kind of file of every subject of a pretraining run (wildcard pretrain)."""

    def paths(wildcards):
        preproc = LAYOUT.pretrain_preproc(wildcards.pretrain)
        return [
            subject_files(LAYOUT, label, preproc, ("T1w",))[kind]
            for label in pretrain_subjects(wildcards.pretrain)
        ]

    return paths


def openbhb_participants(wildcards):
    """The OpenBHB release's participants.tsv (rule prepare_openbhb)."""
    return openbhb_release_table(wildcards.pretrain)


def openbhb_release_table(name):
    """The participants.tsv of OpenBHB run `name`'s release. No rule writes the release,
    so a folder or table that is not there stops the plan naming the run's source.root
    (Snakemake's MissingInputException named the file only)."""
    try:
        return str(
            release_participants(
                PRETRAIN[name]["source"]["root"], root_key=f"config key pretrain.{name}.source.root"
            )
        )
    except InputError as error:
        raise WorkflowError(f"pretraining run {name}: {error}") from None


def check_openbhb_releases():
    """Stop the plan, naming pretrain.<run>.source.root, when an OpenBHB run yet to be
    prepared has no release there: in a project with finished outputs Snakemake did not
    ask prepare_openbhb's input (openbhb_participants), and the run ended on Snakemake's
    "filesystem latency" error instead. A run already prepared (its split's images.npy
    there) is not checked here."""
    for name in PRETRAIN_OPENBHB:
        if not Path(LAYOUT.pretrain_split_file(name, "images.npy")).is_file():
            openbhb_release_table(name)


def pretrain_participants(wildcards):
    return str(Path(pretrain_root(wildcards.pretrain), "participants.tsv"))


def pretrain_split_settings(wildcards):
    """The held-out validation subjects: a holdout split of the cohort, stratified by study."""
    return pretrain_split(wildcards.pretrain)


def pretrain_split(name):
    """pretrain_split_settings of run ``name``."""
    run = PRETRAIN[name]
    return {
        "scheme": "holdout",
        "test_fraction": run["validation_fraction"],
        "n_folds": 5,
        "seed": run["seed"],
    }


def pretrain_params(wildcards):
    """The run's settings (brainage.config.pretrain_settings), as a cell's."""
    check_pretraining_set_sizes()
    try:
        return pretrain_settings(config, wildcards.pretrain)
    except ConfigError as error:
        raise WorkflowError(str(error)) from None


def pretrain_settings_argument(wildcards):
    """The run's training settings as JSON, quoted for the shell (rule pretrain_encoder)."""
    settings = training_settings(pretrain_params(wildcards))
    return shlex.quote(json.dumps(settings, sort_keys=True))


# The environment of every job (brainage.io.prepare_job_environment): this checkout's
# package first on PYTHONPATH, UTF-8 text, a writable matplotlib cache, and the package
# folder and the Python that start a pretraining run (rule pretrain_encoder; in a conda
# env the env's python, otherwise the one that runs Snakemake, the venv's), as environment
# variables: as params, a change would rerun the run, and neither the checkout's folder nor
# the Python changes what it computes. Every Snakemake process sets them, the one on a
# SLURM node that runs the job included.
try:
    prepare_job_environment(
        Path(workflow.basedir) / "workflow",
        training_python=(
            "python"
            if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
            else sys.executable
        ),
    )
except ValueError as error:
    raise WorkflowError(str(error)) from None


#: {run: {"metrics": path, "history": path}}: what the report's pretraining section reads.
PRETRAINING_REPORT = {
    name: {
        "metrics": LAYOUT.pretrain_file(name, "metrics.json"),
        "history": LAYOUT.pretrain_file(name, "history.tsv"),
    }
    for name in PRETRAIN
}


def pretraining_report_files():
    return [path for files in PRETRAINING_REPORT.values() for path in files.values()]


def pretrain_targets():
    """Every pretraining run's encoder, history and validation read-out, and for each run
    that preprocesses its cohort the QC table (the normalisation reads it only with
    qc.exclude_failed, so it is a target of its own) and the derivative dataset's
    description."""
    return [
        LAYOUT.pretrain_file(name, file)
        for name in PRETRAIN
        for file in ("encoder.pt", "history.tsv", "metrics.json")
    ] + [
        path
        for name in PRETRAIN_CHAIN
        for path in (
            LAYOUT.pretrain_file(name, "qc.tsv"),
            LAYOUT.preproc_description(LAYOUT.pretrain_preproc(name)),
        )
    ]


# -- tables and figures (aggregate.smk) -----------------------------------------

REPORT_NAMES = report_names(config)
# Every setting of every variant (validated once): params of both report rules, so
# editing a setting remakes the tables and figures along with the cells it reruns.
EXPERIMENT_SETTINGS = experiment_settings(config)
TABLE_EXTENSIONS = (".csv", ".md", ".tex")
CAPTIONS = Path(workflow.basedir) / "workflow" / "report"


def report_targets():
    """Every table (.csv, .md, .tex) and figure (.png) of this configuration."""
    tables = [
        LAYOUT.table(name, ext) for name in REPORT_NAMES["tables"] for ext in TABLE_EXTENSIONS
    ]
    return tables + [LAYOUT.figure(name) for name in REPORT_NAMES["figures"]]


def in_report(path, **options):
    """``path`` marked for `snakemake --report` with its caption and labels."""
    return report(path, **options)


def _caption(kind, name):
    """Caption of a table or figure (kind: tables, figures); other experiments' share one."""
    own = CAPTIONS / kind / f"{name}.rst"
    return str(own if own.is_file() else CAPTIONS / kind / "ablation.rst")


def _table_outputs():
    outputs = []
    for name in REPORT_NAMES["tables"]:
        for ext in TABLE_EXTENSIONS:
            path = LAYOUT.table(name, ext)
            # the CSV is the table shown in the report; .md/.tex are for papers and READMEs
            outputs.append(
                in_report(
                    path,
                    caption=_caption("tables", name),
                    category="Tables",
                    labels={"table": name},
                )
                if ext == ".csv"
                else path
            )
    return outputs


def _figure_subcategory(name):
    if name in {ablation_figure_name(e) for e in ablation_experiments(config)}:
        return "Ablations"
    if name in (EMBEDDINGS_FIGURE, "predicted_vs_true", "search_trials", "training_loss"):
        return "Model"
    if name == PRETRAINING_NAME:
        return "Pretraining"
    return "Cohort and preprocessing"


#: The figures of make_figures: all but the UMAPs, which are jobs of their own so that
#: UMAP's numba compilation overlaps other jobs instead of ending the run.
DRAWN_TOGETHER = [name for name in REPORT_NAMES["figures"] if not is_umap_figure(name)]


def _figure_outputs(names):
    return [
        in_report(
            LAYOUT.figure(name),
            caption=_caption("figures", name),
            category="Figures",
            subcategory=_figure_subcategory(name),
            labels={"figure": name},
        )
        for name in names
    ]


def _cohort_split():
    """The split whose participants.tsv describes the cohort (every split lists the same
    subjects: all of them, less the QC failures under qc.exclude_failed)."""
    return split_names()[0]


def _focus_files(name):
    """A file of the focus cell (UMAP, predicted vs true), for every split; its training
    outputs (embeddings) from the cell that trained its encoder."""
    cell = focus_cell(config)
    if cell is None:
        return []
    return [cell_output(split, *cell, name) for split in split_names()]


def _search_trials(wildcards):
    if not config["search"]["enabled"]:
        return []
    return [LAYOUT.search_file(split, "trials.tsv") for split in split_names()]


def _registered_maps():
    """The training cohort's registered grid maps (the stiffness in the paper's setting)."""
    grid = grid_modality(MODALITIES)
    return {
        f"sub-{subject}": subject_files(LAYOUT, subject, TRAINING_PREPROC, MODALITIES)[
            f"registered_{grid}"
        ]
        for subject in subjects()
    }


def _histories():
    """{variant: {seed: history.tsv}} of the loss experiment's trained encoders (first split;
    a shared encoder's history is its owner's)."""
    histories = {}
    for variant, seed in trained_cells(config):
        histories.setdefault(variant, {})[seed] = cell_output(
            _cohort_split(), "table3", variant, seed, "history.tsv"
        )
    return histories


def _modality_maps():
    """{participant_id: {stiffness, T1w: registered map}} for Fig. 2 (when it is drawn)."""
    if MODALITIES_FIGURE not in REPORT_NAMES["figures"]:
        return {}
    return {
        f"sub-{subject}": registered_maps(
            subject_files(LAYOUT, subject, TRAINING_PREPROC, MODALITIES), ("stiffness", "T1w")
        )
        for subject in subjects()
    }


def _figure_inputs(wildcards):
    return {
        "histories": [file for seeds in _histories().values() for file in seeds.values()],
        "metrics": grid_targets("metrics.json"),
        "participants": LAYOUT.split_file(_cohort_split(), "participants.tsv"),
        "qc": LAYOUT.qc_table(),
        # as inputs, not params: the report shows a job's params, and these name every
        # training subject (the script takes each file's participant from its name)
        "maps": list(_registered_maps().values()),
        "stiffness_maps": [maps["stiffness"] for maps in _modality_maps().values()],
        "T1w_maps": [maps["T1w"] for maps in _modality_maps().values()],
        "predictions": _focus_files("predictions.tsv"),
        "search": _search_trials(wildcards),
        "pretraining": pretraining_report_files(),
    }


def _focus_label():
    cell = focus_cell(config)
    return "" if cell is None else "{}/{}/seed-{}".format(*cell)


# -- prediction for new cohorts (predict.smk) -----------------------------------

BUNDLE_NAME = PREDICT["model"]["name"]
BUNDLE_FILES = [
    LAYOUT.model_bundle_file(BUNDLE_NAME, name)
    for name in (MANIFEST_FILE, *PAYLOAD_FILES, README_FILE)
]
PREDICTION_FILES = (
    "predictions.tsv",
    "summary.tsv",
    "gap_by_group.png",
    "provenance.json",
)


def predict_targets():
    """Every cohort's predictions, summary and figure (nothing without predict.cohorts)."""
    return [
        LAYOUT.prediction(cohort, name) for cohort in PREDICT_COHORTS for name in PREDICTION_FILES
    ]


def exported_cell():
    """(split, experiment, variant, seed) of predict.model; the split is the first one."""
    try:
        cell = exported_cell_of(config)
    except ConfigError as error:
        raise WorkflowError(str(error)) from None
    return (split_names()[0], *cell)


def exported_cell_file(name):
    def path(wildcards):
        return cell_output(*exported_cell(), name)

    return path


def cohort_files(cohort):
    """{label: subject_files} of a predict cohort's subjects."""
    preproc = LAYOUT.cohort_preproc(cohort)
    return {
        label: subject_files(LAYOUT, label, preproc, PREPROC_MODALITIES[preproc])
        for label in cohort_subjects(cohort)
    }


def cohort_subject_files(kind):
    def paths(wildcards):
        return [files[kind] for files in cohort_files(wildcards.cohort).values()]

    return paths


def cohort_maps(wildcards):
    """{label: {modality: registered map}} of a predict cohort (the exported model's maps)."""
    channels = exported_modalities()
    return {
        label: registered_maps(files, channels)
        for label, files in cohort_files(wildcards.cohort).items()
    }
