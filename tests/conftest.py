"""Shared fixtures. Each block is owned by the stage whose tests use it."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


# ---- foundation: tiny BIDS-like datasets ------------------------------------------------
def write_tiny_dataset(root: Path, rows: list[dict], *, shape=(12, 12, 12),
                       voxel_mm: float = 4.0, with_anat: bool = False) -> Path:
    """A valid BIDS-like dataset with small synthetic stiffness maps (kPa).

    ``rows`` are participants.tsv rows (participant_id, age, sex, study, ...).
    """
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    rng = np.random.default_rng(0)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    inside = (((grid - centre[:, None, None, None]) / (np.array(shape)[:, None, None, None] / 3)) ** 2
              ).sum(axis=0) < 1
    for row in rows:
        label = row["participant_id"][len("sub-"):]
        data = np.where(inside, 2.8 + 0.1 * rng.standard_normal(shape), 0).astype(np.float32)
        folder = root / f"sub-{label}" / "mre"
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), folder / f"sub-{label}_stiffness.nii.gz")
        if with_anat:
            anat = root / f"sub-{label}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(inside.astype(np.float32) * 100, affine),
                     anat / f"sub-{label}_T1w.nii.gz")
    return root


def default_rows(n: int = 4) -> list[dict]:
    return [{"participant_id": f"sub-{i:02d}a", "age": 20.0 + 10 * i,
             "sex": "F" if i % 2 else "M", "study": f"study{i % 2 + 1}"} for i in range(n)]


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "dataset", default_rows())
