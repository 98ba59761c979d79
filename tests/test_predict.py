"""Brain age for new subjects (brainage.export, brainage.apply, brainage.predict,
brainage.bundle, brainage.agebias).

Exported cells use a randomly initialised ResNet-18 (no training: seconds instead of
minutes); a Ridge read-out on its frozen features already predicts age from synthetic
volumes whose stiffness falls with age (test MAE 2-5 years over 20-80), which is what the
brain-age-gap checks need. Two fixtures:

- ``exported``: tests/split_fixture.py's split (6 mm arrays) -> cell -> bundle; for the
  bundle format, round trip and bias-correction tests.
- ``world``: 2 mm "registered" maps on a small fake template -> the real
  normalise_dataset -> cell -> bundle, and a new cohort of held-out healthy subjects and
  an accelerated-ageing group (+8 years of stiffness) as preprocessed maps with QC files;
  prediction runs exactly as in the pipeline from there (normalisation with the bundle's
  statistics, embedding, read-out, bias correction), without registration.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from brainage.agebias import AgeBias, fit_age_bias, gap_age_correlation, out_of_fold_predictions  # noqa: E402
from brainage.apply import BrainAgeModel, predict_cohort  # noqa: E402
from brainage.bundle import (  # noqa: E402
    BUNDLE_FORMAT_VERSION,
    MANIFEST_DIGEST_KEY,
    BundleError,
    manifest_digest,
    read_bundle,
    write_bundle,
)
from brainage.config import ConfigError, resolve_cell  # noqa: E402
from brainage.export import ExportError, export_model  # noqa: E402
from brainage.inputs import InputError  # noqa: E402
from brainage.io import WriteError, sha256_file  # noqa: E402
from brainage.normalise import apply as normalise_map  # noqa: E402
from brainage.predict import OUTPUT_MARKER, run_cohort  # noqa: E402
from brainage.readout import Readout, fit_readout, load_readout  # noqa: E402
from conftest import REPO  # noqa: E402
from split_fixture import tiny_settings, write_split  # noqa: E402

#: How the test cohorts were "preprocessed" (the schema's defaults, a file template).
PREPROCESSING = {"preprocess": {},
                 "qc": {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7,
                        "exclude_failed": False},
                 "template": {"source": "file", "space": "TestSpace", "t1": None,
                              "mask": None}}



def stiffness_maps(maps: dict) -> dict:
    """``{label: path}`` of registered stiffness maps as predict_cohort takes them:
    ``{label: {modality: path}}``."""
    return {label: {"stiffness": path} for label, path in maps.items()}

def _random_cell(split_dir: Path, cell_dir: Path, settings: dict) -> dict:
    """encoder.pt of an untrained network (train's format), evaluated like a grid cell."""
    from brainage.evaluate import evaluate_encoder
    from brainage.models import build_model
    from brainage.split_data import load_split
    from brainage.train import write_features

    settings = resolve_cell(settings)
    torch.manual_seed(0)
    network = build_model(settings["model"])
    cell_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "model": network.state_dict(), "settings": settings,
                "split": split_dir.name, "epochs": 0}, cell_dir / "encoder.pt")
    write_features(cell_dir / "features.npz", network, load_split(split_dir),
                   sha256_file(cell_dir / "encoder.pt"), device=torch.device("cpu"))
    evaluate_encoder(split_dir, cell_dir / "features.npz", settings,
                     metrics_path=cell_dir / "metrics.json",
                     predictions_path=cell_dir / "predictions.tsv")
    return settings


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A split, an evaluated cell (random encoder) and its exported bundle."""
    root = tmp_path_factory.mktemp("predict")
    split_dir = write_split(root / "dataset", n_subjects=48, n_test=10, shape=(8, 10, 8))
    cell = root / "cell"
    settings = _random_cell(split_dir, cell, tiny_settings())
    template = write_template(root, shape=(8, 10, 8), affine=np.diag([6.0, 6.0, 6.0, 1.0]))
    bundle_dir = root / "models" / "demo"
    export = dict(settings=settings, name="demo", preprocessing=PREPROCESSING, **template)
    manifest = export_model(cell, cell / "encoder.pt", split_dir / "stats.json",
                            bundle_dir=bundle_dir, **export)
    return SimpleNamespace(root=root, split_dir=split_dir, cell=cell, settings=settings,
                           bundle_dir=bundle_dir, manifest=manifest, export=export)


def write_template(root: Path, *, shape, affine, brain=None) -> dict:
    """A template T1 and brain mask on a grid: ``{"template_t1", "template_mask"}``."""
    brain = np.ones(shape, dtype=bool) if brain is None else brain
    files = {"template_t1": root / "template_t1.nii.gz",
             "template_mask": root / "template_mask.nii.gz"}
    nib.save(nib.Nifti1Image(brain.astype(np.float32) * 100, affine), files["template_t1"])
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), files["template_mask"])
    return files


def _split_images(split_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    return np.load(split_dir / "images.npy"), table


# -- a small world on a fake 2 mm template: training cohort, split, new cohorts ----------------

TEMPLATE_SHAPE = (26, 32, 26)   # not divisible by 3: the 6 mm grid crops or pads
TEMPLATE_AFFINE = np.array([[2.0, 0, 0, -26], [0, 2.0, 0, -32], [0, 0, 2.0, -26], [0, 0, 0, 1]])
QC_THRESHOLDS = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}


def _template_coordinates() -> np.ndarray:
    return np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in TEMPLATE_SHAPE],
                                indexing="ij"))


def _template_brain() -> np.ndarray:
    return (_template_coordinates() ** 2 / np.array([0.75, 0.8, 0.75])[:, None, None, None] ** 2
            ).sum(axis=0) < 1


def stiffness_map(stiffness_age: float, rng: np.random.Generator) -> np.ndarray:
    """A registered map (kPa) on the fake template: softer, with a steeper front-back
    gradient and larger "ventricles" at higher stiffness age (years). Each of the three
    age effects has its own subject-level noise (~6 years), so age is predictable but not
    perfectly: predictions regress to the mean, as real ones do."""
    coordinates = _template_coordinates()
    brain = _template_brain()
    level, gradient, ventricle = (stiffness_age - 50.0) / 30.0 + rng.normal(0.0, 0.2, 3)
    radius = np.sqrt((coordinates ** 2).sum(axis=0))
    value = 3.0 - 0.45 * level - 0.3 * coordinates[1] * gradient
    value = np.where(radius < 0.2 + 0.12 * (ventricle + 1), 1.2, value)
    value = value + rng.normal(0.0, 0.08, TEMPLATE_SHAPE)
    return np.where(brain, np.clip(value, 0.3, None), 0.0).astype(np.float32)


def write_cohort(root: Path, table: pd.DataFrame, *, seed: int, failing: tuple = ()) -> dict:
    """participants.tsv, raw maps, "preprocessed" maps and QC files of a cohort.

    The stiffness age is ``age + stiffness_age_offset_years`` (column, if present).
    Subjects in ``failing`` get a QC file with a failing Dice. Returns
    ``{"maps": {label: path}, "qc": {label: path}}``.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    offsets = table.get("stiffness_age_offset_years", pd.Series(0.0, index=table.index))
    table.drop(columns=["stiffness_age_offset_years"], errors="ignore").to_csv(
        root / "participants.tsv", sep="\t", index=False)
    maps, qc = {}, {}
    for participant_id, age, offset in zip(table["participant_id"], table["age"], offsets):
        label = participant_id[len("sub-"):]
        image = nib.Nifti1Image(stiffness_map(age + offset, rng), TEMPLATE_AFFINE)
        raw = root / participant_id / "mre" / f"{participant_id}_stiffness.nii.gz"
        raw.parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, raw)
        preproc = (root / "preproc"
                   / f"{participant_id}_space-MNI152_res-2_desc-preproc_stiffness.nii.gz")
        preproc.parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, preproc)
        qc_path = root / "preproc" / f"{participant_id}_qc.json"
        qc_path.write_text(json.dumps({
            "participant_id": participant_id, "dice": 0.5 if label in failing else 0.95,
            "correlation": 0.6, "coverage": 0.97, "reference_correlation": 0.7,
            "reference_kind": "brain_mask", "skullstrip_route": "none"}))
        maps[label], qc[label] = str(preproc), str(qc_path)
    return {"maps": maps, "qc": qc}


