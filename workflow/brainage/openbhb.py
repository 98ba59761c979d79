"""Reading the OpenBHB release (quasi-raw T1w) as a pretraining cohort.

OpenBHB (Dufumier et al., NeuroImage 263:119637, 2022) pools 3,984 public T1w scans of
healthy controls (ages 5.9-88 years; 3,227 training + 757 validation) from 10 studies
and 60+ sites. The encoder is pretrained on its *quasi-raw* images: bias-corrected,
skull-stripped T1w affinely registered to MNI152 at 1 mm. This module finds and checks
the release's files, turns its participants table into ours, and resamples the volumes
onto our analysis grid one subject at a time: the whole cohort at 1 mm is ~115 GB even
as float32 (28.9 MB a scan; the HuggingFace files are float64, ~230 GB).

API: :func:`read_release` -> :class:`OpenBHBRelease` (``.table``, ``.files``, ``.grid``,
``.load(row)``); :class:`Resampler` (grid to grid, ``area`` or ``linear``);
:func:`write_pretraining_split`
(the release as a normalised pretraining split folder, rule prepare_openbhb);
:func:`grid_from_nifti` (a target grid from the template file).

The release's layout (what was found, and where)
-------------------------------------------------
::

    <root>/participants.tsv                      one row per scan, all splits
    <root>/train/derivatives/sub-<id>/ses-1/sub-<id>_preproc-quasiraw_T1w.npy
    <root>/val/derivatives/sub-<id>/ses-1/sub-<id>_preproc-quasiraw_T1w.npy
    <root>/resource/quasiraw_space-MNI152_desc-brain_T1w.nii.gz   the quasi-raw grid
    (other modalities: *_preproc-cat12vbm_desc-gm_T1w.npy, *_preproc-freesurfer_*, ...,
    resource/resources.json, qc.tsv: not read here)

* Folders, file names, the ``split`` column and its values: the HuggingFace dataset
  ``benoit-dufumier/openBHB`` (https://huggingface.co/datasets/benoit-dufumier/openBHB),
  as its maintainers' reader builds the paths: neurospin-deepinsight/nidl,
  ``nidl/datasets/openbhb.py`` (pinned HF revisions 4806b5b... and 8508cda...). Its splits:
  ``train`` = ``split == "train"``, files under ``train/``; ``val`` = ``internal_test`` +
  ``external_test``, files under ``val/``; ``internal`` = scanners also in training,
  ``external`` = other scanners/sequences (ramp-kits/brain_age_with_site_removal
  ``README.md``).
* Array shape: ``(1, 1, 182, 218, 182)`` per file, i.e. one sample, one channel
  (ramp-kits/brain_age_with_site_removal ``resources.json``: ``quasiraw.shape =
  [-1, 1, 182, 218, 182]``; ``preprocessing.py`` squeezes each file; nidl's
  ``np.load(path)[0]`` gives ``(1, 182, 218, 182)``).
* participants.tsv columns (a copy of the HF table, 3,984 rows, read from
  stevenybuilder/NeuroAD ``data/real/openbhb_participants.tsv``): ``participant_id``
  (12-digit integers), ``study`` (integer code of the 10 source studies), ``sex``
  (``male``/``female``), ``age`` (years, float), ``site`` (integer code written as a
  float, e.g. ``48.0``; 62 values), ``diagnosis`` (``control``), ``tiv``, ``csfv``,
  ``gmv``, ``wmv``, ``magnetic_field_strength`` (T), ``acquisition_setting``,
  ``siteXacq`` (site x acquisition setting, 64 values: the challenge's "site" label),
  ``split`` (``train`` 3,227, ``internal_test`` 362, ``external_test`` 395).
* The grid: ``resource/quasiraw_space-MNI152_desc-brain_T1w.nii.gz`` (its copy at the
  top of ramp-kits/brain_age_with_site_removal, whose header was read for this module):
  182 x 218 x 182 int16, sform and qform code MNI, affine
  ``[[-1,0,0,90],[0,1,0,-126],[0,0,1,-72]]`` (1 mm, x decreasing with i),
  ``descrip 'FSL3.3'``: FSL's ``MNI152_T1_1mm_brain``
  (TemplateFlow MNI152NLin6Asym). brainprep's quasi-raw workflow registers every image
  affinely to exactly this template (brainprep ``brainprep/workflow/quasiraw.py``), the
  challenge's ``preprocessing.py`` masks each squeezed array with this file's voxels
  (``> 0``) index for index, and its 1,827,095 non-zero voxels are the quasi-raw feature
  count used by the challenge and by EIDOSLAB/contrastive-brain-age-prediction
  (``src/data/openbhb.py``). Hence: array index ``[i, j, k]`` is voxel ``(i, j, k)`` of
  this image, and world (MNI, mm) = affine @ (i, j, k, 1). The reader takes the grid from
  that file when the release has it, and otherwise from :data:`QUASIRAW_AFFINE` /
  :data:`QUASIRAW_SHAPE` (the same values).
* Resampling goes by the affines only. The quasi-raw template is MNI152NLin6Asym (FSL);
  our default template is nilearn's MNI152NLin2009aSym. Both are MNI-152 averages whose
  coordinates agree to a few mm, and no transform between the two is applied: the
  quasi-raw images are themselves only affinely aligned. With ``template.source: file``
  and FSL's 2 mm MNI152 the grids coincide exactly (every 2 mm centre on a 1 mm centre).

The other distribution, not read here: the RAMP challenge's concatenated arrays
(``train.npy``/``train.tsv``, ``test.npy``/``test.tsv`` or ``internal_test``/
``external_test``; ramp-kits ``download_data.py``, EIDOSLAB ``src/data/openbhb.py``):
float32 ``[n, 3659572]`` rows of all modalities flattened and masked, quasi-raw at
columns ``[519945, 2347040)`` in the mask's C order, tables with ``participant_id``,
``age`` and ``site`` (= siteXacq) only, no sex. :func:`read_release` recognises that
layout and says so. (EIDOSLAB's single-sample unmasking transposes to (z, x, y) and then
reshapes to (1, 182, 218, 182), which scrambles the voxel order; noted from reading the
code, not checked by running it.)

The arrays' dtype: float64 by the size a data card gives (230 GB for 3,984 quasi-raw
files, 57.7 MB each); any real numeric dtype is accepted and returned as float32. The axis
order: brainprep (the release's preprocessing, commit 6daf74a) saves each registered
image's ``get_fdata()`` with a leading axis (``brainprep/utils.py`` ``load_images``), so
index ``[i, j, k]`` is NIfTI voxel ``(i, j, k)`` of the template, as the challenge's
masking also assumes; still, view one resampled volume over the template before a long
run. The IEEE DataPort download
(https://ieee-dataport.org/open-access/openbhb-multi-site-brain-mri-dataset-age-prediction-and-debiasing)
unpacks to other folders (``train/train_quasiraw/sub-<id>_preproc-quasiraw_T1w.npy``,
labels in ``train/train_labels/participants.tsv`` and ``val/val_labels/``, as third-party
readers show): :func:`release_participants` recognises it and says how to lay it out as
the HuggingFace release. The HF file tree itself was read from nidl's path patterns and a
third-party downloader's ``train/derivatives/sub-<id>/ses-1/...`` paths, not from a
listing.

Our table
---------
``participant_id`` ``sub-<id>`` (OpenBHB's ids are digits, so ``sub-100053248969``; an id
with other characters keeps its letters and digits plus ``x`` and 8 hex digits of its
CRC32, deterministic), ``age`` (years, float), ``sex`` (``M``/``F`` from ``male``/
``female``, other codes as written), ``study`` (the acquisition site, because our
pipeline stratifies and reports by study: ``site<code>`` from the ``site`` column, or
``siteXacq<code>`` with ``site_column="siteXacq"``), ``subset`` (``train``/
``validation`` from the official split), then ``openbhb_id``, ``openbhb_split``,
``openbhb_study`` (the release's ``participant_id``, ``split``, ``study``) and the
release's other columns unchanged.

Configuration (a pretraining run whose source is of kind ``openbhb``; defaults shown)::

    pretrain:
      <run>:
        source:
          kind: openbhb               # the OpenBHB release, quasi-raw T1w
          root: null                  # required: folder with participants.tsv, train/, val/
          openbhb_validation: both    # both | internal | external: official validation subsets

Rule ``prepare_openbhb`` passes ``openbhb_validation`` as :func:`read_release`'s
``validation``; ``site_column`` (``site``, the default, or ``siteXacq`` -> study) and the
resampling ``method`` of :func:`write_pretraining_split` (``auto``, or ``area`` /
``linear``) are arguments of those functions only, not config keys: the rule uses their
defaults.

The target grid is not a key: it is the pipeline's template grid (the template brain mask
written by ``prepare_template``, :func:`grid_from_nifti`), at 2 mm.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from brainage.inputs import AGE_RANGE_YEARS, LABEL_PATTERN, InputError, check_table_shape

log = logging.getLogger(__name__)

PARTICIPANTS = "participants.tsv"
#: The release's quasi-raw grid (FSL MNI152 1 mm): shape and voxel -> MNI mm affine.
QUASIRAW_SHAPE = (182, 218, 182)
QUASIRAW_AFFINE = np.array([[-1.0, 0.0, 0.0, 90.0],
                            [0.0, 1.0, 0.0, -126.0],
                            [0.0, 0.0, 1.0, -72.0],
                            [0.0, 0.0, 0.0, 1.0]])
#: The release's own copy of that grid (an MNI152 brain T1w; voxels > 0 are its mask).
GRID_FILE = Path("resource") / "quasiraw_space-MNI152_desc-brain_T1w.nii.gz"
#: Leading axes of each file: one sample, one channel.
FILE_LEADING_AXES = (1, 1)
#: The release's ``split`` values -> (folder holding the arrays, our subset).
RELEASE_SPLITS = {"train": ("train", "train"),
                  "internal_test": ("val", "validation"),
                  "external_test": ("val", "validation")}
#: ``validation`` option -> the release's splits that form our validation subset.
VALIDATION_CHOICES = {"both": ("internal_test", "external_test"),
                      "internal": ("internal_test",),
                      "external": ("external_test",)}
SITE_COLUMNS = ("site", "siteXacq")
SEX_CODES = {"male": "M", "female": "F"}
RESAMPLE_METHODS = ("auto", "area", "linear")
#: Release columns renamed so they do not clash with ours.
RENAMED = {"participant_id": "openbhb_id", "split": "openbhb_split", "study": "openbhb_study"}


class Grid(NamedTuple):
    """A voxel grid: ``shape`` (3 ints) and ``affine`` (4x4, voxel index -> world mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray


def as_grid(shape: Sequence[int], affine, *, what: str) -> Grid:
    """Check and normalise a (shape, affine) pair; ValueError naming ``what`` otherwise."""
    shape = tuple(int(size) for size in shape)
    affine = np.asarray(affine, dtype=np.float64)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{what}: shape {shape} is not 3 positive sizes.")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or \
            abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{what}: affine must be a finite, invertible 4x4 matrix (voxel -> mm); "
                         f"got {affine.tolist()}.")
    return Grid(shape, affine)


