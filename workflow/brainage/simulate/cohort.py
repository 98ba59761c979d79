"""Writing a simulated cohort to disk in the pipeline's input layout (rules
``simulate_cohort`` and ``simulate_predict_cohort``, and ``python -m brainage.simulate``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from brainage.simulate.anatomy import TRUTH_COLUMNS, simulate_subject
from brainage.simulate.demographics import draw_participants

LOGGER = logging.getLogger(__name__)

def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, description: str) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode()[:79]
    image.set_sform(affine, code=1)  # scanner coordinates
    image.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.to_filename(str(path))


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


_PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "subject label, sub-<letters and digits>"},
    "age": {"Description": "age at the MRE scan", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "study": {"Description": "study (site and protocol) the subject was scanned in"},
    "group": {"Description": "cohort group",
              "Levels": {"healthy": "healthy control",
                         "accelerated": "simulated accelerated brain ageing"}},
}


def simulate_cohort(root: str | Path, *, n_subjects: int = 60, seed: int = 0,
                    accelerated_group_n: int = 0, accelerated_ageing_years: float = 8.0,
                    id_prefix: str = "", with_anatomy: bool = True,
                    nan_probability: float = 0.15, overwrite: bool = False) -> pd.DataFrame:
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
        Random seed; same arguments give identical images and tables.
    accelerated_group_n : int
        Extra subjects (study ``patients``, group ``accelerated``) whose stiffness is
        simulated ``accelerated_ageing_years`` older than their age; anatomy at true age.
    accelerated_ageing_years : float
        Stiffness age offset of the accelerated group (years).
    id_prefix : str
        Letters/digits prepended to every label and mixed into the seed: a new cohort.
    with_anatomy : bool
        Also write ``sub-<label>/anat/sub-<label>_T1w.nii.gz`` (same grid as the map).
    nan_probability : float
        Probability that a subject's map has 1-10 NaN voxels (inside brain and slab).
    overwrite : bool
        Replace an existing non-empty ``root``.

    Returns
    -------
    pandas.DataFrame
        The ground-truth table (``derivatives/simulation/truth.tsv``), one row per
        subject, columns as in :data:`TRUTH_COLUMNS`.
    """
    root = Path(root)
    if not 0.0 <= nan_probability <= 1.0:
        raise ValueError(f"nan_probability={nan_probability} must be within 0-1.")
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"dataset root {root} exists and is not a folder; choose "
                              f"another root or remove the file.")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"dataset root {root} exists and is not empty; pass "
                              f"overwrite=True (CLI: --overwrite) to replace it, or choose "
                              f"an empty folder.")
    participants = draw_participants(
        n_subjects, seed=seed, accelerated_group_n=accelerated_group_n,
        accelerated_ageing_years=accelerated_ageing_years, id_prefix=id_prefix)

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        truth_rows = []
        simulation = staging / "derivatives" / "simulation"
        for index, subject in enumerate(participants.to_dict("records")):
            started = time.perf_counter()
            affine, stiffness, t1w, brain, truth = simulate_subject(
                subject, seed=seed, id_prefix=id_prefix, index=index,
                with_anatomy=with_anatomy, nan_probability=nan_probability)
            subject_id = subject["participant_id"]
            _save_nifti(staging / subject_id / "mre" / f"{subject_id}_stiffness.nii.gz",
                        stiffness, affine, "MRE shear stiffness (kPa), simulated")
            if t1w is not None:
                _save_nifti(staging / subject_id / "anat" / f"{subject_id}_T1w.nii.gz",
                            t1w, affine, "T1w-like image, simulated")
            _save_nifti(simulation / subject_id / f"{subject_id}_desc-truth_mask.nii.gz",
                        brain.astype(np.uint8), affine, "true brain mask, simulated")
            truth_rows.append(truth)
            LOGGER.info("simulated %s (%d/%d, age %.1f years, %s) in %.2f s", subject_id,
                        index + 1, len(participants), subject["age"], subject["study"],
                        time.perf_counter() - started)
        truth_table = pd.DataFrame(truth_rows, columns=list(TRUTH_COLUMNS))

        participants[["participant_id", "age", "sex", "study", "group"]].to_csv(
            staging / "participants.tsv", sep="\t", index=False, float_format="%.1f")
        _write_json(staging / "participants.json", _PARTICIPANT_COLUMNS)
        generated_by = [{"Name": "brainage.simulate",
                         "Description": f"simulated MRE cohort, seed {seed}"}]
        _write_json(staging / "dataset_description.json", {
            "Name": "brainage simulated multi-study MRE cohort",
            "BIDSVersion": "1.9.0", "DatasetType": "raw", "GeneratedBy": generated_by,
            "SimulationParameters": {
                "n_subjects": n_subjects, "seed": seed, "id_prefix": id_prefix,
                "accelerated_group_n": accelerated_group_n,
                "accelerated_ageing_years": accelerated_ageing_years,
                "with_anatomy": with_anatomy, "nan_probability": nan_probability},
        })
        _write_json(simulation / "dataset_description.json", {
            "Name": "ground truth of the brainage simulation", "BIDSVersion": "1.9.0",
            "DatasetType": "derivative", "GeneratedBy": generated_by,
        })
        truth_table.to_csv(simulation / "truth.tsv", sep="\t", index=False)
        _write_json(simulation / "truth.json",
                    {column: {"Description": text} for column, text in TRUTH_COLUMNS.items()})
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a dataset is shared
        _move_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return truth_table


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
    description = root / "dataset_description.json"
    ours = description.is_file() and "brainage.simulate" in description.read_text()
    foreign = ([path for path in root.rglob("*") if path.is_file()
                and path.name != "participants.tsv"] if root.is_dir() else [])
    if foreign and not ours:
        raise FileExistsError(
            f"{root} holds files not written by the simulator (e.g. {foreign[0]}); refusing to "
            f"overwrite them. Point the simulation (dataset.root, or the predict.cohorts entry "
            f"of predict.simulate.cohort) at an empty folder, or switch the simulation off "
            f"(dataset.simulate.enabled / predict.simulate.enabled: false) to use that dataset "
            f"as it is.")
    truth = simulate_cohort(root, overwrite=True, **options)
    LOGGER.info("simulated %d subjects into %s (%s)", len(truth), root,
                ", ".join(f"{key} {value}" for key, value in sorted(options.items())))
    return truth


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


def main(argv=None) -> None:
    """``python -m brainage.simulate --root DIR [--n-subjects N] [--seed S] ...``"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset folder to write")
    parser.add_argument("--n-subjects", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerated-group-n", type=int, default=0)
    parser.add_argument("--accelerated-ageing-years", type=float, default=8.0)
    parser.add_argument("--id-prefix", default="")
    parser.add_argument("--no-anatomy", action="store_true", help="skip the T1w images")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        truth = simulate_cohort(
            args.root, n_subjects=args.n_subjects, seed=args.seed,
            accelerated_group_n=args.accelerated_group_n,
            accelerated_ageing_years=args.accelerated_ageing_years, id_prefix=args.id_prefix,
            with_anatomy=not args.no_anatomy, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as error:
        parser.exit(2, f"brainage.simulate: error: {error}\n")
    print(f"wrote {len(truth)} subjects to {args.root}")


if __name__ == "__main__":
    main()
