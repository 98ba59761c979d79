"""The age read-out on frozen features (docs/method.md, "Evaluation"), fitted once.

``evaluate_encoder`` fits the configured read-out on a cell's training embeddings and
saves it next to ``metrics.json``; the model export copies those files into the bundle,
and a bundle applied to a new cohort rebuilds the read-out from them. Nothing is refitted
after evaluation.

Methods (config key ``readout.method``):

- ``ridge`` (paper): scikit-learn Ridge, alpha chosen from ``readout.alphas`` by
  ``readout.cv_folds``-fold cross-validation (r2 scoring) on the training embeddings only;
- ``mse``, ``l1``, ``huber``, ``dex`` (Fig. 4b): a small MLP trained on the frozen training
  embeddings with that loss; DEX classifies into age bins and predicts the expected value
  of the softmax;
- the baselines' read-outs: ``pca_ridge`` (PCA then Ridge, the number of components and
  alpha chosen together by the same CV; stored as the equivalent linear map), and
  ``train_mean`` / ``study_mean``, which ignore the features: the training subjects' mean
  age, or the mean age of the subject's study among the training subjects (what site
  identity alone predicts; a study without training subjects gets the overall mean).

Every read-out is fitted on training subjects only.

On disk a fitted read-out is two files (:func:`save_readout`): ``readout.npz``, plain
arrays (Ridge ``coef`` [D] and ``intercept``; or the MLP's state dict with its feature
scaling and DEX bin centres), and ``readout.json``, its description (method, chosen alpha,
widths, age scaling) plus whatever the caller adds (the age-bias fits, the training
summary). A model bundle stores the same arrays as tensors (``readout.pt``). No
scikit-learn object is ever pickled, and PyTorch is imported only by the small predictors,
so evaluating a cell is a light CPU job.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from brainage.config import ConfigError
from brainage.io import read_npz, sha256_file, write_json, write_npz

log = logging.getLogger(__name__)

READOUT_METHODS = ("ridge", "mse", "l1", "huber", "dex", "pca_ridge", "train_mean", "study_mean")
#: Read-outs that are a linear map of the features: ``features @ coef + intercept``.
LINEAR_METHODS = ("ridge", "pca_ridge")
#: Fewer DEX classes than this over the training ages are warned of: a cohort of one age
#: group (a school grade) at readout.dex_bin_years 1 got one class, a constant prediction.
MIN_DEX_BINS = 5
#: Shuffles the Ridge read-out's CV folds (the reference's split seed).
READOUT_CV_SEED = 42
READOUT_ARRAYS = "readout.npz"
READOUT_DESCRIPTION = "readout.json"
#: Key of readout.json holding the sha256 of the readout.npz it describes.
ARRAYS_SHA256_KEY = "arrays_sha256"
#: Columns of voxel features a linear read-out converts to float64 at a time (fit and
#: prediction): 64 MB per chunk for 250 subjects, never a float64 copy of 1.1 M voxels.
GRAM_COLUMNS = 32_768


@dataclass
class Readout:
    """A fitted read-out: ``predict(features [n, D]) -> ages [n]`` (years, float64).

    Ridge keeps its coefficients (``coef`` [D], ``intercept``); the predictors keep the MLP
    with the feature standardisation and the age scaling (or DEX bin centres, years).
    """

    method: str
    info: dict = field(default_factory=dict)
    coef: np.ndarray | None = None
    intercept: float = 0.0
    study_means: dict[str, float] = field(default_factory=dict)
    predictor: object | None = None  # a torch MLP (predictor methods)
    feature_mean: np.ndarray | None = None
    feature_sd: np.ndarray | None = None
    age_mean: float = 0.0
    age_sd: float = 1.0
    bin_centres: np.ndarray | None = None

    def predict(self, features: np.ndarray, studies=None) -> np.ndarray:
        """Ages (years) of ``features`` [n, D]; ``studies`` [n] for ``study_mean``."""
        if self.method in LINEAR_METHODS:
            if np.shape(features)[1] > GRAM_COLUMNS:  # voxels: no float64 copy of them all
                return sum((np.asarray(features[:, start:start + GRAM_COLUMNS], np.float64)
                            @ self.coef[start:start + GRAM_COLUMNS]
                            for start in range(0, np.shape(features)[1], GRAM_COLUMNS)),
                           np.full(len(features), self.intercept))
            return np.asarray(features, dtype=np.float64) @ self.coef + self.intercept
        if self.method == "train_mean":  # the means read no feature: no float64 copy of
            return np.full(len(features), self.intercept)  # the voxels (2 GB at 2 mm)
        if self.method == "study_mean":
            if studies is None:
                raise ValueError("the study-mean read-out needs each subject's study.")
            return np.array([self.study_means.get(str(study), self.intercept)
                             for study in studies], dtype=np.float64)
        features = np.asarray(features, dtype=np.float64)
        import torch

        scaled = torch.from_numpy(((features - self.feature_mean) / self.feature_sd)
                                  .astype(np.float32))
        with torch.no_grad():
            output = self.predictor(scaled)
        if self.method == "dex":
            probabilities = torch.softmax(output, dim=1).double().numpy()
            return probabilities @ self.bin_centres
        return output[:, 0].double().numpy() * self.age_sd + self.age_mean

    # -- plain arrays and JSON ---------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays (float64 where the read-out computes in float64) and the JSON description
        from which :meth:`from_state` rebuilds an identical read-out."""
        description = {"method": self.method, "info": dict(self.info)}
        intercept = np.array(float(self.intercept), dtype=np.float64)
        if self.method in LINEAR_METHODS:
            return ({"coef": np.array(self.coef, dtype=np.float64), "intercept": intercept},
                    description)
        if self.method == "train_mean":
            return {"intercept": intercept}, description
        if self.method == "study_mean":
            description["studies"] = list(self.study_means)
            return ({"intercept": intercept,
                     "study_means": np.array(list(self.study_means.values()),
                                             dtype=np.float64)}, description)
        from torch import nn

        linear = [layer for layer in self.predictor if isinstance(layer, nn.Linear)]
        description.update({"in_features": int(linear[0].in_features),
                            "hidden_dim": int(linear[0].out_features),
                            "out_features": int(linear[-1].out_features),
                            "age_mean": float(self.age_mean), "age_sd": float(self.age_sd)})
        state = {f"predictor.{key}": value.detach().cpu().numpy().copy()
                 for key, value in self.predictor.state_dict().items()}
        state["feature_mean"] = np.array(self.feature_mean, np.float64)
        state["feature_sd"] = np.array(self.feature_sd, np.float64)
        if self.bin_centres is not None:
            state["bin_centres"] = np.array(self.bin_centres, np.float64)
        return state, description

    @classmethod
    def from_state(cls, state: Mapping, description: Mapping) -> "Readout":
        """Rebuild from :meth:`to_state`'s arrays (or the same values as tensors, as a
        model bundle stores them)."""
        state = {key: np.asarray(value) for key, value in state.items()}
        method = description["method"]
        info = dict(description.get("info", {}))
        if method in LINEAR_METHODS:
            return cls(method, info=info, coef=state["coef"],
                       intercept=float(state["intercept"]))
        if method == "train_mean":
            return cls(method, info=info, intercept=float(state["intercept"]))
        if method == "study_mean":
            return cls(method, info=info, intercept=float(state["intercept"]),
                       study_means=dict(zip(description["studies"],
                                            state["study_means"].tolist())))
        import torch

        predictor = _mlp(description["in_features"], description["hidden_dim"],
                         description["out_features"])
        prefix = "predictor."
        predictor.load_state_dict({key[len(prefix):]: torch.from_numpy(np.array(value))
                                   for key, value in state.items() if key.startswith(prefix)})
        predictor.eval()
        return cls(method, info=info, predictor=predictor, feature_mean=state["feature_mean"],
                   feature_sd=state["feature_sd"], age_mean=float(description["age_mean"]),
                   age_sd=float(description["age_sd"]), bin_centres=state.get("bin_centres"))


