"""Age-bias correction of the brain-age gap (docs/method.md, "Brain age for new subjects").

Brain-age predictions regress to the training mean: the gap (predicted - chronological
age) falls with age. The usual linear correction fits ``gap = a + b * age`` on a
reference set and reports ``corrected_gap = gap - (a + b * age)``.

``evaluate_encoder`` computes the candidate fits once, from what it has in hand (the
frozen training and test embeddings and the fitted read-out), and saves them with the
read-out (:func:`bias_fits`); the model export picks the one config key
``predict.bias_fit`` names (:func:`select_bias_correction`):

``training`` (default)
    The training subjects, but on out-of-fold predictions: a K-fold cross-validation
    (``readout.cv_folds`` folds, shuffled with the cell's seed) refits the whole read-out
    (its alpha search included) on K-1 folds and predicts the held-out fold. In-sample
    training predictions fit their own ages too well (a flatter gap-age slope than on
    unseen subjects), so a correction fitted on them would under-correct every new
    subject. What cross-validating the read-out cannot undo: the encoder was trained on
    these subjects too.
``test``
    The split's held-out test subjects: unseen by encoder and read-out, but only ~20 % of
    the cohort.

A third reference, a healthy group of the new cohort itself, is fitted when a cohort is
predicted (``predict.bias_reference_group``); it also absorbs a site offset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from brainage.inputs import MIN_BIAS_SUBJECTS
from brainage.readout import fit_readout

log = logging.getLogger(__name__)

#: Reference sets of the bundle's correction (config key predict.bias_fit).
BIAS_FIT_SETS = ("training", "test")
FORMULA = "corrected_gap = (predicted_age - age) - (intercept + slope * age)"
DESCRIPTIONS = {
    "training": "out-of-fold predictions of the training subjects (K-fold CV of the whole "
                "read-out on the frozen training embeddings)",
    "test": "the held-out test subjects of the split",
}


@dataclass(frozen=True)
class AgeBias:
    """Linear age bias of the brain-age gap: ``gap = intercept + slope * age``.

    Attributes
    ----------
    intercept : float
        a (years).
    slope : float
        b (years of gap per year of age; negative for the usual regression to the mean).
    n_subjects, age_mean, age_sxx, residual_variance : optional
        The fit's reference set: its size, mean age (years), sum of squared age deviations
        (years²) and the residual variance of its gaps (years², n - 2 degrees of freedom);
        what :meth:`line_variance` needs. None for a line recorded without them (a bundle
        exported from an evaluation before they were saved).
    """

    intercept: float
    slope: float
    n_subjects: int | None = None
    age_mean: float | None = None
    age_sxx: float | None = None
    residual_variance: float | None = None

    @classmethod
    def from_record(cls, record: Mapping) -> "AgeBias":
        """The line of a saved record (:func:`bias_fits`, a bundle's ``bias_correction``)."""
        optional = {key: record.get(key) for key in ("age_mean", "age_sxx",
                                                     "residual_variance")}
        return cls(float(record["intercept"]), float(record["slope"]),
                   n_subjects=record.get("n_subjects"),
                   **{key: None if value is None else float(value)
                      for key, value in optional.items()})

    @property
    def has_reference_statistics(self) -> bool:
        """Whether the line was saved with what :meth:`line_variance` needs."""
        return None not in (self.n_subjects, self.age_mean, self.age_sxx,
                            self.residual_variance)

    def line_variance(self, age: float) -> float:
        """Variance (years²) of the fitted line's value at ``age``: what a group's mean
        corrected gap inherits from the reference set's sampling, shared by all its
        members; NaN when the record lacks the reference set's statistics."""
        if not self.has_reference_statistics or not self.age_sxx or self.n_subjects < 3:
            return float("nan")
        return self.residual_variance * (1 / self.n_subjects
                                         + (age - self.age_mean) ** 2 / self.age_sxx)

    def __str__(self) -> str:
        """The line as a reader writes it: ``gap = 2.920 - 0.0821 * age`` (not ``+ -``)."""
        sign = "-" if self.slope < 0 else "+"
        return f"gap = {self.intercept:.3f} {sign} {abs(self.slope):.4f} * age"

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
        Fewer than :data:`MIN_BIAS_SUBJECTS` subjects, or all of one age (the slope is
        undefined).
    """
    ages = np.asarray(ages, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    finite = np.isfinite(ages) & np.isfinite(predicted)
    ages, predicted = ages[finite], predicted[finite]
    if len(ages) < MIN_BIAS_SUBJECTS:
        raise ValueError(f"age-bias correction on the {where} needs at least "
                         f"{MIN_BIAS_SUBJECTS} subjects with a prediction; got {len(ages)}.")
    if np.ptp(ages) == 0:
        raise ValueError(f"age-bias correction on the {where}: every subject is "
                         f"{ages[0]} years old, so the gap's age slope is undefined.")
    slope, intercept = np.polyfit(ages, predicted - ages, 1)
    residuals = predicted - ages - (intercept + slope * ages)
    return AgeBias(intercept=float(intercept), slope=float(slope), n_subjects=len(ages),
                   age_mean=float(ages.mean()),
                   age_sxx=float(np.sum((ages - ages.mean()) ** 2)),
                   residual_variance=float(np.sum(residuals ** 2) / (len(ages) - 2))
                   if len(ages) > 2 else None)


def out_of_fold_predictions(features: np.ndarray, ages: np.ndarray, readout_settings: Mapping,
                            *, folds: int, seed: int, studies=None) -> np.ndarray:
    """Predicted ages of every training subject from a read-out that never saw it.

    K-fold (shuffled with ``seed``); in each fold the whole read-out (alpha search
    included) is refitted with :func:`brainage.readout.fit_readout` on the other folds.

    Parameters
    ----------
    features : array [n, D]
        Frozen training embeddings.
    ages : array [n]
        Their ages (years).
    studies : array [n], optional
        Their studies (the study-mean read-out needs them).

    Returns
    -------
    array [n]
        Out-of-fold predicted ages (years), float64.
    """
    from sklearn.model_selection import KFold

    ages = np.asarray(ages, dtype=np.float64)
    folds = min(int(folds), len(ages))
    if folds < 2:
        raise ValueError(f"cross-validated bias correction needs at least 2 training subjects; "
                         f"got {len(ages)}.")
    predicted = np.full(len(ages), np.nan)
    splitter = KFold(n_splits=folds, shuffle=True, random_state=int(seed))
    studies = None if studies is None else np.asarray(studies)
    # the read-out's own lines below are the refits, not the read-out the MAE used
    log.info("out-of-fold predictions of the training subjects for the age-bias fit: the "
             "read-out refitted in each of %d folds", folds)
    for fit_rows, held_out in splitter.split(features):
        readout = fit_readout(features[fit_rows], ages[fit_rows], readout_settings, seed=seed,
                              studies=None if studies is None else studies[fit_rows],
                              warn=False)
        # as they are: predict converts what it reads, in column chunks for voxels
        predicted[held_out] = readout.predict(features[held_out],
                                              None if studies is None else studies[held_out])
    return predicted


#: Fewest subjects whose correlation with age (and a cell's gap-age slope) is reported:
#: two points give r = ±1 and an exact line.
MIN_CORRELATION_SUBJECTS = 3


def gap_age_correlation(ages: np.ndarray, gaps: np.ndarray) -> float | None:
    """Pearson r of a gap with age; None when undefined (fewer than 3 subjects, or ages or
    gaps all equal: tested exactly, as np.std of equal values can be 7e-15, not 0)."""
    ages, gaps = np.asarray(ages, float), np.asarray(gaps, float)
    keep = np.isfinite(ages) & np.isfinite(gaps)
    if (keep.sum() < MIN_CORRELATION_SUBJECTS or np.ptp(ages[keep]) == 0
            or np.ptp(gaps[keep]) == 0):
        return None
    return float(np.corrcoef(ages[keep], gaps[keep])[0, 1])


def bias_fits(train_features: np.ndarray, train_ages: np.ndarray,
              train_predicted: np.ndarray, *, test_ages: np.ndarray,
              test_predicted: np.ndarray, readout_settings: Mapping, seed: int,
              where: str, train_studies=None) -> dict:
    """Every candidate age-bias correction of a cell, as saved with its read-out.

    Parameters
    ----------
    train_features : array [n, D]
        Frozen training embeddings (the out-of-fold fit refits the read-out on them).
    train_ages, train_predicted : array [n]
        Training ages and the fitted read-out's in-sample predictions (years).
    test_ages, test_predicted : array [m]
        The split's test subjects (years).
    readout_settings : mapping
        The resolved ``readout`` section.
    seed : int
        Shuffles the out-of-fold folds (the cell's seed).
    where : str
        Names the split in messages.
    train_studies : array [n], optional
        The training subjects' studies (the study-mean read-out's out-of-fold refits).

    Returns
    -------
    dict
        ``{"training": record, "test": record}``; a record is ``{"intercept", "slope",
        "fitted_on", "formula", "description", "n_subjects", "age_mean", "age_sxx",
        "residual_variance" (:class:`AgeBias`), "cv_folds", "cv_seed",
        "gap_age_r_before", "gap_age_r_after", "gap_age_r_after_on_other", "oof_mae",
        "other_fits"}``, or
        ``{"error": message}`` when that reference set cannot be fitted (too few
        subjects, one age only). ``gap_age_r_after`` is r(corrected gap, age) on the
        subjects the line was fitted on: about 0 by construction, a check of the fit.
        ``gap_age_r_after_on_other`` is the same on the other reference set (the test
        subjects for the training fit, the training subjects' out-of-fold predictions for
        the test fit): whether the correction carries over to subjects it did not see.
    """
    folds = min(int(readout_settings["cv_folds"]), len(train_ages))
    errors = {}
    try:
        oof = out_of_fold_predictions(train_features, train_ages, readout_settings,
                                      folds=folds, seed=seed, studies=train_studies)
    except ValueError as error:
        # too few training subjects for a fold's own read-out (2 gave folds of one subject);
        # the test subjects' fit does not need them
        oof = np.full(len(train_ages), np.nan)
        errors["training"] = (f"age-bias correction on the training subjects of {where}: "
                              f"the out-of-fold read-outs could not be fitted ({error})")
    references = {"training": (train_ages, oof), "test": (test_ages, test_predicted)}
    fits = {}
    for name, (ages, predicted) in {**references,
                                    "training_in_sample": (train_ages, train_predicted)}.items():
        subjects = "test subjects" if name == "test" else "training subjects"
        if name in errors:
            continue
        try:
            fits[name] = fit_age_bias(ages, predicted, where=f"{subjects} of {where}")
        except ValueError as error:
            errors[name] = str(error)
    oof_mae = float(np.mean(np.abs(oof - train_ages))) if np.isfinite(oof).all() else None
    records = {}
    for name, (ages, predicted) in references.items():
        if name not in fits:
            records[name] = {"error": errors[name]}
            continue
        bias = fits[name]
        corrected = bias.corrected_gap(ages, predicted)
        other_ages, other_predicted = next(pair for other, pair in references.items()
                                           if other != name)
        records[name] = {
            "intercept": bias.intercept, "slope": bias.slope, "fitted_on": name,
            "formula": FORMULA, "description": DESCRIPTIONS[name],
            "n_subjects": bias.n_subjects,
            # what a group's interval needs of the line's own uncertainty (line_variance)
            "age_mean": bias.age_mean, "age_sxx": bias.age_sxx,
            "residual_variance": bias.residual_variance,
            # the out-of-fold refits' settings; none when they could not be fitted
            "cv_folds": folds if oof_mae is not None else None, "cv_seed": int(seed),
            "gap_age_r_before": gap_age_correlation(ages, predicted - ages),
            "gap_age_r_after": gap_age_correlation(ages, corrected),
            "gap_age_r_after_on_other": gap_age_correlation(
                other_ages, bias.corrected_gap(other_ages, other_predicted)),
            "oof_mae": oof_mae,
            "other_fits": {other: {"intercept": fit.intercept, "slope": fit.slope}
                           for other, fit in fits.items() if other != name},
        }
    return records


#: A line fitted on the training subjects that turns the held-out test subjects' gap-age
#: correlation to this or more, against the sign it had on the fit's subjects, overcorrects
#: new subjects (a pilot's 29 training subjects: -0.72 before, +0.74 after on the test
#: subjects; a 21-year-old's corrected brain age was 1.5 years).
OVERCORRECTION_R = 0.5


def overcorrects(record: Mapping, n_other: int | None) -> bool:
    """Whether a training bias record's line (:func:`bias_fits`) reverses the gap-age
    correlation of the held-out test subjects (``n_other``) by :data:`OVERCORRECTION_R` or
    more, and significantly there (Fisher's z, two-sided 5 %): of 8 test subjects, a line
    that carries over reversed it by 0.5 in 11 % of simulated exports by chance alone. A
    test record's other set is the training subjects, in-sample: never."""
    before, after = record.get("gap_age_r_before"), record.get("gap_age_r_after_on_other")
    if (record.get("fitted_on") != "training" or before is None or after is None
            or not n_other or n_other < 4 or abs(after) >= 1):
        return False
    return bool(abs(after) >= OVERCORRECTION_R and np.sign(after) == -np.sign(before)
                and abs(np.arctanh(after)) * np.sqrt(n_other - 3) >= 1.96)


def select_bias_correction(fits: Mapping, fit_on: str, *, n_test: int | None = None) -> dict:
    """The record of ``fit_on`` (config key ``predict.bias_fit``) among :func:`bias_fits`.

    ``n_test``: the cell's test subjects, for the overcorrection warning (:func:`overcorrects`).

    Raises
    ------
    ValueError
        Unknown reference set, or one that could not be fitted, naming the config key.
    """
    if fit_on not in BIAS_FIT_SETS:
        raise ValueError(f"config key predict.bias_fit is {fit_on!r}; choose one of "
                         f"{', '.join(BIAS_FIT_SETS)}.")
    record = fits[fit_on]
    if "error" in record:
        other = next(name for name in BIAS_FIT_SETS if name != fit_on)
        raise ValueError(f"{record['error']} Use config key predict.bias_fit: {other}.")
    log.info("age bias fitted on %s: %s; r(gap, age) %.3f before, "
             "%.1e after (on the subjects of the fit), %.3f after on the %s subjects",
             record["description"], AgeBias(record["intercept"], record["slope"]),
             record["gap_age_r_before"] or float("nan"), record["gap_age_r_after"] or 0.0,
             record.get("gap_age_r_after_on_other") or float("nan"),
             "test" if fit_on == "training" else "training")
    if overcorrects(record, n_test):
        log.warning(
            "the age-bias line (fitted on %s, %s subjects) overcorrects the held-out test "
            "subjects: the correlation of their gap with age is %+.2f after it, against "
            "%+.2f before on the fit's subjects (a line that carries over leaves about 0), "
            "so new subjects' corrected gaps and ages carry it. Report the uncorrected gaps "
            "beside them, refit on a cohort's own controls (predict.bias_reference_group), or "
            "export with predict.bias_fit: test.", record["description"],
            record.get("n_subjects"), record["gap_age_r_after_on_other"],
            record["gap_age_r_before"])
    return dict(record)
