"""Writing a simulated cohort to disk in the pipeline's input layout (rules
``simulate_cohort`` and ``simulate_predict_cohort``, and ``python -m brainage.simulate``)."""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from brainage.inputs import is_simulation
from brainage.simulate.anatomy import (
    DAMPING_RATIO_TRUTH_COLUMNS,
    TRUTH_COLUMNS,
    check_maps,
    simulate_subject,
)
from brainage.simulate.demographics import OptionError, draw_participants
from brainage.simulate.t1w_cohort import (
    T1W_AGE_RANGE_YEARS,
    T1W_ID_PREFIX,
    T1W_N_SUBJECTS,
    T1W_VOXEL_SIZE_MM,
    simulate_t1w_cohort,
)
from brainage.simulate.writing import (
    TRUTH_BIDS_IGNORE,
    check_root,
    save_nifti,
    staged_dataset,
    write_bidsignore,
    write_json,
)

LOGGER = logging.getLogger(__name__)

#: What each MRE map is, for the NIfTI header; file name sub-<label>_<map>.nii.gz.
MAP_DESCRIPTIONS = {
    "stiffness": "MRE shear stiffness (kPa), simulated",
    "damping_ratio": "MRE damping ratio (dimensionless), simulated",
}
#: simulate_cohort options added after the first simulated datasets, at the value that
#: reproduces those. At that value :func:`simulation_options` leaves them out of a rule's
#: params: Snakemake re-runs a job whose params changed, and a re-simulated cohort would
#: re-run everything downstream of it although every file would come out the same.
LATER_OPTIONS_DEFAULTS = {"maps": ["stiffness"]}


_PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "subject label, sub-<letters and digits>"},
    "age": {"Description": "age at the MRE scan", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "study": {"Description": "study (site and protocol) the subject was scanned in"},
    "group": {"Description": "cohort group",
              "Levels": {"healthy": "healthy control",
                         "accelerated": "simulated accelerated brain ageing"}},
}


#: Healthy subjects of an MRE cohort unless told otherwise (the API's and the CLI's default).
MRE_N_SUBJECTS = 60


