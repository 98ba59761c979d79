"""Dataset-wide stage (rule ``normalise_dataset``): splits and z-normalisation.

Splits (config section ``split``), all seeded and fixed across training seeds:

``holdout``
    one train/test split, ``test_fraction`` of the subjects in test, stratified by study
    (paper: 80:20). Split name ``holdout``.
``kfold``
    ``n_folds`` folds stratified by study; split ``fold<k>`` tests fold k.
``loso``
    leave one study out; split ``loso<study>`` (non-alphanumerics removed) tests that study.

Normalisation (docs/method.md, "Normalisation and splits"): per channel (modality) one
mean and one sd over the non-zero (brain) voxels of the statistics subjects, background
stays exactly 0; a T1w channel is first divided by each image's median brain value
(scanner units). The paper's code computes them over all subjects before splitting, which
leaks test statistics into training; by default the statistics subjects are the split's
training subjects only (``normalise.scope: train``), ``scope: all`` reproduces the paper.
Statistics are streamed: one subject's maps in memory at a time, per-subject count, mean
and sum of squared deviations in float64, combined exactly (Chan et al. 1979).

Optionally (``normalise.resolution_mm`` 4/6/8) the 2 mm maps are block-averaged first: the
template grid is cropped (where only background is removed) or padded so the factor
divides it, each block becomes the mean of its non-zero voxels, and a block with fewer
than half non-zero voxels becomes background.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import zlib
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from brainage.inputs import MADE_AGAIN, InputError
from brainage.io import atomic_path, ensure_room, remove_stale_temporaries, write_json, write_tsv
from brainage.modalities import DEFAULT_MODALITIES, modality
from brainage.paths import names_sharing_a_folder
from brainage.preprocess.images import load_mask, load_volume
from brainage.qc import participants_table, qc_metrics_table, read_qc_table
from brainage.split_data import study_quotas

log = logging.getLogger(__name__)

SCHEMES = ("holdout", "kfold", "loso")
RESOLUTIONS_MM = (2, 4, 6, 8)
TEMPLATE_VOXEL_MM = 2
DTYPES = {"float32": np.float32, "float16": np.float16}
#: Columns added to the participants table of a split. No QC verdict: with
#: ``qc.exclude_failed`` the failing subjects are not in the split (stats.json lists them
#: with the reason), and without it the thresholds must not touch the split, or editing
#: one would retrain every encoder.
ADDED_COLUMNS = ("subset", "coverage")


# -- splits -------------------------------------------------------------------------------

def study_label(study) -> str:
    """A study name as a split-name part: letters and digits only."""
    return re.sub(r"[^A-Za-z0-9]", "", str(study))


def _study_rng(seed: int, study: str) -> np.random.Generator:
    # Seeded per study (by its name), so a study's shuffle does not depend on the others.
    return np.random.default_rng([int(seed), zlib.crc32(str(study).encode())])


def _shuffled_by_study(participants: pd.DataFrame, seed: int) -> dict[str, list[int]]:
    """Row positions of each study (sorted study names), shuffled with the split seed.

    Rows are ordered by participant_id before shuffling: the split does not depend on the
    order of participants.tsv.
    """
    order = np.argsort(participants["participant_id"].to_numpy(dtype=str), kind="stable")
    studies = participants["study"].astype(str).to_numpy()
    groups = {}
    for study in sorted(set(studies)):
        positions = [int(row) for row in order if studies[row] == study]
        shuffle = _study_rng(seed, study).permutation(len(positions))
        groups[study] = [positions[i] for i in shuffle]
    return groups


def _check_scheme(participants: pd.DataFrame, scheme: str, n_folds: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"split.scheme={scheme!r}; choose one of {', '.join(SCHEMES)}.")
    for column in ("participant_id", "study"):
        if column not in participants:
            raise InputError(f"the participants table has no {column!r} column.")
    if scheme == "kfold" and len(participants) < n_folds:
        raise InputError(f"split.n_folds={n_folds} but only {len(participants)} subjects; use "
                         f"fewer folds.")
    if scheme == "loso":
        studies = sorted(participants["study"].astype(str).unique())
        if len(studies) < 2:
            raise InputError(f"split.scheme loso needs at least 2 studies; the participants "
                             f"table has {studies}.")
        labels = [study_label(s) for s in studies]
        empty = [s for s, label in zip(studies, labels) if not label]
        if empty:
            raise InputError(f"study name(s) {empty} have no ASCII letters or digits (A-Z, "
                             f"a-z, 0-9), so they cannot name a leave-one-study-out split "
                             f"(results/dataset/loso<study>/). Rename the study in the "
                             f"participants table's study column, e.g. to a transliteration.")
        # compared without case: results/dataset/losoA and losoa are one folder on a
        # case-insensitive file system (macOS, Windows shares), where one split's images
        # would overwrite the other's and a held-out study could train the other encoder
        clashing = {study for group in names_sharing_a_folder(studies, study_label)
                    for study in group}
        if clashing:
            raise InputError(f"studies {[s for s in studies if s in clashing]} "
                             f"give the same split name once non-alphanumerics are removed "
                             f"and case is ignored (folders under results/ are one on a "
                             f"case-insensitive file system); rename one of them in the "
                             f"participants table's study column.")


def split_names(participants: pd.DataFrame, scheme: str = "holdout", test_fraction: float = 0.2,
                n_folds: int = 5, seed: int = 42, **ignored) -> list[str]:
    """Names of the splits of a scheme (config section ``split``, passed as keywords).

    ``holdout`` -> ``["holdout"]``; ``kfold`` -> ``["fold1", ..., "fold<K>"]``;
    ``loso`` -> ``["loso<study>", ...]`` over the sorted study names.
    """
    _check_scheme(participants, scheme, n_folds)
    if scheme == "holdout":
        return ["holdout"]
    if scheme == "kfold":
        return [f"fold{k}" for k in range(1, n_folds + 1)]
    return [f"loso{study_label(s)}" for s in sorted(participants["study"].astype(str).unique())]


def split_name_pattern(scheme: str = "holdout", n_folds: int = 5, **ignored) -> str:
    """A regular expression matching the names :func:`split_names` can give for these
    settings (config section ``split``) whatever the participants: the workflow's
    ``{split}`` wildcard, known before a simulated cohort exists. ``loso`` names depend on
    the studies, so any ``loso<letters and digits>`` matches."""
    if scheme == "holdout":
        return "holdout"
    if scheme == "kfold":
        return "fold(?:" + "|".join(str(k) for k in range(1, int(n_folds) + 1)) + ")"
    if scheme == "loso":
        return "loso[A-Za-z0-9]+"
    raise ValueError(f"split.scheme={scheme!r}; choose one of {', '.join(SCHEMES)}.")


def assign_split(participants: pd.DataFrame, split_name: str, *, scheme: str = "holdout",
                 test_fraction: float = 0.2, n_folds: int = 5, seed: int = 42,
                 fraction_key: str = "split.test_fraction", eval_subset: str = "test",
                 **ignored) -> pd.Series:
    """``"train"``/``"test"`` for every participant in one split.

    Parameters
    ----------
    participants : table with ``participant_id`` and ``study``.
    split_name : one of :func:`split_names` for the same settings.
    scheme, test_fraction, n_folds, seed : config section ``split``.
    fraction_key, eval_subset : the config key that set ``test_fraction`` and the name of
        the held-out subjects, for the message of a holdout with an empty side
        (``pretrain.<run>.validation_fraction`` and ``validation`` for a pretraining cohort).

    Returns
    -------
    pandas.Series named ``subset`` with the index of ``participants``.

    Notes
    -----
    ``holdout``: each study's subjects are shuffled (seed and study name), and the number
    of test subjects per study is its share of ``round(test_fraction * n)`` by largest
    remainder, so the test set has the requested size and follows the study mix.
    ``kfold``: the per-study shuffles are concatenated (studies sorted) and dealt to the
    folds in turn, so every fold follows the study mix.
    """
    names = split_names(participants, scheme, test_fraction, n_folds, seed)
    if split_name not in names:
        raise ValueError(f"split {split_name!r} is not a split of scheme {scheme!r} "
                         f"(those are {', '.join(names)}).")
    subset = pd.Series("train", index=participants.index, name="subset", dtype=object)
    studies = participants["study"].astype(str)
    if scheme == "loso":
        held_out = [s for s in studies.unique() if f"loso{study_label(s)}" == split_name][0]
        subset[studies == held_out] = "test"
        return subset
    groups = _shuffled_by_study(participants, seed)
    if scheme == "holdout":
        # a one-subject study can win a test place and be tested from a site that training
        # never saw: normalise_dataset says so (_log_one_sided_studies). Keeping it for
        # training would change finished projects' splits, which the seen-subject marks and
        # the pretraining leak check derive again at planning time.
        quota = study_quotas({study: len(rows) for study, rows in groups.items()},
                             test_fraction)
        for study, rows in groups.items():
            subset.iloc[rows[:quota[study]]] = "test"
        if (subset == "test").all() or (subset == "train").all():
            raise InputError(
                f"{fraction_key}={test_fraction} of {len(participants)} subjects leaves "
                f"the {'training' if (subset == 'test').all() else eval_subset} set empty; "
                f"change {fraction_key} or add subjects.")
        return subset
    fold = int(split_name[len("fold"):]) - 1
    dealt = [row for study in sorted(groups) for row in groups[study]]
    for position, row in enumerate(dealt):
        if position % n_folds == fold:
            subset.iloc[row] = "test"
    return subset


def subjects_in(participants: pd.DataFrame, split_settings: Mapping, subset: str,
                splits: Sequence[str] | None = None) -> set[str]:
    """The ``participant_id`` of every subject in ``subset`` (``train`` or ``test``) of the
    named ``splits`` (default: every split of config section ``split_settings``)."""
    chosen = set()
    for name in splits or split_names(participants, **split_settings):
        assigned = assign_split(participants, name, **split_settings)
        chosen |= set(participants.loc[assigned == subset, "participant_id"])
    return chosen


def check_pretraining_cohort(pretraining: pd.DataFrame, participants: pd.DataFrame,
                             split_settings: Mapping, *, root: str | Path) -> None:
    """Refuse a pretraining cohort that holds subjects the training cohort tests.

    ``pretraining``, ``participants``: the T1w cohort's and the MRE training cohort's
    tables; ``split_settings``: config section ``split``. A subject is matched by its
    ``participant_id``, whatever its case: a lab's own T1w cohort numbers its people as its
    MRE cohort does.
    Pretraining on a test subject shows the encoder its image and age (the kernel losses
    weigh pairs by age) before it is tested, so every cell fine-tuned from the run would
    report an optimistic test MAE. With ``kfold`` or ``loso`` every subject is tested in one
    split. Training subjects may be shared: they are not tested.

    Raises
    ------
    InputError
        Naming the shared subjects and what to do (the caller names the run's config key).
    """
    # matched whatever the case: sub-S00 and sub-s00 are one folder on a case-insensitive
    # file system, and one person in a lab that spells its ids both ways
    tested = {pid.casefold(): pid for pid in subjects_in(participants, split_settings, "test")}
    leaked = sorted(f"{pid} (as {tested[pid.casefold()]})" if pid != tested[pid.casefold()]
                    else pid for pid in pretraining["participant_id"]
                    if pid.casefold() in tested)
    if not leaked:
        return
    scheme = split_settings["scheme"]
    raise InputError(
        f"the pretraining cohort {root} holds {len(leaked)} test subject(s) of the "
        f"training cohort (dataset.root, split "
        f"scheme {scheme}"
        + ("" if scheme == "holdout" else ", which tests every subject in one of its splits")
        + f"): {', '.join(leaked[:10])}{' ...' if len(leaked) > 10 else ''}. Pretraining on "
        f"them shows the encoder their images and ages before they are tested, so every cell "
        f"fine-tuned from it would report an optimistic test MAE. Remove their rows and "
        f"folders from the pretraining cohort; if they are other people whose ids only "
        f"coincide, rename them there.")


def training_counts(participants: pd.DataFrame, split_settings: Mapping, *,
                    fraction_key: str = "split.test_fraction",
                    eval_subset: str = "test", left_out: Collection[str] = ()
                    ) -> dict[str, int]:
    """Training subjects of every split (config section ``split``) of a participants table.

    Counted before QC exclusion (``qc.exclude_failed`` drops subjects after the split is
    assigned, :func:`normalise_dataset`), so a split's ``images.npy`` holds at most this
    many training subjects; ``left_out``: the participant_ids that exclusion drops, where
    known. ``fraction_key``, ``eval_subset``: as :func:`assign_split`.
    """
    return {name: sum(sizes.values())
            for name, sizes in training_study_sizes(participants, split_settings,
                                                    fraction_key=fraction_key,
                                                    eval_subset=eval_subset,
                                                    left_out=left_out).items()}


def training_study_sizes(participants: pd.DataFrame, split_settings: Mapping, *,
                         fraction_key: str = "split.test_fraction",
                         eval_subset: str = "test", left_out: Collection[str] = ()
                         ) -> dict[str, dict[str, int]]:
    """Training subjects per study of every split, counted as :func:`training_counts`."""
    sizes = {}
    kept = ~participants["participant_id"].isin(set(left_out)).to_numpy()
    for name in split_names(participants, **split_settings):
        subset = assign_split(participants, name, **split_settings,
                              fraction_key=fraction_key, eval_subset=eval_subset)
        training = participants["study"].astype(str)[np.asarray(subset == "train") & kept]
        sizes[name] = {str(study): int(n) for study, n in training.value_counts().items()}
    return sizes


# -- the analysis grid --------------------------------------------------------------------

def analysis_grid(template_brain: np.ndarray, template_affine: np.ndarray,
                  factor: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], np.ndarray]:
    """Crop or pad the template grid so ``factor`` divides it, then block it.

    Per axis, ``n % factor`` voxels are cropped (half at each end) when they hold no
    template brain, otherwise the axis is padded to the next multiple.

    Returns
    -------
    start, stop : int arrays [3], the 2 mm window in template voxel indices (may extend
        beyond the template: padding).
    shape : the blocked grid's shape.
    affine : 4x4, blocked voxel index -> MNI mm (a block's centre).
    """
    start = np.zeros(3, dtype=int)
    stop = np.array(template_brain.shape, dtype=int)
    for axis, n in enumerate(template_brain.shape):
        remainder = n % factor
        if remainder == 0:
            continue
        cut_low, cut_high = remainder // 2, remainder - remainder // 2
        profile = template_brain.any(axis=tuple(a for a in range(3) if a != axis))
        if not profile[:cut_low].any() and not profile[n - cut_high:].any():
            start[axis], stop[axis] = cut_low, n - cut_high
        else:
            pad = factor - remainder
            start[axis], stop[axis] = -(pad // 2), n + pad - pad // 2
    shift = np.eye(4)
    shift[:3, 3] = start
    block = np.diag([factor, factor, factor, 1.0])
    block[:3, 3] = (factor - 1) / 2
    shape = tuple(int(v) for v in (stop - start) // factor)
    return start, stop, shape, template_affine @ shift @ block


def crop_or_pad(volume: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """The window ``[start, stop)`` of ``volume`` (template voxel indices), zero-padded."""
    window = np.zeros(tuple(int(v) for v in stop - start), dtype=volume.dtype)
    source = tuple(slice(max(s, 0), min(e, n)) for s, e, n in zip(start, stop, volume.shape))
    target = tuple(slice(max(s, 0) - s, min(e, n) - s)
                   for s, e, n in zip(start, stop, volume.shape))
    window[target] = volume[source]
    return window


def block_average(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean of the non-zero voxels of each ``factor``^3 block (float32).

    A block with fewer than half non-zero voxels becomes 0 (background). The volume's
    shape must be divisible by ``factor``.
    """
    if factor == 1:
        return volume.astype(np.float32)
    x, y, z = (n // factor for n in volume.shape)
    blocks = volume.astype(np.float64).reshape(x, factor, y, factor, z, factor)
    counts = (blocks != 0).sum(axis=(1, 3, 5))
    sums = blocks.sum(axis=(1, 3, 5))
    keep = 2 * counts >= factor ** 3
    result = np.zeros((x, y, z), dtype=np.float32)
    result[keep] = sums[keep] / counts[keep]
    return result


# -- streaming statistics -------------------------------------------------------------------

def combine_moments(a: tuple[int, float, float], b: tuple[int, float, float]
                    ) -> tuple[int, float, float]:
    """Chan et al.'s exact merge of (count, mean, sum of squared deviations)."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    if n == 0:
        return 0, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


def volume_moments(values: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of the non-zero voxels, float64."""
    brain = values[values != 0].astype(np.float64)
    if brain.size == 0:
        return 0, 0.0, 0.0
    mean = float(brain.mean())
    return int(brain.size), mean, float(((brain - mean) ** 2).sum())


# -- the rule's function ---------------------------------------------------------------------

def _map_lookup(maps: Sequence[str | Path], modalities: Sequence[str]) -> dict[tuple[str, str], Path]:
    """``{(participant_id, modality): path}`` of registered maps named
    ``sub-<label>_..._<modality>.nii.gz``; files of other modalities are ignored."""
    lookup = {}
    for path in maps:
        name = Path(path).name
        for modality_name in modalities:
            if name.endswith(f"_{modality_name}.nii.gz"):
                lookup[(name.split("_")[0], modality_name)] = Path(path)
    return lookup


#: Keys of stats.json that :func:`apply` needs: everything that turns a subject's registered
#: maps into the network's input. The bundle carries them to other labs. ``modalities``,
#: ``scale_by_brain_median``, ``mean`` and ``sd`` have one entry per channel.
RECORD_KEYS = ("template_shape", "template_affine", "window_start", "window_stop",
               "block_factor", "modalities", "scale_by_brain_median", "mean", "sd", "dtype",
               "resolution_mm", "shape", "affine")


def window(volume: np.ndarray, record: Mapping) -> np.ndarray:
    """The record's window of a template-grid map, block-averaged (the map's unit, float32)."""
    return block_average(crop_or_pad(volume, np.asarray(record["window_start"], dtype=int),
                                     np.asarray(record["window_stop"], dtype=int)),
                         int(record["block_factor"]))


def scaled_by_brain_median(volume: np.ndarray) -> np.ndarray:
    """``volume`` divided by the median of its non-zero voxels (T1w: scanner units differ
    between sites by factors; :mod:`brainage.modalities`)."""
    values = volume[volume != 0]
    if values.size == 0:
        return volume.astype(np.float32)
    return (volume / np.float32(np.median(values))).astype(np.float32)


def channel(volume: np.ndarray, record: Mapping, index: int) -> np.ndarray:
    """Channel ``index`` of the record before z-scoring: the map, scaled when its modality
    is (``scale_by_brain_median``), windowed and block-averaged."""
    if record["scale_by_brain_median"][index]:
        volume = scaled_by_brain_median(volume)
    return window(volume, record)


def z_score(blocked: np.ndarray, mean: float, sd: float, dtype: str) -> np.ndarray:
    """Non-zero voxels to z-units with the (training) ``mean`` and ``sd``; background stays
    exactly 0; stored in ``dtype``."""
    return np.where(blocked != 0, (blocked - mean) / sd, 0.0).astype(DTYPES[dtype])


def check_grid(shape, affine, record: Mapping, *, what: str) -> None:
    """Raise :class:`InputError` when a map is not on the record's template grid."""
    if tuple(shape[:3]) != tuple(record["template_shape"]) or not np.allclose(
            np.asarray(affine, float), np.asarray(record["template_affine"], float), atol=1e-4):
        raise InputError(f"{what} (shape {tuple(shape[:3])}) is not on the template grid "
                         f"(shape {tuple(record['template_shape'])}) the normalisation uses. "
                         f"Register it to the same template (config key template): rerun its "
                         f"preprocessing (step register_to_template of its job of rule "
                         f"correct_and_register, correct_and_register_<maps> in a "
                         f"pretraining or predict cohort).")


def apply(volumes: Mapping[str, np.ndarray], record: Mapping, *,
          what: str = "a subject") -> np.ndarray:
    """A subject's registered maps (``{modality: template-grid map}``) -> the network's
    input [C, x, y, z] (z-units), channels in the record's ``modalities`` order.

    Exactly what the normalisation stage stores for a subject: per channel the scaling of
    its modality, the record's window, block-averaging, the record's (training) mean and
    sd, background exactly 0, rounded through the record's storage dtype. Used for every
    split subject and for every subject of a new cohort, so both see the same numbers.
    ``what`` names the subject in an error.

    Raises
    ------
    InputError
        A modality of the record without a map, or a z-score beyond the storage dtype's
        range (float16: 65504), which would be stored as inf.
    """
    missing = [name for name in record["modalities"] if name not in volumes]
    if missing:
        raise InputError(f"{what}: no registered {', '.join(missing)} map given; the "
                         f"normalisation needs {', '.join(record['modalities'])}. Register "
                         f"the subject's {', '.join(missing)} map (rerun its preprocessing).")
    channels = []
    for index, name in enumerate(record["modalities"]):
        mean, sd = record["mean"][index], record["sd"][index]
        blocked = channel(volumes[name], record, index)
        with np.errstate(over="ignore"):  # an overflow is raised below, naming the subject
            scored = z_score(blocked, mean, sd, record["dtype"])
        if not np.isfinite(scored).all():
            largest = float(np.max(np.abs(blocked[blocked != 0].astype(np.float64) - mean))) / sd
            raise InputError(
                f"{what}: the normalised {name} map reaches |z| = {largest:.3g} (training mean "
                f"{mean:.4g}, sd {sd:.4g} {modality(name).unit}), beyond {record['dtype']}'s "
                f"range (±{float(np.finfo(DTYPES[record['dtype']]).max):g}); it would be "
                f"stored as inf. Check the subject's registered {name} map for outlier voxels "
                f"(rerun its preprocessing), or store the split as float32 (config key "
                f"normalise.dtype: float32; a model bundle keeps the type it was trained "
                f"with).")
        channels.append(scored)
    return np.stack(channels)


def _read_map(path: Path, record: Mapping, participant_id: str) -> np.ndarray:
    data, map_affine = load_volume(path, what=f"subject {participant_id}: registered map",
                                   remedy=MADE_AGAIN)
    check_grid(data.shape, map_affine, record,
               what=f"subject {participant_id}: registered map {path}")
    if not np.all(np.isfinite(data)):
        raise InputError(f"subject {participant_id}: registered map {path} has NaN/inf voxels; "
                         f"rerun its preprocessing.")
    return data


#: Subjects between the normalisation's progress lines (of thousands, a line a minute or so).
PROGRESS_EVERY = 25


def normalise_dataset(maps: Sequence[str | Path], participants: pd.DataFrame | str | Path,
                      qc_table: str | Path | Sequence[str | Path], template_mask: str | Path,
                      out_images: str | Path, out_participants: str | Path,
                      out_stats: str | Path, *, split: str, split_settings: Mapping,
                      scope: str = "train", dtype: str = "float32", resolution_mm: int = 2,
                      exclude_failed: bool = False,
                      modalities: Sequence[str] = DEFAULT_MODALITIES,
                      eval_subset: str = "test") -> dict:
    """One split's z-normalised image array, its participants table and statistics.

    Parameters
    ----------
    maps : every subject's registered maps (``..._space-<space>_res-2_desc-preproc_<modality>
        .nii.gz``, :func:`brainage.preprocess.chain.subject_files`), named
        ``sub-<label>_...``; maps of other modalities are ignored.
    participants : the dataset's participants table, or the path of its participants.tsv.
    qc_table : the QC table (``tabulate_qc``: coverage and the verdict of the thresholds per
        subject), needed with ``exclude_failed``; otherwise the subjects' QC JSON files
        (``compute_qc``) will do, whose coverage does not depend on the thresholds (the
        workflow passes those, so editing a threshold retrains nothing).
    template_mask : template brain mask (defines the grid).
    out_images : ``images.npy``, [n_subjects, C, X, Y, Z] (C = ``len(modalities)``), rows in
        participant-id order (not the table's), z-normalised non-zero voxels per channel,
        background exactly 0; ``np.load(mmap_mode="r")``-able.
    out_participants : participants.tsv of the rows: input columns + subset, coverage.
    out_stats : stats.json: the normalisation record (:data:`RECORD_KEYS`; per channel the
        mean and sd in the map's unit), scope, voxel counts, statistics subjects,
        excluded subjects with reasons, split name, and ``images_sha256``: the sha256 of
        images.npy's rows in order (the array's bytes without the .npy header).
    split : split name (:func:`split_names`).
    split_settings : config section ``split`` (scheme, test_fraction, n_folds, seed).
    scope : ``train`` (the split's training subjects) or ``all`` (the paper's code).
    dtype : ``float32`` or ``float16`` storage.
    resolution_mm : 2, 4, 6 or 8; above 2 the maps are block-averaged first.
    exclude_failed : drop subjects failing QC (config ``qc.exclude_failed``); each is
        logged and listed in stats.json ``excluded``.
    modalities : the channels, in order (config key ``dataset.modalities``).
    eval_subset : the name of the held-out rows in ``subset``: ``test``, or ``validation``
        for a pretraining cohort.

    Returns
    -------
    The stats.json content.
    """
    if scope not in ("train", "all"):
        raise ValueError(f"normalise.scope={scope!r}; choose train or all.")
    if dtype not in DTYPES:
        raise ValueError(f"normalise.dtype={dtype!r}; choose {', '.join(DTYPES)}.")
    if resolution_mm not in RESOLUTIONS_MM:
        raise ValueError(f"normalise.resolution_mm={resolution_mm}; choose one of "
                         f"{RESOLUTIONS_MM}.")
    modalities = list(modalities)
    # rows in participant-id order, whatever the order of participants.tsv: training's
    # batches (the search trials' too) and the read-out's folds are drawn over row positions,
    # and a re-sorted spreadsheet trained other encoders (two losses swapped places in a
    # review's Table 3)
    table = participants_table(participants, modalities).sort_values(
        "participant_id", kind="stable").reset_index(drop=True)
    # a pretraining cohort's holdout share is its run's validation_fraction (pretrain_split)
    fraction_key = ("split.test_fraction" if eval_subset == "test"
                    else f"pretrain.<run>.{eval_subset}_fraction")
    table["subset"] = assign_split(table, split, **split_settings, fraction_key=fraction_key,
                                   eval_subset=eval_subset).replace(
        {"test": eval_subset}).to_numpy()
    assigned = table[["study", "subset"]].copy()  # the sides before any QC exclusion

    if isinstance(qc_table, (str, Path)):
        qc = read_qc_table(qc_table).set_index("participant_id")
        lacking = f"{qc_table} has no row for {{}}; rerun tabulate_qc."
    elif exclude_failed:
        raise ValueError("qc.exclude_failed needs the QC table (tabulate_qc), which applies "
                         "the thresholds, not the subjects' QC files.")
    else:
        qc = qc_metrics_table(qc_table).set_index("participant_id")
        lacking = "no QC file was given for {}; rerun their preprocessing (compute_qc)."
    missing_qc = [pid for pid in table["participant_id"] if pid not in qc.index]
    if missing_qc:
        raise InputError(lacking.format(", ".join(missing_qc[:10])))
    table["coverage"] = qc.loc[table["participant_id"], "coverage"].to_numpy()
    excluded = []
    if exclude_failed:
        passed = qc.loc[table["participant_id"], "qc_pass"].to_numpy(dtype=bool)
        for row in table[~passed].itertuples(index=False):
            reason = f"QC: {qc.loc[row.participant_id, 'qc_failures']}"
            excluded.append({"participant_id": row.participant_id, "reason": reason})
            log.warning("split %s: excluding %s (%s set): %s (qc.exclude_failed)", split,
                        row.participant_id, row.subset, reason)
        gone = sorted(set(table["study"].astype(str)) - set(table.loc[passed, "study"].astype(str)))
        if gone:  # the subjects' lines named them one by one, not the study
            log.warning("split %s: qc.exclude_failed leaves study/studies %s without any "
                        "subject (every one failed QC): the split, the tables and the model "
                        "have none of it.", split, ", ".join(gone))
        table = table[passed].reset_index(drop=True)
    if not (table["subset"] == "train").any():
        # the split itself always holds one (assign_split): only QC can empty it
        raise InputError(f"split {split}: no training subject left after the QC exclusions "
                         f"({len(excluded)} subjects failed QC, config key "
                         f"qc.exclude_failed); nothing could be trained. Check their "
                         f"preprocessing or set qc.exclude_failed: false.")
    if not (table["subset"] == eval_subset).any():
        # the split itself always holds one (assign_split): only QC can empty it
        raise InputError(f"split {split}: no {eval_subset} subject left after the QC "
                         f"exclusions ({len(excluded)} subjects failed QC, config key "
                         f"qc.exclude_failed); the split could not be evaluated. Check their "
                         f"preprocessing or set qc.exclude_failed: false.")

    if split_settings.get("scheme") != "loso":  # loso tests a study never trained on
        _log_one_sided_studies(table, split, eval_subset, before_qc=assigned,
                               holdout=split_settings.get("scheme") == "holdout")
    lookup = _map_lookup(maps, modalities)
    absent = [f"{pid} ({name})" for pid in table["participant_id"] for name in modalities
              if (pid, name) not in lookup]
    if absent:
        raise InputError(f"split {split}: no registered map given for {', '.join(absent[:10])}.")

    def subject_maps(participant_id: str, record: Mapping) -> dict[str, np.ndarray]:
        return {name: _read_map(lookup[(participant_id, name)], record, participant_id)
                for name in modalities}

    return write_normalised(table, subject_maps, template_mask, out_images, out_participants,
                            out_stats, split=split, scope=scope, dtype=dtype,
                            resolution_mm=resolution_mm, modalities=modalities,
                            eval_subset=eval_subset, excluded=excluded)


def _log_one_sided_studies(table: pd.DataFrame, split: str, eval_subset: str, *,
                           before_qc: pd.DataFrame, holdout: bool) -> None:
    """Name the studies whose subjects all fall on one side of ``split`` (``table``: after
    the QC exclusions; ``before_qc``: its study and subset columns before them): a study
    without a training subject (a one-subject study that won a test place, a kfold fold of
    one, QC exclusions) is evaluated as a site the model never saw; under a ``holdout``
    with test subjects, one without a test subject has no per-study result (a kfold fold
    without one is usual, the folds pool the study's results; a pretraining cohort's
    validation has no per-study results)."""
    def sides(rows: pd.DataFrame) -> pd.Series:
        return rows.groupby(rows["study"].astype(str))["subset"].agg(set)

    after, before = sides(table), sides(before_qc)

    def lacking(side: str) -> tuple[str, str]:
        studies = sorted(study for study, held in after.items() if side not in held)
        by_qc = [study for study in studies if side in before[study]]
        return ", ".join(studies), (f" (QC exclusions took that of {', '.join(by_qc)})"
                                    if by_qc else "")

    untrained, cause = lacking("train")
    if untrained:
        log.warning("split %s: study/studies %s have no training subject%s: their %s MAE "
                    "is that of a site the model never saw.", split, untrained, cause,
                    eval_subset)
    untested, cause = lacking(eval_subset)
    if holdout and eval_subset == "test" and untested:
        log.info("split %s: study/studies %s have no test subject%s: trained on, without a "
                 "per-study result of their own.", split, untested,
                 cause or " (too few subjects for a place)")


def _warn_of_empty_channels(row: np.ndarray, modalities: Sequence[str], participant_id: str,
                            split: str, resolution_mm: int) -> None:
    """Warn of a subject whose channel holds no data at the split's resolution: its row is
    then all zero, which reads as average tissue everywhere, and it is trained or tested on
    with its age. A map whose data leave every block under half measured (a thin slab, a
    registration at the field of view's edge) gives one at 4-8 mm; QC's coverage shows it,
    and ``qc.exclude_failed: true`` leaves QC failures out."""
    empty = [name for name, values in zip(modalities, row) if not values.any()]
    if empty:
        log.warning("split %s: subject %s has no %s data at %d mm (every block under half "
                    "measured): its row is all zero, read as average tissue. Look at its QC "
                    "coverage and registered map; set qc.exclude_failed: true to leave QC "
                    "failures out, or remove the subject.", split, participant_id,
                    " or ".join(empty), resolution_mm)


def write_normalised(table: pd.DataFrame, subject_maps, template_mask: str | Path,
                     out_images: str | Path, out_participants: str | Path,
                     out_stats: str | Path, *, split: str, scope: str, dtype: str,
                     resolution_mm: int, modalities: Sequence[str], eval_subset: str,
                     excluded: Sequence[Mapping] = ()) -> dict:
    """The split's record, statistics and arrays from any source of template-grid maps:
    ``subject_maps(participant_id, record)`` returns ``{modality: template-grid map}``
    (registered NIfTI maps for :func:`normalise_dataset`, resampled release volumes for
    :func:`brainage.openbhb.write_pretraining_split`). ``table`` holds the rows, in order,
    with their ``subset``; outputs and return value as :func:`normalise_dataset`."""
    for output, suffix in ((out_images, ".npy"), (out_participants, ""), (out_stats, "")):
        # this job owns them; a killed run's images temporary is as large as the array
        remove_stale_temporaries(output, suffix)
    factor = resolution_mm // TEMPLATE_VOXEL_MM
    modalities = list(modalities)
    brain, template_affine = load_mask(template_mask, what="template brain mask")
    start, stop, shape, affine = analysis_grid(brain, template_affine, factor)
    record = {"template_shape": list(brain.shape), "template_affine": template_affine.tolist(),
              "window_start": start.tolist(), "window_stop": stop.tolist(),
              "block_factor": factor, "resolution_mm": int(resolution_mm),
              "shape": list(shape), "affine": affine.tolist(), "dtype": dtype,
              "modalities": modalities,
              "scale_by_brain_median": [modality(name).scale_by_brain_median
                                        for name in modalities]}

    statistics_rows = table if scope == "all" else table[table["subset"] == "train"]
    log.info("split %s: statistics over the non-zero voxels of %d %s subjects at %d mm, "
             "channels %s", split, len(statistics_rows),
             "training" if scope == "train" else "(all)", resolution_mm, ", ".join(modalities))
    moments = [(0, 0.0, 0.0)] * len(modalities)
    for position, participant_id in enumerate(statistics_rows["participant_id"], start=1):
        volumes = subject_maps(participant_id, record)
        moments = [combine_moments(moments[index],
                                   volume_moments(channel(volumes[name], record, index)))
                   for index, name in enumerate(modalities)]
        if position % PROGRESS_EVERY == 0:
            log.info("statistics: %d of %d subjects read so far", position,
                     len(statistics_rows))
    means, sds = [], []
    for name, (count, mean, m2) in zip(modalities, moments):
        sd = math.sqrt(m2 / count) if count else 0.0
        if count == 0 or not sd > 0:
            shown = ", ".join(statistics_rows["participant_id"].head(5))
            more = len(statistics_rows) - 5
            raise InputError(f"split {split}: the statistics subjects ({shown}"
                             f"{f' and {more} more' if more > 0 else ''}) have {count} non-zero "
                             f"{name} voxels (sd {sd}): their registered {name} maps are empty "
                             f"or constant. Look at them in the results' preproc/ folder and "
                             f"at the QC table; delete a subject's preprocessed files to redo "
                             f"them, or fix the input maps.")
        log.info("split %s: %s mean %.4f, sd %.4f (%s) over %d voxels", split, name, mean, sd,
                 modality(name).unit, count)
        means.append(mean)
        sds.append(sd)
    record.update(mean=means, sd=sds)

    storage = DTYPES[dtype]
    row_shape = (len(modalities), *shape)
    # The rows' bytes in order: a training's resume fingerprint (SplitData.identity) holds
    # it, so a checkpoint is not resumed over changed images, at no cost to the training.
    images_digest = hashlib.sha256()
    row_bytes = int(np.prod(row_shape)) * np.dtype(storage).itemsize
    ensure_room(out_images, len(table) * row_bytes)
    with atomic_path(out_images, suffix=".npy") as temp:
        with open(temp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(storage)),
                "fortran_order": False, "shape": (len(table), *row_shape)})
            for row, participant_id in enumerate(table["participant_id"]):
                normalised = apply(subject_maps(participant_id, record), record,
                                   what=f"split {split}: subject {participant_id}")
                # One row at a time: memory stays one subject whatever the cohort size. A
                # plain write, not a memory map: a full disk is then an OSError, which
                # atomic_path names; through a map it killed the job with SIGBUS.
                stored = np.ascontiguousarray(normalised, dtype=storage)
                _warn_of_empty_channels(stored, modalities, participant_id, split,
                                        resolution_mm)
                handle.write(stored.data)
                images_digest.update(stored)  # the row as stored
                if (row + 1) % PROGRESS_EVERY == 0:
                    log.info("normalised %d of %d subjects so far", row + 1, len(table))

    columns = [c for c in table.columns if c not in ADDED_COLUMNS] + list(ADDED_COLUMNS)
    write_tsv(out_participants, table[columns])
    stats = {**record, "scope": scope, "n_voxels": [int(count) for count, _, _ in moments],
             "statistics_subjects": list(statistics_rows["participant_id"]),
             "excluded": list(excluded), "split": split,
             "images_sha256": images_digest.hexdigest(),
             "n_train": int((table["subset"] == "train").sum()),
             f"n_{eval_subset}": int((table["subset"] == eval_subset).sum())}
    write_json(out_stats, stats)
    log.info("split %s: wrote %d x %s %s images (%d train, %d %s)", split, len(table),
             row_shape, dtype, stats["n_train"], stats[f"n_{eval_subset}"], eval_subset)
    return stats
