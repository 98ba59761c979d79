"""Random search over nn_final / nn_step on a validation split (brainage.search)."""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from brainage.config import ConfigError, resolve_cell, search_settings, training_settings
from brainage.data import load_split
from brainage.search import (
    FEW_VALIDATION_SUBJECTS,
    TRIAL_COLUMNS,
    apply_search_result,
    random_search,
    sample_trials,
)
from split_fixture import tiny_settings, write_split

SEARCH = {"enabled": True, "trials": 2, "validation_fraction": 0.25,
          "nn_final_range": [2, 6], "nn_step_range": [1, 1], "seed": 0}


def test_trials_are_drawn_within_the_ranges():
    search = {**SEARCH, "trials": 30, "nn_final_range": [2, 32], "nn_step_range": [1, 10]}
    trials = sample_trials(search, batch_size=16, epochs=10)
    assert len(trials) == 30 and [t["trial"] for t in trials] == list(range(1, 31))
    assert all(2 <= t["nn_final"] <= 16 for t in trials)  # cut at the batch size
    assert all(1 <= t["nn_step"] <= 5 for t in trials)    # cut at epochs // 2
    assert len({(t["nn_final"], t["nn_step"]) for t in trials}) > 10
    assert trials == sample_trials(search, batch_size=16, epochs=10)  # seeded
    with pytest.raises(ConfigError, match="search.nn_final_range"):
        sample_trials({**search, "nn_final_range": [20, 32]}, batch_size=16, epochs=10)


def test_validation_is_carved_from_training_subjects_only(tmp_path):
    split = load_split(write_split(tmp_path, n_subjects=24, n_test=6))
    carved = split.with_validation(0.25, seed=0)
    train = set(split.train_index)
    assert set(carved.eval_index) <= train and set(carved.train_index) <= train
    assert not set(carved.eval_index) & set(carved.train_index)
    assert len(carved.eval_index) + len(carved.train_index) == len(train)
    assert set(carved.studies[carved.eval_index]) == set(split.studies[split.train_index])
    assert carved.subset_labels()[split.eval_index].tolist() == [""] * 6  # test rows unused
    # a large share still leaves every study at least one training subject
    greedy = split.with_validation(0.95, seed=0)  # rounds to every subject
    assert set(greedy.studies[greedy.train_index]) == set(split.studies[split.train_index])


def test_validation_takes_each_studys_rounded_share_of_its_training_subjects(tmp_path):
    # Studies A, B, C have 7, 5 and 6 training subjects: a quarter is 1.75, 1.25 and 1.5,
    # rounded 2, 1, 2 (truncating gave 1, 1, 1), each drawn from its own study (a draw from
    # all training subjects gave any mix), whatever the seed.
    split = load_split(write_split(tmp_path, n_subjects=24, n_test=6))
    studies = split.studies[split.train_index]
    assert {study: int((studies == study).sum()) for study in set(studies)} == {
        "studyA": 7, "studyB": 5, "studyC": 6}
    for seed in range(5):
        carved = split.with_validation(0.25, seed=seed)
        drawn = carved.studies[carved.eval_index]
        assert {study: int((drawn == study).sum()) for study in set(drawn)} == {
            "studyA": 2, "studyB": 1, "studyC": 2}, seed
        assert len(set(carved.eval_index)) == 5 and len(carved.train_index) == 13



def test_the_validation_subjects_do_not_depend_on_the_row_order(tmp_path):
    """The same subjects in another row order of participants.tsv (a sorted spreadsheet, a
    study appended in between) gave another validation set, so another search result;
    the holdout test set was already drawn independently of the row order."""
    split = load_split(write_split(tmp_path, n_subjects=24, n_test=6))
    order = np.random.default_rng(1).permutation(len(split.table))
    shuffled = type(split)(split.name, split.images[order],
                           split.table.iloc[order].reset_index(drop=True), split.stats,
                           train_index=np.flatnonzero(np.isin(order, split.train_index)),
                           eval_index=np.flatnonzero(np.isin(order, split.eval_index)))
    for seed in range(3):
        chosen = split.with_validation(0.25, seed=seed)
        again = shuffled.with_validation(0.25, seed=seed)
        assert sorted(again.participant_ids[again.eval_index]) == sorted(
            chosen.participant_ids[chosen.eval_index])


@pytest.mark.parametrize("fraction", [0.05, 0.2])
@pytest.mark.parametrize("seed", range(20))
def test_a_tiny_training_set_keeps_every_study_in_training(seed, fraction):
    """0.2 of 5 subjects is one place, by largest remainder to study b; 0.05 rounds to no
    place at all, and the one subject drawn instead must come from a study with a second
    training subject (a one-subject study would leave training)."""
    from brainage.split_data import SplitData

    table = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(5)],
                          "age": [20.0, 30.0, 40.0, 50.0, 60.0],
                          "study": ["a", "b", "b", "c", "c"]})
    split = SplitData("tiny", np.zeros((5, 1, 2, 2, 2), dtype=np.float32), table, {},
                      train_index=np.arange(5), eval_index=np.array([], dtype=np.int64))
    carved = split.with_validation(fraction, seed=seed)
    assert len(carved.eval_index) == 1
    assert set(carved.studies[carved.train_index]) == {"a", "b", "c"}

