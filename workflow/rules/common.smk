# Shared by every rule file: validated config, the path helper, the subject list,
# the splits and the grid. All targets are chosen in all_targets(), nothing else.

import sys
from pathlib import Path

# The package is pip-installed (editable) by the README's commands; this keeps a plain
# checkout working too, e.g. on a cluster node that only has the conda envs.
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from brainage.config import (validate_config, cell_settings, encoder_owners, grid_cells,
                             ConfigError)
from brainage.io import read_participants, subject_inputs, check_dataset_images, InputError
from brainage.paths import Layout
from brainage.snakemake_compat import reserve_cores_of_lone_jobs

reserve_cores_of_lone_jobs()  # Snakemake 9.10-9.16 over-commit --cores (snakemake#3913)

try:
    _validated = validate_config(config, source="config")
except ConfigError as error:
    raise WorkflowError(f"invalid configuration:\n{error}") from None
config.clear()
config.update(_validated)

LAYOUT = Layout.from_config(config)
DATASET_ROOT = config["dataset"]["root"]
SIMULATED = config["dataset"]["simulate"]["enabled"]
PREPROC_GROUP = "preprocess_{subject}"

wildcard_constraints:
    subject="[A-Za-z0-9]+",
    seed="[0-9]+",
    split="[A-Za-z0-9]+",
    experiment="[A-Za-z0-9_]+",
    variant="[A-Za-z0-9._-]+",


_IMAGES_CHECKED = []


def participants():
    """The validated participants table; after the simulation when the demo simulates.

    The first call also opens every subject's images (cached by size and mtime in
    .snakemake/), so a corrupt file stops the run before any job starts.
    """
    if SIMULATED:
        checkpoints.simulate_cohort.get()
    try:
        table = read_participants(DATASET_ROOT)
        if not _IMAGES_CHECKED:
            check_dataset_images(
                DATASET_ROOT, [pid[len("sub-"):] for pid in table["participant_id"]],
                cache_file=Path(".snakemake", "brainage_checked_inputs.json"))
            _IMAGES_CHECKED.append(True)
        return table
    except InputError as error:
        raise WorkflowError(str(error)) from None


def subjects():
    """Subject labels (without 'sub-'), in participants.tsv order."""
    return [pid[len("sub-"):] for pid in participants()["participant_id"]]


def raw_inputs(wildcards):
    """Input files of one subject: {'stiffness': path, 'anat': path (only if present)}.

    Derived from the dataset folder, never from participants.tsv, so editing the table
    (adding a study) does not rerun the subjects already preprocessed.
    """
    if SIMULATED:
        checkpoints.simulate_cohort.get()
    try:
        return subject_inputs(DATASET_ROOT, wildcards.subject)
    except InputError as error:
        raise WorkflowError(str(error)) from None


def split_names():
    from brainage.normalise import split_names as names_for_scheme
    return names_for_scheme(participants(), **config["split"])


def cell_params(wildcards):
    return cell_settings(config, wildcards.experiment, wildcards.variant, int(wildcards.seed))


_ENCODER_OWNERS = {}
#: Files train_encoder writes; every other cell file (metrics.json, predictions.tsv) is
#: the cell's own.
TRAINING_OUTPUTS = ("encoder.pt", "history.tsv", "embeddings")


def cell_output(split, experiment, variant, seed, name):
    """A file of a grid cell; a training output comes from the cell that trains its
    encoder (encoder_file)."""
    if name in TRAINING_OUTPUTS:
        return encoder_file(split, experiment, variant, seed, name)
    return LAYOUT.cell_file(split, experiment, variant, seed, name)


def encoder_file(split, experiment, variant, seed, name):
    """A training output (encoder.pt, history.tsv, embeddings) of the cell that trains this
    cell's encoder: cells with equal training settings share one (encoder_owners)."""
    if not _ENCODER_OWNERS:  # once per Snakemake process, on first use (~1 s for 160 cells)
        _ENCODER_OWNERS.update(encoder_owners(config))
    try:
        owner = _ENCODER_OWNERS[(experiment, variant, int(seed))]
    except KeyError:
        raise WorkflowError(
            f"{experiment}/{variant}/seed-{seed} is no grid cell of this config: config key "
            f"experiments.{experiment} has no variant {variant!r} with seed {seed}.") from None
    return LAYOUT.cell_file(split, *owner, name)


def grid_targets(name="metrics.json"):
    return [LAYOUT.cell_file(split, experiment, variant, seed, name)
            for split in split_names()
            for experiment, variant, seed in grid_cells(config)]


def all_targets(wildcards):
    """What `snakemake` builds by default: every table and figure, and the predictions
    for the configured cohorts (report_targets in aggregate.smk, predict_targets in
    predict.smk)."""
    search = ([LAYOUT.search_file(split, "best.json") for split in split_names()]
              if config["search"]["enabled"] else [])
    return [*report_targets(), *predict_targets(), *search]