def _mlp(inputs: int, hidden: int, outputs: int):
    from torch import nn

    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


# -- fitting ---------------------------------------------------------------------------------

#: Fewest training subjects whose read-out cross-validation can score (folds of 2 or more).
MIN_CV_SUBJECTS = 4


def ridge_folds(n_subjects: int, cv_folds: int):
    """The Ridge alpha search's folds: ``cv_folds`` capped at half the training subjects
    (at least 2), shuffled with :data:`READOUT_CV_SEED` (see :func:`fit_ridge`), so that
    every validation fold scores two subjects or more. With fewer than 4 subjects that
    cannot be: a fold of one has no r2, every alpha scores NaN and the search keeps the
    grid's first; this is logged as a warning (a toy cohort, not a study).
    """
    from sklearn.model_selection import KFold

    if n_subjects < MIN_CV_SUBJECTS:
        log.warning("%d training subjects are too few for the read-out's r2 cross-validation "
                    "(a validation fold of one subject has no r2): every alpha scores NaN "
                    "and the grid's first is used.", n_subjects)
    return KFold(min(int(cv_folds), max(2, n_subjects // 2)), shuffle=True,
                 random_state=READOUT_CV_SEED)


def fit_ridge(features: np.ndarray, ages: np.ndarray, *, alphas, cv_folds: int) -> Readout:
    """Ridge with alpha chosen by K-fold CV (r2) on the training embeddings, as the reference.

    ``cv_folds`` is capped at half the number of training subjects (at least 2), so that
    every validation fold has two subjects or more: the r2 of a single subject is undefined.

    The folds are shuffled with :data:`READOUT_CV_SEED`, the same for every cell. The
    training rows come in participant-id order (normalise_dataset sorts them), which groups
    a study's subjects wherever ids carry a site prefix, so unshuffled folds would each be
    roughly one study (young study 1 scored against the older ones) and
    bias the choice of alpha. The reference's rows come out of a shuffling
    ``train_test_split(random_state=42)``; a seed changes initialisation, batch order
    and augmentation only, not the read-out's folds.
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    if len(ages) < 2:
        raise ValueError(f"Ridge cross-validation needs at least 2 training subjects; got "
                         f"{len(ages)}.")
    folds = ridge_folds(len(ages), cv_folds)
    search = GridSearchCV(Ridge(), param_grid={"alpha": [float(a) for a in alphas]},
                          cv=folds, scoring="r2", n_jobs=1)
    search.fit(features, ages)
    alpha = float(search.best_params_["alpha"])
    log.info("ridge: alpha %.3g chosen by %d-fold CV (r2 %.3f)", alpha, folds.n_splits,
             search.best_score_)
    estimator = search.best_estimator_
    return Readout("ridge", info={"ridge_alpha": alpha, "cv_folds": folds.n_splits},
                   coef=np.asarray(estimator.coef_, dtype=np.float64),
                   intercept=float(estimator.intercept_))


def fit_predictor(features: np.ndarray, ages: np.ndarray, *, method: str,
                  readout_settings: Mapping, seed: int, warn: bool = True) -> Readout:
    """A one-hidden-layer MLP on standardised frozen features, trained full-batch with Adam.
    ``warn``: of too few DEX classes (not for the age-bias refits on subsets).

    mse / l1 / huber regress the standardised age (Huber's delta is given in years);
    dex classifies into bins of ``dex_bin_years`` centred on the multiples of that width
    nearest the training ages and predicts the softmax expected value of the bin centres,
    so predictions stay in that range.
    """
    import torch
    from torch import nn

    feature_mean = features.mean(axis=0)
    feature_sd = features.std(axis=0)
    # a feature constant on the training subjects (a channel that is 0 after the ReLU for
    # all of them) keeps its scale, as scikit-learn's StandardScaler does: divided by 1e-6
    # it multiplied a test subject's small value a million times (years off with no
    # weight decay)
    constant = feature_sd <= 1e-6 * max(float(feature_sd.max(initial=0.0)), 1e-12)
    feature_sd = np.where(constant, 1.0, feature_sd + 1e-6)
    age_mean, age_sd = float(ages.mean()), float(ages.std() + 1e-6)
    inputs = torch.from_numpy(((features - feature_mean) / feature_sd).astype(np.float32))
    readout = Readout(method, feature_mean=feature_mean, feature_sd=feature_sd,
                      age_mean=age_mean, age_sd=age_sd)
    if method == "dex":
        # Centres on the multiples of the width, each age in the class of its nearest
        # centre (DEX's classes are ages). Centres at bin midpoints (k + 0.5 years) put a
        # cohort's whole-year ages on the lower edge of their bins: every prediction came
        # out half a bin (0.5 years) too old.
        width = float(readout_settings["dex_bin_years"])
        nearest = np.floor(ages / width + 0.5).astype(np.int64)
        first, n_bins = int(nearest.min()), int(nearest.max() - nearest.min()) + 1
        readout.bin_centres = width * np.arange(first, first + n_bins, dtype=np.float64)
        targets = torch.from_numpy(nearest - first)
        outputs, criterion = n_bins, nn.CrossEntropyLoss()
        readout.info["dex_bins"] = n_bins
        if warn and n_bins < MIN_DEX_BINS:
            centres = ", ".join(f"{centre:g}" for centre in readout.bin_centres)
            log.warning("readout.dex_bin_years is %g years: the training ages (%.2f-%.2f "
                        "years) make only %d DEX class(es), so %s. %s", width, ages.min(),
                        ages.max(), n_bins,
                        f"every prediction is {centres} years" if n_bins == 1 else
                        f"every prediction is a weighted mean of {centres} years",
                        f"Set readout.dex_bin_years to about {np.ptp(ages) / 10:.2g} (a tenth "
                        f"of the age range), or use another readout.method."
                        if np.ptp(ages) > 0 else "Use another readout.method.")
    else:
        targets = torch.from_numpy(((ages - age_mean) / age_sd).astype(np.float32))[:, None]
        outputs = 1
        criteria = {"mse": nn.MSELoss(), "l1": nn.L1Loss(),
                    "huber": nn.HuberLoss(delta=float(readout_settings["huber_delta"]) / age_sd)}
        if method not in criteria:  # a method added to READOUT_METHODS without its fit
            raise ConfigError(f"config key readout.method is {method!r}, which has no fit: "
                              f"add its branch to brainage.readout.fit_readout "
                              f"(docs/architecture.md §9, a baseline).")
        criterion = criteria[method]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = _mlp(inputs.shape[1], int(readout_settings["predictor_hidden_dim"]), outputs)
    optimiser = torch.optim.Adam(predictor.parameters(), lr=float(readout_settings["predictor_lr"]),
                                 weight_decay=float(readout_settings["predictor_weight_decay"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a [n, 128] MLP: threads only add synchronisation (10-30x)
    try:
        for _ in range(int(readout_settings["predictor_epochs"])):
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


def _gram(features: np.ndarray) -> np.ndarray:
    """``features @ features.T`` [n, n] in float64, from column chunks of the (float32 or
    float64) features: never a float64 copy of all of them."""
    gram = np.zeros((len(features), len(features)))
    for start in range(0, features.shape[1], GRAM_COLUMNS):
        chunk = np.asarray(features[:, start:start + GRAM_COLUMNS], dtype=np.float64)
        gram += chunk @ chunk.T
    return gram


def _pca_ridge_weights(gram: np.ndarray, fit: np.ndarray, ages: np.ndarray, n_components,
                       alphas) -> dict:
    """PCA (``n_components`` leading components of the rows ``fit``, centred) then Ridge
    (``alphas``), from the Gram matrix of all rows: ``{(k, alpha): v}`` with v [len(fit)]
    such that a row x is predicted ``mean(ages[fit]) + (x - mean_fit) . Xc.T v``.

    With Xc the centred rows ``fit`` and ``Xc Xc.T = U diag(s²) U.T``, the k component
    scores are ``Xc V_k.T = U_k S_k`` and Ridge's weights on them
    ``w = S_k U_k.T yc / (s² + alpha)`` (scores have mean 0), so the fitted map is
    ``V_k.T w = Xc.T U_k diag(1 / (s² + alpha)) U_k.T yc``: no component is ever formed,
    and the same predictions as scikit-learn's ``PCA(svd_solver="full")`` + ``Ridge``.
    """
    block = gram[np.ix_(fit, fit)]
    centring = np.eye(len(fit)) - 1.0 / len(fit)
    eigenvalues, eigenvectors = np.linalg.eigh(centring @ block @ centring)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    eigenvectors = eigenvectors[:, order]
    target = ages[fit] - ages[fit].mean()
    projected = eigenvectors.T @ target
    return {(k, alpha): eigenvectors[:, :k] @ (projected[:k] / (eigenvalues[:k] + alpha))
            for k in n_components for alpha in alphas}


def _centred_cross(gram: np.ndarray, rows: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """``(X[rows] - mean_fit) @ Xc.T`` [len(rows), len(fit)] from the Gram matrix."""
    cross = gram[np.ix_(rows, fit)]
    fit_block = gram[np.ix_(fit, fit)]
    return (cross - cross.mean(axis=1, keepdims=True) - fit_block.mean(axis=0)[None, :]
            + fit_block.mean())


def fit_pca_ridge(features: np.ndarray, ages: np.ndarray, *, components, alphas,
                  cv_folds: int) -> Readout:
    """PCA then Ridge, the number of components and alpha chosen together by the Ridge
    read-out's cross-validation (:func:`ridge_folds`, r2) on the training subjects only.

    Both steps are linear, so the fitted pair is stored as one map:
    ``(features - mean) @ V.T @ w + b = features @ (V.T @ w) + (b - mean @ V.T @ w)``.

    Computed from the training subjects' Gram matrix (:func:`_pca_ridge_weights`), the
    same numbers as scikit-learn's ``GridSearchCV`` over ``Pipeline(PCA(svd_solver=
    "full"), Ridge())`` (to rounding; tests/test_evaluate.py compares them; ties go to the
    grid's first, components before alpha, as there). That pipeline refitted a full PCA
    for every fold, number of components and alpha: on 2 mm voxels (1.1 M features, 250
    subjects) 76 fits of about 72 s and 9 GB each, then as many again per fold of the
    age-bias correction's out-of-fold fit. Here one pass over the features makes the Gram
    matrix, and one more the final map.
    """
    from sklearn.metrics import r2_score

    ages = np.asarray(ages, dtype=np.float64)
    folds = ridge_folds(len(ages), cv_folds)
    smallest_fold = len(ages) - int(np.ceil(len(ages) / folds.n_splits))
    allowed = sorted({min(int(k), smallest_fold, features.shape[1]) for k in components})
    alphas = [float(a) for a in alphas]
    gram = _gram(features)
    grid = [(k, alpha) for k in allowed for alpha in alphas]  # GridSearchCV's order
    scores = np.zeros((folds.n_splits, len(grid)))
    for fold, (fit, held_out) in enumerate(folds.split(np.zeros(len(ages)))):
        weights = _pca_ridge_weights(gram, fit, ages, allowed, alphas)
        cross = _centred_cross(gram, held_out, fit)
        for index, key in enumerate(grid):
            predicted = ages[fit].mean() + cross @ weights[key]
            with np.errstate(all="ignore"):
                scores[fold, index] = r2_score(ages[held_out], predicted) \
                    if len(held_out) > 1 else np.nan
    mean_scores = scores.mean(axis=0)
    best = int(np.nanargmax(mean_scores)) if np.isfinite(mean_scores).any() else 0
    n_components, alpha = grid[best]
    every = np.arange(len(ages))
    weights = _pca_ridge_weights(gram, every, ages, [n_components], [alpha])
    v = weights[(n_components, alpha)]
    # coef = Xc.T v = X.T v - mean * sum(v), one pass over the features in chunks
    coef = np.empty(features.shape[1])
    mean = np.empty(features.shape[1])
    for start in range(0, features.shape[1], GRAM_COLUMNS):
        chunk = np.asarray(features[:, start:start + GRAM_COLUMNS], dtype=np.float64)
        mean[start:start + GRAM_COLUMNS] = chunk.mean(axis=0)
        coef[start:start + GRAM_COLUMNS] = (chunk.T @ v
                                            - mean[start:start + GRAM_COLUMNS] * v.sum())
    log.info("pca_ridge: %d components, alpha %.3g chosen by %d-fold CV (r2 %.3f)",
             n_components, alpha, folds.n_splits, mean_scores[best])
    return Readout("pca_ridge", info={"pca_components": int(n_components),
                                      "ridge_alpha": float(alpha),
                                      "cv_folds": folds.n_splits},
                   coef=coef, intercept=float(ages.mean() - mean @ coef))


def fit_mean(ages: np.ndarray, studies=None) -> Readout:
    """The training subjects' mean age, overall (``studies`` None) or per study (years)."""
    overall = float(np.mean(ages))
    if studies is None:
        return Readout("train_mean", intercept=overall)
    studies = np.asarray(studies).astype(str)
    means = {study: float(np.mean(ages[studies == study])) for study in sorted(set(studies))}
    return Readout("study_mean", intercept=overall, study_means=means,
                   info={"n_studies": len(means)})


def grid_edges(readout: Readout, readout_settings: Mapping) -> list[str]:
    """The cross-validated choices of a fitted read-out that sit at an end of their grid
    (``readout.alphas``, ``readout.pca_components``), where the best value may lie beyond
    it. The α grid is absolute and the features are not scaled, so a cell whose features
    are much smaller or larger than a trained encoder's (the untrained encoder's are
    about 10 times smaller) can be held at an edge."""
    edges = []
    for key, chosen in (("alphas", readout.info.get("ridge_alpha")),
                        ("pca_components", readout.info.get("pca_components"))):
        grid = sorted(float(value) for value in readout_settings.get(key) or ())
        if chosen is None or len(grid) < 2 or float(chosen) not in (grid[0], grid[-1]):
            continue
        end = "smallest" if float(chosen) == grid[0] else "largest"
        edges.append(f"readout.{key} {chosen:g}, the grid's {end} "
                     f"({', '.join(f'{value:g}' for value in grid)})")
    return edges


def fit_readout(features: np.ndarray, ages: np.ndarray, readout_settings: Mapping, *,
                seed: int = 0, studies=None, warn: bool = True) -> Readout:
    """Fit the read-out of a resolved ``readout`` section on training features [n, D].

    ``studies`` [n]: the training subjects' studies (needed by ``study_mean``); ``warn``:
    of a setting unfit for these ages (false for the age-bias refits on subsets, whose
    warnings would not be about the read-out the MAE used).
    """
    method = readout_settings["method"]
    if method not in READOUT_METHODS:
        raise ConfigError(f"config key readout.method is {method!r}; expected one of "
                          f"{', '.join(READOUT_METHODS)}.")
    ages = np.asarray(ages, dtype=np.float64)
    if method == "pca_ridge":  # in float64 column chunks: voxel features stay as they are
        return fit_pca_ridge(features, ages, components=readout_settings["pca_components"],
                             alphas=readout_settings["alphas"],
                             cv_folds=readout_settings["cv_folds"])
    if method == "train_mean":  # the means read no feature (the voxels, for the baselines)
        return fit_mean(ages)
    if method == "study_mean":
        if studies is None:
            raise ValueError("readout.method study_mean needs the training subjects' studies.")
        return fit_mean(ages, studies)
    features = np.asarray(features, dtype=np.float64)
    if method == "ridge":
        return fit_ridge(features, ages, alphas=readout_settings["alphas"],
                         cv_folds=readout_settings["cv_folds"])
    return fit_predictor(features, ages, method=method, readout_settings=readout_settings,
                         seed=seed, warn=warn)


# -- files -----------------------------------------------------------------------------------

def save_readout(folder: str | Path, readout: Readout, **description) -> dict:
    """Write ``readout.npz`` (arrays) and ``readout.json`` (the description, extended by
    ``description`` and the arrays' sha256) into ``folder``; returns the JSON written.

    Each file is written atomically, the pair is not: the checksum lets
    :func:`load_readout` refuse new arrays beside the description of an earlier fit (a
    job stopped between the two writes)."""
    folder = Path(folder)
    state, own = readout.to_state()
    write_npz(folder / READOUT_ARRAYS, **state)
    payload = {**own, **description, ARRAYS_SHA256_KEY: sha256_file(folder / READOUT_ARRAYS)}
    write_json(folder / READOUT_DESCRIPTION, payload)
    return payload


def load_readout(folder: str | Path) -> tuple[Readout, dict]:
    """The read-out saved by :func:`save_readout` and its description.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file and the rule that writes it.
    """
    folder = Path(folder)
    arrays, described = folder / READOUT_ARRAYS, folder / READOUT_DESCRIPTION
    for path in (arrays, described):
        if not path.is_file():
            raise FileNotFoundError(f"read-out file {path} does not exist; rerun rule "
                                    f"evaluate_encoder for this cell.")
    try:
        state = read_npz(arrays)
        description = json.loads(described.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"read-out {folder} cannot be read ({error}); rerun rule "
                         f"evaluate_encoder for this cell.") from None
    recorded = description.get(ARRAYS_SHA256_KEY)  # absent: written by an older version
    if recorded is not None and recorded != sha256_file(arrays):
        raise ValueError(f"{arrays} is not the file {described} describes (sha256 "
                         f"{recorded}): they come from different fits, e.g. a job stopped "
                         f"between writing them. Rerun rule evaluate_encoder for this cell.")
    return Readout.from_state(state, description), description
