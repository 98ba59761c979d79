"""Encoder and projection head (docs/method.md §3), and checkpoint loading.

The encoder rho is MONAI's 3D ResNet-18 (BasicBlocks [2, 2, 2, 2], widths 64/128/256/512,
first convolution 7x7x7 with stride 2 followed by a max-pool, global average pool, no
classification layer) mapping a volume [B, C, X, Y, Z] (C = len(model.modalities)) to h
[B, 512]. The projection pi is the MLP 512 -> 512 -> ReLU -> 128 whose output is
L2-normalised. Module names follow the reference code (``encoder.*``, ``head.0.*``,
``head.2.*``), so a checkpoint pre-trained on OpenBHB with the reference code loads
without renaming once a ``module.`` prefix is gone.

Loading a foreign checkpoint (:func:`load_init_checkpoint`) strips known wrapper prefixes,
tries the key under ``encoder.`` when it is a bare ResNet key, and accepts a tensor only when
its shape matches (a one-channel first convolution also starts a C-channel one, replicated
and divided by C); everything that did not load is logged (missing, unexpected, shape
mismatch).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from brainage.config import ConfigError, pretrained_run
from brainage.runtime import full_float32

log = logging.getLogger(__name__)

#: MONAI's ResNet-18 first-stage width, which its ``widen_factor`` scales.
RESNET_WIDTH = 64
FEATURE_CHOICES = ("projection", "encoder")
#: Wrappers that training code puts in front of parameter names (DataParallel, Lightning,
#: timm-style EMA, our own bundles); stripped repeatedly when loading a foreign state dict.
KNOWN_PREFIXES = ("module.", "model.", "net.", "_orig_mod.", "backbone.")


class DeterministicMaxPool3d(nn.MaxPool3d):
    """MONAI's stem max-pool, whose gradient is deterministic on CUDA under
    ``torch.use_deterministic_algorithms`` (``train.deterministic``).

    PyTorch's 3D max-pool backward on CUDA adds each output's gradient into its input
    voxel with atomic additions, so overlapping windows (kernel 3, stride 2) sum in a
    different order from run to run: it is on PyTorch's list of nondeterministic
    operations, and a deterministic CUDA training did not repeat bit for bit (H200,
    tests/test_cuda.py). The 2D max-pool's backward gathers each input pixel's gradient
    instead. So under deterministic algorithms, on CUDA, the pool runs as a 2D pool over
    each (Y, Z) plane followed by one along X (:func:`max_pool3d_in_2d_passes`): the same
    maxima, since the maximum over a box is the maximum over X of the maxima over its
    (Y, Z) planes. Otherwise it is ``nn.MaxPool3d`` itself. No parameters: checkpoints are
    unaffected.
    """

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        if volumes.is_cuda and torch.are_deterministic_algorithms_enabled():
            return max_pool3d_in_2d_passes(volumes, self.kernel_size, self.stride, self.padding)
        return super().forward(volumes)


def max_pool3d_in_2d_passes(volumes: torch.Tensor, kernel_size, stride, padding) -> torch.Tensor:
    """``F.max_pool3d(volumes, kernel_size, stride, padding)`` of [B, C, X, Y, Z] computed
    by ``F.max_pool2d`` over (Y, Z), then along X: equal maxima; gradients equal where the
    maximum of a window is unique (ties may route the gradient to another of the equal
    voxels)."""
    (kx, ky, kz), (sx, sy, sz), (px, py, pz) = (
        _three(value) for value in (kernel_size, stride, padding))
    batch, channels, size_x = volumes.shape[:3]
    planes = F.max_pool2d(volumes.reshape(batch, channels * size_x, *volumes.shape[3:]),
                          (ky, kz), (sy, sz), (py, pz))
    size_y, size_z = planes.shape[2:]
    lines = F.max_pool2d(planes.reshape(batch * channels, 1, size_x, size_y * size_z),
                         (kx, 1), (sx, 1), (px, 0))
    return lines.reshape(batch, channels, lines.shape[2], size_y, size_z)


def _three(value) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


class DeterministicGlobalAvgPool3d(nn.AdaptiveAvgPool3d):
    """MONAI's global average pool (output 1 x 1 x 1). Under deterministic algorithms on
    CUDA it is a mean over the spatial axes, whose backward spreads the gradient without
    the adaptive pool's atomic additions (listed as nondeterministic by PyTorch); the
    same average up to float rounding. Otherwise ``nn.AdaptiveAvgPool3d`` itself."""

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        if volumes.is_cuda and torch.are_deterministic_algorithms_enabled():
            return volumes.mean(dim=(2, 3, 4), keepdim=True)
        return super().forward(volumes)


class BrainAgeNet(nn.Module):
    """ResNet-18 encoder with a projection head (contrastive losses) or a regression head
    (the supervised baseline).

    Parameters
    ----------
    width
        Channels of the first stage; the four stages have width x (1, 2, 4, 8), and the
        encoder output has 8 x width features (paper: 64, so 512). A narrower network is a
        demo option for CPUs, not the paper's.
    in_channels
        Input maps per subject (stiffness alone: 1).
    projection_head
        Train with the MLP head (paper). Without it the loss sees the L2-normalised
        encoder output.
    hidden_dim, projection_dim
        Widths of the head (512 and 128 in the paper).
    head
        ``projection``: the head's output is L2-normalised (what the contrastive losses
        compare); ``regression``: the head's raw output, one standardised age
        (``projection_dim`` 1).
    conv1_stride, max_pool, bias_downsample
        Stem and shortcut options of MONAI's ResNet (defaults: stride 2, max-pool on,
        shortcut convolutions without bias, as the reference).
    """

    def __init__(self, *, width: int = 64, in_channels: int = 1, projection_head: bool = True,
                 hidden_dim: int = 512, projection_dim: int = 128, head: str = "projection",
                 conv1_stride: int = 2, max_pool: bool = True,
                 bias_downsample: bool = False) -> None:
        super().__init__()
        from monai.networks.nets import resnet18

        self.encoder = resnet18(spatial_dims=3, n_input_channels=in_channels, feed_forward=False,
                                conv1_t_size=7, conv1_t_stride=conv1_stride,
                                no_max_pool=not max_pool, shortcut_type="B",
                                bias_downsample=bias_downsample,
                                widen_factor=width / RESNET_WIDTH)
        # train.deterministic on CUDA: pools whose gradients add in a fixed order
        stem_pool = self.encoder.maxpool
        self.encoder.maxpool = DeterministicMaxPool3d(stem_pool.kernel_size, stem_pool.stride,
                                                      stem_pool.padding)
        self.encoder.avgpool = DeterministicGlobalAvgPool3d(self.encoder.avgpool.output_size)
        self.encoder_dim = 8 * width
        self.normalise = head == "projection"
        if projection_head:
            self.head = nn.Sequential(nn.Linear(self.encoder_dim, hidden_dim),
                                      nn.ReLU(inplace=True), nn.Linear(hidden_dim, projection_dim))
        else:
            self.head = None
        self.projection_dim = projection_dim if projection_head else self.encoder_dim

    def encode(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes [B, C, X, Y, Z] (z-units) -> encoder features h [B, 8 x width]."""
        return self.encoder(volumes)

    def project(self, encoded: torch.Tensor) -> torch.Tensor:
        """h -> the head's output [B, projection_dim]: unit vectors for a projection head,
        raw values for a regression head."""
        projected = self.head(encoded) if self.head is not None else encoded
        return F.normalize(projected.float(), dim=1) if self.normalise else projected.float()

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes [B, C, X, Y, Z] -> the features the loss sees, [B, D]."""
        return self.project(self.encode(volumes))

    @torch.no_grad()
    def features(self, volumes: torch.Tensor, which: str = "projection") -> torch.Tensor:
        """Read-out features: after the projection (paper) or before it (Fig. 4d), [B, D].

        Computed in eval mode (batch-norm running statistics, which stay as they are), the
        module's mode restored afterwards, like :func:`embed_all`; in the precision of the
        caller's context (:func:`embed_all` forces full float32)."""
        if which not in FEATURE_CHOICES:
            raise ConfigError(f"config key model.features is {which!r}; expected one of "
                              f"{', '.join(FEATURE_CHOICES)}.")
        was_training = self.training
        self.eval()
        try:
            encoded = self.encode(volumes)
            return encoded.float() if which == "encoder" else self.project(encoded)
        finally:
            self.train(was_training)


