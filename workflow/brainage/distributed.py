"""Data-parallel training over several processes (PyTorch DistributedDataParallel, DDP),
started by ``torchrun``; one process without torchrun is the plain path, untouched.

What a step computes does not depend on how many processes share it: a global batch of
B subjects, split into contiguous shares, gives the loss and the gradients of the same
batch trained by one process (to float rounding, which can move a ReLU input lying within
rounding of 0 to the kink's other side: docs/method.md §4). Four pieces make that so.

Batches. Every process draws the same global batches (:func:`brainage.data.plan_batches`
with the generator seeded by (seed, epoch)) and takes its contiguous share
(:meth:`Processes.share`): it reads and forwards only its share's volumes.

Augmentations (:func:`augment_share`). Each process draws the random numbers of the
whole global batch from the shared generator and keeps its share's, so a subject gets
the noise, box, angle or flip it gets in one process, whatever the process count. Our
augmentations draw by the batch's shape only, never by its values, so the share is
augmented inside a zero batch of the global shape; the cost, the augmentation's
arithmetic on B instead of B / P volumes, is well under 1% of a ResNet-18 step.

Batch norm (:func:`global_batch_norm`). One process forwards all views of a batch as one
stack [V*B, C, X, Y, Z], so its batch-norm statistics cover V*B rows; under DDP each
process holds V*B/P of them. The batch-norm layers are swapped for ones whose training
statistics (and their gradients) cover every process's rows: ``torch.nn.SyncBatchNorm``
on GPUs, :class:`GlobalBatchNorm` elsewhere (SyncBatchNorm refuses CPU tensors in
PyTorch 2.13: "SyncBatchNorm expected input tensor to be on GPU"). Both update the
running statistics from the global mean and the unbiased global variance, as
``nn.BatchNorm3d`` does for the whole batch, and keep its state-dict keys, so
checkpoints and encoder.pt load into the plain network.

Loss and gradients (:func:`gather_shares`). The contrastive losses compare every row
with every other row of the batch, so each process gathers the features of all shares
([B, V, D], in batch order) and computes the loss of the whole batch, the same value in
every process. The gather keeps the gradient: its backward sums the gradient with respect
to each share over the processes, so process p receives d(sum_q L_q)/d(share p) =
P dL/d(share p), every L_q being the same L. DDP then averages the parameter gradients
over the P processes: (1/P) sum_p P dL/dtheta|_p = dL/dtheta, the gradient of the one-process
batch. SyncBatchNorm and GlobalBatchNorm follow the same convention (their backward
sums over processes), which is why the two compose.

Loss states (the NNCLR queue, Adaptive Neighborhoods' schedule) stay identical in every
process because every process computes the loss on the same gathered features; the
batch-norm running statistics too, as every process updates them from the same global
statistics.

Files. Only the main process (rank 0) writes (checkpoint, encoder.pt, history.tsv,
embeddings, features.npz); the others wait at a barrier. The checkpoint holds no
per-process state, so a killed job resumes with any number of processes.

Failures. A process that raises exits; torchrun then stops the other processes of its
node, and on the CPU the others' next collective fails at once (their peer closed its
connections). A peer that vanishes without a trace (a node lost) ends every collective
after :data:`COLLECTIVE_TIMEOUT` with PyTorch's timeout error, never later.

Launching, one node with 4 GPUs (or 4 CPU processes; ``train.threads`` is divided among
the processes of a node)::

    torchrun --standalone --nproc_per_node 4 -m brainage.train \\
        --split-dir results/dataset/holdout --settings settings.json \\
        --encoder encoder.pt --history history.tsv --embeddings embeddings \\
        --features features.npz --checkpoint checkpoint.pt --log-file job.log

(A log file is given as ``--log-file``: torchrun reads abbreviations across the whole
line, and ``--log`` is a prefix of its own ``--log-dir``; brainage.launch rewrites the
rule's ``--log``.)

Several nodes under SLURM: one torchrun per node, all meeting at a c10d rendezvous on
the first node of the allocation (``--kill-on-bad-exit`` ends every node's processes
when one fails)::

    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    port=$((29500 + SLURM_JOB_ID % 2000))  # one run per allocation; brainage.launch
                                           # gives each run its own id and port
    srun --nodes "$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 \\
         --cpus-per-task "$SLURM_CPUS_PER_TASK" \\
        torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node 4 \\
                 --rdzv_backend c10d --rdzv_endpoint "$head:$port" --rdzv_id "$SLURM_JOB_ID" \\
                 -m brainage.train --split-dir ... (as above)

``train.batch_size`` is the global batch (all processes together), so the same settings
train the same network with any number of processes.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from brainage.data import Augmenter
from brainage.split_data import check_batch_shares

log = logging.getLogger(__name__)

#: How long a process waits in a collective operation (a gradient all-reduce, a barrier)
#: before giving up. Longer than the longest legitimate wait, rank 0 alone embedding
#: every subject of the split and writing features.npz and encoder.pt (about a minute
#: for 4,000 volumes at 2 mm on a GPU), yet a lost peer stops the job within half an hour
#: instead of holding its GPUs until the time limit.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

class DistributedError(RuntimeError):
    """The torchrun environment or the process group is not usable; the message says
    which variable or process and what to do."""


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the training processes.

    Attributes
    ----------
    rank
        This process's number among all processes, 0 to world_size - 1; rank 0 writes
        the files.
    world_size
        Number of processes sharing each batch (P).
    local_rank
        Number among the processes of this node: the GPU this process uses.
    local_world_size
        Processes on this node, which share its CPU threads.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the outputs (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def share_sizes(self, batch: int) -> tuple[int, ...]:
        """Subjects of a batch of ``batch`` each process takes, in rank order: equal
        shares, the first ``batch % world_size`` processes one more."""
        base, extra = divmod(batch, self.world_size)
        return tuple(base + (rank < extra) for rank in range(self.world_size))

    def share(self, batch: int) -> slice:
        """This process's contiguous share of the rows of a global batch of ``batch``."""
        sizes = self.share_sizes(batch)
        start = sum(sizes[:self.rank])
        return slice(start, start + sizes[self.rank])


