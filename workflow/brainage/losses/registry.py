"""Name -> loss class, and :func:`make_loss`. The schema's ``loss.name`` enum lists the
same names (the plan must not import torch; tests/test_config.py checks that they agree),
and a loss with Adaptive Neighborhoods' schedule is known as ``adaptive`` by the plan's
checks and the random search (docs/architecture.md §9)."""

from __future__ import annotations

import inspect
import logging

from torch import nn

from .kernel import (
    AdaptiveNeighborhoodsLoss,
    ExponentialLoss,
    SimCLRLoss,
    ThresholdLoss,
    YAwareLoss,
)
from .nnclr import NNCLRLoss
from .rnc import RankNContrastLoss
from .supervised import SupervisedL1Loss

logger = logging.getLogger(__name__)

#: Config name -> class, in the order of the paper's Table 3.
LOSS_CLASSES: dict[str, type[nn.Module]] = {
    "simclr": SimCLRLoss,
    "nnclr": NNCLRLoss,
    "rnc": RankNContrastLoss,
    "yaware": YAwareLoss,
    "threshold": ThresholdLoss,
    "exponential": ExponentialLoss,
    "adaptive": AdaptiveNeighborhoodsLoss,
    "supervised": SupervisedL1Loss,
}
#: The losses of the paper's comparison; the others are baselines.
CONTRASTIVE_LOSSES: tuple[str, ...] = ("simclr", "nnclr", "rnc", "yaware", "threshold",
                                       "exponential", "adaptive")

LOSS_NAMES: tuple[str, ...] = tuple(LOSS_CLASSES)

#: Human-readable names for tables and figures.
DISPLAY_NAMES: dict[str, str] = {name: cls.display_name for name, cls in LOSS_CLASSES.items()}

#: Augmentation a loss trains with when the config says "default": "noise" for the
#: losses that need two different views (SimCLR, NNCLR), "none" otherwise.
DEFAULT_AUGMENTATION: dict[str, str] = {name: cls.default_augmentation for name, cls in LOSS_CLASSES.items()}


def _constructor_parameters(cls: type[nn.Module]) -> tuple[str, ...]:
    signature = inspect.signature(cls.__init__)
    return tuple(name for name in signature.parameters if name != "self")


#: Every parameter some loss of the family takes.
LOSS_PARAMETERS: frozenset[str] = frozenset(
    name for cls in LOSS_CLASSES.values() for name in _constructor_parameters(cls)
)


def make_loss(name: str, **params: object) -> nn.Module:
    """Build the loss registered under ``name``.

    Callers pass one shared dict of loss settings, so parameters that belong to the
    family but not to this loss (e.g. ``distance`` for ``simclr``) are accepted and
    ignored, without being validated (a debug message lists them); parameters no loss
    knows raise. Parameters this loss takes are validated by its constructor.

    Parameters
    ----------
    name : str
        One of :data:`LOSS_NAMES`.
    **params
        Any of :data:`LOSS_PARAMETERS`: ``temperature``, ``base_temperature``, ``sigma``
        (years), ``reduction``, ``distance``, ``nn_final``, ``nn_step``, ``max_epochs``,
        ``batch_size``, ``lam``, ``threshold_form``, ``rnc_temperature``, ``queue_size``,
        ``age_mean`` and ``age_sd`` (the training subjects' ages, years; the supervised loss).

    Returns
    -------
    torch.nn.Module
        Called as ``loss(features[B, V, D], ages[B], epoch) -> scalar``.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the valid names), a parameter unknown to all
        losses, or an invalid value (the message names the parameter).
    """
    if name not in LOSS_CLASSES:
        raise ValueError(f"unknown loss name {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    unknown = sorted(set(params) - LOSS_PARAMETERS)
    if unknown:
        raise ValueError(
            f"unknown loss parameter(s) {', '.join(unknown)}; "
            f"known parameters: {', '.join(sorted(LOSS_PARAMETERS))}"
        )
    cls = LOSS_CLASSES[name]
    accepted = set(_constructor_parameters(cls))
    ignored = sorted(set(params) - accepted)
    if ignored:
        logger.debug("loss %s ignores parameter(s) %s", name, ", ".join(ignored))
    return cls(**{key: value for key, value in params.items() if key in accepted})
