"""Demographics of the simulated cohort: the paper's Table 2, scaled down.

Ages per study follow a (mixture of) normal distribution(s) truncated to 18-90 years and
calibrated so the truncated distribution has exactly Table 2's mean and sd; sexes follow
Table 2's F:M shares. An optional accelerated-ageing group (study ``patients``) is added
for the prediction demo.
"""

from __future__ import annotations

import math
import numbers
import zlib
from functools import lru_cache, partial
from typing import Callable

import numpy as np
import pandas as pd

#: Paper Table 2: study, n, age mean (years), age sd (years), n female, n male.
STUDY_TABLE = (
    ("study1", 134, 23.4, 4.0, 78, 56),
    ("study2", 60, 37.8, 20.9, 34, 26),
    ("study3", 12, 69.4, 2.4, 6, 6),
    ("study4", 68, 69.3, 5.8, 49, 19),
    ("study5", 37, 49.1, 16.6, 16, 21),
)
#: Study name of the optional accelerated-ageing group.
ACCELERATED_STUDY = "patients"
AGE_LIMITS_YEARS = (18.0, 90.0)
MIN_SUBJECTS_PER_STUDY = 2

# Study 2's sd (20.9 years) exceeds its distance from the 18-year floor (19.8 years), so
# no single truncated normal has its moments: it recruited a young and an old group.
# Study 2 is a young component N(24, 4) plus an old one N(b, 6) of weight w; the other
# studies are one normal N(m, s). _calibrated_age_mixture solves for (w, b) or (m, s) so
# that the mixture truncated to 18-90 years has exactly Table 2's mean and sd.
_STUDY2_YOUNG = (24.0, 4.0)
_STUDY2_OLD_SD = 6.0
# The accelerated group: middle-aged to older adults, 50:50 sex (not in the paper).
_ACCELERATED_AGE = ((1.0, 62.0, 8.0),)

_STUDY_CODES = {"study1": "st1", "study2": "st2", "study3": "st3", "study4": "st4",
                "study5": "st5", ACCELERATED_STUDY: "pat"}


def study_table() -> pd.DataFrame:
    """Paper Table 2 as a DataFrame.

    Returns
    -------
    pandas.DataFrame
        Columns ``study`` (str), ``n``, ``age_mean`` (years), ``age_sd`` (years),
        ``n_female``, ``n_male``; one row per study, 311 subjects in all.
    """
    return pd.DataFrame(list(STUDY_TABLE),
                        columns=["study", "n", "age_mean", "age_sd", "n_female", "n_male"])


class OptionError(ValueError):
    """An option out of its range. The message names each option as a Python caller (or
    the config, whose keys are the same) writes it, ``n_subjects=5``; :meth:`spelled`
    writes it otherwise, e.g. as the command line's flag, ``--n-subjects 5``.

    ``template`` is a :meth:`str.format` string whose fields are the keywords of
    ``options``, each an ``(option name, value)`` pair.
    """

    def __init__(self, template: str, **options: tuple[str, object]):
        self.template, self.options = template, options
        super().__init__(self.spelled(lambda name, value: f"{name}={value!r}"))

    def spelled(self, spell: Callable[[str, object], str]) -> str:
        """The message with each option written as ``spell(name, value)``."""
        return self.template.format_map({field: spell(name, value)
                                          for field, (name, value) in self.options.items()})

    def __reduce__(self):  # pickled with its options, not as the message alone
        return partial(type(self), self.template, **self.options), ()


