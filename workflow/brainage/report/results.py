"""Reading the grid's results: one row per cell, pooled over splits, summarised over
seeds; the paper's numbers to set beside ours; labels of what distinguishes variants."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from brainage.report.targets import REFERENCE_LOSS, ReportError

#: Paper Table 3 (docs/method.md §6): test MAE in years, mean and sd over 5 seeds.
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
#: In the paper the reference setting of each ablation is the Table 3 model (3.724 ± 0.220);
#: config/paper.yaml's ablation cells train at its nn_final and nn_step (14, 1), Table 3's
#: Adaptive row at the random search's choice (docs/method.md §6, §9).
PAPER_ABLATIONS: dict[str, tuple[str, dict[Any, tuple[float, float]]]] = {
    "distance": ("loss.distance", {"manhattan": _PAPER_BEST, "cosine": (3.748, 0.142),
                                   "euclidean": (3.806, 0.154), "chebyshev": (3.842, 0.196)}),
    # The paper's "MSE" (3.724 ± 0.220) is Table 3's Ridge value: its Ridge read-out. Our
    # readout.method mse (an MLP with squared error) has no paper counterpart.
    "predictor": ("readout.method", {"ridge": _PAPER_BEST,
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
              "studies, 2 mm, 50 epochs, 5 seeds, every encoder pretrained on OpenBHB (T1w) "
              "and then fine-tuned: the protocol of our fine-tuned rows. Different data from "
              "ours: compare the ranking, not the values.")


#: The paper's random-search optimum (30 trials): nn_final, nn_step.
PAPER_SEARCH_BEST = {"nn_final": 14, "nn_step": 1}


ABLATION_TITLES = {
    "distance": "Fig. 4a: distance used to pick the neighbourhood",
    "predictor": "Fig. 4b: age predictor on the frozen features",
    "augmentation": "Fig. 4c: training augmentation",
    "projection": "Fig. 4d: read-out features with / without the projection head",
    "lambda": "Fig. 6: re-weighting of non-neighbours, exponent λ",
    "reduction": "Loss reduction: per anchor (Eq. 3) or global (reference code)",
    "modality": "Input modalities (model.modalities)",
}

#: Display names of the modalities (model.modalities) in tables and figures.
MODALITY_LABELS = {"stiffness": "Stiffness", "damping_ratio": "Damping ratio",
                   "storage_modulus": "Storage modulus", "loss_modulus": "Loss modulus",
                   "T1w": "T1w"}


#: Display names of setting values in ablation tables and figures.
VALUE_LABELS = {
    "manhattan": "Manhattan", "euclidean": "Euclidean", "chebyshev": "Chebyshev",
    "cosine": "Cosine", "ridge": "Ridge (the paper's MSE)", "mse": "MLP, squared error",
    "l1": "L1", "huber": "Huber",
    "dex": "DEX", "none": "None", "noise": "Noise", "cutout": "Cutout", "flip": "Flip",
    "rotation": "Rotation", "projection": "w/ projection", "encoder": "w/o projection",
    "anchor": "per anchor (Eq. 3)", "global": "global (reference)",
}


METRIC_KEYS = ("split", "experiment", "variant", "seed", "mae", "n_test")


#: metrics.json's ``gap_age_sums``: n and the sums of age, gap, age², age × gap of a split's
#: test subjects, which pool r, R² and the gap-age slope over splits (:func:`pooled_fit`).
GAP_AGE_SUMS = ("n", "age", "gap", "age_age", "age_gap")


def read_metrics(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per ``metrics.json``: split, experiment, variant, seed, loss, readout, mae,
    rmse, pearson_r, r2, n_train, n_test, neighbourhood (:func:`neighbourhood_schedule`)
    and ``mae_study_<study>`` and ``n_study_<study>`` (its test subjects; absent in
    metrics written before the count was recorded) per study.

    Raises
    ------
    ReportError
        A file is not JSON, or lacks one of split, experiment, variant, seed, mae, n_test.
    """
    rows = []
    for path in paths:
        try:
            metrics = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            # json's own message names a line and column but not which of the grid's files
            raise ReportError(f"{path} cannot be read as JSON ({error}); rerun the cell's "
                              f"evaluate_encoder job (delete the file first).") from None
        missing = [key for key in METRIC_KEYS if key not in metrics]
        if missing:
            raise ReportError(f"{path}: metrics lack {', '.join(missing)}; rerun the cell's "
                              f"evaluate_encoder job (delete the file first).")
        loss = metrics.get("loss")
        row = {key: metrics.get(key) for key in
               ("split", "experiment", "variant", "readout", "mae", "rmse", "pearson_r",
                "r2", "n_train", "n_test", "gap_age_slope")}
        row["kind"] = metrics.get("kind", "contrastive")
        row["seed"] = int(metrics["seed"])
        row["loss"] = loss.get("name") if isinstance(loss, Mapping) else loss
        row["neighbourhood"] = neighbourhood_schedule(metrics.get("trained_loss"))
        for study, mae in (metrics.get("mae_per_study") or {}).items():
            row[f"mae_study_{study}"] = mae
        for study, count in (metrics.get("n_per_study") or {}).items():
            row[f"n_study_{study}"] = count
        sums = metrics.get("gap_age_sums") or {}
        for key in GAP_AGE_SUMS:
            row[f"gap_age_sum_{key}"] = sums.get(key, np.nan)
        row["path"] = str(path)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*METRIC_KEYS, "loss", "kind", "readout", "rmse",
                                     "pearson_r", "r2", "gap_age_slope", "n_train",
                                     "neighbourhood", "path"])
    table = pd.DataFrame(rows)
    for column in ("mae", "rmse", "pearson_r", "r2", "gap_age_slope"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def neighbourhood_schedule(trained_loss: Mapping[str, Any] | None) -> str | None:
    """"nn_final N, nn_step M" and where they came from, for an encoder trained with
    Adaptive Neighborhoods (metrics.json's ``trained_loss``); None for any other cell."""
    if not isinstance(trained_loss, Mapping) or trained_loss.get("name") != "adaptive":
        return None
    source = "random search" if trained_loss.get("nn_from_search") else "configured"
    return (f"nn_final {trained_loss.get('nn_final')}, nn_step {trained_loss.get('nn_step')} "
            f"({source})")


def joined_values(values: pd.Series) -> str | None:
    """The distinct non-empty values in order, joined by " or " (None when none)."""
    distinct = list(dict.fromkeys(value for value in values if isinstance(value, str)))
    return " or ".join(distinct) or None


def seed_results(metrics: pd.DataFrame) -> pd.DataFrame:
    """Pool each (experiment, variant, seed) over its splits.

    MAE and RMSE are pooled over all test subjects of the splits (weights ``n_test``), and
    so are Pearson r, R² and the gap-age slope (:func:`pooled_fit`). Returns
    one row per cell with columns
    experiment, variant, seed, loss, kind, mae, rmse, pearson_r, r2, gap_age_slope (the
    slope over all test subjects of the splits, :func:`pooled_fit`), n_test,
    n_splits, neighbourhood (Adaptive Neighborhoods' schedule as trained, each split's
    when they differ) and the ``mae_study_*`` columns (each
    study's MAE over all its test subjects: the splits that test it, each weighted by its
    number of that study's test subjects, ``n_study_*``, here summed over the splits: 0
    where none tests the study, NaN in metrics written before the counts were recorded).

    Raises
    ------
    ReportError
        A split has no test subjects, or a study tested in several splits of a cell lacks
        its per-study counts, or a cell of several splits lacks ``gap_age_sums`` (metrics
        written by an older version): rerun evaluate_encoder.
    """
    keys = ["experiment", "variant", "seed"]
    study_columns = [c for c in metrics.columns if c.startswith("mae_study_")]
    rows = []
    for (experiment, variant, seed), group in metrics.groupby(keys, sort=False):
        weights = group["n_test"].astype(float).to_numpy()
        if np.any(weights <= 0):
            empty = group["path"][weights <= 0]
            raise ReportError(f"cell {experiment}/{variant}/seed-{seed}: n_test is 0 in "
                              f"{', '.join(empty)}; the split has no test subjects. Check "
                              f"the split (split.*) or rerun its evaluate_encoder.")
        row = {"experiment": experiment, "variant": variant, "seed": int(seed),
               "loss": group["loss"].iloc[0], "kind": group["kind"].iloc[0],
               "readout": group["readout"].iloc[0],
               "mae": float(np.average(group["mae"], weights=weights)),
               "rmse": float(np.sqrt(np.average(group["rmse"] ** 2, weights=weights))),
               **pooled_fit(group),
               "n_test": int(weights.sum()), "n_splits": int(len(group)),
               # each split has its own random search: its choice may differ
               "neighbourhood": (joined_values(group["neighbourhood"])
                                 if "neighbourhood" in group else None)}
        for column in study_columns:
            row[column] = pooled_study_mae(group, column)
            count_column = study_count_column(column)
            # 0 where no split tests the study; NaN where the counts predate them
            row[count_column] = (0.0 if np.isnan(row[column]) else
                                 float(group[count_column].sum(min_count=1))
                                 if count_column in group else np.nan)
        rows.append(row)
    count_columns = [study_count_column(column) for column in study_columns]
    columns = [*keys, "loss", "kind", "readout", "mae", "rmse", "pearson_r", "r2",
               "gap_age_slope", "n_test", "n_splits", "neighbourhood", *study_columns,
               *count_columns]
    return pd.DataFrame(rows, columns=columns)


def pooled_fit(group: pd.DataFrame) -> dict[str, float]:
    """Pearson r of predicted and true age, R² (1 − SSE / SST) and the least-squares
    slope of the gap (predicted − age) against age, over the test subjects of every split
    of ``group`` (one cell), from each split's ``gap_age_sums`` and RMSE (n · RMSE² is its
    sum of squared gaps); with one split its own values.

    Not the means of the splits' values: a leave-one-study-out split tests one study's
    narrow age range, whose own r, R² and slope say little about the fit over the ages of
    all test subjects (three studies of 20-30, 40-60 and 65-80 years, predictions within
    4 years: mean r 0.72 and R² 0.05 against 0.98 and 0.96 over the subjects). NaN when
    undefined (every test subject one age, or one predicted age).
    """
    if len(group) == 1:
        return {key: float(group[key].iloc[0]) for key in ("pearson_r", "r2", "gap_age_slope")}
    n, age, gap, age_age, age_gap = _pooled_sums(group)
    gap_gap = float((group["gap_age_sum_n"] * group["rmse"].astype(float) ** 2).sum())
    predicted, predicted_predicted = age + gap, age_age + 2 * age_gap + gap_gap
    age_spread = age_age - age * age / n
    predicted_spread = predicted_predicted - predicted * predicted / n
    covariance = age_age + age_gap - age * predicted / n
    # one age for every subject leaves rounding (2e-13 at 20.2 years), not 0: relative to
    # age_age, 1e-10 is far below any real spread (two ages 0.01 years apart: 1e-8)
    ages_vary = age_spread > 1e-10 * age_age
    predictions_vary = predicted_spread > 1e-10 * predicted_predicted
    return {"pearson_r": (float(covariance / np.sqrt(age_spread * predicted_spread))
                          if ages_vary and predictions_vary else np.nan),
            "r2": float(1 - gap_gap / age_spread) if ages_vary else np.nan,
            "gap_age_slope": (float((age_gap - age * gap / n) / age_spread) if ages_vary
                              else np.nan)}


def _pooled_sums(group: pd.DataFrame) -> np.ndarray:
    """n and the sums of age, gap, age², age × gap over the splits of ``group``."""
    columns = [f"gap_age_sum_{key}" for key in GAP_AGE_SUMS]
    sums = (group[columns] if all(c in group for c in columns)
            else pd.DataFrame(np.nan, index=group.index, columns=columns))
    lacking = sums.isna().any(axis=1).to_numpy()
    if lacking.any():
        raise ReportError(f"{', '.join(group['path'][lacking])}: the metrics lack the sums "
                          f"(gap_age_sums) that pool r, R² and the gap-age slope over "
                          f"splits; they predate them. Rerun the cells' evaluate_encoder jobs "
                          f"(snakemake --forcerun evaluate_encoder).")
    return sums.sum().to_numpy(float)


def study_count_column(mae_column: str) -> str:
    """``n_study_<study>``, the test-subject count beside ``mae_study_<study>``."""
    return "n_study_" + mae_column[len("mae_study_"):]


def pooled_study_mae(group: pd.DataFrame, column: str) -> float:
    """One study's MAE (``mae_study_<study>``) over the test subjects of the splits of
    ``group`` (one cell) that test it: weighted by each split's count of that study's test
    subjects, not by its n_test (a k-fold split tests a few of a study's subjects among many
    others'). NaN when no split tests the study (leave-one-study-out)."""
    present = group[column].notna().to_numpy()
    if not present.any():
        return np.nan
    maes = group[column][present].to_numpy(float)
    if len(maes) == 1:
        return float(maes[0])
    count_column = study_count_column(column)
    counts = (group[count_column][present] if count_column in group
              else pd.Series(np.nan, index=group.index[present]))
    if counts.isna().any():
        lacking = group["path"][present][counts.isna()]
        raise ReportError(f"{', '.join(lacking)}: the metrics lack the per-study test counts "
                          f"(n_per_study) that pool {column} over splits; they predate them. "
                          f"Rerun the cells' evaluate_encoder jobs (snakemake --forcerun "
                          f"evaluate_encoder).")
    return float(np.average(maes, weights=counts.to_numpy(float)))


def check_same_test_subjects(cells: pd.DataFrame, experiment: str) -> None:
    """Refuse an experiment's per-seed results (:func:`seed_results`) whose cells pooled
    different numbers of test subjects (or of splits).

    Every cell of the grid is evaluated on the same split(s), so they differ only when a
    cell lacks the ``metrics.json`` of a split: that cell's MAE would be over fewer
    subjects, yet averaged over seeds and set beside the other rows as if on the same ones.

    Raises
    ------
    ReportError
        Naming the cells of each count, and what to do.
    """
    keys = ["n_test"] + (["n_splits"] if "n_splits" in cells else [])
    counts = cells.groupby(keys, sort=True)
    if counts.ngroups <= 1:
        return
    described = []
    for values, group in counts:
        values = values if isinstance(values, tuple) else (values,)
        names = [f"{variant}/seed-{seed}" for variant, seed in zip(group["variant"],
                                                                  group["seed"])]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        splits = f" in {values[1]} split(s)" if len(values) > 1 else ""
        described.append(f"{values[0]} test subjects{splits}: {shown}")
    raise ReportError(f"experiment '{experiment}': its cells tested different numbers of "
                      f"subjects ({'; '.join(described)}), though every cell is evaluated on "
                      f"the same split(s): some lack a split's metrics.json. Pass every "
                      f"split's metrics.json of every cell (run the missing evaluate_encoder "
                      f"jobs).")


def summarise_seeds(seeds: pd.DataFrame) -> dict[str, Any]:
    """Mean and sd over seeds of one variant's per-seed results.

    A mean is over every seed or NaN: a seed whose Pearson r is undefined (constant
    predictions) makes the variant's mean r NaN, not the mean of the other seeds, which
    the table would label as the mean over all of them.
    """
    mae = seeds["mae"].to_numpy(float)

    def mean(column: str) -> float:
        return float(seeds[column].mean(skipna=False))

    summary = {"n_seeds": int(len(seeds)),
               "mae_mean": float(mae.mean()),
               "mae_std": float(mae.std(ddof=1)) if len(mae) > 1 else np.nan,
               "rmse_mean": mean("rmse"),
               "pearson_r_mean": mean("pearson_r"),
               "r2_mean": mean("r2"),
               "gap_age_slope_mean": mean("gap_age_slope"),
               "n_test": int(seeds["n_test"].iloc[0]),
               "seeds": " ".join(str(s) for s in sorted(seeds["seed"])),
               "neighbourhood": joined_values(seeds["neighbourhood"])}
    for column in [c for c in seeds.columns if c.startswith("mae_study_")]:
        summary[column] = mean(column)
    for column in [c for c in seeds.columns if c.startswith("n_study_")]:
        summary[column] = float(seeds[column].iloc[0])  # the seeds share the split
    return summary


#: Table rows of the baselines, in this order after the paper's losses (kind key -> label).
BASELINE_LABELS = {
    "train_mean": "Training mean age (baseline)",
    "study_mean": "Study mean age (baseline)",
    "voxel_ridge": "Ridge on voxels (baseline)",
    "voxel_pca_ridge": "PCA + Ridge on voxels (baseline)",
    "untrained": "Untrained ResNet-18 + read-out (baseline)",
    "pretrained_frozen": "Pretrained ResNet-18, not fine-tuned (baseline)",
    "supervised": "Supervised ResNet-18, L1 on age (baseline)",
}


def baseline_key(settings: Mapping[str, Any]) -> str | None:
    """Which baseline a cell's settings describe (a key of :data:`BASELINE_LABELS`), or None
    for a contrastive cell."""
    model, train = settings["model"], settings["train"]
    if model.get("encoder") == "none":
        method = settings["readout"]["method"]
        if method in ("train_mean", "study_mean"):
            return method
        return {"ridge": "voxel_ridge", "pca_ridge": "voxel_pca_ridge"}.get(method,
                                                                          f"voxel_{method}")
    if train.get("epochs") == 0:
        started = model.get("init_checkpoint") or model.get("init", "scratch") != "scratch"
        return "pretrained_frozen" if started else "untrained"
    if settings["loss"]["name"] == "supervised":
        return "supervised"
    return None


def baseline_label(key: str) -> str:
    """A baseline row's display name, from its :data:`BASELINE_LABELS` key."""
    return BASELINE_LABELS.get(key, f"{key} (baseline)")


def cell_label(settings: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str:
    """A row's display name: the loss (contrastive cells) or the baseline."""
    key = baseline_key(settings)
    if key is not None:
        return baseline_label(key)
    names = names or display_loss_names()
    label = names.get(settings["loss"]["name"], settings["loss"]["name"])
    start = initialisation(settings)
    if start == "scratch":
        return label
    source = start.split(":", 1)[1] if ":" in start else "an external checkpoint"
    return f"{label}, fine-tuned from {source}"


def initialisation(settings: Mapping[str, Any]) -> str:
    """Where a cell's encoder starts: ``scratch``, ``pretrained:<run>`` (config pretrain),
    ``checkpoint`` (an external model.init_checkpoint), or ``none`` (no encoder)."""
    model = settings.get("model", {})
    if model.get("encoder") == "none":
        return "none"  # the voxel and mean baselines have no network to start
    if model.get("init_checkpoint"):
        return "checkpoint"
    return model.get("init", "scratch")


def display_loss_names() -> dict[str, str]:
    from brainage.losses import DISPLAY_NAMES  # imports torch: only when a table needs it

    return dict(DISPLAY_NAMES)


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def _display_value(key: str, value: Any) -> str:
    """A setting as the config writes it (tables showed Python's ``('stiffness',
    'damping_ratio')``, ``None`` and ``True``): the input channels joined by " + ", other
    lists in brackets, null, true and false."""
    if isinstance(value, tuple):
        items = [_display_value(key, item) for item in value]
        return " + ".join(items) if key == "model.modalities" else f"[{', '.join(items)}]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def resolved_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened cell settings with ``train.augmentation: default`` made explicit."""
    flat = _flatten(settings)
    if flat.get("train.augmentation") == "default":
        from brainage.losses import DEFAULT_AUGMENTATION

        flat["train.augmentation"] = DEFAULT_AUGMENTATION.get(flat.get("loss.name"), "none")
    return flat


def _value_label(key: str, value: Any) -> str:
    if key == "loss.lam":
        return "hard (λ→∞)" if value is None else f"λ = {value:g}"
    if key == "loss.name":
        return display_loss_names().get(value, str(value))
    if key == "model.modalities":
        return " + ".join(MODALITY_LABELS.get(name, name) for name in value)
    if isinstance(value, str):
        return VALUE_LABELS.get(value, value)
    return f"{key.split('.')[-1]} = {_display_value(key, value)}"


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
    flat = {variant: resolved_settings(settings) for variant, settings in variant_settings.items()}
    keys = sorted(set().union(*[set(f) for f in flat.values()])) if flat else []
    differing = [key for key in keys
                 if len({repr(f.get(key)) for f in flat.values()}) > 1]
    rows = []
    for variant, settings in flat.items():
        setting = "; ".join(f"{key}={_display_value(key, settings.get(key))}"
                            for key in differing)
        if "loss.name" in differing:  # other differences follow from the loss
            label = _value_label("loss.name", settings.get("loss.name"))
        elif len(differing) == 1:
            label = _value_label(differing[0], settings.get(differing[0]))
        else:
            label = variant
        rows.append({"variant": variant, "setting": setting, "label": label})
    table = pd.DataFrame(rows, columns=["variant", "setting", "label"]).set_index("variant")
    table["label"] = list(distinct_labels(table["label"].to_dict()).values())
    return table


def distinct_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``{variant: label}`` with every label that several variants share told apart as
    ``<label> (<variant>)``, as Table 3 names its rows."""
    counts = Counter(labels.values())
    return {variant: f"{label} ({variant})" if counts[label] > 1 else label
            for variant, label in labels.items()}


def paper_value(experiment: str, settings: Mapping[str, Any]) -> tuple[float, float]:
    if experiment not in PAPER_ABLATIONS:
        return (np.nan, np.nan)
    key, values = PAPER_ABLATIONS[experiment]
    value = resolved_settings(settings).get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return values.get(value, (np.nan, np.nan))


def natural_key(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part
                 for part in re.split(r"(\d+)", str(text)))


def coverage_fraction(participants: pd.DataFrame) -> pd.Series:
    coverage = pd.to_numeric(participants["coverage"], errors="coerce")
    bad = participants.loc[~coverage.between(0, 1), "participant_id"] \
        if "participant_id" in participants else coverage[~coverage.between(0, 1)].index
    if len(bad):
        raise ReportError(f"coverage must be a fraction of the brain between 0 and 1; "
                          f"not so for {', '.join(map(str, list(bad)[:5]))}.")
    return coverage


def refuse_unfinished_training(output: str | Path) -> None:
    """Refuse a training's ``history.tsv`` or ``embeddings/`` while the training's resume
    state (``checkpoint.pt``, brainage.train) lies beside it: the training was killed or
    failed before its end (a finished one deletes it), and a figure would show its epochs so
    far as the whole training. Snakemake stops at such files (IncompleteFilesException)
    except where it plans their job after a checkpoint (the demo's simulated cohort): it
    checks for unfinished files before it does, and a training forced and killed there, its
    evaluation up to date, is then neither redone nor refused before this job."""
    output = Path(output)
    checkpoint = output.with_name("checkpoint.pt")
    if checkpoint.exists():
        raise ReportError(
            f"{output} belongs to a training that did not finish: its resume state "
            f"{checkpoint} is still beside it (the job was killed or failed; a finished "
            f"training deletes it), so its epochs so far would be drawn as the whole "
            f"training. Run your command again with --rerun-incomplete --forcerun "
            f"{output.with_name('encoder.pt')} added: the training continues from its "
            f"checkpoint.")


def read_history(path: str | Path) -> pd.DataFrame:
    """A finished training's ``history.tsv`` (:func:`refuse_unfinished_training`): one row
    per epoch, columns ``epoch``, ``loss`` and more."""
    refuse_unfinished_training(path)
    return pd.read_csv(path, sep="\t")


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


def read_predictions(paths: Iterable[str | Path]) -> pd.DataFrame:
    tables = [pd.read_csv(path, sep="\t", dtype={"participant_id": str, "study": str})
              for path in paths]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
