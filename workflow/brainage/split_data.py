"""A split folder (``results/dataset/<split>``, written by the normalisation stage), read
and checked: :class:`SplitData` and :func:`load_split`.

The folder holds ``images.npy`` [n, C, X, Y, Z] (one channel per modality of
``stats.json``'s ``modalities``; z-normalised brain voxels, background exactly 0),
``participants.tsv`` (one row per image row, with a ``subset`` column "train" and "test",
or "validation" for a pretraining cohort) and ``stats.json`` (the normalisation record).
NumPy and pandas only, so the read-out jobs that need the table but no network stay light;
the batches and augmentations of training are in :mod:`brainage.data`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from brainage.config import ConfigError

log = logging.getLogger(__name__)

#: Subjects scanned at once when checking an array for NaN/inf (bounds memory use).
SCAN_CHUNK = 16


class DataError(ValueError):
    """A split folder or array is not what training needs; the message says what to do."""


@dataclass(frozen=True)
class SplitData:
    """One split: images, their participants, and which rows train and which evaluate.

    Attributes
    ----------
    images
        [n, C, X, Y, Z] float32/float16 array (usually a read-only memory map), z-units; one
        channel per modality (``stats["modalities"]``).
    table
        participants rows aligned with ``images`` (participant_id, age in years, study, ...).
    train_index, eval_index
        Row numbers of the training and evaluation (test or validation) subjects.
    eval_subset
        Name of the evaluation subset in outputs: "test" or "validation".
    """

    name: str
    images: np.ndarray
    table: pd.DataFrame
    stats: dict
    train_index: np.ndarray
    eval_index: np.ndarray
    eval_subset: str = "test"

    @property
    def ages(self) -> np.ndarray:
        """Ages of all rows (years), float64 [n]."""
        return self.table["age"].to_numpy(dtype=np.float64)

    @property
    def participant_ids(self) -> np.ndarray:
        return self.table["participant_id"].to_numpy(dtype=str)

    @property
    def studies(self) -> np.ndarray:
        return self.table["study"].astype(str).to_numpy()

    @property
    def resolution_mm(self) -> float:
        return float(self.stats.get("resolution_mm", 2))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The volumes' spatial shape (voxels)."""
        return tuple(int(size) for size in self.images.shape[2:])

    @property
    def modalities(self) -> list[str]:
        """The channels, in order."""
        return list(self.stats.get("modalities", ["stiffness"]))

    def channel_indices(self, modalities: Sequence[str] | None) -> list[int]:
        """Channel numbers of ``modalities`` (a cell's ``model.modalities``; None: all).

        Raises
        ------
        ConfigError
            A modality the split does not hold (names the config keys involved).
        """
        if not modalities:
            return list(range(len(self.modalities)))
        missing = [name for name in modalities if name not in self.modalities]
        if missing:
            raise ConfigError(f"config key model.modalities lists {', '.join(missing)}, but "
                              f"split {self.name} holds only {', '.join(self.modalities)} "
                              f"(config key dataset.modalities). Add it there or remove it "
                              f"from model.modalities.")
        return [self.modalities.index(name) for name in modalities]

    def subset_labels(self) -> np.ndarray:
        """"train" / eval_subset for every row ("" for rows in neither), [n] str."""
        labels = np.full(len(self.table), "", dtype=object)
        labels[self.train_index] = "train"
        labels[self.eval_index] = self.eval_subset
        return labels.astype(str)

    def identity(self) -> dict:
        """What makes two trainings on this split the same (for resume fingerprints)."""
        return {"name": self.name, "shape": list(self.images.shape),
                "dtype": str(self.images.dtype),
                "train": self.participant_ids[self.train_index].tolist(),
                "eval": self.participant_ids[self.eval_index].tolist(),
                # the losses and the supervised scaling read the ages: a corrected age
                # must not resume from weights trained on the old one
                "train_ages": self.ages[self.train_index].tolist(),
                # images_sha256 (None in a split written before it was recorded): a test
                # subject's changed image moves neither the lists nor the statistics
                "stats": {key: self.stats.get(key)
                          for key in ("mean", "sd", "scope", "modalities", "images_sha256")},
                # always None since every split array is stored normalised; kept so that
                # checkpoints of earlier versions still resume
                "normalisation": None}

    def with_validation(self, fraction: float, seed: int) -> "SplitData":
        """Carve a validation set out of the training subjects (stratified by study).

        The test subjects are dropped from the result entirely, so nothing tuned on it can
        see them. Each study keeps at least one training subject. The draw is among each
        study's subjects in participant-id order, so it does not depend on the order of the
        rows in participants.tsv (as the holdout test set does not).
        """
        if not 0 < fraction < 1:
            raise ConfigError(f"config key search.validation_fraction is {fraction}; expected a "
                              f"share between 0 and 1.")
        rng = np.random.default_rng(seed)
        # the training rows in participant-id order: the same subjects drawn whatever the
        # table's row order
        by_id = self.train_index[np.argsort(self.participant_ids[self.train_index],
                                            kind="stable")]
        studies = self.studies[by_id]
        sizes = {str(study): int(np.sum(studies == study)) for study in set(studies)}
        counts = validation_counts(sizes, fraction)
        validation = []
        for study in sorted(set(studies)):
            members = by_id[studies == study]
            if counts[str(study)] > 0:
                validation.extend(rng.choice(members, size=counts[str(study)],
                                             replace=False).tolist())
        if not validation:  # tiny training sets: at least one validation subject overall,
            # from a study that keeps another training subject where one has two
            spare = by_id[[sizes[study] > 1 for study in studies]]
            validation = [int(rng.choice(spare if len(spare) else by_id))]
        validation = np.sort(np.asarray(validation, dtype=np.int64))
        remaining = np.setdiff1d(self.train_index, validation)
        return replace(self, train_index=remaining, eval_index=validation,
                       eval_subset="validation", name=f"{self.name}-validation")


