"""Apply a model bundle to a preprocessed cohort: brain age and brain-age gap per subject.

A cohort's maps have been through the training cohort's per-subject preprocessing
(:mod:`brainage.preprocess.chain`). :func:`predict_cohort` then normalises each map with the
bundle's TRAINING normalisation record (never re-estimated on the new cohort), embeds it
with the bundle's encoder, reads the age out with the bundle's read-out, and reports the
raw and age-bias corrected gap (:mod:`brainage.agebias`) per subject and per group.
Subjects failing preprocessing QC are listed with their reason, never predicted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from brainage.agebias import AgeBias, fit_age_bias
from brainage.bundle import (
    MANIFEST_DIGEST_KEY,
    BundleError,
    ModelBundle,
    read_bundle,
    software_versions,
)
from brainage.config import ConfigError
from brainage.data import VolumeStore
from brainage.inputs import (
    InputError,
    check_bias_reference_group,
    check_cohort_table,
    cohort_groups,
    read_participants,
)
from brainage.io import atomic_path, headless_pyplot, write_json, write_tsv
from brainage.models import EMBED_BATCH, BrainAgeNet, build_model, embed
from brainage.normalise import apply as apply_normalisation
from brainage.normalise import check_grid
from brainage.preprocess.images import load_volume
from brainage.qc import (
    LEVEL_TOLERANCE_SD,
    METRICS,
    MIN_COMPARED_SUBJECTS,
    QC_THRESHOLDS,
    describe_stiffness_offset,
    median_stiffness,
    qc_failures,
    read_qc_records,
    stiffness_offset,
    thresholds,
    warn_about_mixed_references,
)
from brainage.readout import Readout
from brainage.runtime import runtime_setup

log = logging.getLogger(__name__)

#: Columns predictions.tsv adds after the cohort's participants.tsv columns (participant_id,
#: age, sex, study, group, ...). Ages and gaps in years.
#: ``registered_by`` (``T1w_brain``, ``stiffness``, ...) and ``skull_stripped_by``
#: (``deepbet``, ``mri_synthstrip``, ``none``): a subject registered or stripped unlike the
#: training subjects is warned of in the log, and named here for whoever reads the table.
#: ``seen_in_training``: what of the model's making saw the subject, by its participant_id
#: or by a map byte-identical to one it saw (``train (split holdout of dataset.root)``,
#: ``pretraining (pretrain.t1.source.root), as sub-t1w4``, ``train (...): a map
#: byte-identical to sub-01's``; empty: none, or not known on the route without
#: Snakemake); such a subject has status ``seen_in_training``.
PREDICTION_COLUMNS = ("status", "qc_pass", "qc_reason", "predicted_age", "gap",
                      "corrected_gap", "corrected_predicted_age", "within_training_ages",
                      "qc_dice", "qc_correlation", "qc_coverage", "registered_by",
                      "skull_stripped_by", "seen_in_training")
SUMMARY_COLUMNS = ("grouped_by", "group", "n", "n_predicted", "n_qc_failed",
                   "n_seen_in_training", "n_gap", "n_outside_training_ages", "age_mean",
                   "mean_gap", "sd_gap",
                   "mean_corrected_gap", "sd_corrected_gap", "corrected_gap_ci95_low",
                   "corrected_gap_ci95_high")


@dataclass
class BrainAgeModel:
    """A loaded bundle, ready to predict: encoder, read-out, age-bias correction.

    Build it with :meth:`from_bundle`.
    """

    bundle: ModelBundle
    network: BrainAgeNet     # eval mode, on ``device``
    readout: Readout
    bias: AgeBias
    device: object           # torch.device

    @classmethod
    def from_bundle(cls, bundle: ModelBundle | str | Path, *, device: str | None = None,
                    threads: int | None = None) -> "BrainAgeModel":
        """Load and verify a bundle (:func:`brainage.bundle.read_bundle`), build the network.

        ``device``: ``cpu``/``cuda``/``auto``; default the cell's ``train.device``.
        ``threads``: PyTorch's CPU threads; default the cell's ``train.threads``.

        From Python (a notebook): this sets PyTorch's process-wide settings as a training
        job does (:func:`brainage.runtime.runtime_setup`: the thread count, deterministic
        algorithms off on the CPU), for the rest of the session. Then, per subject,
        :func:`normalise_subject` on its preprocessed template-grid maps and
        :meth:`predict_age` on the stacked result; ``bias.corrected_gap`` corrects the gap.
        The pipeline predicts only subjects that pass QC: :func:`read_qc` of a subject's
        ``sub-<label>_qc.json`` with :func:`brainage.qc.thresholds` of the bundle's
        ``manifest["preprocessing"]["qc"]`` gives the verdict (:func:`predict_cohort` does
        all of this for a cohort).
        """
        import torch

        if not isinstance(bundle, ModelBundle):
            bundle = read_bundle(bundle)
        settings = bundle.settings
        train_settings = dict(settings["train"])
        if device is not None:
            train_settings["device"] = device
        if threads is not None:
            train_settings["threads"] = int(threads)
        if train_settings["device"] == "cuda" and not torch.cuda.is_available():
            # runtime_setup would say to edit config key train.device, which a bundle's user
            # does not have: the device is the command's, or the exporting run's setting
            origin = ("--device cuda was asked for" if device is not None else
                      f"model bundle {bundle.path} was exported by a run with train.device "
                      f"'cuda', the device it predicts on unless told otherwise")
            raise ConfigError(
                f"{origin}, but PyTorch sees no CUDA device here. Choose the device: --device "
                f"cpu (or auto) of `python -m brainage.predict run` (device= of "
                f"predict_cohort), or run on a GPU node.")
        torch_device, _ = runtime_setup(train_settings)  # features are float32 (embed_all)
        # one channel per map of the bundle's normalisation record (export writes the
        # model's channels there), also where model.modalities is null (all of the split's)
        try:  # an absurd width in an edited manifest fails to allocate
            network = build_model(settings["model"],
                                  in_channels=len(bundle.normalisation["modalities"]))
            network.load_state_dict(bundle.encoder_state)
        except RuntimeError as error:
            raise BundleError(f"{bundle.path / 'encoder.pt'} does not fit the network its "
                              f"manifest describes ({error}); the bundle is inconsistent. "
                              f"Re-export it.") from None
        network.to(torch_device).eval()
        try:  # a format-1 manifest has no digest to catch an edited read-out description
            readout = Readout.from_state(bundle.readout_state, bundle.manifest["readout"])
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise BundleError(f"{bundle.path / 'manifest.json'}: its 'readout' does not "
                              f"describe the read-out of readout.pt ({type(error).__name__}: "
                              f"{error}); the bundle is damaged. Re-copy or re-export "
                              f"it.") from None
        return cls(bundle=bundle, network=network, readout=readout,
                   bias=AgeBias.from_record(bundle.bias_correction), device=torch_device)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One subject's input [C, X, Y, Z]: the bundle's channels on its analysis grid
        (``resolution_mm`` blocks of the template's window), as :func:`normalise_subject`
        builds it; () for a bundle whose record lacks the grid's shape."""
        record = self.bundle.normalisation
        return ((len(record["modalities"]), *map(int, record["shape"]))
                if "shape" in record else ())

    def features(self, volumes: np.ndarray) -> np.ndarray:
        """Normalised volumes [n, C, X, Y, Z] (z-units, :attr:`input_shape` each) -> read-out
        features [n, D] float32.

        Raises
        ------
        InputError
            Volumes of another shape (the network pools globally and read a 2 mm map, axes
            in another order or a map of two channels as an age that looked plausible), or
            with NaN or inf (an age of NaN).
        """
        volumes = np.asarray(volumes, dtype=np.float32)
        expected = self.input_shape
        if volumes.ndim != 5 or (expected and volumes.shape[1:] != expected):
            raise InputError(
                f"model {self.bundle.name} takes normalised volumes of shape [n, "
                f"{', '.join(map(str, expected or ('C', 'X', 'Y', 'Z')))}] (its channels "
                f"{', '.join(self.bundle.normalisation['modalities'])} on its "
                f"{self.bundle.normalisation.get('resolution_mm', '?')} mm analysis grid, in "
                f"z-units), not {list(volumes.shape)}. Build each subject's input from its "
                f"template-grid maps with brainage.apply.normalise_subject.")
        if not np.isfinite(volumes).all():
            bad = sorted({int(row) for row in np.nonzero(~np.isfinite(volumes))[0]})
            raise InputError(f"the volumes given to model {self.bundle.name} hold NaN or inf "
                             f"(rows {', '.join(map(str, bad[:10]))}): no age can be read "
                             f"out of them.")
        store = VolumeStore(volumes, self.device)
        return embed(self.network, store, np.arange(len(volumes)),
                     which=self.bundle.manifest["readout"]["features"])

    def predict_age(self, volumes: np.ndarray) -> np.ndarray:
        """Normalised volumes [n, C, X, Y, Z] -> predicted ages [n] (years), float64.

        A subject's age depends on the others in its batch by about 1e-5 years on the CPU
        (float32 convolutions take other paths for other batch sizes): a subject predicted
        alone, or in another cohort, matches the pipeline's number to about 1e-4 years, not
        bit for bit."""
        if len(volumes) == 0:
            return np.zeros(0)
        return self.age_from_features(self.features(volumes))

    def age_from_features(self, features: np.ndarray) -> np.ndarray:
        """Read-out features [n, D] (:meth:`features`) -> predicted ages [n] (years)."""
        return self.readout.predict(np.asarray(features, dtype=np.float64))