def test_a_place_a_one_subject_study_cannot_give_goes_to_another_study():
    """0.2 of 25 training subjects is 5 places; studies a-e of one subject each have the
    largest remainders (0.2 against 0 for f and g), but each must keep its subject. Their
    places went nowhere: 4 validation subjects (docs/method.md promises round(0.2 n))."""
    from brainage.split_data import SplitData, subjects_left_for_training, validation_counts

    sizes = {**{study: 1 for study in "abcde"}, "f": 10, "g": 10}
    counts = validation_counts(sizes, 0.2)
    assert sum(counts.values()) == 5
    assert all(counts[study] == 0 for study in "abcde")
    assert subjects_left_for_training(sizes, 0.2) == 20
    studies = [study for study, size in sizes.items() for _ in range(size)]
    table = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(25)],
                          "age": np.linspace(20.0, 80.0, 25), "study": studies})
    split = SplitData("single", np.zeros((25, 1, 2, 2, 2), dtype=np.float32), table, {},
                      train_index=np.arange(25), eval_index=np.array([], dtype=np.int64))
    carved = split.with_validation(0.2, seed=0)
    assert len(carved.eval_index) == 5
    assert set(carved.studies[carved.train_index]) == set(sizes)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 0.95])
def test_planning_counts_the_subjects_the_trials_train_on(tmp_path, fraction):
    """subjects_left_for_training (the planning check of the search's batch) counts what
    with_validation leaves, for any seed: per-study rounding, the cap that keeps a study
    in training, and the one subject taken when every study rounds to none."""
    from brainage.split_data import SplitData, subjects_left_for_training

    split = load_split(write_split(tmp_path, n_subjects=24, n_test=6))
    tiny = SplitData("tiny", np.zeros((5, 1, 2, 2, 2), dtype=np.float32),
                     pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(5)],
                                   "age": [20.0, 30.0, 40.0, 50.0, 60.0],
                                   "study": ["a", "b", "b", "c", "c"]}), {},
                     train_index=np.arange(5), eval_index=np.array([], dtype=np.int64))
    for data in (split, tiny):
        studies = data.studies[data.train_index]
        sizes = {study: int((studies == study).sum()) for study in set(studies)}
        for seed in range(3):
            carved = data.with_validation(fraction, seed=seed)
            assert subjects_left_for_training(sizes, fraction) == len(carved.train_index)


@pytest.mark.slow
def test_random_search_writes_trials_and_best(tmp_path, caplog):
    split_dir = write_split(tmp_path / "dataset", n_subjects=20, n_test=4)
    settings = tiny_settings(train={"epochs": 2, "batch_size": 6, "embed_epochs": []})
    out = tmp_path / "search"
    with caplog.at_level(logging.WARNING, logger="brainage.search"):
        best = random_search(split_dir, out, settings, SEARCH)
    # a handful of validation subjects: the choice is mostly noise, and the log says so
    assert len(best["validation_subjects"]) < FEW_VALIDATION_SUBJECTS
    assert [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "brainage.search"] == [
        f"search on {split_dir}: {len(best['validation_subjects'])} validation subjects and "
        f"one training per trial: the trials' validation MAE varies with the seed and the few "
        f"subjects as much as with nn_final and nn_step, so the choice is mostly noise at "
        f"this scale. Consider setting loss.nn_final and loss.nn_step (the paper's 14 and 1) "
        f"instead of loss.nn_from_search."]
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    assert tuple(trials.columns) == TRIAL_COLUMNS and len(trials) == 2
    assert np.isfinite(trials.validation_mae).all()
    saved = json.loads((out / "best.json").read_text())
    assert saved == best
    assert best["validation_mae"] == trials.validation_mae.min()
    assert (best["nn_final"], best["nn_step"]) == tuple(
        trials.loc[trials.validation_mae.idxmin(), ["nn_final", "nn_step"]])
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    test_ids = set(table.participant_id[table.subset == "test"])
    assert not test_ids & set(best["validation_subjects"])
    assert not list(out.glob("trial-*/encoder.pt"))  # only the scores are kept
    # a rerun reuses the finished trials
    stamps = [path.stat().st_mtime_ns for path in sorted(out.glob("trial-*/metrics.json"))]
    assert random_search(split_dir, out, settings, SEARCH) == best
    assert stamps == [path.stat().st_mtime_ns for path in sorted(out.glob("trial-*/metrics.json"))]


