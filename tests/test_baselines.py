"""The baselines of Table 3 (brainage.readout, brainage.evaluate, brainage.train): each gives
its known answer on a constructed case, and none ever sees a test subject."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from brainage.config import resolve_cell
from brainage.evaluate import evaluate_encoder
from brainage.models import build_model
from brainage.runtime import seed_everything
from brainage.train import train_encoder
from split_fixture import tiny_settings, write_split

VOXEL_BASELINES = {
    "train_mean": tiny_settings(model={"encoder": "none"}, readout={"method": "train_mean"}),
    "study_mean": tiny_settings(model={"encoder": "none"}, readout={"method": "study_mean"}),
    "pca_ridge": tiny_settings(model={"encoder": "none"}, readout={"method": "pca_ridge"}),
}


def evaluate(split_dir, settings, folder, features=None) -> tuple[dict, pd.DataFrame]:
    folder.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_encoder(split_dir, features, settings,
                               metrics_path=folder / "metrics.json",
                               predictions_path=folder / "predictions.tsv")
    return metrics, pd.read_csv(folder / "predictions.tsv", sep="\t")


def rewrite_split(split_dir, *, ages=None, images=None) -> None:
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    if ages is not None:
        table["age"] = ages
        table.to_csv(split_dir / "participants.tsv", sep="\t", index=False)
    if images is not None:
        np.save(split_dir / "images.npy", images.astype(np.float32))


def test_study_mean_is_exact_when_the_study_determines_age(tmp_path):
    split_dir = write_split(tmp_path / "dataset", n_subjects=24, n_test=6)
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    by_study = {"studyA": 25.0, "studyB": 50.0, "studyC": 75.0}
    rewrite_split(split_dir, ages=table["study"].map(by_study))
    metrics, _ = evaluate(split_dir, VOXEL_BASELINES["study_mean"], tmp_path / "study")
    assert metrics["mae"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["kind"] == "baseline" and metrics["features"] is None
    training_mean, _ = evaluate(split_dir, VOXEL_BASELINES["train_mean"], tmp_path / "mean")
    assert training_mean["mae"] > 10  # one age for everyone misses the studies' differences


def test_study_mean_predicts_each_studys_training_mean_age(tmp_path):
    # ages vary inside each study: the prediction is the mean of the study's training
    # subjects only (not a median, not the test subjects' ages)
    split_dir = write_split(tmp_path / "dataset", n_subjects=24, n_test=6)
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    ages = 20.0 + np.random.default_rng(3).exponential(15.0, len(table))
    rewrite_split(split_dir, ages=ages)
    table["age"] = ages
    training = table[table["subset"] == "train"]
    expected = table["study"].map(training.groupby("study")["age"].mean())
    _, predictions = evaluate(split_dir, VOXEL_BASELINES["study_mean"], tmp_path / "study")
    predicted = predictions.set_index("participant_id").loc[table["participant_id"],
                                                            "predicted_age"]
    np.testing.assert_allclose(predicted.to_numpy(), expected.to_numpy(), rtol=0, atol=1e-9)
    assert training.groupby("study")["age"].mean().ne(
        training.groupby("study")["age"].median()).all()  # the case tells mean from median


@pytest.mark.slow
class VoxelsNotToCopy:
    """Voxel features of a mean baseline: their shape, but no copy of them may be made
    (a float64 copy of a 2 mm split's voxels is 2 GB, made and thrown away)."""

    def __init__(self, n_rows: int, n_voxels: int) -> None:
        self.shape = (n_rows, n_voxels)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the mean read-outs copied the voxels")


@pytest.mark.parametrize("method", ["train_mean", "study_mean"])
def test_the_mean_read_outs_never_copy_the_voxels(method):
    from brainage.readout import fit_readout

    ages, studies = np.array([20.0, 30.0, 60.0, 70.0]), np.array(["a", "a", "b", "b"])
    settings = {"method": method, "alphas": [1.0], "cv_folds": 2}
    readout = fit_readout(VoxelsNotToCopy(4, 10**6), ages, settings, studies=studies)
    predicted = readout.predict(VoxelsNotToCopy(2, 10**6), studies=np.array(["a", "b"]))
    expected = [45.0, 45.0] if method == "train_mean" else [25.0, 65.0]
    assert predicted.tolist() == expected


def test_pca_ridge_recovers_images_that_are_linear_in_age(tmp_path):
    split_dir = write_split(tmp_path / "dataset", n_subjects=30, n_test=8, shape=(8, 10, 8))
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    rng = np.random.default_rng(0)
    pattern, offset = rng.normal(size=(8, 10, 8)), rng.normal(size=(8, 10, 8))
    images = offset[None] + (table["age"].to_numpy()[:, None, None, None] - 50) / 20 * pattern
    rewrite_split(split_dir, images=images[:, None])  # one channel
    metrics, predictions = evaluate(split_dir, VOXEL_BASELINES["pca_ridge"], tmp_path / "pca")
    assert metrics["mae"] < 0.2, metrics["mae"]
    assert metrics["pca_components"] >= 1 and "ridge_alpha" in metrics
    assert predictions["predicted_age"].notna().all()


def test_untrained_encoder_keeps_the_seeds_initialisation(tmp_path):
    split_dir = write_split(tmp_path / "dataset", n_subjects=12, n_test=4)
    settings = tiny_settings(train={"epochs": 0})
    stale = tmp_path / ".encoder.pt.k3j_x9ab.pt"  # a killed write's temporary
    stale.write_bytes(b"half written")
    history = train_encoder(split_dir, settings, encoder_path=tmp_path / "encoder.pt",
                            history_path=tmp_path / "history.tsv",
                            embeddings_dir=tmp_path / "embeddings",
                            checkpoint_path=tmp_path / "checkpoint.pt",
                            features_path=tmp_path / "features.npz")
    assert history == [] and not stale.exists()
    seed_everything(settings["seed"])
    initial = build_model(resolve_cell(settings)["model"]).state_dict()
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)["model"]
    assert saved.keys() == initial.keys()
    assert all(torch.equal(saved[key], initial[key]) for key in saved)
    # another seed, another initialisation: seeds that shared one would differ only in
    # batch order and augmentation, and Table 3's sd over seeds would be too small
    other = dict(settings, seed=settings["seed"] + 1)
    train_encoder(split_dir, other, encoder_path=tmp_path / "other" / "encoder.pt",
                  history_path=tmp_path / "other" / "history.tsv",
                  embeddings_dir=tmp_path / "other" / "embeddings",
                  checkpoint_path=tmp_path / "other" / "checkpoint.pt")
    seed_everything(other["seed"])
    other_initial = build_model(resolve_cell(other)["model"]).state_dict()
    other_saved = torch.load(tmp_path / "other" / "encoder.pt", weights_only=True)["model"]
    assert all(torch.equal(other_saved[key], other_initial[key]) for key in other_saved)
    assert not torch.equal(other_saved["encoder.conv1.weight"], saved["encoder.conv1.weight"])
    metrics, _ = evaluate(split_dir, settings, tmp_path / "cell", tmp_path / "features.npz")
    assert metrics["kind"] == "baseline" and np.isfinite(metrics["mae"])


