"""Rules tabulate_qc and tabulate_pretrain_qc: a cohort's QC table, failures flagged
(brainage.qc)."""

from brainage.logs import log_to_file
from brainage.qc import tabulate_qc

log_to_file(snakemake.log[0])
tabulate_qc(snakemake.input.metrics, snakemake.input.participants, snakemake.output.table,
            minimums=snakemake.params.minimums,
            modalities=snakemake.params.modalities)