def grid_from_nifti(path: str | Path) -> Grid:
    """The grid of a NIfTI image (e.g. the template brain mask): shape and affine (mm)."""
    from brainage.inputs import load_nifti_checked

    image = load_nifti_checked(path, what="grid image")
    return as_grid(image.shape[:3], image.affine, what=str(path))


# -- the table ---------------------------------------------------------------------------------

def bids_label(openbhb_id: str) -> str:
    """OpenBHB id -> BIDS label (letters and digits). Ids that already are stay unchanged;
    others keep their letters and digits plus ``x`` and the id's CRC32 (8 hex digits), so
    the mapping is deterministic and two ids that differ only in punctuation stay apart."""
    openbhb_id = str(openbhb_id)
    if LABEL_PATTERN.fullmatch(openbhb_id):
        return openbhb_id
    kept = re.sub(r"[^A-Za-z0-9]", "", openbhb_id)
    return f"{kept}x{zlib.crc32(openbhb_id.encode()):08x}"


def _code(value: str) -> str:
    """A site code as written, ``48.0`` -> ``48`` (pandas writes integer codes as floats)."""
    try:
        number = float(value)
    except ValueError:
        return value.strip()
    return str(int(number)) if math.isfinite(number) and number.is_integer() else value.strip()


def _read_table(table_path: Path, site_column: str) -> pd.DataFrame:
    try:
        lines = check_table_shape(table_path)  # the file's line of each row pandas reads
        table = pd.read_csv(table_path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{table_path} cannot be read as a tab-separated table: {error}. "
                         f"Download participants.tsv of the OpenBHB release again.") from None
    required = ("participant_id", "age", "sex", "split", site_column)
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise InputError(f"{table_path} lacks column(s) {', '.join(missing)}; it has "
                         f"{', '.join(map(str, table.columns))}. The OpenBHB participants.tsv "
                         f"has {', '.join(required)}: use the release's own file.")
    if table.empty:
        raise InputError(f"{table_path} lists no participants; download the release's "
                         f"participants.tsv again.")
    if len(lines) != len(table):  # not expected: then count rows as if no line were skipped
        lines = list(range(2, len(table) + 2))
    table = table.apply(lambda column: column.str.strip())
    for line, row in zip(lines, table.itertuples(index=False)):
        where = f"{table_path} line {line} (participant_id {row.participant_id!r})"
        if not row.participant_id:
            raise InputError(f"{table_path} line {line}: participant_id is empty.")
        if re.search(r"[/\\]", row.participant_id) or row.participant_id.startswith("."):
            # the id names the folder its array is read from (quasiraw_path)
            raise InputError(f"{where}: participant_id holds a path separator or starts with "
                             f"a dot, so it cannot name a scan's folder; the release's ids are "
                             f"numbers. Use the release's own participants.tsv.")
        if row.split not in RELEASE_SPLITS:
            raise InputError(f"{where}: split {row.split!r} is not one of "
                             f"{', '.join(RELEASE_SPLITS)} (the release's official split).")
        try:
            age = float(row.age)
        except ValueError:
            age = math.nan
        low, high = AGE_RANGE_YEARS
        if not math.isfinite(age):
            raise InputError(f"{where}: age {row.age!r} is not a number of years. Fix or remove "
                             f"the row.")
        if not low < age < high:
            raise InputError(f"{where}: age {age} years is outside {low}-{high}. Fix the value "
                             f"(years, not months).")
        for column in ("sex", site_column):
            if not getattr(row, column):
                raise InputError(f"{where}: column {column!r} is empty.")
    duplicated = table["participant_id"][table["participant_id"].duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{table_path}: duplicate participant_id {', '.join(duplicated[:10])}; "
                         f"each scan must appear once. Use the release's own participants.tsv.")
    return table


