"""Read-outs and metrics on frozen features (brainage.evaluate)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch

from brainage.config import ConfigError, resolve_cell
from brainage.data import load_split
from brainage.evaluate import compute_metrics, evaluate_encoder
from brainage.models import build_model
from brainage.readout import fit_readout, grid_edges, load_readout, ridge_folds
from brainage.train import write_features
from split_fixture import tiny_settings, write_split


def readout_section(values: dict) -> dict:
    """A resolved readout section: the schema's defaults with ``values`` over them."""
    return resolve_cell({"readout": values})["readout"]


def _shared_direction_data(n_train=80, n_test=30):
    rng = np.random.default_rng(0)
    direction = rng.standard_normal((1, 16))
    ages = rng.uniform(20, 80, n_train + n_test)
    features = (ages[:, None] - 50) / 20 * direction + 0.05 * rng.standard_normal(
        (len(ages), 16))
    return features[:n_train], ages[:n_train], features[n_train:], ages[n_train:]


@pytest.mark.parametrize("method", ["mse", "dex"])
def test_a_feature_constant_on_the_training_subjects_keeps_its_scale(method):
    """A channel that is 0 for every training subject (0 after the encoder's ReLU) was
    scaled by 1/1e-6: a test subject's 0.01 there became 10,000 standard deviations, and
    without weight decay the predictors' ages moved by years (2,414 in a review's case).
    It keeps scale 1, as scikit-learn's StandardScaler does."""
    train_x, train_y, test_x, _ = _shared_direction_data()
    train_x, test_x = train_x.copy(), test_x.copy()
    train_x[:, 0] = 0.0
    readout = fit_readout(train_x, train_y, readout_section(
        {"method": method, "predictor_weight_decay": 0.0}), seed=0)
    assert readout.feature_sd[0] == 1.0
    np.testing.assert_allclose(readout.feature_sd[1:], train_x[:, 1:].std(axis=0) + 1e-6)
    test_x[:, 0] = 0.0
    silent = readout.predict(test_x)
    test_x[:, 0] = 0.01
    assert np.abs(readout.predict(test_x) - silent).max() < 0.5  # years


@pytest.mark.parametrize("method", ["ridge", "mse", "l1", "huber", "dex"])
def test_every_readout_learns_a_linear_age_code(method):
    train_x, train_y, test_x, test_y = _shared_direction_data()
    readout = fit_readout(train_x, train_y, readout_section({"method": method}), seed=0)
    predicted = readout.predict(test_x)
    baseline = np.mean(np.abs(test_y - train_y.mean()))
    mae = np.mean(np.abs(predicted - test_y))
    assert predicted.shape == test_y.shape
    assert mae < 0.35 * baseline, (method, mae, baseline)


def test_a_readout_method_without_its_fit_is_named(monkeypatch):
    """A method added to READOUT_METHODS (and the schema) without its branch in
    fit_readout stopped the evaluation job with a bare KeyError (found by a review)."""
    from brainage import readout as readouts

    monkeypatch.setattr(readouts, "READOUT_METHODS", (*readouts.READOUT_METHODS, "quantile"))
    train_x, train_y, _, _ = _shared_direction_data(n_train=10)
    with pytest.raises(ConfigError, match=r"config key readout\.method is 'quantile', which "
                                          r"has no fit: add its branch to brainage\.readout"
                                          r"\.fit_readout"):
        readouts.fit_readout(train_x, train_y, {**readout_section({}), "method": "quantile"})


def test_ridge_alpha_from_the_grid_and_folds_capped_by_the_training_set(caplog):
    train_x, train_y, _, _ = _shared_direction_data(n_train=5)
    readout = fit_readout(train_x, train_y, readout_section({"method": "ridge", "cv_folds": 5,
                                             "alphas": [0.1, 10.0]}))
    assert readout.info["cv_folds"] == 2  # every fold keeps >= 2 subjects for its r2
    assert readout.info["ridge_alpha"] in (0.1, 10.0)
    for n in (4, 5, 9, 40):
        sizes = [len(v) for _, v in ridge_folds(n, 5).split(np.zeros((n, 1)))]
        assert min(sizes) >= 2 and sum(sizes) == n, (n, sizes)
    # 3 subjects cannot make two folds of two: the first alpha, and a warning that says so
    with caplog.at_level("WARNING", logger="brainage.readout"):
        few = fit_readout(train_x[:3], train_y[:3], readout_section(
            {"method": "ridge", "alphas": [0.1, 10.0]}))
    assert few.info["ridge_alpha"] == 0.1
    assert "3 training subjects are too few" in caplog.text


def test_a_choice_at_an_end_of_its_grid_is_named():
    """The α grid is absolute and features are not scaled: tiny features (an untrained
    encoder's are about 10 times smaller than a trained one's) hold α at the grid's
    smallest, and nothing said so."""
    train_x, train_y, _, _ = _shared_direction_data(n_train=40)
    section = readout_section({"method": "ridge", "alphas": [0.01, 1.0, 100.0]})
    tiny = fit_readout(train_x * 1e-4, train_y, section)
    assert tiny.info["ridge_alpha"] == 0.01
    assert grid_edges(tiny, section) == [
        "readout.alphas 0.01, the grid's smallest (0.01, 1, 100)"]
    middle = readout_section({"method": "ridge", "alphas": [1e-9, 1e-6, 1e6]})
    assert fit_readout(train_x, train_y, middle).info["ridge_alpha"] == 1e-6
    assert grid_edges(fit_readout(train_x, train_y, middle), middle) == []
    pca = readout_section({"method": "pca_ridge", "pca_components": [1, 2],
                           "alphas": [0.01, 100.0]})
    edges = grid_edges(fit_readout(train_x, train_y, pca), pca)
    assert edges and all(re.fullmatch(r"readout\.(alphas|pca_components) \S+, the grid's "
                                      r"(smallest|largest) \(.*\)", edge) for edge in edges)
    one = readout_section({"method": "ridge", "alphas": [1.0]})  # no grid to leave
    assert grid_edges(fit_readout(train_x, train_y, one), one) == []
    assert grid_edges(fit_readout(train_x, train_y, readout_section(
        {"method": "train_mean"})), readout_section({"method": "train_mean"})) == []


