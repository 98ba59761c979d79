"""The input dataset (BIDS-like): subject labels, participants.tsv and the images,
each checked before any work.

Layout of a dataset root::

    participants.tsv                          participant_id, age, sex, study, [extra...]
                                              (a cohort to predict: participant_id only)
    sub-<label>/mre/sub-<label>_stiffness.nii.gz   shear stiffness (kPa), native space
    sub-<label>/mre/sub-<label>_<map>.nii.gz       other MRE maps on the same grid
                                                   (damping_ratio, storage_modulus, loss_modulus)
    sub-<label>/anat/sub-<label>_T1w.nii.gz        optional, same space as the maps

Config key ``dataset.modalities`` says which maps every subject must have
(:mod:`brainage.modalities`).

Every check raises :class:`InputError` naming the file, subject or column and what to do,
before any work starts (the workflow calls these while building its job graph).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import gzip
import json
import logging
import os
import re
import shlex
import signal
import struct
import sys
import threading
import time
import unicodedata
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from stat import S_ISLNK
from typing import Callable, Collection, Mapping, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd

from brainage.io import sha256_file, write_json
from brainage.modalities import (
    DEFAULT_MODALITIES,
    MODALITIES,
    grid_modality,
    input_path,
    modality,
    mre_maps,
)
from brainage.paths import names_sharing_a_folder

log = logging.getLogger(__name__)

#: BIDS labels are letters and digits only, so no id can escape the results folder; at
#: most 64 of them, so that every file name made from one fits the file system's 255 bytes.
#: Matched with fullmatch: ``$`` alone would also accept a trailing newline.
LABEL_PATTERN = re.compile(r"[A-Za-z0-9]{1,64}")
#: The largest image read (bytes, as its header claims): a 0.5 mm T1w of 512³ float32 voxels
#: is 0.5 GiB, so 1 GiB. nibabel allocates what a header claims before it reads the file, so a
#: damaged or crafted header of a few bytes could take all of a login node's memory.
MAX_IMAGE_BYTES = 2**30
REQUIRED_COLUMNS = ("participant_id", "age", "sex", "study")
#: A cohort a trained model is applied to needs only its ids: the model reads no age, sex or
#: study. An age gives a brain-age gap; study or group, the summary's groups.
PREDICT_REQUIRED_COLUMNS = ("participant_id",)
#: The group of a subject whose grouping column is blank (a cohort to predict may have
#: blank studies), and the one group of a cohort with neither a group nor a study column.
NO_GROUP = "n/a"
ALL_SUBJECTS = "all"
#: Columns the pipeline writes into the tables it derives from a participants.tsv, beside
#: the table's own columns: a split's participants.tsv (brainage.normalise.ADDED_COLUMNS)
#: and a predicted cohort's predictions.tsv (brainage.apply.PREDICTION_COLUMNS). A column of
#: the same name in participants.tsv would be overwritten there, so it is refused.
DERIVED_COLUMNS = ("subset", "coverage", "status", "qc_pass", "qc_reason", "predicted_age",
                   "gap", "corrected_gap", "corrected_predicted_age", "within_training_ages",
                   "qc_dice", "qc_correlation", "qc_coverage")
#: Columns of predictions.tsv added later (2026-12-06, seen_in_training 2026-12-07), refused
#: in a cohort to predict only: a training table that has them planned before, and no table
#: derived from it writes them.
PREDICTION_ONLY_COLUMNS = ("registered_by", "skull_stripped_by", "seen_in_training")
#: Plausible human ages (years); anything outside is a data-entry error.
AGE_RANGE_YEARS = (0.0, 120.0)


class InputError(ValueError):
    """The input dataset is not what the pipeline needs; the message says how to fix it."""


#: Other names labs give a required column (case ignored), named in the refusal.
COLUMN_SYNONYMS = {"sex": ("gender", "sex_at_birth", "biological_sex"),
                   "study": ("site", "center", "centre", "scanner", "cohort", "dataset")}


def _synonyms_in(columns: Sequence, column: str) -> list[str]:
    """The columns of a table named as another word for the required ``column``."""
    names = COLUMN_SYNONYMS.get(column, ())
    return [str(name) for name in columns if str(name).strip().casefold() in names]


def anatomical_path(root: str | Path, label: str) -> Path:
    return input_path(root, label, "T1w")


def participant_match_key(participant_id: str) -> str:
    """``participant_id`` as two cohorts' lists are compared to find one person in both:
    case ignored and leading zeros of every number dropped (``sub-ST1S01`` and
    ``sub-st1s001`` -> ``sub-st1s1``), since spreadsheets and export tools add or strip
    them."""
    return _without_leading_zeros(str(participant_id).casefold())


def _without_leading_zeros(text: str) -> str:
    """``text`` with every number written without its leading zeros (``st01`` -> ``st1``)."""
    return re.sub(r"\d+", lambda number: str(int(number.group())), text)


def check_label(label: str, *, where: str) -> str:
    if not isinstance(label, str) or not LABEL_PATTERN.fullmatch(label):
        raise InputError(
            f"{where}: subject label {label!r} is not a BIDS label (letters and digits only, "
            f"at most 64, e.g. '01a' in sub-01a). Rename the subject folder and its "
            f"participants.tsv row.")
    return label


def read_participants(root: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES,
                      *, root_setting: str = "config key dataset.root",
                      needed_by: str | None = None,
                      to_predict: bool = False) -> pd.DataFrame:
    """Read and validate ``<root>/participants.tsv``; every listed subject must have every
    image of ``modalities`` (config key ``dataset.modalities``).

    ``root_setting`` names the setting that gave ``root`` (``config key
    predict.cohorts.<name>``, ``config key pretrain.<run>.source.root``, ``--dataset``):
    the message for a folder that does not exist says to set that one. ``needed_by``
    names what needs ``modalities`` when it is not that config key (``model bundle
    <path>``): a missing image is then the subject's to add, as a trained model's inputs
    cannot be removed. ``to_predict``: a cohort a trained model is applied to, which needs
    only ``participant_id`` (:data:`PREDICT_REQUIRED_COLUMNS`): the ``age``, ``sex`` and
    ``study`` columns or cells may be missing. A subject without an age (an empty cell or
    n/a, read as NaN; a table without the column gets one of NaN) gets a predicted age but
    no brain-age gap. Training cohorts need every column and every age.

    Returns a DataFrame with ``participant_id`` (``sub-<label>``), ``age`` (years, float),
    ``sex``, ``study`` (str; a cohort to predict keeps them only where its table has them)
    and any extra columns, in file order.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(_missing_root_message(root, root_setting))
    table_path = root / "participants.tsv"
    if _broken_link(table_path):
        raise InputError(f"{table_path} {_not_a_file(table_path)}. " + (
            "Fetch it (datalad get participants.tsv, or git annex get)"
            if _not_fetched(table_path) else "Repair the link or put the table there")
            + " and run again.")
    try:  # size too: two edits within one tick of the file system's clock share an mtime
        status = table_path.stat()
        stamp = (status.st_mtime_ns, status.st_size)
    except FileNotFoundError:
        stamp = None
    try:  # and its sidecar's, which may give the unit of the ages
        status = table_path.with_suffix(".json").stat()
        sidecar_stamp = (status.st_mtime_ns, status.st_size)
    except OSError:
        sidecar_stamp = None
    return _read_participants_cached(str(root.resolve()), stamp, tuple(modalities),
                                     needed_by, to_predict, sidecar_stamp).copy()


def _missing_root_message(root: Path, root_setting: str) -> str:
    if root.exists():  # a file (often participants.tsv itself) where the folder belongs
        return (f"dataset root {root} is a file, not a folder. Set {root_setting} to the "
                f"folder that holds participants.tsv and a sub-<label> folder per subject.")
    if str(root).startswith("~"):  # YAML and Snakemake keep '~'
        return (f"dataset root {root} does not exist: '~' is not expanded in paths. Set "
                f"{root_setting} to the full path ({root.expanduser()}).")
    if _named_in_another_encoding(root):
        return (f"dataset root {root} is not found with this session's file-name encoding "
                f"({sys.getfilesystemencoding()}, from its locale), but it exists under its "
                f"UTF-8 name, as the config and your files spell it. Run export PYTHONUTF8=1 "
                f"(or use a UTF-8 locale, e.g. export LC_ALL=C.UTF-8) before snakemake or "
                f"brainage-predict.")
    shown = (str(root) if root.is_absolute()
             else f"{root} (relative to {Path.cwd()}, the working directory)")
    if root_setting == "config key dataset.root":  # the training cohort: maybe the demo's
        return (f"dataset root {shown} does not exist. Set config key dataset.root to your "
                f"BIDS-like dataset folder, or dataset.simulate.enabled: true for the demo "
                f"cohort.")
    return (f"dataset root {shown} does not exist. Set {root_setting} to the cohort's "
            f"BIDS-like dataset folder (participants.tsv and a sub-<label> folder per "
            f"subject).")


def _named_in_another_encoding(path: Path) -> bool:
    """Whether ``path`` is missing only because this process encodes file names with its
    locale's encoding (Latin-1 on some clusters' login nodes: ``ü`` as one byte) while the
    name on disk is UTF-8 (two bytes), as a UTF-8 terminal and the YAML config spell it."""
    text = str(path)
    utf8 = text.encode("utf-8", "surrogateescape")
    try:
        differs = os.fsencode(text) != utf8
    except UnicodeEncodeError:  # a letter the locale cannot encode at all (Łódź in Latin-1)
        differs = True
    return differs and os.path.exists(utf8)


