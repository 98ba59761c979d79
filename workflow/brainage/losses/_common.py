"""Pieces shared by the contrastive losses: shape checks, row layout, distances (the
argument checks, which need no PyTorch, are in ``_arguments``).

Row layout (docs/method.md §5): a batch ``features[B, V, D]`` becomes ``N = B·V`` rows
ordered view-major (all view-1 rows, then all view-2 rows); row ``r`` belongs to
subject ``r % B``. Ages are tiled the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._arguments import check_choice

DISTANCES: tuple[str, ...] = ("manhattan", "euclidean", "chebyshev", "cosine")
REDUCTIONS: tuple[str, ...] = ("anchor", "global")

_MINKOWSKI_ORDER = {"manhattan": 1.0, "euclidean": 2.0, "chebyshev": math.inf}


# --------------------------------------------------------------------------- inputs


def check_batch(features: Tensor, ages: Tensor | None) -> tuple[int, int]:
    """Check the shapes of a loss call and return ``(B, V)``.

    Parameters
    ----------
    features : Tensor, shape [B, V, D]
        Embeddings of V views of B subjects.
    ages : Tensor, shape [B], or None
        Ages in years (None only for losses that do not use them).
    """
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
        raise ValueError(f"features must be a tensor of shape [B, V, D]; got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point; got {features.dtype}")
    batch, views, _ = features.shape
    if 0 in features.shape:  # each loss failed its own way (an IndexError, NaN, or 0)
        raise ValueError(f"features of shape [B, V, D] = {list(features.shape)}: a loss "
                         f"needs at least one subject, one view and one feature")
    if ages is not None and (not isinstance(ages, Tensor) or ages.numel() != batch):
        shape = tuple(ages.shape) if isinstance(ages, Tensor) else type(ages)
        raise ValueError(f"ages must be a tensor of shape [B] = [{batch}]; got {shape}")
    return batch, views


def compute_dtype(features: Tensor) -> torch.dtype:
    """float64 stays float64 (tests, gradcheck); everything else is computed in float32,
    so bf16/fp16 activations never reach an exponential or a log-sum-exp."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def view_major_rows(features: Tensor, ages: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Flatten ``[B, V, D]`` into view-major rows in the compute dtype.

    Returns
    -------
    rows : Tensor, shape [N, D]
    row_ages : Tensor, shape [N] (years), or None when ``ages`` is None
    row_subjects : Tensor of int64, shape [N]; subject index of each row
    """
    batch, views, dim = features.shape
    dtype = compute_dtype(features)
    rows = features.to(dtype).transpose(0, 1).reshape(batch * views, dim)
    row_subjects = torch.arange(batch, device=features.device).repeat(views)
    row_ages = None
    if ages is not None:
        row_ages = ages.reshape(batch).to(device=features.device, dtype=dtype).repeat(views)
    return rows, row_ages, row_subjects


def rbf_kernel(row_ages: Tensor, sigma: float) -> Tensor:
    """``w_ab = exp(-(y_a - y_b)^2 / (2 sigma^2))``, shape [N, N]; ages and sigma in years."""
    gap = row_ages[:, None] - row_ages[None, :]
    return torch.exp(-gap.square() / (2.0 * sigma**2))


def connected_zero(rows: Tensor) -> Tensor:
    """A scalar 0 that keeps a grad_fn to the inputs, for batches without any valid pair
    (so ``loss.backward()`` still works and gives zero gradients)."""
    return rows.sum() * 0.0


# --------------------------------------------------------------------------- distances


def pairwise_distance(rows: Tensor, metric: str) -> Tensor:
    """Distances between all rows, shape [N, N], with an exact 0 diagonal.

    ``manhattan`` / ``euclidean`` / ``chebyshev`` are L1 / L2 / L-inf; ``cosine`` is
    ``1 - cos(z_a, z_b)``, computed as ``|u_a - u_b|² / 2`` of the unit vectors (equal for
    unit vectors). Computed pair by pair (no ``|a|²+|b|²-2a·b`` cancellation, which
    ``1 - u_a·u_b`` is: near-duplicates all came out 0 in float32) without materialising
    an [N, N, D] tensor; differentiable, with a zero gradient at coincident points.
    """
    check_choice("distance", metric, DISTANCES)
    if metric == "cosine":
        unit = torch.nn.functional.normalize(rows, dim=1)
        distance = torch.cdist(unit, unit, p=2.0,
                               compute_mode="donot_use_mm_for_euclid_dist").square() / 2.0
    else:
        distance = torch.cdist(
            rows, rows, p=_MINKOWSKI_ORDER[metric], compute_mode="donot_use_mm_for_euclid_dist"
        )
    self_pair = torch.eye(rows.shape[0], dtype=torch.bool, device=rows.device)
    return distance.masked_fill(self_pair, 0.0)


# --------------------------------------------------------------------------- reductions


def masked_logsumexp(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise ``log Σ_{t: mask} exp(values)`` without NaN in value or gradient.

    Parameters
    ----------
    values : Tensor, shape [N, M]
    mask : Tensor of bool, shape [N, M]

    Returns
    -------
    log_sum : Tensor, shape [N, 1]; finite placeholder (not -inf) for empty rows
    non_empty : Tensor of bool, shape [N, 1]
    """
    non_empty = mask.any(dim=1, keepdim=True)
    masked = values.masked_fill(~mask, -math.inf)
    # An all -inf row would give -inf and a NaN gradient even where it is later dropped;
    # fill such rows with zeros so everything stays finite, and report them as empty.
    masked = torch.where(non_empty, masked, torch.zeros_like(masked))
    return torch.logsumexp(masked, dim=1, keepdim=True), non_empty
