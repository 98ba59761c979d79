"""Rule make_tables: every table of the configuration (brainage.report.tables.make_tables)."""

from brainage.logs import log_to_file
from brainage.report.tables import make_tables

log_to_file(snakemake.log[0])
make_tables(metrics=list(snakemake.input.metrics), participants=snakemake.input.participants,
            settings=snakemake.params.settings, outputs=snakemake.params.stems,
            search=list(snakemake.input.search), pretraining=snakemake.params.pretraining,
            predictions=list(snakemake.input.predictions))
