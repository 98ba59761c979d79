"""Contrastive losses of the paper, exactly as fixed in docs/method.md §5.

Public API::

    make_loss(name, **params) -> torch.nn.Module     # loss(features[B,V,D], ages[B], epoch)
    nn_schedule(epoch, max_epochs, batch_size, nn_final, step_size) -> int
    LOSS_NAMES, DISPLAY_NAMES, DEFAULT_AUGMENTATION, LOSS_PARAMETERS

Modules: ``kernel`` (the kernelised InfoNCE family on one shared core), ``rnc``
(Rank-N-Contrast), ``nnclr`` (NNCLR and its FIFO support set), ``schedule``
(Algorithm 1), ``supervised`` (the supervised baseline's L1 on age), ``registry``
(names -> classes).
"""

from .kernel import (
    AdaptiveNeighborhoodsLoss,
    ExponentialLoss,
    KernelContrastiveLoss,
    SimCLRLoss,
    ThresholdLoss,
    YAwareLoss,
)
from .nnclr import NNCLRLoss, SupportSet
from .registry import (
    CONTRASTIVE_LOSSES,
    DEFAULT_AUGMENTATION,
    DISPLAY_NAMES,
    LOSS_CLASSES,
    LOSS_NAMES,
    LOSS_PARAMETERS,
    make_loss,
)
from .rnc import RankNContrastLoss
from .schedule import nn_schedule
from .supervised import SupervisedL1Loss

__all__ = [
    "AdaptiveNeighborhoodsLoss",
    "CONTRASTIVE_LOSSES",
    "DEFAULT_AUGMENTATION",
    "DISPLAY_NAMES",
    "ExponentialLoss",
    "KernelContrastiveLoss",
    "LOSS_CLASSES",
    "LOSS_NAMES",
    "LOSS_PARAMETERS",
    "NNCLRLoss",
    "RankNContrastLoss",
    "SimCLRLoss",
    "SupervisedL1Loss",
    "SupportSet",
    "ThresholdLoss",
    "YAwareLoss",
    "make_loss",
    "nn_schedule",
]