def _our_table(table: pd.DataFrame, site_column: str, table_path: Path) -> pd.DataFrame:
    labels = table["participant_id"].map(bids_label)
    clashes = labels[labels.duplicated(keep=False)]
    if len(clashes):
        raise InputError(f"{table_path}: participant_id(s) "
                         f"{', '.join(table['participant_id'][clashes.index][:10])} map to the "
                         f"same BIDS label; make the ids unique up to punctuation.")
    ours = pd.DataFrame({
        "participant_id": "sub-" + labels,
        "age": table["age"].astype(float),
        "sex": table["sex"].map(lambda sex: SEX_CODES.get(sex.lower(), sex)),
        "study": site_column + table[site_column].map(_code),
        "subset": table["split"].map(lambda split: RELEASE_SPLITS[split][1]),
    })
    release = table.rename(columns=RENAMED)
    return pd.concat([ours, release[[c for c in release.columns if c not in ours.columns]]],
                     axis=1)


# -- the arrays --------------------------------------------------------------------------------

def quasiraw_path(root: str | Path, openbhb_id: str, split: str) -> Path:
    """Where the release keeps a scan's quasi-raw array (``split``: the release's value)."""
    folder = RELEASE_SPLITS[split][0]
    name = f"sub-{openbhb_id}"
    return Path(root) / folder / "derivatives" / name / "ses-1" / f"{name}_preproc-quasiraw_T1w.npy"