def read_qc(path: str | Path, minimums: Mapping, *, subject: str
            ) -> tuple[bool, str, dict, str, str, float | None]:
    """Subject ``subject``'s QC verdict from its ``sub-<label>_qc.json`` (rule
    correct_and_register, step compute_qc).

    Parameters
    ----------
    path : path
        The QC JSON (metrics ``dice``, ``correlation``, ``coverage``, and the
        ``participant_id`` it was computed for, which must be ``sub-<subject>``).
    minimums : mapping
        :func:`brainage.qc.thresholds` of the config section ``qc``.
    subject : str
        The subject label the file stands for.

    Returns
    -------
    passed : bool
    reason : str
        The thresholds missed, e.g. ``"dice 0.812 < 0.85"`` (empty when passed).
    metrics : dict
        ``qc_dice``, ``qc_correlation``, ``qc_coverage``.
    reference_kind : str
        The image the subject was registered by (``T1w_brain``, ``stiffness``, ...;
        ``unknown`` when the record has none).
    skullstrip_route : str
        What stripped the subject's T1w (``deepbet``, ``mri_synthstrip``, ...; ``none``
        without a T1w; ``unknown`` when the record has none).
    median_stiffness : float or None
        :func:`brainage.qc.median_stiffness` of the record (kPa).
    """
    (participant_id, record), = read_qc_records([path], require=METRICS).items()
    if participant_id != f"sub-{subject}":
        # a file copied or linked from another subject would pass that subject's verdict on
        raise InputError(f"QC file {path} is the record of {participant_id}, not of "
                         f"sub-{subject}; rerun sub-{subject}'s preprocessing (rule "
                         f"correct_and_register, step compute_qc).")
    failures = qc_failures(record, minimums)
    return (not failures, "; ".join(failures),
            {f"qc_{metric}": float(record[metric]) for metric in METRICS},
            record.get("reference_kind") or "unknown", record.get("skullstrip_route") or "unknown",
            median_stiffness(record))


