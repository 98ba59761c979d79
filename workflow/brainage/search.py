"""Random search over Adaptive Neighborhoods' ``nn_final`` and ``nn_step`` (paper: 30 trials).

Each trial trains the Adaptive Neighborhoods encoder on the split's training subjects minus
a validation set carved from them (stratified by study, ``search.validation_fraction``,
``search.seed``), fits the configured read-out on the remaining training subjects and scores
the validation MAE (years). The split's test subjects are dropped before anything else, so
no trial ever sees them.

Outputs under ``results/search/<split>/``: ``trials.tsv`` (trial, nn_final, nn_step,
validation_mae, validation_rmse, seconds), ``best.json`` (the lowest validation MAE, ties to
the earlier trial) and one folder per trial with its metrics. A rerun skips finished
trials whose record matches what the trial would train and score now (:func:`trial_key`:
its settings, nn_final and nn_step included, the split and the validation ages), and an
interrupted trial resumes from its checkpoint; a trial finished with other settings (e.g.
another ``search.seed`` or range, ``train.epochs``) is trained again, and one scored with
another read-out (``readout.*``, ``model.features``) is scored again on the features its
encoder left (:data:`TRIAL_FEATURES`), without training. A trial recorded without a key
(before 2026-12-04, when the validation draw was another) is trained again. A pair of
nn_final and nn_step drawn twice is trained once: the later trial scores the earlier one's
features. A trial whose loss diverges is recorded with no score (NaN, ``failed`` in its
metrics.json, a warning) and the search goes on; it is not trained again for another
read-out, nor for the same pair drawn again. Only a search in which every trial fails
stops.

A grid cell with ``loss.nn_from_search: true`` trains with the split's best.json
(:func:`apply_search_result`, called by rule train_encoder's script), so the trials also
choose the schedule of the cells that ask for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from brainage.config import (
    ConfigError,
    resolve_cell,
    search_bounds,
    training_settings,
    uses_search_result,
)
from brainage.data import VolumeStore
from brainage.evaluate import evaluate_split
from brainage.io import read_npz, remove_stale_temporaries, write_json, write_npz, write_tsv
from brainage.models import embed_all, load_encoder
from brainage.runtime import runtime_setup
from brainage.split_data import SplitData, load_split
from brainage.train import fingerprint, fit_encoder, remove_checkpoint

log = logging.getLogger(__name__)

#: Fewer validation subjects than this make the search's choice mostly noise: on the
#: demo's split (6) one setting scored 2.7-7.8 years over 4 seeds (docs/method.md §6).
FEW_VALIDATION_SUBJECTS = 20

TRIAL_COLUMNS = ("trial", "nn_final", "nn_step", "validation_mae", "validation_rmse", "seconds")
#: Key of a trial's metrics.json holding :func:`trial_key`.
TRIAL_KEY = "trial_key"
#: Key of a diverged trial's metrics.json holding the :func:`trial_key` of its training
#: settings alone: the divergence stands whatever read-out would score it.
TRAINING_KEY = "training_key"


def trial_key(settings: Mapping, split: SplitData) -> str:
    """sha256 of what a trial's score depends on: its training fingerprint
    (:func:`brainage.train.fingerprint`: settings with nn_final and nn_step, the carved
    split, the starting checkpoint) and the validation subjects' ages it is scored on."""
    payload = json.dumps({"training": fingerprint(settings, split),
                          "validation_ages": split.ages[split.eval_index].tolist()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


#: A trial's features file: both kinds of its encoder's features of the training and
#: validation subjects, keyed by what trained the encoder, so that another read-out
#: (``readout.*``, ``model.features``) scores the trial again without training it.
TRIAL_FEATURES = "features.npz"


def _stored_metrics(path: Path) -> dict | None:
    """A trial's metrics.json, or None when it is absent or damaged (a warning names it):
    the trial is scored again and the file replaced, where a bare JSONDecodeError stopped the
    search on every rerun (the trial folders are no rule's outputs: nothing removes them)."""
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        metrics = error
    if isinstance(metrics, dict):
        return metrics
    log.warning("ignoring the trial's metrics %s, which cannot be read (%s); scoring the "
                "trial again (from its stored features where they are valid)", path,
                metrics if isinstance(metrics, Exception)
                else f"a JSON {type(metrics).__name__}, not an object")
    return None


def _stored_features(path: Path, key: str, split: SplitData) -> dict | None:
    """The features a trial's encoder left in ``path``, if it was trained as the trial
    would train now (``key``: :func:`trial_key` of its training settings) on this split's
    training then validation subjects; else None. A damaged file counts as none (a
    warning names it): the trial trains again and replaces it, instead of the search
    stopping there on every rerun."""
    if not path.exists():
        return None
    try:
        saved = read_npz(path)
        stored_key, subjects = str(saved["training_key"]), saved["participant_id"]
        features = {"encoder": saved["encoder"], "projection": saved["projection"]}
    except (ValueError, KeyError) as error:
        log.warning("ignoring the trial's features %s, which cannot be read (%s); training "
                    "the trial again", path, error)
        return None
    rows = np.concatenate([split.train_index, split.eval_index])
    if stored_key != key or subjects.tolist() != split.participant_ids[rows].tolist():
        return None
    return features


def _store_features(path: Path, features: Mapping[str, np.ndarray], key: str,
                    split: SplitData) -> None:
    rows = np.concatenate([split.train_index, split.eval_index])
    write_npz(path, **features, training_key=np.array(key),
              participant_id=split.participant_ids[rows].astype(str))


def _record_divergence(trial: Mapping, failure: str, seconds: float, metrics_path: Path, *,
                       keys: Mapping[str, str]) -> dict:
    """Write a trial whose training diverged: no score (NaN), the error, its keys; its
    checkpoint (about 400 MB at the paper's width: the encoder and Adam's two moments)
    goes. Returns the record."""
    metrics = {**trial, "validation_mae": float("nan"), "validation_rmse": float("nan"),
               "seconds": seconds, "failed": failure, **keys}
    write_json(metrics_path, metrics)
    remove_checkpoint(metrics_path.parent / "checkpoint.pt")
    return metrics


def sample_trials(search: Mapping, *, batch_size: int, epochs: int) -> list[dict]:
    """``search.trials`` draws of (nn_final, nn_step), uniform over the inclusive ranges.

    The ranges are cut to what Algorithm 1 allows (:func:`brainage.config.search_bounds`):
    nn_final <= train.batch_size and nn_step <= train.epochs // 2.

    Raises
    ------
    ConfigError
        When a range is empty after that cut, naming the config key.
    """
    rng = np.random.default_rng(int(search["seed"]))
    bounds = search_bounds(search, batch_size=batch_size, epochs=epochs)
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
        Cell settings of the trials (:func:`brainage.config.search_settings`); the loss is forced to
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
    if len(split.eval_index) < FEW_VALIDATION_SUBJECTS:
        log.warning("search on %s: %d validation subjects and one training per trial: the "
                    "trials' validation MAE varies with the seed and the few subjects as much "
                    "as with nn_final and nn_step, so the choice is mostly noise at this "
                    "scale. Consider setting loss.nn_final and loss.nn_step (the paper's 14 "
                    "and 1) instead of loss.nn_from_search.", split_dir,
                    len(split.eval_index))
    plan = sample_trials(search, batch_size=int(base["train"]["batch_size"]),
                         epochs=int(base["train"]["epochs"]))
    for output in (trials_path, best_path):  # a killed job's temporaries (atomic_path)
        remove_stale_temporaries(output)
    rows = []
    trained: dict[str, tuple[int, Path]] = {}  # training key -> (trial, its features file)
    diverged: dict[str, str] = {}  # training key -> the error of its training
    for trial in plan:
        trial_dir = out_dir / f"trial-{trial['trial']:02d}"
        metrics_path = trial_dir / "metrics.json"
        remove_stale_temporaries(metrics_path)
        settings_trial = {**base, "variant": f"trial-{trial['trial']:02d}",
                          "loss": {**base["loss"], "nn_final": trial["nn_final"],
                                   "nn_step": trial["nn_step"]}}
        # a trial writes no embeddings (fit_encoder below gets no folder): the UMAP
        # figure's train.embed_epochs must not retrain it. Trials keyed with it (before
        # 2026-12-04) still count, or every stored trial would train again once.
        keyed_before = settings_trial
        settings_trial = {**settings_trial, "train": {**base["train"], "embed_epochs": []}}
        key = trial_key(settings_trial, split)
        training_key = trial_key(training_settings(settings_trial), split)
        features_path = trial_dir / TRIAL_FEATURES
        remove_stale_temporaries(features_path)
        metrics = _stored_metrics(metrics_path)
        # the old key only when the new one does not match (a key hashes the trials'
        # starting checkpoint, 134 MB at the paper's width)
        if metrics is not None and (metrics.get(TRIAL_KEY) == key
                                    or metrics.get(TRIAL_KEY) == trial_key(keyed_before, split)):
            log.info("trial %d already done", trial["trial"])
            if "failed" in metrics:
                diverged.setdefault(training_key, metrics["failed"])
            else:
                trained.setdefault(training_key, (trial["trial"], features_path))
            # a job killed between the score and the deletion left the trial's encoder
            # (134 MB at the paper's width) and its checkpoint, which nothing else removes
            (trial_dir / "encoder.pt").unlink(missing_ok=True)
            remove_checkpoint(trial_dir / "checkpoint.pt")
        elif training_key in diverged or (metrics is not None and "failed" in metrics
                                          and metrics.get(TRAINING_KEY) == training_key):
            # the same training diverges again whatever scores it: another read-out, or
            # the pair drawn again by a later trial
            failure = diverged.setdefault(training_key, (metrics or {}).get("failed", ""))
            log.warning("trial %d (nn_final %d, nn_step %d) has no score: its training "
                        "diverges (%s)", trial["trial"], trial["nn_final"], trial["nn_step"],
                        failure)
            metrics = _record_divergence(trial, failure, 0.0, metrics_path,
                                         keys={TRIAL_KEY: key, TRAINING_KEY: training_key})
        else:
            started = time.perf_counter()
            features = _stored_features(features_path, training_key, split)
            earlier = trained.get(training_key)  # the same pair drawn by an earlier trial
            if features is None and earlier is not None:
                features = _stored_features(earlier[1], training_key, split)
                if features is not None:
                    log.info("trial %d draws the nn_final and nn_step of trial %d: scoring "
                             "its features, not training the same encoder again",
                             trial["trial"], earlier[0])
                seconds = None  # scoring only
            elif features is not None:
                log.info("trial %d: its encoder's features are kept; scoring them with this "
                         "read-out (readout section, model.features), not training again",
                         trial["trial"])
                # the training's time, where its record has it
                seconds = (metrics or {}).get("seconds")
            if features is None:
                if metrics is not None:
                    log.warning("trial %d: %s was scored with other settings (nn_final %s, "
                                "nn_step %s, or another search.seed, split or train "
                                "section); training it again with nn_final %d, nn_step %d",
                                trial["trial"], metrics_path, metrics.get("nn_final"),
                                metrics.get("nn_step"), trial["nn_final"], trial["nn_step"])
                encoder_path = trial_dir / "encoder.pt"
                # the checkpoint stays until the features are stored: a kill between
                # the encoder and them resumes at the last epoch, not at the first.
                # Training settings only, as a grid cell's (the experiment names the
                # config key in an error): a read-out edit while the trial was interrupted
                # must not restart it from epoch 1.
                try:
                    fit_encoder(split, {**resolve_cell(training_settings(settings_trial)),
                                        "experiment": base["experiment"]},
                                encoder_path=encoder_path,
                                checkpoint_path=trial_dir / "checkpoint.pt",
                                history_path=trial_dir / "history.tsv", keep_checkpoint=True)
                except FloatingPointError as error:  # this pair diverges; the others may not
                    log.warning("trial %d (nn_final %d, nn_step %d) failed and has no score: "
                                "%s", trial["trial"], trial["nn_final"], trial["nn_step"],
                                error)
                    diverged[training_key] = str(error)
                    metrics = _record_divergence(
                        trial, str(error), time.perf_counter() - started, metrics_path,
                        keys={TRIAL_KEY: key, TRAINING_KEY: training_key})
                    rows.append({column: metrics[column] for column in TRIAL_COLUMNS})
                    continue
                device, _ = runtime_setup(base["train"])  # features are float32 (embed_all)
                # model.modalities null means all of the split's channels, as fit_encoder
                # trained with (build_model alone would build a one-channel network)
                channels = split.channel_indices(base["model"]["modalities"])
                model = load_encoder(encoder_path, {
                    **base["model"],
                    "modalities": [split.modalities[index] for index in channels]}).to(device)
                subjects = np.concatenate([split.train_index, split.eval_index])
                store = VolumeStore(split.images, device, channels=channels)
                features = embed_all(model, store, subjects)
                _store_features(features_path, features, training_key, split)
                seconds = None
            trained.setdefault(training_key, (trial["trial"], features_path))
            scores, *_ = evaluate_split(split, features[base["model"]["features"]],
                                        resolve_cell(settings_trial))
            metrics = {**trial, "validation_mae": scores["mae"],
                       "validation_rmse": scores["rmse"],
                       "seconds": seconds or time.perf_counter() - started, TRIAL_KEY: key}
            write_json(metrics_path, metrics)
            # 134 MB per trial at the paper's width; its score and features suffice
            (trial_dir / "encoder.pt").unlink(missing_ok=True)
            remove_checkpoint(trial_dir / "checkpoint.pt")
            log.info("trial %d/%d: nn_final %d nn_step %d -> validation MAE %.3f years",
                     trial["trial"], len(plan), trial["nn_final"], trial["nn_step"],
                     metrics["validation_mae"])
        rows.append({column: metrics[column] for column in TRIAL_COLUMNS})
    table = pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))
    if table["validation_mae"].isna().all():
        raise FloatingPointError(
            f"every trial of the random search on {split_dir} diverged (see the warnings "
            f"above and {out_dir}/trial-*/metrics.json): lower config key train.lr, or "
            f"narrow search.nn_final_range / search.nn_step_range.")
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


