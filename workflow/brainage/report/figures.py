"""The figures: ``results/figures/<name>.png``, drawn by :func:`make_figures`."""

from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from brainage.io import atomic_path, headless_pyplot, read_npz
from brainage.modalities import modality
from brainage.qc import as_ras, plot_dataset_qc, read_qc_table, thresholds
from brainage.report.pretraining import pretraining_gains, pretraining_runs
from brainage.report.results import (
    ABLATION_TITLES,
    PAPER_SEARCH_BEST,
    cell_label,
    coverage_fraction,
    distinct_labels,
    natural_key,
    read_history,
    read_metrics,
    read_predictions,
    read_search_trials,
    refuse_unfinished_training,
    seed_results,
)
from brainage.report.tables import ablation_table, single_seed
from brainage.report.targets import (
    LOSS_EXPERIMENT,
    MODALITIES_FIGURE,
    PRETRAINING_NAME,
    SEARCH_NAME,
    TRAINING_FIGURE,
    ReportError,
    ablation_figure_name,
)

logger = logging.getLogger(__name__)


#: Coverage levels of the example maps (paper Fig. 8), as fractions of the brain.
EXAMPLE_COVERAGES = (1.00, 0.95, 0.90, 0.80)


#: Age quantiles of the example subjects (paper Fig. 2): the middle of each age quartile,
#: so the four cover the cohort's ages without its extremes.
EXAMPLE_AGE_QUANTILES = (0.125, 0.375, 0.625, 0.875)


#: Modalities of Fig. 2: (key of the input mapping, colour map, colour-bar label).
AGE_EXAMPLE_MODALITIES = (("stiffness", "magma", "stiffness [kPa]"),
                          ("T1w", "gray", "T1w [a.u.]"))


#: Colour of the voxels of an MRE map that have no value in Figs. 2 and 8 (NaN, or the 0
#: the pipeline stores outside a map's support): a grey that magma never takes, so the
#: brain a slab does not cover is not read as 0 kPa. A T1w's 0 background stays black, as
#: in any anatomical image.
NO_VALUE_COLOUR = "0.6"


#: Below this many embedded subjects UMAP is meaningless; PCA is drawn (and said so).
MIN_UMAP_SAMPLES = 4


UMAP_NEIGHBOURS = 15


UMAP_RANDOM_STATE = 0


#: umap-learn computes every pairwise distance below this many samples (its exact path):
#: :func:`exact_neighbours` gives it the same neighbours without its parallel numba sort,
#: whose compilation took 5 s of each embedding-figure job's 13 s.
UMAP_EXACT_BELOW = 4096


def _save(figure, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as temp:
        figure.savefig(temp, dpi=120, bbox_inches="tight")
    headless_pyplot().close(figure)


def _study_colours(studies: Iterable[str]) -> dict[str, Any]:
    """A colour per study, none repeated: figures tell studies apart by colour alone, and
    tab10's eleventh colour is its first (a lab pooling 12 sites saw site 11 as site 1).
    tab10 up to 10 studies, tab20 up to 20, then evenly spaced hues of a continuous map."""
    plt = headless_pyplot()
    names = sorted(set(map(str, studies)), key=natural_key)
    if len(names) <= 20:
        palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        return {study: palette(i) for i, study in enumerate(names)}
    palette = plt.get_cmap("turbo")
    return {study: palette(i / (len(names) - 1)) for i, study in enumerate(names)}


#: Marker shapes by study, in the order of :func:`_study_colours`, for plots where colour
#: alone told studies apart.
STUDY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _legend_below(figure, axis, **options) -> None:
    """The axis's legend under everything drawn below it (tick labels, tilted or not, and
    the axis label): a legend at a fixed offset lay over tilted tick labels."""
    figure.canvas.draw()  # the tick labels' extents exist once drawn
    drawn = axis.get_tightbbox(figure.canvas.get_renderer())
    bottom = axis.transAxes.inverted().transform((drawn.x0, drawn.y0))[1]
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, bottom - 0.02), frameon=False,
                **options)


#: Study legend entries that fit inside an axis without hiding its data (the paper's five
#: studies); a consortium's 15-30 go beside it (:func:`_study_legend`).
LEGEND_INSIDE_MAX = 8