def _source_grid(root: Path) -> tuple[Grid, str]:
    path = root / GRID_FILE
    if path.is_file():
        return grid_from_nifti(path), str(path)
    return Grid(QUASIRAW_SHAPE, QUASIRAW_AFFINE.copy()), "the documented FSL MNI152 1 mm grid"


def _check_header(path: Path, spatial: tuple[int, ...], what: str) -> None:
    """Shape and dtype from the .npy header (no voxel is read)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # numpy raises several types for a broken or object array
        raise InputError(f"{what}: {path} is not a readable numeric .npy array ({error}). "
                         f"Download the file again.") from None
    _check_array(array.shape, array.dtype, path, spatial, what)


def _check_array(shape, dtype, path: Path, spatial: tuple[int, ...], what: str) -> None:
    leading = tuple(shape[:-3])
    if tuple(shape[-3:]) != spatial or len(leading) > len(FILE_LEADING_AXES) or \
            any(size != 1 for size in leading):
        raise InputError(f"{what}: array {path} has shape {tuple(shape)}; the release's quasi-raw "
                         f"arrays are {FILE_LEADING_AXES + spatial} (sample, channel, x, y, z). "
                         f"Download the file again; if all files differ, the release's grid "
                         f"({GRID_FILE}) does not match its arrays.")
    if np.dtype(dtype).kind not in "fiu":
        raise InputError(f"{what}: array {path} has dtype {dtype}; quasi-raw arrays hold real "
                         f"T1w intensities (floating point). Download the file again.")


def _orphans(root: Path, known: set[str]) -> list[Path]:
    orphans = []
    for folder in sorted({folder for folder, _ in RELEASE_SPLITS.values()}):
        for path in sorted((root / folder / "derivatives").glob(
                "sub-*/ses-*/sub-*_preproc-quasiraw_T1w.npy")):
            if path.name[len("sub-"):-len("_preproc-quasiraw_T1w.npy")] not in known:
                orphans.append(path)
    return orphans


def release_participants(root: str | Path, *,
                         root_key: str = "pretrain.<run>.source.root") -> Path:
    """``<root>/participants.tsv`` of an OpenBHB release, checked to be there (a stat, no
    read: the workflow asks while it plans, since no rule writes the release).

    Raises
    ------
    InputError
        Naming ``root_key`` (the config key that gave ``root``): a folder that does not
        exist, or one without participants.tsv (the RAMP challenge's layout named).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"OpenBHB folder {root} does not exist. Set {root_key} to the folder "
                         f"holding participants.tsv, train/ and val/ (HuggingFace "
                         f"benoit-dufumier/openBHB).")
    table_path = root / PARTICIPANTS
    dataport = _dataport_layout(root)
    if dataport is not None:  # its own participants tables, its own file names
        raise InputError(
            f"{dataport} holds the IEEE DataPort download of OpenBHB (flat "
            f"train_quasiraw/sub-<id>_preproc-quasiraw_T1w.npy files, labels in "
            f"train_labels/ and val_labels/), whose layout this reader does not read; the "
            f"arrays are the same. Use the HuggingFace release (benoit-dufumier/openBHB: "
            f"participants.tsv, <split>/derivatives/sub-<id>/ses-1/...), or move each array "
            f"to <root>/<train or val>/derivatives/sub-<id>/ses-1/ and put that release's "
            f"participants.tsv (with its split column) at <root>; then point {root_key} at "
            f"<root>.")
    if not table_path.is_file():
        challenge = _challenge_layout(root)
        if challenge is not None:
            raise InputError(f"{challenge} holds the RAMP challenge's concatenated arrays "
                             f"(train.npy/train.tsv: masked, flattened modalities, no sex "
                             f"column), which this reader does not read. Download the "
                             f"per-subject release (participants.tsv, train/, val/) and point "
                             f"{root_key} at it.")
        raise InputError(f"{table_path} is missing. The OpenBHB release has participants.tsv at "
                         f"its top level, next to train/ and val/; point {root_key} at that "
                         f"folder.")
    return table_path


