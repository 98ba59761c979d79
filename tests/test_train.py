"""Training of one grid cell (brainage.train, brainage.data): a real short training,
determinism, kill-and-resume, checkpoint integrity, augmentations, and the error cases."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainage import brainage_version
from brainage.config import ConfigError, resolve_cell
from brainage.data import Augmenter, DataError, VolumeStore, load_split, plan_batches
from brainage.evaluate import evaluate_encoder
from brainage.io import WriteError
from brainage.models import build_model
from brainage.train import (
    HISTORY_COLUMNS,
    CheckpointWriter,
    fingerprint,
    save_checkpoint,
    train_encoder,
)
from split_fixture import (
    cell_paths,
    encoder_weights,
    synthetic_volumes,
    tiny_settings,
    write_split,
)

REPO = Path(__file__).resolve().parents[1]


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = encoder_weights(first), encoder_weights(second)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    return write_split(tmp_path_factory.mktemp("dataset"), n_subjects=24, n_test=6)


REFERENCE = tiny_settings(train={"epochs": 3, "batch_size": 6, "embed_epochs": [1, 3, 40]})


@pytest.fixture(scope="module")
def reference_run(split_dir, tmp_path_factory):
    """One uninterrupted 3-epoch Adaptive Neighborhoods training, evaluated."""
    folder = tmp_path_factory.mktemp("reference")
    paths = cell_paths(folder)
    history = train_encoder(split_dir, REFERENCE, **paths)
    metrics = evaluate_encoder(split_dir, paths["features_path"], REFERENCE,
                               metrics_path=folder / "metrics.json",
                               predictions_path=folder / "predictions.tsv")
    return folder, history, metrics


def test_short_training_beats_the_mean_age(split_dir, reference_run):
    folder, _, metrics = reference_run
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t")
    train, test = table[table.subset == "train"], table[table.subset == "test"]
    baseline = np.mean(np.abs(test.age - train.age.mean()))
    assert metrics["mae"] < 0.6 * baseline, (metrics["mae"], baseline)
    assert metrics["n_train"] == 18 and metrics["n_test"] == 6
    assert metrics["ridge_alpha"] in (0.01, 0.1, 1.0, 10.0, 100.0)


@pytest.mark.parametrize(("model", "kind", "width"), [
    ({"projection_head": False}, "encoder", 64),
    ({"head": "regression", "projection_dim": 1}, "regression", 1)])
def test_embeddings_name_what_the_network_gives_without_a_projection_head(
        split_dir, tmp_path, model, kind, width):
    """Fig. 5's title names the kind an embeddings file records; every file recorded
    "projection" (the default of model.features, a read-out key the training does not get),
    also for a network without a projection head, whose project() is the encoder output."""
    loss = {"name": "supervised"} if kind == "regression" else {}
    settings = tiny_settings(model={"width": 8, **model}, loss=loss,
                             train={"epochs": 2, "batch_size": 6, "embed_epochs": [2]})
    paths = cell_paths(tmp_path)
    train_encoder(split_dir, settings, **paths)
    with np.load(Path(paths["embeddings_dir"]) / "epoch-002.npz") as saved:
        assert str(saved["features_kind"]) == kind
        assert saved["features"].shape[1] == width


def test_every_kind_of_embeddings_has_a_name_in_the_figures():
    from brainage.report.figures import FEATURES_KIND_NAMES
    from brainage.train import embedded_kind

    kinds = {embedded_kind({"projection_head": head, "head": kind}, which)
             for head in (True, False) for kind in ("projection", "regression")
             for which in ("projection", "encoder")}
    assert kinds == set(FEATURES_KIND_NAMES)


def test_embeddings_written_again_on_resume_name_their_kind(split_dir, tmp_path, monkeypatch):
    """Embeddings lost from a cell's folder are rewritten from the checkpoint at resume:
    with the network's kind, as the first write (the resume path recorded the read-out's)."""
    import brainage.train as train_module

    settings = tiny_settings(model={"width": 8, "projection_head": False},
                             train={"epochs": 2, "batch_size": 6, "embed_epochs": [1, 2]})
    paths = cell_paths(tmp_path)
    run_epoch = train_module.run_epoch

    def killed_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt("time limit")
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_encoder(split_dir, settings, **paths)
    monkeypatch.setattr(train_module, "run_epoch", run_epoch)
    for file in Path(paths["embeddings_dir"]).iterdir():
        file.unlink()
    train_encoder(split_dir, settings, **paths)
    with np.load(Path(paths["embeddings_dir"]) / "epoch-001.npz") as saved:
        assert str(saved["features_kind"]) == "encoder"


def test_outputs_follow_the_contract(split_dir, reference_run):
    folder, history, metrics = reference_run
    table = pd.read_csv(folder / "history.tsv", sep="\t")
    assert tuple(table.columns) == HISTORY_COLUMNS
    assert table["epoch"].tolist() == [1, 2, 3]
    assert np.isfinite(table["loss"]).all() and (table["seconds"] > 0).all()
    assert table["nn_nb"].tolist() == [5, 4, 4]  # Algorithm 1 with B = 6, nn_final = 4
    assert table["lr"].tolist() == [1e-3] * 3
    # embed_epochs beyond the last epoch are skipped
    assert sorted(p.name for p in (folder / "embeddings").iterdir()) == [
        "epoch-001.npz", "epoch-003.npz"]
    with np.load(folder / "embeddings" / "epoch-003.npz") as saved:
        assert saved["features"].shape == (24, 128) and saved["features"].dtype == np.float32
        assert sorted(set(saved["subset"])) == ["test", "train"]
        assert saved["participant_id"][0].startswith("sub-")
        assert str(saved["features_kind"]) == "projection"  # Fig. 5 names it
    saved_metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("split", "experiment", "variant", "seed", "loss", "readout", "mae", "rmse",
                "pearson_r", "r2", "mae_per_study", "n_per_study", "gap_age_slope", "n_train", "n_test",
                "ridge_alpha"):
        assert key in saved_metrics, key
    predictions = pd.read_csv(folder / "predictions.tsv", sep="\t")
    assert list(predictions.columns) == ["participant_id", "study", "age", "predicted_age",
                                         "subset"]
    assert len(predictions) == 24
    test_rows = predictions[predictions.subset == "test"]
    assert np.isclose(np.mean(np.abs(test_rows.predicted_age - test_rows.age)),
                      saved_metrics["mae"])
    assert not (folder / "checkpoint.pt").exists()  # resume state removed at the end
    payload = torch.load(folder / "encoder.pt", weights_only=True)
    assert payload["settings"]["loss"]["name"] == "adaptive" and payload["epochs"] == 3


def test_same_seed_same_result_on_cpu(split_dir, reference_run, tmp_path):
    folder, history, metrics = reference_run
    paths = cell_paths(tmp_path)
    again = train_encoder(split_dir, REFERENCE, **paths)
    assert [row["loss"] for row in again] == [row["loss"] for row in history]
    assert_same_weights(folder / "encoder.pt", paths["encoder_path"])
    # byte for byte, so that checksums (model bundles, provenance) repeat too
    assert (folder / "encoder.pt").read_bytes() == paths["encoder_path"].read_bytes()
    repeated = evaluate_encoder(split_dir, paths["features_path"], REFERENCE,
                                metrics_path=tmp_path / "metrics.json",
                                predictions_path=tmp_path / "predictions.tsv")
    assert repeated["mae"] == metrics["mae"]


def test_fingerprint_covers_the_seed(split_dir):
    settings = resolve_cell(REFERENCE)
    other = resolve_cell({**REFERENCE, "seed": 1})
    split = load_split(split_dir)
    assert fingerprint(settings, split) != fingerprint(other, split)


def test_fingerprint_covers_the_training_ages(split_dir, tmp_path):
    # a corrected age (same images, same subjects) must not resume from weights trained on
    # the old one: the losses read the ages
    import shutil

    settings = resolve_cell(REFERENCE)
    corrected = tmp_path / "holdout"
    shutil.copytree(split_dir, corrected)
    table = pd.read_csv(corrected / "participants.tsv", sep="\t")
    first_train = table.index[table["subset"] == "train"][0]
    table.loc[first_train, "age"] += 1.0
    table.to_csv(corrected / "participants.tsv", sep="\t", index=False)
    assert fingerprint(settings, load_split(split_dir)) != fingerprint(settings,
                                                                       load_split(corrected))


def test_untrained_encoder_needs_no_batch_and_removes_a_killed_trainings_checkpoint(
        tmp_path):
    # 9 training subjects, fewer than the default batch of 32, which an untrained encoder
    # never draws; a checkpoint left by a training of this cell killed before it was set
    # to 0 epochs goes (hundreds of MB at the paper's width)
    small = write_split(tmp_path / "small", n_subjects=12, n_test=3)
    paths = cell_paths(tmp_path / "cell")
    paths["checkpoint_path"].parent.mkdir()
    paths["checkpoint_path"].write_bytes(b"an old checkpoint")
    Path(f"{paths['checkpoint_path']}.sha256").write_text("0" * 64)
    train_encoder(small, tiny_settings(train={"epochs": 0, "batch_size": 32}), **paths)
    assert paths["encoder_path"].is_file() and paths["features_path"].is_file()
    assert not paths["checkpoint_path"].exists()
    assert not Path(f"{paths['checkpoint_path']}.sha256").exists()


TRAIN_IN_A_PROCESS = """
import json, sys
from brainage.train import train_encoder
arguments = json.loads(sys.argv[1])
train_encoder(arguments["split_dir"], arguments["settings"], **arguments["paths"])
"""


def kill_after_first_checkpoint(split_dir: Path, settings: dict, paths: dict,
                                timeout_s: float = 240) -> subprocess.CompletedProcess:
    """Train in a child process and SIGKILL it from outside as soon as its first
    checkpoint is on disk, as a SLURM preemption would."""
    arguments = json.dumps({"split_dir": str(split_dir), "settings": settings,
                            "paths": {key: str(value) for key, value in paths.items()}})
    child = subprocess.Popen([sys.executable, "-c", TRAIN_IN_A_PROCESS, arguments],
                             env={**os.environ, "PYTHONPATH": str(REPO / "workflow")},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    while not Path(paths["checkpoint_path"]).exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"training ended before its first checkpoint:\n{child.stdout.read()}")
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    output, _ = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, output, "")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(split_dir, tmp_path, caplog):
    """SIGKILL after the first checkpoint (as a preemption), start again, compare with a run
    that was never interrupted: same weights bit for bit, same history, same metrics.
    NNCLR, because it carries state across batches (its queue) and uses noise
    augmentation."""
    # the learning rate falls after epoch 3: a resume that forgot the scheduler's place
    # would train epoch 4 at the old rate
    settings = tiny_settings(loss={"name": "nnclr", "queue_size": 16},
                             train={"epochs": 4, "batch_size": 6, "embed_epochs": [1, 4],
                                    "lr_step_epochs": 3, "lr_gamma": 0.1})
    cell = tmp_path / "cell"
    killed = kill_after_first_checkpoint(split_dir, settings, cell_paths(cell))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    assert (cell / "checkpoint.pt").exists() and not (cell / "encoder.pt").exists()
    done = torch.load(cell / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4
    # Snakemake deletes the declared outputs of a killed job; the checkpoint survives.
    (cell / "history.tsv").unlink(missing_ok=True)
    for file in (cell / "embeddings").iterdir():
        file.unlink()

    with caplog.at_level("INFO", logger="brainage.train"):
        resumed = train_encoder(split_dir, settings, **cell_paths(cell))
    assert f"resuming from {cell / 'checkpoint.pt'} after epoch {done}" in caplog.text
    # a retry may land on another node: the resumed attempt says where it computes too
    assert re.search(r"resuming from .*\n.*training nnclr \(.* M parameters\) on cpu: ",
                     caplog.text), caplog.text
    # and with what: a changed environment reruns no training (the workflow profile)
    assert f"versions: brainage {brainage_version()}, torch {torch.__version__}, numpy" in (
        caplog.text)
    assert [row["epoch"] for row in resumed] == [1, 2, 3, 4]
    assert not (cell / "checkpoint.pt").exists()
    assert not (cell / "checkpoint.pt.sha256").exists()

    uninterrupted = tmp_path / "uninterrupted"
    history = train_encoder(split_dir, settings, **cell_paths(uninterrupted))
    assert [row["loss"] for row in resumed] == [row["loss"] for row in history]
    assert [row["lr"] for row in resumed] == [row["lr"] for row in history]
    assert [row["lr"] for row in history] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])
    assert_same_weights(cell / "encoder.pt", uninterrupted / "encoder.pt")
    for epoch in ("epoch-001.npz", "epoch-004.npz"):  # epoch 1 restored from the checkpoint
        with np.load(cell / "embeddings" / epoch) as a, \
                np.load(uninterrupted / "embeddings" / epoch) as b:
            assert np.array_equal(a["features"], b["features"])
    scores = [evaluate_encoder(split_dir, folder / "features.npz", settings,
                               metrics_path=folder / "metrics.json",
                               predictions_path=folder / "predictions.tsv")
              for folder in (cell, uninterrupted)]
    assert scores[0]["mae"] == scores[1]["mae"]


def test_checkpoint_of_other_settings_is_ignored(split_dir, tmp_path, caplog):
    settings = tiny_settings(train={"epochs": 2, "batch_size": 9, "embed_epochs": []})
    paths = cell_paths(tmp_path)
    # a leftover checkpoint of another configuration, intact (its digest matches)
    save_checkpoint(paths["checkpoint_path"], {"format": 1, "fingerprint": "other", "epoch": 1})
    with caplog.at_level("WARNING", logger="brainage.train"):
        history = train_encoder(split_dir, settings, **paths)
    assert [row["epoch"] for row in history] == [1, 2]
    assert "belongs to other settings" in caplog.text


def test_damaged_checkpoint_is_detected_and_training_restarts(split_dir, reference_run,
                                                               tmp_path, caplog):
    """One weight tensor changed inside checkpoint.pt, the zip intact and the checkpoint
    otherwise valid: torch.load cannot tell, the sha256 beside it can. Training starts
    over and ends exactly where the uninterrupted run did."""
    folder, history, _ = reference_run
    cell = tmp_path / "cell"
    killed = kill_after_first_checkpoint(split_dir, REFERENCE, cell_paths(cell))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    checkpoint = torch.load(cell / "checkpoint.pt", weights_only=True)
    name = next(key for key in checkpoint["model"] if key.endswith("conv1.weight"))
    checkpoint["model"][name].view(-1)[0] += 0.5
    torch.save(checkpoint, cell / "checkpoint.pt")

    with caplog.at_level("INFO", logger="brainage.train"):
        again = train_encoder(split_dir, REFERENCE, **cell_paths(cell))
    assert f"ignoring damaged checkpoint {cell / 'checkpoint.pt'}" in caplog.text
    assert "resuming" not in caplog.text
    assert [row["loss"] for row in again] == [row["loss"] for row in history]
    assert (cell / "encoder.pt").read_bytes() == (folder / "encoder.pt").read_bytes()


def test_checkpoint_without_its_digest_is_not_trusted(split_dir, tmp_path, caplog):
    settings = tiny_settings(loss={"name": "yaware"},
                             train={"epochs": 1, "batch_size": 9, "embed_epochs": []})
    paths = cell_paths(tmp_path)
    split = load_split(split_dir)
    save_checkpoint(paths["checkpoint_path"],
                    {"format": 1, "fingerprint": fingerprint(resolve_cell(settings), split),
                     "epoch": 1})
    (tmp_path / "checkpoint.pt.sha256").unlink()
    with caplog.at_level("WARNING", logger="brainage.train"):
        history = train_encoder(split_dir, settings, **paths)
    assert "checksum file" in caplog.text and str(paths["checkpoint_path"]) in caplog.text
    assert [row["epoch"] for row in history] == [1]


def test_stale_temporaries_of_a_killed_write_are_removed_on_start(split_dir, tmp_path):
    """A kill during a write leaves atomic_path's temporary (".<name>.<random><suffix>");
    the next training of the cell removes its own, and only its own."""
    settings = tiny_settings(loss={"name": "yaware"},
                             train={"epochs": 1, "batch_size": 9, "embed_epochs": [1]})
    (tmp_path / "embeddings").mkdir()
    stale = [tmp_path / ".checkpoint.pt.k3j_x9ab.pt", tmp_path / ".encoder.pt.0a1b2c3d.pt",
             tmp_path / ".checkpoint.pt.sha256.qwertyui.pt.sha256",
             tmp_path / ".history.tsv.zx8cv7bn.tsv",
             tmp_path / ".features.npz.k3j_x9ab.npz",
             tmp_path / "embeddings" / ".epoch-001.npz.mn5bv4cx.npz"]
    others = [tmp_path / ".metrics.json.k3j_x9ab.json", tmp_path / "notes.txt",
              tmp_path / ".checkpoint.pt.keep-me"]
    for path in stale + others:
        path.write_bytes(b"half a file")
    train_encoder(split_dir, settings, **cell_paths(tmp_path))
    assert [path.name for path in stale if path.exists()] == []
    assert [path.name for path in others if not path.exists()] == []


def test_checkpoint_that_does_not_fit_names_the_file_and_the_room(small_disk):
    path = small_disk.folder / "checkpoint.pt"
    writer = CheckpointWriter(path)
    writer.submit({"model": {"weight": torch.zeros(1_000_000)}})
    with pytest.raises(WriteError, match=rf"^writing {re.escape(str(path))} needs about "
                                         rf"4000000 bytes but only \d+ bytes are free on /"):
        writer.wait()
    assert list(small_disk.folder.iterdir()) == []


def test_checkpoint_write_failing_half_way_names_the_file_and_the_room(small_disk,
                                                                        monkeypatch):
    """The state fits by its tensor bytes but the disk fills anyway (another job writes
    there): the writer thread's error reaches training with the file and the free space."""
    import brainage.train

    monkeypatch.setattr(brainage.train, "ensure_room", lambda path, needed: None)
    if not small_disk.real:
        def full_disk(temp, payload, **options):
            raise RuntimeError("basic_ios::clear: iostream error")

        monkeypatch.setattr(brainage.train, "write_tensors", full_disk)
    path = small_disk.folder / "checkpoint.pt"
    writer = CheckpointWriter(path)
    writer.submit({"model": {"weight": torch.zeros(1_000_000)}})
    with pytest.raises(WriteError, match=rf"^writing {re.escape(str(path))} failed: .*"
                                         rf"\(\d+ bytes free on /.*\)$"):
        writer.wait()
    assert list(small_disk.folder.iterdir()) == []


