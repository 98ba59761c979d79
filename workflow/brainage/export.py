"""Export one evaluated grid cell as a model bundle (rule ``export_model``).

Everything in a bundle (:mod:`brainage.bundle`) was computed before the export: the
encoder by ``train_encoder``, the read-out and its age-bias fits by ``evaluate_encoder``
(``readout.npz`` / ``readout.json``, :mod:`brainage.readout`; the bundle stores the same
arrays as tensors), the normalisation record by
``normalise_dataset`` (the split's ``stats.json``), the template by ``prepare_template``.
The export copies and checks; it embeds nothing and fits nothing, so a bundle predicts the
cell's subjects as ``predictions.tsv`` records them: exactly in the cell's own batches, to
about 1e-5 years otherwise (:meth:`brainage.apply.BrainAgeModel.predict_age`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from brainage.agebias import AgeBias, overcorrects, select_bias_correction
from brainage.bundle import software_versions, write_bundle
from brainage.config import READOUT_MODEL_KEYS, pretrained_run, resolve_cell, training_settings
from brainage.io import sha256_file
from brainage.modalities import MODALITIES, grid_modality, modalities_to_predict
from brainage.normalise import RECORD_KEYS
from brainage.preprocess.template import template_record
from brainage.qc import stiffness_by_age
from brainage.readout import READOUT_DESCRIPTION, load_readout

log = logging.getLogger(__name__)

#: What readout.json holds besides the read-out's own description; the manifest keeps
#: these under their own keys.
CELL_RECORD_KEYS = ("split", "encoder_sha256", "training", "bias_correction")


class ExportError(ValueError):
    """A grid cell cannot be exported as a bundle; the message says why and what to do."""


def _read_run_record(path: Path, rule: str, cost: str) -> dict:
    """A JSON record the run wrote (``stats.json``, ``metrics.json``); a damaged one (a full
    disk, a copy cut short) is named with the rule that writes it again and what that
    reruns (``cost``), where json's own message names a line and column but no file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} cannot be read as JSON ({error}): the file is damaged. "
                          f"Restore it from a backup or copy if there is one; else delete it "
                          f"and run snakemake again (rule {rule} writes it anew, {cost}), "
                          f"then export.") from None


#: Record entries with one value per channel.
CHANNEL_KEYS = ("modalities", "scale_by_brain_median", "mean", "sd", "n_voxels")


def normalisation_record(stats: Mapping, modalities: Sequence[str]) -> dict:
    """The split's TRAINING normalisation of the cell's channels (``model.modalities``),
    without per-subject lists: a bundle goes to other labs and needs the numbers, not who
    the training subjects were, and the network reads only its channels."""
    missing = [key for key in RECORD_KEYS if key not in stats]
    if missing:
        raise ExportError(f"the split's stats.json lacks {', '.join(missing)}; rerun rule "
                          f"normalise_dataset.")
    record = {key: stats[key] for key in (*RECORD_KEYS, "scope", "n_voxels", "split")
              if key in stats}
    channels = [list(stats["modalities"]).index(name) for name in modalities]
    for key in CHANNEL_KEYS:
        if key in record:
            record[key] = [record[key][index] for index in channels]
    record["n_statistics_subjects"] = len(stats.get("statistics_subjects", []))
    return record


