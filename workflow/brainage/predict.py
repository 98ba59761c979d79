"""Brain age for new subjects: export a trained grid cell as a bundle, apply it to a cohort.

Two steps, each a function a rule (or another lab) calls:

1. :func:`export_model` turns one grid cell (encoder.pt of
   ``results/train/<split>/<experiment>/<variant>/seed-<n>/``) into a self-contained model
   bundle (``results/models/<name>/``, see :mod:`brainage.bundle`): encoder weights, the
   fitted read-out as plain tensors, the split's TRAINING normalisation statistics, the
   template id, the preprocessing settings and the age-bias correction.
2. :func:`predict_cohort` applies a bundle to a new BIDS-like dataset whose maps went
   through the same per-subject preprocessing (skull strip, N4, affine to MNI152 2 mm,
   QC): normalise with the bundle's statistics (never re-estimated on the new cohort),
   embed, read out, and report the brain-age gap per subject and per group.

The read-out
------------
evaluate.py does not store its fitted read-out, so the export re-embeds the split exactly
as :func:`brainage.evaluate.evaluate_split` does (same rows, same order, same batches) and
refits with the same :func:`brainage.evaluate.fit_readout`; same data and same
deterministic CV give the same read-out. The export checks this by comparing its
predictions with the cell's ``predictions.tsv`` (``max_abs_difference_years`` in the
manifest) and fails if they differ by more than ``tolerance_years``.

The age-bias correction
-----------------------
Brain-age predictions regress to the training mean: the gap (predicted - chronological
age) falls with age. The usual linear correction fits ``gap = a + b * age`` on a
reference set and reports ``corrected_gap = gap - (a + b * age)``. By default we fit it
on the TRAINING subjects of the exported cell, but on out-of-fold predictions: a K-fold
cross-validation (``readout.cv_folds`` folds, shuffled with the cell's seed) refits the
whole read-out (including its alpha search) on K-1 folds and predicts the held-out fold.
In-sample training predictions fit their own ages too well (a flatter gap-age slope than
on unseen subjects), so a correction fitted on them would under-correct every new
subject. On the out-of-fold predictions the corrected gap is uncorrelated with age by
construction. What cross-validating the read-out cannot undo: the encoder was trained on
these subjects too, so their features may still sit closer to their ages than an unseen
subject's. Two stricter references exist: the split's held-out test subjects
(``export_model(bias_fit="test")``: unseen by encoder and read-out, but only ~20 % of the
cohort), and a healthy group of the new cohort itself (``predict_cohort(
bias_reference_group=...)``), which also absorbs a site offset. The manifest records the
training, in-sample and test fits side by side.

Entry point::

    python -m brainage.predict export --configfile config/config.yaml
    python -m brainage.predict run --bundle results/models/brainage \\
        --dataset /data/adni_mre --output results/predict/adni
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from brainage.bundle import (BundleError, ModelBundle, read_bundle, sha256_file,
                             write_bundle)
from brainage.io import InputError, atomic_path, write_json, write_tsv

log = logging.getLogger(__name__)

#: Export fails when the refitted read-out's predictions of the split differ from the
#: cell's predictions.tsv by more than this (years): the encoder, the split or the
#: read-out settings changed after evaluation. On the CPU a refit is bit-identical; on
#: CUDA, cuDNN's algorithm choice (benchmark mode), TF32 and bf16 autocast make two
#: embeddings of the same volumes differ in the last bits, which the read-out can
#: amplify to a few hundredths of a year.
TOLERANCE_YEARS = {"cpu": 0.01, "cuda": 0.25}
#: Columns predictions.tsv adds after the cohort's participants.tsv columns (participant_id,
#: age, sex, study, group, ...). Ages and gaps in years.
PREDICTION_COLUMNS = ("status", "qc_pass", "qc_reason", "predicted_age", "gap",
                      "corrected_gap", "corrected_predicted_age", "within_training_ages",
                      "qc_dice", "qc_correlation", "qc_coverage")
#: config keys of section ``qc`` that decide whether a subject is predicted.
QC_THRESHOLDS = ("min_dice", "min_correlation", "min_coverage")
SUMMARY_COLUMNS = ("grouped_by", "group", "n", "n_predicted", "n_qc_failed", "age_mean",
                   "mean_gap", "sd_gap", "mean_corrected_gap", "sd_corrected_gap",
                   "corrected_gap_ci95_low", "corrected_gap_ci95_high")


class ExportError(ValueError):
    """A grid cell cannot be exported as a bundle; the message says why and what to do."""


# -- read-out as tensors ----------------------------------------------------------------------

class LinearReadout:
    """Ridge prediction from stored coefficients: ``features @ coef + intercept`` (years).

    Stands in for the fitted scikit-learn estimator in :class:`brainage.evaluate.Readout`,
    so a bundle never needs a pickled scikit-learn object.
    """

    def __init__(self, coef: np.ndarray, intercept: float) -> None:
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.coef + self.intercept


def readout_to_state(readout) -> tuple[dict, dict]:
    """Split a fitted :class:`brainage.evaluate.Readout` into tensors and JSON metadata.

    Returns
    -------
    state : dict of str to torch.Tensor
        Ridge: ``coef`` [D], ``intercept`` []. Predictors: ``predictor.*`` (the MLP's
        state dict), ``feature_mean`` [D], ``feature_sd`` [D], and for DEX
        ``bin_centres`` [bins] (years). float64 where the read-out computes in float64.
    description : dict
        ``method``, ``info`` (e.g. ridge_alpha), and for predictors the MLP widths and
        ``age_mean``/``age_sd`` (years).
    """
    import torch

    description = {"method": readout.method, "info": dict(readout.info)}
    if readout.method == "ridge":
        estimator = getattr(readout.ridge, "best_estimator_", readout.ridge)
        if isinstance(estimator, LinearReadout):
            coef, intercept = estimator.coef, estimator.intercept
        else:
            coef, intercept = estimator.coef_, estimator.intercept_
        coef = np.asarray(coef, dtype=np.float64)
        if coef.ndim != 1:
            raise ExportError(f"ridge read-out has coefficients of shape {coef.shape}; a "
                              f"single age output [D] is expected.")
        return ({"coef": torch.from_numpy(coef.copy()),
                 "intercept": torch.tensor(float(intercept), dtype=torch.float64)},
                description)
    predictor = readout.predictor
    linear_layers = [layer for layer in predictor if isinstance(layer, torch.nn.Linear)]
    description.update({
        "in_features": int(linear_layers[0].in_features),
        "hidden_dim": int(linear_layers[0].out_features),
        "out_features": int(linear_layers[-1].out_features),
        "age_mean": float(readout.age_mean), "age_sd": float(readout.age_sd)})
    state = {f"predictor.{key}": value.detach().cpu().clone()
             for key, value in predictor.state_dict().items()}
    state["feature_mean"] = torch.from_numpy(np.asarray(readout.feature_mean, np.float64).copy())
    state["feature_sd"] = torch.from_numpy(np.asarray(readout.feature_sd, np.float64).copy())
    if readout.bin_centres is not None:
        state["bin_centres"] = torch.from_numpy(np.asarray(readout.bin_centres,
                                                           np.float64).copy())
    return state, description


def readout_from_state(state: Mapping, description: Mapping):
    """Rebuild a :class:`brainage.evaluate.Readout` from :func:`readout_to_state` output."""
    import torch
    from torch import nn

    from brainage.evaluate import Readout

    method = description["method"]
    info = dict(description.get("info", {}))
    if method == "ridge":
        return Readout("ridge", info=info,
                       ridge=LinearReadout(state["coef"].numpy(), float(state["intercept"])))
    predictor = nn.Sequential(nn.Linear(description["in_features"], description["hidden_dim"]),
                              nn.ReLU(),
                              nn.Linear(description["hidden_dim"], description["out_features"]))
    prefix = "predictor."
    predictor.load_state_dict({key[len(prefix):]: value for key, value in state.items()
                               if key.startswith(prefix)})
    predictor.eval()
    bin_centres = state["bin_centres"].numpy() if "bin_centres" in state else None
    return Readout(method, info=info, predictor=predictor,
                   feature_mean=state["feature_mean"].numpy(),
                   feature_sd=state["feature_sd"].numpy(),
                   age_mean=float(description["age_mean"]), age_sd=float(description["age_sd"]),
                   bin_centres=bin_centres)


# -- age-bias correction -----------------------------------------------------------------------

@dataclass(frozen=True)
class AgeBias:
    """Linear age bias of the brain-age gap: ``gap = intercept + slope * age``.

    Attributes
    ----------
    intercept : float
        a (years).
    slope : float
        b (years of gap per year of age; negative for the usual regression to the mean).
    """

    intercept: float
    slope: float

    def expected_gap(self, ages: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * np.asarray(ages, dtype=np.float64)

    def corrected_gap(self, ages: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """``(predicted - age) - (a + b * age)`` (years), [n]."""
        ages = np.asarray(ages, dtype=np.float64)
        return np.asarray(predicted, dtype=np.float64) - ages - self.expected_gap(ages)


def fit_age_bias(ages: np.ndarray, predicted: np.ndarray, *, where: str = "reference set"
                 ) -> AgeBias:
    """Least-squares fit of ``predicted - age = a + b * age``.

    Parameters
    ----------
    ages, predicted : array [n]
        Chronological and predicted ages (years) of the reference subjects.
    where : str
        Names the reference set in error messages.

    Raises
    ------
    ValueError
        Fewer than 3 subjects, or all of one age (the slope is undefined).
    """
    ages = np.asarray(ages, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    finite = np.isfinite(ages) & np.isfinite(predicted)
    ages, predicted = ages[finite], predicted[finite]
    if len(ages) < 3:
        raise ValueError(f"age-bias correction on the {where} needs at least 3 subjects with a "
                         f"prediction; got {len(ages)}.")
    if np.ptp(ages) == 0:
        raise ValueError(f"age-bias correction on the {where}: every subject is "
                         f"{ages[0]} years old, so the gap's age slope is undefined.")
    slope, intercept = np.polyfit(ages, predicted - ages, 1)
    return AgeBias(intercept=float(intercept), slope=float(slope))


def out_of_fold_predictions(features: np.ndarray, ages: np.ndarray, readout_settings: Mapping,
                            *, folds: int, seed: int) -> np.ndarray:
    """Predicted ages of every training subject from a read-out that never saw it.

    K-fold (shuffled with ``seed``); in each fold the whole read-out (alpha search
    included) is refitted with :func:`brainage.evaluate.fit_readout` on the other folds.

    Parameters
    ----------
    features : array [n, D]
        Frozen training embeddings.
    ages : array [n]
        Their ages (years).

    Returns
    -------
    array [n]
        Out-of-fold predicted ages (years), float64.
    """
    from sklearn.model_selection import KFold

    from brainage.evaluate import fit_readout

    ages = np.asarray(ages, dtype=np.float64)
    folds = min(int(folds), len(ages))
    if folds < 2:
        raise ValueError(f"cross-validated bias correction needs at least 2 training subjects; "
                         f"got {len(ages)}.")
    predicted = np.full(len(ages), np.nan)
    splitter = KFold(n_splits=folds, shuffle=True, random_state=int(seed))
    for fit_rows, held_out in splitter.split(features):
        readout = fit_readout(features[fit_rows], ages[fit_rows], readout_settings, seed=seed)
        predicted[held_out] = readout.predict(np.asarray(features[held_out], dtype=np.float64))
    return predicted


def gap_age_correlation(ages: np.ndarray, gaps: np.ndarray) -> float | None:
    """Pearson r of a gap with age; None when undefined."""
    ages, gaps = np.asarray(ages, float), np.asarray(gaps, float)
    keep = np.isfinite(ages) & np.isfinite(gaps)
    if keep.sum() < 3 or np.std(ages[keep]) == 0 or np.std(gaps[keep]) == 0:
        return None
    return float(np.corrcoef(ages[keep], gaps[keep])[0, 1])


# -- export ------------------------------------------------------------------------------------

BIAS_FIT_SETS = ("training", "test")


def _fit_bias_correction(train_features: np.ndarray, train_ages: np.ndarray,
                         train_predicted: np.ndarray, *, test_ages: np.ndarray,
                         test_predicted: np.ndarray, readout_settings: Mapping, seed: int,
                         fit_on: str, where: str) -> dict:
    """The bundle's ``bias_correction`` record: (a, b) from the chosen reference set, plus
    the other fits for comparison (see the module docstring)."""
    if fit_on not in BIAS_FIT_SETS:
        raise ValueError(f"bias_fit={fit_on!r}; choose one of {', '.join(BIAS_FIT_SETS)}.")
    folds = min(int(readout_settings["cv_folds"]), len(train_ages))
    oof = out_of_fold_predictions(train_features, train_ages, readout_settings, folds=folds,
                                  seed=seed)
    fits = {"training": fit_age_bias(train_ages, oof, where=f"training subjects of {where}"),
            "training_in_sample": fit_age_bias(train_ages, train_predicted,
                                               where=f"training subjects of {where}")}
    try:
        fits["test"] = fit_age_bias(test_ages, test_predicted, where=f"test subjects of {where}")
    except ValueError as error:
        if fit_on == "test":
            raise ExportError(f"{error} Use bias_fit training (config key predict.bias_fit).") \
                from None
    bias = fits[fit_on]
    reference_ages, reference_predicted = ((train_ages, oof) if fit_on == "training"
                                           else (test_ages, test_predicted))
    corrected = bias.corrected_gap(reference_ages, reference_predicted)
    record = {
        "intercept": bias.intercept, "slope": bias.slope, "fitted_on": fit_on,
        "formula": "corrected_gap = (predicted_age - age) - (intercept + slope * age)",
        "description": {
            "training": "out-of-fold predictions of the training subjects (K-fold CV of the "
                        "whole read-out on the frozen training embeddings)",
            "test": "the held-out test subjects of the split"}[fit_on],
        "n_subjects": int(len(reference_ages)), "cv_folds": folds, "cv_seed": int(seed),
        "gap_age_r_before": gap_age_correlation(reference_ages,
                                                reference_predicted - reference_ages),
        "gap_age_r_after": gap_age_correlation(reference_ages, corrected),
        "oof_mae": float(np.mean(np.abs(oof - train_ages))),
        "other_fits": {name: {"intercept": fit.intercept, "slope": fit.slope}
                       for name, fit in fits.items() if name != fit_on},
    }
    log.info("age bias fitted on %s: gap = %.3f + %.4f * age; r(gap, age) %.3f before, "
             "%.1e after", record["description"], bias.intercept, bias.slope,
             record["gap_age_r_before"] or float("nan"), record["gap_age_r_after"] or 0.0)
    return record


def template_record(t1_path: str | Path, mask_path: str | Path, *, source: str) -> dict:
    """What identifies the registration template: id, grid and a checksum of the mask.

    The checksum covers the mask's voxels (not the .nii.gz bytes, whose gzip header
    differs between writers), so a lab that rebuilds the same template matches it.
    """
    import nibabel as nib

    mask = nib.load(str(mask_path))
    data = np.ascontiguousarray(np.asanyarray(mask.dataobj) > 0, dtype=np.uint8)
    t1 = nib.load(str(t1_path))
    if tuple(t1.shape[:3]) != tuple(mask.shape[:3]) or not np.allclose(t1.affine, mask.affine):
        raise ExportError(f"template {t1_path} and its mask {mask_path} are not on the same "
                          f"grid; rerun rule prepare_template.")
    name = "MNI152NLin2009aSym" if source == "nilearn" else f"file:{Path(t1_path).name}"
    return {"id": f"{name}_res-2", "space": "MNI152", "source": source,
            "resolution_mm": float(abs(mask.affine[0, 0])),
            "shape": [int(size) for size in mask.shape[:3]],
            "affine": np.asarray(mask.affine, dtype=float).tolist(),
            "mask_voxels_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            "n_brain_voxels": int(data.sum())}


def _normalisation_record(stats: Mapping) -> dict:
    """The TRAINING normalisation of the split, without per-subject lists: a bundle goes to
    other labs and needs the numbers, not who the training subjects were."""
    keep = ("mean", "sd", "scope", "n_voxels", "resolution_mm", "affine", "shape", "dtype",
            "split")
    missing = [key for key in ("mean", "sd", "resolution_mm", "affine", "shape")
               if key not in stats]
    if missing:
        raise ExportError(f"the split's stats.json lacks {', '.join(missing)}; rerun rule "
                          f"normalise_dataset.")
    record = {key: stats[key] for key in keep if key in stats}
    record["n_statistics_subjects"] = len(stats.get("statistics_subjects", []))
    return record


def _compare_with_cell(predictions_path: str | Path, participant_ids: np.ndarray,
                       predicted: np.ndarray) -> float:
    """Largest |difference| (years) between refitted and evaluated predictions."""
    cell = pd.read_csv(predictions_path, sep="\t", dtype={"participant_id": str})
    evaluated = dict(zip(cell["participant_id"], cell["predicted_age"].astype(float)))
    missing = [pid for pid in participant_ids if pid not in evaluated]
    if missing:
        raise ExportError(
            f"{predictions_path} has no prediction for {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}: the split changed after the cell was "
            f"evaluated. Rerun rule evaluate_encoder for this cell, then export again.")
    reference = np.array([evaluated[pid] for pid in participant_ids])
    return float(np.max(np.abs(reference - predicted))) if len(predicted) else 0.0


def export_model(split_dir: str | Path, encoder_path: str | Path, settings: Mapping, *,
                 bundle_dir: str | Path, name: str, predictions_path: str | Path | None = None,
                 metrics_path: str | Path | None = None, template_t1: str | Path | None = None,
                 template_mask: str | Path | None = None, preprocessing: Mapping | None = None,
                 bias_fit: str = "training", tolerance_years: float | None = None) -> dict:
    """Export one trained grid cell as a model bundle another lab can run.

    Parameters
    ----------
    split_dir : path
        ``results/dataset/<split>`` the cell was trained on (images.npy, participants.tsv,
        stats.json): the training embeddings for the read-out and the bias correction,
        and the TRAINING normalisation statistics.
    encoder_path : path
        The cell's ``encoder.pt``.
    settings : mapping
        The cell's settings (:func:`brainage.config.cell_settings`).
    bundle_dir : path
        Output folder, ``results/models/<name>``.
    name : str
        Bundle name (letters, digits, '_', '-').
    predictions_path : path, optional
        The cell's ``predictions.tsv``; the refitted read-out must reproduce it within
        ``tolerance_years`` (years).
    metrics_path : path, optional
        The cell's ``metrics.json``, recorded in the manifest (test MAE etc.).
    template_t1, template_mask : path, optional
        The registration template (rule ``prepare_template``); its id, grid and mask
        checksum are recorded (:func:`template_record`) and a new cohort's maps must be
        on that grid.
    preprocessing : mapping, optional
        :func:`preprocessing_record`: the config sections ``preprocess``, ``qc`` and
        ``template``, i.e. how a new cohort must be preprocessed to match the training
        data.
    bias_fit : str
        Reference set of the age-bias correction: ``training`` (out-of-fold predictions
        of the training subjects, the default) or ``test`` (the split's held-out test
        subjects: unseen by encoder and read-out, but fewer). The other fit is recorded
        for comparison.
    tolerance_years : float, optional
        See ``predictions_path``; default :data:`TOLERANCE_YEARS` of the device.

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    ExportError
        The refit does not reproduce the cell's predictions, the split changed, or the
        statistics are incomplete.
    """
    import torch

    from brainage.data import VolumeStore, load_split
    from brainage.evaluate import embed, fit_readout
    from brainage.train import load_encoder, resolve_settings, runtime_setup

    settings = resolve_settings(settings)
    device, autocast_dtype = runtime_setup(settings["train"])
    split = load_split(split_dir)
    model = load_encoder(encoder_path, settings["model"]).to(device)
    which = settings["model"]["features"]

    # Same rows, order and batches as evaluate_split, so the read-out is the evaluated one.
    rows = np.concatenate([split.train_index, split.eval_index])
    store = VolumeStore(split.images, device, normalisation=split.normalisation)
    features = embed(model, store, rows, which=which, autocast_dtype=autocast_dtype)
    n_train = len(split.train_index)
    train_ages = split.ages[split.train_index]
    seed = int(settings["seed"])
    readout = fit_readout(features[:n_train], train_ages, settings["readout"], seed=seed)
    predicted = readout.predict(features.astype(np.float64))

    state, description = readout_to_state(readout)
    restored = readout_from_state(state, description).predict(features.astype(np.float64))
    if not np.allclose(restored, predicted, rtol=0, atol=1e-9):
        raise ExportError("the read-out stored as tensors does not reproduce the fitted "
                          f"read-out (max difference {np.max(np.abs(restored - predicted))} "
                          f"years); this is a bug in brainage.predict.readout_to_state.")
    difference = None
    if tolerance_years is None:
        tolerance_years = TOLERANCE_YEARS.get(device.type, TOLERANCE_YEARS["cuda"])
    if predictions_path is not None:
        difference = _compare_with_cell(predictions_path, split.participant_ids[rows], predicted)
        if difference > tolerance_years:
            raise ExportError(
                f"the refitted read-out predicts the split's subjects up to {difference:.4f} "
                f"years differently from {predictions_path} (tolerance {tolerance_years}). "
                f"The encoder, the split or the read-out settings changed after evaluation, "
                f"or the evaluation ran on another device/precision: rerun rule "
                f"evaluate_encoder for this cell on the machine that exports, then export.")
        log.info("refitted read-out reproduces %s (max difference %.2e years)",
                 predictions_path, difference)

    bias_record = _fit_bias_correction(
        features[:n_train].astype(np.float64), train_ages, predicted[:n_train],
        test_ages=split.ages[split.eval_index], test_predicted=predicted[n_train:],
        readout_settings=settings["readout"], seed=seed, fit_on=bias_fit,
        where=f"split {split.name}")

    template = None
    if template_t1 is not None and template_mask is not None:
        source = (preprocessing or {}).get("template", {}).get("source", "nilearn")
        template = template_record(template_t1, template_mask, source=source)
    payload = torch.load(encoder_path, map_location="cpu", weights_only=True)
    encoder_state = payload["model"] if "model" in payload else payload
    metrics = json.loads(Path(metrics_path).read_text()) if metrics_path else None
    manifest_fields = {
        "settings": settings,
        "source": {"split": split.name, "experiment": settings.get("experiment"),
                   "variant": settings.get("variant"), "seed": seed,
                   "encoder_sha256": sha256_file(encoder_path), "metrics": metrics,
                   "reproduces_cell_predictions": {"max_abs_difference_years": difference,
                                                   "tolerance_years": tolerance_years}},
        "normalisation": _normalisation_record(split.stats),
        "template": template,
        "preprocessing": dict(preprocessing) if preprocessing is not None else None,
        "readout": {**description, "features": which, "n_features": int(features.shape[1])},
        "bias_correction": bias_record,
        "training": {"n_subjects": int(n_train), "age_min": float(train_ages.min()),
                     "age_max": float(train_ages.max()), "age_mean": float(train_ages.mean()),
                     "age_sd": float(train_ages.std()),
                     "studies": {str(study): int(count) for study, count in
                                 zip(*np.unique(split.studies[split.train_index],
                                                return_counts=True))}},
    }
    write_bundle(bundle_dir, name=name, encoder_state=encoder_state, readout_state=state,
                 manifest_fields=manifest_fields, readme=_bundle_readme(name, manifest_fields))
    return json.loads((Path(bundle_dir) / "manifest.json").read_text())


def _bundle_readme(name: str, fields: Mapping) -> str:
    source = fields["source"]
    metrics = source.get("metrics") or {}
    mae = f"{metrics['mae']:.2f} years" if "mae" in metrics else "n/a"
    training = fields["training"]
    return (
        f"# brainage model bundle `{name}`\n\n"
        f"Brain age from MR-elastography stiffness maps: a 3D ResNet-18 encoder trained with "
        f"the `{fields['settings']['loss']['name']}` contrastive loss (grid cell "
        f"{source['experiment']}/{source['variant']}/seed-{source['seed']}, split "
        f"{source['split']}) and a `{fields['readout']['method']}` read-out.\n\n"
        f"- test MAE of the cell: {mae}\n"
        f"- trained on {training['n_subjects']} subjects aged {training['age_min']:.0f}-"
        f"{training['age_max']:.0f} years\n"
        f"- template: {(fields['template'] or {}).get('id', 'n/a')}, normalisation at "
        f"{fields['normalisation']['resolution_mm']} mm with the training mean "
        f"{fields['normalisation']['mean']:.4f} kPa and sd "
        f"{fields['normalisation']['sd']:.4f} kPa\n"
        f"- age-bias correction: gap = {fields['bias_correction']['intercept']:.3f} + "
        f"{fields['bias_correction']['slope']:.4f} * age (out-of-fold training predictions)\n\n"
        f"Run it on a BIDS-like dataset (participants.tsv + sub-*/mre/*_stiffness.nii.gz):\n\n"
        f"    python -m brainage.predict run --bundle <this folder> --dataset <root> "
        f"--output <folder>\n\n"
        f"manifest.json lists the sha256 of encoder.pt and readout.pt; both are plain tensor "
        f"files read with torch.load(weights_only=True).\n")


# -- prediction --------------------------------------------------------------------------------

@dataclass
class BrainAgeModel:
    """A loaded bundle, ready to predict: encoder, read-out, age-bias correction.

    Build it with :meth:`from_bundle`.
    """

    bundle: ModelBundle
    network: object          # brainage.models.BrainAgeNet, eval mode, on ``device``
    readout: object          # brainage.evaluate.Readout
    bias: AgeBias
    device: object           # torch.device
    autocast_dtype: object   # torch.dtype or None

    @classmethod
    def from_bundle(cls, bundle: ModelBundle | str | Path, *, device: str | None = None
                    ) -> "BrainAgeModel":
        """Load and verify a bundle (:func:`brainage.bundle.read_bundle`), build the network.

        ``device``: ``cpu``/``cuda``/``auto``; default the cell's ``train.device``.
        """
        from brainage.models import build_model
        from brainage.train import runtime_setup

        if not isinstance(bundle, ModelBundle):
            bundle = read_bundle(bundle)
        settings = bundle.settings
        train_settings = dict(settings["train"])
        if device is not None:
            train_settings["device"] = device
        torch_device, autocast_dtype = runtime_setup(train_settings)
        network = build_model(settings["model"])
        try:
            network.load_state_dict(bundle.encoder_state)
        except RuntimeError as error:
            raise BundleError(f"{bundle.path / 'encoder.pt'} does not fit the network its "
                              f"manifest describes ({error}); the bundle is inconsistent. "
                              f"Re-export it.") from None
        network.to(torch_device).eval()
        readout = readout_from_state(bundle.readout_state, bundle.manifest["readout"])
        correction = bundle.bias_correction
        return cls(bundle=bundle, network=network, readout=readout,
                   bias=AgeBias(float(correction["intercept"]), float(correction["slope"])),
                   device=torch_device, autocast_dtype=autocast_dtype)

    def features(self, volumes: np.ndarray) -> np.ndarray:
        """Normalised volumes [n, X, Y, Z] (z-units) -> read-out features [n, D] float32."""
        from brainage.data import VolumeStore
        from brainage.evaluate import embed

        store = VolumeStore(np.asarray(volumes, dtype=np.float32), self.device)
        return embed(self.network, store, np.arange(len(volumes)),
                     which=self.bundle.manifest["readout"]["features"],
                     autocast_dtype=self.autocast_dtype)

    def predict_age(self, volumes: np.ndarray) -> np.ndarray:
        """Normalised volumes [n, X, Y, Z] -> predicted ages [n] (years), float64."""
        if len(volumes) == 0:
            return np.zeros(0)
        return self.readout.predict(self.features(volumes).astype(np.float64))


def read_qc(path: str | Path, thresholds: Mapping) -> tuple[bool, str, dict]:
    """A subject's QC verdict from its ``sub-<label>_qc.json`` (rule compute_qc).

    Parameters
    ----------
    path : path
        The QC JSON (metrics ``dice``, ``correlation``, ``coverage``).
    thresholds : mapping
        ``min_dice``, ``min_correlation``, ``min_coverage`` (config section ``qc``).

    Returns
    -------
    passed : bool
    reason : str
        The thresholds missed, e.g. ``"dice 0.812 < 0.85"`` (empty when passed).
    metrics : dict
        ``qc_dice``, ``qc_correlation``, ``qc_coverage``.
    """
    from brainage.qc import METRICS, qc_failures

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"QC file {path} cannot be read ({error}); rerun the subject's "
                         f"preprocessing (rule compute_qc).") from None
    missing = [metric for metric in METRICS if metric not in record]
    if missing:
        raise InputError(f"QC file {path} lacks {', '.join(missing)}; rerun the subject's "
                         f"preprocessing (rule compute_qc).")
    failures = qc_failures(record, **{key: float(thresholds[key]) for key in QC_THRESHOLDS})
    return (not failures, "; ".join(failures),
            {f"qc_{metric}": float(record[metric]) for metric in METRICS})


def check_template(bundle: ModelBundle, image_shape, image_affine, *, what: str) -> None:
    """Raise when a preprocessed map is not on the bundle's template grid."""
    template = bundle.manifest.get("template") or {}
    if not template:
        return
    if tuple(image_shape[:3]) != tuple(template["shape"]) or not np.allclose(
            np.asarray(image_affine, float), np.asarray(template["affine"], float), atol=1e-4):
        raise InputError(
            f"{what} is on a grid of shape {tuple(image_shape[:3])} that is not the bundle's "
            f"template grid {template['id']} (shape {tuple(template['shape'])}). Preprocess "
            f"the cohort with the template the model was trained with (config key template, "
            f"bundle manifest 'template').")


