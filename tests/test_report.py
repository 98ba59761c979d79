"""Tables and figures (brainage.report) on synthetic grid-cell outputs.

The fixtures write files in the formats of the output layout (brainage.paths.Layout,
docs/architecture.md): a cell's metrics.json, predictions.tsv and
embeddings/epoch-<EEE>.npz, a split's participants.tsv, qc.tsv and registered maps, so
the tests need no training or preprocessing.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage.config import load_config, validate_config
from brainage.evaluate import compute_metrics
from brainage.io import headless_pyplot
from brainage.paths import Layout
from brainage.report import figures, pretraining, tables, targets
from brainage.report import results as report_results
from conftest import REPO

STUDIES = ("study1", "study2", "study3")
#: Synthetic MAE (years) per table3 variant; adaptive is best with every seed.
LOSS_MAE = {"simclr": 9.0, "yaware": 4.0, "adaptive": 3.5}


def grid_config(**experiments) -> dict:
    base = {
        "experiments": {
            "table3": {"seeds": [0, 1, 2], "variants": {
                name: {"loss": {"name": name}} for name in LOSS_MAE}},
            "distance": {"seeds": [0, 1, 2], "variants": {
                "manhattan": {"loss": {"distance": "manhattan"}},
                "cosine": {"loss": {"distance": "cosine"}}}},
            "lambda": {"seeds": [0, 1], "variants": {
                "lam0": {"loss": {"lam": 0.0}}, "hard": {"loss": {"lam": None}},
                "lam1": {"loss": {"lam": 1.0}}}},
            **experiments,
        }
    }
    return validate_config(base)


def participants_table(n: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "participant_id": [f"sub-{i:02d}" for i in range(n)],
        "age": np.round(rng.uniform(20, 80, n), 1),
        "sex": ["F" if i % 3 else "M" for i in range(n)],
        "study": [STUDIES[i % len(STUDIES)] for i in range(n)],
        "subset": ["test" if i % 4 == 0 else "train" for i in range(n)],
        "coverage": np.linspace(0.78, 1.0, n),
        "qc_pass": [i != 5 for i in range(n)],
    })


def cell_mae(experiment: str, variant: str, seed: int) -> float:
    base = LOSS_MAE.get(variant, 4.0 + 0.1 * len(variant))
    return base + 0.1 * seed


def write_cell(layout: Layout, split: str, experiment: str, variant: str, seed: int,
               participants: pd.DataFrame, *, loss: str, epochs=(1, 2)) -> None:
    folder = Path(layout.cell_dir(split, experiment, variant, seed))
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    mae = cell_mae(experiment, variant, seed)
    test = participants[participants["subset"] == "test"]
    metrics = {"split": split, "experiment": experiment, "variant": variant, "seed": seed,
               "loss": loss, "readout": "ridge", "mae": mae, "rmse": mae * 1.2,
               "pearson_r": 0.8, "r2": 0.6,
               "mae_per_study": {s: mae for s in sorted(set(test["study"]))},
               "n_per_study": test["study"].value_counts().to_dict(),
               "gap_age_slope": -0.2, "n_train": int((participants["subset"] == "train").sum()),
               "n_test": len(test)}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    predictions = participants[["participant_id", "study", "age", "subset"]].copy()
    predictions["predicted_age"] = predictions["age"] + mae
    predictions.to_csv(folder / "predictions.tsv", sep="\t", index=False)
    pd.DataFrame({"epoch": [1, 2, 3], "loss": [5.0, 4.0, 3.5], "lr": 1e-4, "seconds": 1.0,
                  "nn_nb": 8}).to_csv(folder / "history.tsv", sep="\t", index=False)
    rng = np.random.default_rng(seed)
    for epoch in epochs:
        np.savez(folder / "embeddings" / f"epoch-{epoch:03d}.npz",
                 features=rng.normal(size=(len(participants), 16)).astype(np.float32),
                 participant_id=participants["participant_id"].to_numpy(str),
                 age=participants["age"].to_numpy(float),
                 subset=participants["subset"].to_numpy(str))


def write_grid(layout: Layout, config: dict, participants: pd.DataFrame
               ) -> tuple[Path, dict, list[str]]:
    """Every cell of ``config`` finished on one holdout split: its split folder, the
    experiments' settings and the cells' metrics files."""
    split_dir = Path(layout.split_dir("holdout"))
    split_dir.mkdir(parents=True)
    participants.to_csv(split_dir / "participants.tsv", sep="\t", index=False)
    settings = targets.experiment_settings(config)
    metrics = []
    for experiment, variants in settings.items():
        for variant, cell in variants.items():
            for seed in config["experiments"][experiment]["seeds"]:
                write_cell(layout, "holdout", experiment, variant, seed, participants,
                           loss=cell["loss"]["name"])
                metrics.append(layout.cell_file("holdout", experiment, variant, seed,
                                                "metrics.json"))
    return split_dir, settings, metrics


@pytest.fixture
def results(tmp_path):
    """A finished grid of ``grid_config()`` on one holdout split, plus cohort files."""
    layout = Layout(results=str(tmp_path / "results"))
    config = grid_config()
    participants = participants_table()
    split_dir, settings, metrics = write_grid(layout, config, participants)
    qc = pd.DataFrame({"participant_id": participants["participant_id"],
                       "study": participants["study"], "dice": np.linspace(0.8, 0.95, len(participants)),
                       "correlation": 0.6, "coverage": participants["coverage"],
                       "qc_pass": participants["qc_pass"], "qc_failures": ""})
    Path(layout.qc_table()).parent.mkdir(parents=True)
    qc.to_csv(layout.qc_table(), sep="\t", index=False)
    maps = {}
    grid = np.indices((20, 24, 20)).astype(float)
    for index, participant in enumerate(participants["participant_id"]):
        label = participant[len("sub-"):]
        path = Path(layout.subject_mni(label, "preproc", "stiffness"))
        path.parent.mkdir(parents=True)
        inside = ((grid - np.array([10, 12, 10])[:, None, None, None]) ** 2).sum(0) < 64
        slab = grid[2] < 20 - index // 3  # lower coverage, fewer slices
        nib.save(nib.Nifti1Image((inside & slab).astype(np.float32) * (2.5 + 0.01 * index),
                                 np.diag([2.0, 2.0, 2.0, 1.0])), path)
        maps[participant] = str(path)
    return {"layout": layout, "config": config, "participants": participants,
            "metrics": metrics, "settings": settings, "maps": maps,
            "split_dir": split_dir}


# ---- names ------------------------------------------------------------------------------

def test_report_names_follow_the_enabled_experiments():
    config = grid_config(augmentation={"enabled": False, "variants": {
        "none": {"train": {"augmentation": "none"}}}})
    names = targets.report_names(config)
    assert names["tables"] == ["table2_cohort", "table3_losses", "table3_paired",
                               "ablation_distance", "ablation_lambda"]
    assert "fig4a_distance" in names["figures"] and "fig6_lambda" in names["figures"]
    assert "fig4c_augmentation" not in names["figures"]  # disabled: no figure at all
    assert {"fig3_age_distribution", "fig5_umap", "fig7_coverage", "fig8_coverage_examples",
            "predicted_vs_true", "qc_overview"} <= set(names["figures"])


def test_report_names_without_table3_or_cells():
    config = validate_config({"experiments": {}})
    names = targets.report_names(config)
    assert names["tables"] == ["table2_cohort"]
    assert "fig5_umap" not in names["figures"]
    custom = validate_config({"experiments": {"widths": {"seeds": [0], "variants": {
        "narrow": {"model": {"hidden_dim": 64}}, "wide": {"model": {"hidden_dim": 1024}}}}}})
    names = targets.report_names(custom)
    assert "ablation_widths" in names["tables"] and "ablation_widths" in names["figures"]


def test_focus_cell_prefers_the_exported_model():
    config = grid_config()
    assert targets.focus_cell(config) == ("table3", "adaptive", 0)
    config["predict"]["model"].update(experiment="distance", variant="cosine", seed=2)
    assert targets.focus_cell(config) == ("distance", "cosine", 2)
    config["predict"]["model"]["seed"] = 7  # not in the grid
    assert targets.focus_cell(config) == ("table3", "adaptive", 0)
    config["experiments"]["table3"]["seeds"] = [2, 0, 1]  # the lowest, not the first listed
    assert targets.focus_cell(config) == ("table3", "adaptive", 0)


def test_focus_cell_has_an_encoder():
    # a baseline first in Table 3 and no adaptive variant: the UMAP shows the first cell
    # with an encoder (planning asked for the baseline's embeddings and failed before)
    baseline = {"model": {"encoder": "none"}, "readout": {"method": "train_mean"}}
    config = validate_config({"experiments": {"table3": {"seeds": [0], "variants": {
        "train_mean": baseline, "yaware": {"loss": {"name": "yaware"}}}}}})
    assert targets.focus_cell(config) == ("table3", "yaware", 0)
    assert "fig5_umap" in targets.report_names(config)["figures"]
    only_baselines = validate_config({"experiments": {"table3": {"seeds": [0], "variants": {
        "train_mean": baseline}}}})
    assert targets.focus_cell(only_baselines) is None
    assert "fig5_umap" not in targets.report_names(only_baselines)["figures"]


def test_an_exported_encoder_trained_for_no_epoch_has_no_umap_but_its_predictions():
    """predict.model may name the untrained encoder (config.yaml) or a frozen pretrained
    one (paper.yaml): Fig. 5 was planned for it and the report stopped, asking to set
    train.embed_epochs to epochs it trains (found by a review). Its predicted-vs-true
    figure is drawn; Fig. 5 is not."""
    config = grid_config()
    config["experiments"]["table3"]["variants"]["untrained"] = {"train": {"epochs": 0}}
    config = validate_config(config)
    config["predict"]["model"].update(experiment="table3", variant="untrained", seed=0)
    assert targets.focus_cell(config) == ("table3", "untrained", 0)
    figures = targets.report_names(config)["figures"]
    assert "predicted_vs_true" in figures and "fig5_umap" not in figures
    config["predict"]["model"]["variant"] = "adaptive"
    assert "fig5_umap" in targets.report_names(config)["figures"]


# ---- tables -----------------------------------------------------------------------------

def test_table3_has_the_contract_columns_and_paper_numbers(results):
    seeds = report_results.seed_results(report_results.read_metrics(results["metrics"]))
    table = tables.table3_losses(seeds, display_names={"adaptive": "Adaptive Neighborhoods"})
    assert list(table.columns[:4]) == ["loss", "n_seeds", "mae_mean", "mae_std"]
    # the paper's order: simclr, yaware, adaptive
    assert table["loss"].tolist() == ["simclr", "yaware", "adaptive"]
    adaptive = table.set_index("loss").loc["adaptive"]
    assert adaptive["n_seeds"] == 3
    assert adaptive["mae_mean"] == pytest.approx(3.6)
    assert adaptive["mae_std"] == pytest.approx(0.1)
    assert adaptive["paper_mae_mean"] == pytest.approx(3.724)
    assert adaptive["label"] == "Adaptive Neighborhoods"


def test_table3_rows_follow_the_papers_order_whatever_the_order_of_the_metrics(results):
    """Rows in the paper's loss order (then the baselines), not in the order the cells'
    metrics arrive in (the config's variant order, the order of make_tables' inputs)."""
    seeds = report_results.seed_results(report_results.read_metrics(results["metrics"]))
    table = tables.table3_losses(seeds.iloc[::-1].reset_index(drop=True))
    assert table["loss"].tolist() == ["simclr", "yaware", "adaptive"]


def test_table3_without_settings_keeps_baselines_off_the_losses_rows(results):
    """A baseline's metrics carry the config's loss name (adaptive by default) although it
    trains with none: without the settings, its row goes by its variant, marked a baseline,
    with no paper number, instead of passing for a second Adaptive Neighborhoods row."""
    frame = report_results.read_metrics(results["metrics"])
    untrained = frame[frame["variant"] == "adaptive"].assign(variant="untrained",
                                                              kind="baseline", mae=9.0)
    seeds = report_results.seed_results(pd.concat([frame, untrained], ignore_index=True))
    table = tables.table3_losses(seeds, display_names={"adaptive": "Adaptive Neighborhoods"})
    assert table["loss"].tolist() == ["simclr", "yaware", "adaptive", "untrained"]
    baseline = table.set_index("loss").loc["untrained"]
    assert baseline["kind"] == "baseline"
    assert baseline["label"] == report_results.BASELINE_LABELS["untrained"]
    assert np.isnan(baseline["paper_mae_mean"])
    assert baseline["mae_mean"] == pytest.approx(9.0)
    assert table.set_index("loss").loc["adaptive", "label"] == "Adaptive Neighborhoods"


def test_table3_puts_a_loss_the_paper_lacks_after_its_losses_above_the_baselines(results):
    """A contributor's new loss sorted below the baselines (docs/architecture.md's recipe):
    Table 3 lists the losses first, then the baselines."""
    frame = report_results.read_metrics(results["metrics"])
    adaptive = frame[frame["variant"] == "adaptive"]
    untrained = adaptive.assign(variant="untrained", kind="baseline", mae=9.0)
    new_loss = adaptive.assign(variant="supcon", loss="supcon_bins", mae=5.0)
    seeds = report_results.seed_results(pd.concat([untrained, frame, new_loss],
                                                  ignore_index=True))
    table = tables.table3_losses(seeds)
    assert table["loss"].tolist() == ["simclr", "yaware", "adaptive", "supcon_bins",
                                      "untrained"]
    # with settings: a new loss's fine-tuned row right after its row from scratch, whatever
    # the config's order
    settings = targets.experiment_settings(grid_config())["table3"]
    tuned = copy.deepcopy(settings["adaptive"])
    tuned["loss"]["name"], tuned["model"]["init"] = "supcon_bins", "pretrained:t1w"
    scratch = copy.deepcopy(settings["adaptive"])
    scratch["loss"]["name"] = "supcon_bins"
    untrained_cell = copy.deepcopy(settings["adaptive"])
    untrained_cell["train"]["epochs"] = 0
    ordered = {"supcon_ft": tuned, "simclr": settings["simclr"], "supcon": scratch,
               "untrained": untrained_cell, "yaware": settings["yaware"],
               "adaptive": settings["adaptive"]}
    seeds = report_results.seed_results(pd.concat(
        [adaptive.assign(variant="supcon_ft", loss="supcon_bins", mae=4.0), untrained, frame,
         new_loss], ignore_index=True))
    table = tables.table3_losses(seeds, settings=ordered)
    assert table["variant"].tolist() == ["simclr", "yaware", "adaptive", "supcon", "supcon_ft",
                                         "untrained"]


def test_table3_names_the_neighbourhood_schedule_each_encoder_trained_with(results, tmp_path):
    """metrics.json's trained_loss (the search's nn_final/nn_step after nn_from_search)
    reaches Table 3: a column of the csv and a note under the table."""
    for path in results["metrics"]:
        metrics = json.loads(Path(path).read_text())
        if metrics["loss"] == "adaptive":  # seed 2's split chose another nn_final
            metrics["trained_loss"] = {"name": "adaptive", "nn_from_search": True,
                                       "nn_final": 5 if metrics["seed"] == 2 else 4,
                                       "nn_step": 2}
        elif metrics["loss"] == "yaware":
            metrics["trained_loss"] = {"name": "yaware", "sigma": 2.0}
        Path(path).write_text(json.dumps(metrics))
    seeds = report_results.seed_results(report_results.read_metrics(results["metrics"]))
    table = tables.table3_losses(seeds).set_index("loss")
    assert table.loc["adaptive", "neighbourhood"] == (
        "nn_final 4, nn_step 2 (random search) or nn_final 5, nn_step 2 (random search)")
    assert table.loc[["simclr", "yaware"], "neighbourhood"].isna().all()
    tables.write_table3(table.reset_index(), tables.paired_comparison(seeds),
                        tmp_path / "table3", tmp_path / "paired")
    markdown = (tmp_path / "table3.md").read_text()
    assert "schedule as trained" in markdown and "nn_final 5, nn_step 2" in markdown
    written = pd.read_csv(tmp_path / "table3.csv").set_index("loss")["neighbourhood"]
    assert written["adaptive"] == table.loc["adaptive", "neighbourhood"]
    assert written[["simclr", "yaware"]].isna().all()


def test_paired_comparison_against_adaptive(results):
    seeds = report_results.seed_results(report_results.read_metrics(results["metrics"]))
    paired = tables.paired_comparison(seeds).set_index("baseline")
    assert set(paired.index) == {"simclr", "yaware"}
    assert (paired["reference"] == "adaptive").all()
    assert paired.loc["simclr", "mean_difference"] == pytest.approx(5.5)
    assert paired.loc["yaware", "n_pairs"] == 3
    assert paired.loc["yaware", "reference_wins"] == 3
    # constant differences: no spread, t-test undefined
    assert np.isnan(paired.loc["yaware", "p_value"])


def test_paired_t_test_matches_scipy():
    from scipy import stats

    seeds = pd.DataFrame({"experiment": "table3", "variant": ["adaptive"] * 3 + ["yaware"] * 3,
                          "seed": [0, 1, 2] * 2, "loss": ["adaptive"] * 3 + ["yaware"] * 3,
                          "mae": [3.0, 3.5, 3.2, 3.9, 4.4, 3.6]})
    paired = tables.paired_comparison(seeds).iloc[0]
    expected = stats.ttest_rel([3.9, 4.4, 3.6], [3.0, 3.5, 3.2])
    assert paired["p_value"] == pytest.approx(expected.pvalue)
    assert paired["mean_difference"] == pytest.approx(np.mean([0.9, 0.9, 0.4]))
    assert paired["sd_difference"] == pytest.approx(np.std([0.9, 0.9, 0.4], ddof=1))
    # a seed where both have the same MAE is not a win for the reference
    tied = seeds.assign(mae=[3.0, 3.5, 3.2, 3.0, 4.4, 3.0])
    assert tables.paired_comparison(tied).iloc[0]["reference_wins"] == 1


def test_a_baseline_that_does_not_train_is_also_compared_over_test_subjects():
    """Every seed tests the same subjects: against a study-mean baseline (one MAE for every
    seed) the t-test over seeds printed p = 0.029 on the demo, while the reference beat it
    for 4 of 8 subjects (Wilcoxon p 0.64); with more seeds that p falls to 0 however few
    the test subjects. The comparison over subjects says what holds for new subjects."""
    from scipy import stats

    reference_errors = {0: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1: [1.5, 2.5, 2.5, 4.5, 5.5, 5.0]}
    baseline_errors = [0.5, 1.0, 2.0, 3.0, 4.0, 35.0]  # one subject far off, for every seed
    errors = pd.DataFrame(
        [{"variant": "adaptive", "seed": seed, "participant_id": f"sub-{i}", "abs_error": e}
         for seed, values in reference_errors.items() for i, e in enumerate(values)]
        + [{"variant": "study_mean", "seed": seed, "participant_id": f"sub-{i}",
            "abs_error": e} for seed in (0, 1) for i, e in enumerate(baseline_errors)])
    maes = errors.groupby(["variant", "seed"], as_index=False)["abs_error"].mean()
    seeds = maes.rename(columns={"abs_error": "mae"}).assign(
        experiment="table3", loss="adaptive",
        kind=lambda t: np.where(t["variant"] == "adaptive", "contrastive", "baseline"))
    paired = tables.paired_comparison(seeds, errors=errors).iloc[0]
    differences = np.array(baseline_errors) - np.mean(list(reference_errors.values()), axis=0)
    assert paired["n_subjects"] == 6 and paired["subjects_reference_better"] == 1
    assert paired["subject_mean_difference"] == pytest.approx(differences.mean())
    assert paired["subject_mean_difference"] == pytest.approx(paired["mean_difference"])
    half = stats.t.ppf(0.975, 5) * differences.std(ddof=1) / np.sqrt(6)
    assert paired["subject_ci95_low"] == pytest.approx(differences.mean() - half)
    assert paired["subject_ci95_high"] == pytest.approx(differences.mean() + half)
    assert paired["subject_p_value"] == pytest.approx(stats.wilcoxon(differences).pvalue)
    assert paired["subject_p_value"] > 0.4  # one subject far off is no evidence
    assert paired["subject_p_holm"] == pytest.approx(paired["subject_p_value"])  # one row
    # without errors (a caller without predictions) the columns are there, empty
    assert np.isnan(tables.paired_comparison(seeds).iloc[0]["subject_p_value"])
    # one test subject: a difference, no interval and no test (scipy's p would be 1)
    alone = tables.paired_comparison(seeds, errors=errors[errors["participant_id"] == "sub-5"])
    assert alone.iloc[0]["n_subjects"] == 1
    assert alone.iloc[0]["subject_mean_difference"] == pytest.approx(29.5)
    assert alone[["subject_ci95_low", "subject_p_value", "subject_p_holm"]].isna().all(axis=None)


def test_holm_adjustment_of_the_subject_p_values():
    adjusted = tables.holm_adjusted([0.01, 0.04, np.nan, 0.03, 0.5])
    # ordered 0.01, 0.03, 0.04, 0.5: times 4, 3, 2, 1, kept increasing, at most 1
    assert adjusted[[0, 3, 1, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert np.isnan(adjusted[2])
    assert tables.holm_adjusted([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_table3b_says_when_no_row_can_reach_significance_after_holm(tmp_path):
    """The demo's 8 test subjects and 10 rows: the smallest two-sided Wilcoxon p is
    2/2**8 = 0.0078 and Holm's smallest adjusted p 0.078, whatever the errors; the table
    printed "no difference survives Holm" as if it were a finding about the losses."""
    def written(subjects: int, baselines: int) -> str:
        rng = np.random.default_rng(0)
        reference = rng.uniform(1, 5, subjects)
        errors = pd.DataFrame(
            [{"variant": "adaptive", "seed": 0, "participant_id": f"sub-{i}", "abs_error": e}
             for i, e in enumerate(reference)]
            + [{"variant": f"baseline{b}", "seed": 0, "participant_id": f"sub-{i}",
                "abs_error": e + 3.0}  # every subject better with the reference
               for b in range(baselines) for i, e in enumerate(reference)])
        seeds = (errors.groupby("variant", as_index=False)["abs_error"].mean()
                 .rename(columns={"abs_error": "mae"})
                 .assign(experiment="table3", seed=0, loss="adaptive", kind="contrastive",
                         readout="ridge", rmse=5.0, pearson_r=0.8, r2=0.6, gap_age_slope=-0.2,
                         n_test=subjects, n_splits=1, neighbourhood=None))
        paired = tables.paired_comparison(seeds, errors=errors)
        tables.write_table3(tables.table3_losses(seeds), paired, tmp_path / "t3",
                            tmp_path / "t3b")
        return (tmp_path / "t3b.md").read_text()

    demo = written(subjects=8, baselines=10)
    assert "With 8 test subjects the smallest two-sided Wilcoxon p is 0.0078" in demo
    assert "Holm's adjustment over 10 rows cannot go below 0.078" in demo
    assert "0.008 (0.078)" in demo  # the floor is reached: all 8 subjects on one side
    # 12 subjects: 10 x 2/2**12 = 0.0049, a difference can be shown; no note
    assert "smallest two-sided Wilcoxon p" not in written(subjects=12, baselines=10)


def test_subject_errors_name_a_cell_without_its_predictions(results):
    read = report_results.read_metrics(results["metrics"])
    errors = tables.subject_errors(read)
    # participants_table: three test subjects; predicted = age + the cell's MAE
    first = read[read["experiment"] == "table3"].iloc[0]
    cell = errors[(errors["variant"] == first["variant"]) & (errors["seed"] == first["seed"])]
    assert len(cell) == 3 and cell["abs_error"].to_numpy() == pytest.approx(first["mae"])
    predictions = Path(first["path"]).with_name("predictions.tsv")
    predictions.unlink()
    with pytest.raises(targets.ReportError,
                       match=rf"{re.escape(str(predictions))} is missing beside .*metrics\.json; "
                             r"rerun the cell's evaluate_encoder"):
        tables.subject_errors(read)


def test_paired_comparison_pairs_only_the_seeds_both_rows_have():
    """A seed only the other row has (one more seed configured for it, or the reference's
    cell of that seed missing) has no pair: it is left out of the differences instead of
    failing the report."""
    seeds = pd.DataFrame({"experiment": "table3",
                          "variant": ["adaptive"] * 3 + ["yaware"] * 4,
                          "seed": [0, 1, 2, 0, 1, 2, 3], "loss": ["adaptive"] * 3 + ["yaware"] * 4,
                          "mae": [3.0, 3.5, 3.2, 3.9, 4.4, 3.6, 20.0]})
    paired = tables.paired_comparison(seeds).iloc[0]
    assert paired["n_pairs"] == 3 and paired["reference_wins"] == 3
    assert paired["mean_difference"] == pytest.approx(np.mean([0.9, 0.9, 0.4]))


def test_a_baseline_is_never_the_reference_of_the_paired_comparison():
    """A baseline's metrics carry the config's loss name (adaptive by default): listed
    before the only Adaptive Neighborhoods variant, which is not named adaptive, it must not
    become the reference of Table 3b."""
    seeds = pd.DataFrame({
        "experiment": "table3", "seed": [0, 1, 2] * 3,
        "variant": ["untrained"] * 3 + ["adaptive_pretrained"] * 3 + ["simclr"] * 3,
        "loss": ["adaptive"] * 6 + ["simclr"] * 3,
        "kind": ["baseline"] * 3 + ["contrastive"] * 6,
        "mae": [10.0, 11.0, 12.0, 4.0, 5.0, 6.0, 6.0, 7.0, 8.0]})
    assert tables.reference_variant(seeds) == "adaptive_pretrained"
    paired = tables.paired_comparison(seeds).set_index("baseline")
    assert set(paired.index) == {"untrained", "simclr"}
    assert (paired["reference"] == "adaptive_pretrained").all()
    assert paired.loc["untrained", "mean_difference"] == pytest.approx(6.0)


def test_seed_results_pool_r_and_r2_over_the_test_subjects_of_every_split():
    """Leave-one-study-out: each split tests one study's narrow age range, where r and R²
    say little. Averaged over the splits they were 0.72 and 0.05 for predictions within a
    few years of 90 subjects aged 20-80; over the subjects, as for a holdout split, they
    are what np.corrcoef and 1 - SSE / SST give. A split of one age (r undefined there)
    does not make the pooled values undefined."""
    from brainage.evaluate import compute_metrics

    rng = np.random.default_rng(0)
    ranges = {"a": (20, 30), "b": (40, 60), "c": (65, 80), "d": (50, 50)}
    ages = {study: rng.uniform(*span, size=30) for study, span in ranges.items()}
    predicted = {study: values + rng.normal(0, 4, size=30) for study, values in ages.items()}
    rows = []
    for study in ranges:
        metrics = compute_metrics(ages[study], predicted[study], np.full(30, study))
        rows.append({
            "split": f"loso{study}", "experiment": "table3", "variant": "adaptive", "seed": 0,
            "loss": "adaptive", "kind": "contrastive", "readout": "ridge", "n_test": 30,
            "path": study, **{key: metrics[key] for key in ("mae", "rmse", "pearson_r", "r2",
                                                           "gap_age_slope")},
            **{f"gap_age_sum_{key}": value for key, value in metrics["gap_age_sums"].items()}})
    table = pd.DataFrame(rows).astype({"pearson_r": float, "r2": float})
    assert np.isnan(table["pearson_r"].iloc[3])  # study d: every subject 50 years old
    row = report_results.seed_results(table).iloc[0]
    every_age = np.concatenate(list(ages.values()))
    every_prediction = np.concatenate(list(predicted.values()))
    pooled = compute_metrics(every_age, every_prediction, np.full(len(every_age), "all"))
    assert row["pearson_r"] == pytest.approx(np.corrcoef(every_age, every_prediction)[0, 1])
    assert row["pearson_r"] == pytest.approx(pooled["pearson_r"], rel=1e-9)
    assert row["r2"] == pytest.approx(pooled["r2"], rel=1e-9)
    assert row["gap_age_slope"] == pytest.approx(pooled["gap_age_slope"], rel=1e-9)
    assert row["r2"] > 0.9 > table["r2"].iloc[:3].mean()
    # one split: its own values, as written
    single = report_results.seed_results(table.iloc[:1]).iloc[0]
    assert (single["pearson_r"], single["r2"]) == (table["pearson_r"].iloc[0],
                                                   table["r2"].iloc[0])


def test_seed_results_pool_splits_by_test_size():
    metrics = pd.DataFrame({
        "split": ["fold1", "fold2"], "experiment": "table3", "variant": "adaptive",
        "seed": 0, "loss": "adaptive", "kind": "contrastive", "readout": "ridge",
        "mae": [2.0, 5.0], "rmse": [2.0, 5.0], "pearson_r": [0.5, 0.7], "r2": [0.1, 0.3],
        "gap_age_slope": [-0.1, -0.3], "n_test": [3, 1], "mae_study_a": [2.0, np.nan],
        "mae_study_b": [1.0, 4.0], "n_study_a": [2, np.nan], "n_study_b": [1, 1],
        # test ages 20, 40, 60 with gaps 2, 0, -2, then age 80 with gap -10
        "gap_age_sum_n": [3, 1], "gap_age_sum_age": [120.0, 80.0], "gap_age_sum_gap": [0.0, -10.0],
        "gap_age_sum_age_age": [5600.0, 6400.0], "gap_age_sum_age_gap": [-80.0, -800.0],
        "path": ["x", "y"]})
    row = report_results.seed_results(metrics).iloc[0]
    assert row["mae"] == pytest.approx((3 * 2 + 1 * 5) / 4)
    assert row["rmse"] == pytest.approx(np.sqrt((3 * 4 + 25) / 4))
    assert row["n_splits"] == 2 and row["n_test"] == 4
    assert row["mae_study_a"] == pytest.approx(2.0)  # tested by fold1 only
    # study b has one test subject in each fold: its pooled MAE is their plain mean, not
    # weighted by the folds' n_test (3:1, which would give 1.75)
    assert row["mae_study_b"] == pytest.approx(2.5)
    # the slope over the four test subjects (-380 / 2000), not the folds' mean slope (-0.2)
    assert row["gap_age_slope"] == pytest.approx(np.polyfit([20, 40, 60, 80],
                                                            [2, 0, -2, -10], 1)[0])
    assert row["gap_age_slope"] == pytest.approx(-0.19)
    assert (row["n_study_a"], row["n_study_b"]) == (2, 2)  # summed over the folds
    # metrics written before the counts existed cannot pool b, and say which to rerun
    with pytest.raises(targets.ReportError, match="x, y.*n_per_study.*evaluate_encoder"):
        report_results.seed_results(metrics.drop(columns=["n_study_a", "n_study_b"]))
    old = report_results.seed_results(
        metrics.drop(columns=["n_study_a", "n_study_b", "mae_study_b"])).iloc[0]
    assert old["mae_study_a"] == pytest.approx(2.0)  # one split: nothing to weigh
    assert np.isnan(old["n_study_a"])  # its count is unknown, not 0
    # a study no split of the cell tests (leave-one-study-out) has no MAE and 0 subjects
    untested = report_results.seed_results(metrics.assign(mae_study_c=np.nan)).iloc[0]
    assert np.isnan(untested["mae_study_c"]) and untested["n_study_c"] == 0
    # a split without test subjects has no MAE to pool: an error, not a NaN in Table 3
    with pytest.raises(targets.ReportError, match="n_test is 0 in y; the split has no test "
                                                  "subjects"):
        report_results.seed_results(metrics.assign(n_test=[3, 0]))


def test_summarise_seeds_by_hand():
    # Skewed MAEs over three seeds, 3, 4 and 8: mean 5 (the median is 4), sd with ddof=1
    # sqrt(7). The grid fixture's seeds are evenly spaced, where mean and median agree,
    # and its RMSE and per-study columns were never read back.
    seeds = pd.DataFrame({
        "experiment": "table3", "variant": "adaptive", "seed": [2, 0, 1],
        "mae": [3.0, 4.0, 8.0], "rmse": [4.0, 5.0, 9.0], "pearson_r": [0.9, 0.8, 0.4],
        "r2": [0.8, 0.6, 0.1], "gap_age_slope": [-0.1, -0.2, -0.6], "n_test": 20,
        "neighbourhood": None, "mae_study_a": [2.0, 3.0, 10.0], "n_study_a": 12.0})
    summary = report_results.summarise_seeds(seeds)
    assert summary["n_seeds"] == 3 and summary["seeds"] == "0 1 2"
    assert summary["mae_mean"] == pytest.approx(5.0)
    assert summary["mae_std"] == pytest.approx(np.sqrt(7.0))
    assert summary["rmse_mean"] == pytest.approx(6.0)
    assert summary["pearson_r_mean"] == pytest.approx(0.7)
    assert summary["r2_mean"] == pytest.approx(0.5)
    assert summary["gap_age_slope_mean"] == pytest.approx(-0.3)
    assert summary["mae_study_a"] == pytest.approx(5.0)
    assert summary["n_test"] == 20 and summary["n_study_a"] == 12  # the seeds share the split
    assert np.isnan(report_results.summarise_seeds(seeds.iloc[:1])["mae_std"])
    # a seed with constant predictions has no r: the mean over the seeds has none either
    # (it was 0.85, the mean of the other two, labelled as the mean of all three)
    undefined = report_results.summarise_seeds(seeds.assign(pearson_r=[0.9, 0.8, np.nan]))
    assert np.isnan(undefined["pearson_r_mean"]) and undefined["mae_mean"] == pytest.approx(5)


def test_per_study_mae_pools_each_studys_test_subjects_over_folds(tmp_path):
    """Five folds of a cohort whose third study is small and noisy: each study's MAE in the
    seed table equals the MAE over that study's test subjects of all folds."""
    sizes = {"s1": 40, "s2": 20, "s3": 12}
    rng = np.random.default_rng(1)
    table = pd.DataFrame([{"study": study} for study, n in sizes.items() for _ in range(n)])
    table["age"] = rng.uniform(20, 80, len(table))
    noise = np.where(table["study"] == "s3", rng.uniform(0.2, 3, len(table)), 1.0)
    table["predicted"] = table["age"] + rng.normal(0, 4, len(table)) * noise
    fold = rng.permutation(np.arange(len(table)) % 5)
    paths = []
    for k in range(5):
        test = table[fold == k]
        metrics = compute_metrics(test["age"].to_numpy(), test["predicted"].to_numpy(),
                                  test["study"].to_numpy())
        metrics.update(split=f"fold{k + 1}", experiment="table3", variant="adaptive", seed=0,
                       loss="adaptive", n_test=len(test))
        paths.append(tmp_path / f"fold{k + 1}.json")
        paths[-1].write_text(json.dumps(metrics))
    row = report_results.seed_results(report_results.read_metrics(paths)).iloc[0]
    error = (table["predicted"] - table["age"]).abs()
    assert row["mae"] == pytest.approx(error.mean())
    for study in sizes:
        assert row[f"mae_study_{study}"] == pytest.approx(error[table["study"] == study].mean())


