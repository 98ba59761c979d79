# Stage predict: brain age for new subjects (config section predict).
#
#   predict            target rule: `snakemake predict` = export_model + every cohort
#   export_model       the grid cell predict.model -> results/models/<name>/ (a bundle another
#                      lab can run without the training data; brainage.bundle)
#   <cohort>_...       each cohort in predict.cohorts goes through the SAME per-subject
#                      preprocessing rules as the training cohort (reused with `use rule`),
#                      writing under results/predict/<cohort>/preproc/sub-<label>/
#   predict_cohort     normalise with the bundle's TRAINING statistics, embed, read out, gap:
#                      results/predict/<cohort>/{predictions,summary}.tsv, gap_by_group.png,
#                      provenance.json
#   simulate_predict_cohort   (demo) a new simulated cohort with a healthy and an
#                      accelerated-ageing group, when predict.simulate.enabled; a plain rule,
#                      not a checkpoint: its subjects follow from the options

from brainage.bundle import MANIFEST_FILE, PAYLOAD_FILES, README_FILE
from brainage.io import anatomical_path, stiffness_path
from brainage.predict import QC_THRESHOLDS, preprocessing_record
from brainage.predict import exported_cell as exported_cell_of
from brainage.simulate import draw_participants

PREDICT = config["predict"]
BUNDLE_NAME = PREDICT["model"]["name"]
BUNDLE_FILES = (MANIFEST_FILE, *PAYLOAD_FILES, README_FILE)
PREDICT_COHORTS = PREDICT["cohorts"]
_PREDICT_SIMULATE = PREDICT.get("simulate", {})
SIMULATED_PREDICT_COHORT = (_PREDICT_SIMULATE.get("cohort", "demo")
                            if _PREDICT_SIMULATE.get("enabled", False) else None)
#: simulate_cohort() options of the simulated predict cohort.
PREDICT_SIMULATION = {key: value for key, value in _PREDICT_SIMULATE.items()
                      if key not in ("enabled", "cohort")}
PREDICTION_FILES = ("predictions.tsv", "summary.tsv", "gap_by_group.png", "provenance.json")
COHORT_LAYOUT = LAYOUT.cohort_layout("{cohort}")

if SIMULATED_PREDICT_COHORT is not None and SIMULATED_PREDICT_COHORT not in PREDICT_COHORTS:
    raise WorkflowError(
        f"config key predict.simulate.cohort is {SIMULATED_PREDICT_COHORT!r} but "
        f"predict.cohorts has no such cohort; add `{SIMULATED_PREDICT_COHORT}: <an empty "
        f"folder>` under predict.cohorts (the simulation writes the dataset there).")

wildcard_constraints:
    cohort="|".join(PREDICT_COHORTS) or "[A-Za-z0-9_]+",


def predict_targets():
    """Every cohort's predictions, summary and figure (nothing without predict.cohorts)."""
    return [LAYOUT.prediction(cohort, name) for cohort in PREDICT_COHORTS
            for name in PREDICTION_FILES]


def exported_cell():
    """(split, experiment, variant, seed) of predict.model; the split is the first one."""
    try:
        cell = exported_cell_of(config)
    except ConfigError as error:
        raise WorkflowError(str(error)) from None
    return (split_names()[0], *cell)


def _exported_cell_file(name):
    def path(wildcards):
        return cell_output(*exported_cell(), name)
    return path


def cohort_root(cohort):
    return PREDICT_COHORTS[cohort]


def simulated_predict_labels():
    """Labels of the simulated predict cohort, known before it is simulated: the simulator
    draws its participants table from the options alone (brainage.simulate.draw_participants),
    so this cohort needs no checkpoint."""
    options = dict(PREDICT_SIMULATION)
    table = draw_participants(options.pop("n_subjects"), **options)
    return [pid[len("sub-"):] for pid in table["participant_id"]]


def cohort_subjects(cohort):
    """Labels of a predict cohort, from its participants.tsv (or its simulation options)."""
    if cohort == SIMULATED_PREDICT_COHORT:
        return simulated_predict_labels()
    try:
        table = read_participants(cohort_root(cohort))
    except InputError as error:
        raise WorkflowError(f"predict cohort {cohort} (config key predict.cohorts."
                            f"{cohort}): {error}") from None
    return [pid[len("sub-"):] for pid in table["participant_id"]]