SINGLE_PROCESS = Processes()


def _integer_variable(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(
            f"environment variable {name} is {value!r}; torchrun sets it to an integer in "
            f"every process it starts. Start the training with torchrun (brainage."
            f"distributed), or unset WORLD_SIZE to train in one process.") from None


def processes_from_environment(environ: Mapping[str, str] | None = None) -> Processes:
    """This process's place from the variables torchrun sets in every process it starts
    (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``).

    Without ``WORLD_SIZE``, or with ``WORLD_SIZE`` 1, the training runs in one process
    (:data:`SINGLE_PROCESS`), exactly as without torchrun.

    Raises
    ------
    DistributedError
        A variable missing, not an integer, or out of range (named).
    """
    environ = os.environ if environ is None else environ
    if environ.get("WORLD_SIZE") in (None, "", "1"):
        return SINGLE_PROCESS
    world_size = _integer_variable(environ, "WORLD_SIZE")
    rank = _integer_variable(environ, "RANK")
    local_rank = _integer_variable(environ, "LOCAL_RANK")
    local_world_size = _integer_variable(environ, "LOCAL_WORLD_SIZE")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise DistributedError(f"environment variable(s) {', '.join(missing)} unset while "
                               f"WORLD_SIZE is {world_size}; torchrun sets them. Start the "
                               f"training with torchrun.")
    if not (0 <= rank < world_size and 0 <= local_rank < local_world_size <= world_size):
        raise DistributedError(
            f"inconsistent torchrun variables RANK {rank}, WORLD_SIZE {world_size}, "
            f"LOCAL_RANK {local_rank}, LOCAL_WORLD_SIZE {local_world_size}: expected "
            f"0 <= RANK < WORLD_SIZE and 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE.")
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank,
                     local_world_size=local_world_size)


# -- the process group ----------------------------------------------------------------------

def join(processes: Processes, device: torch.device) -> None:
    """Join the process group of ``processes`` (NCCL for a GPU, gloo for the CPU) unless
    this process has already joined it; nothing for one process.

    Raises
    ------
    DistributedError
        This process already belongs to a group of another size or rank.
    """
    if not processes.is_distributed:
        return
    if dist.is_initialized():
        if (dist.get_world_size(), dist.get_rank()) != (processes.world_size, processes.rank):
            raise DistributedError(
                f"this process already belongs to a process group of {dist.get_world_size()} "
                f"processes as rank {dist.get_rank()}, but trains as rank {processes.rank} of "
                f"{processes.world_size}.")
        return
    cuda = device.type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://",
                            rank=processes.rank, world_size=processes.world_size,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if cuda else None)
    log.info("process %d of %d (local %d of %d) joined the %s process group on %s",
             processes.rank, processes.world_size, processes.local_rank,
             processes.local_world_size, dist.get_backend(), device)