def _dataport_layout(root: Path) -> Path | None:
    """The folder holding the IEEE DataPort download's unpacked ``train_quasiraw/`` or
    ``val_quasiraw/`` arrays (``<root>``, or ``<root>/train`` and ``<root>/val``), unless
    ``root`` is laid out as the HuggingFace release (``train/derivatives/``): then the
    folders are what moving the arrays left behind. None otherwise."""
    if (root / "train" / "derivatives").is_dir():
        return None
    for folder in (root, root / "train", root / "val"):
        for split in ("train", "val"):
            arrays = folder / f"{split}_quasiraw"
            if arrays.is_dir() and next(arrays.glob("sub-*_preproc-quasiraw_T1w.npy"), None):
                return folder
    return None


def _challenge_layout(root: Path) -> Path | None:
    for folder in (root, root / "data"):
        if (folder / "train.npy").is_file() and (folder / "train.tsv").is_file():
            return folder
    return None


@dataclass(frozen=True)
class OpenBHBRelease:
    """The checked release: our table and where each row's quasi-raw array is.

    Attributes
    ----------
    root : the release folder.
    table : one row per selected scan (the training scans and the chosen validation
        scans, in participants.tsv order): participant_id, age (years), sex, study,
        subset, then the release's columns (module docstring).
    files : the quasi-raw array of each row, aligned with ``table``.
    grid : the quasi-raw grid (shape, voxel -> MNI mm affine), 1 mm.
    grid_source : where ``grid`` came from (the release's resource file or the constant).
    """

    root: Path
    table: pd.DataFrame
    files: tuple[Path, ...]
    grid: Grid
    grid_source: str

    def __len__(self) -> int:
        return len(self.table)

    def load(self, row: int) -> np.ndarray:
        """The native quasi-raw volume of table row ``row``: float32 [X, Y, Z] on ``grid``.

        Raises InputError naming the file when it changed since :func:`read_release`, or
        holds NaN/inf or no non-zero voxel.
        """
        path = self.files[row]
        what = f"subject {self.table['participant_id'].iat[row]}"
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as error:
            raise InputError(f"{what}: {path} is not a readable numeric .npy array ({error}). "
                             f"Download the file again.") from None
        _check_array(array.shape, array.dtype, path, self.grid.shape, what)
        volume = np.asarray(array.reshape(self.grid.shape), dtype=np.float32)
        if not np.all(np.isfinite(volume)):
            raise InputError(f"{what}: array {path} holds NaN/inf voxels. Download the file "
                             f"again, or drop the scan's row from {self.root / PARTICIPANTS}.")
        if not volume.any():
            raise InputError(f"{what}: array {path} has no non-zero voxel. Download the file "
                             f"again, or drop the scan's row from {self.root / PARTICIPANTS}.")
        return volume


