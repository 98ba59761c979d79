"""Rules strip_skull, correct_bias, register_to_template, compute_qc: one step of a
subject's preprocessing chain (brainage.preprocess.chain.run_step; the rule is the step)."""

from brainage.logs import log_to_file
from brainage.preprocess.chain import run_step

log_to_file(snakemake.log[0])
run_step(snakemake.rule, snakemake.params.files,
         {kind: snakemake.input[kind] for kind in ("stiffness", "anat")
          if kind in snakemake.input.keys()},
         template_t1=snakemake.input.get("template_t1"),
         template_mask=snakemake.input.get("template_mask"),
         options=snakemake.params.options, subject=snakemake.wildcards.subject)