def test_a_cell_lacking_a_splits_metrics_is_refused_not_pooled_over_fewer_subjects():
    """Two folds of 3 and 1 test subjects: seed 1 of adaptive lacks fold2's metrics.json (a
    glob over an unfinished grid). Its MAE was pooled over fold1's 3 subjects alone,
    averaged with the other seeds' over 4 and set beside the baselines under "the same
    test subjects"; Table 3 named 4 test subjects, the first seed's."""
    metrics = pd.DataFrame([
        {"split": split, "experiment": experiment, "variant": variant, "seed": seed,
         "loss": "adaptive", "kind": "contrastive", "readout": "ridge",
         "mae": 3.0 + (split == "fold2") + 0.1 * seed, "rmse": 4.0, "pearson_r": 0.8,
         "r2": 0.6, "gap_age_slope": -0.2, "n_test": n, "path": f"{variant}/{seed}/{split}",
         **{f"gap_age_sum_{key}": 1.0 for key in report_results.GAP_AGE_SUMS}}
        for experiment, variant in (("table3", "adaptive"), ("table3", "simclr"),
                                    ("distance", "cosine"), ("distance", "manhattan"))
        for seed in (0, 1, 2) for split, n in (("fold1", 3), ("fold2", 1))])
    complete = report_results.seed_results(metrics)
    assert len(tables.table3_losses(complete, display_names={})) == 2
    settings = {"cosine": {"loss": {"distance": "cosine"}},
                "manhattan": {"loss": {"distance": "manhattan"}}}
    assert len(tables.ablation_table(complete, "distance", settings)) == 2
    lacking = (metrics["variant"].isin(["adaptive", "cosine"]) & (metrics["seed"] == 1)
               & (metrics["split"] == "fold2"))
    seeds = report_results.seed_results(metrics[~lacking])
    with pytest.raises(targets.ReportError, match=r"experiment 'table3'.*3 test subjects in 1 "
                                                  r"split\(s\): adaptive/seed-1;"):
        tables.table3_losses(seeds, display_names={})
    with pytest.raises(targets.ReportError, match="'distance'.*cosine/seed-1.*evaluate_encoder"):
        tables.ablation_table(seeds, "distance", settings)