def build_model(model_settings: Mapping, *, in_channels: int | None = None) -> BrainAgeNet:
    """The network of one grid cell from a resolved ``model`` section
    (:func:`brainage.config.resolve_cell`).

    ``in_channels``: the input channels; by default one per entry of ``model.modalities``
    (one when it is unset).

    Raises
    ------
    ConfigError
        An unknown ``model.features``, or a ``model.encoder`` other than ``resnet18``: a
        backbone added to the schema without a branch here trained a ResNet-18 under its
        name. (Read-out features after a projection head that is switched off are refused
        by :func:`brainage.config.check_cell`: training builds the model without the
        read-out's ``features``, so this check cannot live here.)
    """
    encoder = model_settings.get("encoder", "resnet18")  # bundles of format 1 lack it
    if encoder != "resnet18":
        raise ConfigError(f"config key model.encoder is {encoder!r}: brainage.models."
                          f"build_model builds resnet18 only (docs/architecture.md §9, "
                          f"a backbone).")
    features = model_settings["features"]
    if features not in FEATURE_CHOICES:
        raise ConfigError(f"config key model.features is {features!r}; expected one of "
                          f"{', '.join(FEATURE_CHOICES)}.")
    if in_channels is None:
        in_channels = len(model_settings.get("modalities") or ["stiffness"])
    return BrainAgeNet(width=model_settings["width"], in_channels=in_channels,
                       projection_head=model_settings["projection_head"],
                       hidden_dim=model_settings["hidden_dim"],
                       projection_dim=model_settings["projection_dim"],
                       conv1_stride=model_settings["conv1_stride"],
                       max_pool=model_settings["max_pool"],
                       bias_downsample=model_settings["bias_downsample"],
                       head=model_settings["head"])


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