def test_evaluation_warns_of_a_read_out_choice_at_the_grids_end(tmp_path, caplog):
    split_dir = write_split(tmp_path / "dataset", n_subjects=12, n_test=4)
    settings = tiny_settings(readout={"method": "ridge", "alphas": [0.1, 10.0]})  # two ends
    model = build_model(resolve_cell(settings)["model"])
    write_features(tmp_path / "features.npz", model, load_split(split_dir), "sha",
                   device=torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        metrics = evaluate_encoder(split_dir, tmp_path / "features.npz", settings,
                                   metrics_path=tmp_path / "metrics.json",
                                   predictions_path=tmp_path / "predictions.tsv")
    # the log opens naming the cell (it began with the read-out's unlabelled lines)
    opening = [r.getMessage() for r in caplog.records if r.name == "brainage.evaluate"][0]
    assert opening == ("evaluating test/adaptive seed 0 on split holdout: read-out ridge on "
                       "the encoder's projection features"), opening
    assert any(r.getMessage().startswith("out-of-fold predictions of the training subjects "
                                         "for the age-bias fit") for r in caplog.records)
    end = "smallest" if metrics["ridge_alpha"] == 0.1 else "largest"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"split holdout: the read-out's cross-validation chose readout.alphas "
        f"{metrics['ridge_alpha']:g}, the grid's {end} (0.1, 10): the best value may lie "
        f"beyond the grid. Widen it in the config to see (the cells that use it are "
        f"evaluated again)."]


def test_ridge_folds_are_the_configured_number_capped_at_half_the_training_subjects():
    # readout.cv_folds folds, at most half the subjects (at least 2): a cap at a third of
    # them still left every fold two subjects, so the fold sizes above could not tell
    assert [ridge_folds(n, 5).get_n_splits() for n in (2, 4, 6, 8, 10, 11, 40)] == [
        2, 2, 3, 4, 5, 5, 5]
    assert ridge_folds(40, 3).get_n_splits() == 3


def test_ridge_needs_two_training_subjects_and_says_so():
    # One subject was left to scikit-learn's KFold, whose message names n_splits, not the
    # training subjects the read-out lacks.
    with pytest.raises(ValueError, match="needs at least 2 training subjects; got 1"):
        fit_readout(np.zeros((1, 3)), np.array([40.0]), readout_section({"method": "ridge"}))


def test_ridge_folds_mix_studies_when_rows_come_grouped_by_study():
    """Training rows arrive in participants.tsv order, one study after another: a fold
    that is one study would score young subjects against old ones only."""
    train_x, train_y, _, _ = _shared_direction_data(n_train=100)
    order = np.argsort(train_y)  # five "studies" of 20, from youngest to oldest
    studies = np.repeat(np.arange(5), 20)
    for _, validation in ridge_folds(len(train_y), 5).split(train_x):
        assert len(np.unique(studies[validation])) >= 3, studies[validation]
    # the same folds for every seed: a seed changes training, not the read-out's CV
    readout = fit_readout(train_x[order], train_y[order], readout_section({"method": "ridge"}),
                          seed=0)
    again = fit_readout(train_x[order], train_y[order], readout_section({"method": "ridge"}),
                        seed=3)
    assert again.info == readout.info and np.array_equal(again.coef, readout.coef)


def test_huber_threshold_is_in_years():
    # Features that carry nothing: each predictor learns one constant. L1 gives the median
    # age, MSE the mean; Huber with a threshold of 2 years (about 0.1 sd here) is close to
    # the median, and with 200 years it is the mean.
    ages = np.array([20.0] * 12 + [22.0] * 12 + [25.0] * 12 + [80.0] * 8)  # median 22, mean 32.8
    features = np.zeros((len(ages), 4))

    def constant(**values):
        section = readout_section({"method": "huber", "predictor_epochs": 1000,
                                   "predictor_lr": 1e-2, **values})
        return float(fit_readout(features, ages, section, seed=0).predict(features[:1])[0])

    assert abs(constant(huber_delta=2.0) - np.median(ages)) < 2.0
    assert constant(huber_delta=200.0) == pytest.approx(np.mean(ages), abs=0.1)


def test_l1_and_mse_read_outs_fit_their_own_loss():
    # Features that carry nothing, as above: the L1 predictor learns the median age and the
    # MSE one the mean. Every readout learns a linear age code either way, so an l1 read-out
    # trained with the squared error (or an mse one with the absolute error) went unnoticed.
    ages = np.array([20.0] * 12 + [22.0] * 12 + [25.0] * 12 + [80.0] * 8)  # median 22, mean 32.8
    features = np.zeros((len(ages), 4))

    def constant(method):
        section = readout_section({"method": method, "predictor_epochs": 1000,
                                   "predictor_lr": 1e-2})
        return float(fit_readout(features, ages, section, seed=0).predict(features[:1])[0])

    assert abs(constant("l1") - np.median(ages)) < 1.0
    assert constant("mse") == pytest.approx(np.mean(ages), abs=0.1)


def test_predictor_width_and_weight_decay_are_the_configured_ones():
    # readout.predictor_hidden_dim and readout.predictor_weight_decay were never read back:
    # a predictor built 128 wide, or trained without decay, passed every test. A decay of 10
    # shrinks the MLP until it predicts about the training mean for everyone.
    train_x, train_y, test_x, _ = _shared_direction_data()
    narrow = fit_readout(train_x, train_y, readout_section(
        {"method": "mse", "predictor_hidden_dim": 7, "predictor_epochs": 1}), seed=0)
    assert narrow.predictor[0].out_features == 7
    assert narrow.to_state()[1]["hidden_dim"] == 7

    def spread(decay):
        section = readout_section({"method": "mse", "predictor_weight_decay": decay})
        return float(np.std(fit_readout(train_x, train_y, section, seed=0).predict(test_x)))

    assert spread(0.0) > 15.0  # the test ages' sd is about 17 years
    assert spread(10.0) < 1.0


