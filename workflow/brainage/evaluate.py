"""Evaluation of a trained encoder (docs/method.md, "Evaluation").

The encoder is frozen: training embedded the un-augmented training and test images with the
final encoder (``features.npz``); the read-out (:mod:`brainage.readout`) is fitted on the
training embeddings and maps every embedding to an age (years). No network is loaded, so
evaluation is a light CPU job.

Outputs of a grid cell, written by :func:`evaluate_encoder` next to each other:

- ``metrics.json``: test MAE, RMSE, Pearson r, R2, MAE per study, slope of the brain-age
  gap against age, the read-out's choices, and which encoder was evaluated;
- ``predictions.tsv``: every subject of the split (train and test rows) with its
  predicted age;
- ``readout.npz`` / ``readout.json``: the fitted read-out, its candidate age-bias
  corrections (:func:`brainage.agebias.bias_fits`) and a summary of the training
  subjects, which the model export copies into a bundle as they are.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import pandas as pd

from brainage.agebias import MIN_CORRELATION_SUBJECTS, bias_fits
from brainage.config import (
    FEATURELESS_READOUTS,
    cell_kind,
    resolve_cell,
    train_key,
    training_rule,
)
from brainage.io import read_npz, remove_stale_temporaries, write_json, write_tsv
from brainage.readout import (
    MIN_CV_SUBJECTS,
    READOUT_ARRAYS,
    READOUT_DESCRIPTION,
    Readout,
    fit_readout,
    grid_edges,
    save_readout,
)
from brainage.split_data import DataError, SplitData, check_finite, load_split

log = logging.getLogger(__name__)


# -- metrics --------------------------------------------------------------------------------

def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def compute_metrics(ages: np.ndarray, predicted: np.ndarray, studies: np.ndarray) -> dict:
    """Test metrics (years): MAE, RMSE, Pearson r, R2, MAE per study (with the number of
    test subjects per study, ``n_per_study``, which pooling over splits weights by),
    gap-age slope.

    ``gap_age_slope`` is the least-squares slope of (predicted - age) against age: the
    regression-to-the-mean bias (0 = unbiased, -1 = predicting a constant). Values that are
    undefined (r for constant predictions) or arithmetic (r and slope of fewer than
    :data:`brainage.agebias.MIN_CORRELATION_SUBJECTS` test subjects: two points give
    r = ±1 and an exact line, which Table 3 printed as 1.000 for a pilot's 2 test
    subjects) are None.
    ``gap_age_sums`` (n and the sums of age, gap, age², age × gap) let the report compute
    that slope over the test subjects of several splits (k-fold, leave-one-study-out).
    """
    ages = np.asarray(ages, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    error = predicted - ages
    # constancy tested exactly: the np.std of three equal float64 values can be 7e-15 (its
    # mean rounded), and the training-mean baseline got an r of -5.7e-16
    varied_ages = len(ages) >= MIN_CORRELATION_SUBJECTS and np.ptp(ages) > 0
    if varied_ages and np.ptp(predicted) > 0:
        pearson = float(np.corrcoef(ages, predicted)[0, 1])
    else:
        pearson = math.nan
    total = np.sum((ages - ages.mean()) ** 2)
    r2 = 1 - np.sum(error ** 2) / total if total > 0 else math.nan
    slope = np.polyfit(ages, error, 1)[0] if varied_ages else math.nan
    studies = np.asarray(studies).astype(str)
    names = sorted(set(studies))
    per_study = {study: float(np.mean(np.abs(error[studies == study]))) for study in names}
    return {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error ** 2))),
            "pearson_r": _finite_or_none(pearson), "r2": _finite_or_none(r2),
            "mae_per_study": per_study,
            "n_per_study": {study: int(np.sum(studies == study)) for study in names},
            "gap_age_slope": _finite_or_none(slope),
            "gap_age_sums": {"n": int(len(ages)), "age": float(ages.sum()),
                             "gap": float(error.sum()), "age_age": float(ages @ ages),
                             "age_gap": float(ages @ error)}}


# -- one grid cell --------------------------------------------------------------------------

class CellFeatures(NamedTuple):
    """What a cell's read-out is fitted on (:func:`cell_features`)."""

    #: float32 [n, D]: the training rows, then the evaluation rows.
    features: np.ndarray
    #: sha256 of the encoder they came from; None without an encoder.
    encoder_sha256: str | None
    #: The loss settings the encoder was trained with (after ``loss.nn_from_search`` the
    #: random search's nn_final/nn_step); None without an encoder or for an untrained one.
    trained_loss: dict | None


