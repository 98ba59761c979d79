"""Rank-N-Contrast (Zha et al., NeurIPS 2023), as fixed in docs/method.md §5."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from brainage.runtime import full_float32

from ._arguments import check_positive_float
from ._common import (
    check_batch,
    connected_zero,
    pairwise_distance,
    view_major_rows,
)


class RankNContrastLoss(nn.Module):
    """Rank-N-Contrast loss.

    ``s_ab = −‖z_a − z_b‖₂ / τ_rnc`` on the features as given (not normalised), and for
    each anchor a and k ≠ a

        l_ak = −log( exp(s_ak) / Σ_{t≠a, |y_a−y_t| ≥ |y_a−y_k|} exp(s_at) )

    averaged over all N(N−1) ordered pairs (N = B·V rows, view-major). The set always
    contains k itself, so it is never empty. Computed per anchor by sorting the age gaps,
    a reverse cumulative log-sum-exp and ``searchsorted`` (ties included: "≥"): O(N²)
    memory and O(N² log N) work instead of the reference's Python loop over k. No
    ``τ / base_temperature`` factor (the reference RnC code has none).

    Parameters
    ----------
    rnc_temperature : float
        τ_rnc (> 0), paper value 2.

    Call
    ----
    ``loss(features, ages, epoch)`` with ``features`` [B, V, D], ``ages`` [B] in years;
    ``epoch`` is ignored. Returns a scalar tensor.
    """

    display_name: ClassVar[str] = "Rank-N-Contrast"
    default_augmentation: ClassVar[str] = "none"

    def __init__(self, rnc_temperature: float = 2.0) -> None:
        super().__init__()
        self.rnc_temperature = check_positive_float("rnc_temperature", rnc_temperature)

    def extra_repr(self) -> str:
        return f"rnc_temperature={self.rnc_temperature}"

    def forward(self, features: Tensor, ages: Tensor, epoch: int | None = None) -> Tensor:
        """Loss of one batch.

        Parameters
        ----------
        features : Tensor, shape [B, V, D]
        ages : Tensor, shape [B]
            Ages in years.
        epoch : int, optional
            Ignored.

        Returns
        -------
        Tensor, scalar
        """
        check_batch(features, ages)
        with full_float32():
            rows, row_ages, _ = view_major_rows(features, ages)
            n_rows = rows.shape[0]
            if n_rows < 2:
                return connected_zero(rows)
            logits = -pairwise_distance(rows, "euclidean") / self.rnc_temperature
            age_gap = (row_ages[:, None] - row_ages[None, :]).abs()
            self_pair = torch.eye(n_rows, dtype=torch.bool, device=rows.device)

            # The anchor sorts first (gap −1), so a "gap ≥ gap_ak" suffix never reaches it.
            sorted_gaps, order = torch.sort(age_gap.masked_fill(self_pair, -1.0), dim=1, stable=True)
            suffix_log_sums = torch.logcumsumexp(logits.gather(1, order).flip(1), dim=1).flip(1)
            first_not_closer = torch.searchsorted(sorted_gaps, age_gap.contiguous(), side="left")
            log_repulsion = suffix_log_sums.gather(1, first_not_closer)

            pair_loss = torch.where(self_pair, 0.0, log_repulsion - logits)
            return pair_loss.sum() / (n_rows * (n_rows - 1))