def test_dex_expected_value_stays_within_the_bins():
    train_x, train_y, test_x, _ = _shared_direction_data()
    readout = fit_readout(train_x, train_y, readout_section({"method": "dex"}), seed=0)
    centres = readout.bin_centres
    assert np.allclose(np.diff(centres), 1.0)  # 1-year bins
    # centred on whole years, from the one nearest the youngest age to the oldest's
    assert centres[0] == np.round(train_y.min()) and centres[-1] == np.round(train_y.max())
    extreme = np.concatenate([test_x, 100 * test_x])  # far outside the training features
    predicted = readout.predict(extreme)
    assert predicted.min() >= centres[0] - 1e-9 and predicted.max() <= centres[-1] + 1e-9


def test_dex_reads_whole_year_ages_without_a_half_bin_bias():
    """Centres at bin midpoints put whole-year ages on their bins' lower edges: a cohort all
    50 years old was read out as 50.5, and whole-year ages 0.5 years too old on average."""
    train_x, train_y, test_x, _ = _shared_direction_data()
    constant = fit_readout(train_x, np.full(len(train_y), 50.0), readout_section({"method": "dex"}),
                           seed=0)
    assert constant.bin_centres.tolist() == [50.0]
    assert np.allclose(constant.predict(test_x), 50.0)
    whole_years = np.round(train_y)
    readout = fit_readout(train_x, whole_years, readout_section({"method": "dex"}), seed=0)
    assert abs(np.mean(readout.predict(train_x) - whole_years)) < 0.1
    # 5-year bins: centres on multiples of 5, each age in its nearest one's class
    wide = fit_readout(train_x, train_y, readout_section({"method": "dex", "dex_bin_years": 5.0}),
                       seed=0)
    assert np.all(wide.bin_centres % 5 == 0)
    assert wide.bin_centres[0] == 5 * np.round(train_y.min() / 5)


def test_dex_with_too_few_classes_for_the_training_ages_says_which_key_to_set(caplog):
    """A cohort of one school year (ages 9.6-10.4) at 1-year bins made one DEX class: every
    prediction was 10.000 and metrics.json said dex_bins 1 without a word."""
    from brainage.agebias import out_of_fold_predictions

    train_x, _, test_x, _ = _shared_direction_data()
    one_year = np.linspace(9.6, 10.4, len(train_x))
    dex = readout_section({"method": "dex"})
    with caplog.at_level(logging.WARNING, logger="brainage.readout"):
        narrow = fit_readout(train_x, one_year, dex, seed=0)
    assert narrow.info["dex_bins"] == 1 and np.allclose(narrow.predict(test_x), 10.0)
    assert re.search(r"readout\.dex_bin_years is 1 years: the training ages \(9\.60-10\.40 "
                     r"years\) make only 1 DEX class\(es\), so every prediction is 10 "
                     r"years\. Set readout\.dex_bin_years to about 0\.08", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brainage.readout"):
        out_of_fold_predictions(train_x, one_year, dex, folds=5, seed=0)
    assert "dex_bin_years" not in caplog.text  # the age-bias refits are not the read-out
    with caplog.at_level(logging.WARNING, logger="brainage.readout"):
        fit_readout(train_x, np.full(len(train_x), 10.0), dex, seed=0)
    assert ("make only 1 DEX class(es), so every prediction is 10 years. Use another "
            "readout.method.") in caplog.text  # one age: no width can help
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brainage.readout"):
        fit_readout(train_x, np.linspace(18.0, 21.0, len(train_x)),
                    readout_section({"method": "dex"}), seed=0)
    assert "make only 4 DEX class(es), so every prediction is a weighted mean of 18, 19, 20, " \
           "21 years. Set readout.dex_bin_years to about 0.3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brainage.readout"):
        fit_readout(train_x, 0.1 * np.arange(len(train_x)) + 10.0,
                    readout_section({"method": "dex", "dex_bin_years": 0.5}), seed=0)
    assert "dex_bin_years" not in caplog.text  # enough classes: silent


def test_predictor_is_deterministic():
    train_x, train_y, test_x, _ = _shared_direction_data()
    huber = readout_section({"method": "huber"})
    first = fit_readout(train_x, train_y, huber, seed=3).predict(test_x)
    second = fit_readout(train_x, train_y, huber, seed=3).predict(test_x)
    assert np.array_equal(first, second)


def test_ridge_predicts_with_the_alpha_its_cross_validation_chose():
    # The alpha reported must be the alpha fitted: a read-out refitted with the grid's
    # first alpha (here a penalty that flattens the map) reported the CV's choice and
    # predicted with another.
    from sklearn.linear_model import Ridge

    train_x, train_y, _, _ = _shared_direction_data()
    readout = fit_readout(train_x, train_y, readout_section({"method": "ridge",
                                                             "alphas": [1e4, 0.01]}))
    assert readout.info["ridge_alpha"] == 0.01  # the features carry age: little penalty
    reference = Ridge(alpha=0.01).fit(train_x, train_y)
    np.testing.assert_allclose(readout.coef, reference.coef_, rtol=1e-9)
    assert readout.intercept == pytest.approx(reference.intercept_, rel=1e-9)


def test_ridge_alpha_is_the_best_mean_r2_over_the_read_out_folds():
    # The reference scores the alpha search by r2. Heavy-tailed age noise makes the scores
    # disagree here: the mean r2 over the folds picks alpha 10, the mean absolute error
    # would pick 1, so a search scored otherwise reads out other ages.
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(3)
    features = rng.normal(size=(20, 8))
    ages = 30 + 10 * features[:, 0] + 6 * rng.standard_t(2, size=20)
    alphas = [0.01, 0.1, 1.0, 10.0, 100.0]
    folds = list(ridge_folds(20, 5).split(features))
    mean_r2 = {alpha: np.mean([r2_score(ages[held_out], Ridge(alpha=alpha).fit(
        features[fit], ages[fit]).predict(features[held_out])) for fit, held_out in folds])
        for alpha in alphas}
    assert max(mean_r2, key=mean_r2.get) == 10.0
    readout = fit_readout(features, ages, readout_section({"method": "ridge", "cv_folds": 5,
                                                           "alphas": alphas}))
    assert readout.info["ridge_alpha"] == 10.0


