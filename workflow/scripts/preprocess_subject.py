"""Rules strip_skull and correct_and_register: one job of a subject's preprocessing chain
(brainage.preprocess.chain.run_job; the rule names the job)."""

from brainage.logs import log_to_file
from brainage.preprocess.chain import run_job

log_to_file(snakemake.log[0])
run_job(snakemake.rule, snakemake.params.files,
        {kind: snakemake.input[kind] for kind in ("stiffness", "anat")
         if kind in snakemake.input.keys()},
        template_t1=snakemake.input.get("template_t1"),
        template_mask=snakemake.input.get("template_mask"),
        options=snakemake.params.options, subject=snakemake.wildcards.subject)
