"""Rule tabulate_qc: the dataset's QC table and overview figure, failures flagged."""

from brainage.logs import log_to_file
from brainage.qc import tabulate_qc

log_to_file(snakemake.log[0])
tabulate_qc(snakemake.input.metrics, snakemake.input.participants, snakemake.output.table,
            snakemake.output.figure, **snakemake.params.thresholds)