def _study_legend(axis, entries: int) -> None:
    """The study legend of ``entries`` entries: inside the axis for a few studies, beside it
    (to the right, in columns of 25) for more, where inside it covered the bars or points
    and, at 23 studies, the title."""
    if entries <= LEGEND_INSIDE_MAX:
        axis.legend(title="study", fontsize="small")
    else:
        axis.legend(title="study", fontsize="x-small", loc="upper left",
                    bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, ncol=1 + (entries - 1) // 25)


def _upright_long_tick_labels(axis, labels: Sequence[str]) -> None:
    """Turn the x tick labels upright where side by side they would overprint (many
    studies, or names of more than 12 characters, as consortia name their sites): upright,
    a label takes its line height of width, whatever the name's length."""
    if len(labels) > LEGEND_INSIDE_MAX or max(map(len, labels), default=0) > 12:
        axis.tick_params(axis="x", labelrotation=90)


def age_bin_years(ages: pd.Series) -> float:
    """Fig. 3's bin width in years: 5 over an age range of 30 years or more (the paper's
    cohort), 1 from 3 years (children, students), 0.25 below (one school year, whose ages
    5-year bins drew as a single bar)."""
    spread = float(ages.max() - ages.min())
    return 5.0 if spread >= 30 else 1.0 if spread >= 3 else 0.25


def age_bins(ages: pd.Series) -> np.ndarray:
    """Edges on multiples of :func:`age_bin_years` from the youngest age's bin to the first
    multiple above the oldest age: each bar holds the ages from its left edge to just below
    its right one (an oldest age of 18 in an 18-19 bar, not with the 17-year-olds in a
    closed last bin), and no empty bar follows."""
    width = age_bin_years(ages)
    low = width * np.floor(ages.min() / width)
    high = width * (np.floor(ages.max() / width) + 1)
    return np.linspace(low, high, int(round((high - low) / width)) + 1)


def plot_age_distribution(participants: pd.DataFrame, path: str | Path) -> None:
    """Fig. 3: stacked age histogram coloured by study, in bins of :func:`age_bin_years`."""
    plt = headless_pyplot()
    colours = _study_colours(participants["study"])
    ages = participants["age"].astype(float)
    bins = age_bins(ages)
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
    _study_legend(axis, len(colours))
    _save(figure, path)


#: Where the paper's value is drawn, in bar widths right of ours (Figs. 4 and 6): at the same
#: x its diamond and error bar lay over our error bar and seed dots at the paper's scale.
PAPER_OFFSET = 0.3

#: Box-plot medians in black: matplotlib's default orange is a study's or group's colour.
MEDIAN_STYLE = {"color": "black"}


def _ours_label(table: pd.DataFrame) -> str:
    """The legend of our values: one seed draws no error bar, and says so."""
    return "ours (one seed, no sd)" if single_seed(table) else "ours: mean ± sd over seeds"


def plot_ablation(table: pd.DataFrame, seeds: pd.DataFrame, path: str | Path, *,
                  title: str) -> None:
    """Fig. 4a-d style: bar per variant (mean MAE), error bar = sd over seeds, each seed
    as a dot, the paper's value as a hollow diamond where known."""
    plt = headless_pyplot()
    figure, axis = plt.subplots(figsize=(max(4.5, 1.3 * len(table) + 2), 4))
    x = np.arange(len(table))
    # one seed has no sd: no error bar (NaN), not a cap at the mean that reads "sd 0"
    sd = table["mae_std"].to_numpy(float)
    errors = np.nan_to_num(sd)
    bars = axis.bar(x, table["mae_mean"], yerr=sd, capsize=5, color="#4C72B0",
                    alpha=0.85, label=_ours_label(table))
    drawn = [table["mae_mean"].to_numpy(float) + errors, [0.0]]  # what the y axis must show
    for position, variant in zip(x, table["variant"]):
        values = seeds.loc[seeds["variant"] == variant, "mae"].to_numpy(float)
        drawn.append(values)
        axis.scatter(np.full(len(values), position) + np.linspace(-0.12, 0.12, len(values)),
                     values, s=14, color="black", zorder=3,
                     # with one seed the bar is that seed: one legend entry says so
                     label="ours: each seed" if position == 0 and not single_seed(table)
                     else None)
    for bar, mean in zip(bars, table["mae_mean"]):
        axis.annotate(f"{mean:.2f}", (bar.get_x() + bar.get_width() / 2, 0),
                      xytext=(0, 3), textcoords="offset points", ha="center",
                      color="white", fontsize="small", fontweight="bold")
    paper = table["paper_mae_mean"].to_numpy(float)
    paper_sd = np.nan_to_num(table["paper_mae_std"].to_numpy(float))
    drawn.append(paper + paper_sd)
    if np.isfinite(paper).any():  # beside our bar: on it, it hid our error bar and seeds
        axis.errorbar(x + PAPER_OFFSET, paper, yerr=paper_sd, fmt="D", mfc="none",
                      color="#C44E52", capsize=3, label="paper (different data)")
    axis.set_xticks(x, table["label"], rotation=20 if len(table) > 4 else 0, ha="right"
                    if len(table) > 4 else "center")
    axis.set_ylabel("test MAE [years]")
    axis.set_title(title, fontsize="medium")
    # up to the highest seed, not only mean + sd: one seed far from the others (of 5, it
    # can lie 1.8 sd above the mean) was cut off the axis, hiding the spread the dots show
    axis.set_ylim(0, np.nanmax(np.concatenate(drawn)) * 1.1)
    _legend_below(figure, axis, fontsize="small", ncol=3)
    _save(figure, path)


def plot_lambda_sweep(table: pd.DataFrame, path: str | Path) -> None:
    """Fig. 6: MAE against λ (categorical axis in increasing λ, hard neighbourhood last)."""
    plt = headless_pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    x = np.arange(len(table))
    axis.errorbar(x, table["mae_mean"], yerr=table["mae_std"].to_numpy(float),  # NaN: 1 seed
                  fmt="o-", capsize=4, color="#4C72B0", label=_ours_label(table))
    paper = table["paper_mae_mean"].to_numpy(float)
    if np.isfinite(paper).any():
        axis.errorbar(x + PAPER_OFFSET, paper,
                      yerr=np.nan_to_num(table["paper_mae_std"].to_numpy(float)),
                      fmt="D", mfc="none", color="#C44E52", capsize=3,
                      label="paper (different data)")
    axis.set_xticks(x, table["label"])
    axis.set_xlabel("re-weighting exponent λ (λ = 0: Exponential; hard: drop non-neighbours)")
    axis.set_ylabel("test MAE [years]")
    axis.set_title(ABLATION_TITLES["lambda"], fontsize="medium")
    _legend_below(figure, axis, fontsize="small", ncol=2)  # inside, it covered a point
    _save(figure, path)


def load_embeddings(folder: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """``{epoch: {"features" [n, D], "age" [n] years, "subset" [n], "participant_id" [n],
    "features_kind" (model.features; absent in files of older versions)}}`` from
    ``<folder>/epoch-<EEE>.npz``, sorted by epoch, of a finished training
    (:func:`refuse_unfinished_training`)."""
    refuse_unfinished_training(folder)
    embeddings = {}
    for file in sorted(Path(folder).glob("epoch-*.npz")):
        epoch = int(file.stem.split("-")[1])
        try:
            data = read_npz(file)
        except ValueError as error:
            raise ReportError(f"{error}; delete it and rerun the job that wrote it "
                              f"(train_encoder, or pretrain_encoder).") from None
        missing = [k for k in ("features", "age", "subset") if k not in data]
        if missing:
            raise ReportError(f"{file}: lacks array(s) {', '.join(missing)}.")
        embeddings[epoch] = data
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
    neighbours = max(2, min(UMAP_NEIGHBOURS, n - 1))
    with warnings.catch_warnings():
        # tensorflow / n_jobs notices of umap-learn, and that the given neighbours have no
        # search index (needed only by UMAP.transform)
        warnings.simplefilter("ignore")
        import umap

        reducer = umap.UMAP(n_neighbors=neighbours, random_state=random_state, n_jobs=1,
                            precomputed_knn=(exact_neighbours(features, neighbours)
                                             if n < UMAP_EXACT_BELOW else (None, None, None)))
        return reducer.fit_transform(features), "UMAP"


def exact_neighbours(features: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``neighbours`` nearest rows of each row of ``features`` [n, D] (itself first) as
    umap-learn finds them below :data:`UMAP_EXACT_BELOW` samples: its Euclidean distance, a
    stable sort (ties by index). Returns (indices [n, k] int32, distances [n, k])."""
    from sklearn.metrics import pairwise_distances
    from umap.distances import euclidean

    distances = pairwise_distances(features, metric=euclidean)
    indices = np.argsort(distances, axis=1, kind="stable")[:, :neighbours].astype(np.int32)
    return indices, np.take_along_axis(distances, indices, axis=1)


#: How a figure names each ``model.features``.
FEATURES_KIND_NAMES = {"projection": "projection-head", "encoder": "pooled encoder",
                       "regression": "regression-head"}

#: Marker of each subset an embeddings file can hold: a grid cell's training and test
#: subjects, a pretraining run's training and validation subjects.
SUBSET_MARKERS = {"train": "o", "test": "^", "validation": "s"}


def plot_embeddings(embeddings: Mapping[int, Mapping[str, np.ndarray]], path: str | Path, *,
                    cell: str = "", title: str = "Fig. 5",
                    setting: str = "train.embed_epochs") -> None:
    """Fig. 5 (or a pretraining run's figure, by ``title``): one 2D projection per saved
    epoch, coloured by age in years (train ●, test ▲, validation ■).

    ``setting`` names the config key that lists the saved epochs, for the error when there
    are none.
    """
    plt = headless_pyplot()
    epochs = sorted(embeddings)
    if not epochs:
        raise ReportError(f"no embeddings to plot for {cell or path}; set {setting} to "
                          f"epochs it trains.")
    unknown = sorted({str(name) for epoch in epochs for name in embeddings[epoch]["subset"]}
                     - set(SUBSET_MARKERS))
    if unknown:
        raise ReportError(f"embeddings of {cell or path} name subset(s) {', '.join(unknown)}; "
                          f"known: {', '.join(SUBSET_MARKERS)}.")
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
        for name, marker in SUBSET_MARKERS.items():
            chosen = subset == name
            if not chosen.any():
                continue
            axis.scatter(coords[chosen, 0], coords[chosen, 1],
                         c=np.asarray(data["age"], float)[chosen], cmap="viridis", norm=norm,
                         marker=marker, s=22, edgecolors="none",
                         label=f"{name} (n={chosen.sum()})")
        legend = axis.legend(fontsize="x-small", loc="best")
        for handle in legend.legend_handles:  # marker shape only; colour is age
            handle.set_array(None)  # else the age colour map overrides the grey
            handle.set_color("grey")
        axis.set_title(f"epoch {epoch}")
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in list(axes.flat)[len(epochs):]:
        axis.set_visible(False)
    figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes,
                    label="age [years]", shrink=0.8)
    method = " / ".join(sorted(methods))
    note = (f" (PCA: fewer than {MIN_UMAP_SAMPLES} subjects, too few for UMAP)"
            if "PCA" in methods else "")
    # The training cell's model.features: a cell sharing its encoder may read out the other.
    kinds = {str(embeddings[epoch].get("features_kind", "")) for epoch in epochs}
    kind = FEATURES_KIND_NAMES.get(kinds.pop(), "") if len(kinds) == 1 else ""
    figure.suptitle(f"{title}: {method} of the {kind or 'learnt'} features by epoch, "
                    f"{cell}{note}", fontsize="medium")
    _save(figure, path)


def plot_coverage(participants: pd.DataFrame, path: str | Path, *,
                  min_coverage: float | None = None, map_name: str = "stiffness") -> None:
    """Fig. 7: brain coverage (% of the template brain with a value of ``map_name``, the
    map QC measures coverage on: :func:`brainage.modalities.grid_modality`) per study."""
    plt = headless_pyplot()
    coverage = 100 * coverage_fraction(participants)
    colours = _study_colours(participants["study"])
    figure, axis = plt.subplots(figsize=(max(7.0, 0.45 * len(colours)), 4))
    rng = np.random.default_rng(0)
    minimum = -np.inf if min_coverage is None else 100 * min_coverage
    labelled = False
    for i, study in enumerate(colours):
        values = coverage[participants["study"].astype(str) == study].to_numpy(float)
        axis.boxplot(values, positions=[i], widths=0.5, showfliers=False,
                     medianprops=MEDIAN_STYLE)
        jitter = i + rng.uniform(-0.15, 0.15, len(values))
        below = values < minimum
        axis.scatter(jitter[~below], values[~below], s=14, color=colours[study], zorder=3)
        if below.any():  # under qc.exclude_failed: false they stay in the splits: ringed,
            # they can be told from the others
            axis.scatter(jitter[below], values[below], s=30, color=colours[study],
                         edgecolor="#C44E52", linewidth=1.5, zorder=4,
                         label=None if labelled else "below the QC minimum")
            labelled = True
    if min_coverage is not None:
        axis.axhline(100 * min_coverage, color="#C44E52", linestyle="--",
                     label=f"QC minimum ({100 * min_coverage:.0f} %)")
    axis.set_xticks(range(len(colours)),
                    [f"{s}\n(n={int((participants['study'].astype(str) == s).sum())})"
                     for s in colours])
    _upright_long_tick_labels(axis, list(colours))
    axis.set_ylabel("brain coverage [%]")
    axis.set_xlabel("study")
    axis.set_title(f"Fig. 7: brain coverage of the {modality(map_name).description}s by study")
    if min_coverage is not None:  # below the axis: inside, it covered the failing subjects
        _legend_below(figure, axis, fontsize="small", ncol=2)
    _save(figure, path)


def pick_coverage_examples(participants: pd.DataFrame,
                           targets: Sequence[float] = EXAMPLE_COVERAGES) -> list[dict]:
    """The subjects whose coverage is nearest to the targets: distinct subjects with the
    smallest total distance (an optimal assignment) while there are enough, else each
    target's nearest. Returns ``[{"target", "participant_id", "coverage"}]`` (fractions)."""
    from scipy.optimize import linear_sum_assignment

    coverage = coverage_fraction(participants).to_numpy(float)
    ids = participants["participant_id"].to_numpy()
    distance = np.abs(np.asarray(targets, float)[:, None] - coverage[None, :])
    if len(ids) >= len(targets):
        _, chosen = linear_sum_assignment(distance)
    else:
        chosen = distance.argmin(axis=1)
    return [{"target": float(target), "participant_id": ids[index],
             "coverage": float(coverage[index])} for target, index in zip(targets, chosen)]


def plot_coverage_examples(participants: pd.DataFrame, maps: Mapping[str, str | Path],
                           path: str | Path, *, map_name: str = "stiffness") -> None:
    """Fig. 8: registered maps nearest to 100/95/90/80 % coverage; three orthogonal slices
    through the centre of the template grid, one colour scale (the 1st to the 99th
    percentile of the four maps' voxels with a value; grey where a map has none).

    ``map_name``: the modality of ``maps``, which names the colour bar's quantity and unit
    (stiffness in kPa, the damping ratio in 1, T1w in a.u.): the workflow passes the map QC
    measures coverage on (:func:`brainage.modalities.grid_modality`), the first MRE map of
    dataset.modalities, which need not be the stiffness."""

    plt = headless_pyplot()
    examples = pick_coverage_examples(participants)
    volumes = []
    for example in examples:
        participant = example["participant_id"]
        if participant not in maps:
            raise ReportError(f"no registered map for {participant} among the "
                              f"{len(maps)} given to the coverage examples.")
        volumes.append(_display_volume(maps[participant]))
    low, high = _colour_scale(volumes)
    figure, axes = plt.subplots(len(examples), 3, figsize=(9, 2.9 * len(examples)),
                                squeeze=False)
    for row, (example, volume) in enumerate(zip(examples, volumes)):
        for column, (view, plane) in enumerate(_orthogonal_views(volume)):
            axis = axes[row, column]
            image = axis.imshow(plane, cmap=_colour_map("magma"), vmin=low, vmax=high)
            _mark_right(axis, view)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(view)
        axes[row, 0].set_ylabel(f"example {row + 1}\n{100 * example['coverage']:.1f} % "
                                f"(≈{100 * example['target']:.0f} %)", fontsize="small")
    # no participant id in a figure that is shared (as Fig. 2): the job's log names them
    logger.info("Fig. 8's examples, top to bottom: %s", ", ".join(
        f"{example['participant_id']} ({100 * example['coverage']:.1f} %)"
        for example in examples))
    kind = modality(map_name)
    figure.colorbar(image, ax=axes, label=f"{kind.name.replace('_', ' ')} [{kind.unit}]",
                    shrink=0.6, extend="both")
    figure.suptitle(f"Fig. 8: registered {kind.description}s at decreasing brain coverage "
                    f"(grey: no value)",
                    fontsize="medium")
    _save(figure, path)


def pick_age_examples(participants: pd.DataFrame,
                      quantiles: Sequence[float] = EXAMPLE_AGE_QUANTILES) -> list[dict]:
    """Subjects at increasing ages for Fig. 2: those nearest to the given quantiles of the
    cohort's ages (default: the middle of each age quartile), distinct subjects with the
    smallest total distance while there are enough, else each quantile's nearest.

    Returns ``[{"quantile", "target_age", "participant_id", "age"}]`` (ages in years),
    sorted by age.
    """
    from scipy.optimize import linear_sum_assignment

    ages = participants["age"].to_numpy(float)
    if len(ages) == 0:
        raise ReportError("no participants to choose the Fig. 2 examples from.")
    ids = participants["participant_id"].to_numpy()
    targets = np.quantile(ages, np.asarray(quantiles, float))
    distance = np.abs(targets[:, None] - ages[None, :])
    if len(ids) >= len(targets):
        _, chosen = linear_sum_assignment(distance)
    else:
        chosen = distance.argmin(axis=1)
    examples = [{"quantile": float(q), "target_age": float(target),
                 "participant_id": ids[index], "age": float(ages[index])}
                for q, target, index in zip(quantiles, targets, chosen)]
    return sorted(examples, key=lambda example: example["age"])


def _display_volume(path: str | Path) -> np.ndarray:
    """A registered map's voxels (float32; NaN where it has no value: NaN, or the 0 the
    pipeline stores outside a map's support) with its axes in RAS order
    (:func:`brainage.qc.as_ras`): the views then show the anatomy the same way round for a
    template stored LAS (FSL's MNI152, ``template.source: file``) as for nilearn's RAS one,
    as the subjects' QC figures do."""
    import nibabel as nib

    image = nib.load(str(path))
    volume = as_ras(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    return np.where(volume == 0, np.float32(np.nan), volume)


def _colour_scale(volumes: Iterable[np.ndarray]) -> tuple[float, float]:
    """One colour scale for several maps (of :func:`_display_volume`): the 1st and 99th
    percentiles of their voxels with a value, so the scale spans the brain's values (in the
    maps' unit) rather than starting at 0, where a 0.5 kPa ageing effect took a sixth of it;
    (0, 1) where no voxel has a value."""
    values = np.concatenate([volume[np.isfinite(volume)] for volume in volumes])
    if not values.size:
        return 0.0, 1.0
    low, high = (float(value) for value in np.percentile(values, [1, 99]))
    return low, high if high > low else low + 1.0


def _colour_map(name: str):
    """The named matplotlib colour map with the colour of voxels without a value
    (:data:`NO_VALUE_COLOUR`; black for the T1w's ``gray``)."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(
        bad="black" if name == "gray" else NO_VALUE_COLOUR)


def _orthogonal_views(volume: np.ndarray) -> tuple[tuple[str, np.ndarray], ...]:
    """Sagittal, coronal and axial slices through the grid centre (the paper's order, in
    Figs. 2 and 8 alike), rotated for display (anterior/superior up, subject's right on
    the right: :func:`_mark_right`)."""
    centre = [size // 2 for size in volume.shape]
    return (("sagittal", np.rot90(volume[centre[0], :, :])),
            ("coronal", np.rot90(volume[:, centre[1], :])),
            ("axial", np.rot90(volume[:, :, centre[2]])))


def _mark_right(axis, view: str) -> None:
    """An "R" at the subject's right of a coronal or axial view: the views follow the
    neurological convention, which a reader used to the radiological one reads mirrored."""
    if view in ("coronal", "axial"):
        axis.text(0.97, 0.03, "R", transform=axis.transAxes, ha="right", va="bottom",
                  color="white", fontsize="x-small", fontweight="bold")


def plot_age_examples(subjects: Sequence[tuple[str, float, Mapping[str, str | Path]]],
                      path: str | Path) -> None:
    """Fig. 2: three orthogonal views of stiffness and T1w for subjects at increasing ages.

    Parameters
    ----------
    subjects : sequence of ``(participant_id, age, {"stiffness": path, "T1w": path})``
        Registered maps on the template grid (MNI152 2 mm NIfTI): stiffness in kPa, T1w
        in arbitrary units; age in years. Typically the four of :func:`pick_age_examples`.
    path : str or Path
        PNG to write: one row per subject, youngest first; columns stiffness sagittal,
        coronal, axial, then T1w sagittal, coronal, axial, through the grid centre.
        One colour scale per modality (the 1st to the 99th percentile of all subjects'
        voxels with a value), each with its colour bar; grey where a stiffness map has no
        value.
    """

    plt = headless_pyplot()
    rows = sorted(subjects, key=lambda subject: float(subject[1]))
    if not rows:
        raise ReportError("no subjects given to Fig. 2 (stiffness and T1w by age).")
    volumes = []
    for participant, _, files in rows:
        missing = [key for key, _, _ in AGE_EXAMPLE_MODALITIES if key not in files]
        if missing:
            raise ReportError(f"Fig. 2: no registered {' or '.join(missing)} image for "
                              f"{participant}; give {{'stiffness': path, 'T1w': path}}.")
        volumes.append({key: _display_volume(files[key]) for key, _, _ in AGE_EXAMPLE_MODALITIES})
    scales = {key: _colour_scale(volume[key] for volume in volumes)
              for key, _, _ in AGE_EXAMPLE_MODALITIES}

    figure, axes = plt.subplots(len(rows), 6, figsize=(13, 2.3 * len(rows) + 0.8),
                                squeeze=False, layout="constrained")
    for row, ((_, age, _), volume) in enumerate(zip(rows, volumes)):
        for group, (key, colour_map, label) in enumerate(AGE_EXAMPLE_MODALITIES):
            for view_index, (view, plane) in enumerate(_orthogonal_views(volume[key])):
                axis = axes[row, 3 * group + view_index]
                image = axis.imshow(plane, cmap=_colour_map(colour_map), vmin=scales[key][0],
                                    vmax=scales[key][1])
                _mark_right(axis, view)
                axis.set_xticks([])
                axis.set_yticks([])
                if row == 0:
                    axis.set_title(f"{key} {view}", fontsize="small")
            if row == len(rows) - 1:
                figure.colorbar(image, ax=axes[:, 3 * group:3 * group + 3], label=label,
                                shrink=0.6, extend="both")
        # whole years and no participant id: a paper's figure or a shared report shows a
        # person's images, and the id beside an exact age is the key to the lab's records
        # (the job's log names them, for the lab itself)
        axes[row, 0].set_ylabel(f"example {row + 1}\n{float(age):.0f} years",
                                fontsize="small")
    logger.info("Fig. 2's examples, top to bottom: %s", ", ".join(
        f"{participant} ({float(age):.1f} years)" for participant, age, _ in rows))
    figure.suptitle("Fig. 2: stiffness and T1w in three orthogonal views, by increasing age "
                    "(grey: no value)",
                    fontsize="medium")
    _save(figure, path)


def plot_predicted_vs_true(predictions: pd.DataFrame, path: str | Path, *,
                           cell: str = "") -> None:
    """Predicted against true age of the test subjects, coloured by study."""
    plt = headless_pyplot()
    test = predictions[predictions["subset"].astype(str) == "test"]
    if test.empty:
        raise ReportError(f"no test rows in the predictions of {cell or path}.")
    unpredicted = test.loc[~np.isfinite(test["predicted_age"].astype(float)), "participant_id"]
    if len(unpredicted):  # else the MAE and the scatter would quietly leave them out
        raise ReportError(f"the predictions of {cell or path} have no predicted age for "
                          f"test subject(s) {', '.join(map(str, unpredicted))}: rerun that "
                          f"cell's evaluate_encoder job.")
    # every study of the split, tested or not, so a study keeps the colour of Figs. 3 and 7
    colours = _study_colours(predictions["study"])
    figure, axis = plt.subplots(figsize=(5.5, 5))
    for index, (study, colour) in enumerate(colours.items()):
        rows = test[test["study"].astype(str) == study]
        if rows.empty:
            continue
        # a shape as well as a colour: tab10's green and red, blue and purple, are close
        # for colour-blind readers
        axis.scatter(rows["age"], rows["predicted_age"], color=colour, s=22,
                     marker=STUDY_MARKERS[index % len(STUDY_MARKERS)],
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
    _study_legend(axis, test["study"].astype(str).nunique() + 1)  # + the identity line
    _save(figure, path)


def plot_search(trials: pd.DataFrame, path: str | Path) -> None:
    """The random search: each trial at (nn_final, nn_step) coloured by validation MAE
    (a diverged trial, without one, a grey cross), the best trial of each split circled,
    the paper's optimum as a hollow red diamond."""
    plt = headless_pyplot()
    splits = list(dict.fromkeys(trials["split"]))
    figure, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    norm = plt.Normalize(trials["validation_mae"].min(), trials["validation_mae"].max())
    for axis, split in zip(axes.flat, splits):
        rows = trials[trials["split"] == split]
        scored = rows["validation_mae"].notna()
        points = axis.scatter(rows.loc[scored, "nn_final"], rows.loc[scored, "nn_step"],
                              c=rows.loc[scored, "validation_mae"], cmap="viridis_r", norm=norm,
                              s=40)
        if not scored.all():  # a NaN colour draws nothing: mark the diverged trials
            axis.scatter(rows.loc[~scored, "nn_final"], rows.loc[~scored, "nn_step"],
                         marker="x", color="tab:gray", s=40, label="diverged (no score)")
        best = rows.iloc[0]
        axis.scatter([best["nn_final"]], [best["nn_step"]], s=180, facecolors="none",
                     edgecolors="black", linewidths=1.5,
                     label=f"best: {int(best['nn_final'])}, {int(best['nn_step'])} "
                           f"({best['validation_mae']:.2f} years)")
        # hollow: a trial drawn at the paper's optimum keeps its colour visible
        axis.scatter([PAPER_SEARCH_BEST["nn_final"]], [PAPER_SEARCH_BEST["nn_step"]],
                     marker="D", facecolors="none", edgecolors="#C44E52", s=110,
                     linewidths=1.5, label="paper's optimum")
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.set_xlabel("final neighbourhood size NN_final [subjects]")
        axis.set_ylabel("shrink step NN_step [epochs]")
        # the search draws with replacement: repeated settings lie on one point
        settings = len(rows[["nn_final", "nn_step"]].drop_duplicates())
        repeats = f", {settings} distinct (repeats on one point)" if settings < len(rows) else ""
        axis.set_title(f"{split}: {len(rows)} trials{repeats}", fontsize="medium")
    figure.colorbar(points, ax=axes, label="validation MAE [years]")
    for axis in axes.flat:  # under the axes: with 30 trials, any place inside hid one
        _legend_below(figure, axis, fontsize="small")
    figure.suptitle("Random search over the neighbourhood schedule", fontsize="medium")
    _save(figure, path)


def plot_training_loss(histories: Mapping[str, Mapping[int, str | Path]], path: str | Path, *,
                       labels: Mapping[str, str] | None = None) -> None:
    """The training loss per epoch of every trained variant (one panel each): each seed
    thin, the mean over seeds thick. Losses differ in scale (the supervised baseline's is
    in years), hence a panel and a y axis per variant."""
    plt = headless_pyplot()
    histories = {variant: seeds for variant, seeds in histories.items() if seeds}
    if not histories:
        raise ReportError("no training history to plot: no cell of the loss experiment "
                          "trains an encoder (train.epochs > 0).")
    labels = dict(labels or {})
    columns = min(4, len(histories))
    rows = int(np.ceil(len(histories) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows),
                                squeeze=False)
    for axis, (variant, seeds) in zip(axes.flat, histories.items()):
        tables = [read_history(file) for file in seeds.values()]
        for table in tables:
            axis.plot(table["epoch"], table["loss"], color="#4C72B0", alpha=0.35, linewidth=0.8)
        mean = pd.concat(tables).groupby("epoch")["loss"].mean()
        axis.plot(mean.index, mean.to_numpy(), color="#4C72B0", linewidth=2)
        first, last = mean.iloc[0], mean.iloc[-1]
        axis.set_title(f"{labels.get(variant, variant)}\n{first:.3g} -> {last:.3g} "
                       f"({len(tables)} seed{'' if len(tables) == 1 else 's'})", fontsize="small")
        axis.set_xlabel("epoch")
        axis.set_ylabel("training loss")
    for axis in list(axes.flat)[len(histories):]:
        axis.set_visible(False)
    figure.suptitle("Training loss per epoch (thin: one seed; thick: mean over seeds)",
                    fontsize="medium")
    figure.tight_layout()
    _save(figure, path)


def plot_pretraining(histories: Mapping[str, str | Path], runs: pd.DataFrame,
                     gains: pd.DataFrame, seeds: pd.DataFrame | None, path: str | Path) -> None:
    """The pretraining section: each run's training loss per epoch (validation MAE in the
    legend), and per loss the test MAE from scratch and fine-tuned from the pretrained
    encoder (bars: mean over seeds; lines join the two results of one seed)."""
    plt = headless_pyplot()
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(10, 3.6))
    validation = dict(zip(runs["run"], runs["validation_mae"]))
    for run, history in histories.items():
        table = read_history(history)
        curves.plot(table["epoch"], table["loss"], linewidth=1.5,
                    label=f"{run}: validation MAE {validation.get(run, float('nan')):.2f} years")
    curves.set_xlabel("epoch")
    curves.set_ylabel("pretraining loss")
    curves.set_title("Pretraining on T1w", fontsize="medium")
    curves.legend(fontsize="small")
    if gains.empty or seeds is None:
        bars.text(0.5, 0.5, "no Table 3 variant is fine-tuned\nbeside the same one from scratch",
                  ha="center", va="center", transform=bars.transAxes)
        bars.set_axis_off()
    else:
        cells = seeds[seeds["experiment"] == LOSS_EXPERIMENT]
        for position, pair in enumerate(gains.itertuples(index=False)):
            x = np.array([position - 0.18, position + 0.18])
            means = [pair.mae_scratch_mean, pair.mae_pretrained_mean]
            bars.bar(x, means, width=0.34, color=["#999999", "#4C72B0"])
            scratch = cells[cells["variant"] == pair.scratch_variant].set_index("seed")["mae"]
            tuned = cells[cells["variant"] == pair.pretrained_variant].set_index("seed")["mae"]
            for seed in sorted(set(scratch.index) & set(tuned.index)):
                bars.plot(x, [scratch[seed], tuned[seed]], color="black", linewidth=0.8,
                          marker="o", markersize=3)
        bars.set_xticks(range(len(gains)))
        bars.set_xticklabels([f"{label}\n(from {run})" for label, run in
                              zip(gains["label"], gains["run"])], fontsize="small")
        bars.set_ylabel("test MAE [years]")
        bars.set_title("From scratch (grey) and fine-tuned (blue)", fontsize="medium")
    figure.tight_layout()
    _save(figure, path)


def by_participant(paths: Iterable[str | Path]) -> dict[str, str]:
    """``{participant_id: path}`` of files the pipeline made and named ``sub-<label>_...``
    (rule make_figures takes the maps so, as inputs: its params, which the report shows,
    would list every training subject)."""
    found = {}
    for path in paths:
        match = re.match(r"(sub-[A-Za-z0-9]+)_", Path(path).name)
        if match is None:
            raise ValueError(f"{path}: a file the pipeline made is named sub-<label>_...")
        found[match[1]] = str(path)
    return found


def make_figures(*, metrics: Sequence[str | Path], participants: str | Path,
                 qc: str | Path, maps: Mapping[str, str | Path],
                 predictions: Sequence[str | Path],
                 settings: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 focus: str, qc_thresholds: Mapping[str, float],
                 outputs: Mapping[str, str | Path],
                 search: Sequence[str | Path] = (),
                 histories: Mapping[str, Mapping[int, str | Path]] | None = None,
                 modality_maps: Mapping[str, Mapping[str, str | Path]] | None = None,
                 pretraining: Mapping[str, Mapping[str, str | Path]] | None = None,
                 map_name: str = "stiffness") -> None:
    """Draw every figure of the configuration but the UMAPs (rule make_figures; the UMAPs
    are :func:`plot_embeddings` jobs of their own: :func:`~brainage.report.targets.is_umap_figure`).

    Parameters
    ----------
    metrics : every grid cell's ``metrics.json``.
    participants : one split's ``participants.tsv`` (cohort, coverage as fraction 0-1).
    qc : ``results/qc/qc.tsv``.
    maps : ``{participant_id: registered map}`` (MNI152 2 mm) of modality ``map_name``.
    predictions : the focus cell's ``predictions.tsv`` of every split.
    settings : :func:`experiment_settings` of the config.
    focus : label of the focus cell, e.g. ``table3/adaptive/seed-0``.
    qc_thresholds : config ``qc`` (min_dice, min_correlation, min_coverage).
    outputs : ``{figure name: png path}`` for the names of :func:`report_names`.
    search : every split's ``trials.tsv`` of the random search (when enabled).
    histories : ``{variant: {seed: history.tsv}}`` of the loss experiment's trained
        encoders (first split).
    modality_maps : ``{participant_id: {"stiffness": path, "T1w": path}}``, registered
        (Fig. 2).
    pretraining : ``{run: {"metrics": metrics.json, "history": history.tsv}}`` of every
        pretraining run (config pretrain).
    map_name : the modality of ``maps``, whose coverage QC measures
        (:func:`brainage.modalities.grid_modality` of dataset.modalities): it labels
        Figs. 7 and 8.
    """
    started = time.perf_counter()
    cohort = pd.read_csv(participants, sep="\t", dtype={"participant_id": str, "study": str})
    seeds = seed_results(read_metrics(metrics)) if metrics else None
    for name, path in outputs.items():
        begun = time.perf_counter()
        if name == "fig3_age_distribution":
            plot_age_distribution(cohort, path)
        elif name == "fig7_coverage":
            plot_coverage(cohort, path, min_coverage=qc_thresholds.get("min_coverage"),
                          map_name=map_name)
        elif name == "fig8_coverage_examples":
            plot_coverage_examples(cohort, maps, path, map_name=map_name)
        elif name == MODALITIES_FIGURE:
            plot_age_examples([(example["participant_id"], example["age"],
                                (modality_maps or {}).get(example["participant_id"], {}))
                               for example in pick_age_examples(cohort)], path)
        elif name == "qc_overview":
            plot_dataset_qc(read_qc_table(qc), path, minimums=thresholds(qc_thresholds))
        elif name == "predicted_vs_true":
            plot_predicted_vs_true(read_predictions(predictions), path, cell=focus)
        elif name == SEARCH_NAME:
            plot_search(read_search_trials(search), path)
        elif name == PRETRAINING_NAME:
            runs = dict(pretraining or {})
            gains = (pretraining_gains(seeds, settings.get(LOSS_EXPERIMENT, {}))
                     if seeds is not None else pd.DataFrame())
            plot_pretraining({run: files["history"] for run, files in runs.items()},
                             pretraining_runs(runs), gains, seeds, path)
        elif name == TRAINING_FIGURE:
            labels = distinct_labels({variant: cell_label(cell) for variant, cell
                                      in settings.get(LOSS_EXPERIMENT, {}).items()})
            plot_training_loss(histories or {}, path, labels=labels)
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
