# Stage aggregate: the paper's tables and figures from every grid cell.
# Which files exist is decided by brainage.report.report_names(config) alone: an
# experiment that is not enabled in the config has no table and no figure.
# `snakemake --report results/report.html` embeds them with the captions in workflow/report/.

from brainage.report import (
    ablation_experiments,
    ablation_figure_name,
    experiment_settings,
    focus_cell,
    report_names,
)

REPORT_NAMES = report_names(config)
# Every setting of every variant (validated once): params of both rules, so editing a
# setting remakes the tables and figures along with the cells it reruns.
EXPERIMENT_SETTINGS = experiment_settings(config)
TABLE_EXTENSIONS = (".csv", ".md", ".tex")
CAPTIONS = Path(workflow.basedir) / "workflow" / "report"


def report_targets():
    """Every table (.csv, .md, .tex) and figure (.png) of this configuration."""
    tables = [LAYOUT.table(name, ext) for name in REPORT_NAMES["tables"]
              for ext in TABLE_EXTENSIONS]
    return tables + [LAYOUT.figure(name) for name in REPORT_NAMES["figures"]]


def _caption(kind, name):
    """Caption of a table or figure (kind: tables, figures); other experiments' share one."""
    own = CAPTIONS / kind / f"{name}.rst"
    return str(own if own.is_file() else CAPTIONS / kind / "ablation.rst")


def _table_outputs():
    outputs = []
    for name in REPORT_NAMES["tables"]:
        for ext in TABLE_EXTENSIONS:
            path = LAYOUT.table(name, ext)
            # the CSV is the table shown in the report; .md/.tex are for papers and READMEs
            outputs.append(report(path, caption=_caption("tables", name), category="Tables",
                                  labels={"table": name}) if ext == ".csv" else path)
    return outputs


def _figure_subcategory(name):
    if name in {ablation_figure_name(e) for e in ablation_experiments(config)}:
        return "Ablations"
    if name in ("fig5_umap", "predicted_vs_true", "search_trials"):
        return "Model"
    return "Cohort and preprocessing"


def _figure_outputs():
    return [report(LAYOUT.figure(name), caption=_caption("figures", name), category="Figures",
                   subcategory=_figure_subcategory(name), labels={"figure": name})
            for name in REPORT_NAMES["figures"]]


def _cohort_split():
    """The split whose participants.tsv describes the cohort (every split lists everyone)."""
    return split_names()[0]


def _focus_files(name):
    """A file of the focus cell (UMAP, predicted vs true), for every split; its training
    outputs (embeddings) from the cell that trained its encoder."""
    cell = focus_cell(config)
    if cell is None:
        return []
    return [cell_output(split, *cell, name) for split in split_names()]


def _search_trials(wildcards):
    if not config["search"]["enabled"]:
        return []
    return [LAYOUT.search_file(split, "trials.tsv") for split in split_names()]


def _registered_maps():
    return {f"sub-{subject}": LAYOUT.subject_mni(subject, "preproc", "stiffness")
            for subject in subjects()}


def _figure_inputs(wildcards):
    inputs = {
        "metrics": grid_targets("metrics.json"),
        "participants": LAYOUT.split_file(_cohort_split(), "participants.tsv"),
        "qc": LAYOUT.qc_table(),
        "maps": list(_registered_maps().values()),
        "predictions": _focus_files("predictions.tsv"),
        "search": _search_trials(wildcards),
    }
    embeddings = _focus_files("embeddings")
    if embeddings:
        inputs["embeddings"] = embeddings[0]
    return inputs


def _focus_label():
    cell = focus_cell(config)
    return "" if cell is None else "{}/{}/seed-{}".format(*cell)


rule make_tables:
    input:
        metrics=lambda wildcards: grid_targets("metrics.json"),
        participants=lambda wildcards: LAYOUT.split_file(_cohort_split(), "participants.tsv"),
        search=_search_trials,
    output:
        _table_outputs(),
    params:
        settings=EXPERIMENT_SETTINGS,
        stems={name: LAYOUT.table(name, "") for name in REPORT_NAMES["tables"]},
    log:
        LAYOUT.log("aggregate", "make_tables"),
    benchmark:
        LAYOUT.benchmark("aggregate", "make_tables")
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=2000,
        runtime=15,
    script:
        "../scripts/make_tables.py"


rule make_figures:
    input:
        unpack(_figure_inputs),
    output:
        _figure_outputs(),
    params:
        settings=EXPERIMENT_SETTINGS,
        maps=lambda wildcards: _registered_maps(),
        focus=_focus_label(),
        qc_thresholds={key: config["qc"][key]
                       for key in ("min_dice", "min_correlation", "min_coverage")},
        paths={name: LAYOUT.figure(name) for name in REPORT_NAMES["figures"]},
    log:
        LAYOUT.log("aggregate", "make_figures"),
    benchmark:
        LAYOUT.benchmark("aggregate", "make_figures")
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=4000,
        runtime=20,
    script:
        "../scripts/make_figures.py"