def test_read_metrics_names_the_broken_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"split": "holdout", "experiment": "table3"}))
    with pytest.raises(targets.ReportError, match="metrics.json.*variant"):
        report_results.read_metrics([path])
    # a truncated file: json names a line and column, not which of the grid's files
    broken = tmp_path / "seed-3" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text('{"split": "holdout", "mae": 3.')
    with pytest.raises(targets.ReportError, match="seed-3/metrics.json cannot be read as "
                                                  "JSON.*evaluate_encoder"):
        report_results.read_metrics([broken])


def test_ablation_tables_label_and_order_variants(results):
    seeds = report_results.seed_results(report_results.read_metrics(results["metrics"]))
    distance = tables.ablation_table(seeds, "distance", results["settings"]["distance"])
    assert distance["label"].tolist() == ["Manhattan", "Cosine"]
    assert distance["paper_mae_mean"].tolist() == pytest.approx([3.724, 3.748])
    assert distance["setting"].tolist() == ["loss.distance=manhattan", "loss.distance=cosine"]
    sweep = tables.ablation_table(seeds, "lambda", results["settings"]["lambda"])
    assert sweep["variant"].tolist() == ["lam0", "lam1", "hard"]  # by lambda, hard last
    assert sweep["label"].tolist() == ["λ = 0", "λ = 1", "hard (λ→∞)"]
    assert sweep["paper_mae_mean"].iloc[1] == pytest.approx(3.681)
    with pytest.raises(targets.ReportError, match="chebyshev"):
        tables.ablation_table(seeds, "distance", {**results["settings"]["distance"],
                                                  "chebyshev": {}})


def test_variant_labels_resolve_default_augmentation():
    config = validate_config({"experiments": {"augmentation": {"variants": {
        "default": {"loss": {"name": "adaptive"}}, "noise": {"train": {"augmentation": "noise"}},
        "cutout": {"train": {"augmentation": "cutout"}}}}}})
    labels = report_results.variant_labels(targets.experiment_settings(config)["augmentation"])
    # "default" for adaptive means no augmentation
    assert labels["label"].to_dict() == {"default": "None", "noise": "Noise", "cutout": "Cutout"}


def test_cohort_table_counts_studies_sex_and_coverage():
    participants = participants_table()
    table = tables.cohort_table(participants).set_index("study")
    assert list(table.index) == ["study1", "study2", "study3", "Total"]
    assert table.loc["Total", "n"] == 12
    assert table.loc["Total", "n_female"] + table.loc["Total", "n_male"] == 12
    assert table.loc["study1", "age_mean"] == pytest.approx(
        participants.loc[participants["study"] == "study1", "age"].mean())
    assert table.loc["Total", "coverage_min_pct"] == pytest.approx(78.0)
    bad = participants.assign(coverage=participants["coverage"] * 100)
    with pytest.raises(targets.ReportError, match="fraction"):
        tables.cohort_table(bad)


def test_cohort_table_by_hand():
    """Table 2 on a cohort small enough to count: each study's own ages (sd with ddof=1),
    sexes and coverage, studies in natural order (study2 before study10)."""
    participants = pd.DataFrame({
        "participant_id": [f"sub-{i}" for i in range(5)],
        "age": [50.0, 20.0, 30.0, 70.0, 40.0],
        "sex": ["M", "F", "f", "F", "male"],
        "study": ["study10", "study2", "study2", "study10", "study2"],
        "coverage": [0.7, 0.9, 0.8, 0.75, 1.0]})
    table = tables.cohort_table(participants).set_index("study")
    assert list(table.index) == ["study2", "study10", "Total"]
    assert table.loc["study2", ["n", "n_female", "n_male", "n_other"]].tolist() == [3, 2, 1, 0]
    assert table.loc["study10", ["n", "n_female", "n_male", "n_other"]].tolist() == [2, 1, 1, 0]
    assert table.loc["study2", "age_mean"] == pytest.approx(30.0)
    assert table.loc["study2", "age_sd"] == pytest.approx(10.0)  # ddof=1 of 20, 30, 40
    assert table.loc["study10", "age_sd"] == pytest.approx(np.sqrt(200.0))  # 50, 70
    assert table.loc["study2", "coverage_mean_pct"] == pytest.approx(90.0)
    assert table.loc["study2", "coverage_min_pct"] == pytest.approx(80.0)
    assert table.loc["study10", "coverage_mean_pct"] == pytest.approx(72.5)
    assert table.loc["study10", "coverage_sd_pct"] == pytest.approx(np.sqrt(12.5))
    assert table.loc["Total", ["n", "n_female", "n_male"]].tolist() == [5, 3, 2]
    assert table.loc["Total", "coverage_min_pct"] == pytest.approx(70.0)


def test_a_study_named_total_keeps_its_row_apart_from_the_cohorts():
    """A trial called TOTAL gave Table 2 two rows named Total, its own and the cohort's."""
    participants = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3"],
                                 "age": [30.0, 40.0, 50.0], "sex": ["F", "M", "F"],
                                 "study": ["TOTAL", "TOTAL", "B"]})
    table = tables.cohort_table(participants)
    assert table["study"].tolist() == ["B", "TOTAL", "Total (all studies)"]
    assert table["n"].tolist() == [1, 2, 3]


def test_table3_shows_per_study_maes_in_natural_order_and_names_shared_losses_apart(tmp_path):
    """The per-study column of Table 3 lists study2 before study10 (natural order, as
    Table 2), whatever the order of the metrics' columns; two variants training the same
    loss from scratch get rows named <loss>:<variant> and labelled with their variant."""
    rows = []
    for variant, mae in (("simclr", 5.0), ("simclr_long", 4.0), ("adaptive", 3.0)):
        for seed in (0, 1):
            rows.append({"experiment": "table3", "variant": variant, "seed": seed,
                         "loss": variant.split("_")[0], "kind": "contrastive", "readout": "ridge",
                         "mae": mae + seed, "rmse": mae + 1, "pearson_r": 0.8, "r2": 0.6,
                         "gap_age_slope": -0.2, "n_test": 3, "n_splits": 1,
                         "neighbourhood": None, "mae_study_study10": mae + 2 + seed,
                         "mae_study_study2": mae - 1 + seed, "n_study_study10": 1.0,
                         "n_study_study2": 2.0})
    seeds = pd.DataFrame(rows)
    table = tables.table3_losses(seeds, display_names={"simclr": "SimCLR"})
    assert table["loss"].tolist() == ["simclr:simclr", "simclr:simclr_long", "adaptive"]
    assert table["label"].tolist()[:2] == ["SimCLR (simclr)", "SimCLR (simclr_long)"]
    tables.write_table3(table, tables.paired_comparison(seeds), tmp_path / "table3",
                        tmp_path / "paired")
    markdown = (tmp_path / "table3.md").read_text()
    assert "study2 2.5; study10 5.5" in markdown  # adaptive: 2 and 3, 5 and 6 over seeds
    assert "3 test subjects (study2 2, study10 1)." in markdown
    # a study too small for a test place has no per-study MAE: the note names it rather
    # than let it vanish from the table (a consortium's one-subject studies)
    tables.write_table3(table, tables.paired_comparison(seeds), tmp_path / "table3",
                        tmp_path / "paired", studies={"study2", "study10", "Tiny 1", "tiny0"})
    assert ("3 test subjects (study2 2, study10 1); not tested (no test subject): Tiny 1, "
            "tiny0.") in (tmp_path / "table3.md").read_text()


def test_make_tables_writes_csv_markdown_latex(results, tmp_path):
    layout = results["layout"]
    names = targets.report_names(results["config"])["tables"]
    stems = {name: layout.table(name, "") for name in names}
    tables.make_tables(metrics=results["metrics"],
                       participants=results["split_dir"] / "participants.tsv",
                       settings=results["settings"], outputs=stems)
    for name in names:
        for ext in (".csv", ".md", ".tex"):
            assert Path(layout.table(name, ext)).stat().st_size > 0, (name, ext)
    table3 = pd.read_csv(layout.table("table3_losses", ".csv"))
    assert list(table3.columns[:4]) == ["loss", "n_seeds", "mae_mean", "mae_std"]
    assert len(table3) == 3
    markdown = Path(layout.table("table3_losses", ".md")).read_text()
    assert "paper (different data)" in markdown
    # the test subjects behind each per-study MAE (participants_table: ids 0, 4, 8)
    assert "3 test subjects (study1 1, study2 1, study3 1)." in markdown
    for value in ("9.600 ± 1.701", "3.852 ± 0.212", "3.724 ± 0.220"):  # the paper's numbers
        assert value in markdown
    assert "Adaptive Neighborhoods" in markdown and "Paired comparison" in markdown
    # the paper's losses not trained here keep their row, marked, and only in the Markdown
    assert "NNCLR (not run here)" in markdown and "8.526 ± 1.442" in markdown
    assert "Y-Aware (not run here)" not in markdown
    assert len(table3) == 3 and "nnclr" not in set(table3["loss"])
    latex = Path(layout.table("table3_losses", ".tex")).read_text()
    assert r"\begin{tabular}" in latex and r"\ensuremath{\pm}" in latex
    # what the numbers are travels with a table pasted into a paper: the notes, under it
    notes = latex[latex.index(r"\end{tabular}"):latex.index(r"\end{table}")]
    assert (r"mean \ensuremath{\pm} sd over seeds; 3 test subjects (study1 1, study2 1, "
            r"study3 1)") in notes, latex
    paired_latex = Path(layout.table("table3_paired", ".tex")).read_text()
    assert "two-sided paired t-test" in paired_latex and "Wilcoxon signed-rank" in paired_latex
    paired = pd.read_csv(layout.table("table3_paired", ".csv"))
    assert list(paired["baseline"]) == ["simclr", "yaware"]  # Table 3's order
    assert (paired["n_subjects"] == 3).all()  # participants_table's test subjects
    assert (paired["subjects_reference_better"] == 3).all()
    # metrics passed in another order: the same rows, in Table 3's order
    tables.make_tables(metrics=results["metrics"][::-1],
                       participants=results["split_dir"] / "participants.tsv",
                       settings=results["settings"], outputs=stems)
    assert list(pd.read_csv(layout.table("table3_paired", ".csv"))["baseline"]) == [
        "simclr", "yaware"]
    cohort = Path(layout.table("table2_cohort", ".md")).read_text()
    assert "Total" in cohort and "Paper Table 2" in cohort and "134" in cohort
    assert not list(Path(layout.result("tables")).glob(".*"))  # no temporary files left


def test_one_seed_and_no_baselines_are_said_so_not_promised(tmp_path):
    """With one seed the notes promised "mean ± sd over seeds" and a paired t-test; without
    a baseline row, Table 3's title and notes still named baselines."""
    layout = Layout(results=str(tmp_path / "results"))
    config = validate_config({"experiments": {
        "table3": {"seeds": [0], "variants": {name: {"loss": {"name": name}}
                                              for name in LOSS_MAE}},
        "lambda": {"seeds": [0], "variants": {"lam1": {"loss": {"lam": 1.0}},
                                              "hard": {"loss": {"lam": None}}}}}})
    split_dir, settings, metrics = write_grid(layout, config, participants_table())
    names = targets.report_names(config)["tables"]
    tables.make_tables(metrics=metrics, participants=split_dir / "participants.tsv",
                       settings=settings, outputs={name: layout.table(name, "") for name in names})
    table3 = Path(layout.table("table3_losses", ".md")).read_text()
    assert table3.startswith("# Table 3: contrastive losses, test MAE"), table3[:80]
    assert "Ours: test MAE, one seed (no sd); 3 test subjects" in table3
    assert "No baseline was configured" in table3 and "mean ± sd" not in table3
    paired = Path(layout.table("table3_paired", ".md")).read_text()
    assert "One seed each: no sd and no paired test over seeds." in paired
    assert "paired t-test" not in paired
    sweep = Path(layout.table("ablation_lambda", ".md")).read_text()
    assert "Ours: test MAE, one seed (no sd)." in sweep and "loss.lam=null" in sweep
    assert "None" not in sweep


def test_a_list_setting_reads_as_the_config_writes_it():
    labels = report_results.variant_labels({
        "stiffness": {"model": {"modalities": ["stiffness"], "projection_head": True},
                      "readout": {"alphas": [0.1, 1.0]}},
        "both": {"model": {"modalities": ["stiffness", "damping_ratio"],
                           "projection_head": False}, "readout": {"alphas": [1.0]}}})
    assert labels["setting"].to_dict() == {
        "stiffness": "model.modalities=stiffness; model.projection_head=true; "
                     "readout.alphas=[0.1, 1.0]",
        "both": "model.modalities=stiffness + damping_ratio; model.projection_head=false; "
                "readout.alphas=[1.0]"}
    # a row named by its one differing setting reads the same way
    heads = report_results.variant_labels({"on": {"model": {"projection_head": True}},
                                           "off": {"model": {"projection_head": False}}})
    assert heads["label"].to_dict() == {"on": "projection_head = true",
                                        "off": "projection_head = false"}


def test_a_study_mean_baseline_under_leave_one_study_out_says_it_is_the_training_mean(
        tmp_path):
    """Under split.scheme loso no test study has training subjects, so the study-mean
    baseline fell back to the training mean: Table 3 printed two identical baseline rows,
    the caption calling one "what site identity alone gives"."""
    layout = Layout(results=str(tmp_path / "results"))
    config = validate_config({"experiments": {"table3": {"seeds": [0], "variants": {
        "adaptive": {"loss": {"name": "adaptive"}},
        "study_mean": {"model": {"encoder": "none"}, "readout": {"method": "study_mean"}},
        "train_mean": {"model": {"encoder": "none"}, "readout": {"method": "train_mean"}}}}}})
    settings = targets.experiment_settings(config)
    participants = participants_table()
    stems = {name: layout.table(name, "") for name in ("table3_losses", "table3_paired")}
    for splits, noted in ((["losostudy1", "losostudy2"], True), (["fold1", "fold2"], False)):
        metrics = []
        for split in splits:
            for variant in settings["table3"]:
                write_cell(layout, split, "table3", variant, 0, participants, loss="adaptive")
                metrics.append(layout.cell_file(split, "table3", variant, 0, "metrics.json"))
                written = json.loads(Path(metrics[-1]).read_text())  # pooled over splits
                written["gap_age_sums"] = {"n": 3, "age": 150.0, "gap": 3.0,
                                           "age_age": 7600.0, "age_gap": 140.0}
                Path(metrics[-1]).write_text(json.dumps(written))
        tables.make_tables(metrics=metrics, participants=None, settings=settings,
                           outputs=stems)
        for name in stems:
            for ext in (".md", ".tex"):
                written = Path(layout.table(name, ext)).read_text()
                assert (tables.STUDY_MEAN_UNDER_LOSO[:40] in written) == noted, (splits, name)
        # its comparison is the training-mean row's: once in Table 3b and in Holm's family
        compared = pd.read_csv(layout.table("table3_paired", ".csv"))["baseline"].tolist()
        assert sorted(compared) == (["train_mean"] if noted else ["study_mean", "train_mean"])


def test_a_study_mean_baseline_of_a_one_study_cohort_says_it_is_the_training_mean(tmp_path):
    """A lab of one study (the commonest first user) got a study-mean row identical to the
    training-mean row, shown as a result of its own, and Table 3b tested it twice: Holm's
    adjustment over the duplicate raised the training-mean row's p from 0.037 to 0.049."""
    layout = Layout(results=str(tmp_path / "results"))
    config = validate_config({"experiments": {"table3": {"seeds": [0, 1], "variants": {
        "adaptive": {"loss": {"name": "adaptive"}},
        "study_mean": {"model": {"encoder": "none"}, "readout": {"method": "study_mean"}},
        "train_mean": {"model": {"encoder": "none"}, "readout": {"method": "train_mean"}}}}}})
    settings = targets.experiment_settings(config)
    stems = {name: layout.table(name, "") for name in ("table3_losses", "table3_paired")}
    for studies, one in ((["mylab"], True), (STUDIES, False)):
        participants = participants_table(16)
        participants["study"] = [studies[i % len(studies)] for i in range(len(participants))]
        table_path = tmp_path / "participants.tsv"
        participants.to_csv(table_path, sep="\t", index=False)
        metrics = []
        for variant in settings["table3"]:
            for seed in (0, 1):
                write_cell(layout, "holdout", "table3", variant, seed, participants,
                           loss="adaptive")
                metrics.append(layout.cell_file("holdout", "table3", variant, seed,
                                                "metrics.json"))
        tables.make_tables(metrics=metrics, participants=table_path, settings=settings,
                           outputs=stems)
        written = Path(layout.table("table3_losses", ".md")).read_text()
        assert (tables.STUDY_MEAN_OF_ONE_STUDY in written) == one, studies
        paired = pd.read_csv(layout.table("table3_paired", ".csv"))
        assert sorted(paired["baseline"]) == (["train_mean"] if one
                                               else ["study_mean", "train_mean"])
        assert (tables.STUDY_MEAN_LEFT_OUT in Path(layout.table("table3_paired", ".md"))
                .read_text()) == one
        # Holm over the rows Table 3b holds: one row's p is its own
        if one:
            assert paired["subject_p_holm"].tolist() == pytest.approx(
                paired["subject_p_value"].tolist(), nan_ok=True)