def analysis_window(template_affine: np.ndarray, normalisation: Mapping
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """The 2 mm window the normalisation stage cut from the template grid.

    The split's stats.json stores the blocked grid's affine, which
    :func:`brainage.normalise.analysis_grid` built as ``template_affine @ shift @ block``;
    inverting it gives the window without the template mask.

    Returns
    -------
    start, stop : int arrays [3]
        Template voxel indices of the window (may reach beyond the template: padding).
    factor : int
        Block size (voxels of 2 mm per model voxel).
    """
    from brainage.normalise import TEMPLATE_VOXEL_MM

    factor = int(normalisation["resolution_mm"]) // TEMPLATE_VOXEL_MM
    block = np.diag([factor, factor, factor, 1.0])
    block[:3, 3] = (factor - 1) / 2
    shift = np.linalg.inv(np.asarray(template_affine, float)) @ np.asarray(
        normalisation["affine"], float) @ np.linalg.inv(block)
    start = np.round(shift[:3, 3]).astype(int)
    if not (np.allclose(shift[:3, :3], np.eye(3), atol=1e-4)
            and np.allclose(shift[:3, 3], start, atol=1e-3)):
        raise InputError("the map's grid is not the template grid the model's normalisation "
                         "was computed on (affines do not differ by a whole-voxel shift); "
                         "preprocess the cohort with the bundle's template.")
    return start, start + factor * np.asarray(normalisation["shape"], dtype=int), factor


def normalise_map(data: np.ndarray, affine: np.ndarray, normalisation: Mapping) -> np.ndarray:
    """A registered 2 mm map (kPa) -> the network input, exactly as the normalisation stage.

    Same window (:func:`analysis_window`), same :func:`brainage.normalise.crop_or_pad` and
    :func:`brainage.normalise.block_average`, the TRAINING mean and sd, background exactly
    0, rounded through the split's storage dtype (float16 splits are float16 here too).

    Parameters
    ----------
    data : array [X, Y, Z]
        The map on the template grid (kPa, 0 = no data).
    affine : array [4, 4]
        Its voxel-to-MNI affine (the template's).
    normalisation : mapping
        The bundle's normalisation record (the split's stats.json).

    Returns
    -------
    array [x, y, z] float32 (z-units), the shape of ``normalisation["shape"]``.
    """
    from brainage.normalise import DTYPES, block_average, crop_or_pad

    start, stop, factor = analysis_window(affine, normalisation)
    volume = block_average(crop_or_pad(np.asarray(data), start, stop), factor)
    mean, sd = float(normalisation["mean"]), float(normalisation["sd"])
    storage = DTYPES[normalisation.get("dtype", "float32")]
    return np.where(volume != 0, (volume - mean) / sd, 0.0).astype(storage).astype(np.float32)


def normalise_subject(bundle: ModelBundle, stiffness_path: str | Path, *, subject: str
                      ) -> np.ndarray:
    """A subject's preprocessed map file -> the model's input [x, y, z] (z-units).

    Uses the bundle's TRAINING statistics (:func:`normalise_map`); nothing is estimated
    on the new cohort.

    Raises
    ------
    InputError
        Unreadable or empty map, NaN/inf voxels, or a map off the bundle's template grid.
    """
    from brainage.io import load_nifti_checked

    image = load_nifti_checked(stiffness_path, what=f"subject {subject}: preprocessed map")
    check_template(bundle, image.shape, image.affine,
                   what=f"subject {subject}: preprocessed map {stiffness_path}")
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if not np.all(np.isfinite(data)):
        raise InputError(f"subject {subject}: preprocessed map {stiffness_path} has NaN/inf "
                         f"voxels; rerun its preprocessing.")
    try:
        return normalise_map(data, image.affine, bundle.normalisation)
    except InputError as error:
        raise InputError(f"subject {subject}: preprocessed map {stiffness_path}: {error}") from None


def predict_cohort(bundle_dir: str | Path, dataset_root: str | Path,
                   maps: Mapping[str, str | Path], qc: Mapping[str, str | Path], *,
                   predictions_path: str | Path, summary_path: str | Path,
                   figure_path: str | Path | None = None,
                   provenance_path: str | Path | None = None, cohort: str = "cohort",
                   qc_thresholds: Mapping | None = None, group_column: str | None = None,
                   bias_reference_group: str | None = None,
                   device: str | None = None) -> pd.DataFrame:
    """Predict brain age for every subject of a preprocessed cohort; write the reports.

    Parameters
    ----------
    bundle_dir : path
        Model bundle (``results/models/<name>``); verified before use.
    dataset_root : path
        The cohort's BIDS-like dataset (its participants.tsv gives age, sex, study, group).
    maps : mapping of label to path
        Each subject's preprocessed map (``..._space-MNI152_res-2_desc-preproc_stiffness``,
        kPa, template grid); one per participants.tsv row.
    qc : mapping of label to path
        Each subject's ``sub-<label>_qc.json``. A subject failing QC is listed with status
        ``qc_failed`` and the thresholds it missed, and gets no prediction: a map that is
        misregistered or covers too little of the brain gives a meaningless brain age.
    predictions_path, summary_path, figure_path : path
        ``predictions.tsv`` (one row per subject: the participants.tsv columns, then
        :data:`PREDICTION_COLUMNS`), ``summary.tsv`` (per group, :data:`SUMMARY_COLUMNS`)
        and the gap-by-group figure (optional).
    provenance_path : path, optional
        ``provenance.json``: bundle, its checksums and versions, the bias correction
        and QC thresholds used, the subjects that failed QC; default next to
        ``predictions_path``.
    cohort : str
        Cohort name, for titles and messages.
    qc_thresholds : mapping, optional
        ``min_dice``, ``min_correlation``, ``min_coverage``; default the thresholds the
        training data were checked with (bundle manifest ``preprocessing.qc``).
    group_column : str, optional
        participants.tsv column to summarise by; default ``group`` if present, else
        ``study``.
    bias_reference_group : str, optional
        Refit the age-bias correction on the subjects of this group (a healthy control
        group of the new cohort) instead of using the bundle's training fit.
    device : str, optional
        ``cpu``/``cuda``/``auto``; default the exported cell's ``train.device``.

    Returns
    -------
    pandas.DataFrame
        The predictions table written.

    Raises
    ------
    InputError
        A subject without a preprocessed map or QC file, a map off the template grid.
    BundleError
        Missing, tampered or incompatible bundle.
    """
    from brainage.io import read_participants

    participants = read_participants(dataset_root)
    table_path = Path(dataset_root) / "participants.tsv"
    labels = [pid[len("sub-"):] for pid in participants["participant_id"]]
    group_column = group_column or ("group" if "group" in participants.columns else "study")
    if group_column not in participants.columns:
        raise InputError(f"cohort {cohort}: {table_path} has no column {group_column!r} to "
                         f"summarise by; it has {', '.join(participants.columns)}.")
    clashes = [column for column in PREDICTION_COLUMNS if column in participants.columns]
    if clashes:
        raise InputError(f"cohort {cohort}: {table_path} has column(s) {', '.join(clashes)}, "
                         f"which predictions.tsv adds itself; rename them.")
    for kind, given in (("preprocessed map", maps), ("QC file", qc)):
        missing = [label for label in labels if label not in given]
        if missing:
            raise InputError(f"cohort {cohort}: no {kind} for sub-{', sub-'.join(missing)} "
                             f"listed in {table_path}; run their preprocessing first.")
    model = BrainAgeModel.from_bundle(bundle_dir, device=device)
    log.info("cohort %s: %d subjects, bundle %s (%s/%s seed %s)", cohort, len(labels),
             model.bundle.path, model.bundle.manifest["source"]["experiment"],
             model.bundle.manifest["source"]["variant"], model.bundle.manifest["source"]["seed"])

    if qc_thresholds is None:
        qc_thresholds = (model.bundle.manifest.get("preprocessing") or {}).get("qc") or {}
    missing = [key for key in QC_THRESHOLDS if key not in qc_thresholds]
    if missing:
        raise BundleError(f"model bundle {model.bundle.path} records no QC threshold(s) "
                          f"{', '.join(missing)}; pass qc_thresholds (config section qc).")
    passed, reasons, qc_metrics = [], [], []
    for label in labels:
        ok, reason, metrics = read_qc(qc[label], qc_thresholds)
        passed.append(ok)
        reasons.append(reason)
        qc_metrics.append(metrics)
        if not ok:
            log.warning("cohort %s: sub-%s fails preprocessing QC (%s): reported, not "
                        "predicted", cohort, label, reason)
    passed = np.array(passed, dtype=bool)
    volumes = [normalise_subject(model.bundle, maps[label], subject=f"sub-{label}")
               for label, ok in zip(labels, passed) if ok]
    predicted = np.full(len(labels), np.nan)
    if volumes:
        predicted[passed] = model.predict_age(np.stack(volumes))

    ages = participants["age"].to_numpy(dtype=np.float64)
    table = participants.copy()
    bias = model.bias
    bias_source = (f"bundle: {model.bundle.bias_correction.get('description', '')} "
                   f"({model.bundle.bias_correction.get('n_subjects')} subjects)")
    if bias_reference_group is not None:
        in_group = (table[group_column].astype(str) == str(bias_reference_group)).to_numpy()
        reference = passed & in_group
        bias = fit_age_bias(ages[reference], predicted[reference],
                            where=f"cohort {cohort} group {bias_reference_group!r}")
        bias_source = (f"cohort {cohort} group {bias_reference_group!r} "
                       f"({reference.sum()} subjects)")
    log.info("age-bias correction from %s: gap = %.3f + %.4f * age", bias_source,
             bias.intercept, bias.slope)
    training = model.bundle.manifest.get("training", {})
    table["status"] = np.where(passed, "predicted", "qc_failed")
    table["qc_pass"] = passed
    table["qc_reason"] = reasons
    for column in qc_metrics[0]:
        table[column] = [metrics[column] for metrics in qc_metrics]
    table["predicted_age"] = predicted
    table["gap"] = predicted - ages
    table["corrected_gap"] = bias.corrected_gap(ages, predicted)
    table["corrected_predicted_age"] = ages + table["corrected_gap"]
    table["within_training_ages"] = (ages >= training.get("age_min", -np.inf)) & (
        ages <= training.get("age_max", np.inf))
    table = table[list(participants.columns) + list(PREDICTION_COLUMNS)]

    summary = summarise_gaps(table, group_column)
    write_tsv(predictions_path, table)
    write_tsv(summary_path, summary)
    if figure_path is not None:
        plot_gap_by_group(table, group_column, figure_path,
                          title=f"{cohort}: brain-age gap by {group_column} "
                                f"(model {model.bundle.name})")
    write_json(provenance_path or Path(predictions_path).with_name("provenance.json"), {
        "cohort": cohort, "dataset_root": str(dataset_root),
        "bundle": str(model.bundle.path), "bundle_name": model.bundle.name,
        "bundle_files": model.bundle.manifest["files"],
        "bundle_versions": model.bundle.manifest["versions"],
        "bias_correction": {"intercept": bias.intercept, "slope": bias.slope,
                            "source": bias_source},
        "qc_thresholds": {key: float(qc_thresholds[key]) for key in QC_THRESHOLDS},
        "n_subjects": len(table), "n_predicted": int(passed.sum()),
        "qc_failed": [{"participant_id": pid, "reason": reason}
                      for pid, ok, reason in zip(table["participant_id"], passed, reasons)
                      if not ok]})
    log.info("cohort %s: predicted %d of %d subjects (%d failed QC); mean corrected gap %s",
             cohort, passed.sum(), len(table), (~passed).sum(), ", ".join(
                 f"{row.group} {row.mean_corrected_gap:+.2f} y" for row in summary.itertuples()
                 if row.n_predicted))
    return table


def summarise_gaps(table: pd.DataFrame, group_column: str) -> pd.DataFrame:
    """Per-group brain-age gaps (years): n, mean and sd of raw and corrected gap, and the
    95 % t confidence interval of the mean corrected gap. Groups in order of appearance."""
    from scipy import stats

    rows = []
    for group, members in table.groupby(table[group_column].astype(str), sort=False):
        predicted = members[members["status"] == "predicted"]
        n = len(predicted)
        corrected = predicted["corrected_gap"].to_numpy(dtype=float)
        mean = float(np.mean(corrected)) if n else math.nan
        sd = float(np.std(corrected, ddof=1)) if n > 1 else math.nan
        half_width = (float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)) if n > 1 else math.nan
        rows.append({
            "grouped_by": group_column, "group": group, "n": len(members), "n_predicted": n,
            "n_qc_failed": int((members["status"] == "qc_failed").sum()),
            "age_mean": float(members["age"].mean()),
            "mean_gap": float(predicted["gap"].mean()) if n else math.nan,
            "sd_gap": float(predicted["gap"].std(ddof=1)) if n > 1 else math.nan,
            "mean_corrected_gap": mean, "sd_corrected_gap": sd,
            "corrected_gap_ci95_low": mean - half_width,
            "corrected_gap_ci95_high": mean + half_width})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def plot_gap_by_group(table: pd.DataFrame, group_column: str, path: str | Path, *,
                      title: str = "") -> None:
    """Two panels, raw and age-bias-corrected gap (years) per group: box plot and points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = table[table["status"] == "predicted"]
    groups = list(dict.fromkeys(table[group_column].astype(str)))
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.4 * len(groups), 4.2), sharey=True)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for axis, column, label in ((axes[0], "gap", "brain-age gap (years)"),
                                (axes[1], "corrected_gap", "corrected brain-age gap (years)")):
        values = [predicted.loc[predicted[group_column].astype(str) == group, column]
                  .to_numpy(dtype=float) for group in groups]
        positions = np.arange(1, len(groups) + 1)
        non_empty = [index for index, group_values in enumerate(values) if len(group_values)]
        if non_empty:
            axis.boxplot([values[index] for index in non_empty],
                         positions=positions[non_empty], widths=0.5, showfliers=False)
        for position, group_values in zip(positions, values):
            axis.scatter(position + rng.uniform(-0.12, 0.12, len(group_values)), group_values,
                         s=12, alpha=0.7, zorder=3)
        axis.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        axis.set_xticks(positions)
        axis.set_xticklabels([f"{group}\n(n={len(group_values)})"
                              for group, group_values in zip(groups, values)])
        axis.set_ylabel(label)
    failed = int((table["status"] != "predicted").sum())
    suffix = f"; {failed} subject(s) failed QC, not shown" if failed else ""
    figure.suptitle(f"{title}{suffix}", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=120)
    plt.close(figure)


# -- a cohort without Snakemake ------------------------------------------------------------------

def preprocess_subject(inputs: Mapping[str, str], layout, label: str, *, template_t1: str,
                       template_mask: str, preprocess: Mapping) -> str:
    """One subject through the training cohort's per-subject steps, in-process.

    The same package functions as the rules strip_skull, correct_bias,
    register_to_template and compute_qc, with the same settings (``preprocess``, the
    config section the bundle records); outputs under ``layout`` (a
    :meth:`brainage.paths.Layout.cohort_layout`). Steps whose last output exists are
    skipped, so an interrupted run continues; delete the output folder to start over
    (e.g. after changing the bundle).

    Returns
    -------
    str
        The subject's QC JSON.
    """
    from brainage.preprocess import correct_bias, register_to_template, strip_skull
    from brainage.qc import compute_qc

    # The file names of the rules (workflow/rules/preprocess.smk), so a cohort preprocessed
    # here and one preprocessed by Snakemake look the same.
    native = {"mask": layout.subject_native(label, "brain", "mask"),
              "reference": layout.subject_native(label, "brain", "reference"),
              "reference_info": layout.subject_native(label, "brain", "reference", ".json"),
              "stiffness": layout.subject_native(label, "corrected", "stiffness"),
              "corrected_reference": layout.subject_native(label, "corrected", "reference")}
    registered = {"stiffness": layout.subject_mni(label, "preproc", "stiffness"),
                  "mask": layout.subject_mni(label, "brain", "mask"),
                  "reference": layout.subject_mni(label, "preproc", "reference"),
                  "transform": layout.subject_transform(label)}
    qc_json, qc_png = layout.subject_qc(label, ".json"), layout.subject_qc(label, ".png")
    deterministic = bool(preprocess.get("deterministic", True))
    # as workflow/rules/preprocess.smk: one ITK thread when deterministic
    threads = 1 if deterministic else int(preprocess.get("threads", 1))
    if not Path(native["reference_info"]).is_file():
        strip_skull(inputs["stiffness"], native["mask"], native["reference"],
                    native["reference_info"], anat=inputs.get("anat"),
                    method=preprocess.get("skullstrip", "auto"),
                    freesurfer_tool=preprocess.get("freesurfer_tool", "synthstrip"),
                    threads=threads, subject=label)
    if not Path(native["corrected_reference"]).is_file():
        correct_bias(inputs["stiffness"], native["mask"], native["reference"],
                     native["reference_info"], native["stiffness"],
                     native["corrected_reference"], n4=bool(preprocess.get("n4", True)),
                     max_nan_fraction=float(preprocess.get("max_nan_fraction", 0.01)),
                     threads=threads, deterministic=deterministic, subject=label)
    if not Path(registered["reference"]).is_file():
        register_to_template(native["stiffness"], native["mask"], native["corrected_reference"],
                             native["reference_info"], template_t1, template_mask,
                             registered["stiffness"], registered["mask"],
                             registered["transform"], registered["reference"],
                             deterministic=deterministic, threads=threads, subject=label)
    if not Path(qc_json).is_file():
        compute_qc(registered["stiffness"], registered["mask"], registered["reference"],
                   native["reference_info"], template_t1, template_mask, qc_json, qc_png,
                   subject=label)
    return qc_json


def run_cohort(bundle_dir: str | Path, dataset_root: str | Path, output: str | Path, *,
               cohort: str | None = None, group_column: str | None = None,
               bias_reference_group: str | None = None, template_t1: str | None = None,
               template_mask: str | None = None, device: str | None = None,
               threads: int | None = None) -> pd.DataFrame:
    """Preprocess a BIDS-like dataset as the bundle's training data were, then predict.

    What ``python -m brainage.predict run`` does, for a lab with a bundle and no
    Snakemake: the template is rebuilt (nilearn's MNI152, or the given files when the
    bundle's template was a file) and checked against the bundle's template id; each
    subject runs through :func:`preprocess_subject` with the bundle's preprocessing
    settings; then :func:`predict_cohort`. Outputs under ``output``: ``template/``,
    ``preproc/sub-<label>/``, ``predictions.tsv``, ``summary.tsv``, ``gap_by_group.png``,
    ``provenance.json``.
    """
    from brainage.io import read_participants, subject_inputs
    from brainage.paths import Layout
    from brainage.preprocess import prepare_template

    bundle = read_bundle(bundle_dir)
    output = Path(output)
    cohort = cohort or output.name
    layout = Layout(str(output), str(output / "logs"), str(output / "benchmarks"),
                    resources=str(output))
    recorded = bundle.manifest.get("preprocessing") or {}
    preprocess = dict(recorded.get("preprocess") or {})
    if threads is not None:
        preprocess["threads"] = threads
    template_config = recorded.get("template") or {"source": "nilearn"}
    source = template_config.get("source", "nilearn")
    if source == "file" and not (template_t1 and template_mask):
        raise InputError(
            f"model bundle {bundle.path} was trained with a template from files "
            f"({template_config.get('t1')}, {template_config.get('mask')}); pass the same "
            f"files with --template-t1 and --template-mask.")
    t1_path, mask_path = layout.template("T1w"), layout.template("brain_mask")
    prepare_template(t1_path, mask_path, source=source, t1=template_t1, mask=template_mask)
    rebuilt = template_record(t1_path, mask_path, source=source)
    expected = bundle.manifest.get("template") or {}
    if expected and rebuilt["mask_voxels_sha256"] != expected["mask_voxels_sha256"]:
        raise InputError(
            f"the template rebuilt here ({rebuilt['id']}, {rebuilt['n_brain_voxels']} brain "
            f"voxels) differs from the one model bundle {bundle.path} was trained with "
            f"({expected['id']}, {expected['n_brain_voxels']} brain voxels). Use the same "
            f"template files (--template-t1/--template-mask) or the same nilearn version.")

    participants = read_participants(dataset_root)
    labels = [pid[len("sub-"):] for pid in participants["participant_id"]]
    maps, qc = {}, {}
    for number, label in enumerate(labels, start=1):
        log.info("cohort %s: preprocessing sub-%s (%d of %d)", cohort, label, number,
                 len(labels))
        qc[label] = preprocess_subject(subject_inputs(dataset_root, label), layout, label,
                                       template_t1=t1_path, template_mask=mask_path,
                                       preprocess=preprocess)
        maps[label] = layout.subject_mni(label, "preproc", "stiffness")
    return predict_cohort(bundle, dataset_root, maps, qc,
                          predictions_path=output / "predictions.tsv",
                          summary_path=output / "summary.tsv",
                          figure_path=output / "gap_by_group.png", cohort=cohort,
                          group_column=group_column,
                          bias_reference_group=bias_reference_group, device=device)


def simulate_new_cohort(root: str | Path, **options) -> pd.DataFrame:
    """The demo's new cohort (rule simulate_predict_cohort): :func:`brainage.simulate.
    simulate_cohort` into ``root``, replacing an earlier simulation there.

    ``root`` may hold empty folders (Snakemake creates the declared outputs' folders) or a
    previous simulation, nothing else: a user's real dataset at that path is never
    overwritten.

    Parameters
    ----------
    root : path
        The cohort's dataset root (``predict.cohorts.<predict.simulate.cohort>``).
    **options
        ``n_subjects``, ``seed``, ``id_prefix``, ``accelerated_group_n``,
        ``accelerated_ageing_years`` (config section ``predict.simulate``).

    Returns
    -------
    pandas.DataFrame
        The simulation's ground truth table.

    Raises
    ------
    FileExistsError
        ``root`` holds files that are not a brainage simulation.
    """
    from brainage.simulate import simulate_cohort

    root = Path(root)
    description = root / "dataset_description.json"
    ours = description.is_file() and "brainage.simulate" in description.read_text()
    foreign = [path for path in root.rglob("*") if path.is_file()] if root.is_dir() else []
    if foreign and not ours:
        raise FileExistsError(
            f"{root} holds files not written by the simulator (e.g. {foreign[0]}); refusing to "
            f"overwrite them. Point predict.cohorts.<cohort> of the simulated cohort "
            f"(predict.simulate.cohort) at an empty folder, or set predict.simulate.enabled: "
            f"false to predict that dataset as it is.")
    truth = simulate_cohort(root, overwrite=True, **options)
    log.info("simulated the new cohort %s: %d subjects (%s)", root, len(truth),
             ", ".join(f"{key} {value}" for key, value in sorted(options.items())))
    return truth


# -- configuration-driven entry points --------------------------------------------------------

def exported_cell(config: Mapping) -> tuple[str, str, int]:
    """(experiment, variant, seed) of the grid cell ``predict.model`` exports.

    Raises
    ------
    ConfigError
        When no enabled experiment trains that cell.
    """
    from brainage.config import ConfigError, grid_cells

    model = config["predict"]["model"]
    cell = (model["experiment"], model["variant"], int(model["seed"]))
    if cell not in grid_cells(config):
        raise ConfigError(
            f"config key predict.model names the grid cell {cell[0]}/{cell[1]}/seed {cell[2]}, "
            f"which no enabled experiment trains. Choose one of: "
            f"{', '.join(f'{e}/{v}/seed {s}' for e, v, s in grid_cells(config)) or 'none'}.")
    return cell


def first_split_name(config: Mapping) -> str:
    """The first split of the scheme: ``holdout``, ``fold1`` or the first study's ``loso``."""
    scheme = config["split"]["scheme"]
    if scheme == "holdout":
        return "holdout"
    if scheme == "kfold":
        return "fold1"
    from brainage.io import read_participants
    from brainage.normalise import split_names

    return split_names(read_participants(config["dataset"]["root"]), **config["split"])[0]


def export_from_config(config: Mapping, *, tolerance_years: float | None = None) -> dict:
    """Export the cell ``predict.model`` of a validated config (outputs of a finished run)."""
    from brainage.config import cell_settings, encoder_owners
    from brainage.paths import Layout

    layout = Layout.from_config(config)
    experiment, variant, seed = exported_cell(config)
    trained_in = encoder_owners(config)[(experiment, variant, seed)]
    split = first_split_name(config)
    name = config["predict"]["model"]["name"]
    return export_model(
        layout.split_dir(split), layout.cell_file(split, *trained_in, "encoder.pt"),
        cell_settings(config, experiment, variant, seed),
        bundle_dir=layout.model_bundle(name), name=name,
        predictions_path=layout.cell_file(split, experiment, variant, seed, "predictions.tsv"),
        metrics_path=layout.cell_file(split, experiment, variant, seed, "metrics.json"),
        template_t1=layout.template("T1w"), template_mask=layout.template("brain_mask"),
        preprocessing=preprocessing_record(config),
        bias_fit=config["predict"].get("bias_fit", "training"), tolerance_years=tolerance_years)


def preprocessing_record(config: Mapping) -> dict:
    """How the training maps were preprocessed; a new cohort must match (stored in the
    bundle, used by ``python -m brainage.predict run``)."""
    return {"preprocess": dict(config["preprocess"]), "qc": dict(config["qc"]),
            "template": dict(config["template"])}


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m brainage.predict",
        description="Brain age for new subjects: export a trained grid cell as a model "
                    "bundle, or apply a bundle to a BIDS-like dataset.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="export the grid cell of config key predict.model to "
                       "results/models/<predict.model.name>/ (after `snakemake` trained it)")
    export.add_argument("--configfile", nargs="+", default=["config/config.yaml"],
                        help="config file(s), later ones override earlier ones")
    export.add_argument("--tolerance-years", type=float, default=None,
                        help="allowed difference to the cell's predictions.tsv (years; "
                             "default 0.01 on the CPU, 0.25 on CUDA)")
    run = commands.add_parser(
        "run", help="preprocess a BIDS-like dataset as the bundle's training data were, "
                    "and predict brain age")
    run.add_argument("--bundle", required=True,
                     help="model bundle folder (results/models/<name>)")
    run.add_argument("--dataset", required=True,
                     help="BIDS-like root: participants.tsv, sub-*/mre/sub-*_stiffness.nii.gz")
    run.add_argument("--output", required=True, help="output folder (predictions.tsv, "
                                                     "summary.tsv, gap_by_group.png, preproc/)")
    run.add_argument("--cohort", default=None, help="cohort name (default: the output "
                                                    "folder's name)")
    run.add_argument("--group-column", default=None,
                     help="participants.tsv column to summarise by (default group, else study)")
    run.add_argument("--bias-reference-group", default=None,
                     help="refit the age-bias correction on this group of the cohort (e.g. "
                          "healthy) instead of the bundle's training fit")
    run.add_argument("--template-t1", default=None,
                     help="template T1 (2 mm) when the bundle's template is not nilearn's")
    run.add_argument("--template-mask", default=None, help="its brain mask")
    run.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    run.add_argument("--threads", type=int, default=None,
                     help="threads per preprocessing step when the bundle's preprocessing "
                          "is not deterministic (default: its preprocess.threads)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m brainage.predict {export,run} ...`` (also ``brainage-predict``)."""
    from brainage.logs import log_to_file

    arguments = _parse_arguments(argv)
    log_to_file(None)
    if arguments.command == "export":
        from brainage.config import load_config

        manifest = export_from_config(load_config(*arguments.configfile),
                                      tolerance_years=arguments.tolerance_years)
        log.info("exported model bundle %s", manifest["name"])
        return 0
    output = Path(arguments.output)
    run_cohort(arguments.bundle, arguments.dataset, output,
               cohort=arguments.cohort or output.name, group_column=arguments.group_column,
               bias_reference_group=arguments.bias_reference_group,
               template_t1=arguments.template_t1, template_mask=arguments.template_mask,
               device=arguments.device, threads=arguments.threads)
    return 0


if __name__ == "__main__":
    # Run the package module's main, not this __main__ copy, so loggers are named
    # brainage.predict (log files and level settings address the package).
    from brainage.predict import main as package_main

    raise SystemExit(package_main())