def smallest_batch(n_subjects: int, batch_size: int) -> int:
    """The smallest batch of an epoch of :func:`brainage.data.plan_batches` (which imports
    PyTorch; this does not, for planning): the last, smaller batch, except that a single
    leftover subject joins the batch before it."""
    full, leftover = divmod(n_subjects, batch_size)
    sizes = [batch_size] * full + ([leftover] if leftover else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        leftover = sizes.pop()
        sizes[-1] += leftover
    return min(sizes)


def check_batch_shares(n_train: int, batch_size: int, processes: int, *,
                       key: str = "train.batch_size") -> None:
    """Every one of ``processes`` training processes must get at least one subject of
    every batch of ``batch_size`` from ``n_train`` subjects (a ResNet cannot forward an
    empty batch; :mod:`brainage.distributed` splits each batch among the processes).

    Raises
    ------
    ConfigError
        Naming ``key``, the config key that sets the batch, the smallest batch of an
        epoch (:func:`smallest_batch`) and the process count.
    """
    smallest = smallest_batch(n_train, batch_size)
    if smallest < processes:
        raise ConfigError(
            f"config key {key} is {batch_size}: with {n_train} training subjects "
            f"the last batch of every epoch has {smallest} subjects, fewer than the "
            f"{processes} processes sharing it. Start at most {smallest} processes, "
            f"or choose {key} so that the remainder of {n_train} / batch_size is 0, 1 "
            f"(that subject joins the batch before it) or at least {processes}.")


def study_quotas(study_sizes: Mapping[str, int], fraction: float,
                 room: Mapping[str, int] | None = None) -> dict[str, int]:
    """How many of each study's subjects a stratified share ``fraction`` takes:
    ``round(fraction n)`` places in all (halves up), each study its ``floor(fraction
    n_study)`` and the rest to the largest remainders, so the share is the requested size
    and follows the study mix. Remainders are compared as computed in floating point (two
    equal on paper may differ in the last bit, e.g. 0.2 x 2 and 0.2 x 7); exact ties go by
    study name. The test set of a holdout split (:func:`brainage.normalise.assign_split`)
    and the search's validation set (:meth:`SplitData.with_validation`) are drawn with it.
    ``room``: the most a study may give (default its size); a place that a full study
    would get goes to the next largest remainder, so the share keeps its size."""
    room = study_sizes if room is None else room
    total = int(math.floor(fraction * sum(study_sizes.values()) + 0.5))
    exact = {study: fraction * size for study, size in study_sizes.items()}
    quota = {study: min(int(math.floor(value)), room[study]) for study, value in exact.items()}
    by_remainder = sorted(study_sizes, key=lambda study: (-(exact[study] - quota[study]), study))
    for study in by_remainder:
        if sum(quota.values()) >= total:
            break
        if quota[study] < room[study]:
            quota[study] += 1
    return quota


def validation_counts(study_sizes: Mapping[str, int], fraction: float) -> dict[str, int]:
    """Validation subjects per study that :meth:`SplitData.with_validation` carves out of
    training sets of ``study_sizes`` (study -> training subjects): :func:`study_quotas`,
    leaving each study at least one training subject (a place a one-subject study would
    get goes to another study). When all are 0, with_validation takes one subject overall
    instead."""
    return study_quotas(study_sizes, fraction,
                        room={study: size - 1 for study, size in study_sizes.items()})


def subjects_left_for_training(study_sizes: Mapping[str, int], fraction: float) -> int:
    """Training subjects that remain after :meth:`SplitData.with_validation` (the random
    search's trials train on these), from the split's training subjects per study."""
    total = sum(study_sizes.values())
    return total - max(1, sum(validation_counts(study_sizes, fraction).values()))


#: The rules that write a split folder, for messages: a grid's, or a pretraining run's.
_NORMALISED_BY = ("rule normalise_dataset (normalise_pretrain_cohort or prepare_openbhb for a "
                  "pretraining run's split)")


def _read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} cannot be read as JSON ({error}). Rerun the normalisation "
                        f"stage: {_NORMALISED_BY}.") from None


