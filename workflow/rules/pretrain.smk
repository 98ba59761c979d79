# Stage pretrain (docs/method.md, "Pretraining"): each run of config pretrain trains an
# encoder on a T1w cohort before grid cells with model.init pretrained:<name> fine-tune it.
# A BIDS-like or simulated cohort goes through the same per-subject chain as the stiffness
# maps (preprocess.smk, preproc folder pretrain/<name>/preproc), then its own QC table and a
# normalisation whose statistics come from its training subjects (all its subjects under
# normalise.scope: all); the held-out
# validation subjects measure the encoder with the grid's read-out (metrics.json). The
# training job is one process per GPU started by torchrun (several nodes through srun),
# resumable after preemption like a cell's (checkpoint.pt is not an output: train.smk says
# why).


for simulated_run in PRETRAIN_SIMULATED:

    rule:
        name:
            f"simulate_pretrain_cohort_{simulated_run}"
        output:
            participants=Path(LAYOUT.pretrain_source(simulated_run), "participants.tsv"),
            images=[
                simulated_inputs(LAYOUT.pretrain_source(simulated_run), label, ("T1w",))["anat"]
                for label in pretrain_subjects(simulated_run)
            ],
        log:
            LAYOUT.log("pretrain", f"{simulated_run}/simulate_pretrain_cohort"),
        benchmark:
            LAYOUT.benchmark("pretrain", f"{simulated_run}/simulate_pretrain_cohort")
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=grows_per_attempt(4000),
            runtime=30,
        params:
            n_subjects=PRETRAIN[simulated_run]["source"]["n_subjects"],
            seed=PRETRAIN[simulated_run]["source"]["seed"],
            root=lambda wildcards, output: Path(output.participants).parent,
        script:
            "../scripts/simulate_pretrain_cohort.py"


rule tabulate_pretrain_qc:
    input:
        metrics=pretrain_subject_files("qc_json"),
        participants=pretrain_participants,
    output:
        table=LAYOUT.pretrain_file("{pretrain}", "qc.tsv"),
    log:
        LAYOUT.log("pretrain", "{pretrain}/tabulate_pretrain_qc"),
    benchmark:
        LAYOUT.benchmark("pretrain", "{pretrain}/tabulate_pretrain_qc")
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=grows_per_attempt(1000),
        runtime=10,
    params:
        minimums=thresholds(config["qc"]),
        modalities=("T1w",),
    script:
        "../scripts/tabulate_qc.py"


rule normalise_pretrain_cohort:
    input:
        maps=pretrain_subject_files("registered_T1w"),
        qc=qc_input(LAYOUT.pretrain_file("{pretrain}", "qc.tsv"), pretrain_subject_files("qc_json")),
        participants=pretrain_participants,
        template_mask=LAYOUT.template("brain_mask"),
    output:
        images=LAYOUT.pretrain_split_file("{pretrain}", "images.npy"),
        participants=LAYOUT.pretrain_split_file("{pretrain}", "participants.tsv"),
        stats=LAYOUT.pretrain_split_file("{pretrain}", "stats.json"),
    log:
        LAYOUT.log("pretrain", "{pretrain}/normalise_pretrain_cohort"),
    benchmark:
        LAYOUT.benchmark("pretrain", "{pretrain}/normalise_pretrain_cohort")
    wildcard_constraints:
        pretrain=names_pattern(PRETRAIN_CHAIN),
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=grows_per_attempt(8000),
        runtime=120,
    params:
        split_settings=pretrain_split_settings,
        normalise=config["normalise"],
        exclude_failed=config["qc"]["exclude_failed"],
    script:
        "../scripts/normalise_pretrain_cohort.py"


# The OpenBHB release (quasi-raw: skull-stripped, bias-corrected, affinely in MNI space)
# skips the per-subject chain: its volumes are resampled onto the template grid and
# normalised into the same split folder, with the release's official split.
rule prepare_openbhb:
    input:
        participants=openbhb_participants,
        template_mask=LAYOUT.template("brain_mask"),
    output:
        images=LAYOUT.pretrain_split_file("{pretrain}", "images.npy"),
        participants=LAYOUT.pretrain_split_file("{pretrain}", "participants.tsv"),
        stats=LAYOUT.pretrain_split_file("{pretrain}", "stats.json"),
    log:
        LAYOUT.log("pretrain", "{pretrain}/prepare_openbhb"),
    benchmark:
        LAYOUT.benchmark("pretrain", "{pretrain}/prepare_openbhb")
    wildcard_constraints:
        pretrain=names_pattern(PRETRAIN_OPENBHB),
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=grows_per_attempt(8000),
        runtime=720,
    params:
        root=lambda wildcards: PRETRAIN[wildcards.pretrain]["source"]["root"],
        validation=lambda wildcards: PRETRAIN[wildcards.pretrain]["source"]["openbhb_validation"],
        normalise=config["normalise"],
    script:
        "../scripts/prepare_openbhb.py"


