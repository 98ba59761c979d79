"""Pretraining throughput with 1 and 2 data-parallel processes (brainage.distributed).

Each count is one torchrun job (``torchrun --standalone --nproc_per_node N`` running this
script as the worker) that trains the paper's network (ResNet-18 width 64 + projection
head, Adaptive Neighborhoods, noise augmentation) with brainage.train.run_epoch on a
synthetic split: one warm-up epoch, then timed epochs. ``train.batch_size`` is the global
batch, so every count trains the same batches; on the CPU the processes divide
``--threads`` among them, as a training job does. Reported: volumes/s (both views
counted: views x subjects per second of training), seconds per step, the speed-up over
the first count, and CPU-ms per volume summed over the processes (process CPU time, which
moves little when other jobs share the machine, unlike wall-clock volumes/s). Prints the
CPU model, its AVX2/AVX-512 flags and the PyTorch version (and the GPU's name with
``--device cuda``). Numbers only: nothing here asserts a time.

    PYTHONPATH=workflow .venv/bin/python tests/benchmarks/bench_pretrain.py        # CPU, 6 mm
    PYTHONPATH=workflow .venv/bin/python tests/benchmarks/bench_pretrain.py --device cuda
        # 1 GPU at 2 mm (99x117x95), bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for split_fixture

from brainage import distributed  # noqa: E402
from brainage.config import resolve_cell  # noqa: E402
from brainage.data import Augmenter, VolumeStore, load_split  # noqa: E402
from brainage.losses import make_loss  # noqa: E402
from brainage.models import build_model  # noqa: E402
from brainage.runtime import runtime_setup, seed_everything  # noqa: E402
from brainage.train import loss_parameters, make_optimizer, run_epoch  # noqa: E402
from split_fixture import write_split  # noqa: E402

SHAPES = {
    "6mm": (33, 39, 32),  # the 99x117x95 MNI 2 mm grid block-averaged by 3
    "4mm": (50, 59, 48),
    "2mm": (99, 117, 95),
}


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", default=None,
                        help=f"{', '.join(SHAPES)} or XxYxZ (default: 6mm on the CPU, 2mm on CUDA)")
    parser.add_argument("--processes", default=None,
                        help="comma-separated process counts (default: 1,2 on the CPU, 1 on CUDA)")
    parser.add_argument("--subjects", type=int, default=None,
                        help="training subjects (default: 32 on the CPU, 256 on CUDA)")
    parser.add_argument("--batch", type=int, default=16, help="global batch (subjects)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--width", type=int, default=64, help="model.width (paper: 64)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="train.threads: CPU threads of the job, divided among its processes")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # split folder
    arguments = parser.parse_args(argv)
    cuda = arguments.device == "cuda"
    arguments.shape = arguments.shape or ("2mm" if cuda else "6mm")
    arguments.processes = arguments.processes or ("1" if cuda else "1,2")
    arguments.subjects = arguments.subjects or (256 if cuda else 32)
    return arguments


def volume_shape(name: str) -> tuple[int, int, int]:
    return SHAPES[name] if name in SHAPES else tuple(int(size) for size in name.split("x"))


def settings_for(arguments) -> dict:
    return resolve_cell({
        "seed": 0, "model": {"width": arguments.width},
        "loss": {"name": "adaptive", "nn_final": max(2, arguments.batch // 2), "nn_step": 1},
        "train": {"epochs": arguments.epochs + 1, "batch_size": arguments.batch,
                  "views": arguments.views, "lr": 1e-4, "device": arguments.device,
                  "threads": arguments.threads, "augmentation": "noise",
                  "embed_epochs": []}})


def machine() -> list[str]:
    """CPU model and vector flags (lscpu), PyTorch and, on CUDA, the GPU."""
    model, flags = platform.processor() or "unknown", set()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    lines = [f"CPU: {model}, {os.cpu_count()} logical CPUs visible, "
             f"avx2 {'yes' if 'avx2' in flags else 'no'}, "
             f"avx512f {'yes' if 'avx512f' in flags else 'no'}",
             f"torch {torch.__version__}, {platform.python_implementation()} "
             f"{platform.python_version()}"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    return lines


def work(arguments) -> None:
    """One process of a torchrun job: warm-up, timed epochs; rank 0 prints a JSON line."""
    processes = distributed.processes_from_environment()
    settings = settings_for(arguments)
    train = settings["train"]
    device, autocast_dtype = runtime_setup(train, local_rank=processes.local_rank,
                                           processes_on_node=processes.local_world_size)
    distributed.join(processes, device)
    split = load_split(arguments.worker)
    seed_everything(0)
    model = build_model(settings["model"]).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    network = distributed.data_parallel(model, processes, device)
    optimizer = make_optimizer(model, train)
    loss_fn = make_loss("adaptive", **loss_parameters(settings["loss"]),
                        max_epochs=train["epochs"], batch_size=arguments.batch).to(device)
    augmenter = Augmenter.from_settings(train, "adaptive", resolution_mm=split.resolution_mm)
    store = VolumeStore(split.images, device)
    ages = torch.tensor(split.ages, dtype=torch.float32, device=device)
    seconds, cpu_seconds = [], 0.0
    for epoch in range(1, arguments.epochs + 2):
        distributed.barrier(processes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = run_epoch(network, loss_fn, optimizer, store, augmenter, split.train_index, ages,
                         epoch=epoch, seed=0, batch_size=arguments.batch, views=arguments.views,
                         autocast_dtype=autocast_dtype, channels_last=channels_last,
                         processes=processes)
        seconds.append(time.perf_counter() - started)  # run_epoch ends with a host sync
        if epoch > 1:
            cpu_seconds += time.process_time() - cpu_started
    # CPU time of all processes: hardly moves when other jobs share the machine
    cpu_seconds = torch.tensor([cpu_seconds], dtype=torch.float64, device=device)
    if processes.is_distributed:
        torch.distributed.all_reduce(cpu_seconds)
    if processes.is_main:
        timed = seconds[1:]
        volumes = arguments.views * len(split.train_index) * len(timed)
        steps = int(np.ceil(len(split.train_index) / arguments.batch))
        print(json.dumps({"processes": processes.world_size, "threads": torch.get_num_threads(),
                          "epoch_s": timed, "steps_per_epoch": steps, "loss": loss,
                          "volumes_per_s": volumes / sum(timed),
                          "cpu_ms_per_volume": 1000 * float(cpu_seconds) / volumes}), flush=True)
    distributed.leave()


def main() -> None:
    arguments = parse_arguments()
    if arguments.worker:
        work(arguments)
        return
    for line in machine():
        print(line)
    shape = volume_shape(arguments.shape)
    folder = Path(tempfile.mkdtemp())
    try:
        split_dir = write_split(folder, n_subjects=arguments.subjects + 4, n_test=4, shape=shape,
                                resolution_mm=2 if arguments.shape == "2mm" else 6)
        print(f"pretraining step: ResNet-18 width {arguments.width}, Adaptive Neighborhoods, "
              f"{arguments.subjects} subjects of {'x'.join(map(str, shape))} voxels, global "
              f"batch {arguments.batch} x {arguments.views} views, noise augmentation, "
              f"{arguments.device}, {arguments.threads} threads per job, "
              f"{arguments.epochs} timed epochs after 1 warm-up")
        environment = {**os.environ,
                       "PYTHONPATH": os.pathsep.join(filter(None, [
                           str(Path(__file__).resolve().parents[2] / "workflow"),
                           os.environ.get("PYTHONPATH")]))}
        results = []
        for count in [int(count) for count in arguments.processes.split(",")]:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", str(count), __file__, *sys.argv[1:],
                       "--worker", str(split_dir)]
            job = subprocess.run(command, env=environment, capture_output=True, text=True)
            lines = [line for line in job.stdout.splitlines() if line.startswith("{")]
            if job.returncode != 0 or not lines:
                print(f"{count} process(es) failed:\n{job.stdout[-2000:]}{job.stderr[-4000:]}")
                continue
            result = json.loads(lines[-1])
            results.append(result)
            first = results[0]["volumes_per_s"]
            step_s = np.mean(result["epoch_s"]) / result["steps_per_epoch"]
            print(f"{result['processes']} process(es) x {result['threads']} thread(s): "
                  f"{result['volumes_per_s']:.2f} volumes/s, {step_s:.2f} s/step, "
                  f"epochs {', '.join(f'{value:.1f}' for value in result['epoch_s'])} s, "
                  f"speed-up {result['volumes_per_s'] / first:.2f}, "
                  f"{result['cpu_ms_per_volume']:.0f} CPU-ms/volume (all processes), "
                  f"last loss {result['loss']:.4f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
