"""Rule prepare_template: the template T1 and brain mask at 2 mm, into the training
cohort's derivative dataset (results/preproc/tpl-<space>/)."""

from brainage.logs import log_to_file
from brainage.preprocess import prepare_template

log_to_file(snakemake.log[0])
template = snakemake.params.template
prepare_template(snakemake.output.t1, snakemake.output.mask, source=template["source"],
                 t1=template.get("t1"), mask=template.get("mask"))