def leave() -> None:
    """Leave the process group (after a successful training; a failed process just exits)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    """Wait until every process gets here (others wait while rank 0 writes)."""
    if processes.is_distributed:
        dist.barrier()


def broadcast_from_main(processes: Processes, value):
    """Rank 0's ``value`` (any picklable object) in every process, so that decisions taken
    on rank 0 (resume or not, a non-finite loss) are taken everywhere alike."""
    if not processes.is_distributed:
        return value
    holder = [value if processes.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def check_shares(n_train: int, batch_size: int, processes: Processes, *,
                 key: str = "train.batch_size") -> None:
    """Every process must get at least one subject of every batch (a ResNet cannot
    forward an empty batch): :func:`brainage.split_data.check_batch_shares`, which the
    workflow also runs while it plans a pretraining run whose cohort it knows.

    Raises
    ------
    ConfigError
        Naming ``key``, the config key that sets the batch (a pretraining run's is
        ``pretrain.<run>.train.batch_size``), the smallest batch of an epoch and the
        process count.
    """
    if processes.is_distributed:
        check_batch_shares(n_train, batch_size, processes.world_size, key=key)


# -- the model ------------------------------------------------------------------------------

def data_parallel(model: nn.Module, processes: Processes, device: torch.device) -> nn.Module:
    """The network to train: ``model`` itself for one process; otherwise ``model`` with
    global batch norm (:func:`global_batch_norm`, in place) wrapped in
    DistributedDataParallel, which averages the gradients over the processes.

    ``model`` keeps its parameters and state-dict keys: save and embed with ``model``, train
    with what this returns. DDP's broadcast of rank 0's buffers before every forward pass
    is kept although the running statistics are updated identically everywhere (from
    global statistics): a few kB per step.
    """
    if not processes.is_distributed:
        return model
    global_batch_norm(model, device)
    cuda = device.type == "cuda"
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                               gradient_as_bucket_view=True)


def global_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Swap every batch-norm layer of ``model`` (in place) for one over the global batch:
    ``torch.nn.SyncBatchNorm`` on a GPU, :class:`GlobalBatchNorm` elsewhere. Parameters
    and buffers are the same tensors, so an optimiser built before still holds them."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlobalBatchNorm.convert(model)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the rows of every process.

    In training mode, inside a process group of more than one process, the per-channel
    mean and (biased) variance are those of the union of all processes' inputs, and so
    are their gradients (:class:`_GlobalBatchNormFunction`); the running mean and the
    running (unbiased) variance are updated from them exactly as ``nn.BatchNorm3d`` would
    for the whole batch. Otherwise (evaluation, one process) it is ``nn.BatchNorm*d``.
    Any input [N, C, ...] with N >= 0 rows per process.

    Costs one all-gather of 2C + 1 numbers per layer forward and one all-reduce of 2C
    backward; saves only its input for the backward pass, like ``nn.BatchNorm3d``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input [N, C, ...] of at least 2 dimensions; got "
                             f"{input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        tracked = self.track_running_stats and self.running_mean is not None
        if tracked:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        return _GlobalBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if tracked else None,
            self.running_var if tracked else None, self.eps, momentum)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every ``nn.BatchNorm*d`` (not SyncBatchNorm) replaced, sharing
        its parameters and buffers; changed in place below the top (like
        ``nn.SyncBatchNorm.convert_sync_batchnorm``)."""
        converted = module
        if (isinstance(module, nn.modules.batchnorm._BatchNorm)
                and not isinstance(module, (cls, nn.SyncBatchNorm))):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert(child))
        return converted


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of the processes' inputs; the backward pass is that of
    the sum of all processes' losses, the convention DDP's averaging expects (module
    docstring), and the one of ``SyncBatchNorm``."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum):
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        # bf16/fp16 in float32, so low-precision activations never reach a variance;
        # float64 stays float64, as nn.BatchNorm3d keeps it
        values = input.to(torch.promote_types(input.dtype, torch.float32))
        count = values.numel() // channels if channels else 0
        if count:
            variance, mean = torch.var_mean(values, dim=dims, correction=0)
        else:
            variance = mean = values.new_zeros(channels)
        # per process: count, mean, sum of squared deviations; float64, as the count of a
        # layer's values (rows x voxels) passes float32's exact integers (2^24) at 2 mm
        local = torch.cat([torch.full((1,), count, dtype=torch.float64, device=values.device),
                           mean.double(), variance.double() * count])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        gathered = torch.stack(parts)
        counts, means, squares = gathered[:, :1], gathered[:, 1:1 + channels], gathered[:, 1 + channels:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        global_squares = (squares + counts * (means - global_mean).square()).sum(0)
        global_variance = global_squares / total
        if running_mean is not None:
            with torch.no_grad():
                unbiased = global_squares / (total - 1).clamp_min(1)
                running_mean.mul_(1 - momentum).add_(global_mean.to(running_mean.dtype),
                                                     alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype),
                                                    alpha=momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        mean = global_mean.to(values.dtype).view(shape)
        inverse_sd = torch.rsqrt(global_variance.to(values.dtype) + eps).view(shape)
        output = (values - mean) * inverse_sd
        if weight is not None:
            output = (output * weight.to(values.dtype).view(shape)
                      + bias.to(values.dtype).view(shape))
        ctx.save_for_backward(input, weight, mean, inverse_sd)
        ctx.total = float(total)
        return output.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, inverse_sd = ctx.saved_tensors
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        shape = [1, channels] + [1] * (input.dim() - 2)
        upstream = grad_output.to(mean.dtype)
        normalised = (input.to(mean.dtype) - mean) * inverse_sd
        sum_upstream = upstream.sum(dims)
        sum_upstream_normalised = (upstream * normalised).sum(dims)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # the statistics depend on every process's rows: sum the two reductions over
            # the processes (a collective every process joins, as each needs input grads)
            combined = torch.cat([sum_upstream, sum_upstream_normalised])
            dist.all_reduce(combined)
            global_upstream, global_upstream_normalised = combined.split(channels)
            scale = inverse_sd if weight is None else inverse_sd * weight.to(mean.dtype).view(shape)
            grad_input = (upstream - global_upstream.view(shape) / ctx.total
                          - normalised * global_upstream_normalised.view(shape) / ctx.total)
            grad_input = (grad_input * scale).to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_upstream_normalised.to(weight.dtype)  # this process's rows;
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_upstream.to(weight.dtype)  # DDP averages over the processes
        return grad_input, grad_weight, grad_bias, None, None, None, None


# -- batches --------------------------------------------------------------------------------

def augment_share(augmenter: Augmenter, volumes: torch.Tensor, generator: torch.Generator, *,
                  processes: Processes, batch: int) -> torch.Tensor:
    """This process's share ``volumes`` [b, C, X, Y, Z] of a global batch of ``batch``
    subjects, augmented with the random draws the whole batch gets in one process.

    The augmentations draw by the batch's shape only (module docstring), so augmenting
    the share inside a zero batch of the global shape and keeping the share draws exactly
    what one process draws for these subjects, and leaves ``generator`` where one process
    leaves it (the next view draws alike too).
    """
    if not processes.is_distributed:
        return augmenter(volumes, generator)
    if augmenter.kind == "none":
        return volumes
    share = processes.share(batch)
    whole = volumes.new_zeros((batch,) + tuple(volumes.shape[1:]))
    whole[share] = volumes
    return augmenter(whole, generator)[share]


def gather_shares(features: torch.Tensor, processes: Processes, batch: int) -> torch.Tensor:
    """The features of the whole global batch of ``batch`` subjects, [B, V, D] in batch
    order, from this process's share [b, V, D] (:meth:`Processes.share`), keeping the
    gradient (module docstring: the backward sums over the processes, DDP averages).
    ``features`` itself for one process."""
    if not processes.is_distributed:
        return features
    sizes = processes.share_sizes(batch)
    if len(features) != sizes[processes.rank]:
        raise ValueError(f"process {processes.rank} holds {len(features)} rows of a batch of "
                         f"{batch}, whose share for it is {sizes[processes.rank]}")
    return _GatherShares.apply(features, sizes, processes.rank)


class _GatherShares(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, sizes, rank):
        # all_gather needs equal sizes: shares that differ by one row are padded
        padded = features.new_zeros((max(sizes),) + tuple(features.shape[1:]))
        padded[:len(features)] = features
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad)  # every process's loss depends on every share
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None
