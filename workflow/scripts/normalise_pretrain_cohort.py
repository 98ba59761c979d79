"""Rule normalise_pretrain_cohort: a pretraining cohort's z-normalised T1w images, with
its training and validation subjects (brainage.normalise)."""

from brainage.logs import log_to_file
from brainage.normalise import normalise_dataset

log_to_file(snakemake.log[0])
normalise_dataset(snakemake.input.maps, snakemake.input.participants, snakemake.input.qc,
                  snakemake.input.template_mask, snakemake.output.images,
                  snakemake.output.participants, snakemake.output.stats,
                  split="holdout", split_settings=snakemake.params.split_settings,
                  exclude_failed=snakemake.params.exclude_failed, modalities=["T1w"],
                  eval_subset="validation", **snakemake.params.normalise)
