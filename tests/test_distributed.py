"""Data-parallel training (brainage.distributed) with real torch.distributed: gloo, two
CPU processes started by torchrun (tests/distributed_worker.py is what they run).

A step's loss and gradients do not depend on how many processes share the batch; a
two-process training killed from outside resumes to the same weights, with two processes
or with one; only rank 0 writes; a failing process stops the others. Then the pieces
that need no process group: shares, augmentation draws, the environment, batch norm."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pytest
import torch

from brainage.config import ConfigError
from brainage.data import Augmenter, load_split
from brainage.distributed import (
    SINGLE_PROCESS,
    DistributedError,
    GlobalBatchNorm,
    Processes,
    augment_share,
    check_shares,
    gather_shares,
    processes_from_environment,
)
from brainage.train import read_settings, train_encoder
from distributed_worker import STEP_CASES, one_step
from split_fixture import tiny_settings, write_split

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
#: torchrun, as the module it is an entry point of (the venv's scripts need not be on PATH)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
#: No test waits longer for a torchrun job; a hang fails the test instead of the suite.
JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this PyTorch build has no torch.distributed")


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    """16 training subjects of 16x16x16 voxels."""
    return write_split(tmp_path_factory.mktemp("dataset"), n_subjects=20, n_test=4,
                       shape=(16, 16, 16))


def torchrun(processes: int, *arguments, timeout: float = JOB_TIMEOUT_S
             ) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--nproc_per_node", str(processes), *map(str, arguments)],
                          env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


# -- one step: one process and two processes --------------------------------------------------

@pytest.fixture(scope="module")
def two_process_steps(split_dir, tmp_path_factory) -> Path:
    """Every case of STEP_CASES trained one step by two processes (one launch)."""
    out = tmp_path_factory.mktemp("steps")
    job = torchrun(2, WORKER, "steps", split_dir, out)
    assert job.returncode == 0, job.stdout[-3000:]
    return out


def assert_close(actual: dict, expected: dict, what: str, tolerance: float = 1e-6) -> None:
    """Each tensor within ``tolerance`` of its own largest value: sums in another order
    (the batch-norm statistics, DDP's all-reduce) of a float64 network (one_step: 1e-13
    measured) whose features the loss takes in float32 (a feature one float32 step apart:
    about 1e-7)."""
    assert actual.keys() == expected.keys(), what
    for name, reference in expected.items():
        reference, value = reference.double(), actual[name].double()
        scale = float(reference.abs().max()) if reference.numel() else 0.0
        error = float((value - reference).abs().max()) if reference.numel() else 0.0
        assert error <= tolerance * scale + 1e-12, f"{what} {name}: off by {error:.3g} of {scale:.3g}"


@pytest.mark.parametrize("case", STEP_CASES)
def test_a_step_does_not_depend_on_the_process_count(case, split_dir, two_process_steps):
    """2 processes x 8 subjects (or 8 + 7) against 1 process x 16 (15) from the same
    weights: the same loss, gradients of every parameter, batch-norm running statistics
    and loss state (the NNCLR queue), in both processes. Fails without the gradient of
    the gathered features (half the gradient), without global batch norm (other
    statistics, other loss) or with global batch norm in float32 for this float64
    network (gradients 7e-6 apart)."""
    reference = one_step(case, load_split(split_dir), SINGLE_PROCESS, torch.device("cpu"))
    for rank in (0, 1):
        shared = torch.load(two_process_steps / f"{case}-rank{rank}.pt", weights_only=True)
        assert shared["loss"] == pytest.approx(reference["loss"], rel=1e-6), rank
        assert_close(shared["gradients"], reference["gradients"], f"rank {rank} gradient of")
        assert_close(shared["buffers"], reference["buffers"], f"rank {rank} buffer")
        assert_close(shared["loss_state"], reference["loss_state"], f"rank {rank} loss state")


def test_rank_0_decides_and_the_barrier_waits_for_it(two_process_steps):
    """broadcast_from_main gives every process rank 0's value (not its own), and a
    process leaves the barrier only after rank 0 reached it (its file, written half a
    second late, is there)."""
    for rank in (0, 1):
        assert json.loads((two_process_steps / f"collectives-rank{rank}.json").read_text()) == \
            {"broadcast": "from rank 0", "after_barrier": True}, rank


# -- training through the command line ----------------------------------------------------------

#: NNCLR: state across batches and epochs (its queue) and noise augmentation.
SETTINGS = tiny_settings(loss={"name": "nnclr", "queue_size": 16},
                         train={"epochs": 5, "batch_size": 8, "threads": 2,
                                "embed_epochs": [1, 5]})


def train_arguments(split_dir: Path, cell: Path) -> list[str]:
    """``python -m brainage.train``'s arguments for a cell folder (settings written there)."""
    cell.mkdir(parents=True, exist_ok=True)
    settings = cell.parent / f"{cell.name}-settings.json"
    settings.write_text(json.dumps(SETTINGS))
    return ["--split-dir", str(split_dir), "--settings", str(settings),
            "--encoder", str(cell / "encoder.pt"), "--history", str(cell / "history.tsv"),
            "--embeddings", str(cell / "embeddings"), "--features", str(cell / "features.npz"),
            "--checkpoint", str(cell / "checkpoint.pt")]


