"""Rule register_to_template: ANTs affine to MNI152 2 mm; warp map, mask and reference."""

from brainage.logs import log_to_file
from brainage.preprocess import register_to_template

log_to_file(snakemake.log[0])
register_to_template(
    snakemake.input.stiffness, snakemake.input.mask, snakemake.input.reference,
    snakemake.input.info, snakemake.input.template_t1, snakemake.input.template_mask,
    snakemake.output.stiffness, snakemake.output.mask, snakemake.output.transform,
    snakemake.output.reference, deterministic=snakemake.params.deterministic,
    threads=snakemake.threads, subject=snakemake.wildcards.subject)