def test_a_trial_killed_between_its_encoder_and_its_features_is_not_trained_again(
        tmp_path, monkeypatch):
    """The trial's training deleted its checkpoint with the encoder written, before the
    search embedded the subjects: a kill there (a SLURM time limit) left neither features
    nor checkpoint, and the rerun trained the trial from its first epoch. The checkpoint
    now stays until the features are stored; the rerun resumes at the last epoch."""
    import brainage.search as search_module
    import brainage.train as train_module

    split_dir = write_split(tmp_path / "dataset", n_subjects=20, n_test=4)
    settings = tiny_settings(train={"epochs": 2, "batch_size": 6, "embed_epochs": []})
    out = tmp_path / "search"
    search = {**SEARCH, "trials": 1}
    epochs = []
    run_epoch = train_module.run_epoch
    monkeypatch.setattr(train_module, "run_epoch",
                        lambda *args, **kwargs: epochs.append(kwargs["epoch"])
                        or run_epoch(*args, **kwargs))
    embed_all = search_module.embed_all

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while embedding the trial's subjects")

    monkeypatch.setattr(search_module, "embed_all", killed)
    with pytest.raises(KeyboardInterrupt):
        random_search(split_dir, out, settings, search)
    assert epochs == [1, 2] and (out / "trial-01" / "checkpoint.pt").is_file()
    monkeypatch.setattr(search_module, "embed_all", embed_all)
    best = random_search(split_dir, out, settings, search)
    assert epochs == [1, 2]  # resumed after epoch 2 of 2: no epoch trained again
    assert np.isfinite(best["validation_mae"])
    assert sorted(path.name for path in (out / "trial-01").iterdir()) == [
        "features.npz", "history.tsv", "metrics.json"]


def test_a_trial_interrupted_before_a_read_out_edit_resumes_at_its_checkpoint(
        tmp_path, monkeypatch):
    """A read-out edit reruns the search and only rescores finished trials, but the trial
    that was interrupted trained with a resume fingerprint over its whole settings,
    read-out included: its checkpoint was ignored and it started again at epoch 1."""
    import brainage.train as train_module

    split_dir = write_split(tmp_path / "dataset", n_subjects=20, n_test=4)
    settings = tiny_settings(train={"epochs": 3, "batch_size": 6, "embed_epochs": []})
    out = tmp_path / "search"
    search = {**SEARCH, "trials": 1}
    epochs = []
    run_epoch = train_module.run_epoch

    def killed_in_epoch_3(*args, **kwargs):
        epochs.append(kwargs["epoch"])
        if kwargs["epoch"] == 3 and epochs.count(3) == 1:
            raise KeyboardInterrupt("time limit")
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        random_search(split_dir, out, settings, search)
    random_search(split_dir, out, {**settings, "readout": {"alphas": [0.5, 5.0]}}, search)
    assert epochs == [1, 2, 3, 3]


def test_a_damaged_trial_features_file_trains_the_trial_again(stubbed_search):
    """A cut-short trial-NN/features.npz (not a Snakemake output) stopped the search with
    zipfile's error on every rerun; it now counts as absent and is replaced."""
    trained, split_dir, settings, out = stubbed_search
    search = {**SEARCH, "trials": 1}
    random_search(split_dir, out, settings, search)
    features = out / "trial-01" / "features.npz"
    features.write_bytes(features.read_bytes()[:100])
    random_search(split_dir, out, {**settings, "readout": {"alphas": [0.5]}}, search)
    assert len(trained) == 2
    assert random_search(split_dir, out, {**settings, "readout": {"alphas": [0.25]}},
                         search)["n_trials"] == 1
    assert len(trained) == 2  # the replaced file is read again


@pytest.mark.parametrize("damage", ["", "[1, 2]"])
def test_a_damaged_trial_metrics_file_is_scored_again(stubbed_search, caplog, damage):
    """A cut-short trial-NN/metrics.json (the trial folders are no rule's outputs) stopped
    the search with a bare JSONDecodeError, naming no file, on every rerun."""
    trained, split_dir, settings, out = stubbed_search
    search = {**SEARCH, "trials": 1}
    best = random_search(split_dir, out, settings, search)
    metrics = out / "trial-01" / "metrics.json"
    metrics.write_text(damage)
    with caplog.at_level(logging.WARNING, logger="brainage.search"):
        assert random_search(split_dir, out, settings, search) == best
    assert re.search(rf"ignoring the trial's metrics {re.escape(str(metrics))}, which cannot be "
                     rf"read \(.+\); scoring the trial again", caplog.text), caplog.text
    assert isinstance(json.loads(metrics.read_text()), dict)