def test_latex_caption_of_an_ablation_named_with_an_underscore_is_escaped(tmp_path):
    """Every enabled experiment gets its ablation table, titled "Experiment <name>" when
    ABLATION_TITLES lacks it, and the schema allows underscores in names. pandas escapes the
    cells but not the caption: "\\caption{Experiment my_ablation: ...}" stops pdflatex
    (underscore outside math mode)."""
    table = pd.DataFrame({"variant": ["a_1"], "label": ["a_1"], "setting": ["loss.sigma=1"],
                          "n_seeds": [2], "mae_mean": [4.0], "mae_std": [0.5],
                          "paper_mae_mean": [np.nan], "paper_mae_std": [np.nan]})
    tables.write_ablation(table, "my_ablation", tmp_path / "ablation_my_ablation")
    latex = (tmp_path / "ablation_my_ablation.tex").read_text()
    assert r"\caption{Experiment my\_ablation: test MAE}" in latex, latex
    assert "a\\_1" in latex  # the cells, as before


def test_the_pretraining_table_averages_each_end_of_a_noisy_loss_curve(tmp_path):
    """The demo's 150-epoch run printed 1.156 -> 0.661 from single epochs of a curve that
    jumps between 0.02 and 1.2; the means of its first and last 10 epochs are 0.733 and
    0.519 (and its last epoch was the highest of the last ten)."""
    assert [pretraining.epochs_averaged(n) for n in (3, 19, 20, 150, 400)] == [1, 1, 2, 10, 10]
    losses = np.r_[np.full(10, 0.7), np.full(130, 0.6), np.full(9, 0.5), 1.4]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"loss": "adaptive", "n_train": 12,
                                                  "n_test": 4, "mae": 9.3}))
    pd.DataFrame({"epoch": np.arange(1, 151), "loss": losses}).to_csv(
        run / "history.tsv", sep="\t", index=False)
    runs = pretraining.pretraining_runs({"t1": {"metrics": run / "metrics.json",
                                                "history": run / "history.tsv"}})
    row = runs.iloc[0]
    assert row["loss_epochs_averaged"] == 10
    assert row["first_loss"] == pytest.approx(0.7) and row["last_loss"] == pytest.approx(0.59)
    tables.write_pretraining(runs, pd.DataFrame(columns=list(pretraining.GAIN_COLUMNS)),
                             tmp_path / "pretraining", tmp_path / "gain")
    assert "0.700 → 0.590 (mean of 10 each)" in (tmp_path / "pretraining.md").read_text()
    # the gain table, pasted alone, says what its ± is
    assert "mean ± sd over seeds; positive = pretraining helps" in (
        tmp_path / "gain.md").read_text()


def test_latex_tables_read_as_a_paper_prints_them(tmp_path):
    """Read from the .tex a lab pastes into a paper: the caption said "Table 2: ..." and
    LaTeX numbered it again ("Table 1: Table 2: ..."); numbers sat left-aligned with
    hyphens for minus signs; a first cell "[3T] pilot" after the row break was read as the
    break's length."""
    display = pd.DataFrame({"Study": ["[3T] pilot", "sub-01"], "Gap": ["-0.37", "1e-05"],
                            "Interval": ["0.1 [-2.231, 2.433]", "1.0 [0.5, 1.5]"]})
    tables.write_table(display, display, tmp_path / "cohort", title="Table 2: cohort by study")
    latex = (tmp_path / "cohort.tex").read_text()
    assert r"\caption{cohort by study}" in latex, latex
    assert r"\begin{tabular}{lrl}" in latex  # the numbers right-aligned
    assert "\n{}[3T] pilot & \\ensuremath{-}0.37 & 0.1 [\\ensuremath{-}2.231, 2.433]" in latex
    assert "sub-01 & 1e-05 &" in latex  # a label's and an exponent's hyphen stay


def test_latex_tables_are_ascii(tmp_path):
    """The .tex tables are for pdflatex, which stops at a Unicode character it has no
    definition for: ± λ → were written as math, but not Table 3b's "ΔMAE [years] (other −
    reference)", the pretraining gain's "−", nor Fig. 6's "hard (λ→∞)"."""
    seeds = pd.DataFrame({
        "experiment": "table3", "seed": [0, 1] * 2, "variant": ["adaptive"] * 2 + ["simclr"] * 2,
        "loss": ["adaptive"] * 2 + ["simclr"] * 2, "kind": "contrastive",
        "mae": [3.0, 3.5, 4.0, 4.2], "rmse": 5.0, "pearson_r": 0.8, "r2": 0.6,
        "gap_age_slope": -0.2, "n_test": 8, "neighbourhood": None})
    table = tables.table3_losses(seeds, display_names={"adaptive": "Adaptive Neighborhoods",
                                                       "simclr": "SimCLR", "nnclr": "NNCLR",
                                                       "rnc": "Rank-N-Contrast"})
    tables.write_table3(table, tables.paired_comparison(seeds), tmp_path / "t3", tmp_path / "t3b")
    lam = {"lam1": {"loss": {"name": "adaptive", "lam": 1.0}},
           "hard": {"loss": {"name": "adaptive", "lam": None}}}
    ablation = tables.ablation_table(seeds.assign(experiment="lambda", variant=["lam1", "lam1",
                                                                               "hard", "hard"]),
                                     "lambda", lam)
    tables.write_ablation(ablation, "lambda", tmp_path / "lambda")
    gains = pd.DataFrame([{"label": "Adaptive Neighborhoods", "run": "t1w", "n_pairs": 2,
                           "mae_scratch_mean": 5.0, "mae_pretrained_mean": 4.0,
                           "gain_mean": 1.0, "gain_std": 0.1, "pretrained_wins": 2}])
    runs = pd.DataFrame([{"run": "t1w", "loss": "exponential", "epochs": 3, "n_train": 4,
                          "n_validation": 2, "first_loss": 1.0, "last_loss": 0.5,
                          "validation_mae": 9.0, "validation_pearson_r": 0.8}])
    tables.write_pretraining(runs, gains, tmp_path / "pre", tmp_path / "gain")
    for name in ("t3", "t3b", "lambda", "pre", "gain"):
        latex = (tmp_path / f"{name}.tex").read_text()
        assert latex.isascii(), (name, sorted({c for c in latex if not c.isascii()}))
        # "$$" in a tabular cell is an empty formula: pdflatex then meets \to in text mode
        assert "$$" not in latex, name
    paired = (tmp_path / "t3b.tex").read_text()
    assert r"\ensuremath{\Delta}MAE [years] (other \ensuremath{-} reference)" in paired
    assert (r"hard (\ensuremath{\lambda}\ensuremath{\to}\ensuremath{\infty})"
            in (tmp_path / "lambda.tex").read_text())


def test_labels_are_data_in_tables_and_figures(tmp_path):
    """A study or group name is printed as written: a "|" started another Markdown column,
    and "$50k^$" in a figure's label was read as mathtext and stopped the figure."""
    from brainage.qc import plot_dataset_qc

    markdown = tables.markdown_table(pd.DataFrame({"study": ["ADNI|3T"], "n": ["3"]}))
    assert markdown.splitlines()[-1] == r"| ADNI\|3T |   3 |"
    table = pd.DataFrame({"participant_id": ["sub-a"], "study": ["income $50k^$"],
                          "dice": [0.95], "correlation": [0.8], "coverage": [0.9],
                          "qc_pass": [True]})
    plot_dataset_qc(table, tmp_path / "qc.png",
                    minimums={"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7})
    assert (tmp_path / "qc.png").read_bytes()[:4] == b"\x89PNG"


def test_markdown_tables_print_the_formatted_strings(tmp_path):
    """tabulate re-parsed a column whose cells all look numeric and reprinted it: a single
    seed's Table 3b printed the ΔMAE "0.390" as 0.39, unlike the .tex and .csv files."""
    from brainage.report import tables

    display = pd.DataFrame({"loss": ["SimCLR"], "ΔMAE": ["0.390"], "r": ["0.990"]})
    paths = tables.write_table(display, display, tmp_path / "t", title="T")
    markdown = Path(paths[".md"]).read_text()
    assert "0.390" in markdown and "0.990" in markdown
    assert "|:-------|" in markdown and "-----:|" in markdown  # text left, numbers right
    # the pretraining table's section on the gain, too
    runs = pd.DataFrame({"run": ["t1"], "loss": ["simclr"], "epochs": [2], "n_train": [10],
                         "n_validation": [2], "first_loss": [1.0], "last_loss": [0.5],
                         "validation_mae": [5.1], "validation_pearson_r": [0.5]})
    gains = pd.DataFrame({"label": ["SimCLR"], "run": ["t1"], "n_pairs": [1],
                          "mae_scratch_mean": [5.1], "mae_pretrained_mean": [4.2],
                          "gain_mean": [0.9], "gain_std": [np.nan], "pretrained_wins": [1]})
    tables.write_pretraining(runs, gains, tmp_path / "pre", tmp_path / "gain")
    section = (tmp_path / "pre.md").read_text().split("## Gain of pretraining")[1]
    assert "5.100" in section and "4.200" in section


# ---- figures ----------------------------------------------------------------------------

@pytest.mark.slow
def test_make_figures_writes_every_figure(results):
    layout, config = results["layout"], results["config"]
    names = targets.report_names(config)["figures"]
    paths = {name: layout.figure(name) for name in names}
    focus = targets.focus_cell(config)
    umaps = [name for name in names if targets.is_umap_figure(name)]
    assert umaps == ["fig5_umap"]  # drawn by rule plot_embeddings, as here
    figures.plot_embeddings(figures.load_embeddings(
        layout.cell_file("holdout", *focus, "embeddings")), paths["fig5_umap"])
    figures.make_figures(
        metrics=results["metrics"], participants=results["split_dir"] / "participants.tsv",
        qc=layout.qc_table(), maps=results["maps"],
        predictions=[layout.cell_file("holdout", *focus, "predictions.tsv")],
        settings=results["settings"], focus="table3/adaptive/seed-0",
        qc_thresholds={"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7},
        outputs={name: path for name, path in paths.items() if name not in umaps},
        histories={variant: {seed: layout.cell_file("holdout", "table3", variant, seed,
                                                    "history.tsv")
                             for seed in config["experiments"]["table3"]["seeds"]}
                   for variant in config["experiments"]["table3"]["variants"]})
    for name, path in paths.items():
        assert Path(path).read_bytes()[:4] == b"\x89PNG", name


def test_ablation_figures_draw_no_error_bar_for_a_single_seed(tmp_path, monkeypatch):
    """With one seed the sd is undefined (the table prints the mean alone); the figures drew
    it as 0, a cap at the mean under the legend "mean ± sd over seeds" (config/test.yaml's
    modality ablation has one seed)."""
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    table = pd.DataFrame({"variant": ["a", "b"], "label": ["A", "B"], "mae_mean": [4.0, 5.0],
                          "mae_std": [np.nan, 0.5], "paper_mae_mean": [np.nan, np.nan],
                          "paper_mae_std": [np.nan, np.nan]})
    seeds = pd.DataFrame({"variant": ["a", "b", "b"], "mae": [4.0, 4.6, 5.4]})
    figures.plot_ablation(table, seeds, tmp_path / "a.png", title="t")
    figures.plot_lambda_sweep(table, tmp_path / "l.png")
    for figure in drawn:
        axis = figure.axes[0]
        containers = [c for c in axis.containers if hasattr(c, "has_yerr") and c.has_yerr]
        caps = [np.asarray(line.get_ydata(), float) for c in containers for line in c.lines[1]]
        # the caps of variant a (index 0) are not drawn, those of b at 5.0 ± 0.5
        assert all(np.isnan(cap[0]) for cap in caps), caps
        assert sorted(cap[1] for cap in caps) == pytest.approx([4.5, 5.5])


def test_ablation_figure_shows_every_seed_and_the_papers_error_bar(tmp_path, monkeypatch):
    """The y axis ended at 1.1 × (mean + sd): of five seeds one far from the others lies up
    to 1.8 sd above the mean (here 10 for 2.8 ± 4.0, axis top 7.5), and its dot was cut
    off; the paper's error bar likewise ended above the axis."""
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    maes = [1.0, 1.0, 1.0, 1.0, 10.0]
    table = pd.DataFrame({"variant": ["a", "b"], "label": ["A", "B"],
                          "mae_mean": [np.mean(maes), 2.0],
                          "mae_std": [np.std(maes, ddof=1), 0.1],
                          "paper_mae_mean": [np.nan, 3.0], "paper_mae_std": [np.nan, 3.0]})
    seeds = pd.DataFrame({"variant": ["a"] * 5 + ["b"] * 5, "mae": maes + [2.0] * 5})
    figures.plot_ablation(table, seeds, tmp_path / "a.png", title="t")
    figures.plot_ablation(table.iloc[1:], seeds[seeds["variant"] == "b"], tmp_path / "b.png",
                          title="t")
    assert [figure.axes[0].get_ylim()[0] for figure in drawn] == [0, 0]
    assert drawn[0].axes[0].get_ylim()[1] >= 10.0  # the seed at 10
    assert drawn[1].axes[0].get_ylim()[1] >= 6.0  # the paper's 3.0 ± 3.0


def test_ablation_figures_draw_the_papers_value_beside_ours_and_name_each_entry_once(
        tmp_path, monkeypatch):
    """At the paper's scale its diamond and error bar, drawn at our bar's x, lay over our
    error bar and seed dots; with one seed the legend said "ours: one seed" twice; Fig. 6's
    legend inside the axes covered a point (found by a review)."""
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    table = pd.DataFrame({"variant": ["a", "b"], "label": ["A", "B"], "n_seeds": [1, 1],
                          "mae_mean": [4.0, 4.1], "mae_std": [np.nan, np.nan],
                          "paper_mae_mean": [3.9, 4.0], "paper_mae_std": [0.1, 0.1]})
    seeds = pd.DataFrame({"variant": ["a", "b"], "mae": [4.0, 4.1]})
    figures.plot_ablation(table, seeds, tmp_path / "a.png", title="t")
    figures.plot_lambda_sweep(table, tmp_path / "l.png")
    for figure in drawn:
        axis = figure.axes[0]
        paper = [c for c in axis.containers if c.get_label() == "paper (different data)"]
        x = paper[0].lines[0].get_xdata()
        np.testing.assert_allclose(x, [figures.PAPER_OFFSET, 1 + figures.PAPER_OFFSET])
        texts = [text.get_text() for text in axis.get_legend().get_texts()]
        assert len(texts) == len(set(texts)) and "ours (one seed, no sd)" in texts, texts
        figure.canvas.draw()
        legend = axis.get_legend().get_window_extent(figure.canvas.get_renderer())
        assert legend.y1 <= axis.get_window_extent().y0  # below the axes: covers no point
    two_seeds = table.assign(n_seeds=[2, 2], mae_std=[0.1, 0.1])
    figures.plot_ablation(two_seeds, pd.concat([seeds, seeds]), tmp_path / "b.png", title="t")
    texts = [text.get_text() for text in drawn[-1].axes[0].get_legend().get_texts()]
    assert sorted(texts) == ["ours: each seed", "ours: mean ± sd over seeds",
                             "paper (different data)"]


def test_coverage_figure_rings_the_subjects_below_the_minimum_and_keeps_its_legend_clear(
        tmp_path, monkeypatch):
    """Fig. 7's legend sat inside the axes at the lower left, over the subjects that fail
    the coverage minimum, and nothing marked them (kept in the splits under
    qc.exclude_failed: false); the box medians were the second study's orange."""
    participants = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(8)],
                                 "study": ["s1"] * 4 + ["s2"] * 4,
                                 "coverage": [0.95, 0.92, 0.64, 0.66, 0.97, 0.9, 0.88, 0.69]})
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_coverage(participants, tmp_path / "fig7.png", min_coverage=0.7)
    axis = drawn[0].axes[0]
    ringed = [c for c in axis.collections if c.get_label() == "below the QC minimum"
              or (len(c.get_offsets()) and np.allclose(c.get_edgecolor()[0][:3],
                                                       (0xC4 / 255, 0x4E / 255, 0x52 / 255)))]
    values = sorted(float(y) for c in ringed for _, y in c.get_offsets())
    assert values == pytest.approx([64.0, 66.0, 69.0])
    texts = [text.get_text() for text in axis.get_legend().get_texts()]
    assert texts.count("below the QC minimum") == 1
    drawn[0].canvas.draw()
    legend = axis.get_legend().get_window_extent(drawn[0].canvas.get_renderer())
    assert legend.y1 <= axis.get_window_extent().y0
    medians = [line for line in axis.lines if line.get_label().startswith("_") and
               len(line.get_xdata()) == 2 and line.get_ydata()[0] == line.get_ydata()[1]]
    assert medians and all(line.get_color() == "black" for line in medians)


def _overlaps(legend_box, boxes) -> list:
    return [box for box in boxes if legend_box.overlaps(box)]