def _check_rows_match_files(root: Path, table_path: Path, table: pd.DataFrame,
                            files: list[Path], listed: set[str]) -> None:
    """Every selected row has its array in its split's folder; every array has a row."""
    missing = [(pid, split, path) for pid, split, path in
               zip(table["participant_id"], table["split"], files) if not path.is_file()]
    if missing:
        pid, split, path = missing[0]
        other = quasiraw_path(root, pid, "train" if split != "train" else "internal_test")
        if other.is_file():
            raise InputError(f"{table_path}: participant {pid} has split {split!r} but its array "
                             f"is {other}, in the other split's folder: the table and the folders "
                             f"come from different releases. Use the participants.tsv downloaded "
                             f"with these folders.")
        raise InputError(f"{len(missing)} of {len(files)} scans listed in {table_path} have no "
                         f"quasi-raw array, e.g. participant {pid}: {path} is missing. Download "
                         f"the release's {RELEASE_SPLITS[split][0]}/ folder completely, or remove "
                         f"those rows.")
    orphans = _orphans(root, listed)
    if orphans:
        raise InputError(f"{len(orphans)} quasi-raw array(s) have no row in {table_path}, e.g. "
                         f"{orphans[0]}: the table and the arrays come from different releases. "
                         f"Use the participants.tsv downloaded with these folders.")


