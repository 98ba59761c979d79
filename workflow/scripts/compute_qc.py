"""Rule compute_qc: QC metrics (JSON) and three orthogonal views (PNG) of one subject."""

from brainage.logs import log_to_file
from brainage.qc import compute_qc

log_to_file(snakemake.log[0])
compute_qc(snakemake.input.stiffness, snakemake.input.mask, snakemake.input.reference,
           snakemake.input.info, snakemake.input.template_t1, snakemake.input.template_mask,
           snakemake.output.metrics, snakemake.output.figure,
           subject=snakemake.wildcards.subject)
