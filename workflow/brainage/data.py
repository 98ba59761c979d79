"""Training data of one split: batches from the memory-mapped array and batched
augmentations (the split folder itself is read and checked by :mod:`brainage.split_data`,
whose names this module re-exports).

Everything per batch happens as tensor operations on the training device: a batch is
gathered with one indexing operation (from a device-resident copy of the whole array when it
fits, else from the memory map), and the augmentations (Gaussian noise, cutout, rotation,
left-right flip) act on the whole batch at once, drawing from one ``torch.Generator``.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from brainage.config import ConfigError
from brainage.split_data import SCAN_CHUNK, DataError, SplitData, check_finite, load_split

__all__ = ["AUGMENTATIONS", "Augmenter", "DataError", "SplitData", "VolumeStore",
           "check_finite", "load_split", "plan_batches", "resolve_augmentation"]

log = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "noise", "cutout", "rotation", "flip")
#: Share of the free GPU memory the resident training array may take; the rest is for
#: activations (a 2 mm ResNet-18 batch of 64 volumes needs ~20 GB in bf16).
RESIDENT_MEMORY_SHARE = 0.5


# -- batches --------------------------------------------------------------------------------

def plan_batches(n_subjects: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``n_subjects`` positions into batches of ``batch_size``.

    The last, smaller batch is kept, except a single leftover subject, which joins the
    previous batch (batch_size + 1 rows): a one-subject batch has no positives for the
    regression losses and breaks batch-norm statistics, and dropping it would leave that
    subject out of the epoch.
    """
    if batch_size > n_subjects:
        raise ConfigError(f"config key train.batch_size is {batch_size} but the split has only "
                          f"{n_subjects} training subjects. Lower train.batch_size to at most "
                          f"{n_subjects}.")
    order = rng.permutation(n_subjects)
    batches = [order[start:start + batch_size] for start in range(0, n_subjects, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        leftover = batches.pop()
        batches[-1] = np.concatenate([batches[-1], leftover])
    return batches


class VolumeStore:
    """Reads batches of volumes as [b, C, X, Y, Z] float32 tensors on ``device``.

    ``images`` is a split array [n, C_all, X, Y, Z]; ``channels`` picks the cell's input
    channels (:meth:`brainage.split_data.SplitData.channel_indices`; None: all). On CUDA the
    whole array (its chosen channels) is copied to the device once when it takes less than
    :data:`RESIDENT_MEMORY_SHARE` of the free memory (``resident="auto"``); otherwise each
    batch is gathered from the memory map with one sorted fancy-indexing read.
    """

    def __init__(self, images: np.ndarray, device: torch.device, *,
                 channels: Sequence[int] | None = None,
                 resident: bool | str = "auto") -> None:
        if images.ndim != 5:
            raise DataError(f"a split array is [subjects, channels, X, Y, Z]; got shape "
                            f"{images.shape}.")
        self.images = images
        all_channels = list(range(images.shape[1]))
        self.channels = (None if channels is None or list(channels) == all_channels
                         else np.asarray(channels, dtype=np.int64))
        self.device = torch.device(device)
        if resident == "auto":
            resident = self.device.type == "cuda" and self._fits_on_device()
            if self.device.type == "cuda" and not resident:
                # the slower path, so that a slow GPU training says why in its log
                log.info("training array (%.1f MB) not resident on %s (over %.0f%% of its free "
                         "memory): each batch is read from host memory", self._selected_bytes()
                         / 1e6, self.device, 100 * RESIDENT_MEMORY_SHARE)
        self.resident: torch.Tensor | None = None
        if resident:
            self.resident = self._copy_to_device()
            log.info("training array resident on %s (%.1f MB)", self.device,
                     self.resident.numel() * self.resident.element_size() / 1e6)

    def _copy_to_device(self) -> torch.Tensor:
        """The whole array on the device, copied in chunks (no second host copy)."""
        dtype = torch.from_numpy(np.zeros(0, dtype=self.images.dtype)).dtype
        resident = torch.empty(self._row_shape(len(self.images)), dtype=dtype, device=self.device)
        for start in range(0, len(self.images), SCAN_CHUNK):
            chunk = self._select(np.array(self.images[start:start + SCAN_CHUNK]))  # a copy
            resident[start:start + len(chunk)] = torch.from_numpy(chunk).to(self.device)
        return resident

    def _row_shape(self, rows: int) -> tuple[int, ...]:
        channels = self.images.shape[1] if self.channels is None else len(self.channels)
        return (rows, channels, *self.images.shape[2:])

    def _select(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.channels is None else np.ascontiguousarray(rows[:, self.channels])

    def _selected_bytes(self) -> int:
        return self.images.nbytes * self._row_shape(1)[1] // self.images.shape[1]

    def _fits_on_device(self) -> bool:
        free, _ = torch.cuda.mem_get_info(self.device)
        return self._selected_bytes() < RESIDENT_MEMORY_SHARE * free

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """Rows ``indices`` (array row numbers) as [b, C, X, Y, Z] float32 on the device."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.resident is not None:
            batch = self.resident[torch.from_numpy(indices).to(self.device)]
        else:
            # Sorted reads are sequential on disk; the inverse permutation restores order.
            order = np.argsort(indices, kind="stable")
            rows = np.empty(self._row_shape(len(indices)), dtype=self.images.dtype)
            # only the cell's channels are read (a split of three maps holds 3x as many)
            rows[order] = (self.images[indices[order]] if self.channels is None else
                           self.images[np.ix_(indices[order], self.channels)])
            batch = torch.from_numpy(rows)
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(torch.float32)


# -- augmentations --------------------------------------------------------------------------

def resolve_augmentation(train_settings: Mapping, loss_name: str) -> str:
    """The augmentation a cell uses; ``default`` is the loss's own choice (noise for the
    losses whose positives are the other view of the same subject, SimCLR and NNCLR, which
    would learn nothing from identical views; none for the others; docs/method.md §4)."""
    kind = train_settings.get("augmentation", "default")
    if kind == "default":
        from brainage.losses import DEFAULT_AUGMENTATION

        return DEFAULT_AUGMENTATION[loss_name]
    if kind not in AUGMENTATIONS:
        raise ConfigError(f"config key train.augmentation is {kind!r}; expected default or one "
                          f"of {', '.join(AUGMENTATIONS)}.")
    return kind


def left_right_axis(affine: Sequence[Sequence[float]] | None) -> int:
    """Array axis (0, 1 or 2) along which world x (left-right) changes most; 0 without affine."""
    if affine is None:
        return 0
    matrix = np.asarray(affine, dtype=float)[:3, :3]
    return int(np.argmax(np.abs(matrix[0])))


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """angles [B, 3] (radians, about the three axes) -> rotations [B, 3, 3] = Rz Ry Rx."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def stack(rows):
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    rx = stack([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    ry = stack([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    rz = stack([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


class Augmenter:
    """One augmentation applied to a whole batch [B, C, X, Y, Z] with one random generator
    (a subject's channels get the same rotation, flip and cutout).

    Parameters
    ----------
    kind
        none, noise, cutout, rotation or flip.
    noise_std
        Gaussian noise sd (z-units), added to every voxel.
    cutout_voxels
        Edge of the zeroed box per axis (voxels), clipped to the volume.
    cutout_probability
        Probability that a volume gets a box.
    rotation_degrees
        Maximum absolute rotation about each axis (degrees); trilinear, zero padding.
    flip_axis
        Array axis of left-right (0 for MNI-oriented arrays); each volume flips with p 0.5.
    """

    def __init__(self, kind: str, *, noise_std: float = 0.1,
                 cutout_voxels: Sequence[int] = (32, 32, 32), cutout_probability: float = 0.5,
                 rotation_degrees: float = 10.0, flip_axis: int = 0) -> None:
        if kind not in AUGMENTATIONS:
            raise ConfigError(f"config key train.augmentation is {kind!r}; expected one of "
                              f"{', '.join(AUGMENTATIONS)}.")
        self.kind = kind
        self.noise_std = noise_std
        self.cutout_voxels = tuple(int(size) for size in cutout_voxels)
        self.cutout_probability = cutout_probability
        self.rotation_degrees = rotation_degrees
        self.flip_axis = flip_axis

    @classmethod
    def from_settings(cls, train_settings: Mapping, loss_name: str, *, resolution_mm: float,
                      affine=None) -> "Augmenter":
        size = max(1, int(round(train_settings.get("cutout_size_mm", 64) / resolution_mm)))
        return cls(resolve_augmentation(train_settings, loss_name),
                   noise_std=train_settings.get("noise_std", 0.1),
                   cutout_voxels=(size, size, size),
                   cutout_probability=train_settings.get("cutout_probability", 0.5),
                   rotation_degrees=train_settings.get("rotation_degrees", 10.0),
                   flip_axis=left_right_axis(affine))

    def __call__(self, volumes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "none":
            return volumes
        return getattr(self, f"_{self.kind}")(volumes, generator)

    def _uniform(self, shape, volumes, generator) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=volumes.device)

    def _noise(self, volumes, generator):
        noise = torch.randn(volumes.shape, generator=generator, device=volumes.device)
        return volumes + self.noise_std * noise

    def _cutout(self, volumes, generator):
        batch, spatial = volumes.shape[0], volumes.shape[2:]
        inside = None
        for axis, (size, box) in enumerate(zip(spatial, self.cutout_voxels)):
            box = min(box, size)
            # Box fully inside the volume, start uniform over the possible positions.
            start = torch.floor(self._uniform((batch,), volumes, generator) * (size - box + 1))
            positions = torch.arange(size, device=volumes.device)
            within = (positions >= start[:, None]) & (positions < start[:, None] + box)
            view = [batch, 1, 1, 1]
            view[axis + 1] = size
            within = within.view(view)
            inside = within if inside is None else inside & within
        selected = self._uniform((batch,), volumes, generator) < self.cutout_probability
        keep = ~(inside & selected.view(batch, 1, 1, 1))
        return volumes * keep.unsqueeze(1)

    def _rotation(self, volumes, generator):
        batch = volumes.shape[0]
        limit = np.deg2rad(self.rotation_degrees)
        angles = (self._uniform((batch, 3), volumes, generator) * 2 - 1) * limit
        rotation = rotation_matrices(angles)
        # affine_grid works in normalised coordinates ordered (W, H, D) = (Z, Y, X) of the
        # array; scaling by the half-sizes makes the rotation rigid in voxel (= mm) space.
        half = torch.tensor([volumes.shape[4], volumes.shape[3], volumes.shape[2]],
                            dtype=volumes.dtype, device=volumes.device) / 2
        theta = torch.zeros(batch, 3, 4, dtype=volumes.dtype, device=volumes.device)
        theta[:, :, :3] = rotation / half[None, :, None] * half[None, None, :]
        grid = F.affine_grid(theta, list(volumes.shape), align_corners=False)
        return F.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)

    def _flip(self, volumes, generator):
        selected = self._uniform((volumes.shape[0],), volumes, generator) < 0.5
        flipped = volumes.flip(self.flip_axis + 2)
        return torch.where(selected.view(-1, 1, 1, 1, 1), flipped, volumes)
