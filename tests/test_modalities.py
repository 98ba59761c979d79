"""More than stiffness: several maps per subject as input channels (dataset.modalities,
model.modalities). The preprocessing side (one transform for every map, range checks) is
in test_preprocess.py; the missing-map check in test_inputs.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainage.config import ConfigError, cell_settings, validate_config
from brainage.data import VolumeStore, load_split
from brainage.evaluate import evaluate_encoder
from brainage.models import build_model, load_encoder, load_init_checkpoint
from brainage.train import train_encoder
from split_fixture import cell_paths, tiny_settings, write_split


@pytest.fixture(scope="module")
def two_channel_split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("split"), n_subjects=16, n_test=4,
                       shape=(12, 14, 12), modalities=("stiffness", "damping_ratio"))


def test_store_reads_the_chosen_channels_in_order(two_channel_split):
    split = load_split(two_channel_split)
    assert split.modalities == ["stiffness", "damping_ratio"] and split.shape == (12, 14, 12)
    rows = np.array([3, 0])
    both = VolumeStore(split.images, "cpu").gather(rows)
    assert both.shape == (2, 2, 12, 14, 12)
    swapped = VolumeStore(split.images, "cpu",
                          channels=split.channel_indices(["damping_ratio", "stiffness"]))
    assert torch.equal(swapped.gather(rows), both.flip(1))
    assert torch.equal(VolumeStore(split.images, "cpu", channels=[1]).gather(rows), both[:, 1:])
    with pytest.raises(ConfigError, match=r"model\.modalities lists T1w, but split holdout "
                                          r"holds only stiffness, damping_ratio"):
        split.channel_indices(["T1w"])


def test_a_two_channel_cell_trains_with_two_input_channels(two_channel_split, tmp_path):
    settings = tiny_settings(model={"modalities": ["stiffness", "damping_ratio"]},
                             loss={"name": "exponential"}, train={"epochs": 1, "embed_epochs": []})
    history = train_encoder(two_channel_split, settings, **cell_paths(tmp_path / "both"))
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    weights = torch.load(tmp_path / "both" / "encoder.pt", weights_only=True)["model"]
    assert weights["encoder.conv1.weight"].shape[1] == 2
    network = load_encoder(tmp_path / "both" / "encoder.pt", _defaults() | settings["model"])
    assert network.encoder.conv1.in_channels == 2
    metrics = evaluate_encoder(two_channel_split, tmp_path / "both" / "features.npz",
                               settings, metrics_path=tmp_path / "both" / "metrics.json",
                               predictions_path=tmp_path / "both" / "predictions.tsv")
    assert np.isfinite(metrics["mae"])

    one = tiny_settings(model={"modalities": ["damping_ratio"]},
                        loss={"name": "exponential"}, train={"epochs": 1, "embed_epochs": []})
    train_encoder(two_channel_split, one, **cell_paths(tmp_path / "one"))
    weights = torch.load(tmp_path / "one" / "encoder.pt", weights_only=True)["model"]
    assert weights["encoder.conv1.weight"].shape[1] == 1


def test_voxel_baselines_read_the_cells_channels(two_channel_split, tmp_path):
    split = load_split(two_channel_split)
    from brainage.evaluate import cell_features

    settings = tiny_settings(model={"encoder": "none", "modalities": ["damping_ratio"]})
    features, encoder_sha256, trained_loss = cell_features(split, None, settings)
    rows = np.concatenate([split.train_index, split.eval_index])
    assert np.array_equal(features, np.asarray(split.images[rows, 1]).reshape(len(rows), -1))
    assert encoder_sha256 is None and trained_loss is None  # no encoder, no loss


def test_one_channel_checkpoint_initialises_a_two_channel_network(tmp_path):
    """The documented rule: the first kernel copied to every channel and divided by C, so
    C copies of one image give exactly the one-channel network's output."""
    torch.manual_seed(0)
    single = build_model(_defaults() | {"width": 8}).eval()
    torch.save({"model": single.state_dict()}, tmp_path / "t1w.pt")
    double = build_model(_defaults() | {"width": 8, "modalities": ["stiffness", "T1w"]}).eval()
    report = load_init_checkpoint(double, tmp_path / "t1w.pt")
    assert report.adapted and not report.mismatched and not report.missing
    kernel = single.state_dict()["encoder.conv1.weight"]
    assert torch.allclose(double.state_dict()["encoder.conv1.weight"],
                          torch.cat([kernel, kernel], dim=1) / 2)
    volume = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(double(volume.repeat(1, 2, 1, 1, 1)), single(volume), atol=1e-5)


