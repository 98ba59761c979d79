"""Contrastive losses of the paper, exactly as fixed in docs/method.md §5.

Public API::

    make_loss(name, **params) -> torch.nn.Module     # loss(features[B,V,D], ages[B], epoch)
    nn_schedule(epoch, max_epochs, batch_size, nn_final, step_size) -> int
    LOSS_NAMES, DISPLAY_NAMES, DEFAULT_AUGMENTATION, LOSS_PARAMETERS

Modules: ``kernel`` (the kernelised InfoNCE family on one shared core), ``rnc``
(Rank-N-Contrast), ``nnclr`` (NNCLR and its FIFO support set), ``schedule``
(Algorithm 1), ``supervised`` (the supervised baseline's L1 on age), ``registry``
(names -> classes).

The names are imported on first use (PEP 562): ``brainage.losses.schedule`` is plain
Python that config validation runs at every Snakemake start, and importing it must not
import PyTorch (1.3 s) through this package.
"""

from __future__ import annotations

import importlib

#: Public name -> the submodule that defines it.
_SOURCES = {
    **dict.fromkeys(("AdaptiveNeighborhoodsLoss", "ExponentialLoss", "KernelContrastiveLoss",
                     "SimCLRLoss", "ThresholdLoss", "YAwareLoss"), "kernel"),
    **dict.fromkeys(("NNCLRLoss", "SupportSet"), "nnclr"),
    **dict.fromkeys(("CONTRASTIVE_LOSSES", "DEFAULT_AUGMENTATION", "DISPLAY_NAMES",
                     "LOSS_CLASSES", "LOSS_NAMES", "LOSS_PARAMETERS", "make_loss"),
                    "registry"),
    "RankNContrastLoss": "rnc",
    "nn_schedule": "schedule",
    "SupervisedL1Loss": "supervised",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> object:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value
