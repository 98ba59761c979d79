"""Training of one grid cell (docs/method.md, "Model" and "Training"), resumable at any point.

:func:`train_encoder` trains the ResNet-18 + head of one cell (one loss, one seed, one
split, one set of options) on a split folder and writes

- ``encoder.pt``: ``{"format", "model": state dict, "settings", "split", "epochs"}``, tensors
  and plain data only (``torch.load(..., weights_only=True)``), loadable as
  ``model.init_checkpoint``;
- ``history.tsv``: epoch, loss, lr, seconds, nn_nb (one row per epoch, from 1);
- ``embeddings/epoch-<EEE>.npz`` for ``train.embed_epochs``: features [n, D] float32,
  participant_id [n], age [n] (years), subset [n] ("train"/"test"), un-augmented images;
- ``features.npz``: the final encoder's features of every subject of the split, which the
  evaluation reads (:func:`write_features`).

Resuming and determinism: docs/method.md §4, "Resume and determinism". After every epoch
the full state goes to ``checkpoint.pt`` (temporary name + rename, in a background thread);
a call with the same settings and split (fingerprint) resumes from it, a foreign one is
replaced, and it is deleted once encoder.pt is written.

Integrity. ``checkpoint.pt.sha256`` beside the checkpoint holds its sha256 (``sha256sum``
format), taken from the bytes as they were written; the zip inside has no CRC32 (40% of
the cost of writing 400 MB, and torch.load would not check it). Before resuming, the
checkpoint is hashed again: a damaged file (a flipped bit, a tensor changed on disk) or
one without its digest is ignored with a warning naming it, and training starts from
scratch. The digest file is rewritten just before the rename, listing the new digest and
the one of the checkpoint it replaces, and again after it with the new one only, so a kill
between the two leaves a checkpoint that still verifies.

Writing. A start removes the temporaries a killed write left next to this training's
outputs (``.checkpoint.pt.<random>.pt`` ...). Before a checkpoint or the encoder is written,
the free space is compared with the state's tensor bytes; a full disk raises
:class:`brainage.io.WriteError` naming the file, the bytes needed and the bytes free.
encoder.pt is written through a file handle, so identical trainings give byte-identical
files (and checksums).

Several processes (torchrun, :func:`main`): :mod:`brainage.distributed`; one process, with
or without torchrun, is the path described above.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from brainage import distributed
from brainage.bundle import software_versions
from brainage.config import ConfigError, resolve_cell, train_key
from brainage.data import (
    Augmenter,
    SplitData,
    VolumeStore,
    load_split,
    plan_batches,
)
from brainage.distributed import (
    SINGLE_PROCESS,
    Processes,
    augment_share,
    check_shares,
    gather_shares,
    processes_from_environment,
)
from brainage.io import (
    WriteError,
    atomic_path,
    ensure_room,
    payload_bytes,
    remove_stale_temporaries,
    save_tensors,
    sha256_file,
    write_failure,
    write_npz,
    write_tensors,
    write_tsv,
)
from brainage.losses import make_loss
from brainage.losses._common import rbf_kernel
from brainage.models import (
    build_model,
    count_parameters,
    embed,
    embed_all,
    init_checkpoint_key,
    load_init_checkpoint,
)
from brainage.runtime import (
    epoch_seed,
    restore_rng_state,
    rng_state,
    runtime_setup,
    seed_everything,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
ENCODER_FORMAT = 1
HISTORY_COLUMNS = ("epoch", "loss", "lr", "seconds", "nn_nb")


# -- resume fingerprints ------------------------------------------------------------------

def fingerprint(settings: Mapping, split: SplitData) -> str:
    """sha256 of everything that determines the training result: settings, split, and the
    bytes of the starting checkpoint (``model.init_checkpoint``), so that a checkpoint left
    by a fine-tuning from an earlier pretrained encoder is not resumed."""
    start = settings["model"].get("init_checkpoint")
    start_digest = sha256_file(start) if start and Path(start).is_file() else None
    payload = json.dumps({"settings": settings, "split": split.identity(),
                          "init_checkpoint_sha256": start_digest}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# -- outputs ----------------------------------------------------------------------------

def embedded_kind(model_settings: Mapping, which: str) -> str:
    """What the ``which`` features of a network of ``model_settings`` are, for the figures'
    titles: ``projection`` (the projection head's unit vectors), ``regression`` (the
    regression head's output), or ``encoder`` (the pooled encoder, also what ``projection``
    gives without a head, ``model.projection_head: false``)."""
    if which != "projection" or not model_settings["projection_head"]:
        return "encoder"
    return "regression" if model_settings["head"] == "regression" else "projection"


def _write_embeddings(path: Path, features: np.ndarray, split: SplitData,
                      rows: np.ndarray, kind: str) -> None:
    """One epoch's features of ``rows``; ``kind``: :func:`embedded_kind`. A train_encoder
    job's settings carry no ``model.features`` (a read-out setting,
    :func:`brainage.config.training_settings`), so in the workflow these are the default's,
    what :meth:`brainage.models.BrainAgeNet.project` returns: the head's output, or without
    a head the encoder output itself (unit-length for the contrastive losses). Cells sharing
    the encoder may read out the other kind from features.npz."""
    write_npz(path, features=features.astype(np.float32),
              participant_id=split.participant_ids[rows].astype(str), age=split.ages[rows],
              subset=split.subset_labels()[rows].astype(str), features_kind=np.array(kind))


def embeddings_file(embeddings_dir: str | Path, epoch: int) -> Path:
    return Path(embeddings_dir) / f"epoch-{epoch:03d}.npz"


def _history_table(history: Sequence[Mapping]) -> pd.DataFrame:
    return pd.DataFrame(list(history), columns=list(HISTORY_COLUMNS))


# -- training -------------------------------------------------------------------------------

def fit_encoder(split: SplitData, settings: Mapping, *, encoder_path: str | Path,
                checkpoint_path: str | Path, history_path: str | Path | None = None,
                embeddings_dir: str | Path | None = None,
                features_path: str | Path | None = None,
                processes: Processes = SINGLE_PROCESS,
                keep_checkpoint: bool = False) -> list[dict]:
    """Train on ``split.train_index`` and write the encoder; resume from a checkpoint.

    Parameters
    ----------
    split
        Images and participants; only the training rows are used for training; embeddings
        cover training and evaluation rows.
    settings
        A cell's settings (:func:`brainage.config.cell_settings`); validated here.
    encoder_path, checkpoint_path, history_path, embeddings_dir, features_path
        Outputs (history, embeddings and features optional; :func:`write_features`).
        ``checkpoint_path`` holds the resume state between epochs and is deleted at the
        end, unless ``keep_checkpoint``: a caller that derives more from the encoder (the
        random search's features) deletes it once that is stored, so a kill in between
        resumes at the last epoch instead of training again.
    processes
        This process's place among data-parallel training processes
        (:func:`brainage.distributed.processes_from_environment`); every process calls
        this function, rank 0 writes the outputs. ``train.batch_size`` is the global batch.

    Returns
    -------
    list of dict
        The history rows (epoch, loss, lr, seconds, nn_nb).

    Raises
    ------
    ConfigError
        Batch larger than the training set, unknown options; a last batch smaller than
        the number of processes.
    FloatingPointError
        A non-finite loss (names the epoch; lower train.lr or check the data).
    WriteError
        A checkpoint or the encoder does not fit on its disk, or writing it failed (names
        the file and the free space).
    """
    settings = resolve_cell(settings)
    train_settings, loss_settings = settings["train"], settings["loss"]
    seed, epochs = settings["seed"], int(train_settings["epochs"])
    batch_size, views = int(train_settings["batch_size"]), int(train_settings["views"])
    n_train = len(split.train_index)
    if batch_size > n_train and epochs > 0:  # an untrained encoder takes no batch
        key = train_key(settings, "batch_size")
        excluded = split.stats.get("excluded") or []
        raise ConfigError(f"config key {key} is {batch_size} but split {split.name} "
                          f"has only {n_train} training subjects"
                          + (f" (after qc.exclude_failed left out the split's "
                             f"{len(excluded)} subject(s) failing QC, training and test, "
                             f"listed under 'excluded' in its stats.json: fix their "
                             f"preprocessing, or set qc.exclude_failed: false)"
                             if excluded else "")
                          + f". Lower {key} to at most {n_train}.")
    if processes.is_distributed:  # with 0 epochs too: the others wait for rank 0's writes
        if epochs > 0:
            check_shares(n_train, batch_size, processes, key=train_key(settings, "batch_size"))
        device, autocast_dtype = runtime_setup(train_settings, local_rank=processes.local_rank,
                                               processes_on_node=processes.local_world_size)
        distributed.join(processes, device)
    else:
        device, autocast_dtype = runtime_setup(train_settings)
    channels_last = device.type == "cuda"
    writes = processes.is_main  # the other processes compute, rank 0 also writes

    seed_everything(seed)
    channels = split.channel_indices(settings["model"]["modalities"])
    model = build_model(settings["model"], in_channels=len(channels))
    if epochs == 0 and not writes:  # nothing to train: rank 0 writes the encoder
        distributed.barrier(processes)
        return []
    if epochs == 0:  # the untrained or frozen baseline: its starting weights as they are
        for output in (encoder_path, features_path, history_path):
            if output is not None:
                remove_stale_temporaries(output)
        random_head = 0  # head tensors the starting checkpoint left at initialisation
        if settings["model"]["init_checkpoint"]:
            report = load_init_checkpoint(model, settings["model"]["init_checkpoint"],
                                          key=init_checkpoint_key(settings["model"]),
                                          modalities=settings["model"].get("modalities"))
            if settings["model"]["projection_head"]:
                random_head = sum(key.startswith("head.") for key in report.missing)
        model.to(device)
        digest = _save_encoder(encoder_path, model, settings, split, epochs)
        if features_path is not None:
            write_features(features_path, model, split, digest, device=device,
                           channels=channels, random_head=random_head)  # no loss
        if history_path is not None:
            write_tsv(history_path, _history_table([]))
        if checkpoint_path is not None:  # a training of this cell killed before it was
            for leftover in (Path(checkpoint_path), checkpoint_digest_file(checkpoint_path)):
                leftover.unlink(missing_ok=True)  # set to 0 epochs: hundreds of MB
        if settings["model"]["init_checkpoint"]:
            log.info("train.epochs is 0: wrote the encoder of %s as it is (not fine-tuned)",
                     settings["model"]["init_checkpoint"])
        else:
            log.info("train.epochs is 0: wrote the initial encoder of seed %d untrained", seed)
        distributed.barrier(processes)
        return []
    loss_fn = _make_loss(loss_settings, split, epochs=epochs, batch_size=batch_size,
                         warn=processes.is_main)  # one warning, not one per process
    augmenter = Augmenter.from_settings(train_settings, loss_settings["name"],
                                        resolution_mm=split.resolution_mm,
                                        affine=split.stats.get("affine"))

    checkpoint_path = Path(checkpoint_path)
    embed_epochs = sorted(epoch for epoch in set(train_settings["embed_epochs"]) if epoch <= epochs)
    outputs = [Path(encoder_path), checkpoint_path, checkpoint_digest_file(checkpoint_path)]
    outputs += [Path(history_path)] if history_path is not None else []
    outputs += [Path(features_path)] if features_path is not None else []
    outputs += ([embeddings_file(embeddings_dir, epoch) for epoch in embed_epochs]
                if embeddings_dir is not None else [])
    identity = fingerprint(settings, split)
    checkpoint, checkpoint_digest = None, None
    if writes:
        for output in outputs:
            remove_stale_temporaries(output)
        checkpoint, checkpoint_digest = read_checkpoint(
            checkpoint_path, identity,
            memory_key=train_key(settings, "mem_mb", section="resources"))
    if processes.is_distributed:
        # rank 0 verified the file; nobody writes it before every process has read it
        resume_from = distributed.broadcast_from_main(processes, checkpoint_digest)
        if resume_from is not None and not writes:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if checkpoint is None and settings["model"].get("init_checkpoint"):
        load_init_checkpoint(model, settings["model"]["init_checkpoint"],
                             key=init_checkpoint_key(settings["model"]),
                             modalities=settings["model"].get("modalities"))
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    loss_fn.to(device)
    optimizer = make_optimizer(model, train_settings)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer,
                                                step_size=int(train_settings["lr_step_epochs"]),
                                                gamma=float(train_settings["lr_gamma"]))
    history: list[dict] = []
    embeddings: dict[int, torch.Tensor] = {}
    start_epoch = 1
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        loss_fn.load_state_dict(checkpoint["loss"])
        history = [dict(row) for row in checkpoint["history"]]
        embeddings = {int(epoch): tensor for epoch, tensor in checkpoint["embeddings"].items()}
        restore_rng_state(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"]) + 1
        log.info("resuming from %s after epoch %d of %d", checkpoint_path, start_epoch - 1,
                 epochs)
    # on resuming too: a retry may land on another node, device or precision
    log.info("training %s (%.1f M parameters) on %s: %d training subjects of %s, %s, "
             "batch %d x %d views, %d epochs, augmentation %s, %s", loss_settings["name"],
             count_parameters(model) / 1e6, device, n_train, split.name,
             "x".join(map(str, split.shape)), batch_size, views, epochs, augmenter.kind,
             "bf16" if autocast_dtype is not None else "float32")
    # a changed environment reruns no training (the workflow profile's rerun triggers):
    # the log says what this one ran with
    log.info("versions: %s", ", ".join(f"{name} {version}"
                                       for name, version in software_versions().items()))
    if processes.is_distributed:
        log.info("each batch of %d is shared by %d processes (%d on this node, %d CPU "
                 "threads each)", batch_size, processes.world_size, processes.local_world_size,
                 torch.get_num_threads())
    network = distributed.data_parallel(model, processes, device)  # model itself in one process

    store = VolumeStore(split.images, device, channels=channels)
    ages = torch.tensor(split.ages, dtype=torch.float32, device=device)
    embed_rows = np.concatenate([split.train_index, split.eval_index])
    which = settings["model"]["features"]
    kind = embedded_kind(settings["model"], which)
    if embeddings_dir is not None and writes:  # files lost with a cleaned output folder come back
        for epoch, features in embeddings.items():
            if not embeddings_file(embeddings_dir, epoch).exists():
                _write_embeddings(embeddings_file(embeddings_dir, epoch), features.numpy(),
                                  split, embed_rows, kind)

    writer = CheckpointWriter(checkpoint_path, replaces=checkpoint_digest) if writes else None
    try:
        for epoch in range(start_epoch, epochs + 1):
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            mean_loss = run_epoch(network, loss_fn, optimizer, store, augmenter,
                                  split.train_index, ages, epoch=epoch, seed=seed,
                                  batch_size=batch_size, views=views,
                                  autocast_dtype=autocast_dtype, channels_last=channels_last,
                                  processes=processes)
            # the same in every process; rank 0's makes the decision below everyone's
            mean_loss = distributed.broadcast_from_main(processes, mean_loss)
            train_seconds = time.perf_counter() - started
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"loss is {mean_loss} in epoch {epoch} ({loss_settings['name']}, split "
                    f"{split.name}, seed {seed}). Lower config key "
                    f"{train_key(settings, 'lr')} or check the images.")
            if broken := _non_finite_state(model):
                raise FloatingPointError(
                    f"{broken} of the encoder holds NaN or infinity after epoch {epoch} "
                    f"({loss_settings['name']}, split {split.name}, seed {seed}), although "
                    f"the loss is finite: such an encoder gives every subject the same "
                    f"features. Lower config key {train_key(settings, 'lr')}.")
            scheduler.step()
            if embeddings_dir is not None and epoch in embed_epochs and writes:
                features = embed(model, store, embed_rows, which=which,
                                 channels_last=channels_last)
                embeddings[epoch] = torch.from_numpy(features)
                _write_embeddings(embeddings_file(embeddings_dir, epoch), features, split,
                                  embed_rows, kind)
            neighbours = (loss_fn.neighbour_count(epoch, batch_size)
                          if hasattr(loss_fn, "neighbour_count") else None)
            history.append({"epoch": epoch, "loss": mean_loss, "lr": lr,
                            "seconds": time.perf_counter() - started, "nn_nb": neighbours})
            if writer is not None:
                writer.submit(_snapshot({
                    "format": CHECKPOINT_FORMAT, "fingerprint": identity, "epoch": epoch,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(),
                    "history": history, "embeddings": embeddings, "rng": rng_state()}))
            history[-1]["seconds"] = time.perf_counter() - started
            if history_path is not None and writes:
                write_tsv(history_path, _history_table(history))
            log.info("epoch %d/%d loss %.4f lr %.3g%s %.1f s (%.1f volumes/s)", epoch, epochs,
                     mean_loss, lr, f" nn_nb {neighbours}" if neighbours is not None else "",
                     history[-1]["seconds"], views * n_train / train_seconds)
    finally:
        if writer is not None:
            writer.wait(quiet=True)  # a failed epoch still leaves the last checkpoint

    if not writes:
        distributed.barrier(processes)  # ends once rank 0 has written the outputs
        return history
    writer.wait()
    digest = _save_encoder(encoder_path, model, settings, split, epochs)
    if features_path is not None:
        write_features(features_path, model, split, digest, device=device,
                       channels_last=channels_last, channels=channels,
                       trained_loss=loss_settings)
    if history_path is not None:
        write_tsv(history_path, _history_table(history))
    if not keep_checkpoint:
        remove_checkpoint(checkpoint_path)
    log.info("wrote %s", encoder_path)
    distributed.barrier(processes)
    return history


#: Keys of the loss section that choose the loss or its values rather than parametrise it:
#: ``nn_from_search`` is applied before training (brainage.search.apply_search_result).
NOT_LOSS_PARAMETERS = ("name", "nn_from_search")


def loss_parameters(loss_settings: Mapping) -> dict:
    """The keyword arguments of :func:`brainage.losses.make_loss` in a loss section."""
    return {key: value for key, value in loss_settings.items()
            if key not in NOT_LOSS_PARAMETERS}


def _make_loss(loss_settings: Mapping, split: SplitData, *, epochs: int, batch_size: int,
               warn: bool = True):
    """The cell's loss; the supervised baseline's is scaled by the training ages. ``warn``:
    of an age kernel wide for those ages (:func:`warn_of_a_wide_age_kernel`)."""
    ages = split.ages[split.train_index]
    params = loss_parameters(loss_settings)
    try:
        loss = make_loss(loss_settings["name"], **params, max_epochs=epochs,
                         batch_size=batch_size, age_mean=float(ages.mean()),
                         age_sd=float(ages.std() or 1.0))
    except ValueError as error:
        raise ConfigError(f"config section loss (loss {loss_settings['name']!r}): "
                          f"{error}") from None
    if warn and loss_settings["name"] in SIGMA_SCALED_LOSSES:
        warn_of_a_wide_age_kernel(loss.sigma, ages)
    return loss


#: Mean age-kernel weight over pairs of training subjects above which ``loss.sigma`` is
#: wide for the cohort (docs/method.md, "sigma on another cohort"). At sigma 2 years: 0.08
#: in a cohort like the paper's, 0.19 aged 65-90, 0.38 aged 6-18 (results within the seeds'
#: spread of a scaled sigma), 0.5 among students aged 18-26 and 0.98 in one school year,
#: where the kernel losses trained encoders barely better than the mean age.
WIDE_KERNEL_WEIGHT = 0.4
#: The losses that a wide sigma degrades: Threshold repels by the order of the weights, not
#: their size, and still scored an age-ordered embedding best at every age scale a review
#: tried (one school year included); SimCLR ignores the ages.
SIGMA_SCALED_LOSSES = ("yaware", "exponential", "adaptive")
#: The paper's sigma (years) and its cohort's age sd (years, its Table 2).
PAPER_SIGMA, PAPER_AGE_SD = 2.0, 21.9
#: Training ages compared pair by pair at most (evenly spaced in age order): enough for the
#: mean weight, where 10,000 pretraining subjects would take 800 MB.
KERNEL_SAMPLE = 2000
_warned_kernels: set[tuple[float, float]] = set()  # a search's 30 trials warn once


def mean_kernel_weight(sigma: float, ages: np.ndarray) -> float:
    """The mean weight of the losses' age kernel (:func:`brainage.losses._common.rbf_kernel`)
    over pairs of distinct subjects of ``ages`` (years; sigma in years); NaN for fewer
    than two."""
    ages = np.sort(np.asarray(ages, dtype=np.float64))
    if len(ages) > KERNEL_SAMPLE:
        ages = ages[np.linspace(0, len(ages) - 1, KERNEL_SAMPLE).round().astype(np.int64)]
    if len(ages) < 2:
        return float("nan")
    weights = rbf_kernel(torch.from_numpy(ages), sigma)
    return float((weights.sum() - len(ages)) / (len(ages) * (len(ages) - 1)))


def warn_of_a_wide_age_kernel(sigma: float, ages: np.ndarray) -> None:
    """Warn when ``loss.sigma`` (years) is wide for the training ``ages``: the kernel then
    counts most pairs as same-age and the loss can prefer every subject at one point
    (a cohort of one age group), silently, and Table 3 measures the setting."""
    weight = mean_kernel_weight(sigma, ages)
    if not weight > WIDE_KERNEL_WEIGHT or (sigma, round(weight, 3)) in _warned_kernels:
        return
    _warned_kernels.add((sigma, round(weight, 3)))
    spread = float(np.std(ages))
    advice = (f"Set loss.sigma (the variant's, or pretrain.<run>.loss.sigma) to about "
              f"{PAPER_SIGMA * spread / PAPER_AGE_SD:.2g} years, the paper's ratio to the age sd."
              if spread > 0 else "Every training subject of the split has one age: no sigma "
              "can tell them apart; add subjects of other ages or use another loss.")
    log.warning("loss.sigma is %g years, wide for the training ages (%.1f-%.1f years, sd "
                "%.1f): the age kernel weighs the average pair of training subjects %.2f "
                "(0.08 in a cohort like the paper's, sd %.1f years), so the loss counts most "
                "pairs as same-age and can prefer every subject at one point. %s", sigma,
                float(np.min(ages)), float(np.max(ages)), spread, weight, PAPER_AGE_SD, advice)


def _save_encoder(path: str | Path, model, settings: Mapping, split: SplitData,
                  epochs: int) -> str:
    """``encoder.pt``: the state dict with the settings and split it was trained with;
    returns the file's sha256."""
    return save_tensors(path, {"format": ENCODER_FORMAT,
                               "model": {key: value.detach().cpu().contiguous()
                                         for key, value in model.state_dict().items()},
                               "settings": settings, "split": split.name, "epochs": epochs})


def _non_finite_state(model) -> str | None:
    """The name of the first parameter or buffer of ``model`` that holds NaN or infinity,
    else None. The loss can stay finite while batch-norm statistics overflow (a learning
    rate far too high): the encoder then maps every subject to zero features and Table 3
    showed a constant read-out as if it were a poor loss."""
    tensors = {name: tensor for name, tensor in model.state_dict().items()
               if tensor.is_floating_point()}
    finite = torch.stack([tensor.isfinite().all() for tensor in tensors.values()])
    if bool(finite.all()):  # one host synchronisation per epoch
        return None
    return next(name for name, ok in zip(tensors, finite.tolist()) if not ok)


def write_features(path: str | Path, model, split: SplitData, encoder_sha256: str, *,
                   device, channels_last: bool = False,
                   channels: Sequence[int] | None = None,
                   trained_loss: Mapping | None = None, random_head: int = 0) -> None:
    """``features.npz``: the final encoder's features of every split subject, training rows
    then evaluation rows, both kinds (``encoder`` [n, 8 x width] and ``projection``
    [n, projection_dim], float32), with ``participant_id``, ``subset``, ``age`` (years),
    ``study``, the ``encoder_sha256`` they came from and ``trained_loss``, the loss
    settings the encoder was trained with as JSON (after ``loss.nn_from_search``: the
    values used, not the configured ones), so that evaluation can report them; and
    ``random_head``, how many head tensors an untrained cell's starting checkpoint left at
    random initialisation (its projections are then a random head's: evaluation, which
    knows the read-out's ``model.features``, says so).

    Computed once, where the network already is (on the GPU at paper scale), so that every
    read-out of the encoder (the cells that share it, the Fig. 4d ablation) is fitted on
    them without loading a network again.
    """
    rows = np.concatenate([split.train_index, split.eval_index])
    store = VolumeStore(split.images, device, channels=channels)
    features = embed_all(model, store, rows, channels_last=channels_last)
    write_npz(path, **features, participant_id=split.participant_ids[rows].astype(str),
              subset=split.subset_labels()[rows].astype(str), age=split.ages[rows],
              study=split.studies[rows].astype(str), encoder_sha256=np.array(encoder_sha256),
              trained_loss=np.array(json.dumps(dict(trained_loss or {}), sort_keys=True)),
              random_head=np.array(int(random_head)))


def run_epoch(model, loss_fn, optimizer, store: VolumeStore, augmenter: Augmenter,
              train_rows: np.ndarray, ages: torch.Tensor, *, epoch: int, seed: int,
              batch_size: int, views: int, autocast_dtype: torch.dtype | None = None,
              channels_last: bool = False, processes: Processes = SINGLE_PROCESS) -> float:
    """One epoch of contrastive training over ``train_rows``; returns the mean loss.

    Batch order and augmentations come from generators seeded by (seed, epoch). Each batch
    is gathered in one read, augmented ``views`` times as whole-batch tensor operations,
    and forwarded as one view-major stack [V*b, C, X, Y, Z]; the loss is synchronised with
    the host once per epoch.

    Shared by several processes (``processes``; ``model`` from
    :func:`brainage.distributed.data_parallel`), ``batch_size`` is the global batch: each
    process reads, augments and forwards its share and the loss sees the features of the
    whole batch, so the loss, the mean returned and the gradients are those of one
    process (:mod:`brainage.distributed`).
    """
    device = store.device
    model.train()
    batch_rng = np.random.default_rng(epoch_seed(seed, epoch, 0))
    generator = torch.Generator(device=device)
    generator.manual_seed(epoch_seed(seed, epoch, 1))
    loss_sum = torch.zeros((), device=device)
    for positions in plan_batches(len(train_rows), batch_size, batch_rng):
        rows = train_rows[positions]
        volumes = store.gather(rows[processes.share(len(rows))])
        stacked = torch.cat([augment_share(augmenter, volumes, generator, processes=processes,
                                           batch=len(rows)) for _ in range(views)])
        if channels_last:
            stacked = stacked.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            projected = model(stacked)
        # model rows are view-major [V*b, D]; the loss wants [b, V, D] (of the global batch)
        features = projected.float().view(views, len(volumes), -1).transpose(0, 1)
        features = gather_shares(features, processes, len(rows))
        loss = loss_fn(features, ages[torch.from_numpy(rows).to(device)], epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(rows)
    mean_loss = float(loss_sum) / len(train_rows)  # the one host sync of the epoch
    return mean_loss


def make_optimizer(model, train_settings: Mapping) -> torch.optim.Optimizer:
    """Adam (lr, weight decay from the config); the fused kernel where PyTorch has one
    (CPU and CUDA, torch >= 2.4): one pass over the 33.5 M parameters instead of a Python
    loop over 64 tensors, 3-6x faster steps on the CPU."""
    options = dict(lr=float(train_settings["lr"]),
                   weight_decay=float(train_settings["weight_decay"]))
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **options)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), **options)


