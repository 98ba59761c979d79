# Per-subject preprocessing (docs/method.md §1, "Data and preprocessing"): skull stripping (rule
# strip_skull), then N4 bias correction, affine registration to the template at 2 mm and QC
# in one job (rule correct_and_register; brainage.preprocess.chain says why), for every map
# of the cohort's modalities with one mask and one transform (brainage.modalities). One chain of
# rules for every cohort: the wildcard {preproc} is a cohort's preprocessing folder under
# results/ (`preproc` for the training cohort, `predict/<cohort>/preproc` for a cohort a
# model is applied to), each a BIDS-Derivatives dataset. The files come from
# brainage.preprocess.chain.subject_files, which the in-process route
# (python -m brainage.predict run) uses too. Logs and benchmarks mirror results:
# logs/<preproc>/sub-<label>/<rule>.log.
#
# Incremental by design: per-subject rules find their inputs in the dataset folder
# (raw_inputs), never in participants.tsv, and carry in params exactly the options that
# change their result. Adding a study reruns only its subjects (plus the dataset-wide
# rules); changing preprocess.n4 reruns correct_and_register, not strip_skull.


rule prepare_template:
    input:
        unpack(template_sources),
    output:
        t1=TEMPLATE["t1"],
        mask=TEMPLATE["mask"],
    log:
        LAYOUT.log("template", "prepare_template"),
    benchmark:
        LAYOUT.benchmark("template", "prepare_template")
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=grows_per_attempt(PREPROCESS_RESOURCES["mem_mb"]),
        runtime=PREPROCESS_RESOURCES["runtime_min"],
    params:
        template=config["template"],
    script:
        "../scripts/prepare_template.py"


rule describe_preprocessing:
    input:
        template_mask=TEMPLATE["mask"],
    output:
        description=LAYOUT.preproc_description("{preproc}"),
    log:
        LAYOUT.log("{preproc}", "describe_preprocessing"),
    localrule: True
    conda:
        "../../envs/preprocess.yaml"
    params:
        folder=lambda wildcards, output: Path(output.description).parent,
        source=lambda wildcards: PREPROC_ROOTS[wildcards.preproc],
        space=LAYOUT.space,
        version=brainage_version(),
        template=lambda wildcards: wildcards.preproc == TRAINING_PREPROC,
        modalities=preproc_modalities,
        n4=config["preprocess"]["n4"],
    script:
        "../scripts/describe_preprocessing.py"


rule strip_skull:
    input:
        unpack(raw_inputs),
    output:
        mask=SUBJECT["mask"],
        mask_json=SUBJECT["mask_json"],
        reference=SUBJECT["reference"],
        reference_info=SUBJECT["reference_info"],
    log:
        step_log("strip_skull"),
    benchmark:
        step_benchmark("strip_skull")
    group:
        "preprocess_{subject}"
    conda:
        "../../envs/preprocess.yaml"
    threads: step_threads(PREPROCESS)
    resources:
        mem_mb=subject_job_memory(STRIP_SKULL_MEM_MB),
        runtime=PREPROCESS_RESOURCES["runtime_min"],
    params:
        job="strip_skull",
        modalities=preproc_modalities,
        files=concrete_files,
        options=job_options("strip_skull", PREPROCESS),
    script:
        "../scripts/preprocess_subject.py"


# One correct_and_register rule per set of modalities among the cohorts (CHAIN_VARIANTS):
# its outputs name every map of the set. The training cohort's set keeps the plain name;
# another set (a T1w pretraining cohort, a predict cohort for a model that reads fewer
# maps) adds its modalities to the name.
for chain_rule, chain_modalities in CHAIN_VARIANTS.items():

    rule:
        name:
            chain_rule
        input:
            unpack(raw_inputs),
            mask=SUBJECT["mask"],
            reference=SUBJECT["reference"],
            reference_info=SUBJECT["reference_info"],
            template_t1=TEMPLATE["t1"],
            template_mask=TEMPLATE["mask"],
        output:
            **chain_outputs(chain_modalities),
        log:
            step_log("correct_and_register"),
        benchmark:
            step_benchmark("correct_and_register")
        wildcard_constraints:
            preproc=preproc_pattern(chain_modalities),
        group:
            "preprocess_{subject}"
        conda:
            "../../envs/preprocess.yaml"
        threads: step_threads(PREPROCESS)
        resources:
            mem_mb=subject_job_memory(PREPROCESS_RESOURCES["mem_mb"]),
            runtime=PREPROCESS_RESOURCES["runtime_min"],
        params:
            job="correct_and_register",
            modalities=chain_modalities,
            files=concrete_files,
            options=job_options("correct_and_register", PREPROCESS),
        script:
            "../scripts/preprocess_subject.py"


# Dataset-wide QC of the training cohort: the thresholds judge its subjects here (and each
# new cohort's in predict_cohort), so changing one reruns the QC tables, the figures, the
# model bundle's export and the predictions, not the subjects; the normalisation reads
# this table only when qc.exclude_failed drops the failing subjects (qc_input).
rule tabulate_qc:
    input:
        metrics=training_qc_files,
        participants=Path(DATASET_ROOT, "participants.tsv"),
    output:
        table=LAYOUT.qc_table(),
    log:
        LAYOUT.log("qc", "tabulate_qc"),
    benchmark:
        LAYOUT.benchmark("qc", "tabulate_qc")
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=grows_per_attempt(1000),
        runtime=10,
    params:
        minimums=thresholds(config["qc"]),
        modalities=MODALITIES,
    script:
        "../scripts/tabulate_qc.py"