# -- batches and augmentations ----------------------------------------------------------------

def test_single_leftover_subject_joins_the_previous_batch():
    batches = plan_batches(13, 6, np.random.default_rng(0))
    assert [len(batch) for batch in batches] == [6, 7]
    assert sorted(np.concatenate(batches)) == list(range(13))
    assert [len(batch) for batch in plan_batches(14, 6, np.random.default_rng(0))] == [6, 6, 2]


def test_batches_are_shuffled_and_a_batch_may_be_the_whole_split():
    # plan_batches shuffles (a fixed order would show every epoch the same batches), and a
    # batch size equal to the number of training subjects is allowed: one batch of all.
    first = np.concatenate(plan_batches(20, 5, np.random.default_rng(0)))
    second = np.concatenate(plan_batches(20, 5, np.random.default_rng(1)))
    assert sorted(first) == sorted(second) == list(range(20))
    assert list(first) != list(range(20)) and list(first) != list(second)
    (whole,) = plan_batches(6, 6, np.random.default_rng(0))
    assert sorted(whole) == list(range(6))
    with pytest.raises(ConfigError, match="batch_size"):
        plan_batches(6, 7, np.random.default_rng(0))


class _Flatten(torch.nn.Module):
    """A model for run_epoch's tests: the flattened volumes times one learnable scale."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, volumes):
        return volumes.flatten(1) * self.scale


def test_run_epoch_draws_new_batches_and_augmentations_each_epoch():
    # docs/method.md §4: batch order and augmentations come from generators seeded by
    # (seed, epoch): the same (seed, epoch) repeats exactly (resume), another epoch draws
    # other batches and other noise. A recording loss sees each batch's ages and inputs.
    from brainage.data import VolumeStore
    from brainage.train import run_epoch

    seen = []

    def loss_fn(features, ages, epoch):
        seen.append((ages.tolist(), features.detach().clone()))
        return features.sum() * 0.0

    images = np.arange(12 * 2 * 2 * 2, dtype=np.float32).reshape(12, 1, 2, 2, 2) + 1
    store = VolumeStore(images, torch.device("cpu"))
    ages = torch.arange(12, dtype=torch.float32)
    model = _Flatten()

    def epoch_draws(epoch):
        seen.clear()
        run_epoch(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0), store,
                  Augmenter("noise", noise_std=0.1), np.arange(12), ages, epoch=epoch, seed=3,
                  batch_size=4, views=2)
        return [ages for ages, _ in seen], torch.cat([features for _, features in seen])

    order_1, inputs_1 = epoch_draws(1)
    order_1_again, inputs_1_again = epoch_draws(1)
    order_2, inputs_2 = epoch_draws(2)
    assert order_1 == order_1_again and torch.equal(inputs_1, inputs_1_again)
    assert order_1 != order_2
    # the same subjects in the same places, with epoch 2's noise instead of epoch 1's
    clean = images.reshape(12, -1)
    noise_1 = inputs_1 - torch.from_numpy(clean[np.concatenate(order_1).astype(int)])[:, None]
    noise_2 = inputs_2 - torch.from_numpy(clean[np.concatenate(order_2).astype(int)])[:, None]
    assert not torch.allclose(noise_1, noise_2, atol=1e-3)  # float32 rounding is ~1e-5
    # each row's age is its own image's (subjects' images differ by 8 or more: noise of sd
    # 0.1 stays far below), and the two views of a subject carry different noise
    assert noise_1.abs().max() < 1.0 and noise_2.abs().max() < 1.0
    assert not torch.allclose(inputs_1[:, 0], inputs_1[:, 1], atol=1e-3)


def test_run_epoch_gives_the_loss_each_image_with_its_own_subjects_age():
    """Ages are looked up by the split's row of each image, not by its position among the
    training rows: with test rows between the training rows (as in every real split) the
    two differ, and a loss fed other subjects' ages trains on a wrong signal that the
    read-out, fitted on the right ages, would hide."""
    from brainage.train import run_epoch

    images = np.arange(20 * 8, dtype=np.float32).reshape(20, 1, 2, 2, 2)
    ages = torch.arange(20, dtype=torch.float32) * 3.0 + 20.0  # row r is 20 + 3 r years old
    train_rows = np.arange(20)[1::2]  # the even rows are test subjects
    seen = []

    def loss_fn(features, batch_ages, epoch):
        seen.append((features.detach().clone(), batch_ages.clone()))
        return features.sum() * 0.0

    model = _Flatten()
    run_epoch(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0),
              VolumeStore(images, torch.device("cpu")), Augmenter("none"), train_rows, ages,
              epoch=1, seed=0, batch_size=4, views=2)
    rows = [int(views[0, 0]) // 8 for features, _ in seen for views in features]
    given = [float(age) for _, batch_ages in seen for age in batch_ages]
    assert sorted(rows) == train_rows.tolist()
    assert given == [20.0 + 3.0 * row for row in rows]


def test_gather_keeps_the_requested_order_and_background_zeros():
    # the memory-map path reads sorted rows and must put them back in the asked order,
    # as float32 whatever the array's dtype, background 0 staying 0.
    images = np.zeros((5, 1, 2, 2, 2), dtype=np.float16)
    images[:, 0, 0, 0, 0] = np.arange(5) + 1  # one brain voxel per subject, value = row + 1
    rows = np.array([3, 0, 4, 1])
    batch = VolumeStore(images, torch.device("cpu"), resident=False).gather(rows)
    assert batch.dtype == torch.float32
    assert batch[:, 0, 0, 0, 0].tolist() == [4.0, 1.0, 5.0, 2.0]
    assert torch.count_nonzero(batch[:, 0].flatten(1)[:, 1:]) == 0


def _volumes() -> torch.Tensor:
    ages = np.array([25.0, 45.0, 65.0, 80.0])
    return torch.from_numpy(synthetic_volumes(ages, (16, 20, 16))).unsqueeze(1)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_noise_and_none():
    volumes = _volumes()
    assert Augmenter("none")(volumes, _generator()) is volumes
    noisy = Augmenter("noise", noise_std=0.1)(volumes, _generator())
    assert noisy.shape == volumes.shape
    assert abs(float((noisy - volumes).std()) - 0.1) < 0.01
    assert torch.equal(noisy, Augmenter("noise", noise_std=0.1)(volumes, _generator()))


def test_cutout_zeroes_one_box_of_the_configured_size():
    volumes = torch.ones(64, 1, 16, 20, 16)
    cut = Augmenter("cutout", cutout_voxels=(4, 5, 6), cutout_probability=0.5)(
        volumes, _generator())
    zeros = (cut == 0).flatten(1).sum(dim=1)
    assert set(zeros.tolist()) <= {0, 4 * 5 * 6}
    assert 16 < int((zeros > 0).sum()) < 48  # about half of the volumes
    box = torch.nonzero(cut[zeros.argmax(), 0] == 0)
    assert (box.max(0).values - box.min(0).values + 1).tolist() == [4, 5, 6]
    # every position of the box is drawn, the ones touching either border included
    many = Augmenter("cutout", cutout_voxels=(4, 4, 4), cutout_probability=1.0)(
        torch.ones(400, 1, 8, 8, 8), _generator())
    starts = torch.stack([torch.nonzero(volume[0] == 0).min(0).values for volume in many])
    for axis in range(3):
        assert set(starts[:, axis].tolist()) == set(range(8 - 4 + 1))
    # the box edge comes from the config in mm and the split's resolution
    augmenter = Augmenter.from_settings({"augmentation": "cutout", "cutout_size_mm": 64},
                                        "yaware", resolution_mm=2)
    assert augmenter.cutout_voxels == (32, 32, 32)


def test_flip_is_left_right():
    volumes = _volumes()
    flipped = Augmenter("flip", flip_axis=0)(volumes, _generator())
    for original, result in zip(volumes, flipped):
        assert torch.equal(result, original) or torch.equal(result, original.flip(1))


def test_rotation():
    volumes = _volumes()
    unchanged = Augmenter("rotation", rotation_degrees=0.0)(volumes, _generator())
    assert torch.allclose(unchanged, volumes, atol=1e-5)
    rotated = Augmenter("rotation", rotation_degrees=20.0)(volumes, _generator())
    assert rotated.shape == volumes.shape and not torch.allclose(rotated, volumes, atol=1e-3)
    # a rigid rotation of a centred brain keeps most of its mass
    brain = (volumes != 0).float()
    turned = Augmenter("rotation", rotation_degrees=20.0)(brain, _generator())
    assert 0.85 < float(turned.sum() / brain.sum()) < 1.1


def test_flip_flips_about_half_of_the_volumes():
    volumes = torch.arange(64 * 4.0).reshape(64, 1, 4, 1, 1).expand(64, 1, 4, 2, 2)
    flipped = Augmenter("flip", flip_axis=0)(volumes, _generator())
    changed = int(sum(not torch.equal(a, b) for a, b in zip(flipped, volumes)))
    assert 16 < changed < 48


def test_left_right_axis_is_the_voxel_axis_along_which_world_x_changes():
    # row 0 of the affine gives world x per voxel step along each array axis; with axes
    # cycled (array axis 2 is world x, 0 is y, 1 is z) the flip must act on axis 2
    from brainage.data import left_right_axis

    cycled = [[0, 0, -2, 90], [2, 0, 0, -126], [0, 2, 0, -72], [0, 0, 0, 1]]
    assert left_right_axis(cycled) == 2
    assert left_right_axis(np.diag([2.0, 2.0, 2.0, 1.0])) == 0
    assert left_right_axis(None) == 0


def test_rotation_angles_are_symmetric_within_the_limit_in_degrees(monkeypatch):
    # rotation_degrees is a maximum absolute angle per axis, in degrees: draws are uniform
    # in [-limit, +limit] radians-converted, so both signs occur and none exceeds the limit.
    import brainage.data

    drawn = []
    original = brainage.data.rotation_matrices
    monkeypatch.setattr(brainage.data, "rotation_matrices",
                        lambda angles: drawn.append(angles) or original(angles))
    Augmenter("rotation", rotation_degrees=20.0)(torch.zeros(200, 1, 4, 4, 4), _generator())
    (angles,) = drawn
    limit = np.deg2rad(20.0)
    assert float(angles.abs().max()) <= limit
    assert float(angles.min()) < -0.8 * limit and float(angles.max()) > 0.8 * limit


def test_rotation_matrices_are_proper_rotations():
    from brainage.data import rotation_matrices

    quarter = torch.tensor([[math.pi / 2, 0.0, 0.0]])  # 90 degrees about the first axis
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(rotation_matrices(quarter)[0], expected, atol=1e-6)
    # the composition is Rz Ry Rx: x first, so 90 degrees about x then y takes y to x
    # (the other order, Rx Ry Rz, takes y to z)
    both = rotation_matrices(torch.tensor([[math.pi / 2, math.pi / 2, 0.0]]))[0]
    assert torch.allclose(both @ torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]),
                          atol=1e-6)
    angles = torch.rand(10, 3, generator=_generator()) * 2 - 1
    matrices = rotation_matrices(angles)
    assert torch.allclose(matrices @ matrices.transpose(1, 2), torch.eye(3).expand(10, 3, 3),
                          atol=1e-6)
    assert torch.allclose(torch.linalg.det(matrices), torch.ones(10), atol=1e-6)


def test_rotation_is_rigid_in_voxels_of_a_non_cubic_volume():
    # a centred isotropic Gaussian blob is unchanged by any rotation about its centre if the
    # rotation is rigid in voxel space; rotating in affine_grid's normalised [-1, 1]
    # coordinates instead would stretch it along the longer axes of a 12x24x18 volume
    shape = (12, 24, 18)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in shape],
                           indexing="ij")
    blob = torch.exp(-sum(g.square() for g in grids) / (2 * 2.0**2))[None, None].expand(
        8, 1, *shape)
    rotated = Augmenter("rotation", rotation_degrees=40.0)(blob.contiguous(), _generator())
    # trilinear resampling alone leaves up to ~0.07 of the peak 1; the stretch, ~0.33
    assert float((rotated - blob).abs().max()) < 0.15


def test_default_augmentation_depends_on_the_loss():
    from brainage.data import resolve_augmentation

    assert resolve_augmentation({"augmentation": "default"}, "simclr") == "noise"
    assert resolve_augmentation({"augmentation": "default"}, "nnclr") == "noise"
    assert resolve_augmentation({"augmentation": "default"}, "adaptive") == "none"
    assert resolve_augmentation({"augmentation": "flip"}, "simclr") == "flip"


def test_a_resident_array_gives_the_batches_of_the_memory_map():
    # the device-resident copy (chunked by SCAN_CHUNK rows, chosen channels only) must hold
    # what the memory-map path reads: same rows, channels in the asked order
    from brainage.split_data import SCAN_CHUNK

    images = np.random.default_rng(0).uniform(1, 2, (SCAN_CHUNK + 3, 3, 2, 2, 2)).astype(
        np.float32)
    rows = np.random.default_rng(1).permutation(len(images))
    for channels in (None, [2, 0]):
        resident, mapped = (VolumeStore(images, torch.device("cpu"), channels=channels,
                                        resident=resident)
                            for resident in (True, False))
        assert resident.resident is not None and mapped.resident is None
        picked = images[rows] if channels is None else images[rows][:, channels]
        assert torch.equal(resident.gather(rows), mapped.gather(rows))
        assert torch.allclose(resident.gather(rows), torch.from_numpy(picked))


def test_the_array_is_resident_when_its_chosen_channels_fit_in_half_the_free_memory(
        monkeypatch):
    # RESIDENT_MEMORY_SHARE of the free device memory, counted for the chosen channels only
    images = np.zeros((10, 3, 2, 2, 2), dtype=np.float32)  # 960 bytes, 320 per channel
    every = VolumeStore(images, torch.device("cpu"), resident=False)
    one = VolumeStore(images, torch.device("cpu"), channels=[1], resident=False)
    for free, fits in ((2000, (True, True)), (1000, (False, True)), (600, (False, False))):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10**9))
        assert (every._fits_on_device(), one._fits_on_device()) == fits, free


def test_a_cuda_array_that_does_not_fit_says_so_in_the_log(monkeypatch, caplog):
    # the slower path (each batch from host memory) must be visible in a training's log, as
    # the resident one is; no GPU needed: "auto" only asks whether it fits
    images = np.zeros((10, 3, 2, 2, 2), dtype=np.float32)  # 960 bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 10**9))
    with caplog.at_level(logging.INFO, logger="brainage.data"):
        store = VolumeStore(images, torch.device("cuda"))
    assert store.resident is None
    assert "training array (0.0 MB) not resident on cuda (over 50% of its free memory)" in (
        caplog.text)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="brainage.data"):
        VolumeStore(images, torch.device("cpu"))  # the CPU has no resident copy to miss
    assert "not resident" not in caplog.text


def test_augmentation_settings_reach_the_augmenter():
    # the train section's values, the cutout edge rounded from mm to voxels (at least one),
    # and the flip on the array axis that is left-right in the split's affine
    cycled = [[0, 0, -2, 90], [2, 0, 0, -126], [0, 2, 0, -72], [0, 0, 0, 1]]
    augmenter = Augmenter.from_settings(
        {"augmentation": "flip", "noise_std": 0.3, "cutout_size_mm": 7,
         "cutout_probability": 0.8, "rotation_degrees": 5.0}, "yaware", resolution_mm=2,
        affine=cycled)
    assert (augmenter.kind, augmenter.noise_std, augmenter.cutout_voxels,
            augmenter.cutout_probability, augmenter.rotation_degrees, augmenter.flip_axis) == (
        "flip", 0.3, (4, 4, 4), 0.8, 5.0, 2)
    volumes = torch.arange(64 * 8.0).reshape(64, 1, 2, 2, 2)
    flipped = augmenter(volumes, _generator())
    assert all(torch.equal(result, original) or torch.equal(result, original.flip(3))
               for original, result in zip(volumes, flipped))
    tiny = Augmenter.from_settings({"augmentation": "cutout", "cutout_size_mm": 1}, "yaware",
                                   resolution_mm=6)
    assert tiny.cutout_voxels == (1, 1, 1)


def test_an_unknown_augmentation_is_refused():
    from brainage.data import resolve_augmentation

    with pytest.raises(ConfigError, match="train.augmentation is 'blur'"):
        resolve_augmentation({"augmentation": "blur"}, "simclr")
    with pytest.raises(ConfigError, match="train.augmentation is 'blur'"):
        Augmenter("blur")


# -- initialisation ------------------------------------------------------------------------------

def test_a_trained_encoder_initialises_a_cell(split_dir, reference_run, tmp_path, caplog):
    """encoder.pt (of a pretraining, say) as model.init_checkpoint: every tensor loads."""
    folder, _, _ = reference_run
    init = tiny_settings(model={"init_checkpoint": str(folder / "encoder.pt")},
                         loss={"name": "yaware"},
                         train={"epochs": 1, "batch_size": 9, "embed_epochs": []})
    with caplog.at_level("INFO", logger="brainage.models"):
        train_encoder(split_dir, init, **cell_paths(tmp_path))
    assert "0 missing, 0 unexpected, 0 with another shape" in caplog.text


def test_a_fine_tuned_cell_starts_from_the_pretrained_weights(split_dir, reference_run, caplog,
                                                             tmp_path):
    """Before its first step (train.epochs 0: the encoder as it starts), a cell with a
    pretrained start holds exactly the pretrained tensors, the first convolution included;
    one epoch later it has moved away from them."""
    folder, _, _ = reference_run
    pretrained = encoder_weights(folder / "encoder.pt")
    start = {"init_checkpoint": str(folder / "encoder.pt")}
    before = tmp_path / "before"
    with caplog.at_level(logging.INFO, logger="brainage.train"):
        train_encoder(split_dir, tiny_settings(model=start, train={"epochs": 0}),
                      **cell_paths(before))
    # its log says whose encoder it wrote (it said "the initial encoder of seed 0 untrained")
    assert (f"train.epochs is 0: wrote the encoder of {folder / 'encoder.pt'} as it is (not "
            f"fine-tuned)") in caplog.text, caplog.text
    started = encoder_weights(before / "encoder.pt")
    assert torch.equal(started["encoder.conv1.weight"], pretrained["encoder.conv1.weight"])
    assert_same_weights(before / "encoder.pt", folder / "encoder.pt")
    scratch = tmp_path / "scratch"
    train_encoder(split_dir, tiny_settings(train={"epochs": 0}), **cell_paths(scratch))
    assert not torch.equal(encoder_weights(scratch / "encoder.pt")["encoder.conv1.weight"],
                           pretrained["encoder.conv1.weight"])
    after = tmp_path / "after"
    train_encoder(split_dir, tiny_settings(model=start, loss={"name": "yaware"},
                                           train={"epochs": 1, "batch_size": 6,
                                                  "embed_epochs": []}),
                  **cell_paths(after))
    tuned = encoder_weights(after / "encoder.pt")["encoder.conv1.weight"]
    assert not torch.equal(tuned, pretrained["encoder.conv1.weight"])


def test_a_new_pretrained_encoder_is_not_resumed_from_the_old_one(split_dir, reference_run,
                                                                   tmp_path, caplog):
    """The resume fingerprint holds the starting checkpoint's bytes: a fine-tuning killed
    before its pretraining reran starts again from the new pretrained encoder."""
    folder, _, _ = reference_run
    start = tmp_path / "pretrained.pt"
    start.write_bytes((folder / "encoder.pt").read_bytes())
    settings = tiny_settings(model={"init_checkpoint": str(start)},
                             train={"epochs": 2, "batch_size": 9, "embed_epochs": []})
    split = load_split(split_dir)
    before = fingerprint(settings, split)
    state = torch.load(start, map_location="cpu", weights_only=True)
    state["model"]["encoder.conv1.weight"] = state["model"]["encoder.conv1.weight"] + 1.0
    torch.save(state, start)
    assert fingerprint(settings, split) != before
    paths = cell_paths(tmp_path / "cell")
    save_checkpoint(paths["checkpoint_path"], {"format": 1, "fingerprint": before, "epoch": 1})
    with caplog.at_level("WARNING", logger="brainage.train"):
        history = train_encoder(split_dir, settings, **paths)
    assert [row["epoch"] for row in history] == [1, 2]
    assert "belongs to other settings" in caplog.text


# -- errors ----------------------------------------------------------------------------------

def test_batch_larger_than_training_set(split_dir, tmp_path):
    # the variant's own key too: a variant that sets it is not changed by the top level's
    with pytest.raises(ConfigError, match=r"config key train\.batch_size \(or experiments\.test\."
                                          r"variants\.adaptive\.train\.batch_size where that "
                                          r"variant sets it\) is 32 .* only 18 training"):
        train_encoder(split_dir, tiny_settings(train={"batch_size": 32}), **cell_paths(tmp_path))
    # a pretraining run's batch is its own key, never the top-level train section's
    pretraining = {**tiny_settings(train={"batch_size": 32}), "experiment": "pretrain",
                   "variant": "t1w"}
    with pytest.raises(ConfigError, match=r"key pretrain\.t1w\.train\.batch_size is 32 .* "
                                          r"Lower pretrain\.t1w\.train\.batch_size"):
        train_encoder(split_dir, pretraining, **cell_paths(tmp_path))
    # a job's settings file carries no names (training_settings): every key is named
    from brainage.config import training_settings
    with pytest.raises(ConfigError, match=r"key train\.batch_size \(a variant's: experiments\."
                                          r"<experiment>\.variants\.<variant>\.train\."
                                          r"batch_size; a pretraining run's: "
                                          r"pretrain\.<run>\.train\.batch_size\) is 32"):
        train_encoder(split_dir, training_settings(resolve_cell(pretraining)),
                      **cell_paths(tmp_path))
    # subjects qc.exclude_failed left out: the message said only to lower the batch
    excluded = tmp_path / "excluded_split"
    shutil.copytree(split_dir, excluded)
    stats = json.loads((excluded / "stats.json").read_text())
    stats["excluded"] = [{"participant_id": "sub-x1", "reason": "QC: coverage 0.5 < 0.7"},
                         {"participant_id": "sub-x2", "reason": "QC: dice 0.5 < 0.85"}]
    (excluded / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(ConfigError, match=r"only 18 training subjects \(after "
                                          r"qc\.exclude_failed left out the split's 2 "
                                          r"subject\(s\) failing QC, training and test, listed "
                                          r"under 'excluded' in its stats\.json"):
        train_encoder(excluded, tiny_settings(train={"batch_size": 32}), **cell_paths(tmp_path))


def test_a_damaged_pretrained_encoder_names_model_init(split_dir, tmp_path):
    """The workflow puts a pretraining run's encoder.pt into model.init_checkpoint: an
    error names model.init, the key the user set, not init_checkpoint."""
    damaged = tmp_path / "encoder.pt"
    damaged.write_bytes(b"not a checkpoint")
    settings = tiny_settings(model={"init": "pretrained:t1w", "init_checkpoint": str(damaged)})
    with pytest.raises(ValueError, match=r"config key model\.init \(pretrained:t1w: the run's "
                                         r"encoder\.pt\): .*encoder\.pt cannot be read"):
        train_encoder(split_dir, settings, **cell_paths(tmp_path / "cell"))


def test_nan_in_the_array_names_the_subject(tmp_path):
    folder = write_split(tmp_path, n_subjects=8, n_test=2)
    images = np.load(folder / "images.npy")
    images[3, 0, 5, 5, 5] = np.nan
    np.save(folder / "images.npy", images)
    with pytest.raises(DataError, match="sub-003"):
        train_encoder(folder, tiny_settings(), **cell_paths(tmp_path / "cell"))


def test_nan_beyond_the_first_scanned_chunk_names_its_own_subject():
    """The array is scanned for NaN in chunks of SCAN_CHUNK subjects: a bad volume in a
    later chunk must name its own subject, not the subject at the same place in the first
    chunk (the user would inspect and redo the wrong subject's maps)."""
    from brainage.split_data import SCAN_CHUNK, check_finite

    ids = [f"sub-{index:02d}" for index in range(SCAN_CHUNK + 4)]
    images = np.zeros((len(ids), 1, 2, 2, 2), dtype=np.float32)
    images[SCAN_CHUNK + 2, 0, 1, 1, 1] = np.inf
    with pytest.raises(DataError, match=rf"the volumes of {ids[SCAN_CHUNK + 2]} contain NaN "
                                        rf"or inf") as error:
        check_finite(images, ids, "images.npy")
    assert ids[2] not in str(error.value)


@pytest.mark.parametrize("section, values, key", [
    ("train", {"augmentation": "blur"}, "train.augmentation"),
    ("train", {"epocs": 3}, "epocs"),
    ("loss", {"name": "supcon"}, "loss.name"),
    ("readout", {"method": "svm"}, "readout.method"),
])
def test_unknown_option(split_dir, tmp_path, section, values, key):
    with pytest.raises(ConfigError, match=key):
        train_encoder(split_dir, tiny_settings(**{section: values}), **cell_paths(tmp_path))


def test_split_without_test_subjects(tmp_path):
    folder = write_split(tmp_path, n_subjects=8, n_test=0)
    with pytest.raises(DataError, match="no test subjects"):
        train_encoder(folder, tiny_settings(), **cell_paths(tmp_path / "cell"))


def test_incomplete_split_folder(tmp_path):
    folder = write_split(tmp_path, n_subjects=8, n_test=2)
    (folder / "stats.json").unlink()
    with pytest.raises(DataError, match="stats.json"):
        load_split(folder)


def test_cuda_requested_without_gpu(split_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="train.device"):
        train_encoder(split_dir, tiny_settings(train={"device": "cuda"}), **cell_paths(tmp_path))


@pytest.mark.slow
def test_gpu_fast_path_runs_on_the_cpu(split_dir):
    """The CUDA defaults, bf16 autocast and channels-last 3D, through the same code on the
    CPU, next to float32 from the same initial weights: a dtype or memory-format slip shows
    here even though no GPU is lent to CI (bench_train.py measures the path's speed). The
    tiny split's 16x20x16 volumes reach the shapes where oneDNN's bf16 kernels go wrong on
    AVX-512 CPUs (runtime_setup switches oneDNN off for CPU bf16): with them, this epoch
    ended with non-finite gradients in about a third of the runs."""
    from brainage.data import VolumeStore
    from brainage.losses import make_loss
    from brainage.models import embed
    from brainage.runtime import runtime_setup
    from brainage.train import make_optimizer, run_epoch

    settings = resolve_cell(tiny_settings(train={"precision": "bf16"}))
    device, autocast_dtype = runtime_setup(settings["train"])
    assert (device.type, autocast_dtype) == ("cpu", torch.bfloat16)
    split = load_split(split_dir)
    store = VolumeStore(split.images, device)
    ages = torch.tensor(split.ages, dtype=torch.float32)
    losses = {}
    for precision, dtype, channels_last in (("float32", None, False),
                                            ("bf16", torch.bfloat16, True)):
        torch.manual_seed(0)
        model = build_model(settings["model"])
        if channels_last:
            model.to(memory_format=torch.channels_last_3d)
        loss_fn = make_loss("adaptive", nn_final=4, max_epochs=3, batch_size=8)
        augmenter = Augmenter.from_settings(settings["train"], "adaptive",
                                            resolution_mm=split.resolution_mm,
                                            affine=split.stats.get("affine"))
        losses[precision] = run_epoch(
            model, loss_fn, make_optimizer(model, settings["train"]), store, augmenter,
            split.train_index, ages, epoch=1, seed=0, batch_size=8, views=2,
            autocast_dtype=dtype, channels_last=channels_last)
        features = embed(model, store, split.eval_index, channels_last=channels_last)
        assert features.dtype == np.float32 and np.isfinite(features).all(), precision
        assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-2), precision
    assert losses["bf16"] == pytest.approx(losses["float32"], rel=0.05), losses