def cell_features(split: SplitData, features_path: str | Path | None, settings: Mapping
                  ) -> CellFeatures:
    """The read-out's input for the training rows then the evaluation rows, with the
    encoder's sha256 and training loss.

    From the cell's ``features.npz`` (written by training, :func:`brainage.train.
    write_features`; the kind ``model.features`` names), or, without an encoder
    (``model.encoder: none``, the classical baselines), the normalised voxels themselves (of
    the cell's channels, ``model.modalities``).

    Raises
    ------
    DataError
        ``features.npz`` lists other subjects than the split, or the same ones in other
        subsets (it belongs to another split or an older normalisation): rerun
        train_encoder.
    """
    rows = np.concatenate([split.train_index, split.eval_index])
    if settings["model"]["encoder"] == "none":
        if settings.get("readout", {}).get("method") in FEATURELESS_READOUTS:  # no feature: no
            # copy of every voxel (13 GB for 3,000 subjects of one map at 2 mm)
            return CellFeatures(np.zeros((len(rows), 0), dtype=np.float32), None, None)
        channels = split.channel_indices(settings["model"].get("modalities"))
        # only the cell's channels are read (a split of three maps holds 3x as many), and
        # checked here (load_split was told not to scan the whole array)
        voxels = np.asarray(split.images[np.ix_(rows, channels)], dtype=np.float32)
        check_finite(voxels, split.participant_ids[rows].tolist(),
                     f"split {split.name} (images.npy)")
        return CellFeatures(voxels.reshape(len(rows), -1), None, None)
    try:
        saved = read_npz(features_path)
        kind, digest = saved[settings["model"]["features"]], saved["encoder_sha256"]
        subjects, subsets = saved["participant_id"], saved["subset"]
    except (ValueError, KeyError) as error:  # damaged, cut short, or of another version
        raise DataError(f"features file {features_path} cannot be read ({error}); delete it "
                        f"and run again ({training_rule(settings, search=False)} writes it).") from None
    # the subsets too: a subject moved from the last training row to the first
    # evaluation row keeps the order, but the encoder was trained on it
    if (subjects.tolist() != split.participant_ids[rows].tolist()
            or subsets.tolist() != split.subset_labels()[rows].tolist()):
        raise DataError(f"{features_path} lists other subjects than split {split.name} "
                        f"(train then evaluation rows, and their subsets); delete it and run "
                        f"again ({training_rule(settings, search=False)} writes it).")
    trained_loss = json.loads(str(saved["trained_loss"])) if "trained_loss" in saved else None
    random_head = int(saved["random_head"]) if "random_head" in saved else 0
    if random_head and settings["model"]["features"] == "projection":
        # the configuration refuses this for a pretraining run's encoder
        # (config.check_pretrained_encoder_fits); a model.init_checkpoint's shapes only the
        # training job sees
        cell = f"experiments.{settings.get('experiment')}.variants.{settings.get('variant')}"
        log.warning("%s: the cell %s trains nothing (train.epochs 0) and reads model.features "
                    "'projection', but %d head tensor(s) of its model.init_checkpoint did not "
                    "load (another model.hidden_dim or projection_dim, or an encoder-only "
                    "file) and keep their random initialisation: its features are a random "
                    "head's. Add model: {features: encoder} to %s (the checkpoint's own "
                    "encoder features).", features_path, cell, random_head, cell)
    return CellFeatures(kind.astype(np.float32), str(digest), trained_loss or None)


#: Largest spread of any feature across the training subjects, relative to the features'
#: largest magnitude, at or below which an encoder counts as collapsed: float32 rounding is
#: about 1e-7; the demo's untrained encoders spread by 0.06 or more.
COLLAPSE_RELATIVE_SPREAD = 1e-5