def normalise_subject(bundle: ModelBundle, maps: Mapping[str, str | Path], *, subject: str
                      ) -> np.ndarray:
    """A subject's preprocessed maps (``{modality: file}``) -> the model's input
    [C, x, y, z] (z-units), channels in the bundle's order.

    Uses the bundle's TRAINING normalisation record (:func:`brainage.normalise.apply`);
    nothing is estimated on the new cohort.

    Raises
    ------
    InputError
        A modality of the bundle without a map, an unreadable or empty map, NaN/inf
        voxels, a map off the bundle's template grid, or z-scores beyond the range of the
        record's dtype (a float16 record: outlier voxels would become inf).
    """
    volumes = {}
    for name in bundle.normalisation["modalities"]:
        if name not in maps:
            raise InputError(f"subject {subject}: no preprocessed {name} map; model "
                             f"{bundle.name} needs {', '.join(bundle.normalisation['modalities'])}.")
        label = f"subject {subject}: preprocessed {name} map"  # load_volume adds the path
        what = f"{label} {maps[name]}"
        # the unit check of raw maps too: a map in Pa, preprocessed elsewhere, predicted
        # an age that looked plausible
        data, affine = load_volume(maps[name], what=label, kind=name)
        check_grid(data.shape, affine, bundle.normalisation, what=what)
        if not np.all(np.isfinite(data)):
            raise InputError(f"{what} has NaN/inf voxels; rerun its preprocessing.")
        volumes[name] = data
    return apply_normalisation(volumes, bundle.normalisation,
                               what=f"subject {subject}").astype(np.float32)