def simulate_cohort(root: str | Path, *, n_subjects: int = MRE_N_SUBJECTS, seed: int = 0,
                    accelerated_group_n: int = 0, accelerated_ageing_years: float = 8.0,
                    id_prefix: str = "", with_anatomy: bool = True,
                    nan_probability: float = 0.15, maps=("stiffness",),
                    overwrite: bool = False) -> pd.DataFrame:
    """Write a simulated MRE cohort to ``root`` in the pipeline's input layout.

    The dataset is built in a temporary folder next to ``root`` and renamed into place,
    so a crash never leaves a half-written dataset. The layout, the ground truth and
    the meaning of the pose transform are described in the module docstring.

    Parameters
    ----------
    root : str or Path
        Dataset folder to create. It may exist only if empty, unless ``overwrite``.
    n_subjects : int
        Healthy subjects over the 5 studies of the paper's Table 2 (at least 10).
    seed : int
        Random seed (>= 0); same arguments give identical images and tables.
    accelerated_group_n : int
        Extra subjects (>= 0; study ``patients``, group ``accelerated``) whose stiffness is
        simulated ``accelerated_ageing_years`` older than their age; anatomy at true age.
    accelerated_ageing_years : float
        Stiffness age offset of the accelerated group (years, any finite number).
    id_prefix : str
        Letters/digits prepended to every label and mixed into the seed: a new cohort.
    with_anatomy : bool
        Also write ``sub-<label>/anat/sub-<label>_T1w.nii.gz`` (same grid as the map).
    nan_probability : float
        Probability that a subject's maps have 1-10 NaN voxels (inside brain and slab).
    maps : sequence of str
        MRE maps to write, ``sub-<label>/mre/sub-<label>_<map>.nii.gz``: ``"stiffness"``
        (kPa, always) and optionally ``"damping_ratio"`` (dimensionless, 0-1, same grid,
        support and NaN voxels as the stiffness). Adding the damping ratio changes no
        other file but ``truth.tsv``/``truth.json`` (columns
        :data:`DAMPING_RATIO_TRUTH_COLUMNS` appended) and ``dataset_description.json``.
    overwrite : bool
        Replace an existing non-empty ``root``.

    Returns
    -------
    pandas.DataFrame
        The ground-truth table (``derivatives/simulation/truth.tsv``), one row per
        subject, columns as in :data:`TRUTH_COLUMNS` (plus the damping-ratio columns).

    Raises
    ------
    ValueError
        An option out of its range, naming it, before anything is simulated.
    FileExistsError
        ``root`` is a file, or a non-empty folder without ``overwrite``.

    See Also
    --------
    brainage.simulate.simulate_t1w_cohort : a T1w-only cohort (pretraining).
    """
    root = Path(root)
    if not 0.0 <= nan_probability <= 1.0:
        raise ValueError(f"nan_probability={nan_probability} must be within 0-1.")
    maps = check_maps(maps)
    check_root(root, overwrite=overwrite)
    participants = draw_participants(
        n_subjects, seed=seed, accelerated_group_n=accelerated_group_n,
        accelerated_ageing_years=accelerated_ageing_years, id_prefix=id_prefix)
    columns = dict(TRUTH_COLUMNS)
    if "damping_ratio" in maps:
        columns.update(DAMPING_RATIO_TRUTH_COLUMNS)

    with staged_dataset(root) as staging:
        truth_rows = []
        simulation = staging / "derivatives" / "simulation"
        for index, subject in enumerate(participants.to_dict("records")):
            started = time.perf_counter()
            affine, images, t1w, brain, truth = simulate_subject(
                subject, seed=seed, id_prefix=id_prefix, index=index,
                with_anatomy=with_anatomy, nan_probability=nan_probability, maps=maps)
            subject_id = subject["participant_id"]
            for name, image in images.items():
                save_nifti(staging / subject_id / "mre" / f"{subject_id}_{name}.nii.gz",
                           image, affine, MAP_DESCRIPTIONS[name])
            if t1w is not None:
                save_nifti(staging / subject_id / "anat" / f"{subject_id}_T1w.nii.gz",
                           t1w, affine, "T1w-like image, simulated")
            save_nifti(simulation / subject_id / f"{subject_id}_desc-truth_mask.nii.gz",
                       brain.astype(np.uint8), affine, "true brain mask, simulated")
            truth_rows.append(truth)
            LOGGER.info("simulated %s (%d/%d, age %.1f years, %s) in %.2f s", subject_id,
                        index + 1, len(participants), subject["age"], subject["study"],
                        time.perf_counter() - started)
        truth_table = pd.DataFrame(truth_rows, columns=list(columns))

        participants[["participant_id", "age", "sex", "study", "group"]].to_csv(
            staging / "participants.tsv", sep="\t", index=False, float_format="%.1f")
        write_json(staging / "participants.json", _PARTICIPANT_COLUMNS)
        generated_by = [{"Name": "brainage.simulate",
                         "Description": f"simulated MRE cohort, seed {seed}"}]
        parameters = {
            "n_subjects": n_subjects, "seed": seed, "id_prefix": id_prefix,
            "accelerated_group_n": accelerated_group_n,
            "accelerated_ageing_years": accelerated_ageing_years,
            "with_anatomy": with_anatomy, "nan_probability": nan_probability}
        if list(maps) != LATER_OPTIONS_DEFAULTS["maps"]:
            parameters["maps"] = list(maps)  # absent at the default: files as before
        write_json(staging / "dataset_description.json", {
            "Name": "brainage simulated multi-study MRE cohort",
            "BIDSVersion": "1.9.0", "DatasetType": "raw", "GeneratedBy": generated_by,
            "SimulationParameters": parameters,
        })
        write_json(simulation / "dataset_description.json", {
            "Name": "ground truth of the brainage simulation", "BIDSVersion": "1.9.0",
            "DatasetType": "derivative", "GeneratedBy": generated_by,
        })
        # BIDS has no MRE datatype: without these the validator rejects both datasets.
        write_bidsignore(staging, ["sub-*/mre"])
        write_bidsignore(simulation, TRUTH_BIDS_IGNORE)
        truth_table.to_csv(simulation / "truth.tsv", sep="\t", index=False)
        write_json(simulation / "truth.json",
                   {column: {"Description": text} for column, text in columns.items()})
    return truth_table


