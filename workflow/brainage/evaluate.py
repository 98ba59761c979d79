"""Evaluation of a trained encoder (METHOD.md section 4).

The encoder is frozen; the un-augmented training and test images are embedded; a read-out
maps embeddings to age (years):

- ``ridge`` (paper): scikit-learn Ridge, alpha chosen from ``readout.alphas`` by
  ``readout.cv_folds``-fold cross-validation (r2 scoring) on the training embeddings only;
- ``mse``, ``l1``, ``huber``, ``dex`` (Fig. 4b): a small MLP trained on the frozen training
  embeddings with that loss; DEX classifies into 1-year age bins and predicts the expected
  value of the softmax.

Outputs of a grid cell: ``metrics.json`` (test MAE, RMSE, Pearson r, R2, MAE per study, slope
of the brain-age gap against age, ...) and ``predictions.tsv`` (every subject of the split,
train and test rows, with its predicted age).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from brainage.config import ConfigError
from brainage.data import SplitData, VolumeStore, load_split
from brainage.io import write_json, write_tsv

log = logging.getLogger(__name__)

READOUT_METHODS = ("ridge", "mse", "l1", "huber", "dex")
#: Read-out options not (yet) in the config schema; a readout section with the key wins.
PREDICTOR_DEFAULTS = {
    "predictor_hidden_dim": 64,   # one hidden layer; features are only 128/512-d
    "predictor_epochs": 300,      # full-batch Adam steps
    "predictor_lr": 1.0e-3,
    "predictor_weight_decay": 1.0e-4,
    "huber_delta": 1.0,           # years (torch's default delta on age in years)
    "dex_bin_years": 1.0,         # DEX bin width (years)
}
#: Volumes embedded at once (inference only; memory is not an issue on CPU or GPU).
EMBED_BATCH = 32


def readout_option(readout_settings: Mapping, key: str):
    if key in readout_settings:
        return readout_settings[key]
    return PREDICTOR_DEFAULTS[key]


# -- embedding ------------------------------------------------------------------------------

@torch.no_grad()
def embed(model, store: VolumeStore, rows: np.ndarray, *, which: str = "projection",
          autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
          batch_size: int = EMBED_BATCH) -> np.ndarray:
    """Frozen-model features of the un-augmented volumes ``rows``, float32 [len(rows), D].

    The model is put in eval mode (batch-norm running statistics) and back in the mode it
    was in.
    """
    was_training = model.training
    model.eval()
    device = store.device
    chunks = []
    try:
        for start in range(0, len(rows), batch_size):
            volumes = store.gather(rows[start:start + batch_size])
            if channels_last:
                volumes = volumes.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                chunks.append(model.features(volumes, which).float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, model.projection_dim), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


# -- read-outs ------------------------------------------------------------------------------

@dataclass
class Readout:
    """A fitted read-out: ``predict(features [n, D]) -> ages [n]`` (years)."""

    method: str
    info: dict = field(default_factory=dict)
    ridge: object | None = None
    predictor: nn.Module | None = None
    feature_mean: np.ndarray | None = None
    feature_sd: np.ndarray | None = None
    age_mean: float = 0.0
    age_sd: float = 1.0
    bin_centres: np.ndarray | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self.ridge is not None:
            return np.asarray(self.ridge.predict(features), dtype=np.float64)
        scaled = torch.from_numpy(((features - self.feature_mean) / self.feature_sd)
                                  .astype(np.float32))
        with torch.no_grad():
            output = self.predictor(scaled)
        if self.method == "dex":
            probabilities = torch.softmax(output, dim=1).double().numpy()
            return probabilities @ self.bin_centres
        return output[:, 0].double().numpy() * self.age_sd + self.age_mean


#: Shuffles the Ridge read-out's CV folds (the reference's split seed).
READOUT_CV_SEED = 42


def fit_ridge(features: np.ndarray, ages: np.ndarray, *, alphas, cv_folds: int) -> Readout:
    """Ridge with alpha chosen by K-fold CV (r2) on the training embeddings, as the reference.

    ``cv_folds`` is capped at half the number of training subjects (at least 2), so that
    every validation fold has two subjects or more: the r2 of a single subject is undefined.

    The folds are shuffled with :data:`READOUT_CV_SEED`, the same for every cell. The
    training rows come in participants.tsv order, grouped by study, so unshuffled folds
    would each be roughly one study (young study 1 scored against the older ones) and
    bias the choice of alpha. The reference's rows come out of a shuffling
    ``train_test_split(random_state=42)``; a seed changes initialisation, batch order
    and augmentation only (METHOD.md §3), not the read-out's folds.
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, KFold

    folds = min(int(cv_folds), max(2, len(ages) // 2))
    if len(ages) < 2:
        raise ValueError(f"Ridge cross-validation needs at least 2 training subjects; got "
                         f"{len(ages)}.")
    search = GridSearchCV(Ridge(), param_grid={"alpha": [float(a) for a in alphas]},
                          cv=KFold(folds, shuffle=True, random_state=READOUT_CV_SEED),
                          scoring="r2", n_jobs=1)
    search.fit(features, ages)
    alpha = float(search.best_params_["alpha"])
    log.info("ridge: alpha %.3g chosen by %d-fold CV (r2 %.3f)", alpha, folds,
             search.best_score_)
    return Readout("ridge", info={"ridge_alpha": alpha, "cv_folds": folds}, ridge=search)


def fit_predictor(features: np.ndarray, ages: np.ndarray, *, method: str,
                  readout_settings: Mapping, seed: int) -> Readout:
    """A one-hidden-layer MLP on standardised frozen features, trained full-batch with Adam.

    mse / l1 / huber regress the standardised age (Huber's delta is given in years);
    dex classifies into bins of ``dex_bin_years`` spanning the training ages and predicts
    the softmax expected value of the bin centres, so predictions stay in that range.
    """
    feature_mean = features.mean(axis=0)
    feature_sd = features.std(axis=0) + 1e-6
    age_mean, age_sd = float(ages.mean()), float(ages.std() + 1e-6)
    inputs = torch.from_numpy(((features - feature_mean) / feature_sd).astype(np.float32))
    hidden = int(readout_option(readout_settings, "predictor_hidden_dim"))
    readout = Readout(method, feature_mean=feature_mean, feature_sd=feature_sd,
                      age_mean=age_mean, age_sd=age_sd)
    if method == "dex":
        width = float(readout_option(readout_settings, "dex_bin_years"))
        low = math.floor(ages.min() / width) * width
        n_bins = max(1, int(math.floor((ages.max() - low) / width)) + 1)
        readout.bin_centres = low + width * (np.arange(n_bins) + 0.5)
        targets = torch.from_numpy(np.clip(((ages - low) // width).astype(np.int64), 0,
                                           n_bins - 1))
        outputs, criterion = n_bins, nn.CrossEntropyLoss()
        readout.info["dex_bins"] = n_bins
    else:
        targets = torch.from_numpy(((ages - age_mean) / age_sd).astype(np.float32))[:, None]
        outputs = 1
        criterion = {"mse": nn.MSELoss(), "l1": nn.L1Loss(),
                     "huber": nn.HuberLoss(delta=float(readout_option(
                         readout_settings, "huber_delta")) / age_sd)}[method]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = nn.Sequential(nn.Linear(inputs.shape[1], hidden), nn.ReLU(),
                                  nn.Linear(hidden, outputs))
    optimiser = torch.optim.Adam(predictor.parameters(),
                                 lr=float(readout_option(readout_settings, "predictor_lr")),
                                 weight_decay=float(readout_option(readout_settings,
                                                                   "predictor_weight_decay")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a [n, 128] MLP: threads only add synchronisation (10-30x)
    try:
        for _ in range(int(readout_option(readout_settings, "predictor_epochs"))):
            optimiser.zero_grad()
            loss = criterion(predictor(inputs), targets)
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    predictor.eval()
    readout.predictor = predictor
    readout.info["predictor_final_loss"] = float(loss.detach())
    return readout


def fit_readout(features: np.ndarray, ages: np.ndarray, readout_settings: Mapping, *,
                seed: int = 0) -> Readout:
    """Fit the configured read-out (``readout.method``) on training embeddings [n, D]."""
    method = readout_settings.get("method", "ridge")
    if method not in READOUT_METHODS:
        raise ConfigError(f"config key readout.method is {method!r}; expected one of "
                          f"{', '.join(READOUT_METHODS)}.")
    features = np.asarray(features, dtype=np.float64)
    ages = np.asarray(ages, dtype=np.float64)
    if method == "ridge":
        return fit_ridge(features, ages,
                         alphas=readout_settings.get("alphas", [0.01, 0.1, 1.0, 10.0, 100.0]),
                         cv_folds=readout_settings.get("cv_folds", 5))
    return fit_predictor(features, ages, method=method, readout_settings=readout_settings,
                         seed=seed)


# -- metrics --------------------------------------------------------------------------------

def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def compute_metrics(ages: np.ndarray, predicted: np.ndarray, studies: np.ndarray) -> dict:
    """Test metrics (years): MAE, RMSE, Pearson r, R2, MAE per study, gap-age slope.

    ``gap_age_slope`` is the least-squares slope of (predicted - age) against age: the
    regression-to-the-mean bias (0 = unbiased, -1 = predicting a constant). Values that are
    undefined (r for constant predictions, slope for one subject) are None.
    """
    ages = np.asarray(ages, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    error = predicted - ages
    if len(ages) > 1 and np.std(ages) > 0 and np.std(predicted) > 0:
        pearson = float(np.corrcoef(ages, predicted)[0, 1])
    else:
        pearson = math.nan
    total = np.sum((ages - ages.mean()) ** 2)
    r2 = 1 - np.sum(error ** 2) / total if total > 0 else math.nan
    slope = np.polyfit(ages, error, 1)[0] if len(ages) > 1 and np.std(ages) > 0 else math.nan
    per_study = {str(study): float(np.mean(np.abs(error[studies == study])))
                 for study in sorted(set(map(str, studies)))}
    return {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error ** 2))),
            "pearson_r": _finite_or_none(pearson), "r2": _finite_or_none(r2),
            "mae_per_study": per_study, "gap_age_slope": _finite_or_none(slope)}


# -- one grid cell --------------------------------------------------------------------------

def evaluate_split(split: SplitData, model, settings: Mapping, *, device: torch.device,
                   autocast_dtype: torch.dtype | None = None) -> tuple[dict, pd.DataFrame]:
    """Embed, fit the read-out on the training rows, predict every row; metrics on eval rows.

    Returns
    -------
    metrics
        As in metrics.json (without split/experiment identifiers).
    predictions
        participant_id, study, age, predicted_age, subset for all train and eval rows.
    """
    store = VolumeStore(split.images, device, normalisation=split.normalisation)
    which = settings["model"].get("features", "projection")
    rows = np.concatenate([split.train_index, split.eval_index])
    features = embed(model, store, rows, which=which, autocast_dtype=autocast_dtype)
    n_train = len(split.train_index)
    ages = split.ages
    readout = fit_readout(features[:n_train], ages[split.train_index], settings["readout"],
                          seed=int(settings.get("seed", 0)))
    predicted = readout.predict(features.astype(np.float64))
    eval_rows = split.eval_index
    metrics = compute_metrics(ages[eval_rows], predicted[n_train:], split.studies[eval_rows])
    metrics.update({"readout": readout.method, "n_train": n_train, "n_test": len(eval_rows)})
    metrics.update(readout.info)
    predictions = pd.DataFrame({
        "participant_id": split.participant_ids[rows], "study": split.studies[rows],
        "age": ages[rows], "predicted_age": predicted,
        "subset": split.subset_labels()[rows]})
    return metrics, predictions


def evaluate_encoder(split_dir: str | Path, encoder_path: str | Path, settings: Mapping, *,
                     metrics_path: str | Path, predictions_path: str | Path) -> dict:
    """Evaluate one grid cell's final encoder and write metrics.json and predictions.tsv.

    Parameters
    ----------
    split_dir
        ``results/dataset/<split>``.
    encoder_path
        ``encoder.pt`` written by :func:`brainage.train.train_encoder`.
    settings
        The cell's settings (:func:`brainage.config.cell_settings`).

    Returns
    -------
    dict
        The metrics written to ``metrics_path``.
    """
    from brainage.train import load_encoder, resolve_settings, runtime_setup

    settings = resolve_settings(settings)
    device, autocast_dtype = runtime_setup(settings["train"])
    split = load_split(split_dir)
    model = load_encoder(encoder_path, settings["model"]).to(device)
    metrics, predictions = evaluate_split(split, model, settings, device=device,
                                          autocast_dtype=autocast_dtype)
    metrics = {"split": split.name, "experiment": settings.get("experiment"),
               "variant": settings.get("variant"), "seed": settings.get("seed"),
               "loss": settings["loss"]["name"],
               # the cell that trained it, when cells share an encoder (encoder_owners)
               "encoder": str(encoder_path), **metrics}
    write_tsv(predictions_path, predictions)
    write_json(metrics_path, metrics)
    log.info("%s/%s seed %s on %s: test MAE %.3f years (n_train %d, n_test %d)",
             metrics["experiment"], metrics["variant"], metrics["seed"], split.name,
             metrics["mae"], metrics["n_train"], metrics["n_test"])
    return metrics