def read_release(root: str | Path, *, validation: str = "both", site_column: str = "site",
                 check_arrays: bool = True) -> OpenBHBRelease:
    """Find and check the OpenBHB release in ``root``; nothing is loaded but headers.

    Parameters
    ----------
    root : the release folder (participants.tsv, train/, val/, resource/).
    validation : which official validation scans form our ``validation`` subset:
        ``both`` (the release's ``val`` = internal + external, default), ``internal``
        (scanners also in training) or ``external`` (other scanners/sequences). Scans of
        the other one are left out of the table.
    site_column : ``site`` (acquisition centre, default) or ``siteXacq`` (centre x
        acquisition setting); becomes ``study``.
    check_arrays : read every selected array's .npy header (shape, dtype); a few seconds
        for the whole release.

    Returns
    -------
    :class:`OpenBHBRelease`.

    Raises
    ------
    InputError
        Naming the file, line or column: a missing folder or file, the challenge's
        concatenated layout, missing columns, a non-numeric or implausible age, an unknown
        split, duplicate ids, an empty train or validation subset, a row without its array
        (or with it in the other split's folder), an array without a row, an array of the
        wrong shape or dtype.
    ValueError
        ``validation`` or ``site_column`` not among the choices.
    """
    if validation not in VALIDATION_CHOICES:
        raise ValueError(f"validation={validation!r}; choose one of {', '.join(VALIDATION_CHOICES)}.")
    if site_column not in SITE_COLUMNS:
        raise ValueError(f"site_column={site_column!r}; choose one of {', '.join(SITE_COLUMNS)}.")
    root = Path(root)
    table_path = release_participants(root)
    release_table = _read_table(table_path, site_column)
    listed = set(release_table["participant_id"])
    chosen = ("train",) + VALIDATION_CHOICES[validation]
    for subset, splits in (("train", ("train",)), ("validation", VALIDATION_CHOICES[validation])):
        if not release_table["split"].isin(splits).any():
            raise InputError(f"{table_path}: no row has split {' or '.join(splits)}, so the "
                             f"{subset} subset is empty. Use the release's complete "
                             f"participants.tsv, or another pretrain.<run>.source.openbhb_validation.")
    release_table = release_table[release_table["split"].isin(chosen)].reset_index(drop=True)
    for folder in sorted({RELEASE_SPLITS[split][0] for split in chosen}):
        if not (root / folder).is_dir():
            raise InputError(f"{root / folder} is missing: the release keeps the quasi-raw arrays "
                             f"of its {folder} scans there. Download it (or unpack it) into {root}.")
    files = [quasiraw_path(root, pid, split)
             for pid, split in zip(release_table["participant_id"], release_table["split"])]
    _check_rows_match_files(root, table_path, release_table, files, listed)
    grid, grid_source = _source_grid(root)
    if check_arrays:
        for pid, path in zip(release_table["participant_id"], files):
            _check_header(path, grid.shape, f"participant {pid}")
    table = _our_table(release_table, site_column, table_path)
    log.info("OpenBHB %s: %d train + %d validation scans (%s), %d sites (%s), grid %s from %s",
             root, int((table["subset"] == "train").sum()),
             int((table["subset"] == "validation").sum()), validation, table["study"].nunique(),
             site_column, "x".join(map(str, grid.shape)), grid_source)
    return OpenBHBRelease(root=root, table=table, files=tuple(files), grid=grid,
                          grid_source=grid_source)


# -- resampling --------------------------------------------------------------------------------