# -- trained encoders: loading and embedding --------------------------------------------------

#: Volumes embedded at once (inference only; memory is not an issue on CPU or GPU).
EMBED_BATCH = 32


def load_encoder(path: str | Path, model_settings: Mapping) -> BrainAgeNet:
    """The trained network of a cell from ``encoder.pt`` (strict: every key must match).

    ``encoder.pt`` holds tensors and plain data only; it is read with
    ``weights_only=True``, so a file from elsewhere cannot run code.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Naming the file: it cannot be read with ``weights_only=True`` (damaged, or holding
        objects), holds no ``model`` state dict, or is a network of another shape than
        ``model_settings`` builds; then the message names the first convolution's width and
        input channels in the file and in the configured model, and what to change.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder {path} does not exist; run the job that writes it "
                                f"(rule train_encoder, or search_hyperparameters for a "
                                f"trial) first.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling raises many types for damaged or foreign files
        # torch's own text for a refused object advises weights_only=False: not for a file
        # this function exists to read safely
        reason = ("it holds objects that weights_only=True refuses"
                  if isinstance(error, pickle.UnpicklingError)
                  else f"{type(error).__name__}: {str(error).strip().split('. ')[0]}")
        raise ValueError(f"{path} cannot be read as an encoder.pt with weights_only=True "
                         f"({reason}). It is damaged or not a file train_encoder wrote; "
                         f"delete it and run the job that writes it (rule train_encoder, or "
                         f"search_hyperparameters for a trial) again.") from None
    state = payload.get("model") if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds no 'model' state dict, so it is not an encoder.pt "
                         f"written by train_encoder. For a checkpoint from elsewhere use "
                         f"config key model.init_checkpoint.")
    model = build_model(model_settings)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        stem = state.get(FIRST_CONV)
        conv1 = model.encoder.conv1
        if isinstance(stem, torch.Tensor) and stem.ndim == 5 and (
                tuple(stem.shape[:2]) != (conv1.out_channels, conv1.in_channels)):
            detail = (f"its network has model.width {stem.shape[0]} and {stem.shape[1]} input "
                      f"channel(s), the configured one model.width {conv1.out_channels} and "
                      f"{conv1.in_channels} input channel(s) (one per model.modalities)")
        else:
            lines = [line.strip().rstrip(".") for line in str(error).splitlines()[1:]
                     if line.strip()]
            detail = "; ".join(lines[:3]) + ("; ..." if len(lines) > 3 else "")
        raise ValueError(f"{path} does not match the configured model section: {detail}. "
                         f"Load it with the model settings it was trained with, or train it "
                         f"again for these (train_encoder, search_hyperparameters).") from None
    return model


@torch.no_grad()
def embed_all(model: BrainAgeNet, store, rows, *, channels_last: bool = False,
              batch_size: int = EMBED_BATCH) -> dict:
    """Frozen-model features of the un-augmented volumes ``rows`` of ``store`` (a
    :class:`brainage.data.VolumeStore`), in one pass: ``{"encoder": [n, 8 x width],
    "projection": [n, projection_dim]}`` float32 numpy arrays (Fig. 4d reads out either).

    Computed in full float32 whatever ``train.precision`` (no autocast, no TF32:
    :func:`brainage.runtime.full_float32`): the read-out is fitted on these features, and a
    bundle applied on a CPU reproduces them. The model is put in eval mode (batch-norm
    running statistics) and back in the mode it was in.
    """
    import numpy as np

    was_training = model.training
    model.eval()
    chunks: dict[str, list] = {"encoder": [], "projection": []}
    try:
        with full_float32():
            for start in range(0, len(rows), batch_size):
                volumes = store.gather(rows[start:start + batch_size])
                if channels_last:
                    volumes = volumes.contiguous(memory_format=torch.channels_last_3d)
                encoded = model.encode(volumes)
                chunks["encoder"].append(encoded.float().cpu())
                chunks["projection"].append(model.project(encoded).float().cpu())
    finally:
        model.train(was_training)
    widths = {"encoder": model.encoder_dim, "projection": model.projection_dim}
    return {which: (torch.cat(parts).numpy().astype(np.float32) if parts
                    else np.zeros((0, widths[which]), dtype=np.float32))
            for which, parts in chunks.items()}


def embed(model: BrainAgeNet, store, rows, *, which: str = "projection",
          channels_last: bool = False, batch_size: int = EMBED_BATCH):
    """One kind of :func:`embed_all`'s features (``which``: projection or encoder),
    float32 [len(rows), D]."""
    if which not in FEATURE_CHOICES:
        raise ConfigError(f"config key model.features is {which!r}; expected one of "
                          f"{', '.join(FEATURE_CHOICES)}.")
    return embed_all(model, store, rows, channels_last=channels_last,
                     batch_size=batch_size)[which]


# -- checkpoints ----------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What :func:`load_init_checkpoint` did with each key."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"checkpoint {self.path}: loaded {len(self.loaded)} tensors, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} with another shape"]
        for title, keys in (("missing (kept at initialisation)", self.missing),
                            ("unexpected (ignored)", self.unexpected),
                            ("shape mismatch (ignored)", self.mismatched),
                            ("input channels adapted (replicated / C)", self.adapted)):
            if keys:
                lines.append(f"  {title}: {', '.join(keys)}")
        return "\n".join(lines)


def extract_state_dict(payload) -> dict[str, torch.Tensor]:
    """The parameter dict inside a checkpoint: ours (``{"model": ...}``), the reference
    code's (``{"model": ..., "optimizer": ...}``), Lightning's (``state_dict``) or a bare one."""
    if isinstance(payload, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "net"):
            inner = payload.get(key)
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(value, torch.Tensor) for value in inner.values()):
                return dict(inner)
        if payload and all(isinstance(value, torch.Tensor) for value in payload.values()):
            return dict(payload)
    raise ValueError("no state dict (a mapping from parameter names to tensors) found; "
                     "expected a bare state dict or one under 'model' or 'state_dict'.")


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in KNOWN_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
    return key


#: The encoder's first convolution: the one tensor whose shape follows the input channels.
FIRST_CONV = "encoder.conv1.weight"


def replicable(source_shape, target_shape) -> bool:
    """A one-channel first convolution that can initialise a C-channel one."""
    return (len(source_shape) == len(target_shape) == 5 and source_shape[1] == 1
            and target_shape[1] > 1 and tuple(source_shape[2:]) == tuple(target_shape[2:])
            and source_shape[0] == target_shape[0])


def replicate_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """The rule that initialises a C-channel first convolution from a one-channel
    checkpoint (e.g. a T1w-pretrained encoder fine-tuned on stiffness + damping ratio):
    the kernel is copied to every input channel and divided by C. A network fed C copies of
    one image then computes exactly what the checkpoint computed on that image, so every
    channel starts with equal weight and fine-tuning shifts it (docs/method.md §3,
    "First convolution of a multi-channel encoder")."""
    return (weight.repeat(1, channels, 1, 1, 1) / channels).contiguous()


def map_state_dict(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename the keys of ``source`` onto the model keys ``target`` by prefix stripping and
    shape matching.

    A source key ``module.encoder.layer1.0.conv1.weight`` becomes
    ``encoder.layer1.0.conv1.weight``; a bare ResNet key ``layer1.0.conv1.weight`` is tried
    as ``encoder.layer1.0.conv1.weight``. A classification layer ``fc.*`` has no counterpart
    (our encoder has none) and is reported as unexpected. A one-channel first convolution
    initialises a multi-channel one by :func:`replicate_input_channels`.
    """
    report = LoadReport(path="")
    mapped: dict[str, torch.Tensor] = {}
    for raw_key, tensor in source.items():
        key = _strip_prefixes(raw_key)
        candidates = [key, f"encoder.{key}"]
        if key.startswith("encoder.encoder."):
            candidates.insert(0, key[len("encoder."):])
        name = next((candidate for candidate in candidates if candidate in target), None)
        if name is None:
            report.unexpected.append(raw_key)
        elif name == FIRST_CONV and replicable(tensor.shape, target[name].shape):
            mapped[name] = replicate_input_channels(tensor, target[name].shape[1])
            report.loaded.append(name)
            report.adapted.append(f"{raw_key} {tuple(tensor.shape)} -> {name} "
                                  f"{tuple(target[name].shape)}")
        elif tuple(target[name].shape) != tuple(tensor.shape):
            report.mismatched.append(f"{raw_key} {tuple(tensor.shape)} -> {name} "
                                     f"{tuple(target[name].shape)}")
        else:
            mapped[name] = tensor
            report.loaded.append(name)
    report.missing = [key for key in target if key not in mapped
                      and not key.endswith("num_batches_tracked")]
    return mapped, report


