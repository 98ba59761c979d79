"""A tiny OpenBHB release in the real layout and names, for tests/test_openbhb.py.

Not a test module. Written without brainage.openbhb (paths by hand), so the reader is
tested against the layout, not against itself. Only the spatial shape is small; file
names, folders, array rank (1, 1, X, Y, Z), the participants.tsv columns and their coding
(12-digit ids, ``male``/``female``, site codes written as floats, ``split`` values) are
the release's (see the docstring of brainage.openbhb for the sources).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

COLUMNS = ("participant_id", "study", "sex", "age", "site", "diagnosis", "tiv", "csfv", "gmv",
           "wmv", "magnetic_field_strength", "acquisition_setting", "siteXacq", "split")
SMALL_SHAPE = (12, 14, 12)
FOLDERS = {"train": "train", "internal_test": "val", "external_test": "val"}
TRAIN_SITES = (3.0, 29.0, 48.0)
EXTERNAL_SITE = 70.0


def small_affine(shape: Sequence[int]) -> np.ndarray:
    """1 mm voxels, x decreasing with i as in the release; MNI (0, 0, 0) near the middle."""
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [shape[0] // 2, -(shape[1] // 2), -(shape[2] // 2)]
    return affine


def blob(shape: Sequence[int], seed: int) -> np.ndarray:
    """A T1w-like ellipsoid (intensities ~100-900) on a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid ** 2).sum(axis=0) < 0.8
    return np.where(inside, 500 + 100 * rng.standard_normal(tuple(shape)), 0.0)


def array_path(root: Path, participant_id: str, split: str) -> Path:
    name = f"sub-{participant_id}"
    return Path(root) / FOLDERS[split] / "derivatives" / name / "ses-1" / \
        f"{name}_preproc-quasiraw_T1w.npy"


def write_openbhb_release(root: Path, n_train: int = 4, n_validation: int = 2, *,
                          shape: Sequence[int] = SMALL_SHAPE, affine: np.ndarray | None = None,
                          dtype=np.float64, ids: Sequence[str] | None = None,
                          volume: Callable[[int], np.ndarray] | None = None, seed: int = 0,
                          write_grid: bool = True) -> pd.DataFrame:
    """Write ``root/participants.tsv``, ``root/{train,val}/derivatives/...npy`` and
    ``root/resource/quasiraw_space-MNI152_desc-brain_T1w.nii.gz``.

    Validation scans alternate ``internal_test`` (training sites) and ``external_test``
    (a site not in training). ``volume(row)`` gives row ``row``'s 3D volume (default: a
    noisy ellipsoid); each is saved as ``(1, 1, X, Y, Z)`` of ``dtype``. Returns the table
    as written (strings, as in the file).
    """
    root = Path(root)
    shape = tuple(shape)
    affine = small_affine(shape) if affine is None else np.asarray(affine, dtype=float)
    rng = np.random.default_rng(seed)
    n = n_train + n_validation
    if ids is None:
        ids = [str(10 ** 11 + 7919 * 10 ** 6 * row + int(rng.integers(10 ** 6))) for row in range(n)]
    splits = ["train"] * n_train + ["internal_test" if i % 2 == 0 else "external_test"
                                    for i in range(n_validation)]
    sites = [EXTERNAL_SITE if split == "external_test" else TRAIN_SITES[i % len(TRAIN_SITES)]
             for i, split in enumerate(splits)]
    table = pd.DataFrame({
        "participant_id": list(ids),
        "study": [int(1 + i % 10) for i in range(n)],
        "sex": ["female" if i % 2 else "male" for i in range(n)],
        "age": np.round(rng.uniform(6, 88, n), 4),
        "site": sites,
        "diagnosis": "control",
        "tiv": np.round(rng.uniform(1200, 1700, n), 6),
        "csfv": np.round(rng.uniform(150, 350, n), 6),
        "gmv": np.round(rng.uniform(550, 800, n), 6),
        "wmv": np.round(rng.uniform(400, 600, n), 6),
        "magnetic_field_strength": [1.5 if site == EXTERNAL_SITE else 3.0 for site in sites],
        "acquisition_setting": 1.0,
        "siteXacq": [int(site) // 2 for site in sites],
        "split": splits,
    }, columns=list(COLUMNS))
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    for row, (participant_id, split) in enumerate(zip(table["participant_id"], table["split"])):
        path = array_path(root, participant_id, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = blob(shape, seed + row) if volume is None else volume(row)
        np.save(path, np.asarray(data, dtype=dtype).reshape((1, 1) + shape))
    if write_grid:
        template = nib.Nifti1Image((blob(shape, seed) > 0).astype(np.int16) * 5000, affine)
        template.set_sform(affine, code=4)
        template.set_qform(affine, code=4)
        (root / "resource").mkdir(exist_ok=True)
        nib.save(template, root / "resource" / "quasiraw_space-MNI152_desc-brain_T1w.nii.gz")
    return pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