def remove_checkpoint(checkpoint_path: str | Path) -> None:
    """Delete a finished training's checkpoint and its checksum file (when present)."""
    Path(checkpoint_path).unlink(missing_ok=True)
    checkpoint_digest_file(checkpoint_path).unlink(missing_ok=True)


def checkpoint_digest_file(checkpoint_path: str | Path) -> Path:
    """``<checkpoint>.sha256``: the sha256 of the checkpoint (``sha256sum`` format)."""
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.with_name(checkpoint_path.name + ".sha256")


def _write_digests(checkpoint_path: Path, digests: Sequence[str | None]) -> None:
    lines = "".join(f"{digest}  {checkpoint_path.name}\n" for digest in digests if digest)
    with atomic_path(checkpoint_digest_file(checkpoint_path)) as temp:
        temp.write_text(lines)


def _recorded_digests(checkpoint_path: Path) -> set[str]:
    try:
        text = checkpoint_digest_file(checkpoint_path).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return set()
    return {line.split()[0] for line in text.splitlines() if line.strip()}


def read_checkpoint(path: str | Path, identity: str, *,
                    memory_key: str | None = None) -> tuple[dict | None, str | None]:
    """The resume state at ``path`` and its sha256 if the file is intact and belongs to
    this training (``identity``: :func:`fingerprint`), else ``(None, None)`` with a
    warning that names the file and why it is not used. ``memory_key``: the config key of
    the job's memory, for the message when the file cannot be loaded (by default every
    candidate: :func:`brainage.config.train_key` of settings without names).

    Raises
    ------
    RuntimeError
        The file is intact (its digest matches) but cannot be loaded now: the file stays.
    """
    path = Path(path)
    if not path.exists():
        return None, None
    digest_file = checkpoint_digest_file(path)
    recorded = _recorded_digests(path)
    if not recorded:
        log.warning("ignoring checkpoint %s: its checksum file %s is missing, so the checkpoint "
                    "cannot be verified; training from scratch", path, digest_file)
        return None, None
    digest = sha256_file(path)
    if digest not in recorded:
        log.warning("ignoring damaged checkpoint %s: its sha256 %s differs from the one "
                    "recorded in %s when it was written; training from scratch", path, digest,
                    digest_file)
        return None, None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # the bytes are the ones this code wrote (the digest matched), so what failed is the
        # node (memory, file system) or the PyTorch reading them; training from scratch
        # would overwrite the finished epochs with its first one
        raise RuntimeError(
            f"cannot read the verified training checkpoint {path} ({type(error).__name__}: "
            f"{error}). Its epochs are kept: run the job again with more memory (config key "
            f"{memory_key or train_key({}, 'mem_mb', section='resources')}) or with the "
            f"PyTorch version that wrote it; to train from scratch instead, delete {path} and "
            f"{digest_file}.") from error
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("fingerprint") != identity:
        log.warning("ignoring checkpoint %s: it belongs to other settings or another split; "
                    "training from scratch", path)
        return None, None
    return checkpoint, digest


