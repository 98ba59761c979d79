"""Rule make_figures: every figure of the configuration but the UMAPs, which rules
plot_embeddings and plot_pretraining_embeddings draw (brainage.report.figures.make_figures)."""

from brainage.logs import log_to_file
from brainage.report.figures import make_figures

log_to_file(snakemake.log[0])
make_figures(metrics=list(snakemake.input.metrics), participants=snakemake.input.participants,
             qc=snakemake.input.qc, maps=snakemake.params.maps,
             predictions=list(snakemake.input.predictions),
             settings=snakemake.params.settings, focus=snakemake.params.focus,
             qc_thresholds=snakemake.params.qc_thresholds, outputs=snakemake.params.paths,
             search=list(snakemake.input.search), histories=snakemake.params.histories,
             modality_maps=snakemake.params.modality_maps,
             pretraining=snakemake.params.pretraining, map_name=snakemake.params.map_name)