def _participants(n: int, prefix: str, ages, *, group: str = "healthy", offset: float = 0.0,
                  study: str | None = None) -> pd.DataFrame:
    return pd.DataFrame({
        "participant_id": [f"sub-{prefix}{index:03d}" for index in range(n)],
        "age": np.round(ages, 1), "sex": ["F" if index % 2 else "M" for index in range(n)],
        "study": [study or f"study{index % 3 + 1}" for index in range(n)],
        "group": group, "stiffness_age_offset_years": offset})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Training cohort -> QC table -> normalise_dataset split -> random cell -> bundle."""
    from brainage.normalise import normalise_dataset
    from brainage.qc import tabulate_qc

    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(1)
    training = _participants(72, "tr", rng.uniform(20, 80, 72))
    files = write_cohort(root / "training", training, seed=2)
    tabulate_qc(list(files["qc"].values()), root / "training" / "participants.tsv",
                root / "qc.tsv", minimums=QC_THRESHOLDS)
    template = write_template(root, shape=TEMPLATE_SHAPE, affine=TEMPLATE_AFFINE,
                              brain=_template_brain())
    split_dir = root / "dataset" / "holdout"
    normalise_dataset(list(files["maps"].values()), root / "training" / "participants.tsv",
                      root / "qc.tsv", root / "template_mask.nii.gz", split_dir / "images.npy",
                      split_dir / "participants.tsv", split_dir / "stats.json", split="holdout",
                      split_settings={"scheme": "holdout", "test_fraction": 0.2, "seed": 42},
                      scope="train", resolution_mm=6)
    cell = root / "cell"
    settings = _random_cell(split_dir, cell, tiny_settings(model={"features": "encoder"}))
    bundle_dir = root / "models" / "brainage"
    manifest = export_model(cell, cell / "encoder.pt", split_dir / "stats.json", settings,
                            bundle_dir=bundle_dir, name="brainage",
                            preprocessing=PREPROCESSING, qc_table=root / "qc.tsv", **template)
    return SimpleNamespace(root=root, training=files, split_dir=split_dir, cell=cell,
                           settings=settings, bundle_dir=bundle_dir, manifest=manifest)


@pytest.fixture(scope="module")
def new_cohort(world):
    """Held-out healthy subjects and an accelerated-ageing group (+8 years of stiffness),
    ages 35-75; one healthy subject fails QC."""
    rng = np.random.default_rng(3)
    table = pd.concat([
        _participants(24, "newh", rng.uniform(35, 75, 24)),
        _participants(24, "newa", rng.uniform(35, 75, 24), group="accelerated", offset=8.0,
                      study="patients")], ignore_index=True)
    root = world.root / "new_cohort"
    files = write_cohort(root, table, seed=4, failing=("newh005",))
    out = world.root / "predict" / "new"
    predictions = predict_cohort(world.bundle_dir, root, stiffness_maps(files["maps"]), files["qc"],
                                 predictions_path=out / "predictions.tsv",
                                 summary_path=out / "summary.tsv",
                                 figure_path=out / "gap_by_group.png", cohort="new",
                                 device="cpu")
    return SimpleNamespace(root=root, files=files, out=out, predictions=predictions)


# -- bundle ------------------------------------------------------------------------------------

def test_bundle_holds_tensors_versions_and_checksums(exported):
    manifest = exported.manifest
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION
    assert manifest["versions"]["torch"] == torch.__version__
    for name in ("encoder.pt", "readout.pt"):
        assert manifest["files"][name] == sha256_file(exported.bundle_dir / name)
        # plain tensors only: loadable with weights_only=True
        state = torch.load(exported.bundle_dir / name, weights_only=True)
        assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert manifest["normalisation"]["mean"] == [3.0]
    assert manifest["normalisation"]["modalities"] == ["stiffness"]
    assert manifest["normalisation"]["resolution_mm"] == 6
    assert "statistics_subjects" not in manifest["normalisation"]  # no subject ids shipped
    assert manifest["readout"]["method"] == "ridge"
    # the read-out evaluate_encoder fitted, copied, not refitted
    readout, description = load_readout(exported.cell)
    bundled = torch.load(exported.bundle_dir / "readout.pt", weights_only=True)
    cell_state, _ = readout.to_state()
    assert bundled.keys() == cell_state.keys()
    assert all(np.array_equal(bundled[key].numpy(), cell_state[key]) for key in bundled)
    assert manifest["readout"]["info"] == description["info"]
    # the cell's records have keys of their own in the manifest, not copies in the read-out's
    assert not {"split", "encoder_sha256", "training", "bias_correction"} & set(
        manifest["readout"])
    assert manifest["source"]["encoder_sha256"] == sha256_file(exported.cell / "encoder.pt")
    assert manifest["template"]["id"] == "TestSpace_res-2"
    # the bundle goes to other labs: the cell's metrics but those that give its test subjects
    # away (sums of their ages, per-study errors of one subject) or name a path of the lab
    metrics = json.loads((exported.cell / "metrics.json").read_text())
    assert {"gap_age_sums", "mae_per_study", "features"} <= set(metrics)
    assert manifest["source"]["metrics"] == {
        key: value for key, value in metrics.items()
        if key not in ("gap_age_sums", "mae_per_study", "n_per_study", "features")}


def test_bundle_round_trip_gives_identical_predictions(exported, tmp_path):
    """Another lab copies the bundle folder: same predictions as the evaluated cell."""
    copied = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(exported.bundle_dir, copied)
    images, table = _split_images(exported.split_dir)
    predicted = BrainAgeModel.from_bundle(copied, device="cpu").predict_age(images)
    cell = pd.read_csv(exported.cell / "predictions.tsv", sep="\t").set_index("participant_id")
    # Identical up to float64 rounding: BLAS sums the remainder rows of a matrix product
    # in another order than full blocks, so a subject's last bit depends on the batch.
    np.testing.assert_allclose(predicted,
                               cell.loc[table["participant_id"], "predicted_age"].to_numpy(),
                               rtol=0, atol=1e-9)


def test_reexport_gives_identical_payload(exported, tmp_path):
    again = export_model(exported.cell, exported.cell / "encoder.pt",
                         exported.split_dir / "stats.json", bundle_dir=tmp_path / "again",
                         **exported.export)
    assert again["files"] == exported.manifest["files"]
    assert again["bias_correction"] == exported.manifest["bias_correction"]


def test_the_manifest_records_the_loss_the_encoder_was_trained_with(exported, tmp_path):
    """After loss.nn_from_search the encoder trains with the search's nn_final and nn_step:
    the manifest gave the configured ones (config/paper.yaml's 14 and 1, whatever the
    search chose), the trained ones only deep in source.metrics."""
    cell = tmp_path / "cell"
    shutil.copytree(exported.cell, cell)
    metrics = json.loads((cell / "metrics.json").read_text())
    configured = exported.settings["loss"]
    trained = {**configured, "nn_final": configured["nn_final"] + 3, "nn_step": 2,
               "nn_from_search": True}
    (cell / "metrics.json").write_text(json.dumps({**metrics, "trained_loss": trained}))
    _record_training_settings(cell, loss=trained)  # as training with the search's values does
    manifest = export_model(cell, cell / "encoder.pt", exported.split_dir / "stats.json",
                            bundle_dir=tmp_path / "bundle", **exported.export)
    assert manifest["settings"]["loss"] == json.loads(json.dumps(trained))
    assert exported.manifest["settings"]["loss"] == json.loads(json.dumps(configured))


def _record_training_settings(cell: Path, **sections) -> None:
    """Rewrite the cell's encoder.pt as if trained with ``sections`` of settings, and the
    read-out's record of the encoder's digest with it."""
    from brainage.io import save_tensors

    payload = torch.load(cell / "encoder.pt", map_location="cpu", weights_only=True)
    payload["settings"] = {**payload["settings"], **sections}
    digest = save_tensors(cell / "encoder.pt", payload)
    description = json.loads((cell / "readout.json").read_text())
    (cell / "readout.json").write_text(json.dumps({**description, "encoder_sha256": digest}))


def test_a_bundle_names_no_folder_of_the_exporting_lab(exported, tmp_path):
    """A template from files and an external starting checkpoint were recorded by their
    paths (/home/<user>/...), which went to every lab the bundle was sent to and are read
    nowhere there."""
    export = {**exported.export,
              "settings": {**exported.export["settings"], "model": {
                  **exported.export["settings"]["model"],
                  "init_checkpoint": "/home/jdoe/models/resnet18_medicalnet.pth"}},
              "preprocessing": {**PREPROCESSING, "template": {
                  **PREPROCESSING["template"], "t1": "/home/jdoe/templates/lab_T1_2mm.nii.gz",
                  "mask": "/home/jdoe/templates/lab_mask_2mm.nii.gz"}}}
    cell = tmp_path / "cell"
    shutil.copytree(exported.cell, cell)
    _record_training_settings(cell, model=export["settings"]["model"])  # trained so
    manifest = export_model(cell, cell / "encoder.pt", exported.split_dir / "stats.json",
                            bundle_dir=tmp_path / "bundle", **export)
    assert manifest["preprocessing"]["template"]["t1"] == "lab_T1_2mm.nii.gz"
    assert manifest["preprocessing"]["template"]["mask"] == "lab_mask_2mm.nii.gz"
    assert manifest["settings"]["model"]["init_checkpoint"] == "resnet18_medicalnet.pth"
    assert "jdoe" not in (tmp_path / "bundle" / "manifest.json").read_text()
    readme = (tmp_path / "bundle" / "README.md").read_text()
    assert "jdoe" not in readme
    assert "lab's own files, lab_T1_2mm.nii.gz and lab_mask_2mm.nii.gz: ask for them" in readme


def test_an_encoder_trained_with_other_settings_than_the_cells_is_not_exported(exported,
                                                                              tmp_path):
    """With .snakemake/metadata deleted (or outputs --touch-ed), a changed train.lr retrained
    nothing, and the bundle's manifest gave the new rate beside an encoder trained at the
    old one."""
    cell = tmp_path / "cell"
    shutil.copytree(exported.cell, cell)
    trained_lr = exported.settings["train"]["lr"]
    changed = {**exported.export, "settings": {
        **exported.export["settings"],
        "train": {**exported.export["settings"]["train"], "lr": trained_lr * 2}}}
    with pytest.raises(ExportError, match=rf"encoder\.pt was trained with other settings than "
                                          rf"the cell's: train\.lr {trained_lr!r} \(trained\) "
                                          rf"against {trained_lr * 2!r}\. Snakemake did not "
                                          rf"retrain the cell"):
        export_model(cell, cell / "encoder.pt", exported.split_dir / "stats.json",
                     bundle_dir=tmp_path / "bundle", **changed)
    assert not (tmp_path / "bundle").exists()
    # a cell fine-tuned from a pretraining run: its job was given the run's encoder as
    # model.init_checkpoint (training_params), the cell names the run only: no difference
    finetuned = tmp_path / "finetuned"
    shutil.copytree(exported.cell, finetuned)
    model = exported.export["settings"]["model"]
    _record_training_settings(finetuned, model={
        **model, "init": "pretrained:t1w", "init_checkpoint": "results/pretrain/t1w/encoder.pt"})
    export_model(finetuned, finetuned / "encoder.pt", exported.split_dir / "stats.json",
                 bundle_dir=tmp_path / "finetuned_bundle", **{
                     **exported.export, "settings": {**exported.export["settings"], "model": {
                         **model, "init": "pretrained:t1w", "init_checkpoint": None}}})
    # nor a bundle that says its encoder was fine-tuned from a pretraining run it never saw
    pretrained = {**exported.export, "settings": {
        **exported.export["settings"],
        "model": {**exported.export["settings"]["model"], "init": "pretrained:t1w"}}}
    with pytest.raises(ExportError, match=r"model\.init 'scratch' \(trained\) against "
                                          r"'pretrained:t1w'"):
        export_model(cell, cell / "encoder.pt", exported.split_dir / "stats.json",
                     bundle_dir=tmp_path / "bundle", **pretrained)


def _copy_bundle(exported, tmp_path) -> Path:
    copied = tmp_path / "bundle"
    shutil.copytree(exported.bundle_dir, copied)
    return copied


def _rewrite_manifest(copied: Path, manifest: dict) -> None:
    """Write an edited manifest with its digest recomputed, as someone who edits a bundle
    on purpose would: the checks behind the digest must still hold."""
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    (copied / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_file_fails_with_checksum_error_naming_it(exported, tmp_path):
    copied = _copy_bundle(exported, tmp_path)
    state = torch.load(copied / "readout.pt", weights_only=True)
    state["intercept"] = state["intercept"] + 5.0  # "make everyone 5 years older"
    torch.save(state, copied / "readout.pt")
    with pytest.raises(BundleError, match=r"checksum mismatch for .*readout\.pt"):
        read_bundle(copied)


def test_manifest_without_a_files_checksum_is_refused(exported, tmp_path):
    copied = _copy_bundle(exported, tmp_path)
    manifest = json.loads((copied / "manifest.json").read_text())
    del manifest["files"]["readout.pt"]  # an edited read-out, its checksum dropped
    _rewrite_manifest(copied, manifest)
    with pytest.raises(BundleError, match=r"lists no checksum for readout\.pt"):
        read_bundle(copied)


def test_a_manifest_with_nan_is_refused_even_when_signed(exported, tmp_path):
    """Export writes the numbers a prediction applies finite; Python's json read a re-signed
    bias intercept of NaN, and the run wrote gaps without corrected gaps and a summary of
    no gaps, naming nothing."""
    copied = _copy_bundle(exported, tmp_path)
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["normalisation"]["mean"] = [float("nan") for _ in manifest["normalisation"]["mean"]]
    _rewrite_manifest(copied, manifest)
    assert "NaN" in (copied / "manifest.json").read_text()
    with pytest.raises(BundleError, match=r"manifest\.json: its normalisation\.mean \(\[nan\]\) "
                                          r"is not a finite number, as export writes it"):
        read_bundle(copied)
    # a setting no prediction applies may be infinite (a config's .inf): still read
    manifest["normalisation"]["mean"] = json.loads(
        (exported.bundle_dir / "manifest.json").read_text())["normalisation"]["mean"]
    manifest["settings"]["readout"]["huber_delta"] = float("inf")
    _rewrite_manifest(copied, manifest)
    assert read_bundle(copied).manifest["settings"]["readout"]["huber_delta"] == float("inf")


def test_every_number_a_prediction_applies_must_be_finite(exported, tmp_path):
    """Each of bundle.APPLIED_NUMBERS, with a NaN, an infinity of either sign or a boolean
    (json reads true as a number's stand-in) in place of one of its values, is refused
    naming the key: only the normalisation mean was tested."""
    applied = [("bias_correction", "intercept"), ("bias_correction", "slope"),
               ("normalisation", "mean"), ("normalisation", "sd"),
               ("normalisation", "affine"), ("normalisation", "template_affine")]
    copied = _copy_bundle(exported, tmp_path)
    original = json.loads((copied / "manifest.json").read_text())

    def with_first_value(value, bad):  # the first number of a scalar or nested list
        if isinstance(value, list):
            return [with_first_value(value[0], bad), *value[1:]]
        return bad

    checked = 0
    for section, key in applied:
        if original[section].get(key) is None:
            continue
        for bad in (float("nan"), float("inf"), float("-inf"), True):
            manifest = json.loads(json.dumps(original))
            manifest[section][key] = with_first_value(manifest[section][key], bad)
            _rewrite_manifest(copied, manifest)
            with pytest.raises(BundleError, match=rf"its {section}\.{key} .* is not a finite "
                                                  r"number"):
                read_bundle(copied)
            checked += 1
    assert checked == 4 * len(applied)  # the exported bundle has every one


def test_an_edited_manifest_fails_naming_it(exported, tmp_path, caplog):
    # the manifest's numbers set predictions too: here a small predictor's age scaling or
    # the normalisation's mean; before format 2 such edits passed every check
    copied = _copy_bundle(exported, tmp_path)
    manifest = json.loads((copied / "manifest.json").read_text())
    original = json.loads(json.dumps(manifest))
    assert manifest[MANIFEST_DIGEST_KEY] == manifest_digest(manifest)
    manifest["normalisation"]["mean"] = [value + 0.1 for value in
                                         manifest["normalisation"]["mean"]]
    (copied / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json was modified or damaged after "
                                          r"export: its content does not match"):
        read_bundle(copied)
    # a bundle of format 1 (no digest) is still read, with a warning that says so
    del original[MANIFEST_DIGEST_KEY]
    original["format_version"] = 1
    (copied / "manifest.json").write_text(json.dumps(original))
    caplog.set_level("WARNING", logger="brainage.bundle")
    assert read_bundle(copied).manifest["format_version"] == 1
    assert any("format version 1: its manifest" in record.getMessage()
               for record in caplog.records)


def test_a_bundle_re_exported_while_it_is_read_is_read_again(exported, tmp_path,
                                                             monkeypatch, caplog):
    """A re-export swapped the folder between the manifest and the files: the reader said
    the bundle was damaged and to re-copy it. It now reads the new bundle whole."""
    import brainage.bundle as bundle_module

    old = read_bundle(exported.bundle_dir)
    perturbed = {key: value + 1 if value.is_floating_point() else value
                 for key, value in old.encoder_state.items()}
    write_bundle(tmp_path / "new", name=old.manifest["name"], encoder_state=perturbed,
                 readout_state=old.readout_state, manifest_fields=old.manifest)
    shared = shutil.copytree(exported.bundle_dir, tmp_path / "shared")
    real_verify = bundle_module.verify_checksums
    swaps = []

    def verify_while_a_re_export_lands(directory, manifest):
        if not swaps:  # the re-export lands after the manifest was read
            swaps.append(1)
            shutil.rmtree(shared)
            shutil.copytree(tmp_path / "new", shared)
        return real_verify(directory, manifest)

    monkeypatch.setattr(bundle_module, "verify_checksums", verify_while_a_re_export_lands)
    with caplog.at_level("INFO", logger="brainage.bundle"):
        bundle = read_bundle(shared)
    assert "re-exported while it was read" in caplog.text
    for key, value in perturbed.items():
        assert torch.equal(bundle.encoder_state[key], value), key
    (shared / "encoder.pt").write_bytes(b"damaged")  # damage stays damage
    with pytest.raises(BundleError, match=r"checksum mismatch for .*encoder.pt"):
        read_bundle(shared)


def test_incompatible_format_version_fails_clearly(exported, tmp_path):
    copied = _copy_bundle(exported, tmp_path)
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["format_version"] = BUNDLE_FORMAT_VERSION + 1
    manifest["versions"]["brainage"] = "9.0.0"
    (copied / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"format version 3 \(written by brainage 9\.0\.0\).*"
                                          r"reads format version\(s\) 1, 2"):
        read_bundle(copied)


def test_a_malformed_manifest_is_refused_as_a_damaged_bundle(exported, tmp_path):
    """Format-1 manifests carry no digest: a version that is not a whole number (JSON
    true equals 1 in Python) or a section that is not an object is refused by name,
    never read as format 1 nor failing later with an AttributeError."""
    copied = _copy_bundle(exported, tmp_path)
    original = json.loads((copied / "manifest.json").read_text())
    for change, message in (({"format_version": True}, r"format version True"),
                            ({"format_version": 1.0, "versions": []}, r"format version 1\.0 "
                                                                      r"\(written by brainage "
                                                                      r"an unknown version\)"),
                            ({"format_version": 1, "files": ["encoder.pt"]},
                             r"its 'files' is a list, not an object"),
                            ({"format_version": 1, "settings": None},
                             r"its 'settings' is a NoneType, not an object"),
                            # optional sections too, and an unknown map (found by a review)
                            ({"format_version": 1, "training": []},
                             r"its 'training' is a list, not an object"),
                            ({"format_version": 1, "normalisation": {
                                **original["normalisation"], "modalities": ["stifness"]}},
                             r"normalisation modalities \['stifness'\] are not a list of the "
                             r"maps brainage knows")):
        (copied / "manifest.json").write_text(json.dumps({**original, **change}))
        with pytest.raises(BundleError, match=message):
            read_bundle(copied)
    # a read-out description that does not fit readout.pt: named, not a KeyError
    readout = {key: value for key, value in original["readout"].items() if key != "method"}
    (copied / "manifest.json").write_text(json.dumps({**original, "format_version": 1,
                                                      "readout": readout}))
    with pytest.raises(BundleError, match=r"its 'readout' does not describe the read-out of "
                                          r"readout\.pt \(KeyError: 'method'\)"):
        BrainAgeModel.from_bundle(copied, device="cpu")


def test_missing_file_and_foreign_folder_fail_clearly(exported, tmp_path):
    copied = _copy_bundle(exported, tmp_path)
    (copied / "encoder.pt").unlink()
    with pytest.raises(BundleError, match=r"encoder\.pt is missing"):
        read_bundle(copied)
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        read_bundle(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "nowhere")


class _Payload:
    """Any class instance: unpickling it would import and run code."""


def test_pickled_object_in_bundle_is_refused_even_with_matching_checksum(exported, tmp_path):
    copied = _copy_bundle(exported, tmp_path)
    torch.save({"coef": _Payload()}, copied / "readout.pt")
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["files"]["readout.pt"] = sha256_file(copied / "readout.pt")
    _rewrite_manifest(copied, manifest)
    with pytest.raises(BundleError, match=r"weights_only=True"):
        read_bundle(copied)


def test_a_manifest_of_another_kind_is_refused(exported, tmp_path):
    """Some other tool's manifest.json (its digest even valid) is no brainage bundle: its
    keys would be read as settings and normalisation statistics."""
    copied = _copy_bundle(exported, tmp_path)
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["kind"] = "another-tools-bundle"
    _rewrite_manifest(copied, manifest)
    with pytest.raises(BundleError, match=r"not a brainage model bundle manifest \(its 'kind' "
                                          r"is 'another-tools-bundle'"):
        read_bundle(copied)


def test_a_manifest_listing_a_file_outside_the_bundle_is_refused(exported, tmp_path):
    """An untrusted manifest must not make the reader open files beside or above the bundle
    folder, even with their right checksum."""
    copied = _copy_bundle(exported, tmp_path)
    outside = copied.parent / "outside.pt"
    shutil.copy(copied / "encoder.pt", outside)
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["files"]["../outside.pt"] = sha256_file(outside)
    _rewrite_manifest(copied, manifest)
    with pytest.raises(BundleError, match=r"lists '\.\./outside\.pt', which is not a file "
                                          r"name inside the bundle"):
        read_bundle(copied)


def test_a_readout_of_plain_numbers_is_refused(exported, tmp_path):
    """weights_only=True also loads plain numbers and lists; a read-out must be tensors (a
    coefficient 3 instead of a tensor failed later, in the middle of a prediction)."""
    copied = _copy_bundle(exported, tmp_path)
    torch.save({"coef": 3, "intercept": [40.0]}, copied / "readout.pt")
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["files"]["readout.pt"] = sha256_file(copied / "readout.pt")
    _rewrite_manifest(copied, manifest)
    with pytest.raises(BundleError, match=r"readout\.pt is not a dict of tensors"):
        read_bundle(copied)


def test_a_bundle_replaced_while_it_is_read_gives_the_files_that_were_checked(
        exported, tmp_path, monkeypatch):
    """A bundle re-exported into the same folder (write_bundle swaps the whole folder) or
    re-copied while a cohort reads it: the payload files were checksummed, then loaded
    again by name, so the tensors could be the new bundle's under the old manifest (its
    normalisation and bias correction), with no checksum checked on them."""
    import os

    from brainage import bundle as bundle_module

    copied = _copy_bundle(exported, tmp_path)
    newer = tmp_path / "newer"
    shutil.copytree(copied, newer)
    state = torch.load(newer / "readout.pt", weights_only=True)
    state["intercept"] = state["intercept"] + 5.0
    torch.save(state, newer / "readout.pt")
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["files"]["readout.pt"] = sha256_file(newer / "readout.pt")
    _rewrite_manifest(newer, manifest)
    verify = bundle_module.verify_checksums

    def verify_then_replace(directory, manifest):
        verified = verify(directory, manifest)
        shutil.rmtree(copied)
        os.replace(newer, copied)  # the new bundle lands right after the check
        return verified

    monkeypatch.setattr(bundle_module, "verify_checksums", verify_then_replace)
    bundle = read_bundle(copied)
    original = torch.load(exported.bundle_dir / "readout.pt", weights_only=True)
    assert bundle.manifest["files"] == exported.manifest["files"]
    assert torch.equal(bundle.readout_state["intercept"], original["intercept"])


def test_a_bundle_exported_for_cuda_says_to_choose_the_device_where_there_is_none(
        exported, tmp_path, monkeypatch):
    """The bundle predicts on its exporting run's train.device unless told otherwise; a
    bundle from a GPU cluster (train.device cuda) on a machine without one said to edit
    config key train.device, a config its user does not have, not --device."""
    from brainage.config import ConfigError

    copied = _copy_bundle(exported, tmp_path)
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["settings"]["train"]["device"] = "cuda"
    _rewrite_manifest(copied, manifest)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"model bundle {re.escape(str(copied))} .*"
                                          r"train\.device 'cuda'.*--device cpu"):
        BrainAgeModel.from_bundle(copied)
    assert BrainAgeModel.from_bundle(copied, device="cpu").device.type == "cpu"
    # --device cuda asked for on such a machine: the option, not a config key, is named
    with pytest.raises(ConfigError, match=r"^--device cuda was asked for, but PyTorch sees no "
                                          r"CUDA device here\. Choose the device: --device cpu"):
        BrainAgeModel.from_bundle(exported.bundle_dir, device="cuda")


def test_the_workflows_predict_job_runs_a_cuda_bundle_on_its_cpu_node(
        world, new_cohort, tmp_path, monkeypatch):
    """Rule predict_cohort asks for no GPU, so on SLURM it runs where PyTorch sees none: a
    bundle exported with train.device cuda stopped there with a message about --device,
    which the rule's user cannot pass (only a config edit of train.device, which retrains
    the grid, got past it). The rule's script lets the job's own machine choose."""
    import runpy

    import brainage.logs

    copied = tmp_path / "bundle"
    shutil.copytree(world.bundle_dir, copied)
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["settings"]["train"]["device"] = "cuda"
    _rewrite_manifest(copied, manifest)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(brainage.logs, "log_to_file", lambda path: None)  # the test's logs
    labels = list(new_cohort.files["maps"])
    out = tmp_path / "out"
    job = SimpleNamespace(
        log=[str(tmp_path / "predict.log")], wildcards=SimpleNamespace(cohort="new"),
        input=SimpleNamespace(qc=[new_cohort.files["qc"][label] for label in labels]),
        output=SimpleNamespace(**{name: str(out / file) for name, file in (
            ("predictions", "predictions.tsv"), ("summary", "summary.tsv"),
            ("figure", "gap.png"), ("provenance", "provenance.json"))}),
        params=SimpleNamespace(bundle_dir=str(copied), dataset_root=str(new_cohort.root),
                               maps=stiffness_maps(new_cohort.files["maps"]), labels=labels,
                               qc_thresholds=QC_THRESHOLDS, bias_reference_group=None,
                               seen_in_training={f"sub-{labels[0]}": "train (split holdout)"}))
    runpy.run_path(str(REPO / "workflow" / "scripts" / "predict_cohort.py"),
                   init_globals={"snakemake": job})
    predicted = pd.read_csv(out / "predictions.tsv", sep="\t")
    expected = new_cohort.predictions.set_index("participant_id")["predicted_age"]
    assert np.allclose(predicted.set_index("participant_id")["predicted_age"]
                       .reindex(expected.index), expected, atol=1e-9, equal_nan=True)
    # the subjects the plan found the model has seen reach the job
    assert predicted.set_index("participant_id").loc[f"sub-{labels[0]}", "status"] == \
        "seen_in_training"


def test_an_export_removes_the_half_written_bundles_of_a_killed_one(exported, tmp_path):
    """A kill (a job's time limit, a crashed node) skips write_bundle's clean-up: its
    staging folder, a bundle half written, and the folder holding the bundle it replaced
    stayed next to the bundle for good, shipped with results/models/. The next export
    removes them, and only them."""
    models = tmp_path / "models"
    half = models / ".demo.staging-k3j_x9ab"
    half.mkdir(parents=True)
    (half / "encoder.pt").write_bytes(b"cut short")
    replaced = models / ".demo.old-ab12cd34" / "demo"
    shutil.copytree(exported.bundle_dir, replaced)
    kept = [models / ".demo.notes", models / ".other.staging-k3j_x9ab",
            models / ".demo.old.staging-q1w2e3r4"]  # a bundle "demo.old"'s
    for path in kept:
        path.mkdir()
        (path / "manifest.json").write_text("{}")
    export_model(exported.cell, exported.cell / "encoder.pt",
                 exported.split_dir / "stats.json", bundle_dir=models / "demo",
                 **exported.export)
    assert sorted(path.name for path in models.iterdir()) == sorted(
        ["demo", *(path.name for path in kept)])
    read_bundle(models / "demo")


def test_write_bundle_accepts_tensors_only(tmp_path):
    fields = {key: {} for key in ("settings", "normalisation", "readout", "bias_correction",
                                  "template")}
    with pytest.raises(TypeError, match="tensors only"):
        write_bundle(tmp_path / "b", name="b", encoder_state={"w": np.zeros(2)},
                     readout_state={}, manifest_fields=fields)
    assert not (tmp_path / "b").exists()


def test_bundle_folder_is_readable_by_others_as_its_files_are(exported, tmp_path):
    """The bundle goes to other people: its folder gets the permissions the umask gives
    any new folder, like its files (the staging folder from tempfile.mkdtemp was private,
    0700), whether it is written anew or replaces an older bundle. The usual umask 022 is
    set (folder and files are created as mkdir and open() create them), so the test can
    fail under any umask."""
    import os
    import stat

    bundle = tmp_path / "models" / "demo"
    umask = os.umask(0o022)
    try:
        for _ in ("new", "replacing"):
            export_model(exported.cell, exported.cell / "encoder.pt",
                         exported.split_dir / "stats.json", bundle_dir=bundle,
                         **exported.export)
            assert stat.S_IMODE(bundle.stat().st_mode) == 0o755
            for file in bundle.iterdir():
                assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
    finally:
        os.umask(umask)


def write_stub_bundle(folder, name: str, preprocessing: dict) -> None:
    """A bundle with valid checksums and a given preprocessing record, whose other
    sections are empty: enough for the checks that run before any image is read."""
    fields = {key: {} for key in ("settings", "readout", "bias_correction", "template",
                                  "source")}
    write_bundle(folder, name=name, encoder_state={"w": torch.zeros(1)},
                 readout_state={"coef": torch.zeros(1)},
                 manifest_fields={**fields, "normalisation": {"modalities": ["stiffness"]},
                                  "preprocessing": preprocessing})


def test_a_bundle_folder_that_is_a_link_is_replaced_where_it_points(tmp_path):
    """results/models/brainage linked to a shared drive where colleagues pick the model
    up: a re-export replaced the link by a folder and left the shared bundle as it was."""
    shared = tmp_path / "shared" / "brainage"
    write_stub_bundle(shared, "old", PREPROCESSING)
    (shared / "colleagues_note.txt").write_text("the old bundle's folder")
    link = tmp_path / "models" / "brainage"
    link.parent.mkdir()
    link.symlink_to(shared, target_is_directory=True)
    write_stub_bundle(link, "new", PREPROCESSING)
    assert link.is_symlink() and link.resolve() == shared.resolve()
    assert json.loads((shared / "manifest.json").read_text())["name"] == "new"
    assert not (shared / "colleagues_note.txt").exists()  # replaced as a whole


def test_a_bundle_that_does_not_fit_on_the_disk_is_named(tmp_path, monkeypatch):
    """`predict export` on a full disk stopped with PyTorch's "unexpected pos 777280 vs
    777176" traceback; the architecture promises a WriteError naming the file."""
    monkeypatch.setattr("brainage.io.free_bytes", lambda folder: 2)
    with pytest.raises(WriteError, match=rf"writing {re.escape(str(tmp_path))}/bundle/encoder\.pt "
                                         rf"needs about 4 bytes but only 2 bytes are free"
                                         rf".*'Freeing disk space' says which"):
        write_stub_bundle(tmp_path / "bundle", "full", PREPROCESSING)
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging folder left


def test_a_manifest_that_does_not_fit_is_named_in_the_bundle(tmp_path, monkeypatch):
    """The encoder and read-out fitted, the manifest did not: the error named
    `.bundle.staging-<random>/manifest.json`, a folder gone by the time it was shown (a
    review); the encoder's error already named the bundle's file."""
    from brainage.io import write_failure

    def disk_full(path, values):
        raise write_failure(Path(path), OSError(28, "No space left on device"))

    monkeypatch.setattr("brainage.bundle.write_json", disk_full)
    with pytest.raises(WriteError) as failed:
        write_stub_bundle(tmp_path / "bundle", "full", PREPROCESSING)
    assert str(failed.value).startswith(
        f"writing {tmp_path / 'bundle' / 'manifest.json'} failed: No space left on device")
    assert ".staging-" not in str(failed.value)
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging folder left


@pytest.mark.parametrize("template, key", [
    ({"space": "a/../../../escaped/x"}, r"template\.space"),
    ({"space": "TestSpace", "source": "url"}, r"template\.source"),
])
def test_a_bundles_preprocessing_record_cannot_write_outside_the_output(tmp_path, template, key):
    """A bundle from another lab passes its checksums (they are its own) but names the
    template space, a path part, in its manifest: it is validated as a config key before
    anything is written."""
    preprocessing = {**PREPROCESSING, "template": {**PREPROCESSING["template"], **template}}
    write_stub_bundle(tmp_path / "bundle", "foreign", preprocessing)
    output = tmp_path / "work" / "out"
    with pytest.raises(BundleError, match=rf"(?s)model bundle .*bundle.*'{key}'.*re-export"):
        run_cohort(tmp_path / "bundle", tmp_path / "dataset", output,
                   template_t1="t1.nii.gz", template_mask="mask.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # nothing written


def test_export_refuses_a_readout_fitted_on_another_encoder(exported, tmp_path):
    """A cell retrained after its evaluation: the saved read-out no longer belongs to the
    encoder, and exporting the pair would ship a model nobody evaluated."""
    retrained = tmp_path / "encoder.pt"
    payload = torch.load(exported.cell / "encoder.pt", weights_only=True)
    first = next(iter(payload["model"]))
    payload["model"][first] = payload["model"][first] + 0.01
    torch.save(payload, retrained)
    with pytest.raises(ExportError, match="retrained after evaluation"):
        export_model(exported.cell, retrained, exported.split_dir / "stats.json",
                     bundle_dir=tmp_path / "bundle", **exported.export)
    assert not (tmp_path / "bundle").exists()


def test_a_bundle_of_a_kfold_or_loso_split_says_what_its_model_never_saw(tmp_path, caplog):
    """predict.model exports the first split's model: under loso it never saw a whole study
    (a review's bundle lacked study1), said only in the bundle's README."""
    from brainage.export import warn_of_a_partial_split

    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tage\tstudy\tsubset\n" + "".join(
        f"sub-{index}\t{30 + index}\tstudy{index % 3 + 1}\t"
        f"{'test' if index % 3 == 0 else 'train'}\n" for index in range(9)))
    with caplog.at_level(logging.WARNING, logger="brainage.export"):
        warn_of_a_partial_split("holdout", table)
        assert not caplog.records
        warn_of_a_partial_split("losostudy1", table)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert ("split losostudy1's" in record.getMessage()
            and "trained on 6 of the cohort's 9 subjects, without study study1" in
            record.getMessage() and "split.scheme: holdout" in record.getMessage())