def export_model(cell_dir: str | Path, encoder_path: str | Path, stats_path: str | Path,
                 settings: Mapping, *, bundle_dir: str | Path, name: str,
                 template_t1: str | Path, template_mask: str | Path,
                 preprocessing: Mapping, bias_fit: str = "training",
                 qc_table: str | Path | None = None) -> dict:
    """Copy one evaluated grid cell into a model bundle another lab can run.

    Parameters
    ----------
    cell_dir : path
        The cell's folder: ``metrics.json``, ``readout.npz``, ``readout.json``.
    encoder_path : path
        The encoder the cell evaluated (its own, or the one it shares).
    stats_path : path
        The split's ``stats.json``: the TRAINING normalisation record.
    settings : mapping
        The cell's settings (:func:`brainage.config.cell_settings`).
    bundle_dir, name : path, str
        Output folder (``results/models/<name>``) and bundle name.
    template_t1, template_mask : path
        The registration template; its id, grid and mask checksum are recorded
        (:func:`brainage.preprocess.template.template_record`).
    preprocessing : mapping
        The config sections ``preprocess``, ``qc``, ``template``: how a new cohort must be
        preprocessed to match the training data.
    bias_fit : str
        Which of the read-out's age-bias fits the bundle applies (config key
        ``predict.bias_fit``: ``training`` or ``test``).
    qc_table : path, optional
        The training cohort's ``qc.tsv`` (rule ``tabulate_qc``): the bundle records how many
        training subjects each kind of image registered (``training.registration_references``)
        and each skull stripper stripped (``training.skullstrip_routes``), so that a
        cohort preprocessed otherwise is warned about (:func:`brainage.apply.predict_cohort`).

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    ExportError
        The read-out was fitted on another encoder or split, the settings describe
        other channels or another network than the encoder's, or a record is
        incomplete.
    """
    settings = resolve_cell(settings)
    cell_dir = Path(cell_dir)
    readout, description = load_readout(cell_dir)
    encoder_sha256 = sha256_file(encoder_path)
    if description.get("encoder_sha256") != encoder_sha256:
        raise ExportError(
            f"{cell_dir / READOUT_DESCRIPTION} was fitted on an encoder with sha256 "
            f"{description.get('encoder_sha256')}, but {encoder_path} has {encoder_sha256}: "
            f"the encoder was retrained after evaluation. Rerun rule evaluate_encoder for "
            f"this cell, then export.")
    stats = _read_run_record(Path(stats_path), "normalise_dataset",
                             "and every cell of the split is then trained again")
    if description.get("split") != stats.get("split"):
        raise ExportError(f"{cell_dir / READOUT_DESCRIPTION} belongs to split "
                          f"{description.get('split')!r}, not to {stats_path} "
                          f"({stats.get('split')!r}); rerun rule evaluate_encoder.")
    evaluated_on = description.get("split_images_sha256")  # absent: evaluated by an older
    if evaluated_on is not None and evaluated_on != stats.get("images_sha256"):  # version
        raise ExportError(
            f"{stats_path} describes arrays (images_sha256 {stats.get('images_sha256')}) "
            f"other than those {cell_dir / READOUT_DESCRIPTION} was fitted on "
            f"({evaluated_on}): the split was normalised again after training and "
            f"evaluation (e.g. another normalise.scope or resolution_mm), so the bundle would "
            f"normalise new subjects unlike the encoder's training data. Finish the run "
            f"(snakemake retrains and re-evaluates the cell), then export.")
    metrics = _read_run_record(cell_dir / "metrics.json", "evaluate_encoder",
                               "in a minute, training nothing")
    try:
        bias = select_bias_correction(description["bias_correction"], bias_fit,
                                      n_test=metrics.get("n_test"))
    except ValueError as error:
        raise ExportError(str(error)) from None
    readout_arrays, readout_description = readout.to_state()
    readout_state = {key: torch.from_numpy(np.array(value)) for key, value in
                     readout_arrays.items()}
    payload = torch.load(encoder_path, map_location="cpu", weights_only=True)
    channels = list(settings["model"]["modalities"] or stats["modalities"])
    check_encoder_settings(payload, settings, channels, stats["modalities"],
                           encoder_path=encoder_path)
    if isinstance(metrics.get("trained_loss"), dict):
        # the loss the encoder was trained with: after loss.nn_from_search, the search's
        # nn_final and nn_step, where the config's say the paper's optimum (14, 1)
        settings = {**settings, "loss": metrics["trained_loss"]}
    check_training_settings(payload, settings, encoder_path=encoder_path)
    fields = {
        "settings": {**settings, "model": _file_names(settings["model"], ("init_checkpoint",))},
        "source": {"split": stats["split"], "experiment": settings.get("experiment"),
                   "variant": settings.get("variant"), "seed": settings["seed"],
                   "encoder_sha256": encoder_sha256,
                   "metrics": {key: value for key, value in metrics.items()
                               if key not in METRICS_NOT_SHARED}},
        "normalisation": normalisation_record(stats, channels),
        "template": template_record(template_t1, template_mask,
                                    source=preprocessing["template"]["source"],
                                    space=preprocessing["template"]["space"]),
        "preprocessing": {**preprocessing,
                          "template": _file_names(preprocessing["template"], ("t1", "mask"))},
        "readout": {**readout_description,
                    **{key: value for key, value in description.items()
                       if key not in CELL_RECORD_KEYS and key not in readout_description}},
        "bias_correction": bias,
        "training": {**description["training"],
                     # the map each subject's preprocessing was built around: a cohort is
                     # preprocessed around it too (brainage.modalities.modalities_to_predict)
                     "grid_modality": grid_modality(stats["modalities"]),
                     **(qc_value_counts(qc_table, Path(stats_path).with_name("participants.tsv"),
                                        {"registration_references": "reference_kind",
                                         "skullstrip_routes": "skullstrip_route"})
                        if qc_table is not None else {}),
                     **(training_maps_record(qc_table,
                                             Path(stats_path).with_name("participants.tsv"))
                        if qc_table is not None else {})},
    }
    write_bundle(bundle_dir, name=name, encoder_state=payload["model"],
                 readout_state=readout_state, manifest_fields=fields,
                 readme=bundle_readme(name, fields))
    log.info("exported %s/%s seed %s as bundle %s", settings.get("experiment"),
             settings.get("variant"), settings["seed"], name)
    warn_of_a_partial_split(stats["split"], Path(stats_path).with_name("participants.tsv"))
    return json.loads((Path(bundle_dir) / "manifest.json").read_text())