#: Classes a foreign checkpoint may hold besides tensors and plain data, allowed to
#: :func:`torch.load` with ``weights_only=True``: the reference code saves its run's
#: ``argparse`` options beside the weights (``{"opts": Namespace, "model": ..., "optimizer":
#: ..., "epoch": ..., "run_id": ...}``). A Namespace only receives attributes, which the
#: restricted unpickler builds from plain data; it runs no code.
FOREIGN_SAFE_GLOBALS = (argparse.Namespace,)


def _foreign_safe_globals():
    """:data:`FOREIGN_SAFE_GLOBALS` allowed for one load (torch >= 2.5; before, refused)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return (safe_globals(list(FOREIGN_SAFE_GLOBALS)) if safe_globals is not None
            else contextlib.nullcontext())


def _stem_shape(source: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The shape of a checkpoint's first convolution (``(width, channels, 7, 7, 7)`` for a
    ResNet-18 of ours, four entries for a 2D one), found under any known prefix; None when
    it has none."""
    for raw_key, tensor in source.items():
        key = _strip_prefixes(raw_key)
        if key in (FIRST_CONV, FIRST_CONV[len("encoder."):], f"encoder.{FIRST_CONV}") \
                and tensor.ndim >= 3:
            return tuple(tensor.shape)
    return None


