"""Rule evaluate_encoder: read-out and test metrics of one cell (brainage.evaluate)."""

from brainage.evaluate import evaluate_encoder
from brainage.logs import log_to_file

log_to_file(snakemake.log[0])
evaluate_encoder(snakemake.params.split_dir, snakemake.input.features or None,
                 snakemake.params.settings,
                 metrics_path=snakemake.output.metrics,
                 predictions_path=snakemake.output.predictions)