def warn_if_collapsed(train_features: np.ndarray, split_name: str, settings: Mapping) -> bool:
    """Warn (and return True) when every feature is the same for every training subject.

    A collapsed encoder (all ReLUs dead, a diverged training that stayed finite) gives the
    read-out nothing to fit: it predicts about the training-mean age for everyone, and the
    cell's row in Table 3 then looks like a poor loss when it measures a broken training.
    """
    if len(train_features) < 2 or train_features.shape[1] == 0:
        return False
    spread = float(np.ptp(train_features, axis=0).max())
    magnitude = float(np.abs(train_features).max())
    if spread > COLLAPSE_RELATIVE_SPREAD * magnitude:
        return False
    init = str(settings["model"].get("init") or "")
    if settings["train"]["epochs"]:
        remedy = (f"Lower config key {train_key(settings, 'lr')}, or check the loss settings, "
                  f"and train it again ({training_rule(settings)}).")
    elif settings["model"].get("init_checkpoint"):
        remedy = (f"The encoder is the checkpoint {settings['model']['init_checkpoint']} as it "
                  f"is (train.epochs 0): it gives no spread on these inputs; check that it "
                  f"fits this network and these maps.")
    elif init.startswith("pretrained:"):
        remedy = (f"The encoder is the pretraining run {init[len('pretrained:'):]!r} as it "
                  f"is (train.epochs 0): look at that run (rule pretrain_encoder, its loss "
                  f"curve and learning rate).")
    else:
        remedy = ("The encoder is untrained (train.epochs 0): its initialisation "
                  "(model.init) gives no spread on these inputs.")
    log.warning(
        "split %s, %s/%s seed %s: the %s features (model.features) are the same for every "
        "training subject (largest spread across subjects %.3g, magnitude %.3g): the "
        "encoder collapsed, so the read-out predicts about the training-mean age for "
        "everyone and this cell's MAE measures the collapse, not the loss. %s",
        split_name, settings.get("experiment"), settings.get("variant"),
        settings.get("seed"), settings["model"]["features"], spread, magnitude, remedy)
    return True


def evaluate_split(split: SplitData, features: np.ndarray, settings: Mapping
                   ) -> tuple[dict, pd.DataFrame, Readout]:
    """Fit the read-out on the training rows of ``features`` (training rows then evaluation
    rows, [n, D]: :func:`cell_features`), predict every row; metrics on the evaluation rows.

    The predictions come from the read-out rebuilt from its arrays, exactly what a saved
    read-out (and so a model bundle) predicts.

    Returns
    -------
    metrics
        As in metrics.json (without split/experiment identifiers).
    predictions
        participant_id, study, age, predicted_age, subset for all train and eval rows.
    readout
        The fitted read-out.

    Raises
    ------
    DataError
        A row of ``features`` holds NaN or inf (names the subjects): the small predictors
        (mse, l1, huber, dex) fitted on it read out NaN for every subject, and any
        read-out gives such an evaluation subject a NaN age, so the MAE was NaN.
    """
    rows = np.concatenate([split.train_index, split.eval_index])
    n_train = len(split.train_index)
    if settings["model"]["encoder"] != "none":  # voxels: load_split scanned the volumes
        broken = ~np.isfinite(features).all(axis=1)
        if broken.any():
            raise DataError(
                f"split {split.name}: the {settings['model']['features']} features of "
                f"{', '.join(split.participant_ids[rows[broken]])} are NaN or inf, so no age "
                f"can be read out of them. The encoder that embedded them is broken (a "
                f"diverged training): lower config key {train_key(settings, 'lr')} and train it "
                f"again ({training_rule(settings)}).")
        warn_if_collapsed(features[:n_train], split.name, settings)
    ages, studies = split.ages, split.studies
    fitted = fit_readout(features[:n_train], ages[split.train_index], settings["readout"],
                         seed=int(settings["seed"]), studies=studies[split.train_index])
    readout = Readout.from_state(*fitted.to_state())
    # with fewer training subjects nothing was chosen (every alpha scores NaN and the grid's
    # first is kept, ridge_folds says so): widening the grid cannot help there
    edges = grid_edges(readout, settings["readout"]) if n_train >= MIN_CV_SUBJECTS else []
    if edges:
        log.warning("split %s: the read-out's cross-validation chose %s: the best value may "
                    "lie beyond the grid. Widen it in the config to see (the cells that use "
                    "it are evaluated again).", split.name, "; ".join(edges))
    predicted = readout.predict(features, studies[rows])
    eval_rows = split.eval_index
    metrics = compute_metrics(ages[eval_rows], predicted[n_train:], studies[eval_rows])
    metrics.update({"readout": readout.method, "n_train": n_train, "n_test": len(eval_rows)})
    metrics.update(readout.info)
    predictions = pd.DataFrame({
        "participant_id": split.participant_ids[rows], "study": studies[rows],
        "age": ages[rows], "predicted_age": predicted,
        "subset": split.subset_labels()[rows]})
    return metrics, predictions, readout