@pytest.mark.slow
def test_supervised_network_learns_age(tmp_path):
    split_dir = write_split(tmp_path / "dataset", n_subjects=24, n_test=6)
    settings = tiny_settings(loss={"name": "supervised"},
                             model={"head": "regression", "projection_dim": 1},
                             train={"epochs": 4, "batch_size": 6, "views": 1, "lr": 3e-3,
                                    "embed_epochs": []})
    history = train_encoder(split_dir, settings, encoder_path=tmp_path / "encoder.pt",
                            history_path=tmp_path / "history.tsv",
                            embeddings_dir=tmp_path / "embeddings",
                            checkpoint_path=tmp_path / "checkpoint.pt",
                            features_path=tmp_path / "features.npz")
    losses = [row["loss"] for row in history]
    assert losses[-1] < losses[0]  # L1 in years falls
    metrics, _ = evaluate(split_dir, settings, tmp_path / "cell", tmp_path / "features.npz")
    assert metrics["loss"] == "supervised" and metrics["kind"] == "baseline"


#: Cells whose encoder is trained (or initialised) before the read-out: the baselines'
#: untrained and supervised networks, and a contrastive loss for comparison.
ENCODER_CELLS = {
    "untrained": tiny_settings(train={"epochs": 0}),
    "supervised": tiny_settings(loss={"name": "supervised"},
                                model={"head": "regression", "projection_dim": 1},
                                train={"epochs": 2, "batch_size": 6, "views": 1}),
    "adaptive": tiny_settings(train={"epochs": 2}),
}


