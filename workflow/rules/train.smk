# Stage train: one job per grid cell (split x experiment x variant x seed) trains the
# encoder and saves the final encoder's features of every subject (features.npz); a second,
# a CPU job, fits the read-out on those features and saves it (readout.npz/.json, which the
# model export copies); optionally a random search per split (config search), whose
# best.json is an input of the cells with loss.nn_from_search (they train with its choice).
#
# Resume after preemption: train_encoder writes its resume state to checkpoint.pt in the
# cell folder after every epoch. The file is deliberately NOT an output: Snakemake deletes
# the outputs of a failed or killed job (and of an incomplete one on --rerun-incomplete),
# which would throw the resume state away. As an undeclared file it survives, so a job
# that SLURM requeues (or that is simply started again) continues from the last finished
# epoch; brainage.train ignores a checkpoint whose settings or split differ, and deletes
# it once encoder.pt is written. The embeddings written before the kill are kept inside
# the checkpoint too, because Snakemake removes the declared embeddings folder.


rule train_encoder:
    input:
        **SPLIT_INPUTS,
        # model.init pretrained:<name>: the run's encoder (pretrain.smk); or model.init_checkpoint
        starting_checkpoint=cell_starting_checkpoint,
        # loss.nn_from_search: the split's random-search result (nn_final, nn_step)
        search_result=search_result,
    output:
        encoder=LAYOUT.cell_file(*CELL, "encoder.pt"),
        history=LAYOUT.cell_file(*CELL, "history.tsv"),
        embeddings=directory(LAYOUT.cell_file(*CELL, "embeddings")),
        features=LAYOUT.cell_file(*CELL, "features.npz"),
    log:
        LAYOUT.log("train", f"{CELL_NAME}/train_encoder"),
    benchmark:
        LAYOUT.benchmark("train", f"{CELL_NAME}/train_encoder")
    conda:
        "../../envs/train.yaml"
    threads: cell_threads
    resources:
        gpu=config["resources"]["train"]["gpu"],
        mem_mb=grows_per_attempt(config["resources"]["train"]["mem_mb"]),
        runtime=config["resources"]["train"]["runtime_min"],
    params:
        settings=training_params,
        split_dir=lambda wildcards: LAYOUT.split_dir(wildcards.split),
        checkpoint=cell_file("checkpoint.pt"),
    script:
        "../scripts/train_encoder.py"


rule evaluate_encoder:
    input:
        **SPLIT_INPUTS,
        features=shared_features,
    output:
        metrics=LAYOUT.cell_file(*CELL, "metrics.json"),
        predictions=LAYOUT.cell_file(*CELL, "predictions.tsv"),
        readout=LAYOUT.cell_file(*CELL, "readout.npz"),
        readout_description=LAYOUT.cell_file(*CELL, "readout.json"),
    log:
        LAYOUT.log("train", f"{CELL_NAME}/evaluate_encoder"),
    benchmark:
        LAYOUT.benchmark("train", f"{CELL_NAME}/evaluate_encoder")
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        # A read-out on saved features (or, for the voxel baselines, on the split's
        # images): a CPU job, no GPU.
        mem_mb=grows_per_attempt(config["resources"]["evaluate"]["mem_mb"]),
        runtime=config["resources"]["evaluate"]["runtime_min"],
    params:
        settings=cell_params,
        split_dir=lambda wildcards: LAYOUT.split_dir(wildcards.split),
    script:
        "../scripts/evaluate_encoder.py"


if config["search"]["enabled"]:

    rule search_hyperparameters:
        input:
            **SPLIT_INPUTS,
            # the trials start where the cells do (model.init pretrained:<run>, init_checkpoint)
            starting_checkpoint=lambda wildcards: search_starting_checkpoint(),
        output:
            trials=LAYOUT.search_file("{split}", "trials.tsv"),
            best=LAYOUT.search_file("{split}", "best.json"),
        log:
            LAYOUT.log("train", "{split}/search_hyperparameters"),
        benchmark:
            LAYOUT.benchmark("train", "{split}/search_hyperparameters")
        conda:
            "../../envs/train.yaml"
        threads: config["train"]["threads"]
        resources:
            gpu=config["resources"]["train"]["gpu"],
            mem_mb=grows_per_attempt(config["resources"]["train"]["mem_mb"]),
            runtime=config["resources"]["search"]["runtime_min"],
        params:
            settings=lambda wildcards: search_params(),
            search=config["search"],
            split_dir=lambda wildcards: LAYOUT.split_dir(wildcards.split),
            # Per-trial folders (each resumable, like a grid cell) are not outputs either.
            out_dir=lambda wildcards: LAYOUT.search_dir(wildcards.split),
        script:
            "../scripts/search_hyperparameters.py"