def predict_cohort(bundle_dir: str | Path, dataset_root: str | Path,
                   maps: Mapping[str, str | Path], qc: Mapping[str, str | Path], *,
                   predictions_path: str | Path, summary_path: str | Path,
                   figure_path: str | Path | None = None,
                   provenance_path: str | Path | None = None, cohort: str = "cohort",
                   qc_thresholds: Mapping | None = None, group_column: str | None = None,
                   bias_reference_group: str | None = None,
                   seen_in_training: Mapping[str, str] | None = None,
                   device: str | None = None) -> pd.DataFrame:
    """Predict brain age for every subject of a preprocessed cohort; write the reports.

    Parameters
    ----------
    bundle_dir : path
        Model bundle (``results/models/<name>``); verified before use.
    dataset_root : path
        The cohort's BIDS-like dataset (its participants.tsv gives age, sex, study, group).
    maps : mapping of label to ``{modality: path}``
        Each subject's preprocessed maps (``..._space-<space>_res-2_desc-preproc_<modality>``,
        template grid) of the bundle's modalities; one per participants.tsv row.
    qc : mapping of label to path
        Each subject's ``sub-<label>_qc.json``. A subject failing QC is listed with status
        ``qc_failed`` and the thresholds it missed, and gets no prediction: a map that is
        misregistered or covers too little of the brain gives a meaningless brain age.
    predictions_path, summary_path, figure_path : path
        ``predictions.tsv`` (one row per subject: the participants.tsv columns, then
        :data:`PREDICTION_COLUMNS`), ``summary.tsv`` (per group, :data:`SUMMARY_COLUMNS`)
        and the gap-by-group figure (optional).
    provenance_path : path, optional
        ``provenance.json``: the bundle (its manifest's and files' checksums, its source
        cell, the versions it was exported with), the versions this prediction ran with,
        the bias correction and QC thresholds used, the subjects that failed QC; default
        next to ``predictions_path``. Written before the tables: a table without it is a
        run's that stopped.
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
    seen_in_training : mapping of participant_id to str, optional
        Subjects the model has seen (by participant_id, or by a map byte-identical to one
        it saw), and in what (the workflow knows its split and pretraining cohort; a bundle
        records no ids). They are predicted,
        marked (status ``seen_in_training``) and left out of the summary, the figure and
        the age-bias refit: their predictions are optimistic (the demo's bundle: MAE 1.4
        years on its training subjects, 5.2 on its test subjects).
    device : str, optional
        ``cpu``/``cuda``/``auto``; default the exported cell's ``train.device``.

    Returns
    -------
    pandas.DataFrame
        The predictions table written.

    Raises
    ------
    InputError
        A subject without an image of the bundle's modalities (naming it), a preprocessed
        map or QC file, a map off the template grid; a ``bias_reference_group`` with fewer
        than 3 QC-passed subjects, or all of one age (before any subject is embedded); a
        ``qc_thresholds`` without all three.
    BundleError
        Missing, tampered or incompatible bundle.
    """
    bundle = bundle_dir if isinstance(bundle_dir, ModelBundle) else read_bundle(bundle_dir)
    participants = read_participants(dataset_root, bundle.normalisation["modalities"],
                                     needed_by=f"model bundle {bundle.path}",
                                     to_predict=True)
    table_path = Path(dataset_root) / "participants.tsv"
    labels = [pid[len("sub-"):] for pid in participants["participant_id"]]
    group_column = check_cohort_table(participants, table_path, cohort=cohort,
                                      group_column=group_column,
                                      bias_reference_group=bias_reference_group)
    for kind, given in (("preprocessed map", maps), ("QC file", qc)):
        missing = [label for label in labels if label not in given]
        if missing:
            raise InputError(f"cohort {cohort}: no {kind} for sub-{', sub-'.join(missing)} "
                             f"listed in {table_path}; run their preprocessing first.")
    model = BrainAgeModel.from_bundle(bundle, device=device)
    log.info("cohort %s: %d subjects, bundle %s (%s/%s seed %s)", cohort, len(labels),
             model.bundle.path, model.bundle.manifest["source"]["experiment"],
             model.bundle.manifest["source"]["variant"], model.bundle.manifest["source"]["seed"])

    given = qc_thresholds is not None
    if not given:
        qc_thresholds = (model.bundle.manifest.get("preprocessing") or {}).get("qc") or {}
    missing = [key for key in QC_THRESHOLDS.values() if key not in qc_thresholds]
    if missing and given:
        raise InputError(f"cohort {cohort}: qc_thresholds has no {', '.join(missing)}; give "
                         f"all of {', '.join(QC_THRESHOLDS.values())} (config section qc).")
    if missing:
        raise BundleError(f"model bundle {model.bundle.path} records no QC threshold(s) "
                          f"{', '.join(missing)}; pass qc_thresholds (config section qc).")
    passed, reasons, qc_metrics, references, routes, medians = [], [], [], [], [], []
    for label in labels:
        ok, reason, metrics, reference, route, median = read_qc(
            qc[label], thresholds(qc_thresholds), subject=label)
        medians.append(np.nan if median is None else median)
        passed.append(ok)
        reasons.append(reason)
        qc_metrics.append(metrics)
        references.append(reference)
        routes.append(route)
        if not ok:
            log.warning("cohort %s: sub-%s fails preprocessing QC (%s): reported, not "
                        "predicted", cohort, label, reason)
    passed = np.array(passed, dtype=bool)
    warn_about_mixed_references(
        f"cohort {cohort}", [f"sub-{label}" for label in labels], references,
        advice="compare their gaps with care (a subject without a T1w is registered by its "
               "stiffness map)")
    _warn_about_references_unlike_training(
        cohort, labels, references,
        model.bundle.manifest.get("training", {}).get("registration_references"))
    _warn_about_skull_strippers_unlike_training(
        cohort, labels, routes, model.bundle.manifest.get("training", {}).get("skullstrip_routes"))
    _warn_about_stiffness_unlike_training(
        cohort, participants["age"].to_numpy(dtype=np.float64)[passed],
        np.asarray(medians, dtype=np.float64)[passed],
        model.bundle.manifest.get("training", {}).get("stiffness_by_age"),
        studies=participants["study"].to_numpy()[passed] if "study" in participants else None)
    seen_in_training = seen_in_training or {}
    seen_as = [seen_in_training.get(pid, "") for pid in participants["participant_id"]]
    seen = np.array([bool(what) for what in seen_as], dtype=bool)
    if seen.any():
        log.warning("cohort %s: %d subject(s) the model has seen (by participant_id, or by "
                    "a byte-identical map), predicted but left out of the summary, the figure "
                    "and any age-bias refit (column seen_in_training): %s", cohort,
                    int(seen.sum()),
                    ", ".join(f"{pid} ({what})" for pid, what
                              in zip(participants["participant_id"], seen_as) if what))
    # predicted and new to the model / predicted but seen (left out of the summary)
    new_predicted, left_out = passed & ~seen, passed & seen
    if bias_reference_group is not None:
        check_bias_reference_group(participants, group_column, bias_reference_group, passed,
                                   cohort=cohort,
                                   seen={pid for pid, what in seen_in_training.items() if what})
    predicted = np.full(len(labels), np.nan)
    chosen = [label for label, ok in zip(labels, passed) if ok]
    if chosen:
        # a batch of subjects at a time, only their features kept: the whole cohort's
        # volumes took 4.4 MB per subject and map at 2 mm (26 GB for 2,000 subjects of three
        # maps, beyond the job's memory). The network sees the batches it saw before.
        features = []
        for start in range(0, len(chosen), EMBED_BATCH):
            features.append(model.features(np.stack([
                normalise_subject(model.bundle, maps[label], subject=f"sub-{label}")
                for label in chosen[start:start + EMBED_BATCH]])))
        predicted[passed] = model.age_from_features(np.concatenate(features))

    ages = participants["age"].to_numpy(dtype=np.float64)
    table = participants.copy()
    bias = model.bias
    bias_source = (f"bundle: {model.bundle.bias_correction.get('description', '')} "
                   f"({model.bundle.bias_correction.get('n_subjects')} subjects)")
    if bias_reference_group is not None:
        in_group = (cohort_groups(table, group_column) == str(bias_reference_group)).to_numpy()
        # the line is fitted on members with a prediction and an age (fit_age_bias drops
        # the others) that the model has not seen, and the provenance counts those
        reference = new_predicted & in_group & np.isfinite(ages)
        bias = fit_age_bias(ages[reference], predicted[reference],
                            where=f"cohort {cohort} group {bias_reference_group!r}")
        bias_source = (f"cohort {cohort} group {bias_reference_group!r} "
                       f"({reference.sum()} subjects)")
        if bias.slope <= -MAX_REFIT_SLOPE:
            log.warning(
                "cohort %s: the predicted ages of group %r hardly rise with their ages (the "
                "refitted gap falls %.2f years per year of age; predictions carrying no age "
                "would give -1): the refit turns predictions into ages, so its corrected "
                "ages look right whatever the model saw, and its corrected gaps say little. "
                "Check the cohort's maps (another drive frequency, inversion or "
                "preprocessing than the training maps?) and the uncorrected gaps before "
                "reading them.", cohort, bias_reference_group, -bias.slope)
    log.info("age-bias correction from %s: %s", bias_source, bias)
    training = model.bundle.manifest.get("training", {})
    table["status"] = np.where(passed, np.where(seen, "seen_in_training", "predicted"),
                               "qc_failed")
    table["qc_pass"] = passed
    table["qc_reason"] = reasons
    for column in qc_metrics[0]:
        table[column] = [metrics[column] for metrics in qc_metrics]
    table["registered_by"] = references
    table["skull_stripped_by"] = routes
    table["seen_in_training"] = seen_as
    table["predicted_age"] = predicted
    table["gap"] = predicted - ages
    table["corrected_gap"] = bias.corrected_gap(ages, predicted)
    table["corrected_predicted_age"] = ages + table["corrected_gap"]
    within = (ages >= training.get("age_min", -np.inf)) & (ages <= training.get("age_max",
                                                                                np.inf))
    aged = np.isfinite(ages)
    table["within_training_ages"] = within
    if not aged.all():  # a cohort to predict may lack ages: unknown there (empty in the TSV)
        table["within_training_ages"] = table["within_training_ages"].astype("boolean").mask(
            ~aged)
        log.warning("cohort %s: %d subject(s) without an age (%s): a predicted age each, no "
                    "brain-age gap", cohort, int((~aged).sum()),
                    ", ".join(table.loc[~aged, "participant_id"].tolist()[:10])
                    + (", ..." if (~aged).sum() > 10 else ""))
    outside = table.loc[aged & ~within, "participant_id"].tolist()
    if outside:  # the read-out extrapolates there, and brain-age gaps grow with the distance
        log.warning("cohort %s: %d subject(s) outside the training ages %s-%s years (%s): "
                    "their predictions extrapolate; column within_training_ages is false",
                    cohort, len(outside), training.get("age_min"), training.get("age_max"),
                    ", ".join(outside[:10]) + (", ..." if len(outside) > 10 else ""))
    if bias_reference_group is not None:
        _warn_about_ages_beyond_the_reference_group(cohort, table, ages, reference,
                                                    new_predicted, bias_reference_group)
    table = table[list(participants.columns) + list(PREDICTION_COLUMNS)]

    if not bias.has_reference_statistics:
        log.warning("the bundle's age-bias line was saved without its reference set's "
                    "statistics (an evaluation before they were saved): the group intervals "
                    "of %s take the line as exact and are too narrow. Rerun the cell's "
                    "evaluate_encoder and export the bundle again for the full interval.",
                    summary_path)
    summary = summarise_gaps(table, group_column, bias=bias,
                             reference_group=bias_reference_group)
    manifest = model.bundle.manifest
    # first: a run killed between the reports (a time limit) left a predictions.tsv that
    # named no model and read as finished; the record of the model comes before the numbers,
    # and an earlier run's tables go, so that the record never stands beside older numbers
    for earlier in (predictions_path, summary_path, figure_path):
        if earlier is not None:
            Path(earlier).unlink(missing_ok=True)
    write_json(provenance_path or Path(predictions_path).with_name("provenance.json"), {
        # absolute: the record is read from other folders than the one it was made in
        "cohort": cohort, "dataset_root": str(Path(dataset_root).resolve()),
        "bundle": str(Path(model.bundle.path).resolve()), "bundle_name": model.bundle.name,
        # the manifest's digest covers its normalisation, template and QC records too, which
        # two bundles of the same weights may not share
        "bundle_manifest_sha256": manifest.get(MANIFEST_DIGEST_KEY),
        "bundle_created_utc": manifest.get("created_utc"),
        # the cell, not its test metrics: predictions go back to a clinic
        "bundle_source": {key: value for key, value in (manifest.get("source") or {}).items()
                          if key != "metrics"},
        "bundle_files": manifest["files"],
        "bundle_versions": manifest["versions"],  # the exporting run's
        "versions": software_versions(),  # this prediction's
        "bias_correction": {"intercept": bias.intercept, "slope": bias.slope,
                            "source": bias_source},
        "qc_thresholds": thresholds(qc_thresholds),
        # as summary.tsv counts them: status predicted, or seen_in_training (predicted, left
        # out); a subject failing QC is qc_failed, seen or not
        "n_subjects": len(table), "n_predicted": int(new_predicted.sum()),
        "n_seen_in_training": int(left_out.sum()),
        "qc_failed": [{"participant_id": pid, "reason": reason}
                      for pid, ok, reason in zip(table["participant_id"], passed, reasons)
                      if not ok],
        "seen_in_training": [{"participant_id": pid, "seen_in": what}
                             for pid, what in zip(table["participant_id"], seen_as) if what]})
    write_tsv(predictions_path, table)
    write_tsv(summary_path, summary)
    if figure_path is not None:
        plot_gap_by_group(table, group_column, figure_path,
                          title=f"{cohort}: brain-age gap"
                                + (f" by {group_column}" if group_column else "")
                                + f" (model {model.bundle.name})")
    gaps = ", ".join(f"{row.group} {row.mean_corrected_gap:+.2f} y"
                     for row in summary.itertuples() if np.isfinite(row.mean_corrected_gap))
    log.info("cohort %s: predicted %d of %d subjects (%d failed QC%s); %s", cohort,
             new_predicted.sum(), len(table), (~passed).sum(),
             f", {left_out.sum()} seen in training and left out of the summary"
             if left_out.any() else "",
             f"mean corrected gap {gaps}" if gaps
             else "no subject predicted" if not passed.any()
             else "every predicted subject was seen in training" if not new_predicted.any()
             else "no gaps (no predicted subject has an age)")
    return table


