"""Quality control of the registered maps: per subject (step ``compute_qc`` of rule
``correct_and_register``) and per dataset (rule ``tabulate_qc``).

Per subject, three numbers in template space:

``dice``
    Dice of the warped brain mask against the template brain mask (registration and
    skull stripping together).
``correlation``
    Pearson correlation of the registered stiffness with the template T1 inside the
    template brain, where the map has data. White matter is stiffer than cortex and CSF
    as it is brighter in a T1w, so a misregistered map correlates poorly. Measured on the
    first of the grid map and the subject's other maps whose white matter is higher
    (``Modality.white_matter_higher``: a modulus or the T1w, not the damping ratio; the
    JSON's ``correlation_map`` names it). Without such a map it is recorded and not judged
    (:func:`correlation_applies`).
``coverage``
    Share of the template brain covered by non-zero stiffness (paper Appendix Fig. 7):
    the MRE slab's coverage, as the normalisation and the network see it.

Thresholds (config ``qc.min_dice``, ``qc.min_correlation``, ``qc.min_coverage``) are applied
only in the dataset table, so changing them reruns the table, not the subjects.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from brainage.inputs import MADE_AGAIN, InputError
from brainage.io import atomic_path, headless_pyplot, write_json, write_tsv
from brainage.preprocess.images import load_mask, load_volume, require_same_grid
from brainage.preprocess.skullstrip import FREESURFER_PROGRAMS

log = logging.getLogger(__name__)

METRICS = ("dice", "correlation", "coverage")
#: Each metric's minimum, by its config key (section ``qc``): the one place the names meet.
QC_THRESHOLDS = {"dice": "min_dice", "correlation": "min_correlation",
                 "coverage": "min_coverage"}
#: The QC overview's y axis per metric: (label, factor from the QC table's value), so that
#: coverage reads in % as in Fig. 7, not as a fraction.
METRIC_AXES = {"dice": ("Dice, warped and template brain masks", 1.0),
               "correlation": ("correlation with the template T1", 1.0),
               "coverage": ("brain coverage [%]", 100.0)}
QC_COLUMNS = ("participant_id", "study", "dice", "correlation", "correlation_map", "coverage",
              "reference_correlation", "reference_kind", "skullstrip_route",
              "median_stiffness", "qc_pass", "qc_failures")
#: How far a study's (or a cohort's) subjects may lie, on average, from the line of median
#: stiffness against age of the others (in residual standard deviations of that line)
#: before a warning. Stiffness rises with MRE's drive frequency (about 30 % from 30 to
#: 50 Hz) and differs between inversions as an age effect would: a study 30 % stiffer lies
#: about 5 from the demo's line; the demo's simulated studies lie within 1.8 of the others'
#: line (two subjects 11 % stiffer), its accelerated-ageing group at 1.1.
LEVEL_TOLERANCE_SD = 3.0
#: Fewest subjects with an age and a median stiffness whose line a level is compared with.
MIN_LEVEL_SUBJECTS = 5
#: Fewest subjects within the line's ages whose level is compared with it: a study (or a
#: cohort) is compared only where its ages meet the others', never with the line stretched
#: beyond them (a young and an old study, each of one protocol, read as 20-45 % apart in
#: 71 % of such cohorts of 15 + 15 subjects, a review's simulation).
MIN_COMPARED_SUBJECTS = 3

#: The job that writes a subject's QC file: the training cohort's rule, or its variant for
#: a pretraining or predict cohort's maps (rules/common.smk CHAIN_VARIANTS).
WRITTEN_BY = ("a subject's job of rule correct_and_register (correct_and_register_<maps> in "
              "a pretraining or predict cohort) writes it")

#: How to remake a damaged QC file. A training or pretraining cohort's normalisation reads
#: its subjects' QC files, or under qc.exclude_failed the QC table that the failed job
#: removed (rules/common.smk qc_input), so it and every training after it run again
#: whatever the order of commands (checked in copies of the demo, both settings). A
#: --forcerun of the rule would name the training cohort's only; removing the file remakes
#: it in every cohort and in predict run.
REMAKE_IT = (f"remove it and run again: {WRITTEN_BY} again (in a training or pretraining "
             f"cohort the normalisation and the trainings after it run again too, as after "
             f"any change to its subjects' files)")


def qc_metrics(stiffness: np.ndarray, mask: np.ndarray, reference: np.ndarray,
               template_t1: np.ndarray, template_mask: np.ndarray, *,
               correlated: np.ndarray | None = None) -> dict:
    """QC numbers of one registered subject; all arrays on the template grid [X, Y, Z].

    Parameters
    ----------
    stiffness : registered map (kPa), 0 = no data.
    mask : warped brain mask (bool).
    reference : warped registration reference (T1w or stiffness).
    template_t1, template_mask : the template (float, bool).
    correlated : the registered map the correlation is measured on (one whose white
        matter is higher, as the T1's); default ``stiffness``. Its support is the same.

    Returns
    -------
    dict: ``dice``, ``correlation``, ``coverage`` (see module docstring),
    ``reference_correlation`` (warped reference vs template T1 in the template brain),
    ``template_brain_voxels``, ``covered_voxels``.
    """
    covered = (stiffness != 0) & template_mask
    dice = 2 * np.count_nonzero(mask & template_mask) / max(
        int(mask.sum() + template_mask.sum()), 1)
    reference_region = template_mask & (reference != 0)
    return {
        "dice": float(dice),
        "correlation": _pearson((stiffness if correlated is None else correlated)[covered],
                                template_t1[covered]),
        "coverage": float(covered.sum() / max(int(template_mask.sum()), 1)),
        "reference_correlation": _pearson(reference[reference_region],
                                          template_t1[reference_region]),
        "template_brain_voxels": int(template_mask.sum()),
        "covered_voxels": int(covered.sum()),
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0.0 when undefined (fewer than 3 voxels, or a constant image).

    Constancy is tested exactly (all values equal): the float32 ``np.std`` of a constant
    map is not always 0 (rounding of its mean), and ``np.corrcoef`` then returned NaN.
    """
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def as_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` with its voxel axes permuted and flipped to the closest of R, A, S.

    ``affine``: voxel index -> world mm (RAS+, as NIfTI). A template stored LAS (FSL's
    ``MNI152_T1_2mm``), LPS or with permuted axes then shows the same anatomy in the same
    place as one stored RAS. Only axes are reordered: no resampling.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(np.asarray(affine, dtype=np.float64)),
                               axcodes2ornt("RAS"))
    return apply_orientation(volume, transform)


def plot_subject_qc(stiffness: np.ndarray, template_t1: np.ndarray, template_mask: np.ndarray,
                    out_png: str | Path, *, affine: np.ndarray, title: str,
                    label: str = "stiffness (kPa)") -> None:
    """Three orthogonal views of the registered map over the template and its brain outline.

    Slices through the centre of the template brain; the map in colour (kPa), the template
    T1 in grey, the template brain mask's outline in red. ``affine`` (voxel index -> world
    mm of the template grid the three arrays share) orients the views whatever the
    template's voxel order: superior up, the subject's right on the right of the coronal
    and axial views (neurological convention), anterior on the right of the sagittal view.
    """
    plt = headless_pyplot()

    stiffness, template_t1, template_mask = (as_ras(volume, affine) for volume in
                                             (stiffness, template_t1, template_mask))
    centre = np.round(np.argwhere(template_mask).mean(axis=0)).astype(int)
    values = stiffness[stiffness != 0]
    high = float(np.percentile(values, 99)) if values.size else 1.0
    views = [("sagittal", lambda v: v[centre[0], :, :]),
             ("coronal", lambda v: v[:, centre[1], :]),
             ("axial", lambda v: v[:, :, centre[2]])]
    figure, axes = plt.subplots(1, 3, figsize=(11, 4))
    image = None
    for axis, (name, cut) in zip(axes, views):
        axis.imshow(cut(template_t1).T, origin="lower", cmap="gray")
        shown = np.ma.masked_equal(cut(stiffness).T, 0)
        image = axis.imshow(shown, origin="lower", cmap="viridis", vmin=0, vmax=high, alpha=0.9)
        axis.contour(cut(template_mask.astype(float)).T, levels=[0.5], colors="red",
                     linewidths=0.8)
        axis.set_title(name)
        axis.set_axis_off()
    figure.colorbar(image, ax=axes, shrink=0.8, label=label)
    figure.suptitle(title, fontsize=10)
    with atomic_path(out_png) as temp:
        figure.savefig(temp, dpi=80, format="png")
    plt.close(figure)


def compute_qc(stiffness: str | Path, mask: str | Path, reference: str | Path,
               reference_info: str | Path, template_t1: str | Path, template_mask: str | Path,
               out_json: str | Path, out_png: str | Path, *, subject: str,
               grid_modality: str = "stiffness",
               maps: Mapping[str, str | Path] | None = None) -> dict:
    """QC metrics JSON and three-view PNG of one registered subject.

    Parameters
    ----------
    stiffness, mask, reference : the subject's registered grid map (``grid_modality``:
        the stiffness, or the T1w of a cohort without MRE maps), warped brain mask and
        warped reference (``register_to_template``).
    grid_modality : what ``stiffness`` is (names the colour bar).
    maps : ``{modality: registered map}`` of every channel; each gets its brain-value
        percentiles (1, 50, 99) and voxel count under ``maps`` in the JSON.
    reference_info : sidecar of ``strip_skull`` (route and reference kind).
    template_t1, template_mask : the template.
    out_json, out_png : outputs (``Layout.subject_qc``).
    subject : label (without ``sub-``).

    Returns
    -------
    The JSON content: :func:`qc_metrics` plus ``participant_id``, ``reference_kind``,
    ``skullstrip_route``, ``maps``.
    """
    from brainage.modalities import modality
    name = f"subject sub-{subject}"
    template, template_affine = load_volume(template_t1, what="template T1",
                                            remedy=MADE_AGAIN)
    brain, _ = load_mask(template_mask, what="template brain mask")

    def load_made_here(path, what: str):  # register_to_template's outputs, not raw scans
        return load_volume(path, what=what, remedy=MADE_AGAIN)

    def on_template_grid(path, what: str, load=load_made_here) -> np.ndarray:
        # every input is compared voxel by voxel with the template: a file on another grid
        # (a stale or hand-copied output) is named instead of failing inside NumPy
        values, values_affine = load(path, what=f"{name}: {what}")
        require_same_grid(values.shape, values_affine, f"{name}: {what} {path}",
                          template.shape, template_affine, f"template {template_t1}")
        return values

    data = on_template_grid(stiffness, "registered map")
    warped_mask = on_template_grid(mask, "warped brain mask", load_mask)
    reference_data = on_template_grid(reference, "warped reference")
    info = json.loads(Path(reference_info).read_text())
    # the correlation with the T1 on a map whose white matter is higher, as the T1's: on
    # a damping ratio grid map it failed every well registered subject (r about 0)
    registered = {channel: on_template_grid(path, f"registered {channel}")
                  for channel, path in (maps or {}).items()}
    correlated_name = next((channel for channel in (grid_modality, *registered)
                            if modality(channel).white_matter_higher), grid_modality)
    metrics = qc_metrics(data, warped_mask, reference_data, template, brain,
                         correlated=registered.get(correlated_name, data))
    result = {"participant_id": f"sub-{subject}", **metrics,
              "correlation_map": correlated_name,
              "reference_kind": info.get("reference_kind"),
              "skullstrip_route": info.get("route"),
              "maps": {channel: map_summary(values, brain)
                       for channel, values in registered.items()}}
    write_json(out_json, result)
    kind = modality(grid_modality)
    plot_subject_qc(data, template, brain, out_png, affine=template_affine,
                    label=f"{grid_modality} ({kind.unit})",
                    title=(f"sub-{subject}: Dice {metrics['dice']:.3f}, correlation "
                           f"{metrics['correlation']:.2f}, coverage {metrics['coverage']:.1%}"))
    log.info("%s: Dice %.3f, correlation %.3f, coverage %.3f", name, metrics["dice"],
             metrics["correlation"], metrics["coverage"])
    reference_r = metrics["reference_correlation"]
    if info.get("reference_kind") == "T1w_brain" and not reference_r >= MIN_T1W_CORRELATION:
        log.warning("%s: the registered T1w correlates %.2f with the template T1 (well "
                    "registered skull-stripped T1w images: 0.81-0.95 in the demo), so its "
                    "registration has likely failed (e.g. a head tilted over about 30 "
                    "degrees, outside the affine's capture range), though the thresholds of "
                    "the config's qc section may pass it. Look at %s over the template T1, "
                    "and at %s.", name, reference_r, reference, out_png)
    return result


#: Below this correlation of a registered, skull-stripped T1w with the template T1, the
#: registration has likely failed: the demo's subjects reach 0.81-0.95; heads tilted 35-40
#: degrees, misregistered by 20-40 mm, 0.33-0.42 (and passed the judged thresholds).
#: Warned of, not judged: a threshold key would rerun the normalisation of runs that
#: exclude failing subjects.
MIN_T1W_CORRELATION = 0.7


def map_summary(values: np.ndarray, template_brain: np.ndarray) -> dict:
    """Percentiles 1, 50, 99 of a registered map's non-zero voxels in the template brain
    (the map's unit), and their count: enough to spot a map in the wrong unit or scale."""
    inside = values[template_brain & (values != 0)].astype(np.float64)
    if inside.size == 0:
        return {"voxels": 0, "p01": None, "median": None, "p99": None}
    p01, median, p99 = np.percentile(inside, [1, 50, 99])
    return {"voxels": int(inside.size), "p01": float(p01), "median": float(median),
            "p99": float(p99)}


def thresholds(qc_settings: Mapping) -> dict[str, float]:
    """``{config key: minimum}`` of the QC thresholds in a ``qc`` section (or any mapping
    holding those keys, e.g. a bundle's record)."""
    missing = [key for key in QC_THRESHOLDS.values() if key not in qc_settings]
    if missing:
        raise KeyError(f"QC thresholds {', '.join(missing)} are missing (config section qc).")
    return {key: float(qc_settings[key]) for key in QC_THRESHOLDS.values()}


def correlation_applies(row: Mapping) -> bool:
    """Whether a subject's correlation with the template T1 says something about its
    registration: not when it was measured on a map whose white matter is not higher (a
    cohort whose only map is the damping ratio, the maps a damping-ratio model's cohort is
    preprocessed with): it is recorded, not judged. Records written before
    ``correlation_map`` are judged, as they were."""
    from brainage.modalities import MODALITIES

    name = row.get("correlation_map")
    return name not in MODALITIES or MODALITIES[name].white_matter_higher


def qc_failures(row: Mapping, minimums: Mapping) -> list[str]:
    """The thresholds a subject's QC row misses, e.g. ``["dice 0.812 < 0.85"]``.

    ``minimums``: :func:`thresholds` of the ``qc`` section. The correlation is left out
    where it does not apply (:func:`correlation_applies`).
    """
    failures = []
    for metric, key in QC_THRESHOLDS.items():
        if metric == "correlation" and not correlation_applies(row):
            continue
        value, threshold = float(row[metric]), float(minimums[key])
        if not value >= threshold:  # NaN fails too
            shown = f"{value:.3f}"
            if float(shown) >= threshold:  # 0.6999 is not "0.700 < 0.7"
                shown = next(f"{value:.{digits}f}" for digits in range(4, 18)
                             if float(f"{value:.{digits}f}") < threshold)
            failures.append(f"{metric} {shown} < {threshold:g}")
    return failures


def participants_table(source: pd.DataFrame | str | Path,
                       modalities: Sequence[str] = ("stiffness",)) -> pd.DataFrame:
    """A validated participants table, given as a DataFrame or as the path of the dataset's
    ``participants.tsv`` (read with :func:`brainage.inputs.read_participants`, which checks
    that every subject has the images of ``modalities``)."""
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True)
    from brainage.inputs import read_participants

    return read_participants(Path(source).parent, modalities)


def tabulate_qc(qc_files: Sequence[str | Path], participants: pd.DataFrame | str | Path,
                out_table: str | Path, *, minimums: Mapping,
                modalities: Sequence[str] = ("stiffness",)) -> pd.DataFrame:
    """The dataset's QC table, one row per participant, in participants order.

    Parameters
    ----------
    qc_files : every subject's QC JSON (``compute_qc``).
    participants : the dataset's participants table, or the path of its participants.tsv.
    out_table : TSV with :data:`QC_COLUMNS`; ``qc_failures`` lists the missed thresholds
        (``;``-separated, empty when passed).
    minimums : :func:`thresholds` of the config section ``qc``.
    modalities : the images every listed subject has (config key ``dataset.modalities``, or
        ``T1w`` for a pretraining cohort), checked when ``participants`` is a path.

    Raises
    ------
    brainage.inputs.InputError
        A participant has no QC file.
    """
    participants = participants_table(participants, modalities)
    by_subject = read_qc_records(qc_files, require=METRICS)
    missing = [pid for pid in participants["participant_id"] if pid not in by_subject]
    if missing:
        raise InputError(f"no QC file for {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}; {WRITTEN_BY}: run it for "
                         f"them.")
    rows = []
    for participant in participants.itertuples(index=False):
        record = by_subject[participant.participant_id]
        failures = qc_failures(record, minimums)
        rows.append({"participant_id": participant.participant_id, "study": participant.study,
                     **{key: record.get(key) for key in QC_COLUMNS
                        if key not in ("participant_id", "study", "qc_pass", "qc_failures")},
                     "median_stiffness": median_stiffness(record),
                     "qc_pass": not failures, "qc_failures": "; ".join(failures)})
    table = pd.DataFrame(rows, columns=list(QC_COLUMNS))
    failed = table[~table["qc_pass"]]
    figures = {Path(path).name.split("_")[0]: Path(path).with_suffix(".png")
               for path in qc_files}
    for row in failed.itertuples(index=False):
        # a flag alone changed nothing: say what happens to the subject and what to look at
        log.warning("QC flags %s (%s): %s. Look at its QC figure %s (%s). Config key "
                    "qc.exclude_failed decides what happens to it: false (the default) trains "
                    "on and evaluates it as any subject, true leaves it out of every split.",
                    row.participant_id, row.study, row.qc_failures,
                    figures.get(row.participant_id, "(none)"),
                    "; ".join(dict.fromkeys(FAILURE_CAUSES[failure.split()[0]]
                                            for failure in row.qc_failures.split("; "))))
    _warn_about_studies_failing_as_a_whole(table)
    _warn_about_mixed_skull_strippers(table)
    if "age" in participants.columns:
        _warn_about_studies_of_another_stiffness(table, participants["age"])
    recorded = table["reference_kind"].notna()  # QC files of earlier versions lack it
    warn_about_mixed_references(
        f"the cohort of {out_table}", table["participant_id"][recorded],
        table["reference_kind"][recorded],
        advice="in training and evaluation that difference follows the subjects like a "
               "site effect. Give every subject its T1w (anat/sub-<label>_T1w.nii.gz) or "
               "none")
    log.info("QC: %d of %d subjects pass (%s)", int(table["qc_pass"].sum()), len(table),
             ", ".join(f"{key} {value:g}" for key, value in minimums.items()))
    write_tsv(out_table, table)
    return table


#: What to look for where a subject misses a metric's threshold (tabulate_qc's warning).
FAILURE_CAUSES = {
    "dice": "a failed skull stripping or registration, or a T1w from another session or "
            "origin than the maps",
    "correlation": "a misregistered map, or a T1w from another session or origin than the "
                   "maps",
    "coverage": "a cut field of view, or an MRE map's short slab: the image covers too "
                "little of the template brain, however well it is registered",
}


def _warn_about_studies_failing_as_a_whole(table: pd.DataFrame) -> None:
    """One line for a study (of 2 or more subjects) whose every subject misses one
    threshold: its acquisition (a slab shorter than ``qc.min_coverage`` allows) or its
    preprocessing, not its subjects, and with ``qc.exclude_failed`` the whole study would
    leave every split, which the subjects' lines did not say."""
    for study, rows in table.groupby("study", sort=False):
        missed = [{failure.split()[0] for failure in failures.split("; ") if failure}
                  for failures in rows["qc_failures"]]
        common = set.intersection(*missed) if missed else set()
        if len(rows) >= 2 and common:
            log.warning("QC: every subject of study %s (%d) misses the %s threshold: the "
                        "study's acquisition or preprocessing rather than its subjects (for "
                        "coverage, an MRE slab or a field of view shorter than "
                        "qc.min_coverage allows). With "
                        "qc.exclude_failed true the whole study leaves every split.", study,
                        len(rows), " and ".join(sorted(common)))


def median_stiffness(record: Mapping) -> float | None:
    """The median of a QC record's registered stiffness map in the template brain (kPa;
    :func:`map_summary`), or None where the record has none."""
    value = ((record.get("maps") or {}).get("stiffness") or {}).get("median")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def stiffness_by_age(ages: Sequence[float], medians: Sequence[float]) -> dict | None:
    """The least-squares line of the subjects' median stiffness (kPa) against their age
    (years), over those with both: ``intercept_kpa``, ``slope_kpa_per_year``,
    ``residual_sd_kpa``, ``n_subjects`` and the ages it covers, ``age_min`` and
    ``age_max``; None for fewer than :data:`MIN_LEVEL_SUBJECTS`, all of one age, or no
    scatter."""
    ages, medians = (np.asarray(values, dtype=np.float64) for values in (ages, medians))
    known = np.isfinite(ages) & np.isfinite(medians)
    ages, medians = ages[known], medians[known]
    if len(ages) < MIN_LEVEL_SUBJECTS or np.ptp(ages) == 0:
        return None
    slope, intercept = np.polyfit(ages, medians, 1)
    residuals = medians - (intercept + slope * ages)
    residual_sd = float(np.sqrt(residuals @ residuals / (len(ages) - 2)))
    if residual_sd == 0:
        return None
    return {"intercept_kpa": float(intercept), "slope_kpa_per_year": float(slope),
            "residual_sd_kpa": residual_sd, "n_subjects": int(len(ages)),
            "age_min": float(ages.min()), "age_max": float(ages.max())}


def stiffness_offset(line: Mapping, ages: Sequence[float], medians: Sequence[float], *,
                     minimum: int = MIN_COMPARED_SUBJECTS) -> tuple[float, float, int] | None:
    """How the subjects' median stiffness lies against ``line`` (:func:`stiffness_by_age`),
    on average over those with a median and an age within the line's: (residual standard
    deviations, ratio to the line's value at their ages, subjects); None for fewer than
    ``minimum`` such subjects (a study's; a whole cohort to predict is compared from one)."""
    ages, medians = (np.asarray(values, dtype=np.float64) for values in (ages, medians))
    known = (np.isfinite(ages) & np.isfinite(medians)
             & (ages >= line.get("age_min", -np.inf)) & (ages <= line.get("age_max", np.inf)))
    if known.sum() < max(minimum, 1):
        return None
    expected = line["intercept_kpa"] + line["slope_kpa_per_year"] * ages[known]
    return (float(np.mean(medians[known] - expected) / line["residual_sd_kpa"]),
            float(np.mean(medians[known] / expected)), int(known.sum()))


def describe_stiffness_offset(ratio: float) -> str:
    """``31 % stiffer`` or ``24 % softer``."""
    return f"{abs(ratio - 1) * 100:.0f} % {'stiffer' if ratio > 1 else 'softer'}"


def _warn_about_studies_of_another_stiffness(table: pd.DataFrame, ages: pd.Series) -> None:
    """Warn of a study whose subjects' maps lie, at their ages, far from the other studies'
    (:data:`LEVEL_TOLERANCE_SD`): another drive frequency or inversion, which the network
    and the read-out learn as the study, and which no other check sees (Dice, correlation
    and coverage do not depend on the maps' scale)."""
    ages = pd.to_numeric(pd.Series(ages).reset_index(drop=True), errors="coerce")
    medians = pd.to_numeric(table["median_stiffness"], errors="coerce")
    for study in table["study"].dropna().unique():
        in_study = (table["study"] == study).to_numpy()
        line = stiffness_by_age(ages[~in_study], medians[~in_study])
        offset = line and stiffness_offset(line, ages[in_study], medians[in_study])
        if offset and abs(offset[0]) >= LEVEL_TOLERANCE_SD:
            log.warning(
                "QC: the maps of study %s (%d subjects) are on average %s than the other "
                "studies' at the same ages (%+.1f residual standard deviations of their "
                "line of median stiffness against age): another MRE drive frequency or "
                "inversion? The network and the read-out learn the study from such an "
                "offset, and its subjects' brain-age gaps carry it. Pool studies of one "
                "frequency and inversion, or harmonise their maps first (README, 'Your own "
                "data'); qc.tsv lists each subject's median_stiffness (kPa).", study,
                offset[2], describe_stiffness_offset(offset[1]), offset[0])


#: The tool behind each recorded skull-stripping route (the program that ran);
#: preprocess.skullstrip: auto picks the tool per job, by machine.
SKULL_STRIPPING_TOOLS = {"deepbet": "deepbet",
                         **{program: "freesurfer" for program in FREESURFER_PROGRAMS.values()}}


def _warn_about_mixed_skull_strippers(table: pd.DataFrame) -> None:
    """Warn when one cohort's T1w images were stripped by both tools: with
    ``preprocess.skullstrip: auto`` each job takes FreeSurfer where its machine has it, so
    a study added later on other nodes can be stripped by the other tool, a difference
    that follows the study like a site effect."""
    # routes of no tool (none, no T1w) map to NaN, which groupby leaves out
    by_route = table["participant_id"].groupby(table["skullstrip_route"].map(SKULL_STRIPPING_TOOLS))
    if by_route.ngroups < 2:
        return
    counts = "; ".join(f"{route}: {len(ids)} (e.g. {', '.join(ids.iloc[:3])})"
                       for route, ids in by_route)
    log.warning("This cohort's T1w images were skull-stripped by two tools (%s): "
                "preprocess.skullstrip auto takes FreeSurfer on the machines that have it "
                "and deepbet elsewhere. Masks that differ by tool, and so by study where "
                "studies were added at different times, act like a site effect. Set "
                "preprocess.skullstrip to one tool (this reruns every subject's "
                "preprocessing).", counts)


def warn_about_mixed_references(cohort: str, participant_ids: Sequence[str],
                                references: Sequence[str], *, advice: str) -> None:
    """Warn when a cohort's subjects were registered by different reference images (a T1w
    for most, the stiffness map for those without one): their brain masks and transforms
    come from other images, which moved one prediction by 2.3 years when tried
    (docs/method.md §7). ``cohort`` names it, ``advice`` says what to do."""
    by_kind: dict[str, list[str]] = {}
    for participant_id, kind in zip(participant_ids, references):
        by_kind.setdefault(kind, []).append(participant_id)
    if len(by_kind) < 2:
        return
    main_kind = max(by_kind, key=lambda kind: len(by_kind[kind]))
    others = "; ".join(f"{len(subjects)} by {kind} ({', '.join(subjects[:10])}"
                       f"{', ...' if len(subjects) > 10 else ''})"
                       for kind, subjects in by_kind.items() if kind != main_kind)
    log.warning("%s: subjects were registered by different reference images: %d by %s, %s "
                "(reference_kind in each subject's QC file). Their brain masks and "
                "transforms come from other images; %s.", cohort, len(by_kind[main_kind]),
                main_kind, others, advice)


def plot_dataset_qc(table: pd.DataFrame, out_png: str | Path, *, minimums: Mapping) -> None:
    """The QC overview (report figure ``qc_overview``): one panel per metric, subjects by
    study, the configured minimum as a dashed line, flagged subjects in red. A metric that
    could not be computed (NaN, a failed subject) is counted in its panel's title: it has
    no point to draw. A correlation recorded and not judged (:func:`correlation_applies`)
    is grey, and counted in the title; without a judged one the panel has no minimum."""
    from brainage.report.results import natural_key  # the order of the report's figures

    plt = headless_pyplot()
    studies = sorted(table["study"].astype(str).unique(), key=natural_key)
    # a panel widens with a consortium's 15-30 studies, whose tilted names overprinted
    figure, axes = plt.subplots(1, len(METRICS), figsize=(
        max(4.0, 0.3 * len(studies)) * len(METRICS), 3.6))
    rng = np.random.default_rng(0)  # horizontal jitter only
    judged = {metric: np.ones(len(table), dtype=bool) for metric in METRICS}
    judged["correlation"] = np.array([correlation_applies(row)
                                      for row in table.to_dict("records")], dtype=bool)
    for axis, metric in zip(axes, METRICS):
        label, factor = METRIC_AXES[metric]
        for position, study in enumerate(studies):
            in_study = (table["study"].astype(str) == study).to_numpy()
            rows = table[in_study]
            x = position + rng.uniform(-0.15, 0.15, size=len(rows))
            colours = np.where(~judged[metric][in_study], "tab:gray",
                               np.where(rows["qc_pass"], "tab:blue", "tab:red"))
            axis.scatter(x, factor * rows[metric].astype(float), c=colours, s=14)
        if judged[metric].any():
            axis.axhline(factor * minimums[QC_THRESHOLDS[metric]], color="tab:red",
                         linestyle="--", linewidth=1)
        axis.set_ylabel(label)
        axis.set_xticks(range(len(studies)), studies, rotation=45, ha="right")
        undefined = int(pd.to_numeric(table[metric], errors="coerce").isna().sum())
        notes = [f"{undefined} not computed, flagged"] if undefined else []
        unjudged = int((~judged[metric]).sum())
        notes += [f"{unjudged} recorded, not judged (grey)"] if unjudged else []
        axis.set_title(metric + (f" ({'; '.join(notes)})" if notes else ""))
    flagged = int((~table["qc_pass"]).sum())
    figure.suptitle(f"QC of {len(table)} registered maps: {flagged} flagged (red); dashed: "
                    f"configured minimum")
    figure.tight_layout()
    with atomic_path(out_png, suffix=".png") as temp:
        # tight: a long study name's tilted label was cut off at the bottom
        figure.savefig(temp, dpi=90, format="png", bbox_inches="tight")
    plt.close(figure)


def read_qc_records(qc_files: Sequence[str | Path], *,
                    require: Sequence[str] = ()) -> dict[str, dict]:
    """``{participant_id: record}`` of the subjects' QC JSON files (``compute_qc``).

    ``require``: metrics every record must hold as numbers (NaN allowed: it fails the
    threshold), else :class:`InputError` naming the file. A record must be the subject's
    its file is named after (``sub-<label>_...``), and no two files may hold one subject's:
    a file copied from another subject would pass that subject's verdict on.
    """
    records, files = {}, {}
    for path in qc_files:
        try:
            record = json.loads(Path(path).read_text())
            participant_id = record["participant_id"]
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise InputError(f"QC file {path} cannot be read as a subject's QC record "
                             f"({type(error).__name__}: {error}); {REMAKE_IT}.") from None
        named_for = Path(path).name.split("_")[0]
        if named_for.startswith("sub-") and participant_id != named_for:
            raise InputError(f"QC file {path} is the record of {participant_id}, not of "
                             f"{named_for}; {REMAKE_IT}.")
        if participant_id in files:
            raise InputError(f"QC files {files[participant_id]} and {path} both hold the "
                             f"record of {participant_id}; give the QC table each subject's "
                             f"own file once.")
        records[participant_id], files[participant_id] = record, path
        lacking = [metric for metric in require if isinstance(record.get(metric), bool)
                   or not isinstance(record.get(metric), (int, float))]
        if lacking:
            raise InputError(f"QC file {path} has no number for {', '.join(lacking)}; "
                             f"{REMAKE_IT}.")
    return records


def qc_metrics_table(qc_files: Sequence[str | Path]) -> pd.DataFrame:
    """``participant_id`` and :data:`METRICS` from the subjects' QC JSON files
    (``compute_qc``): what the QC table holds before any threshold is applied."""
    rows = [{"participant_id": participant_id,
             **{metric: record.get(metric) for metric in METRICS}}
            for participant_id, record in read_qc_records(qc_files, require=METRICS).items()]
    table = pd.DataFrame(rows, columns=["participant_id", *METRICS])
    for metric in METRICS:
        table[metric] = pd.to_numeric(table[metric], errors="coerce")
    return table


def read_qc_table(path: str | Path) -> pd.DataFrame:
    """The table written by :func:`tabulate_qc`, ``qc_pass`` as bool."""
    table = pd.read_csv(path, sep="\t", dtype={"participant_id": str, "study": str,
                                               "qc_failures": str}, keep_default_na=False)
    table["qc_pass"] = table["qc_pass"].astype(str).str.lower() == "true"
    for metric in METRICS:
        table[metric] = pd.to_numeric(table[metric], errors="coerce")
    return table
