# Stage aggregate: the paper's tables and figures from every grid cell.
# Which files exist is decided by brainage.report.targets.report_names(config) alone: an
# experiment that is not enabled in the config has no table and no figure. Each UMAP figure
# is a job of its own (Fig. 5: plot_embeddings, once the focus cell is trained; each
# pretraining run: plot_pretraining_embeddings), so numba's compilation overlaps training.
# `snakemake --report results/report.html` embeds them with the captions in workflow/report/.


rule make_tables:
    input:
        metrics=lambda wildcards: grid_targets("metrics.json"),
        # Table 3b's comparison over test subjects
        predictions=lambda wildcards: grid_targets("predictions.tsv"),
        participants=lambda wildcards: LAYOUT.split_file(_cohort_split(), "participants.tsv"),
        search=_search_trials,
        pretraining=lambda wildcards: pretraining_report_files(),
    output:
        _table_outputs(),
    log:
        LAYOUT.log("aggregate", "make_tables"),
    benchmark:
        LAYOUT.benchmark("aggregate", "make_tables")
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=grows_per_attempt(2000),
        runtime=15,
    params:
        settings=EXPERIMENT_SETTINGS,
        stems={name: LAYOUT.table(name, "") for name in REPORT_NAMES["tables"]},
        pretraining=PRETRAINING_REPORT,
    script:
        "../scripts/make_tables.py"


rule make_figures:
    input:
        unpack(_figure_inputs),
    output:
        _figure_outputs(DRAWN_TOGETHER),
    log:
        LAYOUT.log("aggregate", "make_figures"),
    benchmark:
        LAYOUT.benchmark("aggregate", "make_figures")
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=grows_per_attempt(4000),
        runtime=20,
    params:
        settings=EXPERIMENT_SETTINGS,
        # the modality of the maps (Figs. 7 and 8 label it): not always the stiffness
        map_name=grid_modality(MODALITIES),
        focus=_focus_label(),
        qc_thresholds=thresholds(config["qc"]),
        histories=lambda wildcards: _histories(),
        paths={name: LAYOUT.figure(name) for name in DRAWN_TOGETHER},
        pretraining=PRETRAINING_REPORT,
    script:
        "../scripts/make_figures.py"


# Fig. 5 when the config draws it (brainage.report.targets.report_names): requested
# through report_targets() only then.
rule plot_embeddings:
    input:
        embeddings=lambda wildcards: _focus_files("embeddings")[0],
    output:
        _figure_outputs([EMBEDDINGS_FIGURE]),
    log:
        LAYOUT.log("aggregate", "plot_embeddings"),
    benchmark:
        LAYOUT.benchmark("aggregate", "plot_embeddings")
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=grows_per_attempt(2000),
        runtime=20,
    params:
        label=_focus_label(),
        title="Fig. 5",
        setting="train.embed_epochs",
    script:
        "../scripts/plot_embeddings.py"


# Each pretraining run's features by epoch, training and validation subjects of its cohort.
rule plot_pretraining_embeddings:
    input:
        embeddings=LAYOUT.pretrain_file("{pretrain}", "embeddings"),
    output:
        in_report(
            LAYOUT.figure(pretraining_embeddings_figure("{pretrain}")),
            caption=_caption("figures", "pretraining_umap"),
            category="Figures",
            subcategory="Pretraining",
            labels={"figure": pretraining_embeddings_figure("{pretrain}")},
        ),
    log:
        LAYOUT.log("aggregate", "plot_pretraining_embeddings_{pretrain}"),
    benchmark:
        LAYOUT.benchmark("aggregate", "plot_pretraining_embeddings_{pretrain}")
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=grows_per_attempt(2000),
        runtime=20,
    params:
        label=lambda wildcards: f"pretraining run {wildcards.pretrain}",
        title="Pretraining",
        setting=lambda wildcards: f"pretrain.{wildcards.pretrain}.train.embed_epochs",
    script:
        "../scripts/plot_embeddings.py"