def _refuse_other_blocks(source: Mapping[str, torch.Tensor], report: LoadReport,
                        target: Mapping[str, torch.Tensor], path: Path, key: str) -> None:
    """Refuse a checkpoint whose residual blocks are not a ResNet-18's: a Bottleneck
    network (a MedicalNet ResNet-50: ``conv3`` in its blocks) or another depth leaves block
    convolutions unloaded, and its 3x3x3 kernels of the same shape land in layers of
    another role; that loaded with a warning, and the cell was reported as fine-tuned from
    it. A stem or shortcut left at random (another stem, a ResNet-18 without downsample
    convolutions) stays a warning."""
    # each key's block (layer<stage>.<block>), under any wrapper (encoder.encoder., module.)
    blocks = {name: match[1] for name in source
              if (match := re.search(r"(?:^|\.)(layer\d+\.\d+)\.", name))}
    bottleneck = sorted({block for name, block in blocks.items() if ".conv3." in name})
    unloaded = [name for name in report.missing if name.startswith("encoder.layer")
                and ".conv" in name and target[name].ndim == 5]
    # a deeper network of the same blocks (a ResNet-34: 3, 4, 6, 3 blocks) has every key
    # of ours, and its further blocks are ignored without a word
    extra = sorted(block for block in set(blocks.values())
                   if f"encoder.{block}.conv1.weight" not in target)
    if bottleneck:
        reason = (f"its blocks have a third convolution ({', '.join(bottleneck[:3])}"
                  f"{', ...' if len(bottleneck) > 3 else ''}): a Bottleneck ResNet "
                  f"(ResNet-50 or deeper)")
    elif extra:
        reason = (f"it has blocks this ResNet-18 lacks ({', '.join(extra[:3])}"
                  f"{', ...' if len(extra) > 3 else ''}): a deeper ResNet (ResNet-34 or more)")
    elif unloaded:
        reason = (f"{len(unloaded)} block convolution(s) of this network find no kernel of "
                  f"their shape in it ({', '.join(unloaded[:3])}"
                  f"{', ...' if len(unloaded) > 3 else ''}): a ResNet of another depth or "
                  f"block layout")
    else:
        return
    raise ValueError(f"config key {key}: {path} is not a 3D ResNet-18 checkpoint: {reason}. "
                     f"Its kernels would land in layers of another role. Choose a 3D "
                     f"ResNet-18 checkpoint, or unset {key}.\n{report.summary()}")


