# brainage: brain age from MR-elastography stiffness maps with contrastive learning.
# Stages: data -> preprocess -> normalise -> train -> aggregate (tables, figures) -> predict.
# Configuration: config/config.yaml (validated by workflow/schemas/config.schema.yaml).

from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# The defaults (the demo); files given with --configfile are merged on top. Absolute, so
# that `--directory elsewhere` works.
configfile: Path(workflow.basedir) / "config" / "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/normalise.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/predict.smk"


rule all:
    input:
        all_targets,
    default_target: True