def test_a_diverged_trial_names_the_grids_learning_rate_key(tmp_path, monkeypatch):
    """The trial trains with its training settings alone, which carry no experiment name;
    the divergence message then named train.lr "or a pretraining run's" key."""
    import brainage.train as train_module

    split_dir = write_split(tmp_path / "dataset", n_subjects=20, n_test=4)
    settings = tiny_settings(train={"epochs": 2, "batch_size": 6, "embed_epochs": []})
    monkeypatch.setattr(train_module, "run_epoch", lambda *args, **kwargs: float("nan"))
    with pytest.raises(FloatingPointError, match="every trial"):
        random_search(split_dir, tmp_path / "search", settings, {**SEARCH, "trials": 1})
    record = json.loads((tmp_path / "search" / "trial-01" / "metrics.json").read_text())
    assert "Lower config key train.lr or" in record["failed"], record["failed"]


def _stub_trial_training(monkeypatch, trained: list) -> None:
    """Replace a trial's training and scoring by stubs: each trial "trains" in no time (its
    encoder.pt an empty file) and scores validation MAE nn_final + nn_step / 10."""
    import brainage.search as search_module

    def fit_encoder(split, settings, *, encoder_path, checkpoint_path, history_path,
                    keep_checkpoint=False):
        trained.append((settings["loss"]["nn_final"], settings["loss"]["nn_step"]))
        encoder_path.parent.mkdir(parents=True, exist_ok=True)
        encoder_path.write_bytes(b"")

    def evaluate_split(split, features, settings):
        mae = settings["loss"]["nn_final"] + settings["loss"]["nn_step"] / 10
        return {"mae": mae, "rmse": mae}, None, None

    monkeypatch.setattr(search_module, "fit_encoder", fit_encoder)
    monkeypatch.setattr(search_module, "load_encoder",
                        lambda path, model: SimpleNamespace(to=lambda device: None))
    monkeypatch.setattr(search_module, "VolumeStore", lambda *args, **kwargs: None)
    monkeypatch.setattr(search_module, "embed_all", lambda model, store, subjects: {
        "encoder": np.zeros((len(subjects), 4)), "projection": np.zeros((len(subjects), 2))})
    monkeypatch.setattr(search_module, "evaluate_split", evaluate_split)


@pytest.fixture
def stubbed_search(tmp_path, monkeypatch):
    """(trained (nn_final, nn_step) list, split folder, settings, search folder) with the
    trials' training stubbed (_stub_trial_training)."""
    trained = []
    _stub_trial_training(monkeypatch, trained)
    split_dir = write_split(tmp_path / "dataset", n_subjects=20, n_test=4, shape=(4, 4, 4))
    settings = tiny_settings(train={"epochs": 2, "batch_size": 6, "embed_epochs": []})
    return trained, split_dir, settings, tmp_path / "search"


def test_a_rerun_with_another_search_retrains_the_trials_it_changed(stubbed_search):
    """A finished trial is reused only when it was scored with what the trial trains now.
    Reusing every trial-<NN>/metrics.json (the folders are no Snakemake outputs, and
    survive a change of search.seed or range) put the old trials' nn_final and MAE into
    trials.tsv and best.json, scored on another validation set."""
    trained, split_dir, settings, out = stubbed_search
    first = {**SEARCH, "nn_final_range": [2, 2]}
    assert random_search(split_dir, out, settings, first)["nn_final"] == 2
    assert trained == [(2, 1)]  # the pair drawn twice trains once
    assert random_search(split_dir, out, settings, first)["nn_final"] == 2
    assert len(trained) == 1  # unchanged: both trials reused
    best = random_search(split_dir, out, settings, {**SEARCH, "nn_final_range": [5, 5]})
    assert trained[1:] == [(5, 1)]
    assert best["nn_final"] == 5 and best["validation_mae"] == pytest.approx(5.1)
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    assert trials["nn_final"].tolist() == [5, 5]
    # another validation set (search.seed) retrains too, the planned values permitting
    random_search(split_dir, out, settings,
                  {**SEARCH, "nn_final_range": [5, 5], "seed": 1})
    assert len(trained) == 3