@pytest.mark.slow
def test_features_of_a_bf16_training_are_full_float32(split_dir, tmp_path):
    # the read-out is fitted on features.npz and an exported bundle recomputes features
    # on whatever device it is applied on: bf16 features moved its predictions by 0.08
    # years on average from float32 ones, so features are float32 whatever the precision
    from brainage.data import VolumeStore
    from brainage.models import embed_all, load_encoder

    settings = tiny_settings(train={"precision": "bf16", "epochs": 2, "batch_size": 6,
                                    "embed_epochs": []})
    train_encoder(split_dir, settings, **cell_paths(tmp_path))
    split = load_split(split_dir)
    model = load_encoder(tmp_path / "encoder.pt", resolve_cell(settings)["model"])
    store = VolumeStore(split.images, torch.device("cpu"))
    rows = np.concatenate([split.train_index, split.eval_index])
    reference = embed_all(model, store, rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = model.encode(store.gather(rows)).float().detach().numpy()
    with np.load(tmp_path / "features.npz") as saved:
        np.testing.assert_allclose(saved["encoder"], reference["encoder"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["projection"], reference["projection"],
                                   rtol=1e-5, atol=1e-6)
        # and bf16 is far enough from float32 here for this test to see the difference
        assert np.abs(in_bf16 - saved["encoder"]).max() > 1e-3


# -- resume, schedule and outputs, fast (without the slow tier's reference run) ----------------

class _Interrupted(Exception):
    pass


def test_interrupted_training_resumes_to_the_uninterrupted_result(split_dir, tmp_path,
                                                                  monkeypatch, caplog):
    """Training stopped by an error in epoch 2 keeps the checkpoint of epoch 1; a new call
    resumes after it and ends exactly where an uninterrupted run does: losses, learning
    rates (StepLR, lr_step_epochs 2: epoch 3 at half the rate, also after a resume), the
    NNCLR queue, the weights, and the embeddings of embed_epochs (the last epoch included,
    epoch 1's written again from the checkpoint after a cleaned output folder)."""
    import brainage.train

    settings = tiny_settings(loss={"name": "nnclr", "queue_size": 16},
                             train={"epochs": 3, "batch_size": 9, "embed_epochs": [1, 3, 9],
                                    "lr_step_epochs": 2, "lr_gamma": 0.5})
    uninterrupted = tmp_path / "uninterrupted"
    history = train_encoder(split_dir, settings, **cell_paths(uninterrupted))
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["lr"] for row in history] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert pd.read_csv(uninterrupted / "history.tsv", sep="\t")["lr"].tolist() == \
        pytest.approx([1e-3, 1e-3, 5e-4])

    cell = tmp_path / "cell"
    real_run_epoch = brainage.train.run_epoch

    def stopping_run_epoch(*args, epoch, **kwargs):
        if epoch == 2:
            raise _Interrupted
        return real_run_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(brainage.train, "run_epoch", stopping_run_epoch)
    with pytest.raises(_Interrupted):
        train_encoder(split_dir, settings, **cell_paths(cell))
    monkeypatch.undo()
    assert torch.load(cell / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (cell / "encoder.pt").exists()
    # Snakemake deletes the declared outputs of a failed job; the checkpoint stays
    (cell / "history.tsv").unlink()
    for file in (cell / "embeddings").iterdir():
        file.unlink()

    with caplog.at_level("INFO", logger="brainage.train"):
        resumed = train_encoder(split_dir, settings, **cell_paths(cell))
    assert f"resuming from {cell / 'checkpoint.pt'} after epoch 1" in caplog.text
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert [row["loss"] for row in resumed] == [row["loss"] for row in history]
    assert [row["lr"] for row in resumed] == [row["lr"] for row in history]
    assert pd.read_csv(cell / "history.tsv", sep="\t")["epoch"].tolist() == [1, 2, 3]
    assert_same_weights(cell / "encoder.pt", uninterrupted / "encoder.pt")
    assert not (cell / "checkpoint.pt").exists()
    assert not (cell / "checkpoint.pt.sha256").exists()
    for folder in (cell, uninterrupted):  # embed_epochs beyond train.epochs are skipped
        assert sorted(file.name for file in (folder / "embeddings").iterdir()) == [
            "epoch-001.npz", "epoch-003.npz"]
    table = pd.read_csv(split_dir / "participants.tsv", sep="\t").set_index("participant_id")
    for name in ("epoch-001.npz", "epoch-003.npz"):
        with np.load(cell / "embeddings" / name) as a, \
                np.load(uninterrupted / "embeddings" / name) as b:
            assert np.array_equal(a["features"], b["features"]), name
            ids = a["participant_id"]
            assert np.array_equal(a["age"], table.loc[ids, "age"].to_numpy())
            assert a["subset"].tolist() == table.loc[ids, "subset"].tolist()
    with np.load(cell / "features.npz") as features:  # training rows, then evaluation rows
        assert features["subset"].tolist() == ["train"] * 18 + ["test"] * 6
        ids = features["participant_id"]
        assert np.array_equal(features["age"], table.loc[ids, "age"].to_numpy())


def test_a_batch_of_the_whole_training_set_trains(tmp_path, split_dir):
    # 18 training subjects, train.batch_size 18: one batch per epoch, not a refusal
    settings = tiny_settings(loss={"name": "yaware"},
                             train={"epochs": 1, "batch_size": 18, "embed_epochs": []})
    history = train_encoder(split_dir, settings, **cell_paths(tmp_path))
    assert [row["epoch"] for row in history] == [1]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")
def test_a_non_finite_loss_stops_training_and_names_the_epoch(split_dir, tmp_path,
                                                              monkeypatch):
    import brainage.train

    for value in (math.inf, math.nan):
        monkeypatch.setattr(brainage.train, "run_epoch",
                            lambda *args, epoch, value=value, **kwargs:
                            value if epoch == 2 else 1.0)
        cell = tmp_path / str(value)
        with pytest.raises(FloatingPointError, match=rf"loss is {value} in epoch 2 .*train\.lr"):
            train_encoder(split_dir, tiny_settings(train={"epochs": 3, "batch_size": 9,
                                                          "embed_epochs": []}),
                          **cell_paths(cell))
        assert not (cell / "encoder.pt").exists()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")
def test_an_encoder_with_non_finite_statistics_stops_training_though_the_loss_is_finite(
        split_dir, tmp_path, monkeypatch):
    """A learning rate far too high left batch-norm variances at infinity with a finite
    loss: the job wrote an encoder whose features were 0 for every subject."""
    import brainage.train

    def overflowing(model, *args, epoch, **kwargs):
        if epoch == 2:
            model.state_dict()["encoder.bn1.running_var"][0] = math.inf
        return 1.0

    monkeypatch.setattr(brainage.train, "run_epoch", overflowing)
    with pytest.raises(FloatingPointError, match=r"encoder\.bn1\.running_var of the encoder "
                                                 r"holds NaN or infinity after epoch 2 .*although "
                                                 r"the loss is finite.* train\.lr"):
        train_encoder(split_dir, tiny_settings(train={"epochs": 3, "batch_size": 9,
                                                      "embed_epochs": []}),
                      **cell_paths(tmp_path))
    assert not (tmp_path / "encoder.pt").exists()


def test_fingerprint_covers_the_starting_checkpoints_bytes(split_dir, tmp_path):
    start = tmp_path / "pretrained.pt"
    start.write_bytes(b"pretrained weights")
    settings = resolve_cell(tiny_settings(model={"init_checkpoint": str(start)}))
    split = load_split(split_dir)
    before = fingerprint(settings, split)
    start.write_bytes(b"pretrained weights, trained again")
    assert fingerprint(settings, split) != before


def test_a_cell_with_a_starting_checkpoint_trains_from_its_weights(split_dir, tmp_path):
    # the untrained encoder of seed 1 as model.init_checkpoint of a seed-0 cell: at
    # train.epochs 0 the cell's encoder is that checkpoint; after an epoch at a learning
    # rate too small to move float32 weights, still that checkpoint (not seed 0's start)
    seed_1 = tmp_path / "seed-1"
    train_encoder(split_dir, tiny_settings(seed=1, train={"epochs": 0}), **cell_paths(seed_1))
    start = encoder_weights(seed_1 / "encoder.pt")["encoder.conv1.weight"]
    init = {"init_checkpoint": str(seed_1 / "encoder.pt")}
    untrained = tmp_path / "untrained"
    train_encoder(split_dir, tiny_settings(model=init, train={"epochs": 0}),
                  **cell_paths(untrained))
    assert torch.equal(encoder_weights(untrained / "encoder.pt")["encoder.conv1.weight"], start)
    tiny_step = tmp_path / "tiny-step"
    train_encoder(split_dir, tiny_settings(model=init, loss={"name": "yaware"},
                                           train={"epochs": 1, "batch_size": 9, "lr": 1e-12,
                                                  "embed_epochs": []}),
                  **cell_paths(tiny_step))
    tuned = encoder_weights(tiny_step / "encoder.pt")["encoder.conv1.weight"]
    assert torch.allclose(tuned, start, atol=1e-7)


def test_a_cell_that_trains_nothing_says_when_it_reads_a_head_its_checkpoint_lacks(
        split_dir, tmp_path, caplog):
    """A frozen baseline from a model.init_checkpoint with another head read its features
    through a random head, said only at INFO (a review). The training job records it and
    evaluation, which knows the read-out's model.features, warns where they are the head's
    (a warning in the training job fired for cells reading the encoder too)."""
    from brainage.evaluate import cell_features
    from brainage.io import read_npz

    other_head = tmp_path / "other-head"
    train_encoder(split_dir, tiny_settings(model={"hidden_dim": 16}, train={"epochs": 0}),
                  **cell_paths(other_head))
    init = {"init_checkpoint": str(other_head / "encoder.pt")}
    for name, model in (("frozen", init), ("same-head", {**init, "hidden_dim": 16})):
        train_encoder(split_dir, tiny_settings(model=model, train={"epochs": 0}),
                      **cell_paths(tmp_path / name))
    assert int(read_npz(tmp_path / "frozen" / "features.npz")["random_head"]) == 3
    assert int(read_npz(tmp_path / "same-head" / "features.npz")["random_head"]) == 0
    split = load_split(split_dir)

    def warnings(name, features):
        caplog.clear()
        settings = resolve_cell(tiny_settings(model={**init, "features": features},
                                              train={"epochs": 0}))
        with caplog.at_level(logging.INFO, logger="brainage"):
            cell_features(split, tmp_path / name / "features.npz",
                          {**settings, "experiment": "table3", "variant": "frozen"})
        return [record.getMessage() for record in caplog.records
                if record.levelno >= logging.WARNING]

    [message] = warnings("frozen", "projection")
    assert ("3 head tensor(s) of its model.init_checkpoint did not load" in message
            and "Add model: {features: encoder} to experiments.table3.variants.frozen" in message)
    assert warnings("frozen", "encoder") == []
    assert warnings("same-head", "projection") == []


def test_save_checkpoint_leaves_only_the_new_digest(tmp_path):
    # while the rename is pending the digest file accepts the old checkpoint too; once the
    # new checkpoint is in place, only its own digest verifies
    from brainage.train import read_checkpoint

    path = tmp_path / "checkpoint.pt"
    old = save_checkpoint(path, {"format": 1, "fingerprint": "cell", "epoch": 1})
    new = save_checkpoint(path, {"format": 1, "fingerprint": "cell", "epoch": 2}, replaces=old)
    assert old != new
    assert (tmp_path / "checkpoint.pt.sha256").read_text() == f"{new}  checkpoint.pt\n"
    checkpoint, digest = read_checkpoint(path, "cell")
    assert checkpoint["epoch"] == 2 and digest == new


def test_a_verified_checkpoint_that_fails_to_load_stops_the_job_and_stays(tmp_path,
                                                                         monkeypatch):
    """A checkpoint whose digest matched but whose load failed (a node short of memory) was
    ignored: training began again and its first epoch overwrote the finished ones."""
    from brainage import train

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "fingerprint": "cell", "epoch": 3})
    written = path.read_bytes()

    def short_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(train.torch, "load", short_of_memory)
    with pytest.raises(RuntimeError, match=rf"cannot read the verified training checkpoint "
                                           rf"{re.escape(str(path))} \(RuntimeError: "
                                           rf"DefaultCPUAllocator: not enough memory\)\. Its "
                                           rf"epochs are kept: run the job again with "
                                           rf"more memory \(config key resources\.train\."
                                           rf"mem_mb \(a pretraining run's: pretrain\.<run>\."
                                           rf"resources\.mem_mb\)\) .* delete"):
        train.read_checkpoint(path, "cell")
    # the training job names its own key (it had named "the rule's mem_mb in the config's
    # resources", a key the schema refuses)
    from brainage.config import train_key

    for settings, key in (({"experiment": "pretrain", "variant": "t1w"},
                           "pretrain.t1w.resources.mem_mb"),
                          ({"experiment": "table3", "variant": "adaptive"},
                           "resources.train.mem_mb")):
        assert train_key(settings, "mem_mb", section="resources") == key
        with pytest.raises(RuntimeError, match=rf"more memory \(config key {re.escape(key)}\)"):
            train.read_checkpoint(path, "cell", memory_key=train_key(settings, "mem_mb",
                                                                      section="resources"))
    assert path.read_bytes() == written