def simulated_participants(*, n_subjects: int = MRE_N_SUBJECTS, seed: int = 0,
                           accelerated_group_n: int = 0, accelerated_ageing_years: float = 8.0,
                           id_prefix: str = "", with_anatomy: bool = True,
                           nan_probability: float = 0.15, maps=("stiffness",)) -> pd.DataFrame:
    """The participants :func:`simulate_cohort` draws for these options, without images.

    Takes every :func:`simulate_cohort` option (config section ``dataset.simulate`` or
    ``predict.simulate`` after :func:`simulation_options`), so the workflow knows a
    simulated cohort's subjects before it exists; the image options change no participant.

    Returns
    -------
    pandas.DataFrame
        As :func:`draw_participants`.
    """
    check_maps(maps)
    return draw_participants(n_subjects, seed=seed, accelerated_group_n=accelerated_group_n,
                             accelerated_ageing_years=accelerated_ageing_years,
                             id_prefix=id_prefix)


def simulation_options(section: Mapping) -> dict:
    """:func:`simulate_cohort` keyword options of a validated config section
    (``dataset.simulate`` or ``predict.simulate``): without ``enabled`` and ``cohort``,
    and without an option of :data:`LATER_OPTIONS_DEFAULTS` at that default (see there)."""
    return {key: value for key, value in section.items()
            if key not in ("enabled", "cohort")
            and not (key in LATER_OPTIONS_DEFAULTS
                     and list(value) == LATER_OPTIONS_DEFAULTS[key])}


def replace_simulation(root: str | Path, **options) -> pd.DataFrame:
    """Simulate a cohort into ``root``, replacing an earlier simulation there (the rules
    ``simulate_cohort`` and ``simulate_predict_cohort``).

    ``root`` may hold empty folders or the files Snakemake is about to rewrite
    (``participants.tsv``), or a previous simulation; a user's real dataset at that path
    is never overwritten.

    Parameters
    ----------
    root : path
        The dataset root (config key ``dataset.root``, or the cohort's root of
        ``predict.cohorts``).
    **options
        :func:`simulate_cohort` options (config section ``dataset.simulate`` or
        ``predict.simulate`` without ``enabled``/``cohort``).

    Returns
    -------
    pandas.DataFrame
        The simulation's ground truth table.

    Raises
    ------
    FileExistsError
        ``root`` holds files that are not a brainage simulation.
    """
    root = Path(root)
    ours = is_simulation(root)
    foreign = ([path for path in root.rglob("*") if path.is_file()
                and path.name != "participants.tsv"] if root.is_dir() else [])
    if foreign and not ours:
        raise FileExistsError(
            f"{root} holds files not written by the simulator (e.g. {foreign[0]}); refusing to "
            f"overwrite them. Point the simulation (dataset.root, or the predict.cohorts entry "
            f"of predict.simulate.cohort) at an empty folder, or switch the simulation off "
            f"(dataset.simulate.enabled / predict.simulate.enabled: false) to use that dataset "
            f"as it is.")
    # the new simulation replaces the folder as a whole: anything put beside the
    # simulator's own files (predict run's suggested <root>/derivatives/brainage) would go
    added = _not_simulated(root) if ours else []
    if added:
        raise FileExistsError(
            f"{root} is a brainage simulation, but {', '.join(map(str, added[:5]))}"
            f"{', ...' if len(added) > 5 else ''} was put there since; simulating the cohort "
            f"again replaces the folder as a whole and would delete it. Move it out of "
            f"{root} and run again.")
    truth = simulate_cohort(root, overwrite=True, **options)
    LOGGER.info("simulated %d subjects into %s (%s)", len(truth), root,
                ", ".join(f"{key} {value}" for key, value in sorted(options.items())))
    return truth


