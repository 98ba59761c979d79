"""Rule tabulate_qc: the training cohort's QC table, failures flagged (brainage.qc)."""

from brainage.logs import log_to_file
from brainage.qc import tabulate_qc

log_to_file(snakemake.log[0])
tabulate_qc(snakemake.input.metrics, snakemake.input.participants, snakemake.output.table,
            minimums=snakemake.params.minimums)
