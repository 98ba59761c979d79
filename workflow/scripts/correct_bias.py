"""Rule correct_bias: NaN cleaning and N4 inside the brain (map and reference)."""

from brainage.logs import log_to_file
from brainage.preprocess import correct_bias

log_to_file(snakemake.log[0])
correct_bias(snakemake.input.stiffness, snakemake.input.mask, snakemake.input.reference,
             snakemake.input.info, snakemake.output.stiffness, snakemake.output.reference,
             n4=snakemake.params.n4, max_nan_fraction=snakemake.params.max_nan_fraction,
             threads=snakemake.threads, deterministic=snakemake.params.deterministic,
             subject=snakemake.wildcards.subject)