def test_export_refuses_stats_of_another_split_and_an_unknown_bias_fit(exported, tmp_path):
    """A read-out evaluated on one split exported with another split's normalisation, or a
    predict.bias_fit that names no fit: ExportError saying what to do, nothing written."""
    stats = json.loads((exported.split_dir / "stats.json").read_text())
    other = tmp_path / "stats.json"
    other.write_text(json.dumps({**stats, "split": "fold-2"}))
    with pytest.raises(ExportError, match=r"belongs to split .* not to .*'fold-2'"):
        export_model(exported.cell, exported.cell / "encoder.pt", other,
                     bundle_dir=tmp_path / "bundle", **exported.export)
    with pytest.raises(ExportError, match=r"predict.bias_fit is 'validation'"):
        export_model(exported.cell, exported.cell / "encoder.pt",
                     exported.split_dir / "stats.json", bundle_dir=tmp_path / "bundle",
                     bias_fit="validation", **exported.export)
    assert not (tmp_path / "bundle").exists()


def test_export_names_a_damaged_stats_or_metrics_file_and_the_rule_that_rewrites_it(
        exported, tmp_path):
    """A stats.json or metrics.json cut short (a full disk, an interrupted copy): json's own
    error names a line but no file; the export names the file and the rule, writes nothing."""
    import shutil

    damaged_stats = tmp_path / "stats.json"
    damaged_stats.write_text((exported.split_dir / "stats.json").read_text()[:40])
    with pytest.raises(ExportError, match=rf"{damaged_stats}.*damaged.*backup.*"
                                          rf"normalise_dataset.*every cell of the split is "
                                          rf"then trained again"):
        export_model(exported.cell, exported.cell / "encoder.pt", damaged_stats,
                     bundle_dir=tmp_path / "bundle", **exported.export)
    cell = shutil.copytree(exported.cell, tmp_path / "cell")
    (cell / "metrics.json").write_text('{"mae": 4.')
    with pytest.raises(ExportError, match=r"cell/metrics.json.*damaged.*evaluate_encoder"):
        export_model(cell, cell / "encoder.pt", exported.split_dir / "stats.json",
                     bundle_dir=tmp_path / "bundle", **exported.export)
    assert not (tmp_path / "bundle").exists()


def test_normalisation_record_keeps_the_models_channels_without_subject_ids():
    """Per-channel entries are picked for the model's channels (model.modalities), in its
    order; the statistics subjects are counted, not listed; an incomplete stats.json is
    refused naming what it lacks."""
    from brainage.export import normalisation_record
    from brainage.normalise import RECORD_KEYS

    stats = {key: f"<{key}>" for key in RECORD_KEYS}
    stats.update(modalities=["stiffness", "damping_ratio"], scale_by_brain_median=[True, False],
                 mean=[3.0, 0.4], sd=[0.5, 0.1], n_voxels=[1000, 900], scope="train",
                 split="holdout", statistics_subjects=["sub-01", "sub-02", "sub-03"])
    record = normalisation_record(stats, ["damping_ratio"])
    assert (record["modalities"], record["mean"], record["sd"]) == (["damping_ratio"], [0.4],
                                                                      [0.1])
    assert (record["scale_by_brain_median"], record["n_voxels"]) == ([False], [900])
    assert record["n_statistics_subjects"] == 3 and "statistics_subjects" not in record
    assert record["dtype"] == "<dtype>" and record["split"] == "holdout"
    swapped = normalisation_record(stats, ["damping_ratio", "stiffness"])
    assert swapped["mean"] == [0.4, 3.0]
    with pytest.raises(ExportError, match=r"stats.json lacks sd, dtype; rerun"):
        normalisation_record({key: value for key, value in stats.items()
                              if key not in ("sd", "dtype")}, ["stiffness"])


@pytest.fixture(scope="module")
def two_channel_cell(tmp_path_factory):
    """A split of stiffness and damping ratio and a cell evaluated on both channels."""
    root = tmp_path_factory.mktemp("two_channels")
    split_dir = write_split(root / "dataset", n_subjects=24, n_test=6, shape=(8, 10, 8),
                            modalities=("stiffness", "damping_ratio"))
    settings = _random_cell(split_dir, root / "cell", tiny_settings(
        model={"modalities": ["stiffness", "damping_ratio"]}))
    template = write_template(root, shape=(8, 10, 8), affine=np.diag([6.0, 6.0, 6.0, 1.0]))
    return SimpleNamespace(split_dir=split_dir, cell=root / "cell", settings=settings,
                           template=template)


@pytest.mark.parametrize("model, what", [
    ({"modalities": ["damping_ratio", "stiffness"]}, "channels"),  # loads: swapped inputs
    ({"modalities": ["damping_ratio"]}, "channels"),
    ({"width": 16}, "network"),
])
def test_export_refuses_settings_the_encoder_was_not_trained_with(two_channel_cell, tmp_path,
                                                                   model, what):
    """`python -m brainage.predict export` with another config than the run's (an override
    file left out): the manifest would describe inputs or a network other than the
    encoder's. With the channels swapped the bundle even loads and predicts from the wrong
    maps; otherwise only the cohort's prediction refused it, saying to re-export."""
    cell = two_channel_cell
    settings = {**cell.settings, "model": {**cell.settings["model"], **model}}
    with pytest.raises(ExportError, match=rf"(?s)encoder.pt.*{what}.*config"):
        export_model(cell.cell, cell.cell / "encoder.pt", cell.split_dir / "stats.json",
                     settings, bundle_dir=tmp_path / "bundle", name="b",
                     preprocessing=PREPROCESSING, **cell.template)
    assert not (tmp_path / "bundle").exists()
    manifest = export_model(cell.cell, cell.cell / "encoder.pt",
                            cell.split_dir / "stats.json", cell.settings,
                            bundle_dir=tmp_path / "bundle", name="b",
                            preprocessing=PREPROCESSING, **cell.template)
    assert manifest["normalisation"]["modalities"] == ["stiffness", "damping_ratio"]
    # the bundle's README names every map a cohort needs, not the stiffness alone
    assert ("participants.tsv + sub-*/mre/*_stiffness.nii.gz + "
            "sub-*/mre/*_damping_ratio.nii.gz" in (tmp_path / "bundle" / "README.md").read_text())


def test_export_refuses_a_split_normalised_again_after_evaluation(exported, tmp_path):
    """stats.json rewritten after the cell's training and evaluation (the run stopped
    after normalise_dataset reran): the bundle would pair the new normalisation with an
    encoder and read-out fitted on the old arrays."""
    cell = tmp_path / "cell"
    shutil.copytree(exported.cell, cell)
    description = json.loads((cell / "readout.json").read_text())
    assert "split_images_sha256" in description  # recorded by evaluate_encoder
    (cell / "readout.json").write_text(json.dumps({**description,
                                                   "split_images_sha256": "1" * 64}))
    stats = json.loads((exported.split_dir / "stats.json").read_text())
    renormalised = tmp_path / "stats.json"
    renormalised.write_text(json.dumps({**stats, "images_sha256": "0" * 64}))
    with pytest.raises(ExportError, match=r"normalised again after training and evaluation"):
        export_model(cell, cell / "encoder.pt", renormalised,
                     bundle_dir=tmp_path / "bundle", **exported.export)
    assert not (tmp_path / "bundle").exists()
    renormalised.write_text(json.dumps({**stats, "images_sha256": "1" * 64}))
    export_model(cell, cell / "encoder.pt", renormalised, bundle_dir=tmp_path / "bundle",
                 **exported.export)  # the arrays it was fitted on: exported
    # a read-out evaluated by a version that did not record the arrays: nothing to compare
    del description["split_images_sha256"]
    (cell / "readout.json").write_text(json.dumps(description))
    export_model(cell, cell / "encoder.pt", renormalised, bundle_dir=tmp_path / "older",
                 **exported.export)


# -- age-bias correction -----------------------------------------------------------------------

def test_a_training_line_that_overcorrects_the_test_subjects_is_warned_of(caplog):
    """A pilot's line (29 training subjects) turned the test subjects' gap-age correlation
    from -0.72 to +0.74: a 21-year-old's corrected brain age was 1.5 years, and the export
    said it at INFO only, the bundle's README not at all."""
    from brainage.agebias import overcorrects, select_bias_correction

    record = {"intercept": 17.221, "slope": -0.4071, "fitted_on": "training",
              "description": "out-of-fold predictions of the training subjects",
              "n_subjects": 29, "gap_age_r_before": -0.721, "gap_age_r_after": 0.0,
              "gap_age_r_after_on_other": 0.744}
    fits = {"training": record, "test": {**record, "fitted_on": "test"}}
    with caplog.at_level("WARNING", logger="brainage.agebias"):
        select_bias_correction(fits, "training", n_test=8)
    assert re.search(r"the age-bias line \(fitted on out-of-fold .*, 29 subjects\) "
                     r"overcorrects the held-out test subjects: the correlation of their gap "
                     r"with age is \+0\.74 after it, against -0\.72 before", caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.agebias"):
        select_bias_correction(fits, "test", n_test=8)  # the other set is in-sample
        select_bias_correction({"training": {**record, "gap_age_r_after_on_other": 0.2}},
                               "training", n_test=8)
        select_bias_correction({"training": {**record, "gap_age_r_after_on_other": -0.7}},
                               "training", n_test=8)  # under-corrected: the sign it had
        # +0.6 of 8 test subjects: a line that carries over gives as much by chance (Fisher's
        # z 1.55); of 40 it does not (3.9)
        select_bias_correction({"training": {**record, "gap_age_r_after_on_other": 0.6}},
                               "training", n_test=8)
    assert "overcorrects" not in caplog.text
    assert overcorrects({**record, "gap_age_r_after_on_other": 0.6}, 40)
    assert overcorrects(record, 8) and not overcorrects(record, None)
    assert not overcorrects({**record, "gap_age_r_after_on_other": None}, 8)


def test_fit_age_bias_recovers_a_known_line_and_removes_it():
    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 80, 200)
    predicted = ages + 12.0 - 0.3 * ages + rng.normal(0, 2, 200)  # regression to the mean
    bias = fit_age_bias(ages, predicted)
    assert bias.intercept == pytest.approx(12.0, abs=1.0)
    assert bias.slope == pytest.approx(-0.3, abs=0.03)
    corrected = bias.corrected_gap(ages, predicted)
    assert abs(np.corrcoef(ages, corrected)[0, 1]) < 1e-10
    assert corrected.mean() == pytest.approx(0.0, abs=1e-10)


def test_out_of_fold_predictions_belong_to_their_own_subjects():
    from sklearn.model_selection import KFold

    # features that carry age: each subject's out-of-fold prediction is its own age (a
    # prediction filed under another subject would miss by years)
    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 80, 40)
    features = np.column_stack([ages, rng.normal(size=40)])
    section = resolve_cell({"readout": {"method": "ridge"}})["readout"]
    predicted = out_of_fold_predictions(features, ages, section, folds=5, seed=0)
    np.testing.assert_allclose(predicted, ages, atol=0.5)
    # and each comes from a read-out fitted without its fold: with the training-mean
    # read-out, the mean age of the other folds (K-fold shuffled with the seed; not seed 0,
    # which a KFold that ignored the cell's seed for a fixed 0 matched as well)
    means = out_of_fold_predictions(features, ages, {**section, "method": "train_mean"},
                                    folds=5, seed=3)
    expected = np.empty(len(ages))
    for fit_rows, held_out in KFold(5, shuffle=True, random_state=3).split(features):
        expected[held_out] = ages[fit_rows].mean()
    np.testing.assert_allclose(means, expected)


def test_age_bias_and_gap_correlation_leave_out_subjects_without_a_prediction():
    # gap = 10 - 0.5 * age exactly, plus a sixth subject whose prediction is missing (NaN):
    # it must drop out of both, not turn the fit or the correlation into NaN.
    ages = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 70.0])
    predicted = ages + 10.0 - 0.5 * ages
    predicted[-1] = np.nan
    bias = fit_age_bias(ages, predicted)
    assert (bias.intercept, bias.slope) == pytest.approx((10.0, -0.5))
    assert gap_age_correlation(ages, predicted - ages) == pytest.approx(-1.0)


def test_gap_age_correlation_of_a_constant_gap_is_undefined_not_nan(recwarn):
    """A gap that does not vary (predictions exactly age + c) has no correlation with age:
    None (JSON null in the bundle's manifest), not np.corrcoef's NaN with a RuntimeWarning,
    written as the non-standard JSON token NaN."""
    ages = np.array([20.0, 40.0, 60.0, 80.0])
    assert gap_age_correlation(ages, np.full(4, 3.0)) is None
    assert gap_age_correlation(np.full(4, 50.0), ages) is None
    # equal gaps whose np.std is 7e-15 (their mean rounded), not 0: r was -5.7e-16
    assert gap_age_correlation(np.array([71.5, 75.3, 47.1]), np.full(3, 53.27692307692307)) \
        is None
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_bias_fits_record_the_out_of_fold_error_and_the_correlation_after_their_own_fit():
    # The training record is fitted on out-of-fold predictions, and reports their MAE
    # (oof_mae, not the read-out's in-sample MAE) and r(gap, age) after its own correction
    # (0 on the subjects it was fitted on, whereas the raw gap correlates with age).
    from brainage.agebias import bias_fits

    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 80, 30)
    features = np.column_stack([ages + rng.normal(0, 8, 30), rng.normal(size=30)])
    section = resolve_cell({"readout": {"method": "ridge"}})["readout"]
    in_sample = fit_readout(features, ages, section).predict(features)
    test_ages = np.array([25.0, 45.0, 65.0, 75.0])
    test_predicted = test_ages + np.array([6.0, -1.0, 2.0, -7.0])
    fits = bias_fits(features, ages, in_sample, test_ages=test_ages,
                     test_predicted=test_predicted, readout_settings=section, seed=0,
                     where="split holdout")
    oof = out_of_fold_predictions(features, ages, section, folds=section["cv_folds"], seed=0)
    training = fits["training"]
    assert training["oof_mae"] == pytest.approx(np.mean(np.abs(oof - ages)))
    assert training["oof_mae"] != pytest.approx(np.mean(np.abs(in_sample - ages)))
    expected = fit_age_bias(ages, oof)
    assert (training["intercept"], training["slope"]) == pytest.approx(
        (expected.intercept, expected.slope))
    assert training["gap_age_r_before"] == pytest.approx(gap_age_correlation(ages, oof - ages))
    assert training["gap_age_r_before"] < -0.3
    for name, record in fits.items():
        assert abs(record["gap_age_r_after"]) < 1e-8, name
    assert fits["test"]["n_subjects"] == 4
    # ... and on the other reference set, which the line was not fitted on: the number
    # that says whether the correction carries over to unseen subjects
    test_fit = fit_age_bias(test_ages, test_predicted)
    assert training["gap_age_r_after_on_other"] == pytest.approx(gap_age_correlation(
        test_ages, expected.corrected_gap(test_ages, test_predicted)))
    assert fits["test"]["gap_age_r_after_on_other"] == pytest.approx(gap_age_correlation(
        ages, test_fit.corrected_gap(ages, oof)))
    assert abs(training["gap_age_r_after_on_other"]) > 0.05


@pytest.mark.parametrize("method", ["ridge", "pca_ridge"])
def test_bias_fits_with_two_training_subjects_record_the_error_not_crash(method):
    """Two training subjects leave each out-of-fold read-out one subject: the evaluation
    crashed there, naming Ridge's cross-validation, although the record promises an error
    entry and the test subjects' fit needs no training refit."""
    from brainage.agebias import bias_fits

    features = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 0.5]])
    ages = np.array([30.0, 60.0])
    section = resolve_cell({"readout": {"method": method}})["readout"]
    test_ages = np.array([25.0, 45.0, 65.0, 75.0])
    fits = bias_fits(features, ages, ages, test_ages=test_ages,
                     test_predicted=test_ages + np.array([6.0, -1.0, 2.0, -7.0]),
                     readout_settings=section, seed=0, where="split holdout")
    assert set(fits["training"]) == {"error"}
    assert fits["training"]["error"].startswith(
        "age-bias correction on the training subjects of split holdout: the out-of-fold "
        "read-outs could not be fitted (")
    assert fits["test"]["n_subjects"] == 4 and fits["test"]["oof_mae"] is None
    assert fits["test"]["cv_folds"] is None  # no refit ran
    assert fits["test"]["gap_age_r_after_on_other"] is None


def test_fit_age_bias_refuses_degenerate_reference_sets():
    with pytest.raises(ValueError, match="at least 3 subjects"):
        fit_age_bias([30.0, 40.0], [31.0, 39.0])
    with pytest.raises(ValueError, match="every subject is 50.0 years old"):
        fit_age_bias([50.0] * 4, [48.0, 51.0, 52.0, 50.0])