def _defaults() -> dict:
    from brainage.config import resolve_cell

    return resolve_cell({})["model"]


def test_cell_modalities_default_to_the_dataset_and_must_be_among_them():
    variants = {"all": {}, "damping": {"model": {"modalities": ["damping_ratio"]}}}
    dataset = {"modalities": ["stiffness", "damping_ratio"]}
    config = validate_config({"dataset": dataset,
                              "experiments": {"one": {"variants": variants}}})
    assert cell_settings(config, "one", "all", 0)["model"]["modalities"] == [
        "stiffness", "damping_ratio"]
    assert cell_settings(config, "one", "damping", 0)["model"]["modalities"] == [
        "damping_ratio"]
    variants["t1w"] = {"model": {"modalities": ["T1w"]}}
    with pytest.raises(ConfigError, match=r"experiments\.one\.variants\.t1w\.model\.modalities"
                                          r"' lists T1w, which config key dataset\.modalities"):
        validate_config({"dataset": dataset, "experiments": {"one": {"variants": variants}}})


def test_the_registry_checks_and_scales_each_map_as_documented():
    """docs/method.md, "Modalities": a damping ratio is a ratio of moduli in [0, 1] and gets
    no N4; the T1w (scanner units) is divided by its brain median, the MRE maps (physical
    units) keep their scale; the moduli's medians are checked for a unit in kPa."""
    from brainage.modalities import MODALITIES, MODULUS_MEDIAN_KPA, modality

    damping = modality("damping_ratio")
    assert damping.valid_range == (0.0, 1.0) and not damping.n4 and damping.unit == "1"
    assert [name for name, kind in MODALITIES.items() if kind.scale_by_brain_median] == ["T1w"]
    assert not modality("T1w").is_mre and modality("T1w").folder == "anat"
    for name in ("stiffness", "storage_modulus", "loss_modulus"):
        assert modality(name).unit == "kPa" and modality(name).median_range == MODULUS_MEDIAN_KPA
    with pytest.raises(ValueError, match=r"unknown modality 'stifness'; the modalities are "
                                         r"stiffness, damping_ratio"):
        modality("stifness")


def test_the_grid_map_is_the_first_mre_map_else_the_t1w(tmp_path):
    from brainage.modalities import grid_modality, input_path, mre_maps

    assert grid_modality(["T1w", "damping_ratio", "stiffness"]) == "damping_ratio"
    assert grid_modality(["T1w"]) == "T1w"
    assert mre_maps(["T1w", "loss_modulus", "stiffness"]) == ("loss_modulus", "stiffness")
    assert input_path(tmp_path, "01", "T1w") == tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    assert input_path(tmp_path, "01", "stiffness") == (
        tmp_path / "sub-01" / "mre" / "sub-01_stiffness.nii.gz")


def test_a_cohort_to_predict_is_preprocessed_around_the_training_grid_map():
    # the model's maps, led by the map the training subjects' masks, registrations (without
    # a T1w) and QC were built around; a model cannot read maps its cohort lacked
    from brainage.modalities import modalities_to_predict

    assert modalities_to_predict(["damping_ratio"], "stiffness") == ("stiffness", "damping_ratio")
    assert modalities_to_predict(["damping_ratio", "stiffness"], "stiffness") == (
        "stiffness", "damping_ratio")
    assert modalities_to_predict(["T1w"], "stiffness") == ("stiffness", "T1w")
    assert modalities_to_predict(["stiffness"], "stiffness") == ("stiffness",)
    assert modalities_to_predict(["T1w"], "T1w") == ("T1w",)
    with pytest.raises(ValueError, match="preprocessed around T1w"):
        modalities_to_predict(["stiffness"], "T1w")


def test_a_new_map_states_its_bias_correction_and_its_contrast():
    """Modality's defaults bias-corrected a new map and judged its registration by a white
    matter brighter than grey, against docs/architecture.md §9's advice (found by a
    review): each map states both."""
    from brainage.modalities import Modality

    with pytest.raises(TypeError, match="n4.*white_matter_higher"):
        Modality("wave_speed", "mre", "m/s", "shear-wave-speed map")
    speed = Modality("wave_speed", "mre", "m/s", "shear-wave-speed map", n4=False,
                     white_matter_higher=False)
    assert not speed.n4 and not speed.white_matter_higher and speed.positive
