"""Training throughput: our loop against a plain loop with the same model, same machine, same run.

Ours (brainage.train.run_epoch): batches gathered in one read from a memory-mapped (CPU) or
device-resident (CUDA) array, augmentations as whole-batch tensor ops on the device, fused
Adam, bf16 autocast + channels-last on CUDA, one host sync per epoch, no evaluation during
training.

Plain (as the public reference code): float32, a Dataset that returns one subject at a time
with per-sample transforms (two noisy views) collated by a DataLoader on the CPU, for-loop
Adam, ``loss.item()`` every step, and a Ridge read-out (GridSearchCV over 5 alphas, 5-fold)
on freshly embedded training and test images after every epoch.

CPU-ms/volume (process CPU time of the training part per volume) is reported too: with
``--threads 1`` it measures the work itself and hardly moves when other jobs share the
machine, unlike wall-clock volumes/s.

Both train the same network with the same loss (Adaptive Neighborhoods), batch, views and
noise augmentation. Reported per volume shape: training volumes/s (forward + backward + step,
two views per subject), the epoch time with what each loop does per epoch (ours: checkpoint;
plain: Ridge evaluation), and the ratios. Then seconds per epoch of one real grid cell
(brainage.train.fit_encoder with checkpoints and embeddings).

    PYTHONPATH=workflow .venv/bin/python tests/benchmarks/bench_train.py            # CPU demo
    PYTHONPATH=workflow .venv/bin/python tests/benchmarks/bench_train.py --shapes 2mm --device cuda
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for split_fixture

from brainage.config import resolve_cell  # noqa: E402
from brainage.data import Augmenter, VolumeStore, load_split  # noqa: E402
from brainage.losses import make_loss  # noqa: E402
from brainage.models import build_model  # noqa: E402
from brainage.runtime import runtime_setup  # noqa: E402
from brainage.train import (  # noqa: E402
    _snapshot,
    fit_encoder,
    loss_parameters,
    make_optimizer,
    run_epoch,
    save_checkpoint,
)
from split_fixture import tiny_settings, write_split  # noqa: E402

SHAPES = {
    "6mm": (33, 39, 32),        # the 99x117x95 MNI 2 mm grid block-averaged by 3
    "6mm-brain": (17, 20, 16),  # the size the lead quoted for the demo
    "4mm": (50, 59, 48),
    "2mm": (99, 117, 95),
}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", default="6mm-brain,6mm,4mm",
                        help=f"comma-separated names ({', '.join(SHAPES)}) or XxYxZ")
    parser.add_argument("--subjects", type=int, default=32, help="training subjects")
    parser.add_argument("--test-subjects", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cell-epochs", type=int, default=3,
                        help="epochs of the real grid cell (0 = skip; else at least 2, "
                        "as Adaptive Neighborhoods' schedule needs)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "float32"),
                        help="train.precision of our loop (auto: bf16 on CUDA, float32 on "
                        "the CPU; float32 is config/paper.yaml's, as the authors trained)")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--no-mkldnn", action="store_true",
                        help="CPU: oneDNN off (PyTorch's own conv3d kernels), for comparison")
    arguments = parser.parse_args()
    if arguments.cell_epochs == 1:
        parser.error("--cell-epochs must be 0 (skip) or at least 2: the cell trains "
                     "Adaptive Neighborhoods with nn_step 1, which needs epochs // nn_step >= 2")
    return arguments


def settings_for(arguments) -> dict:
    return resolve_cell(tiny_settings(
        loss={"name": "adaptive", "nn_final": max(2, arguments.batch // 2), "nn_step": 1},
        train={"epochs": max(2, arguments.epochs + 1), "batch_size": arguments.batch,
               "views": arguments.views, "lr": 1e-4, "device": arguments.device,
               "threads": arguments.threads, "augmentation": "noise", "embed_epochs": [],
               "precision": arguments.precision}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_ours(split, settings, arguments):
    """One epoch of our loop (+ its checkpoint) per call; returns (train s, checkpoint s)."""
    device, autocast_dtype = runtime_setup(settings["train"])
    channels_last = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(settings["model"]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    loss_fn = make_loss("adaptive", **loss_parameters(settings["loss"]),
                        max_epochs=settings["train"]["epochs"], batch_size=arguments.batch)
    optimizer = make_optimizer(model, settings["train"])
    store = VolumeStore(split.images, device)
    augmenter = Augmenter.from_settings(settings["train"], "adaptive",
                                        resolution_mm=split.resolution_mm)
    ages = torch.tensor(split.ages, dtype=torch.float32, device=device)
    folder = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, folder, True)

    def epoch(number: int) -> tuple[float, float, float]:
        sync(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        run_epoch(model, loss_fn, optimizer, store, augmenter, split.train_index, ages,
                  epoch=number, seed=0, batch_size=arguments.batch, views=arguments.views,
                  autocast_dtype=autocast_dtype, channels_last=channels_last)
        sync(device)
        trained, cpu_seconds = time.perf_counter(), time.process_time() - cpu_started
        save_checkpoint(Path(folder) / "checkpoint.pt",
                        _snapshot({"model": model.state_dict(),
                                   "optimizer": optimizer.state_dict()}))
        return trained - started, time.perf_counter() - trained, cpu_seconds

    return epoch


class PlainDataset(torch.utils.data.Dataset):
    """One subject per item, two noisy views made on the CPU (the reference's pattern)."""

    def __init__(self, images, ages, rows, views, noise_std, augment=True):
        self.images, self.ages, self.rows = images, ages, rows
        self.views, self.noise_std, self.augment = views, noise_std, augment

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        volume = torch.tensor(np.asarray(self.images[self.rows[index]]), dtype=torch.float32)
        if not self.augment:
            return volume, float(self.ages[self.rows[index]])
        views = [volume + torch.randn(volume.size()) * self.noise_std for _ in range(self.views)]
        return views, float(self.ages[self.rows[index]])


def setup_plain(split, settings, arguments):
    """One epoch of the plain loop (+ its Ridge evaluation) per call."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    device = torch.device(arguments.device)
    torch.manual_seed(0)
    model = build_model(settings["model"]).to(device)
    loss_fn = make_loss("adaptive", **loss_parameters(settings["loss"]),
                        max_epochs=settings["train"]["epochs"], batch_size=arguments.batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-5)
    noise = settings["train"]["noise_std"]
    train_loader = torch.utils.data.DataLoader(
        PlainDataset(split.images, split.ages, split.train_index, arguments.views, noise),
        batch_size=arguments.batch, shuffle=True)
    score_loaders = [torch.utils.data.DataLoader(
        PlainDataset(split.images, split.ages, rows, 1, noise, augment=False),
        batch_size=arguments.batch) for rows in (split.train_index, split.eval_index)]

    def epoch(number: int) -> tuple[float, float, float]:
        sync(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        model.train()
        for views, ages in train_loader:
            images = torch.cat(views).to(device)  # [V x B, C, X, Y, Z]
            projected = model(images)
            features = torch.stack(torch.split(projected, len(ages)), dim=1)
            loss = loss_fn(features, ages.float().to(device), number)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
        sync(device)
        trained, cpu_seconds = time.perf_counter(), time.process_time() - cpu_started
        model.eval()
        embedded = []
        with torch.no_grad():
            for loader in score_loaders:
                feats, targets = [], []
                for images, ages in loader:
                    feats.append(model(images.to(device)).cpu())
                    targets.append(ages)
                embedded.append((torch.cat(feats).numpy(), torch.cat(targets).numpy()))
        search = GridSearchCV(Ridge(), {"alpha": 10.0 ** np.arange(-2, 3)}, cv=5, scoring="r2",
                              n_jobs=os.cpu_count())
        with warnings.catch_warnings():  # r2 of tiny folds at small --subjects
            warnings.simplefilter("ignore")
            search.fit(*embedded[0])
        np.mean(np.abs(search.predict(embedded[1][0]) - embedded[1][1]))
        return trained - started, time.perf_counter() - trained, cpu_seconds

    return epoch


def bench_cell(split_dir: Path, settings, arguments) -> dict:
    cell = dict(settings)
    cell["train"] = {**settings["train"], "epochs": arguments.cell_epochs, "embed_epochs": [1],
                     "augmentation": "default"}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        history = fit_encoder(load_split(split_dir), cell, encoder_path=Path(folder) / "e.pt",
                              checkpoint_path=Path(folder) / "c.pt",
                              history_path=Path(folder) / "h.tsv",
                              embeddings_dir=Path(folder) / "emb")
        total = time.perf_counter() - started
    later = [row["seconds"] for row in history[1:]] or [history[0]["seconds"]]
    return {"first_epoch_s": history[0]["seconds"], "epoch_s": statistics.median(later),
            "total_s": total}


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    if arguments.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    names = [name.strip() for name in arguments.shapes.split(",") if name.strip()]
    print(f"torch {torch.__version__}, device {arguments.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if arguments.device == 'cuda' else ''}, "
          f"precision {arguments.precision}, threads {arguments.threads}, "
          f"oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"{arguments.subjects} training subjects, batch {arguments.batch} x "
          f"{arguments.views} views, {arguments.epochs} timed epochs after 1 warm-up")
    settings = settings_for(arguments)
    for name in names:
        shape = SHAPES.get(name) or tuple(int(size) for size in name.split("x"))
        with tempfile.TemporaryDirectory() as folder:
            split_dir = write_split(Path(folder), n_subjects=arguments.subjects +
                                    arguments.test_subjects, n_test=arguments.test_subjects,
                                    shape=shape, resolution_mm=6)
            split = load_split(split_dir)
            loops = {"ours": setup_ours(split, settings, arguments)}
            if not arguments.skip_plain:
                loops["plain"] = setup_plain(split, settings, arguments)
            # Alternate the loops epoch by epoch so that a change of machine load hits both;
            # epoch 1 of each warms up allocators and kernels and is not counted.
            timings = {name: [] for name in loops}
            for number in range(1, arguments.epochs + 2):
                for loop, epoch in loops.items():
                    measured = epoch(number)
                    if number > 1:
                        timings[loop].append(measured)
            volumes = arguments.views * len(split.train_index)
            result = {}
            for loop, rows in timings.items():
                train_s = statistics.median(row[0] for row in rows)
                extra_s = statistics.median(row[1] for row in rows)
                cpu_s = statistics.median(row[2] for row in rows)
                result[loop] = {"train_s": train_s, "extra_s": extra_s,
                                "epoch_s": train_s + extra_s,
                                "volumes_per_s": volumes / train_s,
                                "cpu_ms_per_volume": 1000 * cpu_s / volumes}
            ours = result["ours"]
            line = (f"{name} {'x'.join(map(str, shape))}: ours "
                    f"{ours['volumes_per_s']:.1f} volumes/s ({ours['train_s']:.2f} s train + "
                    f"{ours['extra_s']:.2f} s checkpoint per epoch, "
                    f"{ours['cpu_ms_per_volume']:.0f} CPU-ms/volume)")
            if "plain" in result:
                plain = result["plain"]
                line += (f"; plain {plain['volumes_per_s']:.1f} volumes/s ({plain['train_s']:.2f}"
                         f" s train + {plain['extra_s']:.2f} s Ridge per epoch, "
                         f"{plain['cpu_ms_per_volume']:.0f} CPU-ms/volume); ratio train "
                         f"{ours['volumes_per_s'] / plain['volumes_per_s']:.2f}x, epoch "
                         f"{plain['epoch_s'] / ours['epoch_s']:.2f}x, CPU time "
                         f"{plain['cpu_ms_per_volume'] / ours['cpu_ms_per_volume']:.2f}x")
            print(line, flush=True)
            if arguments.cell_epochs:
                cell = bench_cell(split_dir, settings, arguments)
                print(f"  grid cell ({arguments.subjects} training subjects, "
                      f"{arguments.cell_epochs} epochs, embeddings at epoch 1, checkpoints): "
                      f"epoch 1 {cell['first_epoch_s']:.1f} s, later epochs "
                      f"{cell['epoch_s']:.1f} s, total {cell['total_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
