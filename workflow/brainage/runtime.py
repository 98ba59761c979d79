"""Where and how a training, evaluation or prediction job computes: threads, device,
numeric precision and seeding.

Every job that runs the network (train_encoder, which also writes the features the
read-out is fitted on, the random search, a bundle applied to a new cohort) calls
:func:`runtime_setup` with the cell's ``train`` section, so the same settings mean the same
numerics everywhere. This module sits below :mod:`brainage.models`, :mod:`brainage.train`,
:mod:`brainage.search` and :mod:`brainage.apply`; it imports none of them.
"""

from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from typing import Iterator, Mapping

import numpy as np
import torch

from brainage.config import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bf16")
#: The first CUDA compute capability with bf16 arithmetic (Ampere, e.g. the A100). Older
#: cards (the V100: 7.0) run bf16 autocast through emulation, slower than float32.
BF16_COMPUTE_CAPABILITY = (8, 0)


def given_gpus() -> str | None:
    """The GPUs the scheduler gave this job (``CUDA_VISIBLE_DEVICES``, which SLURM sets for
    ``--gpus``), if any."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return visible if visible and visible not in ("-1", "NoDevFiles") else None


def select_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU (with a warning where the job was given
    GPUs that PyTorch cannot use); ``cuda`` without a GPU is an error."""
    if name not in DEVICES:
        raise ConfigError(f"config key train.device is {name!r}; expected auto, cpu or cuda.")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if given_gpus() and torch.version.cuda is None:  # the driver is not to blame
            log.warning("this job was given GPU(s) %s (CUDA_VISIBLE_DEVICES), but PyTorch %s "
                        "is a CPU-only build, so it computes on the CPU. Install a CUDA build "
                        "of torch where the job runs (envs/, README), or set train.device: "
                        "cuda to stop instead.", given_gpus(), torch.__version__)
        elif given_gpus():
            # e.g. PyPI's torch wheel built for CUDA 13 on a node whose driver is older than
            # that needs, or on a V100: the job would hold its GPUs and train on the CPU
            log.warning("this job was given GPU(s) %s (CUDA_VISIBLE_DEVICES), but PyTorch %s "
                        "(built for CUDA %s) cannot use them, so it computes on the CPU: the "
                        "NVIDIA driver may be older than this build needs, or the GPU older "
                        "than it supports. Install a torch build for this node, or set "
                        "train.device: cuda to stop instead.", given_gpus(), torch.__version__,
                        torch.version.cuda or "none")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key train.device is 'cuda' but PyTorch sees no CUDA device. "
                          "Use train.device: auto or cpu, or run on a GPU node.")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether CUDA ``device`` computes in bf16 natively (compute capability 8.0 or more).
    ``precision: auto`` trains in float32 elsewhere, and says so."""
    capability = torch.cuda.get_device_capability(device)
    if capability >= BF16_COMPUTE_CAPABILITY:
        return True
    log.info("%s (compute capability %d.%d) has no bf16 arithmetic: train.precision auto "
             "trains in float32 there", torch.cuda.get_device_name(device), *capability)
    return False


def runtime_setup(train_settings: Mapping, *, local_rank: int | None = None,
                  processes_on_node: int = 1) -> tuple[torch.device, torch.dtype | None]:
    """Threads, device and numeric precision of a job, from a resolved ``train`` section.

    Returns the device and the autocast dtype (bf16 on CUDA under ``precision: auto``;
    None = float32). On CUDA, ``train.deterministic`` chooses between cuDNN's fastest
    algorithms (benchmark mode) and bitwise-repeatable ones.

    One of several training processes (:mod:`brainage.distributed`) passes its
    ``local_rank``, the GPU it uses on its node, and ``processes_on_node``, among which
    the node's ``train.threads`` are divided (at least one each), so that P processes
    together use the CPU threads one would.
    """
    threads = max(1, int(train_settings["threads"]) // processes_on_node)
    torch.set_num_threads(threads)
    device = select_device(train_settings["device"])
    if device.type == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"training process {local_rank} of this node needs GPU "
                              f"{local_rank}, but PyTorch sees {torch.cuda.device_count()} "
                              f"GPU(s). Start torchrun with --nproc_per_node at most "
                              f"{torch.cuda.device_count()}.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    precision = train_settings["precision"]
    if precision not in PRECISIONS:
        raise ConfigError(f"config key train.precision is {precision!r}; expected auto, "
                          f"float32 or bf16.")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda"
                                       and native_bf16(device))
    # oneDNN 3.12 (PyTorch 2.13's CPU backend) is wrong for bf16 3D convolutions on AVX-512
    # CPUs: a forward pass with an innermost output size of 1 and stride > 1 returns errors
    # larger than the output (pytorch/pytorch#169688), and the backward pass returns
    # non-finite weight gradients in about a third of identical repeats (layer2/layer4 of a
    # ResNet-18 at 6 mm; tests/test_train.py). CPU bf16 therefore runs on PyTorch's
    # reference kernels: it exists to test the GPU path's code, not for speed.
    torch.backends.mkldnn.enabled = not (use_bf16 and device.type == "cpu")
    # CPU runs are repeatable without it (train.deterministic is a CUDA option)
    deterministic = device.type == "cuda" and bool(train_settings["deterministic"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        # TF32 matrix products for the bf16 precisions only; train.precision float32 keeps
        # PyTorch's defaults (TF32 in cuDNN convolutions, none in matrix products), as the
        # authors trained: TF32 products there made the linear layers and the losses
        # 10-bit-mantissa products under a setting documented as float32.
        torch.backends.cuda.matmul.allow_tf32 = precision != "float32"
        torch.backends.cudnn.allow_tf32 = True
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways and on every device: a process that runs several jobs (the tests, the
    # random search, a notebook) must not keep the slower algorithms of an earlier
    # deterministic one, a CPU job after a deterministic CUDA one included. Only when it
    # changes something: PyTorch 2.13's setter imports TorchInductor, 1-1.5 s of a job that
    # takes no optimiser step (a prediction, an export, an untrained cell; an optimiser
    # imports it when it is built).
    if deterministic or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return device, (torch.bfloat16 if use_bf16 else None)


@contextmanager
def full_float32() -> Iterator[None]:
    """float32 products and convolutions inside: autocast off (CPU and CUDA), so an
    enclosing ``torch.autocast`` cannot turn them into bf16, and no TF32 (CUDA).

    :func:`runtime_setup` lets CUDA round float32 inputs to TF32's 10 mantissa bits for
    speed in training, and training steps run under bf16 autocast. Read-out features are
    computed in full float32 instead, on every device: a bundle applied on a CPU then
    reproduces what its read-out was fitted on.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (initialisation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """Independent 63-bit seeds per (cell seed, epoch, stream): a resumed run draws the
    same batches and augmentations without storing generator state."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain data, so a
    checkpoint holding them loads with ``weights_only=True``."""
    numpy_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                       "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                       "cached_gaussian": float(numpy_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Undo :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        # a run resumed on a node with fewer GPUs restores the ones it has
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
