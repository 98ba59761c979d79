"""A tiny synthetic split folder (results/dataset/<split>/) for the training tests.

Not a test module: imported by tests/test_train.py, test_evaluate.py, test_search.py,
test_modalities.py, test_cuda.py and tests/benchmarks/bench_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

STUDIES = ("studyA", "studyB", "studyC")


def synthetic_volumes(ages: np.ndarray, shape=(16, 20, 16), *, seed: int = 0,
                      noise: float = 0.3) -> np.ndarray:
    """Brain-like volumes [n, X, Y, Z] whose intensity pattern depends on age (years).

    Inside an ellipsoidal "brain", stiffness falls with age and a central "ventricle"
    (softer) grows with age, plus smooth per-subject variation and voxel noise; the result
    is z-normalised over all brain voxels, background exactly 0, float32.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size) for size in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(axis=0))
    brain = radius < 0.9
    volumes = np.zeros((len(ages),) + tuple(shape), dtype=np.float64)
    for row, age in enumerate(ages):
        scaled = (age - 50.0) / 30.0
        ventricle = radius < 0.25 + 0.2 * (scaled + 1) / 2
        value = 3.0 - 0.4 * scaled - 0.3 * grid[0] * scaled + 0.2 * rng.standard_normal()
        value = value - 1.2 * ventricle
        value = value + noise * rng.standard_normal(shape)
        volumes[row] = np.where(brain, value, 0.0)
    inside = volumes[:, brain]
    volumes[:, brain] = (inside - inside.mean()) / inside.std()
    return volumes.astype(np.float32)


def write_split(root: Path, *, n_subjects: int = 24, n_test: int = 6, shape=(16, 20, 16),
                resolution_mm: int = 6, seed: int = 0, name: str = "holdout",
                modalities=("stiffness",)) -> Path:
    """Write ``root/<name>/{images.npy, participants.tsv, stats.json}``; return the folder.

    One channel per modality: the first as :func:`synthetic_volumes`, each further one
    the volumes of another seed (same ages, own noise).
    """
    rng = np.random.default_rng(seed)
    ages = np.round(rng.uniform(20, 80, n_subjects), 1)
    studies = [STUDIES[index % len(STUDIES)] for index in range(n_subjects)]
    subset = np.array(["train"] * n_subjects, dtype=object)
    subset[rng.choice(n_subjects, size=n_test, replace=False)] = "test"
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    images = np.stack([synthetic_volumes(ages, shape, seed=seed + channel)
                       for channel in range(len(modalities))], axis=1)
    np.save(folder / "images.npy", images)
    table = pd.DataFrame({
        "participant_id": [f"sub-{index:03d}" for index in range(n_subjects)],
        "age": ages, "sex": ["F" if index % 2 else "M" for index in range(n_subjects)],
        "study": studies, "subset": subset, "coverage": 1.0})
    table.to_csv(folder / "participants.tsv", sep="\t", index=False)
    affine = np.diag([float(resolution_mm)] * 3 + [1.0])
    # the normalisation record of a template whose grid is the array's own (block factor 1)
    stats = {"modalities": list(modalities), "mean": [3.0] * len(modalities),
             "sd": [0.5] * len(modalities), "scale_by_brain_median": [False] * len(modalities),
             "scope": "train", "n_voxels": [int((images[0, 0] != 0).sum())] * len(modalities),
             "statistics_subjects": table["participant_id"][subset == "train"].tolist(),
             "resolution_mm": resolution_mm, "affine": affine.tolist(), "shape": list(shape),
             "template_shape": list(shape), "template_affine": affine.tolist(),
             "window_start": [0, 0, 0], "window_stop": list(shape), "block_factor": 1,
             "dtype": "float32", "excluded": [], "split": name}
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder


def tiny_settings(**overrides) -> dict:
    """Cell settings for fast CPU tests (the rest filled with the schema defaults).

    The encoder is ResNet-18 at width 8 (0.5 M parameters, a 2 MB ``encoder.pt``), as in
    the demo: at the paper's width 64 every trained cell writes 134 MB, and the suite's
    trainings would need several GB of disk. A test that needs the paper's network says so.
    """
    settings = {
        "experiment": "test", "variant": "adaptive", "seed": 0,
        "loss": {"name": "adaptive", "nn_final": 4, "nn_step": 1},
        "train": {"epochs": 3, "batch_size": 8, "views": 2, "lr": 1e-3, "device": "cpu",
                  "threads": 1, "embed_epochs": [1, 3]},
        "model": {"width": 8},
        "readout": {},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            settings[section] = {**settings.get(section, {}), **values}
        else:
            settings[section] = values
    return settings


def cell_paths(folder: Path) -> dict:
    """The output paths of ``brainage.train.train_encoder`` for a cell folder."""
    return {"encoder_path": folder / "encoder.pt", "history_path": folder / "history.tsv",
            "embeddings_dir": folder / "embeddings", "checkpoint_path": folder / "checkpoint.pt",
            "features_path": folder / "features.npz"}


def encoder_weights(path: Path) -> dict:
    """The model state dict saved in an ``encoder.pt``."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]