def cohort_raw_inputs(wildcards):
    """Input files of one subject of a predict cohort (as raw_inputs for the training one)."""
    root = cohort_root(wildcards.cohort)
    if wildcards.cohort == SIMULATED_PREDICT_COHORT:  # files still to be simulated
        return {"stiffness": str(stiffness_path(root, wildcards.subject)),
                "anat": str(anatomical_path(root, wildcards.subject))}
    try:
        return subject_inputs(root, wildcards.subject)
    except InputError as error:
        raise WorkflowError(str(error)) from None


def _cohort_subject_files(kind):
    def paths(wildcards):
        layout = LAYOUT.cohort_layout(wildcards.cohort)
        if kind == "maps":
            return [layout.subject_mni(label, "preproc", "stiffness")
                    for label in cohort_subjects(wildcards.cohort)]
        return [layout.subject_qc(label, ".json") for label in cohort_subjects(wildcards.cohort)]
    return paths


rule predict:
    """`snakemake predict`: export the model bundle and predict every configured cohort."""
    input:
        [LAYOUT.model_bundle_file(BUNDLE_NAME, name) for name in BUNDLE_FILES],
        predict_targets(),
    localrule: True


rule export_model:
    input:
        encoder=_exported_cell_file("encoder.pt"),
        predictions=_exported_cell_file("predictions.tsv"),
        metrics=_exported_cell_file("metrics.json"),
        images=lambda wildcards: LAYOUT.split_file(exported_cell()[0], "images.npy"),
        participants=lambda wildcards: LAYOUT.split_file(exported_cell()[0], "participants.tsv"),
        stats=lambda wildcards: LAYOUT.split_file(exported_cell()[0], "stats.json"),
        template_t1=LAYOUT.template("T1w"),
        template_mask=LAYOUT.template("brain_mask"),
    output:
        [LAYOUT.model_bundle_file(BUNDLE_NAME, name) for name in BUNDLE_FILES],
    params:
        settings=lambda wildcards: cell_settings(config, *exported_cell()[1:]),
        split_dir=lambda wildcards: LAYOUT.split_dir(exported_cell()[0]),
        bundle_dir=LAYOUT.model_bundle(BUNDLE_NAME),
        name=BUNDLE_NAME,
        preprocessing=preprocessing_record(config),
        bias_fit=PREDICT.get("bias_fit", "training"),
    log:
        LAYOUT.log("predict", f"export_model_{BUNDLE_NAME}"),
    benchmark:
        LAYOUT.benchmark("predict", f"export_model_{BUNDLE_NAME}")
    threads: config["train"]["threads"]
    resources:
        # Embeds every subject of the split, like evaluate_encoder: run where it runs.
        gpu=config["resources"]["train"]["gpu"],
        mem_mb=config["resources"]["train"]["mem_mb"],
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/export_model.py"


rule predict_cohort:
    input:
        bundle=[LAYOUT.model_bundle_file(BUNDLE_NAME, name) for name in BUNDLE_FILES],
        # ages and groups enter the gaps and the summary: editing them reruns the prediction
        participants=lambda wildcards: str(Path(cohort_root(wildcards.cohort),
                                                "participants.tsv")),
        maps=_cohort_subject_files("maps"),
        qc=_cohort_subject_files("qc"),
    output:
        predictions=LAYOUT.prediction("{cohort}", "predictions.tsv"),
        summary=LAYOUT.prediction("{cohort}", "summary.tsv"),
        figure=LAYOUT.prediction("{cohort}", "gap_by_group.png"),
        provenance=LAYOUT.prediction("{cohort}", "provenance.json"),
    params:
        bundle_dir=LAYOUT.model_bundle(BUNDLE_NAME),
        dataset_root=lambda wildcards: cohort_root(wildcards.cohort),
        labels=lambda wildcards: cohort_subjects(wildcards.cohort),
        qc_thresholds={key: config["qc"][key] for key in QC_THRESHOLDS},
        bias_reference_group=PREDICT.get("bias_reference_group"),
    log:
        LAYOUT.log("predict", "{cohort}/predict_cohort"),
    benchmark:
        LAYOUT.benchmark("predict", "{cohort}/predict_cohort")
    threads: config["train"]["threads"]
    resources:
        mem_mb=config["resources"]["train"]["mem_mb"],
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/predict_cohort.py"


