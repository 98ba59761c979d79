"""The GPU path on a GPU: every loss trains in bf16 on CUDA with finite losses, a CUDA
encoder embeds as the same weights do on the CPU, ``train.deterministic`` makes CUDA
runs repeat bit for bit, and a torchrun job on the GPU that fails mid-run resumes from
its checkpoint to the weights of the run never interrupted.

CI has no GPU, so these are skipped there; a machine with one runs them with the GPU
benchmarks (``tests/benchmarks/gpu_checks.sh``). ``BRAINAGE_TEST_DEVICE=cpu``
runs the same checks on the CPU (bf16 through PyTorch's reference kernels there,
brainage.runtime), which is how the checks themselves were tested without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainage.config import resolve_cell
from brainage.data import VolumeStore, load_split
from brainage.models import embed_all, load_encoder
from brainage.train import train_encoder
from split_fixture import cell_paths, encoder_weights, tiny_settings, write_split

#: Where the checks run: ``cuda`` (default), or ``cpu`` to test the checks themselves.
DEVICE = os.environ.get("BRAINAGE_TEST_DEVICE", "cuda")
# cuBLAS reads this when its first handle is made: a training job sets it in runtime_setup
# before any CUDA work, but here the tests before the deterministic one already made one.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device (BRAINAGE_TEST_DEVICE=cpu runs these checks on "
                              "the CPU)"),
]

#: Every loss of brainage.losses with the settings it needs on the tiny split.
LOSS_SETTINGS = {
    "simclr": {"loss": {"name": "simclr"}},
    "nnclr": {"loss": {"name": "nnclr", "queue_size": 16}},
    "rnc": {"loss": {"name": "rnc"}},
    "yaware": {"loss": {"name": "yaware"}},
    "threshold": {"loss": {"name": "threshold"}},
    "exponential": {"loss": {"name": "exponential"}},
    "adaptive": {"loss": {"name": "adaptive"}},
    "supervised": {"loss": {"name": "supervised"},
                   "model": {"head": "regression", "projection_dim": 1},
                   "train": {"views": 1}},
}


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("dataset"), n_subjects=24, n_test=6)


def on_device(name: str, **train) -> dict:
    """Tiny cell settings for loss ``name`` on :data:`DEVICE`, 2 epochs."""
    overrides = LOSS_SETTINGS[name]
    # the paper's network (width 64), whose numerics on the GPU are the point here
    return tiny_settings(**{**overrides, "train": {
        **overrides.get("train", {}), "device": DEVICE, "epochs": 2, "embed_epochs": [],
        **train}, "model": {"width": 64, **overrides.get("model", {})}})


def cpu_features(encoder_path, settings: dict, split_dir) -> dict:
    """float32 CPU features of every split subject from the saved encoder, in the row
    order of ``features.npz`` (training rows, then evaluation rows)."""
    split = load_split(split_dir)
    model = load_encoder(encoder_path, resolve_cell(settings)["model"])
    store = VolumeStore(split.images, torch.device("cpu"))
    return embed_all(model, store, np.concatenate([split.train_index, split.eval_index]))


@pytest.mark.parametrize("name", list(LOSS_SETTINGS))
def test_every_loss_trains_in_bf16_with_finite_losses(split_dir, tmp_path, name):
    settings = on_device(name, precision="bf16")
    history = train_encoder(split_dir, settings, **cell_paths(tmp_path))
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(np.isfinite(row["loss"]) for row in history), history
    weights = encoder_weights(tmp_path / "encoder.pt")
    assert all(torch.isfinite(tensor.float()).all() for tensor in weights.values()
               if tensor.is_floating_point())
    # trained in bf16, the read-out's features are still full float32 (embed_all): the
    # CPU's features of the same weights, to float32 rounding
    with np.load(tmp_path / "features.npz") as saved:
        features = saved["projection"]
    reference = cpu_features(tmp_path / "encoder.pt", settings, split_dir)["projection"]
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features, reference, rtol=0,
                               atol=2e-4 * np.abs(reference).max())


def test_float32_features_on_the_gpu_equal_the_cpus(split_dir, tmp_path):
    # training may use TF32 (brainage.runtime), the features do not (runtime.full_float32):
    # the GPU's and the CPU's differ by float32 rounding in different summation orders
    settings = on_device("adaptive", precision="float32")
    train_encoder(split_dir, settings, **cell_paths(tmp_path))
    reference = cpu_features(tmp_path / "encoder.pt", settings, split_dir)
    with np.load(tmp_path / "features.npz") as saved:
        for kind in ("encoder", "projection"):
            scale = np.abs(reference[kind]).max()
            np.testing.assert_allclose(saved[kind], reference[kind], rtol=0,
                                       atol=2e-4 * scale, err_msg=kind)


def test_deterministic_runs_repeat_bit_for_bit(split_dir, tmp_path):
    settings = on_device("adaptive", deterministic=True)  # bf16 on CUDA (precision auto)
    first = train_encoder(split_dir, settings, **cell_paths(tmp_path / "first"))
    second = train_encoder(split_dir, settings, **cell_paths(tmp_path / "second"))
    assert [row["loss"] for row in first] == [row["loss"] for row in second]
    a, b = (encoder_weights(tmp_path / run / "encoder.pt") for run in ("first", "second"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def torchrun_training(split_dir, settings: dict, cell: Path, *worker) -> subprocess.CompletedProcess:
    """``python -m brainage.train`` for ``cell`` under torchrun, one process, as a GPU
    training job runs (``worker``: tests/distributed_worker.py and its command instead)."""
    cell.mkdir(parents=True, exist_ok=True)
    (cell / "settings.json").write_text(json.dumps(settings))
    paths = cell_paths(cell)
    arguments = ["--split-dir", split_dir, "--settings", cell / "settings.json",
                 "--encoder", paths["encoder_path"], "--history", paths["history_path"],
                 "--embeddings", paths["embeddings_dir"], "--features", paths["features_path"],
                 "--checkpoint", paths["checkpoint_path"]]
    entry = [*worker, "--"] if worker else ["-m", "brainage.train"]
    repo = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(repo / "workflow"), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "1", *map(str, entry + arguments)],
                              env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired as error:  # what the job printed says where it stood
        output = error.output.decode() if isinstance(error.output, bytes) else error.output
        pytest.fail(f"torchrun job still running after {error.timeout} s:\n{(output or '')[-3000:]}")


def test_a_failed_torchrun_job_resumes_to_the_uninterrupted_weights(split_dir, tmp_path):
    """The production launch on one GPU (torchrun, one process: no process group, as
    NCCL takes one process per GPU), deterministic kernels. The run that fails at the
    start of epoch 3 leaves epoch 2's checkpoint (the CUDA generator state in it);
    resumed, it ends with the history and weights of the run never interrupted, bit for
    bit. Adaptive Neighborhoods: its schedule depends on the epoch, so a resume that
    restarted the schedule would show."""
    settings = on_device("adaptive", deterministic=True, epochs=4, embed_epochs=[1, 4])
    done = torchrun_training(split_dir, settings, tmp_path / "uninterrupted")
    assert done.returncode == 0, done.stdout[-3000:]

    cell = tmp_path / "resumed"
    worker = Path(__file__).with_name("distributed_worker.py")
    failed = torchrun_training(split_dir, settings, cell, worker, "failing", 3)
    assert failed.returncode != 0
    assert "rank 0 fails on purpose in epoch 3" in failed.stdout
    resumed = torchrun_training(split_dir, settings, cell)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "after epoch 2" in resumed.stdout, resumed.stdout[-3000:]

    def losses(folder: Path) -> list[float]:
        return pd.read_csv(folder / "history.tsv", sep="\t")["loss"].tolist()

    assert losses(cell) == losses(tmp_path / "uninterrupted")
    expected = encoder_weights(tmp_path / "uninterrupted" / "encoder.pt")
    weights = encoder_weights(cell / "encoder.pt")
    different = [key for key in expected if not torch.equal(weights[key], expected[key])]
    assert not different, different[:5]
