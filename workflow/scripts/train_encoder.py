"""Rule train_encoder: train one grid cell's encoder (brainage.train.train_encoder)."""

from brainage.logs import log_to_file
from brainage.train import train_encoder

log_to_file(snakemake.log[0])
train_encoder(snakemake.params.split_dir, snakemake.params.settings,
              encoder_path=snakemake.output.encoder, history_path=snakemake.output.history,
              embeddings_dir=snakemake.output.embeddings,
              checkpoint_path=snakemake.params.checkpoint,
              features_path=snakemake.output.features)
