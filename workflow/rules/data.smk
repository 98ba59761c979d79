# The built-in demo dataset: a simulated multi-study MRE cohort (dataset.simulate).
# A checkpoint, because the subject list is only known once the cohort exists.

if SIMULATED:

    checkpoint simulate_cohort:
        output:
            participants=Path(DATASET_ROOT) / "participants.tsv",
        params:
            options=config["dataset"]["simulate"],
            root=DATASET_ROOT,
        log:
            LAYOUT.log("data", "simulate_cohort"),
        benchmark:
            LAYOUT.benchmark("data", "simulate_cohort")
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/simulate_cohort.py"
