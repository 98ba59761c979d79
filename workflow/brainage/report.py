"""The paper's tables and figures, from the grid's outputs (rules make_tables, make_figures).

Inputs are the files of the output layout (``paths.Layout``):

- per grid cell ``metrics.json`` (test MAE etc.), ``predictions.tsv`` and
  ``embeddings/epoch-<EEE>.npz``;
- per split ``results/dataset/<split>/participants.tsv`` (age, sex, study, coverage,
  qc_pass, subset);
- ``results/qc/qc.tsv`` and the per-subject registered maps (kPa, MNI152 2 mm).

Outputs: ``results/tables/<name>.{csv,md,tex}`` and ``results/figures/<name>.png``. Which
tables and figures a configuration produces is decided by :func:`report_names` alone, so
the workflow's targets and the files written here always agree: an experiment that is not
in the configuration has no table and no figure (nothing is drawn for "not run").

With several splits (k-fold, leave-one-study-out) a seed's MAE is the MAE pooled over the
splits' test subjects (the ``n_test``-weighted mean of the split MAEs), so every subject is
tested once; with the holdout scheme it is the one split's MAE. Means and sds are then
taken over seeds (sd with ``ddof=1``, as "mean ± sd over 5 seeds" in the paper).

Every public function takes DataFrames / arrays or paths and is usable without Snakemake.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .io import atomic_path

logger = logging.getLogger(__name__)

#: The main comparison (paper Table 3): one variant per loss.
LOSS_EXPERIMENT = "table3"
#: The loss every other loss is compared with (paired over seeds).
REFERENCE_LOSS = "adaptive"

#: Paper Table 3 (METHOD.md section 6): test MAE in years, mean and sd over 5 seeds.
PAPER_TABLE3: dict[str, tuple[float, float]] = {
    "simclr": (9.600, 1.701),
    "nnclr": (8.526, 1.442),
    "rnc": (5.266, 0.587),
    "yaware": (3.852, 0.212),
    "threshold": (4.420, 0.503),
    "exponential": (3.824, 0.215),
    "adaptive": (3.724, 0.220),
}
_PAPER_BEST = PAPER_TABLE3[REFERENCE_LOSS]

#: Paper ablations (Figs. 4a-d, 6; text of sections 4.3 and A.1): experiment -> (the
#: cell setting that the variants differ in, {setting value: (MAE mean, sd) in years}).
#: The reference setting of each ablation is the Table 3 model (3.724 ± 0.220).
PAPER_ABLATIONS: dict[str, tuple[str, dict[Any, tuple[float, float]]]] = {
    "distance": ("loss.distance", {"manhattan": _PAPER_BEST, "cosine": (3.748, 0.142),
                                   "euclidean": (3.806, 0.154), "chebyshev": (3.842, 0.196)}),
    "predictor": ("readout.method", {"ridge": _PAPER_BEST, "mse": (3.724, 0.220),
                                     "l1": (3.795, 0.254), "huber": (3.973, 0.199),
                                     "dex": (5.759, 0.429)}),
    "augmentation": ("train.augmentation", {"none": _PAPER_BEST, "cutout": (3.667, 0.147),
                                            "noise": (3.956, 0.283), "flip": (4.238, 0.192),
                                            "rotation": (5.431, 0.414)}),
    "projection": ("model.features", {"projection": _PAPER_BEST, "encoder": (4.323, 0.216)}),
    # Fig. 6 gives numbers only for lambda = 1 and the hard neighbourhood (null).
    "lambda": ("loss.lam", {1.0: (3.681, 0.234), None: _PAPER_BEST}),
}
#: Paper Table 2, its "Total" row (the per-study rows: brainage.simulate.study_table()).
PAPER_TABLE2_TOTAL = {"study": "Total", "n": 311, "age_mean": 41.0, "age_sd": 21.9,
                      "n_female": 183, "n_male": 128}
PAPER_NOTE = ("Paper: Table 3 / Figs. 4 and 6 of the TMLR 2024 paper, 311 subjects from 5 "
              "studies, 2 mm, 50 epochs, 5 seeds. Different data from ours: compare the "
              "ranking, not the values.")

#: Figure name of each known ablation experiment (paper numbering); others: ablation_<name>.
ABLATION_FIGURES = {
    "distance": "fig4a_distance",
    "predictor": "fig4b_predictor",
    "augmentation": "fig4c_augmentation",
    "projection": "fig4d_projection",
    "lambda": "fig6_lambda",
}
ABLATION_TITLES = {
    "distance": "Fig. 4a: distance used to pick the neighbourhood",
    "predictor": "Fig. 4b: age predictor on the frozen features",
    "augmentation": "Fig. 4c: training augmentation",
    "projection": "Fig. 4d: read-out features with / without the projection head",
    "lambda": "Fig. 6: re-weighting of non-neighbours, exponent λ",
    "reduction": "Loss reduction: per anchor (Eq. 3) or global (reference code)",
}
#: Display names of setting values in ablation tables and figures.
VALUE_LABELS = {
    "manhattan": "Manhattan", "euclidean": "Euclidean", "chebyshev": "Chebyshev",
    "cosine": "Cosine", "ridge": "Ridge", "mse": "MSE", "l1": "L1", "huber": "Huber",
    "dex": "DEX", "none": "None", "noise": "Noise", "cutout": "Cutout", "flip": "Flip",
    "rotation": "Rotation", "projection": "w/ projection", "encoder": "w/o projection",
    "anchor": "per anchor (Eq. 3)", "global": "global (reference)",
}
#: Coverage levels of the example maps (paper Fig. 8), as fractions of the brain.
EXAMPLE_COVERAGES = (1.00, 0.95, 0.90, 0.80)
#: Figures drawn whenever the dataset exists / whenever the grid has a cell.
DATASET_FIGURES = ("fig3_age_distribution", "fig7_coverage", "fig8_coverage_examples",
                   "qc_overview")
CELL_FIGURES = ("fig5_umap", "predicted_vs_true")
#: Below this many embedded subjects UMAP is meaningless; PCA is drawn (and said so).
MIN_UMAP_SAMPLES = 4
UMAP_NEIGHBOURS = 15
UMAP_RANDOM_STATE = 0
#: Table and figure of the random search over nn_final and nn_step (config ``search``).
SEARCH_NAME = "search_trials"
#: The paper's random-search optimum (30 trials): nn_final, nn_step.
PAPER_SEARCH_BEST = {"nn_final": 14, "nn_step": 1}
METRIC_KEYS = ("split", "experiment", "variant", "seed", "mae", "n_test")


class ReportError(ValueError):
    """A result file is missing a value the tables or figures need."""


# ---------------------------------------------------------------------------------------
# Names of the outputs
# ---------------------------------------------------------------------------------------

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
        figures as .png. ``table2_cohort`` and the dataset figures always; ``table3_losses``
        and ``table3_paired`` when experiment ``table3`` is enabled; ``ablation_<name>``
        and its figure for every other enabled experiment; the UMAP and predicted-vs-true
        figures when the grid has at least one cell; ``search_trials`` (table and figure)
        when the random search is enabled.
    """
    experiments = enabled_experiments(config)
    tables = ["table2_cohort"]
    if LOSS_EXPERIMENT in experiments:
        tables += ["table3_losses", "table3_paired"]
    tables += [f"ablation_{name}" for name in ablation_experiments(config)]
    figures = list(DATASET_FIGURES)
    if experiments:
        figures += list(CELL_FIGURES)
    figures += [ablation_figure_name(name) for name in ablation_experiments(config)]
    if config.get("search", {}).get("enabled", False):
        tables.append(SEARCH_NAME)
        figures.append(SEARCH_NAME)
    return {"tables": tables, "figures": figures}