rule pretrain_encoder:
    input:
        images=LAYOUT.pretrain_split_file("{pretrain}", "images.npy"),
        participants=LAYOUT.pretrain_split_file("{pretrain}", "participants.tsv"),
        stats=LAYOUT.pretrain_split_file("{pretrain}", "stats.json"),
    output:
        encoder=LAYOUT.pretrain_file("{pretrain}", "encoder.pt"),
        history=LAYOUT.pretrain_file("{pretrain}", "history.tsv"),
        embeddings=directory(LAYOUT.pretrain_file("{pretrain}", "embeddings")),
        features=LAYOUT.pretrain_file("{pretrain}", "features.npz"),
        settings=LAYOUT.pretrain_file("{pretrain}", "settings.json"),
    log:
        LAYOUT.log("pretrain", "{pretrain}/pretrain_encoder"),
    benchmark:
        LAYOUT.benchmark("pretrain", "{pretrain}/pretrain_encoder")
    conda:
        "../../envs/train.yaml"
    threads: lambda wildcards: pretrain_params(wildcards)["train"]["threads"]
    resources:
        gpu=lambda wildcards: PRETRAIN[wildcards.pretrain]["resources"]["gpus"],
        nodes=lambda wildcards: PRETRAIN[wildcards.pretrain]["resources"]["nodes"],
        mem_mb=lambda wildcards: PRETRAIN[wildcards.pretrain]["resources"]["mem_mb"],
        runtime=lambda wildcards: PRETRAIN[wildcards.pretrain]["resources"]["runtime_min"],
    params:
        # what the training reads (brainage.train.read_settings), as one shell word: a
        # change reruns the run and then every cell that fine-tunes from it
        settings=pretrain_settings_argument,
        split_dir=lambda wildcards: LAYOUT.pretrain_split_dir(wildcards.pretrain),
        checkpoint=lambda wildcards: LAYOUT.pretrain_file(wildcards.pretrain, "checkpoint.pt"),
    shell:
        "printf '%s\\n' {params.settings} > {output.settings} && "
        'PYTHONPATH="$BRAINAGE_PACKAGE_DIR"${{PYTHONPATH:+:$PYTHONPATH}}'
        ' "$BRAINAGE_TRAINING_PYTHON" -m brainage.launch'
        " --gpus {resources.gpu} --nodes {resources.nodes} --"
        " --split-dir {params.split_dir} --settings {output.settings}"
        " --encoder {output.encoder} --history {output.history}"
        " --embeddings {output.embeddings} --features {output.features}"
        " --checkpoint {params.checkpoint} --log {log}"


rule evaluate_pretrained_encoder:
    input:
        images=LAYOUT.pretrain_split_file("{pretrain}", "images.npy"),
        participants=LAYOUT.pretrain_split_file("{pretrain}", "participants.tsv"),
        stats=LAYOUT.pretrain_split_file("{pretrain}", "stats.json"),
        features=LAYOUT.pretrain_file("{pretrain}", "features.npz"),
    output:
        metrics=LAYOUT.pretrain_file("{pretrain}", "metrics.json"),
        predictions=LAYOUT.pretrain_file("{pretrain}", "predictions.tsv"),
        readout=LAYOUT.pretrain_file("{pretrain}", "readout.npz"),
        readout_description=LAYOUT.pretrain_file("{pretrain}", "readout.json"),
    log:
        LAYOUT.log("pretrain", "{pretrain}/evaluate_pretrained_encoder"),
    benchmark:
        LAYOUT.benchmark("pretrain", "{pretrain}/evaluate_pretrained_encoder")
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=grows_per_attempt(config["resources"]["evaluate"]["mem_mb"]),
        runtime=config["resources"]["evaluate"]["runtime_min"],
    params:
        settings=pretrain_params,
        split_dir=lambda wildcards: LAYOUT.pretrain_split_dir(wildcards.pretrain),
    script:
        "../scripts/evaluate_encoder.py"