def test_pca_ridge_is_stored_as_the_equivalent_linear_map():
    # (features - mean) @ V.T @ w + b is stored as features @ coef + intercept. Features
    # far from 0 make the mean's term large: with its sign flipped every prediction moved,
    # yet the only pca_ridge test is slow.
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    train_x, train_y, test_x, _ = _shared_direction_data()
    readout = fit_readout(train_x + 10.0, train_y, readout_section({"method": "pca_ridge"}))
    pipeline = make_pipeline(PCA(readout.info["pca_components"], svd_solver="full"),
                             Ridge(alpha=readout.info["ridge_alpha"]))
    pipeline.fit(train_x + 10.0, train_y)
    np.testing.assert_allclose(readout.predict(test_x + 10.0), pipeline.predict(test_x + 10.0),
                               rtol=0, atol=1e-8)


@pytest.mark.parametrize("case", range(6))
def test_pca_ridge_chooses_and_predicts_as_scikit_learns_grid_search(case):
    """fit_pca_ridge works from the training subjects' Gram matrix instead of refitting
    PCA(svd_solver="full") + Ridge for every fold, component count and alpha (76 full
    PCAs of 1.1 M voxels at 2 mm, about 70 s and 9 GB each); it must choose the same pair
    and predict the same ages: float32 voxels, a rank-deficient set, wide and narrow."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    from brainage.readout import fit_pca_ridge, ridge_folds

    rng = np.random.default_rng(case)
    n, d = [(30, 200), (12, 50), (40, 8), (25, 300), (9, 100), (50, 120)][case]
    features = rng.standard_normal((n, d)) * 3.0 + 7.0
    if case == 3:
        features[:, : d // 2] = features[:, [0]]  # rank-deficient: many equal columns
    if case % 2:
        features = features.astype(np.float32)
    ages = 20 + 60 * rng.random(n) + 2 * features[:, 1]
    components, alphas = [2, 5, 20], [0.01, 0.1, 1.0, 10.0, 100.0]
    ours = fit_pca_ridge(features, ages, components=components, alphas=alphas, cv_folds=5)
    folds = ridge_folds(n, 5)
    smallest = n - int(np.ceil(n / folds.n_splits))
    search = GridSearchCV(
        Pipeline([("pca", PCA(svd_solver="full")), ("ridge", Ridge())]),
        param_grid={"pca__n_components": sorted({min(k, smallest, d) for k in components}),
                    "ridge__alpha": alphas}, cv=folds, scoring="r2").fit(
        features.astype(np.float64), ages)
    assert (ours.info["pca_components"], ours.info["ridge_alpha"]) == (
        search.best_params_["pca__n_components"], search.best_params_["ridge__alpha"])
    new = rng.standard_normal((5, d)) * 3.0 + 7.0
    np.testing.assert_allclose(ours.predict(new), search.best_estimator_.predict(new),
                               rtol=0, atol=1e-8)


def test_pca_ridge_components_are_capped_by_the_features_and_the_smallest_training_fold():
    # 12 subjects in 5 folds: the smallest training fold has 12 - 3 = 9, the most
    # components scikit-learn's PCA can fit in every fold; 8 features give 8 at most. The
    # cap is what the read-out reports and what its final fit on every subject uses.
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    from brainage.readout import fit_pca_ridge

    rng = np.random.default_rng(0)
    wide = rng.standard_normal((12, 50))
    ages = 50 + wide[:, :12] @ rng.standard_normal(12)
    readout = fit_pca_ridge(wide, ages, components=[20], alphas=[0.01], cv_folds=5)
    assert readout.info["pca_components"] == 9 and readout.info["cv_folds"] == 5
    reference = make_pipeline(PCA(9, svd_solver="full"), Ridge(alpha=0.01)).fit(wide, ages)
    new = rng.standard_normal((4, 50))
    np.testing.assert_allclose(readout.predict(new), reference.predict(new), rtol=0, atol=1e-8)
    narrow = fit_pca_ridge(wide[:, :8], ages, components=[20], alphas=[0.01], cv_folds=5)
    assert narrow.info["pca_components"] == 8


def test_pca_ridge_of_three_subjects_keeps_the_grids_first_pair(caplog):
    # as Ridge: a fold of one subject has no r2, no pair scores, the grid's first is used
    from brainage.readout import fit_pca_ridge

    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING", logger="brainage.readout"):
        readout = fit_pca_ridge(rng.standard_normal((3, 6)), np.array([20.0, 40.0, 70.0]),
                                components=[1, 2], alphas=[0.1, 10.0], cv_folds=5)
    assert (readout.info["pca_components"], readout.info["ridge_alpha"]) == (1, 0.1)
    assert "3 training subjects are too few" in caplog.text


def test_a_linear_read_out_of_many_voxels_predicts_in_chunks_as_in_one_product():
    from brainage.readout import GRAM_COLUMNS, Readout

    rng = np.random.default_rng(0)
    features = rng.standard_normal((4, 2 * GRAM_COLUMNS + 5)).astype(np.float32)
    readout = Readout("pca_ridge", coef=rng.standard_normal(features.shape[1]), intercept=40.0)
    np.testing.assert_allclose(readout.predict(features),
                               features.astype(np.float64) @ readout.coef + 40.0,
                               rtol=1e-12, atol=1e-9)


def test_predictors_scale_features_and_ages_by_the_training_subjects():
    # The MLP read-outs work in the training subjects' z-units: shifting every feature by a
    # constant changes no prediction, and the stored age scaling is the training ages'.
    # The features above are centred near 0, which hid a predict() that forgot to subtract
    # the training mean, and a fit that regressed unscaled ages.
    train_x, train_y, test_x, _ = _shared_direction_data()
    section = readout_section({"method": "mse", "predictor_epochs": 100})
    plain = fit_readout(train_x, train_y, section, seed=0)
    shifted = fit_readout(train_x + 100.0, train_y, section, seed=0)
    np.testing.assert_allclose(shifted.predict(test_x + 100.0), plain.predict(test_x),
                               rtol=0, atol=1e-3)
    np.testing.assert_allclose(shifted.feature_mean, train_x.mean(axis=0) + 100.0)
    assert shifted.age_mean == pytest.approx(train_y.mean())
    assert shifted.age_sd == pytest.approx(train_y.std(), rel=1e-6)


def test_study_mean_gives_a_study_without_training_subjects_the_overall_mean():
    # Documented fallback: the training subjects' mean age (55 here), not 0 and not a median.
    ages = np.array([20.0, 30.0, 60.0, 70.0, 95.0])
    readout = fit_readout(np.zeros((5, 1)), ages, readout_section({"method": "study_mean"}),
                          studies=["a", "a", "b", "b", "b"])
    predicted = readout.predict(np.zeros((3, 1)), ["a", "b", "unseen"])
    np.testing.assert_allclose(predicted, [25.0, 75.0, 55.0], rtol=0, atol=1e-12)


def test_study_mean_without_the_studies_is_refused():
    # without the studies a study_mean read-out was fitted as the overall mean (the
    # train_mean baseline under the other's name), and predicted from None with a TypeError
    ages = np.array([20.0, 30.0, 60.0, 70.0])
    section = readout_section({"method": "study_mean"})
    with pytest.raises(ValueError, match="study_mean needs the training subjects' studies"):
        fit_readout(np.zeros((4, 1)), ages, section)
    readout = fit_readout(np.zeros((4, 1)), ages, section, studies=["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="needs each subject's study"):
        readout.predict(np.zeros((2, 1)))


@pytest.mark.parametrize("method", ["ridge", "pca_ridge", "train_mean", "study_mean"])
def test_a_saved_read_out_predicts_as_the_fitted_one(tmp_path, method):
    # readout.npz and readout.json rebuild the read-out: its method, its coefficients and
    # intercept, each study's own mean (studies given out of their sorted order)
    from brainage.readout import save_readout

    train_x, train_y, test_x, _ = _shared_direction_data(n_train=20, n_test=6)
    studies = np.array(["c", "a", "b", "a"] * 5)
    readout = fit_readout(train_x + 10.0, train_y, readout_section({"method": method}),
                          studies=studies)
    written = save_readout(tmp_path, readout, note="kept")
    loaded, description = load_readout(tmp_path)
    assert loaded.method == method and loaded.info == readout.info
    assert description == written and description["note"] == "kept"
    new_studies = ["b", "c", "a", "unseen", "a", "c"]
    np.testing.assert_array_equal(loaded.predict(test_x + 10.0, new_studies),
                                  readout.predict(test_x + 10.0, new_studies))
    assert len(np.unique(readout.predict(test_x + 10.0, new_studies))) > 1 or \
        method == "train_mean"


@pytest.mark.parametrize("missing", ["readout.npz", "readout.json"])
def test_a_missing_readout_file_is_named_with_what_to_do(tmp_path, missing):
    from brainage.readout import save_readout

    train_x, train_y, _, _ = _shared_direction_data(n_train=20)
    save_readout(tmp_path, fit_readout(train_x, train_y, readout_section({"method": "ridge"})))
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"read-out file .*{missing} does not exist; "
                                                r"rerun rule evaluate_encoder"):
        load_readout(tmp_path)



@pytest.mark.parametrize("damage", ["empty", "cut_short"])
def test_a_damaged_readout_file_is_named_with_what_to_do(tmp_path, damage):
    # An empty readout.npz raised a bare EOFError ("No data left in file") and a cut-short
    # one zipfile.BadZipFile ("File is not a zip file"), naming neither the file nor the
    # rule to rerun: load_readout caught only OSError and ValueError.
    from brainage.readout import save_readout

    train_x, train_y, _, _ = _shared_direction_data(n_train=20)
    save_readout(tmp_path, fit_readout(train_x, train_y, readout_section({"method": "ridge"})))
    arrays = tmp_path / "readout.npz"
    arrays.write_bytes(b"" if damage == "empty" else arrays.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"read-out {tmp_path} cannot be read .*rerun rule "
                                         rf"evaluate_encoder"):
        load_readout(tmp_path)


@pytest.mark.parametrize("method, row", [("mse", 0), ("ridge", 10)])
def test_features_that_are_not_finite_are_refused_naming_the_subjects(tmp_path, method, row):
    # A NaN feature row (a broken encoder) was read out silently: the small predictors
    # fitted on it predicted NaN for everyone, any read-out gave such a test subject a NaN
    # age, and metrics.json recorded MAE NaN (a search trial's NaN MAE was passed over
    # by best.json's choice); Ridge stopped with scikit-learn's "Input X contains NaN".
    from brainage.evaluate import evaluate_split
    from brainage.split_data import DataError

    split = load_split(write_split(tmp_path, n_subjects=12, n_test=4, shape=(4, 4, 4)))
    rows = np.concatenate([split.train_index, split.eval_index])
    features = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    features[row, 3] = np.nan  # row 0 trains, row 10 is a test subject
    settings = resolve_cell(tiny_settings(readout={"method": method}))
    with pytest.raises(DataError, match=rf"features of {split.participant_ids[rows[row]]} "
                                        rf"are NaN or inf.*config key train\.lr"):
        evaluate_split(split, features, settings)
    features[row, 3] = 0.0
    metrics, _, _ = evaluate_split(split, features, settings)
    assert np.isfinite(metrics["mae"])

def test_a_collapsed_encoder_is_warned_of_and_a_working_one_is_not(tmp_path, caplog):
    """Features equal for every training subject (a collapsed, finite encoder) read out
    as the training-mean age: the cell's Table 3 row looked like a poor loss. The warning
    names the cell and train.lr; features that differ, even a little, give none."""
    from brainage.evaluate import evaluate_split
    from brainage.split_data import DataError

    split = load_split(write_split(tmp_path, n_subjects=12, n_test=4, shape=(4, 4, 4)))
    settings = resolve_cell(tiny_settings(readout={"method": "ridge"}))
    collapsed = np.tile(np.float32([0.0, 1.5, -2.0, 0.3]), (12, 1))
    collapsed[:, 1] += np.float32(1e-7) * np.arange(12, dtype=np.float32)  # float32 noise
    with caplog.at_level("WARNING", logger="brainage.evaluate"):
        evaluate_split(split, collapsed, settings)
    assert re.search(r"split holdout, test/adaptive seed 0: the \w+ features \(model.features\) "
                     r"are the same for every training subject.*collapsed.*train\.lr.*"
                     r"search_hyperparameters for a search trial", caplog.text)
    # a variant may set its own train.lr, which the top-level one does not change (lowering
    # that retrained every other cell and left this one as it was)
    assert ("Lower config key train.lr (or experiments.test.variants.adaptive.train.lr where "
            "that variant sets it), or check") in caplog.text, caplog.text
    # a search trial cannot override it: the top-level key alone (there is no
    # experiments.search section to name)
    caplog.clear()
    trial = {**settings, "experiment": "search", "variant": "trial-01"}
    with caplog.at_level("WARNING", logger="brainage.evaluate"):
        evaluate_split(split, collapsed, trial)
    assert "Lower config key train.lr, or check the loss settings" in caplog.text, caplog.text
    # a pretraining run (rule evaluate_pretrained_encoder) has its own key and rule: the
    # top-level train.lr retrained every grid cell and left the run as it was
    caplog.clear()
    pretraining = {**settings, "experiment": "pretrain", "variant": "t1w"}
    with caplog.at_level("WARNING", logger="brainage.evaluate"):
        evaluate_split(split, collapsed, pretraining)
    assert ("Lower config key pretrain.t1w.train.lr, or check the loss settings, and train it "
            "again (rule pretrain_encoder).") in caplog.text, caplog.text
    broken = collapsed.copy()
    broken[0, 0] = np.nan
    with pytest.raises(DataError, match=r"lower config key pretrain\.t1w\.train\.lr and train "
                                        r"it again \(rule pretrain_encoder\)"):
        evaluate_split(split, broken, pretraining)
    for init, checkpoint, cause in (
            ("scratch", None, r"untrained \(train.epochs 0\)"),
            ("pretrained:t1", None, r"pretraining run 't1' as it is.*pretrain_encoder"),
            ("scratch", "openbhb.pt", r"checkpoint openbhb.pt as it is")):
        caplog.clear()
        frozen = resolve_cell(tiny_settings(readout={"method": "ridge"}, train={"epochs": 0},
                                            model={"init": init,
                                                   "init_checkpoint": checkpoint}))
        with caplog.at_level("WARNING", logger="brainage.evaluate"):
            evaluate_split(split, collapsed, frozen)
        assert re.search(rf"collapsed.*{cause}", caplog.text) and "train.lr" not in \
            caplog.text, caplog.text
    caplog.clear()
    working = collapsed.copy()
    working[:, 2] += np.float32(1e-3) * np.arange(12, dtype=np.float32)
    with caplog.at_level("WARNING", logger="brainage.evaluate"):
        evaluate_split(split, working, settings)
    assert "collapsed" not in caplog.text


def test_unknown_readout():
    with pytest.raises(ConfigError, match="readout.method"):
        fit_readout(np.zeros((4, 2)), np.arange(4.0), readout_section({"method": "svm"}))


def test_metrics_closed_form():
    ages = np.array([20.0, 40.0, 60.0, 90.0])
    studies = np.array(["a", "a", "b", "b"])
    perfect = compute_metrics(ages, ages, studies)
    assert perfect["mae"] == 0 and perfect["rmse"] == 0 and perfect["r2"] == 1
    assert perfect["pearson_r"] == pytest.approx(1) and perfect["gap_age_slope"] == pytest.approx(0)
    constant = compute_metrics(ages, np.full(4, 50.0), studies)
    assert constant["gap_age_slope"] == pytest.approx(-1)  # full regression to the mean
    assert constant["pearson_r"] is None
    # a constant whose mean rounds: np.std of these three is 7e-15, not 0 (an r of -5.7e-16)
    rounded = compute_metrics(np.array([71.5, 75.3, 47.1]), np.full(3, 53.27692307692307),
                              np.array(["a", "a", "b"]))
    assert rounded["pearson_r"] is None and rounded["gap_age_slope"] == pytest.approx(-1)
    assert constant["mae"] == 22.5 and constant["mae_per_study"] == {"a": 20.0, "b": 25.0}
    uneven = compute_metrics(ages, ages, np.array(["b", "a", "b", "b"]))
    assert uneven["n_per_study"] == {"a": 1, "b": 3}
    shifted = compute_metrics(ages, ages + np.array([1.0, -1.0, 3.0, -3.0]), studies)
    assert shifted["mae"] == 2 and shifted["rmse"] == pytest.approx(np.sqrt(5))


def test_metrics_of_biased_predictions_by_hand():
    # Errors 12, 7, -3, -8 (mean 2): in test_metrics_closed_form the errors average 0,
    # where RMSE equals the errors' sd, and R2 is only checked where its denominators
    # agree; an RMSE computed as sd(error), or an R2 over the predictions' spread instead
    # of the ages', kept those passing.
    ages = np.array([20.0, 40.0, 60.0, 80.0])  # sum of squares about the mean: 2000
    predicted = np.array([32.0, 47.0, 57.0, 72.0])  # about their mean 52: 850
    metrics = compute_metrics(ages, predicted, np.array(["a", "a", "a", "b"]))
    assert metrics["mae"] == pytest.approx(7.5)
    assert metrics["rmse"] == pytest.approx(np.sqrt(266 / 4))  # sd(error) is sqrt(62.5)
    assert metrics["r2"] == pytest.approx(1 - 266 / 2000)
    assert metrics["pearson_r"] == pytest.approx(1300 / np.sqrt(2000 * 850))
    assert metrics["gap_age_slope"] == pytest.approx(-700 / 2000)
    assert metrics["mae_per_study"] == pytest.approx({"a": 22 / 3, "b": 8.0})
    assert metrics["n_per_study"] == {"a": 3, "b": 1}


def test_metrics_of_test_subjects_of_one_age_leave_the_undefined_ones_out():
    # one age (a leave-one-study-out split of a single-age study): the gap-age slope, r and
    # R2 are undefined (None), not whatever a singular least-squares fit returns
    metrics = compute_metrics(np.full(3, 30.0), np.array([28.0, 31.0, 33.0]),
                              np.array(["a", "a", "a"]))
    assert metrics["gap_age_slope"] is None
    assert metrics["pearson_r"] is None and metrics["r2"] is None
    assert metrics["mae"] == pytest.approx(2.0)


def test_metrics_of_two_test_subjects_give_no_correlation_and_no_slope():
    # a pilot of 8-12 subjects leaves 2 test subjects at the default 20 %: two points give
    # r = 1.000 (Table 3 printed it for every row) and an exact line, arithmetic both
    metrics = compute_metrics(np.array([25.6, 61.2]), np.array([34.0, 47.0]),
                              np.array(["a", "a"]))
    assert metrics["pearson_r"] is None and metrics["gap_age_slope"] is None
    assert metrics["mae"] == pytest.approx((8.4 + 14.2) / 2)
    assert metrics["r2"] is not None  # defined: the error against the ages' spread
    three = compute_metrics(np.array([25.6, 61.2, 40.0]), np.array([34.0, 47.0, 41.0]),
                            np.array(["a", "a", "a"]))
    assert three["pearson_r"] is not None and three["gap_age_slope"] is not None


def test_three_training_subjects_are_not_told_to_widen_a_grid_nothing_was_chosen_from(
        tmp_path, caplog):
    # every alpha scores NaN with 3 training subjects and the grid's first is kept: the
    # next warning said cross-validation "chose" the grid's smallest and to widen the grid
    split_dir = write_split(tmp_path / "dataset", n_subjects=4, n_test=1, shape=(4, 4, 4))
    settings = tiny_settings(model={"encoder": "none"},
                             readout={"method": "ridge", "alphas": [0.01, 1.0, 100.0]})
    with caplog.at_level("WARNING"):
        evaluate_encoder(split_dir, None, settings, metrics_path=tmp_path / "metrics.json",
                         predictions_path=tmp_path / "predictions.tsv")
    assert "every alpha scores NaN" in caplog.text
    assert "beyond the grid" not in caplog.text, caplog.text


def test_predictions_and_metrics_describe_the_splits_own_subjects(tmp_path):
    """predictions.tsv holds train rows then test rows: each row's study, age and subset
    are that participant's in participants.tsv, and metrics.json, the read-out's training
    summary and its test-set age-bias record are computed over the right rows."""
    split_dir = write_split(tmp_path / "dataset", n_subjects=12, n_test=4, shape=(4, 4, 4))
    settings = tiny_settings(model={"encoder": "none"}, readout={"method": "pca_ridge"})
    metrics = evaluate_encoder(split_dir, None, settings, metrics_path=tmp_path / "metrics.json",
                               predictions_path=tmp_path / "predictions.tsv")
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t").set_index("participant_id")
    predictions = pd.read_csv(tmp_path / "predictions.tsv", sep="\t")
    assert predictions["subset"].tolist() == ["train"] * 8 + ["test"] * 4
    expected = table.loc[predictions["participant_id"]]
    assert predictions["study"].tolist() == expected["study"].tolist()
    assert predictions["subset"].tolist() == expected["subset"].tolist()
    np.testing.assert_array_equal(predictions["age"], expected["age"])
    test = predictions[predictions["subset"] == "test"]
    gap = test["predicted_age"] - test["age"]
    assert metrics["mae"] == pytest.approx(gap.abs().mean())
    assert metrics["n_per_study"] == test["study"].value_counts().to_dict()
    description = json.loads((tmp_path / "readout.json").read_text())
    train_ages = table.loc[table["subset"] == "train", "age"]
    training = description["training"]
    assert training["n_subjects"] == 8 and training["age_mean"] == pytest.approx(train_ages.mean())
    assert (training["age_min"], training["age_max"]) == (train_ages.min(), train_ages.max())
    assert training["age_sd"] == pytest.approx(np.std(train_ages))  # population sd (ddof 0)
    assert training["studies"] == table.loc[table["subset"] == "train", "study"
                                            ].value_counts().to_dict()
    on_test = description["bias_correction"]["test"]
    assert on_test["n_subjects"] == 4
    assert on_test["gap_age_r_before"] == pytest.approx(np.corrcoef(test["age"], gap)[0, 1])


def test_features_of_another_split_are_refused(tmp_path):
    """features.npz embeds train then test rows of the split it was written for: another
    split's (other test subjects) would pair each subject with someone else's features."""
    from brainage.split_data import DataError

    embedded = write_split(tmp_path / "a", n_subjects=12, n_test=4, seed=0)
    other = write_split(tmp_path / "b", n_subjects=12, n_test=4, seed=1)
    settings = tiny_settings()
    write_features(tmp_path / "features.npz", build_model(resolve_cell(settings)["model"]),
                   load_split(embedded), "sha", device=torch.device("cpu"))
    with pytest.raises(DataError, match=r"features\.npz lists other subjects than split "
                                        r"holdout .*delete it and run again \(rule "
                                        r"train_encoder writes it\)"):
        evaluate_encoder(other, tmp_path / "features.npz", settings,
                         metrics_path=tmp_path / "cell" / "metrics.json",
                         predictions_path=tmp_path / "cell" / "predictions.tsv")


def test_features_whose_subjects_changed_subset_are_refused(tmp_path):
    """The same subjects in the same order, but the last training row is now the first
    test row (the boundary moved): the encoder trained on a subject the cell now tests
    (found by a review: only the order of the ids was compared)."""
    from brainage.split_data import DataError

    split_dir = write_split(tmp_path / "a", n_subjects=12, n_test=4, seed=0)
    settings = tiny_settings()
    features_path = tmp_path / "features.npz"
    write_features(features_path, build_model(resolve_cell(settings)["model"]),
                   load_split(split_dir), "sha", device=torch.device("cpu"))
    with np.load(features_path, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files}
    subsets = arrays["subset"].copy()
    assert subsets.tolist() == ["train"] * 8 + ["test"] * 4
    subsets[8] = "train"  # written when the first test subject was a training subject
    arrays["subset"] = subsets
    np.savez(features_path, **arrays)
    with pytest.raises(DataError, match=r"features\.npz lists other subjects than split "
                                        r"holdout .*and their subsets"):
        evaluate_encoder(split_dir, features_path, settings,
                         metrics_path=tmp_path / "cell" / "metrics.json",
                         predictions_path=tmp_path / "cell" / "predictions.tsv")


def test_a_damaged_features_file_is_named_with_what_to_rerun(tmp_path):
    """A features.npz cut short (an interrupted copy of the results folder) stopped the
    evaluation with zipfile's "File is not a zip file", naming no file, on every rerun;
    the embeddings the UMAP figure reads the same."""
    from brainage.report.figures import load_embeddings
    from brainage.report.targets import ReportError
    from brainage.split_data import DataError

    split_dir = write_split(tmp_path / "a", n_subjects=12, n_test=4, seed=0)
    settings = tiny_settings()
    features_path = tmp_path / "features.npz"
    write_features(features_path, build_model(resolve_cell(settings)["model"]),
                   load_split(split_dir), "sha", device=torch.device("cpu"))
    features_path.write_bytes(features_path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"features file .*features\.npz cannot be read "
                                        r"\(.*\); delete it and run again \(rule "
                                        r"train_encoder writes it\)"):
        evaluate_encoder(split_dir, features_path, settings,
                         metrics_path=tmp_path / "cell" / "metrics.json",
                         predictions_path=tmp_path / "cell" / "predictions.tsv")
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "epoch-001.npz").write_bytes(b"")
    with pytest.raises(ReportError, match=r"epoch-001\.npz cannot be read .*rerun the job"):
        load_embeddings(tmp_path / "embeddings")


def test_metrics_record_the_loss_the_encoder_was_trained_with(tmp_path):
    """After loss.nn_from_search the encoder trains with the search's nn_final/nn_step, not
    the configured ones: metrics.json says which, from what training wrote."""
    split_dir = write_split(tmp_path / "dataset", n_subjects=12, n_test=4)
    settings = tiny_settings()  # configured: the schema's nn_final and nn_step
    model = build_model(resolve_cell(settings)["model"])
    configured = resolve_cell(settings)["loss"]
    searched = {**configured, "nn_final": configured["nn_final"] + 1, "nn_step": 1,
                "nn_from_search": True}
    for name, trained in (("searched", searched), ("untrained", None)):
        write_features(tmp_path / f"{name}.npz", model, load_split(split_dir), "sha",
                       device=torch.device("cpu"), trained_loss=trained)
        evaluate_encoder(split_dir, tmp_path / f"{name}.npz", settings,
                         metrics_path=tmp_path / name / "metrics.json",
                         predictions_path=tmp_path / name / "predictions.tsv")
    recorded = json.loads((tmp_path / "searched" / "metrics.json").read_text())["trained_loss"]
    assert recorded == json.loads(json.dumps(searched))
    # an untrained encoder (train.epochs 0) had no loss
    assert json.loads((tmp_path / "untrained" / "metrics.json").read_text())[
        "trained_loss"] is None


@pytest.mark.parametrize("features, method", [("projection", "ridge"), ("encoder", "dex")])
def test_evaluate_encoder_writes_metrics_and_predictions(tmp_path, features, method):
    split_dir = write_split(tmp_path / "dataset", n_subjects=12, n_test=4)
    settings = tiny_settings(model={"features": features}, readout={"method": method})
    torch.manual_seed(0)
    model = build_model(resolve_cell(settings)["model"])
    write_features(tmp_path / "features.npz", model, load_split(split_dir), "sha-of-encoder",
                   device=torch.device("cpu"))
    metrics = evaluate_encoder(split_dir, tmp_path / "features.npz", settings,
                               metrics_path=tmp_path / "metrics.json",
                               predictions_path=tmp_path / "predictions.tsv")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["readout"] == method and saved["n_train"] == 8 and saved["n_test"] == 4
    assert saved["split"] == "holdout" and saved["loss"] == "adaptive"
    assert saved["features"] == str(tmp_path / "features.npz")  # whose encoder was evaluated
    assert ("ridge_alpha" in saved) == (method == "ridge")
    predictions = pd.read_csv(tmp_path / "predictions.tsv", sep="\t")
    assert sorted(predictions.subset.unique()) == ["test", "train"]
    assert predictions.participant_id.is_unique and len(predictions) == 12
    assert np.isfinite(predictions.predicted_age).all()
    # the fitted read-out is saved next to the metrics and predicts exactly what was recorded
    readout, description = load_readout(tmp_path)
    assert description["method"] == method and description["features"] == features
    assert description["encoder_sha256"] == saved["encoder_sha256"] == "sha-of-encoder"
    assert {"training", "test"} <= set(description["bias_correction"])
    with np.load(tmp_path / "features.npz") as saved_features:
        embedded = saved_features[features]
    # to 1e-9 years: BLAS may round the last bit differently for differently aligned arrays
    np.testing.assert_allclose(readout.predict(embedded), predictions.predicted_age.to_numpy(),
                               rtol=0, atol=1e-9)
    # new arrays beside an earlier fit's description (a job stopped between the two
    # atomic writes) are refused, not paired
    arrays = tmp_path / "readout.npz"
    with np.load(arrays) as loaded:
        state = {key: loaded[key] for key in loaded.files}
    np.savez(arrays, **{key: value * 2 if value.dtype.kind == "f" else value
                        for key, value in state.items()})
    with pytest.raises(ValueError, match=r"readout\.npz is not the file .*readout\.json "
                                         r"describes .*Rerun rule evaluate_encoder"):
        load_readout(tmp_path)