def init_checkpoint_key(model_settings: Mapping) -> str:
    """The config key that chose ``model.init_checkpoint``: the user's, or ``model.init``
    when it starts from a pretraining run (whose encoder the workflow puts there)."""
    if pretrained_run(model_settings) is not None:
        return f"model.init ({model_settings['init']}: the run's encoder.pt)"
    return "model.init_checkpoint"


def _match_recorded_channels(mapped: dict, payload, modalities, path: Path, key: str) -> None:
    """Give the first convolution the cell's channel order where the checkpoint records
    its own (an ``encoder.pt`` of ours, trained on several maps): the same maps in another
    order are reordered; other maps are warned of. Without this the kernels loaded by
    position, so a [damping_ratio, stiffness] cell read damping with the stiffness kernel.
    A one-channel record (a T1w-pretrained encoder) is the documented transfer: its kernel
    initialises every channel (:func:`map_state_dict`)."""
    settings = payload.get("settings") if isinstance(payload, Mapping) else None
    recorded = (settings.get("model") or {}).get("modalities") \
        if isinstance(settings, Mapping) else None
    stem = "encoder.conv1.weight"
    if (not modalities or not isinstance(recorded, list) or len(recorded) < 2
            or list(recorded) == list(modalities) or stem not in mapped):
        return
    if sorted(recorded) == sorted(modalities):
        mapped[stem] = mapped[stem][:, [recorded.index(name) for name in modalities]]
        log.info("%s: its first convolution read the channels %s; reordered to this cell's "
                 "%s", path, ", ".join(recorded), ", ".join(modalities))
    else:
        log.warning("config key %s: %s was trained on the channels %s, this cell reads %s: "
                    "its first convolution's kernels are loaded by position, each on another "
                    "map than it was trained on. Choose an encoder of these maps, or set "
                    "model.modalities to its channels.", key, path, ", ".join(recorded),
                    ", ".join(modalities))