def _warn_about_ages_beyond_the_reference_group(cohort: str, table: pd.DataFrame,
                                                ages: np.ndarray, reference: np.ndarray,
                                                predicted: np.ndarray, group: str) -> None:
    """Name the predicted subjects older or younger than every member of the reference
    group the age-bias line was refitted on: the line is extrapolated to them, and its
    slope error grows with the distance (controls aged 21-34 gave healthy 65- to 76-year-
    olds corrected gaps of +19 to +36 years, where the bundle's line gave about 0). Their
    group intervals widen with it (summarise_gaps); the per-subject corrected columns
    carry no interval."""
    low, high = ages[reference].min(), ages[reference].max()
    beyond = predicted & np.isfinite(ages) & ((ages < low) | (ages > high))
    if beyond.any():
        named = table.loc[beyond, "participant_id"].tolist()
        log.warning("cohort %s: %d subject(s) outside the ages of reference group %r "
                    "(%.1f-%.1f years), on which the age-bias line was refitted (%s): their "
                    "corrected_gap and corrected_predicted_age extrapolate the line and can "
                    "be far off; choose a reference group that spans the cohort's ages, or "
                    "use the bundle's line (leave predict.bias_reference_group, or "
                    "--bias-reference-group, unset)",
                    cohort, len(named), group, low, high,
                    ", ".join(named[:10]) + (", ..." if len(named) > 10 else ""))


