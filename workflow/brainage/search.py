"""Random search over Adaptive Neighborhoods' ``nn_final`` and ``nn_step`` (paper: 30 trials).

Each trial trains the Adaptive Neighborhoods encoder on the split's training subjects minus
a validation set carved from them (stratified by study, ``search.validation_fraction``,
``search.seed``), fits the configured read-out on the remaining training subjects and scores
the validation MAE (years). The split's test subjects are dropped before anything else, so
no trial ever sees them.

Outputs under ``results/search/<split>/``: ``trials.tsv`` (trial, nn_final, nn_step,
validation_mae, validation_rmse, seconds), ``best.json`` (the lowest validation MAE, ties to
the earlier trial) and one folder per trial with its metrics. A rerun skips finished
trials, and an interrupted trial resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from brainage.config import ConfigError, resolve_cell
from brainage.data import VolumeStore
from brainage.evaluate import evaluate_split
from brainage.io import write_json, write_tsv
from brainage.models import embed, load_encoder
from brainage.runtime import runtime_setup
from brainage.split_data import load_split
from brainage.train import fit_encoder

log = logging.getLogger(__name__)

TRIAL_COLUMNS = ("trial", "nn_final", "nn_step", "validation_mae", "validation_rmse", "seconds")


def search_settings(config: Mapping) -> dict:
    """Cell settings of the search trials: the base sections with the Adaptive loss."""
    return {"experiment": "search", "variant": "adaptive", "seed": int(config["search"]["seed"]),
            "loss": {**config["loss"], "name": "adaptive"}, "train": dict(config["train"]),
            "model": dict(config["model"]), "readout": dict(config["readout"])}


def sample_trials(search: Mapping, *, batch_size: int, epochs: int) -> list[dict]:
    """``search.trials`` draws of (nn_final, nn_step), uniform over the inclusive ranges.

    The ranges are cut to what Algorithm 1 allows: nn_final <= train.batch_size and
    nn_step <= train.epochs // 2.

    Raises
    ------
    ConfigError
        When a range is empty after that cut, naming the config key.
    """
    rng = np.random.default_rng(int(search["seed"]))
    bounds = {}
    for key, cap, why in (("nn_final", batch_size, "train.batch_size"),
                          ("nn_step", epochs // 2, "train.epochs // 2")):
        low, high = (int(value) for value in search[f"{key}_range"])
        high = min(high, cap)
        low = max(low, 1)
        if low > high:
            raise ConfigError(f"config key search.{key}_range {search[f'{key}_range']} leaves "
                              f"no value between 1 and {why} ({cap}). Widen the range or "
                              f"change {why.split(' ')[0]}.")
        bounds[key] = (low, high)
    return [{"trial": trial,
             "nn_final": int(rng.integers(bounds["nn_final"][0], bounds["nn_final"][1] + 1)),
             "nn_step": int(rng.integers(bounds["nn_step"][0], bounds["nn_step"][1] + 1))}
            for trial in range(1, int(search["trials"]) + 1)]


def random_search(split_dir: str | Path, out_dir: str | Path, settings: Mapping,
                  search: Mapping, *, trials_path: str | Path | None = None,
                  best_path: str | Path | None = None) -> dict:
    """Run the random search on one split and write trials.tsv and best.json.

    Parameters
    ----------
    split_dir
        ``results/dataset/<split>``; only its training subjects are used.
    out_dir
        Folder for the per-trial work (``trial-<NN>/``); by default also for the tables.
    settings
        Cell settings of the trials (:func:`search_settings`); the loss is forced to
        Adaptive Neighborhoods, nn_final and nn_step are set per trial.
    search
        The config's ``search`` section.

    Returns
    -------
    dict
        The content of best.json.
    """
    out_dir = Path(out_dir)
    trials_path = Path(trials_path) if trials_path else out_dir / "trials.tsv"
    best_path = Path(best_path) if best_path else out_dir / "best.json"
    base = resolve_cell({**settings, "loss": {**settings["loss"], "name": "adaptive"}})
    split = load_split(split_dir, require_eval=False).with_validation(
        float(search["validation_fraction"]), int(search["seed"]))
    log.info("search on %s: %d training, %d validation subjects (test subjects unused)",
             split_dir, len(split.train_index), len(split.eval_index))
    plan = sample_trials(search, batch_size=int(base["train"]["batch_size"]),
                         epochs=int(base["train"]["epochs"]))
    rows = []
    for trial in plan:
        trial_dir = out_dir / f"trial-{trial['trial']:02d}"
        metrics_path = trial_dir / "metrics.json"
        if metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            log.info("trial %d already done", trial["trial"])
        else:
            started = time.perf_counter()
            settings_trial = {**base, "variant": f"trial-{trial['trial']:02d}",
                              "loss": {**base["loss"], "nn_final": trial["nn_final"],
                                       "nn_step": trial["nn_step"]}}
            encoder_path = trial_dir / "encoder.pt"
            fit_encoder(split, settings_trial, encoder_path=encoder_path,
                        checkpoint_path=trial_dir / "checkpoint.pt",
                        history_path=trial_dir / "history.tsv")
            device, autocast_dtype = runtime_setup(base["train"])
            model = load_encoder(encoder_path, base["model"]).to(device)
            subjects = np.concatenate([split.train_index, split.eval_index])
            store = VolumeStore(split.images, device, normalisation=split.normalisation,
                                channels=split.channel_indices(base["model"]["modalities"]))
            features = embed(model, store, subjects,
                             which=base["model"]["features"], autocast_dtype=autocast_dtype)
            scores, *_ = evaluate_split(split, features, resolve_cell(settings_trial))
            metrics = {**trial, "validation_mae": scores["mae"],
                       "validation_rmse": scores["rmse"],
                       "seconds": time.perf_counter() - started}
            write_json(metrics_path, metrics)
            encoder_path.unlink()  # 134 MB per trial; only the score is needed
            log.info("trial %d/%d: nn_final %d nn_step %d -> validation MAE %.3f years",
                     trial["trial"], len(plan), trial["nn_final"], trial["nn_step"],
                     metrics["validation_mae"])
        rows.append({column: metrics[column] for column in TRIAL_COLUMNS})
    table = pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))
    best_row = table.loc[table["validation_mae"].idxmin()]
    best = {"nn_final": int(best_row["nn_final"]), "nn_step": int(best_row["nn_step"]),
            "validation_mae": float(best_row["validation_mae"]), "trial": int(best_row["trial"]),
            "n_trials": len(table), "split": Path(split_dir).name,
            "validation_subjects": split.participant_ids[split.eval_index].tolist()}
    write_tsv(trials_path, table)
    write_json(best_path, best)
    log.info("best of %d trials: nn_final %d, nn_step %d (validation MAE %.3f years)",
             len(table), best["nn_final"], best["nn_step"], best["validation_mae"])
    return best