def test_group_summary_uses_the_t_interval_and_leaves_qc_failures_out():
    from scipy import stats

    from brainage.apply import summarise_gaps

    gaps = [1.0, 3.0, 2.0, 6.0]
    table = pd.DataFrame({"group": ["a"] * 5, "age": [50.0] * 5, "gap": gaps + [99.0],
                          "corrected_gap": gaps + [99.0], "within_training_ages": True,
                          "status": ["predicted"] * 4 + ["qc_failed"]})
    row = summarise_gaps(table, "group").iloc[0]
    assert (row["n"], row["n_predicted"], row["n_qc_failed"], row["n_gap"]) == (5, 4, 1, 4)
    assert row["mean_corrected_gap"] == pytest.approx(3.0)
    half_width = stats.t.ppf(0.975, 3) * np.std(gaps, ddof=1) / 2  # 4 subjects: t, not normal
    assert row["corrected_gap_ci95_high"] - 3.0 == pytest.approx(half_width)
    assert 3.0 - row["corrected_gap_ci95_low"] == pytest.approx(half_width)


def test_a_groups_interval_carries_the_uncertainty_of_the_bias_line():
    """A group's corrected gaps share one fitted line: its error does not average out. The
    interval treated the line as exact, and a group with no true gap beside a reference of
    10 controls excluded 0 in 39 % of its "95 %" intervals (a review's simulation); the
    reference group's own mean is 0 by construction and had an interval too."""
    from scipy import stats

    from brainage.agebias import fit_age_bias
    from brainage.apply import summarise_gaps

    rng = np.random.default_rng(4)
    hits = 0
    for _ in range(400):  # controls 20-80 years, patients 60-80, no true gap
        ages = np.r_[rng.uniform(20, 80, 10), rng.uniform(60, 80, 20)]
        predicted = ages + rng.normal(0, 5, 30)
        bias = fit_age_bias(ages[:10], predicted[:10])
        table = pd.DataFrame({"group": ["control"] * 10 + ["patient"] * 20, "age": ages,
                              "status": "predicted", "gap": predicted - ages,
                              "corrected_gap": bias.corrected_gap(ages, predicted),
                              "within_training_ages": True})
        summary = summarise_gaps(table, "group", bias=bias,
                                 reference_group="control").set_index("group")
        patients = summary.loc["patient"]
        hits += patients["corrected_gap_ci95_low"] <= 0 <= patients["corrected_gap_ci95_high"]
    assert 0.92 <= hits / 400 <= 0.98, hits  # 0.61 with the line taken as exact
    control = summary.loc["control"]
    assert control["mean_corrected_gap"] == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(control["corrected_gap_ci95_low"]) and np.isnan(control["corrected_gap_ci95_high"])
    # the interval, worked by hand: the group's variance plus the line's at its mean age
    residuals = predicted[:10] - ages[:10] - bias.expected_gap(ages[:10])
    line = (np.sum(residuals ** 2) / 8) * (1 / 10 + (ages[10:].mean() - ages[:10].mean()) ** 2
                                            / np.sum((ages[:10] - ages[:10].mean()) ** 2))
    own = np.var(table["corrected_gap"][10:], ddof=1) / 20
    degrees = (own + line) ** 2 / (own ** 2 / 19 + line ** 2 / 8)
    assert patients["corrected_gap_ci95_high"] - patients["mean_corrected_gap"] == pytest.approx(
        stats.t.ppf(0.975, degrees) * np.sqrt(own + line))
    # a small group beside a large reference: the line's variance, from 30 degrees of
    # freedom, raised Welch-Satterthwaite's above the group's 3 and the interval came out
    # narrower than the one that ignores the line; capped at n - 1, never
    big = fit_age_bias(np.linspace(20, 80, 32), np.linspace(20, 80, 32) + rng.normal(0, 5, 32))
    small = pd.DataFrame({"group": "patient", "age": [60.0, 65.0, 70.0, 75.0],
                          "status": "predicted", "gap": 0.0, "corrected_gap": [1.0, -2.0, 4.0, 0.5],
                          "within_training_ages": True})
    wide = summarise_gaps(small, "group", bias=big).iloc[0]
    ignoring = stats.t.ppf(0.975, 3) * np.std(small["corrected_gap"], ddof=1) / 2
    half = wide["corrected_gap_ci95_high"] - wide["mean_corrected_gap"]
    assert half == pytest.approx(stats.t.ppf(0.975, 3) * np.sqrt(
        ignoring ** 2 / stats.t.ppf(0.975, 3) ** 2 + big.line_variance(67.5)))
    assert half > ignoring
    # a line recorded without its reference set's statistics (an older bundle): as before
    bare = type(bias)(bias.intercept, bias.slope)
    row = summarise_gaps(table, "group", bias=bare).set_index("group").loc["patient"]
    assert row["corrected_gap_ci95_high"] - row["mean_corrected_gap"] == pytest.approx(
        stats.t.ppf(0.975, 19) * np.sqrt(own))


def test_group_summary_describes_raw_gaps_and_all_members_in_order_of_appearance():
    """Groups in their order in the table (not sorted); ``n`` and ``age_mean`` over every
    member, QC failures included; the raw gap's mean and sample sd (ddof 1) over those
    predicted, apart from the corrected gap's."""
    from brainage.apply import summarise_gaps

    table = pd.DataFrame({
        "site": ["b", "b", "b", "a", "a"], "age": [40.0, 50.0, 90.0, 30.0, 30.0],
        "gap": [2.0, 6.0, np.nan, 1.0, 5.0], "corrected_gap": [0.0, 1.0, np.nan, -1.0, 1.0],
        "within_training_ages": [True, True, False, True, True],
        "status": ["predicted", "predicted", "qc_failed", "predicted", "predicted"]})
    summary = summarise_gaps(table, "site")
    assert summary["group"].tolist() == ["b", "a"]
    assert (summary["grouped_by"] == "site").all()
    b = summary.iloc[0]
    assert (b["n"], b["n_predicted"], b["n_qc_failed"]) == (3, 2, 1)
    assert b["age_mean"] == pytest.approx(60.0)  # the QC failure's age counts
    assert b["mean_gap"] == pytest.approx(4.0) and b["mean_corrected_gap"] == pytest.approx(0.5)
    assert b["sd_gap"] == pytest.approx(np.sqrt(8.0))  # ddof 1: sqrt((4 + 4) / 1)
    assert b["sd_corrected_gap"] == pytest.approx(np.sqrt(0.5))


def test_group_summary_counts_the_subjects_behind_its_gaps():
    """Predicted subjects without an age have no gap: ``n_gap`` is the n of the mean, sd
    and t interval (here 2 of 5 predicted), not ``n_predicted``."""
    from scipy import stats

    from brainage.apply import summarise_gaps

    table = pd.DataFrame({
        "age": [40.0, 50.0, np.nan, np.nan, np.nan, 60.0],
        "gap": [1.0, 3.0, np.nan, np.nan, np.nan, np.nan],
        "corrected_gap": [1.0, 3.0, np.nan, np.nan, np.nan, np.nan],
        # the 50-year-old is older than every training subject; the others have no answer
        "within_training_ages": pd.array([True, False, pd.NA, pd.NA, pd.NA, False],
                                         dtype="boolean"),
        "status": ["predicted"] * 5 + ["qc_failed"]})
    row = summarise_gaps(table, None).iloc[0]
    assert (row["n"], row["n_predicted"], row["n_qc_failed"], row["n_gap"]) == (6, 5, 1, 2)
    assert row["n_outside_training_ages"] == 1  # of the 2 behind the gaps, not the QC failure
    half_width = stats.t.ppf(0.975, 1) * np.std([1.0, 3.0], ddof=1) / np.sqrt(2)
    assert row["corrected_gap_ci95_high"] - 2.0 == pytest.approx(half_width)


def test_the_bias_line_is_written_with_the_slopes_sign_once(exported):
    """The bundle README and the logs wrote ``gap = 2.920 + -0.0821 * age``."""
    assert str(AgeBias(intercept=2.92, slope=-0.0821)) == "gap = 2.920 - 0.0821 * age"
    assert str(AgeBias(intercept=-1.5, slope=0.25)) == "gap = -1.500 + 0.2500 * age"
    bias = exported.manifest["bias_correction"]
    readme = (Path(exported.bundle_dir) / "README.md").read_text()
    assert f"age-bias correction: {AgeBias(bias['intercept'], bias['slope'])} (" in readme
    assert "+ -" not in readme
    # the reference set's statistics travel with the line: a group's interval needs them
    assert bias["n_subjects"] >= 3 and bias["age_sxx"] > 0 and bias["residual_variance"] > 0
    line = AgeBias.from_record(bias)
    assert line.line_variance(bias["age_mean"]) == pytest.approx(
        bias["residual_variance"] / bias["n_subjects"])
    # what the receiving lab needs beside the command: who is predicted, and with what
    assert "- subjects are predicted when their preprocessing passes QC: min_" in readme
    assert re.search(r"- made with brainage \S+, torch \S+, numpy", readme)
    # a template from the exporting lab's files is named in the command (it failed without)
    assert "--output <folder> --template-t1 <T1> --template-mask <mask>" in readme
    assert "`predict run` checks their voxels against the checksums in manifest.json" in readme


def test_corrected_gap_is_shifted_by_the_accelerated_offset():
    # A subject whose stiffness looks 8 years older is predicted as f(age + 8) with
    # f(x) = x + a + b x; the corrected gap is then 8 (1 + b), independent of age.
    bias = AgeBias(intercept=15.0, slope=-0.25)
    ages = np.array([40.0, 60.0, 75.0])
    predicted = (ages + 8) + bias.expected_gap(ages + 8)
    np.testing.assert_allclose(bias.corrected_gap(ages, predicted), 8 * 0.75)


def test_bias_correction_removes_gap_age_correlation_on_training_set(exported):
    """The stored (a, b) come from out-of-fold predictions of the training subjects; on
    those predictions the corrected gap is uncorrelated with age, on the raw gap it is not."""
    from brainage.data import load_split
    from brainage.evaluate import cell_features

    split = load_split(exported.split_dir)
    # the features the evaluation fitted on (features.npz): embedding again could differ in
    # the last float32 bits with the thread count, and the check below is to 1e-8
    features = cell_features(split, exported.cell / "features.npz", exported.settings).features
    ages = split.ages[split.train_index]
    oof = out_of_fold_predictions(features[:len(ages)].astype(np.float64), ages,
                                  exported.settings["readout"], folds=5, seed=0)
    correction = exported.manifest["bias_correction"]
    bias = AgeBias(correction["intercept"], correction["slope"])
    raw_r = gap_age_correlation(ages, oof - ages)
    assert raw_r < -0.3  # regression to the mean: young over-, old under-estimated
    assert abs(gap_age_correlation(ages, bias.corrected_gap(ages, oof))) < 1e-8
    assert correction["gap_age_r_before"] == pytest.approx(raw_r)
    assert correction["n_subjects"] == len(ages)
    # the in-sample fit, kept for comparison, is the fitted read-out's own training
    # predictions (predictions.tsv), not the out-of-fold ones
    assert correction["fitted_on"] == "training"
    predictions = pd.read_csv(exported.cell / "predictions.tsv", sep="\t")
    in_sample = predictions[predictions["subset"] == "train"]
    expected = fit_age_bias(in_sample["age"].to_numpy(), in_sample["predicted_age"].to_numpy())
    assert correction["other_fits"]["training_in_sample"] == pytest.approx(
        {"intercept": expected.intercept, "slope": expected.slope})
    assert correction["slope"] != pytest.approx(expected.slope)
    assert set(correction["other_fits"]) == {"training_in_sample", "test"}


def test_bias_correction_can_be_fitted_on_the_held_out_test_subjects(exported, tmp_path):
    manifest = export_model(exported.cell, exported.cell / "encoder.pt",
                            exported.split_dir / "stats.json", bundle_dir=tmp_path / "b",
                            bias_fit="test", **exported.export)
    correction = manifest["bias_correction"]
    cell = pd.read_csv(exported.cell / "predictions.tsv", sep="\t")
    test = cell[cell["subset"] == "test"]
    expected = fit_age_bias(test["age"], test["predicted_age"])
    assert correction["fitted_on"] == "test" and correction["n_subjects"] == len(test)
    assert (correction["intercept"], correction["slope"]) == pytest.approx(
        (expected.intercept, expected.slope))
    assert correction["other_fits"]["training"] == {
        key: exported.manifest["bias_correction"][key] for key in ("intercept", "slope")}


# -- new cohorts -------------------------------------------------------------------------------

def test_normalisation_with_bundle_stats_reproduces_the_training_array(world):
    """The normalisation stage's images.npy rows, recomputed from the 2 mm maps with the
    bundle's statistics: identical, so a new subject is seen exactly as training was."""
    images = np.load(world.split_dir / "images.npy")
    table = pd.read_csv(world.split_dir / "participants.tsv", sep="\t")
    normalisation = read_bundle(world.bundle_dir).normalisation
    for row, participant_id in enumerate(table["participant_id"][:10]):
        image = nib.load(world.training["maps"][participant_id[len("sub-"):]])
        np.testing.assert_array_equal(
            normalise_map({"stiffness": np.asarray(image.dataobj, dtype=np.float32)},
                          normalisation),
            images[row])


def test_new_cohort_is_normalised_with_training_statistics_not_its_own(world, new_cohort):
    stats = json.loads((world.split_dir / "stats.json").read_text())
    normalisation = read_bundle(world.bundle_dir).normalisation
    assert (normalisation["mean"], normalisation["sd"]) == (stats["mean"], stats["sd"])
    # the accelerated cohort is softer: normalised with training statistics its mean is
    # below 0 (re-estimating on the cohort would erase exactly the effect we look for)
    accelerated = [label for label in new_cohort.files["maps"] if label.startswith("newa")]
    means = []
    for label in accelerated:
        image = nib.load(new_cohort.files["maps"][label])
        volume = normalise_map({"stiffness": np.asarray(image.dataobj, dtype=np.float32)},
                               normalisation)
        means.append(volume[volume != 0].mean())
    assert np.mean(means) < -0.1


def test_accelerated_group_has_positive_corrected_gap_and_healthy_near_zero(new_cohort):
    summary = pd.read_csv(new_cohort.out / "summary.tsv", sep="\t").set_index("group")
    healthy, accelerated = summary.loc["healthy"], summary.loc["accelerated"]
    assert accelerated["mean_corrected_gap"] > 3.0
    assert accelerated["corrected_gap_ci95_low"] > 0
    assert abs(healthy["mean_corrected_gap"]) < 2.0
    assert healthy["corrected_gap_ci95_low"] < 0 < healthy["corrected_gap_ci95_high"]
    # the correction matters: raw gaps carry the regression to the mean
    assert accelerated["mean_corrected_gap"] > healthy["mean_corrected_gap"] + 3.0


def test_predictions_table_reports_every_subject_and_qc_failure(new_cohort):
    table = pd.read_csv(new_cohort.out / "predictions.tsv", sep="\t")
    assert len(table) == 48
    assert list(table.columns[:5]) == ["participant_id", "age", "sex", "study", "group"]
    failed = table[table["participant_id"] == "sub-newh005"].iloc[0]
    assert failed["status"] == "qc_failed" and not failed["qc_pass"]
    assert "dice 0.500 < 0.85" in failed["qc_reason"]
    assert np.isnan(failed["predicted_age"]) and np.isnan(failed["corrected_gap"])
    predicted = table[table["status"] == "predicted"]
    assert len(predicted) == 47 and predicted["predicted_age"].notna().all()
    np.testing.assert_allclose(predicted["gap"], predicted["predicted_age"] - predicted["age"])
    summary = pd.read_csv(new_cohort.out / "summary.tsv", sep="\t").set_index("group")
    assert summary.loc["healthy", "n"] == 24 and summary.loc["healthy", "n_predicted"] == 23
    assert summary.loc["healthy", "n_qc_failed"] == 1
    provenance = json.loads((new_cohort.out / "provenance.json").read_text())
    assert provenance["qc_failed"][0]["participant_id"] == "sub-newh005"
    # the model that made the numbers: the manifest's digest (its normalisation, template and
    # QC records are not in the weights' digests), its cell, and this run's software
    manifest = json.loads((Path(provenance["bundle"]) / "manifest.json").read_text())
    assert provenance["bundle_manifest_sha256"] == manifest["manifest_sha256"]
    assert provenance["bundle_source"] == {key: value for key, value in manifest["source"].items()
                                           if key != "metrics"}
    assert provenance["bundle_created_utc"] == manifest["created_utc"]
    assert set(provenance["versions"]) >= {"brainage", "torch", "numpy", "python"}
    assert (new_cohort.out / "gap_by_group.png").stat().st_size > 1000


def test_the_record_of_the_model_comes_before_the_numbers(world, new_cohort, tmp_path,
                                                       monkeypatch):
    """A `predict run` killed between its reports (a time limit) left a predictions.tsv
    that named no model and read as finished: provenance.json is written first."""
    from brainage import apply

    def killed(*arguments, **options):
        raise KeyboardInterrupt  # stands for the kill at the first table

    predict_cohort(world.bundle_dir, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                   new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
                   summary_path=tmp_path / "s.tsv", cohort="earlier", device="cpu")
    monkeypatch.setattr(apply, "write_tsv", killed)
    with pytest.raises(KeyboardInterrupt):
        predict_cohort(world.bundle_dir, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                       new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
                       summary_path=tmp_path / "s.tsv", cohort="new", device="cpu")
    assert json.loads((tmp_path / "provenance.json").read_text())["cohort"] == "new"
    # and the earlier run's tables are gone: the record never stands beside other numbers
    assert not (tmp_path / "p.tsv").exists() and not (tmp_path / "s.tsv").exists()


def test_training_age_range_includes_its_bounds(world, tmp_path):
    training = world.manifest["training"]
    low, high = training["age_min"], training["age_max"]
    table = _participants(4, "edge", [low, high, low - 1.0, high + 1.0])
    table["age"] = [low, high, low - 1.0, high + 1.0]  # exactly, not rounded
    files = write_cohort(tmp_path / "edge", table, seed=5)
    predictions = predict_cohort(world.bundle_dir, tmp_path / "edge",
                                 stiffness_maps(files["maps"]), files["qc"],
                                 predictions_path=tmp_path / "out" / "predictions.tsv",
                                 summary_path=tmp_path / "out" / "summary.tsv", cohort="edge",
                                 device="cpu")
    assert predictions["within_training_ages"].tolist() == [True, True, False, False]


def test_corrected_gap_uses_the_bundle_correction(world, new_cohort):
    correction = world.manifest["bias_correction"]
    table = new_cohort.predictions[new_cohort.predictions["status"] == "predicted"]
    expected = table["gap"] - (correction["intercept"] + correction["slope"] * table["age"])
    np.testing.assert_allclose(table["corrected_gap"], expected)
    # the corrected brain age is the chronological age plus the corrected gap
    np.testing.assert_allclose(table["corrected_predicted_age"],
                               table["age"] + table["corrected_gap"])


def test_a_cohort_is_embedded_a_batch_of_subjects_at_a_time(world, new_cohort, tmp_path,
                                                            monkeypatch):
    """The whole cohort's normalised volumes were held at once (4.4 MB per subject and map
    at 2 mm: 30 GB for 2,000 subjects of three maps, beyond predict_cohort's memory); now
    EMBED_BATCH subjects at a time, with the same predictions."""
    from brainage import apply

    seen = []
    features = BrainAgeModel.features

    def counting(self, volumes):
        seen.append(len(volumes))
        return features(self, volumes)

    monkeypatch.setattr(BrainAgeModel, "features", counting)
    monkeypatch.setattr(apply, "EMBED_BATCH", 5)
    table = predict_cohort(world.bundle_dir, new_cohort.root,
                           stiffness_maps(new_cohort.files["maps"]), new_cohort.files["qc"],
                           predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                           cohort="new", device="cpu")
    assert seen == [5] * 9 + [2]  # the 47 subjects that pass QC
    np.testing.assert_allclose(table["predicted_age"], new_cohort.predictions["predicted_age"],
                               rtol=0, atol=1e-6)