def test_ablation_legend_leaves_tilted_tick_labels_free(tmp_path, monkeypatch):
    """With more than four variants the tick labels tilt, and the legend at a fixed offset
    lay over them (config/paper.yaml's predictor and modality ablations: "MLP, squared
    error" under "ours: one seed")."""
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    labels = ["Ridge (the paper's MSE)", "MLP, squared error", "Stiffness + Damping ratio",
              "Stiffness + Damping ratio + T1w", "Damping ratio"]
    table = pd.DataFrame({"variant": list("abcde"), "label": labels,
                          "mae_mean": [4.0, 5.0, 6.0, 4.5, 5.5], "mae_std": [0.3] * 5,
                          "paper_mae_mean": [3.7] + [np.nan] * 4,
                          "paper_mae_std": [0.2] + [np.nan] * 4})
    seeds = pd.DataFrame({"variant": list("abcde") * 2, "mae": [4.0, 5.0, 6.0, 4.5, 5.5] * 2})
    figures.plot_ablation(table, seeds, tmp_path / "a.png", title="t")
    figure = drawn[0]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axis = figure.axes[0]
    ticks = [label.get_window_extent(renderer) for label in axis.get_xticklabels()]
    legend = axis.get_legend().get_window_extent(renderer)
    assert not _overlaps(legend, ticks)
    assert legend.y1 <= min(box.y0 for box in ticks)  # below them, not beside the axes


def test_search_legend_hides_no_trial(tmp_path, monkeypatch):
    """With 30 trials the legend placed "best" inside the axes still lay over one."""
    rng = np.random.default_rng(0)
    splits = ("fold-1", "fold-2")  # k-fold: a panel per split, each with its legend
    trials = report_results.read_search_trials([write_trials(
        tmp_path / split / "trials.tsv",
        [(trial, int(rng.integers(2, 21)), int(rng.integers(1, 11)), float(rng.uniform(3, 6)),
          5.0, 10.0) for trial in range(1, 31)]) for split in splits])
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_search(trials, tmp_path / "search.png")
    figure = drawn[0]
    figure.canvas.draw()
    for axis, split in zip(figure.axes, splits):
        legend = axis.get_legend().get_window_extent(figure.canvas.get_renderer())
        rows = trials[trials["split"] == split]
        points = axis.transData.transform(rows[["nn_final", "nn_step"]].to_numpy(float))
        assert not [tuple(point) for point in points if legend.contains(*point)], split


def test_study_colours_do_not_repeat_beyond_ten_studies():
    """Figures tell studies apart by colour alone; tab10 gave site 11 the colour of site 1."""
    for count in (3, 10, 11, 12, 20, 21, 25):  # each palette's last colour, and the next
        colours = figures._study_colours([f"site{i}" for i in range(1, count + 1)])
        assert len(set(colours.values())) == count
    # up to ten studies, the colours every figure drew so far
    tab10 = headless_pyplot().get_cmap("tab10")
    assert figures._study_colours(["b", "a"]) == {"a": tab10(0), "b": tab10(1)}


def test_coverage_examples_pick_nearest_distinct_subjects():
    participants = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c", "sub-d", "sub-e"],
                                 "coverage": [1.0, 0.99, 0.93, 0.82, 0.6]})
    chosen = figures.pick_coverage_examples(participants)
    assert [c["participant_id"] for c in chosen] == ["sub-a", "sub-b", "sub-c", "sub-d"]
    # with too few subjects, the nearest is reused rather than failing
    few = figures.pick_coverage_examples(participants.iloc[:1])
    assert [c["participant_id"] for c in few] == ["sub-a"] * 4


def test_coverage_figures_name_the_modality_of_the_maps_they_draw(tmp_path, monkeypatch):
    """Figs. 7 and 8 draw the map QC measures coverage on (grid_modality): with
    dataset.modalities [damping_ratio, stiffness] that is the damping ratio, in [0, 1], not
    the stiffness in kPa."""
    from brainage.modalities import grid_modality

    assert grid_modality(["damping_ratio", "stiffness"]) == "damping_ratio"
    maps = {}
    for index in range(4):
        maps[f"sub-{index}"] = str(tmp_path / f"sub-{index}.nii.gz")
        nib.save(nib.Nifti1Image(np.full((6, 6, 6), 0.3, np.float32), np.eye(4)),
                 maps[f"sub-{index}"])
    participants = pd.DataFrame({"participant_id": list(maps), "study": "study1",
                                 "coverage": [1.0, 0.95, 0.9, 0.8]})
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_coverage_examples(participants, maps, tmp_path / "fig8.png",
                                   map_name="damping_ratio")
    figures.plot_coverage(participants, tmp_path / "fig7.png", map_name="damping_ratio")
    figures.plot_coverage_examples(participants, maps, tmp_path / "fig8.png")
    fig8, fig7, default = drawn
    # the paper's view order, as Fig. 2's; the views showing left and right mark the right
    panels = [axis for axis in fig8.axes if axis.images]
    assert [axis.get_title() for axis in panels[:3]] == ["sagittal", "coronal", "axial"]
    # no participant id beside a person's images in a figure that is shared
    assert [axis.get_ylabel().split("\n")[0] for axis in panels if axis.get_ylabel()] == [
        f"example {row}" for row in range(1, 5)]
    assert not any("sub-" in axis.get_ylabel() for axis in fig8.axes)
    assert [[text.get_text() for text in axis.texts] for axis in panels[:3]] == [
        [], ["R"], ["R"]]
    colour_bar = [axis for axis in fig8.axes if not axis.images]
    assert [axis.get_ylabel() for axis in colour_bar] == ["damping ratio [1]"]
    assert "damping-ratio maps" in fig8._suptitle.get_text()
    assert "damping-ratio maps" in fig7.axes[0].get_title()
    assert [axis.get_ylabel() for axis in default.axes if not axis.images] == [
        "stiffness [kPa]"]


def test_figs_2_and_8_draw_voxels_without_a_value_apart_from_the_lowest_stiffness(
        tmp_path, monkeypatch):
    """The brain a slab does not cover (stored as 0) was drawn as 0 kPa, in the black of the
    background, on a scale from 0 that left the brain's values a corner of the colour bar
    (found by a review): such voxels are drawn in a grey magma never takes, and the scale
    spans the 1st to 99th percentile of the voxels with a value."""
    rng = np.random.default_rng(5)
    stiffness = rng.uniform(2.0, 3.0, (10, 10, 10)).astype(np.float32)
    stiffness[:, :, 6:] = 0.0  # a slab: the top of the brain not covered
    stiffness[1, 1, 1] = np.nan
    files = {"stiffness": _write_volume(tmp_path / "stiffness.nii.gz", stiffness),
             "T1w": _write_volume(tmp_path / "T1w.nii.gz", np.where(stiffness > 0, 900.0, 0.0))}
    participants = pd.DataFrame({"participant_id": ["sub-a"], "study": "s", "coverage": [0.6]})
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_age_examples([("sub-a", 40.0, files)], tmp_path / "fig2.png")
    figures.plot_coverage_examples(participants, {"sub-a": files["stiffness"]},
                                   tmp_path / "fig8.png")
    for figure in drawn:
        image = next(axis.images[0] for axis in figure.axes
                     if axis.images and axis.get_title().endswith("coronal"))
        shown = np.ma.masked_invalid(image.get_array())
        assert shown.mask.any() and not shown.mask.all(), "the uncovered part has no value"
        assert 2.0 <= image.get_clim()[0] < 2.1 and 2.9 < image.get_clim()[1] <= 3.0
        no_value = image.get_cmap().get_bad()
        assert tuple(no_value[:3]) == (0.6, 0.6, 0.6)
        assert tuple(no_value[:3]) != tuple(image.get_cmap()(0.0)[:3])
        assert "grey: no value" in figure._suptitle.get_text()
    t1w = next(axis.images[0] for axis in drawn[0].axes
               if axis.images and axis.get_title() == "T1w coronal")
    assert tuple(t1w.get_cmap().get_bad()[:3]) == (0.0, 0.0, 0.0), "a T1w's background black"


def test_the_maps_of_figures_are_known_by_their_file_names():
    """Rule make_figures takes the registered maps as inputs, not as params naming every
    training subject (the report, which is shared, shows a job's params)."""
    maps = ["results/preproc/sub-st1s001/anat/sub-st1s001_space-X_res-2_desc-preproc_T1w.nii.gz",
            "results/preproc/sub-ab2/anat/sub-ab2_space-X_res-2_desc-preproc_stiffness.nii.gz"]
    assert figures.by_participant(maps) == {"sub-st1s001": maps[0], "sub-ab2": maps[1]}
    with pytest.raises(ValueError, match=r"template\.nii\.gz: a file the pipeline made is "
                                         r"named sub-<label>_"):
        figures.by_participant(["results/template.nii.gz"])


def test_figs_2_and_8_show_a_map_stored_las_as_the_same_map_stored_ras(tmp_path, monkeypatch):
    """Figs. 2 and 8 read the voxel arrays without their affine: with FSL's MNI152 (stored
    LAS, template.source file) left and right came out mirrored against nilearn's RAS one
    and the subjects' QC figures (found by a review). The same anatomy stored either way
    draws the same images."""
    rng = np.random.default_rng(3)
    ras = rng.uniform(0.5, 3.0, (8, 10, 7)).astype(np.float32)  # no symmetry to hide a flip
    ras_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    las_affine = ras_affine.copy()
    las_affine[0, 0], las_affine[0, 3] = -2.0, 2.0 * (ras.shape[0] - 1)  # voxel i -> x flipped
    files = {}
    for name, data, affine in (("ras", ras, ras_affine), ("las", ras[::-1], las_affine)):
        files[name] = {key: str(tmp_path / f"{name}_{key}.nii.gz") for key in ("stiffness", "T1w")}
        for path in files[name].values():
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    participants = pd.DataFrame({"participant_id": ["sub-a"], "study": "s", "coverage": [0.97]})
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    for name in ("ras", "las"):
        figures.plot_age_examples([("sub-a", 40.0, files[name])], tmp_path / "fig2.png")
        figures.plot_coverage_examples(participants, {"sub-a": files[name]["stiffness"]},
                                       tmp_path / "fig8.png")
    images = [[np.asarray(image.get_array()) for axis in figure.axes for image in axis.images]
              for figure in drawn]
    for from_ras, from_las in ((images[0], images[2]), (images[1], images[3])):
        assert len(from_ras) == len(from_las) > 0
        for left, right in zip(from_ras, from_las):
            np.testing.assert_array_equal(left, right)


def test_projection_falls_back_to_pca_below_four_samples():
    coords, method = figures.project_2d(np.random.default_rng(0).normal(size=(3, 8)))
    assert method == "PCA" and coords.shape == (3, 2)


@pytest.mark.slow  # umap-learn's numba compilation: 40 s on an AVX2-only 2-core machine
def test_projection_is_umap_from_four_samples():
    coords, method = figures.project_2d(np.random.default_rng(0).normal(size=(4, 8)))
    assert method == "UMAP" and coords.shape == (4, 2) and np.isfinite(coords).all()


@pytest.mark.slow  # umap-learn's numba compilation, twice
def test_the_given_neighbours_give_umaps_own_projection(monkeypatch):
    # project_2d hands UMAP its exact neighbours (sparing the compilation of umap's parallel
    # sort); the figure must stay the one umap-learn draws itself, duplicate rows (ties)
    # included, and umap must take them (not fall back to its own search)
    import umap

    features = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    features[7] = features[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = umap.UMAP(n_neighbors=15, random_state=figures.UMAP_RANDOM_STATE,
                        n_jobs=1).fit_transform(features)
    given = []
    original = umap.UMAP.__init__

    def recording(self, *args, precomputed_knn=(None, None, None), **kwargs):
        given.append(precomputed_knn)
        original(self, *args, precomputed_knn=precomputed_knn, **kwargs)

    monkeypatch.setattr(umap.UMAP, "__init__", recording)
    coords, method = figures.project_2d(features)
    assert method == "UMAP" and given[0][0].shape == (40, 15)
    np.testing.assert_array_equal(coords, own)


@pytest.fixture
def figure_titles(monkeypatch):
    """The suptitles of the figures drawn in a test, in order."""
    titles = []
    plt = headless_pyplot()
    original = plt.Figure.suptitle

    def record(self, text, **kwargs):
        titles.append(text)
        return original(self, text, **kwargs)

    monkeypatch.setattr(plt.Figure, "suptitle", record)
    return titles


def test_pca_fallback_is_named_in_the_figure_title(tmp_path, figure_titles):
    titles = figure_titles
    embeddings = {1: {"features": np.eye(3, 4, dtype=np.float32), "age": np.array([20., 40., 60.]),
                      "subset": np.array(["train", "train", "test"])}}
    figures.plot_embeddings(embeddings, tmp_path / "umap.png", cell="x")
    assert "PCA" in titles[0] and "too few" in titles[0]
    assert (tmp_path / "umap.png").is_file()


def test_umap_title_names_the_features_the_training_embedded(tmp_path, figure_titles):
    """Cells sharing an encoder may read out other features than the training cell
    embedded by epoch: the figure names the kind its files hold, not "read-out"."""
    titles = figure_titles
    rng = np.random.default_rng(0)

    def embeddings(kind):
        extra = {} if kind is None else {"features_kind": np.array(kind)}
        return {1: {"features": rng.normal(size=(3, 4)).astype(np.float32),
                    "age": np.array([20., 40., 60.]),
                    "subset": np.array(["train", "train", "test"]), **extra}}

    for kind in ("encoder", "projection", None):
        figures.plot_embeddings(embeddings(kind), tmp_path / "umap.png", cell="x")
    assert "of the pooled encoder features" in titles[0]
    assert "of the projection-head features" in titles[1]
    assert "of the learnt features" in titles[2]  # files written before the kind was saved
    assert not any("read-out" in title for title in titles)


def test_umap_without_embeddings_says_what_to_do(tmp_path):
    with pytest.raises(targets.ReportError, match="embed_epochs"):
        figures.plot_embeddings({}, tmp_path / "umap.png", cell="table3/adaptive/seed-0")


def test_pretraining_umap_marks_validation_subjects_and_names_its_setting(tmp_path,
                                                                          monkeypatch):
    """A pretraining run's embeddings hold training and validation subjects (no test
    subjects): both are drawn, each with its own marker; an empty run names its key."""
    markers = []
    plt = headless_pyplot()
    original = plt.Axes.scatter

    def record(self, *args, marker=None, label=None, **kwargs):
        markers.append((marker, label))
        return original(self, *args, marker=marker, label=label, **kwargs)

    monkeypatch.setattr(plt.Axes, "scatter", record)
    rng = np.random.default_rng(0)
    # 3 subjects: the PCA projection, so the fast tier compiles no UMAP (40 s); the
    # markers are drawn the same way after either projection
    embeddings = {epoch: {"features": rng.normal(size=(3, 4)).astype(np.float32),
                          "age": np.linspace(20, 80, 3),
                          "subset": np.array(["train"] * 2 + ["validation"])}
                  for epoch in (1, 150)}
    path = tmp_path / "pretraining_umap_t1w.png"
    figures.plot_embeddings(embeddings, path, cell="pretraining run t1w", title="Pretraining")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert markers == [("o", "train (n=2)"), ("s", "validation (n=1)")] * 2
    with pytest.raises(targets.ReportError, match=r"pretrain\.t1w\.train\.embed_epochs"):
        figures.plot_embeddings({}, path, cell="pretraining run t1w",
                                setting="pretrain.t1w.train.embed_epochs")
    embeddings[1]["subset"][0] = "holdout"
    with pytest.raises(targets.ReportError, match="holdout"):
        figures.plot_embeddings(embeddings, path, cell="pretraining run t1w")


def test_each_pretraining_run_has_its_umap_figure():
    config = validate_config({"pretrain": {"t1": {"source": {"kind": "simulate"}},
                                           "big": {"source": {"kind": "simulate"}}}})
    names = targets.report_names(config)["figures"]
    assert {"pretraining", "pretraining_umap_t1", "pretraining_umap_big"} <= set(names)
    # Fig. 5 (the default grid's focus cell) and each run's: jobs of their own
    assert [name for name in names if targets.is_umap_figure(name)] == [
        "fig5_umap", "pretraining_umap_t1", "pretraining_umap_big"]
    assert not any(name.startswith("pretraining_umap")
                   for name in targets.report_names(validate_config({}))["figures"])


# ---- random search ------------------------------------------------------------------------

def write_trials(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["trial", "nn_final", "nn_step", "validation_mae",
                                "validation_rmse", "seconds"]).to_csv(path, sep="\t", index=False)
    return path


def test_search_table_and_figure(tmp_path):
    config = validate_config({"experiments": {}, "search": {"enabled": True}})
    names = targets.report_names(config)
    assert "search_trials" in names["tables"] and "search_trials" in names["figures"]
    trials = write_trials(tmp_path / "search" / "holdout" / "trials.tsv",
                          [(1, 20, 3, 4.5, 5.0, 10.0), (2, 14, 1, 3.9, 4.4, 11.0),
                           (3, 8, 2, 4.1, 4.8, 9.0)])
    table = report_results.read_search_trials([trials])
    assert table["trial"].tolist() == [2, 3, 1] and (table["split"] == "holdout").all()
    stem = tmp_path / "tables" / "search_trials"
    tables.write_search(table, stem)
    markdown = stem.with_suffix(".md").read_text()
    assert "holdout: nn_final 14, nn_step 1 (3.900 years)" in markdown
    figures.plot_search(table, tmp_path / "search.png")
    assert (tmp_path / "search.png").read_bytes()[:4] == b"\x89PNG"
    broken = write_trials(tmp_path / "broken" / "trials.tsv", [])
    pd.read_csv(broken, sep="\t").drop(columns="nn_step").to_csv(broken, sep="\t", index=False)
    with pytest.raises(targets.ReportError, match="nn_step"):
        report_results.read_search_trials([broken])


# ---- Fig. 2: stiffness and T1w at increasing ages -------------------------------------------

def test_age_examples_pick_one_subject_per_age_quartile_sorted_by_age():
    participants = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(9)],
                                 "age": [80, 20, 70, 30, 60, 40, 50, 25, 75]})
    chosen = figures.pick_age_examples(participants)
    ages = [example["age"] for example in chosen]
    assert len(chosen) == 4 and ages == sorted(ages)
    assert len({example["participant_id"] for example in chosen}) == 4
    # Quartile middles of 20-80 years: one subject from each quarter of the age range.
    assert ages[0] < 35 and 35 <= ages[1] < 50 and 50 <= ages[2] < 70 and ages[3] >= 70
    few = figures.pick_age_examples(participants.iloc[:2])
    assert [example["participant_id"] for example in few] == ["sub-01"] * 2 + ["sub-00"] * 2