def test_run_epoch_returns_the_subject_weighted_mean_loss_over_paired_views():
    # 13 subjects in batches of 6: plan_batches gives 6 + 7. The loss of a batch is its
    # mean age, so the epoch's mean loss, weighted by batch size, is the mean age of the
    # 13; and features [b, V, D] hold in row b every view of the same subject
    from brainage.train import run_epoch

    images = np.arange(13 * 8, dtype=np.float32).reshape(13, 1, 2, 2, 2) + 1
    ages = torch.tensor([20.0] * 6 + [80.0] * 7)
    seen = []

    def loss_fn(features, batch_ages, epoch):
        seen.append((features.detach().clone(), batch_ages.clone()))
        return features.sum() * 0.0 + batch_ages.mean()

    model = _Flatten()
    mean = run_epoch(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0),
                     VolumeStore(images, torch.device("cpu")), Augmenter("none"),
                     np.arange(13), ages, epoch=1, seed=0, batch_size=6, views=3)
    assert mean == pytest.approx(float(ages.mean()))
    assert sorted(len(batch_ages) for _, batch_ages in seen) == [6, 7]
    for features, batch_ages in seen:
        assert features.shape == (len(batch_ages), 3, 8)
        for views in features:  # every view of a row is one subject's (un-augmented) volume
            assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])
            subject = int(views[0, 0]) // 8
            assert float(ages[subject]) in batch_ages.tolist()


