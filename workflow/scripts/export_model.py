"""Rule export_model: one trained grid cell -> model bundle (brainage.predict.export_model)."""

from brainage.logs import log_to_file
from brainage.predict import export_model

log_to_file(snakemake.log[0])
export_model(snakemake.params.split_dir, snakemake.input.encoder, snakemake.params.settings,
             bundle_dir=snakemake.params.bundle_dir, name=snakemake.params.name,
             predictions_path=snakemake.input.predictions, metrics_path=snakemake.input.metrics,
             template_t1=snakemake.input.template_t1,
             template_mask=snakemake.input.template_mask,
             preprocessing=snakemake.params.preprocessing, bias_fit=snakemake.params.bias_fit)