def load_init_checkpoint(model: BrainAgeNet, path: str | Path, *,
                         key: str = "model.init_checkpoint",
                         modalities: Sequence[str] | None = None) -> LoadReport:
    """Initialise ``model`` from a checkpoint (ours or an OpenBHB-pretrained ResNet-18).

    Logs the report; raises when not a single encoder convolution kernel could be loaded
    (batch-norm tensors do not count: their counters fit a ResNet of any width, and all of
    them fit a 2D ResNet-18), which means the file is not a 3D ResNet-18 checkpoint or one
    of another ``model.width``. ``modalities``: the cell's channels (``model.modalities``),
    matched against the channels an encoder of ours records
    (:func:`_match_recorded_channels`).

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file and the config ``key`` that chose it (``model.init`` for a
        pretraining run's encoder: :func:`init_checkpoint_key`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config key {key}: {path} does not exist. Correct the path "
                                f"or unset the key.")
    try:
        with _foreign_safe_globals():
            payload = torch.load(path, map_location="cpu", weights_only=True)
        source = extract_state_dict(payload)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"config key {key}: {path} cannot be read with weights_only=True: it holds a "
            f"Python object{what} besides tensors and plain data, which is refused so that "
            f"a file from elsewhere cannot run code. If you trust the file, load it once "
            f"with torch.load(path, weights_only=False), torch.save its state dict alone "
            f"(the mapping of parameter names to tensors, e.g. under 'model' or "
            f"'state_dict') and point {key} at that file.") from None
    except Exception as error:  # unpickling raises many types for foreign files
        raise ValueError(f"config key {key}: {path} cannot be read as a PyTorch state dict "
                         f"({error}): it is damaged or not a PyTorch checkpoint. Replace it "
                         f"with a file torch.save wrote (a state dict, bare or under 'model' "
                         f"or 'state_dict'), or unset the key.") from None
    target = model.state_dict()
    mapped, report = map_state_dict(source, target)
    report.path = str(path)
    # Batch-norm tensors do not count: num_batches_tracked is a scalar that fits a ResNet of
    # any width, and a 2D ResNet-18 (an ImageNet one) has all the batch-norm shapes of
    # ours but not one 3D kernel, so it loaded 100 tensors and no convolution.
    if not any(name.startswith("encoder.") and tensor.ndim == 5
               for name, tensor in mapped.items()):
        stem, width = _stem_shape(source), model.encoder.conv1.out_channels
        if stem is not None and len(stem) != 5:
            hint = (f"Its first convolution has shape {stem}: a {len(stem) - 2}D network, "
                    f"not a 3D ResNet-18. Choose a 3D checkpoint, or unset {key}.")
        elif stem is not None and stem[0] != width:
            hint = (f"Its first convolution has {stem[0]} output channels: it is a ResNet of "
                    f"model.width {stem[0]}, this cell's has model.width {width}. Set "
                    f"model.width: {stem[0]}, or choose a checkpoint of width {width}.")
        else:
            hint = (f"First keys: {', '.join(list(source)[:5])}. Is it a 3D ResNet-18? "
                    f"Choose a checkpoint of this network, or unset {key}.")
        raise ValueError(f"config key {key}: no encoder convolution of {path} fits the 3D "
                         f"ResNet-18 of this cell, so no weight would be loaded. {hint}\n"
                         f"{report.summary()}")
    _refuse_other_blocks(source, report, target, path, key)
    _match_recorded_channels(mapped, payload, modalities, path, key)
    model.load_state_dict(mapped, strict=False)
    # A head of another width is expected (it is the pretraining's own); an encoder tensor
    # left at random (another stem, a ResNet without downsample convolutions) makes the
    # cell fine-tune a partly pretrained encoder, which the user should know of. (A tensor
    # of another shape is missing too: it did not load.)
    random_encoder = [key for key in report.missing if key.startswith("encoder.")]
    if random_encoder:
        log.warning("%s\n%d encoder tensor(s) keep their random initialisation: this cell "
                    "fine-tunes a partly pretrained encoder. Check that %s is a checkpoint "
                    "of this network (config key %s).", report.summary(),
                    len(random_encoder), path, key)
    else:
        log.info("%s", report.summary())
    return report