def launch_command(gpus: int, arguments: Sequence[str]) -> list[str]:
    """The command rule pretrain_encoder runs (brainage.launch: torchrun for several GPUs,
    one process each on the CPU here)."""
    return [sys.executable, "-m", "brainage.launch", "--gpus", str(gpus), "--", *arguments]


def encoder_weights(cell: Path) -> dict:
    return torch.load(cell / "encoder.pt", map_location="cpu", weights_only=True)["model"]


def history_losses(cell: Path) -> list[float]:
    return pd.read_csv(cell / "history.tsv", sep="\t")["loss"].tolist()


@pytest.fixture(scope="module")
def two_process_run(split_dir, tmp_path_factory):
    """An uninterrupted two-process training, each process's writes under the cell
    folder recorded (Python audit events)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cell, audit = root / "cell", root / "audit"
    audit.mkdir()
    arguments = train_arguments(split_dir, cell)
    job = torchrun(2, WORKER, "audited", audit, cell, "--", *arguments)
    assert job.returncode == 0, job.stdout[-3000:]
    return cell, audit


def test_only_rank_0_writes(two_process_run):
    cell, audit = two_process_run
    written = {Path(path).name for _, path in json.loads((audit / "rank-0.json").read_text())}
    assert json.loads((audit / "rank-1.json").read_text()) == []
    assert {"encoder.pt", "features.npz", "history.tsv", "checkpoint.pt", "checkpoint.pt.sha256",
            "epoch-001.npz", "epoch-005.npz"} <= written
    assert len(history_losses(cell)) == 5 and np.isfinite(history_losses(cell)).all()
    assert not (cell / "checkpoint.pt").exists()
    with np.load(cell / "features.npz") as features:
        assert features["projection"].shape == (20, 128)


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process below it at once, as a preemption would:
    torchrun starts each worker in a session of its own, so a process-group kill misses
    them."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grown = {root}, True
    while grown:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= below
        grown = bool(below)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def killed_run(split_dir, tmp_path_factory) -> Path:
    """A two-process training (the production command line) killed from outside as soon
    as its first checkpoint is on disk; returns the cell folder with the checkpoint."""
    if not sys.platform.startswith("linux"):
        pytest.skip("kill_tree reads /proc")
    cell = tmp_path_factory.mktemp("killed") / "cell"
    command = launch_command(2, [*train_arguments(split_dir, cell), "--log",
                                 str(cell.parent / "killed.log")])
    job = subprocess.Popen(command, env=ENVIRONMENT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (cell / "checkpoint.pt").exists():
        if job.poll() is not None or time.monotonic() > deadline:
            kill_tree(job.pid)
            pytest.fail(f"training ended before its first checkpoint:\n{job.communicate()[0]}")
        time.sleep(0.005)
    kill_tree(job.pid)
    job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL
    assert not (cell / "encoder.pt").exists()
    return cell


def resumable_copy(killed: Path, folder: Path) -> Path:
    """The killed cell's checkpoint in a new cell folder (each resume deletes its own)."""
    folder.mkdir(parents=True)
    for name in ("checkpoint.pt", "checkpoint.pt.sha256"):
        shutil.copy2(killed / name, folder / name)
    return folder