#: Every file :func:`simulate_cohort` writes, as a path relative to the root (the
#: subject's label in group ``label``).
_SIMULATED_FILE = re.compile(
    r"(?:dataset_description\.json|participants\.tsv|participants\.json|\.bidsignore"
    r"|derivatives/simulation/(?:dataset_description\.json|truth\.tsv|truth\.json"
    r"|\.bidsignore|(?P<truth>sub-[A-Za-z0-9]+)/(?P=truth)_desc-truth_mask\.nii\.gz)"
    rf"|(?P<label>sub-[A-Za-z0-9]+)/(?:mre/(?P=label)_(?:{'|'.join(MAP_DESCRIPTIONS)})"
    r"|anat/(?P=label)_T1w)\.nii\.gz)")


def _not_simulated(root: Path) -> list[Path]:
    """Files under simulated cohort ``root`` that the simulator did not write: anything
    but the names :func:`simulate_cohort` gives its files (:data:`_SIMULATED_FILE`), and
    those of a subject its truth table does not list (a real subject put beside the
    simulated ones). A link or a folder that is a link counts as a file."""
    try:  # the participants table may be gone: Snakemake removes a job's outputs first
        labels = set(pd.read_csv(root / "derivatives" / "simulation" / "truth.tsv",
                                 sep="\t", dtype=str)["participant_id"])
    except (OSError, KeyError, ValueError):
        labels = None  # no truth table: the files' names alone decide
    added = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        match = _SIMULATED_FILE.fullmatch(path.relative_to(root).as_posix())
        label = match and (match["label"] or match["truth"])
        if not match or (label and labels is not None and label not in labels):
            added.append(path)
    return added


#: CLI options that only one kind of cohort takes.
_MRE_ONLY_OPTIONS = ("accelerated_group_n", "accelerated_ageing_years", "maps", "no_anatomy")
_T1W_ONLY_OPTIONS = ("voxel_size_mm", "min_age", "max_age")


def _flag(name: str, value) -> str:
    """An option as typed on the command line (:meth:`OptionError.spelled`):
    ``--n-subjects 5``, ``--maps stiffness damping_ratio``."""
    if name == "age_range_years":  # two flags
        return f"--min-age {value[0]} --max-age {value[1]}"
    values = value if isinstance(value, (list, tuple)) else [value]
    return " ".join(["--" + name.replace("_", "-"), *(shlex.quote(str(item)) for item in values)])


