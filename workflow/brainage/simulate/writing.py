"""Writing a simulated dataset: NIfTI and JSON files, and the staging folder that is
renamed into place only once the whole dataset is written (shared by the MRE cohort and
the T1w-only cohort)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from brainage.io import json_default, staged_folder


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, description: str) -> None:
    """Write ``data`` with ``affine`` (native voxel -> scanner mm) as sform and qform."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode()[:79]
    image.set_sform(affine, code=1)  # scanner coordinates
    image.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.to_filename(str(path))


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON; NumPy scalars (an option given as
    ``np.int64(40)``, say) are written as the Python numbers they hold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=json_default) + "\n")


def write_bidsignore(folder: Path, patterns) -> None:
    """Write ``folder/.bidsignore``: files BIDS has no name for (MRE maps, the truth
    tables), which the BIDS validator would otherwise report as errors (NOT_INCLUDED)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".bidsignore").write_text("\n".join(patterns) + "\n")


#: Files of ``derivatives/simulation`` without a BIDS name: the ground-truth tables.
TRUTH_BIDS_IGNORE = ("truth.tsv", "truth.json")


def check_root(root: Path, *, overwrite: bool) -> None:
    """Refuse a ``root`` that is a file, or a non-empty folder unless ``overwrite``."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"dataset root {root} exists and is not a folder; choose "
                              f"another root or remove the file.")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"dataset root {root} exists and is not empty; choose an "
                              f"empty folder, or pass overwrite=True (CLI: --overwrite, which "
                              f"replaces only an earlier simulation) to replace it as a "
                              f"whole.")


@contextmanager
def staged_dataset(root: Path) -> Iterator[Path]:
    """A folder next to ``root`` to write the dataset into; on success it replaces
    ``root``, on any error it is removed and ``root`` is left as it was
    (:func:`brainage.io.staged_folder`).

    A ``root`` reached through a symbolic link (a dataset folder linked to scratch space)
    is replaced where the link points, and the link is kept; ``.`` or ``..`` stand for
    the folder they name."""
    # Renaming the link itself would move it aside and put the dataset in its place
    # (an empty root: "Not a directory" after the whole simulation); "." cannot be renamed.
    with staged_folder(root.resolve(), what="a simulation") as staging:
        yield staging
