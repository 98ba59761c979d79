"""Which tables and figures a configuration produces, decided from the config alone, so the
workflow's targets and the files written always agree: an experiment that is not in the
configuration has no table and no figure (nothing is drawn for "not run")."""

from __future__ import annotations

from typing import Any, Mapping

from brainage.config import cell_settings, grid_cells, pretrain_settings, trains_an_encoder

#: The main comparison (paper Table 3): one variant per loss.
LOSS_EXPERIMENT = "table3"


#: The loss every other loss is compared with (paired over seeds).
REFERENCE_LOSS = "adaptive"


#: Figure name of each known ablation experiment (paper numbering); others: ablation_<name>.
ABLATION_FIGURES = {
    "distance": "fig4a_distance",
    "predictor": "fig4b_predictor",
    "augmentation": "fig4c_augmentation",
    "projection": "fig4d_projection",
    "lambda": "fig6_lambda",
}


#: Figures drawn whenever the dataset exists.
DATASET_FIGURES = ("fig3_age_distribution", "fig7_coverage", "fig8_coverage_examples",
                   "qc_overview")
#: Stiffness beside T1w for four subjects by age (paper Fig. 2): when the subjects provide
#: both (config key dataset.modalities).
MODALITIES_FIGURE = "fig2_modalities"


#: Fig. 5, the UMAP of the focus cell's features by epoch: a job of its own (rule
#: plot_embeddings), drawn as soon as that cell is trained, because UMAP's first call
#: compiles its numba kernels (about 25 s on 2 cores) and would otherwise be the last job.
EMBEDDINGS_FIGURE = "fig5_umap"
CELL_FIGURES = (EMBEDDINGS_FIGURE, "predicted_vs_true")
#: The training loss of every trained encoder of the loss experiment, per epoch.
TRAINING_FIGURE = "training_loss"

#: The pretraining section (table and figure) when the config has pretraining runs.
PRETRAINING_NAME = "pretraining"
PRETRAINING_GAIN = "pretraining_gain"
#: Prefix of each pretraining run's UMAP by epoch (rule plot_pretraining_embeddings).
PRETRAINING_EMBEDDINGS_PREFIX = "pretraining_umap_"


def pretraining_embeddings_figure(run: str) -> str:
    """Figure name of pretraining run ``run``'s features by epoch (UMAP)."""
    return f"{PRETRAINING_EMBEDDINGS_PREFIX}{run}"


def is_umap_figure(name: str) -> bool:
    """Whether figure ``name`` is a UMAP by epoch, drawn by a job of its own (rules
    plot_embeddings, plot_pretraining_embeddings) rather than by make_figures."""
    return name == EMBEDDINGS_FIGURE or name.startswith(PRETRAINING_EMBEDDINGS_PREFIX)


#: Table and figure of the random search over nn_final and nn_step (config ``search``).
SEARCH_NAME = "search_trials"


class ReportError(ValueError):
    """A result file is missing a value the tables or figures need."""


def enabled_experiments(config: Mapping[str, Any]) -> list[str]:
    """Names of the enabled experiments, in config order."""
    return [name for name, experiment in config.get("experiments", {}).items()
            if experiment.get("enabled", True)]


def ablation_experiments(config: Mapping[str, Any]) -> list[str]:
    """Enabled experiments other than the loss comparison (one table + figure each)."""
    return [name for name in enabled_experiments(config) if name != LOSS_EXPERIMENT]


def ablation_figure_name(experiment: str) -> str:
    return ABLATION_FIGURES.get(experiment, f"ablation_{experiment}")