def test_the_umap_epochs_retrain_no_trial(stubbed_search):
    """train.embed_epochs says which epochs the UMAP figure shows; trials write no
    embeddings, but it was part of their key, so changing it retrained every trial (30
    trainings in the paper config). Trials keyed with it before still count."""
    from brainage.search import TRIAL_KEY, trial_key

    trained, split_dir, settings, out = stubbed_search
    best = random_search(split_dir, out, settings, SEARCH)
    assert len(trained) == 2
    shown = {**settings, "train": {**settings["train"], "embed_epochs": [1, 2]}}
    assert random_search(split_dir, out, shown, SEARCH) == best
    assert len(trained) == 2  # both trials reused
    # a trial keyed as before: with the embed_epochs of its settings
    split = load_split(split_dir, require_eval=False).with_validation(
        SEARCH["validation_fraction"], SEARCH["seed"])
    metrics_path = out / "trial-01" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    base = resolve_cell({**shown, "loss": {**shown["loss"], "name": "adaptive"}})
    metrics[TRIAL_KEY] = trial_key({**base, "variant": "trial-01", "loss": {
        **base["loss"], "nn_final": metrics["nn_final"], "nn_step": metrics["nn_step"]}}, split)
    metrics_path.write_text(json.dumps(metrics))
    assert random_search(split_dir, out, shown, SEARCH) == best
    assert len(trained) == 2
    # what a trial is scored with still retrains it
    random_search(split_dir, out, {**shown, "train": {**shown["train"], "epochs": 3}}, SEARCH)
    assert len(trained) == 4


def test_another_read_out_scores_the_trials_again_without_training_them(stubbed_search):
    """The read-out (readout.*, model.features) scores a trial but does not train it: a
    change retrained every trial (30 in the paper config; found by a review), now each
    trial's kept features are read out again. What trains the encoder still retrains it."""
    from brainage.search import TRIAL_FEATURES, TRIAL_KEY

    trained, split_dir, settings, out = stubbed_search
    random_search(split_dir, out, settings, SEARCH)
    assert len(trained) == 2
    assert not (out / "trial-01" / "encoder.pt").exists()
    first = json.loads((out / "trial-01" / "metrics.json").read_text())
    for readout in ({**settings, "readout": {"alphas": [0.5, 5.0]}},
                    {**settings, "model": {**settings.get("model", {}), "features": "encoder"}}):
        random_search(split_dir, out, readout, SEARCH)
        assert len(trained) == 2  # scored again from the kept features
        again = json.loads((out / "trial-01" / "metrics.json").read_text())
        assert again[TRIAL_KEY] != first[TRIAL_KEY] and again["seconds"] == first["seconds"]
    faster = {**settings, "train": {**settings["train"], "lr": 0.5}}
    random_search(split_dir, out, faster, SEARCH)
    assert len(trained) == 4
    # a trial without features (scored by an earlier version) is trained again
    (out / "trial-01" / TRIAL_FEATURES).unlink()
    random_search(split_dir, out, {**faster, "readout": {"alphas": [0.5]}}, SEARCH)
    assert len(trained) == 5


def test_a_rerun_removes_what_a_killed_search_left(stubbed_search):
    """A search killed between a trial's score and the deletion of its encoder left the
    encoder (134 MB at the paper's width), and one killed while writing left atomic_path
    temporaries; the reused trials and the rerun kept both for good."""
    trained, split_dir, settings, out = stubbed_search
    random_search(split_dir, out, settings, SEARCH)
    leftovers = [out / "trial-01" / "encoder.pt", out / "trial-02" / ".metrics.json.k3j_x9ab.json",
                 out / ".trials.tsv.a1b2c3d4.tsv", out / ".best.json.zz99_0aa.json"]
    for path in leftovers:
        path.write_bytes(b"half written")
    unrelated = out / "trial-01" / "notes.txt"
    unrelated.write_text("the user's")
    random_search(split_dir, out, settings, SEARCH)
    assert len(trained) == 2  # both trials reused
    assert not [path for path in leftovers if path.exists()]
    assert unrelated.exists()


def test_a_trial_recorded_without_a_key_is_trained_again(stubbed_search):
    """Records written before trial keys (2026-12-04) were reused whenever their nn_final
    and nn_step were planned, and stayed keyless, so later changes of train.lr,
    search.validation_fraction or the read-out kept their scores; they were also scored on
    another validation draw than best.json's validation_subjects."""
    trained, split_dir, settings, out = stubbed_search
    search = {**SEARCH, "nn_final_range": [3, 3], "trials": 1}
    folder = out / "trial-01"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"trial": 1, "nn_final": 3, "nn_step": 1, "validation_mae": 99.0,
         "validation_rmse": 99.0, "seconds": 1.0}))
    best = random_search(split_dir, out, settings, search)
    assert trained == [(3, 1)] and best["validation_mae"] == pytest.approx(3.1)


def test_a_pair_drawn_twice_is_scored_from_the_first_trials_features(stubbed_search):
    """Draws are with replacement and trials differ only in their name, which training
    never reads: a repeated pair trained the same encoder again (50 epochs at the paper's
    settings; 4 of 30 trials with search.seed 4)."""
    trained, split_dir, settings, out = stubbed_search
    search = {**SEARCH, "nn_final_range": [4, 4], "trials": 3}
    random_search(split_dir, out, settings, search)
    assert trained == [(4, 1)]
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    assert trials["validation_mae"].tolist() == pytest.approx([4.1, 4.1, 4.1])
    # a rerun after another read-out rescores all three, still without training
    random_search(split_dir, out, {**settings, "readout": {"alphas": [0.5]}}, search)
    assert trained == [(4, 1)]
    # the first trial's features gone: the repeated pair is trained once again, not thrice
    (out / "trial-01" / "features.npz").unlink()
    random_search(split_dir, out, {**settings, "readout": {"alphas": [0.25]}}, search)
    assert trained == [(4, 1), (4, 1)]