#: Keys of best.json that :func:`apply_search_result` reads.
BEST_KEYS = ("nn_final", "nn_step", "split")


def apply_search_result(settings: Mapping, best_path: str | Path | None, *,
                        split: str | None = None) -> dict:
    """The settings a cell trains with: for a cell with ``loss.nn_from_search`` (and an
    encoder to train, :func:`brainage.config.uses_search_result`), ``loss.nn_final`` and
    ``loss.nn_step`` replaced by the random search's choice in ``best_path``
    (``results/search/<split>/best.json``), both logged beside the configured values; any
    other cell's settings unchanged. The flag stays set, so the encoder's saved settings
    (encoder.pt) and the resume fingerprint hold the values actually used and where they
    came from.

    Parameters
    ----------
    settings
        The cell's (training) settings (:func:`brainage.config.training_settings`).
    best_path
        The split's best.json (:func:`random_search`); None for a cell without the flag.
    split
        The cell's split, when known: best.json must be that split's.

    Raises
    ------
    ConfigError
        The loss is not Adaptive Neighborhoods; best.json is not given, missing, not a JSON
        object with nn_final, nn_step and split, of another split; or its values do not fit
        the cell's train.batch_size and train.epochs // 2 (Algorithm 1).
    """
    settings = json.loads(json.dumps(dict(settings)))  # a plain copy, the caller's untouched
    if not uses_search_result(settings):
        return settings
    settings = resolve_cell(settings)  # every default filled in (fit_encoder does the same)
    loss, train = settings["loss"], settings["train"]
    if loss["name"] != "adaptive":
        raise ConfigError(f"loss.nn_from_search is true but loss.name is {loss['name']}: only "
                          f"Adaptive Neighborhoods takes nn_final and nn_step from the random "
                          f"search. Set loss.nn_from_search: false.")
    if not best_path:
        raise ConfigError("loss.nn_from_search is true but no best.json of the random search "
                          "was given (results/search/<split>/best.json; config search.enabled "
                          "must be true).")
    best_path = Path(best_path)
    try:
        best = json.loads(best_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"loss.nn_from_search: {best_path} does not exist; run rule "
                          f"search_hyperparameters for the split first.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"loss.nn_from_search: {best_path} is not valid JSON ({error}); "
                          f"delete it and rerun rule search_hyperparameters.") from None
    missing = [key for key in BEST_KEYS if not isinstance(best, dict) or key not in best]
    if missing:
        raise ConfigError(f"loss.nn_from_search: {best_path} lacks {', '.join(missing)}; "
                          f"delete it and rerun rule search_hyperparameters.")
    if split is not None and str(best["split"]) != str(split):
        raise ConfigError(f"loss.nn_from_search: {best_path} is the search of split "
                          f"{best['split']}, not of split {split}, which this cell trains on.")
    chosen = {"nn_final": int(best["nn_final"]), "nn_step": int(best["nn_step"])}
    epochs, batch_size = int(train["epochs"]), int(train["batch_size"])
    if not (1 <= chosen["nn_final"] <= batch_size and 1 <= chosen["nn_step"] <= epochs // 2):
        raise ConfigError(
            f"loss.nn_from_search: {best_path} chose nn_final {chosen['nn_final']} and nn_step "
            f"{chosen['nn_step']}, but this cell (train.batch_size {batch_size}, train.epochs "
            f"{epochs}) needs 1 <= nn_final <= {batch_size} and 1 <= nn_step <= {epochs // 2}. "
            f"Narrow search.nn_final_range / search.nn_step_range, or change the cell's "
            f"train.batch_size / train.epochs.")
    log.info("loss.nn_from_search: training with the random search's choice on split %s "
             "(%s: trial %s of %s, validation MAE %s years): nn_final %d (configured %d), "
             "nn_step %d (configured %d)", best["split"], best_path, best.get("trial", "?"),
             best.get("n_trials", "?"), best.get("validation_mae", "?"), chosen["nn_final"],
             loss["nn_final"], chosen["nn_step"], loss["nn_step"])
    settings["loss"] = {**loss, **chosen}
    return settings