if SIMULATED_PREDICT_COHORT is not None:

    rule simulate_predict_cohort:
        output:
            participants=Path(cohort_root(SIMULATED_PREDICT_COHORT), "participants.tsv"),
            maps=[str(stiffness_path(cohort_root(SIMULATED_PREDICT_COHORT), label))
                  for label in simulated_predict_labels()],
            anat=[str(anatomical_path(cohort_root(SIMULATED_PREDICT_COHORT), label))
                  for label in simulated_predict_labels()],
        params:
            options=PREDICT_SIMULATION,
            root=cohort_root(SIMULATED_PREDICT_COHORT),
        log:
            LAYOUT.log("predict", "simulate_predict_cohort"),
        benchmark:
            LAYOUT.benchmark("predict", "simulate_predict_cohort")
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/simulate_predict_cohort.py"


# -- per-subject preprocessing of predict cohorts: the training cohort's rules, reused --------
# Same scripts, package functions and params (hence the same settings) as strip_skull,
# correct_bias, register_to_template and compute_qc; only the paths differ:
# results/predict/<cohort>/preproc/sub-<label>/..., logs/predict/<cohort>/preprocess/...
# The template is the training cohort's (results/template), which the bundle records.

use rule strip_skull as strip_skull_cohort with:
    input:
        unpack(cohort_raw_inputs),
    output:
        mask=COHORT_LAYOUT.subject_native("{subject}", "brain", "mask"),
        reference=COHORT_LAYOUT.subject_native("{subject}", "brain", "reference"),
        info=COHORT_LAYOUT.subject_native("{subject}", "brain", "reference", ".json"),
    log:
        COHORT_LAYOUT.log("preprocess", "strip_skull_sub-{subject}"),
    benchmark:
        COHORT_LAYOUT.benchmark("preprocess", "strip_skull_sub-{subject}")
    group:
        "predict_{cohort}_" + PREPROC_GROUP


use rule correct_bias as correct_bias_cohort with:
    input:
        stiffness=lambda wildcards: cohort_raw_inputs(wildcards)["stiffness"],
        mask=rules.strip_skull_cohort.output.mask,
        reference=rules.strip_skull_cohort.output.reference,
        info=rules.strip_skull_cohort.output.info,
    output:
        stiffness=COHORT_LAYOUT.subject_native("{subject}", "corrected", "stiffness"),
        reference=COHORT_LAYOUT.subject_native("{subject}", "corrected", "reference"),
    log:
        COHORT_LAYOUT.log("preprocess", "correct_bias_sub-{subject}"),
    benchmark:
        COHORT_LAYOUT.benchmark("preprocess", "correct_bias_sub-{subject}")
    group:
        "predict_{cohort}_" + PREPROC_GROUP


use rule register_to_template as register_to_template_cohort with:
    input:
        stiffness=rules.correct_bias_cohort.output.stiffness,
        reference=rules.correct_bias_cohort.output.reference,
        mask=rules.strip_skull_cohort.output.mask,
        info=rules.strip_skull_cohort.output.info,
        template_t1=rules.prepare_template.output.t1,
        template_mask=rules.prepare_template.output.mask,
    output:
        stiffness=COHORT_LAYOUT.subject_mni("{subject}", "preproc", "stiffness"),
        mask=COHORT_LAYOUT.subject_mni("{subject}", "brain", "mask"),
        transform=COHORT_LAYOUT.subject_transform("{subject}"),
        reference=COHORT_LAYOUT.subject_mni("{subject}", "preproc", "reference"),
    log:
        COHORT_LAYOUT.log("preprocess", "register_to_template_sub-{subject}"),
    benchmark:
        COHORT_LAYOUT.benchmark("preprocess", "register_to_template_sub-{subject}")
    group:
        "predict_{cohort}_" + PREPROC_GROUP


use rule compute_qc as compute_qc_cohort with:
    input:
        stiffness=rules.register_to_template_cohort.output.stiffness,
        mask=rules.register_to_template_cohort.output.mask,
        reference=rules.register_to_template_cohort.output.reference,
        info=rules.strip_skull_cohort.output.info,
        template_t1=rules.prepare_template.output.t1,
        template_mask=rules.prepare_template.output.mask,
    output:
        metrics=COHORT_LAYOUT.subject_qc("{subject}", ".json"),
        figure=COHORT_LAYOUT.subject_qc("{subject}", ".png"),
    log:
        COHORT_LAYOUT.log("preprocess", "compute_qc_sub-{subject}"),
    benchmark:
        COHORT_LAYOUT.benchmark("preprocess", "compute_qc_sub-{subject}")
    group:
        "predict_{cohort}_" + PREPROC_GROUP
