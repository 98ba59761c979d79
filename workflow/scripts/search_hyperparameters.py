"""Rule search_hyperparameters: random search of nn_final/nn_step (brainage.search)."""

from brainage.logs import log_to_file
from brainage.search import random_search

log_to_file(snakemake.log[0])
random_search(snakemake.params.split_dir, snakemake.params.out_dir, snakemake.params.settings,
              snakemake.params.search, trials_path=snakemake.output.trials,
              best_path=snakemake.output.best)
