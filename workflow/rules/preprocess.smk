# Per-subject preprocessing (paper section 4.1, METHOD.md section 1): skull stripping,
# N4 bias correction and affine registration to MNI152 at 2 mm, then QC. Logs and
# benchmarks mirror results: logs/preproc/sub-<label>/<rule>.log.
#
# Incremental by design: per-subject rules find their inputs in the dataset folder
# (raw_inputs), never in participants.tsv, and carry in params exactly the options that
# change their result. Adding a study reruns only its subjects (plus the dataset-wide
# rules); changing preprocess.n4 reruns correct_bias and what follows, not strip_skull.

PREPROCESS = config["preprocess"]
PREPROCESS_RESOURCES = config["resources"]["preprocess"]
# One ITK thread when deterministic (bit-identical reruns); otherwise preprocess.threads.
PREPROCESS_THREADS = 1 if PREPROCESS["deterministic"] else PREPROCESS["threads"]
PARTICIPANTS_TSV = str(Path(DATASET_ROOT, "participants.tsv"))


def template_sources(wildcards):
    """The user's template files (template.source: file), so editing them reruns."""
    if config["template"]["source"] == "file":
        return {"t1": config["template"]["t1"], "mask": config["template"]["mask"]}
    return {}


rule prepare_template:
    input:
        unpack(template_sources),
    output:
        t1=LAYOUT.template("T1w"),
        mask=LAYOUT.template("brain_mask"),
    params:
        template=config["template"],
    log:
        LAYOUT.log("template", "prepare_template"),
    benchmark:
        LAYOUT.benchmark("template", "prepare_template")
    threads: 1
    resources:
        mem_mb=PREPROCESS_RESOURCES["mem_mb"],
        runtime=PREPROCESS_RESOURCES["runtime_min"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/prepare_template.py"


rule strip_skull:
    input:
        unpack(raw_inputs),
    output:
        mask=LAYOUT.subject_native("{subject}", "brain", "mask"),
        reference=LAYOUT.subject_native("{subject}", "brain", "reference"),
        info=LAYOUT.subject_native("{subject}", "brain", "reference", ".json"),
    params:
        skullstrip=PREPROCESS["skullstrip"],
        freesurfer_tool=PREPROCESS["freesurfer_tool"],
    log:
        LAYOUT.log("preproc", "sub-{subject}/strip_skull"),
    benchmark:
        LAYOUT.benchmark("preproc", "sub-{subject}/strip_skull")
    group:
        PREPROC_GROUP
    threads: PREPROCESS_THREADS
    resources:
        mem_mb=PREPROCESS_RESOURCES["mem_mb"],
        runtime=PREPROCESS_RESOURCES["runtime_min"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/strip_skull.py"


rule correct_bias:
    input:
        stiffness=lambda wildcards: raw_inputs(wildcards)["stiffness"],
        mask=rules.strip_skull.output.mask,
        reference=rules.strip_skull.output.reference,
        info=rules.strip_skull.output.info,
    output:
        stiffness=LAYOUT.subject_native("{subject}", "corrected", "stiffness"),
        reference=LAYOUT.subject_native("{subject}", "corrected", "reference"),
    params:
        n4=PREPROCESS["n4"],
        max_nan_fraction=PREPROCESS["max_nan_fraction"],
        deterministic=PREPROCESS["deterministic"],
    log:
        LAYOUT.log("preproc", "sub-{subject}/correct_bias"),
    benchmark:
        LAYOUT.benchmark("preproc", "sub-{subject}/correct_bias")
    group:
        PREPROC_GROUP
    threads: PREPROCESS_THREADS
    resources:
        mem_mb=PREPROCESS_RESOURCES["mem_mb"],
        runtime=PREPROCESS_RESOURCES["runtime_min"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/correct_bias.py"


rule register_to_template:
    input:
        stiffness=rules.correct_bias.output.stiffness,
        reference=rules.correct_bias.output.reference,
        mask=rules.strip_skull.output.mask,
        info=rules.strip_skull.output.info,
        template_t1=rules.prepare_template.output.t1,
        template_mask=rules.prepare_template.output.mask,
    output:
        stiffness=LAYOUT.subject_mni("{subject}", "preproc", "stiffness"),
        mask=LAYOUT.subject_mni("{subject}", "brain", "mask"),
        transform=LAYOUT.subject_transform("{subject}"),
        reference=LAYOUT.subject_mni("{subject}", "preproc", "reference"),
    params:
        deterministic=PREPROCESS["deterministic"],
    log:
        LAYOUT.log("preproc", "sub-{subject}/register_to_template"),
    benchmark:
        LAYOUT.benchmark("preproc", "sub-{subject}/register_to_template")
    group:
        PREPROC_GROUP
    threads: PREPROCESS_THREADS
    resources:
        mem_mb=PREPROCESS_RESOURCES["mem_mb"],
        runtime=PREPROCESS_RESOURCES["runtime_min"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/register_to_template.py"


rule compute_qc:
    input:
        stiffness=rules.register_to_template.output.stiffness,
        mask=rules.register_to_template.output.mask,
        reference=rules.register_to_template.output.reference,
        info=rules.strip_skull.output.info,
        template_t1=rules.prepare_template.output.t1,
        template_mask=rules.prepare_template.output.mask,
    output:
        metrics=LAYOUT.subject_qc("{subject}", ".json"),
        figure=LAYOUT.subject_qc("{subject}", ".png"),
    log:
        LAYOUT.log("preproc", "sub-{subject}/compute_qc"),
    benchmark:
        LAYOUT.benchmark("preproc", "sub-{subject}/compute_qc")
    group:
        PREPROC_GROUP
    threads: 1
    resources:
        mem_mb=PREPROCESS_RESOURCES["mem_mb"],
        runtime=PREPROCESS_RESOURCES["runtime_min"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/compute_qc.py"


# Dataset-wide QC: thresholds are applied here only, so changing them reruns this table
# and the normalisation, not the subjects.
rule tabulate_qc:
    input:
        metrics=lambda wildcards: expand(LAYOUT.subject_qc("{subject}", ".json"),
                                         subject=subjects()),
        participants=PARTICIPANTS_TSV,
    output:
        table=LAYOUT.qc_table(),
        figure=LAYOUT.qc_figure(),
    params:
        thresholds={key: config["qc"][key]
                    for key in ("min_dice", "min_correlation", "min_coverage")},
    log:
        LAYOUT.log("qc", "tabulate_qc"),
    benchmark:
        LAYOUT.benchmark("qc", "tabulate_qc")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/tabulate_qc.py"
