"""Rules strip_skull and correct_and_register*: one job of a subject's preprocessing chain
(brainage.preprocess.chain.run_job; params.job names the job)."""

from brainage.logs import log_to_file
from brainage.modalities import mre_maps
from brainage.preprocess.chain import run_job

log_to_file(snakemake.log[0])
modalities = snakemake.params.modalities
run_job(snakemake.params.job, snakemake.params.files,
        {kind: snakemake.input[kind] for kind in (*mre_maps(modalities), "anat")
         if kind in snakemake.input.keys()},
        template_t1=snakemake.input.get("template_t1"),
        template_mask=snakemake.input.get("template_mask"),
        options=snakemake.params.options, subject=snakemake.wildcards.subject,
        modalities=modalities)