def _scaled_study_sizes(n_subjects: int) -> dict[str, int]:
    """Split ``n_subjects`` over the studies in Table 2's proportions, each at least 2."""
    minimum_total = MIN_SUBJECTS_PER_STUDY * len(STUDY_TABLE)
    if n_subjects < minimum_total:
        raise OptionError(f"{{given}} is too small: each of the {len(STUDY_TABLE)} studies "
                          f"needs at least {MIN_SUBJECTS_PER_STUDY} subjects; use at least "
                          f"{minimum_total}.", given=("n_subjects", n_subjects))
    paper_sizes = np.array([row[1] for row in STUDY_TABLE], dtype=float)
    exact = n_subjects * paper_sizes / paper_sizes.sum()
    sizes = np.maximum(np.floor(exact).astype(int), MIN_SUBJECTS_PER_STUDY)
    # Largest remainder first when adding; when the floor of 2 overshot, take from the
    # study furthest above its exact share.
    while sizes.sum() < n_subjects:
        sizes[np.argmax(exact - sizes)] += 1
    while sizes.sum() > n_subjects:
        candidates = np.where(sizes > MIN_SUBJECTS_PER_STUDY, sizes - exact, -np.inf)
        sizes[np.argmax(candidates)] -= 1
    return {row[0]: int(size) for row, size in zip(STUDY_TABLE, sizes)}


