"""The kernelised InfoNCE family: SimCLR, Y-Aware, Threshold, Exponential and
Adaptive Neighborhoods (with the optional appendix A.1 re-weighting).

All five are one computation (docs/method.md §5) that differs only in the positive weight
``w_ak`` and the repulsion sum ``R_ak``:

    s_ab  = z_a·z_b / τ − m_a,        m_a = max_t z_a·z_t / τ   (row-max shift)
    l_ak  = −log( exp(s_ak) / R_ak )   for k ≠ a
    anchor reduction:  L = mean_a [ Σ_k w_ak l_ak / Σ_k w_ak ]      (paper Eq. 3)
    global reduction:  L = Σ_a Σ_k w_ak l_ak / Σ_a Σ_k w_ak         (reference code)
    L ← L · τ / base_temperature

A pair whose repulsion set is empty is left out of both sums (docs/method.md §5.2 states this for
Threshold; it can also happen for Adaptive Neighborhoods when NN(a) holds only a, and
for every loss when N = 1). Anchors whose remaining weights sum to 0 are left out of the
anchor mean. With no pair left the loss is a zero that is still connected to ``features``.

Every sum is a log-sum-exp in float32 (float64 stays float64) with autocast off, and no
tensor larger than [N, N] is built (N = B·V rows).
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch
from torch import Tensor, nn

from brainage.runtime import full_float32

from ._arguments import check_choice, check_positive_float, check_positive_int
from ._common import (
    DISTANCES,
    REDUCTIONS,
    check_batch,
    masked_logsumexp,
    pairwise_distance,
    rbf_kernel,
    view_major_rows,
)
from .schedule import check_schedule, nn_schedule

#: ``loss.threshold_form``: the published formula, or the authors' code (docs/method.md §5.2).
THRESHOLD_FORMS: tuple[str, ...] = ("paper", "reference")


def reduce_weighted_pairs(weight: Tensor, pair_loss: Tensor, reduction: str) -> Tensor:
    """Combine per-pair losses with their positive weights.

    Parameters
    ----------
    weight : Tensor, shape [N, N]
        ``w_ak`` with 0 for self pairs and for pairs left out.
    pair_loss : Tensor, shape [N, N]
        ``l_ak``, finite everywhere (0 where left out).
    reduction : {"anchor", "global"}

    Returns
    -------
    Tensor, scalar
    """
    weighted_sum = (weight * pair_loss).sum(dim=1)
    weight_sum = weight.sum(dim=1)
    if reduction == "global":
        total_weight = weight_sum.sum()
        return weighted_sum.sum() / torch.where(total_weight > 0, total_weight, 1.0)
    has_weight = weight_sum > 0
    per_anchor = weighted_sum / torch.where(has_weight, weight_sum, 1.0)
    per_anchor = torch.where(has_weight, per_anchor, 0.0)
    return per_anchor.sum() / has_weight.sum().clamp_min(1)


class KernelContrastiveLoss(nn.Module):
    """Shared core of the kernelised InfoNCE losses (docs/method.md §5).

    Subclasses define the positive weights (:meth:`_positive_weights`, RBF kernel on age
    by default) and the repulsion sum (:meth:`_log_repulsion`).

    Parameters
    ----------
    temperature : float
        Softmax temperature τ (> 0).
    base_temperature : float
        The loss is multiplied by ``temperature / base_temperature`` as in the reference.
    sigma : float
        Width of the RBF kernel on age, in years.
    reduction : {"anchor", "global"}
        ``anchor``: paper Eq. 3, mean over anchors of the weighted mean over positives.
        ``global``: the reference code, one weighted mean over all pairs.

    Call
    ----
    ``loss(features, ages, epoch)`` with ``features`` [B, V, D] (unit-normalised by the
    model), ``ages`` [B] in years and ``epoch`` counted from 1; returns a scalar tensor
    (float32, or float64 for float64 input).
    """

    display_name: ClassVar[str] = "kernelised InfoNCE"
    default_augmentation: ClassVar[str] = "none"

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        sigma: float = 2.0,
        reduction: str = "anchor",
    ) -> None:
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)
        self.base_temperature = check_positive_float("base_temperature", base_temperature)
        self.sigma = check_positive_float("sigma", sigma)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"sigma={self.sigma}, reduction={self.reduction!r}"
        )

    def forward(self, features: Tensor, ages: Tensor, epoch: int) -> Tensor:
        """Loss of one batch.

        Parameters
        ----------
        features : Tensor, shape [B, V, D]
            Unit-normalised embeddings of V views of B subjects.
        ages : Tensor, shape [B]
            Ages in years.
        epoch : int
            Current epoch, counted from 1 (used by Adaptive Neighborhoods only).

        Returns
        -------
        Tensor, scalar
        """
        batch, _ = check_batch(features, ages)
        with full_float32():
            rows, row_ages, row_subjects = view_major_rows(features, ages)
            n_rows = rows.shape[0]
            similarity = rows @ rows.T / self.temperature
            # Row-max shift (self included), detached as in the reference. It changes the
            # value of Exponential / Adaptive Neighborhoods only; for features that come out
            # of an L2 normalisation m_a = 1/τ is constant, so detaching changes no gradient.
            shifted = similarity - similarity.amax(dim=1, keepdim=True).detach()
            kernel = rbf_kernel(row_ages, self.sigma)
            not_self = ~torch.eye(n_rows, dtype=torch.bool, device=rows.device)

            positive_weight = self._positive_weights(kernel, row_subjects, row_ages)
            log_repulsion, has_repulsion = self._log_repulsion(
                shifted=shifted, kernel=kernel, rows=rows, not_self=not_self,
                batch=batch, epoch=epoch, row_ages=row_ages,
            )
            used = not_self & has_repulsion
            weight = torch.where(used, positive_weight, 0.0)
            pair_loss = torch.where(used, log_repulsion - shifted, 0.0)
            loss = reduce_weighted_pairs(weight, pair_loss, self.reduction)
            return loss * (self.temperature / self.base_temperature)

    def _positive_weights(self, kernel: Tensor, row_subjects: Tensor, row_ages: Tensor
                          ) -> Tensor:
        """Positive weights ``w_ak``, shape [N, N] (the diagonal is ignored); ``row_ages``
        [N] (years) for a weighting other than the RBF kernel's."""
        return kernel

    def _log_repulsion(
        self, *, shifted: Tensor, kernel: Tensor, rows: Tensor, not_self: Tensor, batch: int,
        epoch: int, row_ages: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``log R_ak`` and whether the repulsion set is non-empty.

        Parameters
        ----------
        shifted : Tensor, shape [N, N]
            Row-max-shifted similarities ``s_at``.
        kernel : Tensor, shape [N, N]
            Age kernel ``w_at``.
        rows : Tensor, shape [N, D]
            Embeddings, view-major.
        not_self : Tensor of bool, shape [N, N]
        batch : int
            Subjects in this batch (rows per view).
        epoch : int
            Current epoch, from 1.
        row_ages : Tensor, shape [N]
            The rows' ages (years), view-major.

        Returns
        -------
        log_repulsion : Tensor, shape [N, 1] or [N, N]; finite everywhere
        non_empty : Tensor of bool, same shape
        """
        raise NotImplementedError


class SimCLRLoss(KernelContrastiveLoss):
    """SimCLR / NT-Xent (Chen et al., 2020), written in the shared kernel core.

    Positives: the other views of the same subject (weight 1); repulsion over all rows
    t ≠ a. Ages are not used. ``sigma`` is not a parameter of this loss.
    """

    display_name = "SimCLR"
    default_augmentation = "noise"  # identical views would make the task trivial

    def __init__(
        self, temperature: float = 0.1, base_temperature: float = 0.07, reduction: str = "anchor"
    ) -> None:
        super().__init__(temperature=temperature, base_temperature=base_temperature, reduction=reduction)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"reduction={self.reduction!r}"
        )

    def _positive_weights(self, kernel: Tensor, row_subjects: Tensor, row_ages: Tensor
                          ) -> Tensor:
        return (row_subjects[:, None] == row_subjects[None, :]).to(kernel.dtype)

    def _log_repulsion(self, *, shifted: Tensor, not_self: Tensor, **_: object) -> tuple[Tensor, Tensor]:
        return masked_logsumexp(shifted, not_self)


class YAwareLoss(KernelContrastiveLoss):
    """Y-Aware InfoNCE (Dufumier et al., 2021): RBF-weighted positives, repulsion
    ``R_ak = Σ_{t≠a} exp(s_at)`` (paper Table 1)."""

    display_name = "Y-Aware"

    def _log_repulsion(self, *, shifted: Tensor, not_self: Tensor, **_: object) -> tuple[Tensor, Tensor]:
        return masked_logsumexp(shifted, not_self)


class ThresholdLoss(KernelContrastiveLoss):
    """Threshold loss (Barbano et al., 2023) in one of two forms (``threshold_form``).

    ``paper`` (default): ``R_ak = Σ_{t≠a, w_at < w_ak} exp(s_at)``. Only rows strictly
    less similar in age than the positive are repelled; a pair with no such row is left
    out of both sums. Computed per anchor by sorting ``w_at``, a cumulative log-sum-exp in
    that order and a ``searchsorted`` for the count of strictly smaller weights, so memory
    is O(N²) instead of the reference's O(N³). Ties are exact: equal weights are never
    "strictly less".

    ``reference``: what the authors' code computes (``DynLocRep_loss``, method
    ``threshold``, delta reduction ``sum``; docs/method.md §5.2): one repulsion sum per
    anchor, each row weighted by a count of rows,
    ``R_a = Σ_{t≠a} c_at exp(s_at)`` with ``c_at = #{k : w_tk < w_ta}`` (k over all N rows,
    the kernel row of the *repelled* row t), and ``l_ak = log R_a − s_ak`` for every
    positive k. Computed with one sort of the kernel rows and a ``searchsorted``; an
    anchor with every ``c_at = 0`` (the code's log 0) is left out like an empty pair.

    Parameters
    ----------
    temperature, base_temperature, sigma, reduction
        As in :class:`KernelContrastiveLoss`.
    threshold_form : {"paper", "reference"}
        Which of the two repulsion sums above.
    """

    display_name = "Threshold"

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        sigma: float = 2.0,
        reduction: str = "anchor",
        threshold_form: str = "paper",
    ) -> None:
        super().__init__(
            temperature=temperature, base_temperature=base_temperature, sigma=sigma, reduction=reduction
        )
        self.threshold_form = check_choice("threshold_form", threshold_form, THRESHOLD_FORMS)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold_form={self.threshold_form!r}"

    def _log_repulsion(
        self, *, shifted: Tensor, kernel: Tensor, not_self: Tensor, **_: object
    ) -> tuple[Tensor, Tensor]:
        if self.threshold_form == "reference":
            return self._log_pooled_repulsion(shifted, kernel, not_self)
        # The anchor itself is sorted last (+inf) so it never counts as "smaller".
        sort_keys = kernel.masked_fill(~not_self, math.inf)
        sorted_weights, order = torch.sort(sort_keys, dim=1, stable=True)
        prefix_log_sums = torch.logcumsumexp(shifted.gather(1, order), dim=1)
        n_smaller = torch.searchsorted(sorted_weights, kernel.contiguous(), side="left")
        non_empty = n_smaller > 0
        # Empty sets read a finite dummy entry (index 0) and are dropped by the caller.
        log_repulsion = prefix_log_sums.gather(1, (n_smaller - 1).clamp_min(0))
        return log_repulsion, non_empty

    @staticmethod
    def _log_pooled_repulsion(shifted: Tensor, kernel: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        """``log R_a`` of the reference form, shape [N, 1], and whether it is non-empty."""
        # n_smaller[t, a] = #{k : w_tk < w_ta} over all N entries of row t (diagonal included, as
        # in the code); its transpose is c_at.
        n_smaller = torch.searchsorted(torch.sort(kernel, dim=1).values, kernel.contiguous(), side="left")
        counts = n_smaller.T
        repelled = not_self & (counts > 0)
        log_counts = torch.log(counts.clamp_min(1).to(shifted.dtype))  # counts carry no gradient
        return masked_logsumexp(shifted + log_counts, repelled)


class ExponentialLoss(KernelContrastiveLoss):
    """Exponential loss (Dufumier et al., 2021; Barbano et al., 2023):
    ``R_ak = Σ_{t≠a} exp(s_at (1 − w_at))`` with the row-max-shifted ``s_at``, which here
    changes the value (docs/method.md §5)."""

    display_name = "Exponential"

    def _log_repulsion(
        self, *, shifted: Tensor, kernel: Tensor, not_self: Tensor, **_: object
    ) -> tuple[Tensor, Tensor]:
        return masked_logsumexp(shifted * (1.0 - kernel), not_self)


class AdaptiveNeighborhoodsLoss(KernelContrastiveLoss):
    """Adaptive Neighborhoods (the paper's Eq. 3): the Exponential repulsion restricted
    to the nearest neighbours of each anchor, whose number shrinks with the epoch.

    ``R_ak = Σ_{t ∈ NN(a), t≠a} exp(s_at (1 − w_at))`` where NN(a) are the V·NN_nb rows
    nearest to row a (a included) by ``distance`` on the embeddings, NN_nb =
    ``min(nn_schedule(epoch, max_epochs, batch_size, nn_final, nn_step), B)``.
    Positives are not restricted to NN(a).

    Ties: row a always comes first; the other rows are ranked by (distance, row index)
    ascending (stable sort), so among equally distant rows the lower index wins.
    Selection is a discrete choice and carries no gradient.

    With ``lam`` (appendix A.1) all rows t ≠ a are kept, with weight ν_at = 1 inside
    NN(a) and ν_at = (r_a / d_at)^λ outside, r_a the distance to the farthest row of
    NN(a): ``R_ak = Σ_{t≠a} ν_at exp(s_at (1 − w_at))``. Outside rows at exactly
    distance r_a (ties at the boundary, including 0/0) get ν = 1; if r_a = 0 < d_at
    then ν = 0 (for λ > 0). ν is differentiable through d_at and r_a. λ = 0 is the
    Exponential loss, λ → ∞ tends to the hard neighbourhood.

    Parameters
    ----------
    temperature, base_temperature, sigma, reduction
        As in :class:`KernelContrastiveLoss`.
    distance : {"manhattan", "euclidean", "chebyshev", "cosine"}
        Neighbour distance on the embeddings (paper default manhattan).
    nn_final : int
        Final neighbourhood size, in subjects (paper best 14).
    nn_step : int
        Epochs per shrink step of Algorithm 1.
    max_epochs : int
        Training epochs (the schedule's horizon).
    batch_size : int
        Configured batch size in subjects (the schedule's start).
    lam : float or None
        Appendix A.1 exponent λ >= 0; None for the hard neighbourhood.
    """

    display_name = "Adaptive Neighborhoods"

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        sigma: float = 2.0,
        reduction: str = "anchor",
        distance: str = "manhattan",
        nn_final: int = 14,
        nn_step: int = 1,
        max_epochs: int = 50,
        batch_size: int = 32,
        lam: float | None = None,
    ) -> None:
        super().__init__(
            temperature=temperature, base_temperature=base_temperature, sigma=sigma, reduction=reduction
        )
        self.distance = check_choice("distance", distance, DISTANCES)
        check_schedule(
            max_epochs=max_epochs, batch_size=batch_size, nn_final=nn_final, step_size=nn_step,
            step_name="nn_step",
        )
        self.nn_final = int(nn_final)
        self.nn_step = int(nn_step)
        self.max_epochs = int(max_epochs)
        self.batch_size = int(batch_size)
        if lam is not None:
            if (
                isinstance(lam, bool)
                or not isinstance(lam, numbers.Real)
                or not math.isfinite(lam)
                or lam < 0
            ):
                raise ValueError(
                    f"lam must be None or a finite number >= 0, got {lam!r} "
                    "(use lam=None for the hard neighbourhood, the λ → ∞ limit)"
                )
            lam = float(lam)
        self.lam = lam

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, distance={self.distance!r}, nn_final={self.nn_final}, "
            f"nn_step={self.nn_step}, max_epochs={self.max_epochs}, "
            f"batch_size={self.batch_size}, lam={self.lam}"
        )

    def neighbour_count(self, epoch: int, batch: int) -> int:
        """NN_nb for this epoch, capped at the ``batch`` subjects present."""
        scheduled = nn_schedule(epoch, self.max_epochs, self.batch_size, self.nn_final, self.nn_step)
        return min(scheduled, batch)

    def _log_repulsion(
        self, *, shifted: Tensor, kernel: Tensor, rows: Tensor, not_self: Tensor, batch: int,
        epoch: int, **_: object
    ) -> tuple[Tensor, Tensor]:
        epoch = check_positive_int("epoch", epoch)
        views = rows.shape[0] // batch
        n_neighbours = views * self.neighbour_count(epoch, batch)
        with torch.set_grad_enabled(self.lam is not None and torch.is_grad_enabled()):
            distance = pairwise_distance(rows, self.distance)
        ranking_keys = distance.detach().masked_fill(~not_self, -1.0)  # self first
        nearest = torch.sort(ranking_keys, dim=1, stable=True).indices[:, :n_neighbours]
        in_neighbourhood = torch.zeros_like(not_self).scatter_(1, nearest, True)
        repulsion_logits = shifted * (1.0 - kernel)
        if self.lam is None:
            return masked_logsumexp(repulsion_logits, not_self & in_neighbourhood)
        radius = distance.gather(1, nearest[:, -1:])  # [N, 1], farthest row of NN(a)
        log_nu = self._log_outside_weights(distance, radius, in_neighbourhood)
        # ν = 0 rows (r_a = 0 < d_at) are out of the set, like rows outside NN(a).
        return masked_logsumexp(repulsion_logits + log_nu, not_self & (log_nu > -math.inf))

    def _log_outside_weights(self, distance: Tensor, radius: Tensor, in_neighbourhood: Tensor) -> Tensor:
        """``log ν_at``, shape [N, N]: 0 inside NN(a) and at the boundary distance,
        ``λ (log r_a − log d_at)`` outside, −inf where r_a = 0 < d_at (λ > 0)."""
        if self.lam == 0.0:
            return torch.zeros_like(distance)  # ν = 1 everywhere, 0^0 included
        outside = ~in_neighbourhood & (distance > radius)
        # Safe arguments keep log finite (and its gradient NaN-free) where the value
        # is not used.
        log_ratio = torch.log(torch.where(radius > 0, radius, 1.0)) - torch.log(
            torch.where(outside, distance, 1.0)
        )
        log_ratio = torch.where(radius > 0, log_ratio, -math.inf)
        return torch.where(outside, self.lam * log_ratio, 0.0)