def test_a_diverging_trial_is_recorded_without_a_score_and_the_search_goes_on(
        stubbed_search, monkeypatch):
    """One pair whose loss became NaN stopped the whole search with no trials.tsv, and
    the rerun failed the same way (same seed): the search could never finish."""
    import brainage.search as search_module

    trained, split_dir, settings, out = stubbed_search
    stub = search_module.fit_encoder

    def fit_encoder(split, settings, **kwargs):
        stub(split, settings, **kwargs)
        if settings["loss"]["nn_final"] == 2:
            raise FloatingPointError("loss is nan in epoch 1")

    monkeypatch.setattr(search_module, "fit_encoder", fit_encoder)
    search = {**SEARCH, "trials": 8, "nn_final_range": [2, 3]}
    pairs = [(t["nn_final"], t["nn_step"]) for t in sample_trials(search, batch_size=6,
                                                                  epochs=2)]
    assert (2, 1) in pairs and len(set(pairs)) > 1
    best = random_search(split_dir, out, settings, search)
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    failed = trials["nn_final"] == 2
    assert trials.loc[failed, "validation_mae"].isna().all()
    assert trials.loc[~failed, "validation_mae"].notna().all()
    assert best["nn_final"] == min(nn for nn, _ in pairs if nn != 2)
    record = json.loads((out / f"trial-{int(trials[failed]['trial'].iloc[0]):02d}"
                         / "metrics.json").read_text())
    assert "nan" in record["failed"]
    assert pairs.count((2, 1)) > 1 and trained.count((2, 1)) == 1  # drawn again: not retried
    count = len(trained)
    assert random_search(split_dir, out, settings, search) == best  # recorded, not retried
    assert len(trained) == count
    # another read-out rescores the others from their features and keeps the divergence
    rescored = random_search(split_dir, out, {**settings, "readout": {"alphas": [0.5]}}, search)
    assert len(trained) == count and rescored["nn_final"] == best["nn_final"]
    with pytest.raises(FloatingPointError, match="every trial"):
        random_search(split_dir, out / "only", settings, {**search, "nn_final_range": [2, 2]})


def test_a_trial_reads_out_every_channel_when_model_modalities_is_unset(tmp_path, monkeypatch):
    """model.modalities null (the default) means all of dataset.modalities: a trial's
    encoder is trained on both channels of a two-map split, and reading it back had built
    a one-channel network, so the search stopped after its first trial's training."""
    import torch

    import brainage.search as search_module
    from brainage.models import build_model

    def fit_encoder(split, settings, *, encoder_path, checkpoint_path, history_path,
                    keep_checkpoint=False):
        channels = split.channel_indices(settings["model"]["modalities"])  # as train does
        network = build_model(settings["model"], in_channels=len(channels))
        encoder_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": network.state_dict()}, encoder_path)

    monkeypatch.setattr(search_module, "fit_encoder", fit_encoder)
    split_dir = write_split(tmp_path / "dataset", n_subjects=20, n_test=4, shape=(4, 4, 4),
                            modalities=("stiffness", "damping_ratio"))
    settings = tiny_settings(train={"epochs": 2, "batch_size": 6, "embed_epochs": []})
    assert settings["model"].get("modalities") is None
    best = random_search(split_dir, tmp_path / "search", settings, {**SEARCH, "trials": 1})
    assert np.isfinite(best["validation_mae"])


def _diverging_when(monkeypatch, diverges) -> None:
    """The stubbed trial training (_stub_trial_training) raises after "training" the
    settings ``diverges`` picks, leaving a checkpoint as fit_encoder does when it stops."""
    import brainage.search as search_module

    stub = search_module.fit_encoder

    def fit_encoder(split, settings, *, checkpoint_path, **kwargs):
        stub(split, settings, checkpoint_path=checkpoint_path, **kwargs)
        if diverges(settings):
            checkpoint_path.write_bytes(b"the last epoch's state")
            raise FloatingPointError("loss is nan in epoch 2")

    monkeypatch.setattr(search_module, "fit_encoder", fit_encoder)