def training_summary(split: SplitData) -> dict:
    """Who the read-out was fitted on, as a bundle reports it (ages in years)."""
    ages = split.ages[split.train_index]
    studies, counts = np.unique(split.studies[split.train_index], return_counts=True)
    return {"n_subjects": int(len(ages)), "age_min": float(ages.min()),
            "age_max": float(ages.max()), "age_mean": float(ages.mean()),
            "age_sd": float(ages.std()),
            "studies": {str(study): int(count) for study, count in zip(studies, counts)}}


def evaluate_encoder(split_dir: str | Path, features_path: str | Path | None,
                     settings: Mapping, *, metrics_path: str | Path,
                     predictions_path: str | Path) -> dict:
    """Evaluate one grid cell; write its metrics, predictions and read-out.

    Parameters
    ----------
    split_dir
        ``results/dataset/<split>``.
    features_path
        ``features.npz`` written by :func:`brainage.train.train_encoder` (the cell's own,
        or that of the cell it shares an encoder with); None for a cell without an
        encoder (``model.encoder: none``).
    settings
        The cell's settings (:func:`brainage.config.cell_settings`).
    metrics_path, predictions_path
        ``metrics.json`` and ``predictions.tsv``; ``readout.npz`` and ``readout.json`` are
        written into the same folder as ``metrics.json``.

    Returns
    -------
    dict
        The metrics written to ``metrics_path``.
    """
    settings = resolve_cell(settings)
    folder = Path(metrics_path).parent
    for output in (metrics_path, predictions_path, folder / READOUT_ARRAYS,
                   folder / READOUT_DESCRIPTION):  # this job owns them
        remove_stale_temporaries(output)
    # the images are read (and checked) only by a cell without an encoder: cell_features
    split = load_split(split_dir, check_images=False)
    log.info("evaluating %s/%s seed %s on split %s: read-out %s on the %s",
             settings.get("experiment"), settings.get("variant"), settings["seed"], split.name,
             settings["readout"]["method"], "voxels" if settings["model"]["encoder"] == "none"
             else f"encoder's {settings['model']['features']} features")
    features, encoder_sha256, trained_loss = cell_features(split, features_path, settings)
    metrics, predictions, readout = evaluate_split(split, features, settings)
    n_train = len(split.train_index)
    predicted = predictions["predicted_age"].to_numpy(dtype=np.float64)
    save_readout(
        folder, readout, features=settings["model"]["features"],
        n_features=int(features.shape[1]), split=split.name, encoder_sha256=encoder_sha256,
        # the normalised arrays the features came from: export refuses a split normalised
        # again since (brainage.export)
        split_images_sha256=split.stats.get("images_sha256"),
        training=training_summary(split),
        bias_correction=bias_fits(
            features[:n_train], split.ages[split.train_index],
            predicted[:n_train], test_ages=split.ages[split.eval_index],
            test_predicted=predicted[n_train:], readout_settings=settings["readout"],
            seed=int(settings["seed"]), where=f"split {split.name}",
            train_studies=split.studies[split.train_index]))
    metrics = {"split": split.name, "experiment": settings.get("experiment"),
               "variant": settings.get("variant"), "seed": settings["seed"],
               "loss": settings["loss"]["name"], "kind": cell_kind(settings),
               # the cell that trained it, when cells share an encoder (encoder_owners)
               "features": None if features_path is None else str(features_path),
               "encoder_sha256": encoder_sha256,
               "trained_loss": trained_loss, **metrics}
    write_tsv(predictions_path, predictions)
    write_json(metrics_path, metrics)
    log.info("%s/%s seed %s on %s: test MAE %.3f years (n_train %d, n_test %d)",
             metrics["experiment"], metrics["variant"], metrics["seed"], split.name,
             metrics["mae"], metrics["n_train"], metrics["n_test"])
    return metrics