@lru_cache(maxsize=8)
def _read_participants_cached(root_str: str, stamp: tuple[int, int] | None,
                              modalities: tuple[str, ...],
                              needed_by: str | None = None,
                              to_predict: bool = False,
                              sidecar_stamp: tuple[int, int] | None = None) -> pd.DataFrame:
    root = Path(root_str)
    required = PREDICT_REQUIRED_COLUMNS if to_predict else REQUIRED_COLUMNS
    if not root.is_dir():  # removed since read_participants looked
        raise InputError(f"dataset root {root} does not exist.")
    table_path = root / "participants.tsv"
    if stamp is None:
        # a root set one level above the dataset (a project folder holding rawdata/) or
        # one below it (a subject's folder)
        nearby = sorted({str(other.parent) for other in (*root.glob("*/participants.tsv"),
                                                         root.parent / "participants.tsv")
                         if other.is_file()})
        raise InputError(
            f"{table_path} is missing. The dataset root needs a tab-separated participants.tsv "
            f"with columns {', '.join(required)}."
            + (f" {' and '.join(nearby)} {'has' if len(nearby) == 1 else 'each have'} one: "
               f"set the dataset root to the dataset's own folder." if nearby else ""))
    try:
        lines = check_table_shape(table_path)
        table = _read_text_table(table_path, required)
    except UnicodeDecodeError:
        raise InputError(_not_utf8_message(table_path)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{table_path} cannot be read as a tab-separated table: {error}") from None
    except OSError as error:  # a folder of that name, or a colleague's file of mode 600
        raise InputError(f"{table_path} cannot be read ({error.strerror or error}); it must "
                         f"be a file that this user may read.") from None
    # a header ending in a tab names an empty column "Unnamed: <n>"
    table = table.drop(columns=[column for column in table.columns
                                if str(column).startswith("Unnamed: ")
                                and table[column].isna().all()])
    # "Age" for "age": BIDS names the columns in lower case; a cohort to predict would lose
    # its ages (and every gap) to the spelling without a word
    misspelt = {}  # {required name: the header's spelling of it}
    for column in map(str, table.columns):
        name = column.strip().casefold()
        if name != column and name in (*required, "age") and name not in table.columns:
            misspelt[name] = column
    if to_predict and "age" in misspelt:
        raise InputError(
            f"{table_path} has a column {misspelt['age']!r} but none named 'age', so its ages "
            f"would not be read (predicted ages, no brain-age gaps). Rename it to 'age' "
            f"(lower case, no spaces), or remove it to predict without ages.")
    _refuse_ages_not_in_years(table_path.with_suffix(".json"))
    age_like = [] if "age" in table.columns or "age" in misspelt else _age_like_columns(table)
    if to_predict and age_like:  # a warning: a mother's age or an age at onset is no age
        log.warning("%s has no column 'age' but %s: only 'age' is read, so the cohort gets "
                    "predicted ages and no brain-age gaps. If one is the age at the scan in "
                    "years, rename it to 'age'.", table_path, ", ".join(map(repr, age_like)))
    missing = [column for column in required if column not in table.columns]
    if missing:
        spaced = [misspelt[column] for column in missing if column in misspelt]
        # one column holding the whole header: another separator (a German Excel's "CSV"
        # uses semicolons)
        header = str(table.columns[0]) if len(table.columns) == 1 else ""
        marks = {",": "commas", ";": "semicolons", "|": "vertical bars"}
        # the most frequent: a semicolon table's header may hold a comma inside a name
        mark = max(marks, key=header.count)
        separator = marks[mark] if header.count(mark) else None
        if separator is None and set(required) <= set(header.replace('"', " ").split()):
            separator = "spaces"  # R's write.table default, or columns aligned by hand
        raise InputError(
            f"{table_path} lacks column(s) {', '.join(missing)}; it has "
            f"{', '.join(map(str, table.columns))}. Required: {', '.join(required)}."
            + "".join(f" The header's {column!r} has spaces around its name: remove them."
                      if column.strip() == column.strip().casefold() else
                      f" The header's {column!r} is {column.strip().casefold()!r} in another "
                      f"case: rename it (the columns are lower case)." for column in spaced)
            + (f" Its columns are separated by {separator}: save it tab-separated (a "
               f"spreadsheet's 'Text (tab-separated)' export)." if separator else "")
            + (f" If its {age_like[0]!r} is the age at the scan in years, rename it to 'age'."
               if age_like and "age" in missing else "")
            + "".join(f" If its {other!r} is the {column}, rename it to {column!r}."
                      for column in missing if not separator
                      for other in _synonyms_in(table.columns, column))
            + (" The study (or site) of each scan stratifies the split and names Table 2's "
               "rows (BIDS' own table has no such column): for a dataset of one study, add "
               "a column 'study' with one value (e.g. mystudy) in every row."
               if "study" in missing and not separator else ""))
    clashing = [str(column) for column in table.columns if column in DERIVED_COLUMNS
                or (to_predict and column in PREDICTION_ONLY_COLUMNS)]
    if clashing:
        raise InputError(
            f"{table_path} has column(s) {', '.join(clashing)}, which the pipeline writes "
            f"into the tables it derives from participants.tsv (a split's subjects, a "
            f"cohort's predictions), where they would replace yours. Rename them (e.g. "
            f"{clashing[0]}_original).")
    if len(lines) != len(table):  # not expected: then count rows as if no line were skipped
        lines = list(range(2, len(table) + 2))
    table, lines = _without_empty_rows(table, lines, table_path)
    if table.empty:
        raise InputError(f"{table_path} lists no participants. Add a row per subject "
                         f"({', '.join(required)}).")
    if to_predict and "age" not in table.columns:  # no ages: predicted ages, no gaps
        # beside participant_id, where a cohort with ages has it: predictions.tsv's columns
        # keep their order for scripts that read them by position
        table.insert(table.columns.get_loc("participant_id") + 1, "age", np.nan)
    # an age of spaces, or a missing-value code padded with them (" n/a"), is as missing
    # as an empty cell: a cohort to predict may leave it so
    age_text = table["age"].astype("string").str.strip().str.casefold()
    table["age"] = table["age"].mask(age_text.isin(MISSING_VALUE_CODES), np.nan)
    _validate_participant_rows(table, table_path, lines, to_predict=to_predict)
    _validate_against_schema(table, table_path, lines, to_predict=to_predict)
    _require_every_image(root, [pid[len("sub-"):] for pid in table["participant_id"]],
                         modalities, remedy=f"or remove the subject's row from {table_path}",
                         needed_by=needed_by, to_predict=to_predict)
    _warn_unlisted_subjects(root, set(table["participant_id"]), table_path)
    table["age"] = table["age"].astype(float)
    if not to_predict:  # a cohort to predict keeps its blank studies blank
        table["study"] = table["study"].astype(str)
    return table


def is_simulation(root: str | Path) -> bool:
    """Whether ``root``'s dataset_description.json says ``brainage.simulate`` wrote it."""
    description = Path(root) / "dataset_description.json"
    try:
        return description.is_file() and "brainage.simulate" in description.read_text()
    except (OSError, UnicodeDecodeError):
        return False


def simulation_mismatches(cohorts: Sequence[tuple[str, str | Path, bool]]) -> tuple[
        list[str], list[str]]:
    """Problems and warnings for cohorts ``(config key, root, simulated)`` whose folder
    and simulation setting disagree.

    A simulated cohort whose folder holds another dataset (a copied demo config with only
    ``dataset.root`` changed) is a problem: the simulation never runs there (its
    participants.tsv exists), and the checks that read a real cohort at planning (test
    subjects in a pretraining cohort, batch sizes) were skipped for it. A cohort read as
    real data from a simulated folder (the schema's default root, where the demo writes)
    gets a warning: its tables say nothing about real data.
    """
    problems, warnings = [], []
    for key, root, simulated in cohorts:
        # a link counts, even one not fetched: the simulation would delete it
        exists = os.path.lexists(Path(root) / "participants.tsv")
        if simulated and exists and not is_simulation(root):
            problems.append(
                f"config key {key} ({root}) holds a dataset that the simulation did not "
                f"write (its dataset_description.json does not name brainage.simulate), but "
                f"the simulation of that cohort is on. To use the dataset, switch the "
                f"simulation off ({'dataset' if key == 'dataset.root' else 'predict'}"
                f".simulate.enabled: false); to simulate, point {key} at an empty folder.")
        elif not simulated and exists and is_simulation(root):
            warnings.append(
                f"config key {key} ({root}) is a simulated cohort (written by "
                f"brainage.simulate), read here as data: its results say nothing about real "
                f"subjects. Point {key} at your dataset if that was meant.")
    return problems, warnings


def preprocessed_from(description_path: str | Path) -> str | None:
    """The source dataset's URL (``file://...``) that a preprocessing folder's
    ``dataset_description.json`` (``description_path``) names, or None without a readable
    one."""
    try:
        return json.loads(Path(description_path).read_text())["SourceDatasets"][0]["URL"]
    except (OSError, ValueError, LookupError, TypeError):
        return None


def lab_dataset_of(description_path: str | Path, demo_root: str | Path) -> Path | None:
    """The dataset a preprocessing folder's description (``description_path``) names as
    its source when that is a lab's own: a folder other than ``demo_root`` that is there,
    holds a participants.tsv (a link too: DataLad) and is no simulation; else None."""
    source = preprocessed_from(description_path)
    if source is None or not source.startswith("file:"):
        return None
    folder = Path(url2pathname(urlparse(source).path))  # %20 for a space, %C3%BC for ü
    if (folder.resolve() == Path(demo_root).resolve()
            or not os.path.lexists(folder / "participants.tsv") or is_simulation(folder)):
        return None
    return folder


def simulation_missing_under_results(root: str | Path,
                                     description_path: str | Path) -> str | None:
    """A warning when the simulated training cohort's ``root`` holds no simulation while the
    results' preprocessing description (``description_path``, written by rule
    describe_preprocessing) says subjects were preprocessed, else None.

    The simulation is a checkpoint whose output only input functions reach: under finished
    results Snakemake may not run it for a new (or mistyped) ``dataset.root``, and then
    nothing reran and the description named the new, empty root as the source of the old
    cohort's results. The warning lasts as long as the root is empty (also once the
    description names it), and it is no refusal: a moved project whose demo dataset was
    deleted, and another config sharing the results folder (config/test.yaml), plan as
    they should."""
    if os.path.lexists(Path(root) / "participants.tsv"):
        return None
    source = preprocessed_from(description_path)
    if source is None:
        return None  # no finished results (or no readable description): nothing to keep apart
    again = ("simulate it again with --forcerun simulate_cohort (the same seed writes the "
             "same files; every later job then reruns)")
    if source == Path(root).resolve().as_uri():
        return (f"config key dataset.root ({root}) holds no simulation, but {description_path} "
                f"describes the results as preprocessed from it: the simulated cohort was "
                f"deleted or moved after the run, so the results name a folder that holds "
                f"nothing. Restore it, or {again}; a run that only predicts (snakemake "
                f"predict) does not need it.")
    return (f"config key dataset.root ({root}) holds no simulation yet, but "
            f"{description_path} describes subjects preprocessed from {source}. If this run "
            f"plans no simulate_cohort job, the results stay that cohort's and would name "
            f"{root} as their source: point dataset.root back to that folder, give the new "
            f"cohort a results folder of its own (config key output.results), or simulate "
            f"{root} with --forcerun simulate_cohort (every later job then reruns).")


def _not_utf8_message(table_path: Path) -> str:
    """Where ``table_path`` stops being UTF-8, and how to save it so (a spreadsheet's plain
    text export may write Windows-1252 or Latin-1: a study named Zürich)."""
    raw = table_path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:  # the decoder's position counts from the file start
        # lines end in LF, CRLF, or CR alone (Excel for Mac's "Tab delimited Text")
        before = raw[:error.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        line = before.count(b"\n") + 1
        where = f" line {line} (byte 0x{raw[error.start]:02x})"
    else:
        where = ""
    # Excel's "Unicode Text" export is UTF-16 (a byte-order mark, a NUL in every ASCII
    # character), which the Windows-1252 remedy below would turn into garbage; Excel for
    # Mac writes Mac Roman with CR line ends, whose ü (0x9f) Windows-1252 reads as Ÿ
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:200]:
        source, example = "utf-16", "UTF-16 (a spreadsheet's \"Unicode Text\")"
    elif b"\r" in raw and b"\n" not in raw:
        source, example = "macintosh", "Mac Roman (Excel for Mac's \"Tab delimited Text\")"
    else:
        source, example = "cp1252", "Windows-1252"
    return (f"{table_path}{where} is not UTF-8 text. Save the table as UTF-8, tab-separated "
            f"(a spreadsheet's export dialog names the encoding), or convert it, e.g. from "
            f"{example}: iconv -f {source} -t utf-8 {table_path.name} > converted.tsv.")


def _read_text_table(table_path: Path, required: Sequence[str] = REQUIRED_COLUMNS
                     ) -> pd.DataFrame:
    """``table_path`` read as pandas reads it, every column but the age as text; a later
    row with empty fields beyond the header's (a spreadsheet's row of tabs), at which
    pandas' tokenizer stops, read up to the header's width (check_table_shape refused
    non-empty ones)."""
    # index_col=False: a data row ending in a tab (a spreadsheet export) keeps its columns
    # instead of shifting them right behind an index made of the ids. Every column but the
    # age is text, so that the extra columns come back in a split's participants.tsv and a
    # cohort's predictions as the lab wrote them (a site code 007 is not 7, a group 0 not
    # 0.0, which --bias-reference-group 0 would not have named). Only BIDS's missing value
    # (n/a, or an empty cell) is missing there: pandas' list (None, NA, null, ...) erased a
    # lab's medication "None" and pooled a group "None" with the subjects without a group;
    # the ``required`` columns and the age keep pandas' list (their checks name the codes
    # they refuse; a cohort to predict requires only participant_id, so its study 'NA', a
    # site, is a study)
    def read(**options) -> pd.DataFrame:
        options = {"sep": "\t", "index_col": False,
                   "dtype": defaultdict(lambda: str, age=object), **options}
        table = pd.read_csv(table_path, **options)
        as_written = pd.read_csv(table_path, keep_default_na=False, **options)
        for column in table.columns:
            if column not in (*required, "age"):
                text = as_written[column]
                table[column] = text.mask(text.str.strip().str.casefold().isin(("", "n/a")))
        return table

    try:
        return read()
    except pd.errors.ParserError as error:
        with open(table_path, newline="", encoding="utf-8-sig") as handle:
            records = _single_line_records(csv.reader(handle, delimiter="\t"), table_path)
            width = len(next(records, (1, []))[1])
        try:
            return read(usecols=range(width))
        except ValueError:  # pandas' header is another line than the csv module's
            raise error from None


def check_table_shape(table_path: Path) -> list[int]:
    """Raise :class:`InputError` for a value that spans lines (a stray double quote opens a
    quoted field that runs to the next quote, taking the rows between with it), a header
    that names a column twice, or naming the first line of the table with a non-empty
    field beyond the header's columns (pandas would silently rename, drop or shift them);
    empty trailing fields, a spreadsheet's trailing tabs, are fine.

    Returns the line number of each data row, in order: the lines pandas reads as rows,
    without the blank (or spaces-only) lines it skips, before the header too.
    """
    with open(table_path, newline="", encoding="utf-8-sig") as handle:
        rows = _single_line_records(csv.reader(handle, delimiter="\t"), table_path)
        _, header = next(rows, (1, []))
        named = [column.strip() for column in header if column.strip()]
        repeated = sorted({column for column in named if named.count(column) > 1})
        if repeated:  # pandas would read the second as "<name>.1" and ignore it
            raise InputError(f"{table_path}: the header names column(s) {', '.join(repeated)} "
                             f"twice; keep one of each.")
        lines = []
        for line, row in rows:
            lines.append(line)
            extra = [field for field in row[len(header):] if field.strip()]
            if extra and len(row) == len(header) + 1 and row[0].strip() == str(len(lines)):
                # R's write.table writes row names, without a header field, by default
                raise InputError(
                    f"{table_path} line {line}: {len(row)} fields for the header's "
                    f"{len(header)} columns, the first being the row's number "
                    f"{row[0].strip()!r}: a column of row names without a name in the header "
                    f"(R's write.table writes them by default). Write the table with "
                    f"row.names = FALSE, or delete that first column.")
            if extra:
                raise InputError(
                    f"{table_path} line {line}: {len(row)} fields for the header's "
                    f"{len(header)} columns ({', '.join(header)}); the extra value(s) "
                    f"{', '.join(map(repr, extra))} belong to no column. Fix the row, or "
                    f"name the column in the header.")
    return lines


def _single_line_records(reader, table_path: Path):
    """``(line number, record)`` of each record of a ``csv.reader`` but those pandas skips
    (blank or spaces-only lines), refusing a record whose value spans lines."""
    line, header = 1, None
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip(" ")):
                line = reader.line_num + 1
                continue
            for index, value in enumerate(record):
                if "\n" in value or "\r" in value:
                    column = (repr(header[index]) if header is not None and index < len(header)
                              else f"{index + 1}")
                    spans = reader.line_num - line + 1
                    raise InputError(
                        f"{table_path} line {line}, column {column}: the value opens a double "
                        f"quote that is not closed on its line, so it "
                        + (f"runs over {spans} lines (to line {reader.line_num}) and takes the "
                           f"rows between into this one value" if spans > 1 else
                           "runs to the end of the file")
                        + f". Remove the stray quote (or close it on line {line}).")
            header = record if header is None else header
            yield line, record
            line = reader.line_num + 1
    except csv.Error as error:  # a value longer than the csv module's limit
        # within its line: no quote runs on (a quoted value closed on its line, or none)
        if "field larger than field limit" in str(error) and reader.line_num <= line:
            raise InputError(
                f"{table_path} line {line}: a value is longer than {csv.field_size_limit():,} "
                f"characters ({error}); participants.tsv holds one short value per "
                f"subject and column. Shorten it or move it to a file of its own.") from None
        raise InputError(
            f"{table_path} line {line}: a value opens a double quote that is not closed, so "
            f"it runs on through the rows below ({error}). Remove the stray quote (or close "
            f"it on line {line}).") from None