def test_a_diverged_trial_trains_again_with_other_training_settings(stubbed_search,
                                                                    monkeypatch):
    """The divergence message says to lower train.lr: the rerun at the lower rate must
    train the trial, not keep its record of another training."""
    trained, split_dir, settings, out = stubbed_search
    lr = settings["train"]["lr"]
    _diverging_when(monkeypatch, lambda trial: trial["train"]["lr"] == lr)
    search = {**SEARCH, "trials": 1, "nn_final_range": [2, 2]}
    with pytest.raises(FloatingPointError, match="every trial"):
        random_search(split_dir, out, settings, search)
    assert not (out / "trial-01" / "checkpoint.pt").exists()  # 134 MB at the paper's width
    lower = {**settings, "train": {**settings["train"], "lr": lr / 10}}
    assert random_search(split_dir, out, lower, search)["nn_final"] == 2
    assert len(trained) == 2


def test_a_resumed_search_reuses_the_finished_trials_of_a_repeated_pair(stubbed_search,
                                                                        monkeypatch):
    """A search killed between two trials of one pair: the rerun scores the later trial
    from the finished one's features, and a pair known to diverge is not tried again (a
    stale checkpoint in the later trial's folder goes too)."""
    trained, split_dir, settings, out = stubbed_search
    search = {**SEARCH, "nn_final_range": [2, 2]}  # trials 1 and 2 draw (2, 1)
    random_search(split_dir, out, settings, search)
    (out / "trial-02" / "metrics.json").unlink()  # killed before trial 2 was recorded
    random_search(split_dir, out, settings, search)
    assert trained == [(2, 1)]
    _diverging_when(monkeypatch, lambda trial: trial["loss"]["nn_final"] == 2)
    search = {**SEARCH, "trials": 8, "nn_final_range": [2, 3]}
    pairs = [(t["nn_final"], t["nn_step"]) for t in sample_trials(search, batch_size=6,
                                                                  epochs=2)]
    later = [number for number, pair in enumerate(pairs, 1) if pair == (2, 1)][1]
    random_search(split_dir, out / "diverging", settings, search)
    count = len(trained)
    folder = out / "diverging" / f"trial-{later:02d}"
    (folder / "metrics.json").unlink()
    (folder / "checkpoint.pt").write_bytes(b"stale")
    random_search(split_dir, out / "diverging", settings, search)
    assert len(trained) == count
    assert not list((out / "diverging").glob("trial-*/checkpoint.pt"))


def test_trials_draw_both_ends_of_each_range_and_follow_the_seed():
    search = {**SEARCH, "trials": 20, "nn_final_range": [2, 3], "nn_step_range": [1, 2]}
    trials = sample_trials(search, batch_size=16, epochs=10)
    assert {t["nn_final"] for t in trials} == {2, 3}  # inclusive ranges
    assert {t["nn_step"] for t in trials} == {1, 2}
    other = sample_trials({**search, "seed": 1}, batch_size=16, epochs=10)
    assert other != trials  # search.seed draws the trials, not only the validation set


def test_best_is_the_lowest_validation_mae_ties_to_the_earlier_trial(
        stubbed_search, monkeypatch):
    import brainage.search as search_module

    trained, split_dir, settings, out = stubbed_search
    scores = {"trial-01": 3.0, "trial-02": 1.5, "trial-03": 2.0, "trial-04": 1.5}

    def evaluate_split(split, features, settings):  # RMSE apart from MAE on purpose
        mae = scores[settings["variant"]]
        return {"mae": mae, "rmse": 10 - mae}, None, None

    monkeypatch.setattr(search_module, "evaluate_split", evaluate_split)
    search = {**SEARCH, "trials": 4}
    best = random_search(split_dir, out, settings, search)
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    assert trials["validation_mae"].tolist() == [3.0, 1.5, 2.0, 1.5]
    assert trials["validation_rmse"].tolist() == [7.0, 8.5, 8.0, 8.5]
    planned = sample_trials(search, batch_size=6, epochs=2)[1]
    assert {key: best[key] for key in ("trial", "nn_final", "nn_step", "validation_mae")} == {
        "trial": 2, "nn_final": planned["nn_final"], "nn_step": planned["nn_step"],
        "validation_mae": 1.5}
    # best.json names what apply_search_result checks and the subjects the trials scored on
    split = load_split(split_dir, require_eval=False).with_validation(
        SEARCH["validation_fraction"], SEARCH["seed"])
    assert (best["split"], best["n_trials"]) == ("holdout", 4)
    assert best["validation_subjects"] == split.participant_ids[split.eval_index].tolist()


def test_a_corrected_validation_age_retrains_the_trials(stubbed_search):
    """A trial's score depends on the validation subjects' ages, which the training
    fingerprint leaves out (validation subjects do not train): a corrected age must not
    reuse the old scores."""
    trained, split_dir, settings, out = stubbed_search
    best = random_search(split_dir, out, settings, SEARCH)
    assert len(trained) == 2
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    table.loc[table.participant_id == best["validation_subjects"][0], "age"] += 1.0
    table.to_csv(split_dir / "participants.tsv", sep="\t", index=False)
    random_search(split_dir, out, settings, SEARCH)
    assert len(trained) == 4