def _write_volume(path: Path, data: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return str(path)


def test_age_examples_figure_draws_six_views_per_subject_youngest_first(tmp_path, monkeypatch,
                                                                      caplog):
    grid = np.indices((20, 24, 18)).astype(float)
    brain = ((grid - np.array([10, 12, 9])[:, None, None, None]) ** 2).sum(0) < 49
    subjects = []
    for participant, age in (("sub-c", 71.5), ("sub-a", 23.0), ("sub-d", 80.0), ("sub-b", 45.2)):
        stiffness = brain * (3.0 - 0.01 * age)
        stiffness[0, 0, 0] = np.nan  # a failed inversion must not break the colour scale
        subjects.append((participant, age, {
            "stiffness": _write_volume(tmp_path / f"{participant}_stiffness.nii.gz", stiffness),
            "T1w": _write_volume(tmp_path / f"{participant}_T1w.nii.gz", brain * 900.0)}))
    drawn = []
    original = figures._save

    def keep(figure, path):
        drawn.append(figure)
        original(figure, path)

    monkeypatch.setattr(figures, "_save", keep)
    path = tmp_path / "fig2.png"
    with caplog.at_level("INFO", logger="brainage.report.figures"):
        figures.plot_age_examples(subjects, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    figure = drawn[0]
    panels = [axis for axis in figure.axes if axis.images]
    colour_bars = [axis for axis in figure.axes if not axis.images]
    assert len(panels) == 4 * 6
    assert sorted(axis.get_ylabel() for axis in colour_bars) == ["T1w [a.u.]",
                                                               "stiffness [kPa]"]
    rows = [axis.get_ylabel() for axis in panels if axis.get_ylabel()]
    # a figure that is shared shows no participant id and no exact age beside a person's
    # images; the job's log names them for the lab
    assert rows == ["example 1\n23 years", "example 2\n45 years", "example 3\n72 years",
                    "example 4\n80 years"]
    assert ("Fig. 2's examples, top to bottom: sub-a (23.0 years), sub-b (45.2 years), "
            "sub-c (71.5 years), sub-d (80.0 years)") in caplog.text
    titles = [axis.get_title() for axis in panels[:6]]
    # the paper's order, as Fig. 8's; the views that show left and right mark the right
    assert titles == ["stiffness sagittal", "stiffness coronal", "stiffness axial",
                      "T1w sagittal", "T1w coronal", "T1w axial"]
    assert [[text.get_text() for text in axis.texts] for axis in panels[:6]] == [
        [], ["R"], ["R"], [], ["R"], ["R"]]
    limits = {axis.images[0].get_clim() for axis in panels[:3]}
    assert len(limits) == 1 and 2.0 < limits.pop()[1] < 3.0, "one stiffness scale in kPa"


def test_age_examples_figure_names_a_missing_image(tmp_path):
    volume = _write_volume(tmp_path / "map.nii.gz", np.ones((4, 4, 4)))
    with pytest.raises(targets.ReportError, match="sub-x.*T1w"):
        figures.plot_age_examples([("sub-x", 30.0, {"stiffness": volume})],
                                  tmp_path / "fig2.png")


# ---- pretraining ------------------------------------------------------------------------

def test_fine_tuned_rows_and_the_gain_of_pretraining(tmp_path):
    """A variant fine-tuned from a pretraining run: its own Table 3 row right after the same
    loss from scratch (initialisation named), and the gain paired over seeds."""
    config = validate_config({
        "pretrain": {"t1": {"source": {"kind": "simulate"}}},
        "experiments": {"table3": {"seeds": [0, 1, 2], "variants": {
            "yaware": {"loss": {"name": "yaware"}},
            "adaptive": {"loss": {"name": "adaptive"}},
            "adaptive_pretrained": {"loss": {"name": "adaptive"},
                                    "model": {"init": "pretrained:t1"}},
            "pca_ridge": {"model": {"encoder": "none"}, "readout": {"method": "pca_ridge"}}}}}})
    settings = targets.experiment_settings(config)
    layout = Layout(results=str(tmp_path / "results"))
    participants = participants_table()
    metrics = []
    for variant, cell in settings["table3"].items():
        for seed in (0, 1, 2):
            write_cell(layout, "holdout", "table3", variant, seed, participants,
                       loss=cell["loss"]["name"])
            metrics.append(layout.cell_file("holdout", "table3", variant, seed, "metrics.json"))
    seeds = report_results.seed_results(report_results.read_metrics(metrics))
    # cell_mae: adaptive 3.5 + 0.1 seed; adaptive_pretrained 4.0 + 0.1 * 19 + 0.1 seed
    table = tables.table3_losses(seeds, settings=settings["table3"]).set_index("variant")
    assert list(table.index) == ["yaware", "adaptive", "adaptive_pretrained", "pca_ridge"]
    assert table.loc["adaptive", "loss"] == "adaptive"  # the contract row keeps its name
    assert table.loc["adaptive_pretrained", "loss"] == "adaptive:adaptive_pretrained"
    assert table.loc["adaptive_pretrained", "init"] == "pretrained:t1"
    assert table.loc["adaptive", "init"] == "scratch" and table.loc["pca_ridge", "init"] == "none"
    assert "fine-tuned from t1" in table.loc["adaptive_pretrained", "label"]
    # the paper fine-tuned every encoder: its value stands beside the fine-tuned row only,
    # and beside a loss that has no fine-tuned row (yaware here)
    assert table.loc["adaptive_pretrained", "paper_mae_mean"] == pytest.approx(3.724)
    assert np.isnan(table.loc["adaptive", "paper_mae_mean"])
    assert table.loc["yaware", "paper_mae_mean"] == pytest.approx(3.852)
    gains = pretraining.pretraining_gains(seeds, settings["table3"])
    assert len(gains) == 1
    gain = gains.iloc[0]
    assert (gain["scratch_variant"], gain["pretrained_variant"], gain["run"]) == (
        "adaptive", "adaptive_pretrained", "t1")
    assert gain["n_pairs"] == 3 and gain["pretrained_wins"] == 0
    assert gain["gain_mean"] == pytest.approx(3.5 - (4.0 + 0.1 * len("adaptive_pretrained")))
    # the report's section: one row per run from its metrics and history
    run = tmp_path / "pretrain"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"loss": "exponential", "n_train": 12,
                                                  "n_test": 4, "mae": 9.3, "pearson_r": 0.88}))
    pd.DataFrame({"epoch": [1, 2], "loss": [1.2, 0.7]}).to_csv(run / "history.tsv", sep="\t",
                                                             index=False)
    runs = pretraining.pretraining_runs({"t1": {"metrics": run / "metrics.json",
                                                "history": run / "history.tsv"}})
    assert runs.iloc[0].to_dict() == {"run": "t1", "loss": "exponential", "epochs": 2,
                                      "n_train": 12, "n_validation": 4, "first_loss": 1.2,
                                      "last_loss": 0.7, "loss_epochs_averaged": 1,
                                      "validation_mae": 9.3, "validation_pearson_r": 0.88}
    tables.write_pretraining(runs, gains, tmp_path / "pretraining", tmp_path / "pretraining_gain")
    assert "Gain of pretraining" in (tmp_path / "pretraining.md").read_text()
    assert pd.read_csv(tmp_path / "pretraining_gain.csv")["n_pairs"].tolist() == [3]
    figures.plot_pretraining({"t1": run / "history.tsv"}, runs, gains, seeds,
                             tmp_path / "pretraining.png")
    assert (tmp_path / "pretraining.png").stat().st_size > 0


def test_table3_refuses_a_configured_variant_without_results(results):
    """A Table 3 variant of the config whose metrics are missing must stop the table, as
    in every ablation table: dropping its row silently left Table 3 without it, and the
    markdown then listed that configured loss as "(not run here)"."""
    seeds = report_results.seed_results(report_results.read_metrics(results["metrics"]))
    settings = results["settings"]["table3"]
    without_yaware = seeds[~((seeds["experiment"] == "table3")
                             & (seeds["variant"] == "yaware"))]
    with pytest.raises(targets.ReportError, match="'table3'.*yaware.*metrics.json"):
        tables.table3_losses(without_yaware, settings=settings)
    assert len(tables.table3_losses(seeds, settings=settings)) == 3


def test_age_bias_is_the_slope_over_all_test_subjects_of_the_splits(tmp_path):
    """Table 3's age bias is "the least-squares slope of (predicted − true age) against
    age on the test subjects". With leave-one-study-out each split tests one study of a
    narrow age range: a model that gets every study's age level right but not the spread
    within it has a slope near −1 in each split, near 0 over the test subjects. The mean
    of the splits' slopes reported the former (−0.86 here for 0.006)."""
    rng = np.random.default_rng(0)
    paths, ages, predicted = [], [], []
    for index, centre in enumerate((25.0, 45.0, 70.0)):
        age = centre + rng.uniform(-3, 3, 10)
        guess = centre + rng.normal(0, 1, 10)
        metrics = compute_metrics(age, guess, np.full(10, f"study{index}"))
        metrics.update({"split": f"loso-study{index}", "experiment": "table3",
                        "variant": "adaptive", "seed": 0, "loss": "adaptive",
                        "readout": "ridge", "n_train": 20, "n_test": 10})
        paths.append(tmp_path / f"metrics-{index}.json")
        paths[-1].write_text(json.dumps(metrics))
        ages.append(age)
        predicted.append(guess)
    age, guess = np.concatenate(ages), np.concatenate(predicted)
    expected = np.polyfit(age, guess - age, 1)[0]
    row = report_results.seed_results(report_results.read_metrics(paths)).iloc[0]
    assert abs(expected) < 0.05
    assert row["gap_age_slope"] == pytest.approx(expected)
    # metrics written before the sums were recorded cannot pool the slope: say so
    for path in paths[1:]:
        old = json.loads(path.read_text())
        del old["gap_age_sums"]
        path.write_text(json.dumps(old))
    with pytest.raises(targets.ReportError, match="metrics-1.json, .*metrics-2.json.*"
                                                  "gap_age_sums.*evaluate_encoder"):
        report_results.seed_results(report_results.read_metrics(paths))
    # one split: its own slope, whatever version wrote it
    single = report_results.seed_results(report_results.read_metrics(paths[1:2])).iloc[0]
    assert single["gap_age_slope"] == pytest.approx(
        json.loads(paths[1].read_text())["gap_age_slope"])


def test_paired_comparison_text_names_the_reference_row(tmp_path):
    """As in config/paper.yaml, the reference of the paired comparison is the fine-tuned
    Adaptive Neighborhoods row ("adaptive") and another row trains the same loss from
    scratch. Table 3's markdown named the reference "Adaptive Neighborhoods", the label of
    the scratch row: "Adaptive Neighborhoods: ΔMAE ..., Adaptive Neighborhoods better in
    3/3" compared a row with itself, and the wrong one was credited with the wins."""
    config = validate_config({
        "pretrain": {"t1": {"source": {"kind": "simulate"}}},
        "experiments": {"table3": {"seeds": [0, 1, 2], "variants": {
            "adaptive": {"loss": {"name": "adaptive"}, "model": {"init": "pretrained:t1"}},
            "adaptive_scratch": {"loss": {"name": "adaptive"}},
            "yaware": {"loss": {"name": "yaware"}, "model": {"init": "pretrained:t1"}}}}}})
    settings = targets.experiment_settings(config)["table3"]
    layout = Layout(results=str(tmp_path / "results"))
    participants = participants_table()
    metrics = []
    for variant, cell in settings.items():
        for seed in (0, 1, 2):
            write_cell(layout, "holdout", "table3", variant, seed, participants,
                       loss=cell["loss"]["name"])
            metrics.append(layout.cell_file("holdout", "table3", variant, seed, "metrics.json"))
    seeds = report_results.seed_results(report_results.read_metrics(metrics))
    table = tables.table3_losses(seeds, settings=settings)
    paired = tables.paired_comparison(seeds)
    assert set(paired["reference"]) == {"adaptive"}
    tables.write_table3(table, paired, tmp_path / "t3", tmp_path / "t3b")
    markdown = (tmp_path / "t3.md").read_text()
    reference = "Adaptive Neighborhoods, fine-tuned from t1"
    bullet = next(line for line in markdown.splitlines()
                  if line.startswith("- Adaptive Neighborhoods:"))
    assert f"{reference} better in" in bullet, bullet
    assert f"MAE({reference})" in markdown


def test_training_loss_panels_name_rows_that_share_a_label_apart(tmp_path, monkeypatch):
    """Two Table 3 variants of one loss from scratch (two neighbourhood schedules): Table
    3 labels them "Adaptive Neighborhoods (a4)" and "(a8)", the training-loss figure (one
    panel per Table 3 row) titled both panels "Adaptive Neighborhoods"."""
    config = validate_config({"experiments": {"table3": {"seeds": [0], "variants": {
        "a4": {"loss": {"name": "adaptive", "nn_final": 4}},
        "a8": {"loss": {"name": "adaptive", "nn_final": 8}},
        "yaware": {"loss": {"name": "yaware"}}}}}})
    settings = targets.experiment_settings(config)
    participants = tmp_path / "participants.tsv"
    participants_table().to_csv(participants, sep="\t", index=False)
    drawn = {}
    monkeypatch.setattr(figures, "plot_training_loss",
                        lambda histories, path, *, labels: drawn.update(labels))
    figures.make_figures(metrics=[], participants=participants, qc="", maps={},
                         predictions=[], settings=settings, focus="", qc_thresholds={},
                         outputs={targets.TRAINING_FIGURE: tmp_path / "loss.png"},
                         histories={"a4": {0: "x"}, "a8": {0: "y"}, "yaware": {0: "z"}})
    assert drawn == {"a4": "Adaptive Neighborhoods (a4)", "a8": "Adaptive Neighborhoods (a8)",
                     "yaware": "Y-Aware"}


def test_qc_overview_counts_a_metric_it_cannot_draw(tmp_path, monkeypatch):
    """A subject whose correlation is NaN fails QC and is counted as flagged in the title,
    but has no point in that panel: the panel says so."""
    from brainage.qc import plot_dataset_qc

    titles = []
    plt = headless_pyplot()
    original = plt.Axes.set_title

    def record(self, text, *args, **kwargs):
        titles.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "set_title", record)
    table = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c"],
                          "study": ["s1", "s1", "s2"], "dice": [0.95, 0.9, 0.93],
                          "correlation": [0.8, np.nan, 0.7], "coverage": [0.9, 0.95, 0.9],
                          "qc_pass": [True, False, True]})
    plot_dataset_qc(table, tmp_path / "qc.png",
                    minimums={"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7})
    assert titles == ["dice", "correlation (1 not computed, flagged)", "coverage"]
    assert (tmp_path / "qc.png").read_bytes()[:4] == b"\x89PNG"


def test_qc_overview_draws_no_minimum_for_a_correlation_it_does_not_judge(tmp_path,
                                                                          monkeypatch):
    """A cohort whose only map is the damping ratio has its correlation recorded, not
    judged (qc.correlation_applies): the overview drew every subject far below the dashed
    "configured minimum" and in blue, against its caption."""
    from brainage.qc import plot_dataset_qc

    plt = headless_pyplot()
    titles, lines = [], []
    original_title, original_line = plt.Axes.set_title, plt.Axes.axhline
    drawn = []
    monkeypatch.setattr(plt.Axes, "set_title", lambda self, text, *args, **kwargs: (
        titles.append(text), drawn.append(self.figure),
        original_title(self, text, *args, **kwargs))[2])
    monkeypatch.setattr(plt.Axes, "axhline", lambda self, y, *args, **kwargs: (
        lines.append(y), original_line(self, y, *args, **kwargs))[1])
    table = pd.DataFrame({"participant_id": ["sub-a", "sub-b"], "study": ["s1", "s2"],
                          "dice": [0.95, 0.9], "correlation": [0.01, -0.03],
                          "correlation_map": ["damping_ratio", "damping_ratio"],
                          "coverage": [0.9, 0.95], "qc_pass": [True, True]})
    minimums = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}
    plot_dataset_qc(table, tmp_path / "qc.png", minimums=minimums)
    assert titles == ["dice", "correlation (2 recorded, not judged (grey))", "coverage"]
    assert lines == [0.85, 70.0]
    from matplotlib.colors import to_rgba

    dice, correlation, _ = drawn[0].axes
    assert tuple(correlation.collections[0].get_facecolors()[0]) == to_rgba("tab:gray")
    assert tuple(dice.collections[0].get_facecolors()[0]) == to_rgba("tab:blue")
    # a stiffness map's correlation is judged, and a table from before the column too
    titles.clear(), lines.clear()
    plot_dataset_qc(table.assign(correlation_map="stiffness"), tmp_path / "qc.png",
                    minimums=minimums)
    assert lines == [0.85, 0.3, 70.0] and titles[1] == "correlation"
    lines.clear()
    plot_dataset_qc(table.drop(columns="correlation_map"), tmp_path / "qc.png",
                    minimums=minimums)
    assert lines == [0.85, 0.3, 70.0]
    # coverage in %, as in Fig. 7, with its unit on the axis (it read as a fraction, unnamed)
    coverage = drawn[-1].axes[2]
    assert coverage.get_ylabel() == "brain coverage [%]"
    np.testing.assert_allclose(coverage.collections[0].get_offsets()[:, 1], [90.0])


def test_an_untrained_pretraining_run_is_reported_without_a_umap(tmp_path):
    """pretrain.<run>.train.epochs 0 passes validation (an untrained encoder), and its job
    writes an empty history.tsv and no embeddings file. The report used to stop on both,
    after every training: pretraining_runs refused the empty history, and the run's
    pretraining_umap figure was requested although nothing was embedded."""
    config = validate_config({"pretrain": {
        "t1": {"source": {"kind": "simulate"}},
        "untrained": {"source": {"kind": "simulate"}, "train": {"epochs": 0}},
        "late": {"source": {"kind": "simulate"}, "train": {"epochs": 4, "embed_epochs": [5]}}}})
    names = targets.report_names(config)["figures"]
    assert "pretraining_umap_t1" in names and "pretraining" in names
    assert "pretraining_umap_untrained" not in names and "pretraining_umap_late" not in names
    run = tmp_path / "untrained"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"loss": "exponential", "n_train": 12,
                                                  "n_test": 4, "mae": 11.0, "pearson_r": 0.5}))
    pd.DataFrame(columns=["epoch", "loss", "lr", "seconds", "nn_nb"]).to_csv(
        run / "history.tsv", sep="\t", index=False)
    runs = pretraining.pretraining_runs({"untrained": {"metrics": run / "metrics.json",
                                                       "history": run / "history.tsv"}})
    row = runs.iloc[0]
    assert row["epochs"] == 0 and np.isnan(row["first_loss"]) and np.isnan(row["last_loss"])
    assert row["validation_mae"] == 11.0
    tables.write_pretraining(runs, pd.DataFrame(columns=list(pretraining.GAIN_COLUMNS)),
                             tmp_path / "pretraining", tmp_path / "pretraining_gain")
    assert "untrained" in (tmp_path / "pretraining.md").read_text()