def test_subjects_the_model_has_seen_are_marked_and_left_out_of_the_summary(world, new_cohort,
                                                                          tmp_path, caplog):
    """A predict cohort sharing ids with the training subjects (another session of them,
    the README's route): the summary averaged them with the others and its interval was a
    quarter of the honest width (a review, on the demo's bundle: MAE 1.4 years on seen
    subjects, 5.2 on unseen ones), and nothing in the outputs said which they were."""
    seen = {"sub-newh001": "train (split holdout of dataset.root)",
            "sub-newh002": "train (split holdout of dataset.root), as sub-newh02",
            "sub-newh005": "pretraining (pretrain.t1.source.root)",  # fails QC too
            "sub-newa003": "train (split holdout of dataset.root)"}
    caplog.set_level("INFO", logger="brainage.apply")
    table = predict_cohort(world.bundle_dir, new_cohort.root,
                           stiffness_maps(new_cohort.files["maps"]), new_cohort.files["qc"],
                           predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                           figure_path=tmp_path / "g.png", cohort="new",
                           bias_reference_group="healthy", seen_in_training=seen, device="cpu")
    written = pd.read_csv(tmp_path / "p.tsv", sep="\t", keep_default_na=False)
    marked = written.set_index("participant_id")["seen_in_training"]
    assert marked[marked != ""].to_dict() == seen
    status = written.set_index("participant_id")["status"]
    assert status[["sub-newh001", "sub-newh002", "sub-newa003"]].eq("seen_in_training").all()
    assert status["sub-newh005"] == "qc_failed"
    # predicted all the same, with the ages of the run that knows of no one seen
    np.testing.assert_allclose(table["predicted_age"], new_cohort.predictions["predicted_age"],
                               rtol=0, atol=1e-6)
    # the age-bias line refitted on the 21 healthy subjects the model has not seen
    unseen_healthy = table[(table["group"] == "healthy") & (table["status"] == "predicted")]
    assert len(unseen_healthy) == 21
    refit = fit_age_bias(unseen_healthy["age"], unseen_healthy["predicted_age"])
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    recorded = provenance["bias_correction"]
    assert (recorded["intercept"], recorded["slope"]) == pytest.approx(
        (refit.intercept, refit.slope))
    assert recorded["source"] == "cohort new group 'healthy' (21 subjects)"
    assert provenance["seen_in_training"] == [{"participant_id": pid, "seen_in": what}
                                              for pid, what in seen.items()]  # table order
    # the summary's gaps and interval are the unseen subjects' own
    summary = pd.read_csv(tmp_path / "s.tsv", sep="\t").set_index("group")
    accelerated = table[(table["group"] == "accelerated") & (table["status"] == "predicted")]
    row = summary.loc["accelerated"]
    assert (row["n"], row["n_predicted"], row["n_seen_in_training"], row["n_gap"]) == (24, 23, 1, 23)
    assert row["mean_corrected_gap"] == pytest.approx(accelerated["corrected_gap"].mean())
    assert row["sd_corrected_gap"] == pytest.approx(accelerated["corrected_gap"].std(ddof=1))
    assert summary.loc["healthy", "n_seen_in_training"] == 2
    assert summary.loc["healthy", "n_qc_failed"] == 1
    # the record and the log count them as the summary does (sub-newh005 failed QC)
    assert (provenance["n_predicted"], provenance["n_seen_in_training"]) == (44, 3)
    assert "predicted 44 of 48 subjects (1 failed QC, 3 seen in training and left out of the " \
           "summary)" in caplog.text
    # a reference group the model has seen whole is refused before any subject is embedded
    every_healthy = {pid: "train (split holdout)" for pid in table["participant_id"]
                     if pid.startswith("sub-newh")}
    with pytest.raises(InputError, match=r"group 'healthy' .*only 0 of its 24 subjects are new "
                                         r"to the model and passed QC \(24 are subjects the "
                                         r"model has seen"):
        predict_cohort(world.bundle_dir, new_cohort.root,
                       stiffness_maps(new_cohort.files["maps"]), new_cohort.files["qc"],
                       predictions_path=tmp_path / "p2.tsv", summary_path=tmp_path / "s2.tsv",
                       cohort="new", bias_reference_group="healthy",
                       seen_in_training=every_healthy, device="cpu")


def test_bias_reference_group_refits_on_the_cohort(world, new_cohort, tmp_path):
    table = predict_cohort(world.bundle_dir, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                           new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
                           summary_path=tmp_path / "s.tsv", cohort="new",
                           bias_reference_group="healthy", device="cpu")
    healthy = table[(table["group"] == "healthy") & (table["status"] == "predicted")]
    assert healthy["corrected_gap"].mean() == pytest.approx(0.0, abs=1e-9)
    assert abs(gap_age_correlation(healthy["age"], healthy["corrected_gap"])) < 1e-8
    # provenance records the refitted line, not the bundle's, and the subjects it was fitted
    # on: the 23 healthy subjects with a prediction (sub-newh005 failed QC)
    refit = fit_age_bias(healthy["age"], healthy["predicted_age"])
    recorded = json.loads((tmp_path / "provenance.json").read_text())["bias_correction"]
    assert (recorded["intercept"], recorded["slope"]) == pytest.approx(
        (refit.intercept, refit.slope))
    assert recorded["intercept"] != pytest.approx(world.manifest["bias_correction"]["intercept"])
    assert recorded["source"] == "cohort new group 'healthy' (23 subjects)"
    # the group the line was fitted on: 0 by construction, no interval; the others have one
    summary = pd.read_csv(tmp_path / "s.tsv", sep="\t").set_index("group")
    assert summary.loc["healthy", ["corrected_gap_ci95_low", "corrected_gap_ci95_high"]].isna().all()
    others = summary.drop(index="healthy")
    assert len(others) and others["corrected_gap_ci95_high"].gt(others["corrected_gap_ci95_low"]).all()


def test_subjects_beyond_the_reference_groups_ages_are_named(world, new_cohort, tmp_path,
                                                            caplog):
    """Controls younger than the others: the refitted line is extrapolated to everyone
    older than them (a review: healthy 65- to 76-year-olds got corrected gaps of +19 to +36
    years from controls aged 21-34), without a word."""
    root = tmp_path / "cohort"
    shutil.copytree(new_cohort.root, root)
    participants = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
    young = (participants["group"] == "healthy") & (participants["age"].astype(float) < 55)
    participants.loc[young, "group"] = "young"
    participants.to_csv(root / "participants.tsv", sep="\t", index=False)
    with caplog.at_level(logging.WARNING, logger="brainage.apply"):
        table = predict_cohort(world.bundle_dir, root, stiffness_maps(new_cohort.files["maps"]),
                               new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
                               summary_path=tmp_path / "s.tsv", cohort="new",
                               bias_reference_group="young", device="cpu")
    predicted = table[table["status"] == "predicted"]
    reference = predicted[predicted["group"] == "young"]
    low, high = reference["age"].min(), reference["age"].max()
    beyond = predicted.loc[~predicted["age"].between(low, high), "participant_id"].tolist()
    assert len(beyond) > 10
    said = [record.getMessage() for record in caplog.records
            if "outside the ages of reference group" in record.getMessage()]
    assert said == [f"cohort new: {len(beyond)} subject(s) outside the ages of reference group "
                    f"'young' ({low:.1f}-{high:.1f} years), on which the age-bias line was "
                    f"refitted ({', '.join(beyond[:10])}, ...): their corrected_gap and "
                    f"corrected_predicted_age extrapolate the line and can be far off; choose "
                    f"a reference group that spans the cohort's ages, or use the bundle's line "
                    f"(leave predict.bias_reference_group, or --bias-reference-group, unset)"]
    caplog.clear()  # the whole cohort's healthy subjects span it: nothing to say
    with caplog.at_level(logging.WARNING, logger="brainage.apply"):
        predict_cohort(world.bundle_dir, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                       new_cohort.files["qc"], predictions_path=tmp_path / "p2.tsv",
                       summary_path=tmp_path / "s2.tsv", cohort="new",
                       bias_reference_group="healthy", device="cpu")
    assert not [record for record in caplog.records
                if "outside the ages of reference group" in record.getMessage()]


def test_an_unknown_bias_reference_group_is_refused_before_any_work(world, new_cohort, tmp_path,
                                                                   monkeypatch):
    """A reference group that no subject belongs to (a typo, or the group of another
    column) was found only when the correction was refitted: after every subject had been
    preprocessed (minutes each) and embedded, and the message named neither the config key
    nor the groups there are."""
    from brainage import apply as apply_module
    from brainage.preprocess import chain

    started = []
    monkeypatch.setattr(chain, "run_subject",
                        lambda *a, **k: started.append(a) or pytest.fail("preprocessed"))
    monkeypatch.setattr(apply_module.BrainAgeModel, "from_bundle",
                        lambda *a, **k: started.append(a) or pytest.fail("embedded"))
    message = (r"reference group 'controls' \(config key predict.bias_reference_group, or "
               r"--bias-reference-group\) is not a value of column 'group' .* groups are "
               r"healthy, accelerated")
    with pytest.raises(InputError, match=message):
        run_cohort(world.bundle_dir, new_cohort.root, tmp_path / "out",
                   bias_reference_group="controls",
                   template_t1=str(world.root / "template_t1.nii.gz"),
                   template_mask=str(world.root / "template_mask.nii.gz"))
    with pytest.raises(InputError, match=message):
        predict_cohort(world.bundle_dir, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                       new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
                       summary_path=tmp_path / "s.tsv", bias_reference_group="controls")
    assert started == [] and not (tmp_path / "p.tsv").exists()
    # a group too small for the line: refused from the table, before the preprocessing
    # and before the previous run's reports are removed, not after both
    cohort = tmp_path / "cohort"
    shutil.copytree(new_cohort.root, cohort, ignore=shutil.ignore_patterns("preproc"))
    table = pd.read_csv(cohort / "participants.tsv", sep="\t")
    table.loc[:1, "group"] = "controls"
    table.to_csv(cohort / "participants.tsv", sep="\t", index=False)
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / OUTPUT_MARKER).write_text("")  # an earlier run's
    (tmp_path / "out" / "predictions.tsv").write_text("the previous run's\n")
    with pytest.raises(InputError, match=r"group 'controls' .*: it has only 2 subjects; the "
                                         r"line needs at least 3"):
        run_cohort(world.bundle_dir, cohort, tmp_path / "out", bias_reference_group="controls",
                   template_t1=str(world.root / "template_t1.nii.gz"),
                   template_mask=str(world.root / "template_mask.nii.gz"))
    assert started == []
    assert (tmp_path / "out" / "predictions.tsv").read_text() == "the previous run's\n"


def test_an_output_folder_that_predict_run_did_not_make_is_refused_untouched(
        world, new_cohort, tmp_path, monkeypatch):
    """``--output results`` (a pipeline's results folder) had its training cohort's
    preprocessed maps overwritten by the new cohort's and its dataset description
    rewritten; an unrelated folder lost a ``summary.tsv`` of the user's; an output inside
    the bundle was deleted by the next export. Each is refused before anything is written;
    a new folder, and an earlier run's (the marker, or the ``.step_records/`` of a run from
    before the marker), are used."""
    from brainage.preprocess import chain

    started = []
    monkeypatch.setattr(chain, "run_subject",
                        lambda *a, **k: started.append(a) or pytest.fail("preprocessed"))
    templates = dict(template_t1=str(world.root / "template_t1.nii.gz"),
                     template_mask=str(world.root / "template_mask.nii.gz"))
    results = tmp_path / "results"
    training_map = results / "preproc" / "sub-newh000" / "anat" / "map.nii.gz"
    training_map.parent.mkdir(parents=True)
    training_map.write_bytes(b"TRAINING SUBJECT")
    (results / "preproc" / "dataset_description.json").write_text('{"Name": "training"}')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.tsv").write_text("my own summary\n")
    for output in (results, mine):
        before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
        with pytest.raises(InputError, match=rf"--output {re.escape(str(output))} already "
                                             r"holds files that `predict run` did not write"):
            run_cohort(world.bundle_dir, new_cohort.root, output, **templates)
        assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before
    with pytest.raises(InputError, match=r"is inside model bundle .*the next export replaces"):
        run_cohort(world.bundle_dir, new_cohort.root, Path(world.bundle_dir) / "adni",
                   **templates)
    assert not (Path(world.bundle_dir) / "adni").exists() and started == []
    # what may be used gets as far as the preprocessing
    earlier = tmp_path / "earlier"
    (earlier / ".step_records").mkdir(parents=True)
    for output in (tmp_path / "new", earlier):
        with pytest.raises(pytest.fail.Exception, match="preprocessed"):
            run_cohort(world.bundle_dir, new_cohort.root, output, **templates)
        assert (output / OUTPUT_MARKER).is_file()


def test_a_bias_reference_group_emptied_by_qc_is_refused_before_any_embedding(
        world, tmp_path, monkeypatch):
    """A reference group left with fewer than 3 QC-passed subjects was found by
    fit_age_bias after every subject had been normalised and embedded, as a ValueError
    that named neither the QC failures nor the config key nor what to do."""
    from brainage import apply as apply_module

    table = pd.concat([_participants(4, "ctl", [40.0, 50.0, 60.0, 70.0], group="control"),
                       _participants(3, "pat", [45.0, 55.0, 65.0], group="patient")],
                      ignore_index=True)
    files = write_cohort(tmp_path / "cohort", table, seed=5, failing=("ctl001", "ctl002"))
    monkeypatch.setattr(apply_module, "normalise_subject",
                        lambda *a, **k: pytest.fail("normalised and embedded"))
    message = (r"^cohort small: the age-bias correction cannot be refitted on group 'control' "
               r"\(config key predict.bias_reference_group, or --bias-reference-group\): only "
               r"2 of its 4 subjects passed QC \(failed: sub-ctl001, sub-ctl002\); .* leave "
               r"the key unset")
    with pytest.raises(InputError, match=message):
        predict_cohort(world.bundle_dir, tmp_path / "cohort", stiffness_maps(files["maps"]),
                       files["qc"], predictions_path=tmp_path / "p.tsv",
                       summary_path=tmp_path / "s.tsv", cohort="small",
                       bias_reference_group="control", device="cpu")
    assert not (tmp_path / "p.tsv").exists()


