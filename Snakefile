# brainage: brain age from MR-elastography stiffness maps with contrastive learning.
# Stages: data -> preprocess -> normalise -> [pretrain ->] train -> aggregate (tables, figures) -> predict.
# Configuration: config/config.yaml (validated by workflow/brainage/schemas/config.schema.yaml).

from pathlib import Path

from snakemake.utils import min_version

# 9.17: the first release without the core leak of snakemake#3913 (pyproject.toml)
min_version("9.17")


# The demo, unless --configfile names other files: those are then the whole config and
# keys they omit take the schema's defaults (the paper's network and losses; no
# pretraining or search: config/paper.yaml is the whole protocol). Merging them onto the
# demo would leak its experiments into every other run. Absolute, so that
# `--directory elsewhere` works.
if not workflow.overwrite_configfiles:

    configfile: Path(workflow.basedir) / "config" / "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/normalise.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/predict.smk"


rule all:
    default_target: True
    input:
        all_targets,


# Snakemake shows a job's log only when the job fails: name the warnings that the jobs of
# this run logged (a subject that failed QC, a map with holes) after its summary, through
# Snakemake's logger: into the run's .snakemake/log file too, not the terminal alone.
onsuccess:
    say_job_warnings(
        LAYOUT.logs,
        RUN_STARTED,
        emit=snakemake_logger.warning,
        written_since_ns=RUN_STARTED_ON_DISK,
        run_id=RUN_ID,
    )


onerror:
    say_job_warnings(
        LAYOUT.logs,
        RUN_STARTED,
        emit=snakemake_logger.warning,
        written_since_ns=RUN_STARTED_ON_DISK,
        run_id=RUN_ID,
    )