# ---- pinned by hand-made mutants ----------------------------------------------------------

def test_report_names_draw_only_figures_that_have_their_data():
    """Fig. 2 needs both stiffness and T1w; the training-loss figure exists only beside
    Table 3 (its histories are the loss experiment's: without it the figure fails with "no
    training history"); a pretraining run whose last epoch is embedded has its UMAP."""
    both = targets.report_names(validate_config({"dataset": {"modalities": ["stiffness",
                                                                         "T1w"]}}))
    assert both["figures"][0] == "fig2_modalities"
    for modalities in (["stiffness"], ["T1w"]):
        names = targets.report_names(validate_config({"dataset": {"modalities": modalities}}))
        assert "fig2_modalities" not in names["figures"]
    assert "training_loss" in targets.report_names(grid_config())["figures"]
    widths = validate_config({"experiments": {"widths": {"seeds": [0], "variants": {
        "narrow": {"model": {"hidden_dim": 64}}, "wide": {"model": {"hidden_dim": 1024}}}}}})
    assert "training_loss" not in targets.report_names(widths)["figures"]
    # a Table 3 of baselines only (a new dataset checked before any training): no curve,
    # where the figure was planned and make_figures, the run's last job, failed
    baselines = validate_config({"experiments": {"table3": {"seeds": [0, 1], "variants": {
        "train_mean": {"model": {"encoder": "none"}, "readout": {"method": "train_mean"}},
        "pca_ridge": {"model": {"encoder": "none"}, "readout": {"method": "pca_ridge"}},
        "untrained": {"train": {"epochs": 0}}}}}})
    assert targets.trained_cells(baselines) == []
    assert "training_loss" not in targets.report_names(baselines)["figures"]
    assert "table3_losses" in targets.report_names(baselines)["tables"]
    baselines["experiments"]["table3"]["variants"]["simclr"] = {"loss": {"name": "simclr"}}
    baselines = validate_config(baselines)
    assert targets.trained_cells(baselines) == [("simclr", 0), ("simclr", 1)]
    assert "training_loss" in targets.report_names(baselines)["figures"]
    last = validate_config({"pretrain": {"t1": {"source": {"kind": "simulate"}, "train": {
        "epochs": 5, "embed_epochs": [5]}}}})
    assert "pretraining_umap_t1" in targets.report_names(last)["figures"]


def test_baseline_rows_name_what_the_cell_is():
    """Each baseline's row label: epochs 0 from scratch is the untrained network, from a
    pretraining run or an external checkpoint the frozen pretrained one; PCA + Ridge on
    voxels is not plain Ridge; a checkpoint-initialised encoder says so."""
    config = validate_config({
        "pretrain": {"t1": {"source": {"kind": "simulate"}}},
        "experiments": {"table3": {"seeds": [0], "variants": {
            "untrained": {"train": {"epochs": 0}},
            "frozen": {"train": {"epochs": 0}, "model": {"init": "pretrained:t1"}},
            "ridge": {"model": {"encoder": "none"}, "readout": {"method": "ridge"}},
            "pca_ridge": {"model": {"encoder": "none"}, "readout": {"method": "pca_ridge"}},
            "tuned": {"model": {"init": "pretrained:t1"}}}}}})
    settings = targets.experiment_settings(config)["table3"]
    names = {"adaptive": "Adaptive Neighborhoods"}
    labels = {variant: report_results.cell_label(cell, names)
              for variant, cell in settings.items()}
    assert labels == {
        "untrained": "Untrained ResNet-18 + read-out (baseline)",
        "frozen": "Pretrained ResNet-18, not fine-tuned (baseline)",
        "ridge": "Ridge on voxels (baseline)",
        "pca_ridge": "PCA + Ridge on voxels (baseline)",
        "tuned": "Adaptive Neighborhoods, fine-tuned from t1"}
    checkpoint = {**settings["tuned"], "model": {**settings["tuned"]["model"],
                                                 "init": "scratch",
                                                 "init_checkpoint": "encoder.pt"}}
    assert report_results.initialisation(checkpoint) == "checkpoint"
    assert report_results.cell_label(checkpoint, names) == (
        "Adaptive Neighborhoods, fine-tuned from an external checkpoint")
    frozen = {**checkpoint, "train": {**checkpoint["train"], "epochs": 0}}
    assert report_results.baseline_key(frozen) == "pretrained_frozen"


def test_variants_differing_in_several_settings_are_labelled_by_their_names():
    settings = {
        "small": {"loss": {"name": "adaptive"}, "model": {"hidden_dim": 64, "depth": 2}},
        "large": {"loss": {"name": "adaptive"}, "model": {"hidden_dim": 512, "depth": 4}}}
    labels = report_results.variant_labels(settings)
    assert labels["label"].to_dict() == {"small": "small", "large": "large"}
    assert labels.loc["small", "setting"] == "model.depth=2; model.hidden_dim=64"


def test_cells_over_different_numbers_of_splits_are_refused():
    """Same number of test subjects, one cell over one split and the other over two: not
    the same evaluation, refused as a cell lacking a split is."""
    seeds = pd.DataFrame({"experiment": "distance", "variant": ["a", "b"], "seed": 0,
                          "n_test": 4, "n_splits": [1, 2]})
    with pytest.raises(targets.ReportError, match=r"4 test subjects in 1 split\(s\): a/seed-0; "
                                                  r"4 test subjects in 2 split\(s\): b/seed-0"):
        report_results.check_same_test_subjects(seeds, "distance")


def test_a_pretrained_variant_that_trains_no_epoch_is_no_fine_tuning_gain():
    """config/paper.yaml's frozen baseline (the pretrained encoder, 0 epochs) differs from
    the untrained baseline only in model.init: paired, it became a "fine-tuned" row of the
    gain table and figure (found by a review)."""
    config = validate_config({
        "pretrain": {"t1": {"source": {"kind": "simulate"}}},
        "experiments": {"table3": {"seeds": [0], "variants": {
            "adaptive": {"loss": {"name": "adaptive"}},
            "adaptive_t1": {"loss": {"name": "adaptive"}, "model": {"init": "pretrained:t1"}},
            "untrained": {"train": {"epochs": 0}},
            "frozen_t1": {"train": {"epochs": 0}, "model": {"init": "pretrained:t1"}}}}}})
    settings = targets.experiment_settings(config)["table3"]
    assert pretraining.pretraining_pairs(settings) == [("adaptive", "adaptive_t1", "t1")]
    paper = targets.experiment_settings(load_config(REPO / "config" / "paper.yaml"))["table3"]
    assert all(paper[pretrained]["train"]["epochs"] > 0
               for _, pretrained, _ in pretraining.pretraining_pairs(paper))


def test_pretraining_gain_and_runs_by_hand(tmp_path, monkeypatch):
    """Gain = scratch − fine-tuned over the seeds both have (the scratch row's fourth seed
    is left out of its mean), sd with ddof=1, a tie is no win; a pair without a common seed
    has no row. A run's last loss is its last epoch's, not its lowest."""
    config = validate_config({
        "pretrain": {"t1": {"source": {"kind": "simulate"}}},
        "experiments": {"table3": {"seeds": [0], "variants": {
            "adaptive": {"loss": {"name": "adaptive"}},
            "adaptive_t1": {"loss": {"name": "adaptive"}, "model": {"init": "pretrained:t1"}},
            "yaware": {"loss": {"name": "yaware"}},
            "yaware_t1": {"loss": {"name": "yaware"}, "model": {"init": "pretrained:t1"}}}}}})
    settings = targets.experiment_settings(config)["table3"]
    rows = ([("adaptive", seed, mae) for seed, mae in enumerate([4.0, 5.0, 6.0, 100.0])]
            + [("adaptive_t1", seed, mae) for seed, mae in enumerate([3.0, 5.0, 4.0])]
            + [("yaware", 0, 5.0), ("yaware_t1", 5, 4.0)])
    seeds = pd.DataFrame(rows, columns=["variant", "seed", "mae"]).assign(experiment="table3")
    gains = pretraining.pretraining_gains(seeds, settings)
    assert gains["pretrained_variant"].tolist() == ["adaptive_t1"]
    gain = gains.iloc[0]
    assert gain["label"] == "Adaptive Neighborhoods"  # the loss, as the scratch row names it
    assert gain["n_pairs"] == 3 and gain["pretrained_wins"] == 2  # gains 1, 0, 2
    assert gain["mae_scratch_mean"] == pytest.approx(5.0)
    assert gain["mae_pretrained_mean"] == pytest.approx(4.0)
    assert gain["gain_mean"] == pytest.approx(1.0) and gain["gain_std"] == pytest.approx(1.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"loss": "exponential", "n_train": 12,
                                                  "n_test": 4, "mae": 9.3}))
    pd.DataFrame({"epoch": [1, 2, 3], "loss": [1.2, 0.6, 0.9]}).to_csv(
        run / "history.tsv", sep="\t", index=False)
    runs = pretraining.pretraining_runs({"t1": {"metrics": run / "metrics.json",
                                                "history": run / "history.tsv"}})
    assert runs.iloc[0][["epochs", "first_loss", "last_loss"]].tolist() == [3, 1.2, 0.9]
    # the figure's bars: from scratch (grey) first, then fine-tuned (blue)
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_pretraining({"t1": run / "history.tsv"}, runs, gains, seeds,
                             tmp_path / "pretraining.png")
    bars = drawn[0].axes[1]
    assert [patch.get_height() for patch in bars.patches] == pytest.approx([5.0, 4.0])
    assert bars.patches[0].get_facecolor()[:3] == pytest.approx((0.6, 0.6, 0.6))


def test_ablation_figures_draw_their_own_experiments_seeds_over_each_bar(tmp_path,
                                                                          monkeypatch):
    """A distance variant named like a Table 3 variant ("adaptive") gets the dots of its
    own two seeds, not Table 3's as well, each over its own bar; the λ experiment is drawn
    as the sweep of Fig. 6."""
    from matplotlib.collections import PathCollection

    config = validate_config({"experiments": {
        "table3": {"seeds": [0, 1], "variants": {"adaptive": {"loss": {"name": "adaptive"}},
                                                 "yaware": {"loss": {"name": "yaware"}}}},
        "distance": {"seeds": [0, 1], "variants": {
            "adaptive": {"loss": {"distance": "manhattan"}},
            "cosine": {"loss": {"distance": "cosine"}}}},
        "lambda": {"seeds": [0], "variants": {"lam1": {"loss": {"lam": 1.0}},
                                              "hard": {"loss": {"lam": None}}}}}})
    settings = targets.experiment_settings(config)
    layout = Layout(results=str(tmp_path / "results"))
    participants = participants_table()
    participants.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    metrics = []
    for experiment, variants in settings.items():
        for variant, cell in variants.items():
            for seed in config["experiments"][experiment]["seeds"]:
                write_cell(layout, "holdout", experiment, variant, seed, participants,
                           loss=cell["loss"]["name"], epochs=())
                metrics.append(layout.cell_file("holdout", experiment, variant, seed,
                                                "metrics.json"))
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.make_figures(metrics=metrics, participants=tmp_path / "participants.tsv", qc="",
                         maps={}, predictions=[], settings=settings, focus="",
                         qc_thresholds={},
                         outputs={"fig4a_distance": tmp_path / "a.png",
                                  "fig6_lambda": tmp_path / "l.png"})
    distance, sweep = (figure.axes[0] for figure in drawn)
    seeds = report_results.seed_results(report_results.read_metrics(metrics))
    table = tables.ablation_table(seeds, "distance", settings["distance"])
    dots = np.concatenate([collection.get_offsets() for collection in distance.collections
                           if isinstance(collection, PathCollection)])  # the seeds' dots
    for position, variant in enumerate(table["variant"]):
        mine = dots[np.abs(dots[:, 0] - position) < 0.5, 1]
        expected = [cell_mae("distance", variant, seed) for seed in (0, 1)]
        assert sorted(mine) == pytest.approx(expected), variant
    assert sweep.get_xlabel().startswith("re-weighting exponent λ")
    assert [tick.get_text() for tick in sweep.get_xticklabels()] == ["λ = 1", "hard (λ→∞)"]


def test_predicted_vs_true_draws_the_test_subjects_only(tmp_path, monkeypatch):
    predictions = pd.DataFrame({"participant_id": ["a", "b", "c", "d", "e"],
                                "study": ["s1", "s1", "s2", "s2", "s2"],
                                "age": [20.0, 30.0, 40.0, 50.0, 60.0],
                                "predicted_age": [22.0, 30.0, 44.0, 30.0, 90.0],
                                "subset": ["test", "test", "test", "train", "train"]})
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_predicted_vs_true(predictions, tmp_path / "p.png", cell="x")
    axis = drawn[0].axes[0]
    points = np.concatenate([collection.get_offsets() for collection in axis.collections])
    assert sorted(points[:, 0]) == [20.0, 30.0, 40.0]
    assert "MAE 2.00 years, n=3" in axis.get_title()


def test_predicted_vs_true_keeps_the_cohorts_study_colours_and_refuses_missing_predictions(
        tmp_path, monkeypatch):
    """A study without test subjects shifted every later study's colour away from Figs. 3
    and 7; a test row without a predicted age was left out of the scatter and the MAE
    while the title still counted it (both found by a review)."""
    predictions = pd.DataFrame({"participant_id": ["a", "b", "c", "d"],
                                "study": ["s1", "s2", "s3", "s3"],
                                "age": [20.0, 30.0, 40.0, 50.0],
                                "predicted_age": [22.0, 30.0, 44.0, 51.0],
                                "subset": ["test", "train", "test", "test"]})
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_predicted_vs_true(predictions, tmp_path / "p.png", cell="x")
    cohort = figures._study_colours(predictions["study"])  # as Figs. 3 and 7 colour them
    drawn_colours = {collection.get_label().split(" ")[0]: collection.get_facecolor()[0]
                     for collection in drawn[0].axes[0].collections}
    assert set(drawn_colours) == {"s1", "s3"}  # s2 has no test subject: no empty entry
    for study, colour in drawn_colours.items():
        np.testing.assert_allclose(colour, cohort[study])
    predictions.loc[2, "predicted_age"] = np.nan
    with pytest.raises(figures.ReportError, match=r"no predicted age for test subject\(s\) c"):
        figures.plot_predicted_vs_true(predictions, tmp_path / "p.png", cell="x")


def test_predicted_vs_true_gives_each_study_its_own_marker_shape(tmp_path, monkeypatch):
    """Studies were told apart by colour alone, and tab10's green and red (blue and purple)
    are close for colour-blind readers: each study gets a shape too."""
    predictions = pd.DataFrame({"participant_id": list("abcd"), "study": ["s1", "s2", "s3", "s4"],
                                "age": [20.0, 30.0, 40.0, 50.0],
                                "predicted_age": [22.0, 30.0, 44.0, 51.0], "subset": "test"})
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_predicted_vs_true(predictions, tmp_path / "p.png", cell="x")
    shapes = [collection.get_paths()[0].vertices.round(3).tobytes()
              for collection in drawn[0].axes[0].collections]
    assert len(shapes) == 4 and len(set(shapes)) == 4


def _draw_search(tmp_path, monkeypatch, rows):
    """The search figure of one holdout split's trials ``rows`` (trial, nn_final, nn_step,
    validation MAE, ...): the trials as read, and the figure drawn."""
    trials = report_results.read_search_trials([write_trials(
        tmp_path / "holdout" / "trials.tsv", rows)])
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_search(trials, tmp_path / "search.png")
    return trials, drawn[0]


def test_search_figure_circles_the_lowest_validation_mae(tmp_path, monkeypatch):
    _, figure = _draw_search(tmp_path, monkeypatch, [
        (1, 20, 3, 4.5, 5.0, 10.0), (2, 14, 1, 3.9, 4.4, 11.0), (3, 8, 2, 4.1, 4.8, 9.0)])
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend[0] == "best: 14, 1 (3.90 years)"


def test_search_figure_counts_repeated_settings_and_leaves_a_trial_at_the_optimum_visible(
        tmp_path, monkeypatch):
    """The search draws with replacement: 30 trials gave 26-28 distinct points under a
    title of 30, and the paper's filled cross hid the colour of a trial at (14, 1)."""
    _, figure = _draw_search(tmp_path, monkeypatch, [
        (1, 20, 3, 4.5, 5.0, 10.0), (2, 14, 1, 3.9, 4.4, 11.0), (3, 20, 3, 4.1, 4.8, 9.0)])
    axis = figure.axes[0]
    assert axis.get_title() == "holdout: 3 trials, 2 distinct (repeats on one point)"
    paper = [c for c in axis.collections if c.get_label() == "paper's optimum"][0]
    assert len(paper.get_facecolor()) == 0 or paper.get_facecolor()[0][3] == 0  # hollow