def _snapshot(value):
    """A deep copy of a state tree with every tensor copied to the CPU, so the live model
    can go on training while the copy is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(item) for item in value)
    return value


def save_checkpoint(path: str | Path, state: dict, *, replaces: str | None = None) -> str:
    """Write a checkpoint and its digest file; returns the checkpoint's sha256.

    The checkpoint goes to a temporary name and is renamed, so a kill never leaves a torn
    checkpoint; the zip has no CRC32 (the sha256 covers every byte). ``replaces`` is the
    digest of the checkpoint on disk now: the digest file accepts it too until the rename
    is done.

    Raises
    ------
    WriteError
        Naming the file: too little free space for the state's tensors, or a failed write.
    """
    path = Path(path)
    ensure_room(path, payload_bytes(state))
    with atomic_path(path) as temp:
        digest = write_tensors(temp, state, zip_crc32=False)
        _write_digests(path, [digest, replaces])
    _write_digests(path, [digest])
    return digest


class CheckpointWriter:
    """Writes checkpoints in a background thread while the next epoch trains.

    The state is snapshotted (copied to the CPU) by the caller before :meth:`submit`; one
    write is in flight at most, so a kill during a write loses at most that epoch, which a
    resumed run repeats with the same seeds (same result).
    """

    def __init__(self, path: Path, *, replaces: str | None = None) -> None:
        """``replaces``: the sha256 of the valid checkpoint at ``path`` (resumed from), if
        any."""
        self.path = Path(path)
        self._digest = replaces
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, state: dict) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(state,),
                                        name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _write(self, state: dict) -> None:
        try:
            self._digest = save_checkpoint(self.path, state, replaces=self._digest)
        except BaseException as error:  # re-raised in the training thread by wait()
            self._error = error

    def wait(self, *, quiet: bool = False) -> None:
        """Block until the last checkpoint is on disk; re-raise a failed write as
        :class:`WriteError` whose message names the file and the free space (unless
        ``quiet``, used while another error is already propagating)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and not quiet:
            error, self._error = self._error, None
            if isinstance(error, WriteError):  # already names the file and the free space
                raise WriteError(str(error)) from error
            raise write_failure(self.path, error) from error