def focus_cell(config: Mapping[str, Any]) -> tuple[str, str, int] | None:
    """The grid cell shown in the UMAP and predicted-vs-true figures.

    The cell exported as the model (config ``predict.model``) when the grid has it, else
    the Table 3 Adaptive Neighborhoods cell with the lowest seed, else the first cell.
    """
    from .config import grid_cells

    cells = grid_cells(config)
    if not cells:
        return None
    model = config.get("predict", {}).get("model", {})
    wanted = (model.get("experiment"), model.get("variant"), model.get("seed"))
    if wanted in cells:
        return wanted
    for cell in cells:
        if cell[0] == LOSS_EXPERIMENT and cell[1] == REFERENCE_LOSS:
            return cell
    return cells[0]


def experiment_settings(config: Mapping[str, Any]) -> dict[str, dict[str, dict]]:
    """``{experiment: {variant: cell settings without the seed}}`` of enabled experiments.

    Passed to the report rules as params, so editing a setting remakes the tables.
    """
    from .config import cell_settings

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


# ---------------------------------------------------------------------------------------
# Reading cell results
# ---------------------------------------------------------------------------------------

def read_metrics(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per ``metrics.json``: split, experiment, variant, seed, loss, readout, mae,
    rmse, pearson_r, r2, n_train, n_test, and ``mae_study_<study>`` per study.

    Raises
    ------
    ReportError
        A file lacks one of split, experiment, variant, seed, mae, n_test.
    """
    rows = []
    for path in paths:
        with open(path) as handle:
            metrics = json.load(handle)
        missing = [key for key in METRIC_KEYS if key not in metrics]
        if missing:
            raise ReportError(f"{path}: metrics lack {', '.join(missing)}; rerun the cell's "
                              f"evaluate_encoder job (delete the file first).")
        loss = metrics.get("loss")
        row = {key: metrics.get(key) for key in
               ("split", "experiment", "variant", "readout", "mae", "rmse", "pearson_r",
                "r2", "n_train", "n_test")}
        row["seed"] = int(metrics["seed"])
        row["loss"] = loss.get("name") if isinstance(loss, Mapping) else loss
        for study, mae in (metrics.get("mae_per_study") or {}).items():
            row[f"mae_study_{study}"] = mae
        row["path"] = str(path)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*METRIC_KEYS, "loss", "readout", "rmse", "pearson_r",
                                     "r2", "n_train", "path"])
    table = pd.DataFrame(rows)
    for column in ("mae", "rmse", "pearson_r", "r2"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def seed_results(metrics: pd.DataFrame) -> pd.DataFrame:
    """Pool each (experiment, variant, seed) over its splits.

    MAE and RMSE are pooled over all test subjects of the splits (weights ``n_test``),
    Pearson r and r² are the mean over splits. Returns one row per cell with columns
    experiment, variant, seed, loss, mae, rmse, pearson_r, r2, n_test, n_splits and the
    ``mae_study_*`` columns (each study's MAE over the splits that test it, weighted by
    their n_test).
    """
    keys = ["experiment", "variant", "seed"]
    study_columns = [c for c in metrics.columns if c.startswith("mae_study_")]
    rows = []
    for (experiment, variant, seed), group in metrics.groupby(keys, sort=False):
        weights = group["n_test"].astype(float).to_numpy()
        if np.any(weights <= 0):
            raise ReportError(f"cell {experiment}/{variant}/seed-{seed}: n_test is 0 in "
                              f"{', '.join(group['path'])}; the split has no test subjects.")
        row = {"experiment": experiment, "variant": variant, "seed": int(seed),
               "loss": group["loss"].iloc[0], "readout": group["readout"].iloc[0],
               "mae": float(np.average(group["mae"], weights=weights)),
               "rmse": float(np.sqrt(np.average(group["rmse"] ** 2, weights=weights))),
               "pearson_r": float(group["pearson_r"].mean()),
               "r2": float(group["r2"].mean()),
               "n_test": int(weights.sum()), "n_splits": int(len(group))}
        for column in study_columns:
            # a study is tested in some splits only (leave-one-study-out)
            present = group[column].notna().to_numpy()
            row[column] = (float(np.average(group[column][present], weights=weights[present]))
                           if present.any() else np.nan)
        rows.append(row)
    columns = [*keys, "loss", "readout", "mae", "rmse", "pearson_r", "r2", "n_test",
               "n_splits", *study_columns]
    return pd.DataFrame(rows, columns=columns)


def _summarise(seeds: pd.DataFrame) -> dict[str, Any]:
    """Mean and sd over seeds of one variant's per-seed results."""
    mae = seeds["mae"].to_numpy(float)
    summary = {"n_seeds": int(len(seeds)),
               "mae_mean": float(mae.mean()),
               "mae_std": float(mae.std(ddof=1)) if len(mae) > 1 else np.nan,
               "rmse_mean": float(seeds["rmse"].mean()),
               "pearson_r_mean": float(seeds["pearson_r"].mean()),
               "r2_mean": float(seeds["r2"].mean()),
               "n_test": int(seeds["n_test"].iloc[0]),
               "seeds": " ".join(str(s) for s in sorted(seeds["seed"]))}
    for column in [c for c in seeds.columns if c.startswith("mae_study_")]:
        summary[column] = float(seeds[column].mean())
    return summary


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

def _format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _display_loss_names() -> dict[str, str]:
    from .losses import DISPLAY_NAMES  # imports torch: only when a table needs it

    return dict(DISPLAY_NAMES)


def table3_losses(seeds: pd.DataFrame, *, experiment: str = LOSS_EXPERIMENT,
                  display_names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Paper Table 3 from our cells: one row per variant of the loss experiment.

    Returns
    -------
    pandas.DataFrame
        Columns ``loss, n_seeds, mae_mean, mae_std`` (MAE in years, sd over seeds), then
        ``variant, label, rmse_mean, pearson_r_mean, r2_mean, n_test, seeds,
        paper_mae_mean, paper_mae_std`` and ``mae_study_<study>``. ``loss`` is the loss
        name, or ``<loss>:<variant>`` where two variants share a loss. Rows in the order
        of the paper's Table 3, unknown losses last.
    """
    display_names = dict(display_names or _display_loss_names())
    cells = seeds[seeds["experiment"] == experiment]
    if cells.empty:
        raise ReportError(f"no results for experiment '{experiment}'; it must be enabled "
                          f"in the config (experiments.{experiment}).")
    order = list(PAPER_TABLE3)
    rows = []
    losses_of_variants = cells.groupby("variant", sort=False)["loss"].first()
    shared = set(losses_of_variants[losses_of_variants.duplicated(keep=False)])
    for variant, group in cells.groupby("variant", sort=False):
        loss = group["loss"].iloc[0]
        paper = PAPER_TABLE3.get(loss, (np.nan, np.nan))
        label = display_names.get(loss, loss)
        rows.append({"loss": f"{loss}:{variant}" if loss in shared else loss,
                     **_summarise(group), "variant": variant,
                     "label": label if loss not in shared else f"{label} ({variant})",
                     "paper_mae_mean": paper[0], "paper_mae_std": paper[1],
                     "_order": order.index(loss) if loss in order else len(order)})
    table = pd.DataFrame(rows).sort_values("_order", kind="stable").drop(columns="_order")
    first = ["loss", "n_seeds", "mae_mean", "mae_std", "variant", "label", "rmse_mean",
             "pearson_r_mean", "r2_mean", "n_test", "seeds", "paper_mae_mean",
             "paper_mae_std"]
    return table[first + [c for c in table.columns if c not in first]].reset_index(drop=True)


def reference_variant(seeds: pd.DataFrame, *, experiment: str = LOSS_EXPERIMENT,
                      loss: str = REFERENCE_LOSS) -> str | None:
    """The variant of ``experiment`` that trains ``loss`` (the one named so if several)."""
    cells = seeds[(seeds["experiment"] == experiment) & (seeds["loss"] == loss)]
    variants = list(dict.fromkeys(cells["variant"]))
    if not variants:
        return None
    return loss if loss in variants else variants[0]


def paired_comparison(seeds: pd.DataFrame, *, experiment: str = LOSS_EXPERIMENT,
                      reference: str | None = None) -> pd.DataFrame:
    """Adaptive Neighborhoods against each other loss, paired over matching seeds.

    For each baseline variant: the seeds both have, the MAE differences
    ``d = MAE(baseline) - MAE(reference)`` (years; positive: the reference is better),
    their mean and sd, a paired t-test (``scipy.stats.ttest_rel``, two-sided; NaN with
    fewer than 2 pairs or zero spread) and how many seeds the reference wins.

    Returns
    -------
    pandas.DataFrame
        Columns reference, baseline, n_pairs, mean_difference, sd_difference,
        t_statistic, p_value, reference_wins. No rows when the experiment has no
        reference variant.
    """
    from scipy import stats

    columns = ["reference", "baseline", "n_pairs", "mean_difference", "sd_difference",
               "t_statistic", "p_value", "reference_wins"]
    cells = seeds[seeds["experiment"] == experiment]
    reference = reference or reference_variant(seeds, experiment=experiment)
    if reference is None or reference not in set(cells["variant"]):
        return pd.DataFrame(columns=columns)
    reference_mae = cells[cells["variant"] == reference].set_index("seed")["mae"]
    rows = []
    for baseline, group in cells.groupby("variant", sort=False):
        if baseline == reference:
            continue
        baseline_mae = group.set_index("seed")["mae"]
        common = sorted(set(baseline_mae.index) & set(reference_mae.index))
        differences = (baseline_mae[common] - reference_mae[common]).to_numpy(float)
        t_statistic = p_value = np.nan
        # identical differences (up to rounding): the t statistic is undefined
        if len(common) >= 2 and np.ptp(differences) > 1e-9 * max(1.0, np.abs(differences).max()):
            result = stats.ttest_rel(baseline_mae[common], reference_mae[common])
            t_statistic, p_value = float(result.statistic), float(result.pvalue)
        rows.append({"reference": reference, "baseline": baseline, "n_pairs": len(common),
                     "mean_difference": float(differences.mean()) if len(common) else np.nan,
                     "sd_difference": float(differences.std(ddof=1)) if len(common) > 1
                     else np.nan,
                     "t_statistic": t_statistic, "p_value": p_value,
                     "reference_wins": int(np.sum(differences > 0))})
    return pd.DataFrame(rows, columns=columns)


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def _resolved_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened cell settings with ``train.augmentation: default`` made explicit."""
    flat = _flatten(settings)
    if flat.get("train.augmentation") == "default":
        from .losses import DEFAULT_AUGMENTATION

        flat["train.augmentation"] = DEFAULT_AUGMENTATION.get(flat.get("loss.name"), "none")
    return flat


def _value_label(key: str, value: Any) -> str:
    if key == "loss.lam":
        return "hard (λ→∞)" if value is None else f"λ = {value:g}"
    if key == "loss.name":
        return _display_loss_names().get(value, str(value))
    if isinstance(value, str):
        return VALUE_LABELS.get(value, value)
    return f"{key.split('.')[-1]} = {value}"


def variant_labels(variant_settings: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """What distinguishes the variants of one experiment.

    Parameters
    ----------
    variant_settings : mapping
        ``{variant: {"loss": {...}, "train": {...}, "model": {...}, "readout": {...}}}``.

    Returns
    -------
    pandas.DataFrame
        Index variant; columns ``setting`` (``section.key=value`` of every setting that
        differs between the variants, ``;``-joined), ``label`` (display name, e.g.
        "Manhattan", "λ = 0.5"; the variant name when several settings differ).
    """
    flat = {variant: _resolved_settings(settings) for variant, settings in variant_settings.items()}
    keys = sorted(set().union(*[set(f) for f in flat.values()])) if flat else []
    differing = [key for key in keys
                 if len({repr(f.get(key)) for f in flat.values()}) > 1]
    rows = []
    for variant, settings in flat.items():
        setting = "; ".join(f"{key}={settings.get(key)}" for key in differing)
        if "loss.name" in differing:  # other differences follow from the loss
            label = _value_label("loss.name", settings.get("loss.name"))
        elif len(differing) == 1:
            label = _value_label(differing[0], settings.get(differing[0]))
        else:
            label = variant
        rows.append({"variant": variant, "setting": setting, "label": label})
    table = pd.DataFrame(rows, columns=["variant", "setting", "label"]).set_index("variant")
    repeated = table["label"].duplicated(keep=False)
    table.loc[repeated, "label"] = [f"{label} ({variant})" for variant, label
                                    in table.loc[repeated, "label"].items()]
    return table


def _paper_value(experiment: str, settings: Mapping[str, Any]) -> tuple[float, float]:
    if experiment not in PAPER_ABLATIONS:
        return (np.nan, np.nan)
    key, values = PAPER_ABLATIONS[experiment]
    value = _resolved_settings(settings).get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return values.get(value, (np.nan, np.nan))


def ablation_table(seeds: pd.DataFrame, experiment: str,
                   variant_settings: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One ablation (Fig. 4a-d, Fig. 6 or any other experiment): one row per variant.

    Returns
    -------
    pandas.DataFrame
        Columns ``variant, label, setting, n_seeds, mae_mean, mae_std, rmse_mean,
        pearson_r_mean, r2_mean, n_test, seeds, paper_mae_mean, paper_mae_std`` (MAE in
        years), in config order; for the λ sweep sorted by λ with the hard neighbourhood
        last, and a numeric ``lam`` column.
    """
    cells = seeds[seeds["experiment"] == experiment]
    missing = [v for v in variant_settings if v not in set(cells["variant"])]
    if missing:
        raise ReportError(f"experiment '{experiment}': no results for variant(s) "
                          f"{', '.join(missing)}; their metrics.json files are missing.")
    labels = variant_labels(variant_settings)
    rows = []
    for variant, settings in variant_settings.items():
        paper = _paper_value(experiment, settings)
        row = {"variant": variant, "label": labels.loc[variant, "label"],
               "setting": labels.loc[variant, "setting"],
               **_summarise(cells[cells["variant"] == variant]),
               "paper_mae_mean": paper[0], "paper_mae_std": paper[1]}
        if experiment == "lambda":
            lam = settings["loss"].get("lam")
            row["lam"] = np.inf if lam is None else float(lam)
        rows.append(row)
    table = pd.DataFrame(rows)
    if experiment == "lambda":
        table = table.sort_values("lam", kind="stable")
    first = ["variant", "label", "setting", "n_seeds", "mae_mean", "mae_std", "rmse_mean",
             "pearson_r_mean", "r2_mean", "n_test", "seeds", "paper_mae_mean",
             "paper_mae_std"]
    return table[first + [c for c in table.columns if c not in first]].reset_index(drop=True)


def _sex_counts(sex: pd.Series) -> tuple[int, int, int]:
    initial = sex.astype(str).str.strip().str.lower().str[:1]
    female, male = int((initial == "f").sum()), int((initial == "m").sum())
    return female, male, int(len(sex) - female - male)


def cohort_table(participants: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 2 for our cohort: one row per study plus a ``Total`` row.

    Parameters
    ----------
    participants : DataFrame
        A split's participants.tsv: participant_id, age (years), sex, study, and
        optionally coverage (fraction of the brain, 0-1).

    Returns
    -------
    pandas.DataFrame
        Columns study, n, age_mean, age_sd (years), n_female, n_male, n_other,
        coverage_mean_pct, coverage_sd_pct, coverage_min_pct (% of the brain; NaN
        without a coverage column).
    """
    for column in ("age", "sex", "study"):
        if column not in participants.columns:
            raise ReportError(f"participants table lacks column '{column}' (has "
                              f"{', '.join(participants.columns)}).")
    coverage = _coverage_fraction(participants) if "coverage" in participants else None

    def row(study: str, rows: pd.DataFrame) -> dict:
        female, male, other = _sex_counts(rows["sex"])
        ages = rows["age"].astype(float)
        result = {"study": study, "n": int(len(rows)), "age_mean": float(ages.mean()),
                  "age_sd": float(ages.std(ddof=1)) if len(rows) > 1 else np.nan,
                  "n_female": female, "n_male": male, "n_other": other}
        if coverage is not None:
            values = 100 * coverage[rows.index]
            result.update(coverage_mean_pct=float(values.mean()),
                          coverage_sd_pct=float(values.std(ddof=1)) if len(rows) > 1
                          else np.nan, coverage_min_pct=float(values.min()))
        else:
            result.update(coverage_mean_pct=np.nan, coverage_sd_pct=np.nan,
                          coverage_min_pct=np.nan)
        return result

    studies = sorted(participants["study"].astype(str).unique(), key=_natural_key)
    rows = [row(study, participants[participants["study"].astype(str) == study])
            for study in studies]
    rows.append(row("Total", participants))
    return pd.DataFrame(rows)


def _natural_key(text: str) -> tuple:
    import re

    return tuple(int(part) if part.isdigit() else part
                 for part in re.split(r"(\d+)", str(text)))


def _coverage_fraction(participants: pd.DataFrame) -> pd.Series:
    coverage = pd.to_numeric(participants["coverage"], errors="coerce")
    bad = participants.loc[~coverage.between(0, 1), "participant_id"] \
        if "participant_id" in participants else coverage[~coverage.between(0, 1)].index
    if len(bad):
        raise ReportError(f"coverage must be a fraction of the brain between 0 and 1; "
                          f"not so for {', '.join(map(str, list(bad)[:5]))}.")
    return coverage


# ---------------------------------------------------------------------------------------
# Writing tables: CSV (raw numbers), Markdown and LaTeX (formatted)
# ---------------------------------------------------------------------------------------

def write_table(table: pd.DataFrame, display: pd.DataFrame, stem: str | Path, *,
                title: str, notes: Sequence[str] = (),
                extra_markdown: str = "") -> dict[str, str]:
    """Write ``<stem>.csv`` (``table``: raw numbers), ``<stem>.md`` and ``<stem>.tex``
    (``display``: formatted strings) atomically. Returns ``{ext: path}``."""
    stem = Path(stem)
    paths = {ext: str(stem.with_name(stem.name + ext)) for ext in (".csv", ".md", ".tex")}
    with atomic_path(paths[".csv"]) as temp:
        table.to_csv(temp, index=False, float_format="%.6g")
    markdown = [f"# {title}", "", display.to_markdown(index=False) if len(display)
                else "(no rows)", ""]
    markdown += [f"{note}  " if i < len(notes) - 1 else note for i, note in enumerate(notes)]
    if extra_markdown:
        markdown += ["", extra_markdown]
    with atomic_path(paths[".md"]) as temp:
        temp.write_text("\n".join(markdown).rstrip() + "\n")
    latex = display.to_latex(index=False, escape=True, caption=title,
                             label=f"tab:{stem.name}", column_format="l" * max(1, display.shape[1]))
    latex = latex.replace("±", r"$\pm$").replace("λ", r"$\lambda$").replace("→", r"$\to$")
    with atomic_path(paths[".tex"]) as temp:
        temp.write_text(latex)
    return paths


def _mean_sd_column(table: pd.DataFrame, mean: str, sd: str, digits: int = 3) -> list[str]:
    return [_format_mean_sd(m, s, digits) for m, s in zip(table[mean], table[sd])]


def write_table3(table: pd.DataFrame, paired: pd.DataFrame, table_stem: str | Path,
                 paired_stem: str | Path) -> None:
    """Table 3 (ours beside the paper's, labelled) and the paired comparison."""
    display = pd.DataFrame({
        "Loss": table["label"],
        "Seeds": table["n_seeds"],
        "MAE [years], ours": _mean_sd_column(table, "mae_mean", "mae_std"),
        "RMSE [years], ours": [f"{v:.3f}" for v in table["rmse_mean"]],
        "r, ours": [f"{v:.3f}" for v in table["pearson_r_mean"]],
        "MAE [years], paper (different data)": _mean_sd_column(table, "paper_mae_mean",
                                                               "paper_mae_std"),
    })
    # The paper's losses this config does not train keep their row, marked as such, so
    # the paper's whole Table 3 stays readable beside ours.
    ours = {str(loss).split(":")[0] for loss in table["loss"]}
    names = _display_loss_names()
    not_run = pd.DataFrame([{
        "Loss": f"{names.get(loss, loss)} (not run here)", "Seeds": 0,
        "MAE [years], ours": "–", "RMSE [years], ours": "–", "r, ours": "–",
        "MAE [years], paper (different data)": _format_mean_sd(*PAPER_TABLE3[loss]),
    } for loss in PAPER_TABLE3 if loss not in ours], columns=display.columns)
    display = pd.concat([display, not_run], ignore_index=True)
    notes = [f"Ours: test MAE, mean ± sd over seeds; {int(table['n_test'].iloc[0])} test "
             f"subjects.", PAPER_NOTE]
    labels = dict(zip(table["variant"], table["label"]))
    write_table(table, display, table_stem, title="Table 3: contrastive losses, test MAE",
                notes=notes, extra_markdown=_paired_markdown(paired, labels))
    paired_display = pd.DataFrame({
        "Reference": paired["reference"].map(lambda v: labels.get(v, v)),
        "Baseline": paired["baseline"].map(lambda v: labels.get(v, v)),
        "Pairs": paired["n_pairs"],
        "ΔMAE [years] (baseline − reference)": _mean_sd_column(paired, "mean_difference",
                                                               "sd_difference"),
        "t": [_format_number(v, 2) for v in paired["t_statistic"]],
        "p": [_format_number(v, 3) for v in paired["p_value"]],
        "Reference wins": [f"{w}/{n}" for w, n in zip(paired["reference_wins"],
                                                      paired["n_pairs"])],
    })
    notes = ["Paired over matching seeds; positive ΔMAE: the reference loss is better. "
             "Two-sided paired t-test (no multiple-comparison correction); with few seeds "
             "treat p as descriptive."]
    if paired.empty:
        notes = [f"No {REFERENCE_LOSS} variant in experiment {LOSS_EXPERIMENT}: nothing to "
                 f"compare with."]
    write_table(paired, paired_display, paired_stem,
                title="Table 3b: Adaptive Neighborhoods against each loss, paired over seeds",
                notes=notes)


def _format_number(value: float, digits: int) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}g}" \
        if abs(value) < 10 ** -digits else f"{value:.{digits}f}"


def _paired_markdown(paired: pd.DataFrame, labels: Mapping[str, str]) -> str:
    if paired.empty:
        return ""
    lines = ["## Paired comparison with Adaptive Neighborhoods (same seeds)", "",
             "ΔMAE = MAE(baseline) − MAE(Adaptive Neighborhoods), mean ± sd over seeds; "
             "positive: Adaptive Neighborhoods is better.", ""]
    for row in paired.itertuples():
        difference = _format_mean_sd(row.mean_difference, row.sd_difference)
        lines.append(f"- {labels.get(row.baseline, row.baseline)}: ΔMAE {difference} years "
                     f"over {row.n_pairs} seeds, Adaptive Neighborhoods better in "
                     f"{row.reference_wins}/{row.n_pairs}, paired t-test p = "
                     f"{_format_number(row.p_value, 3)}")
    return "\n".join(lines)


def write_ablation(table: pd.DataFrame, experiment: str, stem: str | Path) -> None:
    display = pd.DataFrame({
        "Variant": table["label"], "Setting": table["setting"], "Seeds": table["n_seeds"],
        "MAE [years], ours": _mean_sd_column(table, "mae_mean", "mae_std"),
        "MAE [years], paper (different data)": _mean_sd_column(table, "paper_mae_mean",
                                                               "paper_mae_std"),
    })
    notes = ["Ours: test MAE, mean ± sd over seeds."]
    if experiment in PAPER_ABLATIONS:
        notes.append(PAPER_NOTE)
    title = ABLATION_TITLES.get(experiment, f"Experiment {experiment}")
    write_table(table, display, stem, title=f"{title}: test MAE", notes=notes)


def write_cohort(table: pd.DataFrame, stem: str | Path) -> None:
    from .simulate import study_table

    display = pd.DataFrame({
        "Study": table["study"], "n": table["n"],
        "Age [years]": _mean_sd_column(table, "age_mean", "age_sd", 1),
        "Sex [F:M]": [f"{f}:{m}" + (f" (+{o} other)" if o else "")
                      for f, m, o in zip(table["n_female"], table["n_male"], table["n_other"])],
        "Brain coverage [%]": [
            "–" if np.isnan(mean) else f"{_format_mean_sd(mean, sd, 1)} (min {low:.1f})"
            for mean, sd, low in zip(table["coverage_mean_pct"], table["coverage_sd_pct"],
                                     table["coverage_min_pct"])],
    })
    paper = pd.concat([study_table(), pd.DataFrame([PAPER_TABLE2_TOTAL])], ignore_index=True)
    paper_lines = ["## Paper Table 2 (different data: the paper's 311 subjects)", "",
                   pd.DataFrame({
                       "Study": paper["study"], "n": paper["n"],
                       "Age [years]": _mean_sd_column(paper, "age_mean", "age_sd", 1),
                       "Sex [F:M]": [f"{f}:{m}" for f, m in zip(paper["n_female"],
                                                                paper["n_male"])],
                   }).to_markdown(index=False)]
    write_table(table, display, stem, title="Table 2: cohort by study",
                notes=["Subjects of the normalised dataset (after QC exclusion, if any)."],
                extra_markdown="\n".join(paper_lines))


def read_search_trials(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Every split's ``trials.tsv`` (trial, nn_final, nn_step, validation_mae [years], ...)
    with a ``split`` column (the folder name), sorted by validation MAE within each split."""
    tables = []
    for path in paths:
        trials = pd.read_csv(path, sep="\t")
        missing = [c for c in ("trial", "nn_final", "nn_step", "validation_mae")
                   if c not in trials.columns]
        if missing:
            raise ReportError(f"{path}: lacks column(s) {', '.join(missing)}; rerun the "
                              f"split's search_hyperparameters job.")
        tables.append(trials.assign(split=Path(path).parent.name))
    if not tables:
        raise ReportError("no trials.tsv of the random search; is search.enabled true?")
    table = pd.concat(tables, ignore_index=True)
    table = table.sort_values(["split", "validation_mae", "trial"], kind="stable")
    first = ["split", "trial", "nn_final", "nn_step", "validation_mae"]
    return table[first + [c for c in table.columns if c not in first]].reset_index(drop=True)


def write_search(table: pd.DataFrame, stem: str | Path) -> None:
    display = pd.DataFrame({
        "Split": table["split"], "Trial": table["trial"], "NN final": table["nn_final"],
        "NN step": table["nn_step"],
        "Validation MAE [years]": [f"{v:.3f}" for v in table["validation_mae"]]})
    best = table.groupby("split", sort=False).head(1)
    notes = ["Random search over nn_final and nn_step on a validation set carved from the "
             "training subjects (test subjects never seen); sorted by validation MAE.",
             "Best: " + "; ".join(f"{row.split}: nn_final {row.nn_final}, nn_step "
                                  f"{row.nn_step} ({row.validation_mae:.3f} years)"
                                  for row in best.itertuples()) + ".",
             f"Paper (30 trials, different data): nn_final {PAPER_SEARCH_BEST['nn_final']}, "
             f"nn_step {PAPER_SEARCH_BEST['nn_step']}."]
    write_table(table, display, stem, title="Random search over the neighbourhood schedule",
                notes=notes)


def make_tables(*, metrics: Sequence[str | Path], participants: str | Path,
                settings: Mapping[str, Mapping[str, Mapping[str, Any]]],
                outputs: Mapping[str, str | Path],
                search: Sequence[str | Path] = ()) -> None:
    """Write every table of the configuration (rule make_tables).

    Parameters
    ----------
    metrics : paths of every grid cell's ``metrics.json`` (all splits).
    participants : one split's ``participants.tsv`` (the cohort).
    settings : :func:`experiment_settings` of the config.
    outputs : ``{table name: stem}``, stems without extension (``results/tables/<name>``),
        for the names of :func:`report_names`.
    search : every split's ``trials.tsv`` of the random search (when enabled).
    """
    started = time.perf_counter()
    seeds = seed_results(read_metrics(metrics))
    for name, stem in outputs.items():
        if name == "table2_cohort":
            write_cohort(cohort_table(pd.read_csv(participants, sep="\t")), stem)
        elif name == "table3_losses":
            table = table3_losses(seeds)
            write_table3(table, paired_comparison(seeds), stem, outputs["table3_paired"])
        elif name == "table3_paired":
            continue  # written with table3_losses
        elif name == SEARCH_NAME:
            write_search(read_search_trials(search), stem)
        elif name.startswith("ablation_"):
            experiment = name[len("ablation_"):]
            write_ablation(ablation_table(seeds, experiment, settings[experiment]),
                           experiment, stem)
        else:
            raise ReportError(f"unknown table name '{name}'")
        logger.info("table %s written", name)
    logger.info("tables done in %.1f s", time.perf_counter() - started)


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as temp:
        figure.savefig(temp, dpi=120, bbox_inches="tight")
    _pyplot().close(figure)


def _study_colours(studies: Iterable[str]) -> dict[str, Any]:
    plt = _pyplot()
    names = sorted(set(map(str, studies)), key=_natural_key)
    palette = plt.get_cmap("tab10")
    return {study: palette(i % 10) for i, study in enumerate(names)}


def plot_age_distribution(participants: pd.DataFrame, path: str | Path) -> None:
    """Fig. 3: stacked age histogram (5-year bins) coloured by study."""
    plt = _pyplot()
    colours = _study_colours(participants["study"])
    ages = participants["age"].astype(float)
    bins = np.arange(5 * np.floor(ages.min() / 5), 5 * np.ceil(ages.max() / 5) + 5.001, 5)
    figure, axis = plt.subplots(figsize=(7, 4))
    groups = [ages[participants["study"].astype(str) == study] for study in colours]
    axis.hist(groups, bins=bins, stacked=True, color=list(colours.values()),
              label=[f"{study} (n={len(g)})" for study, g in zip(colours, groups)],
              edgecolor="white")
    axis.set_xlabel("age [years]")
    axis.set_ylabel("subjects")
    axis.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axis.set_title(f"Fig. 3: age distribution by study (n={len(ages)}, "
                   f"{ages.mean():.1f} ± {ages.std():.1f} years)")
    axis.legend(title="study", fontsize="small")
    _save(figure, path)


def plot_ablation(table: pd.DataFrame, seeds: pd.DataFrame, path: str | Path, *,
                  title: str) -> None:
    """Fig. 4a-d style: bar per variant (mean MAE), error bar = sd over seeds, each seed
    as a dot, the paper's value as a hollow diamond where known."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(4.5, 1.3 * len(table) + 2), 4))
    x = np.arange(len(table))
    errors = np.nan_to_num(table["mae_std"].to_numpy(float))
    bars = axis.bar(x, table["mae_mean"], yerr=errors, capsize=5, color="#4C72B0",
                    alpha=0.85, label="ours: mean ± sd over seeds")
    for position, variant in zip(x, table["variant"]):
        values = seeds.loc[seeds["variant"] == variant, "mae"].to_numpy(float)
        axis.scatter(np.full(len(values), position) + np.linspace(-0.12, 0.12, len(values)),
                     values, s=14, color="black", zorder=3,
                     label="ours: one seed" if position == 0 else None)
    for bar, mean in zip(bars, table["mae_mean"]):
        axis.annotate(f"{mean:.2f}", (bar.get_x() + bar.get_width() / 2, 0),
                      xytext=(0, 3), textcoords="offset points", ha="center",
                      color="white", fontsize="small", fontweight="bold")
    paper = table["paper_mae_mean"].to_numpy(float)
    if np.isfinite(paper).any():
        axis.errorbar(x, paper, yerr=np.nan_to_num(table["paper_mae_std"].to_numpy(float)),
                      fmt="D", mfc="none", color="#C44E52", capsize=3,
                      label="paper (different data)")
    axis.set_xticks(x, table["label"], rotation=20 if len(table) > 4 else 0, ha="right"
                    if len(table) > 4 else "center")
    axis.set_ylabel("test MAE [years]")
    axis.set_title(title, fontsize="medium")
    axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
                frameon=False)
    axis.set_ylim(0, max(np.nanmax(table["mae_mean"] + errors),
                         np.nanmax(np.append(paper, 0))) * 1.1)
    _save(figure, path)


def plot_lambda_sweep(table: pd.DataFrame, path: str | Path) -> None:
    """Fig. 6: MAE against λ (categorical axis in increasing λ, hard neighbourhood last)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    x = np.arange(len(table))
    axis.errorbar(x, table["mae_mean"], yerr=np.nan_to_num(table["mae_std"].to_numpy(float)),
                  fmt="o-", capsize=4, color="#4C72B0", label="ours: mean ± sd over seeds")
    paper = table["paper_mae_mean"].to_numpy(float)
    if np.isfinite(paper).any():
        axis.errorbar(x, paper, yerr=np.nan_to_num(table["paper_mae_std"].to_numpy(float)),
                      fmt="D", mfc="none", color="#C44E52", capsize=3,
                      label="paper (different data)")
    axis.set_xticks(x, table["label"])
    axis.set_xlabel("re-weighting exponent λ (λ = 0: Exponential; hard: drop non-neighbours)")
    axis.set_ylabel("test MAE [years]")
    axis.set_title(ABLATION_TITLES["lambda"], fontsize="medium")
    axis.legend(fontsize="small")
    _save(figure, path)


def load_embeddings(folder: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """``{epoch: {"features" [n, D], "age" [n] years, "subset" [n], "participant_id" [n]}}``
    from ``<folder>/epoch-<EEE>.npz``, sorted by epoch."""
    embeddings = {}
    for file in sorted(Path(folder).glob("epoch-*.npz")):
        epoch = int(file.stem.split("-")[1])
        with np.load(file, allow_pickle=False) as data:
            missing = [k for k in ("features", "age", "subset") if k not in data.files]
            if missing:
                raise ReportError(f"{file}: lacks array(s) {', '.join(missing)}.")
            embeddings[epoch] = {key: data[key] for key in data.files}
    return embeddings


def project_2d(features: np.ndarray, *, random_state: int = UMAP_RANDOM_STATE
               ) -> tuple[np.ndarray, str]:
    """2D projection of ``features`` [n, D]: UMAP (n_neighbors = min(15, n - 1)), or PCA
    when fewer than :data:`MIN_UMAP_SAMPLES` samples. Returns (coords [n, 2], method)."""
    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if n < MIN_UMAP_SAMPLES:
        centred = features - features.mean(axis=0)
        if n < 2 or not np.any(centred):
            return np.zeros((n, 2)), "PCA"
        _, _, components = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ components[:2].T
        return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))), "PCA"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorflow / n_jobs notices of umap-learn
        import umap

        reducer = umap.UMAP(n_neighbors=max(2, min(UMAP_NEIGHBOURS, n - 1)),
                            random_state=random_state, n_jobs=1)
        return reducer.fit_transform(features), "UMAP"


def plot_embeddings(embeddings: Mapping[int, Mapping[str, np.ndarray]], path: str | Path, *,
                    cell: str = "") -> None:
    """Fig. 5: one 2D projection per saved epoch, coloured by age (train ●, test ▲)."""
    plt = _pyplot()
    epochs = sorted(embeddings)
    if not epochs:
        raise ReportError(f"no embeddings to plot for {cell or path}; set "
                          f"train.embed_epochs to epochs the cell trains.")
    columns = min(3, len(epochs))
    rows = int(np.ceil(len(epochs) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows),
                                squeeze=False)
    ages = np.concatenate([embeddings[e]["age"] for e in epochs]).astype(float)
    norm = plt.Normalize(ages.min(), ages.max())
    methods = set()
    for axis, epoch in zip(axes.flat, epochs):
        data = embeddings[epoch]
        coords, method = project_2d(data["features"])
        methods.add(method)
        subset = np.asarray(data["subset"]).astype(str)
        for name, marker in (("train", "o"), ("test", "^")):
            chosen = subset == name
            scatter = axis.scatter(coords[chosen, 0], coords[chosen, 1],
                                   c=np.asarray(data["age"], float)[chosen], cmap="viridis",
                                   norm=norm, marker=marker, s=22, edgecolors="none",
                                   label=f"{name} (n={chosen.sum()})")
        legend = axis.legend(fontsize="x-small", loc="best")
        for handle in legend.legend_handles:  # marker shape only; colour is age
            handle.set_color("grey")
        axis.set_title(f"epoch {epoch}")
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in list(axes.flat)[len(epochs):]:
        axis.set_visible(False)
    figure.colorbar(scatter, ax=axes, label="age [years]", shrink=0.8)
    method = " / ".join(sorted(methods))
    note = (f" (PCA: fewer than {MIN_UMAP_SAMPLES} subjects, too few for UMAP)"
            if "PCA" in methods else "")
    figure.suptitle(f"Fig. 5: {method} of the read-out features by epoch, {cell}{note}",
                    fontsize="medium")
    _save(figure, path)


def plot_coverage(participants: pd.DataFrame, path: str | Path, *,
                  min_coverage: float | None = None) -> None:
    """Fig. 7: brain coverage (% of the template brain with stiffness) per study."""
    plt = _pyplot()
    coverage = 100 * _coverage_fraction(participants)
    colours = _study_colours(participants["study"])
    figure, axis = plt.subplots(figsize=(7, 4))
    rng = np.random.default_rng(0)
    for i, study in enumerate(colours):
        values = coverage[participants["study"].astype(str) == study].to_numpy(float)
        axis.boxplot(values, positions=[i], widths=0.5, showfliers=False)
        axis.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=14,
                     color=colours[study], zorder=3)
    if min_coverage is not None:
        axis.axhline(100 * min_coverage, color="#C44E52", linestyle="--",
                     label=f"QC minimum ({100 * min_coverage:.0f} %)")
        axis.legend(fontsize="small", loc="lower left")
    axis.set_xticks(range(len(colours)),
                    [f"{s}\n(n={int((participants['study'].astype(str) == s).sum())})"
                     for s in colours])
    axis.set_ylabel("brain coverage [%]")
    axis.set_xlabel("study")
    axis.set_title("Fig. 7: brain coverage of the stiffness maps by study")
    _save(figure, path)


def pick_coverage_examples(participants: pd.DataFrame,
                           targets: Sequence[float] = EXAMPLE_COVERAGES) -> list[dict]:
    """The subjects whose coverage is nearest to the targets: distinct subjects with the
    smallest total distance (an optimal assignment) while there are enough, else each
    target's nearest. Returns ``[{"target", "participant_id", "coverage"}]`` (fractions)."""
    from scipy.optimize import linear_sum_assignment

    coverage = _coverage_fraction(participants).to_numpy(float)
    ids = participants["participant_id"].to_numpy()
    distance = np.abs(np.asarray(targets, float)[:, None] - coverage[None, :])
    if len(ids) >= len(targets):
        _, chosen = linear_sum_assignment(distance)
    else:
        chosen = distance.argmin(axis=1)
    return [{"target": float(target), "participant_id": ids[index],
             "coverage": float(coverage[index])} for target, index in zip(targets, chosen)]


def plot_coverage_examples(participants: pd.DataFrame, maps: Mapping[str, str | Path],
                           path: str | Path) -> None:
    """Fig. 8: registered stiffness maps (kPa) nearest to 100/95/90/80 % coverage; three
    orthogonal slices through the centre of the template grid, one colour scale."""
    import nibabel as nib

    plt = _pyplot()
    examples = pick_coverage_examples(participants)
    volumes = []
    for example in examples:
        participant = example["participant_id"]
        if participant not in maps:
            raise ReportError(f"no registered map for {participant} among the "
                              f"{len(maps)} given to the coverage examples.")
        volumes.append(np.nan_to_num(np.asarray(nib.load(str(maps[participant])).dataobj,
                                                dtype=np.float32)))
    top = max(float(np.percentile(v[v > 0], 99)) if np.any(v > 0) else 1.0 for v in volumes)
    figure, axes = plt.subplots(len(examples), 3, figsize=(9, 2.9 * len(examples)),
                                squeeze=False)
    for row, (example, volume) in enumerate(zip(examples, volumes)):
        centre = [s // 2 for s in volume.shape]
        views = (("sagittal", volume[centre[0], :, :]), ("coronal", volume[:, centre[1], :]),
                 ("axial", volume[:, :, centre[2]]))
        for column, (view, plane) in enumerate(views):
            axis = axes[row, column]
            image = axis.imshow(np.rot90(plane), cmap="magma", vmin=0, vmax=top)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(view)
        axes[row, 0].set_ylabel(f"{example['participant_id']}\n{100 * example['coverage']:.1f} % "
                                f"(≈{100 * example['target']:.0f} %)", fontsize="small")
    figure.colorbar(image, ax=axes, label="stiffness [kPa]", shrink=0.6)
    figure.suptitle("Fig. 8: registered stiffness maps at decreasing brain coverage",
                    fontsize="medium")
    _save(figure, path)


def plot_predicted_vs_true(predictions: pd.DataFrame, path: str | Path, *,
                           cell: str = "") -> None:
    """Predicted against true age of the test subjects, coloured by study."""
    plt = _pyplot()
    test = predictions[predictions["subset"].astype(str) == "test"]
    if test.empty:
        raise ReportError(f"no test rows in the predictions of {cell or path}.")
    colours = _study_colours(test["study"])
    figure, axis = plt.subplots(figsize=(5.5, 5))
    for study, colour in colours.items():
        rows = test[test["study"].astype(str) == study]
        axis.scatter(rows["age"], rows["predicted_age"], color=colour, s=22,
                     label=f"{study} (n={len(rows)})")
    low = float(min(test["age"].min(), test["predicted_age"].min())) - 2
    high = float(max(test["age"].max(), test["predicted_age"].max())) + 2
    axis.plot([low, high], [low, high], color="grey", linestyle="--", label="identity")
    error = (test["predicted_age"] - test["age"]).abs().mean()
    axis.set_xlim(low, high)
    axis.set_ylim(low, high)
    axis.set_aspect("equal")
    axis.set_xlabel("true age [years]")
    axis.set_ylabel("predicted age [years]")
    axis.set_title(f"Predicted vs true age, test subjects\n{cell}: MAE {error:.2f} years, "
                   f"n={len(test)}", fontsize="medium")
    axis.legend(title="study", fontsize="small")
    _save(figure, path)


#: Quality-control thresholds (config ``qc``) by the metric name fragment they apply to.
_QC_THRESHOLDS = {"dice": "min_dice", "corr": "min_correlation", "coverage": "min_coverage"}


def plot_qc_overview(qc: pd.DataFrame, participants: pd.DataFrame, path: str | Path, *,
                     thresholds: Mapping[str, float] | None = None) -> None:
    """One panel per numeric QC metric (qc.tsv), subjects per study, failures in red,
    the configured minimum as a dashed line."""
    plt = _pyplot()
    thresholds = dict(thresholds or {})
    if "participant_id" not in qc.columns:
        raise ReportError(f"qc table lacks column 'participant_id' (has "
                          f"{', '.join(qc.columns)}).")
    table = qc.copy()
    if "study" not in table.columns:
        table = table.merge(participants[["participant_id", "study"]], on="participant_id",
                            how="left")
    table["study"] = table["study"].fillna("unknown").astype(str)
    skip = {"age", "seed"}
    metrics = [c for c in table.columns if c not in skip and table[c].dtype != bool
               and pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().any()]
    passed = (table["qc_pass"].astype(str).str.lower().isin(["true", "1"])
              if "qc_pass" in table.columns else pd.Series(True, index=table.index))
    studies = sorted(table["study"].unique(), key=_natural_key)
    columns = min(3, max(1, len(metrics)))
    rows = int(np.ceil(max(1, len(metrics)) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows),
                                squeeze=False)
    rng = np.random.default_rng(0)
    for axis, metric in zip(axes.flat, metrics):
        for i, study in enumerate(studies):
            chosen = table["study"] == study
            jitter = i + rng.uniform(-0.15, 0.15, int(chosen.sum()))
            axis.scatter(jitter, table.loc[chosen, metric],
                         c=np.where(passed[chosen], "#4C72B0", "#C44E52"), s=14)
        for fragment, key in _QC_THRESHOLDS.items():
            if fragment in metric.lower() and key in thresholds:
                axis.axhline(thresholds[key], color="#C44E52", linestyle="--", linewidth=1)
        axis.set_xticks(range(len(studies)), studies, rotation=30, fontsize="small")
        axis.set_title(metric, fontsize="medium")
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    n_failed = int((~passed).sum())
    figure.suptitle(f"QC overview: {len(table)} subjects, {n_failed} failing QC (red); "
                    f"dashed: configured minimum", fontsize="medium")
    if not metrics:
        axes[0, 0].set_visible(True)
        axes[0, 0].text(0.5, 0.5, "qc.tsv has no numeric metric", ha="center")
    figure.tight_layout()
    _save(figure, path)


def plot_search(trials: pd.DataFrame, path: str | Path) -> None:
    """The random search: each trial at (nn_final, nn_step) coloured by validation MAE,
    the best trial of each split circled, the paper's optimum as a red cross."""
    plt = _pyplot()
    splits = list(dict.fromkeys(trials["split"]))
    figure, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    norm = plt.Normalize(trials["validation_mae"].min(), trials["validation_mae"].max())
    for axis, split in zip(axes.flat, splits):
        rows = trials[trials["split"] == split]
        points = axis.scatter(rows["nn_final"], rows["nn_step"], c=rows["validation_mae"],
                              cmap="viridis_r", norm=norm, s=40)
        best = rows.iloc[0]
        axis.scatter([best["nn_final"]], [best["nn_step"]], s=180, facecolors="none",
                     edgecolors="black", linewidths=1.5,
                     label=f"best: {int(best['nn_final'])}, {int(best['nn_step'])} "
                           f"({best['validation_mae']:.2f} years)")
        axis.scatter([PAPER_SEARCH_BEST["nn_final"]], [PAPER_SEARCH_BEST["nn_step"]],
                     marker="x", color="#C44E52", s=60, label="paper's optimum")
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.set_xlabel("final neighbourhood size NN_final [subjects]")
        axis.set_ylabel("shrink step NN_step [epochs]")
        axis.set_title(f"{split}: {len(rows)} trials", fontsize="medium")
        axis.legend(fontsize="small")
    figure.colorbar(points, ax=axes, label="validation MAE [years]")
    figure.suptitle("Random search over the neighbourhood schedule", fontsize="medium")
    _save(figure, path)


def read_predictions(paths: Iterable[str | Path]) -> pd.DataFrame:
    tables = [pd.read_csv(path, sep="\t", dtype={"participant_id": str, "study": str})
              for path in paths]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def make_figures(*, metrics: Sequence[str | Path], participants: str | Path,
                 qc: str | Path, maps: Mapping[str, str | Path],
                 embeddings: str | Path | None, predictions: Sequence[str | Path],
                 settings: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 focus: str, qc_thresholds: Mapping[str, float],
                 outputs: Mapping[str, str | Path],
                 search: Sequence[str | Path] = ()) -> None:
    """Draw every figure of the configuration (rule make_figures).

    Parameters
    ----------
    metrics : every grid cell's ``metrics.json``.
    participants : one split's ``participants.tsv`` (cohort, coverage as fraction 0-1).
    qc : ``results/qc/qc.tsv``.
    maps : ``{participant_id: registered stiffness map}`` (MNI152 2 mm, kPa).
    embeddings : the focus cell's ``embeddings`` folder (``epoch-<EEE>.npz``).
    predictions : the focus cell's ``predictions.tsv`` of every split.
    settings : :func:`experiment_settings` of the config.
    focus : label of the focus cell, e.g. ``table3/adaptive/seed-0``.
    qc_thresholds : config ``qc`` (min_dice, min_correlation, min_coverage).
    outputs : ``{figure name: png path}`` for the names of :func:`report_names`.
    search : every split's ``trials.tsv`` of the random search (when enabled).
    """
    started = time.perf_counter()
    cohort = pd.read_csv(participants, sep="\t", dtype={"participant_id": str, "study": str})
    seeds = seed_results(read_metrics(metrics)) if metrics else None
    for name, path in outputs.items():
        begun = time.perf_counter()
        if name == "fig3_age_distribution":
            plot_age_distribution(cohort, path)
        elif name == "fig7_coverage":
            plot_coverage(cohort, path, min_coverage=qc_thresholds.get("min_coverage"))
        elif name == "fig8_coverage_examples":
            plot_coverage_examples(cohort, maps, path)
        elif name == "qc_overview":
            plot_qc_overview(pd.read_csv(qc, sep="\t", dtype={"participant_id": str}),
                             cohort, path, thresholds=qc_thresholds)
        elif name == "fig5_umap":
            plot_embeddings(load_embeddings(embeddings), path, cell=focus)
        elif name == "predicted_vs_true":
            plot_predicted_vs_true(read_predictions(predictions), path, cell=focus)
        elif name == SEARCH_NAME:
            plot_search(read_search_trials(search), path)
        else:
            experiment = next((e for e in settings if ablation_figure_name(e) == name), None)
            if experiment is None:
                raise ReportError(f"unknown figure name '{name}'")
            table = ablation_table(seeds, experiment, settings[experiment])
            if experiment == "lambda":
                plot_lambda_sweep(table, path)
            else:
                plot_ablation(table, seeds[seeds["experiment"] == experiment], path,
                              title=ABLATION_TITLES.get(experiment, f"Experiment {experiment}"))
        logger.info("figure %s written in %.1f s", name, time.perf_counter() - begun)
    logger.info("figures done in %.1f s", time.perf_counter() - started)