def test_a_diverged_search_trial_is_drawn_and_tabulated_as_such(tmp_path, monkeypatch):
    """A trial whose training diverged has no validation MAE (NaN): its NaN colour drew
    nothing while the title counted it, and the table printed "nan"."""
    trials, figure = _draw_search(tmp_path, monkeypatch, [
        (1, 20, 3, 4.5, 5.0, 10.0), (2, 2, 1, np.nan, np.nan, 1.0)])
    assert trials["trial"].tolist() == [1, 2]  # the best first, the diverged last
    axis = figure.axes[0]
    assert "diverged (no score)" in [text.get_text() for text in axis.get_legend().get_texts()]
    crosses = [collection for collection in axis.collections
               if collection.get_label() == "diverged (no score)"]
    assert crosses[0].get_offsets().tolist() == [[2.0, 1.0]]
    stem = tmp_path / "search_trials"
    tables.write_search(trials, stem)
    markdown = stem.with_suffix(".md").read_text()
    assert "diverged" in markdown and "nan" not in markdown


def test_training_loss_titles_give_the_mean_over_seeds(tmp_path, monkeypatch):
    """Each panel's title gives the first and last epoch of the thick line, the mean over
    seeds (here 3 -> 2 for seeds at 1, 2, 6 and 1, 1, 4; their median would be 2 -> 1)."""
    files = {}
    for seed, (first, last) in enumerate([(1.0, 1.0), (2.0, 1.0), (6.0, 4.0)]):
        files[seed] = tmp_path / f"history-{seed}.tsv"
        pd.DataFrame({"epoch": [1, 2], "loss": [first, last]}).to_csv(files[seed], sep="\t",
                                                                     index=False)
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    figures.plot_training_loss({"adaptive": files, "empty": {}}, tmp_path / "loss.png",
                               labels={"adaptive": "Adaptive Neighborhoods"})
    visible = [axis for axis in drawn[0].axes if axis.get_visible()]
    assert [axis.get_title() for axis in visible] == [
        "Adaptive Neighborhoods\n3 -> 2 (3 seeds)"]


def test_an_unfinished_trainings_history_and_embeddings_are_refused(tmp_path):
    """A demo cell retrained with --forcerun and killed at epoch 23 of 75: its history.tsv
    and embeddings/ held the epochs so far, Snakemake (its evaluation up to date, the
    unfinished files unseen behind the simulated cohort's checkpoint) did not plan it again,
    and make_figures drew training_loss.png from 23 epochs as the whole training, beside
    tables of the earlier, finished one."""
    cell = tmp_path / "results" / "train" / "holdout" / "table3" / "simclr" / "seed-1"
    (cell / "embeddings").mkdir(parents=True)
    history = cell / "history.tsv"
    pd.DataFrame({"epoch": [1, 2], "loss": [2.0, 1.5]}).to_csv(history, sep="\t", index=False)
    (cell / "metrics.json").write_text(json.dumps({"loss": "simclr", "n_train": 12,
                                                   "n_test": 4, "mae": 9.3}))
    (cell / "checkpoint.pt").write_bytes(b"the resume state of epoch 2")
    told = (r"belongs to a training that did not finish: its resume state .*checkpoint\.pt "
            r"is still beside it .* Run your command again with --rerun-incomplete --forcerun "
            + re.escape(str(cell / "encoder.pt")) + " added")
    with pytest.raises(targets.ReportError, match=told):
        figures.plot_training_loss({"simclr": {1: history}}, tmp_path / "loss.png")
    with pytest.raises(targets.ReportError, match=told):
        figures.load_embeddings(cell / "embeddings")
    with pytest.raises(targets.ReportError, match=told):
        pretraining.pretraining_runs({"t1": {"metrics": cell / "metrics.json",
                                             "history": history}})
    (cell / "checkpoint.pt").unlink()  # a finished training deletes it
    figures.plot_training_loss({"simclr": {1: history}}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").is_file() and figures.load_embeddings(cell / "embeddings") == {}
    assert pretraining.pretraining_runs({"t1": {"metrics": cell / "metrics.json",
                                                "history": history}})["epochs"].tolist() == [2]


@pytest.mark.parametrize("age", [40.0, 20.2])
def test_the_gap_age_slope_is_undefined_when_every_test_subject_has_one_age(age):
    """Three test subjects of one age over two folds: no slope against age (NaN), not an
    infinite one, nor a huge one from the rounding of the sums (at 20.2 years the
    age spread came out as 2e-13, not 0)."""
    gaps = [[0.1, 0.2], [0.3]]
    metrics = pd.DataFrame({
        "split": ["fold1", "fold2"], "experiment": "table3", "variant": "adaptive",
        "seed": 0, "loss": "adaptive", "kind": "contrastive", "readout": "ridge",
        "mae": [0.15, 0.3], "rmse": [0.2, 0.3], "pearson_r": np.nan, "r2": np.nan,
        "gap_age_slope": np.nan, "n_test": [2, 1], "path": ["x", "y"],
        "gap_age_sum_n": [len(g) for g in gaps], "gap_age_sum_age": [age * len(g) for g in gaps],
        "gap_age_sum_gap": [sum(g) for g in gaps],
        "gap_age_sum_age_age": [age * age * len(g) for g in gaps],
        "gap_age_sum_age_gap": [sum(age * x for x in g) for g in gaps]})
    assert np.isnan(report_results.seed_results(metrics).iloc[0]["gap_age_slope"])


def test_examples_are_distinct_subjects_as_soon_as_there_are_enough():
    """Four subjects for four targets: each is shown once, even where two are equally near
    a target (coverage 1.0 and 0.99; two subjects aged 40)."""
    coverage = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c", "sub-d"],
                             "coverage": [1.0, 0.99, 0.98, 0.97]})
    chosen = [c["participant_id"] for c in figures.pick_coverage_examples(coverage)]
    assert sorted(chosen) == ["sub-a", "sub-b", "sub-c", "sub-d"]
    ages = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c", "sub-d"],
                         "age": [40.0, 40.0, 50.0, 60.0]})
    chosen = [c["participant_id"] for c in figures.pick_age_examples(ages)]
    assert sorted(chosen) == ["sub-a", "sub-b", "sub-c", "sub-d"]


def test_neighbourhood_schedule_says_where_it_came_from():
    schedule = report_results.neighbourhood_schedule
    assert schedule({"name": "adaptive", "nn_final": 8, "nn_step": 2}) == (
        "nn_final 8, nn_step 2 (configured)")
    assert schedule({"name": "adaptive", "nn_final": 14, "nn_step": 1,
                     "nn_from_search": True}) == "nn_final 14, nn_step 1 (random search)"
    assert schedule({"name": "yaware", "nn_final": 8}) is None and schedule(None) is None


def test_table2_keeps_study_codes_as_written(tmp_path):
    """Study codes are text everywhere (the split, Table 3's per-study MAE, the figures):
    Table 2 read them as numbers, so studies ``01`` and ``1`` were merged into one row
    ``1`` and ``02`` became ``2``."""
    participants = tmp_path / "participants.tsv"
    pd.DataFrame({"participant_id": [f"sub-{n:02d}" for n in range(8)],
                  "age": [20.0, 30, 40, 50, 60, 70, 25, 35], "sex": ["F", "M"] * 4,
                  "study": ["01", "01", "01", "1", "1", "1", "02", "02"],
                  "subset": ["train"] * 8}).to_csv(participants, sep="\t", index=False)
    tables.make_tables(metrics=[], participants=participants, settings={},
                       outputs={"table2_cohort": tmp_path / "table2_cohort"})
    table = pd.read_csv(tmp_path / "table2_cohort.csv", dtype={"study": str})
    assert dict(zip(table["study"], table["n"])) == {"01": 3, "1": 3, "02": 2, "Total": 8}


def test_table2_warns_of_studies_whose_ages_overlap_no_others(tmp_path, caplog):
    # a young-adult study and an ageing study: the study alone predicts age (a review's
    # two-study cohort reached r 0.978 with nothing said); overlapping studies say nothing
    participants = tmp_path / "participants.tsv"

    def written(ages, studies):
        pd.DataFrame({"participant_id": [f"sub-{n:02d}" for n in range(len(ages))],
                      "age": ages, "sex": "F", "study": studies}).to_csv(
            participants, sep="\t", index=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="brainage.report.tables"):
            tables.make_tables(metrics=[], participants=participants, settings={},
                               outputs={"table2_cohort": tmp_path / "table2_cohort"})
        return (tmp_path / "table2_cohort.md").read_text(), caplog.text

    note = ("The studies form groups whose ages do not overlap: HD-2019 (18-28 years); Berlin "
            "2021 (61-78 years). Between the groups the study alone predicts age")
    markdown, logged = written([18, 28, 22, 61, 78, 70], ["HD-2019"] * 3 + ["Berlin 2021"] * 3)
    assert note in markdown and note in logged
    # a third study bridging the two: the ranges chain into one, nothing to say
    markdown, logged = written([18, 28, 61, 78, 25, 65], ["A", "A", "B", "B", "C", "C"])
    assert "do not overlap" not in markdown and logged == ""
    # two young studies and two old ones: each overlaps another, but the groups do not
    markdown, _ = written([18, 28, 20, 30, 61, 78, 60, 70], ["A", "A", "B", "B", "C", "C",
                                                            "D", "D"])
    assert "do not overlap: A, B (18-30 years); C, D (60-78 years)." in markdown
    markdown, _ = written([18.04, 28.96, 65], ["A", "A", "B"])  # one subject: one age
    assert "do not overlap: A (18-29 years); B (65 years)." in markdown
    markdown, logged = written([18, 78], ["A", "A"])  # one study: nothing to confound
    assert "do not overlap" not in markdown and logged == ""


@pytest.mark.parametrize("config_file", ["config/config.yaml", "config/paper.yaml",
                                         "config/test.yaml", None])
def test_every_caption_renders_what_the_config_decides(config_file):
    """Captions are Jinja templates that Snakemake renders with the validated config
    (``snakemake.config``) when it writes the report: each renders for every shipped
    config and for a lab's minimal one (schema defaults, k-fold), and states that config's
    choices, not the demo's."""
    from types import SimpleNamespace

    import jinja2

    if config_file is None:  # a lab's own data: the README's minimal config, k-fold
        config = validate_config({"dataset": {"root": "/data/my_study",
                                              "simulate": {"enabled": False}},
                                  "split": {"scheme": "kfold"}})
    else:
        config = load_config(REPO / config_file)
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                                     undefined=jinja2.StrictUndefined)
    rendered = {}
    for path in sorted((REPO / "workflow" / "report").rglob("*.rst")):
        text = environment.from_string(path.read_text()).render(
            snakemake=SimpleNamespace(config=config), categories={}, files={})
        assert "{{" not in text and "{%" not in text, path
        rendered[path.relative_to(REPO / "workflow" / "report").as_posix()] = text
    reduction = config["loss"]["reduction"]
    assert f"``loss.reduction``\nis ``{reduction}``" in rendered["tables/ablation_reduction.rst"]
    simulated = "On the built-in\nsimulated cohort" in rendered["tables/table3_losses.rst"]
    assert simulated == config["dataset"]["simulate"]["enabled"]
    first_split_only = "on the first split only" in rendered["figures/training_loss.rst"]
    assert first_split_only == (config["split"]["scheme"] != "holdout")


#: Site names as a consortium writes them (a review's 15-study cohort).
CONSORTIUM = ["Berlin-Charite", "Mayo-MRE-2021", "UCSF-2019", "mre_site 3", "Study_A",
              "ÉPFL", "Edinburgh-MRE", "Illinois-Urbana", "Delaware-2020", "Auckland",
              "Dartmouth-MRE", "Lyon-CREATIS", "Mayo-MRE-2023", "Stanford-NAM", "UCSF-2022"]


def _consortium(subjects_per_study: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"participant_id": f"sub-{k}x{i}", "study": study, "age": float(rng.uniform(20, 80)),
             "sex": "F", "coverage": float(rng.uniform(0.8, 1.0)), "subset": "test"}
            for k, study in enumerate(CONSORTIUM) for i in range(subjects_per_study)]
    table = pd.DataFrame(rows)
    return table.assign(predicted_age=table["age"] + rng.normal(0, 5, len(table)))


def test_study_legends_of_a_consortium_lie_beside_the_axes(tmp_path, monkeypatch):
    """With 15 studies the legend inside Fig. 3 covered the 60-80-year bars and the one of
    predicted vs true a third of the test points; Fig. 7's side-by-side names overprinted.
    The paper's five studies keep their legend inside."""
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure))
    cohort = _consortium()
    figures.plot_age_distribution(cohort, tmp_path / "fig3.png")
    figures.plot_predicted_vs_true(cohort, tmp_path / "pvt.png", cell="c")
    for figure in drawn:
        figure.canvas.draw()
        axis = figure.axes[0]
        legend = axis.get_legend().get_window_extent(figure.canvas.get_renderer())
        assert legend.x0 >= axis.get_window_extent().x1  # beside the axes: covers nothing
    figures.plot_coverage(cohort, tmp_path / "fig7.png")
    figure = drawn[-1]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    ticks = [label.get_window_extent(renderer) for label in figure.axes[0].get_xticklabels()]
    assert not any(first.overlaps(second) for first, second in zip(ticks, ticks[1:]))
    few = cohort[cohort["study"].isin(CONSORTIUM[:5])]
    figures.plot_age_distribution(few, tmp_path / "fig3_five.png")
    drawn[-1].canvas.draw()
    axis = drawn[-1].axes[0]
    legend = axis.get_legend().get_window_extent(drawn[-1].canvas.get_renderer())
    assert axis.get_window_extent().contains(legend.x0 + 1, legend.y0 + 1)


def test_qc_overview_keeps_a_long_study_names_label(tmp_path):
    """A 40-character study name's tilted tick label reached below the figure, and the PNG
    was saved at the figure's size, cutting it off."""
    from matplotlib.image import imread

    from brainage.qc import plot_dataset_qc

    long_name = "Longitudinal-Elastography-Consortium-A01"
    table = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c"],
                          "study": [long_name, long_name, "s2"], "dice": [0.95, 0.9, 0.93],
                          "correlation": [0.8, 0.7, 0.7], "coverage": [0.9, 0.95, 0.9],
                          "qc_pass": [True, True, True]})
    plot_dataset_qc(table, tmp_path / "qc.png",
                    minimums={"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7})
    height = imread(tmp_path / "qc.png").shape[0]
    assert height > 3.6 * 90  # the figure's own height at dpi 90: the label reaches below


def test_a_long_text_column_wraps_in_the_latex(tmp_path):
    """Table 3's per-study MAEs of 23 studies made one cell of 330 characters in an l
    column, which LaTeX never breaks: the table ran far off the page."""
    per_study = "; ".join(f"site{k:02d} {4 + k / 10:.1f}" for k in range(23))
    display = pd.DataFrame({"Loss": ["SimCLR", "Adaptive"], "MAE": ["5.1", "4.2"],
                            "MAE per study": [per_study, per_study]})
    tables.write_table(display, display, tmp_path / "t", title="Table 3: t")
    latex = (tmp_path / "t.tex").read_text()
    assert (r"\begin{tabular}{lrp{" + tables.WRAPPED_COLUMN_WIDTH + "}}") in latex
    short = display.assign(**{"MAE per study": ["a 1.0; b 2.0", "a 1.1; b 2.1"]})
    tables.write_table(short, short, tmp_path / "s", title="Table 3: s")
    assert r"\begin{tabular}{lrl}" in (tmp_path / "s.tex").read_text()


def test_fig3_bins_follow_the_cohorts_age_range():
    """Fixed 5-year bins drew a cohort aged 20-24.9 as one bar, one school year (9.5-10.5)
    in two, and every Fig. 3 had an empty last bin; the oldest age has a bar of its own
    rather than joining the one below (numpy closes its last bin)."""
    paper_like = pd.Series([20.0, 33.5, 47.0, 79.0])
    assert figures.age_bins(paper_like).tolist() == list(range(20, 81, 5))
    students = pd.Series([20.0, 21.2, 24.9])
    assert figures.age_bins(students).tolist() == [20, 21, 22, 23, 24, 25]
    children = pd.Series([6.0, 12.0, 17.0, 18.0, 18.0])  # whole years, oldest on an edge
    counts, edges = np.histogram(children, figures.age_bins(children))
    assert edges[-2:].tolist() == [18, 19] and counts[-2:].tolist() == [1, 2]
    school_year = pd.Series([9.5, 9.9, 10.5])
    counts, edges = np.histogram(school_year, figures.age_bins(school_year))
    assert edges.tolist() == [9.5, 9.75, 10.0, 10.25, 10.5, 10.75]
    assert counts.tolist() == [1, 1, 0, 0, 1]
    assert figures.age_bins(pd.Series([50.0, 50.0])).tolist() == [50.0, 50.25]


def test_qc_overview_orders_studies_as_the_other_figures(tmp_path, monkeypatch):
    """The QC overview sorted studies as text (site10 before site2), Table 2 and Figs. 3
    and 7 naturally (site2 before site10): a study moved between figures of one report."""
    from brainage.qc import plot_dataset_qc

    ticks = []
    plt = headless_pyplot()
    original = plt.Axes.set_xticks

    def record(self, positions, labels=None, *args, **kwargs):
        ticks.append(list(labels))
        return original(self, positions, labels, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "set_xticks", record)
    table = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c"],
                          "study": ["site10", "site2", "site1"], "dice": [0.95, 0.9, 0.93],
                          "correlation": [0.8, 0.7, 0.7], "coverage": [0.9, 0.95, 0.9],
                          "qc_pass": [True, True, True]})
    plot_dataset_qc(table, tmp_path / "qc.png",
                    minimums={"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7})
    assert ticks and all(labels == ["site1", "site2", "site10"] for labels in ticks)
