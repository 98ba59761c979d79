# Stage predict: brain age for new subjects (config section predict).
#
#   predict          target rule: `snakemake predict` = export_model + every cohort
#   export_model     the grid cell predict.model -> results/models/<name>/: its encoder, the
#                    read-out evaluate_encoder saved, the split's normalisation record, the
#                    template record (brainage.export; copies, fits nothing)
#   predict_cohort   each cohort of predict.cohorts, preprocessed by the same chain of rules
#                    as the training cohort (preprocess.smk, {preproc} =
#                    predict/<cohort>/preproc): normalise with the bundle's TRAINING
#                    record, embed, read out, gap -> results/predict/<cohort>/
#                    {predictions,summary}.tsv, gap_by_group.png, provenance.json


rule predict:
    """`snakemake predict`: export the model bundle and predict every configured cohort."""
    input:
        BUNDLE_FILES,
        predict_targets(),
    localrule: True


rule export_model:
    input:
        encoder=exported_cell_file("encoder.pt"),
        metrics=exported_cell_file("metrics.json"),
        readout=exported_cell_file("readout.npz"),
        readout_description=exported_cell_file("readout.json"),
        stats=lambda wildcards: LAYOUT.split_file(exported_cell()[0], "stats.json"),
        template_t1=LAYOUT.template("T1w"),
        template_mask=LAYOUT.template("brain_mask"),
        # how the training subjects were registered, so a cohort registered otherwise is told
        qc_table=LAYOUT.qc_table(),
    output:
        BUNDLE_FILES,
    log:
        LAYOUT.log("predict", f"export_model_{BUNDLE_NAME}"),
    benchmark:
        LAYOUT.benchmark("predict", f"export_model_{BUNDLE_NAME}")
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=grows_per_attempt(2000),
        runtime=10,
    params:
        settings=lambda wildcards: cell_settings(config, *exported_cell()[1:]),
        bundle_dir=lambda wildcards, output: Path(output[0]).parent,
        name=BUNDLE_NAME,
        preprocessing=preprocessing_record(config),
        bias_fit=PREDICT["bias_fit"],
    script:
        "../scripts/export_model.py"


rule predict_cohort:
    input:
        bundle=BUNDLE_FILES,
        # ages and groups enter the gaps and the summary: editing them reruns the prediction
        participants=lambda wildcards: Path(PREDICT_COHORTS[wildcards.cohort], "participants.tsv"),
        maps=lambda wildcards: [
            path for maps in cohort_maps(wildcards).values() for path in maps.values()
        ],
        qc=cohort_subject_files("qc_json"),
        description=lambda wildcards: LAYOUT.preproc_description(
            LAYOUT.cohort_preproc(wildcards.cohort)
        ),
    output:
        predictions=LAYOUT.prediction("{cohort}", "predictions.tsv"),
        summary=LAYOUT.prediction("{cohort}", "summary.tsv"),
        figure=LAYOUT.prediction("{cohort}", "gap_by_group.png"),
        provenance=LAYOUT.prediction("{cohort}", "provenance.json"),
    log:
        LAYOUT.log("predict", "{cohort}/predict_cohort"),
    benchmark:
        LAYOUT.benchmark("predict", "{cohort}/predict_cohort")
    conda:
        "../../envs/train.yaml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=grows_per_attempt(config["resources"]["train"]["mem_mb"]),
    params:
        bundle_dir=lambda wildcards, input: Path(input.bundle[0]).parent,
        dataset_root=lambda wildcards, input: Path(input.participants).parent,
        labels=lambda wildcards: cohort_subjects(wildcards.cohort),
        maps=cohort_maps,
        qc_thresholds=thresholds(config["qc"]),
        bias_reference_group=PREDICT["bias_reference_group"],
        seen_in_training=lambda wildcards: seen_in_training(wildcards.cohort),
    script:
        "../scripts/predict_cohort.py"