def test_the_optimiser_takes_the_configured_rate_and_weight_decay():
    from brainage.train import make_optimizer

    optimizer = make_optimizer(torch.nn.Linear(2, 1), {"lr": 3e-4, "weight_decay": 5e-5})
    assert isinstance(optimizer, torch.optim.Adam)
    assert [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups] == [
        (3e-4, 5e-5)]


def test_a_kernel_wide_for_the_training_ages_is_warned_of_once_naming_loss_sigma(
        caplog, monkeypatch):
    """loss.sigma 2 years on students aged 18-26 (mean pair weight 0.5) or one school year
    (0.98): Exponential and Adaptive Neighborhoods trained encoders barely better than the
    mean age, and nothing said so. A cohort like the paper's (0.08) stays silent, and so do
    the losses a wide kernel leaves as they are."""
    from types import SimpleNamespace

    from brainage import train

    monkeypatch.setattr(train, "_warned_kernels", set())
    rng = np.random.default_rng(0)
    adults, students = rng.uniform(20, 80, 120), rng.uniform(18, 26, 120)
    assert train.mean_kernel_weight(2.0, adults) < 0.1
    assert 0.4 < train.mean_kernel_weight(2.0, students) < 0.6
    assert train.mean_kernel_weight(2.0, np.full(5, 10.0)) == pytest.approx(1.0)
    # over KERNEL_SAMPLE ages: an even sample in age order, close to the exact mean
    many = rng.uniform(18, 26, 3 * train.KERNEL_SAMPLE)
    assert train.mean_kernel_weight(2.0, many) == pytest.approx(
        train.mean_kernel_weight(2.0, many[::3]), abs=0.01)

    elderly = rng.uniform(65, 90, 120)  # 0.19, the demo's cohort 0.15: no warning
    assert 0.15 < train.mean_kernel_weight(2.0, elderly) < 0.25

    def make(name, ages, sigma=2.0, warn=True):
        split = SimpleNamespace(ages=ages, train_index=np.arange(len(ages)))
        return train._make_loss({"name": name, "sigma": sigma}, split, epochs=2,
                                batch_size=32, warn=warn)

    with caplog.at_level(logging.WARNING, logger="brainage.train"):
        make("exponential", adults)
        make("adaptive", elderly)
        make("threshold", students)
        make("simclr", students)
        make("adaptive", students, warn=False)  # a training process other than rank 0
    assert "loss.sigma" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="brainage.train"):
        make("adaptive", students)  # the paper's loss and the demo's
    assert "loss.sigma is 2 years, wide for the training ages" in caplog.text
    with caplog.at_level(logging.WARNING, logger="brainage.train"):
        make("yaware", students)  # the same sigma and ages: a search's trials warn once
    assert caplog.text.count("loss.sigma is 2 years, wide for the training ages") == 1
    assert re.search(r"Set loss\.sigma \(the variant's, or pretrain\.<run>\.loss\.sigma\) to "
                     r"about 0\.2\d? years", caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brainage.train"):
        make("exponential", students, sigma=5.0)  # the paper's ratio, not 5 scaled down
    assert re.search(r"loss\.sigma is 5 years.*to about 0\.2\d? years", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brainage.train"):
        make("exponential", np.full(8, 10.0))  # a split whose training ages are one
    assert "Every training subject of the split has one age: no sigma can tell them apart" \
        in caplog.text
