"""Rule normalise_dataset: one split's z-normalised images, participants and statistics."""

from brainage.logs import log_to_file
from brainage.normalise import normalise_dataset

log_to_file(snakemake.log[0])
normalise_dataset(snakemake.input.maps, snakemake.input.participants, snakemake.input.qc,
                  snakemake.input.template_mask, snakemake.output.images,
                  snakemake.output.participants, snakemake.output.stats,
                  split=snakemake.wildcards.split, split_settings=snakemake.params.split_settings,
                  exclude_failed=snakemake.params.exclude_failed,
                  modalities=snakemake.params.modalities, **snakemake.params.normalise)
