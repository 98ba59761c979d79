"""NNCLR (Dwibedi et al., ICCV 2021) and its support set, as fixed in docs/method.md §5."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainage.runtime import full_float32

from ._arguments import check_positive_float, check_positive_int
from ._common import check_batch, view_major_rows


class SupportSet(nn.Module):
    """First-in-first-out queue of past embeddings (NNCLR's support set Q).

    The queue is a ring buffer registered as module buffers, so it moves with ``.to()``
    and is saved in ``state_dict``. Its width D is taken from the first batch pushed
    (and from the state dict when loading into a fresh module); its dtype is that of
    the first batch (float32 in training, float64 in tests).

    Parameters
    ----------
    size : int
        Capacity in embeddings (``queue_size``).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = check_positive_int("queue_size", size)
        self.register_buffer("embeddings", torch.zeros(self.size, 0))  # [size, D] once used
        self.register_buffer("next_slot", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_filled", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"size={self.size}, filled={len(self)}"

    def __len__(self) -> int:
        return int(self.n_filled)

    def contents(self) -> Tensor:
        """Stored embeddings, oldest first, shape [len(self), D]."""
        if len(self) < self.size:
            return self.embeddings[: len(self)]
        return torch.roll(self.embeddings, shifts=-int(self.next_slot), dims=0)

    @torch.no_grad()
    def push(self, batch: Tensor) -> None:
        """Append ``batch`` [M, D] (detached), overwriting the oldest entries when full;
        of a batch larger than the queue only the last ``size`` rows are kept."""
        batch = batch.detach()
        if self.embeddings.shape[1] == 0:
            self.embeddings = torch.zeros(
                self.size, batch.shape[1], dtype=batch.dtype, device=batch.device
            )
        elif batch.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"support set holds {self.embeddings.shape[1]}-d embeddings; got {batch.shape[1]}-d"
            )
        batch = batch[-self.size :]
        n_new = batch.shape[0]
        start = int(self.next_slot)
        slots = (start + torch.arange(n_new, device=self.embeddings.device)) % self.size
        self.embeddings[slots] = batch.to(self.embeddings)
        self.next_slot.fill_((start + n_new) % self.size)
        self.n_filled.fill_(min(len(self) + n_new, self.size))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The width is only known once filled: resize the empty buffer to the saved one.
        saved = state_dict.get(prefix + "embeddings")
        if saved is not None and saved.shape != self.embeddings.shape:
            self.embeddings = torch.zeros(saved.shape, dtype=saved.dtype, device=self.embeddings.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def cosine_nearest(queries: Tensor, support: Tensor) -> Tensor:
    """Nearest neighbour of each query in ``support`` by cosine similarity.

    Parameters
    ----------
    queries : Tensor, shape [M, D]
    support : Tensor, shape [S, D], S >= 1

    Returns
    -------
    Tensor, shape [M, D]
        Rows of ``support`` (ties: the lowest index, i.e. the oldest entry).
    """
    similarity = F.normalize(queries, dim=1) @ F.normalize(support, dim=1).T
    return support[similarity.argmax(dim=1)]


def nt_xent(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """NNCLR's NT-Xent: ``mean_i −log( exp(q_i·k_i/τ) / Σ_j exp(q_i·k_j/τ) )``,
    the positive ``k_i`` against all keys of the batch; shapes [B, D] -> scalar."""
    logits = queries @ keys.T / temperature
    targets = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, targets)


class NNCLRLoss(nn.Module):
    """NNCLR: contrast each view's nearest neighbour in a support set of past view-1
    embeddings against the other view of the batch.

    ``L = ½ [ NT-Xent(NN(z¹, Q), z²) + NT-Xent(NN(z², Q), z¹) ]`` with NT-Xent as in
    :func:`nt_xent` (denominator over the batch's other-view embeddings, as in the
    NNCLR paper), τ = ``temperature``. Nearest neighbours come from the queue and carry
    no gradient; gradients flow through the other view. After the loss, in training
    mode (``module.training``), the batch's view-1 embeddings are pushed into the queue.

    While the queue is empty (the very first step) the support set is the batch's own
    view-1 embeddings, detached: NN(z¹_i) is then z¹_i itself, so the first term is a
    cross-view SimCLR term; the second scores the view-1 embedding nearest each z²_i
    (often z¹_i) against the view-1 keys, which mainly pushes view-1 embeddings apart. One
    step per run. A partly filled queue is used as it is. Features are used
    as given (unit-normalised by the model); the neighbour search normalises them.
    No ``τ / base_temperature`` factor.

    Parameters
    ----------
    temperature : float
        τ (> 0), paper value 0.1.
    queue_size : int
        Capacity of the support set.

    Call
    ----
    ``loss(features, ages, epoch)`` with ``features`` [B, 2, D]; ``ages`` and ``epoch``
    are ignored. Returns a scalar tensor.
    """

    display_name: ClassVar[str] = "NNCLR"
    default_augmentation: ClassVar[str] = "noise"  # identical views would make the task trivial

    def __init__(self, temperature: float = 0.1, queue_size: int = 256) -> None:
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)
        self.support_set = SupportSet(queue_size)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, features: Tensor, ages: Tensor | None = None, epoch: int | None = None) -> Tensor:
        """Loss of one batch; see the class docstring.

        Parameters
        ----------
        features : Tensor, shape [B, 2, D]
        ages, epoch
            Ignored.

        Returns
        -------
        Tensor, scalar
        """
        batch, views = check_batch(features, None)
        if views != 2:
            raise ValueError(f"NNCLR needs exactly 2 views per subject; features has V = {views}")
        with full_float32():
            rows, _, _ = view_major_rows(features)
            first, second = rows[:batch], rows[batch:]
            if len(self.support_set):
                support = self.support_set.contents().to(first.dtype)
            else:
                support = first.detach()
            loss = 0.5 * (
                nt_xent(cosine_nearest(first, support), second, self.temperature)
                + nt_xent(cosine_nearest(second, support), first, self.temperature)
            )
        if self.training:
            self.support_set.push(first)
        return loss