def unlisted_subject_folders(folder: str | Path, listed: set[str]) -> list[str]:
    """The ``sub-*`` folders in ``folder`` (a dataset, or a preprocessing folder under
    results/) whose name is not in ``listed`` (``sub-<label>`` ids), sorted."""
    return sorted(path.name for path in Path(folder).glob("sub-*")
                  if path.is_dir() and path.name not in listed)


def subjects_without_t1w(root: str | Path, labels: Sequence[str], *, where: str) -> str | None:
    """A warning naming the subjects of ``labels`` without a T1w when others have one (None
    when all or none have): their masks and transforms will come from their map instead,
    a difference that follows them like a site effect. Said before any job, since
    tabulate_qc can warn only after every subject is preprocessed."""
    missing = [label for label in labels if not anatomical_path(root, label).is_file()]
    if not missing or len(missing) == len(labels):
        return None
    shown = ", ".join(f"sub-{label}" for label in missing[:10]) + (
        f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return (f"{len(missing)} of {len(labels)} subjects in {root} ({where}) have no T1w "
            f"(anat/sub-<label>_T1w.nii.gz): {shown}. They will be skull-stripped and "
            f"registered by their map, the others by their T1w, a difference that follows "
            f"them like a site effect (their reference_correlation in qc.tsv reads lower). "
            f"Add their T1w images before preprocessing if they have them.")


def _warn_unlisted_subjects(root: Path, listed: set[str], table_path: Path) -> None:
    """Subject folders without a participants.tsv row are not used (they have no age):
    say so, by name, rather than drop them silently (a row lost in a spreadsheet edit)."""
    unlisted = unlisted_subject_folders(root, listed)
    if unlisted:
        shown = ", ".join(unlisted[:10]) + (f" and {len(unlisted) - 10} more"
                                            if len(unlisted) > 10 else "")
        log.warning("%d subject folder(s) in %s have no row in %s and are not used: %s. "
                    "Add their rows (participant_id, age, sex, study) to use them.",
                    len(unlisted), root, table_path, shown)


#: Cell values that mean "missing" once stripped and in lower case (pandas reads some of
#: them, in its own spelling, as missing already; these catch the padded and other-case ones).
MISSING_VALUE_CODES = frozenset({"", "n/a", "na", "nan", "null", "none", "#n/a", "<na>"})


def _without_empty_rows(table: pd.DataFrame, lines: Sequence[int],
                        table_path: Path) -> tuple[pd.DataFrame, list[int]]:
    """``table`` and its file ``lines`` without the rows of only tabs or spaces (a
    spreadsheet's formatted empty rows; pandas itself skips a line of spaces): they hold no
    subject, so they are left out, logged by line."""
    # astype(bool): apply() returns an empty table's string columns unchanged, and pandas 4
    # refuses `or` between booleans and strings.
    blank = table.astype(str).apply(lambda column: column.str.strip() == "").astype(bool)
    empty = (table.isna() | blank).all(axis=1).to_numpy()
    if empty.any():
        log.info("%s: line(s) %s hold only tabs or spaces and are skipped.", table_path,
                 ", ".join(str(line) for line, skip in zip(lines, empty) if skip))
    return (table[~empty].reset_index(drop=True),
            [line for line, skip in zip(lines, empty) if not skip])


#: Units of participants.json's "age" that are not years: months, weeks, days, hours
#: (whole words or their usual short forms); any other unit is taken as years.
NOT_YEARS = re.compile(r"(mos?|mths?|mnths?|mon|m|wks?|w|d|hrs?|h)\.?(\s*\(.*\))?|.*\b(months?|"
                       r"weeks?|days?|hours?|monate?|monaten|mois|mes(es)?|mese|mesi|"
                       r"maand(en)?|wochen?|semaines?|semanas?|settiman[ae]|we(e)?ken?|tage?|"
                       r"jours?|d[ií]as?|giorn[oi]|dag(en)?|stunden?|heures?|horas?|or[ae]|"
                       r"uren|uur|decades?)\b.*")


#: A unit that names years is years, whatever else it says ("decimal years (months / 12)").
YEARS = re.compile(r"\b(years?|yrs?|jahre?n?|ans?|años|anos|anni|anno|jaar|jaren)\b")


def _refuse_ages_not_in_years(sidecar: Path) -> None:
    """Refuse ages that participants.json (BIDS: a column's ``Units``) says are not in
    years: a paediatric cohort's ages in months (27 to 117) pass every check on the values
    and would be read as 27 to 117 years. The pipeline needs no sidecar; one that is not
    JSON (a trailing comma written by hand) is warned of, as its unit then goes unchecked."""
    try:
        described = json.loads(sidecar.read_text(encoding="utf-8-sig"))
    except ValueError as error:
        log.warning("%s cannot be read as JSON (%s), so the unit it may give the ages is not "
                    "checked: correct it (a trailing comma is a common slip), or delete it.",
                    sidecar, error)
        return
    except OSError:
        return
    try:
        age = next(value for key, value in described.items() if key.casefold() == "age")
        units = next(value for key, value in age.items() if key.casefold() == "units")
    except (OSError, ValueError, AttributeError, StopIteration):
        return
    unit = str(units).strip().casefold()
    if NOT_YEARS.fullmatch(unit) and not YEARS.search(unit):
        raise InputError(
            f"{sidecar} gives the unit of column 'age' as {units!r}; the pipeline reads ages "
            f"in years. Convert the ages of participants.tsv to years (months / 12, weeks / "
            f"52.18, days / 365.25) and set the unit to \"year\".")


#: Words of a column's name that may name the age at the scan: 'age' (a word of its own:
#: 'age_years', 'Patient_Age', 'AgeAtScan'; not 'agent'), the words of other languages,
#: and UK Biobank's field 21003 (age when attended the assessment centre).
AGE_WORDS = frozenset({"age", "alter", "âge", "edad", "età", "eta", "leeftijd", "idade",
                       "ålder", "alder", "wiek", "21003"})
#: Words ending in 'age' or 'alter' that are not an age ('PatientAge', 'Lebensalter' are).
NOT_AGE_WORDS = frozenset({"image", "stage", "voltage", "dosage", "percentage", "coverage",
                           "average", "usage", "package", "language", "storage", "damage",
                           "leakage", "shrinkage", "linkage", "passage", "message", "page",
                           "wage", "cage", "mileage", "drainage", "lineage", "verwalter",
                           "schalter", "halter", "salter", "psalter"})


def _age_like_columns(table: pd.DataFrame) -> list[str]:
    """Columns that may hold ages under another name: a name with a word of
    :data:`AGE_WORDS` (camel case split: 'AgeAtScan' is age at scan) and a value that
    reads as an age (a number from 0 to 120, or DICOM's '034Y'). Only named, never read:
    'mother_age' and 'age_at_onset' are ages too, not the age at the scan."""
    found = []
    for column in map(str, table.columns):
        words = set(re.findall(r"[^\W\d_]+|\d+", re.sub(r"(?<=[a-z])(?=[A-Z])", " ",
                                                          column).casefold()))
        squashed = re.sub(r"[\W_]+", "", column.casefold())
        one_word = (squashed.startswith("age") and not squashed.startswith("agen")
                    or squashed.endswith(("age", "alter")) and squashed not in NOT_AGE_WORDS)
        if not (words & AGE_WORDS or one_word):
            continue
        text = table[column].dropna().astype(str).str.strip()
        numbers = pd.to_numeric(text.str.replace(",", ".").str.replace(r"^(\d{3})Y$", r"\1",
                                                                      regex=True),
                                errors="coerce")
        if numbers.between(0, 120).any():
            found.append(column)
    return found


def _validate_participant_rows(table: pd.DataFrame, table_path: Path,
                               lines: Sequence[int], *, to_predict: bool = False) -> None:
    """Refuse bad ids and ages, naming every bad row at once (a lab fixes them in one go,
    not one run per row: a locale that writes every age with a decimal comma)."""
    ages = pd.to_numeric(table["age"], errors="coerce")
    by_line = {}  # {line: its problems}
    for row_number, participant_id, raw, age in zip(
            lines, table["participant_id"], table["age"], ages):
        where = f"{table_path} line {row_number}"
        problems = [problem for problem in (_bad_participant_id(participant_id, where),
                                            _bad_age(participant_id, raw, age, where,
                                                     to_predict=to_predict))
                    if problem]
        if problems:
            by_line[row_number] = problems
    _refuse_all([" ".join(problems) for problems in by_line.values()],
                f"rows of {table_path} need fixing")
    if not to_predict and len(ages) > 1 and ages.nunique() == 1:
        raise InputError(
            f"{table_path}: every subject is {ages.iloc[0]:g} years old, so there is no age "
            f"to learn: every model and baseline would predict it exactly (a mean absolute "
            f"error of 0) and the age-bias line is undefined. Check column 'age' (a "
            f"spreadsheet's fill-down, a merge that repeated one value).")
    duplicated = table["participant_id"][table["participant_id"].duplicated()].unique()
    if len(duplicated):
        sessions = [str(column) for column in table.columns
                    if str(column).strip().casefold() in ("session", "session_id", "ses")]
        raise InputError(
            f"{table_path}: duplicate participant_id {', '.join(duplicated)}; each subject "
            f"must appear once." + (
                f" Its column {sessions[0]} suggests one row per session: keep one session per "
                f"person here (the split draws people), and predict the others as cohorts of "
                f"their own (predict.cohorts), one folder per session under the same "
                f"participant_id." if sessions else ""))
    # one folder on macOS, on Windows shares, in a zip
    clashing = names_sharing_a_folder(sorted(table["participant_id"], key=str.lower))
    if clashing:
        pairs = [" and ".join(group) for group in clashing]
        raise InputError(f"{table_path}: participant_id {'; '.join(pairs)} differ only in "
                         f"case, so their folders under results/ would be one on a "
                         f"case-insensitive file system. Rename one of each pair.")
    alike = defaultdict(list)  # one person by the match across cohorts
    for participant_id in table["participant_id"]:
        alike[participant_match_key(participant_id)].append(participant_id)
    alike = [" and ".join(ids) for ids in alike.values() if len(ids) > 1]
    if alike:
        raise InputError(f"{table_path}: participant_id {'; '.join(alike)} differ only in "
                         f"leading zeros (or case): one person listed twice? The pipeline "
                         f"finds one person in two cohorts by the id without case and leading "
                         f"zeros (the subjects of a cohort to predict that the model has "
                         f"seen), so they would be one person there. Keep one row per person, "
                         f"or rename one of each pair.")
    if not to_predict:  # a cohort to predict: the model reads neither, Table 2 is training's
        for column in ("sex", "study"):
            blank = table[column].isna() | (table[column].astype(str).str.strip() == "")
            empty = table["participant_id"][blank].tolist()
            if empty:  # pandas reads NA, None, null, ... as missing too
                raise InputError(f"{table_path}: column {column!r} is empty for "
                                 f"{', '.join(empty)} (a blank cell, or a missing-value code: "
                                 f"n/a, NA, None, null, nan, ...). Fill in the {column}.")
        initials = table["sex"].astype(str).str.strip().str[:1].str.lower()
        uncounted = sorted(set(table["sex"][~initials.isin(["f", "m"])].astype(str)))
        if uncounted:  # e.g. 1/2 codes: the model does not read sex, Table 2 does
            log.warning("%s: column 'sex' has value(s) %s, which start with neither F nor M: "
                        "Table 2 counts them as 'other'. Write F/M (female/male) if that is "
                        "what they code.", table_path, ", ".join(map(repr, uncounted[:10])))
    if "study" in table.columns:
        _refuse_values_differing_in_spelling(table, table_path)


#: Invisible characters no name needs, left by copying from web pages and documents: zero-
#: width space, word joiner, byte order mark, soft hyphen. Not the other format characters:
#: the zero-width (non-)joiners and direction marks are part of Persian, Devanagari,
#: Malayalam, Hebrew and Arabic spelling.
INVISIBLE_CHARACTERS = frozenset("\u200b\u2060\ufeff\u00ad")


def _refuse_values_differing_in_spelling(table: pd.DataFrame, table_path: Path | str, *,
                                       column: str = "study",
                                       consequence: str = "in the splits, the tables and "
                                                          "the study means") -> None:
    """One study (or group) written in two spellings that differ only in case, spaces,
    punctuation, a number's leading zeros, a Latin letter's accents or Unicode form
    ('study2', 'study2 ', 'Study2': a spreadsheet's trailing space, a capital; 'Site A',
    'Site  A', 'Site_A', 'SiteA' of a merged multi-site sheet; '1', '01', '1.0'; 'Zürich'
    composed and decomposed, as macOS writes folder names, and 'Zurich' from a system that
    writes ASCII only) would be two: two strata of the split, two rows of the
    tables, two study means, and under leave-one-study-out two splits, each training on
    the other half of the study. Refused, naming each spelling's first subject; so is a
    value holding a control character or one of :data:`INVISIBLE_CHARACTERS` (a
    zero-width space pasted from a web page), which no table or terminal shows, and a value
    of punctuation alone ('.', '-', '?': SPSS, SAS and Stata write '.' for a missing value),
    which would be a study of its own."""
    values = table[column].dropna().astype(str)
    for index, value in values.items():
        hidden = [character for character in value if unicodedata.category(character) == "Cc"
                  or character in INVISIBLE_CHARACTERS]
        if hidden:
            raise InputError(
                f"{table_path}: column {column!r} of {table.at[index, 'participant_id']} "
                f"holds {', '.join(f'U+{ord(c):04X}' for c in dict.fromkeys(hidden))} "
                f"(invisible or control characters) in {_shown_with_code_points(value)}: "
                f"delete them, or retype the value.")
    keys = values.map(_spelling_key)
    # a status written in signs ('+', '-', '+/-', '-/-'): '-' is punctuation, '+' a symbol
    signed = values.str.contains("+", regex=False).any() \
        & values.str.fullmatch(r"[-/\s]+")
    nameless = values[(keys == "") & (values.str.strip() != "") & ~signed]
    if len(nameless):
        shown = [f"{value!r} ({table.at[index, 'participant_id']})"
                 for index, value in nameless.items()]
        raise InputError(
            f"{table_path}: column {column!r} holds {', '.join(shown[:10])}, punctuation "
            f"and no name: a missing-value code (SPSS, SAS and Stata write '.')? It would "
            f"be a value of its own ({consequence}). Write the value"
            + (", or leave the cell empty (n/a) where it is not known." if column != "study"
               else "."))
    for _, spellings in values.groupby(keys):
        if spellings.nunique() > 1:
            first = {spelling: table.at[index, "participant_id"]
                     for index, spelling in spellings[::-1].items()}  # the first row wins
            # spellings that print alike (one composed, one decomposed, one with a direction
            # mark) show the code points that tell them apart
            alike = len({_without_format_characters(unicodedata.normalize("NFC", spelling))
                         for spelling in first}) < len(first)
            marks = ("Cc", "Cf", "Mn")
            examples = [f"{_shown_with_code_points(spelling, marks) if alike else repr(spelling)}"
                        f" ({first[spelling]})" for spelling in dict.fromkeys(spellings)]
            raise InputError(
                f"{table_path}: column {column!r} writes one value as "
                f"{', '.join(examples)}, which differ only in case, spaces, punctuation, "
                f"leading zeros, accents or Unicode form, so the pipeline would take them for "
                f"different values ({consequence}). Write them in one spelling.")


def _spelling_key(value: str) -> str:
    """What two spellings of one study or group share (not printed: 'Site A' and 'Site_a'
    are neither 'sitea'): case ignored; spaces and punctuation between words dropped
    ('Site A', 'Site_A', 'SiteA'); numbers without their leading zeros ('Site 01', 'Site1';
    a whole '1.0' is 1), while a separator between two numbers ('1.1', 'Wave 1-2') and a
    sign at either end ('CN-', '-1') stay; format characters (joiners, direction marks)
    left out, as a name written with and without one prints alike; a Latin letter's accents
    dropped ('Zürich', 'Zurich'; 'São Paulo', 'Sao Paulo'), not the marks of other scripts,
    where a vowel sign or a point makes another word. Empty for a value without a letter,
    digit or symbol."""
    text = _without_format_characters(unicodedata.normalize("NFKC", value)).strip().casefold()
    text = _without_latin_accents(text)
    text = re.sub(r"^(\d+)\.0+$", r"\1", text)  # a spreadsheet's whole number
    runs = [(separating, "".join(characters))
            for separating, characters in groupby(text, key=_separates)]
    key = []
    for index, (separating, run) in enumerate(runs):
        if not separating:
            key.append(_without_leading_zeros(run))
        elif 0 < index < len(runs) - 1:  # between two words: dropped, but between numbers
            if runs[index - 1][1][-1].isdigit() and runs[index + 1][1][0].isdigit():
                key.append(run)
        elif "-" in run or "+" in run:  # a sign before or after the name
            key.append("-" if "-" in run else "+")
        elif index == 0 and run.endswith(".") and len(runs) > 1 and runs[1][1][0].isdigit():
            key.append(".")  # '.5' is not 5
    return "".join(key) if any(not separating for separating, _ in runs) else ""


#: Latin letters whose mark is part of the letter, not a combining accent (lower case:
#: the spelling key is case-folded), as an ASCII-only system writes them.
LATIN_LETTERS_AS_ASCII = str.maketrans({"ł": "l", "ø": "o", "ı": "i", "đ": "d", "ð": "d",
                                        "ħ": "h", "ŧ": "t", "ŀ": "l", "æ": "ae", "œ": "oe",
                                        "þ": "th"})


def _without_latin_accents(text: str) -> str:
    """``text`` without the combining marks that follow a Latin letter (``ü`` -> ``u``),
    and with :data:`LATIN_LETTERS_AS_ASCII` as ASCII (``Łódź`` -> ``lodz``)."""
    text = text.translate(LATIN_LETTERS_AS_ASCII)
    kept: list[str] = []
    for character in unicodedata.normalize("NFD", text):
        if (unicodedata.category(character) == "Mn" and kept
                and "LATIN" in unicodedata.name(kept[-1], "")):
            continue
        kept.append(character)
    return unicodedata.normalize("NFC", "".join(kept))


def _separates(character: str) -> bool:
    """Whether ``character`` is a space or punctuation (Unicode categories Z*, P*)."""
    return character.isspace() or unicodedata.category(character)[0] in "ZP"


def _without_format_characters(text: str) -> str:
    return "".join(character for character in text if unicodedata.category(character) != "Cf")


def _shown_with_code_points(text: str, marks: tuple[str, ...] = ("Cc", "Cf")) -> str:
    """``text`` quoted, its letters as they are (Zürich, a Persian name) and the characters
    of the Unicode categories ``marks`` (control and format characters; combining marks
    too where they tell two spellings apart) as ``\\uXXXX``."""
    return "'" + "".join(f"\\u{ord(character):04x}" if unicodedata.category(character) in marks
                         else character for character in text) + "'"


def _bad_participant_id(participant_id, where: str) -> str | None:
    """What is wrong with ``participant_id`` (``where``: the table and line), or None."""
    if isinstance(participant_id, str) and len(participant_id.split()) > 1:
        return (f"{where}: participant_id {participant_id!r} holds spaces: a row typed with "
                f"spaces between its values, not tabs? Separate the row's values by tabs "
                f"(ids look like 'sub-<label>', letters and digits).")
    if isinstance(participant_id, str) and participant_id != participant_id.strip():
        return (f"{where}: participant_id {participant_id!r} has spaces around it; remove "
                f"them (ids look like 'sub-<label>', letters and digits).")
    if not isinstance(participant_id, str) or not participant_id.startswith("sub-"):
        return (f"{where}: participant_id {participant_id!r} must look like 'sub-<label>' "
                f"(letters and digits).")
    try:
        check_label(participant_id[len("sub-"):], where=where)
    except InputError as error:
        return str(error)
    return None


def _bad_age(participant_id, raw, age: float, where: str, *, to_predict: bool) -> str | None:
    """What is wrong with a row's age (``raw`` as written, ``age`` as a number or NaN), or
    None; a cohort to predict may leave it blank (a predicted age, no gap)."""
    low, high = AGE_RANGE_YEARS
    if pd.isna(raw):  # an empty cell, or n/a, NA, ... (read as missing)
        return None if to_predict else (
            f"{where}: subject {participant_id} has no age (an empty cell or n/a); every "
            f"subject needs its age in years: encoders are trained on it, and a brain-age "
            f"gap and its age-bias correction are measured against it. Fill it in or remove "
            f"the row.")
    if pd.isna(age):
        comma = isinstance(raw, str) and re.fullmatch(r"\s*\d+,\d+\s*", raw)
        return (f"{where}: subject {participant_id} has age {raw!r}; ages must be numbers in "
                f"years" + (", with a decimal point, not a comma" if comma else "")
                + ". Fix or remove the row.")
    if not low < age < high:
        return (f"{where}: subject {participant_id} has age {age} years, outside "
                f"{low}-{high}. Fix the value (years, not months).")
    return None


def _validate_against_schema(table: pd.DataFrame, table_path: Path,
                             lines: Sequence[int], *, to_predict: bool = False) -> None:
    """Check every row against workflow/brainage/schemas/participants.schema.yaml (``lines``: the
    line number of each row); for a cohort to predict, only ``participant_id`` is required
    and a missing age, sex or study is checked as absent."""
    import jsonschema
    import yaml

    from brainage.config import PARTICIPANTS_SCHEMA

    schema = yaml.safe_load(PARTICIPANTS_SCHEMA.read_text())
    if to_predict:
        schema = {**schema, "required": list(PREDICT_REQUIRED_COLUMNS)}
    validator = jsonschema.Draft202012Validator(schema)
    rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    for row_number, row in zip(lines, rows):
        if to_predict:  # absent, not a null of the wrong type
            row = {key: value for key, value in row.items()
                   if not (value is None and key in REQUIRED_COLUMNS)}
        if "age" in row:
            row["age"] = float(row["age"])
        for error in validator.iter_errors(row):
            column = ".".join(map(str, error.absolute_path)) or "(row)"
            raise InputError(f"{table_path} line {row_number} ({row.get('participant_id')}), "
                             f"column {column!r}: {error.message}")


#: Missing images named one per line in the message; the rest are counted.
MAX_MISSING_NAMED = 20


def _missing_image_message(root: str | Path, label: str, name: str,
                           modalities: Sequence[str], *, remedy: str,
                           needed_by: str | None) -> str | None:
    """The message for subject ``label``'s missing ``name`` image (one of the cohort's
    ``modalities``); None when it exists."""
    path = input_path(root, label, name)
    if path.is_file():
        return None
    what = f"subject sub-{label}: {modality(name).description} {path} {_not_a_file(path)}"
    if not path.parent.parent.is_dir():
        what += f" (the subject has no folder {path.parent.parent})"
    add = ("Fetch it (datalad get / git annex get)" if _not_fetched(path) else
           "Repair the link or add the file" if _broken_link(path) else "Add the file")
    if needed_by is not None:
        return (f"{what}; {needed_by} reads {', '.join(modalities)} of every subject."
                f"{_found_instead(path)} {add}, {remedy}.")
    # not for the map the subjects' preprocessing is built around: without it a model of
    # the other maps alone would train, which is no fix for a file named otherwise
    drop = (f", or remove {name} from the modalities" if name != grid_modality(modalities)
            else "")
    return (f"{what} (config key dataset.modalities lists {name}).{_found_instead(path)} "
            f"{add}, {remedy}{drop}.")


def _broken_link(path: Path) -> bool:
    """Whether ``path`` is a link to nothing."""
    return path.is_symlink() and not path.exists()


def _not_fetched(path: Path) -> bool:
    """Whether ``path`` is a broken link into a git-annex store (``.git/annex/objects``): a
    DataLad or git-annex file never fetched, not a file moved from under its link."""
    return _broken_link(path) and "annex/objects/" in os.readlink(path)


def _not_a_file(path: Path) -> str:
    """Why ``path``, not a regular file, cannot be read: a broken link (a DataLad or
    git-annex file never fetched), something else (a folder, a link to a device), or
    nothing there."""
    if _not_fetched(path):
        return "is a broken link (a DataLad or git-annex file not fetched?)"
    if _broken_link(path):  # a scan export's link whose target moved: say where it points
        return f"is a broken link to {os.readlink(path)}"
    if path.exists():
        target = f"a link to {os.readlink(path)}" if path.is_symlink() else (
            "a folder" if path.is_dir() else "a device, pipe or socket")
        return f"is not a regular file ({target})"
    return "is missing"


def _require_every_image(root: str | Path, labels: Sequence[str], modalities: Sequence[str],
                         *, remedy: str, needed_by: str | None = None,
                         to_predict: bool = False) -> None:
    """Refuse a cohort with missing images, naming every one of them at once (a lab fixes
    them in one go, not one run per file), and saying once, below them, where the sessions
    of a subject with session folders go (:data:`SESSIONS_FOR_TRAINING`,
    :data:`SESSIONS_TO_PREDICT`)."""
    problems = [message for label in labels for name in modalities
                if (message := _missing_image_message(root, label, name, modalities,
                                                      remedy=remedy, needed_by=needed_by))]
    if "T1w" not in modalities:  # the optional T1w: only anat/sub-<label>_T1w.nii.gz is read
        problems += [message for label in labels
                     if (message := _unread_t1w_message(root, label))]
    with_sessions = any(" has session folders (" in message for message in problems)
    _refuse_all(problems, "input images are missing or unread", note=(
        (SESSIONS_TO_PREDICT if to_predict else SESSIONS_FOR_TRAINING)
        if with_sessions else ""))


def _refuse_all(problems: Sequence[str], what: str, *, note: str = "") -> None:
    """Raise one :class:`InputError` for all ``problems`` (each a whole message): the one
    message, or ``<n> <what>:`` above the first :data:`MAX_MISSING_NAMED`, one per line;
    ``note`` (one for them all) after them."""
    if len(problems) == 1:
        raise InputError(f"{problems[0]} {note}".rstrip())
    if problems:
        shown = problems[:MAX_MISSING_NAMED]
        more = len(problems) - len(shown)
        raise InputError(f"{len(problems)} {what}:\n"
                         + "\n".join(f"  {message}" for message in shown)
                         + (f"\n  ... and {more} more." if more else "")
                         + (f"\n{note}" if note else ""))


def _unread_t1w_message(root: str | Path, label: str) -> str | None:
    """The message for a subject whose optional T1w is there but would not be read, so its
    brain mask and registration would silently come from its MRE map instead: only
    ``anat/sub-<label>_T1w.nii.gz`` is read, and a broken link there (a DataLad or
    git-annex file not fetched), an uncompressed ``.nii`` (dcm2niix's default), another
    name in ``anat/`` (:data:`T1W_NAME_WORDS` in any case: BIDS entities as in
    ``sub-<label>_acq-mprage_T1w.nii.gz``, another case, a renamed subject's old label) or
    a T1w in a ``ses-*/anat/`` folder is not; None otherwise."""
    path = anatomical_path(root, label)
    if path.is_file():
        return None
    instead = ("and the subject's brain mask and registration would come from its MRE map "
               "instead of its T1w")
    if path.is_symlink() or path.exists():
        fetch = ("Fetch it (datalad get / git annex get)" if _not_fetched(path) else
                 "Put the T1w's NIfTI file there")
        return (f"subject sub-{label}: T1w {path} {_not_a_file(path)}, so it would not be "
                f"read, {instead}. {fetch}, or remove it to register the subject without "
                f"it.")
    uncompressed = path.with_suffix("")  # .nii.gz -> .nii
    if uncompressed.is_file():
        return (f"subject sub-{label}: T1w {uncompressed} is not compressed, so it would not "
                f"be read, {instead}. Compress it (gzip {uncompressed}), or move it out of "
                f"the dataset to register the subject without it.")
    others = _named_like(path, T1W_NAME_WORDS)
    if others:
        return (f"subject sub-{label}: {path.parent} holds {', '.join(others)} but no "
                f"{path.name}, the one T1w name read, {instead}. Rename the T1w to use to "
                f"{path.name} (one T1w per subject), or move the files out of the dataset "
                f"to register the subject without one.")
    in_sessions = sorted(str(other.relative_to(path.parent.parent)) for other in
                         path.parent.parent.glob(f"ses-*/{path.parent.name}/*.nii*")
                         if _holds_any(other.name, T1W_NAME_WORDS))
    if in_sessions:
        return (f"subject sub-{label}: {', '.join(in_sessions)} in {path.parent.parent} is in "
                f"a session folder, which is not read, {instead}. Move the T1w of the "
                f"session its maps come from to {path} (the same session as the maps), or "
                f"move the files out of the dataset to register the subject without one.")
    return None


#: What a T1w's file name holds in any case, whatever else it holds.
T1W_NAME_WORDS = ("t1w", "mprage")


def _named_like(path: Path, words: Sequence[str]) -> list[str]:
    """The NIfTI files in ``path``'s folder other than ``path`` whose name holds one of
    ``words`` in any case: the image meant for ``path`` under another name (BIDS entities
    such as ``_ses-01`` or ``_acq-mprage``, another label, another case)."""
    if not path.parent.is_dir():
        return []
    return [other.name for other in sorted(path.parent.iterdir())
            if other.name != path.name and _holds_any(other.name, words)]


#: BIDS suffixes of the anatomical images that are not a T1w (BIDS 1.10, anat): a file
#: ending in one is that image whatever its entities hold (a multi-parameter-mapping echo
#: is labelled ``acq-T1w_..._MPM``, a FLAIR may be ``acq-mprageLike_FLAIR``), so it is
#: not a T1w or a map under another name.
OTHER_IMAGE_SUFFIXES = frozenset(suffix.casefold() for suffix in (
    "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2", "angio", "T2star",
    "FLASH", "PD", "T1map", "T2map", "T2starmap", "R1map", "R2map", "R2starmap", "PDmap",
    "MTRmap", "MTsat", "UNIT1", "T1rho", "MWFmap", "MTVmap", "Chimap", "S0map", "M0map",
    "MESE", "MEGRE", "VFA", "IRT1", "MP2RAGE", "MPM", "MTS", "MTR", "defacemask"))


def _holds_any(file_name: str, words: Sequence[str]) -> bool:
    return _may_be_ours(file_name) and any(word in file_name.casefold() for word in words)


def _may_be_ours(file_name: str) -> bool:
    """Whether ``file_name`` is a NIfTI that may be one of the pipeline's images under
    another name: not an image of another kind (:data:`OTHER_IMAGE_SUFFIXES`: a FLAIR
    beside a missing T1w), nor a hidden file (macOS' ``._`` copy of a file)."""
    suffix = file_name.split(".nii")[0].rsplit("_", 1)[-1].casefold()
    return (".nii" in file_name and not file_name.startswith(".")
            and suffix not in OTHER_IMAGE_SUFFIXES)


def _found_instead(path: Path) -> str:
    """What a user probably has instead of a missing input: an uncompressed file, a file
    named otherwise, the file in the subject's other folder (a map in ``anat/``), or a
    session folder (the layout has one session per subject)."""
    uncompressed = path.with_suffix("")  # .nii.gz -> .nii
    if uncompressed.is_file():
        return f" There is {uncompressed.name}: compress it (gzip {uncompressed})."
    subject_folder = path.parent.parent
    if not subject_folder.is_dir() and subject_folder.parent.is_dir():
        # labels are case-sensitive (a case-insensitive file system would still find it)
        other_case = sorted(folder.name for folder in subject_folder.parent.iterdir()
                            if folder.name.lower() == subject_folder.name.lower())
        if other_case:
            return (f" There is {other_case[0]}/, which differs in case: use one spelling "
                    f"in participants.tsv and the folder and file names.")
    name = path.name[len(f"{subject_folder.name}_"):].split(".")[0]  # stiffness, T1w, ...
    misnamed = _named_like(path, T1W_NAME_WORDS if name == "T1w" else (name.casefold(),))
    if misnamed:  # e.g. sub-01_ses-01_stiffness.nii.gz, or a renamed subject's old files
        return (f" {path.parent} holds {', '.join(misnamed)}: name the file {path.name} "
                f"(the folder's label, no session or other entities).")
    # a map put in anat/ beside the T1w (or a T1w in mre/), under its own name
    elsewhere = sorted(str(other.relative_to(subject_folder)) for other in
                       subject_folder.glob(f"*/{path.name.split('.')[0]}.nii*")
                       if other.parent != path.parent and other.is_file()
                       and not other.parent.name.startswith("ses-"))  # sessions: below
    if elsewhere:
        return (f" {subject_folder} holds {', '.join(elsewhere)}: move it into "
                f"{path.parent.name}/ ({path}).")
    sessions = sorted(p.name for p in subject_folder.glob("ses-*") if p.is_dir())
    if sessions:
        return (f" {subject_folder} has session folders ({', '.join(sessions)}); the "
                f"dataset layout has none: move one session's {path.parent.name}/ folder up "
                f"into {subject_folder.name}/ and name its files without the session "
                f"({path.name}).")
    # a lab's own name for the map (sub-01_mu.nii.gz), which no other hint finds: the
    # folder's images that are none of the pipeline's
    known = {f"{subject_folder.name}_{other}" for other in (*MODALITIES, "T1w")}
    others = sorted(other.name for other in path.parent.glob("*.nii*")
                    if other.is_file() and other.name.split(".")[0] not in known
                    and _may_be_ours(other.name))
    if others:
        return (f" {path.parent} holds {', '.join(others[:3])}"
                f"{' ...' if len(others) > 3 else ''}: if one is this image, name it "
                f"{path.name}.")
    return ""


#: Said once below the missing images when a subject has session folders: which session
#: goes where, for a cohort that trains and for one that is predicted.
SESSIONS_FOR_TRAINING = (
    "Train on one session per person: another session of the same person listed as a "
    "subject of its own can land on the other side of the split, so the test error would "
    "measure people the encoder was trained on. Predict the other sessions as a cohort of "
    "their own (predict.cohorts), under the same participant_id: those of the split's test "
    "subjects are predicted cleanly, those of its training subjects come out optimistic: "
    "the plan names them, the predictions mark them and their summary leaves them out.")
SESSIONS_TO_PREDICT = (
    "A cohort to predict holds one session per person: predict each further session as a "
    "cohort of its own (another entry of predict.cohorts, its own folder and "
    "participants.tsv under the same participant_ids), so that each person's predictions "
    "can be compared across sessions.")


def subject_inputs(root: str | Path, label: str,
                   modalities: Sequence[str] = DEFAULT_MODALITIES, *,
                   root_setting: str = "config key dataset.root") -> dict[str, str]:
    """Input files of one subject from the dataset folder (not from participants.tsv).

    Returns ``{map: path}`` for each MRE map of ``modalities``, plus ``"anat": path`` when
    the subject has a T1w (required when ``modalities`` lists T1w; otherwise it is the
    registration reference when present). A missing ``root`` is named as such, by
    ``root_setting`` (a single subject's target blamed the subject).
    """
    if not Path(root).is_dir():
        raise InputError(_missing_root_message(Path(root), root_setting))
    check_label(label, where=f"dataset {root}")
    _require_every_image(root, [label], modalities, remedy="or remove the subject")
    inputs = {name: str(input_path(root, label, name)) for name in modalities
              if modality(name).is_mre}
    anat = anatomical_path(root, label)
    if anat.is_file():
        inputs["anat"] = str(anat)
    return inputs


#: What to do with a raw input that cannot be read (a scanner's or converter's export).
REEXPORT = "Re-export it as .nii.gz."
#: What to do with a file the pipeline made that cannot be read (cut short by a full disk,
#: damaged on a shared file system): "re-export it" named no action a user could take.
MADE_AGAIN = ("The pipeline made this file: delete it and run the same command again, "
              "which makes it anew.")


def load_nifti_checked(path: str | Path, *, what: str = "image",
                       kind: str | None = None, remedy: str = REEXPORT):
    """Load a 3D NIfTI image, checking it is readable, 3D and not all zeros.

    Returns the nibabel image (data not cached). Raises :class:`InputError` naming the
    file for a missing file or a folder, a non-NIfTI or corrupt file, a header claiming
    more than :data:`MAX_IMAGE_BYTES`, a 4D image, an image with no non-zero voxel, a
    singular affine, a header without orientation (:func:`_check_orientation_declared`),
    a sheared grid, or voxel sizes not in mm (:func:`_check_spatial_unit`); with ``kind``
    (a modality name), also a map whose values are far outside its modality's or of the
    opposite sign (:func:`_check_unit`). ``remedy`` ends the messages of a damaged file:
    :data:`REEXPORT` for raw inputs, :data:`MADE_AGAIN` for the pipeline's own files.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():  # nibabel's message for it repeats the path, and "re-export it"
        # is no remedy for a file that is not there
        raise InputError(f"{what} {path} {'is a folder' if path.is_dir() else 'does not exist'}"
                         f"; a NIfTI file (.nii.gz) is expected there.")
    extensions = _header_extension_bytes(path)
    if extensions > MAX_HEADER_EXTENSION_BYTES:
        raise InputError(f"{what} {path}: its header claims {extensions / 2**20:.0f} MiB of "
                         f"header extensions before the voxels, more than the "
                         f"{MAX_HEADER_EXTENSION_BYTES / 2**20:.0f} MiB a map or T1w carries; "
                         f"the header is damaged, or the file is not one subject's map. "
                         f"{remedy}")
    try:
        image = nib.load(str(path))
        shape, dtype = image.header.get_data_shape(), image.header.get_data_dtype()
        claimed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if claimed > MAX_IMAGE_BYTES:
            raise InputError(f"{what} {path}: its header claims a {'x'.join(map(str, shape))} "
                             f"volume of {dtype} ({claimed / 2**30:.1f} GiB), more than the "
                             f"{MAX_IMAGE_BYTES / 2**30:.0f} GiB an MRE map or T1w needs; the "
                             f"header is damaged, or the file is not one subject's map. "
                             f"{remedy}")
        data = np.asanyarray(image.dataobj)
    except InputError:
        raise
    except Exception as error:  # nibabel raises many types for broken files
        # nibabel's own message may break a line in the middle ("from\n - could the file...")
        raise InputError(f"{what} {path} is not a readable NIfTI file "
                         f"({' '.join(str(error).split())}). {remedy}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    # a file the pipeline made is not the user's to re-export or drop: its remedy instead
    made = remedy != REEXPORT
    if data.ndim != 3:
        raise InputError(f"{what} {path} has shape {data.shape}; a 3D volume is expected. "
                         f"{remedy if made else _not_3d_advice(data.shape)}")
    if min(data.shape) < MIN_SLICES:  # a slice written [X, Y, 1] passed as a volume
        raise InputError(f"{what} {path} has shape {data.shape}: {min(data.shape)} voxel(s) "
                         f"along one axis, not a 3D volume of the brain. "
                         f"{remedy if made else _not_3d_advice(data.shape[:2])}")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"{what} {path} holds {data.dtype} voxels; a map of real numbers is "
                         f"expected (not RGB or complex data). "
                         f"{remedy if made else 'Re-export it as float32.'}")
    finite = np.isfinite(data)
    if not np.any(finite & (data != 0)):
        raise InputError(f"{what} {path} contains no non-zero finite voxel: it is empty (all "
                         f"0 or NaN). " + (remedy if made else
                                           "Re-export the map from its source, or remove the "
                                           "subject's row from participants.tsv."))
    if kind is not None:
        _check_unit(data[finite & (data != 0)], modality(kind), path, what)
    affine = np.asarray(image.affine, dtype=np.float64)[:3]  # the offsets too: a NaN origin
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:, :3])) < 1e-9:
        raise InputError(f"{what} {path} has a singular or non-finite affine (voxel-to-world "
                         f"matrix {affine.round(4).tolist()}), so its voxels have no place in "
                         f"space. Fix its header's qform/sform (e.g. re-convert from DICOM).")
    _check_orientation_declared(image, path, what)
    _check_perpendicular_axes(affine, path, what)
    _check_spatial_unit(image, affine, path, what)
    return image


#: The most header-extension bytes read (DICOM or JSON metadata that converters embed are
#: kilobytes): nibabel reads every extension into memory while it loads the header, before
#: the size check of MAX_IMAGE_BYTES, so a small crafted file could take gigabytes.
MAX_HEADER_EXTENSION_BYTES = 64 * 2**20


def _header_extension_bytes(path: Path) -> int:
    """The bytes between a NIfTI-1 or NIfTI-2 header and its voxels (``vox_offset``
    minus the header), read from the first bytes of the (gzipped) file; 0 for what is not
    a NIfTI header (nibabel then names the problem)."""
    try:
        with (gzip.open(path) if path.name.endswith(".gz") else open(path, "rb")) as handle:
            start = handle.read(540)
    except (OSError, EOFError):
        return 0
    for order in "<>":
        if len(start) >= 352 and struct.unpack(f"{order}i", start[:4])[0] == 348:
            offset, header = struct.unpack(f"{order}f", start[108:112])[0], 352
            break
        if len(start) >= 540 and struct.unpack(f"{order}i", start[:4])[0] == 540:
            offset, header = struct.unpack(f"{order}q", start[168:176])[0], 544
            break
    else:
        return 0
    return int(max(offset - header, 0)) if np.isfinite(offset) else 0


def _check_orientation_declared(image, path: Path, what: str) -> None:
    """Refuse a NIfTI whose qform_code and sform_code are both 0 (MATLAB's NIfTI toolbox,
    make_nii / save_nii, writes such files): its header then says nothing about where left
    is. nibabel reads the voxels as stored from right to left (an LAS guess), so a map
    stored left to right comes out mirrored, and a brain is symmetric enough that
    registration and QC pass."""
    header = image.header
    try:
        codes = int(header["qform_code"]), int(header["sform_code"])
    except (KeyError, ValueError):  # not a NIfTI header: nothing to check
        return
    if codes == (0, 0):
        raise InputError(
            f"{what} {path} declares no orientation (qform_code and sform_code are both 0, "
            f"as MATLAB's make_nii/save_nii write), so its left and right are a guess and "
            f"the map may come out mirrored. Save it with the voxel-to-world matrix of its "
            f"acquisition, e.g. that of the dcm2niix conversion of the MRE magnitude image "
            f"(nibabel: image.set_sform(affine, code=1)), or remove the subject's row from "
            f"participants.tsv.")


#: The check before any work refuses a map whose median non-zero value exceeds its
#: modality's plausible upper bound by this factor: a map in another unit (Pa for kPa: x
#: 1000; a damping ratio in percent: x 100) and nothing else. The brain-masked check of
#: preprocessing (brainage.preprocess.bias.check_range) keeps the exact bounds: before the
#: brain mask, an unmasked map's background moves the median.
UNIT_CHECK_FACTOR = 10.0


def _check_unit(values: np.ndarray, kind, path: Path, what: str) -> None:
    """Refuse a map whose non-zero ``values`` have a median far above the modality's
    plausible ones (``median_range``, else ``valid_range``): a map in another unit; or,
    for a positive quantity, the opposite sign (:func:`_sign_flipped`). Found before hours
    of work instead of at its subject's preprocessing."""
    bounds = kind.median_range or kind.valid_range
    if bounds is None:  # the T1w: scanner units
        return
    median = float(np.median(values.astype(np.float64)))
    if bounds[0] >= 0 and _sign_flipped(values):
        raise InputError(
            f"{what} {path}: its negative voxels outweigh its positive ones (the median of "
            f"its non-zero voxels is {median:.4g}), but a {kind.description} is positive. "
            f"Was it exported with the opposite sign convention? Store it positive "
            f"(multiply by -1), or remove the subject's row from participants.tsv.")
    fill = _positive_fill(values) if bounds[0] >= 0 else None
    if fill is not None:
        value, count = fill
        raise InputError(
            f"{what} {path}: {count} of its {values.size} non-zero voxels "
            f"({count / values.size:.0%}) hold the one value {value:.4g}, far below the "
            f"others: a background written as {value:.4g} instead of 0 (a scaled integer's "
            f"intercept, an exporter's floor), which preprocessing would read as tissue "
            f"wherever the brain mask reaches past the map's data. Set those voxels to 0 "
            f"(or NaN) and export the map again, or remove the subject's row from "
            f"participants.tsv.")
    if median > UNIT_CHECK_FACTOR * bounds[1]:
        ratio = kind.unit == "1"  # dimensionless: the damping ratio
        hint = kind.unit_mix_up()
        raise InputError(
            f"{what} {path}: the median of its non-zero voxels is {median:.4g}, far above "
            f"the plausible {bounds[0]:g}-{bounds[1]:g}{'' if ratio else ' ' + kind.unit} "
            f"of a {kind.description}. Is it {hint}? Convert it to "
            f"{'a ratio' if ratio else kind.unit}, or remove the subject's row from "
            f"participants.tsv.")


#: Share of a map's non-zero voxels above which one positive value far below the rest is
#: a fill, not tissue (a brain's values are continuous; even a map quantised to 0.02 kPa
#: spreads over a hundred levels); "far below": under this fraction of the others' median.
FILL_VALUE_SHARE, FILL_VALUE_RATIO = 0.2, 0.25


def _positive_fill(values: np.ndarray) -> tuple[float, int] | None:
    """``(value, count)`` when one positive value of the non-zero ``values`` holds more than
    :data:`FILL_VALUE_SHARE` of them and lies under :data:`FILL_VALUE_RATIO` times the
    median of the others: a "no data" background written positive (a review: 1e-4 kPa, from
    a uint16 map's intercept, read as tissue over 11 % of the brain, QC passing and the
    predicted age 2.6 years off). None otherwise."""
    positive = values[values > 0]
    if not positive.size:
        return None
    levels, counts = np.unique(positive, return_counts=True)
    value, count = float(levels[counts.argmax()]), int(counts.max())
    others = positive[positive != value]
    if count <= FILL_VALUE_SHARE * values.size or not others.size:
        return None
    return (value, count) if value < FILL_VALUE_RATIO * float(np.median(others)) else None


def _sign_flipped(values: np.ndarray) -> bool:
    """True for the non-zero ``values`` of a positive quantity (a modulus, a ratio) that
    were exported negative: most voxels negative (median below 0), and the negative voxels
    outweigh the positive ones in sum. Noise around zero cancels, a loss modulus's negative
    noise voxels are a minority, and a few "no data" codes (-999) are few. One negative
    value that holds half the negative voxels or more is a "no data" background (e.g. -1),
    left out first. Preprocessing reads voxels <= 0 as background."""
    negative = values < 0
    if negative.any():
        fills, counts = np.unique(values[negative], return_counts=True)
        if counts.max() >= 0.5 * np.count_nonzero(negative):
            values = values[values != fills[counts.argmax()]]
    if not values.size or np.median(values) >= 0:
        return False
    return -float(values[values < 0].sum(dtype=np.float64)) \
        > float(values[values > 0].sum(dtype=np.float64))


def _not_3d_advice(shape: tuple[int, ...]) -> str:
    """What to do with an image of ``shape`` that is not one 3D volume (nor X x Y x Z x 1)."""
    if len(shape) < 3:
        return "Export the whole volume, not a slice."
    volumes = int(np.prod(shape[3:]))
    if volumes == 1:
        return ("It holds one volume with extra axes of length 1; save it as a 3D image "
                "(e.g. nibabel.funcs.squeeze_image).")
    return f"It holds {volumes} volumes: split the series and keep the one 3D volume."


#: Largest |cosine| between two voxel axes of an accepted affine (0.06 degrees off
#: perpendicular): an MR grid's axes are perpendicular, even an oblique one's.
MAX_AXIS_COSINE = 1e-3


def _check_perpendicular_axes(affine: np.ndarray, path: Path, what: str) -> None:
    """Refuse an affine whose voxel axes are not perpendicular (a sheared grid). ITK, and so
    ANTs, keeps only perpendicular axes when it reads such a file while nibabel uses the
    affine as it is: the preprocessing steps placed the same voxels a few mm apart."""
    axes = affine[:, :3] / np.linalg.norm(affine[:, :3], axis=0)
    cosines = np.abs(axes.T @ axes - np.eye(3))
    if cosines.max() > MAX_AXIS_COSINE:
        degrees = 90.0 - np.degrees(np.arccos(min(cosines.max(), 1.0)))
        raise InputError(f"{what} {path} has a sheared affine: two of its voxel axes are "
                         f"{degrees:.2f} degrees off perpendicular (voxel-to-world matrix "
                         f"{affine.round(4).tolist()}). ANTs and nibabel would place its "
                         f"voxels differently. Resample it onto a grid with perpendicular axes "
                         f"(e.g. nibabel.processing.resample_to_output) or re-convert it from "
                         f"DICOM.")


#: Voxel sizes (mm) that no MR image of a head has: smaller ones are a header written in
#: metres without saying so (a 2 mm voxel stored as 0.002).
MIN_VOXEL_SIZE_MM = 0.05
#: Fewest voxels along any axis of an accepted image: a single slice written [X, Y, 1]
#: (MATLAB's niftiwrite, 2D MRE exports) was preprocessed for hours and then failed QC
#: (coverage 0.02), while the same slice as [X, Y] was refused before any work.
MIN_SLICES = 3
#: NIfTI spatial units other than mm, and the factor that turns them into mm.
OTHER_SPATIAL_UNITS = {"meter": 1000.0, "micron": 0.001}


def _check_spatial_unit(image, affine: np.ndarray, path: Path, what: str) -> None:
    """Refuse a NIfTI whose voxel sizes are not in mm.

    nibabel (every step of this package) reads the affine's numbers as they are, while
    ITK/ANTs scales a header that declares metres or microns to mm: a file in metres would
    be registered at one size and masked, resampled and normalised at another. A header
    that declares no unit but holds sub-0.05 mm voxels is in metres too.
    """
    voxel_mm = np.sqrt((affine[:, :3] ** 2).sum(axis=0))
    sizes = ", ".join(f"{size:.4g}" for size in voxel_mm)
    units = getattr(image.header, "get_xyzt_units", None)
    unit = units()[0] if units is not None else "unknown"
    if unit in OTHER_SPATIAL_UNITS:
        raise InputError(
            f"{what} {path} declares its voxel sizes ({sizes}) in {unit}s; this pipeline "
            f"works in mm, and nibabel and ANTs would read the file at different sizes. "
            f"Re-save it in mm: multiply the affine (qform and sform) by "
            f"{OTHER_SPATIAL_UNITS[unit]:g} if the numbers are in {unit}s, then set the unit "
            f"to mm (nibabel: image.header.set_xyzt_units('mm')).")
    if voxel_mm.min() < MIN_VOXEL_SIZE_MM:
        raise InputError(
            f"{what} {path} has voxel sizes of {sizes} (its header declares the unit "
            f"{unit!r}); read as mm they are smaller than any head MR image's "
            f"({MIN_VOXEL_SIZE_MM} mm), so the header is probably in metres. Re-save it in "
            f"mm: multiply the affine (qform and sform) by 1000 and set the unit to mm "
            f"(nibabel: image.header.set_xyzt_units('mm')).")


#: Threads that read a dataset's images on its first check: decompression releases the
#: GIL, and a login node is shared, so a few.
IMAGE_CHECK_THREADS = 4


#: Two grids whose affines differ by less than this (mm) are the same grid.
AFFINE_TOLERANCE_MM = 1e-3


def same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    """Whether two images share one voxel grid: equal shape, affines within
    :data:`AFFINE_TOLERANCE_MM` (mm)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b,
                                                           atol=AFFINE_TOLERANCE_MM)


#: The version of what :func:`load_nifti_checked` checks, kept with each file that passed
#: (``check_dataset_images``' cache): raise it when a check is added, so that files passed
#: before it are read again at planning, not refused hours later in their subject's job.
#: 2: the orientation codes and the sign of a map (2026-12-05); 3: the size of the header
#: extensions (2026-12-06); 4: each map's SHA-256, to find one scan under two labels, a
#: positive fill value and a single slice [X, Y, 1] (2026-12-07). tests/test_inputs.py keeps
#: a digest of the checks' code.
IMAGE_CHECKS_VERSION = 4
#: The image-check cache is saved at least this often while a first check reads (seconds):
#: a killed check of thousands of files restarts from about where it stopped.
IMAGE_CACHE_SAVE_SECONDS = 30.0


def check_dataset_images(root: str | Path, labels: list[str],
                         modalities: Sequence[str] = DEFAULT_MODALITIES, *,
                         cache_file: str | Path | None = None,
                         announce: Callable[[str], None] | None = None,
                         clock_ns: int | None = None) -> None:
    """Open every subject's images (the maps of ``modalities``, and the T1w) once and check
    them before any work.

    Each file must pass :func:`load_nifti_checked`, and a subject's MRE maps must share one
    voxel grid: they share one brain mask and one transform (the T1w may have a grid of
    its own), and no two subjects may have byte-identical maps: one scan under two labels
    (a rescan relabelled from the same export, a subject copied into a second study) can
    land on both sides of the split, and its test error measures a person the encoder was
    trained on. A file already checked with the same size and modification time, by the same
    :data:`IMAGE_CHECKS_VERSION`, is not opened again, using ``cache_file`` (JSON: size,
    mtime, grid, checks version and a map's SHA-256 per file), so a dataset
    of thousands is read in full only once (a 1 mm T1w takes about 0.1 s, so the first
    check of 2,000 subjects takes minutes: up to :data:`IMAGE_CHECK_THREADS` threads read,
    and ``announce`` is told how many files before they are read). Files that pass are
    remembered even when others fail, or when the check is interrupted; the entries of files
    under ``root`` that no longer exist (a subject removed) are dropped.

    ``clock_ns``: the outputs' file system's current time (ns since the epoch,
    :func:`brainage.io.file_system_clock_ns`) where Snakemake will compare the inputs'
    modification times with the outputs': the images and ``participants.tsv`` must not be
    dated after it (:func:`_refuse_future_dated`).

    Raises
    ------
    InputError
        Listing the files dated in the future, if any (before anything is read); else
        every file that is not NIfTI, is corrupt, 4D, or all zeros, every
        subject whose maps are on different grids, each with its subject, in subject order,
        and every subject whose map is identical to an earlier subject's.
    """
    cache: dict[str, list] = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except ValueError:
            cache = {}
    pending = {}  # cache key -> ([size, mtime], path, what it is); links are read once
    inputs_of = {}  # label -> [(map name or "anat", path, cache key)]
    modified = {}  # path -> modification time (ns), for clock_ns
    for label in labels:
        inputs_of[label] = []
        for kind, path in subject_inputs(root, label, modalities).items():
            stat, modified[path] = _status_and_time(path)
            key, stamp = str(Path(path).resolve()), [stat.st_size, stat.st_mtime_ns]
            inputs_of[label].append((kind, path, key))
            # an entry of another version of the checks (or of none: older entries have
            # two or three items) is read again: its file passed fewer checks
            entry = cache.get(key, ())
            if (len(entry) != 5 or entry[:2] != stamp or entry[3] != IMAGE_CHECKS_VERSION) \
                    and key not in pending:
                description = modality("T1w" if kind == "anat" else kind).description
                pending[key] = (stamp, path, f"subject sub-{label}: {description}",
                                None if kind == "anat" else kind)
    if clock_ns is not None:
        table = str(Path(root, "participants.tsv"))
        modified[table] = _status_and_time(table)[1]
        _refuse_future_dated(root, modified, clock_ns)
    # entries of files under this root that no longer exist (a subject removed: its scans'
    # paths and digests would stay in the cache; only these few are looked at, as a network
    # file system takes a millisecond a look)
    current = {key for inputs in inputs_of.values() for _, _, key in inputs}
    under_root = str(Path(root).resolve()) + os.sep
    gone = [key for key in cache if key.startswith(under_root) and key not in current
            and not os.path.exists(key)]
    for key in gone:
        del cache[key]
    if gone and not pending and cache_file is not None:
        write_json(cache_file, cache)
    problems = {}
    if pending:
        cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")  # Linux
                else os.cpu_count() or 1)
        threads = min(IMAGE_CHECK_THREADS, cpus, len(pending))
        if announce is not None:
            announce(f"Checking {len(pending)} input image(s) of {len(labels)} subject(s) "
                     f"once ({threads} thread(s)); files that pass are remembered in "
                     f"{cache_file or 'no cache file'}.")
        futures: dict = {}  # future -> cache key, until its result is kept
        unsaved, saved_at = 0, time.monotonic()

        def keep(key: str, result: tuple) -> int:
            grid, problem, digest = result
            if grid is None:
                problems[key] = problem
                return 0
            cache[key] = [*pending[key][0], grid, IMAGE_CHECKS_VERSION, digest]
            return 1

        try:
            with _stopped_by_one_ctrl_c(), ThreadPoolExecutor(max_workers=threads) as pool:
                futures = {pool.submit(_image_grid_or_problem, *item[1:]): key
                           for key, item in pending.items()}
                try:
                    for future in as_completed(list(futures)):
                        # a check that crashed (not an InputError: a defect) is raised here
                        unsaved += keep(futures.pop(future), future.result())
                        # saved as it goes: a lost login session (SIGHUP) or a time limit
                        # (SIGTERM) kills the process without any Python clean-up
                        if cache_file is not None and unsaved and \
                                time.monotonic() - saved_at > IMAGE_CACHE_SAVE_SECONDS:
                            write_json(cache_file, cache)
                            unsaved, saved_at = 0, time.monotonic()
                except BaseException:  # Ctrl-C: stop reading now
                    pool.shutdown(cancel_futures=True)
                    raise
        finally:  # after a Ctrl-C or a crash, the checks that finished meanwhile count too
            for future, key in futures.items():
                if future.done() and not future.cancelled() and future.exception() is None:
                    unsaved += keep(key, future.result())
            if cache_file is not None and (unsaved or gone):
                write_json(cache_file, cache)
    failed = []
    for label, inputs in inputs_of.items():
        failed += [problems.pop(key) for _, _, key in inputs if key in problems]
        maps = [(name, path, cache[key][2]) for name, path, key in inputs
                if name != "anat" and key in cache]
        if any(not same_grid(*grid, *maps[0][2]) for _, _, grid in maps[1:]):
            failed.append(
                f"subject sub-{label}: its maps are not on one voxel grid ("
                + "; ".join(f"{name} {path}: shape {tuple(grid[0])}, voxel-to-world "
                            f"{np.round(grid[1], 3).tolist()}" for name, path, grid in maps)
                + "). A subject's maps share one brain mask and one transform: "
                + ("they cover the same voxels in another order: reorient them to one "
                   "orientation (lossless: nibabel's as_reoriented, or fslreorient2std on "
                   "each), "
                   if all(_same_voxel_centres(grid, maps[0][2]) for _, _, grid in maps[1:])
                   else "")
                + f"resample them onto the grid of its {maps[0][0]} map, or export them all "
                  f"from the same inversion.")
    failed += _identical_maps(inputs_of, cache)
    if failed:
        raise InputError(failed[0] if len(failed) == 1 else
                         f"{len(failed)} input images cannot be used:\n" + "\n".join(failed))


def _status_and_time(path: str | Path) -> tuple[os.stat_result, int]:
    """``path``'s status (through a link, its file's) and the later of its file's and its
    link's modification times (ns), the time Snakemake compares: one system call for a
    file that is not a link, as a network file system takes a millisecond each."""
    link = os.lstat(path)
    status = os.stat(path) if S_ISLNK(link.st_mode) else link
    return status, max(status.st_mtime_ns, link.st_mtime_ns)


@contextlib.contextmanager
def _stopped_by_one_ctrl_c():
    """While inside, Ctrl-C raises KeyboardInterrupt at once. Snakemake plans inside
    asyncio, whose first Ctrl-C only cancels a task, which waits for the input function
    (this check, minutes for thousands of scans) to return: the first Ctrl-C looked
    ignored. Left as it is where Ctrl-C is ignored (a background job) or off the main
    thread (where no handler can be set)."""
    current = signal.getsignal(signal.SIGINT)  # None: a handler set outside Python
    if threading.current_thread() is not threading.main_thread() or current is None or \
            current in (signal.SIG_IGN, signal.default_int_handler):
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


#: How far past the outputs' file system's clock an input file may be dated (seconds)
#: before planning refuses it: that clock is the one that stamps the outputs, and every
#: job that reads a dataset file runs longer than this, so its outputs come out later.
FUTURE_MTIME_TOLERANCE_S = 5


def _refuse_future_dated(root: str | Path, modified: Mapping[str, int],
                         clock_ns: int) -> None:
    """Refuse the files of ``modified`` (path -> modification time, ns; a link's or its
    file's, the later) dated more than :data:`FUTURE_MTIME_TOLERANCE_S` after
    ``clock_ns``. Snakemake takes an output older than its input for clock skew: it fails
    the job after its work and removes its outputs, on every run until the clock passes
    the file's time, and its ``--touch`` removes them too. Such files come from a copy
    that kept the times (rsync -a, cp -p, scp -p, tar) of a machine whose clock is fast:
    named before any job runs, with the commands that give them the current time."""
    ahead = {path: mtime for path, mtime in modified.items()
             if mtime > clock_ns + FUTURE_MTIME_TOLERANCE_S * 10**9}
    if not ahead:
        return
    latest = max(ahead.values())
    seconds = (latest - clock_ns) / 1e9
    how_far = (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
               if seconds < 7200 else f"{seconds / 3600:.0f} h" if seconds < 172800
               else f"{seconds / 86400:.0f} days")

    def local(mtime_ns: int) -> str:
        return f"{datetime.datetime.fromtimestamp(mtime_ns / 1e9).astimezone():%Y-%m-%d %H:%M}"

    shown = [f"  {path} ({local(mtime)})"
             for path, mtime in list(ahead.items())[:MAX_MISSING_NAMED]]
    more = len(ahead) - len(shown)
    raise InputError(
        f"{len(ahead)} input file(s) under {root} are dated in the future, up to {how_far} "
        f"ahead of this file system's clock: copied with their times kept (rsync -a, cp -p, "
        f"scp -p, tar) from a machine whose clock is fast? Snakemake would stop every job "
        f"that reads one after its work (an output older than its input looks like clock "
        f"skew to it) and remove what the job made, run after run until "
        f"{local(latest)}, and --touch would not help. Give them the current time "
        f"(Snakemake may then redo their subjects): touch -c FILE ... (and touch -ch for a "
        f"link), or for every such file and link: find -H {shlex.quote(str(root))} -newermt "
        f"now -exec touch -ch {{}} + ; find -L {shlex.quote(str(root))} -newermt now -exec "
        f"touch -c {{}} +\n"
        + "\n".join(shown) + (f"\n  ... and {more} more." if more else ""))


def _same_voxel_centres(grid_a, grid_b, tolerance_mm: float = 1e-3) -> bool:
    """Whether two ``[shape, affine]`` grids hold the same voxel centres in world space,
    in another order (a reorientation: flipped or permuted axes)."""
    corners = []
    for shape, affine in (grid_a, grid_b):
        index = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"))
        points = np.asarray(affine)[:3, :3] @ index.reshape(3, -1) + np.asarray(affine)[:3, 3:]
        corners.append(points[:, np.lexsort(np.round(points / tolerance_mm))])
    return bool(sorted(grid_a[0]) == sorted(grid_b[0])
                and np.allclose(corners[0], corners[1], atol=tolerance_mm))


def _identical_maps(inputs_of: Mapping[str, list], cache: Mapping[str, list]) -> list[str]:
    """A message for each subject whose map of a modality is byte-identical to an earlier
    subject's (``inputs_of``, ``cache``: as in :func:`check_dataset_images`)."""
    first_with = {}
    messages = []
    for label, inputs in inputs_of.items():
        for name, path, key in inputs:
            entry = cache.get(key, ())
            digest = entry[4] if len(entry) > 4 else None
            if digest is None:  # a T1w, a file that failed a check
                continue
            other, other_path = first_with.setdefault(digest, (label, path))
            if other != label:
                messages.append(
                    f"subjects sub-{other} and sub-{label}: their {name} maps {other_path} and "
                    f"{path} are identical, byte for byte. One scan under two labels can land "
                    f"on both sides of the split (its test error then measures a person the "
                    f"encoder was trained on) and counts twice in the statistics: remove one "
                    f"subject's row from participants.tsv, or replace the file copied by "
                    f"mistake.")
    return messages


@lru_cache(maxsize=2)
def _image_check_cache(path: str, mtime_ns: int, size: int) -> dict:
    """The image-check cache file, parsed once per version (the plan asks for a cohort's
    digests several times; thousands of subjects' entries take about 0.1 s to parse)."""
    return json.loads(Path(path).read_text())


def checked_map_digests(root: str | Path, labels: Sequence[str], modalities: Sequence[str],
                        cache_file: str | Path) -> dict[str, str]:
    """{SHA-256: participant_id} of the MRE maps of ``modalities`` of subjects ``labels``
    under ``root``, as :func:`check_dataset_images` recorded them in ``cache_file`` (a map
    changed since its check, or never checked, has none): to find one cohort's scans
    among another's under other ids without reading a file again."""
    try:
        status = Path(cache_file).stat()
        cache = _image_check_cache(str(cache_file), status.st_mtime_ns, status.st_size)
    except (OSError, ValueError):
        return {}
    digests = {}
    for label in labels:
        for name in mre_maps(modalities):
            path = input_path(root, label, name)
            try:
                stat = path.stat()
            except OSError:
                continue
            entry = cache.get(str(path.resolve()), ())
            if len(entry) == 5 and entry[:2] == [stat.st_size, stat.st_mtime_ns] \
                    and entry[4] is not None:
                digests.setdefault(entry[4], f"sub-{label}")
    return digests


def _image_grid_or_problem(path: str | Path, what: str, kind: str | None
                           ) -> tuple[list | None, str | None, str | None]:
    """``([shape, affine], None, digest)`` for a file that passes :func:`load_nifti_checked`
    (as a map of modality ``kind``; None for the T1w beside the maps), with an MRE map's
    SHA-256 (a T1w has none: a lab without scans of its own may give every subject one
    anatomical image), else ``(None, its message, None)``."""
    try:
        image = load_nifti_checked(path, what=what, kind=kind)
    except InputError as error:
        return None, str(error), None
    digest = sha256_file(path) if kind is not None and modality(kind).is_mre else None
    return [list(image.shape[:3]), np.asarray(image.affine, dtype=float).tolist()], None, digest


def check_cohort_table(participants: pd.DataFrame, table_path: str | Path, *, cohort: str,
                       group_column: str | None = None,
                       bias_reference_group: str | None = None,
                       seen: Collection[str] = ()) -> str | None:
    """Check a cohort's participants table before any work; returns the column to
    summarise by (``group_column``, default ``group`` if present, else ``study``; None when
    a cohort to predict has neither: one group of every subject, :func:`cohort_groups`).
    ``seen``: participant_ids the model has seen, which the age-bias refit leaves out.

    Raises
    ------
    InputError
        No such column, or a ``bias_reference_group`` no subject belongs to or too few
        to fit the age-bias line (:func:`check_bias_reference_group`): found otherwise only
        after every subject was preprocessed.
    """
    for name in ("group", "study") if group_column is None else ():
        if name in participants.columns:
            break
        misspelt = [str(column) for column in participants.columns
                    if str(column).strip().casefold() == name]
        if misspelt:  # else summarised by the next column, or as one group, without a word
            raise InputError(f"cohort {cohort}: {table_path}'s header has {misspelt[0]!r}, "
                             f"with spaces around its name or in another case: name it "
                             f"{name!r} to summarise by {name}.")
    if group_column is None:
        group_column = next((column for column in ("group", "study")
                             if column in participants.columns), None)
    elif group_column not in participants.columns:
        raise InputError(f"cohort {cohort}: {table_path} has no column {group_column!r} to "
                         f"summarise by; it has {', '.join(participants.columns)}.")
    if group_column is None and bias_reference_group is not None:
        raise InputError(
            f"cohort {cohort}: the age-bias reference group {bias_reference_group!r} (config "
            f"key predict.bias_reference_group, or --bias-reference-group) needs a column "
            f"'group' (or 'study') in {table_path} that names each subject's group; it has "
            f"{', '.join(participants.columns)}. Add one, or leave the reference group unset "
            f"to use the bundle's correction.")
    if group_column is not None:
        _refuse_values_differing_in_spelling(
            participants, table_path, column=group_column,
            consequence="in the summary by group and the age-bias reference group")
    groups = list(dict.fromkeys(cohort_groups(participants, group_column)))
    if bias_reference_group is not None and str(bias_reference_group) not in groups:
        raise InputError(
            f"cohort {cohort}: the age-bias reference group {bias_reference_group!r} (config "
            f"key predict.bias_reference_group, or --bias-reference-group) is not a value of "
            f"column {group_column!r} of {table_path}, whose groups are {', '.join(groups)}. "
            f"Name one of them, or leave it unset to use the bundle's correction.")
    if bias_reference_group is not None:
        check_bias_reference_group(participants, group_column, bias_reference_group,
                                   cohort=cohort, seen=seen)
    return group_column


def cohort_groups(participants: pd.DataFrame, group_column: str | None) -> pd.Series:
    """Each subject's group as a string: its value of ``group_column``, :data:`NO_GROUP`
    where blank; :data:`ALL_SUBJECTS` for every subject when ``group_column`` is None."""
    if group_column is None:
        return pd.Series(ALL_SUBJECTS, index=participants.index)
    return participants[group_column].astype(str).where(participants[group_column].notna(),
                                                         NO_GROUP)


#: Subjects with a prediction that an age-bias line needs (two fix any line):
#: brainage.agebias.fit_age_bias's minimum, checked here on a cohort's reference group.
MIN_BIAS_SUBJECTS = 3


def check_bias_reference_group(participants: pd.DataFrame, group_column: str, group: str,
                               passed: np.ndarray | None = None, *, cohort: str,
                               seen: Collection[str] = ()) -> None:
    """Refuse a ``bias_reference_group`` whose members cannot fit the age-bias line
    (:func:`brainage.agebias.fit_age_bias`: at least :data:`MIN_BIAS_SUBJECTS` subjects, not all of one
    age). ``passed``: QC verdict per row (bool), once QC is known, before any subject is
    embedded; None before any preprocessing (every member counts), so that a group too
    small is refused before hours of work rather than after them. ``seen``: the
    participant_ids the model has seen (left out of the refit, apply.predict_cohort).

    Raises
    ------
    InputError
    """
    members = (cohort_groups(participants, group_column) == str(group)).to_numpy()
    qc_known = passed is not None
    all_ages = participants["age"].to_numpy(dtype=np.float64)
    aged = np.isfinite(all_ages)  # a cohort to predict may lack ages: those cannot fit it
    new = ~participants["participant_id"].isin(set(seen)).to_numpy()
    usable = members & aged & new & (passed if qc_known else True)
    ages = all_ages[usable]
    if usable.sum() >= MIN_BIAS_SUBJECTS and np.ptp(ages) > 0:
        return
    failed = participants.loc[members & aged & new & ~usable, "participant_id"].tolist()
    left_out = participants.loc[members & ~new, "participant_id"].tolist()
    without_age = participants.loc[members & ~aged, "participant_id"].tolist()
    new_to_model = " new to the model" if left_out else ""
    if usable.sum() < MIN_BIAS_SUBJECTS:
        problem = (f"only {int(usable.sum())} of its {int(members.sum())} subjects"
                   f"{' are' + new_to_model + ' and' if left_out else ''} passed QC"
                   if qc_known else f"it has only {int(usable.sum())} subject"
                   + ("s" if usable.sum() != 1 else "") + new_to_model) + (
            f" with an age ({', '.join(without_age[:10])}"
            f"{' ...' if len(without_age) > 10 else ''} have none)" if without_age else "")
    else:
        problem = (f"every subject of it{' that passed QC' if qc_known else ''}"
                   f"{',' + new_to_model + ',' if left_out else ''} is {ages[0]:g} years old")
    raise InputError(
        f"cohort {cohort}: the age-bias correction cannot be refitted on group {group!r} "
        f"(config key predict.bias_reference_group, or --bias-reference-group): {problem}"
        f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}"
        + (f" ({len(left_out)} {'is a subject' if len(left_out) == 1 else 'are subjects'} "
           f"the model has seen, by participant_id or by a byte-identical map, and "
           f"{'is' if len(left_out) == 1 else 'are'} left out: {', '.join(left_out[:10])}"
           f"{' ...' if len(left_out) > 10 else ''}; add the cohort to "
           f"predict.unrelated_cohorts if ids only coincide with other people's)"
           if left_out else "")
        + f"; the line needs at "
        f"least {MIN_BIAS_SUBJECTS} subjects of different ages with a prediction. Add "
        f"subjects to the group, or leave the key unset to use the bundle's correction.")