def test_map_off_the_template_grid_is_refused(world, new_cohort, tmp_path):
    label = "newh000"
    moved = tmp_path / "moved.nii.gz"
    image = nib.load(new_cohort.files["maps"][label])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-2], image.affine), moved)
    maps = stiffness_maps({**new_cohort.files["maps"], label: str(moved)})
    with pytest.raises(InputError, match=r"sub-newh000.*not on the template grid"):
        predict_cohort(world.bundle_dir, new_cohort.root, maps, new_cohort.files["qc"],
                       predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv")


def test_a_subject_without_a_map_the_bundle_reads_is_refused_naming_the_bundle(
        world, new_cohort, tmp_path):
    """A cohort subject without one of the bundle's maps: the message said that config key
    dataset.modalities lists it and to remove it from the modalities, but the maps are
    the trained model's inputs (the bundle's, with no config at all under `python -m
    brainage.predict run`)."""
    cohort = tmp_path / "cohort"
    shutil.copytree(new_cohort.root, cohort, ignore=shutil.ignore_patterns("preproc"))
    missing = cohort / "sub-newa003" / "mre" / "sub-newa003_stiffness.nii.gz"
    missing.unlink()
    message = (rf"^subject sub-newa003: .* {re.escape(str(missing))} is missing; model bundle "
               rf"{re.escape(str(world.bundle_dir))} reads stiffness of every subject\. Add "
               rf"the file, or remove the subject's row from .*participants\.tsv\.$")
    with pytest.raises(InputError, match=message):
        predict_cohort(world.bundle_dir, cohort, stiffness_maps(new_cohort.files["maps"]),
                       new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
                       summary_path=tmp_path / "s.tsv")
    with pytest.raises(InputError, match=message):
        run_cohort(world.bundle_dir, cohort, tmp_path / "out",
                   template_t1=str(world.root / "template_t1.nii.gz"),
                   template_mask=str(world.root / "template_mask.nii.gz"))
    assert not (tmp_path / "p.tsv").exists()


def test_subject_without_preprocessing_is_refused(world, new_cohort, tmp_path):
    maps = stiffness_maps(new_cohort.files["maps"])
    del maps["newa003"]
    with pytest.raises(InputError, match=r"no preprocessed map for sub-newa003"):
        predict_cohort(world.bundle_dir, new_cohort.root, maps, new_cohort.files["qc"],
                       predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv")
    qc = {label: path for label, path in new_cohort.files["qc"].items() if label != "newh007"}
    with pytest.raises(InputError, match=r"no QC file for sub-newh007 "):
        predict_cohort(world.bundle_dir, new_cohort.root,
                       stiffness_maps(new_cohort.files["maps"]), qc,
                       predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv")
    assert not (tmp_path / "p.tsv").exists()


def test_a_bundle_whose_encoder_does_not_fit_its_network_is_a_bundle_error(world):
    """An encoder state that does not load into the network the manifest describes is
    reported as an inconsistent bundle, not as PyTorch's RuntimeError."""
    import dataclasses

    bundle = read_bundle(world.bundle_dir)
    state = dict(bundle.encoder_state)
    state.pop(next(iter(state)))
    with pytest.raises(BundleError, match=r"(?s)encoder.pt does not fit the network .* Re-export"):
        BrainAgeModel.from_bundle(dataclasses.replace(bundle, encoder_state=state),
                                  device="cpu")


def test_a_bundle_whose_parts_do_not_fit_stops_before_any_preprocessing(world, new_cohort,
                                                                       tmp_path):
    """An edited manifest whose network does not fit encoder.pt (its digest recomputed) was
    found after every subject had been preprocessed: minutes to hours, then the error."""
    copied = tmp_path / "bundle"
    shutil.copytree(world.bundle_dir, copied)
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["settings"]["model"]["width"] *= 2
    _rewrite_manifest(copied, manifest)
    output = tmp_path / "out"
    with pytest.raises(BundleError, match=r"encoder.pt does not fit the network"):
        run_cohort(copied, new_cohort.root, output,
                   template_t1=str(world.root / "template_t1.nii.gz"),
                   template_mask=str(world.root / "template_mask.nii.gz"))
    assert not list(output.glob("preproc/sub-*"))


def test_normalise_subject_refuses_a_missing_map_and_non_finite_voxels(world, tmp_path):
    from brainage.apply import normalise_subject

    bundle = read_bundle(world.bundle_dir)
    with pytest.raises(InputError, match=r"^subject sub-x: no preprocessed stiffness map; "
                                         r"model brainage needs stiffness\.$"):
        normalise_subject(bundle, {"damping_ratio": "d.nii.gz"}, subject="sub-x")
    volume = stiffness_map(50.0, np.random.default_rng(0))
    path = tmp_path / "map.nii.gz"
    nib.save(nib.Nifti1Image(volume, TEMPLATE_AFFINE), path)
    assert normalise_subject(bundle, {"stiffness": path}, subject="sub-x").shape[0] == 1
    volume[13, 16, 13] = np.nan
    nib.save(nib.Nifti1Image(volume, TEMPLATE_AFFINE), path)
    with pytest.raises(InputError, match=r"subject sub-x: preprocessed stiffness map .* has "
                                         r"NaN/inf voxels; rerun its preprocessing"):
        normalise_subject(bundle, {"stiffness": path}, subject="sub-x")


def test_from_python_inputs_read_as_a_plausible_wrong_age_are_refused(exported, world,
                                                                      tmp_path):
    """From a notebook: the network pools globally, so a map on another grid (2 mm instead
    of the bundle's analysis grid), with its axes in another order, or with a NaN voxel
    gave an age (60.8 years for 22.6, or NaN) without a word; a preprocessed map in Pa
    predicted 34.8 years. The threads the model computes with can be chosen."""
    from brainage.apply import normalise_subject

    model = BrainAgeModel.from_bundle(exported.bundle_dir, device="cpu", threads=1)
    assert torch.get_num_threads() == 1
    images, _ = _split_images(exported.split_dir)
    assert model.input_shape == images.shape[1:]
    assert np.isfinite(model.predict_age(images)).all()
    for wrong in (images[:, :, :-1], np.swapaxes(images, 2, 3), images[:, 0]):
        with pytest.raises(InputError, match=rf"takes normalised volumes of shape \[n, "
                                             rf"{', '.join(map(str, images.shape[1:]))}\] .* "
                                             rf"not \[.*normalise_subject"):
            model.predict_age(wrong)
    holed = images.copy()
    holed[1, 0, 2, 2, 2] = np.nan
    with pytest.raises(InputError, match=r"hold NaN or inf \(rows 1\)"):
        model.predict_age(holed)
    BrainAgeModel.from_bundle(exported.bundle_dir, device="cpu", threads=2)
    assert torch.get_num_threads() == 2
    in_pa = tmp_path / "in_pa.nii.gz"
    nib.save(nib.Nifti1Image(1000 * stiffness_map(50.0, np.random.default_rng(0)),
                             TEMPLATE_AFFINE), in_pa)
    with pytest.raises(InputError, match=r"subject sub-x: preprocessed stiffness map .*in_pa"
                                         r".*far above the plausible"):
        normalise_subject(read_bundle(world.bundle_dir), {"stiffness": in_pa}, subject="sub-x")


def test_qc_thresholds_given_replace_the_bundles_and_a_cohort_may_fail_qc_entirely(
        world, tmp_path):
    """qc_thresholds overrides the bundle's record (here stricter than every subject's
    Dice of 0.95): every subject is listed as qc_failed, none predicted, and the reports
    are still written. An incomplete set of thresholds is refused naming what is missing."""
    table = _participants(3, "strict", [40.0, 50.0, 60.0])
    files = write_cohort(tmp_path / "cohort", table, seed=6)
    arguments = dict(predictions_path=tmp_path / "out" / "predictions.tsv",
                     summary_path=tmp_path / "out" / "summary.tsv", cohort="strict",
                     device="cpu")
    # the caller's mapping is named, not the bundle (which records all three)
    with pytest.raises(InputError, match=r"^cohort strict: qc_thresholds has no "
                                         r"min_correlation, min_coverage; give all of"):
        predict_cohort(world.bundle_dir, tmp_path / "cohort", stiffness_maps(files["maps"]),
                       files["qc"], qc_thresholds={"min_dice": 0.85}, **arguments)
    strict = {**QC_THRESHOLDS, "min_dice": 0.96}
    predictions = predict_cohort(world.bundle_dir, tmp_path / "cohort",
                                 stiffness_maps(files["maps"]), files["qc"],
                                 qc_thresholds=strict, **arguments)
    assert predictions["status"].tolist() == ["qc_failed"] * 3
    assert (predictions["qc_reason"] == "dice 0.950 < 0.96").all()
    assert predictions["predicted_age"].isna().all()
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["qc_thresholds"] == strict
    assert (provenance["n_subjects"], provenance["n_predicted"]) == (3, 0)
    assert len(provenance["qc_failed"]) == 3
    summary = pd.read_csv(tmp_path / "out" / "summary.tsv", sep="\t")
    assert (summary["n"].tolist(), summary["n_predicted"].tolist()) == ([3], [0])
    assert summary["mean_corrected_gap"].isna().all()


def test_a_bias_reference_group_needs_three_qc_passed_subjects_of_different_ages():
    """Exactly MIN_BIAS_SUBJECTS (3) subjects of different ages are enough; three of one
    age are refused, naming the age. Before any QC (``passed`` None, the check that runs
    before preprocessing) every member counts."""
    from brainage.inputs import MIN_BIAS_SUBJECTS, check_bias_reference_group

    assert MIN_BIAS_SUBJECTS == 3
    table = pd.DataFrame({"participant_id": [f"sub-{index}" for index in range(5)],
                          "age": [40.0, 50.0, 60.0, 50.0, 70.0],
                          "group": ["ctl", "ctl", "ctl", "ctl", "pat"]})
    passed = np.array([True, True, True, False, True])
    check_bias_reference_group(table, "group", "ctl", passed, cohort="c")  # 3 usable: fine
    table["age"] = [50.0, 50.0, 50.0, 40.0, 70.0]
    with pytest.raises(InputError, match=r"group 'ctl' .*: every subject of it that passed "
                                         r"QC is 50 years old \(failed: sub-3\)"):
        check_bias_reference_group(table, "group", "ctl", passed, cohort="c")
    with pytest.raises(InputError, match=r"only 2 of its 4 subjects passed QC"):
        check_bias_reference_group(table, "group", "ctl",
                                   np.array([True, True, False, False, True]), cohort="c")
    check_bias_reference_group(table, "group", "ctl", cohort="c")  # 4 members, 2 ages
    with pytest.raises(InputError, match=r"group 'pat' .*: it has only 1 subject; the line "
                                         r"needs at least 3"):
        check_bias_reference_group(table, "group", "pat", cohort="c")
    table["age"] = 50.0
    with pytest.raises(InputError, match=r"group 'ctl' .*: every subject of it is 50 years "
                                         r"old; the line"):
        check_bias_reference_group(table, "group", "ctl", cohort="c")


# -- read-outs other than Ridge ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["mse", "dex"])
def test_predictor_readout_round_trips_through_arrays(method):
    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 80, 40)
    features = np.column_stack([ages / 30 + rng.normal(0, 0.1, 40), rng.normal(size=(40, 7))])
    section = resolve_cell({"readout": {"method": method, "predictor_epochs": 30}})["readout"]
    readout = fit_readout(features, ages, section, seed=0)
    state, description = readout.to_state()
    assert all(isinstance(value, np.ndarray) for value in state.values())
    json.dumps(description)  # the manifest part is plain JSON
    restored = Readout.from_state(state, description)
    np.testing.assert_array_equal(restored.predict(features), readout.predict(features))


# -- the command-line run, the demo cohort's simulation, the exported cell ----------------------

def _ready_made_chain(new_cohort):
    """A double of chain.run_subject that gives each subject the cohort's ready-made
    registered map and QC file (the real chain is the rules' functions, tested there)."""
    from brainage.preprocess.chain import subject_files

    def preprocessed(inputs, layout, label, *, preproc, **settings):
        files = subject_files(layout, label, preproc)
        for source, target in ((new_cohort.files["maps"][label], files["registered_stiffness"]),
                               (new_cohort.files["qc"][label], files["qc_json"])):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        return files

    return preprocessed


def test_run_cohort_checks_the_template_and_predicts(world, new_cohort, tmp_path, monkeypatch):
    """`python -m brainage.predict run`, with the per-subject chain replaced by the cohort's
    ready-made maps (the real chain is the rules' functions, tested there)."""
    from brainage import predict as predict_module
    from brainage.preprocess import chain

    monkeypatch.setattr(chain, "run_subject", _ready_made_chain(new_cohort))  # jobs=1
    template = {"template_t1": str(world.root / "template_t1.nii.gz"),
                "template_mask": str(world.root / "template_mask.nii.gz")}
    with pytest.raises(InputError, match="pass the same files with --template-t1"):
        predict_module.run_cohort(world.bundle_dir, new_cohort.root, tmp_path / "a")
    table = predict_module.run_cohort(world.bundle_dir, new_cohort.root, tmp_path / "out",
                                      device="cpu", **template)
    pd.testing.assert_frame_equal(table, new_cohort.predictions)
    template_dir = tmp_path / "out" / "preproc" / "tpl-TestSpace"
    assert (template_dir / "tpl-TestSpace_res-2_desc-brain_mask.nii.gz").is_file()
    description = json.loads((tmp_path / "out" / "preproc" / "dataset_description.json")
                             .read_text())
    assert description["DatasetType"] == "derivative"
    assert (tmp_path / "out" / "summary.tsv").is_file()

    other_mask = tmp_path / "other_mask.nii.gz"
    brain = _template_brain()
    brain[:, :, :8] = False
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), TEMPLATE_AFFINE), other_mask)
    with pytest.raises(InputError, match="differs from the one model bundle"):
        predict_module.run_cohort(world.bundle_dir, new_cohort.root, tmp_path / "b",
                                  template_t1=template["template_t1"],
                                  template_mask=str(other_mask))
    # another T1 beside the right mask, on the same grid: subjects would be registered to
    # another image (found by a review: only the mask was compared)
    t1 = nib.load(template["template_t1"])
    other_t1 = tmp_path / "other_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.roll(np.asanyarray(t1.dataobj), 4, axis=0), t1.affine), other_t1)
    with pytest.raises(InputError, match="template T1 rebuilt here .*other_t1.nii.gz.* differs"):
        predict_module.run_cohort(world.bundle_dir, new_cohort.root, tmp_path / "b2",
                                  template_t1=str(other_t1),
                                  template_mask=template["template_mask"])

    # a damaged file of the third subject stops the run before the first subject's chain
    damaged = tmp_path / "damaged"
    shutil.copytree(new_cohort.root, damaged)
    third = pd.read_csv(damaged / "participants.tsv", sep="\t")["participant_id"][2]
    (damaged / third / "mre" / f"{third}_stiffness.nii.gz").write_bytes(b"garbage")
    started = []
    monkeypatch.setattr(chain, "run_subject", lambda *a, **k: started.append(a))
    with pytest.raises(InputError, match=rf"subject {third}: stiffness map .* not a readable"):
        predict_module.run_cohort(world.bundle_dir, damaged, tmp_path / "c", **template)
    assert started == []
    # nothing describes preproc/ as a derivative of a dataset that did not pass
    assert not (tmp_path / "c" / "preproc" / "dataset_description.json").exists()


def test_a_cohort_is_preprocessed_around_the_map_the_training_subjects_were(
        world, tmp_path, monkeypatch):
    """A model that reads only the damping ratio of a cohort trained on [stiffness,
    damping_ratio]: each new subject's mask, registration reference (without a T1w) and QC
    come from its stiffness map, as the training subjects' did, so the cohort gives both
    maps (found by a review: the chain was built around the damping ratio, and QC's
    correlation, measured on it against thresholds chosen on stiffness, failed every
    subject)."""
    from brainage.preprocess import chain

    copied = tmp_path / "bundle"
    shutil.copytree(world.bundle_dir, copied)
    manifest = json.loads((copied / "manifest.json").read_text())
    assert manifest["training"]["grid_modality"] == "stiffness"  # recorded at export
    manifest["normalisation"]["modalities"] = ["damping_ratio"]
    _rewrite_manifest(copied, manifest)
    assert read_bundle(copied).cohort_modalities == ("stiffness", "damping_ratio")
    del manifest["training"]["grid_modality"]  # a bundle exported before it was recorded
    _rewrite_manifest(copied, manifest)
    assert read_bundle(copied).cohort_modalities == ("damping_ratio",)
    manifest["training"]["grid_modality"] = "stiffness"
    _rewrite_manifest(copied, manifest)

    cohort = tmp_path / "cohort"
    write_cohort(cohort, _participants(2, "grid", [40.0, 60.0]), seed=5)
    for label in ("grid000", "grid001"):
        stiffness = nib.load(cohort / f"sub-{label}" / "mre" / f"sub-{label}_stiffness.nii.gz")
        # each subject its own map (identical maps of two subjects are refused)
        damping = np.where(np.asanyarray(stiffness.dataobj) > 0,
                           0.3 + 0.01 * int(label[-1]), 0.0).astype(np.float32)
        nib.save(nib.Nifti1Image(damping, stiffness.affine),
                 cohort / f"sub-{label}" / "mre" / f"sub-{label}_damping_ratio.nii.gz")
    chains = []

    def first_chain(inputs, layout, label, *, modalities, **settings):
        chains.append((sorted(inputs), tuple(modalities)))
        raise RuntimeError("stop after the first subject's chain starts")

    monkeypatch.setattr(chain, "run_subject", first_chain)
    template = {"template_t1": str(world.root / "template_t1.nii.gz"),
                "template_mask": str(world.root / "template_mask.nii.gz")}
    with pytest.raises(RuntimeError, match="stop after"):
        run_cohort(copied, cohort, tmp_path / "out", device="cpu", **template)
    assert chains == [(["damping_ratio", "stiffness"], ("stiffness", "damping_ratio"))]
    for label in ("grid000", "grid001"):
        (cohort / f"sub-{label}" / "mre" / f"sub-{label}_stiffness.nii.gz").unlink()
    with pytest.raises(InputError, match="stiffness"):
        run_cohort(copied, cohort, tmp_path / "out2", device="cpu", **template)


def test_run_names_its_output_and_the_remedies_a_bundle_user_has(world, new_cohort, tmp_path,
                                                                  monkeypatch, caplog):
    """What a lab running a bundle meets (found by trying it): `--output .` names the
    cohort after the folder, not ""; the provenance records absolute paths; the dataset
    folder itself is refused as --output; a subject whose map fails a preprocessing check
    is told to fix the file or drop its row (the bundle fixes the config keys its message
    names); subjects left in preproc/ by another dataset's run are named."""
    from brainage import predict as predict_module
    from brainage.preprocess import chain
    from brainage.preprocess.images import PreprocessError

    template = {"template_t1": str(world.root / "template_t1.nii.gz"),
                "template_mask": str(world.root / "template_mask.nii.gz")}
    monkeypatch.setattr(chain, "run_subject", _ready_made_chain(new_cohort))
    output = tmp_path / "clinic"
    output.mkdir()
    monkeypatch.chdir(output)
    predict_module.run_cohort(world.bundle_dir, new_cohort.root, ".", device="cpu", **template)
    provenance = json.loads((output / "provenance.json").read_text())
    assert provenance["cohort"] == "clinic"
    assert provenance["dataset_root"] == str(Path(new_cohort.root).resolve())
    assert provenance["bundle"] == str(Path(world.bundle_dir).resolve())

    with pytest.raises(InputError, match=r"is the dataset folder itself"):
        predict_module.run_cohort(world.bundle_dir, new_cohort.root, new_cohort.root,
                                  **template)

    fewer = tmp_path / "fewer"
    shutil.copytree(new_cohort.root, fewer, ignore=shutil.ignore_patterns("preproc"))
    table = pd.read_csv(fewer / "participants.tsv", sep="\t")
    table.iloc[2:].to_csv(fewer / "participants.tsv", sep="\t", index=False)
    dropped = table["participant_id"][:2].tolist()

    def in_pa(inputs, layout, label, **settings):
        raise PreprocessError(f"subject sub-{label}: the median brain value is 2338, outside "
                              f"[0.05, 50] kPa. Convert it to kPa, or remove stiffness from "
                              f"config key dataset.modalities.")

    monkeypatch.setattr(chain, "run_subject", in_pa)
    caplog.set_level("WARNING", logger="brainage.predict")
    with pytest.raises(InputError, match=r"(?s)outside \[0\.05, 50\] kPa.*\nWith a model "
                                         r"bundle the preprocessing settings are the "
                                         r"bundle's: fix this subject's file, or remove its "
                                         r"row from .*fewer/participants\.tsv\. The subjects "
                                         r"preprocessed so far are kept"):
        predict_module.run_cohort(world.bundle_dir, fewer, output, **template)
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert re.search(rf"holds 2 subject\(s\) that .*fewer/participants\.tsv does not list "
                     rf"\({dropped[0]}, {dropped[1]}\)\. .*If they left the dataset .*delete "
                     rf"their folders there and in {re.escape(str(output))}/\.step_records "
                     rf"\(the rest is reused\)", warning), warning
    # the run's log holds what was said before it could be opened (the table's check of the
    # subject folders), with the run's options and why it stopped
    last_run = (output / "logs" / predict_module.RUN_LOG).read_text().split("===== ")[-1]
    assert re.match(rf"brainage\.predict run --bundle {re.escape(str(world.bundle_dir))} "
                    rf"--dataset {re.escape(str(fewer))} --output {re.escape(str(output))} "
                    rf"--template-t1 ", last_run), last_run
    assert re.search(rf"WARNING brainage\.inputs: 2 subject folder\(s\) in .*fewer have no "
                     rf"row in .*{dropped[0]}", last_run), last_run
    assert "ERROR brainage: stopped: subject sub-" in last_run

    def short_of_memory(inputs, layout, label, **settings):
        raise PreprocessError(f"subject sub-{label}: skull stripping (deepbet) of x failed: "
                              f"DefaultCPUAllocator: can't allocate memory. The job ran out of "
                              f"memory: the image is not at fault.")

    monkeypatch.setattr(chain, "run_subject", short_of_memory)
    with pytest.raises(InputError, match=r"(?s)not at fault\.\nWith a model bundle the "
                                         r"preprocessing settings are the bundle's: run it "
                                         r"again where more memory is free, or with fewer "
                                         r"--jobs\. The subjects") as raised:
        predict_module.run_cohort(world.bundle_dir, fewer, output, **template)
    assert "remove its row" not in str(raised.value)


