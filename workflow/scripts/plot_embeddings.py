"""Rules plot_embeddings (Fig. 5, the focus cell's features by epoch) and
plot_pretraining_embeddings (a pretraining run's): brainage.report.figures.plot_embeddings."""

from brainage.logs import log_to_file
from brainage.report.figures import load_embeddings, plot_embeddings

log_to_file(snakemake.log[0])
plot_embeddings(load_embeddings(snakemake.input.embeddings), snakemake.output[0],
                cell=snakemake.params.label, title=snakemake.params.title,
                setting=snakemake.params.setting)
