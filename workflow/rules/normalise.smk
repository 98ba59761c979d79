# Dataset-wide z-normalisation, one job per split (docs/method.md, "Normalisation"): per
# modality (channel) one mean and one sd over the non-zero brain voxels, from the split's
# training subjects by default (normalise.scope: all = the paper's code). Besides tabulate_qc,
# the only preprocessing stage that reads participants.tsv. stats.json is the normalisation
# record every later stage applies (brainage.normalise.apply), the model bundle included.


rule normalise_dataset:
    input:
        maps=lambda wildcards: [
            path
            for label in subjects()
            for path in registered_maps(
                subject_files(LAYOUT, label, TRAINING_PREPROC, MODALITIES), MODALITIES
            ).values()
        ],
        qc=qc_input(LAYOUT.qc_table(), training_qc_files),
        participants=Path(DATASET_ROOT, "participants.tsv"),
        template_mask=LAYOUT.template("brain_mask"),
    output:
        images=LAYOUT.split_file("{split}", "images.npy"),
        participants=LAYOUT.split_file("{split}", "participants.tsv"),
        stats=LAYOUT.split_file("{split}", "stats.json"),
    log:
        LAYOUT.log("dataset", "{split}/normalise_dataset"),
    benchmark:
        LAYOUT.benchmark("dataset", "{split}/normalise_dataset")
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=grows_per_attempt(2000),
        runtime=60,
    params:
        split_settings=config["split"],
        normalise=config["normalise"],
        exclude_failed=config["qc"]["exclude_failed"],
        modalities=MODALITIES,
    script:
        "../scripts/normalise_dataset.py"