def test_a_cohort_registered_by_different_references_is_warned_about(world, new_cohort,
                                                                      tmp_path, caplog):
    """A subject without a T1w in a cohort of subjects with one is registered by its
    stiffness map: its mask and transform come from another image, which moved a
    prediction by 2.3 years when tried. It was an INFO line of its preprocessing only."""
    qc = dict(new_cohort.files["qc"])
    for label in list(qc)[:2]:
        record = json.loads(Path(qc[label]).read_text())
        qc[label] = tmp_path / f"sub-{label}_qc.json"
        qc[label].write_text(json.dumps(dict(record, reference_kind="stiffness")))
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predict_cohort(world.bundle_dir, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                       qc, predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                       cohort="new", device="cpu")
    first, second = [f"sub-{label}" for label in list(qc)[:2]]
    # and the table names them, for whoever reads it rather than the job's log
    written = pd.read_csv(tmp_path / "p.tsv", sep="\t").set_index("participant_id")
    assert written.loc[[first, second], "registered_by"].tolist() == ["stiffness"] * 2
    assert (written.drop(index=[first, second])["registered_by"] == "brain_mask").all()
    assert (written["skull_stripped_by"] == "none").all()
    assert re.search(rf"cohort new: subjects were registered by different reference images: "
                     rf"46 by brain_mask, 2 by stiffness \({first}, {second}\)", caplog.text), \
        caplog.text
    # and the bundle says its training subjects were registered otherwise
    n_train = (pd.read_csv(world.split_dir / "participants.tsv", sep="\t")["subset"]
               == "train").sum()
    assert world.manifest["training"]["registration_references"] == {"brain_mask": n_train}
    assert (f"- training subjects registered to the template by: brain_mask {n_train}\n"
            in (world.bundle_dir / "README.md").read_text())
    assert re.search(rf"cohort new: 2 subject\(s\) were registered by stiffness \({first}, "
                     rf"{second}\), but the model's training subjects were registered by "
                     rf"brain_mask \({n_train}\)", caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predict_cohort(world.bundle_dir, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                       new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
                       summary_path=tmp_path / "s.tsv", cohort="new", device="cpu")
    assert "different reference images" not in caplog.text
    assert "training subjects were registered" not in caplog.text


def _export_with_training_qc(world, tmp_path, **columns):
    """The world's cell exported as ``tmp_path/bundle`` with its training QC table's
    ``columns`` set to the values given; returns the bundle folder and its manifest."""
    training_qc = pd.read_csv(world.root / "qc.tsv", sep="\t").assign(**columns)
    training_qc.to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    bundle = tmp_path / "bundle"
    manifest = export_model(world.cell, world.cell / "encoder.pt", world.split_dir / "stats.json",
                            world.settings, bundle_dir=bundle, name="brainage",
                            preprocessing=PREPROCESSING, qc_table=tmp_path / "qc.tsv",
                            template_t1=world.root / "template_t1.nii.gz",
                            template_mask=world.root / "template_mask.nii.gz")
    return bundle, manifest


def test_a_cohort_registered_unlike_the_training_subjects_is_warned_about(
        world, new_cohort, tmp_path, caplog):
    """A cohort without T1w scans, for a model whose training subjects were all registered
    by their T1w: every subject is registered by its stiffness map, so no subject differs
    from the others, yet all differ from what the model learnt from (the bundle records
    the training subjects' reference images, training.registration_references)."""
    qc = {}
    for label, path in new_cohort.files["qc"].items():
        qc[label] = tmp_path / f"sub-{label}_qc.json"
        qc[label].write_text(json.dumps(dict(json.loads(Path(path).read_text()),
                                             reference_kind="stiffness")))
    bundle, manifest = _export_with_training_qc(world, tmp_path, reference_kind="T1w_brain")
    n_train = manifest["training"]["registration_references"]["T1w_brain"]
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predict_cohort(bundle, new_cohort.root, stiffness_maps(new_cohort.files["maps"]), qc,
                       predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                       cohort="new", device="cpu")
    assert "different reference images" not in caplog.text
    assert re.search(rf"cohort new: {len(qc)} subject\(s\) were registered by stiffness "
                     rf"\(sub-.*, \.\.\.\), but the model's training subjects were registered "
                     rf"by T1w_brain \({n_train}\)\..* Add their T1w scans", caplog.text), \
        caplog.text
    assert "needs anat/sub-<label>_T1w.nii.gz too" in (bundle / "README.md").read_text()


def test_a_cohort_skull_stripped_by_another_tool_than_training_is_warned_about(
        world, new_cohort, tmp_path, caplog):
    """preprocess.skullstrip auto runs FreeSurfer where it is installed and deepbet
    elsewhere: a bundle trained where FreeSurfer ran and applied where it does not (predict
    run on a lab's workstation) masked and registered its cohort with another tool than
    training, without a word. The bundle records the training subjects' tools; subjects
    without a T1w (route none) are not named, they are the reference warning's."""
    qc = {}
    for number, (label, path) in enumerate(new_cohort.files["qc"].items()):
        qc[label] = tmp_path / f"sub-{label}_qc.json"
        route = "none" if number == 0 else "deepbet"
        qc[label].write_text(json.dumps(dict(json.loads(Path(path).read_text()),
                                             skullstrip_route=route)))
    bundle, manifest = _export_with_training_qc(world, tmp_path,
                                                skullstrip_route="mri_synthstrip")
    n_train = manifest["training"]["skullstrip_routes"]["mri_synthstrip"]
    assert manifest["training"]["skullstrip_routes"] == {"mri_synthstrip": n_train}
    assert (f"T1w skull-stripped by: mri_synthstrip {n_train}"
            in (bundle / "README.md").read_text())
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predict_cohort(bundle, new_cohort.root, stiffness_maps(new_cohort.files["maps"]), qc,
                       predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                       cohort="new", device="cpu")
    first = f"sub-{next(iter(qc))}"
    match = re.search(rf"cohort new: {len(qc) - 1} subject\(s\) had their T1w skull-stripped "
                      rf"by deepbet \((sub-[^)]*)\), but the model's training subjects by "
                      rf"mri_synthstrip \({n_train}\)\.", caplog.text)
    assert match and first not in match.group(1), caplog.text
    for path in qc.values():  # the tool training used: nothing to say
        path.write_text(json.dumps(dict(json.loads(path.read_text()),
                                        skullstrip_route="mri_synthstrip")))
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predict_cohort(bundle, new_cohort.root, stiffness_maps(new_cohort.files["maps"]), qc,
                       predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                       cohort="new", device="cpu")
    assert "skull-stripped by" not in caplog.text


def _with_median_stiffness(qc_files: dict, ages: dict, folder: Path, *, factor: float,
                           seed: int, only: str = "") -> dict:
    """Copies of ``qc_files`` whose registered stiffness map has the median of a subject of
    its age (2.95 - 0.01 x age kPa, sd 0.145, the demo's line) times ``factor`` (for the
    labels starting with ``only``)."""
    rng = np.random.default_rng(seed)
    copies = {}
    for label, path in qc_files.items():
        median = (2.95 - 0.01 * ages[f"sub-{label}"] + rng.normal(0, 0.145)) * (
            factor if label.startswith(only) else 1.0)
        copies[label] = folder / f"sub-{label}_qc.json"
        copies[label].write_text(json.dumps(dict(
            json.loads(Path(path).read_text()),
            maps={"stiffness": {"median": median, "p01": 1.0, "p99": 4.0, "voxels": 100}})))
    return copies


def test_a_cohort_of_maps_stiffer_than_the_training_maps_at_their_ages_is_warned_about(
        world, new_cohort, tmp_path, caplog):
    """Maps of another MRE drive frequency or inversion (30 % stiffer: 30 against 50 Hz)
    pass every check and QC, none of which depends on the scale, and a review's cohort of
    them was predicted 26-32 years old at ages 21-76 without a word. The bundle records
    the training subjects' median stiffness against age (from the QC table), and a cohort
    far from that line is warned of; one of the training's level is not."""
    training_ages = pd.read_csv(world.root / "training" / "participants.tsv", sep="\t")
    rng = np.random.default_rng(5)
    bundle, manifest = _export_with_training_qc(
        world, tmp_path, median_stiffness=2.95 - 0.01 * training_ages["age"].to_numpy()
        + rng.normal(0, 0.145, len(training_ages)))
    line = manifest["training"]["stiffness_by_age"]
    assert line["intercept_kpa"] == pytest.approx(2.95, abs=0.15)
    assert line["slope_kpa_per_year"] == pytest.approx(-0.01, abs=0.003)
    assert line["residual_sd_kpa"] == pytest.approx(0.145, abs=0.05)
    assert 0 < line["n_subjects"] < len(training_ages)  # the training subjects only
    assert manifest["training"]["coverage"] == {"min": 0.97, "median": 0.97}
    readme = (bundle / "README.md").read_text()
    assert "training subjects' median stiffness: 2." in readme
    assert "predict maps of the training's MRE drive frequency and inversion" in readme
    ages = dict(zip(*pd.read_csv(new_cohort.root / "participants.tsv", sep="\t")[
        ["participant_id", "age"]].to_numpy().T))
    for factor, warned in ((1.0, False), (1.3, True), (0.7, True)):
        folder = tmp_path / f"qc{factor}"
        folder.mkdir()
        qc = _with_median_stiffness(new_cohort.files["qc"], ages, folder, factor=factor,
                                    seed=6)
        caplog.clear()
        with caplog.at_level("WARNING", logger="brainage.apply"):
            predict_cohort(bundle, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                           qc, predictions_path=tmp_path / "p.tsv",
                           summary_path=tmp_path / "s.tsv", cohort="new", device="cpu")
        found = re.search(r"cohort new: its subjects' maps are on average (\d+) % (stiffer|"
                          r"softer) than the model's training subjects' at the same ages "
                          r"\(([-+][\d.]+) residual standard deviations of their line of "
                          r"median stiffness against age; (\d+) subjects\): maps of another "
                          r"MRE drive frequency or inversion", caplog.text)
        assert bool(found) == warned, (factor, caplog.text)
        if warned:  # the subjects that passed QC (one of the cohort fails it)
            assert found.group(2) == ("stiffer" if factor > 1 else "softer")
            assert abs(int(found.group(1)) - 30) <= 5
            assert int(found.group(4)) == len(qc) - 1
    # one study of a pooled cohort at another frequency: the cohort's mean is half its
    # offset (below the tolerance), the study's is named
    folder = tmp_path / "qc_patients"
    folder.mkdir()
    qc_patients = _with_median_stiffness(new_cohort.files["qc"], ages, folder, factor=1.3,
                                         seed=6, only="newa")
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predict_cohort(bundle, new_cohort.root, stiffness_maps(new_cohort.files["maps"]),
                       qc_patients, predictions_path=tmp_path / "p.tsv",
                       summary_path=tmp_path / "s.tsv", cohort="new", device="cpu")
    assert "cohort new: its subjects' maps" not in caplog.text, caplog.text
    assert re.search(r"cohort new: the maps of its study patients are on average "
                     r"\d+ % stiffer", caplog.text), caplog.text
    assert "its study study1" not in caplog.text
    # a bundle exported before the line was recorded says nothing
    # the world's own bundle has no line: its QC files hold no median
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predict_cohort(world.bundle_dir, new_cohort.root,
                       stiffness_maps(new_cohort.files["maps"]), qc,
                       predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                       cohort="new", device="cpu")
    assert "stiffness_by_age" not in world.manifest["training"]
    assert "maps are on average" not in caplog.text


def test_one_patient_or_a_study_without_a_name_of_stiffer_maps_is_warned_about(caplog):
    """`predict run` of one patient 30 % stiffer was warned of until the comparison needed 3
    subjects (a study's minimum); and the per-study check passed over the subjects without
    a study (empty cells), the n/a group of summary.tsv."""
    from brainage.apply import _warn_about_stiffness_unlike_training

    line = {"intercept_kpa": 2.95, "slope_kpa_per_year": -0.01, "residual_sd_kpa": 0.145,
            "n_subjects": 40, "age_min": 20.0, "age_max": 80.0}
    with caplog.at_level("WARNING", logger="brainage.apply"):
        _warn_about_stiffness_unlike_training("one", np.array([60.0]),
                                              np.array([(2.95 - 0.6) * 1.3]), line)
    assert re.search(r"cohort one: its subjects' maps are on average 30 % stiffer .*; 1 "
                     r"subjects\)", caplog.text), caplog.text
    ages = np.linspace(30, 70, 12)
    medians = 2.95 - 0.01 * ages
    medians[6:] *= 1.3  # the half without a study
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.apply"):
        _warn_about_stiffness_unlike_training(
            "pooled", ages, medians, line,
            studies=np.array(["A"] * 6 + [np.nan] * 6, dtype=object))
    assert "cohort pooled: its subjects' maps" not in caplog.text
    assert "cohort pooled: the maps of its study n/a are on average 30 % stiffer" in \
        caplog.text, caplog.text
    assert "its study A " not in caplog.text


def test_an_age_bias_refit_on_predictions_that_do_not_follow_age_is_warned_about(
        world, new_cohort, tmp_path, caplog):
    """A refit on the cohort's own controls turns predictions that carry no age (a cohort of
    another drive frequency: every subject predicted 26-32 years old) into corrected ages
    that look right (a review: 21.2, 65.1, 65.7 for ages 21.0, 66.0, 67.5), without a word.
    Here every subject's map is one map: one prediction for all, a gap slope of -1."""
    one_map = next(iter(new_cohort.files["maps"].values()))
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predict_cohort(world.bundle_dir, new_cohort.root,
                       stiffness_maps({label: one_map for label in new_cohort.files["maps"]}),
                       new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
                       summary_path=tmp_path / "s.tsv", cohort="new",
                       bias_reference_group="healthy", device="cpu")
    assert re.search(r"cohort new: the predicted ages of group 'healthy' hardly rise with "
                     r"their ages \(the refitted gap falls 1\.00 years per year of age",
                     caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.apply"):  # the cohort's own maps
        predict_cohort(world.bundle_dir, new_cohort.root,
                       stiffness_maps(new_cohort.files["maps"]), new_cohort.files["qc"],
                       predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                       cohort="new", bias_reference_group="healthy", device="cpu")
    assert "hardly rise" not in caplog.text


def test_subjects_without_an_age_get_a_predicted_age_and_no_gap(world, new_cohort, tmp_path,
                                                              caplog):
    """A lab may not know every age. Predicted age needs none, the gap does: such subjects
    (n/a in participants.tsv) are predicted as before, their gaps are empty, the summary's
    gap statistics leave them out, and a bias reference group counts only members with an
    age. A training cohort still needs every age (test_inputs)."""
    from brainage.inputs import check_bias_reference_group

    cohort = tmp_path / "cohort"
    shutil.copytree(new_cohort.root, cohort, ignore=shutil.ignore_patterns("preproc"))
    table = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype=str)
    unknown = table["participant_id"][:2].tolist()
    table.loc[:1, "age"] = "n/a"
    table.to_csv(cohort / "participants.tsv", sep="\t", index=False)
    with caplog.at_level("WARNING", logger="brainage.apply"):
        predicted = predict_cohort(
            world.bundle_dir, cohort, stiffness_maps(new_cohort.files["maps"]),
            new_cohort.files["qc"], predictions_path=tmp_path / "p.tsv",
            summary_path=tmp_path / "s.tsv", figure_path=tmp_path / "f.png", cohort="new",
            device="cpu")
    before = new_cohort.predictions.set_index("participant_id")
    after = predicted.set_index("participant_id")
    np.testing.assert_allclose(after["predicted_age"], before["predicted_age"], rtol=0,
                               atol=1e-9)
    assert after.loc[unknown, ["gap", "corrected_gap", "corrected_predicted_age"]].isna().all(
        axis=None)
    assert after.loc[unknown, "within_training_ages"].isna().all()
    known = after.drop(index=unknown)
    pd.testing.assert_series_equal(known["gap"], before.drop(index=unknown)["gap"])
    assert re.search(rf"2 subject\(s\) without an age \({unknown[0]}, {unknown[1]}\): a "
                     rf"predicted age each, no brain-age gap", caplog.text)
    written = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    assert written.set_index("participant_id").loc[unknown, "gap"].isna().all()
    summary = pd.read_csv(tmp_path / "s.tsv", sep="\t").set_index("group")
    healthy = known[(known["group"] == "healthy") & (known["status"] == "predicted")]
    assert summary.loc["healthy", "mean_corrected_gap"] == pytest.approx(
        healthy["corrected_gap"].mean(), abs=1e-9)
    assert summary.loc["healthy", "n_predicted"] == (
        (after["group"] == "healthy") & (after["status"] == "predicted")).sum()
    refitted = predict_cohort(
        world.bundle_dir, cohort, stiffness_maps(new_cohort.files["maps"]),
        new_cohort.files["qc"], predictions_path=tmp_path / "r.tsv",
        summary_path=tmp_path / "rs.tsv", cohort="new", bias_reference_group="healthy",
        device="cpu")
    fitted_on = refitted[(refitted["group"] == "healthy") & (refitted["status"] == "predicted")
                         & refitted["age"].notna()]
    recorded = json.loads((tmp_path / "provenance.json").read_text())["bias_correction"]
    # the count is of the members the line was fitted on: those without an age are not
    assert recorded["source"] == f"cohort new group 'healthy' ({len(fitted_on)} subjects)"
    assert after.loc[unknown, "group"].eq("healthy").all() and len(fitted_on) == 21
    ages = pd.read_csv(cohort / "participants.tsv", sep="\t")
    ages["age"] = ages["age"].astype(float)
    small = ages.iloc[:4].assign(group="ctl")
    with pytest.raises(InputError, match=r"it has only 2 subjects with an age \("
                                         rf"{unknown[0]}, {unknown[1]} have none\)"):
        check_bias_reference_group(small, "group", "ctl", cohort="new")


def test_a_cohort_with_only_ids_is_predicted_as_one_group(world, new_cohort, tmp_path, caplog):
    """A lab applying a model to its scans may have no ages, sexes or studies to give: the
    model reads none of them. A participants.tsv of ids alone predicts the same ages, with
    empty gaps, summarised as one group; a blank study is the group n/a; an age-bias
    reference group then has no column to come from, and is refused before any work."""
    cohort = tmp_path / "cohort"
    shutil.copytree(new_cohort.root, cohort, ignore=shutil.ignore_patterns("preproc"))
    table = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype=str)
    table[["participant_id"]].to_csv(cohort / "participants.tsv", sep="\t", index=False)
    arguments = dict(predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv",
                     figure_path=tmp_path / "f.png", cohort="new", device="cpu")
    with caplog.at_level("INFO", logger="brainage.apply"):
        predicted = predict_cohort(world.bundle_dir, cohort,
                                   stiffness_maps(new_cohort.files["maps"]),
                                   new_cohort.files["qc"], **arguments)
    assert re.search(r"predicted \d+ of \d+ subjects \(1 failed QC\); no gaps \(no predicted "
                     r"subject has an age\)", caplog.text), caplog.text  # was "all +nan y"
    before = new_cohort.predictions.set_index("participant_id")
    after = predicted.set_index("participant_id")
    np.testing.assert_allclose(after["predicted_age"], before["predicted_age"], rtol=0,
                               atol=1e-9)
    assert after["gap"].isna().all() and after["age"].isna().all()
    assert "sex" not in after.columns and "study" not in after.columns
    summary = pd.read_csv(tmp_path / "s.tsv", sep="\t")
    assert summary[["grouped_by", "group", "n"]].values.tolist() == [["none", "all", len(table)]]
    assert (tmp_path / "f.png").stat().st_size > 0

    table.loc[0, "study"] = ""  # a blank study: its own group, not "nan"
    table[["participant_id", "study"]].to_csv(cohort / "participants.tsv", sep="\t",
                                              index=False)
    predict_cohort(world.bundle_dir, cohort, stiffness_maps(new_cohort.files["maps"]),
                   new_cohort.files["qc"], **arguments)
    groups = pd.read_csv(tmp_path / "s.tsv", sep="\t", keep_default_na=False)
    assert groups.set_index("group").loc["n/a", "n"] == 1
    assert set(groups["grouped_by"]) == {"study"}

    table[["participant_id"]].to_csv(cohort / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"reference group 'healthy' .* needs a column 'group' "
                                         r"\(or 'study'\)"):
        predict_cohort(world.bundle_dir, cohort, stiffness_maps(new_cohort.files["maps"]),
                       new_cohort.files["qc"], bias_reference_group="healthy", **arguments)


def test_ctrl_c_ends_run_with_a_line_not_a_traceback(monkeypatch, capsys):
    from brainage import predict as predict_module

    def interrupted(*arguments, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_module, "run_cohort", interrupted)
    assert predict_module.main(["run", "--bundle", "b", "--dataset", "d", "--output", "o"]) == 130
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert "interrupted. Run the same command again to continue" in error


def test_a_rerun_that_stops_leaves_no_reports_of_the_run_before(world, new_cohort, tmp_path,
                                                                monkeypatch):
    """Reports describe one run: a rerun into the same --output whose chain fails for a
    subject removes the earlier run's predictions (which would read as its own) and keeps
    the preprocessed subjects."""
    from brainage import predict as predict_module
    from brainage.preprocess import chain

    preprocessed = _ready_made_chain(new_cohort)

    def failing(inputs, layout, label, **settings):
        raise RuntimeError(f"sub-{label}: registration failed")

    template = {"template_t1": str(world.root / "template_t1.nii.gz"),
                "template_mask": str(world.root / "template_mask.nii.gz")}
    output = tmp_path / "out"
    monkeypatch.setattr(chain, "run_subject", preprocessed)
    predict_module.run_cohort(world.bundle_dir, new_cohort.root, output, device="cpu",
                              **template)
    reports = [output / name for name in predict_module.REPORT_FILES.values()]
    assert all(path.is_file() for path in reports)
    preprocessed_files = sorted((output / "preproc").rglob("*_qc.json"))
    assert preprocessed_files

    monkeypatch.setattr(chain, "run_subject", failing)
    with pytest.raises(RuntimeError, match="registration failed"):
        predict_module.run_cohort(world.bundle_dir, new_cohort.root, output, device="cpu",
                                  **template)
    assert [path.name for path in reports if path.exists()] == []
    assert sorted((output / "preproc").rglob("*_qc.json")) == preprocessed_files
    # each run's log is kept with its outputs, below the one before, with why it stopped
    run_log = (output / "logs" / predict_module.RUN_LOG).read_text()
    assert run_log.count("===== brainage.predict run --bundle ") == 2, run_log
    first, second = run_log.split("===== brainage.predict run --bundle ")[1:]
    assert re.search(r"WARNING brainage\.apply: cohort out: sub-\S+ fails preprocessing QC",
                     first) and "stopped" not in first, first
    assert re.search(r"ERROR brainage: stopped: sub-\S+: registration failed\n$", second), \
        second


def test_run_cohort_refuses_a_template_on_another_grid_before_preprocessing(
        world, new_cohort, tmp_path, monkeypatch):
    """Template files with the bundle's mask voxels but another voxel grid (here moved by
    10 mm; a resaved header does it too) are not the template the bundle was trained
    with: registered to them, every map would be off the bundle's grid. The mask checksum
    covers the voxels only, so the grid recorded with it is compared as well, before any
    subject's preprocessing starts."""
    from brainage.preprocess import chain

    moved = TEMPLATE_AFFINE.copy()
    moved[:3, 3] += 10.0
    template = write_template(tmp_path, shape=TEMPLATE_SHAPE, affine=moved,
                              brain=_template_brain())
    started = []
    monkeypatch.setattr(chain, "run_subject",
                        lambda *a, **k: started.append(a) or pytest.fail("preprocessed"))
    with pytest.raises(InputError, match=r"differs from the one model bundle .* grid"):
        run_cohort(world.bundle_dir, new_cohort.root, tmp_path / "out",
                   template_t1=str(template["template_t1"]),
                   template_mask=str(template["template_mask"]))
    assert started == []


def test_run_takes_the_number_of_subjects_at_a_time(capsys):
    from brainage.predict import _parse_arguments

    common = ["run", "--bundle", "b", "--dataset", "d", "--output", "o"]
    assert _parse_arguments(common).jobs == 1
    assert _parse_arguments([*common, "--jobs", "8"]).jobs == 8
    for wrong in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            _parse_arguments([*common, "--jobs", wrong])
        assert "--jobs" in capsys.readouterr().err


