"""The supervised baseline's loss: L1 between predicted and true age (docs/method.md,
"Baselines").

Not contrastive: the network's regression head outputs one standardised age per view
(``model.head: regression``, ``model.projection_dim: 1``), which this loss turns into years
with the training subjects' mean and sd and compares with the true age. It takes the
same call as the contrastive losses, so training runs it through the same loop.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ._arguments import check_positive_float
from ._common import check_batch


class SupervisedL1Loss(nn.Module):
    """Mean |predicted - true| age (years) over subjects and views.

    Parameters
    ----------
    age_mean, age_sd : float
        The training subjects' age mean and sd (years), which scale the head's output.

    Call: ``loss(features[B, V, 1], ages[B], epoch)``.
    """

    display_name: ClassVar[str] = "Supervised ResNet-18 (L1)"
    default_augmentation: ClassVar[str] = "none"

    def __init__(self, age_mean: float = 50.0, age_sd: float = 20.0) -> None:
        super().__init__()
        self.age_mean = float(age_mean)
        self.age_sd = check_positive_float("age_sd", age_sd)

    def extra_repr(self) -> str:
        return f"age_mean={self.age_mean:.2f}, age_sd={self.age_sd:.2f}"

    def forward(self, features: Tensor, ages: Tensor, epoch: int | None = None) -> Tensor:
        check_batch(features, ages)
        if features.shape[-1] != 1:
            raise ValueError(f"the supervised loss takes one standardised age per view "
                             f"([B, V, 1]); got features of shape {tuple(features.shape)}. "
                             f"Set model.head: regression and model.projection_dim: 1.")
        predicted = features[..., 0].to(torch.float32) * self.age_sd + self.age_mean
        # check_batch accepts any shape holding B ages, as the other losses do; a column
        # [B, 1] must not broadcast into a comparison of every subject with every age
        true = ages.reshape(-1).to(device=predicted.device, dtype=predicted.dtype)
        return (predicted - true[:, None]).abs().mean()
