"""Writing a simulated dataset: NIfTI and JSON files, and the staging folder that is
renamed into place only once the whole dataset is written (shared by the MRE cohort and
the T1w-only cohort)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from brainage.io import create_staging_folder, json_default, sync_tree

LOGGER = logging.getLogger(__name__)


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
        raise FileExistsError(f"dataset root {root} exists and is not empty; pass "
                              f"overwrite=True (CLI: --overwrite) to replace it, or choose "
                              f"an empty folder.")


@contextmanager
def staged_dataset(root: Path) -> Iterator[Path]:
    """A private folder next to ``root`` to write the dataset into; on success it replaces
    ``root``, on any error it is removed and ``root`` is left as it was.

    A ``root`` reached through a symbolic link (a dataset folder linked to scratch space)
    is replaced where the link points, and the link is kept; ``.`` or ``..`` stand for
    the folder they name."""
    # Renaming the link itself would move it aside and put the dataset in its place
    # (an empty root: "Not a directory" after the whole simulation); "." cannot be renamed.
    root = root.resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_staging(root):
        shutil.rmtree(stale, ignore_errors=True)
        LOGGER.info("removed %s, left by a simulation of %s that was killed", stale, root)
    # created as mkdir creates any folder, so a shared folder's default ACL applies
    # (tempfile.mkdtemp's 0700 and a chmod did not)
    staging = create_staging_folder(root.parent, prefix=f".{root.name}.partial-")
    try:
        yield staging
        sync_tree(staging)  # whole on the disk before it is renamed into place
        _move_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def stale_staging(root: Path) -> list[Path]:
    """Folders next to ``root`` that :func:`staged_dataset` made for ``root`` and a killed
    process left behind (a kill skips the clean-up): ``.<name>.partial-<random>`` (a
    dataset half written) and ``.<name>.old-<random>`` (the replaced one). Removed when
    ``root`` is simulated again; only the process writing ``root`` may remove them."""
    if not root.parent.is_dir():
        return []
    name = re.compile(re.escape(f".{root.name}.") + r"(partial|old)-[a-z0-9_]{8}")
    return sorted(path for path in root.parent.iterdir()
                  if name.fullmatch(path.name) and path.is_dir() and not path.is_symlink())


def _move_into_place(staging: Path, root: Path) -> None:
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.rmdir(old)
        os.replace(root, old)
    os.replace(staging, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