def _area_weights(scale: float, offset: float, n_target: int, n_source: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Banded 1D weights of the area (box) average: target voxel t covers source
    coordinates ``scale * t + offset +- |scale| / 2``; source voxel s covers
    ``s +- 1/2``; weight = overlap / |scale|. Returns (indices, weights), each [T, K]."""
    width = abs(scale)
    centres = scale * np.arange(n_target) + offset
    low, high = centres - width / 2, centres + width / 2
    first = np.clip(np.floor(low + 0.5).astype(int), 0, n_source - 1)
    span = int(math.ceil(width)) + 2
    indices = first[:, None] + np.arange(span)[None, :]
    overlap = (np.minimum(high[:, None], indices + 0.5) - np.maximum(low[:, None], indices - 0.5))
    weights = np.where(indices < n_source, np.clip(overlap, 0.0, None), 0.0) / width
    return np.minimum(indices, n_source - 1), weights


class Resampler:
    """Resample volumes from one grid onto another, both in the same world space (mm).

    The voxel-to-voxel map is ``inv(source.affine) @ target.affine`` (target voxel ->
    source voxel); the quasi-raw images and our template are both affinely in MNI space,
    so their affines relate them.

    Methods
    -------
    ``area``
        Each target voxel is the mean of the source image over the target voxel's box
        (source voxels weighted by their overlap; outside the source grid counts as 0).
        Exact block averaging when the grids align at an integer factor, and the
        anti-aliased choice for downsampling in general. Needs axis-aligned grids
        (the voxel-to-voxel matrix diagonal, flips allowed).
    ``linear``
        Trilinear interpolation at each target voxel's centre (any affine); outside the
        source grid is 0.
    ``auto``
        ``area`` when the grids are axis-aligned and the target voxels are at least as
        large as the source's on every axis, otherwise ``linear``.

    Output: float32 [X, Y, Z] on the target grid, background 0.
    """

    def __init__(self, source: Grid, target: Grid, *, method: str = "auto") -> None:
        if method not in RESAMPLE_METHODS:
            raise ValueError(f"method={method!r}; choose one of {', '.join(RESAMPLE_METHODS)}.")
        self.source = as_grid(*source, what="source grid")
        self.target = as_grid(*target, what="target grid")
        self.voxel_map = np.linalg.inv(self.source.affine) @ self.target.affine
        matrix = self.voxel_map[:3, :3]
        aligned = np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-6)
        if method == "auto":
            method = "area" if aligned and np.all(np.abs(np.diag(matrix)) >= 1 - 1e-6) else "linear"
        if method == "area" and not aligned:
            raise ValueError("method 'area' needs axis-aligned grids (the voxel-to-voxel matrix "
                             f"is {np.round(matrix, 4).tolist()}); use 'linear'.")
        self.method = method
        if method == "area":
            self._bands = [_area_weights(matrix[axis, axis], self.voxel_map[axis, 3],
                                         self.target.shape[axis], self.source.shape[axis])
                           for axis in range(3)]

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        volume = np.asarray(volume, dtype=np.float32)
        if volume.shape != self.source.shape:
            raise ValueError(f"volume has shape {volume.shape}; the source grid is "
                             f"{self.source.shape}.")
        if self.method == "linear":
            from scipy import ndimage

            return ndimage.affine_transform(
                volume, self.voxel_map[:3, :3], offset=self.voxel_map[:3, 3],
                output_shape=self.target.shape, order=1, mode="grid-constant", cval=0.0,
                prefilter=False, output=np.float32)
        for axis, (indices, weights) in enumerate(self._bands):
            moved = np.moveaxis(volume, axis, 0)
            summed = np.zeros((indices.shape[0],) + moved.shape[1:], dtype=np.float32)
            for column in range(indices.shape[1]):
                w = weights[:, column].astype(np.float32)
                summed += w.reshape((-1,) + (1,) * (moved.ndim - 1)) * moved[indices[:, column]]
            volume = np.moveaxis(summed, 0, axis)
        return np.ascontiguousarray(volume, dtype=np.float32)


# -- a pretraining cohort on disk --------------------------------------------------------------

def write_pretraining_split(release: OpenBHBRelease, template_mask: str | Path,
                            out_images: str | Path, out_participants: str | Path,
                            out_stats: str | Path, *, resolution_mm: int = 2,
                            dtype: str = "float32", method: str = "auto",
                            scope: str = "train") -> dict:
    """The release as a pretraining split folder, like a T1w cohort's
    (:func:`brainage.normalise.normalise_dataset`, which rule normalise_pretrain_cohort
    runs): each volume resampled onto the template grid, restricted to the template's
    brain mask (the chain's registered T1w keeps its own warped brain mask, which reaches
    past it: docs/method.md §9), scaled by its brain median, windowed,
    block-averaged to ``resolution_mm`` and z-normalised with the statistics of the
    release's training scans (``scope`` ``train``, the default) or of all its scans
    (``all``), as config key ``normalise.scope`` chooses for every cohort
    (:func:`brainage.normalise.write_normalised`).

    Writes ``out_images`` [n, 1, X, Y, Z], ``out_participants`` (our table with the official
    ``subset`` train / validation; ``coverage`` is not measured (NaN): the release ships
    checked scans) and ``out_stats`` (the normalisation record), each
    atomically. Volumes are read one at a time, the statistics subjects' twice (statistics,
    then writing), so memory stays one 1 mm volume whatever the release size. Returns the
    stats.
    """
    from brainage.normalise import write_normalised
    from brainage.preprocess.images import load_mask

    brain, affine = load_mask(template_mask, what="template brain mask")
    resample = Resampler(release.grid, Grid(tuple(brain.shape), affine), method=method)
    inside = brain.astype(np.float32)
    row_of = {pid: row for row, pid in enumerate(release.table["participant_id"])}

    def subject_maps(participant_id: str, record) -> dict[str, np.ndarray]:
        return {"T1w": resample(release.load(row_of[participant_id])) * inside}

    # in participant-id order, as a T1w cohort's split (normalise_dataset): training's
    # batches are drawn over row positions, and a re-saved release table trained another
    # encoder
    table = release.table.sort_values("participant_id", kind="stable").reset_index(drop=True)
    table["coverage"] = np.nan
    return write_normalised(table, subject_maps, template_mask, out_images, out_participants,
                            out_stats, split="openbhb", scope=scope, dtype=dtype,
                            resolution_mm=resolution_mm, modalities=["T1w"],
                            eval_subset="validation")