def train_encoder(split_dir: str | Path, settings: Mapping, *, encoder_path: str | Path,
                  history_path: str | Path, embeddings_dir: str | Path,
                  checkpoint_path: str | Path, features_path: str | Path | None = None,
                  processes: Processes = SINGLE_PROCESS) -> list[dict]:
    """Train one grid cell on a split folder (see the module docstring for the outputs),
    in this process or as one of several (``processes``, as :func:`fit_encoder`).

    Raises
    ------
    DataError
        The split folder is incomplete, inconsistent, holds NaN, or has no test subjects.
    ConfigError
        As :func:`fit_encoder`.
    """
    split = load_split(split_dir)
    if processes.is_main:
        Path(embeddings_dir).mkdir(parents=True, exist_ok=True)
    return fit_encoder(split, settings, encoder_path=encoder_path,
                       checkpoint_path=checkpoint_path, history_path=history_path,
                       embeddings_dir=embeddings_dir, features_path=features_path,
                       processes=processes)


# -- command line: one process, or one of several started by torchrun ----------------------

def read_settings(path: str | Path) -> dict:
    """A cell's training settings from a JSON file: the mapping rule train_encoder passes
    as ``params.settings`` (:func:`brainage.config.training_settings`).

    Raises
    ------
    ConfigError
        The file is missing, not JSON, or not a JSON object (naming it).
    """
    path = Path(path)
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"settings file {path} does not exist. Write the cell's training "
                          f"settings (brainage.config.training_settings) there as JSON."
                          ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"settings file {path} is not valid JSON ({error}). Write the "
                          f"cell's training settings there with json.dump.") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"settings file {path} holds a JSON {type(settings).__name__}; "
                          f"expected an object with the sections seed, loss, train, model.")
    return settings


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m brainage.train",
        description="Train one grid cell's encoder (brainage.train.train_encoder); started "
                    "by torchrun, the processes share each batch (brainage.distributed).")
    parser.add_argument("--split-dir", required=True,
                        help="split folder (images.npy, participants.tsv, stats.json)")
    parser.add_argument("--settings", required=True,
                        help="JSON file with the cell's training settings "
                             "(brainage.config.training_settings)")
    parser.add_argument("--encoder", required=True, help="encoder.pt to write")
    parser.add_argument("--history", required=True, help="history.tsv to write")
    parser.add_argument("--embeddings", required=True,
                        help="folder for the embeddings of train.embed_epochs")
    parser.add_argument("--features", required=True, help="features.npz to write")
    parser.add_argument("--checkpoint", required=True,
                        help="resume state between epochs (kept after a kill, deleted at the end)")
    parser.add_argument("--log-file", "--log", dest="log", default=None,
                        help="log file of rank 0, keeping earlier attempts (brainage.logs); "
                             "the other processes log warnings and errors to stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``[torchrun --standalone --nproc_per_node N -m] python -m brainage.train ...``
    (:mod:`brainage.distributed` has the multi-node form)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: torchrun's failure summary shows the traceback of the process that failed
    return record(_train_from_command_line)(argv)


def _train_from_command_line(argv: Sequence[str] | None) -> int:
    from brainage.logs import FORMAT, log_to_file

    arguments = _parse_arguments(argv)
    processes = processes_from_environment()
    if processes.is_main:
        log_to_file(arguments.log)
    else:
        logging.basicConfig(level=logging.WARNING, format=f"rank {processes.rank} {FORMAT}",
                            force=True)
    settings = read_settings(arguments.settings)
    try:
        train_encoder(arguments.split_dir, settings, encoder_path=arguments.encoder,
                      history_path=arguments.history, embeddings_dir=arguments.embeddings,
                      checkpoint_path=arguments.checkpoint, features_path=arguments.features,
                      processes=processes)
    except torch.distributed.DistError as error:
        if not processes.is_distributed:
            raise
        raise distributed.DistributedError(
            f"training process {processes.rank} of {processes.world_size}: an exchange with "
            f"the other processes failed ({error}). If another process failed or was killed "
            f"first, its error (torchrun's 'Root Cause') names the cause.") from error
    distributed.leave()
    return 0


if __name__ == "__main__":
    # Run the package module's main, not this __main__ copy, so loggers are named
    # brainage.train (log files and level settings address the package).
    from brainage.train import main as package_main

    raise SystemExit(package_main())