def check_finite(images: np.ndarray, participant_ids: Sequence[str], where: str) -> None:
    """Raise naming the subjects whose volume holds NaN or inf (scans in chunks)."""
    bad = []
    for start in range(0, len(images), SCAN_CHUNK):
        chunk = np.asarray(images[start:start + SCAN_CHUNK])
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        bad.extend(participant_ids[start + row] for row in np.flatnonzero(~finite))
    if bad:
        raise DataError(f"{where}: the volumes of {', '.join(bad)} contain NaN or inf. Check "
                        f"their preprocessed maps and rerun the normalisation stage.")


def load_split(split_dir: str | Path, *, require_eval: bool = True,
               check_images: bool = True) -> SplitData:
    """Open a split folder, memory-mapped, after checking it.

    Parameters
    ----------
    split_dir
        ``results/dataset/<split>`` with images.npy, participants.tsv, stats.json.
    require_eval
        Raise when the split has no test subject (the default: a grid cell must evaluate).
    check_images
        Scan every voxel for NaN and inf. A caller that reads no image, or checks what it
        reads (:func:`brainage.evaluate.cell_features`), passes False: the scan reads the
        whole array, 40 GB for 3,000 subjects of three maps at 2 mm, in each of its jobs.

    Raises
    ------
    DataError
        Missing files, an array that is not [n, C, X, Y, Z] or does not match the table and
        the record's channels, NaN or inf voxels (naming the subjects), a subset column
        other than train with test or validation, no training or no held-out subjects.
    """
    split_dir = Path(split_dir)
    paths = {name: split_dir / name for name in ("images.npy", "participants.tsv", "stats.json")}
    for name, path in paths.items():
        if not path.is_file():
            raise DataError(f"split folder {split_dir} lacks {name}. Run the normalisation "
                            f"stage first: {_NORMALISED_BY}.")
    try:
        images = np.load(paths["images.npy"], mmap_mode="r")
    except (ValueError, OSError) as error:
        raise DataError(f"{paths['images.npy']} is not a readable .npy array ({error}).") from None
    stats = _read_stats(paths["stats.json"])
    channels = len(stats.get("modalities", ["stiffness"]))
    if images.ndim != 5 or images.shape[1] != channels:
        raise DataError(f"{paths['images.npy']} has shape {images.shape}; expected "
                        f"[subjects, {channels} channels, X, Y, Z] ({paths['stats.json']} "
                        f"lists {channels} modalities). Rerun the normalisation stage.")
    table = pd.read_csv(paths["participants.tsv"], sep="\t",
                        dtype={"participant_id": str, "study": str, "subset": str})
    missing = [column for column in ("participant_id", "age", "study", "subset")
               if column not in table.columns]
    if missing:
        raise DataError(f"{paths['participants.tsv']} lacks column(s) {', '.join(missing)}.")
    if len(table) != len(images):
        raise DataError(f"{paths['participants.tsv']} has {len(table)} rows but "
                        f"{paths['images.npy']} holds {len(images)} volumes; they must be "
                        f"row-aligned. Rerun the normalisation stage.")
    held_out = sorted(set(table["subset"]) - {"train"})
    if len(held_out) > 1 or not set(held_out) <= {"test", "validation"}:
        raise DataError(f"{paths['participants.tsv']}: column subset has value(s) "
                        f"{', '.join(map(str, held_out))}; allowed are 'train' and one of "
                        f"'test' (a split) or 'validation' (a pretraining cohort).")
    eval_subset = held_out[0] if held_out else "test"
    ages = pd.to_numeric(table["age"], errors="coerce")
    if ages.isna().any():
        raise DataError(f"{paths['participants.tsv']}: non-numeric age for "
                        f"{', '.join(table['participant_id'][ages.isna()])}.")
    table["age"] = ages.astype(float)
    if check_images:
        check_finite(images, table["participant_id"].tolist(), str(paths["images.npy"]))
    subset = table["subset"].to_numpy()
    train_index = np.flatnonzero(subset == "train")
    eval_index = np.flatnonzero(subset == eval_subset)
    if len(train_index) == 0:
        raise DataError(f"split {split_dir.name}: no training subjects in "
                        f"{paths['participants.tsv']}.")
    if require_eval and len(eval_index) == 0:
        raise DataError(f"split {split_dir.name}: no test subjects in "
                        f"{paths['participants.tsv']}; the grid cell could not be evaluated. "
                        f"Check config key split.test_fraction / split.scheme.")
    return SplitData(name=split_dir.name, images=images, table=table, stats=stats,
                     train_index=train_index, eval_index=eval_index, eval_subset=eval_subset)