def _best(path, **values):
    best = {"nn_final": 5, "nn_step": 2, "validation_mae": 4.2, "trial": 7, "n_trials": 30,
            "split": "holdout", "validation_subjects": ["sub-01"], **values}
    path.write_text(json.dumps(best))
    return path


def test_apply_search_result_replaces_nn_final_and_nn_step(tmp_path, caplog):
    best = _best(tmp_path / "best.json")
    cell = tiny_settings(loss={"nn_from_search": True}, train={"epochs": 4})
    settings = training_settings(cell)
    with caplog.at_level("INFO", logger="brainage.search"):
        used = apply_search_result(settings, best, split="holdout")
    configured = resolve_cell(settings)
    # only the two values change; the flag stays, saved with the encoder: where they came from
    assert used == {**configured, "loss": {**configured["loss"], "nn_final": 5, "nn_step": 2}}
    assert used["loss"]["nn_from_search"] is True
    assert settings["loss"]["nn_final"] == 4  # the caller's settings are not changed
    assert "nn_final 5 (configured 4), nn_step 2 (configured 1)" in caplog.text
    # a cell without the flag keeps its values, and needs no best.json
    plain = training_settings(tiny_settings())
    assert apply_search_result(plain, None) == plain


def test_the_encoder_saves_the_schedule_it_trained_with(tmp_path):
    """The train_encoder script's path: the search's values reach the loss (history's nn_nb)
    and encoder.pt's settings."""
    import torch

    from brainage.train import train_encoder

    split_dir = write_split(tmp_path / "dataset", n_subjects=12, n_test=4)
    best = _best(tmp_path / "best.json", nn_final=3, nn_step=1)
    cell = tiny_settings(loss={"nn_from_search": True, "nn_final": 6, "nn_step": 2},
                         train={"epochs": 2, "batch_size": 8, "embed_epochs": []})
    settings = apply_search_result(training_settings(cell), best, split="holdout")
    out = tmp_path / "cell"
    train_encoder(split_dir, settings, encoder_path=out / "encoder.pt",
                  history_path=out / "history.tsv", embeddings_dir=out / "embeddings",
                  checkpoint_path=out / "checkpoint.pt", features_path=out / "features.npz")
    saved = torch.load(out / "encoder.pt", weights_only=True)["settings"]["loss"]
    assert (saved["nn_final"], saved["nn_step"], saved["nn_from_search"]) == (3, 1, True)
    # Algorithm 1 with B 8, nn_final 3, nn_step 1, 2 epochs: 8 - 5 * epoch, held at 3
    assert pd.read_csv(out / "history.tsv", sep="\t")["nn_nb"].tolist() == [3, 3]


@pytest.mark.parametrize("change, message", [
    (lambda path: path.unlink(), "does not exist"),
    (lambda path: _best(path, split="fold1"), "search of split fold1, not of split holdout"),
    (lambda path: _best(path, nn_final=9), r"nn_final 9 .*1 <= nn_final <= 8"),
    (lambda path: _best(path, nn_step=3), r"nn_step 3.*1 <= nn_step <= 2"),
    (lambda path: _best(path, nn_final=0), r"nn_final 0 .*1 <= nn_final <= 8"),
    (lambda path: _best(path, nn_step=0), r"nn_step 0.*1 <= nn_step <= 2"),
    (lambda path: path.write_text(json.dumps({"nn_final": 5, "split": "holdout"})),
     "lacks nn_step"),
    (lambda path: path.write_text("[5, 2]"), "lacks nn_final, nn_step, split"),
    (lambda path: path.write_text('{"nn_final": 5,'), "is not valid JSON"),
])
def test_apply_search_result_refuses_what_the_cell_cannot_use(tmp_path, change, message):
    best = _best(tmp_path / "best.json")
    change(best)
    settings = tiny_settings(loss={"nn_from_search": True}, train={"epochs": 4})
    with pytest.raises(ConfigError, match=message):
        apply_search_result(settings, best, split="holdout")
    with pytest.raises(ConfigError, match="no best.json"):
        apply_search_result(settings, None)


def test_search_trials_never_take_their_schedule_from_the_search():
    config = {"search": SEARCH, "loss": {"name": "yaware", "nn_from_search": True},
              "train": {}, "model": {}, "readout": {}}
    assert search_settings(config)["loss"] == {"name": "adaptive", "nn_from_search": False}


def test_only_adaptive_neighborhoods_takes_its_schedule_from_the_search(tmp_path):
    settings = tiny_settings(loss={"name": "yaware", "nn_from_search": True})
    with pytest.raises(ConfigError, match="only Adaptive Neighborhoods"):
        apply_search_result(settings, _best(tmp_path / "best.json"), split="holdout")