@pytest.mark.parametrize("name", ["train_mean", "study_mean", "pca_ridge", *ENCODER_CELLS])
def test_baselines_never_see_the_test_subjects(tmp_path, name):
    """Poison the test rows (images and ages): the training rows' predictions stay the
    same to the last bit, so nothing a baseline fits (nor an encoder's training) depends on
    a test subject. In the fast tier (about 10 s in all): marked slow, a training loop fed
    the test rows, or a supervised loss scaled by their ages, passed every fast test (a
    review's mutants)."""
    split_dir = write_split(tmp_path / "dataset", n_subjects=24, n_test=6)
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    settings = VOXEL_BASELINES.get(name)
    features = None

    def embed_split():  # train (or initialise) the encoder on the current images, embed
        # from nothing: the poisoned run must not find the clean run's files
        for stale in (tmp_path / "encoder.pt", features):
            stale.unlink(missing_ok=True)
        train_encoder(split_dir, settings, encoder_path=tmp_path / "encoder.pt",
                      history_path=tmp_path / "history.tsv",
                      embeddings_dir=tmp_path / "embeddings",
                      checkpoint_path=tmp_path / "checkpoint.pt", features_path=features)

    if name in ENCODER_CELLS:
        settings, features = ENCODER_CELLS[name], tmp_path / "features.npz"
        embed_split()
    _, clean = evaluate(split_dir, settings, tmp_path / "clean", features)
    test = (table["subset"] == "test").to_numpy()
    images = np.load(split_dir / "images.npy")
    images[test] = np.random.default_rng(5).normal(0, 50, images[test].shape)
    rewrite_split(split_dir, ages=np.where(test, 99.0, table["age"]), images=images)
    if name in ENCODER_CELLS:
        embed_split()
    _, poisoned = evaluate(split_dir, settings, tmp_path / "poisoned", features)
    training = clean["subset"] == "train"
    np.testing.assert_array_equal(poisoned.loc[training, "predicted_age"].to_numpy(),
                                  clean.loc[training, "predicted_age"].to_numpy())
    description = json.loads((tmp_path / "poisoned" / "readout.json").read_text())
    assert description["training"]["age_max"] < 99.0  # the read-out's own record agrees


def test_evaluation_sweeps_the_temporaries_a_killed_write_left(tmp_path):
    """A kill between atomic_path's temporary file and its rename leaves
    .metrics.json.<random>.json beside the outputs; the next evaluation of the cell removes
    it (training did so for its own outputs, evaluation and untrained encoders did not)."""
    split_dir = write_split(tmp_path / "dataset", n_subjects=24, n_test=6)
    folder = tmp_path / "cell"
    folder.mkdir()
    stale = [folder / ".metrics.json.k3j_x9ab.json", folder / ".readout.npz.q1w2e3r4.npz",
             folder / ".predictions.tsv.z8y7x6w5.tsv", folder / ".readout.json.a1b2c3d4.json"]
    for path in stale:
        path.write_text("half written")
    keep = folder / ".metrics.json.notes"  # not a temporary of atomic_path
    keep.write_text("mine")
    evaluate(split_dir, VOXEL_BASELINES["train_mean"], folder)
    assert not any(path.exists() for path in stale) and keep.exists()
    assert (folder / "metrics.json").is_file() and (folder / "readout.npz").is_file()


def test_evaluation_reads_only_the_images_its_cell_reads(tmp_path, monkeypatch):
    """Every evaluate_encoder job scanned the whole images.npy for NaN (load_split), also
    where it read only features.npz or nothing at all (40 GB per job for 3,000 subjects of
    three maps at 2 mm), and the mean baselines copied every voxel they never read (out of
    memory from about 1,000 subjects at 8 GB). Now only a voxel read-out reads images,
    only its cell's channels, and checks those."""
    import brainage.split_data as split_data

    split_dir = write_split(tmp_path / "dataset", n_subjects=24, n_test=6)
    images = np.load(split_dir / "images.npy")
    images[3, 0, 0, 0, 0] = np.nan
    rewrite_split(split_dir, images=images)
    scanned = []
    check_finite = split_data.check_finite
    monkeypatch.setattr(split_data, "check_finite", lambda volumes, *args: (
        scanned.append(volumes.shape), check_finite(volumes, *args))[1])
    for name in ("train_mean", "study_mean"):
        metrics, _ = evaluate(split_dir, VOXEL_BASELINES[name], tmp_path / name)
        assert np.isfinite(metrics["mae"])
    assert scanned == []
    participant = pd.read_csv(split_dir / "participants.tsv", sep="\t")["participant_id"][3]
    with pytest.raises(split_data.DataError, match=participant):
        evaluate(split_dir, VOXEL_BASELINES["pca_ridge"], tmp_path / "pca")
    with pytest.raises(split_data.DataError, match=participant):  # training still checks
        split_data.load_split(split_dir)
