"""Random search over nn_final / nn_step on a validation split (brainage.search)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainage.config import ConfigError
from brainage.data import load_split
from brainage.search import TRIAL_COLUMNS, random_search, sample_trials
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


def test_random_search_writes_trials_and_best(tmp_path):
    split_dir = write_split(tmp_path / "dataset", n_subjects=20, n_test=4)
    settings = tiny_settings(train={"epochs": 2, "batch_size": 6, "embed_epochs": []})
    out = tmp_path / "search"
    best = random_search(split_dir, out, settings, SEARCH)
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