def _unlike_training(labels: Sequence[str], values: Sequence[str],
                     trained: Mapping[str, int] | None, *, ignore: Sequence[str] = ()
                     ) -> tuple[int, str, str, str] | None:
    """The cohort's subjects whose ``values`` (one per label) none of the model's training
    subjects had (``trained``: the bundle's counts per value; absent in bundles exported
    before it was recorded), leaving out the ``ignore`` values on both sides: their count,
    their values, their first names and the training's counts, as a warning writes them;
    None when there is nothing to warn about."""
    known = {value: count for value, count in (trained or {}).items() if value not in ignore}
    if not known:
        return None
    unlike = [(f"sub-{label}", value) for label, value in zip(labels, values)
              if value not in ignore and value not in known]
    if not unlike:
        return None
    return (len(unlike), " or ".join(sorted({value for _, value in unlike})),
            ", ".join(name for name, _ in unlike[:10]) + (", ..." if len(unlike) > 10 else ""),
            ", ".join(f"{value} ({count})" for value, count in known.items()))


#: A refitted age-bias line whose gap falls faster than this per year of age is warned
#: of: the predictions hardly follow age (a model's usual slopes are -0.2 to -0.7).
MAX_REFIT_SLOPE = 0.9


def _warn_about_stiffness_unlike_training(cohort: str, ages: np.ndarray,
                                          medians: Sequence[float],
                                          trained: Mapping | None, *,
                                          studies: np.ndarray | None = None) -> None:
    """Warn when the cohort's maps lie, at their ages, far from the model's training
    subjects' (the bundle's ``training.stiffness_by_age``, :data:`LEVEL_TOLERANCE_SD`), or,
    where the whole cohort does not, one of its ``studies`` (a pooled cohort with one site
    of another frequency: half of it 30 % stiffer averaged 2.4 over all): maps of another
    drive frequency or inversion pass every check and QC (none depends on the scale), and
    the model reads the offset as age; a review's cohort 30 % stiffer was predicted 26-32
    years old at ages 21-76, without a word. Subjects outside the training ages are not
    compared (:func:`brainage.qc.stiffness_offset`)."""
    if not trained:
        return
    medians = np.asarray(medians, dtype=np.float64)  # NaN: no median recorded
    parts = [("its subjects' maps", np.ones(len(ages), dtype=bool))]
    if studies is not None:  # a subject without a study is one of the n/a group, as in
        studies = pd.Series(studies, dtype=object).fillna("n/a").astype(str).to_numpy()
        if len(set(studies)) > 1:  # summary.tsv
            parts += [(f"the maps of its study {study}", studies == study)
                      for study in dict.fromkeys(studies)]
    for whose, members in parts:
        # a cohort of one subject is compared too: `predict run` of a single patient
        offset = stiffness_offset(trained, ages[members], medians[members],
                                  minimum=1 if whose == parts[0][0] else MIN_COMPARED_SUBJECTS)
        if offset and abs(offset[0]) >= LEVEL_TOLERANCE_SD:
            log.warning(
                "cohort %s: %s are on average %s than the model's training subjects' "
                "at the same ages (%+.1f residual standard deviations of their line of "
                "median stiffness against age; %d subjects): maps of another MRE drive "
                "frequency or inversion than the training maps? The model reads such an "
                "offset as age, so every gap carries it, and an age-bias refit on the "
                "cohort's own controls (predict.bias_reference_group, or --bias-reference-group) "
                "hides it rather than "
                "removes it. Predict maps of the training's frequency and inversion, or "
                "harmonise them first; where the cohort's condition explains it, read the "
                "gaps with that in mind.", cohort, whose, describe_stiffness_offset(offset[1]),
                offset[0], offset[2])
            if whose == parts[0][0]:
                return  # the whole cohort: its studies would only repeat it