def test_killed_two_process_run_resumes_with_two_processes(split_dir, killed_run,
                                                           two_process_run, tmp_path):
    """Same weights bit for bit and the same history as the run never interrupted."""
    done = torch.load(killed_run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < 5
    cell = resumable_copy(killed_run, tmp_path / "cell")
    log = tmp_path / "pretrain_encoder.log"  # the rule's --log: torchrun took it for its own
    job = subprocess.run(launch_command(2, [*train_arguments(split_dir, cell), "--log", str(log)]),
                         env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0, job.stdout[-3000:]
    assert f"resuming from {cell / 'checkpoint.pt'} after epoch {done}" in log.read_text()
    uninterrupted, _ = two_process_run
    assert history_losses(cell) == history_losses(uninterrupted)
    expected = encoder_weights(uninterrupted)
    different = [key for key, value in encoder_weights(cell).items()
                 if not torch.equal(value, expected[key])]
    assert not different, different[:5]
    for epoch in ("epoch-001.npz", "epoch-005.npz"):  # epoch 1 from the checkpoint
        with np.load(cell / "embeddings" / epoch) as a, \
                np.load(uninterrupted / "embeddings" / epoch) as b:
            assert np.array_equal(a["features"], b["features"])


def test_killed_two_process_run_resumes_in_one_process(split_dir, killed_run, two_process_run,
                                                       tmp_path):
    """The checkpoint holds nothing per process: one process continues it where the
    two processes stopped. Its first epoch agrees with theirs up to float rounding (sums
    in another order); later ones drift apart as rounding differences grow (NNCLR's
    nearest neighbours are a discrete choice), so the test stops there."""
    done = torch.load(killed_run / "checkpoint.pt", weights_only=True)["epoch"]
    cell = resumable_copy(killed_run, tmp_path / "cell")
    job = subprocess.run([sys.executable, "-m", "brainage.train",
                          *train_arguments(split_dir, cell)], env=ENVIRONMENT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0, job.stdout[-3000:]
    assert f"resuming from {cell / 'checkpoint.pt'} after epoch {done}" in job.stdout
    uninterrupted, _ = two_process_run
    resumed, expected = history_losses(cell), history_losses(uninterrupted)
    assert len(resumed) == 5 and np.isfinite(resumed).all()
    assert resumed[:done] == expected[:done]  # from the checkpoint
    assert resumed[done] == pytest.approx(expected[done], rel=1e-5)
    assert encoder_weights(cell).keys() == encoder_weights(uninterrupted).keys()


@pytest.mark.slow
def test_an_untrained_encoder_started_with_two_processes(split_dir, tmp_path):
    """train.epochs 0 (allowed for a pretraining run, whose gpus may be several): rank 0
    writes the seed's initial encoder while the other process waits at the barrier. The
    processes used to skip joining the process group for 0 epochs, so the barrier raised
    'Default process group has not been initialized' and the job failed."""
    cell = tmp_path / "cell"
    arguments = train_arguments(split_dir, cell)
    settings = Path(arguments[arguments.index("--settings") + 1])
    settings.write_text(json.dumps({**SETTINGS, "train": {**SETTINGS["train"], "epochs": 0}}))
    job = torchrun(2, "-m", "brainage.train", *arguments)
    assert job.returncode == 0, job.stdout[-3000:]
    assert (cell / "encoder.pt").is_file() and (cell / "features.npz").is_file()
    assert history_losses(cell) == []


@pytest.mark.slow
def test_a_failing_process_stops_the_others(split_dir, tmp_path):
    """Rank 1 raises in epoch 3: the job ends (instead of rank 0 waiting in a collective
    for half an hour), names the error, and leaves a checkpoint to resume from (epoch 2's
    may have been cut short; epoch 1's was complete before epoch 2's began)."""
    cell = tmp_path / "cell"
    job = torchrun(2, WORKER, "failing", 3, "--", *train_arguments(split_dir, cell))
    assert job.returncode != 0
    assert "rank 1 fails on purpose in epoch 3" in job.stdout
    assert not (cell / "encoder.pt").exists()
    assert torch.load(cell / "checkpoint.pt", weights_only=True)["epoch"] in (1, 2)


# -- without a process group ---------------------------------------------------------------------

def test_shares_are_contiguous_and_cover_the_batch():
    for world_size, batch in ((2, 16), (2, 15), (3, 8), (4, 4)):
        shares = [Processes(rank=rank, world_size=world_size).share(batch)
                  for rank in range(world_size)]
        assert shares[0].start == 0 and shares[-1].stop == batch
        assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
        sizes = [share.stop - share.start for share in shares]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert SINGLE_PROCESS.share(7) == slice(0, 7)
    # the first batch % world_size processes take one subject more
    assert Processes(rank=0, world_size=3).share_sizes(8) == (3, 3, 2)


@pytest.mark.parametrize("kind", ["noise", "cutout", "rotation", "flip"])
def test_each_subject_draws_the_same_augmentation_in_any_share(kind):
    """The shares of 1, 2 or 3 processes, each augmented twice (two views) from the
    same seed, put together: exactly the batch augmented by one process."""
    volumes = torch.randn(7, 1, 12, 14, 10)
    augmenter = Augmenter(kind, cutout_voxels=(4, 4, 4), rotation_degrees=15.0)

    def views(processes: Processes) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        share = volumes[processes.share(len(volumes))]
        return [augment_share(augmenter, share, generator, processes=processes,
                              batch=len(volumes)) for _ in range(2)]

    expected = views(SINGLE_PROCESS)
    assert not torch.equal(expected[0], expected[1])
    for world_size in (2, 3):
        parts = [views(Processes(rank=rank, world_size=world_size))
                 for rank in range(world_size)]
        for view in range(2):
            assert torch.equal(torch.cat([part[view] for part in parts]), expected[view])


def test_the_environment_torchrun_sets():
    assert processes_from_environment({}) == SINGLE_PROCESS
    assert processes_from_environment({"WORLD_SIZE": "1", "RANK": "0"}) == SINGLE_PROCESS
    environment = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert processes_from_environment(environment) == Processes(3, 4, 1, 2)
    with pytest.raises(DistributedError, match="RANK is 'x'.*torchrun"):
        processes_from_environment({**environment, "RANK": "x"})
    with pytest.raises(DistributedError, match="MASTER_PORT"):
        processes_from_environment({**environment, "MASTER_PORT": ""})
    with pytest.raises(DistributedError, match="RANK 4, WORLD_SIZE 4"):
        processes_from_environment({**environment, "RANK": "4"})


@pytest.mark.parametrize("changed", [{"RANK": "-1"}, {"LOCAL_RANK": "-1"},
                                     {"LOCAL_RANK": "2"}, {"LOCAL_WORLD_SIZE": "8"}])
def test_torchrun_variables_out_of_range_are_refused(changed):
    """A negative rank, a local rank beyond its node's processes, or more processes on a
    node than in the job: not what torchrun sets, so refused before any process group."""
    environment = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    with pytest.raises(DistributedError, match="inconsistent torchrun variables"):
        processes_from_environment({**environment, **changed})


def test_a_missing_rendezvous_address_is_named():
    environment = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_PORT": "29500"}
    with pytest.raises(DistributedError, match="MASTER_ADDR unset while WORLD_SIZE is 2"):
        processes_from_environment(environment)
    with pytest.raises(DistributedError, match="MASTER_ADDR, MASTER_PORT unset"):
        processes_from_environment({**environment, "MASTER_PORT": ""})


def test_gathering_a_share_of_the_wrong_size_is_refused_before_any_collective():
    """Rank 1 of 2 in a batch of 15 holds 7 rows: 8 (a wrong share) is refused with the
    sizes named, without a process group (the check comes before the all-gather)."""
    with pytest.raises(ValueError, match="process 1 holds 8 rows of a batch of 15, whose "
                                         "share for it is 7"):
        gather_shares(torch.zeros(8, 2, 3), Processes(rank=1, world_size=2), 15)
    single = torch.zeros(8, 2, 3)
    assert gather_shares(single, SINGLE_PROCESS, 8) is single


def test_joining_as_another_process_than_the_group_knows_is_refused(tmp_path):
    """A process already in a group (here one of a single gloo process) that would train
    as rank 1 of 2: refused with both places named, never trained in the wrong group."""
    import torch.distributed as dist

    from brainage.distributed import join

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(DistributedError, match="a process group of 1 processes as rank 0, "
                                                   "but trains as rank 1 of 2"):
            join(Processes(rank=1, world_size=2), torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_every_process_needs_a_subject_of_every_batch():
    check_shares(17, 8, Processes(0, 2))  # batches of 8 and 9
    check_shares(18, 8, Processes(0, 2))  # a last batch of 2: one subject for each process
    with pytest.raises(ConfigError, match="train.batch_size is 8: .* last batch .* 2 subjects, "
                                          "fewer than the 3 processes"):
        check_shares(18, 8, Processes(0, 3))  # batches of 8, 8 and 2


def test_the_planned_smallest_batch_is_that_of_the_batches_training_draws():
    """The planning check counts without PyTorch (split_data.smallest_batch); it must agree
    with plan_batches, which training draws from (a single leftover joins a batch)."""
    from brainage.data import plan_batches
    from brainage.split_data import smallest_batch

    for n_train in range(1, 60):
        for batch_size in range(1, n_train + 1):
            drawn = plan_batches(n_train, batch_size, np.random.default_rng(0))
            assert smallest_batch(n_train, batch_size) == min(map(len, drawn)), (n_train,
                                                                                 batch_size)


def test_too_small_a_last_batch_names_the_pretraining_runs_key(split_dir, tmp_path):
    """Several processes train pretraining runs, whose batch is pretrain.<run>.train.
    batch_size (never the top-level train.batch_size, which the message used to name)."""
    settings = tiny_settings(experiment="pretrain", variant="t1",
                             train={"epochs": 1, "batch_size": 7})  # 16 = 7 + 7 + 2
    paths = {"encoder_path": tmp_path / "encoder.pt", "history_path": tmp_path / "history.tsv",
             "embeddings_dir": tmp_path / "embeddings",
             "checkpoint_path": tmp_path / "checkpoint.pt"}
    with pytest.raises(ConfigError, match=r"config key pretrain\.t1\.train\.batch_size is 7: "
                                          r".* fewer than the 3 processes"):
        train_encoder(split_dir, settings, **paths, processes=Processes(0, 3, 0, 3))


def test_global_batch_norm_keeps_parameters_and_keys():
    """Swapped in place: the same parameter tensors (an optimiser built before still
    trains them), the same state-dict keys (checkpoints load into the plain network), and
    without a process group it is nn.BatchNorm3d."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
    parameters = [id(parameter) for parameter in plain.parameters()]
    converted = GlobalBatchNorm.convert(plain)
    assert isinstance(converted[1], GlobalBatchNorm)
    assert [id(parameter) for parameter in converted.parameters()] == parameters
    reference = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
    reference.load_state_dict(converted.state_dict())
    volumes = torch.randn(3, 1, 6, 6, 6)
    assert torch.equal(converted(volumes), reference(volumes))
    assert torch.equal(converted[1].running_var, reference[1].running_var)


def test_global_batch_norm_keeps_eps_momentum_and_mode():
    """A layer's own eps and momentum (not the defaults) and its mode: a network put in
    evaluation mode before the swap still normalises with its running statistics."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3),
                                torch.nn.BatchNorm3d(4, eps=0.5, momentum=0.3))
    reference = copy.deepcopy(plain)
    converted = GlobalBatchNorm.convert(plain)
    volumes = torch.randn(3, 1, 6, 6, 6)
    assert torch.equal(converted(volumes), reference(volumes))  # training: eps
    assert torch.equal(converted[1].running_mean, reference[1].running_mean)  # momentum
    assert torch.equal(converted[1].running_var, reference[1].running_var)

    evaluated = copy.deepcopy(reference).eval()
    converted = GlobalBatchNorm.convert(copy.deepcopy(evaluated))
    assert not converted[1].training
    assert torch.equal(converted(volumes), evaluated(volumes))
    assert torch.equal(converted[1].running_mean, evaluated[1].running_mean)


def test_settings_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"settings file {tmp_path / 'missing.json'} does not"):
        read_settings(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{seed: 0")
    with pytest.raises(ConfigError, match=f"settings file {broken} is not valid JSON"):
        read_settings(broken)
