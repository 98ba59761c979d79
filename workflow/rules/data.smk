# The built-in demo datasets: the simulated multi-study MRE cohort (dataset.simulate), a
# checkpoint so that its participants table and images are read and checked once the
# simulation has written them (its subject ids alone follow from the options:
# planned_participants in common.smk); and the simulated
# cohort a trained model is applied to (predict.simulate), a plain rule because its
# subjects follow from the options alone.


if SIMULATED:

    checkpoint simulate_cohort:
        output:
            participants=Path(DATASET_ROOT) / "participants.tsv",
        log:
            LAYOUT.log("data", "simulate_cohort"),
        benchmark:
            LAYOUT.benchmark("data", "simulate_cohort")
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=grows_per_attempt(4000),
            runtime=30,
        params:
            options=DATASET_SIMULATION,
            root=lambda wildcards, output: Path(output.participants).parent,
        script:
            "../scripts/simulate_cohort.py"


if SIMULATED_PREDICT_COHORT is not None:

    rule simulate_predict_cohort:
        output:
            participants=Path(PREDICT_COHORTS[SIMULATED_PREDICT_COHORT], "participants.tsv"),
            images=[
                path
                for label in simulated_predict_labels()
                for path in simulated_inputs(
                    PREDICT_COHORTS[SIMULATED_PREDICT_COHORT],
                    label,
                    PREPROC_MODALITIES[LAYOUT.cohort_preproc(SIMULATED_PREDICT_COHORT)],
                ).values()
            ],
        log:
            LAYOUT.log("data", "simulate_predict_cohort"),
        benchmark:
            LAYOUT.benchmark("data", "simulate_predict_cohort")
        conda:
            "../../envs/preprocess.yaml"
        resources:
            mem_mb=grows_per_attempt(4000),
            runtime=30,
        params:
            options=PREDICT_SIMULATION,
            root=lambda wildcards, output: Path(output.participants).parent,
        script:
            "../scripts/simulate_cohort.py"
