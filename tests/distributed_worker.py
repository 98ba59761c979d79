"""What the processes of tests/test_distributed.py run under torchrun (not a test module).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py \\
        steps SPLIT_DIR OUT_DIR
        one training step of every case of STEP_CASES from the same initial weights; each
        process saves its loss, gradients, buffers and loss state to OUT_DIR/<case>-rank<r>.pt;
        first, what broadcast_from_main gave it and whether rank 0's file (written late) was
        there after the barrier, to OUT_DIR/collectives-rank<r>.json
    ... tests/distributed_worker.py audited AUDIT_DIR WATCHED_DIR -- <brainage.train arguments>
        python -m brainage.train, recording every file this process creates, writes, renames,
        deletes or makes a folder of under WATCHED_DIR (Python audit events, nothing in the
        product code) into AUDIT_DIR/rank-<r>.json at exit
    ... tests/distributed_worker.py failing EPOCH -- <brainage.train arguments>
        python -m brainage.train in which the last rank (rank 1 of 2; rank 0 of 1) raises at
        the start of epoch EPOCH

:func:`one_step` is also what the test runs in one process for the reference.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path

import torch

from brainage import distributed
from brainage.config import resolve_cell
from brainage.data import Augmenter, VolumeStore, load_split
from brainage.distributed import Processes
from brainage.losses import make_loss
from brainage.models import build_model
from brainage.runtime import runtime_setup, seed_everything
from brainage.train import loss_parameters, make_optimizer, run_epoch

#: name -> (loss section, train section overrides, training subjects in the one batch);
#: 16 subjects: shares of 8 and 8; 15: shares of 8 and 7 (the padded gather).
STEP_CASES = {
    "exponential": ({"name": "exponential"}, {}, 16),
    "adaptive": ({"name": "adaptive", "nn_final": 4, "nn_step": 1}, {}, 16),
    "simclr-noise": ({"name": "simclr"}, {}, 16),  # default augmentation: noise
    "nnclr-noise": ({"name": "nnclr", "queue_size": 32}, {}, 16),
    "rnc-uneven": ({"name": "rnc"}, {}, 15),
    "threshold-cutout-uneven": ({"name": "threshold"},
                                {"augmentation": "cutout", "cutout_size_mm": 36}, 15),
    "supervised-flip": ({"name": "supervised"}, {"augmentation": "flip"}, 16),
}


def step_settings(case: str) -> dict:
    loss, train, _ = STEP_CASES[case]
    model = {"width": 8}
    if loss["name"] == "supervised":
        model.update(head="regression", projection_dim=1)
    return resolve_cell({"seed": 0, "loss": loss, "model": model,
                         "train": {"epochs": 3, "batch_size": 16, "views": 2, "lr": 1e-3,
                                   "device": "cpu", "threads": 2, **train}})


def one_step(case: str, split, processes: Processes, device: torch.device) -> dict:
    """One epoch of one batch (brainage.train.run_epoch) from the seed's initial weights;
    the gradients it leaves are those of that step.

    The network runs in float64 (the loss, after the model's float32 features, does not).
    A ReLU or max-pool gradient jumps where its input crosses a kink, and the 1- and
    2-process forwards differ by their float32 rounding (another order of the batch-norm
    sums): an activation within ~1e-7 of 0 can switch sides. One did (layer2's output,
    -8.5e-7 in float64, +3.6e-7 in float32; Exponential and Adaptive Neighborhoods, whose
    identical views held that voxel twice) and moved gradients by 6 % on an AVX2-only CPU,
    not on AVX-512 ones, whose sums round otherwise.
    Both are valid subgradients, not a defect of the data parallelism; float64 makes such a
    switch 1e9 times less likely, so the comparison is of the data parallelism alone."""
    settings = step_settings(case)
    train, loss_settings = settings["train"], settings["loss"]
    n_subjects = STEP_CASES[case][2]
    rows = split.train_index[:n_subjects]
    seed_everything(settings["seed"])
    model = build_model(settings["model"]).to(device=device, dtype=torch.float64)
    model.register_forward_pre_hook(lambda _, inputs: (inputs[0].double(),))
    network = distributed.data_parallel(model, processes, device)
    optimizer = make_optimizer(model, train)
    ages = split.ages[rows]
    loss_fn = make_loss(loss_settings["name"],
                        **loss_parameters(loss_settings),
                        max_epochs=train["epochs"], batch_size=n_subjects,
                        age_mean=float(ages.mean()), age_sd=float(ages.std()))
    augmenter = Augmenter.from_settings(train, loss_settings["name"],
                                        resolution_mm=split.resolution_mm,
                                        affine=split.stats.get("affine"))
    store = VolumeStore(split.images, device)
    loss = run_epoch(network, loss_fn, optimizer, store, augmenter, rows,
                     torch.tensor(split.ages, dtype=torch.float32), epoch=1, seed=0,
                     batch_size=n_subjects, views=train["views"], processes=processes)
    return {"loss": loss,
            "gradients": {name: parameter.grad.detach().clone()
                          for name, parameter in model.named_parameters()},
            "buffers": {name: buffer.detach().clone() for name, buffer in model.named_buffers()},
            "loss_state": {name: value.detach().clone()
                           for name, value in loss_fn.state_dict().items()}}


def run_steps(split_dir: str, out_dir: str) -> None:
    processes = distributed.processes_from_environment()
    device, _ = runtime_setup(step_settings("exponential")["train"],
                              local_rank=processes.local_rank,
                              processes_on_node=processes.local_world_size)
    distributed.join(processes, device)
    received = distributed.broadcast_from_main(processes, f"from rank {processes.rank}")
    late = Path(out_dir) / "written-late-by-rank-0"
    if processes.is_main:
        time.sleep(0.5)
        late.write_text("")
    distributed.barrier(processes)
    Path(out_dir, f"collectives-rank{processes.rank}.json").write_text(
        json.dumps({"broadcast": received, "after_barrier": late.exists()}))
    split = load_split(split_dir)
    for case in STEP_CASES:
        result = one_step(case, split, processes, device)
        torch.save(result, Path(out_dir) / f"{case}-rank{processes.rank}.pt")
    distributed.leave()


def _writes(event: str, args: tuple) -> list[str]:
    """The paths an audit event creates, changes or deletes ([] for reads)."""
    if event == "open":
        path, mode, flags = args
        writing = (any(letter in (mode or "") for letter in "wax+")
                   or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)))
        return [path] if writing and isinstance(path, (str, bytes, os.PathLike)) else []
    if event == "os.rename":
        return [args[0], args[1]]
    if event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.truncate"):
        return [args[0]] if isinstance(args[0], (str, bytes, os.PathLike)) else []
    return []


def run_audited(audit_dir: str, watched_dir: str, arguments: list[str]) -> int:
    watched = os.path.realpath(watched_dir)
    events: list[list[str]] = []

    def hook(event: str, args: tuple) -> None:
        for path in _writes(event, args):
            path = os.fsdecode(path)
            if os.path.realpath(path).startswith(watched + os.sep):
                events.append([event, path])

    def save() -> None:
        rank = os.environ.get("RANK", "0")
        Path(audit_dir, f"rank-{rank}.json").write_text(json.dumps(events))

    atexit.register(save)
    sys.addaudithook(hook)
    from brainage.train import main

    return main(arguments)


def run_failing(epoch: int, arguments: list[str]) -> int:
    import brainage.train

    processes = distributed.processes_from_environment()
    if processes.rank == processes.world_size - 1:
        real_run_epoch = brainage.train.run_epoch

        def failing_run_epoch(*args, **kwargs):
            if kwargs["epoch"] == epoch:
                raise RuntimeError(f"rank {processes.rank} fails on purpose in epoch {epoch}")
            return real_run_epoch(*args, **kwargs)

        brainage.train.run_epoch = failing_run_epoch
    return brainage.train.main(arguments)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "steps":
        run_steps(*rest)
    elif command == "audited":
        raise SystemExit(run_audited(rest[0], rest[1], rest[3:]))
    elif command == "failing":
        raise SystemExit(run_failing(int(rest[0]), rest[2:]))
    else:
        raise SystemExit(f"unknown command {command!r}")