def report_names(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Table and figure names (without folder or extension) this configuration produces.

    Returns
    -------
    dict
        ``{"tables": [...], "figures": [...]}``. Tables are written as .csv, .md and .tex,
        figures as .png. ``table2_cohort`` and the dataset figures always (Fig. 2 when the
        subjects provide stiffness and T1w); ``table3_losses``
        and ``table3_paired`` when experiment ``table3`` is enabled; ``ablation_<name>``
        and its figure for every other enabled experiment; the predicted-vs-true
        figure when a grid cell trains an encoder (:func:`focus_cell`), and its UMAP when that
        cell also embeds an epoch (``train.embed_epochs``); ``search_trials`` (table and figure)
        when the random search is enabled; ``pretraining`` (table and figure),
        ``pretraining_gain`` and one ``pretraining_umap_<run>`` figure per run when the
        config has pretraining runs (not for a run that embeds no epoch: ``train.epochs``
        0, the untrained encoder the schema allows, or no ``train.embed_epochs`` at or
        below its epochs).
    """
    experiments = enabled_experiments(config)
    tables = ["table2_cohort"]
    if LOSS_EXPERIMENT in experiments:
        tables += ["table3_losses", "table3_paired"]
        # no curve to draw when every row is a baseline that takes no training step
        figures_of_losses = [TRAINING_FIGURE] if trained_cells(config) else []
    else:
        figures_of_losses = []
    tables += [f"ablation_{name}" for name in ablation_experiments(config)]
    figures = list(DATASET_FIGURES)
    if {"stiffness", "T1w"} <= set(config.get("dataset", {}).get("modalities", [])):
        figures.insert(0, MODALITIES_FIGURE)
    cell = focus_cell(config)
    if cell is not None:
        # an exported encoder trained for no epoch (the untrained baseline, a frozen
        # pretrained one) has embeddings of no epoch to draw: its predictions only
        figures += [name for name in CELL_FIGURES if name != EMBEDDINGS_FIGURE
                    or embeds_an_epoch(cell_settings(config, *cell)["train"])]
    figures += figures_of_losses
    figures += [ablation_figure_name(name) for name in ablation_experiments(config)]
    if config.get("search", {}).get("enabled", False):
        tables.append(SEARCH_NAME)
        figures.append(SEARCH_NAME)
    if config.get("pretrain"):
        tables += [PRETRAINING_NAME, PRETRAINING_GAIN]
        figures.append(PRETRAINING_NAME)
        figures += [pretraining_embeddings_figure(run) for run in config["pretrain"]
                    if embeds_an_epoch(pretrain_settings(config, run)["train"])]
    return {"tables": tables, "figures": figures}


def embeds_an_epoch(train: Mapping[str, Any]) -> bool:
    """Whether a training of this resolved ``train`` section writes an embeddings file
    (an epoch of ``embed_epochs`` it reaches; :func:`brainage.train.fit_encoder`)."""
    return any(1 <= int(epoch) <= int(train["epochs"]) for epoch in train["embed_epochs"])


def focus_cell(config: Mapping[str, Any]) -> tuple[str, str, int] | None:
    """The grid cell shown in the UMAP and predicted-vs-true figures.

    The cell exported as the model (config ``predict.model``) when the grid has it, else
    the Table 3 Adaptive Neighborhoods cell with the lowest seed, else the first cell; only
    cells with an encoder (its features are what the UMAP shows), None when no cell has one.
    """
    cells = grid_cells(config)
    model = config.get("predict", {}).get("model", {})
    wanted = (model.get("experiment"), model.get("variant"), model.get("seed"))
    candidates = ([wanted] if wanted in cells else []) + sorted(
        (cell for cell in cells if cell[0] == LOSS_EXPERIMENT and cell[1] == REFERENCE_LOSS),
        key=lambda cell: cell[2])  # the lowest seed, however the config lists them
    # settings resolved for the candidates in turn only (the paper grid has 220 cells, and
    # every Snakemake process plans the report)
    return next((cell for cell in (*candidates, *cells)
                 if trains_an_encoder(cell_settings(config, *cell))), None)


def trained_cells(config: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``(variant, seed)`` of the loss experiment's cells that train an encoder for at least
    one epoch: the curves of the training-loss figure (none when the experiment is not
    enabled)."""
    if LOSS_EXPERIMENT not in enabled_experiments(config):
        return []
    cells = []
    for experiment, variant, seed in grid_cells(config):
        if experiment == LOSS_EXPERIMENT:
            settings = cell_settings(config, experiment, variant, seed)
            if trains_an_encoder(settings) and settings["train"]["epochs"] > 0:
                cells.append((variant, seed))
    return cells


def experiment_settings(config: Mapping[str, Any]) -> dict[str, dict[str, dict]]:
    """``{experiment: {variant: cell settings without the seed}}`` of enabled experiments.

    Passed to the report rules as params, so editing a setting remakes the tables.
    """
    settings: dict[str, dict[str, dict]] = {}
    for name in enabled_experiments(config):
        experiment = config["experiments"][name]
        seed = experiment.get("seeds", [0])[0]
        settings[name] = {}
        for variant in experiment["variants"]:
            cell = cell_settings(config, name, variant, seed)
            settings[name][variant] = {section: cell[section]
                                       for section in ("loss", "train", "model", "readout")}
    return settings
