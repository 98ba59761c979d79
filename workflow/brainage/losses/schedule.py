"""Neighbourhood-size schedule of Adaptive Neighborhoods (paper Algorithm 1)."""

from __future__ import annotations

from ._arguments import check_positive_int


def check_schedule(
    *, max_epochs: object, batch_size: object, nn_final: object, step_size: object, step_name: str
) -> None:
    """Raise ValueError, naming the parameter, unless Algorithm 1 is well defined.

    ``step_name`` is how the caller calls the step size (``nn_step`` in the loss
    settings, ``step_size`` in :func:`nn_schedule`).
    """
    max_epochs = check_positive_int("max_epochs", max_epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    nn_final = check_positive_int("nn_final", nn_final)
    step_size = check_positive_int(step_name, step_size)
    if nn_final > batch_size:
        raise ValueError(
            f"nn_final ({nn_final}) must not exceed batch_size ({batch_size}): "
            "the neighbourhood shrinks from the batch size down to nn_final"
        )
    if step_size >= max_epochs:
        raise ValueError(f"{step_name} ({step_size}) must be smaller than max_epochs ({max_epochs})")
    if max_epochs // step_size < 2:
        # Algorithm 1 divides by (total_steps - 1); the reference would divide by zero.
        raise ValueError(
            f"{step_name} ({step_size}) must be at most max_epochs // 2 ({max_epochs // 2}) "
            "so that the schedule has at least two steps"
        )


def nn_schedule(epoch: int, max_epochs: int, batch_size: int, nn_final: int, step_size: int) -> int:
    """Number of nearest neighbours NN_nb(epoch), paper Algorithm 1 verbatim.

    ``NN_nb = max(int(B - (B - nn_final) / (total_steps - 1) * steps_completed), nn_final)``
    with ``steps_completed = epoch // step_size`` and
    ``total_steps = max_epochs // step_size``, in Python floats as in the reference, so
    that B = 32, nn_final = 14, step 1, 50 epochs gives 31, 31, 30, 30, 30, 29, ..., 14, 14.

    Parameters
    ----------
    epoch : int
        Current epoch, counted from 1 (epochs past ``max_epochs`` stay at ``nn_final``).
    max_epochs : int
        Configured number of training epochs.
    batch_size : int
        Configured batch size B in subjects (not the size of a smaller last batch; the
        loss caps the result at the subjects actually present).
    nn_final : int
        Final neighbourhood size in subjects, 1 <= nn_final <= batch_size.
    step_size : int
        Epochs per shrink step, 1 <= step_size <= max_epochs // 2.

    Returns
    -------
    int
        Neighbourhood size in subjects; the loss uses V times this many rows.
    """
    check_schedule(
        max_epochs=max_epochs,
        batch_size=batch_size,
        nn_final=nn_final,
        step_size=step_size,
        step_name="step_size",
    )
    epoch = check_positive_int("epoch", epoch)
    steps_completed = epoch // step_size
    total_steps = max_epochs // step_size
    decrement_per_step = (batch_size - nn_final) / (total_steps - 1)
    return max(int(batch_size - decrement_per_step * steps_completed), nn_final)