def _warn_about_skull_strippers_unlike_training(cohort: str, labels: Sequence[str],
                                                routes: Sequence[str],
                                                trained: Mapping[str, int] | None) -> None:
    """Warn about subjects whose T1w was stripped by a tool that stripped none of the
    model's training subjects (the bundle's ``training.skullstrip_routes``). ``preprocess.
    skullstrip: auto`` runs FreeSurfer where it is installed and deepbet elsewhere, so the
    same bundle applied on another machine (``predict run``) can mask the brain, and take
    the registration reference, from another tool than training did."""
    unlike = _unlike_training(labels, routes, trained, ignore=("none", "unknown"))
    if unlike is not None:
        log.warning("cohort %s: %d subject(s) had their T1w skull-stripped by %s (%s), but "
                    "the model's training subjects by %s. Brain masks and registrations from "
                    "another tool differ from those the model learnt from. With "
                    "preprocess.skullstrip auto this follows what is installed (FreeSurfer, "
                    "else deepbet): preprocess where the training data were, or install the "
                    "training's tool here.", cohort, *unlike)


def _warn_about_references_unlike_training(cohort: str, labels: Sequence[str],
                                           references: Sequence[str],
                                           trained: Mapping[str, int] | None) -> None:
    """Warn about subjects registered by a kind of image that registered none of the
    model's training subjects (the bundle's ``training.registration_references``): e.g. a
    cohort without T1w scans for a model trained on T1w-registered subjects. Their masks
    and transforms differ from those the model learnt from."""
    unlike = _unlike_training(labels, references, trained)
    if unlike is not None:
        hint = (" Add their T1w scans (anat/sub-<label>_T1w.nii.gz) if they have them."
                if any(kind.startswith("T1w") for kind in trained) else "")
        log.warning("cohort %s: %d subject(s) were registered by %s (%s), but the model's "
                    "training subjects were registered by %s. Their brain masks and "
                    "transforms come from another kind of image than the model learnt from, "
                    "which can move a prediction by years.%s", cohort, *unlike, hint)