def warn_of_a_partial_split(split: str, split_table: str | Path) -> None:
    """Under split.scheme kfold or loso the bundle is the first split's model (rule
    export_model), which never saw that split's test subjects: a k-th of the cohort, or
    under loso a whole study, whose new scans it then predicts. Said as a warning, which
    the run lists at its end; the holdout split's test fifth is what every scheme keeps
    out for its metrics."""
    if split == "holdout" or not Path(split_table).is_file():
        return
    import pandas as pd

    table = pd.read_csv(split_table, sep="\t", dtype={"participant_id": str, "study": str})
    training, test = table[table["subset"] == "train"], table[table["subset"] == "test"]
    unseen = sorted(set(test["study"]) - set(training["study"]))
    log.warning(
        "the bundle's model is split %s's, the first of config key split.scheme's splits: "
        "trained on %d of the cohort's %d subjects%s. For a model of more of the cohort, "
        "export from a config with split.scheme: holdout (its test subjects, "
        "split.test_fraction, are still left out).", split, len(training), len(table),
        f", without {'study' if len(unseen) == 1 else 'studies'} {', '.join(unseen)}, whose "
        f"scans it has never seen" if unseen else "")


def _file_names(section: Mapping, keys: Sequence[str]) -> dict:
    """``section`` with the paths under ``keys`` cut to their file names: a bundle goes to
    other labs, and the folders (``/home/<user>/...``) are the exporting lab's own; nothing
    reads them there (a template from files is given by flag and checked by its checksums)."""
    return {key: Path(value).name if key in keys and value else value
            for key, value in section.items()}


#: Keys of the cell's metrics.json a bundle leaves out: it goes to other labs, and these
#: give test subjects away (sums of their ages and gaps; per-study errors, which are one
#: person's own where a study has one test subject, beside the training mean age) or name a
#: path of the exporting lab. The cell's metrics.json keeps them.
METRICS_NOT_SHARED = ("gap_age_sums", "mae_per_study", "n_per_study", "features")


