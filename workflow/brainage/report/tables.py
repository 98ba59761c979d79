"""The tables: ``results/tables/<name>.csv`` (raw numbers) and ``.md``/``.tex``
(formatted), written atomically by :func:`make_tables`."""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from brainage.io import atomic_path
from brainage.normalise import split_name_pattern
from brainage.report.pretraining import pretraining_gains, pretraining_runs
from brainage.report.results import (
    ABLATION_TITLES,
    BASELINE_LABELS,
    PAPER_ABLATIONS,
    PAPER_NOTE,
    PAPER_SEARCH_BEST,
    PAPER_TABLE2_TOTAL,
    PAPER_TABLE3,
    baseline_key,
    baseline_label,
    cell_label,
    check_same_test_subjects,
    coverage_fraction,
    display_loss_names,
    initialisation,
    natural_key,
    paper_value,
    read_metrics,
    read_search_trials,
    seed_results,
    summarise_seeds,
    variant_labels,
)
from brainage.report.targets import (
    LOSS_EXPERIMENT,
    PRETRAINING_GAIN,
    PRETRAINING_NAME,
    REFERENCE_LOSS,
    SEARCH_NAME,
    ReportError,
)

logger = logging.getLogger(__name__)


def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table3_losses(seeds: pd.DataFrame, *, experiment: str = LOSS_EXPERIMENT,
                  settings: Mapping[str, Mapping[str, Any]] | None = None,
                  display_names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Paper Table 3 from our cells: one row per variant of the loss experiment, the
    paper's losses first (in its order), then the baselines on the same split, seeds and
    test subjects.

    Parameters
    ----------
    seeds : per-seed results (:func:`brainage.report.results.seed_results`).
    settings : ``{variant: cell settings}`` of the experiment (names the baselines); without
        it, rows are named by their loss.

    Raises
    ------
    ReportError
        No results for the experiment, or none for a variant of ``settings``, or cells
        that pooled different numbers of test subjects (a split's metrics.json missing).

    Returns
    -------
    pandas.DataFrame
        Columns ``loss, n_seeds, mae_mean, mae_std`` (MAE in years, sd over seeds), then
        ``kind`` (contrastive or baseline), ``variant, label, init, neighbourhood``
        (Adaptive Neighborhoods' nn_final/nn_step as trained), ``rmse_mean, pearson_r_mean,
        r2_mean, gap_age_slope_mean`` (age bias: slope of the gap against age),
        ``n_test, seeds, paper_mae_mean, paper_mae_std`` (the paper's fine-tuned value,
        beside a loss's fine-tuned row where it has one, else beside its from-scratch
        row), ``mae_study_<study>`` and
        ``n_study_<study>`` (the study's test subjects).
        ``loss`` is the loss name (a baseline's key for baselines), or
        ``<loss>:<variant>`` where two rows would share one.
    """
    display_names = dict(display_names or display_loss_names())
    cells = seeds[seeds["experiment"] == experiment]
    if cells.empty:
        raise ReportError(f"no results for experiment '{experiment}'; it must be enabled "
                          f"in the config (experiments.{experiment}).")
    missing = [v for v in (settings or {}) if v not in set(cells["variant"])]
    if missing:
        raise ReportError(f"experiment '{experiment}': no results for variant(s) "
                          f"{', '.join(missing)}; their metrics.json files are missing.")
    check_same_test_subjects(cells, experiment)  # the rows compare the same subjects
    order = list(PAPER_TABLE3) + list(BASELINE_LABELS)
    new_losses: dict[str, int] = {}  # a loss the paper lacks -> its rank in config order
    rows = []
    for variant, group in cells.groupby("variant", sort=False):
        cell = (settings or {}).get(variant)
        key = baseline_key(cell) if cell is not None else None
        if cell is None and group["kind"].iloc[0] == "baseline":
            # no settings to say which baseline: its metrics carry the config's loss name
            # (a baseline trains with none), so the row goes by its variant, off the paper
            key = variant
        base = key or group["loss"].iloc[0]  # the loss (or baseline) the row belongs to
        start = initialisation(cell) if cell is not None else "scratch"
        fine_tuned = key is None and start != "scratch"
        name = f"{base}:{variant}" if fine_tuned else base  # never the loss's own name
        if cell is not None:
            label = cell_label(cell, display_names)
        else:
            label = baseline_label(key) if key is not None else display_names.get(base, base)
        paper = PAPER_TABLE3.get(base, (np.nan, np.nan)) if key is None else (np.nan, np.nan)
        rows.append({"loss": name, **summarise_seeds(group),
                     "kind": "baseline" if key is not None else group["kind"].iloc[0],
                     "variant": variant, "label": label, "init": start,
                     "paper_mae_mean": paper[0], "paper_mae_std": paper[1],
                     "_base": base, "_fine_tuned": fine_tuned,
                     # the paper's losses in its order, then the losses it lacks in
                     # config order (they sorted below the baselines), each fine-tuned row
                     # right after its loss trained from scratch; then the baselines, an
                     # unnamed one last
                     "_order": ((0, order.index(base), fine_tuned) if base in PAPER_TABLE3
                                else (1, new_losses.setdefault(base, len(new_losses)),
                                      fine_tuned) if key is None
                                else (2, order.index(base), 0) if base in order
                                else (3, 0, 0))})
    table = pd.DataFrame(rows)
    # the paper fine-tuned every encoder: where a loss has a fine-tuned row, the paper's
    # value stands beside that row only, not beside the same loss trained from scratch
    tuned = set(table.loc[table["_fine_tuned"], "_base"])
    scratch_of_tuned = table["_base"].isin(tuned) & ~table["_fine_tuned"]
    table.loc[scratch_of_tuned, ["paper_mae_mean", "paper_mae_std"]] = np.nan
    table = table.drop(columns=["_base", "_fine_tuned"])
    repeated = table["loss"].duplicated(keep=False)
    table.loc[repeated, "loss"] = table.loc[repeated, "loss"] + ":" + table.loc[repeated,
                                                                               "variant"]
    table.loc[repeated, "label"] = table.loc[repeated, "label"] + " (" + table.loc[
        repeated, "variant"] + ")"
    table = table.sort_values("_order", kind="stable").drop(columns="_order")
    first = ["loss", "n_seeds", "mae_mean", "mae_std", "kind", "variant", "label", "init",
             "neighbourhood", "rmse_mean", "pearson_r_mean", "r2_mean", "gap_age_slope_mean",
             "n_test", "seeds", "paper_mae_mean", "paper_mae_std"]
    return table[first + [c for c in table.columns if c not in first]].reset_index(drop=True)


def reference_variant(seeds: pd.DataFrame, *, experiment: str = LOSS_EXPERIMENT,
                      loss: str = REFERENCE_LOSS) -> str | None:
    """The variant of ``experiment`` that trains ``loss`` (the one named so if several).

    Baselines are never the reference: their metrics carry the config's loss name too
    (``loss.name`` defaults to adaptive), although they train with no loss at all."""
    cells = seeds[(seeds["experiment"] == experiment) & (seeds["loss"] == loss)]
    if "kind" in cells:
        cells = cells[cells["kind"] != "baseline"]
    variants = list(dict.fromkeys(cells["variant"]))
    if not variants:
        return None
    return loss if loss in variants else variants[0]


def subject_errors(metrics: pd.DataFrame, *, experiment: str = LOSS_EXPERIMENT,
                   predictions: Sequence[str | Path] = ()) -> pd.DataFrame:
    """Each test subject's absolute error (years) in every cell of ``experiment``, from the
    ``predictions.tsv`` beside each ``metrics.json`` of ``metrics`` (:func:`read_metrics`;
    ``predictions``: those files, where the caller has them, else the neighbours).

    Returns columns variant, seed, participant_id, abs_error: one row per cell and test
    subject, the mean over the cell's splits that test the subject (one under every split
    scheme: a subject is tested once per seed).

    Raises
    ------
    ReportError
        A cell's ``predictions.tsv`` is missing or lacks a column: rerun its
        evaluate_encoder.
    """
    given = {Path(path).parent: Path(path) for path in predictions}
    columns = ["participant_id", "age", "predicted_age", "subset"]
    frames = []
    for row in metrics[metrics["experiment"] == experiment].itertuples():
        path = given.get(Path(row.path).parent, Path(row.path).with_name("predictions.tsv"))
        try:
            table = pd.read_csv(path, sep="\t", dtype={"participant_id": str})
        except FileNotFoundError:
            raise ReportError(f"{path} is missing beside {row.path}; rerun the cell's "
                              f"evaluate_encoder job.") from None
        lacking = [column for column in columns if column not in table]
        if lacking:
            raise ReportError(f"{path} lacks column(s) {', '.join(lacking)}; rerun the cell's "
                              f"evaluate_encoder job (delete its metrics.json first).")
        test = table[table["subset"] == "test"]
        frames.append(pd.DataFrame({
            "variant": row.variant, "seed": int(row.seed),
            "participant_id": test["participant_id"].to_numpy(),
            "abs_error": (test["predicted_age"] - test["age"]).abs().to_numpy(float)}))
    if not frames:
        return pd.DataFrame(columns=["variant", "seed", "participant_id", "abs_error"])
    return (pd.concat(frames, ignore_index=True)
            .groupby(["variant", "seed", "participant_id"], sort=False, as_index=False)
            ["abs_error"].mean())


def holm_adjusted(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of ``p_values`` (NaN ignored and kept): the family-wise
    error over the rows of a table, without assuming the tests independent."""
    p = np.asarray(p_values, float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    steps = (len(order) - np.arange(len(order))) * p[order]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return adjusted


#: Subject-level columns of :func:`paired_comparison`.
SUBJECT_COLUMNS = ["n_subjects", "subject_mean_difference", "subject_ci95_low",
                   "subject_ci95_high", "subject_p_value", "subject_p_holm",
                   "subjects_reference_better"]


def paired_comparison(seeds: pd.DataFrame, *, experiment: str = LOSS_EXPERIMENT,
                      reference: str | None = None,
                      errors: pd.DataFrame | None = None) -> pd.DataFrame:
    """Adaptive Neighborhoods against each other loss, paired over matching seeds and,
    with ``errors`` (:func:`subject_errors`), over test subjects.

    Over seeds: the MAE differences ``d = MAE(baseline) - MAE(reference)`` (years;
    positive: the reference is better) of the seeds both have, their mean and sd, a paired
    t-test (``scipy.stats.ttest_rel``, two-sided; NaN with fewer than 2 pairs or zero
    spread) and how many seeds the reference wins. Every seed tests the same subjects, so
    this measures retraining on them only; a baseline that does not train (one value for
    every seed) makes it a one-sample test whose p falls with more seeds however few the
    test subjects.

    Over subjects (what generalises to new subjects of the same kind): each test
    subject's absolute error averaged over the common seeds, the mean of the differences
    (baseline - reference) with a paired t 95 % interval, the Wilcoxon signed-rank p
    (two-sided; NaN where every difference is 0), that p Holm-adjusted over the table's
    rows (:func:`holm_adjusted`), and the subjects the reference predicts better.

    Returns
    -------
    pandas.DataFrame
        Columns reference, baseline, n_pairs, mean_difference, sd_difference,
        t_statistic, p_value, reference_wins, then :data:`SUBJECT_COLUMNS` (NaN without
        ``errors``). No rows when the experiment has no reference variant.
    """
    from scipy import stats

    columns = ["reference", "baseline", "n_pairs", "mean_difference", "sd_difference",
               "t_statistic", "p_value", "reference_wins", *SUBJECT_COLUMNS]
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
        if len(common) >= 2 and np.ptp(differences) > _rounding(differences):
            result = stats.ttest_rel(baseline_mae[common], reference_mae[common])
            t_statistic, p_value = float(result.statistic), float(result.pvalue)
        rows.append({"reference": reference, "baseline": baseline, "n_pairs": len(common),
                     "mean_difference": float(differences.mean()) if len(common) else np.nan,
                     "sd_difference": float(differences.std(ddof=1)) if len(common) > 1
                     else np.nan,
                     "t_statistic": t_statistic, "p_value": p_value,
                     "reference_wins": int(np.sum(differences > 0)),
                     **_over_subjects(errors, reference, baseline, common)})
    paired = pd.DataFrame(rows, columns=columns)
    paired["subject_p_holm"] = holm_adjusted(paired["subject_p_value"])
    return paired


def _rounding(differences: np.ndarray) -> float:
    """Differences (years) closer than this are equal up to rounding: spread or size below
    it leave a t statistic or a signed-rank test undefined."""
    return 1e-9 * max(1.0, float(np.abs(differences).max()))


def _over_subjects(errors: pd.DataFrame | None, reference: str, baseline: str,
                   seeds: Sequence[int]) -> dict[str, float]:
    """:data:`SUBJECT_COLUMNS` of one row of :func:`paired_comparison` (Holm's p is set
    over the rows afterwards)."""
    from scipy import stats

    empty = dict.fromkeys(SUBJECT_COLUMNS, np.nan)
    if errors is None or not len(seeds):
        return empty
    shared = errors[errors["seed"].isin(seeds)]

    def per_subject(variant: str) -> pd.Series:
        return shared[shared["variant"] == variant].groupby("participant_id")["abs_error"].mean()

    mine, other = per_subject(reference), per_subject(baseline)
    subjects = mine.index.intersection(other.index)
    if subjects.empty:
        return empty
    differences = (other[subjects] - mine[subjects]).to_numpy(float)
    mean = float(differences.mean())
    low = high = p_value = np.nan
    if len(differences) >= 2 and np.ptp(differences) > _rounding(differences):
        half = (stats.t.ppf(0.975, len(differences) - 1) * differences.std(ddof=1)
                / np.sqrt(len(differences)))
        low, high = mean - half, mean + half
    # one subject is no test (scipy gives p 1, which would count in Holm's adjustment)
    if len(differences) >= 2 and np.any(np.abs(differences) > _rounding(differences)):
        p_value = float(stats.wilcoxon(differences).pvalue)
    return {"n_subjects": len(differences), "subject_mean_difference": mean,
            "subject_ci95_low": low, "subject_ci95_high": high, "subject_p_value": p_value,
            "subject_p_holm": np.nan,
            "subjects_reference_better": int(np.sum(differences > 0))}


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
    check_same_test_subjects(cells, experiment)
    labels = variant_labels(variant_settings)
    rows = []
    for variant, settings in variant_settings.items():
        paper = paper_value(experiment, settings)
        row = {"variant": variant, "label": labels.loc[variant, "label"],
               "setting": labels.loc[variant, "setting"],
               **summarise_seeds(cells[cells["variant"] == variant]),
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
    """Paper Table 2 for our cohort: one row per study plus a ``Total`` row (``Total (all
    studies)`` beside a study named Total).

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
    coverage = coverage_fraction(participants) if "coverage" in participants else None

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

    studies = sorted(participants["study"].astype(str).unique(), key=natural_key)
    rows = [row(study, participants[participants["study"].astype(str) == study])
            for study in studies]
    # a consortium may have a study called TOTAL: its row and the cohort's stay apart
    total = ("Total (all studies)" if any(study.casefold() == "total" for study in studies)
             else "Total")
    rows.append(row(total, participants))
    return pd.DataFrame(rows)


def numeric_columns(display: pd.DataFrame) -> list[bool]:
    """Whether each column of ``display`` (formatted strings) holds numbers only: those are
    right-aligned, in the Markdown and the LaTeX alike."""
    def numeric(value) -> bool:
        try:
            float(str(value))
        except ValueError:
            return False
        return True

    return [bool(len(display)) and all(map(numeric, display[column]))
            for column in display.columns]


def markdown_table(display: pd.DataFrame) -> str:
    """``display`` (formatted strings) as a Markdown table, the strings as they are:
    tabulate reprints a column whose cells all look numeric ("0.390" as 0.39), so that is
    off, and such columns are right-aligned as tabulate aligns numbers. A ``|`` in a cell
    is escaped."""
    alignment = ["right" if number else "left" for number in numeric_columns(display)]
    # a "|" in a cell (a study named "ADNI|3T") would start another column
    escaped = display.astype(str).apply(lambda column: column.str.replace("|", r"\|"))
    escaped.columns = [str(name).replace("|", r"\|") for name in display.columns]
    return escaped.to_markdown(index=False, disable_numparse=True, colalign=alignment)


#: A text column with a cell longer than this many characters is set as a paragraph of
#: WRAPPED_COLUMN_WIDTH in the LaTeX: an ``l`` column never breaks its line, and Table 3's
#: per-study MAEs of a consortium of 23 studies made a cell of 330 characters.
WRAP_AFTER_CHARACTERS = 60
WRAPPED_COLUMN_WIDTH = "6cm"


def write_table(table: pd.DataFrame, display: pd.DataFrame, stem: str | Path, *,
                title: str, notes: Sequence[str] = (),
                extra_markdown: str = "") -> dict[str, str]:
    """Write ``<stem>.csv`` (``table``: raw numbers), ``<stem>.md`` and ``<stem>.tex``
    (``display``: formatted strings) atomically; the ``notes`` (what the numbers are: mean
    and sd over what, the test subjects, the test used) go under the table in both the
    Markdown and the LaTeX. Returns ``{ext: path}``."""
    stem = Path(stem)
    paths = {ext: str(stem.with_name(stem.name + ext)) for ext in (".csv", ".md", ".tex")}
    with atomic_path(paths[".csv"]) as temp:
        table.to_csv(temp, index=False, float_format="%.6g")
    markdown = [f"# {title}", "", markdown_table(display) if len(display) else "(no rows)", ""]
    markdown += [f"{note}  " if i < len(notes) - 1 else note for i, note in enumerate(notes)]
    if extra_markdown:
        markdown += ["", extra_markdown]
    with atomic_path(paths[".md"]) as temp:
        temp.write_text("\n".join(markdown).rstrip() + "\n", encoding="utf-8")
    # pandas escapes the cells, not the caption: an experiment's name (my_ablation) names
    # it; LaTeX numbers the table itself ("Table 3: Table 3: ..." otherwise)
    caption = _escape_latex(re.sub(r"^Table \w+: ", "", title))
    alignment = "".join(
        "r" if number else f"p{{{WRAPPED_COLUMN_WIDTH}}}"
        if display[column].astype(str).str.len().max() > WRAP_AFTER_CHARACTERS else "l"
        for column, number in zip(display.columns, numeric_columns(display)))
    latex = display.to_latex(index=False, escape=True, caption=caption,
                             label=f"tab:{stem.name}", column_format=alignment or "l")
    if notes:  # a table pasted into a paper keeps what its numbers are
        latex = latex.replace("\\end{table}", "\\par\\smallskip\\footnotesize "
                              + " ".join(map(_escape_latex, notes)) + "\n\\end{table}")
    # a minus sign, not a hyphen, before a number ("-0.37", "[-2.231, ...]")
    latex = re.sub(r"(?<![\w.\\])-(?=\d)", lambda _: r"\ensuremath{-}", latex)
    # a row starting with "[" ("[3T] pilot") would be read as the length argument of the
    # \\ or \midrule before it
    latex = re.sub(r"(?m)^\[", lambda _: "{}[", latex)
    for character, command in _LATEX_UNICODE.items():
        latex = latex.replace(character, command)
    with atomic_path(paths[".tex"]) as temp:
        temp.write_text(latex, encoding="utf-8")
    return paths


#: LaTeX's special characters, as pandas' ``to_latex(escape=True)`` writes them.
_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                   "^": r"\textasciicircum{}"}


#: The non-ASCII characters of the tables' labels, headers and values, written so that
#: pdflatex, which stops at a Unicode character it has no definition for, reads them.
#: \ensuremath, not $...$: two neighbours ("λ→∞") gave $\lambda$$\to$, and "$$" in a
#: table cell is an empty formula that leaves \to in text mode.
_LATEX_UNICODE = {"±": r"\ensuremath{\pm}", "λ": r"\ensuremath{\lambda}",
                  "→": r"\ensuremath{\to}", "∞": r"\ensuremath{\infty}",
                  "Δ": r"\ensuremath{\Delta}", "−": r"\ensuremath{-}",
                  "≈": r"\ensuremath{\approx}", "×": r"\ensuremath{\times}",
                  "²": r"\ensuremath{^2}", "–": "--"}


def _escape_latex(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(character, character) for character in str(text))


def _mean_sd_column(table: pd.DataFrame, mean: str, sd: str, digits: int = 3) -> list[str]:
    return [format_mean_sd(m, s, digits) for m, s in zip(table[mean], table[sd])]


def _per_study(table: pd.DataFrame) -> list[str]:
    columns = sorted((c for c in table.columns if c.startswith("mae_study_")), key=natural_key)
    return ["; ".join(f"{column[len('mae_study_'):]} {row[column]:.1f}" for column in columns
                      if np.isfinite(row[column])) or "–"
            for _, row in table.iterrows()]


def single_seed(table: pd.DataFrame) -> bool:
    """Whether every row of a results table comes from one seed (no sd, no error bar)."""
    return "n_seeds" in table and bool((table["n_seeds"] <= 1).all())


def _over_seeds(table: pd.DataFrame) -> str:
    """How a table's MAE column summarises its seeds: one seed gives no sd."""
    return "one seed (no sd)" if single_seed(table) else "mean ± sd over seeds"


def _study_counts(table: pd.DataFrame, studies: Collection[str] = ()) -> str:
    """" (study1 3, study2 2)": the test subjects behind each per-study MAE, when every
    row has the same counts (it does on one split scheme), and the cohort's ``studies``
    without a test subject (too small for a test place), which have no per-study MAE; ""
    when unknown (metrics of an older version) or when the rows differ."""
    columns = sorted((c for c in table.columns if c.startswith("n_study_")), key=natural_key)
    counts = table[columns].drop_duplicates() if columns else pd.DataFrame()
    if len(counts) != 1 or counts.isna().to_numpy().any():
        return ""
    tested = {column[len("n_study_"):]: int(count)
              for column, count in counts.iloc[0].items() if count > 0}
    untested = sorted(set(studies) - set(tested), key=natural_key)
    return (" (" + ", ".join(f"{study} {count}" for study, count in tested.items()) + ")"
            + (f"; not tested (no test subject): {', '.join(untested)}" if untested else ""))


#: Under leave-one-study-out no test subject's study has training subjects, so the
#: study-mean read-out falls back to the training mean (brainage.readout.Readout).
STUDY_MEAN_UNDER_LOSO = ("Leave-one-study-out: no test subject's study has training "
                         "subjects, so the study-mean baseline predicts the training mean "
                         "age, as the training-mean row does; under this scheme it measures "
                         "nothing of site identity.")


#: With one study the study-mean read-out's one mean is the training mean.
STUDY_MEAN_OF_ONE_STUDY = ("One study: the study-mean baseline predicts the training mean "
                           "age, as the training-mean row does, and measures nothing of "
                           "site identity.")
#: ... and its paired comparison would be the training-mean row's, tested twice.
STUDY_MEAN_LEFT_OUT = ("Table 3b leaves the study-mean row out: its comparison would be the "
                       "training-mean row's, counted twice in Holm's adjustment.")


def write_table3(table: pd.DataFrame, paired: pd.DataFrame, table_stem: str | Path,
                 paired_stem: str | Path, *, leave_one_study_out: bool = False,
                 one_study: bool = False, studies: Collection[str] = ()) -> None:
    """Table 3 (ours beside the paper's, labelled; the baselines on the same split below the
    losses) and the paired comparison; ``leave_one_study_out`` (split scheme ``loso``) or
    ``one_study`` (a cohort of one study): the study-mean baseline is the training mean (a
    note says so), and Table 3b leaves it out where the training-mean row is there too.
    ``studies``: the cohort's, so that the note names those without a test subject."""
    study_mean = table["label"] == baseline_label("study_mean")
    study_mean_note = ([STUDY_MEAN_UNDER_LOSO if leave_one_study_out
                        else STUDY_MEAN_OF_ONE_STUDY]
                       if (leave_one_study_out or one_study) and study_mean.any() else [])
    if study_mean_note and (table["label"] == baseline_label("train_mean")).any():
        paired = paired[~paired["baseline"].isin(set(table.loc[study_mean, "variant"]))
                        ].reset_index(drop=True)
        paired["subject_p_holm"] = holm_adjusted(paired["subject_p_value"])
        study_mean_note.append(STUDY_MEAN_LEFT_OUT)
    # Table 3's order, not the order of the metrics files a caller read
    order = {variant: rank for rank, variant in enumerate(table["variant"])}
    paired = paired.sort_values("baseline", key=lambda names: names.map(order),
                                kind="stable", ignore_index=True)
    display = pd.DataFrame({
        "Loss or baseline": table["label"],
        "Seeds": table["n_seeds"],
        "Initialisation": table["init"].map(_initialisation_text),
        "MAE [years], ours": _mean_sd_column(table, "mae_mean", "mae_std"),
        "MAE per study [years]": _per_study(table),
        "Age bias (gap-age slope)": [_format_number(v, 2) for v in table["gap_age_slope_mean"]],
        "r, ours": [_format_number(v, 3) for v in table["pearson_r_mean"]],
        "MAE [years], paper (different data)": _mean_sd_column(table, "paper_mae_mean",
                                                               "paper_mae_std"),
    })
    # The paper's losses this config does not train keep their row, marked as such, so
    # the paper's whole Table 3 stays readable beside ours.
    ours = {str(loss).split(":")[0] for loss in table["loss"]}
    names = display_loss_names()
    not_run = pd.DataFrame([{
        "Loss or baseline": f"{names.get(loss, loss)} (not run here)", "Seeds": 0,
        "Initialisation": "–",
        "MAE [years], ours": "–", "MAE per study [years]": "–",
        "Age bias (gap-age slope)": "–", "r, ours": "–",
        "MAE [years], paper (different data)": format_mean_sd(*PAPER_TABLE3[loss]),
    } for loss in PAPER_TABLE3 if loss not in ours], columns=display.columns)
    display = pd.concat([display, not_run], ignore_index=True)
    baselines = bool((table["kind"] == "baseline").any())
    notes = [f"Ours: test MAE, {_over_seeds(table)}; {int(table['n_test'].iloc[0])} test "
             f"subjects{_study_counts(table, studies)}. "
             + ("Baselines: the same split, seeds, test subjects and read-out path as the "
                "losses. " if baselines else "No baseline was configured: a loss's MAE "
                "stands alone. ")
             + "Age bias: least-squares slope of (predicted − true age) against age on the "
               "test subjects (0 = unbiased, −1 = a constant prediction); it and r are "
               "means over seeds."
             + (" The sd over seeds is the spread of retraining on the same test subjects, "
                "not an uncertainty over subjects: Table 3b compares the rows over test "
                "subjects." if (table["n_seeds"] > 1).any() else ""),
             PAPER_NOTE, *study_mean_note]
    schedules = [f"{label}: {schedule}" for label, schedule
                 in zip(table["label"], table["neighbourhood"]) if isinstance(schedule, str)]
    if schedules:
        notes.append("Adaptive Neighborhoods' schedule as trained (\"or\": seeds or "
                     "splits differ): " + "; ".join(schedules) + ".")
    labels = dict(zip(table["variant"], table["label"]))
    write_table(table, display, table_stem,
                title=f"Table 3: contrastive losses{' and baselines' if baselines else ''}, "
                      f"test MAE",
                notes=notes, extra_markdown=_paired_markdown(paired, labels))
    paired_display = pd.DataFrame({
        "Reference": paired["reference"].map(lambda v: labels.get(v, v)),
        "Compared with": paired["baseline"].map(lambda v: labels.get(v, v)),
        "Pairs": paired["n_pairs"],
        "ΔMAE [years] (other − reference)": _mean_sd_column(paired, "mean_difference",
                                                            "sd_difference"),
        "t": [_format_number(v, 2) for v in paired["t_statistic"]],
        "p": [_format_number(v, 3) for v in paired["p_value"]],
        "Reference wins": [f"{w}/{n}" for w, n in zip(paired["reference_wins"],
                                                      paired["n_pairs"])],
        "Test subjects": [_count_text(n) for n in paired["n_subjects"]],
        "ΔMAE [years] over subjects [95 % CI]": [
            _interval_text(*values) for values in
            zip(paired["subject_mean_difference"], paired["subject_ci95_low"],
                paired["subject_ci95_high"])],
        "p, subjects (Holm)": [
            f"{_format_number(p, 3)} ({_format_number(holm, 3)})" if np.isfinite(p) else "–"
            for p, holm in zip(paired["subject_p_value"].astype(float),
                               paired["subject_p_holm"].astype(float))],
        "Reference better (subjects)": [
            f"{_count_text(w)}/{_count_text(n)}" for w, n in
            zip(paired["subjects_reference_better"], paired["n_subjects"])],
    })
    notes = ["Positive ΔMAE: the reference loss is better. "
             + ("Over seeds: paired over matching seeds, two-sided paired t-test. Every seed "
                "tests the same subjects, so this measures retraining on them, not the "
                "uncertainty over subjects; against a baseline that does not train (training "
                "mean, study mean, PCA + Ridge: one value for every seed) it is a one-sample "
                "test whose p falls with more seeds however few the test subjects. "
                if (paired["n_pairs"] > 1).any() else
                "One seed each: no sd and no paired test over seeds. ")
             + "Over subjects (the comparison that speaks for new subjects): each test "
               "subject's absolute error averaged over the common seeds; mean difference "
               "with a paired t 95 % interval, two-sided Wilcoxon signed-rank p and, in "
               "brackets, Holm's adjustment over the table's rows.",
             *_significance_floor_note(paired), *study_mean_note]
    if paired.empty:
        notes = [f"No {REFERENCE_LOSS} variant in experiment {LOSS_EXPERIMENT}: nothing to "
                 f"compare with."]
    write_table(paired, paired_display, paired_stem,
                title=f"Table 3b: Adaptive Neighborhoods against each loss"
                      f"{' and baseline' if baselines else ''}, paired over seeds and test "
                      f"subjects", notes=notes)


def _significance_floor_note(paired: pd.DataFrame) -> list[str]:
    """A note when no row of Table 3b can reach Holm-adjusted p < 0.05 whatever the errors.

    With n differences none of them 0, the smallest two-sided signed-rank p is 2 / 2**n
    (every subject on one side, the exact test); Holm multiplies the smallest p by the
    number of tested rows. The demo's 8 test subjects and 10 rows give 0.078: without
    this note a reader takes "no difference survives Holm" for a finding about the losses.
    """
    tested = paired[np.isfinite(paired["subject_p_value"].astype(float))]
    if tested.empty:
        return []
    subjects = int(tested["n_subjects"].max())
    smallest = 2.0 / 2 ** subjects
    adjusted = min(1.0, len(tested) * smallest)
    if adjusted < 0.05:
        return []
    return [f"With {subjects} test subjects the smallest two-sided Wilcoxon p is "
            f"{smallest:.4f} (every subject on one side), and Holm's adjustment over "
            f"{len(tested)} rows cannot go below {adjusted:.3f}: on this split no row can "
            f"reach 0.05 after adjustment, whatever the errors. More test subjects "
            f"(split.test_fraction, or split.scheme kfold) can."]


def _count_text(count: float) -> str:
    return "–" if count is None or not np.isfinite(count) else str(int(count))


def _interval_text(mean: float, low: float, high: float) -> str:
    """``mean [low, high]`` (years, 3 decimals); the mean alone without an interval."""
    if mean is None or not np.isfinite(mean):
        return "–"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _initialisation_text(init: str) -> str:
    if init.startswith("pretrained:"):
        return f"pretrained ({init[len('pretrained:'):]})"
    return {"scratch": "from scratch", "checkpoint": "external checkpoint",
            "none": "–"}.get(init, init)


def _format_number(value: float, digits: int) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}g}" \
        if abs(value) < 10 ** -digits else f"{value:.{digits}f}"


def _paired_markdown(paired: pd.DataFrame, labels: Mapping[str, str]) -> str:
    if paired.empty:
        return ""
    # the reference row's own label: with Adaptive Neighborhoods fine-tuned and from
    # scratch, "Adaptive Neighborhoods" alone names the other row
    reference = labels.get(paired["reference"].iloc[0], paired["reference"].iloc[0])
    tested = bool((paired["n_pairs"] > 1).any())
    lines = [f"## Paired comparison with {reference} (same seeds and test subjects)", "",
             f"ΔMAE = MAE(other row) − MAE({reference}), "
             f"{'mean ± sd over seeds' if tested else 'one seed each: no sd and no test'}; "
             f"positive: {reference} is better.", ""]
    for row in paired.itertuples():
        difference = format_mean_sd(row.mean_difference, row.sd_difference)
        subjects = ""
        if np.isfinite(row.subject_mean_difference):
            interval = _interval_text(row.subject_mean_difference, row.subject_ci95_low,
                                      row.subject_ci95_high)
            subjects = (f"; over {_count_text(row.n_subjects)} test subjects ΔMAE "
                        f"{interval} years, {reference} better for "
                        f"{_count_text(row.subjects_reference_better)}/"
                        f"{_count_text(row.n_subjects)}"
                        + (f", Wilcoxon p = {_format_number(row.subject_p_value, 3)} (Holm "
                           f"{_format_number(row.subject_p_holm, 3)})"
                           if np.isfinite(row.subject_p_value) else ""))
        lines.append(f"- {labels.get(row.baseline, row.baseline)}: ΔMAE {difference} years "
                     f"over {row.n_pairs} seed{'' if row.n_pairs == 1 else 's'}, {reference} "
                     f"better in {row.reference_wins}/{row.n_pairs}"
                     + (f", paired t-test p = {_format_number(row.p_value, 3)}" if tested
                        else "") + subjects)
    return "\n".join(lines)


def write_ablation(table: pd.DataFrame, experiment: str, stem: str | Path) -> None:
    display = pd.DataFrame({
        "Variant": table["label"], "Setting": table["setting"], "Seeds": table["n_seeds"],
        "MAE [years], ours": _mean_sd_column(table, "mae_mean", "mae_std"),
        "MAE [years], paper (different data)": _mean_sd_column(table, "paper_mae_mean",
                                                               "paper_mae_std"),
    })
    notes = [f"Ours: test MAE, {_over_seeds(table)}."]
    if experiment in PAPER_ABLATIONS:
        notes.append(PAPER_NOTE)
    title = ABLATION_TITLES.get(experiment, f"Experiment {experiment}")
    write_table(table, display, stem, title=f"{title}: test MAE", notes=notes)


def age_separated_studies(participants: pd.DataFrame) -> list[str]:
    """The groups of studies whose age ranges (years) overlap no other group's, as
    "study, study (min-max years)", youngest first; empty when the ranges chain into one
    (or there is one study). Across such groups, recognising the study (its scanner, its
    protocol) predicts age, and a low MAE may say little about the brain (a study-mean
    baseline measures how much)."""
    ranges = participants.astype({"study": str}).groupby("study")["age"].agg(["min", "max"])
    groups: list[list] = []  # [studies, low, high], merged while the ranges overlap
    for study, (low, high) in ranges.sort_values("min").iterrows():
        if groups and low <= groups[-1][2]:
            groups[-1][0].append(study)
            groups[-1][2] = max(groups[-1][2], high)
        else:
            groups.append([[study], low, high])
    if len(groups) < 2:
        return []
    return [f"{', '.join(sorted(studies, key=natural_key))} ("
            + (f"{round(low, 1):g}" if low == high else f"{round(low, 1):g}-{round(high, 1):g}")
            + " years)" for studies, low, high in groups]


def write_cohort(table: pd.DataFrame, stem: str | Path, *,
                 separated: Sequence[str] = ()) -> None:
    """Table 2; ``separated`` (:func:`age_separated_studies`) adds a note and a warning."""
    from brainage.simulate import study_table

    display = pd.DataFrame({
        "Study": table["study"], "n": table["n"],
        "Age [years]": _mean_sd_column(table, "age_mean", "age_sd", 1),
        "Sex [F:M]": [f"{f}:{m}" + (f" (+{o} other)" if o else "")
                      for f, m, o in zip(table["n_female"], table["n_male"], table["n_other"])],
        "Brain coverage [%]": [
            "–" if np.isnan(mean) else f"{format_mean_sd(mean, sd, 1)} (min {low:.1f})"
            for mean, sd, low in zip(table["coverage_mean_pct"], table["coverage_sd_pct"],
                                     table["coverage_min_pct"])],
    })
    paper = pd.concat([study_table(), pd.DataFrame([PAPER_TABLE2_TOTAL])], ignore_index=True)
    paper_lines = ["## Paper Table 2 (different data: the paper's 311 subjects)", "",
                   markdown_table(pd.DataFrame({
                       "Study": paper["study"], "n": paper["n"],
                       "Age [years]": _mean_sd_column(paper, "age_mean", "age_sd", 1),
                       "Sex [F:M]": [f"{f}:{m}" for f, m in zip(paper["n_female"],
                                                                paper["n_male"])],
                   }))]
    notes = ["Subjects of the normalised dataset (after QC exclusion, if any)."]
    if separated:
        confound = (f"The studies form groups whose ages do not overlap: {'; '.join(separated)}. "
                    f"Between the groups the study alone predicts age: compare Table 3 with a "
                    f"study-mean baseline (the default grid's study_mean variant) and read its "
                    f"per-study MAE.")
        logger.warning("Table 2: %s", confound)
        notes.append(confound)
    write_table(table, display, stem, title="Table 2: cohort by study", notes=notes,
                extra_markdown="\n".join(paper_lines))


def write_search(table: pd.DataFrame, stem: str | Path) -> None:
    display = pd.DataFrame({
        "Split": table["split"], "Trial": table["trial"], "NN final": table["nn_final"],
        "NN step": table["nn_step"],
        "Validation MAE [years]": ["diverged" if np.isnan(v) else f"{v:.3f}"
                                   for v in table["validation_mae"]]})
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


def write_pretraining(runs: pd.DataFrame, gains: pd.DataFrame, stem: str | Path,
                      gain_stem: str | Path) -> None:
    """The pretraining table: one row per run (its validation read-out), then the gain of
    each fine-tuned Table 3 variant over the same variant from scratch."""
    display = pd.DataFrame({
        "Pretraining run": runs["run"], "Loss": runs["loss"], "Epochs": runs["epochs"],
        "Subjects (train / validation)": [f"{t} / {v}" for t, v in zip(runs["n_train"],
                                                                      runs["n_validation"])],
        "Training loss (first → last epochs)": [
            f"{_format_number(a, 3)} → {_format_number(b, 3)}"
            + (f" (mean of {k} each)" if k > 1 else "")
            for a, b, k in zip(runs["first_loss"], runs["last_loss"],
                               runs.get("loss_epochs_averaged", [1] * len(runs)))],
        "Validation MAE [years]": [_format_number(v, 3) for v in runs["validation_mae"]],
        "Validation r": [_format_number(v, 3) for v in runs["validation_pearson_r"]],
    })
    gain_display = pd.DataFrame({
        "Loss": gains["label"], "Pretrained on": gains["run"], "Seeds": gains["n_pairs"],
        "MAE from scratch [years]": [_format_number(v, 3) for v in gains["mae_scratch_mean"]],
        "MAE fine-tuned [years]": [_format_number(v, 3) for v in gains["mae_pretrained_mean"]],
        "Gain [years] (scratch − fine-tuned)": _mean_sd_column(gains, "gain_mean", "gain_std"),
        "Fine-tuned wins": [f"{w}/{n}" for w, n in zip(gains["pretrained_wins"],
                                                       gains["n_pairs"])],
    })
    gains_markdown = "\n".join([
        "## Gain of pretraining, per loss (Table 3, paired over seeds)", "",
        markdown_table(gain_display) if len(gain_display) else
        "(no Table 3 variant fine-tunes a pretraining run beside the same variant from "
        "scratch)"])
    gain_note = ("Gain: test MAE of the variant trained from scratch minus that of the "
                 "same variant fine-tuned from the pretrained encoder, on the same split and "
                 "seeds, mean ± sd over seeds; positive = pretraining helps.")
    write_table(runs, display, stem, title="Pretraining: encoders pretrained on T1w cohorts",
                notes=["Training loss: the mean of the first and of the last epochs (a tenth "
                       "of the epochs, 1 to 10): one epoch's loss varies by more than the "
                       "fall.",
                       "Validation: the grid's read-out fitted on the run's training "
                       "subjects' features, tested on its held-out validation subjects.",
                       gain_note],
                extra_markdown=gains_markdown)
    write_table(gains, gain_display, gain_stem,
                title="Gain of pretraining over training from scratch, per loss",
                notes=[gain_note])


def make_tables(*, metrics: Sequence[str | Path], participants: str | Path,
                settings: Mapping[str, Mapping[str, Mapping[str, Any]]],
                outputs: Mapping[str, str | Path],
                search: Sequence[str | Path] = (),
                pretraining: Mapping[str, Mapping[str, str | Path]] | None = None,
                predictions: Sequence[str | Path] = ()) -> None:
    """Write every table of the configuration (rule make_tables).

    Parameters
    ----------
    metrics : paths of every grid cell's ``metrics.json`` (all splits).
    participants : one split's ``participants.tsv`` (the cohort).
    settings : :func:`experiment_settings` of the config.
    outputs : ``{table name: stem}``, stems without extension (``results/tables/<name>``),
        for the names of :func:`report_names`.
    search : every split's ``trials.tsv`` of the random search (when enabled).
    pretraining : ``{run: {"metrics": metrics.json, "history": history.tsv}}`` of every
        pretraining run (config pretrain).
    predictions : the cells' ``predictions.tsv`` (Table 3b's comparison over subjects);
        by default each ``metrics.json``'s neighbour.
    """
    started = time.perf_counter()
    read = read_metrics(metrics)
    seeds = seed_results(read)
    # leave-one-study-out: every split tests a study that has no training subjects
    one_study_out = bool(len(read)) and read["split"].astype(str).str.fullmatch(
        split_name_pattern("loso")).all()
    # study codes are text, as everywhere else: "01" and "1" are two studies
    cohort = None if participants is None else pd.read_csv(
        participants, sep="\t", dtype={"participant_id": str, "sex": str, "study": str})
    one_study = cohort is not None and cohort["study"].nunique() == 1
    pretraining = dict(pretraining or {})
    for name, stem in outputs.items():
        if name == "table2_cohort":
            write_cohort(cohort_table(cohort), stem, separated=age_separated_studies(cohort))
        elif name == "table3_losses":
            table = table3_losses(seeds, settings=settings.get(LOSS_EXPERIMENT))
            paired = paired_comparison(seeds, errors=subject_errors(read,
                                                                   predictions=predictions))
            write_table3(table, paired, stem, outputs["table3_paired"],
                         leave_one_study_out=one_study_out, one_study=one_study,
                         studies=() if cohort is None else set(cohort["study"]))
        elif name == "table3_paired":
            continue  # written with table3_losses
        elif name == SEARCH_NAME:
            write_search(read_search_trials(search), stem)
        elif name == PRETRAINING_NAME:
            write_pretraining(pretraining_runs(pretraining),
                              pretraining_gains(seeds, settings.get(LOSS_EXPERIMENT, {})),
                              stem, outputs[PRETRAINING_GAIN])
        elif name == PRETRAINING_GAIN:
            continue  # written with the pretraining table
        elif name.startswith("ablation_"):
            experiment = name[len("ablation_"):]
            write_ablation(ablation_table(seeds, experiment, settings[experiment]),
                           experiment, stem)
        else:
            raise ReportError(f"unknown table name '{name}'")
        logger.info("table %s written", name)
    logger.info("tables done in %.1f s", time.perf_counter() - started)