def summarise_gaps(table: pd.DataFrame, group_column: str | None, *,
                   bias: AgeBias | None = None,
                   reference_group: str | None = None) -> pd.DataFrame:
    """Per-group brain-age gaps (years): n, mean and sd of raw and corrected gap, and the
    95 % confidence interval of the mean corrected gap. Groups in order of appearance
    (:func:`brainage.inputs.cohort_groups`; ``grouped_by`` is ``none`` for a cohort without
    a group or study column).
    ``n`` and ``age_mean`` describe every subject of the group; ``n_predicted`` passed QC
    (``n_qc_failed`` did not) and the model has not seen (``n_seen_in_training``: predicted,
    optimistic, left out of the gaps); the gap columns and the interval describe the ``n_gap`` of
    them who have an age (a cohort to predict may lack some: those have a predicted age
    and no gap), so ``n_gap`` is the n behind each mean and interval, and
    ``n_outside_training_ages`` of them are older or younger than every training subject
    (``within_training_ages`` false): their predictions extrapolate, which no interval
    carries, so a summary copied into a paper says so beside the mean.

    The interval adds to the group's own spread (sd² / n) the variance of ``bias``'s line
    at the group's mean age (:meth:`AgeBias.line_variance`), which every member shares and
    which does not average out: without it a group with no true gap, beside a reference
    of 10 controls, was excluded from 0 by 39 % of its "95 %" intervals (a review's
    simulation). Degrees of freedom by Welch-Satterthwaite (the group's n - 1, the
    reference set's n - 2), at most the group's n - 1, so that no interval is narrower
    than the one that ignores the line. A line recorded without its reference set's statistics (an
    older bundle) gives the group's t interval alone. ``reference_group`` (the group the
    line was fitted on, ``predict.bias_reference_group``) has a mean corrected gap of 0
    by construction and no interval."""
    from scipy import stats

    rows = []
    for group, members in table.groupby(cohort_groups(table, group_column), sort=False):
        predicted = members[members["status"] == "predicted"]
        # the gaps of the predicted subjects with an age (a cohort may lack some)
        aged = predicted[np.isfinite(predicted["corrected_gap"].to_numpy(dtype=float))]
        corrected = aged["corrected_gap"].to_numpy(dtype=float)
        n = len(corrected)
        mean = float(np.mean(corrected)) if n else math.nan
        sd = float(np.std(corrected, ddof=1)) if n > 1 else math.nan
        half_width = math.nan
        if n > 1 and (reference_group is None or str(group) != str(reference_group)):
            own = sd ** 2 / n
            line = bias.line_variance(float(aged["age"].mean())) if bias else math.nan
            if not np.isfinite(line):
                line = 0.0
            spread = own ** 2 / (n - 1) + (line ** 2 / (bias.n_subjects - 2) if line else 0)
            # Welch-Satterthwaite, never above the group's own n - 1: the line's variance,
            # estimated from more subjects, raised it above that and narrowed a small
            # group's interval below the one that ignores the line (2 subjects: 88 %)
            degrees = min(n - 1, (own + line) ** 2 / spread) if spread else n - 1
            half_width = float(stats.t.ppf(0.975, degrees)) * math.sqrt(own + line)
        rows.append({
            "grouped_by": group_column or "none", "group": group, "n": len(members),
            "n_predicted": len(predicted),
            "n_qc_failed": int((members["status"] == "qc_failed").sum()),
            "n_seen_in_training": int((members["status"] == "seen_in_training").sum()),
            "n_gap": n,
            # the aged have an answer (a subject without an age has none)
            "n_outside_training_ages": int((~aged["within_training_ages"].astype(bool)).sum()),
            "age_mean": float(members["age"].mean()),
            "mean_gap": float(predicted["gap"].mean()) if n else math.nan,
            "sd_gap": float(predicted["gap"].std(ddof=1)) if n > 1 else math.nan,
            "mean_corrected_gap": mean, "sd_corrected_gap": sd,
            "corrected_gap_ci95_low": mean - half_width,
            "corrected_gap_ci95_high": mean + half_width})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def plot_gap_by_group(table: pd.DataFrame, group_column: str | None, path: str | Path, *,
                      title: str = "") -> None:
    """Two panels, raw and age-bias-corrected gap (years) per group: box plot and points."""
    plt = headless_pyplot()

    predicted = table[table["status"] == "predicted"]
    groups = list(dict.fromkeys(cohort_groups(table, group_column)))
    predicted_groups = cohort_groups(predicted, group_column)
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.4 * len(groups), 4.2), sharey=True)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for axis, column, label in ((axes[0], "gap", "brain-age gap (years)"),
                                (axes[1], "corrected_gap", "corrected brain-age gap (years)")):
        values = [predicted.loc[predicted_groups == group, column].to_numpy(dtype=float)
                  for group in groups]
        values = [group_values[np.isfinite(group_values)] for group_values in values]
        positions = np.arange(1, len(groups) + 1)
        non_empty = [index for index, group_values in enumerate(values) if len(group_values)]
        if non_empty:
            axis.boxplot([values[index] for index in non_empty],
                         positions=positions[non_empty], widths=0.5, showfliers=False,
                         medianprops={"color": "black"})  # orange: the second group
        for position, group_values in zip(positions, values):
            axis.scatter(position + rng.uniform(-0.12, 0.12, len(group_values)), group_values,
                         s=12, alpha=0.7, zorder=3)
        axis.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        axis.set_xticks(positions)
        axis.set_xticklabels([f"{group}\n(n={len(group_values)})"
                              for group, group_values in zip(groups, values)])
        axis.set_ylabel(label)
    failed = int((table["status"] == "qc_failed").sum())
    seen = int((table["status"] == "seen_in_training").sum())
    suffix = "".join(f"; {count} subject(s) {why}, not shown" for count, why
                     in ((failed, "failed QC"), (seen, "seen in training")) if count)
    figure.suptitle(f"{title}{suffix}", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=120)
    plt.close(figure)