def test_simulated_new_cohort_never_overwrites_a_real_dataset(tmp_path, monkeypatch):
    from brainage.simulate import cohort

    calls = []
    monkeypatch.setattr(cohort, "simulate_cohort",
                        lambda root, **options: calls.append((root, options)) or pd.DataFrame())
    real = tmp_path / "real"
    (real / "sub-01").mkdir(parents=True)
    (real / "sub-01" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by the simulator"):
        cohort.replace_simulation(real, n_subjects=10, seed=1)
    assert not calls
    empty = tmp_path / "empty"
    (empty / "sub-new01" / "mre").mkdir(parents=True)  # what Snakemake creates for outputs
    cohort.replace_simulation(empty, n_subjects=10, seed=1, id_prefix="new")
    assert calls == [(empty, {"n_subjects": 10, "seed": 1, "id_prefix": "new",
                              "overwrite": True})]


def test_simulating_again_never_deletes_what_was_put_in_the_simulated_folder(tmp_path,
                                                                             monkeypatch):
    """A new simulation replaces the folder as a whole: predict run's suggested
    ``<dataset>/derivatives/brainage`` (or any file put beside the simulator's own) was
    deleted without a word when a simulation option changed."""
    from brainage.simulate import cohort

    calls = []
    monkeypatch.setattr(cohort, "simulate_cohort",
                        lambda root, **options: calls.append(root) or pd.DataFrame())
    root = tmp_path / "demo"
    for folder in ("sub-new01/mre", "derivatives/simulation"):
        (root / folder).mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"GeneratedBy": [{"Name": "brainage.simulate"}]}')
    (root / "participants.tsv").write_text("participant_id\n")
    mine = root / "derivatives" / "brainage" / "predictions.tsv"
    mine.parent.mkdir()
    mine.write_text("my predictions\n")
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(root))} is a brainage simulation, "
                                              rf"but .*derivatives/brainage/predictions\.tsv, "
                                              rf".*notes\.txt was put there since; .* would "
                                              rf"delete it"):
        cohort.replace_simulation(root, n_subjects=10, seed=1)
    assert not calls and mine.read_text() == "my predictions\n"
    (root / "notes.txt").unlink()
    shutil.rmtree(mine.parent)
    cohort.replace_simulation(root, n_subjects=10, seed=1)  # the simulator's own files only
    assert calls == [root]


@pytest.mark.slow  # five simulations of the demo cohort: 2.5-5 s each on 2 cores
@pytest.mark.parametrize("added", ["sub-st1s001/anat/sub-st1s001_desc-manualqc_notes.txt",
                                   "derivatives/simulation/myedits/edit.txt",
                                   "sub-mine01/mre/sub-mine01_stiffness.nii.gz",
                                   "derivatives/simulation/sub-mine01/sub-mine01_desc-truth_mask.nii.gz",
                                   "sub-st1s001/mre/sub-st1s001_stiffness.json"])
def test_simulating_again_never_deletes_files_put_inside_the_simulated_folders(tmp_path, added):
    """Files put inside a subject's folder or the simulation's derivatives, and a real
    subject beside the simulated ones, were deleted by a new simulation: the check looked
    at the top level only."""
    from brainage.simulate import cohort

    root = tmp_path / "demo"
    cohort.simulate_cohort(root, n_subjects=10, seed=3)
    assert cohort._not_simulated(root) == []  # everything the simulator writes is its own
    path = root / added
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("mine")
    with pytest.raises(FileExistsError, match=rf"but {re.escape(str(path))} was put there"):
        cohort.replace_simulation(root, n_subjects=10, seed=4)
    assert path.read_text() == "mine"


def test_exported_cell_must_be_trained_by_the_grid():
    from brainage.config import ConfigError, exported_cell, load_config

    config = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    experiment, variant, seed = exported_cell(config)
    assert (experiment, variant, seed) == (config["predict"]["model"]["experiment"],
                                           config["predict"]["model"]["variant"],
                                           config["predict"]["model"]["seed"])
    config["predict"]["model"]["seed"] = 99
    with pytest.raises(ConfigError, match=r"predict\.model .*seed 99, which no enabled"):
        exported_cell(config)
    # a baseline without an encoder is a grid cell, but there is no model to export (it
    # was a KeyError at export); the untrained encoder is a model and stays exportable
    config["predict"]["model"].update(variant="pca_ridge", seed=0)
    with pytest.raises(ConfigError, match=r"table3/pca_ridge/seed 0, a baseline without an "
                                          r"encoder .*Choose one of: .*table3/untrained/seed 0"):
        exported_cell(config)
    config["predict"]["model"]["variant"] = "untrained"
    assert exported_cell(config) == ("table3", "untrained", 0)
    # every experiment disabled: it said "Choose one of: none."
    disabled = {**config, "experiments": {name: {**section, "enabled": False} for name, section
                                          in config["experiments"].items()}}
    with pytest.raises(ConfigError, match=r"which no enabled experiment trains\. No enabled "
                                          r"experiment trains an encoder: enable one"):
        exported_cell(disabled)
    # an encoder whose read-out ignores its features predicts no subject's brain age
    config["experiments"]["table3"]["variants"]["by_study"] = {
        "loss": {"name": "adaptive"}, "readout": {"method": "study_mean"}}
    config["predict"]["model"]["variant"] = "by_study"
    with pytest.raises(ConfigError, match=r"table3/by_study/seed 0, whose read-out "
                                          r"\(readout\.method study_mean\) ignores"):
        exported_cell(config)


def test_cohort_table_problems_are_reported_before_any_work(world, new_cohort, tmp_path):
    arguments = dict(maps=stiffness_maps(new_cohort.files["maps"]), qc=new_cohort.files["qc"],
                     predictions_path=tmp_path / "p.tsv", summary_path=tmp_path / "s.tsv")
    with pytest.raises(InputError, match=r"no column 'site' to summarise by"):
        predict_cohort(world.bundle_dir, new_cohort.root, group_column="site", **arguments)
    table = pd.read_csv(new_cohort.root / "participants.tsv", sep="\t")
    clashing = tmp_path / "clashing"
    shutil.copytree(new_cohort.root, clashing, ignore=shutil.ignore_patterns("preproc"))
    table.assign(gap=1.0).to_csv(clashing / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"column\(s\) gap, which the pipeline writes"):
        predict_cohort(world.bundle_dir, clashing, **arguments)
    assert not (tmp_path / "p.tsv").exists()


@pytest.mark.parametrize("record", [
    {"dice": 0.9, "correlation": 0.5},                        # a metric missing
    {"dice": None, "correlation": 0.5, "coverage": 0.9},      # null (an edited file)
    {"dice": "0.9", "correlation": 0.5, "coverage": 0.9},     # a string
    {"dice": 0.9, "correlation": 0.5, "coverage": 0.9},       # no participant_id
    {"participant_id": "sub-02", "dice": 0.9, "correlation": 0.5, "coverage": 0.9},
])
def test_a_qc_file_without_three_numbers_or_of_another_subject_names_the_file(tmp_path, record):
    """A null metric raised a bare TypeError from float(None), naming no file; another
    subject's record (a copied file) passed its verdict on to this one."""
    from brainage.apply import read_qc

    minimums = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}
    path = tmp_path / "sub-01_qc.json"
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match=rf"QC file {re.escape(str(path))}"):
        read_qc(path, minimums, subject="01")
    path.write_text(json.dumps({"participant_id": "sub-01", "dice": 0.9, "correlation": 0.5,
                                "coverage": 1}))
    assert read_qc(path, minimums, subject="01")[0]


def test_a_qc_file_of_another_subject_given_for_a_subject_is_refused(tmp_path):
    """sub-02's own, consistent QC file handed in for sub-01 (a wrong mapping or a link)
    would pass sub-02's verdict on to sub-01."""
    from brainage.apply import read_qc

    minimums = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}
    for name in ("sub-02_qc.json", "qc.json"):
        path = tmp_path / name
        path.write_text(json.dumps({"participant_id": "sub-02", "dice": 0.9,
                                    "correlation": 0.5, "coverage": 0.9}))
        with pytest.raises(InputError, match=r"is the record of sub-02, not of sub-01"):
            read_qc(path, minimums, subject="01")
    passed, reason, metrics, reference, route, median = read_qc(path, minimums, subject="02")
    assert (passed, reason, reference, route) == (True, "", "unknown", "unknown")  # no kind
    assert median is None  # a record without the maps' summary
    assert metrics == {"qc_dice": 0.9, "qc_correlation": 0.5, "qc_coverage": 0.9}


def test_run_reports_a_users_mistake_in_one_line_without_a_traceback(exported, tmp_path,
                                                                     capsys):
    """A missing bundle, a missing template flag or a missing config file is the user's
    to fix: `brainage.predict` prints the message that names the file and the remedy,
    exit status 1, no traceback."""
    from brainage.predict import main

    common = ["--dataset", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main(["run", "--bundle", str(tmp_path / "no_bundle"), *common]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert re.search(r"brainage.predict run: error: model bundle .*no_bundle does not "
                     r"exist\. Export one", error)
    assert main(["run", "--bundle", str(exported.bundle_dir), *common]) == 1
    assert "pass the same files with --template-t1" in capsys.readouterr().err
    assert main(["export", "--configfile", str(tmp_path / "missing.yaml")]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert re.search(r"--configfile .*missing.yaml does not exist", error)


@pytest.mark.parametrize("argv0, program", [
    ("/lab/venv/bin/brainage-predict", "brainage-predict"),  # the installed script
    ("/lab/brainage/workflow/brainage/predict.py", "python -m brainage.predict"),  # -m
])
def test_usage_and_errors_name_the_command_the_user_typed(tmp_path, capsys, monkeypatch,
                                                          argv0, program):
    """The installed `brainage-predict` printed "usage: python -m brainage.predict" and its
    errors "brainage.predict run: error", a command its user never typed."""
    import sys

    from brainage.predict import main

    monkeypatch.setattr(sys, "argv", [argv0])
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert capsys.readouterr().out.startswith(f"usage: {program} run ")
    assert main(["run", "--bundle", str(tmp_path / "none"), "--dataset", str(tmp_path),
                 "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"{program} run: error: model bundle ")


def test_a_second_run_into_the_same_output_is_refused_while_the_first_works(
        exported, tmp_path, monkeypatch):
    """Two `predict run` into one --output did all the work twice, interleaved their logs,
    and one could delete the other's reports. The second is refused while the first holds
    the folder's lock; a colleague's marker is not rewritten in place (it needed write
    permission on the file itself), and a --output link into a purged scratch area is
    named as such, not as "File exists"."""
    import brainage.predict as predict_module
    from brainage.predict import RUN_LOCK
    from conftest import default_rows, write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "dataset", default_rows(), with_anat=True)
    output = tmp_path / "out"
    output.mkdir()
    (output / OUTPUT_MARKER).write_text("a colleague's marker\n")
    template = {"template_t1": "t1.nii.gz", "template_mask": "mask.nii.gz"}
    calls = []

    class FirstRunStopsHere(Exception):
        pass

    def the_first_run_is_working(*args, **kwargs):
        calls.append(args)
        assert len(calls) == 1, "the second run was not refused"
        assert (output / RUN_LOCK).is_file()
        with pytest.raises(InputError, match=rf"another process is writing --output {output} "
                                             rf".*wait for it to finish\. Or pass another"):
            run_cohort(exported.bundle_dir, dataset, output, **template)
        raise FirstRunStopsHere

    monkeypatch.setattr(predict_module, "also_logging_to", the_first_run_is_working)
    with pytest.raises(FirstRunStopsHere):
        run_cohort(exported.bundle_dir, dataset, output, **template)
    assert not (output / RUN_LOCK).exists()  # released, and removed
    assert (output / OUTPUT_MARKER).read_text() == "a colleague's marker\n"
    link = tmp_path / "scratch_link"
    link.symlink_to(tmp_path / "purged")
    with pytest.raises(InputError, match=r"scratch_link is a link to .*purged, which does "
                                         r"not exist"):
        run_cohort(exported.bundle_dir, dataset, link, **template)


def test_a_dataset_mistake_is_reported_before_anything_is_written(world, new_cohort,
                                                                  tmp_path):
    """A missing dataset or a participants.tsv with a bad row stops `run` before the
    template and the derivative description are written: no half-made output folder."""
    template = {"template_t1": str(world.root / "template_t1.nii.gz"),
                "template_mask": str(world.root / "template_mask.nii.gz")}
    with pytest.raises(InputError, match=r"dataset root .*nope does not exist"):
        run_cohort(world.bundle_dir, tmp_path / "nope", tmp_path / "a", **template)
    bad_age = tmp_path / "bad_age"
    shutil.copytree(new_cohort.root, bad_age, ignore=shutil.ignore_patterns("preproc"))
    table = pd.read_csv(bad_age / "participants.tsv", sep="\t", dtype=str)
    table.loc[0, "age"] = "abc"
    table.to_csv(bad_age / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"has age 'abc'"):
        run_cohort(world.bundle_dir, bad_age, tmp_path / "b", **template)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_file_given_for_a_folder_is_named_as_such(world, new_cohort, tmp_path):
    """A file passed as --bundle, --dataset or --output (often a file inside the folder
    meant) is called a file, not a path that "does not exist"."""
    template = {"template_t1": str(world.root / "template_t1.nii.gz"),
                "template_mask": str(world.root / "template_mask.nii.gz")}
    manifest = Path(world.bundle_dir) / "manifest.json"
    with pytest.raises(BundleError, match=r"manifest.json is a file, not a folder\. Pass "
                                          r"the bundle folder"):
        run_cohort(manifest, new_cohort.root, tmp_path / "a", **template)
    table = new_cohort.root / "participants.tsv"
    with pytest.raises(InputError, match=r"participants.tsv is a file, not a folder\. Set "
                                         r"--dataset"):
        run_cohort(world.bundle_dir, table, tmp_path / "b", **template)
    output = tmp_path / "c.tsv"
    output.write_text("mine")
    with pytest.raises(InputError, match=r"--output .*c.tsv is a file, not a folder"):
        run_cohort(world.bundle_dir, new_cohort.root, output, **template)
    assert output.read_text() == "mine"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_tilde_in_a_path_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """`--output=~/preds` (no shell expands that ~) made a folder named '~' here, then
    failed writing where nibabel expanded it, with "No such file or directory" (found by a
    review): a '~' is refused with the full path to give, as --dataset's is."""
    from brainage.predict import run_cohort

    monkeypatch.chdir(tmp_path)
    home = Path("~").expanduser()
    for flag, arguments in (("--output", ("bundle", "data", "~/preds")),
                            ("--bundle", ("~/bundle", "data", "preds"))):
        with pytest.raises(InputError, match=rf"{flag} ~/\w+: '~' is not expanded in paths "
                                             rf".*Set {flag} to the full path \({home}/"):
            run_cohort(*arguments)
    with pytest.raises(InputError, match=r"--template-t1 ~/t1.nii.gz: '~' is not expanded"):
        run_cohort("bundle", "data", "preds", template_t1="~/t1.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_threads_must_be_a_positive_whole_number(capsys):
    from brainage.predict import _parse_arguments

    common = ["run", "--bundle", "b", "--dataset", "d", "--output", "o"]
    assert _parse_arguments([*common, "--threads", "4"]).threads == 4
    for wrong in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            _parse_arguments([*common, "--threads", wrong])
        assert "--threads" in capsys.readouterr().err


def test_template_files_for_a_nilearn_bundle_are_refused_not_ignored(tmp_path):
    """--template-t1/--template-mask with a bundle trained on nilearn's MNI152 would be
    ignored (the template is rebuilt from nilearn), even naming files that do not exist:
    the user is told to drop them, before anything is written."""
    preprocessing = {**PREPROCESSING, "template": {**PREPROCESSING["template"],
                                                   "source": "nilearn"}}
    write_stub_bundle(tmp_path / "bundle", "mni", preprocessing)
    for flags in ({"template_t1": "t1.nii.gz", "template_mask": "mask.nii.gz"},
                  {"template_mask": "mask.nii.gz"}):
        with pytest.raises(InputError, match=r"trained with nilearn's MNI152 template.* "
                                             r"Drop them"):
            run_cohort(tmp_path / "bundle", tmp_path / "dataset", tmp_path / "out", **flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_an_output_folder_that_cannot_be_created_is_named_with_the_flag(world, new_cohort,
                                                                       tmp_path, monkeypatch):
    """An --output under a file (or a read-only place) failed at the template's first
    write, naming that file and the free space but not the flag or what to do."""
    template = {"template_t1": str(world.root / "template_t1.nii.gz"),
                "template_mask": str(world.root / "template_mask.nii.gz")}
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"--output .*notes.txt/out cannot be written "
                                         r"\(Not a directory\)\. Choose a folder you can "
                                         r"write to, on a disk with room\."):
        run_cohort(world.bundle_dir, new_cohort.root, tmp_path / "notes.txt" / "out",
                   **template)
    # an earlier run's folder that cannot be written now (read-only, full): the marker's
    # write gave a traceback
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    writing = Path.write_text

    def read_only(path, *args, **kwargs):  # root writes into a folder of mode 555 anyway
        if path.parent == earlier:
            raise OSError(30, "Read-only file system")
        return writing(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(InputError, match=r"--output .*earlier cannot be written \(Read-only "
                                         r"file system\)"):
        run_cohort(world.bundle_dir, new_cohort.root, earlier, **template)


def test_a_run_log_that_cannot_be_written_is_named_not_a_traceback(tmp_path, monkeypatch):
    """On a full disk the log's heading, and its handler's last flush after the run had
    stopped with a clear error, raised OSError tracebacks that buried the error."""
    import logging

    from brainage.logs import also_logging_to

    (tmp_path / "logs").write_text("a file where the folder should be")
    with pytest.raises(WriteError, match=r"writing .*logs/predict_run\.log failed"):
        with also_logging_to(tmp_path / "logs" / "predict_run.log", "a run"):
            pass
    closing = logging.FileHandler.close

    def failing_close(handler):
        closing(handler)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(logging.FileHandler, "close", failing_close)
    with pytest.raises(InputError, match="the run's own error"):
        with also_logging_to(tmp_path / "run.log", "a run"):
            raise InputError("the run's own error")


def test_export_before_the_run_finished_or_with_broken_yaml_says_what_to_do(
        tmp_path, monkeypatch, capsys):
    """`export` before snakemake finished died with a FileNotFoundError traceback (the
    read-out of the cell missing), a config file with a YAML mistake with yaml's."""
    from brainage import predict
    from brainage.config import load_config

    def unfinished(config):
        raise FileNotFoundError("read-out file results/train/x/readout.npz does not exist; "
                                "rerun rule evaluate_encoder for this cell.")

    monkeypatch.setattr(predict, "export_from_config", unfinished)
    monkeypatch.setattr("brainage.config.load_config", lambda *paths: {})  # main imports it
    config = tmp_path / "config.yaml"
    config.write_text("train: {}\n")
    assert predict.main(["export", "--configfile", str(config)]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert re.search(r"readout.npz does not exist.*\n.*run snakemake to the end first", error)
    monkeypatch.undo()
    config.write_text("predict: [\n")
    with pytest.raises(ConfigError, match=r"(?s)config.yaml is not valid YAML: .*line 2.*Fix "
                                          r"the line it names"):
        load_config(config)


def test_a_bundles_readme_says_whether_its_encoder_was_trained():
    """predict.model may name a cell that trains no epoch (the demo's untrained encoder, a
    frozen pretrained one): its bundle's README said 'a 3D ResNet-18 encoder trained with
    the adaptive loss' (found by a user pass)."""
    from brainage.config import resolve_cell
    from brainage.export import _encoder_phrase

    def phrase(train, model=None):
        return _encoder_phrase(resolve_cell({"loss": {"name": "adaptive"}, "train": train,
                                             "model": model or {}}))

    assert phrase({"epochs": 5}) == "a 3D ResNet-18 encoder trained with the `adaptive` loss"
    assert phrase({"epochs": 0}) == ("a 3D ResNet-18 encoder that took no training step "
                                     "(train.epochs 0: its seed's random initialisation)")
    assert phrase({"epochs": 0}, {"init": "pretrained:t1w"}).endswith(
        "(train.epochs 0: the encoder of pretraining run `t1w`)")
    # and where a fine-tuned encoder started (the bundle's README said nothing of it)
    assert phrase({"epochs": 5}, {"init": "pretrained:t1w"}) == (
        "a 3D ResNet-18 encoder trained with the `adaptive` loss, fine-tuned from pretraining "
        "run `t1w`")
    assert phrase({"epochs": 5}, {"init_checkpoint": "lab_encoder.pt"}).endswith(
        ", fine-tuned from lab_encoder.pt (model.init_checkpoint)")
