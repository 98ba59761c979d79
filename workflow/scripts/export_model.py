"""Rule export_model: one evaluated grid cell -> model bundle (brainage.export)."""

from pathlib import Path

from brainage.export import export_model
from brainage.logs import log_to_file

log_to_file(snakemake.log[0])
export_model(Path(snakemake.input.metrics).parent, snakemake.input.encoder,
             snakemake.input.stats, snakemake.params.settings,
             bundle_dir=snakemake.params.bundle_dir, name=snakemake.params.name,
             template_t1=snakemake.input.template_t1,
             template_mask=snakemake.input.template_mask,
             preprocessing=snakemake.params.preprocessing, bias_fit=snakemake.params.bias_fit,
             qc_table=snakemake.input.qc_table)