def qc_value_counts(qc_table: str | Path, split_table: str | Path,
                    columns: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """``{name: {value: count}}``: how many of the split's training subjects (``subset``
    train of its participants.tsv) have each value of the QC table's column
    ``columns[name]`` (``unknown`` where the table has no value), e.g. ``reference_kind``
    (the image that registered them: ``T1w_brain``, or a map for a subject without a
    T1w) or ``skullstrip_route`` (what stripped their T1w: ``deepbet``,
    ``mri_synthstrip``, ...; ``none`` without one)."""
    import pandas as pd

    qc = pd.read_csv(qc_table, sep="\t", dtype=str).set_index("participant_id")
    split = pd.read_csv(split_table, sep="\t", usecols=["participant_id", "subset"], dtype=str)
    training = split.loc[split["subset"] == "train", "participant_id"]
    counts = {}
    for name, column in columns.items():
        values = (qc[column] if column in qc.columns else pd.Series(dtype=str)
                  ).reindex(training).fillna("unknown")
        counts[name] = {str(value): int(count)
                        for value, count in values.value_counts().sort_index().items()}
    return counts


def training_maps_record(qc_table: str | Path, split_table: str | Path) -> dict:
    """What the split's training subjects' registered maps look like, from the QC table:
    ``coverage`` (their least and median share of the template brain) and
    ``stiffness_by_age`` (the line of their median stiffness against age,
    :func:`brainage.qc.stiffness_by_age`), by which a cohort of maps from another drive
    frequency or inversion is told (:func:`brainage.apply.predict_cohort`). Empty where
    the QC table predates the median (``median_stiffness``)."""
    import pandas as pd

    qc = pd.read_csv(qc_table, sep="\t").set_index("participant_id")
    split = pd.read_csv(split_table, sep="\t", dtype={"participant_id": str})
    training = split.loc[split["subset"] == "train"].set_index("participant_id")
    coverage = qc["coverage"].reindex(training.index).dropna()
    record = {"coverage": {"min": float(coverage.min()), "median": float(coverage.median())}
              } if len(coverage) else {}
    if "median_stiffness" in qc.columns:
        line = stiffness_by_age(training["age"], qc["median_stiffness"].reindex(training.index))
        if line is not None:
            record["stiffness_by_age"] = line
    return record


def check_training_settings(payload: Mapping, settings: Mapping, *,
                            encoder_path: str | Path) -> None:
    """Refuse a cell whose settings are not those ``encoder.pt`` was trained with.

    Snakemake retrains a cell whose settings change, by the record of its last run in
    ``.snakemake/metadata``: with that record deleted (it looks like a cache), or the outputs
    marked done by ``--touch``, a changed ``train.lr`` retrained nothing, and the bundle's
    manifest gave the new rate beside an encoder trained at the old one. What the cell's
    encoder depends on is compared (:func:`brainage.config.training_settings`: for an
    untrained encoder its seed and how its features are computed), key by key where both
    name the key (an encoder of an older version lacks later keys). The settings of the
    pretraining run a cell starts from are not compared here.
    """
    trained_with = payload.get("settings") or {}
    # without the read-out's keys, which the comparison leaves out anyway: an encoder
    # without a head records the default features 'projection' (earlier versions filled
    # it in), which resolving again refused
    trained_with = {**trained_with, "model": {
        key: value for key, value in (trained_with.get("model") or {}).items()
        if key not in READOUT_MODEL_KEYS}}
    recorded = training_settings(resolve_cell(trained_with)) if trained_with.get("train") else {}
    expected = training_settings(settings)
    differing = []
    if "seed" in recorded and recorded["seed"] != expected["seed"]:
        differing.append(f"seed {recorded['seed']} (trained) against {expected['seed']}")
    # the training job is given a pretraining run's encoder as model.init_checkpoint
    # (training_params), the cell names the run in model.init only
    filled_in = {"init_checkpoint"} if pretrained_run(expected["model"]) else set()
    for section in ("train", "loss", "model"):
        trained, given = recorded.get(section) or {}, expected.get(section) or {}
        compared = set(trained) & set(given) - (filled_in if section == "model" else set())
        differing += [f"{section}.{key} {trained[key]!r} (trained) against {given[key]!r}"
                      for key in sorted(compared) if trained[key] != given[key]]
    if differing:
        raise ExportError(
            f"{encoder_path} was trained with other settings than the cell's: "
            f"{'; '.join(differing)}. Snakemake did not retrain the cell after they changed "
            f"(its record of the run, .snakemake/metadata, was deleted, or --touch marked the "
            f"outputs done), so the bundle, and the tables, would give settings the encoder "
            f"was not trained with. Retrain the cell (snakemake --forcerun train_encoder, or "
            f"delete its encoder.pt), or export with the config it was trained with.")


def check_encoder_settings(payload: Mapping, settings: Mapping, channels: Sequence[str],
                           split_modalities: Sequence[str], *, encoder_path: str | Path
                           ) -> None:
    """Refuse settings that describe inputs or a network other than the encoder's.

    The manifest's settings build the network a cohort is predicted with, and its
    channels pick the maps; ``encoder.pt`` records the settings it was trained with. A
    config other than the run's (``python -m brainage.predict export`` without an
    override file the run had) would otherwise ship a bundle that feeds the encoder other
    maps (same number of channels: it loads) or that does not load at all.
    """
    from brainage.models import build_model

    trained = (payload.get("settings") or {}).get("model") or {}
    if "modalities" in trained:
        trained_channels = list(trained["modalities"] or split_modalities)
        if trained_channels != list(channels):
            raise ExportError(
                f"{encoder_path} was trained on the channels {', '.join(trained_channels)}, "
                f"but the settings exported give {', '.join(channels)} (config key "
                f"model.modalities): the config differs from the one the run trained "
                f"with. Export with the run's config files.")
    try:
        build_model(settings["model"], in_channels=len(channels)).load_state_dict(
            payload["model"])
    except RuntimeError as error:
        raise ExportError(
            f"{encoder_path} does not fit the network the exported settings describe (config "
            f"section model; {str(error).splitlines()[0]}): the config differs from the one "
            f"the run trained with. Export with the run's config files.") from None


def _encoder_phrase(settings: dict) -> str:
    """What the bundle's encoder is: trained with its loss, or (``train.epochs`` 0, the
    untrained baseline or a frozen pretrained encoder) the weights it started from."""
    model = settings["model"]
    run = pretrained_run(model)
    if int(settings["train"]["epochs"]) > 0:
        start = (f", fine-tuned from {model['init_checkpoint']} (model.init_checkpoint)"
                 if model.get("init_checkpoint") and run is None
                 else f", fine-tuned from pretraining run `{run}`" if run is not None else "")
        return (f"a 3D ResNet-18 encoder trained with the `{settings['loss']['name']}` "
                f"loss{start}")
    start = ("the weights of its model.init_checkpoint" if model.get("init_checkpoint")
             else f"the encoder of pretraining run `{run}`" if run is not None
             else "its seed's random initialisation")
    return f"a 3D ResNet-18 encoder that took no training step (train.epochs 0: {start})"


def bundle_readme(name: str, fields: Mapping) -> str:
    """The bundle's README.md: what it is and how to run it."""
    source = fields["source"]
    metrics = source.get("metrics") or {}
    mae = f"{metrics['mae']:.2f} years" if "mae" in metrics else "n/a"
    training = fields["training"]
    references = training.get("registration_references") or {}
    references_line = ""
    if references:  # absent in bundles exported before it was recorded
        t1w_hint = ("; a cohort registered like them needs anat/sub-<label>_T1w.nii.gz too"
                    if any(kind.startswith("T1w") for kind in references) else "")
        references_line = ("- training subjects registered to the template by: "
                           + ", ".join(f"{kind} {count}" for kind, count in references.items())
                           + t1w_hint + "\n")
    routes = {route: count for route, count in (training.get("skullstrip_routes") or {}).items()
              if route not in ("none", "unknown")}
    if routes:  # absent in bundles exported before it was recorded
        references_line += ("- training subjects' T1w skull-stripped by: "
                            + ", ".join(f"{route} {count}" for route, count in routes.items())
                            + " (a cohort is best stripped by the same tool)\n")
    coverage, line = training.get("coverage"), training.get("stiffness_by_age")
    if coverage:  # absent in bundles exported before they were recorded
        references_line += (f"- training subjects' maps covered at least {coverage['min']:.2f}"
                            f" (median {coverage['median']:.2f}) of the template brain "
                            f"(predictions.tsv's qc_coverage: a cohort covering less is "
                            f"predicted from less brain than the model learnt from)\n")
    if line:
        references_line += (
            f"- training subjects' median stiffness: {line['intercept_kpa']:.2f} "
            f"{line['slope_kpa_per_year']:+.4f} x age kPa (residual sd "
            f"{line['residual_sd_kpa']:.2f} kPa): predict maps of the training's MRE drive "
            f"frequency and inversion (stiffness rises with the frequency; a cohort far from "
            f"this line is warned of)\n")
    record = fields["normalisation"]
    qc = {key: value for key, value in (fields["preprocessing"].get("qc") or {}).items()
          if key.startswith("min_")}
    versions = software_versions()  # what write_bundle records beside it
    template_files = fields["template"].get("source") == "file"
    template_names = " and ".join(
        str(fields["preprocessing"]["template"].get(key)) for key in ("t1", "mask"))
    channels = "; ".join(
        f"{modality_name} mean {mean:.4f} sd {sd:.4f} {MODALITIES[modality_name].unit}"
        for modality_name, mean, sd in zip(record["modalities"], record["mean"], record["sd"]))
    # the maps a cohort gives: the channels, and the map the training cohort's
    # preprocessing was built around
    given = modalities_to_predict(record["modalities"], training["grid_modality"])
    inputs = " + ".join(f"sub-*/{MODALITIES[modality_name].folder}/*_{modality_name}.nii.gz"
                        for modality_name in given)
    return (
        f"# brainage model bundle `{name}`\n\n"
        f"Brain age from MR-elastography maps ({', '.join(record['modalities'])}): "
        f"{_encoder_phrase(fields['settings'])} (grid cell "
        f"{source['experiment']}/{source['variant']}/seed-{source['seed']}, split "
        f"{source['split']}) and a `{fields['readout']['method']}` read-out.\n\n"
        f"- test MAE of the cell: {mae}\n"
        f"- trained on {training['n_subjects']} subjects aged {training['age_min']:.0f}-"
        f"{training['age_max']:.0f} years\n"
        f"{references_line}"
        f"- template: {fields['template']['id']}, normalisation at "
        f"{record['resolution_mm']} mm with the training statistics ({channels})\n"
        f"- each subject's brain mask and QC are built around its {training['grid_modality']} "
        f"map, as the training subjects' were: a cohort needs {', '.join(given)} for every "
        f"subject\n"
        f"- age-bias correction: "
        f"{AgeBias(fields['bias_correction']['intercept'], fields['bias_correction']['slope'])} "
        f"({fields['bias_correction']['description']})\n"
        + (f"- the age-bias line overcorrects the held-out test subjects (gap-age r "
           f"{fields['bias_correction']['gap_age_r_after_on_other']:+.2f} after it): read "
           f"corrected gaps with care, beside the uncorrected ones\n"
           if overcorrects(fields["bias_correction"],
                           (fields["source"].get("metrics") or {}).get("n_test")) else "") +
        f"- subjects are predicted when their preprocessing passes QC: "
        f"{', '.join(f'{key} {value}' for key, value in qc.items()) or 'n/a'}\n"
        f"- made with {', '.join(f'{name} {version}' for name, version in versions.items())}"
        f" (brainage: `pip install` this repository's release of that date)\n\n"
        f"Run it on a BIDS-like dataset (participants.tsv + {inputs}; the table needs only "
        f"participant_id, and an age column in years for brain-age gaps):\n\n"
        f"    python -m brainage.predict run --bundle <this folder> --dataset <root> "
        f"--output <folder>"
        + (f" --template-t1 <T1> --template-mask <mask>\n\n(the template is the exporting "
           f"lab's own files, {template_names}: ask for them; `predict run` checks their "
           f"voxels against the checksums in manifest.json)\n\n"
           if template_files else "\n\n") +
        "manifest.json lists the sha256 of encoder.pt and readout.pt; both are plain tensor "
        "files read with torch.load(weights_only=True).\n")