def _mixture_cdf(components, ages: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    density = sum(weight * norm.pdf(ages, mean, sd) for weight, mean, sd in components)
    cdf = np.cumsum(density)
    return cdf / cdf[-1]


def _truncated_moments(components, ages: np.ndarray) -> tuple[float, float]:
    cdf = _mixture_cdf(components, ages)
    weights = np.diff(cdf, prepend=0.0)
    mean = float(np.sum(weights * ages))
    return mean, float(np.sqrt(np.sum(weights * (ages - mean) ** 2)))


@lru_cache(maxsize=None)
def _calibrated_age_mixture(study: str) -> tuple[tuple[float, float, float], ...]:
    """(weight, mean, sd) components whose truncation to 18-90 years matches Table 2."""
    from scipy.optimize import fsolve

    if study == ACCELERATED_STUDY:
        return _ACCELERATED_AGE
    _, _, target_mean, target_sd, _, _ = next(row for row in STUDY_TABLE if row[0] == study)
    if study == "study2":
        def components(parameters):
            old_weight, old_mean = parameters
            return ((1.0 - old_weight, *_STUDY2_YOUNG), (old_weight, old_mean, _STUDY2_OLD_SD))
        start = (0.3, 68.0)
    else:
        def components(parameters):
            return ((1.0, parameters[0], abs(parameters[1])),)
        start = (target_mean, target_sd)
    ages = np.arange(*AGE_LIMITS_YEARS, 0.01)

    def residual(parameters):
        mean, sd = _truncated_moments(components(parameters), ages)
        return (mean - target_mean, sd - target_sd)

    solution, _, converged, message = fsolve(residual, start, full_output=True)
    if converged != 1:
        raise RuntimeError(f"age distribution of {study} did not calibrate: {message}")
    return tuple(tuple(float(value) for value in component)
                 for component in components(solution))


def _sample_ages(rng: np.random.Generator, study: str, n: int) -> np.ndarray:
    """Stratified inverse-CDF draws, so even 2-4 subjects follow the study's shape.

    Each subject takes a random quantile from the middle half of its own 1/n stratum;
    a plain random draw would let 2 subjects land both in one tail.
    """
    ages = np.arange(*AGE_LIMITS_YEARS, 0.01)
    cdf = _mixture_cdf(_calibrated_age_mixture(study), ages)
    quantiles = (np.arange(n) + rng.uniform(0.25, 0.75, size=n)) / n
    drawn = np.interp(quantiles, cdf, ages)
    return np.round(rng.permutation(np.clip(drawn, *AGE_LIMITS_YEARS)), 1)


def _check_prefix(id_prefix: str) -> str:
    if not isinstance(id_prefix, str) or (id_prefix and not id_prefix.isalnum()) \
            or not id_prefix.isascii():
        raise OptionError("{given} must be letters and digits only (BIDS labels), e.g. "
                          "{example}.", given=("id_prefix", id_prefix),
                          example=("id_prefix", "new"))
    return id_prefix


def check_whole_number(name: str, value, minimum: int | None = 0) -> int:
    """``value`` as an ``int`` if it is a whole number (``3`` or ``3.0``) >= ``minimum``
    (``None``: any); otherwise a ValueError naming the option ``name``. A fraction is
    refused rather than truncated: ``seed=1.9`` would silently be seed 1."""
    whole = not isinstance(value, bool) and (
        isinstance(value, numbers.Integral)
        or (isinstance(value, numbers.Real) and float(value).is_integer()))
    if not whole or (minimum is not None and int(value) < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise OptionError(f"{{given}} must be a whole number{bound}.", given=(name, value))
    return int(value)


def check_years(name: str, value) -> float:
    """``value`` as a ``float`` if it is a finite number of years; otherwise a ValueError
    naming the option ``name`` (a NaN offset would make every map of its group NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise OptionError("{given} must be a finite number of years, e.g. 8.0.",
                          given=(name, value))
    return float(value)


def seed_sequence(seed: int, id_prefix: str, *stream: int) -> np.random.SeedSequence:
    """The random stream of a cohort (seed, id prefix) and a sub-stream (e.g. a subject)."""
    # The prefix enters the seed so a "new cohort" differs even at the same seed.
    return np.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(id_prefix.encode()),
                                                        *stream))


def draw_participants(n_subjects: int = 60, *, seed: int = 0, accelerated_group_n: int = 0,
                      accelerated_ageing_years: float = 8.0,
                      id_prefix: str = "") -> pd.DataFrame:
    """Draw the cohort's demographics (no images).

    Parameters
    ----------
    n_subjects : int
        Healthy subjects, split over the 5 studies in Table 2's proportions (each study
        at least 2, so at least 10).
    seed : int
        Random seed (>= 0); the same seed and prefix give the same table.
    accelerated_group_n : int
        Extra subjects (>= 0) in study ``"patients"``, ``group == "accelerated"``.
    accelerated_ageing_years : float
        Years added to the accelerated group's age for its MRE maps (not its anatomy);
        any finite number.
    id_prefix : str
        Letters and digits prepended to every label (``sub-<prefix>st1s001``), for a
        second, independent cohort.

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``age`` (years, 1 decimal, 18-90), ``sex`` (``F``/``M``),
        ``study``, ``group`` (``healthy``/``accelerated``), ``stiffness_age_offset_years``.

    Raises
    ------
    ValueError
        An option out of its range, naming it (before anything is drawn).
    """
    _check_prefix(id_prefix)
    n_subjects = check_whole_number("n_subjects", n_subjects, minimum=None)  # >= 10 below
    seed = check_whole_number("seed", seed)
    accelerated_group_n = check_whole_number("accelerated_group_n", accelerated_group_n)
    accelerated_ageing_years = check_years("accelerated_ageing_years",
                                           accelerated_ageing_years)
    rng = np.random.default_rng(seed_sequence(seed, id_prefix, 0))
    sizes = _scaled_study_sizes(n_subjects)
    female_share = {row[0]: row[4] / row[1] for row in STUDY_TABLE}
    if accelerated_group_n:
        sizes[ACCELERATED_STUDY] = int(accelerated_group_n)
        female_share[ACCELERATED_STUDY] = 0.5
    rows = []
    for study, size in sizes.items():
        ages = _sample_ages(rng, study, size)
        n_female = int(np.floor(size * female_share[study] + rng.uniform()))
        sexes = rng.permutation(np.array(["F"] * n_female + ["M"] * (size - n_female)))
        accelerated = study == ACCELERATED_STUDY
        for index, (age, sex) in enumerate(zip(ages, sexes), start=1):
            rows.append({
                "participant_id": f"sub-{id_prefix}{_STUDY_CODES[study]}s{index:03d}",
                "age": float(age), "sex": str(sex), "study": study,
                "group": "accelerated" if accelerated else "healthy",
                "stiffness_age_offset_years":
                    float(accelerated_ageing_years) if accelerated else 0.0,
            })
    return pd.DataFrame(rows)