def main(argv=None) -> None:
    """``python -m brainage.simulate --root DIR [--n-subjects N] [--seed S] ...``; with
    ``--t1w-only`` a T1w-only (pretraining) cohort instead of an MRE cohort."""
    parser = argparse.ArgumentParser(
        prog="python -m brainage.simulate",
        description="Write a simulated multi-study MRE cohort (stiffness in kPa, optionally "
                    "the damping ratio, and T1w) or, with --t1w-only, a simulated T1w-only "
                    "cohort for pretraining, in the pipeline's BIDS-like input layout.")
    parser.add_argument("--root", required=True, help="dataset folder to write")
    parser.add_argument("--n-subjects", type=int, default=None,
                        help="MRE: healthy subjects over the 5 studies (at least 10), default "
                             f"{MRE_N_SUBJECTS}; --t1w-only: subjects over 4 sites (at least 1), default "
                             f"{T1W_N_SUBJECTS}")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0), default 0")
    parser.add_argument("--id-prefix", default=None,
                        help=f"label prefix (default: none; {T1W_ID_PREFIX!r} with --t1w-only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier simulation at --root as a whole (every file "
                             "in the folder goes); a folder the simulator did not write is "
                             "refused")
    mre = parser.add_argument_group("MRE cohort")
    mre.add_argument("--accelerated-group-n", type=int, default=None, help="default 0")
    mre.add_argument("--accelerated-ageing-years", type=float, default=None,
                     help="default 8.0 (years)")
    mre.add_argument("--maps", nargs="+", default=None, metavar="MAP",
                     help="MRE maps to write: stiffness [damping_ratio] (default stiffness)")
    mre.add_argument("--no-anatomy", action="store_true", default=None,
                     help="skip the T1w images")
    t1w = parser.add_argument_group("T1w-only cohort (pretraining)")
    t1w.add_argument("--t1w-only", action="store_true",
                     help="write sub-<label>/anat/sub-<label>_T1w.nii.gz only, no MRE maps")
    t1w.add_argument("--voxel-size-mm", type=float, default=None,
                     help=f"isotropic voxel size (mm), default {T1W_VOXEL_SIZE_MM}")
    t1w.add_argument("--min-age", type=float, default=None,
                     help=f"youngest age (years), default {T1W_AGE_RANGE_YEARS[0]}")
    t1w.add_argument("--max-age", type=float, default=None,
                     help=f"oldest age (years), default {T1W_AGE_RANGE_YEARS[1]}")
    args = parser.parse_args(argv)
    wrong_kind = _T1W_ONLY_OPTIONS if not args.t1w_only else _MRE_ONLY_OPTIONS
    given = [name for name in wrong_kind if getattr(args, name) is not None]
    if given:
        option = "--" + given[0].replace("_", "-")
        parser.error(f"{option} is for {'a T1w-only' if not args.t1w_only else 'an MRE'} "
                     f"cohort; {'add' if not args.t1w_only else 'drop'} --t1w-only or drop "
                     f"{option}.")
    if args.accelerated_ageing_years is not None and not args.accelerated_group_n:
        parser.error("--accelerated-ageing-years is the stiffness age offset of the "
                     "accelerated group, which only --accelerated-group-n N (N >= 1) adds; "
                     "add it or drop --accelerated-ageing-years.")

    root = Path(args.root)
    if args.overwrite and root.is_dir() and any(root.iterdir()):
        # one wrong --root, plus the flag the refusal of a non-empty folder suggests, would
        # delete a lab's own dataset, or what was put inside an earlier simulation
        # (predict run's suggested <root>/derivatives/brainage), as the rule refuses to
        added = _not_simulated(root) if is_simulation(root) else sorted(root.iterdir())
        if added:
            parser.exit(2, f"brainage.simulate: error: --overwrite replaces only an earlier "
                           f"simulation, and {root} holds files the simulator did not write "
                           f"(e.g. {added[0]}). Choose another --root, or move them out "
                           f"first.\n")

    def value(name, default):
        return default if getattr(args, name) is None else getattr(args, name)

    try:
        if args.t1w_only:
            participants = simulate_t1w_cohort(
                args.root, n_subjects=value("n_subjects", T1W_N_SUBJECTS), seed=args.seed,
                id_prefix=value("id_prefix", T1W_ID_PREFIX),
                voxel_size_mm=value("voxel_size_mm", T1W_VOXEL_SIZE_MM),
                age_range_years=(value("min_age", T1W_AGE_RANGE_YEARS[0]),
                                 value("max_age", T1W_AGE_RANGE_YEARS[1])),
                overwrite=args.overwrite)
        else:
            participants = simulate_cohort(
                args.root, n_subjects=value("n_subjects", MRE_N_SUBJECTS), seed=args.seed,
                accelerated_group_n=value("accelerated_group_n", 0),
                accelerated_ageing_years=value("accelerated_ageing_years", 8.0),
                id_prefix=value("id_prefix", ""), with_anatomy=not args.no_anatomy,
                maps=value("maps", ("stiffness",)), overwrite=args.overwrite)
    except OptionError as error:  # its message names the Python arguments (n_subjects=5)
        parser.exit(2, f"brainage.simulate: error: {error.spelled(_flag)}\n")
    except OSError as error:
        if error.errno is None:  # ours (an existing root): the message says what to do
            parser.exit(2, f"brainage.simulate: error: {error}\n")
        # the system's (unwritable, full, a name too long): it names a staging folder
        # next to the root, so say which --root it was and what to do
        parser.exit(2, f"brainage.simulate: error: could not write --root {args.root}: "
                       f"{error}. Choose a folder you can write to, on a disk with room.\n")
    except ValueError as error:
        parser.exit(2, f"brainage.simulate: error: {error}\n")
    print(f"wrote {len(participants)} subjects to {args.root}")


if __name__ == "__main__":
    main()
