"""Rule train_encoder: train one grid cell's encoder (brainage.train.train_encoder).

A cell with loss.nn_from_search first takes nn_final and nn_step from its split's random
search (input search_result, brainage.search.apply_search_result); the encoder saves the
settings it was trained with.
"""

from brainage.logs import log_to_file
from brainage.search import apply_search_result
from brainage.train import train_encoder

log_to_file(snakemake.log[0])
settings = apply_search_result(snakemake.params.settings, snakemake.input.search_result or None,
                               split=snakemake.wildcards.split)
train_encoder(snakemake.params.split_dir, settings,
              encoder_path=snakemake.output.encoder, history_path=snakemake.output.history,
              embeddings_dir=snakemake.output.embeddings,
              checkpoint_path=snakemake.params.checkpoint,
              features_path=snakemake.output.features)
